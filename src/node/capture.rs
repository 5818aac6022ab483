//! The capture: streams the database's committed changes from the logical slot, turns local ones
//! into stamped changes with the engine's `Capturer`, and writes them with their metadata and the
//! capture checkpoint in one transaction, before the slot may move on.
//!
//! Transactions are written in groups: what the stream has ready (up to a size and an age) goes to
//! the database in one transaction with a few multi-row statements. The engine still sees every
//! decoded transaction on its own and in order (stamps, sequence numbers, merged clocks, skipped
//! peers' transactions); only the writes are grouped, and the checkpoint written with a group
//! covers its last transaction, so a restart resumes right after the last group written.
//!
//! A local transaction larger than [`PART_ROWS`] rows is captured in parts as it is decoded, so
//! that memory stays bounded whatever its size: each part is captured and written as it fills, all
//! in one database transaction that commits with the checkpoint after the last part. Until then
//! nothing of it is visible (the senders read the outbound log up to the published head), and a
//! failure rolls all of it back; the slot replays it.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use accord_engine::{
    CaptureCheckpoint, CapturedChange, CapturedRow, Capturer, Cell, ChangeKind, DecodedRow, DecodedTransaction, Hlc,
    NodeId, ReviewItemId, RowKey, RowMeta, ShapeBook, ShapeId, StableCut, TableDef, TransactionPart, Truncate,
};
use accord_schema_annotations::SchemaPolicy;
use anyhow::{anyhow, bail, Context, Result};
use pgwire_replication::{Lsn, ReplicationClient, ReplicationConfig, ReplicationEvent, TlsConfig};
use tokio::sync::watch;
use tokio_postgres::Client;

use super::pgoutput::{decode, PgOutput, Relation, TupleValue};
use super::pipeline::{self, Params, Statements};
use super::recent_changes::SharedRecentChanges;
use super::rows::parse_cell;
use super::store::{self, decode as decode_stored, encode, key_text, MetaRows, HLC_MESSAGE_PREFIX, PUBLICATION, SLOT};
use super::tagging::published_policy;
use super::truncate;
use crate::pg_connection::{self, connect, redact, Dsn, ReplicationEndpoint};

/// Microseconds from the Unix epoch to PostgreSQL's (2000-01-01).
const PG_EPOCH_OFFSET_MICROS: i64 = 946_684_800_000_000;

/// The text a merge writes into the WAL: the greatest stamp it merged, then what the merged
/// changes built on (`ApplyCommand::Commit`), as `physical:logical:node[ peer=seq...]`.
pub fn hlc_message(stamp: Hlc, builds_on: &[(NodeId, u64)]) -> String {
    let mut text = format!("{}:{}:{}", stamp.physical, stamp.logical, stamp.node.0);
    for (peer, seq) in builds_on {
        text.push_str(&format!(" {}={seq}", peer.0));
    }
    text
}

/// Reads [`hlc_message`]'s text (messages of earlier versions carry only the stamp).
pub fn parse_hlc_message(text: &str) -> Option<(Hlc, Vec<(NodeId, u64)>)> {
    let mut words = text.split(' ');
    let mut parts = words.next()?.split(':');
    let physical = parts.next()?.parse().ok()?;
    let logical = parts.next()?.parse().ok()?;
    let node = parts.next()?.parse().ok()?;
    if parts.next().is_some() {
        return None;
    }
    let builds_on = words
        .map(|word| {
            let (peer, seq) = word.split_once('=')?;
            Some((NodeId(peer.parse().ok()?), seq.parse().ok()?))
        })
        .collect::<Option<Vec<_>>>()?;
    Some((Hlc::new(physical, logical, NodeId(node)), builds_on))
}

/// How far the capture has got, for the rest of the node.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CaptureProgress {
    /// The last sequence number in the outbound log.
    pub head: u64,
    /// Local row changes captured since start.
    pub captured: u64,
    /// Every transaction committed before this WAL position has been dealt with (captured, or
    /// skipped as a peer's). Probes (`PROBE_MESSAGE_PREFIX`) move it on when nothing else does.
    pub processed_lsn: u64,
    /// New shapes of tables the capture recorded since start (`accord.shapes`): peers are told
    /// them before any batch that could name them.
    pub shapes: u64,
}

/// A non-transactional logical-decoding message an applier writes to learn when the capture has
/// read everything committed before it.
pub const PROBE_MESSAGE_PREFIX: &str = "accord.probe";

/// A transactional logical-decoding message that makes the capture persist its checkpoint when
/// it reaches the message's transaction, although the transaction changes nothing: a process
/// outside the node (`accord join`) reads `accord.capture_state.covered_lsn` to learn that the
/// capture has accounted for everything committed before its marker.
pub const MARK_MESSAGE_PREFIX: &str = "accord.mark";

/// A replication-protocol connection configuration from a libpq-style DSN, reaching the server
/// through `endpoint` (the server itself, or a TLS tunnel to it).
pub fn replication_config(dsn: &Dsn, endpoint: &ReplicationEndpoint) -> ReplicationConfig {
    let user = dsn.config.get_user().unwrap_or("postgres").to_owned();
    let password = dsn
        .config
        .get_password()
        .map(|p| String::from_utf8_lossy(p).into_owned())
        .unwrap_or_default();
    let dbname = dsn.config.get_dbname().unwrap_or(&user).to_owned();
    ReplicationConfig::new(endpoint.host.clone(), user, password, dbname, SLOT, PUBLICATION)
        .with_port(endpoint.port)
        // TLS, when asked for, is the endpoint's (see `pg_connection::replication_endpoint`).
        .with_tls(TlsConfig::disabled())
        .with_status_interval(std::time::Duration::from_millis(200))
        // Decoded text must not depend on the server's settings: the same value must read the same
        // on every node.
        .with_options("-c datestyle=ISO,YMD -c intervalstyle=iso_8601 -c timezone=UTC -c extra_float_digits=3")
        .with_application_name("accord-capture")
}

