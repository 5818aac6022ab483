//! The endpoint: one UDP socket, one QUIC endpoint, and a task per peer that keeps one link to it
//! (dialling, or taking what the accept loop hands over), reconnecting with backoff. Peers come and
//! go while it runs (`Endpoint::set_peers`): the cluster's membership changes without a restart.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use accord_engine::{Hello, LocalIdentity, NodeId};
use quinn::ConnectionError;
use thiserror::Error;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tokio::time::{timeout, timeout_at, Instant};
use tracing::{debug, info, warn};

use crate::backoff::{Backoff, BackoffConfig};
use crate::certs::node_dns_name;
use crate::config::{EndpointConfig, PeerAddr};
use crate::connection::{self, Closable};
use crate::event::{CloseCode, DownReason, PeerEvent, Rejection};
use crate::handshake::{self, rejection_from_connection, Failure, Role};
use crate::link::LinkId;
use crate::tls::{self, TlsError};

/// How long `shutdown` waits for the peer tasks to emit their last events and end.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);
/// During shutdown, how long an event may wait for room in a queue nobody may be reading anymore.
const SHUTDOWN_EVENT_WAIT: Duration = Duration::from_secs(1);

#[derive(Debug, Error)]
pub enum StartError {
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error("the certificate is for node {certified}, but this node is {node}")]
    CertificateForOtherNode { certified: NodeId, node: NodeId },
    #[error("node {0} is listed as its own peer")]
    PeerIsSelf(NodeId),
    #[error("node {0} is listed twice among the peers")]
    DuplicatePeer(NodeId),
    #[error("transport configuration: {0}")]
    Config(String),
    #[error("cannot listen on {addr}: {source}")]
    Bind { addr: SocketAddr, source: std::io::Error },
}

/// The limits the tasks need.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Limits {
    pub max_frame: usize,
    pub link_queue: usize,
    pub handshake_timeout: Duration,
    pub backoff: BackoffConfig,
}

type HelloFor = dyn Fn(NodeId) -> Hello + Send + Sync;

/// What every task of an endpoint shares.
pub(crate) struct Shared {
    pub identity: LocalIdentity,
    peers: RwLock<BTreeMap<NodeId, SocketAddr>>,
    pub hello_for: Box<HelloFor>,
    pub events: mpsc::Sender<PeerEvent>,
    pub limits: Limits,
    endpoint: quinn::Endpoint,
    client: quinn::ClientConfig,
    /// Accepted connections, to the task of the peer that dialled (peers with a lower id only).
    handoffs: Mutex<BTreeMap<NodeId, mpsc::Sender<Established>>>,
    next_link: AtomicU64,
    shutdown: watch::Sender<bool>,
}

impl Shared {
    pub fn is_shutting_down(&self) -> bool {
        *self.shutdown.borrow()
    }

    /// Whether `node` is a peer now (a member the node keeps a link to).
    pub fn is_peer(&self, node: NodeId) -> bool {
        self.peers.read().unwrap_or_else(|p| p.into_inner()).contains_key(&node)
    }

    fn handoff(&self, node: NodeId) -> Option<mpsc::Sender<Established>> {
        self.handoffs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&node)
            .cloned()
    }

    fn new_link_id(&self) -> LinkId {
        LinkId(self.next_link.fetch_add(1, Ordering::Relaxed))
    }

    /// Queues an event. Once shutting down, waits only briefly: the node may have stopped reading.
    async fn emit(&self, event: PeerEvent) {
        if self.is_shutting_down() {
            let _ = timeout(SHUTDOWN_EVENT_WAIT, self.events.send(event)).await;
        } else {
            let _ = self.events.send(event).await;
        }
    }

    async fn report(&self, peer: Option<NodeId>, remote: SocketAddr, rejection: Rejection) {
        warn!(peer = ?peer, %remote, %rejection, "connection rejected");
        self.emit(PeerEvent::Rejected {
            peer,
            remote,
            rejection,
        })
        .await;
    }
}

/// A connection that passed the handshake, not yet a link.
pub(crate) struct Established {
    conn: Closable,
    peer: NodeId,
    hello: Hello,
}

