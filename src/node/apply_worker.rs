//! A peer's applier and spooler, beside the replication loop: the applier applies what the
//! loop hands it (`engine::Handout`) with the `Applier`, retrying until it is applied, and
//! reports what may be acknowledged; the spooler keeps the parts of large transactions on disk
//! until they are complete.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use accord_engine::{
    transactions_before_waiting, AppliedPosition, ApplyError, Hlc, NodeId, RowChange, MAX_APPLY_BATCH,
};
use anyhow::Result;
use tokio::sync::{mpsc, oneshot};
use tokio::task::{JoinError, JoinHandle};
use tracing::Instrument;

use super::apply::{db_error, is_concurrency_rollback, Applier, ApplySummary};
use super::spool::Spool;
use super::tagging::replicated_policy;
use crate::pg_connection::connect;

/// What the loop hands a peer's applier.
pub enum ApplyWork {
    /// Whole transactions.
    Batch(Vec<RowChange>),
    /// A spooled transaction: its spool file, once the spooler has written all of it, and its
    /// end.
    Spooled {
        spool: oneshot::Receiver<Spool>,
        tail: Vec<RowChange>,
    },
}

/// What the loop hands a peer's spooler.
pub enum SpoolWork {
    /// A part of a large transaction, in order.
    Part(Vec<RowChange>),
    /// The transaction is complete: hand its file over.
    Seal(oneshot::Sender<Spool>),
}

/// What an applier reports of a batch.
pub struct Applied {
    pub peer: NodeId,
    pub result: Result<(u64, ApplySummary)>,
    /// Attempts of the batch that PostgreSQL rolled back for a concurrent transaction (a
    /// deadlock's victim, mostly), and were tried again.
    pub deadlocks: u64,
    /// The commit stamp of the batch's last change.
    pub last_stamp: Option<Hlc>,
    /// How far the peer's changes are applied on disk (see `Applier::durable`).
    pub durable: u64,
}

/// What an applier reports to the node's loop.
pub enum ApplyReport {
    /// A batch was applied (or failed for good).
    Batch(Applied),
    /// A flush that ran beside the batches learned that the peer's changes are on disk up to
    /// `durable`: what may be acknowledged moved without a batch.
    Durable { peer: NodeId, durable: u64 },
}

/// The engine's refusal of a batch that cannot be applied until this node's users act: a row
/// with no place here (`ApplyError::NoPlace`), or a change written under a shape of its table
/// this node cannot read yet (`ApplyError::ShapeWaits`).
fn no_place(error: &anyhow::Error) -> Option<&ApplyError> {
    error
        .chain()
        .find_map(|e| e.downcast_ref::<ApplyError>())
        .filter(|e| matches!(e, ApplyError::NoPlace { .. } | ApplyError::ShapeWaits { .. }))
}

/// A statement failed because a table is not as the applier read it: a column or table gone, or
/// a column's type changed (a row holds a value the type it read cannot).
fn stale_tables(error: &anyhow::Error) -> bool {
    use tokio_postgres::error::SqlState;
    let unreadable = error.chain().any(|e| {
        matches!(
            e.downcast_ref::<super::rows::RowError>(),
            Some(super::rows::RowError::Value { .. })
        )
    });
    unreadable
        || db_error(error).is_some_and(|db| {
            [
                SqlState::UNDEFINED_COLUMN,
                SqlState::UNDEFINED_TABLE,
                SqlState::DATATYPE_MISMATCH,
            ]
            .contains(db.code())
        })
}

/// The server's own words, without the client's framing.
fn db_message(error: &anyhow::Error) -> Option<String> {
    db_error(error).map(|db| db.message().to_owned())
}

/// What each peer's applier waits for, when it cannot go on until this node's users act.
pub type ApplyWaits = Arc<Mutex<BTreeMap<NodeId, String>>>;

/// A peer's applier with what applying its batches reports to.
struct ApplyWorker {
    applier: Applier,
    dsn: String,
    /// What may be acknowledged, and when to flush to learn it: `engine::AppliedPosition`.
    position: AppliedPosition,
    started: Instant,
    done: mpsc::Sender<ApplyReport>,
    waits: ApplyWaits,
    /// The flush under way (`AppliedPosition`): it runs beside the next batches, on the
    /// applier's second session, so that a batch never waits for the WAL flush of the one
    /// before (which took about as long as an idle batch's own statements).
    flushing: Option<JoinHandle<Result<u64>>>,
}