/// Starts streaming from the slot, over TLS when the DSN asks for it.
async fn start_stream(dsn: &str) -> Result<ReplicationClient> {
    let parsed = Dsn::parse(dsn).with_context(|| format!("cannot use the connection string ({})", redact(dsn)))?;
    let endpoint = pg_connection::replication_endpoint(&parsed).await.with_context(|| {
        format!(
            "cannot open the replication connection ({}{})",
            redact(dsn),
            pg_connection::tls_note(&parsed.tls)
        )
    })?;
    ReplicationClient::connect(replication_config(&parsed, &endpoint))
        .await
        .context("cannot start streaming from the replication slot")
}

/// A transaction being decoded.
#[derive(Default)]
struct Transaction {
    final_lsn: u64,
    xid: u32,
    commit_time: u64,
    from_peer: bool,
    /// The peer whose changes it applied with its origin position (the last of them), and what
    /// they built on (from the `accord.hlc` message).
    peer_applied: Vec<(NodeId, u64)>,
    merged: Option<Hlc>,
    rows: Vec<PgOutput>,
    /// TRUNCATEs, each with how many of `rows` came before it and the relations it emptied.
    truncates: Vec<(usize, Vec<u32>)>,
    /// Review items its rows so far resolved (carried from part to part).
    resolving: Vec<ReviewItemId>,
    /// Parts of it written so far (see [`PART_ROWS`]).
    parts: u32,
    /// It carries a [`MARK_MESSAGE_PREFIX`] message.
    marked: bool,
}

/// A local transaction with more rows than this is captured in parts as it is decoded.
const PART_ROWS: usize = 10_000;

/// A transaction being captured in parts, in the database transaction its first part opened.
#[derive(Default)]
struct OpenParts {
    /// The last change captured so far, written with the next part: if the last part makes no
    /// change of its own, this one is marked as the transaction's last.
    held: Option<CapturedRow>,
    /// Changes written so far.
    captured: u64,
}

/// Decoded transactions written to the database together, in one transaction: the changes of
/// many small transactions cost one round trip per statement kind, not per row.
#[derive(Default)]
struct Group {
    transactions: Vec<DecodedTransaction>,
    rows: usize,
    /// The end of the last commit seen: where the slot may move once the group is written.
    end_lsn: Option<Lsn>,
    /// Everything committed before this WAL position is in the group or was written before it:
    /// the group's last commit, or a later probe.
    processed_lsn: u64,
    started: Option<Instant>,
    /// A transaction of the group carries a mark: the checkpoint is written even if nothing else is.
    marked: bool,
}

/// A group is written once no further event is ready on the stream, or at these sizes, or at
/// this age (so that a stream that never pauses is still written in bounded steps).
const GROUP_TRANSACTIONS: usize = 2_000;
const GROUP_ROWS: usize = 5_000;
const GROUP_AGE: Duration = Duration::from_millis(100);

impl Group {
    fn is_empty(&self) -> bool {
        self.transactions.is_empty() && self.end_lsn.is_none() && self.processed_lsn == 0
    }

    fn is_full(&self) -> bool {
        self.transactions.len() >= GROUP_TRANSACTIONS
            || self.rows >= GROUP_ROWS
            || self.started.is_some_and(|t| t.elapsed() >= GROUP_AGE)
    }
}

pub struct Capture {
    db: Client,
    policy: Arc<SchemaPolicy>,
    capturer: Capturer,
    relations: BTreeMap<u32, Relation>,
    progress: watch::Sender<CaptureProgress>,
    /// Prepared statements of `db`.
    statements: Statements,
    max_offset_micros: u64,
    /// The latest completed tombstone-collection round: a local insert of a key whose tombstone
    /// it covers is numbered as a new key's, as on a node that already dropped the tombstone.
    cut: watch::Receiver<Option<StableCut>>,
    /// The shapes the node knows: stored metadata is read as its table has it now.
    shapes: watch::Receiver<Arc<ShapeBook>>,
    /// `db` has a transaction open (a group's or a large transaction's parts): rolled back if
    /// the run ends before it commits.
    in_transaction: bool,
    parts: Option<OpenParts>,
    /// What it committed last, for the sender (`recent_changes`), if one reads it.
    recent: Option<SharedRecentChanges>,
}

/// The capture checkpoint the database holds.
async fn load_checkpoint(db: &Client) -> Result<CaptureCheckpoint> {
    let row = db
        .query_one("SELECT checkpoint FROM accord.capture_state", &[])
        .await
        .context("cannot read the capture state: was `accord init` run on this database?")?;
    Ok(decode_stored("capture checkpoint", row.try_get::<_, &[u8]>(0)?)?)
}

impl Capture {
    pub async fn new(
        db: Client,
        policy: Arc<SchemaPolicy>,
        node: NodeId,
        max_offset_micros: u64,
    ) -> Result<(Capture, watch::Receiver<CaptureProgress>)> {
        db.batch_execute(pipeline::PLAN_ONCE_SQL)
            .await
            .context("cannot set the capture session's plan cache mode")?;
        let checkpoint = load_checkpoint(&db).await?;
        if checkpoint.high_water.node != node {
            bail!(
                "this database was initialised as node {}, not node {node}",
                checkpoint.high_water.node
            );
        }
        let capturer = Capturer::restore(checkpoint, max_offset_micros);
        let (progress, rx) = watch::channel(CaptureProgress {
            head: checkpoint.last_seq,
            captured: 0,
            processed_lsn: 0,
            shapes: 0,
        });
        Ok((
            Capture {
                db,
                policy,
                capturer,
                relations: BTreeMap::new(),
                progress,
                statements: Statements::default(),
                max_offset_micros,
                cut: watch::channel(None).1,
                shapes: watch::channel(Arc::new(ShapeBook::default())).1,
                in_transaction: false,
                parts: None,
                recent: None,
            },
            rx,
        ))
    }

    /// Keeps the changes it commits in `recent` for the sender.
    pub fn keep_recent(&mut self, recent: SharedRecentChanges) {
        self.recent = Some(recent);
    }

    /// Follows the node's tombstone collection (see the `cut` field).
    pub fn follow_collection(&mut self, cut: watch::Receiver<Option<StableCut>>) {
        self.cut = cut;
    }

