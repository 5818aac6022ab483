//! The review queue, for people: list, show, resolve.
//!
//! A resolution is an ordinary local write of the column, made in the same transaction as a row in
//! `accord.review_resolutions` naming the item: the capture sees both, stamps the write as a
//! resolution of that item, and it replicates like any write, closing the item on every node.

use accord_engine::{ReviewItem, ReviewItemId, ReviewKind, Value};
use accord_schema_annotations::SchemaPolicy;
use anyhow::{anyhow, bail, Context, Result};
use tokio_postgres::Client;

use super::rows::{rewrite_row, update_row};
use super::store::decode;

/// An HLC stamp's physical time (microseconds since the Unix epoch) as UTC, to the millisecond,
/// for reviewers; a time past what a calendar date can hold is shown as the raw microseconds.
pub fn utc(micros: u64) -> String {
    let at = time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(micros) * 1_000);
    match at {
        Ok(t) => format!(
            "{:04}-{:02}-{:02} {:02}:{:02}:{:02}.{:03} UTC",
            t.year(),
            u8::from(t.month()),
            t.day(),
            t.hour(),
            t.minute(),
            t.second(),
            t.millisecond()
        ),
        Err(_) => format!("{micros} µs after 1970"),
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReviewEntry {
    pub id: ReviewItemId,
    pub status: String,
    pub item: ReviewItem,
    pub closed_value: Option<String>,
    pub closed_by: Option<String>,
}

/// How a reviewer resolves an item.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Choice {
    /// The candidate at this position (from 1, in the order `show` lists them).
    Pick(usize),
    /// A value of the reviewer's own, in PostgreSQL's text form.
    Value(String),
}

fn entry(row: &tokio_postgres::Row) -> Result<ReviewEntry> {
    let id: String = row.get(0);
    let item: ReviewItem = decode("review item", row.get::<_, &[u8]>(2))?;
    Ok(ReviewEntry {
        id: id.parse().map_err(|_| anyhow!("malformed review item id {id:?}"))?,
        status: row.get(1),
        item,
        closed_value: row.get(3),
        closed_by: row.get(4),
    })
}

const COLUMNS: &str = "id, status, item, closed_value, closed_by";

/// Items with `status` (`open`, `resolved`, `superseded`), oldest first; all when `None`.
pub async fn list(db: &Client, status: Option<&str>) -> Result<Vec<ReviewEntry>> {
    let rows = db
        .query(
            &format!(
                "SELECT {COLUMNS} FROM accord.review_items WHERE $1::text IS NULL OR status = $1 ORDER BY opened_at, id"
            ),
            &[&status],
        )
        .await
        .context("cannot read the review queue")?;
    rows.iter().map(entry).collect()
}

pub async fn show(db: &Client, id: ReviewItemId) -> Result<ReviewEntry> {
    let row = db
        .query_opt(
            &format!("SELECT {COLUMNS} FROM accord.review_items WHERE id = $1"),
            &[&id.to_string()],
        )
        .await?
        .ok_or_else(|| anyhow!("there is no review item {id}"))?;
    entry(&row)
}

/// Resolves an open concurrent-write item by writing the chosen value. Returns the value written.
pub async fn resolve(db: &mut Client, policy: &SchemaPolicy, id: ReviewItemId, choice: Choice) -> Result<Value> {
    let current = show(db, id).await?;
    if current.status != "open" {
        bail!("review item {id} is already {}", current.status);
    }
    let item = current.item;
    if let ReviewKind::DisplacedInsert { values, .. } = &item.kind {
        return resolve_displaced(db, policy, id, &item, values, choice).await;
    }
    let ReviewKind::Concurrent { candidates, .. } = &item.kind else {
        bail!(
            "review item {id} is a change that could not be applied here, not a choice between values; \
             fix its cause and the next change of the row carries the data again"
        );
    };
    let table = policy
        .table(&item.table)
        .ok_or_else(|| anyhow!("table {} is no longer replicated", item.table))?;
    let column_name = item
        .column
        .as_deref()
        .ok_or_else(|| anyhow!("review item {id} names no column"))?;
    let column = table
        .column_index(column_name)
        .ok_or_else(|| anyhow!("{}.{column_name} no longer exists", item.table))?;
    let value = match choice {
        Choice::Pick(n) => candidates
            .get(n.wrapping_sub(1))
            .map(|c| c.value.clone())
            .ok_or_else(|| {
                anyhow!(
                    "review item {id} has {} candidates; pick 1 to {}",
                    candidates.len(),
                    candidates.len()
                )
            })?,
        Choice::Value(text) => Value::parse(&table.columns[column].ty, &text)
            .with_context(|| format!("{text:?} is not a value of {}.{column_name}", item.table))?,
    };
    let tx = db.transaction().await?;
    mark_resolved(&tx, id, &value).await?;
    update_row(&tx, table, &item.key, &[(column, &value)])
        .await
        .with_context(|| format!("cannot write the resolution into {}", item.table))?;
    tx.commit().await?;
    Ok(value)
}

