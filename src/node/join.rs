//! `accord join`: a new node's database filled from a donor node of the running cluster, rows and
//! accord's metadata, with the positions from which the new node then streams every node's
//! changes.
//!
//! What makes it safe is a rule about positions, not one snapshot: the new node may start with
//! *more* of a row than its positions claim (every change is a state-based merge, so receiving
//! an already-absorbed change again changes nothing), never with less. So the positions `P` are
//! read once, at the join's start, from the donor's `accord.applied` and capture checkpoint in one
//! snapshot; every chunk after that is copied in its own, later snapshot, which holds everything
//! `P` claims and maybe more. A join killed at any point resumes from its last chunk with the same
//! `P`, and no transaction on the donor stays open for the length of the copy.
//!
//! A donor row is copied only as its metadata describes it (`accord_engine::judge_copy`). A row
//! and metadata that disagree are either a local write the donor's capture has not accounted for
//! yet (an update, an insert, a delete) or a row written in a subtransaction (whose xid decoding
//! never reports) that was captured long ago. The join cannot tell them apart from the snapshot,
//! so it waits until the donor's capture has read past a mark written after the snapshot and
//! reads the row again (`accord_engine::settle`): every write before the mark is then accounted
//! for. A row written again meanwhile is read again after another mark, under `FOR SHARE` locks
//! after a few tries.
//!
//! Before it reads any position, the join registers the new node in the donor's membership
//! (`accord.members`, state `joining`) and waits until every live node has said it holds that
//! entry: from then on every node keeps its outbound log for the new node and no tombstone
//! collection round can complete without it (ARCHITECTURE.md, "Membership"). When the copy is done
//! the new node takes the donor's membership, and its own entry becomes `active`.
//!
//! A new database without any of the replicated tables gets their definitions from the donor
//! first (`schema_copy`).
//!
//! Speed: a chunk is one query on the donor (metadata joined to rows by key) and two COPYs into
//! the new node (rows as text, metadata as binary); the next chunk is read while the last ones
//! are written, by two writers whose transactions commit in the chunks' order.

use std::collections::BTreeMap;
use std::time::Duration;

use accord_engine::{
    judge_copy, settle, settle_try, CopyVerdict, Hlc, JoinPositions, Member, MemberState, NodeId, RowMeta, SettleTry,
    Settled, StableCut, TableDef, MAX_SETTLES,
};
use anyhow::{bail, Context, Result};
use futures_util::SinkExt;
use tokio_postgres::binary_copy::BinaryCopyInWriter;
use tokio_postgres::types::{PgLsn, Type};
use tokio_postgres::{Client, Row};

use super::capture::{hlc_message, wait_until_captured};
use super::init::{self, load_policy};
use super::key_locks;
use super::members;
use super::pipeline::{self, Params};
use super::rows::{cast, copy_rows_sql, push_copy_line, quote_ident, quote_table, read_expr_in, read_rows_sql};
use super::runtime::wall_micros;
use super::schema_copy;
use super::shapes;
use super::store::{self, decode, encode, origin_name};
use crate::pg_connection::{connect, redact};

/// The replication origins of the join's own transactions on the new node, one per writer (a
/// session binds an origin no other session holds): its capture skips them (they are the donor's
/// rows, not the new node's writes), as it skips a peer's applies.
pub const JOIN_ORIGINS: [&str; JOIN_WRITERS] = ["accord_join", "accord_join_2"];

/// Chunks written into the new node at once, each in its own transaction on its own connection;
/// they commit in order. (With one, the new node's writes were the copy's bottleneck: the
/// donor's read of a chunk took about half of its write in `cargo bench --bench join_copy`; two
/// made the join 1.2 times faster there, three no faster than two on two cores.)
const JOIN_WRITERS: usize = 2;

/// How long the join waits for the donor's capture to read past a marker.
const CAPTURE_WAIT: Duration = Duration::from_secs(120);

/// Rows per chunk (each chunk is one read on the donor and one transaction on the new node).
/// Larger chunks cost less per row (a chunk of 20,000 copied twice as fast as one of 5,000 in
/// `cargo bench --bench join_copy`) and hold more in memory.
pub const DEFAULT_CHUNK_ROWS: usize = 20_000;

/// The join's progress on the new node, committed with every chunk.
pub const JOIN_STATE_DDL: &str = "
CREATE SCHEMA IF NOT EXISTS accord;
CREATE TABLE IF NOT EXISTS accord.join_state (
    singleton   boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    donor       integer NOT NULL,
    positions   bytea   NOT NULL,
    claims      bytea   NOT NULL,
    table_name  text,
    after_key   text    NOT NULL DEFAULT '',
    rows_copied bigint  NOT NULL DEFAULT 0,
    done        boolean NOT NULL DEFAULT false,
    started_at  timestamptz NOT NULL DEFAULT now(),
    finished_at timestamptz
);
COMMENT ON TABLE accord.join_state IS 'accord: how far accord join copied this node from its donor';
";

/// What to join, and from where.
#[derive(Debug, Clone)]
pub struct JoinRequest {
    /// The new node's id (its certificate's).
    pub node: NodeId,
    /// The new node's database.
    pub dsn: String,
    /// A database of a running node, read with a snapshot per chunk.
    pub donor_dsn: String,
    pub chunk_rows: usize,
    /// Where the other nodes reach the new node (`host:port`, its configuration's `address`).
    pub address: String,
    /// How long to wait for every node to learn of the new node before giving up.
    pub members_wait: Duration,
}

/// `JoinRequest::members_wait`'s default.
pub const DEFAULT_MEMBERS_WAIT: Duration = Duration::from_secs(120);

/// How far a join has got, for a progress bar or a log line.
#[derive(Debug, Clone, Default)]
pub struct JoinProgress {
    pub table: String,
    /// Rows (live and deleted) copied of all tables so far.
    pub rows: u64,
    /// The donor's rows (live and deleted) of all tables, counted at the start.
    pub total_rows: u64,
    /// Bytes of row values copied.
    pub bytes: u64,
}

/// What a finished join did.
#[derive(Debug, Clone)]
pub struct Joined {
    pub donor: NodeId,
    /// It went on from an earlier, interrupted run.
    pub resumed: bool,
    /// Live rows copied (by this run).
    pub rows: u64,
    /// Deleted rows' metadata copied (by this run).
    pub tombstones: u64,
    /// Rows copied only once the donor's capture had accounted for them (written there just
    /// before a chunk read them, or in a subtransaction).
    pub settled: u64,
    /// Per node, the last change the new node takes as applied.
    pub positions: Vec<(NodeId, u64)>,
}

/// Where a join stands on the new node.
struct JoinState {
    donor: NodeId,
    positions: JoinPositions,
    table: Option<String>,
    after: String,
    rows_copied: u64,
    done: bool,
}

