//! Everything `check` can find wrong with a database's annotations.

use accord_engine::{ColumnPolicy, SchemaError};
use thiserror::Error;

use crate::parse::AnnotationError;
use crate::place::Place;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Severity {
    /// Something accord cannot replicate as written: the table is left out of the policy.
    Error,
    /// Probably not what the user meant, but nothing is replicated wrongly because of it.
    Warning,
}

impl Severity {
    pub fn word(self) -> &'static str {
        match self {
            Severity::Error => "error",
            Severity::Warning => "warning",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum Problem {
    #[error(transparent)]
    Annotation(#[from] AnnotationError),
    /// The engine's own refusals: no primary key, `delta` on a type it cannot add exactly.
    #[error("{error}")]
    Schema {
        table: String,
        column: Option<String>,
        error: SchemaError,
    },
    /// Two tables whose names join to the same `schema.table` (possible only with dots in names).
    #[error("two tables are named {table}; accord cannot tell them apart")]
    DuplicateTable { table: String },
    #[error(
        "column {table}.{column} is `delta` but may hold NULL; a NULL has no sum, so delta columns must be \
         NOT NULL (hint: add NOT NULL DEFAULT 0)"
    )]
    NullableDelta { table: String, column: String },
    #[error(
        "column {table}.{column} is in the primary key, which names the row on every node and is never \
         merged; remove its `@accord {policy}` tag"
    )]
    PolicyOnKeyColumn {
        table: String,
        column: String,
        policy: ColumnPolicy,
    },
    #[error(
        "column {table}.{column} is generated, so every node computes it and it is not merged; remove its \
         `@accord {policy}` tag"
    )]
    PolicyOnGeneratedColumn {
        table: String,
        column: String,
        policy: ColumnPolicy,
    },
    #[error(
        "{kind} {table} is tagged `@accord replicate`, but accord replicates only tables (ordinary or partitioned)"
    )]
    NotATable { table: String, kind: &'static str },
    #[error(
        "table {table} is a partition of {root}: accord replicates a partitioned table as one table, through \
         its root, whatever its partitions are on each node; move the `@accord` tags to {root}"
    )]
    PartitionTagged { table: String, root: String },
    #[error(
        "key column {table}.{column} takes its values from {counter}: every node counts from the same start, so \
         two nodes give the same id to different rows and accord merges them into one. Convert it to ids no \
         other node gives: `accord ids convert --dsn ... --table {table}` on every node (existing rows keep \
         theirs); or, if you made the sequences disjoint yourself, say so: `@accord replicate sequences=disjoint`"
    )]
    SequenceKey {
        table: String,
        column: String,
        counter: String,
    },
    #[error(
        "column {table}.{column} takes its values from {counter}: two nodes will write the same numbers for \
         different rows (harmless unless the numbers must be unique); `accord ids convert --dsn ... --table \
         {table} --column {column}` gives each node its own, or `@accord replicate sequences=disjoint` says \
         you made them disjoint"
    )]
    SequenceColumn {
        table: String,
        column: String,
        counter: String,
    },
    #[error(
        "table {table} is UNLOGGED: its changes are not written to the WAL, so logical decoding never \
         sees them and they would silently not replicate; make it logged (ALTER TABLE {table} SET LOGGED)"
    )]
    UnloggedTable { table: String },
    #[error(
        "column {table}.{column} is tagged `@accord {policy}`, but table {table} is not replicated (its \
         comment has no `@accord replicate`), so the tag has no effect"
    )]
    TagOnUnreplicatedTable {
        table: String,
        column: String,
        policy: ColumnPolicy,
    },
    #[error(
        "table {table} has REPLICA IDENTITY {current}; accord needs FULL to see the old values of updated \
         and deleted rows (`accord init` sets it)"
    )]
    ReplicaIdentityNotFull { table: String, current: &'static str },
    #[error(
        "{place}: `{written}` looks like a misspelled tag and is ignored; write `@accord` and a word after a space"
    )]
    MisspelledMarker { place: Place, written: String },
}

impl Problem {
    pub fn severity(&self) -> Severity {
        match self {
            Problem::TagOnUnreplicatedTable { .. }
            | Problem::SequenceColumn { .. }
            | Problem::ReplicaIdentityNotFull { .. }
            | Problem::MisspelledMarker { .. } => Severity::Warning,
            _ => Severity::Error,
        }
    }

    pub fn is_error(&self) -> bool {
        self.severity() == Severity::Error
    }

    /// A stable name of the kind of problem, for machines.
    pub fn code(&self) -> &'static str {
        match self {
            Problem::Annotation(e) => e.code(),
            Problem::Schema { error, .. } => match error {
                SchemaError::NoPrimaryKey { .. } => "no-primary-key",
                SchemaError::DeltaOnInexactType { .. } => "delta-on-inexact-type",
                // DuplicateColumn, and any refusal the engine adds later.
                _ => "invalid-table",
            },
            Problem::DuplicateTable { .. } => "duplicate-table",
            Problem::NullableDelta { .. } => "nullable-delta",
            Problem::PolicyOnKeyColumn { .. } => "policy-on-key-column",
            Problem::PolicyOnGeneratedColumn { .. } => "policy-on-generated-column",
            Problem::NotATable { .. } => "not-a-table",
            Problem::PartitionTagged { .. } => "partition-tagged",
            Problem::SequenceKey { .. } => "sequence-key",
            Problem::SequenceColumn { .. } => "sequence-column",
            Problem::UnloggedTable { .. } => "unlogged-table",
            Problem::TagOnUnreplicatedTable { .. } => "tag-on-unreplicated-table",
            Problem::ReplicaIdentityNotFull { .. } => "replica-identity-not-full",
            Problem::MisspelledMarker { .. } => "misspelled-tag",
        }
    }

    /// The table the problem is about.
    pub fn table(&self) -> &str {
        match self {
            Problem::Annotation(e) => e.place().table(),
            Problem::MisspelledMarker { place, .. } => place.table(),
            Problem::Schema { table, .. }
            | Problem::DuplicateTable { table }
            | Problem::NullableDelta { table, .. }
            | Problem::PolicyOnKeyColumn { table, .. }
            | Problem::PolicyOnGeneratedColumn { table, .. }
            | Problem::NotATable { table, .. }
            | Problem::PartitionTagged { table, .. }
            | Problem::SequenceKey { table, .. }
            | Problem::SequenceColumn { table, .. }
            | Problem::UnloggedTable { table }
            | Problem::TagOnUnreplicatedTable { table, .. }
            | Problem::ReplicaIdentityNotFull { table, .. } => table,
        }
    }

    /// The column the problem is about, when it is about one.
    pub fn column(&self) -> Option<&str> {
        match self {
            Problem::Annotation(e) => e.place().column(),
            Problem::MisspelledMarker { place, .. } => place.column(),
            Problem::Schema { column, .. } => column.as_deref(),
            Problem::NullableDelta { column, .. }
            | Problem::PolicyOnKeyColumn { column, .. }
            | Problem::PolicyOnGeneratedColumn { column, .. }
            | Problem::TagOnUnreplicatedTable { column, .. }
            | Problem::SequenceKey { column, .. }
            | Problem::SequenceColumn { column, .. } => Some(column),
            Problem::DuplicateTable { .. }
            | Problem::NotATable { .. }
            | Problem::PartitionTagged { .. }
            | Problem::UnloggedTable { .. }
            | Problem::ReplicaIdentityNotFull { .. } => None,
        }
    }
}
