//! The GPU-optimized Raft suite: the Raft chaos suite's seeded simulations (crashes, restarts
//! from durable state, partitions, loss, duplication, delay, leadership transfers, membership
//! changes and churn, spare nodes added with their keys) run with signed votes and
//! acknowledgements, while an adversary on the network injects forged and
//! replayed votes, acknowledgements and certificates. Every run checks Raft's invariants and
//! linearizability, plus the certificates: every node's newest one verifies and names its own
//! log (verified against the membership it names), no forged acknowledgement is ever counted,
//! a leader never commits past its certificate, and what it commits is stored by a quorum of
//! its voters (of both sets in a joint membership; learners never count).
//!
//! - `cargo test --test gpu_raft` runs 2,000 seeds of 3 and 5 voters and 200 seeds of 101
//!   (`SIM_SEEDS=N` and `SIM_LARGE_SEEDS=N` run N; `SIM_SEED_START=S` starts at S);
//! - `SIM_SEED=S cargo test --test gpu_raft -- gpu_raft_seeds --exact --nocapture` replays one
//!   (`SIM_TRACE=1` in front prints every event of it).

mod common;

use common::scenario::{env_u64, fail_with_replay_in, run_chaos_of, sweep_of};
use consensus::protocol::gpu_raft::{GpuRaftConfig, GpuRaftNode};
use consensus::sim::{FaultProfile, SimConfig, SimReport};

fn sweep_and_check(
    test: &str,
    seeds: &[u64],
    config_for: impl Fn(u64) -> SimConfig<GpuRaftConfig> + Sync,
) -> Vec<SimReport> {
    let result = sweep_of::<GpuRaftNode>(seeds, 2, config_for);
    let reports = result.reports;
    let sum = |f: fn(&SimReport) -> u64| reports.iter().map(f).sum::<u64>();
    eprintln!(
        "{test}: {} seeds in {:.1} s wall; {} passed; ops completed {}, pending {}; crashes {}; \
         terms with a leader {}; entries committed {}; forgeries injected {}, messages dropped \
         unread {}; membership changes asked {}, committed {}",
        result.seeds,
        result.elapsed.as_secs_f64(),
        reports.len(),
        sum(|r| r.ops_completed as u64),
        sum(|r| r.ops_pending as u64),
        sum(|r| r.crashes as u64),
        sum(|r| r.leader_terms as u64),
        sum(|r| r.committed),
        sum(|r| r.forgeries_sent),
        sum(|r| r.invalid_dropped),
        sum(|r| r.membership_changes.0),
        sum(|r| r.membership_changes.1),
    );
    if !result.failures.is_empty() {
        fail_with_replay_in("gpu_raft", test, &result.failures);
    }
    reports
}

#[test]
fn gpu_raft_seeds() {
    if let Some(seed) = env_u64("SIM_SEED") {
        let config = SimConfig::gpu_raft_chaos(seed);
        eprintln!("replaying seed {seed}: {config:#?}");
        match run_chaos_of::<GpuRaftNode>(config) {
            Ok(report) => eprintln!("seed {seed} passed: {report:#?}"),
            Err(failure) => fail_with_replay_in("gpu_raft", "gpu_raft_seeds", &[failure]),
        }
        return;
    }
    let count = env_u64("SIM_SEEDS").unwrap_or(2_000);
    let start = env_u64("SIM_SEED_START").unwrap_or(0);
    let seeds: Vec<u64> = (start..start + count).collect();
    let reports = sweep_and_check("gpu_raft_seeds", &seeds, SimConfig::gpu_raft_chaos);
    let sum = |f: fn(&SimReport) -> u64| reports.iter().map(f).sum::<u64>();
    assert!(
        sum(|r| r.ops_completed as u64) > 10 * count,
        "too few operations completed"
    );
    assert!(sum(|r| r.crashes as u64) > count, "too few crashes");
    assert!(
        sum(|r| r.forgeries_sent) > 10 * count,
        "the adversary injected too little"
    );
    assert!(
        sum(|r| r.invalid_dropped) > 0,
        "no forgery was ever refused: the check is not running"
    );
    assert!(
        sum(|r| r.membership_changes.1) > count,
        "too few membership changes committed"
    );
}

