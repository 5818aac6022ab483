//! A node leaving the running cluster (`SimConfig::leave`), as `accord leave` does it: during
//! the workload a node stops taking local writes, hands every change it captured to every peer
//! (its capture has read its WAL, every live peer acknowledged its outbound head), and then
//! either marks itself `left` and stops once its peers heard it (leaving by itself), or dies and
//! is marked `left` through another node (removed). Every node then drops its link and applier,
//! and collection rounds go on without it; a round in progress that waits for it is given up.
//! The node that left is not checked at the end (it holds the cluster's state up to its leave
//! only); every other must converge with the sums of every write, the leaver's included.

use accord_engine::{Hlc, Member, MemberState};

use super::{EventKind, World};
use crate::config::PlantedBug;
use crate::node::peer_id;
use crate::outcome::Failure;

/// How long a node that marked itself `left` waits for its peers to hear it before it stops.
const LEAVE_GRACE: u64 = 2_000_000;

#[derive(Debug)]
pub(super) struct LeaveRun {
    node: usize,
    /// It leaves by itself; otherwise it dies and another node removes it.
    by_itself: bool,
    phase: Phase,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Handing its changes over.
    Draining,
    /// Marked `left` by itself, at this moment: it stops once its peers know.
    Marked(u64),
    Done,
}

impl World {
    /// Schedules the leave's first step at a moment of the workload.
    pub(super) fn plan_leave(&mut self) {
        let span = (self.cfg.ops as f64 * self.params.op_gap_mean) as u64;
        let at = self.now + span / 4 + self.rng_leave.below(span / 2 + 1);
        self.push(at, EventKind::LeaveStep);
    }

    fn next_leave_step(&mut self) {
        let at = self.now + self.rng_leave.range(1_000, 50_000);
        self.push(at, EventKind::LeaveStep);
    }

    /// One step of the leave: choose the node, wait for its handover, mark it, stop it.
    pub(super) fn leave_step(&mut self) -> Result<(), Failure> {
        let run = match self.leave.take() {
            Some(run) => run,
            None => {
                // A founding node that is not a join's donor (the join reads it to the end).
                let donor = self.join_donor();
                let candidates: Vec<usize> = (0..self.nodes.len())
                    .filter(|&n| !self.nodes[n].awaiting_join && Some(n) != donor && !self.is_joiner(n))
                    .collect();
                let node = candidates[self.rng_leave.index(candidates.len())];
                self.nodes[node].leaving = true;
                self.stats.leaves += 1;
                LeaveRun {
                    node,
                    by_itself: self.rng_leave.chance(0.5),
                    phase: Phase::Draining,
                }
            }
        };
        let run = self.leave_phase(run)?;
        let done = run.phase == Phase::Done;
        self.leave = Some(run);
        if !done {
            self.next_leave_step();
        }
        Ok(())
    }

    fn leave_phase(&mut self, mut run: LeaveRun) -> Result<LeaveRun, Failure> {
        let l = run.node;
        match run.phase {
            Phase::Draining => {
                let skip = self.cfg.bug == Some(PlantedBug::LeaveWithoutHandover);
                if !(self.nodes[l].handed_over() || skip && self.nodes[l].is_up()) {
                    return Ok(run);
                }
                let entry = Member {
                    node: peer_id(l),
                    state: MemberState::Left,
                    address: String::new(),
                    stamp: Hlc::new(self.now, 0, peer_id(l)),
                };
                if run.by_itself {
                    self.nodes[l].membership.absorb(entry);
                    self.with_node(l, |n, ctx| n.members_changed(ctx))?;
                    run.phase = Phase::Marked(self.now);
                } else {
                    // It dies, and a running node removes it.
                    let Some(by) = (0..self.nodes.len())
                        .find(|&n| n != l && self.nodes[n].is_up() && !self.nodes[n].leaving && !self.is_joiner(n))
                    else {
                        return Ok(run);
                    };
                    self.gone(l);
                    self.nodes[by].membership.absorb(entry);
                    self.with_node(by, |n, ctx| n.members_changed(ctx))?;
                    run.phase = Phase::Done;
                }
            }
            Phase::Marked(at) => {
                let heard = self.nodes[l].membership.not_known_by(peer_id(l)).is_empty();
                if heard || self.now >= at + LEAVE_GRACE {
                    self.gone(l);
                    run.phase = Phase::Done;
                }
            }
            Phase::Done => {}
        }
        Ok(run)
    }

    /// The node stops for good.
    fn gone(&mut self, node: usize) {
        self.crash(node, false);
        self.nodes[node].gone = true;
        self.stats.left_at = self.now - super::EPOCH;
    }

    fn is_joiner(&self, node: usize) -> bool {
        self.cfg.join && node == self.joiner()
    }
}
