use proptest::prelude::*;

use super::*;

fn table(comment: &str) -> Result<Option<TableTag>, AnnotationError> {
    parse_table_comment("shop.products", comment)
}

fn column(comment: &str) -> Result<Option<ColumnPolicy>, AnnotationError> {
    parse_column_comment("shop.products", "stock", comment)
}

fn replicated(default_policy: ColumnPolicy) -> Result<Option<TableTag>, AnnotationError> {
    Ok(Some(TableTag {
        default_policy,
        sequences_disjoint: false,
        inserts: InsertPolicy::Merge,
    }))
}

#[test]
fn policy_words_match_the_engine() {
    let engine: Vec<&str> = ColumnPolicy::ALL.iter().map(|p| p.keyword()).collect();
    assert_eq!(engine, POLICY_WORDS);
}

#[test]
fn tags_stand_anywhere_among_the_users_words() {
    assert_eq!(table("Catalogue. @accord replicate"), replicated(ColumnPolicy::Lww));
    assert_eq!(table("@accord replicate"), replicated(ColumnPolicy::Lww));
    assert_eq!(
        table("@accord replicate. Owned by the shop team."),
        replicated(ColumnPolicy::Lww)
    );
    assert_eq!(
        table("line one\n@accord\treplicate\nline three"),
        replicated(ColumnPolicy::Lww)
    );
    assert_eq!(column("Price in cents. @accord review"), Ok(Some(ColumnPolicy::Review)));
    assert_eq!(
        column("(@accord delta) counts units on hand"),
        Ok(Some(ColumnPolicy::Delta))
    );
    assert_eq!(column("@ACCORD Delta;"), Ok(Some(ColumnPolicy::Delta)));
    assert_eq!(column("@accord lww"), Ok(Some(ColumnPolicy::Lww)));
}

#[test]
fn comments_without_a_tag_are_not_annotations() {
    for comment in [
        "",
        "Units on hand",
        "mail ops@accord.example",
        "@accordion lessons",
        "accord delta",
    ] {
        assert_eq!(table(comment), Ok(None), "{comment:?}");
        assert_eq!(column(comment), Ok(None), "{comment:?}");
    }
}

#[test]
fn table_options_set_the_default_policy() {
    assert_eq!(
        table("@accord replicate default=review"),
        replicated(ColumnPolicy::Review)
    );
    assert_eq!(
        table("@accord replicate DEFAULT=LWW. Notes"),
        replicated(ColumnPolicy::Lww)
    );
    assert_eq!(
        table("@accord replicate default=review, see wiki"),
        replicated(ColumnPolicy::Review)
    );
}

#[test]
fn inserts_option_says_what_two_inserts_of_one_key_mean() {
    let tag = |c: &str| table(c).unwrap().unwrap();
    assert_eq!(tag("@accord replicate").inserts, InsertPolicy::Merge);
    assert_eq!(tag("@accord replicate inserts=review").inserts, InsertPolicy::Review);
    assert_eq!(
        tag("@accord replicate default=review INSERTS=Merge").inserts,
        InsertPolicy::Merge
    );
    let bad = table("@accord replicate inserts=reveiw").unwrap_err();
    assert!(matches!(bad, AnnotationError::BadInsertsValue { .. }), "{bad:?}");
    assert!(bad.to_string().contains("inserts=review"), "{bad}");
    assert!(matches!(
        table("@accord replicate inserts=merge inserts=review"),
        Err(AnnotationError::RepeatedOption { .. })
    ));
}

#[test]
fn unknown_words_are_quoted_with_what_is_allowed_and_a_suggestion() {
    let err = column("@accord detla").unwrap_err();
    assert_eq!(
        err.to_string(),
        "column shop.products.stock: unknown word `detla` after @accord; allowed: lww, delta, review \
         (did you mean `delta`?)"
    );
    let err = table("@accord replicte").unwrap_err();
    assert_eq!(
        err.to_string(),
        "table shop.products: unknown word `replicte` after @accord; allowed: replicate (did you mean \
         `replicate`?)"
    );
    let err = column("@accord counter").unwrap_err();
    assert!(!err.to_string().contains("did you mean"), "{err}");
    assert_eq!(err.code(), "unknown-word");
    assert_eq!(err.place().column(), Some("stock"));
}

