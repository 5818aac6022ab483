//! What the transport tells the node: links coming up and going down, messages, rejected peers;
//! and the application close codes both sides see.

use std::fmt;
use std::net::SocketAddr;

use accord_engine::{Hello, Message, NodeId, Refusal};
use thiserror::Error;

use crate::link::{Link, LinkId};

/// Events of one endpoint. Per peer they come in the order
/// `Up, Message*, Down, Up, Message*, Down, ...`: a link's messages all come after its `Up` and
/// before its `Down`, and a peer's next `Up` after the previous link's `Down`. `Rejected` may come
/// at any time (also for peers that never get a link).
#[derive(Debug)]
pub enum PeerEvent {
    /// A link passed the handshake. `hello` is the peer's: feed `hello.applied_yours` to
    /// `Replication::connected`, and send on `link`.
    Up { link: Link, hello: Hello },
    /// A message from the peer on its current link (never a `Hello` or `Refused`: the transport
    /// handles those).
    Message { peer: NodeId, message: Message },
    /// The link `link` to `peer` is gone; call `Replication::disconnected`. The transport
    /// reconnects by itself.
    Down {
        peer: NodeId,
        link: LinkId,
        reason: DownReason,
    },
    /// A connection attempt was refused, by either side, before it became a link. `peer` is the
    /// node the certificate (or the dialled address) names, when that is known.
    Rejected {
        peer: Option<NodeId>,
        remote: SocketAddr,
        rejection: Rejection,
    },
}

/// Why a connection did not become a link. Logged on both sides as well.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum Rejection {
    /// This node refused the peer, and told it so.
    #[error("refused the peer: {0}")]
    Refused(Refusal),
    /// The peer refused this node.
    #[error("the peer refused this node: {0}")]
    RefusedByPeer(Refusal),
    /// This node's TLS refused the peer: its certificate is not signed by the cluster CA (or has
    /// expired, or is not for the node dialled), or it does not speak accord's ALPN protocol.
    #[error("TLS refused the peer: {0}")]
    Tls(String),
    /// The peer's TLS refused this node (a TLS alert): it did not accept this node's certificate.
    #[error("the peer's TLS refused this node: {0}")]
    TlsRejectedByPeer(String),
    /// The peer's certificate passed TLS but names no node, or another node than the one dialled.
    #[error("the peer's certificate is not acceptable: {0}")]
    Certificate(String),
    /// A connection between these two nodes is dialled by the lower node id; this one came the
    /// other way (the two nodes disagree about who is who, or run different versions).
    #[error("wrong direction: the node with the lower id dials ({0})")]
    WrongDirection(String),
    /// The handshake broke down: timeout, lost connection, an undecodable or unexpected frame.
    #[error("handshake failed: {0}")]
    Handshake(String),
}

/// Why a link went down.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum DownReason {
    #[error("this node is shutting down")]
    Shutdown,
    #[error("replaced by a newer connection from the same peer")]
    Replaced,
    /// The node closed it with `Link::close`.
    #[error("closed by this node: {0}")]
    ClosedByNode(String),
    #[error("the peer sent a frame of {len} bytes, over the limit of {max}")]
    FrameTooLarge { len: u64, max: usize },
    #[error("the peer sent an undecodable frame: {0}")]
    Undecodable(String),
    #[error("the peer broke the protocol: {0}")]
    Protocol(String),
    #[error("the peer closed the connection ({code}): {reason}")]
    ClosedByPeer { code: CloseCode, reason: String },
    #[error("no sign of life from the peer within the idle timeout")]
    TimedOut,
    /// The peer answered with a QUIC stateless reset: it no longer knows the connection, because
    /// it restarted (or crashed and came back) on the same address.
    #[error("the peer restarted: it answered with a stateless reset")]
    PeerRestarted,
    #[error("connection lost: {0}")]
    Lost(String),
}

/// QUIC application error codes accord closes connections with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CloseCode {
    Shutdown,
    Refused,
    Replaced,
    ClosedByNode,
    FrameTooLarge,
    Undecodable,
    Protocol,
    WrongDirection,
    HandshakeFailed,
    /// A code this version does not know.
    Other(u64),
}

impl CloseCode {
    const KNOWN: [CloseCode; 9] = [
        CloseCode::Shutdown,
        CloseCode::Refused,
        CloseCode::Replaced,
        CloseCode::ClosedByNode,
        CloseCode::FrameTooLarge,
        CloseCode::Undecodable,
        CloseCode::Protocol,
        CloseCode::WrongDirection,
        CloseCode::HandshakeFailed,
    ];

    pub fn code(self) -> u64 {
        match self {
            CloseCode::Shutdown => 0,
            CloseCode::Refused => 1,
            CloseCode::Replaced => 2,
            CloseCode::ClosedByNode => 3,
            CloseCode::FrameTooLarge => 4,
            CloseCode::Undecodable => 5,
            CloseCode::Protocol => 6,
            CloseCode::WrongDirection => 7,
            CloseCode::HandshakeFailed => 8,
            CloseCode::Other(code) => code,
        }
    }

    pub fn from_code(code: u64) -> CloseCode {
        Self::KNOWN
            .into_iter()
            .find(|known| known.code() == code)
            .unwrap_or(CloseCode::Other(code))
    }

    pub(crate) fn var_int(self) -> quinn::VarInt {
        // Every known code is tiny; an `Other` came from the wire, so it fits a VarInt too.
        quinn::VarInt::from_u64(self.code()).unwrap_or(quinn::VarInt::MAX)
    }
}

impl fmt::Display for CloseCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = match self {
            CloseCode::Shutdown => "shutdown",
            CloseCode::Refused => "refused",
            CloseCode::Replaced => "replaced",
            CloseCode::ClosedByNode => "closed by node",
            CloseCode::FrameTooLarge => "frame too large",
            CloseCode::Undecodable => "undecodable frame",
            CloseCode::Protocol => "protocol violation",
            CloseCode::WrongDirection => "wrong direction",
            CloseCode::HandshakeFailed => "handshake failed",
            CloseCode::Other(_) => "unknown code",
        };
        write!(f, "{name}, code {}", self.code())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn close_codes_round_trip() {
        for known in CloseCode::KNOWN {
            assert_eq!(CloseCode::from_code(known.code()), known);
        }
        assert_eq!(CloseCode::from_code(99), CloseCode::Other(99));
    }
}
