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

fn read_expr(name: &str, ty: &ColumnType) -> String {
    match ty {
        ColumnType::Money => format!("{}::numeric::text", quote_ident(name)),
        _ => format!("{}::text", quote_ident(name)),
    }
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

/// The row's xmin and values, locked until the end of the transaction; `None` if it is not there.
pub async fn lock_row(
    db: &impl GenericClient,
    table: &TableDef,
    key: &RowKey,
) -> Result<Option<(String, Vec<Cell>)>, RowError> {
    let mut select = vec!["xmin::text".to_owned()];
    select.extend(table.columns.iter().map(|c| read_expr(&c.name, &c.ty)));
    let sql = format!(
        "SELECT {} FROM {} WHERE {} FOR UPDATE",
        select.join(", "),
        quote_table(&table.name),
        key_condition(table, 1)
    );
    let params = key_params(table, key)?;
    let Some(row) = db.query_opt(&sql, &as_params(&params)).await? else {
        return Ok(None);
    };
    let xmin: String = row.get(0);
    let mut cells = Vec::with_capacity(table.columns.len());
    for i in 0..table.columns.len() {
        let text: Option<&str> = row.get(i + 1);
        cells.push(Cell::Value(parse_cell(table, i, text)?));
    }
    Ok(Some((xmin, cells)))
}

/// Inserts a row; returns its xmin.
pub async fn insert_row(
    db: &impl GenericClient,
    table: &TableDef,
    key: &RowKey,
    values: &[Value],
) -> Result<String, RowError> {
    let mut params = key_params(table, key)?;
    params.extend(values.iter().map(Value::to_pg_text));
    let names: Vec<String> = table
        .key
        .iter()
        .map(|k| quote_ident(&k.name))
        .chain(table.columns.iter().map(|c| quote_ident(&c.name)))
        .collect();
    let types: Vec<&ColumnType> = table
        .key
        .iter()
        .map(|k| &k.ty)
        .chain(table.columns.iter().map(|c| &c.ty))
        .collect();
    let placeholders: Vec<String> = types.iter().enumerate().map(|(i, ty)| param(i + 1, ty)).collect();
    let sql = format!(
        "INSERT INTO {} ({}) VALUES ({}) RETURNING xmin::text",
        quote_table(&table.name),
        names.join(", "),
        placeholders.join(", ")
    );
    Ok(db.query_one(&sql, &as_params(&params)).await?.get(0))
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

pub async fn delete_row(db: &impl GenericClient, table: &TableDef, key: &RowKey) -> Result<(), RowError> {
    let sql = format!(
        "DELETE FROM {} WHERE {}",
        quote_table(&table.name),
        key_condition(table, 1)
    );
    let params = key_params(table, key)?;
    db.execute(&sql, &as_params(&params)).await?;
    Ok(())
}

/// Every key of a table with its xmin, for recording rows that predate accord.
pub async fn all_keys(db: &impl GenericClient, table: &TableDef) -> Result<Vec<(RowKey, String)>, RowError> {
    let mut select = vec!["xmin::text".to_owned()];
    select.extend(table.key.iter().map(|k| read_expr(&k.name, &k.ty)));
    let sql = format!("SELECT {} FROM {}", select.join(", "), quote_table(&table.name));
    let rows = db.query(&sql, &[]).await?;
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
