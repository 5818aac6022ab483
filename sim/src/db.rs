//! The simulated PostgreSQL database of one node. Every change to it is one atomic step, which is
//! what a committed transaction is. Commits are durable once the WAL is flushed past them: local
//! transactions and the capture's commit synchronously (flushing everything before them), apply
//! transactions asynchronously (`synchronous_commit = off`), so a crash of the machine loses the
//! apply transactions committed since the last flush, origin positions and all.
//!
//! It holds what the real service keeps in PostgreSQL: the user's table (with a per-row write
//! counter standing in for `xmin`), accord's per-row metadata with `known_xmin`, the WAL that the
//! capture decodes, the capture's checkpoint and outbound log, the per-peer replication progress,
//! the review queue, the conflict log, and changes deferred for a later merge.

use std::collections::{BTreeMap, VecDeque};

use accord_engine::{
    CaptureCheckpoint, CapturedChange, Cell, ClosureKind, CollectionState, Conflict, Hlc, NodeId, PeerProgress,
    ReviewAction, ReviewItem, ReviewItemId, RowChange, RowMeta, RowState, ShapeId, TableDef,
};

/// A row of the user's table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserRow {
    /// Always `Cell::Value`: the database holds every value (TOAST only shows in decoding).
    pub values: Vec<Cell>,
    /// The transaction that wrote this row version (PostgreSQL's `xmin`): a subtransaction's own
    /// id when the row was written inside one.
    pub xmin: u64,
    /// The top-level transaction `xmin` belongs to (what decoding reports).
    pub tx: u64,
}

/// accord's metadata for one row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetaRow {
    pub meta: RowMeta,
    /// The transaction of the last row version accord accounted for (HARD-PARTS §2); none for
    /// a deleted row.
    pub known_xmin: Option<u64>,
    /// The shape of the table its writer had (`accord.row_meta.shape`): read through
    /// [`MetaRow::as_shape`].
    pub shape: ShapeId,
}

impl MetaRow {
    /// The metadata as a reader whose table is `table` reads it (`ShapeBook::stored_meta`, as
    /// the service loads `accord.row_meta`).
    pub fn as_shape(&self, table: &TableDef) -> RowMeta {
        crate::table::shapes()
            .stored_meta(self.meta.clone(), Some(self.shape), table)
            .expect("the simulator's book holds both shapes of its table")
    }
}

/// Which workload write a WAL row is, for the oracle.
pub type WriteId = usize;

#[derive(Debug, Clone)]
pub struct WalRow {
    pub change: CapturedChange,
    /// `None` for an update that changed nothing (not a write the oracle tracks).
    pub write: Option<WriteId>,
}

#[derive(Debug, Clone)]
pub enum WalBody {
    /// A transaction of the application.
    Local {
        rows: Vec<WalRow>,
        /// Review items the transaction resolves (a reviewer's choice).
        resolving: Vec<ReviewItemId>,
        /// A TRUNCATE (`rows` is then empty): decoding says only that, but the simulator keeps
        /// the rows it emptied, each the workload's delete, to check what the capture makes of it.
        truncated: Option<Vec<(i64, WriteId)>>,
    },
    /// A merge transaction: it carries a replication origin, and the `accord.hlc` message with
    /// the greatest stamp it merged.
    Merge {
        origin: NodeId,
        /// The last of the origin's changes it applied (its replication-origin position).
        applied: u64,
        /// What the changes it merged build on (`ApplyCommand::Commit`).
        builds_on: Vec<(NodeId, u64)>,
        stamp: Option<Hlc>,
        rows: Vec<CapturedChange>,
    },
    /// A migration (`ALTER TABLE ... ADD COLUMN`): decoding sends the table's new Relation
    /// with the next change to it; the capture takes the new shape from here on.
    Alter,
    /// A transaction that carries only an `accord.mark` message: the capture writes its
    /// checkpoint when it reaches it (a join waits for that).
    Mark,
    /// A chunk of a join's copy on the new node: its origin is no peer's, and its `accord.hlc`
    /// message carries the greatest stamp copied and what the copy may hold.
    Copy {
        builds_on: Vec<(NodeId, u64)>,
        stamp: Option<Hlc>,
    },
}

/// One committed transaction as logical decoding delivers it.
#[derive(Debug, Clone)]
pub struct WalTx {
    /// The end LSN of its commit; consecutive integers here.
    pub lsn: u64,
    pub xid: u64,
    /// The node's wall clock when it committed, in µs.
    pub commit_time: u64,
    pub body: WalBody,
}

/// A review-queue entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum QueueEntry {
    Open(ReviewItem),
    Closed(ReviewItem, ClosureKind),
    /// A change that could not be applied, with its error.
    Parked(ReviewItem),
}

