//! What a node knows about one replicated row: its values and accord's metadata for them.
//!
//! The metadata is a state-based CRDT per row. Merging two states is commutative, associative and
//! idempotent, so replicas converge whatever order, duplication or relaying their changes took:
//! - the causal length orders incarnations (odd = alive, even = deleted), before anything else;
//! - within an incarnation each column merges by its policy: an `lww` version, a `delta` ledger of
//!   per-node cumulative contributions, a `review` multi-value register;
//! - the row clock records which writes this state has absorbed, to tell concurrent overwrites
//!   from sequential ones.

use crdts::{CmRDT, CvRDT, MVReg, VClock};
use serde::{Deserialize, Serialize};

use crate::hlc::{Hlc, NodeId};
use crate::schema::{ColumnPolicy, TableDef};
use crate::value::{Amount, Value};

/// One write to a row: its stamp, and its dot in the row clock (the writer's outbound sequence
/// number of the change), which lets any state tell whether it has absorbed that write.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Version {
    pub stamp: Hlc,
    pub dot: u64,
}

impl Version {
    pub fn node(&self) -> NodeId {
        self.stamp.node
    }

    /// Whether a row clock has absorbed this write.
    pub fn seen_by(&self, clock: &VClock<NodeId>) -> bool {
        clock.get(&self.stamp.node) >= self.dot
    }
}

/// A column value as a change carries it. Logical decoding does not send a TOASTed value that an
/// update left unchanged; such a column arrives as `UnchangedToast` and keeps the value it has.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Cell {
    Value(Value),
    UnchangedToast,
}

impl Cell {
    pub fn value(&self) -> Option<&Value> {
        match self {
            Cell::Value(v) => Some(v),
            Cell::UnchangedToast => None,
        }
    }
}

impl From<Value> for Cell {
    fn from(v: Value) -> Self {
        Cell::Value(v)
    }
}

/// One node's cumulative contribution to a `delta` column: how many of its writes it covers and
/// their summed deltas. A node's entry only grows in `writes`, so the entry with more writes
/// subsumes the other: that is what makes the merge idempotent under duplicates and relays.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Contribution {
    pub writes: u64,
    pub total: Amount,
}

/// The contributions of every node to one `delta` column in one incarnation of a row; the column's
/// value is its value before accord (zero for rows inserted since) plus every total.
///
/// Hand-written rather than `crdts::PNCounter` because those count in `u64` steps, and a delta
/// column needs exact signed decimals of any precision.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
pub struct DeltaLedger {
    /// Sorted by node, at most one entry per node.
    entries: Vec<(NodeId, Contribution)>,
}

impl DeltaLedger {
    pub fn entries(&self) -> &[(NodeId, Contribution)] {
        &self.entries
    }

    /// Records a local write of `delta` by `node`.
    pub fn record(&mut self, node: NodeId, delta: Amount) -> Option<()> {
        match self.entries.binary_search_by_key(&node, |(n, _)| *n) {
            Ok(i) => {
                let entry = &mut self.entries[i].1;
                entry.total = entry.total.checked_add(&delta)?;
                entry.writes += 1;
            }
            Err(i) => self.entries.insert(
                i,
                (
                    node,
                    Contribution {
                        writes: 1,
                        total: delta,
                    },
                ),
            ),
        }
        Some(())
    }

    /// The amount that absorbing `remote` adds to the column: for every node whose remote entry
    /// covers more writes, the difference of the totals. `None` if the amounts cannot be combined
    /// (integer overflow of the ledger, or mixed integer and decimal amounts from a bad peer).
    pub fn pending(&self, remote: &DeltaLedger, zero: &Amount) -> Option<Amount> {
        let mut diff = zero.clone();
        for (node, theirs) in &remote.entries {
            match self.entries.binary_search_by_key(node, |(n, _)| *n) {
                Ok(i) => {
                    let ours = &self.entries[i].1;
                    if theirs.writes > ours.writes {
                        diff = diff.checked_add(&theirs.total.checked_sub(&ours.total)?)?;
                    }
                }
                Err(_) => diff = diff.checked_add(&theirs.total)?,
            }
        }
        Some(diff)
    }

    /// Takes every entry of `remote` that covers more writes than ours.
    pub fn absorb(&mut self, remote: &DeltaLedger) {
        for (node, theirs) in &remote.entries {
            match self.entries.binary_search_by_key(node, |(n, _)| *n) {
                Ok(i) => {
                    if theirs.writes > self.entries[i].1.writes {
                        self.entries[i].1 = theirs.clone();
                    }
                }
                Err(i) => self.entries.insert(i, (*node, theirs.clone())),
            }
        }
    }
}

/// A value written to a `review` column, with the stamp of the write that made it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Candidate {
    pub value: Value,
    pub stamp: Hlc,
}