    /// A replicated table's columns changed (an `ALTER TABLE` the stream has reached): captures
    /// it under its new shape from here on, its columns as the stream decodes them, their types
    /// and policies as the catalog has them now (for a column dropped since, as the old shape
    /// had it). The shape is recorded before any change names it; peers are told it before such a
    /// change reaches them (`runtime`).
    async fn follow_shape(&mut self, rel: &Relation) -> Result<()> {
        let name = rel.qualified_name();
        let catalog = published_policy(&mut self.db)
            .await
            .with_context(|| format!("cannot read the annotations of {name}, which changed"))?;
        let Some(old) = self.policy.table(&name).cloned() else {
            return self.follow_new_table(&catalog, rel).await;
        };
        let Some(now) = catalog.table(&name) else {
            bail!(
                "table {name} is no longer tagged `@accord replicate`: a table leaving replication while the node \
                 runs is not supported yet; tag it again"
            );
        };
        let known = Arc::clone(&self.shapes.borrow());
        let earlier: Vec<&TableDef> = std::iter::once(&old)
            .chain(known.shapes().filter(|t| t.name == name))
            .collect();
        let def = self.capture_under(shape_as_decoded(rel, now, &earlier)?).await?;
        let added: Vec<&str> = def
            .columns
            .iter()
            .filter(|c| old.column_index(&c.name).is_none())
            .map(|c| c.name.as_str())
            .collect();
        let dropped: Vec<&str> = old
            .columns
            .iter()
            .filter(|c| def.column_index(&c.name).is_none())
            .map(|c| c.name.as_str())
            .collect();
        tracing::info!(
            table = name,
            shape = %def.shape_id(),
            added = added.join(", "),
            dropped = dropped.join(", "),
            "a replicated table changed; capturing it under its new shape"
        );
        Ok(())
    }

    /// Whether a column's type as the stream decodes it is not the one the capture holds (an
    /// `ALTER COLUMN ... TYPE` the capture has not followed, also across its restarts).
    async fn types_differ(&self, table: &TableDef, rel: &Relation) -> Result<bool> {
        let oids: Vec<u32> = rel.columns.iter().map(|c| c.type_oid).collect();
        let mods: Vec<i32> = rel.columns.iter().map(|c| c.type_modifier).collect();
        let rows = self
            .db
            .query(
                "SELECT pg_catalog.format_type(t, m) FROM unnest($1::oid[], $2::int4[]) WITH ORDINALITY AS u(t, m, i)
                  ORDER BY i",
                &[&oids, &mods],
            )
            .await
            .with_context(|| format!("cannot read the column types of {}", table.name))?;
        Ok(rel.columns.iter().zip(&rows).any(|(column, row)| {
            let decoded = accord_schema_annotations::column_type(row.get(0));
            let held = table
                .key
                .iter()
                .find(|k| k.name == column.name)
                .map(|k| &k.ty)
                .or_else(|| table.columns.iter().find(|c| c.name == column.name).map(|c| &c.ty));
            held.is_some_and(|ty| *ty != decoded)
        }))
    }

    /// Captures `decoded`'s table under that shape from here on (in place of the table's shape
    /// before, if any), recorded as the policy holds it (its columns in canonical order: the
    /// shape changes name) before any change names it, and tells the node.
    async fn capture_under(&mut self, decoded: TableDef) -> Result<TableDef> {
        let name = decoded.name.clone();
        let mut tables: Vec<TableDef> = self
            .policy
            .tables()
            .iter()
            .filter(|t| t.name != name)
            .cloned()
            .collect();
        tables.push(decoded);
        self.policy = Arc::new(SchemaPolicy::new(tables).with_context(|| format!("the shape of {name}"))?);
        let def = self
            .policy
            .table(&name)
            .with_context(|| format!("{name} is not in the capture's policy"))?
            .clone();
        super::shapes::record(&self.db, &def, true)
            .await
            .with_context(|| format!("cannot record the shape of {name}"))?;
        self.progress.send_modify(|p| p.shapes += 1);
        Ok(def)
    }

    /// A table taken into replication while the node runs (`tagging`): captured from its first
    /// change on, under its shape as the catalog has it.
    async fn follow_new_table(&mut self, catalog: &SchemaPolicy, rel: &Relation) -> Result<()> {
        let name = rel.qualified_name();
        let Some(now) = catalog.table(&name) else {
            // Not a replicated table: a partition of one (decoded as its root's changes), or a
            // table the publication still holds but no longer tagged (the node warns of it).
            return Ok(());
        };
        let def = self.capture_under(shape_as_decoded(rel, now, &[])?).await?;
        tracing::info!(table = name, shape = %def.shape_id(), "capturing a table taken into replication");
        Ok(())
    }

    /// Follows the shapes the node knows.
    pub fn follow_shapes(&mut self, shapes: watch::Receiver<Arc<ShapeBook>>) {
        self.shapes = shapes;
    }

