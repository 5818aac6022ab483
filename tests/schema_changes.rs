//! Issue 17: migrations run on each node in turn while the cluster takes writes. Three `accord
//! run` nodes; every node increments a `delta` column and inserts rows throughout. Six
//! migrations, each run on node 1, then node 2, then node 3, a few seconds apart, each node
//! writing what a migration gives it as soon as it has it while the others do not (their
//! appliers hold its changes until they migrate too):
//! 1. a new `delta` column, incremented by every migrated node;
//! 2. a new `review` column, each node writing its own rows' (no two nodes one row's);
//! 3. a column dropped, written by each node until it drops it; node 3's accord is killed just
//!    before node 3 drops it, and started again after (a crash in the middle of a migration);
//! 4. a new table tagged `@accord replicate`, with rows inserted and incremented;
//! 5. two columns widened (`numeric(10,2)` to `numeric(12,2)`, `integer` to `bigint`), each node
//!    writing values only the wider types hold once it has them;
//! 6. the new table untagged: each node stops writing it, and ignores its peers' changes to it
//!    from then on (their streams go on).
//!
//! No capture stops, nothing waits for review or is kept aside, and the nodes end identical with exact sums;
//! then what the nodes could not follow (renames, a changed policy tag) is refused.

mod support;

use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use support::nodes::snapshot;
use support::pg::PgCluster;
use support::service::{init_cluster, RunningNode};
use tokio::sync::RwLock;

const SCHEMA: &str = "
CREATE SCHEMA shop;
CREATE TABLE shop.items (
    id bigint PRIMARY KEY,
    name text NOT NULL,
    stock bigint NOT NULL DEFAULT 0,
    legacy text,
    price numeric(10,2) NOT NULL DEFAULT 0,
    weight integer NOT NULL DEFAULT 0
);
COMMENT ON TABLE shop.items IS '@accord replicate';
COMMENT ON COLUMN shop.items.stock IS '@accord delta';
";

/// The migrations, in the order every node runs them.
const MIGRATIONS: [&str; 6] = [
    "BEGIN;
     ALTER TABLE shop.items ADD COLUMN sold bigint NOT NULL DEFAULT 0;
     COMMENT ON COLUMN shop.items.sold IS 'Units sold. @accord delta';
     COMMIT;",
    "BEGIN;
     ALTER TABLE shop.items ADD COLUMN note text;
     COMMENT ON COLUMN shop.items.note IS '@accord review';
     ALTER TABLE shop.items ADD COLUMN colour text NOT NULL DEFAULT 'none';
     CREATE INDEX items_colour ON shop.items (colour);
     COMMIT;",
    "ALTER TABLE shop.items DROP COLUMN legacy;",
    "BEGIN;
     CREATE TABLE shop.orders (id bigint PRIMARY KEY, item bigint NOT NULL, qty bigint NOT NULL DEFAULT 0);
     COMMENT ON TABLE shop.orders IS '@accord replicate';
     COMMENT ON COLUMN shop.orders.qty IS '@accord delta';
     COMMIT;",
    "ALTER TABLE shop.items ALTER COLUMN price TYPE numeric(12,2), ALTER COLUMN weight TYPE bigint;",
    "COMMENT ON TABLE shop.orders IS 'Orders, kept on each node alone from now on.';",
];

const ITEMS: &[&str] = &["shop.items"];

async fn same(dbs: &[tokio_postgres::Client], tables: &[&str]) -> bool {
    let first = snapshot(&dbs[0], tables).await;
    snapshot(&dbs[1], tables).await == first && snapshot(&dbs[2], tables).await == first
}

/// Every review item of a node, one line each, for failure messages.
async fn review_items(db: &tokio_postgres::Client) -> Vec<String> {
    let sql = "SELECT format('%s %s %s %s %s %s', table_name, row_key, column_name, kind, status, \
               coalesce(error, candidates::text)) FROM accord.review_items";
    db.query(sql, &[]).await.unwrap().iter().map(|r| r.get(0)).collect()
}

