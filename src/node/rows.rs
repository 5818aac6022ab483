//! SQL on the user's replicated tables: reading a row for a merge, and writing a merge's result.
//!
//! Values travel as PostgreSQL's text form and are cast in SQL to the column's type, so any type
//! with a text input works without a Rust mapping for it.

use accord_engine::{Cell, ColumnType, RowKey, TableDef, Value, ValueError};
use thiserror::Error;
use tokio_postgres::types::ToSql;
use tokio_postgres::GenericClient;

#[derive(Debug, Error)]
pub enum RowError {
    #[error("{table}.{column}: {source}")]
    Value {
        table: String,
        column: String,
        #[source]
        source: ValueError,
    },
    #[error("table {table} has a key of {expected} columns, the change a key of {found}")]
    KeyWidth {
        table: String,
        expected: usize,
        found: usize,
    },
    #[error("{}", describe_db_error(.0))]
    Db(#[from] tokio_postgres::Error),
}

/// A database error with PostgreSQL's own message, code and detail (the driver's `Display` only
/// says "db error").
pub fn describe_db_error(error: &tokio_postgres::Error) -> String {
    match error.as_db_error() {
        Some(db) => {
            let mut text = format!("{} (SQLSTATE {})", db.message(), db.code().code());
            if let Some(detail) = db.detail() {
                text.push_str(": ");
                text.push_str(detail);
            }
            text
        }
        None => match std::error::Error::source(error) {
            Some(source) => format!("{error}: {source}"),
            None => error.to_string(),
        },
    }
}

pub fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// `schema.table` as a quoted SQL name.
pub fn quote_table(qualified: &str) -> String {
    match qualified.split_once('.') {
        Some((schema, table)) => format!("{}.{}", quote_ident(schema), quote_ident(table)),
        None => quote_ident(qualified),
    }
}

/// The SQL type to cast a text parameter to.
fn sql_type(ty: &ColumnType) -> String {
    ty.to_string()
}

fn param(n: usize, ty: &ColumnType) -> String {
    match ty {
        // money reads a plain number only through numeric in every locale.
        ColumnType::Money => format!("(${n}::text)::numeric::money"),
        other => format!("(${n}::text)::{}", sql_type(other)),
    }
}

pub(super) fn read_expr(name: &str, ty: &ColumnType) -> String {
    text_of(&value_expr(name, ty), ty)
}

/// `read_expr` of the column `name` of the row `alias` (`t.name`).
pub(super) fn read_expr_in(alias: &str, name: &str, ty: &ColumnType) -> String {
    text_of(&value_expr_in(alias, name, ty), ty)
}

fn text_of(value: &str, ty: &ColumnType) -> String {
    match output_function(ty) {
        Some(output) => format!("pg_catalog.textin(pg_catalog.{output}({value}))"),
        None => format!("{value}::text"),
    }
}

/// The output function of a type whose cast to text writes something else than decoding delivers
/// (a boolean casts to `true` where it reads `t`, an `inet` gains its mask, a `character(n)` loses
/// its padding): a value must read alike from the table and from a change, or a row's key in
/// `row_key` would depend on which recorded it.
fn output_function(ty: &ColumnType) -> Option<&'static str> {
    match ty {
        ColumnType::Other(name) => match name.as_str() {
            "boolean" => Some("boolout"),
            "inet" => Some("inet_out"),
            "cidr" => Some("cidr_out"),
            "character" => Some("bpcharout"),
            padded if padded.starts_with("character(") => Some("bpcharout"),
            _ => None,
        },
        _ => None,
    }
}

/// A column as accord reads its value: money as numeric, whose text does not depend on the
/// server's locale.
pub(super) fn value_expr(name: &str, ty: &ColumnType) -> String {
    match ty {
        ColumnType::Money => format!("{}::numeric", quote_ident(name)),
        _ => quote_ident(name),
    }
}

/// `value_expr` of the column `name` of the row `alias`.
pub(super) fn value_expr_in(alias: &str, name: &str, ty: &ColumnType) -> String {
    format!("{alias}.{}", value_expr(name, ty))
}

fn key_params(table: &TableDef, key: &RowKey) -> Result<Vec<Option<String>>, RowError> {
    if key.0.len() != table.key.len() {
        return Err(RowError::KeyWidth {
            table: table.name.clone(),
            expected: table.key.len(),
            found: key.0.len(),
        });
    }
    Ok(key.0.iter().map(Value::to_pg_text).collect())
}

