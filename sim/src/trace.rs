//! The determinism self-check: a rolling hash over everything a run does (events, deliveries,
//! timers, random draws, merge decisions). Two runs of one seed must end with the same hash; when
//! asked, the trace also keeps one line per event so a difference can be located.

/// Folds `value` into the rolling hash `h`. Not cryptographic: it only has to make an accidental
/// difference between two runs visible.
pub fn mix(h: u64, value: u64) -> u64 {
    let mut x = (h ^ value.wrapping_mul(0x9E37_79B9_7F4A_7C15)).rotate_left(23);
    x = (x ^ (x >> 31)).wrapping_mul(0xD6E8_FEB8_6659_FD93);
    x ^ (x >> 29)
}

/// One recorded event: the hash after it, and what it was.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TraceLine {
    pub hash: u64,
    pub text: String,
}

#[derive(Debug, Clone, Default)]
pub struct Trace {
    hash: u64,
    /// Present when the run records its events (determinism check, `--trace`).
    lines: Option<Vec<TraceLine>>,
}

impl Trace {
    pub fn new(record: bool) -> Self {
        Trace {
            hash: 0x6163_636f_7264, // "accord"
            lines: record.then(Vec::new),
        }
    }

    pub fn hash(&self) -> u64 {
        self.hash
    }

    pub fn add(&mut self, value: u64) {
        self.hash = mix(self.hash, value);
    }

    pub fn is_recording(&self) -> bool {
        self.lines.is_some()
    }

    /// Ends an event: with recording on, keeps its description (built only then).
    pub fn line(&mut self, text: impl FnOnce() -> String) {
        let hash = self.hash;
        if let Some(lines) = &mut self.lines {
            lines.push(TraceLine { hash, text: text() });
        }
    }

    pub fn into_lines(self) -> Vec<TraceLine> {
        self.lines.unwrap_or_default()
    }
}