/// What every session of a node does, one line each, for failure messages.
async fn sessions_of(db: &tokio_postgres::Client) -> Vec<String> {
    let sql = "SELECT format('%s %s %s %s/%s %s', pid, application_name, state, wait_event_type, wait_event, \
               left(query, 200)) FROM pg_stat_activity WHERE datname IS NOT NULL OR backend_type = 'walsender'";
    let mut lines: Vec<String> = db.query(sql, &[]).await.unwrap().iter().map(|r| r.get(0)).collect();
    for sql in [
        "SELECT format('orders of node %s: %s', n, c) FROM \
         (SELECT id / 1000000 AS n, count(*) AS c FROM shop.orders GROUP BY 1) AS o ORDER BY n",
        "SELECT format('origin %s at %s', external_id, remote_lsn) FROM pg_replication_origin_status",
        "SELECT format('slot %s confirmed %s, WAL at %s', slot_name, confirmed_flush_lsn, pg_current_wal_lsn()) \
         FROM pg_replication_slots",
        "SELECT format('outbound %s..%s', min(seq), max(seq)) FROM accord.outbound",
        "SELECT format('left %s', table_name) FROM accord.left_tables",
    ] {
        lines.extend(db.query(sql, &[]).await.unwrap().iter().map(|r| r.get::<_, String>(0)));
    }
    lines
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
    notes: AtomicI64,
    legacy: AtomicI64,
    orders: AtomicI64,
    qty: AtomicI64,
    wide: AtomicI64,
}

