//! The handshake on a fresh connection, after TLS: who the peer is, and whether both sides accept
//! each other.
//!
//! On the connection's one bidirectional stream (opened by the dialer) each side sends
//! `Message::Hello` first, then reads the peer's and checks it: the id it claims against the id in
//! its certificate (`Refusal::IdentityMismatch`), the peer list (`UnknownPeer`; it follows the
//! cluster's membership), then `LocalIdentity::check` (version, cluster, policy fingerprint,
//! clock offset). A side that accepts
//! finishes its half of the stream; a side that refuses sends `Message::Refused` and closes the
//! connection with `CloseCode::Refused` and the refusal, encoded, as the close reason (so the peer
//! learns why even when the close overtakes the stream). A link comes up only when a side has
//! accepted and has seen the peer's half end without a refusal, so neither side starts sending
//! to a peer that refused it. TLS authenticated both certificates before any of this, but a
//! dialer's QUIC `connect` completes before the acceptor has checked the dialer's certificate; the
//! wait for the acceptor's hello is what makes the dialer sure.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use accord_engine::{Hello, Message, NodeId, Refusal};
use quinn::{Connection, ConnectionError, RecvStream, SendStream};
use tracing::warn;

use crate::endpoint::Shared;
use crate::event::{CloseCode, Rejection};
use crate::frame::{self, FrameError};
use crate::tls;

/// Hellos and refusals are small; a larger frame during the handshake is not a hello.
const HANDSHAKE_MAX_FRAME: usize = 64 << 10;
/// How long a refusing side waits for its refusal to be acknowledged before it closes.
const REFUSAL_LINGER: Duration = Duration::from_secs(1);

/// Which side of the connection this node is.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Role {
    /// This node dialled `expected`.
    Dialer {
        expected: NodeId,
    },
    Acceptor,
}

/// Why a handshake failed, and who the peer is as far as known.
#[derive(Debug)]
pub(crate) struct Failure {
    pub peer: Option<NodeId>,
    pub rejection: Rejection,
}

/// Runs the handshake on `conn`; on failure the connection is closed.
pub(crate) async fn run(conn: &Connection, role: Role, shared: &Shared) -> Result<(NodeId, Hello), Failure> {
    let result = exchange(conn, role, shared).await;
    if let Err(failure) = &result {
        // A no-op when the failure closed it already (with a more specific code) or the peer did.
        conn.close(
            CloseCode::HandshakeFailed.var_int(),
            failure.rejection.to_string().as_bytes(),
        );
    }
    result
}

async fn exchange(conn: &Connection, role: Role, shared: &Shared) -> Result<(NodeId, Hello), Failure> {
    let certified = match tls::peer_node(conn) {
        Ok(node) => node,
        Err(e) => {
            let rejection = Rejection::Certificate(e.to_string());
            return Err(close(conn, None, CloseCode::HandshakeFailed, rejection));
        }
    };
    let fail = |rejection| Failure {
        peer: Some(certified),
        rejection,
    };
    match role {
        Role::Dialer { expected } if certified != expected => {
            // TLS already checked the server name, so this is a second line of defence only.
            let rejection = Rejection::Certificate(format!(
                "dialled node {expected}, but the certificate is for node {certified}"
            ));
            return Err(close(conn, Some(certified), CloseCode::HandshakeFailed, rejection));
        }
        Role::Dialer { .. } => {}
        Role::Acceptor => {
            if !shared.is_peer(certified) {
                // Not a member: no hello for it, only the refusal.
                let refusal = Refusal::UnknownPeer { node: certified };
                return Err(match conn.accept_bi().await {
                    Ok((mut send, _)) => refuse(conn, &mut send, certified, refusal).await,
                    Err(e) => fail(rejection_from_connection(&e)),
                });
            }
            if certified > shared.identity.node {
                let text = format!(
                    "node {} accepts from node {certified}, it does not dial it",
                    shared.identity.node
                );
                conn.close(CloseCode::WrongDirection.var_int(), text.as_bytes());
                return Err(fail(Rejection::WrongDirection(text)));
            }
        }
    }

    let (mut send, mut recv) = match role {
        Role::Dialer { .. } => conn.open_bi().await,
        Role::Acceptor => conn.accept_bi().await,
    }
    .map_err(|e| fail(rejection_from_connection(&e)))?;

    let ours = Message::Hello((shared.hello_for)(certified));
    write(&mut send, &ours).await.map_err(fail)?;
    let theirs = match read(&mut recv).await.map_err(fail)? {
        Some(Message::Hello(hello)) => hello,
        Some(Message::Refused(refusal)) => return Err(fail(Rejection::RefusedByPeer(refusal))),
        Some(_) => return Err(close(conn, Some(certified), CloseCode::Protocol, expected("a hello"))),
        None => {
            return Err(close(
                conn,
                Some(certified),
                CloseCode::Protocol,
                expected("a hello, not the end"),
            ))
        }
    };
    if let Err(refusal) = check(shared, certified, &theirs) {
        return Err(refuse(conn, &mut send, certified, refusal).await);
    }

    // Accepted: say so by finishing our half, then learn the peer's verdict from its half.
    send.finish()
        .map_err(|_| fail(Rejection::Handshake("the handshake stream closed early".into())))?;
    match read(&mut recv).await.map_err(fail)? {
        None => Ok((certified, theirs)),
        Some(Message::Refused(refusal)) => Err(fail(Rejection::RefusedByPeer(refusal))),
        Some(_) => Err(close(
            conn,
            Some(certified),
            CloseCode::Protocol,
            expected("the end of the handshake"),
        )),
    }
}

