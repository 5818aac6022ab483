//! One simulated accord node beside its database, driving the real engine state machines the way
//! the service does (HARD-PARTS.md): local transactions go into the WAL; the capture decodes the
//! WAL with lag through `Capturer` and persists changes, metadata and checkpoint in one step; the
//! replication links (`Replication`) send the outbound log and accept peers' batches; the apply
//! merges a batch with `merge` in one transaction that also records the applied position and
//! writes the `accord.hlc` stamp into the WAL.
//!
//! Only `db` (and `membership`, which the service keeps in its database) survives a crash;
//! `Volatile` is what the process holds in memory.

use std::collections::BTreeMap;
use std::sync::Arc;

use accord_engine::{
    transactions_before_waiting, AppliedPosition, ApplyError, ApplyInput, ApplyQueue, ApplyRules, BatchApply,
    CapturedChange, Capturer, Cell, ChangeKind, CollectionState, Collector, DecodedRow, DecodedTransaction, Handout,
    Hello, Hlc, LocalIdentity, Member, MemberState, Membership, Message, NodeId, NodeSchema, Refusal, RemovalLedger,
    Replication, ReplicationConfig, ReplicationError, ReviewAction, RowChange, Segments, ShapeBook, StableCut,
    TableDef, Truncate, MAX_APPLY_BATCH, PROTOCOL_VERSION,
};

use crate::apply::{Applying, Committed, DriverError, Resume, RunEnv, Stop, Waiting};
use crate::config::PlantedBug;
use crate::db::{apply_review, AppliedNote, Db, MetaRow, QueueEntry, UserRow, WalBody, WalRow, WriteId};
use crate::oracle::Oracle;
use crate::outcome::{Failure, Invariant, Stats};
use crate::rng::SimRng;
use crate::swarm::Params;
use crate::table::{key_of, row_key};
use crate::trace::{mix, Trace};
use crate::workload::TxPlan;

pub const CLUSTER: &str = "sim";
pub const FINGERPRINT: &str = "shop.items:lww,delta,review";

/// What a node asks of the world around it.
#[derive(Debug)]
pub enum Output {
    Send {
        to: usize,
        msg: Message,
    },
    Timer {
        at: u64,
        timer: Timer,
    },
    /// Close the connection to this peer (a refusal or a protocol error).
    Close {
        peer: usize,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Timer {
    Capture,
    /// The applier of this peer's batches.
    Apply(usize),
    Prune,
    /// The coordinator may start a tombstone-collection round.
    Round,
    /// A transaction of this peer's stops waiting for a node that is away.
    CausalWaitOver(usize),
}

/// Everything a node handler may use besides the node itself.
pub struct Ctx<'a> {
    pub now: u64,
    /// This node's wall clock now.
    pub physical: u64,
    pub table: &'a TableDef,
    pub params: &'a Params,
    pub bug: Option<PlantedBug>,
    pub oracle: &'a mut Oracle,
    pub stats: &'a mut Stats,
    pub trace: &'a mut Trace,
    pub rng: &'a mut SimRng,
    pub out: &'a mut Vec<Output>,
}

impl Timer {
    /// A number for the trace.
    pub fn tag(&self) -> u64 {
        match self {
            Timer::Capture => 0,
            Timer::Apply(peer) => 1 | (*peer as u64) << 4,
            Timer::CausalWaitOver(peer) => 4 | (*peer as u64) << 4,
            Timer::Prune => 2,
            Timer::Round => 3,
        }
    }
}

/// One peer's applier, as the service runs one per peer, each on its own sessions: the batches
/// received and not applied yet, and the one being applied.
#[derive(Debug, Default)]
struct Applier {
    queue: ApplyQueue,
    /// The beginning of a transaction still arriving (`Handout::Spool`; the service's spool file).
    spool: Vec<RowChange>,
    /// A spooled transaction being applied, in segments.
    spooled: Option<Spooled>,
    applying: Option<Applying>,
    scheduled: bool,
    /// After a deadlock, the service pauses before it tries the batch again.
    not_before: u64,
    /// The tables as this applier read them (`None`: read them at its next batch). As the
    /// service's, it reads them again only when a batch cannot be read under them: after a
    /// migration here it may go on under the old shape for a while.
    schema: Option<NodeSchema>,
}

/// A spooled transaction, complete, cut into segments as the service reads it back, and how
/// far its apply got (`engine::Segments`).
#[derive(Debug)]
struct Spooled {
    segments: Vec<Vec<RowChange>>,
    plan: Segments,
}

impl Spooled {
    /// The machine for segment `index`. `with`: the peer, the replicated tables, the collection
    /// cut and the planted bug.
    fn machine(
        &self,
        with: (NodeId, &NodeSchema, &Option<StableCut>, Option<PlantedBug>),
        index: usize,
    ) -> Result<BatchApply, ApplyError> {
        let (pid, schema, cut, bug) = with;
        let last = index + 1 == self.segments.len();
        self.plan.machine(
            pid,
            self.segments[index].clone(),
            schema,
            cut.clone(),
            apply_rules(bug),
            last,
        )
    }
}

/// How long an applier whose batch waits for this node's schema waits before it reads its tables
/// again (`apply_worker`: a second).
const SHAPE_RETRY_MICROS: u64 = 1_000_000;

/// The node's replicated table as its database has it now, and the shapes it knows: `learned`
/// and its own, with what it fills a column with that a change does not carry.
fn node_schema(db: &Db, learned: &ShapeBook) -> NodeSchema {
    let table = db.table();
    let mut book = learned.clone();
    book.learn(table.clone());
    if db.migrated_at.is_some() {
        book.learn(crate::table::table(db.inserts));
        let mut defaults = vec![None; table.columns.len()];
        defaults[crate::table::SOLD] = Some(crate::table::sold_default());
        book.set_local(&table.name, defaults, Default::default());
    }
    NodeSchema {
        tables: Arc::from(vec![table]),
        shapes: Arc::new(book),
        left: Arc::default(),
    }
}

/// How long PostgreSQL waits before it looks for a deadlock, plus the pause the service takes
/// after an apply error before it tries again (`apply_batch` in `src/node/runtime.rs`).
const DEADLOCK_RETRY_MICROS: u64 = 1_000_000 + 500_000;

/// What the accord process holds in memory; lost in a crash.
#[derive(Debug)]
pub struct Volatile {
    capturer: Capturer,
    /// The next WAL position decoding delivers.
    read_lsn: u64,
    /// The end of the last group written: the slot may move up to it.
    written_lsn: u64,
    pub replication: Replication,
    /// Per peer, what its applies committed and what is on disk (what may be acknowledged).
    positions: BTreeMap<NodeId, AppliedPosition>,
    /// Per peer (by index), its applier.
    appliers: BTreeMap<usize, Applier>,
    capture_scheduled: bool,
    prune_scheduled: bool,
    /// This node's part in the tombstone-collection rounds; its state is durable in `db`.
    collector: Collector,
    round_scheduled: bool,
    /// What the capture is known to have accounted for of local removals, for every applier
    /// (`engine::RemovalLedger`, in the service's memory: a restart forgets it).
    ledger: RemovalLedger,
}

impl Volatile {
    /// The capture has dealt with everything up to this WAL position (read and written, or
    /// covered by the slot before this process started).
    fn capture_read(&self) -> u64 {
        self.read_lsn - 1
    }
}

#[derive(Debug)]
pub struct Node {
    pub ix: usize,
    pub id: NodeId,
    pub db: Db,
    pub vol: Option<Volatile>,
    /// Counts process starts; timers of an earlier process are ignored.
    pub inc: u32,
    /// PostgreSQL itself is down (machine crash): local writes fail.
    pub pg_down: bool,
    pub capture_stalled_until: u64,
    /// A node that joins the cluster (`SimConfig::join`) and has not finished: no process, no
    /// local writes.
    pub awaiting_join: bool,
    /// Who is in the cluster, as this node knows it (`accord.members`: durable).
    pub membership: Membership,
    /// It is leaving the cluster (`SimConfig::leave`): no more local writes.
    pub leaving: bool,
    /// It left: stopped for good, not checked at the end.
    pub gone: bool,
    nodes: usize,
    /// The replicated table as the apply takes it, and the shapes it is known by.
    schema: NodeSchema,
}

fn engine_error(what: &str, e: impl std::fmt::Display) -> Failure {
    Failure::new(Invariant::Engine, format!("{what}: {e}"))
}

/// Whether a wait for the capture is over: it read past the probe's WAL position (`lsn`), which
/// is all PostgreSQL's probe promises. The simulator once had to wait for everything flushed
/// instead: a local insert and delete of a missing row's key could commit during the wait
/// (seed 91); the key locks closed that (`ApplyCommand::LockKeys`).
fn capture_covers(capture_read: u64, lsn: u64) -> bool {
    capture_read >= lsn
}

/// The engine's apply rules, with the planted bug that lives in them.
fn apply_rules(bug: Option<PlantedBug>) -> ApplyRules {
    ApplyRules {
        planted: bug.and_then(PlantedBug::in_apply),
        ..ApplyRules::default()
    }
}

pub(crate) fn peer_id(peer: usize) -> NodeId {
    NodeId(peer as u32 + 1)
}

pub(crate) fn peer_ix(node: NodeId) -> usize {
    node.0 as usize - 1
}

/// A node of the cluster from the start, as a configuration file seeds it.
pub(crate) fn founding_member(node: NodeId) -> Member {
    Member {
        node,
        state: MemberState::Active,
        address: String::new(),
        stamp: Hlc::zero(node),
    }
}

impl Node {
    pub fn new(ix: usize, nodes: usize, inserts: accord_engine::InsertPolicy) -> Self {
        let id = peer_id(ix);
        Node {
            ix,
            id,
            db: Db::new((0..nodes).filter(|&p| p != ix).map(peer_id), inserts),
            vol: None,
            inc: 0,
            pg_down: false,
            capture_stalled_until: 0,
            awaiting_join: false,
            membership: Membership::new(id, (0..nodes).map(|p| founding_member(peer_id(p)))),
            leaving: false,
            gone: false,
            nodes,
            schema: NodeSchema::of(Arc::from(vec![crate::table::table(inserts)])),
        }
    }

