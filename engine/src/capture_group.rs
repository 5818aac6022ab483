//! The capture's group writer: what the decoded transactions of one group write, decided once for
//! the service and the simulator.
//!
//! A group is the decoded transactions the stream had ready, written to the database in one
//! transaction together with the checkpoint that covers the last of them. The driver asks which
//! rows' metadata the group needs ([`Capturer::rows_to_load`]), loads them (locked), and hands
//! them to [`Capturer::capture_group`], which runs the capturer over every transaction in commit
//! order and returns the [`GroupWrite`]: the outbound changes, each row's final metadata with the
//! xmin it accounts for, the review actions and the checkpoint. The capturer moves on only when
//! the whole group was captured; on a [`CaptureStop`] it is left as it was.

use std::collections::BTreeMap;

use thiserror::Error;

use crate::apply::Xid;
use crate::capture::CaptureError;
use crate::capturer::{CaptureCheckpoint, Capturer};
use crate::change::{CapturedChange, ChangeKind, RowChange, RowKey};
use crate::collection::StableCut;
use crate::hlc::{Hlc, NodeId};
use crate::review::{ReviewAction, ReviewItemId};
use crate::schema::TableDef;
use crate::state::RowMeta;

/// One committed transaction as decoding delivered it.
#[derive(Debug, Clone, Default)]
pub struct DecodedTransaction {
    /// The end position of its commit.
    pub end_lsn: u64,
    pub xid: Xid,
    /// Its commit time, µs since the Unix epoch.
    pub commit_time: u64,
    /// It carries a replication origin: a merge of a peer's changes, not this node's own.
    pub from_peer: bool,
    /// For a merge of accord's: per peer, the last of its changes whose effects the merge's
    /// rows may carry: the peer whose changes it applied and the last of them (its replication
    /// origin and position), and what those changes built on (`ApplyCommand::Commit`).
    pub peer_applied: Vec<(NodeId, u64)>,
    /// The greatest stamp it merged (the `accord.hlc` message of a merge).
    pub merged: Option<Hlc>,
    pub rows: Vec<DecodedRow>,
    /// TRUNCATEs of replicated tables, in order, each with its place among `rows`.
    pub truncates: Vec<Truncate>,
    /// Which part of its transaction this is. A local transaction too large to hold in memory
    /// is captured in parts as it is decoded, each part a group of its own, all written in one
    /// database transaction that commits with the last (`Capture` in the service). Whole when
    /// both are false.
    pub part: TransactionPart,
}

/// Where a part of a transaction captured in parts stands (see `DecodedTransaction::part`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TransactionPart {
    /// Parts of the transaction came before this one: the capturer is inside it already.
    pub continued: bool,
    /// More parts follow: the transaction does not end here. Its changes name no last change
    /// yet ([`OPEN_TRANSACTION`]); the last part's do.
    pub continues: bool,
}

/// The `RowChange::tx_last` of a change whose transaction's end was not known when it was
/// captured (a transaction captured in parts): greater than every sequence number, so it never
/// ends a transaction at a receiver; the last part's changes end it.
pub const OPEN_TRANSACTION: u64 = u64::MAX;

/// A TRUNCATE of a replicated table, replicated as a delete of every row it emptied, so that it
/// meets concurrent writes as a `DELETE` does (ARCHITECTURE.md, "TRUNCATE").
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Truncate {
    /// How many of the transaction's rows came before it.
    pub before_row: usize,
    pub table: String,
    /// The keys of the rows it emptied (decoding names only the table: the service records them
    /// in the truncating transaction).
    pub emptied: Vec<RowKey>,
}

/// One row change of a decoded transaction, with the review items the transaction resolved
/// before it.
#[derive(Debug, Clone)]
pub struct DecodedRow {
    pub table: String,
    pub change: CapturedChange,
    pub resolving: Vec<ReviewItemId>,
}

