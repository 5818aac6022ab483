//! The shapes of its tables a node knows (`engine::shape`), kept in `accord.shapes`: its own,
//! each one it captured under, and every one a peer described (`Message::Shapes`). A change names
//! its shape, and may be applied, or kept for later, long after the sender's table changed
//! again: the shapes stay.

use std::collections::BTreeSet;

use accord_engine::{ShapeBook, TableDef, Value};
use tokio_postgres::GenericClient;

use super::store::{decode, encode, shape_param, StoreError};

pub const SHAPES_DDL: &str = "
CREATE TABLE IF NOT EXISTS accord.shapes (
    id          bigint  PRIMARY KEY,
    table_name  text    NOT NULL,
    def         bytea   NOT NULL,
    own         boolean NOT NULL,
    recorded_at timestamptz NOT NULL DEFAULT now()
);
COMMENT ON TABLE accord.shapes IS 'accord: the shapes of the replicated tables this node and its peers wrote changes under';
";

/// Records `def`; `own`: this node's (once its own, always).
pub async fn record(db: &impl GenericClient, def: &TableDef, own: bool) -> Result<(), StoreError> {
    db.execute(
        "INSERT INTO accord.shapes (id, table_name, def, own) VALUES ($1, $2, $3, $4)
         ON CONFLICT (id) DO UPDATE SET own = accord.shapes.own OR EXCLUDED.own",
        &[
            &shape_param(def.shape_id()),
            &def.name,
            &encode("a table's shape", def)?,
            &own,
        ],
    )
    .await?;
    Ok(())
}

/// Every recorded shape, with whether it is this node's own, in the order they were recorded.
pub async fn load(db: &impl GenericClient) -> Result<Vec<(TableDef, bool)>, StoreError> {
    let rows = db
        .query("SELECT def, own FROM accord.shapes ORDER BY recorded_at, id", &[])
        .await?;
    rows.iter()
        .map(|row| Ok((decode("a table's shape", row.get(0))?, row.get(1))))
        .collect()
}

/// The book of `shapes` (as [`load`] gives them): metadata stored before it named its shape was
/// stored under the first shape of its table this node recorded, its shape when shapes began.
pub fn book(shapes: &[(TableDef, bool)]) -> ShapeBook {
    let mut book = ShapeBook::default();
    let mut first = std::collections::BTreeSet::new();
    for (def, own) in shapes {
        if *own && first.insert(def.name.clone()) {
            book.set_unnamed(&def.name, def.shape_id());
        }
        book.learn(def.clone());
    }
    book
}

/// What this node's `table` fills a column with that a change does not carry (a sender that has
/// not added it yet): its default when that is a constant, else NULL. And the columns earlier
/// shapes of it here had and the table no longer has: dropped, so a sender's value for one is ignored
/// and its metadata goes.
///
/// Dropped means gone from the catalog, not just from `table`: a reader's `table` may be older
/// than a shape the capture recorded since (a migration committed between the reader's read of
/// its tables and this one). Taken against `table` alone, the column that migration added would
/// count as dropped, and the reader would throw away the metadata peers' changes and the
/// capture keep for it (a delta column's ledger: its next merge adds every contribution again).
///
/// A default that calls a function (`now()`, `nextval(...)`) is not evaluated here: it would
/// give this node a value of its own, which the sender's later migration would not match.
pub async fn local_extras(
    db: &impl GenericClient,
    table: &TableDef,
) -> Result<(Vec<Option<Value>>, BTreeSet<String>), StoreError> {
    let rows = db
        .query(
            "SELECT a.attname::text, pg_get_expr(d.adbin, d.adrelid)
             FROM pg_attribute a JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
             WHERE a.attrelid = to_regclass($1) AND a.attnum > 0 AND NOT a.attisdropped",
            &[&super::rows::quote_table(&table.name)],
        )
        .await?;
    let mut defaults = vec![None; table.columns.len()];
    for row in &rows {
        let (name, expr): (String, String) = (row.get(0), row.get(1));
        let Some(i) = table.column_index(&name) else { continue };
        if calls_a_function(&expr) {
            continue;
        }
        let text: Option<String> = db.query_one(&format!("SELECT ({expr})::text"), &[]).await?.get(0);
        defaults[i] = match text {
            Some(text) => Some(
                Value::parse(&table.columns[i].ty, &text)
                    .map_err(|e| StoreError::Corrupt(format!("the default of {}.{name}: {e}", table.name)))?,
            ),
            None => None,
        };
    }
    let live: BTreeSet<String> = db
        .query(
            "SELECT attname::text FROM pg_attribute WHERE attrelid = to_regclass($1) AND attnum > 0 AND NOT attisdropped",
            &[&super::rows::quote_table(&table.name)],
        )
        .await?
        .iter()
        .map(|row| row.get(0))
        .collect();
    let mut dropped = BTreeSet::new();
    let earlier = db
        .query(
            "SELECT def FROM accord.shapes WHERE own AND table_name = $1",
            &[&table.name],
        )
        .await?;
    for row in &earlier {
        let def: TableDef = decode("a table's shape", row.get(0))?;
        dropped.extend(
            def.columns
                .into_iter()
                .map(|c| c.name)
                .filter(|name| !live.contains(name)),
        );
    }
    Ok((defaults, dropped))
}

/// Whether a default expression (`pg_get_expr`'s text) calls a function: a name followed by `(`,
/// outside quotes and outside a cast's type (`::numeric(12,2)`).
fn calls_a_function(expr: &str) -> bool {
    let bytes = expr.as_bytes();
    let mut in_quotes = false;
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if b == b'\'' {
            in_quotes = !in_quotes;
        } else if !in_quotes && b == b':' && bytes.get(i + 1) == Some(&b':') {
            // A cast: skip its type name and modifiers.
            i += 2;
            while i < bytes.len() && (bytes[i].is_ascii_alphanumeric() || b"_ .\"".contains(&bytes[i])) {
                i += 1;
            }
            if bytes.get(i) == Some(&b'(') {
                while i < bytes.len() && bytes[i] != b')' {
                    i += 1;
                }
            }
        } else if !in_quotes && b == b'(' && i > 0 && (bytes[i - 1].is_ascii_alphanumeric() || bytes[i - 1] == b'_') {
            return true;
        }
        i += 1;
    }
    false
}

#[cfg(test)]
mod tests {
    use super::calls_a_function;

    #[test]
    fn constant_defaults_are_told_from_calls() {
        for constant in [
            "0",
            "'x'::text",
            "(0)::bigint",
            "'a(b)'::text",
            "0.00::numeric(12,2)",
            "'ab'::character varying(10)",
        ] {
            assert!(!calls_a_function(constant), "{constant}");
        }
        for call in [
            "now()",
            "nextval('s'::regclass)",
            "accord.next_id('t'::text)",
            "gen_random_uuid()",
        ] {
            assert!(calls_a_function(call), "{call}");
        }
    }
}
