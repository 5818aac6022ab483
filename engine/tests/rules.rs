//! One test per merge rule and per error, on two or three nodes driven by hand.

use std::str::FromStr;

use accord_engine::{
    capture, merge, open_items, CaptureError, CapturedChange, Cell, ChangeKind, ClosureKind, ColumnDef, ColumnMeta,
    ColumnPolicy, ColumnType, ConflictKind, Hlc, InsertPolicy, KeyColumn, MergeError, MergeOutcome, Merged, NodeId,
    ReviewAction, ReviewKind, RowAction, RowChange, RowKey, RowMeta, RowState, TableDef, Value,
};
use bigdecimal::BigDecimal;

const A: NodeId = NodeId(1);
const B: NodeId = NodeId(2);

fn table_with(stock_ty: ColumnType) -> TableDef {
    let col = |name: &str, ty, policy| ColumnDef {
        name: name.into(),
        ty,
        policy,
    };
    TableDef::new(
        "shop.products",
        vec![KeyColumn {
            name: "id".into(),
            ty: ColumnType::Integer,
        }],
        vec![
            col("name", ColumnType::Other("text".into()), ColumnPolicy::Lww),
            col("stock", stock_ty, ColumnPolicy::Delta),
            col("price", ColumnType::Other("numeric".into()), ColumnPolicy::Review),
        ],
    )
    .unwrap()
}

fn table() -> TableDef {
    table_with(ColumnType::Integer)
}

fn key() -> RowKey {
    RowKey(vec![Value::Int(7)])
}

fn row(name: &str, stock: i64, price: &str) -> Vec<Cell> {
    vec![
        Cell::Value(Value::text(name)),
        Cell::Value(Value::Int(stock)),
        Cell::Value(Value::text(price)),
    ]
}

fn at(t: u64, node: NodeId) -> Hlc {
    Hlc::new(t, 0, node)
}

/// One node's view of the row, with helpers to write locally and merge remote changes.
struct Node {
    table: TableDef,
    state: Option<RowState>,
    seq: u64,
}

impl Node {
    fn new(table: &TableDef) -> Self {
        Node {
            table: table.clone(),
            state: None,
            seq: 0,
        }
    }

    fn values(&self) -> Option<Vec<Cell>> {
        self.state.as_ref().filter(|s| s.is_alive()).map(|s| s.values.clone())
    }

    fn local(&mut self, kind: ChangeKind, new: Option<Vec<Cell>>, stamp: Hlc) -> RowChange {
        self.local_resolving(kind, new, stamp, &[])
            .expect("the write changes something")
    }

    fn local_resolving(
        &mut self,
        kind: ChangeKind,
        new: Option<Vec<Cell>>,
        stamp: Hlc,
        resolving: &[accord_engine::ReviewItemId],
    ) -> Option<RowChange> {
        let change = CapturedChange {
            kind,
            key: key(),
            old: self.values(),
            new: new.clone(),
        };
        let captured = capture(
            &self.table,
            self.state.as_ref().map(|s| &s.meta),
            &change,
            stamp,
            self.seq + 1,
            resolving,
        )
        .unwrap()?;
        self.seq += 1;
        self.state = Some(RowState {
            meta: captured.meta,
            values: new.unwrap_or_default(),
        });
        Some(captured.change)
    }

    fn merge(&mut self, change: &RowChange) -> Merged {
        match merge(&self.table, self.state.as_ref(), change).unwrap() {
            MergeOutcome::Applied(m) => {
                self.state = Some(m.state.clone());
                m
            }
            other => panic!("expected the merge to apply, got {other:?}"),
        }
    }
}

