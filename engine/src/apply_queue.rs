//! The changes received from one peer that wait for its applier, handed out as batches of whole
//! transactions: a receiver never applies part of a source transaction, so no reader there sees
//! half of a transfer or an order without its lines.
//!
//! A change names the last change of its transaction (`RowChange::tx_last`). A batch ends only
//! after such a last change; a transaction still arriving waits here whole, and one larger than
//! the batch size is handed out alone.
//!
//! A transaction also waits until this node has applied what it builds on
//! (`RowChange::builds_on`): its origin merged other nodes' transactions before it, and its row
//! states carry their effects. Applied first, it would show a reader here part of such a
//! transaction (one row of a transfer, through the relayed state) before the transaction itself
//! arrives. While the node it waits for is not connected, it waits at most
//! `ReplicationConfig::causal_wait_micros`, so that the nodes that are up keep replicating.
//!
//! Memory stays bounded for a transaction of any size: once what is queued of the first
//! transaction exceeds the spool bound, whether it is still arriving or complete, its changes
//! are handed out as [`Handout::Spool`] to be kept on disk, and its end (at least its last
//! change) as [`Handout::SpooledEnd`]; the applier then applies the spooled part and the end in
//! one local transaction. A transaction handed out whole is within the bound or within
//! [`MAX_APPLY_BATCH`] changes.

use std::collections::{BTreeMap, VecDeque};

use crate::apply::PlantedBug;
use crate::change::RowChange;
use crate::hlc::NodeId;
use crate::replication::{Dependency, Replication};

/// Most changes a batch takes when it joins several transactions.
pub const MAX_APPLY_BATCH: usize = 2_000;

/// What the queue hands the applier, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Handout {
    /// Whole transactions, to apply now.
    Batch(Vec<RowChange>),
    /// A part of a transaction larger than the spool bound: keep it until its end comes as
    /// `SpooledEnd`.
    Spool(Vec<RowChange>),
    /// The end of the transaction whose beginning came as `Spool`: apply them together.
    SpooledEnd(Vec<RowChange>),
}

/// The transaction being spooled.
#[derive(Debug, Clone)]
struct Spooling {
    /// Its first change: what it builds on decides when it may be applied.
    first: RowChange,
    changes: u64,
    bytes: u64,
}

/// The size of the transaction still arriving at the front of the queue.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct InFlight {
    pub changes: u64,
    /// Estimated ([`RowChange::approx_bytes`]).
    pub bytes: u64,
    /// Of which handed out to be spooled.
    pub spooled_bytes: u64,
}

#[derive(Debug, Default, Clone)]
pub struct ApplyQueue {
    changes: VecDeque<RowChange>,
    /// Estimated memory of `changes`.
    bytes: usize,
    /// The changes after the last complete transaction, and their estimated memory.
    tail: (usize, usize),
    /// Spool the first transaction while it arrives once more than this is queued of it.
    spool_bound: Option<usize>,
    spooling: Option<Spooling>,
    /// The greatest sequence number queued so far: a change at or below it arrived again (a
    /// resend after a reconnect) and is dropped, or it would be applied twice in one batch.
    last: u64,
    /// What the first transaction waited for when a batch was last asked for.
    held: Option<Dependency>,
    /// Per node that is not connected: since when a transaction here has waited for it.
    waiting_since: BTreeMap<NodeId, u64>,
    /// Dependencies given up on (their node stayed away), not yet taken by `take_waived`.
    waived: Vec<Dependency>,
    planted: Option<PlantedBug>,
}

/// Whether the queue's first transaction may be handed out now.
enum Gate {
    Pass,
    /// Only past what these nodes, away too long, have not sent yet.
    Waive(Vec<Dependency>),
    Hold(Dependency),
}

impl ApplyQueue {
    pub fn new() -> Self {
        ApplyQueue::default()
    }

    /// Plants a bug (the simulator proves its checks catch it).
    pub fn plant(&mut self, bug: Option<PlantedBug>) {
        self.planted = bug;
    }

    /// Spools a transaction still arriving once more than `bytes` of it is queued (estimated by
    /// [`RowChange::approx_bytes`]); `None`: never (then use `next_batch`).
    pub fn set_spool_bound(&mut self, bytes: Option<usize>) {
        self.spool_bound = bytes;
    }

