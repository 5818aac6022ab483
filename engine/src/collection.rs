//! Tombstone collection: when a deleted row's metadata may be dropped.
//!
//! A tombstone keeps a late change from bringing a deleted row back, and tells the node that
//! re-inserts the key which causal length comes next. Dropping it is safe once no change written
//! before the delete can still arrive anywhere, and once every node treats the key the same way.
//! The cluster agrees on that in *rounds*, each in two phases, driven by the node with the
//! lowest id (the coordinator):
//!
//! 1. Every node acknowledges the round with [`Ack1`]: the head of its own outbound log and how
//!    far it had durably applied every other node's changes, at that moment.
//! 2. Once a node knows every `Ack1`, it waits until it has applied every node's changes up to that
//!    node's head, then acknowledges phase 2.
//!
//! When every node has acknowledged phase 2 the round is complete: its [`StableCut`] says, per
//! origin, up to which change every node had applied that origin's changes in phase 1. A
//! tombstone whose deletes all lie below the cut ([`StableCut::covers`]) is then final on every
//! node: every node had applied the deletes before acknowledging, so its later writes to the key
//! can only be re-inserts; every write acknowledged before phase 1 has been applied everywhere
//! (phase 2). From then on a node treats a covered tombstone exactly as a key it never knew (in
//! its capture and its merges) and may delete it. The cut is a fact about the past, so a node may
//! adopt it from any peer, and it travels ahead of the changes that depend on it.
//!
//! What remains: a node that does not know the cut yet numbers a re-insert of the key from its
//! tombstone (causal length + 1), a node that does numbers it as a new key (1). Two such inserts
//! made at the same time on two nodes do not merge column by column: the higher causal length
//! wins the row, as if a delete had come between them, and the conflict log records it. That
//! window lasts from the round's completion until every node heard of it.

use serde::{Deserialize, Serialize};

use crate::hlc::NodeId;
use crate::state::RowMeta;

/// A node's phase-1 acknowledgement of a round.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ack1 {
    /// The last sequence number of the node's own outbound log.
    pub head: u64,
    /// Per other node, the last of its changes this node had durably applied.
    pub applied: Vec<(NodeId, u64)>,
}

/// A completed round: per origin, the last change every node had applied in phase 1.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StableCut {
    pub round: u64,
    /// Sorted by origin.
    pub stable: Vec<(NodeId, u64)>,
}

impl StableCut {
    /// The last change of `origin` that every node had applied.
    pub fn stable_for(&self, origin: NodeId) -> u64 {
        self.stable
            .binary_search_by_key(&origin, |(o, _)| *o)
            .map(|i| self.stable[i].1)
            .unwrap_or(0)
    }

    /// Whether `meta` is a tombstone every node had when the round was acknowledged. Such a
    /// tombstone is as good as absent, and may be deleted.
    pub fn covers(&self, meta: &RowMeta) -> bool {
        meta.causal_length > 0
            && !meta.is_alive()
            // Tombstones written before deletes were recorded cannot be proven final.
            && !meta.deleted_by.is_empty()
            && meta.deleted_by.iter().all(|&(origin, seq)| seq <= self.stable_for(origin))
    }

    /// `meta` unless the cut covers it: what the capture and the merge go by.
    pub fn live<'a>(cut: Option<&StableCut>, meta: Option<&'a RowMeta>) -> Option<&'a RowMeta> {
        match (cut, meta) {
            (Some(cut), Some(m)) if cut.covers(m) => None,
            _ => meta,
        }
    }
}

/// What one node knows of the collection rounds; nodes exchange it whole, and persist it before
/// they send it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct CollectionState {
    /// The current round (0: none started).
    pub round: u64,
    /// Phase-1 acknowledgements of the current round, sorted by node.
    pub acks1: Vec<(NodeId, Ack1)>,
    /// Nodes that acknowledged phase 2 of the current round, sorted.
    pub acks2: Vec<NodeId>,
    /// The latest completed round.
    pub cut: Option<StableCut>,
    /// The nodes the current round waits for, sorted: the live members the coordinator knew when
    /// it started it. Empty in states written before membership changed at run time: then the
    /// members each node knows.
    #[serde(default)]
    pub participants: Vec<NodeId>,
}

/// One node's part in the collection rounds.
#[derive(Debug, Clone)]
pub struct Collector {
    me: NodeId,
    /// Every live node of the cluster this node knows of (joining ones too), this one included,
    /// sorted.
    members: Vec<NodeId>,
    state: CollectionState,
}

impl Collector {
    /// `peers`: every other live node of the cluster. `state`: what this node persisted.
    pub fn new(me: NodeId, peers: impl IntoIterator<Item = NodeId>, state: CollectionState) -> Self {
        let mut collector = Collector {
            me,
            members: Vec::new(),
            state,
        };
        collector.set_peers(peers);
        collector
    }

