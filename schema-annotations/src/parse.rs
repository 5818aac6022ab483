//! Finding and reading the one `@accord` tag of a comment (syntax in the crate docs).

use accord_engine::{ColumnPolicy, InsertPolicy};
use thiserror::Error;

use crate::place::Place;
use crate::suggest::{closest, did_you_mean};

const MARKER: &str = "@accord";
const TABLE_WORDS: &[&str] = &["replicate"];
/// The keywords of `ColumnPolicy::ALL`, as a constant for suggestions (a test keeps them equal).
const POLICY_WORDS: &[&str] = &["lww", "delta", "review"];
const TABLE_LIST: &str = "replicate";
const POLICY_LIST: &str = "lww, delta, review";
const OPTION_KEYS: &[&str] = &["default", "inserts", "sequences"];
/// `delta` is left out on purpose: it changes what a write means (an addition, not a value), so it
/// has to be chosen column by column, and a table default would also hit its text columns.
const DEFAULT_VALUES: &[&str] = &["lww", "review"];

/// What a table's tag says; having one means the table is replicated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TableTag {
    /// The policy of the columns that have no tag of their own (`default=`, else `lww`).
    pub default_policy: ColumnPolicy,
    /// `sequences=disjoint`: the user made the sequences behind the table's keys disjoint across
    /// nodes, so `accord check` does not flag them.
    pub sequences_disjoint: bool,
    /// `inserts=merge|review`: what two concurrent inserts of one key mean (default `merge`).
    pub inserts: InsertPolicy,
}

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum AnnotationError {
    #[error("{place}: `@accord` has no word after it; allowed: {allowed}")]
    MissingWord { place: Place, allowed: &'static str },
    #[error("{place}: unknown word `{word}` after @accord; allowed: {allowed}{}", did_you_mean(.suggestion))]
    UnknownWord {
        place: Place,
        word: String,
        allowed: &'static str,
        suggestion: Option<&'static str>,
    },
    #[error(
        "{place}: `{word}` is a column policy and goes in a column's comment; a table's tag is \
         `@accord replicate` (with options such as default=review)"
    )]
    PolicyOnTable { place: Place, word: String },
    #[error(
        "{place}: `{word}` goes in the table's comment; a column's tag takes one of {}",
        POLICY_WORDS.join(", ")
    )]
    ReplicateOnColumn { place: Place, word: String },
    #[error("{place}: the comment holds more than one @accord tag; write one")]
    SeveralTags { place: Place },
    #[error("{place}: unknown option `{key}`; allowed: {}{}", OPTION_KEYS.join(", "), did_you_mean(.suggestion))]
    UnknownOption {
        place: Place,
        key: String,
        suggestion: Option<&'static str>,
    },
    #[error("{place}: option `{key}` is given twice")]
    RepeatedOption { place: Place, key: String },
    #[error(
        "{place}: option {key}=`{value}`: allowed values are {}{}{}",
        DEFAULT_VALUES.join(", "),
        did_you_mean(.suggestion),
        delta_default_note(.value)
    )]
    BadOptionValue {
        place: Place,
        key: String,
        value: String,
        suggestion: Option<&'static str>,
    },
    #[error("{place}: `{text}` is not a valid option; write options as key=value without spaces, e.g. default=review")]
    MalformedOption { place: Place, text: String },
    #[error(
        "{place}: column tags take no options (`{text}`); options such as default=review go after \
         `@accord replicate` in the table's comment"
    )]
    OptionOnColumn { place: Place, text: String },
    #[error(
        "{place}: `sequences={value}` is not a valid value; the one value is `sequences=disjoint`, saying the \
         sequences behind this table's keys give each node ids no other node gives"
    )]
    BadSequencesValue { place: Place, value: String },
    #[error(
        "{place}: `inserts={value}` is not a valid value; `inserts=merge` (two inserts of one key are one row, \
         merged column by column: natural keys) or `inserts=review` (the earlier insert keeps the row, the other \
         goes to the review queue whole: generated keys)"
    )]
    BadInsertsValue { place: Place, value: String },
}

impl AnnotationError {
    pub fn place(&self) -> &Place {
        match self {
            AnnotationError::MissingWord { place, .. }
            | AnnotationError::UnknownWord { place, .. }
            | AnnotationError::PolicyOnTable { place, .. }
            | AnnotationError::ReplicateOnColumn { place, .. }
            | AnnotationError::SeveralTags { place }
            | AnnotationError::UnknownOption { place, .. }
            | AnnotationError::RepeatedOption { place, .. }
            | AnnotationError::BadOptionValue { place, .. }
            | AnnotationError::MalformedOption { place, .. }
            | AnnotationError::OptionOnColumn { place, .. }
            | AnnotationError::BadSequencesValue { place, .. }
            | AnnotationError::BadInsertsValue { place, .. } => place,
        }
    }

