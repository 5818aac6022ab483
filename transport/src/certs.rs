//! The cluster CA and node certificates (`accord certs`), and how a certificate names its node.
//!
//! A node's identity is the one DNS name `node-<id>.accord` in its certificate's subject
//! alternative names (the CN, `accord node <id>`, is only for people). A SAN rather than the CN
//! because certificate verifiers (webpki) check SANs and ignore the CN: the dialer asks for exactly
//! `node-<id>.accord` as the TLS server name, so the CA's signature binds the name to the key.
//!
//! Files: the CA is `ca.pem` and `ca.key`; a node is `node-<id>.pem` and `node-<id>.key`, with a
//! copy of `ca.pem` beside them (the trust anchor the node checks its peers against). Keys are
//! written with mode 0600 at creation, and no file is ever overwritten.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use accord_engine::NodeId;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
};
use rustls::pki_types::CertificateDer;
use thiserror::Error;
use time::{Duration, OffsetDateTime};
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::FromDer;

pub const CA_CERT_FILE: &str = "ca.pem";
pub const CA_KEY_FILE: &str = "ca.key";
/// Validity of a new CA or node certificate unless the caller says otherwise: ten years.
pub const DEFAULT_DAYS: u32 = 3650;

const NAME_PREFIX: &str = "node-";
const NAME_SUFFIX: &str = ".accord";

#[derive(Debug, Error)]
pub enum CertsError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{0} already exists; accord never overwrites a key or certificate (move it away first)")]
    Exists(PathBuf),
    #[error("{path}: {message}")]
    Invalid { path: PathBuf, message: String },
    #[error("certificate generation failed: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("a validity of {0} days is out of range")]
    Validity(u32),
}

/// Why a certificate does not name exactly one node.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum IdentityError {
    #[error("the certificate does not parse: {0}")]
    Unparsable(String),
    #[error("the certificate has no subject alternative name of the form node-<id>.accord")]
    NoNodeName,
    #[error("the certificate names several nodes ({0} and {1})")]
    SeveralNodes(NodeId, NodeId),
}

/// The DNS name that carries `node`'s identity in its certificate.
pub fn node_dns_name(node: NodeId) -> String {
    format!("{NAME_PREFIX}{}{NAME_SUFFIX}", node.0)
}

/// The node a DNS name stands for: `node-<id>.accord` with `<id>` in canonical decimal (no sign,
/// no leading zero), so that one node has exactly one name.
pub fn parse_node_dns_name(name: &str) -> Option<NodeId> {
    let digits = name.strip_prefix(NAME_PREFIX)?.strip_suffix(NAME_SUFFIX)?;
    let canonical =
        !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()) && (digits == "0" || !digits.starts_with('0'));
    if !canonical {
        return None;
    }
    digits.parse().ok().map(NodeId)
}

/// The node a certificate is for. The caller has already verified the certificate's chain.
pub fn certified_node(cert: &CertificateDer<'_>) -> Result<NodeId, IdentityError> {
    let (_, parsed) = x509_parser::certificate::X509Certificate::from_der(cert.as_ref())
        .map_err(|e| IdentityError::Unparsable(e.to_string()))?;
    let san = parsed
        .subject_alternative_name()
        .map_err(|e| IdentityError::Unparsable(e.to_string()))?;
    let mut found: Option<NodeId> = None;
    for name in san.iter().flat_map(|ext| ext.value.general_names.iter()) {
        if let GeneralName::DNSName(dns) = name {
            if let Some(node) = parse_node_dns_name(dns) {
                match found {
                    Some(other) if other != node => return Err(IdentityError::SeveralNodes(other, node)),
                    _ => found = Some(node),
                }
            }
        }
    }
    found.ok_or(IdentityError::NoNodeName)
}

/// A cluster CA in memory: its certificate and key, PEM-encoded.
#[derive(Clone)]
pub struct Ca {
    pub cert_pem: String,
    pub key_pem: String,
}

impl std::fmt::Debug for Ca {
    // The key stays out of logs and panics.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ca")
            .field("cert_pem", &self.cert_pem)
            .finish_non_exhaustive()
    }
}

/// A node's certificate and key, PEM-encoded.
#[derive(Clone)]
pub struct NodeCert {
    pub node: NodeId,
    pub cert_pem: String,
    pub key_pem: String,
}

impl std::fmt::Debug for NodeCert {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeCert")
            .field("node", &self.node)
            .field("cert_pem", &self.cert_pem)
            .finish_non_exhaustive()
    }
}

