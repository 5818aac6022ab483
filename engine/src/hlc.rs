//! Hybrid logical clock: physical microseconds plus a logical counter, ordered with the node id as
//! the final tie-break so that no two writes anywhere in a cluster ever carry equal stamps.
//!
//! The clock never reads the wall clock itself: callers pass the physical time in, which keeps the
//! engine deterministic under the simulator and lets the service decide where time comes from.

use std::fmt;

use serde::{Deserialize, Serialize};
use thiserror::Error;

/// The identity of a node in a cluster, chosen by the operator and unique in it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct NodeId(pub u32);

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// One hybrid-logical-clock stamp. Field order matters: the derived `Ord` compares physical time,
/// then the logical counter, then the node, which is exactly the (HLC, node id) order of PRODUCT.md.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Hlc {
    /// Microseconds since the Unix epoch.
    pub physical: u64,
    pub logical: u32,
    pub node: NodeId,
}

impl Hlc {
    pub const fn new(physical: u64, logical: u32, node: NodeId) -> Self {
        Self {
            physical,
            logical,
            node,
        }
    }

    /// The smallest stamp of a node; below every stamp the node can issue.
    pub const fn zero(node: NodeId) -> Self {
        Self::new(0, 0, node)
    }

    fn time(&self) -> (u64, u32) {
        (self.physical, self.logical)
    }
}

impl fmt::Display for Hlc {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}@{}", self.physical, self.logical, self.node)
    }
}

/// Default limit on how far a peer's clock may run ahead of ours: 500 ms.
pub const DEFAULT_MAX_OFFSET_MICROS: u64 = 500_000;

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ClockError {
    #[error(
        "stamp {remote} from node {} is {ahead_micros} µs ahead of this node's clock, \
         more than the allowed maximum offset of {max_offset_micros} µs; \
         check the clocks (NTP) of both nodes",
        remote.node
    )]
    AheadOfMaxOffset {
        remote: Hlc,
        ahead_micros: u64,
        max_offset_micros: u64,
    },
    #[error("restored high-water mark belongs to node {found}, but this clock is node {expected}")]
    WrongNode { expected: NodeId, found: NodeId },
}

/// The clock of one node. It only moves forward: through local stamps, through stamps merged from
/// peers, and across restarts through [`HlcClock::restore`] from a persisted high-water mark.
#[derive(Debug, Clone)]
pub struct HlcClock {
    node: NodeId,
    /// The greatest (physical, logical) time this clock has issued or observed.
    last: (u64, u32),
    max_offset_micros: u64,
}

impl HlcClock {
    pub fn new(node: NodeId, max_offset_micros: u64) -> Self {
        Self {
            node,
            last: (0, 0),
            max_offset_micros,
        }
    }

    /// A clock that resumes after `high_water`, the value of [`HlcClock::high_water`] persisted
    /// before a restart, so it never issues a stamp at or below one it issued before.
    pub fn restore(high_water: Hlc, max_offset_micros: u64) -> Self {
        Self {
            node: high_water.node,
            last: high_water.time(),
            max_offset_micros,
        }
    }

    /// Like [`HlcClock::restore`], but checks that the mark belongs to this node.
    pub fn restore_for(node: NodeId, high_water: Hlc, max_offset_micros: u64) -> Result<Self, ClockError> {
        if high_water.node != node {
            return Err(ClockError::WrongNode {
                expected: node,
                found: high_water.node,
            });
        }
        Ok(Self::restore(high_water, max_offset_micros))
    }

    pub fn node(&self) -> NodeId {
        self.node
    }

    pub fn max_offset_micros(&self) -> u64 {
        self.max_offset_micros
    }

    /// The greatest time seen so far, as a stamp of this node: persist it to survive restarts.
    pub fn high_water(&self) -> Hlc {
        Hlc::new(self.last.0, self.last.1, self.node)
    }

    /// A new stamp, greater than every stamp issued or observed before, and at least `physical`.
    pub fn now(&mut self, physical: u64) -> Hlc {
        self.last = if physical > self.last.0 {
            (physical, 0)
        } else {
            successor(self.last)
        };
        self.high_water()
    }

