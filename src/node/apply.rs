//! Apply: carries out, in PostgreSQL, what the engine's `BatchApply` decides for one peer's
//! batch (`accord_engine::apply` holds every rule: the xmin guard, its rounds, restarts, joining,
//! splitting, parking, deferral, the exactly-once skip). This module only turns its commands into
//! SQL, pipelined and with prepared statements.
//!
//! Each apply connection is bound to the peer's replication origin, so that
//! - the batch's last sequence number is committed as the origin's position in the same
//!   transaction as the data: a crash cannot separate them (exactly once);
//! - the capture sees the Origin marker on these transactions and does not capture them again.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use accord_engine::{
    ApplyCommand, ApplyInput, ApplyRules, BatchApply, Hlc, KeyLocks, LoadedRow, NodeId, NodeSchema, PlannedWrite,
    Records, RemovalCount, RemovalLedger, RowChange, RowWrite, Segments, ShapeBook, ShapeId, StableCut, TableDef,
    Value, WriteRefusal, Xid, MAX_APPLY_BATCH,
};
pub use accord_engine::{ApplySummary, ConflictCounts};
use accord_schema_annotations::SchemaPolicy;
use anyhow::{anyhow, bail, Context, Result};
use tokio::sync::watch;
use tokio_postgres::types::PgLsn;
use tokio_postgres::{Client, GenericClient, Row};

use super::capture::{hlc_message, CaptureProgress, PROBE_MESSAGE_PREFIX};
use super::key_locks;
use super::pipeline::{self, Params, Statements};
use super::rows::{
    delete_rows_sql, insert_rows_sql, key_texts, lock_rows_sql, locked_row, quote_table, update_rows_sql, xmins_sql,
};
use super::spool::Spool;
use super::store::{self, key_text, origin_name, ConflictRows, MetaRows, HLC_MESSAGE_PREFIX};

/// Tries (100 ms apart) to bind a replication origin another session still holds.
const ORIGIN_BIND_ATTEMPTS: u32 = 600;

/// How long a batch waits for the capture to read past one probe before the applier gives up.
const CAPTURE_WAIT_LIMIT: Duration = Duration::from_secs(120);

/// A node's [`RemovalLedger`], which all its appliers share.
pub type SharedLedger = Arc<std::sync::Mutex<RemovalLedger>>;

pub struct Applier {
    db: Client,
    /// A second session, without the origin, that flushes the WAL after a probe while `db` holds
    /// its batch's row locks, and to learn the durable position (`durable_flush`).
    flusher: Arc<Client>,
    capture: watch::Receiver<CaptureProgress>,
    ledger: SharedLedger,
    peer: NodeId,
    policy: Arc<SchemaPolicy>,
    /// The policy's tables, as the engine takes them.
    tables: Arc<[TableDef]>,
    synchronous_commit: bool,
    applied: u64,
    /// Prepared statements of this connection.
    statements: Statements,
    /// The latest completed tombstone-collection round: tombstones it covers read as absent.
    cut: watch::Receiver<Option<StableCut>>,
    /// The shapes the node knows, its peers' included (`engine::shape`).
    shapes: watch::Receiver<Arc<ShapeBook>>,
    /// Per table: what a column a change does not carry is filled with, and the columns dropped
    /// here (`shapes::local_extras`); only tables that have either.
    extras: Vec<(String, Vec<Option<Value>>, BTreeSet<String>)>,
    /// Tables this node left (`tagging`): peers' changes to them are not applied.
    left: watch::Receiver<Arc<BTreeSet<String>>>,
    /// The session let go of the peer's origin (`release_origin`): it may apply nothing.
    origin_released: bool,
    /// The session holds key locks (`key_locks`), to release once the transaction ends.
    keys_locked: bool,
    /// Tables partitioned on this node (`schema.table`), whose inserts cannot return xmins.
    partitioned: BTreeSet<String>,
    /// The position the open transaction commits with (the engine's first `Load` of it says).
    commits_at: Option<u64>,
    /// How many guard savepoints the open transaction holds, one within the other (each load of
    /// a guard round takes one): a row written inside any of them gets a subtransaction's xid.
    guard_savepoints: u32,
}

/// How a machine's run ended.
enum Run {
    /// Committed; or, for a segment but the last, applied in the open transaction.
    Done { applied: u64, summary: ApplySummary },
    /// A segment rolled the transaction back: apply it again from the first segment.
    StartOver,
}

/// A slot's key as text (accord's tables) and as parameters (the user's table).
type SlotKey = (String, Vec<Option<String>>);