    /// A stable name of the kind of mistake, for machines (`accord check --format json`).
    pub fn code(&self) -> &'static str {
        match self {
            AnnotationError::MissingWord { .. } => "missing-word",
            AnnotationError::UnknownWord { .. } => "unknown-word",
            AnnotationError::PolicyOnTable { .. } => "policy-on-table",
            AnnotationError::ReplicateOnColumn { .. } => "replicate-on-column",
            AnnotationError::SeveralTags { .. } => "several-tags",
            AnnotationError::UnknownOption { .. } => "unknown-option",
            AnnotationError::RepeatedOption { .. } => "repeated-option",
            AnnotationError::BadOptionValue { .. } => "bad-option-value",
            AnnotationError::MalformedOption { .. } => "malformed-option",
            AnnotationError::OptionOnColumn { .. } => "option-on-column",
            AnnotationError::BadSequencesValue { .. } => "bad-sequences-value",
            AnnotationError::BadInsertsValue { .. } => "bad-inserts-value",
        }
    }
}

/// The tag of a table's comment: `Ok(None)` when it has none (the table is not replicated).
pub fn parse_table_comment(table: &str, comment: &str) -> Result<Option<TableTag>, AnnotationError> {
    let place = Place::Table {
        table: table.to_string(),
    };
    let Some(tag) = raw_tag(comment, &place, TABLE_LIST)? else {
        return Ok(None);
    };
    let directive = tag.directive.to_ascii_lowercase();
    if directive != "replicate" {
        if POLICY_WORDS.contains(&directive.as_str()) {
            return Err(AnnotationError::PolicyOnTable {
                place,
                word: tag.directive.to_string(),
            });
        }
        return Err(AnnotationError::UnknownWord {
            suggestion: closest(&directive, TABLE_WORDS),
            place,
            word: tag.directive.to_string(),
            allowed: TABLE_LIST,
        });
    }
    let mut default_policy = None;
    let mut sequences_disjoint = None;
    let mut inserts = None;
    for option in tag.options {
        let Some((key, value)) = option.split_once('=').filter(|(k, v)| !k.is_empty() && !v.is_empty()) else {
            return Err(AnnotationError::MalformedOption {
                place,
                text: option.to_string(),
            });
        };
        match key.to_ascii_lowercase().as_str() {
            "default" => {
                if default_policy.is_some() {
                    return Err(AnnotationError::RepeatedOption {
                        place,
                        key: key.to_string(),
                    });
                }
                default_policy = Some(default_value(&place, key, value)?);
            }
            "sequences" => {
                if sequences_disjoint.is_some() {
                    return Err(AnnotationError::RepeatedOption {
                        place,
                        key: key.to_string(),
                    });
                }
                if !value.eq_ignore_ascii_case("disjoint") {
                    return Err(AnnotationError::BadSequencesValue {
                        place,
                        value: value.to_string(),
                    });
                }
                sequences_disjoint = Some(true);
            }
            "inserts" => {
                if inserts.is_some() {
                    return Err(AnnotationError::RepeatedOption {
                        place,
                        key: key.to_string(),
                    });
                }
                inserts = Some(match value.to_ascii_lowercase().as_str() {
                    "merge" => InsertPolicy::Merge,
                    "review" => InsertPolicy::Review,
                    _ => {
                        return Err(AnnotationError::BadInsertsValue {
                            place,
                            value: value.to_string(),
                        })
                    }
                });
            }
            other => {
                return Err(AnnotationError::UnknownOption {
                    suggestion: closest(other, OPTION_KEYS),
                    place,
                    key: key.to_string(),
                })
            }
        }
    }
    Ok(Some(TableTag {
        default_policy: default_policy.unwrap_or_default(),
        sequences_disjoint: sequences_disjoint.unwrap_or(false),
        inserts: inserts.unwrap_or_default(),
    }))
}

fn default_value(place: &Place, key: &str, value: &str) -> Result<ColumnPolicy, AnnotationError> {
    let lower = value.to_ascii_lowercase();
    match policy_from_word(&lower) {
        Some(policy) if DEFAULT_VALUES.contains(&policy.keyword()) => Ok(policy),
        found => Err(AnnotationError::BadOptionValue {
            place: place.clone(),
            key: key.to_string(),
            value: value.to_string(),
            suggestion: if found.is_some() {
                None
            } else {
                closest(&lower, DEFAULT_VALUES)
            },
        }),
    }
}