fn key_condition(table: &TableDef, first_param: usize) -> String {
    table
        .key
        .iter()
        .enumerate()
        .map(|(i, k)| format!("{} = {}", quote_ident(&k.name), param(first_param + i, &k.ty)))
        .collect::<Vec<_>>()
        .join(" AND ")
}

fn as_params(values: &[Option<String>]) -> Vec<&(dyn ToSql + Sync)> {
    values.iter().map(|v| v as &(dyn ToSql + Sync)).collect()
}

/// Parses one text value of `column` of `table` (`None` = SQL NULL).
pub fn parse_cell(table: &TableDef, column: usize, text: Option<&str>) -> Result<Value, RowError> {
    let def = &table.columns[column];
    match text {
        None => Ok(Value::Null),
        Some(t) => Value::parse(&def.ty, t).map_err(|source| RowError::Value {
            table: table.name.clone(),
            column: def.name.clone(),
            source,
        }),
    }
}

/// Sets some columns of a row; returns its new xmin.
pub async fn update_row(
    db: &impl GenericClient,
    table: &TableDef,
    key: &RowKey,
    writes: &[(usize, &Value)],
) -> Result<String, RowError> {
    let mut params: Vec<Option<String>> = writes.iter().map(|(_, v)| v.to_pg_text()).collect();
    let sets: Vec<String> = writes
        .iter()
        .enumerate()
        .map(|(i, (column, _))| {
            let def = &table.columns[*column];
            format!("{} = {}", quote_ident(&def.name), param(i + 1, &def.ty))
        })
        .collect();
    let sql = format!(
        "UPDATE {} SET {} WHERE {} RETURNING xmin::text",
        quote_table(&table.name),
        sets.join(", "),
        key_condition(table, writes.len() + 1)
    );
    params.extend(key_params(table, key)?);
    Ok(db.query_one(&sql, &as_params(&params)).await?.get(0))
}

/// Rewrites a row with the values it has (a write that changes nothing, for the capture to see:
/// a reviewer keeping a row as it is). Returns how many rows it wrote (0: the row is gone).
pub async fn rewrite_row(db: &impl GenericClient, table: &TableDef, key: &RowKey) -> Result<u64, RowError> {
    let column = table.columns.first().map(|c| &c.name).unwrap_or(&table.key[0].name);
    let sql = format!(
        "UPDATE {} SET {col} = {col} WHERE {}",
        quote_table(&table.name),
        key_condition(table, 1),
        col = quote_ident(column)
    );
    let params = key_params(table, key)?;
    Ok(db.execute(&sql, &as_params(&params)).await?)
}

/// Every key of a table with its xmin, for recording rows that predate accord.
pub async fn all_keys(db: &impl GenericClient, table: &TableDef) -> Result<Vec<(RowKey, String)>, RowError> {
    keys_where(db, table, "true", &[]).await
}

/// The keys and xmins of the rows `accord.take_in` noted that are still as they were then
/// (`tagging`).
pub async fn noted_keys(db: &impl GenericClient, table: &TableDef) -> Result<Vec<(RowKey, String)>, RowError> {
    keys_where(
        db,
        table,
        "EXISTS (SELECT 1 FROM accord.existing_rows e WHERE e.table_name = $1 \
                 AND e.row_ctid = accord_row.ctid AND e.row_xmin = accord_row.xmin)",
        &[&table.name],
    )
    .await
}

async fn keys_where(
    db: &impl GenericClient,
    table: &TableDef,
    filter: &str,
    params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
) -> Result<Vec<(RowKey, String)>, RowError> {
    let mut select = vec!["xmin::text".to_owned()];
    select.extend(table.key.iter().map(|k| read_expr(&k.name, &k.ty)));
    let sql = format!(
        "SELECT {} FROM {} AS accord_row WHERE {filter}",
        select.join(", "),
        quote_table(&table.name)
    );
    let rows = db.query(&sql, params).await?;
    let mut out = Vec::with_capacity(rows.len());
    for row in rows {
        let mut key = Vec::with_capacity(table.key.len());
        for (i, k) in table.key.iter().enumerate() {
            let text: Option<&str> = row.get(i + 1);
            let value = match text {
                None => Value::Null,
                Some(t) => Value::parse(&k.ty, t).map_err(|source| RowError::Value {
                    table: table.name.clone(),
                    column: k.name.clone(),
                    source,
                })?,
            };
            key.push(value);
        }
        out.push((RowKey(key), row.get(0)));
    }
    Ok(out)
}