impl Applier {
    pub async fn connect(
        db: Client,
        flusher: Client,
        capture: watch::Receiver<CaptureProgress>,
        ledger: SharedLedger,
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
        // After a crash the old session holds the origin until its backend exits, which it does
        // only once its statement ends: one waiting for a row lock a user's transaction holds
        // waits as long as that does. A second accord on the same database holds it for good.
        let mut attempts = 0;
        loop {
            match db
                .execute("SELECT pg_replication_origin_session_setup($1)", &[&origin])
                .await
            {
                Ok(_) => break,
                Err(error) if attempts < ORIGIN_BIND_ATTEMPTS && origin_in_use(&error) => {
                    attempts += 1;
                    if attempts == 20 {
                        tracing::info!(
                            %peer,
                            error = %error,
                            "replication origin {origin} is still bound to another session (a previous accord's, \
                             whose statement has not ended yet?); waiting up to a minute"
                        );
                    }
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
        // The key-lock triggers leave this session's writes alone: it locks the keys it
        // merges into itself (`key_locks`).
        db.batch_execute(&format!(
            "SET {} = on; {}",
            key_locks::APPLYING_SETTING,
            pipeline::PLAN_ONCE_SQL
        ))
        .await
        .context("cannot mark the applier's session")?;
        let position: Option<PgLsn> = db
            .query_one("SELECT pg_replication_origin_session_progress(true)", &[])
            .await?
            .get(0);
        // A database that applied before `accord.applied` existed has its positions only in
        // the origins: recorded once here, while this session holds the origin.
        let recorded = i64::try_from(position.map(u64::from).unwrap_or(0)).unwrap_or(i64::MAX);
        db.execute(
            "INSERT INTO accord.applied (origin, seq) VALUES ($1, $2)
             ON CONFLICT (origin) DO UPDATE SET seq = GREATEST(accord.applied.seq, EXCLUDED.seq)",
            &[&store::node_param(peer)?, &recorded],
        )
        .await
        .context("cannot record the applied position in accord.applied")?;
        let names: Vec<String> = policy.tables().iter().map(|t| t.name.clone()).collect();
        let quoted: Vec<String> = names.iter().map(|t| quote_table(t)).collect();
        let partitioned = db
            .query(
                "SELECT n FROM unnest($1::text[]) WITH ORDINALITY AS q(t, n)
                   JOIN pg_catalog.pg_class c ON c.oid = to_regclass(q.t) WHERE c.relkind = 'p'",
                &[&quoted],
            )
            .await
            .context("cannot read which replicated tables are partitioned")?
            .iter()
            .filter_map(|row| names.get(usize::try_from(row.get::<_, i64>(0) - 1).ok()?).cloned())
            .collect();
        let mut extras = Vec::new();
        for table in policy.tables() {
            // The shape this applier writes metadata under, for every reader of it.
            super::shapes::record(&db, table, true)
                .await
                .context("cannot record the tables' shapes")?;
            let (defaults, dropped) = super::shapes::local_extras(&db, table)
                .await
                .with_context(|| format!("cannot read the defaults of {}", table.name))?;
            if defaults.iter().any(Option::is_some) || !dropped.is_empty() {
                extras.push((table.name.clone(), defaults, dropped));
            }
        }
        let left = super::tagging::left_tables(&db).await?;
        Ok(Applier {
            left: watch::channel(Arc::new(left)).1,
            extras,
            origin_released: false,
            db,
            flusher: Arc::new(flusher),
            capture,
            ledger,
            peer,
            tables: Arc::from(policy.tables()),
            shapes: watch::channel(Arc::clone(&NodeSchema::of(Arc::from(policy.tables())).shapes)).1,
            policy,
            synchronous_commit,
            applied: position.map(u64::from).unwrap_or(0),
            statements: Statements::default(),
            cut: watch::channel(None).1,
            keys_locked: false,
            partitioned,
            commits_at: None,
            guard_savepoints: 0,
        })
    }

    pub fn peer(&self) -> NodeId {
        self.peer
    }

    /// Lets go of the peer's replication origin, for a replacement applier to bind it; `false`
    /// if the session could not (it is then of no further use). Until it binds the origin again,
    /// this applier applies nothing: its writes would carry no origin, and its own capture would
    /// send them on as this node's.
    pub async fn release_origin(&mut self) -> bool {
        self.origin_released = true;
        // A failed attempt may have left its transaction open, holding row locks the
        // replacement would wait for.
        self.abandon_attempt().await.is_ok()
            && self
                .db
                .batch_execute("SELECT pg_replication_origin_session_reset()")
                .await
                .is_ok()
    }

    /// Binds the peer's replication origin again after [`Applier::release_origin`], when no
    /// replacement took it.
    pub async fn rebind_origin(&mut self) -> Result<()> {
        self.db
            .execute(
                "SELECT pg_replication_origin_session_setup($1)",
                &[&origin_name(self.peer)],
            )
            .await
            .context("cannot bind the replication origin again")?;
        self.origin_released = false;
        Ok(())
    }

    fn holds_origin(&self) -> Result<()> {
        if self.origin_released {
            bail!("the applier's session let go of the peer's replication origin; it is being replaced");
        }
        Ok(())
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

    pub fn ledger(&self) -> SharedLedger {
        Arc::clone(&self.ledger)
    }

    fn ledger_mut(&self) -> Result<std::sync::MutexGuard<'_, RemovalLedger>> {
        self.ledger
            .lock()
            .map_err(|_| anyhow!("the removal ledger's lock is poisoned"))
    }

    /// Follows the node's tombstone collection: tombstones the latest cut covers read as absent.
    pub fn follow_collection(&mut self, cut: watch::Receiver<Option<StableCut>>) {
        self.cut = cut;
    }

    /// Follows the shapes the node knows (its peers tell it theirs).
    pub fn follow_shapes(&mut self, shapes: watch::Receiver<Arc<ShapeBook>>) {
        self.shapes = shapes;
    }

    /// Follows the tables the node left (`tagging`), which it learns of after the applier
    /// read its tables.
    pub fn follow_left(&mut self, left: watch::Receiver<Arc<BTreeSet<String>>>) {
        self.left = left;
    }

    /// The left tables this applier follows, for a replacement applier.
    pub fn left(&self) -> watch::Receiver<Arc<BTreeSet<String>>> {
        self.left.clone()
    }

    /// The shapes this applier follows, for a replacement applier.
    pub fn shapes(&self) -> watch::Receiver<Arc<ShapeBook>> {
        self.shapes.clone()
    }

    /// The tables and shapes a batch is read against.
    fn schema(&self) -> NodeSchema {
        let known = Arc::clone(&self.shapes.borrow());
        let shapes = if self.extras.is_empty() {
            known
        } else {
            let mut book = (*known).clone();
            for (table, defaults, dropped) in &self.extras {
                book.set_local(table, defaults.clone(), dropped.clone());
            }
            Arc::new(book)
        };
        NodeSchema {
            tables: Arc::clone(&self.tables),
            shapes,
            left: Arc::clone(&self.left.borrow()),
        }
    }

    /// The collection this applier follows, for a replacement applier.
    pub fn collection(&self) -> watch::Receiver<Option<StableCut>> {
        self.cut.clone()
    }

    /// A flush that learns the last of the peer's changes whose apply is on disk, to run beside
    /// the next batches (on the second session: the peer's origin is read by name, and this
    /// session stays free for them). With `synchronous_commit` off a committed batch may still
    /// be lost in a crash of the server (its origin position with it), so peers must only be
    /// told, and prune their logs by, what it returns: it flushes the WAL up to this origin's
    /// last commit first. With `synchronous_commit` on every commit is on disk: `None`.
    pub fn durable_flush(&self) -> Option<impl std::future::Future<Output = Result<u64>> + Send + 'static> {
        if self.synchronous_commit {
            return None;
        }
        let flusher = Arc::clone(&self.flusher);
        let origin = origin_name(self.peer);
        Some(async move {
            let position: Option<PgLsn> = flusher
                .query_one("SELECT pg_replication_origin_progress($1, true)", &[&origin])
                .await
                .context("cannot read the durable applied position")?
                .get(0);
            Ok(position.map(u64::from).unwrap_or(0))
        })
    }

    /// The last of the peer's changes applied here (committed; see `durable_flush`).
    pub fn applied(&self) -> u64 {
        self.applied
    }

    /// Applies what of `changes` was not applied yet. Returns the new applied position.
    pub async fn apply(&mut self, changes: &[RowChange]) -> Result<(u64, ApplySummary)> {
        self.holds_origin()?;
        // An attempt that failed midway may have left its key locks on this session.
        if self.keys_locked {
            self.abandon_attempt().await?;
        }
        let fresh: Vec<RowChange> = changes.iter().filter(|c| c.seq > self.applied).cloned().collect();
        let mut machine = self.machine(self.applied, fresh)?;
        match self.run(&mut machine).await? {
            Run::Done { applied, summary } => {
                self.applied = applied;
                Ok((applied, summary))
            }
            Run::StartOver => bail!("the engine started over a batch that is not a segment"),
        }
    }

    /// Applies a source transaction whose beginning is in `spool` and whose end is `tail`, in
    /// one local transaction, a segment at a time: memory holds one spooled chunk and one
    /// segment's machine, whatever the transaction's size. Returns the new applied position.
    pub async fn apply_spooled(&mut self, spool: &mut Spool, tail: &[RowChange]) -> Result<(u64, ApplySummary)> {
        self.holds_origin()?;
        if self.keys_locked {
            self.abandon_attempt().await?;
        }
        let commit_at = tail.last().context("a spooled transaction without its end")?.seq;
        let mut segments = Segments::new(commit_at, self.applied);
        'attempt: loop {
            let mut reader = spool.read().await?;
            let mut summary = ApplySummary::default();
            let mut chunk: Vec<RowChange> = Vec::new();
            let mut in_tail = false;
            loop {
                if chunk.is_empty() {
                    match reader.next().await? {
                        Some(next) => chunk = next,
                        None if !in_tail => {
                            chunk = tail.to_vec();
                            in_tail = true;
                        }
                        None => break,
                    }
                    continue;
                }
                let rest = chunk.split_off(chunk.len().min(MAX_APPLY_BATCH));
                let changes = std::mem::replace(&mut chunk, rest);
                let last = in_tail && chunk.is_empty();
                let cut = self.cut.borrow().clone();
                let mut machine =
                    segments.machine(self.peer, changes, &self.schema(), cut, ApplyRules::default(), last)?;
                match self.run(&mut machine).await? {
                    Run::Done { summary: part, .. } => {
                        summary.add(&part);
                        segments.done(&machine);
                    }
                    Run::StartOver => {
                        segments.start_over();
                        tracing::debug!(restarts = segments.restarts(), "a spooled transaction starts over");
                        continue 'attempt;
                    }
                }
            }
            self.applied = segments.applied();
            return Ok((self.applied, summary));
        }
    }

    fn machine(&self, applied: u64, changes: Vec<RowChange>) -> Result<BatchApply> {
        let cut = self.cut.borrow().clone();
        Ok(BatchApply::new(
            self.peer,
            applied,
            changes,
            &self.schema(),
            cut,
            ApplyRules::default(),
        )?)
    }

    /// Carries out the machine's commands until it is done.
    async fn run(&mut self, machine: &mut BatchApply) -> Result<Run> {
        let started = tokio::time::Instant::now();
        let now = || u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX);
        let mut keys: BTreeMap<usize, SlotKey> = BTreeMap::new();
        let mut input = ApplyInput::Start { now: now() };
        // Per command, for `RUST_LOG=accord=trace`: where a batch's time goes.
        let mut steps = 0u32;
        let mut deferred = DeferredRecords::new();
        let mut step_started = tokio::time::Instant::now();
        loop {
            let command = machine.step(input)?;
            tracing::trace!(
                micros = step_started.elapsed().as_micros() as u64,
                step = steps,
                "apply step done"
            );
            steps += 1;
            step_started = tokio::time::Instant::now();
            tracing::trace!(command = command.name(), "apply step");
            if !matches!(command, ApplyCommand::Commit { .. }) {
                run_deferred(&self.db, &mut deferred).await?;
            }
            input = match command {
                ApplyCommand::Load {
                    begin,
                    guard,
                    slots,
                    lock_keys,
                } => {
                    for &slot in &slots {
                        if let std::collections::btree_map::Entry::Vacant(entry) = keys.entry(slot) {
                            let (table, key) = machine.slot(slot).context("the engine named an unknown slot")?;
                            entry.insert((key_text(key), key_texts(table, key)?));
                        }
                    }
                    let (rows, locked, xid) = self.load(machine, &keys, begin, guard, &slots, &lock_keys).await?;
                    let keys = match locked {
                        None => KeyLocks::NotAsked,
                        Some(None) => KeyLocks::Busy { now: now() },
                        Some(Some(issued)) => KeyLocks::Locked(RemovalCount {
                            issued,
                            accounted: self.ledger_mut()?.accounted(),
                        }),
                    };
                    ApplyInput::Loaded { rows, keys, xid }
                }
                ApplyCommand::LockKeys { missing } => match self.lock_keys(machine, &keys, &missing).await? {
                    None => ApplyInput::KeysBusy { now: now() },
                    Some(issued) => ApplyInput::KeysLocked(RemovalCount {
                        issued,
                        accounted: self.ledger_mut()?.accounted(),
                    }),
                },
                ApplyCommand::ProbeAndWait => {
                    let (lsn, at_rest) = self.probe().await?;
                    let waiting = tokio::time::Instant::now();
                    wait_for_capture(&self.flusher, &mut self.capture, lsn).await?;
                    tracing::debug!(
                        millis = waiting.elapsed().as_millis() as u64,
                        "waited for the capture with the rows locked"
                    );
                    if let Some(issued) = at_rest {
                        self.ledger_mut()?.settle(issued);
                    }
                    ApplyInput::CaptureReached { now: now() }
                }
                ApplyCommand::Restart { probe, pause_micros } => {
                    self.roll_back_for_restart(probe, pause_micros).await?;
                    ApplyInput::Restarted { now: now() }
                }
                ApplyCommand::StartOver { probe, pause_micros } => {
                    self.roll_back_for_restart(probe, pause_micros).await?;
                    return Ok(Run::StartOver);
                }
                ApplyCommand::Write(planned) => ApplyInput::Written(self.write(machine, &keys, &planned).await?),
                ApplyCommand::Record(records) => {
                    deferred = self.record(machine, &keys, records).await?;
                    ApplyInput::Recorded
                }
                ApplyCommand::WriteAndCommit {
                    writes,
                    records,
                    merged_stamp,
                    builds_on,
                } => {
                    let statements = self.write_statements(machine, &keys, &writes, true)?;
                    let prepared = self.prepare(&statements).await?;
                    let recorded = self.record(machine, &keys, records).await?;
                    let ending = self.ending(recorded, merged_stamp, &builds_on).await?;
                    let db = &self.db;
                    let mut queries = Vec::new();
                    // Written in the transaction itself, the rows' xmin is its id, which the engine
                    // recorded in their metadata. Each release ends the newest savepoint of the
                    // name; a guard round's loads nest theirs.
                    for _ in 0..self.guard_savepoints {
                        queries.push(pipeline::command(db, "RELEASE SAVEPOINT accord_guard"));
                    }
                    let first_write = queries.len();
                    for (write, statement) in statements.iter().zip(&prepared) {
                        queries.push(pipeline::query(db, statement, &write.params));
                    }
                    let after_writes = queries.len();
                    queries.extend(ending.queries(db));
                    let outcomes = pipeline::run_each(queries).await;
                    self.transaction_ended();
                    match first_failure(outcomes) {
                        None => ApplyInput::Committed,
                        Some((at, error)) if (first_write..after_writes).contains(&at) && !is_transient(&error) => {
                            // Every statement after it failed too, and the commit rolled back.
                            tracing::debug!(error = format!("{error:#}"), "a write sent with its commit was refused");
                            ApplyInput::Written(Err(WriteRefusal {
                                key_exists: false,
                                no_place: has_no_partition(&error),
                                message: no_partition_message(&error).unwrap_or_else(|| format!("{error:#}")),
                            }))
                        }
                        Some((_, error)) => return Err(error.context("writing and committing a batch")),
                    }
                }
                ApplyCommand::Commit {
                    merged_stamp,
                    builds_on,
                } => {
                    let ending = self
                        .ending(std::mem::take(&mut deferred), merged_stamp, &builds_on)
                        .await?;
                    let outcome = pipeline::run_all(ending.queries(&self.db)).await;
                    self.transaction_ended();
                    outcome?;
                    ApplyInput::Committed
                }
                ApplyCommand::Done { applied, summary } => {
                    tracing::debug!(
                        changes = machine.changes().len(),
                        waits = summary.waits,
                        steps,
                        millis = started.elapsed().as_millis() as u64,
                        "batch applied"
                    );
                    return Ok(Run::Done { applied, summary });
                }
            };
        }
    }

