//! What the cluster must hold at the end, derived from the history of writes alone (the oracle's
//! seen-vectors), never from the engine's metadata: the rules of PRODUCT.md restated over
//! "which writes had each writer seen".
//!
//! - Causal length of a write: the greatest among the writes it saw, moved on by an insert to the
//!   next odd number and by a delete to the next even one. The greatest overall decides whether
//!   the row lives; the live incarnation is the writes that share it.
//! - stock: the sum of every live write's delta (an insert's value is a delta from zero).
//! - name: the value of the live name-write with the greatest (physical, logical, node).
//! - price: the maximal live price-writes (seen by no other); two or more with differing values
//!   are an open item, and the value is the one with the greatest stamp.
//! - A price update that saw two or more concurrent differing maximal price-writes of its
//!   incarnation closes their item: resolved if the writer resolved it, superseded otherwise;
//!   of concurrent closers the greatest stamp is recorded.
//! - Two inserts of one key (`--review-inserts`): each write of a live incarnation belongs to the
//!   *lineage* of the earliest (least stamp) insert of its incarnation its writer had seen (an
//!   insert to its own). The row is the earliest lineage's writes alone, by the rules above; every
//!   other lineage is an open displaced-insert item holding its own writes' name, price and stock
//!   by the same rules, and a price item or closure concerns the writes of one lineage only.
//! - Tombstone collection: a *fresh* insert (its writer held nothing of the row: a tombstone
//!   every node had was collected) starts from causal length 0, and every write it had seen is
//!   over for good (superseded). A write that saw a fresh insert goes by what came after it; a
//!   write that did not (its node had not heard of the collection yet) still counts from the
//!   tombstone, and the greater causal length wins the row as always.

use std::collections::BTreeMap;

use accord_engine::{Candidate, ChangeKind, ClosureKind, Hlc, InsertPolicy, NodeId, ReviewItem, ReviewItemId, Value};

use crate::db::{QueueEntry, WriteId};
use crate::oracle::{stamp_key, Oracle, WriteRec};
use crate::outcome::{Failure, Invariant};
use crate::table::{row_key, PRICE_COLUMN, TABLE};

#[derive(Debug, Clone, Default)]
pub struct Expected {
    /// Live rows: name, stock, price, and sold (`--migrate`; 0 where never written). A key not
    /// here has no row.
    pub rows: BTreeMap<i64, [Value; 4]>,
    pub queue: BTreeMap<ReviewItemId, QueueEntry>,
    /// Name writes of a live incarnation that lost to a concurrent write: each must show up as
    /// the loser of a logged conflict somewhere.
    pub name_losers: Vec<(i64, Hlc)>,
    /// Rows whose live incarnation began with two or more concurrent inserts.
    pub insert_races: Vec<i64>,
    /// Fresh inserts that lost their row to a concurrent re-insert numbered from a tombstone.
    pub inserts_beaten_across_collection: u64,
}

fn stamp(w: &WriteRec) -> Result<Hlc, Failure> {
    w.stamp.ok_or_else(|| {
        Failure::new(
            Invariant::NothingDropped,
            format!(
                "write {} of node {} to row {} was never captured",
                w.idx,
                w.node + 1,
                w.key
            ),
        )
    })
}

/// The writes of a set that no other write of the set had seen.
fn maximal(writes: &[WriteRec], set: &[WriteId]) -> Vec<WriteId> {
    set.iter()
        .copied()
        .filter(|&p| !set.iter().any(|&q| q != p && writes[q].saw(&writes[p])))
        .collect()
}

fn item_of(writes: &[WriteRec], key: i64, heads: &[WriteId]) -> Result<Option<ReviewItem>, Failure> {
    let mut candidates = Vec::with_capacity(heads.len());
    for &h in heads {
        let value = writes[h].price.clone().unwrap_or(Value::Null);
        candidates.push(Candidate {
            value,
            stamp: stamp(&writes[h])?,
        });
    }
    candidates.sort_by_key(|c| stamp_key(c.stamp));
    let differ = candidates.iter().any(|c| c.value != candidates[0].value);
    Ok((candidates.len() >= 2 && differ)
        .then(|| ReviewItem::concurrent(TABLE, &row_key(key), PRICE_COLUMN, candidates)))
}

