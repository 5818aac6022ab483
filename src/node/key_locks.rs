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
//! A missing row's key may still have a local history the capture has not read: an insert and
//! a delete, committed while the capture was behind. Such a history leaves the row missing only
//! if it ends with a removal (a delete, an update that changed the key away, a TRUNCATE), so a
//! local transaction that removes rows counts itself, once, in a sequence
//! (`accord.local_removals`, which a rollback does not undo), after taking the node's removal
//! lock shared until it ends. An applier that holds its missing rows' keys reads the count
//! ([`REMOVAL_COUNT_SQL`]): if it is the count an apply read while it held the removal lock for a
//! moment, before a probe the capture has since read past ([`REMOVAL_COUNT_AT_REST_SQL`],
//! `engine::RemovalLedger`), no such history can be on its way through the capture, and a
//! missing row needs no probe (`engine::RemovalCount`). That wait was most of the lag of new
//! rows. Inserts counted themselves until 2026-12-07: then every local insert made the merges
//! of peers' new rows probe, and a node inserting its own rows all the time (every node of the
//! bench's mesh) probed for nearly every batch. Deletes count once per statement (a row trigger
//! made a 300,000-row `DELETE` 1.9 to 2.7 times slower, a statement trigger costs nothing to
//! speak of), except on a partitioned table: a statement trigger on it does not fire for a
//! `DELETE` that names a partition, and a row trigger is cloned onto every partition, those
//! made later too.
//!
//! The appliers' own writes skip the triggers (`accord.applying`, set on their sessions): they
//! lock what they insert into themselves, and a shared lock taken on the way would only add
//! waits between them. (A user who sets it, or `accord.removal_counted`, or writes with
//! `session_replication_role = replica`, which fires no triggers, skips them too, and gives up
//! what they protect.)

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

/// The sequence local removals count themselves in.
const COUNTER: &str = "accord.local_removals";

/// The sequence local inserts counted themselves in before 2026-12-07: dropped once no trigger
/// names it.
const OLD_COUNTER: &str = "accord.local_inserts";

/// The lock a local transaction that counted a removal holds shared until it ends: beside the
/// buckets (`0..BUCKETS`) in accord's class.
const REMOVAL_LOCK: u32 = BUCKETS;

/// Set, for the rest of a local transaction, once it counted a removal: it counts once.
const COUNTED_SETTING: &str = "accord.removal_counted";

/// Creates the counter, the function through which a transaction counts a removal, and the one
/// that reads the count at rest. `CACHE 1` (the default), so that every count reaches the
/// sequence at once, where the apply reads it, and none waits in a session's cache. The count
/// runs as its owner (`SECURITY DEFINER`, under a fixed search path): an application's role
/// that may delete rows needs no right on accord's sequence for it.
fn counter_sql() -> String {
    format!(
        "
CREATE SEQUENCE IF NOT EXISTS {COUNTER} CACHE 1;
COMMENT ON SEQUENCE {COUNTER} IS
    'accord: local transactions that removed rows of replicated tables, counted by accord''s triggers, for the apply';
CREATE OR REPLACE FUNCTION accord.count_removal() RETURNS boolean
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog AS $accord$
BEGIN
    IF current_setting('{APPLYING_SETTING}', true) = 'on'
       OR current_setting('{COUNTED_SETTING}', true) = 'on' THEN
        RETURN false;
    END IF;
    PERFORM pg_advisory_xact_lock_shared({CLASS}, {REMOVAL_LOCK});
    PERFORM nextval({counter});
    PERFORM set_config('{COUNTED_SETTING}', 'on', true);
    RETURN false;
END
$accord$;
COMMENT ON FUNCTION accord.count_removal() IS
    'accord: a local transaction that removes rows of replicated tables counts itself once, holding the removal lock shared, for the apply';
CREATE OR REPLACE FUNCTION accord.removal_count_at_rest() RETURNS bigint
LANGUAGE plpgsql SET search_path = pg_catalog AS $accord$
DECLARE
    counted bigint;
BEGIN
    IF NOT pg_try_advisory_lock({CLASS}, {REMOVAL_LOCK}) THEN
        RETURN NULL;
    END IF;
    counted := COALESCE(pg_sequence_last_value({counter}::regclass), 0);
    PERFORM pg_advisory_unlock({CLASS}, {REMOVAL_LOCK});
    RETURN counted;
END
$accord$;
COMMENT ON FUNCTION accord.removal_count_at_rest() IS
    'accord: the count of local removals, read while no transaction that counted itself is open (else NULL), for the apply';
",
        counter = literal(COUNTER),
    )
}