    /// Streams until the stream ends or fails; the caller restarts it.
    pub async fn run(&mut self, dsn: &str) -> Result<()> {
        if self.db.is_closed() {
            // The server restarted or the connection broke: a new one, with its own statements.
            self.db = connect(dsn).await?;
            self.statements = Statements::default();
            self.in_transaction = false;
        }
        if std::mem::take(&mut self.in_transaction) {
            // What a failed run wrote is replayed from the slot.
            self.db
                .batch_execute("ROLLBACK")
                .await
                .context("cannot roll back the capture's unfinished transaction")?;
        }
        self.parts = None;
        // Resume from what the database holds. After a failed write (even one whose commit did
        // reach the server) the capturer may differ from it; the stream resumes from the slot,
        // which never moves past what the database holds either.
        let checkpoint = load_checkpoint(&self.db).await?;
        self.capturer = Capturer::restore(checkpoint, self.max_offset_micros);
        self.capturer.applied_before(store::applied_positions(&self.db).await?);
        // The checkpoint is not written for a group that only merged: the merges' own records.
        self.capturer.merged_before(store::recorded_merges(&self.db).await?);
        // A joined node's rows may hold more than its origins' positions: what the copy read.
        self.capturer
            .applied_before(super::join::copied_claims(&self.db).await?);
        self.progress.send_if_modified(|p| {
            let changed = p.head != checkpoint.last_seq;
            p.head = checkpoint.last_seq;
            changed
        });
        let mut stream = start_stream(dsn).await?;
        let mut tx: Option<Transaction> = None;
        let mut group = Group::default();
        loop {
            let event = if group.is_empty() {
                stream.recv().await
            } else if group.is_full() || !stream.is_running() {
                // (A stream whose worker ended is read to its end without racing the worker's
                // exit: a receive abandoned while it collects the worker's result loses it.)
                self.flush(&stream, &mut group).await?;
                continue;
            } else {
                // The receive is cancel-safe: an event not ready now stays queued.
                tokio::select! {
                    biased;
                    event = stream.recv() => event,
                    () = std::future::ready(()) => {
                        self.flush(&stream, &mut group).await?;
                        continue;
                    }
                }
            };
            let Some(event) = event.context("replication stream failed")? else {
                break;
            };
            match event {
                ReplicationEvent::Begin {
                    final_lsn,
                    xid,
                    commit_time_micros,
                } => {
                    tx = Some(Transaction {
                        final_lsn: final_lsn.as_u64(),
                        xid,
                        commit_time: u64::try_from(commit_time_micros + PG_EPOCH_OFFSET_MICROS).unwrap_or(0),
                        ..Transaction::default()
                    });
                }
                ReplicationEvent::XLogData { data, .. } => {
                    let message = decode(&data).context("malformed pgoutput message")?;
                    match message {
                        PgOutput::Relation(r) => {
                            let name = r.qualified_name();
                            let retyped = self.relations.get(&r.id).is_some_and(|before| {
                                let types = |rel: &Relation| -> Vec<(String, u32, i32)> {
                                    rel.columns
                                        .iter()
                                        .map(|c| (c.name.clone(), c.type_oid, c.type_modifier))
                                        .collect()
                                };
                                types(before) != types(&r)
                            });
                            let changed = match self.policy.table(&name).cloned() {
                                Some(table) => {
                                    retyped || check_shape(&table, &r).is_err() || self.types_differ(&table, &r).await?
                                }
                                // Only published tables reach the stream: this one was tagged
                                // and taken in since (`tagging`).
                                None => name != store::RESOLUTIONS_TABLE,
                            };
                            if changed {
                                // What was decoded under the table's old shape is written under
                                // it, before the capture takes the new one.
                                if !group.is_empty() {
                                    self.flush(&stream, &mut group).await?;
                                }
                                self.follow_shape(&r).await?;
                            }
                            self.relations.insert(r.id, r);
                        }
                        PgOutput::Origin { commit_lsn, name } => {
                            if let Some(tx) = tx.as_mut() {
                                tx.from_peer = true;
                                tx.peer_applied
                                    .extend(store::peer_of_origin(&name).map(|peer| (peer, commit_lsn)));
                            }
                        }
                        PgOutput::Truncate { relations, .. } => {
                            // Replicated as a delete of every row the table had (`decoded`).
                            if let Some(tx) = tx.as_mut() {
                                tx.truncates.push((tx.rows.len(), relations));
                            }
                        }
                        row @ (PgOutput::Insert { .. } | PgOutput::Update { .. } | PgOutput::Delete { .. }) => {
                            // A peer's rows are not captured again (its Origin comes first): not
                            // kept either, however many there are.
                            if let Some(tx) = tx.as_mut().filter(|tx| !tx.from_peer) {
                                tx.rows.push(row);
                                if tx.rows.len() >= PART_ROWS && tx.truncates.is_empty() {
                                    // The transactions before it are written first, in order.
                                    if !group.is_empty() {
                                        self.flush(&stream, &mut group).await?;
                                    }
                                    self.write_part(tx, false).await?;
                                }
                            }
                        }
                        PgOutput::Type { .. } | PgOutput::Other(_) => {}
                    }
                }
                ReplicationEvent::Message { prefix, content, .. } if prefix == HLC_MESSAGE_PREFIX => {
                    let text = String::from_utf8_lossy(&content);
                    let (stamp, builds_on) =
                        parse_hlc_message(&text).ok_or_else(|| anyhow!("malformed {prefix} message {text:?}"))?;
                    if let Some(tx) = tx.as_mut() {
                        tx.merged = tx.merged.max(Some(stamp));
                        tx.peer_applied.extend(builds_on);
                    }
                }
                ReplicationEvent::Commit { end_lsn, .. } => {
                    if let Some(mut done) = tx.take_if(|tx| tx.parts > 0) {
                        let (checkpoint, captured) = self.write_part(&mut done, true).await?;
                        stream.update_applied_lsn(end_lsn);
                        self.progress.send_if_modified(|p| {
                            let before = *p;
                            p.head = checkpoint.last_seq;
                            p.captured += captured;
                            p.processed_lsn = p.processed_lsn.max(end_lsn.as_u64());
                            *p != before
                        });
                        continue;
                    }
                    if let Some(done) = tx.take() {
                        group.marked |= done.marked;
                        // Decoded now, against the relations as they are at this point of the stream.
                        let committed = self.decoded(done)?;
                        group.rows += committed.rows.len();
                        group.transactions.push(committed);
                    }
                    group.started.get_or_insert_with(Instant::now);
                    group.end_lsn = Some(end_lsn);
                    group.processed_lsn = group.processed_lsn.max(end_lsn.as_u64());
                }
                ReplicationEvent::Message { prefix, .. } if prefix == MARK_MESSAGE_PREFIX => {
                    if let Some(tx) = tx.as_mut() {
                        tx.marked = true;
                    }
                }
                ReplicationEvent::Message { prefix, lsn, .. } if prefix == PROBE_MESSAGE_PREFIX => {
                    // Dealt with once the transactions before it are written, with the group.
                    tracing::trace!(lsn = lsn.as_u64(), "probe received");
                    group.started.get_or_insert_with(Instant::now);
                    group.processed_lsn = group.processed_lsn.max(lsn.as_u64());
                }
                ReplicationEvent::Message { .. } | ReplicationEvent::KeepAlive { .. } => {}
                ReplicationEvent::StoppedAt { .. } => break,
            }
        }
        self.flush(&stream, &mut group).await
    }

