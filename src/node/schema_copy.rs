//! `accord join` into a database that has none of the cluster's replicated tables: their
//! definitions are taken from the donor with `pg_dump --schema-only` (columns, types, defaults,
//! the comments that carry the `@accord` annotations, keys, constraints, indexes), without
//! accord's own triggers, which `accord init` installs. Partitions of a partitioned table are
//! not copied (each node lays out its partitions as it likes): create them before the rows come.
//!
//! pg_dump, not a hand-written generator: it knows every kind of column, default and constraint
//! PostgreSQL has, in the server's own spelling.

use std::collections::BTreeSet;
use std::process::Command;

use anyhow::{bail, Context, Result};
use tokio_postgres::Client;

use super::ids::NEXT_ID_DDL;
use crate::pg_connection::redact;

/// Creates the donor's replicated `tables` (`schema.table`) on `target`, in one transaction.
/// Returns how many statements ran.
pub async fn copy_schema(donor_dsn: &str, target: &mut Client, tables: &[String]) -> Result<usize> {
    let pg_dump = crate::scratch_pg::pg_tool("pg_dump")?;
    let mut args: Vec<String> = vec!["--schema-only".into(), "--no-owner".into(), "--no-privileges".into()];
    for table in tables {
        args.push("--table".into());
        args.push(table.clone());
    }
    args.push("--dbname".into());
    args.push(donor_dsn.to_owned());
    let output = tokio::task::spawn_blocking(move || Command::new(&pg_dump).args(&args).output())
        .await
        .context("the pg_dump task failed")?
        .context("cannot run pg_dump")?;
    if !output.status.success() {
        bail!(
            "pg_dump of the donor's schema ({}) failed: {}",
            redact(donor_dsn),
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    let dump = String::from_utf8(output.stdout).context("pg_dump wrote something that is not UTF-8")?;
    let statements = statements_to_run(&dump);
    let schemas: BTreeSet<&str> = tables
        .iter()
        .filter_map(|t| t.split_once('.').map(|(s, _)| s))
        .collect();
    let tx = target.transaction().await?;
    for schema in &schemas {
        tx.batch_execute(&format!(
            "CREATE SCHEMA IF NOT EXISTS \"{}\"",
            schema.replace('"', "\"\"")
        ))
        .await?;
    }
    // Converted keys default to accord.next_id, which `accord init` would create only later.
    tx.batch_execute("CREATE SCHEMA IF NOT EXISTS accord").await?;
    tx.batch_execute(NEXT_ID_DDL).await?;
    tx.batch_execute(&statements.join("\n"))
        .await
        .context("cannot create the donor's tables on the new node (its schema as pg_dump wrote it)")?;
    tx.commit().await?;
    Ok(statements.len())
}

/// The dump without psql's meta-commands (which the server does not take) and without the
/// statements that create accord's own triggers.
fn statements_to_run(dump: &str) -> Vec<String> {
    let mut statements = Vec::new();
    let mut current = String::new();
    for line in dump.lines() {
        if line.starts_with('\\') || (current.is_empty() && (line.starts_with("--") || line.trim().is_empty())) {
            continue;
        }
        current.push_str(line);
        current.push('\n');
        // pg_dump ends every statement with a semicolon at the end of a line; function bodies
        // (dollar-quoted) are not dumped with --table.
        if line.trim_end().ends_with(';') {
            let statement = std::mem::take(&mut current);
            if !is_accord_trigger(&statement) {
                statements.push(statement);
            }
        }
    }
    statements
}

fn is_accord_trigger(statement: &str) -> bool {
    let s = statement.trim_start();
    s.starts_with("CREATE TRIGGER zz_accord_") || s.starts_with("CREATE CONSTRAINT TRIGGER zz_accord_")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn meta_commands_and_accords_triggers_are_left_out() {
        let dump = "\\restrict abc\n--\n-- Name: t\n--\n\nSET x = 1;\n\nCREATE TABLE shop.t (\n    id bigint NOT NULL\n);\n\
                    COMMENT ON TABLE shop.t IS '@accord replicate';\n\
                    CREATE TRIGGER zz_accord_key_lock_insert BEFORE INSERT ON shop.t FOR EACH ROW EXECUTE FUNCTION accord.key_lock();\n\
                    CREATE TRIGGER audit AFTER INSERT ON shop.t FOR EACH ROW EXECUTE FUNCTION shop.audit();\n\\unrestrict abc\n";
        let statements = statements_to_run(dump);
        assert_eq!(
            statements,
            vec![
                "SET x = 1;\n",
                "CREATE TABLE shop.t (\n    id bigint NOT NULL\n);\n",
                "COMMENT ON TABLE shop.t IS '@accord replicate';\n",
                "CREATE TRIGGER audit AFTER INSERT ON shop.t FOR EACH ROW EXECUTE FUNCTION shop.audit();\n",
            ]
        );
    }
}
