//! Ids that never collide across nodes, in plain PostgreSQL: `accord.next_id(counter, lanes)`
//! gives `nextval(counter) * lanes + node id`. Each node has its own lane (its ids are its node
//! id modulo `lanes`), and within it a sequence, which PostgreSQL never hands out twice, not after
//! a crash and not after a clock step (it does not read the clock). Lanes rather than time-based
//! (snowflake) ids: ids stay small (a bigint key stays below 2^53, safe in JavaScript, for
//! trillions of ids per node), an `integer` key works, and no clock can make them go backwards.
//! The price: ids are ordered per node, not across the cluster.

use anyhow::{bail, Context, Result};
use tokio_postgres::Client;

use super::rows::{quote_ident, quote_table};

/// Installed by `accord init`. The node id comes from accord's own record, never a second number
/// to configure.
pub const NEXT_ID_DDL: &str = r#"
CREATE OR REPLACE FUNCTION accord.next_id(counter regclass, lanes integer) RETURNS bigint
LANGUAGE plpgsql VOLATILE AS $accord$
DECLARE
    node integer;
BEGIN
    SELECT node_id INTO node FROM accord.node;
    IF node IS NULL THEN
        RAISE EXCEPTION 'accord.next_id: this database is not an accord node (run accord init)';
    END IF;
    IF node >= lanes THEN
        RAISE EXCEPTION 'accord.next_id: node % has no lane among % lanes; convert again with more lanes', node, lanes;
    END IF;
    RETURN nextval(counter) * lanes + node;
END
$accord$;
"#;

/// The greatest id JavaScript numbers hold exactly (2^53 - 1).
const JS_SAFE_MAX: i64 = (1 << 53) - 1;

