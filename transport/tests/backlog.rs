//! Nodes exchange a backlog over real QUIC on loopback, with `engine::Replication` windowing,
//! acknowledging and resuming, and every change is applied exactly once, also across a restarted
//! endpoint and a connection that goes dark.

mod support;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use accord_engine::NodeId;
use accord_transport::certs::Ca;
use accord_transport::{DownReason, EndpointConfig};
use support::*;
use tokio::net::UdpSocket;

/// Changes per node, unless `ACCORD_TRANSPORT_BACKLOG` says otherwise: the full 200,000 of the
/// issue for the plain exchanges (about 15 s for two nodes and 20 s for three in a debug build),
/// fewer for the cuts, which test resumption, not volume.
const FULL_BACKLOG: u64 = 200_000;
const CUT_BACKLOG: u64 = 50_000;
const LIMIT: Duration = Duration::from_secs(300);

/// A lower peer is never dialled, so its address is only a placeholder.
fn not_dialled() -> SocketAddr {
    "127.0.0.1:9".parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_exchange_a_backlog_exactly_once() {
    init_tracing();
    let n = backlog(FULL_BACKLOG);
    let ca = Ca::generate(1).unwrap();
    let (a, b) = (NodeId(1), NodeId(2));
    let node_b = Running::start(
        config(&ca, b, loopback(), &[(a, not_dialled())]),
        NodeState::new(b, &[a], n),
    );
    let node_a = Running::start(
        config(&ca, a, loopback(), &[(b, node_b.addr)]),
        NodeState::new(a, &[b], n),
    );
    let started = Instant::now();
    wait_applied("2 nodes", &[(&node_a.durable, b, n), (&node_b.durable, a, n)], LIMIT).await;
    eprintln!("2 nodes, {n} changes each way: {:?}", started.elapsed());
    let (state_a, state_b) = (node_a.stop().await, node_b.stop().await);
    state_a.assert_applied_once(b, n);
    state_b.assert_applied_once(a, n);
    assert_eq!((state_a.ups, state_b.ups), (1, 1), "one connection, never dropped");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_exchange_a_backlog_exactly_once() {
    init_tracing();
    let n = backlog(FULL_BACKLOG);
    let ca = Ca::generate(1).unwrap();
    let (a, b, c) = (NodeId(1), NodeId(2), NodeId(3));
    let node_c = Running::start(
        config(&ca, c, loopback(), &[(a, not_dialled()), (b, not_dialled())]),
        NodeState::new(c, &[a, b], n),
    );
    let node_b = Running::start(
        config(&ca, b, loopback(), &[(a, not_dialled()), (c, node_c.addr)]),
        NodeState::new(b, &[a, c], n),
    );
    let node_a = Running::start(
        config(&ca, a, loopback(), &[(b, node_b.addr), (c, node_c.addr)]),
        NodeState::new(a, &[b, c], n),
    );
    let started = Instant::now();
    wait_applied(
        "3 nodes",
        &[
            (&node_a.durable, b, n),
            (&node_a.durable, c, n),
            (&node_b.durable, a, n),
            (&node_b.durable, c, n),
            (&node_c.durable, a, n),
            (&node_c.durable, b, n),
        ],
        LIMIT,
    )
    .await;
    eprintln!("3 nodes, {n} changes from each to each: {:?}", started.elapsed());
    let states = [node_a.stop().await, node_b.stop().await, node_c.stop().await];
    for state in &states {
        for origin in [a, b, c].into_iter().filter(|&o| o != state.node) {
            state.assert_applied_once(origin, n);
        }
        assert_eq!(state.ups, 2, "node {}: one link per peer", state.node);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_endpoint_resumes_without_loss_or_duplication() {
    init_tracing();
    let n = backlog(CUT_BACKLOG);
    let ca = Ca::generate(1).unwrap();
    let (a, b) = (NodeId(1), NodeId(2));
    let config_b = config(&ca, b, loopback(), &[(a, not_dialled())]);
    let node_b = Running::start(config_b.clone(), NodeState::new(b, &[a], n));
    let node_a = Running::start(
        config(&ca, a, loopback(), &[(b, node_b.addr)]),
        NodeState::new(a, &[b], n),
    );

    // Cut in the middle: the accepting node goes away and comes back on the same address.
    wait_applied("first third", &[(&node_b.durable, a, n / 3)], LIMIT).await;
    let mut config_b = config_b;
    config_b.listen = node_b.addr;
    let state_b = node_b.stop().await;
    let cut_at = state_b.durable.get(a);
    assert!(cut_at < n, "the cut came before the end ({cut_at} of {n})");
    let node_b = Running::restart_on(config_b, state_b).await;

    wait_applied(
        "after restart",
        &[(&node_a.durable, b, n), (&node_b.durable, a, n)],
        LIMIT,
    )
    .await;
    let (state_a, state_b) = (node_a.stop().await, node_b.stop().await);
    state_a.assert_applied_once(b, n);
    state_b.assert_applied_once(a, n);
    assert!(state_a.ups >= 2, "node 1 reconnected");
    let log = state_a.log.lock().unwrap().join("\n");
    assert!(log.contains("down 2 "), "node 1 saw the link go down: {log}");
}

/// A UDP relay between a dialler and an acceptor that can drop every datagram.
struct Relay {
    addr: SocketAddr,
    dark: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl Relay {
    async fn start(upstream: SocketAddr) -> Relay {
        let front = UdpSocket::bind(loopback()).await.unwrap();
        let back = UdpSocket::bind(loopback()).await.unwrap();
        back.connect(upstream).await.unwrap();
        let addr = front.local_addr().unwrap();
        let dark = Arc::new(AtomicBool::new(false));
        let client: Arc<Mutex<Option<SocketAddr>>> = Arc::default();
        let task = {
            let dark = dark.clone();
            tokio::spawn(async move {
                let (mut up, mut down) = (vec![0u8; 65536], vec![0u8; 65536]);
                loop {
                    tokio::select! {
                        Ok((len, from)) = front.recv_from(&mut up) => {
                            *client.lock().unwrap() = Some(from);
                            if !dark.load(Ordering::SeqCst) {
                                let _ = back.send(&up[..len]).await;
                            }
                        }
                        Ok(len) = back.recv(&mut down) => {
                            let to = *client.lock().unwrap();
                            if let (false, Some(to)) = (dark.load(Ordering::SeqCst), to) {
                                let _ = front.send_to(&down[..len], to).await;
                            }
                        }
                    }
                }
            })
        };
        Relay { addr, dark, task }
    }
}

/// Node 1 dials node 2 through a relay that can go dark, each with a backlog of `n` changes for
/// the other; `short_timeouts` makes both give a silent connection up after 2 s.
struct RelayedPair {
    n: u64,
    node_a: Running,
    node_b: Running,
    config_b: EndpointConfig,
    relay: Relay,
    log_a: Arc<Mutex<Vec<String>>>,
}

impl RelayedPair {
    async fn start(short_timeouts: bool) -> RelayedPair {
        let n = backlog(CUT_BACKLOG);
        let ca = Ca::generate(1).unwrap();
        let (a, b) = (NodeId(1), NodeId(2));
        let mut config_b = config(&ca, b, loopback(), &[(a, not_dialled())]);
        if short_timeouts {
            config_b.idle_timeout = Duration::from_secs(2);
        }
        let node_b = Running::start(config_b.clone(), NodeState::new(b, &[a], n));
        // A restart takes the same address, behind the same relay.
        config_b.listen = node_b.addr;
        let relay = Relay::start(node_b.addr).await;
        let mut config_a = config(&ca, a, loopback(), &[(b, relay.addr)]);
        if short_timeouts {
            config_a.idle_timeout = Duration::from_secs(2);
            config_a.handshake_timeout = Duration::from_secs(2);
        }
        let state_a = NodeState::new(a, &[b], n);
        let log_a = state_a.log.clone();
        let node_a = Running::start(config_a, state_a);
        wait_applied("first third", &[(&node_b.durable, a, n / 3)], LIMIT).await;
        RelayedPair {
            n,
            node_a,
            node_b,
            config_b,
            relay,
            log_a,
        }
    }

    /// Node 2 goes away and comes back on its address, and node 1 hears nothing of it: the relay
    /// is dark while node 2 stops, so its goodbye never arrives, as after a crash.
    async fn crash_and_restart_b(self) -> RelayedPair {
        self.relay.dark.store(true, Ordering::SeqCst);
        let state_b = self.node_b.stop().await;
        let node_b = Running::restart_on(self.config_b.clone(), state_b).await;
        self.relay.dark.store(false, Ordering::SeqCst);
        RelayedPair { node_b, ..self }
    }

    /// Waits until both sides applied everything, stops them, and checks that every change was
    /// applied once and in order; returns node 1's link log.
    async fn finish(self, what: &str) -> (NodeState, String) {
        let n = self.n;
        wait_applied(
            what,
            &[
                (&self.node_a.durable, NodeId(2), n),
                (&self.node_b.durable, NodeId(1), n),
            ],
            LIMIT,
        )
        .await;
        self.relay.task.abort();
        let (state_a, state_b) = (self.node_a.stop().await, self.node_b.stop().await);
        state_a.assert_applied_once(NodeId(2), n);
        state_b.assert_applied_once(NodeId(1), n);
        let log = self.log_a.lock().unwrap().join("\n");
        (state_a, log)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_gone_dark_times_out_and_resumes_without_loss_or_duplication() {
    init_tracing();
    let pair = RelayedPair::start(true).await;
    pair.relay.dark.store(true, Ordering::SeqCst);
    let dark_since = Instant::now();
    // Both sides give the connection up after the idle timeout (2 s).
    while !pair.log_a.lock().unwrap().iter().any(|l| l.starts_with("down 2")) {
        assert!(dark_since.elapsed() < Duration::from_secs(30), "no idle timeout");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let cut_at = pair.node_b.durable.get(NodeId(1));
    pair.relay.dark.store(false, Ordering::SeqCst);

    let n = pair.n;
    let (state_a, log) = pair.finish("after the dark").await;
    assert!(cut_at < n, "the cut came before the end ({cut_at} of {n})");
    assert!(state_a.ups >= 2, "node 1 reconnected");
    assert!(log.contains("down 2 no sign of life"), "{log}");
}

/// A node that crashes closes nothing: its peers learn that it is gone only from the packets its
/// next run answers. That run must answer the old connection with a stateless reset, so the peer
/// redials at once instead of waiting out the idle timeout (30 s by default) with changes queued.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crashed_and_restarted_acceptor_resets_the_old_connection() {
    init_tracing();
    let pair = RelayedPair::start(false).await.crash_and_restart_b().await;
    let (_, log) = pair.finish("after the restart").await;
    assert!(
        log.contains(&format!("down 2 {}", DownReason::PeerRestarted)),
        "node 1 learnt of the restart from a stateless reset, not from the idle timeout: {log}"
    );
}
