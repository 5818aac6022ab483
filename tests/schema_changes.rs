//! Issue 17: a migration run on each node in turn while the cluster takes writes. Three `accord
//! run` nodes; every node increments a `delta` column and inserts rows throughout. Node 1 adds a
//! tagged `delta` column and writes to it while nodes 2 and 3 do not have it yet (their appliers
//! hold node 1's changes until they do); node 2 migrates and writes to it too, then node 3. No
//! capture stops, and the nodes end identical with exact sums of both columns.

mod support;

use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use support::cli::accord;
use support::nodes::{free_udp_port, snapshot};
use support::pg::PgCluster;
use support::service::{wait_until, write_node, RunningNode};

const SCHEMA: &str = "
CREATE SCHEMA shop;
CREATE TABLE shop.items (id bigint PRIMARY KEY, name text NOT NULL, stock bigint NOT NULL DEFAULT 0);
COMMENT ON TABLE shop.items IS '@accord replicate';
COMMENT ON COLUMN shop.items.stock IS '@accord delta';
";

const MIGRATION: &str = "
BEGIN;
ALTER TABLE shop.items ADD COLUMN sold bigint NOT NULL DEFAULT 0;
COMMENT ON COLUMN shop.items.sold IS 'Units sold. @accord delta';
COMMIT;
";

const TABLES: &[&str] = &["shop.items"];

async fn same(dbs: &[tokio_postgres::Client]) -> bool {
    let first = snapshot(&dbs[0], TABLES).await;
    snapshot(&dbs[1], TABLES).await == first && snapshot(&dbs[2], TABLES).await == first
}

async fn count(db: &tokio_postgres::Client, sql: &str) -> i64 {
    db.query_one(sql, &[]).await.unwrap().get(0)
}

/// What one node's writer did.
#[derive(Default)]
struct Writes {
    stock: AtomicI64,
    sold: AtomicI64,
    inserted: AtomicI64,
    /// The node has the `sold` column: its writer increments it too.
    migrated: AtomicBool,
}

/// Increments `stock` of rows 1..=50 in turn (and `sold`, once migrated), inserting a new row of
/// stock 1 every tenth write, until `stop`.
fn spawn_writer(pg: &PgCluster, node: i64, writes: Arc<Writes>, stop: Arc<AtomicBool>) -> tokio::task::JoinHandle<()> {
    let dsn = pg.dsn("shop");
    tokio::spawn(async move {
        let (db, conn) = tokio_postgres::connect(&dsn, tokio_postgres::NoTls).await.unwrap();
        tokio::spawn(conn);
        let mut n: i64 = 0;
        while !stop.load(Ordering::SeqCst) {
            n += 1;
            let k = n % 50 + 1;
            db.execute("UPDATE shop.items SET stock = stock + 1 WHERE id = $1", &[&k])
                .await
                .unwrap();
            writes.stock.fetch_add(1, Ordering::SeqCst);
            if writes.migrated.load(Ordering::SeqCst) {
                db.execute("UPDATE shop.items SET sold = sold + 1 WHERE id = $1", &[&k])
                    .await
                    .unwrap();
                writes.sold.fetch_add(1, Ordering::SeqCst);
            }
            if n % 10 == 0 {
                let id = node * 1_000_000 + n;
                db.execute("INSERT INTO shop.items (id, name, stock) VALUES ($1, 'new', 1)", &[&id])
                    .await
                    .unwrap();
                writes.inserted.fetch_add(1, Ordering::SeqCst);
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolling_migration_under_writes_loses_nothing() {
    let pgs = tokio::task::spawn_blocking(|| PgCluster::start_many(3)).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (ok, out) = accord(&["certs", "init", "--out", dir.path().join("ca").to_str().unwrap()]);
    assert!(ok, "{out}");
    let quic: Vec<(u32, u16)> = (1..=3).map(|id| (id, free_udp_port())).collect();
    let mut files = Vec::new();
    let mut dbs = Vec::new();
    for (i, pg) in pgs.iter().enumerate() {
        let db = pg.create_database("shop").await;
        db.batch_execute(SCHEMA).await.unwrap();
        let dsn = pg.dsn("shop");
        let (ok, out) = accord(&["init", "--dsn", &dsn, "--node-id", &(i + 1).to_string()]);
        assert!(ok, "{out}");
        files.push(write_node(dir.path(), i as u32 + 1, &dsn, &quic, ""));
        dbs.push(db);
    }
    let nodes: Vec<RunningNode> = files.iter().map(|f| RunningNode::start(&f.config, &[])).collect();
    dbs[0]
        .batch_execute("INSERT INTO shop.items SELECT g, 'item ' || g, 10 FROM generate_series(1, 200) g")
        .await
        .unwrap();
    wait_until("the items reach every node", Duration::from_secs(60), || same(&dbs)).await;

    let stop = Arc::new(AtomicBool::new(false));
    let writes: Vec<Arc<Writes>> = (0..3).map(|_| Arc::new(Writes::default())).collect();
    let writers: Vec<_> = pgs
        .iter()
        .enumerate()
        .map(|(i, pg)| spawn_writer(pg, i as i64 + 1, Arc::clone(&writes[i]), Arc::clone(&stop)))
        .collect();
    tokio::time::sleep(Duration::from_secs(2)).await;

    // Node 1 first: its changes now carry a column the others do not have.
    dbs[0].batch_execute(MIGRATION).await.unwrap();
    writes[0].migrated.store(true, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_secs(3)).await;
    let unmigrated: i64 = count(
        &dbs[2],
        "SELECT count(*) FROM information_schema.columns WHERE table_name = 'items' AND column_name = 'sold'",
    )
    .await;
    assert_eq!(unmigrated, 0, "node 3 is not migrated yet");
    // Then node 2, then node 3, each writing to the new column once it has it.
    for i in [1, 2] {
        dbs[i].batch_execute(MIGRATION).await.unwrap();
        writes[i].migrated.store(true, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_secs(3)).await;
    }
    stop.store(true, Ordering::SeqCst);
    for writer in writers {
        writer.await.unwrap();
    }

    let started = Instant::now();
    while !same(&dbs).await {
        if started.elapsed() > Duration::from_secs(120) {
            let logs: Vec<String> = nodes.into_iter().map(|n| n.terminate().1).collect();
            panic!("the nodes did not converge:\n{}", logs.join("\n----\n"));
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let total = |f: fn(&Writes) -> i64| writes.iter().map(|w| f(w)).sum::<i64>();
    let stock = total(|w| w.stock.load(Ordering::SeqCst));
    let sold = total(|w| w.sold.load(Ordering::SeqCst));
    let inserted = total(|w| w.inserted.load(Ordering::SeqCst));
    assert!(sold > 0 && writes.iter().all(|w| w.sold.load(Ordering::SeqCst) > 0));
    for db in &dbs {
        assert_eq!(
            count(db, "SELECT sum(stock)::bigint FROM shop.items").await,
            200 * 10 + stock + inserted,
            "every stock increment and insert once"
        );
        assert_eq!(
            count(db, "SELECT sum(sold)::bigint FROM shop.items").await,
            sold,
            "every increment of the new column once"
        );
        assert_eq!(count(db, "SELECT count(*) FROM shop.items").await, 200 + inserted);
    }
    for node in nodes {
        let (ok, logs) = node.terminate();
        assert!(ok, "{logs}");
        assert!(!logs.contains("stopped capturing"), "a capture stopped:\n{logs}");
        assert!(!logs.contains("ERROR"), "{logs}");
    }
}
