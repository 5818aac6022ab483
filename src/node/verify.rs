//! `accord verify` on a running node: the node asked (the coordinator) runs rounds with every
//! node over the mesh, itself included; each node answers a round from one snapshot of its
//! database. The rules (cuts, standings, digests, the descent over key-hash ranges) are
//! `engine::verify`'s; this module reads PostgreSQL and carries the messages.
//!
//! A round on a node: it notes its snapshot of running transactions, writes a probe and waits
//! for its capture to read past it (so every write committed before the note has been captured,
//! or never will be), opens a repeatable-read transaction and reports what it has applied. The
//! coordinator takes the cut of the reports, and each node summarises its rows under it, once,
//! keeping the summaries for the ranges and rows the coordinator asks for.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use accord_engine::{
    compare_rows, key_hash, repair_plan, row_digest, rows_by_key, standing, verify::column_names, Descent, DescentStep,
    HeldRow, KeyDifference, NodeId, RepairOutcome, RepairPlan, RepairWrite, RowKey, RowMeta, RowSummary, ShapeBook,
    Standing, Stored, TableCount, TableDef, TableSummaries, Value, VerifyCut, VerifyMessage, VerifyScope,
};
use anyhow::{anyhow, bail, Context, Result};
use futures_util::{pin_mut, TryStreamExt};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, watch};
use tokio_postgres::Client;

use super::capture::CaptureProgress;
use super::rows::{quote_ident, quote_table};
use super::store::{self, decode, key_text, shape_of};
use super::tagging::replicated_policy;
use crate::pg_connection::connect;

/// How long a node waits for the next request of a round before letting its snapshot go.
const IDLE_LIMIT: Duration = Duration::from_secs(120);
/// How long the coordinator waits for a node's answer.
const ANSWER_LIMIT: Duration = Duration::from_secs(300);
/// Rounds over keys still in flight after the first, and the pause before each.
const RECHECKS: u32 = 4;
const RECHECK_PAUSE: Duration = Duration::from_millis(500);

/// The node's end of verifications: it answers the rounds other nodes (and itself) coordinate,
/// and coordinates its own.
#[derive(Clone)]
pub struct VerifyHub {
    inner: Arc<Hub>,
}

struct Hub {
    node: NodeId,
    dsn: String,
    /// To the replication loop, which sends them on the peer's link.
    outbox: mpsc::UnboundedSender<(NodeId, VerifyMessage)>,
    capture: watch::Receiver<CaptureProgress>,
    /// The nodes a verification compares besides this one.
    peers: watch::Receiver<Vec<NodeId>>,
    /// Rounds this node answers, by coordinator and round.
    answering: Mutex<BTreeMap<(NodeId, u64), mpsc::UnboundedSender<VerifyMessage>>>,
    /// Rounds this node coordinates: where their answers go.
    coordinating: Mutex<BTreeMap<u64, mpsc::UnboundedSender<(NodeId, VerifyMessage)>>>,
    next_round: Mutex<u64>,
}

/// What `accord verify` reports.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct VerifyReport {
    pub nodes: Vec<NodeId>,
    /// Per table, its rows on each node (the first round's count, in the nodes' order).
    pub tables: BTreeMap<String, Vec<u64>>,
    pub differences: Vec<KeyDifference>,
    /// Keys still being written after every recheck: not verified.
    pub unsettled: BTreeMap<String, Vec<String>>,
    pub rounds: u32,
    /// The first round's cut.
    pub cut: VerifyCut,
}

impl VerifyReport {
    pub fn is_clean(&self) -> bool {
        self.differences.is_empty()
    }
}

impl VerifyHub {
    pub fn new(
        node: NodeId,
        dsn: String,
        capture: watch::Receiver<CaptureProgress>,
        peers: watch::Receiver<Vec<NodeId>>,
    ) -> (VerifyHub, mpsc::UnboundedReceiver<(NodeId, VerifyMessage)>) {
        let (outbox, out) = mpsc::unbounded_channel();
        let hub = Hub {
            node,
            dsn,
            outbox,
            capture,
            peers,
            answering: Mutex::default(),
            coordinating: Mutex::default(),
            next_round: Mutex::new(crate::node::runtime::wall_micros()),
        };
        (VerifyHub { inner: Arc::new(hub) }, out)
    }

