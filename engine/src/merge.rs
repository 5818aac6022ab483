//! Merging a peer's change into the local state of a row.
//!
//! The rules, in order:
//! 1. The greater causal length wins the whole row: a delete beats updates that had not seen it,
//!    and a re-insert beats the delete it saw.
//! 2. Within one incarnation every column merges by its policy: `lww` keeps the greater version,
//!    `delta` adds each node's not-yet-counted contribution, `review` merges the multi-value
//!    register and exposes concurrent differing values as a review item.
//!    In a table with `inserts=review`, an incarnation begun by two concurrent inserts keeps the
//!    earlier (the least `created`) and its writes as the row; the other insert and the writes
//!    made on it are a *displaced insert*, kept whole for review (`DisplacedInsert`).
//! 3. Nothing is partial: if one column cannot be applied (a delta overflowing its type) the whole
//!    change is parked and the state stays as it was.

use crdts::CvRDT;
use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::change::{RowChange, RowKey};
use crate::hlc::Hlc;
use crate::review::{ReviewAction, ReviewItem, ReviewItemId};
use crate::schema::{ColumnPolicy, InsertPolicy, TableDef};
use crate::state::{join_displaced, Cell, ColumnMeta, DisplacedInsert, RowMeta, RowState, Version};
use crate::value::{add_checked, Amount, Value, ValueError};

/// What to do to the user's row.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum RowAction {
    Nothing,
    /// Insert the row with these values (table column order).
    Insert(Vec<Value>),
    Update(Vec<ColumnWrite>),
    Delete,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ColumnWrite {
    /// Index into the table's columns.
    pub column: usize,
    pub value: Value,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ConflictKind {
    /// Two concurrent writes of differing values to an `lww` column; the lesser version lost.
    ConcurrentUpdate,
    /// A delete (or a re-insert after it) won over writes that had not seen it.
    DeleteWon,
    /// Two inserts of one key were merged column by column.
    InsertInsert,
    /// Two inserts of one key in a table with `inserts=review`: the earlier kept the row, the
    /// later is kept whole in the review queue.
    InsertDisplaced,
}

/// An automatic resolution, for the conflict log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Conflict {
    pub kind: ConflictKind,
    pub column: Option<String>,
    pub winner: Hlc,
    pub loser: Hlc,
}

/// A merge that was applied: the new state of the row and what to do about it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Merged {
    pub state: RowState,
    pub action: RowAction,
    pub review: Vec<ReviewAction>,
    pub conflicts: Vec<Conflict>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum MergeOutcome {
    Applied(Merged),
    /// The change cannot be applied here; it goes to the review queue and the row stays as it was.
    Parked {
        item: ReviewItem,
        error: String,
    },
    /// The row is new here but the change lacks the values of these columns (unchanged TOAST
    /// relayed by a node that was not their origin). Keep the change and merge it again after the
    /// origin's own change for the row arrived.
    Deferred {
        missing: Vec<String>,
    },
}

/// The change does not fit the table: a peer with another schema, or a corrupt change.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum MergeError {
    #[error("change for table {change_table} merged against table {table}")]
    WrongTable { table: String, change_table: String },
    #[error("{which} state of {table} {key} has {found} columns, the table has {expected}")]
    ColumnCount {
        which: &'static str,
        table: String,
        key: RowKey,
        found: usize,
        expected: usize,
    },
    #[error("{which} state of {table}.{column} carries {found} metadata, the column's policy is {expected}")]
    PolicyMismatch {
        which: &'static str,
        table: String,
        column: String,
        found: ColumnPolicy,
        expected: ColumnPolicy,
    },
}

