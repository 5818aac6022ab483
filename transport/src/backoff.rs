//! Reconnect delays: exponential, capped, with jitter so that nodes that lost each other at the
//! same moment do not all retry in step.

use std::time::Duration;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BackoffConfig {
    /// The delay before the first retry (before jitter).
    pub initial: Duration,
    /// The delay never grows past this (before jitter).
    pub max: Duration,
}

impl Default for BackoffConfig {
    fn default() -> Self {
        BackoffConfig {
            initial: Duration::from_millis(100),
            max: Duration::from_secs(10),
        }
    }
}

/// The delays of one run of failed attempts; `reset` after a success.
#[derive(Debug, Clone)]
pub struct Backoff {
    config: BackoffConfig,
    attempt: u32,
}

impl Backoff {
    pub fn new(config: BackoffConfig) -> Self {
        Backoff { config, attempt: 0 }
    }

    pub fn reset(&mut self) {
        self.attempt = 0;
    }

    /// The next delay: `initial * 2^attempt` capped at `max`, then a random point in its upper
    /// half ("equal jitter": never less than half, so a retry storm stays spread out but the delay
    /// still grows).
    pub fn next_delay(&mut self) -> Duration {
        let base = self.base();
        self.attempt = self.attempt.saturating_add(1);
        let half = base / 2;
        let jitter_nanos = u64::try_from(half.as_nanos()).unwrap_or(u64::MAX);
        half + Duration::from_nanos(rand::random_range(0..=jitter_nanos))
    }

    fn base(&self) -> Duration {
        let factor = 1u32.checked_shl(self.attempt.min(31)).unwrap_or(u32::MAX);
        self.config.initial.saturating_mul(factor).min(self.config.max)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_grow_are_capped_and_jittered() {
        let config = BackoffConfig {
            initial: Duration::from_millis(100),
            max: Duration::from_secs(1),
        };
        let mut backoff = Backoff::new(config);
        let bases = [100, 200, 400, 800, 1000, 1000];
        for base in bases {
            let d = backoff.next_delay();
            let base = Duration::from_millis(base);
            assert!(d >= base / 2 && d <= base, "{d:?} for base {base:?}");
        }
        for _ in 0..100 {
            assert!(backoff.next_delay() <= config.max);
        }
        backoff.reset();
        assert!(backoff.next_delay() <= Duration::from_millis(100));
        let draws: std::collections::BTreeSet<_> = (0..20).map(|_| Backoff::new(config).next_delay()).collect();
        assert!(draws.len() > 1, "jitter varies");
    }
}
