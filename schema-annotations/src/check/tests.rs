use super::*;

fn col(name: &str, type_name: &str, comment: &str) -> CatalogColumn {
    CatalogColumn {
        name: name.into(),
        type_name: type_name.into(),
        not_null: true,
        default: None,
        identity: false,
        generated: false,
        key_position: None,
        comment: (!comment.is_empty()).then(|| comment.to_string()),
    }
}

fn key(name: &str, position: u32) -> CatalogColumn {
    CatalogColumn {
        key_position: Some(position),
        ..col(name, "bigint", "")
    }
}

fn table(name: &str, comment: &str, columns: Vec<CatalogColumn>) -> CatalogTable {
    CatalogTable {
        schema: "shop".into(),
        name: name.into(),
        kind: RelationKind::Table,
        partition_of: None,
        replica_identity: ReplicaIdentity::Full,
        unlogged: false,
        comment: Some(comment.into()),
        columns,
    }
}

fn codes(checked: &Checked) -> Vec<&'static str> {
    checked.problems.iter().map(Problem::code).collect()
}

#[test]
fn a_correct_schema_becomes_a_canonical_policy() {
    let checked = check(&[
        table(
            "products",
            "Catalogue. @accord replicate",
            vec![
                col("stock", "integer", "@accord delta"),
                key("id", 1),
                col("price", "numeric(12,2)", "Price in cents. @accord review"),
                col("name", "text", ""),
            ],
        ),
        table(
            "lines",
            "@accord replicate default=review",
            vec![
                key("line", 2),
                key("order_id", 1),
                col("note", "text", ""),
                col("qty", "bigint", "@accord lww"),
            ],
        ),
    ]);
    assert_eq!(checked.problems, vec![]);
    let names: Vec<&str> = checked.policy.tables().iter().map(|t| t.name.as_str()).collect();
    assert_eq!(names, ["shop.lines", "shop.products"]);
    let products = checked.policy.table("shop.products").unwrap();
    let columns: Vec<(&str, ColumnPolicy)> = products.columns.iter().map(|c| (c.name.as_str(), c.policy)).collect();
    assert_eq!(
        columns,
        [
            ("name", ColumnPolicy::Lww),
            ("price", ColumnPolicy::Review),
            ("stock", ColumnPolicy::Delta)
        ]
    );
    let lines = checked.policy.table("shop.lines").unwrap();
    let key: Vec<&str> = lines.key.iter().map(|k| k.name.as_str()).collect();
    assert_eq!(key, ["order_id", "line"]);
    assert_eq!(lines.columns[0].policy, ColumnPolicy::Review);
    assert_eq!(lines.columns[1].policy, ColumnPolicy::Lww);
}

#[test]
fn every_mistake_is_reported_and_its_table_left_out() {
    let mut nullable = col("count", "integer", "@accord delta");
    nullable.not_null = false;
    let mut generated = col("total", "bigint", "@accord lww");
    generated.generated = true;
    let mut tagged_key = key("id", 1);
    tagged_key.comment = Some("@accord delta".into());
    let checked = check(&[
        table("nokey", "@accord replicate", vec![col("a", "text", "")]),
        table(
            "mixed",
            "@accord replicate",
            vec![
                tagged_key,
                col("weight", "double precision", "@accord delta"),
                col("label", "text", "@accord delta"),
                nullable,
                generated,
                col("typo", "integer", "@accord detla"),
            ],
        ),
        table(
            "plain",
            "not replicated",
            vec![key("id", 1), col("n", "integer", "@accord delta")],
        ),
        table(
            "typo",
            "@accord replicte",
            vec![key("id", 1), col("n", "integer", "@accord delta")],
        ),
    ]);
    assert!(checked.policy.is_empty(), "{:?}", checked.policy);
    assert_eq!(
        codes(&checked),
        [
            "nullable-delta",
            "policy-on-key-column",
            "delta-on-inexact-type",
            "policy-on-generated-column",
            "unknown-word",
            "delta-on-inexact-type",
            "no-primary-key",
            "tag-on-unreplicated-table",
            "unknown-word",
        ]
    );
    let float = checked
        .problems
        .iter()
        .find(|p| p.column() == Some("weight"))
        .unwrap()
        .to_string();
    assert!(float.contains("drift"), "{float}");
    let nullable = checked.problems.iter().find(|p| p.code() == "nullable-delta").unwrap();
    assert!(nullable.to_string().contains("NOT NULL DEFAULT 0"), "{nullable}");
    assert!(checked.has_errors());
    assert_eq!(checked.warnings().count(), 1);
}