    pub fn is_up(&self) -> bool {
        self.vol.is_some()
    }

    /// Starts the process from what is durable: the capture from its checkpoint (it re-reads the
    /// WAL after the slot's confirmed position and skips what it covered), the links from the
    /// recorded progress.
    pub fn start(&mut self, ctx: &mut Ctx) -> Result<(), Failure> {
        // Each applier binds its origin reading the position with a flush: what this node
        // applied before is on disk from here on.
        self.db.flush();
        self.deliver_durable(ctx)?;
        let max_offset = ctx.params.max_offset;
        let mut capturer = match self.db.checkpoint {
            Some(checkpoint) => Capturer::restore(checkpoint, max_offset),
            None => Capturer::new(self.id, max_offset),
        };
        // As the service reads its replication origins' positions.
        capturer.applied_before(self.db.progress.iter().map(|(p, progress)| (*p, progress.applied)));
        capturer.applied_before(self.db.join_claims.iter().copied());
        if ctx.bug != Some(PlantedBug::ForgetMergedStamps) {
            capturer.merged_before(self.db.merged.values().copied());
        }
        let config = ReplicationConfig {
            max_batch: ctx.params.max_batch,
            window: ctx.params.window,
            max_offset_micros: max_offset,
            causal_wait_micros: ctx.params.causal_wait,
            ..ReplicationConfig::default()
        };
        let live: Vec<NodeId> = self.membership.live_peers().iter().map(|m| m.node).collect();
        let mut replication = Replication::new(
            self.id,
            config,
            self.db.outbound_head(),
            self.db.outbound_pruned,
            self.db
                .progress
                .iter()
                .filter(|(p, _)| live.contains(p))
                .map(|(p, progress)| (*p, *progress)),
        );
        self.inc += 1;
        self.pg_down = false;
        let planted = apply_rules(ctx.bug).planted;
        let spool_bound = ctx.params.spool_bound;
        replication.plant(planted);
        let positions = self
            .db
            .progress
            .iter()
            .map(|(p, progress)| (*p, AppliedPosition::new(progress.applied, planted)))
            .collect();
        self.vol = Some(Volatile {
            positions,
            capturer,
            read_lsn: self.db.slot_confirmed + 1,
            written_lsn: 0,
            replication,
            appliers: live
                .iter()
                .map(|&pid| peer_ix(pid))
                .map(|p| {
                    let mut applier = Applier::default();
                    applier.queue.plant(planted);
                    applier.queue.set_spool_bound(spool_bound);
                    (p, applier)
                })
                .collect(),
            capture_scheduled: false,
            prune_scheduled: false,
            collector: Collector::new(self.id, self.round_members(ctx.bug), self.db.collection.clone()),
            round_scheduled: false,
            ledger: RemovalLedger::default(),
        });
        self.want_capture(ctx);
        self.want_round(ctx);
        Ok(())
    }

    /// The process dies: everything in memory is gone; the database keeps what was committed,
    /// except, when the machine crashed, the apply transactions not yet flushed.
    pub fn crash(&mut self, machine: bool) {
        self.vol = None;
        self.inc += 1;
        self.pg_down = machine;
        if machine {
            self.db.lose_unflushed();
        }
    }

    /// Tells the oracle of the apply transactions that became durable.
    pub(crate) fn deliver_durable(&mut self, ctx: &mut Ctx) -> Result<(), Failure> {
        for note in self.db.take_durable() {
            for &(origin, seq) in &note.changes {
                ctx.oracle.applied(self.ix, origin, seq)?;
            }
            for &(origin, seq) in &note.merged {
                ctx.oracle.merged(self.ix, origin, seq);
            }
            ctx.oracle.check_whole()?;
        }
        Ok(())
    }

    /// What this node may say it applied of `peer`'s changes: what is on disk.
    fn acknowledgeable(&self, peer: NodeId) -> u64 {
        match &self.vol {
            Some(vol) => vol.positions.get(&peer).map_or(0, AppliedPosition::acknowledgeable),
            None => 0,
        }
    }

    fn identity(&self, max_offset: u64) -> LocalIdentity {
        LocalIdentity {
            cluster: CLUSTER.into(),
            node: self.id,
            fingerprint: FINGERPRINT.into(),
            max_offset_micros: max_offset,
        }
    }

    /// The hello this node sends `peer`: what it durably applied of the peer's changes.
    pub fn hello(&self, peer: usize, physical: u64) -> Hello {
        Hello {
            version: PROTOCOL_VERSION,
            cluster: CLUSTER.into(),
            node: self.id,
            fingerprint: FINGERPRINT.into(),
            hlc: Hlc::new(physical, 0, self.id),
            applied_yours: self.acknowledgeable(peer_id(peer)),
        }
    }

    pub fn check_hello(&self, hello: &Hello, physical: u64, max_offset: u64) -> Result<(), Refusal> {
        // The peers the running node follows (its membership as taken in), as the service's loop
        // refuses a link from any other.
        let follows = self
            .vol
            .as_ref()
            .is_some_and(|vol| vol.replication.peers().any(|p| p == hello.node));
        if !follows {
            return Err(Refusal::UnknownPeer { node: hello.node });
        }
        self.identity(max_offset).check(hello, physical)
    }

    /// The live nodes the collector waits for: every live peer, joining ones too (the planted
    /// `rounds-without-joiner` leaves those out).
    fn round_members(&self, bug: Option<PlantedBug>) -> Vec<NodeId> {
        self.membership
            .live_peers()
            .iter()
            .filter(|m| bug != Some(PlantedBug::RoundsWithoutJoiner) || m.state != MemberState::Joining)
            .map(|m| m.node)
            .collect()
    }

    /// A peer's membership arrived.
    /// A peer's shapes of its tables, as the service's loop learns them (`--migrate`).
    pub fn on_shapes(&mut self, shapes: Vec<TableDef>) {
        let mut book = (*self.schema.shapes).clone();
        for shape in shapes {
            book.learn(shape);
        }
        self.schema.shapes = Arc::new(book);
    }