    /// A committed transaction's row messages as engine changes.
    fn decoded(&self, mut tx: Transaction) -> Result<DecodedTransaction> {
        self.decoded_part(&mut tx, TransactionPart::default())
    }

    /// The transaction's row messages so far as engine changes (they are taken from it).
    fn decoded_part(&self, tx: &mut Transaction, part: TransactionPart) -> Result<DecodedTransaction> {
        let mut rows = Vec::new();
        let mut truncates = Vec::new();
        let messages = std::mem::take(&mut tx.rows);
        if !tx.from_peer {
            // Resolutions come before the writes they resolve, in the same transaction.
            for (m, message) in messages.iter().enumerate() {
                self.truncated_at(tx, m, rows.len(), &mut truncates)?;
                for (table, change) in self.changes(message, &mut tx.resolving)? {
                    rows.push(DecodedRow {
                        table,
                        change,
                        resolving: tx.resolving.clone(),
                    });
                }
            }
            self.truncated_at(tx, messages.len(), rows.len(), &mut truncates)?;
        }
        Ok(DecodedTransaction {
            end_lsn: tx.final_lsn,
            xid: u64::from(tx.xid),
            commit_time: tx.commit_time,
            from_peer: tx.from_peer,
            peer_applied: tx.peer_applied.clone(),
            merged: tx.merged,
            rows,
            truncates,
            part,
        })
    }

    /// Captures and writes `tx`'s rows so far as a part of it, in the database transaction its
    /// first part opens; the last part commits it, with the checkpoint that covers it. Returns
    /// that checkpoint and the changes the whole transaction captured.
    async fn write_part(&mut self, tx: &mut Transaction, last: bool) -> Result<(CaptureCheckpoint, u64)> {
        let part = TransactionPart {
            continued: tx.parts > 0,
            continues: !last,
        };
        let mut decoded = vec![self.decoded_part(tx, part)?];
        self.fill_truncates(&mut decoded).await?;
        if !self.in_transaction {
            self.db
                .batch_execute("BEGIN")
                .await
                .context("cannot begin the capture's transaction")?;
            self.in_transaction = true;
        }
        let parts = self.parts.get_or_insert_with(OpenParts::default);
        let held = parts.held.take();
        let (checkpoint, captured, held) = self
            .write_open(&decoded, Some((held, part.continues)), false, false)
            .await?;
        let parts = self.parts.get_or_insert_with(OpenParts::default);
        parts.held = held;
        parts.captured += captured;
        tx.parts += 1;
        tracing::debug!(
            part = tx.parts,
            captured = parts.captured,
            "a part of a large transaction captured"
        );
        if !last {
            return Ok((checkpoint, 0));
        }
        let captured = parts.captured;
        self.db
            .batch_execute("COMMIT")
            .await
            .context("cannot commit a large transaction's capture")?;
        self.in_transaction = false;
        self.parts = None;
        Ok((checkpoint, captured))
    }

    /// The replicated tables the transaction's TRUNCATEs before its message `m` emptied, placed
    /// before its decoded row `before_row`.
    fn truncated_at(&self, tx: &Transaction, m: usize, before_row: usize, out: &mut Vec<Truncate>) -> Result<()> {
        for (_, relations) in tx.truncates.iter().filter(|(at, _)| *at == m) {
            for relation in relations {
                let rel = self
                    .relations
                    .get(relation)
                    .ok_or_else(|| anyhow!("TRUNCATE of relation {relation} before its description"))?;
                let name = rel.qualified_name();
                if self.policy.table(&name).is_some() {
                    // Its rows' keys are read from what its trigger recorded (`fill_truncates`).
                    out.push(Truncate {
                        before_row,
                        table: name,
                        emptied: Vec::new(),
                    });
                }
            }
        }
        Ok(())
    }

    /// Writes the group, then lets the slot move past it.
    async fn flush(&mut self, stream: &ReplicationClient, group: &mut Group) -> Result<()> {
        let mut group = std::mem::take(group);
        self.fill_truncates(&mut group.transactions).await?;
        // On failure the run ends; the next one resumes from the database's checkpoint, and the
        // stream, restarted from the slot, delivers the group again.
        let (checkpoint, captured) = self.write(&group.transactions, group.marked).await?;
        if let Some(lsn) = group.end_lsn {
            stream.update_applied_lsn(lsn);
        }
        self.progress.send_if_modified(|p| {
            let before = *p;
            p.head = checkpoint.last_seq;
            p.captured += captured;
            p.processed_lsn = p.processed_lsn.max(group.processed_lsn);
            *p != before
        });
        Ok(())
    }

    /// The keys of the rows each TRUNCATE of the group's local transactions emptied, as its
    /// trigger recorded them (the `n`-th TRUNCATE of a table in a transaction is its statement `n`).
    async fn fill_truncates(&mut self, transactions: &mut [DecodedTransaction]) -> Result<()> {
        let covered = self.capturer.checkpoint().covered_lsn;
        for t in transactions.iter_mut().filter(|t| !t.from_peer && t.end_lsn > covered) {
            for i in 0..t.truncates.len() {
                let name = t.truncates[i].table.clone();
                let statement = t.truncates[..=i].iter().filter(|tr| tr.table == name).count();
                let table = self
                    .policy
                    .table(&name)
                    .ok_or_else(|| anyhow!("a TRUNCATE of {name}, which is not replicated"))?;
                let statement = i32::try_from(statement).context("too many TRUNCATEs in one transaction")?;
                t.truncates[i].emptied = truncate::emptied(&self.db, t.xid, table, statement).await?;
            }
        }
        Ok(())
    }