    /// The live nodes changed (one joined or left). A node never acknowledges a round that leaves
    /// out a live node it knows: a joining node's copy may still lack a delete the round would
    /// call final, and once it runs its writes must wait for the round as everyone's do. A round
    /// started without it cannot complete once every node knows it, so the coordinator starts
    /// another (`start_round`).
    pub fn set_peers(&mut self, peers: impl IntoIterator<Item = NodeId>) {
        let mut members: Vec<NodeId> = peers.into_iter().chain([self.me]).collect();
        members.sort();
        members.dedup();
        self.members = members;
        self.complete_if_done();
    }

    /// The nodes the current round waits for.
    pub fn participants(&self) -> &[NodeId] {
        if self.state.participants.is_empty() {
            &self.members
        } else {
            &self.state.participants
        }
    }

    /// Whether this node may acknowledge the current round: it takes part, and the round waits for
    /// every live node this node knows.
    fn may_acknowledge(&self) -> bool {
        let participants = self.participants();
        participants.contains(&self.me) && self.members.iter().all(|m| participants.contains(m))
    }

    pub fn state(&self) -> &CollectionState {
        &self.state
    }

    pub fn cut(&self) -> Option<&StableCut> {
        self.state.cut.as_ref()
    }

    /// The node that starts rounds: the one with the lowest id.
    pub fn is_coordinator(&self) -> bool {
        self.members.first() == Some(&self.me)
    }

    /// The coordinator starts the next round once the current one completed. Returns whether it
    /// started one (the state changed).
    /// A round whose participants are not the live members (one joined or left since it started)
    /// is given up and the next one started at once: it could never complete, or would wait for
    /// a node that left.
    pub fn start_round(&mut self) -> bool {
        let current_done =
            self.state.round == 0 || self.state.cut.as_ref().is_some_and(|c| c.round == self.state.round);
        if !self.is_coordinator() || !(current_done || self.is_stale()) {
            return false;
        }
        self.state.round += 1;
        self.state.acks1.clear();
        self.state.acks2.clear();
        self.state.participants = self.members.clone();
        true
    }

    /// The current round, unfinished, does not wait for exactly the live members.
    pub fn is_stale(&self) -> bool {
        self.state.round > 0 && !self.is_complete() && self.participants() != self.members.as_slice()
    }

    /// Merges what a peer knows. Acknowledgements from nodes outside the cluster are ignored.
    /// Returns whether this node's state changed.
    pub fn merge(&mut self, theirs: &CollectionState) -> bool {
        let before = self.state.clone();
        if theirs.round > self.state.round {
            self.state.round = theirs.round;
            self.state.acks1.clear();
            self.state.acks2.clear();
            self.state.participants = theirs.participants.clone();
        }
        if theirs.round == self.state.round {
            if self.state.participants.is_empty() && !theirs.participants.is_empty() {
                self.state.participants = theirs.participants.clone();
            }
            let participants = self.participants().to_vec();
            for (node, ack) in &theirs.acks1 {
                if participants.contains(node) {
                    if let Err(i) = self.state.acks1.binary_search_by_key(node, |(n, _)| *n) {
                        self.state.acks1.insert(i, (*node, ack.clone()));
                    }
                }
            }
            for node in &theirs.acks2 {
                if participants.contains(node) {
                    if let Err(i) = self.state.acks2.binary_search(node) {
                        self.state.acks2.insert(i, *node);
                    }
                }
            }
        }
        if let Some(cut) = &theirs.cut {
            if self.state.cut.as_ref().is_none_or(|ours| cut.round > ours.round) {
                self.state.cut = Some(cut.clone());
            }
        }
        self.complete_if_done();
        self.state != before
    }

    /// Whether this node still has to acknowledge phase 1 of the current round.
    pub fn wants_ack1(&self) -> bool {
        self.state.round > 0
            && !self.is_complete()
            && self.may_acknowledge()
            && self.state.acks1.binary_search_by_key(&self.me, |(n, _)| *n).is_err()
    }

    /// Acknowledges phase 1: `head` is this node's outbound head, `applied` its durably applied
    /// position per peer, both read now (applied first).
    pub fn ack1(&mut self, head: u64, applied: &[(NodeId, u64)]) {
        if !self.wants_ack1() {
            return;
        }
        let mut applied: Vec<(NodeId, u64)> = applied.iter().copied().filter(|(n, _)| *n != self.me).collect();
        applied.sort();
        applied.dedup_by_key(|(n, _)| *n);
        let me = self.me;
        if let Err(i) = self.state.acks1.binary_search_by_key(&me, |(n, _)| *n) {
            self.state.acks1.insert(i, (me, Ack1 { head, applied }));
        }
        self.complete_if_done();
    }

