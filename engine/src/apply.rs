//! The apply of one peer's batch, as a state machine without I/O.
//!
//! The service drives it with PostgreSQL (`src/node/apply.rs`), the simulator with its simulated
//! database: both feed it what they loaded and how their writes went ([`ApplyInput`]) and carry
//! out the commands it returns ([`ApplyCommand`]). Every rule of the apply lives here once:
//!
//! - **Exactly once.** Changes at or below the applied position are skipped; a batch that does
//!   not continue it is refused. The batch's last sequence number is the origin position its
//!   transaction commits with, and a transaction that rolls back resets that position.
//! - **The xmin guard** (PRODUCT.md invariant 8, HARD-PARTS §2), in [`judge`]: a row whose
//!   version accord has not accounted for yet is a local write still on its way through the
//!   capture. The first time, the batch probes, rolls back and waits with its rows unlocked;
//!   a row written again meanwhile is waited for holding the rows' locks, a few rounds; then it
//!   rolls back and starts over after a probe. A missing row needs no probe
//!   when no local removal (a delete, a key changed away, a TRUNCATE) was made since the capture
//!   last accounted for them ([`RemovalCount`]): a local history of the key that the capture has
//!   not read, and that leaves the row missing, ends with one.
//! - **Joining and splitting.** A batch is merged in memory, each row written once (several
//!   merges of a row fold into one write). A part the database refuses is split in halves, down
//!   to single changes, so that exactly the refused change is parked.
//! - **Parking** (invariant 9): a change that cannot be merged or written goes to the review
//!   queue with its error, and the batch goes on.
//! - **Deferral**: a change that lacks values the row does not have here yet (unchanged TOAST
//!   relayed by another node) is kept durably and merged again, in the same transaction, as soon
//!   as a merge writes its row.

use std::collections::BTreeMap;
use std::sync::Arc;

use crate::change::{ChangeKind, RowChange, RowKey};
use crate::collection::StableCut;
use crate::hlc::{Hlc, NodeId};
use crate::merge::{merge, Conflict, ConflictKind, MergeOutcome, RowAction};
use crate::review::{ReviewAction, ReviewItem};
use crate::schema::TableDef;
use crate::shape::{NodeSchema, Reading, ShapeBook, ShapeId};
use crate::state::{Cell, RowMeta, RowState};
use crate::value::Value;

/// A transaction id as the database reports a row version's `xmin`.
pub type Xid = u64;

/// A rule the simulator can break on purpose, to prove its checks catch the loss it causes.
/// The service never sets one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PlantedBug {
    /// Merge without the xmin guard's main check: a row whose metadata says it lives is taken as
    /// that metadata describes it, whatever its xmin.
    SkipGuard,
    /// Take a missing row as missing without locking its key and waiting for the capture to
    /// read past a probe.
    NoMissingRowWait,
    /// Take the keys of missing rows as clear of local writes on the way through the capture
    /// whatever the removal count says ([`RemovalCount`]): lock them, but wait for no probe.
    IgnoreRemovalCounts,
    /// Forget a deferred change instead of keeping it.
    DropDeferred,
    /// Do not tell the capture the greatest stamp a merge transaction merged.
    NoMergedStamp,
    /// Skip nothing: apply again what is at or below the applied position.
    DoubleApply,
    /// Acknowledge what committed, flushed to disk or not (`AppliedPosition`).
    AckBeforeDurable,
    /// Hand the applier batches cut anywhere, inside transactions too (`ApplyQueue`): a
    /// receiver applies part of a source transaction, and readers there see it.
    SplitTransactions,
    /// Hand out a transaction before what it builds on is applied here (`ApplyQueue`): its
    /// relayed row states show readers part of another node's transaction.
    IgnoreBuildsOn,
    /// Take a batch that does not continue the applied position (the receiver's check in
    /// `Replication::received` and the apply's own): the changes in between are never applied.
    ApplyPastGap,
    /// A segment after the first of a spooled transaction that must restart restarts alone,
    /// not from the first segment: the rollback took the earlier segments' writes with it.
    RestartSegmentAlone,
}

/// The limits of the apply.
#[derive(Debug, Clone, Copy)]
pub struct ApplyRules {
    /// How many times one transaction probes while holding its row locks before it rolls back
    /// and starts over. Each further round is caused by a row whose version the previous probe
    /// did not settle: one that appeared after the load (a local insert that committed before
    /// its key's lock was granted) in a subtransaction, whose xid the capture never sees.
    pub guard_rounds: u32,
    /// How long a batch may wait for the capture in all before it fails.
    pub wait_limit_micros: u64,
    /// The first and the longest pause before an attempt that waits for a local delete.
    pub backoff_micros: (u64, u64),
    pub planted: Option<PlantedBug>,
}

impl Default for ApplyRules {
    fn default() -> Self {
        ApplyRules {
            guard_rounds: 4,
            wait_limit_micros: 120_000_000,
            backoff_micros: (1_000, 50_000),
            planted: None,
        }
    }
}

/// What the driver found for one row it was asked to load.
#[derive(Debug, Clone, Default)]
pub struct LoadedRow {
    /// The row in the user's table (locked): its version's xmin and its values.
    pub row: Option<(Xid, Vec<Cell>)>,
    /// accord's metadata for the row (locked), and the xmin of the row version it accounts for.
    pub meta: Option<(RowMeta, Option<Xid>)>,
    /// Changes of this row kept from earlier batches, waiting for values (any origin).
    pub deferred: Vec<RowChange>,
}

/// The node's count of local transactions that removed rows, for missing rows whose keys the
/// apply has locked ([`ApplyCommand::LockKeys`]). A missing row's key may have a local history the
/// capture has not read yet (an insert and a delete, committed while the capture was behind);
/// such a history leaves the row missing only if it ends with a removal: a delete, an update
/// that changed the key away, a TRUNCATE. Every local transaction that removes a row counts
/// itself once, before its first removal and after taking the node's removal lock shared (held
/// until it ends), in one counter a rollback does not undo (a PostgreSQL sequence). Inserts do
/// not count: a node that only inserts (new keys of its own) leaves merges of its peers' new
/// keys nothing to wait for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RemovalCount {
    /// The counter, read after the load found the rows missing: a removal of one of them had
    /// committed by then, and had counted itself before it committed.
    pub issued: u64,
    /// What the node's [`RemovalLedger`] holds.
    pub accounted: Option<u64>,
}

impl RemovalCount {
    /// Whether every local removal counted so far is known to be accounted for by the capture:
    /// none counted since the ledger's count was read.
    pub fn settled(&self) -> bool {
        self.accounted == Some(self.issued)
    }
}

/// What a node's capture is known to have accounted for of local removals: the count read while
/// the removal lock was held exclusively for a moment (so every transaction that had counted
/// itself had ended), before a probe the capture then read past. Each removal it counts
/// committed before that probe, so the capture has decoded it and recorded its metadata. Held in
/// memory for all of a node's appliers (a restart forgets it: the first probe settles it again).
#[derive(Debug, Clone, Default)]
pub struct RemovalLedger {
    accounted: Option<u64>,
}

impl RemovalLedger {
    pub fn accounted(&self) -> Option<u64> {
        self.accounted
    }

    /// The capture read past a probe written after `issued` was read with the removal lock held.
    /// Set, not raised: two appliers' settlements may arrive out of order, and an older count
    /// only makes the next apply wait once more; a count that went down (the counter made anew)
    /// must not be hidden behind a higher one.
    pub fn settle(&mut self, issued: u64) {
        self.accounted = Some(issued);
    }
}

/// One row's write, folded from every merge of the row in a part.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RowWrite {
    /// Set these columns to these values (their last values in the part).
    Update(BTreeMap<usize, Value>),
    Insert(Vec<Value>),
    Delete,
    /// Delete the row, then insert these values under its key: a row deleted and inserted again
    /// in one part (a key changed away and back, a delete and a re-insert). Written as a delete
    /// and an insert, in that order, so that the database sees what the source did; never as an
    /// update, which would fire other triggers and foreign-key actions than the source's.
    Replace(Vec<Value>),
}

/// A row the driver must write.
#[derive(Debug, Clone)]
pub struct PlannedWrite {
    pub slot: usize,
    pub write: RowWrite,
}