/// The donor's database: `db` reads, `marks` writes the marks a read waits on meanwhile.
struct Donor {
    db: Client,
    marks: Client,
    /// Per table, the shape of metadata the donor stored before metadata named its shape.
    unnamed: BTreeMap<String, i64>,
}

impl Donor {
    /// The shape metadata of `table` was stored under on the donor (`stored`: as its row says).
    fn shape(&self, table: &TableDef, stored: Option<i64>) -> i64 {
        stored
            .or_else(|| self.unnamed.get(&table.name).copied())
            .unwrap_or_else(|| store::shape_param(table.shape_id()))
    }
}

/// The donor's row as one snapshot saw it: its values as text and its xmin.
struct DonorRow {
    xmin: String,
    values: Vec<Option<String>>,
}

/// A row's metadata as the donor stores it, decoded, and the transaction it accounts for.
struct StoredMeta {
    meta: RowMeta,
    stored: Vec<u8>,
    known_xmin: Option<String>,
    /// The shape it was stored under (`store::shape_param`).
    shape: i64,
}

/// What a chunk copies of one key: the metadata decoded (for its stamp) and as stored.
enum Copy {
    Live {
        key: String,
        meta: RowMeta,
        stored: Vec<u8>,
        /// The shape it was stored under (`store::shape_param`).
        shape: i64,
        /// The row's texts, key columns first, as `rows::copy_rows_sql` takes them.
        row: Vec<Option<String>>,
    },
    Tombstone {
        key: String,
        meta: RowMeta,
        stored: Vec<u8>,
        shape: i64,
    },
}

impl Copy {
    fn key(&self) -> &str {
        match self {
            Copy::Live { key, .. } | Copy::Tombstone { key, .. } => key,
        }
    }
}

/// A chunk as read from the donor, on its way to the new node.
struct ReadChunk<'t> {
    table: &'t TableDef,
    /// The positions every read of the chunk saw (`JoinPositions::saw`).
    seen: Vec<Vec<(NodeId, u64)>>,
    copies: Vec<Copy>,
    facts: RangeFacts,
    /// The cursor after this chunk: the next table (`None`: done) and the last key copied.
    next: (Option<String>, String),
    /// Metadata rows the chunk covered (rows and tombstones, copied now or by their changes).
    covered: u64,
    settled: u64,
}

/// Joins the database at `request.dsn` to the cluster of the donor's node. `progress` is called
/// after every chunk.
pub async fn join(request: &JoinRequest, progress: &mut dyn FnMut(&JoinProgress)) -> Result<Joined> {
    let mut donor = connect(&request.donor_dsn)
        .await
        .with_context(|| format!("cannot reach the donor ({})", redact(&request.donor_dsn)))?;
    let mut target = connect(&request.dsn).await?;
    let (donor_id, donor_fingerprint) = donor_identity(&donor).await?;
    if donor_id == request.node {
        bail!("the donor is node {donor_id} itself: a node joins from another node's database");
    }
    let mut policy = load_policy(&mut target).await?;
    if policy.is_empty() {
        let tables: Vec<String> = load_policy(&mut donor)
            .await?
            .tables()
            .iter()
            .map(|t| t.name.clone())
            .collect();
        if !any_exists(&target, &tables).await? {
            let statements = schema_copy::copy_schema(&request.donor_dsn, &mut target, &tables).await?;
            tracing::info!(
                tables = tables.len(),
                statements,
                "copied the replicated tables' schema from the donor"
            );
            policy = load_policy(&mut target).await?;
        }
    }
    if policy.is_empty() {
        bail!(
            "no table of the new node's database is marked for replication: create the cluster's annotated schema \
             there first (the same tables and @accord comments as the donor's)"
        );
    }
    let fingerprint = policy.fingerprint().to_string();
    if fingerprint != donor_fingerprint {
        bail!(
            "the new node's replicated tables differ from the donor's (policy fingerprint {fingerprint} here, \
             {donor_fingerprint} on node {donor_id}): create the same tables with the same @accord comments; \
             `accord check --dsn` on both shows what each has"
        );
    }

    let (mut state, resumed) = match load_state(&target).await? {
        Some(state) if state.done => bail!(
            "this database already joined the cluster from node {}: start it with `accord run`",
            state.donor
        ),
        Some(state) if state.donor != donor_id => bail!(
            "this database's join from node {} is unfinished: resume it with that node as the donor (the positions \
             it streams from are node {}'s)",
            state.donor,
            state.donor
        ),
        Some(state) => (state, true),
        None => {
            register(&donor, request, donor_id).await?;
            (
                begin(&donor, &mut target, request.node, &policy, donor_id).await?,
                false,
            )
        }
    };
    if !node_initialised(&target).await? {
        init::init(&mut target, request.node).await?;
    }
    // A join resumed on a database an earlier version initialised: the chunks record stamps.
    target
        .batch_execute(store::APPLIED_MERGED_DDL)
        .await
        .context("cannot add accord.applied's merged stamp")?;

    let mut writers = Vec::with_capacity(JOIN_WRITERS);
    for origin in JOIN_ORIGINS {
        writers.push(writer_session(&request.dsn, origin).await?);
    }

    let mut tables: Vec<&TableDef> = policy.tables().iter().collect();
    tables.sort_by(|a, b| a.name.cmp(&b.name));
    let mut report = JoinProgress {
        total_rows: count_rows(&donor, &tables).await?,
        rows: state.rows_copied,
        ..JoinProgress::default()
    };
    let mut joined = Joined {
        donor: donor_id,
        resumed,
        rows: 0,
        tombstones: 0,
        settled: 0,
        positions: state.positions.streams_from.clone(),
    };
    // A chunk reads each metadata row's table row by its key, in key order: a nested loop over
    // the key's index. A planner that has statistics prefers to hash the whole table for every
    // chunk and sort the result (three times slower on 20,000 of 200,000 rows, and worse the
    // larger the table).
    donor
        .batch_execute("SET enable_hashjoin = off; SET enable_mergejoin = off; SET enable_sort = off")
        .await?;
    let unnamed = copy_shapes(&donor, &target).await?;
    let source = Donor {
        marks: connect(&request.donor_dsn).await?,
        db: donor,
        unnamed,
    };
    // The donor's reads and the new node's writes overlap: one chunk is read while the last is
    // written (they are two servers' work; in turn, each waited for the other).
    let (chunks, arriving) = tokio::sync::mpsc::channel(1);
    let cursor = (state.table.clone(), state.after.clone());
    let reading = read_chunks(&source, &tables, request, state.donor, cursor, chunks);
    let writing = write_chunks(arriving, writers, &mut state, &mut joined, &mut report, progress);
    let (read, written) = tokio::join!(reading, writing);
    let mut writers = written?;
    read?;
    let first = writers
        .first_mut()
        .context("the join has a writer per origin, and at least one origin")?;
    finish(&source.db, first, request.node, &mut state).await?;
    for writer in &writers {
        writer
            .batch_execute("SELECT pg_replication_origin_session_reset()")
            .await?;
    }
    for origin in JOIN_ORIGINS {
        target
            .execute(
                "SELECT pg_replication_origin_drop(roname) FROM pg_replication_origin WHERE roname = $1",
                &[&origin],
            )
            .await
            .context("cannot drop the join's replication origins")?;
    }
    Ok(joined)
}

