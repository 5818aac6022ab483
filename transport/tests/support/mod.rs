//! Test nodes: a real endpoint on loopback, driven by `engine::Replication` with an in-memory
//! outbound log and an in-memory "apply" that records every applied sequence number.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use accord_engine::{
    ChangeKind, Hello, Hlc, LocalIdentity, Message, NodeId, PeerProgress, Replication, ReplicationConfig, RowChange,
    RowKey, RowState, Value, PROTOCOL_VERSION,
};
use accord_transport::certs::{Ca, DEFAULT_DAYS};
use accord_transport::{Endpoint, EndpointConfig, Link, PeerAddr, PeerEvent, TlsIdentity};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

pub const CLUSTER: &str = "test-cluster";
pub const FINGERPRINT: &str = "policy-abc";

pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "accord_transport=warn".into()),
        )
        .with_test_writer()
        .try_init();
}

/// The number of changes each node logs in the backlog tests: `ACCORD_TRANSPORT_BACKLOG`, or
/// `default` (kept small enough for a debug build on a 2-core CI machine).
pub fn backlog(default: u64) -> u64 {
    std::env::var("ACCORD_TRANSPORT_BACKLOG")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

pub fn now_micros() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_micros() as u64
}

pub fn loopback() -> SocketAddr {
    "127.0.0.1:0".parse().unwrap()
}

pub fn identity(node: NodeId) -> LocalIdentity {
    LocalIdentity {
        cluster: CLUSTER.into(),
        node,
        fingerprint: FINGERPRINT.into(),
        max_offset_micros: 500_000,
    }
}

pub fn tls(ca: &Ca, node: NodeId) -> TlsIdentity {
    let cert = ca.issue(node, DEFAULT_DAYS).unwrap();
    TlsIdentity::from_pem(&ca.cert_pem, &cert.cert_pem, &cert.key_pem).unwrap()
}

/// A configuration with test-friendly timeouts.
pub fn config(ca: &Ca, node: NodeId, listen: SocketAddr, peers: &[(NodeId, SocketAddr)]) -> EndpointConfig {
    let peers = peers.iter().map(|&(node, addr)| PeerAddr { node, addr }).collect();
    let mut config = EndpointConfig::new(identity(node), listen, peers, tls(ca, node));
    config.keep_alive = Duration::from_millis(200);
    // Short enough for tests that wait for a dead connection to be noticed, long enough that a
    // busy 2-core CI machine does not time out a live one.
    config.idle_timeout = Duration::from_secs(5);
    config.handshake_timeout = Duration::from_secs(5);
    config.backoff.initial = Duration::from_millis(50);
    config.backoff.max = Duration::from_millis(500);
    config
}

pub fn hello(id: &LocalIdentity, applied_yours: u64) -> Hello {
    Hello {
        version: PROTOCOL_VERSION,
        cluster: id.cluster.clone(),
        node: id.node,
        fingerprint: id.fingerprint.clone(),
        hlc: Hlc::new(now_micros(), 0, id.node),
        applied_yours,
    }
}

/// A hello function from the configuration, reading the durable positions.
pub fn hello_for(id: LocalIdentity, durable: Durable) -> impl Fn(NodeId) -> Hello + Send + Sync + 'static {
    move |peer| hello(&id, durable.get(peer))
}

/// The small change with sequence number `seq` of `origin`'s log.
pub fn change(origin: NodeId, seq: u64) -> RowChange {
    padded_change(origin, seq, 0)
}

/// A change whose key carries `pad` more bytes of text, for payloads of a realistic size.
pub fn padded_change(origin: NodeId, seq: u64, pad: usize) -> RowChange {
    let mut key = vec![Value::Int(seq as i64)];
    if pad > 0 {
        key.push(Value::Text("x".repeat(pad)));
    }
    RowChange {
        shape: None,
        table: "s.t".into(),
        key: RowKey(key),
        kind: ChangeKind::Delete,
        origin,
        // Long past: the receiver's clock-offset check only refuses stamps from the future.
        stamp: Hlc::new(1_000_000 + seq, 0, origin),
        seq,
        tx_last: seq,
        builds_on: Vec::new(),
        row: RowState::absent(),
        closures: Vec::new(),
    }
}