pub fn expect(oracle: &Oracle, keys: usize, inserts: InsertPolicy) -> Result<Expected, Failure> {
    let writes = &oracle.writes;
    let n = oracle.nodes();
    // [origin][key] → the origin's writes (all, and those that set the price), in order.
    let mut all: Vec<Vec<Vec<WriteId>>> = vec![vec![Vec::new(); keys]; n];
    let mut prices: Vec<Vec<Vec<WriteId>>> = vec![vec![Vec::new(); keys]; n];
    let mut cl = vec![0u64; writes.len()];
    let mut closures: BTreeMap<ReviewItemId, (ReviewItem, ClosureKind)> = BTreeMap::new();
    // [key] → the fresh inserts so far, and the writes any fresh insert had seen.
    let mut fresh: Vec<Vec<WriteId>> = vec![Vec::new(); keys];
    let mut superseded = vec![false; writes.len()];
    // The insert whose lineage each write of a live incarnation belongs to (`--review-inserts`;
    // with merged inserts every write of an incarnation is one lineage, `None`).
    let mut lineage: Vec<Option<WriteId>> = vec![None; writes.len()];
    // Per displaced lineage (its insert), the writes that resolved its item.
    let mut resolvers: BTreeMap<WriteId, Vec<WriteId>> = BTreeMap::new();

    for (i, w) in writes.iter().enumerate() {
        let k = w.key as usize;
        // The fresh inserts this write had seen (itself included): what they saw is over for it.
        let saw_fresh: Vec<WriteId> = fresh[k]
            .iter()
            .copied()
            .filter(|&f| w.saw(&writes[f]))
            .chain(w.fresh.then_some(i))
            .collect();
        let over = |p: WriteId| saw_fresh.iter().any(|&f| f != p && writes[f].saw(&writes[p]));
        let base = (0..n)
            .filter(|&o| w.seen[o] > 0)
            .map(|o| all[o][k][w.seen[o] as usize - 1])
            .filter(|&p| !over(p))
            .map(|p| cl[p])
            .max()
            .unwrap_or(0);
        cl[i] = match w.kind {
            ChangeKind::Insert => base + if base % 2 == 1 { 2 } else { 1 },
            ChangeKind::Delete => base + if base % 2 == 1 { 1 } else { 2 },
            ChangeKind::Update => base,
        };
        if cl[i] != w.causal_length {
            return Err(Failure::new(
                Invariant::Convergence,
                format!(
                    "write {} of node {} to row {} ({:?}) has causal length {} in the engine, {} from what its writer had seen",
                    w.idx,
                    w.node + 1,
                    w.key,
                    w.kind,
                    w.causal_length,
                    cl[i]
                ),
            ));
        }
        if inserts == InsertPolicy::Review && cl[i] % 2 == 1 {
            lineage[i] = match w.kind {
                ChangeKind::Insert => Some(i),
                _ => {
                    let mut earliest: Option<(WriteId, (u64, u32, u32))> = None;
                    for o in 0..n {
                        for &p in &all[o][k][..w.seen[o] as usize] {
                            if writes[p].kind == ChangeKind::Insert && cl[p] == cl[i] && !over(p) {
                                let at = stamp_key(stamp(&writes[p])?);
                                if earliest.is_none_or(|(_, e)| at < e) {
                                    earliest = Some((p, at));
                                }
                            }
                        }
                    }
                    match earliest {
                        Some((p, _)) => Some(p),
                        None => {
                            return Err(Failure::new(
                                Invariant::Convergence,
                                format!(
                                    "write {} of node {} to row {} updates incarnation {} without having seen an insert of it",
                                    w.idx,
                                    w.node + 1,
                                    w.key,
                                    cl[i]
                                ),
                            ))
                        }
                    }
                }
            };
        }
        all[w.node][k].push(i);
        if w.fresh {
            for o in 0..n {
                for &p in &all[o][k][..w.seen[o] as usize] {
                    superseded[p] = true;
                }
            }
            fresh[k].push(i);
        }
        // A reviewer's resolution of a displaced insert it saw open (`--review-inserts`): the
        // other lineages of its incarnation it had seen, none of whose resolutions it had seen.
        let mut resolving_price = w.resolving;
        if let (Some(id), Some(own), ChangeKind::Update) = (w.resolving, lineage[i], w.kind) {
            let mut others = std::collections::BTreeSet::new();
            for o in 0..n {
                for &p in &all[o][k][..w.seen[o] as usize] {
                    if let Some(l) = lineage[p].filter(|&l| l != own && cl[p] == cl[i] && !over(p)) {
                        others.insert(l);
                    }
                }
            }
            for l in others {
                if resolvers
                    .get(&l)
                    .is_some_and(|rs| rs.iter().any(|&r| w.saw(&writes[r])))
                {
                    continue;
                }
                let item = displaced_item(writes, &all, n, k, l, &|p| {
                    cl[p] == cl[i] && !over(p) && lineage[p] == Some(l) && w.saw(&writes[p])
                })?;
                if item.id != id {
                    continue;
                }
                resolving_price = None;
                resolvers.entry(l).or_default().push(i);
                let s = stamp(w)?;
                let kind = ClosureKind::Resolved {
                    by: NodeId(w.node as u32 + 1),
                    stamp: s,
                    // What the capture says of a resolution that wrote a value (the workload's
                    // always writes a new price).
                    value: Value::text("the row written anew by the reviewer"),
                };
                record_closure(&mut closures, item, kind);
                break;
            }
        }
        if w.price.is_none() {
            continue;
        }
        if w.kind == ChangeKind::Update {
            // The maximal price-writes of its incarnation that the writer had seen.
            let mut seen = Vec::new();
            for (o, list) in prices.iter().enumerate() {
                let list = &list[k];
                let upto = list.partition_point(|&p| writes[p].idx <= w.seen[o]);
                if let Some(&p) = upto.checked_sub(1).and_then(|j| list.get(j)) {
                    // (An origin's lineage only ever moves to an earlier insert, so if its last
                    // price-write the writer saw is of another lineage, none of its are of this.)
                    if cl[p] == cl[i] && !over(p) && lineage[p] == lineage[i] {
                        seen.push(p);
                    }
                }
            }
            let before = item_of(writes, w.key, &maximal(writes, &seen))?;
            match (&before, resolving_price) {
                (Some(item), Some(resolving)) if item.id != resolving => {
                    return Err(Failure::new(
                        Invariant::Review,
                        format!(
                            "node {} resolved item {resolving} on row {}, but the writes it had seen make item {}",
                            w.node + 1,
                            w.key,
                            item.id
                        ),
                    ))
                }
                (None, Some(resolving)) => {
                    return Err(Failure::new(
                        Invariant::Review,
                        format!(
                            "node {} resolved item {resolving} on row {}, but the writes it had seen make no item",
                            w.node + 1,
                            w.key
                        ),
                    ))
                }
                _ => {}
            }
            if let Some(item) = before {
                let s = stamp(w)?;
                let value = w.price.clone().unwrap_or(Value::Null);
                let kind = if resolving_price == Some(item.id) {
                    ClosureKind::Resolved {
                        by: NodeId(w.node as u32 + 1),
                        stamp: s,
                        value,
                    }
                } else {
                    ClosureKind::Superseded { stamp: s, value }
                };
                record_closure(&mut closures, item, kind);
            }
        }
        prices[w.node][k].push(i);
    }

    let mut expected = Expected {
        queue: closures
            .into_iter()
            .map(|(id, (item, kind))| (id, QueueEntry::Closed(item, kind)))
            .collect(),
        ..Expected::default()
    };
    // Indexed by origin then key, so a range over keys reads clearest here.
    #[allow(clippy::needless_range_loop)]
    for k in 0..keys {
        let current = |i: &WriteId| !superseded[*i];
        let Some(last) = (0..n)
            .flat_map(|o| all[o][k].iter().filter(|i| current(i)).map(|&i| cl[i]))
            .max()
        else {
            continue;
        };
        let live: Vec<WriteId> = (0..n)
            .flat_map(|o| all[o][k].iter().copied())
            .filter(|&i| current(&i) && cl[i] == last)
            .collect();
        // The accepted window: a fresh insert that lost the row to a concurrent re-insert
        // numbered from the tombstone, which had not seen it.
        let recollected = |f: WriteId| writes[f].seen.iter().any(|&c| c > 0);
        let from_tombstone = live
            .iter()
            .any(|&l| writes[l].kind == ChangeKind::Insert && !writes[l].fresh);
        if from_tombstone {
            expected.inserts_beaten_across_collection += fresh[k]
                .iter()
                .filter(|&&f| {
                    recollected(f) && current(&f) && cl[f] < last && !live.iter().any(|&l| writes[l].saw(&writes[f]))
                })
                .count() as u64;
        }
        if last % 2 == 0 {
            continue;
        }
        if live.iter().filter(|&&i| writes[i].kind == ChangeKind::Insert).count() >= 2 {
            expected.insert_races.push(k as i64);
        }
        // The lineages of the live incarnation, earliest insert first (one, `None`, when merged).
        let mut lineages: BTreeMap<Option<(u64, u32, u32)>, Vec<WriteId>> = BTreeMap::new();
        for &i in &live {
            let at = match lineage[i] {
                Some(insert) => Some(stamp_key(stamp(&writes[insert])?)),
                None => None,
            };
            lineages.entry(at).or_default().push(i);
        }
        for (position, members) in lineages.values().enumerate() {
            let heads = lineage_heads(writes, &all, n, k, &|i| {
                current(&i) && cl[i] == last && members.contains(&i)
            })?;
            if position == 0 {
                for &h in &heads.name_heads {
                    if h != heads.name {
                        expected.name_losers.push((k as i64, stamp(&writes[h])?));
                    }
                }
                if let Some(item) = item_of(writes, k as i64, &heads.price_heads)? {
                    expected.queue.insert(item.id, QueueEntry::Open(item));
                }
                expected.rows.insert(
                    k as i64,
                    [
                        writes[heads.name].name.clone().unwrap_or(Value::Null),
                        Value::Int(members.iter().map(|&i| writes[i].stock).sum()),
                        writes[heads.price].price.clone().unwrap_or(Value::Null),
                        Value::Int(members.iter().map(|&i| writes[i].sold).sum()),
                    ],
                );
            } else {
                let Some(insert) = lineage[members[0]] else {
                    unreachable!("only the first lineage is unnamed, and it is the only one then")
                };
                let resolved = resolvers
                    .get(&insert)
                    .is_some_and(|rs| rs.iter().any(|&r| current(&r) && cl[r] == last));
                if !resolved {
                    let item = displaced_item(writes, &all, n, k, insert, &|i| members.contains(&i))?;
                    expected.queue.insert(item.id, QueueEntry::Open(item));
                }
            }
        }
    }
    Ok(expected)
}

