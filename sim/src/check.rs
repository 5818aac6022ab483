//! The final checks, once the cluster is quiescent: every node against the others (convergence),
//! every node against the oracle's expected state (delta, lww, review), the rows against their
//! metadata (local writes accounted for), and the conflict log (honest and complete).

use std::collections::BTreeMap;

use accord_engine::{
    Candidate, ColumnMeta, ConflictKind, DeltaLedger, Hlc, NodeId, RowMeta, StableCut, Value, Version,
};

use crate::db::{Db, QueueEntry, WriteId};
use crate::expect::{expect, Expected};
use crate::oracle::{stamp_key, Oracle};
use crate::outcome::{Failure, Invariant};
use crate::table::{NAME, PRICE, SOLD, STOCK};
use crate::world::World;

/// Returns what the oracle expected of the run (all of which the nodes hold).
pub fn final_check(world: &World) -> Result<crate::expect::Expected, Failure> {
    let keys = world.params.keys as usize;
    // A node that left holds the cluster's state as of its leave only.
    let nodes: Vec<&crate::node::Node> = world.nodes.iter().filter(|n| !n.gone).collect();
    for node in &nodes {
        check_node(node.ix, &node.db)?;
        if world.migrates() && node.db.migrated_at.is_none() {
            return fail(
                Invariant::Liveness,
                format!("node {}: the migration never ran", node.ix + 1),
            );
        }
    }
    // A cut is a fact: a tombstone the latest one covers is as good as gone on every node,
    // whether this node has heard of the cut and dropped it yet or not.
    let cut = world
        .nodes
        .iter()
        .filter_map(|n| n.db.collection.cut.as_ref())
        .max_by_key(|c| c.round);
    let first = &nodes[0].db;
    for node in &nodes[1..] {
        converged(first, &node.db, node.ix, cut)?;
    }
    let dbs: Vec<(accord_engine::NodeId, &Db)> = nodes.iter().map(|n| (n.id, &n.db)).collect();
    let origins: Vec<accord_engine::NodeId> = world.nodes.iter().map(|n| n.id).collect();
    crate::verify_check::verified(&dbs, &origins)?;
    let expected = expect(&world.oracle, keys, world.cfg.inserts())?;
    for node in &nodes {
        against_oracle(node.ix, &node.db, &expected)?;
    }
    conflicts(world, &expected)?;
    Ok(expected)
}

fn fail<T>(invariant: Invariant, message: String) -> Result<T, Failure> {
    Err(Failure::new(invariant, message))
}

/// Rows and metadata agree, and nothing is left over.
fn check_node(ix: usize, db: &Db) -> Result<(), Failure> {
    let node = ix + 1;
    for (key, meta) in &db.meta {
        match db.rows.get(key) {
            Some(row) if !meta.meta.is_alive() => {
                return fail(
                    Invariant::LocalWrites,
                    format!(
                        "node {node}: row {key} exists but its metadata says deleted ({:?})",
                        row.values
                    ),
                )
            }
            // Accounted for by the capture (which knows the top-level transaction) or by a merge that
            // found that version settled (and recorded its xmin).
            Some(row) if Some(row.tx) != meta.known_xmin && Some(row.xmin) != meta.known_xmin => {
                return fail(
                    Invariant::LocalWrites,
                    format!(
                        "node {node}: row {key} version {} (transaction {}) was never accounted for by accord \
                         (its metadata accounts for {:?})",
                        row.xmin, row.tx, meta.known_xmin
                    ),
                )
            }
            None if meta.meta.is_alive() => {
                return fail(
                    Invariant::LocalWrites,
                    format!("node {node}: row {key} is gone but its metadata says alive"),
                )
            }
            _ => {}
        }
    }
    if let Some(key) = db.rows.keys().find(|k| !db.meta.contains_key(k)) {
        return fail(
            Invariant::LocalWrites,
            format!("node {node}: row {key} has no metadata"),
        );
    }
    if !db.deferred.is_empty() {
        return fail(
            Invariant::NothingDropped,
            format!("node {node}: {} deferred changes never merged", db.deferred.len()),
        );
    }
    if let Some(item) = db.queue.values().find(|e| matches!(e, QueueEntry::Parked(_))) {
        return fail(
            Invariant::NothingDropped,
            format!("node {node}: parked change {item:?}"),
        );
    }
    Ok(())
}

