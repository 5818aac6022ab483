//! Swarm testing: each seed draws its own regime (fault rates, workload mix, timings), so a range
//! of seeds explores many regimes instead of one average one. A fault kind switched off in the
//! configuration gets a rate of zero; the other draws stay the same, which keeps shrinking stable.

use crate::config::{FaultKind, SimConfig};
use crate::rng::SimRng;

/// Workload operation kinds, in the order of `Params::mix`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpKind {
    /// `stock = stock + d` on a hot counter.
    Counter,
    /// A new name (lww).
    Name,
    /// A new price (review).
    Price,
    /// An insert; of a key alive here, it becomes an update.
    Insert,
    Delete,
    /// A reviewer resolves an open item of the row (or, with none open, writes a price).
    Resolve,
    /// Several columns at once.
    Mixed,
    /// An update that sets every column to its value: no write to replicate, but a new row
    /// version.
    Touch,
    /// An update of the key (decoding delivers a delete of the old key and an insert of the new).
    Rekey,
    /// TRUNCATE: decoding delivers only the table's name.
    Truncate,
}

pub const OP_KINDS: [OpKind; 10] = [
    OpKind::Counter,
    OpKind::Name,
    OpKind::Price,
    OpKind::Insert,
    OpKind::Delete,
    OpKind::Resolve,
    OpKind::Mixed,
    OpKind::Touch,
    OpKind::Rekey,
    OpKind::Truncate,
];

/// The regime of one run.
#[derive(Debug, Clone)]
pub struct Params {
    // Workload.
    pub keys: u64,
    pub hot_keys: u64,
    pub hot_p: f64,
    /// Mean µs between two local transactions anywhere in the cluster.
    pub op_gap_mean: f64,
    pub mix: [u32; 10],
    pub two_row_p: f64,
    pub toast_p: f64,
    /// The chance that a row is written inside a subtransaction.
    pub subtransaction_p: f64,
    // Engine configuration.
    pub max_batch: usize,
    pub window: u64,
    pub max_offset: u64,
    // Node timing (µs).
    pub capture_lag_max: u64,
    pub capture_batch: usize,
    pub apply_delay_max: u64,
    /// The longest round trip of an applier to its database; other appliers, the capture and
    /// local writers run meanwhile, held off the rows it locked (0: none).
    pub round_trip_max: u64,
    /// The longest a local writer or the capture waits before it tries again a lock an applier
    /// holds.
    pub lock_retry_max: u64,
    // Network (µs).
    pub latency_base: u64,
    pub latency_jitter: u64,
    pub latency_tail_p: f64,
    pub latency_tail: u64,
    pub drop_p: f64,
    pub ghost_p: f64,
    pub conn_timeout: u64,
    pub handshake_timeout: u64,
    pub backoff_min: u64,
    pub backoff_max: u64,
    // Clocks: the band that ordinary clocks stay in around true time, and drift.
    pub clock_band: u64,
    pub drift_ppm: i64,
    // Faults: mean µs between two faults, and the weight of each kind.
    pub fault_gap_mean: f64,
    pub fault_weights: [u32; 10],
    pub fault_duration_max: u64,
    /// Tombstone collection: µs between two rounds the coordinator starts (while it holds
    /// tombstones).
    pub round_every: u64,
    /// How long a transaction waits for a node that is away when it builds on its changes.
    pub causal_wait: u64,
    /// A receiver spools a transaction still arriving once more than this is queued of it
    /// (estimated bytes; `None`: never), and applies a spooled one in segments of this many
    /// changes.
    pub spool_bound: Option<usize>,
    pub segment_len: usize,
}

