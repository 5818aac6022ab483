//! A deployment of one replication system on scratch PostgreSQL clusters: accord (in-process nodes
//! over QUIC), PostgreSQL's native logical replication (node 1 → node 2 only), or pglogical (every
//! node subscribes to every other, `last_update_wins`).

use std::collections::BTreeMap;
use std::net::{SocketAddr, UdpSocket};
use std::path::Path;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use accord::node::init::init;
use accord::node::net::MemoryHub;
use accord::node::quic::quic_port;
use accord::node::runtime::{start, NodeConfig, NodeHandle, NodeStatus};
use accord::scratch_pg::{PgCluster, StopMode};
use accord_engine::{NodeId, ReplicationConfig};
use accord_transport::{EndpointConfig, PeerAddr, TlsIdentity};
use anyhow::{anyhow, bail, Context, Result};
use tokio_postgres::Client;

use crate::Opts;

pub const DB: &str = "bench";

/// The same tables for every system; the comments are accord's policies and mean nothing to the
/// others. `v` takes the plain updates (last writer wins everywhere), `n` the increments of the
/// conflict scenario (`delta` in accord), `markers` the rows whose arrival the lag figures time.
pub const SCHEMA: &str = "
CREATE SCHEMA bench;
CREATE TABLE bench.items (
    id bigint PRIMARY KEY,
    v bigint NOT NULL DEFAULT 0,
    n bigint NOT NULL DEFAULT 0,
    note text NOT NULL DEFAULT 'a row of the comparison bench'
);
COMMENT ON TABLE  bench.items   IS '@accord replicate';
COMMENT ON COLUMN bench.items.n IS '@accord delta';
CREATE TABLE bench.markers (
    origin integer NOT NULL,
    seq bigint NOT NULL,
    PRIMARY KEY (origin, seq)
);
COMMENT ON TABLE bench.markers IS '@accord replicate';
";

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum System {
    Accord,
    Native,
    Pglogical,
}

impl System {
    pub fn name(self) -> &'static str {
        match self {
            System::Accord => "accord",
            System::Native => "native",
            System::Pglogical => "pglogical",
        }
    }

    pub fn parse(s: &str) -> Option<System> {
        match s.trim() {
            "accord" => Some(System::Accord),
            "native" => Some(System::Native),
            "pglogical" => Some(System::Pglogical),
            _ => None,
        }
    }
}

/// Why pglogical cannot run here, if it cannot: its library is not beside the server's.
pub fn pglogical_missing() -> Option<String> {
    let mut libs = Vec::new();
    if let Some(bin) = std::env::var_os("ACCORD_PG_BIN") {
        libs.push(Path::new(&bin).join("../lib/pglogical.so"));
    }
    libs.push("/usr/lib/postgresql/15/lib/pglogical.so".into());
    if let Ok(out) = std::process::Command::new("pg_config").arg("--pkglibdir").output() {
        libs.push(Path::new(String::from_utf8_lossy(&out.stdout).trim()).join("pglogical.so"));
    }
    if libs.iter().any(|l| l.is_file()) {
        None
    } else {
        Some("not installed (apt-get install -y postgresql-15-pglogical)".into())
    }
}

struct AccordNet {
    quic: Option<(accord_transport::certs::Ca, Vec<u16>)>,
    hub: MemoryHub,
    nodes: BTreeMap<usize, NodeHandle>,
}

pub struct Deployment {
    pub system: System,
    pub sync_on: bool,
    pub pg: Vec<PgCluster>,
    accord: Option<AccordNet>,
    /// The next marker number per origin (node index).
    seqs: Arc<Vec<AtomicI64>>,
}

fn node_id(i: usize) -> NodeId {
    NodeId(i as u32 + 1)
}

fn free_udp_port() -> Result<u16> {
    Ok(UdpSocket::bind("127.0.0.1:0")?.local_addr()?.port())
}

