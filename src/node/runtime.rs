//! A running node: the capture, one applier per peer, and the replication loop that joins them to
//! the network. The loop owns the engine's `Replication` state machine; everything it decides, the
//! loop carries out with PostgreSQL and the network.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use accord_engine::{
    ApplyQueue, Collector, Handout, Hello, Hlc, LocalIdentity, Member, MemberState, Membership, Message, NodeId,
    PeerProgress, Refusal, Replication, ReplicationConfig, RowChange, ShapeBook, StableCut, TableDef, VerifyMessage,
    MAX_APPLY_BATCH, PROTOCOL_VERSION,
};
use accord_schema_annotations::SchemaPolicy;
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::{AbortHandle, JoinHandle};
use tokio_postgres::Client;
use tracing::Instrument;

use super::apply::{Applier, ConflictCounts, SharedLedger};
use super::apply_worker::{apply_worker, spooler, Applied, ApplyReport, ApplyWaits, ApplyWork, SpoolWork};
use super::capture::{Capture, CaptureProgress};
use super::key_locks;
use super::members;
use super::net::{HelloSource, NetworkPort, Outgoing, PeerDirectory, PeerEvent};
use super::recent_changes::{RecentChanges, SharedRecentChanges, RECENT_CHANGES};
use super::shapes;
use super::store::{self, decode, StoreError};
use super::tagging;
use super::truncate;
use super::verify::VerifyHub;
use crate::pg_connection::connect;

#[derive(Debug, Clone)]
pub struct NodeConfig {
    pub node: NodeId,
    pub dsn: String,
    pub cluster: String,
    /// The peers the configuration lists. They seed the membership (`accord.members`), which the
    /// node keeps from then on: nodes joined later are learned from the cluster.
    pub peers: Vec<NodeId>,
    /// QUIC addresses (`host:port`) the configuration names: its peers', and under this node's own
    /// id the one peers reach it at (empty map: none, as on the in-memory hub).
    pub addresses: BTreeMap<NodeId, String>,
    pub replication: ReplicationConfig,
    /// `synchronous_commit` for apply transactions. Off, like PostgreSQL's own subscription
    /// workers: a crash of the server may lose the last applied batches, which are then resent,
    /// since the applied position is in the same transaction.
    pub synchronous_commit: bool,
    /// Where a peer's transaction too large for memory waits until it is complete.
    pub spool: SpoolConfig,
}

/// Spooling of large source transactions on the receiver (`engine::Handout::Spool`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpoolConfig {
    /// Spool a transaction still arriving once more than this of it is in memory (estimated).
    pub bound_bytes: usize,
    /// The directory of the spool files (the system's temporary directory when `None`).
    pub dir: Option<PathBuf>,
}

impl Default for SpoolConfig {
    fn default() -> Self {
        SpoolConfig {
            bound_bytes: DEFAULT_SPOOL_MB << 20,
            dir: None,
        }
    }
}

/// `replication.spool_mb`'s default.
pub const DEFAULT_SPOOL_MB: usize = 32;

/// One peer as this node sees it. Times are wall-clock microseconds since the Unix epoch.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct PeerStatus {
    pub connected: bool,
    /// When the current connection came up, or the last one went down.
    pub since_micros: Option<u64>,
    /// Why the last connection went down or the last attempt failed.
    pub last_error: Option<String>,
    pub progress: PeerProgress,
    /// Our changes the peer has not acknowledged.
    pub unacked: u64,
    /// Seconds since the oldest change the peer has not acknowledged was captured (0 when none).
    pub outbound_lag_secs: f64,
    /// The head of the peer's outbound log, as its last ping said.
    pub peer_head: u64,
    /// The peer's changes not applied here yet (as far as its pings tell).
    pub inbound_lag_changes: u64,
    /// Seconds since the commit of the last change applied from the peer, while more are waiting;
    /// 0 when caught up, `None` when behind and nothing was applied yet.
    pub inbound_lag_secs: Option<f64>,
    /// The commit stamp (wall-clock part) of the last change applied from the peer.
    pub last_applied_micros: Option<u64>,
    /// Changes applied from the peer since this node started.
    pub applied_changes: u64,
    /// Changes applied from the peer per second, over the last few seconds.
    pub applied_per_sec: f64,
    /// Changes from the peer parked in the review queue since this node started.
    pub parked: u64,
    /// Automatic resolutions of the peer's changes since this node started, by kind.
    pub conflicts: ConflictCounts,
    /// Times an apply waited for the capture (a local write raced a merge).
    pub capture_waits: u64,
    /// Missing rows merged without waiting for the capture: no local removal was on its way
    /// through it.
    #[serde(default)]
    pub keys_clear: u64,
    /// The peer's changes received and held in memory until the rest of their transaction
    /// arrives (a transaction is applied whole).
    pub incomplete_transaction_changes: u64,
    /// The peer's next transaction waits until this node has applied another node's changes
    /// up to a position (it built on them there): that node and position.
    #[serde(default)]
    pub waiting_for: Option<(NodeId, u64)>,
    /// The peer's transactions applied before what they built on, because the node that made
    /// it stayed unreachable longer than `causal_wait_ms` (since this node started).
    #[serde(default)]
    pub causal_waivers: u64,
    /// Attempts to apply the peer's changes that PostgreSQL rolled back as a deadlock's victim
    /// (a local transaction locked the same rows in another order), tried again (since this node
    /// started).
    #[serde(default)]
    pub apply_deadlocks: u64,
    /// Why the peer's next transaction cannot be applied on this node yet and waits (a row with
    /// no partition here to go to), with what to do.
    #[serde(default)]
    pub apply_waiting: Option<String>,
    /// The peer's transactions larger than `replication.spool_mb` that were spooled to disk here
    /// while they arrived (since this node started).
    #[serde(default)]
    pub spooled_transactions: u64,
    /// The size of what was spooled, estimated as in memory (since this node started).
    #[serde(default)]
    pub spooled_bytes: u64,
    /// The peer's transaction still arriving here, estimated size in memory (spooled part
    /// included); 0 when none.
    #[serde(default)]
    pub in_flight_bytes: u64,
    /// Of which spooled to disk.
    #[serde(default)]
    pub in_flight_spooled_bytes: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct NodeStatus {
    pub node: u32,
    /// When this node started.
    pub started_micros: u64,
    /// The last sequence number in this node's outbound log.
    pub head: u64,
    /// Local changes captured since this node started.
    pub captured: u64,
    /// Open items in the review queue: concurrent review-column writes, and parked changes.
    pub review_open: u64,
    /// Of those, changes parked because they could not be applied here.
    pub parked_open: u64,
    /// Why the capture is stopped, while it is: local writes are not replicated meanwhile.
    #[serde(default)]
    pub capture_error: Option<String>,
    /// Deleted rows' metadata this node still holds.
    #[serde(default)]
    pub tombstones: u64,
    /// The latest tombstone-collection round this node knows complete (0: none yet).
    #[serde(default)]
    pub collection_round: u64,
    /// Tombstones this node deleted since it started.
    #[serde(default)]
    pub tombstones_collected: u64,
    pub peers: BTreeMap<NodeId, PeerStatus>,
    /// Every node of the cluster this node knows, with its state (`joining`, `active`, `left`).
    #[serde(default)]
    pub members: BTreeMap<u32, String>,
}

pub struct NodeHandle {
    pub node: NodeId,
    /// `accord verify`, coordinated by this node.
    pub verify: VerifyHub,
    pub status: watch::Receiver<NodeStatus>,
    shutdown: watch::Sender<bool>,
    task: JoinHandle<Result<Ended>>,
    workers: Workers,
}

/// How the replication loop ended without an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    /// Told to stop.
    Stopped,
    /// This node left the cluster (`accord leave`), and its peers know.
    Left,
}

/// The node's tasks besides the loop; the loop adds a peer's when one joins.
type Workers = Arc<Mutex<Vec<JoinHandle<()>>>>;

