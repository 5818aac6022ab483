//! Throughput of one link on loopback: node 1 sends its backlog to node 2 through the real
//! endpoint, framing, TLS and QUIC, windowed and acknowledged by `engine::Replication` as a node
//! would, and node 2 "applies" every change in memory. Prints changes/s, messages (batch frames)/s
//! and MB/s of frames.
//!
//! `cargo bench -p accord-transport --bench throughput` (release). `ACCORD_BENCH_CHANGES` sets the
//! number of small changes (default 1,000,000); a second run sends a fifth as many changes padded
//! with 1 KiB each.

#[path = "../tests/support/mod.rs"]
mod support;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use accord_engine::{Message, NodeId, ReplicationConfig};
use accord_transport::certs::Ca;
use accord_transport::frame;
use support::*;

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a runtime");
    let n: u64 = std::env::var("ACCORD_BENCH_CHANGES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000);
    runtime.block_on(run("small changes", n, 0));
    runtime.block_on(run("changes padded with 1 KiB", (n / 5).max(1), 1024));
}

async fn run(what: &str, n: u64, pad: usize) {
    let ca = Ca::generate(1).expect("a CA");
    let (a, b) = (NodeId(1), NodeId(2));
    let placeholder: SocketAddr = "127.0.0.1:9".parse().expect("an address");
    let node_b = Running::start(
        config(&ca, b, loopback(), &[(a, placeholder)]),
        NodeState::new(b, &[a], 0),
    );
    let mut state_a = NodeState::new(a, &[b], n);
    state_a.pad = pad;
    let started = Instant::now();
    let node_a = Running::start(config(&ca, a, loopback(), &[(b, node_b.addr)]), state_a);
    wait_applied(what, &[(&node_b.durable, a, n)], Duration::from_secs(3600)).await;
    let elapsed = started.elapsed().as_secs_f64();
    node_a.stop().await;
    node_b.stop().await;

    // The frames' size: every batch is `max_batch` changes but the last, and sizes vary only in
    // the varint of the sequence numbers, so one batch from the middle measures them well.
    let batch = ReplicationConfig::default().max_batch as u64;
    let middle = n / 2;
    let sample: Vec<_> = (middle..middle + batch.min(n))
        .map(|seq| padded_change(a, seq, pad))
        .collect();
    let bytes_per_change = frame::encode(&Message::Batch(sample), usize::MAX)
        .expect("encodes")
        .len() as f64
        / batch.min(n) as f64;
    let messages = n.div_ceil(batch);
    let mb = bytes_per_change * n as f64 / 1e6;
    println!(
        "{what}: {n} changes ({bytes_per_change:.0} B each framed) in {messages} batch messages over one link: \
         {elapsed:.2} s, {:.0} changes/s, {:.0} messages/s, {:.1} MB/s",
        n as f64 / elapsed,
        messages as f64 / elapsed,
        mb / elapsed,
    );
}