/// Merges `remote` into `local` (`None` when this node has no metadata for the row).
pub fn merge(table: &TableDef, local: Option<&RowState>, remote: &RowChange) -> Result<MergeOutcome, MergeError> {
    if remote.table != table.name {
        return Err(MergeError::WrongTable {
            table: table.name.clone(),
            change_table: remote.table.clone(),
        });
    }
    check_shape(table, &remote.key, "remote", &remote.row)?;
    let absent = RowState::absent();
    let local = local.unwrap_or(&absent);
    check_shape(table, &remote.key, "local", local)?;

    let rem = &remote.row;
    let mut conflicts = Vec::new();
    let mut state;
    let action;
    if rem.meta.causal_length > local.meta.causal_length {
        // The remote incarnation replaces ours wholesale.
        if local.is_alive() && has_unseen_writes(&local.meta, &rem.meta) {
            conflicts.push(Conflict {
                kind: ConflictKind::DeleteWon,
                column: None,
                winner: remote.stamp,
                loser: local.meta.stamp.unwrap_or(remote.stamp),
            });
        }
        state = rem.clone();
        if rem.is_alive() {
            let values = match adopted_values(table, rem) {
                Ok(values) => values,
                Err(missing) => return Ok(MergeOutcome::Deferred { missing }),
            };
            state.values = values.iter().cloned().map(Cell::Value).collect();
            action = if local.is_alive() {
                rewrite_whole(values)
            } else {
                RowAction::Insert(values)
            };
        } else {
            action = if local.is_alive() {
                RowAction::Delete
            } else {
                RowAction::Nothing
            };
        }
    } else if rem.meta.causal_length < local.meta.causal_length || !rem.is_alive() {
        // An older incarnation, or a delete we already have: only our knowledge grows.
        if rem.meta.causal_length < local.meta.causal_length
            && rem.is_alive()
            && has_unseen_writes(&rem.meta, &local.meta)
        {
            conflicts.push(Conflict {
                kind: ConflictKind::DeleteWon,
                column: None,
                winner: local.meta.stamp.unwrap_or(remote.stamp),
                loser: remote.stamp,
            });
        }
        state = local.clone();
        if rem.meta.causal_length == local.meta.causal_length {
            // Concurrent deletes of one incarnation: the tombstone stands for all of them.
            state.meta.absorb_deletes(&rem.meta.deleted_by);
        }
        action = RowAction::Nothing;
    } else if table.inserts == InsertPolicy::Review && local.meta.created != rem.meta.created {
        // Two inserts of one key met: the earlier keeps the row. `None` (a row older than accord)
        // is the earliest of all, so the displaced one always has a version.
        let (kept, displaced) = if rem.meta.created < local.meta.created {
            (rem, local)
        } else {
            (local, rem)
        };
        let Some(displaced_version) = displaced.meta.created else {
            unreachable!("the later of two different creation versions is not None")
        };
        let known = local.meta.displaced.iter().any(|d| d.created == displaced_version);
        if !known {
            conflicts.push(Conflict {
                kind: ConflictKind::InsertDisplaced,
                column: None,
                winner: kept.meta.created.map_or(remote.stamp, |v| v.stamp),
                loser: displaced_version.stamp,
            });
        }
        state = kept.clone();
        if std::ptr::eq(kept, rem) {
            let values = match adopted_values(table, rem) {
                Ok(values) => values,
                Err(missing) => return Ok(MergeOutcome::Deferred { missing }),
            };
            state.values = values.iter().cloned().map(Cell::Value).collect();
            action = rewrite_whole(values);
        } else {
            action = RowAction::Nothing;
        }
        let lineage = DisplacedInsert::of(table, displaced, displaced_version);
        state.meta.displaced = join_displaced(
            &join_displaced(&local.meta.displaced, &rem.meta.displaced),
            std::slice::from_ref(&lineage),
        );
    } else {
        state = local.clone();
        state.meta.displaced = join_displaced(&local.meta.displaced, &rem.meta.displaced);
        match merge_columns(table, local, remote, &mut state, &mut conflicts) {
            Ok(writes) if writes.is_empty() => action = RowAction::Nothing,
            Ok(writes) => action = RowAction::Update(writes),
            Err(why) => return Ok(park(table, remote, why)),
        }
        if let (Some(ours), Some(theirs)) = (local.meta.created, rem.meta.created) {
            if ours != theirs && !ours.seen_by(&rem.meta.clock) && !theirs.seen_by(&local.meta.clock) {
                conflicts.push(Conflict {
                    kind: ConflictKind::InsertInsert,
                    column: None,
                    winner: ours.stamp.max(theirs.stamp),
                    loser: ours.stamp.min(theirs.stamp),
                });
            }
            state.meta.created = Some(ours.min(theirs));
        }
    }
    // Knowledge of writes grows within the incarnation that won. An older incarnation's writes
    // are not knowledge of this one: a node that collected the older tombstone no longer has
    // them, so joining them here would make the row's metadata depend on the order of delivery
    // and collection (the simulator found two nodes left with different clocks this way).
    let incarnation = state.meta.causal_length;
    for other in [&local.meta, &rem.meta] {
        if other.causal_length == incarnation {
            state.meta.clock.merge(other.clock.clone());
            state.meta.stamp = state.meta.stamp.max(other.stamp);
        }
    }

    let review = review_actions(table, &remote.key, local, &state, remote);
    Ok(MergeOutcome::Applied(Merged {
        state,
        action,
        review,
        conflicts,
    }))
}