fn take_workers(workers: &Workers) -> Vec<JoinHandle<()>> {
    std::mem::take(&mut *workers.lock().unwrap_or_else(|p| p.into_inner()))
}

impl NodeHandle {
    /// Stops the node gracefully: the batch being applied finishes or rolls back.
    pub async fn stop(self) -> Result<()> {
        let _ = self.shutdown.send(true);
        let result = self.task.await.context("node task panicked")?;
        for worker in take_workers(&self.workers) {
            worker.abort();
            let _ = worker.await;
        }
        result.map(|_| ())
    }

    /// Runs until `stop` completes, then stops gracefully; returns early with the node's error if
    /// it fails on its own.
    pub async fn run_until(mut self, stop: impl std::future::Future<Output = ()>) -> Result<()> {
        tokio::select! {
            ended = &mut self.task => {
                for worker in take_workers(&self.workers) {
                    worker.abort();
                }
                match ended {
                    Ok(Ok(Ended::Left)) => {
                        tracing::info!(node = %self.node, "this node left the cluster; accord stops here");
                        Ok(())
                    }
                    Ok(Ok(Ended::Stopped)) => bail!("the node stopped by itself"),
                    Ok(Err(error)) => Err(error),
                    Err(panic) => Err(anyhow::anyhow!("the node task panicked: {panic}")),
                }
            }
            () = stop => self.stop().await,
        }
    }

    /// Stops the node as a crash would: every task dropped wherever it is. Open database
    /// transactions roll back when their connections close.
    pub async fn kill(self) {
        self.task.abort();
        let workers = take_workers(&self.workers);
        for worker in &workers {
            worker.abort();
        }
        let _ = self.task.await;
        for worker in workers {
            let _ = worker.await;
        }
    }
}

/// Takes in tables tagged since the last look (`tagging`), and says what it did and what it
/// could not.
async fn take_in_tagged_logged(db: &mut Client) {
    match tagging::take_in_tagged(db).await {
        Ok(tagging) => {
            for taken in tagging.taken_in {
                tracing::info!(
                    table = taken.table,
                    existing_rows = taken.rows,
                    "a table tagged `@accord replicate` joined replication"
                );
            }
            for table in tagging.left {
                tracing::info!(
                    table,
                    "a table no longer tagged `@accord replicate` left replication on this node"
                );
            }
        }
        Err(error) => tracing::warn!(
            error = format!("{error:#}"),
            "cannot take newly tagged tables into replication; trying again"
        ),
    }
}

/// How often the catalog is read for tables tagged `@accord replicate` since.
const TAGGING_EVERY: Duration = Duration::from_secs(2);

/// Every `every`, takes in tables tagged since and takes out those untagged (`tagging`), on its
/// own connection, and tells the appliers which tables the node left.
async fn watch_tagging(
    dsn: String,
    every: Duration,
    left: watch::Sender<Arc<BTreeSet<String>>>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut db = None;
    loop {
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = shutdown.changed() => return,
        }
        if db.as_ref().is_none_or(|c: &Client| c.is_closed()) {
            db = connect(&dsn).await.ok();
        }
        let Some(db) = db.as_mut() else { continue };
        take_in_tagged_logged(db).await;
        match tagging::left_tables(db).await {
            Ok(now) if now != **left.borrow() => {
                left.send_replace(Arc::new(now));
            }
            Ok(_) => {}
            Err(error) => tracing::warn!(error = format!("{error:#}"), "cannot read the tables this node left"),
        }
        // What an applier wrote of a left table before it heard of the leave.
        let names: Vec<String> = left.borrow().iter().cloned().collect();
        if !names.is_empty() {
            if let Err(error) = db
                .execute("DELETE FROM accord.row_meta WHERE table_name = ANY($1)", &[&names])
                .await
            {
                tracing::warn!(
                    error = format!("{error:#}"),
                    "cannot forget the metadata of tables this node left"
                );
            }
        }
    }
}

/// The capture's last error, until it makes progress again.
type CaptureError = Arc<Mutex<Option<String>>>;

pub fn wall_micros() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

