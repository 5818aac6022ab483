//! The event loop: simulated time jumps from one event to the next; every event is handled to
//! completion before the next one, in (time, sequence) order, so a run depends only on its seed.
//! It owns the nodes, their clocks, the network, the fault injector and the liveness phase.

use std::cmp::Ordering;
use std::collections::BinaryHeap;

use accord_engine::{Message, TableDef};

use crate::clock::SimClock;
use crate::config::{FaultKind, PlantedBug, SimConfig};
use crate::network::Network;
use crate::node::{Ctx, Node, Output, Timer};
use crate::oracle::Oracle;
use crate::outcome::{Failure, Invariant, Stats};
use crate::rng::SimRng;
use crate::swarm::Params;
use crate::table::table;
use crate::trace::{mix, Trace, TraceLine};
use crate::workload;

mod join;
mod leave;

/// Simulated time starts here (µs since the Unix epoch, late 2023), so stamps look like real ones.
pub const EPOCH: u64 = 1_700_000_000_000_000;

/// RNG stream numbers, one per concern.
const STREAM_SWARM: u64 = 1;
const STREAM_WORKLOAD: u64 = 2;
const STREAM_NET: u64 = 3;
const STREAM_FAULT: u64 = 4;
const STREAM_NODE: u64 = 5;
const STREAM_CLOCK: u64 = 6;
const STREAM_JOIN: u64 = 7;
const STREAM_LEAVE: u64 = 8;
const STREAM_MIGRATE: u64 = 9;

#[derive(Debug)]
enum EventKind {
    Op,
    NodeTimer {
        node: usize,
        inc: u32,
        timer: Timer,
    },
    LinkReady {
        link: usize,
    },
    Dial {
        pair: usize,
    },
    HandshakeTimeout {
        pair: usize,
        epoch: u64,
    },
    IdleTimeout {
        link: usize,
        gen: u64,
    },
    Break {
        pair: usize,
        epoch: u64,
    },
    Fault,
    Unblock {
        links: Vec<usize>,
    },
    Unclog {
        links: Vec<usize>,
    },
    ClockHeal {
        node: usize,
    },
    Restart {
        node: usize,
    },
    /// A local transaction that waited for a row an applier locked tries again: planned again
    /// from the same draws on the rows as they are now, as a statement in READ COMMITTED
    /// re-reads a row it waited for.
    LocalRetry {
        node: usize,
        draws: Box<SimRng>,
    },
    /// The next step of a node's join (`join.rs`).
    JoinStep,
    /// The next step of a node's leave (`leave.rs`).
    LeaveStep,
    /// The user runs the migration on this node (`SimConfig::migrate`), or tries again.
    /// `behind`: first stall the node's capture, so that the migration commits with local
    /// writes before it not captured yet, and appliers write under the new shape while the
    /// capture still reads the old one.
    Migrate {
        node: usize,
        behind: bool,
    },
}

impl EventKind {
    fn tag(&self) -> u64 {
        match self {
            EventKind::Op => 1,
            EventKind::NodeTimer { node, timer, .. } => 2 | (*node as u64) << 8 | timer.tag() << 16,
            EventKind::LinkReady { link } => 3 | (*link as u64) << 8,
            EventKind::Dial { pair } => 4 | (*pair as u64) << 8,
            EventKind::HandshakeTimeout { pair, .. } => 5 | (*pair as u64) << 8,
            EventKind::IdleTimeout { link, .. } => 6 | (*link as u64) << 8,
            EventKind::Break { pair, .. } => 7 | (*pair as u64) << 8,
            EventKind::Fault => 8,
            EventKind::Unblock { .. } => 9,
            EventKind::Unclog { .. } => 10,
            EventKind::ClockHeal { node } => 11 | (*node as u64) << 8,
            EventKind::Restart { node } => 12 | (*node as u64) << 8,
            EventKind::LocalRetry { node, .. } => 13 | (*node as u64) << 8,
            EventKind::JoinStep => 14,
            EventKind::LeaveStep => 15,
            EventKind::Migrate { node, behind } => 16 | (*node as u64) << 8 | u64::from(*behind) << 16,
        }
    }
}

struct Event {
    at: u64,
    seq: u64,
    kind: EventKind,
}

