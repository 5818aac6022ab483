//! Shrinking a failing run: fewer operations, fewer fault kinds, fewer nodes, for as long as the
//! run still breaks the same invariant. Every candidate is a full, deterministic run, so the
//! smallest one found is itself a reproducer.

use crate::config::SimConfig;
use crate::outcome::Failure;
use crate::runner::run_seed;

#[derive(Debug, Clone)]
pub struct Shrunk {
    pub config: SimConfig,
    pub failure: Failure,
    /// Runs tried.
    pub runs: usize,
}

/// Minimises `config`, which failed with `failure`. `budget` bounds the number of runs.
pub fn shrink(config: &SimConfig, failure: &Failure, budget: usize) -> Shrunk {
    let target = failure.invariant;
    let mut best = Shrunk {
        config: config.clone(),
        failure: failure.clone(),
        runs: 0,
    };
    let attempt = |candidate: &SimConfig, best: &mut Shrunk| -> bool {
        if best.runs >= budget {
            return false;
        }
        best.runs += 1;
        match run_seed(candidate).failure {
            Some(f) if f.invariant == target => {
                best.config = candidate.clone();
                best.failure = f;
                true
            }
            _ => false,
        }
    };
    // Each round: fewer operations, then (except in the last) fewer faults and nodes, since a
    // shorter run may no longer need a fault that a longer one did, and the other way round.
    for round in 0..3 {
        // Fewer operations: bisect between a passing count and the failing one.
        let (mut lo, mut hi) = (0u64, best.config.ops);
        while hi - lo > 1 && best.runs < budget {
            let mid = lo + (hi - lo) / 2;
            let mut candidate = best.config.clone();
            candidate.ops = mid;
            if attempt(&candidate, &mut best) {
                hi = mid;
            } else {
                lo = mid;
            }
        }
        if round == 2 {
            break;
        }
        // Fewer fault kinds, one at a time.
        for kind in best.config.faults.kinds().collect::<Vec<_>>() {
            let mut candidate = best.config.clone();
            candidate.faults = candidate.faults.without(kind);
            attempt(&candidate, &mut best);
        }
        // Fewer nodes, as far as the run's join and leave allow.
        while best.config.nodes > 2 && best.config.nodes > least_nodes(&best.config) {
            let mut candidate = best.config.clone();
            candidate.nodes -= 1;
            if !attempt(&candidate, &mut best) {
                break;
            }
        }
    }
    best
}

/// The fewest nodes a run can have: two, and one more for a leave, one more for a join.
fn least_nodes(config: &SimConfig) -> usize {
    if config.leave {
        3 + usize::from(config.join)
    } else {
        2
    }
}