/// Starts a node. `network` is given the node's identity (what peers are checked against) and the
/// source of its hellos, and returns the node's network port.
pub async fn start<F, Fut>(config: NodeConfig, network: F) -> Result<NodeHandle>
where
    F: FnOnce(LocalIdentity, HelloSource) -> Fut,
    Fut: std::future::Future<Output = Result<NetworkPort>>,
{
    let node = config.node;
    let mut db = connect(&config.dsn).await?;
    let row = db
        .query_opt("SELECT node_id, fingerprint FROM accord.node", &[])
        .await
        .context("cannot read accord.node: run `accord init` first")?;
    let Some(row) = row else {
        bail!("this database is not initialised: run `accord init` first")
    };
    let (stored_node, stored_fingerprint): (i32, String) = (row.get(0), row.get(1));
    if i64::from(stored_node) != i64::from(node.0) {
        bail!("this database is node {stored_node}, not node {node}");
    }

    super::join::ensure_joined(&db).await?;

    // Databases initialised by an earlier version lack some of accord's tables; once, here,
    // before anything needs them.
    db.batch_execute(store::DEFERRED_DDL)
        .await
        .context("cannot create accord.deferred")?;
    db.batch_execute(store::APPLIED_DDL)
        .await
        .context("cannot create accord.applied")?;
    db.batch_execute(store::APPLIED_MERGED_DDL)
        .await
        .context("cannot add accord.applied's merged stamp")?;
    db.batch_execute(super::rows::ROWS_WRITTEN_DDL)
        .await
        .context("cannot create accord.rows_written")?;
    db.batch_execute(store::REPAIRED_DDL)
        .await
        .context("cannot create accord.repaired")?;
    db.batch_execute(store::REVIEW_ROWS_DDL)
        .await
        .context("cannot index accord.review_items")?;
    db.batch_execute(members::MEMBERS_DDL)
        .await
        .context("cannot create accord.members")?;
    db.batch_execute(shapes::SHAPES_DDL)
        .await
        .context("cannot create accord.shapes")?;
    db.batch_execute(tagging::TAKE_IN_DDL)
        .await
        .context("cannot create accord.take_in")?;
    db.batch_execute(super::ddl_guard::GUARD_DDL)
        .await
        .context("cannot create accord's DDL guard")?;
    db.batch_execute(store::ROW_META_SHAPE_DDL)
        .await
        .context("cannot add accord.row_meta.shape")?;

    // Tables tagged or untagged while the node was down join or leave now, before the capture
    // starts.
    take_in_tagged_logged(&mut db).await;
    let policy = Arc::new(tagging::replicated_policy(&mut db).await?);
    let fingerprint = policy.fingerprint().to_string();
    if stored_fingerprint != fingerprint {
        // A migration ran while the node was down (issue 17): the capture reads the rows written
        // before it under their old shapes, and peers read the node's changes by column name.
        tracing::info!(
            before = stored_fingerprint,
            now = fingerprint,
            "the replicated tables changed since this node last ran; following them"
        );
        db.execute("UPDATE accord.node SET fingerprint = $1", &[&fingerprint])
            .await
            .context("cannot record the replicated tables' fingerprint")?;
    }
    for table in policy.tables() {
        shapes::record(&db, table, true)
            .await
            .context("cannot record the tables' shapes")?;
    }
    let known_shapes = shapes::load(&db).await.context("cannot read accord.shapes")?;
    let own_shapes: Vec<TableDef> = known_shapes
        .iter()
        .filter(|(_, own)| *own)
        .map(|(def, _)| def.clone())
        .collect();
    let shape_book = shapes::book(&known_shapes);
    let (shapes_tx, shapes_rx) = watch::channel(Arc::new(shape_book.clone()));
    let membership = load_membership(&db, &config).await?;
    if membership.has_left() {
        bail!(
            "node {node} has left the cluster (`accord leave`), and a node that left does not come back: \
             to bring this database in again, give it a new node_id and `accord join` it"
        );
    }
    let peers: Vec<NodeId> = membership.live_peers().iter().map(|m| m.node).collect();
    if peers.is_empty() {
        bail!(
            "node {node} has no peers: list them in the configuration ([[peers]]), or join a running cluster \
             with `accord join`"
        );
    }
    // Nor the triggers that make local inserts wait for an apply that locked their key, and
    // count local removals.
    let installed = key_locks::install_triggers(&db, policy.tables(), false).await?;
    if installed > 0 {
        tracing::info!(tables = installed, "installed accord's key-lock triggers");
    }
    // Nor the triggers that record what a TRUNCATE empties.
    let installed = truncate::install(&db, policy.tables(), false).await?;
    if installed > 0 {
        tracing::info!(tables = installed, "installed accord's TRUNCATE triggers");
    }

    let (shutdown, shutdown_rx) = watch::channel(false);
    let workers: Workers = Arc::default();
    let (left_tx, left_rx) = watch::channel(Arc::new(tagging::left_tables(&db).await?));
    workers
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .push(tokio::spawn(watch_tagging(
            config.dsn.clone(),
            TAGGING_EVERY,
            left_tx,
            shutdown_rx.clone(),
        )));

    let collection = store::load_collection(&db)
        .await
        .context("cannot read accord.collection: run `accord init` again (it adds what this version needs)")?;
    let collector = Collector::new(node, peers.iter().copied(), collection);
    let (cut_tx, cut_rx) = watch::channel(collector.cut().cloned());

    let (mut capture, capture_rx) = Capture::new(
        connect(&config.dsn).await?,
        Arc::clone(&policy),
        node,
        config.replication.max_offset_micros,
    )
    .await?;
    capture.follow_collection(cut_rx.clone());
    capture.follow_shapes(shapes_rx.clone());
    let recent = RecentChanges::shared(RECENT_CHANGES);
    capture.keep_recent(Arc::clone(&recent));
    let dsn = config.dsn.clone();
    let capture_error: CaptureError = Arc::default();
    let capture_failed = Arc::clone(&capture_error);
    let capture_task = tokio::spawn(async move {
        // The same failure again and again (a changed table, a database that is down) backs off
        // to one attempt every 30 s instead of filling the log.
        let mut pause = Duration::from_millis(500);
        loop {
            if let Err(error) = capture
                .run(&dsn)
                .instrument(tracing::info_span!("capture", node = %node))
                .await
            {
                let error = format!("{error:#}");
                tracing::error!(%node, error, retry_in = ?pause, "capture stopped; restarting");
                let mut last = capture_failed.lock().unwrap_or_else(|p| p.into_inner());
                if last.as_deref() == Some(error.as_str()) {
                    pause = (pause * 2).min(Duration::from_secs(30));
                } else {
                    pause = Duration::from_millis(500);
                }
                *last = Some(error);
            }
            tokio::time::sleep(pause).await;
        }
    });
    workers.lock().unwrap_or_else(|p| p.into_inner()).push(capture_task);

    let (applied_tx, applied_rx) = mpsc::channel::<ApplyReport>(64);
    let spawner = PeerSpawner {
        node,
        dsn: config.dsn.clone(),
        policy: Arc::clone(&policy),
        capture: capture_rx.clone(),
        ledger: SharedLedger::default(),
        cut: cut_rx.clone(),
        shapes: shapes_rx,
        left: left_rx,
        synchronous_commit: config.synchronous_commit,
        applied: applied_tx,
        waits: ApplyWaits::default(),
        spool_dir: config.spool.dir.clone(),
        workers: Arc::clone(&workers),
    };
    let mut apply_queues = BTreeMap::new();
    let mut peer_tasks = BTreeMap::new();
    let mut progress = Vec::new();
    for &peer in &peers {
        let (work, applied, tasks) = spawner.spawn(peer).await?;
        let acked = store::peer_acked(&db, peer).await?;
        progress.push((peer, PeerProgress { applied, acked }));
        apply_queues.insert(peer, work);
        peer_tasks.insert(peer, tasks);
    }
    let head = capture_rx.borrow().head;
    let pruned: Option<i64> = db
        .query_one("SELECT min(seq) - 1 FROM accord.outbound", &[])
        .await?
        .get(0);
    let pruned = pruned.map(|p| p as u64).unwrap_or(head);
    let replication = Replication::new(node, config.replication, head, pruned, progress.iter().copied());

    // Nodes that left keep their last applied position: collection rounds make their deletes
    // final with it.
    let mut positions: BTreeMap<NodeId, u64> = progress.iter().map(|(p, pp)| (*p, pp.applied)).collect();
    for (origin, seq) in store::recorded_applied(&db).await? {
        if membership.state_of(origin) == Some(MemberState::Left) {
            positions.entry(origin).or_insert(seq);
        }
    }
    let applied_positions: Arc<Mutex<BTreeMap<NodeId, u64>>> = Arc::new(Mutex::new(positions));
    let identity = LocalIdentity {
        cluster: config.cluster.clone(),
        node,
        fingerprint: fingerprint.clone(),
        max_offset_micros: config.replication.max_offset_micros,
    };
    let hello_source: HelloSource = {
        let positions = Arc::clone(&applied_positions);
        let (cluster, fingerprint) = (config.cluster.clone(), fingerprint.clone());
        Arc::new(move |peer| Hello {
            version: PROTOCOL_VERSION,
            cluster: cluster.clone(),
            node,
            fingerprint: fingerprint.clone(),
            hlc: Hlc::new(wall_micros(), 0, node),
            applied_yours: positions
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .get(&peer)
                .copied()
                .unwrap_or(0),
        })
    };
    let port = network(identity.clone(), hello_source).await?;
    // Every peer is in the status from the start: a status read before the loop's
    // first round must say "not connected", not leave the peer out.
    let (status_tx, status) = watch::channel(NodeStatus {
        node: node.0,
        started_micros: wall_micros(),
        head,
        peers: peers.iter().map(|&p| (p, PeerStatus::default())).collect(),
        ..NodeStatus::default()
    });
    let directory = port.peers.clone();
    let (verify_peers, verify_peers_rx) = watch::channel(Vec::new());
    let (verify, verify_out) = VerifyHub::new(node, config.dsn.clone(), capture_rx.clone(), verify_peers_rx);
    let looped = Loop {
        verify: verify.clone(),
        verify_peers,
        db,
        recent,
        replication,
        identity,
        port,
        apply_queues,
        spool_bound: config.spool.bound_bytes,
        applied_positions,
        status: status_tx,
        stats: BTreeMap::new(),
        captured: 0,
        persisted_acks: BTreeMap::new(),
        pending_apply: BTreeMap::new(),
        pending_acks: BTreeMap::new(),
        pending_refusals: Vec::new(),
        links: BTreeMap::new(),
        slow: SlowFigures::default(),
        last_slow: None,
        capture_error,
        processed_lsn: capture_rx.borrow().processed_lsn,
        durable: BTreeMap::new(),
        collector,
        cut: cut_tx,
        pending_collection: BTreeSet::new(),
        round_every: Duration::from_micros(config.replication.tombstone_round_micros),
        last_round: None,
        collected_round: 0,
        tombstones_collected: 0,
        capture_progress: capture_rx.clone(),
        apply_waits: spawner.waits.clone(),
        epoch: Instant::now(),
        membership,
        config_addresses: config.addresses.clone(),
        directory,
        pending_members: BTreeSet::new(),
        shapes: shape_book,
        own_shapes,
        shapes_tx,
        pending_shapes: BTreeSet::new(),
        capture_shapes: 0,
        recorded_not_known: BTreeMap::new(),
        peer_tasks,
        origins_to_drop: BTreeSet::new(),
        left_since: None,
        spawner,
    };
    looped.publish_peers();
    let task = tokio::spawn(
        looped
            .run(capture_rx, applied_rx, verify_out, shutdown_rx)
            .instrument(tracing::info_span!("node", node = %node)),
    );
    Ok(NodeHandle {
        node,
        verify,
        status,
        shutdown,
        task,
        workers,
    })
}

