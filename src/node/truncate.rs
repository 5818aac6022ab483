//! TRUNCATE of replicated tables. Decoding names only the tables a TRUNCATE emptied, so a
//! statement trigger records, in the truncating transaction, the keys of the rows it empties
//! (`accord.truncated`); the capture turns them into one delete per row (`engine::Truncate`), and
//! forgets them in the transaction that writes the deletes. A TRUNCATE of one partition of a
//! replicated partitioned table is refused: PostgreSQL does not publish it when the table is
//! published through its root (`SET accord.allow_truncate = on` empties one node's partition on
//! purpose).

use accord_engine::{RowKey, TableDef, Value};
use anyhow::{Context, Result};
use tokio_postgres::GenericClient;

use super::key_locks::literal;
use super::rows::{quote_table, read_expr};

pub const RECORD_TRIGGER: &str = "zz_accord_record_truncate";

pub const DDL: &str = "
CREATE TABLE IF NOT EXISTS accord.truncated (
    xid        bigint  NOT NULL,
    table_name text    NOT NULL,
    statement  integer NOT NULL,
    key        text[]  NOT NULL
);
CREATE INDEX IF NOT EXISTS truncated_by_transaction ON accord.truncated (xid, table_name, statement);
";

/// Runs with the capture's text settings (`capture::replication_config`), so that a key reads
/// back as decoding delivers it; a function's `SET` lasts only while it runs. `TG_ARGV[0]` is the
/// table's name as accord's policy says it, `TG_ARGV[1]` its key as an array of text.
const RECORD_FUNCTION: &str = "
CREATE OR REPLACE FUNCTION accord.record_truncate() RETURNS trigger LANGUAGE plpgsql
    SET datestyle = 'ISO, YMD' SET intervalstyle = 'iso_8601' SET timezone = 'UTC' SET extra_float_digits = 3
AS $accord$
DECLARE
    this_xid bigint := (pg_catalog.pg_current_xact_id()::xid)::text::bigint;
    this_statement integer;
BEGIN
    SELECT coalesce(max(t.statement), 0) + 1 INTO this_statement
      FROM accord.truncated t WHERE t.xid = this_xid AND t.table_name = TG_ARGV[0];
    EXECUTE format('INSERT INTO accord.truncated (xid, table_name, statement, key) SELECT $1, $2, $3, %s FROM %s',
                   TG_ARGV[1], TG_RELID::regclass)
        USING this_xid, TG_ARGV[0], this_statement;
    -- It removes rows: a missing row's key may now have a local history the capture has not
    -- read (key_locks.rs).
    PERFORM accord.count_removal();
    -- Its partitions' guards let this TRUNCATE through (they fire after it, in this statement).
    PERFORM pg_catalog.set_config('accord.truncating', TG_RELID::oid::text || ' ' || pg_catalog.statement_timestamp()::text, true);
    RETURN NULL;
END
$accord$;
";

const REFUSE_FUNCTION: &str = "
CREATE OR REPLACE FUNCTION accord.refuse_truncate() RETURNS trigger LANGUAGE plpgsql AS $accord$
BEGIN
    IF pg_catalog.current_setting('accord.allow_truncate', true) = 'on'
       OR pg_catalog.current_setting('accord.truncating', true) =
          pg_catalog.pg_partition_root(TG_RELID)::oid::text || ' ' || pg_catalog.statement_timestamp()::text THEN
        RETURN NULL;
    END IF;
    RAISE EXCEPTION 'TRUNCATE of partition %.% is refused: accord replicates the partitioned table as one table, and PostgreSQL does not publish the TRUNCATE of one partition, so the other nodes would keep its rows',
        TG_TABLE_SCHEMA, TG_TABLE_NAME
        USING ERRCODE = 'feature_not_supported',
              HINT = 'DELETE FROM the partition, or TRUNCATE the whole table: both replicate. To empty this node''s partition only, SET accord.allow_truncate = on first.';
END
$accord$;
";

fn record_trigger_sql(table: &TableDef) -> String {
    let key: Vec<String> = table.key.iter().map(|k| read_expr(&k.name, &k.ty)).collect();
    format!(
        "CREATE OR REPLACE TRIGGER {RECORD_TRIGGER} BEFORE TRUNCATE ON {} FOR EACH STATEMENT
            EXECUTE FUNCTION accord.record_truncate({}, {})",
        quote_table(&table.name),
        literal(&table.name),
        literal(&format!("ARRAY[{}]", key.join(", "))),
    )
}

/// Installs the table of recorded keys, the functions and each table's trigger: on all tables
/// (`accord init`, whose policy may have changed a key), or where it is missing (a node starting
/// on a database initialised by an earlier version). Returns how many tables got it.
pub async fn install(db: &impl GenericClient, tables: &[TableDef], replace: bool) -> Result<usize> {
    db.batch_execute(DDL).await.context("cannot create accord.truncated")?;
    db.batch_execute(RECORD_FUNCTION)
        .await
        .context("cannot create accord.record_truncate()")?;
    db.batch_execute(REFUSE_FUNCTION)
        .await
        .context("cannot create accord.refuse_truncate()")?;
    let mut installed = 0;
    for table in tables {
        let present = db
            .query_opt(
                "SELECT 1 FROM pg_catalog.pg_trigger WHERE tgrelid = $1::text::regclass AND tgname = $2",
                &[&quote_table(&table.name), &RECORD_TRIGGER],
            )
            .await
            .with_context(|| format!("cannot find table {}", table.name))?
            .is_some();
        if present && !replace {
            continue;
        }
        db.batch_execute(&record_trigger_sql(table))
            .await
            .with_context(|| format!("cannot install accord's TRUNCATE trigger on {}", table.name))?;
        installed += 1;
    }
    Ok(installed)
}

/// The keys the `statement`-th TRUNCATE of `table` in transaction `xid` emptied.
pub async fn emptied(db: &impl GenericClient, xid: u64, table: &TableDef, statement: i32) -> Result<Vec<RowKey>> {
    let xid = i64::try_from(xid).context("a transaction id beyond bigint")?;
    let rows = db
        .query(
            "SELECT key FROM accord.truncated WHERE xid = $1 AND table_name = $2 AND statement = $3",
            &[&xid, &table.name, &statement],
        )
        .await?;
    let mut keys = Vec::with_capacity(rows.len());
    for row in rows {
        let texts: Vec<Option<String>> = row.get(0);
        let values = texts
            .iter()
            .zip(&table.key)
            .map(|(text, column)| match text {
                None => Ok(Value::Null),
                Some(text) => Value::parse(&column.ty, text)
                    .with_context(|| format!("a recorded key of {} does not read back: {text:?}", table.name)),
            })
            .collect::<Result<Vec<_>>>()?;
        keys.push(RowKey(values));
    }
    Ok(keys)
}

/// Forgets what the transactions' TRUNCATEs recorded, once their deletes are written.
pub const FORGET_SQL: &str = "DELETE FROM accord.truncated WHERE xid = ANY($1)";