    /// What commits a batch's transaction: `recorded` (held back), the merged stamp's message,
    /// the applied position, the commit, and the key locks' release.
    async fn ending(
        &mut self,
        recorded: DeferredRecords,
        merged_stamp: Option<Hlc>,
        builds_on: &[(NodeId, u64)],
    ) -> Result<Ending> {
        let position = self
            .commits_at
            .take()
            .context("the engine committed a transaction no load began")?;
        // The stamp goes to the running capture in the message, and to a restarted one in the
        // record (it writes no checkpoint for a group of merges).
        let emit = match merged_stamp {
            Some(stamp) => Some((
                self.statements.get(&self.db, EMIT_HLC_SQL).await?,
                vec![
                    Box::new(HLC_MESSAGE_PREFIX) as Box<dyn tokio_postgres::types::ToSql + Sync + Send>,
                    Box::new(hlc_message(stamp, builds_on)),
                ],
            )),
            None => None,
        };
        Ok(Ending {
            recorded,
            emit,
            applied: (
                self.statements.get(&self.db, store::RECORD_APPLIED_SQL).await?,
                store::applied_params(self.peer, position, merged_stamp)?,
            ),
            unlock: self.keys_locked,
        })
    }

    /// The transaction committed or rolled back, its key locks released after it.
    fn transaction_ended(&mut self) {
        self.keys_locked = false;
        self.guard_savepoints = 0;
    }

