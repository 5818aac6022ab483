//! The simulator's only source of randomness: xoshiro256** seeded through SplitMix64.
//!
//! Hand-written rather than taken from `rand`: a run must replay byte for byte from its seed for
//! as long as the project lives, and `rand`'s distributions have changed their algorithms between
//! versions. Every draw also feeds a rolling hash, so the determinism check covers the draws.
//!
//! Floating point is limited to `+ - * /` and comparisons (exactly rounded in IEEE 754 on every
//! platform); logarithms are computed here instead of through the platform's libm.

use crate::trace::mix;

/// One stream of pseudo-random numbers. Each concern of a run (workload, network, faults, ...)
/// has its own stream derived from the seed, so shrinking one concern disturbs the others less.
#[derive(Debug, Clone)]
pub struct SimRng {
    s: [u64; 4],
    hash: u64,
}

/// SplitMix64, used to expand a seed into generator states.
pub fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

impl SimRng {
    /// The generator of `stream` for `seed`.
    pub fn new(seed: u64, stream: u64) -> Self {
        let mut state = seed ^ stream.wrapping_mul(0xD1B5_4A32_D192_ED03);
        let mut s = [0u64; 4];
        for slot in &mut s {
            *slot = splitmix64(&mut state);
        }
        if s == [0; 4] {
            // xoshiro's one forbidden state; SplitMix64 cannot produce it, but stay safe.
            s[0] = 1;
        }
        SimRng { s, hash: stream }
    }

    /// The rolling hash of every draw so far.
    pub fn hash(&self) -> u64 {
        self.hash
    }

    pub fn next_u64(&mut self) -> u64 {
        let result = self.s[1].wrapping_mul(5).rotate_left(7).wrapping_mul(9);
        let t = self.s[1] << 17;
        self.s[2] ^= self.s[0];
        self.s[3] ^= self.s[1];
        self.s[1] ^= self.s[2];
        self.s[0] ^= self.s[3];
        self.s[2] ^= t;
        self.s[3] = self.s[3].rotate_left(45);
        self.hash = mix(self.hash, result);
        result
    }

    /// Uniform in `0..n` (0 when `n` is 0). Lemire's multiply-shift; the bias of at most n/2^64
    /// does not matter for a simulation.
    pub fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            return 0;
        }
        ((u128::from(self.next_u64()) * u128::from(n)) >> 64) as u64
    }

    /// Uniform in `lo..=hi`.
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        if hi <= lo {
            return lo;
        }
        lo + self.below(hi - lo + 1)
    }

    pub fn index(&mut self, len: usize) -> usize {
        self.below(len as u64) as usize
    }

    /// Uniform in `[0, 1)`.
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    pub fn chance(&mut self, p: f64) -> bool {
        p > 0.0 && self.unit() < p
    }

    /// Exponentially distributed with the given mean, rounded to whole units.
    pub fn exp(&mut self, mean: f64) -> u64 {
        let u = 1.0 - self.unit(); // in (0, 1]
        let x = -ln(u) * mean;
        if x.is_finite() && x > 0.0 {
            x.min(1e15) as u64
        } else {
            0
        }
    }

    /// An index drawn with the given weights; 0 when all are zero.
    pub fn weighted(&mut self, weights: &[u32]) -> usize {
        let total: u64 = weights.iter().map(|&w| u64::from(w)).sum();
        let mut pick = self.below(total);
        for (i, &w) in weights.iter().enumerate() {
            if pick < u64::from(w) {
                return i;
            }
            pick -= u64::from(w);
        }
        0
    }
}

/// Natural logarithm from basic operations only, so it gives the same bits on every platform.
/// `x = m * 2^e` with `m` in [1, 2); `ln m = 2 atanh((m-1)/(m+1))` by its series.
pub fn ln(x: f64) -> f64 {
    if x <= 0.0 || !x.is_finite() {
        return f64::NEG_INFINITY;
    }
    let bits = x.to_bits();
    let mut exponent = ((bits >> 52) & 0x7ff) as i64 - 1023;
    let mut mantissa = f64::from_bits((bits & ((1u64 << 52) - 1)) | (1023u64 << 52));
    if exponent == -1023 {
        // Subnormal: normalise by scaling, which is exact.
        let scaled = x * (1u64 << 54) as f64;
        let b = scaled.to_bits();
        exponent = ((b >> 52) & 0x7ff) as i64 - 1023 - 54;
        mantissa = f64::from_bits((b & ((1u64 << 52) - 1)) | (1023u64 << 52));
    }
    if mantissa > std::f64::consts::SQRT_2 {
        mantissa /= 2.0;
        exponent += 1;
    }
    let y = (mantissa - 1.0) / (mantissa + 1.0);
    let y2 = y * y;
    let mut term = y;
    let mut sum = 0.0;
    let mut k = 1.0;
    while k < 40.0 {
        sum += term / k;
        term *= y2;
        k += 2.0;
    }
    2.0 * sum + exponent as f64 * std::f64::consts::LN_2
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn streams_are_reproducible_and_distinct() {
        let mut a = SimRng::new(7, 1);
        let mut b = SimRng::new(7, 1);
        let mut c = SimRng::new(7, 2);
        let xs: Vec<u64> = (0..8).map(|_| a.next_u64()).collect();
        let ys: Vec<u64> = (0..8).map(|_| b.next_u64()).collect();
        let zs: Vec<u64> = (0..8).map(|_| c.next_u64()).collect();
        assert_eq!(xs, ys);
        assert_ne!(xs, zs);
        assert_eq!(a.hash(), b.hash());
    }

    #[test]
    fn ln_matches_the_platform_closely() {
        for x in [1e-300, 1e-10, 0.1, 0.5, 0.999, 1.0, 1.5, 2.0, 10.0, 12345.678] {
            assert!((ln(x) - x.ln()).abs() < 1e-12 * x.ln().abs().max(1.0), "{x}");
        }
    }

    #[test]
    fn bounded_draws_stay_in_bounds() {
        let mut r = SimRng::new(1, 1);
        for _ in 0..1000 {
            assert!(r.below(5) < 5);
            let v = r.range(3, 4);
            assert!((3..=4).contains(&v));
            assert!(r.unit() < 1.0);
        }
        assert_eq!(r.weighted(&[0, 0, 3]), 2);
    }
}
