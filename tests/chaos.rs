//! The chaos suite: thousands of seeded simulations of 3-, 5- and 7-node Raft clusters under
//! crashes, partitions, message loss, duplication and delay, each checked for election safety, log
//! matching, leader completeness, state-machine safety, linearizability of its client history and
//! liveness after healing; plus targeted scenarios (a rejoining node, leadership transfer,
//! priority elections), the failover measurement, and proof that the checkers catch deliberately
//! injected protocol bugs.
//!
//! Each seed also draws how the transports report broken connections (`ConnectionHints`): a
//! crash reported to every survivor, to about half of them, or to none, and false reports about
//! live leaders at none, some or all fault events. The failover measurement runs with hints
//! delivered, half lost, and none.
//!
//! - `cargo test --test chaos` runs 2,000 seeds (`SIM_SEEDS=N` runs N, `SIM_SEED_START=S` starts
//!   at S);
//! - `SIM_SEED=S cargo test --test chaos -- chaos_seeds --exact --nocapture` replays one seed
//!   (`SIM_TRACE=1` in front prints every event of it).

mod common;

use common::scenario::{env_u64, fail_with_replay_in, measure_failover, run_chaos, sweep};
use consensus::NodeId;
use consensus::protocol::raft::Control;
use consensus::sim::Violation;
use consensus::sim::{ConnectionHints, FaultProfile, Sim, SimConfig, SimFailure};
use consensus::transport::simulated::LatencyModel;

#[test]
fn chaos_seeds() {
    if let Some(seed) = env_u64("SIM_SEED") {
        let config = SimConfig::chaos(seed);
        eprintln!("replaying seed {seed}: {config:#?}");
        match run_chaos(config) {
            Ok(report) => eprintln!("seed {seed} passed: {report:#?}"),
            Err(failure) => fail_with_replay_in("chaos", "chaos_seeds", &[failure]),
        }
        return;
    }
    let count = env_u64("SIM_SEEDS").unwrap_or(2_000);
    let start = env_u64("SIM_SEED_START").unwrap_or(0);
    let seeds: Vec<u64> = (start..start + count).collect();
    let result = sweep(&seeds, 2, SimConfig::chaos);
    let reports = &result.reports;
    let sum = |f: fn(&consensus::sim::SimReport) -> u64| reports.iter().map(f).sum::<u64>();
    eprintln!(
        "chaos: {} seeds in {:.1} s wall; {} passed; ops completed {}, pending {}, abandoned {}; \
         crashes {}; leader terms {}; entries committed {}; duplicate applications {}; checker steps {}; \
         messages sent {}, dropped {}, duplicated {}",
        result.seeds,
        result.elapsed.as_secs_f64(),
        reports.len(),
        sum(|r| r.ops_completed as u64),
        sum(|r| r.ops_pending as u64),
        sum(|r| r.ops_abandoned as u64),
        sum(|r| r.crashes as u64),
        sum(|r| r.leader_terms as u64),
        sum(|r| r.committed),
        sum(|r| r.duplicate_applies as u64),
        sum(|r| r.checker_steps),
        sum(|r| r.network.sent),
        sum(|r| r.network.dropped_random
            + r.network.dropped_partition
            + r.network.dropped_overflow),
        sum(|r| r.network.duplicated),
    );
    if !result.failures.is_empty() {
        fail_with_replay_in("chaos", "chaos_seeds", &result.failures);
    }
    // The suite must exercise what it claims to: operations complete and faults happen.
    assert!(
        sum(|r| r.ops_completed as u64) > 10 * count,
        "too few operations completed"
    );
    assert!(sum(|r| r.crashes as u64) > count, "too few crashes");
    // Connection hints: delivered, lost (seeds that deliver none or half) and false.
    let (true_hints, false_hints) = (sum(|r| r.hints.0 as u64), sum(|r| r.hints.1 as u64));
    eprintln!("connection hints delivered: {true_hints} true, {false_hints} false");
    assert!(true_hints > count && false_hints > count, "too few hints");
    let without = reports.iter().filter(|r| r.hints.0 == 0 && r.crashes > 0);
    assert!(without.count() > 0, "no seed with its hints lost");
    // Snapshots: taken, and sent to followers the leader's compacted log no longer reaches.
    let (taken, installed) = (sum(|r| r.snapshots.0), sum(|r| r.snapshots.1));
    eprintln!("snapshots: {taken} taken, {installed} installed from a leader");
    assert!(
        taken > count && installed > count / 20,
        "too few snapshots taken or installed"
    );
    // Membership changes: asked of leaders (faults and churn), and committed.
    let (asked, committed) = (
        sum(|r| r.membership_changes.0),
        sum(|r| r.membership_changes.1),
    );
    let churned = reports
        .iter()
        .filter(|r| r.membership_changes.0 > 5)
        .count();
    eprintln!(
        "membership changes: {asked} asked, {committed} committed; {churned} seeds with more than five"
    );
    assert!(
        asked > 2 * count && committed > count && churned as u64 > count / 10,
        "too few membership changes"
    );
}

