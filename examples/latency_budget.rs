//! Where one proposal's time goes: three engines over tarpc on loopback (the `consensus`
//! bench's set-up), one client proposing 64-byte commands one after another, and the time
//! between each hop of its path, leader and follower, from the engine's latency probe.
//!
//! ```text
//! cargo run --release --features latency-probe --example latency_budget [-- --proposals N] [--store memory|fjall]
//! ```
//!
//! Each proposal is followed through: the leader's driver takes it, sends the append, its peer
//! task takes the batch, a follower's tarpc handler gets it and queues the message for the
//! follower's driver, which takes it and sends its acknowledgement, and back the same way to
//! the leader's answer and the client. Of the two followers, the one whose acknowledgement left
//! first is followed (the one the commit waited for). Proposals whose path was not seen whole
//! (a heartbeat's stamps in the way) are left out, and the count says how many were kept.
//! The first tenth warms up and is not counted.

#[path = "../benches/common/mod.rs"]
mod common;

use std::time::{Duration, Instant};

use common::{Setup, start_cluster};
use consensus::telemetry::latency_probe::{self, Hop, Stamp};
use consensus::types::NodeId;
use consensus::{ConsensusEngine, ConsensusResult, Proposal};
use hdrhistogram::Histogram;

const PAYLOAD: [u8; 64] = [7; 64];

/// The hops, in path order: the stamp that ends each one.
const STEPS: [&str; 13] = [
    "client's call -> leader's driver takes it",
    "leader's core steps -> append sent",
    "sent -> leader's peer task takes the batch",
    "batch taken -> follower's tarpc handler",
    "follower's handler -> message queued for its driver",
    "queued -> follower's driver takes it",
    "follower's driver -> acknowledgement sent",
    "sent -> follower's peer task takes the batch",
    "batch taken -> leader's tarpc handler",
    "leader's handler -> message queued for its driver",
    "queued -> leader's driver takes it",
    "leader's driver -> answer handed on",
    "answer handed on -> client resumes",
];

fn main() {
    if !latency_probe::ENABLED {
        eprintln!(
            "built without the probe: cargo run --release --features latency-probe --example latency_budget"
        );
        std::process::exit(2);
    }
    let mut proposals = 20_000usize;
    let mut stores = vec![("memory", Setup::TcpMemory), ("fjall", Setup::TcpFjall)];
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match (arg.as_str(), args.next()) {
            ("--proposals", Some(n)) => proposals = n.parse().expect("--proposals takes a count"),
            ("--store", Some(store)) => stores.retain(|(name, _)| *name == store),
            _ => {
                eprintln!("usage: latency_budget [--proposals N] [--store memory|fjall]");
                std::process::exit(2);
            }
        }
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a tokio runtime");
    for (name, setup) in stores {
        runtime.block_on(async {
            let cluster = start_cluster(3, setup).await;
            let leader = cluster.leader().await;
            let budget = measure(&leader, proposals).await;
            budget.print(&format!("tcp_{name}"), proposals);
        });
    }
}

struct Budget {
    steps: Vec<Histogram<u64>>,
    whole: Histogram<u64>,
}

async fn measure(leader: &ConsensusEngine, proposals: usize) -> Budget {
    let histogram =
        || Histogram::<u64>::new_with_bounds(1, 60_000_000_000, 3).expect("a histogram");
    let mut budget = Budget {
        steps: (0..STEPS.len()).map(|_| histogram()).collect(),
        whole: histogram(),
    };
    let leader_id = leader.node_id();
    let warm_up = proposals / 10;
    for i in 0..warm_up + proposals {
        latency_probe::arm();
        let called = Instant::now();
        let result = leader.propose(Proposal::from_bytes(&PAYLOAD[..])).await;
        let resumed = Instant::now();
        let stamps = latency_probe::take();
        assert!(
            matches!(result, Ok(ConsensusResult::Committed { .. })),
            "{result:?}"
        );
        if i < warm_up {
            continue;
        }
        budget.whole.saturating_record(nanos(resumed - called));
        if let Some(path) = path(&stamps, leader_id, called) {
            let mut times = vec![called];
            times.extend(path);
            times.push(resumed);
            for (step, pair) in times.windows(2).enumerate() {
                budget.steps[step].saturating_record(nanos(pair[1] - pair[0]));
            }
        }
    }
    budget
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// The proposal's path: the instants of its twelve stamps, or `None` if one is missing.
fn path(stamps: &[Stamp], leader: NodeId, called: Instant) -> Option<Vec<Instant>> {
    let first = |hop: Hop, node: NodeId, after: Instant| {
        stamps
            .iter()
            .find(|s| s.hop == hop && s.node == node && s.at >= after)
            .map(|s| s.at)
    };
    let proposed = first(Hop::Proposed, leader, called)?;
    let sent = first(Hop::Sent, leader, proposed)?;
    let taken = first(Hop::BatchTaken, leader, sent)?;
    let mut followers: Vec<NodeId> = stamps
        .iter()
        .map(|s| s.node)
        .filter(|n| *n != leader)
        .collect();
    followers.sort();
    followers.dedup();
    // The follower whose acknowledgement left first.
    let follower = followers
        .into_iter()
        .filter_map(|f| {
            let arrived = first(Hop::BatchArrived, f, taken)?;
            let forwarded = first(Hop::Forwarded, f, arrived)?;
            let took = first(Hop::DriverTook, f, forwarded)?;
            let sent = first(Hop::Sent, f, took)?;
            let taken = first(Hop::BatchTaken, f, sent)?;
            Some([arrived, forwarded, took, sent, taken])
        })
        .min_by_key(|hops| hops[4])?;
    let arrived = first(Hop::BatchArrived, leader, follower[4])?;
    let forwarded = first(Hop::Forwarded, leader, arrived)?;
    let took = first(Hop::DriverTook, leader, forwarded)?;
    let answered = first(Hop::Answered, leader, took)?;
    let mut path = vec![proposed, sent, taken];
    path.extend(follower);
    path.extend([arrived, forwarded, took, answered]);
    Some(path)
}

impl Budget {
    fn print(&self, label: &str, proposals: usize) {
        let micros = |h: &Histogram<u64>, q: f64| h.value_at_quantile(q) as f64 / 1000.0;
        println!(
            "{label}: {} of {proposals} proposals followed whole",
            self.steps[0].len()
        );
        println!("| hop | p50 µs | p99 µs |");
        println!("|---|---|---|");
        let mut sum = 0.0;
        for (name, histogram) in STEPS.iter().zip(&self.steps) {
            sum += micros(histogram, 0.5);
            println!(
                "| {name} | {:.1} | {:.1} |",
                micros(histogram, 0.5),
                micros(histogram, 0.99)
            );
        }
        println!("| sum of the hops' medians | {sum:.1} | |");
        println!(
            "| whole call (every proposal) | {:.1} | {:.1} |",
            micros(&self.whole, 0.5),
            micros(&self.whole, 0.99)
        );
    }
}