impl PartialEq for Event {
    fn eq(&self, other: &Self) -> bool {
        (self.at, self.seq) == (other.at, other.seq)
    }
}
impl Eq for Event {}
impl PartialOrd for Event {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Event {
    /// Reversed: `BinaryHeap` is a max-heap and the earliest event must come out first.
    fn cmp(&self, other: &Self) -> Ordering {
        (other.at, other.seq).cmp(&(self.at, self.seq))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Workload,
    Liveness,
}

/// The result of one run.
#[derive(Debug, Clone)]
pub struct RunResult {
    pub hash: u64,
    pub stats: Stats,
    pub failure: Option<Failure>,
    pub lines: Vec<TraceLine>,
}

pub struct World {
    pub(crate) cfg: SimConfig,
    pub(crate) params: Params,
    pub(crate) table: TableDef,
    now: u64,
    seq: u64,
    queue: BinaryHeap<Event>,
    pub(crate) nodes: Vec<Node>,
    clocks: Vec<SimClock>,
    net: Network,
    pub(crate) oracle: Oracle,
    pub(crate) stats: Stats,
    trace: Trace,
    rng_work: SimRng,
    rng_net: SimRng,
    rng_fault: SimRng,
    rng_node: SimRng,
    rng_clock: SimRng,
    rng_join: SimRng,
    /// A node's join in progress (`join.rs`).
    join: Option<join::JoinRun>,
    /// The donor a join registered the new node with, and when (simulated µs).
    join_registration: Option<(usize, u64)>,
    leave: Option<leave::LeaveRun>,
    rng_leave: SimRng,
    /// When the donor's node takes a registration in (the planted `join-skips-members-wait`).
    join_donor_refresh: Option<u64>,
    ops_done: u64,
    fresh: u64,
    phase: Phase,
    heal_at: u64,
    deadline: u64,
    /// When a node last did something (for the time the liveness phase took).
    last_activity: u64,
    out: Vec<Output>,
}

impl World {
    pub fn new(cfg: &SimConfig, record: bool) -> World {
        let mut swarm = SimRng::new(cfg.seed, STREAM_SWARM);
        let params = Params::draw(cfg, &mut swarm);
        let mut rng_clock = SimRng::new(cfg.seed, STREAM_CLOCK);
        let n = cfg.nodes;
        let band = params.clock_band as i64;
        let clocks = (0..n)
            .map(|_| {
                let offset = rng_clock.range(0, 2 * band as u64) as i64 - band;
                let drift = rng_clock.range(0, 2 * params.drift_ppm as u64) as i64 - params.drift_ppm;
                SimClock::new(EPOCH, offset, drift, params.clock_band)
            })
            .collect();
        let mut trace = Trace::new(record);
        trace.add(swarm.hash());
        World {
            cfg: cfg.clone(),
            table: table(cfg.inserts()),
            now: EPOCH,
            seq: 0,
            queue: BinaryHeap::new(),
            nodes: (0..n).map(|i| Node::new(i, n, cfg.inserts())).collect(),
            clocks,
            net: Network::new(n),
            oracle: Oracle::new(n, params.keys as usize),
            stats: Stats::default(),
            trace,
            rng_work: SimRng::new(cfg.seed, STREAM_WORKLOAD),
            rng_net: SimRng::new(cfg.seed, STREAM_NET),
            rng_fault: SimRng::new(cfg.seed, STREAM_FAULT),
            rng_node: SimRng::new(cfg.seed, STREAM_NODE),
            rng_clock,
            rng_join: SimRng::new(cfg.seed, STREAM_JOIN),
            join: None,
            join_registration: None,
            leave: None,
            rng_leave: SimRng::new(cfg.seed, STREAM_LEAVE),
            join_donor_refresh: None,
            ops_done: 0,
            fresh: 0,
            phase: Phase::Workload,
            heal_at: 0,
            deadline: u64::MAX,
            last_activity: EPOCH,
            out: Vec::new(),
            params,
        }
    }

    /// Whether the nodes run the migration (`SimConfig::migrate`).
    pub fn migrates(&self) -> bool {
        self.cfg.migrate
    }

    pub fn params(&self) -> &Params {
        &self.params
    }

    fn push(&mut self, at: u64, kind: EventKind) {
        self.seq += 1;
        self.queue.push(Event {
            at: at.max(self.now),
            seq: self.seq,
            kind,
        });
    }

    /// Runs to the end: the workload, then healing and the liveness phase, then the final checks.
    pub fn run(mut self) -> RunResult {
        let failure = self.run_inner().err().map(|mut f| {
            if f.at == 0 {
                f.at = self.now - EPOCH;
            }
            f
        });
        self.stats.sim_time = self.now - EPOCH;
        let hash = self.final_hash();
        RunResult {
            hash,
            stats: self.stats,
            failure,
            lines: self.trace.into_lines(),
        }
    }

    fn final_hash(&self) -> u64 {
        [
            self.rng_work.hash(),
            self.rng_net.hash(),
            self.rng_fault.hash(),
            self.rng_node.hash(),
            self.rng_clock.hash(),
        ]
        .into_iter()
        .fold(self.trace.hash(), mix)
    }

