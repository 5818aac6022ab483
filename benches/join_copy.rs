//! How fast `accord join` copies a donor's rows, beside `pg_dump --data-only | psql` of the same
//! tables (the test schema, `tests/support/nodes.rs`) between the same two servers, in the same
//! run (issue 16: at least as fast).
//!
//! `cargo bench --bench join_copy` (ACCORD_JOIN_BENCH_ROWS sets the table's rows, default 200,000;
//! ACCORD_JOIN_BENCH_ROUNDS the alternated rounds, default 2; ACCORD_JOIN_BENCH_CHUNK the join's
//! `--chunk-rows`). The join copies the rows and
//! accord's metadata of each (versions, delta ledgers, review registers); `pg_dump` copies only
//! the rows. Each round fills a new database on the second server, first with one, then the
//! other; the machine is noisy, so the figures are per round and as a ratio. A third copy,
//! `pg_dump | psql` of the rows *and* `accord.row_meta` into an `accord init`ed database, moves
//! what the join moves (with no judgement and no join of the two): the fair baseline, and the
//! first ratio printed.

#[path = "../tests/support/mod.rs"]
mod support;

use std::process::{Command, Stdio};
use std::time::Instant;

use accord::node::init;
use accord::node::join::{join, JoinRequest, DEFAULT_CHUNK_ROWS};
use accord::scratch_pg::{run_as, PgCluster};
use accord_engine::NodeId;
use support::env::env_u64;
use support::nodes::SHOP as SCHEMA;

/// `pg_dump --data-only` of `tables` piped into `psql`; returns the seconds it took.
fn dump_and_restore(donor: &PgCluster, target: &PgCluster, dbname: &str, tables: &[&str]) -> f64 {
    let bin = donor.bin_dir();
    let started = Instant::now();
    let mut dump = Command::new(bin.join("pg_dump"));
    dump.arg("--data-only");
    for table in tables {
        dump.args(["--table", table]);
    }
    dump.args(["--dbname", &donor.dsn("shop")]).stdout(Stdio::piped());
    let mut dump = dump.spawn().expect("pg_dump starts");
    let out = dump.stdout.take().expect("piped");
    // As the join's own transactions do: accord's key-lock triggers stand aside.
    let restore = Command::new(bin.join("psql"))
        .env("PGOPTIONS", "-c accord.applying=on")
        .args(["--quiet", "--set", "ON_ERROR_STOP=1", "--dbname", &target.dsn(dbname)])
        .stdin(Stdio::from(out))
        .stdout(Stdio::null())
        .status()
        .expect("psql runs");
    assert!(dump.wait().expect("pg_dump ends").success(), "pg_dump failed");
    assert!(restore.success(), "psql failed");
    started.elapsed().as_secs_f64()
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    if run_as().is_some() {
        eprintln!("(running the servers as the postgres user)");
    }
    let rows = env_u64("ACCORD_JOIN_BENCH_ROWS", 200_000);
    let rounds = env_u64("ACCORD_JOIN_BENCH_ROUNDS", 2);
    let clusters = tokio::task::spawn_blocking(|| PgCluster::start_many(2))
        .await
        .expect("starting servers")
        .unwrap_or_else(|e| panic!("{e:#}"));
    let (donor, target) = (&clusters[0], &clusters[1]);
    let db = donor.create_database("shop").await.expect("donor database");
    db.batch_execute(SCHEMA).await.expect("schema");
    db.batch_execute(&format!(
        "INSERT INTO shop.products (id, name, stock, balance, price)
         SELECT g, 'product ' || g, g % 100, (g % 1000) / 7.0, (g % 500) / 3.0 FROM generate_series(1, {rows}) g"
    ))
    .await
    .expect("rows");
    let mut client = donor.connect("shop").await.expect("donor");
    init::init(&mut client, NodeId(1))
        .await
        .expect("accord init of the donor");
    let bytes: i64 = db
        .query_one("SELECT pg_total_relation_size('shop.products')", &[])
        .await
        .expect("size")
        .get(0);
    println!(
        "join_copy: {rows} rows ({:.1} MB with indexes) from one server to another, {rounds} rounds",
        bytes as f64 / 1e6
    );
    let mut ratios = Vec::new();
    for round in 1..=rounds {
        let plain = format!("plain_{round}");
        target
            .create_database(&plain)
            .await
            .expect("database")
            .batch_execute(SCHEMA)
            .await
            .expect("schema");
        let dump_secs = dump_and_restore(donor, target, &plain, &["shop.products"]);

        let floor = format!("floor_{round}");
        target
            .create_database(&floor)
            .await
            .expect("database")
            .batch_execute(SCHEMA)
            .await
            .expect("schema");
        let mut floor_db = target.connect(&floor).await.expect("floor database");
        init::init(&mut floor_db, NodeId(3))
            .await
            .expect("accord init of the floor database");
        let floor_secs = dump_and_restore(donor, target, &floor, &["shop.products", "accord.row_meta"]);

        let joined = format!("joined_{round}");
        target
            .create_database(&joined)
            .await
            .expect("database")
            .batch_execute(SCHEMA)
            .await
            .expect("schema");
        let request = JoinRequest {
            node: NodeId(2),
            dsn: target.dsn(&joined),
            donor_dsn: donor.dsn("shop"),
            chunk_rows: env_u64("ACCORD_JOIN_BENCH_CHUNK", DEFAULT_CHUNK_ROWS as u64) as usize,
            address: "127.0.0.1:7402".into(),
            members_wait: accord::node::join::DEFAULT_MEMBERS_WAIT,
        };
        let started = Instant::now();
        let done = join(&request, &mut |_| {}).await.expect("accord join");
        let join_secs = started.elapsed().as_secs_f64();
        assert_eq!(done.rows, rows, "every row copied");
        let count: i64 = target
            .connect(&joined)
            .await
            .expect("joined database")
            .query_one("SELECT count(*) FROM shop.products", &[])
            .await
            .expect("count")
            .get(0);
        assert_eq!(count as u64, rows);
        let same_data = floor_secs / join_secs;
        let rows_alone = dump_secs / join_secs;
        ratios.push((same_data, rows_alone));
        println!(
            "round {round}: pg_dump | psql of the rows {:.2} s ({:.0} rows/s); of the rows and accord.row_meta \
             {:.2} s; accord join {:.2} s ({:.0} rows/s, rows and metadata); join speed vs pg_dump | psql of the \
             same data {same_data:.2}x, of the rows alone {rows_alone:.2}x",
            dump_secs,
            rows as f64 / dump_secs,
            floor_secs,
            join_secs,
            rows as f64 / join_secs,
        );
    }
    let n = ratios.len().max(1) as f64;
    let same_data = ratios.iter().map(|r| r.0).sum::<f64>() / n;
    let rows_alone = ratios.iter().map(|r| r.1).sum::<f64>() / n;
    println!(
        "join_copy: accord join at {same_data:.2}x the speed of pg_dump | psql of the same data (rows and \
         accord.row_meta), {rows_alone:.2}x of the rows alone (means of {rounds} rounds)"
    );
}