    /// Rolls the attempt back for the engine's `Restart` or `StartOver`.
    async fn roll_back_for_restart(&mut self, with_probe: bool, pause_micros: u64) -> Result<()> {
        // The probe comes after every row was read: whatever version was seen is committed
        // before it.
        let lsn = match with_probe {
            true => Some(probe(&self.db).await?),
            false => None,
        };
        self.abandon_attempt().await?;
        match lsn {
            Some(lsn) => wait_for_capture(&self.flusher, &mut self.capture, lsn).await,
            None => {
                tokio::time::sleep(Duration::from_micros(pause_micros)).await;
                Ok(())
            }
        }
    }

    /// Locks the slots' rows (per table, tables in name order, keys in order), then after the
    /// guard's savepoint their metadata and kept changes, in one round trip; with `lock_keys`,
    /// after the rows, tries the locks of those slots' keys, reads the count of local removals
    /// (`Some(None)`: a lock was busy, and none is held) and reads those slots' rows again.
    #[allow(clippy::type_complexity)]
    async fn load(
        &mut self,
        machine: &BatchApply,
        keys: &BTreeMap<usize, SlotKey>,
        begin: Option<u64>,
        guard: bool,
        slots: &[usize],
        lock_keys: &[usize],
    ) -> Result<(Vec<LoadedRow>, Option<Option<u64>>, Option<Xid>)> {
        let key = |slot: usize| keys.get(&slot).context("a slot without its key");
        let table = |slot: usize| machine.slot(slot).map(|(t, _)| t).context("an unknown slot");
        let groups = table_groups(machine, slots)?;
        let db = &self.db;
        let statements = &mut self.statements;
        let setup = statements
            .get(db, "SELECT pg_replication_origin_xact_setup($1, now())")
            .await?;
        let setup_params: Params = vec![Box::new(PgLsn::from(begin.unwrap_or(0)))];
        let read_xid = statements.get(db, TRANSACTION_ID_SQL).await?;
        let mut locks = Vec::with_capacity(groups.len());
        for (t, rows) in &groups {
            let statement = statements.get(db, &lock_rows_sql(t)).await?;
            locks.push((statement, key_arrays(keys, rows, t.key.len())?));
        }
        // The rows of `lock_keys` are read again once their keys are locked (numbered by their
        // place among `slots`, as the first reading numbers them).
        let place: BTreeMap<usize, usize> = slots.iter().enumerate().map(|(i, &slot)| (slot, i)).collect();
        let mut relocks = Vec::new();
        for (t, rows) in table_groups(machine, lock_keys)? {
            let rows = rows
                .iter()
                .map(|&(_, slot)| {
                    Ok((
                        *place.get(&slot).context("a key to lock that the load does not read")?,
                        slot,
                    ))
                })
                .collect::<Result<Vec<(usize, usize)>>>()?;
            let statement = statements.get(db, &lock_rows_sql(t)).await?;
            let params = key_arrays(keys, &rows, t.key.len())?;
            relocks.push((t, statement, params));
        }
        // A guard load must not wait for a metadata lock while it holds others: the capture may
        // need one of those (a local write of the row it has not read, which the guard would
        // probe for), while the transaction holding the lock waits for the capture (a later
        // segment of a spooled transaction). It lets go and tries again after a pause.
        let load_metas = match guard {
            true => statements.get(db, store::LOAD_METAS_NOWAIT_SQL).await?,
            false => statements.get(db, store::LOAD_METAS_SQL).await?,
        };
        let load_kept = statements.get(db, store::LOAD_DEFERRED_SQL).await?;
        let all: Vec<usize> = (0..slots.len()).collect();
        let mut names = Vec::with_capacity(slots.len());
        let mut texts = Vec::with_capacity(slots.len());
        for &slot in slots {
            names.push(table(slot)?.name.clone());
            texts.push(key(slot)?.0.clone());
        }
        let load_params: Params = vec![Box::new(ords_param(&all)), Box::new(names), Box::new(texts)];
        let key_locks = match lock_keys.is_empty() {
            true => None,
            false => Some(self.key_locks_statements(machine, keys, lock_keys).await?),
        };
        let db = &self.db;

        let mut queries = Vec::new();
        let mut xid_at = None;
        if begin.is_some() {
            queries.push(pipeline::command(db, "BEGIN"));
            // Said either way: the server's default may be either, and `durable_flush` trusts a
            // synchronous commit to be on disk.
            queries.push(pipeline::command(
                db,
                if self.synchronous_commit {
                    "SET LOCAL synchronous_commit = on"
                } else {
                    "SET LOCAL synchronous_commit = off"
                },
            ));
            // The batch's position is committed with its changes (exactly once); recorded
            // where a snapshot can read it with them by the commit (`store::RECORD_APPLIED_SQL`).
            queries.push(pipeline::query(db, &setup, &setup_params));
            // The xmin of what it writes under no savepoint (`ApplyCommand::WriteAndCommit`).
            xid_at = Some(queries.len());
            queries.push(pipeline::query(db, &read_xid, &NO_PARAMS));
        }
        if let Some(position) = begin {
            self.commits_at = Some(position);
        }
        let first_lock = queries.len();
        for (statement, params) in &locks {
            queries.push(pipeline::query(db, statement, params));
        }
        // After the rows: a wait for a row's lock holds no key lock, which a local transaction
        // holding that row could be waiting for (a deadlock; `accord demo` met it when the keys
        // were locked first). The rows of those keys are then read again: a local insert of one
        // committed before its lock is among them, and none can commit after it until this
        // transaction ends.
        let first_key_lock = queries.len();
        if let Some((lock, count, params)) = &key_locks {
            // Set before the statement runs: it may take some of them and then fail.
            self.keys_locked = true;
            queries.push(pipeline::query(db, lock, params));
            queries.push(pipeline::query(db, count, &NO_PARAMS));
        }
        let first_relock = queries.len();
        for (_, statement, params) in &relocks {
            queries.push(pipeline::query(db, statement, params));
        }
        if guard {
            // Rolling back to it releases the metadata locks but keeps the rows': the capture
            // may need to write metadata while this transaction waits for it.
            queries.push(pipeline::command(db, "SAVEPOINT accord_guard"));
            self.guard_savepoints += 1;
        }
        queries.push(pipeline::query(db, &load_metas, &load_params));
        queries.push(pipeline::query(db, &load_kept, &load_params));
        let mut results = Vec::with_capacity(queries.len());
        let mut busy = false;
        for outcome in pipeline::run_each(queries).await {
            match outcome {
                Ok(rows) => results.push(rows),
                Err(error) if guard && !busy && is_lock_not_available(&error) => busy = true,
                Err(error) if busy => tracing::trace!(%error, "after a busy metadata lock"),
                Err(error) => return Err(error.into()),
            }
        }
        if busy {
            results.extend(metas_again(db, &load_metas, &load_kept, &load_params).await?);
        }

        let xid = match xid_at {
            None => None,
            Some(at) => Some(transaction_id(
                results.get(at).context("the load read no transaction id")?,
            )?),
        };
        let mut loaded: Vec<LoadedRow> = slots.iter().map(|_| LoadedRow::default()).collect();
        let slot_of = |ord: i32| usize::try_from(ord).ok().filter(|&o| o < slots.len());
        let read = results.get(first_lock..first_lock + groups.len()).unwrap_or_default();
        fill_rows(&mut loaded, read, groups.iter().map(|(t, _)| *t))?;
        // The rows of the locked keys as read under their locks.
        for &slot in lock_keys {
            if let Some(&ord) = place.get(&slot) {
                loaded[ord].row = None;
            }
        }
        let read_again = results
            .get(first_relock..first_relock + relocks.len())
            .unwrap_or_default();
        fill_rows(&mut loaded, read_again, relocks.iter().map(|(t, _, _)| *t))?;
        let [metas, kept] = results.get(results.len().saturating_sub(2)..).unwrap_or_default() else {
            bail!("the load of a batch's rows gave too few results");
        };
        let shapes = self.schema().shapes;
        let table_of = |ord: usize| slots.get(ord).and_then(|&slot| machine.slot(slot).map(|(t, _)| t));
        let extras = &self.extras;
        let local = |book: &mut ShapeBook| {
            for (table, defaults, dropped) in extras {
                book.set_local(table, defaults.clone(), dropped.clone());
            }
        };
        for (ord, meta, known) in store::loaded_metas_fresh(&self.db, metas, &shapes, local, table_of).await? {
            let row = loaded
                .get_mut(ord)
                .context("row metadata came back with an unknown ord")?;
            row.meta = Some((meta, known.as_deref().map(parse_xid).transpose()?));
        }
        for row in kept {
            let ord = slot_of(row.try_get(0)?).context("a kept change came back with an unknown ord")?;
            let change: RowChange = store::decode("kept change", row.try_get::<_, &[u8]>(1)?)?;
            loaded[ord].deferred.push(change);
        }
        let locked = match key_locks {
            None => None,
            Some(_) => {
                let taken = results
                    .get(first_key_lock)
                    .context("the key locks' statement returned nothing")?;
                let counted = results
                    .get(first_key_lock + 1)
                    .context("the removal count returned nothing")?;
                match key_locks_outcome(taken, counted)? {
                    Some(issued) => Some(Some(issued)),
                    None => {
                        self.unlock_keys().await?;
                        Some(None)
                    }
                }
            }
        };
        Ok((loaded, locked, xid))
    }

