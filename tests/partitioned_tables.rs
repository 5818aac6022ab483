//! A partitioned table replicates as one table: each node partitions it its own way (monthly
//! ranges on one, yearly on the other), makes partitions while the nodes run, and a change whose
//! partition does not exist yet on the receiver waits for it. `accord init` and two `accord run`
//! processes, writes on both nodes at once, a node killed in the middle.

mod support;

use std::time::{Duration, Instant};

use support::cli::accord;
use support::nodes::{free_udp_port, local_removal_count, snapshot};
use support::pg::PgCluster;
use support::service::{write_node, RunningNode};

const TABLE: &str = "
CREATE SCHEMA shop;
CREATE TABLE shop.events (
    id bigint NOT NULL,
    at date NOT NULL,
    amount bigint NOT NULL DEFAULT 0,
    note text,
    PRIMARY KEY (id, at)
) PARTITION BY RANGE (at);
COMMENT ON TABLE shop.events IS 'Partitioned. @accord replicate';
COMMENT ON COLUMN shop.events.amount IS '@accord delta';
";

/// Node 1: a partition per month, January to June 2026.
const MONTHLY: &str = "
CREATE TABLE shop.events_2026_01 PARTITION OF shop.events FOR VALUES FROM ('2026-01-01') TO ('2026-02-01');
CREATE TABLE shop.events_2026_02 PARTITION OF shop.events FOR VALUES FROM ('2026-02-01') TO ('2026-03-01');
CREATE TABLE shop.events_2026_03 PARTITION OF shop.events FOR VALUES FROM ('2026-03-01') TO ('2026-04-01');
CREATE TABLE shop.events_2026_q2 PARTITION OF shop.events FOR VALUES FROM ('2026-04-01') TO ('2026-07-01')
    PARTITION BY RANGE (at);
CREATE TABLE shop.events_2026_04 PARTITION OF shop.events_2026_q2 FOR VALUES FROM ('2026-04-01') TO ('2026-05-01');
CREATE TABLE shop.events_2026_05_06 PARTITION OF shop.events_2026_q2 FOR VALUES FROM ('2026-05-01') TO ('2026-07-01');
";

/// Node 2: one partition for 2026.
const YEARLY: &str = "
CREATE TABLE shop.events_2026 PARTITION OF shop.events FOR VALUES FROM ('2026-01-01') TO ('2027-01-01');
";

const EVENTS: &[&str] = &["shop.events"];

async fn sum_and_count(db: &tokio_postgres::Client) -> (i64, i64) {
    let row = db
        .query_one(
            "SELECT coalesce(sum(amount), 0)::bigint, count(*) FROM shop.events",
            &[],
        )
        .await
        .unwrap();
    (row.get(0), row.get(1))
}

