//! Mutual TLS for QUIC: a node's identity (key, certificate, cluster CA) and the rustls and quinn
//! configurations built from it. Only the ring crypto provider and TLS 1.3 (all QUIC allows).

use std::path::Path;
use std::sync::Arc;

use accord_engine::NodeId;
use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::RootCertStore;
use thiserror::Error;

use crate::certs::{certified_node, IdentityError};

/// The ALPN protocol of accord's node links; a QUIC peer that does not speak it is not let in.
pub const ALPN: &[u8] = b"accord/1";

#[derive(Debug, Error)]
pub enum TlsError {
    #[error("{what}: {message}")]
    Pem { what: String, message: String },
    #[error("{what} holds no {expected}")]
    Empty { what: String, expected: &'static str },
    #[error("the node certificate: {0}")]
    Identity(#[from] IdentityError),
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
    #[error("certificate verifier: {0}")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
    #[error("QUIC TLS configuration: {0}")]
    Quic(#[from] quinn::crypto::rustls::NoInitialCipherSuite),
    #[error("the node key is not the key of the node certificate (each `accord certs node` run makes a new pair: use the .key written with the .pem)")]
    KeyMismatch,
    #[error("the node certificate is not signed by the CA certificate ({0}); its peers would refuse it")]
    NotFromCa(rustls::Error),
}

/// What a node proves itself with and checks its peers against.
#[derive(Debug)]
pub struct TlsIdentity {
    ca: CertificateDer<'static>,
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    node: NodeId,
}

impl Clone for TlsIdentity {
    fn clone(&self) -> Self {
        TlsIdentity {
            ca: self.ca.clone(),
            chain: self.chain.clone(),
            key: self.key.clone_key(),
            node: self.node,
        }
    }
}

impl TlsIdentity {
    /// From PEM text: the cluster CA's certificate, the node's certificate (chain), its key.
    pub fn from_pem(ca_pem: &str, cert_pem: &str, key_pem: &str) -> Result<Self, TlsError> {
        let pem_err = |what: &str| {
            let what = what.to_string();
            move |e: rustls::pki_types::pem::Error| TlsError::Pem {
                what: what.clone(),
                message: e.to_string(),
            }
        };
        let ca = CertificateDer::from_pem_slice(ca_pem.as_bytes()).map_err(pem_err("the CA certificate"))?;
        let chain = CertificateDer::pem_slice_iter(cert_pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .map_err(pem_err("the node certificate"))?;
        let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).map_err(pem_err("the node key"))?;
        Self::new(ca, chain, key)
    }

    /// From files: `ca.pem`, `node-<id>.pem`, `node-<id>.key` as `accord certs` writes them.
    /// Files that load but do not belong together (a certificate from another cluster's CA, an
    /// expired one) are refused here, when the operator starts the node, rather than by every
    /// peer's handshake later, where the cause shows only in the peers' logs.
    pub fn load(ca: &Path, cert: &Path, key: &Path) -> Result<Self, TlsError> {
        let read = |path: &Path| {
            std::fs::read_to_string(path).map_err(|e| TlsError::Pem {
                what: path.display().to_string(),
                message: e.to_string(),
            })
        };
        let identity = Self::from_pem(&read(ca)?, &read(cert)?, &read(key)?)?;
        identity.verify_against_ca()?;
        Ok(identity)
    }

    /// Whether the node certificate chains to the CA certificate and is valid now, as a peer's
    /// handshake would check it. `from_pem` does not require it, so that tests can build the
    /// foreign identities that peers must refuse.
    pub fn verify_against_ca(&self) -> Result<(), TlsError> {
        let verifier = WebPkiClientVerifier::builder_with_provider(self.roots()?, provider()).build()?;
        let (leaf, intermediates) = self.chain.split_first().ok_or_else(|| TlsError::Empty {
            what: "the node certificate".into(),
            expected: "certificate",
        })?;
        verifier
            .verify_client_cert(leaf, intermediates, rustls::pki_types::UnixTime::now())
            .map(|_| ())
            .map_err(TlsError::NotFromCa)
    }

    pub fn new(
        ca: CertificateDer<'static>,
        chain: Vec<CertificateDer<'static>>,
        key: PrivateKeyDer<'static>,
    ) -> Result<Self, TlsError> {
        let leaf = chain.first().ok_or_else(|| TlsError::Empty {
            what: "the node certificate".into(),
            expected: "certificate",
        })?;
        let node = certified_node(leaf)?;
        match rustls::sign::CertifiedKey::from_der(chain.clone(), key.clone_key(), &provider()) {
            Ok(_) => {}
            Err(rustls::Error::InconsistentKeys(_)) => return Err(TlsError::KeyMismatch),
            Err(other) => return Err(TlsError::Rustls(other)),
        }
        Ok(TlsIdentity { ca, chain, key, node })
    }

    /// The key that signs this node's QUIC stateless resets. Derived from the node's private key,
    /// so it is the same after a restart: a restarted node answers packets of its previous
    /// connections with a reset the peer accepts, and the peer redials at once instead of waiting
    /// out the idle timeout on a connection that is gone. Knowing it reveals nothing of the key.
    pub fn stateless_reset_key(&self) -> ring::hmac::Key {
        let secret = self.derived_secret(b"accord QUIC stateless reset key v1\0");
        ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret.as_ref())
    }

    /// The key of the check quinn applies to the connection IDs of packets for connections it does
    /// not know: a packet whose ID fails the check is dropped without a stateless reset. quinn's
    /// default draws that key at random per process, so a restarted node would silently drop its
    /// previous connections' packets and its peers would wait out the idle timeout. Derived from
    /// the node's private key, it is the same after a restart, and the reset goes out.
    pub fn connection_id_key(&self) -> u64 {
        let secret = self.derived_secret(b"accord QUIC connection id key v1\0");
        let mut first = [0u8; 8];
        first.copy_from_slice(&secret.as_ref()[..8]);
        u64::from_le_bytes(first)
    }

    /// A secret for one purpose (`label`), the same on every run of this node: a hash of the
    /// label and the node's private key, which reveals nothing of the key.
    fn derived_secret(&self, label: &[u8]) -> ring::digest::Digest {
        let mut context = ring::digest::Context::new(&ring::digest::SHA256);
        context.update(label);
        context.update(self.key.secret_der());
        context.finish()
    }

    /// The node the certificate is for.
    pub fn node(&self) -> NodeId {
        self.node
    }

    fn roots(&self) -> Result<Arc<RootCertStore>, TlsError> {
        let mut roots = RootCertStore::empty();
        roots.add(self.ca.clone())?;
        Ok(Arc::new(roots))
    }
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The accepting side: presents this node's certificate and requires one from the peer, signed by
/// the cluster CA. Which node the peer is, is read from its certificate after the handshake.
pub fn server_config(
    identity: &TlsIdentity,
    transport: Arc<quinn::TransportConfig>,
) -> Result<quinn::ServerConfig, TlsError> {
    let provider = provider();
    let verifier = WebPkiClientVerifier::builder_with_provider(identity.roots()?, provider.clone()).build()?;
    let mut tls = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(identity.chain.clone(), identity.key.clone_key())?;
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(QuicServerConfig::try_from(tls)?));
    config.transport_config(transport);
    Ok(config)
}

/// The dialing side: presents this node's certificate, and accepts the server only with a
/// certificate from the cluster CA for the server name it dials (`node-<id>.accord`).
pub fn client_config(
    identity: &TlsIdentity,
    transport: Arc<quinn::TransportConfig>,
) -> Result<quinn::ClientConfig, TlsError> {
    let provider = provider();
    let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(identity.roots()?, provider.clone())
        .build()
        .map_err(TlsError::Verifier)?;
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_webpki_verifier(verifier)
        .with_client_auth_cert(identity.chain.clone(), identity.key.clone_key())?;
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let mut config = quinn::ClientConfig::new(Arc::new(QuicClientConfig::try_from(tls)?));
    config.transport_config(transport);
    Ok(config)
}

/// The node named by the certificate the peer presented on `conn` (verified by TLS against the
/// cluster CA during the handshake).
pub fn peer_node(conn: &quinn::Connection) -> Result<NodeId, IdentityError> {
    let certs = conn
        .peer_identity()
        .and_then(|any| any.downcast::<Vec<CertificateDer<'static>>>().ok())
        .ok_or_else(|| IdentityError::Unparsable("the peer presented no certificate".into()))?;
    let leaf = certs
        .first()
        .ok_or_else(|| IdentityError::Unparsable("the peer presented an empty certificate chain".into()))?;
    certified_node(leaf)
}
