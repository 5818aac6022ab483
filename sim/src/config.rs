//! What a run is: the seed and the knobs a user can set. Everything else a run does is drawn from
//! the seed (see `swarm`), so the seed plus these knobs replay a run exactly.

use std::fmt;
use std::str::FromStr;

use thiserror::Error;

/// A kind of fault (or of awkward input) the simulator can inject. Each can be switched off, and
/// the shrinker switches them off one by one to find which ones a failure needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum FaultKind {
    /// The accord process crashes and restarts; PostgreSQL stays up and keeps taking writes.
    Crash,
    /// The whole machine crashes: PostgreSQL too, so local writes fail while it is down.
    MachineCrash,
    /// Two-way and one-way partitions of links, nodes and groups of nodes.
    Partition,
    /// A link or all links of a node slow down a lot for a while, without losing anything.
    Clog,
    /// A connection breaks: what was in flight on it is lost.
    Drop,
    /// A message of a broken connection is delivered late, on the next connection (duplicated
    /// and reordered delivery across reconnects); and now and then a batch is lost inside a
    /// connection, which then breaks (a faulty transport: what makes a receiver meet a gap).
    Ghost,
    /// Wall-clock steps (forward and back) and drift within the allowed offset.
    ClockStep,
    /// A node's clock runs further ahead than the maximum offset; peers must refuse it.
    RogueClock,
    /// The capture stops reading the WAL for a while (capture lag).
    CaptureStall,
    /// Updates that leave a TOASTed column unchanged, which decoding sends without its value.
    Toast,
}

impl FaultKind {
    pub const ALL: [FaultKind; 10] = [
        FaultKind::Crash,
        FaultKind::MachineCrash,
        FaultKind::Partition,
        FaultKind::Clog,
        FaultKind::Drop,
        FaultKind::Ghost,
        FaultKind::ClockStep,
        FaultKind::RogueClock,
        FaultKind::CaptureStall,
        FaultKind::Toast,
    ];

    pub fn name(self) -> &'static str {
        match self {
            FaultKind::Crash => "crash",
            FaultKind::MachineCrash => "machine-crash",
            FaultKind::Partition => "partition",
            FaultKind::Clog => "clog",
            FaultKind::Drop => "drop",
            FaultKind::Ghost => "ghost",
            FaultKind::ClockStep => "clock-step",
            FaultKind::RogueClock => "rogue-clock",
            FaultKind::CaptureStall => "capture-stall",
            FaultKind::Toast => "toast",
        }
    }

    fn bit(self) -> u32 {
        1 << (self as u32)
    }
}

/// A set of fault kinds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct FaultSet(u32);

impl FaultSet {
    pub fn all() -> Self {
        FaultSet(FaultKind::ALL.iter().map(|k| k.bit()).fold(0, |a, b| a | b))
    }

    pub fn none() -> Self {
        FaultSet(0)
    }

    pub fn has(self, kind: FaultKind) -> bool {
        self.0 & kind.bit() != 0
    }

    pub fn without(self, kind: FaultKind) -> Self {
        FaultSet(self.0 & !kind.bit())
    }

    pub fn kinds(self) -> impl Iterator<Item = FaultKind> {
        FaultKind::ALL.into_iter().filter(move |k| self.has(*k))
    }

    pub fn is_empty(self) -> bool {
        self.0 == 0
    }
}

impl fmt::Display for FaultSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if *self == FaultSet::all() {
            return f.write_str("all");
        }
        if self.is_empty() {
            return f.write_str("none");
        }
        let names: Vec<&str> = self.kinds().map(FaultKind::name).collect();
        f.write_str(&names.join(","))
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ConfigError {
    #[error(
        "unknown fault kind {word:?}; use all, none, or a comma-separated list of: {}",
        FaultKind::ALL.map(FaultKind::name).join(", ")
    )]
    UnknownFault { word: String },
    #[error("unknown planted bug {word:?}; one of: {}", PlantedBug::ALL.map(PlantedBug::name).join(", "))]
    UnknownBug { word: String },
    #[error("seed range {text:?} must look like A..B with A < B (B excluded), for example 0..500")]
    BadRange { text: String },
    #[error("--nodes must be between 2 and {max}, not {found}")]
    Nodes { found: usize, max: usize },
    #[error("--leave needs at least {least} nodes (two stay, and the joining node with --join)")]
    LeaveNodes { least: usize },
    #[error(
        "--migrate and --review-inserts cannot be combined yet: the oracle does not model which columns a \
         displaced insert holds across a migration"
    )]
    MigrateWithReviewInserts,
    #[error("--migrate and --join cannot be combined yet: a join's copy across a migration is not modelled")]
    MigrateWithJoin,
}

