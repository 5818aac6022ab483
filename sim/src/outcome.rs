//! What a run reports: the invariant a failure broke and counters of what happened.

use std::fmt;

/// Which promise a failure broke: the invariants of PRODUCT.md by number, plus liveness, the
/// engine's own contract (no errors on valid input, consistent outputs), and the protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Invariant {
    Convergence,
    Delta,
    Lww,
    Review,
    ExactlyOnce,
    NoLoops,
    Clocks,
    LocalWrites,
    NothingDropped,
    Liveness,
    Engine,
    Protocol,
    Atomicity,
}

impl fmt::Display for Invariant {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Invariant::Convergence => "invariant 1 (convergence)",
            Invariant::Delta => "invariant 2 (delta columns)",
            Invariant::Lww => "invariant 3 (lww columns)",
            Invariant::Review => "invariant 4 (review columns)",
            Invariant::ExactlyOnce => "invariant 5 (exactly once)",
            Invariant::NoLoops => "invariant 6 (no loops)",
            Invariant::Clocks => "invariant 7 (clocks)",
            Invariant::LocalWrites => "invariant 8 (local writes meet merges)",
            Invariant::NothingDropped => "invariant 9 (nothing dropped silently)",
            Invariant::Liveness => "liveness",
            Invariant::Engine => "engine contract",
            Invariant::Protocol => "replication protocol",
            Invariant::Atomicity => "atomicity (a source transaction applies whole)",
        })
    }
}

/// A broken promise, with when (simulated µs since the start) and what exactly.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    pub invariant: Invariant,
    pub at: u64,
    pub message: String,
}

impl Failure {
    pub fn new(invariant: Invariant, message: impl Into<String>) -> Self {
        Failure {
            invariant,
            at: 0,
            message: message.into(),
        }
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} at t={}.{:06}s: {}",
            self.invariant,
            self.at / 1_000_000,
            self.at % 1_000_000,
            self.message
        )
    }
}

/// Counters of one run. The fault and refusal counters are how "loudly" shows up here.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stats {
    pub events: u64,
    /// Messages handed to a node (hellos, batches, acks).
    pub deliveries: u64,
    /// Changes inside delivered batches.
    pub changes_delivered: u64,
    pub local_txs: u64,
    pub ops_skipped: u64,
    pub captured: u64,
    pub merges: u64,
    pub apply_txs: u64,
    /// Apply transactions rolled back to wait for the capture (HARD-PARTS §2).
    pub apply_waits: u64,
    /// Missing rows merged without waiting for the capture (`engine::RemovalCount`).
    pub keys_clear: u64,
    /// Times an applier waited for a lock another held, and deadlocks among appliers (each
    /// costs a rolled-back batch, tried again after a pause).
    pub lock_waits: u64,
    pub deadlocks: u64,
    /// Transactions applied before what they build on, because its node stayed away.
    pub causal_waivers: u64,
    /// Local TRUNCATEs committed.
    pub truncates: u64,
    /// Large transactions spooled by a receiver and applied in segments, the changes that went
    /// to a spool, and the times such a transaction started over from its first segment.
    pub spooled_transactions: u64,
    pub spooled_changes: u64,
    pub spool_start_overs: u64,
    /// Times a local writer or the capture found a row or its metadata locked by an applier.
    pub local_lock_waits: u64,
    pub capture_lock_waits: u64,
    pub deferred: u64,
    pub parked: u64,
    pub conflicts: u64,
    pub review_opened: u64,
    pub resolutions: u64,
    pub duplicates_skipped: u64,
    pub crashes: u64,
    pub machine_crashes: u64,
    pub partitions: u64,
    pub clogs: u64,
    pub drops: u64,
    pub ghosts: u64,
    pub clock_steps: u64,
    pub rogue_clocks: u64,
    pub capture_stalls: u64,
    pub connections: u64,
    /// Hellos refused (clock ahead, ...), and batches refused for a stamp beyond the offset.
    pub refused_hellos: u64,
    pub refused_batches: u64,
    /// Protocol errors caused by ghost deliveries (tolerated: the connection closes).
    pub ghost_errors: u64,
    /// Tombstone collection: rounds the coordinator started, rounds node 1 saw complete,
    /// tombstones dropped on all nodes, and fresh inserts that lost the row to a concurrent
    /// re-insert numbered from a tombstone (the accepted window, ARCHITECTURE.md).
    pub collection_rounds_started: u64,
    pub collection_rounds_completed: u64,
    pub tombstones_collected: u64,
    pub inserts_beaten_across_collection: u64,
    /// Open displaced-insert items at the end, and resolved ones (`--review-inserts`).
    pub displaced_inserts: u64,
    pub displaced_resolved: u64,
    /// Nodes that ran the migration (`SimConfig::migrate`), and batches that waited because a
    /// node could not read a change's shape yet.
    pub migrations: u64,
    pub shape_waits: u64,
    /// Batches split so that the transactions before one that waits for a shape are applied
    /// (as the service splits them).
    pub shape_splits: u64,
    /// Simulated µs at the end of the run.
    pub sim_time: u64,
    /// Simulated µs the liveness phase took to converge after healing.
    pub converge_time: u64,
    /// Joins begun (`SimConfig::join`), chunks they wrote, marks they waited on, join
    /// processes killed, and when the node joined (µs of simulated time; 0: it did not).
    pub joins: u64,
    pub join_chunks: u64,
    pub join_marks: u64,
    pub join_kills: u64,
    pub joined_at: u64,
    /// Links a node added when it learned of a joining node, and how long (simulated µs) joins
    /// waited for every node to know of the new one before reading positions.
    pub members_added: u64,
    pub join_member_wait: u64,
    /// Leaves begun (`SimConfig::leave`), links nodes dropped for a node that left, and when the
    /// leaving node stopped (µs of simulated time; 0: it did not).
    pub leaves: u64,
    pub members_removed: u64,
    pub left_at: u64,
}
