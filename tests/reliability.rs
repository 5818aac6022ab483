//! Faults on real processes (issue 9): three `accord run` processes from the built binary, each
//! beside its own temporary PostgreSQL cluster, QUIC on loopback, writers on all three databases;
//! then kill -9 of nodes, crashes of PostgreSQL, rolling restarts, a network partition, and (behind
//! `--ignored`) a soak. After every fault: the nodes converge to identical tables and review queues,
//! and the `delta` sums are exact — nothing lost, nothing applied twice.
//!
//! Exactness does not depend on knowing which commits a crash interrupted: every writer
//! transaction that changes a `delta` column also inserts its delta into `local.ledger`, a table
//! accord does not replicate, in the same transaction. A commit whose outcome the writer could not
//! learn is then counted if and only if it happened. The expected sum of `stock` on every node is
//! the sum of the three ledgers.
//!
//! Sizes (environment variables, small defaults so that the file runs in a few minutes in CI):
//! `ACCORD_RELIABILITY_KILLS` (4; the full form is 20), `ACCORD_RELIABILITY_PG_CRASHES` (2),
//! `ACCORD_RELIABILITY_CUT_SECS` (8), `ACCORD_RELIABILITY_WRITERS` (writers per node, 2),
//! `ACCORD_RELIABILITY_PAUSE_MS` (between a writer's transactions, 10),
//! `ACCORD_RELIABILITY_CONVERGE_SECS` (deadline, 150), `ACCORD_RELIABILITY_SEED` (random moments),
//! `ACCORD_SOAK_SECS` (600) for the soak.

mod support;

use std::collections::BTreeMap;
use std::fs::OpenOptions;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use support::cli::{accord, free_tcp_port};
use support::nodes::{free_udp_port, snapshot, SHOP};
use support::pg::{PgCluster, StopMode};
use support::service::{http_get, memory_kib};
use tokio::net::UdpSocket;
use tokio::task::JoinHandle;

/// The tests start three PostgreSQL servers and three nodes each; on two shared cores they run one
/// at a time.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Beside the test schema (`SHOP`). Not replicated: what this node's writers committed, for the
/// exact expected sums.
const LEDGER: &str = "
CREATE SCHEMA local;
CREATE TABLE local.ledger (
    id bigserial PRIMARY KEY,
    stock bigint NOT NULL,
    balance numeric(20,4) NOT NULL
);
";

/// Also beside `SHOP`, before `accord init`: a long text column (`lww`), always stored out of line
/// (TOAST) when it holds more than about 2 kB. Only the TOAST test writes it.
const NOTE: &str = "
ALTER TABLE shop.products ADD COLUMN note text;
ALTER TABLE shop.products ALTER COLUMN note SET STORAGE EXTERNAL;
";

const TABLES: [&str; 1] = ["shop.products"];
/// Rows every writer increments.
const HOT_ROWS: i64 = 5;
/// A row only the partition test writes, on its review column.
const PRICE_ROW: i64 = 999;
/// The row only the TOAST test writes.
const TOAST_ROW: i64 = 4242;

/// The keys the writers insert and delete over and over (beside the hot rows and new keys).
const CHURN_KEYS: i64 = 900_000_000;

fn env_u64(name: &str, default: u64) -> u64 {
    match std::env::var(name) {
        Ok(text) => text
            .parse()
            .unwrap_or_else(|_| panic!("{name}={text:?} is not a whole number")),
        Err(_) => default,
    }
}

fn converge_limit() -> Duration {
    Duration::from_secs(env_u64("ACCORD_RELIABILITY_CONVERGE_SECS", 150))
}

/// A small deterministic generator for the random moments; the seed is printed so that a failing
/// schedule can be replayed with `ACCORD_RELIABILITY_SEED`.
struct Rng(u64);

impl Rng {
    fn from_env(test: &str) -> Rng {
        let seed = env_u64(
            "ACCORD_RELIABILITY_SEED",
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64,
        );
        eprintln!("[{test}] seed {seed} (ACCORD_RELIABILITY_SEED={seed} replays the schedule)");
        Rng(seed | 1)
    }

    fn next(&mut self) -> u64 {
        // xorshift64*
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    fn millis(&mut self, from: u64, to: u64) -> Duration {
        Duration::from_millis(from + self.below(to - from + 1))
    }
}

async fn connect(dsn: &str) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    let (client, connection) = tokio_postgres::connect(dsn, tokio_postgres::NoTls).await?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(client)
}

/// One `accord run` process, restartable; killed when dropped (a failing test leaves nothing).
struct NodeProc {
    id: u32,
    config: PathBuf,
    log: PathBuf,
    metrics: u16,
    child: Option<Child>,
    starts: u32,
}

