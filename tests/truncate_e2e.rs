//! TRUNCATE replicates as a delete of every row the truncating node had: three `accord run`
//! nodes; node 2 inserts and node 3 adds to rows while their links are down (their accord
//! stopped), node 1 truncates meanwhile, then empties and refills a row in one transaction; once
//! all are back, every node holds the same rows: node 2's concurrent inserts kept, node 3's
//! concurrent increments of truncated rows lost to the TRUNCATE (as to a DELETE), sums exact.

mod support;

use std::time::{Duration, Instant};

use support::nodes::snapshot;
use support::pg::PgCluster;
use support::service::{init_cluster, wait_until, RunningNode};

const SCHEMA: &str = "
CREATE SCHEMA shop;
CREATE TABLE shop.items (id bigint PRIMARY KEY, name text NOT NULL, stock bigint NOT NULL DEFAULT 0);
COMMENT ON TABLE shop.items IS '@accord replicate';
COMMENT ON COLUMN shop.items.stock IS '@accord delta';
CREATE TABLE shop.notes (id bigint PRIMARY KEY, item bigint NOT NULL, body text);
COMMENT ON TABLE shop.notes IS '@accord replicate';
";

const TABLES: &[&str] = &["shop.items", "shop.notes"];

/// Whether the three nodes hold the same rows and review queues.
async fn same(dbs: &[tokio_postgres::Client]) -> bool {
    let first = snapshot(&dbs[0], TABLES).await;
    snapshot(&dbs[1], TABLES).await == first && snapshot(&dbs[2], TABLES).await == first
}

async fn count(db: &tokio_postgres::Client, sql: &str) -> i64 {
    db.query_one(sql, &[]).await.unwrap().get(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_truncate_meets_concurrent_writes_as_a_delete_and_every_node_ends_the_same() {
    let pgs = tokio::task::spawn_blocking(|| PgCluster::start_many(3)).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (files, dbs) = init_cluster(&pgs, dir.path(), SCHEMA).await;
    let mut nodes: Vec<Option<RunningNode>> = files.iter().map(|f| Some(RunningNode::start(&f.config, &[]))).collect();
    // 300 items and a note for each, from node 1, everywhere.
    dbs[0]
        .batch_execute(
            "INSERT INTO shop.items SELECT g, 'item ' || g, 10 FROM generate_series(1, 300) g;
             INSERT INTO shop.notes SELECT g, g, 'note ' || g FROM generate_series(1, 300) g;",
        )
        .await
        .unwrap();
    wait_until("the items reach every node", Duration::from_secs(60), || same(&dbs)).await;

    // Nodes 2 and 3 write while cut off (their accord stopped): node 2 inserts new items, node 3
    // adds to old ones. Node 1 truncates both tables meanwhile.
    for i in [1, 2] {
        let _ = nodes[i].take().expect("running").kill9();
    }
    dbs[1]
        .batch_execute("INSERT INTO shop.items SELECT g, 'new ' || g, 5 FROM generate_series(1001, 1100) g")
        .await
        .unwrap();
    dbs[2]
        .batch_execute("UPDATE shop.items SET stock = stock + 7 WHERE id <= 150")
        .await
        .unwrap();
    dbs[0].batch_execute("TRUNCATE shop.items, shop.notes").await.unwrap();
    // A TRUNCATE and a refill of one key in one transaction: the key comes back new.
    dbs[0]
        .batch_execute("BEGIN; TRUNCATE shop.notes; INSERT INTO shop.items VALUES (5, 'refilled', 3); COMMIT;")
        .await
        .unwrap();
    for i in [1, 2] {
        nodes[i] = Some(RunningNode::start(&files[i].config, &[]));
    }
    let started = Instant::now();
    while !same(&dbs).await {
        if started.elapsed() > Duration::from_secs(120) {
            let logs: Vec<String> = nodes
                .iter_mut()
                .filter_map(Option::take)
                .map(|n| n.terminate().1)
                .collect();
            panic!("the nodes did not converge:\n{}", logs.join("\n----\n"));
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    for db in &dbs {
        assert_eq!(
            count(db, "SELECT count(*) FROM shop.notes").await,
            0,
            "the notes are gone"
        );
        assert_eq!(
            count(db, "SELECT count(*) FROM shop.items WHERE id BETWEEN 1001 AND 1100").await,
            100,
            "node 2's concurrent inserts are kept"
        );
        assert_eq!(
            count(db, "SELECT count(*) FROM shop.items WHERE id <= 300").await,
            1,
            "the truncated items are gone, node 3's increments with them; only the refilled one is back"
        );
        assert_eq!(
            count(db, "SELECT sum(stock)::bigint FROM shop.items").await,
            100 * 5 + 3,
            "every kept increment once, none of the lost ones"
        );
        assert_eq!(
            count(db, "SELECT count(*) FROM shop.items WHERE id = 5 AND name = 'refilled'").await,
            1
        );
    }
    // Writes go on afterwards, everywhere.
    dbs[2]
        .batch_execute("UPDATE shop.items SET stock = stock + 1 WHERE id = 5")
        .await
        .unwrap();
    wait_until("the last write reaches every node", Duration::from_secs(60), || {
        same(&dbs)
    })
    .await;
    assert_eq!(count(&dbs[0], "SELECT stock FROM shop.items WHERE id = 5").await, 4);
    for node in nodes.into_iter().flatten() {
        let (ok, logs) = node.terminate();
        assert!(ok, "{logs}");
        assert!(!logs.contains("ERROR"), "{logs}");
    }
}
