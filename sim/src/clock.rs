//! Per-node wall clocks: an offset from true (simulated) time, a drift, and steps. A node's
//! PostgreSQL commit times and its physical HLC input come from here, never from the host.

/// One node's wall clock.
#[derive(Debug, Clone)]
pub struct SimClock {
    /// Offset in µs at `anchor` (true time).
    offset: i64,
    anchor: u64,
    drift_ppm: i64,
    /// While set, the clock is deliberately beyond the allowed offset and is not corrected.
    rogue: bool,
    /// Ordinary clocks are kept within ±band of true time, as NTP would (it steps them back).
    band: i64,
}

impl SimClock {
    pub fn new(now: u64, offset: i64, drift_ppm: i64, band: u64) -> Self {
        SimClock {
            offset,
            anchor: now,
            drift_ppm,
            rogue: false,
            band: band as i64,
        }
    }

    fn current_offset(&self, now: u64) -> i64 {
        let elapsed = now.saturating_sub(self.anchor) as i64;
        self.offset + elapsed / 1_000_000 * self.drift_ppm + (elapsed % 1_000_000) * self.drift_ppm / 1_000_000
    }

    /// The wall clock at true time `now`, in µs. A drifting ordinary clock that leaves its band
    /// is stepped back to its edge (what NTP does to a clock that ran away).
    pub fn read(&mut self, now: u64) -> u64 {
        let mut offset = self.current_offset(now);
        if !self.rogue && offset.abs() > self.band {
            offset = offset.clamp(-self.band, self.band);
            self.set(now, offset);
        }
        now.saturating_add_signed(offset)
    }

    /// Steps the clock to `offset` from true time (forward or back).
    pub fn set(&mut self, now: u64, offset: i64) {
        self.offset = offset;
        self.anchor = now;
    }

    pub fn set_drift(&mut self, now: u64, drift_ppm: i64) {
        let offset = self.current_offset(now);
        self.set(now, offset);
        self.drift_ppm = drift_ppm;
    }

    /// The clock jumps `offset` ahead of true time, beyond what peers accept.
    pub fn go_rogue(&mut self, now: u64, offset: i64) {
        self.rogue = true;
        self.set(now, offset);
    }

    /// Back to an ordinary clock at `offset` (the operator fixed NTP).
    pub fn heal(&mut self, now: u64, offset: i64) {
        self.rogue = false;
        self.set(now, offset.clamp(-self.band, self.band));
    }

    pub fn is_rogue(&self) -> bool {
        self.rogue
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drift_is_clamped_to_the_band_unless_rogue() {
        let mut c = SimClock::new(0, 0, 1_000, 500);
        assert_eq!(c.read(100_000), 100_100);
        assert_eq!(c.read(10_000_000), 10_000_500, "stepped back to the band");
        c.go_rogue(10_000_000, 5_000);
        assert_eq!(c.read(10_000_000), 10_005_000);
        c.heal(10_000_000, 9_999);
        assert_eq!(c.read(10_000_000), 10_000_500);
    }

    #[test]
    fn steps_can_go_backwards() {
        let mut c = SimClock::new(0, 400, 0, 500);
        let before = c.read(1_000);
        c.set(1_000, -400);
        assert!(c.read(1_001) < before);
    }
}
