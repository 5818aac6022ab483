//! One established link: after the handshake, each side sends its messages on one unidirectional
//! stream of its own (frames in order) and reads the peer's. The node's `Link` feeds the writer;
//! the reader turns frames into `PeerEvent::Message`. A frame that is too large or does not decode
//! closes this connection only.

use std::sync::{Arc, Mutex};

use accord_engine::{Hello, Message, NodeId};
use quinn::{Connection, ConnectionError};
use tokio::sync::{mpsc, watch};
use tracing::{info, warn};

use crate::endpoint::Shared;
use crate::event::{CloseCode, DownReason, PeerEvent};
use crate::frame::{self, FrameError};
use crate::link::{Link, LinkId};

/// A connection with the reason this node closed it, when it did: quinn only reports "closed
/// locally", and the `Down` event should say why.
#[derive(Debug, Clone)]
pub(crate) struct Closable {
    pub conn: Connection,
    reason: Arc<Mutex<Option<DownReason>>>,
}

impl Closable {
    pub fn new(conn: Connection) -> Self {
        Closable {
            conn,
            reason: Arc::new(Mutex::new(None)),
        }
    }

    /// Closes with `code`; the first reason given is the one the `Down` event reports.
    pub fn close(&self, code: CloseCode, reason: DownReason) {
        let text = reason.to_string();
        {
            // A poisoned lock only means another closer panicked mid-assignment of an Option:
            // the value is still whole.
            let mut slot = self.reason.lock().unwrap_or_else(|p| p.into_inner());
            slot.get_or_insert(reason);
        }
        self.conn.close(code.var_int(), text.as_bytes());
    }

    fn local_reason(&self) -> Option<DownReason> {
        self.reason.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

/// Runs the link until the connection ends: emits `Up`, then the peer's messages; returns why it
/// ended (the caller emits `Down`).
pub(crate) async fn run(conn: &Closable, peer: NodeId, hello: Hello, id: LinkId, shared: &Shared) -> DownReason {
    let send = match conn.conn.open_uni().await {
        Ok(send) => send,
        Err(e) => return ended(conn, &e, shared),
    };
    let (link, outbound) = Link::new(
        peer,
        id,
        conn.conn.remote_address(),
        shared.limits.max_frame,
        shared.limits.link_queue,
    );
    let writer = tokio::spawn(write_frames(conn.conn.clone(), send, outbound.frames));
    let reason = if shared.events.send(PeerEvent::Up { link, hello }).await.is_err() {
        conn.close(CloseCode::Shutdown, DownReason::Shutdown);
        DownReason::Shutdown
    } else {
        info!(%peer, link = %id, remote = %conn.conn.remote_address(), "link up");
        read_frames(conn, peer, outbound.close, shared).await
    };
    // The connection is closed by now, so the writer's stream fails and it ends.
    writer.abort();
    let _ = writer.await;
    reason
}

async fn write_frames(conn: Connection, mut send: quinn::SendStream, mut frames: mpsc::Receiver<Vec<u8>>) {
    loop {
        let frame = tokio::select! {
            frame = frames.recv() => frame,
            _ = conn.closed() => return,
        };
        match frame {
            // A write waits while QUIC flow control says the peer has no room: the queue behind
            // it fills, and then `Link::send` waits too.
            Some(frame) => {
                if send.write_all(&frame).await.is_err() {
                    return;
                }
            }
            // Every `Link` was dropped. Keep the stream open (dropping it would finish it, which
            // the peer reads as a protocol error) until the connection ends.
            None => {
                conn.closed().await;
                return;
            }
        }
    }
}

async fn read_frames(
    conn: &Closable,
    peer: NodeId,
    mut close: watch::Receiver<Option<String>>,
    shared: &Shared,
) -> DownReason {
    let mut recv = tokio::select! {
        accepted = conn.conn.accept_uni() => match accepted {
            Ok(recv) => recv,
            Err(e) => return ended(conn, &e, shared),
        },
        reason = close_requested(&mut close) => return closed_by_node(conn, reason),
    };
    loop {
        let frame = tokio::select! {
            frame = frame::read(&mut recv, shared.limits.max_frame) => frame,
            reason = close_requested(&mut close) => return closed_by_node(conn, reason),
        };
        let message = match frame {
            Ok(Some(Message::Hello(_) | Message::Refused(_))) => {
                return violation(conn, peer, "a handshake message on an established link")
            }
            Ok(Some(message)) => message,
            Ok(None) => return violation(conn, peer, "the peer finished its message stream"),
            Err(FrameError::TooLarge { len, max }) => {
                let reason = DownReason::FrameTooLarge { len, max };
                warn!(%peer, %reason, "closing connection");
                conn.close(CloseCode::FrameTooLarge, reason.clone());
                return reason;
            }
            Err(FrameError::Undecodable(e)) => {
                let reason = DownReason::Undecodable(e);
                warn!(%peer, %reason, "closing connection");
                conn.close(CloseCode::Undecodable, reason.clone());
                return reason;
            }
            Err(FrameError::Stream(quinn::ReadError::ConnectionLost(e))) => return ended(conn, &e, shared),
            Err(other) => return violation(conn, peer, &other.to_string()),
        };
        // Waiting here when the node is behind is the back-pressure: the stream is not read, QUIC
        // flow control stops the peer's writer.
        if shared.events.send(PeerEvent::Message { peer, message }).await.is_err() {
            conn.close(CloseCode::Shutdown, DownReason::Shutdown);
            return DownReason::Shutdown;
        }
    }
}

/// Resolves when the node asked to close the link; never, once every `Link` is gone.
async fn close_requested(close: &mut watch::Receiver<Option<String>>) -> String {
    loop {
        if let Some(reason) = close.borrow_and_update().clone() {
            return reason;
        }
        if close.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

fn closed_by_node(conn: &Closable, reason: String) -> DownReason {
    let reason = DownReason::ClosedByNode(reason);
    conn.close(CloseCode::ClosedByNode, reason.clone());
    reason
}

fn violation(conn: &Closable, peer: NodeId, what: &str) -> DownReason {
    let reason = DownReason::Protocol(what.to_string());
    warn!(%peer, %reason, "closing connection");
    conn.close(CloseCode::Protocol, reason.clone());
    reason
}

/// Why the connection ended, from its error.
fn ended(conn: &Closable, error: &ConnectionError, shared: &Shared) -> DownReason {
    match error {
        ConnectionError::LocallyClosed => conn.local_reason().unwrap_or_else(|| {
            if shared.is_shutting_down() {
                DownReason::Shutdown
            } else {
                DownReason::Lost("closed locally".into())
            }
        }),
        ConnectionError::ApplicationClosed(close) => DownReason::ClosedByPeer {
            code: CloseCode::from_code(close.error_code.into_inner()),
            reason: String::from_utf8_lossy(&close.reason).into_owned(),
        },
        ConnectionError::TimedOut => DownReason::TimedOut,
        ConnectionError::Reset => DownReason::PeerRestarted,
        other => DownReason::Lost(other.to_string()),
    }
}
