//! Source transactions arrive whole: nodes writing at once, readers on every node checking, in
//! every snapshot they take, invariants that hold only between whole transactions.
//!
//! Three nodes: a row's state relayed by one node carries a third node's contributions, so a
//! node applies a transaction only after what it built on (`RowChange::builds_on`), or a reader
//! there sees part of the third node's transaction before it arrives.

mod support;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use support::nodes::TestCluster;
use tokio_postgres::IsolationLevel;

const BANK: &str = "
CREATE SCHEMA bank;
CREATE TABLE bank.accounts (id integer PRIMARY KEY, balance bigint NOT NULL);
COMMENT ON TABLE bank.accounts IS '@accord replicate';
COMMENT ON COLUMN bank.accounts.balance IS '@accord delta';
CREATE TABLE bank.orders (id bigint PRIMARY KEY, lines integer NOT NULL);
COMMENT ON TABLE bank.orders IS '@accord replicate';
CREATE TABLE bank.order_lines (order_id bigint, n integer, PRIMARY KEY (order_id, n));
COMMENT ON TABLE bank.order_lines IS '@accord replicate';
";

const TABLES: &[&str] = &["bank.accounts", "bank.orders", "bank.order_lines"];
const ACCOUNTS: i32 = 3_000;
const START_BALANCE: i64 = 1_000;

/// What a reader found wrong in one snapshot.
async fn check_snapshot(db: &mut tokio_postgres::Client) -> Vec<String> {
    let tx = db
        .build_transaction()
        .isolation_level(IsolationLevel::RepeatableRead)
        .start()
        .await
        .expect("a snapshot");
    let sum: i64 = tx
        .query_one("SELECT coalesce(sum(balance), 0)::bigint FROM bank.accounts", &[])
        .await
        .expect("sum")
        .get(0);
    let partial: Vec<(i64, i32, i64)> = tx
        .query(
            "SELECT o.id, o.lines, (SELECT count(*) FROM bank.order_lines l WHERE l.order_id = o.id)
               FROM bank.orders o
              WHERE o.lines <> (SELECT count(*) FROM bank.order_lines l WHERE l.order_id = o.id)",
            &[],
        )
        .await
        .expect("orders")
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    let orphans: i64 = tx
        .query_one(
            "SELECT count(*) FROM bank.order_lines l WHERE NOT EXISTS (SELECT 1 FROM bank.orders o WHERE o.id = l.order_id)",
            &[],
        )
        .await
        .expect("orphans")
        .get(0);
    tx.commit().await.expect("end of snapshot");
    let mut wrong = Vec::new();
    if sum != i64::from(ACCOUNTS) * START_BALANCE {
        wrong.push(format!("balances sum to {sum}"));
    }
    for (id, lines, found) in partial {
        wrong.push(format!("order {id} shows {found} of its {lines} lines"));
    }
    if orphans > 0 {
        wrong.push(format!("{orphans} order lines without their order"));
    }
    wrong
}

/// Moves `amount` from account `from` to each of `to` in one transaction: the sum of balances
/// stays the same.
fn transfer_sql(from: i32, to: impl Iterator<Item = i32>, amount: i64) -> String {
    let mut sql = String::from("BEGIN;");
    let mut total = 0;
    for id in to {
        sql.push_str(&format!(
            "UPDATE bank.accounts SET balance = balance + {amount} WHERE id = {id};"
        ));
        total += amount;
    }
    sql.push_str(&format!(
        "UPDATE bank.accounts SET balance = balance - {total} WHERE id = {from}; COMMIT;"
    ));
    sql
}

/// Runs a transaction (`sql` begins and commits it) until it commits: a deadlock with an apply
/// (issue 21) aborts it, and a user tries again, as with any deadlock. Returns the retries.
async fn commit(db: &tokio_postgres::Client, sql: &str) -> u32 {
    let mut retries = 0;
    loop {
        match db.batch_execute(sql).await {
            Ok(()) => return retries,
            Err(e) if e.code() == Some(&tokio_postgres::error::SqlState::T_R_DEADLOCK_DETECTED) => {
                db.batch_execute("ROLLBACK").await.expect("a rollback");
                retries += 1;
            }
            Err(e) => panic!("a transaction failed: {e}"),
        }
    }
}