/// A running endpoint. Dropping it stops everything at once; `shutdown` stops it in order.
pub struct Endpoint {
    shared: Arc<Shared>,
    tasks: JoinSet<()>,
    local_addr: SocketAddr,
    /// Per peer: the address its task dials, and the signal that ends the task.
    peer_tasks: BTreeMap<NodeId, (SocketAddr, watch::Sender<bool>)>,
}

impl std::fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Endpoint")
            .field("node", &self.shared.identity.node)
            .field("local_addr", &self.local_addr)
            .finish_non_exhaustive()
    }
}

impl Endpoint {
    /// Binds `config.listen` and starts keeping a link to every peer of `config`. `hello_for(peer)`
    /// makes this node's hello for a connection to `peer`; it is called for each handshake, so
    /// `applied_yours` and `hlc` are current. Must be called inside a tokio runtime.
    pub fn start(
        config: EndpointConfig,
        hello_for: impl Fn(NodeId) -> Hello + Send + Sync + 'static,
    ) -> Result<(Endpoint, mpsc::Receiver<PeerEvent>), StartError> {
        let node = config.identity.node;
        if config.tls.node() != node {
            return Err(StartError::CertificateForOtherNode {
                certified: config.tls.node(),
                node,
            });
        }
        let peers = check_peers(node, &config.peers)?;
        let transport = config
            .transport_config()
            .map_err(|e| StartError::Config(format!("idle timeout: {e}")))?;
        let server = tls::server_config(&config.tls, transport.clone())?;
        let client = tls::client_config(&config.tls, transport)?;
        let bind = |source| StartError::Bind {
            addr: config.listen,
            source,
        };
        let socket = std::net::UdpSocket::bind(config.listen).map_err(bind)?;
        let runtime = quinn::default_runtime().ok_or_else(|| StartError::Config("no async runtime".into()))?;
        let mut endpoint_config = quinn::EndpointConfig::new(Arc::new(config.tls.stateless_reset_key()));
        let cid_key = config.tls.connection_id_key();
        endpoint_config.cid_generator(move || Box::new(quinn_proto::HashedConnectionIdGenerator::from_key(cid_key)));
        let endpoint = quinn::Endpoint::new(endpoint_config, Some(server), socket, runtime).map_err(bind)?;
        let local_addr = endpoint.local_addr().map_err(bind)?;

        let (events, events_rx) = mpsc::channel(config.event_queue.max(1));
        let shared = Arc::new(Shared {
            identity: config.identity.clone(),
            peers: RwLock::default(),
            hello_for: Box::new(hello_for),
            events,
            limits: Limits {
                max_frame: config.max_frame,
                link_queue: config.link_queue,
                handshake_timeout: config.handshake_timeout,
                backoff: config.backoff,
            },
            endpoint,
            client,
            handoffs: Mutex::default(),
            next_link: AtomicU64::new(1),
            shutdown: watch::Sender::new(false),
        });

        let mut tasks = JoinSet::new();
        tasks.spawn(accept_loop(shared.clone()));
        let mut endpoint = Endpoint {
            shared,
            tasks,
            local_addr,
            peer_tasks: BTreeMap::new(),
        };
        endpoint.apply_peers(peers);
        info!(%node, %local_addr, peers = endpoint.peer_tasks.len(), "transport listening");
        Ok((endpoint, events_rx))
    }

    /// The address `peer`'s task dials (or, for a peer that dials this node, was given).
    pub fn peer_addr(&self, peer: NodeId) -> Option<SocketAddr> {
        self.peer_tasks.get(&peer).map(|(addr, _)| *addr)
    }

    /// Makes `peers` the nodes this endpoint keeps links to: a task starts for each new one, and
    /// the link of each one no longer listed closes (its `Down` says so). A peer whose address
    /// changed is dialled at the new one. Must be called inside a tokio runtime.
    pub fn set_peers(&mut self, peers: &[PeerAddr]) -> Result<(), StartError> {
        let peers = check_peers(self.shared.identity.node, peers)?;
        self.apply_peers(peers);
        Ok(())
    }