/// The causal state of one `review` column: the writes that no other write it knows of has seen.
/// More than one such write with differing values is an open review item.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct ReviewRegister {
    reg: MVReg<Candidate, NodeId>,
}

impl ReviewRegister {
    /// The concurrent candidates, in stamp order (the register's own order depends on merge order).
    pub fn candidates(&self) -> Vec<Candidate> {
        let mut all = self.reg.read().val;
        all.sort_by_key(|c| c.stamp);
        all
    }

    /// The provisional value every node converges on: the candidate with the greatest stamp.
    pub fn provisional(&self) -> Option<Candidate> {
        self.reg.read().val.into_iter().max_by_key(|c| c.stamp)
    }

    /// Whether the candidates are concurrent writes of differing values.
    pub fn is_in_conflict(&self) -> bool {
        self.conflict().is_some()
    }

    /// The candidates in stamp order, when they are concurrent writes of differing values. One
    /// read of the register: reading clones every candidate, and merges are a hot path.
    pub fn conflict(&self) -> Option<Vec<Candidate>> {
        let all = self.candidates();
        all.iter().any(|c| c.value != all[0].value).then_some(all)
    }

    /// A local write: it has seen every candidate, so it replaces them all.
    pub fn write(&mut self, node: NodeId, candidate: Candidate) {
        let ctx = self.reg.read().derive_add_ctx(node);
        let op = self.reg.write(candidate, ctx);
        self.reg.apply(op);
    }

    pub fn merge(&mut self, other: &ReviewRegister) {
        self.reg.merge(other.reg.clone());
    }

    /// The register as nodes that merged the same writes in any order all hold it (`verify`):
    /// its candidates in stamp order, and the clock of what it has seen.
    pub fn canonical(&self) -> (Vec<Candidate>, std::collections::BTreeMap<NodeId, u64>) {
        let read = self.reg.read();
        let mut candidates = read.val;
        candidates.sort_by_key(|c| c.stamp);
        (candidates, read.add_clock.dots.into_iter().collect())
    }
}

/// accord's metadata for one column, by the column's policy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ColumnMeta {
    /// The write that set the value; `None` for a value that predates accord, older than any write.
    ///
    /// Not a `crdts::LWWReg`: the value itself lives in the user's table, so only the version is
    /// metadata, and comparing two versions is all the merge needs.
    Lww(Option<Version>),
    Delta(DeltaLedger),
    Review(ReviewRegister),
}

impl ColumnMeta {
    pub fn fresh(policy: ColumnPolicy) -> Self {
        match policy {
            ColumnPolicy::Lww => ColumnMeta::Lww(None),
            ColumnPolicy::Delta => ColumnMeta::Delta(DeltaLedger::default()),
            ColumnPolicy::Review => ColumnMeta::Review(ReviewRegister::default()),
        }
    }

    pub fn policy(&self) -> ColumnPolicy {
        match self {
            ColumnMeta::Lww(_) => ColumnPolicy::Lww,
            ColumnMeta::Delta(_) => ColumnPolicy::Delta,
            ColumnMeta::Review(_) => ColumnPolicy::Review,
        }
    }
}

/// accord's metadata for one row: what the service keeps in its own tables beside the user's row.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RowMeta {
    /// 0 = never seen, odd = alive, even = deleted.
    pub causal_length: u64,
    /// Per node, the latest of its writes to this row this state has absorbed (by its outbound sequence number).
    pub clock: VClock<NodeId>,
    /// The greatest stamp of any write absorbed.
    pub stamp: Option<Hlc>,
    /// The insert that began this incarnation (the least, when inserts of one key met).
    pub created: Option<Version>,
    /// One per column of the table while alive; empty for a deleted row.
    pub columns: Vec<ColumnMeta>,
    /// For a deleted row: the deletes that made this causal length, as (origin, the origin's
    /// sequence number of the change), one per origin, sorted. Tombstone collection drops the row
    /// only once every node had applied all of them (`collection::StableCut::covers`).
    #[serde(default)]
    pub deleted_by: Vec<(NodeId, u64)>,
    /// Metadata of columns the row's stored shape had and the shape it was last read under had
    /// not (`shape::reshape_meta`): a reader behind the table's latest shape (a capture still
    /// decoding changes from before an `ALTER TABLE ... ADD COLUMN`, an applier not yet
    /// reloaded) keeps them for the readers after it, never drops them. Local: never sent.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub carried: std::collections::BTreeMap<String, ColumnMeta>,
    /// Inserts of this incarnation's key that an earlier concurrent insert displaced (a table with
    /// `inserts=review`), sorted by `created`. Grows within the incarnation; its open entries are
    /// review items.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub displaced: Vec<DisplacedInsert>,
}

