//! `accord demo`: a three-node cluster on this machine, with conflicting work on all three.
//!
//! Everything the demo makes lives in one temporary directory: the certificates and three scratch
//! PostgreSQL clusters ([`crate::scratch_pg`]). The nodes run in this process, as `accord run`
//! would run them, and talk QUIC with mutual TLS on loopback. The report goes to stdout, the
//! progress bar to stderr.
//!
//! The workload's price changes meet only by chance, so the demo then makes one meeting certain
//! by stopping one node's accord while two nodes change the same price, and resolves the item with
//! `accord review resolve` run as its own process, as a user would.

use std::collections::BTreeSet;
use std::net::{SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use accord_engine::{NodeId, ReplicationConfig, ReviewItemId, ReviewKind};
use accord_transport::{certs, EndpointConfig, PeerAddr, TlsIdentity};
use anyhow::{bail, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use tempfile::TempDir;
use tokio::signal::unix::{signal, Signal, SignalKind};
use tokio::task::JoinSet;
use tokio_postgres::Client;

use crate::node::quic::quic_port;
use crate::node::review::ReviewEntry;
use crate::node::runtime::{start, NodeConfig, NodeHandle, NodeStatus, SpoolConfig};
use crate::node::{ids, init, review};
use crate::scratch_pg::PgCluster;

const NODES: usize = 3;
const DB: &str = "shop";
const CLUSTER: &str = "demo";

/// The example schema. The annotations are the point of the demo, so they are printed too.
const SCHEMA: &str = "
CREATE SCHEMA shop;
CREATE TABLE shop.products (
    id    bigint PRIMARY KEY,
    name  text NOT NULL,
    stock bigint NOT NULL,
    price numeric(10,2) NOT NULL
);
COMMENT ON TABLE  shop.products       IS 'The catalogue. @accord replicate';
COMMENT ON COLUMN shop.products.name  IS 'The latest rename wins. @accord lww';
COMMENT ON COLUMN shop.products.stock IS 'Every increment counts, once. @accord delta';
COMMENT ON COLUMN shop.products.price IS 'Concurrent changes go to a person. @accord review';
CREATE TABLE shop.orders (
    id       bigserial PRIMARY KEY,
    product  bigint NOT NULL,
    quantity bigint NOT NULL,
    node     integer NOT NULL
);
COMMENT ON TABLE  shop.orders         IS 'Taken on every node. @accord replicate';
";

/// What `accord ids convert` is run for on every node before `accord init`: a `bigserial`
/// counts from 1 on every node, so orders taken at once on two nodes would share ids.
const ORDERS: &str = "shop.orders";
/// `accord ids convert`'s default for bigint keys.
const ORDER_LANES: i64 = 1024;

/// What every product holds in stock before the workload.
const START_STOCK: i64 = 100;

#[derive(Debug, Clone, clap::Args)]
#[command(after_long_help = "\
What it does: starts three temporary PostgreSQL clusters from the installed server binaries \
(as the `postgres` user when run as root), creates the annotated table shop.products (name lww, \
stock delta, price review) on each with the same products and shop.orders, whose bigserial key \
`accord ids convert` turns into conflict-free ids, runs `accord init`, makes a CA and node \
certificates, starts three nodes on 127.0.0.1 (QUIC with mutual TLS), then writes on all three \
nodes at once: stock increments and decrements on a few hot rows, renames, and price changes on \
the same rows; every sale (a decrement) also takes an order. Whether those price changes meet is chance, so the demo then makes one certain: \
it stops node 3's accord for a moment, changes one product's price on node 1 and on node 3, starts \
node 3's accord again, shows the review item that opens on every node, and resolves it on node 2 \
with `accord review resolve`. It reports, for each node, the rows with a checksum, the stock sum \
against the exact expected sum, the orders (every one kept, each id in its node's lane), the review queue, the review item and its resolution, and lag and \
throughput.

Everything lives in one temporary directory, printed at the start, which is removed at the end, \
also after Ctrl-C. With --keep the nodes and servers stay up after the report so that you can \
look around: write on one node and watch the change reach the others, or work the review queue \
with `accord review` or node 1's review page; the commands and the page's address are printed. \
Ctrl-C (or SIGTERM) then stops and removes it all.

Exit status: 0 when the nodes converged with identical rows, exact stock sums, every order kept \
and the same review queue, and the certain concurrent price change was reviewed and resolved on every node; 1 \
when not; 2 when the demo could not run (for example PostgreSQL is not \
installed: `apt-get install -y postgresql-15`, or set ACCORD_PG_BIN). ACCORD_LOG=accord=debug shows \
what the nodes do.")]
pub struct DemoArgs {
    /// Keep the nodes and PostgreSQL servers running after the report, print how to connect, and
    /// clean everything up on Ctrl-C.
    #[arg(long)]
    pub keep: bool,
    /// Products in the catalogue.
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub products: u32,
    /// The first this many products take all stock and price writes (and half the renames), so
    /// that writers on different nodes meet.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..))]
    pub hot: u32,
    /// Concurrent clients on each node.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=16))]
    pub clients: u32,
    /// Write transactions by each client.
    #[arg(long, default_value_t = 150)]
    pub writes: u32,
    /// Seed of the workload's choices (rows, amounts, operations); random when not given. The
    /// interleaving of the nodes is not seeded, so a seed repeats the writes, not the run.
    #[arg(long)]
    pub seed: Option<u64>,
    /// Seconds to wait for the nodes to converge once the writes are done.
    #[arg(long, default_value_t = 60)]
    pub timeout: u64,
}

/// Runs the demo and prints its report; `Ok(false)` when the nodes did not converge.
pub async fn run(args: DemoArgs) -> Result<bool> {
    // The nodes log through tracing; without a subscriber their errors would vanish. Only errors by
    // default, as the report is the demo's output. `try_init` leaves one that the binary set up.
    let _ = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_env("ACCORD_LOG").unwrap_or_else(|_| "error".into()))
        .try_init();

    // Listening from the start, so that a signal is never missed between two waits; the
    // cleanup runs whenever the user stops the demo.
    let mut stop = Stop::listen()?;
    let bar = ProgressBar::new_spinner();
    bar.enable_steady_tick(Duration::from_millis(120));
    let mut demo = Demo::default();
    let outcome = tokio::select! {
        outcome = demo.run(&args, &bar) => Some(outcome),
        () = stop.recv() => None,
    };
    bar.finish_and_clear();
    let converged = match outcome {
        None => {
            eprintln!("interrupted: stopping the nodes and removing everything");
            demo.cleanup(false).await;
            bail!("interrupted")
        }
        Some(Err(error)) => {
            demo.cleanup(false).await;
            return Err(error);
        }
        Some(Ok(converged)) => converged,
    };
    if args.keep {
        let page = demo.serve_review_page().await;
        demo.print_connect_help(page.as_ref().map(|(url, _)| url.as_str()));
        stop.recv().await;
        if let Some((_, server)) = page {
            server.abort();
        }
        println!();
    }
    demo.cleanup(true).await;
    Ok(converged)
}

