//! Apply: merges batches of one peer's changes into the database, one transaction per batch.
//!
//! Each apply connection is bound to the peer's replication origin, so that
//! - the batch's last sequence number is committed as the origin's position in the same
//!   transaction as the data: a crash cannot separate them (exactly once);
//! - the capture sees the Origin marker on these transactions and does not capture them again.
//!
//! A local write that committed but has not been captured yet must not be overwritten unseen
//! (PRODUCT.md invariant 8). Every row is locked and its `xmin` compared with the `known_xmin` the
//! capture or a merge recorded; when they differ, the batch writes a probe into the WAL and waits,
//! holding the rows' locks but not their metadata's (the capture may need to write it), until the
//! capture has read past the probe. Then every version it saw is accounted for.
//!
//! A batch is written many rows at a time: all its rows are locked (in key order) and their
//! metadata read in one round trip, the changes merged in memory in order (several changes of
//! one row against the state the earlier ones left), and each row written once, with multi-row
//! statements. A part of a batch whose writes the database refuses is rolled back to a savepoint
//! and applied in halves, down to single changes in savepoints, so that exactly the refused
//! change is parked.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use accord_engine::{
    merge, Cell, Conflict, ConflictKind, Hlc, MergeOutcome, NodeId, ReviewAction, ReviewItem, RowAction, RowChange,
    RowMeta, RowState, StableCut, TableDef, Value,
};
use accord_schema_annotations::SchemaPolicy;
use anyhow::{bail, Context, Result};
use tokio::sync::watch;
use tokio_postgres::types::PgLsn;
use tokio_postgres::{Client, GenericClient, Row, Transaction};

use super::capture::{hlc_message, CaptureProgress, PROBE_MESSAGE_PREFIX};
use super::pipeline::{self, Params, Statements};
use super::rows::{
    delete_row, delete_rows_sql, insert_row, insert_rows_sql, key_texts, lock_row, lock_rows_sql, locked_row,
    update_row, update_rows_sql,
};
use super::store::{self, key_text, origin_name, ConflictRows, MetaRows, HLC_MESSAGE_PREFIX};

/// How long a batch waits for the capture to account for local writes before giving up.
const CAPTURE_WAIT_LIMIT: Duration = Duration::from_secs(120);

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ApplySummary {
    pub applied: u64,
    pub parked: u64,
    pub conflicts: ConflictCounts,
    /// Times the batch waited for the capture (a local write raced the merge).
    pub waits: u64,
}

/// Automatic resolutions by kind, as the conflict log records them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ConflictCounts {
    pub concurrent_update: u64,
    pub delete_won: u64,
    pub insert_insert: u64,
}

impl ConflictCounts {
    pub fn count(&mut self, conflicts: &[Conflict]) {
        for conflict in conflicts {
            match conflict.kind {
                ConflictKind::ConcurrentUpdate => self.concurrent_update += 1,
                ConflictKind::DeleteWon => self.delete_won += 1,
                ConflictKind::InsertInsert => self.insert_insert += 1,
            }
        }
    }

    pub fn add(&mut self, other: &ConflictCounts) {
        self.concurrent_update += other.concurrent_update;
        self.delete_won += other.delete_won;
        self.insert_insert += other.insert_insert;
    }

    pub fn total(&self) -> u64 {
        self.concurrent_update + self.delete_won + self.insert_insert
    }
}

pub struct Applier {
    db: Client,
    /// A second session, without the origin, that flushes the WAL after a probe while `db` holds
    /// its batch's row locks.
    flusher: Client,
    capture: watch::Receiver<CaptureProgress>,
    peer: NodeId,
    policy: Arc<SchemaPolicy>,
    synchronous_commit: bool,
    applied: u64,
    /// Prepared statements of this connection.
    statements: Statements,
    /// The latest completed tombstone-collection round: tombstones it covers read as absent.
    cut: watch::Receiver<Option<StableCut>>,
}

/// Why a batch must wait and start over.
enum Retry {
    /// A row's metadata says it is alive but the row is gone: a local delete not captured yet.
    CaptureBehind,
    /// Wait until the capture read past the probe written at this WAL position. Either a row is
    /// missing here (a local insert and delete of its key may both still be on their way through
    /// the capture, and the row cannot be locked to tell), or rows' xmins differ from what accord
    /// knows (`suspects`).
    Probe { lsn: u64, suspects: Vec<Suspect> },
}

/// A row whose xmin differed from the one accord knew, as seen before a probe was written.
///
/// Usually a local write the capture has not reached yet. But a row written inside a
/// subtransaction (a SAVEPOINT, a PL/pgSQL EXCEPTION block) carries the subtransaction's xid,
/// which the capture never sees (pgoutput names only the top-level transaction), so its xmin
/// never matches. Either way, once the capture has read past a probe written after the row
/// version was seen committed, that version is accounted for: if the row still has that xmin,
/// the metadata describes it.
type Suspect = ((String, String), String);

/// Rows whose current xmin the capture is known to have read past: (table, key) → xmin.
type Settled = BTreeMap<(String, String), String>;

