//! Scenario 8 (issue 20): what a user writing on node 2 feels while merges of the same rows
//! arrive from node 1: increments, key changes, deletes and re-inserts. Every system runs it
//! (native replicates node 1 to node 2, which is all the scenario needs).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context, Result};
use tokio::task::JoinHandle;
use tokio_postgres::error::SqlState;
use tokio_postgres::Client;

use crate::deploy::{Deployment, System};
use crate::scenarios::{ms, percentile, session, Rng};
use crate::{Better, Opts, Row};

/// The rows both nodes write: `1..=WRITER_ROWS` of `bench.items`.
const WRITER_ROWS: i64 = 50;
/// Where node 1's key changes move a row, and back from.
const KEY_SHIFT: i64 = 1_000_000_000;
/// Node 2's writers.
const LOCAL_CLIENTS: u64 = 2;
const SCENARIO: &str = "8 local writer";

/// What node 1 writes while node 2's users increment the same rows (nothing, in the quiet phase).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Remote {
    Increments,
    KeyChanges,
    Reinserts,
}

/// A phase's name: what node 1 writes in it.
fn phase_name(remote: Option<Remote>) -> &'static str {
    match remote {
        None => "no remote writes",
        Some(Remote::Increments) => "remote increments",
        Some(Remote::KeyChanges) => "remote key changes",
        Some(Remote::Reinserts) => "remote deletes + re-inserts",
    }
}

impl Remote {
    /// The two statements node 1 alternates on one row: the second undoes or follows the first,
    /// so every row is back in place at the end of a pair.
    fn statements(self) -> [String; 2] {
        match self {
            Remote::Increments => {
                let increment = "UPDATE bench.items SET n = n + 1 WHERE id = $1";
                [increment.into(), increment.into()]
            }
            Remote::KeyChanges => [
                format!("UPDATE bench.items SET id = id + {KEY_SHIFT} WHERE id = $1"),
                format!("UPDATE bench.items SET id = id - {KEY_SHIFT} WHERE id = $1::bigint + {KEY_SHIFT}"),
            ],
            Remote::Reinserts => [
                "DELETE FROM bench.items WHERE id = $1".into(),
                "INSERT INTO bench.items (id) VALUES ($1) ON CONFLICT (id) DO NOTHING".into(),
            ],
        }
    }
}

/// Runs `stmt` until it commits, as a user would: a deadlock's victim tries again. Returns
/// whether it committed (false: a unique violation, which the caller counts and goes on).
async fn commit(db: &Client, stmt: &tokio_postgres::Statement, id: i64, retries: &mut u64) -> Result<bool> {
    loop {
        match db.execute(stmt, &[&id]).await {
            Ok(_) => return Ok(true),
            Err(e) if e.code() == Some(&SqlState::T_R_DEADLOCK_DETECTED) => *retries += 1,
            Err(e) if e.code() == Some(&SqlState::UNIQUE_VIOLATION) => return Ok(false),
            Err(e) => return Err(anyhow::Error::new(e).context("statement")),
        }
    }
}

/// What node 2's writers measured in one phase.
struct LocalRound {
    latencies: Vec<Duration>,
    retries: u64,
}

fn spawn_local(db: Client, client: u64, phase: usize, stop: Arc<AtomicBool>) -> JoinHandle<Result<LocalRound>> {
    tokio::spawn(async move {
        let stmt = db.prepare("UPDATE bench.items SET n = n + 1 WHERE id = $1").await?;
        let mut rng = Rng(0x6A09_E667_F3BC_C908 ^ ((phase as u64 + 1) << 24) ^ (client + 1));
        let mut round = LocalRound {
            latencies: Vec::new(),
            retries: 0,
        };
        while !stop.load(Ordering::Relaxed) {
            let id = 1 + rng.below(WRITER_ROWS);
            let began = Instant::now();
            commit(&db, &stmt, id, &mut round.retries)
                .await
                .context("node 2's writer")?;
            round.latencies.push(began.elapsed());
        }
        Ok(round)
    })
}

/// Node 1's writer: one transaction per tick of `every`, skipping ticks it could not keep up
/// with. Returns (transactions committed, refused by a unique violation, deadlock retries).
fn spawn_remote(
    db: Client,
    kind: Remote,
    every: Duration,
    stop: Arc<AtomicBool>,
) -> JoinHandle<Result<(u64, u64, u64)>> {
    tokio::spawn(async move {
        let [first, second] = kind.statements();
        let (first, second) = (db.prepare(&first).await?, db.prepare(&second).await?);
        let mut rng = Rng(0xBB67_AE85_84CA_A73B);
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        let (mut done, mut refused, mut retries) = (0, 0, 0);
        while !stop.load(Ordering::Relaxed) {
            let id = 1 + rng.below(WRITER_ROWS);
            for stmt in [&first, &second] {
                tick.tick().await;
                if commit(&db, stmt, id, &mut retries).await.context("node 1's writer")? {
                    done += 1;
                } else {
                    refused += 1;
                }
            }
        }
        Ok((done, refused, retries))
    })
}