/// What a part records besides the user's rows, after its writes stood.
#[derive(Debug, Clone, Default)]
pub struct Records {
    /// New metadata per slot, with the xmin of the row version it accounts for.
    pub metas: Vec<(usize, RowMeta, Option<Xid>)>,
    pub conflicts: Vec<(usize, Conflict)>,
    pub review: Vec<ReviewAction>,
    /// Changes that cannot be applied, each with its review item (kind `Unapplicable`).
    pub parked: Vec<(ReviewItem, RowChange)>,
    /// Changes to keep until their row has the values they lack.
    pub defer: Vec<RowChange>,
    /// Kept changes that merged now: (table, key, origin, seq), to delete from the store.
    pub undefer: Vec<(String, RowKey, NodeId, u64)>,
    /// Changes merged by this part, kept ones included: (origin, seq).
    pub merged: Vec<(NodeId, u64)>,
}

impl Records {
    fn is_empty(&self) -> bool {
        self.metas.is_empty()
            && self.conflicts.is_empty()
            && self.review.is_empty()
            && self.parked.is_empty()
            && self.defer.is_empty()
            && self.undefer.is_empty()
    }
}

/// Where a batch stands in a source transaction applied in segments within one local
/// transaction: a transaction larger than the receiver's spool bound (`Handout::Spool`), whose
/// segments do not all fit in memory at once.
#[derive(Debug, Clone, Default)]
pub struct Segment {
    /// The first segment opens the local transaction; the others continue it.
    pub first: bool,
    /// The last segment commits it.
    pub last: bool,
    /// The position the local transaction commits with: the source transaction's last change.
    pub commit_at: u64,
    /// What the segments before this one merged.
    pub carried: Carried,
    /// How many times the transaction started over so far (for the pause before the next).
    pub restarts: u32,
}

/// What earlier segments of one local transaction merged, for its commit.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Carried {
    pub greatest: Option<Hlc>,
    pub builds_on: BTreeMap<NodeId, u64>,
}

/// The segments of one spooled transaction, applied in order in one local transaction: what each
/// carries from those before, and where a start over goes back to. The drivers cut and read the
/// segments; this decides how each is applied.
#[derive(Debug, Clone)]
pub struct Segments {
    /// The applied position before the transaction, where a start over begins again.
    before: u64,
    /// After the segments done so far.
    applied: u64,
    next: Segment,
}

impl Segments {
    /// A transaction ending at `commit_at`, to apply after position `applied`.
    pub fn new(commit_at: u64, applied: u64) -> Segments {
        Segments {
            before: applied,
            applied,
            next: Segment {
                first: true,
                last: false,
                commit_at,
                carried: Carried::default(),
                restarts: 0,
            },
        }
    }

    /// The machine for the next segment, `changes`; `last` for the one that commits.
    pub fn machine(
        &self,
        peer: NodeId,
        changes: Vec<RowChange>,
        schema: &NodeSchema,
        cut: Option<StableCut>,
        rules: ApplyRules,
        last: bool,
    ) -> Result<BatchApply, ApplyError> {
        let segment = Segment {
            last,
            ..self.next.clone()
        };
        Ok(BatchApply::new(peer, self.applied, changes, schema, cut, rules)?.in_segment(segment))
    }

    /// The next segment's machine finished: the one after continues from it.
    pub fn done(&mut self, machine: &BatchApply) {
        self.applied = machine.last();
        self.next.first = false;
        self.next.carried = machine.carried();
    }

    /// A segment said `StartOver`: the next machine is the first segment's again.
    pub fn start_over(&mut self) {
        self.applied = self.before;
        self.next.first = true;
        self.next.carried = Carried::default();
        self.next.restarts += 1;
    }

    /// The applied position after the segments done so far.
    pub fn applied(&self) -> u64 {
        self.applied
    }

    pub fn restarts(&self) -> u32 {
        self.next.restarts
    }
}

/// What the driver must do next.
#[derive(Debug)]
pub enum ApplyCommand {
    /// Lock the rows of these slots (`FOR UPDATE`; tables in name order, keys in order), then,
    /// after a savepoint when `guard` is set, load their metadata (locked) and kept changes, and
    /// answer with [`ApplyInput::Loaded`], one [`LoadedRow`] per slot in this order. `begin`:
    /// first open a transaction that commits with this origin position.
    ///
    /// `lock_keys`: once the rows are locked, try the locks of these slots' keys and read the
    /// node's [`RemovalCount`], as [`ApplyCommand::LockKeys`] does (answered in
    /// [`ApplyInput::Loaded`]'s `keys`), then read those slots' rows again, so that what is
    /// answered for them was read under their key locks. These are the rows the batch's source
    /// inserted, which are usually missing here: a missing one then needs no second lock and
    /// load (two round trips of a batch of new rows). After the rows, so that a wait for a row a
    /// local transaction holds holds no key lock it may need next.
    Load {
        begin: Option<u64>,
        guard: bool,
        slots: Vec<usize>,
        lock_keys: Vec<usize>,
    },
    /// Roll back to the guard savepoint (the row locks stay; the metadata's go, since the capture
    /// may need to write that metadata); lock the keys of the `missing` slots, whose rows the
    /// load did not find, exclusively until the transaction ends (local inserts and key updates
    /// take the same locks shared, and other appliers take them too); then read the node's
    /// [`RemovalCount`] and answer [`ApplyInput::KeysLocked`]. The locks are only tried: if
    /// another transaction holds one, release them all and answer [`ApplyInput::KeysBusy`] (the
    /// batch starts over after a pause, its row locks released). Waiting for them instead closed
    /// deadlocks with local transactions that insert many rows, taking the same locks in their
    /// own order.
    ///
    /// A missing row cannot be locked. Without the key locks, a local insert and delete of the
    /// key committed after the probe, or a local insert committed before this transaction does,
    /// would reach the capture after this merge's metadata, and be read against it; and two
    /// appliers merging into one missing row would both find no metadata, the later commit
    /// overwriting the earlier's. With them, every local write of the key committed before the
    /// lock (and counted itself, if it removed the row), and none can commit after it until this
    /// transaction ends.
    LockKeys { missing: Vec<usize> },
    /// Roll back to the guard savepoint (the metadata's locks go, the rows' and keys' stay); take
    /// the node's removal lock exclusively for a moment, only trying it, and if it is free read
    /// the node's count of local removals and let it go again; write a
    /// probe; once the capture has read past it, settle the count read (if any) in the node's
    /// [`RemovalLedger`], and answer [`ApplyInput::CaptureReached`].
    ProbeAndWait,
    /// Roll back the transaction and reset the session's origin position (PostgreSQL keeps it
    /// after a rollback, and a later commit of the session would record it); then, with
    /// `probe`, write a probe and wait until the capture has read past it, else pause
    /// `pause_micros`; answer [`ApplyInput::Restarted`].
    Restart { probe: bool, pause_micros: u64 },
    /// A segment after the first must start over: do as for `Restart`, then apply the whole
    /// source transaction again from its first segment (the machine is done). The segments before
    /// this one were rolled back with it, and their row locks released, so their guard must run
    /// again.
    StartOver { probe: bool, pause_micros: u64 },
    /// Write these rows under a savepoint; answer [`ApplyInput::Written`] with the new xmin of
    /// each inserted or updated row (in this order; `None` for a delete), or, after rolling back
    /// to the savepoint, with the database's refusal ([`WriteRefusal`]).
    Write(Vec<PlannedWrite>),
    /// Record these (metadata, conflict log, review queue, parked and kept changes) and answer
    /// [`ApplyInput::Recorded`].
    Record(Records),
    /// The batch's last part in one round trip: write these rows in the transaction itself, under
    /// no savepoint (every guard savepoint released first), so that each written row's xmin is the
    /// transaction's own id, which `records`' metadata already names; record `records`; then
    /// commit as [`ApplyCommand::Commit`] does. Answer [`ApplyInput::Committed`]; or, when the
    /// database refused the write (the transaction is then rolled back whole, its locks gone),
    /// [`ApplyInput::Written`] with the refusal: the batch starts over and writes under
    /// savepoints from then on, where a refusal costs only the refused part.
    ///
    /// Asked only for a batch that is not a segment, once the transaction's id is known
    /// ([`ApplyInput::Loaded`]'s `xid`), and for records the commit can carry (no review
    /// actions, parked or kept changes).
    WriteAndCommit {
        writes: Vec<PlannedWrite>,
        records: Records,
        merged_stamp: Option<Hlc>,
        builds_on: Vec<(NodeId, u64)>,
    },
    /// Write the greatest stamp merged into the WAL for the capture (`accord.hlc`), when there is
    /// one, with `builds_on`, commit, and answer [`ApplyInput::Committed`].
    ///
    /// `builds_on` is the greatest of the batch's `RowChange::builds_on` per node: the merged
    /// rows may carry those nodes' effects, so the capture counts them as applied here, and
    /// what this node writes after the merge claims to build on them too. (A transaction is
    /// applied only after what it builds on, unless its node stayed away: then this is how the
    /// claim travels on.)
    Commit {
        merged_stamp: Option<Hlc>,
        builds_on: Vec<(NodeId, u64)>,
    },
    /// The batch is applied up to `applied`; for a segment but the last, uncommitted, and its
    /// local transaction goes on with the next segment.
    Done { applied: u64, summary: ApplySummary },
}