/// Copies the shapes the donor knows into the new node (its copied metadata names them), and
/// returns, per table, the shape of the donor's metadata stored before metadata named it.
async fn copy_shapes(donor: &Client, target: &Client) -> Result<BTreeMap<String, i64>> {
    let recorded: bool = donor
        .query_one("SELECT to_regclass('accord.shapes') IS NOT NULL", &[])
        .await?
        .get(0);
    if !recorded {
        // An older donor: all its metadata was stored under its tables' shapes, the new node's.
        return Ok(BTreeMap::new());
    }
    let known = shapes::load(donor)
        .await
        .context("cannot read the donor's accord.shapes")?;
    let mut unnamed = BTreeMap::new();
    for (def, own) in &known {
        shapes::record(target, def, false).await?;
        if *own {
            unnamed
                .entry(def.name.clone())
                .or_insert_with(|| store::shape_param(def.shape_id()));
        }
    }
    Ok(unnamed)
}

/// A connection to the new node for a writer: its transactions carry `origin`, which the capture
/// skips, and the key-lock triggers leave them alone (no merge can wait for them: the node is not
/// running).
async fn writer_session(dsn: &str, origin: &str) -> Result<Client> {
    let db = connect(dsn).await?;
    if db
        .query_opt("SELECT 1 FROM pg_replication_origin WHERE roname = $1", &[&origin])
        .await?
        .is_none()
    {
        db.execute("SELECT pg_replication_origin_create($1)", &[&origin])
            .await
            .context("cannot create the join's replication origin (needs superuser)")?;
    }
    db.execute("SELECT pg_replication_origin_session_setup($1)", &[&origin])
        .await
        .context("cannot bind the join's replication origin: is another `accord join` running on this database?")?;
    db.batch_execute(&format!(
        // money columns take the plain numbers `rows::read_expr` reads on the donor. A commit
        // need not wait for its flush: a chunk lost in a crash is lost with the cursor past it,
        // and copied again.
        "SET {} = on; SET lc_monetary = 'C'; SET synchronous_commit = off",
        key_locks::APPLYING_SETTING
    ))
    .await?;
    Ok(db)
}

/// Whether any of `tables` (`schema.table`) exists in `db`.
async fn any_exists(db: &Client, tables: &[String]) -> Result<bool> {
    for table in tables {
        let found: bool = db
            .query_one("SELECT to_regclass($1) IS NOT NULL", &[&quote_table(table)])
            .await?
            .get(0);
        if found {
            return Ok(true);
        }
    }
    Ok(false)
}

