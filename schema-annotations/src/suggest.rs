//! "Did you mean ...?" for words that are close to an allowed one.

/// The allowed word closest to `word`, if it is close enough to be what the user meant: a typo or
/// two (a swap of neighbouring letters counts as one), or a prefix of three letters or more.
pub(crate) fn closest(word: &str, allowed: &[&'static str]) -> Option<&'static str> {
    let word = word.to_ascii_lowercase();
    let mut best: Option<(usize, &'static str)> = None;
    for &candidate in allowed {
        // The length difference bounds the distance from below; skipping far-off lengths also keeps
        // the quadratic distance computation off huge inputs.
        if word.len() > candidate.len() + 2 {
            continue;
        }
        let distance = if word.len() >= 3 && candidate.starts_with(&word) {
            1
        } else {
            strsim::damerau_levenshtein(&word, candidate)
        };
        let limit = if candidate.len() <= 3 { 1 } else { 2 };
        let better = match best {
            Some((d, _)) => distance < d,
            None => true,
        };
        if distance <= limit && better {
            best = Some((distance, candidate));
        }
    }
    best.map(|(_, candidate)| candidate)
}

/// The " (did you mean `x`?)" tail of an error message, or nothing.
pub(crate) fn did_you_mean(suggestion: &Option<&'static str>) -> String {
    match suggestion {
        Some(word) => format!(" (did you mean `{word}`?)"),
        None => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const POLICIES: &[&str] = &["lww", "delta", "review"];

    #[test]
    fn typos_and_prefixes_find_the_word() {
        assert_eq!(closest("detla", POLICIES), Some("delta"));
        assert_eq!(closest("DELTS", POLICIES), Some("delta"));
        assert_eq!(closest("reveiw", POLICIES), Some("review"));
        assert_eq!(closest("lw", POLICIES), Some("lww"));
        assert_eq!(closest("rev", POLICIES), Some("review"));
        assert_eq!(closest("replicte", &["replicate"]), Some("replicate"));
    }

    #[test]
    fn unrelated_words_get_no_suggestion() {
        assert_eq!(closest("counter", POLICIES), None);
        assert_eq!(closest("x", POLICIES), None);
        assert_eq!(closest("", POLICIES), None);
        assert_eq!(closest(&"d".repeat(10_000), POLICIES), None);
    }
}