/// What happened, for the machine.
#[derive(Debug)]
pub enum ApplyInput {
    /// The batch may start (`now`: the driver's clock, in µs, for the wait limit).
    Start {
        now: u64,
    },
    /// What [`ApplyCommand::Load`] found: one row per slot, and its key locks. `xid`: the id of
    /// the transaction a load with `begin` opened, if the driver read it (the xmin of a row
    /// written in that transaction under no savepoint); `None` keeps every write under a
    /// savepoint.
    Loaded {
        rows: Vec<LoadedRow>,
        keys: KeyLocks,
        xid: Option<Xid>,
    },
    CaptureReached {
        now: u64,
    },
    /// The keys [`ApplyCommand::LockKeys`] named are locked; the node's removal count.
    KeysLocked(RemovalCount),
    /// Another transaction holds a key lock [`ApplyCommand::LockKeys`] tried; none is held.
    KeysBusy {
        now: u64,
    },
    Restarted {
        now: u64,
    },
    Written(Result<Vec<Option<Xid>>, WriteRefusal>),
    Recorded,
    Committed,
}

impl ApplyInput {
    /// What a [`ApplyCommand::Load`] that asked for no key locks found.
    pub fn loaded(rows: Vec<LoadedRow>) -> ApplyInput {
        ApplyInput::Loaded {
            rows,
            keys: KeyLocks::NotAsked,
            xid: None,
        }
    }
}

/// The key locks a [`ApplyCommand::Load`] tried.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyLocks {
    /// It named none.
    NotAsked,
    /// All taken (they stay held until the transaction ends); the node's removal count, read
    /// after them.
    Locked(RemovalCount),
    /// Another transaction holds one; none is held (as [`ApplyInput::KeysBusy`]).
    Busy { now: u64 },
}

/// Why the database refused a part's writes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WriteRefusal {
    /// An insert met a committed row of its key (a unique violation of the key itself): a
    /// local write or another peer's merge inserted it after this batch found it missing.
    /// Never a reason to park: the batch starts over and merges against that row. The driver
    /// tells it from the violated constraint, not by looking for the row later, which may be
    /// gone again by then (the simulator found that race between two appliers).
    pub key_exists: bool,
    /// A row has no place in this node's table (no partition covers it): this node's layout,
    /// which its users mend, not the change's fault. Never a reason to park either: the batch
    /// fails with [`ApplyError::NoPlace`] and its transactions wait until the place exists.
    pub no_place: bool,
    /// The database's message.
    pub message: String,
}

impl WriteRefusal {
    /// A refusal for another reason than the key (a check, a foreign key, another unique index).
    pub fn other(message: impl Into<String>) -> Self {
        WriteRefusal {
            key_exists: false,
            no_place: false,
            message: message.into(),
        }
    }
}

/// A batch's counts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ApplySummary {
    pub applied: u64,
    pub parked: u64,
    pub deferred: u64,
    /// Kept changes merged by this batch.
    pub undeferred: u64,
    pub conflicts: ConflictCounts,
    /// Times the batch waited for the capture (a local write raced the merge).
    pub waits: u64,
    /// Missing rows merged without that wait: their keys locked, no local removal was on its way
    /// through the capture ([`RemovalCount`]).
    #[serde(default)]
    pub keys_clear: u64,
    /// Changes to tables this node left (`NodeSchema::left`), not applied.
    #[serde(default)]
    pub left: u64,
}

impl ApplySummary {
    pub fn add(&mut self, other: &ApplySummary) {
        self.left += other.left;
        self.applied += other.applied;
        self.parked += other.parked;
        self.deferred += other.deferred;
        self.undeferred += other.undeferred;
        self.conflicts.add(&other.conflicts);
        self.waits += other.waits;
        self.keys_clear += other.keys_clear;
    }
}

/// Automatic resolutions by kind, as the conflict log records them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ConflictCounts {
    pub concurrent_update: u64,
    pub delete_won: u64,
    pub insert_insert: u64,
    #[serde(default)]
    pub insert_displaced: u64,
}

impl ConflictCounts {
    pub fn count(&mut self, conflicts: &[Conflict]) {
        for conflict in conflicts {
            match conflict.kind {
                ConflictKind::ConcurrentUpdate => self.concurrent_update += 1,
                ConflictKind::DeleteWon => self.delete_won += 1,
                ConflictKind::InsertInsert => self.insert_insert += 1,
                ConflictKind::InsertDisplaced => self.insert_displaced += 1,
            }
        }
    }

    pub fn add(&mut self, other: &ConflictCounts) {
        self.concurrent_update += other.concurrent_update;
        self.delete_won += other.delete_won;
        self.insert_insert += other.insert_insert;
        self.insert_displaced += other.insert_displaced;
    }

    pub fn total(&self) -> u64 {
        self.concurrent_update + self.delete_won + self.insert_insert + self.insert_displaced
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ApplyError {
    #[error("changes from node {peer} skip from {applied} to {first}: refusing to apply out of order")]
    Gap { peer: NodeId, applied: u64, first: u64 },
    #[error(
        "a batch from node {peer} waited {secs} s for the capture to account for local writes; is the capture \
         running?"
    )]
    CaptureTimeout { peer: NodeId, secs: u64 },
    #[error("the apply of a batch from node {peer} got {input} while it expected {expected}")]
    Unexpected {
        peer: NodeId,
        input: &'static str,
        expected: &'static str,
    },
    #[error("the driver loaded {found} rows for {asked} slots")]
    LoadedCount { found: usize, asked: usize },
    #[error("the driver reported {found} written rows for {asked} writes")]
    WrittenCount { found: usize, asked: usize },
    #[error(
        "a row from node {peer} has no place here ({message}): create a partition for it on this node (or a \
         DEFAULT partition), and the transaction is applied"
    )]
    NoPlace { peer: NodeId, message: String },
    #[error("a transaction from node {peer} waits: {message}")]
    ShapeWaits {
        peer: NodeId,
        message: String,
        /// The batch's change that cannot be read yet (`None`: a change kept here earlier): the
        /// transactions before its own may be applied meanwhile.
        seq: Option<u64>,
    },
}

/// The guard's verdict on one loaded row.
// `Accounted` is the common verdict, for every row of every batch; boxing its state would add an
// allocation per row to save a few bytes on the rare ones.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// accord's metadata describes the row: merge against this state (`None`: accord knows
    /// nothing of it). `settled`: the metadata now accounts for this xmin.
    Accounted {
        state: Option<RowState>,
        settled: Option<Xid>,
    },
    /// The row's version is not accounted for yet: a local write the capture may not have read
    /// (this xmin), or a missing row whose local insert and delete may both be on their way
    /// (`None`). Wait until the capture has read past a probe.
    Unaccounted(Option<Xid>),
    /// The metadata says the row lives but it is gone, after a probe: a local delete not
    /// captured yet. Start over after a pause.
    DeleteNotCaptured,
}

