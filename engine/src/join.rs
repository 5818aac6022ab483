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
    /// The row and its metadata disagree: a local write the donor's capture has not accounted
    /// for yet (an update, an insert, a delete), or a version written in a subtransaction (whose
    /// xid decoding never reports) that it accounted for long ago. Decide with [`settle`] once
    /// the donor's capture has read past a mark written after the snapshot. Never left to the
    /// donor's stream: until that brings the row, other nodes' updates of it that leave TOASTed
    /// values unchanged cannot be merged on the new node, and their transactions would show in
    /// part (the simulator found both).
    Settle,
}

/// Judges a donor row: whether its metadata says it lives, the transaction its metadata accounts
/// for, and the xmin of the row's version (`None`: no row).
pub fn judge_copy<X: PartialEq>(alive: bool, known_xmin: Option<&X>, row_xmin: Option<&X>) -> CopyVerdict {
    match (alive, row_xmin) {
        (true, Some(xmin)) if known_xmin == Some(xmin) => CopyVerdict::Copy,
        (false, None) => CopyVerdict::CopyTombstone,
        _ => CopyVerdict::Settle,
    }
}

/// What becomes of a row judged [`CopyVerdict::Settle`], read again once the donor's capture
/// has read past a mark written after the read that judged it: every write committed before the
/// mark is then accounted for by the metadata just read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Settled {
    /// Copy the row and the metadata of this read.
    Copy,
    /// Copy the tombstone of this read.
    CopyTombstone,
    /// Written again since the mark: read again after another mark.
    Again,
}

/// Settles a row: its version's xmin when it was judged (`None`: no row), and now whether its
/// metadata says it lives, the transaction the metadata accounts for, and the version's xmin.
/// A version seen before the mark, or the one the metadata accounts for, is described by the
/// metadata; a deleted row without a row is a tombstone (later writes arrive as changes).
pub fn settle<X: PartialEq>(
    seen: Option<&X>,
    alive: Option<bool>,
    known_xmin: Option<&X>,
    row_xmin: Option<&X>,
) -> Settled {
    match (alive, row_xmin) {
        (Some(true), Some(xmin)) if seen == Some(xmin) || known_xmin == Some(xmin) => Settled::Copy,
        (Some(false), None) => Settled::CopyTombstone,
        _ => Settled::Again,
    }
}

/// How the `attempt`-th read of rows being settled (0 first) is made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SettleTry {
    /// Read after a mark, without locks.
    Unlocked,
    /// The rows that exist locked (`FOR SHARE`) before the mark and until they are read: a row
    /// written without pause still settles.
    Locked,
    /// A row kept changing (only one deleted and inserted again without pause can, since it
    /// cannot be locked): the chunk is given up, to be read again from the start.
    GiveUp,
}

/// Unlocked tries before the rows are locked, and tries in all before a chunk is given up.
pub const UNLOCKED_SETTLES: usize = 3;
pub const MAX_SETTLES: usize = 50;

pub fn settle_try(attempt: usize) -> SettleTry {
    match attempt {
        a if a < UNLOCKED_SETTLES => SettleTry::Unlocked,
        a if a < MAX_SETTLES => SettleTry::Locked,
        _ => SettleTry::GiveUp,
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
        assert_eq!(judge_copy::<u64>(true, Some(&7), None), CopyVerdict::Settle);
        assert_eq!(judge_copy(false, None, Some(&9)), CopyVerdict::Settle);
    }

    #[test]
    fn a_row_settles_in_a_version_the_metadata_accounts_for() {
        // The version seen before the mark (a subtransaction's xid: never the metadata's).
        assert_eq!(settle(Some(&9), Some(true), Some(&8), Some(&9)), Settled::Copy);
        // A row inserted before the mark, now captured.
        assert_eq!(settle(None, Some(true), Some(&10), Some(&10)), Settled::Copy);
        // A delete captured since.
        assert_eq!(settle(Some(&9), Some(false), None, None), Settled::CopyTombstone);
        // Written again after the mark.
        assert_eq!(settle(Some(&9), Some(true), Some(&9), Some(&11)), Settled::Again);
        assert_eq!(settle(Some(&9), Some(true), Some(&9), None), Settled::Again);
        assert_eq!(settle::<u64>(None, Some(false), None, Some(&12)), Settled::Again);
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
