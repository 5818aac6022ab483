//! Property tests of the merge: random histories of writes on 2–5 replicas, with concurrency,
//! delivered to every replica in random orders with duplicates, must converge and satisfy the
//! invariants of PRODUCT.md. The expected results come from an independent oracle that reasons over
//! explicit "which writes had this writer seen" sets, not over the engine's clocks and registers.

use std::collections::{BTreeMap, BTreeSet};
use std::str::FromStr;

use accord_engine::{
    capture, merge, open_items, Cell, ChangeKind, ClosureKind, ColumnDef, ColumnPolicy, ColumnType, Hlc, HlcClock,
    KeyColumn, MergeOutcome, NodeId, ReviewAction, ReviewItem, ReviewItemId, RowAction, RowChange, RowKey, RowState,
    TableDef, Value,
};
use accord_engine::{Candidate, CapturedChange};
use bigdecimal::BigDecimal;
use proptest::prelude::*;

const NAME: usize = 0; // lww
const STOCK: usize = 1; // delta bigint
const BALANCE: usize = 2; // delta numeric(20,4)
const PRICE: usize = 3; // review
const PRICES: [&str; 3] = ["10", "20", "30"];
const MAX_OFFSET: u64 = 1_000;

fn table() -> TableDef {
    let col = |name: &str, ty, policy| ColumnDef {
        name: name.into(),
        ty,
        policy,
    };
    TableDef::new(
        "shop.products",
        vec![KeyColumn {
            name: "id".into(),
            ty: ColumnType::BigInt,
        }],
        vec![
            col("name", ColumnType::Other("text".into()), ColumnPolicy::Lww),
            col("stock", ColumnType::BigInt, ColumnPolicy::Delta),
            col(
                "balance",
                ColumnType::Numeric {
                    precision: Some(20),
                    scale: Some(4),
                },
                ColumnPolicy::Delta,
            ),
            col("price", ColumnType::Other("text".into()), ColumnPolicy::Review),
        ],
    )
    .expect("the test table is valid")
}

fn key(k: u8) -> RowKey {
    RowKey(vec![Value::Int(i64::from(k))])
}

fn dec(cents: i64) -> BigDecimal {
    BigDecimal::new(cents.into(), 2)
}

#[derive(Debug, Clone)]
enum Action {
    Insert {
        stock: i64,
        balance: i64,
        price: usize,
    },
    Update {
        name: bool,
        stock: i64,
        balance: i64,
        price: Option<usize>,
    },
    Delete,
    /// Resolve the open item on `price`: pick a candidate (index modulo their number), or give a
    /// value of one's own when `pick` is beyond them.
    Resolve {
        pick: usize,
    },
}

#[derive(Debug, Clone)]
enum Op {
    Write { replica: usize, key: u8, action: Action },
    Deliver { pick: usize, keep_duplicate: bool },
    Tick { micros: u64 },
}

#[derive(Debug, Clone, Copy)]
struct Mix {
    deletes: u32,
    delivers: u32,
    duplicates: f64,
    keys: u8,
}

fn action(mix: Mix) -> impl Strategy<Value = Action> {
    prop_oneof![
        3 => (-5i64..20, -500i64..500, 0..PRICES.len()).prop_map(|(stock, balance, price)| Action::Insert { stock, balance, price }),
        8 => (any::<bool>(), -5i64..6, -300i64..300, proptest::option::of(0..PRICES.len()))
            .prop_map(|(name, stock, balance, price)| Action::Update { name, stock, balance, price }),
        mix.deletes => Just(Action::Delete),
        2 => (0usize..4).prop_map(|pick| Action::Resolve { pick }),
    ]
}

fn ops(mix: Mix, replicas: usize) -> impl Strategy<Value = Vec<Op>> {
    let op = prop_oneof![
        6 => (0..replicas, 0..mix.keys, action(mix)).prop_map(|(replica, key, action)| Op::Write { replica, key, action }),
        mix.delivers => (any::<usize>(), proptest::bool::weighted(mix.duplicates))
            .prop_map(|(pick, keep_duplicate)| Op::Deliver { pick, keep_duplicate }),
        2 => (0u64..400).prop_map(|micros| Op::Tick { micros }),
    ];
    proptest::collection::vec(op, 1..120)
}