    /// The statements that try the locks of the keys of `slots` (`key_locks::lock_keys_sql`)
    /// and read the count of local removals (`key_locks::REMOVAL_COUNT_SQL`), and the former's
    /// parameters.
    async fn key_locks_statements(
        &mut self,
        machine: &BatchApply,
        keys: &BTreeMap<usize, SlotKey>,
        slots: &[usize],
    ) -> Result<(tokio_postgres::Statement, tokio_postgres::Statement, Params)> {
        let groups = table_groups(machine, slots)?;
        let mut params: Params = Vec::new();
        for (t, rows) in &groups {
            params.extend(key_arrays(keys, rows, t.key.len())?);
        }
        let tables: Vec<&TableDef> = groups.iter().map(|(t, _)| *t).collect();
        if tables.is_empty() {
            bail!("the engine asked to lock the keys of no rows");
        }
        let lock = self
            .statements
            .get(&self.db, &key_locks::lock_keys_sql(&tables))
            .await?;
        let count = self.statements.get(&self.db, key_locks::REMOVAL_COUNT_SQL).await?;
        Ok((lock, count, params))
    }

    /// Rolls back to the guard's savepoint (the metadata's locks go, the rows' stay) and tries
    /// the locks of the keys of `missing` slots (`key_locks::lock_keys_sql`), then reads the
    /// count of local removals (`key_locks::REMOVAL_COUNT_SQL`). `None`: a lock was busy, and
    /// none is held.
    async fn lock_keys(
        &mut self,
        machine: &BatchApply,
        keys: &BTreeMap<usize, SlotKey>,
        missing: &[usize],
    ) -> Result<Option<u64>> {
        let (lock, count, params) = self.key_locks_statements(machine, keys, missing).await?;
        let db = &self.db;
        let queries = vec![
            pipeline::command(db, "ROLLBACK TO SAVEPOINT accord_guard"),
            pipeline::query(db, &lock, &params),
            // Read whether or not every lock was taken; only used if they all were.
            pipeline::query(db, &count, &NO_PARAMS),
        ];
        // Set before the statement runs: it may take some of them and then fail.
        self.keys_locked = true;
        let results = pipeline::run_all(queries)
            .await
            .context("cannot lock the keys of rows missing from a batch")?;
        let (Some(taken), Some(counted)) = (results.get(1), results.get(2)) else {
            bail!("the key locks' statements returned nothing");
        };
        let issued = key_locks_outcome(taken, counted)?;
        if issued.is_none() {
            self.unlock_keys().await?;
        }
        Ok(issued)
    }

    /// Rolls back to the guard's savepoint (the metadata's locks go, the rows' and keys' stay),
    /// reads the count of local removals at rest (`key_locks::REMOVAL_COUNT_AT_REST_SQL`: `None`
    /// when a transaction that counted itself was open) and writes a probe; returns the probe's
    /// WAL position and the count.
    async fn probe(&mut self) -> Result<(u64, Option<u64>)> {
        let db = &self.db;
        let probe = self.statements.get(db, PROBE_SQL).await?;
        let at_rest = self.statements.get(db, key_locks::REMOVAL_COUNT_AT_REST_SQL).await?;
        let params: Params = vec![Box::new(PROBE_MESSAGE_PREFIX)];
        let none: Params = Vec::new();
        let results = pipeline::run_all(vec![
            pipeline::command(db, "ROLLBACK TO SAVEPOINT accord_guard"),
            pipeline::query(db, &at_rest, &none),
            pipeline::query(db, &probe, &params),
        ])
        .await
        .context("cannot write a probe for the capture")?;
        let at_rest: Option<i64> = results
            .get(1)
            .and_then(|rows| rows.first())
            .context("the removal count at rest returned no row")?
            .try_get(0)?;
        let lsn: PgLsn = results
            .get(2)
            .and_then(|rows| rows.first())
            .context("the probe returned no row")?
            .try_get(0)?;
        let at_rest = at_rest
            .map(u64::try_from)
            .transpose()
            .context("a negative removal count")?;
        Ok((u64::from(lsn), at_rest))
    }

    /// Releases the key locks this session holds, once its transaction ended.
    /// Ends an attempt's transaction on this session (its origin position and key locks with
    /// it), so that the batch can be tried again on the same session: reconnecting would find the
    /// replication origin still bound to the old backend for a while. The origin position is
    /// reset because a ROLLBACK keeps it: committed by a later transaction of this session, it
    /// would record the batch as applied with none of it written.
    pub async fn abandon_attempt(&mut self) -> Result<()> {
        self.db
            .batch_execute(&format!(
                "ROLLBACK; SELECT pg_replication_origin_xact_reset(); {}",
                key_locks::UNLOCK_SQL
            ))
            .await
            .context("cannot roll back a failed batch on its session")?;
        self.transaction_ended();
        Ok(())
    }

    async fn unlock_keys(&mut self) -> Result<()> {
        if self.keys_locked {
            self.db
                .batch_execute(key_locks::UNLOCK_SQL)
                .await
                .context("cannot release the key locks")?;
            self.keys_locked = false;
        }
        Ok(())
    }

