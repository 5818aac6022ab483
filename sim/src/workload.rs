//! The workload: what the application does to one node's database. It reads the node's current
//! rows like an application would, and plans one local transaction: counters on hot rows, lww
//! names, review prices, inserts of one key on several nodes, deletes racing updates, and review
//! resolutions by a reviewer looking at the node's queue.

use accord_engine::{open_items, Cell, ChangeKind, ReviewItemId, Value};

use crate::db::Db;
use crate::rng::SimRng;
use crate::swarm::{OpKind, Params, OP_KINDS};
use crate::table::{row_key, NAME, PRICE, PRICES, REVIEWER_PRICE, SOLD, STOCK};

/// One row of a planned transaction.
#[derive(Debug, Clone)]
pub struct RowPlan {
    pub key: i64,
    pub kind: ChangeKind,
    /// The row before (update, delete).
    pub old: Option<Vec<Cell>>,
    /// The row after (insert, update): what the database stores.
    pub new: Option<Vec<Cell>>,
    /// Decoding will send `name` as an unchanged TOAST value.
    pub toast_name: bool,
    /// For the oracle: the name set, the amount added to stock, the price set.
    pub name: Option<Value>,
    pub stock: i64,
    pub price: Option<Value>,
    /// The amount added to `sold` (the migration's column: where a node has it, every write of
    /// `stock` writes `sold` by as much).
    pub sold: i64,
    /// An update that sets every column to its value (and resolves nothing): no write.
    pub changes_nothing: bool,
}

impl RowPlan {
    fn delete(key: i64, old: Vec<Cell>) -> RowPlan {
        RowPlan {
            key,
            kind: ChangeKind::Delete,
            old: Some(old),
            new: None,
            toast_name: false,
            name: None,
            stock: 0,
            price: None,
            sold: 0,
            changes_nothing: false,
        }
    }
}

#[derive(Debug, Clone)]
pub struct TxPlan {
    pub rows: Vec<RowPlan>,
    pub resolving: Option<ReviewItemId>,
    /// A TRUNCATE of the table (`rows` is then empty).
    pub truncate: bool,
}

fn stock_of(cells: &[Cell]) -> i64 {
    int_of(cells, STOCK)
}

fn int_of(cells: &[Cell], column: usize) -> i64 {
    match cells.get(column).and_then(Cell::value) {
        Some(Value::Int(v)) => *v,
        _ => 0,
    }
}

fn delta(rng: &mut SimRng) -> i64 {
    // Never zero: a write that changes nothing is not a write.
    let d = rng.range(1, 15) as i64 - 5;
    if d <= 0 {
        d - 1
    } else {
        d
    }
}

fn random_price(rng: &mut SimRng) -> Value {
    Value::text(PRICES[rng.index(PRICES.len())])
}

fn other_price(rng: &mut SimRng, current: Option<&Value>) -> Value {
    loop {
        let p = random_price(rng);
        if Some(&p) != current {
            return p;
        }
    }
}

/// Plans one transaction on `db`. `fresh` numbers new names so every name write is unique.
pub fn plan(rng: &mut SimRng, params: &Params, db: &Db, fresh: &mut u64) -> TxPlan {
    let kind = OP_KINDS[rng.weighted(&params.mix)];
    if kind == OpKind::Truncate {
        return TxPlan {
            rows: Vec::new(),
            resolving: None,
            truncate: true,
        };
    }
    let key = pick_key(rng, params);
    let mut resolving = None;
    if kind == OpKind::Rekey {
        if let Some(rows) = plan_rekey(rng, params, db, key, fresh) {
            return TxPlan {
                rows,
                resolving,
                truncate: false,
            };
        }
    }
    let mut rows = vec![plan_row(rng, params, db, key, kind, fresh, &mut resolving)];
    if params.keys > 1 && rng.chance(params.two_row_p) {
        let mut other = pick_key(rng, params);
        if other == key {
            other = (key + 1) % params.keys as i64;
        }
        rows.push(plan_row(rng, params, db, other, OpKind::Counter, fresh, &mut None));
    }
    TxPlan {
        rows,
        resolving,
        truncate: false,
    }
}

/// An update of `key`'s key to a key absent here, as decoding delivers it: a delete of the old
/// key and an insert of the new one, in one transaction. The new row gets a fresh name (every
/// name write is unique); `None` when `key` is absent or no key is free.
fn plan_rekey(rng: &mut SimRng, params: &Params, db: &Db, key: i64, fresh: &mut u64) -> Option<Vec<RowPlan>> {
    let row = db.rows.get(&key)?;
    let start = rng.below(params.keys) as i64;
    let keys = params.keys as i64;
    let to = (0..keys)
        .map(|i| (start + i) % keys)
        .find(|k| !db.rows.contains_key(k))?;
    let old = row.values.clone();
    let name = fresh_name(fresh);
    let mut new = old.clone();
    new[NAME] = Cell::Value(name.clone());
    Some(vec![
        RowPlan::delete(key, old.clone()),
        RowPlan {
            key: to,
            kind: ChangeKind::Insert,
            old: None,
            new: Some(new),
            toast_name: false,
            name: Some(name),
            stock: stock_of(&old),
            price: old[PRICE].value().cloned(),
            sold: int_of(&old, SOLD),
            changes_nothing: false,
        },
    ])
}