/// A write as the oracle sees it.
#[derive(Debug, Clone)]
struct Write {
    replica: usize,
    key: u8,
    kind: ChangeKind,
    stamp: Hlc,
    causal_length: u64,
    /// Writes to the same row the writer had absorbed before this one.
    seen: BTreeSet<usize>,
    name: Option<Value>,
    stock: i64,
    balance: BigDecimal,
    price: Option<Value>,
    resolving: Option<ReviewItemId>,
}

#[derive(Debug, Clone, PartialEq)]
enum QueueEntry {
    Open(ReviewItem),
    Closed(ReviewItem, ClosureKind),
}

struct Replica {
    clock: HlcClock,
    skew: u64,
    rows: BTreeMap<u8, RowState>,
    seen: BTreeMap<u8, BTreeSet<usize>>,
    queue: BTreeMap<ReviewItemId, QueueEntry>,
    greatest_merged: Option<Hlc>,
    last_local: Option<Hlc>,
    seq: u64,
}

struct Pending {
    target: usize,
    write: usize,
    change: RowChange,
}

struct Cluster {
    table: TableDef,
    now: u64,
    replicas: Vec<Replica>,
    writes: Vec<Write>,
    pending: Vec<Pending>,
}

impl Cluster {
    fn new(n: usize, skews: &[u64]) -> Self {
        let replicas = (0..n)
            .map(|i| Replica {
                clock: HlcClock::new(NodeId(i as u32 + 1), MAX_OFFSET),
                skew: skews[i % skews.len()],
                rows: BTreeMap::new(),
                seen: BTreeMap::new(),
                queue: BTreeMap::new(),
                greatest_merged: None,
                last_local: None,
                seq: 0,
            })
            .collect();
        Cluster {
            table: table(),
            now: 1_000_000,
            replicas,
            writes: Vec::new(),
            pending: Vec::new(),
        }
    }

    fn run(&mut self, ops: &[Op]) -> Result<(), TestCaseError> {
        for op in ops {
            match op {
                Op::Write { replica, key, action } => self.write(*replica, *key, action)?,
                Op::Deliver { pick, keep_duplicate } => {
                    if !self.pending.is_empty() {
                        let i = pick % self.pending.len();
                        self.deliver(i, *keep_duplicate)?;
                    }
                }
                Op::Tick { micros } => self.now += micros,
            }
        }
        Ok(())
    }

    /// Delivers everything still in flight, in an order drawn from `seed`, some of it twice.
    fn flush(&mut self, mut seed: u64) -> Result<(), TestCaseError> {
        while !self.pending.is_empty() {
            seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            let i = (seed >> 33) as usize % self.pending.len();
            self.deliver(i, (seed >> 20).is_multiple_of(7))?;
        }
        Ok(())
    }

    fn physical(&self, replica: usize) -> u64 {
        self.now + self.replicas[replica].skew
    }

