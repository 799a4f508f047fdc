//! The Byzantine suite: seeded simulations of 4-, 7- and 10-replica PBFT clusters in which
//! between one and f replicas misbehave (equivocating primary, double voter, impersonator,
//! replayer, silent), mixed with crashes and network faults. Every run asserts agreement and
//! linearizability among the honest replicas, liveness after healing with the Byzantine
//! replicas still misbehaving, no evidence against an honest replica, and evidence on every
//! live honest replica against every Byzantine one that did something provable.
//!
//! - `cargo test --test byzantine` runs 1,000 seeds (`SIM_SEEDS=N`, `SIM_SEED_START=S`);
//! - `SIM_SEED=S cargo test --test byzantine -- byzantine_seeds --exact --nocapture` replays one.

mod common;

use std::collections::BTreeMap;

use common::scenario::{finish, replay_command_in};
use consensus::NodeId;
use consensus::protocol::Protocol;
use consensus::sim::byzantine::{Behaviour, Maverick};
use consensus::sim::{Sim, SimConfig, SimFailure, SimReport, Violation};

fn env_u64(name: &str) -> Option<u64> {
    let value = std::env::var(name).ok()?;
    match value.trim().parse() {
        Ok(n) => Some(n),
        Err(e) => panic!("{name}={value:?} is not a number: {e}"),
    }
}

/// What one run found, per Byzantine replica: (behaviour, offended, honest replicas holding
/// evidence against it, live honest replicas, simulated µs from its first offence to the
/// last honest replica's exclusion of it).
struct Outcome {
    report: SimReport,
    byzantine: BTreeMap<NodeId, (Behaviour, bool, usize, usize)>,
    /// Per Byzantine replica that offended and was then excluded by every live honest replica:
    /// simulated µs from its first offence to that moment (sampled every 10 ms).
    exclusion_us: Vec<(Behaviour, u64)>,
}

/// Simulated µs between samples of who offended and who excludes whom.
const SAMPLE_US: u64 = 10_000;

fn run(seed: u64, behaviours: &[Behaviour]) -> Result<Outcome, SimFailure> {
    let config = SimConfig::byzantine(seed, behaviours);
    let mut sim: Sim<Maverick> = Sim::new(config)?;
    sim.start_clients();
    sim.start_faults();
    let fault_end = sim.config().fault_phase_us;
    let behaviours = sim.config().protocol.byzantine.clone();
    // Offender -> when it first offended; `None` once its exclusion was measured.
    let mut first_offence: BTreeMap<NodeId, Option<u64>> = BTreeMap::new();
    let mut exclusion_us = Vec::new();
    while sim.now_us() < fault_end {
        let next = (sim.now_us() + SAMPLE_US).min(fault_end);
        sim.run_until(next)?;
        let now = sim.now_us();
        for id in sim.node_ids() {
            if sim.node(id).is_some_and(|n| n.offended()) {
                first_offence.entry(id).or_insert(Some(now));
            }
        }
        let honest: Vec<&Maverick> = sim
            .node_ids()
            .into_iter()
            .filter_map(|id| sim.node(id))
            .filter(|n| n.behaviour().is_none())
            .collect();
        for (offender, at) in first_offence.iter_mut() {
            if let Some(since) = *at
                && !honest.is_empty()
                && honest
                    .iter()
                    .all(|n| n.node().excluded().contains(offender))
            {
                exclusion_us.push((behaviours[offender], now - since));
                *at = None;
            }
        }
    }
    let report = finish(&mut sim)?;
    let nodes: Vec<&Maverick> = sim
        .node_ids()
        .into_iter()
        .filter_map(|id| sim.node(id))
        .collect();
    let honest: Vec<&&Maverick> = nodes.iter().filter(|n| n.behaviour().is_none()).collect();
    let mut byzantine = BTreeMap::new();
    for (id, behaviour) in &sim.config().protocol.byzantine {
        let offended = nodes.iter().any(|n| n.node().id() == *id && n.offended());
        let holding = honest
            .iter()
            .filter(|n| n.node().evidence().contains_key(id))
            .count();
        byzantine.insert(*id, (*behaviour, offended, holding, honest.len()));
        // Evidence, once one honest replica holds it, reaches every live honest replica. (An
        // offence whose two halves never met at an honest replica proves nothing to anyone;
        // how often that happens is printed per behaviour.)
        if holding > 0 && holding < honest.len() {
            return Err(SimFailure {
                seed,
                at_us: sim.now_us(),
                violation: Violation::Scenario {
                    detail: format!(
                        "{id} ({behaviour:?}): only {holding} of {} live honest replicas hold the evidence",
                        honest.len()
                    ),
                },
            });
        }
        if !behaviour.is_provable() && holding > 0 {
            return Err(SimFailure {
                seed,
                at_us: sim.now_us(),
                violation: Violation::FalseAccusation {
                    accuser: honest[0].node().id(),
                    accused: *id,
                },
            });
        }
    }
    Ok(Outcome {
        report,
        byzantine,
        exclusion_us,
    })
}

