//! Turning a committed local change into the change a node sends: stamping it, counting its
//! deltas, versioning the columns it changed, and closing the review items it settles.

use thiserror::Error;

use crate::change::{CapturedChange, ChangeKind, RowChange};
use crate::hlc::Hlc;
use crate::merge::{diff_items, open_items};
use crate::review::{ClosureKind, ReviewAction, ReviewClosure, ReviewItem, ReviewItemId};
use crate::schema::TableDef;
use crate::shape::ShapeId;
use crate::state::{Candidate, Cell, ColumnMeta, DeltaLedger, RowMeta, RowState};
use crate::value::{as_amount, difference, Value, ValueError};

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum CaptureError {
    #[error("{kind:?} on {table} lacks its {which} row image; is REPLICA IDENTITY FULL set on the table?")]
    MissingImage {
        table: String,
        kind: ChangeKind,
        which: &'static str,
    },
    #[error("{table}: the change has {found} columns, the table has {expected}")]
    ColumnCount {
        table: String,
        found: usize,
        expected: usize,
    },
    #[error(
        "{table}: accord's metadata of this row has {found} columns, the table's policy {expected}: the table \
         changed since the metadata was written"
    )]
    MetadataShape {
        table: String,
        found: usize,
        expected: usize,
    },
    #[error("{table}.{column}: an insert must carry every value")]
    MissingValue { table: String, column: String },
    #[error("{table}.{column}: {source}")]
    Value {
        table: String,
        column: String,
        #[source]
        source: ValueError,
    },
}

/// A local change made ready to send: the row's new local metadata, the change for the peers, and
/// what it does to the local review queue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Captured {
    pub meta: RowMeta,
    pub change: RowChange,
    pub review: Vec<ReviewAction>,
}

/// Captures one local change made to a row whose metadata was `prior` (`None`: accord has no
/// metadata for it, a row older than accord or a new key). `stamp` is the change's HLC stamp, from
/// the node's clock, and `seq` the next number of the node's outbound log. `resolving` lists the
/// review items this write resolves (a reviewer's choice); other items it closes are superseded.
///
/// Returns `Ok(None)` when the change changes nothing accord tracks (an update to equal values, a
/// delete of a row already deleted): nothing is sent and `seq` is not used.
pub fn capture(
    table: &TableDef,
    prior: Option<&RowMeta>,
    change: &CapturedChange,
    stamp: Hlc,
    seq: u64,
    resolving: &[ReviewItemId],
) -> Result<Option<Captured>, CaptureError> {
    capture_shaped(table, table.shape_id(), prior, change, stamp, seq, resolving)
}

