//! What a node sends to whom, and what it accepts: the replication links of one node, without I/O.
//!
//! Every node connects to every other (full mesh), and each origin's changes travel directly from
//! it. On one link a node is both a sender (of its own outbound log) and a receiver (of the
//! peer's). Exactly once rests on two durable positions per peer:
//! - `applied`: the last of the peer's sequence numbers this node applied. The service commits it
//!   in the same transaction as the applied changes (PostgreSQL replication origins), so a crash
//!   can't separate them. The hello tells the peer, which resends from the one after.
//! - `acked`: the last of this node's sequence numbers the peer said it applied. The outbound log
//!   is pruned up to the least `acked` over all peers, never further.
//!
//! A sender keeps at most `window` unacknowledged changes in flight per peer, so a slow receiver
//! slows the sender down instead of growing its memory.

use std::collections::BTreeMap;
use std::ops::RangeInclusive;

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::change::RowChange;
use crate::hlc::NodeId;
use crate::protocol::{check_offset, Refusal};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplicationConfig {
    /// Most changes in one batch message.
    pub max_batch: usize,
    /// Most changes sent to one peer and not yet acknowledged.
    pub window: u64,
    pub max_offset_micros: u64,
    /// How often the coordinator starts a tombstone-collection round (`collection`).
    #[serde(default = "default_tombstone_round_micros")]
    pub tombstone_round_micros: u64,
    /// How long a peer's transaction waits for a node that is not connected, when it builds on
    /// that node's changes not applied here yet (`RowChange::builds_on`). After that it is
    /// applied anyway: readers may then see part of the other node's transaction until it
    /// arrives, but replication between the nodes that are up goes on.
    #[serde(default = "default_causal_wait_micros")]
    pub causal_wait_micros: u64,
}

fn default_tombstone_round_micros() -> u64 {
    60_000_000
}

fn default_causal_wait_micros() -> u64 {
    10_000_000
}

/// A node's changes this node must apply before a change that builds on them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Dependency {
    pub node: NodeId,
    /// The last of the node's changes needed.
    pub through: u64,
    /// The node is connected now: its changes are on their way.
    pub connected: bool,
}

impl Default for ReplicationConfig {
    fn default() -> Self {
        ReplicationConfig {
            max_batch: 500,
            window: 10_000,
            max_offset_micros: crate::hlc::DEFAULT_MAX_OFFSET_MICROS,
            tombstone_round_micros: default_tombstone_round_micros(),
            causal_wait_micros: default_causal_wait_micros(),
        }
    }
}

/// Peers to add and remove to follow the membership (`Replication::membership_change`).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct MembershipChange {
    pub joined: Vec<NodeId>,
    pub left: Vec<NodeId>,
}

/// The durable positions of one peer, as the service stores them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct PeerProgress {
    /// The last of the peer's changes applied here.
    pub applied: u64,
    /// The last of this node's changes the peer acknowledged.
    pub acked: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ReplicationError {
    #[error("node {0} is not a configured peer")]
    UnknownPeer(NodeId),
    #[error("node {0} is not connected")]
    NotConnected(NodeId),
    #[error("node {peer} sent a change whose origin is node {origin}; a node only sends its own changes")]
    ForeignOrigin { peer: NodeId, origin: NodeId },
    #[error("node {peer} sent change {found} where {expected} was next")]
    Gap { peer: NodeId, expected: u64, found: u64 },
    #[error("node {peer} acknowledged change {acked}, but only {sent} were sent")]
    AckBeyondSent { peer: NodeId, acked: u64, sent: u64 },
    #[error(
        "node {peer} has applied this node's changes only up to {resume}, but the outbound log was pruned \
         up to {pruned}: the peer must be re-synchronised from a copy of the data"
    )]
    PrunedTooFar { peer: NodeId, resume: u64, pruned: u64 },
    #[error("refused node {peer}: {refusal}")]
    Refused { peer: NodeId, refusal: Refusal },
}