    fn write(&mut self, r: usize, k: u8, action: &Action) -> Result<(), TestCaseError> {
        let table = self.table.clone();
        let id = self.writes.len();
        let local = self.replicas[r].rows.get(&k).cloned();
        let alive = local.as_ref().is_some_and(|s| s.is_alive());
        let old: Option<Vec<Cell>> = local.as_ref().filter(|s| s.is_alive()).map(|s| s.values.clone());
        let old_value = |i: usize| old.as_ref().and_then(|o| o[i].value().cloned());
        let fresh_name = Value::text(format!("name-{id}"));

        let mut resolving = None;
        let (kind, new, stock, balance) = match (action, alive) {
            (Action::Insert { stock, balance, price }, false)
            | (
                Action::Update {
                    stock,
                    balance,
                    price: Some(price),
                    ..
                },
                false,
            ) => {
                let new = vec![
                    fresh_name.clone(),
                    Value::Int(*stock),
                    Value::Numeric(dec(*balance)),
                    Value::text(PRICES[*price]),
                ];
                (ChangeKind::Insert, Some(new), *stock, dec(*balance))
            }
            (Action::Update { price: None, .. }, false) | (Action::Delete, false) | (Action::Resolve { .. }, false) => {
                return Ok(())
            }
            (Action::Delete, true) => (ChangeKind::Delete, None, 0, dec(0)),
            (Action::Insert { stock, balance, price }, true) => {
                // The key exists here: the application updates it instead.
                return self.write(
                    r,
                    k,
                    &Action::Update {
                        name: true,
                        stock: *stock,
                        balance: *balance,
                        price: Some(*price),
                    },
                );
            }
            (
                Action::Update {
                    name,
                    stock,
                    balance,
                    price,
                },
                true,
            ) => {
                let mut new: Vec<Value> = (0..4)
                    .map(|i| old_value(i).expect("a live row has every value"))
                    .collect();
                if *name {
                    new[NAME] = fresh_name.clone();
                }
                new[STOCK] = match &new[STOCK] {
                    Value::Int(v) => Value::Int(v + stock),
                    other => return Err(TestCaseError::fail(format!("stock holds {other:?}"))),
                };
                new[BALANCE] = match &new[BALANCE] {
                    Value::Numeric(v) => Value::Numeric(v + dec(*balance)),
                    other => return Err(TestCaseError::fail(format!("balance holds {other:?}"))),
                };
                if let Some(p) = price {
                    new[PRICE] = Value::text(PRICES[*p]);
                }
                (ChangeKind::Update, Some(new), *stock, dec(*balance))
            }
            (Action::Resolve { pick }, true) => {
                let state = local.as_ref().expect("alive implies a state");
                let Some(item) = open_items(&table, &key(k), state).into_iter().next() else {
                    return Ok(());
                };
                let candidates = item.candidates();
                let value = match candidates.get(*pick) {
                    Some(c) => c.value.clone(),
                    None => Value::text("99"),
                };
                resolving = Some(item.id);
                let mut new: Vec<Value> = (0..4)
                    .map(|i| old_value(i).expect("a live row has every value"))
                    .collect();
                new[PRICE] = value;
                (ChangeKind::Update, Some(new), 0, dec(0))
            }
        };

        let captured_change = CapturedChange {
            kind,
            key: key(k),
            old: old.clone(),
            new: new.as_ref().map(|n| n.iter().cloned().map(Cell::Value).collect()),
        };
        let physical = self.physical(r);
        let replica = &mut self.replicas[r];
        let stamp = replica.clock.now(physical);
        prop_assert!(
            replica.last_local.is_none_or(|l| stamp > l),
            "local stamps must increase"
        );
        prop_assert!(
            replica.greatest_merged.is_none_or(|m| stamp > m),
            "a local write must be stamped above every change merged before it"
        );
        replica.last_local = Some(stamp);
        let resolving_list: Vec<ReviewItemId> = resolving.into_iter().collect();
        let captured = capture(
            &table,
            local.as_ref().map(|s| &s.meta),
            &captured_change,
            stamp,
            replica.seq + 1,
            &resolving_list,
        )
        .map_err(|e| TestCaseError::fail(format!("capture failed: {e}")))?;
        let Some(captured) = captured else { return Ok(()) };
        replica.seq += 1;

        let new_state = RowState {
            meta: captured.meta.clone(),
            values: if kind == ChangeKind::Delete {
                Vec::new()
            } else {
                captured_change.new.clone().unwrap_or_default()
            },
        };
        apply_review(&mut replica.queue, &captured.review)?;
        replica.rows.insert(k, new_state);
        let seen = replica.seen.entry(k).or_default();
        let write_seen = seen.clone();
        seen.insert(id);

        let old_price = old_value(PRICE);
        let new_price = new.as_ref().map(|n| n[PRICE].clone());
        let wrote_price =
            kind == ChangeKind::Insert || (new_price.is_some() && (new_price != old_price || resolving.is_some()));
        let wrote_name =
            kind == ChangeKind::Insert || new.as_ref().is_some_and(|n| Some(&n[NAME]) != old_value(NAME).as_ref());
        self.writes.push(Write {
            replica: r,
            key: k,
            kind,
            stamp,
            causal_length: captured.meta.causal_length,
            seen: write_seen,
            name: if wrote_name {
                new.as_ref().map(|n| n[NAME].clone())
            } else {
                None
            },
            stock,
            balance,
            price: if wrote_price { new_price } else { None },
            resolving,
        });
        for target in 0..self.replicas.len() {
            if target != r {
                self.pending.push(Pending {
                    target,
                    write: id,
                    change: captured.change.clone(),
                });
            }
        }
        Ok(())
    }

