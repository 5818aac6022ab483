//! The apply state machine driven by hand: one test per rule of `BatchApply` (the exactly-once
//! skip, the xmin guard and its rounds, splitting and parking, deferral), each feeding what a
//! database would answer and checking the commands that come back.

use std::sync::Arc;

use accord_engine::{
    capture, ApplyCommand, ApplyError, ApplyInput, ApplyRules, BatchApply, CapturedChange, Carried, Cell, ChangeKind,
    ColumnDef, ColumnPolicy, ColumnType, Hlc, KeyColumn, KeyLocks, LoadedRow, NodeId, NodeSchema, RemovalCount,
    RowChange, RowKey, RowMeta, RowWrite, Segment, TableDef, Value, WriteRefusal,
};

const A: NodeId = NodeId(1);
const B: NodeId = NodeId(2);

fn tables() -> Arc<[TableDef]> {
    let col = |name: &str, ty, policy| ColumnDef {
        name: name.into(),
        ty,
        policy,
    };
    Arc::from(vec![TableDef::new(
        "shop.products",
        vec![KeyColumn {
            name: "id".into(),
            ty: ColumnType::Integer,
        }],
        vec![
            col("name", ColumnType::Other("text".into()), ColumnPolicy::Lww),
            col("stock", ColumnType::Integer, ColumnPolicy::Delta),
        ],
    )
    .unwrap()])
}

fn key(k: i64) -> RowKey {
    RowKey(vec![Value::Int(k)])
}

fn cells(name: &str, stock: i64) -> Vec<Cell> {
    vec![Cell::Value(Value::text(name)), Cell::Value(Value::Int(stock))]
}

/// A node's local write, captured: the change it sends, and its new metadata.
fn write(
    origin: NodeId,
    seq: u64,
    k: i64,
    prior: Option<(&RowMeta, Vec<Cell>)>,
    kind: ChangeKind,
    new: Option<Vec<Cell>>,
) -> (RowChange, RowMeta) {
    let (meta, old) = prior.map_or((None, None), |(m, v)| (Some(m), Some(v)));
    captured(origin, seq, k, meta, kind, old, new)
}

/// [`write`], with the prior metadata and the old values apart (an insert after a delete has
/// the one without the other).
fn captured(
    origin: NodeId,
    seq: u64,
    k: i64,
    prior: Option<&RowMeta>,
    kind: ChangeKind,
    old: Option<Vec<Cell>>,
    new: Option<Vec<Cell>>,
) -> (RowChange, RowMeta) {
    let change = CapturedChange {
        kind,
        key: key(k),
        old,
        new,
    };
    let captured = capture(&tables()[0], prior, &change, Hlc::new(1_000 + seq, 0, origin), seq, &[])
        .unwrap()
        .unwrap();
    (captured.change, captured.meta)
}

fn insert(origin: NodeId, seq: u64, k: i64, name: &str, stock: i64) -> RowChange {
    write(origin, seq, k, None, ChangeKind::Insert, Some(cells(name, stock))).0
}

/// Row 1 as B inserted it (its metadata), and A's update of it.
fn updated_row() -> (RowMeta, RowChange) {
    let (_, meta) = write(B, 1, 1, None, ChangeKind::Insert, Some(cells("b", 1)));
    let (update, _) = write(
        A,
        1,
        1,
        Some((&meta, cells("b", 1))),
        ChangeKind::Update,
        Some(cells("a", 2)),
    );
    (meta, update)
}

/// The row with this xmin, and metadata that accounts for xmin 8.
fn row_at(meta: &RowMeta, xmin: u64) -> LoadedRow {
    LoadedRow {
        row: Some((xmin, cells("b", 1))),
        meta: Some((meta.clone(), Some(8))),
        deferred: Vec::new(),
    }
}

fn machine(applied: u64, changes: Vec<RowChange>) -> BatchApply {
    BatchApply::new(
        A,
        applied,
        changes,
        &NodeSchema::of(tables()),
        None,
        ApplyRules::default(),
    )
    .unwrap()
}

fn missing() -> LoadedRow {
    LoadedRow::default()
}

/// A removal count that local removals moved since the capture last accounted for them.
fn unsettled(issued: u64) -> RemovalCount {
    RemovalCount {
        issued,
        accounted: issued.checked_sub(1),
    }
}

fn settled(issued: u64) -> RemovalCount {
    RemovalCount {
        issued,
        accounted: Some(issued),
    }
}

/// What a load that locked the keys it named first found, and the removal count it read.
fn locked(rows: Vec<LoadedRow>, count: RemovalCount) -> ApplyInput {
    ApplyInput::Loaded {
        rows,
        keys: KeyLocks::Locked(count),
        xid: None,
    }
}

/// What `command`, a load, found: with the key locks it named taken, if any, and `count`.
fn found(command: &ApplyCommand, rows: Vec<LoadedRow>, count: RemovalCount) -> ApplyInput {
    match command {
        ApplyCommand::Load { lock_keys, .. } if lock_keys.is_empty() => ApplyInput::loaded(rows),
        ApplyCommand::Load { .. } => locked(rows, count),
        other => panic!("expected a load, got {other:?}"),
    }
}

fn loaded_slots(command: &ApplyCommand) -> usize {
    match command {
        ApplyCommand::Load { slots, .. } => slots.len(),
        other => panic!("expected a load, got {other:?}"),
    }
}