/// Waits until both nodes hold the same rows; on failure, the nodes' logs say why.
async fn converge(dbs: &[tokio_postgres::Client], nodes: &mut Vec<RunningNode>, limit: Duration) {
    let started = Instant::now();
    while snapshot(&dbs[0], EVENTS).await != snapshot(&dbs[1], EVENTS).await {
        if started.elapsed() > limit {
            let logs: Vec<String> = nodes.drain(..).map(|n| n.terminate().1).collect();
            panic!(
                "the nodes did not converge within {limit:?}:\n{}\n{}\nlogs:\n{}",
                snapshot(&dbs[0], EVENTS).await,
                snapshot(&dbs[1], EVENTS).await,
                logs.join("\n----\n")
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_table_partitioned_differently_on_each_node_replicates_as_one_table() {
    let pgs = tokio::task::spawn_blocking(|| PgCluster::start_many(2)).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (ok, out) = accord(&["certs", "init", "--out", dir.path().join("ca").to_str().unwrap()]);
    assert!(ok, "{out}");
    let quic = [(1, free_udp_port()), (2, free_udp_port())];
    let mut dbs = Vec::new();
    let mut files = Vec::new();
    for (i, layout) in [MONTHLY, YEARLY].iter().enumerate() {
        let id = i as u32 + 1;
        let db = pgs[i].create_database("shop").await;
        db.batch_execute(TABLE).await.unwrap();
        db.batch_execute(layout).await.unwrap();
        let dsn = pgs[i].dsn("shop");
        let (ok, out) = accord(&["check", "--dsn", &dsn]);
        assert!(ok, "a partitioned table is accepted: {out}");
        let (ok, out) = accord(&["init", "--dsn", &dsn, "--node-id", &id.to_string()]);
        assert!(ok, "{out}");
        assert!(out.contains("partitioned: shop.events"), "{out}");
        let not_full: i64 = db
            .query_one(
                "SELECT count(*) FROM pg_partition_tree('shop.events') t JOIN pg_class c ON c.oid = t.relid
                  WHERE c.relreplident <> 'f'",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        assert_eq!(not_full, 0, "every partition has REPLICA IDENTITY FULL");
        // A statement trigger on the parent would not see a DELETE that names a partition (one
        // level down, or two): a removal counts in every partition (key_locks.rs).
        let partition = if id == 1 {
            "shop.events_2026_04"
        } else {
            "shop.events_2026"
        };
        let removals = local_removal_count(&db).await;
        db.batch_execute(&format!(
            "BEGIN; INSERT INTO shop.events (id, at) VALUES (999999, '2026-04-02');
             DELETE FROM {partition} WHERE id = 999999; COMMIT"
        ))
        .await
        .unwrap();
        assert_eq!(
            local_removal_count(&db).await,
            removals + 1,
            "a delete naming {partition} counts a removal"
        );
        files.push(write_node(dir.path(), id, &dsn, &quic, ""));
        dbs.push(db);
    }
    // A partition cannot be tagged on its own.
    dbs[0]
        .batch_execute("COMMENT ON TABLE shop.events_2026_01 IS '@accord replicate'")
        .await
        .unwrap();
    let (ok, out) = accord(&["check", "--dsn", &pgs[0].dsn("shop")]);
    assert!(!ok && out.contains("is a partition of shop.events"), "{out}");
    dbs[0]
        .batch_execute("COMMENT ON TABLE shop.events_2026_01 IS NULL")
        .await
        .unwrap();

    let mut nodes: Vec<RunningNode> = files.iter().map(|f| RunningNode::start(&f.config, &[])).collect();
    // Rows in every month on both nodes, each node its own ids; then both nodes add to every
    // row's amount at once.
    for (i, db) in dbs.iter().enumerate() {
        db.execute(
            "INSERT INTO shop.events (id, at, amount, note)
             SELECT $1::bigint * 1000 + g, date '2026-01-01' + (g * 7) % 180, 100, 'n' || g FROM generate_series(1, 50) g",
            &[&(i as i64 + 1)],
        )
        .await
        .unwrap();
    }
    converge(&dbs, &mut nodes, Duration::from_secs(60)).await;
    // A row moved to another month: another partition on node 1, the same one on node 2.
    dbs[0]
        .batch_execute("UPDATE shop.events SET at = date '2026-03-15', note = 'moved' WHERE id = 1001")
        .await
        .unwrap();
    dbs[1]
        .batch_execute("UPDATE shop.events SET at = date '2026-06-15', note = 'moved' WHERE id = 2001")
        .await
        .unwrap();
    converge(&dbs, &mut nodes, Duration::from_secs(60)).await;
    for db in &dbs {
        let moved: Vec<String> = db
            .query(
                "SELECT id || ' ' || at FROM shop.events WHERE note = 'moved' ORDER BY id",
                &[],
            )
            .await
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect();
        assert_eq!(moved, ["1001 2026-03-15", "2001 2026-06-15"]);
    }
    let writers: Vec<_> = (0..2)
        .map(|i| {
            let dsn = pgs[i].dsn("shop");
            tokio::spawn(async move {
                let db = accord::pg_connection::connect(&dsn).await.unwrap();
                for round in 0..100_i64 {
                    // A statement that updates many rows locks them in its scan's order, and an
                    // apply in key order: a deadlock between them aborts one, and a user tries
                    // the aborted statement again, as after any deadlock.
                    loop {
                        let updated = db
                            .execute(
                                "UPDATE shop.events SET amount = amount + 1, note = $2 WHERE id < 7000 AND id % 10 = $1::bigint % 10",
                                &[&round, &format!("node {} round {round}", i + 1)],
                            )
                            .await;
                        match updated {
                            Ok(_) => break,
                            Err(e) if e.code() == Some(&tokio_postgres::error::SqlState::T_R_DEADLOCK_DETECTED) => {}
                            Err(e) => panic!("node {}'s writer: {e}", i + 1),
                        }
                    }
                }
            })
        })
        .collect();

    // Node 2 crashes while the writers run; it comes back to a backlog, which it applies in
    // large batches.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let _ = nodes.pop().expect("two nodes").kill9();
    // Meanwhile node 1 makes July's partition and writes there; node 2 has no partition for
    // 2027 yet when node 1 writes a 2027 row, so that change waits on node 2 until it has one.
    dbs[0]
        .batch_execute(
            "CREATE TABLE shop.events_2026_07 PARTITION OF shop.events FOR VALUES FROM ('2026-07-01') TO ('2026-08-01');
             CREATE TABLE shop.events_2027 (LIKE shop.events INCLUDING DEFAULTS);
             ALTER TABLE shop.events ATTACH PARTITION shop.events_2027 FOR VALUES FROM ('2027-01-01') TO ('2028-01-01');",
        )
        .await
        .unwrap();
    // Three transactions: July's row, the 2027 row, then July's row again.
    for sql in [
        "INSERT INTO shop.events (id, at, amount) VALUES (7001, '2026-07-04', 1000)",
        "INSERT INTO shop.events (id, at, amount) VALUES (7002, '2027-03-01', 2000)",
        "UPDATE shop.events SET amount = amount + 5 WHERE id = 7001",
    ] {
        dbs[0].batch_execute(sql).await.unwrap();
    }
    // A DELETE naming a partition made later counts a removal too (a merge of a key missing on
    // node 1 waits for the capture after it): the parent's row trigger was cloned onto it.
    let removals = local_removal_count(&dbs[0]).await;
    dbs[0]
        .batch_execute(
            "BEGIN; INSERT INTO shop.events (id, at) VALUES (7999, '2026-07-20');
             DELETE FROM shop.events_2026_07 WHERE id = 7999; COMMIT",
        )
        .await
        .unwrap();
    assert_eq!(
        local_removal_count(&dbs[0]).await,
        removals + 1,
        "a delete naming a partition made later counts"
    );
    let identities: Vec<String> = dbs[0]
        .query(
            "SELECT relname::text || '=' || relreplident::text FROM pg_class
              WHERE relname IN ('events_2026_07', 'events_2027') ORDER BY 1",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(
        identities,
        ["events_2026_07=f", "events_2027=f"],
        "partitions made or attached later get REPLICA IDENTITY FULL"
    );
    dbs[0]
        .batch_execute("UPDATE shop.events SET amount = amount + 5 WHERE id = 7002")
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    nodes.push(RunningNode::start(&files[1].config, &[]));
    for writer in writers {
        writer.await.unwrap();
    }
    // The 2027 row cannot be applied on node 2 yet: its transaction waits, and what node 1
    // committed after it waits behind it (a peer's transactions apply in order); what came
    // before it, July's row, is applied.
    let started = Instant::now();
    loop {
        let july = dbs[1]
            .query_opt("SELECT amount FROM shop.events WHERE id = 7001", &[])
            .await
            .unwrap()
            .map(|r| r.get::<_, i64>(0));
        if july == Some(1000) {
            eprintln!(
                "July's row reached node 2 after {:.1} s",
                started.elapsed().as_secs_f64()
            );
            break;
        }
        // Node 2 first applies the writers' backlog (70,000 changes; a debug build on a loaded
        // machine takes a minute or more).
        if started.elapsed() > Duration::from_secs(240) {
            let (_, status) = accord(&["status", "--config", files[1].config.to_str().unwrap()]);
            let logs: Vec<String> = nodes.into_iter().map(|n| n.terminate().1).collect();
            panic!(
                "July's row, committed before the 2027 row, did not reach node 2: {july:?}\n{status}\n{}",
                logs.join("\n----\n")
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(
        dbs[1]
            .query_opt("SELECT 1 FROM shop.events WHERE id = 7002", &[])
            .await
            .unwrap()
            .is_none(),
        "node 2 has nowhere to put a 2027 row yet"
    );
    // It waits, and says so, rather than going on without the row.
    let status_of_2 = || {
        let config = files[1].config.clone();
        async move { accord(&["status", "--config", config.to_str().unwrap()]) }
    };
    let started = Instant::now();
    loop {
        let (_, status) = status_of_2().await;
        if status.contains("next transaction cannot be applied here yet: a row from node 1 has no place here (no partition of relation \"events\"") {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "node 2's status says what waits: {status}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    dbs[1]
        .batch_execute(
            "CREATE TABLE shop.events_2027_on PARTITION OF shop.events FOR VALUES FROM ('2027-01-01') TO ('2030-01-01')",
        )
        .await
        .unwrap();
    converge(&dbs, &mut nodes, Duration::from_secs(90)).await;
    let (_, status) = status_of_2().await;
    assert!(!status.contains("cannot be applied here yet"), "{status}");
    for db in &dbs {
        // 100 rows at 100, every row in a tenth of the ids touched by 100 rounds of each node:
        // each row gets +1 for every round whose number matches its id's last digit, 10 of 100.
        let (sum, count) = sum_and_count(db).await;
        assert_eq!(count, 102);
        assert_eq!(
            sum,
            100 * 100 + 100 * 10 * 2 + 1005 + 2005,
            "every increment counted once"
        );
    }
    // TRUNCATE of one partition is refused (PostgreSQL would not publish it), of one made while
    // the nodes ran too; on purpose, one node's partition can still be emptied (rolled back here).
    // (TRUNCATE of the whole table replicates: tests/truncate_e2e.rs.)
    for (node, table) in [
        (0, "shop.events_2026_01"),
        (0, "shop.events_2026_07"),
        (1, "shop.events_2027_on"),
    ] {
        let refused = dbs[node].batch_execute(&format!("TRUNCATE {table}")).await.unwrap_err();
        let message = refused
            .as_db_error()
            .map(|e| format!("{} {}", e.message(), e.hint().unwrap_or("")))
            .unwrap_or_default();
        assert!(
            message.contains("is refused: accord replicates the partitioned table as one table")
                && message.contains("SET accord.allow_truncate = on"),
            "{table}: {message}"
        );
    }
    dbs[0]
        .batch_execute("BEGIN; SET LOCAL accord.allow_truncate = on; TRUNCATE shop.events_2027; ROLLBACK;")
        .await
        .unwrap();
    assert_eq!(sum_and_count(&dbs[0]).await.1, 102);
    // TRUNCATE of the whole table replicates, partitions laid out differently or not.
    dbs[1].batch_execute("TRUNCATE shop.events").await.unwrap();
    converge(&dbs, &mut nodes, Duration::from_secs(60)).await;
    for db in &dbs {
        assert_eq!(sum_and_count(db).await, (0, 0), "emptied on every node");
    }
    for node in nodes {
        let (ok, logs) = node.terminate();
        assert!(ok, "{logs}");
    }
}
