//! The messages nodes exchange, and the handshake rules. The transport frames and carries these;
//! it does not interpret them.
//!
//! Compatibility: messages are encoded by field name (a map), so a field added later must have a
//! `#[serde(default)]` and old nodes ignore it; an incompatible change bumps [`PROTOCOL_VERSION`].

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::change::RowChange;
use crate::hlc::{Hlc, NodeId};

pub const PROTOCOL_VERSION: u16 = 1;

/// The first message on a connection, in both directions.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    pub version: u16,
    pub cluster: String,
    pub node: NodeId,
    /// Fingerprint of the sender's schema policy; nodes with different policies must not exchange
    /// changes.
    pub fingerprint: String,
    /// The sender's clock when it wrote the hello.
    pub hlc: Hlc,
    /// The greatest sequence number of the receiver's changes that the sender has durably applied:
    /// the receiver sends from the one after.
    pub applied_yours: u64,
}

/// Everything after the hello.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Message {
    Hello(Hello),
    /// The sender refuses the connection, and says why, before closing it.
    Refused(Refusal),
    /// The sender's own changes (it is their origin), with consecutive sequence numbers.
    Batch(Vec<RowChange>),
    /// The sender has durably applied the receiver's changes up to this sequence number.
    Ack {
        applied: u64,
    },
    /// What the sender knows of the tombstone-collection rounds (`collection`): sent on every
    /// connection before any batch, and again whenever it changes.
    Collection(crate::collection::CollectionState),
    /// The sender's whole membership (`membership`): sent on every connection, after persisting
    /// it, and again whenever it changes.
    Members(Vec<crate::membership::Member>),
    /// The shapes of its tables the sender writes changes under (`shape`): sent on every
    /// connection before any batch, and again when one is new, so a receiver always knows the
    /// shape a change names.
    Shapes(Vec<crate::schema::TableDef>),
    /// Sent now and then: carries the sender's clock and the head of its outbound log, so the
    /// receiver knows how far behind it is.
    Ping {
        hlc: Hlc,
        /// The last sequence number in the sender's outbound log (0 from nodes that predate it).
        #[serde(default)]
        head: u64,
    },
    /// `accord verify`: a coordinating node's requests and the other nodes' answers
    /// (`verify`). Nodes of versions before it do not know this message: verify with every node
    /// upgraded.
    Verify(crate::verify::VerifyMessage),
}

/// Why a node refuses a peer. Sent to the peer and logged on both sides.
#[derive(Debug, Clone, PartialEq, Eq, Error, Serialize, Deserialize)]
pub enum Refusal {
    #[error("protocol version {theirs} is not supported (this node speaks {ours})")]
    UnsupportedVersion { ours: u16, theirs: u16 },
    #[error("peer belongs to cluster {theirs:?}, this node to cluster {ours:?}")]
    OtherCluster { ours: String, theirs: String },
    #[error(
        "the schema policies differ (fingerprint {theirs} on node {node}, {ours} here): run `accord check` \
         on both databases and make their @accord annotations, tables and column types the same"
    )]
    /// Sent by nodes of versions that refused a peer whose policy differed; no longer sent.
    PolicyMismatch { node: NodeId, ours: String, theirs: String },
    #[error(
        "node {node}'s clock is {ahead_micros} µs ahead of this node's, more than the allowed {max_offset_micros} µs; \
         fix the clocks (NTP) before the nodes can exchange changes"
    )]
    ClockAhead {
        node: NodeId,
        ahead_micros: u64,
        max_offset_micros: u64,
    },
    #[error("node {node} is not a configured peer of this node")]
    UnknownPeer { node: NodeId },
    #[error("peer claims to be node {claimed} but its certificate is for node {certified}")]
    IdentityMismatch { claimed: NodeId, certified: NodeId },
    #[error("peer claims this node's own id {node}")]
    SameNode { node: NodeId },
}

/// What a node checks a peer's hello against.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalIdentity {
    pub cluster: String,
    pub node: NodeId,
    pub fingerprint: String,
    pub max_offset_micros: u64,
}

impl LocalIdentity {
    /// Checks a peer's hello; `physical` is this node's wall clock in µs when it arrived.
    pub fn check(&self, theirs: &Hello, physical: u64) -> Result<(), Refusal> {
        if theirs.version != PROTOCOL_VERSION {
            return Err(Refusal::UnsupportedVersion {
                ours: PROTOCOL_VERSION,
                theirs: theirs.version,
            });
        }
        if theirs.cluster != self.cluster {
            return Err(Refusal::OtherCluster {
                ours: self.cluster.clone(),
                theirs: theirs.cluster.clone(),
            });
        }
        if theirs.node == self.node {
            return Err(Refusal::SameNode { node: self.node });
        }
        // A policy that differs is no refusal: nodes migrate one after another, and each change
        // names its table's shape, which the receiver reads by column name or waits for
        // (`shape`).
        check_offset(theirs.node, theirs.hlc, physical, self.max_offset_micros)
    }
}

/// Refuses a stamp more than `max_offset_micros` ahead of `physical`.
pub fn check_offset(node: NodeId, stamp: Hlc, physical: u64, max_offset_micros: u64) -> Result<(), Refusal> {
    let ahead = stamp.physical.saturating_sub(physical);
    if ahead > max_offset_micros {
        return Err(Refusal::ClockAhead {
            node,
            ahead_micros: ahead,
            max_offset_micros,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn local() -> LocalIdentity {
        LocalIdentity {
            cluster: "prod".into(),
            node: NodeId(1),
            fingerprint: "abc".into(),
            max_offset_micros: 500,
        }
    }

    fn hello() -> Hello {
        Hello {
            version: PROTOCOL_VERSION,
            cluster: "prod".into(),
            node: NodeId(2),
            fingerprint: "abc".into(),
            hlc: Hlc::new(1_000, 0, NodeId(2)),
            applied_yours: 0,
        }
    }

    #[test]
    fn a_matching_hello_is_accepted() {
        local().check(&hello(), 1_000).unwrap();
    }

    #[test]
    fn each_mismatch_has_its_own_refusal() {
        let l = local();
        let mut h = hello();
        h.version = 99;
        assert!(matches!(
            l.check(&h, 1_000),
            Err(Refusal::UnsupportedVersion { theirs: 99, .. })
        ));
        let mut h = hello();
        h.cluster = "staging".into();
        assert!(matches!(l.check(&h, 1_000), Err(Refusal::OtherCluster { .. })));
        let mut h = hello();
        h.fingerprint = "def".into();
        assert!(l.check(&h, 1_000).is_ok(), "nodes mid-migration keep talking");
        let mut h = hello();
        h.node = NodeId(1);
        assert!(matches!(l.check(&h, 1_000), Err(Refusal::SameNode { .. })));
        let mut h = hello();
        h.hlc = Hlc::new(1_501, 0, NodeId(2));
        assert!(matches!(
            l.check(&h, 1_000),
            Err(Refusal::ClockAhead { ahead_micros: 501, .. })
        ));
    }
}