#[test]
fn what_was_applied_is_skipped_and_a_gap_is_refused() {
    let changes = vec![insert(A, 1, 1, "a", 1), insert(A, 2, 2, "b", 2)];
    let mut m = machine(1, changes.clone());
    assert_eq!(m.changes().len(), 1);
    assert_eq!(m.last(), 2);
    let mut done = machine(2, changes.clone());
    assert!(matches!(
        done.step(ApplyInput::Start { now: 0 }).unwrap(),
        ApplyCommand::Done { applied: 2, .. }
    ));
    let gap = BatchApply::new(
        A,
        0,
        vec![changes[1].clone()],
        &NodeSchema::of(tables()),
        None,
        ApplyRules::default(),
    );
    assert!(matches!(
        gap,
        Err(ApplyError::Gap {
            applied: 0,
            first: 2,
            ..
        })
    ));
    let _ = m.step(ApplyInput::Start { now: 0 }).unwrap();
}

#[test]
fn a_missing_row_waits_for_a_probe_then_is_inserted_and_committed_with_its_position() {
    let mut m = machine(0, vec![insert(A, 1, 1, "a", 5)]);
    let load = m.step(ApplyInput::Start { now: 0 }).unwrap();
    // The source inserted the row: its key is locked before the load reads it.
    let ApplyCommand::Load {
        begin: Some(1),
        guard: true,
        lock_keys,
        ..
    } = load
    else {
        panic!("expected the guard's load, got {load:?}");
    };
    assert_eq!(
        lock_keys,
        vec![0],
        "the new row's key is locked before the rows are read"
    );
    // Another transaction holds the key's lock: the batch lets go of everything and starts
    // over after a pause, rather than wait holding its row locks.
    let mut busy = machine(0, vec![insert(A, 1, 1, "a", 5)]);
    busy.step(ApplyInput::Start { now: 0 }).unwrap();
    let busy_keys = ApplyInput::Loaded {
        rows: Vec::new(),
        keys: KeyLocks::Busy { now: 5 },
        xid: None,
    };
    assert!(matches!(
        busy.step(busy_keys).unwrap(),
        ApplyCommand::Restart { probe: false, .. }
    ));
    // An answer that leaves out the key locks the load named is refused.
    let mut wrong = machine(0, vec![insert(A, 1, 1, "a", 5)]);
    wrong.step(ApplyInput::Start { now: 0 }).unwrap();
    assert!(matches!(
        wrong.step(ApplyInput::loaded(vec![missing()])),
        Err(ApplyError::Unexpected { .. })
    ));
    // The row is missing: a local insert and delete may both be on their way through the
    // capture. A local removal counted since the capture last accounted for the count: the
    // probe.
    let probe = m.step(locked(vec![missing()], unsettled(3))).unwrap();
    assert!(
        matches!(probe, ApplyCommand::ProbeAndWait),
        "expected a probe, got {probe:?}"
    );
    let again = m.step(ApplyInput::CaptureReached { now: 10 }).unwrap();
    assert!(matches!(
        again,
        ApplyCommand::Load {
            begin: None,
            guard: true,
            ..
        }
    ));
    let ApplyCommand::Write(writes) = m.step(ApplyInput::loaded(vec![missing()])).unwrap() else {
        panic!("expected the insert");
    };
    assert!(matches!(&writes[0].write, RowWrite::Insert(v) if v[1] == Value::Int(5)));
    let ApplyCommand::Record(records) = m.step(ApplyInput::Written(Ok(vec![Some(77)]))).unwrap() else {
        panic!("expected the records");
    };
    assert_eq!(records.metas.len(), 1);
    assert_eq!(
        records.metas[0].2,
        Some(77),
        "the metadata accounts for the version written"
    );
    let ApplyCommand::Commit { merged_stamp, .. } = m.step(ApplyInput::Recorded).unwrap() else {
        panic!("expected the commit");
    };
    assert_eq!(merged_stamp, Some(Hlc::new(1_001, 0, A)));
    let ApplyCommand::Done { applied, summary } = m.step(ApplyInput::Committed).unwrap() else {
        panic!("expected the end");
    };
    assert_eq!((applied, summary.applied, summary.waits), (1, 1, 1));
}