    /// A message of a verification from `from` (a peer, or this node).
    pub fn deliver(&self, from: NodeId, message: VerifyMessage) {
        let round = message.round();
        match message {
            VerifyMessage::Open { scope, .. } => {
                let (tx, rx) = mpsc::unbounded_channel();
                lock(&self.inner.answering).insert((from, round), tx);
                let hub = self.clone();
                tokio::spawn(async move {
                    if let Err(error) = hub.answer(from, round, scope, rx).await {
                        hub.send(
                            from,
                            VerifyMessage::Failed {
                                round,
                                error: format!("{error:#}"),
                            },
                        );
                    }
                    lock(&hub.inner.answering).remove(&(from, round));
                });
            }
            request @ (VerifyMessage::Summarise { .. }
            | VerifyMessage::Ranges { .. }
            | VerifyMessage::Rows { .. }
            | VerifyMessage::Fetch { .. }
            | VerifyMessage::Repair { .. }
            | VerifyMessage::Close { .. }) => {
                let session = lock(&self.inner.answering).get(&(from, round)).cloned();
                match session {
                    Some(session) => {
                        let _ = session.send(request);
                    }
                    None if matches!(request, VerifyMessage::Close { .. }) => {}
                    None => self.send(
                        from,
                        VerifyMessage::Failed {
                            round,
                            error: "this node has no such round open (it restarted, or the round timed out)".into(),
                        },
                    ),
                }
            }
            answer @ (VerifyMessage::Opened { .. }
            | VerifyMessage::Summarised { .. }
            | VerifyMessage::RangeSummaries { .. }
            | VerifyMessage::RowList { .. }
            | VerifyMessage::Fetched { .. }
            | VerifyMessage::Repaired { .. }
            | VerifyMessage::Failed { .. }) => {
                if let Some(waiting) = lock(&self.inner.coordinating).get(&round) {
                    let _ = waiting.send((from, answer));
                }
            }
        }
    }

    fn send(&self, to: NodeId, message: VerifyMessage) {
        if to == self.inner.node {
            self.deliver(to, message);
        } else {
            let _ = self.inner.outbox.send((to, message));
        }
    }

    /// A message the loop could not send: `to` is not connected. A request's answer is that it
    /// failed, as if from `to`.
    pub fn undeliverable(&self, to: NodeId, message: VerifyMessage) {
        let round = message.round();
        if let Some(waiting) = lock(&self.inner.coordinating).get(&round) {
            let _ = waiting.send((
                to,
                VerifyMessage::Failed {
                    round,
                    error: format!("node {to} is not connected to node {}", self.inner.node),
                },
            ));
        }
    }

    // ---- answering a round -------------------------------------------------------------

