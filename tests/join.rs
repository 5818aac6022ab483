//! `accord join` on the rows that make a copy hard: a row whose last local write the donor's
//! capture has not accounted for yet when the join reads it, and a row written in a
//! subtransaction (its xmin is an xid decoding never reports, so it never equals its metadata's).
//! The first must not be copied as it is (its metadata does not count that write yet, which the
//! donor sends later: counted twice); the second must be copied (its change was sent before the
//! join's positions: never sent again). Two `accord run` nodes, a third joining from node 1, real
//! processes and databases. The load under which nodes join is in `reliability.rs`.

mod support;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use support::cli::accord;
use support::nodes::{free_udp_port, snapshot, SHOP};
use support::pg::PgCluster;
use support::service::{write_node, RunningNode};

const TABLES: &[&str] = &["shop.products", "shop.users"];

async fn stock(db: &tokio_postgres::Client, id: i64) -> Option<i64> {
    db.query_opt("SELECT stock FROM shop.products WHERE id = $1", &[&id])
        .await
        .unwrap()
        .map(|r| r.get(0))
}

async fn wait_for_stock(db: &tokio_postgres::Client, id: i64, want: i64, what: &str) {
    let started = Instant::now();
    while stock(db, id).await != Some(want) {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "{what}: stock of {id} is {:?}, not {want}",
            stock(db, id).await
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_join_copies_rows_only_as_their_metadata_describes_them() {
    let pgs = tokio::task::spawn_blocking(|| PgCluster::start_many(3)).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (ok, out) = accord(&["certs", "init", "--out", dir.path().join("ca").to_str().unwrap()]);
    assert!(ok, "{out}");
    let quic: Vec<(u32, u16)> = (1..=3).map(|id| (id, free_udp_port())).collect();
    let mut dbs = Vec::new();
    let mut files = Vec::new();
    for (i, pg) in pgs.iter().enumerate() {
        let id = i as u32 + 1;
        let db = pg.create_database("shop").await;
        db.batch_execute(SHOP).await.unwrap();
        let dsn = pg.dsn("shop");
        if id < 3 {
            let (ok, out) = accord(&["init", "--dsn", &dsn, "--node-id", &id.to_string()]);
            assert!(ok, "{out}");
        }
        files.push(write_node(dir.path(), id, &dsn, &quic, ""));
        dbs.push(db);
    }
    let mut node1 = RunningNode::start(&files[0].config, &[]);
    let node2 = RunningNode::start(&files[1].config, &[]);

    // Row 1: an ordinary row. Row 2: written in a subtransaction, as PL/pgSQL's EXCEPTION blocks
    // and SAVEPOINTs do.
    dbs[0]
        .batch_execute(
            "INSERT INTO shop.products (id, name, stock) VALUES (1, 'plain', 10);
             BEGIN;
             SAVEPOINT s;
             INSERT INTO shop.products (id, name, stock) VALUES (2, 'in a subtransaction', 20);
             RELEASE SAVEPOINT s;
             COMMIT;",
        )
        .await
        .unwrap();
    wait_for_stock(&dbs[1], 2, 20, "row 2 reaches node 2").await;
    wait_for_stock(&dbs[1], 1, 10, "row 1 reaches node 2").await;

    // With node 1's accord stopped, a write its capture has not seen when the join reads row 1.
    let (stopped, log) = node1.terminate();
    assert!(stopped, "{log}");
    dbs[0]
        .batch_execute("UPDATE shop.products SET stock = stock + 5 WHERE id = 1")
        .await
        .unwrap();
    let donor_dsn = pgs[0].dsn("shop");
    let config = files[2].config.to_str().unwrap().to_owned();
    let joiner = Command::new(env!("CARGO_BIN_EXE_accord"))
        .args(["join", "--config", &config, "--donor-dsn", &donor_dsn])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // The join waits for node 1's capture; it catches up once node 1 runs again.
    tokio::time::sleep(Duration::from_secs(2)).await;
    node1 = RunningNode::start(&files[0].config, &[]);
    let out = tokio::task::spawn_blocking(move || joiner.wait_with_output())
        .await
        .unwrap()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "accord join: {text}");
    assert!(text.contains("node 3 joined from node 1"), "{text}");

    let node3 = RunningNode::start(&files[2].config, &[]);
    // Writes on every node after the join, the new one included.
    for (i, db) in dbs.iter().enumerate() {
        db.execute("UPDATE shop.products SET stock = stock + 1 WHERE id = 1", &[])
            .await
            .unwrap();
        db.execute(
            "INSERT INTO shop.users (id, email) VALUES ($1, $2)",
            &[&(i as i32 + 1), &format!("u{i}@example.com")],
        )
        .await
        .unwrap();
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
        if started.elapsed() > Duration::from_secs(90) {
            let logs: Vec<String> = [node1, node2, node3].into_iter().map(|n| n.terminate().1).collect();
            panic!(
                "the three nodes did not converge:\n{}\n{}\n{}\nlogs:\n{}",
                snaps[0],
                snaps[1],
                snaps[2],
                logs.join("\n----\n")
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    for (i, db) in dbs.iter().enumerate() {
        assert_eq!(
            stock(db, 1).await,
            Some(18),
            "node {}: 10 + 5 + three increments",
            i + 1
        );
        assert_eq!(stock(db, 2).await, Some(20), "node {}: the subtransaction's row", i + 1);
    }
    for node in [node1, node2, node3] {
        let (ok, log) = node.terminate();
        assert!(ok, "{log}");
    }
}

/// Two servers and a cluster CA; on the first, node 1's database with the test schema, `rows`
/// written, `accord init`ed (its `accord run` not started: a donor with no other member).
struct Donor {
    pgs: Vec<PgCluster>,
    dir: tempfile::TempDir,
    quic: Vec<(u32, u16)>,
    donor: tokio_postgres::Client,
}

impl Donor {
    async fn start(rows: &str) -> Donor {
        let pgs = tokio::task::spawn_blocking(|| PgCluster::start_many(2)).await.unwrap();
        let dir = tempfile::tempdir().unwrap();
        let (ok, out) = accord(&["certs", "init", "--out", dir.path().join("ca").to_str().unwrap()]);
        assert!(ok, "{out}");
        let quic: Vec<(u32, u16)> = (1..=2).map(|id| (id, free_udp_port())).collect();
        let donor = pgs[0].create_database("shop").await;
        donor.batch_execute(SHOP).await.unwrap();
        donor.batch_execute(rows).await.unwrap();
        let (ok, out) = accord(&["init", "--dsn", &pgs[0].dsn("shop"), "--node-id", "1"]);
        assert!(ok, "{out}");
        Donor { pgs, dir, quic, donor }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn join_refuses_what_it_cannot_join() {
    let Donor { pgs, dir, quic, .. } = Donor::start("").await;
    let donor_dsn = pgs[0].dsn("shop");

    let new = pgs[1].create_database("shop").await;
    let files = write_node(dir.path(), 2, &pgs[1].dsn("shop"), &quic, "");
    let config = files.config.to_str().unwrap().to_owned();
    let join = || accord(&["join", "--config", &config, "--donor-dsn", &donor_dsn]);

    // A table of the cluster's there, but not annotated: not copied over, refused.
    new.batch_execute("CREATE SCHEMA shop; CREATE TABLE shop.users (id bigint PRIMARY KEY)")
        .await
        .unwrap();
    let (ok, out) = join();
    assert!(
        !ok && out.contains("no table of the new node's database is marked"),
        "{out}"
    );
    new.batch_execute("DROP SCHEMA shop CASCADE").await.unwrap();
    new.batch_execute(&SHOP.replace("'@accord delta'", "'@accord lww'"))
        .await
        .unwrap();
    let (ok, out) = join();
    assert!(!ok && out.contains("differ from the donor's"), "{out}");
    new.batch_execute("DROP SCHEMA shop CASCADE").await.unwrap();
    new.batch_execute(SHOP).await.unwrap();
    new.batch_execute("INSERT INTO shop.users (id, email) VALUES (1, 'there@example.com')")
        .await
        .unwrap();
    let (ok, out) = join();
    assert!(!ok && out.contains("shop.users already has rows"), "{out}");
    new.batch_execute("DELETE FROM shop.users").await.unwrap();
    let (ok, out) = accord(&["join", "--config", &config, "--donor-dsn", &pgs[1].dsn("shop")]);
    assert!(!ok && out.contains("not an accord node"), "{out}");
    let (ok, out) = join();
    assert!(ok, "{out}");
    let (ok, out) = join();
    assert!(!ok && out.contains("already joined the cluster from node 1"), "{out}");
}

/// A new node's database with none of the cluster's tables: `accord join` creates them from the
/// donor's definitions (pg_dump's, without accord's own triggers), then copies the rows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_join_into_an_empty_database_copies_the_schema() {
    let Donor { pgs, dir, quic, donor } = Donor::start(
        "INSERT INTO shop.products (id, name, stock) SELECT g, 'p' || g, g FROM generate_series(1, 50) g;
         INSERT INTO shop.users (id, email) VALUES (1, 'one@example.com');",
    )
    .await;
    let donor_dsn = pgs[0].dsn("shop");
    // A database with none of the cluster's tables gets them from the donor, annotations and
    // all, then the rows.
    let fresh = pgs[1].create_database("fresh").await;
    let files = write_node(dir.path(), 2, &pgs[1].dsn("fresh"), &quic, "");
    let (ok, out) = accord(&[
        "join",
        "--config",
        files.config.to_str().unwrap(),
        "--donor-dsn",
        &donor_dsn,
    ]);
    assert!(ok, "a join into an empty database: {out}");
    assert_eq!(snapshot(&fresh, TABLES).await, snapshot(&donor, TABLES).await);
    let (ok, out) = accord(&["check", "--dsn", &pgs[1].dsn("fresh")]);
    assert!(ok, "the copied schema passes accord check: {out}");
    let fingerprint = |db: &'static str| {
        let pg = &pgs[if db == "shop" { 0 } else { 1 }];
        let dsn = pg.dsn(db);
        async move {
            tokio_postgres::connect(&dsn, tokio_postgres::NoTls)
                .await
                .map(|(client, conn)| {
                    tokio::spawn(conn);
                    client
                })
                .unwrap()
                .query_one("SELECT fingerprint FROM accord.node", &[])
                .await
                .unwrap()
                .get::<_, String>(0)
        }
    };
    assert_eq!(fingerprint("fresh").await, fingerprint("shop").await);
}