// Many rows per statement: the keys and values travel as parallel text arrays, unnested into one
// row each and cast to the column types in SQL; `ord` says which input row a result belongs to,
// so results never have to be matched through text forms of the key.

/// `expr` (text) cast to `ty`.
pub(super) fn cast(expr: &str, ty: &ColumnType) -> String {
    match ty {
        // money reads a plain number only through numeric in every locale.
        ColumnType::Money => format!("({expr})::numeric::money"),
        other => format!("({expr})::{}", sql_type(other)),
    }
}

/// `unnest($first::int4[], $first+1::text[], ...) AS u(ord, c0, c1, ...)` with `columns` text arrays.
pub(super) fn unnest(first_param: usize, columns: usize) -> String {
    let arrays: Vec<String> = std::iter::once(format!("${first_param}::int4[]"))
        .chain((0..columns).map(|i| format!("${}::text[]", first_param + 1 + i)))
        .collect();
    let names: Vec<String> = std::iter::once("ord".to_owned())
        .chain((0..columns).map(|i| format!("c{i}")))
        .collect();
    format!("unnest({}) AS u({})", arrays.join(", "), names.join(", "))
}

/// `t.k1 = (u.c0)::type AND ...`: the table's key equal to the unnested key columns.
pub(super) fn key_join(table: &TableDef) -> String {
    table
        .key
        .iter()
        .enumerate()
        .map(|(i, k)| format!("t.{} = {}", quote_ident(&k.name), cast(&format!("u.c{i}"), &k.ty)))
        .collect::<Vec<_>>()
        .join(" AND ")
}

/// Locks the rows of many keys, in key order (two transactions locking overlapping sets in the
/// same order cannot deadlock on them). Parameters: ords, then one text array per key column.
/// Returns `ord, xmin, columns...` for the rows that exist.
pub fn lock_rows_sql(table: &TableDef) -> String {
    format!("{} FOR UPDATE OF t", read_rows_sql(table))
}

/// Reads the rows of many keys, without locking them, in key order. Parameters and results as
/// [`lock_rows_sql`]'s (the columns as text).
pub fn read_rows_sql(table: &TableDef) -> String {
    let mut select = vec!["u.ord".to_owned(), "t.xmin::text".to_owned()];
    select.extend(table.columns.iter().map(|c| read_expr_in("t", &c.name, &c.ty)));
    let order: Vec<String> = table
        .key
        .iter()
        .map(|k| format!("t.{}", quote_ident(&k.name)))
        .collect();
    format!(
        "SELECT {} FROM {} JOIN {} AS t ON {} ORDER BY {}",
        select.join(", "),
        unnest(1, table.key.len()),
        quote_table(&table.name),
        key_join(table),
        order.join(", ")
    )
}

/// The xmin and values of a row returned by [`lock_rows_sql`].
pub fn locked_row(table: &TableDef, row: &tokio_postgres::Row) -> Result<(String, Vec<Cell>), RowError> {
    let xmin: String = row.try_get(1)?;
    let mut cells = Vec::with_capacity(table.columns.len());
    for i in 0..table.columns.len() {
        let text: Option<&str> = row.try_get(i + 2)?;
        cells.push(Cell::Value(parse_cell(table, i, text)?));
    }
    Ok((xmin, cells))
}

/// Sets `columns` (indexes into the table's columns) of many rows. Parameters: ords, one text
/// array per key column, one per written column. Returns `ord, xmin` of every row written;
/// fails unless it wrote one row per ord ([`checked`]).
pub fn update_rows_sql(table: &TableDef, columns: &[usize]) -> String {
    checked("", &update_dml(table, columns))
}

fn update_dml(table: &TableDef, columns: &[usize]) -> String {
    let keys = table.key.len();
    let sets: Vec<String> = columns
        .iter()
        .enumerate()
        .map(|(i, &column)| {
            let def = &table.columns[column];
            format!(
                "{} = {}",
                quote_ident(&def.name),
                cast(&format!("u.c{}", keys + i), &def.ty)
            )
        })
        .collect();
    format!(
        "UPDATE {} AS t SET {} FROM {} WHERE {} RETURNING u.ord, t.xmin::text",
        quote_table(&table.name),
        sets.join(", "),
        unnest(1, keys + columns.len()),
        key_join(table)
    )
}

/// The quoted names of a table's key columns, then its other columns (the order insert
/// statements list them in), and the unnested text parameters cast to their types.
fn insert_columns(table: &TableDef) -> (Vec<String>, Vec<String>) {
    let key = table.key.iter().map(|k| (quote_ident(&k.name), &k.ty));
    let columns = table.columns.iter().map(|c| (quote_ident(&c.name), &c.ty));
    key.chain(columns)
        .enumerate()
        .map(|(i, (name, ty))| (name, cast(&format!("u.c{i}"), ty)))
        .unzip()
}

