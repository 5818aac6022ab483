//! `accord verify` on a running node: the node asked (the coordinator) runs rounds with every
//! node over the mesh, itself included; each node answers a round from one snapshot of its
//! database. The rules (cuts, standings, digests, the descent over key-hash ranges) are
//! `engine::verify`'s; this module reads PostgreSQL and carries the messages.
//!
//! A round on a node: it notes its snapshot of running transactions, writes a probe and waits
//! for its capture to read past it (so every write committed before the note has been captured,
//! or never will be), opens a repeatable-read transaction and reports what it has applied. The
//! coordinator takes the cut of the reports, and each node sums its tables per bucket of the key
//! hash in one pass (`verify_read`), answering the coordinator's ranges from those sums and
//! reading rows carefully only where the descent leads.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use accord_engine::{
    compare_rows, repair_plan, rows_by_key, verify::column_names, BucketSums, Descent, DescentStep, HeldRow,
    KeyDifference, NodeId, RangeSummary, RepairOutcome, RepairPlan, RepairWrite, RowSummary, TableCount, TableDef,
    TableSummaries, VerifyCut, VerifyMessage, VerifyScope,
};
use anyhow::{anyhow, bail, Context, Result};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, watch};

use super::capture::CaptureProgress;
use super::store;
use super::tagging::replicated_policy;
use super::verify_read::{NotedSnapshot, Reading, TableReader, TEXT_SETTINGS};
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
    /// How long the first round took (every node reading its tables whole, at once).
    #[serde(default)]
    pub seconds: f64,
}

impl VerifyReport {
    /// Rows each node read per second in the first round: the most rows any node holds, over
    /// the round's time.
    pub fn rows_per_second(&self) -> Option<f64> {
        let rows: u64 = self
            .tables
            .values()
            .map(|per_node| per_node.iter().copied().max().unwrap_or(0))
            .sum();
        (self.seconds > 0.0).then(|| rows as f64 / self.seconds)
    }

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
        let started = std::time::Instant::now();
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
        db.batch_execute(TEXT_SETTINGS).await?;
        db.batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
            .await?;
        let applied = store::snapshot_positions(&db, hub.node).await?;
        tracing::debug!(round, elapsed = ?started.elapsed(), "verify: snapshot taken after the capture passed the probe");
        self.send(coordinator, VerifyMessage::Opened { round, applied });

        let mut summed: BTreeMap<String, (TableReader, Summed)> = BTreeMap::new();
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
                        let reader = TableReader::new(&db, table).await?;
                        let count = match keys.and_then(|k| k.get(&table.name)) {
                            // A recheck: the keys read carefully, their standings known now.
                            Some(only) => {
                                let mut rows = Vec::new();
                                reader
                                    .read_rows(
                                        &db,
                                        &Reading {
                                            book: &book,
                                            cut: &cut,
                                            before: &before,
                                        },
                                        only,
                                        true,
                                        |key_hash, row| rows.push(summary_of(key_hash, &row)),
                                    )
                                    .await?;
                                let rows = TableSummaries::new(rows);
                                let in_flight: Vec<String> = rows.unsettled().map(|r| r.key.clone()).collect();
                                let count = TableCount {
                                    table: table.name.clone(),
                                    rows: rows.len() as u64,
                                    more_in_flight: in_flight.len() > accord_engine::verify::MAX_IN_FLIGHT,
                                    in_flight: in_flight
                                        .into_iter()
                                        .take(accord_engine::verify::MAX_IN_FLIGHT)
                                        .collect(),
                                };
                                summed.insert(table.name.clone(), (reader, Summed::Rows(rows)));
                                count
                            }
                            // A whole table: one pass summing buckets; standings are read only
                            // where the descent leads.
                            None => {
                                let (sums, rows) = reader.sum_buckets(&db).await?;
                                tracing::debug!(table = %table.name, rows, elapsed = ?started.elapsed(), "verify: table summed");
                                summed.insert(table.name.clone(), (reader, Summed::Buckets(sums)));
                                TableCount {
                                    table: table.name.clone(),
                                    rows,
                                    in_flight: Vec::new(),
                                    more_in_flight: false,
                                }
                            }
                        };
                        counts.push(count);
                    }
                    self.send(coordinator, VerifyMessage::Summarised { round, tables: counts });
                }
                VerifyMessage::Ranges { table, ranges, .. } => {
                    let summaries = match summed.get(&table) {
                        None => vec![RangeSummary::default(); ranges.len()],
                        Some((_, Summed::Rows(rows))) => ranges.iter().map(|r| rows.range(*r)).collect(),
                        Some((reader, Summed::Buckets(sums))) => {
                            match ranges.iter().map(|r| sums.range(*r)).collect::<Option<Vec<_>>>() {
                                Some(summaries) => summaries,
                                None => reader.sum_ranges(&db, &ranges).await?,
                            }
                        }
                    };
                    self.send(coordinator, VerifyMessage::RangeSummaries { round, summaries });
                }
                VerifyMessage::Rows { table, ranges, .. } => {
                    let rows = match summed.get(&table) {
                        None => Vec::new(),
                        Some((_, Summed::Rows(rows))) => ranges.iter().flat_map(|r| rows.rows(*r)).collect(),
                        Some((reader, Summed::Buckets(_))) => {
                            tracing::debug!(%table, ranges = ranges.len(), "verify: reading the rows of differing ranges");
                            let cut = last_cut.as_ref().context("rows asked for before the round's cut")?;
                            let mut rows = Vec::new();
                            reader
                                .read_ranges(
                                    &db,
                                    &Reading {
                                        book: &book,
                                        cut,
                                        before: &before,
                                    },
                                    &ranges,
                                    |key_hash, row| rows.push(summary_of(key_hash, &row)),
                                )
                                .await?;
                            rows
                        }
                    };
                    self.send(coordinator, VerifyMessage::RowList { round, rows });
                }
                VerifyMessage::Fetch { table, keys, .. } => {
                    let def = policy
                        .table(&table)
                        .with_context(|| format!("table {table} is not replicated on node {}", hub.node))?;
                    let mut rows = Vec::new();
                    TableReader::new(&db, def)
                        .await?
                        .read_rows(
                            &db,
                            &Reading {
                                book: &book,
                                cut: last_cut.as_ref().context("rows fetched before the round's cut")?,
                                before: &before,
                            },
                            &keys,
                            true,
                            |_, row| {
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
            let started = std::time::Instant::now();
            let outcome = self.round(&nodes, &scope).await?;
            report.rounds += 1;
            if attempt == 0 {
                report.seconds = started.elapsed().as_secs_f64();
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

/// What a node keeps of a table for the rest of a round.
enum Summed {
    /// A pass's sums: ranges of whole buckets are answered from them; finer ranges and rows are
    /// read again.
    Buckets(BucketSums),
    /// The rows of a recheck's keys, read carefully.
    Rows(TableSummaries),
}

fn summary_of(key_hash: u64, row: &HeldRow) -> RowSummary {
    RowSummary {
        key_hash,
        key: row.key.clone(),
        digest: row.digest,
        standing: row.standing,
        present: row.values.is_some(),
    }
}
