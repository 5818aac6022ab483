//! `accord init`: prepares a database to be a node. Idempotent: running it again brings an
//! initialised database up to date (new replicated tables, changed annotations).

use accord_engine::{Capturer, NodeId, RowMeta, TableDef, DEFAULT_MAX_OFFSET_MICROS};
use accord_schema_annotations::{Checked, SchemaPolicy};
use anyhow::{bail, Context, Result};
use tokio_postgres::{Client, GenericClient};

use super::key_locks;
use super::rows::{all_keys, noted_keys, quote_table};
use super::store::{self, encode, key_text, PUBLICATION, SLOT};
use super::truncate;

/// What `init` did, for the user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Initialized {
    pub node: NodeId,
    pub tables: Vec<String>,
    pub fingerprint: String,
    pub rows_recorded: u64,
    pub slot_created: bool,
    /// Replicated partitioned tables, and whether partitions made later get `REPLICA IDENTITY
    /// FULL` by themselves (an event trigger, which takes a superuser to install).
    pub partitioned: Vec<String>,
    pub partition_guard: PartitionGuard,
    pub take_in_trigger: TakeInTrigger,
}

/// Whether accord's event triggers are installed (they take a superuser): a table tagged
/// `@accord replicate` later joins replication in the transaction that tags it (`tagging`), and
/// DDL accord cannot follow is refused (`ddl_guard`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TakeInTrigger {
    Installed,
    /// Why not (the server's message).
    NotPermitted(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PartitionGuard {
    NotNeeded,
    Installed,
    /// Why not (the server's message); partitions made later need `REPLICA IDENTITY FULL` by hand.
    NotPermitted(String),
}

/// Prepares every partition below a table accord publishes: `REPLICA IDENTITY FULL` and the
/// TRUNCATE guard (`truncate`). A partitioned table's changes are decoded from its
/// partitions with their own replica identity, and `ALTER TABLE` does not pass that setting on to
/// partitions, nor do `CREATE TABLE ... PARTITION OF` and `ATTACH PARTITION` take it from the
/// parent; a statement trigger on the parent does not fire for a partition truncated by name.
/// Run as an event trigger, it acts in the transaction that made or attached the partition,
/// before any row can be written to it.
const PARTITION_IDENTITY: &str = "
CREATE OR REPLACE FUNCTION accord.prepare_partitions() RETURNS void LANGUAGE plpgsql AS $accord$
DECLARE
    part record;
BEGIN
    FOR part IN
        SELECT t.relid::regclass AS name, c.relreplident <> 'f' AS needs_identity,
               NOT EXISTS (SELECT 1 FROM pg_catalog.pg_trigger g
                            WHERE g.tgrelid = t.relid AND g.tgname = 'zz_accord_refuse_truncate') AS needs_guard
          FROM pg_catalog.pg_publication p
          JOIN pg_catalog.pg_publication_rel r ON r.prpubid = p.oid
          CROSS JOIN LATERAL pg_catalog.pg_partition_tree(r.prrelid) t
          JOIN pg_catalog.pg_class c ON c.oid = t.relid
         WHERE p.pubname = 'accord_pub' AND t.level > 0
    LOOP
        -- The guard first: the ALTER below fires this event trigger again, which must then find
        -- nothing left to do.
        IF part.needs_guard THEN
            EXECUTE format('CREATE OR REPLACE TRIGGER zz_accord_refuse_truncate BEFORE TRUNCATE ON %s
                            FOR EACH STATEMENT EXECUTE FUNCTION accord.refuse_truncate()', part.name);
        END IF;
        IF part.needs_identity THEN
            EXECUTE format('ALTER TABLE %s REPLICA IDENTITY FULL', part.name);
        END IF;
    END LOOP;
END
$accord$;
CREATE OR REPLACE FUNCTION accord.partitions_prepared() RETURNS event_trigger LANGUAGE plpgsql AS $accord$
BEGIN
    PERFORM accord.prepare_partitions();
END
$accord$;
";

const PARTITION_IDENTITY_TRIGGER: &str = "
DROP EVENT TRIGGER IF EXISTS accord_prepare_partitions;
CREATE EVENT TRIGGER accord_prepare_partitions ON ddl_command_end
    WHEN TAG IN ('CREATE TABLE', 'ALTER TABLE')
    EXECUTE FUNCTION accord.partitions_prepared();
";

/// The schema policy of a database, refusing one with annotation errors.
pub async fn load_policy(client: &mut Client) -> Result<SchemaPolicy> {
    let checked: Checked = accord_schema_annotations::pg::check_database(client)
        .await
        .context("cannot read the database's annotations")?;
    if checked.has_errors() {
        let list: Vec<String> = checked.errors().map(|p| format!("  - {p}")).collect();
        bail!(
            "the @accord annotations have errors; nothing is replicated under a policy accord did not understand \
             (run `accord check` for details):\n{}",
            list.join("\n")
        );
    }
    Ok(checked.policy)
}

/// Rows of existing tables recorded per statement.
const RECORD_BATCH: usize = 10_000;

/// Records the rows `table` holds as they are, with no history (what every node holds alike when
/// it begins replicating them): all of them, or (`noted_only`) those `accord.take_in` noted that
/// are unchanged since. Returns how many had no metadata yet.
pub async fn record_existing_rows(tx: &impl GenericClient, table: &TableDef, noted_only: bool) -> Result<u64> {
    let meta = encode("row metadata", &RowMeta::pre_existing(table))?;
    let shape = store::shape_param(table.shape_id());
    let mut recorded = 0;
    let keys = if noted_only {
        noted_keys(tx, table).await?
    } else {
        all_keys(tx, table).await?
    };
    // In batches: one INSERT a row made `accord init` take minutes per million rows.
    for batch in keys.chunks(RECORD_BATCH) {
        let (row_keys, xmins): (Vec<String>, Vec<&str>) =
            batch.iter().map(|(key, xmin)| (key_text(key), xmin.as_str())).unzip();
        recorded += tx
            .execute(
                "INSERT INTO accord.row_meta (table_name, row_key, meta, alive, known_xmin, shape)
                 SELECT $1, k.row_key, $3, true, k.xmin, $5 FROM unnest($2::text[], $4::text[]) AS k(row_key, xmin)
                 ON CONFLICT DO NOTHING",
                &[&table.name, &row_keys, &meta, &xmins, &shape],
            )
            .await?;
    }
    Ok(recorded)
}

pub async fn init(client: &mut Client, node: NodeId) -> Result<Initialized> {
    let wal_level: String = client.query_one("SHOW wal_level", &[]).await?.get(0);
    if wal_level != "logical" {
        bail!(
            "wal_level is {wal_level:?}, but accord reads changes through logical decoding: set wal_level = logical \
             in postgresql.conf and restart PostgreSQL"
        );
    }
    let policy = load_policy(client).await?;
    if policy.is_empty() {
        bail!("no table is marked for replication: add `@accord replicate` to a table's comment");
    }
    let fingerprint = policy.fingerprint().to_string();

    let tx = client.transaction().await?;
    tx.batch_execute(store::DDL)
        .await
        .context("cannot create the accord schema")?;
    tx.batch_execute(super::ids::NEXT_ID_DDL)
        .await
        .context("cannot create accord.next_id")?;
    tx.batch_execute(store::DEFERRED_DDL)
        .await
        .context("cannot create accord.deferred")?;
    tx.batch_execute(store::APPLIED_DDL)
        .await
        .context("cannot create accord.applied")?;
    tx.batch_execute(store::APPLIED_MERGED_DDL)
        .await
        .context("cannot add accord.applied's merged stamp")?;
    tx.batch_execute(super::rows::ROWS_WRITTEN_DDL)
        .await
        .context("cannot create accord.rows_written")?;
    tx.batch_execute(store::REPAIRED_DDL)
        .await
        .context("cannot create accord.repaired")?;
    tx.batch_execute(store::REVIEW_ROWS_DDL)
        .await
        .context("cannot index accord.review_items")?;
    tx.batch_execute(super::shapes::SHAPES_DDL)
        .await
        .context("cannot create accord.shapes")?;
    tx.batch_execute(store::ROW_META_SHAPE_DDL)
        .await
        .context("cannot add accord.row_meta.shape")?;
    tx.batch_execute(super::members::MEMBERS_DDL)
        .await
        .context("cannot create accord.members")?;
    tx.batch_execute(super::tagging::TAKE_IN_DDL)
        .await
        .context("cannot create accord.take_in")?;
    tx.batch_execute(super::ddl_guard::GUARD_DDL)
        .await
        .context("cannot create accord's DDL guard")?;
    key_locks::install_triggers(&tx, policy.tables(), true).await?;
    truncate::install(&tx, policy.tables(), true).await?;
    let existing: Option<(i32, String)> = tx
        .query_opt("SELECT node_id, fingerprint FROM accord.node", &[])
        .await?
        .map(|row| (row.get(0), row.get(1)));
    let id = i32::try_from(node.0).context("node ids must fit in a 32-bit signed integer")?;
    match existing {
        Some((other, _)) if other != id => {
            bail!("this database is already node {other}; a database is one node for life (asked for node {node})")
        }
        Some((_, old)) if old != fingerprint => {
            // Row metadata is positional per table column and per policy. Metadata that names
            // the shape it was stored under, or was stored before shapes were named under the
            // first shape the node recorded, is read under the new one (issue 17); metadata from
            // a version of accord that recorded no shape at all cannot be placed.
            let unplaced: i64 = tx
                .query_one(
                    "SELECT count(*) FROM accord.row_meta m
                      WHERE m.shape IS NULL
                        AND NOT EXISTS (SELECT 1 FROM accord.shapes s WHERE s.table_name = m.table_name AND s.own)",
                    &[],
                )
                .await?
                .get(0);
            if unplaced > 0 {
                bail!(
                    "the replicated tables' columns or @accord annotations changed since this database was \
                     initialised (policy fingerprint {old} then, {fingerprint} now), and accord holds metadata \
                     for {unplaced} rows written by a version of accord that did not record the tables' shapes, \
                     which it cannot read under the new one (a node that runs this version once before a \
                     migration records them). Re-create the cluster's accord state: with the nodes stopped and \
                     the databases made equal, on every node run \
                     `SELECT pg_drop_replication_slot('accord_slot'); DROP PUBLICATION accord_pub; DROP SCHEMA \
                     accord CASCADE;`, then `accord init` each node"
                );
            }
        }
        _ => {}
    }
    tx.execute(
        "INSERT INTO accord.node (node_id, fingerprint) VALUES ($1, $2)
         ON CONFLICT (singleton) DO UPDATE SET fingerprint = EXCLUDED.fingerprint",
        &[&id, &fingerprint],
    )
    .await?;
    let mut tables = Vec::new();
    for table in policy.tables() {
        // Updates and deletes must carry the old row: deltas are new − old.
        tx.batch_execute(&format!(
            "ALTER TABLE {} REPLICA IDENTITY FULL",
            quote_table(&table.name)
        ))
        .await
        .with_context(|| format!("cannot set REPLICA IDENTITY FULL on {}", table.name))?;
        tables.push(table.name.clone());
    }
    let mut partitioned = Vec::new();
    for table in &tables {
        let kind = tx
            .query_one(
                "SELECT relkind::text FROM pg_catalog.pg_class WHERE oid = $1::text::regclass",
                &[&quote_table(table)],
            )
            .await?;
        if kind.get::<_, String>(0) == "p" {
            partitioned.push(table.clone());
        }
    }
    let mut published: Vec<String> = tables.iter().map(|t| quote_table(t)).collect();
    published.push(quote_table(store::RESOLUTIONS_TABLE));
    let has_publication = tx
        .query_opt("SELECT 1 FROM pg_publication WHERE pubname = $1", &[&PUBLICATION])
        .await?
        .is_some();
    let verb = if has_publication {
        "ALTER PUBLICATION"
    } else {
        "CREATE PUBLICATION"
    };
    let op = if has_publication { "SET TABLE" } else { "FOR TABLE" };
    tx.batch_execute(&format!("{verb} {PUBLICATION} {op} {}", published.join(", ")))
        .await
        .context("cannot create the publication")?;
    // A partitioned table's changes are published as its own, whatever partition holds the row,
    // so that nodes may partition a table differently.
    tx.batch_execute(&format!(
        "ALTER PUBLICATION {PUBLICATION} SET (publish_via_partition_root = true)"
    ))
    .await
    .context("cannot set publish_via_partition_root on the publication")?;
    let partition_guard = if partitioned.is_empty() {
        PartitionGuard::NotNeeded
    } else {
        debug_assert!(PARTITION_IDENTITY.contains(&format!("'{PUBLICATION}'")));
        tx.batch_execute(PARTITION_IDENTITY).await?;
        // The partitions there are now; the trigger sees to later ones.
        tx.batch_execute("SELECT accord.prepare_partitions()")
            .await
            .context("cannot set REPLICA IDENTITY FULL on the partitions of replicated tables")?;
        tx.batch_execute("SAVEPOINT partition_guard").await?;
        match tx.batch_execute(PARTITION_IDENTITY_TRIGGER).await {
            Ok(()) => PartitionGuard::Installed,
            Err(error) => {
                tx.batch_execute("ROLLBACK TO SAVEPOINT partition_guard").await?;
                PartitionGuard::NotPermitted(
                    error
                        .as_db_error()
                        .map_or_else(|| error.to_string(), |e| e.message().to_owned()),
                )
            }
        }
    };
    // After the publication: the trigger adds tables to it.
    tx.batch_execute("SAVEPOINT take_in_trigger").await?;
    let triggers = [super::tagging::TAKE_IN_TRIGGER, super::ddl_guard::GUARD_TRIGGER].concat();
    let take_in_trigger = match tx.batch_execute(&triggers).await {
        Ok(()) => TakeInTrigger::Installed,
        Err(error) => {
            tx.batch_execute("ROLLBACK TO SAVEPOINT take_in_trigger").await?;
            TakeInTrigger::NotPermitted(
                error
                    .as_db_error()
                    .map_or_else(|| error.to_string(), |e| e.message().to_owned()),
            )
        }
    };
    tx.batch_execute("SELECT accord.record_replicated_columns()")
        .await
        .context("cannot record the replicated columns for accord's DDL guard")?;
    let checkpoint = Capturer::new(node, DEFAULT_MAX_OFFSET_MICROS).checkpoint();
    tx.execute(
        "INSERT INTO accord.capture_state (checkpoint, last_seq, covered_lsn) VALUES ($1, 0, '0/0')
         ON CONFLICT (singleton) DO NOTHING",
        &[&encode("capture checkpoint", &checkpoint)?],
    )
    .await?;
    tx.commit().await?;

    // The slot first, the backfill after: every write from here on is captured, so no row can be
    // missed between the two.
    let slot_created = client
        .query_opt("SELECT 1 FROM pg_replication_slots WHERE slot_name = $1", &[&SLOT])
        .await?
        .is_none();
    if slot_created {
        client
            .execute("SELECT pg_create_logical_replication_slot($1, 'pgoutput')", &[&SLOT])
            .await
            .context("cannot create the logical replication slot (are max_replication_slots free?)")?;
    }

    let mut rows_recorded = 0;
    let tx = client.transaction().await?;
    for table in policy.tables() {
        super::shapes::record(&tx, table, true).await?;
        rows_recorded += record_existing_rows(&tx, table, false).await?;
        // Taken in whole here: a take-in the event trigger began has nothing left to do.
        tx.execute("DELETE FROM accord.existing_rows WHERE table_name = $1", &[&table.name])
            .await?;
        tx.execute("DELETE FROM accord.taking_in WHERE table_name = $1", &[&table.name])
            .await?;
    }
    tx.commit().await?;
    Ok(Initialized {
        node,
        tables,
        fingerprint,
        rows_recorded,
        slot_created,
        partitioned,
        partition_guard,
        take_in_trigger,
    })
}