/// The applied position per peer, as the service keeps it durably (here: shared memory that
/// survives endpoint restarts).
#[derive(Debug, Clone, Default)]
pub struct Durable(Arc<Mutex<BTreeMap<NodeId, u64>>>);

impl Durable {
    pub fn get(&self, peer: NodeId) -> u64 {
        self.0.lock().unwrap().get(&peer).copied().unwrap_or(0)
    }

    fn set(&self, peer: NodeId, applied: u64) {
        self.0.lock().unwrap().insert(peer, applied);
    }
}

/// A node's replication state, which outlives its endpoint across restarts.
pub struct NodeState {
    pub node: NodeId,
    pub repl: Replication,
    /// Every sequence number applied, per origin, in order.
    pub applied: BTreeMap<NodeId, Vec<u64>>,
    pub durable: Durable,
    /// Non-routine events seen: rejections and link downs, as text.
    pub log: Arc<Mutex<Vec<String>>>,
    pub ups: u64,
    /// Extra bytes per change sent (see `padded_change`).
    pub pad: usize,
}

impl NodeState {
    pub fn new(node: NodeId, peers: &[NodeId], backlog: u64) -> Self {
        let progress = peers.iter().map(|&p| (p, PeerProgress::default()));
        NodeState {
            node,
            repl: Replication::new(node, ReplicationConfig::default(), backlog, 0, progress),
            applied: BTreeMap::new(),
            durable: Durable::default(),
            log: Arc::default(),
            ups: 0,
            pad: 0,
        }
    }

    /// Asserts every change of `origin` was applied exactly once, in order.
    pub fn assert_applied_once(&self, origin: NodeId, n: u64) {
        let seqs = self.applied.get(&origin).map(Vec::as_slice).unwrap_or_default();
        assert_eq!(
            seqs.len() as u64,
            n,
            "node {} applied {} of {n} changes of node {origin}",
            self.node,
            seqs.len()
        );
        assert!(
            seqs.iter().copied().eq(1..=n),
            "node {} applied node {origin}'s changes out of order or twice",
            self.node
        );
    }
}

/// Drives a node from its endpoint's events until they end (the endpoint shut down); returns the
/// state for a restart.
pub async fn drive(mut state: NodeState, mut events: mpsc::Receiver<PeerEvent>) -> NodeState {
    let mut links: BTreeMap<NodeId, Link> = BTreeMap::new();
    while let Some(event) = events.recv().await {
        match event {
            PeerEvent::Up { link, hello } => {
                let peer = link.peer();
                state.ups += 1;
                state.repl.connected(peer, hello.applied_yours).unwrap();
                links.insert(peer, link);
                pump(&mut state, &links, peer).await;
            }
            PeerEvent::Message { peer, message } => match message {
                Message::Batch(changes) => {
                    let Some(link) = links.get(&peer) else { continue };
                    match state.repl.received(peer, &changes, now_micros()) {
                        Ok(to_apply) => {
                            let applied = state.applied.entry(peer).or_default();
                            for change in to_apply {
                                let expected = applied.last().copied().unwrap_or(0) + 1;
                                assert_eq!(change.seq, expected, "node {} applying node {peer}", state.node);
                                applied.push(change.seq);
                            }
                            // The apply "transaction" commits: durable position, then the ack.
                            let last = applied.last().copied().unwrap_or(0);
                            state.durable.set(peer, last);
                            state.repl.applied(peer, last).unwrap();
                            let _ = link.send(&Message::Ack { applied: last }).await;
                        }
                        Err(error) => link.close(error.to_string()),
                    }
                }
                Message::Ack { applied } => match state.repl.acked(peer, applied) {
                    Ok(()) => pump(&mut state, &links, peer).await,
                    Err(error) => {
                        if let Some(link) = links.get(&peer) {
                            link.close(error.to_string());
                        }
                    }
                },
                _ => {}
            },
            PeerEvent::Down { peer, link, reason } => {
                state.log.lock().unwrap().push(format!("down {peer} {reason}"));
                if links.get(&peer).is_some_and(|l| l.id() == link) {
                    links.remove(&peer);
                    state.repl.disconnected(peer);
                }
            }
            PeerEvent::Rejected { peer, rejection, .. } => {
                state.log.lock().unwrap().push(format!("rejected {peer:?} {rejection}"));
            }
        }
    }
    state
}