/// The xmin guard's rule table (HARD-PARTS §2), for one row. `probed`: the capture has read past
/// a probe written after the row was first read; `settled`: the xmin that row then had. A row
/// written inside a subtransaction (SAVEPOINT, a PL/pgSQL EXCEPTION block) carries the
/// subtransaction's xid, which the capture never sees, so its xmin never equals `known_xmin`:
/// once the capture has read past a probe written after that version was seen committed, the
/// version is accounted for, and if the row still has that xmin, the metadata describes it.
/// `cut`: tombstones it covers read as absent.
pub fn judge(
    loaded: &LoadedRow,
    probed: bool,
    settled: Option<Xid>,
    cut: Option<&StableCut>,
    planted: Option<PlantedBug>,
) -> Verdict {
    let meta = loaded
        .meta
        .as_ref()
        .filter(|(m, _)| StableCut::live(cut, Some(m)).is_some());
    let probed = probed || planted == Some(PlantedBug::NoMissingRowWait);
    let state = |meta: &RowMeta, values: Vec<Cell>| RowState {
        meta: meta.clone(),
        values,
    };
    let skip_guard = planted == Some(PlantedBug::SkipGuard);
    match (&loaded.row, meta) {
        (Some((xmin, values)), Some((m, known))) if m.is_alive() && (*known == Some(*xmin) || skip_guard) => {
            Verdict::Accounted {
                state: Some(state(m, values.clone())),
                settled: None,
            }
        }
        (Some((xmin, values)), Some((m, _))) if m.is_alive() && settled == Some(*xmin) => Verdict::Accounted {
            state: Some(state(m, values.clone())),
            settled: Some(*xmin),
        },
        (None, Some((m, _))) if !m.is_alive() && probed => Verdict::Accounted {
            state: Some(state(m, Vec::new())),
            settled: None,
        },
        (None, None) if probed => Verdict::Accounted {
            state: None,
            settled: None,
        },
        (None, _) if !probed => Verdict::Unaccounted(None),
        (Some((xmin, _)), _) => Verdict::Unaccounted(Some(*xmin)),
        (None, _) => Verdict::DeleteNotCaptured,
    }
}

/// Folds the next merge's action into a row's write: the row's state at the end of the part,
/// reached from its state at the start with at most a delete and an insert. A row inserted and
/// deleted in the part was missing at its start and is missing at its end: no write. `false`
/// when the sequence has no such equivalent (an update of columns an insert does not name): the
/// part is then applied in smaller parts. A part the database refuses is split too, so every
/// write still meets the database's constraints as it would alone, or is parked alone.
///
/// Before deletes and re-inserts folded, a part whose rows changed key away and back was split
/// in halves down to single transactions, a round of statements each, while holding the rows
/// locked: local writers of those rows waited a third of a second (docs/benchmarks.md).
pub fn fold(write: &mut Option<RowWrite>, action: &RowAction) -> bool {
    match (write, action) {
        (_, RowAction::Nothing) => {}
        (w @ None, RowAction::Update(writes)) => {
            *w = Some(RowWrite::Update(
                writes.iter().map(|c| (c.column, c.value.clone())).collect(),
            ));
        }
        (Some(RowWrite::Update(columns)), RowAction::Update(writes)) => {
            columns.extend(writes.iter().map(|c| (c.column, c.value.clone())));
        }
        (Some(RowWrite::Insert(values) | RowWrite::Replace(values)), RowAction::Update(writes)) => {
            if writes.iter().any(|c| c.column >= values.len()) {
                return false;
            }
            for c in writes {
                values[c.column] = c.value.clone();
            }
        }
        (w @ None, RowAction::Insert(values)) => *w = Some(RowWrite::Insert(values.clone())),
        (w @ Some(RowWrite::Delete), RowAction::Insert(values)) => *w = Some(RowWrite::Replace(values.clone())),
        (w @ (None | Some(RowWrite::Update(_)) | Some(RowWrite::Replace(_))), RowAction::Delete) => {
            *w = Some(RowWrite::Delete)
        }
        (w @ Some(RowWrite::Insert(_)), RowAction::Delete) => *w = None,
        _ => return false,
    }
    true
}

/// One distinct row of the batch.
#[derive(Debug)]
struct Slot {
    /// Index into the tables the machine was given.
    table: usize,
    key: RowKey,
}

/// A slot's state while a part is merged.
#[derive(Debug, Default)]
struct Work {
    /// The row as the part's merges left it (`None`: accord knows nothing of it).
    state: Option<RowState>,
    /// The xmin the stored metadata accounts for (or the one the guard settled).
    known: Option<Xid>,
    /// Whether the row's metadata is to be written.
    merged: bool,
    write: Option<RowWrite>,
    /// Changes of the row waiting for values; `true`: kept in the store by an earlier batch.
    kept: Vec<(RowChange, bool)>,
}

/// A part's merges, waiting for its writes to stand.
#[derive(Debug)]
struct Pending {
    part: (usize, usize),
    /// The slots written, in the order of the `Write` command.
    writes: Vec<usize>,
    records: Records,
    done: ApplySummary,
    greatest: Option<Hlc>,
}

#[derive(Debug)]
enum Phase {
    /// Waiting for `Start`.
    Idle,
    /// A `Load` of a part's rows (`slots`, in lock order) is out; `guard`: the attempt's first
    /// part, which the guard checks.
    Loading {
        part: (usize, usize),
        slots: Vec<usize>,
        guard: bool,
        /// The slots whose keys the load locks (and whose rows it reads again).
        lock_keys: Vec<usize>,
    },
    /// The keys of the part's missing rows are being locked (`missing`: with whether their
    /// metadata says they live); these xmins were seen.
    LockingKeys {
        part: (usize, usize),
        slots: Vec<usize>,
        suspects: Vec<(usize, Xid)>,
        missing: Vec<(usize, bool)>,
    },
    /// The part's rows wait for the capture to read past a probe; these xmins were seen.
    Probing {
        part: (usize, usize),
        slots: Vec<usize>,
        suspects: Vec<(usize, Xid)>,
    },
    /// A `Write` is out.
    Writing(Box<Pending>),
    /// A `WriteAndCommit` is out; what the part did, once it commits.
    Finishing(ApplySummary),
    Recording,
    Committing,
    Restarting,
    Done,
}

/// The apply of one batch of one peer's changes.
#[derive(Debug)]
pub struct BatchApply {
    peer: NodeId,
    tables: Arc<[TableDef]>,
    /// The shapes the node knows: a kept change was stored under the node's shape of its day.
    shapes: Arc<ShapeBook>,
    /// Tables the node left: their changes are passed over.
    left: Arc<std::collections::BTreeSet<String>>,
    rules: ApplyRules,
    cut: Option<StableCut>,
    /// The changes to apply, in sequence order.
    changes: Vec<RowChange>,
    /// Per change, its slot (`None`: its table is not replicated here).
    change_slots: Vec<Option<usize>>,
    slots: Vec<Slot>,
    /// The position the batch's transaction commits with.
    last: u64,
    phase: Phase,
    started: Option<u64>,
    pause: u64,
    /// Whether the capture has read past a probe written after this attempt's rows were read
    /// and its missing rows' keys were locked.
    probed: bool,
    /// Missing rows whose keys this attempt locked and found clear of local removals the capture
    /// has not accounted for: as good as probed.
    clear: std::collections::BTreeSet<usize>,
    /// Rows whose first change in the batch is its source's insert: the guard's load locks their
    /// keys itself (`ApplyCommand::Load`).
    new_rows: std::collections::BTreeSet<usize>,
    /// Rows whose current xmin the capture is known to have read past.
    settled: BTreeMap<usize, Xid>,
    /// The guard rounds taken in this transaction.
    rounds: u32,
    /// Whether this batch already waited for a local write with its rows unlocked (once per
    /// batch; see `loaded`).
    waited_unlocked: bool,
    /// Parts of this attempt still to apply, the next one last.
    ranges: Vec<(usize, usize)>,
    first_part: bool,
    /// Waits of attempts that rolled back.
    waits: u64,
    /// What this attempt's parts did so far.
    attempt: ApplySummary,
    greatest: Option<Hlc>,
    work: Vec<Work>,
    segment: Option<Segment>,
    /// The id of this attempt's transaction, once a load read it.
    xid: Option<Xid>,
    /// A write in one go with the commit was refused: write under savepoints from then on.
    careful: bool,
}