fn sweep(seeds: &[u64], behaviours: &[Behaviour]) -> (Vec<Outcome>, Vec<SimFailure>) {
    let results: Vec<Vec<Result<Outcome, SimFailure>>> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..2)
            .map(|t| {
                scope.spawn(move || {
                    seeds
                        .iter()
                        .skip(t)
                        .step_by(2)
                        .map(|&seed| run(seed, behaviours))
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let mut outcomes = Vec::new();
    let mut failures = Vec::new();
    for result in results.into_iter().flatten() {
        match result {
            Ok(outcome) => outcomes.push(outcome),
            Err(failure) => failures.push(failure),
        }
    }
    failures.sort_by_key(|f| f.seed);
    (outcomes, failures)
}

#[test]
fn byzantine_seeds() {
    let seeds: Vec<u64> = match env_u64("SIM_SEED") {
        Some(seed) => vec![seed],
        None => {
            let count = env_u64("SIM_SEEDS").unwrap_or(1_000);
            let start = env_u64("SIM_SEED_START").unwrap_or(0);
            (start..start + count).collect()
        }
    };
    let started = std::time::Instant::now();
    let (outcomes, failures) = sweep(&seeds, &Behaviour::ALL);
    for failure in failures.iter().take(10) {
        eprintln!(
            "FAILED {failure}\n  replay: {}",
            replay_command_in("byzantine", "byzantine_seeds", failure.seed)
        );
    }
    // Per behaviour: runs, runs where it offended, and whether every live honest replica held
    // evidence (asserted in `run`).
    let mut per_behaviour: BTreeMap<String, (u64, u64, u64)> = BTreeMap::new();
    for outcome in &outcomes {
        for (behaviour, offended, holding, _) in outcome.byzantine.values() {
            let entry = per_behaviour.entry(format!("{behaviour:?}")).or_default();
            entry.0 += 1;
            entry.1 += u64::from(*offended);
            entry.2 += *holding as u64;
        }
    }
    eprintln!(
        "byzantine: {} seeds in {:.1} s; {} passed; ops completed {}; per behaviour \
         (Byzantine replicas, that offended, honest replicas holding evidence): {per_behaviour:?}",
        seeds.len(),
        started.elapsed().as_secs_f64(),
        outcomes.len(),
        outcomes
            .iter()
            .map(|o| o.report.ops_completed)
            .sum::<usize>(),
    );
    let mut exclusion: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    for outcome in &outcomes {
        for (behaviour, us) in &outcome.exclusion_us {
            exclusion
                .entry(format!("{behaviour:?}"))
                .or_default()
                .push(*us);
        }
    }
    for (behaviour, times) in &mut exclusion {
        times.sort_unstable();
        let at = |q: f64| times[((times.len() - 1) as f64 * q) as usize] as f64 / 1000.0;
        eprintln!(
            "{behaviour}: first offence to exclusion by every live honest replica, over {} \
             offenders: p50 {:.0} ms, p90 {:.0} ms, max {:.0} ms (simulated, sampled every 10 ms)",
            times.len(),
            at(0.5),
            at(0.9),
            at(1.0)
        );
    }
    assert!(
        failures.is_empty(),
        "{} seed(s) failed; first: {}",
        failures.len(),
        failures[0]
    );
    if seeds.len() >= 100 {
        for behaviour in Behaviour::ALL {
            let (runs, offended, _) = per_behaviour[&format!("{behaviour:?}")];
            assert!(runs > 0, "{behaviour:?} never drawn");
            if behaviour.is_provable() {
                assert!(offended > 0, "{behaviour:?} never offended");
            }
        }
    }
}
