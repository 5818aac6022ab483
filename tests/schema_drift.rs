//! A table altered on one node while the nodes run: accord must stop replicating it loudly rather
//! than replicate it differently on two nodes, and refuse to carry on under the new shape with
//! metadata written under the old one.

mod support;

use std::time::{Duration, Instant};

use accord::node::init::init;
use support::nodes::{id, TestCluster, SHOP};

const TABLES: &[&str] = &["shop.products", "shop.users"];

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_table_altered_on_one_node_stops_its_capture_loudly_and_init_refuses_it() {
    let mut cluster = TestCluster::start(2, SHOP).await;
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

    // The capture on node 1 says what changed, in the status (and so in `accord status`).
    let started = Instant::now();
    let error = loop {
        let status = cluster.nodes[&id(0)].status.borrow().clone();
        if let Some(error) = status.capture_error {
            break error;
        }
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "no capture error after the ALTER TABLE: {status:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(
        error.contains("shop.products") && error.contains("new columns: note") && error.contains("accord init"),
        "{error}"
    );
    // Nothing of the altered table's new shape reached node 2.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let stock: i64 = b
        .query_one("SELECT stock FROM shop.products WHERE id = 1", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(stock, 10);

    // Running `accord init` again does not paper over it: the metadata of the old shape cannot be
    // read under the new one, and init says what to do instead.
    cluster.kill_node(0).await;
    let mut db = cluster.pg[0].connect(support::nodes::DB).await;
    let refusal = init(&mut db, id(0)).await.expect_err("init refuses the changed table");
    let refusal = format!("{refusal:#}");
    assert!(
        refusal.contains("changed since this database was initialised") && refusal.contains("DROP SCHEMA accord"),
        "{refusal}"
    );
    // ... and a node started on it refuses too, naming the cause.
    let started = accord::node::runtime::start(cluster.config(0), |_, _| async {
        anyhow::bail!("the network is not reached: the node refuses first")
    })
    .await;
    let error = format!("{:#}", started.err().expect("the node refuses to start"));
    assert!(error.contains("annotations changed since `accord init`"), "{error}");
    cluster.stop_all().await;
}
