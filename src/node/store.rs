//! accord's own tables in each database, and how engine types are stored in them.
//!
//! Metadata, changes and review items are stored as MessagePack (named fields, so a field added
//! later reads back as its default); the columns people query (status, table, key, candidates) are
//! plain SQL beside them.

use accord_engine::{
    Candidate, ClosureKind, CollectionState, Conflict, Hlc, NodeId, ReviewAction, ReviewItem, ReviewKind, RowChange,
    RowKey, RowMeta, ShapeBook, ShapeId, StableCut, TableDef, Value,
};
use serde::{de::DeserializeOwned, Serialize};
use thiserror::Error;
use tokio_postgres::GenericClient;

pub const SCHEMA: &str = "accord";
pub const PUBLICATION: &str = "accord_pub";
pub const SLOT: &str = "accord_slot";
/// Logical-decoding messages with this prefix carry the greatest stamp a merge committed.
pub const HLC_MESSAGE_PREFIX: &str = "accord.hlc";
/// Writes into this table, in the same transaction as a write to a review column, say which
/// review item the write resolves.
pub const RESOLUTIONS_TABLE: &str = "accord.review_resolutions";

/// The replication origin that marks changes applied from `peer`, and records how far they got.
pub fn origin_name(peer: accord_engine::NodeId) -> String {
    format!("accord_peer_{}", peer.0)
}

/// The peer whose changes a replication origin named by [`origin_name`] tracks.
pub fn peer_of_origin(name: &str) -> Option<accord_engine::NodeId> {
    let id = name.strip_prefix("accord_peer_")?;
    // Only the canonical spelling, so that one peer has one origin.
    if id.starts_with('0') || id.starts_with('+') {
        return None;
    }
    id.parse().ok().map(accord_engine::NodeId)
}

/// Whether the node's capture streams its slot (its `accord run` is up).
pub async fn capture_running(db: &impl GenericClient) -> Result<bool, StoreError> {
    Ok(db
        .query_opt(
            "SELECT 1 FROM pg_replication_slots WHERE slot_name = $1 AND active",
            &[&SLOT],
        )
        .await?
        .is_some())
}

/// The last of this node's changes `peer` acknowledged, as last persisted (0: none yet).
pub async fn peer_acked(db: &impl GenericClient, peer: accord_engine::NodeId) -> Result<u64, StoreError> {
    let acked: i64 = db
        .query_opt(
            "SELECT acked FROM accord.peer_progress WHERE peer = $1",
            &[&(peer.0 as i32)],
        )
        .await?
        .map(|r| r.get(0))
        .unwrap_or(0);
    Ok(u64::try_from(acked).unwrap_or(0))
}

/// Every peer's applied position as its replication origin holds it now (committed applies,
/// flushed or not).
pub async fn applied_positions(db: &impl GenericClient) -> Result<Vec<(accord_engine::NodeId, u64)>, StoreError> {
    let rows = db
        .query(
            "SELECT roname, pg_replication_origin_progress(roname, false) FROM pg_replication_origin \
             WHERE roname LIKE 'accord\\_peer\\_%'",
            &[],
        )
        .await?;
    Ok(rows
        .iter()
        .filter_map(|row| {
            let name: String = row.get(0);
            let position: Option<tokio_postgres::types::PgLsn> = row.get(1);
            Some((peer_of_origin(&name)?, position.map_or(0, u64::from)))
        })
        .collect())
}

/// Changes that lack values their row does not have here yet (unchanged TOAST relayed by a node
/// that was not the values' origin), kept until a merge brings the values. Created by `accord
/// init`, and by a node starting on a database initialised before it existed.
pub const DEFERRED_DDL: &str = "
CREATE TABLE IF NOT EXISTS accord.deferred (
    table_name text    NOT NULL,
    row_key    text    NOT NULL,
    origin     integer NOT NULL,
    seq        bigint  NOT NULL,
    change     bytea   NOT NULL,
    kept_at    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (table_name, row_key, origin, seq)
);
COMMENT ON TABLE accord.deferred IS 'accord: changes waiting for values their row does not have here yet';
";

/// What this node has applied of each peer's changes, written by every apply transaction beside
/// its replication origin's position. The origin's position is what PostgreSQL keeps crash-safe,
/// but it is not MVCC: a snapshot reads it as it is now, not as it was when the snapshot's rows
/// were. This table is, so a joining node copies rows, metadata and these positions consistently
/// from one snapshot (`join`). Created by `accord init`, and by a node starting on a database
/// initialised before it existed (each applier then records its origin's position once).
pub const APPLIED_DDL: &str = "
CREATE TABLE IF NOT EXISTS accord.applied (
    origin integer PRIMARY KEY,
    seq    bigint  NOT NULL
);
COMMENT ON TABLE accord.applied IS 'accord: the last change of each peer applied here, written with the apply';
";