/// An insert that lost its key to an earlier concurrent insert, with the writes made on it before
/// its writers heard of the earlier one (its *lineage*), kept for a person to review. Columns are
/// kept by name, so a change of the table's shape does not move them; it has no clock of its own,
/// so that every node holds the same entry whatever order the lineage's writes came in.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DisplacedInsert {
    pub created: Version,
    pub columns: std::collections::BTreeMap<String, DisplacedColumn>,
    /// The write that resolved its review item, once someone did.
    pub resolved: Option<Version>,
}

/// One column of a displaced insert: its metadata, and its value where the metadata alone does
/// not give it (`lww` columns; a `delta` column is the sum of its ledger, a `review` column its
/// provisional candidate).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DisplacedColumn {
    pub meta: ColumnMeta,
    pub value: Option<Value>,
}

impl DisplacedInsert {
    /// The displaced lineage of `row`, a live state of `table`.
    pub fn of(table: &TableDef, row: &RowState, created: Version) -> Self {
        let columns = table
            .columns
            .iter()
            .zip(&row.meta.columns)
            .zip(&row.values)
            .map(|((def, meta), cell)| {
                let value = match meta {
                    ColumnMeta::Lww(_) => cell.value().cloned(),
                    ColumnMeta::Delta(_) | ColumnMeta::Review(_) => None,
                };
                (
                    def.name.clone(),
                    DisplacedColumn {
                        meta: meta.clone(),
                        value,
                    },
                )
            })
            .chain(row.meta.carried.iter().map(|(name, meta)| {
                (
                    name.clone(),
                    DisplacedColumn {
                        meta: meta.clone(),
                        value: None,
                    },
                )
            }))
            .collect();
        DisplacedInsert {
            created,
            columns,
            resolved: None,
        }
    }

    /// Joins another node's state of the same lineage into this one.
    fn join(&mut self, other: &DisplacedInsert) {
        for (name, theirs) in &other.columns {
            let Some(ours) = self.columns.get_mut(name) else {
                self.columns.insert(name.clone(), theirs.clone());
                continue;
            };
            match (&mut ours.meta, &theirs.meta) {
                (ColumnMeta::Lww(a), ColumnMeta::Lww(b)) if *b > *a || (*b == *a && ours.value.is_none()) => {
                    *a = *b;
                    ours.value = theirs.value.clone();
                }
                (ColumnMeta::Delta(a), ColumnMeta::Delta(b)) => a.absorb(b),
                (ColumnMeta::Review(a), ColumnMeta::Review(b)) => a.merge(b),
                // A column's policy cannot change while it is replicated (the DDL guard refuses
                // it), so two nodes never hold one column of a lineage under two policies.
                _ => {}
            }
        }
        self.resolved = self.resolved.max(other.resolved);
    }

    /// Whether a value of it has not reached this node yet: an unchanged TOAST value relayed by a
    /// node that was not its origin, until the origin's own change (or any later change that
    /// carries the entry) brings it. Its item waits until then, so that every node opens the
    /// item with the same values (and so the same id).
    pub fn awaits_values(&self) -> bool {
        self.columns
            .values()
            .any(|c| matches!(c.meta, ColumnMeta::Lww(Some(_))) && c.value.is_none())
    }

    /// Its values by column name, as far as this node knows them (`None`: a value not sent,
    /// an unchanged TOAST value). A function of the entry alone, not of the reader's table, so
    /// that nodes reading it under different shapes of the table name its review item alike.
    pub fn values(&self) -> Vec<(String, Option<Value>)> {
        self.columns
            .iter()
            .map(|(name, column)| {
                let value = match &column.meta {
                    ColumnMeta::Lww(_) => column.value.clone(),
                    ColumnMeta::Delta(ledger) => ledger_sum(ledger),
                    ColumnMeta::Review(reg) => reg.provisional().map(|c| c.value),
                };
                (name.clone(), value)
            })
            .collect()
    }
}

/// A `delta` column's value in a row inserted since accord: the sum of every contribution (an
/// insert counts as a delta from zero). `None` if it does not fit a bigint or mixes kinds.
fn ledger_sum(ledger: &DeltaLedger) -> Option<Value> {
    let mut entries = ledger.entries().iter().map(|(_, c)| &c.total);
    let Some(first) = entries.next() else {
        return Some(Value::Int(0));
    };
    let sum = entries.try_fold(first.clone(), |sum, total| sum.checked_add(total))?;
    match sum {
        Amount::Int(v) => i64::try_from(v).ok().map(Value::Int),
        Amount::Decimal(d) => Some(Value::Numeric(d)),
    }
}

/// The union of two sets of displaced inserts, each lineage joined across them, sorted by `created`.
pub(crate) fn join_displaced(ours: &[DisplacedInsert], theirs: &[DisplacedInsert]) -> Vec<DisplacedInsert> {
    let mut all: Vec<DisplacedInsert> = ours.to_vec();
    for entry in theirs {
        match all.binary_search_by_key(&entry.created, |d| d.created) {
            Ok(i) => all[i].join(entry),
            Err(i) => all.insert(i, entry.clone()),
        }
    }
    all
}