/// Ctrl-C (SIGINT) or SIGTERM.
struct Stop {
    interrupt: Signal,
    terminate: Signal,
}

impl Stop {
    fn listen() -> Result<Stop> {
        Ok(Stop {
            interrupt: signal(SignalKind::interrupt()).context("cannot listen for Ctrl-C")?,
            terminate: signal(SignalKind::terminate()).context("cannot listen for SIGTERM")?,
        })
    }

    async fn recv(&mut self) {
        tokio::select! {
            _ = self.interrupt.recv() => {}
            _ = self.terminate.recv() => {}
        }
    }
}

/// What has to be taken down again, whatever happened.
#[derive(Default)]
struct Demo {
    root: Option<TempDir>,
    pg: Vec<PgCluster>,
    nodes: Vec<NodeHandle>,
    quic: Vec<SocketAddr>,
    /// Kept to start a stopped node again.
    tls: Vec<TlsIdentity>,
}

/// One write client's account of what it did.
#[derive(Debug, Default, Clone, Copy)]
struct Tally {
    stock_writes: u64,
    /// Orders inserted with a sale (a stock decrement), in the sale's transaction.
    orders: u64,
    delta_sum: i64,
    renames: u64,
    price_writes: u64,
}

impl Tally {
    fn writes(&self) -> u64 {
        self.stock_writes + self.renames + self.price_writes
    }

    fn add(&mut self, other: Tally) {
        self.stock_writes += other.stock_writes;
        self.orders += other.orders;
        self.delta_sum += other.delta_sum;
        self.renames += other.renames;
        self.price_writes += other.price_writes;
    }
}

/// What one node holds, reduced to what must be equal everywhere.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Snapshot {
    rows: i64,
    checksum: String,
    stock: i64,
    orders: i64,
    orders_checksum: String,
    /// Orders whose id is not in the lane of the node that took them.
    orders_off_lane: i64,
    open_items: i64,
    review_digest: String,
    parked: i64,
}

async fn snapshot(db: &Client) -> Result<Snapshot> {
    let products = db
        .query_one(
            "SELECT count(*), md5(coalesce(string_agg(t::text, E'\\n' ORDER BY t.id), '')), \
                    coalesce(sum(t.stock), 0)::bigint
             FROM shop.products t",
            &[],
        )
        .await
        .context("cannot read shop.products")?;
    let orders = db
        .query_one(
            "SELECT count(*), md5(coalesce(string_agg(t::text, E'\\n' ORDER BY t.id), '')),
                    count(*) FILTER (WHERE t.id % $1 <> t.node)
             FROM shop.orders t",
            &[&ORDER_LANES],
        )
        .await
        .context("cannot read shop.orders")?;
    let review = db
        .query_one(
            "SELECT count(*) FILTER (WHERE kind = 'concurrent' AND status = 'open'),
                    md5(coalesce(string_agg(concat_ws(' | ', id, status, table_name, row_key, column_name,
                        candidates::text), E'\\n' ORDER BY id) FILTER (WHERE kind = 'concurrent'), '')),
                    count(*) FILTER (WHERE kind = 'unapplicable')
             FROM accord.review_items",
            &[],
        )
        .await
        .context("cannot read the review queue")?;
    Ok(Snapshot {
        rows: products.get(0),
        checksum: products.get(1),
        stock: products.get(2),
        orders: orders.get(0),
        orders_checksum: orders.get(1),
        orders_off_lane: orders.get(2),
        open_items: review.get(0),
        review_digest: review.get(1),
        parked: review.get(2),
    })
}

/// How the wait for convergence ended.
struct Convergence {
    /// When the nodes were first found equal and quiet (and stayed so); `None` past the deadline.
    at: Option<Instant>,
    snapshots: Vec<Snapshot>,
}

/// What the demo's own concurrent price change came to.
struct Showcase {
    lines: Vec<String>,
    /// The item opened on every node with both changes as candidates, `accord review resolve`
    /// closed it, and every node then holds the chosen price and the item resolved.
    ok: bool,
}

