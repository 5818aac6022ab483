//! `accord repair`'s writes on one node (`engine::verify::repair_plan` decides them): each key in
//! a transaction of its own, only if the row is still as the repair's round read it; the row as
//! it was kept in `accord.repaired`, the row and its metadata written as accord replicated them,
//! the repair logged in `accord.conflict_log`.
//!
//! The writes restore what every other node already holds, so they are not changes to replicate:
//! they are made on a session bound to the replication origin `accord_repair`, whose
//! transactions the capture skips as it skips a peer's, and marked as the applier's are (the
//! key-lock triggers leave them alone).

use std::collections::BTreeMap;

use accord_engine::{verify::column_names, NodeId, RepairOutcome, RepairWrite, TableDef};
use anyhow::{Context, Result};
use tokio_postgres::Client;

use super::rows::{quote_ident, quote_table};
use super::store::{encode, shape_param};
use crate::pg_connection::connect;

/// The replication origin repairs are written under.
const REPAIR_ORIGIN: &str = "accord_repair";

/// Writes `writes` to `table` on this node (`node`), returning what became of each.
pub async fn write(dsn: &str, node: NodeId, table: &TableDef, writes: &[RepairWrite]) -> Result<Vec<RepairOutcome>> {
    let mut db = connect(dsn).await?;
    // The values were read as text under these settings; they must read back the same.
    db.batch_execute(super::verify_read::TEXT_SETTINGS).await?;
    db.batch_execute(&format!(
        "SELECT pg_replication_origin_create('{REPAIR_ORIGIN}') WHERE NOT EXISTS \
           (SELECT 1 FROM pg_replication_origin WHERE roname = '{REPAIR_ORIGIN}');
         SELECT pg_replication_origin_session_setup('{REPAIR_ORIGIN}');
         SET {} = on",
        super::key_locks::APPLYING_SETTING
    ))
    .await
    .context("cannot bind the repair's replication origin (is another repair running on this node?)")?;
    let types = column_types(&db, table).await?;
    let names = column_names(table);
    let mut outcomes = Vec::with_capacity(writes.len());
    for write in writes {
        let skipped = if write.meta.is_some() && write.columns != names {
            Some("the nodes hold different shapes of the table: migrate every node first".to_owned())
        } else {
            let tx = db.transaction().await?;
            let skipped = write_one(&tx, node, table, &types, write).await?;
            if skipped.is_none() {
                tx.commit().await?;
            }
            skipped
        };
        outcomes.push(RepairOutcome {
            key: write.key.clone(),
            skipped,
        });
    }
    db.batch_execute("SELECT pg_replication_origin_session_reset()").await?;
    Ok(outcomes)
}