    /// Queues received changes, in sequence order.
    pub fn push(&mut self, changes: impl IntoIterator<Item = RowChange>) {
        for change in changes {
            if change.seq > self.last {
                self.last = change.seq;
                let bytes = change.approx_bytes();
                self.bytes += bytes;
                self.tail = match change.ends_transaction() {
                    true => (0, 0),
                    false => (self.tail.0 + 1, self.tail.1 + bytes),
                };
                self.changes.push_back(change);
            }
        }
    }

    /// Puts a batch handed out back at the front, to be handed out again (its apply will start
    /// over). Not for the end of a spooled transaction: reserve room for a handout before taking
    /// it instead.
    pub fn push_front(&mut self, batch: Vec<RowChange>) {
        for change in batch.into_iter().rev() {
            self.last = self.last.max(change.seq);
            self.bytes += change.approx_bytes();
            self.changes.push_front(change);
        }
    }

    fn drain_front(&mut self, end: usize) -> Vec<RowChange> {
        let batch: Vec<RowChange> = self.changes.drain(..end).collect();
        let bytes: usize = batch.iter().map(RowChange::approx_bytes).sum();
        self.bytes = self.bytes.saturating_sub(bytes);
        if self.tail.0 > self.changes.len() {
            // The drain reached into the incomplete transaction (a spool takes all of it).
            let tail = self.changes.iter();
            self.tail = (tail.len(), tail.map(RowChange::approx_bytes).sum());
        }
        batch
    }

    /// How many changes from the front to spool now: all that is queued of the first
    /// transaction while it is still arriving, all but its last change once it is complete, when
    /// that is more than the bound.
    fn spool_len(&self) -> Option<usize> {
        let bound = self.spool_bound?;
        if self.bytes <= bound || self.planted == Some(PlantedBug::SplitTransactions) {
            return None;
        }
        if self.tail.0 == self.changes.len() {
            return Some(self.changes.len());
        }
        let end = self.changes.iter().position(RowChange::ends_transaction)?;
        let head: usize = self.changes.range(..=end).map(RowChange::approx_bytes).sum();
        (head > bound && end > 0).then_some(end)
    }

    /// Whether the next handout is a part to spool (which goes somewhere else than a batch).
    pub fn next_is_spool(&self) -> bool {
        self.spool_len().is_some()
    }

    /// The next handout: a part of a large transaction to spool, the end of a spooled one (once
    /// what it builds on is applied here), or whole transactions as [`ApplyQueue::next_batch`].
    pub fn next_handout(&mut self, max: usize, replication: &Replication, now: u64) -> Option<Handout> {
        if let Some(n) = self.spool_len() {
            let changes = self.drain_front(n);
            let spooling = self.spooling.get_or_insert_with(|| Spooling {
                first: changes[0].clone(),
                changes: 0,
                bytes: 0,
            });
            spooling.changes += changes.len() as u64;
            spooling.bytes += changes.iter().map(|c| c.approx_bytes() as u64).sum::<u64>();
            return Some(Handout::Spool(changes));
        }
        let Some(spooling) = &self.spooling else {
            return self.next_batch(max, replication, now).map(Handout::Batch);
        };
        self.held = None;
        let end = self.changes.iter().position(RowChange::ends_transaction)?;
        match gate(&mut self.waiting_since, self.planted, &spooling.first, replication, now) {
            Gate::Pass => {}
            Gate::Waive(dependencies) => self.waived.extend(dependencies),
            Gate::Hold(dependency) => {
                self.held = Some(dependency);
                return None;
            }
        }
        self.spooling = None;
        Some(Handout::SpooledEnd(self.drain_front(end + 1)))
    }

    /// The transaction still arriving, if any: how much of it is here or spooled.
    pub fn in_flight(&self) -> Option<InFlight> {
        let (changes, bytes) = (self.tail.0 as u64, self.tail.1 as u64);
        match &self.spooling {
            // Until its end arrives, everything queued belongs to the spooled transaction.
            Some(s) if self.tail.0 == self.changes.len() => Some(InFlight {
                changes: s.changes + changes,
                bytes: s.bytes + bytes,
                spooled_bytes: s.bytes,
            }),
            _ if changes > 0 => Some(InFlight {
                changes,
                bytes,
                spooled_bytes: 0,
            }),
            _ => None,
        }
    }

