//! The scenarios: each runs on a started [`Deployment`] and returns its figures.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context, Result};
use tokio::task::JoinHandle;
use tokio_postgres::Client;

use crate::deploy::{insert_marker, wait_marker, Deployment, System};
use crate::{Better, Opts, Row};

/// How long the lag scenario commits markers before the load starts.
const IDLE: Duration = Duration::from_secs(2);

/// Rows of `bench.items` the conflict scenario increments.
pub const HOT_ROWS: i64 = 100;

/// A small xorshift generator: the rows a client updates need no quality, only speed.
pub struct Rng(pub u64);

impl Rng {
    pub fn below(&mut self, n: i64) -> i64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 % n as u64) as i64
    }
}

/// A connection to node `i` whose own commits use `synchronous_commit = sync`.
pub async fn session(dep: &Deployment, i: usize, sync: bool) -> Result<Client> {
    let db = dep.client(i).await?;
    db.batch_execute(if sync {
        "SET synchronous_commit = on"
    } else {
        "SET synchronous_commit = off"
    })
    .await?;
    Ok(db)
}

/// `clients` connections to node `node`, together committing `total` single-row transactions
/// `UPDATE bench.items SET col = col + 1` on random rows `1..=ids`.
async fn spawn_updates(
    dep: &Deployment,
    node: usize,
    clients: u64,
    total: u64,
    column: &str,
    ids: i64,
    sync: bool,
) -> Result<Vec<JoinHandle<Result<()>>>> {
    let mut tasks = Vec::new();
    for c in 0..clients {
        let db = session(dep, node, sync).await?;
        let count = total / clients + u64::from(c < total % clients);
        let sql = format!("UPDATE bench.items SET {column} = {column} + 1 WHERE id = $1");
        let mut rng = Rng(0x9E37_79B9_7F4A_7C15 ^ ((node as u64 + 1) << 32) ^ (c + 1));
        tasks.push(tokio::spawn(async move {
            let stmt = db.prepare(&sql).await?;
            for _ in 0..count {
                let id = 1 + rng.below(ids);
                let n = db.execute(&stmt, &[&id]).await.context("update")?;
                anyhow::ensure!(n == 1, "row {id} missing");
            }
            Ok(())
        }));
    }
    Ok(tasks)
}

async fn join_all(tasks: Vec<JoinHandle<Result<()>>>) -> Result<()> {
    for t in tasks {
        t.await.map_err(|e| anyhow!("writer panicked: {e}"))??;
    }
    Ok(())
}

/// Watches `bench.markers` on one node from its own thread (so that its polling interval is not
/// rounded to the async timer's millisecond): records every time the highest marker of an origin
/// grows, and when.
struct Poller {
    stop: Arc<AtomicBool>,
    thread: thread::JoinHandle<Result<Vec<(i32, i64, Instant)>>>,
}

impl Poller {
    fn start(dsn: String, every: Duration) -> Poller {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            rt.block_on(async move {
                let (db, conn) = tokio_postgres::connect(&dsn, tokio_postgres::NoTls).await?;
                tokio::spawn(async move {
                    let _ = conn.await;
                });
                let stmt = db
                    .prepare("SELECT origin, max(seq) FROM bench.markers GROUP BY origin")
                    .await?;
                let mut last: BTreeMap<i32, i64> = BTreeMap::new();
                let mut seen = Vec::new();
                while !flag.load(Ordering::Relaxed) {
                    let rows = db.query(&stmt, &[]).await?;
                    let now = Instant::now();
                    for row in rows {
                        let (origin, max): (i32, i64) = (row.get(0), row.get(1));
                        if last.get(&origin).is_none_or(|&l| max > l) {
                            last.insert(origin, max);
                            seen.push((origin, max, now));
                        }
                    }
                    thread::sleep(every);
                }
                Ok(seen)
            })
        });
        Poller { stop, thread }
    }

    fn finish(self) -> Result<Vec<(i32, i64, Instant)>> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().map_err(|_| anyhow!("poller panicked"))?
    }
}

/// Commits a marker on `origin` every 100 ms until stopped; returns (seq, commit returned).
fn spawn_markers(
    dep: &Deployment,
    db: Client,
    origin: usize,
    stop: Arc<AtomicBool>,
) -> JoinHandle<Result<Vec<(i64, Instant)>>> {
    let seqs = dep.seqs();
    tokio::spawn(async move {
        let mut out = Vec::new();
        let mut tick = tokio::time::interval(Duration::from_millis(100));
        while !stop.load(Ordering::Relaxed) {
            tick.tick().await;
            let seq = seqs[origin].fetch_add(1, Ordering::SeqCst);
            out.push(insert_marker(&db, origin, seq).await?);
        }
        Ok(out)
    })
}

