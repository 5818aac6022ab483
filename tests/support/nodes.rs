//! Clusters of accord nodes on real temporary PostgreSQL clusters, joined in process by the
//! in-memory network (the QUIC transport provides the same interface).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use accord::node::init::init;
use std::net::{SocketAddr, UdpSocket};

use accord::node::net::MemoryHub;
use accord::node::quic::quic_port;
use accord::node::runtime::{start, NodeConfig, NodeHandle, NodeStatus, SpoolConfig};
use accord_engine::{NodeId, ReplicationConfig};
use accord_transport::{EndpointConfig, PeerAddr, TlsIdentity};

use super::pg::PgCluster;

pub const SHOP: &str = "
CREATE SCHEMA shop;
CREATE TABLE shop.products (
    id bigint PRIMARY KEY,
    name text NOT NULL,
    stock bigint NOT NULL DEFAULT 0,
    balance numeric(20,4) NOT NULL DEFAULT 0,
    price numeric(10,2)
);
COMMENT ON TABLE  shop.products         IS 'Catalogue. @accord replicate';
COMMENT ON COLUMN shop.products.stock   IS '@accord delta';
COMMENT ON COLUMN shop.products.balance IS '@accord delta';
COMMENT ON COLUMN shop.products.price   IS 'Price. @accord review';
CREATE TABLE shop.users (
    id integer PRIMARY KEY,
    email text NOT NULL UNIQUE,
    name text
);
COMMENT ON TABLE shop.users IS '@accord replicate';
";

pub const DB: &str = "shop";

/// How the test nodes reach each other.
pub enum Net {
    /// The in-process hub: links can be cut and healed.
    Memory,
    /// Real QUIC with mutual TLS on loopback.
    Quic,
}

struct QuicSetup {
    ca: accord_transport::certs::Ca,
    ports: Vec<u16>,
}

pub struct TestCluster {
    pub pg: Vec<PgCluster>,
    pub hub: MemoryHub,
    quic: Option<QuicSetup>,
    pub nodes: BTreeMap<NodeId, NodeHandle>,
    pub replication: ReplicationConfig,
    pub spool: SpoolConfig,
}

pub fn id(i: usize) -> NodeId {
    NodeId(i as u32 + 1)
}

impl TestCluster {
    /// `n` databases with `schema`, initialised as nodes 1..=n, and the nodes started.
    pub async fn start(n: usize, schema: &str) -> TestCluster {
        Self::start_on(n, schema, Net::Memory).await
    }

