//! Reading the annotations of a live database from its catalog.
//!
//! Only the catalog is read, in one read-only transaction: checking a database never changes it.
//! Both queries run in one REPEATABLE READ snapshot so that a concurrent ALTER cannot pair one
//! version of a table with another version of its columns.

use std::collections::HashMap;

use thiserror::Error;
use tokio_postgres::{Client, IsolationLevel, Row};

use crate::catalog::{CatalogColumn, CatalogTable, RelationKind, ReplicaIdentity};
use crate::check::{check, Checked};

#[derive(Debug, Error)]
pub enum LoadError {
    #[error("could not read the catalog")]
    Query(#[source] tokio_postgres::Error),
}

impl From<tokio_postgres::Error> for LoadError {
    fn from(error: tokio_postgres::Error) -> Self {
        LoadError::Query(error)
    }
}

/// Relations that could carry a tag: those with any comment (their own or a column's) holding an
/// `@`, so that misspelled tags are found too. System schemas are left out.
const RELATIONS: &str = r"
SELECT c.oid, n.nspname::text, c.relname::text, c.relkind::text, c.relreplident::text,
       c.relpersistence = 'u', d.description,
       CASE WHEN c.relispartition THEN
         (SELECT rn.nspname || '.' || rc.relname FROM pg_catalog.pg_class rc
            JOIN pg_catalog.pg_namespace rn ON rn.oid = rc.relnamespace
           WHERE rc.oid = pg_catalog.pg_partition_root(c.oid))
       END
FROM pg_catalog.pg_class c
JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
LEFT JOIN pg_catalog.pg_description d
  ON d.objoid = c.oid AND d.classoid = 'pg_catalog.pg_class'::regclass AND d.objsubid = 0
WHERE c.relkind IN ('r', 'p', 'v', 'm', 'f')
  AND n.nspname <> 'information_schema'
  AND n.nspname NOT LIKE 'pg\_%'
  AND EXISTS (
    SELECT 1 FROM pg_catalog.pg_description a
    WHERE a.objoid = c.oid AND a.classoid = 'pg_catalog.pg_class'::regclass AND a.description LIKE '%@%')
";

/// The live columns of those relations, with their position in the primary key (from 1).
const COLUMNS: &str = r"
SELECT a.attrelid, a.attname::text, pg_catalog.format_type(a.atttypid, a.atttypmod), a.attnotnull,
       a.attgenerated <> '',
       (SELECT k.ord FROM unnest(i.indkey::int2[]) WITH ORDINALITY AS k(attnum, ord)
        WHERE k.attnum = a.attnum)::int4,
       d.description, pg_catalog.pg_get_expr(ad.adbin, ad.adrelid), a.attidentity <> ''
FROM pg_catalog.pg_attribute a
LEFT JOIN pg_catalog.pg_index i ON i.indrelid = a.attrelid AND i.indisprimary
LEFT JOIN pg_catalog.pg_attrdef ad ON ad.adrelid = a.attrelid AND ad.adnum = a.attnum AND a.attgenerated = ''
LEFT JOIN pg_catalog.pg_description d
  ON d.objoid = a.attrelid AND d.classoid = 'pg_catalog.pg_class'::regclass AND d.objsubid = a.attnum
WHERE a.attrelid = ANY($1) AND a.attnum > 0 AND NOT a.attisdropped
";

/// The relations and columns the checks need, as the catalog has them now.
pub async fn read_catalog(client: &mut Client) -> Result<Vec<CatalogTable>, LoadError> {
    let tx = client
        .build_transaction()
        .read_only(true)
        .isolation_level(IsolationLevel::RepeatableRead)
        .start()
        .await?;
    let mut tables = HashMap::new();
    for row in tx.query(RELATIONS, &[]).await? {
        let (oid, table) = relation(&row)?;
        tables.insert(oid, table);
    }
    let oids: Vec<u32> = tables.keys().copied().collect();
    for row in tx.query(COLUMNS, &[&oids]).await? {
        let (oid, column) = column(&row)?;
        if let Some(table) = tables.get_mut(&oid) {
            table.columns.push(column);
        }
    }
    tx.commit().await?;
    Ok(tables.into_values().collect())
}

/// The policy the database's comments declare, and every problem with them.
pub async fn check_database(client: &mut Client) -> Result<Checked, LoadError> {
    Ok(check(&read_catalog(client).await?))
}

fn relation(row: &Row) -> Result<(u32, CatalogTable), tokio_postgres::Error> {
    Ok((
        row.try_get(0)?,
        CatalogTable {
            schema: row.try_get(1)?,
            name: row.try_get(2)?,
            kind: RelationKind::from_relkind(row.try_get(3)?),
            replica_identity: ReplicaIdentity::from_relreplident(row.try_get(4)?),
            unlogged: row.try_get(5)?,
            comment: row.try_get(6)?,
            partition_of: row.try_get(7)?,
            columns: Vec::new(),
        },
    ))
}

fn column(row: &Row) -> Result<(u32, CatalogColumn), tokio_postgres::Error> {
    let key_position: Option<i32> = row.try_get(5)?;
    Ok((
        row.try_get(0)?,
        CatalogColumn {
            name: row.try_get(1)?,
            type_name: row.try_get(2)?,
            not_null: row.try_get(3)?,
            generated: row.try_get(4)?,
            key_position: key_position.and_then(|p| u32::try_from(p).ok()),
            comment: row.try_get(6)?,
            default: row.try_get(7)?,
            identity: row.try_get(8)?,
        },
    ))
}