/// One thing a transaction asks the capture to capture.
enum Entry<'t> {
    Row(&'t DecodedRow),
    /// A row a TRUNCATE emptied: a delete.
    Emptied(&'t RowKey),
}

/// A change the group captured, with where it came from.
#[derive(Debug, Clone)]
pub struct CapturedRow {
    /// Its transaction's and row's places in the group.
    pub transaction: usize,
    pub row: usize,
    pub change: RowChange,
    /// A delete of a row a TRUNCATE emptied (`row` is then the TRUNCATE's place among the rows).
    pub truncated: bool,
    /// The row had metadata (alive or a tombstone not yet collected) before this change; without,
    /// an insert was numbered as a new key's.
    pub had_metadata: bool,
}

/// A row's metadata after the group, and the xmin of the row version it accounts for (`None`
/// when the row is deleted).
#[derive(Debug, Clone)]
pub struct MetaWrite {
    pub table: String,
    pub key: RowKey,
    pub meta: RowMeta,
    pub known_xmin: Option<Xid>,
}

/// What one group writes, in one database transaction.
#[derive(Debug, Clone)]
pub struct GroupWrite {
    /// For the outbound log, in sequence order.
    pub changes: Vec<CapturedRow>,
    /// In (table, key) order.
    pub metas: Vec<MetaWrite>,
    pub review: Vec<ReviewAction>,
    /// Covers the group's last transaction.
    pub checkpoint: CaptureCheckpoint,
    /// False when the group changes nothing persisted but the checkpoint: peers' merges,
    /// replays. The driver may skip the write, and a restart, from an older checkpoint, skips
    /// those transactions again. A merge's stamp moves the clock without a write: each merge
    /// records it with its commit, and the restarted capture passes those records
    /// (`Capturer::merged_before`), so a synchronous commit per merged batch is not needed.
    pub needs_write: bool,
}

/// A local change that cannot be replicated as it is. Dropping it would leave the peers without
/// it for good, so the capture stops before it, and the slot keeps it (and everything after it)
/// until the cause is fixed.
#[derive(Debug, Clone, Error)]
#[error(
    "a local change of {table} {key} (transaction {xid}) cannot be replicated: {cause}; the capture stops \
     before it and the replication slot keeps it"
)]
pub struct CaptureStop {
    pub table: String,
    pub key: RowKey,
    pub xid: Xid,
    /// (Not a `#[source]`: the message already says it, and chains would print it twice.)
    pub cause: CaptureError,
}

impl Capturer {
    /// The rows whose metadata [`Capturer::capture_group`] needs, in (table, key) order: the rows
    /// of the group's local transactions not covered before.
    pub fn rows_to_load(&self, transactions: &[DecodedTransaction]) -> Vec<(String, RowKey)> {
        let covered = self.checkpoint().covered_lsn;
        let mut slots: Vec<(String, RowKey)> = transactions
            .iter()
            .filter(|t| !t.from_peer && t.end_lsn > covered)
            .flat_map(|t| {
                let rows = t.rows.iter().map(|r| (r.table.clone(), r.change.key.clone()));
                let emptied = t
                    .truncates
                    .iter()
                    .flat_map(|tr| tr.emptied.iter().map(|k| (tr.table.clone(), k.clone())));
                rows.chain(emptied)
            })
            .collect();
        slots.sort();
        slots.dedup();
        slots
    }

