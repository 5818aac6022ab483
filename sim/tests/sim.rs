//! The simulator's own tests: many seeds pass, runs are deterministic whatever the parallelism,
//! planted bugs are caught (each by the invariant it breaks) and shrunk, and the command line
//! prints what it promises.

use accord_sim::config::parse_seed_range;
use accord_sim::runner::{check_determinism, run_many, Determinism};
use accord_sim::shrink::shrink;
use accord_sim::{run_cli, run_seed, FaultSet, Invariant, PlantedBug, SimArgs, SimConfig};

/// Debug builds are slow; CI runs `cargo test` in debug, so the swarm test keeps runs short.
const OPS: u64 = 250;

fn config(seed: u64, ops: u64) -> SimConfig {
    SimConfig {
        ops,
        ..SimConfig::new(seed)
    }
}

fn jobs() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// Fails with the command and the failure of every run that failed.
fn assert_all_passed(reports: &[accord_sim::SeedReport]) {
    let failures: Vec<String> = reports
        .iter()
        .filter_map(|r| r.failure.as_ref().map(|f| format!("{}\n  {f}", r.config.command())))
        .collect();
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn two_hundred_seeds_pass_with_every_fault_kind() {
    let configs: Vec<SimConfig> = (0..200).map(|seed| config(seed, OPS)).collect();
    let reports = run_many(&configs, jobs(), |_| {});
    assert_all_passed(&reports);
    // The swarm really explored: faults of every injected kind happened somewhere.
    let total = |f: fn(&accord_sim::Stats) -> u64| reports.iter().map(|r| f(&r.stats)).sum::<u64>();
    assert!(total(|s| s.crashes) > 0, "no crash");
    assert!(total(|s| s.machine_crashes) > 0, "no machine crash");
    assert!(total(|s| s.partitions) > 0, "no partition");
    assert!(total(|s| s.clogs) > 0, "no clog");
    assert!(total(|s| s.drops) > 0, "no dropped connection");
    assert!(total(|s| s.clock_steps) > 0, "no clock step");
    assert!(total(|s| s.rogue_clocks) > 0, "no clock beyond the offset");
    assert!(total(|s| s.capture_stalls) > 0, "no capture stall");
    assert!(total(|s| s.conflicts) > 0, "no conflict");
    assert!(
        total(|s| s.causal_waivers) > 0,
        "no transaction stopped waiting for a node that stayed away"
    );
    assert!(total(|s| s.apply_waits) > 0, "no merge waited for the capture");
    assert!(
        total(|s| s.keys_clear) > 0,
        "no missing row was merged without a wait (its key's insert count settled)"
    );
    // The appliers ran side by side and met each other's locks, and so did local writers and
    // the capture.
    assert!(total(|s| s.lock_waits) > 0, "no applier waited for another's lock");
    assert!(
        total(|s| s.local_lock_waits) > 0,
        "no local writer waited for an applier's lock"
    );
    assert!(
        total(|s| s.capture_lock_waits) > 0,
        "the capture never waited for an applier's lock"
    );
    assert!(total(|s| s.resolutions) > 0, "no review resolution");
    assert!(
        total(|s| s.collection_rounds_completed) > 0,
        "no tombstone-collection round completed"
    );
    assert!(total(|s| s.tombstones_collected) > 0, "no tombstone collected");
}

#[test]
fn same_seed_same_hash_run_to_run_and_across_parallelism() {
    let configs: Vec<SimConfig> = (1000..1008).map(|seed| config(seed, 200)).collect();
    let parallel = run_many(&configs, 4, |_| {});
    for (report, cfg) in parallel.iter().zip(&configs) {
        let alone = run_seed(cfg);
        let again = run_seed(cfg);
        assert_eq!(report.hash, alone.hash, "seed {}: parallel vs alone", cfg.seed);
        assert_eq!(alone.hash, again.hash, "seed {}: run to run", cfg.seed);
        assert_eq!(alone.stats, again.stats);
    }
    let hashes: std::collections::BTreeSet<u64> = parallel.iter().map(|r| r.hash).collect();
    assert_eq!(hashes.len(), configs.len(), "different seeds give different runs");
}

#[test]
fn determinism_check_compares_every_event() {
    match check_determinism(&config(7, 150)) {
        Determinism::Same { events, .. } => assert!(events > 100),
        other => panic!("{other:?}"),
    }
}

/// Finds the first seed that fails with the bug planted (seeds run side by side), and checks it
/// broke the expected invariant.
fn caught(bug: PlantedBug, expected: Invariant, ops: u64, seeds: std::ops::Range<u64>) -> SimConfig {
    let configs: Vec<SimConfig> = seeds
        .clone()
        .map(|seed| SimConfig {
            bug: Some(bug),
            ..config(seed, ops)
        })
        .collect();
    for chunk in configs.chunks(jobs() * 8) {
        let reports = run_many(chunk, jobs(), |_| {});
        if let Some(report) = reports
            .into_iter()
            .filter(|r| r.failure.is_some())
            .min_by_key(|r| r.config.seed)
        {
            let failure = report.failure.expect("filtered on a failure");
            assert_eq!(failure.invariant, expected, "{}: {failure}", report.config.command());
            return report.config;
        }
    }
    panic!("planted bug {} went unnoticed on seeds {seeds:?}", bug.name());
}

#[test]
fn planted_double_apply_is_caught_and_shrunk() {
    let cfg = caught(PlantedBug::DoubleApply, Invariant::ExactlyOnce, 400, 0..40);
    let failure = run_seed(&cfg).failure.expect("it failed a moment ago");
    let shrunk = shrink(&cfg, &failure, 60);
    assert_eq!(shrunk.failure.invariant, Invariant::ExactlyOnce);
    assert!(
        shrunk.config.ops < cfg.ops || shrunk.config.faults != cfg.faults || shrunk.config.nodes < cfg.nodes,
        "nothing was shrunk: {}",
        shrunk.config.command()
    );
    // The reproducer is a command, and running its configuration fails the same way.
    assert!(shrunk.config.command().contains("--plant-bug double-apply"));
    let again = run_seed(&shrunk.config).failure.expect("the reproducer reproduces");
    assert_eq!(again, shrunk.failure);
}

/// The apply's rules live in the engine's `BatchApply`, which the service runs; these bugs are
/// planted there, and the simulator must catch each and shrink the run.
#[test]
fn bugs_planted_in_the_engines_apply_are_caught_and_shrunk() {
    for (bug, expected, ops, seeds) in [
        // The merge overwrites a local write the capture had not read: the capture then records
        // it over the merge's metadata, and the row and its metadata disagree for good.
        (PlantedBug::SkipXminCheck, Invariant::LocalWrites, 400, 0..80),
        // A merge into a missing row whose local insert and delete are still on their way
        // leaves metadata the capture then never accounts for: the causal lengths disagree
        // (seed 91 is the first; before the first wait for a local write released the rows,
        // the guard probed for ever first, a breach of the engine's contract, and since the
        // guard's load locks new rows' keys first, seed 29 still ends that way; since a batch's
        // last part writes and commits in one round trip, which moved every run's timing,
        // seeds 48 and 64 end that way too, probing for ever at a row its metadata calls
        // deleted, where seed 48 showed the disagreement before).
        (PlantedBug::NoMissingRowWait, Invariant::Convergence, 400, 65..120),
        // The same loss with the keys locked, when the count of local removals is not
        // consulted: a local insert and delete of the key, counted but not yet captured, are
        // overwritten unseen: the merged row's causal length then disagrees with what its
        // writer had seen (seed 48 is the first; before the guard's load locked new rows' keys
        // first, seed 58 was, where the capture then dropped the local write; now its guard
        // probes for ever first, at a row its metadata calls deleted; since a batch's last part
        // writes and commits in one round trip, seed 6 ends that way first, and seed 48 is the
        // first whose causal lengths disagree).
        (PlantedBug::IgnoreRemovalCounts, Invariant::Convergence, 400, 40..120),
        // Planted in the simulator's local writers (the service's trigger missing), beside the
        // engine's key locks. Without spooling it was rare (seed 522 was the first: the capture
        // records the lost local writes against the merge's metadata, and the causal lengths
        // disagree); with spooled transactions it showed as a capture waiting for metadata an
        // earlier segment held (seed 136). Without the triggers local removals do not count
        // themselves either, so merges of new rows skip the wait for the capture, and the lost
        // writes show at once (seed 64: the causal lengths disagreed; since the guard's load
        // locks the keys of new rows itself, that seed's guard probes for ever first, at a row
        // its metadata calls deleted, and seed 75 was the first whose causal lengths disagreed;
        // since a batch's last part writes and commits in one round trip, seeds 100 and 122 end
        // that way first, and seed 133 is the first whose causal lengths disagree).
        (PlantedBug::NoKeyLockTrigger, Invariant::Convergence, 400, 125..200),
        // Batches cut inside a source transaction: a receiver commits part of it.
        (PlantedBug::SplitTransactions, Invariant::Atomicity, 400, 0..80),
        // Deferral needs a relayed change to overtake its origin's: rare, and moved by every
        // change of the apply's timing, so the range starts near a seed known to catch it. Since
        // the guard's load locks the keys of new rows itself, seed 105 at 4,000 operations is the
        // first of 0..700 again (it was 471 while local inserts no longer made merges of new rows
        // wait and the keys were locked after a first load; 105 since the first wait for a local
        // write releases the rows; 105 at 2,000 before that).
        (PlantedBug::DropDeferred, Invariant::Convergence, 4000, 100..110),
        // Gaps come from batches lost inside a connection (the ghost fault).
        (PlantedBug::ApplyPastGap, Invariant::ExactlyOnce, 400, 0..80),
        // A transaction applied before what it built on shows, through its relayed row
        // states, part of a third node's transaction.
        (PlantedBug::IgnoreBuildsOn, Invariant::Atomicity, 400, 0..80),
        // The rows a TRUNCATE emptied read from the metadata instead of its trigger's record:
        // rows written just before it and not captured yet are missed (seed 6 is the first).
        (PlantedBug::TruncateFromMetadata, Invariant::NothingDropped, 400, 0..80),
        // A segment of a spooled transaction that restarts alone after the rollback took the
        // segments before it: the receiver commits the transaction without them. Needs a
        // restart inside a spooled transaction, so longer runs, from near a seed known to catch
        // it: 238 is the first since local inserts no longer make merges of new rows wait (244
        // since the first wait for a local write releases the rows, 93 before that, and 21
        // before merges of new rows skipped the wait for the capture).
        (PlantedBug::RestartSegmentAlone, Invariant::Atomicity, 2000, 230..260),
    ] {
        let cfg = caught(bug, expected, ops, seeds);
        let failure = run_seed(&cfg).failure.expect("it failed a moment ago");
        let shrunk = shrink(&cfg, &failure, 40);
        assert_eq!(shrunk.failure.invariant, expected, "{}", shrunk.config.command());
        assert!(shrunk.config.command().contains(bug.name()));
        let again = run_seed(&shrunk.config).failure.expect("the reproducer reproduces");
        assert_eq!(again, shrunk.failure);
    }
}

/// Issue 16: the last node joins the running cluster as `accord join` does, copied chunk by
/// chunk from a donor while every node writes, with the engine's copy rules
/// (`accord_engine::join`); the join process is killed and resumed at times. The joined node
/// must converge with everyone, against the oracle.
#[test]
fn a_node_joins_while_every_node_writes() {
    let configs: Vec<SimConfig> = (0..120)
        .map(|seed| SimConfig {
            join: true,
            ..config(seed, 400)
        })
        .collect();
    let reports = run_many(&configs, jobs(), |_| {});
    assert_all_passed(&reports);
    assert!(reports.iter().all(|r| r.stats.joined_at > 0), "every run's node joined");
    let total = |f: fn(&accord_sim::Stats) -> u64| reports.iter().map(|r| f(&r.stats)).sum::<u64>();
    assert!(total(|s| s.join_chunks) > 120, "joins copied in chunks");
    assert!(total(|s| s.join_marks) > 0, "no join waited for a donor's capture");
    assert!(total(|s| s.join_kills) > 0, "no join was killed and resumed");
    assert!(
        total(|s| s.members_added) >= 120,
        "the running nodes learned of the joining node from the membership's gossip"
    );
}

/// Issue 16: a node leaves the running cluster as `accord leave` does (it hands its changes over,
/// then leaves by itself or dies and is removed through another node), during the workload and
/// alongside a join; the others drop it and converge with the sums of every write, its own too.
/// Issue 17: every node runs a migration adding a `delta` column at its own time while all
/// write (crashes and all faults included); migrated nodes write the new column while the others
/// cannot read it yet, and apply the transactions before such a change while it waits. The oracle
/// expects both delta columns exact.
#[test]
fn nodes_migrate_one_by_one_while_every_node_writes() {
    let configs: Vec<SimConfig> = (0..60)
        .map(|seed| SimConfig {
            migrate: true,
            ..config(seed, OPS)
        })
        .collect();
    let reports = run_many(&configs, jobs(), |_| {});
    assert_all_passed(&reports);
    let total = |f: fn(&accord_sim::Stats) -> u64| reports.iter().map(|r| f(&r.stats)).sum::<u64>();
    assert_eq!(total(|s| s.migrations), 60 * 3, "every node of every run migrated");
    assert!(
        total(|s| s.shape_waits) > 0,
        "no node ever waited for its migration to read a peer's changes"
    );
    assert!(
        total(|s| s.shape_splits) > 0,
        "no batch applied the transactions before one that waited (the service's split)"
    );
}

/// A change kept for a later merge (an unchanged TOAST value not here yet) was stored under the
/// node's shape of its day, and is read under the node's shape when the row is merged again:
/// these seeds park one ("remote state ... has 3 columns, the table has 4") when kept changes
/// are read as they are.
#[test]
fn kept_changes_are_read_under_the_tables_shape_after_a_migration() {
    let configs: Vec<SimConfig> = [317, 390]
        .into_iter()
        .map(|seed| SimConfig {
            migrate: true,
            ..config(seed, 2_000)
        })
        .collect();
    assert_all_passed(&run_many(&configs, jobs(), |_| {}));
}

/// Issue 19: the table says `inserts=review`. Of concurrent inserts of one key the earliest
/// keeps the row and every other is an open displaced-insert item on every node, holding its own
/// writes (the oracle derives both from the writes each writer had seen), with every fault.
#[test]
fn inserts_of_one_key_keep_the_earliest_and_queue_the_others_whole() {
    let configs: Vec<SimConfig> = (0..120)
        .map(|seed| SimConfig {
            review_inserts: true,
            ..config(seed, OPS)
        })
        .chain((120..160).map(|seed| SimConfig {
            review_inserts: true,
            join: true,
            leave: true,
            nodes: 4,
            ..config(seed, 400)
        }))
        .collect();
    let reports = run_many(&configs, jobs(), |_| {});
    assert_all_passed(&reports);
    let displaced: u64 = reports.iter().map(|r| r.stats.displaced_inserts).sum();
    assert!(displaced > 100, "only {displaced} displaced inserts in 160 runs");
    let resolved: u64 = reports.iter().map(|r| r.stats.displaced_resolved).sum();
    assert!(resolved > 10, "only {resolved} displaced inserts resolved in 160 runs");
}

#[test]
fn a_node_leaves_while_every_node_writes() {
    let configs: Vec<SimConfig> = (0..100)
        .map(|seed| SimConfig {
            leave: true,
            ..config(seed, 400)
        })
        .chain((100..140).map(|seed| SimConfig {
            leave: true,
            join: true,
            nodes: 4,
            ..config(seed, 400)
        }))
        .collect();
    let reports = run_many(&configs, jobs(), |_| {});
    assert_all_passed(&reports);
    let left = reports.iter().filter(|r| r.stats.left_at > 0).count();
    assert!(left >= 120, "nodes left in {left} of 140 runs");
    let total = |f: fn(&accord_sim::Stats) -> u64| reports.iter().map(|r| f(&r.stats)).sum::<u64>();
    assert!(
        total(|s| s.members_removed) >= 2 * 120,
        "the others dropped the node that left"
    );
    // A leaving node that does not wait for its last changes to be acknowledged loses them.
    let bug = PlantedBug::LeaveWithoutHandover;
    let caught = (0..20)
        .map(|seed| SimConfig {
            leave: true,
            bug: Some(bug),
            ..config(seed, 400)
        })
        .find_map(|cfg| run_seed(&cfg).failure.map(|f| (cfg, f)));
    let (cfg, failure) = caught.unwrap_or_else(|| panic!("planted bug {} went unnoticed", bug.name()));
    assert_eq!(failure.invariant, Invariant::Liveness, "{}: {failure}", cfg.command());
    assert!(cfg.command().contains("--leave"));
}

/// The join's rules, each planted wrong, are caught.
#[test]
fn bugs_planted_in_a_join_are_caught() {
    for (bug, expected, seeds) in [
        // A row whose version the donor's capture had not accounted for, copied as it is: the
        // write it holds arrives again with its change and counts twice.
        (PlantedBug::JoinCopiesUnsettled, Invariant::Convergence, 0..60),
        // Every such row left to the stream: a row written in a subtransaction and captured
        // before the join's positions never reaches the new node (seed 5 is the first; an
        // update lacking TOASTed values it left unchanged, applied in part, is caught too).
        (PlantedBug::JoinSkipsUnsettled, Invariant::Convergence, 0..80),
        // Streams from the copy's last positions: changes the donor applied after an earlier
        // chunk was read never reach those rows.
        (PlantedBug::JoinStreamsFromLatest, Invariant::Convergence, 0..60),
        // Positions read before the donor's node took the new node in: nodes prune changes the
        // new node streams from, and it is refused when it connects.
        (PlantedBug::JoinSkipsMembersWait, Invariant::Protocol, 0..60),
        // Collection rounds without the joining node: a round completes while its copy holds a
        // row alive that a delete below the cut removed elsewhere, and the nodes then disagree
        // about what met what (seed 69 is the first where the nodes differ in a row; seeds 41
        // and 57 log a conflict on one node that no concurrent writes explain, others lose a
        // review closure).
        (PlantedBug::RoundsWithoutJoiner, Invariant::Convergence, 58..100),
    ] {
        let configs: Vec<SimConfig> = seeds
            .clone()
            .map(|seed| SimConfig {
                bug: Some(bug),
                join: true,
                ..config(seed, 800)
            })
            .collect();
        let reports = run_many(&configs, jobs(), |_| {});
        let first = reports
            .into_iter()
            .filter(|r| r.failure.is_some())
            .min_by_key(|r| r.config.seed)
            .unwrap_or_else(|| panic!("planted bug {} went unnoticed on seeds {seeds:?}", bug.name()));
        let failure = first.failure.expect("filtered on a failure");
        assert_eq!(failure.invariant, expected, "{}: {failure}", first.config.command());
        assert!(first.config.command().contains("--join"));
    }
}

/// Apply transactions commit asynchronously; a crash of the machine loses those not flushed. A
/// node that acknowledges them anyway lets the peer prune changes it then lacks for good.
#[test]
fn acknowledging_before_durable_is_caught_and_shrunk() {
    let bug = PlantedBug::AckBeforeDurable;
    let expected = Invariant::Protocol;
    // Rarer since batches join whole transactions (fewer apply commits to lose): 424 is the
    // first seed that catches it.
    let found = (0..600).map(|seed| SimConfig {
        bug: Some(bug),
        faults: "machine-crash".parse().expect("a fault kind"),
        ..config(seed, 400)
    });
    let mut tried = 0;
    for cfg in found {
        tried += 1;
        let Some(failure) = run_seed(&cfg).failure else {
            continue;
        };
        assert_eq!(failure.invariant, expected, "{}: {failure}", cfg.command());
        let shrunk = shrink(&cfg, &failure, 40);
        assert_eq!(shrunk.failure.invariant, expected, "{}", shrunk.config.command());
        assert!(shrunk.config.command().contains(bug.name()));
        let again = run_seed(&shrunk.config).failure.expect("the reproducer reproduces");
        assert_eq!(again, shrunk.failure);
        // The same seeds pass when only durable positions are acknowledged.
        let honest = SimConfig { bug: None, ..cfg };
        assert!(run_seed(&honest).passed(), "{}", honest.command());
        return;
    }
    panic!("planted bug {} went unnoticed on {tried} seeds", bug.name());
}

#[test]
fn planted_loop_is_caught() {
    caught(PlantedBug::ForgetFromPeer, Invariant::NoLoops, 200, 0..20);
}

#[test]
fn planted_missing_merged_stamp_breaks_clocks() {
    caught(PlantedBug::NoMergedStamp, Invariant::Clocks, 300, 0..40);
}

/// A group of the capture that only merged writes no checkpoint; a restarted capture's clock
/// passes the stamps merges recorded with their commits instead. Without that, a local write
/// after a crash is stamped below a change merged before it (seed 110 is the first to show it
/// of 0..300; seed 83 was, before a batch's last part wrote and committed in one round trip).
#[test]
fn a_restarted_clock_that_forgets_recorded_merges_breaks_clocks() {
    let cfg = caught(PlantedBug::ForgetMergedStamps, Invariant::Clocks, 600, 100..120);
    let honest = SimConfig { bug: None, ..cfg };
    assert!(run_seed(&honest).passed(), "{}", honest.command());
}

#[test]
fn without_faults_runs_pass_too() {
    let cfg = SimConfig {
        faults: FaultSet::none(),
        ..config(3, 300)
    };
    let report = run_seed(&cfg);
    assert!(report.passed(), "{:?}", report.failure);
    assert_eq!(report.stats.crashes + report.stats.partitions + report.stats.drops, 0);
}

fn args(seeds: &str) -> SimArgs {
    SimArgs {
        seed: None,
        seeds: Some(seeds.into()),
        nodes: 3,
        ops: 80,
        faults: "all".into(),
        max_offset_us: None,
        jobs: Some(2),
        check_determinism: false,
        shrink: false,
        trace: false,
        join: false,
        leave: false,
        migrate: false,
        review_inserts: false,
        plant_bug: None,
    }
}

#[test]
fn cli_prints_a_line_per_seed_and_the_summary() {
    let mut out = Vec::new();
    assert!(run_cli(&args("0..3"), &mut out).unwrap());
    let text = String::from_utf8(out).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert!(lines[0].starts_with("seed 0: ok hash="), "{text}");
    assert!(lines[2].starts_with("seed 2: ok"), "{text}");
    assert!(text.contains("events/s") && text.contains("deliveries/s"), "{text}");
    assert_eq!(lines.last(), Some(&"3 passed, 0 failed"));
}

#[test]
fn cli_prints_the_replay_command_and_the_shrunk_reproducer() {
    let mut a = args("0..40");
    a.plant_bug = Some("forget-from-peer".into());
    a.ops = 60;
    a.shrink = true;
    let mut out = Vec::new();
    assert!(!run_cli(&a, &mut out).unwrap());
    let text = String::from_utf8(out).unwrap();
    assert!(
        text.contains("replay: accord sim --seed 0 --nodes 3 --ops 60 --plant-bug forget-from-peer"),
        "{text}"
    );
    assert!(text.contains("smallest reproducer"), "{text}");
    assert!(text.lines().last().is_some_and(|l| l.ends_with("40 failed")), "{text}");
}

#[test]
fn bad_arguments_are_explained() {
    let mut a = args("5..2");
    let err = run_cli(&a, &mut Vec::new()).unwrap_err().to_string();
    assert!(err.contains("A..B"), "{err}");
    a.seeds = Some("0..1".into());
    a.faults = "earthquake".into();
    let err = run_cli(&a, &mut Vec::new()).unwrap_err().to_string();
    assert!(err.contains("earthquake") && err.contains("partition"), "{err}");
    assert_eq!(parse_seed_range("0..500").unwrap().count(), 500);
}
