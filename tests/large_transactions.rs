//! A source transaction larger than the receiver's memory bound: two `accord run` nodes with
//! `spool_mb = 8`; node 1 inserts 200,000 rows in one transaction (`ACCORD_HUGE_TX_ROWS`, e.g.
//! 2000000 in the long form the README gives) while node 2's users insert rows of their own;
//! node 2 is killed (SIGKILL) while it spools the transaction and started again. A reader on node
//! 2 checks every snapshot it takes: none of the transaction's rows, or all of them. In the end
//! both nodes hold the same rows with exact sums, and the receiver's peak memory is printed and
//! checked against a bound that does not grow with the transaction.

mod support;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use support::cli::accord;
use support::nodes::free_udp_port;
use support::pg::PgCluster;
use support::service::{http_get, memory_kib, wait_until, write_node, RunningNode};

const SCHEMA: &str = "
CREATE SCHEMA big;
CREATE TABLE big.rows (id bigint PRIMARY KEY, body text NOT NULL, amount bigint NOT NULL);
COMMENT ON TABLE big.rows IS '@accord replicate';
COMMENT ON COLUMN big.rows.amount IS '@accord delta';
";

/// The receiver's peak resident memory may not exceed this, whatever the transaction's size.
const PEAK_RSS_BOUND_MIB: u64 = 400;

fn rows() -> i64 {
    match std::env::var("ACCORD_HUGE_TX_ROWS") {
        Ok(rows) => rows.parse().expect("ACCORD_HUGE_TX_ROWS: a number of rows"),
        Err(_) => 200_000,
    }
}

/// What node 2 says of node 1's transaction still arriving: bytes spooled so far.
async fn spooled_in_flight(metrics: u16) -> u64 {
    let Some(response) = http_get(metrics, "/status").await else {
        return 0;
    };
    let Some(body) = response.split("\r\n\r\n").nth(1) else {
        return 0;
    };
    let status: serde_json::Value = serde_json::from_str(body).unwrap_or_default();
    status["peers"]["1"]["in_flight_spooled_bytes"].as_u64().unwrap_or(0)
}

/// Count and sum of the rows of node 1's transaction, and of the rest.
const FIGURES: &str = "SELECT count(*) FILTER (WHERE id <= $1)::bigint, coalesce(sum(amount) FILTER (WHERE id <= $1), 0)::bigint,
                              count(*) FILTER (WHERE id > $1)::bigint, coalesce(sum(amount) FILTER (WHERE id > $1), 0)::bigint
                         FROM big.rows";