/// Applies a peer's work as it comes, in order, until the node stops.
pub async fn apply_worker(
    applier: Applier,
    dsn: String,
    mut work: mpsc::Receiver<ApplyWork>,
    done: mpsc::Sender<ApplyReport>,
    waits: ApplyWaits,
) {
    let mut worker = ApplyWorker {
        position: AppliedPosition::new(applier.applied(), None),
        applier,
        dsn,
        started: Instant::now(),
        done,
        waits,
        flushing: None,
    };
    let mut next: Option<ApplyWork> = None;
    loop {
        let item = match next.take() {
            Some(item) => item,
            None => match worker.next_work(&mut work).await {
                Some(item) => item,
                None => return,
            },
        };
        let mut batch = match item {
            ApplyWork::Spooled { spool, tail } => {
                // The spooler hands the file over once it has written the last part before it.
                let Ok(mut spool) = spool.await else { return };
                if !worker.apply_spooled(&mut spool, &tail, !work.is_empty()).await {
                    return;
                }
                continue;
            }
            ApplyWork::Batch(batch) => batch,
        };
        // What queued up behind it goes into the same transaction: a node that fell behind
        // catches up in large batches, paying the per-batch costs (a commit, a wait for the
        // capture) once per batch rather than once per small message.
        while let Ok(following) = work.try_recv() {
            let ApplyWork::Batch(following) = following else {
                next = Some(following);
                break;
            };
            if let Err(following) = join_batches(&mut batch, following) {
                if !worker.apply_batch(&batch, true).await {
                    return;
                }
                batch = following;
            }
        }
        let more = next.is_some() || !work.is_empty();
        if !worker.apply_batch(&batch, more).await {
            return;
        }
    }
}

/// Writes the parts of a peer's large transactions to spool files as they arrive, beside the
/// applier, so that a busy applier does not hold them in memory; hands each file over when its
/// transaction is complete. A write that fails (a full disk) is tried again until it succeeds:
/// nothing of a transaction may be dropped, and the peer resends it only after a reconnect.
pub async fn spooler(peer: NodeId, mut work: mpsc::Receiver<SpoolWork>, dir: Option<PathBuf>) {
    let mut current: Option<Spool> = None;
    while let Some(item) = work.recv().await {
        match item {
            SpoolWork::Part(changes) => loop {
                let written = match &mut current {
                    Some(spool) => spool.append(&changes).await,
                    None => Spool::create(dir.as_deref()).map(|spool| {
                        current = Some(spool);
                    }),
                };
                match written {
                    Ok(()) if current.as_ref().is_some_and(|s| !s.is_empty()) => break,
                    Ok(()) => continue, // created; now the part
                    Err(error) => {
                        tracing::error!(%peer, error = format!("{error:#}"), "cannot spool a large transaction; retrying");
                        if work.is_closed() {
                            return;
                        }
                        tokio::time::sleep(Duration::from_secs(1)).await;
                    }
                }
            },
            SpoolWork::Seal(reply) => {
                let spool = match current.take() {
                    Some(spool) => spool,
                    None => match Spool::create(dir.as_deref()) {
                        Ok(spool) => spool,
                        Err(error) => {
                            tracing::error!(%peer, error = format!("{error:#}"), "cannot create a spool file");
                            return;
                        }
                    },
                };
                let _ = reply.send(spool);
            }
        }
    }
}

/// Appends `next` to `batch` when it continues it and the two fit in one apply transaction;
/// otherwise hands `next` back. Both hold whole transactions (`ApplyQueue`), and a batch of one
/// transaction may be larger.
fn join_batches(batch: &mut Vec<RowChange>, next: Vec<RowChange>) -> std::result::Result<(), Vec<RowChange>> {
    let continues = match (batch.last(), next.first()) {
        (Some(last), Some(first)) => first.seq == last.seq + 1,
        _ => true,
    };
    if !continues || batch.len() + next.len() > MAX_APPLY_BATCH {
        return Err(next);
    }
    batch.extend(next);
    Ok(())
}

impl ApplyWorker {
    fn now(&self) -> u64 {
        u64::try_from(self.started.elapsed().as_micros()).unwrap_or(u64::MAX)
    }