/// Puts the new node into the donor's membership as `joining`, and waits until every live node
/// holds that entry (the donor's running node works it out from its peers' gossip).
async fn register(donor: &Client, request: &JoinRequest, donor_id: NodeId) -> Result<()> {
    let node = request.node;
    let has_members: bool = donor
        .query_one("SELECT to_regclass('accord.members') IS NOT NULL", &[])
        .await?
        .get(0);
    if !has_members {
        bail!("the donor's accord keeps no membership yet: run this version's `accord run` there first");
    }
    if let Some((MemberState::Left, _)) = members::entry_known(donor, node).await? {
        bail!("node {node} has left the cluster, and a node id is never used twice: give the new node another node_id");
    }
    let entry = Member {
        node,
        state: MemberState::Joining,
        address: request.address.clone(),
        stamp: Hlc::new(wall_micros(), 0, node),
    };
    members::write(donor, &entry)
        .await
        .context("cannot register the new node with the donor")?;
    tracing::info!(%node, donor = %donor_id, address = request.address, "registered with the donor; waiting for every node to learn of it");
    let deadline = tokio::time::Instant::now() + request.members_wait;
    let mut last_said = tokio::time::Instant::now();
    loop {
        let known = members::entry_known(donor, node).await?;
        let waiting = match known {
            Some((MemberState::Left, _)) => bail!("node {node} was removed from the cluster while it joined"),
            Some((_, Some(not_known))) if not_known.is_empty() => return Ok(()),
            Some((_, Some(not_known))) => {
                let nodes: Vec<String> = not_known.iter().map(|n| n.to_string()).collect();
                format!(
                    "node(s) {} have not learned of it yet: they must be running and reachable",
                    nodes.join(", ")
                )
            }
            _ => {
                if !store::capture_running(donor).await? && donor_is_alone(donor, donor_id, node).await? {
                    // Nobody to tell, and the donor's node reads its membership when it starts,
                    // before it prunes anything.
                    return Ok(());
                }
                format!("the donor's node {donor_id} has not taken it in yet: is its `accord run` running?")
            }
        };
        if tokio::time::Instant::now() >= deadline {
            bail!(
                "node {node} is registered, but {waiting}; run the same `accord join` again once they are (nothing \
                 was copied yet)"
            );
        }
        if last_said.elapsed() >= Duration::from_secs(10) {
            tracing::info!(%node, "waiting: {waiting}");
            last_said = tokio::time::Instant::now();
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Whether the donor's membership names no live node but the donor and the new one.
async fn donor_is_alone(donor: &Client, donor_id: NodeId, node: NodeId) -> Result<bool> {
    Ok(members::load(donor)
        .await?
        .iter()
        .all(|m| m.state == MemberState::Left || m.node == donor_id || m.node == node))
}

/// The donor's node id and policy fingerprint; refuses a database that is not a node, or whose
/// accord is older than joins need.
async fn donor_identity(donor: &Client) -> Result<(NodeId, String)> {
    let row = donor
        .query_opt(
            "SELECT node_id, fingerprint, to_regclass('accord.applied') IS NOT NULL FROM accord.node",
            &[],
        )
        .await
        .context("the donor's database is not an accord node (no accord.node)")?
        .context("the donor's database is not an accord node (accord.node is empty)")?;
    let (id, fingerprint, recorded): (i32, String, bool) = (row.get(0), row.get(1), row.get(2));
    if !recorded {
        bail!(
            "the donor's accord does not record its applied positions yet: run this version's `accord run` there first"
        );
    }
    Ok((NodeId(u32::try_from(id).context("a negative node id")?), fingerprint))
}

async fn node_initialised(target: &Client) -> Result<bool> {
    Ok(target
        .query_one("SELECT to_regclass('accord.node') IS NOT NULL", &[])
        .await?
        .get::<_, bool>(0)
        && target.query_opt("SELECT 1 FROM accord.node", &[]).await?.is_some())
}

async fn load_state(target: &Client) -> Result<Option<JoinState>> {
    let exists: bool = target
        .query_one("SELECT to_regclass('accord.join_state') IS NOT NULL", &[])
        .await?
        .get(0);
    if !exists {
        return Ok(None);
    }
    let Some(row) = target
        .query_opt(
            "SELECT donor, positions, claims, table_name, after_key, rows_copied, done FROM accord.join_state",
            &[],
        )
        .await?
    else {
        return Ok(None);
    };
    Ok(Some(JoinState {
        donor: NodeId(u32::try_from(row.get::<_, i32>(0)).context("a negative donor id")?),
        positions: JoinPositions {
            streams_from: decode("join positions", row.get(1))?,
            claims: decode("join claims", row.get(2))?,
        },
        table: row.get(3),
        after: row.get(4),
        rows_copied: u64::try_from(row.get::<_, i64>(5)).unwrap_or(0),
        done: row.get(6),
    }))
}

/// Starts a join: checks the new node's database is new, and records the positions it will
/// stream from, read from the donor in one snapshot.
async fn begin(
    donor: &Client,
    target: &mut Client,
    node: NodeId,
    policy: &accord_schema_annotations::SchemaPolicy,
    donor_id: NodeId,
) -> Result<JoinState> {
    if node_initialised(target).await? {
        bail!(
            "this database is already an accord node: a node joins from a new database (with the annotated tables, \
             empty)"
        );
    }
    for table in policy.tables() {
        let any: bool = target
            .query_one(
                &format!("SELECT EXISTS (SELECT 1 FROM {})", quote_table(&table.name)),
                &[],
            )
            .await?
            .get(0);
        if any {
            bail!(
                "{} already has rows on the new node: a node joins with empty tables, which the join fills from \
                 the donor",
                table.name
            );
        }
    }
    let positions = JoinPositions::first(store::snapshot_positions(donor, donor_id).await?);
    let first = policy.tables().iter().map(|t| t.name.clone()).min();
    target.batch_execute(JOIN_STATE_DDL).await?;
    target
        .execute(
            "INSERT INTO accord.join_state (donor, positions, claims, table_name) VALUES ($1, $2, $2, $3)",
            &[
                &i32::try_from(donor_id.0).context("node ids must fit in a 32-bit signed integer")?,
                &encode("join positions", &positions.streams_from)?,
                &first,
            ],
        )
        .await?;
    tracing::info!(%node, donor = %donor_id, positions = ?positions.streams_from, "join started");
    Ok(JoinState {
        donor: donor_id,
        positions,
        table: first,
        after: String::new(),
        rows_copied: 0,
        done: false,
    })
}

async fn count_rows(donor: &Client, tables: &[&TableDef]) -> Result<u64> {
    let names: Vec<String> = tables.iter().map(|t| t.name.clone()).collect();
    let n: i64 = donor
        .query_one(
            "SELECT count(*) FROM accord.row_meta WHERE table_name = ANY($1)",
            &[&names],
        )
        .await?
        .get(0);
    Ok(u64::try_from(n).unwrap_or(0))
}

/// What one chunk did.
#[derive(Default)]
struct Chunk {
    live: u64,
    tombstones: u64,
    bytes: u64,
    /// Metadata rows copied of all tables once it was in.
    rows_copied: u64,
}

/// Reads the chunks from the cursor on, table after table, and hands them on in order. Stops
/// quietly when the writer has stopped (its error is the one to report).
async fn read_chunks<'t>(
    source: &Donor,
    tables: &[&'t TableDef],
    request: &JoinRequest,
    donor_id: NodeId,
    (mut table_name, mut after): (Option<String>, String),
    chunks: tokio::sync::mpsc::Sender<ReadChunk<'t>>,
) -> Result<()> {
    while let Some(name) = table_name {
        let table = *tables
            .iter()
            .find(|t| t.name == name)
            .with_context(|| format!("the join's cursor names {name}, which is not replicated any more"))?;
        let next_table = tables.iter().map(|t| t.name.as_str()).find(|t| *t > name.as_str());
        let chunk = read_chunk(source, table, next_table, request, donor_id, &after).await?;
        (table_name, after) = chunk.next.clone();
        if chunks.send(chunk).await.is_err() {
            break;
        }
    }
    Ok(())
}

/// Where a chunk's transaction leaves the join, committed with it.
struct ChunkCommit {
    /// The chunk's place in the copy: chunks commit in this order.
    order: u64,
    /// `JoinPositions::claims` once the chunk is in.
    claims: Vec<(NodeId, u64)>,
    rows_copied: u64,
    /// Whose copy it is: the greatest stamp copied is recorded as merged from it.
    donor: NodeId,
}

/// Writes the chunks as they arrive, several at once (one per writer), each in one transaction
/// with the cursor after it; the transactions commit in the chunks' order, so the cursor never
/// passes a chunk that is not in. Returns the writers.
async fn write_chunks(
    mut arriving: tokio::sync::mpsc::Receiver<ReadChunk<'_>>,
    mut idle: Vec<Client>,
    state: &mut JoinState,
    joined: &mut Joined,
    report: &mut JoinProgress,
    progress: &mut dyn FnMut(&JoinProgress),
) -> Result<Vec<Client>> {
    use futures_util::stream::{FuturesUnordered, StreamExt};
    let turn = tokio::sync::watch::Sender::new(0u64);
    let mut writing = FuturesUnordered::new();
    let mut order = 0;
    let mut read_all = false;
    loop {
        tokio::select! {
            read = arriving.recv(), if !read_all && !idle.is_empty() => {
                let Some(read) = read else {
                    read_all = true;
                    continue;
                };
                for seen in &read.seen {
                    state.positions.saw(seen);
                }
                state.rows_copied += read.covered;
                let commit = ChunkCommit {
                    order,
                    claims: state.positions.claims.clone(),
                    rows_copied: state.rows_copied,
                    donor: state.donor,
                };
                order += 1;
                let mut writer = idle.pop().context("a chunk is taken only by an idle writer")?;
                let turn = &turn;
                writing.push(async move {
                    let written = write_chunk(&mut writer, &read, &commit, turn).await;
                    (writer, read, written)
                });
            }
            Some((writer, read, written)) = writing.next(), if !writing.is_empty() => {
                let chunk = written?;
                idle.push(writer);
                joined.rows += chunk.live;
                joined.tombstones += chunk.tombstones;
                joined.settled += read.settled;
                report.table = read.table.name.clone();
                report.rows = report.rows.max(chunk.rows_copied);
                report.bytes += chunk.bytes;
                progress(report);
            }
            else => break,
        }
    }
    Ok(idle)
}

/// One read of the donor's metadata and rows of a key range (in the order of `accord.row_meta`'s
/// keys), each row joined to its metadata by key.
fn chunk_sql(table: &TableDef) -> String {
    let mut select = vec![
        "m.row_key".to_owned(),
        "m.meta".to_owned(),
        "m.known_xmin".to_owned(),
        "t.xmin::text".to_owned(),
        "m.shape".to_owned(),
    ];
    select.extend(table.key.iter().map(|k| read_expr_in("t", &k.name, &k.ty)));
    select.extend(table.columns.iter().map(|c| read_expr_in("t", &c.name, &c.ty)));
    // A row key is a JSON array of the key columns' values (`store::key_text`).
    let on: Vec<String> = table
        .key
        .iter()
        .enumerate()
        .map(|(i, k)| {
            format!(
                "t.{} = {}",
                quote_ident(&k.name),
                cast(&format!("m.row_key::json->>{i}"), &k.ty)
            )
        })
        .collect();
    format!(
        "SELECT {} FROM (SELECT row_key, meta, known_xmin, shape FROM accord.row_meta
                         WHERE table_name = $1 AND row_key > $2 ORDER BY row_key LIMIT $3) AS m
         LEFT JOIN {} AS t ON {} ORDER BY m.row_key",
        select.join(", "),
        quote_table(&table.name),
        on.join(" AND ")
    )
}

/// Reads the next chunk of `table` after `after` in one snapshot, judges its rows, and settles
/// those that disagree with their metadata.
async fn read_chunk<'t>(
    source: &Donor,
    table: &'t TableDef,
    next_table: Option<&str>,
    request: &JoinRequest,
    donor_id: NodeId,
    after: &str,
) -> Result<ReadChunk<'t>> {
    let limit = i64::try_from(request.chunk_rows.max(1)).unwrap_or(i64::MAX);
    let donor = &source.db;
    donor
        .batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
        .await?;
    let read = async {
        let seen = store::snapshot_positions(donor, donor_id).await?;
        let found = donor
            .query(&chunk_sql(table), &[&table.name, &after, &limit])
            .await
            .with_context(|| format!("cannot read {} on the donor", table.name))?;
        // The chunk's key range: to its last key, or to the end when it is the table's last.
        let upper: Option<String> = found
            .last()
            .filter(|_| found.len() as i64 >= limit)
            .map(|row| row.get(0));
        let facts = RangeFacts::read(donor, table, after, upper.as_deref()).await?;
        anyhow::Ok((seen, found, facts))
    }
    .await;
    let end = donor.batch_execute("COMMIT").await;
    let (seen, found, mut facts) = read?;
    end?;

    let width = table.key.len() + table.columns.len();
    let mut copies = Vec::with_capacity(found.len());
    let mut suspects = Vec::new();
    for row in &found {
        let key: String = row.try_get(0)?;
        let stored: Vec<u8> = row.try_get(1)?;
        let known: Option<String> = row.try_get(2)?;
        let xmin: Option<String> = row.try_get(3)?;
        let shape = source.shape(table, row.try_get(4)?);
        let meta: RowMeta = decode("row metadata", &stored)?;
        match judge_copy(meta.is_alive(), known.as_ref(), xmin.as_ref()) {
            CopyVerdict::Copy => {
                let row = (0..width)
                    .map(|i| row.try_get::<_, Option<String>>(5 + i))
                    .collect::<Result<_, _>>()?;
                copies.push(Copy::Live {
                    key,
                    meta,
                    stored,
                    shape,
                    row,
                });
            }
            CopyVerdict::CopyTombstone => copies.push(Copy::Tombstone {
                key,
                meta,
                stored,
                shape,
            }),
            CopyVerdict::Settle => suspects.push((key, xmin)),
        }
    }
    // Open items of concurrent values only of the rows copied from this read: such an item is
    // open by its row's state (a settled row's come with it).
    let copied: std::collections::BTreeSet<&str> = copies.iter().map(Copy::key).collect();
    facts
        .items
        .retain(|item| !is_open_concurrent(item) || copied.contains(item.get::<_, &str>(2)));
    let mut seen = vec![seen];
    let settled = suspects.len() as u64;
    if !suspects.is_empty() {
        let (positions, described, settled_open) =
            settle_suspects(source, table, donor_id, request.node, &suspects).await?;
        seen.push(positions);
        copies.extend(described);
        facts.items.extend(settled_open);
    }
    let last_key: Option<String> = found.last().map(|row| row.get(0));
    let next = match last_key {
        Some(key) if found.len() as i64 >= limit => (Some(table.name.clone()), key),
        _ => (next_table.map(str::to_owned), String::new()),
    };
    Ok(ReadChunk {
        table,
        seen,
        copies,
        facts,
        next,
        covered: found.len() as u64,
        settled,
    })
}