/// The greatest stamp each peer's merges merged here (a join's copy, under its donor), written
/// with the merge: a restarted capture's clock passes them (`Capturer::merged_before`), so the
/// capture need not commit its checkpoint for a group that only merged. Created by `accord
/// init`, and by a node starting on a database initialised before they existed.
pub const APPLIED_MERGED_DDL: &str = "ALTER TABLE accord.applied
    ADD COLUMN IF NOT EXISTS merged_physical bigint,
    ADD COLUMN IF NOT EXISTS merged_logical bigint;";

/// Raises the greatest stamp merged from a peer, in a join's chunk. Parameters: peer,
/// physical, logical. A peer not recorded yet gets its row with no position applied.
pub const RECORD_MERGED_SQL: &str = "INSERT INTO accord.applied AS a (origin, seq, merged_physical, merged_logical)
     VALUES ($1, 0, $2, $3)
     ON CONFLICT (origin) DO UPDATE SET merged_physical = EXCLUDED.merged_physical, merged_logical = EXCLUDED.merged_logical
     WHERE a.merged_physical IS NULL
        OR (a.merged_physical, a.merged_logical) < (EXCLUDED.merged_physical, EXCLUDED.merged_logical)";

/// The parameters of [`RECORD_MERGED_SQL`].
pub fn merged_params(peer: NodeId, stamp: Hlc) -> Result<super::pipeline::Params, StoreError> {
    let (physical, logical) = stamp_params(stamp)?;
    Ok(vec![Box::new(node_param(peer)?), Box::new(physical), Box::new(logical)])
}

/// A node id as `accord.applied.origin` stores it (`integer`).
pub fn node_param(node: NodeId) -> Result<i32, StoreError> {
    i32::try_from(node.0).map_err(|_| StoreError::Corrupt(format!("node id {node} is beyond a 32-bit integer")))
}

fn stamp_params(stamp: Hlc) -> Result<(i64, i64), StoreError> {
    let physical = i64::try_from(stamp.physical)
        .map_err(|_| StoreError::Corrupt(format!("the physical time of stamp {stamp} is beyond a 64-bit integer")))?;
    Ok((physical, i64::from(stamp.logical)))
}

/// The greatest stamps merged here, per peer, as `accord.applied` holds them.
pub async fn recorded_merges(db: &impl GenericClient) -> Result<Vec<Hlc>, StoreError> {
    let rows = db
        .query(
            "SELECT origin, merged_physical, merged_logical FROM accord.applied WHERE merged_physical IS NOT NULL",
            &[],
        )
        .await?;
    rows.iter()
        .map(|row| {
            let (origin, physical, logical): (i32, i64, i64) = (row.try_get(0)?, row.try_get(1)?, row.try_get(2)?);
            let bad = || {
                StoreError::Corrupt(format!(
                    "accord.applied holds merged stamp {physical}.{logical} of node {origin}, out of range"
                ))
            };
            Ok(Hlc::new(
                u64::try_from(physical).map_err(|_| bad())?,
                u32::try_from(logical).map_err(|_| bad())?,
                NodeId(u32::try_from(origin).map_err(|_| bad())?),
            ))
        })
        .collect()
}

/// The shape of its table each row's metadata was stored under (`engine::shape`; NULL: before
/// metadata named it). Created by `accord init`, and by a node starting on a database initialised
/// before it existed (adding a nullable column rewrites nothing).
pub const ROW_META_SHAPE_DDL: &str = "ALTER TABLE accord.row_meta ADD COLUMN IF NOT EXISTS shape bigint;";

/// The review items of a row, found by its key (a joining node reads them by key range).
/// Created by `accord init`, and by a node starting on a database initialised before it existed.
/// What `accord repair` replaced on this node: the row as it was (`replaced`, NULL when the
/// table did not have it), kept so that nothing it held is lost.
pub const REPAIRED_DDL: &str = "
CREATE TABLE IF NOT EXISTS accord.repaired (
    id          bigserial PRIMARY KEY,
    repaired_at timestamptz NOT NULL DEFAULT now(),
    table_name  text NOT NULL,
    row_key     text NOT NULL,
    replaced    jsonb,
    why         text NOT NULL
);
COMMENT ON TABLE accord.repaired IS 'accord: rows accord repair replaced on this node, as they were';
";

pub const REVIEW_ROWS_DDL: &str =
    "CREATE INDEX IF NOT EXISTS review_items_row ON accord.review_items (table_name, row_key);";