    /// The next work, reporting what the flush under way learns while none arrives; `None`
    /// when the node is stopping.
    async fn next_work(&mut self, work: &mut mpsc::Receiver<ApplyWork>) -> Option<ApplyWork> {
        loop {
            let Some(flushing) = self.flushing.as_mut() else {
                return work.recv().await;
            };
            tokio::select! {
                item = work.recv() => return item,
                outcome = flushing => {
                    self.flushing = None;
                    self.flush_ended(outcome);
                    let report = ApplyReport::Durable {
                        peer: self.applier.peer(),
                        durable: self.position.acknowledgeable(),
                    };
                    if self.done.send(report).await.is_err() {
                        return None;
                    }
                }
            }
        }
    }

    /// Starts the flush `AppliedPosition::committed` called for.
    fn start_flush(&mut self) {
        match self.applier.durable_flush() {
            Some(flush) => self.flushing = Some(tokio::spawn(flush)),
            None => {
                // Synchronous commits: what committed is on disk. (No flush was under way, so
                // none is called for again.)
                let (applied, now) = (self.applier.applied(), self.now());
                self.position.flushed(applied, now);
            }
        }
    }

    /// Takes what the flush under way learned, and starts the next one if a batch called for it.
    fn flush_ended(&mut self, outcome: std::result::Result<Result<u64>, JoinError>) {
        let peer = self.applier.peer();
        match outcome.map_err(anyhow::Error::new).and_then(|flushed| flushed) {
            Ok(durable) => {
                if self.position.flushed(durable, self.now()) {
                    self.start_flush();
                }
            }
            Err(error) => {
                tracing::warn!(%peer, error = format!("{error:#}"), "cannot flush");
                self.position.flush_failed();
            }
        }
    }

    /// Takes the flush under way if it has ended (while a batch was applied).
    async fn flush_if_ended(&mut self) {
        if let Some(flushing) = self.flushing.take_if(|f| f.is_finished()) {
            self.flush_ended(flushing.await);
        }
    }

    /// Applies the spooled transaction that `tail` ends.
    async fn apply_spooled(&mut self, spool: &mut Spool, tail: &[RowChange], more: bool) -> bool {
        tracing::info!(
            peer = %self.applier.peer(),
            changes = spool.changes() + tail.len() as u64,
            spooled_bytes = spool.bytes(),
            "applying a spooled transaction"
        );
        loop {
            match self.apply_work(Work::Spooled { spool, tail }, more).await {
                Attempt::Applied => return true,
                Attempt::Stopping => return false,
                // One transaction never splits: tried again as it is.
                Attempt::OneWaits { .. } => continue,
            }
        }
    }

    /// Applies one batch, retrying (on a new connection when needed) until it is applied, and
    /// reports it with what may be acknowledged. `more`: further batches are queued (a busy applier
    /// flushes to learn its durable position less often). `false` when the node is stopping.
    ///
    /// When one of its transactions cannot be applied here yet, those before it are applied
    /// together, it waits alone, and those after it go on together again: applied one at a
    /// time, the rest of a long batch took a transaction (and a capture wait) each, and a node
    /// that had waited for a migration fell minutes behind its peer (the rolling-migration test).
    async fn apply_batch(&mut self, batch: &[RowChange], more: bool) -> bool {
        let mut rest = batch;
        let mut take = rest.len();
        loop {
            let (now, after) = rest.split_at(take);
            match self.apply_work(Work::Batch(now), more || !after.is_empty()).await {
                Attempt::Applied if after.is_empty() => return true,
                Attempt::Applied => {
                    rest = after;
                    take = rest.len();
                }
                Attempt::Stopping => return false,
                // Only for more than one transaction: `take` shrinks, down to one at worst.
                Attempt::OneWaits { seq } => take = transactions_before_waiting(now, seq),
            }
        }
    }

