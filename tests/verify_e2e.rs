//! Issue 18: `accord verify` proves three `accord run` nodes equal while all take writes, and
//! finds exactly the differences planted on one of them behind accord's back: a row changed, a
//! row deleted, a row inserted, a `delta` column off by some amount; then `accord repair` makes
//! the nodes identical again, with the sums exact, keeping what it replaced.

mod support;

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use support::cli::accord;
use support::nodes::snapshot;
use support::pg::PgCluster;
use support::service::{init_cluster, wait_until, RunningNode};

const SCHEMA: &str = "
CREATE SCHEMA shop;
CREATE TABLE shop.items (
    id bigint PRIMARY KEY,
    name text NOT NULL,
    stock bigint NOT NULL DEFAULT 0,
    note text
);
COMMENT ON TABLE shop.items IS '@accord replicate';
COMMENT ON COLUMN shop.items.stock IS '@accord delta';
COMMENT ON COLUMN shop.items.note IS '@accord review';
";

const ITEMS: &[&str] = &["shop.items"];

/// Runs `accord verify` through node `config`; its exit status and its JSON report.
fn verify(config: &std::path::Path) -> (bool, serde_json::Value) {
    let (ok, out) = accord(&["verify", "--config", config.to_str().unwrap(), "--format", "json"]);
    let report = serde_json::from_str(&out).unwrap_or_else(|e| panic!("verify printed no report ({e}):\n{out}"));
    (ok, report)
}

