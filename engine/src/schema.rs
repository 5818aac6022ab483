//! What the engine needs to know about a replicated table: its key, its columns, each column's
//! type and merge policy. `schema-annotations` builds these from the database's comments.

use std::fmt;

use serde::{Deserialize, Serialize};
use thiserror::Error;

/// How concurrent writes to one column are merged (PRODUCT.md's table of policies).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, Default)]
pub enum ColumnPolicy {
    /// The write with the greatest (HLC, node id) wins.
    #[default]
    Lww,
    /// Every write's delta (new − old) is added exactly once on every node.
    Delta,
    /// Replicas converge on a provisional winner; concurrent differing values go to review.
    Review,
}

impl ColumnPolicy {
    pub const ALL: [ColumnPolicy; 3] = [ColumnPolicy::Lww, ColumnPolicy::Delta, ColumnPolicy::Review];

    /// The word users write after `@accord`.
    pub fn keyword(self) -> &'static str {
        match self {
            ColumnPolicy::Lww => "lww",
            ColumnPolicy::Delta => "delta",
            ColumnPolicy::Review => "review",
        }
    }
}

impl fmt::Display for ColumnPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.keyword())
    }
}

/// The PostgreSQL types the engine treats specially; every other type is carried as PostgreSQL's
/// text form and only compared for equality.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum ColumnType {
    SmallInt,
    Integer,
    BigInt,
    /// `numeric(precision, scale)`; `None` for an unconstrained `numeric`.
    Numeric {
        precision: Option<u32>,
        scale: Option<u32>,
    },
    /// `money`, carried as an exact decimal of currency units with two fractional digits.
    Money,
    Real,
    DoublePrecision,
    /// Any other type, by its PostgreSQL name (`text`, `timestamptz`, `jsonb`, ...).
    Other(String),
}

impl ColumnType {
    /// Whether a `delta` policy is allowed: exact numeric types only.
    pub fn is_exact_numeric(&self) -> bool {
        matches!(
            self,
            ColumnType::SmallInt
                | ColumnType::Integer
                | ColumnType::BigInt
                | ColumnType::Numeric { .. }
                | ColumnType::Money
        )
    }

    pub fn is_integer(&self) -> bool {
        matches!(self, ColumnType::SmallInt | ColumnType::Integer | ColumnType::BigInt)
    }
}

impl fmt::Display for ColumnType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ColumnType::SmallInt => f.write_str("smallint"),
            ColumnType::Integer => f.write_str("integer"),
            ColumnType::BigInt => f.write_str("bigint"),
            ColumnType::Numeric {
                precision: Some(p),
                scale,
            } => write!(f, "numeric({p},{})", scale.unwrap_or(0)),
            ColumnType::Numeric { .. } => f.write_str("numeric"),
            ColumnType::Money => f.write_str("money"),
            ColumnType::Real => f.write_str("real"),
            ColumnType::DoublePrecision => f.write_str("double precision"),
            ColumnType::Other(name) => f.write_str(name),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ColumnDef {
    pub name: String,
    pub ty: ColumnType,
    pub policy: ColumnPolicy,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct KeyColumn {
    pub name: String,
    pub ty: ColumnType,
}

/// A replicated table. `columns` holds the non-key columns; every row state and change lists its
/// values in this order.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct TableDef {
    /// Schema-qualified name, as `schema.table`.
    pub name: String,
    pub key: Vec<KeyColumn>,
    pub columns: Vec<ColumnDef>,
    /// What two concurrent inserts of one key mean (`@accord replicate inserts=...`).
    #[serde(default)]
    pub inserts: InsertPolicy,
}

/// What two inserts of one key, made on two nodes before either saw the other's, mean.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
pub enum InsertPolicy {
    /// One row: the inserts' columns merge as concurrent updates of it would. Right for a natural
    /// key (a SKU, an email), which names one thing wherever it is written.
    #[default]
    Merge,
    /// The earlier insert keeps the row; the other is kept whole in the review queue, nothing
    /// merged. For keys that name different things on different nodes (two orders numbered 1001).
    Review,
}

