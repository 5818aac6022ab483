//! Reading policies from real databases: a correct schema, every mistake `check` must name, and
//! the fingerprint that peers compare.

mod support;

use accord_engine::{ColumnDef, ColumnPolicy, ColumnType, KeyColumn, TableDef};
use accord_schema_annotations::{pg, Checked, Problem, SchemaPolicy, Severity};
use support::pg::PgCluster;

const SHOP: &str = "
CREATE SCHEMA shop;
CREATE TABLE shop.products (
    id bigint PRIMARY KEY,
    weight real,
    stock integer NOT NULL DEFAULT 0,
    price numeric(12,2) NOT NULL,
    name text
);
COMMENT ON TABLE  shop.products       IS 'Catalogue. @accord replicate';
COMMENT ON COLUMN shop.products.stock IS '@accord delta';
COMMENT ON COLUMN shop.products.price IS 'Price in cents. @accord review';
COMMENT ON COLUMN shop.products.name  IS '@accord lww';
ALTER TABLE shop.products REPLICA IDENTITY FULL;

CREATE TABLE shop.order_lines (
    order_id bigint,
    line integer,
    qty smallint NOT NULL DEFAULT 0,
    amount money NOT NULL DEFAULT 0,
    total numeric NOT NULL DEFAULT 0,
    note text,
    PRIMARY KEY (order_id, line)
);
COMMENT ON TABLE  shop.order_lines        IS '@accord replicate default=review. Lines of orders.';
COMMENT ON COLUMN shop.order_lines.qty    IS '@accord delta';
COMMENT ON COLUMN shop.order_lines.amount IS '@accord delta';
COMMENT ON COLUMN shop.order_lines.total  IS 'Running total (@accord delta)';
COMMENT ON COLUMN shop.order_lines.note   IS 'Free text, written by staff';
ALTER TABLE shop.order_lines REPLICA IDENTITY FULL;

CREATE TABLE public.untagged (id int PRIMARY KEY, body text);
COMMENT ON TABLE public.untagged IS 'Not replicated; mail ops@accord.example';
";

async fn checked(cluster: &PgCluster, db: &str) -> Checked {
    let mut client = cluster.connect(db).await;
    pg::check_database(&mut client).await.expect("the catalog can be read")
}

fn key(name: &str, ty: ColumnType) -> KeyColumn {
    KeyColumn { name: name.into(), ty }
}

fn col(name: &str, ty: ColumnType, policy: ColumnPolicy) -> ColumnDef {
    ColumnDef {
        name: name.into(),
        ty,
        policy,
    }
}

fn text() -> ColumnType {
    ColumnType::Other("text".into())
}

#[tokio::test]
async fn a_correct_schema_loads_into_its_policy() {
    let cluster = PgCluster::start();
    cluster.create_database("shop").await.batch_execute(SHOP).await.unwrap();

    let checked = checked(&cluster, "shop").await;
    assert_eq!(checked.problems, Vec::<Problem>::new());
    let expected = SchemaPolicy::new(vec![
        TableDef::new(
            "shop.products",
            vec![key("id", ColumnType::BigInt)],
            vec![
                col("name", text(), ColumnPolicy::Lww),
                col(
                    "price",
                    ColumnType::Numeric {
                        precision: Some(12),
                        scale: Some(2),
                    },
                    ColumnPolicy::Review,
                ),
                col("stock", ColumnType::Integer, ColumnPolicy::Delta),
                col("weight", ColumnType::Real, ColumnPolicy::Lww),
            ],
        )
        .unwrap(),
        TableDef::new(
            "shop.order_lines",
            vec![key("order_id", ColumnType::BigInt), key("line", ColumnType::Integer)],
            vec![
                col("amount", ColumnType::Money, ColumnPolicy::Delta),
                col("note", text(), ColumnPolicy::Review),
                col("qty", ColumnType::SmallInt, ColumnPolicy::Delta),
                col(
                    "total",
                    ColumnType::Numeric {
                        precision: None,
                        scale: None,
                    },
                    ColumnPolicy::Delta,
                ),
            ],
        )
        .unwrap(),
    ])
    .unwrap();
    assert_eq!(checked.policy, expected);
    let names: Vec<&str> = checked.policy.tables().iter().map(|t| t.name.as_str()).collect();
    assert_eq!(
        names,
        ["shop.order_lines", "shop.products"],
        "tables in canonical order"
    );
}

const MISTAKES: &str = "
CREATE SCHEMA shop;
CREATE TABLE shop.nokey (id bigint, n integer NOT NULL DEFAULT 0);
COMMENT ON TABLE shop.nokey IS '@accord replicate';

CREATE TABLE shop.floaty (id bigint PRIMARY KEY, weight double precision NOT NULL DEFAULT 0);
COMMENT ON TABLE shop.floaty IS '@accord replicate';
COMMENT ON COLUMN shop.floaty.weight IS '@accord delta';