    async fn answer(
        &self,
        coordinator: NodeId,
        round: u64,
        scope: VerifyScope,
        mut requests: mpsc::UnboundedReceiver<VerifyMessage>,
    ) -> Result<()> {
        let hub = &self.inner;
        let mut db = connect(&hub.dsn).await?;
        let noted: String = db.query_one("SELECT pg_current_snapshot()::text", &[]).await?.get(0);
        let before = NotedSnapshot::parse(&noted)?;
        // Read before the round's transaction: reading the annotations takes a transaction of its own.
        let policy = replicated_policy(&mut db).await?;
        let book = super::shapes::book(&super::shapes::load(&db).await?);
        let lsn = super::apply::probe(&db).await?;
        let mut capture = hub.capture.clone();
        super::apply::wait_for_capture(&db, &mut capture, lsn)
            .await
            .context("verifying needs the capture to read past a probe")?;
        db.batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
            .await?;
        let applied = store::snapshot_positions(&db, hub.node).await?;
        self.send(coordinator, VerifyMessage::Opened { round, applied });

        let mut summaries: BTreeMap<String, TableSummaries> = BTreeMap::new();
        let mut last_cut: Option<VerifyCut> = None;
        loop {
            let request = match tokio::time::timeout(IDLE_LIMIT, requests.recv()).await {
                Ok(Some(request)) => request,
                Ok(None) | Err(_) => break,
            };
            match request {
                VerifyMessage::Summarise { cut, .. } => {
                    last_cut = Some(cut.clone());
                    let (tables, keys): (Vec<&TableDef>, Option<&BTreeMap<String, Vec<String>>>) = match &scope {
                        VerifyScope::Tables(names) => (
                            policy
                                .tables()
                                .iter()
                                .filter(|t| names.is_empty() || names.contains(&t.name))
                                .collect(),
                            None,
                        ),
                        VerifyScope::Keys(keys) => (
                            policy.tables().iter().filter(|t| keys.contains_key(&t.name)).collect(),
                            Some(keys),
                        ),
                    };
                    if let VerifyScope::Tables(names) = &scope {
                        if let Some(missing) = names.iter().find(|n| policy.table(n).is_none()) {
                            bail!("table {missing} is not replicated on node {}", hub.node);
                        }
                    }
                    let mut counts = Vec::new();
                    for table in tables {
                        let only = keys.and_then(|k| k.get(&table.name)).map(Vec::as_slice);
                        let rows = summarise(&db, table, &book, &cut, &before, only).await?;
                        let in_flight: Vec<String> = rows.unsettled().map(|r| r.key.clone()).collect();
                        counts.push(TableCount {
                            table: table.name.clone(),
                            rows: rows.len() as u64,
                            more_in_flight: in_flight.len() > accord_engine::verify::MAX_IN_FLIGHT,
                            in_flight: in_flight
                                .into_iter()
                                .take(accord_engine::verify::MAX_IN_FLIGHT)
                                .collect(),
                        });
                        summaries.insert(table.name.clone(), rows);
                    }
                    self.send(coordinator, VerifyMessage::Summarised { round, tables: counts });
                }
                VerifyMessage::Ranges { table, ranges, .. } => {
                    let of = summaries.get(&table);
                    let summaries = ranges
                        .iter()
                        .map(|r| of.map(|s| s.range(*r)).unwrap_or_default())
                        .collect();
                    self.send(coordinator, VerifyMessage::RangeSummaries { round, summaries });
                }
                VerifyMessage::Rows { table, ranges, .. } => {
                    let of = summaries.get(&table);
                    let rows = ranges
                        .iter()
                        .flat_map(|r| of.map(|s| s.rows(*r)).unwrap_or_default())
                        .collect();
                    self.send(coordinator, VerifyMessage::RowList { round, rows });
                }
                VerifyMessage::Fetch { table, keys, .. } => {
                    let def = policy
                        .table(&table)
                        .with_context(|| format!("table {table} is not replicated on node {}", hub.node))?;
                    let mut rows = Vec::new();
                    read_rows(
                        &db,
                        def,
                        &book,
                        last_cut.as_ref().context("rows fetched before the round's cut")?,
                        &before,
                        Some(&keys),
                        |row| {
                            rows.push(HeldRow {
                                columns: column_names(def),
                                ..row
                            })
                        },
                    )
                    .await?;
                    self.send(coordinator, VerifyMessage::Fetched { round, rows });
                }
                VerifyMessage::Repair { table, writes, .. } => {
                    let def = policy
                        .table(&table)
                        .with_context(|| format!("table {table} is not replicated on node {}", hub.node))?;
                    let outcomes = super::repair::write(&hub.dsn, hub.node, def, &writes).await?;
                    self.send(coordinator, VerifyMessage::Repaired { round, outcomes });
                }
                VerifyMessage::Close { .. } => break,
                other => bail!("unexpected in a round: {other:?}"),
            }
        }
        db.batch_execute("ROLLBACK").await?;
        Ok(())
    }

    // ---- coordinating ----------------------------------------------------------------

