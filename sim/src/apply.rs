//! The apply driver: carries out the commands of the engine's `BatchApply` against the simulated
//! database, as `src/node/apply.rs` carries them out in PostgreSQL. Every decision (the xmin
//! guard, its rounds, restarts, splitting, parking, deferral, what is skipped) is the engine's;
//! this module only reads and writes rows.
//!
//! A transaction's writes go to an overlay that reads see first and that the commit moves into
//! the database in one step; a rollback or a crash drops it. Between the guard's probe and the
//! next load the node waits for its capture (other events run meanwhile); from the last load to
//! the commit nothing else runs, so the rows a transaction reads stay as they were, as the row
//! locks keep them in PostgreSQL.

use std::collections::BTreeMap;

use accord_engine::{
    ApplyCommand, ApplyInput, BatchApply, CapturedChange, ChangeKind, Conflict, LoadedRow, NodeId, PlannedWrite,
    Records, ReviewAction, ReviewItem, RowChange, RowWrite,
};

use crate::db::{Db, MetaRow, Undo, UserRow};
use crate::table::key_of;

/// A batch being applied, and its open transaction.
#[derive(Debug)]
pub struct Applying {
    /// The peer's index.
    pub peer: usize,
    pub machine: BatchApply,
    tx: Overlay,
    /// What the machine waits for.
    pub waiting: Waiting,
    /// The WAL position of the last probe.
    last_probe: Option<u64>,
    /// The slots of the last load.
    loaded: Vec<usize>,
    /// What the last commit replaced.
    undo: Undo,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Waiting {
    /// The capture must have covered this WAL position; then the input is fed.
    Capture { lsn: u64, then: Resume },
    /// A pause until this time.
    Until { at: u64 },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resume {
    CaptureReached,
    Restarted,
}

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
    /// The batch committed: what it merged, and the machine's last word.
    Done(Box<Committed>),
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

impl Applying {
    pub fn new(peer: usize, machine: BatchApply) -> Self {
        Applying {
            peer,
            machine,
            tx: Overlay::default(),
            waiting: Waiting::Until { at: 0 },
            last_probe: None,
            loaded: Vec::new(),
            undo: Undo::default(),
        }
    }

    /// Feeds `input` and carries out commands until the machine waits or the batch is done.
    /// `images`: merge transactions carry row images in the WAL (only a capture that fails to
    /// skip peers' transactions reads them).
    pub fn run(
        &mut self,
        db: &mut Db,
        mut input: ApplyInput,
        now: u64,
        physical: u64,
        images: bool,
        capture_read: u64,
    ) -> Result<Stop, DriverError> {
        loop {
            let command = self
                .machine
                .step(input)
                .map_err(|e| DriverError(format!("apply: {e}")))?;
            input = match command {
                ApplyCommand::Load { begin, slots, .. } => {
                    if begin.is_some() {
                        self.tx = Overlay::default();
                    }
                    let rows = self.load(db, &slots)?;
                    self.loaded = slots;
                    ApplyInput::Loaded(rows)
                }
                ApplyCommand::ProbeAndWait => {
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
                    self.tx = Overlay::default();
                    if probe {
                        self.probing(db, capture_read)?;
                        db.flush();
                        self.waiting = Waiting::Capture {
                            lsn: db.wal_insert_lsn(),
                            then: Resume::Restarted,
                        };
                    } else {
                        self.waiting = Waiting::Until { at: now + pause_micros };
                    }
                    return Ok(Stop::Waiting);
                }
                ApplyCommand::Write(planned) => ApplyInput::Written(self.write(db, planned, images)),
                ApplyCommand::Record(records) => {
                    self.record(records)?;
                    ApplyInput::Recorded
                }
                ApplyCommand::Commit { merged_stamp } => {
                    self.undo = self.commit(db, merged_stamp, physical);
                    ApplyInput::Committed
                }
                ApplyCommand::Done { applied, summary } => {
                    let tx = std::mem::take(&mut self.tx);
                    return Ok(Stop::Done(Box::new(Committed {
                        applied,
                        summary,
                        changes: self.machine.changes().iter().map(|c| (c.origin, c.seq)).collect(),
                        merged: tx.merged,
                        conflicts: tx.conflicts.len(),
                        review: tx.review,
                        parked: tx.parked,
                        undo: std::mem::take(&mut self.undo),
                    })));
                }
            };
        }
    }

    /// A probe is only worth waiting for when something committed since the last one that the
    /// capture has not read: otherwise the machine waits for nothing, and would forever.
    /// `capture_read`: the capture has dealt with everything up to this WAL position.
    fn probing(&mut self, db: &Db, capture_read: u64) -> Result<(), DriverError> {
        let lsn = db.wal_insert_lsn();
        if self.last_probe == Some(lsn) && capture_read >= lsn {
            let rows: Vec<_> = self
                .load(db, &self.loaded)?
                .into_iter()
                .map(|r| {
                    (
                        r.row.map(|(xmin, _)| xmin),
                        r.meta.map(|(m, known)| (m.causal_length, known)),
                    )
                })
                .collect();
            return Err(DriverError(format!(
                "apply: probes again although the capture read everything up to WAL position {lsn}; rows \
                 (xmin, (causal length, known xmin)): {rows:?}"
            )));
        }
        self.last_probe = Some(lsn);
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

    fn load(&self, db: &Db, slots: &[usize]) -> Result<Vec<LoadedRow>, DriverError> {
        let mut loaded = Vec::with_capacity(slots.len());
        for &slot in slots {
            let key = self.key(slot)?;
            let row = self.row(db, key).map(|r| (r.xmin, r.values.clone()));
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
                meta: meta.map(|m| (m.meta.clone(), m.known_xmin)),
                deferred,
            });
        }
        Ok(loaded)
    }

    /// The part's writes, all or none (a savepoint): an insert of a key that is there, or an
    /// update or delete of a row that is not, is refused as PostgreSQL would refuse or miss it.
    fn write(&mut self, db: &mut Db, planned: Vec<PlannedWrite>, images: bool) -> Result<Vec<Option<u64>>, String> {
        let xid = *self.tx.xid.get_or_insert_with(|| db.new_xid());
        let mut rows = Vec::with_capacity(planned.len());
        let mut xmins = Vec::with_capacity(planned.len());
        let mut wal = Vec::with_capacity(planned.len());
        for PlannedWrite { slot, write } in planned {
            let key = self.key(slot).map_err(|e| e.0)?;
            let old = self.row(db, key).cloned();
            let row_key = crate::table::row_key(key);
            let (new, kind) = match (write, old.as_ref()) {
                (RowWrite::Insert(values), None) => (Some(values), ChangeKind::Insert),
                (RowWrite::Insert(_), Some(_)) => {
                    return Err(format!("duplicate key value violates unique constraint (key {key})"))
                }
                (RowWrite::Update(columns), Some(old)) => {
                    let mut values: Vec<accord_engine::Value> =
                        old.values.iter().filter_map(|c| c.value().cloned()).collect();
                    for (column, value) in columns {
                        match values.get_mut(column) {
                            Some(v) => *v = value,
                            None => return Err(format!("column {column} is not in the table")),
                        }
                    }
                    (Some(values), ChangeKind::Update)
                }
                (RowWrite::Delete, Some(_)) => (None, ChangeKind::Delete),
                (_, None) => return Err(format!("row {key} to update or delete is missing")),
            };
            xmins.push(new.as_ref().map(|_| xid));
            wal.push(CapturedChange {
                kind,
                key: row_key,
                old: old.filter(|_| images).map(|o| o.values),
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
    fn commit(&mut self, db: &mut Db, merged_stamp: Option<accord_engine::Hlc>, physical: u64) -> Undo {
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
        let xid = tx.xid.unwrap_or_else(|| db.new_xid());
        db.append_wal(
            xid,
            physical,
            crate::db::WalBody::Merge {
                origin: peer,
                stamp: merged_stamp,
                rows: std::mem::take(&mut tx.wal_rows),
            },
        );
        undo
    }
}