#[test]
fn lww_keeps_the_greatest_stamp_and_logs_a_concurrent_overwrite_on_both_sides() {
    let t = table();
    let (mut a, mut b) = (Node::new(&t), Node::new(&t));
    let insert = a.local(ChangeKind::Insert, Some(row("x", 0, "1")), at(1, A));
    b.merge(&insert);
    let from_a = a.local(ChangeKind::Update, Some(row("from-a", 0, "1")), at(10, A));
    let from_b = b.local(ChangeKind::Update, Some(row("from-b", 0, "1")), at(10, B));

    let on_a = a.merge(&from_b);
    let on_b = b.merge(&from_a);
    assert_eq!(a.values(), b.values());
    assert_eq!(
        a.values().unwrap()[0],
        Cell::Value(Value::text("from-b")),
        "node id breaks the tie"
    );
    for merged in [&on_a, &on_b] {
        assert_eq!(merged.conflicts.len(), 1, "{:?}", merged.conflicts);
        assert_eq!(merged.conflicts[0].kind, ConflictKind::ConcurrentUpdate);
        assert_eq!(merged.conflicts[0].winner, at(10, B));
        assert_eq!(merged.conflicts[0].loser, at(10, A));
    }
}

#[test]
fn sequential_overwrites_are_not_conflicts() {
    let t = table();
    let (mut a, mut b) = (Node::new(&t), Node::new(&t));
    b.merge(&a.local(ChangeKind::Insert, Some(row("x", 0, "1")), at(1, A)));
    let later = b.local(ChangeKind::Update, Some(row("y", 0, "1")), at(2, B));
    let merged = a.merge(&later);
    assert!(merged.conflicts.is_empty(), "{:?}", merged.conflicts);
    assert_eq!(
        merged.action,
        RowAction::Update(vec![accord_engine::ColumnWrite {
            column: 0,
            value: Value::text("y")
        }])
    );
    // The old change arriving again (a duplicate) changes nothing.
    let again = b.merge(&later);
    assert_eq!(again.action, RowAction::Nothing);
}

#[test]
fn deltas_add_up_exactly_once_whatever_the_order_and_duplicates() {
    let t = table();
    let (mut a, mut b, mut c) = (Node::new(&t), Node::new(&t), Node::new(&t));
    let insert = a.local(ChangeKind::Insert, Some(row("x", 100, "1")), at(1, A));
    b.merge(&insert);
    c.merge(&insert);
    let a1 = a.local(ChangeKind::Update, Some(row("x", 90, "1")), at(2, A)); // -10
    let b1 = b.local(ChangeKind::Update, Some(row("x", 105, "1")), at(2, B)); // +5
    let b2 = b.local(ChangeKind::Update, Some(row("x", 108, "1")), at(3, B)); // +3

    // c gets b's second change before its first, and a's twice.
    for change in [&b2, &a1, &b1, &a1, &b2] {
        c.merge(change);
    }
    a.merge(&b1);
    a.merge(&b2);
    b.merge(&a1);
    for n in [&a, &b, &c] {
        assert_eq!(n.values().unwrap()[1], Cell::Value(Value::Int(98)));
    }
    assert_eq!(a.state, b.state);
    assert_eq!(b.state, c.state);
}

#[test]
fn numeric_deltas_stay_exact() {
    let t = table_with(ColumnType::Numeric {
        precision: Some(40),
        scale: Some(10),
    });
    let num = |s: &str| Cell::Value(Value::Numeric(BigDecimal::from_str(s).unwrap()));
    let cells = |s: &str| vec![Cell::Value(Value::text("x")), num(s), Cell::Value(Value::text("1"))];
    let (mut a, mut b) = (Node::new(&t), Node::new(&t));
    b.merge(&a.local(
        ChangeKind::Insert,
        Some(cells("123456789012345678901234567890.0000000001")),
        at(1, A),
    ));
    let from_a = a.local(
        ChangeKind::Update,
        Some(cells("123456789012345678901234567890.0000000002")),
        at(2, A),
    );
    let from_b = b.local(
        ChangeKind::Update,
        Some(cells("123456789012345678901234567889.0000000001")),
        at(2, B),
    );
    a.merge(&from_b);
    b.merge(&from_a);
    assert_eq!(a.values().unwrap()[1], num("123456789012345678901234567889.0000000002"));
    assert_eq!(a.values(), b.values());
}