    async fn apply_work(&mut self, mut work: Work<'_>, more: bool) -> Attempt {
        let batch = work.changes();
        let dsn = self.dsn.clone();
        let peer = self.applier.peer();
        let mut deadlocks = 0;
        let mut waiting_since: Option<Instant> = None;
        // The applier read the tables again for this batch: what fails now is not its stale view.
        let mut reread = false;
        loop {
            let span = tracing::debug_span!(
                "batch",
                first = batch.first().map(|c| c.seq),
                last = batch.last().map(|c| c.seq),
                changes = batch.len()
            );
            let result = match &mut work {
                Work::Batch(batch) => self.applier.apply(batch).instrument(span).await,
                Work::Spooled { spool, tail } => self.applier.apply_spooled(spool, tail).instrument(span).await,
            };
            match result {
                Ok(ok) => {
                    if waiting_since.is_some() {
                        self.waits.lock().unwrap_or_else(|p| p.into_inner()).remove(&peer);
                        tracing::info!(%peer, "the transaction that waited is applied");
                    }
                    self.flush_if_ended().await;
                    if self.position.committed(ok.0, more, self.now()) {
                        self.start_flush();
                    }
                    let applied = ApplyReport::Batch(Applied {
                        peer,
                        result: Ok(ok),
                        deadlocks,
                        last_stamp: batch.last().map(|c| c.stamp),
                        durable: self.position.acknowledgeable(),
                    });
                    return if self.done.send(applied).await.is_ok() {
                        Attempt::Applied
                    } else {
                        Attempt::Stopping
                    };
                }
                Err(error)
                    if !reread
                        && (stale_tables(&error)
                            || matches!(no_place(&error), Some(ApplyError::ShapeWaits { .. }))) =>
                {
                    // A migration here changed a table since this applier read it (issue 17).
                    let why = db_message(&error).unwrap_or_else(|| format!("{error:#}"));
                    tracing::info!(%peer, why, "a replicated table changed here; reading the tables again");
                    reread = true;
                    reconnect(&mut self.applier, &dsn).await;
                }
                Err(error) if is_concurrency_rollback(&error) => {
                    // A local transaction locked the batch's rows (or a migration its table) in
                    // another order, and PostgreSQL rolled the batch back to let it through.
                    // Nothing is wrong with the session: try again on it after a moment, once
                    // the local transaction has moved on.
                    deadlocks += 1;
                    // The server's message alone: its "ERROR:" prefix would read as accord's.
                    let why = db_message(&error).unwrap_or_else(|| format!("{error:#}"));
                    tracing::info!(%peer, attempt = deadlocks, why, "a batch met a local transaction in a deadlock; trying it again");
                    match self.applier.abandon_attempt().await {
                        Ok(()) => tokio::time::sleep(Duration::from_millis(20 * deadlocks.min(25))).await,
                        Err(error) => {
                            tracing::warn!(%peer, error = format!("{error:#}"), "reconnecting the applier");
                            reconnect(&mut self.applier, &dsn).await;
                        }
                    }
                }
                Err(error)
                    if no_place(&error).is_some()
                        && matches!(work, Work::Batch(_))
                        && batch.iter().filter(|c| c.ends_transaction()).count() > 1 =>
                {
                    // One of its transactions cannot be applied here yet (`apply_batch`).
                    if let Err(error) = self.applier.abandon_attempt().await {
                        tracing::warn!(%peer, error = format!("{error:#}"), "reconnecting the applier");
                        reconnect(&mut self.applier, &dsn).await;
                    }
                    let seq = match no_place(&error) {
                        Some(ApplyError::ShapeWaits { seq, .. }) => *seq,
                        _ => None,
                    };
                    return Attempt::OneWaits { seq };
                }
                Err(error) if no_place(&error).is_some() => {
                    let why = no_place(&error).map(ToString::to_string).unwrap_or_default();
                    // Said when it starts and every minute after, not on every attempt.
                    if waiting_since.is_none_or(|since| since.elapsed() >= Duration::from_secs(60)) {
                        tracing::warn!(%peer, why, "a transaction from the peer waits on this node");
                        waiting_since = Some(Instant::now());
                    }
                    self.waits.lock().unwrap_or_else(|p| p.into_inner()).insert(peer, why);
                    if matches!(no_place(&error), Some(ApplyError::ShapeWaits { .. })) {
                        // Until this node's tables are migrated too: the applier reads them
                        // again each time, on a new session that takes the origin over.
                        tokio::time::sleep(Duration::from_secs(1)).await;
                        reconnect(&mut self.applier, &dsn).await;
                        continue;
                    }
                    match self.applier.abandon_attempt().await {
                        Ok(()) => tokio::time::sleep(Duration::from_secs(1)).await,
                        Err(error) => {
                            tracing::warn!(%peer, error = format!("{error:#}"), "reconnecting the applier");
                            reconnect(&mut self.applier, &dsn).await;
                        }
                    }
                }
                Err(error) => {
                    tracing::error!(%peer, error = format!("{error:#}"), "applying a batch failed; retrying");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    // The connection may be what failed: start over on a new one.
                    reconnect(&mut self.applier, &dsn).await;
                }
            }
        }
    }
}

/// How an attempt to apply a batch ended.
enum Attempt {
    Applied,
    /// The node is stopping.
    Stopping,
    /// One of the batch's transactions cannot be applied here yet: the one holding change
    /// `seq`, when the engine could tell (a change written under a shape this node cannot read),
    /// or any (a row with no place here).
    OneWaits {
        seq: Option<u64>,
    },
}

