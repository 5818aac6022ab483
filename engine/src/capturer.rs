//! The capture's state machine: which decoded transactions to capture, their stamps, their
//! sequence numbers, and the checkpoint that makes a restart resume exactly where it stopped.
//!
//! The driver feeds it the decoded stream in commit order. It persists each transaction's captured
//! changes together with the checkpoint returned by [`Capturer::commit`] in one database
//! transaction, and only then lets the slot advance. After a crash, [`Capturer::restore`] from the
//! last checkpoint skips the transactions it already covered, so nothing is stamped twice.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::capture::{capture_shaped, CaptureError, Captured};
use crate::change::CapturedChange;
use crate::hlc::{Hlc, HlcClock, NodeId};
use crate::review::ReviewItemId;
use crate::schema::TableDef;
use crate::shape::ShapeId;
use crate::state::RowMeta;

/// What must be persisted with a transaction's captured changes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct CaptureCheckpoint {
    /// The clock's high-water mark.
    pub high_water: Hlc,
    /// The sequence number of the last change written to the outbound log.
    pub last_seq: u64,
    /// The end LSN of the last transaction dealt with (captured or skipped).
    pub covered_lsn: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Transaction {
    None,
    /// A local transaction being captured.
    Local {
        end_lsn: u64,
        commit_time: u64,
    },
    /// A transaction to skip: applied from a peer, or covered before a restart.
    Skipped {
        end_lsn: u64,
    },
}

#[derive(Debug, Clone)]
pub struct Capturer {
    clock: HlcClock,
    last_seq: u64,
    covered_lsn: u64,
    tx: Transaction,
    /// Per peer, the last of its changes applied before the point the stream has reached: what
    /// a local transaction committed here could have seen (`RowChange::builds_on`).
    applied: BTreeMap<NodeId, u64>,
    /// The shape id of the table the last row was captured from, with that table: rows come in
    /// runs of one table, and hashing its shape for every row was a measurable part of the
    /// capture. Compared whole, so a table whose shape changed is hashed again.
    last_shape: Option<(TableDef, ShapeId)>,
}

impl Capturer {
    pub fn new(node: NodeId, max_offset_micros: u64) -> Self {
        Capturer {
            clock: HlcClock::new(node, max_offset_micros),
            last_seq: 0,
            covered_lsn: 0,
            tx: Transaction::None,
            applied: BTreeMap::new(),
            last_shape: None,
        }
    }

    pub fn restore(checkpoint: CaptureCheckpoint, max_offset_micros: u64) -> Self {
        Capturer {
            clock: HlcClock::restore(checkpoint.high_water, max_offset_micros),
            last_seq: checkpoint.last_seq,
            covered_lsn: checkpoint.covered_lsn,
            tx: Transaction::None,
            applied: BTreeMap::new(),
            last_shape: None,
        }
    }

    pub fn node(&self) -> NodeId {
        self.clock.node()
    }

    pub fn checkpoint(&self) -> CaptureCheckpoint {
        CaptureCheckpoint {
            high_water: self.clock.high_water(),
            last_seq: self.last_seq,
            covered_lsn: self.covered_lsn,
        }
    }

    /// A transaction begins. `end_lsn` is its commit's end position (pgoutput's Begin carries the
    /// final LSN), `commit_time` its commit time in µs since the epoch.
    pub fn begin(&mut self, end_lsn: u64, commit_time: u64) {
        self.tx = if end_lsn <= self.covered_lsn {
            Transaction::Skipped { end_lsn }
        } else {
            Transaction::Local { end_lsn, commit_time }
        };
    }

    /// Where the stream starts, what this node had applied from each peer: its replication
    /// origins' positions now. They may be ahead of the stream's start (merges the stream will
    /// read again); local transactions read before those then claim to build on more than they
    /// saw, which only makes a receiver wait longer, never show less.
    pub fn applied_before(&mut self, positions: impl IntoIterator<Item = (NodeId, u64)>) {
        for (peer, applied) in positions {
            self.peer_applied(peer, applied);
        }
    }

    /// The transaction was applied from a peer (it carries a replication origin): its row
    /// changes are not this node's own and are not captured again. `applied`: per peer, the
    /// last of its changes whose effects the transaction's rows may carry
    /// (`DecodedTransaction::peer_applied`).
    pub fn from_peer(&mut self, applied: &[(NodeId, u64)]) {
        if let Transaction::Local { end_lsn, .. } = self.tx {
            self.tx = Transaction::Skipped { end_lsn };
        }
        for &(peer, seq) in applied {
            self.peer_applied(peer, seq);
        }
    }

    fn peer_applied(&mut self, peer: NodeId, seq: u64) {
        if peer != self.node() {
            let entry = self.applied.entry(peer).or_insert(0);
            *entry = (*entry).max(seq);
        }
    }

    /// What a local transaction committed at the stream's current point builds on.
    pub fn builds_on(&self) -> Vec<(NodeId, u64)> {
        self.applied
            .iter()
            .filter(|&(_, &seq)| seq > 0)
            .map(|(&peer, &seq)| (peer, seq))
            .collect()
    }

    /// The current transaction is a local one, not covered before: its rows are captured.
    pub fn is_capturing(&self) -> bool {
        matches!(self.tx, Transaction::Local { .. })
    }

    /// Where the stream starts, the greatest stamps this node's merges (and a join's copy)
    /// recorded with their commits (`accord.applied`): the clock passes them. The checkpoint's
    /// high-water mark is not written for a group that only merged (`GroupWrite::needs_write`),
    /// and the slot moves past such a group, so after a restart these records are what keeps
    /// the clock above every stamp merged here.
    pub fn merged_before(&mut self, stamps: impl IntoIterator<Item = Hlc>) {
        for stamp in stamps {
            self.merged(stamp);
        }
    }

