//! The capture: streams the database's committed changes from the logical slot, turns local ones
//! into stamped changes with the engine's `Capturer`, and writes them with their metadata and the
//! capture checkpoint in one transaction, before the slot may move on.

use std::collections::BTreeMap;
use std::sync::Arc;

use accord_engine::{
    CaptureCheckpoint, CapturedChange, Capturer, Cell, ChangeKind, Hlc, NodeId, ReviewItemId, RowKey, RowMeta, TableDef,
};
use accord_schema_annotations::SchemaPolicy;
use anyhow::{anyhow, bail, Context, Result};
use pgwire_replication::{ReplicationClient, ReplicationConfig, ReplicationEvent, TlsConfig};
use tokio::sync::watch;
use tokio_postgres::Client;

use super::pgoutput::{decode, PgOutput, Relation, TupleValue};
use super::rows::parse_cell;
use super::store::{self, decode as decode_stored, encode, key_text, HLC_MESSAGE_PREFIX, PUBLICATION, SLOT};

/// Microseconds from the Unix epoch to PostgreSQL's (2000-01-01).
const PG_EPOCH_OFFSET_MICROS: i64 = 946_684_800_000_000;

/// The stamp text a merge writes into the WAL, and its reading.
pub fn hlc_message(stamp: Hlc) -> String {
    format!("{}:{}:{}", stamp.physical, stamp.logical, stamp.node.0)
}

pub fn parse_hlc_message(text: &str) -> Option<Hlc> {
    let mut parts = text.split(':');
    let physical = parts.next()?.parse().ok()?;
    let logical = parts.next()?.parse().ok()?;
    let node = parts.next()?.parse().ok()?;
    parts
        .next()
        .is_none()
        .then_some(Hlc::new(physical, logical, NodeId(node)))
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
}

/// A non-transactional logical-decoding message an applier writes to learn when the capture has
/// read everything committed before it.
pub const PROBE_MESSAGE_PREFIX: &str = "accord.probe";

/// A replication-protocol connection configuration from a libpq-style DSN.
pub fn replication_config(dsn: &str) -> Result<ReplicationConfig> {
    let config: tokio_postgres::Config = dsn.parse().context("cannot read the DSN")?;
    let host = match config.get_hosts().first() {
        Some(tokio_postgres::config::Host::Tcp(h)) => h.clone(),
        Some(tokio_postgres::config::Host::Unix(path)) => path.to_string_lossy().into_owned(),
        None => "localhost".to_owned(),
    };
    let port = config.get_ports().first().copied().unwrap_or(5432);
    let user = config.get_user().unwrap_or("postgres").to_owned();
    let password = config
        .get_password()
        .map(|p| String::from_utf8_lossy(p).into_owned())
        .unwrap_or_default();
    let dbname = config.get_dbname().unwrap_or(&user).to_owned();
    Ok(ReplicationConfig::new(host, user, password, dbname, SLOT, PUBLICATION)
        .with_port(port)
        .with_tls(TlsConfig::disabled())
        .with_status_interval(std::time::Duration::from_millis(200))
        // Decoded text must not depend on the server's settings: the same value must read the same
        // on every node.
        .with_options("-c datestyle=ISO,YMD -c intervalstyle=iso_8601 -c timezone=UTC -c extra_float_digits=3")
        .with_application_name("accord-capture"))
}

#[derive(Default)]
struct Transaction {
    final_lsn: u64,
    xid: u32,
    commit_time: u64,
    from_peer: bool,
    merged: Option<Hlc>,
    rows: Vec<PgOutput>,
}

pub struct Capture {
    db: Client,
    policy: Arc<SchemaPolicy>,
    capturer: Capturer,
    relations: BTreeMap<u32, Relation>,
    progress: watch::Sender<CaptureProgress>,
}