/// Issue 20: the wait for the capture is the lag. A missing row recorded as absent or deleted,
/// when no local removal was counted since the capture last accounted for the count (it is
/// settled), is loaded again under its key lock and merged without a probe.
#[test]
fn a_missing_row_is_merged_without_a_probe_when_no_local_removal_is_on_its_way() {
    // A row the source inserted: its key was locked before the load read it, which is then
    // all the guard needs (no second load).
    let mut m = machine(0, vec![insert(A, 1, 1, "a", 5)]);
    m.step(ApplyInput::Start { now: 0 }).unwrap();
    let ApplyCommand::Write(writes) = m.step(locked(vec![missing()], settled(7))).unwrap() else {
        panic!("expected the insert");
    };
    assert!(matches!(&writes[0].write, RowWrite::Insert(_)));
    m.step(ApplyInput::Written(Ok(vec![Some(9)]))).unwrap();
    m.step(ApplyInput::Recorded).unwrap();
    let ApplyCommand::Done { summary, .. } = m.step(ApplyInput::Committed).unwrap() else {
        panic!("expected the end");
    };
    assert_eq!(
        (summary.applied, summary.waits, summary.keys_clear),
        (1, 0, 1),
        "no wait for the capture"
    );

    // A row the source updated, missing here (its key was not locked before the load): the
    // key is locked after the load, and the row read again under it.
    let (_, update) = updated_row();
    let mut m = machine(0, vec![update]);
    let ApplyCommand::Load { lock_keys, .. } = m.step(ApplyInput::Start { now: 0 }).unwrap() else {
        panic!("expected the load");
    };
    assert!(lock_keys.is_empty(), "an update's row is expected here");
    assert!(matches!(
        m.step(ApplyInput::loaded(vec![missing()])).unwrap(),
        ApplyCommand::LockKeys { .. }
    ));
    let reload = m.step(ApplyInput::KeysLocked(settled(7))).unwrap();
    assert!(
        matches!(
            reload,
            ApplyCommand::Load {
                begin: None,
                guard: true,
                ..
            }
        ),
        "the metadata is read again under the key lock: {reload:?}"
    );
    let merged = m.step(ApplyInput::loaded(vec![missing()])).unwrap();
    assert!(
        matches!(merged, ApplyCommand::Write(_) | ApplyCommand::Record(_)),
        "merged without a probe: {merged:?}"
    );

    // A tombstone too: the row was deleted, and the capture accounted for it.
    let (meta, _) = updated_row();
    let mut dead = meta.clone();
    dead.causal_length += 1;
    let tombstone = LoadedRow {
        row: None,
        meta: Some((dead, None)),
        deferred: Vec::new(),
    };
    let mut m = machine(0, vec![insert(A, 1, 1, "a", 5)]);
    m.step(ApplyInput::Start { now: 0 }).unwrap();
    // The tombstone is newer than the insert: nothing to write, only the merge to record.
    let merged = m.step(locked(vec![tombstone], settled(7))).unwrap();
    assert!(matches!(merged, ApplyCommand::Record(_)), "{merged:?}");

    // Metadata that says the row lives although it is missing: a local delete the capture may
    // not have read. It waits for a probe, settled count or not.
    let alive = LoadedRow {
        row: None,
        meta: Some((meta.clone(), Some(8))),
        deferred: Vec::new(),
    };
    let (_, update) = updated_row();
    let mut m = machine(0, vec![update]);
    m.step(ApplyInput::Start { now: 0 }).unwrap();
    m.step(ApplyInput::loaded(vec![alive])).unwrap();
    assert!(matches!(
        m.step(ApplyInput::KeysLocked(settled(7))).unwrap(),
        ApplyCommand::ProbeAndWait
    ));

    // Another row of the part has a version accord has not accounted for: the probe is needed
    // anyway.
    let (_, update) = updated_row();
    let mut m = machine(0, vec![update, insert(A, 2, 2, "b", 1)]);
    m.step(ApplyInput::Start { now: 0 }).unwrap();
    assert!(
        matches!(
            m.step(locked(vec![row_at(&meta, 9), missing()], settled(7))).unwrap(),
            ApplyCommand::ProbeAndWait
        ),
        "a suspect row needs the probe"
    );
}

/// A's change of row `k` after `prior` (its metadata): a delete (`new` None), or an insert of the
/// key again after a delete (`old` None).
fn after(prior: &RowMeta, seq: u64, k: i64, old: Option<Vec<Cell>>, new: Option<Vec<Cell>>) -> (RowChange, RowMeta) {
    let kind = match (&old, &new) {
        (Some(_), None) => ChangeKind::Delete,
        (None, Some(_)) => ChangeKind::Insert,
        _ => ChangeKind::Update,
    };
    captured(A, seq, k, Some(prior), kind, old, new)
}

/// Keys changed away and back (a delete and an insert of each key, again and again) in one
/// batch: each row is written once, as a delete and an insert, and a key inserted and deleted
/// within the batch is not written at all. Before, such a part had no single write per row and
/// was halved down to single changes, a round of statements each, with the rows locked.
#[test]
fn a_row_deleted_and_inserted_again_in_a_batch_is_written_once() {
    let (meta, _) = updated_row();
    // Row 1 moves to key 1001 and back, twice: delete 1, insert 1001, delete 1001, insert 1.
    let (delete_1, dead_1) = after(&meta, 1, 1, Some(cells("b", 1)), None);
    let (insert_far, far) = write(A, 2, 1001, None, ChangeKind::Insert, Some(cells("b", 1)));
    let (delete_far, dead_far) = after(&far, 3, 1001, Some(cells("b", 1)), None);
    let (insert_1, back_1) = after(&dead_1, 4, 1, None, Some(cells("b", 1)));
    let (delete_1b, dead_1b) = after(&back_1, 5, 1, Some(cells("b", 1)), None);
    let (insert_far_b, far_b) = after(&dead_far, 6, 1001, None, Some(cells("b", 1)));
    let (delete_far_b, _) = after(&far_b, 7, 1001, Some(cells("b", 1)), None);
    let (insert_1b, _) = after(&dead_1b, 8, 1, None, Some(cells("c", 4)));
    let changes = vec![
        delete_1,
        insert_far,
        delete_far,
        insert_1,
        delete_1b,
        insert_far_b,
        delete_far_b,
        insert_1b,
    ];
    let mut m = machine(0, changes);
    let mut command = m.step(ApplyInput::Start { now: 0 }).unwrap();
    let mut writes_seen = Vec::new();
    loop {
        let input = match &command {
            ApplyCommand::Load { slots, .. } => found(
                &command,
                slots
                    .iter()
                    .map(|&slot| match m.slot(slot).unwrap().1 {
                        k if *k == key(1) => row_at(&meta, 8),
                        _ => missing(),
                    })
                    .collect(),
                settled(3),
            ),
            ApplyCommand::LockKeys { .. } => ApplyInput::KeysLocked(settled(3)),
            ApplyCommand::Write(writes) => {
                writes_seen.push(writes.clone());
                ApplyInput::Written(Ok(writes.iter().map(|_| Some(9)).collect()))
            }
            ApplyCommand::Record(_) => ApplyInput::Recorded,
            ApplyCommand::Commit { .. } => ApplyInput::Committed,
            ApplyCommand::Done { summary, .. } => {
                assert_eq!((summary.applied, summary.parked, summary.waits), (8, 0, 0));
                break;
            }
            other => panic!("unexpected {other:?}"),
        };
        command = m.step(input).unwrap();
    }
    assert_eq!(writes_seen.len(), 1, "one part, one round of writes: {writes_seen:?}");
    let writes = &writes_seen[0];
    assert_eq!(
        writes.len(),
        1,
        "key 1001 came and went: nothing to write for it: {writes:?}"
    );
    assert_eq!(m.slot(writes[0].slot).unwrap().1, &key(1));
    assert_eq!(
        writes[0].write,
        RowWrite::Replace(vec![Value::text("c"), Value::Int(4)]),
        "row 1 was deleted and inserted again: its last values, as a delete and an insert"
    );
}