impl BatchApply {
    /// A batch of `peer`'s changes, to apply after position `applied`. `schema`: the replicated
    /// tables, and what the node knows of its own and its peers' shapes, to read a change written
    /// under another shape by column name (`shape`: the batch waits, whole, while one of its
    /// changes cannot be read here yet); `cut`: the latest completed tombstone-collection round
    /// (tombstones it covers read as absent).
    pub fn new(
        peer: NodeId,
        applied: u64,
        changes: Vec<RowChange>,
        schema: &NodeSchema,
        cut: Option<StableCut>,
        rules: ApplyRules,
    ) -> Result<BatchApply, ApplyError> {
        let tables = Arc::clone(&schema.tables);
        // Each table's shape id once per batch, when a change of it first needs it.
        let mut local_shapes: Vec<Option<ShapeId>> = vec![None; tables.len()];
        let skip_nothing = rules.planted == Some(PlantedBug::DoubleApply);
        let changes: Vec<RowChange> = changes
            .into_iter()
            .filter(|c| skip_nothing || c.seq > applied)
            .map(|c| {
                if schema.left.contains(&c.table) {
                    // A table this node left: its changes are not applied here (no slot below).
                    return Ok(c);
                }
                let local = tables.iter().position(|t| t.name == c.table).map(|i| {
                    let table = &tables[i];
                    (table, *local_shapes[i].get_or_insert_with(|| table.shape_id()))
                });
                match schema.shapes.read_under(&c, local) {
                    Reading::AsItIs => Ok(c),
                    Reading::Reshaped(read) => Ok(*read),
                    Reading::Waits(message) => Err(ApplyError::ShapeWaits {
                        peer,
                        message,
                        seq: Some(c.seq),
                    }),
                }
            })
            .collect::<Result<_, _>>()?;
        if let Some(first) = changes.first() {
            let continues = first.seq == applied + 1 || skip_nothing || rules.planted == Some(PlantedBug::ApplyPastGap);
            if !continues {
                return Err(ApplyError::Gap {
                    peer,
                    applied,
                    first: first.seq,
                });
            }
        }
        let last = changes.iter().map(|c| c.seq).fold(applied, u64::max);
        let mut index: BTreeMap<(usize, &RowKey), usize> = BTreeMap::new();
        let mut slots = Vec::new();
        let mut change_slots = Vec::with_capacity(changes.len());
        let mut seen = std::collections::BTreeSet::new();
        let mut new_rows = std::collections::BTreeSet::new();
        for change in &changes {
            let table = tables
                .iter()
                .position(|t| t.name == change.table)
                .filter(|_| !schema.left.contains(&change.table));
            let Some(table) = table else {
                change_slots.push(None);
                continue;
            };
            let slot = *index.entry((table, &change.key)).or_insert_with(|| {
                slots.push(Slot {
                    table,
                    key: change.key.clone(),
                });
                slots.len() - 1
            });
            if change.kind == ChangeKind::Insert && !seen.contains(&slot) {
                new_rows.insert(slot);
            }
            seen.insert(slot);
            change_slots.push(Some(slot));
        }
        let work = slots.iter().map(|_| Work::default()).collect();
        Ok(BatchApply {
            peer,
            tables,
            shapes: Arc::clone(&schema.shapes),
            left: Arc::clone(&schema.left),
            rules,
            cut,
            changes,
            change_slots,
            slots,
            last,
            phase: Phase::Idle,
            started: None,
            pause: rules.backoff_micros.0,
            probed: false,
            clear: std::collections::BTreeSet::new(),
            new_rows,
            settled: BTreeMap::new(),
            rounds: 0,
            waited_unlocked: false,
            ranges: Vec::new(),
            first_part: true,
            waits: 0,
            attempt: ApplySummary::default(),
            greatest: None,
            work,
            segment: None,
            xid: None,
            careful: false,
        })
    }

    /// Applies the batch as `segment` of a larger source transaction.
    pub fn in_segment(mut self, segment: Segment) -> Self {
        self.segment = Some(segment);
        self
    }

    /// What this batch and the segments before it merged, for the next segment.
    pub fn carried(&self) -> Carried {
        let mut carried = self.segment.as_ref().map(|s| s.carried.clone()).unwrap_or_default();
        carried.greatest = carried.greatest.max(self.greatest);
        for &(node, through) in self.changes.iter().flat_map(|c| &c.builds_on) {
            let entry = carried.builds_on.entry(node).or_insert(0);
            *entry = (*entry).max(through);
        }
        carried
    }

    /// The position to open the transaction with: none when a segment before opened it.
    fn begin_position(&self) -> Option<u64> {
        match &self.segment {
            None => Some(self.last),
            Some(segment) if segment.first => Some(segment.commit_at),
            Some(_) => None,
        }
    }

    pub fn peer(&self) -> NodeId {
        self.peer
    }

    /// The position the batch's transaction commits with.
    pub fn last(&self) -> u64 {
        self.last
    }

    /// Where the batch stands in a transaction applied in segments, if it is one.
    pub fn segment(&self) -> Option<&Segment> {
        self.segment.as_ref()
    }

    /// The changes the batch applies (what was at or below the applied position is not here).
    pub fn changes(&self) -> &[RowChange] {
        &self.changes
    }

    /// A slot's table and key.
    pub fn slot(&self, slot: usize) -> Option<(&TableDef, &RowKey)> {
        let s = self.slots.get(slot)?;
        Some((self.tables.get(s.table)?, &s.key))
    }

    /// Feeds what happened; returns what to do next.
    pub fn step(&mut self, input: ApplyInput) -> Result<ApplyCommand, ApplyError> {
        match (std::mem::replace(&mut self.phase, Phase::Done), input) {
            (Phase::Idle, ApplyInput::Start { now }) => {
                self.started = Some(now);
                if self.changes.is_empty() {
                    return Ok(self.done(ApplySummary::default()));
                }
                Ok(self.begin_attempt())
            }
            (Phase::Restarting, ApplyInput::Restarted { now }) => {
                self.check_time(now)?;
                Ok(self.begin_attempt())
            }
            (
                Phase::Loading {
                    part,
                    slots,
                    guard,
                    lock_keys,
                },
                ApplyInput::Loaded { rows, keys, xid },
            ) => {
                // Read by the load that began the transaction; the attempt keeps it until it
                // rolls back.
                if xid.is_some() {
                    self.xid = xid;
                }
                self.loaded_with_keys(part, slots, guard, lock_keys, rows, keys)
            }
            (Phase::LockingKeys { .. }, ApplyInput::KeysBusy { now }) => {
                self.check_time(now)?;
                Ok(self.restart(false))
            }
            (
                Phase::LockingKeys {
                    part,
                    slots,
                    suspects,
                    missing,
                },
                ApplyInput::KeysLocked(count),
            ) => Ok(self.keys_locked(part, slots, suspects, missing, count)),
            (Phase::Probing { part, slots, suspects }, ApplyInput::CaptureReached { now }) => {
                self.check_time(now)?;
                self.attempt.waits += 1;
                self.probed = true;
                self.rounds += 1;
                self.settled.extend(suspects);
                Ok(self.load(part, slots, None, true))
            }
            (Phase::Writing(pending), ApplyInput::Written(result)) => match result {
                Ok(xmins) => self.written(*pending, xmins),
                Err(refusal) if refusal.no_place => Err(ApplyError::NoPlace {
                    peer: self.peer,
                    message: refusal.message,
                }),
                Err(refusal) => Ok(self.refused(*pending, refusal)),
            },
            (Phase::Finishing(done), ApplyInput::Committed) => {
                self.attempt.add(&done);
                let mut summary = self.attempt;
                summary.waits += self.waits;
                Ok(self.done(summary))
            }
            (Phase::Finishing(_), ApplyInput::Written(Err(refusal))) if refusal.no_place => Err(ApplyError::NoPlace {
                peer: self.peer,
                message: refusal.message,
            }),
            // Rolled back whole: the careful way tells a racing insert from a refusal to park,
            // and parks only the refused change.
            (Phase::Finishing(_), ApplyInput::Written(Err(_))) => {
                self.careful = true;
                Ok(self.restart_now())
            }
            (Phase::Recording, ApplyInput::Recorded) => Ok(self.next_part()),
            (Phase::Committing, ApplyInput::Committed) => {
                let mut summary = self.attempt;
                summary.waits += self.waits;
                Ok(self.done(summary))
            }
            (phase, input) => {
                let expected = phase.expects();
                self.phase = phase;
                Err(ApplyError::Unexpected {
                    peer: self.peer,
                    input: input.name(),
                    expected,
                })
            }
        }
    }