/// Records a closure of `item`: of concurrent closers, every node keeps the greatest stamp.
fn record_closure(
    closures: &mut BTreeMap<ReviewItemId, (ReviewItem, ClosureKind)>,
    item: ReviewItem,
    kind: ClosureKind,
) {
    let newer = closures
        .get(&item.id)
        .is_none_or(|(_, recorded)| stamp_key(kind.stamp()) > stamp_key(recorded.stamp()));
    if newer {
        closures.insert(item.id, (item, kind));
    }
}

/// The review item of the displaced lineage begun by `insert`, made of the writes `member` picks.
fn displaced_item(
    writes: &[WriteRec],
    all: &[Vec<Vec<WriteId>>],
    n: usize,
    k: usize,
    insert: WriteId,
    member: &dyn Fn(WriteId) -> bool,
) -> Result<ReviewItem, Failure> {
    let heads = lineage_heads(writes, all, n, k, member)?;
    let stock: i64 = (0..n)
        .flat_map(|o| all[o][k].iter().copied())
        .filter(|&i| member(i))
        .map(|i| writes[i].stock)
        .sum();
    // By column name, as the item lists them.
    let values = vec![
        ("name".to_owned(), writes[heads.name].name.clone()),
        (PRICE_COLUMN.to_owned(), writes[heads.price].price.clone()),
        ("stock".to_owned(), Some(Value::Int(stock))),
    ];
    Ok(ReviewItem::displaced_insert_of(
        TABLE,
        &row_key(k as i64),
        stamp(&writes[insert])?,
        values,
    ))
}