/// The ledger a node's appliers share: a settlement sets the count, even a lower one.
#[test]
fn the_insert_ledger_keeps_the_last_settled_count() {
    let mut ledger = accord_engine::RemovalLedger::default();
    assert_eq!(ledger.accounted(), None);
    ledger.settle(10);
    ledger.settle(8);
    assert_eq!(ledger.accounted(), Some(8));
    assert!(settled(8).settled() && !unsettled(8).settled());
}

/// A row version accord has not accounted for (a local write the capture may not have read) is
/// waited for first with the rows unlocked (a restart after a probe), so that local writers of
/// the row do not queue behind the batch; a version newer again after that is waited for with the
/// rows locked, round after round, so that a hot row cannot starve the batch.
#[test]
fn a_row_version_accord_has_not_accounted_for_is_waited_for_unlocked_first_then_locked() {
    let (meta, update) = updated_row();
    let row = |xmin| row_at(&meta, xmin);
    // The row's xmin (9) is not the one accord knows (8): a local write not captured yet.
    let mut m = machine(0, vec![update.clone()]);
    m.step(ApplyInput::Start { now: 0 }).unwrap();
    assert!(matches!(
        m.step(ApplyInput::loaded(vec![row(9)])).unwrap(),
        ApplyCommand::Restart { probe: true, .. }
    ));
    assert!(matches!(
        m.step(ApplyInput::Restarted { now: 1 }).unwrap(),
        ApplyCommand::Load { begin: Some(1), .. }
    ));
    // Still the version seen before the probe: the capture has read past it, the metadata
    // describes it (a row written in a subtransaction is never named by its xid).
    let ApplyCommand::Write(_) = m.step(ApplyInput::loaded(vec![row(9)])).unwrap() else {
        panic!("expected the write");
    };

    let mut m = machine(0, vec![update]);
    m.step(ApplyInput::Start { now: 0 }).unwrap();
    m.step(ApplyInput::loaded(vec![row(9)])).unwrap();
    m.step(ApplyInput::Restarted { now: 1 }).unwrap();
    // Written again while the batch waited: now it waits holding the row.
    assert!(matches!(
        m.step(ApplyInput::loaded(vec![row(10)])).unwrap(),
        ApplyCommand::ProbeAndWait
    ));
    m.step(ApplyInput::CaptureReached { now: 2 }).unwrap();
    // A different version again: another round.
    assert!(matches!(
        m.step(ApplyInput::loaded(vec![row(11)])).unwrap(),
        ApplyCommand::ProbeAndWait
    ));
    m.step(ApplyInput::CaptureReached { now: 3 }).unwrap();
    let ApplyCommand::Write(_) = m.step(ApplyInput::loaded(vec![row(11)])).unwrap() else {
        panic!("expected the write");
    };
}

