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

const BOOKINGS: &str = "
CREATE SCHEMA shop;
CREATE TABLE shop.bookings (id bigint PRIMARY KEY, guest text NOT NULL, nights integer NOT NULL DEFAULT 0);
COMMENT ON TABLE shop.bookings IS '@accord replicate inserts=review';
COMMENT ON COLUMN shop.bookings.nights IS '@accord delta';
";
const BOOKING_KEYS: i64 = 40;

/// What a writer saw acknowledged: its inserts (key, guest, nights) and its updates (key, added).
#[derive(Default)]
struct Acknowledged {
    inserts: Vec<(i64, String, i32)>,
    updates: Vec<(i64, i32)>,
}

/// Issue 19's review mode: keys the application makes itself, the same keys inserted on three
/// nodes at once (each node's guest, each writer then adding nights to whatever row its node
/// holds), node 2's `accord run` killed and restarted in the middle. Every insert that was
/// acknowledged is either the row or an open displaced-insert item of its key, nothing merged:
/// per key, the guests are exactly the acknowledged ones and the nights add up exactly; the nodes
/// hold identical rows and items. Then two items are resolved, one each way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inserts_of_one_key_on_three_nodes_go_to_review_whole() {
    let pgs = tokio::task::spawn_blocking(|| PgCluster::start_many(3)).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (files, dbs) = support::service::init_cluster(&pgs, dir.path(), BOOKINGS).await;
    let (ok, out) = accord(&["check", "--dsn", &pgs[0].dsn("shop")]);
    assert!(ok && out.contains("shop.bookings  (inserts=review"), "{out}");
    let mut nodes: Vec<RunningNode> = files.iter().map(|f| RunningNode::start(&f.config, &[])).collect();

    let writers: Vec<_> = (0..3)
        .map(|i| {
            let dsn = pgs[i].dsn("shop");
            tokio::spawn(async move {
                let mut seen = Acknowledged::default();
                let mut db: Option<tokio_postgres::Client> = None;
                for round in 0..2 {
                    for key in 1..=BOOKING_KEYS {
                        // Paced, so that node 2's crash falls among the writes.
                        tokio::time::sleep(Duration::from_millis(10)).await;
                        if db.as_ref().is_none_or(|d| d.is_closed()) {
                            db = accord::pg_connection::connect(&dsn).await.ok();
                        }
                        let Some(client) = db.as_ref() else { continue };
                        if round == 0 {
                            let guest = format!("node{}-{key}", i + 1);
                            let nights = i as i32 + 1;
                            let inserted = client
                                .execute(
                                    "INSERT INTO shop.bookings (id, guest, nights) VALUES ($1, $2, $3)",
                                    &[&key, &guest, &nights],
                                )
                                .await;
                            if inserted.is_ok() {
                                seen.inserts.push((key, guest, nights));
                            }
                        } else {
                            let added = 10 * (i as i32 + 1);
                            let updated = client
                                .execute(
                                    "UPDATE shop.bookings SET nights = nights + $2 WHERE id = $1",
                                    &[&key, &added],
                                )
                                .await;
                            if matches!(updated, Ok(1)) {
                                seen.updates.push((key, added));
                            }
                        }
                    }
                }
                seen
            })
        })
        .collect();
    // Node 2's accord run crashes in the middle and is started again.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let _ = nodes.remove(1).kill9();
    tokio::time::sleep(Duration::from_millis(500)).await;
    nodes.insert(1, RunningNode::start(&files[1].config, &[]));
    let mut acknowledged = Vec::new();
    for writer in writers {
        acknowledged.push(writer.await.unwrap());
    }

    let tables = &["shop.bookings"];
    let started = Instant::now();
    loop {
        let snaps = [
            snapshot(&dbs[0], tables).await,
            snapshot(&dbs[1], tables).await,
            snapshot(&dbs[2], tables).await,
        ];
        let settled = dbs[0]
            .query_one("SELECT count(*) FROM shop.bookings", &[])
            .await
            .unwrap()
            .get::<_, i64>(0)
            == BOOKING_KEYS;
        if settled && snaps[0] == snaps[1] && snaps[1] == snaps[2] {
            break;
        }
        if started.elapsed() > Duration::from_secs(120) {
            let logs: Vec<String> = nodes.drain(..).map(|n| n.terminate().1).collect();
            panic!(
                "the nodes did not converge:\n{}\n{}",
                snaps.join("\n"),
                logs.join("\n----\n")
            );
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }

    // Per key: every acknowledged insert is the row or a displaced insert, and nights add up.
    let mut expected_guests: BTreeMap<i64, Vec<String>> = BTreeMap::new();
    let mut expected_nights: BTreeMap<i64, i64> = BTreeMap::new();
    for seen in &acknowledged {
        for (key, guest, nights) in &seen.inserts {
            expected_guests.entry(*key).or_default().push(guest.clone());
            *expected_nights.entry(*key).or_default() += i64::from(*nights);
        }
        for (key, added) in &seen.updates {
            *expected_nights.entry(*key).or_default() += i64::from(*added);
        }
    }
    let items = accord::node::review::list(&dbs[0], Some("open")).await.unwrap();
    let mut found_guests: BTreeMap<i64, Vec<String>> = BTreeMap::new();
    let mut found_nights: BTreeMap<i64, i64> = BTreeMap::new();
    for row in dbs[0]
        .query("SELECT id, guest, nights FROM shop.bookings", &[])
        .await
        .unwrap()
    {
        found_guests.entry(row.get(0)).or_default().push(row.get(1));
        *found_nights.entry(row.get(0)).or_default() += i64::from(row.get::<_, i32>(2));
    }
    let mut displaced_items = Vec::new();
    for entry in &items {
        let accord_engine::ReviewKind::DisplacedInsert { values, .. } = &entry.item.kind else {
            panic!("only displaced inserts are expected in the queue: {:?}", entry.item);
        };
        let key = match entry.item.key.0.as_slice() {
            [accord_engine::Value::Int(k)] => *k,
            other => panic!("a bigint key: {other:?}"),
        };
        let value = |name: &str| {
            values
                .iter()
                .find(|(n, _)| n == name)
                .and_then(|(_, v)| v.clone())
                .unwrap_or_else(|| panic!("item {} holds {name}: {values:?}", entry.id))
        };
        let accord_engine::Value::Text(guest) = value("guest") else {
            panic!("a text guest")
        };
        let accord_engine::Value::Int(nights) = value("nights") else {
            panic!("an integer nights")
        };
        found_guests.entry(key).or_default().push(guest);
        *found_nights.entry(key).or_default() += nights;
        displaced_items.push((key, entry.id));
    }
    for guests in expected_guests.values_mut().chain(found_guests.values_mut()) {
        guests.sort();
    }
    assert_eq!(
        found_guests, expected_guests,
        "every acknowledged insert is kept once, nothing merged"
    );
    assert_eq!(
        found_nights, expected_nights,
        "the nights of every lineage add up exactly"
    );
    assert!(
        displaced_items.len() >= 10,
        "inserts on three nodes at once displaced some: {} items",
        displaced_items.len()
    );
    eprintln!(
        "[review_inserts] {} inserts and {} updates acknowledged; {} displaced inserts in review",
        acknowledged.iter().map(|a| a.inserts.len()).sum::<usize>(),
        acknowledged.iter().map(|a| a.updates.len()).sum::<usize>(),
        displaced_items.len()
    );
    let (ok, out) = accord(&["review", "list", "--dsn", &pgs[1].dsn("shop")]);
    assert!(ok && out.contains("displaced by an earlier one"), "{out}");

    // Two resolutions, one each way, on two nodes.
    let (take_key, take_id) = displaced_items[0];
    let (keep_key, keep_id) = *displaced_items
        .iter()
        .find(|(k, _)| *k != take_key)
        .expect("items of two keys");
    let take_guest = items
        .iter()
        .find(|e| e.id == take_id)
        .and_then(|e| match &e.item.kind {
            accord_engine::ReviewKind::DisplacedInsert { values, .. } => {
                values.iter().find(|(n, _)| n == "guest").and_then(|(_, v)| v.clone())
            }
            _ => None,
        })
        .expect("the item holds a guest");
    let (ok, out) = accord(&["review", "show", &take_id.to_string(), "--dsn", &pgs[0].dsn("shop")]);
    assert!(ok && out.contains("--pick 2"), "{out}");
    let (ok, out) = accord(&[
        "review",
        "resolve",
        &take_id.to_string(),
        "--pick",
        "2",
        "--dsn",
        &pgs[0].dsn("shop"),
    ]);
    assert!(ok, "{out}");
    let (ok, out) = accord(&[
        "review",
        "resolve",
        &keep_id.to_string(),
        "--value",
        "x",
        "--dsn",
        &pgs[2].dsn("shop"),
    ]);
    assert!(
        !ok && out.contains("pick 1 keeps"),
        "a value is no answer to a displaced insert: {out}"
    );
    let (ok, out) = accord(&[
        "review",
        "resolve",
        &keep_id.to_string(),
        "--pick",
        "1",
        "--dsn",
        &pgs[2].dsn("shop"),
    ]);
    assert!(ok, "{out}");
    let keep_row_before = snapshot(&dbs[0], tables).await;
    let started = Instant::now();
    loop {
        let mut done = true;
        for db in &dbs {
            let closed: i64 = db
                .query_one(
                    "SELECT count(*) FROM accord.review_items WHERE id IN ($1, $2) AND status = 'resolved'",
                    &[&take_id.to_string(), &keep_id.to_string()],
                )
                .await
                .unwrap()
                .get(0);
            let guest: String = db
                .query_one("SELECT guest FROM shop.bookings WHERE id = $1", &[&take_key])
                .await
                .unwrap()
                .get(0);
            done &= closed == 2 && accord_engine::Value::Text(guest) == take_guest;
        }
        let snaps = [
            snapshot(&dbs[0], tables).await,
            snapshot(&dbs[1], tables).await,
            snapshot(&dbs[2], tables).await,
        ];
        if done && snaps[0] == snaps[1] && snaps[1] == snaps[2] {
            break;
        }
        if started.elapsed() > Duration::from_secs(60) {
            let logs: Vec<String> = nodes.drain(..).map(|n| n.terminate().1).collect();
            panic!(
                "the resolutions did not reach every node:\n{}\n{}",
                snaps.join("\n"),
                logs.join("\n----\n")
            );
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let keep_guest = |snap: &str| {
        snap.lines()
            .find(|l| l.starts_with(&format!("  ({keep_key},")))
            .map(str::to_owned)
    };
    assert_eq!(
        keep_guest(&snapshot(&dbs[1], tables).await),
        keep_guest(&keep_row_before),
        "keeping the row leaves it as it was"
    );
    for node in nodes {
        let (ok, logs) = node.terminate();
        assert!(ok, "{logs}");
    }
}
