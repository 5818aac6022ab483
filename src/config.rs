//! The node's configuration file (`accord run --config node.toml`).
//!
//! Every key is documented in [`EXAMPLE`], which is also what `accord run --print-example-config`
//! prints and what the tests parse, so the documentation cannot drift from the parser. Unknown keys
//! are errors: a misspelt key silently falling back to a default is how clusters end up configured
//! differently from what their operators believe.

use std::net::{SocketAddr, ToSocketAddrs};
use std::path::{Path, PathBuf};

use accord_engine::{NodeId, ReplicationConfig};
use serde::Deserialize;
use thiserror::Error;

use crate::node::runtime::SpoolConfig;

/// Environment variables that override the file, so secrets need not be written in it.
pub const DSN_ENV: &str = "ACCORD_DSN";
pub const REVIEW_TOKEN_ENV: &str = "ACCORD_REVIEW_TOKEN";

pub const EXAMPLE: &str = r#"# accord node configuration. Keys not listed here are errors.

# This node's id: a positive integer, unique in the cluster, the same as `accord init --node-id`.
node_id = 1
# Nodes only talk to nodes of the same cluster.
cluster = "shop"
# The PostgreSQL database this node serves (libpq key=value form). The environment variable
# ACCORD_DSN overrides it, so the password need not be written here.
dsn = "host=127.0.0.1 port=5432 user=accord dbname=shop"
# UDP address for QUIC connections from peers.
listen = "0.0.0.0:7400"
# Optional: the address (host:port) other nodes reach this node at. The cluster learns it from
# here (nodes added later with `accord join` dial it). Default: `listen`, when it names one IP.
# address = "10.0.0.1:7400"

# Mutual TLS: the cluster CA and this node's certificate and key (`accord certs`).
[tls]
ca = "certs/ca.pem"
cert = "certs/node-1.pem"
key = "certs/node-1.key"

# The other nodes of the cluster when it was set up: id and QUIC address (host:port). The
# cluster's membership grows from these (`accord join`, `accord leave`); a node that joined a
# running cluster learns its peers from it and may list none.
[[peers]]
id = 2
address = "10.0.0.2:7400"

[[peers]]
id = 3
address = "10.0.0.3:7400"

# Optional. Defaults shown.
[replication]
# Most changes in one batch sent to a peer.
max_batch = 500
# Most changes sent to one peer and not yet acknowledged.
window = 10000
# A peer whose clock is further ahead than this is refused.
max_clock_offset_ms = 500
# How often the node with the lowest id starts a round of tombstone collection (deleted rows'
# metadata is dropped once every node has acknowledged the deletes; ARCHITECTURE.md).
tombstone_round_secs = 60
# A node applies another's transaction only after the transactions that one had applied before
# it (its rows carry their effects), so that no reader sees part of a third node's transaction.
# While the node those come from is unreachable, it waits at most this long, then applies anyway
# so that the nodes that are up keep replicating (accord status counts it).
causal_wait_ms = 10000
# synchronous_commit of apply transactions. Off, like PostgreSQL's own subscription workers: a
# server crash may lose the last applied batches, which peers then resend.
synchronous_commit = false
# A peer's transaction is applied whole, in one local transaction. One larger than this (MB,
# estimated as held in memory) is spooled to a file while it arrives, and applied from there
# when complete, so memory stays bounded whatever its size.
spool_mb = 32
# Where spool files go (they are unlinked at creation: nothing stays behind after a crash).
# Default: the system's temporary directory ($TMPDIR or /tmp).
# spool_dir = "/var/lib/accord/spool"

# Optional: Prometheus metrics at /metrics, the status at /status (JSON, read by `accord
# status`), and verifications at POST /verify (`accord verify`: read-only, but it reads every
# replicated row on every node). No secrets are served here; bind it to an address only
# operators reach.
[metrics]
listen = "127.0.0.1:9480"

# Optional: the review page. Reviewers open http://ADDRESS/?token=TOKEN once to log in. The
# environment variable ACCORD_REVIEW_TOKEN overrides the token. At least 16 characters.
[review_page]
listen = "127.0.0.1:8480"
token = "change-me-to-a-long-random-string"
"#;

