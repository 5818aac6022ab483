//! Turning a database's catalog into its schema policy, finding every mistake on the way.
//!
//! A table with any error is left out of the policy whole: nothing is replicated under a policy
//! accord did not understand, and half a table cannot be merged. Checking goes on after the first
//! error so that one run names every mistake.

use accord_engine::schema::FLOAT_DELTA_HINT;
use accord_engine::{ColumnDef, ColumnPolicy, ColumnType, KeyColumn, SchemaError, TableDef};

use crate::catalog::{CatalogColumn, CatalogTable, RelationKind, ReplicaIdentity};
use crate::parse::{misspelled_marker, parse_column_comment, parse_table_comment, TableTag};
use crate::place::Place;
use crate::policy::SchemaPolicy;
use crate::problem::Problem;
use crate::types::column_type;

/// What `check` made of a catalog.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checked {
    /// The tables that passed every check.
    pub policy: SchemaPolicy,
    /// Errors and warnings, by table, then the table's own before its columns' by column name.
    pub problems: Vec<Problem>,
}

impl Checked {
    pub fn has_errors(&self) -> bool {
        self.problems.iter().any(Problem::is_error)
    }

    pub fn errors(&self) -> impl Iterator<Item = &Problem> {
        self.problems.iter().filter(|p| p.is_error())
    }

    pub fn warnings(&self) -> impl Iterator<Item = &Problem> {
        self.problems.iter().filter(|p| !p.is_error())
    }
}

/// The policy the catalog's comments declare, and every problem with them.
pub fn check(catalog: &[CatalogTable]) -> Checked {
    let mut catalog: Vec<(String, &CatalogTable)> = catalog.iter().map(|t| (t.qualified_name(), t)).collect();
    catalog.sort_by(|a, b| a.0.cmp(&b.0));
    let mut problems = Vec::new();
    let mut tables = Vec::new();
    for (name, table) in &catalog {
        let first = problems.len();
        tables.extend(check_table(name, table, &mut problems));
        // The table's own problems first, then its columns' by name, whichever check found them.
        problems[first..].sort_by(|a, b| a.column().cmp(&b.column()));
    }
    let mut duplicates: Vec<String> = tables
        .windows(2)
        .filter(|pair| pair[0].name == pair[1].name)
        .map(|pair| pair[0].name.clone())
        .collect();
    duplicates.dedup();
    tables.retain(|table| !duplicates.contains(&table.name));
    problems.extend(duplicates.into_iter().map(|table| Problem::DuplicateTable { table }));
    let policy = SchemaPolicy::new(tables)
        .expect("every table passed TableDef::new, whose checks do not depend on order, and names are unique");
    Checked { policy, problems }
}

fn check_table(name: &str, table: &CatalogTable, problems: &mut Vec<Problem>) -> Option<TableDef> {
    let comment = table.comment.as_deref().unwrap_or("");
    warn_misspelled(
        Place::Table {
            table: name.to_string(),
        },
        comment,
        problems,
    );
    let table_tag = parse_table_comment(name, comment).map_err(|e| problems.push(e.into()));

    let mut columns: Vec<&CatalogColumn> = table.columns.iter().collect();
    columns.sort_by(|a, b| a.name.cmp(&b.name));
    let mut failed = false;
    let mut tagged = Vec::new();
    for column in columns {
        let comment = column.comment.as_deref().unwrap_or("");
        warn_misspelled(
            Place::Column {
                table: name.to_string(),
                column: column.name.clone(),
            },
            comment,
            problems,
        );
        match parse_column_comment(name, &column.name, comment) {
            Ok(policy) => tagged.push((column, policy)),
            Err(e) => {
                problems.push(e.into());
                failed = true;
            }
        }
    }

    let tag = match table_tag {
        Ok(Some(tag)) => tag,
        Ok(None) => {
            for (column, policy) in tagged {
                if let Some(policy) = policy {
                    problems.push(Problem::TagOnUnreplicatedTable {
                        table: name.to_string(),
                        column: column.name.clone(),
                        policy,
                    });
                }
            }
            return None;
        }
        // The user meant to replicate it; warning that its column tags have no effect would mislead.
        Err(()) => return None,
    };
    if !matches!(table.kind, RelationKind::Table | RelationKind::PartitionedTable) {
        problems.push(Problem::NotATable {
            table: name.to_string(),
            kind: table.kind.describe(),
        });
        return None;
    }
    if let Some(root) = &table.partition_of {
        problems.push(Problem::PartitionTagged {
            table: name.to_string(),
            root: root.clone(),
        });
        return None;
    }
    if table.unlogged {
        problems.push(Problem::UnloggedTable {
            table: name.to_string(),
        });
        failed = true;
    }
    if !tag.sequences_disjoint {
        for column in &table.columns {
            let Some(counter) = counted_by_sequence(column) else {
                continue;
            };
            let (table, column_name) = (name.to_string(), column.name.clone());
            if column.key_position.is_some() {
                problems.push(Problem::SequenceKey {
                    table,
                    column: column_name,
                    counter,
                });
                failed = true;
            } else {
                problems.push(Problem::SequenceColumn {
                    table,
                    column: column_name,
                    counter,
                });
            }
        }
    }
    let (key, columns) = replicated_columns(name, tag, &tagged, problems, &mut failed);
    if key.is_empty() {
        problems.push(Problem::Schema {
            table: name.to_string(),
            column: None,
            error: SchemaError::NoPrimaryKey {
                table: name.to_string(),
            },
        });
        failed = true;
    }
    if failed {
        return None;
    }
    // Only for tables that are otherwise fine: it is no mistake of the annotations, `accord init`
    // fixes it, and next to errors it would only be noise.
    if table.replica_identity != ReplicaIdentity::Full {
        problems.push(Problem::ReplicaIdentityNotFull {
            table: name.to_string(),
            current: table.replica_identity.keyword(),
        });
    }
    TableDef::new(name, key, columns)
        .map(|def| def.with_inserts(tag.inserts))
        .map_err(|error| {
            problems.push(Problem::Schema {
                table: name.to_string(),
                column: None,
                error,
            })
        })
        .ok()
}