/// 101 voters: the electorate where batched checks pay. Crashes and partitions, fewer seeds.
fn large(seed: u64) -> SimConfig<GpuRaftConfig> {
    let mut config = SimConfig::gpu_raft(seed, 101);
    config.faults = FaultProfile {
        mean_interval_us: 400_000,
        crash: 3,
        crash_leader: 2,
        partition: 2,
        one_way: 1,
        isolate_leader: 1,
        weather: 1,
        transfer: 1,
        membership: 0,
        max_down_us: 800_000,
        max_fault_us: 800_000,
    };
    config.fault_phase_us = 1_000_000;
    config.forgeries = 0.01;
    config.clients = 2;
    config
}

#[test]
fn gpu_raft_101_voters() {
    if let Some(seed) = env_u64("SIM_LARGE_SEED") {
        match run_chaos_of::<GpuRaftNode>(large(seed)) {
            Ok(report) => eprintln!("seed {seed} passed: {report:#?}"),
            Err(failure) => fail_with_replay_in("gpu_raft", "gpu_raft_101_voters", &[failure]),
        }
        return;
    }
    let count = env_u64("SIM_LARGE_SEEDS").unwrap_or(200);
    let start = env_u64("SIM_SEED_START").unwrap_or(0);
    let seeds: Vec<u64> = (start..start + count).collect();
    let reports = sweep_and_check("gpu_raft_101_voters", &seeds, large);
    assert!(
        reports.iter().all(|r| r.committed > 0),
        "a 101-voter seed committed nothing"
    );
}

#[test]
fn every_size_commits_and_certifies_without_faults() {
    for nodes in [1, 3, 5] {
        let report = run_chaos_of::<GpuRaftNode>(SimConfig::gpu_raft(nodes as u64, nodes))
            .unwrap_or_else(|failure| panic!("{nodes} voters: {failure}"));
        assert!(report.ops_completed > 20, "{nodes} voters: {report:?}");
    }
}

/// Runs `seeds` with a bug `buggy` injects and returns the first failure `is_caught` accepts,
/// failing the test when none does: a control that shows the checks can fail.
fn caught_on_some_seed(
    seeds: u64,
    buggy: impl Fn(u64) -> SimConfig<GpuRaftConfig> + Sync,
    is_caught: impl Fn(&str) -> bool,
) -> String {
    let seeds: Vec<u64> = (0..seeds).collect();
    let result = sweep_of::<GpuRaftNode>(&seeds, 2, buggy);
    let caught = result
        .failures
        .iter()
        .find(|failure| is_caught(&failure.violation.to_string()));
    assert!(
        caught.is_some(),
        "no seed of {} caught the bug; failures: {:?}",
        seeds.len(),
        result.failures.first()
    );
    caught.expect("checked").to_string()
}

/// Control: a leader that counts acknowledgements without checking their signatures commits
/// on forged ones, and the certificate check reports it on some seed.
#[test]
fn counting_unchecked_acknowledgements_is_caught() {
    let buggy = |seed| {
        let mut config = SimConfig::gpu_raft_chaos(seed);
        config.protocol.injected_bugs.accept_unchecked_acks = true;
        config.forgeries = 0.2;
        config
    };
    let caught = caught_on_some_seed(200, buggy, |violation| violation.contains("certificate"));
    eprintln!("caught: {caught}");
}

/// Control: a leader that counts only the incoming voters of a joint membership commits
/// without the outgoing voters' majority, and the quorum check reports it on some seed.
#[test]
fn ignoring_the_outgoing_voters_of_a_joint_membership_is_caught() {
    let buggy = |seed| {
        let mut config = SimConfig::gpu_raft_chaos(seed);
        config.protocol.injected_bugs.ignore_outgoing_voters = true;
        config.spares = config.spares.max(2);
        config.faults.membership = config.faults.membership.max(3);
        config.churn_us = 150_000;
        config
    };
    let caught = caught_on_some_seed(300, buggy, |violation| {
        violation.contains("quorum") || violation.contains("certificate")
    });
    eprintln!("caught: {caught}");
}