/// Rows that disagree with their metadata (`CopyVerdict::Settle`): waits until the donor's
/// capture has read past a mark written now (on `marks`, a second connection), then reads them
/// again and settles each (`accord_engine::settle`). A row in a newer version is tried again;
/// after a few tries its rows are read under `FOR SHARE` locks held across the mark, so that a
/// row written without pause still settles. Returns the positions the reads saw, the rows to
/// copy and the open review items of those rows.
async fn settle_suspects(
    source: &Donor,
    table: &TableDef,
    donor_id: NodeId,
    node: NodeId,
    suspects: &[(String, Option<String>)],
) -> Result<(Vec<(NodeId, u64)>, Vec<Copy>, Vec<Row>)> {
    let (donor, marks) = (&source.db, &source.marks);
    let mut open = Vec::new();
    let mut pending = suspects.to_vec();
    let mut positions = Vec::new();
    let mut copies = Vec::new();
    let mut attempt = 0;
    while !pending.is_empty() {
        let locked = match settle_try(attempt) {
            SettleTry::Unlocked => false,
            SettleTry::Locked => true,
            SettleTry::GiveUp => bail!(
                "{} rows on the donor changed {MAX_SETTLES} times while the join waited for its capture to account \
                 for them; run the same `accord join` again (it resumes at this chunk)",
                table.name
            ),
        };
        attempt += 1;
        let keys: Vec<&str> = pending.iter().map(|(k, _)| k.as_str()).collect();
        let read = async {
            if locked {
                // Read committed: each statement below sees what committed before it, and the
                // locks keep the rows as they are from the first on.
                donor.batch_execute("BEGIN").await?;
                lock_rows(donor, table, &keys).await?;
                wait_for_donor_capture(marks, node).await?;
            } else {
                wait_for_donor_capture(marks, node).await?;
                donor
                    .batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
                    .await?;
            }
            let metas = donor
                .query(
                    "SELECT u.n, m.meta, m.known_xmin, m.shape FROM unnest($2::text[]) WITH ORDINALITY AS u(row_key, n)
                     JOIN accord.row_meta AS m ON m.table_name = $1 AND m.row_key = u.row_key",
                    &[&table.name, &keys],
                )
                .await?;
            let mut by_key: Vec<Option<StoredMeta>> = keys.iter().map(|_| None).collect();
            for row in &metas {
                let n = usize::try_from(row.get::<_, i64>(0) - 1).context("an ordinal below 1")?;
                if let Some(slot) = by_key.get_mut(n) {
                    let stored: Vec<u8> = row.get(1);
                    *slot = Some(StoredMeta {
                        meta: decode("row metadata", &stored)?,
                        stored,
                        known_xmin: row.get(2),
                        shape: source.shape(table, row.get(3)),
                    });
                }
            }
            let rows = read_rows(donor, table, &keys).await?;
            let items = open_items(donor, table, &keys).await?;
            // After the rows: what they hold is at most what these positions say.
            let seen = store::snapshot_positions(donor, donor_id).await?;
            anyhow::Ok((seen, by_key, rows, items))
        }
        .await;
        let end = donor
            .batch_execute(if read.is_ok() { "COMMIT" } else { "ROLLBACK" })
            .await;
        let (seen, metas, rows, mut items) = read?;
        end?;
        positions.extend(seen);
        let mut again = Vec::new();
        for (((key, seen), meta), row) in pending.iter().zip(metas).zip(rows) {
            let verdict = settle(
                seen.as_ref(),
                meta.as_ref().map(|m| m.meta.is_alive()),
                meta.as_ref().and_then(|m| m.known_xmin.as_ref()),
                row.as_ref().map(|r| &r.xmin),
            );
            match (verdict, meta, row) {
                (
                    Settled::Copy,
                    Some(StoredMeta {
                        meta, stored, shape, ..
                    }),
                    Some(row),
                ) => copies.push(Copy::Live {
                    key: key.clone(),
                    meta,
                    stored,
                    shape,
                    row: key_parts(table, key)?.into_iter().chain(row.values).collect(),
                }),
                (
                    Settled::CopyTombstone,
                    Some(StoredMeta {
                        meta, stored, shape, ..
                    }),
                    None,
                ) => copies.push(Copy::Tombstone {
                    key: key.clone(),
                    meta,
                    stored,
                    shape,
                }),
                (_, _, row) => again.push((key.clone(), row.map(|r| r.xmin))),
            }
        }
        items.retain(|item| copies.iter().any(|c| c.key() == item.get::<_, &str>(2)));
        open.extend(items);
        pending = again;
    }
    Ok((positions, copies, open))
}

