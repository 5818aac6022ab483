//! A node joining the running cluster (`SimConfig::join`), as `accord join` does it: the last
//! node starts without data and without a process; during the workload it copies a donor's rows
//! and metadata chunk by chunk, each chunk read at its own moment while every node writes, with
//! the engine's rules (`accord_engine::join`) deciding what is copied and which positions are
//! taken; rows the donor's capture has not accounted for wait for a mark it writes into the
//! donor's WAL. The join process is killed now and then (what it held in memory is lost; the
//! chunks written and its positions are kept) and resumes with the same donor. Then the node
//! starts, and must converge with everyone, exact sums and all.
//!
//! First the join registers the new node with the donor (`accord.members`, state `joining`) and
//! waits until every live node has said it holds that entry (the membership's gossip); only then
//! does it read positions. Until then the nodes do not keep their outbound logs for it, and the
//! collection rounds do not wait for it.
//!
//! Simplification: before a chunk is read, the donor's WAL is flushed, so the oracle's record of
//! what the donor absorbed is its committed state (a real join may also copy an apply the
//! donor's crash then loses; the new node is then ahead, which merges absorb).

use accord_engine::{
    judge_copy, settle, settle_try, Cell, CollectionState, CopyVerdict, Hlc, JoinPositions, Member, MemberState,
    Membership, NodeId, ReviewItem, ReviewItemId, RowChange, RowMeta, SettleTry, Settled,
};

use super::{EventKind, Phase, World};
use crate::config::PlantedBug;
use crate::db::{Db, MetaRow, QueueEntry, UserRow, WalBody};
use crate::node::{founding_member, peer_id};
use crate::oracle::Oracle;
use crate::outcome::Failure;
use crate::table::{key_of, row_key};

/// Keys per chunk of the copy.
const CHUNK: usize = 6;

/// A join in progress: what `accord.join_state` holds on the new node, and what its process
/// holds in memory.
#[derive(Debug)]
pub(super) struct JoinRun {
    donor: usize,
    positions: JoinPositions,
    /// The last key copied; `None` before the first chunk.
    after: Option<i64>,
    /// In memory: a chunk waiting for the donor's capture to pass its mark.
    pending: Option<Pending>,
}

#[derive(Debug)]
struct Pending {
    /// The mark's WAL position on the donor.
    mark: u64,
    copies: Vec<Copied>,
    /// Rows to read again once the capture passed the mark, with the version first seen.
    suspects: Vec<(i64, Option<u64>)>,
    facts: RangeFacts,
    /// Keys of the chunk's range the donor has no row nor metadata for, with what it had absorbed.
    absent: Vec<(i64, Vec<u32>)>,
    /// The chunk's last key, and whether the chunk was full (more may follow).
    last: Option<i64>,
    full: bool,
    /// Reads of the suspects so far (`accord_engine::settle_try`). The simulator does not model
    /// the service's row locks: a locked read is taken as an unlocked one.
    attempt: usize,
}

/// A row read from the donor: its metadata, values (`None`: deleted), what the donor's row had
/// absorbed when it was read (the oracle's record, told to the oracle when the chunk is
/// written), and its open review items as that read saw them (an item is open by the state of
/// its row, so both come from one read).
#[derive(Debug)]
struct Copied {
    key: i64,
    meta: RowMeta,
    values: Option<Vec<Cell>>,
    absorbed: Vec<u32>,
    open: Vec<(ReviewItemId, QueueEntry)>,
}

impl Copied {
    fn read(db: &Db, oracle: &Oracle, donor: usize, key: i64, meta: &RowMeta, values: Option<&Vec<Cell>>) -> Self {
        let row = row_key(key);
        Copied {
            key,
            meta: meta.clone(),
            values: values.cloned(),
            absorbed: oracle.seen_of(donor, key),
            open: db
                .queue
                .iter()
                .filter(|(_, entry)| matches!(entry, QueueEntry::Open(item) if item.key == row))
                .map(|(id, entry)| (*id, entry.clone()))
                .collect(),
        }
    }
}

/// What a chunk copies of its key range whatever became of the rows: closed and parked review
/// items and kept changes are facts the rows' later states do not carry (a closure travels only
/// in the change that closed it), and some belong to rows whose tombstones are collected.
#[derive(Debug, Default)]
struct RangeFacts {
    queue: Vec<(ReviewItemId, QueueEntry)>,
    deferred: Vec<((i64, NodeId, u64), RowChange)>,
}