#[test]
fn the_guard_gives_up_its_rounds_and_starts_over_after_a_probe() {
    let (meta, update) = updated_row();
    let mut m = machine(0, vec![update]);
    m.step(ApplyInput::Start { now: 0 }).unwrap();
    // Each round finds another version (a local insert after every probe). The first wait is
    // the one with the rows unlocked.
    let mut xmin = 100;
    assert!(matches!(
        m.step(ApplyInput::loaded(vec![row_at(&meta, xmin)])).unwrap(),
        ApplyCommand::Restart { probe: true, .. }
    ));
    m.step(ApplyInput::Restarted { now: 1 }).unwrap();
    xmin += 1;
    let mut command = m.step(ApplyInput::loaded(vec![row_at(&meta, xmin)])).unwrap();
    for _ in 0..ApplyRules::default().guard_rounds {
        assert!(matches!(command, ApplyCommand::ProbeAndWait));
        m.step(ApplyInput::CaptureReached { now: 1 }).unwrap();
        xmin += 1;
        command = m.step(ApplyInput::loaded(vec![row_at(&meta, xmin)])).unwrap();
    }
    assert!(matches!(command, ApplyCommand::Restart { probe: true, .. }));
    let restarted = m.step(ApplyInput::Restarted { now: 2 }).unwrap();
    assert!(matches!(restarted, ApplyCommand::Load { begin: Some(1), .. }));
    // The restart's probe settled versions, but a row missing now still waits for a probe
    // written after its key is locked: a local insert and delete of it may have committed since.
    let ApplyCommand::LockKeys { missing: keys } = m.step(ApplyInput::loaded(vec![missing()])).unwrap() else {
        panic!("a missing row after a restart must lock its key");
    };
    assert_eq!(keys, vec![0]);
    assert!(matches!(
        m.step(ApplyInput::KeysLocked(unsettled(1))).unwrap(),
        ApplyCommand::ProbeAndWait
    ));
    // Past the wait limit the batch fails instead of waiting on.
    let mut late = machine(0, vec![insert(A, 1, 1, "a", 1)]);
    late.step(ApplyInput::Start { now: 0 }).unwrap();
    late.step(locked(vec![missing()], unsettled(1))).unwrap();
    let error = late.step(ApplyInput::CaptureReached { now: 121_000_000 }).unwrap_err();
    assert!(matches!(error, ApplyError::CaptureTimeout { .. }));
}

/// Runs a batch to its end over rows that are all missing and accounted for, answering writes
/// with `written` and collecting what is recorded.
fn run_refusing(m: &mut BatchApply, refuse: impl Fn(&[accord_engine::PlannedWrite]) -> bool) -> Vec<ApplyCommand> {
    let mut seen = Vec::new();
    let mut command = m.step(ApplyInput::Start { now: 0 }).unwrap();
    let mut probed = false;
    loop {
        let input = match &command {
            ApplyCommand::Load { .. } => found(
                &command,
                (0..loaded_slots(&command)).map(|_| missing()).collect(),
                unsettled(1),
            ),
            ApplyCommand::LockKeys { .. } => ApplyInput::KeysLocked(unsettled(1)),
            ApplyCommand::ProbeAndWait if !probed => {
                probed = true;
                ApplyInput::CaptureReached { now: 1 }
            }
            ApplyCommand::Write(writes) if refuse(writes) => {
                ApplyInput::Written(Err(WriteRefusal::other("violates check constraint")))
            }
            ApplyCommand::Write(writes) => ApplyInput::Written(Ok(writes.iter().map(|_| Some(5)).collect())),
            ApplyCommand::Record(_) => ApplyInput::Recorded,
            ApplyCommand::Commit { .. } => ApplyInput::Committed,
            ApplyCommand::Done { .. } => {
                seen.push(command);
                return seen;
            }
            other => panic!("unexpected {other:?}"),
        };
        seen.push(command);
        command = m.step(input).unwrap();
    }
}

#[test]
fn a_refused_part_is_halved_until_exactly_the_refused_change_is_parked() {
    let changes: Vec<RowChange> = (1..=4).map(|k| insert(A, k as u64, k, "a", 1)).collect();
    let mut m = machine(0, changes);
    // The database refuses any write of row 3.
    let refuses_3 = |writes: &[accord_engine::PlannedWrite]| {
        writes
            .iter()
            .any(|w| matches!(&w.write, RowWrite::Insert(_)) && w.slot == 2)
    };
    let commands = run_refusing(&mut m, refuses_3);
    let parked: Vec<u64> = commands
        .iter()
        .filter_map(|c| match c {
            ApplyCommand::Record(r) => Some(r.parked.iter().map(|(_, c)| c.seq).collect::<Vec<_>>()),
            _ => None,
        })
        .flatten()
        .collect();
    assert_eq!(parked, [3]);
    let Some(ApplyCommand::Done { summary, .. }) = commands.last() else {
        panic!("the batch ends")
    };
    assert_eq!((summary.applied, summary.parked), (3, 1));
}

#[test]
fn an_insert_refused_because_its_key_appeared_meanwhile_starts_over_instead_of_parking() {
    // Two changes, so that a refusal for another reason would split the part, not restart.
    let mut m = machine(0, vec![insert(A, 1, 1, "a", 1), insert(A, 2, 2, "b", 1)]);
    m.step(ApplyInput::Start { now: 0 }).unwrap();
    m.step(locked(vec![missing(), missing()], unsettled(1))).unwrap();
    m.step(ApplyInput::CaptureReached { now: 1 }).unwrap();
    let ApplyCommand::Write(_) = m.step(ApplyInput::loaded(vec![missing(), missing()])).unwrap() else {
        panic!("expected the inserts");
    };
    // Whether the row is still there when the engine hears of the refusal does not matter: a
    // second applier may have deleted it again by then.
    let refusal = WriteRefusal {
        key_exists: true,
        no_place: false,
        message: "duplicate key value violates unique constraint \"items_pkey\"".into(),
    };
    assert!(matches!(
        m.step(ApplyInput::Written(Err(refusal))).unwrap(),
        ApplyCommand::Restart { probe: false, .. }
    ));
    let ApplyCommand::Load { begin: Some(_), .. } = m.step(ApplyInput::Restarted { now: 2 }).unwrap() else {
        panic!("the attempt starts over with a new transaction");
    };
}