/// One key's write in `tx`; `Some(why)` if it was not made (the transaction is then dropped).
async fn write_one(
    tx: &tokio_postgres::Transaction<'_>,
    node: NodeId,
    table: &TableDef,
    types: &BTreeMap<String, String>,
    write: &RepairWrite,
) -> Result<Option<String>> {
    let key_parts: Vec<String> = table
        .key
        .iter()
        .enumerate()
        .map(|(i, k)| {
            format!(
                "(($1::text::jsonb)->>{i})::{}",
                types.get(&k.name).map_or("text", String::as_str)
            )
        })
        .collect();
    let key_columns: Vec<String> = table.key.iter().map(|k| quote_ident(&k.name)).collect();
    let at_key = format!("({}) = ({})", key_columns.join(", "), key_parts.join(", "));
    let current = tx
        .query_opt(
            &format!(
                "SELECT xmin::text, to_jsonb(t) FROM {} AS t WHERE {at_key} FOR UPDATE",
                quote_table(&table.name)
            ),
            &[&write.key],
        )
        .await?;
    let (xmin, replaced): (Option<String>, Option<serde_json::Value>) = match &current {
        Some(row) => (Some(row.get(0)), Some(row.get(1))),
        None => (None, None),
    };
    if xmin != write.expect_xmin {
        return Ok(Some(
            "the row changed since the repair read it: run the repair again".into(),
        ));
    }
    tx.execute(
        "INSERT INTO accord.repaired (table_name, row_key, replaced, why) VALUES ($1, $2, $3, $4)",
        &[
            &table.name,
            &write.key,
            &replaced,
            &"a version accord never replicated, replaced by the replicated one",
        ],
    )
    .await?;
    let written_xmin: Option<String> = match &write.values {
        Some(values) => {
            let mut names: Vec<String> = key_columns.clone();
            let mut exprs: Vec<String> = key_parts.clone();
            let mut params: Vec<Option<String>> = vec![Some(write.key.clone())];
            for column in &table.columns {
                params.push(values.get(&column.name).cloned().flatten());
                names.push(quote_ident(&column.name));
                exprs.push(format!(
                    "${}::text::{}",
                    params.len(),
                    types.get(&column.name).map_or("text", String::as_str)
                ));
            }
            let updates: Vec<String> = table
                .columns
                .iter()
                .map(|c| format!("{0} = EXCLUDED.{0}", quote_ident(&c.name)))
                .collect();
            let sql = format!(
                "INSERT INTO {} ({}) VALUES ({}) ON CONFLICT ({}) DO {} RETURNING xmin::text",
                quote_table(&table.name),
                names.join(", "),
                exprs.join(", "),
                key_columns.join(", "),
                if updates.is_empty() {
                    "NOTHING".to_owned()
                } else {
                    format!("UPDATE SET {}", updates.join(", "))
                }
            );
            let refs: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> = params
                .iter()
                .map(|p| p as &(dyn tokio_postgres::types::ToSql + Sync))
                .collect();
            tx.query_opt(&sql, &refs).await?.map(|row| row.get(0))
        }
        None => {
            tx.execute(
                &format!("DELETE FROM {} WHERE {at_key}", quote_table(&table.name)),
                &[&write.key],
            )
            .await?;
            None
        }
    };
    match &write.meta {
        Some(meta) => {
            tx.execute(
                "INSERT INTO accord.row_meta (table_name, row_key, meta, alive, known_xmin, shape)
                 VALUES ($1, $2, $3, $4, $5, $6)
                 ON CONFLICT (table_name, row_key) DO UPDATE
                   SET meta = EXCLUDED.meta, alive = EXCLUDED.alive, known_xmin = EXCLUDED.known_xmin,
                       shape = EXCLUDED.shape",
                &[
                    &table.name,
                    &write.key,
                    &encode("row metadata", meta)?,
                    &meta.is_alive(),
                    &written_xmin,
                    &shape_param(table.shape_id()),
                ],
            )
            .await?;
        }
        None => {
            tx.execute(
                "DELETE FROM accord.row_meta WHERE table_name = $1 AND row_key = $2",
                &[&table.name, &write.key],
            )
            .await?;
        }
    }
    tx.execute(
        "INSERT INTO accord.conflict_log (table_name, row_key, column_name, kind, winner, loser)
         VALUES ($1, $2, NULL, 'Repair', 'the row as accord replicated it', $3)",
        &[
            &table.name,
            &write.key,
            &format!("node {node}'s version, written behind accord's back (kept in accord.repaired)"),
        ],
    )
    .await?;
    Ok(None)
}

/// Every column's type as PostgreSQL writes it (`format_type`), by name: what the repair's text
/// values are cast to.
async fn column_types(db: &Client, table: &TableDef) -> Result<BTreeMap<String, String>> {
    let rows = db
        .query(
            "SELECT attname::text, pg_catalog.format_type(atttypid, atttypmod) FROM pg_catalog.pg_attribute
              WHERE attrelid = to_regclass($1) AND attnum > 0 AND NOT attisdropped",
            &[&quote_table(&table.name)],
        )
        .await
        .with_context(|| format!("cannot read the column types of {}", table.name))?;
    Ok(rows.iter().map(|row| (row.get(0), row.get(1))).collect())
}