impl RangeFacts {
    /// Of the keys after `after` up to `last` (no bound: to the end).
    fn read(db: &Db, after: Option<i64>, last: Option<i64>) -> Self {
        let within = |key: i64| after.is_none_or(|a| key > a) && last.is_none_or(|l| key <= l);
        RangeFacts {
            queue: db
                .queue
                .iter()
                .filter(|(_, entry)| !matches!(entry, QueueEntry::Open(_)))
                .filter(|(_, entry)| key_of(&entry_item(entry).key).is_some_and(within))
                .map(|(id, entry)| (*id, entry.clone()))
                .collect(),
            deferred: db
                .deferred
                .iter()
                .filter(|((key, _, _), _)| within(*key))
                .map(|(k, change)| (*k, change.clone()))
                .collect(),
        }
    }
}

fn entry_item(entry: &QueueEntry) -> &ReviewItem {
    match entry {
        QueueEntry::Open(item) | QueueEntry::Closed(item, _) | QueueEntry::Parked(item) => item,
    }
}

impl World {
    /// The node a join registered with (its donor), if one did.
    pub(super) fn join_donor(&self) -> Option<usize> {
        self.join_registration.map(|(donor, _)| donor)
    }

    /// The joining node: the last one.
    pub(super) fn joiner(&self) -> usize {
        self.nodes.len() - 1
    }

    /// Schedules the join's first step at a moment of the workload's first half.
    pub(super) fn plan_join(&mut self) {
        let j = self.joiner();
        self.nodes[j].awaiting_join = true;
        // Nobody knows the new node yet, and it knows nobody.
        let founders: Vec<Member> = (0..j).map(|i| founding_member(peer_id(i))).collect();
        for i in 0..j {
            self.nodes[i].membership = Membership::new(peer_id(i), founders.clone());
        }
        self.nodes[j].membership = Membership::new(peer_id(j), []);
        let span = (self.cfg.ops as f64 * self.params.op_gap_mean / 2.0) as u64;
        let at = self.now + self.rng_join.below(span + 1);
        self.push(at, EventKind::JoinStep);
    }

    fn next_join_step(&mut self) {
        let at = self.now + self.rng_join.range(100, 20_000);
        self.push(at, EventKind::JoinStep);
    }

    /// One step of the join: begin, copy a chunk, or finish.
    pub(super) fn join_step(&mut self) -> Result<(), Failure> {
        let j = self.joiner();
        if let (Some(at), Some((donor, _))) = (self.join_donor_refresh, self.join_registration) {
            if self.now >= at {
                self.join_donor_refresh = None;
                self.with_node(donor, |n, ctx| n.members_changed(ctx))?;
            }
        }
        if !self.nodes[j].awaiting_join {
            return Ok(());
        }
        // The join process is killed now and then: the chunk in memory is lost.
        if self.params.faults_enabled() && self.phase == Phase::Workload && self.rng_join.chance(0.05) {
            if let Some(run) = &mut self.join {
                run.pending = None;
                self.stats.join_kills += 1;
            }
            let at = self.now + self.rng_join.range(1_000, 300_000);
            self.push(at, EventKind::JoinStep);
            return Ok(());
        }
        let run = match self.join.take() {
            Some(run) => run,
            None => match self.register_join()?.and_then(|donor| self.begin_join(donor)) {
                Some(run) => run,
                None => {
                    self.next_join_step();
                    return Ok(());
                }
            },
        };
        let run = self.copy_step(run)?;
        match run {
            Some(run) => {
                self.join = Some(run);
                self.next_join_step();
                Ok(())
            }
            None => Ok(()),
        }
    }