/// Column-wise merge of two states of the same live incarnation, into `state` (a copy of local).
fn merge_columns(
    table: &TableDef,
    local: &RowState,
    remote: &RowChange,
    state: &mut RowState,
    conflicts: &mut Vec<Conflict>,
) -> Result<Vec<ColumnWrite>, Unapplicable> {
    let rem = &remote.row;
    let mut writes = Vec::new();
    for (i, def) in table.columns.iter().enumerate() {
        match (&mut state.meta.columns[i], &rem.meta.columns[i]) {
            (ColumnMeta::Lww(ours), ColumnMeta::Lww(theirs)) => {
                let ours_value = local.values[i].value();
                let theirs_value = rem.values[i].value();
                if *theirs > *ours {
                    // An unchanged TOAST value relayed from a non-origin is no information here:
                    // the write that set it will still arrive from its origin, with the value.
                    let Some(value) = theirs_value else { continue };
                    if let (Some(o), Some(t)) = (*ours, *theirs) {
                        if ours_value != Some(value) && !o.seen_by(&rem.meta.clock) {
                            conflicts.push(overwrite(def.name.as_str(), t, o));
                        }
                    }
                    *ours = *theirs;
                    state.values[i] = Cell::Value(value.clone());
                    writes.push(ColumnWrite {
                        column: i,
                        value: value.clone(),
                    });
                } else if let (Some(o), Some(t), Some(value)) = (*ours, *theirs, theirs_value) {
                    if o != t && ours_value != Some(value) && !t.seen_by(&local.meta.clock) {
                        conflicts.push(overwrite(def.name.as_str(), o, t));
                    }
                }
            }
            (ColumnMeta::Delta(ours), ColumnMeta::Delta(theirs)) => {
                let zero = Amount::zero_for(&def.ty);
                let parked = |error: String| Unapplicable {
                    column: def.name.clone(),
                    error,
                };
                let diff = ours.pending(theirs, &zero).ok_or_else(|| {
                    parked(format!(
                        "the contributions to delta column {}.{} cannot be added: they overflow or mix integer and decimal amounts",
                        table.name, def.name
                    ))
                })?;
                if diff.is_zero() {
                    ours.absorb(theirs);
                    continue;
                }
                let current = local.values[i]
                    .value()
                    .ok_or_else(|| parked(format!("{}.{} has no local value", table.name, def.name)))?;
                let value = add_checked(&def.ty, current, &diff)
                    .map_err(|e: ValueError| parked(format!("{}.{}: {e}", table.name, def.name)))?;
                ours.absorb(theirs);
                state.values[i] = Cell::Value(value.clone());
                writes.push(ColumnWrite { column: i, value });
            }
            (ColumnMeta::Review(ours), ColumnMeta::Review(theirs)) => {
                ours.merge(theirs);
                if let Some(winner) = ours.provisional() {
                    if local.values[i].value() != Some(&winner.value) {
                        state.values[i] = Cell::Value(winner.value.clone());
                        writes.push(ColumnWrite {
                            column: i,
                            value: winner.value,
                        });
                    }
                }
            }
            // check_shape proved both sides match the table's policies.
            _ => unreachable!("column metadata kinds were checked against the table"),
        }
    }
    Ok(writes)
}

fn overwrite(column: &str, winner: Version, loser: Version) -> Conflict {
    Conflict {
        kind: ConflictKind::ConcurrentUpdate,
        column: Some(column.to_owned()),
        winner: winner.stamp,
        loser: loser.stamp,
    }
}

/// Why a column of a change cannot be applied here.
struct Unapplicable {
    column: String,
    error: String,
}

fn park(table: &TableDef, remote: &RowChange, why: Unapplicable) -> MergeOutcome {
    let item = ReviewItem::unapplicable(
        &table.name,
        &remote.key,
        Some(&why.column),
        remote.origin,
        remote.stamp,
        remote.seq,
        why.error.clone(),
    );
    MergeOutcome::Parked { item, error: why.error }
}