impl Applier {
    pub async fn connect(
        db: Client,
        flusher: Client,
        capture: watch::Receiver<CaptureProgress>,
        peer: NodeId,
        policy: Arc<SchemaPolicy>,
        synchronous_commit: bool,
    ) -> Result<Applier> {
        let origin = origin_name(peer);
        let exists = db
            .query_opt("SELECT 1 FROM pg_replication_origin WHERE roname = $1", &[&origin])
            .await?
            .is_some();
        if !exists {
            db.execute("SELECT pg_replication_origin_create($1)", &[&origin])
                .await
                .with_context(|| format!("cannot create replication origin {origin} (needs superuser)"))?;
        }
        // After a crash the old session may hold the origin until its backend has exited.
        let mut attempts = 0;
        loop {
            match db
                .execute("SELECT pg_replication_origin_session_setup($1)", &[&origin])
                .await
            {
                Ok(_) => break,
                Err(error) if attempts < 100 && error.to_string().contains("is already active") => {
                    attempts += 1;
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(error) => {
                    return Err(error).with_context(|| {
                        format!(
                            "cannot bind to replication origin {origin}: is another accord running on this database?"
                        )
                    })
                }
            }
        }
        let position: Option<PgLsn> = db
            .query_one("SELECT pg_replication_origin_session_progress(true)", &[])
            .await?
            .get(0);
        Ok(Applier {
            db,
            flusher,
            capture,
            peer,
            policy,
            synchronous_commit,
            applied: position.map(u64::from).unwrap_or(0),
            statements: Statements::default(),
            cut: watch::channel(None).1,
        })
    }

    pub fn peer(&self) -> NodeId {
        self.peer
    }

    pub fn policy(&self) -> Arc<SchemaPolicy> {
        Arc::clone(&self.policy)
    }

    pub fn synchronous_commit(&self) -> bool {
        self.synchronous_commit
    }

    pub fn capture(&self) -> watch::Receiver<CaptureProgress> {
        self.capture.clone()
    }

    /// The last of the peer's changes whose apply is on disk. With `synchronous_commit` off a
    /// committed batch may still be lost in a crash of the server (its origin position with it),
    /// so peers must only be told, and prune their logs by, what this returns: it flushes the WAL
    /// up to this origin's last commit first.
    /// Follows the node's tombstone collection: tombstones the latest cut covers read as absent.
    pub fn follow_collection(&mut self, cut: watch::Receiver<Option<StableCut>>) {
        self.cut = cut;
    }

    /// The collection this applier follows, for a replacement applier.
    pub fn collection(&self) -> watch::Receiver<Option<StableCut>> {
        self.cut.clone()
    }

    pub async fn durable(&mut self) -> Result<u64> {
        if self.synchronous_commit {
            return Ok(self.applied);
        }
        let position: Option<PgLsn> = self
            .db
            .query_one("SELECT pg_replication_origin_session_progress(true)", &[])
            .await
            .context("cannot read the durable applied position")?
            .get(0);
        Ok(position.map(u64::from).unwrap_or(0).min(self.applied))
    }

    /// The last of the peer's changes applied here (committed; see `durable`).
    pub fn applied(&self) -> u64 {
        self.applied
    }

    /// Applies what of `changes` was not applied yet. Returns the new applied position.
    pub async fn apply(&mut self, changes: &[RowChange]) -> Result<(u64, ApplySummary)> {
        let fresh: Vec<&RowChange> = changes.iter().filter(|c| c.seq > self.applied).collect();
        let Some(last) = fresh.last().map(|c| c.seq) else {
            return Ok((self.applied, ApplySummary::default()));
        };
        if let Some(first) = fresh.first() {
            if first.seq != self.applied + 1 {
                bail!(
                    "changes from node {} skip from {} to {}: refusing to apply out of order",
                    self.peer,
                    self.applied,
                    first.seq
                );
            }
        }
        let mut waits = 0;
        let mut pause = Duration::from_millis(1);
        let started = tokio::time::Instant::now();
        // Whether the capture has read past a probe written by the previous attempt: then a
        // missing row is missing indeed.
        let mut probed = false;
        let mut settled = Settled::new();
        loop {
            if started.elapsed() > CAPTURE_WAIT_LIMIT {
                bail!(
                    "a batch from node {} waited {:?} for the capture to account for local writes; \
                     is the capture running?",
                    self.peer,
                    CAPTURE_WAIT_LIMIT
                );
            }
            match self.try_apply(&fresh, last, probed, &settled).await? {
                Ok(mut summary) => {
                    summary.waits += waits;
                    tracing::debug!(
                        changes = fresh.len(),
                        waits = summary.waits,
                        millis = started.elapsed().as_millis() as u64,
                        "batch applied"
                    );
                    self.applied = last;
                    return Ok((last, summary));
                }
                Err(Retry::CaptureBehind) => {
                    waits += 1;
                    probed = false;
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_millis(50));
                }
                Err(Retry::Probe { lsn, suspects }) => {
                    waits += 1;
                    // The rolled-back batch set this session's origin position, and a ROLLBACK
                    // keeps it: committed by a later transaction of this session, it would record
                    // the batch as applied with none of it written (the reliability tests lost
                    // rows that way). Reset it first.
                    self.db
                        .batch_execute("SELECT pg_replication_origin_xact_reset()")
                        .await
                        .context("cannot reset the origin position of a rolled-back batch")?;
                    wait_for_capture(&self.flusher, &mut self.capture, lsn).await?;
                    probed = true;
                    settled.extend(suspects);
                }
            }
        }
    }

