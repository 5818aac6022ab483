//! accord beside PostgreSQL's native logical replication and pglogical (issue 8), on scratch
//! PostgreSQL clusters started by this bench, in one run so that ratios hold on a noisy machine.
//!
//! `cargo bench --bench compare` runs every scenario at the sizes;
//! `ACCORD_CMP_SHORT=1 cargo bench --bench compare` (or `-- --short`) is the short form for CI.
//! docs/benchmarks.md explains the knobs and every figure.

#[path = "compare/deploy.rs"]
mod deploy;
#[path = "compare/inserts.rs"]
mod inserts;
#[path = "compare/micro.rs"]
mod micro;
#[path = "compare/scenarios.rs"]
mod scenarios;
#[path = "compare/writer.rs"]
mod writer;

use std::time::{Duration, Instant};

use anyhow::{bail, Result};

use deploy::{Deployment, System};

/// What to run, and how big (environment variables, see docs/benchmarks.md).
pub struct Opts {
    pub systems: Vec<System>,
    pub syncs: Vec<bool>,
    pub scenarios: Vec<String>,
    /// Rows of `bench.items`.
    pub rows: i64,
    /// Transactions in the drain backlog.
    pub drain: u64,
    /// Transactions of the lag scenario's load (4 clients together).
    pub lag_tx: u64,
    /// Increments per node in the conflict scenario (2 clients each).
    pub conflict_tx: u64,
    /// Transactions per node in the three-node scenario (2 clients each).
    pub mesh_tx: u64,
    /// Single-row inserts per client and round, and rows per bulk insert, of the inserts scenario.
    pub insert_tx: u64,
    pub insert_bulk: u64,
    /// Two-row transfers per client and round of the transfers scenario (2 clients per node).
    pub transfer_tx: u64,
    /// How long each phase of the local-writer scenario runs, and node 1's rate in it.
    pub writer_phase: Duration,
    pub writer_remote_tps: f64,
    pub sim_seeds: u64,
    /// How often the lag pollers look for new markers.
    pub poll: Duration,
    pub fsync: bool,
    /// `shared_buffers` of the bench clusters (the test clusters' 16MB made every system's
    /// backends evict dirty pages themselves).
    pub shared_buffers: String,
    /// More settings of every bench cluster, `name = value` each (for profiling: say
    /// `log_min_duration_statement = 0`), set after the bench's own.
    pub pg_settings: Vec<(String, String)>,
    pub quic: bool,
}

const ALL_SCENARIOS: [&str; 8] = [
    "drain",
    "lag",
    "conflict",
    "mesh",
    "micro",
    "inserts",
    "transfers",
    "writer",
];

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> Result<T> {
    match std::env::var(name) {
        Ok(s) => match s.trim().replace('_', "").parse() {
            Ok(v) => Ok(v),
            Err(_) => bail!("{name}={s:?} is not a valid value"),
        },
        Err(_) => Ok(default),
    }
}

fn env_list(name: &str, default: &str) -> Vec<String> {
    std::env::var(name)
        .unwrap_or_else(|_| default.to_string())
        .split(',')
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .collect()
}

/// A `shared_buffers` size as PostgreSQL reads it: digits and a unit (kB, MB, GB).
fn shared_buffers(size: String) -> Result<String> {
    let digits = size.trim_end_matches(|c: char| c.is_ascii_alphabetic());
    let unit = &size[digits.len()..];
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) || !["kB", "MB", "GB"].contains(&unit) {
        bail!("ACCORD_CMP_SHARED_BUFFERS: {size:?} is not a size such as 128MB (units kB, MB, GB)");
    }
    Ok(size)
}

/// `name = value; name = value` as `ALTER SYSTEM` takes them: a name of letters, digits, `_`
/// and `.`; the value quoted as a literal when it is set.
fn pg_settings(list: &str) -> Result<Vec<(String, String)>> {
    let mut settings = Vec::new();
    for item in list.split(';').map(str::trim).filter(|s| !s.is_empty()) {
        let Some((name, value)) = item.split_once('=') else {
            bail!("ACCORD_CMP_PG_SETTINGS: {item:?} is not name = value");
        };
        let (name, value) = (name.trim(), value.trim().trim_matches('\''));
        if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '.') {
            bail!("ACCORD_CMP_PG_SETTINGS: {name:?} is not a setting's name");
        }
        settings.push((name.to_string(), value.replace('\'', "''")));
    }
    Ok(settings)
}