/// Seeds of deep sweeps (`SIM_SEED_START=1000000 SIM_SEEDS=150000`, 2026-12-04, and the same
/// from 2000000) that failed before four fixes, kept so that each stays fixed:
/// - 1025017, 1039971, 1044623, 1092592, 1094115, 1137012: a voter ignored the pre-votes of a
///   voter of a newer membership it had not yet received, and that pre-candidate refused an
///   equal log on the tie-break however long it failed to win: the group elected no one;
/// - 1103926: an answer to a snapshot chunk from before the follower's restart set the
///   leader's idea of what it held past what it held, and the transfer stalled for good;
/// - 1014201: the final check ran while a membership change asked late was still joint (the
///   harness now gives it the liveness deadline);
/// - 2029166 (of `SIM_SEED_START=2000000`): the commit checker took an entry that voters had
///   compacted into their snapshots for one they lacked, when a stale leader committed it;
/// - 3110783, 3392937 (of `SIM_SEED_START=3100000 SIM_SEEDS=300000`, 2026-12-05): a sole voter
///   (a membership change left it alone) counted its own vote before the write recording it,
///   led the new term, and was killed before that write; back in the older term, it voted in
///   that term for another node, which led it too.
#[test]
fn seeds_that_found_bugs() {
    let seeds = [
        1_014_201, 1_025_017, 1_039_971, 1_044_623, 1_092_592, 1_094_115, 1_103_926, 1_137_012,
        2_029_166, 3_110_783, 3_392_937,
    ];
    let result = sweep(&seeds, 2, SimConfig::chaos);
    if !result.failures.is_empty() {
        fail_with_replay_in("chaos", "chaos_seeds", &result.failures);
    }
}

#[test]
fn the_same_seed_replays_bit_for_bit() {
    let run = |seed, trace| {
        let mut config = SimConfig::chaos(seed);
        config.trace = trace;
        let mut sim: Sim = Sim::new(config).expect("valid settings");
        sim.start_clients();
        sim.start_faults();
        sim.run_until(2_000_000).expect("no violation");
        (
            format!("{:?}", sim.history()),
            format!("{:?}", sim.report()),
        )
    };
    assert_eq!(run(11, false), run(11, false));
    assert_ne!(run(11, false).0, run(12, false).0);
    assert_eq!(run(11, false), run(11, true), "tracing changes nothing");
}

/// A stable cluster with a leader, after `warmup_us`.
fn stable_cluster(config: SimConfig, warmup_us: u64) -> Sim {
    let mut sim: Sim = Sim::new(config).expect("valid settings");
    sim.start_clients();
    sim.run_until(warmup_us)
        .expect("no violation while warming up");
    assert!(sim.leader().is_some(), "no leader after {warmup_us} us");
    sim
}

#[test]
fn a_rejoining_partitioned_node_does_not_depose_a_healthy_leader() {
    for seed in 0..20 {
        let mut config = SimConfig::new(seed, 5);
        config.protocol.pre_vote = true;
        config.protocol.check_quorum = true;
        let mut sim = stable_cluster(config, 1_000_000);
        let leader = sim.leader().expect("a leader");
        let term = sim.node(leader).expect("leader is up").term();
        let follower = sim
            .node_ids()
            .into_iter()
            .find(|&id| id != leader)
            .expect("a follower");
        sim.network().isolate(follower);
        // Long enough for many election timeouts of the isolated node.
        sim.run_until(sim.now_us() + 3_000_000)
            .expect("no violation while isolated");
        sim.network().rejoin(follower);
        sim.run_until(sim.now_us() + 2_000_000)
            .expect("no violation after rejoining");
        assert_eq!(
            sim.leader(),
            Some(leader),
            "seed {seed}: the leader changed"
        );
        for id in sim.node_ids() {
            let node = sim.node(id).expect("all up");
            assert_eq!(node.term(), term, "seed {seed}: {id} moved to a new term");
            assert_eq!(
                node.leader(),
                Some(leader),
                "seed {seed}: {id} follows someone else"
            );
        }
        common::scenario::finish(&mut sim).unwrap_or_else(|f| panic!("{f}"));
    }
}