impl Capture {
    pub async fn new(
        db: Client,
        policy: Arc<SchemaPolicy>,
        node: NodeId,
        max_offset_micros: u64,
    ) -> Result<(Capture, watch::Receiver<CaptureProgress>)> {
        let row = db
            .query_one("SELECT checkpoint FROM accord.capture_state", &[])
            .await
            .context("cannot read the capture state: was `accord init` run on this database?")?;
        let checkpoint: CaptureCheckpoint = decode_stored("capture checkpoint", row.get::<_, &[u8]>(0))?;
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
        });
        Ok((
            Capture {
                db,
                policy,
                capturer,
                relations: BTreeMap::new(),
                progress,
            },
            rx,
        ))
    }

    /// Streams until the stream ends or fails; the caller restarts it.
    pub async fn run(&mut self, dsn: &str) -> Result<()> {
        let mut stream = ReplicationClient::connect(replication_config(dsn)?)
            .await
            .context("cannot start streaming from the replication slot")?;
        let mut tx: Option<Transaction> = None;
        while let Some(event) = stream.recv().await.context("replication stream failed")? {
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
                            self.relations.insert(r.id, r);
                        }
                        PgOutput::Origin { .. } => {
                            if let Some(tx) = tx.as_mut() {
                                tx.from_peer = true;
                            }
                        }
                        PgOutput::Truncate { .. } => {
                            // A TRUNCATE is not replicated, and would leave metadata for rows that
                            // are gone: say so loudly rather than silently diverge.
                            tracing::error!(
                                "TRUNCATE of a replicated table is not replicated by accord; delete the rows instead \
                                 (the other nodes keep theirs)"
                            );
                        }
                        row @ (PgOutput::Insert { .. } | PgOutput::Update { .. } | PgOutput::Delete { .. }) => {
                            if let Some(tx) = tx.as_mut() {
                                tx.rows.push(row);
                            }
                        }
                        PgOutput::Type { .. } | PgOutput::Other(_) => {}
                    }
                }
                ReplicationEvent::Message { prefix, content, .. } if prefix == HLC_MESSAGE_PREFIX => {
                    let text = String::from_utf8_lossy(&content);
                    let stamp =
                        parse_hlc_message(&text).ok_or_else(|| anyhow!("malformed {prefix} message {text:?}"))?;
                    if let Some(tx) = tx.as_mut() {
                        tx.merged = tx.merged.max(Some(stamp));
                    }
                }
                ReplicationEvent::Commit { end_lsn, .. } => {
                    if let Some(done) = tx.take() {
                        self.commit(done).await?;
                    }
                    stream.update_applied_lsn(end_lsn);
                    self.progress
                        .send_modify(|p| p.processed_lsn = p.processed_lsn.max(end_lsn.as_u64()));
                }
                ReplicationEvent::Message { prefix, lsn, .. } if prefix == PROBE_MESSAGE_PREFIX => {
                    self.progress
                        .send_modify(|p| p.processed_lsn = p.processed_lsn.max(lsn.as_u64()));
                }
                ReplicationEvent::Message { .. } | ReplicationEvent::KeepAlive { .. } => {}
                ReplicationEvent::StoppedAt { .. } => break,
            }
        }
        Ok(())
    }

    async fn commit(&mut self, tx: Transaction) -> Result<()> {
        self.capturer.begin(tx.final_lsn, tx.commit_time);
        if tx.from_peer {
            self.capturer.from_peer();
        }
        if let Some(stamp) = tx.merged {
            self.capturer.merged(stamp);
        }
        if (tx.from_peer || tx.rows.is_empty()) && tx.merged.is_none() {
            // Nothing to capture and no clock to persist: no database round trip.
            self.capturer.commit();
            return Ok(());
        }
        let xid = tx.xid.to_string();
        // Resolutions come before the writes they resolve, in the same transaction.
        let mut resolving: Vec<ReviewItemId> = Vec::new();
        let mut changes = Vec::new();
        for message in &tx.rows {
            for (table, change) in self.changes(message, &mut resolving)? {
                changes.push((table, change, resolving.clone()));
            }
        }
        let db = self.db.transaction().await?;
        let mut metas: BTreeMap<(String, String), RowMeta> = BTreeMap::new();
        let mut captured_rows = 0;
        for (table, change, resolving) in changes {
            let key = key_text(&change.key);
            let slot = (table.name.clone(), key.clone());
            let prior = match metas.get(&slot) {
                Some(meta) => Some(meta.clone()),
                None => store::load_meta(&db, &table.name, &key).await?.map(|(meta, _)| meta),
            };
            let captured = match self.capturer.row(&table, prior.as_ref(), &change, &resolving) {
                Ok(Some(captured)) => captured,
                Ok(None) => continue,
                Err(error) => {
                    // Committed locally but impossible to replicate: never silently.
                    tracing::error!(table = %table.name, key, %error, "a local change cannot be replicated");
                    continue;
                }
            };
            store::append_outbound(&db, &captured.change).await?;
            let known = captured.meta.is_alive().then_some(xid.as_str());
            store::save_meta(&db, &table.name, &key, &captured.meta, known).await?;
            store::apply_review(&db, &captured.review).await?;
            metas.insert(slot, captured.meta);
            captured_rows += 1;
        }
        let checkpoint = self.capturer.commit();
        if captured_rows > 0 || tx.merged.is_some() {
            let last_seq = i64::try_from(checkpoint.last_seq).unwrap_or(i64::MAX);
            db.execute(
                "UPDATE accord.capture_state SET checkpoint = $1, last_seq = $2, covered_lsn = $3, updated_at = now()",
                &[
                    &encode("capture checkpoint", &checkpoint)?,
                    &last_seq,
                    &tokio_postgres::types::PgLsn::from(checkpoint.covered_lsn),
                ],
            )
            .await?;
        }
        db.commit().await?;
        self.progress.send_modify(|p| {
            p.head = checkpoint.last_seq;
            p.captured += captured_rows;
        });
        Ok(())
    }

    /// The engine changes of one decoded row message (an update of the key is a delete and an
    /// insert); rows of the resolutions table add to `resolving` instead.
    fn changes(
        &self,
        message: &PgOutput,
        resolving: &mut Vec<ReviewItemId>,
    ) -> Result<Vec<(TableDef, CapturedChange)>> {
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
                vec![(table.clone(), change(kind, key, None, Some(cells)))]
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
                            table.clone(),
                            change(ChangeKind::Delete, old_key, Some(old_cells), None),
                        ),
                        (
                            table.clone(),
                            change(ChangeKind::Insert, new_key, None, Some(new_cells)),
                        ),
                    ],
                    old => vec![(
                        table.clone(),
                        change(kind, new_key, old.map(|(_, cells)| cells), Some(new_cells)),
                    )],
                }
            }
            (ChangeKind::Delete, PgOutput::Delete { old, .. }) => {
                let (key, cells) = image(old)?;
                vec![(table.clone(), change(kind, key, Some(cells), None))]
            }
            _ => Vec::new(),
        })
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hlc_messages_round_trip() {
        let stamp = Hlc::new(1_700_000_000_000_000, 7, NodeId(3));
        assert_eq!(parse_hlc_message(&hlc_message(stamp)), Some(stamp));
        assert_eq!(parse_hlc_message("1:2"), None);
        assert_eq!(parse_hlc_message("1:2:3:4"), None);
    }

    #[test]
    fn dsn_becomes_a_replication_config() {
        let config = replication_config("host=127.0.0.1 port=5433 user=postgres dbname=shop").unwrap();
        assert_eq!(config.port, 5433);
        assert_eq!(config.database, "shop");
    }
}
