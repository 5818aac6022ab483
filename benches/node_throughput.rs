//! Changes per second through a real node pair on this machine: how fast node A's capture drains a
//! backlog from its slot into the outbound log, and how fast node B applies it.
//!
//! `cargo bench --bench node_throughput` (ACCORD_BENCH_CHANGES sets the backlog, default 20000).
//! Each figure comes with the time it took; the machine is noisy, so compare runs side by side.

#[path = "../tests/support/mod.rs"]
mod support;

use std::time::{Duration, Instant};

use support::nodes::{id, TestCluster, SHOP};

async fn wait_for(what: &str, limit: Duration, mut done: impl FnMut() -> bool) -> Duration {
    let started = Instant::now();
    while !done() {
        assert!(started.elapsed() < limit, "{what} did not finish within {limit:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    started.elapsed()
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let changes: u64 = std::env::var("ACCORD_BENCH_CHANGES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20_000);
    let mut cluster = TestCluster::start(2, SHOP).await;
    let a = cluster.client(0).await;
    a.batch_execute(
        "INSERT INTO shop.products (id, name, stock) SELECT g, 'p' || g, 0 FROM generate_series(1, 1000) g",
    )
    .await
    .expect("seed rows");
    cluster.converge(&["shop.products"], Duration::from_secs(120)).await;

    // The backlog: single-row update transactions committed while node A is down.
    cluster.kill_node(0).await;
    cluster.hub.cut(id(0), id(1)).await;
    let writers = 4;
    let started = Instant::now();
    let mut tasks = Vec::new();
    for w in 0..writers {
        let db = cluster.client(0).await;
        tasks.push(tokio::spawn(async move {
            let mut i = w;
            while i < changes {
                db.execute(
                    "UPDATE shop.products SET stock = stock + 1 WHERE id = $1",
                    &[&(1 + (i % 1000) as i64)],
                )
                .await
                .expect("update");
                i += writers;
            }
        }));
    }
    for t in tasks {
        t.await.expect("writer");
    }
    let write_time = started.elapsed();

    let node_a = id(0);
    cluster.start_node(0).await;
    let head_before = cluster.nodes[&node_a].status.borrow().head;
    let status = cluster.nodes[&node_a].status.clone();
    let capture_time = wait_for("capture", Duration::from_secs(600), || {
        status.borrow().head >= head_before + changes
    })
    .await;

    let node_b = id(1);
    let status_b = cluster.nodes[&node_b].status.clone();
    let target = status.borrow().head;
    let started = Instant::now();
    cluster.hub.heal(id(0), id(1)).await;
    let apply_time = wait_for("apply", Duration::from_secs(600), || {
        status_b
            .borrow()
            .peers
            .get(&node_a)
            .is_some_and(|p| p.progress.applied >= target)
    })
    .await;
    let _ = started;

    let rate = |d: Duration| changes as f64 / d.as_secs_f64();
    println!("node throughput, {changes} single-row update transactions on node A:");
    println!(
        "  written by {writers} clients      {:>9.0} tx/s  ({:.2?})",
        rate(write_time),
        write_time
    );
    println!(
        "  captured (slot -> outbound) {:>9.0} changes/s  ({:.2?})",
        rate(capture_time),
        capture_time
    );
    println!(
        "  sent and applied on node B  {:>9.0} changes/s  ({:.2?})",
        rate(apply_time),
        apply_time
    );
    cluster.stop_all().await;
}