    fn run_inner(&mut self) -> Result<(), Failure> {
        if self.cfg.join {
            self.plan_join();
        }
        if self.cfg.leave {
            self.plan_leave();
        }
        if self.cfg.migrate {
            self.plan_migrations();
        }
        for node in 0..self.nodes.len() {
            if !self.nodes[node].awaiting_join {
                self.with_node(node, |n, ctx| n.start(ctx))?;
            }
        }
        for a in 0..self.nodes.len() {
            for b in a + 1..self.nodes.len() {
                let pair = self.net.pair(a, b);
                self.push(self.now, EventKind::Dial { pair });
                self.net.conns[pair].dial_scheduled = true;
            }
        }
        if self.cfg.ops > 0 {
            self.push(self.now, EventKind::Op);
        } else {
            self.begin_liveness();
        }
        if self.params.faults_enabled() {
            let gap = self.rng_fault.exp(self.params.fault_gap_mean);
            self.push(self.now + gap, EventKind::Fault);
        }
        while let Some(event) = self.queue.pop() {
            if event.at > self.deadline {
                // Leftover timers (a restart of a node already up, ...) may lie beyond the bound.
                if self.check_quiescent().is_ok() {
                    break;
                }
                self.now = self.deadline;
                return Err(self.liveness_failure("did not converge within the bound"));
            }
            self.now = event.at;
            self.stats.events += 1;
            self.trace.add(mix(event.at, event.kind.tag()));
            let recording = self.trace.is_recording();
            let text = recording.then(|| format!("t={} {:?}", event.at - EPOCH, short(&event.kind)));
            self.handle(event.kind)?;
            if let Some(text) = text {
                let rng = self.final_hash();
                self.trace.line(|| format!("{text} rng={rng:016x}"));
            }
        }
        if self.phase == Phase::Workload {
            return Err(Failure::new(
                Invariant::Liveness,
                "the event queue ran dry during the workload",
            ));
        }
        self.check_quiescent()?;
        self.stats.converge_time = self.last_activity.saturating_sub(self.heal_at);
        let expected = crate::check::final_check(self)?;
        self.stats.inserts_beaten_across_collection = expected.inserts_beaten_across_collection;
        let displaced = |open: bool| {
            expected
                .queue
                .values()
                .filter(|e| {
                    let (item, is_open) = match e {
                        crate::db::QueueEntry::Open(item) => (item, true),
                        crate::db::QueueEntry::Closed(item, _) | crate::db::QueueEntry::Parked(item) => (item, false),
                    };
                    is_open == open && matches!(item.kind, accord_engine::ReviewKind::DisplacedInsert { .. })
                })
                .count() as u64
        };
        self.stats.displaced_inserts = displaced(true);
        self.stats.displaced_resolved = displaced(false);
        Ok(())
    }

    fn handle(&mut self, kind: EventKind) -> Result<(), Failure> {
        match kind {
            EventKind::Op => self.op(),
            EventKind::NodeTimer { node, inc, timer } => {
                if self.nodes[node].inc != inc || !self.nodes[node].is_up() {
                    return Ok(());
                }
                self.with_node(node, |n, ctx| match timer {
                    Timer::Capture => n.capture_tick(ctx),
                    Timer::Apply(peer) => n.apply_step(ctx, peer),
                    Timer::CausalWaitOver(peer) => {
                        n.want_apply_of(ctx, peer);
                        Ok(())
                    }
                    Timer::Prune => {
                        n.prune();
                        Ok(())
                    }
                    Timer::Round => n.round_tick(ctx),
                })
            }
            EventKind::LinkReady { link } => self.link_ready(link),
            EventKind::Dial { pair } => self.dial(pair),
            EventKind::HandshakeTimeout { pair, epoch } => {
                let conn = &self.net.conns[pair];
                if conn.epoch == epoch && !conn.is_up() {
                    self.close(pair);
                }
                Ok(())
            }
            EventKind::IdleTimeout { link, gen } => {
                let l = &self.net.links[link];
                if l.blocked > 0 && l.block_gen == gen {
                    let n = self.nodes.len();
                    let pair = self.net.pair(link / n, link % n);
                    self.close(pair);
                }
                Ok(())
            }
            EventKind::Break { pair, epoch } => {
                if self.net.conns[pair].epoch == epoch {
                    self.stats.drops += 1;
                    self.close(pair);
                }
                Ok(())
            }
            EventKind::Fault => self.fault(),
            EventKind::Unblock { links } => {
                for link in links {
                    self.unblock(link);
                }
                Ok(())
            }
            EventKind::Unclog { links } => {
                for link in links {
                    let l = &mut self.net.links[link];
                    l.clogged = l.clogged.saturating_sub(1);
                }
                Ok(())
            }
            EventKind::ClockHeal { node } => {
                let band = self.params.clock_band;
                let offset = self.rng_clock.range(0, 2 * band) as i64 - band as i64;
                self.clocks[node].heal(self.now, offset);
                Ok(())
            }
            EventKind::Restart { node } => self.restart(node),
            EventKind::LocalRetry { node, draws } => self.local_tx(node, *draws),
            EventKind::JoinStep => self.join_step(),
            EventKind::LeaveStep => self.leave_step(),
            EventKind::Migrate { node, behind } => self.migrate(node, behind),
        }
    }