    /// The statements writing `planned`: per table (in the order the part first wrote it)
    /// deletes, updates by the set of columns they write, then inserts. `one_go`: sent with the
    /// commit, they need not read the xmins a partitioned table's insert cannot return.
    fn write_statements(
        &self,
        machine: &BatchApply,
        keys: &BTreeMap<usize, SlotKey>,
        planned: &[PlannedWrite],
        one_go: bool,
    ) -> Result<Vec<WriteStatement>> {
        let mut order: Vec<&TableDef> = Vec::new();
        let mut by_table: BTreeMap<&str, Vec<usize>> = BTreeMap::new();
        for (i, write) in planned.iter().enumerate() {
            let (t, _) = machine.slot(write.slot).context("an unknown slot")?;
            if !by_table.contains_key(t.name.as_str()) {
                order.push(t);
            }
            by_table.entry(t.name.as_str()).or_default().push(i);
        }
        let key_params = |which: &[usize], width: usize| -> Result<Params> {
            let rows: Vec<(usize, usize)> = which.iter().map(|&i| (i, planned[i].slot)).collect();
            key_arrays(keys, &rows, width)
        };
        let mut writes: Vec<WriteStatement> = Vec::new();
        for t in order {
            let which = by_table.get(t.name.as_str()).map(Vec::as_slice).unwrap_or_default();
            let width = t.key.len();
            // A replaced row is deleted here and inserted below, as its source did.
            let deletes: Vec<usize> = which
                .iter()
                .copied()
                .filter(|&i| matches!(planned[i].write, RowWrite::Delete | RowWrite::Replace(_)))
                .collect();
            if !deletes.is_empty() {
                writes.push(WriteStatement {
                    sql: delete_rows_sql(t),
                    params: key_params(&deletes, width)?,
                    writes: deletes,
                    returns_xmin: false,
                });
            }
            let mut shapes: BTreeMap<Vec<usize>, Vec<usize>> = BTreeMap::new();
            for &i in which {
                if let RowWrite::Update(columns) = &planned[i].write {
                    shapes.entry(columns.keys().copied().collect()).or_default().push(i);
                }
            }
            for (columns, rows) in shapes {
                let mut params = key_params(&rows, width)?;
                for &column in &columns {
                    params.push(Box::new(column_values(planned, &rows, column)));
                }
                writes.push(WriteStatement {
                    sql: update_rows_sql(t, &columns),
                    params,
                    writes: rows,
                    returns_xmin: true,
                });
            }
            let inserts: Vec<usize> = which
                .iter()
                .copied()
                .filter(|&i| matches!(planned[i].write, RowWrite::Insert(_) | RowWrite::Replace(_)))
                .collect();
            if !inserts.is_empty() {
                let mut params = key_params(&inserts, width)?;
                for column in 0..t.columns.len() {
                    params.push(Box::new(column_values(planned, &inserts, column)));
                }
                let partitioned = self.partitioned.contains(&t.name);
                writes.push(WriteStatement {
                    sql: insert_rows_sql(t, !partitioned),
                    params,
                    writes: inserts.clone(),
                    returns_xmin: !partitioned,
                });
                if partitioned && !one_go {
                    writes.push(WriteStatement {
                        sql: xmins_sql(t),
                        params: key_params(&inserts, width)?,
                        writes: inserts,
                        returns_xmin: true,
                    });
                }
            }
        }
        Ok(writes)
    }

    /// Prepares `writes`' statements (once per session: `Statements` keeps them).
    async fn prepare(&mut self, writes: &[WriteStatement]) -> Result<Vec<tokio_postgres::Statement>> {
        let mut prepared = Vec::with_capacity(writes.len());
        for write in writes {
            prepared.push(
                self.statements
                    .get(&self.db, &write.sql)
                    .await
                    .context("preparing a write")?,
            );
        }
        Ok(prepared)
    }

    /// Writes a part's rows under a savepoint (`write_statements`); a refusal rolls them back.
    async fn write(
        &mut self,
        machine: &BatchApply,
        keys: &BTreeMap<usize, SlotKey>,
        planned: &[PlannedWrite],
    ) -> Result<std::result::Result<Vec<Option<Xid>>, WriteRefusal>> {
        let writes = self.write_statements(machine, keys, planned, false)?;
        let prepared = self.prepare(&writes).await?;
        let db = &self.db;
        // A savepoint, so that a refused write costs only the writes, not the locks.
        let mut queries = vec![pipeline::command(db, "SAVEPOINT accord_batch")];
        for (write, statement) in writes.iter().zip(&prepared) {
            queries.push(pipeline::query(db, statement, &write.params));
        }
        queries.push(pipeline::command(db, "RELEASE SAVEPOINT accord_batch"));
        let results = pipeline::run_all(queries).await;
        let written = results
            .map_err(anyhow::Error::new)
            .and_then(|results| written_xmins(planned.len(), &writes, results.get(1..).unwrap_or_default()));
        match written {
            Ok(xmins) => Ok(Ok(xmins)),
            Err(error) if is_transient(&error) => Err(error.context("writing a batch's rows")),
            Err(error) => {
                tracing::debug!(error = format!("{error:#}"), "a write was refused");
                db.batch_execute("ROLLBACK TO SAVEPOINT accord_batch; RELEASE SAVEPOINT accord_batch")
                    .await?;
                let key_exists = violates_primary_key(db, &error).await?;
                Ok(Err(WriteRefusal {
                    key_exists,
                    no_place: has_no_partition(&error),
                    message: no_partition_message(&error).unwrap_or_else(|| format!("{error:#}")),
                }))
            }
        }
    }

    /// The metadata (with the xmin of the row version it accounts for), the conflict log, the
    /// review queue, parked and kept changes. The metadata and the conflict log alone, the
    /// common case, are returned unsent, for the caller to send with its next command.
    async fn record(
        &mut self,
        machine: &BatchApply,
        keys: &BTreeMap<usize, SlotKey>,
        records: Records,
    ) -> Result<DeferredRecords> {
        let name = |slot: usize| -> Result<(&TableDef, &str)> {
            let (t, _) = machine.slot(slot).context("an unknown slot")?;
            let (text, _) = keys.get(&slot).context("a slot without its key")?;
            Ok((t, text.as_str()))
        };
        let mut metas = MetaRows::default();
        let mut shape_of: BTreeMap<&str, ShapeId> = BTreeMap::new();
        for (slot, meta, known) in &records.metas {
            let (table, key) = name(*slot)?;
            let shape = *shape_of.entry(&table.name).or_insert_with(|| table.shape_id());
            metas.push((&table.name, shape), key, meta, known.map(|x| x.to_string()).as_deref())?;
        }
        let mut conflicts = ConflictRows::default();
        for (slot, conflict) in &records.conflicts {
            let (table, key) = name(*slot)?;
            conflicts.push(&table.name, key, conflict);
        }
        let db = &self.db;
        let mut deferred = Vec::new();
        if !metas.is_empty() {
            deferred.push((
                self.statements.get(db, store::SAVE_METAS_SQL).await?,
                metas.into_params(),
            ));
        }
        if !conflicts.is_empty() {
            deferred.push((
                self.statements.get(db, store::LOG_CONFLICTS_SQL).await?,
                conflicts.into_params(),
            ));
        }
        let rare = !records.review.is_empty()
            || !records.parked.is_empty()
            || !records.defer.is_empty()
            || !records.undefer.is_empty();
        if !rare {
            return Ok(deferred);
        }
        run_deferred(db, &mut deferred).await?;
        store::apply_review(db, &records.review).await?;
        for (item, change) in &records.parked {
            let error = match &item.kind {
                accord_engine::ReviewKind::Unapplicable { error, .. } => error.as_str(),
                _ => "",
            };
            tracing::warn!(table = %change.table, key = %key_text(&change.key), origin = %change.origin, seq = change.seq, error, "change parked for review");
            store::open_item(db, item, Some(change)).await?;
        }
        for change in &records.defer {
            tracing::info!(table = %change.table, key = %key_text(&change.key), origin = %change.origin, seq = change.seq,
                "a change lacks values the row does not have here yet (unchanged TOAST relayed by another node); kept until they arrive");
            store::keep_change(db, change).await?;
        }
        for (table, key, origin, seq) in &records.undefer {
            store::drop_kept_change(db, table, &key_text(key), *origin, *seq).await?;
        }
        Ok(Vec::new())
    }
}