    /// Compares `tables` (empty: every replicated table) on every node.
    pub async fn verify(&self, tables: Vec<String>) -> Result<VerifyReport> {
        let mut nodes: Vec<NodeId> = self.inner.peers.borrow().clone();
        nodes.push(self.inner.node);
        nodes.sort();
        nodes.dedup();
        let mut report = VerifyReport {
            nodes: nodes.clone(),
            ..VerifyReport::default()
        };
        let mut scope = VerifyScope::Tables(tables);
        let mut reported: BTreeSet<(String, String)> = BTreeSet::new();
        for attempt in 0..=RECHECKS {
            if attempt > 0 {
                tokio::time::sleep(RECHECK_PAUSE * attempt).await;
            }
            let outcome = self.round(&nodes, &scope).await?;
            report.rounds += 1;
            if attempt == 0 {
                report.cut = outcome.cut;
                report.tables = outcome.counts;
            }
            for difference in outcome.differ {
                if reported.insert((difference.table.clone(), difference.key.clone())) {
                    report.differences.push(difference);
                }
            }
            report.unsettled = outcome
                .in_flight
                .into_iter()
                .map(|(table, keys)| (table, keys.into_iter().collect()))
                .collect();
            if report.unsettled.is_empty() {
                break;
            }
            scope = VerifyScope::Keys(report.unsettled.clone());
        }
        Ok(report)
    }

    /// Opens a round on every node and gives them its cut: the round, where its answers come,
    /// and what each node summarised. The caller closes it (`close`).
    async fn open(&self, nodes: &[NodeId], scope: &VerifyScope) -> Result<OpenRound> {
        let round = {
            let mut next = lock(&self.inner.next_round);
            *next += 1;
            *next
        };
        let (tx, mut answers) = mpsc::unbounded_channel();
        lock(&self.inner.coordinating).insert(round, tx);
        self.ask(
            nodes,
            VerifyMessage::Open {
                round,
                scope: scope.clone(),
            },
        );
        let opened = async {
            let opened = collect(&mut answers, nodes, |m| match m {
                VerifyMessage::Opened { applied, .. } => Some(applied),
                _ => None,
            })
            .await?;
            let cut = VerifyCut::of(&opened);
            let request = VerifyMessage::Summarise {
                round,
                cut: cut.clone(),
            };
            let summarised = self
                .exchange(&mut answers, nodes, request, |m| match m {
                    VerifyMessage::Summarised { tables, .. } => Some(tables),
                    _ => None,
                })
                .await?;
            Ok::<_, anyhow::Error>((cut, summarised))
        }
        .await;
        match opened {
            Ok((cut, summarised)) => Ok(OpenRound {
                round,
                answers,
                cut,
                summarised,
            }),
            Err(error) => {
                self.close(nodes, round);
                Err(error)
            }
        }
    }

    fn close(&self, nodes: &[NodeId], round: u64) {
        self.ask(nodes, VerifyMessage::Close { round });
        lock(&self.inner.coordinating).remove(&round);
    }

    fn ask(&self, nodes: &[NodeId], request: VerifyMessage) {
        for &node in nodes {
            self.send(node, request.clone());
        }
    }

    /// Asks every node of `nodes` and waits for their answers (`take` picks the expected kind).
    async fn exchange<T>(
        &self,
        answers: &mut mpsc::UnboundedReceiver<(NodeId, VerifyMessage)>,
        nodes: &[NodeId],
        request: VerifyMessage,
        take: impl FnMut(VerifyMessage) -> Option<T>,
    ) -> Result<Vec<T>> {
        self.ask(nodes, request);
        collect(answers, nodes, take).await
    }