#[test]
fn delta_overflow_parks_the_change_and_leaves_the_row_alone() {
    let t = table_with(ColumnType::SmallInt);
    let (mut a, mut b) = (Node::new(&t), Node::new(&t));
    b.merge(&a.local(ChangeKind::Insert, Some(row("x", 32_000, "1")), at(1, A)));
    a.local(ChangeKind::Update, Some(row("x", 32_700, "1")), at(2, A));
    let from_b = b.local(ChangeKind::Update, Some(row("x", 32_100, "1")), at(2, B));
    let before = a.state.clone();
    match merge(&t, a.state.as_ref(), &from_b).unwrap() {
        MergeOutcome::Parked { item, error } => {
            assert!(error.contains("smallint"), "{error}");
            assert_eq!(item.column.as_deref(), Some("stock"));
            assert!(matches!(item.kind, ReviewKind::Unapplicable { origin: B, seq: 1, .. }));
        }
        other => panic!("expected the change to be parked, got {other:?}"),
    }
    assert_eq!(a.state, before);
}

#[test]
fn concurrent_review_writes_open_the_same_item_on_every_node() {
    let t = table();
    let (mut a, mut b, mut c) = (Node::new(&t), Node::new(&t), Node::new(&t));
    let insert = a.local(ChangeKind::Insert, Some(row("x", 0, "10")), at(1, A));
    b.merge(&insert);
    c.merge(&insert);
    let from_a = a.local(ChangeKind::Update, Some(row("x", 0, "11")), at(5, A));
    let from_b = b.local(ChangeKind::Update, Some(row("x", 0, "12")), at(6, B));

    let opened = |m: &Merged| -> Vec<accord_engine::ReviewItem> {
        m.review
            .iter()
            .filter_map(|r| match r {
                ReviewAction::Open(item) => Some(item.clone()),
                _ => None,
            })
            .collect()
    };
    let on_a = opened(&a.merge(&from_b));
    let on_b = opened(&b.merge(&from_a));
    c.merge(&from_b);
    let on_c = opened(&c.merge(&from_a));
    assert_eq!(on_a.len(), 1);
    assert_eq!(on_a, on_b);
    assert_eq!(on_a, on_c);
    let item = &on_a[0];
    let values: Vec<&Value> = item.candidates().iter().map(|c| &c.value).collect();
    assert_eq!(values, [&Value::text("11"), &Value::text("12")]);
    assert_eq!(
        a.values().unwrap()[2],
        Cell::Value(Value::text("12")),
        "provisional winner is the greater stamp"
    );
}

#[test]
fn sequential_review_writes_and_equal_values_make_no_item() {
    let t = table();
    let (mut a, mut b) = (Node::new(&t), Node::new(&t));
    b.merge(&a.local(ChangeKind::Insert, Some(row("x", 0, "10")), at(1, A)));
    let seq = b.local(ChangeKind::Update, Some(row("x", 0, "11")), at(2, B));
    assert!(a.merge(&seq).review.is_empty());
    let from_a = a.local(ChangeKind::Update, Some(row("x", 0, "20")), at(3, A));
    let from_b = b.local(ChangeKind::Update, Some(row("x", 0, "20")), at(3, B));
    assert!(a.merge(&from_b).review.is_empty(), "concurrent but equal values");
    assert!(b.merge(&from_a).review.is_empty());
}