#[test]
fn a_row_with_no_place_here_fails_the_batch_instead_of_parking_any_change() {
    // Two changes: a refusal for another reason would split the part and park one.
    let mut m = machine(0, vec![insert(A, 1, 1, "a", 1), insert(A, 2, 2, "b", 1)]);
    m.step(ApplyInput::Start { now: 0 }).unwrap();
    m.step(locked(vec![missing(), missing()], unsettled(1))).unwrap();
    m.step(ApplyInput::CaptureReached { now: 1 }).unwrap();
    let ApplyCommand::Write(_) = m.step(ApplyInput::loaded(vec![missing(), missing()])).unwrap() else {
        panic!("expected the inserts");
    };
    let refusal = WriteRefusal {
        key_exists: false,
        no_place: true,
        message: "no partition of relation \"items\" found for row".into(),
    };
    let failed = m.step(ApplyInput::Written(Err(refusal))).unwrap_err();
    assert!(matches!(failed, ApplyError::NoPlace { .. }), "{failed}");
    assert!(failed.to_string().contains("create a partition"), "{failed}");
}

#[test]
fn a_change_missing_a_value_is_kept_and_merged_once_its_row_arrives() {
    // A inserts row 1; B updates its stock without the TOASTed name; C gets B's change first.
    let (from_a, meta_a) = write(A, 1, 1, None, ChangeKind::Insert, Some(cells("big", 1)));
    let mut toasted = cells("", 6);
    toasted[0] = Cell::UnchangedToast;
    let (from_b, _) = write(
        B,
        1,
        1,
        Some((&meta_a, cells("big", 1))),
        ChangeKind::Update,
        Some(toasted),
    );
    let mut m = BatchApply::new(
        B,
        0,
        vec![from_b.clone()],
        &NodeSchema::of(tables()),
        None,
        ApplyRules::default(),
    )
    .unwrap();
    let commands = run_refusing(&mut m, |_| false);
    let kept: Vec<&RowChange> = commands
        .iter()
        .filter_map(|c| match c {
            ApplyCommand::Record(r) => Some(r.defer.iter()),
            _ => None,
        })
        .flatten()
        .collect();
    assert_eq!(kept, [&from_b], "kept durably, not parked");
    assert!(!commands.iter().any(|c| matches!(c, ApplyCommand::Write(_))));

    // A's insert arrives; the load finds B's change kept for the row, and both merge.
    let mut m = machine(0, vec![from_a]);
    m.step(ApplyInput::Start { now: 0 }).unwrap();
    m.step(locked(vec![missing()], unsettled(1))).unwrap();
    m.step(ApplyInput::CaptureReached { now: 1 }).unwrap();
    let with_kept = LoadedRow {
        deferred: vec![from_b.clone()],
        ..LoadedRow::default()
    };
    let ApplyCommand::Write(writes) = m.step(ApplyInput::loaded(vec![with_kept])).unwrap() else {
        panic!("expected the insert");
    };
    assert_eq!(
        writes[0].write,
        RowWrite::Insert(vec![Value::text("big"), Value::Int(6)]),
        "A's name with B's stock"
    );
    let ApplyCommand::Record(records) = m.step(ApplyInput::Written(Ok(vec![Some(4)]))).unwrap() else {
        panic!("expected the records");
    };
    assert_eq!(records.undefer, [("shop.products".to_owned(), key(1), B, 1)]);
    assert_eq!(records.merged, [(A, 1), (B, 1)]);
}

/// Drives a segment whose one row is missing through the probe to its end.
fn run_segment(m: &mut BatchApply) -> Vec<ApplyCommand> {
    let mut commands = vec![m.step(ApplyInput::Start { now: 0 }).unwrap()];
    let load = commands.last().expect("the start's command");
    let found = found(load, vec![missing()], unsettled(1));
    commands.push(m.step(found).unwrap());
    commands.push(m.step(ApplyInput::CaptureReached { now: 1 }).unwrap());
    commands.push(m.step(ApplyInput::loaded(vec![missing()])).unwrap());
    commands.push(m.step(ApplyInput::Written(Ok(vec![Some(9)]))).unwrap());
    let next = m.step(ApplyInput::Recorded).unwrap();
    let ends_with_commit = matches!(next, ApplyCommand::Commit { .. });
    commands.push(next);
    if ends_with_commit {
        commands.push(m.step(ApplyInput::Committed).unwrap());
    }
    commands
}