#[derive(Debug, Clone)]
struct Link {
    progress: PeerProgress,
    /// While connected: the last of our changes sent on this connection.
    sent: Option<u64>,
    /// The last of the peer's changes handed to apply (applied, or being applied).
    received: u64,
    /// The last change sent belongs to a transaction that ends at this one, later.
    open_until: Option<u64>,
}

/// The replication links of one node.
#[derive(Debug, Clone)]
pub struct Replication {
    node: NodeId,
    config: ReplicationConfig,
    /// The last sequence number in this node's outbound log.
    head: u64,
    /// The outbound log holds every change after this one.
    pruned: u64,
    links: BTreeMap<NodeId, Link>,
    /// The simulator's planted bug, if it lives here; the service never sets one.
    planted: Option<crate::apply::PlantedBug>,
}

impl Replication {
    /// Plants a bug (the simulator proves its checks catch it).
    pub fn plant(&mut self, bug: Option<crate::apply::PlantedBug>) {
        self.planted = bug;
    }

    pub fn new(
        node: NodeId,
        config: ReplicationConfig,
        head: u64,
        pruned: u64,
        peers: impl IntoIterator<Item = (NodeId, PeerProgress)>,
    ) -> Self {
        let links = peers
            .into_iter()
            .map(|(peer, progress)| {
                let link = Link {
                    progress,
                    sent: None,
                    received: progress.applied,
                    open_until: None,
                };
                (peer, link)
            })
            .collect();
        Replication {
            node,
            config,
            head,
            pruned,
            links,
            planted: None,
        }
    }

    pub fn node(&self) -> NodeId {
        self.node
    }

    pub fn config(&self) -> &ReplicationConfig {
        &self.config
    }