impl Deployment {
    /// `n` clusters with the bench schema and `rows` rows, replicating with `system`.
    pub async fn start(system: System, n: usize, sync_on: bool, rows: i64, opts: &Opts) -> Result<Deployment> {
        let mut pg = tokio::task::spawn_blocking(move || PgCluster::start_many(n)).await??;
        // Scratch clusters run with fsync = off; synchronous_commit = on means nothing without it.
        for cluster in pg.iter_mut() {
            let admin = cluster.connect("postgres").await?;
            let mut settings = vec![
                format!("ALTER SYSTEM SET fsync = {}", if opts.fsync { "on" } else { "off" }),
                format!("ALTER SYSTEM SET shared_buffers = '{}'", opts.shared_buffers),
                // The launcher of native subscription workers waits this long after starting one
                // before it starts another (5 s by default): without this, re-enabling a
                // subscription in the drain would time that wait, not the replication.
                "ALTER SYSTEM SET wal_retrieve_retry_interval = '100ms'".into(),
            ];
            settings.extend(
                opts.pg_settings
                    .iter()
                    .map(|(name, value)| format!("ALTER SYSTEM SET {name} = '{value}'")),
            );
            if system == System::Pglogical {
                settings.push("ALTER SYSTEM SET shared_preload_libraries = 'pglogical'".into());
                settings.push("ALTER SYSTEM SET max_worker_processes = 16".into());
                // (and pglogical.synchronous_commit below, which its apply workers use).
                settings.push(format!(
                    "ALTER SYSTEM SET synchronous_commit = {}",
                    if sync_on { "on" } else { "off" }
                ));
            }
            for s in &settings {
                admin.batch_execute(s).await.with_context(|| s.clone())?;
            }
            drop(admin);
            // shared_buffers (and pglogical's library) take effect at a start.
            cluster.stop(StopMode::Fast)?;
            cluster.restart()?;
            if system == System::Pglogical {
                let admin = cluster.connect("postgres").await?;
                admin
                    .batch_execute("ALTER SYSTEM SET pglogical.conflict_resolution = 'last_update_wins'")
                    .await
                    .context("setting pglogical.conflict_resolution")?;
                // pglogical's apply workers set their synchronous_commit from this (off by default).
                admin
                    .batch_execute(&format!(
                        "ALTER SYSTEM SET pglogical.synchronous_commit = {}",
                        if sync_on { "on" } else { "off" }
                    ))
                    .await
                    .context("setting pglogical.synchronous_commit")?;
                admin.batch_execute("SELECT pg_reload_conf()").await?;
            }
        }
        for cluster in &pg {
            let db = cluster.create_database(DB).await?;
            db.batch_execute(SCHEMA).await.context("bench schema")?;
            db.execute(
                "INSERT INTO bench.items (id) SELECT g FROM generate_series(1, $1::bigint) g",
                &[&rows],
            )
            .await
            .context("seed rows")?;
        }
        let mut dep = Deployment {
            system,
            sync_on,
            pg,
            accord: None,
            seqs: Arc::new((0..n).map(|_| AtomicI64::new(1)).collect()),
        };
        match system {
            System::Accord => dep.start_accord(opts).await?,
            System::Native => dep.start_native().await?,
            System::Pglogical => dep.start_pglogical().await?,
        }
        // Replication is up when a marker from every writing node shows on every other.
        if let Err(e) = dep.fence_all(Duration::from_secs(60)).await {
            let logs: Vec<String> = dep
                .pg
                .iter()
                .enumerate()
                .map(|(i, c)| {
                    let log = c.log();
                    let tail: Vec<&str> = log.lines().rev().take(15).collect();
                    format!(
                        "node {} server log (last lines):\n{}",
                        i + 1,
                        tail.into_iter().rev().collect::<Vec<_>>().join("\n")
                    )
                })
                .collect();
            return Err(e.context(format!("replication did not start\n{}", logs.join("\n"))));
        }
        Ok(dep)
    }

    pub fn dsn(&self, i: usize) -> String {
        self.pg[i].dsn(DB)
    }

