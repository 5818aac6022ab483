//! Running seeds: one at a time, many in parallel over the machine's cores (each run is
//! independent and single-threaded, so parallelism cannot change a run), and twice with recorded
//! traces to check determinism.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::config::SimConfig;
use crate::outcome::{Failure, Stats};
use crate::trace::TraceLine;
use crate::world::World;

/// The outcome of one seed.
#[derive(Debug, Clone)]
pub struct SeedReport {
    pub config: SimConfig,
    pub hash: u64,
    pub stats: Stats,
    pub failure: Option<Failure>,
    /// Host time the run took (measured outside the simulation; it never reads it).
    pub wall: Duration,
}

impl SeedReport {
    pub fn passed(&self) -> bool {
        self.failure.is_none()
    }
}

pub fn run_seed(config: &SimConfig) -> SeedReport {
    let started = Instant::now();
    let result = World::new(config, false).run();
    SeedReport {
        config: config.clone(),
        hash: result.hash,
        stats: result.stats,
        failure: result.failure,
        wall: started.elapsed(),
    }
}

/// Runs every configuration on up to `jobs` threads; reports come back in input order.
pub fn run_many(configs: &[SimConfig], jobs: usize, mut done: impl FnMut(&SeedReport)) -> Vec<SeedReport> {
    let jobs = jobs.clamp(1, configs.len().max(1));
    let next = AtomicUsize::new(0);
    let slots: Mutex<Vec<Option<SeedReport>>> = Mutex::new(vec![None; configs.len()]);
    let mut reports = Vec::with_capacity(configs.len());
    std::thread::scope(|scope| {
        let (tx, rx) = std::sync::mpsc::channel::<usize>();
        for _ in 0..jobs {
            let tx = tx.clone();
            let (next, slots) = (&next, &slots);
            scope.spawn(move || loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(config) = configs.get(i) else { break };
                let report = run_seed(config);
                // A poisoned lock means another worker panicked; the scope re-raises that panic.
                if let Ok(mut slots) = slots.lock() {
                    slots[i] = Some(report);
                }
                if tx.send(i).is_err() {
                    break;
                }
            });
        }
        drop(tx);
        // Print in seed order as soon as the next one in order is ready.
        let mut printed = 0;
        for _ in rx.iter() {
            loop {
                let ready = slots
                    .lock()
                    .ok()
                    .and_then(|mut s| s.get_mut(printed).and_then(Option::take));
                let Some(report) = ready else { break };
                done(&report);
                reports.push(report);
                printed += 1;
            }
        }
    });
    reports
}

/// Where two runs of one seed first differ.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Determinism {
    Same {
        events: usize,
        hash: u64,
    },
    Differs {
        event: usize,
        first: String,
        second: String,
    },
}

pub fn check_determinism(config: &SimConfig) -> Determinism {
    let a = World::new(config, true).run();
    let b = World::new(config, true).run();
    first_difference(&a.lines, &b.lines, a.hash, b.hash)
}

fn first_difference(a: &[TraceLine], b: &[TraceLine], hash_a: u64, hash_b: u64) -> Determinism {
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        if x != y {
            return Determinism::Differs {
                event: i,
                first: format!("{} (hash {:016x})", x.text, x.hash),
                second: format!("{} (hash {:016x})", y.text, y.hash),
            };
        }
    }
    if a.len() != b.len() || hash_a != hash_b {
        let i = a.len().min(b.len());
        let line = |l: &[TraceLine]| l.get(i).map_or("(end of run)".to_owned(), |x| x.text.clone());
        return Determinism::Differs {
            event: i,
            first: line(a),
            second: line(b),
        };
    }
    Determinism::Same {
        events: a.len(),
        hash: hash_a,
    }
}

/// The event trace of one run, for `--trace`.
pub fn trace_lines(config: &SimConfig) -> (Vec<TraceLine>, Option<Failure>) {
    let result = World::new(config, true).run();
    (result.lines, result.failure)
}
