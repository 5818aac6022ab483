//! What a node may acknowledge of one peer's changes, and when its applier learns it.
//!
//! Apply transactions commit with `synchronous_commit = off` (as PostgreSQL's own subscriptions
//! do): a committed apply can still vanish in a crash of the database's machine, its origin
//! position with it. A peer prunes its outbound log by acknowledgements and resumes from hellos,
//! so both may carry only the *durable* position; acknowledging a committed one would let the
//! peer drop changes this node then loses for good.

use crate::apply::PlantedBug;

/// One peer's applied positions on this node: committed, and on disk.
#[derive(Debug, Clone)]
pub struct AppliedPosition {
    committed: u64,
    durable: u64,
    last_flush: Option<u64>,
    flush_every_micros: u64,
    ack_committed: bool,
    /// A flush is under way (the driver runs it beside the next batches).
    flushing: bool,
    /// A batch that called for a flush committed while one was under way: the next one starts
    /// as that one reports.
    flush_wanted: bool,
}

/// How often a busy applier flushes to learn its durable position (an idle one does after every
/// batch): the lag of acknowledgements against the cost of a WAL flush.
const FLUSH_EVERY_MICROS: u64 = 100_000;

impl AppliedPosition {
    /// `durable`: the position on disk when the applier started (it flushes when it binds).
    pub fn new(durable: u64, planted: Option<PlantedBug>) -> Self {
        AppliedPosition {
            committed: durable,
            durable,
            last_flush: None,
            flush_every_micros: FLUSH_EVERY_MICROS,
            ack_committed: planted == Some(PlantedBug::AckBeforeDurable),
            flushing: false,
            flush_wanted: false,
        }
    }

    /// A batch committed up to `applied` at `now` (µs, the driver's clock); `busy`: more
    /// batches wait. Whether the driver should start a flush now and report it with
    /// [`AppliedPosition::flushed`]. One flush runs at a time: a batch that calls for one while
    /// one is under way has it started when that one reports.
    pub fn committed(&mut self, applied: u64, busy: bool, now: u64) -> bool {
        self.committed = self.committed.max(applied);
        let due = !busy
            || self
                .last_flush
                .is_none_or(|at| now.saturating_sub(at) >= self.flush_every_micros);
        if !due {
            return false;
        }
        if self.flushing {
            self.flush_wanted = true;
            return false;
        }
        self.flushing = true;
        true
    }

    /// The database's WAL is flushed past the peer's changes up to `durable` (what the flush
    /// read of the position is on disk). Whether the driver should start another flush now: a
    /// batch committed since that one started called for it.
    pub fn flushed(&mut self, durable: u64, now: u64) -> bool {
        self.durable = self.durable.max(durable.min(self.committed));
        self.last_flush = Some(now);
        self.flushing = false;
        self.flush_wanted && {
            self.flush_wanted = false;
            self.flushing = true;
            true
        }
    }

    /// The flush under way failed: none is now; the next batch that calls for one starts it.
    pub fn flush_failed(&mut self) {
        self.flushing = false;
        self.flush_wanted = false;
    }

    /// What acknowledgements, hellos and collection rounds may say is applied: what is on disk.
    pub fn acknowledgeable(&self) -> u64 {
        if self.ack_committed {
            self.committed
        } else {
            self.durable
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_flushed_positions_are_acknowledged() {
        let mut p = AppliedPosition::new(5, None);
        assert!(p.committed(9, true, 0), "the first batch flushes");
        p.flushed(9, 0);
        assert!(!p.committed(12, true, 50_000), "busy, and flushed 50 ms ago");
        assert_eq!(p.acknowledgeable(), 9);
        assert!(p.committed(14, false, 60_000), "idle: flush");
        p.flushed(14, 60_000);
        assert_eq!(p.acknowledgeable(), 14);
        assert!(p.committed(20, true, 160_000), "busy, but 100 ms since the last flush");
    }

    #[test]
    fn one_flush_runs_at_a_time_and_a_batch_during_it_calls_for_the_next() {
        let mut p = AppliedPosition::new(0, None);
        assert!(p.committed(4, false, 0), "idle: flush");
        assert!(!p.committed(7, false, 10), "a flush is under way: no second one");
        assert!(!p.committed(9, false, 20));
        // The first flush read the position at 4: only that is on disk.
        assert!(p.flushed(4, 30), "batches committed during it called for another");
        assert_eq!(p.acknowledgeable(), 4);
        assert!(!p.flushed(9, 40), "nothing committed during the second");
        assert_eq!(p.acknowledgeable(), 9);
        assert!(p.committed(11, false, 50), "none under way: flush");
        p.flush_failed();
        assert_eq!(p.acknowledgeable(), 9, "a failed flush acknowledges nothing more");
        assert!(p.committed(12, false, 60), "after a failure the next batch flushes");
    }

    #[test]
    fn a_flush_never_acknowledges_beyond_what_committed() {
        let mut p = AppliedPosition::new(0, None);
        p.committed(3, false, 0);
        p.flushed(10, 0);
        assert_eq!(p.acknowledgeable(), 3);
    }
}