    async fn try_apply(
        &mut self,
        changes: &[&RowChange],
        last: u64,
        probed: bool,
        settled: &Settled,
    ) -> Result<std::result::Result<ApplySummary, Retry>> {
        let policy = Arc::clone(&self.policy);
        // Read once per attempt: a cut that arrives meanwhile applies from the next batch.
        let cut = self.cut.borrow().clone();
        let cut = cut.as_ref();
        let synchronous_commit = self.synchronous_commit;
        let statements = &mut self.statements;
        let mut guard = Guard {
            flusher: &self.flusher,
            capture: &mut self.capture,
            probed,
            settled: settled.clone(),
            waits: 0,
        };
        let mut tx = self.db.transaction().await?;
        let setup = Setup {
            synchronous_commit,
            last,
        };
        let mut summary = ApplySummary::default();
        // Ranges of the batch still to apply, the next one last. A range that cannot be written
        // as a whole is split in halves, down to single changes, which go through the
        // change-by-change path: a change that a constraint refuses is parked alone, the rest
        // is still written many rows at a time.
        //
        // The first part is the whole batch, and its guard checks every row of it. Later parts
        // need no probe for a missing row: a row that was missing then passed the guard only
        // after a probe, and a row that was there stays locked by this transaction unless one
        // of its own earlier parts deleted it.
        let mut ranges = vec![(0, changes.len())];
        let mut first = true;
        while let Some((start, end)) = ranges.pop() {
            let part = changes.get(start..end).unwrap_or_default();
            if part.is_empty() {
                continue;
            }
            if part.len() == 1 && !first {
                match one_by_one(&mut tx, &policy, part, true, settled, cut).await? {
                    Ok((done, greatest)) => {
                        summary.add(done);
                        if let Some(stamp) = greatest {
                            tx.execute(EMIT_HLC_SQL, &[&HLC_MESSAGE_PREFIX, &hlc_message(stamp)])
                                .await?;
                        }
                    }
                    Err(retry) => return Ok(Err(retry)),
                }
                continue;
            }
            let setup = first.then_some(setup);
            // Later parts need no guard (above).
            let guard = first.then_some(&mut guard);
            first = false;
            match batched(&tx, statements, &policy, part, setup, guard, cut).await? {
                Batched::Done(done) => summary.add(done),
                Batched::Retry(retry) => return Ok(Err(retry)),
                Batched::Split => {
                    let middle = start + (end - start).div_ceil(2);
                    ranges.push((middle, end));
                    ranges.push((start, middle));
                }
            }
        }
        tx.commit().await?;
        summary.waits += guard.waits;
        Ok(Ok(summary))
    }
}

/// How many times one batch transaction probes while holding its row locks before it gives up,
/// rolls back and starts over. Each further round is caused by a row that appeared (a local
/// insert) after the previous probe.
const GUARD_ROUNDS: u64 = 4;

/// The xmin guard of a batch's first part: what it needs to wait for the capture inside the
/// batch's transaction.
struct Guard<'a> {
    flusher: &'a Client,
    capture: &'a mut watch::Receiver<CaptureProgress>,
    /// Whether the capture has read past a probe written after the rows were first read.
    probed: bool,
    settled: Settled,
    waits: u64,
}

/// Waits until the capture has read past the probe at `lsn`. The probe is a non-transactional
/// message: in WAL, but not flushed, and the walsender sends only flushed WAL, so on a quiet
/// database it could wait for seconds until something else flushes. A transaction committed
/// synchronously on another session flushes everything before its commit record, but only if it
/// wrote WAL itself: PostgreSQL commits a transaction that merely took an xid asynchronously, and
/// the probe then waited for the WAL writer's next round (up to `wal_writer_delay`, 200 ms). So it
/// writes a transactional message, which the capture ignores.
async fn wait_for_capture(flusher: &Client, capture: &mut watch::Receiver<CaptureProgress>, lsn: u64) -> Result<()> {
    let flush = async {
        flusher
            .batch_execute(
                "BEGIN; SET LOCAL synchronous_commit = on; \
                 SELECT pg_logical_emit_message(true, 'accord.flush', ''); COMMIT",
            )
            .await
            .context("cannot flush the WAL after a probe")?;
        tracing::trace!(lsn, "flushed after a probe");
        Ok::<(), anyhow::Error>(())
    };
    let reached = async {
        match tokio::time::timeout(CAPTURE_WAIT_LIMIT, capture.wait_for(|p| p.processed_lsn >= lsn)).await {
            Ok(Ok(_)) => Ok(()),
            _ => Err(anyhow::anyhow!(
                "the capture did not read past WAL position {lsn} within {CAPTURE_WAIT_LIMIT:?} (is it running?)"
            )),
        }
    };
    tokio::try_join!(flush, reached)?;
    Ok(())
}

/// Tells the capture what a merge transaction merged (the greatest stamp), so that local writes
/// committed after it get greater stamps.
const EMIT_HLC_SQL: &str = "SELECT pg_logical_emit_message(true, $1, $2)";

/// What the first statements of a batch's transaction set up.
#[derive(Clone, Copy)]
struct Setup {
    synchronous_commit: bool,
    /// The batch's last sequence number: the origin's position once the transaction commits.
    last: u64,
}

/// How a batched attempt went.
enum Batched {
    /// Merged and written.
    Done(ApplySummary),
    /// The batch must roll back, wait and start over.
    Retry(Retry),
    /// Nothing was written: a statement failed (and was rolled back), or a row's merges do not
    /// fold into one write. The part must be applied in smaller parts.
    Split,
}

impl ApplySummary {
    fn add(&mut self, other: ApplySummary) {
        self.applied += other.applied;
        self.parked += other.parked;
        self.conflicts.add(&other.conflicts);
        self.waits += other.waits;
    }
}

/// One distinct row of a batch.
struct Slot<'a> {
    table: &'a TableDef,
    key_text: String,
    key_params: Vec<Option<String>>,
    /// The xmin and values of the row in the user's table, if it is there.
    row: Option<(String, Vec<Cell>)>,
    /// The stored metadata and the xmin it accounts for.
    meta: Option<(RowMeta, Option<String>)>,
    /// The row as the merges so far left it (`None`: accord knows nothing of it).
    state: Option<RowState>,
    /// Whether a merge gave the row new metadata.
    merged: bool,
    /// The one write the batch makes to the user's row.
    write: Write,
    /// The xmin of the row version that write made.
    written: Option<String>,
}

/// The merges of one row within a batch, folded into one statement.
enum Write {
    Keep,
    /// Set these columns to these values (their last values in the batch).
    Update(BTreeMap<usize, Value>),
    Insert(Vec<Value>),
    Delete,
}

