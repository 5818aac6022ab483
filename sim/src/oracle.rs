//! The independent reference: a history of every write the workload made, with what its writer
//! had seen, kept by watching events (commits, merges) and never by reading the engine's clocks,
//! registers or ledgers. `expect` derives the final state from it; the checks here run during the
//! run (clocks, exactly once, no loops, offsets).
//!
//! "Seen" is kept per node and row as a vector of counts per origin: a node that absorbed the
//! i-th write of origin o to a row has absorbed o's earlier writes to it too (o saw its own), so a
//! count per origin is the whole set, and the history stays linear in size.

use std::collections::BTreeMap;

use accord_engine::{ChangeKind, Hlc, NodeId, ReviewItemId, RowChange, Value};

use crate::db::WriteId;
use crate::outcome::{Failure, Invariant};

/// One write to one row, as the workload made it.
#[derive(Debug, Clone)]
pub struct WriteRec {
    pub node: usize,
    pub key: i64,
    pub kind: ChangeKind,
    /// 1-based: this is the writer's `idx`-th write to the row.
    pub idx: u32,
    /// Per origin, how many of its writes to the row the writer had absorbed before this one.
    pub seen: Box<[u32]>,
    /// The new name, when the write set it.
    pub name: Option<Value>,
    /// What the write added to `stock` (an insert adds its value).
    pub stock: i64,
    /// What it added to `sold`, the column the migration adds (`--migrate`).
    pub sold: i64,
    /// The new price, when the write set it (every insert does).
    pub price: Option<Value>,
    pub resolving: Option<ReviewItemId>,
    /// The greatest stamp the node had merged when the write committed.
    pub merged_before: Option<Hlc>,
    pub commit_time: u64,
    /// From the capture: the stamp, causal length and sequence number it gave the write.
    pub stamp: Option<Hlc>,
    pub causal_length: u64,
    pub seq: u64,
    /// The capture numbered this insert as a new key's: the node held no metadata for the row
    /// (never known, or its tombstone collected).
    pub fresh: bool,
}

impl WriteRec {
    /// Whether this write had absorbed `other` when it was made.
    pub fn saw(&self, other: &WriteRec) -> bool {
        self.seen[other.node] >= other.idx
    }
}

/// Stamps compared field by field, spelled out instead of using `Hlc`'s derived order, so that
/// the oracle does not share the engine's definition of "greater": (physical, logical, node).
pub fn stamp_key(h: Hlc) -> (u64, u32, u32) {
    (h.physical, h.logical, h.node.0)
}

/// The writes the workload made to one row, what a local write needs to know about the node, and
/// the run-time checks.
#[derive(Debug, Clone)]
pub struct Oracle {
    nodes: usize,
    pub writes: Vec<WriteRec>,
    /// [node][key] → per origin count of absorbed writes.
    seen: Vec<Vec<Vec<u32>>>,
    /// [origin][seq - 1] → the write.
    by_seq: Vec<Vec<WriteId>>,
    /// [origin][seq - 1] → the last sequence number of the local transaction that made it, as
    /// the simulator saw it committed (not the change's own `tx_last`).
    transaction_end: Vec<Vec<u64>>,
    last_issued: Vec<Option<Hlc>>,
    max_merged: Vec<Option<Hlc>>,
    /// [node][origin] → the last of origin's sequence numbers the node applied.
    applied: Vec<Vec<u64>>,
    /// (origin, key, idx) → the write.
    by_row: BTreeMap<(usize, i64, u32), WriteId>,
    /// [node][origin] → origin's changes the node may show before applying them: a transaction
    /// it applied built on them while their node stayed away (`ApplyQueue`'s bounded wait).
    waived: Vec<Vec<u64>>,
    /// Writes the node absorbed since the last `check_whole`: (node, write).
    absorbed: Vec<(usize, WriteId)>,
}

fn fail(invariant: Invariant, message: String) -> Result<(), Failure> {
    Err(Failure::new(invariant, message))
}

