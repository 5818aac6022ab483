//! A table altered on one node while the nodes run (issue 17): the node's capture goes on under
//! the table's new shape, and the other node holds the change that carries the new column until
//! it has the column too, then applies it: nothing lost, nothing replicated differently.

mod support;

use std::time::{Duration, Instant};

use support::nodes::{id, TestCluster, SHOP};

const TABLES: &[&str] = &["shop.products", "shop.users"];

async fn row(db: &tokio_postgres::Client) -> (i64, Option<String>) {
    let has_note: bool = db
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM information_schema.columns
                            WHERE table_name = 'products' AND column_name = 'note')",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    let sql = if has_note {
        "SELECT stock, note FROM shop.products WHERE id = 1"
    } else {
        "SELECT stock, NULL::text FROM shop.products WHERE id = 1"
    };
    let r = db.query_one(sql, &[]).await.unwrap();
    (r.get(0), r.get(1))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_table_altered_on_one_node_goes_on_and_the_other_catches_up() {
    let cluster = TestCluster::start(2, SHOP).await;
    let (a, b) = (cluster.client(0).await, cluster.client(1).await);
    a.batch_execute("INSERT INTO shop.products (id, name, stock) VALUES (1, 'lamp', 10)")
        .await
        .unwrap();
    cluster.converge(TABLES, Duration::from_secs(60)).await;

    a.batch_execute(
        "ALTER TABLE shop.products ADD COLUMN note text;
         UPDATE shop.products SET stock = stock + 5, note = 'only here' WHERE id = 1;",
    )
    .await
    .unwrap();
    // Node 2 lacks the column: it holds the change, and applies nothing of it.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(row(&b).await, (10, None), "node 2 applied a change it cannot hold yet");
    let status = cluster.nodes[&id(0)].status.borrow().clone();
    assert_eq!(status.capture_error, None, "node 1's capture stopped");

    // Node 2 migrates: the change is applied whole.
    b.batch_execute("ALTER TABLE shop.products ADD COLUMN note text")
        .await
        .unwrap();
    let started = Instant::now();
    while row(&b).await != (15, Some("only here".to_owned())) {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "node 2 did not catch up: {:?}",
            row(&b).await
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // And writes go on both ways under the new shape.
    b.batch_execute("UPDATE shop.products SET stock = stock + 1, note = 'both' WHERE id = 1")
        .await
        .unwrap();
    cluster.converge(TABLES, Duration::from_secs(60)).await;
    assert_eq!(row(&a).await, (16, Some("both".to_owned())));
    cluster.stop_all().await;
}