/// The checks of a peer's hello, in order: identity first (a node lying about who it is says
/// nothing else worth reading), then membership, then the engine's rules.
fn check(shared: &Shared, certified: NodeId, hello: &Hello) -> Result<(), Refusal> {
    if hello.node != certified {
        return Err(Refusal::IdentityMismatch {
            claimed: hello.node,
            certified,
        });
    }
    if !shared.is_peer(certified) {
        return Err(Refusal::UnknownPeer { node: certified });
    }
    shared.identity.check(hello, now_micros())
}

/// Sends the refusal, gives it a moment to arrive, and closes with it as the reason.
async fn refuse(conn: &Connection, send: &mut SendStream, peer: NodeId, refusal: Refusal) -> Failure {
    if write(send, &Message::Refused(refusal.clone())).await.is_ok() && send.finish().is_ok() {
        let _ = tokio::time::timeout(REFUSAL_LINGER, send.stopped()).await;
    }
    // Encoding a refusal (a few strings and numbers) cannot fail; should it, the peer still gets
    // the close code and reads the refusal from the stream.
    let reason = rmp_serde::to_vec_named(&refusal).unwrap_or_default();
    conn.close(CloseCode::Refused.var_int(), &reason);
    Failure {
        peer: Some(peer),
        rejection: Rejection::Refused(refusal),
    }
}

fn close(conn: &Connection, peer: Option<NodeId>, code: CloseCode, rejection: Rejection) -> Failure {
    warn!(remote = %conn.remote_address(), %rejection, "closing connection during handshake");
    conn.close(code.var_int(), rejection.to_string().as_bytes());
    Failure { peer, rejection }
}

fn expected(what: &str) -> Rejection {
    Rejection::Handshake(format!("expected {what} from the peer"))
}

async fn write(send: &mut SendStream, message: &Message) -> Result<(), Rejection> {
    let bytes = frame::encode(message, HANDSHAKE_MAX_FRAME).map_err(|e| Rejection::Handshake(e.to_string()))?;
    send.write_all(&bytes).await.map_err(|e| match e {
        quinn::WriteError::ConnectionLost(e) => rejection_from_connection(&e),
        other => Rejection::Handshake(other.to_string()),
    })
}

async fn read(recv: &mut RecvStream) -> Result<Option<Message>, Rejection> {
    frame::read(recv, HANDSHAKE_MAX_FRAME).await.map_err(|e| match e {
        FrameError::Stream(quinn::ReadError::ConnectionLost(e)) => rejection_from_connection(&e),
        other => Rejection::Handshake(other.to_string()),
    })
}

/// What a connection error before the link came up means for the handshake.
pub(crate) fn rejection_from_connection(error: &ConnectionError) -> Rejection {
    match error {
        ConnectionError::ApplicationClosed(close) => match CloseCode::from_code(close.error_code.into_inner()) {
            CloseCode::Refused => match rmp_serde::from_slice::<Refusal>(&close.reason) {
                Ok(refusal) => Rejection::RefusedByPeer(refusal),
                Err(_) => Rejection::Handshake(format!("refused: {}", String::from_utf8_lossy(&close.reason))),
            },
            CloseCode::WrongDirection => Rejection::WrongDirection(String::from_utf8_lossy(&close.reason).into()),
            code => Rejection::Handshake(format!(
                "the peer closed the connection ({code}): {}",
                String::from_utf8_lossy(&close.reason)
            )),
        },
        // The peer's TLS stack sent an alert: it did not accept our certificate.
        ConnectionError::ConnectionClosed(close) if is_crypto(close.error_code) => {
            Rejection::TlsRejectedByPeer(format!("{close}"))
        }
        // Our TLS stack refused the peer (its certificate, or no common ALPN protocol).
        ConnectionError::TransportError(e) if is_crypto(e.code) => Rejection::Tls(e.to_string()),
        other => Rejection::Handshake(other.to_string()),
    }
}

/// QUIC carries TLS alerts as transport error codes 0x100..=0x1ff (RFC 9000, section 20.1).
fn is_crypto(code: quinn::TransportErrorCode) -> bool {
    (0x100..=0x1ff).contains(&u64::from(code))
}

/// The wall clock in µs since the Unix epoch, for the clock-offset check.
pub(crate) fn now_micros() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}
