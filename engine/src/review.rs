//! Review items: concurrent writes to a `review` column, and changes that could not be applied.
//!
//! An item's id is derived from what it is about (table, key, column and the candidates' stamps),
//! so every node that sees the same conflict names it the same, whatever order changes came in.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::change::RowKey;
use crate::hlc::{Hlc, NodeId};
use crate::state::{Candidate, DisplacedInsert};
use crate::value::Value;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct ReviewItemId(pub u64);

impl fmt::Display for ReviewItemId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

impl std::str::FromStr for ReviewItemId {
    type Err = std::num::ParseIntError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        u64::from_str_radix(s, 16).map(ReviewItemId)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ReviewKind {
    /// Concurrent writes of differing values; the column holds the provisional winner.
    Concurrent {
        candidates: Vec<Candidate>,
        provisional: Hlc,
    },
    /// An insert of the row's key, concurrent with the insert that keeps the row (a table with
    /// `inserts=review`), with its values as the writes made on it left them (by column name;
    /// `None` where this node lacks a value).
    DisplacedInsert {
        created: Hlc,
        values: Vec<(String, Option<Value>)>,
    },
    /// A change from `origin` that this node could not apply; it is kept so it can be retried.
    Unapplicable {
        origin: NodeId,
        stamp: Hlc,
        seq: u64,
        error: String,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReviewItem {
    pub id: ReviewItemId,
    pub table: String,
    pub key: RowKey,
    /// The column concerned; `None` when a whole change is parked.
    pub column: Option<String>,
    pub kind: ReviewKind,
}

impl ReviewItem {
    pub fn concurrent(table: &str, key: &RowKey, column: &str, candidates: Vec<Candidate>) -> Self {
        let mut h = hasher(b"concurrent", table, key);
        hash_str(&mut h, column);
        for c in &candidates {
            hash_stamp(&mut h, c.stamp);
        }
        let provisional = candidates.iter().map(|c| c.stamp).max().unwrap_or(Hlc::zero(NodeId(0)));
        ReviewItem {
            id: finish(h),
            table: table.to_owned(),
            key: key.clone(),
            column: Some(column.to_owned()),
            kind: ReviewKind::Concurrent {
                candidates,
                provisional,
            },
        }
    }

    pub fn unapplicable(
        table: &str,
        key: &RowKey,
        column: Option<&str>,
        origin: NodeId,
        stamp: Hlc,
        seq: u64,
        error: String,
    ) -> Self {
        let mut h = hasher(b"unapplicable", table, key);
        hash_stamp(&mut h, stamp);
        hash_str(&mut h, column.unwrap_or(""));
        ReviewItem {
            id: finish(h),
            table: table.to_owned(),
            key: key.clone(),
            column: column.map(str::to_owned),
            kind: ReviewKind::Unapplicable {
                origin,
                stamp,
                seq,
                error,
            },
        }
    }

    /// The item of a displaced insert. Its id covers the values too: a later write on the
    /// displaced lineage makes it another item (the earlier withdrawn), as a further candidate
    /// does for a concurrent write.
    pub fn displaced_insert(table: &str, key: &RowKey, displaced: &DisplacedInsert) -> Self {
        Self::displaced_insert_of(table, key, displaced.created.stamp, displaced.values())
    }

    /// The item of the insert stamped `created` whose values (by column name, in name order) are
    /// `values`.
    pub fn displaced_insert_of(table: &str, key: &RowKey, created: Hlc, values: Vec<(String, Option<Value>)>) -> Self {
        let mut h = hasher(b"displaced-insert", table, key);
        hash_stamp(&mut h, created);
        for (name, value) in &values {
            hash_str(&mut h, name);
            match value {
                Some(v) => {
                    h.update(&[1]);
                    v.hash_into(&mut h);
                }
                None => {
                    h.update(&[0]);
                }
            }
        }
        ReviewItem {
            id: finish(h),
            table: table.to_owned(),
            key: key.clone(),
            column: None,
            kind: ReviewKind::DisplacedInsert { created, values },
        }
    }

    pub fn candidates(&self) -> &[Candidate] {
        match &self.kind {
            ReviewKind::Concurrent { candidates, .. } => candidates,
            ReviewKind::DisplacedInsert { .. } | ReviewKind::Unapplicable { .. } => &[],
        }
    }
}

/// How an item stopped being open.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ClosureKind {
    /// A reviewer chose `value`; the resolution is the write stamped `stamp`.
    Resolved { by: NodeId, stamp: Hlc, value: Value },
    /// A later write that had seen every candidate replaced them.
    Superseded { stamp: Hlc, value: Value },
}

impl ClosureKind {
    /// The stamp of the write that closed the item.
    pub fn stamp(&self) -> Hlc {
        match self {
            ClosureKind::Resolved { stamp, .. } | ClosureKind::Superseded { stamp, .. } => *stamp,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReviewClosure {
    pub item: ReviewItem,
    pub kind: ClosureKind,
}

impl ReviewClosure {
    /// Whether this closure replaces `recorded`, an earlier-recorded closure of the same item.
    /// Writers on two nodes may close one item concurrently; every node keeps the closure with the
    /// greatest stamp, so all record the same one whatever order the two arrived in.
    pub fn replaces(&self, recorded: &ClosureKind) -> bool {
        self.kind.stamp() > recorded.stamp()
    }
}

/// What a merge or a capture does to the node's review queue.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ReviewAction {
    /// A new open item.
    Open(ReviewItem),
    /// An open item that is no longer open without being closed: a further concurrent write
    /// extended it into a new item, or the row was deleted. Remove it.
    Withdraw(ReviewItemId),
    /// Record the item as closed, whether or not this node had it open, unless a closure of it
    /// with a greater stamp is already recorded (see [`ReviewClosure::replaces`]).
    Close(ReviewClosure),
}

fn hasher(kind: &[u8], table: &str, key: &RowKey) -> blake3::Hasher {
    let mut h = blake3::Hasher::new();
    h.update(b"accord.review.v1\0");
    h.update(kind);
    hash_str(&mut h, table);
    key.hash_into(&mut h);
    h
}

fn hash_str(h: &mut blake3::Hasher, s: &str) {
    h.update(&(s.len() as u64).to_be_bytes());
    h.update(s.as_bytes());
}

fn hash_stamp(h: &mut blake3::Hasher, stamp: Hlc) {
    h.update(&stamp.physical.to_be_bytes());
    h.update(&stamp.logical.to_be_bytes());
    h.update(&stamp.node.0.to_be_bytes());
}

fn finish(h: blake3::Hasher) -> ReviewItemId {
    let bytes = h.finalize();
    let mut first = [0u8; 8];
    first.copy_from_slice(&bytes.as_bytes()[..8]);
    ReviewItemId(u64::from_be_bytes(first))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cand(v: &str, t: u64, n: u32) -> Candidate {
        Candidate {
            value: Value::text(v),
            stamp: Hlc::new(t, 0, NodeId(n)),
        }
    }

    #[test]
    fn ids_depend_on_what_the_item_is_about() {
        let key = RowKey(vec![Value::Int(1)]);
        let a = ReviewItem::concurrent("s.t", &key, "price", vec![cand("1", 1, 1), cand("2", 2, 2)]);
        let same = ReviewItem::concurrent("s.t", &key, "price", vec![cand("1", 1, 1), cand("2", 2, 2)]);
        assert_eq!(a.id, same.id);
        let other_col = ReviewItem::concurrent("s.t", &key, "cost", vec![cand("1", 1, 1), cand("2", 2, 2)]);
        let other_key = ReviewItem::concurrent(
            "s.t",
            &RowKey(vec![Value::Int(2)]),
            "price",
            vec![cand("1", 1, 1), cand("2", 2, 2)],
        );
        let more = ReviewItem::concurrent(
            "s.t",
            &key,
            "price",
            vec![cand("1", 1, 1), cand("2", 2, 2), cand("3", 3, 3)],
        );
        assert_ne!(a.id, other_col.id);
        assert_ne!(a.id, other_key.id);
        assert_ne!(a.id, more.id);
        assert_eq!(a.id.to_string().parse::<ReviewItemId>().unwrap(), a.id);
    }
}