/// Whether `a` holds writes that `b` has not absorbed.
fn has_unseen_writes(a: &RowMeta, b: &RowMeta) -> bool {
    a.clock.dots.iter().any(|(node, count)| b.clock.get(node) < *count)
}

/// An update of every column of a live row to `values` (another incarnation or lineage took it).
fn rewrite_whole(values: Vec<Value>) -> RowAction {
    RowAction::Update(
        values
            .into_iter()
            .enumerate()
            .map(|(column, value)| ColumnWrite { column, value })
            .collect(),
    )
}

/// The values of a remote live incarnation that replaces ours, or the columns whose values it lacks.
fn adopted_values(table: &TableDef, rem: &RowState) -> Result<Vec<Value>, Vec<String>> {
    let mut values = Vec::with_capacity(table.columns.len());
    let mut missing = Vec::new();
    for (i, def) in table.columns.iter().enumerate() {
        let provisional = match &rem.meta.columns[i] {
            ColumnMeta::Review(reg) => reg.provisional().map(|c| c.value),
            _ => None,
        };
        match provisional.or_else(|| rem.values[i].value().cloned()) {
            Some(v) => values.push(v),
            None => missing.push(def.name.clone()),
        }
    }
    if missing.is_empty() {
        Ok(values)
    } else {
        Err(missing)
    }
}

/// The open concurrent-write items of a row state.
pub fn open_items(table: &TableDef, key: &RowKey, state: &RowState) -> Vec<ReviewItem> {
    if !state.is_alive() {
        return Vec::new();
    }
    let mut items = Vec::new();
    for (def, meta) in table.columns.iter().zip(&state.meta.columns) {
        if let ColumnMeta::Review(reg) = meta {
            if let Some(candidates) = reg.conflict() {
                items.push(ReviewItem::concurrent(&table.name, key, &def.name, candidates));
            }
        }
    }
    for displaced in state
        .meta
        .displaced
        .iter()
        .filter(|d| d.resolved.is_none() && !d.awaits_values())
    {
        items.push(ReviewItem::displaced_insert(&table.name, key, displaced));
    }
    items
}

/// The review-queue changes between two states of a row, plus the closures a change carries.
pub(crate) fn review_actions(
    table: &TableDef,
    key: &RowKey,
    before: &RowState,
    after: &RowState,
    change: &RowChange,
) -> Vec<ReviewAction> {
    let has_review =
        table.inserts == InsertPolicy::Review || table.columns.iter().any(|c| c.policy == ColumnPolicy::Review);
    if !has_review && change.closures.is_empty() {
        return Vec::new();
    }
    diff_items(
        open_items(table, key, before),
        open_items(table, key, after),
        &change.closures,
    )
}

pub(crate) fn diff_items(
    before: Vec<ReviewItem>,
    after: Vec<ReviewItem>,
    closures: &[crate::review::ReviewClosure],
) -> Vec<ReviewAction> {
    let closed: Vec<ReviewItemId> = closures.iter().map(|c| c.item.id).collect();
    let mut actions: Vec<ReviewAction> = closures.iter().cloned().map(ReviewAction::Close).collect();
    for item in &before {
        if !closed.contains(&item.id) && !after.iter().any(|a| a.id == item.id) {
            actions.push(ReviewAction::Withdraw(item.id));
        }
    }
    for item in after {
        if !before.iter().any(|b| b.id == item.id) {
            actions.push(ReviewAction::Open(item));
        }
    }
    actions
}

fn check_shape(table: &TableDef, key: &RowKey, which: &'static str, row: &RowState) -> Result<(), MergeError> {
    if !row.is_alive() {
        return Ok(());
    }
    let expected = table.columns.len();
    for found in [row.values.len(), row.meta.columns.len()] {
        if found != expected {
            return Err(MergeError::ColumnCount {
                which,
                table: table.name.clone(),
                key: key.clone(),
                found,
                expected,
            });
        }
    }
    for (def, meta) in table.columns.iter().zip(&row.meta.columns) {
        if meta.policy() != def.policy {
            return Err(MergeError::PolicyMismatch {
                which,
                table: table.name.clone(),
                column: def.name.clone(),
                found: meta.policy(),
                expected: def.policy,
            });
        }
    }
    Ok(())
}