    async fn round(&self, nodes: &[NodeId], scope: &VerifyScope) -> Result<RoundOutcome> {
        let OpenRound {
            round,
            mut answers,
            cut,
            summarised,
        } = self.open(nodes, scope).await?;
        let result = async {
            let mut outcome = RoundOutcome {
                cut,
                ..RoundOutcome::default()
            };
            let mut tables: BTreeSet<String> = BTreeSet::new();
            for (i, counts) in summarised.iter().enumerate() {
                for count in counts {
                    tables.insert(count.table.clone());
                    let per_node = outcome
                        .counts
                        .entry(count.table.clone())
                        .or_insert_with(|| vec![0; nodes.len()]);
                    per_node[i] = count.rows;
                    outcome
                        .in_flight
                        .entry(count.table.clone())
                        .or_default()
                        .extend(count.in_flight.iter().cloned());
                }
            }
            for table in tables {
                let mut descent = Descent::default();
                loop {
                    match descent.step() {
                        DescentStep::Summaries(ranges) => {
                            let request = VerifyMessage::Ranges {
                                round,
                                table: table.clone(),
                                ranges,
                            };
                            let per_node = self
                                .exchange(&mut answers, nodes, request, |m| match m {
                                    VerifyMessage::RangeSummaries { summaries, .. } => Some(summaries),
                                    _ => None,
                                })
                                .await?;
                            descent.summaries(&per_node);
                        }
                        DescentStep::Rows(ranges) => {
                            let request = VerifyMessage::Rows {
                                round,
                                table: table.clone(),
                                ranges,
                            };
                            let rows = self
                                .exchange(&mut answers, nodes, request, |m| match m {
                                    VerifyMessage::RowList { rows, .. } => Some(rows),
                                    _ => None,
                                })
                                .await?;
                            let per_node: Vec<(NodeId, Vec<RowSummary>)> = nodes.iter().copied().zip(rows).collect();
                            let verdicts = compare_rows(&table, &per_node);
                            outcome.differ.extend(verdicts.differ);
                            outcome
                                .in_flight
                                .entry(table.clone())
                                .or_default()
                                .extend(verdicts.in_flight);
                        }
                        DescentStep::Done => break,
                    }
                }
            }
            // A key that differs is reported, not rechecked.
            for difference in &outcome.differ {
                if let Some(keys) = outcome.in_flight.get_mut(&difference.table) {
                    keys.remove(&difference.key);
                }
            }
            outcome.in_flight.retain(|_, keys| !keys.is_empty());
            Ok::<_, anyhow::Error>(outcome)
        }
        .await;
        self.close(nodes, round);
        result
    }

    /// Verifies, repairs what differs (`engine::verify::repair_plan`: every node gets the row as
    /// accord replicated it, what it held instead kept in its `accord.repaired`), and verifies
    /// again.
    pub async fn repair(&self, tables: Vec<String>) -> Result<RepairReport> {
        let before = self.verify(tables.clone()).await?;
        let mut report = RepairReport {
            before,
            ..RepairReport::default()
        };
        if report.before.differences.is_empty() {
            report.after = report.before.clone();
            return Ok(report);
        }
        let nodes = report.before.nodes.clone();
        let mut keys: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for difference in &report.before.differences {
            keys.entry(difference.table.clone())
                .or_default()
                .push(difference.key.clone());
        }
        let OpenRound { round, mut answers, .. } = self.open(&nodes, &VerifyScope::Keys(keys.clone())).await?;
        let repaired = async {
            for (table, keys) in &keys {
                let request = VerifyMessage::Fetch {
                    round,
                    table: table.clone(),
                    keys: keys.clone(),
                };
                let fetched = self
                    .exchange(&mut answers, &nodes, request, |m| match m {
                        VerifyMessage::Fetched { rows, .. } => Some(rows),
                        _ => None,
                    })
                    .await?;
                let mut writes: BTreeMap<NodeId, Vec<RepairWrite>> = BTreeMap::new();
                let fetched: Vec<(NodeId, Vec<HeldRow>)> = nodes.iter().copied().zip(fetched).collect();
                for (key, per_node) in rows_by_key(&fetched, |r| &r.key) {
                    match repair_plan(&per_node) {
                        RepairPlan::Write(planned) => {
                            for (node, write) in planned {
                                writes.entry(node).or_default().push(write);
                            }
                        }
                        RepairPlan::Leave(why) => report.left.push(RepairedKey {
                            table: table.clone(),
                            key: key.to_owned(),
                            node: None,
                            why: Some(why),
                        }),
                    }
                }
                let writers: Vec<NodeId> = writes.keys().copied().collect();
                for (node, writes) in writes {
                    self.send(
                        node,
                        VerifyMessage::Repair {
                            round,
                            table: table.clone(),
                            writes,
                        },
                    );
                }
                let outcomes = collect(&mut answers, &writers, |m| match m {
                    VerifyMessage::Repaired { outcomes, .. } => Some(outcomes),
                    _ => None,
                })
                .await?;
                for (node, outcomes) in writers.iter().zip(outcomes) {
                    for RepairOutcome { key, skipped } in outcomes {
                        let entry = RepairedKey {
                            table: table.clone(),
                            key,
                            node: Some(*node),
                            why: skipped.clone(),
                        };
                        match skipped {
                            None => report.repaired.push(entry),
                            Some(_) => report.left.push(entry),
                        }
                    }
                }
            }
            Ok::<_, anyhow::Error>(())
        }
        .await;
        self.close(&nodes, round);
        repaired?;
        report.after = self.verify(tables).await?;
        Ok(report)
    }
}

