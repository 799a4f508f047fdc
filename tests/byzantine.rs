//! The Byzantine suite: seeded simulations of 4-, 7- and 10-replica PBFT clusters in which
//! between one and f replicas misbehave, mixed with crashes and network faults:
//!
//! - `byzantine_seeds`: each Byzantine replica is an equivocating primary, a double voter, an
//!   impersonator, a replayer, a silent replica, a garbage sender (malformed, truncated, absurd
//!   and oversized messages) or a bogus view-changer (forged prepared certificates; as primary
//!   of a new view, a NEW-VIEW that drops prepared requests);
//! - `twins_seeds`: each Byzantine replica runs as twins, two instances of honest code with one
//!   key, each talking to its own side of the cluster;
//! - `twins_beyond_f_break_safety`: the control, f + 1 twinned replicas, where the checks must
//!   find a safety violation (proof that they can fail).
//!
//! Every run asserts agreement and linearizability among the honest replicas, liveness after
//! healing with the Byzantine replicas still misbehaving, no evidence against an honest replica,
//! and, at the end, that evidence against a Byzantine replica is held by every live honest
//! replica or by none, and only against one from which something provable actually left
//! (unprovable behaviours never offend, so they blame no one). Per behaviour it prints the
//! replicas drawn, how many offended and were detected, the time from offence to exclusion,
//! and what they sent.
//!
//! - `cargo test --test byzantine` runs 1,000 seeds and 100 twins seeds (`SIM_SEEDS=N`, twins
//!   N / 10; `SIM_SEED_START=S`; `SIM_BEHAVIOURS=Garbage,Silent` draws from those only);
//! - `SIM_SEED=S cargo test --test byzantine -- byzantine_seeds --exact --nocapture` (or
//!   `twins_seeds`) replays one; with `SIM_TRACE=1` it prints every event of the run.

mod common;

use std::collections::BTreeMap;

use common::scenario::{env_u64, fail_with_replay_in, finish, replay_command_in, traced};
use consensus::NodeId;
use consensus::protocol::Protocol;
use consensus::sim::byzantine::{Actions, Behaviour, Maverick, MaverickSettings};
use consensus::sim::{Sim, SimConfig, SimFailure, SimReport, Violation};

/// What one run found about one Byzantine replica.
struct Replica {
    behaviour: Behaviour,
    actions: Actions,
    /// Live honest replicas holding evidence against it.
    holding: usize,
}

/// What one run found.
struct Outcome {
    report: SimReport,
    byzantine: BTreeMap<NodeId, Replica>,
    /// Per Byzantine replica that offended and was then excluded by every live honest replica:
    /// simulated µs from its first offence to that moment (sampled every 10 ms).
    exclusion_us: Vec<(Behaviour, u64)>,
    /// Messages the live honest replicas dropped as invalid (since their last restart).
    invalid_messages: u64,
}

/// Simulated µs between samples of who offended and who excludes whom.
const SAMPLE_US: u64 = 10_000;

/// Simulated µs the run goes on after its liveness check, at most, for evidence found late to
/// reach every live honest replica.
const SETTLE_US: u64 = 3_000_000;

/// True when, against every Byzantine replica, every live honest replica holds evidence or
/// none does, and every one does where its offence reached honest replicas whole.
fn evidence_settled(sim: &Sim<Maverick>, behaviours: &BTreeMap<NodeId, Behaviour>) -> bool {
    let nodes = live(sim);
    let honest: Vec<&&Maverick> = nodes.iter().filter(|n| n.behaviour().is_none()).collect();
    behaviours.keys().all(|&id| {
        let holding = honest
            .iter()
            .filter(|n| n.node().evidence().contains_key(&id))
            .count();
        let delivered = sim.config().protocol.actions(id).offence_delivered;
        holding == honest.len() || (holding == 0 && !delivered)
    })
}

fn fail(sim: &Sim<Maverick>, violation: Violation) -> SimFailure {
    SimFailure {
        seed: sim.config().seed,
        at_us: sim.now_us(),
        violation,
    }
}