    /// A merge committed changes stamped up to `stamp` (the `accord.hlc` message a merge writes
    /// into the WAL). Local writes committed after it are stamped above it.
    pub fn merged(&mut self, stamp: Hlc) {
        // The offset was checked when the change was received; the clock only moves forward.
        let _ = self.clock.update(stamp, u64::MAX);
    }

    /// Captures one row change of the current transaction. `None` when the transaction is skipped
    /// or the change changes nothing accord tracks.
    pub fn row(
        &mut self,
        table: &TableDef,
        prior: Option<&RowMeta>,
        change: &CapturedChange,
        resolving: &[ReviewItemId],
    ) -> Result<Option<Captured>, CaptureError> {
        let Transaction::Local { commit_time, .. } = self.tx else {
            return Ok(None);
        };
        // Each row gets its own tick, so every write in the cluster has a distinct stamp.
        let stamp = self.clock.now(commit_time);
        let shape = match &self.last_shape {
            Some((last, id)) if last == table => *id,
            _ => {
                let id = table.shape_id();
                self.last_shape = Some((table.clone(), id));
                id
            }
        };
        let captured = capture_shaped(table, shape, prior, change, stamp, self.last_seq + 1, resolving)?;
        if captured.is_some() {
            self.last_seq += 1;
        }
        Ok(captured)
    }

    /// The transaction committed: the checkpoint to persist with its changes.
    pub fn commit(&mut self) -> CaptureCheckpoint {
        if let Transaction::Local { end_lsn, .. } | Transaction::Skipped { end_lsn } = self.tx {
            self.covered_lsn = self.covered_lsn.max(end_lsn);
        }
        self.tx = Transaction::None;
        self.checkpoint()
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::change::{ChangeKind, RowKey};
    use crate::schema::{ColumnDef, ColumnPolicy, ColumnType, KeyColumn};
    use crate::state::Cell;
    use crate::value::Value;

    fn table() -> TableDef {
        table_with(ColumnPolicy::Delta)
    }

    /// `s.t`: an integer key `id` and one integer column `n` with `policy`.
    pub(crate) fn table_with(policy: ColumnPolicy) -> TableDef {
        TableDef::new(
            "s.t",
            vec![KeyColumn {
                name: "id".into(),
                ty: ColumnType::Integer,
            }],
            vec![ColumnDef {
                name: "n".into(),
                ty: ColumnType::Integer,
                policy,
            }],
        )
        .expect("a valid one-column table")
    }

    fn insert(k: i64) -> CapturedChange {
        CapturedChange {
            kind: ChangeKind::Insert,
            key: RowKey(vec![Value::Int(k)]),
            old: None,
            new: Some(vec![Cell::Value(Value::Int(1))]),
        }
    }

    #[test]
    fn peers_transactions_are_skipped_but_advance_the_clock() {
        let t = table();
        let mut c = Capturer::new(NodeId(1), 500);
        c.begin(100, 1_000);
        c.from_peer(&[]);
        assert!(c.row(&t, None, &insert(1), &[]).unwrap().is_none());
        c.merged(Hlc::new(5_000, 3, NodeId(2)));
        c.commit();
        c.begin(200, 1_000);
        let captured = c.row(&t, None, &insert(2), &[]).unwrap().unwrap();
        assert!(captured.change.stamp > Hlc::new(5_000, 3, NodeId(2)));
        assert_eq!(captured.change.seq, 1);
        assert_eq!(c.commit().covered_lsn, 200);
    }

    #[test]
    fn a_restart_passes_the_stamps_merges_recorded_since_the_checkpoint() {
        let t = table();
        let mut c = Capturer::new(NodeId(1), 500);
        let checkpoint = c.commit();
        let merged = Hlc::new(9_000, 2, NodeId(3));
        let mut again = Capturer::restore(checkpoint, 500);
        again.merged_before([Hlc::new(8_000, 0, NodeId(2)), merged]);
        again.begin(100, 1_000);
        let stamp = again.row(&t, None, &insert(1), &[]).unwrap().unwrap().change.stamp;
        assert!(stamp > merged, "{stamp} must pass {merged}");
        // Without the records the clock starts from the checkpoint alone.
        let mut forgetful = Capturer::restore(checkpoint, 500);
        forgetful.begin(100, 1_000);
        let stamp = forgetful.row(&t, None, &insert(1), &[]).unwrap().unwrap().change.stamp;
        assert!(stamp < merged);
    }

    #[test]
    fn a_restart_skips_what_was_covered_and_continues_the_sequence() {
        let t = table();
        let mut c = Capturer::new(NodeId(1), 500);
        c.begin(100, 1_000);
        let first = c.row(&t, None, &insert(1), &[]).unwrap().unwrap().change;
        let checkpoint = c.commit();

        let mut again = Capturer::restore(checkpoint, 500);
        again.begin(100, 1_000);
        assert!(
            again.row(&t, None, &insert(1), &[]).unwrap().is_none(),
            "replayed transaction"
        );
        again.commit();
        again.begin(150, 900);
        let next = again.row(&t, None, &insert(2), &[]).unwrap().unwrap().change;
        assert_eq!(next.seq, 2);
        assert!(
            next.stamp > first.stamp,
            "the clock resumed above its mark despite an earlier commit time"
        );
    }
}