    /// The next batch: the queued transactions from the front, as many whole ones as fit in
    /// `max` changes, or the first alone if it is larger, each only once what it builds on is
    /// applied here (per `replication`; `now` in µs of any steady clock). `None` while the first
    /// transaction is not complete or waits.
    pub fn next_batch(&mut self, max: usize, replication: &Replication, now: u64) -> Option<Vec<RowChange>> {
        if self.planted == Some(PlantedBug::SplitTransactions) {
            let n = self.changes.len().min(max);
            return (n > 0).then(|| self.drain_front(n));
        }
        self.held = None;
        let mut end = 0;
        let mut waived = Vec::new();
        let mut i = 0;
        while let Some(first) = self.changes.get(i) {
            let Some(last) = self.changes.range(i..).position(RowChange::ends_transaction) else {
                break; // still arriving
            };
            if i + last >= max && end > 0 {
                break;
            }
            match gate(&mut self.waiting_since, self.planted, first, replication, now) {
                Gate::Pass => {}
                Gate::Waive(dependencies) => waived.extend(dependencies),
                Gate::Hold(dependency) => {
                    self.held = Some(dependency);
                    break;
                }
            }
            i += last + 1;
            end = i;
        }
        self.waived.extend(waived);
        (end > 0).then(|| self.drain_front(end))
    }

    /// Whether a complete transaction is queued that did not wait at the last `next_batch`, or
    /// a part of one to spool.
    pub fn has_batch(&self) -> bool {
        (self.held.is_none() && self.has_complete()) || self.spool_len().is_some()
    }

    /// Whether a complete transaction is queued (it may still wait for what it builds on).
    pub fn has_complete(&self) -> bool {
        self.changes.iter().any(RowChange::ends_transaction)
            || (self.planted == Some(PlantedBug::SplitTransactions) && !self.changes.is_empty())
    }

    /// What the first transaction waited for at the last `next_batch`.
    pub fn held(&self) -> Option<Dependency> {
        self.held
    }

    /// When the first transaction, waiting for a node that is not connected, stops waiting for
    /// it (it may wait for another then).
    pub fn waits_until(&self, replication: &Replication) -> Option<u64> {
        let held = self.held.filter(|d| !d.connected)?;
        let since = self.waiting_since.get(&held.node)?;
        Some(since.saturating_add(replication.config().causal_wait_micros))
    }

    /// The dependencies given up on in the batches handed out since the last call.
    pub fn take_waived(&mut self) -> Vec<Dependency> {
        std::mem::take(&mut self.waived)
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
        self.bytes = 0;
        self.tail = (0, 0);
        self.spooling = None;
        self.last = 0;
        self.held = None;
    }
}

/// Whether `first`, the first change of the queue's first transaction, may be handed out now.
fn gate(
    waiting_since: &mut BTreeMap<NodeId, u64>,
    planted: Option<PlantedBug>,
    first: &RowChange,
    replication: &Replication,
    now: u64,
) -> Gate {
    if planted == Some(PlantedBug::IgnoreBuildsOn) {
        return Gate::Pass;
    }
    let missing: Vec<Dependency> = replication.missing_dependencies(&first.builds_on).collect();
    if missing.is_empty() {
        return Gate::Pass;
    }
    // A node that is connected is sending what is needed: wait for it.
    if let Some(&dependency) = missing.iter().find(|d| d.connected) {
        for d in &missing {
            if d.connected {
                waiting_since.remove(&d.node);
            }
        }
        return Gate::Hold(dependency);
    }
    let wait = replication.config().causal_wait_micros;
    for &dependency in &missing {
        let since = *waiting_since.entry(dependency.node).or_insert(now);
        if now.saturating_sub(since) < wait {
            return Gate::Hold(dependency);
        }
    }
    Gate::Waive(missing)
}

