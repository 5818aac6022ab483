//! Who is in the cluster: a state-based CRDT every node keeps, persists and gossips whole.
//!
//! Each node id has one entry: its state (`Joining` < `Active` < `Left`), the address peers dial,
//! and the stamp of the write that set them. Two entries of one node merge to the greater of
//! (state, stamp, address): a state only moves forward, so `Left` is final (a node id is never
//! reused), and a later address replaces an earlier one. Merging is commutative, associative and
//! idempotent, so every node that has heard the same entries holds the same membership, whatever
//! the order of the gossip.
//!
//! Besides its own view, a node remembers what each peer last said it holds (`views`): a peer
//! sends its membership only after persisting it, so a view is what survives the peer's crash.
//! [`Membership::not_known_by`] tells from those views which live peers have not learned an
//! entry yet; `accord join` waits until every node knows the joining node before it reads the
//! donor's positions (see ARCHITECTURE.md, "Membership").

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::hlc::{Hlc, NodeId};

/// Where a node stands. The order is the order a node goes through, and the merge's.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum MemberState {
    /// Registered by `accord join`, copying its data; already takes part in tombstone-collection
    /// rounds (which wait for it) and peers keep their outbound logs for it.
    Joining,
    Active,
    /// Gone for good: peers dropped its links, rounds go on without it.
    Left,
}

impl MemberState {
    pub fn as_str(self) -> &'static str {
        match self {
            MemberState::Joining => "joining",
            MemberState::Active => "active",
            MemberState::Left => "left",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        match text {
            "joining" => Some(MemberState::Joining),
            "active" => Some(MemberState::Active),
            "left" => Some(MemberState::Left),
            _ => None,
        }
    }
}

impl std::fmt::Display for MemberState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One node's entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    pub node: NodeId,
    pub state: MemberState,
    /// `host:port` of its QUIC endpoint; empty when unknown (a node listed in a configuration
    /// knows its peers' addresses from there).
    pub address: String,
    /// When the entry was written; zero for entries taken from a configuration file.
    pub stamp: Hlc,
}

impl Member {
    /// Whether this entry wins over `other`, an entry of the same node.
    pub fn supersedes(&self, other: &Member) -> bool {
        (self.state, self.stamp, &self.address) > (other.state, other.stamp, &other.address)
    }
}

/// One node's membership, with what its peers last said they hold.
#[derive(Debug, Clone)]
pub struct Membership {
    me: NodeId,
    members: BTreeMap<NodeId, Member>,
    /// Per peer: the state of every entry in the membership it last sent.
    views: BTreeMap<NodeId, BTreeMap<NodeId, MemberState>>,
}

impl Membership {
    pub fn new(me: NodeId, members: impl IntoIterator<Item = Member>) -> Self {
        let mut membership = Membership {
            me,
            members: BTreeMap::new(),
            views: BTreeMap::new(),
        };
        for member in members {
            membership.absorb(member);
        }
        membership
    }

    pub fn me(&self) -> NodeId {
        self.me
    }