impl Oracle {
    pub fn new(nodes: usize, keys: usize) -> Self {
        Oracle {
            nodes,
            writes: Vec::new(),
            seen: vec![vec![vec![0; nodes]; keys]; nodes],
            by_seq: vec![Vec::new(); nodes],
            transaction_end: vec![Vec::new(); nodes],
            last_issued: vec![None; nodes],
            max_merged: vec![None; nodes],
            applied: vec![vec![0; nodes]; nodes],
            by_row: BTreeMap::new(),
            waived: vec![vec![0; nodes]; nodes],
            absorbed: Vec::new(),
        }
    }

    pub fn nodes(&self) -> usize {
        self.nodes
    }

    /// A local transaction committed a write to `key` on `node`.
    #[allow(clippy::too_many_arguments)]
    pub fn local_write(
        &mut self,
        node: usize,
        key: i64,
        kind: ChangeKind,
        name: Option<Value>,
        (stock, sold): (i64, i64),
        price: Option<Value>,
        resolving: Option<ReviewItemId>,
        commit_time: u64,
    ) -> WriteId {
        let vector = &mut self.seen[node][key as usize];
        let seen: Box<[u32]> = vector.clone().into_boxed_slice();
        vector[node] += 1;
        let idx = vector[node];
        self.by_row.insert((node, key, idx), self.writes.len());
        self.writes.push(WriteRec {
            node,
            key,
            kind,
            idx,
            seen,
            name,
            stock,
            sold,
            price,
            resolving,
            merged_before: self.max_merged[node],
            commit_time,
            stamp: None,
            causal_length: 0,
            seq: 0,
            fresh: false,
        });
        self.writes.len() - 1
    }

    /// The capture stamped `write` as `change`: invariant 7's checks on the stamp.
    pub fn captured(&mut self, node: usize, write: WriteId, change: &RowChange, fresh: bool) -> Result<(), Failure> {
        let stamp = change.stamp;
        let rec = &self.writes[write];
        if rec.node != node || change.origin.0 as usize != node + 1 || stamp.node.0 as usize != node + 1 {
            return fail(
                Invariant::NoLoops,
                format!(
                    "node {} captured write {write} of node {} as {stamp}",
                    node + 1,
                    rec.node + 1
                ),
            );
        }
        if let Some(last) = self.last_issued[node] {
            if stamp_key(stamp) <= stamp_key(last) {
                return fail(
                    Invariant::Clocks,
                    format!(
                        "node {}: stamp {stamp} is not above its previous stamp {last}",
                        node + 1
                    ),
                );
            }
        }
        if let Some(merged) = rec.merged_before {
            if stamp_key(stamp) <= stamp_key(merged) {
                return fail(
                    Invariant::Clocks,
                    format!(
                        "node {}: local write stamped {stamp}, not above {merged}, which the node merged before the write committed",
                        node + 1
                    ),
                );
            }
        }
        if stamp.physical < rec.commit_time {
            return fail(
                Invariant::Clocks,
                format!(
                    "node {}: stamp {stamp} is below the commit time {}",
                    node + 1,
                    rec.commit_time
                ),
            );
        }
        if change.seq != self.by_seq[node].len() as u64 + 1 {
            return fail(
                Invariant::ExactlyOnce,
                format!(
                    "node {}: outbound sequence {} follows {}",
                    node + 1,
                    change.seq,
                    self.by_seq[node].len()
                ),
            );
        }
        self.last_issued[node] = Some(stamp);
        self.by_seq[node].push(write);
        let rec = &mut self.writes[write];
        rec.stamp = Some(stamp);
        rec.causal_length = change.row.meta.causal_length;
        rec.seq = change.seq;
        rec.fresh = fresh;
        Ok(())
    }

    /// The capture produced a change that no local write explains.
    pub fn loop_detected(&self, node: usize, change: &RowChange) -> Result<(), Failure> {
        fail(
            Invariant::NoLoops,
            format!(
                "node {} captured a row written by a merge as its own change {} (key {}, stamp {})",
                node + 1,
                change.seq,
                change.key,
                change.stamp
            ),
        )
    }