struct OpenRound {
    round: u64,
    answers: mpsc::UnboundedReceiver<(NodeId, VerifyMessage)>,
    cut: VerifyCut,
    summarised: Vec<Vec<TableCount>>,
}

/// What `accord repair` reports: the verification before, what it wrote where, what it left
/// and why, and the verification after.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct RepairReport {
    pub before: VerifyReport,
    pub repaired: Vec<RepairedKey>,
    pub left: Vec<RepairedKey>,
    pub after: VerifyReport,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RepairedKey {
    pub table: String,
    pub key: String,
    /// The node written (or that refused the write); `None` when no node was asked.
    pub node: Option<NodeId>,
    /// Why it was left as it is; `None` when repaired.
    pub why: Option<String>,
}

#[derive(Default)]
struct RoundOutcome {
    cut: VerifyCut,
    counts: BTreeMap<String, Vec<u64>>,
    differ: Vec<KeyDifference>,
    in_flight: BTreeMap<String, BTreeSet<String>>,
}

/// Waits for every node's answer to the last request, in `nodes`' order.
async fn collect<T>(
    answers: &mut mpsc::UnboundedReceiver<(NodeId, VerifyMessage)>,
    nodes: &[NodeId],
    mut take: impl FnMut(VerifyMessage) -> Option<T>,
) -> Result<Vec<T>> {
    let mut got: BTreeMap<NodeId, T> = BTreeMap::new();
    while got.len() < nodes.len() {
        let (from, message) = tokio::time::timeout(ANSWER_LIMIT, answers.recv())
            .await
            .map_err(|_| {
                anyhow!(
                    "no answer within {ANSWER_LIMIT:?} from node(s) {}",
                    missing(nodes, &got)
                )
            })?
            .ok_or_else(|| anyhow!("the node is stopping"))?;
        if let VerifyMessage::Failed { error, .. } = &message {
            bail!("node {from}: {error}");
        }
        if let Some(value) = take(message) {
            got.insert(from, value);
        }
    }
    Ok(nodes.iter().filter_map(|n| got.remove(n)).collect())
}

fn missing<T>(nodes: &[NodeId], got: &BTreeMap<NodeId, T>) -> String {
    nodes
        .iter()
        .filter(|n| !got.contains_key(n))
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

// ---- reading a node's rows -------------------------------------------------------------

/// PostgreSQL's snapshot of running transactions (`pg_current_snapshot()`), noted before the
/// probe: a transaction it shows committed was read by the capture once the capture passed it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct NotedSnapshot {
    xmin: u64,
    xmax: u64,
    running: BTreeSet<u64>,
}

impl NotedSnapshot {
    fn parse(text: &str) -> Result<NotedSnapshot> {
        let mut parts = text.splitn(3, ':');
        let mut number = |what: &str| -> Result<u64> {
            parts
                .next()
                .with_context(|| format!("snapshot {text:?} has no {what}"))?
                .parse()
                .with_context(|| format!("snapshot {text:?}: bad {what}"))
        };
        let (xmin, xmax) = (number("xmin")?, number("xmax")?);
        let running = match parts.next() {
            Some(list) if !list.is_empty() => list
                .split(',')
                .map(|x| x.parse().with_context(|| format!("snapshot {text:?}: bad xid {x}")))
                .collect::<Result<_>>()?,
            _ => BTreeSet::new(),
        };
        Ok(NotedSnapshot { xmin, xmax, running })
    }

    /// Whether the transaction `xid` (a row's 32-bit xmin) had committed when the snapshot was
    /// taken. Its epoch is the snapshot's, or the one before for an xid above the snapshot's.
    fn committed_before(&self, xid: u32) -> bool {
        let epoch = self.xmax >> 32;
        let mut full = (epoch << 32) | u64::from(xid);
        if full > self.xmax && epoch > 0 {
            full -= 1 << 32;
        }
        full < self.xmin || (full < self.xmax && !self.running.contains(&full))
    }
}