    /// Runs a node handler with its context, then carries out what it asked for.
    fn with_node(
        &mut self,
        node: usize,
        f: impl FnOnce(&mut Node, &mut Ctx) -> Result<(), Failure>,
    ) -> Result<(), Failure> {
        let physical = self.clocks[node].read(self.now);
        self.last_activity = self.now;
        let mut out = std::mem::take(&mut self.out);
        let mut ctx = Ctx {
            now: self.now,
            physical,
            table: &self.table,
            params: &self.params,
            bug: self.cfg.bug,
            oracle: &mut self.oracle,
            stats: &mut self.stats,
            trace: &mut self.trace,
            rng: &mut self.rng_node,
            out: &mut out,
        };
        let result = f(&mut self.nodes[node], &mut ctx);
        for output in out.drain(..) {
            match output {
                Output::Send { to, msg } => self.send(node, to, msg),
                Output::Timer { at, timer } => {
                    let inc = self.nodes[node].inc;
                    self.push(at, EventKind::NodeTimer { node, inc, timer });
                }
                Output::Close { peer } => {
                    let pair = self.net.pair(node, peer);
                    self.close(pair);
                }
            }
        }
        self.out = out;
        result
    }

    fn op(&mut self) -> Result<(), Failure> {
        let node = self.rng_work.index(self.nodes.len());
        self.ops_done += 1;
        let draws = self.rng_work.clone();
        // The draws the transaction's plan takes, as if it were planned now.
        let mut skipped = self.rng_work.clone();
        workload::plan(
            &mut skipped,
            &self.params,
            &self.nodes[node].db,
            &mut self.fresh.clone(),
        );
        self.rng_work = skipped;
        self.local_tx(node, draws)?;
        if self.ops_done < self.cfg.ops {
            let gap = self.rng_work.exp(self.params.op_gap_mean);
            self.push(self.now + gap, EventKind::Op);
        } else {
            self.begin_liveness();
        }
        Ok(())
    }

    /// Each node's migration, at a time of its own within the workload's first two thirds, so
    /// that migrated and unmigrated nodes write side by side for a while.
    fn plan_migrations(&mut self) {
        let mut rng = SimRng::new(self.cfg.seed, STREAM_MIGRATE);
        let span = (self.cfg.ops as f64 * self.params.op_gap_mean) as u64;
        for node in 0..self.nodes.len() {
            let at = self.now + span / 10 + rng.below(span / 2 + 1);
            let behind = rng.chance(0.5);
            self.push(at, EventKind::Migrate { node, behind });
        }
    }

    /// The migration on `node`; tried again shortly while an apply holds the table or
    /// PostgreSQL is down.
    fn migrate(&mut self, node: usize, behind: bool) -> Result<(), Failure> {
        if self.nodes[node].gone {
            return Ok(());
        }
        if behind {
            let stall = (40.0 * self.params.op_gap_mean) as u64 + 1;
            let n = &mut self.nodes[node];
            n.capture_stalled_until = n.capture_stalled_until.max(self.now + stall);
            self.push(self.now + stall / 2, EventKind::Migrate { node, behind: false });
            return Ok(());
        }
        let mut done = false;
        self.with_node(node, |n, ctx| {
            done = n.migrate(ctx)?;
            Ok(())
        })?;
        if !done {
            let at = self.now + self.params.lock_retry_max.max(1);
            self.push(at, EventKind::Migrate { node, behind: false });
        }
        Ok(())
    }

    /// A local transaction on `node`, planned with `draws`. It waits while an applier holds a
    /// row it writes; the workload's end, or PostgreSQL going down, ends it unwritten.
    fn local_tx(&mut self, node: usize, draws: SimRng) -> Result<(), Failure> {
        let n = &self.nodes[node];
        if n.pg_down || n.awaiting_join || n.leaving || self.phase != Phase::Workload {
            self.stats.ops_skipped += 1;
            return Ok(());
        }
        let mut rng = draws.clone();
        let plan = workload::plan(&mut rng, &self.params, &self.nodes[node].db, &mut self.fresh);
        let keys: Vec<i64> = plan.rows.iter().map(|r| r.key).collect();
        let trigger = self.cfg.bug != Some(PlantedBug::NoKeyLockTrigger);
        let blocked = if plan.truncate {
            self.nodes[node].truncate_blocked()
        } else {
            self.nodes[node].local_write_blocked(&keys, trigger)
        };
        if blocked {
            self.stats.local_lock_waits += 1;
            let at = self.now + self.rng_work.range(1, self.params.lock_retry_max);
            self.push(
                at,
                EventKind::LocalRetry {
                    node,
                    draws: Box::new(draws),
                },
            );
            return Ok(());
        }
        self.with_node(node, |n, ctx| n.commit_local(ctx, plan))
    }