/// How many of `batch`'s changes to apply next when one of its transactions must wait
/// (`ApplyError::ShapeWaits`, a row with no place here): the whole transactions before the one
/// holding `waiting`, or, when that one is the first (or which one is unknown), the first
/// transaction alone. Fewer than the batch when it holds more than one transaction, and never
/// part of one. The service and the simulator both split a batch so: applied one at a time
/// instead, the rest of a long batch took a transaction (and a capture wait) each, and a node
/// that had waited for a migration fell minutes behind its peer.
pub fn transactions_before_waiting(batch: &[RowChange], waiting: Option<u64>) -> usize {
    let first_end = batch
        .iter()
        .position(RowChange::ends_transaction)
        .map_or(batch.len(), |i| i + 1);
    let Some(at) = waiting.and_then(|seq| batch.iter().position(|c| c.seq == seq)) else {
        return first_end;
    };
    let start = batch[..at]
        .iter()
        .rposition(RowChange::ends_transaction)
        .map_or(0, |i| i + 1);
    if start == 0 {
        first_end
    } else {
        start
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::change::{ChangeKind, RowKey};
    use crate::hlc::{Hlc, NodeId};
    use crate::replication::{PeerProgress, ReplicationConfig};
    use crate::state::{RowMeta, RowState};
    use crate::value::Value;

    /// Changes `seqs` of one transaction ending at `last`.
    fn tx(seqs: std::ops::RangeInclusive<u64>) -> Vec<RowChange> {
        let last = *seqs.end();
        seqs.map(|seq| RowChange {
            shape: None,
            table: "s.t".into(),
            key: RowKey(vec![Value::Int(seq as i64)]),
            kind: ChangeKind::Insert,
            origin: NodeId(2),
            stamp: Hlc::new(1_000 + seq, 0, NodeId(2)),
            seq,
            tx_last: last,
            builds_on: Vec::new(),
            row: RowState {
                meta: RowMeta::absent(),
                values: Vec::new(),
            },
            closures: Vec::new(),
        })
        .collect()
    }

    #[test]
    fn a_batch_whose_transaction_waits_applies_those_before_it_together_first() {
        // Transactions 1-2, 3, 4-6 and 7.
        let changes = [tx(1..=2), tx(3..=3), tx(4..=6), tx(7..=7)].concat();
        assert_eq!(transactions_before_waiting(&changes, Some(5)), 3, "1-2 and 3");
        assert_eq!(transactions_before_waiting(&changes, Some(4)), 3);
        assert_eq!(transactions_before_waiting(&changes, Some(7)), 6);
        // The first transaction waits, or which one is unknown: the first alone.
        assert_eq!(transactions_before_waiting(&changes, Some(2)), 2);
        assert_eq!(transactions_before_waiting(&changes, None), 2);
        assert_eq!(transactions_before_waiting(&changes, Some(99)), 2);
        let rest = &changes[3..];
        assert_eq!(transactions_before_waiting(rest, Some(7)), 3, "4-6 before 7");
    }

    impl ApplyQueue {
        /// With nothing to wait for.
        fn next_batch_now(&mut self, max: usize) -> Option<Vec<RowChange>> {
            self.next_batch(max, &cluster(), 0)
        }
    }

    /// Node 1, with peers 2 and 3, connected to both, nothing applied.
    fn cluster() -> Replication {
        let config = ReplicationConfig {
            causal_wait_micros: 1_000,
            ..ReplicationConfig::default()
        };
        let peers = [NodeId(2), NodeId(3)].map(|p| (p, PeerProgress::default()));
        let mut r = Replication::new(NodeId(1), config, 0, 0, peers);
        r.connected(NodeId(2), 0).unwrap();
        r.connected(NodeId(3), 0).unwrap();
        r
    }

    fn seqs(batch: &[RowChange]) -> Vec<u64> {
        batch.iter().map(|c| c.seq).collect()
    }

    #[test]
    fn batches_end_only_where_transactions_end() {
        let mut q = ApplyQueue::new();
        let t = tx(1..=5);
        q.push(t[..3].to_vec());
        assert!(q.next_batch_now(2).is_none(), "the transaction is not complete");
        assert!(!q.has_batch());
        assert_eq!(q.in_flight().map(|f| f.changes), Some(3));
        q.push(t[3..].to_vec());
        q.push(tx(6..=6));
        q.push(tx(7..=8));
        assert_eq!(
            seqs(&q.next_batch_now(2).unwrap()),
            [1, 2, 3, 4, 5],
            "larger than max: alone"
        );
        assert_eq!(
            seqs(&q.next_batch_now(3).unwrap()),
            [6, 7, 8],
            "whole transactions up to max"
        );
        q.push(tx(9..=9));
        q.push(tx(10..=12));
        assert_eq!(seqs(&q.next_batch_now(3).unwrap()), [9], "the next does not fit");
        assert_eq!(seqs(&q.next_batch_now(3).unwrap()), [10, 11, 12]);
        assert!(q.is_empty());
    }

    #[test]
    fn resent_changes_are_dropped_and_a_batch_put_back_comes_out_again() {
        let mut q = ApplyQueue::new();
        q.push(tx(1..=3));
        q.push(tx(1..=3));
        let batch = q.next_batch_now(10).unwrap();
        assert_eq!(seqs(&batch), [1, 2, 3]);
        q.push(tx(1..=3));
        assert!(q.is_empty(), "what was handed out is not queued again");
        q.push(tx(4..=4));
        q.push_front(batch);
        assert_eq!(seqs(&q.next_batch_now(10).unwrap()), [1, 2, 3, 4]);
        // Changes captured before transactions were recorded are each a transaction.
        let mut old = tx(5..=6);
        for c in &mut old {
            c.tx_last = 0;
        }
        q.push(old);
        assert_eq!(seqs(&q.next_batch_now(1).unwrap()), [5]);
    }

    #[test]
    fn a_transaction_waits_for_what_it_builds_on() {
        let mut r = cluster();
        let mut q = ApplyQueue::new();
        q.push(tx(1..=2));
        let mut t = tx(3..=4);
        for c in &mut t {
            c.builds_on = vec![(NodeId(1), 9), (NodeId(3), 5)];
        }
        q.push(t);
        assert_eq!(
            seqs(&q.next_batch(10, &r, 0).unwrap()),
            [1, 2],
            "up to the one that waits"
        );
        assert!(q.next_batch(10, &r, 0).is_none());
        let waiting = Dependency {
            node: NodeId(3),
            through: 5,
            connected: true,
        };
        assert_eq!(q.held(), Some(waiting), "this node's own positions need nothing");
        assert!(!q.has_batch() && q.has_complete());
        r.applied(NodeId(3), 4).unwrap();
        assert!(q.next_batch(10, &r, 5_000).is_none(), "a connected node is waited for");
        r.applied(NodeId(3), 5).unwrap();
        assert_eq!(seqs(&q.next_batch(10, &r, 5_000).unwrap()), [3, 4]);
        assert!(q.take_waived().is_empty());
    }

    #[test]
    fn a_node_away_is_waited_for_a_while_then_given_up_on() {
        let mut r = cluster();
        r.disconnected(NodeId(3));
        let mut q = ApplyQueue::new();
        let mut t = tx(1..=4);
        for c in &mut t {
            c.builds_on = vec![(NodeId(3), 5)];
        }
        q.push(t[..2].to_vec());
        assert!(q.next_batch(10, &r, 100).is_none(), "incomplete");
        q.push(t[2..].to_vec());
        assert!(q.next_batch(10, &r, 200).is_none());
        let away = Dependency {
            node: NodeId(3),
            through: 5,
            connected: false,
        };
        assert_eq!(q.held(), Some(away));
        assert_eq!(
            q.waits_until(&r),
            Some(1_200),
            "from the first wait of a whole transaction"
        );
        assert!(q.next_batch(10, &r, 1_199).is_none());
        assert_eq!(seqs(&q.next_batch(10, &r, 1_200).unwrap()), [1, 2, 3, 4]);
        assert_eq!(q.take_waived(), [away]);
        // While the node stays away, later transactions that build on it do not wait again.
        let mut t = tx(5..=5);
        t[0].builds_on = vec![(NodeId(3), 6)];
        q.push(t);
        assert_eq!(seqs(&q.next_batch(10, &r, 1_250).unwrap()), [5]);
        assert_eq!(q.take_waived().len(), 1);
        // Once it is back, they wait for it again.
        r.connected(NodeId(3), 0).unwrap();
        let mut t = tx(6..=6);
        t[0].builds_on = vec![(NodeId(3), 7)];
        q.push(t);
        assert!(q.next_batch(10, &r, 1_300).is_none());
        r.disconnected(NodeId(3));
        assert!(q.next_batch(10, &r, 1_400).is_none(), "the wait starts over");
        assert_eq!(seqs(&q.next_batch(10, &r, 2_400).unwrap()), [6]);
    }

    #[test]
    fn a_transaction_larger_than_the_bound_is_spooled_and_its_end_comes_alone() {
        let r = cluster();
        let mut q = ApplyQueue::new();
        let one = tx(1..=1)[0].approx_bytes();
        q.set_spool_bound(Some(3 * one));
        q.push(tx(1..=1));
        let big = tx(2..=11);
        q.push(big[..3].to_vec());
        assert_eq!(q.next_handout(100, &r, 0), Some(Handout::Batch(tx(1..=1))));
        assert_eq!(q.next_handout(100, &r, 0), None, "3 changes are within the bound");
        assert_eq!(q.in_flight().map(|f| f.changes), Some(3));
        q.push(big[3..5].to_vec());
        assert!(q.has_batch(), "a part to spool is something to hand out");
        assert_eq!(q.next_handout(100, &r, 0), Some(Handout::Spool(big[..5].to_vec())));
        assert_eq!(
            q.in_flight().map(|f| (f.changes, f.spooled_bytes)),
            Some((5, 5 * one as u64))
        );
        q.push(big[5..].to_vec());
        q.push(tx(12..=12));
        // The rest is complete now, but still above the bound: spooled but for its last change.
        assert_eq!(q.next_handout(100, &r, 0), Some(Handout::Spool(big[5..9].to_vec())));
        assert_eq!(q.next_handout(100, &r, 0), Some(Handout::SpooledEnd(big[9..].to_vec())));
        assert_eq!(q.in_flight(), None);
        assert_eq!(q.next_handout(100, &r, 0), Some(Handout::Batch(tx(12..=12))));
        assert!(q.is_empty() && q.bytes == 0);
    }

    #[test]
    fn the_end_of_a_spooled_transaction_waits_for_what_it_builds_on() {
        let mut r = cluster();
        let mut q = ApplyQueue::new();
        q.set_spool_bound(Some(1));
        let mut t = tx(1..=3);
        for c in &mut t {
            c.builds_on = vec![(NodeId(3), 5)];
        }
        q.push(t[..2].to_vec());
        assert!(matches!(q.next_handout(100, &r, 0), Some(Handout::Spool(s)) if s.len() == 2));
        q.push(t[2..].to_vec());
        assert_eq!(q.next_handout(100, &r, 0), None);
        assert_eq!(q.held().map(|d| d.node), Some(NodeId(3)));
        r.applied(NodeId(3), 5).unwrap();
        assert_eq!(q.next_handout(100, &r, 0), Some(Handout::SpooledEnd(t[2..].to_vec())));
    }

    #[test]
    fn a_complete_transaction_larger_than_the_bound_is_spooled_too() {
        let r = cluster();
        let mut q = ApplyQueue::new();
        let one = tx(1..=1)[0].approx_bytes();
        q.set_spool_bound(Some(3 * one));
        // Arrived whole while the applier was busy: still not handed out in one piece.
        let big = tx(1..=6);
        q.push(big.clone());
        q.push(tx(7..=7));
        assert!(q.next_is_spool());
        assert_eq!(q.next_handout(100, &r, 0), Some(Handout::Spool(big[..5].to_vec())));
        assert!(!q.next_is_spool());
        assert_eq!(q.next_handout(100, &r, 0), Some(Handout::SpooledEnd(big[5..].to_vec())));
        assert_eq!(q.next_handout(100, &r, 0), Some(Handout::Batch(tx(7..=7))));
    }
}