/// Statements of a batch's records held back to be sent with its next command (the commit, in
/// the common case): they need no answer the engine waits for, and a failed one fails the commit
/// sent after it in the same transaction (PostgreSQL rolls back a transaction whose statement
/// failed, and the pipeline reports that statement's error), as it failed the batch before.
type DeferredRecords = Vec<(tokio_postgres::Statement, Params)>;

/// Sends held-back records now (before a command that is not the commit).
async fn run_deferred(db: &Client, deferred: &mut DeferredRecords) -> Result<()> {
    if deferred.is_empty() {
        return Ok(());
    }
    let queries = deferred
        .iter()
        .map(|(statement, params)| pipeline::query(db, statement, params))
        .collect();
    pipeline::run_all(queries)
        .await
        .context("cannot record a batch's metadata")?;
    deferred.clear();
    Ok(())
}

/// No parameters.
static NO_PARAMS: Params = Vec::new();

/// A batch's last statements, sent together ([`Applier::ending`]).
struct Ending {
    recorded: DeferredRecords,
    emit: Option<(tokio_postgres::Statement, Params)>,
    applied: (tokio_postgres::Statement, Params),
    unlock: bool,
}

impl Ending {
    fn queries<'a>(&'a self, db: &'a Client) -> Vec<pipeline::Query<'a>> {
        let mut queries: Vec<pipeline::Query<'a>> = self
            .recorded
            .iter()
            .chain(&self.emit)
            .chain(std::iter::once(&self.applied))
            .map(|(statement, params)| pipeline::query(db, statement, params))
            .collect();
        queries.push(pipeline::command(db, "COMMIT"));
        if self.unlock {
            queries.push(pipeline::command(db, key_locks::UNLOCK_SQL));
        }
        queries
    }
}

/// The first failed statement of a pipeline, and where it stands in it.
fn first_failure(
    outcomes: Vec<std::result::Result<Vec<Row>, tokio_postgres::Error>>,
) -> Option<(usize, anyhow::Error)> {
    outcomes
        .into_iter()
        .enumerate()
        .find_map(|(at, outcome)| outcome.err().map(|error| (at, anyhow::Error::new(error))))
}

/// Sets the rows `lock_rows_sql` statements returned (one result per table, in `tables`' order;
/// each row numbered by its place in `loaded`).
fn fill_rows<'t>(
    loaded: &mut [LoadedRow],
    results: &[Vec<Row>],
    tables: impl Iterator<Item = &'t TableDef>,
) -> Result<()> {
    let count = loaded.len();
    for (rows, t) in results.iter().zip(tables) {
        for row in rows {
            let ord = usize::try_from(row.try_get::<_, i32>(0)?)
                .ok()
                .filter(|&o| o < count)
                .with_context(|| format!("{}: a locked row came back with an unknown ord", t.name))?;
            let (xmin, values) = locked_row(t, row)?;
            loaded[ord].row = Some((parse_xid(&xmin)?, values));
        }
    }
    Ok(())
}

/// The count of local removals read after the key locks were tried, if they were all taken.
fn key_locks_outcome(taken: &[Row], counted: &[Row]) -> Result<Option<u64>> {
    let taken: Option<bool> = taken
        .first()
        .context("the key locks' statement returned no row")?
        .try_get(0)?;
    if taken != Some(true) {
        return Ok(None);
    }
    let issued: i64 = counted
        .first()
        .context("the removal count came back empty")?
        .try_get(0)?;
    Ok(Some(u64::try_from(issued).context("a negative removal count")?))
}

/// A statement of a part's writes, and the planned writes it makes.
struct WriteStatement {
    sql: String,
    params: Params,
    writes: Vec<usize>,
    /// Whether it returns each row's new xmin (an insert or update) or only its ord (a delete).
    returns_xmin: bool,
}

/// One table's slots of a command, as (ord, slot).
type TableGroup<'m> = (&'m TableDef, Vec<(usize, usize)>);

/// The slots per table: the engine names slots in lock order, consecutive per table.
fn table_groups<'m>(machine: &'m BatchApply, slots: &[usize]) -> Result<Vec<TableGroup<'m>>> {
    let mut groups: Vec<TableGroup<'m>> = Vec::new();
    for (ord, &slot) in slots.iter().enumerate() {
        let (t, _) = machine.slot(slot).context("the engine named an unknown slot")?;
        match groups.last_mut() {
            Some((last, rows)) if last.name == t.name => rows.push((ord, slot)),
            _ => groups.push((t, vec![(ord, slot)])),
        }
    }
    Ok(groups)
}

/// Parameters that name rows: their ords, then one text array per key column. `rows`: (ord,
/// slot).
fn key_arrays(keys: &BTreeMap<usize, SlotKey>, rows: &[(usize, usize)], width: usize) -> Result<Params> {
    let ords: Vec<usize> = rows.iter().map(|&(ord, _)| ord).collect();
    let mut params: Params = vec![Box::new(ords_param(&ords))];
    for k in 0..width {
        let column: Vec<Option<String>> = rows
            .iter()
            .map(|(_, slot)| {
                let (_, key) = keys.get(slot).context("a slot without its key")?;
                Ok(key.get(k).cloned().flatten())
            })
            .collect::<Result<_>>()?;
        params.push(Box::new(column));
    }
    Ok(params)
}

/// One column's new values of some planned writes, as text parameters.
fn column_values(planned: &[PlannedWrite], which: &[usize], column: usize) -> Vec<Option<String>> {
    which
        .iter()
        .map(|&i| match &planned[i].write {
            RowWrite::Update(values) => values.get(&column).and_then(Value::to_pg_text),
            RowWrite::Insert(values) | RowWrite::Replace(values) => values.get(column).and_then(Value::to_pg_text),
            RowWrite::Delete => None,
        })
        .collect()
}

/// The replication origin is bound to another session ("replication origin with ID n is already
/// active for PID m", SQLSTATE 55006). The message is the database error's, not the client
/// error's own text (which says only "db error").
fn origin_in_use(error: &tokio_postgres::Error) -> bool {
    error.as_db_error().is_some_and(|e| {
        *e.code() == tokio_postgres::error::SqlState::OBJECT_IN_USE || e.message().contains("is already active")
    })
}

fn ords_param(which: &[usize]) -> Vec<i32> {
    // A batch has far fewer rows than i32::MAX.
    which.iter().map(|&i| i32::try_from(i).unwrap_or(i32::MAX)).collect()
}

/// The open transaction's id (assigning one: the batch writes anyway), as `xid8`'s text.
const TRANSACTION_ID_SQL: &str = "SELECT pg_catalog.pg_current_xact_id()::text";

/// The xmin a row written by the transaction `TRANSACTION_ID_SQL` read carries: a row's `xmin`
/// is the `xid8` without its epoch (the low 32 bits).
fn transaction_id(rows: &[Row]) -> Result<Xid> {
    let row = rows.first().context("the transaction's id came back empty")?;
    let full: u64 = row
        .try_get::<_, &str>(0)?
        .parse()
        .context("the transaction's id is not a number")?;
    Ok(full & 0xFFFF_FFFF)
}

fn parse_xid(text: &str) -> Result<Xid> {
    text.parse()
        .map_err(|_| anyhow!("a row version's xmin {text:?} is not a transaction id"))
}

/// The error PostgreSQL itself raised, wherever in `error`'s chain the client's error is.
pub(super) fn db_error(error: &anyhow::Error) -> Option<&tokio_postgres::error::DbError> {
    error
        .chain()
        .filter_map(|cause| cause.downcast_ref::<tokio_postgres::Error>())
        .find_map(tokio_postgres::Error::as_db_error)
}

