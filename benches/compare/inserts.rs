//! Scenario 6: what accord's key-lock triggers cost a local insert, and an update that changes no
//! key (ARCHITECTURE.md, "Apply").
//!
//! One scratch cluster, two tables of the same shape; `bench.keyed` has the triggers `accord
//! init` installs (`accord::node::key_locks`), `bench.plain` none. Rounds alternate between them
//! so that the machine's noise falls on both: single-row inserts from 2 clients
//! (`synchronous_commit = off`, as the other scenarios' writers), and one bulk `INSERT ... SELECT`
//! per round, then single-row updates of the rows the clients inserted (no key changed: the
//! update trigger's `WHEN` is evaluated, and says no). Figures: inserts and updates per second
//! on each table, and the keyed one's ratio to the plain.

use std::sync::Arc;
use std::time::{Duration, Instant};

use accord::node::key_locks;
use accord::scratch_pg::PgCluster;
use accord_engine::{ColumnDef, ColumnPolicy, ColumnType, KeyColumn, TableDef};
use anyhow::{anyhow, Context, Result};
use tokio_postgres::Client;

use crate::Row;

const TABLES: [&str; 2] = ["bench.plain", "bench.keyed"];
const CLIENTS: i64 = 2;
const ROUNDS: usize = 3;

fn keyed_table() -> Result<TableDef> {
    Ok(TableDef::new(
        "bench.keyed",
        vec![KeyColumn {
            name: "id".into(),
            ty: ColumnType::BigInt,
        }],
        vec![ColumnDef {
            name: "v".into(),
            ty: ColumnType::Other("text".into()),
            policy: ColumnPolicy::Lww,
        }],
    )?)
}

/// `sql` with each key of `per_client` consecutive keys per session, keys from `first`, one
/// statement each, every statement touching one row; statements per second.
async fn each_key(clients: &[Arc<Client>], sql: &str, first: i64, per_client: i64) -> Result<f64> {
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for (c, db) in clients.iter().enumerate() {
        let db = Arc::clone(db);
        let sql = sql.to_string();
        let start = first + c as i64 * per_client;
        tasks.spawn(async move {
            let stmt = db.prepare(&sql).await?;
            for id in start..start + per_client {
                let n = db.execute(&stmt, &[&id]).await.with_context(|| sql.clone())?;
                anyhow::ensure!(n == 1, "{sql} touched {n} rows for key {id}");
            }
            Ok::<(), anyhow::Error>(())
        });
    }
    while let Some(result) = tasks.join_next().await {
        result.map_err(|e| anyhow!("a writing client panicked: {e}"))??;
    }
    Ok((per_client * clients.len() as i64) as f64 / started.elapsed().as_secs_f64())
}

/// One `INSERT ... SELECT` of `rows` rows; rows per second.
async fn bulk(db: &Client, table: &str, first: i64, rows: i64) -> Result<f64> {
    let started = Instant::now();
    db.execute(
        &format!("INSERT INTO {table} (id, v) SELECT g, 'value' FROM generate_series($1::bigint, $2::bigint) AS g"),
        &[&first, &(first + rows - 1)],
    )
    .await
    .context("bulk insert")?;
    Ok(rows as f64 / started.elapsed().as_secs_f64())
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

pub async fn run(single_per_client: i64, bulk_rows: i64) -> Result<Vec<Row>> {
    let pg = tokio::task::spawn_blocking(PgCluster::start)
        .await
        .map_err(|e| anyhow!("starting PostgreSQL panicked: {e}"))??;
    let db = pg.create_database("inserts").await?;
    db.batch_execute(
        "CREATE SCHEMA bench; CREATE SCHEMA accord;
         CREATE TABLE bench.plain (id bigint PRIMARY KEY, v text);
         CREATE TABLE bench.keyed (id bigint PRIMARY KEY, v text);",
    )
    .await?;
    key_locks::install_triggers(&db, &[keyed_table()?], true).await?;
    let mut clients = Vec::new();
    for _ in 0..CLIENTS {
        let c = pg.connect("inserts").await?;
        c.batch_execute("SET synchronous_commit = off").await?;
        clients.push(Arc::new(c));
    }
    db.batch_execute("SET synchronous_commit = off").await?;

    let mut single: [Vec<f64>; 2] = [Vec::new(), Vec::new()];
    let mut bulks: [Vec<f64>; 2] = [Vec::new(), Vec::new()];
    let mut updates: [Vec<f64>; 2] = [Vec::new(), Vec::new()];
    let mut next = 1i64;
    for round in 0..ROUNDS {
        // Which table goes first alternates too.
        for t in [round % 2, 1 - round % 2] {
            let insert = format!("INSERT INTO {} (id, v) VALUES ($1, 'value')", TABLES[t]);
            single[t].push(each_key(&clients, &insert, next, single_per_client).await?);
            // The rows just inserted, no key changed: the update trigger's WHEN says no.
            let update = format!("UPDATE {} SET v = 'changed' WHERE id = $1", TABLES[t]);
            updates[t].push(each_key(&clients, &update, next, single_per_client).await?);
            next += single_per_client * CLIENTS;
            bulks[t].push(bulk(&db, TABLES[t], next, bulk_rows).await?);
            next += bulk_rows;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let mut rows = Vec::new();
    for (what, figures, unit) in [
        ("single-row inserts, 2 clients", single, "inserts/s"),
        ("one INSERT ... SELECT", bulks, "rows/s"),
        ("single-row updates of no key, 2 clients", updates, "updates/s"),
    ] {
        let [plain, keyed] = figures.map(median);
        rows.push(Row::accord(
            "6 local inserts",
            &format!("{what}, {unit}, with accord's triggers"),
            keyed,
            format!(
                "{keyed:.0} ({:.2}× the same table without them: {plain:.0})",
                keyed / plain
            ),
        ));
    }
    Ok(rows)
}
