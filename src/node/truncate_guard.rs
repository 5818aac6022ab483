//! TRUNCATE of a replicated table is refused until accord replicates it (ARCHITECTURE.md,
//! "TRUNCATE"): the table would empty on one node and stay full on the others, and accord's
//! metadata would describe rows that are gone. A statement trigger refuses it with what to do
//! instead; `SET accord.allow_truncate = on` empties one node on purpose.

use accord_engine::TableDef;
use anyhow::{Context, Result};
use tokio_postgres::GenericClient;

use super::rows::quote_table;

pub const TRIGGER: &str = "zz_accord_refuse_truncate";
/// The session setting that lets a TRUNCATE through.
pub const ALLOW_SETTING: &str = "accord.allow_truncate";

const REFUSE_FUNCTION: &str = "
CREATE OR REPLACE FUNCTION accord.refuse_truncate() RETURNS trigger LANGUAGE plpgsql AS $accord$
BEGIN
    IF pg_catalog.current_setting('accord.allow_truncate', true) = 'on' THEN
        RETURN NULL;
    END IF;
    RAISE EXCEPTION 'TRUNCATE of %.% is refused: accord does not replicate TRUNCATE yet, so the other nodes would keep their rows',
        TG_TABLE_SCHEMA, TG_TABLE_NAME
        USING ERRCODE = 'feature_not_supported',
              HINT = 'DELETE FROM the table replicates to every node. To empty this node only, SET accord.allow_truncate = on first.';
END
$accord$;
";

/// Installs the guard on `tables` where it is missing (partitions get theirs from
/// `accord.prepare_partitions`, see `init`). Returns how many tables got it.
pub async fn install(db: &impl GenericClient, tables: &[TableDef]) -> Result<usize> {
    let mut installed = 0;
    for table in tables {
        let target = quote_table(&table.name);
        let present = db
            .query_opt(
                "SELECT 1 FROM pg_catalog.pg_trigger WHERE tgrelid = $1::text::regclass AND tgname = $2",
                &[&target, &TRIGGER],
            )
            .await
            .with_context(|| format!("cannot find table {}", table.name))?
            .is_some();
        if present {
            continue;
        }
        if installed == 0 {
            db.batch_execute(REFUSE_FUNCTION)
                .await
                .context("cannot create accord.refuse_truncate()")?;
        }
        db.batch_execute(&format!(
            "CREATE OR REPLACE TRIGGER {TRIGGER} BEFORE TRUNCATE ON {target}
                FOR EACH STATEMENT EXECUTE FUNCTION accord.refuse_truncate()"
        ))
        .await
        .with_context(|| format!("cannot install accord's TRUNCATE guard on {}", table.name))?;
        installed += 1;
    }
    Ok(installed)
}