    fn apply_peers(&mut self, peers: BTreeMap<NodeId, SocketAddr>) {
        let node = self.shared.identity.node;
        let stale: Vec<NodeId> = self
            .peer_tasks
            .iter()
            // A peer that dials this node (a lower id) keeps its task whatever its address.
            .filter(|(peer, (addr, _))| match peers.get(peer) {
                None => true,
                Some(new) => **peer > node && new != addr,
            })
            .map(|(peer, _)| *peer)
            .collect();
        for peer in stale {
            if let Some((_, gone)) = self.peer_tasks.remove(&peer) {
                gone.send_replace(true);
            }
            self.shared
                .handoffs
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&peer);
            if !peers.contains_key(&peer) {
                info!(%node, %peer, "no longer a peer");
            }
        }
        *self.shared.peers.write().unwrap_or_else(|p| p.into_inner()) = peers.clone();
        for (peer, addr) in peers {
            if self.peer_tasks.contains_key(&peer) {
                continue;
            }
            let (gone, gone_rx) = watch::channel(false);
            if peer > node {
                self.tasks.spawn(dial_loop(self.shared.clone(), peer, addr, gone_rx));
            } else {
                // One waiting connection is enough: a newer one replaces it anyway.
                let (tx, rx) = mpsc::channel(1);
                self.shared
                    .handoffs
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(peer, tx);
                self.tasks
                    .spawn(accept_peer_loop(self.shared.clone(), peer, rx, gone_rx));
            }
            self.peer_tasks.insert(peer, (addr, gone));
        }
    }

    /// The address the endpoint listens on (the real port when `listen` asked for port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    pub fn node(&self) -> NodeId {
        self.shared.identity.node
    }

    /// Closes every connection (peers see `CloseCode::Shutdown`), emits `Down` for each link,
    /// and ends; the event receiver ends after the last event. Keep reading events meanwhile:
    /// an event that finds the queue full waits only briefly now.
    pub async fn shutdown(mut self) {
        self.signal_shutdown();
        let tasks = &mut self.tasks;
        let drained = timeout(SHUTDOWN_GRACE, async { while tasks.join_next().await.is_some() {} }).await;
        if drained.is_err() {
            warn!(node = %self.shared.identity.node, "transport tasks did not end in time; aborting them");
            self.tasks.abort_all();
        }
        let _ = timeout(SHUTDOWN_EVENT_WAIT, self.shared.endpoint.wait_idle()).await;
        info!(node = %self.shared.identity.node, "transport stopped");
    }

    fn signal_shutdown(&self) {
        self.shared.shutdown.send_replace(true);
        self.shared
            .endpoint
            .close(CloseCode::Shutdown.var_int(), b"node shutting down");
    }
}

impl Drop for Endpoint {
    fn drop(&mut self) {
        // The tasks are aborted with the `JoinSet`; closing tells the peers at once rather than
        // after their idle timeout.
        self.signal_shutdown();
    }
}

fn check_peers(node: NodeId, list: &[PeerAddr]) -> Result<BTreeMap<NodeId, SocketAddr>, StartError> {
    let mut peers = BTreeMap::new();
    for peer in list {
        if peer.node == node {
            return Err(StartError::PeerIsSelf(node));
        }
        if peers.insert(peer.node, peer.addr).is_some() {
            return Err(StartError::DuplicatePeer(peer.node));
        }
    }
    Ok(peers)
}

async fn wait_shutdown(rx: &mut watch::Receiver<bool>) {
    // An error means the sender is gone, which only happens when everything is shutting down.
    let _ = rx.wait_for(|&down| down).await;
}

