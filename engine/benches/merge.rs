//! The merge hot path: column merges per second for rows of 12 columns of one policy, and for a
//! mixed row. Each iteration merges one remote change that touches every column into a local
//! row state, the work the apply path does per changed row.

use std::hint::black_box;

use accord_engine::{
    capture, merge, CapturedChange, Cell, ChangeKind, ColumnDef, ColumnPolicy, ColumnType, Hlc, KeyColumn,
    MergeOutcome, NodeId, RowChange, RowKey, RowState, TableDef, Value,
};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};

const COLUMNS: usize = 12;

fn table(policies: &[ColumnPolicy]) -> TableDef {
    let columns = policies
        .iter()
        .enumerate()
        .map(|(i, &policy)| ColumnDef {
            name: format!("c{i}"),
            ty: if policy == ColumnPolicy::Delta {
                ColumnType::BigInt
            } else {
                ColumnType::Other("text".into())
            },
            policy,
        })
        .collect();
    TableDef::new(
        "bench.rows",
        vec![KeyColumn {
            name: "id".into(),
            ty: ColumnType::BigInt,
        }],
        columns,
    )
    .expect("bench table is valid")
}

fn values(table: &TableDef, round: i64) -> Vec<Cell> {
    table
        .columns
        .iter()
        .enumerate()
        .map(|(i, c)| match c.policy {
            ColumnPolicy::Delta => Cell::Value(Value::Int(1_000 + round * (i as i64 + 1))),
            _ => Cell::Value(Value::text(format!("value {round} of column {i:>2}"))),
        })
        .collect()
}

/// A local row that has seen a few rounds of writes from three nodes, and a remote change from a
/// fourth node, concurrent with the last local write, that touches every column.
fn scenario(table: &TableDef) -> (RowState, RowChange) {
    let key = RowKey(vec![Value::Int(42)]);
    let mut meta = None;
    let mut current = values(table, 0);
    let mut stamp = 1_000_000u64;
    let mut change = None;
    for round in 0..4i64 {
        let node = NodeId((round % 3) as u32 + 1);
        let new = values(table, round + 1);
        let captured = capture(
            table,
            meta.as_ref(),
            &CapturedChange {
                kind: if round == 0 {
                    ChangeKind::Insert
                } else {
                    ChangeKind::Update
                },
                key: key.clone(),
                old: if round == 0 { None } else { Some(current.clone()) },
                new: Some(new.clone()),
            },
            Hlc::new(stamp, 0, node),
            round as u64 + 1,
            &[],
        )
        .expect("bench capture succeeds")
        .expect("bench writes change every column");
        meta = Some(captured.meta);
        current = new;
        stamp += 10;
        change = Some(captured.change);
    }
    let base = change.expect("four rounds ran");
    // The remote node saw the state before the last local write, then wrote every column.
    let remote_prior = base.row.meta.clone();
    let remote_new = values(table, 99);
    let remote = capture(
        table,
        Some(&remote_prior),
        &CapturedChange {
            kind: ChangeKind::Update,
            key,
            old: Some(current.clone()),
            new: Some(remote_new),
        },
        Hlc::new(stamp + 5, 0, NodeId(4)),
        1,
        &[],
    )
    .expect("bench capture succeeds")
    .expect("bench writes change every column")
    .change;
    let local = RowState {
        meta: meta.expect("four rounds ran"),
        values: current,
    };
    (local, remote)
}

fn bench_policy(c: &mut Criterion, name: &str, policies: &[ColumnPolicy]) {
    let table = table(policies);
    let (local, remote) = scenario(&table);
    match merge(&table, Some(&local), &remote) {
        Ok(MergeOutcome::Applied(m)) => assert!(!matches!(m.action, accord_engine::RowAction::Nothing)),
        other => panic!("bench merge must apply: {other:?}"),
    }
    let mut group = c.benchmark_group("merge");
    group.throughput(Throughput::Elements(policies.len() as u64));
    group.bench_function(name, |b| {
        b.iter(|| merge(black_box(&table), black_box(Some(&local)), black_box(&remote)))
    });
    group.finish();
}

fn merges(c: &mut Criterion) {
    bench_policy(c, "lww_12_columns", &[ColumnPolicy::Lww; COLUMNS]);
    bench_policy(c, "delta_12_columns", &[ColumnPolicy::Delta; COLUMNS]);
    bench_policy(c, "review_12_columns", &[ColumnPolicy::Review; COLUMNS]);
    let mut mixed = [ColumnPolicy::Lww; COLUMNS];
    mixed[3] = ColumnPolicy::Delta;
    mixed[4] = ColumnPolicy::Delta;
    mixed[7] = ColumnPolicy::Review;
    bench_policy(c, "mixed_12_columns", &mixed);
}

criterion_group!(benches, merges);
criterion_main!(benches);