/// Every live instance (twins' second instances included).
fn live(sim: &Sim<Maverick>) -> Vec<&Maverick> {
    sim.node_ids()
        .into_iter()
        .filter_map(|address| sim.node(address))
        .collect()
}

fn run(config: SimConfig<MaverickSettings>) -> Result<Outcome, SimFailure> {
    let mut sim: Sim<Maverick> = Sim::new(traced(config))?;
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
        let nodes = live(&sim);
        for node in nodes.iter().filter(|n| n.offended()) {
            first_offence.entry(node.node().id()).or_insert(Some(now));
        }
        let honest: Vec<&&Maverick> = nodes.iter().filter(|n| n.behaviour().is_none()).collect();
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
    let report = match finish(&mut sim) {
        Ok(report) => report,
        Err(failure) => {
            // What each replica was doing when the run failed, for whoever replays it.
            for replica in live(&sim) {
                let node = replica.node();
                eprintln!(
                    "  {} ({:?}): view {}{}, executed {}, stable {}, excludes {:?}, \
                     dropped {:?}",
                    node.id(),
                    replica.behaviour(),
                    node.view(),
                    if node.is_changing_view() {
                        " (changing)"
                    } else {
                        ""
                    },
                    node.executed_seq(),
                    node.stable_checkpoint(),
                    node.excluded(),
                    node.invalid_messages(),
                );
            }
            return Err(failure);
        }
    };
    // Evidence found late (an audit after the cluster healed) is still on its way to some
    // replicas when the liveness check ends: let it settle, as long as it keeps moving.
    let settle_until = sim.now_us() + SETTLE_US;
    while sim.now_us() < settle_until && !evidence_settled(&sim, &behaviours) {
        let next = sim.now_us() + SAMPLE_US;
        sim.run_until(next)?;
    }
    let nodes = live(&sim);
    let honest: Vec<&&Maverick> = nodes.iter().filter(|n| n.behaviour().is_none()).collect();
    let mut byzantine = BTreeMap::new();
    for (&id, &behaviour) in &behaviours {
        let actions = sim.config().protocol.actions(id);
        let holding = honest
            .iter()
            .filter(|n| n.node().evidence().contains_key(&id))
            .count();
        // Evidence, once one honest replica holds it, reaches every live honest replica. (An
        // offence whose two halves never met at an honest replica proves nothing to anyone;
        // how often that happens is printed per behaviour.)
        if holding > 0 && holding < honest.len() {
            let detail = format!(
                "{id} ({behaviour:?}): only {holding} of {} live honest replicas hold the evidence",
                honest.len()
            );
            return Err(fail(&sim, Violation::Scenario { detail }));
        }
        // An offence both halves of which reached honest replicas is proven to all of them:
        // the audits bring the halves together, and the evidence travels from there.
        if actions.offence_delivered && holding < honest.len() {
            let what = match actions.delivered_conflict_at {
                Some(at) => format!("conflicting statements at (kind, view, seq) {at:?}"),
                None => "an unjustified NEW-VIEW".to_string(),
            };
            let detail = format!(
                "{id} ({behaviour:?}): its offence reached honest replicas whole ({what}), yet \
                 only {holding} of {} live honest replicas hold evidence",
                honest.len()
            );
            return Err(fail(&sim, Violation::Scenario { detail }));
        }
        if holding > 0 && (!behaviour.is_provable() || !actions.offended) {
            return Err(fail(
                &sim,
                Violation::FalseAccusation {
                    accuser: honest[0].node().id(),
                    accused: id,
                },
            ));
        }
        if actions.offended && !behaviour.is_provable() {
            let detail = format!("{id} ({behaviour:?}) sent something provable: {actions:?}");
            return Err(fail(&sim, Violation::Scenario { detail }));
        }
        byzantine.insert(
            id,
            Replica {
                behaviour,
                actions,
                holding,
            },
        );
    }
    let invalid_messages = honest
        .iter()
        .map(|n| n.node().invalid_messages().total())
        .sum();
    Ok(Outcome {
        report,
        byzantine,
        exclusion_us,
        invalid_messages,
    })
}