#[derive(Debug, Error)]
pub enum ConfigError {
    #[error("cannot read the configuration file {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{path}: {message}")]
    Syntax { path: PathBuf, message: String },
    #[error("{path}: `{key}`: {message}")]
    Invalid {
        path: PathBuf,
        key: String,
        message: String,
    },
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    node_id: u32,
    cluster: String,
    dsn: Option<String>,
    listen: String,
    address: Option<String>,
    tls: TlsFile,
    #[serde(default)]
    peers: Vec<PeerFile>,
    #[serde(default)]
    replication: ReplicationFile,
    metrics: Option<ListenFile>,
    review_page: Option<ReviewPageFile>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TlsFile {
    ca: PathBuf,
    cert: PathBuf,
    key: PathBuf,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PeerFile {
    id: u32,
    address: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct ReplicationFile {
    max_batch: usize,
    window: u64,
    max_clock_offset_ms: u64,
    tombstone_round_secs: u64,
    causal_wait_ms: u64,
    synchronous_commit: bool,
    spool_mb: usize,
    spool_dir: Option<PathBuf>,
}

impl Default for ReplicationFile {
    fn default() -> Self {
        let d = ReplicationConfig::default();
        ReplicationFile {
            max_batch: d.max_batch,
            window: d.window,
            max_clock_offset_ms: d.max_offset_micros / 1000,
            tombstone_round_secs: d.tombstone_round_micros / 1_000_000,
            causal_wait_ms: d.causal_wait_micros / 1000,
            synchronous_commit: false,
            spool_mb: crate::node::runtime::DEFAULT_SPOOL_MB,
            spool_dir: None,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ListenFile {
    listen: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ReviewPageFile {
    listen: String,
    token: Option<String>,
}

#[derive(Debug, Clone)]
pub struct TlsPaths {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

#[derive(Debug, Clone)]
pub struct PeerConfig {
    pub id: NodeId,
    /// As written; resolved when the node starts (a name may resolve differently later).
    pub address: String,
}

#[derive(Debug, Clone)]
pub struct ReviewPageConfig {
    pub listen: SocketAddr,
    pub token: String,
}

/// A checked configuration.
#[derive(Clone)]
pub struct ServiceConfig {
    pub path: PathBuf,
    pub node: NodeId,
    pub cluster: String,
    pub dsn: String,
    pub listen: SocketAddr,
    /// Where other nodes reach this one (`address`, or `listen` when it names one IP).
    pub address: Option<String>,
    pub tls: TlsPaths,
    pub peers: Vec<PeerConfig>,
    pub replication: ReplicationConfig,
    pub synchronous_commit: bool,
    pub spool: SpoolConfig,
    pub metrics: Option<SocketAddr>,
    pub review_page: Option<ReviewPageConfig>,
}

// Hand-written so that neither the DSN (it may hold a password) nor the token is ever printed.
impl std::fmt::Debug for ServiceConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServiceConfig")
            .field("path", &self.path)
            .field("node", &self.node)
            .field("cluster", &self.cluster)
            .field("dsn", &"<hidden>")
            .field("listen", &self.listen)
            .field("tls", &self.tls)
            .field("peers", &self.peers)
            .field("replication", &self.replication)
            .field("synchronous_commit", &self.synchronous_commit)
            .field("spool", &self.spool)
            .field("metrics", &self.metrics)
            .field("review_page", &self.review_page.as_ref().map(|r| r.listen))
            .finish()
    }
}

/// Where the environment overrides come from (the process environment, or a test's map).
pub trait Environment {
    fn var(&self, name: &str) -> Option<String>;
}

pub struct ProcessEnvironment;

impl Environment for ProcessEnvironment {
    fn var(&self, name: &str) -> Option<String> {
        std::env::var(name).ok().filter(|v| !v.is_empty())
    }
}

impl ServiceConfig {
    pub fn load(path: &Path, env: &dyn Environment) -> Result<ServiceConfig, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(&text, path, env)
    }

    /// Parses and checks `text`; `path` names the file in errors and anchors relative paths.
    pub fn parse(text: &str, path: &Path, env: &dyn Environment) -> Result<ServiceConfig, ConfigError> {
        let file: File = toml::from_str(text).map_err(|e| ConfigError::Syntax {
            path: path.to_path_buf(),
            message: e.to_string().trim_end().to_string(),
        })?;
        let invalid = |key: &str, message: String| ConfigError::Invalid {
            path: path.to_path_buf(),
            key: key.to_string(),
            message,
        };
        if file.node_id == 0 {
            return Err(invalid("node_id", "must be a positive integer".into()));
        }
        let node = NodeId(file.node_id);
        if file.cluster.trim().is_empty() {
            return Err(invalid("cluster", "must not be empty".into()));
        }
        let dsn = match (env.var(DSN_ENV), file.dsn) {
            (Some(dsn), _) | (None, Some(dsn)) => dsn,
            (None, None) => {
                return Err(invalid(
                    "dsn",
                    format!("missing: set it in the file or in the environment variable {DSN_ENV}"),
                ))
            }
        };
        let listen = socket_addr(&file.listen).map_err(|m| invalid("listen", m))?;
        let address = match &file.address {
            Some(address) => {
                check_host_port(address).map_err(|m| invalid("address", m))?;
                Some(address.clone())
            }
            None if !listen.ip().is_unspecified() => Some(listen.to_string()),
            None => None,
        };

        // Relative certificate paths are relative to the configuration file, not to wherever the
        // node happens to be started from.
        let base = path.parent().unwrap_or(Path::new("."));
        let tls = TlsPaths {
            ca: existing_file(base, &file.tls.ca).map_err(|m| invalid("tls.ca", m))?,
            cert: existing_file(base, &file.tls.cert).map_err(|m| invalid("tls.cert", m))?,
            key: existing_file(base, &file.tls.key).map_err(|m| invalid("tls.key", m))?,
        };

        let mut peers: Vec<PeerConfig> = Vec::new();
        for (i, peer) in file.peers.iter().enumerate() {
            let key = format!("peers[{i}]");
            if peer.id == 0 {
                return Err(invalid(&format!("{key}.id"), "must be a positive integer".into()));
            }
            if peer.id == node.0 {
                return Err(invalid(
                    &format!("{key}.id"),
                    format!("{} is this node's own id (node_id)", peer.id),
                ));
            }
            if peers.iter().any(|p| p.id.0 == peer.id) {
                return Err(invalid(
                    &format!("{key}.id"),
                    format!("node {} is listed twice", peer.id),
                ));
            }
            check_host_port(&peer.address).map_err(|m| invalid(&format!("{key}.address"), m))?;
            peers.push(PeerConfig {
                id: NodeId(peer.id),
                address: peer.address.clone(),
            });
        }

        let r = &file.replication;
        if r.max_batch == 0 {
            return Err(invalid("replication.max_batch", "must be at least 1".into()));
        }
        if r.window < r.max_batch as u64 {
            return Err(invalid(
                "replication.window",
                format!("must be at least max_batch ({})", r.max_batch),
            ));
        }
        if r.max_clock_offset_ms == 0 || r.max_clock_offset_ms > 60_000 {
            return Err(invalid(
                "replication.max_clock_offset_ms",
                "must be between 1 and 60000".into(),
            ));
        }
        if r.tombstone_round_secs == 0 || r.tombstone_round_secs > 86_400 * 30 {
            return Err(invalid(
                "replication.tombstone_round_secs",
                "must be between 1 and 2592000 (30 days)".into(),
            ));
        }
        if r.causal_wait_ms > 86_400_000 {
            return Err(invalid(
                "replication.causal_wait_ms",
                "must be at most 86400000 (a day)".into(),
            ));
        }
        if r.spool_mb == 0 || r.spool_mb > 1 << 20 {
            return Err(invalid(
                "replication.spool_mb",
                "must be between 1 and 1048576 (a TB)".into(),
            ));
        }
        if let Some(dir) = &r.spool_dir {
            if !dir.is_dir() {
                return Err(invalid(
                    "replication.spool_dir",
                    format!("{} is not a directory", dir.display()),
                ));
            }
        }
        let spool = SpoolConfig {
            bound_bytes: r.spool_mb << 20,
            dir: r.spool_dir.clone(),
        };
        let replication = ReplicationConfig {
            max_batch: r.max_batch,
            window: r.window,
            max_offset_micros: r.max_clock_offset_ms * 1000,
            tombstone_round_micros: r.tombstone_round_secs * 1_000_000,
            causal_wait_micros: r.causal_wait_ms * 1000,
        };

        let metrics = file
            .metrics
            .map(|m| socket_addr(&m.listen).map_err(|e| invalid("metrics.listen", e)))
            .transpose()?;
        let review_page = match file.review_page {
            None => None,
            Some(page) => {
                let listen = socket_addr(&page.listen).map_err(|e| invalid("review_page.listen", e))?;
                let token = env.var(REVIEW_TOKEN_ENV).or(page.token).ok_or_else(|| {
                    invalid(
                        "review_page.token",
                        format!("missing: set it in the file or in the environment variable {REVIEW_TOKEN_ENV}"),
                    )
                })?;
                if token.chars().count() < 16 {
                    return Err(invalid(
                        "review_page.token",
                        "must be at least 16 characters: it is all that guards the review page".into(),
                    ));
                }
                Some(ReviewPageConfig { listen, token })
            }
        };

        Ok(ServiceConfig {
            path: path.to_path_buf(),
            node,
            cluster: file.cluster,
            dsn,
            listen,
            address,
            tls,
            peers,
            replication,
            synchronous_commit: r.synchronous_commit,
            spool,
            metrics,
            review_page,
        })
    }
}

fn socket_addr(text: &str) -> Result<SocketAddr, String> {
    text.parse()
        .map_err(|_| format!("{text:?} is not an IP address with a port, like \"127.0.0.1:7400\""))
}

/// A peer address is `host:port`; the host is resolved when the node starts.
fn check_host_port(text: &str) -> Result<(), String> {
    let bad = || format!("{text:?} is not host:port, like \"10.0.0.2:7400\" or \"db2.example.com:7400\"");
    let (host, port) = text.rsplit_once(':').ok_or_else(bad)?;
    if host.is_empty() || port.parse::<u16>().map_or(true, |p| p == 0) {
        return Err(bad());
    }
    Ok(())
}

fn existing_file(base: &Path, path: &Path) -> Result<PathBuf, String> {
    let full = if path.is_absolute() {
        path.to_path_buf()
    } else {
        base.join(path)
    };
    match std::fs::metadata(&full) {
        Ok(m) if m.is_file() => Ok(full),
        Ok(_) => Err(format!("{} is not a file", full.display())),
        Err(e) => Err(format!("cannot read {}: {e}", full.display())),
    }
}

/// Resolves a peer's address to one socket address.
pub fn resolve(peer: &PeerConfig) -> Result<SocketAddr, String> {
    let mut addrs = peer
        .address
        .to_socket_addrs()
        .map_err(|e| format!("cannot resolve the address of node {} ({}): {e}", peer.id, peer.address))?;
    addrs
        .next()
        .ok_or_else(|| format!("the address of node {} ({}) resolves to nothing", peer.id, peer.address))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    struct Env(BTreeMap<&'static str, &'static str>);

    impl Environment for Env {
        fn var(&self, name: &str) -> Option<String> {
            self.0.get(name).map(|v| v.to_string())
        }
    }

    fn no_env() -> Env {
        Env(BTreeMap::new())
    }

    /// The example with its certificate paths pointing at real files in `dir`.
    fn example_in(dir: &Path) -> (PathBuf, String) {
        std::fs::create_dir_all(dir.join("certs")).unwrap();
        for f in ["ca.pem", "node-1.pem", "node-1.key"] {
            std::fs::write(dir.join("certs").join(f), "x").unwrap();
        }
        (dir.join("node.toml"), EXAMPLE.to_string())
    }

    fn error(text: &str, env: &Env) -> String {
        let dir = tempfile::tempdir().unwrap();
        let (path, _) = example_in(dir.path());
        ServiceConfig::parse(text, &path, env).unwrap_err().to_string()
    }

    #[test]
    fn the_documented_example_parses_with_its_defaults() {
        let dir = tempfile::tempdir().unwrap();
        let (path, text) = example_in(dir.path());
        let config = ServiceConfig::parse(&text, &path, &no_env()).unwrap();
        assert_eq!(config.node, NodeId(1));
        assert_eq!(config.peers.len(), 2);
        assert_eq!(config.replication, ReplicationConfig::default());
        assert!(!config.synchronous_commit);
        assert_eq!(config.tls.cert, dir.path().join("certs/node-1.pem"));
        assert_eq!(config.metrics, Some("127.0.0.1:9480".parse().unwrap()));
        assert!(!format!("{config:?}").contains("user=accord"), "Debug hides the DSN");
        assert!(!format!("{config:?}").contains("change-me"), "Debug hides the token");
    }

    #[test]
    fn the_environment_overrides_the_dsn_and_the_token() {
        let dir = tempfile::tempdir().unwrap();
        let (path, text) = example_in(dir.path());
        let env = Env(BTreeMap::from([
            (DSN_ENV, "host=elsewhere"),
            (REVIEW_TOKEN_ENV, "a-token-from-the-environment"),
        ]));
        let config = ServiceConfig::parse(&text, &path, &env).unwrap();
        assert_eq!(config.dsn, "host=elsewhere");
        assert_eq!(config.review_page.unwrap().token, "a-token-from-the-environment");
    }

    #[test]
    fn each_mistake_names_its_key() {
        let cases: Vec<(String, &str)> = vec![
            (EXAMPLE.replace("node_id = 1\n", ""), "node_id"),
            (EXAMPLE.replace("cluster = ", "clustre = "), "clustre"),
            (EXAMPLE.replace("window = 10000", "windw = 10000"), "windw"),
            (EXAMPLE.replace("node_id = 1", "node_id = -1"), "node_id"),
            (EXAMPLE.replace("node_id = 1", "node_id = 0"), "node_id"),
            (
                EXAMPLE.replace("listen = \"0.0.0.0:7400\"", "listen = \"localhost\""),
                "listen",
            ),
            (EXAMPLE.replace("certs/node-1.pem", "certs/missing.pem"), "tls.cert"),
            (EXAMPLE.replace("id = 3", "id = 2"), "peers[1].id"),
            (EXAMPLE.replace("id = 3", "id = 1"), "peers[1].id"),
            (EXAMPLE.replace("\"10.0.0.2:7400\"", "\"10.0.0.2\""), "peers[0].address"),
            (
                EXAMPLE.replace("max_batch = 500", "max_batch = 0"),
                "replication.max_batch",
            ),
            (EXAMPLE.replace("window = 10000", "window = 10"), "replication.window"),
            (
                EXAMPLE.replace("max_clock_offset_ms = 500", "max_clock_offset_ms = \"fast\""),
                "max_clock_offset_ms",
            ),
            (
                EXAMPLE.replace("change-me-to-a-long-random-string", "short"),
                "review_page.token",
            ),
            (
                EXAMPLE.replace("dsn = \"host=127.0.0.1 port=5432 user=accord dbname=shop\"\n", ""),
                "dsn",
            ),
        ];
        for (text, key) in cases {
            let message = error(&text, &no_env());
            assert!(message.contains(key), "{key:?} is not named in: {message}");
        }
    }

    #[test]
    fn an_unreadable_file_is_named() {
        let message = ServiceConfig::load(Path::new("/nonexistent/node.toml"), &no_env())
            .unwrap_err()
            .to_string();
        assert!(message.contains("/nonexistent/node.toml"), "{message}");
    }

    mod fuzz {
        use super::*;
        use proptest::prelude::*;

        proptest! {
            /// Any text, and the example with lines dropped or garbled, is a configuration or an
            /// error, never a panic. `PROPTEST_CASES=100000 cargo test -p accord --lib config::tests::fuzz`
            /// runs it for a while.
            #[test]
            fn no_input_panics(
                text in ".{0,400}",
                drop_line in any::<prop::sample::Index>(),
                garble in any::<prop::sample::Index>(),
                junk in "[ -~]{0,20}",
            ) {
                let dir = tempfile::tempdir().unwrap();
                let (path, example) = example_in(dir.path());
                let _ = ServiceConfig::parse(&text, &path, &no_env());
                let mut lines: Vec<String> = example.lines().map(String::from).collect();
                lines.remove(drop_line.index(lines.len()));
                let i = garble.index(lines.len());
                lines[i].push_str(&junk);
                let _ = ServiceConfig::parse(&lines.join("\n"), &path, &no_env());
            }
        }
    }
}