type Steps = Vec<(Instant, u64, u64)>;

static STEPS: std::sync::Mutex<Steps> = std::sync::Mutex::new(Vec::new());

/// Records (when, node 1's outbound head, node 2's applied position of node 1) at every change.
async fn watch_steps(
    mut a: tokio::sync::watch::Receiver<accord::node::runtime::NodeStatus>,
    mut b: tokio::sync::watch::Receiver<accord::node::runtime::NodeStatus>,
) {
    let origin = Deployment::node_id(0);
    let record = |a: &accord::node::runtime::NodeStatus, b: &accord::node::runtime::NodeStatus| {
        let applied = b.peers.get(&origin).map(|p| p.progress.applied).unwrap_or(0);
        STEPS
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push((Instant::now(), a.head, applied));
    };
    STEPS.lock().unwrap_or_else(|p| p.into_inner()).clear();
    record(&a.borrow_and_update(), &b.borrow_and_update());
    loop {
        tokio::select! {
            r = a.changed() => if r.is_err() { return },
            r = b.changed() => if r.is_err() { return },
        }
        record(&a.borrow_and_update(), &b.borrow_and_update());
    }
}

/// For each marker, how long after its commit returned it was first seen by the poller.
fn lags(markers: &[(i64, Instant)], origin: usize, seen: &[(i32, i64, Instant)]) -> Vec<Duration> {
    let origin = origin as i32 + 1;
    markers
        .iter()
        .filter_map(|&(seq, at)| {
            seen.iter()
                .find(|&&(o, max, _)| o == origin && max >= seq)
                .map(|&(_, _, t)| t.saturating_duration_since(at))
        })
        .collect()
}

