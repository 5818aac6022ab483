//! `accord check` run as a new user would: the built binary against a real database.

mod support;

use std::process::{Command, Output};

use support::pg::PgCluster;

fn accord(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_accord"))
        .args(args)
        .output()
        .expect("the accord binary runs")
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A first try at annotating a shop, with the mistakes people make.
const FIRST_TRY: &str = "
CREATE SCHEMA shop;
CREATE TABLE shop.products (
    id bigint PRIMARY KEY,
    name text,
    price numeric(12,2) NOT NULL,
    stock integer,
    weight double precision NOT NULL DEFAULT 0
);
COMMENT ON TABLE  shop.products        IS 'Catalogue. @accord replicate';
COMMENT ON COLUMN shop.products.id     IS '@accord lww';
COMMENT ON COLUMN shop.products.price  IS 'Price in cents. @accord reveiw';
COMMENT ON COLUMN shop.products.stock  IS '@accord delta';
COMMENT ON COLUMN shop.products.weight IS '@accord delta';

CREATE TABLE shop.visits (at timestamptz, page text);
COMMENT ON TABLE shop.visits IS '@accord replicate';

CREATE TABLE shop.customers (id bigint PRIMARY KEY, email text, credit numeric NOT NULL DEFAULT 0);
COMMENT ON TABLE  shop.customers        IS '@accord replicate default=review';
COMMENT ON COLUMN shop.customers.credit IS '@accord delta';
ALTER TABLE shop.customers REPLICA IDENTITY FULL;

CREATE TABLE shop.audit (id bigint PRIMARY KEY, note text);
COMMENT ON COLUMN shop.audit.note IS '@accord review';
";

#[tokio::test]
async fn check_names_each_mistake_and_fails() {
    let cluster = PgCluster::start();
    cluster
        .create_database("shop")
        .await
        .batch_execute(FIRST_TRY)
        .await
        .unwrap();

    let out = accord(&["check", "--dsn", &cluster.dsn("shop")]);
    let text = stdout(&out);
    assert_eq!(out.status.code(), Some(1), "errors exit with 1:\n{text}");
    for expected in [
        // The table that is right is listed with its policies.
        "shop.customers",
        "id      bigint   primary key",
        "credit  numeric  delta",
        "email   text     review",
        // Each mistake, named.
        "error[policy-on-key-column]: column shop.products.id is in the primary key",
        "column shop.products.price: unknown word `reveiw` after @accord; allowed: lww, delta, review (did you mean `review`?)",
        "error[nullable-delta]: column shop.products.stock is `delta` but may hold NULL",
        "NOT NULL DEFAULT 0",
        "error[delta-on-inexact-type]: column shop.products.weight is `delta` but its type is double precision",
        "drift",
        "error[no-primary-key]: table shop.visits has no primary key",
        "warning[tag-on-unreplicated-table]: column shop.audit.note is tagged `@accord review`, but table shop.audit is not replicated",
        "FAILED: 5 errors, 1 warning",
    ] {
        assert!(text.contains(expected), "output lacks {expected:?}:\n{text}");
    }
    assert!(
        !text.contains("Policy fingerprint"),
        "no fingerprint of a policy with errors:\n{text}"
    );
}

#[tokio::test]
async fn check_reports_json_for_machines() {
    let cluster = PgCluster::start();
    cluster
        .create_database("shop")
        .await
        .batch_execute(FIRST_TRY)
        .await
        .unwrap();

    let out = accord(&["check", "--dsn", &cluster.dsn("shop"), "--format", "json"]);
    assert_eq!(out.status.code(), Some(1));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("stdout is one JSON document");
    assert_eq!(report["ok"], false);
    assert_eq!(report["fingerprint"], serde_json::Value::Null);
    let findings = |kind: &str| -> Vec<(String, String, String)> {
        report[kind]
            .as_array()
            .unwrap()
            .iter()
            .map(|f| {
                (
                    f["code"].as_str().unwrap().to_string(),
                    f["table"].as_str().unwrap().to_string(),
                    f["column"].as_str().unwrap_or("").to_string(),
                )
            })
            .collect()
    };
    let owned = |v: &[(&str, &str, &str)]| -> Vec<(String, String, String)> {
        v.iter()
            .map(|(a, b, c)| (a.to_string(), b.to_string(), c.to_string()))
            .collect()
    };
    assert_eq!(
        findings("errors"),
        owned(&[
            ("policy-on-key-column", "shop.products", "id"),
            ("unknown-word", "shop.products", "price"),
            ("nullable-delta", "shop.products", "stock"),
            ("delta-on-inexact-type", "shop.products", "weight"),
            ("no-primary-key", "shop.visits", ""),
        ])
    );
    assert_eq!(
        findings("warnings"),
        owned(&[("tag-on-unreplicated-table", "shop.audit", "note")])
    );
    assert_eq!(report["tables"][0]["name"], "shop.customers");
    assert_eq!(report["tables"][0]["key"][0]["type"], "bigint");
    assert_eq!(report["tables"][0]["columns"][0]["name"], "credit");
    assert_eq!(report["tables"][0]["columns"][0]["policy"], "delta");
}

#[tokio::test]
async fn a_correct_database_passes_and_is_not_changed() {
    let cluster = PgCluster::start();
    cluster
        .create_database("shop")
        .await
        .batch_execute(
            "CREATE SCHEMA shop;
             CREATE TABLE shop.products (id bigint PRIMARY KEY, stock integer NOT NULL DEFAULT 0, name text);
             COMMENT ON TABLE shop.products IS '@accord replicate';
             COMMENT ON COLUMN shop.products.stock IS '@accord delta';",
        )
        .await
        .unwrap();
    // A session in which every write would fail: the check must not try one.
    let read_only = format!("{} options='-c default_transaction_read_only=on'", cluster.dsn("shop"));

    let out = accord(&["check", "--dsn", &read_only]);
    let text = stdout(&out);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("stock  integer  delta"), "{text}");
    assert!(text.contains("name   text     lww"), "{text}");
    assert!(
        text.contains("warning[replica-identity-not-full]: table shop.products has REPLICA IDENTITY DEFAULT"),
        "{text}"
    );
    assert!(
        text.contains("OK: no errors, 1 warning. Policy fingerprint: "),
        "{text}"
    );

    let json = accord(&["check", "--dsn", &read_only, "--format", "json"]);
    let report: serde_json::Value = serde_json::from_slice(&json.stdout).unwrap();
    assert_eq!(report["ok"], true);
    let fingerprint = report["fingerprint"].as_str().unwrap();
    assert_eq!(fingerprint.len(), 64);
    assert!(text.contains(fingerprint), "text and JSON give the same fingerprint");
}

#[test]
fn an_unreachable_database_is_a_failure_to_check() {
    let out = accord(&["check", "--dsn", "host=127.0.0.1 port=1 user=postgres dbname=none"]);
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("cannot connect to the database given by --dsn"),
        "{stderr}"
    );
}