#[test]
fn a_transaction_in_segments_opens_once_commits_once_and_carries_what_it_merged() {
    // Changes 1..=3 of one transaction of B's (ending at 3), each its own segment.
    let mut changes: Vec<RowChange> = (1..=3).map(|s| insert(B, s, s as i64, "x", 1)).collect();
    for c in &mut changes {
        c.tx_last = 3;
        c.builds_on = vec![(NodeId(3), 10 + c.seq)];
    }
    let mut carried = Carried::default();
    for (i, change) in changes.iter().enumerate() {
        let segment = Segment {
            first: i == 0,
            last: i == 2,
            commit_at: 3,
            carried: carried.clone(),
            restarts: 0,
        };
        let mut m = BatchApply::new(
            B,
            i as u64,
            vec![change.clone()],
            &NodeSchema::of(tables()),
            None,
            ApplyRules::default(),
        )
        .unwrap()
        .in_segment(segment);
        let commands = run_segment(&mut m);
        let ApplyCommand::Load { begin, .. } = &commands[0] else {
            panic!("a segment starts with a load");
        };
        assert_eq!(
            *begin,
            (i == 0).then_some(3),
            "only the first segment opens the transaction, at the end's position"
        );
        let commits: Vec<_> = commands
            .iter()
            .filter_map(|c| match c {
                ApplyCommand::Commit {
                    merged_stamp,
                    builds_on,
                } => Some((*merged_stamp, builds_on.clone())),
                _ => None,
            })
            .collect();
        if i < 2 {
            assert!(commits.is_empty(), "segment {i} must not commit");
        } else {
            assert_eq!(
                commits,
                [(Some(Hlc::new(1_003, 0, B)), vec![(NodeId(3), 13)])],
                "the commit carries the greatest stamp and dependencies of every segment"
            );
        }
        let Some(ApplyCommand::Done { applied, .. }) = commands.last() else {
            panic!("segment {i} ends");
        };
        assert_eq!(*applied, i as u64 + 1);
        carried = m.carried();
    }
}

#[test]
fn a_later_segment_that_must_restart_starts_the_whole_transaction_over() {
    let mut change = insert(B, 2, 2, "x", 1);
    change.tx_last = 3;
    let segment = Segment {
        first: false,
        last: false,
        commit_at: 3,
        carried: Carried::default(),
        restarts: 2,
    };
    let mut m = BatchApply::new(
        B,
        1,
        vec![change],
        &NodeSchema::of(tables()),
        None,
        ApplyRules::default(),
    )
    .unwrap()
    .in_segment(segment);
    m.step(ApplyInput::Start { now: 0 }).unwrap();
    let busy = ApplyInput::Loaded {
        rows: Vec::new(),
        keys: KeyLocks::Busy { now: 5 },
        xid: None,
    };
    let ApplyCommand::StartOver { probe, pause_micros } = m.step(busy).unwrap() else {
        panic!("a segment after the first cannot restart alone: the segments before were rolled back too");
    };
    assert!(!probe);
    assert_eq!(
        pause_micros,
        4 * ApplyRules::default().backoff_micros.0,
        "the pause grows with the restarts"
    );
}

/// Issue 17: a change written under another shape of its table is read by column name; one this
/// node cannot read yet stops the batch, whole, until its schema catches up.
#[test]
fn a_change_under_another_shape_is_read_by_name_or_waits() {
    let ours = tables();
    let col = |name: &str, ty, policy| ColumnDef {
        name: name.into(),
        ty,
        policy,
    };
    // The sender's table: the columns in another order, and one this node does not have.
    let theirs = TableDef::new(
        "shop.products",
        ours[0].key.clone(),
        vec![
            col("colour", ColumnType::Other("text".into()), ColumnPolicy::Lww),
            col("stock", ColumnType::Integer, ColumnPolicy::Delta),
            col("name", ColumnType::Other("text".into()), ColumnPolicy::Lww),
        ],
    )
    .unwrap();
    let sent = capture(
        &theirs,
        None,
        &CapturedChange {
            kind: ChangeKind::Insert,
            key: key(1),
            old: None,
            new: Some(vec![
                Cell::Value(Value::text("red")),
                Cell::Value(Value::Int(5)),
                Cell::Value(Value::text("a")),
            ]),
        },
        Hlc::new(1_000, 0, A),
        1,
        &[],
    )
    .unwrap()
    .unwrap()
    .change;
    assert_eq!(sent.shape, Some(theirs.shape_id()));

    // Not described by the sender yet: waits.
    let unknown = BatchApply::new(
        A,
        0,
        vec![sent.clone()],
        &NodeSchema::of(tables()),
        None,
        ApplyRules::default(),
    );
    assert!(matches!(unknown, Err(ApplyError::ShapeWaits { .. })), "{unknown:?}");

    // Described, but `colour` is not here yet: waits, naming the column.
    let mut book = (*NodeSchema::of(tables()).shapes).clone();
    book.learn(theirs.clone());
    let schema = NodeSchema {
        tables: tables(),
        shapes: Arc::new(book.clone()),
        left: Arc::default(),
    };
    match BatchApply::new(A, 0, vec![sent.clone()], &schema, None, ApplyRules::default()) {
        Err(ApplyError::ShapeWaits { message, .. }) => assert!(message.contains("colour"), "{message}"),
        other => panic!("expected the batch to wait, got {other:?}"),
    }

    // This node dropped `colour`: the change is read by name, into this node's order.
    book.set_local("shop.products", vec![None, None], ["colour".to_owned()].into());
    let schema = NodeSchema {
        tables: tables(),
        shapes: Arc::new(book),
        left: Arc::default(),
    };
    let m = BatchApply::new(A, 0, vec![sent], &schema, None, ApplyRules::default()).unwrap();
    assert_eq!(m.changes()[0].row.values, cells("a", 5));
    assert_eq!(m.changes()[0].shape, Some(ours[0].shape_id()));
}