#[derive(Debug, Clone, Default)]
pub struct Db {
    pub rows: BTreeMap<i64, UserRow>,
    pub meta: BTreeMap<i64, MetaRow>,
    /// What two inserts of one key mean in the run's table (`--review-inserts`).
    pub inserts: accord_engine::InsertPolicy,
    /// The WAL position of the migration (`--migrate`) once this database ran it.
    pub migrated_at: Option<u64>,
    next_xid: u64,
    wal: VecDeque<WalTx>,
    /// The LSN the next transaction gets.
    next_lsn: u64,
    /// The replication slot's confirmed position: decoding restarts after it.
    pub slot_confirmed: u64,
    pub checkpoint: Option<CaptureCheckpoint>,
    /// The outbound log: this node's captured changes, from `outbound_pruned + 1` on.
    pub outbound: VecDeque<RowChange>,
    pub outbound_pruned: u64,
    pub progress: BTreeMap<NodeId, PeerProgress>,
    /// Per peer, the greatest stamp its merges recorded with their commits (a join's copy under
    /// its donor): `accord.applied`'s merged stamp, which a restarted capture's clock passes.
    pub merged: BTreeMap<NodeId, Hlc>,
    pub queue: BTreeMap<ReviewItemId, QueueEntry>,
    pub conflicts: Vec<(i64, Conflict)>,
    /// Changes kept for a later merge (unchanged TOAST values not here yet), by (key, origin,
    /// sequence number).
    pub deferred: BTreeMap<(i64, NodeId, u64), RowChange>,
    /// What the node knows of the tombstone-collection rounds (`accord.collection`).
    pub collection: CollectionState,
    /// A join copied this database's rows: it replays changes older than the closures it copied,
    /// which may derive a closed item again; the item stays closed, as the service's review
    /// table keeps it (`ON CONFLICT DO NOTHING`).
    pub replays_closed: bool,
    /// What a join's copied rows may hold (`accord.join_state.claims`): the capture takes it as
    /// applied at every start.
    pub join_claims: Vec<(NodeId, u64)>,
    /// The WAL is on disk up to here; decoding reads no further (the walsender sends only
    /// flushed WAL).
    pub flushed_lsn: u64,
    /// The local transactions that removed a row and counted themselves (the service's triggers
    /// bump a sequence once per such transaction, after taking the removal lock):
    /// `engine::RemovalCount::issued`. A sequence is not transactional, and survives crashes.
    pub removal_count: u64,
    /// Asynchronous commits after `flushed_lsn`, oldest first, with what undoes each.
    unflushed: Vec<AsyncCommit>,
    /// Apply transactions that became durable and that the oracle has not heard of yet.
    durable: Vec<AppliedNote>,
}

/// What an apply transaction applied and merged: the oracle hears of it once it is durable.
#[derive(Debug, Clone, Default)]
pub struct AppliedNote {
    pub changes: Vec<(NodeId, u64)>,
    pub merged: Vec<(NodeId, u64)>,
}

/// The state an asynchronous commit replaced, to put back when a crash loses it.
#[derive(Debug, Clone, Default)]
pub struct Undo {
    pub rows: Vec<(i64, Option<UserRow>)>,
    pub meta: Vec<(i64, Option<MetaRow>)>,
    pub deferred: Vec<((i64, NodeId, u64), Option<RowChange>)>,
    pub queue: Vec<(ReviewItemId, Option<QueueEntry>)>,
    pub conflicts: usize,
    pub progress: Option<(NodeId, PeerProgress)>,
    pub merged: Option<(NodeId, Option<Hlc>)>,
}

#[derive(Debug, Clone)]
struct AsyncCommit {
    undo: Undo,
    note: AppliedNote,
}

impl Db {
    pub fn new(peers: impl IntoIterator<Item = NodeId>, inserts: accord_engine::InsertPolicy) -> Self {
        Db {
            inserts,
            next_xid: 1,
            next_lsn: 1,
            progress: peers.into_iter().map(|p| (p, PeerProgress::default())).collect(),
            ..Db::default()
        }
    }

    pub fn new_xid(&mut self) -> u64 {
        let xid = self.next_xid;
        self.next_xid += 1;
        xid
    }

    /// The WAL insert position: the end LSN of the last committed transaction.
    pub fn wal_insert_lsn(&self) -> u64 {
        self.next_lsn - 1
    }

    pub fn append_wal(&mut self, xid: u64, commit_time: u64, body: WalBody) -> u64 {
        let lsn = self.next_lsn;
        self.next_lsn += 1;
        self.wal.push_back(WalTx {
            lsn,
            xid,
            commit_time,
            body,
        });
        lsn
    }

    pub fn wal_tx(&self, lsn: u64) -> Option<&WalTx> {
        let first = self.wal.front()?.lsn;
        self.wal.get(lsn.checked_sub(first)? as usize)
    }

    /// An asynchronous commit (an apply transaction) happened: `undo` puts back what it changed.
    pub fn committed_async(&mut self, undo: Undo, note: AppliedNote) {
        self.unflushed.push(AsyncCommit { undo, note });
    }

    /// The WAL is flushed to its end (a synchronous commit, an explicit flush): every commit so
    /// far is durable.
    pub fn flush(&mut self) {
        self.flushed_lsn = self.wal_insert_lsn();
        self.durable.extend(self.unflushed.drain(..).map(|c| c.note));
    }

    /// Apply transactions that became durable since the last call, in commit order.
    pub fn take_durable(&mut self) -> Vec<AppliedNote> {
        std::mem::take(&mut self.durable)
    }