    pub async fn start_on(n: usize, schema: &str, net: Net) -> TestCluster {
        // RUST_LOG=accord=debug shows what the nodes do; warnings and errors show by default.
        let _ = tracing_subscriber::fmt()
            .with_test_writer()
            .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()))
            .try_init();
        let pg = tokio::task::spawn_blocking(move || PgCluster::start_many(n))
            .await
            .expect("starting clusters panicked");
        for (i, cluster) in pg.iter().enumerate() {
            let mut db = cluster.create_database(DB).await;
            db.batch_execute(schema).await.expect("test schema applies");
            init(&mut db, id(i)).await.expect("accord init succeeds");
        }
        let quic = match net {
            Net::Memory => None,
            Net::Quic => Some(QuicSetup {
                ca: accord_transport::certs::Ca::generate(1).expect("a test CA"),
                ports: (0..n).map(|_| free_udp_port()).collect(),
            }),
        };
        let mut cluster = TestCluster {
            pg,
            hub: MemoryHub::new(),
            quic,
            nodes: BTreeMap::new(),
            replication: ReplicationConfig {
                max_batch: 200,
                window: 2_000,
                // Rounds often enough that the end-to-end tests see tombstones collected.
                tombstone_round_micros: 1_000_000,
                ..ReplicationConfig::default()
            },
            // Small, so that the tests' large transactions (a few MB) are spooled to disk.
            spool: SpoolConfig {
                bound_bytes: 1 << 20,
                dir: None,
            },
        };
        for i in 0..n {
            cluster.start_node(i).await;
        }
        cluster
    }

    pub fn config(&self, i: usize) -> NodeConfig {
        NodeConfig {
            node: id(i),
            dsn: self.pg[i].dsn(DB),
            cluster: "test".into(),
            peers: (0..self.pg.len()).filter(|&j| j != i).map(id).collect(),
            addresses: Default::default(),
            replication: self.replication,
            synchronous_commit: false,
            spool: self.spool.clone(),
        }
    }

    pub async fn start_node(&mut self, i: usize) {
        let node = id(i);
        let started = match &self.quic {
            None => {
                let hub = self.hub.clone();
                start(self.config(i), move |_, hello| async move {
                    Ok(hub.join(node, hello).await)
                })
                .await
            }
            Some(quic) => {
                let listen: SocketAddr = ([127, 0, 0, 1], quic.ports[i]).into();
                let peers: Vec<PeerAddr> = (0..self.pg.len())
                    .filter(|&j| j != i)
                    .map(|j| PeerAddr {
                        node: id(j),
                        addr: ([127, 0, 0, 1], quic.ports[j]).into(),
                    })
                    .collect();
                let cert = quic.ca.issue(node, 1).expect("a node certificate");
                let tls = TlsIdentity::from_pem(&quic.ca.cert_pem, &cert.cert_pem, &cert.key_pem).expect("PEM reads");
                start(self.config(i), move |identity, hello| async move {
                    let mut config = EndpointConfig::new(identity, listen, peers, tls);
                    config.keep_alive = Duration::from_millis(200);
                    config.idle_timeout = Duration::from_secs(5);
                    config.backoff.initial = Duration::from_millis(50);
                    config.backoff.max = Duration::from_millis(500);
                    quic_port(config, hello).map(|(port, _)| port)
                })
                .await
            }
        };
        let handle = started.unwrap_or_else(|e| panic!("node {node} does not start: {e:#}"));
        self.nodes.insert(node, handle);
    }

    /// Stops node `i` as a crash would.
    pub async fn kill_node(&mut self, i: usize) {
        self.hub.leave(id(i)).await;
        if let Some(handle) = self.nodes.remove(&id(i)) {
            handle.kill().await;
        }
    }

    pub async fn stop_all(mut self) {
        // Every node stops before any leaves the network: a node whose network closes under it
        // reports that as an error.
        for (node, handle) in std::mem::take(&mut self.nodes) {
            handle
                .stop()
                .await
                .unwrap_or_else(|e| panic!("node {node} stopped with an error: {e:#}"));
        }
    }

    /// Cuts every link: each node writes alone until [`TestCluster::heal_all`].
    pub async fn partition_all(&self) {
        for a in 0..self.pg.len() {
            for b in a + 1..self.pg.len() {
                self.hub.cut(id(a), id(b)).await;
            }
        }
    }

    pub async fn heal_all(&self) {
        for a in 0..self.pg.len() {
            for b in a + 1..self.pg.len() {
                self.hub.heal(id(a), id(b)).await;
            }
        }
    }

    /// `writers_per_node` clients on every database, each adding 1 to `shop.products.stock` of
    /// rows `1..=rows` in turn, `per_writer` times (one transaction each).
    pub async fn spawn_increments(
        &self,
        writers_per_node: i64,
        per_writer: i64,
        rows: i64,
    ) -> Vec<tokio::task::JoinHandle<()>> {
        let mut writers = Vec::new();
        for node in 0..self.pg.len() {
            for w in 0..writers_per_node {
                let db = self.client(node).await;
                writers.push(tokio::spawn(async move {
                    for i in 0..per_writer {
                        let id = 1 + (i + w) % rows;
                        db.execute("UPDATE shop.products SET stock = stock + 1 WHERE id = $1", &[&id])
                            .await
                            .unwrap_or_else(|e| panic!("increment failed: {e}"));
                    }
                }));
            }
        }
        writers
    }

    pub async fn client(&self, i: usize) -> tokio_postgres::Client {
        self.pg[i].connect(DB).await
    }

    pub fn statuses(&self) -> Vec<NodeStatus> {
        self.nodes.values().map(|h| h.status.borrow().clone()).collect()
    }

    /// Waits until every node has sent everything it captured and every peer acknowledged it, and
    /// the contents of `tables` and the review queues are the same everywhere; then returns them.
    pub async fn converge(&self, tables: &[&str], limit: Duration) -> Vec<String> {
        let limit = std::env::var("ACCORD_TEST_CONVERGE_SECS")
            .ok()
            .and_then(|s| s.parse().ok())
            .map(Duration::from_secs)
            .unwrap_or(limit);
        let started = Instant::now();
        let mut stable = 0;
        let mut last = Vec::new();
        loop {
            let quiet = self
                .statuses()
                .iter()
                .all(|s| s.peers.values().all(|p| p.connected && p.unacked == 0));
            let mut snapshots = Vec::new();
            for i in 0..self.pg.len() {
                snapshots.push(snapshot(&self.client(i).await, tables).await);
            }
            let same = snapshots.windows(2).all(|w| w[0] == w[1]);
            if quiet && same && snapshots.first() == last.first() {
                stable += 1;
                if stable >= 3 {
                    return snapshots;
                }
            } else {
                stable = 0;
            }
            last = snapshots;
            if started.elapsed() > limit {
                let statuses = self.statuses();
                panic!(
                    "no convergence after {limit:?}; statuses: {statuses:#?}\nsnapshots:\n{}",
                    last.join("\n----\n")
                );
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    }
}

/// A UDP port free on loopback now, below Linux's ephemeral range (32768 and up): a port the
/// kernel hands out can be taken by any socket bound to port 0 between a node's restarts (a run
/// saw "Address already in use" on a restarted node's QUIC port). As `cli::free_tcp_port`.
pub fn free_udp_port() -> u16 {
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let spread = std::process::id().wrapping_mul(6_151);
    for _ in 0..10_000 {
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let port = 20_000 + (spread.wrapping_add(n.wrapping_mul(104_723)) % 12_000) as u16;
        if UdpSocket::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free UDP port on loopback between 20000 and 32000")
}

/// The count of local transactions that removed rows of replicated tables on `db`
/// (`accord.local_removals`).
pub async fn local_removal_count(db: &tokio_postgres::Client) -> i64 {
    db.query_one(
        "SELECT COALESCE(pg_sequence_last_value('accord.local_removals'::regclass), 0)",
        &[],
    )
    .await
    .expect("the count of local removals is readable")
    .get(0)
}

/// Everything a node holds in `tables` and its review queue, as text, in a stable order.
pub async fn snapshot(db: &tokio_postgres::Client, tables: &[&str]) -> String {
    let mut out = String::new();
    for table in tables {
        let rows = db
            .query(&format!("SELECT t::text FROM {table} t ORDER BY 1"), &[])
            .await
            .unwrap_or_else(|e| panic!("cannot read {table}: {e}"));
        out.push_str(&format!("{table}:\n"));
        for row in rows {
            out.push_str(&format!("  {}\n", row.get::<_, String>(0)));
        }
    }
    let items = db
        .query(
            "SELECT id, kind, status, table_name, row_key, coalesce(column_name, ''), candidates::text
             FROM accord.review_items WHERE kind IN ('concurrent', 'displaced_insert') ORDER BY id",
            &[],
        )
        .await
        .expect("review items are readable");
    out.push_str("review:\n");
    for row in items {
        let cols: Vec<String> = (0..7).map(|i| row.get::<_, String>(i)).collect();
        out.push_str(&format!("  {}\n", cols.join(" | ")));
    }
    out
}