    /// Captures the group's transactions with the engine (`Capturer::capture_group`) and writes
    /// their changes, metadata, review actions and the checkpoint that covers them in one database
    /// transaction. Returns the checkpoint and the number of row changes captured.
    async fn write(&mut self, transactions: &[DecodedTransaction], marked: bool) -> Result<(CaptureCheckpoint, u64)> {
        let slots = self.capturer.rows_to_load(transactions);
        let truncating = transactions.iter().any(|t| !t.from_peer && !t.truncates.is_empty());
        // A merge's stamp moves the clock, but needs no write: the merge recorded it.
        let needs_db = marked || !slots.is_empty() || truncating;
        if !needs_db {
            // Nothing to capture: no database round trip.
            let policy = Arc::clone(&self.policy);
            let cut = self.cut.borrow().clone();
            let write =
                self.capturer
                    .capture_group(|name| policy.table(name), transactions, Vec::new(), cut.as_ref())?;
            return Ok((write.checkpoint, 0));
        }
        // Begun and committed by `write_open`, each with its neighbouring statements (two round
        // trips fewer than on their own). Set first: a failure rolls back whatever it began.
        self.in_transaction = true;
        let (checkpoint, captured, _) = self.write_open(transactions, None, marked, true).await?;
        self.in_transaction = false;
        Ok((checkpoint, captured))
    }

    /// `write`'s statements, in the database transaction open on `db`, or with `own`, in one
    /// they begin and commit (sent with the first and last statements). `part`, for a part of a
    /// transaction captured in parts: the change held from the part before, and whether more
    /// parts follow; the change to hold for the next part is returned.
    async fn write_open(
        &mut self,
        transactions: &[DecodedTransaction],
        part: Option<(Option<CapturedRow>, bool)>,
        marked: bool,
        own: bool,
    ) -> Result<(CaptureCheckpoint, u64, Option<CapturedRow>)> {
        // Whether the `BEGIN` of its own transaction was sent.
        let mut begun = false;
        let slots = self.capturer.rows_to_load(transactions);
        // Local transactions that truncated: what their triggers recorded is forgotten with the
        // deletes written.
        let truncating: Vec<i64> = transactions
            .iter()
            .filter(|t| !t.from_peer && !t.truncates.is_empty())
            .filter_map(|t| i64::try_from(t.xid).ok())
            .collect();
        let policy = Arc::clone(&self.policy);
        let cut = self.cut.borrow().clone();
        let self_shapes = Arc::clone(&self.shapes.borrow());
        let Capture {
            db,
            capturer,
            statements,
            ..
        } = self;

        // The prior metadata of every row the group changes, locked, in one query.
        let mut loaded: Vec<Option<RowMeta>> = vec![None; slots.len()];
        if !slots.is_empty() {
            let load = statements.get(db, store::LOAD_METAS_SQL).await?;
            let ords: Vec<i32> = (0..slots.len()).map(|i| i32::try_from(i).unwrap_or(i32::MAX)).collect();
            let tables: Vec<String> = slots.iter().map(|(t, _)| t.clone()).collect();
            let keys: Vec<String> = slots.iter().map(|(_, k)| key_text(k)).collect();
            let params: Params = vec![Box::new(ords), Box::new(tables), Box::new(keys)];
            let mut queries = Vec::new();
            if own && !begun {
                queries.push(pipeline::command(db, "BEGIN"));
                begun = true;
            }
            queries.push(pipeline::query(db, &load, &params));
            let mut results = pipeline::run_all(queries)
                .await
                .context("cannot load the metadata of the captured rows")?;
            let rows = results.pop().unwrap_or_default();
            let table_of = |ord: usize| slots.get(ord).and_then(|(t, _)| policy.table(t));
            for (ord, meta, _) in store::loaded_metas_fresh(&*db, &rows, &self_shapes, |_| {}, table_of).await? {
                let slot = loaded
                    .get_mut(ord)
                    .ok_or_else(|| anyhow!("row metadata came back with an unknown ord {ord}"))?;
                *slot = Some(meta);
            }
        }
        let write = capturer.capture_group(|name| policy.table(name), transactions, loaded, cut.as_ref())?;
        if !truncating.is_empty() {
            if own && !begun {
                db.batch_execute("BEGIN").await?;
                begun = true;
            }
            db.execute(truncate::FORGET_SQL, &[&truncating]).await?;
        }
        let mut changes = write.changes;
        let mut held = None;
        if let Some((before, continues)) = part {
            let own = !changes.is_empty();
            changes.splice(0..0, before);
            if continues {
                held = changes.pop();
            } else if !own {
                // The last part changed nothing: the last change written ends the transaction.
                if let Some(last) = changes.last_mut() {
                    last.change.tx_last = last.change.seq;
                }
            }
        }
        if !write.needs_write && changes.is_empty() && !marked {
            if begun {
                db.batch_execute("COMMIT").await?;
            }
            return Ok((write.checkpoint, 0, held));
        }

        let mut rows = MetaRows::default();
        let mut shape_of: BTreeMap<&str, ShapeId> = BTreeMap::new();
        for m in &write.metas {
            let known = m.known_xmin.map(|x| x.to_string());
            let table = policy
                .table(&m.table)
                .with_context(|| format!("metadata of {}, a table that is not replicated", m.table))?;
            let shape = *shape_of.entry(&table.name).or_insert_with(|| table.shape_id());
            rows.push((&m.table, shape), &key_text(&m.key), &m.meta, known.as_deref())?;
        }
        let has_metas = !rows.is_empty();
        let meta_params = rows.into_params();
        let has_changes = !changes.is_empty();
        let seqs: Vec<i64> = changes
            .iter()
            .map(|c| i64::try_from(c.change.seq).unwrap_or(i64::MAX))
            .collect();
        let encoded = changes
            .iter()
            .map(|c| encode("change", &c.change))
            .collect::<Result<Vec<_>, _>>()?;
        let checkpoint = write.checkpoint;
        let outbound_params: Params = vec![Box::new(seqs), Box::new(encoded)];
        let checkpoint_params: Params = vec![
            Box::new(encode("capture checkpoint", &checkpoint)?),
            Box::new(i64::try_from(checkpoint.last_seq).unwrap_or(i64::MAX)),
            Box::new(tokio_postgres::types::PgLsn::from(checkpoint.covered_lsn)),
        ];
        let append = statements.get(db, store::APPEND_OUTBOUND_SQL).await?;
        let save = statements.get(db, store::SAVE_METAS_SQL).await?;
        let check = statements
            .get(
                db,
                "UPDATE accord.capture_state SET checkpoint = $1, last_seq = $2, covered_lsn = $3, updated_at = now()",
            )
            .await?;
        // Synchronous whatever the server's default: the slot moves past this group once it
        // committed, and a commit lost in a crash would take the group's changes with it.
        let mut queries = Vec::new();
        if own && !begun {
            queries.push(pipeline::command(db, "BEGIN"));
        }
        queries.push(pipeline::command(db, "SET LOCAL synchronous_commit = on"));
        if has_changes {
            queries.push(pipeline::query(db, &append, &outbound_params));
        }
        if has_metas {
            queries.push(pipeline::query(db, &save, &meta_params));
        }
        // The checkpoint, in the same transaction as the changes it covers.
        queries.push(pipeline::query(db, &check, &checkpoint_params));
        // A statement that fails makes the COMMIT after it a rollback, and the pipeline reports
        // that statement's error.
        let commit_now = own && write.review.is_empty();
        if commit_now {
            queries.push(pipeline::command(db, "COMMIT"));
        }
        pipeline::run_all(queries).await?;
        store::apply_review(db, &write.review).await?;
        if own && !commit_now {
            db.batch_execute("COMMIT").await?;
        }
        if let Some(recent) = self.recent.as_ref().filter(|_| own) {
            // Committed: what the outbound log holds for good. (Parts of a large transaction
            // are not kept: the next changes then do not follow the last ones kept.)
            let mut recent = recent.lock().unwrap_or_else(|p| p.into_inner());
            recent.committed(changes.iter().map(|c| &c.change));
        }
        Ok((checkpoint, changes.len() as u64, held))
    }