    pub async fn client(&self, i: usize) -> Result<Client> {
        self.pg[i].connect(DB).await
    }

    /// The nodes whose writes reach the others (native replicates node 0 to node 1 only).
    pub fn writers(&self) -> Vec<usize> {
        match self.system {
            System::Native => vec![0],
            _ => (0..self.pg.len()).collect(),
        }
    }

    /// The nodes that receive `origin`'s writes.
    pub fn receivers(&self, origin: usize) -> Vec<usize> {
        match self.system {
            System::Native => vec![1],
            _ => (0..self.pg.len()).filter(|&j| j != origin).collect(),
        }
    }

    async fn start_accord(&mut self, opts: &Opts) -> Result<()> {
        for i in 0..self.pg.len() {
            let mut db = self.client(i).await?;
            init(&mut db, node_id(i)).await.context("accord init")?;
        }
        let quic = if opts.quic {
            let ports = (0..self.pg.len())
                .map(|_| free_udp_port())
                .collect::<Result<Vec<_>>>()?;
            Some((accord_transport::certs::Ca::generate(1)?, ports))
        } else {
            None
        };
        self.accord = Some(AccordNet {
            quic,
            hub: MemoryHub::new(),
            nodes: BTreeMap::new(),
        });
        for i in 0..self.pg.len() {
            self.start_accord_node(i).await?;
        }
        Ok(())
    }

    async fn start_accord_node(&mut self, i: usize) -> Result<()> {
        let n = self.pg.len();
        let config = NodeConfig {
            node: node_id(i),
            dsn: self.dsn(i),
            cluster: "bench".into(),
            peers: (0..n).filter(|&j| j != i).map(node_id).collect(),
            addresses: Default::default(),
            replication: ReplicationConfig::default(),
            synchronous_commit: self.sync_on,
            spool: Default::default(),
        };
        let net = self
            .accord
            .as_mut()
            .ok_or_else(|| anyhow!("not an accord deployment"))?;
        let node = node_id(i);
        let handle = match &net.quic {
            None => {
                let hub = net.hub.clone();
                start(config, move |_, hello| async move { Ok(hub.join(node, hello).await) }).await?
            }
            Some((ca, ports)) => {
                let listen: SocketAddr = ([127, 0, 0, 1], ports[i]).into();
                let peers: Vec<PeerAddr> = (0..n)
                    .filter(|&j| j != i)
                    .map(|j| PeerAddr {
                        node: node_id(j),
                        addr: ([127, 0, 0, 1], ports[j]).into(),
                    })
                    .collect();
                let cert = ca.issue(node, 1)?;
                let tls = TlsIdentity::from_pem(&ca.cert_pem, &cert.cert_pem, &cert.key_pem)?;
                start(config, move |identity, hello| async move {
                    let mut config = EndpointConfig::new(identity, listen, peers, tls);
                    config.keep_alive = Duration::from_millis(200);
                    config.idle_timeout = Duration::from_secs(5);
                    config.backoff.initial = Duration::from_millis(50);
                    config.backoff.max = Duration::from_millis(500);
                    quic_port(config, hello).map(|(port, _)| port)
                })
                .await?
            }
        };
        net.nodes.insert(i, handle);
        Ok(())
    }

    async fn start_native(&mut self) -> Result<()> {
        let a = self.client(0).await?;
        a.batch_execute("CREATE PUBLICATION bench_pub FOR TABLE bench.items, bench.markers")
            .await?;
        let b = self.client(1).await?;
        b.batch_execute(&format!(
            "CREATE SUBSCRIPTION bench_sub CONNECTION '{}' PUBLICATION bench_pub \
             WITH (copy_data = false, synchronous_commit = '{}')",
            self.dsn(0),
            if self.sync_on { "on" } else { "off" }
        ))
        .await?;
        Ok(())
    }

