//! The `@accord` tags users write in PostgreSQL comments, and what accord makes of them.
//!
//! ```sql
//! COMMENT ON TABLE  shop.products       IS 'Catalogue. @accord replicate default=review';
//! COMMENT ON COLUMN shop.products.stock IS '@accord delta';
//! ```
//!
//! The layers, each usable without the ones after it:
//! - [`parse`]: one comment's tag, with errors that name the place, quote the word and say what is
//!   allowed. Pure text; no PostgreSQL.
//! - [`catalog`] + [`check()`]: a database's tables, columns, keys and comments (as read from the
//!   catalog) turned into a [`SchemaPolicy`] and the [`Problem`]s that kept parts of it out.
//! - [`SchemaPolicy::fingerprint`]: the digest peers compare before exchanging changes.
//! - `pg` (feature `pg`): reading the catalog of a live database with tokio-postgres.
//!
//! # Tag syntax
//!
//! ```text
//! tag       = "@accord" directive { option }
//! directive = "replicate"                      (table comments)
//!           | "lww" | "delta" | "review"       (column comments)
//! option    = key "=" value                    (table comments only, no spaces around "=")
//!             default=lww|review               policy of the columns without a tag of their own
//!             sequences=disjoint               the sequences behind the keys are disjoint across
//!                                              nodes (else `accord check` flags them)
//!             inserts=merge|review             two concurrent inserts of one key: one row, merged
//!                                              column by column (default), or the earlier keeps
//!                                              the row and the other goes to the review queue
//! ```
//!
//! Words are separated by whitespace and matched without regard to ASCII case; trailing sentence
//! punctuation (`.,;:!?)`) is not part of a word, so `'Stock on hand (@accord delta).'` works. The
//! tag ends at the first word after the directive that is not an option; everything before `@accord`
//! and after the tag is the user's text and ignored. `@accord` counts only as a word of its own,
//! followed by whitespace: `ops@accord.example` and `@accordion` are not tags, and text such as
//! `@acord delta` or `@accord:delta`, which looks like a failed attempt at one, is reported as a
//! warning. A comment holds at most one tag.

pub mod catalog;
mod check;
mod fingerprint;
pub mod parse;
mod place;
mod policy;
mod problem;
mod suggest;
mod types;

#[cfg(feature = "pg")]
pub mod pg;

pub use check::{check, Checked};
pub use fingerprint::Fingerprint;
pub use parse::{misspelled_marker, parse_column_comment, parse_table_comment, AnnotationError, TableTag};
pub use place::Place;
pub use policy::{PolicyError, SchemaPolicy};
pub use problem::{Problem, Severity};
pub use types::column_type;