    /// Registers the new node with a donor (once: the entry is durable there), and returns the
    /// donor once every live node knows of it (as the donor's views say); `None` meanwhile.
    fn register_join(&mut self) -> Result<Option<usize>, Failure> {
        let j = self.joiner();
        let donor = match self.join_registration {
            Some((donor, _)) => donor,
            None => {
                let candidates: Vec<usize> = (0..j)
                    .filter(|&d| self.nodes[d].is_up() && !self.nodes[d].leaving)
                    .collect();
                if candidates.is_empty() {
                    return Ok(None);
                }
                let donor = candidates[self.rng_join.index(candidates.len())];
                let entry = Member {
                    node: peer_id(j),
                    state: MemberState::Joining,
                    address: String::new(),
                    stamp: Hlc::new(self.now, 0, peer_id(j)),
                };
                self.nodes[donor].membership.absorb(entry);
                if self.cfg.bug == Some(PlantedBug::JoinSkipsMembersWait) {
                    // The donor's node takes the entry in at its next look at its table, a
                    // second later; the join reads positions at once.
                    let at = self.now + 1_000_000;
                    self.join_donor_refresh = Some(at);
                    self.push(at, EventKind::JoinStep);
                } else {
                    // The donor's running node reads its table and tells everyone.
                    self.with_node(donor, |n, ctx| n.members_changed(ctx))?;
                }
                self.join_registration = Some((donor, self.now));
                donor
            }
        };
        let known = self.nodes[donor].is_up() && self.nodes[donor].membership.not_known_by(peer_id(j)).is_empty();
        if known || self.cfg.bug == Some(PlantedBug::JoinSkipsMembersWait) {
            if let Some((_, at)) = self.join_registration {
                self.stats.join_member_wait = self.now - at;
            }
            return Ok(Some(donor));
        }
        Ok(None)
    }

    /// Reads the donor's positions in one snapshot (`JoinPositions::first`); `None` while the
    /// donor cannot be read.
    fn begin_join(&mut self, donor: usize) -> Option<JoinRun> {
        if self.nodes[donor].pg_down {
            return None;
        }
        self.stats.joins += 1;
        Some(JoinRun {
            donor,
            positions: JoinPositions::first(self.donor_positions(donor)),
            after: None,
            pending: None,
        })
    }

    /// What the donor had applied of each node, and its own capture's last sequence number.
    fn donor_positions(&self, donor: usize) -> Vec<(NodeId, u64)> {
        let db = &self.nodes[donor].db;
        let mut positions: Vec<(NodeId, u64)> = db.progress.iter().map(|(&p, pp)| (p, pp.applied)).collect();
        positions.push((self.nodes[donor].id, db.checkpoint.map_or(0, |c| c.last_seq)));
        positions
    }

    /// The donor's committed state made durable and known to the oracle, before a read.
    fn settle_donor(&mut self, donor: usize) -> Result<(), Failure> {
        self.nodes[donor].db.flush();
        self.with_node(donor, |n, ctx| n.deliver_durable(ctx))
    }