    fn send(&mut self, from: usize, to: usize, msg: Message) {
        let pair = self.net.pair(from, to);
        let epoch = self.net.conns[pair].epoch;
        let link = self.net.link_ix(from, to);
        let clogged = self.net.links[link].clogged > 0;
        let latency = self.net.latency(&mut self.rng_net, &self.params, clogged);
        if let Some(at) = self.net.enqueue(link, self.now, latency, epoch, false, msg) {
            self.push(at, EventKind::LinkReady { link });
        }
        if self.phase == Phase::Workload && self.rng_net.chance(self.params.drop_p) {
            let at = self.now + self.rng_net.below(latency + 1);
            self.push(at, EventKind::Break { pair, epoch });
        }
    }

    fn link_ready(&mut self, link: usize) -> Result<(), Failure> {
        let l = &mut self.net.links[link];
        l.scheduled = false;
        if l.blocked > 0 {
            return Ok(());
        }
        let Some(flight) = l.queue.pop_front() else {
            return Ok(());
        };
        let n = self.nodes.len();
        let (from, to) = (link / n, link % n);
        let result = self.deliver(from, to, link, flight);
        if let Some(at) = self.net.next_due(link, self.now) {
            self.push(at, EventKind::LinkReady { link });
        }
        result
    }

    fn deliver(
        &mut self,
        from: usize,
        to: usize,
        link: usize,
        flight: crate::network::InFlight,
    ) -> Result<(), Failure> {
        let pair = self.net.pair(from, to);
        if !self.nodes[to].is_up() {
            return Ok(());
        }
        if flight.epoch != self.net.conns[pair].epoch {
            // A message of a closed connection. A real transport drops it; sometimes it turns up
            // on the next connection instead (duplicate, reordered).
            let late = matches!(flight.msg, Message::Batch(_) | Message::Ack { .. });
            if late && !flight.ghost && self.rng_net.chance(self.params.ghost_p) {
                self.net.links[link].ghosts.push(flight.msg);
            }
            return Ok(());
        }
        // A batch lost inside a connection: QUIC never does this, but a faulty transport or
        // sender could, and it is what makes a receiver meet a gap. The connection is then
        // faulty: the receiver's refusal of the gap closes it, and so does the transport soon
        // after (when no later batch reveals the gap, the sender must still resend).
        if self.phase == Phase::Workload
            && matches!(flight.msg, Message::Batch(_))
            && self.params.ghost_p > 0.0
            && self.rng_net.chance(self.params.ghost_p / 50.0)
        {
            self.stats.ghosts += 1;
            self.net.conns[pair].ghost_epoch = Some(flight.epoch);
            let at = self.now + self.rng_net.range(1, 5_000);
            self.push(
                at,
                EventKind::Break {
                    pair,
                    epoch: flight.epoch,
                },
            );
            return Ok(());
        }
        self.stats.deliveries += 1;
        self.trace.add(mix(0xDE11 | (link as u64) << 16, msg_tag(&flight.msg)));
        let conn = &mut self.net.conns[pair];
        if flight.ghost {
            conn.ghost_epoch = Some(conn.epoch);
        }
        let ghost = conn.ghost_epoch == Some(conn.epoch);
        match flight.msg {
            Message::Hello(hello) => self.on_hello(from, to, hello),
            Message::Refused(_) => {
                self.close(pair);
                Ok(())
            }
            Message::Batch(batch) => {
                self.stats.changes_delivered += batch.len() as u64;
                self.with_node(to, |n, ctx| n.on_batch(ctx, from, batch, ghost))
            }
            Message::Ack { applied } => self.with_node(to, |n, ctx| n.on_ack(ctx, from, applied, ghost)),
            Message::Ping { .. } => Ok(()),
            Message::Members(members) => self.with_node(to, |n, ctx| n.on_members(ctx, from, members)),
            Message::Collection(state) => self.with_node(to, |n, ctx| n.on_collection(ctx, state)),
            Message::Shapes(shapes) => self.with_node(to, |n, _| {
                n.on_shapes(shapes);
                Ok(())
            }),
            // The simulated nodes run no `accord verify`.
            Message::Verify(_) => Ok(()),
        }
    }