/// The membership this node starts with: what `accord.members` holds, and the configuration's
/// peers (and this node) for nodes it has no entry of, written back.
async fn load_membership(db: &Client, config: &NodeConfig) -> Result<Membership> {
    let node = config.node;
    let stored = members::load(db).await.context("cannot read accord.members")?;
    let mut membership = Membership::new(node, stored);
    let own = config.addresses.get(&node).cloned().unwrap_or_default();
    let seeds = config
        .peers
        .iter()
        .map(|&peer| (peer, config.addresses.get(&peer).cloned().unwrap_or_default()))
        .chain([(node, own)]);
    for (peer, address) in seeds {
        let seed = Member {
            node: peer,
            state: MemberState::Active,
            address,
            stamp: Hlc::zero(peer),
        };
        if membership.absorb(seed.clone()) {
            members::write(db, &seed).await.context("cannot write accord.members")?;
        }
    }
    Ok(membership)
}

/// What starting a peer's applier and spooler takes: at start, and when a node joins.
struct PeerSpawner {
    node: NodeId,
    dsn: String,
    policy: Arc<SchemaPolicy>,
    capture: watch::Receiver<CaptureProgress>,
    /// What the capture is known to have accounted for of local removals, for all appliers.
    ledger: SharedLedger,
    cut: watch::Receiver<Option<StableCut>>,
    shapes: watch::Receiver<Arc<ShapeBook>>,
    left: watch::Receiver<Arc<BTreeSet<String>>>,
    synchronous_commit: bool,
    applied: mpsc::Sender<ApplyReport>,
    waits: ApplyWaits,
    spool_dir: Option<PathBuf>,
    workers: Workers,
}

impl PeerSpawner {
    /// Starts `peer`'s applier and spooler. Returns where to hand them work, the peer's applied
    /// position, and the tasks (to stop them if the peer leaves).
    async fn spawn(&self, peer: NodeId) -> Result<(PeerWork, u64, Vec<AbortHandle>)> {
        let mut applier = Applier::connect(
            connect(&self.dsn).await?,
            connect(&self.dsn).await?,
            self.capture.clone(),
            Arc::clone(&self.ledger),
            peer,
            Arc::clone(&self.policy),
            self.synchronous_commit,
        )
        .await?;
        applier.follow_collection(self.cut.clone());
        applier.follow_shapes(self.shapes.clone());
        applier.follow_left(self.left.clone());
        let applied = applier.applied();
        let (apply, work) = mpsc::channel::<ApplyWork>(8);
        // Few parts in flight: each holds up to the spool bound in memory.
        let (spool, spool_work) = mpsc::channel::<SpoolWork>(2);
        let span = tracing::info_span!("peer", node = %self.node, peer = %peer);
        let applying = tokio::spawn(
            apply_worker(
                applier,
                self.dsn.clone(),
                work,
                self.applied.clone(),
                self.waits.clone(),
            )
            .instrument(span.clone()),
        );
        let spooling = tokio::spawn(spooler(peer, spool_work, self.spool_dir.clone()).instrument(span));
        let tasks = vec![applying.abort_handle(), spooling.abort_handle()];
        self.workers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .extend([applying, spooling]);
        Ok((PeerWork { apply, spool }, applied, tasks))
    }
}

/// A permit to send on a channel that had room, `None` if it is full.
fn room<T>(
    reserved: std::result::Result<mpsc::Permit<'_, T>, mpsc::error::TrySendError<()>>,
    peer: NodeId,
) -> Result<Option<mpsc::Permit<'_, T>>> {
    match reserved {
        Ok(permit) => Ok(Some(permit)),
        Err(mpsc::error::TrySendError::Full(())) => Ok(None),
        Err(mpsc::error::TrySendError::Closed(())) => bail!("the applier or spooler of node {peer} stopped"),
    }
}

/// Where the loop hands a peer's received transactions.
struct PeerWork {
    apply: mpsc::Sender<ApplyWork>,
    spool: mpsc::Sender<SpoolWork>,
}

/// The replication loop. It never waits for a full channel: a blocked send could close a cycle
/// (this loop waiting on a peer whose loop waits on this one). What cannot be handed on at once
/// waits in `pending_apply` and `pending_acks`, both bounded by the peers' windows.
struct Loop {
    verify: VerifyHub,
    /// The nodes a verification compares besides this one (the live peers).
    verify_peers: watch::Sender<Vec<NodeId>>,
    db: Client,
    /// The changes the capture committed last: batches are read from here when it holds them.
    recent: SharedRecentChanges,
    /// What appliers wait for (see `PeerStatus::apply_waiting`).
    apply_waits: ApplyWaits,
    replication: Replication,
    identity: LocalIdentity,
    port: NetworkPort,
    apply_queues: BTreeMap<NodeId, PeerWork>,
    /// `SpoolConfig::bound_bytes`, for the peers' apply queues.
    spool_bound: usize,
    applied_positions: Arc<Mutex<BTreeMap<NodeId, u64>>>,
    status: watch::Sender<NodeStatus>,
    stats: BTreeMap<NodeId, PeerStatus>,
    captured: u64,
    persisted_acks: BTreeMap<NodeId, u64>,
    pending_apply: BTreeMap<NodeId, ApplyQueue>,
    pending_acks: BTreeMap<NodeId, Message>,
    pending_refusals: Vec<(NodeId, u64, Message)>,
    /// The current connection to each connected peer.
    links: BTreeMap<NodeId, u64>,
    slow: SlowFigures,
    last_slow: Option<Instant>,
    capture_error: CaptureError,
    processed_lsn: u64,
    /// Per peer, how far its changes are applied on disk: what acknowledgements say.
    durable: BTreeMap<NodeId, u64>,
    /// This node's part in the tombstone-collection rounds.
    collector: Collector,
    /// The latest completed round, for the capture and the appliers.
    cut: watch::Sender<Option<StableCut>>,
    /// Peers that must be sent the collection state before any further batch: a batch may hold
    /// changes the capture numbered by a cut the peer has to know to merge them alike.
    pending_collection: BTreeSet<NodeId>,
    round_every: Duration,
    last_round: Option<Instant>,
    /// The round whose covered tombstones were deleted here.
    collected_round: u64,
    /// Tombstones deleted since the node started.
    tombstones_collected: u64,
    /// The capture's progress, read directly when acknowledging a round (the loop's own copy
    /// may lag behind what an applier already waited for).
    capture_progress: watch::Receiver<CaptureProgress>,
    /// The loop's steady clock, for the apply queues' bounded waits.
    epoch: Instant,
    /// Who is in the cluster (`engine::membership`), persisted in `accord.members`.
    membership: Membership,
    /// Peers' addresses as this node's configuration names them: used before the membership's.
    config_addresses: BTreeMap<NodeId, String>,
    /// Where the network learns the peers to keep links to (`None` on the in-memory hub).
    directory: Option<PeerDirectory>,
    /// Peers that must be sent this node's membership.
    pending_members: BTreeSet<NodeId>,
    /// The shapes this node knows (`engine::shape`), its peers' included; the appliers read
    /// changes against what `shapes_tx` publishes of it.
    shapes: ShapeBook,
    /// The shapes this node wrote changes under: every peer is told them before any batch.
    own_shapes: Vec<TableDef>,
    shapes_tx: watch::Sender<Arc<ShapeBook>>,
    pending_shapes: BTreeSet<NodeId>,
    /// `CaptureProgress::shapes` as last seen.
    capture_shapes: u64,
    /// What `accord.members.not_known_by` says, per node, as last written.
    recorded_not_known: BTreeMap<NodeId, Vec<NodeId>>,
    /// Each peer's applier and spooler.
    peer_tasks: BTreeMap<NodeId, Vec<AbortHandle>>,
    /// Replication origins of nodes that left, dropped once their appliers' sessions are gone.
    origins_to_drop: BTreeSet<NodeId>,
    /// Since when this node knows it left the cluster.
    left_since: Option<Instant>,
    spawner: PeerSpawner,
}

