//! Locks on keys without rows, between appliers and local writers (ARCHITECTURE.md, "Apply").
//!
//! A missing row cannot be locked. When a load finds rows missing, the engine has the apply lock
//! their keys before it probes (`ApplyCommand::LockKeys`), exclusively and until its
//! transaction ends (or it starts over, if one is busy); a local insert of a key, or an update
//! that changes a key, takes the same lock shared, from triggers `accord init` installs on every replicated table. So a local
//! write of such a key either committed before the lock, and so before the probe the capture
//! reads past, or waits until the merge committed: it can no longer reach the capture after the
//! merge's metadata and be read against it (the simulator found both, a local insert and delete
//! during the probe's wait, and an insert committed just before a merge that wrote only a
//! tombstone). And two peers' appliers merging into one missing row take turns: both found no
//! metadata once, and the later commit overwrote the earlier's (a delta lost).
//!
//! The locks are buckets, not keys: PostgreSQL's lock table is shared and small (by default 64
//! locks per connection for all of them), and one lock per key of a 2,000-change batch, times
//! one applier per peer, or of a local bulk insert, would run it out ("out of shared memory").
//! A key's bucket is its table's name and PostgreSQL's own hash of the typed key values
//! (`hash_record`, which hashes equal numerics alike), folded into [`BUCKETS`] locks of
//! accord's advisory-lock class. Two keys in one bucket only make their writers wait for each
//! other.
//!
//! After their locks, a local insert statement (or key update) counts itself in a sequence
//! (`accord.local_inserts`), which a rollback does not undo. An applier that holds its missing
//! rows' keys reads the count ([`INSERT_COUNT_SQL`]): if it is the count an apply read while it
//! held every bucket for a moment, before a probe the capture has since read past
//! ([`INSERT_COUNT_AT_REST_SQL`], `engine::InsertLedger`), no local insert can be on its way
//! through the capture, and a missing row needs no probe (`engine::InsertCount`). That wait was
//! most of the lag of new rows. One sequence, not one per bucket: a row trigger touching one of
//! 256 sequences made a 200,000-row `INSERT ... SELECT` 1.5 times slower than the lock alone, one
//! sequence 1.15 times (on a scratch cluster, `fsync` off); once per statement, less still.
//!
//! The appliers' own writes skip the triggers (`accord.applying`, set on their sessions): they
//! lock what they insert into themselves, and a shared lock taken on the way would only add
//! waits between them. (A user who sets it, or writes with `session_replication_role =
//! replica`, which fires no triggers, skips them too, and gives up what they protect.)

use accord_engine::TableDef;
use anyhow::{Context, Result};
use tokio_postgres::GenericClient;

use super::rows::{cast, quote_ident, quote_table, unnest};

/// accord's advisory-lock class ("acrd"): an application's own two-key advisory locks meet it
/// only if they use the same class.
const CLASS: i32 = 0x6163_7264;

/// How many locks the keys of all replicated tables share. At most this many per transaction.
pub const BUCKETS: u32 = 256;

/// Set to `on` on the appliers' sessions: their writes skip the key-lock trigger.
pub const APPLYING_SETTING: &str = "accord.applying";

/// The sequence local inserts count themselves in.
const COUNTER: &str = "accord.local_inserts";

/// Creates the counter, and the function that reads it at rest. `CACHE 1` (the default), so that
/// every count reaches the sequence at once, where the apply reads it, and none waits in a
/// session's cache.
fn counter_sql() -> String {
    format!(
        "
CREATE SEQUENCE IF NOT EXISTS accord.local_inserts CACHE 1;
COMMENT ON SEQUENCE accord.local_inserts IS
    'accord: local inserts into replicated tables, counted by the key-lock triggers, for the apply';
CREATE OR REPLACE FUNCTION accord.insert_count_at_rest() RETURNS bigint
LANGUAGE plpgsql SET search_path = pg_catalog AS $accord$
DECLARE
    taken int[] := '{{}}';
    counted bigint;
BEGIN
    FOR bucket IN 0..{last} LOOP
        IF NOT pg_try_advisory_lock({CLASS}, bucket) THEN
            PERFORM pg_advisory_unlock({CLASS}, t) FROM unnest(taken) AS t;
            RETURN NULL;
        END IF;
        taken := taken || bucket;
    END LOOP;
    counted := COALESCE(pg_sequence_last_value('accord.local_inserts'::regclass), 0);
    PERFORM pg_advisory_unlock({CLASS}, t) FROM unnest(taken) AS t;
    RETURN counted;
END
$accord$;
COMMENT ON FUNCTION accord.insert_count_at_rest() IS
    'accord: the count of local inserts, read while every key-lock bucket is free (else NULL), for the apply';
",
        last = BUCKETS - 1
    )
}

