//! Changes: what the capture reads from the database, and what one node sends the others.

use serde::{Deserialize, Serialize};

use crate::hlc::{Hlc, NodeId};
use crate::review::ReviewClosure;
use crate::shape::ShapeId;
use crate::state::{Cell, RowState};
use crate::value::Value;

/// The primary-key values of a row, in the table's key-column order.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct RowKey(pub Vec<Value>);

impl RowKey {
    pub(crate) fn hash_into(&self, hasher: &mut blake3::Hasher) {
        hasher.update(&(self.0.len() as u64).to_be_bytes());
        for v in &self.0 {
            v.hash_into(hasher);
        }
    }
}

impl std::fmt::Display for RowKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("(")?;
        for (i, v) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            write!(f, "{v}")?;
        }
        f.write_str(")")
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ChangeKind {
    Insert,
    Update,
    Delete,
}

/// A committed local row change as logical decoding delivers it, with the table's non-key columns
/// in table order. `old` is the previous row version (the tables run with `REPLICA IDENTITY FULL`,
/// so updates and deletes carry it); `new` is absent for a delete.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CapturedChange {
    pub kind: ChangeKind,
    pub key: RowKey,
    pub old: Option<Vec<Cell>>,
    pub new: Option<Vec<Cell>>,
}

impl RowChange {
    /// Whether this change is the last of its origin's transaction: a batch may end after it.
    pub fn ends_transaction(&self) -> bool {
        self.tx_last <= self.seq
    }

    /// About how much memory the change takes, for the receiver's spool bound: an estimate
    /// within a small factor (the values' text, plus a fixed cost per change, value and column).
    pub fn approx_bytes(&self) -> usize {
        fn value(v: &Value) -> usize {
            24 + match v {
                Value::Text(s) => s.len(),
                Value::Numeric(_) => 32,
                Value::Null | Value::Int(_) => 0,
            }
        }
        let key: usize = self.key.0.iter().map(value).sum();
        let values: usize = self.row.values.iter().map(|c| c.value().map_or(8, value)).sum();
        256 + self.table.len()
            + key
            + values
            + 96 * self.row.meta.columns.len()
            + 16 * self.builds_on.len()
            + 64 * self.closures.len()
    }
}

/// A stamped change as one node sends it to the others: the origin's whole state of the row after
/// the write, so that a receiver converges whatever it received before or receives after.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RowChange {
    /// Schema-qualified table name.
    pub table: String,
    pub key: RowKey,
    pub kind: ChangeKind,
    pub origin: NodeId,
    pub stamp: Hlc,
    /// The origin's gapless sequence number for its outbound changes.
    pub seq: u64,
    /// The sequence number of the last change of the origin's transaction that made this one:
    /// a receiver applies a transaction's changes together or not at all. 0 on changes captured
    /// before accord recorded it (each is then a transaction of its own).
    #[serde(default)]
    pub tx_last: u64,
    /// Per other node, the last of its changes the origin had applied when this change's
    /// transaction committed. The row state may carry their effects (a merge relays what it
    /// merged), so a receiver applies this change only once it has applied those itself, or a
    /// reader there could see part of another node's transaction. Empty for changes captured
    /// before accord recorded it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub builds_on: Vec<(NodeId, u64)>,
    pub row: RowState,
    /// The shape of its table the change was written under: a receiver whose table has another
    /// shape reads it by column name (`shape::reshape_change`). `None` on changes captured before
    /// accord recorded it (read as the receiver's own shape, as they always were).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shape: Option<ShapeId>,
    /// Review items this write closed on its origin (resolved or superseded). Every node records
    /// them, so the closed items are the same everywhere, whatever each node saw open.
    pub closures: Vec<ReviewClosure>,
}