    fn done(&mut self, summary: ApplySummary) -> ApplyCommand {
        self.phase = Phase::Done;
        ApplyCommand::Done {
            applied: self.last,
            summary,
        }
    }

    fn check_time(&self, now: u64) -> Result<(), ApplyError> {
        let waited = now.saturating_sub(self.started.unwrap_or(now));
        if waited > self.rules.wait_limit_micros {
            return Err(ApplyError::CaptureTimeout {
                peer: self.peer,
                secs: self.rules.wait_limit_micros / 1_000_000,
            });
        }
        Ok(())
    }

    /// The distinct rows of a part, in lock order: tables by name, then keys. Every writer locks
    /// in this order, so appliers do not deadlock with each other.
    fn part_slots(&self, (start, end): (usize, usize)) -> Vec<usize> {
        let mut slots: Vec<usize> = self.change_slots[start..end].iter().flatten().copied().collect();
        slots.sort_by(|&a, &b| {
            let (sa, sb) = (&self.slots[a], &self.slots[b]);
            self.tables[sa.table]
                .name
                .cmp(&self.tables[sb.table].name)
                .then_with(|| sa.key.cmp(&sb.key))
        });
        slots.dedup();
        slots
    }

    fn begin_attempt(&mut self) -> ApplyCommand {
        self.rounds = 0;
        self.xid = None;
        self.attempt = ApplySummary::default();
        self.greatest = None;
        self.ranges = vec![(0, self.changes.len())];
        self.first_part = true;
        self.next_part()
    }

    /// The next part of the attempt, or the commit.
    fn next_part(&mut self) -> ApplyCommand {
        if let Some(part) = self.ranges.pop() {
            let guard = self.first_part;
            self.first_part = false;
            let slots = self.part_slots(part);
            let begin = if guard { self.begin_position() } else { None };
            // The guard's load locks the keys of the rows the source inserted itself.
            let lock_keys = match guard {
                true => slots.iter().copied().filter(|s| self.new_rows.contains(s)).collect(),
                false => Vec::new(),
            };
            return self.load_locking(part, slots, begin, guard, lock_keys);
        }
        if self.segment.as_ref().is_some_and(|s| !s.last) {
            let mut summary = self.attempt;
            summary.waits += self.waits;
            return self.done(summary);
        }
        self.phase = Phase::Committing;
        let (merged_stamp, builds_on) = self.commit_carries();
        ApplyCommand::Commit {
            merged_stamp,
            builds_on,
        }
    }

    /// What the commit tells the capture: the greatest stamp merged, and what the merged rows
    /// build on.
    fn commit_carries(&self) -> (Option<Hlc>, Vec<(NodeId, u64)>) {
        let Carried { greatest, builds_on } = self.carried();
        let merged_stamp = greatest.filter(|_| self.rules.planted != Some(PlantedBug::NoMergedStamp));
        (merged_stamp, builds_on.into_iter().collect())
    }

    fn load(&mut self, part: (usize, usize), slots: Vec<usize>, begin: Option<u64>, guard: bool) -> ApplyCommand {
        self.load_locking(part, slots, begin, guard, Vec::new())
    }

    fn load_locking(
        &mut self,
        part: (usize, usize),
        slots: Vec<usize>,
        begin: Option<u64>,
        guard: bool,
        lock_keys: Vec<usize>,
    ) -> ApplyCommand {
        self.phase = Phase::Loading {
            part,
            slots: slots.clone(),
            guard,
            lock_keys: lock_keys.clone(),
        };
        ApplyCommand::Load {
            begin,
            guard,
            slots,
            lock_keys,
        }
    }

    /// Rolls the attempt back; the next starts over, after a probe or a pause.
    fn restart(&mut self, probe: bool) -> ApplyCommand {
        let pause_micros = if probe { 0 } else { self.pause };
        if !probe {
            self.pause = (self.pause * 2).min(self.rules.backoff_micros.1);
        }
        self.restart_after(probe, pause_micros)
    }

    /// Rolls the attempt back; the next starts over at once (no wait made it start over).
    fn restart_now(&mut self) -> ApplyCommand {
        self.restart_after(false, 0)
    }

    fn restart_after(&mut self, probe: bool, pause_micros: u64) -> ApplyCommand {
        let alone = self.rules.planted == Some(PlantedBug::RestartSegmentAlone);
        if let Some(segment) = self.segment.as_ref().filter(|s| !s.first && !alone) {
            self.phase = Phase::Done;
            let (least, most) = self.rules.backoff_micros;
            let pause_micros = match probe {
                true => 0,
                false => least.saturating_mul(1 << segment.restarts.min(16)).min(most),
            };
            return ApplyCommand::StartOver { probe, pause_micros };
        }
        self.phase = Phase::Restarting;
        self.waits += self.attempt.waits + 1;
        // The restart's probe settles the rows' versions, but the next attempt's missing rows
        // still wait for one written after their keys are locked.
        self.probed = false;
        self.clear.clear();
        for work in &mut self.work {
            *work = Work::default();
        }
        ApplyCommand::Restart { probe, pause_micros }
    }

    /// A load's answer, with the key locks it was asked to take.
    fn loaded_with_keys(
        &mut self,
        part: (usize, usize),
        slots: Vec<usize>,
        guard: bool,
        lock_keys: Vec<usize>,
        rows: Vec<LoadedRow>,
        keys: KeyLocks,
    ) -> Result<ApplyCommand, ApplyError> {
        match (lock_keys.is_empty(), keys) {
            (true, KeyLocks::NotAsked) => self.loaded(part, slots, guard, rows, None),
            (false, KeyLocks::Locked(count)) => self.loaded(part, slots, guard, rows, Some((lock_keys, count))),
            (false, KeyLocks::Busy { now }) => {
                self.check_time(now)?;
                Ok(self.restart(false))
            }
            (none_asked, _) => Err(ApplyError::Unexpected {
                peer: self.peer,
                input: match none_asked {
                    true => "Loaded with key locks",
                    false => "Loaded without key locks",
                },
                expected: match none_asked {
                    true => "Loaded without key locks",
                    false => "Loaded with key locks",
                },
            }),
        }
    }