    /// A chunk, or the end of one waiting for the donor's capture, or the join's end. Returns
    /// the run while the join goes on.
    fn copy_step(&mut self, mut run: JoinRun) -> Result<Option<JoinRun>, Failure> {
        let donor = run.donor;
        if self.nodes[donor].pg_down {
            // The donor's PostgreSQL is down: the join waits for it (its positions are the donor's).
            return Ok(Some(run));
        }
        let bug = self.cfg.bug;
        if let Some(pending) = run.pending.take() {
            if self.nodes[donor].db.covered_lsn() < pending.mark {
                run.pending = Some(pending);
                return Ok(Some(run));
            }
            self.settle_donor(donor)?;
            let Pending {
                mut copies,
                suspects,
                facts,
                absent,
                last,
                full,
                attempt,
                ..
            } = pending;
            if settle_try(attempt) == SettleTry::GiveUp {
                // The service's join stops; run again, it reads the chunk again.
                self.stats.join_kills += 1;
                return Ok(Some(run));
            }
            let db = &self.nodes[donor].db;
            let mut again = Vec::new();
            for (key, seen) in suspects {
                let meta = db.meta.get(&key);
                let row = db.rows.get(&key);
                let verdict = settle(
                    seen.as_ref(),
                    meta.map(|m| m.meta.is_alive()),
                    meta.and_then(|m| m.known_xmin.as_ref()),
                    row.map(|r| &r.xmin),
                );
                match (verdict, meta, row) {
                    (Settled::Copy, Some(meta), Some(row)) => copies.push(Copied::read(
                        db,
                        &self.oracle,
                        donor,
                        key,
                        &meta.meta,
                        Some(&row.values),
                    )),
                    (Settled::CopyTombstone, Some(meta), None) => {
                        copies.push(Copied::read(db, &self.oracle, donor, key, &meta.meta, None))
                    }
                    _ => again.push((key, row.map(|r| r.xmin))),
                }
            }
            let seen = self.donor_positions(donor);
            run.positions.saw(&seen);
            if !again.is_empty() {
                let mark = self.mark(donor)?;
                run.pending = Some(Pending {
                    mark,
                    copies,
                    suspects: again,
                    facts,
                    absent,
                    last,
                    full,
                    attempt: attempt + 1,
                });
                return Ok(Some(run));
            }
            self.write_chunk(&mut run, copies, facts, absent, last);
            return self.after_chunk(run, full);
        }

        self.settle_donor(donor)?;
        let seen = self.donor_positions(donor);
        run.positions.saw(&seen);
        let db = &self.nodes[donor].db;
        let from = run.after.map_or(i64::MIN, |a| a.saturating_add(1));
        let keys: Vec<i64> = db.meta.range(from..).take(CHUNK).map(|(&k, _)| k).collect();
        let full = keys.len() == CHUNK;
        let last = keys.last().copied();
        let facts = RangeFacts::read(db, run.after, if full { last } else { None });
        // A key the donor holds nothing of: never written, or its tombstone collected under a cut
        // the copy carries. Either way the new node holds what the donor had absorbed of it.
        let upper = if full { last } else { None };
        let absent: Vec<(i64, Vec<u32>)> = (0..self.params.keys as i64)
            .filter(|&k| k >= from && upper.is_none_or(|u| k <= u) && !db.meta.contains_key(&k))
            .map(|k| (k, self.oracle.seen_of(donor, k)))
            .filter(|(_, seen)| seen.iter().any(|&n| n > 0))
            .collect();
        let mut copies = Vec::new();
        let mut suspects = Vec::new();
        for &key in &keys {
            let Some(meta) = db.meta.get(&key) else { continue };
            let row = db.rows.get(&key);
            let verdict = judge_copy(meta.meta.is_alive(), meta.known_xmin.as_ref(), row.map(|r| &r.xmin));
            let read = |values| Copied::read(db, &self.oracle, donor, key, &meta.meta, values);
            match (verdict, row) {
                (CopyVerdict::Copy, Some(row)) => copies.push(read(Some(&row.values))),
                (CopyVerdict::CopyTombstone, _) => copies.push(read(None)),
                (CopyVerdict::Settle, row) => match (bug, row) {
                    (Some(PlantedBug::JoinCopiesUnsettled), Some(row)) if meta.meta.is_alive() => {
                        copies.push(read(Some(&row.values)))
                    }
                    (Some(PlantedBug::JoinSkipsUnsettled), _) => {}
                    _ => suspects.push((key, row.map(|r| r.xmin))),
                },
                (CopyVerdict::Copy, None) => {}
            }
        }
        if !suspects.is_empty() {
            let mark = self.mark(donor)?;
            run.pending = Some(Pending {
                mark,
                copies,
                suspects,
                facts,
                absent,
                last,
                full,
                attempt: 0,
            });
            return Ok(Some(run));
        }
        self.write_chunk(&mut run, copies, facts, absent, last);
        self.after_chunk(run, full)
    }

    /// A transaction with only a mark, committed synchronously into the donor's WAL; returns
    /// its position.
    fn mark(&mut self, donor: usize) -> Result<u64, Failure> {
        let physical = self.clocks[donor].read(self.now);
        let db = &mut self.nodes[donor].db;
        let xid = db.new_xid();
        let mark = db.append_wal(xid, physical, WalBody::Mark);
        db.flush();
        // The walsender sends it at once: the donor's capture reads it.
        self.with_node(donor, |n, ctx| {
            n.want_capture(ctx);
            Ok(())
        })?;
        self.stats.join_marks += 1;
        Ok(mark)
    }

    fn after_chunk(&mut self, run: JoinRun, full: bool) -> Result<Option<JoinRun>, Failure> {
        if full {
            return Ok(Some(run));
        }
        self.finish_join(run)?;
        Ok(None)
    }