    fn on_hello(&mut self, from: usize, to: usize, hello: accord_engine::Hello) -> Result<(), Failure> {
        let pair = self.net.pair(from, to);
        let physical = self.clocks[to].read(self.now);
        if let Err(refusal) = self.nodes[to].check_hello(&hello, physical, self.params.max_offset) {
            // Loudly: counted, and the connection closes.
            self.stats.refused_hellos += 1;
            self.trace.add(mix(
                0x4E1,
                matches!(refusal, accord_engine::Refusal::ClockAhead { .. }) as u64,
            ));
            self.close(pair);
            return Ok(());
        }
        let side = usize::from(to > from);
        self.net.conns[pair].up[side] = true;
        if to > from {
            // The answering side says hello first, so its batches follow the hello on the stream.
            let reply = self.nodes[to].hello(from, physical);
            self.send(to, from, Message::Hello(reply));
        }
        self.with_node(to, |n, ctx| n.connected(ctx, from, hello.applied_yours))?;
        let conn = &mut self.net.conns[pair];
        if conn.is_up() {
            conn.dialing = false;
            conn.backoff = 0;
            self.stats.connections += 1;
            let epoch = conn.epoch;
            for (a, b) in [(from, to), (to, from)] {
                let link = self.net.link_ix(a, b);
                let ghosts = std::mem::take(&mut self.net.links[link].ghosts);
                for msg in ghosts {
                    self.stats.ghosts += 1;
                    let latency = self.net.latency(&mut self.rng_net, &self.params, false);
                    if let Some(at) = self.net.enqueue(link, self.now, latency, epoch, true, msg) {
                        self.push(at, EventKind::LinkReady { link });
                    }
                }
            }
        }
        Ok(())
    }

    fn dial(&mut self, pair: usize) -> Result<(), Failure> {
        let (a, b) = self.net.ends(pair);
        let conn = &mut self.net.conns[pair];
        conn.dial_scheduled = false;
        if conn.is_up() || conn.dialing {
            return Ok(());
        }
        if !self.nodes[a].is_up() {
            return Ok(()); // it dials when it starts
        }
        conn.epoch += 1;
        conn.up = [false, false];
        conn.dialing = true;
        let epoch = conn.epoch;
        let physical = self.clocks[a].read(self.now);
        let hello = self.nodes[a].hello(b, physical);
        self.send(a, b, Message::Hello(hello));
        self.push(
            self.now + self.params.handshake_timeout,
            EventKind::HandshakeTimeout { pair, epoch },
        );
        Ok(())
    }

    /// Closes a pair's connection: both sides learn it, in-flight messages become stale, and the
    /// dialing side tries again after a backoff.
    fn close(&mut self, pair: usize) {
        let (a, b) = self.net.ends(pair);
        let conn = &mut self.net.conns[pair];
        conn.epoch += 1;
        let was = conn.up;
        conn.up = [false, false];
        conn.dialing = false;
        self.trace.add(mix(0xC105E, pair as u64));
        if was[0] {
            let _ = self.with_node(a, |n, ctx| {
                n.disconnected(ctx, b);
                Ok(())
            });
        }
        if was[1] {
            let _ = self.with_node(b, |n, ctx| {
                n.disconnected(ctx, a);
                Ok(())
            });
        }
        self.schedule_dial(pair);
    }

    fn schedule_dial(&mut self, pair: usize) {
        let conn = &mut self.net.conns[pair];
        if conn.dial_scheduled {
            return;
        }
        conn.dial_scheduled = true;
        conn.backoff = (conn.backoff * 2).clamp(self.params.backoff_min, self.params.backoff_max);
        let at = self.now + conn.backoff / 2 + self.rng_net.below(conn.backoff / 2 + 1);
        self.push(at, EventKind::Dial { pair });
    }

    fn block(&mut self, link: usize) {
        let l = &mut self.net.links[link];
        l.blocked += 1;
        l.block_gen += 1;
        let gen = l.block_gen;
        self.push(
            self.now + self.params.conn_timeout,
            EventKind::IdleTimeout { link, gen },
        );
    }

    fn unblock(&mut self, link: usize) {
        let l = &mut self.net.links[link];
        l.blocked = l.blocked.saturating_sub(1);
        if let Some(at) = self.net.next_due(link, self.now) {
            self.push(at, EventKind::LinkReady { link });
        }
    }

    fn restart(&mut self, node: usize) -> Result<(), Failure> {
        if self.nodes[node].is_up() || self.nodes[node].awaiting_join || self.nodes[node].gone {
            return Ok(());
        }
        self.with_node(node, |n, ctx| n.start(ctx))?;
        for other in 0..self.nodes.len() {
            if other != node {
                let pair = self.net.pair(node, other);
                if !self.net.conns[pair].dial_scheduled {
                    self.net.conns[pair].dial_scheduled = true;
                    self.push(self.now, EventKind::Dial { pair });
                }
            }
        }
        Ok(())
    }