/// The columns of `accord.review_items` a join copies, in the order `write_items` writes them.
const ITEM_COLUMNS: &str = "id, table_name, row_key, column_name, kind, status, candidates::text, error, closed_by, \
     closed_value, closed_stamp, item, change, opened_at, closed_at";

/// Whether a review item (a row of [`ITEM_COLUMNS`]) is open and of concurrent values.
fn is_open_concurrent(item: &Row) -> bool {
    item.get::<_, &str>(5) == "open" && item.get::<_, &str>(4) == "concurrent"
}

/// The open items of concurrent values of `keys`' rows.
async fn open_items(donor: &Client, table: &TableDef, keys: &[&str]) -> Result<Vec<Row>> {
    donor
        .query(
            &format!(
                "SELECT {ITEM_COLUMNS} FROM accord.review_items
                 WHERE table_name = $1 AND row_key = ANY($2) AND status = 'open' AND kind = 'concurrent'"
            ),
            &[&table.name, &keys],
        )
        .await
        .context("cannot read the donor's review items")
}

/// What a chunk copies of its key range whatever becomes of its rows: closed items and parked
/// changes, and kept changes (`read` gives every item of the range: open items of concurrent
/// values go only with their rows). They are facts the rows' later states do not carry (a closure
/// travels only in the change that made it), and some belong to rows whose tombstones are
/// collected. (The simulator found both: an item closed on the donor stayed unknown to the new
/// node.)
struct RangeFacts {
    items: Vec<Row>,
    deferred: Vec<Row>,
}

impl RangeFacts {
    /// Of the keys after `after`, up to `upper` (no bound: to the end of the table).
    async fn read(donor: &Client, table: &TableDef, after: &str, upper: Option<&str>) -> Result<RangeFacts> {
        let items = donor
            .query(
                &format!(
                    "SELECT {ITEM_COLUMNS} FROM accord.review_items
                     WHERE table_name = $1 AND row_key > $2 AND ($3::text IS NULL OR row_key <= $3)"
                ),
                &[&table.name, &after, &upper],
            )
            .await
            .context("cannot read the donor's review items")?;
        let deferred = donor
            .query(
                "SELECT table_name, row_key, origin, seq, change, kept_at FROM accord.deferred
                 WHERE table_name = $1 AND row_key > $2 AND ($3::text IS NULL OR row_key <= $3)",
                &[&table.name, &after, &upper],
            )
            .await
            .context("cannot read the donor's kept changes")?;
        Ok(RangeFacts { items, deferred })
    }

    async fn write(&self, tx: &tokio_postgres::Transaction<'_>) -> Result<()> {
        for item in &self.items {
            let candidates: String = item.get(6);
            tx.execute(
                "INSERT INTO accord.review_items (id, table_name, row_key, column_name, kind, status, candidates, \
                 error, closed_by, closed_value, closed_stamp, item, change, opened_at, closed_at) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7::text::jsonb, $8, $9, $10, $11, $12, $13, $14, $15) \
                 ON CONFLICT (id) DO NOTHING",
                &[
                    &item.get::<_, String>(0),
                    &item.get::<_, String>(1),
                    &item.get::<_, String>(2),
                    &item.get::<_, Option<String>>(3),
                    &item.get::<_, String>(4),
                    &item.get::<_, String>(5),
                    &candidates,
                    &item.get::<_, Option<String>>(7),
                    &item.get::<_, Option<String>>(8),
                    &item.get::<_, Option<String>>(9),
                    &item.get::<_, Option<String>>(10),
                    &item.get::<_, Vec<u8>>(11),
                    &item.get::<_, Option<Vec<u8>>>(12),
                    &item.get::<_, std::time::SystemTime>(13),
                    &item.get::<_, Option<std::time::SystemTime>>(14),
                ],
            )
            .await
            .context("cannot copy the review queue")?;
        }
        for row in &self.deferred {
            tx.execute(
                "INSERT INTO accord.deferred (table_name, row_key, origin, seq, change, kept_at) \
                 VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT DO NOTHING",
                &[
                    &row.get::<_, String>(0),
                    &row.get::<_, String>(1),
                    &row.get::<_, i32>(2),
                    &row.get::<_, i64>(3),
                    &row.get::<_, Vec<u8>>(4),
                    &row.get::<_, std::time::SystemTime>(5),
                ],
            )
            .await
            .context("cannot copy the kept changes")?;
        }
        Ok(())
    }
}