/// The lines of the largest order: 20,000 in the short form, `ACCORD_BIG_TX_ROWS` (200000 in
/// the long form the README gives) otherwise.
fn big_order_lines() -> i32 {
    match std::env::var("ACCORD_BIG_TX_ROWS") {
        Ok(rows) => rows.parse().expect("ACCORD_BIG_TX_ROWS: a number of rows"),
        Err(_) => 20_000,
    }
}

/// An order and its `lines` lines, in one transaction.
fn order_sql(id: i64, lines: i32) -> String {
    format!(
        "BEGIN; INSERT INTO bank.orders (id, lines) VALUES ({id}, {lines});
         INSERT INTO bank.order_lines (order_id, n) SELECT {id}, g FROM generate_series(1, {lines}) AS g; COMMIT;"
    )
}

/// Transfers of 2,001 rows, orders of 2,500 lines and one of 20,000 (or more, see
/// `big_order_lines`) on one node, two-row transfers and small orders on the other two, all at
/// once, while a reader on every node checks every snapshot it
/// takes: the balances' sum never changes, no order shows part of its lines. The nodes batch at
/// most 200 changes per message, so every large transaction arrives in many messages, and
/// spool transactions above 1 MB, so the largest are applied from disk in segments.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn readers_never_see_part_of_a_transaction_while_every_node_writes() {
    let cluster = TestCluster::start(3, BANK).await;
    let seed = cluster.client(0).await;
    seed.batch_execute(&format!(
        "INSERT INTO bank.accounts (id, balance) SELECT g, {START_BALANCE} FROM generate_series(1, {ACCOUNTS}) AS g"
    ))
    .await
    .unwrap();
    cluster.converge(TABLES, Duration::from_secs(120)).await;

    let stop = Arc::new(AtomicBool::new(false));
    let mut readers = Vec::new();
    for node in 0..3 {
        let mut db = cluster.client(node).await;
        let stop = Arc::clone(&stop);
        readers.push(tokio::spawn(async move {
            let (mut snapshots, mut wrong) = (0u64, Vec::new());
            while !stop.load(Ordering::Relaxed) {
                snapshots += 1;
                for w in check_snapshot(&mut db).await {
                    if wrong.len() < 2000 {
                        wrong.push(format!("node {} @{snapshots}: {w}", node + 1));
                    }
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            (snapshots, wrong)
        }));
    }

    let mut writers = Vec::new();
    // Node 1: large transfers and large orders.
    let big = cluster.client(0).await;
    writers.push(tokio::spawn(async move {
        for round in 0..4 {
            let from = 1 + round;
            commit(
                &big,
                &transfer_sql(from, (1..=ACCOUNTS).filter(|&a| a != from).take(2_000), 1),
            )
            .await;
            commit(&big, &order_sql(1_000 + i64::from(round), 2_500)).await;
        }
        // And one larger order.
        commit(&big, &order_sql(2_000, big_order_lines())).await;
    }));
    // Nodes 2 and 3: two-row transfers over the same accounts and small orders, concurrently.
    for node in 1..3 {
        let db = cluster.client(node).await;
        writers.push(tokio::spawn(async move {
            for i in 0..300i32 {
                let from = 1 + (i * 7 + node as i32 * 13) % ACCOUNTS;
                let to = 1 + (i * 11 + node as i32 * 5) % ACCOUNTS;
                if from != to {
                    commit(&db, &transfer_sql(from, std::iter::once(to), 3)).await;
                }
                if i % 10 == 0 {
                    let id = node as i64 * 100_000 + i64::from(i);
                    commit(&db, &order_sql(id, 40)).await;
                }
            }
        }));
    }
    for w in writers {
        w.await.expect("a writer");
    }
    let snapshots = cluster.converge(TABLES, Duration::from_secs(180)).await;
    stop.store(true, Ordering::Relaxed);
    let mut wrong = Vec::new();
    for (node, reader) in readers.into_iter().enumerate() {
        let (taken, found) = reader.await.expect("a reader");
        assert!(taken >= 20, "node {}: the reader took only {taken} snapshots", node + 1);
        eprintln!("node {}: {taken} snapshots checked", node + 1);
        wrong.extend(found);
    }
    assert!(
        wrong.is_empty(),
        "readers saw parts of transactions:\n{}",
        wrong.join("\n")
    );
    let db = cluster.client(0).await;
    let orders: i64 = db
        .query_one("SELECT count(*) FROM bank.orders", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(orders, 4 + 1 + 2 * 30, "every order arrived\n{}", snapshots[1]);
    // The test cluster spools transactions above 1 MB: the large ones came through the spool.
    for (node, status) in cluster.statuses().iter().enumerate().skip(1) {
        let from_one = &status.peers[&support::nodes::id(0)];
        assert!(
            from_one.spooled_transactions >= 1,
            "node {}: no transaction of node 1 was spooled: {from_one:?}",
            node + 1
        );
        eprintln!(
            "node {}: {} transactions of node 1 spooled ({} bytes)",
            node + 1,
            from_one.spooled_transactions,
            from_one.spooled_bytes
        );
    }
    for node in 1..3 {
        let mut db = cluster.client(node).await;
        assert!(check_snapshot(&mut db).await.is_empty());
    }
    cluster.stop_all().await;
}

/// A local transaction that locks two rows in the order opposite to an apply's deadlocks with
/// it; when PostgreSQL picks the apply as the victim, the applier rolls back and tries the batch
/// again on the same session (no reconnect, no error), and counts it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_apply_chosen_as_a_deadlocks_victim_is_tried_again_and_counted() {
    let cluster = TestCluster::start(2, BANK).await;
    let one = cluster.client(0).await;
    one.batch_execute("INSERT INTO bank.accounts (id, balance) VALUES (1, 100), (2, 100)")
        .await
        .unwrap();
    cluster.converge(TABLES, Duration::from_secs(60)).await;

    // Node 2's user holds row 2, with a long deadlock_timeout: the apply's deadlock check,
    // which runs a second after it starts waiting, is the one that finds the cycle.
    let user = cluster.client(1).await;
    user.batch_execute(
        "SET deadlock_timeout = '20s'; BEGIN; UPDATE bank.accounts SET balance = balance + 1 WHERE id = 2",
    )
    .await
    .unwrap();
    // Node 1 moves both rows in one transaction: node 2's apply locks row 1, then waits for row 2.
    one.batch_execute(
        "BEGIN; UPDATE bank.accounts SET balance = balance + 1 WHERE id = 1;
         UPDATE bank.accounts SET balance = balance + 1 WHERE id = 2; COMMIT",
    )
    .await
    .unwrap();
    let watcher = cluster.client(1).await;
    let started = std::time::Instant::now();
    loop {
        let waiting: i64 = watcher
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND datname = current_database()",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        if waiting > 0 {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "node 2's apply never waited for the user's row"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // Now the user wants row 1, which the apply holds: a cycle.
    user.batch_execute("UPDATE bank.accounts SET balance = balance + 1 WHERE id = 1; COMMIT")
        .await
        .expect("the user's transaction goes through: the apply was the victim");

    let snapshots = cluster.converge(TABLES, Duration::from_secs(60)).await;
    let deadlocks = cluster.statuses()[1].peers[&support::nodes::id(0)].apply_deadlocks;
    assert!(deadlocks >= 1, "no deadlock counted\n{}", snapshots[1]);
    let db = cluster.client(0).await;
    let balances: Vec<i64> = db
        .query("SELECT balance FROM bank.accounts ORDER BY id", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(balances, [102, 102], "both transactions counted once on every node");
    cluster.stop_all().await;
}