/// Records a peer's applied position, and the greatest stamp the transaction merged if it is
/// greater than the one on record, in the apply's transaction (one row version per commit).
/// Parameters: peer, position, physical and logical time of the stamp (NULL: none merged).
pub const RECORD_APPLIED_SQL: &str = "INSERT INTO accord.applied AS a (origin, seq, merged_physical, merged_logical)
     VALUES ($1, $2, $3, $4)
     ON CONFLICT (origin) DO UPDATE SET seq = EXCLUDED.seq,
       merged_physical = CASE WHEN (a.merged_physical, a.merged_logical)
           < (EXCLUDED.merged_physical, EXCLUDED.merged_logical) OR a.merged_physical IS NULL
         THEN coalesce(EXCLUDED.merged_physical, a.merged_physical) ELSE a.merged_physical END,
       merged_logical = CASE WHEN (a.merged_physical, a.merged_logical)
           < (EXCLUDED.merged_physical, EXCLUDED.merged_logical) OR a.merged_physical IS NULL
         THEN coalesce(EXCLUDED.merged_logical, a.merged_logical) ELSE a.merged_logical END";

/// The parameters of [`RECORD_APPLIED_SQL`].
pub fn applied_params(peer: NodeId, position: u64, merged: Option<Hlc>) -> Result<super::pipeline::Params, StoreError> {
    let position = i64::try_from(position)
        .map_err(|_| StoreError::Corrupt(format!("applied position {position} is beyond a 64-bit integer")))?;
    let (physical, logical) = match merged {
        Some(stamp) => {
            let (physical, logical) = stamp_params(stamp)?;
            (Some(physical), Some(logical))
        }
        None => (None, None),
    };
    Ok(vec![
        Box::new(node_param(peer)?),
        Box::new(position),
        Box::new(physical),
        Box::new(logical),
    ])
}

/// Every peer's applied position as `accord.applied` holds it in the reading transaction's
/// snapshot.
pub async fn recorded_applied(db: &impl GenericClient) -> Result<Vec<(accord_engine::NodeId, u64)>, StoreError> {
    let rows = db
        .query("SELECT origin, seq FROM accord.applied ORDER BY origin", &[])
        .await?;
    Ok(rows
        .iter()
        .filter_map(|row| {
            let origin: i32 = row.get(0);
            let seq: i64 = row.get(1);
            Some((NodeId(u32::try_from(origin).ok()?), u64::try_from(seq).ok()?))
        })
        .collect())
}

/// What a node had applied of every node, and of its own changes captured (`node`: itself), in
/// the snapshot of its current transaction (or a statement's own): the positions a join starts
/// from, and what a verification's cut is made of.
pub async fn snapshot_positions(
    db: &impl GenericClient,
    node: accord_engine::NodeId,
) -> Result<Vec<(accord_engine::NodeId, u64)>, StoreError> {
    let mut positions = recorded_applied(db).await?;
    let last: i64 = db
        .query_one("SELECT last_seq FROM accord.capture_state", &[])
        .await?
        .get(0);
    positions.retain(|(n, _)| *n != node);
    positions.push((node, u64::try_from(last).unwrap_or(0)));
    positions.sort();
    Ok(positions)
}

/// The kept changes of many rows. Parameters: ords, table names, keys. Returns `ord, change`.
pub const LOAD_DEFERRED_SQL: &str = "SELECT u.ord, d.change
     FROM unnest($1::int4[], $2::text[], $3::text[]) AS u(ord, table_name, row_key)
     JOIN accord.deferred AS d ON d.table_name = u.table_name AND d.row_key = u.row_key
     ORDER BY d.table_name, d.row_key, d.origin, d.seq
     FOR UPDATE OF d";

/// Keeps a change until its row has the values it lacks.
pub async fn keep_change(db: &impl GenericClient, change: &RowChange) -> Result<(), StoreError> {
    db.execute(
        "INSERT INTO accord.deferred (table_name, row_key, origin, seq, change) VALUES ($1, $2, $3, $4, $5)
         ON CONFLICT DO NOTHING",
        &[
            &change.table,
            &key_text(&change.key),
            &i32::try_from(change.origin.0).unwrap_or(i32::MAX),
            &i64::try_from(change.seq).unwrap_or(i64::MAX),
            &encode("kept change", change)?,
        ],
    )
    .await?;
    Ok(())
}

/// Forgets a kept change that merged.
pub async fn drop_kept_change(
    db: &impl GenericClient,
    table: &str,
    key: &str,
    origin: NodeId,
    seq: u64,
) -> Result<(), StoreError> {
    db.execute(
        "DELETE FROM accord.deferred WHERE table_name = $1 AND row_key = $2 AND origin = $3 AND seq = $4",
        &[
            &table,
            &key,
            &i32::try_from(origin.0).unwrap_or(i32::MAX),
            &i64::try_from(seq).unwrap_or(i64::MAX),
        ],
    )
    .await?;
    Ok(())
}