/// The count of local inserts, as an apply holding its missing rows' keys reads it.
pub const INSERT_COUNT_SQL: &str =
    "SELECT COALESCE(pg_catalog.pg_sequence_last_value('accord.local_inserts'::regclass), 0)";

/// The count of local inserts read while this session holds every bucket for a moment (tried,
/// each one let go again, and the ones it held before still held: advisory locks count), so that
/// every transaction that counted itself has ended; NULL if another transaction holds one.
pub const INSERT_COUNT_AT_REST_SQL: &str = "SELECT accord.insert_count_at_rest()";

/// The triggers, named to fire after the table's other `BEFORE` triggers (PostgreSQL fires them
/// in name order), so that they lock the key those settled on.
const INSERT_TRIGGER: &str = "zz_accord_key_lock_insert";
const UPDATE_TRIGGER: &str = "zz_accord_key_lock_update";
/// Counts an `INSERT` (or `COPY`) statement once, after its rows took their keys' locks: once per
/// statement, not per row (a count per row made a 200,000-row `INSERT ... SELECT` 1.15 times
/// slower than the lock alone; after the statement, not before it, so that a transaction that
/// counted holds its buckets until it ends). An update that changes a key counts in its own
/// row trigger, after the lock: a statement trigger would count every update.
const COUNT_TRIGGER: &str = "zz_accord_count_inserts";

pub(super) fn literal(text: &str) -> String {
    format!("'{}'", text.replace('\'', "''"))
}

/// A key's bucket: `key` gives each key column's value as an SQL expression (text).
fn bucket(table: &TableDef, key: impl Fn(usize, &str) -> String) -> String {
    let values: Vec<String> = table
        .key
        .iter()
        .enumerate()
        .map(|(i, k)| cast(&key(i, &k.name), &k.ty))
        .collect();
    format!(
        "(pg_catalog.hashtext({}) # pg_catalog.hash_record(ROW({}))) & {}",
        literal(&table.name),
        values.join(", "),
        BUCKETS - 1
    )
}

/// Tries to lock the buckets of keys of several tables, exclusively, as session locks (released
/// by [`UNLOCK_SQL`] after the transaction ends, or if any is busy), all in one statement and in
/// bucket order. Returns one row: whether every lock was taken (NULL when there were none).
/// Parameters: per table in this order, those of [`super::rows::lock_rows_sql`] (ords, then one
/// text array per key column).
///
/// Tried, not waited for: a local transaction inserting many rows takes these buckets shared in
/// its own order, and an applier waiting for one while holding others deadlocked with it.
/// Session locks, because a transaction's own cannot be let go before it ends.
pub fn lock_keys_sql(tables: &[&TableDef]) -> String {
    let mut first = 1;
    let mut parts = Vec::with_capacity(tables.len());
    for table in tables {
        parts.push(format!(
            "SELECT {} AS bucket FROM {}",
            bucket(table, |i, _| format!("u.c{i}")),
            unnest(first, table.key.len()),
        ));
        first += 1 + table.key.len();
    }
    format!(
        "SELECT bool_and(pg_catalog.pg_try_advisory_lock({CLASS}, s.bucket)) FROM \
         (SELECT DISTINCT b.bucket FROM ({}) AS b ORDER BY 1) AS s",
        parts.join(" UNION ALL ")
    )
}

/// Releases the key locks of an applier's session (it takes no other session-level advisory
/// locks).
pub const UNLOCK_SQL: &str = "SELECT pg_catalog.pg_advisory_unlock_all()";

/// The function the insert triggers name. It does nothing: the lock is taken in the triggers'
/// `WHEN` conditions, which PostgreSQL evaluates as an expression, without calling a function per
/// row (a PL/pgSQL trigger that took the lock itself made a 200,000-row `INSERT ... SELECT`
/// 2.4–3.4 times slower, this one 1.2–1.5 times; the bench `compare`'s inserts scenario measures
/// it). The lock function returns `void`, never NULL, so the condition is false and the function
/// is not called.
const NOTHING_FUNCTION: &str = "
CREATE OR REPLACE FUNCTION accord.key_lock_taken() RETURNS trigger LANGUAGE plpgsql AS $accord$
BEGIN
    RETURN NEW;
END
$accord$;
COMMENT ON FUNCTION accord.key_lock_taken() IS
    'accord: named by the key-lock triggers, whose WHEN conditions take the lock; never called';
";