    fn crash(&mut self, node: usize, machine: bool) {
        self.nodes[node].crash(machine);
        for other in 0..self.nodes.len() {
            if other != node {
                let pair = self.net.pair(node, other);
                self.close(pair);
            }
        }
    }

    fn duration(&mut self) -> u64 {
        self.rng_fault.range(1_000, self.params.fault_duration_max)
    }

    fn fault(&mut self) -> Result<(), Failure> {
        if self.phase != Phase::Workload {
            return Ok(());
        }
        let n = self.nodes.len();
        let kind = FaultKind::ALL[self.rng_fault.weighted(&self.params.fault_weights)];
        let node = self.rng_fault.index(n);
        let mut other = self.rng_fault.index(n - 1);
        if other >= node {
            other += 1;
        }
        let duration = self.duration();
        match kind {
            FaultKind::Crash | FaultKind::MachineCrash => {
                if self.nodes[node].is_up() {
                    let machine = kind == FaultKind::MachineCrash;
                    if machine {
                        self.stats.machine_crashes += 1;
                    } else {
                        self.stats.crashes += 1;
                    }
                    self.crash(node, machine);
                    self.push(self.now + duration, EventKind::Restart { node });
                }
            }
            FaultKind::Partition => {
                self.stats.partitions += 1;
                let links: Vec<usize> = match self.rng_fault.below(4) {
                    // One node cut off from everyone, both ways.
                    0 => (0..n)
                        .filter(|&o| o != node)
                        .flat_map(|o| [self.net.link_ix(node, o), self.net.link_ix(o, node)])
                        .collect(),
                    // One link, one way.
                    1 => vec![self.net.link_ix(node, other)],
                    // One link, both ways.
                    2 => vec![self.net.link_ix(node, other), self.net.link_ix(other, node)],
                    // Split brain: a random group against the rest.
                    _ => {
                        let group: Vec<bool> = (0..n).map(|_| self.rng_fault.chance(0.5)).collect();
                        let mut links = Vec::new();
                        for a in 0..n {
                            for b in 0..n {
                                if group[a] != group[b] {
                                    links.push(self.net.link_ix(a, b));
                                }
                            }
                        }
                        links
                    }
                };
                for &link in &links {
                    self.block(link);
                }
                self.push(self.now + duration, EventKind::Unblock { links });
            }
            FaultKind::Clog => {
                self.stats.clogs += 1;
                let links: Vec<usize> = if self.rng_fault.chance(0.5) {
                    (0..n)
                        .filter(|&o| o != node)
                        .flat_map(|o| [self.net.link_ix(node, o), self.net.link_ix(o, node)])
                        .collect()
                } else {
                    vec![self.net.link_ix(node, other)]
                };
                for &link in &links {
                    self.net.links[link].clogged += 1;
                }
                self.push(self.now + duration, EventKind::Unclog { links });
            }
            FaultKind::Drop | FaultKind::Ghost => {
                // Break a connection with whatever is in flight on it; with ghosts enabled some
                // of that turns up late on the next connection.
                let pair = self.net.pair(node, other);
                if self.net.conns[pair].is_up() {
                    self.stats.drops += 1;
                    self.close(pair);
                }
            }
            FaultKind::ClockStep => {
                self.stats.clock_steps += 1;
                let band = self.params.clock_band;
                if self.rng_fault.chance(0.7) {
                    let offset = self.rng_fault.range(0, 2 * band) as i64 - band as i64;
                    if !self.clocks[node].is_rogue() {
                        self.clocks[node].set(self.now, offset);
                    }
                } else {
                    let ppm = self.params.drift_ppm.max(1) as u64;
                    let drift = self.rng_fault.range(0, 2 * ppm) as i64 - ppm as i64;
                    self.clocks[node].set_drift(self.now, drift);
                }
            }
            FaultKind::RogueClock => {
                if !self.clocks[node].is_rogue() {
                    self.stats.rogue_clocks += 1;
                    let max = self.params.max_offset;
                    let offset = max + self.rng_fault.range(max / 10 + 1, 4 * max);
                    self.clocks[node].go_rogue(self.now, offset as i64);
                    self.push(self.now + duration, EventKind::ClockHeal { node });
                }
            }
            FaultKind::CaptureStall => {
                self.stats.capture_stalls += 1;
                let until = self.now + duration;
                let n = &mut self.nodes[node];
                n.capture_stalled_until = n.capture_stalled_until.max(until);
            }
            FaultKind::Toast => {}
        }
        let gap = self.rng_fault.exp(self.params.fault_gap_mean);
        self.push(self.now + gap.max(1), EventKind::Fault);
        Ok(())
    }

