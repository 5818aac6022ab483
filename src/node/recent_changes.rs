//! The changes the capture committed last, kept in memory for the sender. A batch for a peer is
//! usually what the capture has just written: reading it back from the outbound log cost a
//! round trip and a decode per peer (issue 20). The outbound log stays the record; a range not
//! held here in full is read from it.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use accord_engine::RowChange;

/// How many changes are kept: a few seconds of a busy node's changes, a few megabytes.
pub const RECENT_CHANGES: usize = 20_000;

/// The last changes committed to the outbound log, consecutive in sequence.
#[derive(Debug)]
pub struct RecentChanges {
    changes: VecDeque<RowChange>,
    capacity: usize,
}

/// Shared by the capture, which adds what it committed, and the sender, which reads it.
pub type SharedRecentChanges = Arc<Mutex<RecentChanges>>;

impl RecentChanges {
    pub fn new(capacity: usize) -> Self {
        RecentChanges {
            changes: VecDeque::new(),
            capacity,
        }
    }

    pub fn shared(capacity: usize) -> SharedRecentChanges {
        Arc::new(Mutex::new(RecentChanges::new(capacity)))
    }

    /// Changes the outbound log holds now (committed), in sequence order. A change that does not
    /// follow the last one held starts the record over: only consecutive changes are served.
    pub fn committed<'c>(&mut self, changes: impl IntoIterator<Item = &'c RowChange>) {
        for change in changes {
            if self.changes.back().is_some_and(|last| last.seq + 1 != change.seq) {
                self.changes.clear();
            }
            self.changes.push_back(change.clone());
            if self.changes.len() > self.capacity {
                self.changes.pop_front();
            }
        }
    }

    /// Changes `first..=last`, if every one of them is held.
    pub fn range(&self, first: u64, last: u64) -> Option<Vec<RowChange>> {
        let front = self.changes.front()?.seq;
        if first < front || last < first {
            return None;
        }
        let start = usize::try_from(first - front).ok()?;
        let end = usize::try_from(last - front).ok()?;
        if end >= self.changes.len() {
            return None;
        }
        Some(self.changes.range(start..=end).cloned().collect())
    }

    /// The outbound log let go of changes up to `seq`: they are not served either.
    pub fn forget_through(&mut self, seq: u64) {
        while self.changes.front().is_some_and(|c| c.seq <= seq) {
            self.changes.pop_front();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use accord_engine::{ChangeKind, Hlc, NodeId, RowKey, RowState, Value};

    fn change(seq: u64) -> RowChange {
        RowChange {
            table: "public.t".into(),
            key: RowKey(vec![Value::Int(seq as i64)]),
            kind: ChangeKind::Insert,
            origin: NodeId(1),
            stamp: Hlc::new(seq, 0, NodeId(1)),
            seq,
            tx_last: seq,
            builds_on: Vec::new(),
            row: RowState::absent(),
            shape: None,
            closures: Vec::new(),
        }
    }

    fn seqs(changes: Option<Vec<RowChange>>) -> Option<Vec<u64>> {
        changes.map(|c| c.iter().map(|c| c.seq).collect())
    }

    #[test]
    fn serves_only_ranges_it_holds_whole() {
        let mut recent = RecentChanges::new(4);
        recent.committed(&[change(5), change(6), change(7)]);
        assert_eq!(seqs(recent.range(5, 7)), Some(vec![5, 6, 7]));
        assert_eq!(seqs(recent.range(6, 6)), Some(vec![6]));
        assert_eq!(recent.range(4, 6), None, "4 was never committed here");
        assert_eq!(recent.range(6, 8), None, "8 is not committed yet");
        assert_eq!(recent.range(7, 6), None);
        // Beyond its capacity it lets go of the oldest.
        recent.committed(&[change(8), change(9)]);
        assert_eq!(recent.range(5, 9), None);
        assert_eq!(seqs(recent.range(6, 9)), Some(vec![6, 7, 8, 9]));
        // Pruned from the outbound log: not served either.
        recent.forget_through(7);
        assert_eq!(recent.range(7, 8), None);
        assert_eq!(seqs(recent.range(8, 9)), Some(vec![8, 9]));
    }

    #[test]
    fn a_change_that_does_not_follow_starts_over() {
        // Written by the capture's parts of a large transaction, which it does not keep.
        let mut recent = RecentChanges::new(10);
        recent.committed(&[change(1), change(2)]);
        recent.committed(&[change(40), change(41)]);
        assert_eq!(recent.range(1, 2), None);
        assert_eq!(recent.range(2, 40), None);
        assert_eq!(seqs(recent.range(40, 41)), Some(vec![40, 41]));
    }
}