/// What numbers a column's values when an insert leaves it out, when that is a sequence every
/// node counts on its own: an identity, or a default calling `nextval` (not through
/// `accord.next_id`, whose ids carry the node).
fn counted_by_sequence(column: &CatalogColumn) -> Option<String> {
    if column.identity {
        return Some("an identity (GENERATED ... AS IDENTITY)".to_owned());
    }
    let default = column.default.as_deref()?;
    (default.contains("nextval(") && !default.contains("accord.next_id("))
        .then(|| format!("a sequence (DEFAULT {default})"))
}

/// The key columns in key order and the merged columns by name, checking each column's policy.
fn replicated_columns(
    table: &str,
    tag: TableTag,
    tagged: &[(&CatalogColumn, Option<ColumnPolicy>)],
    problems: &mut Vec<Problem>,
    failed: &mut bool,
) -> (Vec<KeyColumn>, Vec<ColumnDef>) {
    let mut key = Vec::new();
    let mut columns = Vec::new();
    for &(column, policy) in tagged {
        let ty = column_type(&column.type_name);
        let at = || (table.to_string(), column.name.clone());
        if let Some(position) = column.key_position {
            if let Some(policy) = policy {
                let (table, column) = at();
                problems.push(Problem::PolicyOnKeyColumn { table, column, policy });
                *failed = true;
            }
            key.push((
                position,
                KeyColumn {
                    name: column.name.clone(),
                    ty,
                },
            ));
            continue;
        }
        if column.generated {
            if let Some(policy) = policy {
                let (table, column) = at();
                problems.push(Problem::PolicyOnGeneratedColumn { table, column, policy });
                *failed = true;
            }
            continue;
        }
        let policy = policy.unwrap_or(tag.default_policy);
        if policy == ColumnPolicy::Delta {
            if let Some(problem) = delta_problem(table, column, &ty) {
                problems.push(problem);
                *failed = true;
            }
        }
        columns.push(ColumnDef {
            name: column.name.clone(),
            ty,
            policy,
        });
    }
    key.sort_by_key(|(position, _)| *position);
    (key.into_iter().map(|(_, k)| k).collect(), columns)
}

fn delta_problem(table: &str, column: &CatalogColumn, ty: &ColumnType) -> Option<Problem> {
    if !ty.is_exact_numeric() {
        let hint = match ty {
            ColumnType::Real | ColumnType::DoublePrecision => FLOAT_DELTA_HINT,
            _ => "",
        };
        return Some(Problem::Schema {
            table: table.to_string(),
            column: Some(column.name.clone()),
            error: SchemaError::DeltaOnInexactType {
                table: table.to_string(),
                column: column.name.clone(),
                ty: ty.clone(),
                hint,
            },
        });
    }
    if !column.not_null {
        return Some(Problem::NullableDelta {
            table: table.to_string(),
            column: column.name.clone(),
        });
    }
    None
}

fn warn_misspelled(place: Place, comment: &str, problems: &mut Vec<Problem>) {
    if let Some(written) = misspelled_marker(comment) {
        problems.push(Problem::MisspelledMarker { place, written });
    }
}

#[cfg(test)]
mod tests;