impl Params {
    pub fn draw(cfg: &SimConfig, rng: &mut SimRng) -> Params {
        let max_offset = cfg
            .max_offset_micros
            .unwrap_or_else(|| *pick(rng, &[500_000u64, 500_000, 100_000, 20_000, 5_000]));
        let keys = *pick(rng, &[1u64, 2, 3, 5, 8, 16, 40]);
        let hot_keys = rng.range(1, keys);
        let mut mix = [0u32; 10];
        for w in &mut mix[..7] {
            *w = *pick(rng, &[0u32, 1, 3, 6, 10]);
        }
        mix[0] = mix[0].max(2); // counters are always part of the workload: invariant 2 needs them
        mix[3] = mix[3].max(1); // so are inserts, or no row would ever exist
        let latency_base = *pick(rng, &[20u64, 200, 1_000, 5_000, 30_000]);
        let op_gap_mean = *pick(rng, &[10.0f64, 50.0, 300.0, 2_000.0, 20_000.0]);
        let f = |kind: FaultKind, w: u32| if cfg.faults.has(kind) { w } else { 0 };
        let mut fault_weights = [0u32; 10];
        for (i, kind) in FaultKind::ALL.iter().enumerate() {
            let w = *pick(rng, &[0u32, 1, 2, 4]);
            fault_weights[i] = f(*kind, w);
        }
        // Toast is a property of the workload, not an injected event.
        fault_weights[FaultKind::Toast as usize] = 0;
        // Always draw, then mask: a switched-off kind must not shift the draws after it.
        let masked = |kind: FaultKind, p: f64| if cfg.faults.has(kind) { p } else { 0.0 };
        let toast_p = masked(FaultKind::Toast, *pick(rng, &[0.0, 0.3, 0.9]));
        let drop_p = masked(FaultKind::Drop, *pick(rng, &[0.0, 0.001, 0.01, 0.05]));
        let ghost_p = masked(FaultKind::Ghost, *pick(rng, &[0.0, 0.2, 0.7]));
        let clock_band = max_offset * 2 / 5;
        // Drawn after the older ones, so that adding them kept every seed's earlier regime.
        let late = |rng: &mut SimRng| *pick(rng, &[0u32, 0, 1, 3]);
        let mut params = Params {
            keys,
            hot_keys,
            hot_p: *pick(rng, &[0.0, 0.5, 0.9]),
            op_gap_mean,
            mix,
            two_row_p: *pick(rng, &[0.0, 0.1, 0.3]),
            toast_p,
            subtransaction_p: 0.0,
            max_batch: *pick(rng, &[1usize, 4, 32, 500]),
            window: *pick(rng, &[1u64, 8, 64, 10_000]),
            max_offset,
            capture_lag_max: *pick(rng, &[10u64, 500, 5_000, 50_000]),
            capture_batch: *pick(rng, &[1usize, 8, 256]),
            apply_delay_max: *pick(rng, &[0u64, 200, 3_000]),
            round_trip_max: 0,
            lock_retry_max: 0,
            latency_base,
            latency_jitter: latency_base * *pick(rng, &[0u64, 1, 4]),
            latency_tail_p: *pick(rng, &[0.0, 0.01, 0.1]),
            latency_tail: latency_base * 50 + 1_000,
            drop_p,
            ghost_p,
            conn_timeout: *pick(rng, &[200_000u64, 2_000_000]),
            handshake_timeout: 300_000,
            backoff_min: 1_000,
            backoff_max: *pick(rng, &[50_000u64, 500_000]),
            clock_band,
            drift_ppm: *pick(rng, &[0i64, 20, 200]),
            fault_gap_mean: op_gap_mean * *pick(rng, &[20.0f64, 200.0, 2_000.0]),
            fault_weights,
            fault_duration_max: *pick(rng, &[20_000u64, 300_000, 2_000_000]),
            round_every: *pick(rng, &[20_000u64, 200_000, 2_000_000]),
            causal_wait: 0,
            spool_bound: None,
            segment_len: 1,
        };
        params.mix[7] = late(rng);
        params.mix[8] = late(rng);
        params.subtransaction_p = *pick(rng, &[0.0, 0.0, 0.1, 0.5]);
        params.round_trip_max = *pick(rng, &[0u64, 50, 300, 3_000]);
        params.lock_retry_max = *pick(rng, &[10u64, 200, 2_000]);
        params.causal_wait = *pick(rng, &[0u64, 50_000, 1_000_000, 10_000_000]);
        // Rare, and in a quarter of the regimes: each empties the node's table.
        params.mix[9] = *pick(rng, &[0u32, 0, 0, 1]);
        // Half the regimes spool: from the first change of a transaction still arriving (1
        // byte), or a few changes in.
        params.spool_bound = *pick(rng, &[None, None, Some(1usize), Some(2_000)]);
        params.segment_len = *pick(rng, &[1usize, 2, 3]);
        params
    }

    pub fn faults_enabled(&self) -> bool {
        self.fault_weights.iter().any(|&w| w > 0)
    }
}

fn pick<'a, T>(rng: &mut SimRng, options: &'a [T]) -> &'a T {
    &options[rng.index(options.len())]
}
