//! Tables tagged `@accord replicate` while the node runs (issue 17): a migration that creates a
//! table, or tags one that was local, brings it into replication without `accord init`.
//!
//! A table is *taken in* by `accord.take_in(table)`, in the transaction that tags it: accord's
//! event trigger calls it when a `COMMENT` tags a table (installing one takes a superuser; a
//! migration may call it itself). Under a lock every writer of the table conflicts with, it sets
//! the replica identity, notes the rows the table holds (their `ctid` and `xmin`) and adds the
//! table to the publication. A write to the table then commits either before the tag (and is one
//! of the rows noted) or after it (and the capture decodes it): none falls between, which a
//! node noticing the tag later could not promise.
//!
//! The node then finishes the take-in ([`take_in_tagged`], every two seconds): accord's triggers,
//! the table's shape, and metadata for the noted rows that are still as they were (a row written
//! since is the capture's, which reads a row without metadata as one older than accord). Until
//! it has, the appliers leave the table alone ([`replicated_policy`]), so a peer's change to it
//! waits like a change to a column this node lacks. Without the event trigger, the node takes a
//! tagged table in when it notices it, and rows written to it before then count as existing rows.
//!
//! The rows a table holds when it is taken in are recorded as `accord init` records existing
//! rows, as they are, with no history: the same rows on every node (a table created empty, or
//! filled by the same migration everywhere). Sending them to peers as inserts instead would count
//! a `delta` column's seeded value once per node that ran the same migration.

use std::collections::BTreeSet;

use accord_engine::TableDef;
use accord_schema_annotations::SchemaPolicy;
use anyhow::{Context, Result};
use tokio_postgres::{Client, GenericClient};

use super::init::{load_policy, record_existing_rows};
use super::key_locks;
use super::rows::quote_table;
use super::store::{PUBLICATION, RESOLUTIONS_TABLE};
use super::truncate;

/// The tables in accord's publication, as `schema.table`.
pub async fn published(db: &impl GenericClient) -> Result<BTreeSet<String>> {
    let rows = db
        .query(
            "SELECT n.nspname || '.' || c.relname
               FROM pg_catalog.pg_publication p
               JOIN pg_catalog.pg_publication_rel r ON r.prpubid = p.oid
               JOIN pg_catalog.pg_class c ON c.oid = r.prrelid
               JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
              WHERE p.pubname = $1",
            &[&PUBLICATION],
        )
        .await
        .context("cannot read accord's publication")?;
    Ok(rows
        .iter()
        .map(|row| row.get::<_, String>(0))
        .filter(|name| name != RESOLUTIONS_TABLE)
        .collect())
}

/// What `accord init` installs, and a node starting on a database initialised before it.
pub const TAKE_IN_DDL: &str = r#"
CREATE TABLE IF NOT EXISTS accord.taking_in (
    table_name text PRIMARY KEY,
    tagged_at  timestamptz NOT NULL DEFAULT now()
);
COMMENT ON TABLE accord.taking_in IS 'accord: tables tagged for replication whose take-in the node has not finished';
CREATE TABLE IF NOT EXISTS accord.existing_rows (
    table_name text NOT NULL,
    row_ctid   tid  NOT NULL,
    row_xmin   xid  NOT NULL
);
COMMENT ON TABLE accord.existing_rows IS 'accord: the rows a table held when it was tagged for replication';
CREATE TABLE IF NOT EXISTS accord.left_tables (
    table_name text PRIMARY KEY,
    left_at    timestamptz NOT NULL DEFAULT now()
);
COMMENT ON TABLE accord.left_tables IS 'accord: tables this node replicated and left; peers'' changes to them are not applied';
CREATE OR REPLACE FUNCTION accord.leave_replication(target regclass) RETURNS boolean
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog AS $accord$
DECLARE
    name text;
BEGIN
    SELECT n.nspname || '.' || c.relname INTO name
      FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.oid = target;
    IF NOT EXISTS (SELECT 1 FROM pg_publication_rel r JOIN pg_publication p ON p.oid = r.prpubid
                    WHERE p.pubname = 'accord_pub' AND r.prrelid = target) THEN
        RETURN false;
    END IF;
    EXECUTE format('ALTER PUBLICATION accord_pub DROP TABLE %s', target);
    EXECUTE format('DROP TRIGGER IF EXISTS zz_accord_key_lock_insert ON %s', target);
    EXECUTE format('DROP TRIGGER IF EXISTS zz_accord_key_lock_update ON %s', target);
    EXECUTE format('DROP TRIGGER IF EXISTS zz_accord_count_inserts ON %s', target);
    EXECUTE format('DROP TRIGGER IF EXISTS zz_accord_count_removals ON %s', target);
    EXECUTE format('DROP TRIGGER IF EXISTS zz_accord_record_truncate ON %s', target);
    DELETE FROM accord.row_meta WHERE table_name = name;
    DELETE FROM accord.existing_rows WHERE table_name = name;
    DELETE FROM accord.taking_in WHERE table_name = name;
    INSERT INTO accord.left_tables (table_name) VALUES (name) ON CONFLICT DO NOTHING;
    RETURN true;