/// The function the update trigger calls for a row whose key changed: its argument is the
/// bucket's expression over `$1`, the new row ([`bucket`], the same typed values as the apply's).
/// Not in the trigger's `WHEN`, as the insert trigger's lock is: PostgreSQL reads a trigger's
/// `WHEN` from its stored text once for every statement that fires it, and the lock and the
/// count there cost every update a third of its rate (pgbench, prepared single-row updates of
/// no key on a scratch cluster: 0.66× the bare table; with only the key comparison in the
/// `WHEN`, 0.95×). Key changes are rare; the dynamic statement is theirs alone. It runs under
/// the search path of the session that installs it (`SET search_path FROM CURRENT`), under which
/// the key types' names were read and a `WHEN` would have been parsed: under the user's own, a
/// key of a type their path does not show failed every key change ("type ... does not exist").
fn key_change_function() -> String {
    format!(
        "
CREATE OR REPLACE FUNCTION accord.key_lock_update() RETURNS trigger LANGUAGE plpgsql
SET search_path FROM CURRENT AS $accord$
DECLARE
    bucket integer;
BEGIN
    IF pg_catalog.current_setting('{APPLYING_SETTING}', true) = 'on' THEN
        RETURN NEW;
    END IF;
    EXECUTE 'SELECT ' || TG_ARGV[0] INTO bucket USING NEW;
    PERFORM pg_catalog.pg_advisory_xact_lock_shared({CLASS}, bucket);
    PERFORM pg_catalog.nextval({counter});
    RETURN NEW;
END
$accord$;
COMMENT ON FUNCTION accord.key_lock_update() IS
    'accord: a local update that changes a replicated key takes the key''s lock shared and counts itself, for the apply';
",
        counter = literal(COUNTER),
    )
}

/// The triggers of one table: every insert, and updates that change the key, take their key's
/// bucket shared, and count themselves ([`COUNTER`]) after that, unless an applier writes.
/// `CASE` evaluates its branches lazily and in order (an `AND` may be reordered or folded), and
/// nothing in it is constant: the count comes after the lock, so that an apply holding the
/// bucket reads a count no running transaction can still add to. An update's `WHEN` only
/// compares the keys; the function it calls does the rest, in the same order
/// ([`key_change_function`]).
fn triggers_sql(table: &TableDef) -> String {
    let target = quote_table(&table.name);
    let row_key = |row: &str| -> String {
        let columns: Vec<String> = table
            .key
            .iter()
            .map(|k| format!("{row}.{}", quote_ident(&k.name)))
            .collect();
        format!("ROW({})", columns.join(", "))
    };
    let lock = format!(
        "pg_catalog.pg_advisory_xact_lock_shared({CLASS}, {}) IS NULL",
        bucket(table, |_, name| format!("NEW.{}", quote_ident(name))),
    );
    let changed_bucket = bucket(table, |_, name| format!("($1).{}", quote_ident(name)));
    let count = format!("pg_catalog.nextval({}) IS NULL", literal(COUNTER));
    let applying = format!("pg_catalog.current_setting('{APPLYING_SETTING}', true) = 'on'");
    format!(
        "CREATE OR REPLACE TRIGGER {INSERT_TRIGGER} BEFORE INSERT ON {target} FOR EACH ROW
    WHEN (CASE WHEN {applying} THEN false ELSE {lock} END)
    EXECUTE FUNCTION accord.key_lock_taken();
CREATE OR REPLACE TRIGGER {COUNT_TRIGGER} AFTER INSERT ON {target} FOR EACH STATEMENT
    WHEN (CASE WHEN {applying} THEN false ELSE {count} END)
    EXECUTE FUNCTION accord.key_lock_taken();
CREATE OR REPLACE TRIGGER {UPDATE_TRIGGER} BEFORE UPDATE ON {target} FOR EACH ROW
    WHEN ({} IS DISTINCT FROM {})
    EXECUTE FUNCTION accord.key_lock_update({});
",
        row_key("OLD"),
        row_key("NEW"),
        literal(&changed_bucket),
    )
}