#[test]
fn a_resolution_closes_the_item_everywhere_even_when_it_picks_the_current_value() {
    let t = table();
    let (mut a, mut b, mut c) = (Node::new(&t), Node::new(&t), Node::new(&t));
    let insert = a.local(ChangeKind::Insert, Some(row("x", 0, "10")), at(1, A));
    b.merge(&insert);
    c.merge(&insert);
    let from_a = a.local(ChangeKind::Update, Some(row("x", 0, "11")), at(5, A));
    let from_b = b.local(ChangeKind::Update, Some(row("x", 0, "12")), at(6, B));
    a.merge(&from_b);
    let item = open_items(&t, &key(), a.state.as_ref().unwrap()).remove(0);
    // The reviewer on A keeps the provisional value "12": the column does not change.
    let resolution = a
        .local_resolving(ChangeKind::Update, Some(row("x", 0, "12")), at(7, A), &[item.id])
        .unwrap();
    assert!(open_items(&t, &key(), a.state.as_ref().unwrap()).is_empty());
    assert_eq!(resolution.closures.len(), 1);
    assert_eq!(resolution.closures[0].item.id, item.id);
    assert!(
        matches!(&resolution.closures[0].kind, ClosureKind::Resolved { by: A, value, .. } if *value == Value::text("12"))
    );

    // B had the item open; C never saw it open (it gets the resolution before B's write).
    b.merge(&from_a);
    let on_b = b.merge(&resolution);
    assert!(on_b
        .review
        .contains(&ReviewAction::Close(resolution.closures[0].clone())));
    assert!(
        !on_b.review.iter().any(|r| matches!(r, ReviewAction::Withdraw(_))),
        "a closed item is not also withdrawn"
    );
    c.merge(&from_a);
    let on_c = c.merge(&resolution);
    assert!(on_c
        .review
        .contains(&ReviewAction::Close(resolution.closures[0].clone())));
    let late = c.merge(&from_b);
    assert!(
        late.review.is_empty(),
        "a candidate arriving after the resolution reopens nothing"
    );
    assert_eq!(b.state, c.state);
    assert_eq!(a.state, c.state);
}

#[test]
fn a_delete_wins_over_a_concurrent_update_and_a_later_insert_brings_the_row_back() {
    let t = table();
    let (mut a, mut b) = (Node::new(&t), Node::new(&t));
    b.merge(&a.local(ChangeKind::Insert, Some(row("x", 5, "1")), at(1, A)));
    let delete = a.local(ChangeKind::Delete, None, at(2, A));
    let update = b.local(ChangeKind::Update, Some(row("y", 6, "1")), at(3, B));

    let on_b = b.merge(&delete);
    assert_eq!(on_b.action, RowAction::Delete);
    assert_eq!(on_b.conflicts[0].kind, ConflictKind::DeleteWon);
    let on_a = a.merge(&update);
    assert_eq!(
        on_a.action,
        RowAction::Nothing,
        "a late update does not bring the row back"
    );
    assert_eq!(on_a.conflicts[0].kind, ConflictKind::DeleteWon);
    assert_eq!(a.values(), None);
    assert_eq!(a.state, b.state);

    let reinsert = b.local(ChangeKind::Insert, Some(row("z", 1, "2")), at(4, B));
    let back = a.merge(&reinsert);
    assert_eq!(
        back.action,
        RowAction::Insert(vec![Value::text("z"), Value::Int(1), Value::text("2")])
    );
    assert_eq!(a.state, b.state);
    assert_eq!(a.state.as_ref().unwrap().meta.causal_length, 3);
}

#[test]
fn two_inserts_of_one_key_merge_column_by_column() {
    let t = table();
    let (mut a, mut b) = (Node::new(&t), Node::new(&t));
    let from_a = a.local(ChangeKind::Insert, Some(row("a", 3, "1")), at(1, A));
    let from_b = b.local(ChangeKind::Insert, Some(row("b", 4, "1")), at(1, B));
    let on_a = a.merge(&from_b);
    b.merge(&from_a);
    assert_eq!(a.state, b.state);
    assert_eq!(
        a.values().unwrap(),
        row("b", 7, "1"),
        "each insert counts as a delta from zero"
    );
    assert!(on_a.conflicts.iter().any(|c| c.kind == ConflictKind::InsertInsert));
}

/// The displaced-insert items a node holds for the row.
fn displaced_items(node: &Node) -> Vec<accord_engine::ReviewItem> {
    node.state
        .as_ref()
        .map(|s| open_items(&node.table, &key(), s))
        .unwrap_or_default()
        .into_iter()
        .filter(|i| matches!(i.kind, ReviewKind::DisplacedInsert { .. }))
        .collect()
}