/// Writes until `stop`, each round according to how many migrations its node has run
/// (`migrated`, held for the round so that no migration runs in the middle of one).
fn spawn_writer(
    pg: &PgCluster,
    node: i64,
    writes: Arc<Writes>,
    migrated: Arc<RwLock<usize>>,
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<()> {
    let dsn = pg.dsn("shop");
    tokio::spawn(async move {
        let (db, conn) = tokio_postgres::connect(&dsn, tokio_postgres::NoTls).await.unwrap();
        tokio::spawn(conn);
        let mut n: i64 = 0;
        while !stop.load(Ordering::SeqCst) {
            let stage = migrated.read().await;
            n += 1;
            let k = n % 50 + 1;
            let own = k % 3 == node - 1;
            db.execute("UPDATE shop.items SET stock = stock + 1 WHERE id = $1", &[&k])
                .await
                .unwrap();
            writes.stock.fetch_add(1, Ordering::SeqCst);
            if *stage >= 1 {
                db.execute("UPDATE shop.items SET sold = sold + 1 WHERE id = $1", &[&k])
                    .await
                    .unwrap();
                writes.sold.fetch_add(1, Ordering::SeqCst);
            }
            if *stage >= 2 && own {
                db.execute(
                    "UPDATE shop.items SET note = $2, colour = $3 WHERE id = $1",
                    &[&k, &format!("n{node}-{n}"), &format!("c{}", n % 7)],
                )
                .await
                .unwrap();
                writes.notes.fetch_add(1, Ordering::SeqCst);
            }
            if own {
                // Only the widened types hold the larger values.
                let (price, weight) = if *stage >= 5 {
                    writes.wide.fetch_add(1, Ordering::SeqCst);
                    (format!("1234567{:02}.{:02}", n % 100, n % 97), 5_000_000_000 + n)
                } else {
                    (format!("{}.{:02}", n % 1000, n % 97), n)
                };
                db.execute(
                    "UPDATE shop.items SET price = $2::text::numeric, weight = $3::bigint WHERE id = $1",
                    &[&k, &price, &weight],
                )
                .await
                .unwrap();
            }
            if *stage < 3 && own {
                db.execute(
                    "UPDATE shop.items SET legacy = $2 WHERE id = $1",
                    &[&k, &format!("l{node}-{n}")],
                )
                .await
                .unwrap();
                writes.legacy.fetch_add(1, Ordering::SeqCst);
            }
            if (4..6).contains(&*stage) {
                let id = node * 1_000_000 + n;
                db.execute("INSERT INTO shop.orders (id, item, qty) VALUES ($1, $2, 1)", &[&id, &k])
                    .await
                    .unwrap();
                writes.orders.fetch_add(1, Ordering::SeqCst);
                writes.qty.fetch_add(1, Ordering::SeqCst);
                // And an earlier order of this node's, again.
                let earlier = node * 1_000_000 + (n / 2).max(1);
                let hit = db
                    .execute("UPDATE shop.orders SET qty = qty + 2 WHERE id = $1", &[&earlier])
                    .await
                    .unwrap();
                writes.qty.fetch_add(2 * hit as i64, Ordering::SeqCst);
            }
            if n % 10 == 0 {
                let id = node * 1_000_000 + n;
                db.execute("INSERT INTO shop.items (id, name, stock) VALUES ($1, 'new', 1)", &[&id])
                    .await
                    .unwrap();
                writes.inserted.fetch_add(1, Ordering::SeqCst);
            }
            drop(stage);
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolling_migration_under_writes_loses_nothing() {
    let pgs = tokio::task::spawn_blocking(|| PgCluster::start_many(3)).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (files, dbs) = init_cluster(&pgs, dir.path(), SCHEMA).await;
    let mut nodes: Vec<RunningNode> = files.iter().map(|f| RunningNode::start(&f.config, &[])).collect();
    let mut crashed_log = String::new();
    dbs[0]
        .batch_execute("INSERT INTO shop.items SELECT g, 'item ' || g, 10 FROM generate_series(1, 200) g")
        .await
        .unwrap();
    let started = Instant::now();
    while !same(&dbs, ITEMS).await {
        if started.elapsed() > Duration::from_secs(60) {
            let logs: Vec<String> = nodes.into_iter().map(|n| n.terminate().1).collect();
            panic!("the items did not reach every node:\n{}", logs.join("\n----\n"));
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }

    let stop = Arc::new(AtomicBool::new(false));
    let writes: Vec<Arc<Writes>> = (0..3).map(|_| Arc::new(Writes::default())).collect();
    let migrated: Vec<Arc<RwLock<usize>>> = (0..3).map(|_| Arc::new(RwLock::new(0))).collect();
    let writers: Vec<_> = pgs
        .iter()
        .enumerate()
        .map(|(i, pg)| {
            spawn_writer(
                pg,
                i as i64 + 1,
                Arc::clone(&writes[i]),
                Arc::clone(&migrated[i]),
                Arc::clone(&stop),
            )
        })
        .collect();
    tokio::time::sleep(Duration::from_secs(2)).await;

    for (m, migration) in MIGRATIONS.iter().enumerate() {
        for (i, db) in dbs.iter().enumerate() {
            if m == 5 && i == 2 {
                // Node 3 leaves the table last, once it has every order of the nodes that left.
                let (from_others, qty_others) = (
                    writes[0].orders.load(Ordering::SeqCst) + writes[1].orders.load(Ordering::SeqCst),
                    writes[0].qty.load(Ordering::SeqCst) + writes[1].qty.load(Ordering::SeqCst),
                );
                let started = Instant::now();
                loop {
                    let sql = "SELECT count(*) FROM shop.orders WHERE id < 3000000";
                    let qty = "SELECT coalesce(sum(qty), 0)::bigint FROM shop.orders WHERE id < 3000000";
                    let (has, has_qty) = (count(&dbs[2], sql).await, count(&dbs[2], qty).await);
                    if (has, has_qty) == (from_others, qty_others) {
                        eprintln!("node 3 had the orders of nodes 1 and 2 after {:?}", started.elapsed());
                        break;
                    }
                    if started.elapsed() > Duration::from_secs(60) {
                        let items = review_items(&dbs[2]).await;
                        let mut sessions = Vec::new();
                        for db in &dbs {
                            sessions.extend(sessions_of(db).await);
                            sessions.push("--".to_owned());
                        }
                        let logs: Vec<String> = nodes.into_iter().map(|n| n.terminate().1).collect();
                        panic!(
                            "node 3 has {has} orders of nodes 1 and 2 (of {from_others}), qty {has_qty} \
                             (of {qty_others}); for review:\n{}\nsessions:\n{}\n{}",
                            items.join("\n"),
                            sessions.join("\n"),
                            logs.join("\n----\n")
                        );
                    }
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
            // A crash in the middle: node 3's accord is killed and the DROP COLUMN runs while it
            // is down; it starts again 2 s later, with its stream to decode across the drop.
            let killed = m == 2 && i == 2;
            if killed {
                crashed_log = nodes.remove(2).kill9();
            }
            let mut stage = migrated[i].write().await;
            db.batch_execute(migration)
                .await
                .unwrap_or_else(|e| panic!("migration {} on node {}: {e}", m + 1, i + 1));
            *stage += 1;
            drop(stage);
            if killed {
                tokio::time::sleep(Duration::from_secs(2)).await;
                nodes.insert(2, RunningNode::start(&files[2].config, &[]));
            }
            tokio::time::sleep(Duration::from_secs(3)).await;
            if i == 0 && m == 0 {
                let unmigrated = count(
                    &dbs[2],
                    "SELECT count(*) FROM information_schema.columns WHERE table_name = 'items' AND column_name = 'sold'",
                )
                .await;
                assert_eq!(
                    unmigrated, 0,
                    "node 3 is not migrated yet while node 1 writes the new column"
                );
            }
        }
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.store(true, Ordering::SeqCst);
    for writer in writers {
        writer.await.unwrap();
    }

    let started = Instant::now();
    while !same(&dbs, ITEMS).await {
        if started.elapsed() > Duration::from_secs(120) {
            let logs: Vec<String> = nodes.into_iter().map(|n| n.terminate().1).collect();
            let (a, b, c) = (
                snapshot(&dbs[0], ITEMS).await,
                snapshot(&dbs[1], ITEMS).await,
                snapshot(&dbs[2], ITEMS).await,
            );
            let differ: Vec<String> = a
                .lines()
                .zip(b.lines())
                .zip(c.lines())
                .filter(|((x, y), z)| x != y || x != z)
                .take(5)
                .map(|((x, y), z)| format!("{x}\n{y}\n{z}"))
                .collect();
            let mut metas = String::new();
            for db in &dbs {
                let row = db
                    .query_one(
                        "SELECT meta, shape, known_xmin FROM accord.row_meta WHERE table_name = 'shop.items' AND row_key = '[1]'",
                        &[],
                    )
                    .await
                    .unwrap();
                let meta: accord_engine::RowMeta = accord::node::store::decode("meta", row.get(0)).unwrap();
                metas.push_str(&format!(
                    "{:?} {:?}\n{meta:?}\n",
                    row.get::<_, Option<i64>>(1),
                    row.get::<_, Option<String>>(2)
                ));
            }
            panic!(
                "the nodes did not converge:\n{}\n{metas}\n{}\n----\nnode 3 before it was killed:\n{crashed_log}",
                differ.join("\n\n"),
                logs.join("\n----\n")
            );
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let total = |f: fn(&Writes) -> &AtomicI64| writes.iter().map(|w| f(w).load(Ordering::SeqCst)).sum::<i64>();
    let (stock, sold, inserted) = (total(|w| &w.stock), total(|w| &w.sold), total(|w| &w.inserted));
    let (orders, qty) = (total(|w| &w.orders), total(|w| &w.qty));
    for w in &writes {
        for (what, n) in [
            ("sold", &w.sold),
            ("notes", &w.notes),
            ("legacy", &w.legacy),
            ("orders", &w.orders),
            ("wide values", &w.wide),
        ] {
            assert!(n.load(Ordering::SeqCst) > 0, "every node wrote {what}");
        }
    }
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
        assert_eq!(
            count(db, "SELECT count(*) FROM shop.items WHERE note IS NOT NULL").await,
            50 / 3 * 3 + 2
        );
        // The table left replication: no metadata, not published, and what peers wrote to it
        // after this node left did not come (the last node to leave has every order).
        assert_eq!(
            count(
                db,
                "SELECT count(*) FROM accord.row_meta WHERE table_name = 'shop.orders'"
            )
            .await,
            0
        );
        assert_eq!(
            count(
                db,
                "SELECT count(*) FROM pg_publication_tables WHERE tablename = 'orders'"
            )
            .await,
            0
        );
        assert!(count(db, "SELECT count(*) FROM shop.orders").await <= orders);
        assert!(
            count(db, "SELECT max(weight) FROM shop.items").await > i64::from(i32::MAX),
            "the widened column's values reached every node"
        );
        let items = review_items(db).await;
        assert!(items.is_empty(), "nothing for review:\n{}", items.join("\n"));
        assert_eq!(
            count(db, "SELECT count(*) FROM accord.deferred").await,
            0,
            "nothing kept aside"
        );
    }
    assert_eq!(
        count(&dbs[2], "SELECT count(*) FROM shop.orders").await,
        orders,
        "every order once on the node that left last"
    );
    assert_eq!(
        count(&dbs[2], "SELECT coalesce(sum(qty), 0)::bigint FROM shop.orders").await,
        qty,
        "every increment of the new table's delta column once"
    );
    // What the nodes could not follow is refused in the migration's own transaction.
    for (ddl, says) in [
        (
            "ALTER TABLE shop.items RENAME COLUMN sold TO units_sold",
            "renaming a replicated column",
        ),
        (
            "ALTER TABLE shop.items RENAME TO products",
            "renaming a replicated table",
        ),
        (
            "COMMENT ON COLUMN shop.items.stock IS '@accord lww'",
            "changing a replicated column's policy",
        ),
    ] {
        let error = dbs[0].batch_execute(ddl).await.expect_err(ddl);
        let message = error.as_db_error().map(|e| e.message().to_owned()).unwrap_or_default();
        assert!(message.contains(says), "{ddl}: {message}");
    }
    // A column added and tagged in one transaction is no policy change.
    dbs[0]
        .batch_execute(
            "BEGIN; ALTER TABLE shop.items ADD COLUMN returned bigint NOT NULL DEFAULT 0;
             COMMENT ON COLUMN shop.items.returned IS '@accord delta'; COMMIT;",
        )
        .await
        .unwrap();
    for node in nodes {
        let (ok, logs) = node.terminate();
        assert!(ok, "{logs}");
        assert!(!logs.contains("stopped capturing"), "a capture stopped:\n{logs}");
        assert!(!logs.contains("capture stopped"), "a capture stopped:\n{logs}");
        assert!(!logs.contains("ERROR"), "{logs}");
    }
    assert!(
        !crashed_log.contains("ERROR"),
        "node 3 before it was killed:\n{crashed_log}"
    );
}

/// A reader (an applier) reads its tables, a migration adds a column, and the capture records
/// the new shape as this node's before the reader reads which columns the node dropped: the new
/// column is not one of them. Taken as dropped, the reader threw away its metadata (a delta
/// column's ledger), and its next merges added every node's contributions to the value again
/// (found with node 3 of `a_rolling_migration_under_writes_loses_nothing` ending with `sold`
/// above its ledger).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_column_added_after_a_reader_read_its_tables_is_not_taken_for_dropped() {
    use accord::node::init::{init, load_policy};
    use accord::node::shapes::{local_extras, record};

    let pg = tokio::task::spawn_blocking(PgCluster::start).await.unwrap();
    let db = pg.create_database("shop").await;
    db.batch_execute(SCHEMA).await.unwrap();
    let mut client = pg.connect("shop").await;
    init(&mut client, support::nodes::id(0)).await.unwrap();
    let before = load_policy(&mut client).await.unwrap();
    let read_before = before.table("shop.items").unwrap();

    db.batch_execute(MIGRATIONS[0]).await.unwrap();
    let after = load_policy(&mut client).await.unwrap();
    // As the capture does once it decodes the migration.
    record(&db, after.table("shop.items").unwrap(), true).await.unwrap();
    let (_, dropped) = local_extras(&db, read_before).await.unwrap();
    assert!(
        dropped.is_empty(),
        "a column added since the reader read its tables is new, not dropped: {dropped:?}"
    );

    db.batch_execute(MIGRATIONS[2]).await.unwrap();
    let (_, dropped) = local_extras(&db, after.table("shop.items").unwrap()).await.unwrap();
    assert_eq!(
        dropped.into_iter().collect::<Vec<_>>(),
        ["legacy"],
        "a column the table no longer has is dropped, also for a reader that still has it"
    );
}
