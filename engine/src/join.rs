//! A new node's copy of a donor's rows (`accord join`): which donor rows it may copy as they are,
//! and which positions it may take as applied. The service (`src/node/join.rs`) and the
//! simulator run these rules; they only read and write the rows.
//!
//! The rule that makes a copy safe: a node may hold *more* of a row than its positions claim
//! (every change is a state that merges idempotently, so receiving it again changes nothing),
//! never less. So the positions a joined node streams from (`JoinPositions::streams_from`) are
//! the donor's of the join's first snapshot, and every later snapshot, read chunk by chunk, holds
//! at least that. What the copy may hold beyond them (`JoinPositions::claims`) is what the node's
//! first own writes say they build on, so that its receivers wait for those transactions too.

use serde::{Deserialize, Serialize};

use crate::hlc::NodeId;

/// What a join does with one donor row as one snapshot showed it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CopyVerdict {
    /// The row is what its metadata describes: copy both.
    Copy,
    /// A deleted row: copy its metadata (the tombstone).
    CopyTombstone,
    /// The row's version is not the one its metadata accounts for: a local write the donor's
    /// capture has not seen yet, or a version written in a subtransaction (whose xid decoding
    /// never reports) that it saw long ago. Decide with [`settle`] once the donor's capture has
    /// read past a mark written after the snapshot.
    Settle,
    /// A local insert or delete the donor's capture has not accounted for: it will capture it
    /// with a sequence number above the join's positions and send the row's whole state, so the
    /// copy leaves the row to that.
    LeaveToStream,
}

/// Judges a donor row: whether its metadata says it lives, the transaction its metadata accounts
/// for, and the xmin of the row's version (`None`: no row).
pub fn judge_copy<X: PartialEq>(alive: bool, known_xmin: Option<&X>, row_xmin: Option<&X>) -> CopyVerdict {
    match (alive, row_xmin) {
        (true, Some(xmin)) if known_xmin == Some(xmin) => CopyVerdict::Copy,
        (true, Some(_)) => CopyVerdict::Settle,
        (false, None) => CopyVerdict::CopyTombstone,
        (true, None) | (false, Some(_)) => CopyVerdict::LeaveToStream,
    }
}

/// What becomes of a row judged [`CopyVerdict::Settle`], read again once the donor's capture
/// has read past a mark written after the read that judged it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Settled {
    /// Still the version first seen: the capture has accounted for it, and the metadata just
    /// read describes it. Copy the row and metadata of this read.
    Copy,
    /// A newer version: read again after another mark. Not left to the stream: the change the
    /// donor's capture makes of an update leaves unchanged TOASTed values out, and the new node
    /// would not have them.
    Again,
    /// Deleted since (a delete, and an insert after it, carry what they need): the donor's stream
    /// brings the row.
    LeaveToStream,
}

/// Settles a row first seen in version `seen`: whether its metadata says it lives now, and its
/// version's xmin now (`None`: no row).
pub fn settle<X: PartialEq>(seen: &X, alive: Option<bool>, row_xmin: Option<&X>) -> Settled {
    match (alive, row_xmin) {
        (Some(true), Some(xmin)) if xmin == seen => Settled::Copy,
        (Some(true), Some(_)) => Settled::Again,
        _ => Settled::LeaveToStream,
    }
}

/// The positions of a join: per node, the last of its changes taken as applied.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct JoinPositions {
    /// Read with the first snapshot of the join; the node streams every node's changes after
    /// these. Never moved: a later snapshot's would claim changes that chunks copied before it
    /// do not hold.
    pub streams_from: Vec<(NodeId, u64)>,
    /// The greatest positions of every snapshot the copy read: what copied rows may hold.
    pub claims: Vec<(NodeId, u64)>,
}

impl JoinPositions {
    /// The positions of the join's first snapshot (the donor's own: its capture's last sequence
    /// number in that snapshot).
    pub fn first(mut positions: Vec<(NodeId, u64)>) -> Self {
        positions.sort();
        positions.dedup_by_key(|(n, _)| *n);
        JoinPositions {
            claims: positions.clone(),
            streams_from: positions,
        }
    }

    /// A later snapshot's positions: the copy may now hold up to these.
    pub fn saw(&mut self, positions: &[(NodeId, u64)]) {
        for &(node, seq) in positions {
            match self.claims.iter_mut().find(|(n, _)| *n == node) {
                Some((_, mine)) => *mine = (*mine).max(seq),
                None => self.claims.push((node, seq)),
            }
        }
        self.claims.sort();
    }

    /// Where the node streams `node`'s changes from.
    pub fn streams_from(&self, node: NodeId) -> u64 {
        self.streams_from
            .iter()
            .find(|(n, _)| *n == node)
            .map_or(0, |(_, s)| *s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_are_copied_only_as_their_metadata_describes_them() {
        assert_eq!(judge_copy(true, Some(&7), Some(&7)), CopyVerdict::Copy);
        assert_eq!(judge_copy(true, Some(&7), Some(&9)), CopyVerdict::Settle);
        assert_eq!(judge_copy(true, None, Some(&9)), CopyVerdict::Settle);
        assert_eq!(judge_copy::<u64>(false, None, None), CopyVerdict::CopyTombstone);
        assert_eq!(judge_copy::<u64>(true, Some(&7), None), CopyVerdict::LeaveToStream);
        assert_eq!(judge_copy(false, None, Some(&9)), CopyVerdict::LeaveToStream);
    }

    #[test]
    fn a_row_settles_only_in_the_version_first_seen() {
        assert_eq!(settle(&9, Some(true), Some(&9)), Settled::Copy);
        assert_eq!(settle(&9, Some(true), Some(&10)), Settled::Again);
        assert_eq!(settle(&9, Some(true), None), Settled::LeaveToStream);
        assert_eq!(settle(&9, Some(false), None), Settled::LeaveToStream);
        assert_eq!(settle::<u64>(&9, None, None), Settled::LeaveToStream);
    }

    #[test]
    fn streams_start_at_the_first_snapshot_and_claims_grow() {
        let mut p = JoinPositions::first(vec![(NodeId(3), 9), (NodeId(1), 5)]);
        p.saw(&[(NodeId(1), 7), (NodeId(2), 1), (NodeId(3), 2)]);
        assert_eq!(p.streams_from, vec![(NodeId(1), 5), (NodeId(3), 9)]);
        assert_eq!(p.claims, vec![(NodeId(1), 7), (NodeId(2), 1), (NodeId(3), 9)]);
        assert_eq!(p.streams_from(NodeId(2)), 0);
    }
}
