//! Whole runs built on the [`Sim`]: the chaos run (faults, then heal and check liveness and every
//! safety property), the failover measurement, and the runner that spreads seeds over threads and
//! prints how to replay a failure.

use std::time::{Duration, Instant};

use consensus::NodeId;

use consensus::protocol::raft::RaftNode;
use consensus::sim::{
    ConnectionHints, Sim, SimConfig, SimFailure, SimProtocol, SimReport, Violation, mix,
};

/// One chaos run: clients and faults for the fault phase, then everything heals; a leader must
/// commit a fresh write and every node catch up within the liveness deadline; then log matching,
/// leader completeness and linearizability are checked (election and state-machine safety are
/// checked all along).
pub fn run_chaos(config: SimConfig) -> Result<SimReport, SimFailure> {
    run_chaos_of::<RaftNode>(config)
}

/// [`run_chaos`] for any core.
pub fn run_chaos_of<P: SimProtocol>(
    config: SimConfig<P::Settings>,
) -> Result<SimReport, SimFailure> {
    let mut sim: Sim<P> = Sim::new(traced(config))?;
    sim.start_clients();
    sim.start_faults();
    let fault_end = sim.config().fault_phase_us;
    sim.run_until(fault_end)?;
    finish(&mut sim)
}

/// Heals the cluster, checks liveness, runs the final checks and reports.
pub fn finish<P: SimProtocol>(sim: &mut Sim<P>) -> Result<SimReport, SimFailure> {
    sim.stop_clients();
    sim.heal_everything();
    sim.start_probe();
    let deadline = sim.now_us() + sim.config().liveness_deadline_us;
    // A membership change still under way when the rest has settled (asked late in the fault
    // phase, or a delayed copy of such a request reaching the leader after healing) gets the
    // same deadline to leave its joint membership.
    let caught_up = |s: &Sim<P>| {
        s.clients_quiet()
            && s.probe_index()
                .is_some_and(|index| s.min_applied() >= index)
    };
    let settled = sim.run_until_or(deadline, |s| caught_up(s) && s.check_settled().is_ok())?;
    if !settled {
        // Only the membership change is left: say so.
        if caught_up(sim)
            && let Err(violation) = sim.check_settled()
        {
            return Err(failure(sim, violation));
        }
        let detail = format!(
            "{} us after healing: leader {:?}, probe committed at {:?}, lowest applied index {}, clients quiet {}\n{}",
            sim.config().liveness_deadline_us,
            sim.leader(),
            sim.probe_index(),
            sim.min_applied(),
            sim.clients_quiet(),
            sim.describe_nodes()
        );
        return Err(failure(sim, Violation::Liveness { detail }));
    }
    sim.full_check()
        .map_err(|violation| failure(sim, violation))?;
    let steps = sim.check_linearizability()?;
    let mut report = sim.report();
    report.checker_steps = steps;
    Ok(report)
}

fn failure<P: SimProtocol>(sim: &Sim<P>, violation: Violation) -> SimFailure {
    SimFailure {
        seed: sim.config().seed,
        at_us: sim.now_us(),
        violation,
    }
}

/// Crashes the leader of a healthy `nodes`-node cluster `crashes` times, each after a stable
/// period, and returns the simulated time from each crash until a leader of a later term commits
/// an entry. The crashed node restarts 100–400 ms later. The client history is checked at the end.
/// `hints` says what the survivors' transports tell them of each crash.
pub fn measure_failover(
    seed: u64,
    nodes: usize,
    crashes: usize,
    hints: ConnectionHints,
) -> Result<Vec<u64>, SimFailure> {
    let mut config = SimConfig::new(seed, nodes);
    config.connection_hints = hints;
    config.clients = 2;
    config.think_us = (20_000, 60_000);
    let mut sim: Sim = Sim::new(traced(config))?;
    sim.start_clients();
    for round in 0..crashes as u64 {
        let stable_us = 400_000 + mix(seed, round) % 400_000;
        sim.run_until(sim.now_us() + stable_us)?;
        let has_leader = sim.run_until_or(sim.now_us() + 5_000_000, |s| s.leader().is_some())?;
        let Some(crashed) = has_leader.then(|| sim.crash_leader_and_watch()).flatten() else {
            return Err(failure(
                &sim,
                Violation::Liveness {
                    detail: "no leader to crash".into(),
                },
            ));
        };
        let repaired = sim.run_until_or(sim.now_us() + 5_000_000, |s| !s.failover_pending())?;
        if !repaired {
            let detail = format!("no new leader committed within 5 s of crashing {crashed}");
            return Err(failure(&sim, Violation::Liveness { detail }));
        }
        let down_us = 100_000 + mix(seed, round + 1_000) % 300_000;
        sim.run_until(sim.now_us() + down_us)?;
        sim.restart_node(crashed);
    }
    finish(&mut sim)?;
    Ok(sim.failover_samples().to_vec())
}