    /// The engine changes of one decoded row message (an update of the key is a delete and an
    /// insert); rows of the resolutions table add to `resolving` instead.
    fn changes(&self, message: &PgOutput, resolving: &mut Vec<ReviewItemId>) -> Result<Vec<(String, CapturedChange)>> {
        let (relation, kind) = match message {
            PgOutput::Insert { relation, .. } => (*relation, ChangeKind::Insert),
            PgOutput::Update { relation, .. } => (*relation, ChangeKind::Update),
            PgOutput::Delete { relation, .. } => (*relation, ChangeKind::Delete),
            _ => return Ok(Vec::new()),
        };
        let rel = self
            .relations
            .get(&relation)
            .ok_or_else(|| anyhow!("row change for relation {relation} before its description"))?;
        let name = rel.qualified_name();
        if name == store::RESOLUTIONS_TABLE {
            if let PgOutput::Insert { new, .. } = message {
                if let Some(TupleValue::Text(id)) = rel
                    .columns
                    .iter()
                    .position(|c| c.name == "item_id")
                    .and_then(|i| new.get(i))
                {
                    if let Ok(id) = id.parse() {
                        resolving.push(id);
                    }
                }
            }
            return Ok(Vec::new());
        }
        let Some(table) = self.policy.table(&name) else {
            return Ok(Vec::new());
        };
        let image = |tuple: &[TupleValue]| image(rel, table, tuple);
        let change = |kind, key, old, new| CapturedChange { kind, key, old, new };
        Ok(match (kind, message) {
            (ChangeKind::Insert, PgOutput::Insert { new, .. }) => {
                let (key, cells) = image(new)?;
                vec![(table.name.clone(), change(kind, key, None, Some(cells)))]
            }
            (ChangeKind::Update, PgOutput::Update { old, new, key_only, .. }) => {
                let (new_key, new_cells) = image(new)?;
                let old = match old {
                    Some(old) if !key_only => Some(image(old)?),
                    _ => None,
                };
                match old {
                    Some((old_key, old_cells)) if old_key != new_key => vec![
                        (
                            table.name.clone(),
                            change(ChangeKind::Delete, old_key, Some(old_cells), None),
                        ),
                        (
                            table.name.clone(),
                            change(ChangeKind::Insert, new_key, None, Some(new_cells)),
                        ),
                    ],
                    old => vec![(
                        table.name.clone(),
                        change(kind, new_key, old.map(|(_, cells)| cells), Some(new_cells)),
                    )],
                }
            }
            (ChangeKind::Delete, PgOutput::Delete { old, .. }) => {
                let (key, cells) = image(old)?;
                vec![(table.name.clone(), change(kind, key, Some(cells), None))]
            }
            _ => Vec::new(),
        })
    }
}

/// Refuses a table whose columns differ from the policy accord was started with (an ALTER TABLE
/// since `accord init`): a new column would silently stay local, a dropped one would make every
/// change unreadable. The capture stops before the first change of the new shape, and the slot
/// keeps everything from there, so nothing is lost while the operator fixes the schema.
fn check_shape(table: &TableDef, rel: &Relation) -> Result<()> {
    let known = |name: &str| table.key.iter().any(|k| k.name == name) || table.column_index(name).is_some();
    let added: Vec<&str> = rel
        .columns
        .iter()
        .map(|c| c.name.as_str())
        .filter(|name| !known(name))
        .collect();
    let present = |name: &str| rel.columns.iter().any(|c| c.name == name);
    let gone: Vec<&str> = table
        .key
        .iter()
        .map(|k| k.name.as_str())
        .chain(table.columns.iter().map(|c| c.name.as_str()))
        .filter(|name| !present(name))
        .collect();
    if added.is_empty() && gone.is_empty() {
        return Ok(());
    }
    let list = |names: &[&str]| {
        if names.is_empty() {
            "none".to_string()
        } else {
            names.join(", ")
        }
    };
    bail!(
        "table {} changed since `accord init` (new columns: {}; dropped columns: {}): accord stopped \
         capturing rather than replicate it differently from its peers. Make the table the same on every \
         node, run `accord init` on each, and restart the nodes; the slot keeps the changes meanwhile",
        table.name,
        list(&added),
        list(&gone)
    )
}