async fn pump(state: &mut NodeState, links: &BTreeMap<NodeId, Link>, peer: NodeId) {
    let Some(link) = links.get(&peer) else { return };
    while let Some(range) = state.repl.next_batch(peer) {
        let batch = range.map(|seq| padded_change(state.node, seq, state.pad)).collect();
        if link.send(&Message::Batch(batch)).await.is_err() {
            return;
        }
    }
}

/// A running test node: its endpoint and the task driving it.
pub struct Running {
    pub node: NodeId,
    pub addr: SocketAddr,
    pub endpoint: Endpoint,
    pub driver: JoinHandle<NodeState>,
    pub durable: Durable,
}

impl Running {
    pub fn start(config: EndpointConfig, state: NodeState) -> Running {
        let durable = state.durable.clone();
        let hello_for = hello_for(config.identity.clone(), durable.clone());
        let (endpoint, events) = Endpoint::start(config, hello_for).unwrap();
        Running {
            node: state.node,
            addr: endpoint.local_addr(),
            endpoint,
            driver: tokio::spawn(drive(state, events)),
            durable,
        }
    }

    /// Starts on a fixed address, retrying while the old socket is still being released.
    pub async fn restart_on(config: EndpointConfig, state: NodeState) -> Running {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let durable = state.durable.clone();
            let hello_for = hello_for(config.identity.clone(), durable.clone());
            match Endpoint::start(config.clone(), hello_for) {
                Ok((endpoint, events)) => {
                    return Running {
                        node: state.node,
                        addr: endpoint.local_addr(),
                        endpoint,
                        driver: tokio::spawn(drive(state, events)),
                        durable,
                    }
                }
                Err(e) if Instant::now() < deadline => {
                    eprintln!("restart: {e}; retrying");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => panic!("restart failed: {e}"),
            }
        }
    }

    pub async fn stop(self) -> NodeState {
        self.endpoint.shutdown().await;
        self.driver.await.unwrap()
    }
}

/// Waits until every `(durable, peer, n)` reached `n`, or panics with the progress.
pub async fn wait_applied(what: &str, targets: &[(&Durable, NodeId, u64)], limit: Duration) {
    let start = Instant::now();
    loop {
        if targets.iter().all(|(d, peer, n)| d.get(*peer) >= *n) {
            return;
        }
        if start.elapsed() > limit {
            let progress: Vec<_> = targets.iter().map(|(d, peer, n)| (*peer, d.get(*peer), *n)).collect();
            panic!("{what}: not applied within {limit:?}: (peer, applied, of) {progress:?}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits for an event matching `pred` and returns it, or panics after `limit`.
pub async fn expect_event(
    events: &mut mpsc::Receiver<PeerEvent>,
    limit: Duration,
    what: &str,
    mut pred: impl FnMut(&PeerEvent) -> bool,
) -> PeerEvent {
    let deadline = tokio::time::Instant::now() + limit;
    let mut seen = Vec::new();
    loop {
        match tokio::time::timeout_at(deadline, events.recv()).await {
            Ok(Some(event)) if pred(&event) => return event,
            Ok(Some(event)) => seen.push(format!("{event:?}")),
            Ok(None) => panic!("{what}: events ended; saw {seen:#?}"),
            Err(_) => panic!("{what}: not within {limit:?}; saw {seen:#?}"),
        }
    }
}