    fn deliver(&mut self, i: usize, keep_duplicate: bool) -> Result<(), TestCaseError> {
        let pending = if keep_duplicate {
            let p = &self.pending[i];
            Pending {
                target: p.target,
                write: p.write,
                change: p.change.clone(),
            }
        } else {
            self.pending.swap_remove(i)
        };
        let physical = self.physical(pending.target);
        let write = &self.writes[pending.write];
        let k = write.key;
        let mut origin_seen = write.seen.clone();
        origin_seen.insert(pending.write);
        let replica = &mut self.replicas[pending.target];
        replica
            .clock
            .update(pending.change.stamp, physical)
            .map_err(|e| TestCaseError::fail(format!("clock refused a stamp within the offset: {e}")))?;
        replica.greatest_merged = replica.greatest_merged.max(Some(pending.change.stamp));
        let local = replica.rows.get(&k);
        let outcome = merge(&self.table, local, &pending.change).map_err(|e| TestCaseError::fail(e.to_string()))?;
        let merged = match outcome {
            MergeOutcome::Applied(m) => m,
            other => return Err(TestCaseError::fail(format!("merge did not apply: {other:?}"))),
        };
        check_action(local, &merged.action, &merged.state)?;
        apply_review(&mut replica.queue, &merged.review)?;
        replica.rows.insert(k, merged.state);
        replica.seen.entry(k).or_default().extend(origin_seen);
        Ok(())
    }
}

/// The row action, applied to the old values, must give the values of the new state.
fn check_action(before: Option<&RowState>, action: &RowAction, after: &RowState) -> Result<(), TestCaseError> {
    let before_values: Option<Vec<Cell>> = before.filter(|s| s.is_alive()).map(|s| s.values.clone());
    let result: Option<Vec<Cell>> = match action {
        RowAction::Nothing => before_values,
        RowAction::Delete => {
            prop_assert!(before_values.is_some(), "delete of a row that is not there");
            None
        }
        RowAction::Insert(values) => {
            prop_assert!(before_values.is_none(), "insert over a live row");
            Some(values.iter().cloned().map(Cell::Value).collect())
        }
        RowAction::Update(writes) => {
            let mut values = before_values.ok_or_else(|| TestCaseError::fail("update of a row that is not there"))?;
            for w in writes {
                values[w.column] = Cell::Value(w.value.clone());
            }
            Some(values)
        }
    };
    let expected = if after.is_alive() {
        Some(after.values.clone())
    } else {
        None
    };
    prop_assert_eq!(result, expected, "row action disagrees with the new state");
    Ok(())
}

fn apply_review(queue: &mut BTreeMap<ReviewItemId, QueueEntry>, actions: &[ReviewAction]) -> Result<(), TestCaseError> {
    for action in actions {
        match action {
            ReviewAction::Open(item) => {
                prop_assert!(
                    !matches!(queue.get(&item.id), Some(QueueEntry::Closed(..))),
                    "item {} reopened after it was closed",
                    item.id
                );
                queue.insert(item.id, QueueEntry::Open(item.clone()));
            }
            ReviewAction::Withdraw(id) => {
                prop_assert!(
                    matches!(queue.remove(id), Some(QueueEntry::Open(_))),
                    "withdrew an item that was not open"
                );
            }
            ReviewAction::Close(closure) => {
                if let Some(QueueEntry::Closed(_, recorded)) = queue.get(&closure.item.id) {
                    if !closure.replaces(recorded) {
                        continue;
                    }
                }
                queue.insert(
                    closure.item.id,
                    QueueEntry::Closed(closure.item.clone(), closure.kind.clone()),
                );
            }
        }
    }
    Ok(())
}

/// The oracle: what the final state must be, from the history of writes alone.
struct Expected {
    rows: BTreeMap<u8, Option<[Value; 4]>>,
    queue: BTreeMap<ReviewItemId, QueueEntry>,
}

