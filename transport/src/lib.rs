//! accord's transport: nodes exchange the engine's [`Message`](accord_engine::Message)s over QUIC
//! with mutual TLS. It frames and carries messages and authenticates peers; it does not interpret
//! replication (that is `accord_engine::Replication`) and knows nothing of PostgreSQL.
//!
//! # Interface
//!
//! ```text
//! Endpoint::start(EndpointConfig, hello_for: impl Fn(NodeId) -> Hello + Send + Sync + 'static)
//!     -> Result<(Endpoint, mpsc::Receiver<PeerEvent>), StartError>
//! Endpoint::local_addr(&self) -> SocketAddr      Endpoint::shutdown(self).await
//!
//! PeerEvent::Up       { link: Link, hello: Hello }         -> Replication::connected(peer, hello.applied_yours)
//! PeerEvent::Message  { peer: NodeId, message: Message }   -> Batch: received/apply/applied; Ack: acked; Ping
//! PeerEvent::Down     { peer: NodeId, link: LinkId, reason: DownReason } -> Replication::disconnected(peer)
//! PeerEvent::Rejected { peer: Option<NodeId>, remote: SocketAddr, rejection: Rejection }
//!
//! Link::send(&self, &Message).await -> Result<(), SendError>   (waits while the peer is slow)
//! Link::try_send(&self, &Message)   -> Result<(), SendError>   (SendError::Full instead of waiting)
//! Link::close(&self, reason)        Link::peer()  Link::id()  Link::is_closed()
//! ```
//!
//! The node keeps one `Link` per peer from `Up` and drops it at `Down`. Per peer, events come as
//! `Up, Message*, Down, Up, ...`; a link is one connection and is never reused, so a batch the node
//! computed for one connection cannot arrive on the next one (the peer would see a gap).
//! `hello_for(peer)` is called at every handshake, so the hello carries the node's current clock and
//! its durable `applied` position for that peer: the peer resends from the one after, and
//! `Replication::received` drops whatever was already applied. An in-memory transport of the same
//! shape needs only the same three types: a `Link` is a bounded queue of frames and a close request,
//! with no QUIC inside.
//!
//! Flow control: a link's queue holds `link_queue` frames; its writer waits on QUIC stream flow
//! control, which opens only as fast as the peer's reader hands messages to its node through the
//! bounded event queue. So a slow node slows its peers' `Link::send`. `Replication`'s window keeps
//! the frames in flight per peer below `window / max_batch` batches plus as many acks; keep that
//! under `link_queue` (default 64, with the default window of 10,000 and batches of 500: 20 + 20)
//! so that `send` does not wait in the node's loop at all.
//!
//! # Who dials
//!
//! Membership is the static list [`EndpointConfig::peers`] (node id and address). Every pair of
//! nodes keeps one connection (full mesh), dialled by the node with the smaller id; the other only
//! accepts. A node refuses a connection from a greater id with [`CloseCode::WrongDirection`], so there
//! are never two connections for one pair. A newer connection from the same peer replaces the
//! current one (the peer only dials again after it lost the old one, or restarted). The dialler
//! reconnects after every failure or lost link with exponential backoff and jitter
//! ([`BackoffConfig`]); QUIC keep-alives and the idle timeout detect a dead peer, and a peer that
//! restarted on its address answers the old connection with a stateless reset
//! ([`DownReason::PeerRestarted`]), so the dialler does not wait out the idle timeout.
//!
//! # Identity and handshake
//!
//! Each node has a key and a certificate signed by the cluster CA. Its node id is the certificate's
//! one subject alternative name `node-<id>.accord` ([`certs::node_dns_name`]). TLS 1.3 with client
//! authentication checks both certificates against the CA; the dialler asks for the server name
//! `node-<peer>.accord`, so it reaches only that node. Both sides then read the peer's id from its
//! certificate (`peer_identity()`: a dialler's QUIC `connect` can succeed although the acceptor
//! later rejects its certificate, so nothing is trusted before the handshake below completes).
//!
//! On one bidirectional stream both sides send `Message::Hello` first and check the peer's: the id
//! it claims must be its certificate's (else `Refusal::IdentityMismatch`), it must be a configured
//! peer (`UnknownPeer`), then `LocalIdentity::check` (protocol version, cluster, policy fingerprint,
//! clock offset). A side that accepts finishes its half of the stream; a side that refuses sends
//! `Message::Refused` and closes with [`CloseCode::Refused`]. The link comes up on a side once it
//! accepted and saw the peer's half end without a refusal. Every rejection is logged (`warn`) on the
//! side that sees it, and reported as [`PeerEvent::Rejected`] with a [`Rejection`]: `Refused` (this
//! node refused), `RefusedByPeer`, `Tls` (the peer's certificate is not from the cluster CA),
//! `TlsRejectedByPeer`, `Certificate`, `WrongDirection`, `Handshake`.
//!
//! # Framing
//!
//! After the handshake each side sends on one unidirectional stream of its own: frames of a 4-byte
//! big-endian length and the message in MessagePack with named fields ([`frame`]). A frame over
//! [`EndpointConfig::max_frame`] (default 64 MiB) or one that does not decode closes that connection
//! with [`CloseCode::FrameTooLarge`] or [`CloseCode::Undecodable`] and a log line; the endpoint
//! goes on serving its other peers, and the dialler reconnects. Nothing on the wire can panic a node.
//!
//! # Certificates
//!
//! `accord certs init --out DIR` writes a new cluster CA, `DIR/ca.pem` and `DIR/ca.key`.
//! `accord certs node ID --ca-dir DIR --out DIR2` writes `DIR2/node-ID.pem` and `DIR2/node-ID.key`
//! (ECDSA P-256, signed by the CA, valid as TLS server and client) and a copy of `ca.pem`. Keys are
//! created with mode 0600; nothing is ever overwritten. Certificates are valid for `--days`
//! (default 3650) from an hour before creation. A node is configured with its `ca.pem`,
//! `node-ID.pem` and `node-ID.key` ([`TlsIdentity::load`]). Keep `ca.key` off the nodes: it is
//! only needed to make node certificates. A node whose certificate was issued for another id does
//! not start ([`StartError::CertificateForOtherNode`]).

pub mod backoff;
pub mod certs;
pub mod config;
mod connection;
pub mod endpoint;
pub mod event;
pub mod frame;
mod handshake;
pub mod link;
pub mod tls;

pub use backoff::BackoffConfig;
pub use config::{EndpointConfig, PeerAddr};
pub use endpoint::{Endpoint, StartError};
pub use event::{CloseCode, DownReason, PeerEvent, Rejection};
pub use link::{Link, LinkId, SendError};
pub use tls::TlsIdentity;