/// What `accord ids convert` is asked to do.
#[derive(Debug, Clone)]
pub struct ConvertRequest {
    pub table: String,
    /// The key column when `None` (the table's only one).
    pub column: Option<String>,
    /// A power of two above every node id; the same on every node is simplest (different powers
    /// of two also never collide, as long as every node id is below the smallest).
    pub lanes: Option<i32>,
    /// Keep ids below 2^53.
    pub js_safe: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Converted {
    pub table: String,
    pub column: String,
    pub counter: String,
    pub lanes: i32,
    /// `None` before `accord init`.
    pub node: Option<i32>,
    /// The first counter value: this node's first id is `first_counter * lanes + node`.
    pub first_counter: i64,
    pub max_counter: i64,
    /// An identity was dropped for the new default.
    pub was_identity: bool,
    /// The column already took its ids from `accord.next_id`: nothing was changed.
    pub already: bool,
}

/// Gives a table's column ids from `accord.next_id`: existing rows keep theirs, new ids start
/// above every id the table holds or its old sequence gave. One transaction.
pub async fn convert(db: &mut Client, request: &ConvertRequest) -> Result<Converted> {
    let tx = db.transaction().await?;
    // Before `accord init` too: `accord check` refuses a sequence key, so `init` would.
    tx.batch_execute("CREATE SCHEMA IF NOT EXISTS accord")
        .await
        .context("cannot create the accord schema")?;
    tx.batch_execute(NEXT_ID_DDL)
        .await
        .context("cannot create accord.next_id")?;
    // Before `accord init` there is no node id yet; the function reads it when called.
    let initialised: bool = tx
        .query_one("SELECT to_regclass('accord.node') IS NOT NULL", &[])
        .await?
        .get(0);
    let node: Option<i32> = if initialised {
        tx.query_opt("SELECT node_id FROM accord.node", &[])
            .await?
            .map(|r| r.get(0))
    } else {
        None
    };
    let table = quote_table(&request.table);
    let oid: Option<u32> = tx.query_one("SELECT to_regclass($1)::oid", &[&table]).await?.get(0);
    let oid = oid.with_context(|| format!("there is no table {}", request.table))?;
    let column = match &request.column {
        Some(column) => column.clone(),
        None => {
            let keys: Vec<String> = tx
                .query(
                    "SELECT a.attname::text FROM pg_index i
                       JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY(i.indkey)
                      WHERE i.indrelid = $1 AND i.indisprimary",
                    &[&oid],
                )
                .await?
                .iter()
                .map(|r| r.get(0))
                .collect();
            match keys.as_slice() {
                [one] => one.clone(),
                [] => bail!("{} has no primary key: name the column with --column", request.table),
                _ => bail!(
                    "{}'s key has several columns ({}): name the one to convert with --column",
                    request.table,
                    keys.join(", ")
                ),
            }
        }
    };
    let row = tx
        .query_opt(
            "SELECT format_type(a.atttypid, a.atttypmod), a.attidentity <> '', pg_get_expr(d.adbin, d.adrelid),
                    pg_get_serial_sequence($2, a.attname)
               FROM pg_attribute a LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
              WHERE a.attrelid = $1 AND a.attname = $3 AND a.attnum > 0 AND NOT a.attisdropped",
            &[&oid, &table, &column],
        )
        .await?
        .with_context(|| format!("{} has no column {column}", request.table))?;
    let (type_name, was_identity, default, old_sequence): (String, bool, Option<String>, Option<String>) =
        (row.get(0), row.get(1), row.get(2), row.get(3));
    let type_max = match type_name.as_str() {
        "bigint" => i64::MAX,
        "integer" => i64::from(i32::MAX),
        other => bail!(
            "{}.{column} is {other}; accord gives ids to integer and bigint columns",
            request.table
        ),
    };
    let lanes = request.lanes.unwrap_or(if type_name == "bigint" { 1024 } else { 64 });
    if lanes < 2 || lanes.count_ones() != 1 {
        bail!("--lanes must be a power of two (2, 4, ... 1024), not {lanes}");
    }
    if let Some(node) = node.filter(|&n| n >= lanes) {
        bail!("this is node {node}, which has no lane among {lanes}: give --lanes a power of two above every node id");
    }
    let counter_name = counter_name(&request.table, &column);
    if default.as_deref().is_some_and(|d| d.contains("accord.next_id(")) {
        tx.commit().await?;
        return Ok(Converted {
            table: request.table.clone(),
            column,
            counter: counter_name,
            lanes,
            node,
            first_counter: 0,
            max_counter: 0,
            was_identity,
            already: true,
        });
    }
    let limit = if request.js_safe {
        type_max.min(JS_SAFE_MAX)
    } else {
        type_max
    };
    // Every id a node gives is at most counter * lanes + (lanes - 1).
    let max_counter = (limit - i64::from(lanes - 1)) / i64::from(lanes);
    let quoted_column = quote_ident(&column);
    let greatest: Option<i64> = tx
        .query_one(&format!("SELECT max({quoted_column})::bigint FROM {table}"), &[])
        .await?
        .get(0);
    // What the old sequence gave may be above what the table still holds (deleted rows).
    let issued: Option<i64> = match &old_sequence {
        Some(sequence) => tx
            .query_one(&format!("SELECT last_value FROM {sequence}"), &[])
            .await
            .with_context(|| format!("cannot read the old sequence {sequence}"))?
            .get(0),
        None => None,
    };
    let above = greatest.max(issued).unwrap_or(0).max(0);
    let start = above / i64::from(lanes) + 1;
    if start > max_counter {
        bail!(
            "{}.{column} already holds ids up to {above}: no room above it for {lanes} lanes below {limit}",
            request.table
        );
    }
    tx.batch_execute(&format!(
        "CREATE SEQUENCE {counter_name} AS bigint MINVALUE 1 START {start} MAXVALUE {max_counter} NO CYCLE;
         ALTER SEQUENCE {counter_name} OWNED BY {table}.{quoted_column};"
    ))
    .await
    .with_context(|| format!("cannot create the counter {counter_name}"))?;
    if was_identity {
        tx.batch_execute(&format!(
            "ALTER TABLE {table} ALTER COLUMN {quoted_column} DROP IDENTITY"
        ))
        .await?;
    }
    tx.batch_execute(&format!(
        "ALTER TABLE {table} ALTER COLUMN {quoted_column} SET DEFAULT accord.next_id('{}'::regclass, {lanes})",
        counter_name.replace('\'', "''")
    ))
    .await?;
    tx.commit().await?;
    Ok(Converted {
        table: request.table.clone(),
        column,
        counter: counter_name,
        lanes,
        node,
        first_counter: start,
        max_counter,
        was_identity,
        already: false,
    })
}

/// `schema.table_column_ids`, quoted, within PostgreSQL's 63-byte names.
fn counter_name(table: &str, column: &str) -> String {
    let (schema, name) = table.split_once('.').unwrap_or(("public", table));
    let mut sequence = format!("{name}_{column}_ids");
    while sequence.len() > 63 {
        sequence.remove(0);
    }
    format!("{}.{}", quote_ident(schema), quote_ident(&sequence))
}

#[cfg(test)]
mod tests {
    use super::counter_name;

    #[test]
    fn counter_names_are_quoted_and_short() {
        assert_eq!(counter_name("shop.orders", "id"), "\"shop\".\"orders_id_ids\"");
        let long = "x".repeat(70);
        let name = counter_name(&format!("s.{long}"), "id");
        assert_eq!(name.len(), "\"s\".\"\"".len() + 63, "{name}");
    }
}
