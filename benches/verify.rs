//! How fast `accord verify` proves three nodes equal, beside the cheapest whole-table comparison
//! PostgreSQL offers, `SELECT md5(string_agg(t::text, ...))` of the table, run on the three nodes
//! at once in the same run (issue 18: at least as fast).
//!
//! `cargo bench --bench verify` (ACCORD_VERIFY_BENCH_ROWS sets the table's rows, default
//! 1,000,000; ACCORD_VERIFY_BENCH_ROUNDS the alternated rounds, default 2). Three nodes, started in
//! process on three PostgreSQL servers, hold the same rows, recorded by `accord init` (the test
//! schema: delta and review columns, so every row's metadata has ledgers and registers). `accord
//! verify` reads every row and its metadata once on each node (summed per key-hash bucket inside
//! PostgreSQL); the md5 reads the rows only. The figures are rows per second per node (each node
//! reads all of its rows while the others read theirs) and the ratio; the machine is noisy, so
//! each round prints its own.

#[path = "../tests/support/mod.rs"]
mod support;

use std::time::Instant;

use support::env::env_u64;
use support::nodes::{id, TestCluster, SHOP};

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let rows = env_u64("ACCORD_VERIFY_BENCH_ROWS", 1_000_000);
    let rounds = env_u64("ACCORD_VERIFY_BENCH_ROUNDS", 2);
    let schema = format!(
        "{SHOP}
         INSERT INTO shop.products (id, name, stock, balance, price)
           SELECT g, 'product ' || g, g % 100, (g % 1000) / 7.0, (g % 500) / 3.0 FROM generate_series(1, {rows}) g;"
    );
    let started = Instant::now();
    let cluster = TestCluster::start(3, &schema).await;
    println!(
        "verify: {rows} rows on each of 3 nodes (set up and `accord init` in {:.0} s), {rounds} rounds",
        started.elapsed().as_secs_f64()
    );
    let clients = [
        cluster.client(0).await,
        cluster.client(1).await,
        cluster.client(2).await,
    ];
    // Both read tables as autovacuum leaves them in a running database (visibility map set),
    // not as a bulk load just left them.
    for db in &clients {
        db.batch_execute("VACUUM (ANALYZE) shop.products, accord.row_meta")
            .await
            .expect("vacuum the tables");
    }
    let mut ratios = Vec::new();
    for round in 1..=rounds {
        let started = Instant::now();
        let digests = futures_util::future::join_all(clients.iter().map(|db| async move {
            db.query_one(
                "SELECT md5(string_agg(t::text, ',' ORDER BY id)) FROM shop.products AS t",
                &[],
            )
            .await
            .expect("md5 of the table")
            .get::<_, String>(0)
        }))
        .await;
        let md5_secs = started.elapsed().as_secs_f64();
        assert!(digests.windows(2).all(|w| w[0] == w[1]), "the nodes hold the same rows");

        let started = Instant::now();
        let report = cluster.nodes[&id(0)]
            .verify
            .verify(Vec::new())
            .await
            .unwrap_or_else(|e| panic!("verify: {e:#}"));
        let verify_secs = started.elapsed().as_secs_f64();
        assert!(report.is_clean(), "equal nodes verify clean: {report:?}");
        assert_eq!(
            report.tables["shop.products"],
            vec![rows; 3],
            "every row read on every node"
        );

        let (verify_rate, md5_rate) = (rows as f64 / verify_secs, rows as f64 / md5_secs);
        ratios.push(verify_rate / md5_rate);
        println!(
            "round {round}: accord verify {verify_secs:.2} s ({verify_rate:.0} rows/s per node, {} round(s)); \
             md5(string_agg) {md5_secs:.2} s ({md5_rate:.0} rows/s per node); verify/md5 = {:.2}x",
            report.rounds,
            verify_rate / md5_rate
        );
    }
    ratios.sort_by(f64::total_cmp);
    println!(
        "verify: rows/s of accord verify over md5(string_agg), median of {} rounds: {:.2}x (goal: at least 1x)",
        ratios.len(),
        ratios[ratios.len() / 2]
    );
    cluster.stop_all().await;
}
