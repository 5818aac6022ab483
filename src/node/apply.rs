//! Apply: merges batches of one peer's changes into the database, one transaction per batch.
//!
//! Each apply connection is bound to the peer's replication origin, so that
//! - the batch's last sequence number is committed as the origin's position in the same
//!   transaction as the data: a crash cannot separate them (exactly once);
//! - the capture sees the Origin marker on these transactions and does not capture them again.
//!
//! A local write that committed but has not been captured yet must not be overwritten unseen
//! (PRODUCT.md invariant 8). Every row is locked and its `xmin` compared with the `known_xmin` the
//! capture or a merge recorded; when they differ, the batch is rolled back (releasing its locks,
//! so the capture is never blocked by it), and retried once the capture caught up.

use std::sync::Arc;
use std::time::Duration;

use accord_engine::{merge, Hlc, MergeOutcome, NodeId, ReviewItem, RowAction, RowChange, RowState};
use accord_schema_annotations::SchemaPolicy;
use anyhow::{bail, Context, Result};
use tokio::sync::watch;
use tokio_postgres::types::PgLsn;
use tokio_postgres::{Client, GenericClient};

use super::capture::{hlc_message, CaptureProgress, PROBE_MESSAGE_PREFIX};
use super::rows::{delete_row, insert_row, lock_row, update_row};
use super::store::{self, key_text, origin_name, HLC_MESSAGE_PREFIX};

/// How long a batch waits for the capture to account for local writes before giving up.
const CAPTURE_WAIT_LIMIT: Duration = Duration::from_secs(120);

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ApplySummary {
    pub applied: u64,
    pub parked: u64,
    pub conflicts: u64,
    /// Times the batch waited for the capture (a local write raced the merge).
    pub waits: u64,
}

pub struct Applier {
    db: Client,
    capture: watch::Receiver<CaptureProgress>,
    peer: NodeId,
    policy: Arc<SchemaPolicy>,
    synchronous_commit: bool,
    applied: u64,
}

/// Why a batch must wait and start over.
enum Retry {
    /// A row changed locally since accord last accounted for it.
    CaptureBehind,
    /// A row is missing here: a local insert and delete of its key may both still be on their way
    /// through the capture, and the row cannot be locked to tell. Wait until the capture read past
    /// the probe written at this WAL position.
    Probe(u64),
}