#[test]
fn two_inserts_of_one_key_in_a_review_table_keep_the_earlier_and_queue_the_other_whole() {
    let t = table().with_inserts(InsertPolicy::Review);
    let (mut a, mut b) = (Node::new(&t), Node::new(&t));
    let from_a = a.local(ChangeKind::Insert, Some(row("a", 3, "1")), at(1, A));
    let from_b = b.local(ChangeKind::Insert, Some(row("b", 4, "2")), at(2, B));
    // B writes on its own insert before it hears of A's.
    let b_update = b.local(ChangeKind::Update, Some(row("b2", 5, "2")), at(3, B));
    let changes = [from_a.clone(), from_b.clone(), b_update.clone()];
    let mut states = Vec::new();
    for order in [[0, 1, 2], [0, 2, 1], [1, 0, 2], [1, 2, 0], [2, 0, 1], [2, 1, 0]] {
        let mut c = Node::new(&t);
        for i in order {
            c.merge(&changes[i]);
        }
        assert_eq!(
            c.values().unwrap(),
            row("a", 3, "1"),
            "order {order:?}: the earlier insert keeps the row"
        );
        let items = displaced_items(&c);
        assert_eq!(items.len(), 1, "order {order:?}: one item for the displaced insert");
        let ReviewKind::DisplacedInsert { created, values } = &items[0].kind else {
            unreachable!()
        };
        assert_eq!(*created, at(2, B));
        assert_eq!(
            values,
            &vec![
                ("name".to_string(), Some(Value::text("b2"))),
                ("price".to_string(), Some(Value::text("2"))),
                ("stock".to_string(), Some(Value::Int(5))),
            ],
            "order {order:?}: the item holds the displaced insert as its writes left it, nothing merged"
        );
        states.push((c.state.clone(), items[0].id));
    }
    assert!(
        states.windows(2).all(|w| w[0] == w[1]),
        "every order gives one state and one item"
    );

    let on_a = a.merge(&from_b);
    assert_eq!(on_a.action, RowAction::Nothing, "the row that stays is not written");
    assert!(on_a.conflicts.iter().any(|c| c.kind == ConflictKind::InsertDisplaced));
    a.merge(&b_update);
    let on_b = b.merge(&from_a);
    assert_eq!(
        on_b.action,
        RowAction::Update(
            [Value::text("a"), Value::Int(3), Value::text("1")]
                .into_iter()
                .enumerate()
                .map(|(column, value)| accord_engine::ColumnWrite { column, value })
                .collect()
        ),
        "the node that inserted later takes the earlier row whole"
    );
    assert_eq!(a.state, b.state);
    assert_eq!(a.state, states[0].0);
    assert!(on_b
        .review
        .iter()
        .any(|r| matches!(r, ReviewAction::Open(i) if i.id == states[0].1)));

    // A write on the row after both met goes to the row, not to the displaced insert.
    let a_update = a.local(ChangeKind::Update, Some(row("a2", 6, "1")), at(4, A));
    b.merge(&a_update);
    assert_eq!(b.values().unwrap(), row("a2", 6, "1"));
    assert_eq!(displaced_items(&b)[0].id, states[0].1);

    // A reviewer keeps the row as it is: a write that changes no value, yet closes the item.
    let id = states[0].1;
    let resolution = b
        .local_resolving(ChangeKind::Update, Some(row("a2", 6, "1")), at(5, B), &[id])
        .expect("a resolution is a write even when no value changes");
    assert!(displaced_items(&b).is_empty());
    assert!(resolution.closures.iter().any(|c| c.item.id == id));
    let on_a = a.merge(&resolution);
    assert!(on_a
        .review
        .iter()
        .any(|r| matches!(r, ReviewAction::Close(c) if c.item.id == id)));
    assert!(displaced_items(&a).is_empty());
    assert_eq!(a.state, b.state);
}