CREATE TABLE shop.texty (id bigint PRIMARY KEY, label text NOT NULL DEFAULT '');
COMMENT ON TABLE shop.texty IS '@accord replicate';
COMMENT ON COLUMN shop.texty.label IS '@accord delta';

CREATE TABLE shop.keyed (id bigint PRIMARY KEY, n text);
COMMENT ON TABLE shop.keyed IS '@accord replicate';
COMMENT ON COLUMN shop.keyed.id IS '@accord lww';

CREATE TABLE shop.typo (id bigint PRIMARY KEY, stock integer NOT NULL DEFAULT 0);
COMMENT ON TABLE shop.typo IS '@accord replicate';
COMMENT ON COLUMN shop.typo.stock IS 'On hand. @accord detla';

CREATE TABLE shop.typo_table (id bigint PRIMARY KEY);
COMMENT ON TABLE shop.typo_table IS '@accord replicat';

CREATE TABLE shop.nullable (id bigint PRIMARY KEY, stock integer);
COMMENT ON TABLE shop.nullable IS '@accord replicate';
COMMENT ON COLUMN shop.nullable.stock IS '@accord delta';

CREATE TABLE shop.loose (id bigint PRIMARY KEY, price numeric NOT NULL);
COMMENT ON COLUMN shop.loose.price IS '@accord review';

CREATE VIEW shop.viewed AS SELECT 1 AS id;
COMMENT ON VIEW shop.viewed IS '@accord replicate';

CREATE TABLE shop.generated (id bigint PRIMARY KEY, n integer NOT NULL,
    twice integer GENERATED ALWAYS AS (n * 2) STORED);
COMMENT ON TABLE shop.generated IS '@accord replicate';
ALTER TABLE shop.generated REPLICA IDENTITY FULL;
COMMENT ON COLUMN shop.generated.twice IS '@accord delta';

CREATE UNLOGGED TABLE shop.scratch (id bigint PRIMARY KEY);
COMMENT ON TABLE shop.scratch IS '@accord replicate';

CREATE TABLE shop.fine (id bigint PRIMARY KEY, note text);
COMMENT ON TABLE shop.fine IS '@accord replicate';
COMMENT ON COLUMN shop.fine.note IS '@acord review';
";

/// The one problem about `table` (and `column`), which must exist.
fn problem<'a>(checked: &'a Checked, table: &str, column: Option<&str>) -> &'a Problem {
    let found: Vec<&Problem> = checked
        .problems
        .iter()
        .filter(|p| p.table() == table && p.column() == column)
        .collect();
    assert_eq!(found.len(), 1, "one problem for {table} {column:?}, found {found:#?}");
    found[0]
}

fn assert_says(problem: &Problem, code: &str, severity: Severity, words: &[&str]) {
    assert_eq!(problem.code(), code, "{problem}");
    assert_eq!(problem.severity(), severity, "{problem}");
    let message = problem.to_string();
    for word in words {
        assert!(message.contains(word), "{message:?} should contain {word:?}");
    }
}

#[tokio::test]
async fn every_mistake_is_named() {
    let cluster = PgCluster::start();
    cluster
        .create_database("mistakes")
        .await
        .batch_execute(MISTAKES)
        .await
        .unwrap();
    let checked = checked(&cluster, "mistakes").await;
    use Severity::{Error, Warning};

    assert_says(
        problem(&checked, "shop.nokey", None),
        "no-primary-key",
        Error,
        &["shop.nokey", "primary key"],
    );
    assert_says(
        problem(&checked, "shop.floaty", Some("weight")),
        "delta-on-inexact-type",
        Error,
        &["shop.floaty.weight", "double precision", "floating-point", "drift"],
    );
    assert_says(
        problem(&checked, "shop.texty", Some("label")),
        "delta-on-inexact-type",
        Error,
        &["shop.texty.label", "text", "exact numeric"],
    );
    assert_says(
        problem(&checked, "shop.keyed", Some("id")),
        "policy-on-key-column",
        Error,
        &["shop.keyed.id", "primary key", "`@accord lww`"],
    );
    assert_says(
        problem(&checked, "shop.typo", Some("stock")),
        "unknown-word",
        Error,
        &[
            "shop.typo.stock",
            "`detla`",
            "lww, delta, review",
            "did you mean `delta`?",
        ],
    );
    assert_says(
        problem(&checked, "shop.typo_table", None),
        "unknown-word",
        Error,
        &["table shop.typo_table", "`replicat`", "did you mean `replicate`?"],
    );
    assert_says(
        problem(&checked, "shop.nullable", Some("stock")),
        "nullable-delta",
        Error,
        &["shop.nullable.stock", "NOT NULL DEFAULT 0"],
    );
    assert_says(
        problem(&checked, "shop.loose", Some("price")),
        "tag-on-unreplicated-table",
        Warning,
        &["shop.loose.price", "not replicated"],
    );
    assert_says(
        problem(&checked, "shop.viewed", None),
        "not-a-table",
        Error,
        &["view shop.viewed"],
    );
    assert_says(
        problem(&checked, "shop.scratch", None),
        "unlogged-table",
        Error,
        &["shop.scratch", "UNLOGGED", "SET LOGGED"],
    );
    assert_says(
        problem(&checked, "shop.generated", Some("twice")),
        "policy-on-generated-column",
        Error,
        &["shop.generated.twice", "generated"],
    );
    assert_says(
        problem(&checked, "shop.fine", None),
        "replica-identity-not-full",
        Warning,
        &["shop.fine", "REPLICA IDENTITY DEFAULT", "FULL"],
    );
    assert_says(
        problem(&checked, "shop.fine", Some("note")),
        "misspelled-tag",
        Warning,
        &["shop.fine.note", "`@acord`"],
    );

    // Tables with errors are left out whole; one with only warnings takes part.
    let names: Vec<&str> = checked.policy.tables().iter().map(|t| t.name.as_str()).collect();
    assert_eq!(names, ["shop.fine"]);
    // Every problem was asserted above, and nothing else was found.
    assert_eq!(checked.problems.len(), 13, "{:#?}", checked.problems);
}