    /// The user's migration (`--migrate`): `ALTER TABLE ... ADD COLUMN sold ... DEFAULT 0`, one
    /// transaction whose lock waits for every open transaction on the table: `false` while an
    /// apply holds one open (the caller tries again). The process may be down meanwhile (the
    /// database is not): it finds the table changed when it starts.
    pub fn migrate(&mut self, ctx: &mut Ctx) -> Result<bool, Failure> {
        if self.db.migrated_at.is_some() {
            return Ok(true);
        }
        if self.pg_down {
            return Ok(false);
        }
        if let Some(vol) = &self.vol {
            if vol.appliers.values().any(|a| a.applying.is_some()) {
                return Ok(false);
            }
        }
        self.db.flush();
        self.deliver_durable(ctx)?;
        let xid = self.db.new_xid();
        let lsn = self.db.append_wal(xid, ctx.physical, WalBody::Alter);
        self.db.migrated_at = Some(lsn);
        // A constant default: PostgreSQL fills no row, and no row's xmin changes.
        for row in self.db.rows.values_mut() {
            row.values.push(Cell::Value(crate::table::sold_default()));
        }
        self.db.flush();
        ctx.stats.migrations += 1;
        self.schema = node_schema(&self.db, &self.schema.shapes);
        let Some(vol) = &mut self.vol else { return Ok(true) };
        // Peers learn the new shape before any change names it (the capture has not read
        // past the migration yet).
        for peer in vol.appliers.keys().copied().collect::<Vec<_>>() {
            if vol.replication.is_connected(peer_id(peer)) {
                ctx.out.push(Output::Send {
                    to: peer,
                    msg: Message::Shapes(vec![crate::table::migrated(self.db.inserts)]),
                });
            }
        }
        self.want_capture(ctx);
        self.want_apply(ctx);
        Ok(true)
    }

    pub fn on_members(&mut self, ctx: &mut Ctx, peer: usize, members: Vec<Member>) -> Result<(), Failure> {
        if self.vol.is_none() {
            return Ok(());
        }
        let changed = self.membership.merge_from(peer_id(peer), &members);
        if !changed.is_empty() {
            self.members_changed(ctx)?;
        }
        Ok(())
    }

    /// Follows the membership, as the service's loop does: a link and an applier for a node that
    /// joined (the outbound log kept for it from where it is pruned now), the collector's
    /// members, and every connected peer told.
    pub fn members_changed(&mut self, ctx: &mut Ctx) -> Result<(), Failure> {
        let round_members = self.round_members(ctx.bug);
        let Some(vol) = &mut self.vol else { return Ok(()) };
        let planted = apply_rules(ctx.bug).planted;
        let live: Vec<NodeId> = self.membership.live_peers().iter().map(|m| m.node).collect();
        let change = vol.replication.membership_change(&live);
        for &pid in &change.joined {
            let progress = self.db.progress.get(&pid).copied().unwrap_or_default();
            vol.replication.add_peer(pid, progress);
            let mut applier = Applier::default();
            applier.queue.plant(planted);
            applier.queue.set_spool_bound(ctx.params.spool_bound);
            vol.appliers.insert(peer_ix(pid), applier);
            vol.positions
                .entry(pid)
                .or_insert_with(|| AppliedPosition::new(progress.applied, planted));
            ctx.stats.members_added += 1;
        }
        for &pid in &change.left {
            // It left: no link, no applier (a transaction of it being applied rolls back), and
            // the outbound log no longer waits for it.
            if vol.replication.is_connected(pid) {
                ctx.out.push(Output::Send {
                    to: peer_ix(pid),
                    msg: Message::Members(self.membership.to_vec()),
                });
            }
            vol.replication.remove_peer(pid);
            vol.appliers.remove(&peer_ix(pid));
            ctx.stats.members_removed += 1;
        }
        let before = vol.collector.state().clone();
        vol.collector.set_peers(round_members);
        for pid in vol.replication.peers() {
            if vol.replication.is_connected(pid) {
                ctx.out.push(Output::Send {
                    to: peer_ix(pid),
                    msg: Message::Members(self.membership.to_vec()),
                });
            }
        }
        self.collection_step(ctx, before);
        self.want_round(ctx);
        Ok(())
    }

    pub(crate) fn want_capture(&mut self, ctx: &mut Ctx) {
        let Some(vol) = &mut self.vol else { return };
        if vol.capture_scheduled {
            return;
        }
        vol.capture_scheduled = true;
        let at = (ctx.now + ctx.rng.range(0, ctx.params.capture_lag_max)).max(self.capture_stalled_until);
        ctx.out.push(Output::Timer {
            at,
            timer: Timer::Capture,
        });
    }

    /// Schedules every applier that has something to do.
    fn want_apply(&mut self, ctx: &mut Ctx) {
        let (nodes, ix) = (self.nodes, self.ix);
        for peer in (0..nodes).filter(|&p| p != ix) {
            self.want_apply_of(ctx, peer);
        }
    }

    pub fn want_apply_of(&mut self, ctx: &mut Ctx, peer: usize) {
        let Some(vol) = &mut self.vol else { return };
        let capture_read = vol.capture_read();
        let covers = |lsn| capture_covers(capture_read, lsn);
        let Some(applier) = vol.appliers.get(&peer) else { return };
        if applier.scheduled {
            return;
        }
        let at = match applier.applying.as_ref().map(|a| a.waiting) {
            // The capture's progress wakes the apply (`capture_tick`).
            Some(Waiting::Capture { lsn, .. }) if !covers(lsn) => return,
            Some(Waiting::Capture { .. }) => ctx.now,
            Some(Waiting::Until { at } | Waiting::RoundTrip { at }) => at.max(ctx.now),
            // The holder's release wakes it (`wake_lock_waiters`).
            Some(Waiting::Lock { .. }) => return,
            // A queue whose first transaction waits for another applier is woken by that
            // applier's commits, or by the end of its wait (`apply_step`).
            // A spooled transaction to try again after a deadlock, or a part to spool, is work.
            None if !applier.queue.has_complete() && !applier.queue.next_is_spool() && applier.spooled.is_none() => {
                return
            }
            None => (ctx.now + ctx.rng.range(0, ctx.params.apply_delay_max)).max(applier.not_before),
        };
        if let Some(applier) = vol.appliers.get_mut(&peer) {
            applier.scheduled = true;
        }
        ctx.out.push(Output::Timer {
            at,
            timer: Timer::Apply(peer),
        });
    }

    /// An applier released locks: those waiting for a lock try again (and wait again if
    /// another still holds it).
    fn wake_lock_waiters(&mut self, ctx: &mut Ctx) {
        let Some(vol) = &self.vol else { return };
        let waiting: Vec<usize> = vol
            .appliers
            .iter()
            .filter(|(_, a)| matches!(a.applying.as_ref().map(|x| x.waiting), Some(Waiting::Lock { .. })))
            .map(|(p, _)| *p)
            .collect();
        for peer in waiting {
            let Some(vol) = &mut self.vol else { return };
            let Some(applier) = vol.appliers.get_mut(&peer) else {
                continue;
            };
            if applier.scheduled {
                continue;
            }
            applier.scheduled = true;
            ctx.out.push(Output::Timer {
                at: ctx.now,
                timer: Timer::Apply(peer),
            });
        }
    }

    /// Whether a TRUNCATE waits: it takes the table's exclusive lock, which any applier in the
    /// middle of a transaction holds off.
    pub fn truncate_blocked(&self) -> bool {
        self.vol
            .as_ref()
            .is_some_and(|vol| vol.appliers.values().any(|a| a.applying.is_some()))
    }

    /// Whether an applier holds the lock of a row this local transaction writes, or of a key it
    /// found missing (the local insert's trigger waits for it), and the transaction waits.
    /// `trigger`: local inserts take key locks (the service's trigger is there).
    pub fn local_write_blocked(&self, keys: &[i64], trigger: bool) -> bool {
        self.vol.as_ref().is_some_and(|vol| {
            vol.appliers
                .values()
                .filter_map(|a| a.applying.as_ref())
                .any(|a| keys.iter().any(|&k| a.holds_row(k) || (trigger && a.holds_key(k))))
        })
    }

    fn want_prune(&mut self, ctx: &mut Ctx) {
        let Some(vol) = &mut self.vol else { return };
        if vol.prune_scheduled {
            return;
        }
        vol.prune_scheduled = true;
        ctx.out.push(Output::Timer {
            at: ctx.now + 50_000,
            timer: Timer::Prune,
        });
    }

    /// The coordinator looks at starting a round every `round_every`, while it holds tombstones
    /// (without any, nothing is left to collect and the cluster may go quiet).
    fn want_round(&mut self, ctx: &mut Ctx) {
        let Some(vol) = &mut self.vol else { return };
        if vol.round_scheduled || !vol.collector.is_coordinator() || self.db.meta.values().all(|m| m.meta.is_alive()) {
            return;
        }
        vol.round_scheduled = true;
        ctx.out.push(Output::Timer {
            at: ctx.now + ctx.params.round_every,
            timer: Timer::Round,
        });
    }