impl Applier {
    pub async fn connect(
        db: Client,
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
            capture,
            peer,
            policy,
            synchronous_commit,
            applied: position.map(u64::from).unwrap_or(0),
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

    /// The last of the peer's changes durably applied here.
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
        loop {
            if started.elapsed() > CAPTURE_WAIT_LIMIT {
                bail!(
                    "a batch from node {} waited {:?} for the capture to account for local writes; \
                     is the capture running?",
                    self.peer,
                    CAPTURE_WAIT_LIMIT
                );
            }
            match self.try_apply(&fresh, last, probed).await? {
                Ok(mut summary) => {
                    summary.waits = waits;
                    self.applied = last;
                    return Ok((last, summary));
                }
                Err(Retry::CaptureBehind) => {
                    waits += 1;
                    probed = false;
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_millis(50));
                }
                Err(Retry::Probe(lsn)) => {
                    waits += 1;
                    let reached =
                        tokio::time::timeout(CAPTURE_WAIT_LIMIT, self.capture.wait_for(|p| p.processed_lsn >= lsn))
                            .await;
                    if !matches!(reached, Ok(Ok(_))) {
                        bail!("the capture did not read past WAL position {lsn} (is it running?)");
                    }
                    probed = true;
                }
            }
        }
    }

    async fn try_apply(
        &mut self,
        changes: &[&RowChange],
        last: u64,
        probed: bool,
    ) -> Result<std::result::Result<ApplySummary, Retry>> {
        let policy = Arc::clone(&self.policy);
        let synchronous_commit = self.synchronous_commit;
        let mut tx = self.db.transaction().await?;
        if !synchronous_commit {
            tx.batch_execute("SET LOCAL synchronous_commit = off").await?;
        }
        tx.execute(
            "SELECT pg_replication_origin_xact_setup($1, now())",
            &[&PgLsn::from(last)],
        )
        .await?;
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
                store::open_item(&tx, &item, Some(change)).await?;
                summary.parked += 1;
                continue;
            };
            let key = key_text(&change.key);
            let savepoint = tx.savepoint("accord_change").await?;
            let row = lock_row(&savepoint, table, &change.key).await?;
            let meta = store::load_meta(&savepoint, &table.name, &key).await?;
            let local = match (row, meta) {
                (Some((xmin, values)), Some((meta, known))) if meta.is_alive() && known.as_deref() == Some(&xmin) => {
                    Some(RowState { meta, values })
                }
                (None, Some((meta, _))) if !meta.is_alive() && probed => Some(RowState {
                    meta,
                    values: Vec::new(),
                }),
                (None, None) if probed => None,
                (None, None) | (None, Some(_)) if !probed => {
                    // A row cannot be locked before it exists: ask the capture to read past now.
                    let lsn: PgLsn = savepoint
                        .query_one(
                            "SELECT pg_logical_emit_message(false, $1, '')",
                            &[&PROBE_MESSAGE_PREFIX],
                        )
                        .await?
                        .get(0);
                    return Ok(Err(Retry::Probe(u64::from(lsn))));
                }
                (row, meta) => {
                    tracing::debug!(
                        table = %table.name,
                        key,
                        xmin = row.as_ref().map(|r| r.0.as_str()),
                        known = meta.as_ref().and_then(|m| m.1.as_deref()),
                        alive = meta.as_ref().map(|m| m.0.is_alive()),
                        "a local write is not captured yet; waiting"
                    );
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
                            let writes: Vec<(usize, &accord_engine::Value)> =
                                writes.iter().map(|w| (w.column, &w.value)).collect();
                            update_row(&savepoint, table, &change.key, &writes).await.map(Some)
                        }
                        RowAction::Delete => delete_row(&savepoint, table, &change.key).await.map(|()| None),
                    };
                    match written {
                        Ok(xmin) => {
                            // A row this merge did not write keeps the xmin accord knew for it.
                            let known = match (&merged.action, xmin) {
                                (_, Some(x)) => Some(x),
                                (RowAction::Nothing, None) => store::load_meta(&savepoint, &table.name, &key)
                                    .await?
                                    .and_then(|(_, k)| k),
                                _ => None,
                            };
                            store::save_meta(&savepoint, &table.name, &key, &merged.state.meta, known.as_deref())
                                .await?;
                            store::apply_review(&savepoint, &merged.review).await?;
                            store::log_conflicts(&savepoint, &table.name, &key, &merged.conflicts).await?;
                            savepoint.commit().await?;
                            summary.applied += 1;
                            summary.conflicts += merged.conflicts.len() as u64;
                            greatest = greatest.max(Some(change.stamp));
                        }
                        Err(error) => {
                            savepoint.rollback().await?;
                            // A local insert of the same key that committed after the row was
                            // found missing: not a clash, a race with the capture.
                            if matches!(merged.action, RowAction::Insert(_))
                                && lock_row(&tx, table, &change.key).await?.is_some()
                                && store::load_meta(&tx, &table.name, &key)
                                    .await?
                                    .is_none_or(|(m, _)| !m.is_alive())
                            {
                                return Ok(Err(Retry::CaptureBehind));
                            }
                            // A constraint of this database refused the row: park it, go on.
                            park(&tx, change, &table.name, format!("{error:#}")).await?;
                            summary.parked += 1;
                        }
                    }
                }
                MergeOutcome::Parked { item, .. } => {
                    savepoint.rollback().await?;
                    store::open_item(&tx, &item, Some(change)).await?;
                    summary.parked += 1;
                }
                MergeOutcome::Deferred { missing } => {
                    savepoint.rollback().await?;
                    let error = format!(
                        "the row is new here but the change lacks the values of {} (unchanged TOAST relayed by \
                         another node); kept until the row's origin sends them",
                        missing.join(", ")
                    );
                    park(&tx, change, &table.name, error).await?;
                    summary.parked += 1;
                }
            }
        }
        if let Some(stamp) = greatest {
            // Tells the capture what this transaction merged: local writes after it get greater stamps.
            tx.execute(
                "SELECT pg_logical_emit_message(true, $1, $2)",
                &[&HLC_MESSAGE_PREFIX, &hlc_message(stamp)],
            )
            .await?;
        }
        tx.commit().await?;
        Ok(Ok(summary))
    }
}

async fn park(db: &impl GenericClient, change: &RowChange, table: &str, error: String) -> Result<()> {
    tracing::warn!(table, key = %key_text(&change.key), origin = %change.origin, seq = change.seq, %error, "change parked for review");
    let item = ReviewItem::unapplicable(table, &change.key, None, change.origin, change.stamp, change.seq, error);
    store::open_item(db, &item, Some(change)).await?;
    Ok(())
}