    /// A batch passed `Replication::received` at `physical` on `node`: nothing beyond the
    /// maximum offset may get through.
    pub fn accepted(&self, node: usize, changes: &[RowChange], physical: u64, max_offset: u64) -> Result<(), Failure> {
        for c in changes {
            if c.stamp.physical > physical.saturating_add(max_offset) {
                return fail(
                    Invariant::Clocks,
                    format!(
                        "node {} accepted change {} of node {} stamped {}, {} µs ahead of its clock (max offset {max_offset} µs)",
                        node + 1,
                        c.seq,
                        c.origin,
                        c.stamp,
                        c.stamp.physical - physical
                    ),
                );
            }
        }
        Ok(())
    }

    /// `node` applied `origin`'s change `seq` and recorded it durably: once, and in order.
    pub fn applied(&mut self, node: usize, origin: NodeId, seq: u64) -> Result<(), Failure> {
        let o = origin.0 as usize - 1;
        let last = &mut self.applied[node][o];
        if seq <= *last {
            return fail(
                Invariant::ExactlyOnce,
                format!(
                    "node {} applied change {seq} of node {origin} again (applied up to {last})",
                    node + 1
                ),
            );
        }
        if seq != *last + 1 {
            return fail(
                Invariant::ExactlyOnce,
                format!(
                    "node {} applied change {seq} of node {origin} after {last}: changes in between were lost",
                    node + 1
                ),
            );
        }
        *last = seq;
        Ok(())
    }

    /// `origin`'s local transaction was captured as its changes `seqs`.
    pub fn transaction_captured(&mut self, origin: usize, seqs: std::ops::RangeInclusive<u64>) {
        let ends = &mut self.transaction_end[origin];
        ends.resize(ends.len().max(*seqs.end() as usize), 0);
        for seq in seqs.clone() {
            ends[seq as usize - 1] = *seqs.end();
        }
    }

    /// `node` committed an apply transaction whose last change of `origin` is `seq`: it must
    /// end the origin's transaction, or a reader on `node` sees part of it.
    pub fn committed_through(&self, node: usize, origin: NodeId, seq: u64) -> Result<(), Failure> {
        let o = origin.0 as usize - 1;
        let end = self.transaction_end[o].get(seq as usize - 1).copied().unwrap_or(0);
        if end != seq {
            return fail(
                Invariant::Atomicity,
                format!(
                    "node {} committed node {origin}'s changes through {seq}, inside a transaction that ends at {end}",
                    node + 1
                ),
            );
        }
        Ok(())
    }

    /// `node` merged `origin`'s change `seq` into its row (its state absorbed the write).
    pub fn merged(&mut self, node: usize, origin: NodeId, seq: u64) {
        let o = origin.0 as usize - 1;
        let Some(&write) = self.by_seq[o].get(seq as usize - 1) else {
            return;
        };
        let rec = &self.writes[write];
        let vector = &mut self.seen[node][rec.key as usize];
        for (origin, (mine, theirs)) in vector.iter_mut().zip(rec.seen.iter()).enumerate() {
            for idx in *mine + 1..=*theirs {
                self.absorbed
                    .extend(self.by_row.get(&(origin, rec.key, idx)).map(|&w| (node, w)));
            }
            *mine = (*mine).max(*theirs);
        }
        for idx in vector[o] + 1..=rec.idx {
            self.absorbed
                .extend(self.by_row.get(&(o, rec.key, idx)).map(|&w| (node, w)));
        }
        vector[o] = vector[o].max(rec.idx);
        if let Some(stamp) = rec.stamp {
            if self.max_merged[node].is_none_or(|m| stamp_key(stamp) > stamp_key(m)) {
                self.max_merged[node] = Some(stamp);
            }
        }
    }

    /// What `node`'s row `key` has absorbed as its metadata records it: per origin, how many of
    /// its writes, less the node's own writes its capture has not stamped yet (a row whose last
    /// transaction inserted and deleted it looks settled without them).
    pub fn seen_of(&self, node: usize, key: i64) -> Vec<u32> {
        let mut seen = self.seen[node][key as usize].clone();
        while seen[node] > 0 {
            let uncaptured = self
                .by_row
                .get(&(node, key, seen[node]))
                .is_some_and(|&w| self.writes[w].seq == 0);
            if !uncaptured {
                break;
            }
            seen[node] -= 1;
        }
        seen
    }

