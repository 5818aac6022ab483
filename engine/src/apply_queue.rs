//! The changes received from one peer that wait for its applier, handed out as batches of whole
//! transactions: a receiver never applies part of a source transaction, so no reader there sees
//! half of a transfer or an order without its lines.
//!
//! A change names the last change of its transaction (`RowChange::tx_last`). A batch ends only
//! after such a last change; a transaction still arriving waits here whole, and one larger than
//! the batch size is handed out alone.

use std::collections::VecDeque;

use crate::apply::PlantedBug;
use crate::change::RowChange;

/// Most changes a batch takes when it joins several transactions.
pub const MAX_APPLY_BATCH: usize = 2_000;

#[derive(Debug, Default, Clone)]
pub struct ApplyQueue {
    changes: VecDeque<RowChange>,
    /// The greatest sequence number queued so far: a change at or below it arrived again (a
    /// resend after a reconnect) and is dropped, or it would be applied twice in one batch.
    last: u64,
    planted: Option<PlantedBug>,
}

impl ApplyQueue {
    pub fn new() -> Self {
        ApplyQueue::default()
    }

    /// Plants a bug (the simulator proves its checks catch it).
    pub fn plant(&mut self, bug: Option<PlantedBug>) {
        self.planted = bug;
    }

    /// Queues received changes, in sequence order.
    pub fn push(&mut self, changes: impl IntoIterator<Item = RowChange>) {
        for change in changes {
            if change.seq > self.last {
                self.last = change.seq;
                self.changes.push_back(change);
            }
        }
    }

    /// Puts a batch handed out back at the front, to be handed out again (its apply will start
    /// over).
    pub fn push_front(&mut self, batch: Vec<RowChange>) {
        for change in batch.into_iter().rev() {
            self.last = self.last.max(change.seq);
            self.changes.push_front(change);
        }
    }

    /// The next batch: the queued transactions from the front, as many whole ones as fit in
    /// `max` changes, or the first alone if it is larger. `None` while the first transaction is
    /// not complete.
    pub fn next_batch(&mut self, max: usize) -> Option<Vec<RowChange>> {
        if self.planted == Some(PlantedBug::SplitTransactions) {
            let n = self.changes.len().min(max);
            return (n > 0).then(|| self.changes.drain(..n).collect());
        }
        let mut end = 0;
        for (i, change) in self.changes.iter().enumerate() {
            if i >= max && end > 0 {
                break;
            }
            if change.ends_transaction() {
                end = i + 1;
            }
        }
        (end > 0).then(|| self.changes.drain(..end).collect())
    }

    /// Whether a batch can be handed out.
    pub fn has_batch(&self) -> bool {
        self.changes.iter().any(RowChange::ends_transaction)
            || (self.planted == Some(PlantedBug::SplitTransactions) && !self.changes.is_empty())
    }

    /// The changes after the last complete transaction: held until the rest arrives.
    pub fn incomplete(&self) -> usize {
        let complete = self
            .changes
            .iter()
            .rposition(RowChange::ends_transaction)
            .map_or(0, |i| i + 1);
        self.changes.len() - complete
    }

    pub fn len(&self) -> usize {
        self.changes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.changes.is_empty()
    }

    /// Forgets everything queued (the receiving side starts over from the applied position).
    pub fn clear(&mut self) {
        self.changes.clear();
        self.last = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::change::{ChangeKind, RowKey};
    use crate::hlc::{Hlc, NodeId};
    use crate::state::{RowMeta, RowState};
    use crate::value::Value;

    /// Changes `seqs` of one transaction ending at `last`.
    fn tx(seqs: std::ops::RangeInclusive<u64>) -> Vec<RowChange> {
        let last = *seqs.end();
        seqs.map(|seq| RowChange {
            table: "s.t".into(),
            key: RowKey(vec![Value::Int(seq as i64)]),
            kind: ChangeKind::Insert,
            origin: NodeId(2),
            stamp: Hlc::new(1_000 + seq, 0, NodeId(2)),
            seq,
            tx_last: last,
            row: RowState {
                meta: RowMeta::absent(),
                values: Vec::new(),
            },
            closures: Vec::new(),
        })
        .collect()
    }

    fn seqs(batch: &[RowChange]) -> Vec<u64> {
        batch.iter().map(|c| c.seq).collect()
    }

    #[test]
    fn batches_end_only_where_transactions_end() {
        let mut q = ApplyQueue::new();
        let t = tx(1..=5);
        q.push(t[..3].to_vec());
        assert!(q.next_batch(2).is_none(), "the transaction is not complete");
        assert!(!q.has_batch());
        assert_eq!(q.incomplete(), 3);
        q.push(t[3..].to_vec());
        q.push(tx(6..=6));
        q.push(tx(7..=8));
        assert_eq!(
            seqs(&q.next_batch(2).unwrap()),
            [1, 2, 3, 4, 5],
            "larger than max: alone"
        );
        assert_eq!(
            seqs(&q.next_batch(3).unwrap()),
            [6, 7, 8],
            "whole transactions up to max"
        );
        q.push(tx(9..=9));
        q.push(tx(10..=12));
        assert_eq!(seqs(&q.next_batch(3).unwrap()), [9], "the next does not fit");
        assert_eq!(seqs(&q.next_batch(3).unwrap()), [10, 11, 12]);
        assert!(q.is_empty());
    }

    #[test]
    fn resent_changes_are_dropped_and_a_batch_put_back_comes_out_again() {
        let mut q = ApplyQueue::new();
        q.push(tx(1..=3));
        q.push(tx(1..=3));
        let batch = q.next_batch(10).unwrap();
        assert_eq!(seqs(&batch), [1, 2, 3]);
        q.push(tx(1..=3));
        assert!(q.is_empty(), "what was handed out is not queued again");
        q.push(tx(4..=4));
        q.push_front(batch);
        assert_eq!(seqs(&q.next_batch(10).unwrap()), [1, 2, 3, 4]);
        // Changes captured before transactions were recorded are each a transaction.
        let mut old = tx(5..=6);
        for c in &mut old {
            c.tx_last = 0;
        }
        q.push(old);
        assert_eq!(seqs(&q.next_batch(1).unwrap()), [5]);
    }
}