    /// Every entry, by node id.
    pub fn members(&self) -> impl Iterator<Item = &Member> + '_ {
        self.members.values()
    }

    /// The entries, as sent to peers.
    pub fn to_vec(&self) -> Vec<Member> {
        self.members.values().cloned().collect()
    }

    pub fn get(&self, node: NodeId) -> Option<&Member> {
        self.members.get(&node)
    }

    pub fn state_of(&self, node: NodeId) -> Option<MemberState> {
        self.members.get(&node).map(|m| m.state)
    }

    /// Nodes that have not left, this one included, sorted.
    pub fn live(&self) -> Vec<NodeId> {
        self.members
            .values()
            .filter(|m| m.state != MemberState::Left)
            .map(|m| m.node)
            .collect()
    }

    /// Other nodes that have not left: the peers this node keeps links to.
    pub fn live_peers(&self) -> Vec<&Member> {
        self.members
            .values()
            .filter(|m| m.state != MemberState::Left && m.node != self.me)
            .collect()
    }

    /// Whether this node has left the cluster.
    pub fn has_left(&self) -> bool {
        self.state_of(self.me) == Some(MemberState::Left)
    }

    /// Merges one entry; returns whether it changed anything.
    pub fn absorb(&mut self, member: Member) -> bool {
        match self.members.get(&member.node) {
            Some(current) if !member.supersedes(current) => false,
            _ => {
                self.members.insert(member.node, member);
                true
            }
        }
    }

    /// Merges what `peer` sent, and remembers it as the peer's view. Returns the nodes whose entry
    /// changed here.
    pub fn merge_from(&mut self, peer: NodeId, theirs: &[Member]) -> Vec<NodeId> {
        self.views
            .insert(peer, theirs.iter().map(|m| (m.node, m.state)).collect());
        theirs
            .iter()
            .filter(|m| self.absorb((*m).clone()))
            .map(|m| m.node)
            .collect()
    }

    /// Forgets a peer's view (it restarted or left; it sends its membership again on connecting).
    pub fn forget_view(&mut self, peer: NodeId) {
        self.views.remove(&peer);
    }

    /// The live peers (besides `node` itself) that have not said they hold `node`'s entry at its
    /// state here or later, sorted. Empty: every live node knows it.
    pub fn not_known_by(&self, node: NodeId) -> Vec<NodeId> {
        let Some(state) = self.state_of(node) else {
            return Vec::new();
        };
        self.live_peers()
            .into_iter()
            .map(|m| m.node)
            .filter(|&peer| peer != node)
            .filter(|peer| {
                self.views
                    .get(peer)
                    .and_then(|view| view.get(&node))
                    .is_none_or(|&theirs| theirs < state)
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: NodeId = NodeId(1);
    const B: NodeId = NodeId(2);
    const C: NodeId = NodeId(3);
    const D: NodeId = NodeId(4);

    fn member(node: NodeId, state: MemberState, address: &str, physical: u64) -> Member {
        Member {
            node,
            state,
            address: address.into(),
            stamp: Hlc::new(physical, 0, A),
        }
    }

    #[test]
    fn entries_merge_to_the_same_membership_in_any_order() {
        let entries = [
            member(D, MemberState::Joining, "d:1", 5),
            member(D, MemberState::Active, "d:1", 6),
            member(D, MemberState::Joining, "d:2", 9),
            member(B, MemberState::Active, "", 0),
            member(B, MemberState::Active, "b:1", 0),
        ];
        let forward = Membership::new(A, entries.clone());
        let backward = Membership::new(A, entries.iter().rev().cloned());
        assert_eq!(forward.to_vec(), backward.to_vec());
        assert_eq!(
            forward.state_of(D),
            Some(MemberState::Active),
            "a state never goes back"
        );
        assert_eq!(forward.get(B).map(|m| m.address.as_str()), Some("b:1"));
    }

    #[test]
    fn left_is_final() {
        let mut m = Membership::new(
            A,
            [
                member(A, MemberState::Active, "", 0),
                member(C, MemberState::Left, "", 1),
            ],
        );
        assert!(!m.absorb(member(C, MemberState::Active, "c:1", 99)));
        assert_eq!(m.live(), vec![A]);
        assert!(m.live_peers().is_empty());
    }

    #[test]
    fn a_joining_node_is_known_once_every_live_peer_said_so() {
        let mut m = Membership::new(
            A,
            [
                member(A, MemberState::Active, "", 0),
                member(B, MemberState::Active, "", 0),
                member(C, MemberState::Active, "", 0),
            ],
        );
        m.absorb(member(D, MemberState::Joining, "d:1", 5));
        assert_eq!(m.not_known_by(D), vec![B, C]);
        m.merge_from(B, &m.to_vec());
        assert_eq!(m.not_known_by(D), vec![C]);
        let stale: Vec<Member> = m.to_vec().into_iter().filter(|e| e.node != D).collect();
        m.merge_from(C, &stale);
        assert_eq!(m.not_known_by(D), vec![C]);
        m.absorb(member(C, MemberState::Left, "", 7));
        assert!(m.not_known_by(D).is_empty(), "a node that left is not waited for");
    }
}