#[test]
fn leadership_transfer_hands_over_to_the_target() {
    for seed in 0..20 {
        let mut sim = stable_cluster(SimConfig::new(seed, 5), 1_000_000);
        let leader = sim.leader().expect("a leader");
        let old_term = sim.node(leader).expect("up").term();
        let target = NodeId(leader.0 % 5 + 1);
        sim.transfer_leadership(leader, target);
        let moved = sim
            .run_until_or(sim.now_us() + 1_000_000, |s| s.leader() == Some(target))
            .expect("no violation during the transfer");
        assert!(
            moved,
            "seed {seed}: leadership did not move from {leader} to {target}"
        );
        assert!(sim.node(target).expect("up").term() > old_term);
        common::scenario::finish(&mut sim).unwrap_or_else(|f| panic!("{f}"));
    }
}

#[test]
fn priority_based_election_settles_on_the_highest_priority_node() {
    for seed in 0..20 {
        let mut config = SimConfig::new(seed, 5);
        config.protocol.priority_based = true;
        let favourite = NodeId(seed % 5 + 1);
        config.protocol.priorities.insert(favourite, 10);
        let mut sim: Sim = Sim::new(config).expect("valid settings");
        sim.start_clients();
        // Keep the favourite away at first so that someone else wins the first election.
        sim.network().isolate(favourite);
        sim.run_until(1_000_000).expect("no violation");
        assert!(sim.leader().is_some_and(|l| l != favourite));
        sim.network().rejoin(favourite);
        let settled = sim
            .run_until_or(sim.now_us() + 3_000_000, |s| s.leader() == Some(favourite))
            .expect("no violation");
        assert!(
            settled,
            "seed {seed}: {favourite} (priority 10) never took over"
        );
        sim.run_until(sim.now_us() + 1_000_000)
            .expect("no violation");
        assert_eq!(
            sim.leader(),
            Some(favourite),
            "seed {seed}: leadership left the favourite"
        );
        common::scenario::finish(&mut sim).unwrap_or_else(|f| panic!("{f}"));
    }
}

/// Leader crashes over 60 seeds (17 each: 1,020 failovers) of 3- and 5-node clusters, election
/// timeout 150 ms (randomized to 150–300 ms), heartbeat 50 ms, with `hints` on every crash;
/// prints the percentiles and returns p99 in simulated milliseconds.
fn failover_p99_ms(label: &str, hints: ConnectionHints) -> f64 {
    let started = std::time::Instant::now();
    let mut by_size: std::collections::BTreeMap<usize, Vec<u64>> = Default::default();
    for seed in 0..60 {
        let nodes = if seed % 2 == 0 { 5 } else { 3 };
        match measure_failover(seed, nodes, 17, hints) {
            Ok(s) => by_size.entry(nodes).or_default().extend(s),
            Err(failure) => panic!("{label}: {failure}"),
        }
    }
    let summary = |samples: &mut Vec<u64>| {
        samples.sort_unstable();
        let at = |q: f64| samples[((samples.len() - 1) as f64 * q).round() as usize] as f64 / 1e3;
        let line = format!(
            "{} leader crashes: p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms, min {:.1} ms",
            samples.len(),
            at(0.5),
            at(0.99),
            at(1.0),
            at(0.0)
        );
        (line, at(0.99))
    };
    let mut all: Vec<u64> = by_size.values().flatten().copied().collect();
    for (nodes, samples) in &mut by_size {
        eprintln!("failover ({label}), {nodes} nodes: {}", summary(samples).0);
    }
    let (line, p99_ms) = summary(&mut all);
    eprintln!(
        "failover ({label}) over {line} (election timeout 150 ms, heartbeat 50 ms; {:.1} s wall)",
        started.elapsed().as_secs_f64()
    );
    assert!(all.len() >= 1_000);
    p99_ms
}

