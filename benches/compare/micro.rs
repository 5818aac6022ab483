//! Scenario 5: figures of accord's engine and simulator, no PostgreSQL involved.
//!
//! - The merge hot path: the mixed row of `engine/benches/merge.rs` (12 columns: 9 `lww`, 2
//!   `delta`, 1 `review`; a remote change concurrent with the last local write touches all 12),
//!   merged in a loop; merges per second.
//! - The simulator: `accord sim` seeds 0..N with the defaults (3 nodes, 2,000 operations, all fault
//!   kinds) run one after another on one thread; seeds per second and engine merges per second.

use std::hint::black_box;
use std::time::{Duration, Instant};

use accord_engine::{
    capture, merge, CapturedChange, Cell, ChangeKind, ColumnDef, ColumnPolicy, ColumnType, Hlc, KeyColumn,
    MergeOutcome, NodeId, RowKey, RowState, TableDef, Value,
};
use anyhow::{anyhow, bail, Result};

use crate::Row;

fn mixed_table() -> Result<TableDef> {
    let mut policies = [ColumnPolicy::Lww; 12];
    policies[3] = ColumnPolicy::Delta;
    policies[4] = ColumnPolicy::Delta;
    policies[7] = ColumnPolicy::Review;
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
    Ok(TableDef::new(
        "bench.rows",
        vec![KeyColumn {
            name: "id".into(),
            ty: ColumnType::BigInt,
        }],
        columns,
    )?)
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

/// Merges per second of one remote change into a local row state (see the module comment).
fn merge_rate(min_time: Duration) -> Result<f64> {
    let table = mixed_table()?;
    let key = RowKey(vec![Value::Int(42)]);
    let mut meta = None;
    let mut current = values(&table, 0);
    let mut stamp = 1_000_000u64;
    let mut last = None;
    for round in 0..4i64 {
        let new = values(&table, round + 1);
        let captured = capture(
            &table,
            meta.as_ref(),
            &CapturedChange {
                kind: if round == 0 {
                    ChangeKind::Insert
                } else {
                    ChangeKind::Update
                },
                key: key.clone(),
                old: (round > 0).then(|| current.clone()),
                new: Some(new.clone()),
            },
            Hlc::new(stamp, 0, NodeId((round % 3) as u32 + 1)),
            round as u64 + 1,
            &[],
        )?
        .ok_or_else(|| anyhow!("bench write changed nothing"))?;
        meta = Some(captured.meta);
        current = new;
        stamp += 10;
        last = Some(captured.change);
    }
    let prior = last.ok_or_else(|| anyhow!("no rounds"))?.row.meta;
    let remote = capture(
        &table,
        Some(&prior),
        &CapturedChange {
            kind: ChangeKind::Update,
            key,
            old: Some(current.clone()),
            new: Some(values(&table, 99)),
        },
        Hlc::new(stamp + 5, 0, NodeId(4)),
        1,
        &[],
    )?
    .ok_or_else(|| anyhow!("bench write changed nothing"))?
    .change;
    let local = RowState {
        meta: meta.ok_or_else(|| anyhow!("no rounds"))?,
        values: current,
    };
    if !matches!(merge(&table, Some(&local), &remote), Ok(MergeOutcome::Applied(_))) {
        bail!("the bench merge does not apply");
    }
    let started = Instant::now();
    let mut done = 0u64;
    while started.elapsed() < min_time {
        for _ in 0..1_000 {
            let _ = black_box(merge(black_box(&table), black_box(Some(&local)), black_box(&remote)));
        }
        done += 1_000;
    }
    Ok(done as f64 / started.elapsed().as_secs_f64())
}

pub fn run(seeds: u64) -> Result<Vec<Row>> {
    let mut rows = Vec::new();
    let rate = merge_rate(Duration::from_secs(2))?;
    rows.push(Row::micro(
        "merge, mixed 12-column row",
        "merges/s",
        rate,
        format!("{rate:.0} ({:.0} column merges/s)", rate * 12.0),
    ));
    let started = Instant::now();
    let (mut merges, mut failed) = (0u64, 0u64);
    for seed in 0..seeds {
        let report = accord_sim::run_seed(&accord_sim::SimConfig::new(seed));
        merges += report.stats.merges;
        failed += u64::from(!report.passed());
    }
    let took = started.elapsed();
    rows.push(Row::micro(
        "simulator, default seeds",
        "seeds/s",
        seeds as f64 / took.as_secs_f64(),
        format!(
            "{:.2} ({seeds} seeds in {took:.1?}, {failed} failed, {:.0} merges/s)",
            seeds as f64 / took.as_secs_f64(),
            merges as f64 / took.as_secs_f64()
        ),
    ));
    Ok(rows)
}