fn differing_keys(report: &serde_json::Value) -> BTreeSet<String> {
    report["differences"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| format!("{} {}", d["table"].as_str().unwrap(), d["key"].as_str().unwrap()))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_finds_exactly_the_rows_changed_behind_accords_back_under_load() {
    let pgs = tokio::task::spawn_blocking(|| PgCluster::start_many(3)).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (files, dbs) = init_cluster(&pgs, dir.path(), SCHEMA).await;
    let nodes: Vec<RunningNode> = files.iter().map(|f| RunningNode::start(&f.config, &[])).collect();
    dbs[0]
        .batch_execute("INSERT INTO shop.items SELECT g, 'item ' || g, 10 FROM generate_series(1, 2000) g")
        .await
        .unwrap();
    let all_rows = || async {
        let mut counts = Vec::new();
        for db in &dbs {
            counts.push(
                db.query_one("SELECT count(*) FROM shop.items", &[])
                    .await
                    .unwrap()
                    .get::<_, i64>(0),
            );
        }
        counts.iter().all(|&c| c == 2000)
    };
    wait_until("the rows reach every node", Duration::from_secs(60), all_rows).await;

    // Every node writes rows 1..=100 and inserts its own, throughout.
    let stop = Arc::new(AtomicBool::new(false));
    // Stock added by the writers: increments and inserted rows.
    let added = Arc::new(AtomicI64::new(0));
    let writers: Vec<_> = pgs
        .iter()
        .enumerate()
        .map(|(i, pg)| {
            let (dsn, stop, added) = (pg.dsn("shop"), Arc::clone(&stop), Arc::clone(&added));
            tokio::spawn(async move {
                let (db, conn) = tokio_postgres::connect(&dsn, tokio_postgres::NoTls).await.unwrap();
                tokio::spawn(conn);
                let mut n: i64 = 0;
                while !stop.load(Ordering::SeqCst) {
                    n += 1;
                    let id = n % 100 + 1;
                    db.execute("UPDATE shop.items SET stock = stock + 1 WHERE id = $1", &[&id])
                        .await
                        .unwrap();
                    added.fetch_add(1, Ordering::SeqCst);
                    if n % 7 == 0 {
                        let note = format!("n{i}-{n}");
                        db.execute("UPDATE shop.items SET note = $2 WHERE id = $1", &[&id, &note])
                            .await
                            .unwrap();
                    }
                    if n % 10 == 0 {
                        let new = (i as i64 + 1) * 1_000_000 + n;
                        db.execute(
                            "INSERT INTO shop.items (id, name, stock) VALUES ($1, 'new', 1)",
                            &[&new],
                        )
                        .await
                        .unwrap();
                        added.fetch_add(1, Ordering::SeqCst);
                    }
                    tokio::time::sleep(Duration::from_millis(3)).await;
                }
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_secs(2)).await;

    for config in [&files[0].config, &files[2].config] {
        let (ok, report) = verify(config);
        assert!(ok, "equal nodes under writes verify clean:\n{report:#}");
        assert_eq!(differing_keys(&report), BTreeSet::new(), "{report:#}");
        assert_eq!(
            report["tables"]["shop.items"].as_array().unwrap().len(),
            3,
            "{report:#}"
        );
    }

    // Behind accord's back on node 2: a session with a replication origin of its own, whose
    // transactions the capture skips as another replicator's.
    // (A transaction takes its origin from the session when it commits: the origin is set
    // before, and reset after, in statements of their own.)
    for sql in [
        "SELECT pg_replication_origin_create('bypass')",
        "SELECT pg_replication_origin_session_setup('bypass')",
        "BEGIN;
         UPDATE shop.items SET name = 'renamed by hand' WHERE id = 1001;
         DELETE FROM shop.items WHERE id = 1002;
         UPDATE shop.items SET stock = stock + 5 WHERE id = 1003;
         INSERT INTO shop.items (id, name, stock) VALUES (5000000, 'extra', 1);
         COMMIT",
        "SELECT pg_replication_origin_session_reset()",
    ] {
        dbs[1].batch_execute(sql).await.unwrap();
    }
    let planted: BTreeSet<String> = ["[1001]", "[1002]", "[1003]", "[5000000]"]
        .iter()
        .map(|k| format!("shop.items {k}"))
        .collect();
    for config in [&files[2].config, &files[0].config] {
        let (ok, report) = verify(config);
        assert!(!ok, "a difference makes verify fail:\n{report:#}");
        assert_eq!(
            differing_keys(&report),
            planted,
            "exactly the planted keys:\n{report:#}"
        );
        for difference in report["differences"].as_array().unwrap() {
            let odd: Vec<u64> = difference["nodes"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|pair| pair[1]["standing"] == "Uncaptured")
                .map(|pair| pair[0].as_u64().unwrap())
                .collect();
            assert_eq!(odd, vec![2], "node 2 holds what accord never captured: {difference:#}");
        }
    }
    let (_, text) = accord(&["verify", "--config", files[0].config.to_str().unwrap()]);
    assert!(text.contains("4 key(s) differ"), "{text}");
    assert!(text.contains("shop.items [1002]"), "{text}");

    // The repair, through node 2 itself, while the writes go on.
    let (ok, out) = accord(&[
        "repair",
        "--config",
        files[1].config.to_str().unwrap(),
        "--format",
        "json",
    ]);
    let report: serde_json::Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("no report ({e}):\n{out}"));
    assert!(ok, "the repair leaves the nodes equal:\n{report:#}");
    let repaired: BTreeSet<String> = report["repaired"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            assert_eq!(r["node"], 2, "{r}");
            format!("{} {}", r["table"].as_str().unwrap(), r["key"].as_str().unwrap())
        })
        .collect();
    assert_eq!(repaired, planted, "{report:#}");
    assert!(report["left"].as_array().unwrap().is_empty(), "{report:#}");
    assert!(
        report["after"]["differences"].as_array().unwrap().is_empty(),
        "{report:#}"
    );

    stop.store(true, Ordering::SeqCst);
    for writer in writers {
        writer.await.unwrap();
    }
    // Identical nodes, exact sums: the planted +5 is gone, every write through accord is there.
    let identical = || async {
        let snapshots = futures_util::future::join_all(dbs.iter().map(|db| snapshot(db, ITEMS))).await;
        snapshots.windows(2).all(|w| w[0] == w[1])
    };
    wait_until(
        "the nodes converge after the repair",
        Duration::from_secs(60),
        identical,
    )
    .await;
    let expected = 2000 * 10 + added.load(Ordering::SeqCst);
    for (i, db) in dbs.iter().enumerate() {
        let sum: i64 = db
            .query_one("SELECT sum(stock)::bigint FROM shop.items", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(
            sum,
            expected,
            "node {}: every increment once, the planted one gone",
            i + 1
        );
        let name: String = db
            .query_one("SELECT name FROM shop.items WHERE id = 1001", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(name, "item 1001", "node {}", i + 1);
        let extra = db
            .query_opt("SELECT 1 FROM shop.items WHERE id = 5000000", &[])
            .await
            .unwrap();
        assert!(
            extra.is_none(),
            "node {}: the row inserted behind accord's back is gone",
            i + 1
        );
    }
    let kept: i64 = dbs[1]
        .query_one("SELECT count(*) FROM accord.repaired", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(kept, 4, "node 2 keeps what the repair replaced");
    let kept_extra: String = dbs[1]
        .query_one(
            "SELECT replaced->>'name' FROM accord.repaired WHERE row_key = '[5000000]'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(kept_extra, "extra");
    let logged: i64 = dbs[1]
        .query_one("SELECT count(*) FROM accord.conflict_log WHERE kind = 'Repair'", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(logged, 4);
    let (ok, report) = verify(&files[1].config);
    assert!(ok, "verify after the repair, writes stopped:\n{report:#}");
    assert!(report["unsettled"].as_object().unwrap().is_empty(), "{report:#}");
    assert!(report["seconds"].as_f64().unwrap() > 0.0, "{report:#}");
    // For people: the counts, how fast each node read, and the verdict.
    let (ok, text) = accord(&["verify", "--config", files[0].config.to_str().unwrap()]);
    assert!(ok, "{text}");
    assert!(
        text.contains("rows per second per node") && text.contains("no differences"),
        "{text}"
    );
    for node in nodes {
        let (ok, logs) = node.terminate();
        assert!(ok, "{logs}");
        assert!(!logs.contains("ERROR"), "{logs}");
    }
}

/// Keys of every kind are placed alike from a table's rows and from accord's metadata (text
/// keys with characters JSON escapes, numeric keys, composite keys, timestamps, booleans and
/// dates), whatever text settings a node's database defaults to; and a difference in any of them
/// is found.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_of_every_kind_verify_alike_on_nodes_with_other_text_settings() {
    let schema = r#"
CREATE SCHEMA shop;
CREATE TABLE shop.labels (code text PRIMARY KEY, v bigint NOT NULL);
CREATE TABLE shop.lots (id numeric(12,3) PRIMARY KEY, v integer NOT NULL);
CREATE TABLE shop.pairs (a integer, b varchar(20), v integer NOT NULL, PRIMARY KEY (a, b));
CREATE TABLE shop.times (at timestamptz PRIMARY KEY, span interval NOT NULL, v double precision NOT NULL);
CREATE TABLE shop.flags (on_sale boolean, day date, code character(4), host inet, v integer NOT NULL, PRIMARY KEY (on_sale, day, code));
COMMENT ON TABLE shop.labels IS '@accord replicate';
COMMENT ON TABLE shop.lots IS '@accord replicate';
COMMENT ON TABLE shop.pairs IS '@accord replicate';
COMMENT ON TABLE shop.times IS '@accord replicate';
COMMENT ON TABLE shop.flags IS '@accord replicate';
INSERT INTO shop.labels VALUES ('plain', 1), ('quo"te', 2), (E'back\\slash', 3), (E'new\nline', 4),
    (E'tab\there', 5), (E'bell\x07', 6), ('ünïcödé ✓', 7), ('/slash/', 8), ('', 9);
INSERT INTO shop.lots VALUES (1.500, 1), (2, 2), (-0.250, 3), (100.000, 4);
INSERT INTO shop.pairs VALUES (1, 'a', 1), (1, 'b"', 2), (2, 'a', 3);
INSERT INTO shop.flags VALUES (true, '2026-12-01', 'ab', '10.0.0.1', 1), (false, '2026-12-01', 'ab', '10.0.0.0/8', 2),
    (true, '2026-12-02', 'abcd', NULL, 3);
INSERT INTO shop.times SELECT timestamptz '2026-03-29 00:30:00+00' + g * interval '1 hour', g * interval '90 minutes', g / 3.0
  FROM generate_series(1, 20) g;
"#;
    let cluster = support::nodes::TestCluster::start(3, schema).await;
    // Node 2's database reads dates, times and numbers differently by default.
    let node2 = cluster.client(1).await;
    node2
        .batch_execute(
            "ALTER DATABASE shop SET timezone = 'Asia/Tokyo';
             ALTER DATABASE shop SET datestyle = 'SQL, DMY';
             ALTER DATABASE shop SET intervalstyle = 'sql_standard';
             ALTER DATABASE shop SET extra_float_digits = 0",
        )
        .await
        .unwrap();
    let verify = || async {
        cluster.nodes[&support::nodes::id(0)]
            .verify
            .verify(Vec::new())
            .await
            .unwrap_or_else(|e| panic!("verify: {e:#}"))
    };
    let report = verify().await;
    assert!(report.is_clean(), "equal nodes verify clean: {report:#?}");
    assert_eq!(report.tables["shop.labels"], vec![9, 9, 9]);
    assert_eq!(report.tables["shop.times"], vec![20, 20, 20]);

    let node2 = cluster.client(1).await;
    for sql in [
        "SELECT pg_replication_origin_create('bypass')",
        "SELECT pg_replication_origin_session_setup('bypass')",
        "BEGIN;
         UPDATE shop.labels SET v = 40 WHERE code = E'new\\nline';
         DELETE FROM shop.labels WHERE code = 'quo\"te';
         UPDATE shop.lots SET v = 30 WHERE id = -0.25;
         UPDATE shop.pairs SET v = 20 WHERE a = 1 AND b = 'b\"';
         UPDATE shop.times SET v = 0.1 WHERE at = timestamptz '2026-03-29 02:30:00+00';
         UPDATE shop.flags SET v = 9 WHERE NOT on_sale;
         COMMIT",
        "SELECT pg_replication_origin_session_reset()",
    ] {
        node2.batch_execute(sql).await.unwrap();
    }
    let report = verify().await;
    let found: BTreeSet<String> = report
        .differences
        .iter()
        .map(|d| format!("{} {}", d.table, d.key))
        .collect();
    let planted: BTreeSet<String> = [
        r#"shop.labels ["new\nline"]"#,
        r#"shop.labels ["quo\"te"]"#,
        r#"shop.lots ["-0.25"]"#,
        r#"shop.pairs [1,"b\""]"#,
        r#"shop.times ["2026-03-29 02:30:00+00"]"#,
        r#"shop.flags ["f","2026-12-01","ab  "]"#,
    ]
    .iter()
    .map(|k| k.to_string())
    .collect();
    assert_eq!(found, planted, "exactly the planted keys: {report:#?}");
    cluster.stop_all().await;
}