fn oracle(cluster: &Cluster, keys: u8) -> Result<Expected, TestCaseError> {
    let writes = &cluster.writes;
    // Causal lengths recomputed from the seen sets: the greatest one a writer had seen, moved on by
    // an insert to the next odd number and by a delete to the next even one.
    let mut cl = vec![0u64; writes.len()];
    for (i, w) in writes.iter().enumerate() {
        let base = w.seen.iter().map(|&s| cl[s]).max().unwrap_or(0);
        cl[i] = match w.kind {
            ChangeKind::Insert => base + if base % 2 == 1 { 2 } else { 1 },
            ChangeKind::Delete => base + if base % 2 == 1 { 1 } else { 2 },
            ChangeKind::Update => base,
        };
        prop_assert_eq!(cl[i], w.causal_length, "causal length of write {}", i);
    }
    let stamp_of = |i: usize| writes[i].stamp;
    let maximal = |set: &[usize]| -> Vec<usize> {
        set.iter()
            .copied()
            .filter(|&w| !set.iter().any(|&x| writes[x].seen.contains(&w)))
            .collect()
    };
    let item_of = |k: u8, set: &[usize]| -> Option<ReviewItem> {
        let mut cands: Vec<Candidate> = set
            .iter()
            .map(|&i| Candidate {
                value: writes[i].price.clone().expect("only price writes are candidates"),
                stamp: stamp_of(i),
            })
            .collect();
        cands.sort_by_key(|c| c.stamp);
        if cands.len() >= 2 && cands.iter().any(|c| c.value != cands[0].value) {
            Some(ReviewItem::concurrent("shop.products", &key(k), "price", cands))
        } else {
            None
        }
    };

    let mut queue = BTreeMap::new();
    for (i, w) in writes.iter().enumerate() {
        if w.kind != ChangeKind::Update || w.price.is_none() {
            continue;
        }
        let before: Vec<usize> = w
            .seen
            .iter()
            .copied()
            .filter(|&x| writes[x].key == w.key && cl[x] == cl[i] && writes[x].price.is_some())
            .collect();
        if let Some(item) = item_of(w.key, &maximal(&before)) {
            let value = w.price.clone().expect("checked above");
            let kind = if w.resolving == Some(item.id) {
                ClosureKind::Resolved {
                    by: NodeId(w.replica as u32 + 1),
                    stamp: w.stamp,
                    value,
                }
            } else {
                ClosureKind::Superseded { stamp: w.stamp, value }
            };
            // Concurrent closers of one item: the greatest stamp is the recorded one.
            let newer = match queue.get(&item.id) {
                Some(QueueEntry::Closed(_, recorded)) => w.stamp > recorded.stamp(),
                _ => true,
            };
            if newer {
                queue.insert(item.id, QueueEntry::Closed(item, kind));
            }
        }
    }

    let mut rows = BTreeMap::new();
    for k in 0..keys {
        let on_key: Vec<usize> = (0..writes.len()).filter(|&i| writes[i].key == k).collect();
        let Some(last) = on_key.iter().map(|&i| cl[i]).max() else {
            continue;
        };
        if last % 2 == 0 {
            rows.insert(k, None);
            continue;
        }
        let live: Vec<usize> = on_key.iter().copied().filter(|&i| cl[i] == last).collect();
        let stock: i64 = live.iter().map(|&i| writes[i].stock).sum();
        let balance: BigDecimal = live.iter().map(|&i| writes[i].balance.clone()).sum();
        let name = live
            .iter()
            .filter(|&&i| writes[i].name.is_some())
            .max_by_key(|&&i| stamp_of(i))
            .and_then(|&i| writes[i].name.clone())
            .ok_or_else(|| TestCaseError::fail("a live incarnation without a name write"))?;
        let price_writes: Vec<usize> = live.iter().copied().filter(|&i| writes[i].price.is_some()).collect();
        let heads = maximal(&price_writes);
        let price = heads
            .iter()
            .max_by_key(|&&i| stamp_of(i))
            .and_then(|&i| writes[i].price.clone())
            .ok_or_else(|| TestCaseError::fail("a live incarnation without a price write"))?;
        if let Some(item) = item_of(k, &heads) {
            queue.insert(item.id, QueueEntry::Open(item));
        }
        rows.insert(k, Some([name, Value::Int(stock), Value::Numeric(balance), price]));
    }
    Ok(Expected { rows, queue })
}