/// Installs the key-lock triggers on the replicated tables: all of them (`accord init`, whose
/// policy may have changed a key), or only where they are missing or older (a node starting on a
/// database initialised by an earlier version, whose triggers' inserts the apply would take as
/// never made, or whose update trigger costs every update its lock's expression; creating a
/// trigger waits for the table's writers, so a restart does not do it needlessly).
pub async fn install_triggers(db: &impl GenericClient, tables: &[TableDef], replace: bool) -> Result<usize> {
    let mut installed = 0;
    for table in tables {
        let present: i64 = db
            .query_one(
                "SELECT count(*) FROM pg_catalog.pg_trigger
                  WHERE tgrelid = $1::text::regclass
                    AND (tgname = $2
                         OR (tgname = $3 AND pg_catalog.pg_get_triggerdef(oid) LIKE '%accord.key_lock_update(%')
                         OR (tgname = $4 AND pg_catalog.pg_get_triggerdef(oid) LIKE '%' || $5 || '%'))",
                &[
                    &quote_table(&table.name),
                    &INSERT_TRIGGER,
                    &UPDATE_TRIGGER,
                    &COUNT_TRIGGER,
                    &COUNTER,
                ],
            )
            .await
            .with_context(|| format!("cannot find table {}", table.name))?
            .try_get(0)?;
        if present == 3 && !replace {
            continue;
        }
        if installed == 0 {
            db.batch_execute(NOTHING_FUNCTION)
                .await
                .context("cannot create accord.key_lock_taken()")?;
            db.batch_execute(&counter_sql())
                .await
                .context("cannot create the sequence that counts local inserts (accord.local_inserts)")?;
            db.batch_execute(&key_change_function())
                .await
                .context("cannot create accord.key_lock_update()")?;
        }
        db.batch_execute(&triggers_sql(table))
            .await
            .with_context(|| format!("cannot install accord's key-lock triggers on {}", table.name))?;
        installed += 1;
    }
    Ok(installed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_locked_by_bucket_of_their_typed_values_in_order() {
        let table = crate::node::rows::tests::table();
        let sql = lock_keys_sql(&[&table, &table]);
        assert!(
            sql.contains(
                "(pg_catalog.hashtext('s.t') # pg_catalog.hash_record(ROW((u.c0)::text, (u.c1)::bigint))) & 255"
            ),
            "{sql}"
        );
        // The second table's parameters follow the first's three.
        assert!(sql.contains("unnest($4::int4[], $5::text[], $6::text[])"), "{sql}");
        assert!(
            sql.contains("bool_and(pg_catalog.pg_try_advisory_lock(1633907300, s.bucket))"),
            "{sql}"
        );
        assert!(sql.contains("ORDER BY 1"), "{sql}");
        assert!(BUCKETS.is_power_of_two(), "the mask needs a power of two");
    }

    #[test]
    fn the_triggers_take_the_bucket_the_apply_locks_shared_unless_an_applier_writes() {
        let table = crate::node::rows::tests::table();
        let sql = triggers_sql(&table);
        let bucket = "(pg_catalog.hashtext('s.t') # pg_catalog.hash_record(ROW((NEW.\"region\")::text, (NEW.\"id\")::bigint))) & 255";
        let lock = format!("pg_advisory_xact_lock_shared(1633907300, {bucket}) IS NULL");
        assert_eq!(
            sql.matches(&lock).count(),
            1,
            "the insert trigger: the same typed values, table and class as the apply's: {sql}"
        );
        // The update trigger's function reads the bucket of the new row, passed as `$1`, from
        // its argument (a literal, so its quotes are doubled).
        let changed = bucket.replace("NEW.", "($1).").replace('\'', "''");
        assert!(
            sql.contains(&format!("EXECUTE FUNCTION accord.key_lock_update('{changed}');")),
            "{sql}"
        );
        assert_eq!(
            sql.matches("CASE WHEN pg_catalog.current_setting('accord.applying', true) = 'on' THEN false")
                .count(),
            2,
            "{sql}"
        );
        assert!(sql.contains("BEFORE INSERT ON \"s\".\"t\" FOR EACH ROW"), "{sql}");
        assert!(
            sql.contains("AFTER INSERT ON \"s\".\"t\" FOR EACH STATEMENT"),
            "inserts count once per statement, after their rows' locks: {sql}"
        );
        assert!(
            sql.contains("ELSE pg_catalog.nextval('accord.local_inserts') IS NULL END"),
            "an insert statement counts itself: {sql}"
        );
        assert!(
            sql.contains(
                "BEFORE UPDATE ON \"s\".\"t\" FOR EACH ROW\n    \
                 WHEN (ROW(OLD.\"region\", OLD.\"id\") IS DISTINCT FROM ROW(NEW.\"region\", NEW.\"id\"))"
            ),
            "updates call the function only when they change the key: {sql}"
        );
        let function = key_change_function();
        assert!(
            function.contains("SET search_path FROM CURRENT"),
            "the bucket's type names resolve as at install, not under the user's path: {function}"
        );
        let applying = function
            .find("current_setting('accord.applying', true) = 'on'")
            .expect("the function lets appliers by");
        let locks = function
            .find("pg_advisory_xact_lock_shared(1633907300, bucket)")
            .expect("the function takes the bucket shared");
        let counts = function
            .find("nextval('accord.local_inserts')")
            .expect("the function counts the key change");
        assert!(
            applying < locks && locks < counts,
            "skip appliers, lock, then count: {function}"
        );
    }
}