/// A table this node left (untagged) is passed over: its changes are neither applied nor
/// parked, and the stream goes on; a table not replicated here yet makes them wait.
#[test]
fn changes_to_a_table_this_node_left_are_passed_over() {
    let mut gone = insert(A, 1, 1, "a", 1);
    gone.table = "shop.gone".into();
    let batch = vec![gone, insert(A, 2, 2, "b", 2)];
    let schema = |left: &[&str]| NodeSchema {
        left: Arc::new(left.iter().map(|t| t.to_string()).collect()),
        ..NodeSchema::of(tables())
    };
    let run = |left: &[&str]| {
        let mut m = BatchApply::new(A, 0, batch.clone(), &schema(left), None, ApplyRules::default()).unwrap();
        let commands = run_refusing(&mut m, |_| false);
        let parked: usize = commands
            .iter()
            .map(|c| match c {
                ApplyCommand::Record(records) => records.parked.len(),
                _ => 0,
            })
            .sum();
        let Some(ApplyCommand::Done { applied, summary }) = commands.last() else {
            panic!("the batch did not end: {commands:?}");
        };
        (*applied, summary.applied, summary.left, parked)
    };
    assert_eq!(run(&["shop.gone"]), (2, 1, 1, 0));
    let waits = BatchApply::new(A, 0, batch.clone(), &schema(&[]), None, ApplyRules::default());
    assert!(matches!(waits, Err(ApplyError::ShapeWaits { .. })), "{waits:?}");
}

/// What a load that began the transaction found, with the transaction's id.
fn loaded_in(rows: Vec<LoadedRow>, xid: u64) -> ApplyInput {
    ApplyInput::Loaded {
        rows,
        keys: KeyLocks::NotAsked,
        xid: Some(xid),
    }
}

#[test]
fn a_batch_whose_transaction_id_is_known_writes_records_and_commits_in_one_go() {
    let (meta, update) = updated_row();
    let mut m = machine(0, vec![update]);
    m.step(ApplyInput::Start { now: 0 }).unwrap();
    let ApplyCommand::WriteAndCommit {
        writes,
        records,
        merged_stamp,
        ..
    } = m.step(loaded_in(vec![row_at(&meta, 8)], 77)).unwrap()
    else {
        panic!("expected the write and the commit in one command");
    };
    assert_eq!(writes.len(), 1);
    // The row's new version carries the transaction's id: its metadata says so before the
    // write, as a `Written` answer would have made it.
    assert_eq!(records.metas.len(), 1);
    assert_eq!(records.metas[0].2, Some(77));
    assert!(merged_stamp.is_some());
    let ApplyCommand::Done { applied, summary } = m.step(ApplyInput::Committed).unwrap() else {
        panic!("expected the batch done");
    };
    assert_eq!(applied, 1);
    assert_eq!(summary.applied, 1);
}

#[test]
fn a_delete_in_one_go_accounts_for_no_version() {
    let (meta, _) = updated_row();
    let (delete, _) = write(A, 1, 1, Some((&meta, cells("b", 1))), ChangeKind::Delete, None);
    let mut m = machine(0, vec![delete]);
    m.step(ApplyInput::Start { now: 0 }).unwrap();
    let ApplyCommand::WriteAndCommit { writes, records, .. } = m.step(loaded_in(vec![row_at(&meta, 8)], 77)).unwrap()
    else {
        panic!("expected the write and the commit in one command");
    };
    assert!(matches!(writes[0].write, RowWrite::Delete));
    assert_eq!(records.metas[0].2, None);
}

#[test]
fn a_write_refused_in_one_go_starts_over_at_once_and_writes_under_savepoints_after() {
    let (meta, update) = updated_row();
    let mut m = machine(0, vec![update]);
    m.step(ApplyInput::Start { now: 0 }).unwrap();
    let ApplyCommand::WriteAndCommit { .. } = m.step(loaded_in(vec![row_at(&meta, 8)], 77)).unwrap() else {
        panic!("expected the write and the commit in one command");
    };
    // The whole transaction rolled back with the refused write: nothing of it stands, so the
    // batch starts over, at once (it waited for nothing).
    let refused = ApplyInput::Written(Err(WriteRefusal::other("violates check constraint")));
    assert!(matches!(
        m.step(refused).unwrap(),
        ApplyCommand::Restart {
            probe: false,
            pause_micros: 0
        }
    ));
    assert!(matches!(
        m.step(ApplyInput::Restarted { now: 1 }).unwrap(),
        ApplyCommand::Load { begin: Some(1), .. }
    ));
    // Now under a savepoint, where the refusal parks the one change and keeps the rest.
    let ApplyCommand::Write(_) = m.step(loaded_in(vec![row_at(&meta, 8)], 78)).unwrap() else {
        panic!("expected a write under a savepoint");
    };
    let parked = m
        .step(ApplyInput::Written(Err(WriteRefusal::other(
            "violates check constraint",
        ))))
        .unwrap();
    let ApplyCommand::Record(records) = parked else {
        panic!("expected the refused change parked, got {parked:?}");
    };
    assert_eq!(records.parked.len(), 1);
}

#[test]
fn a_write_without_room_in_one_go_fails_the_batch() {
    let (meta, update) = updated_row();
    let mut m = machine(0, vec![update]);
    m.step(ApplyInput::Start { now: 0 }).unwrap();
    m.step(loaded_in(vec![row_at(&meta, 8)], 77)).unwrap();
    let no_place = WriteRefusal {
        key_exists: false,
        no_place: true,
        message: "no partition of relation found for row".into(),
    };
    assert!(matches!(
        m.step(ApplyInput::Written(Err(no_place))),
        Err(ApplyError::NoPlace { .. })
    ));
}