impl Opts {
    fn from_env() -> Result<Opts> {
        let short = std::env::args().any(|a| a == "--short")
            || std::env::var("ACCORD_CMP_SHORT").is_ok_and(|v| v != "0" && !v.is_empty());
        let pick = |full: u64, small: u64| if short { small } else { full };
        let mut systems = Vec::new();
        for s in env_list("ACCORD_CMP_SYSTEMS", "native,accord,pglogical") {
            match System::parse(&s) {
                Some(sys) => systems.push(sys),
                None => bail!("ACCORD_CMP_SYSTEMS: unknown system {s:?} (accord, native, pglogical)"),
            }
        }
        let mut syncs = Vec::new();
        for s in env_list("ACCORD_CMP_SYNC", "off,on") {
            match s.as_str() {
                "off" => syncs.push(false),
                "on" => syncs.push(true),
                _ => bail!("ACCORD_CMP_SYNC: {s:?} is neither off nor on"),
            }
        }
        let scenarios = env_list(
            "ACCORD_CMP_SCENARIOS",
            "drain,lag,conflict,mesh,micro,inserts,transfers,writer",
        );
        for s in &scenarios {
            if !ALL_SCENARIOS.contains(&s.as_str()) {
                bail!(
                    "ACCORD_CMP_SCENARIOS: unknown scenario {s:?} ({})",
                    ALL_SCENARIOS.join(", ")
                );
            }
        }
        Ok(Opts {
            systems,
            syncs,
            scenarios,
            rows: env_or("ACCORD_CMP_ROWS", 10_000)?,
            drain: env_or("ACCORD_CMP_DRAIN", pick(100_000, 2_000))?,
            lag_tx: env_or("ACCORD_CMP_LAG_TX", pick(40_000, 8_000))?,
            conflict_tx: env_or("ACCORD_CMP_CONFLICT_TX", pick(20_000, 1_000))?,
            mesh_tx: env_or("ACCORD_CMP_MESH_TX", pick(10_000, 1_000))?,
            insert_tx: env_or("ACCORD_CMP_INSERT_TX", pick(20_000, 2_000))?,
            insert_bulk: env_or("ACCORD_CMP_INSERT_BULK", pick(200_000, 20_000))?,
            transfer_tx: env_or("ACCORD_CMP_TRANSFER_TX", pick(3_000, 300))?,
            writer_phase: Duration::from_millis(env_or("ACCORD_CMP_WRITER_MS", pick(5_000, 1_500))?),
            writer_remote_tps: env_or("ACCORD_CMP_WRITER_REMOTE_TPS", 500.0)?,
            sim_seeds: env_or("ACCORD_CMP_SIM_SEEDS", pick(20, 3))?,
            poll: Duration::from_micros(env_or("ACCORD_CMP_POLL_US", 500)?),
            fsync: env_or::<String>("ACCORD_CMP_FSYNC", "on".into())? != "off",
            shared_buffers: shared_buffers(env_or::<String>("ACCORD_CMP_SHARED_BUFFERS", "128MB".into())?)?,
            pg_settings: pg_settings(&std::env::var("ACCORD_CMP_PG_SETTINGS").unwrap_or_default())?,
            quic: env_or::<String>("ACCORD_CMP_NET", "quic".into())? != "memory",
        })
    }

    fn has(&self, scenario: &str) -> bool {
        self.scenarios.iter().any(|s| s == scenario)
    }
}

pub fn progress(line: String) {
    eprintln!("[compare] {line}");
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Better {
    Higher,
    Lower,
    Zero,
    None,
}

/// One line of the report.
pub struct Row {
    system: String,
    sync: String,
    scenario: String,
    figure: String,
    value: Option<f64>,
    shown: String,
    better: Better,
}

fn sync_name(on: bool) -> &'static str {
    if on {
        "on"
    } else {
        "off"
    }
}

impl Row {
    pub fn figure(dep: &Deployment, scenario: &str, figure: &str, value: f64, shown: String, better: Better) -> Row {
        Row {
            system: dep.system.name().into(),
            sync: sync_name(dep.sync_on).into(),
            scenario: scenario.into(),
            figure: figure.into(),
            value: Some(value),
            shown,
            better,
        }
    }

    pub fn text(dep: &Deployment, scenario: &str, figure: &str, shown: &str) -> Row {
        Row {
            system: dep.system.name().into(),
            sync: sync_name(dep.sync_on).into(),
            scenario: scenario.into(),
            figure: figure.into(),
            value: None,
            shown: shown.into(),
            better: Better::None,
        }
    }