/// Every row of `table` (or of the keys `only`) under `cut`, summarised.
async fn summarise(
    db: &Client,
    table: &TableDef,
    book: &ShapeBook,
    cut: &VerifyCut,
    before: &NotedSnapshot,
    only: Option<&[String]>,
) -> Result<TableSummaries> {
    let mut out = Vec::new();
    read_rows(db, table, book, cut, before, only, |row| {
        out.push(RowSummary {
            key_hash: key_hash(&table.name, &row.key),
            present: row.values.is_some(),
            key: row.key,
            digest: row.digest,
            standing: row.standing,
        })
    })
    .await?;
    Ok(TableSummaries::new(out))
}

/// Every row of `table` (or of the keys `only`) under `cut`, with its metadata, in the
/// transaction's snapshot: one pass over the table joined with its metadata. Settled tombstones
/// are left out (as good as absent: a node may have collected them).
async fn read_rows(
    db: &Client,
    table: &TableDef,
    book: &ShapeBook,
    cut: &VerifyCut,
    before: &NotedSnapshot,
    only: Option<&[String]>,
    mut each: impl FnMut(HeldRow),
) -> Result<()> {
    let key_types: Vec<String> = {
        let mut types = Vec::new();
        for key in &table.key {
            let row = db
                .query_one(
                    "SELECT pg_catalog.format_type(atttypid, atttypmod) FROM pg_catalog.pg_attribute
                      WHERE attrelid = to_regclass($1) AND attname = $2 AND NOT attisdropped",
                    &[&quote_table(&table.name), &key.name],
                )
                .await
                .with_context(|| format!("the type of {}.{}", table.name, key.name))?;
            types.push(row.get(0));
        }
        types
    };
    let meta_keys: Vec<String> = key_types
        .iter()
        .enumerate()
        .map(|(i, ty)| format!("(row_key::jsonb->>{i})::{ty} AS k{i}"))
        .collect();
    let join: Vec<String> = table
        .key
        .iter()
        .enumerate()
        .map(|(i, k)| format!("t.{} = m.k{i}", quote_ident(&k.name)))
        .collect();
    let mut select = vec!["t.xmin::text".to_owned()];
    select.extend(
        table
            .key
            .iter()
            .map(|k| format!("t.{}", super::rows::read_expr(&k.name, &k.ty))),
    );
    select.extend(
        table
            .columns
            .iter()
            .map(|c| format!("t.{}", super::rows::read_expr(&c.name, &c.ty))),
    );
    select.extend(["m.row_key", "m.meta", "m.known_xmin", "m.shape"].map(str::to_owned));
    let mut sql = format!(
        "SELECT {} FROM {} AS t FULL JOIN (SELECT row_key, meta, known_xmin, shape, {} FROM accord.row_meta
          WHERE table_name = $1) AS m ON {}",
        select.join(", "),
        quote_table(&table.name),
        meta_keys.join(", "),
        join.join(" AND ")
    );
    let keys: Vec<String> = only.map(<[String]>::to_vec).unwrap_or_default();
    if only.is_some() {
        let wanted: Vec<String> = key_types
            .iter()
            .enumerate()
            .map(|(i, ty)| format!("(k::jsonb->>{i})::{ty}"))
            .collect();
        let columns: Vec<String> = table
            .key
            .iter()
            .map(|k| format!("t.{}", quote_ident(&k.name)))
            .collect();
        sql.push_str(&format!(
            " WHERE m.row_key = ANY($2) OR ({}) IN (SELECT {} FROM unnest($2::text[]) AS k)",
            columns.join(", "),
            wanted.join(", ")
        ));
    }
    let params: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> = if only.is_some() {
        vec![&table.name, &keys]
    } else {
        vec![&table.name]
    };
    let rows = db
        .query_raw(&sql, params)
        .await
        .with_context(|| format!("cannot read {} and its metadata", table.name))?;
    pin_mut!(rows);
    let names = column_names(table);
    let keys_of = table.key.len();
    let current = table.shape_id();
    while let Some(row) = rows.try_next().await? {
        let xmin: Option<String> = row.try_get(0)?;
        let at = 1 + keys_of + table.columns.len();
        let stored_key: Option<String> = row.try_get(at)?;
        let meta: Option<RowMeta> = match row.try_get::<_, Option<&[u8]>>(at + 1)? {
            Some(bytes) => {
                let meta: RowMeta = decode("row metadata", bytes)?;
                let shape = row.try_get::<_, Option<i64>>(at + 3)?.map(shape_of);
                if shape == Some(current) {
                    // Hashing the table's definition for every row was a tenth of the read.
                    Some(meta)
                } else {
                    Some(book.stored_meta(meta, shape, table)?)
                }
            }
            None => None,
        };
        let known: Option<String> = row.try_get(at + 2)?;
        let key = match (&xmin, &stored_key) {
            (Some(_), _) => {
                let mut parts = Vec::with_capacity(keys_of);
                for (i, column) in table.key.iter().enumerate() {
                    let text: Option<String> = row.try_get(1 + i)?;
                    let text = text.with_context(|| format!("{}.{} is NULL", table.name, column.name))?;
                    parts.push(
                        Value::parse(&column.ty, &text).map_err(|e| anyhow!("{}.{}: {e}", table.name, column.name))?,
                    );
                }
                key_text(&RowKey(parts))
            }
            (None, Some(stored)) => stored.clone(),
            (None, None) => continue,
        };
        let values: Option<BTreeMap<String, Option<String>>> = match &xmin {
            Some(_) => {
                let mut values = BTreeMap::new();
                for (i, column) in table.columns.iter().enumerate() {
                    values.insert(column.name.clone(), row.try_get::<_, Option<String>>(1 + keys_of + i)?);
                }
                Some(values)
            }
            None => None,
        };
        let stored = match (&xmin, &meta) {
            (Some(xmin), _) if known.as_deref() == Some(xmin.as_str()) => Stored::AsKnown,
            (Some(xmin), _) => {
                let xid: u32 = xmin.parse().with_context(|| format!("xmin {xmin}"))?;
                if before.committed_before(xid) {
                    Stored::Unaccounted
                } else {
                    Stored::Newer
                }
            }
            // Gone from the table while its metadata says alive: a delete the capture has not
            // read yet, or, once a recheck round finds it still so (its probe came after the
            // first round's snapshot), one it never will.
            (None, Some(meta)) if meta.is_alive() => {
                if only.is_some() {
                    Stored::Unaccounted
                } else {
                    Stored::Newer
                }
            }
            (None, _) => Stored::AsKnown,
        };
        let standing = standing(meta.as_ref(), stored, cut);
        if values.is_none() && standing == Standing::Settled {
            // A settled tombstone: as good as absent (a node may have collected it).
            continue;
        }
        let digest = row_digest(
            &table.name,
            &key,
            values.as_ref(),
            meta.as_ref().map(|m| (m, names.as_slice())),
        );
        each(HeldRow {
            key,
            values,
            meta,
            // Named by the caller that keeps the row (`Fetch`): most rows are only summarised.
            columns: Vec::new(),
            xmin,
            standing,
            digest,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::NotedSnapshot;

    #[test]
    fn a_noted_snapshot_tells_committed_transactions_from_later_and_running_ones() {
        let snapshot = NotedSnapshot::parse("100:110:103,105").unwrap();
        assert!(snapshot.committed_before(99));
        assert!(snapshot.committed_before(104));
        assert!(!snapshot.committed_before(103), "running");
        assert!(!snapshot.committed_before(110), "not yet begun");
        assert!(NotedSnapshot::parse("7:7:").unwrap().committed_before(6));
        // An xid of the epoch before: its 32 bits above the snapshot's.
        let wrapped = NotedSnapshot::parse(&format!("{}:{}:", (1u64 << 32) + 5, (1u64 << 32) + 9)).unwrap();
        assert!(wrapped.committed_before(u32::MAX));
        assert!(wrapped.committed_before(4));
        assert!(!wrapped.committed_before(9));
    }
}