    /// Captures the group's transactions in commit order. `loaded[i]` is the metadata (if any) of
    /// `rows_to_load(transactions)[i]`; `cut` the latest completed collection round, under which
    /// a covered tombstone reads as absent (a re-insert is numbered as a new key's, as on a node
    /// that already dropped it). Rows of one key later in the group see what earlier ones left.
    pub fn capture_group<'t>(
        &mut self,
        tables: impl Fn(&str) -> Option<&'t TableDef>,
        transactions: &[DecodedTransaction],
        loaded: Vec<Option<RowMeta>>,
        cut: Option<&StableCut>,
    ) -> Result<GroupWrite, Box<CaptureStop>> {
        let before = self.checkpoint();
        let mut next = self.clone();
        let slots = self.rows_to_load(transactions);
        let mut metas: BTreeMap<(String, RowKey), RowMeta> = BTreeMap::new();
        for (slot, meta) in slots.into_iter().zip(loaded) {
            if let Some(meta) = StableCut::live(cut, meta.as_ref()) {
                metas.insert(slot, meta.clone());
            }
        }
        let mut known: BTreeMap<(String, RowKey), Option<Xid>> = BTreeMap::new();
        let mut changes = Vec::new();
        let mut review = Vec::new();
        for (ti, t) in transactions.iter().enumerate() {
            if !t.part.continued {
                next.begin(t.end_lsn, t.commit_time);
                if t.from_peer {
                    next.from_peer(&t.peer_applied);
                }
                if let Some(stamp) = t.merged {
                    next.merged(stamp);
                }
            }
            let local = next.is_capturing();
            let first = changes.len();
            // The transaction's rows, each TRUNCATE's deletes at its place among them.
            let entries = (0..=t.rows.len()).flat_map(|ri| {
                let emptied = t
                    .truncates
                    .iter()
                    .filter(move |tr| tr.before_row == ri)
                    .flat_map(move |tr| tr.emptied.iter().map(move |key| (ri, &tr.table, Entry::Emptied(key))));
                emptied.chain(t.rows.get(ri).map(|row| (ri, &row.table, Entry::Row(row))))
            });
            for (ri, table_name, entry) in entries {
                let Some(table) = tables(table_name) else { continue };
                let delete;
                let (change, resolving, truncated) = match entry {
                    Entry::Row(row) => (&row.change, row.resolving.as_slice(), false),
                    Entry::Emptied(key) => {
                        delete = CapturedChange {
                            kind: ChangeKind::Delete,
                            key: key.clone(),
                            old: None,
                            new: None,
                        };
                        (&delete, &[][..], true)
                    }
                };
                let slot = (table_name.clone(), change.key.clone());
                let prior = metas.get(&slot);
                let had_metadata = prior.is_some();
                let captured = next.row(table, prior, change, resolving).map_err(|cause| {
                    Box::new(CaptureStop {
                        table: table_name.clone(),
                        key: change.key.clone(),
                        xid: t.xid,
                        cause,
                    })
                })?;
                let Some(captured) = captured else {
                    // A local update that changed nothing accord tracks still made a new row
                    // version: the unchanged metadata now accounts for it, or a merge would wait
                    // for a capture that already happened.
                    if local && change.kind == ChangeKind::Update && prior.is_some_and(RowMeta::is_alive) {
                        known.insert(slot, Some(t.xid));
                    }
                    continue;
                };
                known.insert(slot.clone(), captured.meta.is_alive().then_some(t.xid));
                review.extend(captured.review);
                metas.insert(slot, captured.meta);
                changes.push(CapturedRow {
                    transaction: ti,
                    row: ri,
                    change: captured.change,
                    truncated,
                    had_metadata,
                });
            }
            // Every change of the transaction names its last (receivers apply them together) and
            // what the node had applied from the others when it committed.
            let made = &mut changes[first..];
            if let Some(last) = made.last().map(|c| c.change.seq) {
                let last = if t.part.continues { OPEN_TRANSACTION } else { last };
                let builds_on = next.builds_on();
                for c in made {
                    c.change.tx_last = last;
                    c.change.builds_on.clone_from(&builds_on);
                }
            }
            if !t.part.continues {
                next.commit();
            }
        }
        let checkpoint = next.checkpoint();
        let metas: Vec<MetaWrite> = known
            .into_iter()
            .filter_map(|(slot, known_xmin)| {
                let meta = metas.remove(&slot)?;
                Some(MetaWrite {
                    table: slot.0,
                    key: slot.1,
                    meta,
                    known_xmin,
                })
            })
            .collect();
        let needs_write =
            !changes.is_empty() || !metas.is_empty() || !review.is_empty() || checkpoint.last_seq != before.last_seq;
        *self = next;
        Ok(GroupWrite {
            changes,
            metas,
            review,
            checkpoint,
            needs_write,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hlc::NodeId;
    use crate::schema::ColumnPolicy;
    use crate::state::Cell;
    use crate::value::Value;

    fn table() -> TableDef {
        crate::capturer::tests::table_with(ColumnPolicy::Lww)
    }

    fn row(kind: ChangeKind, k: i64, old: Option<i64>, new: Option<i64>) -> DecodedRow {
        let cells = |v: Option<i64>| v.map(|v| vec![Cell::Value(Value::Int(v))]);
        DecodedRow {
            table: "s.t".into(),
            change: CapturedChange {
                kind,
                key: RowKey(vec![Value::Int(k)]),
                old: cells(old),
                new: cells(new),
            },
            resolving: Vec::new(),
        }
    }

    fn tx(end_lsn: u64, xid: Xid, rows: Vec<DecodedRow>) -> DecodedTransaction {
        DecodedTransaction {
            end_lsn,
            xid,
            commit_time: 1_000 * end_lsn,
            rows,
            ..DecodedTransaction::default()
        }
    }

    #[test]
    fn later_rows_of_a_key_see_the_metadata_earlier_ones_left() {
        let t = table();
        let mut c = Capturer::new(NodeId(1), 500);
        let group = vec![
            tx(10, 100, vec![row(ChangeKind::Insert, 1, None, Some(1))]),
            tx(20, 101, vec![row(ChangeKind::Update, 1, Some(1), Some(2))]),
        ];
        assert_eq!(c.rows_to_load(&group).len(), 1);
        let write = c.capture_group(|_| Some(&t), &group, vec![None], None).unwrap();
        assert_eq!(write.changes.len(), 2);
        assert!(!write.changes[0].had_metadata);
        assert!(write.changes[1].had_metadata);
        assert_eq!(write.metas.len(), 1);
        assert_eq!(write.metas[0].known_xmin, Some(101));
        assert_eq!(write.checkpoint.covered_lsn, 20);
        assert_eq!(write.checkpoint.last_seq, 2);
    }

    #[test]
    fn a_truncate_deletes_the_rows_it_emptied_at_its_place_among_the_rows() {
        let t = table();
        let mut c = Capturer::new(NodeId(1), 500);
        let earlier: Vec<DecodedRow> = (1..=3).map(|k| row(ChangeKind::Insert, k, None, Some(k))).collect();
        let before = c
            .capture_group(|_| Some(&t), &[tx(10, 100, earlier)], vec![None; 3], None)
            .unwrap();
        let key = |k: i64| RowKey(vec![Value::Int(k)]);
        // In one transaction: insert 4, TRUNCATE (emptying 1-4), insert 2 again.
        let mut truncating = tx(
            20,
            101,
            vec![
                row(ChangeKind::Insert, 4, None, Some(4)),
                row(ChangeKind::Insert, 2, None, Some(20)),
            ],
        );
        truncating.truncates = vec![Truncate {
            before_row: 1,
            table: "s.t".into(),
            emptied: vec![key(1), key(2), key(3), key(4)],
        }];
        let group = vec![truncating];
        let slots = c.rows_to_load(&group);
        assert_eq!(slots.len(), 4, "the emptied rows' metadata is loaded: {slots:?}");
        let loaded = slots
            .iter()
            .map(|(_, k)| before.metas.iter().find(|m| &m.key == k).map(|m| m.meta.clone()))
            .collect();
        let write = c.capture_group(|_| Some(&t), &group, loaded, None).unwrap();
        let made: Vec<(ChangeKind, RowKey, bool)> = write
            .changes
            .iter()
            .map(|w| (w.change.kind, w.change.key.clone(), w.truncated))
            .collect();
        assert_eq!(
            made,
            [
                (ChangeKind::Insert, key(4), false),
                (ChangeKind::Delete, key(1), true),
                (ChangeKind::Delete, key(2), true),
                (ChangeKind::Delete, key(3), true),
                (ChangeKind::Delete, key(4), true),
                (ChangeKind::Insert, key(2), false),
            ]
        );
        let tx_last = write.changes.last().map(|w| w.change.seq);
        assert!(
            write.changes.iter().all(|w| Some(w.change.tx_last) == tx_last),
            "one transaction"
        );
        let cl = |k: i64| {
            write
                .metas
                .iter()
                .find(|m| m.key == key(k))
                .map(|m| m.meta.causal_length)
        };
        assert_eq!(
            (cl(1), cl(2), cl(4)),
            (Some(2), Some(3), Some(2)),
            "2 is a new incarnation"
        );
    }

    #[test]
    fn local_transactions_build_on_the_merges_committed_before_them() {
        let t = table();
        let mut c = Capturer::new(NodeId(1), 500);
        c.applied_before([(NodeId(3), 4), (NodeId(1), 99)]);
        let merge = |end_lsn, peer, seq| DecodedTransaction {
            from_peer: true,
            peer_applied: vec![(NodeId(peer), seq)],
            ..tx(end_lsn, 0, vec![row(ChangeKind::Insert, 9, None, Some(1))])
        };
        let group = vec![
            tx(10, 100, vec![row(ChangeKind::Insert, 1, None, Some(1))]),
            merge(20, 2, 7),
            merge(30, 3, 3),
            tx(
                40,
                101,
                vec![
                    row(ChangeKind::Insert, 2, None, Some(1)),
                    row(ChangeKind::Insert, 3, None, Some(1)),
                ],
            ),
        ];
        let loaded = vec![None; c.rows_to_load(&group).len()];
        let write = c.capture_group(|_| Some(&t), &group, loaded, None).unwrap();
        let builds_on: Vec<_> = write.changes.iter().map(|w| w.change.builds_on.clone()).collect();
        let after = vec![(NodeId(2), 7), (NodeId(3), 4)];
        assert_eq!(builds_on, [vec![(NodeId(3), 4)], after.clone(), after]);
    }

    #[test]
    fn a_no_op_update_makes_the_metadata_account_for_its_row_version() {
        let t = table();
        let mut c = Capturer::new(NodeId(1), 500);
        let first = vec![tx(10, 100, vec![row(ChangeKind::Insert, 1, None, Some(1))])];
        let meta = c.capture_group(|_| Some(&t), &first, vec![None], None).unwrap().metas[0]
            .meta
            .clone();
        let noop = vec![tx(20, 101, vec![row(ChangeKind::Update, 1, Some(1), Some(1))])];
        let write = c.capture_group(|_| Some(&t), &noop, vec![Some(meta)], None).unwrap();
        assert!(write.changes.is_empty());
        assert_eq!(write.metas[0].known_xmin, Some(101));
        assert!(write.needs_write);
    }

    #[test]
    fn a_change_that_cannot_be_captured_stops_the_group_and_moves_nothing() {
        let t = table();
        let mut c = Capturer::new(NodeId(1), 500);
        let before = c.checkpoint();
        // An update without a new image cannot be captured.
        let mut bad = row(ChangeKind::Update, 2, Some(1), None);
        bad.change.new = None;
        let group = vec![
            tx(10, 100, vec![row(ChangeKind::Insert, 1, None, Some(1))]),
            tx(20, 101, vec![bad]),
        ];
        let stop = c
            .capture_group(|_| Some(&t), &group, vec![None, None], None)
            .unwrap_err();
        assert_eq!(stop.xid, 101);
        assert_eq!(stop.key, RowKey(vec![Value::Int(2)]));
        assert_eq!(c.checkpoint(), before, "nothing of the group is taken as captured");
    }

    #[test]
    fn peers_and_covered_transactions_load_nothing_and_a_group_of_merges_needs_no_write() {
        let t = table();
        let mut c = Capturer::new(NodeId(1), 500);
        let mut peer = tx(10, 100, vec![row(ChangeKind::Insert, 1, None, Some(1))]);
        peer.from_peer = true;
        let mut stamped = tx(20, 101, vec![row(ChangeKind::Insert, 2, None, Some(1))]);
        stamped.from_peer = true;
        stamped.merged = Some(Hlc::new(9_000, 4, NodeId(2)));
        let group = vec![peer, stamped];
        assert!(c.rows_to_load(&group).is_empty());
        let write = c.capture_group(|_| Some(&t), &group, Vec::new(), None).unwrap();
        // The merge recorded its stamp with its commit: the clock moved, nothing to write.
        assert!(write.changes.is_empty() && !write.needs_write);
        assert_eq!(write.checkpoint.covered_lsn, 20);
        assert_eq!(write.checkpoint.high_water, Hlc::new(9_000, 4, NodeId(1)));
    }

    #[test]
    fn a_transaction_in_parts_is_numbered_on_and_ends_only_with_its_last_part() {
        let t = table();
        let mut c = Capturer::new(NodeId(1), 500);
        let part = |rows, continued, continues| DecodedTransaction {
            part: TransactionPart { continued, continues },
            ..tx(10, 100, rows)
        };
        let first = part(
            vec![
                row(ChangeKind::Insert, 1, None, Some(1)),
                row(ChangeKind::Insert, 2, None, Some(1)),
            ],
            false,
            true,
        );
        let write = c.capture_group(|_| Some(&t), &[first], vec![None, None], None).unwrap();
        assert_eq!(
            write.changes.iter().map(|c| c.change.tx_last).collect::<Vec<_>>(),
            [OPEN_TRANSACTION; 2]
        );
        assert_eq!(
            write.checkpoint.covered_lsn, 0,
            "the transaction is not covered before its end"
        );
        assert_eq!(write.checkpoint.last_seq, 2);
        let last = part(vec![row(ChangeKind::Update, 1, Some(1), Some(5))], true, false);
        let prior = write
            .metas
            .iter()
            .find(|m| m.key == RowKey(vec![Value::Int(1)]))
            .map(|m| m.meta.clone());
        let write = c.capture_group(|_| Some(&t), &[last], vec![prior], None).unwrap();
        let change = &write.changes[0].change;
        assert_eq!(
            (change.seq, change.tx_last),
            (3, 3),
            "the last part's changes end the transaction"
        );
        assert_eq!(write.checkpoint.covered_lsn, 10);
        assert!(
            write.changes[0].had_metadata,
            "the later part sees what the earlier left"
        );
    }
}