/// [`capture`], with `table`'s shape id (`shape`) already known.
pub fn capture_shaped(
    table: &TableDef,
    shape: ShapeId,
    prior: Option<&RowMeta>,
    change: &CapturedChange,
    stamp: Hlc,
    seq: u64,
    resolving: &[ReviewItemId],
) -> Result<Option<Captured>, CaptureError> {
    let node = stamp.node;
    let image = |which: &'static str, cells: &Option<Vec<Cell>>| -> Result<Vec<Cell>, CaptureError> {
        let cells = cells.as_ref().ok_or_else(|| CaptureError::MissingImage {
            table: table.name.clone(),
            kind: change.kind,
            which,
        })?;
        if cells.len() != table.columns.len() {
            return Err(CaptureError::ColumnCount {
                table: table.name.clone(),
                found: cells.len(),
                expected: table.columns.len(),
            });
        }
        Ok(cells.clone())
    };
    let value_err = |column: &str, source: ValueError| CaptureError::Value {
        table: table.name.clone(),
        column: column.to_owned(),
        source,
    };

    if let Some(prior) = prior.filter(|m| m.is_alive()) {
        let policies_match = prior.columns.len() == table.columns.len()
            && prior
                .columns
                .iter()
                .zip(&table.columns)
                .all(|(m, def)| m.policy() == def.policy);
        if !policies_match {
            return Err(CaptureError::MetadataShape {
                table: table.name.clone(),
                found: prior.columns.len(),
                expected: table.columns.len(),
            });
        }
    }
    let before = prior.cloned();
    let mut meta = before.clone().unwrap_or_else(RowMeta::absent);
    let mut closures = Vec::new();
    let values: Vec<Cell>;

    match change.kind {
        ChangeKind::Insert => {
            let new = image("new", &change.new)?;
            // A live row we never saw deleted (a TRUNCATE, say) starts a new incarnation too.
            meta.causal_length += if meta.is_alive() { 2 } else { 1 };
            meta.deleted_by.clear();
            meta.displaced.clear();
            let version = meta.next_version(stamp, seq);
            meta.created = Some(version);
            meta.columns = Vec::with_capacity(table.columns.len());
            for (def, cell) in table.columns.iter().zip(&new) {
                let value = cell.value().ok_or_else(|| CaptureError::MissingValue {
                    table: table.name.clone(),
                    column: def.name.clone(),
                })?;
                let column = match ColumnMeta::fresh(def.policy) {
                    ColumnMeta::Lww(_) => ColumnMeta::Lww(Some(version)),
                    ColumnMeta::Delta(mut ledger) => {
                        // An insert counts as a delta from zero.
                        let amount = as_amount(&def.ty, value).map_err(|e| value_err(&def.name, e))?;
                        if !amount.is_zero() {
                            record(&mut ledger, node, amount, &def.name, table)?;
                        }
                        ColumnMeta::Delta(ledger)
                    }
                    ColumnMeta::Review(mut reg) => {
                        reg.write(
                            node,
                            Candidate {
                                value: value.clone(),
                                stamp,
                            },
                        );
                        ColumnMeta::Review(reg)
                    }
                };
                meta.columns.push(column);
            }
            values = new;
        }
        ChangeKind::Update => {
            let new = image("new", &change.new)?;
            let old = image("old", &change.old)?;
            if !meta.is_alive() {
                // No metadata yet (the row predates accord), or a tombstone for a row the database
                // still had: either way the old image is the state this write builds on.
                let causal_length = meta.causal_length + 1;
                meta = RowMeta {
                    causal_length,
                    clock: meta.clock,
                    stamp: meta.stamp,
                    ..RowMeta::pre_existing(table)
                };
            }
            // A reviewer may resolve an item by picking the value the column already holds: that
            // is still a write, or the item would stay open everywhere else.
            let resolves = |i: usize| match &meta.columns[i] {
                ColumnMeta::Review(reg) if !resolving.is_empty() => reg.conflict().is_some_and(|candidates| {
                    let item = ReviewItem::concurrent(&table.name, &change.key, &table.columns[i].name, candidates);
                    resolving.contains(&item.id)
                }),
                _ => false,
            };
            let changed: Vec<usize> = (0..table.columns.len())
                .filter(|&i| match (&new[i], &old[i]) {
                    (Cell::Value(n), o) => o.value() != Some(n) || resolves(i),
                    (Cell::UnchangedToast, _) => false,
                })
                .collect();
            // A reviewer's decision on a displaced insert is a write even if it leaves every
            // value as it was (they kept the row as it is).
            let settles: Vec<usize> = meta
                .displaced
                .iter()
                .enumerate()
                .filter(|(_, d)| d.resolved.is_none() && !resolving.is_empty())
                .filter(|(_, d)| resolving.contains(&ReviewItem::displaced_insert(&table.name, &change.key, d).id))
                .map(|(j, _)| j)
                .collect();
            if changed.is_empty() && settles.is_empty() {
                return Ok(None);
            }
            let version = meta.next_version(stamp, seq);
            for j in settles {
                let item = ReviewItem::displaced_insert(&table.name, &change.key, &meta.displaced[j]);
                meta.displaced[j].resolved = Some(version);
                closures.push(ReviewClosure {
                    item,
                    kind: ClosureKind::Resolved {
                        by: node,
                        stamp,
                        value: Value::text(if changed.is_empty() {
                            "the row kept as it was"
                        } else {
                            "the row written anew by the reviewer"
                        }),
                    },
                });
            }
            for &i in &changed {
                let def = &table.columns[i];
                let Cell::Value(value) = &new[i] else { continue };
                match &mut meta.columns[i] {
                    ColumnMeta::Lww(v) => *v = Some(version),
                    ColumnMeta::Delta(ledger) => {
                        let old_value = old[i].value().ok_or_else(|| CaptureError::MissingImage {
                            table: table.name.clone(),
                            kind: change.kind,
                            which: "old (delta column)",
                        })?;
                        let delta = difference(&def.ty, value, old_value).map_err(|e| value_err(&def.name, e))?;
                        record(ledger, node, delta, &def.name, table)?;
                    }
                    ColumnMeta::Review(reg) => {
                        if let Some(candidates) = reg.conflict() {
                            let item = ReviewItem::concurrent(&table.name, &change.key, &def.name, candidates);
                            let kind = if resolving.contains(&item.id) {
                                ClosureKind::Resolved {
                                    by: node,
                                    stamp,
                                    value: value.clone(),
                                }
                            } else {
                                ClosureKind::Superseded {
                                    stamp,
                                    value: value.clone(),
                                }
                            };
                            closures.push(ReviewClosure { item, kind });
                        }
                        reg.write(
                            node,
                            Candidate {
                                value: value.clone(),
                                stamp,
                            },
                        );
                    }
                }
            }
            values = new;
        }
        ChangeKind::Delete => {
            if before.as_ref().is_some_and(|b| b.causal_length > 0 && !b.is_alive()) {
                return Ok(None);
            }
            if meta.causal_length == 0 {
                meta.causal_length = 1; // a row older than accord
            }
            meta.causal_length += 1;
            meta.next_version(stamp, seq);
            meta.columns.clear();
            meta.carried.clear();
            meta.created = None;
            meta.displaced.clear();
            meta.deleted_by = vec![(node, seq)];
            values = Vec::new();
        }
    }

    let before_state = RowState {
        values: Vec::new(),
        meta: before.unwrap_or_else(RowMeta::absent),
    };
    let after_state = RowState { meta, values };
    let review = diff_items(
        open_items(table, &change.key, &before_state),
        open_items(table, &change.key, &after_state),
        &closures,
    );
    let change = RowChange {
        table: table.name.clone(),
        key: change.key.clone(),
        kind: change.kind,
        origin: node,
        stamp,
        seq,
        // A transaction of its own until the group writer knows the transaction's last.
        tx_last: seq,
        builds_on: Vec::new(),
        row: RowState {
            // Columns of other shapes are this node's to keep, not to send.
            meta: RowMeta {
                carried: Default::default(),
                ..after_state.meta.clone()
            },
            values: after_state.values.clone(),
        },
        shape: Some(shape),
        closures,
    };
    Ok(Some(Captured {
        meta: after_state.meta,
        change,
        review,
    }))
}

fn record(
    ledger: &mut DeltaLedger,
    node: crate::hlc::NodeId,
    amount: crate::value::Amount,
    column: &str,
    table: &TableDef,
) -> Result<(), CaptureError> {
    ledger.record(node, amount).ok_or_else(|| CaptureError::Value {
        table: table.name.clone(),
        column: column.to_owned(),
        source: ValueError::Overflow {
            ty: "delta contribution".into(),
            value: "sum of this node's deltas".into(),
        },
    })
}