/// What a node sends its peers whole whenever it changes.
#[derive(Clone, Copy)]
enum SharedState {
    Collection,
    Members,
    Shapes,
}

/// How long a node that left waits for its peers to hear it before it stops anyway.
const LEAVE_GRACE: Duration = Duration::from_secs(30);

/// Status figures that take a query or a time window, refreshed about once a second.
#[derive(Default)]
struct SlowFigures {
    review_open: u64,
    parked_open: u64,
    tombstones: u64,
    outbound_lag_secs: BTreeMap<NodeId, f64>,
    /// Per peer: when the applied count was last sampled, and the count then.
    samples: BTreeMap<NodeId, (Instant, u64)>,
    applied_per_sec: BTreeMap<NodeId, f64>,
}

/// How often pings and the slow status figures go out.
const SLOW_EVERY: Duration = Duration::from_secs(1);

impl Loop {
    async fn run(
        mut self,
        mut capture: watch::Receiver<CaptureProgress>,
        mut applied: mpsc::Receiver<ApplyReport>,
        mut verify_out: mpsc::UnboundedReceiver<(NodeId, VerifyMessage)>,
        mut shutdown: watch::Receiver<bool>,
    ) -> Result<Ended> {
        let mut tick = tokio::time::interval(Duration::from_millis(200));
        // Retries what could not be handed on because a channel was full.
        let mut retry = tokio::time::interval(Duration::from_millis(5));
        retry.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let ended = loop {
            if self.has_left_for_good() {
                break Ended::Left;
            }
            tokio::select! {
                _ = shutdown.changed() => break Ended::Stopped,
                event = self.port.events.recv() => match event {
                    Some(event) => self.on_event(event).await?,
                    None => bail!("the network stopped"),
                },
                changed = capture.changed() => {
                    if changed.is_err() {
                        bail!("the capture stopped");
                    }
                    let p = *capture.borrow_and_update();
                    // A restarted capture republishes where it stands; only reading further shows
                    // that whatever stopped it is over.
                    if p.processed_lsn > self.processed_lsn {
                        self.processed_lsn = p.processed_lsn;
                        *self.capture_error.lock().unwrap_or_else(|p| p.into_inner()) = None;
                    }
                    if p.shapes > self.capture_shapes {
                        self.capture_shapes = p.shapes;
                        self.own_shapes_changed().await?;
                    }
                    self.replication.logged(p.head);
                    self.captured = p.captured;
                }
                Some(report) = applied.recv() => match report {
                    ApplyReport::Batch(done) => self.on_applied(done).await?,
                    ApplyReport::Durable { peer, durable } => self.on_durable(peer, durable),
                },
                Some((peer, message)) = verify_out.recv() => match self.links.get(&peer) {
                    Some(&link) => self.pending_refusals.push((peer, link, Message::Verify(message))),
                    None => self.verify.undeliverable(peer, message),
                },
                _ = tick.tick() => self.housekeeping().await?,
                _ = retry.tick(), if self.has_pending() => {}
            }
            self.flush_state(SharedState::Collection);
            self.flush_state(SharedState::Members);
            self.flush_state(SharedState::Shapes);
            self.flush_apply()?;
            self.flush_outbox();
            self.send_batches().await?;
            self.publish_status();
        };
        // Acknowledgements of what was applied go out before the connections close, so peers
        // need not resend it.
        self.flush_outbox();
        self.housekeeping().await?;
        Ok(ended)
    }

    async fn on_event(&mut self, event: PeerEvent) -> Result<()> {
        match event {
            PeerEvent::Up { peer, link, hello } => {
                if let Err(refusal) = self.identity.check(&hello, wall_micros()) {
                    tracing::error!(%peer, %refusal, "refusing peer");
                    self.stats.entry(peer).or_default().last_error = Some(refusal.to_string());
                    self.pending_refusals.push((peer, link, Message::Refused(refusal)));
                    return Ok(());
                }
                if !self.apply_queues.contains_key(&peer) {
                    // The in-memory hub links every node; QUIC already refused it.
                    tracing::warn!(%peer, "refusing a node that is not a member");
                    let refusal = Refusal::UnknownPeer { node: peer };
                    self.pending_refusals.push((peer, link, Message::Refused(refusal)));
                    return Ok(());
                }
                match self.replication.connected(peer, hello.applied_yours) {
                    Ok(()) => {
                        tracing::info!(%peer, resume_after = hello.applied_yours, "peer connected");
                        self.links.insert(peer, link);
                        self.pending_collection.insert(peer);
                        self.pending_members.insert(peer);
                        self.pending_shapes.insert(peer);
                        self.stats.entry(peer).or_default().since_micros = Some(wall_micros());
                    }
                    Err(error) => {
                        tracing::error!(%peer, %error, "cannot replicate to peer");
                        self.stats.entry(peer).or_default().last_error = Some(error.to_string());
                    }
                }
            }
            PeerEvent::Down { peer, link, reason } => {
                if self.links.get(&peer) == Some(&link) {
                    tracing::info!(%peer, reason, "peer disconnected");
                    self.links.remove(&peer);
                    self.replication.disconnected(peer);
                    let stats = self.stats.entry(peer).or_default();
                    stats.since_micros = Some(wall_micros());
                    stats.last_error = Some(reason);
                }
            }
            PeerEvent::Rejected { peer, reason } => {
                if let Some(peer) = peer.filter(|p| self.links.contains_key(p) || self.apply_queues.contains_key(p)) {
                    self.stats.entry(peer).or_default().last_error = Some(reason);
                }
            }
            PeerEvent::Message { peer, .. } if !self.apply_queues.contains_key(&peer) => {}
            PeerEvent::Message { peer, message } => match message {
                Message::Batch(changes) => match self.replication.received(peer, &changes, wall_micros()) {
                    Ok([]) => {
                        // A resend of what was applied already: say again how far we got, or
                        // the sender's acknowledged position stays behind.
                        let applied = match self.durable.get(&peer) {
                            Some(&durable) => durable,
                            None => self.replication.progress(peer)?.applied,
                        };
                        self.pending_acks.insert(peer, Message::Ack { applied });
                    }
                    Ok(fresh) => {
                        let bound = self.spool_bound;
                        self.pending_apply
                            .entry(peer)
                            .or_insert_with(|| {
                                let mut queue = ApplyQueue::new();
                                queue.set_spool_bound(Some(bound));
                                queue
                            })
                            .push(fresh.iter().cloned())
                    }
                    Err(error) => {
                        tracing::error!(%peer, %error, "refusing a batch; dropping the connection state");
                        self.links.remove(&peer);
                        self.replication.disconnected(peer);
                    }
                },
                Message::Ack { applied } => {
                    if let Err(error) = self.replication.acked(peer, applied) {
                        tracing::warn!(%peer, %error, "ignoring acknowledgement");
                    }
                }
                Message::Refused(refusal) => tracing::error!(%peer, %refusal, "peer refused this node"),
                Message::Ping { head, .. } => self.stats.entry(peer).or_default().peer_head = head,
                Message::Collection(state) => {
                    if self.collector.merge(&state) {
                        self.collection_changed().await?;
                    }
                }
                Message::Members(theirs) => {
                    let changed = self.membership.merge_from(peer, &theirs);
                    if !changed.is_empty() {
                        self.members_changed(&changed).await?;
                    }
                }
                Message::Shapes(theirs) => self.learn_shapes(peer, theirs).await?,
                Message::Verify(message) => self.verify.deliver(peer, message),
                Message::Hello(_) => {}
            },
        }
        Ok(())
    }