    async fn start_pglogical(&mut self) -> Result<()> {
        let n = self.pg.len();
        for i in 0..n {
            let db = self.client(i).await?;
            db.batch_execute("CREATE EXTENSION pglogical").await?;
            db.execute(
                "SELECT pglogical.create_node(node_name := $1, dsn := $2)",
                &[&format!("n{i}"), &self.dsn(i)],
            )
            .await?;
            db.batch_execute("SELECT pglogical.replication_set_add_all_tables('default', ARRAY['bench'])")
                .await?;
            let resolution: String = db.query_one("SHOW pglogical.conflict_resolution", &[]).await?.get(0);
            if resolution != "last_update_wins" {
                bail!("pglogical.conflict_resolution is {resolution}");
            }
        }
        for i in 0..n {
            let db = self.client(i).await?;
            for j in (0..n).filter(|&j| j != i) {
                db.query_one(
                    "SELECT pglogical.create_subscription(subscription_name := $1, provider_dsn := $2, \
                     replication_sets := ARRAY['default'], synchronize_structure := false, \
                     synchronize_data := false, forward_origins := '{}')",
                    &[&format!("s{i}_{j}"), &self.dsn(j)],
                )
                .await?;
            }
        }
        // The apply workers create their slots on the providers in the background; what is
        // committed before a slot exists is never sent (there is no initial copy).
        let started = Instant::now();
        for i in 0..n {
            let db = self.client(i).await?;
            loop {
                let waiting: i64 = db
                    .query_one(
                        "SELECT count(*) FROM pglogical.show_subscription_status() WHERE status <> 'replicating'",
                        &[],
                    )
                    .await?
                    .get(0);
                let slots: i64 = db
                    .query_one(
                        "SELECT count(*) FROM pg_replication_slots WHERE slot_name LIKE 'pgl_%' AND active",
                        &[],
                    )
                    .await?
                    .get(0);
                if waiting == 0 && slots == n as i64 - 1 {
                    break;
                }
                if started.elapsed() > Duration::from_secs(60) {
                    bail!("pglogical subscriptions are not replicating after 60 s");
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        Ok(())
    }

    /// Stops replication from node 0 to node 1. accord: node 0's process is killed, so its capture
    /// reads the backlog after [`Deployment::resume`] too; native and pglogical: node 1's
    /// subscription is disabled (the provider's slot keeps the WAL, decoded after the resume).
    pub async fn pause(&mut self) -> Result<()> {
        match self.system {
            System::Accord => {
                let net = self.accord.as_mut().expect("accord net");
                net.hub.leave(node_id(0)).await;
                if let Some(h) = net.nodes.remove(&0) {
                    h.kill().await;
                }
            }
            System::Native => {
                let b = self.client(1).await?;
                b.batch_execute("ALTER SUBSCRIPTION bench_sub DISABLE").await?;
                let started = Instant::now();
                loop {
                    let running: i64 = b
                        .query_one(
                            "SELECT count(*) FROM pg_stat_subscription WHERE subname = 'bench_sub' AND pid IS NOT NULL",
                            &[],
                        )
                        .await?
                        .get(0);
                    if running == 0 {
                        break;
                    }
                    if started.elapsed() > Duration::from_secs(30) {
                        bail!("the subscription worker did not stop");
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
            System::Pglogical => {
                let b = self.client(1).await?;
                b.batch_execute("SELECT pglogical.alter_subscription_disable('s1_0', true)")
                    .await?;
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
        }
        Ok(())
    }

    pub async fn resume(&mut self) -> Result<()> {
        match self.system {
            System::Accord => self.start_accord_node(0).await?,
            System::Native => {
                self.client(1)
                    .await?
                    .batch_execute("ALTER SUBSCRIPTION bench_sub ENABLE")
                    .await?
            }
            System::Pglogical => {
                self.client(1)
                    .await?
                    .batch_execute("SELECT pglogical.alter_subscription_enable('s1_0', true)")
                    .await?
            }
        }
        Ok(())
    }

    /// Commits a marker row on `origin`; returns its number and when the commit returned.
    pub async fn marker(&self, db: &Client, origin: usize) -> Result<(i64, Instant)> {
        let seq = self.seqs[origin].fetch_add(1, Ordering::SeqCst);
        insert_marker(db, origin, seq).await
    }

    /// The status of accord node `i`, when this is accord and the node runs.
    pub fn accord_status(&self, i: usize) -> Option<tokio::sync::watch::Receiver<NodeStatus>> {
        Some(self.accord.as_ref()?.nodes.get(&i)?.status.clone())
    }

    pub fn node_id(i: usize) -> NodeId {
        node_id(i)
    }

    pub fn seqs(&self) -> Arc<Vec<AtomicI64>> {
        self.seqs.clone()
    }

    /// Writes a marker on every writing node and waits until each is visible on its receivers:
    /// every system here applies one origin's transactions in commit order, so then every earlier
    /// write has arrived as well. Returns how long that took.
    pub async fn fence_all(&self, limit: Duration) -> Result<Duration> {
        let started = Instant::now();
        let mut waits = Vec::new();
        for origin in self.writers() {
            let db = self.client(origin).await?;
            let (seq, _) = self.marker(&db, origin).await?;
            for r in self.receivers(origin) {
                waits.push((origin, seq, r));
            }
        }
        for (origin, seq, r) in waits {
            let db = self.client(r).await?;
            wait_marker(&db, origin, seq, started, limit, Duration::from_millis(2)).await?;
        }
        Ok(started.elapsed())
    }

    /// A digest of `bench.items` on node `i`.
    pub async fn checksum(&self, i: usize) -> Result<String> {
        Ok(self
            .client(i)
            .await?
            .query_one(
                "SELECT md5(coalesce(string_agg(id || ':' || v || ':' || n, ',' ORDER BY id), '')) FROM bench.items",
                &[],
            )
            .await?
            .get(0))
    }

    /// Stops every accord node gracefully; the databases go on (their slots keep what is written
    /// meanwhile). accord only.
    pub async fn stop_accord(&mut self) -> Result<()> {
        let net = self
            .accord
            .as_mut()
            .ok_or_else(|| anyhow!("not an accord deployment"))?;
        for (i, h) in std::mem::take(&mut net.nodes) {
            net.hub.leave(node_id(i)).await;
            h.stop().await?;
        }
        Ok(())
    }

    /// Starts every accord node again after [`Deployment::stop_accord`].
    pub async fn restart_accord(&mut self) -> Result<()> {
        for i in 0..self.pg.len() {
            self.start_accord_node(i).await?;
        }
        Ok(())
    }

    pub async fn stop(mut self) {
        if let Some(net) = self.accord.take() {
            for (_, h) in net.nodes {
                let _ = h.stop().await;
            }
        }
        // The clusters stop (immediately) and go away when dropped.
    }
}

pub async fn insert_marker(db: &Client, origin: usize, seq: i64) -> Result<(i64, Instant)> {
    db.execute(
        "INSERT INTO bench.markers (origin, seq) VALUES ($1, $2)",
        &[&(origin as i32 + 1), &seq],
    )
    .await
    .context("marker insert")?;
    Ok((seq, Instant::now()))
}

/// Waits until marker `seq` of `origin` is visible through `db`, polling every `every`.
pub async fn wait_marker(
    db: &Client,
    origin: usize,
    seq: i64,
    started: Instant,
    limit: Duration,
    every: Duration,
) -> Result<Duration> {
    loop {
        let seen: Option<i64> = db
            .query_one(
                "SELECT max(seq) FROM bench.markers WHERE origin = $1",
                &[&(origin as i32 + 1)],
            )
            .await?
            .get(0);
        if seen.unwrap_or(0) >= seq {
            return Ok(started.elapsed());
        }
        if started.elapsed() > limit {
            bail!(
                "marker {seq} of node {} not visible within {limit:?} (seen up to {seen:?})",
                origin + 1
            );
        }
        tokio::time::sleep(every).await;
    }
}