impl InsertPolicy {
    pub fn keyword(self) -> &'static str {
        match self {
            InsertPolicy::Merge => "merge",
            InsertPolicy::Review => "review",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum SchemaError {
    #[error("table {table} has no primary key; accord needs one to tell rows apart on every node")]
    NoPrimaryKey { table: String },
    #[error(
        "column {table}.{column} is `delta` but its type is {ty}; `delta` needs an exact numeric type \
         (smallint, integer, bigint, numeric, money){hint}"
    )]
    DeltaOnInexactType {
        table: String,
        column: String,
        ty: ColumnType,
        hint: &'static str,
    },
    #[error("table {table} names column {column} twice")]
    DuplicateColumn { table: String, column: String },
}

/// Why floating point is refused for `delta`, for error messages.
pub const FLOAT_DELTA_HINT: &str = ": floating-point addition gives different bits in different \
     orders, so replicas that add the same deltas in another order would drift apart";

impl TableDef {
    /// A table definition, checked for the mistakes that would make merging unsafe.
    pub fn new(name: impl Into<String>, key: Vec<KeyColumn>, columns: Vec<ColumnDef>) -> Result<Self, SchemaError> {
        let table = TableDef {
            name: name.into(),
            key,
            columns,
            inserts: InsertPolicy::Merge,
        };
        table.validate()?;
        Ok(table)
    }

    /// The table with `inserts` as what two concurrent inserts of one key mean.
    pub fn with_inserts(self, inserts: InsertPolicy) -> Self {
        TableDef { inserts, ..self }
    }

    pub fn validate(&self) -> Result<(), SchemaError> {
        if self.key.is_empty() {
            return Err(SchemaError::NoPrimaryKey {
                table: self.name.clone(),
            });
        }
        let mut names: Vec<&str> = self
            .key
            .iter()
            .map(|k| k.name.as_str())
            .chain(self.columns.iter().map(|c| c.name.as_str()))
            .collect();
        names.sort_unstable();
        if let Some(pair) = names.windows(2).find(|w| w[0] == w[1]) {
            return Err(SchemaError::DuplicateColumn {
                table: self.name.clone(),
                column: pair[0].to_string(),
            });
        }
        for column in &self.columns {
            if column.policy == ColumnPolicy::Delta && !column.ty.is_exact_numeric() {
                let hint = match column.ty {
                    ColumnType::Real | ColumnType::DoublePrecision => FLOAT_DELTA_HINT,
                    _ => "",
                };
                return Err(SchemaError::DeltaOnInexactType {
                    table: self.name.clone(),
                    column: column.name.clone(),
                    ty: column.ty.clone(),
                    hint,
                });
            }
        }
        Ok(())
    }

    pub fn column_index(&self, name: &str) -> Option<usize> {
        self.columns.iter().position(|c| c.name == name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> Vec<KeyColumn> {
        vec![KeyColumn {
            name: "id".into(),
            ty: ColumnType::BigInt,
        }]
    }

    fn col(name: &str, ty: ColumnType, policy: ColumnPolicy) -> ColumnDef {
        ColumnDef {
            name: name.into(),
            ty,
            policy,
        }
    }

    #[test]
    fn float_delta_is_refused_with_the_reason() {
        let err = TableDef::new(
            "shop.products",
            key(),
            vec![col("weight", ColumnType::DoublePrecision, ColumnPolicy::Delta)],
        )
        .unwrap_err();
        let text = err.to_string();
        assert!(text.contains("shop.products.weight"), "{text}");
        assert!(text.contains("drift"), "{text}");
    }

    #[test]
    fn text_delta_is_refused() {
        let err = TableDef::new(
            "t",
            key(),
            vec![col("n", ColumnType::Other("text".into()), ColumnPolicy::Delta)],
        )
        .unwrap_err();
        assert!(matches!(err, SchemaError::DeltaOnInexactType { .. }));
    }

    #[test]
    fn missing_key_and_duplicate_names_are_refused() {
        assert_eq!(
            TableDef::new("t", vec![], vec![]).unwrap_err(),
            SchemaError::NoPrimaryKey { table: "t".into() }
        );
        let err = TableDef::new("t", key(), vec![col("id", ColumnType::Integer, ColumnPolicy::Lww)]).unwrap_err();
        assert!(matches!(err, SchemaError::DuplicateColumn { .. }));
    }

    #[test]
    fn exact_numeric_delta_is_accepted() {
        for ty in [
            ColumnType::SmallInt,
            ColumnType::Integer,
            ColumnType::BigInt,
            ColumnType::Money,
            ColumnType::Numeric {
                precision: Some(40),
                scale: Some(10),
            },
        ] {
            TableDef::new("t", key(), vec![col("n", ty, ColumnPolicy::Delta)]).unwrap();
        }
    }
}