/// What an apply worker applies: a batch of whole transactions, or a spooled transaction with
/// its end.
enum Work<'a> {
    Batch(&'a [RowChange]),
    Spooled {
        spool: &'a mut Spool,
        tail: &'a [RowChange],
    },
}

impl<'a> Work<'a> {
    /// The changes in memory (for a spooled transaction, its end).
    fn changes(&self) -> &'a [RowChange] {
        match self {
            Work::Batch(batch) => batch,
            Work::Spooled { tail, .. } => tail,
        }
    }
}

/// Replaces the applier by one on new connections, with the replicated tables as the catalog has
/// them now (a migration may have changed them: issue 17). The old session lets go of the peer's
/// replication origin first, or the new one could not take it while the old lives; if the new
/// one cannot be made, the old one binds it again and stays.
async fn reconnect(applier: &mut Applier, dsn: &str) {
    let peer = applier.peer();
    if !applier.release_origin().await {
        // The old session is broken: its backend lets go of the origin when it ends.
        replace(applier, dsn).await;
        return;
    }
    if !replace(applier, dsn).await {
        if let Err(error) = applier.rebind_origin().await {
            tracing::warn!(%peer, error = format!("{error:#}"), "the old applier lost its origin; replacing it");
            replace(applier, dsn).await;
        }
    }
}

/// [`reconnect`]'s replacement; `false` if it could not be made (the applier is left as it was).
async fn replace(applier: &mut Applier, dsn: &str) -> bool {
    let peer = applier.peer();
    let fresh = async {
        let mut db = connect(dsn).await?;
        let policy = match replicated_policy(&mut db).await {
            Ok(policy) if !policy.is_empty() => Arc::new(policy),
            Ok(_) => applier.policy(),
            Err(error) => {
                tracing::warn!(%peer, error = format!("{error:#}"), "cannot read the annotations again; keeping them");
                applier.policy()
            }
        };
        Applier::connect(
            db,
            connect(dsn).await?,
            applier.capture(),
            applier.ledger(),
            peer,
            policy,
            applier.synchronous_commit(),
        )
        .await
    }
    .await;
    match fresh {
        Ok(mut fresh) => {
            fresh.follow_collection(applier.collection());
            fresh.follow_shapes(applier.shapes());
            fresh.follow_left(applier.left());
            *applier = fresh;
            true
        }
        Err(error) => {
            tracing::error!(%peer, error = format!("{error:#}"), "cannot reconnect the applier");
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use accord_engine::{ChangeKind, RowKey, RowState, Value};

    use super::*;

    fn batch(seqs: std::ops::RangeInclusive<u64>) -> Vec<RowChange> {
        seqs.map(|seq| RowChange {
            shape: None,
            table: "s.t".into(),
            key: RowKey(vec![Value::Int(seq as i64)]),
            kind: ChangeKind::Delete,
            origin: NodeId(2),
            stamp: Hlc::new(1_000 + seq, 0, NodeId(2)),
            seq,
            tx_last: seq,
            builds_on: Vec::new(),
            row: RowState::absent(),
            closures: Vec::new(),
        })
        .collect()
    }

    fn seqs(batch: &[RowChange]) -> Vec<u64> {
        batch.iter().map(|c| c.seq).collect()
    }

    #[test]
    fn queued_batches_join_only_when_they_continue_and_fit() {
        let mut joined = batch(1..=3);
        assert!(join_batches(&mut joined, batch(4..=5)).is_ok());
        assert_eq!(seqs(&joined), [1, 2, 3, 4, 5]);

        // A resend after a reconnect overlaps: applied on its own, where the applier skips
        // what it applied already.
        let back = join_batches(&mut joined, batch(5..=6)).expect_err("an overlapping batch stays apart");
        assert_eq!(seqs(&back), [5, 6]);
        assert!(join_batches(&mut joined, batch(7..=7)).is_err(), "a gap stays apart");

        let mut big = batch(1..=MAX_APPLY_BATCH as u64 - 1);
        assert!(join_batches(&mut big, batch(MAX_APPLY_BATCH as u64..=MAX_APPLY_BATCH as u64)).is_ok());
        assert!(
            join_batches(&mut big, batch(MAX_APPLY_BATCH as u64 + 1..=MAX_APPLY_BATCH as u64 + 1)).is_err(),
            "a full batch takes no more"
        );
        assert_eq!(big.len(), MAX_APPLY_BATCH);
    }
}
