//! What an endpoint is told: who it is, whom to reach where, and its limits.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use accord_engine::{LocalIdentity, NodeId};

use crate::backoff::BackoffConfig;
use crate::frame::DEFAULT_MAX_FRAME;
use crate::tls::TlsIdentity;

/// A peer and where to reach it: the endpoint's peers are a list of these (`Endpoint::set_peers`
/// changes them while it runs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerAddr {
    pub node: NodeId,
    pub addr: SocketAddr,
}

#[derive(Debug, Clone)]
pub struct EndpointConfig {
    /// What peers' hellos are checked against (cluster, this node's id, policy fingerprint, max
    /// clock offset).
    pub identity: LocalIdentity,
    /// The UDP address to listen on (port 0 picks one; see `Transport::local_addr`).
    pub listen: SocketAddr,
    /// Every other node of the cluster. This node dials those with a greater id and accepts the
    /// others.
    pub peers: Vec<PeerAddr>,
    pub tls: TlsIdentity,
    /// Largest frame sent or accepted after the handshake.
    pub max_frame: usize,
    /// How often an idle connection sends a QUIC PING, so NATs and the peer's idle timer stay open.
    pub keep_alive: Duration,
    /// A connection with no packet from the peer for this long is dead (QUIC idle timeout).
    pub idle_timeout: Duration,
    /// Longest a connection may take from the first packet to an accepted hello.
    pub handshake_timeout: Duration,
    pub backoff: BackoffConfig,
    /// Frames queued per link before `Link::send` waits.
    pub link_queue: usize,
    /// Events queued before the connections stop reading from their peers.
    pub event_queue: usize,
}

impl EndpointConfig {
    /// A configuration with the default limits.
    pub fn new(identity: LocalIdentity, listen: SocketAddr, peers: Vec<PeerAddr>, tls: TlsIdentity) -> Self {
        EndpointConfig {
            identity,
            listen,
            peers,
            tls,
            max_frame: DEFAULT_MAX_FRAME,
            keep_alive: Duration::from_secs(5),
            idle_timeout: Duration::from_secs(30),
            handshake_timeout: Duration::from_secs(10),
            backoff: BackoffConfig::default(),
            link_queue: 64,
            event_queue: 1024,
        }
    }

    /// The QUIC transport parameters both sides of a connection use.
    pub fn transport_config(&self) -> Result<Arc<quinn::TransportConfig>, quinn::VarIntBoundsExceeded> {
        let mut transport = quinn::TransportConfig::default();
        transport.keep_alive_interval(Some(self.keep_alive));
        transport.max_idle_timeout(Some(quinn::IdleTimeout::try_from(self.idle_timeout)?));
        // One stream for the handshake, one per direction for messages: a peer may not open more.
        transport.max_concurrent_bidi_streams(1u32.into());
        transport.max_concurrent_uni_streams(1u32.into());
        transport.datagram_receive_buffer_size(None);
        Ok(Arc::new(transport))
    }
}