    pub fn round_tick(&mut self, ctx: &mut Ctx) -> Result<(), Failure> {
        let Some(vol) = &mut self.vol else { return Ok(()) };
        vol.round_scheduled = false;
        let before = vol.collector.state().clone();
        if vol.collector.start_round() {
            ctx.stats.collection_rounds_started += 1;
        }
        self.collection_step(ctx, before);
        self.want_round(ctx);
        Ok(())
    }

    /// A peer's collection state arrived.
    pub fn on_collection(&mut self, ctx: &mut Ctx, state: CollectionState) -> Result<(), Failure> {
        let Some(vol) = &mut self.vol else { return Ok(()) };
        let before = vol.collector.state().clone();
        vol.collector.merge(&state);
        self.collection_step(ctx, before);
        Ok(())
    }

    /// Acknowledges what can be acknowledged, as the service's loop does on every tick (durable
    /// applied positions first, then the capture head); persists a changed state before sending
    /// it to every connected peer; and drops the tombstones a new cut covers (the service reads
    /// them as absent at once and deletes them soon after: the same to every reader).
    fn collection_step(&mut self, ctx: &mut Ctx, before: CollectionState) {
        let Some(vol) = &mut self.vol else { return };
        let applied: Vec<(NodeId, u64)> = vol
            .positions
            .iter()
            .map(|(p, position)| (*p, position.acknowledgeable()))
            .collect();
        if vol.collector.wants_ack1() {
            vol.collector.ack1(self.db.outbound_head(), &applied);
        }
        if vol.collector.wants_ack2(&applied) {
            vol.collector.ack2();
        }
        let state = vol.collector.state();
        if *state == before {
            return;
        }
        self.db.collection = state.clone();
        if state.cut != before.cut {
            if let Some(cut) = &state.cut {
                let held = self.db.meta.len();
                self.db.meta.retain(|_, m| !cut.covers(&m.meta));
                ctx.stats.tombstones_collected += (held - self.db.meta.len()) as u64;
                if self.ix == 0 {
                    ctx.stats.collection_rounds_completed += 1;
                }
            }
        }
        for peer in (0..self.nodes).filter(|&p| p != self.ix) {
            if vol.replication.is_connected(peer_id(peer)) {
                ctx.out.push(Output::Send {
                    to: peer,
                    msg: Message::Collection(state.clone()),
                });
            }
        }
    }

    /// Calls `collection_step` after a step that may have moved the applied positions.
    fn collection_after_step(&mut self, ctx: &mut Ctx) {
        let Some(vol) = &self.vol else { return };
        let before = vol.collector.state().clone();
        self.collection_step(ctx, before);
        self.want_round(ctx);
    }

    /// The application commits a transaction here (PostgreSQL is up; the accord process need not
    /// be). Rows change now; the capture sees the transaction later, in WAL order.
    pub fn commit_local(&mut self, ctx: &mut Ctx, plan: TxPlan) -> Result<(), Failure> {
        // The commit is synchronous: it flushes the WAL, merges committed before it included.
        self.db.flush();
        self.deliver_durable(ctx)?;
        let xid = self.db.new_xid();
        // The triggers count a transaction that removes a row (a delete, a key changed away: a
        // delete and an insert here, a TRUNCATE) once, after taking the removal lock. Without
        // the triggers, nothing counts.
        let removes = plan.truncate || plan.rows.iter().any(|row| row.kind == ChangeKind::Delete);
        if removes && ctx.bug != Some(PlantedBug::NoKeyLockTrigger) {
            self.db.removal_count += 1;
        }
        if plan.truncate {
            // Every row goes, each a delete of the workload's; decoding will deliver only the
            // table's name.
            let keys: Vec<i64> = self.db.rows.keys().copied().collect();
            let mut emptied = Vec::with_capacity(keys.len());
            for key in keys {
                self.db.rows.remove(&key);
                let write =
                    ctx.oracle
                        .local_write(self.ix, key, ChangeKind::Delete, None, (0, 0), None, None, ctx.physical);
                emptied.push((key, write));
                ctx.trace.add(mix(key as u64, ChangeKind::Delete as u64));
            }
            ctx.stats.local_txs += 1;
            ctx.stats.truncates += 1;
            self.db.append_wal(
                xid,
                ctx.physical,
                WalBody::Local {
                    rows: Vec::new(),
                    resolving: Vec::new(),
                    truncated: Some(emptied),
                },
            );
            self.db.flush();
            self.want_capture(ctx);
            return Ok(());
        }
        let mut rows = Vec::with_capacity(plan.rows.len());
        for row in plan.rows {
            match &row.new {
                Some(values) => {
                    // A row written inside a subtransaction (a SAVEPOINT, a PL/pgSQL EXCEPTION
                    // block) carries the subtransaction's id, which decoding never reports.
                    let xmin = if ctx.rng.chance(ctx.params.subtransaction_p) {
                        self.db.new_xid()
                    } else {
                        xid
                    };
                    self.db.rows.insert(
                        row.key,
                        UserRow {
                            values: values.clone(),
                            xmin,
                            tx: xid,
                        },
                    );
                }
                None => {
                    self.db.rows.remove(&row.key);
                }
            }
            // An update that changes nothing is no write to track, but it makes a row version.
            let write = (!row.changes_nothing).then(|| {
                ctx.oracle.local_write(
                    self.ix,
                    row.key,
                    row.kind,
                    row.name.clone(),
                    (row.stock, row.sold),
                    row.price.clone(),
                    plan.resolving,
                    ctx.physical,
                )
            });
            let mut decoded = row.new;
            if row.toast_name {
                if let Some(cells) = &mut decoded {
                    cells[crate::table::NAME] = Cell::UnchangedToast;
                }
            }
            rows.push(WalRow {
                change: CapturedChange {
                    kind: row.kind,
                    key: crate::table::row_key(row.key),
                    old: row.old,
                    new: decoded,
                },
                write,
            });
            ctx.trace.add(mix(row.key as u64, row.kind as u64));
        }
        if plan.resolving.is_some() {
            ctx.stats.resolutions += 1;
        }
        ctx.stats.local_txs += 1;
        self.db.append_wal(
            xid,
            ctx.physical,
            WalBody::Local {
                rows,
                resolving: plan.resolving.into_iter().collect(),
                truncated: None,
            },
        );
        self.db.flush();
        self.want_capture(ctx);
        Ok(())
    }

    /// The capture decodes what the WAL holds past its read position (up to a batch), and
    /// persists each transaction's changes together with the checkpoint.
    pub fn capture_tick(&mut self, ctx: &mut Ctx) -> Result<(), Failure> {
        let Some(vol) = &mut self.vol else { return Ok(()) };
        vol.capture_scheduled = false;
        if ctx.now < self.capture_stalled_until {
            self.want_capture(ctx);
            return Ok(());
        }
        // The slot may advance to what this process read and wrote (the service tells the slot
        // once a group is written, and the slot hears it a moment later); after a restart the
        // checkpoint may be behind the slot, or ahead of the read position, and the Capturer
        // skips what it covered.
        self.db.slot_confirmed = self.db.slot_confirmed.max(vol.written_lsn);
        self.db.truncate_wal();
        // Decoding reads only flushed WAL.
        let end = self
            .db
            .flushed_lsn
            .min(vol.read_lsn + ctx.params.capture_batch as u64 - 1);
        // The stream's new Relation for the table comes after the migration: what was decoded
        // before it is written under the old shape first (`Capture::follow_shape`).
        let end = match self.db.migrated_at {
            Some(at) if vol.read_lsn <= at && at < end => at,
            _ => end,
        };
        let done = end + 1 - vol.read_lsn.min(end + 1);
        if done > 0 {
            match capture_group(&mut self.db, vol, self.ix, vol.read_lsn..=end, ctx)? {
                // The capture commits synchronously, flushing what committed before it.
                Grouped::Written => self.db.flush(),
                Grouped::NothingToWrite => {}
                Grouped::Blocked => {
                    // Its metadata query waits for an applier's locks.
                    ctx.stats.capture_lock_waits += 1;
                    vol.capture_scheduled = true;
                    let at = (ctx.now + ctx.rng.range(1, ctx.params.lock_retry_max)).max(self.capture_stalled_until);
                    ctx.out.push(Output::Timer {
                        at,
                        timer: Timer::Capture,
                    });
                    return Ok(());
                }
            }
            vol.read_lsn = end + 1;
            vol.written_lsn = end;
        }
        self.deliver_durable(ctx)?;
        let Some(vol) = &mut self.vol else { return Ok(()) };
        ctx.trace.add(mix(0xCA97, done));
        let caught_up = vol.read_lsn > self.db.flushed_lsn;

        if !caught_up {
            // A backlog is decoded at the capture's pace, not after another full lag.
            let vol = self
                .vol
                .as_mut()
                .ok_or_else(|| Failure::new(Invariant::Engine, "node went down mid-step"))?;
            vol.capture_scheduled = true;
            let at = (ctx.now + ctx.rng.range(1, 200)).max(self.capture_stalled_until);
            ctx.out.push(Output::Timer {
                at,
                timer: Timer::Capture,
            });
        }
        self.want_apply(ctx);
        self.collection_after_step(ctx);
        self.pump_all(ctx)
    }