    /// Observes a peer's stamp so that later local stamps are greater. Refuses, and leaves the
    /// clock untouched, when the stamp is more than the maximum offset ahead of `physical`.
    pub fn update(&mut self, remote: Hlc, physical: u64) -> Result<(), ClockError> {
        self.check(remote, physical)?;
        if remote.time() > self.last {
            self.last = remote.time();
        }
        Ok(())
    }

    /// Whether `remote` is within the maximum offset of `physical`, without observing it.
    pub fn check(&self, remote: Hlc, physical: u64) -> Result<(), ClockError> {
        let ahead = remote.physical.saturating_sub(physical);
        if ahead > self.max_offset_micros {
            return Err(ClockError::AheadOfMaxOffset {
                remote,
                ahead_micros: ahead,
                max_offset_micros: self.max_offset_micros,
            });
        }
        Ok(())
    }
}

/// The next time after `t`. When the logical counter is exhausted the physical part moves on by a
/// microsecond instead of wrapping, which keeps the order total and monotonic.
fn successor((physical, logical): (u64, u32)) -> (u64, u32) {
    match logical.checked_add(1) {
        Some(next) => (physical, next),
        None => (physical.saturating_add(1), 0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: NodeId = NodeId(1);
    const B: NodeId = NodeId(2);

    #[test]
    fn stamps_follow_physical_time_when_it_advances() {
        let mut clock = HlcClock::new(A, DEFAULT_MAX_OFFSET_MICROS);
        assert_eq!(clock.now(100), Hlc::new(100, 0, A));
        assert_eq!(clock.now(250), Hlc::new(250, 0, A));
    }

    #[test]
    fn stamps_increase_when_physical_time_stands_still_or_steps_back() {
        let mut clock = HlcClock::new(A, DEFAULT_MAX_OFFSET_MICROS);
        let first = clock.now(1_000);
        let same = clock.now(1_000);
        let back = clock.now(10);
        assert!(first < same && same < back);
        assert_eq!(back, Hlc::new(1_000, 2, A));
    }

    #[test]
    fn node_id_breaks_ties() {
        assert!(Hlc::new(5, 1, A) < Hlc::new(5, 1, B));
        assert!(Hlc::new(5, 1, B) < Hlc::new(5, 2, A));
    }

    #[test]
    fn update_moves_local_stamps_past_the_remote_one() {
        let mut clock = HlcClock::new(A, DEFAULT_MAX_OFFSET_MICROS);
        clock.now(1_000);
        let remote = Hlc::new(1_200, 7, B);
        clock.update(remote, 1_000).unwrap();
        let next = clock.now(1_000);
        assert!(next > remote);
        assert_eq!(next, Hlc::new(1_200, 8, A));
    }

    #[test]
    fn update_refuses_a_stamp_beyond_the_max_offset_and_keeps_the_clock() {
        let mut clock = HlcClock::new(A, 500);
        clock.now(1_000);
        let err = clock.update(Hlc::new(1_501, 0, B), 1_000).unwrap_err();
        assert_eq!(
            err,
            ClockError::AheadOfMaxOffset {
                remote: Hlc::new(1_501, 0, B),
                ahead_micros: 501,
                max_offset_micros: 500
            }
        );
        assert!(err.to_string().contains("node 2"));
        assert_eq!(clock.high_water(), Hlc::new(1_000, 0, A));
        clock.update(Hlc::new(1_500, 0, B), 1_000).unwrap();
    }

    #[test]
    fn restore_never_goes_back_even_when_the_wall_clock_did() {
        let mut clock = HlcClock::new(A, DEFAULT_MAX_OFFSET_MICROS);
        let before = clock.now(9_000);
        let mark = clock.high_water();
        let mut restarted = HlcClock::restore_for(A, mark, DEFAULT_MAX_OFFSET_MICROS).unwrap();
        assert!(restarted.now(1) > before);
    }

    #[test]
    fn restore_refuses_another_nodes_mark() {
        let err = HlcClock::restore_for(A, Hlc::zero(B), 1).unwrap_err();
        assert_eq!(err, ClockError::WrongNode { expected: A, found: B });
    }

    #[test]
    fn exhausted_logical_counter_carries_into_physical() {
        let mut clock = HlcClock::restore(Hlc::new(7, u32::MAX, A), 1);
        assert_eq!(clock.now(0), Hlc::new(8, 0, A));
    }
}