#[test]
fn failover_latency() {
    // Silence only: the survivors wait out their randomized election timeouts.
    let p99_ms = failover_p99_ms("no hints", ConnectionHints::none());
    assert!(p99_ms < 2_000.0, "p99 failover {p99_ms} ms exceeds 2 s");
}

#[test]
fn failover_latency_with_connection_hints() {
    // The survivors' transports report the crash within 2 ms (a killed process's sockets are
    // reset at once): the followers pre-vote at once instead of waiting out their timeouts.
    let p99_ms = failover_p99_ms("hints delivered", ConnectionHints::delivered(2_000));
    assert!(p99_ms <= 200.0, "p99 failover {p99_ms} ms exceeds 200 ms");
}

#[test]
fn failover_with_most_hints_lost_still_completes() {
    // Each survivor hears of the crash only half the time: a follower that heard campaigns
    // early and may be refused by one still under the lease; the timeouts finish the job.
    let hints = ConnectionHints {
        delivery_probability: 0.5,
        ..ConnectionHints::delivered(2_000)
    };
    let p99_ms = failover_p99_ms("half the hints lost", hints);
    assert!(p99_ms < 2_000.0, "p99 failover {p99_ms} ms exceeds 2 s");
}

/// Clean stops of the leader, one after another: it hands over (`Control::HandOver`), then
/// stops and later restarts, while clients run. The hand-over must succeed every time, and every
/// safety property, liveness and linearizability must hold at the end.
#[test]
fn leaders_that_hand_over_before_stopping_keep_every_property() {
    for seed in 0..20 {
        let nodes = if seed % 2 == 0 { 5 } else { 3 };
        let mut config = SimConfig::new(seed, nodes);
        config.connection_hints = ConnectionHints::delivered(2_000);
        let mut sim = stable_cluster(config, 1_000_000);
        for round in 0..2 * nodes {
            let leader = sim.leader().expect("a leader");
            sim.control(leader, Control::HandOver);
            let handed = sim
                .run_until_or(sim.now_us() + 500_000, |s| {
                    s.leader().is_some_and(|l| l != leader)
                })
                .unwrap_or_else(|f| panic!("seed {seed}: {f}"));
            assert!(
                handed,
                "seed {seed}, round {round}: no hand-over from {leader}"
            );
            sim.crash(leader);
            sim.run_until(sim.now_us() + 200_000)
                .unwrap_or_else(|f| panic!("seed {seed}: {f}"));
            sim.restart_node(leader);
            sim.run_until(sim.now_us() + 300_000)
                .unwrap_or_else(|f| panic!("seed {seed}: {f}"));
        }
        common::scenario::finish(&mut sim).unwrap_or_else(|f| panic!("seed {seed}: {f}"));
    }
}

#[test]
fn false_hints_do_not_depose_a_leader_that_holds_a_quorum() {
    for seed in 0..20 {
        let nodes = if seed % 2 == 0 { 5 } else { 3 };
        let mut sim = stable_cluster(SimConfig::new(seed, nodes), 1_000_000);
        let leader = sim.leader().expect("a leader");
        let term = sim
            .node(leader)
            .map(|n| n.term())
            .expect("the leader is live");
        // A blip on one node's connections every 120 ms (the leader's heartbeats, every 50 ms,
        // clear each before the next).
        for _ in 0..25 {
            sim.false_hint();
            sim.run_until(sim.now_us() + 120_000).expect("no violation");
        }
        assert_eq!(
            sim.leader(),
            Some(leader),
            "seed {seed}: the leader changed"
        );
        let now = sim.node(leader).map(|n| n.term());
        assert_eq!(now, Some(term), "seed {seed}: the term moved");
        common::scenario::finish(&mut sim).unwrap_or_else(|f| panic!("seed {seed}: {f}"));
    }
}

/// Runs seeds `0..limit` of `config_for` and returns the first safety violation.
fn first_safety_violation(
    limit: u64,
    config_for: impl Fn(u64) -> SimConfig + Sync,
) -> Option<SimFailure> {
    let seeds: Vec<u64> = match env_u64("SIM_SEED") {
        Some(seed) => vec![seed],
        None => (0..limit).collect(),
    };
    let result = sweep(&seeds, 2, config_for);
    result
        .failures
        .into_iter()
        .find(|f| f.violation.is_safety())
}