    pub fn pump_all(&mut self, ctx: &mut Ctx) -> Result<(), Failure> {
        for peer in 0..self.nodes {
            if peer != self.ix {
                self.pump(ctx, peer)?;
            }
        }
        Ok(())
    }

    /// Sends `peer` what the window allows of the outbound log.
    pub fn pump(&mut self, ctx: &mut Ctx, peer: usize) -> Result<(), Failure> {
        let Some(vol) = &mut self.vol else { return Ok(()) };
        let pid = peer_id(peer);
        while let Some(range) = vol.replication.next_batch(pid) {
            let mut batch = Vec::with_capacity((range.end() - range.start() + 1) as usize);
            for seq in range.clone() {
                let change = self.db.outbound_change(seq).ok_or_else(|| {
                    Failure::new(
                        Invariant::ExactlyOnce,
                        format!(
                            "node {}: change {seq} for node {pid} is no longer in the outbound log (pruned up to {})",
                            self.id, self.db.outbound_pruned
                        ),
                    )
                })?;
                batch.push(change.clone());
            }
            if let Some(last) = batch.last() {
                vol.replication.sent_through(pid, last.tx_last);
            }
            ctx.out.push(Output::Send {
                to: peer,
                msg: Message::Batch(batch),
            });
        }
        Ok(())
    }

    /// The handshake with `peer` completed on this side.
    pub fn connected(&mut self, ctx: &mut Ctx, peer: usize, applied_yours: u64) -> Result<(), Failure> {
        let Some(vol) = &mut self.vol else { return Ok(()) };
        vol.replication
            .connected(peer_id(peer), applied_yours)
            .map_err(|e| Failure::new(Invariant::Protocol, format!("node {}: {e}", self.id)))?;
        // Before any batch: the batches may hold changes numbered under its cut.
        ctx.out.push(Output::Send {
            to: peer,
            msg: Message::Collection(vol.collector.state().clone()),
        });
        // And before any batch naming it, the shapes it captured under (the service sends its
        // shapes on every connection; here only once it has more than one).
        if self.db.migrated_at.is_some() {
            ctx.out.push(Output::Send {
                to: peer,
                msg: Message::Shapes(vec![
                    crate::table::table(self.db.inserts),
                    crate::table::migrated(self.db.inserts),
                ]),
            });
        }
        // The service sends its membership on every connection. Here only once it holds more
        // than the founding nodes' entries (every node starts with those): sending them would
        // merge to nothing and only move every later event, which the planted bugs' seeds were
        // found with.
        if self.membership.members().any(|m| *m != founding_member(m.node)) {
            ctx.out.push(Output::Send {
                to: peer,
                msg: Message::Members(self.membership.to_vec()),
            });
        }
        self.pump(ctx, peer)
    }

    /// The connection to `peer` closed. Batches received on it and not yet applied are dropped:
    /// the peer resends them after the hello, and the durable applied position cannot move
    /// between this node's hello and the new connection (a position beyond what the hello said
    /// would be acknowledged beyond what the peer sent on the new connection).
    pub fn disconnected(&mut self, ctx: &mut Ctx, peer: usize) {
        if let Some(vol) = &mut self.vol {
            vol.replication.disconnected(peer_id(peer));
            // A batch of that connection still being applied rolls back (nothing of it is
            // committed yet): its peer resends it.
            if let Some(applier) = vol.appliers.get_mut(&peer) {
                applier.queue.clear();
                applier.spool.clear();
                applier.spooled = None;
                applier.applying = None;
            }
            self.wake_lock_waiters(ctx);
            // Transactions waiting for the node that went away start their bounded wait.
            self.want_apply(ctx);
        }
    }

    pub fn is_connected(&self, peer: usize) -> bool {
        self.vol
            .as_ref()
            .is_some_and(|v| v.replication.is_connected(peer_id(peer)))
    }

    /// A batch from `peer` arrived. `ghost`: this connection carried a message of an earlier one
    /// (a transport fault), so protocol errors on it are tolerated: the connection closes.
    pub fn on_batch(
        &mut self,
        ctx: &mut Ctx,
        peer: usize,
        mut batch: Vec<RowChange>,
        ghost: bool,
    ) -> Result<(), Failure> {
        let Some(vol) = &mut self.vol else { return Ok(()) };
        let pid = peer_id(peer);
        if !vol.replication.is_connected(pid) {
            return Ok(());
        }
        match vol.replication.received(pid, &batch, ctx.physical) {
            Ok(to_apply) => {
                let skip = batch.len() - to_apply.len();
                ctx.oracle
                    .accepted(self.ix, to_apply, ctx.physical, ctx.params.max_offset)?;
                ctx.stats.duplicates_skipped += skip as u64;
                if ctx.bug != Some(PlantedBug::DoubleApply) {
                    batch.drain(..skip);
                }
                if !batch.is_empty() {
                    if let Some(applier) = vol.appliers.get_mut(&peer) {
                        applier.queue.push(batch);
                    }
                    self.want_apply_of(ctx, peer);
                }
                Ok(())
            }
            Err(ReplicationError::Refused { refusal, .. }) => {
                // Loudly: counted, and the connection closes; nothing of the batch is merged.
                ctx.stats.refused_batches += 1;
                ctx.trace
                    .add(mix(0x4EF5, matches!(refusal, Refusal::ClockAhead { .. }) as u64));
                ctx.out.push(Output::Close { peer });
                Ok(())
            }
            Err(e) if ghost => {
                ctx.stats.ghost_errors += 1;
                ctx.trace.add(0x6057);
                let _ = e;
                ctx.out.push(Output::Close { peer });
                Ok(())
            }
            Err(e) => Err(Failure::new(Invariant::Protocol, format!("node {}: {e}", self.id))),
        }
    }

    pub fn on_ack(&mut self, ctx: &mut Ctx, peer: usize, applied: u64, ghost: bool) -> Result<(), Failure> {
        let Some(vol) = &mut self.vol else { return Ok(()) };
        let pid = peer_id(peer);
        if !vol.replication.is_connected(pid) {
            return Ok(());
        }
        match vol.replication.acked(pid, applied) {
            Ok(()) => {
                if let Some(progress) = self.db.progress.get_mut(&pid) {
                    progress.acked = progress.acked.max(applied);
                }
                self.want_prune(ctx);
                self.pump(ctx, peer)
            }
            Err(_) if ghost => {
                ctx.stats.ghost_errors += 1;
                ctx.out.push(Output::Close { peer });
                Ok(())
            }
            Err(e) => Err(Failure::new(Invariant::Protocol, format!("node {}: {e}", self.id))),
        }
    }

    /// Drops the outbound log up to what every peer acknowledged.
    pub fn prune(&mut self) {
        let Some(vol) = &mut self.vol else { return };
        vol.prune_scheduled = false;
        let upto = vol.replication.prune_point();
        self.db.prune_outbound(upto);
        vol.replication.pruned(upto);
    }