/// The shape of a table as the stream decodes it (`rel`'s columns): each column's type and
/// policy as the catalog has it now (`now`), or as an earlier shape of the table had it
/// (`earlier`, the latest first) for a column the catalog no longer has (dropped after the change
/// being decoded).
fn shape_as_decoded(rel: &Relation, now: &TableDef, earlier: &[&TableDef]) -> Result<TableDef> {
    let name = rel.qualified_name();
    // (The relation's key flags are the replica identity's: with FULL, every column.)
    if let Some(key) = now.key.iter().find(|k| !rel.columns.iter().any(|c| c.name == k.name)) {
        bail!(
            "the primary key column {name}.{} is not in the table as decoded: accord cannot follow a change of a \
             replicated table's key",
            key.name
        );
    }
    let decoded: std::collections::BTreeSet<&str> = rel
        .columns
        .iter()
        .map(|c| c.name.as_str())
        .filter(|name| !now.key.iter().any(|k| k.name == *name))
        .collect();
    if decoded == now.columns.iter().map(|c| c.name.as_str()).collect() {
        // The catalog's own shape, in its order: the appliers read the same one, so the node has
        // one id for it (a shape's id depends on its columns' order).
        return Ok(now.clone());
    }
    let mut columns = Vec::new();
    for column in rel.columns.iter().filter(|c| !now.key.iter().any(|k| k.name == c.name)) {
        let def = now
            .columns
            .iter()
            .chain(earlier.iter().flat_map(|t| &t.columns))
            .find(|c| c.name == column.name)
            .with_context(|| {
                format!(
                    "column {name}.{} was added and dropped again before the capture reached it: run `accord init` \
                 again",
                    column.name
                )
            })?;
        columns.push(def.clone());
    }
    TableDef::new(name.clone(), now.key.clone(), columns).with_context(|| format!("the new shape of {name}"))
}

/// A decoded row image as the table's key and its columns in table order.
fn image(rel: &Relation, table: &TableDef, tuple: &[TupleValue]) -> Result<(RowKey, Vec<Cell>)> {
    let mut key: Vec<Option<accord_engine::Value>> = vec![None; table.key.len()];
    let mut cells: Vec<Option<Cell>> = vec![None; table.columns.len()];
    for (column, value) in rel.columns.iter().zip(tuple) {
        let text = match value {
            TupleValue::Null => None,
            TupleValue::Text(t) => Some(t.as_str()),
            TupleValue::UnchangedToast => {
                if let Some(i) = table.column_index(&column.name) {
                    cells[i] = Some(Cell::UnchangedToast);
                }
                continue;
            }
            TupleValue::Binary(_) => bail!("binary pgoutput values are not supported (column {})", column.name),
        };
        if let Some(k) = table.key.iter().position(|k| k.name == column.name) {
            let ty = &table.key[k].ty;
            key[k] = Some(match text {
                None => accord_engine::Value::Null,
                Some(t) => {
                    accord_engine::Value::parse(ty, t).with_context(|| format!("{}.{}", table.name, column.name))?
                }
            });
        } else if let Some(i) = table.column_index(&column.name) {
            cells[i] = Some(Cell::Value(parse_cell(table, i, text)?));
        }
    }
    let key = key
        .into_iter()
        .zip(&table.key)
        .map(|(v, k)| v.ok_or_else(|| anyhow!("{} changed: key column {} is not in the row", table.name, k.name)))
        .collect::<Result<Vec<_>>>()?;
    let cells = cells
        .into_iter()
        .zip(&table.columns)
        .map(|(c, def)| c.ok_or_else(|| anyhow!("{} changed: column {} is not in the row", table.name, def.name)))
        .collect::<Result<Vec<_>>>()?;
    Ok((RowKey(key), cells))
}

/// Writes a mark (`MARK_MESSAGE_PREFIX`, saying `why`) into the database's WAL and waits until the
/// node's capture has checkpointed past it: every transaction committed before is then captured
/// (in `accord.outbound`, its rows' metadata written). Returns the mark's LSN if `limit` passed
/// first (the node's `accord run` is not running, or is far behind).
pub async fn wait_until_captured(
    db: &tokio_postgres::Client,
    why: &str,
    limit: std::time::Duration,
) -> anyhow::Result<Option<u64>> {
    use anyhow::Context as _;
    db.batch_execute("BEGIN; SET LOCAL synchronous_commit = on").await?;
    let lsn: anyhow::Result<tokio_postgres::types::PgLsn> = async {
        Ok(db
            .query_one(
                "SELECT pg_logical_emit_message(true, $1, $2)",
                &[&MARK_MESSAGE_PREFIX, &why],
            )
            .await
            .context("cannot write a mark into the WAL")?
            .get(0))
    }
    .await;
    let end = db.batch_execute("COMMIT").await;
    let lsn = u64::from(lsn?);
    end?;
    let waited = std::time::Instant::now();
    loop {
        let covered: tokio_postgres::types::PgLsn = db
            .query_one("SELECT covered_lsn FROM accord.capture_state", &[])
            .await?
            .get(0);
        if u64::from(covered) >= lsn {
            return Ok(None);
        }
        if waited.elapsed() > limit {
            return Ok(Some(lsn));
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hlc_messages_round_trip() {
        let stamp = Hlc::new(1_700_000_000_000_000, 7, NodeId(3));
        assert_eq!(parse_hlc_message(&hlc_message(stamp, &[])), Some((stamp, vec![])));
        let builds_on = vec![(NodeId(2), 17), (NodeId(3), 4)];
        assert_eq!(
            parse_hlc_message(&hlc_message(stamp, &builds_on)),
            Some((stamp, builds_on))
        );
        assert_eq!(parse_hlc_message("1:2:3 2"), None);
        assert_eq!(parse_hlc_message("1:2:3 2=x"), None);
        assert_eq!(parse_hlc_message("1:2"), None);
        assert_eq!(parse_hlc_message("1:2:3:4"), None);
    }

    #[test]
    fn dsn_becomes_a_replication_config() {
        let dsn = Dsn::parse("host=127.0.0.1 port=5433 user=postgres dbname=shop sslmode=disable").unwrap();
        let endpoint = ReplicationEndpoint {
            host: "127.0.0.1".into(),
            port: 5433,
        };
        let config = replication_config(&dsn, &endpoint);
        assert_eq!(config.port, 5433);
        assert_eq!(config.database, "shop");
    }
}