    /// The machine crashed: what was not flushed is gone.
    pub fn lose_unflushed(&mut self) {
        while let Some(AsyncCommit { undo, .. }) = self.unflushed.pop() {
            restore(&mut self.rows, undo.rows);
            restore(&mut self.meta, undo.meta);
            restore(&mut self.deferred, undo.deferred);
            restore(&mut self.queue, undo.queue);
            self.conflicts.truncate(undo.conflicts);
            if let Some((peer, progress)) = undo.progress {
                self.progress.insert(peer, progress);
            }
            match undo.merged {
                Some((peer, Some(stamp))) => {
                    self.merged.insert(peer, stamp);
                }
                Some((peer, None)) => {
                    self.merged.remove(&peer);
                }
                None => {}
            }
        }
        while self.wal.back().is_some_and(|tx| tx.lsn > self.flushed_lsn) {
            self.wal.pop_back();
        }
        self.next_lsn = self.flushed_lsn + 1;
    }

    /// Records with a commit that `peer`'s merges (or a join's copy from it) merged up to
    /// `stamp`; returns what it replaced, for the commit's undo.
    pub fn record_merged(&mut self, peer: NodeId, stamp: Hlc) -> (NodeId, Option<Hlc>) {
        let before = self.merged.get(&peer).copied();
        if before.is_none_or(|b| b < stamp) {
            self.merged.insert(peer, stamp);
        }
        (peer, before)
    }

    /// WAL up to the slot's confirmed position is no longer needed.
    pub fn truncate_wal(&mut self) {
        while self.wal.front().is_some_and(|tx| tx.lsn <= self.slot_confirmed) {
            self.wal.pop_front();
        }
    }

    /// What the capture has durably covered.
    pub fn covered_lsn(&self) -> u64 {
        self.checkpoint.map_or(0, |c| c.covered_lsn)
    }

    pub fn outbound_head(&self) -> u64 {
        self.outbound_pruned + self.outbound.len() as u64
    }

    pub fn outbound_change(&self, seq: u64) -> Option<&RowChange> {
        self.outbound.get(seq.checked_sub(self.outbound_pruned + 1)? as usize)
    }

    pub fn prune_outbound(&mut self, upto: u64) {
        while self.outbound_pruned < upto && !self.outbound.is_empty() {
            self.outbound.pop_front();
            self.outbound_pruned += 1;
        }
    }

    /// The table as this database has it now.
    pub fn table(&self) -> TableDef {
        if self.migrated_at.is_some() {
            crate::table::migrated(self.inserts)
        } else {
            crate::table::table(self.inserts)
        }
    }

    /// The table as the WAL's transaction at `lsn` wrote it.
    pub fn table_at(&self, lsn: u64) -> TableDef {
        match self.migrated_at {
            Some(at) if lsn > at => crate::table::migrated(self.inserts),
            _ => crate::table::table(self.inserts),
        }
    }

    /// The row as the merge sees it: metadata plus the user's values; `None` without metadata.
    pub fn row_state(&self, key: i64) -> Option<RowState> {
        let meta = self.meta.get(&key)?;
        let values = match self.rows.get(&key) {
            Some(row) if meta.meta.is_alive() => row.values.clone(),
            _ => Vec::new(),
        };
        Some(RowState {
            meta: meta.as_shape(&self.table()),
            values,
        })
    }
}

/// Puts back the entries an undone commit replaced (`None`: the key was absent), last first.
fn restore<K: Ord, V>(map: &mut BTreeMap<K, V>, before: Vec<(K, Option<V>)>) {
    for (key, value) in before.into_iter().rev() {
        match value {
            Some(value) => map.insert(key, value),
            None => map.remove(&key),
        };
    }
}

/// Why a review-queue update is impossible: the engine asked for something inconsistent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueError(pub String);

/// Carries out review actions on a queue, as the service does in its review tables.
pub fn apply_review(
    queue: &mut BTreeMap<ReviewItemId, QueueEntry>,
    actions: Vec<ReviewAction>,
    replaying: bool,
) -> Result<(), QueueError> {
    for action in actions {
        match action {
            ReviewAction::Open(item) => {
                if matches!(queue.get(&item.id), Some(QueueEntry::Closed(..))) {
                    if replaying {
                        continue;
                    }
                    return Err(QueueError(format!("item {} reopened after it was closed", item.id)));
                }
                queue.insert(item.id, QueueEntry::Open(item));
            }
            ReviewAction::Withdraw(id) => match queue.get(&id) {
                Some(QueueEntry::Open(_)) => {
                    queue.remove(&id);
                }
                Some(QueueEntry::Closed(..)) if replaying => {}
                _ => return Err(QueueError(format!("withdrew item {id}, which was not open"))),
            },
            ReviewAction::Close(closure) => {
                if let Some(QueueEntry::Closed(_, recorded)) = queue.get(&closure.item.id) {
                    if !closure.replaces(recorded) {
                        continue;
                    }
                }
                queue.insert(closure.item.id, QueueEntry::Closed(closure.item, closure.kind));
            }
        }
    }
    Ok(())
}