    /// Drives `peer`'s applier: the engine's `BatchApply` decides, `crate::apply` carries its
    /// commands out against the database, beside the other peers' appliers.
    pub fn apply_step(&mut self, ctx: &mut Ctx, peer: usize) -> Result<(), Failure> {
        let Some(vol) = &mut self.vol else { return Ok(()) };
        let capture_read = vol.capture_read();
        let covered = |lsn| capture_covers(capture_read, lsn);
        let Some(applier) = vol.appliers.get_mut(&peer) else {
            return Ok(());
        };
        applier.scheduled = false;
        let pid = peer_id(peer);
        // The replication-origin position: what is at or below it was applied.
        let durable = self.db.progress.get(&pid).map_or(0, |p| p.applied);
        let schema = applier.schema.get_or_insert_with(|| self.schema.clone()).clone();
        let mut input = match &applier.applying {
            Some(applying) => match applying.waiting {
                Waiting::Capture { lsn, then } => {
                    if !covered(lsn) {
                        self.want_capture(ctx);
                        return Ok(());
                    }
                    Some(match then {
                        Resume::CaptureReached => ApplyInput::CaptureReached { now: ctx.now },
                        Resume::Restarted => ApplyInput::Restarted { now: ctx.now },
                    })
                }
                Waiting::Until { at } | Waiting::RoundTrip { at } if ctx.now < at => {
                    self.want_apply_of(ctx, peer);
                    return Ok(());
                }
                Waiting::Until { .. } => Some(ApplyInput::Restarted { now: ctx.now }),
                // The driver feeds what the round trip returned, or runs the blocked command
                // again.
                Waiting::RoundTrip { .. } | Waiting::Lock { .. } => None,
            },
            None => {
                if ctx.now < applier.not_before {
                    self.want_apply_of(ctx, peer);
                    return Ok(());
                }
                if applier.spooled.is_none() {
                    let batch = loop {
                        match applier.queue.next_handout(MAX_APPLY_BATCH, &vol.replication, ctx.now) {
                            // The service keeps it in a file, gone in a crash as this is.
                            Some(Handout::Spool(part)) => {
                                ctx.stats.spooled_changes += part.len() as u64;
                                applier.spool.extend(part);
                            }
                            Some(Handout::Batch(batch) | Handout::SpooledEnd(batch)) => break batch,
                            None => {
                                if let Some(at) = applier.queue.waits_until(&vol.replication) {
                                    ctx.out.push(Output::Timer {
                                        at,
                                        timer: Timer::CausalWaitOver(peer),
                                    });
                                }
                                return Ok(());
                            }
                        }
                    };
                    let waived = applier.queue.take_waived();
                    if let (false, Some(last)) = (waived.is_empty(), batch.last()) {
                        // Its changes too may show in part: those that carry values of the
                        // transactions they built on are kept until those arrive.
                        ctx.oracle.waived(self.ix, last.origin, last.seq);
                    }
                    for dependency in waived {
                        ctx.stats.causal_waivers += 1;
                        ctx.oracle.waived(self.ix, dependency.node, dependency.through);
                    }
                    if applier.spool.is_empty() {
                        let mut batch = batch;
                        let machine = loop {
                            match BatchApply::new(
                                pid,
                                durable,
                                batch.clone(),
                                &schema,
                                self.db.collection.cut.clone(),
                                apply_rules(ctx.bug),
                            ) {
                                Ok(machine) => break machine,
                                Err(ApplyError::ShapeWaits { seq, .. }) => {
                                    // Written under a shape this node cannot read yet. As the
                                    // service: the transactions before the waiting one are
                                    // applied first, together (the rest goes back to the
                                    // queue); the waiting one waits alone while the applier
                                    // reads its tables again later.
                                    let take = transactions_before_waiting(&batch, seq);
                                    if take < batch.len() {
                                        ctx.stats.shape_splits += 1;
                                        applier.queue.push_front(batch.split_off(take));
                                        continue;
                                    }
                                    ctx.stats.shape_waits += 1;
                                    applier.schema = None;
                                    applier.queue.push_front(batch);
                                    applier.not_before = ctx.now + SHAPE_RETRY_MICROS;
                                    self.want_apply_of(ctx, peer);
                                    return Ok(());
                                }
                                Err(e) => {
                                    return Err(Failure::new(Invariant::ExactlyOnce, format!("node {}: {e}", self.id)))
                                }
                            }
                        };
                        ctx.stats.duplicates_skipped += (batch.len() - machine.changes().len()) as u64;
                        applier.applying = Some(Applying::new(peer, machine, batch, schema.tables[0].clone()));
                    } else {
                        let mut changes = std::mem::take(&mut applier.spool);
                        changes.extend(batch);
                        ctx.stats.spooled_transactions += 1;
                        let commit_at = changes.last().map_or(0, |c| c.seq);
                        applier.spooled = Some(Spooled {
                            segments: changes
                                .chunks(ctx.params.segment_len.max(1))
                                .map(<[RowChange]>::to_vec)
                                .collect(),
                            plan: Segments::new(commit_at, durable),
                        });
                    }
                }
                if let Some(spooled) = &mut applier.spooled {
                    // Each attempt from the first segment, as the service's `apply_spooled`.
                    let commit_at = spooled.segments.last().and_then(|s| s.last()).map_or(0, |c| c.seq);
                    spooled.plan = Segments::new(commit_at, durable);
                    let machine = match spooled.machine((pid, &schema, &self.db.collection.cut, ctx.bug), 0) {
                        Ok(machine) => machine,
                        Err(ApplyError::ShapeWaits { .. }) => {
                            ctx.stats.shape_waits += 1;
                            applier.schema = None;
                            applier.not_before = ctx.now + SHAPE_RETRY_MICROS;
                            self.want_apply_of(ctx, peer);
                            return Ok(());
                        }
                        Err(e) => return Err(Failure::new(Invariant::ExactlyOnce, format!("node {}: {e}", self.id))),
                    };
                    applier.applying = Some(Applying::new(
                        peer,
                        machine,
                        spooled.segments[0].clone(),
                        schema.tables[0].clone(),
                    ));
                }
                Some(ApplyInput::Start { now: ctx.now })
            }
        };
        let Some(mut applying) = applier.applying.take() else {
            return Ok(());
        };
        let committed = loop {
            if applying.start_over && matches!(input, Some(ApplyInput::Restarted { .. })) {
                // The whole spooled transaction again, from its first segment.
                let Some(spooled) = vol.appliers.get_mut(&peer).and_then(|a| a.spooled.as_mut()) else {
                    return Err(Failure::new(
                        Invariant::Engine,
                        format!("node {}: a start over without a spooled transaction", self.id),
                    ));
                };
                spooled.plan.start_over();
                ctx.stats.spool_start_overs += 1;
                let machine = spooled
                    .machine((pid, &schema, &self.db.collection.cut, ctx.bug), 0)
                    .map_err(|e| Failure::new(Invariant::ExactlyOnce, format!("node {}: {e}", self.id)))?;
                applying.next_segment(machine, spooled.segments[0].clone(), 0);
                input = Some(ApplyInput::Start { now: ctx.now });
            }
            let env = RunEnv {
                now: ctx.now,
                physical: ctx.physical,
                images: ctx.bug == Some(PlantedBug::ForgetFromPeer),
                capture_read: vol.capture_read(),
                round_trip: ctx.rng.range(0, ctx.params.round_trip_max),
            };
            let others: Vec<&Applying> = vol.appliers.values().filter_map(|a| a.applying.as_ref()).collect();
            let result = applying.run(&mut self.db, &others, &mut vol.ledger, input.take(), env);
            let Some(applier) = vol.appliers.get_mut(&peer) else {
                return Ok(());
            };
            match result {
                Ok(Stop::Waiting) => {
                    let released = !matches!(applying.waiting, Waiting::RoundTrip { .. });
                    applier.applying = Some(applying);
                    ctx.trace.add(mix(0xA1A1, self.db.wal_insert_lsn()));
                    if released {
                        // A probe released the metadata locks, a restart all of them.
                        self.wake_lock_waiters(ctx);
                    }
                    self.want_capture(ctx);
                    self.want_apply_of(ctx, peer);
                    return Ok(());
                }
                Ok(Stop::SegmentDone) => {
                    let Some(spooled) = &mut applier.spooled else {
                        return Err(Failure::new(
                            Invariant::Engine,
                            format!("node {}: a segment without a spooled transaction", self.id),
                        ));
                    };
                    let next = applying.segment_index + 1;
                    spooled.plan.done(&applying.machine);
                    let machine = spooled
                        .machine((pid, &schema, &self.db.collection.cut, ctx.bug), next)
                        .map_err(|e| Failure::new(Invariant::ExactlyOnce, format!("node {}: {e}", self.id)))?;
                    applying.next_segment(machine, spooled.segments[next].clone(), next);
                    ctx.trace.add(mix(0x5E65, next as u64));
                    input = Some(ApplyInput::Start { now: ctx.now });
                }
                Ok(Stop::Blocked { holder }) => {
                    ctx.stats.lock_waits += 1;
                    if waits_for(&vol.appliers, holder, peer) {
                        // A deadlock: PostgreSQL aborts one of the transactions; the service logs
                        // the error and tries the batch again from the start, after a pause.
                        ctx.stats.deadlocks += 1;
                        ctx.trace.add(mix(0xDEAD, peer as u64));
                        let Some(vol) = &mut self.vol else { return Ok(()) };
                        if let Some(applier) = vol.appliers.get_mut(&peer) {
                            // A spooled transaction is tried again from its spool.
                            if applier.spooled.is_none() {
                                applier.queue.push_front(applying.batch);
                            }
                            applier.not_before = ctx.now + DEADLOCK_RETRY_MICROS;
                        }
                        self.wake_lock_waiters(ctx);
                        self.want_apply_of(ctx, peer);
                    } else if let Some(applier) = vol.appliers.get_mut(&peer) {
                        applier.applying = Some(applying);
                    }
                    return Ok(());
                }
                Ok(Stop::Done(committed)) => {
                    applier.spooled = None;
                    break committed;
                }
                Err(DriverError(message)) => {
                    return Err(Failure::new(Invariant::Engine, format!("node {}: {message}", self.id)))
                }
            }
        };
        self.finish_apply(ctx, peer, *committed)?;
        let Some(vol) = &mut self.vol else { return Ok(()) };
        let last = self.db.progress.get(&pid).map_or(0, |p| p.applied);
        vol.replication
            .applied(pid, last)
            .map_err(|e| engine_error("Replication::applied", e))?;
        // What may be acknowledged is what is on disk; an idle applier flushes to learn it.
        let busy = vol.appliers.get(&peer).is_some_and(|a| a.queue.has_batch());
        if let Some(position) = vol.positions.get_mut(&pid) {
            // The flush is instant here: none is under way when the next batch commits.
            let mut flush = position.committed(last, busy, ctx.now);
            while flush {
                self.db.flush();
                flush = position.flushed(last, ctx.now);
            }
        }
        let applied = vol.positions.get(&pid).map_or(0, AppliedPosition::acknowledgeable);
        if vol.replication.is_connected(pid) {
            ctx.out.push(Output::Send {
                to: peer,
                msg: Message::Ack { applied },
            });
        }
        self.deliver_durable(ctx)?;
        self.wake_lock_waiters(ctx);
        self.want_capture(ctx);
        // The other appliers' first transactions may have waited for this one.
        self.want_apply(ctx);
        self.collection_after_step(ctx);
        Ok(())
    }