pub const DDL: &str = r#"
CREATE SCHEMA IF NOT EXISTS accord;
COMMENT ON SCHEMA accord IS 'accord: replication metadata, review queue and conflict log';

CREATE TABLE IF NOT EXISTS accord.node (
    singleton   boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    node_id     integer NOT NULL,
    fingerprint text    NOT NULL,
    initialized_at timestamptz NOT NULL DEFAULT now()
);

-- Per replicated row: accord's metadata, and the transaction id of the row version it accounts
-- for (a merge waits while the row's xmin differs: a local write the capture has not seen yet).
CREATE TABLE IF NOT EXISTS accord.row_meta (
    table_name text  NOT NULL,
    row_key    text  NOT NULL,
    meta       bytea NOT NULL,
    alive      boolean NOT NULL,
    known_xmin text,
    shape      bigint,
    PRIMARY KEY (table_name, row_key)
);

-- The tombstones, for the collection and the status.
CREATE INDEX IF NOT EXISTS row_meta_tombstones ON accord.row_meta (table_name, row_key) WHERE NOT alive;

-- This node's stamped changes, in capture order, until every peer acknowledged them.
CREATE TABLE IF NOT EXISTS accord.outbound (
    seq    bigint PRIMARY KEY,
    change bytea  NOT NULL,
    captured_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE IF NOT EXISTS accord.capture_state (
    singleton   boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    checkpoint  bytea   NOT NULL,
    last_seq    bigint  NOT NULL,
    covered_lsn pg_lsn  NOT NULL,
    updated_at  timestamptz NOT NULL DEFAULT now()
);

-- How far each peer acknowledged this node's changes (what it applied of ours is its own business;
-- what we applied of its changes is in the replication origin accord_peer_<id>).
-- What this node knows of the tombstone-collection rounds (engine::collection), persisted before
-- it is sent: acknowledgements are promises about what this node had applied.
CREATE TABLE IF NOT EXISTS accord.collection (
    singleton  boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    state      bytea   NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE IF NOT EXISTS accord.peer_progress (
    peer   integer PRIMARY KEY,
    acked  bigint  NOT NULL DEFAULT 0,
    updated_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE IF NOT EXISTS accord.review_items (
    id          text PRIMARY KEY,
    table_name  text NOT NULL,
    row_key     text NOT NULL,
    column_name text,
    kind        text NOT NULL CONSTRAINT review_items_kind_check
                CHECK (kind IN ('concurrent', 'displaced_insert', 'unapplicable')),
    status      text NOT NULL CHECK (status IN ('open', 'resolved', 'superseded')),
    candidates  jsonb NOT NULL DEFAULT '[]',
    error       text,
    closed_by   text,
    closed_value text,
    closed_stamp text,
    item        bytea NOT NULL,
    change      bytea,
    opened_at   timestamptz NOT NULL DEFAULT now(),
    closed_at   timestamptz
);
CREATE INDEX IF NOT EXISTS review_items_open ON accord.review_items (status, opened_at);
-- Databases set up before displaced inserts existed allow only the first two kinds.
DO $$
BEGIN
    IF NOT EXISTS (
        SELECT 1 FROM pg_constraint
        WHERE conrelid = 'accord.review_items'::regclass AND conname = 'review_items_kind_check'
          AND pg_get_constraintdef(oid) LIKE '%displaced_insert%'
    ) THEN
        ALTER TABLE accord.review_items DROP CONSTRAINT IF EXISTS review_items_kind_check;
        ALTER TABLE accord.review_items ADD CONSTRAINT review_items_kind_check
            CHECK (kind IN ('concurrent', 'displaced_insert', 'unapplicable'));
    END IF;
END
$$;

CREATE TABLE IF NOT EXISTS accord.review_resolutions (
    item_id     text PRIMARY KEY,
    resolved_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE IF NOT EXISTS accord.conflict_log (
    id          bigserial PRIMARY KEY,
    logged_at   timestamptz NOT NULL DEFAULT now(),
    table_name  text NOT NULL,
    row_key     text NOT NULL,
    column_name text,
    kind        text NOT NULL,
    winner      text NOT NULL,
    loser       text NOT NULL
);
"#;

#[derive(Debug, Error)]
pub enum StoreError {
    #[error("cannot encode {what}: {source}")]
    Encode {
        what: &'static str,
        #[source]
        source: rmp_serde::encode::Error,
    },
    #[error("stored {what} does not decode (written by another accord version?): {source}")]
    Decode {
        what: &'static str,
        #[source]
        source: rmp_serde::decode::Error,
    },
    #[error(transparent)]
    Db(#[from] tokio_postgres::Error),
    #[error("{0}")]
    Corrupt(String),
    #[error(transparent)]
    Shape(#[from] accord_engine::ShapeError),
}

pub fn encode<T: Serialize>(what: &'static str, value: &T) -> Result<Vec<u8>, StoreError> {
    rmp_serde::to_vec_named(value).map_err(|source| StoreError::Encode { what, source })
}

pub fn decode<T: DeserializeOwned>(what: &'static str, bytes: &[u8]) -> Result<T, StoreError> {
    rmp_serde::from_slice(bytes).map_err(|source| StoreError::Decode { what, source })
}

/// The canonical text of a row key: a JSON array, numerics normalised so that `1.5` and `1.50`
/// (equal to PostgreSQL) are one key.
pub fn key_text(key: &RowKey) -> String {
    // Written directly rather than through `serde_json::Value` (the same text): a verification
    // computes it for every row of a table.
    let mut out = String::with_capacity(8 + 8 * key.0.len());
    out.push('[');
    for (i, value) in key.0.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        match value {
            Value::Null => out.push_str("null"),
            Value::Int(n) => out.push_str(&n.to_string()),
            Value::Numeric(d) => push_json_string(&mut out, &d.normalized().to_plain_string()),
            Value::Text(s) => push_json_string(&mut out, s),
        }
    }
    out.push(']');
    out
}

fn push_json_string(out: &mut String, text: &str) {
    out.push_str(&serde_json::Value::from(text).to_string());
}

fn value_json(v: &Value) -> serde_json::Value {
    match v {
        Value::Null => serde_json::Value::Null,
        Value::Int(i) => serde_json::Value::from(*i),
        other => serde_json::Value::from(other.to_string()),
    }
}

fn candidates_json(candidates: &[Candidate]) -> serde_json::Value {
    candidates
        .iter()
        .map(|c| {
            serde_json::json!({
                "value": value_json(&c.value),
                "node": c.stamp.node.0,
                "stamp": c.stamp.to_string(),
            })
        })
        .collect()
}

/// Carries out a merge's or a capture's review-queue actions.
pub async fn apply_review(db: &impl GenericClient, actions: &[ReviewAction]) -> Result<(), StoreError> {
    for action in actions {
        match action {
            ReviewAction::Open(item) => open_item(db, item, None).await?,
            ReviewAction::Withdraw(id) => {
                db.execute(
                    "DELETE FROM accord.review_items WHERE id = $1 AND status = 'open'",
                    &[&id.to_string()],
                )
                .await?;
            }
            ReviewAction::Close(closure) => {
                let (status, by, value, stamp) = match &closure.kind {
                    ClosureKind::Resolved { by, stamp, value } => ("resolved", Some(by.0.to_string()), value, stamp),
                    ClosureKind::Superseded { stamp, value } => ("superseded", None, value, stamp),
                };
                let item = encode("review item", &closure.item)?;
                let stamp_text = stamp.to_string();
                let stamp_key = stamp_sort_key(stamp);
                // Concurrent closers: the greatest stamp is kept (ReviewClosure::replaces), which
                // the fixed-width sort key lets SQL compare.
                db.execute(
                    "INSERT INTO accord.review_items
                       (id, table_name, row_key, column_name, kind, status, candidates, item, closed_by, closed_value, closed_stamp, closed_at)
                     VALUES ($1, $2, $3, $4, 'concurrent', $5, $6, $7, $8, $9, $10, now())
                     ON CONFLICT (id) DO UPDATE SET status = EXCLUDED.status, closed_by = EXCLUDED.closed_by,
                       closed_value = EXCLUDED.closed_value, closed_stamp = EXCLUDED.closed_stamp, closed_at = now()
                     WHERE accord.review_items.closed_stamp IS NULL OR accord.review_items.closed_stamp < EXCLUDED.closed_stamp",
                    &[
                        &closure.item.id.to_string(),
                        &closure.item.table,
                        &key_text(&closure.item.key),
                        &closure.item.column,
                        &status,
                        &candidates_json(closure.item.candidates()),
                        &item,
                        &by,
                        &value.to_pg_text(),
                        &format!("{stamp_key} {stamp_text}"),
                    ],
                )
                .await?;
            }
        }
    }
    Ok(())
}

/// A stamp as text that sorts like the stamp.
fn stamp_sort_key(stamp: &accord_engine::Hlc) -> String {
    format!("{:020}.{:010}.{:010}", stamp.physical, stamp.logical, stamp.node.0)
}

/// Records an open item: a concurrent-write item, or a parked change with what it was.
pub async fn open_item(
    db: &impl GenericClient,
    item: &ReviewItem,
    change: Option<&RowChange>,
) -> Result<(), StoreError> {
    let (kind, error) = match &item.kind {
        ReviewKind::Concurrent { .. } => ("concurrent", None),
        ReviewKind::DisplacedInsert { .. } => ("displaced_insert", None),
        ReviewKind::Unapplicable { error, .. } => ("unapplicable", Some(error.as_str())),
    };
    let bytes = encode("review item", item)?;
    let change = change.map(|c| encode("change", c)).transpose()?;
    db.execute(
        "INSERT INTO accord.review_items (id, table_name, row_key, column_name, kind, status, candidates, error, item, change)
         VALUES ($1, $2, $3, $4, $5, 'open', $6, $7, $8, $9)
         ON CONFLICT (id) DO NOTHING",
        &[
            &item.id.to_string(),
            &item.table,
            &key_text(&item.key),
            &item.column,
            &kind,
            &candidates_json(item.candidates()),
            &error,
            &bytes,
            &change,
        ],
    )
    .await?;
    Ok(())
}

pub async fn log_conflicts(
    db: &impl GenericClient,
    table: &str,
    key: &str,
    conflicts: &[Conflict],
) -> Result<(), StoreError> {
    for c in conflicts {
        let kind = format!("{:?}", c.kind);
        db.execute(
            "INSERT INTO accord.conflict_log (table_name, row_key, column_name, kind, winner, loser)
             VALUES ($1, $2, $3, $4, $5, $6)",
            &[
                &table,
                &key,
                &c.column,
                &kind,
                &c.winner.to_string(),
                &c.loser.to_string(),
            ],
        )
        .await?;
    }
    Ok(())
}

// Many rows per statement, for the capture's and the apply's batches: the rows travel as parallel
// arrays and are unnested in SQL.

/// [`LOAD_METAS_SQL`] with a lock option after `FOR UPDATE` (`concat!` takes literals only).
macro_rules! load_metas_sql {
    ($lock_option:literal) => {
        concat!(
            "SELECT u.ord, m.meta, m.known_xmin, m.shape
     FROM unnest($1::int4[], $2::text[], $3::text[]) AS u(ord, table_name, row_key)
     JOIN accord.row_meta AS m ON m.table_name = u.table_name AND m.row_key = u.row_key
     ORDER BY m.table_name, m.row_key
     FOR UPDATE OF m",
            $lock_option
        )
    };
}

/// Locks and reads the metadata of many rows, in (table, key) order so that the capture and the
/// appliers, locking overlapping sets, always lock in the same order. Parameters: ords, table
/// names, row keys. Returns `ord, meta, known_xmin` for the rows that have metadata.
pub const LOAD_METAS_SQL: &str = load_metas_sql!("");

/// [`LOAD_METAS_SQL`] that fails (`lock_not_available`) instead of waiting for a lock another
/// transaction holds: the apply's guard load, which must not wait holding metadata locks.
pub const LOAD_METAS_NOWAIT_SQL: &str = load_metas_sql!(" NOWAIT");

/// Writes the metadata of many rows (each (table, key) at most once). Parameters: table names,
/// row keys, metas, alive flags, known xmins, shapes.
pub const SAVE_METAS_SQL: &str = "INSERT INTO accord.row_meta (table_name, row_key, meta, alive, known_xmin, shape)
     SELECT * FROM unnest($1::text[], $2::text[], $3::bytea[], $4::bool[], $5::text[], $6::int8[])
     ON CONFLICT (table_name, row_key) DO UPDATE
     SET meta = EXCLUDED.meta, alive = EXCLUDED.alive, known_xmin = EXCLUDED.known_xmin, shape = EXCLUDED.shape";

/// A shape's id as PostgreSQL's `bigint` (the same 64 bits).
pub fn shape_param(id: ShapeId) -> i64 {
    i64::from_le_bytes(id.0.to_le_bytes())
}

/// A shape's id from PostgreSQL's `bigint`.
pub fn shape_of(stored: i64) -> ShapeId {
    ShapeId(u64::from_le_bytes(stored.to_le_bytes()))
}

/// Appends many changes to the outbound log. Parameters: sequence numbers, encoded changes.
pub const APPEND_OUTBOUND_SQL: &str =
    "INSERT INTO accord.outbound (seq, change) SELECT * FROM unnest($1::int8[], $2::bytea[])";

/// Logs many conflicts, in order. Parameters: tables, keys, columns, kinds, winners, losers.
pub const LOG_CONFLICTS_SQL: &str =
    "INSERT INTO accord.conflict_log (table_name, row_key, column_name, kind, winner, loser)
     SELECT table_name, row_key, column_name, kind, winner, loser
     FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[])
       WITH ORDINALITY AS c(table_name, row_key, column_name, kind, winner, loser, n)
     ORDER BY n";

/// Stored metadata rows, as returned by [`LOAD_METAS_SQL`]: the ord and the metadata, read as
/// the row's table (`table_of` the ord) has it now, with the xmin it accounts for. Tombstones the
/// collection `cut` covers are left out, as if gone.
pub fn loaded_metas<'t>(
    rows: &[tokio_postgres::Row],
    cut: Option<&StableCut>,
    shapes: &ShapeBook,
    table_of: impl Fn(usize) -> Option<&'t TableDef>,
) -> Result<Vec<(usize, RowMeta, Option<String>)>, StoreError> {
    let mut out = Vec::with_capacity(rows.len());
    // Each table's shape id once per call, not once per row.
    let mut current: Vec<(&str, ShapeId)> = Vec::new();
    for row in rows {
        let ord: i32 = row.try_get(0)?;
        let bytes: &[u8] = row.try_get(1)?;
        let known: Option<String> = row.try_get(2)?;
        let stored: Option<i64> = row.try_get(3)?;
        // Ords are indexes this node sent, never negative.
        let ord = usize::try_from(ord).unwrap_or(usize::MAX);
        let mut meta: RowMeta = decode("row metadata", bytes)?;
        if let Some(table) = table_of(ord) {
            let id = match current.iter().find(|(name, _)| *name == table.name) {
                Some((_, id)) => *id,
                None => {
                    let id = table.shape_id();
                    current.push((&table.name, id));
                    id
                }
            };
            meta = shapes.stored_meta_under(meta, stored.map(shape_of), table, id)?;
        }
        if StableCut::live(cut, Some(&meta)).is_some() {
            out.push((ord, meta, known));
        }
    }
    Ok(out)
}

/// [`loaded_metas`], reading `accord.shapes` again when a row names a shape `shapes` does not
/// hold yet (recorded meanwhile by another part of this node: the capture, or an applier that
/// read the catalog again). `local` adds what this reader knows of its own tables.
pub async fn loaded_metas_fresh<'t>(
    db: &impl tokio_postgres::GenericClient,
    rows: &[tokio_postgres::Row],
    shapes: &ShapeBook,
    local: impl Fn(&mut ShapeBook),
    table_of: impl Fn(usize) -> Option<&'t TableDef> + Copy,
) -> Result<Vec<(usize, RowMeta, Option<String>)>, StoreError> {
    match loaded_metas(rows, None, shapes, table_of) {
        Err(StoreError::Shape(accord_engine::ShapeError::UnknownShape { .. })) => {
            let mut book = super::shapes::book(&super::shapes::load(db).await?);
            local(&mut book);
            loaded_metas(rows, None, &book, table_of)
        }
        other => other,
    }
}

/// The columns of [`SAVE_METAS_SQL`], filled row by row.
#[derive(Default)]
pub struct MetaRows {
    tables: Vec<String>,
    keys: Vec<String>,
    metas: Vec<Vec<u8>>,
    alive: Vec<bool>,
    known: Vec<Option<String>>,
    shapes: Vec<i64>,
}

impl MetaRows {
    /// A row's metadata, stored under `shape`, its table's shape now.
    pub fn push(
        &mut self,
        (table, shape): (&str, ShapeId),
        key: &str,
        meta: &RowMeta,
        known_xmin: Option<&str>,
    ) -> Result<(), StoreError> {
        self.tables.push(table.to_owned());
        self.keys.push(key.to_owned());
        self.metas.push(encode("row metadata", meta)?);
        self.alive.push(meta.is_alive());
        self.known.push(known_xmin.map(str::to_owned));
        self.shapes.push(shape_param(shape));
        Ok(())
    }

    pub fn is_empty(&self) -> bool {
        self.tables.is_empty()
    }

    pub fn len(&self) -> usize {
        self.tables.len()
    }

    /// The statement's parameters.
    pub fn into_params(self) -> super::pipeline::Params {
        vec![
            Box::new(self.tables),
            Box::new(self.keys),
            Box::new(self.metas),
            Box::new(self.alive),
            Box::new(self.known),
            Box::new(self.shapes),
        ]
    }
}

/// The columns of [`LOG_CONFLICTS_SQL`], filled conflict by conflict.
#[derive(Default)]
pub struct ConflictRows {
    tables: Vec<String>,
    keys: Vec<String>,
    columns: Vec<Option<String>>,
    kinds: Vec<String>,
    winners: Vec<String>,
    losers: Vec<String>,
}

impl ConflictRows {
    pub fn push(&mut self, table: &str, key: &str, conflict: &Conflict) {
        self.tables.push(table.to_owned());
        self.keys.push(key.to_owned());
        self.columns.push(conflict.column.clone());
        self.kinds.push(format!("{:?}", conflict.kind));
        self.winners.push(conflict.winner.to_string());
        self.losers.push(conflict.loser.to_string());
    }

    pub fn is_empty(&self) -> bool {
        self.tables.is_empty()
    }

    pub fn into_params(self) -> super::pipeline::Params {
        vec![
            Box::new(self.tables),
            Box::new(self.keys),
            Box::new(self.columns),
            Box::new(self.kinds),
            Box::new(self.winners),
            Box::new(self.losers),
        ]
    }
}

/// The collection state this node persisted (the default before the first round).
pub async fn load_collection(db: &impl GenericClient) -> Result<CollectionState, StoreError> {
    let row = db.query_opt("SELECT state FROM accord.collection", &[]).await?;
    match row {
        None => Ok(CollectionState::default()),
        Some(row) => decode("collection state", row.get::<_, &[u8]>(0)),
    }
}

pub async fn save_collection(db: &impl GenericClient, state: &CollectionState) -> Result<(), StoreError> {
    let bytes = encode("collection state", state)?;
    db.execute(
        "INSERT INTO accord.collection (singleton, state) VALUES (true, $1)
         ON CONFLICT (singleton) DO UPDATE SET state = EXCLUDED.state, updated_at = now()",
        &[&bytes],
    )
    .await?;
    Ok(())
}

/// How many tombstones one statement of [`collect_tombstones`] looks at.
const COLLECT_CHUNK: i64 = 5_000;

/// Deletes the tombstones `cut` covers, a chunk per statement, and returns how many went. A
/// tombstone that a capture or an apply changes meanwhile no longer has the bytes read here, and
/// stays.
pub async fn collect_tombstones(db: &impl GenericClient, cut: &StableCut) -> Result<u64, StoreError> {
    let mut deleted = 0;
    let mut after = (String::new(), String::new());
    loop {
        let rows = db
            .query(
                "SELECT table_name, row_key, meta FROM accord.row_meta
                 WHERE NOT alive AND (table_name, row_key) > ($1, $2)
                 ORDER BY table_name, row_key LIMIT $3",
                &[&after.0, &after.1, &COLLECT_CHUNK],
            )
            .await?;
        let Some(last) = rows.last() else { break };
        after = (last.try_get(0)?, last.try_get(1)?);
        let (mut tables, mut keys, mut metas) = (Vec::new(), Vec::new(), Vec::new());
        for row in &rows {
            let bytes: &[u8] = row.try_get(2)?;
            let meta: RowMeta = decode("row metadata", bytes)?;
            if cut.covers(&meta) {
                tables.push(row.try_get::<_, String>(0)?);
                keys.push(row.try_get::<_, String>(1)?);
                metas.push(bytes.to_vec());
            }
        }
        if !tables.is_empty() {
            deleted += db
                .execute(
                    // Locked in (table, key) order, as the capture and the appliers lock.
                    "WITH doomed AS (
                         SELECT m.table_name, m.row_key
                         FROM accord.row_meta AS m
                         JOIN unnest($1::text[], $2::text[], $3::bytea[]) AS u(table_name, row_key, meta)
                           ON m.table_name = u.table_name AND m.row_key = u.row_key AND m.meta = u.meta
                         WHERE NOT m.alive
                         ORDER BY m.table_name, m.row_key
                         FOR UPDATE OF m)
                     DELETE FROM accord.row_meta AS m USING doomed AS d
                     WHERE m.table_name = d.table_name AND m.row_key = d.row_key",
                    &[&tables, &keys, &metas],
                )
                .await?;
        }
        if (rows.len() as i64) < COLLECT_CHUNK {
            break;
        }
    }
    Ok(deleted)
}

#[cfg(test)]
mod tests {
    use accord_engine::{ColumnType, RowKey, Value};

    use super::key_text;

    fn numeric(text: &str) -> Value {
        let ty = ColumnType::Numeric {
            precision: None,
            scale: None,
        };
        Value::parse(&ty, text).unwrap()
    }

    #[test]
    fn a_key_text_is_the_json_array_of_its_parts() {
        let keys = [
            vec![Value::Int(42)],
            vec![Value::Int(i64::MIN), Value::Int(-7)],
            vec![
                Value::Text("quo\"te \\ new\nline \t \u{7} ünï ✓ /".into()),
                Value::Int(1),
            ],
            vec![numeric("1.500")],
            vec![numeric("100"), Value::Null],
            vec![Value::Text(String::new())],
        ];
        for parts in keys {
            let json: Vec<serde_json::Value> = parts
                .iter()
                .map(|v| match v {
                    Value::Null => serde_json::Value::Null,
                    Value::Int(i) => serde_json::Value::from(*i),
                    Value::Numeric(d) => serde_json::Value::from(d.normalized().to_plain_string()),
                    Value::Text(s) => serde_json::Value::from(s.as_str()),
                })
                .collect();
            assert_eq!(key_text(&RowKey(parts)), serde_json::Value::Array(json).to_string());
        }
        assert_eq!(key_text(&RowKey(vec![numeric("100.00")])), r#"["100"]"#);
    }
}