#[test]
fn a_displaced_insert_waits_for_its_values_before_its_item_opens() {
    let t = table().with_inserts(InsertPolicy::Review);
    let (mut a, mut b, mut c, mut d) = (Node::new(&t), Node::new(&t), Node::new(&t), Node::new(&t));
    let from_a = a.local(ChangeKind::Insert, Some(row("a", 3, "1")), at(1, A));
    let from_b = b.local(ChangeKind::Insert, Some(row("b", 4, "2")), at(2, B));
    c.merge(&from_b);
    // C adds to B's row, leaving its TOASTed name unchanged: the change does not carry it.
    let mut cells = row("ignored", 9, "2");
    cells[0] = Cell::UnchangedToast;
    let from_c = c.local(ChangeKind::Update, Some(cells), at(3, NodeId(3)));
    d.merge(&from_a);
    let on_d = d.merge(&from_c);
    assert!(
        displaced_items(&d).is_empty(),
        "B's name has not reached D: no item yet"
    );
    assert!(on_d.review.is_empty());
    let on_d = d.merge(&from_b);
    let items = displaced_items(&d);
    assert_eq!(items.len(), 1);
    assert!(on_d
        .review
        .iter()
        .any(|r| matches!(r, ReviewAction::Open(i) if i.id == items[0].id)));
    let ReviewKind::DisplacedInsert { values, .. } = &items[0].kind else {
        unreachable!()
    };
    assert_eq!(values[0], ("name".to_string(), Some(Value::text("b"))));
    assert_eq!(values[2], ("stock".to_string(), Some(Value::Int(9))));
    // A node that heard it all in another order names the same item.
    let mut e = Node::new(&t);
    for change in [&from_b, &from_c, &from_a] {
        e.merge(change);
    }
    assert_eq!(displaced_items(&e), items);
    assert_eq!(e.state, d.state);
}

#[test]
fn a_displaced_insert_goes_with_the_row_it_lost_to() {
    let t = table().with_inserts(InsertPolicy::Review);
    let (mut a, mut b, mut c) = (Node::new(&t), Node::new(&t), Node::new(&t));
    let from_a = a.local(ChangeKind::Insert, Some(row("a", 3, "1")), at(1, A));
    let from_b = b.local(ChangeKind::Insert, Some(row("b", 4, "2")), at(2, B));
    a.merge(&from_b);
    assert_eq!(displaced_items(&a).len(), 1);
    let delete = a.local(ChangeKind::Delete, None, at(3, A));
    // C hears of A's insert and delete before B's insert; B's insert then loses to the delete.
    c.merge(&from_a);
    c.merge(&delete);
    c.merge(&from_b);
    b.merge(&from_a);
    let on_b = b.merge(&delete);
    assert!(on_b.review.iter().any(|r| matches!(r, ReviewAction::Withdraw(_))));
    for node in [&a, &b, &c] {
        assert_eq!(node.values(), None);
        assert!(displaced_items(node).is_empty());
    }
    assert_eq!(a.state, b.state);
    assert_eq!(b.state, c.state);
}

#[test]
fn a_merge_table_still_merges_two_inserts() {
    let t = table();
    assert_eq!(t.inserts, InsertPolicy::Merge);
    assert_ne!(t.shape_id(), t.clone().with_inserts(InsertPolicy::Review).shape_id());
}

#[test]
fn an_unchanged_toast_value_keeps_the_local_value() {
    let t = table();
    let (mut a, mut b, mut c) = (Node::new(&t), Node::new(&t), Node::new(&t));
    let insert = a.local(ChangeKind::Insert, Some(row("big", 0, "1")), at(1, A));
    b.merge(&insert);
    c.merge(&insert);
    let mut cells = row("ignored", 1, "1");
    cells[0] = Cell::UnchangedToast;
    let update = b.local(ChangeKind::Update, Some(cells), at(2, B));
    assert_eq!(update.row.values[0], Cell::UnchangedToast);
    let merged = a.merge(&update);
    assert_eq!(a.values().unwrap()[0], Cell::Value(Value::text("big")));
    assert_eq!(
        merged.action,
        RowAction::Update(vec![accord_engine::ColumnWrite {
            column: 1,
            value: Value::Int(1)
        }])
    );
}