/// The SQLSTATE of the database error in `error`'s chain, if there is one.
fn sql_state(error: &anyhow::Error) -> Option<&str> {
    db_error(error).map(|db| db.code().code())
}

/// Whether PostgreSQL rolled an apply back for what another transaction did at the same moment:
/// chosen as a deadlock's victim (a local transaction took the same rows, or a migration the
/// same table, in another order), a serialization failure, a lock it would not wait for. The
/// session and the changes are sound; the batch is tried again on it
/// (`Applier::abandon_attempt`).
pub fn is_concurrency_rollback(error: &anyhow::Error) -> bool {
    sql_state(error).is_some_and(|code| code.starts_with("40") || code == "55P03")
}

/// Whether a write failed for the moment or for the server, not for the values written:
/// [`is_concurrency_rollback`], a cancelled statement or a server shutting down (class 57),
/// resources (53), the connection (08), the system (58). Such a failure is never a reason to
/// park a change for review: parked, a change a deadlock with a migration refused waited for a
/// reviewer (the rolling-migration test found it). The batch fails and is tried again.
fn is_transient(error: &anyhow::Error) -> bool {
    is_concurrency_rollback(error)
        || sql_state(error).is_some_and(|code| ["57", "53", "08", "58"].iter().any(|c| code.starts_with(c)))
}

/// The database error, when it says a row has no partition to go to on this node (range or
/// list partitions that do not cover it, and no DEFAULT partition): check_violation, raised by
/// tuple routing with this message (PostgreSQL 11 and later).
fn no_partition_error(error: &anyhow::Error) -> Option<&tokio_postgres::error::DbError> {
    let db = db_error(error)?;
    (db.code() == &tokio_postgres::error::SqlState::CHECK_VIOLATION
        && db.message().starts_with("no partition of relation"))
    .then_some(db)
}

fn has_no_partition(error: &anyhow::Error) -> bool {
    no_partition_error(error).is_some()
}

/// What the user reads of a row with no partition here: the server's message and its detail.
fn no_partition_message(error: &anyhow::Error) -> Option<String> {
    no_partition_error(error).map(|db| format!("{}: {}", db.message(), db.detail().unwrap_or_default()))
}

/// Whether `error` is a unique violation of a table's primary key: a row of the key is there
/// (the engine starts over and merges against it), not a refusal to park.
async fn violates_primary_key(db: &Client, error: &anyhow::Error) -> Result<bool> {
    let Some(db_error) = db_error(error) else {
        return Ok(false);
    };
    if *db_error.code() != tokio_postgres::error::SqlState::UNIQUE_VIOLATION {
        return Ok(false);
    }
    let (Some(schema), Some(constraint)) = (db_error.schema(), db_error.constraint()) else {
        return Ok(false);
    };
    let row = db
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_index i \
             JOIN pg_catalog.pg_class c ON c.oid = i.indexrelid \
             JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace \
             WHERE i.indisprimary AND n.nspname = $1 AND c.relname = $2)",
            &[&schema, &constraint],
        )
        .await
        .context("cannot tell which constraint refused a write")?;
    Ok(row.get(0))
}

/// Checks that every write statement wrote exactly its rows; the new xmin of each planned write
/// (none for a delete).
fn written_xmins(planned: usize, writes: &[WriteStatement], results: &[Vec<Row>]) -> Result<Vec<Option<Xid>>> {
    if results.len() < writes.len() {
        bail!("{} write statements gave {} results", writes.len(), results.len());
    }
    let mut xmins = vec![None; planned];
    for (write, rows) in writes.iter().zip(results) {
        if rows.len() != write.writes.len() {
            bail!(
                "a batched write touched {} rows instead of {}",
                rows.len(),
                write.writes.len()
            );
        }
        let mut seen = BTreeSet::new();
        for row in rows {
            let ord: i32 = row.try_get(0)?;
            let i = usize::try_from(ord).unwrap_or(usize::MAX);
            if !write.writes.contains(&i) || !seen.insert(i) {
                bail!("a batched write touched an unexpected row (ord {ord})");
            }
            if write.returns_xmin {
                let xmin: String = row.try_get(1)?;
                if let Some(x) = xmins.get_mut(i) {
                    *x = Some(parse_xid(&xmin)?);
                }
            }
        }
    }
    Ok(xmins)
}

/// Tells the capture what a merge transaction merged (the greatest stamp), so that local writes
/// committed after it get greater stamps.
const EMIT_HLC_SQL: &str = "SELECT pg_logical_emit_message(true, $1, $2)";

/// Waits until the capture has read past the probe at `lsn`. The probe is a non-transactional
/// message: in WAL, but not flushed, and the walsender sends only flushed WAL, so on a quiet
/// database it could wait for seconds until something else flushes. A transaction committed
/// synchronously on another session flushes everything before its commit record, but only if it
/// wrote WAL itself: PostgreSQL commits a transaction that merely took an xid asynchronously, and
/// the probe then waited for the WAL writer's next round (up to `wal_writer_delay`, 200 ms). So it
/// writes a transactional message, which the capture ignores.
pub(super) async fn wait_for_capture(
    flusher: &Client,
    capture: &mut watch::Receiver<CaptureProgress>,
    lsn: u64,
) -> Result<()> {
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
            Ok(Err(_)) => Err(anyhow::anyhow!(
                "the capture stopped before it read past WAL position {lsn} (the node is stopping)"
            )),
            Err(_) => Err(anyhow::anyhow!(
                "the capture did not read past WAL position {lsn} within {CAPTURE_WAIT_LIMIT:?} (is it running?)"
            )),
        }
    };
    tokio::try_join!(flush, reached)?;
    Ok(())
}

/// Loads the metadata and kept changes of a guard load again, after a metadata lock was busy:
/// rolls back to the guard savepoint (letting go of the metadata locks, keeping the rows') and
/// tries again after a pause, until no lock is busy.
async fn metas_again(
    db: &Client,
    load_metas: &tokio_postgres::Statement,
    load_kept: &tokio_postgres::Statement,
    params: &Params,
) -> Result<Vec<Vec<Row>>> {
    let started = tokio::time::Instant::now();
    let mut pause = Duration::from_millis(1);
    loop {
        db.batch_execute("ROLLBACK TO SAVEPOINT accord_guard")
            .await
            .context("cannot roll back to the guard's savepoint")?;
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_millis(20));
        let outcomes = pipeline::run_each(vec![
            pipeline::query(db, load_metas, params),
            pipeline::query(db, load_kept, params),
        ])
        .await;
        match outcomes.into_iter().collect::<Result<Vec<_>, _>>() {
            Ok(results) => return Ok(results),
            Err(error) if is_lock_not_available(&error) && started.elapsed() < CAPTURE_WAIT_LIMIT => {}
            Err(error) => return Err(error).context("cannot lock the metadata of a batch's rows"),
        }
    }
}

fn is_lock_not_available(error: &tokio_postgres::Error) -> bool {
    error.code() == Some(&tokio_postgres::error::SqlState::LOCK_NOT_AVAILABLE)
}

/// A probe: a non-transactional message whose WAL position the capture reports once it has
/// read past it (and so past every transaction committed before it).
const PROBE_SQL: &str = "SELECT pg_logical_emit_message(false, $1, '')";

/// Writes a probe ([`PROBE_SQL`]); returns its WAL position.
pub(super) async fn probe(db: &impl GenericClient) -> Result<u64> {
    let lsn: PgLsn = db.query_one(PROBE_SQL, &[&PROBE_MESSAGE_PREFIX]).await?.try_get(0)?;
    Ok(u64::from(lsn))
}