    /// Once every node acknowledged phase 1: the head each acknowledged, which this node must
    /// apply up to before it acknowledges phase 2.
    pub fn heads(&self) -> Option<Vec<(NodeId, u64)>> {
        let participants = self.participants();
        if !participants
            .iter()
            .all(|p| self.state.acks1.binary_search_by_key(p, |(n, _)| *n).is_ok())
        {
            return None;
        }
        Some(self.state.acks1.iter().map(|(n, a)| (*n, a.head)).collect())
    }

    /// Whether this node may acknowledge phase 2 now, given how far it has durably applied each
    /// peer's changes.
    pub fn wants_ack2(&self, applied: &[(NodeId, u64)]) -> bool {
        let Some(heads) = self.heads() else { return false };
        if self.is_complete() || !self.may_acknowledge() || self.state.acks2.binary_search(&self.me).is_ok() {
            return false;
        }
        heads.iter().filter(|(n, _)| *n != self.me).all(|(n, head)| {
            applied
                .iter()
                .find(|(p, _)| p == n)
                .is_some_and(|(_, position)| position >= head)
        })
    }

    /// Acknowledges phase 2 (the caller checked [`Collector::wants_ack2`]).
    pub fn ack2(&mut self) {
        if self.heads().is_none() || !self.may_acknowledge() {
            return;
        }
        if let Err(i) = self.state.acks2.binary_search(&self.me) {
            self.state.acks2.insert(i, self.me);
        }
        self.complete_if_done();
    }

    fn is_complete(&self) -> bool {
        self.state.cut.as_ref().is_some_and(|c| c.round >= self.state.round)
    }