    /// The workload is done: heal every fault and give the cluster a bounded time to converge.
    fn begin_liveness(&mut self) {
        self.phase = Phase::Liveness;
        self.heal_at = self.now;
        for link in 0..self.net.links.len() {
            let l = &mut self.net.links[link];
            l.clogged = 0;
            if l.blocked > 0 {
                l.blocked = 1;
                self.unblock(link);
            }
        }
        for node in 0..self.nodes.len() {
            if self.clocks[node].is_rogue() {
                self.push(self.now, EventKind::ClockHeal { node });
            }
            self.nodes[node].capture_stalled_until = self.now;
            if !self.nodes[node].is_up() {
                self.push(self.now, EventKind::Restart { node });
            }
        }
        self.deadline = self.now + self.liveness_bound();
    }

    /// How long convergence may take after healing: a fixed allowance for reconnecting and for
    /// stamps of a clock that ran ahead to become acceptable, plus the time to drain the largest
    /// possible backlog at the slowest rate this regime allows (a window of changes per round
    /// trip, each round trip as slow as the latency tail and the node delays).
    fn liveness_bound(&self) -> u64 {
        let p = &self.params;
        let round_trip =
            2 * (p.latency_base + p.latency_jitter + p.latency_tail) + p.capture_lag_max + p.apply_delay_max;
        let per_round = (p.window as usize).min(p.max_batch).max(1) as u64;
        let backlog = self.oracle.writes.len() as u64 + 1;
        30_000_000 + 5 * p.max_offset + 4 * round_trip * (backlog / per_round + 1)
    }

    fn liveness_failure(&self, what: &str) -> Failure {
        let mut lag = Vec::new();
        for node in 0..self.nodes.len() {
            for origin in 0..self.nodes.len() {
                let (applied, head) = (self.oracle.applied_upto(node, origin), self.oracle.head(origin));
                if origin != node && applied != head {
                    lag.push(format!(
                        "node {} applied {applied}/{head} of node {}",
                        node + 1,
                        origin + 1
                    ));
                }
            }
            if !self.nodes[node].is_idle() {
                lag.push(format!("node {} is not idle", node + 1));
            }
            lag.push(self.nodes[node].describe());
        }
        for a in 0..self.nodes.len() {
            for b in a + 1..self.nodes.len() {
                let c = &self.net.conns[self.net.pair(a, b)];
                lag.push(format!(
                    "connection {}-{}: epoch {} up {:?} dialing {} dial scheduled {}",
                    a + 1,
                    b + 1,
                    c.epoch,
                    c.up,
                    c.dialing,
                    c.dial_scheduled
                ));
            }
        }
        Failure::new(
            Invariant::Liveness,
            format!(
                "{what} ({:.1} s after healing): {}",
                (self.now - self.heal_at) as f64 / 1e6,
                if lag.is_empty() {
                    "no lag found".into()
                } else {
                    lag.join("; ")
                }
            ),
        )
    }

    /// Nothing is left to happen: every node must be up, idle, and hold every change.
    fn check_quiescent(&self) -> Result<(), Failure> {
        let stuck = (0..self.nodes.len()).filter(|&n| !self.nodes[n].gone).any(|node| {
            !self.nodes[node].is_up()
                || !self.nodes[node].is_idle()
                || (0..self.nodes.len()).any(|o| o != node && self.oracle.applied_upto(node, o) != self.oracle.head(o))
        });
        if stuck {
            return Err(self.liveness_failure("nothing left to happen, but not converged"));
        }
        Ok(())
    }
}

fn msg_tag(msg: &Message) -> u64 {
    match msg {
        Message::Hello(h) => mix(1, h.applied_yours),
        Message::Refused(_) => 2,
        Message::Batch(b) => mix(
            3 | (b.len() as u64) << 8,
            b.first().map_or(0, |c| c.seq) << 32 | b.last().map_or(0, |c| c.seq),
        ),
        Message::Ack { applied } => mix(4, *applied),
        Message::Ping { .. } => 5,
        Message::Collection(c) => mix(6, c.round),
        Message::Members(m) => mix(7, m.len() as u64),
        Message::Shapes(s) => mix(8, s.len() as u64),
        Message::Verify(v) => mix(9, v.round()),
    }
}

/// An event without its payload, for trace lines.
fn short(kind: &EventKind) -> String {
    match kind {
        EventKind::Unblock { links } => format!("Unblock {links:?}"),
        EventKind::Unclog { links } => format!("Unclog {links:?}"),
        other => format!("{other:?}"),
    }
}