impl Write {
    /// Folds the next merge's action in. `false` when the sequence has no single-statement
    /// equivalent (a row deleted and inserted again, or inserted and deleted, in one batch): such
    /// a batch goes change by change, so that every intermediate row version meets the
    /// database's constraints exactly as it would alone.
    fn then(&mut self, action: &RowAction) -> bool {
        let folded = match (std::mem::replace(self, Write::Keep), action) {
            (write, RowAction::Nothing) => write,
            (Write::Keep, RowAction::Update(writes)) => {
                Write::Update(writes.iter().map(|w| (w.column, w.value.clone())).collect())
            }
            (Write::Update(mut columns), RowAction::Update(writes)) => {
                columns.extend(writes.iter().map(|w| (w.column, w.value.clone())));
                Write::Update(columns)
            }
            (Write::Insert(mut values), RowAction::Update(writes)) => {
                for w in writes {
                    match values.get_mut(w.column) {
                        Some(value) => *value = w.value.clone(),
                        None => return false,
                    }
                }
                Write::Insert(values)
            }
            (Write::Keep, RowAction::Insert(values)) => Write::Insert(values.clone()),
            (Write::Keep | Write::Update(_), RowAction::Delete) => Write::Delete,
            _ => return false,
        };
        *self = folded;
        true
    }
}

/// A statement of the batch's writes, and the slots it writes.
struct WriteStatement {
    sql: String,
    params: Params,
    slots: Vec<usize>,
    /// Whether it returns each row's new xmin (an insert or update) or only its ord (a delete).
    returns_xmin: bool,
}

fn ords(slots: &[usize]) -> Vec<i32> {
    // A batch has far fewer rows than i32::MAX.
    slots.iter().map(|&i| i32::try_from(i).unwrap_or(i32::MAX)).collect()
}

