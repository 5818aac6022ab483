//! Generated keys on every node at once: `serial`/identity keys flagged by `accord check`, then
//! converted with `accord ids convert` (a bigint key from `bigserial`, an integer key from an
//! identity), three `accord run` nodes inserting concurrently, one node's PostgreSQL crashed and
//! restarted in the middle: no id given twice, every row kept, identical nodes.

mod support;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use accord::scratch_pg::StopMode;
use support::cli::accord;
use support::nodes::{free_udp_port, snapshot};
use support::pg::PgCluster;
use support::service::{write_node, RunningNode};

const SCHEMA: &str = "
CREATE SCHEMA shop;
CREATE TABLE shop.orders (id bigserial PRIMARY KEY, customer text NOT NULL);
COMMENT ON TABLE shop.orders IS '@accord replicate';
CREATE TABLE shop.tickets (id integer GENERATED ALWAYS AS IDENTITY PRIMARY KEY, title text NOT NULL);
COMMENT ON TABLE shop.tickets IS '@accord replicate';
-- The same rows on every node (a restored copy), made through the old sequences.
INSERT INTO shop.orders (customer) SELECT 'seed-' || g FROM generate_series(1, 5) g;
INSERT INTO shop.tickets (title) SELECT 'seed-' || g FROM generate_series(1, 5) g;
";

const TABLES: &[&str] = &["shop.orders", "shop.tickets"];
const PER_WRITER: i32 = 150;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn converted_keys_never_collide_across_nodes_or_a_crash() {
    let mut pgs = tokio::task::spawn_blocking(|| PgCluster::start_many(3)).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (ok, out) = accord(&["certs", "init", "--out", dir.path().join("ca").to_str().unwrap()]);
    assert!(ok, "{out}");
    let quic: Vec<(u32, u16)> = (1..=3).map(|id| (id, free_udp_port())).collect();
    let mut files = Vec::new();
    for (i, pg) in pgs.iter().enumerate() {
        let id = (i + 1).to_string();
        pg.create_database("shop").await.batch_execute(SCHEMA).await.unwrap();
        let dsn = pg.dsn("shop");
        let (ok, out) = accord(&["check", "--dsn", &dsn]);
        assert!(!ok, "sequence keys are refused: {out}");
        assert!(
            out.contains("key column shop.orders.id takes its values from a sequence")
                && out.contains("key column shop.tickets.id takes its values from an identity")
                && out.contains("accord ids convert --dsn ... --table shop.orders"),
            "{out}"
        );
        for table in TABLES {
            let (ok, out) = accord(&["ids", "convert", "--dsn", &dsn, "--table", table]);
            assert!(ok, "{out}");
        }
        let (ok, out) = accord(&["check", "--dsn", &dsn]);
        assert!(ok, "converted keys pass: {out}");
        let (ok, out) = accord(&["init", "--dsn", &dsn, "--node-id", &id]);
        assert!(ok, "{out}");
        let (ok, out) = accord(&["ids", "convert", "--dsn", &dsn, "--table", "shop.orders"]);
        assert!(ok && out.contains("already takes its ids from accord.next_id"), "{out}");
        files.push(write_node(dir.path(), i as u32 + 1, &dsn, &quic, ""));
    }
    let mut nodes: Vec<RunningNode> = files.iter().map(|f| RunningNode::start(&f.config, &[])).collect();

    // Three writers, one per node, each inserting rows named after itself; what each saw
    // acknowledged is recorded.
    let writers: Vec<_> = (0..3)
        .map(|i| {
            let dsn = pgs[i].dsn("shop");
            tokio::spawn(async move {
                let mut acknowledged = Vec::new();
                let mut db: Option<tokio_postgres::Client> = None;
                for k in 0..PER_WRITER {
                    if db.as_ref().is_none_or(|d| d.is_closed()) {
                        db = accord::pg_connection::connect(&dsn).await.ok();
                    }
                    let Some(client) = db.as_ref() else {
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    };
                    let name = format!("node{}-{k:04}", i + 1);
                    let written = client
                        .batch_execute(&format!(
                            "BEGIN; INSERT INTO shop.orders (customer) VALUES ('{name}');
                             INSERT INTO shop.tickets (title) VALUES ('{name}'); COMMIT;"
                        ))
                        .await;
                    if written.is_ok() {
                        acknowledged.push(name);
                    }
                }
                acknowledged
            })
        })
        .collect();
    // Node 3's PostgreSQL crashes in the middle: its sequences must not give an id again.
    tokio::time::sleep(Duration::from_millis(400)).await;
    tokio::task::block_in_place(|| {
        pgs[2].stop(StopMode::Immediate);
        pgs[2].restart();
    });
    let mut acknowledged = Vec::new();
    for writer in writers {
        acknowledged.extend(writer.await.unwrap());
    }
    // The node whose database went away exits; its service manager starts it again.
    if nodes[2].has_exited() {
        let _ = nodes.pop().expect("three nodes").terminate();
        nodes.push(RunningNode::start(&files[2].config, &[]));
    }
    let mut dbs = Vec::new();
    for pg in &pgs {
        dbs.push(pg.connect("shop").await);
    }
    let started = Instant::now();
    loop {
        let snaps = [
            snapshot(&dbs[0], TABLES).await,
            snapshot(&dbs[1], TABLES).await,
            snapshot(&dbs[2], TABLES).await,
        ];
        if snaps[0] == snaps[1] && snaps[1] == snaps[2] {
            break;
        }
        if started.elapsed() > Duration::from_secs(120) {
            let logs: Vec<String> = nodes.drain(..).map(|n| n.terminate().1).collect();
            panic!("the nodes did not converge:\n{}", logs.join("\n----\n"));
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    assert!(acknowledged.len() > 300, "{} inserts acknowledged", acknowledged.len());
    for (table, name_column, lanes) in [("shop.orders", "customer", 1024_i64), ("shop.tickets", "title", 64)] {
        let rows: Vec<(i64, String)> = dbs[0]
            .query(
                &format!("SELECT id::bigint, {name_column} FROM {table} ORDER BY id"),
                &[],
            )
            .await
            .unwrap()
            .iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect();
        let by_name: BTreeMap<&str, i64> = rows.iter().map(|(id, name)| (name.as_str(), *id)).collect();
        assert_eq!(by_name.len(), rows.len(), "{table}: no two rows share a name");
        for name in &acknowledged {
            assert!(by_name.contains_key(name.as_str()), "{table}: {name} was kept");
        }
        for seed in 1..=5 {
            assert_eq!(
                by_name.get(format!("seed-{seed}").as_str()),
                Some(&seed),
                "{table}: seed rows keep their ids"
            );
        }
        for node in 1..=3_i64 {
            let ids: Vec<i64> = by_name
                .iter()
                .filter(|(name, _)| name.starts_with(&format!("node{node}-")))
                .map(|(_, id)| *id)
                .collect();
            assert!(
                ids.iter().all(|id| id % lanes == node && *id > 5),
                "{table}: node {node}'s lane: {ids:?}"
            );
            // Names sort in insert order: ids rise with them, across the crash too.
            assert!(
                ids.windows(2).all(|w| w[0] < w[1]),
                "{table}: node {node}'s ids only rise: {ids:?}"
            );
        }
    }
    for node in nodes {
        let (ok, logs) = node.terminate();
        assert!(ok, "{logs}");
    }
}