    pub fn peers(&self) -> impl Iterator<Item = NodeId> + '_ {
        self.links.keys().copied()
    }

    pub fn head(&self) -> u64 {
        self.head
    }

    pub fn progress(&self, peer: NodeId) -> Result<PeerProgress, ReplicationError> {
        Ok(self.link(peer)?.progress)
    }

    pub fn is_connected(&self, peer: NodeId) -> bool {
        self.links.get(&peer).is_some_and(|l| l.sent.is_some())
    }

    /// Changes of ours the peer has not acknowledged (the lag, in changes).
    pub fn unacked(&self, peer: NodeId) -> Result<u64, ReplicationError> {
        Ok(self.head - self.link(peer)?.progress.acked.min(self.head))
    }

    /// The capture appended to the outbound log up to `head`.
    pub fn logged(&mut self, head: u64) {
        self.head = self.head.max(head);
    }

    /// The outbound log may drop every change up to this one: all peers acknowledged them.
    pub fn prune_point(&self) -> u64 {
        self.links
            .values()
            .map(|l| l.progress.acked)
            .min()
            .unwrap_or(self.head)
            .min(self.head)
    }

    /// The service pruned the outbound log up to `upto`.
    pub fn pruned(&mut self, upto: u64) {
        self.pruned = self.pruned.max(upto.min(self.prune_point()));
    }

    /// Which of `live` (the membership's live peers) have no link yet, and which links belong to
    /// nodes no longer live: what following the membership adds and removes.
    pub fn membership_change(&self, live: &[NodeId]) -> MembershipChange {
        MembershipChange {
            joined: live.iter().copied().filter(|p| !self.links.contains_key(p)).collect(),
            left: self.links.keys().copied().filter(|p| !live.contains(p)).collect(),
        }
    }

    /// A node joined the cluster: it gets a link, not connected yet. The outbound log is kept
    /// for it from where it is pruned now, whatever `progress.acked` says (a new node's is 0):
    /// its join read positions only after every node knew of it, which are at or past this
    /// point, and its hello says what it really holds. Does nothing for a peer it has already.
    pub fn add_peer(&mut self, peer: NodeId, progress: PeerProgress) {
        if peer == self.node || self.links.contains_key(&peer) {
            return;
        }
        let progress = PeerProgress {
            applied: progress.applied,
            acked: progress.acked.max(self.pruned).min(self.head),
        };
        self.links.insert(
            peer,
            Link {
                progress,
                sent: None,
                received: progress.applied,
                open_until: None,
            },
        );
    }

    /// A node left the cluster: its link goes, and the outbound log no longer waits for it.
    pub fn remove_peer(&mut self, peer: NodeId) {
        self.links.remove(&peer);
    }

    /// A connection to `peer` passed the handshake; `applied_yours` is from the peer's hello.
    /// Sending resumes after it.
    pub fn connected(&mut self, peer: NodeId, applied_yours: u64) -> Result<(), ReplicationError> {
        let pruned = self.pruned;
        let head = self.head;
        let link = self.link_mut(peer)?;
        if applied_yours < pruned {
            return Err(ReplicationError::PrunedTooFar {
                peer,
                resume: applied_yours,
                pruned,
            });
        }
        // The peer's word is the truth about what it holds; it may even be behind what it once
        // acknowledged if its database was restored.
        link.progress.acked = applied_yours.min(head);
        link.sent = Some(link.progress.acked);
        link.received = link.progress.applied;
        link.open_until = None;
        Ok(())
    }

    pub fn disconnected(&mut self, peer: NodeId) {
        if let Some(link) = self.links.get_mut(&peer) {
            link.sent = None;
            link.received = link.progress.applied;
            link.open_until = None;
        }
    }

    /// The next range of our outbound log to send to `peer`, if the window allows; it counts as
    /// sent. The driver reads those changes from the log and sends them as one batch.
    pub fn next_batch(&mut self, peer: NodeId) -> Option<RangeInclusive<u64>> {
        let (head, config) = (self.head, self.config);
        let link = self.links.get_mut(&peer)?;
        let sent = link.sent?;
        let in_flight = sent - link.progress.acked;
        let mut room = config.window.saturating_sub(in_flight);
        if room == 0 {
            // The peer applies whole transactions only: a full window that ends inside one
            // would never be acknowledged. Send on to the transaction's end.
            if let Some(end) = link.open_until.filter(|&end| end > sent) {
                room = end - sent;
            }
        }
        let room = room.min(config.max_batch as u64);
        let last = head.min(sent + room);
        if last <= sent {
            return None;
        }
        link.sent = Some(last);
        Some(sent + 1..=last)
    }

    /// The last change of the batch just sent to `peer` belongs to a transaction whose last
    /// change is `tx_last` (`RowChange::tx_last`): if the window is full before it, sending goes
    /// on to it.
    pub fn sent_through(&mut self, peer: NodeId, tx_last: u64) {
        if let Some(link) = self.links.get_mut(&peer) {
            link.open_until = Some(tx_last);
        }
    }

    /// The peer acknowledged our changes up to `applied`.
    ///
    /// An acknowledgement may run ahead of what this connection sent: the peer can still be
    /// applying batches of an earlier connection after its hello named a lower position. It has
    /// those changes, so sending resumes after them. Beyond our log's head it is a protocol error.
    pub fn acked(&mut self, peer: NodeId, applied: u64) -> Result<(), ReplicationError> {
        let head = self.head;
        let link = self.link_mut(peer)?;
        let sent = link.sent.ok_or(ReplicationError::NotConnected(peer))?;
        if applied > head {
            return Err(ReplicationError::AckBeyondSent {
                peer,
                acked: applied,
                sent: head,
            });
        }
        link.progress.acked = link.progress.acked.max(applied);
        link.sent = Some(sent.max(applied));
        Ok(())
    }

    /// A batch of the peer's changes arrived. Returns the part to apply: changes already applied
    /// (a resend after a reconnect) are left out. A change not from the peer itself, a gap in the
    /// sequence, or a stamp beyond the clock offset is refused, and the connection must close.
    pub fn received<'a>(
        &mut self,
        peer: NodeId,
        batch: &'a [RowChange],
        physical: u64,
    ) -> Result<&'a [RowChange], ReplicationError> {
        let max_offset = self.config.max_offset_micros;
        let past_gaps = self.planted == Some(crate::apply::PlantedBug::ApplyPastGap);
        let link = self.link_mut(peer)?;
        if link.sent.is_none() {
            return Err(ReplicationError::NotConnected(peer));
        }
        let mut expected = link.received + 1;
        let mut skip = 0;
        for (i, change) in batch.iter().enumerate() {
            if change.origin != peer {
                return Err(ReplicationError::ForeignOrigin {
                    peer,
                    origin: change.origin,
                });
            }
            if change.seq < expected && skip == i {
                skip += 1;
                continue;
            }
            if change.seq > expected && past_gaps {
                expected = change.seq;
            }
            if change.seq != expected {
                return Err(ReplicationError::Gap {
                    peer,
                    expected,
                    found: change.seq,
                });
            }
            check_offset(peer, change.stamp, physical, max_offset)
                .map_err(|refusal| ReplicationError::Refused { peer, refusal })?;
            expected += 1;
        }
        link.received = expected - 1;
        Ok(&batch[skip..])
    }

    /// The apply transaction for the peer's changes up to `applied` committed: what follows it
    /// is expected next. (What is acknowledged is only what is on disk: `AppliedPosition`.)
    pub fn applied(&mut self, peer: NodeId, applied: u64) -> Result<(), ReplicationError> {
        let link = self.link_mut(peer)?;
        link.progress.applied = link.progress.applied.max(applied);
        link.received = link.received.max(link.progress.applied);
        Ok(())
    }

    /// What of `builds_on` (`RowChange::builds_on`) is not applied here yet. Positions of this
    /// node itself, and of nodes that are not peers (any more), need nothing.
    pub fn missing_dependencies<'a>(&'a self, builds_on: &'a [(NodeId, u64)]) -> impl Iterator<Item = Dependency> + 'a {
        builds_on.iter().filter_map(|&(node, through)| {
            let link = self.links.get(&node)?;
            (link.progress.applied < through).then_some(Dependency {
                node,
                through,
                connected: link.sent.is_some(),
            })
        })
    }

    fn link(&self, peer: NodeId) -> Result<&Link, ReplicationError> {
        self.links.get(&peer).ok_or(ReplicationError::UnknownPeer(peer))
    }

    fn link_mut(&mut self, peer: NodeId) -> Result<&mut Link, ReplicationError> {
        self.links.get_mut(&peer).ok_or(ReplicationError::UnknownPeer(peer))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::change::{ChangeKind, RowKey};
    use crate::hlc::Hlc;
    use crate::state::RowState;
    use crate::value::Value;

    const A: NodeId = NodeId(1);
    const B: NodeId = NodeId(2);

    fn config() -> ReplicationConfig {
        ReplicationConfig {
            max_batch: 3,
            window: 5,
            max_offset_micros: 500,
            ..ReplicationConfig::default()
        }
    }

    fn change(origin: NodeId, seq: u64) -> RowChange {
        RowChange {
            shape: None,
            table: "s.t".into(),
            key: RowKey(vec![Value::Int(seq as i64)]),
            kind: ChangeKind::Delete,
            origin,
            stamp: Hlc::new(1_000 + seq, 0, origin),
            seq,
            tx_last: seq,
            builds_on: Vec::new(),
            row: RowState::absent(),
            closures: Vec::new(),
        }
    }

    #[test]
    fn sending_respects_batch_size_and_window_and_resumes_from_the_peer() {
        let mut a = Replication::new(A, config(), 0, 0, [(B, PeerProgress::default())]);
        assert_eq!(a.next_batch(B), None, "not connected");
        a.logged(20);
        a.connected(B, 2).unwrap();
        assert_eq!(a.next_batch(B), Some(3..=5));
        assert_eq!(a.next_batch(B), Some(6..=7), "window of 5 unacked");
        assert_eq!(a.next_batch(B), None);
        a.acked(B, 6).unwrap();
        assert_eq!(a.next_batch(B), Some(8..=10));
        assert!(matches!(a.acked(B, 21), Err(ReplicationError::AckBeyondSent { .. })));
        // A late acknowledgement from batches of an earlier connection moves sending on.
        a.acked(B, 12).unwrap();
        assert_eq!(a.next_batch(B), Some(13..=15));
        a.acked(B, 10).unwrap();
        a.disconnected(B);
        a.connected(B, 9).unwrap();
        assert_eq!(
            a.next_batch(B),
            Some(10..=12),
            "resent from the peer's durable position"
        );
        assert_eq!(a.prune_point(), 9);
    }

    #[test]
    fn a_transaction_larger_than_the_window_is_sent_to_its_end() {
        let mut a = Replication::new(A, config(), 0, 0, [(B, PeerProgress::default())]);
        a.logged(15);
        a.connected(B, 0).unwrap();
        assert_eq!(a.next_batch(B), Some(1..=3));
        a.sent_through(B, 14);
        assert_eq!(a.next_batch(B), Some(4..=5), "window of 5 unacked");
        a.sent_through(B, 14);
        // The peer cannot acknowledge the transaction 3..=14 before it has all of it.
        assert_eq!(a.next_batch(B), Some(6..=8));
        assert_eq!(a.next_batch(B), Some(9..=11));
        assert_eq!(a.next_batch(B), Some(12..=14));
        a.sent_through(B, 14);
        assert_eq!(a.next_batch(B), None, "its end: the window holds again");
        a.acked(B, 14).unwrap();
        assert_eq!(a.next_batch(B), Some(15..=15));
    }

    #[test]
    fn receiving_skips_what_was_applied_and_refuses_gaps_and_foreign_changes() {
        let mut b = Replication::new(B, config(), 0, 0, [(A, PeerProgress { applied: 2, acked: 0 })]);
        b.connected(A, 0).unwrap();
        let batch = [change(A, 1), change(A, 2), change(A, 3), change(A, 4)];
        let to_apply = b.received(A, &batch, 1_000).unwrap();
        assert_eq!(to_apply.iter().map(|c| c.seq).collect::<Vec<_>>(), [3, 4]);
        b.applied(A, 4).unwrap();
        assert!(matches!(
            b.received(A, &[change(A, 6)], 1_000),
            Err(ReplicationError::Gap {
                expected: 5,
                found: 6,
                ..
            })
        ));
        assert!(matches!(
            b.received(A, &[change(B, 5)], 1_000),
            Err(ReplicationError::ForeignOrigin { .. })
        ));
        assert!(matches!(
            b.received(A, &[change(A, 5)], 0),
            Err(ReplicationError::Refused {
                refusal: Refusal::ClockAhead { .. },
                ..
            })
        ));
    }

    #[test]
    fn a_peer_behind_the_pruned_log_is_refused() {
        let mut a = Replication::new(A, config(), 10, 0, [(B, PeerProgress { applied: 0, acked: 8 })]);
        a.pruned(8);
        assert!(matches!(a.connected(B, 3), Err(ReplicationError::PrunedTooFar { .. })));
    }

    #[test]
    fn a_node_that_joins_gets_the_log_from_where_it_is_pruned_and_one_that_left_loses_its_link() {
        const C: NodeId = NodeId(3);
        let mut r = Replication::new(A, ReplicationConfig::default(), 10, 0, [(B, PeerProgress::default())]);
        r.connected(B, 0).unwrap();
        r.acked(B, 7).unwrap();
        r.pruned(r.prune_point());
        let change = r.membership_change(&[C]);
        assert_eq!(
            change,
            MembershipChange {
                joined: vec![C],
                left: vec![B]
            }
        );
        r.add_peer(C, PeerProgress::default());
        r.remove_peer(B);
        assert_eq!(
            r.progress(C).unwrap().acked,
            7,
            "kept from the pruned point, not from 0"
        );
        assert_eq!(r.prune_point(), 7);
        assert!(r.progress(B).is_err());
    }
}