fn seeds(count_divisor: u64) -> Vec<u64> {
    match env_u64("SIM_SEED") {
        Some(seed) => vec![seed],
        None => {
            let count = env_u64("SIM_SEEDS").unwrap_or(1_000) / count_divisor;
            let start = env_u64("SIM_SEED_START").unwrap_or(0);
            (start..start + count.max(1)).collect()
        }
    }
}

fn sweep(
    seeds: &[u64],
    config: impl Fn(u64) -> SimConfig<MaverickSettings> + Sync,
) -> (Vec<Outcome>, Vec<SimFailure>) {
    let results: Vec<Vec<Result<Outcome, SimFailure>>> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..2)
            .map(|t| {
                let config = &config;
                scope.spawn(move || {
                    seeds
                        .iter()
                        .skip(t)
                        .step_by(2)
                        .map(|&seed| run(config(seed)))
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

/// Per behaviour, over a sweep.
#[derive(Debug, Default)]
struct Stats {
    /// Byzantine replicas with it.
    replicas: u64,
    /// Those from which something provable left.
    offended: u64,
    /// Those whose offence reached honest replicas whole (both halves).
    delivered: u64,
    /// Of those, the ones not every live honest replica held evidence against.
    delivered_undetected: u64,
    /// Those every live honest replica held evidence against.
    detected: u64,
    /// Honest replicas holding evidence against them, summed.
    holding: u64,
    /// Messages the honest replicas dropped as invalid in the runs with it.
    invalid_messages: u64,
    /// Views for which an unjustified NEW-VIEW left them.
    unjustified_new_views: u64,
    /// Runs in which at least one such NEW-VIEW left.
    runs_with_unjustified_new_view: u64,
    /// What they sent, by kind.
    sent: BTreeMap<&'static str, u64>,
    /// Simulated µs from first offence to exclusion by every live honest replica.
    exclusion_us: Vec<u64>,
}

/// Prints what a sweep found, per behaviour, and returns the stats.
fn report(
    name: &str,
    seeds: usize,
    started: std::time::Instant,
    outcomes: &[Outcome],
    failures: &[SimFailure],
) -> BTreeMap<Behaviour, Stats> {
    for failure in failures.iter().take(10) {
        eprintln!(
            "FAILED {failure}\n  replay: {}",
            replay_command_in("byzantine", name, failure.seed)
        );
    }
    let mut stats: BTreeMap<Behaviour, Stats> = BTreeMap::new();
    for outcome in outcomes {
        let mut present = Vec::new();
        for replica in outcome.byzantine.values() {
            let entry = stats.entry(replica.behaviour).or_default();
            entry.replicas += 1;
            entry.offended += u64::from(replica.actions.offended);
            entry.delivered += u64::from(replica.actions.offence_delivered);
            entry.delivered_undetected +=
                u64::from(replica.actions.offence_delivered && replica.holding == 0);
            entry.detected += u64::from(replica.holding > 0);
            entry.holding += replica.holding as u64;
            entry.unjustified_new_views += replica.actions.unjustified_new_views as u64;
            entry.runs_with_unjustified_new_view +=
                u64::from(replica.actions.unjustified_new_views > 0);
            for (what, count) in &replica.actions.counts {
                *entry.sent.entry(what).or_default() += count;
            }
            if !present.contains(&replica.behaviour) {
                present.push(replica.behaviour);
                entry.invalid_messages += outcome.invalid_messages;
            }
        }
        for (behaviour, us) in &outcome.exclusion_us {
            stats.entry(*behaviour).or_default().exclusion_us.push(*us);
        }
    }
    eprintln!(
        "{name}: {seeds} seeds in {:.1} s; {} passed; ops completed {}",
        started.elapsed().as_secs_f64(),
        outcomes.len(),
        outcomes
            .iter()
            .map(|o| o.report.ops_completed)
            .sum::<usize>(),
    );
    for (behaviour, s) in &mut stats {
        eprintln!(
            "  {behaviour:?}: {} replicas, {} offended provably, {} detected by every live \
             honest replica ({} honest replicas holding evidence), {} offended undetected \
             ({} whose offence reached honest replicas whole, {} of them undetected), \
             0 false accusations; honest replicas dropped {} invalid messages in these runs",
            s.replicas,
            s.offended,
            s.detected,
            s.holding,
            s.offended - s.detected,
            s.delivered,
            s.delivered_undetected,
            s.invalid_messages,
        );
        if s.unjustified_new_views > 0 || *behaviour == Behaviour::BogusViewChange {
            eprintln!(
                "    unjustified NEW-VIEWs sent: for {} views, in {} of {} replicas' runs",
                s.unjustified_new_views, s.runs_with_unjustified_new_view, s.replicas
            );
        }
        for (what, count) in &s.sent {
            eprintln!("    {what}: {count}");
        }
        if !s.exclusion_us.is_empty() {
            let times = &mut s.exclusion_us;
            times.sort_unstable();
            let at = |q: f64| times[((times.len() - 1) as f64 * q) as usize] as f64 / 1000.0;
            eprintln!(
                "    first offence to exclusion by every live honest replica, over {} \
                 offenders: p50 {:.0} ms, p90 {:.0} ms, max {:.0} ms (simulated, sampled every \
                 10 ms)",
                times.len(),
                at(0.5),
                at(0.9),
                at(1.0)
            );
        }
    }
    stats
}

/// The behaviours `SIM_BEHAVIOURS` names (comma-separated, as printed), or all of them.
fn behaviours() -> Vec<Behaviour> {
    let Ok(names) = std::env::var("SIM_BEHAVIOURS") else {
        return Behaviour::ALL.to_vec();
    };
    names
        .split(',')
        .map(|name| {
            *Behaviour::ALL
                .iter()
                .find(|b| format!("{b:?}") == name.trim())
                .unwrap_or_else(|| panic!("SIM_BEHAVIOURS: no behaviour {name:?}"))
        })
        .collect()
}

#[test]
fn byzantine_seeds() {
    let seeds = seeds(1);
    let started = std::time::Instant::now();
    let behaviours = behaviours();
    let (outcomes, failures) = sweep(&seeds, |seed| SimConfig::byzantine(seed, &behaviours));
    let stats = report(
        "byzantine_seeds",
        seeds.len(),
        started,
        &outcomes,
        &failures,
    );
    assert!(
        failures.is_empty(),
        "{} seed(s) failed; first: {}",
        failures.len(),
        failures[0]
    );
    if seeds.len() >= 100 && behaviours == Behaviour::ALL {
        for behaviour in Behaviour::ALL {
            let s = stats.get(&behaviour);
            assert!(
                s.is_some_and(|s| s.replicas > 0),
                "{behaviour:?} never drawn"
            );
            if behaviour.is_provable() {
                assert!(
                    s.is_some_and(|s| s.offended > 0),
                    "{behaviour:?} never offended"
                );
            }
        }
        let bogus = &stats[&Behaviour::BogusViewChange];
        assert!(
            bogus.runs_with_unjustified_new_view > 0,
            "no bogus NEW-VIEW ever left a bogus view-changer"
        );
        assert!(
            bogus.sent.get("forged view-change sent") > Some(&0),
            "no forged VIEW-CHANGE ever left a bogus view-changer"
        );
        assert!(
            stats[&Behaviour::Garbage].invalid_messages > 0,
            "no honest replica ever refused garbage"
        );
    }
}

#[test]
fn twins_seeds() {
    let seeds = seeds(10);
    let started = std::time::Instant::now();
    let (outcomes, failures) = sweep(&seeds, SimConfig::twins);
    let stats = report("twins_seeds", seeds.len(), started, &outcomes, &failures);
    assert!(
        failures.is_empty(),
        "{} seed(s) failed; first: {}",
        failures.len(),
        failures[0]
    );
    if seeds.len() >= 100 {
        assert!(
            stats[&Behaviour::Twins].offended > 0,
            "twins never signed conflicting statements"
        );
    }
}

/// Twins seeds that once failed, each for a reason since fixed, run on every `cargo test`
/// (the default sweep covers seeds 0-99 only):
/// - 25, 52: an equivocating primary's halves held on either side of a long partition, one
///   side's window past them before it heard the other (the catch-up's pre-prepares, and the
///   statements a replica sends of the slots its window jumped past);
/// - 6, 387, 750: the replica holding one half restarted before the audits compared it
///   (`seen`, and what it forgot, are kept on disk);
/// - 140: a slot where every replica held both digests, from different signers (audits of
///   contested slots say which statement named which);
/// - 406: a twinned backup's two prepares, one half forgotten by the side that moved on (what
///   `seen` forgets is kept a while longer, all kinds);
/// - 411: an honest replica cut off while the others escalated more than n views, with the
///   offender excluded so that every honest replica is needed for a quorum: it ignored their
///   view-changes as too far ahead, and no view could ever form.
#[test]
fn twins_regressions() {
    let seeds = [6, 25, 52, 140, 387, 406, 411, 750];
    let (outcomes, failures) = sweep(&seeds, SimConfig::twins);
    if !failures.is_empty() {
        fail_with_replay_in("byzantine", "twins_seeds", &failures);
    }
    assert_eq!(outcomes.len(), seeds.len());
    let delivered = outcomes
        .iter()
        .flat_map(|o| o.byzantine.values())
        .filter(|r| r.actions.offence_delivered)
        .count();
    assert!(
        delivered >= 6,
        "each of these seeds has an offence to prove"
    );
}

/// Byzantine seeds from a sweep of 1,000,000-1,004,999 that once failed, each for a reason
/// since fixed, run on every `cargo test`:
/// - 1001651: an honest primary, cut off, learned a stable checkpoint past what it executed
///   and restarted; its slot records below the checkpoint were gone, and it proposed again at a
///   sequence number it had already pre-prepared in its view (a false accusation, rightly
///   proven);
/// - 1001611, 1002379, 1002448, 1004430: a bogus view-changer's unjustified NEW-VIEW reached
///   the honest replicas after they had moved on to a later view, and they dropped it
///   unchecked (now every NEW-VIEW signed by its view's primary is checked, however late).
#[test]
fn byzantine_regressions() {
    let seeds = [1_001_611, 1_001_651, 1_002_379, 1_002_448, 1_004_430];
    let behaviours = Behaviour::ALL.to_vec();
    let (outcomes, failures) = sweep(&seeds, |seed| SimConfig::byzantine(seed, &behaviours));
    if !failures.is_empty() {
        fail_with_replay_in("byzantine", "byzantine_seeds", &failures);
    }
    let late_new_views_proven = outcomes
        .iter()
        .flat_map(|o| o.byzantine.values())
        .filter(|r| r.behaviour == Behaviour::BogusViewChange && r.actions.offence_delivered)
        .count();
    assert!(
        late_new_views_proven >= 4,
        "four of these seeds have a late unjustified NEW-VIEW to prove"
    );
}

/// The control: with f + 1 twinned replicas PBFT promises nothing, and the checks must say so
/// on some seed of a small sweep (if they never can, every passing seed above means little).
#[test]
fn twins_beyond_f_break_safety() {
    let seeds: Vec<u64> = (0..8).collect();
    let (_, failures) = sweep(&seeds, SimConfig::twins_beyond_f);
    for failure in &failures {
        let headline = match &failure.violation {
            Violation::StateMachineSafety { index, node, .. } => format!(
                "state-machine safety: honest {node} applied another entry at index {index} \
                 than was applied there before"
            ),
            other => other.to_string().chars().take(200).collect(),
        };
        eprintln!(
            "twins beyond f: seed {} failed at {} us: {headline}",
            failure.seed, failure.at_us
        );
    }
    let broken = failures.iter().find(|f| {
        matches!(
            f.violation,
            Violation::Agreement { .. }
                | Violation::StateMachineSafety { .. }
                | Violation::Linearizability { .. }
        )
    });
    assert!(
        broken.is_some(),
        "no seed of {seeds:?} broke agreement or linearizability with f + 1 twins: {failures:?}"
    );
}
