//! `accord sim`: the command line over the runner. The service's binary only forwards to `run`.

use std::io::Write;

use clap::Args;
use thiserror::Error;

use crate::config::{parse_seed_range, ConfigError, FaultSet, PlantedBug, SimConfig};
use crate::runner::{check_determinism, run_many, trace_lines, Determinism, SeedReport};
use crate::shrink::shrink;

#[derive(Debug, Clone, Args)]
pub struct SimArgs {
    /// Run one seed.
    #[arg(long, conflicts_with = "seeds")]
    pub seed: Option<u64>,
    /// Run a range of seeds, A..B (B excluded), in parallel over the cores.
    #[arg(long, value_name = "A..B")]
    pub seeds: Option<String>,
    /// Nodes in the cluster.
    #[arg(long, default_value_t = 3)]
    pub nodes: usize,
    /// Local transactions the workload commits (then the cluster heals and must converge).
    #[arg(long, default_value_t = 2_000)]
    pub ops: u64,
    /// Fault kinds to inject: all, none, or a list of crash, machine-crash, partition, clog,
    /// drop, ghost, clock-step, rogue-clock, capture-stall, toast. Each seed draws its own rates.
    #[arg(long, default_value = "all")]
    pub faults: String,
    /// Maximum clock offset in µs (default: each seed draws one).
    #[arg(long, value_name = "MICROS")]
    pub max_offset_us: Option<u64>,
    /// Threads for --seeds (default: the number of cores).
    #[arg(long)]
    pub jobs: Option<usize>,
    /// Run each seed twice and report the first event where the runs differ.
    #[arg(long)]
    pub check_determinism: bool,
    /// Minimise each failing run and print the smallest reproducer found.
    #[arg(long)]
    pub shrink: bool,
    /// Print every event of the run (one seed).
    #[arg(long)]
    pub trace: bool,
    /// The last node joins the running cluster during the workload (`accord join`): copied
    /// from a donor in chunks while every node writes, the join killed and resumed at times.
    #[arg(long)]
    pub join: bool,
    /// A node leaves the running cluster during the workload (`accord leave`): it hands its
    /// changes over, then leaves by itself or dies and is removed through another node.
    #[arg(long)]
    pub leave: bool,
    /// Every node runs a schema migration during the workload, each at its own time (adding a
    /// `delta` column it writes from then on), some while down.
    #[arg(long)]
    pub migrate: bool,
    /// The table says `inserts=review`: two concurrent inserts of one key keep the earlier as
    /// the row and the other whole in the review queue.
    #[arg(long)]
    pub review_inserts: bool,
    /// Plant a known bug in the simulator's driver (for testing the simulator itself).
    #[arg(long, hide = true)]
    pub plant_bug: Option<String>,
}

#[derive(Debug, Error)]
pub enum SimError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("give --seed N or --seeds A..B")]
    NoSeed,
    #[error("cannot write the report: {0}")]
    Io(#[from] std::io::Error),
}

impl SimArgs {
    /// The configurations to run, one per seed.
    pub fn configs(&self) -> Result<Vec<SimConfig>, SimError> {
        let seeds = match (&self.seed, &self.seeds) {
            (Some(seed), _) => *seed..seed + 1,
            (None, Some(range)) => parse_seed_range(range)?,
            (None, None) => return Err(SimError::NoSeed),
        };
        let faults: FaultSet = self.faults.parse()?;
        let bug = self.plant_bug.as_deref().map(str::parse::<PlantedBug>).transpose()?;
        let configs: Vec<SimConfig> = seeds
            .map(|seed| SimConfig {
                seed,
                nodes: self.nodes,
                ops: self.ops,
                faults,
                max_offset_micros: self.max_offset_us,
                bug,
                join: self.join,
                leave: self.leave,
                migrate: self.migrate,
                review_inserts: self.review_inserts,
            })
            .collect();
        if let Some(first) = configs.first() {
            first.validate()?;
        }
        Ok(configs)
    }
}