/// Inserts many rows. Parameters: ords, one text array per key column, one per column. Returns
/// `ord, xmin` of every row inserted, or only `ord` without `returns_xmin`: PostgreSQL cannot
/// return a system column from an insert into a partitioned table ([`xmins_sql`] reads them).
pub fn insert_rows_sql(table: &TableDef, returns_xmin: bool) -> String {
    let returned: Vec<String> = table.key.iter().map(|k| quote_ident(&k.name)).collect();
    // INSERT's RETURNING cannot name the input rows: join what was inserted back to them by key.
    let (xmin, xmin_out) = if returns_xmin {
        ("xmin::text AS accord_xmin, ", ", t.accord_xmin")
    } else {
        ("", "")
    };
    checked(
        &format!(
            "i AS ({}), ",
            insert_dml(table, &format!("{xmin}{}", returned.join(", ")))
        ),
        &format!(
            "SELECT u.ord{xmin_out} FROM {} JOIN i AS t ON {}",
            unnest(1, table.key.len() + table.columns.len()),
            key_join(table),
        ),
    )
}

/// The `INSERT` of [`insert_rows_sql`], returning `returning`.
fn insert_dml(table: &TableDef, returning: &str) -> String {
    let (names, values) = insert_columns(table);
    // In key order, like the locks: two appliers inserting the same new keys wait for each other
    // instead of deadlocking.
    // (The select list begins with the key columns.)
    let order: Vec<String> = (1..=table.key.len()).map(|i| i.to_string()).collect();
    format!(
        "INSERT INTO {table} ({names}) SELECT {values} FROM {unnest} ORDER BY {order} RETURNING {returning}",
        table = quote_table(&table.name),
        names = names.join(", "),
        values = values.join(", "),
        unnest = unnest(1, table.key.len() + table.columns.len()),
        order = order.join(", "),
    )
}

/// A batched write (`rows`, returning `ord` first, after the common table expressions `with`)
/// that fails unless it wrote one row per ord in its first parameter: a user's trigger that
/// skipped a row (a `BEFORE` trigger returning NULL), say, would otherwise leave a row accord
/// records as written. A failed statement rolls back to the write's savepoint, or, for a write
/// sent with its transaction's commit, whose answer comes too late to look at, makes that commit
/// a rollback. The check is [`ROWS_WRITTEN_DDL`]'s function, called once whatever was written
/// (from a one-row subquery, so also when nothing was).
fn checked(with: &str, rows: &str) -> String {
    format!(
        "WITH {with}w AS ({rows}) SELECT w.* FROM (SELECT accord.rows_written(cardinality($1::int4[]), \
         (SELECT count(*) FROM w))) AS c LEFT JOIN w ON true"
    )
}

/// The check of [`checked`].
pub const ROWS_WRITTEN_DDL: &str = "
CREATE OR REPLACE FUNCTION accord.rows_written(expected integer, written bigint) RETURNS bigint
LANGUAGE plpgsql AS $accord$
BEGIN
    IF written IS DISTINCT FROM expected THEN
        RAISE EXCEPTION 'a batched write touched % rows instead of %', written, expected;
    END IF;
    RETURN written;
END $accord$;
";

/// `COPY ... FROM STDIN` of whole rows (a join's copy: its rows' xmin is its transaction's), in
/// COPY's text format, the key columns first, then the columns (with `lc_monetary` set to `C`,
/// a money column takes a plain number, as [`read_expr`] gives it).
pub fn copy_rows_sql(table: &TableDef) -> String {
    let names: Vec<String> = table
        .key
        .iter()
        .map(|k| quote_ident(&k.name))
        .chain(table.columns.iter().map(|c| quote_ident(&c.name)))
        .collect();
    format!("COPY {} ({}) FROM STDIN", quote_table(&table.name), names.join(", "))
}