impl Demo {
    async fn run(&mut self, args: &DemoArgs, bar: &ProgressBar) -> Result<bool> {
        let seed = args.seed.unwrap_or_else(rand::random);
        let hot = args.hot.min(args.products);
        let say = |text: String| bar.suspend(|| println!("{text}"));
        say(format!(
            "accord demo: three nodes on this machine, conflicting writes on all three (seed {seed})\n"
        ));

        bar.set_message("starting three PostgreSQL clusters");
        let root = tempfile::Builder::new()
            .prefix("accord-demo-")
            .tempdir()
            .context("cannot create the demo's temporary directory")?;
        let root_path = root.path().to_path_buf();
        self.root = Some(root);
        say(format!("Directory  {} (removed at the end)", root_path.display()));
        if crate::scratch_pg::run_as().is_some() {
            // The servers run as `postgres`, which must be able to reach its directory in here.
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&root_path, std::fs::Permissions::from_mode(0o711))
                .with_context(|| format!("cannot open {} to the postgres user", root_path.display()))?;
        }
        let pg_root = root_path.clone();
        self.pg = tokio::task::spawn_blocking(move || PgCluster::start_many_in(NODES, &pg_root))
            .await
            .context("starting PostgreSQL panicked")??;

        bar.set_message("creating the catalogue and running accord init");
        for (i, pg) in self.pg.iter().enumerate() {
            let mut db = pg.create_database(DB).await?;
            db.batch_execute(SCHEMA)
                .await
                .context("the demo schema does not apply")?;
            // The same catalogue everywhere before `accord init`, as when the nodes start from
            // copies of one database: init records the rows as they are, and only the
            // conflicting work replicates.
            load_products(&db, args.products, seed).await?;
            let request = ids::ConvertRequest {
                table: ORDERS.into(),
                column: None,
                lanes: None,
                js_safe: false,
            };
            ids::convert(&mut db, &request)
                .await
                .with_context(|| format!("accord ids convert of {ORDERS} on node {} failed", node_id(i)))?;
            init::init(&mut db, node_id(i))
                .await
                .with_context(|| format!("accord init of node {} failed", node_id(i)))?;
        }

        bar.set_message("making certificates");
        let ca_dir = root_path.join("ca");
        certs::init(&ca_dir, 1).context("cannot make the demo CA")?;
        let mut tls = Vec::new();
        for i in 0..NODES {
            let dir = root_path.join(format!("node-{}", node_id(i)));
            let files = certs::node(node_id(i), &ca_dir, &dir, 1)
                .with_context(|| format!("cannot make node {}'s certificate", node_id(i)))?;
            tls.push(
                TlsIdentity::load(&files.ca_cert, &files.cert, &files.key)
                    .with_context(|| format!("cannot load node {}'s certificate", node_id(i)))?,
            );
        }

        bar.set_message("starting the nodes");
        self.quic = (0..NODES).map(|_| free_udp_port()).collect::<Result<_>>()?;
        self.tls = tls;
        for i in 0..NODES {
            let handle = self.start_node(i).await?;
            self.nodes.push(handle);
        }

        for (i, pg) in self.pg.iter().enumerate() {
            say(format!(
                "Node {}     PostgreSQL {}:{}, QUIC {} (mutual TLS, certificate {}/node-{}/)",
                node_id(i),
                pg.host(),
                pg.port(),
                self.quic[i],
                root_path.display(),
                node_id(i)
            ));
        }
        say(format!("\nSchema, on every node:{}", SCHEMA.trim_end()));
        say(String::new());

        let monitors = self.connect_all().await?;
        let connected = self
            .wait_converged(
                &monitors,
                Duration::from_secs(args.timeout),
                bar,
                "connecting the nodes",
            )
            .await?;
        if connected.at.is_none() {
            bail!("the nodes did not connect to each other within {} s", args.timeout);
        }
        let start_sum = connected.snapshots[0].stock;
        let applied_before = applied_total(&self.statuses());

        // The workload.
        let total = u64::from(args.clients) * u64::from(args.writes) * NODES as u64;
        bar.set_style(
            ProgressStyle::with_template("{spinner} {msg} [{bar:30}] {pos}/{len} writes, {elapsed}")?
                .progress_chars("=> "),
        );
        bar.set_length(total);
        bar.set_position(0);
        bar.set_message("writing on all three nodes at once");
        let plan = Plan {
            products: i64::from(args.products),
            hot: i64::from(hot),
            writes: args.writes,
        };
        let mut clients = JoinSet::new();
        for (i, pg) in self.pg.iter().enumerate() {
            for c in 0..args.clients {
                let db = pg.connect(DB).await?;
                let rng = StdRng::seed_from_u64(client_seed(seed, i, c));
                clients.spawn(write_client(db, node_id(i), c, plan, rng, bar.clone()));
            }
        }
        let writes_started = Instant::now();
        let mut tally = Tally::default();
        let mut max_unacked = 0;
        let mut max_lag_secs: f64 = 0.0;
        let mut sampler = tokio::time::interval(Duration::from_millis(100));
        loop {
            tokio::select! {
                done = clients.join_next() => match done {
                    None => break,
                    Some(joined) => tally.add(joined.context("a write client panicked")??),
                },
                _ = sampler.tick() => {
                    let statuses = self.statuses();
                    max_unacked = max_unacked.max(unacked_total(&statuses));
                    max_lag_secs = statuses
                        .iter()
                        .flat_map(|s| s.peers.values())
                        .map(|p| p.outbound_lag_secs)
                        .fold(max_lag_secs, f64::max);
                }
            }
        }
        let writes_took = writes_started.elapsed();
        let writes_stopped = Instant::now();

        bar.set_style(ProgressStyle::with_template("{spinner} {msg}")?);
        let converged = self
            .wait_converged(
                &monitors,
                Duration::from_secs(args.timeout),
                bar,
                "waiting for convergence",
            )
            .await?;
        let statuses = self.statuses();
        let applied = applied_total(&statuses).saturating_sub(applied_before);
        let expected = start_sum + tally.delta_sum;
        let open = review::list(&monitors[0], Some("open")).await?;
        // Past a failed convergence, its waits would only time out too.
        let showcase = match converged.at {
            Some(_) => {
                // A product the workload leaves the price of alone, when there is one, so that the
                // item shown is this part's alone.
                let product = if hot < args.products { hot + 1 } else { 1 };
                Some(
                    self.concurrent_price_edit(&monitors, i64::from(product), Duration::from_secs(args.timeout), bar)
                        .await?,
                )
            }
            None => None,
        };
        bar.finish_and_clear();