/// The annotated schema of the fingerprint test, its columns created in the given order; `later`
/// columns are added by ALTERs after another column came and went, as on a node with a history.
fn fingerprint_schema(columns: &[&str], later: &[&str]) -> String {
    let mut sql = format!(
        "CREATE SCHEMA shop;
         CREATE TABLE shop.products (id bigint PRIMARY KEY, {});
         ALTER TABLE shop.products ADD COLUMN scratch int;
         ALTER TABLE shop.products DROP COLUMN scratch;",
        columns.join(", ")
    );
    for column in later {
        sql.push_str(&format!("ALTER TABLE shop.products ADD COLUMN {column};"));
    }
    sql.push_str(
        "COMMENT ON TABLE  shop.products       IS '@accord replicate';
         COMMENT ON COLUMN shop.products.stock IS '@accord delta';
         COMMENT ON COLUMN shop.products.price IS '@accord review';
         ALTER TABLE shop.products REPLICA IDENTITY FULL;",
    );
    sql
}

#[tokio::test]
async fn nodes_with_the_same_annotated_schema_agree_on_the_fingerprint() {
    let clusters = PgCluster::start_many(2);
    let (a, b) = (&clusters[0], &clusters[1]);
    let stock = "stock integer NOT NULL DEFAULT 0";
    let price = "price numeric(12,2) NOT NULL DEFAULT 0";
    let name = "name text";
    a.create_database("shop")
        .await
        .batch_execute(&fingerprint_schema(&[name, price, stock], &[]))
        .await
        .unwrap();
    let b_client = b.create_database("shop").await;
    b_client
        .batch_execute(&fingerprint_schema(&[stock], &[price, name]))
        .await
        .unwrap();

    let fingerprint = |checked: Checked| {
        assert!(!checked.has_errors(), "{:#?}", checked.problems);
        checked.policy.fingerprint()
    };
    let a_fp = fingerprint(checked(a, "shop").await);
    assert_eq!(
        a_fp,
        fingerprint(checked(b, "shop").await),
        "same schema, other column history"
    );

    b_client
        .batch_execute("COMMENT ON COLUMN shop.products.name IS '@accord review'")
        .await
        .unwrap();
    assert_ne!(
        a_fp,
        fingerprint(checked(b, "shop").await),
        "a changed policy changes it"
    );
    b_client
        .batch_execute("COMMENT ON COLUMN shop.products.name IS NULL")
        .await
        .unwrap();
    assert_eq!(a_fp, fingerprint(checked(b, "shop").await), "back to the same policy");

    b_client
        .batch_execute("ALTER TABLE shop.products ALTER COLUMN stock TYPE bigint")
        .await
        .unwrap();
    assert_ne!(
        a_fp,
        fingerprint(checked(b, "shop").await),
        "a changed column type changes it"
    );
    b_client
        .batch_execute("ALTER TABLE shop.products ALTER COLUMN stock TYPE integer")
        .await
        .unwrap();
    assert_eq!(a_fp, fingerprint(checked(b, "shop").await), "back to the same types");

    b_client
        .batch_execute("ALTER TABLE shop.products ADD COLUMN colour text")
        .await
        .unwrap();
    assert_ne!(
        a_fp,
        fingerprint(checked(b, "shop").await),
        "an added column changes it"
    );
}