END
$accord$;
CREATE OR REPLACE FUNCTION accord.take_in(target regclass) RETURNS boolean
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog AS $accord$
DECLARE
    name text;
BEGIN
    SELECT n.nspname || '.' || c.relname INTO name
      FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.oid = target;
    IF EXISTS (SELECT 1 FROM pg_publication_rel r JOIN pg_publication p ON p.oid = r.prpubid
                WHERE p.pubname = 'accord_pub' AND r.prrelid = target) THEN
        RETURN false;
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pg_constraint WHERE conrelid = target AND contype = 'p') THEN
        RAISE EXCEPTION 'accord: table % has no primary key, and accord needs one to tell its rows apart on every node', name
            USING ERRCODE = 'feature_not_supported', HINT = 'Add a primary key before tagging it @accord replicate.';
    END IF;
    IF (SELECT relispartition FROM pg_class WHERE oid = target) THEN
        RAISE EXCEPTION 'accord: % is a partition, which replicates through its partitioned table', name
            USING ERRCODE = 'feature_not_supported', HINT = 'Tag the partitioned table instead.';
    END IF;
    IF (SELECT relkind FROM pg_class WHERE oid = target) <> 'r' THEN
        RAISE EXCEPTION 'accord: % is not a plain table; a partitioned table joins replication through accord init only', name
            USING ERRCODE = 'feature_not_supported', HINT = 'Tag it, then run accord init on this node.';
    END IF;
    -- Every writer conflicts with this lock: a row is either noted here or decoded later.
    EXECUTE format('LOCK TABLE %s IN SHARE ROW EXCLUSIVE MODE', target);
    EXECUTE format('ALTER TABLE %s REPLICA IDENTITY FULL', target);
    EXECUTE format('INSERT INTO accord.existing_rows SELECT %L, ctid, xmin FROM %s', name, target);
    INSERT INTO accord.taking_in (table_name) VALUES (name) ON CONFLICT DO NOTHING;
    DELETE FROM accord.left_tables WHERE table_name = name;
    EXECUTE format('ALTER PUBLICATION accord_pub ADD TABLE %s', target);
    RETURN true;
END
$accord$;
CREATE OR REPLACE FUNCTION accord.take_in_tagged() RETURNS event_trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog AS $accord$
DECLARE
    tagged regclass;
    untagged regclass;
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_publication WHERE pubname = 'accord_pub') THEN
        RETURN; -- accord init, before it made the publication
    END IF;
    FOR untagged IN
        SELECT c.oid::regclass FROM pg_publication p
          JOIN pg_publication_rel r ON r.prpubid = p.oid
          JOIN pg_class c ON c.oid = r.prrelid
          LEFT JOIN pg_description d ON d.objoid = c.oid AND d.classoid = 'pg_class'::regclass AND d.objsubid = 0
         WHERE p.pubname = 'accord_pub' AND c.relnamespace <> 'accord'::regnamespace
           AND coalesce(d.description !~ '@accord\s+replicate', true)
    LOOP
        PERFORM accord.leave_replication(untagged);
    END LOOP;
    FOR tagged IN
        SELECT c.oid::regclass FROM pg_class c
          JOIN pg_description d ON d.objoid = c.oid AND d.classoid = 'pg_class'::regclass AND d.objsubid = 0
         WHERE c.relkind IN ('r', 'p') AND d.description ~ '@accord\s+replicate'
           AND c.relnamespace <> 'accord'::regnamespace
           -- A partition replicates through its root; accord check refuses a tag of its own.
           AND NOT c.relispartition
           AND NOT EXISTS (SELECT 1 FROM pg_publication_rel r JOIN pg_publication p ON p.oid = r.prpubid
                            WHERE p.pubname = 'accord_pub' AND r.prrelid = c.oid)
    LOOP
        PERFORM accord.take_in(tagged);
    END LOOP;
END
$accord$;
"#;

/// Installed by `accord init` where it may (a superuser's).
pub const TAKE_IN_TRIGGER: &str = "
DROP EVENT TRIGGER IF EXISTS accord_take_in;
CREATE EVENT TRIGGER accord_take_in ON ddl_command_end WHEN TAG IN ('COMMENT')
    EXECUTE FUNCTION accord.take_in_tagged();
";