        // The report.
        let mut out = String::new();
        let line = |out: &mut String, text: String| {
            out.push_str(&text);
            out.push('\n');
        };
        let writes_per_sec = per_second(tally.writes(), writes_took);
        line(&mut out, "Workload".into());
        line(
            &mut out,
            format!(
                "  {} products; on each node {} clients with {} write transactions each, all at once",
                args.products, args.clients, args.writes
            ),
        );
        line(
            &mut out,
            format!(
                "  {} stock changes on products 1-{hot} (delta), {} renames (lww), {} price changes on products 1-{hot} (review)",
                tally.stock_writes, tally.renames, tally.price_writes
            ),
        );
        line(
            &mut out,
            format!(
                "  {} writes in {:.1} s ({writes_per_sec:.0} per second)",
                tally.writes(),
                writes_took.as_secs_f64()
            ),
        );

        let snaps = &converged.snapshots;
        let identical = snaps.windows(2).all(|w| {
            w[0].rows == w[1].rows && w[0].checksum == w[1].checksum && w[0].orders_checksum == w[1].orders_checksum
        });
        line(&mut out, String::new());
        line(&mut out, "Rows".into());
        for (i, s) in snaps.iter().enumerate() {
            line(
                &mut out,
                format!("  node {}: {} rows, checksum {}", node_id(i), s.rows, s.checksum),
            );
        }
        line(&mut out, format!("  identical on every node: {}", yes_no(identical)));

        let exact = snaps.iter().all(|s| s.stock == expected);
        line(&mut out, String::new());
        line(&mut out, "Stock (delta)".into());
        line(
            &mut out,
            format!(
                "  expected sum {expected} = {start_sum} at the start {} {} from {} increments and decrements on three nodes",
                if tally.delta_sum < 0 { '-' } else { '+' },
                tally.delta_sum.abs(),
                tally.stock_writes
            ),
        );
        for (i, s) in snaps.iter().enumerate() {
            let verdict = if s.stock == expected {
                "exact".to_string()
            } else {
                format!("off by {}", s.stock - expected)
            };
            line(&mut out, format!("  node {}: {}  {verdict}", node_id(i), s.stock));
        }
        line(&mut out, format!("  exact on every node: {}", yes_no(exact)));

        let orders_kept = snaps
            .iter()
            .all(|s| u64::try_from(s.orders).ok() == Some(tally.orders) && s.orders_off_lane == 0);
        line(&mut out, String::new());
        line(&mut out, "Orders (ids from accord.next_id)".into());
        line(
            &mut out,
            format!(
                "  {} orders taken with the sales on three nodes at once; shop.orders.id was a bigserial, \
                 converted by `accord ids convert` on every node",
                tally.orders
            ),
        );
        for (i, s) in snaps.iter().enumerate() {
            line(
                &mut out,
                format!(
                    "  node {}: {} orders, {} ids outside the lane of the node that took them",
                    node_id(i),
                    s.orders,
                    s.orders_off_lane
                ),
            );
        }
        line(
            &mut out,
            format!("  every order kept, no id shared by two nodes: {}", yes_no(orders_kept)),
        );

        let same_queue = snaps.windows(2).all(|w| w[0].review_digest == w[1].review_digest);
        line(&mut out, String::new());
        line(&mut out, "Review queue (price)".into());
        line(
            &mut out,
            format!(
                "  open items per node: {}; the same on every node: {}",
                snaps
                    .iter()
                    .map(|s| s.open_items.to_string())
                    .collect::<Vec<_>>()
                    .join(", "),
                yes_no(same_queue)
            ),
        );
        let concurrent: Vec<_> = open
            .iter()
            .filter(|e| matches!(e.item.kind, ReviewKind::Concurrent { .. }))
            .collect();
        const SHOWN: usize = 3;
        for entry in concurrent.iter().take(SHOWN) {
            for text in item_lines(entry) {
                line(&mut out, text);
            }
        }
        if concurrent.len() > SHOWN {
            line(&mut out, format!("  ... and {} more", concurrent.len() - SHOWN));
        }
        if concurrent.is_empty() {
            line(
                &mut out,
                "  (none of the workload's price changes met this time; the next part makes one certain)".into(),
            );
        }
        let parked: i64 = snaps.iter().map(|s| s.parked).sum();
        if parked > 0 {
            line(
                &mut out,
                format!("  changes parked because they could not be applied: {parked} (see `accord review list`)"),
            );
        }

        line(&mut out, String::new());
        line(&mut out, "A concurrent price change, made certain (review)".into());
        match &showcase {
            Some(showcase) => {
                for text in &showcase.lines {
                    line(&mut out, text.clone());
                }
            }
            None => line(&mut out, "  skipped: the nodes had not converged".into()),
        }
        let reviewed = showcase.as_ref().is_some_and(|s| s.ok);