pub fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let idx = ((p * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[idx]
}

pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Scenario 1: a backlog of single-row update transactions on node 1 while replication is paused,
/// then resumed; changes per second from the resume until node 2 holds them all.
pub async fn drain(dep: &mut Deployment, opts: &Opts) -> Result<Vec<Row>> {
    let mut rows = Vec::new();
    dep.pause().await?;
    let started = Instant::now();
    join_all(spawn_updates(dep, 0, 4, opts.drain, "v", opts.rows, false).await?).await?;
    let write = started.elapsed();
    crate::progress(format!(
        "  backlog of {} written in {:.1?} ({:.0} tx/s), resuming",
        opts.drain,
        write,
        opts.drain as f64 / write.as_secs_f64()
    ));
    let a = session(dep, 0, true).await?;
    let (seq, _) = dep.marker(&a, 0).await?;
    let b = dep.client(1).await?;
    let started = Instant::now();
    dep.resume().await?;
    let took = wait_marker(&b, 0, seq, started, Duration::from_secs(3600), Duration::from_millis(2)).await?;
    let rate = opts.drain as f64 / took.as_secs_f64();
    let identical = dep.checksum(0).await? == dep.checksum(1).await?;
    rows.push(Row::figure(
        dep,
        "1 drain",
        "changes/s",
        rate,
        format!("{rate:.0} ({} in {:.2?})", opts.drain, took),
        Better::Higher,
    ));
    rows.push(Row::text(
        dep,
        "1 drain",
        "B identical to A",
        if identical { "yes" } else { "NO" },
    ));
    Ok(rows)
}

/// Scenario 2: 4 clients update random rows on node 1; markers every 100 ms; how long each takes to
/// become visible on node 2.
pub async fn lag(dep: &Deployment, opts: &Opts) -> Result<Vec<Row>> {
    let poller = Poller::start(dep.dsn(1), opts.poll);
    let stop = Arc::new(AtomicBool::new(false));
    let markers = spawn_markers(dep, session(dep, 0, true).await?, 0, stop.clone());
    // For accord, when node 1's capture and node 2's apply moved during the idle phase: which
    // step the idle lag is spent in.
    let waits = |dep: &Deployment| {
        dep.accord_status(1).map(|b| {
            b.borrow()
                .peers
                .get(&Deployment::node_id(0))
                .map(|p| p.capture_waits)
                .unwrap_or(0)
        })
    };
    let waits_before = waits(dep);
    let steps = match (dep.accord_status(0), dep.accord_status(1)) {
        (Some(a), Some(b)) => Some(tokio::spawn(watch_steps(a, b))),
        _ => None,
    };
    // First the markers alone: the latency of the path when nothing else is replicated.
    tokio::time::sleep(IDLE).await;
    let idle_waits = waits_before.zip(waits(dep)).map(|(a, b)| b - a);
    let steps = match steps {
        Some(t) => {
            t.abort();
            let _ = t.await;
            Some(std::mem::take(&mut *STEPS.lock().unwrap_or_else(|p| p.into_inner())))
        }
        None => None,
    };
    let started = Instant::now();
    join_all(spawn_updates(dep, 0, 4, opts.lag_tx, "v", opts.rows, true).await?).await?;
    let write = started.elapsed();
    stop.store(true, Ordering::Relaxed);
    let markers = markers.await??;
    dep.fence_all(Duration::from_secs(600)).await?;
    tokio::time::sleep(Duration::from_millis(20)).await;
    let seen = poller.finish()?;
    let (idle, loaded): (Vec<_>, Vec<_>) = markers.iter().copied().partition(|m| m.1 < started);
    let mut idle = lags(&idle, 0, &seen);
    idle.sort();
    let mut lag = lags(&loaded, 0, &seen);
    lag.sort();
    let tps = opts.lag_tx as f64 / write.as_secs_f64();
    let mut rows = Vec::new();
    for (name, p) in [("p50", 0.5), ("max", 1.0)] {
        let v = ms(percentile(&idle, p));
        rows.push(Row::figure(
            dep,
            "2 lag",
            &format!("idle lag {name}, ms"),
            v,
            format!("{v:.2} ({} markers, no load)", idle.len()),
            Better::Lower,
        ));
    }
    if let Some(steps) = steps {
        // In the idle phase each marker is one captured change: the k-th marker is head0 + k.
        if let Some(&(_, head0, applied0)) = steps.first() {
            let idle_markers: Vec<_> = markers.iter().copied().filter(|m| m.1 < started).collect();
            let first_seq = idle_markers.first().map(|m| m.0).unwrap_or(0);
            let mut captured = Vec::new();
            let mut applied = Vec::new();
            for &(seq, at) in &idle_markers {
                let k = (seq - first_seq) as u64 + 1;
                if let Some(t) = steps.iter().find(|s| s.1 >= head0 + k) {
                    captured.push(t.0.saturating_duration_since(at));
                }
                if let Some(t) = steps.iter().find(|s| s.2 >= applied0 + k) {
                    applied.push(t.0.saturating_duration_since(at));
                }
            }
            captured.sort();
            applied.sort();
            rows.push(Row::text(
                dep,
                "2 lag",
                "idle: in A's outbound log, p50/max ms",
                &format!(
                    "{:.2} / {:.2}",
                    ms(percentile(&captured, 0.5)),
                    ms(percentile(&captured, 1.0))
                ),
            ));
            rows.push(Row::text(
                dep,
                "2 lag",
                "idle: applied on B (status), p50/max ms",
                &format!(
                    "{:.2} / {:.2} ({} applies waited for B's capture)",
                    ms(percentile(&applied, 0.5)),
                    ms(percentile(&applied, 1.0)),
                    idle_waits.unwrap_or(0)
                ),
            ));
        }
    }
    rows.push(Row::figure(
        dep,
        "2 lag",
        "load on A, tx/s",
        tps,
        format!("{tps:.0} ({} markers)", lag.len()),
        Better::None,
    ));
    for (name, p) in [("p50", 0.5), ("p95", 0.95), ("p99", 0.99), ("max", 1.0)] {
        let v = ms(percentile(&lag, p));
        rows.push(Row::figure(
            dep,
            "2 lag",
            &format!("lag {name}, ms"),
            v,
            format!("{v:.2}"),
            Better::Lower,
        ));
    }
    Ok(rows)
}

/// The user rows `1..=HOT_ROWS` of node `i`: (id, v, n).
async fn hot_rows(dep: &Deployment, i: usize) -> Result<Vec<(i64, i64, i64)>> {
    Ok(dep
        .client(i)
        .await?
        .query(
            "SELECT id, v, n FROM bench.items WHERE id <= $1 ORDER BY id",
            &[&HOT_ROWS],
        )
        .await?
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect())
}

/// Scenario 3: both nodes increment `n` of the same 100 rows at once.
pub async fn conflicts(dep: &Deployment, opts: &Opts) -> Result<Vec<Row>> {
    let base: i64 = hot_rows(dep, 0).await?.iter().map(|r| r.2).sum();
    let mut tasks = Vec::new();
    let started = Instant::now();
    for node in 0..dep.pg.len() {
        tasks.extend(spawn_updates(dep, node, 2, opts.conflict_tx, "n", HOT_ROWS, true).await?);
    }
    join_all(tasks).await?;
    let write = started.elapsed();
    let total = opts.conflict_tx * dep.pg.len() as u64;
    crate::progress(format!(
        "  {total} increments in {write:.1?} ({:.0} tx/s), waiting for replication",
        total as f64 / write.as_secs_f64()
    ));
    let settle = dep.fence_all(Duration::from_secs(1800)).await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let expected = base + total as i64;
    let nodes: Vec<Vec<(i64, i64, i64)>> = {
        let mut v = Vec::new();
        for i in 0..dep.pg.len() {
            v.push(hot_rows(dep, i).await?);
        }
        v
    };
    let mut rows = vec![Row::text(dep, "3 conflicts", "expected sum", &expected.to_string())];
    let mut lost_most = 0i64;
    for (i, n) in nodes.iter().enumerate() {
        let sum: i64 = n.iter().map(|r| r.2).sum();
        lost_most = lost_most.max(expected - sum);
        rows.push(Row::text(
            dep,
            "3 conflicts",
            &format!("sum on node {}", i + 1),
            &format!("{sum} (lost {})", expected - sum),
        ));
    }
    let differing =
        nodes[0].iter().zip(&nodes[1]).filter(|(a, b)| a != b).count() + nodes[0].len().abs_diff(nodes[1].len());
    rows.push(Row::figure(
        dep,
        "3 conflicts",
        "lost increments",
        lost_most as f64,
        format!("{lost_most} ({:.2}%)", 100.0 * lost_most as f64 / (total.max(1)) as f64),
        Better::Zero,
    ));
    rows.push(Row::text(dep, "3 conflicts", "rows differing", &differing.to_string()));
    let write_rate = total as f64 / write.as_secs_f64();
    rows.push(Row::figure(
        dep,
        "3 conflicts",
        "users' write tx/s",
        write_rate,
        format!("{write_rate:.0}"),
        Better::Higher,
    ));
    rows.push(Row::text(
        dep,
        "3 conflicts",
        "write tx/s, settle after",
        &format!("{:.0}, {:.2?}", total as f64 / write.as_secs_f64(), settle),
    ));
    Ok(rows)
}

/// Scenario 4: three nodes, 2 clients on each updating random rows, markers from every node.
pub async fn mesh(dep: &Deployment, opts: &Opts) -> Result<Vec<Row>> {
    let n = dep.pg.len();
    let pollers: Vec<Poller> = (0..n).map(|i| Poller::start(dep.dsn(i), opts.poll)).collect();
    let stop = Arc::new(AtomicBool::new(false));
    let mut markers = Vec::new();
    for i in 0..n {
        markers.push(spawn_markers(dep, session(dep, i, true).await?, i, stop.clone()));
    }
    let mut tasks = Vec::new();
    let started = Instant::now();
    for node in 0..n {
        tasks.extend(spawn_updates(dep, node, 2, opts.mesh_tx, "v", opts.rows, true).await?);
    }
    join_all(tasks).await?;
    let write = started.elapsed();
    stop.store(true, Ordering::Relaxed);
    let mut written = Vec::new();
    for m in markers {
        written.push(m.await??);
    }
    dep.fence_all(Duration::from_secs(1800)).await?;
    let all = started.elapsed();
    tokio::time::sleep(Duration::from_millis(20)).await;
    let mut seen = Vec::new();
    for p in pollers {
        seen.push(p.finish()?);
    }
    let total = opts.mesh_tx * n as u64;
    let sums: Vec<String> = {
        let mut v = Vec::new();
        for i in 0..n {
            v.push(dep.checksum(i).await?);
        }
        v
    };
    let identical = sums.windows(2).all(|w| w[0] == w[1]);
    let tp = total as f64 / all.as_secs_f64();
    let mut rows = vec![
        Row::figure(
            dep,
            "4 mesh 3 nodes",
            "replicated tx/s",
            tp,
            format!("{tp:.0} ({total} tx written in {write:.1?}, on all nodes after {all:.1?})"),
            Better::Higher,
        ),
        Row::text(
            dep,
            "4 mesh 3 nodes",
            "nodes identical",
            if identical { "yes" } else { "NO" },
        ),
    ];
    let (mut worst_p50, mut worst_p99) = (Duration::ZERO, Duration::ZERO);
    for (origin, markers) in written.iter().enumerate() {
        for r in (0..n).filter(|&r| r != origin) {
            let mut l = lags(markers, origin, &seen[r]);
            l.sort();
            worst_p50 = worst_p50.max(percentile(&l, 0.5));
            worst_p99 = worst_p99.max(percentile(&l, 0.99));
            rows.push(Row::text(
                dep,
                "4 mesh 3 nodes",
                &format!("lag {}→{} p50/p99/max ms", origin + 1, r + 1),
                &format!(
                    "{:.2} / {:.2} / {:.2}",
                    ms(percentile(&l, 0.5)),
                    ms(percentile(&l, 0.99)),
                    ms(percentile(&l, 1.0))
                ),
            ));
        }
    }
    for (name, v) in [("p50", worst_p50), ("p99", worst_p99)] {
        rows.push(Row::figure(
            dep,
            "4 mesh 3 nodes",
            &format!("lag {name} of the worst pair, ms"),
            ms(v),
            format!("{:.2}", ms(v)),
            Better::Lower,
        ));
    }
    Ok(rows)
}

/// Accounts the transfers scenario moves amounts between (the first rows of `bench.items`).
const ACCOUNTS: i64 = 1_000;
/// Rounds of the transfers scenario, each with accord running and then stopped.
const TRANSFER_ROUNDS: usize = 2;

/// What one round of transfers measured: each committed transfer's latency (retries included),
/// the rate, and the user's transactions PostgreSQL aborted as a deadlock's victim.
struct TransferRound {
    latencies: Vec<Duration>,
    per_sec: f64,
    deadlocks: u64,
}

/// 2 clients on every node, each committing `per_client` transfers `n = n - 1` on one account
/// and `n = n + 1` on another in one transaction, retried as a user would on a deadlock.
async fn transfer_round(dep: &Deployment, per_client: u64, round: usize) -> Result<TransferRound> {
    let mut tasks = Vec::new();
    let started = Instant::now();
    for node in 0..dep.pg.len() {
        for c in 0..2u64 {
            let db = session(dep, node, false).await?;
            let mut rng = Rng(0x2545_F491_4F6C_DD1D ^ ((node as u64 + 1) << 40) ^ ((round as u64 + 1) << 20) ^ (c + 1));
            tasks.push(tokio::spawn(async move {
                let mut latencies = Vec::with_capacity(per_client as usize);
                let mut deadlocks = 0u64;
                for _ in 0..per_client {
                    let from = 1 + rng.below(ACCOUNTS);
                    let to = 1 + (from + rng.below(ACCOUNTS - 1)) % ACCOUNTS;
                    let sql = format!(
                        "BEGIN; UPDATE bench.items SET n = n - 1 WHERE id = {from}; \
                         UPDATE bench.items SET n = n + 1 WHERE id = {to}; COMMIT"
                    );
                    let began = Instant::now();
                    loop {
                        match db.batch_execute(&sql).await {
                            Ok(()) => break,
                            Err(e) if e.code() == Some(&tokio_postgres::error::SqlState::T_R_DEADLOCK_DETECTED) => {
                                db.batch_execute("ROLLBACK").await?;
                                deadlocks += 1;
                            }
                            Err(e) => return Err(anyhow::Error::new(e).context("transfer")),
                        }
                    }
                    latencies.push(began.elapsed());
                }
                Ok::<_, anyhow::Error>((latencies, deadlocks))
            }));
        }
    }
    let mut round = TransferRound {
        latencies: Vec::new(),
        per_sec: 0.0,
        deadlocks: 0,
    };
    for t in tasks {
        let (latencies, deadlocks) = t.await.map_err(|e| anyhow!("a transfer client panicked: {e}"))??;
        round.latencies.extend(latencies);
        round.deadlocks += deadlocks;
    }
    round.per_sec = round.latencies.len() as f64 / started.elapsed().as_secs_f64();
    Ok(round)
}

/// Scenario 7 (issue 21): what users moving amounts between two accounts feel on every node,
/// with accord running (and its applies locking the same rows) and with accord stopped, on the
/// same databases, alternated. The sum of `n` over every row never changes, and the nodes end
/// identical.
pub async fn transfers(dep: &mut Deployment, opts: &Opts) -> Result<Vec<Row>> {
    let sum_sql = "SELECT coalesce(sum(n), 0)::bigint FROM bench.items";
    let before: i64 = dep.client(0).await?.query_one(sum_sql, &[]).await?.get(0);
    let mut with = Vec::new();
    let mut without = Vec::new();
    let (mut with_rate, mut without_rate) = (Vec::new(), Vec::new());
    let (mut with_deadlocks, mut without_deadlocks) = (0, 0);
    for round in 0..TRANSFER_ROUNDS {
        let r = transfer_round(dep, opts.transfer_tx, 2 * round).await?;
        with.extend(r.latencies);
        with_rate.push(r.per_sec);
        with_deadlocks += r.deadlocks;
        dep.fence_all(Duration::from_secs(600)).await?;
        dep.stop_accord().await?;
        let r = transfer_round(dep, opts.transfer_tx, 2 * round + 1).await?;
        without.extend(r.latencies);
        without_rate.push(r.per_sec);
        without_deadlocks += r.deadlocks;
        dep.restart_accord().await?;
        dep.fence_all(Duration::from_secs(600)).await?;
    }
    let mut sums = Vec::new();
    let mut digests = Vec::new();
    for i in 0..dep.pg.len() {
        sums.push(dep.client(i).await?.query_one(sum_sql, &[]).await?.get::<_, i64>(0));
        digests.push(dep.checksum(i).await?);
    }
    let apply_deadlocks: u64 = (0..dep.pg.len())
        .filter_map(|i| dep.accord_status(i))
        .map(|s| s.borrow().peers.values().map(|p| p.apply_deadlocks).sum::<u64>())
        .sum();
    with.sort();
    without.sort();
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len().max(1) as f64;
    let (p99_with, p99_without) = (percentile(&with, 0.99), percentile(&without, 0.99));
    const S: &str = "7 transfers";
    Ok(vec![
        Row::text(
            dep,
            S,
            "p50 / p99 ms, accord running",
            &format!("{:.2} / {:.2}", ms(percentile(&with, 0.5)), ms(p99_with)),
        ),
        Row::text(
            dep,
            S,
            "p50 / p99 ms, accord stopped",
            &format!("{:.2} / {:.2}", ms(percentile(&without, 0.5)), ms(p99_without)),
        ),
        Row::figure(
            dep,
            S,
            "p99 with / without accord",
            ms(p99_with) / ms(p99_without).max(1e-9),
            format!("{:.2}×", ms(p99_with) / ms(p99_without).max(1e-9)),
            Better::Lower,
        ),
        Row::figure(
            dep,
            S,
            "transfers/s with / without accord",
            mean(&with_rate) / mean(&without_rate).max(1e-9),
            format!(
                "{:.0} / {:.0} ({:.2}×)",
                mean(&with_rate),
                mean(&without_rate),
                mean(&with_rate) / mean(&without_rate).max(1e-9)
            ),
            Better::Higher,
        ),
        Row::text(
            dep,
            S,
            "deadlocks: users' retried with / without; applies retried (last round)",
            &format!("{with_deadlocks} / {without_deadlocks}; {apply_deadlocks}"),
        ),
        Row::text(
            dep,
            S,
            "nodes identical",
            if digests.windows(2).all(|w| w[0] == w[1]) {
                "yes"
            } else {
                "NO"
            },
        ),
        Row::text(
            dep,
            S,
            "sum of balances kept",
            if sums.iter().all(|&s| s == before) { "yes" } else { "NO" },
        ),
    ])
}

/// Why a system cannot run a scenario, if it cannot.
pub fn unsupported(system: System, scenario: &str) -> Option<&'static str> {
    match (system, scenario) {
        (System::Native | System::Pglogical, "transfers") => {
            Some("n/a: measures what accord costs users writing on every node")
        }
        (System::Native, "conflict") | (System::Native, "mesh") => Some(
            "n/a: PostgreSQL 15 subscriptions cannot skip changes that came from another \
             subscription (origin = none is 16+), so two-way or mesh setups loop",
        ),
        _ => None,
    }
}