/// Puts every row of `1..=WRITER_ROWS` back under its own key on node 1 (a key change refused
/// halfway leaves a row moved), so that the scenarios after this one find every row.
async fn restore_rows(dep: &Deployment) -> Result<()> {
    dep.client(0)
        .await?
        .batch_execute(&format!(
            "DELETE FROM bench.items WHERE id > {KEY_SHIFT}; \
             INSERT INTO bench.items (id) SELECT g FROM generate_series(1, {WRITER_ROWS}) g \
             ON CONFLICT (id) DO NOTHING"
        ))
        .await
        .context("restoring the writer scenario's rows")
}

/// For accord: how many of node 2's applies of node 1's changes waited for node 2's capture,
/// and how many merged missing rows without waiting (the status counters).
fn apply_waits(dep: &Deployment) -> Option<(u64, u64)> {
    let status = dep.accord_status(1)?;
    let status = status.borrow();
    let peer = status.peers.get(&Deployment::node_id(0))?;
    Some((peer.capture_waits, peer.keys_clear))
}

/// Scenario 8: four phases of `opts.writer_phase` each. In every phase 2 clients on node 2
/// increment `n` of rows `1..=50` as fast as they can (`synchronous_commit = on`); node 1 writes
/// nothing, then increments, then key changes (a row moved away and back), then deletes and
/// re-inserts of the same rows, at `opts.writer_remote_tps`. After each phase replication settles
/// before the next. Figures: node 2's latency per phase, and its p99 against the quiet phase's.
pub async fn local_writer(dep: &Deployment, opts: &Opts) -> Result<Vec<Row>> {
    let every = Duration::from_secs_f64(1.0 / opts.writer_remote_tps.max(1.0));
    let mut rows = Vec::new();
    let mut quiet_p99 = None;
    for (phase, kind) in [
        None,
        Some(Remote::Increments),
        Some(Remote::KeyChanges),
        Some(Remote::Reinserts),
    ]
    .into_iter()
    .enumerate()
    {
        let stop = Arc::new(AtomicBool::new(false));
        let mut locals = Vec::new();
        for c in 0..LOCAL_CLIENTS {
            locals.push(spawn_local(session(dep, 1, true).await?, c, phase, stop.clone()));
        }
        let remote = match kind {
            None => None,
            Some(kind) => Some(spawn_remote(session(dep, 0, true).await?, kind, every, stop.clone())),
        };
        let waits_before = apply_waits(dep);
        let started = Instant::now();
        tokio::time::sleep(opts.writer_phase).await;
        stop.store(true, Ordering::Relaxed);
        let mut latencies = Vec::new();
        let mut local_retries = 0;
        for t in locals {
            let r = t.await.map_err(|e| anyhow!("a writer on node 2 panicked: {e}"))??;
            latencies.extend(r.latencies);
            local_retries += r.retries;
        }
        let took = started.elapsed();
        let remote = match remote {
            Some(t) => Some(t.await.map_err(|e| anyhow!("node 1's writer panicked: {e}"))??),
            None => None,
        };
        let settle = dep.fence_all(Duration::from_secs(600)).await?;
        let waits = match (waits_before, apply_waits(dep)) {
            (Some((w0, c0)), Some((w1, c1))) => format!(
                "; node 2's applies waited for its capture {} times, merged new rows at once {} times",
                w1 - w0,
                c1 - c0
            ),
            _ => String::new(),
        };
        latencies.sort();
        let (p50, p99) = (percentile(&latencies, 0.5), percentile(&latencies, 0.99));
        let rate = latencies.len() as f64 / took.as_secs_f64();
        let remote_text = match remote {
            Some((done, refused, retries)) => format!(
                "; node 1: {:.0} tx/s, {refused} refused, {retries} deadlock retries",
                done as f64 / took.as_secs_f64()
            ),
            None => String::new(),
        } + &waits;
        crate::progress(format!(
            "  {}: p50 {:.2} ms, p99 {:.2} ms, {rate:.0} tx/s{remote_text}, settled in {settle:.1?}",
            phase_name(kind),
            ms(p50),
            ms(p99)
        ));
        rows.push(Row::text(
            dep,
            SCENARIO,
            &format!("{}: p50 / p99 ms, tx/s", phase_name(kind)),
            &format!(
                "{:.2} / {:.2}, {rate:.0} ({local_retries} deadlock retries{remote_text})",
                ms(p50),
                ms(p99)
            ),
        ));
        match quiet_p99 {
            None => quiet_p99 = Some(p99),
            Some(quiet) => {
                let ratio = ms(p99) / ms(quiet).max(1e-6);
                rows.push(Row::figure(
                    dep,
                    SCENARIO,
                    &format!("{}: p99 ÷ quiet p99", phase_name(kind)),
                    ratio,
                    format!("{ratio:.2}×"),
                    Better::Lower,
                ));
            }
        }
    }
    restore_rows(dep).await?;
    dep.fence_all(Duration::from_secs(600)).await?;
    let identical = match dep.system {
        // Node 2's own increments never reach node 1: one direction only.
        System::Native => "n/a (one direction)".to_string(),
        _ => {
            if dep.checksum(0).await? == dep.checksum(1).await? {
                "yes".into()
            } else {
                "NO".into()
            }
        }
    };
    rows.push(Row::text(dep, SCENARIO, "nodes identical", &identical));
    Ok(rows)
}