/// Many elections: short timeouts against slow, lossy links, no pre-vote, frequent partitions.
fn vote_twice_config(seed: u64) -> SimConfig {
    let mut config = SimConfig::chaos(seed);
    config.protocol.injected_bugs.vote_twice_in_a_term = true;
    config.protocol.pre_vote = false;
    config.protocol.check_quorum = false;
    config.faults = FaultProfile {
        mean_interval_us: 150_000,
        ..FaultProfile::chaos()
    };
    config
}

/// The Figure-8 pattern: three nodes, short timeouts against slow and lossy links, leaders crashed
/// and isolated every few tens of milliseconds, one entry per append and one append in flight, so
/// that a new leader often counts replicas of an old-term entry before its own entries arrive and
/// then loses its seat to a node holding a conflicting entry of a later term.
fn figure8_config(seed: u64) -> SimConfig {
    let mut config = SimConfig::chaos(seed);
    config.nodes = 3;
    config
        .protocol
        .injected_bugs
        .commit_previous_term_by_counting = true;
    config.protocol.max_entries_per_append = 1;
    config.protocol.max_inflight_appends = 1;
    config.protocol.election_timeout_ticks = 5;
    config.protocol.heartbeat_interval_ticks = 1;
    config.network.latency = LatencyModel::uniform(1_000, 30_000);
    config.network.drop_probability = 0.2;
    config.faults = FaultProfile {
        mean_interval_us: 60_000,
        crash: 2,
        crash_leader: 4,
        partition: 2,
        one_way: 1,
        isolate_leader: 6,
        weather: 2,
        transfer: 0,
        membership: 0,
        max_down_us: 300_000,
        max_fault_us: 300_000,
    };
    config
}

/// Asserts that some seed below `limit` of `with_bug` breaks a safety property, and that the very
/// same seed passes once the bug is switched off again (so the catch is the bug's doing).
fn assert_bug_is_caught(name: &str, limit: u64, with_bug: fn(u64) -> SimConfig) -> SimFailure {
    let Some(failure) = first_safety_violation(limit, with_bug) else {
        panic!("no seed in 0..{limit} caught the injected bug {name}");
    };
    eprintln!("{name} caught: {failure}");
    let mut control = with_bug(failure.seed);
    control.protocol.injected_bugs = Default::default();
    control.apply_bugs = Default::default();
    if let Err(control_failure) = run_chaos(control) {
        panic!(
            "seed {} fails without the bug too: {control_failure}",
            failure.seed
        );
    }
    failure
}

#[test]
fn injected_bug_vote_twice_in_a_term_is_caught() {
    let failure = assert_bug_is_caught("vote_twice_in_a_term", 200, vote_twice_config);
    assert!(
        matches!(failure.violation, Violation::ElectionSafety { .. }),
        "expected two leaders in one term, got {}",
        failure.violation
    );
}

#[test]
fn injected_bug_commit_previous_term_by_counting_is_caught() {
    assert_bug_is_caught("commit_previous_term_by_counting", 300, figure8_config);
}

/// Chaos with every read on the core's read path, at a leader that skips the heartbeat round.
fn read_without_round_config(seed: u64) -> SimConfig {
    let mut config = SimConfig::chaos(seed);
    config
        .protocol
        .injected_bugs
        .read_without_confirming_leadership = true;
    config.protocol.lease_reads = false;
    config.reads_through_log = false;
    config
}

#[test]
fn injected_bug_read_without_confirming_leadership_is_caught() {
    let failure = assert_bug_is_caught(
        "read_without_confirming_leadership",
        200,
        read_without_round_config,
    );
    assert!(
        matches!(failure.violation, Violation::Linearizability { .. }),
        "expected a stale read, got {}",
        failure.violation
    );
}

/// Learners added and promoted often, and partitions that leave a leader with its learners
/// but without a majority of its voters.
fn learners_counted_config(seed: u64) -> SimConfig {
    let mut config = SimConfig::chaos(seed);
    config.protocol.injected_bugs.count_learners_in_quorum = true;
    config.spares = 2;
    config.faults.membership = 6;
    config
}

#[test]
fn injected_bug_count_learners_in_quorum_is_caught() {
    let failure = assert_bug_is_caught("count_learners_in_quorum", 300, learners_counted_config);
    assert!(
        matches!(failure.violation, Violation::CommitWithoutQuorum { .. }),
        "expected a commit without a quorum, got {}",
        failure.violation
    );
}