impl NodeProc {
    fn spawn(&mut self) {
        assert!(self.child.is_none(), "node {} is already running", self.id);
        let log = OpenOptions::new().create(true).append(true).open(&self.log).unwrap();
        self.starts += 1;
        use std::io::Write;
        writeln!(&log, "===== start {} of node {} =====", self.starts, self.id).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_accord"))
            .args(["run", "--config", self.config.to_str().unwrap()])
            .env_remove("ACCORD_DSN")
            .env(
                "ACCORD_LOG",
                std::env::var("ACCORD_RELIABILITY_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdout(Stdio::from(log.try_clone().unwrap()))
            .stderr(Stdio::from(log))
            .spawn()
            .expect("accord run starts");
        self.child = Some(child);
    }

    fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// SIGKILL: a crash.
    fn kill9(&mut self) {
        let mut child = self.child.take().expect("the node runs");
        child.kill().unwrap();
        child.wait().unwrap();
    }

    /// SIGTERM, and the exit status within `limit` (panics, with the log, if it hangs).
    async fn terminate(&mut self, limit: Duration) -> ExitStatus {
        let mut child = self.child.take().expect("the node runs");
        let sent = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status()
            .unwrap();
        assert!(sent.success());
        let started = Instant::now();
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return status;
            }
            if started.elapsed() > limit {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "node {} did not stop within {limit:?} of SIGTERM; its log:\n{}",
                    self.id,
                    self.log_tail(60)
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits until the process ends by itself, and returns its status (panics, with the log,
    /// after `limit`).
    async fn wait_exit(&mut self, limit: Duration) -> ExitStatus {
        let started = Instant::now();
        loop {
            if let Some(status) = self.exited() {
                return status;
            }
            assert!(
                started.elapsed() < limit,
                "node {} did not stop by itself within {limit:?}; its log:\n{}",
                self.id,
                self.log_tail(40)
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The exit status if the process ended by itself (it is then no longer held).
    fn exited(&mut self) -> Option<ExitStatus> {
        let status = self.child.as_mut()?.try_wait().unwrap()?;
        self.child = None;
        Some(status)
    }

    /// From the node's log: collection rounds it saw complete, and tombstones it deleted.
    fn tombstones_collected(&self) -> (u64, u64) {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let rounds = text
            .lines()
            .filter(|l| l.contains("tombstone-collection round complete"))
            .count();
        let deleted = text
            .lines()
            .filter(|l| l.contains("tombstones collected"))
            .filter_map(|l| {
                l.split("deleted=")
                    .nth(1)?
                    .split_whitespace()
                    .next()?
                    .parse::<u64>()
                    .ok()
            })
            .sum();
        (rounds as u64, deleted)
    }

    fn log_tail(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// The last `lines` warnings and errors of the node's log.
    fn warnings(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let all: Vec<&str> = text
            .lines()
            .filter(|l| l.contains(" WARN ") || l.contains(" ERROR "))
            .collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    async fn status(&self) -> Option<serde_json::Value> {
        let text = http_get(self.metrics, "/status").await?;
        let body = text.split("\r\n\r\n").nth(1)?;
        serde_json::from_str(body).ok()
    }

    /// Starts the process and waits until it serves its status.
    async fn start(&mut self) {
        self.spawn();
        let started = Instant::now();
        loop {
            if self.status().await.is_some() {
                return;
            }
            if let Some(status) = self.exited() {
                panic!(
                    "node {} exited ({status}) while starting; its log:\n{}",
                    self.id,
                    self.log_tail(60)
                );
            }
            assert!(
                started.elapsed() < Duration::from_secs(60),
                "node {} does not serve its status 60 s after starting; its log:\n{}",
                self.id,
                self.log_tail(60)
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

impl Drop for NodeProc {
    fn drop(&mut self) {
        if let Some(child) = &mut self.child {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A UDP relay in front of a node: datagrams from one peer to the node's QUIC port and back, with a
/// switch that drops everything.
struct Relay {
    front: SocketAddr,
    cut: Arc<AtomicBool>,
    task: JoinHandle<()>,
}

impl Relay {
    async fn start(target: SocketAddr) -> Relay {
        let front = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let back = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let addr = front.local_addr().unwrap();
        let cut = Arc::new(AtomicBool::new(false));
        let switch = cut.clone();
        let task = tokio::spawn(async move {
            let mut client: Option<SocketAddr> = None;
            let mut up = vec![0u8; 65536];
            let mut down = vec![0u8; 65536];
            loop {
                tokio::select! {
                    received = front.recv_from(&mut up) => {
                        // A send error (the node is down: ICMP port unreachable) drops the
                        // datagram, as a network would.
                        let Ok((n, from)) = received else { continue };
                        client = Some(from);
                        if !switch.load(Ordering::Relaxed) {
                            let _ = back.send_to(&up[..n], target).await;
                        }
                    }
                    received = back.recv_from(&mut down) => {
                        let Ok((n, from)) = received else { continue };
                        if from == target && !switch.load(Ordering::Relaxed) {
                            if let Some(client) = client {
                                let _ = front.send_to(&down[..n], client).await;
                            }
                        }
                    }
                }
            }
        });
        Relay { front: addr, cut, task }
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Three (or `n`) databases, initialised, and their `accord run` processes.
struct Cluster {
    name: &'static str,
    nodes: Vec<NodeProc>,
    /// (from, to) → the relay `from` uses to reach `to`.
    relays: BTreeMap<(usize, usize), Relay>,
    /// Nodes that left the cluster (`accord leave`): not expected to run or to converge.
    gone: std::collections::BTreeSet<usize>,
    pg: Vec<PgCluster>,
    // Last: the directory outlives the processes that use it.
    dir: tempfile::TempDir,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        // ACCORD_RELIABILITY_KEEP=1 keeps the configurations and logs of the run, failed or passed
        // (a slow convergence is worth reading too).
        if std::env::var_os("ACCORD_RELIABILITY_KEEP").is_some() {
            let kept = std::mem::replace(&mut self.dir, tempfile::tempdir().unwrap()).keep();
            eprintln!("[{}] logs kept in {}", self.name, kept.display());
        }
    }
}

impl Cluster {
    async fn start(name: &'static str, n: usize, relayed: bool) -> Cluster {
        Self::start_joining(name, n, relayed, 0).await
    }

    /// `n` nodes, of which the last `joining` have only the schema, empty, and are not started:
    /// they are to join with `accord join`. No configuration lists them, and theirs list no peer:
    /// the running nodes learn of them, and they of the cluster, from the join.
    async fn start_joining(name: &'static str, n: usize, relayed: bool, joining: usize) -> Cluster {
        let started = Instant::now();
        let pg = tokio::task::spawn_blocking(move || PgCluster::start_many(n))
            .await
            .expect("starting clusters panicked");
        let dir = tempfile::tempdir().unwrap();
        let (ok, out) = accord(&["certs", "init", "--out", dir.path().join("ca").to_str().unwrap()]);
        assert!(ok, "{out}");
        let quic: Vec<u16> = (0..n).map(|_| free_udp_port()).collect();
        let mut relays = BTreeMap::new();
        if relayed {
            for from in 0..n {
                for (to, &port) in quic.iter().enumerate() {
                    if from != to {
                        let target: SocketAddr = ([127, 0, 0, 1], port).into();
                        relays.insert((from, to), Relay::start(target).await);
                    }
                }
            }
        }
        let mut nodes = Vec::new();
        for (i, cluster) in pg.iter().enumerate() {
            let id = i as u32 + 1;
            let db = cluster.create_database("shop").await;
            db.batch_execute(SHOP).await.unwrap();
            db.batch_execute(LEDGER).await.unwrap();
            db.batch_execute(NOTE).await.unwrap();
            let dsn = cluster.dsn("shop");
            if i < n - joining {
                let (ok, out) = accord(&["init", "--dsn", &dsn, "--node-id", &id.to_string()]);
                assert!(ok, "accord init of node {id}: {out}");
            }
            let certs = dir.path().join(format!("certs-{id}"));
            let (ok, out) = accord(&[
                "certs",
                "node",
                &id.to_string(),
                "--ca-dir",
                dir.path().join("ca").to_str().unwrap(),
                "--out",
                certs.to_str().unwrap(),
            ]);
            assert!(ok, "{out}");
            let metrics = free_tcp_port();
            let mut text = format!(
                "node_id = {id}\ncluster = \"reliability\"\ndsn = \"{dsn}\"\nlisten = \"127.0.0.1:{}\"\n\
                 [tls]\nca = \"certs-{id}/ca.pem\"\ncert = \"certs-{id}/node-{id}.pem\"\nkey = \"certs-{id}/node-{id}.key\"\n\
                 [replication]\ntombstone_round_secs = 1\n\
                 [metrics]\nlisten = \"127.0.0.1:{metrics}\"\n",
                quic[i]
            );
            let listed = if i < n - joining { 0..n - joining } else { 0..0 };
            for j in listed.filter(|&j| j != i) {
                let address = match relays.get(&(i, j)) {
                    Some(relay) => relay.front,
                    None => ([127, 0, 0, 1], quic[j]).into(),
                };
                text.push_str(&format!("[[peers]]\nid = {}\naddress = \"{address}\"\n", j + 1));
            }
            let config = dir.path().join(format!("node-{id}.toml"));
            std::fs::write(&config, text).unwrap();
            nodes.push(NodeProc {
                id,
                config,
                log: dir.path().join(format!("node-{id}.log")),
                metrics,
                child: None,
                starts: 0,
            });
        }
        let mut cluster = Cluster {
            name,
            nodes,
            relays,
            gone: Default::default(),
            pg,
            dir,
        };
        let running = n - joining;
        for node in &mut cluster.nodes[..running] {
            node.start().await;
        }
        // The hot rows, inserted on node 1 and replicated before the load starts.
        let db = cluster.client(0).await;
        for id in (1..=HOT_ROWS).chain([PRICE_ROW]) {
            db.execute("INSERT INTO shop.products (id, name) VALUES ($1, 'hot')", &[&id])
                .await
                .unwrap();
        }
        cluster
            .wait_for(
                "the hot rows reach every node",
                Duration::from_secs(90),
                |c| async move {
                    for i in 0..running {
                        let Ok(db) = connect(&c.pg[i].dsn("shop")).await else {
                            return false;
                        };
                        let Ok(row) = db.query_one("SELECT count(*) FROM shop.products", &[]).await else {
                            return false;
                        };
                        if row.get::<_, i64>(0) != HOT_ROWS + 1 {
                            return false;
                        }
                    }
                    true
                },
            )
            .await;
        eprintln!(
            "[{name}] {n} PostgreSQL servers and {n} nodes up in {:.1} s",
            started.elapsed().as_secs_f64()
        );
        cluster
    }

    /// The nodes still in the cluster.
    fn live(&self) -> Vec<usize> {
        (0..self.nodes.len()).filter(|i| !self.gone.contains(i)).collect()
    }

    async fn client(&self, i: usize) -> tokio_postgres::Client {
        connect(&self.pg[i].dsn("shop"))
            .await
            .unwrap_or_else(|e| panic!("cannot connect to database {}: {e}", i + 1))
    }

    async fn wait_for<'a, F, Fut>(&'a self, what: &str, limit: Duration, check: F)
    where
        F: Fn(&'a Cluster) -> Fut,
        Fut: std::future::Future<Output = bool>,
    {
        let started = Instant::now();
        while !check(self).await {
            if started.elapsed() > limit {
                panic!("[{}] {what}: not within {limit:?}\n{}", self.name, self.logs());
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    fn logs(&self) -> String {
        self.nodes
            .iter()
            .map(|n| format!("--- node {} (last lines of its log) ---\n{}\n", n.id, n.log_tail(40)))
            .collect()
    }

    /// Fails the test, with the logs, if a node process ended without the test ending it.
    fn assert_all_running(&mut self) {
        for i in 0..self.nodes.len() {
            if let Some(status) = self.nodes[i].exited() {
                panic!(
                    "[{}] node {} exited by itself ({status}); its log:\n{}",
                    self.name,
                    i + 1,
                    self.nodes[i].log_tail(80)
                );
            }
        }
    }

    /// Cuts (or heals) only the link between nodes `a` and `b`, both directions.
    fn cut_link(&self, a: usize, b: usize, cut: bool) {
        for link in [(a, b), (b, a)] {
            let relay = self
                .relays
                .get(&link)
                .unwrap_or_else(|| panic!("[{}] no relay {link:?}: start the cluster relayed", self.name));
            relay.cut.store(cut, Ordering::Relaxed);
        }
    }

    fn cut(&self, node: usize, cut: bool) {
        for ((from, to), relay) in &self.relays {
            if *from == node || *to == node {
                relay.cut.store(cut, Ordering::Relaxed);
            }
        }
    }

    /// Waits until every node reports every peer connected with nothing unacknowledged, and the
    /// tables and review queues are the same on every node three polls in a row. Returns how long
    /// it took.
    async fn converge(&mut self) -> Duration {
        let limit = converge_limit();
        let started = Instant::now();
        let mut stable = 0;
        let mut last: Vec<String> = Vec::new();
        loop {
            self.assert_all_running();
            let live = self.live();
            let mut statuses = Vec::new();
            for &i in &live {
                statuses.push(self.nodes[i].status().await);
            }
            let quiet = statuses.iter().all(|s| {
                s.as_ref().is_some_and(|s| {
                    s["peers"].as_object().is_some_and(|peers| {
                        peers.len() == live.len() - 1
                            && peers.values().all(|p| p["connected"] == true && p["unacked"] == 0)
                    })
                })
            });
            let mut snapshots = Vec::new();
            for &i in &live {
                match connect(&self.pg[i].dsn("shop")).await {
                    Ok(db) => snapshots.push(snapshot(&db, &TABLES).await),
                    Err(e) => snapshots.push(format!("database {} unreachable: {e}", i + 1)),
                }
            }
            let same = snapshots.windows(2).all(|w| w[0] == w[1]);
            if quiet && same && snapshots.first() == last.first() {
                stable += 1;
                if stable >= 3 {
                    return started.elapsed();
                }
            } else {
                stable = 0;
            }
            if started.elapsed() > limit {
                let diff = first_difference(&snapshots);
                let mut progress = String::new();
                for i in 0..self.nodes.len() {
                    if let Ok(db) = connect(&self.pg[i].dsn("shop")).await {
                        for sql in [
                            "SELECT string_agg(external_id || '@' || remote_lsn::text, ', ') FROM pg_replication_origin_status",
                            "SELECT string_agg(peer || ': acked ' || acked, ', ') FROM accord.peer_progress",
                        ] {
                            if let Ok(row) = db.query_one(sql, &[]).await {
                                let text: Option<String> = row.get(0);
                                progress.push_str(&format!("\n  node {}: {}", i + 1, text.unwrap_or_default()));
                            }
                        }
                    }
                }
                panic!(
                    "[{}] no convergence within {limit:?} (ACCORD_RELIABILITY_CONVERGE_SECS): \
                     all connected and acknowledged: {quiet}, snapshots equal: {same}\n\
                     statuses: {statuses:#?}\nprogress: {progress}\nfirst difference: {diff}\n{}",
                    self.name,
                    self.logs()
                );
            }
            last = snapshots;
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    /// The exact-sum check: `sum(stock)` and `sum(balance)` on every node equal the sum of every
    /// node's ledger. Returns (expected stock, expected balance).
    async fn assert_exact_sums(&self) -> (i64, String) {
        let mut stock = 0i64;
        let mut balance = Vec::new();
        for i in 0..self.nodes.len() {
            let row = self
                .client(i)
                .await
                .query_one(
                    "SELECT coalesce(sum(stock), 0)::bigint, coalesce(sum(balance), 0)::text FROM local.ledger",
                    &[],
                )
                .await
                .unwrap();
            stock += row.get::<_, i64>(0);
            balance.push(row.get::<_, String>(1));
        }
        let expected_balance: String = self
            .client(0)
            .await
            .query_one(
                "SELECT sum(b::numeric)::numeric(30,4)::text FROM unnest($1::text[]) AS b",
                &[&balance],
            )
            .await
            .unwrap()
            .get(0);
        // Every node's ledger counts (a node that left handed its writes over first); the live
        // nodes' tables must hold them all.
        for i in self.live() {
            let row = self
                .client(i)
                .await
                .query_one(
                    "SELECT coalesce(sum(stock), 0)::bigint, coalesce(sum(balance), 0)::numeric(30,4)::text
                     FROM shop.products",
                    &[],
                )
                .await
                .unwrap();
            let (got_stock, got_balance): (i64, String) = (row.get(0), row.get(1));
            assert_eq!(
                got_stock,
                stock,
                "[{}] node {}: sum(stock) is {got_stock}, but the writers committed {stock} in all \
                 ({}: {})",
                self.name,
                i + 1,
                if got_stock < stock { "lost" } else { "applied twice" },
                (got_stock - stock).abs()
            );
            assert_eq!(
                got_balance,
                expected_balance,
                "[{}] node {}: sum(balance) differs from what the writers committed",
                self.name,
                i + 1
            );
        }
        (stock, expected_balance)
    }
}

fn first_difference(snapshots: &[String]) -> String {
    // Lines some node holds and another lacks (rows, review items), at most a few per node.
    let mut report = String::new();
    let all: std::collections::BTreeSet<&str> = snapshots.iter().flat_map(|s| s.lines()).collect();
    for (i, snapshot) in snapshots.iter().enumerate() {
        let own: std::collections::BTreeSet<&str> = snapshot.lines().collect();
        let missing: Vec<&&str> = all.difference(&own).collect();
        if !missing.is_empty() {
            report.push_str(&format!(
                "\n  node {} lacks {} line(s) another node has, e.g. {:?}",
                i + 1,
                missing.len(),
                &missing[..missing.len().min(8)]
            ));
        }
    }
    if !report.is_empty() {
        return report;
    }
    for i in 1..snapshots.len() {
        if snapshots[i] != snapshots[0] {
            let a: Vec<&str> = snapshots[0].lines().collect();
            let b: Vec<&str> = snapshots[i].lines().collect();
            for k in 0..a.len().max(b.len()) {
                if a.get(k) != b.get(k) {
                    return format!(
                        "node 1 vs node {}, line {k}: {:?} vs {:?} ({} vs {} lines)",
                        i + 1,
                        a.get(k),
                        b.get(k),
                        a.len(),
                        b.len()
                    );
                }
            }
        }
    }
    "none".into()
}

#[derive(Default)]
struct WriterCounts {
    committed: AtomicU64,
    failed: AtomicU64,
}

/// Writers on every database: increments of `stock`/`balance` on the hot rows, renames (lww), and
/// inserts of new keys; each delta also goes to the node's `local.ledger` in the same transaction.
/// A writer whose connection fails reconnects and goes on.
struct Load {
    stop: Arc<AtomicBool>,
    writers: Vec<JoinHandle<()>>,
    counts: Arc<WriterCounts>,
}

impl Load {
    fn start(cluster: &Cluster) -> Load {
        Self::start_on(cluster, 0..cluster.nodes.len())
    }

    /// Writers on the databases of `nodes` only.
    fn start_on(cluster: &Cluster, nodes: std::ops::Range<usize>) -> Load {
        let mut load = Load {
            stop: Arc::new(AtomicBool::new(false)),
            writers: Vec::new(),
            counts: Arc::new(WriterCounts::default()),
        };
        load.add(cluster, nodes);
        load
    }

    /// More writers, on the databases of `nodes`.
    fn add(&mut self, cluster: &Cluster, nodes: std::ops::Range<usize>) {
        let per_node = env_u64("ACCORD_RELIABILITY_WRITERS", 2);
        let pause = Duration::from_millis(env_u64("ACCORD_RELIABILITY_PAUSE_MS", 10));
        let (stop, counts, writers) = (&self.stop, &self.counts, &mut self.writers);
        for node in nodes {
            for w in 0..per_node {
                let dsn = cluster.pg[node].dsn("shop");
                let stop = stop.clone();
                let counts = counts.clone();
                let node = node as i64 + 1;
                let w = w as i64;
                writers.push(tokio::spawn(async move {
                    let mut db = None;
                    let mut i: i64 = 0;
                    while !stop.load(Ordering::Relaxed) {
                        let Some(client) = &db else {
                            match connect(&dsn).await {
                                Ok(client) => db = Some(client),
                                Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
                            }
                            continue;
                        };
                        i += 1;
                        let hot = 1 + (i + w) % HOT_ROWS;
                        let sql = match i % 10 {
                            // Churn: every node inserts and deletes the same few keys, so deletes
                            // race inserts of one key and collection rounds (every second) race
                            // both. Zero stock and balance: the sums stay exact whoever wins.
                            5 => {
                                // Each key is inserted, then deleted ten writes later; the nodes walk the same ten keys.
                                let key = CHURN_KEYS + (i / 20 + node) % 10;
                                if (i / 10) % 2 == 0 {
                                    format!(
                                        "INSERT INTO shop.products (id, name, stock, balance) \
                                         VALUES ({key}, 'churn {node}', 0, 0) ON CONFLICT (id) DO NOTHING"
                                    )
                                } else {
                                    format!("DELETE FROM shop.products WHERE id = {key}")
                                }
                            }
                            7 => format!("UPDATE shop.products SET name = 'n{node}-{w}-{i}' WHERE id = {hot}"),
                            9 => {
                                let key = node * 1_000_000_000 + w * 10_000_000 + i;
                                format!(
                                    "BEGIN;
                                     INSERT INTO shop.products (id, name, stock, balance) VALUES ({key}, 'new', 3, 0.25);
                                     INSERT INTO local.ledger (stock, balance) VALUES (3, 0.25);
                                     COMMIT;"
                                )
                            }
                            _ => format!(
                                "BEGIN;
                                 UPDATE shop.products SET stock = stock + 1, balance = balance + 1.5 WHERE id = {hot};
                                 INSERT INTO local.ledger (stock, balance) VALUES (1, 1.5);
                                 COMMIT;"
                            ),
                        };
                        match client.batch_execute(&sql).await {
                            Ok(()) => {
                                counts.committed.fetch_add(1, Ordering::Relaxed);
                            }
                            Err(_) => {
                                counts.failed.fetch_add(1, Ordering::Relaxed);
                                db = None;
                                tokio::time::sleep(Duration::from_millis(100)).await;
                            }
                        }
                        tokio::time::sleep(pause).await;
                    }
                }));
            }
        }
    }

    /// Stops the writers; returns (committed, failed) transactions.
    async fn stop(self) -> (u64, u64) {
        self.stop.store(true, Ordering::Relaxed);
        for writer in self.writers {
            writer.await.expect("a writer panicked");
        }
        (
            self.counts.committed.load(Ordering::Relaxed),
            self.counts.failed.load(Ordering::Relaxed),
        )
    }
}

/// Stops the load, converges, checks the sums, and prints the figures.
async fn finish(cluster: &mut Cluster, load: Load, expect_no_failures: bool, started: Instant) {
    let (committed, failed) = load.stop().await;
    if expect_no_failures {
        assert_eq!(
            failed, 0,
            "[{}] writers failed {failed} times although PostgreSQL stayed up",
            cluster.name
        );
    }
    let took = cluster.converge().await;
    let (stock, balance) = cluster.assert_exact_sums().await;
    // With the writers stopped and every node up, the next rounds collect every tombstone.
    cluster
        .wait_for("every tombstone collected", converge_limit(), |c| async move {
            for i in c.live() {
                let left: i64 = c
                    .client(i)
                    .await
                    .query_one("SELECT count(*) FROM accord.row_meta WHERE NOT alive", &[])
                    .await
                    .map(|r| r.get(0))
                    .unwrap_or(-1);
                if left != 0 {
                    return false;
                }
            }
            true
        })
        .await;
    let collected: Vec<(u64, u64)> = cluster
        .live()
        .into_iter()
        .map(|i| cluster.nodes[i].tombstones_collected())
        .collect();
    assert!(
        collected.iter().all(|&(rounds, _)| rounds > 0),
        "[{}] every node completes collection rounds: {collected:?}",
        cluster.name
    );
    eprintln!(
        "[{}] per node (rounds completed, tombstones deleted): {collected:?}",
        cluster.name
    );
    eprintln!(
        "[{}] {committed} writer transactions committed ({failed} failed); converged {:.1} s after \
         the writers stopped; sum(stock) = {stock}, sum(balance) = {balance} on all {} nodes; \
         whole test {:.1} s",
        cluster.name,
        took.as_secs_f64(),
        cluster.live().len(),
        started.elapsed().as_secs_f64()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_under_load() {
    let _serial = SERIAL.lock().await;
    let started = Instant::now();
    let name = "kill_9_under_load";
    let mut rng = Rng::from_env(name);
    let kills = env_u64("ACCORD_RELIABILITY_KILLS", 4);
    let mut cluster = Cluster::start(name, 3, false).await;
    let load = Load::start(&cluster);
    let mut per_node = [0u32; 3];
    for k in 0..kills {
        tokio::time::sleep(rng.millis(300, 2500)).await;
        cluster.assert_all_running();
        let victim = rng.below(3) as usize;
        cluster.nodes[victim].kill9();
        per_node[victim] += 1;
        let down = rng.millis(0, 1500);
        eprintln!(
            "[{name}] kill {}/{kills}: node {} (SIGKILL), restarted after {} ms",
            k + 1,
            victim + 1,
            down.as_millis()
        );
        tokio::time::sleep(down).await;
        cluster.nodes[victim].start().await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    eprintln!("[{name}] kills per node: {per_node:?}");
    finish(&mut cluster, load, true, started).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_crash_under_a_node() {
    let _serial = SERIAL.lock().await;
    let started = Instant::now();
    let name = "postgres_crash_under_a_node";
    let mut rng = Rng::from_env(name);
    let crashes = env_u64("ACCORD_RELIABILITY_PG_CRASHES", 2);
    let mut cluster = Cluster::start(name, 3, false).await;
    let load = Load::start(&cluster);
    for k in 0..crashes {
        tokio::time::sleep(rng.millis(1000, 3000)).await;
        cluster.assert_all_running();
        let victim = rng.below(3) as usize;
        tokio::task::block_in_place(|| cluster.pg[victim].stop(StopMode::Immediate));
        let crashed = Instant::now();
        // What does the node do while its database is gone?
        let mut exited = None;
        while crashed.elapsed() < Duration::from_secs(4) && exited.is_none() {
            exited = cluster.nodes[victim].exited();
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        tokio::task::block_in_place(|| cluster.pg[victim].restart());
        let restarted = Instant::now();
        match exited {
            Some(status) => {
                // The designed behaviour: a node whose database goes away fails, and its service
                // manager starts it again. Do as a service manager would.
                eprintln!(
                    "[{name}] crash {}/{crashes}: PostgreSQL of node {} stopped (immediate); the node \
                     exited ({status}) after {:.1} s; PostgreSQL restarted, node restarted by the test",
                    k + 1,
                    victim + 1,
                    crashed.elapsed().as_secs_f64() - restarted.elapsed().as_secs_f64()
                );
                let log = cluster.nodes[victim].log_tail(5);
                eprintln!("[{name}] its last words:\n{log}");
                cluster.nodes[victim].start().await;
            }
            None => {
                eprintln!(
                    "[{name}] crash {}/{crashes}: PostgreSQL of node {} stopped (immediate) for 4 s; \
                     the node kept running; PostgreSQL restarted",
                    k + 1,
                    victim + 1
                );
                // It must notice the new server by itself (or exit, and be restarted).
                cluster
                    .wait_for(
                        "the node reconnects to its restarted database",
                        Duration::from_secs(60),
                        |c| async move {
                            c.nodes[victim].status().await.is_some_and(|s| {
                                s["peers"]
                                    .as_object()
                                    .is_some_and(|p| p.values().all(|p| p["connected"] == true))
                            })
                        },
                    )
                    .await;
            }
        }
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    finish(&mut cluster, load, false, started).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rolling_restart() {
    let _serial = SERIAL.lock().await;
    let started = Instant::now();
    let name = "rolling_restart";
    let mut cluster = Cluster::start(name, 3, false).await;
    let load = Load::start(&cluster);
    for i in 0..cluster.nodes.len() {
        tokio::time::sleep(Duration::from_secs(2)).await;
        cluster.assert_all_running();
        let stopping = Instant::now();
        let status = cluster.nodes[i].terminate(Duration::from_secs(30)).await;
        assert!(
            status.success(),
            "[{name}] node {} exits cleanly on SIGTERM ({status}); its log:\n{}",
            i + 1,
            cluster.nodes[i].log_tail(40)
        );
        let stopped = stopping.elapsed();
        cluster.nodes[i].start().await;
        eprintln!(
            "[{name}] node {}: stopped {:.2} s after SIGTERM, serving again {:.2} s after",
            i + 1,
            stopped.as_secs_f64(),
            stopping.elapsed().as_secs_f64()
        );
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    finish(&mut cluster, load, true, started).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partition_and_heal() {
    let _serial = SERIAL.lock().await;
    let started = Instant::now();
    let name = "partition_and_heal";
    let cut_for = Duration::from_secs(env_u64("ACCORD_RELIABILITY_CUT_SECS", 8));
    let mut cluster = Cluster::start(name, 3, true).await;
    let load = Load::start(&cluster);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let island = 2;
    cluster.cut(island, true);
    eprintln!("[{name}] node {} cut off for {cut_for:?}", island + 1);
    tokio::time::sleep(Duration::from_millis(500)).await;
    // Concurrent writes to the review column of one row, on both sides of the cut.
    cluster
        .client(0)
        .await
        .execute("UPDATE shop.products SET price = 11.11 WHERE id = $1", &[&PRICE_ROW])
        .await
        .unwrap();
    cluster
        .client(island)
        .await
        .execute("UPDATE shop.products SET price = 33.33 WHERE id = $1", &[&PRICE_ROW])
        .await
        .unwrap();
    tokio::time::sleep(cut_for).await;
    // Writes went on on both sides: the island has captured changes its peers have not seen.
    let island_unacked = cluster.nodes[0]
        .status()
        .await
        .map(|s| s["peers"][(island + 1).to_string()]["unacked"].clone());
    cluster.cut(island, false);
    let healed = Instant::now();
    eprintln!(
        "[{name}] healed; node 1's changes not yet acknowledged by node {}: {island_unacked:?}",
        island + 1
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    finish(&mut cluster, load, true, started).await;
    eprintln!(
        "[{name}] converged {:.1} s after the heal",
        healed.elapsed().as_secs_f64()
    );
    for i in 0..cluster.nodes.len() {
        let items = cluster
            .client(i)
            .await
            .query(
                "SELECT candidates::text FROM accord.review_items
                 WHERE kind = 'concurrent' AND status = 'open' AND column_name = 'price'
                   AND table_name LIKE '%products' AND row_key LIKE $1",
                &[&format!("%{PRICE_ROW}%")],
            )
            .await
            .unwrap();
        assert_eq!(
            items.len(),
            1,
            "[{name}] node {}: one open review item for the price of row {PRICE_ROW}",
            i + 1
        );
        let candidates: String = items[0].get(0);
        assert!(
            candidates.contains("11.11") && candidates.contains("33.33"),
            "[{name}] node {}: both prices are candidates: {candidates}",
            i + 1
        );
    }
}

/// The TOAST test's row on one node: name, stock, and the md5 and length of its note; `None` while
/// the node does not have the row.
type ToastRow = (String, i64, String, i32);

async fn toast_row(db: &tokio_postgres::Client) -> Option<ToastRow> {
    let row = db
        .query_opt(
            "SELECT name, stock, coalesce(md5(note), 'no note'), coalesce(length(note), -1)
             FROM shop.products WHERE id = $1",
            &[&TOAST_ROW],
        )
        .await
        .unwrap()?;
    Some((row.get(0), row.get(1), row.get(2), row.get(3)))
}

/// The node's open review items of kind `unapplicable`: table, key and why.
async fn open_unapplicable(db: &tokio_postgres::Client) -> Vec<String> {
    db.query(
        "SELECT table_name || ' ' || row_key || ': ' || coalesce(error, '') FROM accord.review_items
         WHERE kind = 'unapplicable' AND status = 'open' ORDER BY id",
        &[],
    )
    .await
    .unwrap()
    .iter()
    .map(|r| r.get(0))
    .collect()
}

/// The sequence number of the node's last captured change.
async fn last_captured(db: &tokio_postgres::Client) -> i64 {
    db.query_one("SELECT coalesce(max(last_seq), 0) FROM accord.capture_state", &[])
        .await
        .unwrap()
        .get(0)
}

/// How far the node applied (or kept) the changes of `peer` (1-based): its replication origin.
async fn received_from(db: &tokio_postgres::Client, peer: usize) -> i64 {
    db.query_one(
        "SELECT coalesce(max((remote_lsn - '0/0'::pg_lsn)::bigint), 0) FROM pg_replication_origin_status
         WHERE external_id = $1",
        &[&format!("accord_peer_{peer}")],
    )
    .await
    .unwrap()
    .get(0)
}

/// pgoutput leaves an out-of-line value that an update did not change out of the update
/// ("unchanged TOAST"). Node 1 inserts a row with such a value while its link to node 3 is cut;
/// node 2 renames the row and adds to its stock, so node 3 gets node 2's change, without the
/// value, for a row it does not have yet. That change must wait for node 1's insert, not be lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relayed_change_missing_a_toasted_value_waits_for_it() {
    let _serial = SERIAL.lock().await;
    let started = Instant::now();
    let name = "a_relayed_change_missing_a_toasted_value_waits_for_it";
    let mut cluster = Cluster::start(name, 3, true).await;
    let (n1, n2, n3) = (0, 1, 2);
    let step = Duration::from_secs(60);

    cluster.cut_link(n1, n3, true);
    let db1 = cluster.client(n1).await;
    db1.batch_execute(&format!(
        "BEGIN;
         INSERT INTO shop.products (id, name, stock, note)
             SELECT {TOAST_ROW}, 'from node 1', 10, string_agg(md5(g::text), '' ORDER BY g)
             FROM generate_series(1, 400) g;
         INSERT INTO local.ledger (stock, balance) VALUES (10, 0);
         COMMIT;"
    ))
    .await
    .unwrap();
    let (_, _, note_md5, note_len) = toast_row(&db1).await.expect("node 1 has the row it inserted");
    let toast: String = db1
        .query_one(
            "SELECT reltoastrelid::regclass::text FROM pg_class WHERE oid = 'shop.products'::regclass",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    let chunks: i64 = db1
        .query_one(&format!("SELECT count(*) FROM {toast}"), &[])
        .await
        .unwrap()
        .get(0);
    assert!(
        chunks > 0,
        "[{name}] the note of row {TOAST_ROW} ({note_len} characters) is not stored out of line"
    );

    cluster
        .wait_for("node 2 receives node 1's insert", step, |c| async move {
            match connect(&c.pg[n2].dsn("shop")).await {
                Ok(db) => toast_row(&db).await.is_some(),
                Err(_) => false,
            }
        })
        .await;
    let db2 = cluster.client(n2).await;
    let db3 = cluster.client(n3).await;
    let before = last_captured(&db2).await;
    db2.batch_execute(&format!(
        "BEGIN;
         UPDATE shop.products SET name = 'renamed on node 2', stock = stock + 5 WHERE id = {TOAST_ROW};
         INSERT INTO local.ledger (stock, balance) VALUES (5, 0);
         COMMIT;"
    ))
    .await
    .unwrap();
    // Node 3 takes node 2's change while node 1's insert cannot reach it.
    let (db2_ref, db3_ref) = (&db2, &db3);
    cluster
        .wait_for("node 2 captures its update", step, move |_| async move {
            last_captured(db2_ref).await > before
        })
        .await;
    let seq = last_captured(&db2).await;
    cluster
        .wait_for(
            "node 3 receives node 2's update (its link to node 2 is up)",
            step,
            move |_| async move { received_from(db3_ref, n2 + 1).await >= seq },
        )
        .await;
    eprintln!(
        "[{name}] node 3 received node 2's update before node 1's insert; node 3 has row {TOAST_ROW}: {:?}; its open \
         unapplicable items: {:?}",
        toast_row(&db3).await,
        open_unapplicable(&db3).await
    );

    cluster.cut_link(n1, n3, false);
    let healed = Instant::now();
    let expected: ToastRow = ("renamed on node 2".into(), 15, note_md5, note_len);
    loop {
        let got = toast_row(&db3).await;
        if got.as_ref() == Some(&expected) {
            break;
        }
        if healed.elapsed() > step {
            panic!(
                "[{name}] node 3: row {TOAST_ROW} (name, stock, md5 and length of the note) is {got:?} {step:?} after \
                 the heal, not {expected:?}; its open unapplicable review items: {:?}\nits warnings:\n{}",
                open_unapplicable(&db3).await,
                cluster.nodes[n3].warnings(10)
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let took = cluster.converge().await;
    cluster.assert_exact_sums().await;
    for i in 0..cluster.nodes.len() {
        let db = cluster.client(i).await;
        assert_eq!(
            toast_row(&db).await.as_ref(),
            Some(&expected),
            "[{name}] node {}: row {TOAST_ROW} (name, stock, md5 and length of the note)",
            i + 1
        );
        let open = open_unapplicable(&db).await;
        assert!(
            open.is_empty(),
            "[{name}] node {}: unapplicable items left open: {open:?}",
            i + 1
        );
    }
    eprintln!(
        "[{name}] converged {:.1} s after the heal ({:.1} s for the last check); whole test {:.1} s",
        healed.elapsed().as_secs_f64(),
        took.as_secs_f64(),
        started.elapsed().as_secs_f64()
    );
}

/// Seconds since the start, and per node: RSS (KiB), greatest outbound lag (s), most unacknowledged.
type Sample = (f64, Vec<(u64, f64, u64)>);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "soak: run with --ignored, ACCORD_SOAK_SECS=600"]
async fn soak() {
    let _serial = SERIAL.lock().await;
    let started = Instant::now();
    let name = "soak";
    let secs = env_u64("ACCORD_SOAK_SECS", 600);
    let every = Duration::from_secs(env_u64("ACCORD_SOAK_SAMPLE_SECS", 5));
    let mut cluster = Cluster::start(name, 3, false).await;
    let load = Load::start(&cluster);
    // (seconds, per node: (RSS KiB, max outbound lag s, max unacked))
    let mut samples: Vec<Sample> = Vec::new();
    while started.elapsed() < Duration::from_secs(secs) {
        tokio::time::sleep(every).await;
        cluster.assert_all_running();
        let mut row = Vec::new();
        for node in &cluster.nodes {
            let rss = node.pid().and_then(|pid| memory_kib(pid, "VmRSS")).unwrap_or(0);
            let (ok, json) = accord(&["status", "--config", node.config.to_str().unwrap(), "--json"]);
            assert!(ok, "[{name}] accord status of node {}: {json}", node.id);
            let status: serde_json::Value = serde_json::from_str(&json).unwrap();
            let peers = status["peers"].as_object().cloned().unwrap_or_default();
            let lag = peers
                .values()
                .filter_map(|p| p["outbound_lag_secs"].as_f64())
                .fold(0.0, f64::max);
            let unacked = peers.values().filter_map(|p| p["unacked"].as_u64()).max().unwrap_or(0);
            row.push((rss, lag, unacked));
        }
        eprintln!(
            "[{name}] {:>6.0} s: {}",
            started.elapsed().as_secs_f64(),
            row.iter()
                .enumerate()
                .map(|(i, (rss, lag, unacked))| format!(
                    "node {}: RSS {} KiB, lag {lag:.2} s / {unacked} changes",
                    i + 1,
                    rss
                ))
                .collect::<Vec<_>>()
                .join("; ")
        );
        samples.push((started.elapsed().as_secs_f64(), row));
    }
    finish(&mut cluster, load, true, started).await;
    assert!(samples.len() >= 8, "[{name}] too few samples: raise ACCORD_SOAK_SECS");
    let quarter = samples.len() / 4;
    for i in 0..cluster.nodes.len() {
        let avg = |s: &[Sample]| s.iter().map(|(_, r)| r[i].0 as f64).sum::<f64>() / s.len() as f64;
        let first = avg(&samples[..quarter]);
        let last = avg(&samples[samples.len() - quarter..]);
        let max_lag = samples.iter().map(|(_, r)| r[i].1).fold(0.0, f64::max);
        eprintln!(
            "[{name}] node {}: RSS first quarter {first:.0} KiB, last quarter {last:.0} KiB; max lag {max_lag:.2} s",
            i + 1
        );
        assert!(
            last < 2.0 * first,
            "[{name}] node {}: RSS grew from {first:.0} KiB to {last:.0} KiB",
            i + 1
        );
        assert!(
            max_lag < 30.0,
            "[{name}] node {}: lag reached {max_lag:.1} s under steady load",
            i + 1
        );
    }
}

/// The new node's join, as its database records it: (rows copied, done); `None` before it began.
async fn join_state(db: &tokio_postgres::Client) -> Option<(i64, bool)> {
    let row = db
        .query_opt("SELECT rows_copied, done FROM accord.join_state", &[])
        .await
        .ok()??;
    Some((row.get(0), row.get(1)))
}

/// Issue 16: a fourth node joins three running nodes that take writes all along (increments,
/// renames, inserts, deletes, review prices), from a donor's database, copied in chunks. The first
/// `accord join` is killed in the middle of its copy; `accord run` refuses the half-joined database;
/// the same command resumes it. Then the new node runs and writes too, and all four converge to
/// identical tables and review queues with the sums every writer committed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_joins_under_load_and_a_killed_join_resumes() {
    let _serial = SERIAL.lock().await;
    let started = Instant::now();
    let name = "join_under_load";
    let mut cluster = Cluster::start_joining(name, 4, false, 1).await;
    let bulk = env_u64("ACCORD_JOIN_ROWS", 30_000) as i64;
    let donor = cluster.client(0).await;
    // Rows to copy, and tombstones among them: stock and balance zero, so the sums stay exact.
    donor
        .batch_execute(&format!(
            "INSERT INTO shop.products (id, name) SELECT 500000000 + g, 'bulk ' || g FROM generate_series(1, {bulk}) g;
             DELETE FROM shop.products WHERE id > 500000000 AND id % 7 = 0;
             UPDATE shop.products SET price = 10 WHERE id = {PRICE_ROW};"
        ))
        .await
        .unwrap();
    let expected: i64 = donor
        .query_one("SELECT count(*) FROM shop.products WHERE id > 500000000", &[])
        .await
        .unwrap()
        .get(0);
    cluster
        .wait_for(
            "the bulk rows reach the three nodes",
            converge_limit(),
            |c| async move {
                for i in 0..3 {
                    let n: i64 = c
                        .client(i)
                        .await
                        .query_one("SELECT count(*) FROM shop.products WHERE id > 500000000", &[])
                        .await
                        .unwrap()
                        .get(0);
                    if n != expected {
                        return false;
                    }
                }
                true
            },
        )
        .await;
    // Concurrent prices, made certain by stopping node 3 for its edit: a review item that the
    // new node must end up with too.
    assert!(cluster.nodes[2].terminate(Duration::from_secs(20)).await.success());
    for (node, price) in [(1usize, "11"), (2, "12")] {
        cluster
            .client(node)
            .await
            .execute(
                &format!("UPDATE shop.products SET price = {price} WHERE id = {PRICE_ROW}"),
                &[],
            )
            .await
            .unwrap();
    }
    cluster.nodes[2].start().await;
    let mut load = Load::start_on(&cluster, 0..3);
    tokio::time::sleep(Duration::from_secs(1)).await;

    let config = cluster.nodes[3].config.clone();
    let donor_dsn = cluster.pg[0].dsn("shop");
    let join_args = [
        "join",
        "--config",
        config.to_str().unwrap(),
        "--donor-dsn",
        &donor_dsn,
        "--chunk-rows",
        "100",
    ];
    let joiner_db = cluster.client(3).await;
    let first_log = cluster.dir.path().join("join-1.log");
    let mut first = Command::new(env!("CARGO_BIN_EXE_accord"))
        .args(join_args)
        .stdout(Stdio::from(std::fs::File::create(&first_log).unwrap()))
        .stderr(Stdio::from(
            std::fs::File::create(cluster.dir.path().join("join-1.err")).unwrap(),
        ))
        .spawn()
        .unwrap();
    let waiting = Instant::now();
    let copied_before_kill = loop {
        if let Some((rows, done)) = join_state(&joiner_db).await {
            assert!(
                !done,
                "the join finished ({rows} rows) before it could be killed: make ACCORD_JOIN_ROWS larger: {}{}",
                std::fs::read_to_string(&first_log).unwrap_or_default(),
                std::fs::read_to_string(cluster.dir.path().join("join-1.err")).unwrap_or_default()
            );
            if rows >= 1_000 {
                break rows;
            }
        }
        assert!(
            first.try_wait().unwrap().is_none(),
            "accord join ended before it was killed"
        );
        assert!(waiting.elapsed() < Duration::from_secs(120), "the join copies nothing");
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    first.kill().unwrap();
    first.wait().unwrap();
    eprintln!("[{name}] the first accord join killed after {copied_before_kill} rows");

    // A half-joined node does not start.
    cluster.nodes[3].spawn();
    let refused = cluster.nodes[3].wait_exit(Duration::from_secs(90)).await;
    assert!(!refused.success());
    let log = cluster.nodes[3].log_tail(20);
    assert!(log.contains("has not finished"), "{log}");

    let (ok, out) = accord(&join_args);
    assert!(ok, "the resumed join: {out}");
    assert!(out.contains("(resumed)"), "{out}");
    eprintln!("[{name}] {}", out.lines().next().unwrap_or_default());
    let (rows, done) = join_state(&joiner_db).await.expect("the join recorded");
    assert!(done && rows >= expected, "every row was copied: {rows}");

    cluster.nodes[3].start().await;
    load.add(&cluster, 3..4);
    tokio::time::sleep(Duration::from_secs(3)).await;
    finish(&mut cluster, load, true, started).await;
    let open: i64 = joiner_db
        .query_one(
            "SELECT count(*) FROM accord.review_items WHERE kind = 'concurrent' AND status = 'open'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(open > 0, "the concurrent prices' review item reached the new node");
}

/// Issue 16: nodes leave a running cluster. Four nodes take writes; node 4 stops writing, its
/// changes reach everyone, and it dies (SIGKILL): `accord leave --node 4` on node 1 removes it.
/// Then node 3 stops writing and leaves by itself (`accord leave`): its `accord run` hands its
/// changes over and stops, its slot is dropped. Nodes 1 and 2 go on writing and end identical with
/// the sums of every write of all four, and tombstone collection, stalled while node 4 was down,
/// completes without the nodes that left.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_leave_under_load_and_tombstones_are_collected_without_them() {
    let _serial = SERIAL.lock().await;
    let started = Instant::now();
    let name = "leave_under_load";
    let mut cluster = Cluster::start(name, 4, false).await;
    let load = Load::start_on(&cluster, 0..2);
    let on_3 = Load::start_on(&cluster, 2..3);
    let on_4 = Load::start_on(&cluster, 3..4);
    tokio::time::sleep(Duration::from_secs(3)).await;

    // Node 4: its writers stop, everything it wrote reaches every node, then it dies.
    on_4.stop().await;
    cluster
        .wait_for("node 4's changes reach every node", converge_limit(), |c| async move {
            c.nodes[3].status().await.is_some_and(|s| {
                s["peers"]
                    .as_object()
                    .is_some_and(|p| p.values().all(|p| p["connected"] == true && p["unacked"] == 0))
            })
        })
        .await;
    cluster.nodes[3].kill9();
    cluster.gone.insert(3);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let round_before: u64 = cluster.nodes[0].status().await.expect("node 1 runs")["collection_round"]
        .as_u64()
        .unwrap_or(0);
    let (ok, out) = accord(&[
        "leave",
        "--config",
        cluster.nodes[0].config.to_str().unwrap(),
        "--node",
        "4",
    ]);
    assert!(ok, "accord leave --node 4: {out}\n{}", cluster.logs());
    assert!(out.contains("node 4 removed"), "{out}");
    eprintln!("[{name}] {}", out.lines().next().unwrap_or_default());

    // Node 3 leaves by itself, while nodes 1 and 2 write.
    on_3.stop().await;
    let (ok, out) = accord(&["leave", "--config", cluster.nodes[2].config.to_str().unwrap()]);
    assert!(ok, "accord leave of node 3: {out}\n{}", cluster.logs());
    assert!(out.contains("node 3 left the cluster"), "{out}");
    assert!(
        !out.contains("   "),
        "no run of spaces from a broken line continuation: {out}"
    );
    assert!(!out.contains("did not reach"), "{out}");
    eprintln!("[{name}] {}", out.lines().next().unwrap_or_default());
    let exit = cluster.nodes[2].wait_exit(Duration::from_secs(90)).await;
    assert!(exit.success(), "node 3's accord run ends cleanly once it left: {exit}");
    cluster.gone.insert(2);
    let node_3 = cluster.client(2).await;
    let slots: i64 = node_3
        .query_one("SELECT count(*) FROM pg_replication_slots", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(slots, 0, "the slot of the node that left is dropped");

    tokio::time::sleep(Duration::from_secs(3)).await;
    finish(&mut cluster, load, true, started).await;
    for i in 0..2 {
        let db = cluster.client(i).await;
        let left: Vec<i32> = db
            .query(
                "SELECT node_id FROM accord.members WHERE state = 'left' ORDER BY 1",
                &[],
            )
            .await
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect();
        assert_eq!(left, vec![3, 4], "node {} knows who left", i + 1);
        let origins: i64 = db
            .query_one(
                "SELECT count(*) FROM pg_replication_origin WHERE roname IN ('accord_peer_3', 'accord_peer_4')",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        assert_eq!(origins, 0, "node {} dropped the origins of the nodes that left", i + 1);
        let round: u64 = cluster.nodes[i].status().await.expect("runs")["collection_round"]
            .as_u64()
            .unwrap_or(0);
        assert!(
            round > round_before,
            "node {}: collection rounds complete again ({round_before} before the removal, {round} now)",
            i + 1
        );
    }
    // A node that left does not come back.
    cluster.nodes[2].spawn();
    let refused = cluster.nodes[2].wait_exit(Duration::from_secs(90)).await;
    assert!(!refused.success());
    let log = cluster.nodes[2].log_tail(10);
    assert!(log.contains("has left the cluster"), "{log}");
}