        line(&mut out, String::new());
        line(&mut out, "Replication".into());
        match converged.at {
            Some(at) => line(
                &mut out,
                format!(
                    "  lag: converged {:.1} s after the writes stopped; during the writes at most {max_unacked} changes \
                     awaited a peer's acknowledgement, the oldest for {max_lag_secs:.1} s",
                    at.saturating_duration_since(writes_stopped).as_secs_f64()
                ),
            ),
            None => line(
                &mut out,
                format!(
                    "  lag: NOT converged {} s after the writes stopped; {} changes still unacknowledged",
                    args.timeout,
                    unacked_total(&statuses)
                ),
            ),
        }
        let busy = converged
            .at
            .unwrap_or_else(Instant::now)
            .saturating_duration_since(writes_started);
        line(
            &mut out,
            format!(
                "  throughput: {applied} changes applied from peers in {:.1} s ({:.0} per second across the three nodes)",
                busy.as_secs_f64(),
                per_second(applied, busy)
            ),
        );
        for (i, s) in statuses.iter().enumerate() {
            let from_peers: u64 = s.peers.values().map(|p| p.applied_changes).sum();
            let conflicts: u64 = s.peers.values().map(|p| p.conflicts.total()).sum();
            line(
                &mut out,
                format!(
                    "  node {}: captured {} local changes, applied {from_peers} from peers, {conflicts} conflicts resolved automatically",
                    node_id(i),
                    s.captured
                ),
            );
        }

