//! A link: the node's handle on one authenticated connection to one peer. It holds no QUIC type,
//! only a bounded queue of encoded frames and a close request, so the same shape serves an
//! in-memory transport.

use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;

use accord_engine::{Message, NodeId};
use thiserror::Error;
use tokio::sync::{mpsc, watch};

use crate::frame::{self, FrameError};

/// Tells one link from another, also the links of one peer across reconnects. Unique per endpoint
/// handle and increasing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct LinkId(pub u64);

impl fmt::Display for LinkId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "#{}", self.0)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum SendError {
    /// The message encodes to more than the frame limit: split the batch. The link stays up.
    #[error("message of {len} bytes exceeds the frame limit of {max} bytes")]
    TooLarge { len: u64, max: usize },
    #[error("message does not encode: {0}")]
    Encode(String),
    /// The link is down (its `Down` event is on its way); the message was not sent.
    #[error("the link is closed")]
    Closed,
    /// `try_send` only: the link's queue is full, the peer is slower than this node.
    #[error("the link's send queue is full")]
    Full,
    /// `Hello` and `Refused` belong to the handshake, which the transport does itself.
    #[error("handshake messages cannot be sent on a link")]
    HandshakeMessage,
}

/// Sends to one peer over one connection. Cheap to clone. When the connection ends, sending fails
/// with [`SendError::Closed`]; the node then gets `PeerEvent::Down` and, after a reconnect, a new
/// link in `PeerEvent::Up`. A link is never reused for a later connection, so a message meant for a
/// connection (a batch computed for it) can never reach the next one.
#[derive(Clone)]
pub struct Link {
    peer: NodeId,
    id: LinkId,
    remote: SocketAddr,
    max_frame: usize,
    frames: mpsc::Sender<Vec<u8>>,
    close: Arc<watch::Sender<Option<String>>>,
}

/// The connection's side of a link: the frames to write and the node's close request.
pub(crate) struct Outbound {
    pub frames: mpsc::Receiver<Vec<u8>>,
    pub close: watch::Receiver<Option<String>>,
}

impl fmt::Debug for Link {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Link")
            .field("peer", &self.peer)
            .field("id", &self.id)
            .field("remote", &self.remote)
            .finish_non_exhaustive()
    }
}

impl Link {
    /// `capacity` frames may wait in the queue; beyond that `send` waits, which is how a slow
    /// peer (QUIC flow control stops the writer) slows the node down.
    pub(crate) fn new(
        peer: NodeId,
        id: LinkId,
        remote: SocketAddr,
        max_frame: usize,
        capacity: usize,
    ) -> (Link, Outbound) {
        let (frames_tx, frames_rx) = mpsc::channel(capacity.max(1));
        let (close_tx, close_rx) = watch::channel(None);
        let link = Link {
            peer,
            id,
            remote,
            max_frame,
            frames: frames_tx,
            close: Arc::new(close_tx),
        };
        let outbound = Outbound {
            frames: frames_rx,
            close: close_rx,
        };
        (link, outbound)
    }

    pub fn peer(&self) -> NodeId {
        self.peer
    }

    pub fn id(&self) -> LinkId {
        self.id
    }

    pub fn remote(&self) -> SocketAddr {
        self.remote
    }

    /// Queues `message`, waiting while the queue is full. Encoding happens here, in the caller's
    /// task, so an oversized message is the caller's error and never the connection's.
    pub async fn send(&self, message: &Message) -> Result<(), SendError> {
        let frame = self.encode(message)?;
        self.frames.send(frame).await.map_err(|_| SendError::Closed)
    }

    /// Queues `message` if there is room now.
    pub fn try_send(&self, message: &Message) -> Result<(), SendError> {
        let frame = self.encode(message)?;
        self.frames.try_send(frame).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => SendError::Full,
            mpsc::error::TrySendError::Closed(_) => SendError::Closed,
        })
    }

    /// Closes the connection (for example after `Replication::received` refused a batch). The
    /// peer sees `CloseCode::ClosedByNode` with `reason`; both sides then reconnect.
    pub fn close(&self, reason: impl Into<String>) {
        self.close.send_replace(Some(reason.into()));
    }

    /// Whether the connection is gone.
    pub fn is_closed(&self) -> bool {
        self.frames.is_closed()
    }

    fn encode(&self, message: &Message) -> Result<Vec<u8>, SendError> {
        if matches!(message, Message::Hello(_) | Message::Refused(_)) {
            return Err(SendError::HandshakeMessage);
        }
        frame::encode(message, self.max_frame).map_err(|e| match e {
            FrameError::TooLarge { len, max } => SendError::TooLarge { len, max },
            other => SendError::Encode(other.to_string()),
        })
    }
}