    async fn on_applied(&mut self, done: Applied) -> Result<()> {
        let peer = done.peer;
        let (upto, summary) = done.result?;
        // Peers resume from, acknowledge and prune by the durable position only.
        self.durable.insert(peer, done.durable.min(upto));
        if let Some(stamp) = done.last_stamp {
            self.stats.entry(peer).or_default().last_applied_micros = Some(stamp.physical);
        }
        let stats = self.stats.entry(peer).or_default();
        stats.applied_changes += summary.applied;
        stats.parked += summary.parked;
        stats.conflicts.add(&summary.conflicts);
        stats.capture_waits += summary.waits;
        stats.keys_clear += summary.keys_clear;
        stats.apply_deadlocks += done.deadlocks;
        self.replication.applied(peer, upto)?;
        self.acknowledge(peer);
        Ok(())
    }

    /// A flush beside the peer's batches learned that its changes are on disk up to `durable`
    /// (never beyond what its batches reported applied: the applier's `AppliedPosition`).
    fn on_durable(&mut self, peer: NodeId, durable: u64) {
        // A peer that left has no entry, and gets none back.
        if let Some(known) = self.durable.get_mut(&peer) {
            *known = (*known).max(durable);
            self.acknowledge(peer);
        }
    }

    /// Publishes the peer's durable position, and acknowledges it to the peer.
    fn acknowledge(&mut self, peer: NodeId) {
        let Some(&durable) = self.durable.get(&peer) else {
            return;
        };
        self.applied_positions
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(peer, durable);
        if self.replication.is_connected(peer) {
            // Acknowledgements are cumulative: only the latest one needs to go out.
            self.pending_acks.insert(peer, Message::Ack { applied: durable });
        }
    }

    fn has_pending(&self) -> bool {
        !self.pending_collection.is_empty()
            || !self.pending_shapes.is_empty()
            || !self.pending_acks.is_empty()
            || !self.pending_refusals.is_empty()
            || self.pending_apply.values().any(ApplyQueue::has_batch)
    }

    /// Hands received transactions to the appliers, as far as their queues have room and what
    /// they build on is applied (committed) here.
    fn flush_apply(&mut self) -> Result<()> {
        let now = u64::try_from(self.epoch.elapsed().as_micros()).unwrap_or(u64::MAX);
        for (peer, pending) in &mut self.pending_apply {
            let Some(queue) = self.apply_queues.get(peer) else {
                pending.clear();
                continue;
            };
            // Room first, then the handout: the end of a spooled transaction cannot be put back.
            loop {
                if pending.next_is_spool() {
                    let Some(permit) = room(queue.spool.try_reserve(), *peer)? else {
                        break;
                    };
                    let first = pending.in_flight().is_none_or(|f| f.spooled_bytes == 0);
                    let Some(Handout::Spool(changes)) = pending.next_handout(MAX_APPLY_BATCH, &self.replication, now)
                    else {
                        bail!("the apply queue of node {peer} did not hand out the part to spool it announced");
                    };
                    let stats = self.stats.entry(*peer).or_default();
                    if first {
                        stats.spooled_transactions += 1;
                        tracing::info!(%peer, first = changes.first().map(|c| c.seq), "spooling a large transaction to disk while it arrives");
                    }
                    stats.spooled_bytes += changes.iter().map(|c| c.approx_bytes() as u64).sum::<u64>();
                    permit.send(SpoolWork::Part(changes));
                    continue;
                }
                let Some(apply) = room(queue.apply.try_reserve(), *peer)? else {
                    break;
                };
                let Some(seal) = room(queue.spool.try_reserve(), *peer)? else {
                    break;
                };
                let Some(handout) = pending.next_handout(MAX_APPLY_BATCH, &self.replication, now) else {
                    break;
                };
                for waived in pending.take_waived() {
                    tracing::warn!(
                        %peer,
                        node = %waived.node,
                        through = waived.through,
                        "applying a transaction before node {}'s changes it builds on: that node is unreachable; \
                         readers may see part of its transactions until they arrive",
                        waived.node
                    );
                    self.stats.entry(*peer).or_default().causal_waivers += 1;
                }
                match handout {
                    Handout::Batch(batch) => apply.send(ApplyWork::Batch(batch)),
                    Handout::SpooledEnd(tail) => {
                        let (reply, spool) = oneshot::channel();
                        seal.send(SpoolWork::Seal(reply));
                        apply.send(ApplyWork::Spooled { spool, tail });
                    }
                    Handout::Spool(_) => bail!("the apply queue of node {peer} handed out a part to spool unannounced"),
                }
            }
        }
        Ok(())
    }

    fn flush_outbox(&mut self) {
        let mut queued: Vec<(NodeId, u64, Message)> = std::mem::take(&mut self.pending_refusals);
        for (peer, message) in std::mem::take(&mut self.pending_acks) {
            // An acknowledgement for a peer that is not connected goes out after its next hello.
            if let Some(&link) = self.links.get(&peer) {
                queued.push((peer, link, message));
            }
        }
        let mut rest = queued.into_iter();
        for (peer, link, message) in rest.by_ref() {
            if let Ok(permit) = self.port.outbox.try_reserve() {
                permit.send(Outgoing { peer, link, message });
                continue;
            }
            self.requeue(peer, link, message);
            break;
        }
        for (peer, link, message) in rest {
            self.requeue(peer, link, message);
        }
    }

    fn requeue(&mut self, peer: NodeId, link: u64, message: Message) {
        match message {
            Message::Ack { .. } => {
                self.pending_acks.entry(peer).or_insert(message);
            }
            other => self.pending_refusals.push((peer, link, other)),
        }
    }

    /// Sends every batch the window allows, while the network takes them.
    async fn send_batches(&mut self) -> Result<()> {
        let peers: Vec<NodeId> = self.replication.peers().collect();
        for peer in peers {
            let Some(&link) = self.links.get(&peer) else { continue };
            if self.pending_collection.contains(&peer) || self.pending_shapes.contains(&peer) {
                continue;
            }
            loop {
                let Ok(permit) = self.port.outbox.try_reserve() else {
                    return Ok(());
                };
                let Some(range) = self.replication.next_batch(peer) else {
                    break;
                };
                let changes = self.read_outbound(*range.start(), *range.end()).await?;
                if let Some(last) = changes.last() {
                    self.replication.sent_through(peer, last.tx_last);
                }
                permit.send(Outgoing {
                    peer,
                    link,
                    message: Message::Batch(changes),
                });
            }
        }
        Ok(())
    }

    async fn read_outbound(&self, first: u64, last: u64) -> Result<Vec<RowChange>> {
        let recent = self.recent.lock().unwrap_or_else(|p| p.into_inner()).range(first, last);
        if let Some(changes) = recent {
            return Ok(changes);
        }
        let rows = self
            .db
            .query(
                "SELECT change FROM accord.outbound WHERE seq BETWEEN $1 AND $2 ORDER BY seq",
                &[&(first as i64), &(last as i64)],
            )
            .await?;
        if rows.len() as u64 != last - first + 1 {
            bail!("the outbound log lacks changes {first}..={last} (found {})", rows.len());
        }
        rows.iter()
            .map(|row| decode("change", row.get::<_, &[u8]>(0)))
            .collect::<Result<_, StoreError>>()
            .map_err(Into::into)
    }

    /// Sends the collection state, or the membership, to the peers that need it (the collection
    /// state before their next batch). A peer not connected gets it on its next connection,
    /// which marks it again.
    fn flush_state(&mut self, state: SharedState) {
        let pending = match state {
            SharedState::Collection => &self.pending_collection,
            SharedState::Members => &self.pending_members,
            SharedState::Shapes => &self.pending_shapes,
        };
        let peers: Vec<NodeId> = pending.iter().copied().collect();
        for peer in peers {
            if let Some(&link) = self.links.get(&peer) {
                let Ok(permit) = self.port.outbox.try_reserve() else {
                    return;
                };
                let message = match state {
                    SharedState::Collection => Message::Collection(self.collector.state().clone()),
                    SharedState::Members => Message::Members(self.membership.to_vec()),
                    SharedState::Shapes => Message::Shapes(self.own_shapes.clone()),
                };
                permit.send(Outgoing { peer, link, message });
            }
            match state {
                SharedState::Collection => self.pending_collection.remove(&peer),
                SharedState::Members => self.pending_members.remove(&peer),
                SharedState::Shapes => self.pending_shapes.remove(&peer),
            };
        }
    }

