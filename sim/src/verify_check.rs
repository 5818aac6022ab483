//! `accord verify`'s rules on the simulated nodes once they are quiescent: nodes the other checks
//! found converged must verify clean by the engine's own digests, descent and comparison (the
//! canonical digest must not depend on the order a node merged in); and a row changed on one node
//! behind accord's back must be found, alone, and repaired to the row the others replicated.
//!
//! At quiescence every node applied everything, so the cut covers every write and the rounds are
//! not modelled: the nodes have no snapshots to take. A row's standing comes from the engine's
//! rules as the service's read applies them (`stored`, `standing`, `as_good_as_absent`).

use std::collections::BTreeMap;

use accord_engine::{
    as_good_as_absent, compare_summaries, repair_plan, row_digest, rows_by_key, standing, stored, verify::column_names,
    HeldRow, NodeId, RepairPlan, RowSummary, RowVersion, Standing, TableSummaries, VerifyCut,
};

use crate::db::Db;
use crate::outcome::{Failure, Invariant};
use crate::table::TABLE;

/// A node's rows as a careful read holds them (settled tombstones left out, as it leaves them).
fn held_rows(db: &Db, cut: &VerifyCut) -> Vec<(u64, HeldRow)> {
    let table = db.table();
    let names = column_names(&table);
    let keys: std::collections::BTreeSet<i64> = db.rows.keys().chain(db.meta.keys()).copied().collect();
    let mut out = Vec::new();
    for key in keys {
        let stored_meta = db.meta.get(&key);
        let meta = stored_meta.map(|m| m.as_shape(&table));
        let row = db.rows.get(&key);
        // As the service reads a row's version beside its metadata; at quiescence every write
        // committed before any probe.
        let version = match row {
            None => RowVersion::Absent,
            Some(r) if stored_meta.is_some_and(|m| m.known_xmin == Some(r.tx) || m.known_xmin == Some(r.xmin)) => {
                RowVersion::Accounted
            }
            Some(_) => RowVersion::Unaccounted {
                committed_before_probe: true,
            },
        };
        let standing = standing(meta.as_ref(), stored(version, meta.as_ref(), false), cut);
        if as_good_as_absent(row.is_some(), standing) {
            continue;
        }
        let values: Option<BTreeMap<String, Option<String>>> = row.map(|r| {
            names
                .iter()
                .zip(&r.values)
                .map(|(name, cell)| (name.clone(), cell.value().and_then(|v| v.to_pg_text())))
                .collect()
        });
        // `store::key_text` of a one-bigint key.
        let key_text = format!("[{key}]");
        let digest = row_digest(
            TABLE,
            &key_text,
            values.as_ref(),
            meta.as_ref().map(|m| (m, names.as_slice())),
        );
        out.push((
            spread(key as u64),
            HeldRow {
                key: key_text,
                values,
                meta,
                columns: names.clone(),
                xmin: row.map(|r| r.xmin.to_string()),
                standing,
                digest,
            },
        ));
    }
    out
}

/// Spreads keys over the key-hash space (nodes hash in PostgreSQL; any spread does here).
fn spread(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

fn summaries(rows: &[(u64, HeldRow)]) -> TableSummaries {
    TableSummaries::new(
        rows.iter()
            .map(|(hash, r)| RowSummary {
                key_hash: *hash,
                key: r.key.clone(),
                digest: r.digest,
                standing: r.standing,
                present: r.values.is_some(),
            })
            .collect(),
    )
}

/// The keys a verification of these nodes reports, as the coordinator's descent finds them.
fn differing(nodes: &[(NodeId, TableSummaries)]) -> Vec<String> {
    compare_summaries(TABLE, nodes)
        .0
        .differ
        .into_iter()
        .map(|d| d.key)
        .collect()
}

/// Verifies the live nodes, then plants a change on the second and verifies and repairs it.
/// `origins`: every node that ever wrote, a node that left included.
pub fn verified(dbs: &[(NodeId, &Db)], origins: &[NodeId]) -> Result<(), Failure> {
    // Quiescent: every node applied every change, so the cut covers every origin's writes.
    let cut = VerifyCut::of(&[origins.iter().map(|n| (*n, u64::MAX)).collect()]);
    let held: Vec<(NodeId, Vec<(u64, HeldRow)>)> = dbs.iter().map(|(n, db)| (*n, held_rows(db, &cut))).collect();
    let nodes: Vec<(NodeId, TableSummaries)> = held.iter().map(|(n, rows)| (*n, summaries(rows))).collect();
    let found = differing(&nodes);
    if !found.is_empty() {
        return Err(Failure::new(
            Invariant::Convergence,
            format!("verify reports keys {found:?} of converged nodes as differing"),
        ));
    }
    if held.len() < 2 {
        return Ok(());
    }
    // Behind accord's back on the second node: a row's first column changed, its metadata not.
    let mut planted = held.clone();
    let Some((_, row)) = planted[1].1.iter_mut().find(|(_, r)| r.values.is_some()) else {
        return Ok(());
    };
    let names = row.columns.clone();
    let mut values = row.values.take().unwrap_or_default();
    values.insert(names[0].clone(), Some("changed behind accord's back".into()));
    row.standing = Standing::Uncaptured;
    row.digest = row_digest(
        TABLE,
        &row.key,
        Some(&values),
        row.meta.as_ref().map(|m| (m, names.as_slice())),
    );
    row.values = Some(values);
    let key = row.key.clone();
    let nodes: Vec<(NodeId, TableSummaries)> = planted.iter().map(|(n, rows)| (*n, summaries(rows))).collect();
    let found = differing(&nodes);
    if found != [key.clone()] {
        return Err(Failure::new(
            Invariant::Convergence,
            format!("verify reports {found:?} for the one key {key} changed behind accord's back"),
        ));
    }
    let rows: Vec<(NodeId, Vec<HeldRow>)> = planted
        .iter()
        .map(|(n, rows)| {
            (
                *n,
                rows.iter()
                    .filter(|(_, r)| r.key == key)
                    .map(|(_, r)| r.clone())
                    .collect(),
            )
        })
        .collect();
    let by_key = rows_by_key(&rows, |r| &r.key);
    let replicated = held[0].1.iter().find(|(_, r)| r.key == key).map(|(_, r)| r);
    match repair_plan(&by_key[key.as_str()]) {
        RepairPlan::Write(writes)
            if writes.len() == 1
                && writes[0].0 == planted[1].0
                && writes[0].1.values == replicated.and_then(|r| r.values.clone())
                && writes[0].1.meta == replicated.and_then(|r| r.meta.clone()) =>
        {
            Ok(())
        }
        other => Err(Failure::new(
            Invariant::Convergence,
            format!("the repair of {key}, changed behind accord's back on one node, is {other:?}"),
        )),
    }
}
