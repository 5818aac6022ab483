//! The apply driver: carries out the commands of the engine's `BatchApply` against the simulated
//! database, as `src/node/apply.rs` carries them out in PostgreSQL. Every decision (the xmin
//! guard, its rounds, restarts, splitting, parking, deferral, what is skipped) is the engine's;
//! this module only reads and writes rows.
//!
//! A transaction's writes go to an overlay that reads see first and that the commit moves into
//! the database in one step; a rollback or a crash drops it. Each peer has its own applier, and
//! they run side by side: every round trip to the database (a load, a write, a record) is a
//! pause in which other appliers, the capture and local writers run. What keeps a transaction's
//! rows as it read them is what keeps them in PostgreSQL, row locks, simulated here
//! (`Applying::holds_row`, `Applying::holds_meta`):
//!
//! - a load locks the rows that exist (`FOR UPDATE`, in the order the engine gives), then,
//!   after the guard's savepoint, the metadata that exists; a lock another applier holds makes
//!   the load wait (`Stop::Blocked`), keeping the locks taken before it; the rows a load returns
//!   are those its statement's snapshot saw, at their latest versions, as `FOR UPDATE` returns
//!   them after a wait;
//! - before a probe, the keys of the rows the load found missing are locked (the service's
//!   advisory key locks), or, if another applier holds one, none is and the batch starts over;
//! - rolling back to the guard's savepoint releases the metadata locks, a restart all of them;
//! - an insert of a key another applier wrote and has not committed waits for it, then is
//!   refused as a duplicate if that one committed; metadata writes wait for its locks;
//! - local writers and the capture wait for these locks too (`crate::node`).

use std::collections::{BTreeMap, BTreeSet};

use accord_engine::{
    ApplyCommand, ApplyInput, BatchApply, CapturedChange, ChangeKind, Conflict, KeyLocks, LoadedRow, NodeId,
    PlannedWrite, Records, RemovalCount, RemovalLedger, ReviewAction, ReviewItem, RowChange, RowWrite, TableDef,
    WriteRefusal,
};

use crate::db::{Db, MetaRow, Undo, UserRow};
use crate::table::key_of;