impl RowMeta {
    /// A row this node has never heard of.
    pub fn absent() -> Self {
        RowMeta {
            causal_length: 0,
            clock: VClock::new(),
            stamp: None,
            created: None,
            columns: Vec::new(),
            deleted_by: Vec::new(),
            carried: std::collections::BTreeMap::new(),
            displaced: Vec::new(),
        }
    }

    /// A row that existed before accord was set up: alive, with every value older than any write.
    pub fn pre_existing(table: &TableDef) -> Self {
        RowMeta {
            causal_length: 1,
            columns: table.columns.iter().map(|c| ColumnMeta::fresh(c.policy)).collect(),
            ..RowMeta::absent()
        }
    }

    pub fn is_alive(&self) -> bool {
        self.causal_length % 2 == 1
    }

    /// Records that `deletes` also made this tombstone (concurrent deletes of one incarnation
    /// reach the same causal length): the union, keeping each origin's later change.
    pub(crate) fn absorb_deletes(&mut self, deletes: &[(NodeId, u64)]) {
        for &(origin, seq) in deletes {
            match self.deleted_by.binary_search_by_key(&origin, |(o, _)| *o) {
                Ok(i) => self.deleted_by[i].1 = self.deleted_by[i].1.max(seq),
                Err(i) => self.deleted_by.insert(i, (origin, seq)),
            }
        }
    }

    /// Records a new write by `stamp.node`, the change `seq` of its outbound log, and returns its
    /// version. The dot is the sequence number rather than a count of the node's writes to the
    /// row: a count starts again at 1 once the row's tombstone is collected, and a dot used twice
    /// would look already seen to nodes that absorbed its first use.
    pub(crate) fn next_version(&mut self, stamp: Hlc, seq: u64) -> Version {
        let counter = seq.max(self.clock.get(&stamp.node) + 1);
        let dot = crdts::Dot::new(stamp.node, counter);
        let version = Version { stamp, dot: counter };
        self.clock.apply(dot);
        self.stamp = self.stamp.max(Some(stamp));
        version
    }
}

/// A row as one node holds it: the values (from the user's table, or as a change carries them)
/// and accord's metadata.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RowState {
    pub meta: RowMeta,
    /// One per column of the table while alive; empty for a deleted row.
    pub values: Vec<Cell>,
}

impl RowState {
    pub fn absent() -> Self {
        RowState {
            meta: RowMeta::absent(),
            values: Vec::new(),
        }
    }

    pub fn is_alive(&self) -> bool {
        self.meta.is_alive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bigdecimal::BigDecimal;

    const A: NodeId = NodeId(1);
    const B: NodeId = NodeId(2);

    #[test]
    fn ledger_absorbs_each_contribution_once() {
        let mut a = DeltaLedger::default();
        a.record(A, Amount::Int(5)).unwrap();
        let mut b = DeltaLedger::default();
        b.record(B, Amount::Int(-2)).unwrap();
        b.record(B, Amount::Int(10)).unwrap();

        let zero = Amount::Int(0);
        assert_eq!(a.pending(&b, &zero), Some(Amount::Int(8)));
        a.absorb(&b);
        assert_eq!(a.pending(&b, &zero), Some(Amount::Int(0)), "a duplicate adds nothing");
        let mut older = DeltaLedger::default();
        older.record(B, Amount::Int(-2)).unwrap();
        assert_eq!(
            a.pending(&older, &zero),
            Some(Amount::Int(0)),
            "an older entry adds nothing"
        );
    }

    #[test]
    fn ledger_refuses_mixed_amounts() {
        let mut a = DeltaLedger::default();
        a.record(A, Amount::Int(1)).unwrap();
        assert_eq!(a.record(A, Amount::Decimal(BigDecimal::from(1))), None);
    }

    #[test]
    fn register_keeps_concurrent_writes_and_a_local_write_replaces_them() {
        let cand = |v: &str, t: u64, n: NodeId| Candidate {
            value: Value::text(v),
            stamp: Hlc::new(t, 0, n),
        };
        let mut a = ReviewRegister::default();
        a.write(A, cand("x", 1, A));
        let mut b = ReviewRegister::default();
        b.write(B, cand("y", 2, B));
        a.merge(&b);
        assert!(a.is_in_conflict());
        assert_eq!(a.candidates(), vec![cand("x", 1, A), cand("y", 2, B)]);
        assert_eq!(a.provisional().unwrap().value, Value::text("y"));

        a.write(A, cand("z", 3, A));
        assert!(!a.is_in_conflict());
        b.merge(&a);
        assert_eq!(b.candidates(), vec![cand("z", 3, A)]);
    }
}