        let ok = converged.at.is_some() && identical && exact && orders_kept && same_queue && reviewed;
        line(&mut out, String::new());
        if ok {
            line(
                &mut out,
                "Result: converged: identical rows, exact stock sums and the same review queue on every node; \
                 the concurrent price change was reviewed and resolved on every node"
                    .into(),
            );
        } else {
            let mut missing = Vec::new();
            if converged.at.is_none() {
                missing.push(format!("no convergence within {} s", args.timeout));
            }
            if !orders_kept {
                missing.push("orders were lost or took another node's ids".into());
            }
            if !identical {
                missing.push("the rows differ".into());
            }
            if !exact {
                missing.push("a stock sum is off".into());
            }
            if !same_queue {
                missing.push("the review queues differ".into());
            }
            if !reviewed {
                missing.push("the concurrent price change was not reviewed and resolved on every node".into());
            }
            line(&mut out, format!("Result: NOT converged: {}", missing.join("; ")));
        }
        print!("{out}");
        Ok(ok)
    }

    async fn start_node(&self, i: usize) -> Result<NodeHandle> {
        let node = node_id(i);
        let tls = self
            .tls
            .get(i)
            .cloned()
            .with_context(|| format!("node {node} has no certificate loaded"))?;
        let listen = self.quic[i];
        let peers: Vec<PeerAddr> = (0..NODES)
            .filter(|&j| j != i)
            .map(|j| PeerAddr {
                node: node_id(j),
                addr: self.quic[j],
            })
            .collect();
        let config = NodeConfig {
            node,
            dsn: self.pg[i].dsn(DB),
            cluster: CLUSTER.into(),
            peers: peers.iter().map(|p| p.node).collect(),
            addresses: Default::default(),
            replication: ReplicationConfig::default(),
            synchronous_commit: false,
            spool: SpoolConfig::default(),
        };
        let handle = start(config, move |identity, hello| async move {
            let mut endpoint = EndpointConfig::new(identity, listen, peers, tls);
            // Everything is on loopback: peers that are not up yet are retried quickly.
            endpoint.keep_alive = Duration::from_millis(500);
            endpoint.idle_timeout = Duration::from_secs(5);
            endpoint.backoff.initial = Duration::from_millis(50);
            endpoint.backoff.max = Duration::from_millis(500);
            quic_port(endpoint, hello).map(|(port, _)| port)
        })
        .await
        .with_context(|| format!("node {node} did not start"))?;
        Ok(handle)
    }

    /// Makes a concurrent price change certain, as the workload's writers meet only by chance:
    /// node 3's accord stops (its PostgreSQL keeps taking writes), nodes 1 and 3 change the same
    /// price, node 3's accord starts again. A reviewer then resolves the item on node 2 with
    /// `accord review resolve`, the command the README gives, run as a separate process.
    async fn concurrent_price_edit(
        &mut self,
        monitors: &[Client],
        product: i64,
        limit: Duration,
        bar: &ProgressBar,
    ) -> Result<Showcase> {
        const WRITERS: [usize; 2] = [0, NODES - 1];
        const REVIEWER: usize = 1;
        let stopped = WRITERS[1];
        let mut lines = Vec::new();
        let failed = |mut lines: Vec<String>, why: String| -> Result<Showcase> {
            lines.push(format!("  FAILED: {why}"));
            Ok(Showcase { lines, ok: false })
        };
        let known: BTreeSet<ReviewItemId> = review::list(&monitors[0], None)
            .await?
            .into_iter()
            .map(|e| e.id)
            .collect();

        bar.set_message(format!("stopping node {}'s accord", node_id(stopped)));
        let handle = self.nodes.remove(stopped);
        handle
            .stop()
            .await
            .with_context(|| format!("node {} did not stop", node_id(stopped)))?;
        let before: String = monitors[0]
            .query_one("SELECT price::text FROM shop.products WHERE id = $1", &[&product])
            .await
            .with_context(|| format!("cannot read product {product}'s price"))?
            .get(0);
        lines.push(format!(
            "  node {}'s accord stopped (its PostgreSQL keeps taking writes); product {product}'s price is {before} on every node",
            node_id(stopped)
        ));
        let mut written = Vec::new();
        for (step, &i) in WRITERS.iter().enumerate() {
            let raise = format!("{}.00", step + 1);
            let row = monitors[i]
                .query_one(
                    "UPDATE shop.products SET price = price + $2::text::numeric WHERE id = $1 RETURNING price::text",
                    &[&product, &raise],
                )
                .await
                .with_context(|| format!("cannot change product {product}'s price on node {}", node_id(i)))?;
            written.push(row.get::<_, String>(0));
        }
        lines.push(format!(
            "  node {} sets it to {}, node {} to {}: neither node has seen the other's change",
            node_id(WRITERS[0]),
            written[0],
            node_id(WRITERS[1]),
            written[1]
        ));

        bar.set_message(format!("starting node {}'s accord again", node_id(stopped)));
        self.wait_port_free(stopped, limit).await?;
        let handle = self.start_node(stopped).await?;
        self.nodes.insert(stopped, handle);
        let restarted = Instant::now();

        bar.set_message("waiting for the review item on every node");
        let item = loop {
            let mut seen = Vec::new();
            for db in monitors {
                let open = review::list(db, Some("open")).await?;
                seen.push(open.into_iter().find(|e| {
                    !known.contains(&e.id)
                        && e.item.column.as_deref() == Some("price")
                        && matches!(e.item.kind, ReviewKind::Concurrent { .. })
                }));
            }
            if let [Some(first), rest @ ..] = seen.as_slice() {
                if rest.iter().all(|e| e.as_ref() == Some(first)) {
                    break first.clone();
                }
            }
            if restarted.elapsed() > limit {
                let on: Vec<String> = seen
                    .iter()
                    .enumerate()
                    .filter(|(_, e)| e.is_some())
                    .map(|(i, _)| node_id(i).to_string())
                    .collect();
                return failed(
                    lines,
                    format!(
                        "no review item on every node {} s after node {}'s accord started again (one on nodes: [{}])",
                        limit.as_secs(),
                        node_id(stopped),
                        on.join(", ")
                    ),
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        lines.push(format!(
            "  node {}'s accord started again; {:.1} s later the same item is open on nodes 1, 2 and 3:",
            node_id(stopped),
            restarted.elapsed().as_secs_f64()
        ));
        lines.extend(item_lines(&item));
        let ReviewKind::Concurrent {
            candidates,
            provisional,
        } = &item.item.kind
        else {
            return failed(lines, format!("item {} is not a choice between values", item.id));
        };
        let origins: BTreeSet<NodeId> = candidates.iter().map(|c| c.stamp.node).collect();
        let writers: BTreeSet<NodeId> = WRITERS.iter().map(|&i| node_id(i)).collect();
        if candidates.len() != 2 || origins != writers {
            return failed(
                lines,
                format!("item {} does not hold just the changes of nodes 1 and 3", item.id),
            );
        }
        // The candidate that is not in the table now, so that the resolution visibly changes it.
        let Some(pick) = candidates.iter().position(|c| c.stamp != *provisional).map(|n| n + 1) else {
            return failed(
                lines,
                format!("every candidate of item {} is the provisional winner", item.id),
            );
        };

        bar.set_message("resolving the item with accord review resolve");
        let dsn = self.pg[REVIEWER].dsn(DB);
        let program =
            std::env::current_exe().context("cannot find this accord binary to run `accord review resolve`")?;
        // The name this binary was started by, so that the printed command works as printed.
        let shown = std::env::args().next().unwrap_or_else(|| "accord".into());
        let resolve_args = vec![
            "review".to_string(),
            "resolve".into(),
            item.id.to_string(),
            "--pick".into(),
            pick.to_string(),
            "--dsn".into(),
            dsn.clone(),
        ];
        lines.push(format!(
            "  a reviewer keeps candidate {pick} on node {}, with the command the README gives:",
            node_id(REVIEWER)
        ));
        lines.push(format!(
            "    $ {shown} review resolve {} --pick {pick} --dsn '{dsn}'",
            item.id
        ));
        let output =
            tokio::task::spawn_blocking(move || std::process::Command::new(program).args(resolve_args).output())
                .await
                .context("running `accord review resolve` panicked")?
                .context("cannot run `accord review resolve`")?;
        let resolved_at = Instant::now();
        for text in String::from_utf8_lossy(&output.stdout).lines() {
            lines.push(format!("    {text}"));
        }
        if !output.status.success() {
            let error = String::from_utf8_lossy(&output.stderr).trim().to_string();
            return failed(lines, format!("`accord review resolve` failed: {error}"));
        }
        let chosen = candidates[pick - 1].value.to_string();

        bar.set_message("waiting for the resolution on every node");
        loop {
            let mut done = 0;
            for db in monitors {
                let entry = review::show(db, item.id).await?;
                let holds: bool = db
                    .query_one(
                        "SELECT price = $2::text::numeric FROM shop.products WHERE id = $1",
                        &[&product, &chosen],
                    )
                    .await
                    .with_context(|| format!("cannot read product {product}'s price"))?
                    .get(0);
                if entry.status == "resolved" && holds {
                    done += 1;
                }
            }
            if done == monitors.len() {
                break;
            }
            if resolved_at.elapsed() > limit {
                return failed(
                    lines,
                    format!(
                        "the resolution reached {done} of {} nodes within {} s",
                        monitors.len(),
                        limit.as_secs()
                    ),
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let reached = resolved_at.elapsed();
        let settled = self
            .wait_converged(monitors, limit, bar, "waiting for convergence after the review")
            .await?;
        let equal = settled.at.is_some() && settled.snapshots.windows(2).all(|w| w[0] == w[1]);
        lines.push(format!(
            "  {:.1} s later item {} is resolved on nodes 1, 2 and 3, and product {product}'s price is {chosen} on every node",
            reached.as_secs_f64(),
            item.id
        ));
        if !equal {
            return failed(lines, "the nodes did not converge after the review".into());
        }
        lines.push("  rows and review queues identical on every node again: yes".into());
        Ok(Showcase { lines, ok: true })
    }

    /// Waits until node `i`'s QUIC port can be bound again: its stopped endpoint lets go of the
    /// socket in the background, and the node must come back on the address its peers dial.
    async fn wait_port_free(&self, i: usize, limit: Duration) -> Result<()> {
        let started = Instant::now();
        loop {
            match UdpSocket::bind(self.quic[i]) {
                Ok(_) => return Ok(()),
                Err(error) if started.elapsed() > limit => {
                    return Err(error)
                        .with_context(|| format!("node {}'s QUIC port {} stays taken", node_id(i), self.quic[i]))
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    }

    async fn connect_all(&self) -> Result<Vec<Client>> {
        let mut all = Vec::new();
        for pg in &self.pg {
            all.push(pg.connect(DB).await?);
        }
        Ok(all)
    }

    fn statuses(&self) -> Vec<NodeStatus> {
        self.nodes.iter().map(|h| h.status.borrow().clone()).collect()
    }

    /// Waits until every node is connected to every peer with nothing unacknowledged, and holds the
    /// same rows and review queue as the others, three looks in a row.
    async fn wait_converged(
        &self,
        monitors: &[Client],
        limit: Duration,
        bar: &ProgressBar,
        what: &str,
    ) -> Result<Convergence> {
        let started = Instant::now();
        let mut stable = 0;
        let mut first_equal: Option<Instant> = None;
        let mut last: Vec<Snapshot> = Vec::new();
        loop {
            let statuses = self.statuses();
            let quiet = statuses
                .iter()
                .all(|s| s.peers.values().all(|p| p.connected && p.unacked == 0));
            let mut snapshots = Vec::new();
            for db in monitors {
                snapshots.push(snapshot(db).await?);
            }
            let now = Instant::now();
            let same = snapshots.windows(2).all(|w| w[0] == w[1]);
            if quiet && same && snapshots.first() == last.first() {
                stable += 1;
                if stable >= 3 {
                    return Ok(Convergence {
                        at: first_equal.or(Some(now)),
                        snapshots,
                    });
                }
            } else if quiet && same {
                stable = 1;
                first_equal = Some(now);
            } else {
                stable = 0;
                first_equal = None;
            }
            last = snapshots;
            if started.elapsed() > limit {
                return Ok(Convergence {
                    at: None,
                    snapshots: last,
                });
            }
            bar.set_message(format!(
                "{what}: {} changes not yet acknowledged",
                unacked_total(&statuses)
            ));
            tokio::time::sleep(Duration::from_millis(150)).await;
        }
    }

    /// Node 1's review page on a loopback port, with a one-off token; `None` (with a warning) when
    /// it cannot be served, as the rest of --keep is useful without it.
    async fn serve_review_page(&self) -> Option<(String, tokio::task::JoinHandle<()>)> {
        let pg = self.pg.first()?;
        let listener = match tokio::net::TcpListener::bind("127.0.0.1:0").await {
            Ok(listener) => listener,
            Err(error) => {
                eprintln!("warning: no review page: cannot listen on 127.0.0.1: {error}");
                return None;
            }
        };
        let addr = listener.local_addr().ok()?;
        let token: String = (0..16).map(|_| format!("{:02x}", rand::random::<u8>())).collect();
        let app = crate::review_page::router(crate::review_page::ReviewPage {
            dsn: pg.dsn(DB),
            token: token.clone(),
        });
        let server = tokio::spawn(async move {
            if let Err(error) = axum::serve(listener, app).await {
                eprintln!("warning: the review page stopped: {error}");
            }
        });
        Some((format!("http://{addr}/?token={token}"), server))
    }

    fn print_connect_help(&self, review_page: Option<&str>) {
        let Some(root) = &self.root else { return };
        println!("\nKept running (--keep). The nodes go on replicating; try, for example:");
        for (i, pg) in self.pg.iter().enumerate() {
            let dsn = pg.dsn(DB);
            println!("  node {}: {} '{dsn}'", node_id(i), pg.bin_dir().join("psql").display());
        }
        let first = self.pg.first().map(|pg| pg.dsn(DB)).unwrap_or_default();
        if let Some(url) = review_page {
            println!("  the review page of node 1: {url}");
        }
        // The path this binary was started by, so the commands work as printed from a fresh
        // build (`target/release/accord`) as well as from an installed one.
        let accord = std::env::args().next().unwrap_or_else(|| "accord".into());
        println!("  {accord} review list --dsn '{first}'");
        println!(
            "  {accord} review show ID --dsn '{first}'   then   {accord} review resolve ID --pick 1 --dsn '{first}'"
        );
        println!(
            "  UPDATE shop.products SET stock = stock + 1 WHERE id = 1;   -- on one node, then read it on another"
        );
        println!("Everything is in {}.", root.path().display());
        println!("Press Ctrl-C to stop the nodes and PostgreSQL and remove it all (SIGTERM does the same).");
    }

    /// Stops the nodes, then the servers, then removes the directory. Errors are reported, not
    /// returned: the cleanup goes on, and the demo's verdict stands.
    async fn cleanup(&mut self, report: bool) {
        for handle in std::mem::take(&mut self.nodes) {
            let node = handle.node;
            match tokio::time::timeout(Duration::from_secs(10), handle.stop()).await {
                Ok(Ok(())) => {}
                Ok(Err(error)) => eprintln!("warning: node {node} stopped with an error: {error:#}"),
                Err(_) => eprintln!("warning: node {node} did not stop within 10 s"),
            }
        }
        let pg = std::mem::take(&mut self.pg);
        // Dropping a cluster stops its server with pg_ctl, which blocks.
        if tokio::task::spawn_blocking(move || drop(pg)).await.is_err() {
            eprintln!("warning: stopping PostgreSQL panicked");
        }
        if let Some(root) = self.root.take() {
            let path = root.path().to_path_buf();
            match root.close() {
                Ok(()) if report => println!(
                    "\nCleaned up: nodes stopped, PostgreSQL stopped, {} removed",
                    path.display()
                ),
                Ok(()) => {}
                Err(error) => eprintln!("warning: cannot remove {}: {error}", path.display()),
            }
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Plan {
    products: i64,
    hot: i64,
    writes: u32,
}

/// One client of one node: autocommitted single-row updates, as fast as the database takes them.
async fn write_client(
    db: Client,
    node: NodeId,
    client: u32,
    plan: Plan,
    mut rng: StdRng,
    bar: ProgressBar,
) -> Result<Tally> {
    let stock = db
        .prepare("UPDATE shop.products SET stock = stock + $1 WHERE id = $2")
        .await?;
    // A sale takes stock and records an order, in one transaction; the order's id comes from its
    // default, accord.next_id.
    let sale = db
        .prepare(
            "WITH sold AS (UPDATE shop.products SET stock = stock + $1 WHERE id = $2 RETURNING id)
             INSERT INTO shop.orders (product, quantity, node) SELECT id, -$1::bigint, $3 FROM sold",
        )
        .await?;
    let node_number = i32::try_from(node.0).context("a node id beyond integer")?;
    let rename = db.prepare("UPDATE shop.products SET name = $1 WHERE id = $2").await?;
    let price = db
        .prepare("UPDATE shop.products SET price = $1::text::numeric WHERE id = $2")
        .await?;
    let mut tally = Tally::default();
    for k in 0..plan.writes {
        let roll = rng.random_range(0..100);
        let id = if roll < 85 || rng.random_bool(0.5) {
            rng.random_range(1..=plan.hot)
        } else {
            rng.random_range(1..=plan.products)
        };
        let updated = if roll < 70 {
            let delta: i64 = rng.random_range(1..=9) * if rng.random_bool(0.5) { 1 } else { -1 };
            let n = if delta < 0 {
                db.execute(&sale, &[&delta, &id, &node_number]).await?
            } else {
                db.execute(&stock, &[&delta, &id]).await?
            };
            if n == 1 {
                tally.stock_writes += 1;
                tally.delta_sum += delta;
                tally.orders += u64::from(delta < 0);
            }
            n
        } else if roll < 85 {
            let n = db
                .execute(&price, &[&price_text(rng.random_range(100..=9_999)), &id])
                .await?;
            tally.price_writes += n;
            n
        } else {
            let name = format!("product {id}, renamed by client {client} on node {node} (#{k})");
            let n = db.execute(&rename, &[&name, &id]).await?;
            tally.renames += n;
            n
        };
        if updated != 1 {
            bail!("product {id} is missing on node {node}");
        }
        bar.inc(1);
    }
    Ok(tally)
}

async fn load_products(db: &Client, products: u32, seed: u64) -> Result<()> {
    let mut rng = StdRng::seed_from_u64(seed);
    let insert = db
        .prepare("INSERT INTO shop.products (id, name, stock, price) VALUES ($1, $2, $3, $4::text::numeric)")
        .await?;
    // Batches of one transaction each: one per product would be slow, one for all a huge change.
    for chunk in (1..=i64::from(products)).collect::<Vec<_>>().chunks(500) {
        db.batch_execute("BEGIN").await?;
        for &id in chunk {
            let name = format!("product {id}");
            db.execute(
                &insert,
                &[&id, &name, &START_STOCK, &price_text(rng.random_range(100..=9_999))],
            )
            .await?;
        }
        db.batch_execute("COMMIT").await?;
    }
    Ok(())
}

/// A concurrent-write item as the report shows it: the row, then the candidates with their nodes.
fn item_lines(entry: &ReviewEntry) -> Vec<String> {
    let column = entry.item.column.as_deref().unwrap_or("");
    let mut lines = vec![format!(
        "  item {}: {} {} {column}",
        entry.id, entry.item.table, entry.item.key
    )];
    if let ReviewKind::Concurrent {
        candidates,
        provisional,
    } = &entry.item.kind
    {
        for (n, c) in candidates.iter().enumerate() {
            let mark = if c.stamp == *provisional {
                "  (provisional winner, in the table now)"
            } else {
                ""
            };
            lines.push(format!(
                "    {}. {}  written on node {}{mark}",
                n + 1,
                c.value,
                c.stamp.node
            ));
        }
    }
    lines
}

fn price_text(cents: u32) -> String {
    format!("{}.{:02}", cents / 100, cents % 100)
}

fn node_id(i: usize) -> NodeId {
    // At most NODES (3) nodes, so the index always fits.
    NodeId(i as u32 + 1)
}

fn client_seed(seed: u64, node: usize, client: u32) -> u64 {
    let mut h = blake3::Hasher::new();
    h.update(&seed.to_le_bytes());
    h.update(&(node as u64).to_le_bytes());
    h.update(&client.to_le_bytes());
    let mut bytes = [0; 8];
    bytes.copy_from_slice(&h.finalize().as_bytes()[..8]);
    u64::from_le_bytes(bytes)
}

fn unacked_total(statuses: &[NodeStatus]) -> u64 {
    statuses.iter().flat_map(|s| s.peers.values()).map(|p| p.unacked).sum()
}

fn applied_total(statuses: &[NodeStatus]) -> u64 {
    statuses
        .iter()
        .flat_map(|s| s.peers.values())
        .map(|p| p.applied_changes)
        .sum()
}

fn per_second(n: u64, took: Duration) -> f64 {
    n as f64 / took.as_secs_f64().max(0.001)
}

fn yes_no(b: bool) -> &'static str {
    if b {
        "yes"
    } else {
        "no"
    }
}

/// A UDP port that was free a moment ago (the node's endpoint binds it right after).
fn free_udp_port() -> Result<SocketAddr> {
    UdpSocket::bind("127.0.0.1:0")
        .and_then(|s| s.local_addr())
        .context("cannot find a free UDP port on 127.0.0.1")
}