async fn figures(db: &tokio_postgres::Client, rows: i64) -> [i64; 4] {
    let r = db.query_one(FIGURES, &[&rows]).await.unwrap();
    [r.get(0), r.get(1), r.get(2), r.get(3)]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transaction_larger_than_memory_is_spooled_survives_a_crash_of_the_receiver_and_arrives_whole() {
    let rows = rows();
    let pgs = tokio::task::spawn_blocking(|| PgCluster::start_many(2)).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (ok, out) = accord(&["certs", "init", "--out", dir.path().join("ca").to_str().unwrap()]);
    assert!(ok, "{out}");
    let quic: Vec<(u32, u16)> = (1..=2).map(|id| (id, free_udp_port())).collect();
    let mut files = Vec::new();
    let mut dbs = Vec::new();
    for (i, pg) in pgs.iter().enumerate() {
        let db = pg.create_database("big").await;
        db.batch_execute(SCHEMA).await.unwrap();
        let dsn = pg.dsn("big");
        let (ok, out) = accord(&["init", "--dsn", &dsn, "--node-id", &(i + 1).to_string()]);
        assert!(ok, "{out}");
        files.push(write_node(
            dir.path(),
            i as u32 + 1,
            &dsn,
            &quic,
            "[replication]\nspool_mb = 8\n",
        ));
        dbs.push(db);
    }
    let sender = RunningNode::start(&files[0].config, &[]);
    let mut receiver = RunningNode::start(&files[1].config, &[]);

    // A reader on node 2: in every snapshot, none of node 1's transaction or all of it.
    let stop = Arc::new(AtomicBool::new(false));
    let reader = {
        let db = pgs[1].connect("big").await;
        let stop = Arc::clone(&stop);
        tokio::spawn(async move {
            let (mut snapshots, mut partial) = (0u64, Vec::new());
            while !stop.load(Ordering::Relaxed) {
                let seen = one_count(&db, rows).await;
                snapshots += 1;
                if seen != 0 && seen != rows && partial.len() < 20 {
                    partial.push(seen);
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            (snapshots, partial)
        })
    };
    // Node 2's users insert rows of their own all along.
    let writer = {
        let db = pgs[1].connect("big").await;
        let stop = Arc::clone(&stop);
        tokio::spawn(async move {
            let mut written = 0i64;
            while !stop.load(Ordering::Relaxed) {
                written += 1;
                db.execute("INSERT INTO big.rows VALUES ($1, 'local', 3)", &[&(rows + written)])
                    .await
                    .expect("a local insert on node 2");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            written
        })
    };

    let inserted = Instant::now();
    dbs[0]
        .batch_execute(&format!(
            "INSERT INTO big.rows SELECT g, repeat(md5(g::text), 4), 2 FROM generate_series(1, {rows}) g"
        ))
        .await
        .unwrap();
    eprintln!(
        "node 1 committed {rows} rows in one transaction in {:.1} s",
        inserted.elapsed().as_secs_f64()
    );

    // Node 2 crashes while it spools the transaction, and comes back.
    let metrics = files[1].metrics;
    // Generous limits, in proportion to the transaction: its capture on node 1 comes first.
    let per_row = |base: u64, rows_per_sec: u64| Duration::from_secs(base + rows as u64 / rows_per_sec);
    wait_until("node 2 spools node 1's transaction", per_row(120, 1_000), || async {
        spooled_in_flight(metrics).await > 0
    })
    .await;
    let logs = receiver.kill9();
    assert!(logs.contains("spooling a large transaction"), "{logs}");
    assert_eq!(
        one_count(&dbs[1], rows).await,
        0,
        "nothing of the transaction was applied before the crash"
    );
    receiver = RunningNode::start(&files[1].config, &[]);
    let peak_pid = receiver.pid();

    wait_until("the transaction reaches node 2", per_row(300, 250), || async {
        one_count(&dbs[1], rows).await == rows
    })
    .await;
    eprintln!(
        "the transaction arrived on node 2 {:.1} s after its commit",
        inserted.elapsed().as_secs_f64()
    );
    stop.store(true, Ordering::Relaxed);
    let written = writer.await.expect("the writer");
    let (snapshots, partial) = reader.await.expect("the reader");
    assert!(
        partial.is_empty(),
        "node 2's reader saw part of the transaction: {partial:?} of {rows} rows"
    );
    assert!(snapshots >= 20, "the reader took only {snapshots} snapshots");
    let expected = [rows, 2 * rows, written, 3 * written];
    wait_until("both nodes hold the same rows", Duration::from_secs(300), || async {
        figures(&dbs[0], rows).await == expected && figures(&dbs[1], rows).await == expected
    })
    .await;
    let same = "SELECT md5(string_agg(id || ':' || body || ':' || amount, ',' ORDER BY id)) FROM big.rows";
    let first: String = dbs[0].query_one(same, &[]).await.unwrap().get(0);
    let second: String = dbs[1].query_one(same, &[]).await.unwrap().get(0);
    assert_eq!(first, second, "the nodes' rows differ");

    let peak_mib = memory_kib(peak_pid, "VmHWM").expect("the receiver's memory") / 1024;
    let sender_mib = memory_kib(sender.pid(), "VmHWM").expect("the sender's memory") / 1024;
    eprintln!(
        "a {rows}-row transaction: the receiver's peak RSS {peak_mib} MiB (bound {PEAK_RSS_BOUND_MIB} MiB, spool_mb = 8); \
         the sender's {sender_mib} MiB; {snapshots} snapshots checked on node 2, {written} local inserts there"
    );
    assert!(
        peak_mib <= PEAK_RSS_BOUND_MIB,
        "the receiver's peak RSS {peak_mib} MiB is above {PEAK_RSS_BOUND_MIB} MiB"
    );
    for node in [sender, receiver] {
        let (ok, logs) = node.terminate();
        assert!(ok, "{logs}");
        assert!(!logs.contains("ERROR"), "{logs}");
        eprintln!("a node logged {} lines", logs.lines().count());
    }
}

/// Rows of node 1's transaction visible on `db` now.
async fn one_count(db: &tokio_postgres::Client, rows: i64) -> i64 {
    db.query_one("SELECT count(*) FROM big.rows WHERE id <= $1", &[&rows])
        .await
        .unwrap()
        .get(0)
}