/// The count of local removals, as an apply holding its missing rows' keys reads it.
pub const REMOVAL_COUNT_SQL: &str =
    "SELECT COALESCE(pg_catalog.pg_sequence_last_value('accord.local_removals'::regclass), 0)";

/// The count of local removals read while this session holds the removal lock for a moment, so
/// that every transaction that counted itself has ended; NULL if one is still open.
pub const REMOVAL_COUNT_AT_REST_SQL: &str = "SELECT accord.removal_count_at_rest()";

/// The triggers, named to fire after the table's other `BEFORE` triggers (PostgreSQL fires them
/// in name order), so that they lock the key those settled on.
const INSERT_TRIGGER: &str = "zz_accord_key_lock_insert";
const UPDATE_TRIGGER: &str = "zz_accord_key_lock_update";
/// Counts a `DELETE` (see the module's documentation for why per statement, or per row on a
/// partitioned table).
const REMOVAL_TRIGGER: &str = "zz_accord_count_removals";
/// Counted each `INSERT` statement before 2026-12-07: dropped where found.
const OLD_COUNT_TRIGGER: &str = "zz_accord_count_inserts";

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
    -- The old key is removed.
    PERFORM accord.count_removal();
    RETURN NEW;
END
$accord$;
COMMENT ON FUNCTION accord.key_lock_update() IS
    'accord: a local update that changes a replicated key takes the new key''s lock shared and counts the old key''s removal, for the apply';
"
    )
}

