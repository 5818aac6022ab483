//! The replication policy of a database: every replicated table, in a canonical order.

use accord_engine::{SchemaError, TableDef};
use thiserror::Error;

use crate::fingerprint::{self, Fingerprint};

/// Every replicated table with its key, its columns and their policies.
///
/// Order is canonical so that two nodes with the same tables hold equal policies and the same
/// fingerprint: tables by qualified name, and each table's non-key columns by name. Names compare
/// by their bytes, not by a collation, which could differ between the nodes' locales. Columns are
/// not kept in `attnum` order because that order records history: a column dropped and added again,
/// or columns added by ALTERs in another order on another node, give other attnums for the same
/// table. The key keeps the primary key's own column order, which is part of the key's definition.
///
/// The engine lists row values in `TableDef::columns` order, so this is also the order of values in
/// row states and changes.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SchemaPolicy {
    tables: Vec<TableDef>,
}

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum PolicyError {
    #[error("table {0} is listed twice")]
    DuplicateTable(String),
    #[error(transparent)]
    Table(#[from] SchemaError),
}

impl SchemaPolicy {
    /// A policy of these tables, each validated by the engine, put into canonical order.
    pub fn new(mut tables: Vec<TableDef>) -> Result<Self, PolicyError> {
        for table in &mut tables {
            table.validate()?;
            table.columns.sort_by(|a, b| a.name.cmp(&b.name));
        }
        tables.sort_by(|a, b| a.name.cmp(&b.name));
        if let Some(pair) = tables.windows(2).find(|pair| pair[0].name == pair[1].name) {
            return Err(PolicyError::DuplicateTable(pair[0].name.clone()));
        }
        Ok(SchemaPolicy { tables })
    }

    /// The tables, by name.
    pub fn tables(&self) -> &[TableDef] {
        &self.tables
    }

    pub fn table(&self, name: &str) -> Option<&TableDef> {
        let index = self.tables.binary_search_by(|t| t.name.as_str().cmp(name)).ok()?;
        Some(&self.tables[index])
    }

    pub fn is_empty(&self) -> bool {
        self.tables.is_empty()
    }

    /// A digest of everything in the policy. Peers compare it before they exchange changes.
    pub fn fingerprint(&self) -> Fingerprint {
        fingerprint::of(&self.tables)
    }
}