/// Takes `FOR SHARE` locks on the donor's rows of `keys` (in key order, as the appliers lock).
async fn lock_rows(donor: &Client, table: &TableDef, keys: &[&str]) -> Result<()> {
    let params = key_params(table, keys)?;
    let refs = pipeline::param_refs(&params);
    donor
        .query(&format!("{} FOR SHARE OF t", read_rows_sql(table)), &refs)
        .await
        .with_context(|| format!("cannot lock rows of {} on the donor", table.name))?;
    Ok(())
}

/// Writes a mark into the donor's WAL (`capture::MARK_MESSAGE_PREFIX`, which its capture records
/// with a checkpoint) and waits until the capture's checkpoint covers it: every transaction
/// committed before it has then been captured.
async fn wait_for_donor_capture(donor: &Client, node: NodeId) -> Result<()> {
    let marker = format!("accord join of node {node}");
    if let Some(lsn) = wait_until_captured(donor, &marker, CAPTURE_WAIT).await? {
        bail!(
            "the donor's capture has not read past {} in {} s: is `accord run` running on the donor? A row \
             written there since its capture's last checkpoint can only be copied once it has",
            PgLsn::from(lsn),
            CAPTURE_WAIT.as_secs()
        );
    }
    Ok(())
}

/// The donor's rows of `keys` (row keys as `store::key_text` writes them), in the order given.
async fn read_rows(donor: &Client, table: &TableDef, keys: &[&str]) -> Result<Vec<Option<DonorRow>>> {
    let params = key_params(table, keys)?;
    let refs = pipeline::param_refs(&params);
    let found = donor
        .query(&read_rows_sql(table), &refs)
        .await
        .with_context(|| format!("cannot read {} on the donor", table.name))?;
    let mut out: Vec<Option<DonorRow>> = keys.iter().map(|_| None).collect();
    for row in found {
        let ord = usize::try_from(row.get::<_, i32>(0)).context("a negative ord")?;
        let values = (0..table.columns.len())
            .map(|i| row.try_get::<_, Option<String>>(i + 2))
            .collect::<Result<_, _>>()?;
        if let Some(slot) = out.get_mut(ord) {
            *slot = Some(DonorRow {
                xmin: row.get(1),
                values,
            });
        }
    }
    Ok(out)
}

/// The parameters of `read_rows_sql` for `keys`: ords, then one text array per key column.
fn key_params(table: &TableDef, keys: &[&str]) -> Result<Params> {
    let mut params: Params = Vec::with_capacity(1 + table.key.len());
    let ords: Vec<i32> = (0..keys.len())
        .map(|i| i32::try_from(i).context("a chunk larger than i32"))
        .collect::<Result<_>>()?;
    params.push(Box::new(ords));
    let mut columns: Vec<Vec<Option<String>>> = vec![Vec::with_capacity(keys.len()); table.key.len()];
    for key in keys {
        for (column, part) in columns.iter_mut().zip(key_parts(table, key)?) {
            column.push(part);
        }
    }
    for column in columns {
        params.push(Box::new(column));
    }
    Ok(params)
}

/// A row key's text (`store::key_text`: a JSON array) as one text per key column.
fn key_parts(table: &TableDef, key: &str) -> Result<Vec<Option<String>>> {
    let parts: Vec<serde_json::Value> =
        serde_json::from_str(key).with_context(|| format!("{}: a malformed row key {key:?}", table.name))?;
    if parts.len() != table.key.len() {
        bail!(
            "{}: the row key {key:?} has {} parts, the table's key {}",
            table.name,
            parts.len(),
            table.key.len()
        );
    }
    Ok(parts
        .into_iter()
        .map(|part| match part {
            serde_json::Value::Null => None,
            serde_json::Value::String(s) => Some(s),
            other => Some(other.to_string()),
        })
        .collect())
}

/// One chunk into the new node: rows, their metadata (accounting for the rows' new xmins), a
/// clock message that makes the new node's later writes stamp above what was copied, and the
/// cursor, in one transaction, which commits at the chunk's `turn`. Rows and metadata go in by
/// COPY (no conflict is possible: the chunk's keys are new to the node, and a chunk commits whole
/// with the cursor past it).
async fn write_chunk(
    target: &mut Client,
    read: &ReadChunk<'_>,
    commit: &ChunkCommit,
    turn: &tokio::sync::watch::Sender<u64>,
) -> Result<Chunk> {
    let table = read.table;
    let mut chunk = Chunk {
        rows_copied: commit.rows_copied,
        ..Chunk::default()
    };
    let tx = target.transaction().await?;
    // Every row this transaction inserts has its xid as xmin (no subtransaction here), which
    // is what their metadata accounts for.
    let xid: String = tx
        .query_one("SELECT pg_current_xact_id()::xid::text", &[])
        .await?
        .get(0);
    let mut lines = Vec::new();
    for copy in &read.copies {
        if let Copy::Live { row, .. } = copy {
            push_copy_line(&mut lines, row.iter().map(Option::as_deref));
            chunk.bytes += row.iter().flatten().map(|v| v.len() as u64).sum::<u64>();
            chunk.live += 1;
        }
    }
    if chunk.live > 0 {
        let sink = tx.copy_in(&copy_rows_sql(table)).await?;
        futures_util::pin_mut!(sink);
        let copied = async {
            sink.send(bytes::Bytes::from(lines)).await?;
            sink.as_mut().finish().await
        }
        .await
        .with_context(|| {
            format!(
                "cannot insert {} rows of {} copied from the donor (was the new node written to during the join?)",
                chunk.live, table.name
            )
        })?;
        if copied != chunk.live {
            bail!("{}: {copied} of {} copied rows were inserted", table.name, chunk.live);
        }
    }
    let sink = tx
        .copy_in("COPY accord.row_meta (table_name, row_key, meta, alive, known_xmin, shape) FROM STDIN BINARY")
        .await?;
    let metas = BinaryCopyInWriter::new(
        sink,
        &[Type::TEXT, Type::TEXT, Type::BYTEA, Type::BOOL, Type::TEXT, Type::INT8],
    );
    futures_util::pin_mut!(metas);
    let mut greatest: Option<Hlc> = None;
    for copy in &read.copies {
        let (key, meta, stored, shape, known) = match copy {
            Copy::Live {
                key,
                meta,
                stored,
                shape,
                ..
            } => (key, meta, stored, shape, Some(xid.as_str())),
            Copy::Tombstone {
                key,
                meta,
                stored,
                shape,
            } => {
                chunk.tombstones += 1;
                (key, meta, stored, shape, None)
            }
        };
        greatest = greatest.max(meta.stamp);
        metas
            .as_mut()
            .write(&[&table.name, key, stored, &meta.is_alive(), &known, shape])
            .await
            .context("cannot copy the rows' metadata")?;
    }
    metas.finish().await.context("cannot copy the rows' metadata")?;
    read.facts.write(&tx).await?;
    if let Some(stamp) = greatest {
        // Read by the new node's capture as a merge's: its clock passes every copied stamp, and
        // what it writes later builds on what the copy holds.
        tx.execute(
            "SELECT pg_logical_emit_message(true, $1, $2)",
            &[&store::HLC_MESSAGE_PREFIX, &hlc_message(stamp, &commit.claims)],
        )
        .await?;
    }
    // The chunks before this one first (the cursor passes only what is in).
    turn.subscribe()
        .wait_for(|next| *next == commit.order)
        .await
        .context("the join's writers stopped")?;
    if let Some(stamp) = greatest {
        // After the turn: the chunks' writers take this row one after the other, in order.
        let params = store::merged_params(commit.donor, stamp)?;
        tx.execute(store::RECORD_MERGED_SQL, &pipeline::param_refs(&params))
            .await
            .context("cannot record the copy's greatest stamp")?;
    }
    tx.execute(
        "UPDATE accord.join_state SET table_name = $1, after_key = $2, claims = $3, rows_copied = $4",
        &[
            &read.next.0,
            &read.next.1,
            &encode("join claims", &commit.claims)?,
            &i64::try_from(commit.rows_copied).unwrap_or(i64::MAX),
        ],
    )
    .await?;
    tx.commit().await?;
    turn.send_replace(commit.order + 1);
    Ok(chunk)
}