fn line(report: &SeedReport) -> String {
    let s = &report.stats;
    let join = if report.config.join {
        format!(
            " joined={:.1}s known_after={:.2}s chunks={} marks={} kills={}",
            s.joined_at as f64 / 1e6,
            s.join_member_wait as f64 / 1e6,
            s.join_chunks,
            s.join_marks,
            s.join_kills
        )
    } else {
        String::new()
    };
    let join = if report.config.migrate {
        format!(
            "{join} migrations={} shape_waits={} shape_splits={}",
            s.migrations, s.shape_waits, s.shape_splits
        )
    } else {
        join
    };
    let join = if report.config.review_inserts {
        format!(
            "{join} displaced={} resolved={}",
            s.displaced_inserts, s.displaced_resolved
        )
    } else {
        join
    };
    let join = if report.config.leave {
        format!(
            "{join} left={:.1}s dropped={}",
            s.left_at as f64 / 1e6,
            s.members_removed
        )
    } else {
        join
    };
    let text = format!(
        "seed {}: {} hash={:016x} ops={} events={} deliveries={} sim={:.1}s conflicts={} waits={} clear={} locks={} deadlocks={} waived={} truncates={} spooled={}/{} refused={} faults={} rounds={} collected={} window={}",
        report.config.seed,
        if report.passed() { "ok" } else { "FAIL" },
        report.hash,
        report.config.ops,
        s.events,
        s.deliveries,
        s.sim_time as f64 / 1e6,
        s.conflicts,
        s.apply_waits,
        s.keys_clear,
        s.lock_waits + s.local_lock_waits + s.capture_lock_waits,
        s.deadlocks,
        s.causal_waivers,
        s.truncates,
        s.spooled_transactions,
        s.spool_start_overs,
        s.refused_hellos + s.refused_batches,
        s.crashes
            + s.machine_crashes
            + s.partitions
            + s.clogs
            + s.drops
            + s.clock_steps
            + s.rogue_clocks
            + s.capture_stalls,
        s.collection_rounds_completed,
        s.tombstones_collected,
        s.inserts_beaten_across_collection,
    );
    text + &join
}

/// Runs `accord sim`; `Ok(true)` when every seed passed.
pub fn run(args: &SimArgs, out: &mut dyn Write) -> Result<bool, SimError> {
    let configs = args.configs()?;
    if args.trace {
        for config in &configs {
            let (lines, failure) = trace_lines(config);
            for l in lines {
                writeln!(out, "{:016x} {}", l.hash, l.text)?;
            }
            if let Some(f) = failure {
                writeln!(out, "FAIL {f}")?;
            }
        }
        return Ok(true);
    }
    if args.check_determinism {
        let (mut passed, mut failed) = (0, 0);
        for config in &configs {
            match check_determinism(config) {
                Determinism::Same { events, hash } => {
                    passed += 1;
                    writeln!(
                        out,
                        "seed {}: deterministic, {events} events, hash={hash:016x}",
                        config.seed
                    )?;
                }
                Determinism::Differs { event, first, second } => {
                    failed += 1;
                    writeln!(
                        out,
                        "seed {}: NOT deterministic: runs differ at event {event}",
                        config.seed
                    )?;
                    writeln!(out, "  first run:  {first}")?;
                    writeln!(out, "  second run: {second}")?;
                    writeln!(out, "  replay: {} --check-determinism", config.command())?;
                }
            }
        }
        writeln!(out, "{passed} passed, {failed} failed")?;
        return Ok(failed == 0);
    }
    let jobs = args
        .jobs
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    let started = std::time::Instant::now();
    let mut io_error = None;
    let reports = run_many(&configs, jobs, |report| {
        let mut print = || -> std::io::Result<()> {
            writeln!(out, "{}", line(report))?;
            if let Some(f) = &report.failure {
                writeln!(out, "  {f}")?;
                writeln!(out, "  replay: {}", report.config.command())?;
            }
            Ok(())
        };
        if let Err(e) = print() {
            io_error.get_or_insert(e);
        }
    });
    if let Some(e) = io_error {
        return Err(e.into());
    }
    let elapsed = started.elapsed().as_secs_f64();
    let failed: Vec<&SeedReport> = reports.iter().filter(|r| !r.passed()).collect();
    if args.shrink {
        for report in &failed {
            let Some(failure) = &report.failure else { continue };
            writeln!(out, "shrinking seed {} ...", report.config.seed)?;
            let shrunk = shrink(&report.config, failure, 200);
            writeln!(
                out,
                "  smallest reproducer ({} runs tried): {}",
                shrunk.runs,
                shrunk.config.command()
            )?;
            writeln!(out, "  {}", shrunk.failure)?;
        }
    }
    let busy: f64 = reports.iter().map(|r| r.wall.as_secs_f64()).sum::<f64>().max(1e-9);
    let events: u64 = reports.iter().map(|r| r.stats.events).sum();
    let deliveries: u64 = reports.iter().map(|r| r.stats.deliveries).sum();
    let changes: u64 = reports.iter().map(|r| r.stats.changes_delivered).sum();
    writeln!(
        out,
        "speed: {:.0} events/s, {:.0} deliveries/s ({:.0} changes delivered/s) per core; {:.2} s wall on {} threads",
        events as f64 / busy,
        deliveries as f64 / busy,
        changes as f64 / busy,
        elapsed,
        jobs.min(reports.len().max(1)),
    )?;
    writeln!(out, "{} passed, {} failed", reports.len() - failed.len(), failed.len())?;
    Ok(failed.is_empty())
}