/// The metadata as a comparable value: the register's internal order depends on merge order, its
/// candidates do not.
#[derive(Debug, PartialEq, Eq)]
enum ColumnView {
    Lww(Option<Version>),
    Delta(DeltaLedger),
    Review(Vec<Candidate>),
}

#[derive(Debug, PartialEq, Eq)]
struct MetaView {
    causal_length: u64,
    clock: Vec<(NodeId, u64)>,
    stamp: Option<Hlc>,
    created: Option<Version>,
    columns: Vec<ColumnView>,
}

fn view(meta: &RowMeta) -> MetaView {
    MetaView {
        causal_length: meta.causal_length,
        clock: meta.clock.dots.iter().map(|(n, c)| (*n, *c)).collect(),
        stamp: meta.stamp,
        created: meta.created,
        columns: meta
            .columns
            .iter()
            .map(|c| match c {
                ColumnMeta::Lww(v) => ColumnView::Lww(*v),
                ColumnMeta::Delta(l) => ColumnView::Delta(l.clone()),
                ColumnMeta::Review(r) => ColumnView::Review(r.candidates()),
            })
            .collect(),
    }
}

fn converged(a: &Db, b: &Db, ix: usize, cut: Option<&StableCut>) -> Result<(), Failure> {
    let node = ix + 1;
    let keys: std::collections::BTreeSet<i64> = a.rows.keys().chain(b.rows.keys()).copied().collect();
    for key in keys {
        let (x, y) = (a.rows.get(&key), b.rows.get(&key));
        if x.map(|r| &r.values) != y.map(|r| &r.values) {
            return fail(
                Invariant::Convergence,
                format!(
                    "row {key}: node 1 holds {:?}, node {node} holds {:?}",
                    x.map(|r| &r.values),
                    y.map(|r| &r.values)
                ),
            );
        }
    }
    let meta_keys: std::collections::BTreeSet<i64> = a.meta.keys().chain(b.meta.keys()).copied().collect();
    for key in meta_keys {
        let held = |db: &Db| {
            db.meta
                .get(&key)
                .filter(|m| StableCut::live(cut, Some(&m.meta)).is_some())
                .map(|m| view(&m.as_shape(&db.table())))
        };
        let (x, y) = (held(a), held(b));
        if x != y {
            return fail(
                Invariant::Convergence,
                format!("metadata of row {key}: node 1 holds {x:?}, node {node} holds {y:?}"),
            );
        }
    }
    if a.queue != b.queue {
        let diff = a
            .queue
            .iter()
            .find(|(id, e)| b.queue.get(id) != Some(e))
            .map(|(id, e)| format!("item {id}: node 1 {e:?}, node {node} {:?}", b.queue.get(id)))
            .or_else(|| {
                b.queue
                    .iter()
                    .find(|(id, _)| !a.queue.contains_key(id))
                    .map(|(id, e)| format!("item {id}: only node {node} has {e:?}"))
            })
            .unwrap_or_default();
        return fail(Invariant::Convergence, format!("review queues differ: {diff}"));
    }
    Ok(())
}