fn pick_key(rng: &mut SimRng, params: &Params) -> i64 {
    if rng.chance(params.hot_p) {
        rng.below(params.hot_keys) as i64
    } else {
        rng.below(params.keys) as i64
    }
}

fn fresh_name(fresh: &mut u64) -> Value {
    *fresh += 1;
    Value::text(format!("n{fresh}"))
}

fn plan_row(
    rng: &mut SimRng,
    params: &Params,
    db: &Db,
    key: i64,
    kind: OpKind,
    fresh: &mut u64,
    resolving: &mut Option<ReviewItemId>,
) -> RowPlan {
    let Some(row) = db.rows.get(&key) else {
        // Absent here: whatever the intent, the application inserts the row.
        let stock = rng.range(1, 20) as i64;
        let name = fresh_name(fresh);
        let price = random_price(rng);
        let mut new = vec![
            Cell::Value(name.clone()),
            Cell::Value(Value::Int(stock)),
            Cell::Value(price.clone()),
        ];
        let sold = if db.migrated_at.is_some() {
            new.push(Cell::Value(Value::Int(stock)));
            stock
        } else {
            0
        };
        return RowPlan {
            key,
            kind: ChangeKind::Insert,
            old: None,
            new: Some(new),
            toast_name: false,
            name: Some(name),
            stock,
            price: Some(price),
            sold,
            changes_nothing: false,
        };
    };
    let old = row.values.clone();
    if kind == OpKind::Delete {
        return RowPlan::delete(key, old);
    }
    let mut new = old.clone();
    let (mut name, mut stock, mut price) = (None, 0, None);
    let current_price = old[PRICE].value().cloned();
    match kind {
        OpKind::Counter => stock = delta(rng),
        OpKind::Name => name = Some(fresh_name(fresh)),
        OpKind::Price => price = Some(other_price(rng, current_price.as_ref())),
        OpKind::Insert | OpKind::Mixed => {
            name = Some(fresh_name(fresh));
            stock = delta(rng);
            if rng.chance(0.5) {
                price = Some(other_price(rng, current_price.as_ref()));
            }
        }
        OpKind::Resolve => {
            // The reviewer looks at the queue, which shows what the capture has accounted for:
            // resolve only rows with no local write still on its way through the capture.
            let item = if captured_as_is(db, key) {
                db.row_state(key)
                    .and_then(|state| open_items(&db.table(), &row_key(key), &state).into_iter().next())
            } else {
                None
            };
            match item {
                // A displaced insert (`--review-inserts`) is resolved with a write of the row:
                // here a new price, which also supersedes any price item.
                Some(item) if matches!(item.kind, accord_engine::ReviewKind::DisplacedInsert { .. }) => {
                    *resolving = Some(item.id);
                    price = Some(other_price(rng, current_price.as_ref()));
                }
                Some(item) => {
                    let candidates = item.candidates();
                    let value = if rng.chance(0.2) || candidates.is_empty() {
                        Value::text(REVIEWER_PRICE)
                    } else {
                        candidates[rng.index(candidates.len())].value.clone()
                    };
                    *resolving = Some(item.id);
                    price = Some(value);
                }
                None => price = Some(other_price(rng, current_price.as_ref())),
            }
        }
        OpKind::Delete | OpKind::Touch | OpKind::Rekey | OpKind::Truncate => {}
    }
    if let Some(n) = &name {
        new[NAME] = Cell::Value(n.clone());
    }
    if stock != 0 {
        new[STOCK] = Cell::Value(Value::Int(stock_of(&old) + stock));
    }
    let sold = if old.len() > SOLD { stock } else { 0 };
    if sold != 0 {
        new[SOLD] = Cell::Value(Value::Int(int_of(&old, SOLD) + sold));
    }
    if let Some(p) = &price {
        new[PRICE] = Cell::Value(p.clone());
    }
    // (A rekey with no key free to take changes nothing, as a touch does.)
    let toast_name = name.is_none() && rng.chance(params.toast_p);
    RowPlan {
        key,
        kind: ChangeKind::Update,
        changes_nothing: new == old && resolving.is_none(),
        old: Some(old),
        new: Some(new),
        toast_name,
        name,
        stock,
        price,
        sold,
    }
}

/// Whether the capture has recorded the row as it is now (the review queue a reviewer reads is
/// what the capture recorded): its metadata accounts for the row's current version.
fn captured_as_is(db: &Db, key: i64) -> bool {
    match (db.rows.get(&key), db.meta.get(&key)) {
        (Some(row), Some(meta)) => {
            meta.meta.is_alive() && (Some(row.tx) == meta.known_xmin || Some(row.xmin) == meta.known_xmin)
        }
        (Some(_), None) => false,
        (None, Some(meta)) => !meta.meta.is_alive(),
        (None, None) => true,
    }
}