/// Tables this node replicated and left (`accord.leave_replication`).
pub async fn left_tables(db: &impl GenericClient) -> Result<BTreeSet<String>> {
    let rows = db
        .query("SELECT table_name FROM accord.left_tables", &[])
        .await
        .context("cannot read accord.left_tables")?;
    Ok(rows.iter().map(|row| row.get(0)).collect())
}

/// Tables whose take-in is not finished.
async fn taking_in(db: &impl GenericClient) -> Result<BTreeSet<String>> {
    let rows = db
        .query("SELECT table_name FROM accord.taking_in", &[])
        .await
        .context("cannot read accord.taking_in")?;
    Ok(rows.iter().map(|row| row.get(0)).collect())
}

/// The tables whose changes the capture decodes: tagged and published.
pub async fn published_policy(db: &mut Client) -> Result<SchemaPolicy> {
    let policy = load_policy(db).await?;
    let published = published(db).await?;
    restrict(policy, |name| published.contains(name))
}

fn restrict(policy: SchemaPolicy, keep: impl Fn(&str) -> bool) -> Result<SchemaPolicy> {
    let tables: Vec<TableDef> = policy.tables().iter().filter(|t| keep(&t.name)).cloned().collect();
    if tables.len() == policy.tables().len() {
        return Ok(policy);
    }
    SchemaPolicy::new(tables).context("the replicated tables")
}

/// The tables this node replicates now: tagged, and taken in.
pub async fn replicated_policy(db: &mut Client) -> Result<SchemaPolicy> {
    let policy = load_policy(db).await?;
    let mut published = published(db).await?;
    for table in taking_in(db).await? {
        published.remove(&table);
    }
    restrict(policy, |name| published.contains(name))
}

/// A table [`take_in_tagged`] brought into replication.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TakenIn {
    pub table: String,
    pub rows: u64,
}

/// What the catalog says of tagged tables the node does not replicate yet, and of replicated
/// tables no longer tagged.
#[derive(Debug, Default)]
pub struct Tagging {
    pub taken_in: Vec<TakenIn>,
    /// Tables no longer tagged, which left replication here (no event trigger did it).
    pub left: Vec<String>,
}

/// Finishes taking in every tagged table (see the module's comment), and takes in first those
/// no event trigger took in; takes out those no longer tagged that no event trigger took out.
pub async fn take_in_tagged(db: &mut Client) -> Result<Tagging> {
    let policy = load_policy(db).await?;
    let published = published(db).await?;
    let pending = taking_in(db).await?;
    let mut tagging = Tagging::default();
    for name in published
        .iter()
        .filter(|name| policy.table(name).is_none() && !pending.contains(*name))
    {
        let left: bool = db
            .query_one(
                "SELECT accord.leave_replication($1::text::regclass)",
                &[&quote_table(name)],
            )
            .await
            .with_context(|| format!("cannot take {name} out of replication"))?
            .get(0);
        if left {
            tagging.left.push(name.clone());
        }
    }
    for table in policy
        .tables()
        .iter()
        .filter(|t| !published.contains(&t.name) || pending.contains(&t.name))
    {
        let tx = db.transaction().await?;
        // Every writer's lock conflicts with this one, and so does another taker's.
        tx.batch_execute(&format!(
            "LOCK TABLE {} IN SHARE ROW EXCLUSIVE MODE",
            quote_table(&table.name)
        ))
        .await
        .with_context(|| format!("cannot lock {} to take it into replication", table.name))?;
        let rows = finish(&tx, table)
            .await
            .with_context(|| format!("cannot take {} into replication", table.name))?;
        tx.commit().await?;
        if let Some(rows) = rows {
            tagging.taken_in.push(TakenIn {
                table: table.name.clone(),
                rows,
            });
        }
    }
    Ok(tagging)
}

/// Takes `table` in if nothing did yet, and finishes; `None` if another node task did already.
async fn finish(tx: &tokio_postgres::Transaction<'_>, table: &TableDef) -> Result<Option<u64>> {
    let target = quote_table(&table.name);
    let pending = taking_in(tx).await?.contains(&table.name);
    if !pending {
        if self::published(tx).await?.contains(&table.name) {
            return Ok(None);
        }
        tx.execute("SELECT accord.take_in($1::text::regclass)", &[&target])
            .await?;
    }
    key_locks::install_triggers(tx, std::slice::from_ref(table), true).await?;
    truncate::install(tx, std::slice::from_ref(table), true).await?;
    super::shapes::record(tx, table, true).await?;
    let rows = record_existing_rows(tx, table, true).await?;
    tx.execute("DELETE FROM accord.existing_rows WHERE table_name = $1", &[&table.name])
        .await?;
    tx.execute("DELETE FROM accord.taking_in WHERE table_name = $1", &[&table.name])
        .await?;
    Ok(Some(rows))
}