/// The triggers of one table: every insert, and updates that change the key, take their key's
/// bucket shared, unless an applier writes; a transaction that deletes rows, or changes a key,
/// counts a removal ([`COUNTER`], through `accord.count_removal()`; an applier's deletes call
/// nothing, as a partitioned table's row trigger would otherwise call it for every row they
/// delete). `CASE` evaluates its branches
/// lazily and in order (an `AND` may be reordered or folded), and nothing in it is constant.
/// An update's `WHEN` only compares the keys; the function it calls does the rest
/// ([`key_change_function`]). `partitioned`: the table is partitioned, and its deletes count in
/// a row trigger.
fn triggers_sql(table: &TableDef, partitioned: bool) -> String {
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
    let applying = format!("pg_catalog.current_setting('{APPLYING_SETTING}', true) = 'on'");
    let counted = format!("pg_catalog.current_setting('{COUNTED_SETTING}', true) = 'on'");
    let removal_timing = match partitioned {
        true => "AFTER DELETE ON {target} FOR EACH ROW",
        false => "BEFORE DELETE ON {target} FOR EACH STATEMENT",
    }
    .replace("{target}", &target);
    format!(
        "DROP TRIGGER IF EXISTS {OLD_COUNT_TRIGGER} ON {target};
CREATE OR REPLACE TRIGGER {INSERT_TRIGGER} BEFORE INSERT ON {target} FOR EACH ROW
    WHEN (CASE WHEN {applying} THEN false ELSE {lock} END)
    EXECUTE FUNCTION accord.key_lock_taken();
CREATE OR REPLACE TRIGGER {REMOVAL_TRIGGER} {removal_timing}
    WHEN (CASE WHEN {counted} THEN false WHEN {applying} THEN false ELSE accord.count_removal() END)
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
/// database initialised by an earlier version, whose removals the apply would take as never
/// made, or whose update trigger costs every update its lock's expression; creating a trigger
/// waits for the table's writers, so a restart does not do it needlessly). The functions are
/// made anew every time (TRUNCATE's trigger counts through `accord.count_removal()` too).
pub async fn install_triggers(db: &impl GenericClient, tables: &[TableDef], replace: bool) -> Result<usize> {
    db.batch_execute(NOTHING_FUNCTION)
        .await
        .context("cannot create accord.key_lock_taken()")?;
    db.batch_execute(&counter_sql())
        .await
        .with_context(|| format!("cannot create the sequence that counts local removals ({COUNTER})"))?;
    db.batch_execute(&key_change_function())
        .await
        .context("cannot create accord.key_lock_update()")?;
    let mut installed = 0;
    for table in tables {
        let found = db
            .query_one(
                "SELECT count(*) FILTER (WHERE tgname = $2
                                            OR tgname = $4
                                            OR (tgname = $3 AND pg_catalog.pg_get_triggerdef(oid) LIKE '%accord.key_lock_update(%')),
                        count(*) FILTER (WHERE tgname = $5),
                        (SELECT relkind = 'p' FROM pg_catalog.pg_class WHERE oid = $1::text::regclass)
                   FROM pg_catalog.pg_trigger
                  WHERE tgrelid = $1::text::regclass",
                &[
                    &quote_table(&table.name),
                    &INSERT_TRIGGER,
                    &UPDATE_TRIGGER,
                    &REMOVAL_TRIGGER,
                    &OLD_COUNT_TRIGGER,
                ],
            )
            .await
            .with_context(|| format!("cannot find table {}", table.name))?;
        let (present, old, partitioned): (i64, i64, Option<bool>) =
            (found.try_get(0)?, found.try_get(1)?, found.try_get(2)?);
        if present == 3 && old == 0 && !replace {
            continue;
        }
        db.batch_execute(&triggers_sql(table, partitioned == Some(true)))
            .await
            .with_context(|| format!("cannot install accord's key-lock triggers on {}", table.name))?;
        installed += 1;
    }
    // The old counter goes once no trigger counts in it: a table that left replication without
    // accord's event trigger may keep its old triggers (the update function they call is this
    // version's now).
    db.batch_execute(&format!(
        "DO $accord$ BEGIN
             IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_trigger WHERE tgname = '{OLD_COUNT_TRIGGER}') THEN
                 DROP SEQUENCE IF EXISTS {OLD_COUNTER};
             END IF;
         END $accord$"
    ))
    .await
    .with_context(|| format!("cannot drop the sequence that counted local inserts ({OLD_COUNTER})"))?;
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

    /// Asserts that `sql` holds each of `parts`, in this order.
    fn in_order(sql: &str, parts: &[&str]) {
        let mut from = 0;
        for part in parts {
            let at = sql[from..]
                .find(part)
                .unwrap_or_else(|| panic!("{part:?} is missing or out of order in {sql}"));
            from += at + part.len();
        }
    }

    #[test]
    fn the_triggers_take_the_bucket_the_apply_locks_shared_unless_an_applier_writes() {
        let table = crate::node::rows::tests::table();
        let sql = triggers_sql(&table, false);
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
        assert!(
            sql.contains(
                "BEFORE INSERT ON \"s\".\"t\" FOR EACH ROW\n    \
                 WHEN (CASE WHEN pg_catalog.current_setting('accord.applying', true) = 'on' THEN false ELSE"
            ),
            "appliers' inserts take no lock: {sql}"
        );
        assert!(
            sql.contains(
                "BEFORE DELETE ON \"s\".\"t\" FOR EACH STATEMENT\n    \
                 WHEN (CASE WHEN pg_catalog.current_setting('accord.removal_counted', true) = 'on' THEN false \
                 WHEN pg_catalog.current_setting('accord.applying', true) = 'on' THEN false \
                 ELSE accord.count_removal() END)"
            ),
            "a delete statement counts a removal, once per transaction: {sql}"
        );
        assert!(
            sql.starts_with("DROP TRIGGER IF EXISTS zz_accord_count_inserts ON \"s\".\"t\";"),
            "the older insert count goes: {sql}"
        );
        assert!(!sql.contains("nextval"), "inserts do not count: {sql}");
        let partitioned = triggers_sql(&table, true);
        assert!(
            partitioned.contains("AFTER DELETE ON \"s\".\"t\" FOR EACH ROW\n"),
            "a partitioned table counts in a row trigger, which its partitions get too: {partitioned}"
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
        // Skip appliers, lock the new key's bucket, then count the old key's removal.
        in_order(
            &function,
            &[
                "current_setting('accord.applying', true) = 'on'",
                "pg_advisory_xact_lock_shared(1633907300, bucket)",
                "PERFORM accord.count_removal()",
            ],
        );
        // A transaction counts once, holding the removal lock until it ends, and is marked.
        let counter = counter_sql();
        in_order(
            &counter,
            &[
                "current_setting('accord.removal_counted', true) = 'on'",
                "pg_advisory_xact_lock_shared(1633907300, 256)",
                "nextval('accord.local_removals')",
                "set_config('accord.removal_counted', 'on', true)",
            ],
        );
        assert!(
            counter.contains("pg_try_advisory_lock(1633907300, 256)"),
            "the count at rest only tries the lock: {counter}"
        );
    }
}