/// Appends one line of COPY's text format: fields separated by tabs, `\N` for NULL, a
/// backslash escaping what would end a field or a line. (tokio-postgres writes only the binary
/// format, which needs each type's binary form; these values are texts of any type.)
pub fn push_copy_line<'a>(line: &mut Vec<u8>, fields: impl IntoIterator<Item = Option<&'a str>>) {
    for (i, field) in fields.into_iter().enumerate() {
        if i > 0 {
            line.push(b'\t');
        }
        let Some(text) = field else {
            line.extend_from_slice(b"\\N");
            continue;
        };
        for byte in text.bytes() {
            match byte {
                b'\\' => line.extend_from_slice(b"\\\\"),
                b'\t' => line.extend_from_slice(b"\\t"),
                b'\n' => line.extend_from_slice(b"\\n"),
                b'\r' => line.extend_from_slice(b"\\r"),
                other => line.push(other),
            }
        }
    }
    line.push(b'\n');
}

/// The xmins of rows this transaction wrote. Parameters: ords, one text array per key column.
/// Returns `ord, xmin`.
pub fn xmins_sql(table: &TableDef) -> String {
    format!(
        "SELECT u.ord, t.xmin::text FROM {} JOIN {} AS t ON {}",
        unnest(1, table.key.len()),
        quote_table(&table.name),
        key_join(table)
    )
}

/// Deletes many rows. Parameters: ords, one text array per key column. Returns the ord of every
/// row deleted; fails unless it deleted one row per ord ([`checked`]).
pub fn delete_rows_sql(table: &TableDef) -> String {
    checked("", &delete_dml(table))
}

fn delete_dml(table: &TableDef) -> String {
    format!(
        "DELETE FROM {} AS t USING {} WHERE {} RETURNING u.ord",
        quote_table(&table.name),
        unnest(1, table.key.len()),
        key_join(table)
    )
}

/// The key of a row as text parameters, one per key column.
pub fn key_texts(table: &TableDef, key: &RowKey) -> Result<Vec<Option<String>>, RowError> {
    key_params(table, key)
}

#[cfg(test)]
pub(crate) mod tests {
    use accord_engine::{ColumnDef, ColumnPolicy, KeyColumn};

    use super::*;

    pub(crate) fn table() -> TableDef {
        TableDef::new(
            "s.t",
            vec![
                KeyColumn {
                    name: "region".into(),
                    ty: ColumnType::Other("text".into()),
                },
                KeyColumn {
                    name: "id".into(),
                    ty: ColumnType::BigInt,
                },
            ],
            vec![
                ColumnDef {
                    name: "price".into(),
                    ty: ColumnType::Money,
                    policy: ColumnPolicy::Lww,
                },
                ColumnDef {
                    name: "n".into(),
                    ty: ColumnType::Integer,
                    policy: ColumnPolicy::Delta,
                },
            ],
        )
        .expect("a valid test table")
    }

    #[test]
    fn copy_lines_escape_what_would_end_a_field() {
        let mut line = Vec::new();
        push_copy_line(&mut line, [Some("a\tb"), None, Some("c\\N\r\nd"), Some("")]);
        assert_eq!(line, b"a\\tb\t\\N\tc\\\\N\\r\\nd\t\n".to_vec());
    }

    #[test]
    fn multi_row_statements_number_their_parameters_in_order() {
        let t = table();
        assert_eq!(
            update_dml(&t, &[0, 1]),
            "UPDATE \"s\".\"t\" AS t SET \"price\" = (u.c2)::numeric::money, \"n\" = (u.c3)::integer \
             FROM unnest($1::int4[], $2::text[], $3::text[], $4::text[], $5::text[]) AS u(ord, c0, c1, c2, c3) \
             WHERE t.\"region\" = (u.c0)::text AND t.\"id\" = (u.c1)::bigint RETURNING u.ord, t.xmin::text"
        );
        assert_eq!(
            delete_dml(&t),
            "DELETE FROM \"s\".\"t\" AS t USING unnest($1::int4[], $2::text[], $3::text[]) AS u(ord, c0, c1) \
             WHERE t.\"region\" = (u.c0)::text AND t.\"id\" = (u.c1)::bigint RETURNING u.ord"
        );
        let lock = lock_rows_sql(&t);
        assert!(
            lock.contains("ORDER BY t.\"region\", t.\"id\" FOR UPDATE OF t"),
            "{lock}"
        );
        let insert = insert_rows_sql(&t, true);
        assert!(
            insert.contains("SELECT (u.c0)::text, (u.c1)::bigint, (u.c2)::numeric::money, (u.c3)::integer"),
            "{insert}"
        );
        assert!(insert.contains("ORDER BY 1, 2 RETURNING"), "{insert}");
        for write in [insert, update_rows_sql(&t, &[0]), delete_rows_sql(&t)] {
            assert!(write.contains("accord.rows_written(cardinality($1::int4[])"), "{write}");
        }
    }
}