    /// What a committed apply transaction tells the oracle, the statistics and the review queue.
    fn finish_apply(&mut self, ctx: &mut Ctx, peer: usize, c: Committed) -> Result<(), Failure> {
        if let Some(&(origin, seq)) = c.changes.last() {
            ctx.oracle.committed_through(self.ix, origin, seq)?;
        }
        ctx.stats.apply_txs += 1;
        ctx.stats.merges += c.merged.len() as u64;
        ctx.stats.conflicts += c.conflicts as u64;
        ctx.stats.apply_waits += c.summary.waits;
        ctx.stats.keys_clear += c.summary.keys_clear;
        ctx.stats.deferred += c.summary.deferred;
        ctx.stats.review_opened += c.review.iter().filter(|a| matches!(a, ReviewAction::Open(_))).count() as u64;
        ctx.trace.add(mix(
            0x3E46 ^ (c.summary.applied << 8) ^ (c.applied << 24),
            (c.conflicts as u64) << 16 | c.summary.deferred << 8 | c.summary.undeferred,
        ));
        // The review queue is written in the apply transaction: a lost commit loses it too.
        let mut undo = c.undo;
        let ids: std::collections::BTreeSet<_> = c
            .review
            .iter()
            .map(|a| match a {
                ReviewAction::Open(item) => item.id,
                ReviewAction::Withdraw(id) => *id,
                ReviewAction::Close(closure) => closure.item.id,
            })
            .collect();
        undo.queue = ids
            .into_iter()
            .map(|id| (id, self.db.queue.get(&id).cloned()))
            .collect();
        apply_review(&mut self.db.queue, c.review, self.db.replays_closed)
            .map_err(|e| Failure::new(Invariant::Review, format!("node {} merge: {}", self.ix + 1, e.0)))?;
        // The oracle hears of the transaction once it is durable (`deliver_durable`).
        self.db.committed_async(
            undo,
            AppliedNote {
                changes: c.changes,
                merged: c.merged,
            },
        );
        if let Some((item, change)) = c.parked.into_iter().next() {
            // Nothing in this workload can overflow or mismatch: a park is a failure here.
            ctx.stats.parked += 1;
            let error = match &item.kind {
                accord_engine::ReviewKind::Unapplicable { error, .. } => error.clone(),
                other => format!("{other:?}"),
            };
            self.db.queue.insert(item.id, QueueEntry::Parked(item));
            return Err(Failure::new(
                Invariant::NothingDropped,
                format!(
                    "node {}: change {} of node {} (from node {}) parked: {error}",
                    self.ix + 1,
                    change.seq,
                    change.origin,
                    peer + 1
                ),
            ));
        }
        Ok(())
    }

    /// A one-line picture of the node's replication state, for liveness reports.
    pub fn describe(&self) -> String {
        let Some(vol) = &self.vol else {
            return format!("node {}: down", self.id);
        };
        let links: Vec<String> = (0..self.nodes)
            .filter(|&p| p != self.ix)
            .map(|p| {
                let pid = peer_id(p);
                format!(
                    "{pid}: connected {} unacked {:?} progress {:?}",
                    vol.replication.is_connected(pid),
                    vol.replication.unacked(pid).ok(),
                    vol.replication.progress(pid).ok()
                )
            })
            .collect();
        format!(
            "node {}: head {} queued {:?} spooled {:?} held {:?} waits {:?} read {} covered {} wal {} deferred {}; {}",
            self.id,
            self.db.outbound_head(),
            vol.appliers.values().map(|a| a.queue.len()).collect::<Vec<_>>(),
            vol.appliers
                .values()
                .map(|a| (a.spool.len(), a.spooled.as_ref().map(|s| s.segments.len())))
                .collect::<Vec<_>>(),
            vol.appliers
                .values()
                .map(|a| a.queue.held().map(|d| (d.node.0, d.through)))
                .collect::<Vec<_>>(),
            vol.appliers
                .values()
                .map(|a| a.applying.as_ref().map(|a| a.waiting))
                .collect::<Vec<_>>(),
            vol.read_lsn,
            self.db.covered_lsn(),
            self.db.wal_insert_lsn(),
            self.db.deferred.len(),
            links.join("; ")
        )
    }

    /// Everything this node captured is in every live peer's hands: its capture read its whole
    /// WAL, and every peer acknowledged its outbound head.
    pub fn handed_over(&self) -> bool {
        self.vol.as_ref().is_some_and(|vol| {
            vol.read_lsn > self.db.wal_insert_lsn()
                && vol
                    .replication
                    .peers()
                    .all(|p| vol.replication.unacked(p).is_ok_and(|n| n == 0))
        })
    }