/// The outcome of many seeds.
#[derive(Debug, Default)]
pub struct SeedSweep {
    /// Seeds run.
    pub seeds: u64,
    /// Reports of the passing runs.
    pub reports: Vec<SimReport>,
    /// Failures, by seed.
    pub failures: Vec<SimFailure>,
    /// Wall time.
    pub elapsed: Duration,
}

/// Runs `config_for(seed)` for every seed in `seeds` over `threads` threads (seed `i` of the list
/// goes to thread `i % threads`); each run is independent, so the results do not depend on the
/// thread count.
pub fn sweep(
    seeds: &[u64],
    threads: usize,
    config_for: impl Fn(u64) -> SimConfig + Sync,
) -> SeedSweep {
    sweep_of::<RaftNode>(seeds, threads, config_for)
}

/// [`sweep`] for any core.
pub fn sweep_of<P: SimProtocol>(
    seeds: &[u64],
    threads: usize,
    config_for: impl Fn(u64) -> SimConfig<P::Settings> + Sync,
) -> SeedSweep {
    let started = Instant::now();
    let threads = threads.max(1);
    let results: Vec<Vec<Result<SimReport, SimFailure>>> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let config_for = &config_for;
                scope.spawn(move || {
                    seeds
                        .iter()
                        .skip(t)
                        .step_by(threads)
                        .map(|&seed| run_chaos_of::<P>(config_for(seed)))
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
            })
            .collect()
    });
    let mut sweep = SeedSweep {
        seeds: seeds.len() as u64,
        ..SeedSweep::default()
    };
    for result in results.into_iter().flatten() {
        match result {
            Ok(report) => sweep.reports.push(report),
            Err(failure) => sweep.failures.push(failure),
        }
    }
    sweep.failures.sort_by_key(|f| f.seed);
    sweep.elapsed = started.elapsed();
    sweep
}

/// The command that replays `seed` of the chaos suite's `test` exactly.
pub fn replay_command(test: &str, seed: u64) -> String {
    replay_command_in("chaos", test, seed)
}

/// The command that replays `seed` of `test` in the test suite `suite` exactly (with
/// `SIM_TRACE=1` in front, it also prints every event of the run).
pub fn replay_command_in(suite: &str, test: &str, seed: u64) -> String {
    format!("SIM_SEED={seed} cargo test --test {suite} -- {test} --exact --nocapture")
}

/// `config`, tracing every event to stderr when `SIM_TRACE` is set (to anything but 0): for
/// replaying one seed, never for a sweep.
pub fn traced<S>(mut config: SimConfig<S>) -> SimConfig<S> {
    config.trace = std::env::var("SIM_TRACE").is_ok_and(|value| value.trim() != "0");
    config
}

/// Node ids `1..=n`.
pub fn ids(n: u64) -> Vec<NodeId> {
    (1..=n).map(NodeId).collect()
}

/// The number in the environment variable `name`, if set; a value that is not a number fails
/// the test, naming it.
pub fn env_u64(name: &str) -> Option<u64> {
    let value = std::env::var(name).ok()?;
    match value.trim().parse() {
        Ok(n) => Some(n),
        Err(e) => panic!("{name}={value:?} is not a number: {e}"),
    }
}

/// Prints each failure of `test` in the suite `suite` (the first ten) with the command that
/// replays it, and fails the test.
pub fn fail_with_replay_in(suite: &str, test: &str, failures: &[SimFailure]) -> ! {
    for failure in failures.iter().take(10) {
        eprintln!(
            "FAILED {failure}\n  replay: {}",
            replay_command_in(suite, test, failure.seed)
        );
    }
    panic!(
        "{} seed(s) failed; first: {}\nreplay: {}",
        failures.len(),
        failures[0],
        replay_command_in(suite, test, failures[0].seed)
    );
}