impl FromStr for FaultSet {
    type Err = ConfigError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim() {
            "all" => return Ok(FaultSet::all()),
            "none" | "" => return Ok(FaultSet::none()),
            _ => {}
        }
        let mut set = FaultSet::none();
        for word in s.split(',').map(str::trim) {
            let kind = FaultKind::ALL
                .into_iter()
                .find(|k| k.name() == word)
                .ok_or_else(|| ConfigError::UnknownFault { word: word.to_owned() })?;
            set.0 |= kind.bit();
        }
        Ok(set)
    }
}

/// A bug planted on purpose, to show that the oracles catch that class of mistake and that
/// shrinking reduces the failing run. The apply's bugs are planted in the engine's own state
/// machine (`accord_engine::PlantedBug`), the code the service runs; the others in the
/// simulator's driver of the capture.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PlantedBug {
    /// The apply does not skip what is at or below the applied position (nor does the receiver
    /// drop duplicates): resent changes are applied twice.
    DoubleApply,
    /// The merge does not wait for the capture to see a local write (HARD-PARTS §2).
    SkipXminCheck,
    /// The capture is not told that a transaction came from a peer: merged rows loop back.
    ForgetFromPeer,
    /// The merge does not write its `accord.hlc` stamp into the WAL: later local writes may be
    /// stamped below changes merged before them.
    NoMergedStamp,
    /// A restarted capture's clock starts from its checkpoint alone, not passing the stamps
    /// merges recorded with their commits: a group that only merged writes no checkpoint, so
    /// local writes after a restart may be stamped below changes merged before it.
    ForgetMergedStamps,
    /// Only the row check HARD-PARTS §2 describes (xmin vs known xmin): a local insert and delete
    /// of a key, both not yet captured, leave no row to compare, and a merge overwrites them unseen.
    NoMissingRowWait,
    /// A missing row's key is taken as clear of local writes on their way through the capture
    /// once it is locked, whatever the removal count says: a local insert and delete of it, both
    /// not yet captured, are overwritten unseen, as without the missing-row wait.
    IgnoreRemovalCounts,
    /// A change that lacks a TOASTed value the row does not have here yet is forgotten instead of
    /// kept until the value arrives.
    DropDeferred,
    /// Local inserts do not wait for the key an applier locked before its probe (the
    /// service's trigger is missing): a local insert and delete of a key committed after the
    /// probe are read by the capture against the merge's metadata.
    NoKeyLockTrigger,
    /// The apply queue cuts batches inside transactions: a receiver commits part of one.
    SplitTransactions,
    /// Acknowledge, say in hellos and in collection rounds what an apply committed, before it
    /// is on disk: a crash of the machine loses changes the peer has pruned.
    AckBeforeDurable,
    /// A batch that skips changes after the applied position is taken: the changes in between
    /// are never applied.
    ApplyPastGap,
    /// A transaction is applied before what it builds on: the row states it relays show part
    /// of a third node's transaction.
    IgnoreBuildsOn,
    /// The capture takes the rows a TRUNCATE emptied from the metadata as it reads it (live,
    /// and no longer in the table) instead of from what the TRUNCATE's trigger recorded: rows
    /// written just before it and not captured yet are missed, metadata written after it counts.
    TruncateFromMetadata,
    /// A segment of a spooled transaction that must restart restarts alone instead of starting
    /// the transaction over: the rollback took the earlier segments' writes with it.
    RestartSegmentAlone,
    /// A join copies a donor row whose version its metadata does not account for as it is: the
    /// donor's capture later sends that write, and the new node counts it twice.
    JoinCopiesUnsettled,
    /// A join leaves every such row to the donor's stream: a row written in a subtransaction,
    /// captured before the join's positions, is never sent again.
    JoinSkipsUnsettled,
    /// A joined node streams from the positions of the copy's last snapshot: changes applied on
    /// the donor after an earlier chunk was copied are never applied to those rows.
    JoinStreamsFromLatest,
    /// A join reads the donor's positions as soon as it registered the new node, before the
    /// donor's node took it in (a second later) or anyone heard of it: nodes prune changes the
    /// new node streams from.
    JoinSkipsMembersWait,
    /// Collection rounds leave out joining nodes: a round completes while the new node's copy
    /// holds a row alive that a delete below the cut removed everywhere else.
    RoundsWithoutJoiner,
    /// A leaving node is marked `left` without waiting for its peers to acknowledge its last
    /// changes: the ones still on their way are lost to the cluster.
    LeaveWithoutHandover,
}