    /// Whether the node has nothing left to do: capture caught up, nothing queued or deferred.
    pub fn is_idle(&self) -> bool {
        self.vol.as_ref().is_some_and(|v| {
            v.appliers
                .values()
                .all(|a| a.queue.is_empty() && a.applying.is_none() && a.spooled.is_none() && a.spool.is_empty())
                && v.read_lsn > self.db.wal_insert_lsn()
        }) && self.db.deferred.is_empty()
    }
}

/// Whether `from`'s applier waits, directly or through others, for `to`'s.
fn waits_for(appliers: &BTreeMap<usize, Applier>, from: usize, to: usize) -> bool {
    let mut at = from;
    for _ in 0..=appliers.len() {
        if at == to {
            return true;
        }
        match appliers.get(&at).and_then(|a| a.applying.as_ref()).map(|a| a.waiting) {
            Some(Waiting::Lock { holder }) => at = holder,
            _ => return false,
        }
    }
    false
}

/// What became of a group the capture decoded.
enum Grouped {
    Written,
    NothingToWrite,
    /// An applier holds the lock of a metadata row the group must load: nothing was done.
    Blocked,
}

/// The capture decodes the WAL's transactions at `lsns` and writes them as one group, as the
/// service's capture does: the engine's group writer decides what is written.
fn capture_group(
    db: &mut Db,
    vol: &mut Volatile,
    ix: usize,
    lsns: std::ops::RangeInclusive<u64>,
    ctx: &mut Ctx,
) -> Result<Grouped, Failure> {
    let node = ix + 1;
    let covered_before = vol.capturer.checkpoint().covered_lsn;
    // The table as these transactions wrote it: a group ends at a migration (`capture_tick`).
    let table = db.table_at(*lsns.start());
    let mut group = Vec::new();
    // A transaction of the group carries an `accord.mark`: the checkpoint is written whatever
    // else the group does, as the service's capture does.
    let mut marked = false;
    // Per transaction and row, the workload write it is (`None` for a merge's rows).
    let mut writes: Vec<Vec<Option<WriteId>>> = Vec::new();
    // Per transaction, the workload's deletes of a TRUNCATE, by key.
    let mut emptied: Vec<BTreeMap<i64, WriteId>> = Vec::new();
    for lsn in lsns {
        let Some(tx) = db.wal_tx(lsn) else {
            return Err(Failure::new(
                Invariant::Engine,
                format!("node {node}: WAL position {lsn} is gone before the capture read it"),
            ));
        };
        let truncated = match &tx.body {
            WalBody::Local {
                truncated: Some(keys), ..
            } => keys.iter().copied().collect(),
            _ => BTreeMap::new(),
        };
        let (from_peer, peer_applied, merged, rows, ids) = match &tx.body {
            WalBody::Local { rows, resolving, .. } => (
                false,
                Vec::new(),
                None,
                rows.iter()
                    .map(|r| DecodedRow {
                        table: ctx.table.name.clone(),
                        change: r.change.clone(),
                        resolving: resolving.clone(),
                    })
                    .collect::<Vec<_>>(),
                rows.iter().map(|r| r.write).collect(),
            ),
            WalBody::Merge {
                origin,
                applied,
                builds_on,
                stamp,
                rows,
            } => (
                // Planted: decoding loses the replication origin of a merge.
                ctx.bug != Some(PlantedBug::ForgetFromPeer),
                if ctx.bug == Some(PlantedBug::ForgetFromPeer) {
                    Vec::new()
                } else {
                    let mut positions = builds_on.clone();
                    positions.push((*origin, *applied));
                    positions
                },
                *stamp,
                rows.iter()
                    .map(|change| DecodedRow {
                        table: ctx.table.name.clone(),
                        change: change.clone(),
                        resolving: Vec::new(),
                    })
                    .collect(),
                vec![None; rows.len()],
            ),
            // Rows of neither kind: the capture records the mark, or the copy's clock and claims.
            WalBody::Mark | WalBody::Alter => (false, Vec::new(), None, Vec::new(), Vec::new()),
            WalBody::Copy { builds_on, stamp } => (true, builds_on.clone(), *stamp, Vec::new(), Vec::new()),
        };
        marked |= matches!(tx.body, WalBody::Mark);
        group.push(DecodedTransaction {
            end_lsn: tx.lsn,
            xid: tx.xid,
            commit_time: tx.commit_time,
            from_peer,
            peer_applied,
            merged,
            rows,
            // The service reads the keys the TRUNCATE's trigger recorded in its transaction.
            // The service captures a large transaction in parts; the simulator's are small.
            part: Default::default(),
            truncates: match &tx.body {
                WalBody::Local {
                    truncated: Some(keys), ..
                } => vec![Truncate {
                    before_row: 0,
                    table: ctx.table.name.clone(),
                    emptied: if ctx.bug == Some(PlantedBug::TruncateFromMetadata) {
                        db.meta
                            .iter()
                            .filter(|(k, m)| m.meta.is_alive() && !db.rows.contains_key(k))
                            .map(|(&k, _)| row_key(k))
                            .collect()
                    } else {
                        keys.iter().map(|&(k, _)| row_key(k)).collect()
                    },
                }],
                _ => Vec::new(),
            },
        });
        writes.push(ids);
        emptied.push(truncated);
    }
    let to_load = vol.capturer.rows_to_load(&group);
    // The service loads them `FOR UPDATE`: an applier's locks hold it off.
    let locked = to_load.iter().filter_map(|(_, key)| key_of(key)).any(|k| {
        vol.appliers
            .values()
            .filter_map(|a| a.applying.as_ref())
            .any(|a| a.holds_meta(k))
    });
    if locked {
        return Ok(Grouped::Blocked);
    }
    let loaded = to_load
        .iter()
        .map(|(_, key)| key_of(key).and_then(|k| db.meta.get(&k)).map(|m| m.as_shape(&table)))
        .collect();
    let table = &table;
    let write = vol
        .capturer
        .capture_group(
            |name| (name == table.name).then_some(table),
            &group,
            loaded,
            db.collection.cut.as_ref(),
        )
        .map_err(|e| engine_error("capture", e))?;

    // Every local write not covered before was captured, once.
    let mut captured: std::collections::BTreeSet<(usize, usize)> = std::collections::BTreeSet::new();
    let mut pending = emptied.clone();
    for c in &write.changes {
        if group[c.transaction].end_lsn <= covered_before {
            return Err(Failure::new(
                Invariant::ExactlyOnce,
                format!(
                    "node {node}: the capture stamped again a transaction its checkpoint covered (seq {})",
                    c.change.seq
                ),
            ));
        }
        if c.truncated {
            let key = key_of(&c.change.key).unwrap_or(-1);
            if pending[c.transaction].remove(&key).is_none() {
                return Err(Failure::new(
                    Invariant::LocalWrites,
                    format!(
                        "node {node}: the capture made a TRUNCATE delete row {key}, which the TRUNCATE did not empty"
                    ),
                ));
            }
            continue;
        }
        captured.insert((c.transaction, c.row));
    }
    for (ti, tx) in group.iter().enumerate() {
        if tx.end_lsn <= covered_before {
            continue;
        }
        if let Some((key, id)) = pending[ti].iter().next() {
            return Err(Failure::new(
                Invariant::NothingDropped,
                format!("node {node}: the capture dropped the TRUNCATE's delete {id} of row {key}"),
            ));
        }
        for (ri, id) in writes[ti].iter().enumerate() {
            if let Some(id) = id {
                if !captured.contains(&(ti, ri)) {
                    return Err(Failure::new(
                        Invariant::NothingDropped,
                        format!(
                            "node {node}: the capture dropped local write {id} on row {}",
                            tx.rows[ri].change.key
                        ),
                    ));
                }
            }
        }
    }

    // Which changes each local transaction made, as the simulator saw them committed.
    let mut first = 0;
    while let Some(c) = write.changes.get(first) {
        let end = write.changes[first..]
            .iter()
            .take_while(|d| d.transaction == c.transaction)
            .count();
        let last = write.changes[first + end - 1].change.seq;
        ctx.oracle.transaction_captured(ix, c.change.seq..=last);
        first += end;
    }
    // One transaction: outbound log, metadata, review queue, checkpoint.
    for c in &write.changes {
        let write = if c.truncated {
            key_of(&c.change.key).and_then(|k| emptied[c.transaction].get(&k).copied())
        } else {
            writes[c.transaction][c.row]
        };
        match write {
            Some(id) => {
                let fresh = !c.had_metadata && c.change.kind == ChangeKind::Insert;
                ctx.oracle.captured(ix, id, &c.change, fresh)?;
            }
            None => ctx.oracle.loop_detected(ix, &c.change)?,
        }
        if c.change.seq != db.outbound_head() + 1 {
            return Err(Failure::new(
                Invariant::ExactlyOnce,
                format!(
                    "node {node}: captured change {} does not follow the outbound log's head {}",
                    c.change.seq,
                    db.outbound_head()
                ),
            ));
        }
        ctx.trace
            .add(mix(c.change.stamp.physical, u64::from(c.change.stamp.logical)));
        ctx.stats.captured += 1;
        db.outbound.push_back(c.change.clone());
    }
    ctx.stats.review_opened += write
        .review
        .iter()
        .filter(|a| matches!(a, accord_engine::ReviewAction::Open(_)))
        .count() as u64;
    if !write.needs_write && !marked {
        return Ok(Grouped::NothingToWrite);
    }
    apply_review(&mut db.queue, write.review, db.replays_closed)
        .map_err(|e| Failure::new(Invariant::Review, format!("node {node} capture: {}", e.0)))?;
    for m in write.metas {
        let key = key_of(&m.key).ok_or_else(|| Failure::new(Invariant::Engine, "capture: a key of another table"))?;
        db.meta.insert(
            key,
            MetaRow {
                meta: m.meta,
                known_xmin: m.known_xmin,
                shape: table.shape_id(),
            },
        );
    }
    db.checkpoint = Some(write.checkpoint);
    vol.replication.logged(write.checkpoint.last_seq);
    Ok(Grouped::Written)
}