    /// One transaction on the new node: the rows (new versions there), their metadata, the
    /// clock message, the cursor.
    fn write_chunk(
        &mut self,
        run: &mut JoinRun,
        copies: Vec<Copied>,
        facts: RangeFacts,
        absent: Vec<(i64, Vec<u32>)>,
        last: Option<i64>,
    ) {
        let j = self.joiner();
        let physical = self.clocks[j].read(self.now);
        let db = &mut self.nodes[j].db;
        let xid = db.new_xid();
        let mut greatest: Option<Hlc> = None;
        let mut absorbed = Vec::new();
        db.queue.extend(facts.queue);
        db.deferred.extend(facts.deferred);
        for copy in copies {
            greatest = greatest.max(copy.meta.stamp);
            absorbed.push((copy.key, copy.absorbed));
            db.queue.extend(copy.open);
            match copy.values {
                Some(values) => {
                    db.rows.insert(
                        copy.key,
                        UserRow {
                            values,
                            xmin: xid,
                            tx: xid,
                        },
                    );
                    db.meta.insert(
                        copy.key,
                        MetaRow {
                            meta: copy.meta,
                            known_xmin: Some(xid),
                            // (No migration runs beside a join: `SimConfig::validate`.)
                            shape: crate::table::table(db.inserts).shape_id(),
                        },
                    );
                }
                None => {
                    db.rows.remove(&copy.key);
                    db.meta.insert(
                        copy.key,
                        MetaRow {
                            meta: copy.meta,
                            known_xmin: None,
                            // (No migration runs beside a join: `SimConfig::validate`.)
                            shape: crate::table::table(db.inserts).shape_id(),
                        },
                    );
                }
            }
        }
        if let Some(stamp) = greatest {
            // As the service's copy records it, under the donor, in the chunk's transaction.
            db.record_merged(peer_id(run.donor), stamp);
        }
        db.append_wal(
            xid,
            physical,
            WalBody::Copy {
                builds_on: run.positions.claims.clone(),
                stamp: greatest,
            },
        );
        db.flush();
        for (key, seen) in absorbed.into_iter().chain(absent) {
            self.oracle.copied(j, run.donor, key, &seen);
        }
        if let Some(stamp) = greatest {
            self.oracle.copied_stamp(j, stamp);
        }
        if last.is_some() {
            run.after = last;
        }
        self.stats.join_chunks += 1;
    }

    /// The collection's cut as the donor has it now, the positions, and the node started.
    fn finish_join(&mut self, mut run: JoinRun) -> Result<(), Failure> {
        let donor = run.donor;
        let j = self.joiner();
        self.settle_donor(donor)?;
        let seen = self.donor_positions(donor);
        run.positions.saw(&seen);
        let streams_from = match self.cfg.bug {
            Some(PlantedBug::JoinStreamsFromLatest) => run.positions.claims.clone(),
            _ => run.positions.streams_from.clone(),
        };
        let cut = self.nodes[donor].db.collection.cut.clone();
        let joiner_id = self.nodes[j].id;
        let db = &mut self.nodes[j].db;
        db.replays_closed = true;
        db.join_claims = run.positions.claims.clone();
        db.collection = CollectionState {
            cut,
            ..CollectionState::default()
        };
        for &(origin, seq) in &streams_from {
            if origin != joiner_id {
                if let Some(progress) = db.progress.get_mut(&origin) {
                    progress.applied = seq;
                }
            }
        }
        let physical = self.clocks[j].read(self.now);
        let xid = db.new_xid();
        db.append_wal(
            xid,
            physical,
            WalBody::Copy {
                builds_on: run.positions.claims.clone(),
                stamp: None,
            },
        );
        db.flush();
        // The cluster as the donor knows it, and the new node in it.
        let mut membership = Membership::new(joiner_id, self.nodes[donor].membership.to_vec());
        membership.absorb(Member {
            node: joiner_id,
            state: MemberState::Active,
            address: String::new(),
            stamp: Hlc::new(self.now, 1, joiner_id),
        });
        self.nodes[j].membership = membership;
        self.oracle.joined(j, &streams_from, &run.positions.claims);
        self.nodes[j].awaiting_join = false;
        self.stats.joined_at = self.now - super::EPOCH;
        self.join = None;
        self.push(self.now, EventKind::Restart { node: j });
        Ok(())
    }
}