    /// A join wrote a copy of a donor's row `key` that had absorbed `seen` (`seen_of` when it
    /// was read; the simulator flushes the donor before a copy reads it, so the donor's record
    /// here is its committed state).
    pub fn copied(&mut self, joiner: usize, donor: usize, key: i64, seen: &[u32]) {
        for (mine, &theirs) in self.seen[joiner][key as usize].iter_mut().zip(seen) {
            *mine = (*mine).max(theirs);
        }
        // Parts of transactions the donor shows because it stopped waiting for them, the copy
        // shows too.
        for o in 0..self.nodes {
            self.waived[joiner][o] = self.waived[joiner][o].max(self.waived[donor][o]);
        }
    }

    /// A join copied a row stamped `stamp`: the new node's later writes must be stamped above.
    pub fn copied_stamp(&mut self, joiner: usize, stamp: Hlc) {
        if self.max_merged[joiner].is_none_or(|m| stamp_key(stamp) > stamp_key(m)) {
            self.max_merged[joiner] = Some(stamp);
        }
    }

    /// `joiner` finished its join: it takes each origin's changes up to `streams_from` as
    /// applied, and may show part of transactions up to `claims` (chunks copied at different
    /// moments) until it has applied the rest of them.
    pub fn joined(&mut self, joiner: usize, streams_from: &[(NodeId, u64)], claims: &[(NodeId, u64)]) {
        for &(origin, seq) in streams_from {
            let o = origin.0 as usize - 1;
            if o != joiner {
                self.applied[joiner][o] = seq;
            }
        }
        for &(origin, seq) in claims {
            let o = origin.0 as usize - 1;
            self.waived[joiner][o] = self.waived[joiner][o].max(seq);
        }
    }

    /// `node` applied a transaction that built on `origin`'s changes up to `through` before it
    /// had applied them (their node was away): it may show part of those transactions.
    pub fn waived(&mut self, node: usize, origin: NodeId, through: u64) {
        let o = origin.0 as usize - 1;
        self.waived[node][o] = self.waived[node][o].max(through);
    }

    /// After an apply transaction: every write the node absorbed since the last check, directly
    /// or carried in another node's row state, came with the rest of its transaction, or a
    /// reader there saw part of it.
    pub fn check_whole(&mut self) -> Result<(), Failure> {
        for (node, write) in std::mem::take(&mut self.absorbed) {
            let rec = &self.writes[write];
            let o = rec.node;
            if rec.seq == 0 {
                continue;
            }
            let end = self.transaction_end[o].get(rec.seq as usize - 1).copied().unwrap_or(0);
            if end <= self.waived[node][o] {
                continue;
            }
            let mut seq = rec.seq;
            // The transaction's changes are consecutive and share their last.
            while seq > 1 && self.transaction_end[o].get(seq as usize - 2) == Some(&end) {
                seq -= 1;
            }
            for s in seq..=end {
                let Some(&sibling) = self.by_seq[o].get(s as usize - 1) else {
                    continue;
                };
                let sib = &self.writes[sibling];
                if self.seen[node][sib.key as usize][o] < sib.idx {
                    return fail(
                        Invariant::Atomicity,
                        format!(
                            "node {} shows node {}'s change {} (row {}) without change {s} (row {}) of the same transaction",
                            node + 1,
                            o + 1,
                            rec.seq,
                            rec.key,
                            sib.key
                        ),
                    );
                }
            }
        }
        Ok(())
    }

    /// How many changes `origin` captured.
    pub fn head(&self, origin: usize) -> u64 {
        self.by_seq[origin].len() as u64
    }

    pub fn applied_upto(&self, node: usize, origin: usize) -> u64 {
        self.applied[node][origin]
    }

    pub fn write_of(&self, origin: usize, seq: u64) -> Option<WriteId> {
        self.by_seq[origin].get(seq.checked_sub(1)? as usize).copied()
    }
}