/// Marks item `id` resolved with `value` here and names it in `accord.review_resolutions`, in the
/// transaction that then writes the resolution. Marked at once, so that a second resolution of
/// the same item is refused here; the capture then records the resolution's stamp, as every
/// other node will. The resolution comes before the write: the capture reads them in this order.
async fn mark_resolved(tx: &tokio_postgres::Transaction<'_>, id: ReviewItemId, value: &Value) -> Result<()> {
    let marked = tx
        .execute(
            "UPDATE accord.review_items
             SET status = 'resolved', closed_value = $2, closed_by = (SELECT node_id::text FROM accord.node), closed_at = now()
             WHERE id = $1 AND status = 'open'",
            &[&id.to_string(), &value.to_pg_text()],
        )
        .await?;
    if marked != 1 {
        bail!("review item {id} was resolved or superseded meanwhile");
    }
    tx.execute(
        "INSERT INTO accord.review_resolutions (item_id) VALUES ($1)
         ON CONFLICT (item_id) DO UPDATE SET resolved_at = now()",
        &[&id.to_string()],
    )
    .await?;
    Ok(())
}

/// Resolves a displaced insert: `--pick 1` keeps the row as it is, `--pick 2` writes the
/// displaced insert's values over it. Either is a write of the row, which the capture stamps as
/// the item's resolution (the displaced insert then stays closed on every node).
async fn resolve_displaced(
    db: &mut Client,
    policy: &SchemaPolicy,
    id: ReviewItemId,
    item: &ReviewItem,
    values: &[(String, Option<Value>)],
    choice: Choice,
) -> Result<Value> {
    let take = match choice {
        Choice::Pick(1) => false,
        Choice::Pick(2) => true,
        Choice::Pick(n) => bail!(
            "review item {id} is an insert that lost its key to an earlier one: pick 1 keeps the row as it is, \
             2 writes the displaced insert's values over it (not {n})"
        ),
        Choice::Value(_) => bail!(
            "review item {id} is an insert that lost its key to an earlier one, not a column's value: pick 1 keeps \
             the row as it is, 2 writes the displaced insert's values over it (to keep both, insert the displaced \
             one under a new key first, then pick 1)"
        ),
    };
    let table = policy
        .table(&item.table)
        .ok_or_else(|| anyhow!("table {} is no longer replicated", item.table))?;
    let writes: Vec<(usize, &Value)> = values
        .iter()
        .filter_map(|(name, value)| Some((table.column_index(name)?, value.as_ref()?)))
        .collect();
    let outcome = if take {
        Value::text("the displaced insert's values written over the row")
    } else {
        Value::text("the row kept as it was")
    };
    let tx = db.transaction().await?;
    mark_resolved(&tx, id, &outcome).await?;
    if take && !writes.is_empty() {
        update_row(&tx, table, &item.key, &writes)
            .await
            .with_context(|| format!("cannot write the displaced insert into {}", item.table))?;
    } else {
        let written = rewrite_row(&tx, table, &item.key)
            .await
            .with_context(|| format!("cannot write the resolution into {}", item.table))?;
        if written == 0 {
            bail!(
                "{} {} no longer exists; its review item closes with it",
                item.table,
                item.key
            );
        }
    }
    tx.commit().await?;
    Ok(outcome)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stamps_show_as_utc() {
        assert_eq!(utc(0), "1970-01-01 00:00:00.000 UTC");
        // 2024-02-29 23:59:59.123456 UTC, a leap day.
        assert_eq!(utc(1_709_251_199_123_456), "2024-02-29 23:59:59.123 UTC");
        assert_eq!(utc(951_782_400_000_000), "2000-02-29 00:00:00.000 UTC");
        assert_eq!(utc(4_102_444_800_000_000), "2100-01-01 00:00:00.000 UTC");
        assert_eq!(utc(u64::MAX), format!("{} µs after 1970", u64::MAX));
    }
}