/// The end of a copy: the reviewers' resolutions and the collection's cut as the donor has them
/// now, the positions the node streams from, and the join marked done.
async fn finish(donor: &Client, target: &mut Client, node: NodeId, state: &mut JoinState) -> Result<()> {
    donor
        .batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
        .await?;
    let read = async {
        let seen = store::snapshot_positions(donor, state.donor).await?;
        let resolutions = donor
            .query("SELECT item_id, resolved_at FROM accord.review_resolutions", &[])
            .await?;
        let collection = store::load_collection(donor).await?;
        let membership = members::load(donor).await?;
        anyhow::Ok((seen, resolutions, collection, membership))
    }
    .await;
    let end = donor.batch_execute("COMMIT").await;
    let (seen, resolutions, collection, membership) = read?;
    end?;
    state.positions.saw(&seen);

    let tx = target.transaction().await?;
    for row in &resolutions {
        tx.execute(
            "INSERT INTO accord.review_resolutions (item_id, resolved_at) VALUES ($1, $2) ON CONFLICT DO NOTHING",
            &[&row.get::<_, String>(0), &row.get::<_, std::time::SystemTime>(1)],
        )
        .await?;
    }
    // Only the cut: the round in progress is the others' to tell this node when it connects.
    let cut: Option<StableCut> = collection.cut;
    store::save_collection(
        &tx,
        &accord_engine::CollectionState {
            cut,
            ..Default::default()
        },
    )
    .await?;
    for &(peer, seq) in state.positions.streams_from.iter().filter(|(n, _)| *n != node) {
        let origin = origin_name(peer);
        tx.execute(
            "SELECT pg_replication_origin_create($1) WHERE NOT EXISTS \
             (SELECT 1 FROM pg_replication_origin WHERE roname = $1)",
            &[&origin],
        )
        .await?;
        // Not transactional: a join that fails after this does it again with the same position.
        tx.execute(
            "SELECT pg_replication_origin_advance($1, $2)",
            &[&origin, &PgLsn::from(seq)],
        )
        .await?;
        let params = store::applied_params(peer, seq, None)?;
        tx.execute(store::RECORD_APPLIED_SQL, &pipeline::param_refs(&params))
            .await?;
    }
    tx.execute(
        "SELECT pg_logical_emit_message(true, $1, $2)",
        &[
            &store::HLC_MESSAGE_PREFIX,
            &hlc_message(Hlc::new(0, 0, state.donor), &state.positions.claims),
        ],
    )
    .await?;
    // The cluster as the donor knows it, and this node in it.
    for member in &membership {
        members::write(&tx, member).await?;
    }
    // `active` supersedes the `joining` entry whatever the stamps (the state orders first).
    let joined = Member {
        node,
        state: MemberState::Active,
        address: membership
            .iter()
            .find(|m| m.node == node)
            .map(|m| m.address.clone())
            .unwrap_or_default(),
        stamp: Hlc::new(wall_micros(), 0, node),
    };
    members::write(&tx, &joined).await?;
    tx.execute(
        "UPDATE accord.join_state SET done = true, finished_at = now(), claims = $1",
        &[&encode("join claims", &state.positions.claims)?],
    )
    .await?;
    tx.commit().await?;
    state.done = true;
    tracing::info!(%node, donor = %state.donor, positions = ?state.positions.streams_from, "join finished");
    Ok(())
}

/// What a joined node's copied rows may hold (`JoinPositions::claims`); nothing for a node that
/// did not join. The capture takes it as applied at every start: the origins' positions the
/// node streams from are lower, and its writes must build on all its rows hold.
pub async fn copied_claims(db: &Client) -> Result<Vec<(NodeId, u64)>> {
    Ok(load_state(db)
        .await?
        .map(|state| state.positions.claims)
        .unwrap_or_default())
}

/// Refuses to run a node whose join has not finished (its tables hold part of the donor's).
pub async fn ensure_joined(db: &Client) -> Result<()> {
    if let Some(state) = load_state(db).await? {
        if !state.done {
            bail!(
                "this database's `accord join` from node {} has not finished: run the same `accord join` again to \
                 resume it",
                state.donor
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::node::rows::tests::table;

    #[test]
    fn row_keys_read_back_as_one_text_per_key_column() {
        let t = table();
        assert_eq!(
            key_parts(&t, r#"["eu",42]"#).unwrap(),
            vec![Some("eu".to_owned()), Some("42".to_owned())]
        );
        assert!(key_parts(&t, r#"["eu"]"#).is_err());
        assert!(key_parts(&t, "not json").is_err());
    }
}