    fn complete_if_done(&mut self) {
        if self.is_complete() || self.state.round == 0 {
            return;
        }
        let participants = self.participants().to_vec();
        let acked1 = |p: &NodeId| self.state.acks1.binary_search_by_key(p, |(n, _)| *n).is_ok();
        let acked2 = |p: &NodeId| self.state.acks2.binary_search(p).is_ok();
        if !participants.iter().all(|p| acked1(p) && acked2(p)) {
            return;
        }
        // Origins: the participants, and every node whose changes a participant reported
        // applying (one that left: its changes every participant had applied are final too; a
        // participant that did not report it counts as having applied none).
        let mut origins: Vec<NodeId> = participants.clone();
        for (_, ack) in &self.state.acks1 {
            origins.extend(ack.applied.iter().map(|(o, _)| *o));
        }
        origins.sort();
        origins.dedup();
        let stable = origins
            .into_iter()
            .map(|origin| {
                let floor = self
                    .state
                    .acks1
                    .iter()
                    .filter(|(node, _)| participants.contains(node))
                    .map(|(node, ack)| {
                        if *node == origin {
                            ack.head
                        } else {
                            ack.applied
                                .iter()
                                .find(|(o, _)| *o == origin)
                                .map(|(_, p)| *p)
                                .unwrap_or(0)
                        }
                    })
                    .min()
                    .unwrap_or(0);
                (origin, floor)
            })
            .collect();
        self.state.cut = Some(StableCut {
            round: self.state.round,
            stable,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: NodeId = NodeId(1);
    const B: NodeId = NodeId(2);
    const C: NodeId = NodeId(3);

    fn three() -> [Collector; 3] {
        [
            Collector::new(A, [B, C], CollectionState::default()),
            Collector::new(B, [A, C], CollectionState::default()),
            Collector::new(C, [A, B], CollectionState::default()),
        ]
    }

    fn gossip(nodes: &mut [Collector]) {
        for _ in 0..2 {
            for i in 0..nodes.len() {
                let state = nodes[i].state().clone();
                for (j, node) in nodes.iter_mut().enumerate() {
                    if i != j {
                        node.merge(&state);
                    }
                }
            }
        }
    }

    fn tombstone(deletes: &[(NodeId, u64)]) -> RowMeta {
        RowMeta {
            causal_length: 2,
            deleted_by: deletes.to_vec(),
            ..RowMeta::absent()
        }
    }

    #[test]
    fn only_the_coordinator_starts_and_only_after_the_last_round_completed() {
        let [mut a, mut b, _] = three();
        assert!(!b.start_round());
        assert!(a.start_round());
        assert!(!a.start_round(), "round 1 is not complete");
        b.merge(a.state());
        assert_eq!(b.state().round, 1);
        assert!(b.wants_ack1());
    }

    #[test]
    fn a_round_completes_with_the_least_applied_position_per_origin() {
        let mut nodes = three();
        nodes[0].start_round();
        gossip(&mut nodes);
        nodes[0].ack1(10, &[(B, 7), (C, 4)]);
        nodes[1].ack1(8, &[(A, 9), (C, 5)]);
        nodes[2].ack1(6, &[(A, 10), (B, 8)]);
        gossip(&mut nodes);
        assert_eq!(nodes[0].heads(), Some(vec![(A, 10), (B, 8), (C, 6)]));
        assert!(!nodes[0].wants_ack2(&[(B, 7), (C, 6)]), "B's head 8 is not applied yet");
        assert!(nodes[0].wants_ack2(&[(B, 8), (C, 6)]));
        for node in nodes.iter_mut() {
            node.ack2();
        }
        assert!(
            nodes[0].cut().is_none(),
            "phase 2 is known complete only through gossip"
        );
        gossip(&mut nodes);
        let cut = nodes[2].cut().expect("every node acknowledged both phases");
        // A: min(own head 10, B applied 9, C applied 10); B: min(8, 7, 8); C: min(6, 4, 5).
        assert_eq!(cut.stable, vec![(A, 9), (B, 7), (C, 4)]);
        assert!(cut.covers(&tombstone(&[(A, 9), (C, 4)])));
        assert!(
            !cut.covers(&tombstone(&[(A, 9), (C, 5)])),
            "C's delete 5 had not reached A"
        );
        assert!(!cut.covers(&tombstone(&[])), "a tombstone without its deletes is kept");
        let alive = RowMeta {
            causal_length: 3,
            ..RowMeta::absent()
        };
        assert!(!cut.covers(&alive));
        assert!(nodes[0].start_round(), "the next round may start");
    }

    #[test]
    fn acknowledgements_of_an_old_round_or_strangers_are_ignored() {
        let mut nodes = three();
        nodes[0].start_round();
        gossip(&mut nodes);
        let stale = nodes[1].state().clone();
        nodes[0].ack1(1, &[]);
        let mut forged = nodes[0].state().clone();
        forged.acks1.push((
            NodeId(99),
            Ack1 {
                head: 0,
                applied: vec![],
            },
        ));
        forged.acks2.push(NodeId(99));
        assert!(nodes[1].merge(&forged));
        assert_eq!(nodes[1].state().acks1.len(), 1, "node 99 is no member");
        assert!(!nodes[0].merge(&stale), "nothing new in an older state");
    }

    #[test]
    fn covered_tombstones_read_as_absent() {
        let cut = StableCut {
            round: 1,
            stable: vec![(A, 5)],
        };
        let gone = tombstone(&[(A, 5)]);
        let kept = tombstone(&[(A, 6)]);
        assert_eq!(StableCut::live(Some(&cut), Some(&gone)), None);
        assert_eq!(StableCut::live(Some(&cut), Some(&kept)), Some(&kept));
        assert_eq!(StableCut::live(None, Some(&gone)), Some(&gone));
    }

    #[test]
    fn a_round_that_leaves_out_a_known_node_is_not_acknowledged_and_is_started_again() {
        const D: NodeId = NodeId(4);
        let mut nodes = three();
        nodes[0].start_round();
        gossip(&mut nodes);
        // B learns of D joining before it acknowledged: it will not acknowledge a round without D.
        nodes[1].set_peers([A, C, D]);
        assert!(!nodes[1].wants_ack1());
        nodes[0].ack1(1, &[(B, 0), (C, 0)]);
        nodes[2].ack1(1, &[(A, 0), (B, 0)]);
        gossip(&mut nodes);
        assert!(nodes[0].heads().is_none(), "B never acknowledged");
        assert!(!nodes[0].start_round(), "A does not know D yet");
        nodes[0].set_peers([B, C, D]);
        assert!(nodes[0].is_stale());
        assert!(nodes[0].start_round(), "the round without D is given up");
        assert_eq!(nodes[0].participants(), &[A, B, C, D]);
        gossip(&mut nodes);
        assert_eq!(nodes[1].state().round, 2);
        assert!(nodes[1].wants_ack1());
        assert!(
            nodes[2].wants_ack1(),
            "a round that waits for more nodes than C knows is safe for C"
        );
    }

    #[test]
    fn after_a_node_left_rounds_go_on_without_it_and_its_deletes_become_final() {
        let mut nodes = three();
        let [a, b, _] = &mut nodes;
        a.set_peers([B]);
        b.set_peers([A]);
        let mut two = [a.clone(), b.clone()];
        assert!(two[0].start_round());
        gossip(&mut two);
        two[0].ack1(5, &[(B, 4), (C, 9)]);
        two[1].ack1(4, &[(A, 5), (C, 7)]);
        gossip(&mut two);
        assert!(two[0].wants_ack2(&[(B, 4), (C, 9)]));
        two[0].ack2();
        two[1].ack2();
        gossip(&mut two);
        let cut = two[0].cut().expect("A and B are every live node");
        assert_eq!(cut.stable, vec![(A, 5), (B, 4), (C, 7)]);
        assert!(cut.covers(&tombstone(&[(C, 7)])));
        assert!(!cut.covers(&tombstone(&[(C, 8)])), "B had not applied C's delete 8");
    }
}