#[test]
fn only_ordinary_tables_replicate() {
    let mut view = table("v", "@accord replicate", vec![key("id", 1)]);
    view.kind = RelationKind::View;
    let checked = check(&[view]);
    assert_eq!(codes(&checked), ["not-a-table"]);
    assert!(checked.problems[0].to_string().contains("view shop.v"));
}

#[test]
fn keys_counted_by_a_sequence_are_refused_unless_declared_disjoint() {
    let mut id = key("id", 1);
    id.default = Some("nextval('shop.orders_id_seq'::regclass)".into());
    let mut number = col("number", "bigint", "");
    number.identity = true;
    let checked = check(&[table("orders", "@accord replicate", vec![id.clone(), number.clone()])]);
    assert_eq!(codes(&checked), ["sequence-key", "sequence-column"]);
    let error = checked.problems[0].to_string();
    assert!(
        error.contains("key column shop.orders.id takes its values from a sequence"),
        "{error}"
    );
    assert!(
        error.contains("accord ids convert --dsn ... --table shop.orders"),
        "{error}"
    );
    assert!(checked.policy.is_empty(), "the table is left out");

    let declared = check(&[table(
        "orders",
        "@accord replicate sequences=disjoint",
        vec![id.clone(), number],
    )]);
    assert!(declared.problems.is_empty(), "{:?}", declared.problems);
    let mut converted = key("id", 1);
    converted.default = Some("accord.next_id('shop.orders_id_ids'::regclass, 1024)".into());
    assert!(check(&[table("orders", "@accord replicate", vec![converted])])
        .problems
        .is_empty());
    let bad = check(&[table("orders", "@accord replicate sequences=yes", vec![id])]);
    assert_eq!(codes(&bad), ["bad-sequences-value"]);
}

#[test]
fn a_partitioned_table_replicates_as_one_table_and_its_partitions_cannot_be_tagged() {
    let mut root = table("events", "@accord replicate", vec![key("id", 1)]);
    root.kind = RelationKind::PartitionedTable;
    let mut part = table("events_2026", "@accord replicate", vec![key("id", 1)]);
    part.partition_of = Some("shop.events".into());
    let checked = check(&[root, part]);
    assert_eq!(codes(&checked), ["partition-tagged"]);
    assert!(checked.problems[0]
        .to_string()
        .contains("move the `@accord` tags to shop.events"));
    assert_eq!(
        checked
            .policy
            .tables()
            .iter()
            .map(|t| t.name.as_str())
            .collect::<Vec<_>>(),
        ["shop.events"]
    );
}

#[test]
fn warnings_do_not_keep_a_table_out() {
    let mut t = table(
        "t",
        "@accord replicate",
        vec![key("id", 1), col("n", "text", "@acord review")],
    );
    t.replica_identity = ReplicaIdentity::Default;
    let checked = check(&[t]);
    assert_eq!(codes(&checked), ["replica-identity-not-full", "misspelled-tag"]);
    assert!(!checked.has_errors());
    assert_eq!(checked.policy.tables().len(), 1);
}

#[test]
fn tables_whose_names_collide_are_refused() {
    let mut a = table("b.c", "@accord replicate", vec![key("id", 1)]);
    a.schema = "a".into();
    let mut b = table("c", "@accord replicate", vec![key("id", 1)]);
    b.schema = "a.b".into();
    let checked = check(&[a, b]);
    assert_eq!(codes(&checked), ["duplicate-table"]);
    assert!(checked.policy.is_empty());
}