#[test]
fn a_relayed_row_without_its_toast_value_is_deferred() {
    let t = table();
    let (mut a, mut b) = (Node::new(&t), Node::new(&t));
    b.merge(&a.local(ChangeKind::Insert, Some(row("big", 0, "1")), at(1, A)));
    let mut cells = row("ignored", 1, "1");
    cells[0] = Cell::UnchangedToast;
    let relayed = b.local(ChangeKind::Update, Some(cells), at(2, B));
    // C has not received A's insert yet.
    match merge(&t, None, &relayed).unwrap() {
        MergeOutcome::Deferred { missing } => assert_eq!(missing, ["name"]),
        other => panic!("expected a deferral, got {other:?}"),
    }
}

#[test]
fn rows_older_than_accord_merge_with_their_values_as_the_base() {
    let t = table();
    let base = RowState {
        meta: RowMeta::pre_existing(&t),
        values: row("old", 50, "9"),
    };
    let mut a = Node::new(&t);
    let mut b = Node::new(&t);
    a.state = Some(base.clone());
    b.state = Some(base);
    let from_a = a.local(ChangeKind::Update, Some(row("old", 45, "9")), at(1, A));
    let from_b = b.local(ChangeKind::Update, Some(row("new", 52, "9")), at(1, B));
    a.merge(&from_b);
    b.merge(&from_a);
    assert_eq!(a.values().unwrap(), row("new", 47, "9"));
    assert_eq!(a.state, b.state);
}

#[test]
fn malformed_changes_are_typed_errors() {
    let t = table();
    let mut a = Node::new(&t);
    let good = a.local(ChangeKind::Insert, Some(row("x", 1, "1")), at(1, A));

    let mut wrong_table = good.clone();
    wrong_table.table = "shop.other".into();
    assert!(matches!(
        merge(&t, None, &wrong_table),
        Err(MergeError::WrongTable { .. })
    ));

    let mut short = good.clone();
    short.row.values.pop();
    assert!(matches!(
        merge(&t, None, &short),
        Err(MergeError::ColumnCount {
            found: 2,
            expected: 3,
            ..
        })
    ));

    let mut wrong_policy = good.clone();
    wrong_policy.row.meta.columns[1] = ColumnMeta::Lww(None);
    let err = merge(&t, None, &wrong_policy).unwrap_err();
    assert!(matches!(err, MergeError::PolicyMismatch { .. }));
    assert!(err.to_string().contains("shop.products.stock"), "{err}");
}

#[test]
fn capture_errors_name_the_problem() {
    let t = table();
    let update_without_old = CapturedChange {
        kind: ChangeKind::Update,
        key: key(),
        old: None,
        new: Some(row("x", 1, "1")),
    };
    let err = capture(&t, None, &update_without_old, at(1, A), 1, &[]).unwrap_err();
    assert!(matches!(err, CaptureError::MissingImage { .. }));
    assert!(err.to_string().contains("REPLICA IDENTITY FULL"), "{err}");

    let mut null_stock = row("x", 1, "1");
    null_stock[1] = Cell::Value(Value::Null);
    let insert = CapturedChange {
        kind: ChangeKind::Insert,
        key: key(),
        old: None,
        new: Some(null_stock),
    };
    let err = capture(&t, None, &insert, at(1, A), 1, &[]).unwrap_err();
    assert!(err.to_string().contains("NOT NULL"), "{err}");

    let wrong_width = CapturedChange {
        kind: ChangeKind::Insert,
        key: key(),
        old: None,
        new: Some(vec![Cell::Value(Value::Int(1))]),
    };
    assert!(matches!(
        capture(&t, None, &wrong_width, at(1, A), 1, &[]),
        Err(CaptureError::ColumnCount {
            found: 1,
            expected: 3,
            ..
        })
    ));

    // Metadata written before the table gained a column: an error, not a panic or a misread.
    let mut narrow = RowMeta::pre_existing(&t);
    narrow.columns.pop();
    let update = CapturedChange {
        kind: ChangeKind::Update,
        key: key(),
        old: Some(row("x", 1, "1")),
        new: Some(row("y", 2, "1")),
    };
    assert!(matches!(
        capture(&t, Some(&narrow), &update, at(1, A), 1, &[]),
        Err(CaptureError::MetadataShape {
            found: 2,
            expected: 3,
            ..
        })
    ));
}

