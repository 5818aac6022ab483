//! Locks on keys, rows or not, between appliers (ARCHITECTURE.md, "Apply").
//!
//! A missing row cannot be locked: two peers' appliers merging into one missing row both found
//! no metadata, and the later commit overwrote the earlier's (a delta lost; the simulator found
//! it once it ran the appliers side by side). So an apply transaction, once it has locked the
//! rows that exist, takes an exclusive transaction-level advisory lock on the key of every row it
//! found missing. Only those: the rows that exist are held by their row locks, and locking every
//! key made two appliers of a node wait for each other on nearly every batch (the buckets below
//! overlap), which doubled the mesh's lag in the comparison bench.
//!
//! The locks are buckets, not keys: PostgreSQL's lock table is shared and small (by default 64
//! locks per connection for all of them), and one lock per key of a 2,000-change batch, times
//! one applier per peer, would run it out ("out of shared memory"). A key's bucket is its
//! table's name and PostgreSQL's own hash of the typed key values (`hash_record`, which hashes
//! equal numerics alike), folded into [`BUCKETS`] locks of accord's advisory-lock class. Two
//! keys in one bucket only make their appliers wait for each other.

use accord_engine::TableDef;

use super::rows::{cast, key_join, quote_table, unnest};

/// accord's advisory-lock class ("acrd"): an application's own two-key advisory locks meet it
/// only if they use the same class.
const CLASS: i32 = 0x6163_7264;

/// How many locks the keys of all replicated tables share. At most this many per apply
/// transaction.
pub const BUCKETS: u32 = 256;

fn literal(text: &str) -> String {
    format!("'{}'", text.replace('\'', "''"))
}

/// Locks the buckets of the keys of several tables that have no row, exclusively for the
/// transaction, all in one statement and in bucket order, so that appliers do not deadlock on
/// them (every applier takes its row locks before these). Parameters: per table in this order,
/// those of [`super::rows::lock_rows_sql`] (ords, then one text array per key column).
pub fn lock_keys_sql(tables: &[&TableDef]) -> String {
    let mut first = 1;
    let mut parts = Vec::with_capacity(tables.len());
    for table in tables {
        let key: Vec<String> = table
            .key
            .iter()
            .enumerate()
            .map(|(i, k)| cast(&format!("u.c{i}"), &k.ty))
            .collect();
        parts.push(format!(
            "SELECT (hashtext({}) # hash_record(ROW({}))) & {} AS bucket FROM {} \
             WHERE NOT EXISTS (SELECT 1 FROM {} AS t WHERE {})",
            literal(&table.name),
            key.join(", "),
            BUCKETS - 1,
            unnest(first, table.key.len()),
            quote_table(&table.name),
            key_join(table)
        ));
        first += 1 + table.key.len();
    }
    format!(
        "SELECT pg_advisory_xact_lock({CLASS}, s.bucket) FROM (SELECT DISTINCT b.bucket FROM ({}) AS b \
         ORDER BY 1) AS s",
        parts.join(" UNION ALL ")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_rows_keys_are_locked_by_bucket_of_their_typed_values_in_order() {
        let table = crate::node::rows::tests::table();
        let sql = lock_keys_sql(&[&table, &table]);
        assert!(
            sql.contains("(hashtext('s.t') # hash_record(ROW((u.c0)::text, (u.c1)::bigint))) & 255"),
            "{sql}"
        );
        // The second table's parameters follow the first's three.
        assert!(sql.contains("unnest($4::int4[], $5::text[], $6::text[])"), "{sql}");
        assert!(sql.contains("pg_advisory_xact_lock(1633907300, s.bucket)"), "{sql}");
        assert!(sql.contains("ORDER BY 1"), "{sql}");
        assert!(
            sql.contains("WHERE NOT EXISTS (SELECT 1 FROM \"s\".\"t\" AS t WHERE t.\"region\" = (u.c0)::text"),
            "only missing rows' keys: {sql}"
        );
        assert!(BUCKETS.is_power_of_two(), "the mask needs a power of two");
    }
}