impl PlantedBug {
    pub const ALL: [PlantedBug; 21] = [
        PlantedBug::DoubleApply,
        PlantedBug::SkipXminCheck,
        PlantedBug::ForgetFromPeer,
        PlantedBug::NoMergedStamp,
        PlantedBug::ForgetMergedStamps,
        PlantedBug::NoMissingRowWait,
        PlantedBug::IgnoreRemovalCounts,
        PlantedBug::DropDeferred,
        PlantedBug::NoKeyLockTrigger,
        PlantedBug::SplitTransactions,
        PlantedBug::AckBeforeDurable,
        PlantedBug::ApplyPastGap,
        PlantedBug::IgnoreBuildsOn,
        PlantedBug::TruncateFromMetadata,
        PlantedBug::RestartSegmentAlone,
        PlantedBug::JoinCopiesUnsettled,
        PlantedBug::JoinSkipsUnsettled,
        PlantedBug::JoinStreamsFromLatest,
        PlantedBug::JoinSkipsMembersWait,
        PlantedBug::RoundsWithoutJoiner,
        PlantedBug::LeaveWithoutHandover,
    ];

    pub fn name(self) -> &'static str {
        match self {
            PlantedBug::DoubleApply => "double-apply",
            PlantedBug::SkipXminCheck => "skip-xmin-check",
            PlantedBug::ForgetFromPeer => "forget-from-peer",
            PlantedBug::NoMergedStamp => "no-merged-stamp",
            PlantedBug::ForgetMergedStamps => "forget-merged-stamps",
            PlantedBug::NoMissingRowWait => "no-missing-row-wait",
            PlantedBug::IgnoreRemovalCounts => "ignore-removal-counts",
            PlantedBug::DropDeferred => "drop-deferred",
            PlantedBug::NoKeyLockTrigger => "no-key-lock-trigger",
            PlantedBug::SplitTransactions => "split-transactions",
            PlantedBug::AckBeforeDurable => "ack-before-durable",
            PlantedBug::ApplyPastGap => "apply-past-gap",
            PlantedBug::IgnoreBuildsOn => "ignore-builds-on",
            PlantedBug::TruncateFromMetadata => "truncate-from-metadata",
            PlantedBug::RestartSegmentAlone => "restart-segment-alone",
            PlantedBug::JoinCopiesUnsettled => "join-copies-unsettled",
            PlantedBug::JoinSkipsUnsettled => "join-skips-unsettled",
            PlantedBug::JoinStreamsFromLatest => "join-streams-from-latest",
            PlantedBug::JoinSkipsMembersWait => "join-skips-members-wait",
            PlantedBug::RoundsWithoutJoiner => "rounds-without-joiner",
            PlantedBug::LeaveWithoutHandover => "leave-without-handover",
        }
    }

    /// The same bug in the engine's apply, where it lives there.
    pub fn in_apply(self) -> Option<accord_engine::PlantedBug> {
        use accord_engine::PlantedBug as Engine;
        match self {
            PlantedBug::DoubleApply => Some(Engine::DoubleApply),
            PlantedBug::SkipXminCheck => Some(Engine::SkipGuard),
            PlantedBug::NoMergedStamp => Some(Engine::NoMergedStamp),
            PlantedBug::NoMissingRowWait => Some(Engine::NoMissingRowWait),
            PlantedBug::IgnoreRemovalCounts => Some(Engine::IgnoreRemovalCounts),
            PlantedBug::DropDeferred => Some(Engine::DropDeferred),
            PlantedBug::SplitTransactions => Some(Engine::SplitTransactions),
            PlantedBug::AckBeforeDurable => Some(Engine::AckBeforeDurable),
            PlantedBug::ApplyPastGap => Some(Engine::ApplyPastGap),
            PlantedBug::IgnoreBuildsOn => Some(Engine::IgnoreBuildsOn),
            PlantedBug::RestartSegmentAlone => Some(Engine::RestartSegmentAlone),
            PlantedBug::ForgetFromPeer
            | PlantedBug::ForgetMergedStamps
            | PlantedBug::NoKeyLockTrigger
            | PlantedBug::TruncateFromMetadata
            | PlantedBug::JoinCopiesUnsettled
            | PlantedBug::JoinSkipsUnsettled
            | PlantedBug::JoinStreamsFromLatest
            | PlantedBug::JoinSkipsMembersWait
            | PlantedBug::RoundsWithoutJoiner
            | PlantedBug::LeaveWithoutHandover => None,
        }
    }
}

impl FromStr for PlantedBug {
    type Err = ConfigError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        PlantedBug::ALL
            .into_iter()
            .find(|b| b.name() == s.trim())
            .ok_or_else(|| ConfigError::UnknownBug { word: s.to_owned() })
    }
}

/// The most nodes a run may have: the oracle keeps per-node vectors.
pub const MAX_NODES: usize = 16;