/// Keeps a link to a peer with a greater id: dial, serve, and after a failure or a lost link wait
/// a backoff delay and dial again.
async fn dial_loop(shared: Arc<Shared>, peer: NodeId, addr: SocketAddr, mut gone: watch::Receiver<bool>) {
    let mut shutdown = shared.shutdown.subscribe();
    let mut backoff = Backoff::new(shared.limits.backoff);
    let mut unreachable_reported = false;
    while !shared.is_shutting_down() && !*gone.borrow() {
        let attempt = tokio::select! {
            attempt = dial(&shared, peer, addr) => attempt,
            _ = wait_shutdown(&mut shutdown) => return,
            _ = wait_shutdown(&mut gone) => return,
        };
        match attempt {
            Ok(established) => {
                backoff.reset();
                unreachable_reported = false;
                serve(&shared, established, None, &mut gone).await;
            }
            Err(DialError::Unreachable(error)) => {
                // Once per outage as a warning (while a peer is away its lag grows and tombstones
                // are kept), then quietly: the repeats are not news.
                if unreachable_reported {
                    debug!(%peer, %addr, %error, "peer still unreachable");
                } else {
                    warn!(%peer, %addr, %error, "peer unreachable; retrying with backoff");
                    unreachable_reported = true;
                }
            }
            Err(DialError::Rejected(failure)) => {
                shared
                    .report(failure.peer.or(Some(peer)), addr, failure.rejection)
                    .await
            }
        }
        let delay = backoff.next_delay();
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = wait_shutdown(&mut shutdown) => return,
            _ = wait_shutdown(&mut gone) => return,
        }
    }
}

enum DialError {
    /// No QUIC connection came about: nothing to report but a log line.
    Unreachable(String),
    /// A connection came about and was rejected by one side.
    Rejected(Failure),
}

async fn dial(shared: &Shared, peer: NodeId, addr: SocketAddr) -> Result<Established, DialError> {
    let deadline = Instant::now() + shared.limits.handshake_timeout;
    let connecting = shared
        .endpoint
        .connect_with(shared.client.clone(), addr, &node_dns_name(peer))
        .map_err(|e| DialError::Unreachable(e.to_string()))?;
    let conn = match timeout_at(deadline, connecting).await {
        Err(_) => return Err(DialError::Unreachable("no answer within the handshake timeout".into())),
        Ok(Err(e @ (ConnectionError::TimedOut | ConnectionError::Reset | ConnectionError::LocallyClosed))) => {
            return Err(DialError::Unreachable(e.to_string()))
        }
        // The peer's endpoint is shutting down (or at its connection limit): down, not rejecting.
        Ok(Err(ConnectionError::ConnectionClosed(close)))
            if close.error_code == quinn::TransportErrorCode::CONNECTION_REFUSED =>
        {
            return Err(DialError::Unreachable(close.to_string()))
        }
        Ok(Err(e)) => {
            return Err(DialError::Rejected(Failure {
                peer: Some(peer),
                rejection: rejection_from_connection(&e),
            }))
        }
        Ok(Ok(conn)) => conn,
    };
    match timeout_at(deadline, handshake::run(&conn, Role::Dialer { expected: peer }, shared)).await {
        Ok(Ok((peer, hello))) => Ok(Established {
            conn: Closable::new(conn),
            peer,
            hello,
        }),
        Ok(Err(failure)) => Err(DialError::Rejected(failure)),
        Err(_) => {
            let rejection = Rejection::Handshake("timed out".into());
            conn.close(CloseCode::HandshakeFailed.var_int(), rejection.to_string().as_bytes());
            Err(DialError::Rejected(Failure {
                peer: Some(peer),
                rejection,
            }))
        }
    }
}

/// Keeps a link to a peer with a smaller id, from the connections it dials. A newer connection
/// replaces the current one: the peer only dials again when it lost the old one (or restarted),
/// so the old one is the stale one.
async fn accept_peer_loop(
    shared: Arc<Shared>,
    peer: NodeId,
    mut handoffs: mpsc::Receiver<Established>,
    mut gone: watch::Receiver<bool>,
) {
    let mut shutdown = shared.shutdown.subscribe();
    let mut next: Option<Established> = None;
    debug!(%peer, "waiting for the peer to dial");
    loop {
        let established = match next.take() {
            Some(established) => established,
            None => tokio::select! {
                handed = handoffs.recv() => match handed {
                    Some(established) => established,
                    None => return,
                },
                _ = wait_shutdown(&mut shutdown) => return,
                _ = wait_shutdown(&mut gone) => return,
            },
        };
        serve(&shared, established, Some((&mut handoffs, &mut next)), &mut gone).await;
        if shared.is_shutting_down() || *gone.borrow() {
            if let Some(waiting) = next.take() {
                waiting.conn.close(CloseCode::Shutdown, DownReason::Shutdown);
            }
            return;
        }
    }
}