/// The policy a column's comment asks for: `Ok(None)` when it has no tag.
pub fn parse_column_comment(table: &str, column: &str, comment: &str) -> Result<Option<ColumnPolicy>, AnnotationError> {
    let place = Place::Column {
        table: table.to_string(),
        column: column.to_string(),
    };
    let Some(tag) = raw_tag(comment, &place, POLICY_LIST)? else {
        return Ok(None);
    };
    let directive = tag.directive.to_ascii_lowercase();
    let Some(policy) = policy_from_word(&directive) else {
        if TABLE_WORDS.contains(&directive.as_str()) {
            return Err(AnnotationError::ReplicateOnColumn {
                place,
                word: tag.directive.to_string(),
            });
        }
        return Err(AnnotationError::UnknownWord {
            suggestion: closest(&directive, POLICY_WORDS),
            place,
            word: tag.directive.to_string(),
            allowed: POLICY_LIST,
        });
    };
    if let Some(option) = tag.options.first() {
        return Err(AnnotationError::OptionOnColumn {
            place,
            text: option.to_string(),
        });
    }
    Ok(Some(policy))
}

fn delta_default_note(value: &str) -> &'static str {
    if value.eq_ignore_ascii_case("delta") {
        "; `delta` makes every write an addition, so it is chosen column by column with `@accord delta`"
    } else {
        ""
    }
}

fn policy_from_word(word: &str) -> Option<ColumnPolicy> {
    ColumnPolicy::ALL.into_iter().find(|p| p.keyword() == word)
}

/// The words of a tag, before they are given a meaning.
struct RawTag<'a> {
    directive: &'a str,
    options: Vec<&'a str>,
}

/// The tag's words; `allowed` lists the directives, for the error when there is none.
fn raw_tag<'a>(comment: &'a str, place: &Place, allowed: &'static str) -> Result<Option<RawTag<'a>>, AnnotationError> {
    let mut markers = markers(comment);
    let Some(end) = markers.next() else {
        return Ok(None);
    };
    if markers.next().is_some() {
        return Err(AnnotationError::SeveralTags { place: place.clone() });
    }
    let mut words = comment[end..].split_whitespace().map(strip_punctuation).peekable();
    let directive = match words.next() {
        Some(word) if !word.is_empty() => word,
        _ => {
            return Err(AnnotationError::MissingWord {
                place: place.clone(),
                allowed,
            })
        }
    };
    let mut options = Vec::new();
    while let Some(word) = words.next() {
        if word.contains('=') {
            options.push(word);
            continue;
        }
        // `default = review` would otherwise end the tag and silently drop the option.
        let spaced_option =
            words.peek().is_some_and(|next| next.starts_with('=')) && closest(word, OPTION_KEYS).is_some();
        if spaced_option {
            return Err(AnnotationError::MalformedOption {
                place: place.clone(),
                text: format!("{word} {}", words.peek().copied().unwrap_or_default()),
            });
        }
        break;
    }
    Ok(Some(RawTag { directive, options }))
}

/// The byte offsets just past each `@accord` that stands as a word of its own.
fn markers(comment: &str) -> impl Iterator<Item = usize> + '_ {
    let lower = comment.to_ascii_lowercase();
    let starts: Vec<usize> = lower.match_indices(MARKER).map(|(start, _)| start).collect();
    starts.into_iter().filter_map(move |start| {
        let end = start + MARKER.len();
        let bytes = comment.as_bytes();
        let starts_word = start == 0 || !is_word_byte(bytes[start - 1]);
        let ends_word = end == bytes.len() || bytes[end].is_ascii_whitespace();
        (starts_word && ends_word).then_some(end)
    })
}

fn is_word_byte(byte: u8) -> bool {
    byte.is_ascii_alphanumeric() || byte == b'_' || byte == b'.' || byte == b'-'
}

fn strip_punctuation(word: &str) -> &str {
    word.trim_end_matches(['.', ',', ';', ':', '!', '?', ')'])
}

/// An `@...` that looks like an attempt at a tag but is not one (`@acord delta`, `@accord:delta`),
/// as written. Such text is ignored as the user's, which is rarely what they meant.
pub fn misspelled_marker(comment: &str) -> Option<String> {
    let proper: Vec<usize> = markers(comment).map(|end| end - MARKER.len()).collect();
    comment.match_indices('@').find_map(|(at, _)| {
        if proper.contains(&at) {
            return None;
        }
        let rest = &comment[at + 1..];
        let name_len = rest.find(|c: char| !c.is_ascii_alphabetic()).unwrap_or(rest.len());
        let name = rest[..name_len].to_ascii_lowercase();
        let near = name == "accord" || (name.len() >= 4 && strsim::damerau_levenshtein(&name, "accord") <= 2);
        let attached = at > 0 && is_word_byte(comment.as_bytes()[at - 1]);
        (near && !attached).then(|| {
            let written_len = rest.find(char::is_whitespace).unwrap_or(rest.len()).min(40);
            let end = (at + 1..=at + 1 + written_len)
                .rev()
                .find(|&i| comment.is_char_boundary(i))
                .unwrap_or(at + 1);
            comment[at..end].to_string()
        })
    })
}

#[cfg(test)]
mod tests;