impl Ca {
    /// A new CA (ECDSA P-256), valid from an hour ago (tolerates clock skew between nodes) for
    /// `days`. It may sign node certificates only (path length 0).
    pub fn generate(days: u32) -> Result<Ca, CertsError> {
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.distinguished_name.push(DnType::OrganizationName, "accord");
        // A random suffix gives each CA its own name, so a certificate of another cluster's CA is
        // reported as from an unknown issuer rather than as a bad signature of a namesake.
        let tag: u64 = rand::random();
        params
            .distinguished_name
            .push(DnType::CommonName, format!("accord cluster CA {tag:016x}"));
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        (params.not_before, params.not_after) = validity(days)?;
        let key = KeyPair::generate()?;
        let cert = params.self_signed(&key)?;
        Ok(Ca {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }

    /// Reads `ca.pem` and `ca.key` from `dir`.
    pub fn load(dir: &Path) -> Result<Ca, CertsError> {
        Ok(Ca {
            cert_pem: read(&dir.join(CA_CERT_FILE))?,
            key_pem: read(&dir.join(CA_KEY_FILE))?,
        })
    }

    /// A new key and certificate for `node`, signed by this CA, usable as TLS server and client
    /// (every node both dials and accepts).
    pub fn issue(&self, node: NodeId, days: u32) -> Result<NodeCert, CertsError> {
        let ca_key = KeyPair::from_pem(&self.key_pem)?;
        let issuer = Issuer::from_ca_cert_pem(&self.cert_pem, ca_key)?;
        let mut params = CertificateParams::new(vec![node_dns_name(node)])?;
        params.distinguished_name.push(DnType::OrganizationName, "accord");
        params
            .distinguished_name
            .push(DnType::CommonName, format!("accord node {}", node.0));
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
        params.use_authority_key_identifier_extension = true;
        (params.not_before, params.not_after) = validity(days)?;
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &issuer)?;
        Ok(NodeCert {
            node,
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }
}

/// The files `init` wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CaFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// The files `node` wrote (and `ca_cert`, which it may have found already there).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub ca_cert: PathBuf,
}

pub fn node_cert_file(node: NodeId) -> String {
    format!("node-{}.pem", node.0)
}

pub fn node_key_file(node: NodeId) -> String {
    format!("node-{}.key", node.0)
}

/// `accord certs init --out DIR`: a new cluster CA in `out`.
pub fn init(out: &Path, days: u32) -> Result<CaFiles, CertsError> {
    let files = CaFiles {
        cert: out.join(CA_CERT_FILE),
        key: out.join(CA_KEY_FILE),
    };
    // Refuse before generating anything, so a half-written pair never replaces a good one.
    refuse_existing(&[&files.cert, &files.key])?;
    let ca = Ca::generate(days)?;
    create_dir(out)?;
    write_new(&files.key, &ca.key_pem, KEY_MODE)?;
    write_new(&files.cert, &ca.cert_pem, CERT_MODE)?;
    Ok(files)
}

/// `accord certs node ID --ca-dir DIR --out DIR`: a key and certificate for `node`, signed by the
/// CA in `ca_dir`, plus a copy of the CA certificate, in `out`.
pub fn node(node: NodeId, ca_dir: &Path, out: &Path, days: u32) -> Result<NodeFiles, CertsError> {
    let files = NodeFiles {
        cert: out.join(node_cert_file(node)),
        key: out.join(node_key_file(node)),
        ca_cert: out.join(CA_CERT_FILE),
    };
    refuse_existing(&[&files.cert, &files.key])?;
    let ca = Ca::load(ca_dir)?;
    let issued = ca.issue(node, days)?;
    create_dir(out)?;
    match fs::read_to_string(&files.ca_cert) {
        // `out` may be the CA's own directory, or hold the same CA from an earlier node.
        Ok(existing) if existing == ca.cert_pem => {}
        Ok(_) => return Err(CertsError::Exists(files.ca_cert)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => write_new(&files.ca_cert, &ca.cert_pem, CERT_MODE)?,
        Err(source) => {
            return Err(CertsError::Io {
                path: files.ca_cert,
                source,
            })
        }
    }
    write_new(&files.key, &issued.key_pem, KEY_MODE)?;
    write_new(&files.cert, &issued.cert_pem, CERT_MODE)?;
    Ok(files)
}

const KEY_MODE: u32 = 0o600;
const CERT_MODE: u32 = 0o644;

fn validity(days: u32) -> Result<(OffsetDateTime, OffsetDateTime), CertsError> {
    let now = OffsetDateTime::now_utc();
    let not_before = now - Duration::hours(1);
    let not_after = now
        .checked_add(Duration::days(i64::from(days)))
        .ok_or(CertsError::Validity(days))?;
    Ok((not_before, not_after))
}

fn refuse_existing(paths: &[&PathBuf]) -> Result<(), CertsError> {
    match paths.iter().find(|p| p.exists()) {
        Some(p) => Err(CertsError::Exists((*p).clone())),
        None => Ok(()),
    }
}

fn create_dir(dir: &Path) -> Result<(), CertsError> {
    let mut builder = fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
    builder.create(dir).map_err(|source| CertsError::Io {
        path: dir.to_path_buf(),
        source,
    })
}

/// Creates `path` (never replacing a file) with `mode` from the first byte on, so a key is never
/// readable by others, not even for a moment.
fn write_new(path: &Path, contents: &str, mode: u32) -> Result<(), CertsError> {
    let mut options = fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, mode);
    #[cfg(not(unix))]
    let _ = mode;
    let io = |source: std::io::Error| CertsError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut file = options.open(path).map_err(|e| match e.kind() {
        std::io::ErrorKind::AlreadyExists => CertsError::Exists(path.to_path_buf()),
        _ => io(e),
    })?;
    file.write_all(contents.as_bytes()).map_err(io)?;
    file.sync_all().map_err(io)
}

fn read(path: &Path) -> Result<String, CertsError> {
    fs::read_to_string(path).map_err(|source| CertsError::Io {
        path: path.to_path_buf(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::pki_types::pem::PemObject;

    #[test]
    fn node_names_are_canonical() {
        assert_eq!(node_dns_name(NodeId(7)), "node-7.accord");
        assert_eq!(parse_node_dns_name("node-7.accord"), Some(NodeId(7)));
        assert_eq!(parse_node_dns_name("node-0.accord"), Some(NodeId(0)));
        for bad in [
            "node-07.accord",
            "node-.accord",
            "node-+7.accord",
            "node-7.accord.evil",
            "x.node-7.accord",
        ] {
            assert_eq!(parse_node_dns_name(bad), None, "{bad}");
        }
        assert_eq!(parse_node_dns_name("node-4294967296.accord"), None, "beyond u32");
    }

    #[test]
    fn an_issued_certificate_names_its_node() {
        let ca = Ca::generate(30).unwrap();
        let cert = ca.issue(NodeId(42), 30).unwrap();
        let der = CertificateDer::from_pem_slice(cert.cert_pem.as_bytes()).unwrap();
        assert_eq!(certified_node(&der), Ok(NodeId(42)));
        let ca_der = CertificateDer::from_pem_slice(ca.cert_pem.as_bytes()).unwrap();
        assert_eq!(certified_node(&ca_der), Err(IdentityError::NoNodeName));
    }

    #[test]
    fn files_are_written_once_with_private_keys() {
        let dir = tempfile::tempdir().unwrap();
        let ca_dir = dir.path().join("ca");
        let ca = init(&ca_dir, 30).unwrap();
        assert!(matches!(init(&ca_dir, 30), Err(CertsError::Exists(_))));
        let out = dir.path().join("n1");
        let files = node(NodeId(1), &ca_dir, &out, 30).unwrap();
        assert!(matches!(node(NodeId(1), &ca_dir, &out, 30), Err(CertsError::Exists(_))));
        assert_eq!(fs::read(&files.ca_cert).unwrap(), fs::read(&ca.cert).unwrap());
        // A second node into the CA's own directory reuses its ca.pem.
        node(NodeId(2), &ca_dir, &ca_dir, 30).unwrap();
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode(&ca.key), 0o600);
            assert_eq!(mode(&files.key), 0o600);
            assert_eq!(mode(&files.cert), 0o644);
        }
        let der = CertificateDer::from_pem_file(&files.cert).unwrap();
        assert_eq!(certified_node(&der), Ok(NodeId(1)));
        let loaded = crate::TlsIdentity::load(&files.ca_cert, &files.cert, &files.key).unwrap();
        assert_eq!(loaded.node(), NodeId(1));
    }

    #[test]
    fn files_that_do_not_belong_together_are_refused_when_loaded() {
        let dir = tempfile::tempdir().unwrap();
        let ca_dir = dir.path().join("ca");
        init(&ca_dir, 30).unwrap();
        let one = node(NodeId(1), &ca_dir, &dir.path().join("n1"), 30).unwrap();
        let two = node(NodeId(2), &ca_dir, &dir.path().join("n2"), 30).unwrap();
        let other_ca = dir.path().join("other-ca");
        init(&other_ca, 30).unwrap();
        let foreign = node(NodeId(1), &other_ca, &dir.path().join("f1"), 30).unwrap();

        let mismatched = crate::TlsIdentity::load(&one.ca_cert, &one.cert, &two.key);
        assert!(
            matches!(mismatched, Err(crate::tls::TlsError::KeyMismatch)),
            "{mismatched:?}"
        );
        let from_other_ca = crate::TlsIdentity::load(&one.ca_cert, &foreign.cert, &foreign.key);
        assert!(
            matches!(from_other_ca, Err(crate::tls::TlsError::NotFromCa(_))),
            "{from_other_ca:?}"
        );
        assert!(crate::TlsIdentity::load(&one.ca_cert, &one.cert, &one.key).is_ok());
    }
}