/// Forwarded proposals duplicated by the network, so that the log often holds two copies of one
/// proposal: the apply stage must run only the first.
fn apply_duplicates_config(seed: u64) -> SimConfig {
    let mut config = SimConfig::chaos(seed);
    config.apply_bugs.apply_duplicates = true;
    config.protocol.forward_proposals = true;
    config.network.duplicate_probability = 0.3;
    config
}

/// The apply stage is the engine's own, so a bug in it is a bug the chaos suite must catch.
#[test]
fn injected_apply_stage_bug_apply_duplicates_is_caught() {
    assert_bug_is_caught("apply_duplicates", 1000, apply_duplicates_config);
}

// ---- the checkers themselves, on crafted states ----

fn node_with_log(
    id: u64,
    voters: &[u64],
    terms: &[(u64, &'static [u8])],
) -> consensus::protocol::raft::RaftNode {
    use consensus::storage::{HardState, RecoveredState};
    use consensus::{Entry, Payload, ProposalTag};
    let entries = terms
        .iter()
        .enumerate()
        .map(|(i, &(term, data))| Entry {
            term,
            index: i as u64 + 1,
            payload: Payload::Command {
                tag: ProposalTag {
                    proposer: NodeId(1),
                    request_id: i as u64,
                },
                data: bytes::Bytes::from_static(data),
            },
        })
        .collect();
    let term = terms.last().map_or(0, |t| t.0);
    let recovered = RecoveredState {
        hard_state: HardState {
            term,
            voted_for: None,
        },
        entries,
        ..Default::default()
    };
    let config = consensus::protocol::raft::RaftConfig::new(
        NodeId(id),
        voters.iter().copied().map(NodeId).collect(),
    );
    consensus::protocol::raft::RaftNode::new(config, recovered).expect("valid settings")
}

#[test]
fn log_matching_check_flags_logs_that_agree_on_a_term_but_differ_below() {
    use consensus::sim::invariants::check_log_matching;
    let a = node_with_log(1, &[1, 2, 3], &[(1, b"x"), (1, b"y"), (2, b"z")]);
    let b = node_with_log(2, &[1, 2, 3], &[(1, b"x"), (1, b"Y"), (2, b"z")]);
    let c = node_with_log(3, &[1, 2, 3], &[(1, b"x"), (1, b"y"), (3, b"w")]);
    let verdict = check_log_matching(&[(a.id(), a.log()), (b.id(), b.log())]);
    assert!(
        matches!(
            verdict,
            Err(Violation::LogMatching {
                agree_at: 3,
                differ_at: 2,
                ..
            })
        ),
        "{verdict:?}"
    );
    // Diverging after a common prefix is what Raft allows.
    assert_eq!(
        check_log_matching(&[(a.id(), a.log()), (c.id(), c.log())]),
        Ok(())
    );
}

#[test]
fn state_machine_safety_and_leader_completeness_checks_flag_conflicts() {
    use consensus::protocol::raft::{Input, Output};
    use consensus::sim::SafetyMonitor;
    let mut monitor = SafetyMonitor::new();
    let original = node_with_log(1, &[1], &[(1, b"x")]);
    let other = node_with_log(2, &[2], &[(1, b"other")]);
    let committed = original.log().entry(1).expect("entry 1").clone();
    monitor
        .observe_applied(NodeId(1), 1, &committed)
        .expect("first application");
    monitor
        .observe_applied(NodeId(3), 1, &committed)
        .expect("the same entry again");
    let conflict = other.log().entry(1).expect("entry 1").clone();
    assert!(matches!(
        monitor.observe_applied(NodeId(2), 2, &conflict),
        Err(Violation::StateMachineSafety { index: 1, .. })
    ));
    // A single-voter node whose log lacks the committed entry elects itself: flagged at once.
    let mut leader = node_with_log(2, &[2], &[(1, b"other")]);
    let mut out = Output::default();
    for _ in 0..100 {
        leader.step(Input::Tick, &mut out);
        // Its write is durable at once, as a driver reports after the fsync: its vote counts.
        consensus::protocol::Durability::of(&out.write).tell(&mut leader, &mut out);
        if leader.is_leader() {
            break;
        }
    }
    assert!(leader.is_leader(), "a single voter elects itself");
    assert!(matches!(
        monitor.observe_node(&leader),
        Err(Violation::LeaderCompleteness {
            index: 1,
            committed_in: 1,
            ..
        })
    ));
}