fn against_oracle(ix: usize, db: &Db, expected: &Expected) -> Result<(), Failure> {
    let node = ix + 1;
    let keys: std::collections::BTreeSet<i64> = db.rows.keys().chain(expected.rows.keys()).copied().collect();
    for key in keys {
        let got: Option<Vec<Option<&Value>>> = db.rows.get(&key).map(|r| r.values.iter().map(|c| c.value()).collect());
        let Some(want) = expected.rows.get(&key) else {
            return fail(
                Invariant::Convergence,
                format!("node {node}: row {key} should be deleted (or never inserted) but holds {got:?}"),
            );
        };
        let Some(got) = got else {
            return fail(
                Invariant::Convergence,
                format!("node {node}: row {key} is missing; expected {want:?}"),
            );
        };
        for (column, invariant, label) in [
            (STOCK, Invariant::Delta, "stock (delta)"),
            (NAME, Invariant::Lww, "name (lww)"),
            (PRICE, Invariant::Review, "price (review, provisional winner)"),
            (SOLD, Invariant::Delta, "sold (delta, added by the migration)"),
        ] {
            if column >= got.len() {
                if db.migrated_at.is_some() || column != SOLD {
                    return fail(invariant, format!("node {node}: row {key} has no {label}: {got:?}"));
                }
                continue;
            }
            if got[column] != Some(&want[column]) {
                return fail(
                    invariant,
                    format!(
                        "node {node}: row {key} {label} is {:?}, the history says {}",
                        got[column], want[column]
                    ),
                );
            }
        }
    }
    for (id, want) in &expected.queue {
        match db.queue.get(id) {
            Some(got) if got == want => {}
            got => {
                return fail(
                    Invariant::Review,
                    format!("node {node}: review item {id} should be {want:?}, is {got:?}"),
                )
            }
        }
    }
    if let Some((id, e)) = db.queue.iter().find(|(id, _)| !expected.queue.contains_key(id)) {
        return fail(
            Invariant::Review,
            format!("node {node}: review item {id} should not exist: {e:?}"),
        );
    }
    Ok(())
}

/// The conflict log is honest (every entry is a truly concurrent meeting of writes of that row)
/// and complete enough (every overwritten concurrent name, every meeting of inserts, is logged on
/// some node).
fn conflicts(world: &World, expected: &Expected) -> Result<(), Failure> {
    let oracle: &Oracle = &world.oracle;
    let by_stamp: BTreeMap<(u64, u32, u32), WriteId> = oracle
        .writes
        .iter()
        .enumerate()
        .filter_map(|(i, w)| w.stamp.map(|s| (stamp_key(s), i)))
        .collect();
    let write = |key: i64, s: Hlc, node: usize| -> Result<WriteId, Failure> {
        match by_stamp.get(&stamp_key(s)) {
            Some(&i) if oracle.writes[i].key == key => Ok(i),
            _ => fail(
                Invariant::NothingDropped,
                format!("node {node}: the conflict log names {s} on row {key}, which is no write to that row"),
            ),
        }
    };
    let mut logged_losers = std::collections::BTreeSet::new();
    let mut logged_inserts = std::collections::BTreeSet::new();
    for node in &world.nodes {
        let n = node.ix + 1;
        for (key, c) in &node.db.conflicts {
            let (w, l) = (write(*key, c.winner, n)?, write(*key, c.loser, n)?);
            let (ww, lw) = (&oracle.writes[w], &oracle.writes[l]);
            let concurrent = !ww.saw(lw) && !lw.saw(ww);
            let honest = match c.kind {
                ConflictKind::ConcurrentUpdate => {
                    logged_losers.insert((*key, stamp_key(c.loser)));
                    concurrent
                        && ww.name.is_some()
                        && lw.name.is_some()
                        && ww.causal_length == lw.causal_length
                        && stamp_key(c.winner) > stamp_key(c.loser)
                }
                // Merged, or (`inserts=review`) the earlier kept the row.
                ConflictKind::InsertInsert | ConflictKind::InsertDisplaced => {
                    logged_inserts.insert(*key);
                    concurrent
                        && ww.kind == accord_engine::ChangeKind::Insert
                        && lw.kind == accord_engine::ChangeKind::Insert
                        && ww.causal_length == lw.causal_length
                        && (c.kind == ConflictKind::InsertInsert || stamp_key(c.winner) < stamp_key(c.loser))
                }
                ConflictKind::DeleteWon => true,
            };
            if !honest {
                return fail(
                    Invariant::NothingDropped,
                    format!(
                        "node {n}: conflict log entry {:?} on row {key} ({} beat {}) is not a concurrent meeting of such writes",
                        c.kind, c.winner, c.loser
                    ),
                );
            }
        }
    }
    for (key, loser) in &expected.name_losers {
        if !logged_losers.contains(&(*key, stamp_key(*loser))) {
            return fail(
                Invariant::NothingDropped,
                format!("row {key}: the name written at {loser} lost to a concurrent write, and no node logged it"),
            );
        }
    }
    for key in &expected.insert_races {
        if !logged_inserts.contains(key) {
            return fail(
                Invariant::NothingDropped,
                format!("row {key}: two inserts of the key met, and no node logged it"),
            );
        }
    }
    Ok(())
}