type Replacements<'a> = (&'a mut mpsc::Receiver<Established>, &'a mut Option<Established>);

/// Runs one link to its end and emits its `Down`. With `replacements`, a connection handed over
/// meanwhile closes this one and waits in the `Option` to be served next. Once the peer is `gone`
/// (no longer a member), the link is closed.
async fn serve(
    shared: &Shared,
    established: Established,
    mut replacements: Option<Replacements<'_>>,
    gone: &mut watch::Receiver<bool>,
) {
    let Established { conn, peer, hello } = established;
    let id = shared.new_link_id();
    let run = connection::run(&conn, peer, hello, id, shared);
    tokio::pin!(run);
    let mut closing = false;
    let reason = loop {
        tokio::select! {
            reason = &mut run => break reason,
            _ = wait_shutdown(gone), if !closing => {
                info!(%peer, link = %id, "the node is no longer a peer; closing its link");
                let reason = DownReason::ClosedByNode("no longer a member of the cluster".into());
                conn.close(CloseCode::Shutdown, reason);
                closing = true;
            }
            Some(newer) = async {
                match replacements.as_mut() {
                    Some((handoffs, _)) => handoffs.recv().await,
                    None => std::future::pending().await,
                }
            } => {
                info!(%peer, link = %id, "a newer connection from the peer replaces the link");
                conn.close(CloseCode::Replaced, DownReason::Replaced);
                if let Some((_, next)) = replacements.as_mut() {
                    if let Some(skipped) = next.replace(newer) {
                        skipped.conn.close(CloseCode::Replaced, DownReason::Replaced);
                    }
                }
            }
        }
    };
    match &reason {
        DownReason::Shutdown
        | DownReason::Replaced
        | DownReason::ClosedByPeer {
            code: CloseCode::Shutdown,
            ..
        } => info!(%peer, link = %id, %reason, "link down"),
        _ => warn!(%peer, link = %id, %reason, "link down"),
    }
    shared.emit(PeerEvent::Down { peer, link: id, reason }).await;
}

async fn accept_loop(shared: Arc<Shared>) {
    while let Some(incoming) = shared.endpoint.accept().await {
        if shared.is_shutting_down() {
            incoming.refuse();
            continue;
        }
        // Each in its own task, so a slow or silent client holds up nobody else.
        tokio::spawn(accept_one(shared.clone(), incoming));
    }
}

async fn accept_one(shared: Arc<Shared>, incoming: quinn::Incoming) {
    let remote = incoming.remote_address();
    let deadline = Instant::now() + shared.limits.handshake_timeout;
    let conn = match timeout_at(deadline, incoming).await {
        Ok(Ok(conn)) => conn,
        Ok(Err(e)) => {
            match rejection_from_connection(&e) {
                rejection @ (Rejection::Tls(_) | Rejection::TlsRejectedByPeer(_)) => {
                    shared.report(None, remote, rejection).await
                }
                _ => debug!(%remote, error = %e, "incoming connection failed"),
            }
            return;
        }
        Err(_) => {
            debug!(%remote, "incoming connection did not complete TLS in time");
            return;
        }
    };
    match timeout_at(deadline, handshake::run(&conn, Role::Acceptor, &shared)).await {
        Ok(Ok((peer, hello))) => {
            let established = Established {
                conn: Closable::new(conn),
                peer,
                hello,
            };
            // The handshake admitted only peers with a smaller id, which all have a
            // handoff; a missing one, or a closed one at shutdown, just closes the connection.
            match shared.handoff(peer) {
                Some(handoff) => {
                    if let Err(refused) = handoff.send(established).await {
                        refused.0.conn.close(CloseCode::Shutdown, DownReason::Shutdown);
                    }
                }
                None => established.conn.close(CloseCode::Shutdown, DownReason::Shutdown),
            }
        }
        Ok(Err(failure)) => shared.report(failure.peer, remote, failure.rejection).await,
        Err(_) => {
            let rejection = Rejection::Handshake("timed out".into());
            conn.close(CloseCode::HandshakeFailed.var_int(), rejection.to_string().as_bytes());
            shared.report(None, remote, rejection).await;
        }
    }
}