    /// `locked`: the slots whose keys the load locked (reading their rows again), and the removal
    /// count read after the locks.
    fn loaded(
        &mut self,
        part: (usize, usize),
        slots: Vec<usize>,
        guard: bool,
        rows: Vec<LoadedRow>,
        locked: Option<(Vec<usize>, RemovalCount)>,
    ) -> Result<ApplyCommand, ApplyError> {
        if rows.len() != slots.len() {
            return Err(ApplyError::LoadedCount {
                found: rows.len(),
                asked: slots.len(),
            });
        }
        // The guard, for every row of the first part (the whole batch) before anything is
        // merged. Rows of later parts were checked with it and stay locked; a missing row among
        // them passed only after a probe.
        let probed = self.probed || !guard;
        let mut suspects = Vec::new();
        let mut missing = Vec::new();
        // Missing rows, kept for the key locks the load took (below).
        let mut missing_rows = Vec::new();
        for (&slot, row) in slots.iter().zip(rows) {
            let settled = self.settled.get(&slot).copied();
            let alive = row.meta.as_ref().is_some_and(|(m, _)| m.is_alive());
            let probed = probed || self.clear.contains(&slot);
            match judge(&row, probed, settled, self.cut.as_ref(), self.rules.planted) {
                Verdict::Accounted { state, settled } => self.account(slot, row, state, settled)?,
                Verdict::Unaccounted(Some(xmin)) => suspects.push((slot, xmin)),
                Verdict::Unaccounted(None) => {
                    missing.push((slot, alive));
                    missing_rows.push((slot, row));
                }
                Verdict::DeleteNotCaptured => return Ok(self.restart(false)),
            }
        }
        let all_locked = |(locked, _): &(Vec<usize>, RemovalCount)| {
            !missing.is_empty() && missing.iter().all(|(slot, _)| locked.contains(slot))
        };
        if let Some((_, count)) = locked.filter(all_locked) {
            // Every missing row's key was locked by the load, which then read the row again: as
            // after `LockKeys` and a second load (`keys_locked`), by the same rule, the rows pass
            // now, or the part probes.
            if self.keys_clear(&suspects, &missing, count) {
                self.attempt.keys_clear += missing.len() as u64;
                for (slot, row) in missing_rows {
                    self.clear.insert(slot);
                    let settled = self.settled.get(&slot).copied();
                    match judge(&row, true, settled, self.cut.as_ref(), self.rules.planted) {
                        Verdict::Accounted { state, settled } => self.account(slot, row, state, settled)?,
                        // A missing row recorded as absent or deleted is accounted for once
                        // probed; `keys_clear` passed no other.
                        _ => {
                            return Err(ApplyError::Unexpected {
                                peer: self.peer,
                                input: "a missing row the key locks cleared",
                                expected: "a row recorded as absent or deleted",
                            })
                        }
                    }
                }
                missing.clear();
            } else if guard && self.rounds < self.rules.guard_rounds {
                self.phase = Phase::Probing { part, slots, suspects };
                return Ok(ApplyCommand::ProbeAndWait);
            }
        }
        let first_segment = self.segment.as_ref().is_none_or(|s| s.first);
        if missing.is_empty() && !suspects.is_empty() && guard && first_segment && !self.waited_unlocked {
            // A local write the capture may not have read: the first time, wait for the capture
            // with the rows unlocked, so that the node's users writing those rows do not wait
            // behind this batch (holding the locks, a user incrementing hot rows waited for
            // every such batch's probe). The versions seen are settled by the probe: rows still
            // at them after the restart are accounted for. A row written again meanwhile is
            // waited for with the locks held, below, so that hot rows cannot starve the batch.
            self.waited_unlocked = true;
            self.settled.extend(suspects);
            return Ok(self.restart(true));
        }
        if !missing.is_empty() || !suspects.is_empty() {
            if guard && self.rounds < self.rules.guard_rounds {
                // Wait with the rows locked: no local write can change them meanwhile, so once
                // the capture has read past the probe every row seen is accounted for, and the
                // batch goes on instead of starting over behind the next local write (hot rows
                // starved that way).
                if !missing.is_empty() {
                    let keys = missing.iter().map(|&(slot, _)| slot).collect();
                    self.phase = Phase::LockingKeys {
                        part,
                        slots,
                        suspects,
                        missing,
                    };
                    return Ok(ApplyCommand::LockKeys { missing: keys });
                }
                self.phase = Phase::Probing { part, slots, suspects };
                return Ok(ApplyCommand::ProbeAndWait);
            }
            self.settled.extend(suspects);
            return Ok(self.restart(true));
        }
        Ok(self.merge_part(part))
    }

    /// The missing rows' keys are locked. When nothing but missing rows held the part back, all
    /// of them are recorded as absent or deleted, and no local removal was counted since the
    /// capture last accounted for them all (the count is settled), the part is loaded again and
    /// goes on without a probe: no local write of those keys is left for the capture to account
    /// for (a local history of a row recorded as absent or deleted that leaves it missing begins
    /// with an insert and ends with a removal, which counted itself before it committed), and
    /// none can commit until this transaction ends. (A row whose metadata says it lives was deleted
    /// here by a write the capture may not have read: it waits for a probe.) Otherwise the part
    /// probes.
    fn keys_locked(
        &mut self,
        part: (usize, usize),
        slots: Vec<usize>,
        suspects: Vec<(usize, Xid)>,
        missing: Vec<(usize, bool)>,
        count: RemovalCount,
    ) -> ApplyCommand {
        if self.keys_clear(&suspects, &missing, count) {
            self.attempt.keys_clear += missing.len() as u64;
            self.clear.extend(missing.iter().map(|&(slot, _)| slot));
            self.rounds += 1;
            return self.load(part, slots, None, true);
        }
        self.phase = Phase::Probing { part, slots, suspects };
        ApplyCommand::ProbeAndWait
    }

    /// Whether missing rows whose keys are locked pass without a probe (see `keys_locked`).
    fn keys_clear(&self, suspects: &[(usize, Xid)], missing: &[(usize, bool)], count: RemovalCount) -> bool {
        let trust_any = self.rules.planted == Some(PlantedBug::IgnoreRemovalCounts);
        suspects.is_empty() && missing.iter().all(|&(_, alive)| !alive) && (count.settled() || trust_any)
    }

    /// A row the guard passed: the state the part's merges start from.
    fn account(
        &mut self,
        slot: usize,
        row: LoadedRow,
        state: Option<RowState>,
        settled: Option<Xid>,
    ) -> Result<(), ApplyError> {
        let table = &self.tables[self.slots[slot].table];
        // Kept under the node's shape of the day they were kept: read as it is now.
        let kept = row
            .deferred
            .into_iter()
            .map(|c| match self.shapes.read(&c, Some(table)) {
                Reading::AsItIs => Ok((c, true)),
                Reading::Reshaped(read) => Ok((*read, true)),
                Reading::Waits(message) => Err(ApplyError::ShapeWaits {
                    peer: self.peer,
                    message,
                    seq: None,
                }),
            })
            .collect::<Result<_, _>>()?;
        self.work[slot] = Work {
            state,
            known: settled.or_else(|| row.meta.as_ref().and_then(|(_, k)| *k)),
            // A settled xmin is recorded even if no merge of the row stands.
            merged: settled.is_some(),
            write: None,
            kept,
        };
        Ok(())
    }

    /// Merges the part in memory, in order, each change against the state the earlier ones
    /// left, and plans its writes.
    fn merge_part(&mut self, part: (usize, usize)) -> ApplyCommand {
        let mut records = Records::default();
        let mut done = ApplySummary::default();
        let mut greatest = self.greatest;
        for i in part.0..part.1 {
            let change = &self.changes[i];
            let Some(slot) = self.change_slots[i] else {
                if self.left.contains(&change.table) {
                    done.left += 1;
                    continue;
                }
                let error = format!("table {} is not replicated on this node", change.table);
                records.parked.push((unapplicable(change, error), change.clone()));
                done.parked += 1;
                continue;
            };
            let table = &self.tables[self.slots[slot].table];
            match merge_into(table, slot, &mut self.work[slot], change, &mut records) {
                Merge::Applied => {
                    done.applied += 1;
                    greatest = greatest.max(Some(change.stamp));
                    retry_kept(
                        table,
                        slot,
                        &mut self.work[slot],
                        &mut records,
                        &mut done,
                        &mut greatest,
                    );
                }
                Merge::Unfoldable => return self.split(part),
                Merge::Parked => done.parked += 1,
                Merge::Deferred => {
                    self.work[slot].kept.push((change.clone(), false));
                    done.deferred += 1;
                }
            }
        }
        let drop_deferred = self.rules.planted == Some(PlantedBug::DropDeferred);
        for (slot, work) in self.work.iter_mut().enumerate() {
            if work.merged {
                if let Some(state) = &work.state {
                    records.metas.push((slot, state.meta.clone(), work.known));
                }
            }
            for (change, stored) in work.kept.drain(..) {
                if !stored && !drop_deferred {
                    records.defer.push(change);
                }
            }
        }
        // In the order the part first wrote each row: a parent inserted before its children
        // meets the children's foreign keys.
        let mut writes: Vec<usize> = Vec::new();
        let mut seen = vec![false; self.slots.len()];
        for &slot in self.change_slots[part.0..part.1].iter().flatten() {
            if self.work[slot].write.is_some() && !std::mem::replace(&mut seen[slot], true) {
                writes.push(slot);
            }
        }
        if writes.is_empty() {
            self.attempt.add(&done);
            self.greatest = greatest;
            return self.record(records);
        }
        let planned: Vec<PlannedWrite> = writes
            .iter()
            .filter_map(|&slot| self.work[slot].write.take().map(|write| PlannedWrite { slot, write }))
            .collect();
        if let Some(xid) = self.xid.filter(|_| self.in_one_go(&records)) {
            return self.write_and_commit(planned, records, done, greatest, xid);
        }
        self.phase = Phase::Writing(Box::new(Pending {
            part,
            writes,
            records,
            done,
            greatest,
        }));
        ApplyCommand::Write(planned)
    }

    /// Whether the part's writes, records and the commit go in one round trip: the part is the
    /// batch's last, the batch is not a segment (whose refused write would take the segments
    /// before it along), no write of it was refused so far, and its records are the metadata and
    /// conflict log alone.
    fn in_one_go(&self, records: &Records) -> bool {
        !self.careful
            && self.ranges.is_empty()
            && self.segment.is_none()
            && records.review.is_empty()
            && records.parked.is_empty()
            && records.defer.is_empty()
            && records.undefer.is_empty()
    }