    pub fn micro(scenario: &str, figure: &str, value: f64, shown: String) -> Row {
        Row::accord(&format!("5 {scenario}"), figure, value, shown)
    }

    /// A figure of accord alone, with nothing of the other systems to compare it to.
    pub fn accord(scenario: &str, figure: &str, value: f64, shown: String) -> Row {
        Row {
            system: "accord".into(),
            sync: "-".into(),
            scenario: scenario.into(),
            figure: figure.into(),
            value: Some(value),
            shown,
            better: Better::None,
        }
    }

    fn note(system: System, sync: bool, scenario: &str, text: String) -> Row {
        Row {
            system: system.name().into(),
            sync: sync_name(sync).into(),
            scenario: scenario.into(),
            figure: "-".into(),
            value: None,
            shown: text,
            better: Better::None,
        }
    }
}

/// A speed goal of the issues for one of accord's figures, judged against the same run.
enum Goal {
    /// At least this many times the named system's same figure (same `synchronous_commit`).
    AtLeast(&'static str, f64),
    /// At most this many times the named system's same figure.
    AtMost(&'static str, f64),
    /// At most this value, in this unit.
    Below(f64, &'static str),
}

/// The goals of issue 20 (and issue 8's drain on a durable apply).
fn goal_of(row: &Row) -> Option<Goal> {
    Some(match (row.scenario.as_str(), row.figure.as_str()) {
        ("1 drain", "changes/s") if row.sync == "on" => Goal::AtLeast("native", 3.0),
        ("1 drain", "changes/s") => Goal::AtLeast("native", 1.5),
        ("2 lag", "idle lag p50, ms") => Goal::Below(2.0, " ms"),
        ("2 lag", "lag p99, ms") => Goal::AtMost("native", 2.0),
        ("2 lag", "load on A, tx/s") => Goal::AtLeast("pglogical", 0.9),
        ("3 conflicts", "users' write tx/s") => Goal::AtLeast("pglogical", 0.9),
        ("4 mesh 3 nodes", "replicated tx/s") => Goal::AtLeast("pglogical", 1.5),
        ("4 mesh 3 nodes", "lag p50 of the worst pair, ms") => Goal::Below(5.0, " ms"),
        ("4 mesh 3 nodes", "lag p99 of the worst pair, ms") => Goal::AtMost("pglogical", 2.0),
        ("8 local writer", f) if f.ends_with("p99 ÷ quiet p99") => Goal::Below(2.0, "×"),
        _ => return None,
    })
}

/// `row`'s figure over `system`'s same figure in this run.
fn ratio_to(row: &Row, rows: &[Row], system: &str) -> Option<f64> {
    let other = rows
        .iter()
        .find(|n| n.system == system && n.sync == row.sync && n.scenario == row.scenario && n.figure == row.figure)?;
    match (row.value, other.value) {
        (Some(v), Some(o)) if o > 0.0 => Some(v / o),
        _ => None,
    }
}

/// The ratio of `row` to native's same figure in this run, and for accord the issues' goal.
fn compare(row: &Row, rows: &[Row]) -> (String, String) {
    let ratio = match row.better {
        Better::Higher | Better::Lower => ratio_to(row, rows, "native"),
        _ => None,
    };
    let shown = ratio.map(|r| format!("{r:.2}×")).unwrap_or_default();
    if row.system != "accord" {
        return (shown, String::new());
    }
    let goal = match (row.scenario.as_str(), row.figure.as_str()) {
        ("3 conflicts", "lost increments") => match row.value {
            Some(0.0) => "0 lost: met".into(),
            _ => "0 lost: MISSED".into(),
        },
        ("3 conflicts", "rows differing") => {
            if row.shown == "0" {
                "identical: met".into()
            } else {
                "identical: MISSED".into()
            }
        }
        _ => match goal_of(row) {
            Some(Goal::AtLeast(system, want)) => match ratio_to(row, rows, system) {
                Some(r) if r >= want => format!("≥{want}× {system}: met ({r:.2}×)"),
                Some(r) => format!(
                    "≥{want}× {system}: MISSED ({r:.2}×, {:.0}% short)",
                    100.0 * (1.0 - r / want)
                ),
                None => format!("≥{want}× {system}: no {system} figure"),
            },
            Some(Goal::AtMost(system, want)) => match ratio_to(row, rows, system) {
                Some(r) if r <= want => format!("≤{want}× {system}: met ({r:.2}×)"),
                Some(r) => format!("≤{want}× {system}: MISSED ({r:.2}×)"),
                None => format!("≤{want}× {system}: no {system} figure"),
            },
            Some(Goal::Below(bound, unit)) => match row.value {
                Some(v) if v <= bound => format!("≤{bound}{unit}: met"),
                Some(v) => format!("≤{bound}{unit}: MISSED ({:.1}× the bound)", v / bound),
                None => String::new(),
            },
            None => String::new(),
        },
    };
    (shown, goal)
}

fn print_table(rows: &[Row]) {
    let header = [
        "system",
        "sync commit",
        "scenario",
        "figure",
        "value",
        "vs native",
        "goal",
    ];
    let lines: Vec<[String; 7]> = rows
        .iter()
        .map(|r| {
            let (ratio, goal) = compare(r, rows);
            [
                r.system.clone(),
                r.sync.clone(),
                r.scenario.clone(),
                r.figure.clone(),
                r.shown.clone(),
                ratio,
                goal,
            ]
        })
        .collect();
    let mut widths = header.map(|h| h.chars().count());
    for l in &lines {
        for (w, c) in widths.iter_mut().zip(l) {
            *w = (*w).max(c.chars().count());
        }
    }
    let fmt = |cells: &[String]| {
        cells
            .iter()
            .zip(&widths)
            .map(|(c, &w)| format!("{c}{}", " ".repeat(w - c.chars().count())))
            .collect::<Vec<_>>()
            .join(" | ")
            .trim_end()
            .to_string()
    };
    println!("{}", fmt(&header.map(String::from)));
    println!(
        "{}",
        widths.iter().map(|&w| "-".repeat(w)).collect::<Vec<_>>().join("-|-")
    );
    for l in &lines {
        println!("{}", fmt(l));
    }
}

async fn run_pair(system: System, sync: bool, opts: &Opts, rows: &mut Vec<Row>) {
    let wanted: Vec<&str> = ["drain", "lag", "conflict", "transfers", "writer"]
        .into_iter()
        .filter(|s| opts.has(s))
        .collect();
    if wanted.is_empty() {
        return;
    }
    progress(format!(
        "{} (synchronous_commit {}): two nodes",
        system.name(),
        sync_name(sync)
    ));
    let mut dep = match Deployment::start(system, 2, sync, opts.rows, opts).await {
        Ok(d) => d,
        Err(e) => {
            rows.push(Row::note(system, sync, "setup", format!("failed: {e:#}")));
            return;
        }
    };
    for scenario in wanted {
        let label = match scenario {
            "drain" => "1 drain",
            "lag" => "2 lag",
            "transfers" => "7 transfers",
            "writer" => "8 local writer",
            _ => "3 conflicts",
        };
        if let Some(why) = scenarios::unsupported(system, scenario) {
            rows.push(Row::note(system, sync, label, why.into()));
            continue;
        }
        progress(format!("{} {}: {scenario}", system.name(), sync_name(sync)));
        let started = Instant::now();
        let result = match scenario {
            "drain" => scenarios::drain(&mut dep, opts).await,
            "lag" => scenarios::lag(&dep, opts).await,
            "transfers" => scenarios::transfers(&mut dep, opts).await,
            "writer" => writer::local_writer(&dep, opts).await,
            _ => scenarios::conflicts(&dep, opts).await,
        };
        match result {
            Ok(r) => {
                for row in &r {
                    progress(format!("  {}: {}", row.figure, row.shown));
                }
                rows.extend(r);
            }
            Err(e) => rows.push(Row::note(system, sync, label, format!("failed: {e:#}"))),
        }
        progress(format!("  ({:.1?})", started.elapsed()));
    }
    dep.stop().await;
}

async fn run_mesh(system: System, sync: bool, opts: &Opts, rows: &mut Vec<Row>) {
    if let Some(why) = scenarios::unsupported(system, "mesh") {
        rows.push(Row::note(system, sync, "4 mesh 3 nodes", why.into()));
        return;
    }
    progress(format!(
        "{} (synchronous_commit {}): three nodes",
        system.name(),
        sync_name(sync)
    ));
    let started = Instant::now();
    let result = match Deployment::start(system, 3, sync, opts.rows, opts).await {
        Ok(dep) => {
            let r = scenarios::mesh(&dep, opts).await;
            dep.stop().await;
            r
        }
        Err(e) => Err(e.context("setup")),
    };
    match result {
        Ok(r) => {
            for row in &r {
                progress(format!("  {}: {}", row.figure, row.shown));
            }
            rows.extend(r);
        }
        Err(e) => rows.push(Row::note(system, sync, "4 mesh 3 nodes", format!("failed: {e:#}"))),
    }
    progress(format!("  ({:.1?})", started.elapsed()));
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let _ = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "error".into()))
        .try_init();
    let opts = match Opts::from_env() {
        Ok(o) => o,
        Err(e) => {
            eprintln!("{e:#}");
            std::process::exit(2);
        }
    };
    progress(format!(
        "rows {}, drain {}, lag load {}, conflict {}/node, mesh {}/node, sim seeds {}, fsync {}, shared_buffers {}, net {}",
        opts.rows,
        opts.drain,
        opts.lag_tx,
        opts.conflict_tx,
        opts.mesh_tx,
        opts.sim_seeds,
        if opts.fsync { "on" } else { "off" },
        opts.shared_buffers,
        if opts.quic { "quic" } else { "memory" },
    ));
    let started = Instant::now();
    let pglogical_missing = if opts.systems.contains(&System::Pglogical) {
        deploy::pglogical_missing()
    } else {
        None
    };
    let mut rows = Vec::new();
    for &sync in &opts.syncs {
        for &system in &opts.systems {
            if let (System::Pglogical, Some(why)) = (system, &pglogical_missing) {
                rows.push(Row::note(system, sync, "all", why.clone()));
                continue;
            }
            run_pair(system, sync, &opts, &mut rows).await;
        }
    }
    if opts.has("mesh") {
        for &sync in &opts.syncs {
            for &system in &opts.systems {
                if system == System::Pglogical && pglogical_missing.is_some() {
                    continue;
                }
                run_mesh(system, sync, &opts, &mut rows).await;
            }
        }
    }
    if opts.has("micro") {
        progress("engine and simulator".into());
        match tokio::task::spawn_blocking({
            let seeds = opts.sim_seeds;
            move || micro::run(seeds)
        })
        .await
        {
            Ok(Ok(r)) => rows.extend(r),
            Ok(Err(e)) => rows.push(Row::note(System::Accord, false, "5 micro", format!("failed: {e:#}"))),
            Err(e) => rows.push(Row::note(System::Accord, false, "5 micro", format!("panicked: {e}"))),
        }
    }
    if opts.has("inserts") {
        progress("local inserts beside accord's key-lock triggers".into());
        let per_client = i64::try_from(opts.insert_tx).unwrap_or(i64::MAX);
        let bulk = i64::try_from(opts.insert_bulk).unwrap_or(i64::MAX);
        match inserts::run(per_client, bulk).await {
            Ok(r) => {
                for row in &r {
                    progress(format!("  {}: {}", row.figure, row.shown));
                }
                rows.extend(r)
            }
            Err(e) => rows.push(Row::note(
                System::Accord,
                false,
                "6 local inserts",
                format!("failed: {e:#}"),
            )),
        }
    }
    progress(format!("done in {:.1?}", started.elapsed()));
    print_table(&rows);
    let wrong = correctness_failures(&rows);
    if !wrong.is_empty() {
        eprintln!("\naccord got something wrong (a bench that loses data must not pass):");
        for row in wrong {
            eprintln!("  {} | {} | {} | {}", row.sync, row.scenario, row.figure, row.shown);
        }
        std::process::exit(1);
    }
}

/// accord's rows that say it lost or diverged, or that a scenario failed to run. Speed goals
/// missed are reported in the table, not here: figures on a noisy machine vary, data loss
/// does not.
fn correctness_failures(rows: &[Row]) -> Vec<&Row> {
    rows.iter()
        .filter(|row| row.system == "accord")
        .filter(|row| {
            let lost = row.figure == "lost increments" && row.value != Some(0.0);
            let differing = row.figure == "rows differing" && row.shown != "0";
            let diverged = matches!(
                row.figure.as_str(),
                "B identical to A" | "nodes identical" | "sum of balances kept"
            ) && row.shown != "yes";
            let failed = row.figure == "-" && (row.shown.starts_with("failed") || row.shown.starts_with("panicked"));
            lost || differing || diverged || failed
        })
        .collect()
}