    /// The capture recorded a new shape of a table: learned, and told to every peer before any
    /// batch that could name it.
    async fn own_shapes_changed(&mut self) -> Result<()> {
        let known = shapes::load(&self.db).await.context("cannot read accord.shapes")?;
        self.own_shapes = known
            .iter()
            .filter(|(_, own)| *own)
            .map(|(def, _)| def.clone())
            .collect();
        self.shapes = shapes::book(&known);
        self.shapes_tx.send_replace(Arc::new(self.shapes.clone()));
        self.pending_shapes.extend(self.links.keys().copied());
        Ok(())
    }

    /// Records the shapes a peer describes that this node did not know (persisted first: a change
    /// kept for later names its shape), and lets the appliers read changes written under them.
    async fn learn_shapes(&mut self, peer: NodeId, theirs: Vec<TableDef>) -> Result<()> {
        let mut learned = false;
        for def in theirs {
            if self.shapes.get(def.shape_id()).is_some() {
                continue;
            }
            if let Err(error) = def.validate() {
                tracing::warn!(%peer, %error, "ignoring a malformed shape from the peer");
                continue;
            }
            shapes::record(&self.db, &def, false)
                .await
                .context("cannot record a peer's shape")?;
            tracing::info!(%peer, table = def.name, shape = %def.shape_id(), "learned a shape of a table from the peer");
            self.shapes.learn(def);
            learned = true;
        }
        if learned {
            self.shapes_tx.send_replace(Arc::new(self.shapes.clone()));
        }
        Ok(())
    }

    /// Persists a changed collection state, then lets the capture, the appliers and every peer
    /// know. Persisted first: an acknowledgement is a promise that must survive a crash.
    async fn collection_changed(&mut self) -> Result<()> {
        store::save_collection(&self.db, self.collector.state()).await?;
        let cut = self.collector.cut().cloned();
        self.cut.send_if_modified(|current| {
            if *current == cut {
                return false;
            }
            if let Some(cut) = &cut {
                tracing::info!(round = cut.round, "tombstone-collection round complete");
            }
            *current = cut;
            true
        });
        self.pending_collection.extend(self.links.keys().copied());
        Ok(())
    }