/// Key columns of `slots` as parameters: the ords, then one text array per key column.
fn key_arrays(slots: &[Slot<'_>], which: &[usize], width: usize) -> Params {
    let mut params: Params = vec![Box::new(ords(which))];
    for k in 0..width {
        let column: Vec<Option<String>> = which
            .iter()
            .map(|&i| slots[i].key_params.get(k).cloned().flatten())
            .collect();
        params.push(Box::new(column));
    }
    params
}

/// Applies `changes` (a batch or a part of it) with a few multi-row statements: every row locked
/// at once, the merges done in memory in order, each row written once. `Split` when a statement
/// fails (a constraint refused a row: smaller parts find it, and the change-by-change path parks
/// exactly that change) or when a row's merges do not fold into one write. `setup` is given to
/// the transaction's first part, and `guard` too: it checks every row (see [`check_rows`]) and
/// waits for the capture when it must.
async fn batched<'a>(
    tx: &Transaction<'_>,
    statements: &mut Statements,
    policy: &'a SchemaPolicy,
    changes: &[&'a RowChange],
    setup: Option<Setup>,
    guard: Option<&mut Guard<'_>>,
    cut: Option<&StableCut>,
) -> Result<Batched> {
    // The distinct rows, and tables in name order: every applier locks tables in the same order.
    let mut slots: Vec<Slot<'a>> = Vec::new();
    let mut index: HashMap<(&'a str, String), usize> = HashMap::new();
    let mut change_slots: Vec<Option<usize>> = Vec::with_capacity(changes.len());
    let mut tables: BTreeMap<&'a str, (&'a TableDef, Vec<usize>)> = BTreeMap::new();
    for change in changes {
        let Some(table) = policy.table(&change.table) else {
            change_slots.push(None);
            continue;
        };
        let key_text = key_text(&change.key);
        let slot = match index.get(&(table.name.as_str(), key_text.clone())) {
            Some(&slot) => slot,
            None => {
                let slot = slots.len();
                slots.push(Slot {
                    table,
                    key_params: key_texts(table, &change.key)?,
                    key_text: key_text.clone(),
                    row: None,
                    meta: None,
                    state: None,
                    merged: false,
                    write: Write::Keep,
                    written: None,
                });
                index.insert((table.name.as_str(), key_text), slot);
                tables
                    .entry(table.name.as_str())
                    .or_insert((table, Vec::new()))
                    .1
                    .push(slot);
                slot
            }
        };
        change_slots.push(Some(slot));
    }

    // Set up, lock the rows, then their metadata (rows before metadata, like every writer of
    // both), in one round trip.
    let origin = statements
        .get(tx, "SELECT pg_replication_origin_xact_setup($1, now())")
        .await?;
    let origin_params: Params = vec![Box::new(PgLsn::from(setup.map_or(0, |s| s.last)))];
    let mut locks = Vec::with_capacity(tables.len());
    for (table, which) in tables.values() {
        let statement = statements.get(tx, &lock_rows_sql(table)).await?;
        locks.push((statement, key_arrays(&slots, which, table.key.len())));
    }
    let load = statements.get(tx, store::LOAD_METAS_SQL).await?;
    let load_params: Params = vec![
        Box::new(ords(&(0..slots.len()).collect::<Vec<_>>())),
        Box::new(slots.iter().map(|s| s.table.name.clone()).collect::<Vec<_>>()),
        Box::new(slots.iter().map(|s| s.key_text.clone()).collect::<Vec<_>>()),
    ];
    let mut guard = guard;
    let mut rounds = 0;
    loop {
        let mut queries = Vec::new();
        if let (Some(setup), 0) = (setup, rounds) {
            if !setup.synchronous_commit {
                queries.push(pipeline::command(tx, "SET LOCAL synchronous_commit = off"));
            }
            // The batch's position is committed with its changes (exactly once).
            queries.push(pipeline::query(tx, &origin, &origin_params));
        }
        let first_lock = queries.len();
        for (statement, params) in &locks {
            queries.push(pipeline::query(tx, statement, params));
        }
        if guard.is_some() {
            // Rolling back to it releases the metadata locks but keeps the rows': the capture
            // may need to write metadata while this transaction waits for it.
            queries.push(pipeline::command(tx, "SAVEPOINT accord_guard"));
        }
        queries.push(pipeline::query(tx, &load, &load_params));
        let results = pipeline::run_all(queries).await?;
        let locked = results.get(first_lock..first_lock + tables.len()).unwrap_or_default();
        let metas = results.last().map(Vec::as_slice).unwrap_or_default();
        for slot in &mut slots {
            slot.row = None;
            slot.meta = None;
        }
        for (rows, (table, _)) in locked.iter().zip(tables.values()) {
            for row in rows {
                let ord: i32 = row.try_get(0)?;
                let slot = usize::try_from(ord)
                    .ok()
                    .and_then(|i| slots.get_mut(i))
                    .with_context(|| format!("{}: a locked row came back with an unknown ord {ord}", table.name))?;
                slot.row = Some(locked_row(table, row)?);
            }
        }
        for (ord, meta, known) in store::loaded_metas(metas, cut)? {
            let slot = slots
                .get_mut(ord)
                .with_context(|| format!("row metadata came back with an unknown ord {ord}"))?;
            slot.meta = Some((meta, known));
        }

        // The xmin guard (invariant 8), for every row before anything is merged. Later parts of
        // a batch have no guard: their rows were checked, and stay locked, since the first part.
        let (probed, settled) = match &guard {
            Some(guard) => (guard.probed, Some(&guard.settled)),
            None => (true, None),
        };
        let suspects = match check_rows(&mut slots, probed, settled) {
            Ok(()) => break,
            Err(GuardFinding::CaptureBehind) => return Ok(Batched::Retry(Retry::CaptureBehind)),
            Err(GuardFinding::Unaccounted(suspects)) => suspects,
        };
        // The probe is written after every row above was read: whatever version was seen is
        // committed before it.
        let Some(guard) = guard.as_deref_mut().filter(|_| rounds < GUARD_ROUNDS) else {
            let lsn = probe(tx).await?;
            return Ok(Batched::Retry(Retry::Probe { lsn, suspects }));
        };
        // Wait with the rows locked: no local write can change them meanwhile, so once the
        // capture has read past the probe, every row seen is accounted for, and this batch goes
        // on instead of starting over behind the next local write (hot rows starved that way).
        tx.batch_execute("ROLLBACK TO SAVEPOINT accord_guard").await?;
        let lsn = probe(tx).await?;
        let waiting = tokio::time::Instant::now();
        wait_for_capture(guard.flusher, guard.capture, lsn).await?;
        tracing::debug!(
            suspects = suspects.len(),
            round = rounds,
            millis = waiting.elapsed().as_millis() as u64,
            "waited for the capture with the rows locked"
        );
        guard.waits += 1;
        guard.probed = true;
        guard.settled.extend(suspects);
        rounds += 1;
    }

    // Merge in order, each change against the state the earlier ones left.
    let mut summary = ApplySummary::default();
    let mut greatest: Option<Hlc> = None;
    let mut parked: Vec<(ReviewItem, &RowChange)> = Vec::new();
    let mut review: Vec<ReviewAction> = Vec::new();
    let mut conflicts = ConflictRows::default();
    for (change, slot) in changes.iter().zip(&change_slots) {
        let Some(slot) = slot.and_then(|i| slots.get_mut(i)) else {
            parked.push((
                ReviewItem::unapplicable(
                    &change.table,
                    &change.key,
                    None,
                    change.origin,
                    change.stamp,
                    change.seq,
                    format!("table {} is not replicated on this node", change.table),
                ),
                change,
            ));
            summary.parked += 1;
            continue;
        };
        let table = slot.table;
        match merge(table, slot.state.as_ref(), change) {
            Ok(MergeOutcome::Applied(merged)) => {
                if !slot.write.then(&merged.action) {
                    tracing::debug!(
                        table = %table.name,
                        key = slot.key_text,
                        "a row is deleted and inserted within the batch; applying it in parts"
                    );
                    return Ok(Batched::Split);
                }
                for conflict in &merged.conflicts {
                    conflicts.push(&table.name, &slot.key_text, conflict);
                }
                summary.applied += 1;
                summary.conflicts.count(&merged.conflicts);
                greatest = greatest.max(Some(change.stamp));
                review.extend(merged.review);
                slot.state = Some(merged.state);
                slot.merged = true;
            }
            Ok(MergeOutcome::Parked { item, .. }) => {
                parked.push((item, change));
                summary.parked += 1;
            }
            Ok(MergeOutcome::Deferred { missing }) => {
                let error = deferred_error(&missing);
                tracing::warn!(table = %table.name, key = %slot.key_text, origin = %change.origin, seq = change.seq, %error, "change parked for review");
                let item = ReviewItem::unapplicable(
                    &table.name,
                    &change.key,
                    None,
                    change.origin,
                    change.stamp,
                    change.seq,
                    error,
                );
                parked.push((item, change));
                summary.parked += 1;
            }
            Err(error) => {
                let item = ReviewItem::unapplicable(
                    &table.name,
                    &change.key,
                    None,
                    change.origin,
                    change.stamp,
                    change.seq,
                    error.to_string(),
                );
                parked.push((item, change));
                summary.parked += 1;
            }
        }
    }

    // The writes: per table (in the order the batch first wrote it) deletes, updates by the set
    // of columns they write, then inserts.
    let mut order: Vec<&str> = Vec::new();
    for slot in change_slots.iter().flatten().filter_map(|&i| slots.get(i)) {
        if !order.contains(&slot.table.name.as_str()) {
            order.push(&slot.table.name);
        }
    }
    let mut writes: Vec<WriteStatement> = Vec::new();
    for name in order {
        let Some((table, which)) = tables.get(name) else {
            continue;
        };
        let width = table.key.len();
        let deletes: Vec<usize> = which
            .iter()
            .copied()
            .filter(|&i| matches!(slots[i].write, Write::Delete))
            .collect();
        if !deletes.is_empty() {
            writes.push(WriteStatement {
                sql: delete_rows_sql(table),
                params: key_arrays(&slots, &deletes, width),
                slots: deletes,
                returns_xmin: false,
            });
        }
        let mut shapes: BTreeMap<Vec<usize>, Vec<usize>> = BTreeMap::new();
        for &i in which {
            if let Write::Update(columns) = &slots[i].write {
                shapes.entry(columns.keys().copied().collect()).or_default().push(i);
            }
        }
        for (columns, rows) in shapes {
            let mut params = key_arrays(&slots, &rows, width);
            for column in &columns {
                let values: Vec<Option<String>> = rows
                    .iter()
                    .map(|&i| match &slots[i].write {
                        Write::Update(values) => values.get(column).and_then(Value::to_pg_text),
                        _ => None,
                    })
                    .collect();
                params.push(Box::new(values));
            }
            writes.push(WriteStatement {
                sql: update_rows_sql(table, &columns),
                params,
                slots: rows,
                returns_xmin: true,
            });
        }
        let inserts: Vec<usize> = which
            .iter()
            .copied()
            .filter(|&i| matches!(slots[i].write, Write::Insert(_)))
            .collect();
        if !inserts.is_empty() {
            let mut params = key_arrays(&slots, &inserts, width);
            for column in 0..table.columns.len() {
                let values: Vec<Option<String>> = inserts
                    .iter()
                    .map(|&i| match &slots[i].write {
                        Write::Insert(values) => values.get(column).and_then(Value::to_pg_text),
                        _ => None,
                    })
                    .collect();
                params.push(Box::new(values));
            }
            writes.push(WriteStatement {
                sql: insert_rows_sql(table),
                params,
                slots: inserts,
                returns_xmin: true,
            });
        }
    }

    if !writes.is_empty() {
        let mut prepared = Vec::with_capacity(writes.len());
        for write in &writes {
            prepared.push(statements.get(tx, &write.sql).await?);
        }
        // A savepoint, so that a refused write costs only the writes, not the locks.
        let mut queries = vec![pipeline::command(tx, "SAVEPOINT accord_batch")];
        for (write, statement) in writes.iter().zip(&prepared) {
            queries.push(pipeline::query(tx, statement, &write.params));
        }
        let results = pipeline::run_all(queries).await;
        let written = results
            .map_err(anyhow::Error::new)
            .and_then(|results| record_written(&mut slots, &writes, results.get(1..).unwrap_or_default()));
        if let Err(error) = written {
            tracing::debug!(
                error = format!("{error:#}"),
                "a batched write failed; applying it in parts"
            );
            tx.batch_execute("ROLLBACK TO SAVEPOINT accord_batch; RELEASE SAVEPOINT accord_batch")
                .await?;
            return Ok(Batched::Split);
        }
    }

    // The metadata (with the xmin of the row version it accounts for), the conflict log and the
    // review queue.
    let mut metas = MetaRows::default();
    for slot in slots.iter().filter(|s| s.merged) {
        let Some(state) = &slot.state else { continue };
        let known = match &slot.write {
            Write::Update(_) | Write::Insert(_) => slot.written.as_deref(),
            Write::Delete => None,
            // A row this batch did not write keeps the xmin accord knew for it.
            Write::Keep => slot.meta.as_ref().and_then(|(_, known)| known.as_deref()),
        };
        metas.push(&slot.table.name, &slot.key_text, &state.meta, known)?;
    }
    let save = statements.get(tx, store::SAVE_METAS_SQL).await?;
    let log = statements.get(tx, store::LOG_CONFLICTS_SQL).await?;
    let emit = statements.get(tx, EMIT_HLC_SQL).await?;
    let has_metas = !metas.is_empty();
    let save_params = metas.into_params();
    let has_conflicts = !conflicts.is_empty();
    let log_params = conflicts.into_params();
    let emit_params: Option<Params> =
        greatest.map(|stamp| -> Params { vec![Box::new(HLC_MESSAGE_PREFIX), Box::new(hlc_message(stamp))] });
    let mut queries = Vec::new();
    if !writes.is_empty() {
        // The writes stand; the savepoint is not needed any more.
        queries.push(pipeline::command(tx, "RELEASE SAVEPOINT accord_batch"));
    }
    if has_metas {
        queries.push(pipeline::query(tx, &save, &save_params));
    }
    if has_conflicts {
        queries.push(pipeline::query(tx, &log, &log_params));
    }
    if let Some(params) = &emit_params {
        queries.push(pipeline::query(tx, &emit, params));
    }
    pipeline::run_all(queries).await?;
    store::apply_review(tx, &review).await?;
    for (item, change) in parked {
        store::open_item(tx, &item, Some(change)).await?;
    }
    Ok(Batched::Done(summary))
}

/// Checks that every write statement wrote exactly its rows, and records their new xmins.
fn record_written(slots: &mut [Slot<'_>], writes: &[WriteStatement], results: &[Vec<Row>]) -> Result<()> {
    if results.len() != writes.len() {
        bail!("{} write statements gave {} results", writes.len(), results.len());
    }
    for (write, rows) in writes.iter().zip(results) {
        if rows.len() != write.slots.len() {
            bail!(
                "a batched write touched {} rows instead of {}",
                rows.len(),
                write.slots.len()
            );
        }
        let mut seen = BTreeSet::new();
        for row in rows {
            let ord: i32 = row.try_get(0)?;
            let slot = usize::try_from(ord).unwrap_or(usize::MAX);
            if !write.slots.contains(&slot) || !seen.insert(slot) {
                bail!("a batched write touched an unexpected row (ord {ord})");
            }
            if write.returns_xmin {
                let xmin: String = row.try_get(1)?;
                if let Some(s) = slots.get_mut(slot) {
                    s.written = Some(xmin);
                }
            }
        }
    }
    Ok(())
}

fn deferred_error(missing: &[String]) -> String {
    format!(
        "the row is new here but the change lacks the values of {} (unchanged TOAST relayed by another node); kept \
         until the row's origin sends them",
        missing.join(", ")
    )
}

/// Why rows of a batch cannot be merged yet.
enum GuardFinding {
    /// A row's metadata says it is alive but the row is gone, after a probe: a local delete not
    /// captured yet.
    CaptureBehind,
    /// The capture must read past a probe first. Either a row is missing here (a local insert and
    /// delete of its key may both still be on their way through the capture, and the row cannot
    /// be locked to tell), or rows' xmins differ from what accord knows (these suspects).
    Unaccounted(Vec<Suspect>),
}

/// The xmin guard (invariant 8), for every row of a batch before anything is merged: sets each
/// slot's state when the row is accounted for. `probed`: the capture has read past a probe
/// written after the rows were first read; `settled`: xmins seen before that probe.
fn check_rows(slots: &mut [Slot<'_>], probed: bool, settled: Option<&Settled>) -> Result<(), GuardFinding> {
    let mut missing = false;
    let mut suspects = Vec::new();
    for slot in slots {
        let settled_xmin = settled.and_then(|s| s.get(&(slot.table.name.clone(), slot.key_text.clone())));
        slot.state = match (&slot.row, &mut slot.meta) {
            (Some((xmin, values)), Some((meta, known))) if meta.is_alive() && known.as_deref() == Some(xmin) => {
                Some(RowState {
                    meta: meta.clone(),
                    values: values.clone(),
                })
            }
            (Some((xmin, values)), Some((meta, known))) if meta.is_alive() && settled_xmin == Some(xmin) => {
                *known = Some(xmin.clone());
                Some(RowState {
                    meta: meta.clone(),
                    values: values.clone(),
                })
            }
            (None, Some((meta, _))) if !meta.is_alive() && probed => Some(RowState {
                meta: meta.clone(),
                values: Vec::new(),
            }),
            (None, None) if probed => None,
            (None, _) if !probed => {
                missing = true;
                None
            }
            (Some((xmin, _)), meta) => {
                tracing::debug!(
                    table = %slot.table.name,
                    key = slot.key_text,
                    xmin,
                    known = meta.as_ref().and_then(|m| m.1.as_deref()),
                    "a local write is not accounted for yet; waiting for the capture"
                );
                suspects.push(((slot.table.name.clone(), slot.key_text.clone()), xmin.clone()));
                None
            }
            (None, _) => {
                tracing::debug!(table = %slot.table.name, key = slot.key_text, "a local delete is not captured yet; waiting");
                return Err(GuardFinding::CaptureBehind);
            }
        };
    }
    if missing || !suspects.is_empty() {
        return Err(GuardFinding::Unaccounted(suspects));
    }
    Ok(())
}

/// Writes a probe: a non-transactional message whose WAL position the capture reports once it
/// has read past it (and so past every transaction committed before it).
async fn probe(db: &impl GenericClient) -> Result<u64> {
    let lsn: PgLsn = db
        .query_one(
            "SELECT pg_logical_emit_message(false, $1, '')",
            &[&PROBE_MESSAGE_PREFIX],
        )
        .await?
        .try_get(0)?;
    Ok(u64::from(lsn))
}

/// Changes one by one, each in a savepoint: a change that a constraint of this database refuses
/// is parked alone. Returns the summary and the greatest stamp merged.
async fn one_by_one(
    tx: &mut Transaction<'_>,
    policy: &SchemaPolicy,
    changes: &[&RowChange],
    probed: bool,
    settled: &Settled,
    cut: Option<&StableCut>,
) -> Result<std::result::Result<(ApplySummary, Option<Hlc>), Retry>> {
    let mut summary = ApplySummary::default();
    let mut greatest: Option<Hlc> = None;
    for change in changes {
        let Some(table) = policy.table(&change.table) else {
            let item = ReviewItem::unapplicable(
                &change.table,
                &change.key,
                None,
                change.origin,
                change.stamp,
                change.seq,
                format!("table {} is not replicated on this node", change.table),
            );
            store::open_item(&*tx, &item, Some(change)).await?;
            summary.parked += 1;
            continue;
        };
        let key = key_text(&change.key);
        let savepoint = tx.savepoint("accord_change").await?;
        let row = lock_row(&savepoint, table, &change.key).await?;
        let meta = store::load_meta(&savepoint, &table.name, &key, cut).await?;
        let settled_xmin = settled.get(&(table.name.clone(), key.clone()));
        let local = match (row, meta) {
            (Some((xmin, values)), Some((meta, known))) if meta.is_alive() && known.as_deref() == Some(&xmin) => {
                Some(RowState { meta, values })
            }
            (Some((xmin, values)), Some((meta, _))) if meta.is_alive() && settled_xmin == Some(&xmin) => {
                // Accounted for (see `Suspect`); the metadata saved below records this xmin.
                store::save_meta(&savepoint, &table.name, &key, &meta, Some(&xmin)).await?;
                Some(RowState { meta, values })
            }
            (None, Some((meta, _))) if !meta.is_alive() && probed => Some(RowState {
                meta,
                values: Vec::new(),
            }),
            (None, None) if probed => None,
            (None, None) | (None, Some(_)) if !probed => {
                // A row cannot be locked before it exists: ask the capture to read past now.
                let lsn = probe(&savepoint).await?;
                return Ok(Err(Retry::Probe {
                    lsn,
                    suspects: Vec::new(),
                }));
            }
            (Some((xmin, _)), _) => {
                tracing::debug!(table = %table.name, key, xmin, "a local write is not accounted for yet; waiting");
                let lsn = probe(&savepoint).await?;
                return Ok(Err(Retry::Probe {
                    lsn,
                    suspects: vec![((table.name.clone(), key), xmin)],
                }));
            }
            (None, _) => {
                tracing::debug!(table = %table.name, key, "a local delete is not captured yet; waiting");
                return Ok(Err(Retry::CaptureBehind));
            }
        };
        let outcome = match merge(table, local.as_ref(), change) {
            Ok(outcome) => outcome,
            Err(error) => MergeOutcome::Parked {
                item: ReviewItem::unapplicable(
                    &table.name,
                    &change.key,
                    None,
                    change.origin,
                    change.stamp,
                    change.seq,
                    error.to_string(),
                ),
                error: error.to_string(),
            },
        };
        match outcome {
            MergeOutcome::Applied(merged) => {
                let written = match &merged.action {
                    RowAction::Nothing => Ok(local.as_ref().and(None)),
                    RowAction::Insert(values) => insert_row(&savepoint, table, &change.key, values).await.map(Some),
                    RowAction::Update(writes) => {
                        let writes: Vec<(usize, &Value)> = writes.iter().map(|w| (w.column, &w.value)).collect();
                        update_row(&savepoint, table, &change.key, &writes).await.map(Some)
                    }
                    RowAction::Delete => delete_row(&savepoint, table, &change.key).await.map(|()| None),
                };
                match written {
                    Ok(xmin) => {
                        // A row this merge did not write keeps the xmin accord knew for it.
                        let known = match (&merged.action, xmin) {
                            (_, Some(x)) => Some(x),
                            (RowAction::Nothing, None) => store::load_meta(&savepoint, &table.name, &key, cut)
                                .await?
                                .and_then(|(_, k)| k),
                            _ => None,
                        };
                        store::save_meta(&savepoint, &table.name, &key, &merged.state.meta, known.as_deref()).await?;
                        store::apply_review(&savepoint, &merged.review).await?;
                        store::log_conflicts(&savepoint, &table.name, &key, &merged.conflicts).await?;
                        savepoint.commit().await?;
                        summary.applied += 1;
                        summary.conflicts.count(&merged.conflicts);
                        greatest = greatest.max(Some(change.stamp));
                    }
                    Err(error) => {
                        savepoint.rollback().await?;
                        // A local insert of the same key that committed after the row was
                        // found missing: not a clash, a race with the capture.
                        if matches!(merged.action, RowAction::Insert(_))
                            && lock_row(&*tx, table, &change.key).await?.is_some()
                            && store::load_meta(&*tx, &table.name, &key, cut)
                                .await?
                                .is_none_or(|(m, _)| !m.is_alive())
                        {
                            return Ok(Err(Retry::CaptureBehind));
                        }
                        // A constraint of this database refused the row: park it, go on.
                        park(&*tx, change, &table.name, format!("{error:#}")).await?;
                        summary.parked += 1;
                    }
                }
            }
            MergeOutcome::Parked { item, .. } => {
                savepoint.rollback().await?;
                store::open_item(&*tx, &item, Some(change)).await?;
                summary.parked += 1;
            }
            MergeOutcome::Deferred { missing } => {
                savepoint.rollback().await?;
                park(&*tx, change, &table.name, deferred_error(&missing)).await?;
                summary.parked += 1;
            }
        }
    }
    Ok(Ok((summary, greatest)))
}

async fn park(db: &impl GenericClient, change: &RowChange, table: &str, error: String) -> Result<()> {
    tracing::warn!(table, key = %key_text(&change.key), origin = %change.origin, seq = change.seq, %error, "change parked for review");
    let item = ReviewItem::unapplicable(table, &change.key, None, change.origin, change.stamp, change.seq, error);
    store::open_item(db, &item, Some(change)).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use accord_engine::ColumnWrite;

    use super::*;

    fn update(columns: &[(usize, i64)]) -> RowAction {
        RowAction::Update(
            columns
                .iter()
                .map(|&(column, v)| ColumnWrite {
                    column,
                    value: Value::Int(v),
                })
                .collect(),
        )
    }

    fn fold(actions: &[RowAction]) -> Option<Write> {
        let mut write = Write::Keep;
        actions.iter().all(|a| write.then(a)).then_some(write)
    }

    #[test]
    fn updates_of_one_row_fold_into_its_last_values() {
        let Some(Write::Update(columns)) = fold(&[update(&[(0, 1)]), RowAction::Nothing, update(&[(0, 2), (2, 5)])])
        else {
            panic!("updates fold into an update");
        };
        assert_eq!(
            columns.into_iter().collect::<Vec<_>>(),
            [(0, Value::Int(2)), (2, Value::Int(5))]
        );
    }

    #[test]
    fn an_insert_takes_the_later_updates() {
        let Some(Write::Insert(values)) =
            fold(&[RowAction::Insert(vec![Value::Int(1), Value::Int(2)]), update(&[(1, 7)])])
        else {
            panic!("an insert and updates fold into an insert");
        };
        assert_eq!(values, [Value::Int(1), Value::Int(7)]);
        assert!(fold(&[RowAction::Insert(vec![Value::Int(1)]), update(&[(3, 7)])]).is_none());
    }

    #[test]
    fn a_delete_ends_updates_but_a_new_incarnation_does_not_fold() {
        assert!(matches!(
            fold(&[update(&[(0, 1)]), RowAction::Delete]),
            Some(Write::Delete)
        ));
        assert!(fold(&[RowAction::Delete, RowAction::Insert(vec![Value::Int(1)])]).is_none());
        assert!(fold(&[RowAction::Insert(vec![Value::Int(1)]), RowAction::Delete]).is_none());
        assert!(fold(&[RowAction::Delete, update(&[(0, 1)])]).is_none());
    }
}