/// Everything that defines a run.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct SimConfig {
    pub seed: u64,
    pub nodes: usize,
    /// Local transactions the workload commits before the liveness phase.
    pub ops: u64,
    pub faults: FaultSet,
    /// Maximum clock offset in µs; `None` lets the seed choose.
    pub max_offset_micros: Option<u64>,
    pub bug: Option<PlantedBug>,
    /// The last node is not there at the start: it joins the running cluster during the
    /// workload (`accord join`), copied from a donor in chunks while every node writes.
    pub join: bool,
    /// A node leaves the running cluster during the workload (`accord leave`): by itself, or it
    /// dies and another node removes it, after handing its changes over.
    pub leave: bool,
    /// Every node runs a migration during the workload, at its own time (`ALTER TABLE ... ADD
    /// COLUMN` of a `delta` column), writing the new column from then on while the others may
    /// not have it yet; a node down at its time runs it while down.
    pub migrate: bool,
    /// The table says `inserts=review`: of two concurrent inserts of one key the earlier keeps
    /// the row and the other goes to the review queue whole.
    pub review_inserts: bool,
}

impl SimConfig {
    /// What two inserts of one key mean in this run's table.
    pub fn inserts(&self) -> accord_engine::InsertPolicy {
        if self.review_inserts {
            accord_engine::InsertPolicy::Review
        } else {
            accord_engine::InsertPolicy::Merge
        }
    }

    pub fn new(seed: u64) -> Self {
        SimConfig {
            seed,
            nodes: 3,
            ops: 2_000,
            faults: FaultSet::all(),
            max_offset_micros: None,
            bug: None,
            join: false,
            leave: false,
            migrate: false,
            review_inserts: false,
        }
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        if !(2..=MAX_NODES).contains(&self.nodes) {
            return Err(ConfigError::Nodes {
                found: self.nodes,
                max: MAX_NODES,
            });
        }
        let least = 3 + usize::from(self.join);
        if self.leave && self.nodes < least {
            return Err(ConfigError::LeaveNodes { least });
        }
        if self.migrate && self.review_inserts {
            return Err(ConfigError::MigrateWithReviewInserts);
        }
        if self.migrate && self.join {
            // A join copies rows and metadata under one shape; copying across a migration is
            // not modelled yet.
            return Err(ConfigError::MigrateWithJoin);
        }
        Ok(())
    }

    /// The command that replays this run.
    pub fn command(&self) -> String {
        let mut cmd = format!(
            "accord sim --seed {} --nodes {} --ops {}",
            self.seed, self.nodes, self.ops
        );
        if self.faults != FaultSet::all() {
            cmd.push_str(&format!(" --faults {}", self.faults));
        }
        if let Some(offset) = self.max_offset_micros {
            cmd.push_str(&format!(" --max-offset-us {offset}"));
        }
        if self.join {
            cmd.push_str(" --join");
        }
        if self.leave {
            cmd.push_str(" --leave");
        }
        if self.migrate {
            cmd.push_str(" --migrate");
        }
        if self.review_inserts {
            cmd.push_str(" --review-inserts");
        }
        if let Some(bug) = self.bug {
            cmd.push_str(&format!(" --plant-bug {}", bug.name()));
        }
        cmd
    }
}

/// Parses `A..B` (B excluded).
pub fn parse_seed_range(text: &str) -> Result<std::ops::Range<u64>, ConfigError> {
    let bad = || ConfigError::BadRange { text: text.to_owned() };
    let (a, b) = text.split_once("..").ok_or_else(bad)?;
    let a: u64 = a.trim().parse().map_err(|_| bad())?;
    let b: u64 = b.trim().parse().map_err(|_| bad())?;
    if a >= b {
        return Err(bad());
    }
    Ok(a..b)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fault_sets_round_trip() {
        let set: FaultSet = "crash,ghost".parse().unwrap();
        assert!(set.has(FaultKind::Crash) && set.has(FaultKind::Ghost) && !set.has(FaultKind::Drop));
        assert_eq!(set.to_string().parse::<FaultSet>().unwrap(), set);
        assert_eq!("all".parse::<FaultSet>().unwrap(), FaultSet::all());
        assert!("nope".parse::<FaultSet>().is_err());
    }

    #[test]
    fn ranges_parse() {
        assert_eq!(parse_seed_range("0..500").unwrap(), 0..500);
        assert!(parse_seed_range("5..5").is_err());
        assert!(parse_seed_range("x").is_err());
    }

    #[test]
    fn replay_command_names_every_non_default_knob() {
        let mut cfg = SimConfig::new(9);
        cfg.faults = FaultSet::none();
        cfg.bug = Some(PlantedBug::DoubleApply);
        assert_eq!(
            cfg.command(),
            "accord sim --seed 9 --nodes 3 --ops 2000 --faults none --plant-bug double-apply"
        );
    }
}