/// A batch being applied, and its open transaction.
#[derive(Debug)]
pub struct Applying {
    /// The table as the node has it.
    table: TableDef,
    /// The peer's index.
    pub peer: usize,
    pub machine: BatchApply,
    /// The batch as received: after a deadlock the applier starts it over, as the service does.
    pub batch: Vec<RowChange>,
    tx: Overlay,
    /// What the machine waits for.
    pub waiting: Waiting,
    /// Keys of missing rows locked (the service's advisory locks on keys, which hold other
    /// appliers and local inserts off a key that has no row to lock). The service locks buckets
    /// of keys: that only adds waits, never removes one.
    key_locks: BTreeSet<i64>,
    /// Rows locked `FOR UPDATE` (existing rows only; written rows are held through `tx`).
    row_locks: BTreeSet<i64>,
    /// Metadata rows locked by a load since the guard's savepoint.
    meta_locks: BTreeSet<i64>,
    /// The keys whose rows the blocked load's statement saw when it began (its snapshot).
    load_seen: Option<BTreeSet<i64>>,
    /// The removal count a load read after taking its key locks, while the load waits for a
    /// row lock.
    load_keys: Option<RemovalCount>,
    /// A command that waits for a lock, carried out again once it is released.
    pending: Option<ApplyCommand>,
    /// The input to feed after a round trip.
    ready: Option<ApplyInput>,
    /// The removal count to settle in the node's ledger once the capture has read past the probe
    /// this machine waits for (read while no transaction that counted itself was open).
    settle: Option<u64>,
    /// The WAL position of the last probe, the keys locked then, and the rows as they were.
    last_probe: Option<(u64, u64, BTreeSet<i64>, Vec<RowPicture>)>,
    /// Key locks taken so far (a lock released by a rollback and taken again counts again).
    locks_taken: u64,
    /// What the last load returned, as a probe pictures it.
    loaded_picture: Vec<RowPicture>,
    /// What the last commit replaced.
    undo: Undo,
    /// A spooled transaction's segment rolled everything back: it starts over from its first
    /// segment once the wait is over.
    pub start_over: bool,
    /// Of a spooled transaction: the segment being applied, and what the ones before applied.
    pub segment_index: usize,
    earlier: Vec<(NodeId, u64)>,
    earlier_summary: accord_engine::ApplySummary,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Waiting {
    /// The capture must have covered this WAL position; then the input is fed.
    Capture { lsn: u64, then: Resume },
    /// A pause until this time, then the restarted attempt.
    Until { at: u64 },
    /// A lock held by another peer's applier.
    Lock { holder: usize },
    /// A round trip to the database, over at this time.
    RoundTrip { at: u64 },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resume {
    CaptureReached,
    Restarted,
}

/// What a probe saw of a row: its xmin, and its metadata's causal length and known xmin.
type RowPicture = (Option<u64>, Option<(u64, Option<u64>)>);

/// The open transaction's writes, not yet in the database.
#[derive(Debug, Default)]
struct Overlay {
    xid: Option<u64>,
    rows: BTreeMap<i64, Option<UserRow>>,
    metas: BTreeMap<i64, MetaRow>,
    conflicts: Vec<(i64, Conflict)>,
    review: Vec<ReviewAction>,
    parked: Vec<(ReviewItem, RowChange)>,
    defer: Vec<RowChange>,
    undefer: Vec<(i64, NodeId, u64)>,
    merged: Vec<(NodeId, u64)>,
    wal_rows: Vec<CapturedChange>,
}

/// How a run of commands ended.
#[derive(Debug)]
pub enum Stop {
    /// The machine waits (see `Applying::waiting`).
    Waiting,
    /// A command waits for a lock held by the applier of peer `holder`.
    Blocked { holder: usize },
    /// The batch committed: what it merged, and the machine's last word.
    Done(Box<Committed>),
    /// A segment of a spooled transaction is applied, its transaction still open: the next
    /// segment goes on in it (`Applying::next_segment`).
    SegmentDone,
}

#[derive(Debug)]
pub struct Committed {
    pub applied: u64,
    pub summary: accord_engine::ApplySummary,
    /// The changes the transaction applied, and those it merged (kept ones included).
    pub changes: Vec<(NodeId, u64)>,
    pub merged: Vec<(NodeId, u64)>,
    pub conflicts: usize,
    pub review: Vec<ReviewAction>,
    pub parked: Vec<(ReviewItem, RowChange)>,
    /// What puts the database back if a crash of the machine loses the commit.
    pub undo: Undo,
}

/// Why the driver could not go on: the machine or the simulated database broke a rule.
#[derive(Debug)]
pub struct DriverError(pub String);

/// What a run of the driver is given besides the database.
#[derive(Debug, Clone, Copy)]
pub struct RunEnv {
    pub now: u64,
    pub physical: u64,
    /// Merge transactions carry row images in the WAL (only a capture that fails to skip
    /// peers' transactions reads them).
    pub images: bool,
    /// The capture has dealt with everything up to this WAL position.
    pub capture_read: u64,
    /// How long the next round trip to the database takes (0: none; nothing runs meanwhile).
    pub round_trip: u64,
}

impl Applying {
    /// `table`: the table as the node has it (no migration runs while an apply is open).
    pub fn new(peer: usize, machine: BatchApply, batch: Vec<RowChange>, table: TableDef) -> Self {
        Applying {
            peer,
            table,
            machine,
            batch,
            tx: Overlay::default(),
            waiting: Waiting::Until { at: 0 },
            key_locks: BTreeSet::new(),
            row_locks: BTreeSet::new(),
            meta_locks: BTreeSet::new(),
            load_seen: None,
            load_keys: None,
            pending: None,
            ready: None,
            settle: None,
            last_probe: None,
            locks_taken: 0,
            loaded_picture: Vec::new(),
            undo: Undo::default(),
            start_over: false,
            segment_index: 0,
            earlier: Vec::new(),
            earlier_summary: accord_engine::ApplySummary::default(),
        }
    }

    /// Goes on with segment `index` of a spooled transaction (`machine` applies `batch`) in the
    /// same open transaction; index 0 after a start over.
    pub fn next_segment(&mut self, machine: BatchApply, batch: Vec<RowChange>, index: usize) {
        if index == 0 {
            self.earlier.clear();
            self.earlier_summary = accord_engine::ApplySummary::default();
        } else {
            self.earlier
                .extend(self.machine.changes().iter().map(|c| (c.origin, c.seq)));
        }
        self.machine = machine;
        self.batch = batch;
        self.segment_index = index;
        self.start_over = false;
    }

    /// Whether this transaction holds `key`'s row: locked, or written and not committed.
    pub fn holds_row(&self, key: i64) -> bool {
        self.row_locks.contains(&key) || self.tx.rows.contains_key(&key)
    }

    /// Whether this transaction locked `key` as a key. A key lock is only taken on a key without
    /// a row, and only this transaction can insert it then: a local write of it is an insert,
    /// whose trigger takes that lock too.
    pub fn holds_key(&self, key: i64) -> bool {
        self.key_locks.contains(&key)
    }

    /// Whether this transaction holds `key`'s metadata row: locked, or written.
    pub fn holds_meta(&self, key: i64) -> bool {
        self.meta_locks.contains(&key) || self.tx.metas.contains_key(&key)
    }

    /// Rolls the open transaction back: its writes and locks go.
    fn roll_back(&mut self) {
        self.tx = Overlay::default();
        self.settle = None;
        self.release_locks();
        self.load_seen = None;
        self.load_keys = None;
    }

    fn release_locks(&mut self) {
        self.key_locks.clear();
        self.row_locks.clear();
        self.meta_locks.clear();
    }

    /// Commits, releasing the locks (what it did is reported at `Done`), and tells the machine at
    /// once: the commit is the round trip's end.
    fn commit_and_step(
        &mut self,
        db: &mut Db,
        merged_stamp: Option<accord_engine::Hlc>,
        builds_on: Vec<(NodeId, u64)>,
        physical: u64,
    ) -> Result<ApplyCommand, DriverError> {
        self.undo = self.commit(db, merged_stamp, builds_on, physical);
        self.release_locks();
        self.step(ApplyInput::Committed)
    }

    /// The applier holding the metadata lock of a row `records` writes the metadata of.
    fn meta_holder(&self, others: &[&Applying], records: &Records) -> Option<usize> {
        records.metas.iter().find_map(|(slot, _, _)| {
            let key = self.key(*slot).ok()?;
            others.iter().find(|o| o.holds_meta(key)).map(|o| o.peer)
        })
    }

    /// `command` waits for a lock `holder` holds; it runs again once that is released.
    fn block(&mut self, command: ApplyCommand, holder: usize) -> Stop {
        self.pending = Some(command);
        self.waiting = Waiting::Lock { holder };
        Stop::Blocked { holder }
    }

    /// Feeds `input` (or, after a round trip, the input it returned; after a lock wait, nothing:
    /// the blocked command runs again) and carries out commands until the machine waits, a
    /// command waits for a lock, or the batch is done. `others`: the other peers' appliers;
    /// `ledger`: the node's, which they share.
    pub fn run(
        &mut self,
        db: &mut Db,
        others: &[&Applying],
        ledger: &mut RemovalLedger,
        input: Option<ApplyInput>,
        env: RunEnv,
    ) -> Result<Stop, DriverError> {
        if matches!(input, Some(ApplyInput::CaptureReached { .. })) {
            // The capture read past the probe: the count read at rest before it is accounted
            // for.
            if let Some(issued) = self.settle.take() {
                ledger.settle(issued);
            }
        }
        let mut command = match (self.pending.take(), input.or_else(|| self.ready.take())) {
            (Some(command), None) => command,
            (None, Some(input)) => self.step(input)?,
            (pending, input) => {
                return Err(DriverError(format!(
                    "apply driver: resumed with a blocked command {:?} and an input {:?}",
                    pending.is_some(),
                    input.is_some()
                )))
            }
        };
        let RunEnv {
            now,
            physical,
            images,
            capture_read,
            round_trip,
        } = env;
        loop {
            let input = match command {
                ApplyCommand::Load {
                    begin,
                    guard,
                    slots,
                    lock_keys,
                } => {
                    if begin.is_some() && self.load_seen.is_none() {
                        self.roll_back();
                    }
                    // The rows first, holding no key lock while one waits (the service's order).
                    if let Some(holder) = self.lock_for_load(db, others, &slots, guard)? {
                        let command = ApplyCommand::Load {
                            begin,
                            guard,
                            slots,
                            lock_keys,
                        };
                        return Ok(self.block(command, holder));
                    }
                    // Then the key locks and the count: once (a load that waits for a row that
                    // appeared meanwhile runs again without them).
                    let keys = match (lock_keys.is_empty(), self.load_keys) {
                        (true, _) => KeyLocks::NotAsked,
                        (false, Some(count)) => KeyLocks::Locked(count),
                        (false, None) if !self.lock_keys(others, &lock_keys)? => KeyLocks::Busy { now },
                        (false, None) => {
                            let count = RemovalCount {
                                issued: db.removal_count,
                                accounted: ledger.accounted(),
                            };
                            self.load_keys = Some(count);
                            KeyLocks::Locked(count)
                        }
                    };
                    if let KeyLocks::Busy { .. } = keys {
                        // The machine starts over without looking at rows.
                        self.load_seen = None;
                        ApplyInput::Loaded {
                            rows: Vec::new(),
                            keys,
                            xid: None,
                        }
                    } else {
                        // Then the rows of those keys again, as they are now.
                        if let Some(holder) = self.read_again(db, others, &lock_keys)? {
                            let command = ApplyCommand::Load {
                                begin,
                                guard,
                                slots,
                                lock_keys,
                            };
                            return Ok(self.block(command, holder));
                        }
                        self.load_keys = None;
                        let seen = self.load_seen.take();
                        let rows = self.load(db, &slots, seen.as_ref())?;
                        self.loaded_picture = rows
                            .iter()
                            .map(|r| {
                                (
                                    r.row.as_ref().map(|(xmin, _)| *xmin),
                                    r.meta.as_ref().map(|(m, known)| (m.causal_length, *known)),
                                )
                            })
                            .collect();
                        // The service reads the transaction's id with the load that begins it.
                        let xid = begin.map(|_| *self.tx.xid.get_or_insert_with(|| db.new_xid()));
                        ApplyInput::Loaded { rows, keys, xid }
                    }
                }
                ApplyCommand::LockKeys { missing } => {
                    // Rolling back to the guard's savepoint releases the metadata locks.
                    self.meta_locks.clear();
                    if !self.lock_keys(others, &missing)? {
                        ApplyInput::KeysBusy { now }
                    } else {
                        ApplyInput::KeysLocked(RemovalCount {
                            issued: db.removal_count,
                            accounted: ledger.accounted(),
                        })
                    }
                }
                ApplyCommand::ProbeAndWait => {
                    self.meta_locks.clear();
                    // The removal lock taken for a moment: local transactions hold it from their
                    // count to their end, and they are not open between the simulator's steps;
                    // appliers never take it.
                    self.settle = Some(db.removal_count);
                    self.probing(db, capture_read)?;
                    // The probe is followed by a synchronous commit on another session, which
                    // flushes the WAL (the walsender sends only flushed WAL).
                    db.flush();
                    // Nothing was written before the guard's savepoint.
                    self.waiting = Waiting::Capture {
                        lsn: db.wal_insert_lsn(),
                        then: Resume::CaptureReached,
                    };
                    return Ok(Stop::Waiting);
                }
                ApplyCommand::Restart { probe, pause_micros } => {
                    self.roll_back_and_wait(db, capture_read, probe, now + pause_micros)?;
                    return Ok(Stop::Waiting);
                }
                ApplyCommand::StartOver { probe, pause_micros } => {
                    if self.machine.segment().is_none() {
                        return Err(DriverError(
                            "apply driver: StartOver of a batch that is not a segment".into(),
                        ));
                    }
                    // Everything the transaction's segments did goes, as for a restart.
                    self.start_over = true;
                    self.roll_back_and_wait(db, capture_read, probe, now + pause_micros)?;
                    return Ok(Stop::Waiting);
                }
                ApplyCommand::Write(planned) => {
                    if let Some(holder) = self.insert_blocked(others, &planned)? {
                        return Ok(self.block(ApplyCommand::Write(planned), holder));
                    }
                    ApplyInput::Written(self.write(db, planned, images))
                }
                ApplyCommand::Record(records) => {
                    if let Some(holder) = self.meta_holder(others, &records) {
                        return Ok(self.block(ApplyCommand::Record(records), holder));
                    }
                    self.record(records)?;
                    ApplyInput::Recorded
                }
                ApplyCommand::WriteAndCommit {
                    writes,
                    records,
                    merged_stamp,
                    builds_on,
                } => {
                    // One round trip: whatever it waits for, it waits before doing anything.
                    let holder = match self.insert_blocked(others, &writes)? {
                        Some(holder) => Some(holder),
                        None => self.meta_holder(others, &records),
                    };
                    if let Some(holder) = holder {
                        let command = ApplyCommand::WriteAndCommit {
                            writes,
                            records,
                            merged_stamp,
                            builds_on,
                        };
                        return Ok(self.block(command, holder));
                    }
                    match self.write(db, writes, images) {
                        Err(refusal) => {
                            // No savepoint: the whole transaction rolls back.
                            self.roll_back();
                            ApplyInput::Written(Err(refusal))
                        }
                        Ok(_) => {
                            self.record(records)?;
                            command = self.commit_and_step(db, merged_stamp, builds_on, physical)?;
                            continue;
                        }
                    }
                }
                ApplyCommand::Commit {
                    merged_stamp,
                    builds_on,
                } => {
                    command = self.commit_and_step(db, merged_stamp, builds_on, physical)?;
                    continue;
                }
                ApplyCommand::Done { summary, .. } if self.machine.segment().is_some_and(|s| !s.last) => {
                    self.earlier_summary.add(&summary);
                    return Ok(Stop::SegmentDone);
                }
                ApplyCommand::Done { applied, mut summary } => {
                    summary.add(&std::mem::take(&mut self.earlier_summary));
                    let mut changes = std::mem::take(&mut self.earlier);
                    changes.extend(self.machine.changes().iter().map(|c| (c.origin, c.seq)));
                    let tx = std::mem::take(&mut self.tx);
                    return Ok(Stop::Done(Box::new(Committed {
                        applied,
                        summary,
                        changes,
                        merged: tx.merged,
                        conflicts: tx.conflicts.len(),
                        review: tx.review,
                        parked: tx.parked,
                        undo: std::mem::take(&mut self.undo),
                    })));
                }
            };
            if round_trip > 0 {
                // The answer arrives after a round trip; the locks taken stay held meanwhile.
                self.ready = Some(input);
                self.waiting = Waiting::RoundTrip { at: now + round_trip };
                return Ok(Stop::Waiting);
            }
            command = self.step(input)?;
        }
    }

    /// Rolls the transaction back (`Restart`, `StartOver`), then waits for the capture to read
    /// past a probe, or until `until`.
    fn roll_back_and_wait(
        &mut self,
        db: &mut Db,
        capture_read: u64,
        probe: bool,
        until: u64,
    ) -> Result<(), DriverError> {
        self.roll_back();
        self.waiting = if probe {
            self.probing(db, capture_read)?;
            db.flush();
            Waiting::Capture {
                lsn: db.wal_insert_lsn(),
                then: Resume::Restarted,
            }
        } else {
            Waiting::Until { at: until }
        };
        Ok(())
    }

    fn step(&mut self, input: ApplyInput) -> Result<ApplyCommand, DriverError> {
        self.machine.step(input).map_err(|e| DriverError(format!("apply: {e}")))
    }

    /// Takes the locks of a load, in its order: each existing row's (`FOR UPDATE` waits for a row
    /// another transaction locked or wrote), then each existing metadata row's. Returns the
    /// applier it must wait for, keeping the row locks taken so far. A guard load does not wait
    /// for a metadata lock holding others (the service's `NOWAIT`): it rolls back to its
    /// savepoint, letting go of the metadata locks it took, and tries again once the holder is
    /// done. Holding them, it closed a cycle with the capture: the capture waited for a row's
    /// metadata this load had locked (a local write of the row it had not read yet, which the
    /// guard would have probed for), while the holder this load waited for, a later segment of a
    /// spooled transaction, waited for the capture (`--review-inserts` seed 165).
    fn lock_for_load(
        &mut self,
        db: &Db,
        others: &[&Applying],
        slots: &[usize],
        guard: bool,
    ) -> Result<Option<usize>, DriverError> {
        let keys = slots.iter().map(|&s| self.key(s)).collect::<Result<Vec<_>, _>>()?;
        // The statement's snapshot is taken when it begins: rows committed later are not
        // among those it returns, even after a wait.
        let seen = self
            .load_seen
            .get_or_insert_with(|| keys.iter().copied().filter(|k| db.rows.contains_key(k)).collect())
            .clone();
        for &key in &keys {
            if self.tx.rows.contains_key(&key) || !seen.contains(&key) || !db.rows.contains_key(&key) {
                continue;
            }
            if let Some(other) = others.iter().find(|o| o.holds_row(key)) {
                return Ok(Some(other.peer));
            }
            self.row_locks.insert(key);
        }
        for &key in &keys {
            if self.tx.metas.contains_key(&key) || !db.meta.contains_key(&key) {
                continue;
            }
            if let Some(other) = others.iter().find(|o| o.holds_meta(key)) {
                if guard {
                    self.meta_locks.clear();
                }
                return Ok(Some(other.peer));
            }
            self.meta_locks.insert(key);
        }
        Ok(None)
    }

    /// Reads the rows of `slots` again after their keys were locked (the service's second
    /// statement): a row that appeared since the load's first statement began is locked and
    /// seen. `Some(holder)`: another applier holds it, and the load waits.
    fn read_again(&mut self, db: &Db, others: &[&Applying], slots: &[usize]) -> Result<Option<usize>, DriverError> {
        let keys = slots.iter().map(|&s| self.key(s)).collect::<Result<Vec<_>, _>>()?;
        for key in keys {
            let seen = self.load_seen.get_or_insert_with(BTreeSet::new);
            if seen.contains(&key) || self.tx.rows.contains_key(&key) || !db.rows.contains_key(&key) {
                continue;
            }
            if let Some(other) = others.iter().find(|o| o.holds_row(key)) {
                return Ok(Some(other.peer));
            }
            self.row_locks.insert(key);
            seen.insert(key);
        }
        Ok(None)
    }

    /// Tries the locks of the keys of `slots` (the service's one statement of
    /// `pg_try_advisory_lock`s): `false`, holding none of them, when another applier holds one.
    /// Local writers hold none while this runs: their transactions are atomic here.
    fn lock_keys(&mut self, others: &[&Applying], slots: &[usize]) -> Result<bool, DriverError> {
        let keys = slots.iter().map(|&s| self.key(s)).collect::<Result<Vec<_>, _>>()?;
        if keys.iter().any(|k| others.iter().any(|o| o.key_locks.contains(k))) {
            return Ok(false);
        }
        for key in keys {
            if self.key_locks.insert(key) {
                self.locks_taken += 1;
            }
        }
        Ok(true)
    }

    /// An insert waits for another transaction's uncommitted write of the same key (the unique
    /// index's check), then is refused if that one committed it.
    fn insert_blocked(&self, others: &[&Applying], planned: &[PlannedWrite]) -> Result<Option<usize>, DriverError> {
        for write in planned {
            if let RowWrite::Insert(_) = write.write {
                let key = self.key(write.slot)?;
                if let Some(other) = others.iter().find(|o| o.tx.rows.contains_key(&key)) {
                    return Ok(Some(other.peer));
                }
            }
        }
        Ok(None)
    }

    /// A probe is only worth waiting for when something changed since the last one: a commit
    /// the capture has not read, a key locked since (a probe must follow the lock), or a row
    /// the machine was given differently (a row a load's snapshot missed may have been inserted
    /// before the probe, and its version must be settled by a probe written after it was
    /// seen). Otherwise the machine waits for nothing, and would forever. `capture_read`: the
    /// capture has dealt with everything up to this WAL position. A key lock that a start over
    /// released and the machine took again counts as a lock taken since, as the rule says: the
    /// check compared the sets of locks held and called the probe after such a start over
    /// needless (`--join` seeds 499 and 2348 at 800 operations: `KeysBusy`, start over, the same
    /// WAL position and rows).
    fn probing(&mut self, db: &Db, capture_read: u64) -> Result<(), DriverError> {
        let lsn = db.wal_insert_lsn();
        let probe = (
            lsn,
            self.locks_taken,
            self.key_locks.clone(),
            self.loaded_picture.clone(),
        );
        if self.last_probe.as_ref() == Some(&probe) && capture_read >= lsn {
            return Err(DriverError(format!(
                "apply: probes again although the capture read everything up to WAL position {lsn}, no key was \
                 locked since and no row changed; rows (xmin, (causal length, known xmin)): {:?}",
                probe.3
            )));
        }
        self.last_probe = Some(probe);
        Ok(())
    }

    fn key(&self, slot: usize) -> Result<i64, DriverError> {
        self.machine
            .slot(slot)
            .and_then(|(_, key)| key_of(key))
            .ok_or_else(|| DriverError(format!("apply: slot {slot} has no key of this table")))
    }

    fn row<'a>(&'a self, db: &'a Db, key: i64) -> Option<&'a UserRow> {
        match self.tx.rows.get(&key) {
            Some(row) => row.as_ref(),
            None => db.rows.get(&key),
        }
    }

    /// The rows of `slots` as a load returns them: its own writes, else the latest version of
    /// each row its statement saw (`seen`; `None`: every committed row).
    fn load(&self, db: &Db, slots: &[usize], seen: Option<&BTreeSet<i64>>) -> Result<Vec<LoadedRow>, DriverError> {
        let mut loaded = Vec::with_capacity(slots.len());
        for &slot in slots {
            let key = self.key(slot)?;
            let row = match self.tx.rows.get(&key) {
                Some(row) => row.as_ref(),
                None => db.rows.get(&key).filter(|_| seen.is_none_or(|s| s.contains(&key))),
            }
            // The columns this applier's statements name (it may have read the table before a
            // migration).
            .map(|r| {
                (
                    r.xmin,
                    r.values.iter().take(self.table.columns.len()).cloned().collect(),
                )
            });
            let meta = self.tx.metas.get(&key).or_else(|| db.meta.get(&key));
            let undeferred = |origin: NodeId, seq: u64| self.tx.undefer.contains(&(key, origin, seq));
            let deferred = db
                .deferred
                .range((key, NodeId(0), 0)..=(key, NodeId(u32::MAX), u64::MAX))
                .map(|(_, c)| c)
                .filter(|c| !undeferred(c.origin, c.seq))
                .chain(self.tx.defer.iter().filter(|c| key_of(&c.key) == Some(key)))
                .cloned()
                .collect();
            loaded.push(LoadedRow {
                row,
                meta: meta.map(|m| (m.as_shape(&self.table), m.known_xmin)),
                deferred,
            });
        }
        Ok(loaded)
    }

    /// The part's writes, all or none (a savepoint): an insert of a key that is there, or an
    /// update or delete of a row that is not, is refused as PostgreSQL would refuse or miss it.
    fn write(
        &mut self,
        db: &mut Db,
        planned: Vec<PlannedWrite>,
        images: bool,
    ) -> Result<Vec<Option<u64>>, WriteRefusal> {
        let xid = *self.tx.xid.get_or_insert_with(|| db.new_xid());
        let mut rows = Vec::with_capacity(planned.len());
        let mut xmins = Vec::with_capacity(planned.len());
        let mut wal = Vec::with_capacity(planned.len());
        for PlannedWrite { slot, write } in planned {
            let key = self.key(slot).map_err(|e| WriteRefusal::other(e.0))?;
            let old = self.row(db, key).cloned();
            let row_key = crate::table::row_key(key);
            let (new, kind) = match (write, old.as_ref()) {
                (RowWrite::Insert(values), None) => (Some(with_defaults(db, values)?), ChangeKind::Insert),
                (RowWrite::Replace(values), Some(old)) => {
                    // The delete, then the insert below: decoding sees both, as PostgreSQL's.
                    wal.push(CapturedChange {
                        kind: ChangeKind::Delete,
                        key: row_key.clone(),
                        old: Some(old.values.clone()).filter(|_| images),
                        new: None,
                    });
                    (Some(with_defaults(db, values)?), ChangeKind::Insert)
                }
                (RowWrite::Insert(_), Some(_)) => {
                    return Err(WriteRefusal {
                        key_exists: true,
                        no_place: false,
                        message: format!("duplicate key value violates unique constraint (key {key})"),
                    })
                }
                (RowWrite::Update(columns), Some(old)) => {
                    let mut values: Vec<accord_engine::Value> =
                        old.values.iter().filter_map(|c| c.value().cloned()).collect();
                    for (column, value) in columns {
                        match values.get_mut(column) {
                            Some(v) => *v = value,
                            None => return Err(WriteRefusal::other(format!("column {column} is not in the table"))),
                        }
                    }
                    (Some(values), ChangeKind::Update)
                }
                (RowWrite::Delete, Some(_)) => (None, ChangeKind::Delete),
                (_, None) => return Err(WriteRefusal::other(format!("row {key} to update or delete is missing"))),
            };
            xmins.push(new.as_ref().map(|_| xid));
            wal.push(CapturedChange {
                kind,
                key: row_key,
                // A replaced row's insert has no old image: its delete carried it.
                old: old.filter(|_| images && kind != ChangeKind::Insert).map(|o| o.values),
                new: new
                    .as_ref()
                    .filter(|_| images)
                    .map(|v| v.iter().cloned().map(accord_engine::Cell::Value).collect()),
            });
            rows.push((
                key,
                new.map(|values| UserRow {
                    values: values.into_iter().map(accord_engine::Cell::Value).collect(),
                    xmin: xid,
                    tx: xid,
                }),
            ));
        }
        self.tx.rows.extend(rows);
        self.tx.wal_rows.extend(wal);
        Ok(xmins)
    }

    fn record(&mut self, records: Records) -> Result<(), DriverError> {
        for (slot, meta, known) in records.metas {
            let key = self.key(slot)?;
            self.tx.metas.insert(
                key,
                MetaRow {
                    meta,
                    known_xmin: known,
                    shape: self.table.shape_id(),
                },
            );
        }
        for (slot, conflict) in records.conflicts {
            let key = self.key(slot)?;
            self.tx.conflicts.push((key, conflict));
        }
        self.tx.review.extend(records.review);
        self.tx.parked.extend(records.parked);
        self.tx.defer.extend(records.defer);
        for (_, key, origin, seq) in records.undefer {
            let key = key_of(&key).ok_or_else(|| DriverError("apply: a kept change of another table".into()))?;
            // A change kept by this very transaction is simply not kept.
            let before = self.tx.defer.len();
            self.tx
                .defer
                .retain(|c| !(key_of(&c.key) == Some(key) && c.origin == origin && c.seq == seq));
            if self.tx.defer.len() == before {
                self.tx.undefer.push((key, origin, seq));
            }
        }
        self.tx.merged.extend(records.merged);
        Ok(())
    }

    /// Moves the transaction into the database in one step, with its WAL record and the origin
    /// position; returns what puts the database back if the commit is lost.
    fn commit(
        &mut self,
        db: &mut Db,
        merged_stamp: Option<accord_engine::Hlc>,
        builds_on: Vec<(NodeId, u64)>,
        physical: u64,
    ) -> Undo {
        let tx = &mut self.tx;
        let mut undo = Undo {
            conflicts: db.conflicts.len(),
            ..Undo::default()
        };
        for (key, row) in std::mem::take(&mut tx.rows) {
            let before = match row {
                Some(row) => db.rows.insert(key, row),
                None => db.rows.remove(&key),
            };
            undo.rows.push((key, before));
        }
        for (key, meta) in std::mem::take(&mut tx.metas) {
            undo.meta.push((key, db.meta.insert(key, meta)));
        }
        db.conflicts.extend(tx.conflicts.iter().cloned());
        for key in std::mem::take(&mut tx.undefer) {
            undo.deferred.push((key, db.deferred.remove(&key)));
        }
        for change in std::mem::take(&mut tx.defer) {
            if let Some(key) = key_of(&change.key) {
                let key = (key, change.origin, change.seq);
                undo.deferred.push((key, db.deferred.insert(key, change)));
            }
        }
        let peer = self.machine.peer();
        if let Some(progress) = db.progress.get_mut(&peer) {
            undo.progress = Some((peer, *progress));
            progress.applied = progress.applied.max(self.machine.last());
        }
        if let Some(stamp) = merged_stamp {
            // As the service records it in `accord.applied`, in the same transaction.
            undo.merged = Some(db.record_merged(peer, stamp));
        }
        let xid = tx.xid.unwrap_or_else(|| db.new_xid());
        db.append_wal(
            xid,
            physical,
            crate::db::WalBody::Merge {
                origin: peer,
                applied: self.machine.last(),
                // As the service writes it: in the `accord.hlc` message, with the stamp.
                builds_on: if merged_stamp.is_some() { builds_on } else { Vec::new() },
                stamp: merged_stamp,
                rows: std::mem::take(&mut tx.wal_rows),
            },
        );
        undo
    }
}

/// The values of an inserted row. An applier that read the table before a migration names fewer
/// columns: the database fills the others with their defaults.
fn with_defaults(db: &Db, mut values: Vec<accord_engine::Value>) -> Result<Vec<accord_engine::Value>, WriteRefusal> {
    let table = db.table();
    for column in &table.columns[values.len().min(table.columns.len())..] {
        match column.name.as_str() {
            "sold" => values.push(crate::table::sold_default()),
            other => return Err(WriteRefusal::other(format!("column {other} has no default"))),
        }
    }
    Ok(values)
}