    /// `WriteAndCommit`: each written row's metadata accounts for the version this write makes,
    /// whose xmin is the transaction's id (none after a delete), as `written` sets it from the
    /// xmins a `Write` returns.
    fn write_and_commit(
        &mut self,
        planned: Vec<PlannedWrite>,
        mut records: Records,
        done: ApplySummary,
        greatest: Option<Hlc>,
        xid: Xid,
    ) -> ApplyCommand {
        let made: BTreeMap<usize, Option<Xid>> = planned
            .iter()
            .map(|p| (p.slot, (!matches!(p.write, RowWrite::Delete)).then_some(xid)))
            .collect();
        account_written(&mut records, &made);
        for work in &mut self.work {
            *work = Work::default();
        }
        self.greatest = greatest;
        let (merged_stamp, builds_on) = self.commit_carries();
        self.phase = Phase::Finishing(done);
        ApplyCommand::WriteAndCommit {
            writes: planned,
            records,
            merged_stamp,
            builds_on,
        }
    }

    /// Applies the part in halves. A part of one change always folds (one action into no write),
    /// so halving ends before that.
    fn split(&mut self, (start, end): (usize, usize)) -> ApplyCommand {
        for work in &mut self.work {
            *work = Work::default();
        }
        if end - start <= 1 {
            return self.park_refused(
                (start, end),
                "the change does not fold into one write of its row".into(),
            );
        }
        let middle = start + (end - start).div_ceil(2);
        self.ranges.push((middle, end));
        self.ranges.push((start, middle));
        self.next_part()
    }

    fn written(&mut self, pending: Pending, xmins: Vec<Option<Xid>>) -> Result<ApplyCommand, ApplyError> {
        if xmins.len() != pending.writes.len() {
            return Err(ApplyError::WrittenCount {
                found: xmins.len(),
                asked: pending.writes.len(),
            });
        }
        let written: BTreeMap<usize, Option<Xid>> = pending.writes.into_iter().zip(xmins).collect();
        let mut records = pending.records;
        account_written(&mut records, &written);
        self.attempt.add(&pending.done);
        self.greatest = pending.greatest;
        Ok(self.record(records))
    }

    fn record(&mut self, records: Records) -> ApplyCommand {
        for work in &mut self.work {
            *work = Work::default();
        }
        if records.is_empty() {
            return self.next_part();
        }
        self.phase = Phase::Recording;
        ApplyCommand::Record(records)
    }

    /// The database refused the part's writes (they were rolled back to their savepoint).
    fn refused(&mut self, pending: Pending, refusal: WriteRefusal) -> ApplyCommand {
        if refusal.key_exists {
            // A row of the key appeared after it was found missing: a local insert, or another
            // peer's merge, raced this one. Not a refusal: start over and merge against it.
            return self.restart(false);
        }
        let part = pending.part;
        if part.1 - part.0 > 1 {
            return self.split(part);
        }
        self.park_refused(part, refusal.message)
    }

    /// Parks the one change of `part`, which the database refused.
    fn park_refused(&mut self, part: (usize, usize), refusal: String) -> ApplyCommand {
        let change = &self.changes[part.0];
        let mut records = Records::default();
        records.parked.push((unapplicable(change, refusal), change.clone()));
        self.attempt.parked += 1;
        self.record(records)
    }
}

impl Phase {
    fn expects(&self) -> &'static str {
        match self {
            Phase::Idle => "Start",
            Phase::Loading { .. } => "Loaded",
            Phase::LockingKeys { .. } => "KeysLocked or KeysBusy",
            Phase::Probing { .. } => "CaptureReached",
            Phase::Restarting => "Restarted",
            Phase::Writing(_) => "Written",
            Phase::Finishing(_) => "Committed or Written",
            Phase::Recording => "Recorded",
            Phase::Committing => "Committed",
            Phase::Done => "nothing (the batch is done)",
        }
    }
}

impl ApplyCommand {
    /// The command's kind, for logs.
    pub fn name(&self) -> &'static str {
        match self {
            ApplyCommand::Load { .. } => "Load",
            ApplyCommand::LockKeys { .. } => "LockKeys",
            ApplyCommand::ProbeAndWait => "ProbeAndWait",
            ApplyCommand::Restart { .. } => "Restart",
            ApplyCommand::StartOver { .. } => "StartOver",
            ApplyCommand::Write(_) => "Write",
            ApplyCommand::Record(_) => "Record",
            ApplyCommand::WriteAndCommit { .. } => "WriteAndCommit",
            ApplyCommand::Commit { .. } => "Commit",
            ApplyCommand::Done { .. } => "Done",
        }
    }
}

impl ApplyInput {
    fn name(&self) -> &'static str {
        match self {
            ApplyInput::Start { .. } => "Start",
            ApplyInput::Loaded { .. } => "Loaded",
            ApplyInput::CaptureReached { .. } => "CaptureReached",
            ApplyInput::KeysLocked(_) => "KeysLocked",
            ApplyInput::KeysBusy { .. } => "KeysBusy",
            ApplyInput::Restarted { .. } => "Restarted",
            ApplyInput::Written(_) => "Written",
            ApplyInput::Recorded => "Recorded",
            ApplyInput::Committed => "Committed",
        }
    }
}

/// The metadata of each row written accounts for the version that write made (`written`: its
/// xmin per slot, none after a delete).
fn account_written(records: &mut Records, written: &BTreeMap<usize, Option<Xid>>) {
    for (slot, _, known) in &mut records.metas {
        if let Some(xmin) = written.get(slot) {
            *known = *xmin;
        }
    }
}

enum Merge {
    Applied,
    Unfoldable,
    Parked,
    Deferred,
}

/// Merges one change into a slot's work, folding its action into the row's write.
fn merge_into(table: &TableDef, slot: usize, work: &mut Work, change: &RowChange, records: &mut Records) -> Merge {
    let outcome = match merge(table, work.state.as_ref(), change) {
        Ok(outcome) => outcome,
        Err(error) => {
            records
                .parked
                .push((unapplicable(change, error.to_string()), change.clone()));
            return Merge::Parked;
        }
    };
    match outcome {
        MergeOutcome::Applied(merged) => {
            if !fold(&mut work.write, &merged.action) {
                return Merge::Unfoldable;
            }
            records
                .conflicts
                .extend(merged.conflicts.into_iter().map(|c| (slot, c)));
            records.review.extend(merged.review);
            records.merged.push((change.origin, change.seq));
            work.state = Some(merged.state);
            work.merged = true;
            Merge::Applied
        }
        MergeOutcome::Parked { item, .. } => {
            records.parked.push((item, change.clone()));
            Merge::Parked
        }
        MergeOutcome::Deferred { .. } => Merge::Deferred,
    }
}

/// Changes of a row kept for lack of values may merge once a merge wrote the row. One that still
/// lacks values, or does not fold into the row's write, stays kept.
fn retry_kept(
    table: &TableDef,
    slot: usize,
    work: &mut Work,
    records: &mut Records,
    done: &mut ApplySummary,
    greatest: &mut Option<Hlc>,
) {
    loop {
        let waiting = std::mem::take(&mut work.kept);
        let before = waiting.len();
        for (change, stored) in waiting {
            match merge_into(table, slot, work, &change, records) {
                outcome @ (Merge::Applied | Merge::Parked) => {
                    if stored {
                        records
                            .undefer
                            .push((change.table.clone(), change.key.clone(), change.origin, change.seq));
                    } else {
                        // Kept and merged within this part: never stored.
                        done.deferred = done.deferred.saturating_sub(1);
                    }
                    done.undeferred += 1;
                    match outcome {
                        Merge::Applied => *greatest = (*greatest).max(Some(change.stamp)),
                        _ => done.parked += 1,
                    }
                }
                Merge::Deferred | Merge::Unfoldable => work.kept.push((change, stored)),
            }
        }
        if work.kept.len() >= before {
            return;
        }
    }
}

fn unapplicable(change: &RowChange, error: String) -> ReviewItem {
    ReviewItem::unapplicable(
        &change.table,
        &change.key,
        None,
        change.origin,
        change.stamp,
        change.seq,
        error,
    )
}