fn check(n: usize, skews: Vec<u64>, ops: Vec<Op>, flush_seed: u64, keys: u8) -> Result<(), TestCaseError> {
    let mut cluster = Cluster::new(n, &skews);
    cluster.run(&ops)?;
    cluster.flush(flush_seed)?;
    let expected = oracle(&cluster, keys)?;

    let first = &cluster.replicas[0];
    for (r, replica) in cluster.replicas.iter().enumerate() {
        prop_assert_eq!(&replica.rows, &first.rows, "replica {} differs from replica 0", r);
        prop_assert_eq!(&replica.queue, &expected.queue, "review queue of replica {}", r);
        for (k, want) in &expected.rows {
            let got = replica.rows.get(k).filter(|s| s.is_alive()).map(|s| s.values.clone());
            let want = want
                .as_ref()
                .map(|vals| vals.iter().cloned().map(Cell::Value).collect::<Vec<_>>());
            prop_assert_eq!(got, want, "row {} on replica {}", k, r);
        }
    }
    Ok(())
}

fn skews() -> impl Strategy<Value = Vec<u64>> {
    proptest::collection::vec(0u64..MAX_OFFSET / 2, 5)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 1000, ..ProptestConfig::default() })]

    /// Everything at once: inserts of one key, deletes racing updates, counters, lww and review
    /// columns, resolutions, on 2–5 replicas with duplicated and reordered delivery.
    #[test]
    fn replicas_converge_to_the_oracle(
        n in 2usize..=5,
        skews in skews(),
        ops in ops(Mix { deletes: 1, delivers: 4, duplicates: 0.2, keys: 3 }, 5),
        flush_seed in any::<u64>(),
    ) {
        let ops = ops.into_iter().map(|op| clamp(op, n)).collect();
        check(n, skews, ops, flush_seed, 3)?;
    }

    /// Hot rows without deletes: every delta counted exactly once despite heavy duplication.
    #[test]
    fn counters_on_hot_rows_are_exact(
        n in 2usize..=5,
        skews in skews(),
        ops in ops(Mix { deletes: 0, delivers: 6, duplicates: 0.5, keys: 1 }, 5),
        flush_seed in any::<u64>(),
    ) {
        let ops = ops.into_iter().map(|op| clamp(op, n)).collect();
        check(n, skews, ops, flush_seed, 1)?;
    }

    /// Long partitions: nothing is delivered until the end, so almost every write is concurrent.
    #[test]
    fn partitioned_replicas_converge_after_healing(
        n in 2usize..=5,
        skews in skews(),
        ops in ops(Mix { deletes: 1, delivers: 0, duplicates: 0.0, keys: 2 }, 5),
        flush_seed in any::<u64>(),
    ) {
        let ops = ops.into_iter().map(|op| clamp(op, n)).collect();
        check(n, skews, ops, flush_seed, 2)?;
    }
}

fn clamp(op: Op, n: usize) -> Op {
    match op {
        Op::Write { replica, key, action } => Op::Write {
            replica: replica % n,
            key,
            action,
        },
        other => other,
    }
}

#[test]
fn oracle_notices_a_lost_increment() {
    // The property tests are only as good as their oracle: drop one delivery and it must complain.
    let ops = vec![
        Op::Write {
            replica: 0,
            key: 0,
            action: Action::Insert {
                stock: 1,
                balance: 0,
                price: 0,
            },
        },
        Op::Deliver {
            pick: 0,
            keep_duplicate: false,
        },
        Op::Write {
            replica: 1,
            key: 0,
            action: Action::Update {
                name: false,
                stock: 5,
                balance: 0,
                price: None,
            },
        },
    ];
    let mut cluster = Cluster::new(2, &[0]);
    cluster.run(&ops).unwrap();
    cluster.pending.clear();
    let expected = oracle(&cluster, 1).unwrap();
    let on_0 = cluster.replicas[0].rows[&0].values[STOCK].clone();
    let want = expected.rows[&0].as_ref().unwrap()[STOCK].clone();
    assert_eq!(want, Value::Int(6));
    assert_ne!(on_0, Cell::Value(want));
}

#[test]
fn decimal_helper_is_exact() {
    assert_eq!(dec(-125), BigDecimal::from_str("-1.25").unwrap());
}