#[test]
fn words_in_the_wrong_place_say_where_they_belong() {
    assert!(matches!(
        table("@accord delta"),
        Err(AnnotationError::PolicyOnTable { .. })
    ));
    let err = column("@accord replicate").unwrap_err();
    assert!(matches!(err, AnnotationError::ReplicateOnColumn { .. }));
    assert!(err.to_string().contains("table's comment"), "{err}");
}

#[test]
fn malformed_tags_are_refused() {
    assert!(matches!(table("see @accord"), Err(AnnotationError::MissingWord { .. })));
    assert!(matches!(column("@accord ."), Err(AnnotationError::MissingWord { .. })));
    assert!(matches!(
        column("@accord delta @accord review"),
        Err(AnnotationError::SeveralTags { .. })
    ));
    assert!(matches!(
        table("@accord replicate default = review"),
        Err(AnnotationError::MalformedOption { .. })
    ));
    assert!(matches!(
        table("@accord replicate default="),
        Err(AnnotationError::MalformedOption { .. })
    ));
    assert!(matches!(
        table("@accord replicate default=review default=lww"),
        Err(AnnotationError::RepeatedOption { .. })
    ));
    assert!(matches!(
        column("@accord delta min=0"),
        Err(AnnotationError::OptionOnColumn { .. })
    ));
}

#[test]
fn bad_options_name_the_option_and_the_allowed_values() {
    let err = table("@accord replicate defualt=review").unwrap_err();
    assert!(matches!(err, AnnotationError::UnknownOption { .. }));
    assert!(err.to_string().contains("did you mean `default`?"), "{err}");
    let err = table("@accord replicate default=reveiw").unwrap_err();
    assert!(err.to_string().contains("`reveiw`"), "{err}");
    assert!(err.to_string().contains("did you mean `review`?"), "{err}");
    let err = table("@accord replicate default=delta").unwrap_err();
    assert!(err.to_string().contains("column by column"), "{err}");
}

#[test]
fn near_misses_of_the_marker_are_found() {
    assert_eq!(misspelled_marker("@acord delta").as_deref(), Some("@acord"));
    assert_eq!(misspelled_marker("x @Accrod replicate").as_deref(), Some("@Accrod"));
    assert_eq!(misspelled_marker("@accord:delta").as_deref(), Some("@accord:delta"));
    assert_eq!(misspelled_marker("@accord delta"), None);
    assert_eq!(misspelled_marker("ops@acord.example @team"), None);
    assert_eq!(misspelled_marker("@accordion"), None);
}

proptest! {
    #[test]
    fn no_input_panics_the_parser(comment in any::<String>()) {
        let _ = table(&comment);
        let _ = column(&comment);
        let _ = misspelled_marker(&comment);
    }

    #[test]
    fn no_tag_like_input_panics_the_parser(
        words in proptest::collection::vec(
            prop_oneof![
                Just("@accord".to_string()),
                Just("@ACCORD".to_string()),
                Just("@acord".to_string()),
                Just("replicate".to_string()),
                Just("delta".to_string()),
                Just("default=".to_string()),
                Just("=".to_string()),
                Just("default=review".to_string()),
                "[a-z=@.é]{0,8}",
                any::<String>(),
            ],
            0..8,
        ),
        separators in proptest::collection::vec("[ \t\n.,;:()]{0,2}", 8),
    ) {
        let comment: String = words.iter().zip(&separators).map(|(w, s)| format!("{w}{s}")).collect();
        let _ = table(&comment);
        let _ = column(&comment);
        let _ = misspelled_marker(&comment);
    }

    #[test]
    fn users_text_around_a_tag_is_ignored(before in "[a-zA-Z0-9 ,]{0,30}", after in "[a-zA-Z0-9 ,]{0,30}") {
        let comment = format!("{before} @accord review. {after}");
        prop_assert_eq!(column(&comment), Ok(Some(ColumnPolicy::Review)));
    }
}
