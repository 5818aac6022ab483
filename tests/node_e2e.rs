//! The PostgreSQL node end to end: two and three nodes on real temporary clusters, writing at once.

mod support;

use std::time::Duration;

use support::nodes::{id, local_removal_count, TestCluster, SHOP};

const TABLES: &[&str] = &["shop.products", "shop.users"];

async fn sum_stock(db: &tokio_postgres::Client) -> i64 {
    db.query_one("SELECT coalesce(sum(stock), 0)::bigint FROM shop.products", &[])
        .await
        .expect("stock is readable")
        .get(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_nodes_count_every_increment_on_hot_rows() {
    let cluster = TestCluster::start(2, SHOP).await;
    let a = cluster.client(0).await;
    a.batch_execute(
        "INSERT INTO shop.products (id, name, stock, price) SELECT g, 'p' || g, 100, 9.99 FROM generate_series(1, 5) g",
    )
    .await
    .unwrap();
    cluster.converge(TABLES, Duration::from_secs(60)).await;

    let per_writer = 150i64;
    let writers = cluster.spawn_increments(2, per_writer, 5).await;
    for w in writers {
        w.await.unwrap();
    }
    let snapshots = cluster.converge(TABLES, Duration::from_secs(120)).await;
    let expected = 5 * 100 + 4 * per_writer;
    for (node, snapshot) in snapshots.iter().enumerate() {
        assert_eq!(
            sum_stock(&cluster.client(node).await).await,
            expected,
            "node {node}:\n{snapshot}"
        );
    }
    cluster.stop_all().await;
}

/// A new row on a quiet cluster: the apply waits for the capture to read past a probe, and the
/// probe must not sit unflushed in the WAL until something else happens to flush it (it did, for
/// 10 s and more). Not a speed test: the bound is 20 times what it takes here.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_insert_on_a_quiet_cluster_arrives_promptly() {
    let cluster = TestCluster::start(2, SHOP).await;
    let (a, b) = (cluster.client(0).await, cluster.client(1).await);
    // Let start-up activity settle: the WAL is quiet from here on.
    tokio::time::sleep(Duration::from_secs(2)).await;
    a.batch_execute("INSERT INTO shop.products (id, name) VALUES (1, 'quiet')")
        .await
        .unwrap();
    let started = std::time::Instant::now();
    loop {
        let found = b
            .query_opt("SELECT 1 FROM shop.products WHERE id = 1", &[])
            .await
            .unwrap()
            .is_some();
        if found {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "the insert did not reach the other node within 5 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    cluster.stop_all().await;
}

/// Rows written inside subtransactions carry the subtransaction's xid, which logical decoding never
/// reports; merges into them must still go through, and still count the local write.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn merges_into_rows_written_in_subtransactions_go_through() {
    let cluster = TestCluster::start(2, SHOP).await;
    let (a, b) = (cluster.client(0).await, cluster.client(1).await);
    a.batch_execute("INSERT INTO shop.products (id, name, stock) SELECT g, 'p' || g, 10 FROM generate_series(1, 3) g")
        .await
        .unwrap();
    cluster.converge(TABLES, Duration::from_secs(60)).await;

    a.batch_execute(
        "BEGIN;
         SAVEPOINT s1;
         UPDATE shop.products SET stock = stock + 5, name = 'savepoint' WHERE id = 1;
         RELEASE SAVEPOINT s1;
         COMMIT;
         DO $$ BEGIN
             BEGIN
                 UPDATE shop.products SET stock = stock + 7 WHERE id = 2;
             EXCEPTION WHEN OTHERS THEN RAISE;
             END;
         END $$;",
    )
    .await
    .unwrap();
    for id in 1..=3i64 {
        b.execute("UPDATE shop.products SET stock = stock + 1 WHERE id = $1", &[&id])
            .await
            .unwrap();
    }
    let snapshots = cluster.converge(TABLES, Duration::from_secs(60)).await;
    assert_eq!(sum_stock(&a).await, 30 + 5 + 7 + 3, "{}", snapshots[0]);
    let name: String = b
        .query_one("SELECT name FROM shop.products WHERE id = 1", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(name, "savepoint");
    cluster.stop_all().await;
}

/// One source transaction far larger than a batch message: it crosses many messages and apply
/// transactions, while the other node writes to the same rows. Nothing lost, nothing doubled.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_huge_transaction_arrives_whole_beside_concurrent_writes() {
    const ROWS: i64 = 20_000;
    let cluster = TestCluster::start(2, SHOP).await;
    let (a, b) = (cluster.client(0).await, cluster.client(1).await);
    a.batch_execute(&format!(
        "INSERT INTO shop.products (id, name, stock, price) SELECT g, 'p' || g, 1, 1.00 FROM generate_series(1, {ROWS}) g"
    ))
    .await
    .unwrap();
    cluster.converge(TABLES, Duration::from_secs(180)).await;
    // One transaction updating every row on A, while B increments the first hundred rows one by one.
    let increments = tokio::spawn(async move {
        for id in 1..=100i64 {
            b.execute("UPDATE shop.products SET stock = stock + 10 WHERE id = $1", &[&id])
                .await
                .unwrap();
        }
    });
    a.batch_execute("UPDATE shop.products SET stock = stock + 2, name = name || '!'")
        .await
        .unwrap();
    increments.await.unwrap();
    let snapshots = cluster.converge(TABLES, Duration::from_secs(300)).await;
    let expected = ROWS * (1 + 2) + 100 * 10;
    for (node, snapshot) in snapshots.iter().enumerate() {
        let db = cluster.client(node).await;
        assert_eq!(sum_stock(&db).await, expected, "node {node}");
        let renamed: i64 = db
            .query_one("SELECT count(*) FROM shop.products WHERE name LIKE '%!'", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(
            renamed,
            ROWS,
            "node {node}: every row took the big update\n{}",
            &snapshot[..snapshot.len().min(500)]
        );
    }
    cluster.stop_all().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_nodes_converge_with_conflicts_of_every_kind() {
    let cluster = TestCluster::start(3, SHOP).await;
    let first = cluster.client(0).await;
    first
        .batch_execute(
            "INSERT INTO shop.products (id, name, stock, balance, price)
             SELECT g, 'product ' || g, 10, 1.5, 10.00 FROM generate_series(1, 20) g",
        )
        .await
        .unwrap();
    cluster.converge(TABLES, Duration::from_secs(60)).await;

    // Everyone at once, partitioned so that all of it is concurrent: counters, lww names, review
    // prices, inserts of the same new key, and a delete racing updates.
    cluster.partition_all().await;
    let mut writers = Vec::new();
    for node in 0..3usize {
        let db = cluster.client(node).await;
        writers.push(tokio::spawn(async move {
            for round in 0..20i64 {
                let id = 1 + (round % 10);
                db.execute(
                    "UPDATE shop.products SET stock = stock + $2, balance = balance + 0.25, name = $3 WHERE id = $1",
                    &[&id, &(node as i64 + 1), &format!("name {round} from {node}")],
                )
                .await
                .unwrap();
            }
            let price = format!("{}.00", 20 + node);
            db.execute(
                "UPDATE shop.products SET price = $1::text::numeric WHERE id = 15",
                &[&price],
            )
            .await
            .unwrap();
            db.execute(
                "INSERT INTO shop.products (id, name, stock) VALUES (100, $1, 7) ON CONFLICT DO NOTHING",
                &[&format!("new from {node}")],
            )
            .await
            .unwrap();
            if node == 0 {
                db.execute("DELETE FROM shop.products WHERE id = 18", &[])
                    .await
                    .unwrap();
            } else {
                db.execute("UPDATE shop.products SET stock = stock + 1000 WHERE id = 18", &[])
                    .await
                    .unwrap();
            }
        }));
    }
    for w in writers {
        w.await.unwrap();
    }
    cluster.heal_all().await;
    let snapshots = cluster.converge(TABLES, Duration::from_secs(120)).await;
    let db = cluster.client(0).await;

    // Rows 1..=10 got 20 rounds spread over them from each node: +1, +2, +3 per round.
    let hot: i64 = db
        .query_one("SELECT sum(stock)::bigint FROM shop.products WHERE id <= 10", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(hot, 10 * 10 + 20 * (1 + 2 + 3), "{}", snapshots[0]);
    let balance: String = db
        .query_one("SELECT sum(balance)::text FROM shop.products WHERE id <= 10", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        balance,
        format!("{:.4}", 10.0 * 1.5 + 60.0 * 0.25),
        "exact numeric deltas"
    );
    // Three concurrent inserts of key 100: one row, every insert counted as a delta from zero.
    let new_stock: i64 = db
        .query_one("SELECT stock FROM shop.products WHERE id = 100", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(new_stock, 21);
    // The delete won over the concurrent updates.
    let gone = db
        .query_opt("SELECT 1 FROM shop.products WHERE id = 18", &[])
        .await
        .unwrap();
    assert!(gone.is_none(), "row 18 must stay deleted:\n{}", snapshots[0]);
    // Three concurrent prices: one open review item with three candidates, on every node.
    let items: Vec<(String, i64)> = db
        .query(
            "SELECT status, jsonb_array_length(candidates)::bigint FROM accord.review_items
             WHERE kind = 'concurrent' AND row_key = '[15]'",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(items, vec![("open".to_owned(), 3)], "{}", snapshots[0]);
    let conflicts: i64 = db
        .query_one("SELECT count(*) FROM accord.conflict_log", &[])
        .await
        .unwrap()
        .get(0);
    assert!(conflicts > 0, "automatic resolutions are logged");
    // Every row's metadata names the shape of its table it was stored under (issue 17): the
    // capture's, the apply's and `accord init`'s, each the table's one shape here.
    let unnamed: i64 = db
        .query_one(
            "SELECT count(*) FROM accord.row_meta m
             WHERE m.shape IS NULL
                OR NOT EXISTS (SELECT 1 FROM accord.shapes s WHERE s.id = m.shape AND s.table_name = m.table_name)",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(unnamed, 0, "metadata without its shape");
    cluster.stop_all().await;
}

async fn tombstones(db: &tokio_postgres::Client) -> i64 {
    db.query_one("SELECT count(*) FROM accord.row_meta WHERE NOT alive", &[])
        .await
        .expect("row_meta is readable")
        .get(0)
}

/// Deleted rows' tombstones are collected on every node once all nodes acknowledged the deletes
/// (rounds every second here), and a collected key comes back when it is inserted again: on two
/// partitioned nodes at once, the inserts merge column by column like any two inserts of one key.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tombstones_are_collected_everywhere_and_collected_keys_come_back() {
    let cluster = TestCluster::start(3, SHOP).await;
    let dbs = [
        cluster.client(0).await,
        cluster.client(1).await,
        cluster.client(2).await,
    ];
    dbs[0]
        .batch_execute(
            "INSERT INTO shop.products (id, name, stock) SELECT g, 'p' || g, 10 FROM generate_series(1, 50) g",
        )
        .await
        .unwrap();
    cluster.converge(TABLES, Duration::from_secs(60)).await;
    dbs[0]
        .batch_execute("DELETE FROM shop.products WHERE id <= 20")
        .await
        .unwrap();
    dbs[1]
        .batch_execute("DELETE FROM shop.products WHERE id > 20 AND id <= 40")
        .await
        .unwrap();
    cluster.converge(TABLES, Duration::from_secs(60)).await;

    let started = std::time::Instant::now();
    loop {
        let mut left = Vec::new();
        for db in &dbs {
            left.push(tombstones(db).await);
        }
        if left.iter().all(|&n| n == 0) {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "tombstones left per node after 60 s: {left:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    for db in &dbs {
        let rounds: i64 = db
            .query_one("SELECT count(*) FROM accord.collection", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(rounds, 1, "every node persisted its collection state");
    }
    for (id, handle) in &cluster.nodes {
        let status = handle.status.borrow().clone();
        assert!(
            status.collection_round >= 1 && status.tombstones_collected == 40,
            "node {id} reports its collection: {status:#?}"
        );
    }

    // Keys 1..=10 on node 1 and 5..=15 on node 3, while partitioned: 5..=10 are inserted twice.
    cluster.partition_all().await;
    dbs[0]
        .batch_execute(
            "INSERT INTO shop.products (id, name, stock) SELECT g, 'again ' || g, 7 FROM generate_series(1, 10) g",
        )
        .await
        .unwrap();
    dbs[2]
        .batch_execute(
            "INSERT INTO shop.products (id, name, stock) SELECT g, 'back ' || g, 3 FROM generate_series(5, 15) g",
        )
        .await
        .unwrap();
    cluster.heal_all().await;
    let snapshots = cluster.converge(TABLES, Duration::from_secs(120)).await;
    let stocks: Vec<(i64, i64)> = dbs[1]
        .query("SELECT id, stock FROM shop.products WHERE id <= 40 ORDER BY id", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    let expected: Vec<(i64, i64)> = (1..=15)
        .map(|id| {
            (
                id,
                if id < 5 {
                    7
                } else if id <= 10 {
                    10
                } else {
                    3
                },
            )
        })
        .collect();
    assert_eq!(stocks, expected, "{}", snapshots[1]);

    // A collected key deleted again leaves a new tombstone, which a later round collects too.
    dbs[1]
        .batch_execute("DELETE FROM shop.products WHERE id = 1")
        .await
        .unwrap();
    cluster.converge(TABLES, Duration::from_secs(60)).await;
    let started = std::time::Instant::now();
    loop {
        let mut left = Vec::new();
        for db in &dbs {
            left.push(tombstones(db).await);
        }
        if left.iter().all(|&n| n == 0) {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(60), "tombstones left: {left:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let row_one = dbs[2]
        .query_opt("SELECT 1 FROM shop.products WHERE id = 1", &[])
        .await
        .unwrap();
    assert!(row_one.is_none(), "row 1 stays deleted");
    cluster.stop_all().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn killed_nodes_resume_without_losing_or_repeating_a_change() {
    let mut cluster = TestCluster::start(2, SHOP).await;
    cluster
        .client(0)
        .await
        .batch_execute("INSERT INTO shop.products (id, name, stock) SELECT g, 'p' || g, 0 FROM generate_series(1, 4) g")
        .await
        .unwrap();
    cluster.converge(TABLES, Duration::from_secs(60)).await;

    // Writers on both databases keep going while the nodes beside them are killed and restarted:
    // the capture is stopped mid-stream and the apply mid-batch.
    let per_writer = 400i64;
    let writers = cluster.spawn_increments(1, per_writer, 4).await;
    for round in 0..4 {
        tokio::time::sleep(Duration::from_millis(150 + 100 * round)).await;
        let victim = round as usize % 2;
        cluster.kill_node(victim).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
        cluster.start_node(victim).await;
    }
    for w in writers {
        w.await.unwrap();
    }
    let snapshots = cluster.converge(TABLES, Duration::from_secs(120)).await;
    for (node, snapshot) in snapshots.iter().enumerate() {
        assert_eq!(
            sum_stock(&cluster.client(node).await).await,
            2 * per_writer,
            "node {node}: every increment once, none twice:\n{snapshot}"
        );
    }
    cluster.stop_all().await;
}

/// Keys changed away and back many times while node 2 is down, node 2 incrementing other rows
/// meanwhile: the backlog arrives in batches where a key is deleted and inserted again, and each
/// such row is written once per batch, a delete and an insert (before, the apply halved those
/// batches down to single transactions, a round of statements each, holding the rows locked).
/// A trigger on node 2 counts the inserts its database really did.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn keys_changed_away_and_back_arrive_whole_and_are_written_once_per_batch() {
    let mut cluster = TestCluster::start(2, SHOP).await;
    let (a, b) = (cluster.client(0).await, cluster.client(1).await);
    a.batch_execute(
        "INSERT INTO shop.products (id, name, stock) SELECT g, 'p' || g, 100 FROM generate_series(1, 10) g",
    )
    .await
    .unwrap();
    cluster.converge(TABLES, Duration::from_secs(60)).await;
    b.batch_execute(
        "CREATE TABLE public.inserts_here (n bigint NOT NULL);
         INSERT INTO public.inserts_here VALUES (0);
         CREATE FUNCTION public.count_insert() RETURNS trigger LANGUAGE plpgsql AS
           $$ BEGIN UPDATE public.inserts_here SET n = n + 1; RETURN NULL; END $$;
         CREATE TRIGGER count_insert AFTER INSERT ON shop.products FOR EACH ROW
           EXECUTE FUNCTION public.count_insert();",
    )
    .await
    .unwrap();

    cluster.kill_node(1).await;
    let toggles = 300i64;
    let local = tokio::spawn(async move {
        for i in 0..200i64 {
            b.execute(
                "UPDATE shop.products SET stock = stock + 1 WHERE id = $1",
                &[&(6 + i % 5)],
            )
            .await
            .unwrap();
        }
        b
    });
    for i in 0..toggles {
        let k = 1 + i % 5;
        a.execute("UPDATE shop.products SET id = id + 1000 WHERE id = $1", &[&k])
            .await
            .unwrap();
        a.batch_execute(&format!(
            "BEGIN; UPDATE shop.products SET id = id - 1000 WHERE id = {} ; \
             UPDATE shop.products SET stock = stock + 1 WHERE id = {k}; COMMIT",
            k + 1000
        ))
        .await
        .unwrap();
    }
    let b = local.await.unwrap();
    cluster.start_node(1).await;
    let snapshots = cluster.converge(TABLES, Duration::from_secs(120)).await;
    let sum = |from: i64, to: i64| {
        let db = &a;
        async move {
            db.query_one(
                "SELECT coalesce(sum(stock), 0)::bigint FROM shop.products WHERE id BETWEEN $1 AND $2",
                &[&from, &to],
            )
            .await
            .unwrap()
            .get::<_, i64>(0)
        }
    };
    assert_eq!(
        sum(1, 5).await,
        500 + toggles,
        "every increment after a move back:\n{}",
        snapshots[0]
    );
    assert_eq!(
        sum(6, 10).await,
        500 + 200,
        "node 2's own increments:\n{}",
        snapshots[0]
    );
    assert_eq!(sum(1, 1_000_000).await, 1_000 + toggles + 200, "no row left moved away");
    // Node 1 inserted 2 rows per toggle (each key change is a delete and an insert).
    let inserted_here: i64 = b
        .query_one("SELECT n FROM public.inserts_here", &[])
        .await
        .unwrap()
        .get(0);
    eprintln!(
        "node 2 inserted {inserted_here} rows for node 1's {} inserts",
        2 * toggles
    );
    assert!(
        inserted_here < toggles / 2,
        "node 2 inserted {inserted_here} rows for node 1's {} inserts: the batches were split",
        2 * toggles
    );
    cluster.stop_all().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_unique_clash_is_parked_on_every_node_and_replication_goes_on() {
    let cluster = TestCluster::start(2, SHOP).await;
    cluster.partition_all().await;
    for node in 0..2usize {
        cluster
            .client(node)
            .await
            .execute(
                "INSERT INTO shop.users (id, email, name) VALUES ($1, 'same@example.com', 'clash')",
                &[&(node as i32 + 1)],
            )
            .await
            .unwrap();
    }
    cluster.heal_all().await;
    // Replication goes on after the clash.
    cluster
        .client(0)
        .await
        .execute(
            "INSERT INTO shop.users (id, email) VALUES (10, 'after@example.com')",
            &[],
        )
        .await
        .unwrap();
    let mut parked = Vec::new();
    for _ in 0..200 {
        parked.clear();
        for node in 0..2 {
            let n: i64 = cluster
                .client(node)
                .await
                .query_one(
                    "SELECT count(*) FROM accord.review_items WHERE kind = 'unapplicable' AND status = 'open'
                       AND table_name = 'shop.users' AND error LIKE '%duplicate key%'",
                    &[],
                )
                .await
                .unwrap()
                .get(0);
            parked.push(n);
        }
        let after: i64 = cluster
            .client(1)
            .await
            .query_one("SELECT count(*) FROM shop.users WHERE id = 10", &[])
            .await
            .unwrap()
            .get(0);
        if parked == [1, 1] && after == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(parked, [1, 1], "each node parks the other's clashing insert");
    cluster.stop_all().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_review_resolution_on_one_node_closes_the_item_on_all() {
    use accord::node::review::{list, resolve, Choice};

    let cluster = TestCluster::start(3, SHOP).await;
    cluster
        .client(0)
        .await
        .execute(
            "INSERT INTO shop.products (id, name, price) VALUES (1, 'lamp', 10.00)",
            &[],
        )
        .await
        .unwrap();
    cluster.converge(TABLES, Duration::from_secs(60)).await;
    cluster.partition_all().await;
    for node in 0..3usize {
        let price = format!("{}.00", 11 + node);
        cluster
            .client(node)
            .await
            .execute(
                "UPDATE shop.products SET price = $1::text::numeric WHERE id = 1",
                &[&price],
            )
            .await
            .unwrap();
    }
    cluster.heal_all().await;
    cluster.converge(TABLES, Duration::from_secs(60)).await;

    let mut reviewer = cluster.client(1).await;
    let open = list(&reviewer, Some("open")).await.unwrap();
    assert_eq!(open.len(), 1, "{open:#?}");
    let item = &open[0];
    assert_eq!(item.item.candidates().len(), 3);
    let policy = accord::node::init::load_policy(&mut reviewer).await.unwrap();
    let chosen = resolve(&mut reviewer, &policy, item.id, Choice::Pick(1)).await.unwrap();
    assert_eq!(chosen.to_string(), "11.00");
    assert!(
        resolve(&mut reviewer, &policy, item.id, Choice::Pick(2)).await.is_err(),
        "a resolved item cannot be resolved again"
    );

    let snapshots = cluster.converge(TABLES, Duration::from_secs(60)).await;
    for (node, snapshot) in snapshots.iter().enumerate() {
        let db = cluster.client(node).await;
        let row = db
            .query_one(
                "SELECT status, closed_value, (SELECT price::text FROM shop.products WHERE id = 1)
                 FROM accord.review_items WHERE id = $1",
                &[&item.id.to_string()],
            )
            .await
            .unwrap_or_else(|e| panic!("node {node} lacks the item: {e}\n{snapshot}"));
        let (status, value, price): (String, Option<String>, String) = (row.get(0), row.get(1), row.get(2));
        assert_eq!(
            (status.as_str(), value.as_deref(), price.as_str()),
            ("resolved", Some("11.00"), "11.00"),
            "node {node}"
        );
    }
    cluster.stop_all().await;
}

mod over_quic {
    //! The same node, its peers reached over real QUIC with mutual TLS on loopback.

    use std::time::Duration;

    use super::support::nodes::{Net, TestCluster, SHOP};
    use super::{sum_stock, TABLES};

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn three_nodes_count_every_increment_and_survive_a_killed_node() {
        let mut cluster = TestCluster::start_on(3, SHOP, Net::Quic).await;
        cluster
            .client(0)
            .await
            .batch_execute(
                "INSERT INTO shop.products (id, name, stock) SELECT g, 'p' || g, 0 FROM generate_series(1, 6) g",
            )
            .await
            .unwrap();
        cluster.converge(TABLES, Duration::from_secs(60)).await;
        let per_writer = 200i64;
        let writers = cluster.spawn_increments(1, per_writer, 6).await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        cluster.kill_node(1).await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        cluster.start_node(1).await;
        for w in writers {
            w.await.unwrap();
        }
        let snapshots = cluster.converge(TABLES, Duration::from_secs(120)).await;
        for (node, snapshot) in snapshots.iter().enumerate() {
            assert_eq!(
                sum_stock(&cluster.client(node).await).await,
                3 * per_writer,
                "node {node}:\n{snapshot}"
            );
        }
        cluster.stop_all().await;
    }
}

/// Holds a node's capture: its walsender (the slot's stream) is stopped with SIGSTOP until the
/// returned guard is dropped, so local writes commit but the capture reads none of them.
struct CaptureHold(u32);

impl CaptureHold {
    async fn start(db: &tokio_postgres::Client) -> CaptureHold {
        let pid: i32 = db
            .query_one(
                "SELECT pid FROM pg_stat_replication WHERE application_name = 'accord-capture'",
                &[],
            )
            .await
            .expect("the node's capture streams from its slot")
            .get(0);
        let pid = u32::try_from(pid).expect("a backend pid is positive");
        signal(pid, "-STOP");
        CaptureHold(pid)
    }
}

impl Drop for CaptureHold {
    fn drop(&mut self) {
        signal(self.0, "-CONT");
    }
}

fn signal(pid: u32, which: &str) {
    let status = std::process::Command::new("kill")
        .args([which, &pid.to_string()])
        .status()
        .expect("kill runs");
    assert!(status.success(), "kill {which} {pid} failed");
}

async fn row_of(db: &tokio_postgres::Client, id: i64) -> (String, i64) {
    let row = db
        .query_one("SELECT name, stock FROM shop.products WHERE id = $1", &[&id])
        .await
        .expect("the row is there");
    (row.get(0), row.get(1))
}

/// Invariant 8 on real PostgreSQL: while node 2's capture is held, a local write on node 2 and
/// node 1's write of the same row both commit there, the merge after the local write, in both
/// stamp orders. The merge must take the local write into account (the xmin guard waits for the
/// capture); merging against the metadata from before the local write overwrites it unseen, and
/// node 2 ends different from node 1.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_merge_waits_for_a_local_write_the_capture_has_not_read() {
    let cluster = TestCluster::start(2, SHOP).await;
    let (a, b) = (cluster.client(0).await, cluster.client(1).await);
    a.batch_execute(
        "INSERT INTO shop.products (id, name, stock, price) VALUES (1, 'start', 100, 1), (2, 'start', 100, 1)",
    )
    .await
    .unwrap();
    cluster.converge(TABLES, Duration::from_secs(60)).await;
    let update = |id: i64, name: &str, delta: i64, price: &str| {
        format!("UPDATE shop.products SET name = '{name}', stock = stock + {delta}, price = {price} WHERE id = {id}")
    };

    // Row 1: node 1 writes first (the smaller stamp), but its change reaches node 2 only after
    // node 2's local write: node 1's capture is held too until then. The local write wins `name`.
    let hold_b = CaptureHold::start(&b).await;
    let hold_a = CaptureHold::start(&a).await;
    a.batch_execute(&update(1, "from node 1", 1, "1")).await.unwrap();
    tokio::time::sleep(Duration::from_millis(20)).await;
    b.batch_execute(&update(1, "local on node 2", 10, "1")).await.unwrap();
    drop(hold_a);
    // Node 1's change reaches node 2's applier meanwhile; with node 2's capture held, only a
    // merge that ignores the guard can go on.
    tokio::time::sleep(Duration::from_secs(2)).await;
    drop(hold_b);

    // Row 2: node 2's local write first, node 1's later (the greater stamp), each without having
    // seen the other: node 1 wins `name`, and the two prices are concurrent (a review item).
    let hold_b = CaptureHold::start(&b).await;
    b.batch_execute(&update(2, "local on node 2", 10, "2")).await.unwrap();
    tokio::time::sleep(Duration::from_millis(20)).await;
    a.batch_execute(&update(2, "from node 1", 1, "3")).await.unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    drop(hold_b);

    let snapshots = cluster.converge(TABLES, Duration::from_secs(60)).await;
    for (node, snapshot) in snapshots.iter().enumerate() {
        let db = cluster.client(node).await;
        for (id, name) in [(1, "local on node 2"), (2, "from node 1")] {
            assert_eq!(
                row_of(&db, id).await,
                (name.to_owned(), 111),
                "node {}, row {id}: both increments count, the later write wins the name\n{snapshot}",
                node + 1
            );
        }
        let open: i64 = db
            .query_one(
                "SELECT count(*) FROM accord.review_items WHERE kind = 'concurrent' AND status = 'open' \
                 AND row_key = '[2]' AND column_name = 'price'",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        assert_eq!(
            open,
            1,
            "node {}: the concurrent prices of row 2 are one open item\n{snapshot}",
            node + 1
        );
    }
    cluster.stop_all().await;
}

/// Issue 20: a merge into a missing row waits for the capture only when a local removal may be on
/// its way through it. Node 1's new rows reach node 2, and after the first batch probed once
/// (settling the count of local removals) the next batches merge without a wait, even while node
/// 2 inserts rows of its own that its capture (held) has not read: an insert leaves its row
/// there, where the merge sees it. Then, each time with node 2's capture held, node 2 writes a
/// key and removes it again (a delete; an update that moves the key away; a TRUNCATE), and node
/// 1 inserts the same key: node 2's removal counted itself, so the merge must wait for the
/// capture (the row stays absent meanwhile), and node 2's removal, the later incarnation, wins
/// everywhere. Taking the key as clear would insert node 1's row at once, over a local history
/// the capture then reads against the merge's metadata.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_missing_row_waits_for_the_capture_only_after_a_local_removal() {
    let cluster = TestCluster::start(2, SHOP).await;
    let (a, b) = (cluster.client(0).await, cluster.client(1).await);
    let stats = || cluster.statuses()[1].peers[&id(0)].clone();
    // The running node's triggers are of this version: a start would not install them again.
    let mut setup = cluster.client(1).await;
    let policy = accord::node::init::load_policy(&mut setup).await.unwrap();
    assert_eq!(
        accord::node::key_locks::install_triggers(&setup, policy.tables(), false)
            .await
            .unwrap(),
        0,
        "a node's current triggers are taken as present"
    );
    a.batch_execute(&insert_range(1, 300)).await.unwrap();
    cluster.converge(TABLES, Duration::from_secs(60)).await;
    let before = stats();
    assert!(
        before.capture_waits >= 1,
        "the first new keys wait for one probe: {before:?}"
    );

    let hold_b = CaptureHold::start(&b).await;
    let counted = local_removal_count(&b).await;
    for round in 0..3 {
        let from = 10_000 + round * 300;
        b.batch_execute(&insert_range(20_000 + round * 300, 20_000 + round * 300 + 299))
            .await
            .unwrap();
        a.batch_execute(&insert_range(from, from + 299)).await.unwrap();
    }
    assert_eq!(local_removal_count(&b).await, counted, "inserts do not count");
    let waited = tokio::time::Instant::now();
    while products_between(&b, 10_000, 10_899).await < 900 {
        assert!(
            waited.elapsed() < Duration::from_secs(30),
            "node 1's new rows did not reach node 2 while node 2's capture was held: {:?}",
            stats()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The status follows the commits.
    let mut after = stats();
    while after.keys_clear < before.keys_clear + 900 {
        assert!(
            waited.elapsed() < Duration::from_secs(30),
            "rows whose keys no local removal touched merge without a wait: {after:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
        after = stats();
    }
    assert_eq!(
        after.capture_waits, before.capture_waits,
        "no wait for the capture once the count is settled: {after:?}"
    );
    drop(hold_b);
    cluster.converge(TABLES, Duration::from_secs(60)).await;

    let mut waits = stats().capture_waits;
    for (key, removal) in [
        (50_000, "DELETE FROM shop.products WHERE id = 50000"),
        (50_001, "UPDATE shop.products SET id = 50002 WHERE id = 50001"),
        (50_003, "TRUNCATE shop.products"),
    ] {
        let hold_b = CaptureHold::start(&b).await;
        let counted = local_removal_count(&b).await;
        b.batch_execute(&format!(
            "INSERT INTO shop.products (id, name, stock, price) VALUES ({key}, 'local', 10, 1); {removal}"
        ))
        .await
        .unwrap();
        assert_eq!(
            local_removal_count(&b).await,
            counted + 1,
            "{removal}: the removal counts once"
        );
        a.batch_execute(&format!(
            "INSERT INTO shop.products (id, name, stock, price) VALUES ({key}, 'from node 1', 1, 1)"
        ))
        .await
        .unwrap();
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert_eq!(
            products_between(&b, key, key).await,
            0,
            "{removal}: the merge waits for node 2's capture to read its local insert and removal of the key"
        );
        drop(hold_b);
        let snapshots = cluster.converge(TABLES, Duration::from_secs(60)).await;
        for (node, snapshot) in snapshots.iter().enumerate() {
            let db = cluster.client(node).await;
            assert_eq!(
                products_between(&db, key, key).await,
                0,
                "{removal}, node {}: node 2's removal ends the incarnation node 1's insert began too\n{snapshot}",
                node + 1
            );
        }
        assert!(stats().capture_waits > waits, "{removal}: {:?}", stats());
        waits = stats().capture_waits;
    }
    for node in 0..2 {
        let db = cluster.client(node).await;
        assert_eq!(
            products_between(&db, 0, i64::MAX).await,
            0,
            "node {}: the TRUNCATE emptied the table everywhere",
            node + 1
        );
    }
    cluster.stop_all().await;
}

fn insert_range(from: i64, to: i64) -> String {
    format!(
        "INSERT INTO shop.products (id, name, stock, price) \
         SELECT g, 'new', 1, 1 FROM generate_series({from}, {to}) AS g"
    )
}

async fn products_between(db: &tokio_postgres::Client, from: i64, to: i64) -> i64 {
    db.query_one(
        "SELECT count(*) FROM shop.products WHERE id BETWEEN $1 AND $2",
        &[&from, &to],
    )
    .await
    .expect("products are readable")
    .get(0)
}

/// A local change the capture cannot replicate (here an update without its old row image, after
/// an operator set the table's replica identity back to DEFAULT) stops the capture with an error
/// naming the table, the key and the cause; the change is not dropped: the slot keeps it and
/// nothing after it reaches the peer either, so no later write overtakes it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_change_the_capture_cannot_replicate_stops_it_and_stays_in_the_slot() {
    let cluster = TestCluster::start(2, SHOP).await;
    let (a, b) = (cluster.client(0).await, cluster.client(1).await);
    a.batch_execute("INSERT INTO shop.products (id, name, stock) VALUES (7, 'seven', 10)")
        .await
        .unwrap();
    cluster.converge(&["shop.products"], Duration::from_secs(30)).await;

    a.batch_execute("ALTER TABLE shop.products REPLICA IDENTITY DEFAULT")
        .await
        .unwrap();
    let before: String = a
        .query_one("SELECT pg_current_wal_lsn()::text", &[])
        .await
        .unwrap()
        .get(0);
    a.batch_execute("UPDATE shop.products SET stock = stock + 5 WHERE id = 7")
        .await
        .unwrap();
    a.batch_execute("INSERT INTO shop.products (id, name) VALUES (8, 'after')")
        .await
        .unwrap();

    let status = &cluster.nodes[&id(0)].status;
    let started = std::time::Instant::now();
    let error = loop {
        if let Some(error) = status.borrow().capture_error.clone() {
            break error;
        }
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "the capture did not report the change it cannot replicate"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    for part in ["shop.products", "(7)", "old row image", "REPLICA IDENTITY FULL"] {
        assert!(error.contains(part), "the error does not say {part:?}: {error}");
    }
    // Give a capture that dropped the change time to send what follows it.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let stock: i64 = b
        .query_one("SELECT stock FROM shop.products WHERE id = 7", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(stock, 10, "node 2 got the update although it cannot be replicated");
    let after = b
        .query_opt("SELECT 1 FROM shop.products WHERE id = 8", &[])
        .await
        .unwrap();
    assert!(after.is_none(), "a later change overtook the stopped one");
    let kept: bool = a
        .query_one(
            "SELECT confirmed_flush_lsn <= $1::text::pg_lsn FROM pg_replication_slots WHERE slot_name = 'accord_slot'",
            &[&before],
        )
        .await
        .unwrap()
        .get(0);
    assert!(kept, "the slot moved past the change the capture could not replicate");
    cluster.stop_all().await;
}

/// The advisory locks of accord's class on `db`, granted or waited for, in `mode`.
async fn key_locks(db: &tokio_postgres::Client, mode: &str, granted: bool) -> i64 {
    db.query_one(
        "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND classid = 1633907300 \
         AND mode = $1 AND granted = $2",
        &[&mode, &granted],
    )
    .await
    .expect("pg_locks is readable")
    .get(0)
}

/// The deadlocks a node's database has broken so far (its statistics, read afresh).
async fn deadlocks(db: &tokio_postgres::Client) -> i64 {
    db.batch_execute("SELECT pg_stat_clear_snapshot()").await.unwrap();
    db.query_one(
        "SELECT deadlocks FROM pg_stat_database WHERE datname = current_database()",
        &[],
    )
    .await
    .unwrap()
    .get(0)
}

/// A merge that waits for a row a local transaction holds holds no key lock meanwhile: the local
/// transaction may insert a key of the same bucket next (an order taken after updating its
/// product). The guard's load once locked the keys of the batch's new rows before its rows, and
/// then waited for the row holding the bucket the local insert needed: PostgreSQL broke the
/// deadlock after a second by failing one of them (`accord demo` met it, the local transaction
/// failing). Now the keys are locked after the rows.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_merge_waiting_for_a_local_row_holds_no_key_a_local_insert_needs() {
    let cluster = TestCluster::start(2, SHOP).await;
    let (a, b) = (cluster.client(0).await, cluster.client(1).await);
    a.batch_execute("INSERT INTO shop.products (id, name, stock) VALUES (1, 'hot', 0)")
        .await
        .unwrap();
    cluster.converge(TABLES, Duration::from_secs(60)).await;
    // A key in the bucket of key 500, which node 1 inserts (the buckets of `key_locks`).
    let bucket = |key: &str| {
        format!("(pg_catalog.hashtext('shop.products') # pg_catalog.hash_record(ROW(({key})::bigint))) & 255")
    };
    let twin: i64 = b
        .query_one(
            &format!(
                "SELECT k::bigint FROM generate_series(501, 1000000) AS k WHERE {} = {} LIMIT 1",
                bucket("k"),
                bucket("500")
            ),
            &[],
        )
        .await
        .unwrap()
        .get(0);
    let deadlocks_before = deadlocks(&b).await;
    // Node 2's user holds row 1.
    let local = cluster.client(1).await;
    local
        .batch_execute("BEGIN; UPDATE shop.products SET stock = stock + 1 WHERE id = 1")
        .await
        .unwrap();
    // Node 1 updates row 1 and inserts row 500 in one transaction: one batch on node 2, whose
    // load waits for row 1.
    a.batch_execute(
        "BEGIN; UPDATE shop.products SET stock = stock + 10 WHERE id = 1; \
         INSERT INTO shop.products (id, name, stock) VALUES (500, 'from node 1', 5); COMMIT",
    )
    .await
    .unwrap();
    let waiting = tokio::time::Instant::now();
    loop {
        let waits: i64 = b
            .query_one(
                "SELECT count(*) FROM pg_locks WHERE locktype = 'transactionid' AND NOT granted",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        if waits > 0 {
            break;
        }
        assert!(
            waiting.elapsed() < Duration::from_secs(30),
            "node 2's applier never waited for the row its user holds"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The user goes on: an insert in key 500's bucket, then the commit. It must not wait for the
    // merge (PostgreSQL looks for a deadlock after a second of waiting).
    let started = tokio::time::Instant::now();
    local
        .batch_execute(&format!(
            "INSERT INTO shop.products (id, name, stock) VALUES ({twin}, 'local on node 2', 3); COMMIT"
        ))
        .await
        .expect("the user's transaction commits");
    assert!(
        started.elapsed() < Duration::from_millis(800),
        "the user's insert waited {:?} for the merge, which waits for the user's row",
        started.elapsed()
    );
    let snapshots = cluster.converge(TABLES, Duration::from_secs(60)).await;
    for (node, snapshot) in snapshots.iter().enumerate() {
        let db = cluster.client(node).await;
        let at = |id: i64| row_of(&db, id);
        assert_eq!(at(1).await, ("hot".to_owned(), 11), "node {}\n{snapshot}", node + 1);
        assert_eq!(at(500).await, ("from node 1".to_owned(), 5), "node {}", node + 1);
        assert_eq!(at(twin).await, ("local on node 2".to_owned(), 3), "node {}", node + 1);
    }
    assert_eq!(deadlocks(&b).await, deadlocks_before, "no deadlock on node 2");
    cluster.stop_all().await;
}

/// A missing row cannot be locked: while node 2's merge of node 1's insert waits for its capture
/// (held), a local insert and delete of the same key on node 2 could commit unseen, and the
/// capture would read them after the merge's metadata, with causal lengths their writer never
/// saw (the simulator's `no-key-lock-trigger` bug shows where that ends). The merge locks the key
/// before it waits, and the local insert's trigger waits for that lock, then meets the merged
/// row. (With the trigger dropped on node 2, the pair commits during the wait, and both nodes
/// end without the row node 1 inserted.)
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_local_insert_waits_while_a_merge_holds_its_missing_key() {
    let cluster = TestCluster::start(2, SHOP).await;
    a_local_write_waits_for_the_merged_key(
        &cluster,
        "BEGIN; INSERT INTO shop.products (id, name, stock) VALUES (50, 'local on node 2', 7); \
         DELETE FROM shop.products WHERE id = 50; COMMIT",
        "insert",
    )
    .await;
    cluster.stop_all().await;
}

/// While node 2's merge of node 1's insert of key 50 holds that key (node 2's capture held, so
/// that the merge waits), `local` runs on node 2: it must wait for the key, then fail as a
/// duplicate of the merged row; every node ends with node 1's row.
async fn a_local_write_waits_for_the_merged_key(cluster: &TestCluster, local: &'static str, what: &str) {
    let (a, b) = (cluster.client(0).await, cluster.client(1).await);
    let hold_b = CaptureHold::start(&b).await;
    a.batch_execute("INSERT INTO shop.products (id, name, stock) VALUES (50, 'from node 1', 5)")
        .await
        .unwrap();
    let waited = tokio::time::Instant::now();
    while key_locks(&b, "ExclusiveLock", true).await == 0 {
        assert!(
            waited.elapsed() < Duration::from_secs(30),
            "node 2's applier never locked the missing row's key"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let db = cluster.client(1).await;
    let write = tokio::spawn(async move { db.batch_execute(local).await });
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(
        !write.is_finished(),
        "the local {what} went through while the merge held its key"
    );
    assert_eq!(
        key_locks(&b, "ShareLock", false).await,
        1,
        "the local {what} waits for the key"
    );
    drop(hold_b);
    let outcome = write.await.expect("the local transaction's task");
    let error = outcome.expect_err("the merged row is there when the local write goes on");
    assert_eq!(
        error.as_db_error().map(|e| e.code().code()),
        Some("23505"),
        "a duplicate key, as for any write of a key that exists: {error}"
    );
    let snapshots = cluster.converge(TABLES, Duration::from_secs(60)).await;
    for (node, snapshot) in snapshots.iter().enumerate() {
        let db = cluster.client(node).await;
        assert_eq!(
            row_of(&db, 50).await,
            ("from node 1".to_owned(), 5),
            "node {}\n{snapshot}",
            node + 1
        );
    }
}

/// A local update that moves a row to a missing key is an insert of that key: while node 2's merge
/// of node 1's insert holds the key (its capture held), the update waits for it, and then meets
/// the merged row. An update that keeps its key neither waits nor counts itself; one that changes
/// it counts itself once. (The update trigger's `WHEN` compares the keys only and the function it
/// calls takes the lock: with that function's lock taken out, the update commits during the
/// merge's wait, and the merge then finds the moved row there. That pair still converges, by the
/// merge of two inserts of one key; the interleavings the lock exists for, a key inserted and
/// deleted again during the wait, are the simulator's `no-key-lock-trigger` bug and the insert
/// test above.)
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_local_key_change_waits_while_a_merge_holds_the_new_key() {
    let cluster = TestCluster::start(2, SHOP).await;
    let b = cluster.client(1).await;
    // A database initialised by an earlier version has an update trigger of another form on
    // one table, and on the other the count of inserts that came before the count of removals
    // (its sequence too): a start replaces both tables' triggers.
    b.batch_execute(
        "CREATE OR REPLACE TRIGGER zz_accord_key_lock_update BEFORE UPDATE ON shop.products \
         FOR EACH ROW WHEN (false) EXECUTE FUNCTION accord.key_lock_taken(); \
         CREATE SEQUENCE accord.local_inserts; \
         DROP TRIGGER zz_accord_count_removals ON shop.users; \
         CREATE TRIGGER zz_accord_count_inserts AFTER INSERT ON shop.users FOR EACH STATEMENT \
         WHEN (nextval('accord.local_inserts') IS NULL) EXECUTE FUNCTION accord.key_lock_taken()",
    )
    .await
    .unwrap();
    let mut setup = cluster.client(1).await;
    let policy = accord::node::init::load_policy(&mut setup).await.unwrap();
    let installed = accord::node::key_locks::install_triggers(&setup, policy.tables(), false)
        .await
        .unwrap();
    assert_eq!(installed, 2, "the older triggers are replaced");
    let leftovers: i64 = b
        .query_one(
            "SELECT (SELECT count(*) FROM pg_trigger WHERE tgname = 'zz_accord_count_inserts') \
                  + (SELECT count(*) FROM pg_class WHERE oid = to_regclass('accord.local_inserts')) \
                  + 2 - (SELECT count(*) FROM pg_trigger WHERE tgname = 'zz_accord_count_removals')",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        leftovers, 0,
        "the count of inserts and its sequence are gone, both tables count removals"
    );
    assert_eq!(
        accord::node::key_locks::install_triggers(&setup, policy.tables(), false)
            .await
            .unwrap(),
        0,
        "a second start finds them all"
    );
    b.batch_execute("INSERT INTO shop.products (id, name, stock) VALUES (49, 'on node 2', 3)")
        .await
        .unwrap();
    cluster.converge(TABLES, Duration::from_secs(60)).await;
    let counted = local_removal_count(&b).await;
    b.batch_execute("UPDATE shop.products SET stock = stock + 1 WHERE id = 49")
        .await
        .unwrap();
    assert_eq!(
        local_removal_count(&b).await,
        counted,
        "an update that keeps its key does not count itself"
    );
    for move_key in [
        "UPDATE shop.products SET id = 48 WHERE id = 49",
        "UPDATE shop.products SET id = 49 WHERE id = 48",
    ] {
        b.batch_execute(move_key).await.unwrap();
    }
    assert_eq!(
        local_removal_count(&b).await,
        counted + 2,
        "each transaction that changes a key counts itself"
    );
    b.batch_execute(
        "BEGIN; UPDATE shop.products SET id = 48 WHERE id = 49; UPDATE shop.products SET id = 49 WHERE id = 48; COMMIT",
    )
    .await
    .unwrap();
    assert_eq!(
        local_removal_count(&b).await,
        counted + 3,
        "a transaction counts once, however many keys it changes"
    );
    cluster.converge(TABLES, Duration::from_secs(60)).await;

    a_local_write_waits_for_the_merged_key(&cluster, "UPDATE shop.products SET id = 50 WHERE id = 49", "key change")
        .await;
    for node in 0..2 {
        let db = cluster.client(node).await;
        assert_eq!(row_of(&db, 49).await, ("on node 2".to_owned(), 4), "node {}", node + 1);
    }
    cluster.stop_all().await;
}

/// A node restarted after a crash finds its replication origin still bound to the crashed
/// process's backend (which ends only with its statement): its applier waits for the origin
/// instead of failing at once. (The check looked for the server's words in the client error's
/// text, which says only "db error", so it never matched and a restarted node exited.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_applier_waits_for_its_origin_held_by_a_dying_session() {
    use std::sync::Arc;

    use accord::node::apply::Applier;
    use accord::node::capture::CaptureProgress;
    use accord::node::init::{init, load_policy};

    let pg = tokio::task::spawn_blocking(support::pg::PgCluster::start)
        .await
        .unwrap();
    let db = pg.create_database("shop").await;
    db.batch_execute(SHOP).await.unwrap();
    let mut client = pg.connect("shop").await;
    init(&mut client, id(0)).await.unwrap();
    let policy = Arc::new(load_policy(&mut client).await.unwrap());
    // The dying session: it holds peer 2's origin for another 1.5 s.
    db.batch_execute("SELECT pg_replication_origin_create('accord_peer_2'); SELECT pg_replication_origin_session_setup('accord_peer_2')")
        .await
        .unwrap();
    let release = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(1_500)).await;
        db.batch_execute("SELECT pg_replication_origin_session_reset()")
            .await
            .unwrap();
        db
    });
    let (_progress, capture) = tokio::sync::watch::channel(CaptureProgress::default());
    let started = std::time::Instant::now();
    let applier = Applier::connect(
        pg.connect("shop").await,
        pg.connect("shop").await,
        capture,
        Default::default(),
        id(1),
        policy,
        false,
    )
    .await;
    assert!(
        applier.is_ok(),
        "the applier binds its origin once it is free: {:?}",
        applier.err()
    );
    assert!(
        started.elapsed() >= Duration::from_millis(1_000),
        "it waited for the origin"
    );
    release.await.unwrap();
}

/// A merge chosen as a deadlock's victim is tried again, never parked for review. Node 1 renames
/// a user and increments a product in one transaction. On node 2 a local transaction holds
/// `shop.products` in SHARE mode, so the merge, having written the user, waits to write the
/// product; the local transaction then asks for `shop.users` ACCESS EXCLUSIVE (as a migration
/// does) and PostgreSQL rolls the merge back. (Taken for a refusal of the values, the increment
/// was parked as an unapplicable review item and node 2 never counted it: the rolling-migration
/// test met it with a migration's lock.)
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_merge_rolled_back_as_a_deadlocks_victim_is_tried_again_not_parked() {
    let cluster = TestCluster::start(2, SHOP).await;
    let (a, b) = (cluster.client(0).await, cluster.client(1).await);
    a.batch_execute(
        "INSERT INTO shop.products (id, name, stock) VALUES (1, 'start', 100);
         INSERT INTO shop.users (id, email, name) VALUES (1, 'one@example.com', 'start')",
    )
    .await
    .unwrap();
    cluster.converge(TABLES, Duration::from_secs(60)).await;
    // Once before, so that node 2's applier has its statements prepared: preparing an UPDATE
    // locks its table too, and the deadlock below is to meet the write itself.
    let rename_and_increment = |name: &str| {
        format!(
            "BEGIN; UPDATE shop.users SET name = '{name}' WHERE id = 1;
             UPDATE shop.products SET stock = stock + 1 WHERE id = 1; COMMIT"
        )
    };
    a.batch_execute(&rename_and_increment("first")).await.unwrap();
    cluster.converge(TABLES, Duration::from_secs(60)).await;
    // Node 2's sessions check for deadlocks after 3 s of waiting, so that the local transaction
    // below asks for its lock well before the merge's check runs, whatever the machine's load.
    for sql in ["ALTER SYSTEM SET deadlock_timeout = '3s'", "SELECT pg_reload_conf()"] {
        b.batch_execute(sql).await.unwrap();
    }
    let local = cluster.client(1).await;
    local
        .batch_execute("SET deadlock_timeout = '60s'; BEGIN; LOCK TABLE shop.products IN SHARE MODE")
        .await
        .unwrap();
    a.batch_execute(&rename_and_increment("renamed")).await.unwrap();
    let waiting = "SELECT count(*) FROM pg_locks WHERE relation = 'shop.products'::regclass \
                   AND mode = 'RowExclusiveLock' AND NOT granted";
    let started = tokio::time::Instant::now();
    while b.query_one(waiting, &[]).await.unwrap().get::<_, i64>(0) == 0 {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "node 2's applier never waited to write the product"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The merge holds `shop.users`; this closes the cycle, and the merge's check (3 s after it
    // began to wait, before the local transaction's 60 s) finds it: the merge is the victim.
    tokio::time::timeout(
        Duration::from_secs(30),
        local.batch_execute("LOCK TABLE shop.users IN ACCESS EXCLUSIVE MODE"),
    )
    .await
    .expect("the merge holds its locks until its deadlock check")
    .expect("the local transaction gets the table: the merge is the deadlock's victim");
    local.batch_execute("COMMIT").await.unwrap();
    let snapshots = cluster.converge(TABLES, Duration::from_secs(60)).await;
    let deadlocks: i64 = b
        .query_one(
            "SELECT deadlocks FROM pg_stat_database WHERE datname = current_database()",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(deadlocks >= 1, "node 2 saw no deadlock: the test did not make one");
    for (node, snapshot) in snapshots.iter().enumerate() {
        let db = cluster.client(node).await;
        assert_eq!(sum_stock(&db).await, 102, "node {}\n{snapshot}", node + 1);
        let items: i64 = db
            .query_one("SELECT count(*) FROM accord.review_items", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(items, 0, "node {}: nothing for review\n{snapshot}", node + 1);
    }
    cluster.stop_all().await;
}

/// The stamp in node 2's metadata of a `shop.products` row, once its capture or a merge wrote it.
async fn stamp_of(db: &tokio_postgres::Client, id: i64) -> accord_engine::Hlc {
    let started = std::time::Instant::now();
    loop {
        let row = db
            .query_opt(
                "SELECT meta FROM accord.row_meta WHERE table_name = 'shop.products' AND row_key = $1",
                &[&format!("[{id}]")],
            )
            .await
            .unwrap();
        if let Some(row) = row {
            let meta: accord_engine::RowMeta = accord::node::store::decode("meta", row.get(0)).unwrap();
            if let Some(stamp) = meta.stamp {
                return stamp;
            }
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "no metadata of product {id} after 30 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A node that only merges commits no capture checkpoint for its merges (before, one synchronous
/// commit per merged batch); each merge records the greatest stamp it merged in `accord.applied`
/// instead, and a restarted capture's clock passes what is recorded there, so that local writes
/// after the restart are stamped above every change merged before it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn merges_record_their_stamps_and_a_restarted_capture_passes_them() {
    let mut cluster = TestCluster::start(2, SHOP).await;
    let (a, b) = (cluster.client(0).await, cluster.client(1).await);
    a.batch_execute("INSERT INTO shop.products (id, name) SELECT g, 'p' || g FROM generate_series(1, 4) g")
        .await
        .unwrap();
    cluster.converge(TABLES, Duration::from_secs(60)).await;
    let checkpoint = "SELECT xmin::text, last_seq FROM accord.capture_state";
    let row = b.query_one(checkpoint, &[]).await.unwrap();
    let before: (String, i64) = (row.get(0), row.get(1));
    for i in 0..40 {
        a.batch_execute(&format!(
            "UPDATE shop.products SET stock = stock + 1 WHERE id = {}",
            1 + i % 4
        ))
        .await
        .unwrap();
    }
    cluster.converge(TABLES, Duration::from_secs(60)).await;
    let row = b.query_one(checkpoint, &[]).await.unwrap();
    let after: (String, i64) = (row.get(0), row.get(1));
    assert_eq!(
        before, after,
        "node 2 only merged, yet its capture committed its checkpoint"
    );

    let origin = i32::try_from(id(0).0).unwrap();
    let row = b
        .query_one(
            "SELECT merged_physical, merged_logical FROM accord.applied WHERE origin = $1",
            &[&origin],
        )
        .await
        .unwrap();
    let recorded: (Option<i64>, Option<i64>) = (row.get(0), row.get(1));
    let mut greatest = stamp_of(&b, 1).await;
    for product in 2..=4 {
        greatest = greatest.max(stamp_of(&b, product).await);
    }
    assert_eq!(
        recorded,
        (Some(greatest.physical as i64), Some(i64::from(greatest.logical))),
        "node 2 records the greatest stamp it merged from node 1"
    );

    // Node 2 restarts with a merged stamp an hour ahead of this machine's clock on record (as if
    // node 1's clock ran ahead): its next local write must be stamped above it. Node 1 is
    // stopped, so that nothing stamped so far ahead leaves node 2.
    cluster.kill_node(0).await;
    cluster.kill_node(1).await;
    let ahead: i64 = b
        .query_one(
            "SELECT (extract(epoch FROM clock_timestamp()) * 1000000)::bigint + 3600000000",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    b.execute(
        "UPDATE accord.applied SET merged_physical = $1, merged_logical = 7 WHERE origin = $2",
        &[&ahead, &origin],
    )
    .await
    .unwrap();
    cluster.start_node(1).await;
    b.batch_execute("INSERT INTO shop.products (id, name) VALUES (100, 'after the restart')")
        .await
        .unwrap();
    let stamp = stamp_of(&b, 100).await;
    assert!(
        (stamp.physical, stamp.logical) > (ahead as u64, 7),
        "node 2's local write after the restart is stamped {stamp}, not above the merged stamp {ahead}.7 on record"
    );
    cluster.stop_all().await;
}

/// An applier learns what is on disk with a flush beside its next batches, not before them; an
/// idle one still acknowledges its last batch once the flush reports, with no batch after it.
/// (`converge` waits until every peer acknowledged everything: without that report the last
/// batch of each round stays unacknowledged, and the peer's outbound log unpruned, for good.)
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_idle_node_acknowledges_its_last_batch_once_it_is_on_disk() {
    let cluster = TestCluster::start(2, SHOP).await;
    let a = cluster.client(0).await;
    for round in 0..3 {
        for i in 0..20 {
            let id = round * 20 + i + 1;
            a.batch_execute(&format!("INSERT INTO shop.products (id, name) VALUES ({id}, 'p{id}')"))
                .await
                .unwrap();
        }
        // Nothing arrives after the round's last batch: only its flush moves the position.
        cluster.converge(TABLES, Duration::from_secs(30)).await;
    }
    let outbound: i64 = a
        .query_one("SELECT count(*) FROM accord.outbound", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(outbound, 0, "node 1 pruned every change node 2 acknowledged");
    cluster.stop_all().await;
}

/// A user's trigger on node 2 that silently skips one row of node 1's transaction (a `BEFORE
/// INSERT` trigger returning NULL): the batch's write, sent with its commit in one round trip,
/// must not commit metadata claiming a row that was never written. The write counts the rows it
/// touched and fails when one is missing; the batch starts over under savepoints, parks the
/// skipped change for review, and applies the rest, and replication goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_row_a_users_trigger_skipped_is_parked_not_claimed() {
    let cluster = TestCluster::start(2, SHOP).await;
    let (a, b) = (cluster.client(0).await, cluster.client(1).await);
    b.batch_execute(
        "CREATE FUNCTION public.skip_some() RETURNS trigger LANGUAGE plpgsql AS
           $$ BEGIN IF NEW.name = 'skip me' THEN RETURN NULL; END IF; RETURN NEW; END $$;
         CREATE TRIGGER skip_some BEFORE INSERT ON shop.products FOR EACH ROW
           EXECUTE FUNCTION public.skip_some();",
    )
    .await
    .unwrap();
    a.batch_execute(
        "BEGIN;
         INSERT INTO shop.products (id, name, stock) VALUES (1, 'kept', 1), (2, 'skip me', 2), (3, 'kept', 3);
         COMMIT;
         INSERT INTO shop.products (id, name, stock) VALUES (4, 'after', 4);",
    )
    .await
    .unwrap();
    let mut seen = (0i64, 0i64, String::new());
    for _ in 0..300 {
        let parked: Vec<String> = b
            .query(
                "SELECT error FROM accord.review_items WHERE kind = 'unapplicable' AND status = 'open'
                   AND table_name = 'shop.products'",
                &[],
            )
            .await
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect();
        let rows: i64 = b
            .query_one("SELECT count(*) FROM shop.products WHERE id IN (1, 3, 4)", &[])
            .await
            .unwrap()
            .get(0);
        seen = (parked.len() as i64, rows, parked.join("; "));
        if seen.0 == 1 && seen.1 == 3 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        (seen.0, seen.1),
        (1, 3),
        "node 2 parks the skipped row and applies the others and what came after (parked: {})",
        seen.2
    );
    assert!(seen.2.contains("touched 0 rows instead of 1"), "parked for: {}", seen.2);
    // Nothing claims the row that is not there.
    let claimed: i64 = b
        .query_one(
            "SELECT count(*) FROM accord.row_meta WHERE table_name = 'shop.products' AND row_key = '[2]' AND alive",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(claimed, 0, "node 2 recorded metadata for a row it does not have");
    cluster.stop_all().await;
}