/// The writes that decide a lineage's columns: per origin its last write of the column among
/// `member`, and of those the ones no other saw (heads); `name` and `price` are the heads with
/// the greatest stamp (an `lww` column's value, a `review` column's provisional winner).
struct LineageHeads {
    name_heads: Vec<WriteId>,
    price_heads: Vec<WriteId>,
    name: WriteId,
    price: WriteId,
}

fn lineage_heads(
    writes: &[WriteRec],
    all: &[Vec<Vec<WriteId>>],
    n: usize,
    k: usize,
    member: &dyn Fn(WriteId) -> bool,
) -> Result<LineageHeads, Failure> {
    let last_of = |pick: &dyn Fn(&WriteRec) -> bool| -> Vec<WriteId> {
        (0..n)
            .filter_map(|o| all[o][k].iter().rev().copied().find(|&i| member(i) && pick(&writes[i])))
            .collect()
    };
    let name_heads = maximal(writes, &last_of(&|w| w.name.is_some()));
    let price_heads = maximal(writes, &last_of(&|w| w.price.is_some()));
    let greatest = |heads: &[WriteId]| -> Result<Option<WriteId>, Failure> {
        let mut best: Option<(WriteId, Hlc)> = None;
        for &h in heads {
            let s = stamp(&writes[h])?;
            if best.is_none_or(|(_, b)| stamp_key(s) > stamp_key(b)) {
                best = Some((h, s));
            }
        }
        Ok(best.map(|(h, _)| h))
    };
    let (Some(name), Some(price)) = (greatest(&name_heads)?, greatest(&price_heads)?) else {
        return Err(Failure::new(
            Invariant::Convergence,
            format!("row {k}: a live incarnation (or lineage) without an insert"),
        ));
    };
    Ok(LineageHeads {
        name_heads,
        price_heads,
        name,
        price,
    })
}