    /// Drives this node's part in the tombstone-collection rounds, and deletes what a completed
    /// round covers.
    async fn collection_round(&mut self) -> Result<()> {
        let mut changed = false;
        let due = self.last_round.is_none_or(|t| t.elapsed() >= self.round_every) || self.collector.is_stale();
        if self.collector.is_coordinator() && due {
            if self.collector.start_round() {
                tracing::debug!(
                    round = self.collector.state().round,
                    "tombstone-collection round started"
                );
                changed = true;
            }
            self.last_round = Some(Instant::now());
        }
        // Applied positions first, the capture head after: the head then covers every local
        // write an applier waited for before applying what these positions include.
        let applied: Vec<(NodeId, u64)> = self
            .applied_positions
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|(&peer, &position)| (peer, position))
            .collect();
        if self.collector.wants_ack1() {
            let head = self.capture_progress.borrow().head;
            self.collector.ack1(head, &applied);
            changed = true;
        }
        if self.collector.wants_ack2(&applied) {
            self.collector.ack2();
            changed = true;
        }
        if changed {
            self.collection_changed().await?;
        }
        if let Some(cut) = self.collector.cut().cloned() {
            if cut.round > self.collected_round {
                // Not worth stopping the node for: what stays is collected on the next try.
                match store::collect_tombstones(&self.db, &cut).await {
                    Ok(deleted) => {
                        tracing::info!(round = cut.round, deleted, "tombstones collected");
                        self.tombstones_collected += deleted;
                        self.collected_round = cut.round;
                    }
                    Err(error) => tracing::warn!(round = cut.round, %error, "collecting tombstones failed; retrying"),
                }
            }
        }
        Ok(())
    }

    /// Persists acknowledgements and prunes the outbound log.
    async fn housekeeping(&mut self) -> Result<()> {
        let slow = self.last_slow.is_none_or(|t| t.elapsed() >= SLOW_EVERY);
        if slow {
            // Before pruning: a node `accord join` registered here keeps the log from now on.
            self.refresh_members().await?;
        }
        self.collection_round().await?;
        self.publish_peers();
        self.drop_left_origins().await;
        let peers: Vec<NodeId> = self.replication.peers().collect();
        for peer in peers {
            let acked = self.replication.progress(peer)?.acked;
            if self.persisted_acks.get(&peer) != Some(&acked) {
                self.db
                    .execute(
                        "INSERT INTO accord.peer_progress (peer, acked) VALUES ($1, $2)
                         ON CONFLICT (peer) DO UPDATE SET acked = EXCLUDED.acked, updated_at = now()",
                        &[&(peer.0 as i32), &(acked as i64)],
                    )
                    .await?;
                self.persisted_acks.insert(peer, acked);
            }
        }
        let prune = self.replication.prune_point();
        self.db
            .execute("DELETE FROM accord.outbound WHERE seq <= $1", &[&(prune as i64)])
            .await?;
        self.recent
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .forget_through(prune);
        self.replication.pruned(prune);
        if slow {
            self.last_slow = Some(Instant::now());
            self.send_pings();
            self.refresh_slow_figures().await?;
        }
        Ok(())
    }

    /// Takes in what `accord join` and `accord leave` wrote into `accord.members`, and records
    /// which nodes have not heard of each entry yet (what those commands wait for).
    async fn refresh_members(&mut self) -> Result<()> {
        let stored = members::load(&self.db).await.context("cannot read accord.members")?;
        let changed: Vec<NodeId> = stored
            .into_iter()
            .filter_map(|m| {
                let node = m.node;
                self.membership.absorb(m).then_some(node)
            })
            .collect();
        if !changed.is_empty() {
            self.members_changed(&changed).await?;
        }
        let nodes: Vec<NodeId> = self.membership.members().map(|m| m.node).collect();
        for node in nodes {
            let not_known = self.membership.not_known_by(node);
            if self.recorded_not_known.get(&node) != Some(&not_known) {
                members::record_not_known_by(&self.db, node, &not_known).await?;
                self.recorded_not_known.insert(node, not_known);
            }
        }
        Ok(())
    }

    /// Persists changed entries, tells every peer, and follows the change: links to nodes that
    /// joined, none to nodes that left.
    async fn members_changed(&mut self, changed: &[NodeId]) -> Result<()> {
        for &node in changed {
            if let Some(member) = self.membership.get(node) {
                tracing::info!(member = %node, state = %member.state, address = member.address, "membership changed");
                members::write(&self.db, member)
                    .await
                    .context("cannot write accord.members")?;
                self.recorded_not_known.remove(&node);
            }
        }
        self.pending_members.extend(self.links.keys().copied());
        let live: Vec<NodeId> = self.membership.live_peers().iter().map(|m| m.node).collect();
        let change = self.replication.membership_change(&live);
        for peer in change.joined {
            self.add_peer(peer).await?;
        }
        for peer in change.left {
            // A last word, so that a node that left learns its peers heard it (the link closes
            // at the next housekeeping round, when the network hears of the change).
            if let Some(&link) = self.links.get(&peer) {
                let farewell = Message::Members(self.membership.to_vec());
                self.pending_refusals.push((peer, link, farewell));
            }
            self.remove_peer(peer).await?;
        }
        self.collector.set_peers(live.iter().copied());
        if self.membership.has_left() && self.left_since.is_none() {
            tracing::info!("this node left the cluster; stopping once its peers know");
            self.left_since = Some(Instant::now());
        }
        Ok(())
    }

    async fn add_peer(&mut self, peer: NodeId) -> Result<()> {
        let (work, applied, tasks) = self.spawner.spawn(peer).await?;
        let acked = store::peer_acked(&self.db, peer).await?;
        self.replication.add_peer(peer, PeerProgress { applied, acked });
        let acked = self.replication.progress(peer)?.acked;
        self.apply_queues.insert(peer, work);
        self.peer_tasks.insert(peer, tasks);
        self.applied_positions
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(peer, applied);
        self.origins_to_drop.remove(&peer);
        tracing::info!(%peer, applied, acked, "a node joined: replicating with it");
        Ok(())
    }

    async fn remove_peer(&mut self, peer: NodeId) -> Result<()> {
        self.apply_queues.remove(&peer);
        for task in self.peer_tasks.remove(&peer).unwrap_or_default() {
            task.abort();
        }
        self.replication.remove_peer(peer);
        self.links.remove(&peer);
        self.pending_apply.remove(&peer);
        self.pending_acks.remove(&peer);
        self.pending_collection.remove(&peer);
        self.pending_members.remove(&peer);
        self.pending_shapes.remove(&peer);
        self.durable.remove(&peer);
        self.persisted_acks.remove(&peer);
        self.stats.remove(&peer);
        self.db
            .execute("DELETE FROM accord.peer_progress WHERE peer = $1", &[&(peer.0 as i32)])
            .await?;
        self.origins_to_drop.insert(peer);
        tracing::info!(%peer, "a node left: no more replication with it");
        Ok(())
    }

    /// Drops the replication origins of nodes that left, once no session holds them (the aborted
    /// applier's connection closes shortly after). `accord.applied` keeps their last position.
    async fn drop_left_origins(&mut self) {
        for peer in self.origins_to_drop.clone() {
            let dropped = self
                .db
                .execute(
                    "SELECT pg_replication_origin_drop(roname) FROM pg_replication_origin WHERE roname = $1",
                    &[&store::origin_name(peer)],
                )
                .await;
            match dropped {
                Ok(_) => {
                    tracing::info!(%peer, "dropped the replication origin of a node that left");
                    self.origins_to_drop.remove(&peer);
                }
                Err(error) => tracing::debug!(%peer, %error, "the origin of a node that left is still held; retrying"),
            }
        }
    }

    /// Tells the network which peers to keep links to, and where they are.
    fn publish_peers(&self) {
        let live: Vec<NodeId> = self.membership.live_peers().into_iter().map(|m| m.node).collect();
        self.verify_peers.send_if_modified(|current| {
            let changed = *current != live;
            *current = live;
            changed
        });
        let Some(directory) = &self.directory else { return };
        let peers: BTreeMap<NodeId, String> = self
            .membership
            .live_peers()
            .into_iter()
            .map(|m| {
                let address = self
                    .config_addresses
                    .get(&m.node)
                    .filter(|a| !a.is_empty())
                    .cloned()
                    .unwrap_or_else(|| m.address.clone());
                (m.node, address)
            })
            .collect();
        directory.send_if_modified(|current| {
            let changed = *current != peers;
            *current = peers;
            changed
        });
    }

    /// This node left, and every peer has heard (or the grace period is over).
    fn has_left_for_good(&self) -> bool {
        self.left_since.is_some_and(|since| {
            self.membership.not_known_by(self.membership.me()).is_empty() || since.elapsed() >= LEAVE_GRACE
        })
    }

    /// Tells every connected peer the head of our outbound log, for its lag figures.
    fn send_pings(&mut self) {
        let head = self.replication.head();
        let hlc = Hlc::new(wall_micros(), 0, self.replication.node());
        for (&peer, &link) in &self.links {
            let Ok(permit) = self.port.outbox.try_reserve() else {
                // The network is busy with batches, which say more than a ping would.
                return;
            };
            permit.send(Outgoing {
                peer,
                link,
                message: Message::Ping { hlc, head },
            });
        }
    }

    async fn refresh_slow_figures(&mut self) -> Result<()> {
        let row = self
            .db
            .query_one(
                "SELECT count(*), count(*) FILTER (WHERE kind = 'unapplicable')
                 FROM accord.review_items WHERE status = 'open'",
                &[],
            )
            .await
            .context("cannot count the open review items")?;
        self.slow.review_open = row.get::<_, i64>(0) as u64;
        self.slow.parked_open = row.get::<_, i64>(1) as u64;
        let row = self
            .db
            .query_one("SELECT count(*) FROM accord.row_meta WHERE NOT alive", &[])
            .await
            .context("cannot count the tombstones")?;
        self.slow.tombstones = row.get::<_, i64>(0) as u64;
        let peers: Vec<NodeId> = self.replication.peers().collect();
        for peer in peers {
            let acked = self.replication.progress(peer)?.acked;
            let lag = if acked < self.replication.head() {
                self.db
                    .query_opt(
                        "SELECT extract(epoch FROM now() - captured_at)::float8 FROM accord.outbound WHERE seq = $1",
                        &[&((acked + 1) as i64)],
                    )
                    .await
                    .context("cannot read the outbound log")?
                    .map(|r| r.get::<_, f64>(0).max(0.0))
                    .unwrap_or(0.0)
            } else {
                0.0
            };
            self.slow.outbound_lag_secs.insert(peer, lag);
            let applied = self.stats.get(&peer).map_or(0, |s| s.applied_changes);
            let now = Instant::now();
            if let Some((then, before)) = self.slow.samples.insert(peer, (now, applied)) {
                let secs = now.duration_since(then).as_secs_f64();
                if secs > 0.0 {
                    let rate = applied.saturating_sub(before) as f64 / secs;
                    self.slow.applied_per_sec.insert(peer, rate);
                }
            }
        }
        Ok(())
    }

    fn publish_status(&mut self) {
        let old = self.status.borrow();
        let mut status = NodeStatus {
            node: old.node,
            started_micros: old.started_micros,
            head: self.replication.head(),
            captured: self.captured,
            review_open: self.slow.review_open,
            parked_open: self.slow.parked_open,
            capture_error: self.capture_error.lock().unwrap_or_else(|p| p.into_inner()).clone(),
            tombstones: self.slow.tombstones,
            collection_round: self.collector.cut().map_or(0, |c| c.round),
            tombstones_collected: self.tombstones_collected,
            peers: BTreeMap::new(),
            members: self
                .membership
                .members()
                .map(|m| (m.node.0, m.state.to_string()))
                .collect(),
        };
        drop(old);
        let now = wall_micros();
        for peer in self.replication.peers() {
            let mut s = self.stats.get(&peer).cloned().unwrap_or_default();
            s.connected = self.replication.is_connected(peer);
            s.progress = self.replication.progress(peer).unwrap_or_default();
            s.unacked = self.replication.unacked(peer).unwrap_or(0);
            s.outbound_lag_secs = if s.unacked == 0 {
                0.0
            } else {
                self.slow.outbound_lag_secs.get(&peer).copied().unwrap_or(0.0)
            };
            s.inbound_lag_changes = s.peer_head.saturating_sub(s.progress.applied);
            s.inbound_lag_secs = if s.inbound_lag_changes == 0 {
                Some(0.0)
            } else {
                s.last_applied_micros.map(|t| now.saturating_sub(t) as f64 / 1e6)
            };
            s.applied_per_sec = self.slow.applied_per_sec.get(&peer).copied().unwrap_or(0.0);
            let queue = self.pending_apply.get(&peer);
            let in_flight = queue.and_then(ApplyQueue::in_flight).unwrap_or_default();
            s.incomplete_transaction_changes = in_flight.changes;
            s.in_flight_bytes = in_flight.bytes;
            s.in_flight_spooled_bytes = in_flight.spooled_bytes;
            s.apply_waiting = self
                .apply_waits
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .get(&peer)
                .cloned();
            s.waiting_for = queue.and_then(ApplyQueue::held).map(|d| (d.node, d.through));
            status.peers.insert(peer, s);
        }
        self.status.send_if_modified(|old| {
            let changed = *old != status;
            *old = status;
            changed
        });
    }
}