#[test]
fn an_update_that_changes_nothing_sends_nothing() {
    let t = table();
    let mut a = Node::new(&t);
    a.local(ChangeKind::Insert, Some(row("x", 1, "1")), at(1, A));
    assert!(a
        .local_resolving(ChangeKind::Update, Some(row("x", 1, "1")), at(2, A), &[])
        .is_none());
    assert_eq!(a.seq, 1);
}

#[test]
fn causal_information_survives_relaying() {
    // C learns of A's write only through B's later change: still counted once, not concurrent.
    let t = table();
    let (mut a, mut b, mut c) = (Node::new(&t), Node::new(&t), Node::new(&t));
    let insert = a.local(ChangeKind::Insert, Some(row("x", 0, "10")), at(1, A));
    b.merge(&insert);
    c.merge(&insert);
    let from_a = a.local(ChangeKind::Update, Some(row("x", 5, "11")), at(2, A));
    b.merge(&from_a);
    let from_b = b.local(ChangeKind::Update, Some(row("x", 6, "12")), at(3, B));
    let first = c.merge(&from_b);
    assert!(first.review.is_empty() && first.conflicts.is_empty());
    let late = c.merge(&from_a);
    assert_eq!(late.action, RowAction::Nothing);
    assert!(late.review.is_empty() && late.conflicts.is_empty());
    assert_eq!(c.values().unwrap(), row("x", 6, "12"));
}

#[test]
fn a_tombstone_records_every_concurrent_delete_and_a_cut_covers_it_only_when_all_are_stable() {
    let t = table();
    let (mut a, mut b) = (Node::new(&t), Node::new(&t));
    let insert = a.local(ChangeKind::Insert, Some(row("x", 1, "1.00")), at(1, A));
    b.merge(&insert);
    let on_a = a.local(ChangeKind::Delete, None, at(2, A));
    let on_b = b.local(ChangeKind::Delete, None, at(3, B));
    a.merge(&on_b);
    b.merge(&on_a);
    let tombstone = &a.state.as_ref().unwrap().meta;
    assert_eq!(tombstone.deleted_by, vec![(A, 2), (B, 1)]);
    assert_eq!(
        tombstone,
        &b.state.as_ref().unwrap().meta,
        "both nodes hold the same tombstone"
    );

    let cut = |a_stable, b_stable| accord_engine::StableCut {
        round: 1,
        stable: vec![(A, a_stable), (B, b_stable)],
    };
    assert!(cut(2, 1).covers(tombstone));
    assert!(!cut(2, 0).covers(tombstone), "B's delete had not reached every node");

    // A covered tombstone reads as absent: the next insert of the key is numbered as a new key's,
    // as on a node that already deleted the tombstone, so both number it alike.
    let covered = cut(2, 1);
    let mut collected = Node::new(&t);
    let mut holder = Node::new(&t);
    holder.state = a.state.clone();
    let live = accord_engine::StableCut::live(Some(&covered), holder.state.as_ref().map(|s| &s.meta));
    assert!(live.is_none());
    holder.state = None;
    let x = collected.local(ChangeKind::Insert, Some(row("again", 5, "2.00")), at(10, A));
    let y = holder.local(ChangeKind::Insert, Some(row("again", 3, "2.00")), at(11, B));
    assert_eq!(x.row.meta.causal_length, y.row.meta.causal_length);
    collected.merge(&y);
    holder.merge(&x);
    assert_eq!(collected.values(), holder.values());
    assert_eq!(
        collected.values().unwrap()[1],
        Cell::Value(Value::Int(8)),
        "both inserts count"
    );
}
