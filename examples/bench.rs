//! In-process cluster benchmark, shaped like openraft's own minimal benchmark so that the two can
//! be compared on one machine: MEMBERS engines running the real protocol core and driver loop,
//! the memory log store, an in-process network (function calls and channels, no sockets), and a
//! state machine that only counts what it applies. Like the state machine of openraft's
//! benchmark, it takes snapshots (of its count), so each member's log is compacted behind the
//! latest one (every `snapshot_interval`, the engine's default of 10,000 entries) instead of
//! holding the whole run.
//!
//! ```text
//! cargo run --release --example bench -- [-c CLIENTS] [-n OPERATIONS] [-m MEMBERS] [-b BATCH]
//!     [--server-workers N] [--client-workers N] [--algorithm raft|pbft|gpu_optimized_raft]
//!     [--verifier cpu|gpu|auto] [--signed-clients] [--batch-size N]
//! ```
//! `--algorithm pbft` runs PBFT replicas (MEMBERS at least 4), each with a fresh key; the
//! clients propose to the primary. `--algorithm gpu_optimized_raft` runs Raft with signed votes
//! and acknowledgements (any number of members, 101 included). For those two, `--verifier gpu`
//! checks signatures with the GPU backend and counts votes with the GPU aggregator (every
//! batch, whatever its size), `--verifier auto` with the automatic ones (GPU above their
//! crossovers, CPU below), and the run also prints the share of the driver threads' time
//! spent checking signatures and counting votes. `--signed-clients` (GPU-optimized Raft) has
//! every client sign its commands, which the leader checks in batches of up to `--batch-size`
//! (the engines' `batch_size`, 4096 by default) before appending.
//! CLIENTS tasks submit OPERATIONS empty proposals in total, BATCH per call, each waiting for its
//! commit and apply before the next. Numbers take `k` and `m` suffixes (`100k`, `2m`). After the
//! run every member must have applied every operation; otherwise the program fails.
//!
//! With `OTEL_EXPORTER_OTLP_ENDPOINT` set, the run exports its traces there over OTLP/HTTP, to
//! measure what tracing costs: `--trace-ratio R` and `--trace-cap N` set the engines'
//! `trace_sample_ratio` and `trace_max_per_second` (defaults 0.01 and 200).
//!
//! Latency percentiles come from a sample: each client times one call in
//! [`LATENCY_SAMPLE_EVERY`] (with `propose_timed`, which reads the clock) and makes the others
//! with `propose`, which reads none, so that timing the run does not slow it down.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use consensus::protocol::gpu_raft::GpuRaftNode;
use consensus::protocol::pbft::PbftNode;
use consensus::{
    Algorithm, ConsensusConfig, ConsensusEngine, ConsensusResult, LocalNetwork, Proposal,
    ProposalTimings,
};

// The benches' latency record: one way to compute percentiles for every program here.
#[path = "../benches/common/latency.rs"]
mod latency;

use latency::Latencies;

/// Each client times one call in this many. The sample spreads evenly over the run and over
/// the clients, so its percentiles estimate those of every call.
const LATENCY_SAMPLE_EVERY: u64 = 8;

/// Counts applied commands; the command is `()`, which encodes to zero bytes. The count is kept
/// here and published with a plain store (only this member's driver writes it), which costs
/// less than an atomic add per command.
struct CountingStateMachine {
    applied: u64,
    published: Arc<Counter>,
}

/// One member's count, alone on its cache lines: the members' counters are allocated together,
/// and sharing a line would make every apply on one driver thread stall the others.
#[repr(align(128))]
#[derive(Default)]
struct Counter(AtomicU64);

impl consensus::StateMachine for CountingStateMachine {
    type Command = ();
    type Response = ();
    fn apply(&mut self, _: ()) {
        self.applied += 1;
        self.published.0.store(self.applied, Ordering::Relaxed);
    }

    /// Eight bytes: the count. Without snapshots every member kept all its entries, 800,000 of
    /// them at `-n 800k`: about 200 MB of memory touched for the first time during the
    /// measured run (52,000 page faults against 11,000 with snapshots), which this VM makes
    /// slow and uneven. openraft's benchmark snapshots every 5,000 entries and purges its log.
    fn snapshot(&self) -> Option<consensus::state_machine::SnapshotWriter> {
        let applied = self.applied;
        Some(Box::new(move |out: &mut dyn std::io::Write| {
            out.write_all(&applied.to_le_bytes())
        }))
    }

    fn restore(&mut self, snapshot: &mut dyn std::io::Read) -> std::io::Result<()> {
        let mut count = [0; 8];
        snapshot.read_exact(&mut count)?;
        self.applied = u64::from_le_bytes(count);
        self.published.0.store(self.applied, Ordering::Relaxed);
        Ok(())
    }
}

struct Options {
    clients: u64,
    operations: u64,
    members: u64,
    batch: u64,
    server_workers: usize,
    client_workers: usize,
    algorithm: Algorithm,
    verifier: Verifier,
    signed_clients: bool,
    /// The engines' `batch_size`: the most proposals per append, and under GPU-optimized Raft
    /// the most signed commands checked in one batch.
    batch_size: usize,
    /// The engines' `trace_sample_ratio` and `trace_max_per_second`.
    trace_ratio: f64,
    trace_cap: u32,
}

/// Which backend checks signatures and counts votes.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Verifier {
    Cpu,
    Gpu,
    Auto,
}

fn parse_count(text: &str) -> Result<u64, String> {
    let lower = text.to_ascii_lowercase();
    let (digits, scale) = match lower.strip_suffix('k') {
        Some(d) => (d, 1_000),
        None => match lower.strip_suffix('m') {
            Some(d) => (d, 1_000_000),
            None => (lower.as_str(), 1),
        },
    };
    digits
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(scale))
        .ok_or_else(|| format!("not a count: {text:?} (examples: 64, 100k, 2m)"))
}

fn parse_options() -> Result<Options, String> {
    let mut options = Options {
        clients: 1,
        operations: 100_000,
        members: 3,
        batch: 1,
        server_workers: 2,
        client_workers: 1,
        algorithm: Algorithm::Raft,
        verifier: Verifier::Cpu,
        signed_clients: false,
        batch_size: 4096,
        trace_ratio: ConsensusConfig::default().trace_sample_ratio,
        trace_cap: ConsensusConfig::default().trace_max_per_second,
    };
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let mut value = || args.next().ok_or_else(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "-c" | "--clients" => options.clients = parse_count(&value()?)?,
            "-n" | "--operations" => options.operations = parse_count(&value()?)?,
            "-m" | "--members" => options.members = parse_count(&value()?)?,
            "-b" | "--batch" => options.batch = parse_count(&value()?)?,
            "--server-workers" => options.server_workers = parse_count(&value()?)? as usize,
            "--client-workers" => options.client_workers = parse_count(&value()?)? as usize,
            "--algorithm" => {
                let name = value()?;
                options.algorithm = Algorithm::parse(&name).ok_or_else(|| {
                    format!("--algorithm: raft, pbft or gpu_optimized_raft, not {name:?}")
                })?;
            }
            "--verifier" => match value()?.as_str() {
                "cpu" => options.verifier = Verifier::Cpu,
                "gpu" => options.verifier = Verifier::Gpu,
                "auto" => options.verifier = Verifier::Auto,
                other => return Err(format!("--verifier: cpu, gpu or auto, not {other:?}")),
            },
            "--signed-clients" => options.signed_clients = true,
            "--batch-size" => options.batch_size = parse_count(&value()?)? as usize,
            "--trace-ratio" => {
                let text = value()?;
                options.trace_ratio = text.parse().map_err(|_| format!("not a ratio: {text:?}"))?;
            }
            "--trace-cap" => {
                options.trace_cap = u32::try_from(parse_count(&value()?)?)
                    .map_err(|_| "--trace-cap is at most 4294967295".to_owned())?;
            }
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    match options.algorithm {
        Algorithm::Raft if ![1, 3, 5].contains(&options.members) => {
            return Err(format!(
                "raft members must be 1, 3 or 5, not {}",
                options.members
            ));
        }
        Algorithm::Pbft if options.members < 4 => {
            return Err(format!(
                "pbft needs at least 4 members, not {}",
                options.members
            ));
        }
        _ => {}
    }
    if options.signed_clients && options.algorithm != Algorithm::GpuOptimizedRaft {
        return Err("--signed-clients needs --algorithm gpu_optimized_raft".into());
    }
    if options.clients == 0 || options.batch == 0 || options.operations == 0 {
        return Err("clients, operations and batch must be at least 1".into());
    }
    if options.client_workers == 0 || options.server_workers == 0 {
        return Err("worker counts must be at least 1".into());
    }
    Ok(options)
}

fn main() {
    let options = match parse_options() {
        Ok(options) => options,
        Err(message) => {
            eprintln!("bench: {message}");
            std::process::exit(2);
        }
    };
    // Each member's protocol driver is its own OS thread; `--server-workers` sizes the runtime
    // that hosts the engines' async side (start, stop), so both flags of openraft's bench exist.
    let server = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(options.server_workers)
        .enable_all()
        .build()
        .expect("server runtime");
    let client = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(options.client_workers)
        .enable_all()
        .build()
        .expect("client runtime");
    let _export = export_traces(server.handle());

    let names: Vec<String> = (1..=options.members)
        .map(|i| format!("member-{i}"))
        .collect();
    let network = LocalNetwork::new();
    let pbft_network = LocalNetwork::<PbftNode>::default();
    let gpu_raft_network = LocalNetwork::<GpuRaftNode>::default();
    let keys = tempfile::tempdir().expect("a temp dir for the keys");
    let mut validators = Vec::new();
    if options.algorithm.signs_messages() {
        for name in &names {
            let public = consensus::keys::generate_key_file(keys.path().join(name)).expect("key");
            validators.push((name.clone(), consensus::keys::public_key_hex(&public)));
        }
    }
    let backends = (options.verifier != Verifier::Cpu).then(|| gpu_backends(options.verifier));
    let counters: Vec<Arc<Counter>> = names.iter().map(|_| Arc::default()).collect();
    let engines: Vec<Arc<ConsensusEngine>> = server.block_on(async {
        let mut engines = Vec::new();
        for (name, counter) in names.iter().zip(&counters) {
            let peers: Vec<&String> = names.iter().filter(|n| *n != name).collect();
            let mut config = ConsensusConfig::default()
                .algorithm(options.algorithm)
                .node_id(name.as_str())
                .peers(peers.iter().map(|s| s.as_str()))
                .request_timeout(Duration::from_secs(30))
                .batch_size(options.batch_size)
                .trace_sample_ratio(options.trace_ratio)
                .trace_max_per_second(options.trace_cap);
            if options.algorithm.signs_messages() {
                config = config
                    .key_file(keys.path().join(name))
                    .view_change_timeout(Duration::from_secs(10));
                for (member, public) in &validators {
                    config = config.validator(member.clone(), public.clone());
                }
            }
            let engine = ConsensusEngine::new(config).expect("config");
            let mut engine = match options.algorithm {
                Algorithm::Pbft => engine.with_local_network(&pbft_network),
                Algorithm::GpuOptimizedRaft => engine.with_local_network(&gpu_raft_network),
                Algorithm::Raft => engine.with_local_network(&network),
            };
            if let Some((verifier, votes)) = &backends {
                engine = engine
                    .with_signature_verifier(verifier.clone())
                    .with_vote_aggregator(votes.clone());
            }
            engine
                .set_state_machine(CountingStateMachine {
                    applied: 0,
                    published: counter.clone(),
                })
                .expect("before start");
            engine.start().await.expect("start");
            engines.push(Arc::new(engine));
        }
        engines
    });
    let leader = client.block_on(async {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(leader) = engines.iter().find(|e| e.is_leader()) {
                return leader.clone();
            }
            assert!(Instant::now() < deadline, "no leader elected within 10 s");
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    });

    let per_client = options.operations / options.clients;
    let remainder = options.operations % options.clients;
    let started = Instant::now();
    // Each client keeps the raw moments and the durations are worked out after the clock
    // stops: subtracting two `Instant`s costs more than a hundred instructions, which the
    // measured loop should not pay.
    let timings: Vec<Vec<ProposalTimings>> = client.block_on(async {
        let mut tasks = Vec::new();
        for client_index in 0..options.clients {
            let leader = leader.clone();
            // Each client's own key; its commands are all empty, so one signature serves them
            // all (the leader still checks every copy).
            let signature = options.signed_clients.then(|| {
                let key = ed25519_dalek::SigningKey::from_bytes(&[client_index as u8 + 1; 32]);
                consensus::ClientSignature::sign(&[], &key)
            });
            let operations = per_client + u64::from(client_index < remainder);
            let batch = options.batch;
            tasks.push(tokio::spawn(async move {
                let sampled = operations.div_ceil(LATENCY_SAMPLE_EVERY);
                let mut timings = Vec::with_capacity(sampled as usize);
                let mut done = 0;
                let mut calls_made = client_index;
                while done < operations {
                    let size = batch.min(operations - done);
                    // Clients start the sampling cycle at different offsets, so that the timed
                    // calls do not all go out in the same rounds.
                    let timed = calls_made % LATENCY_SAMPLE_EVERY == 0;
                    calls_made += 1;
                    let propose = || async {
                        let proposal = match &signature {
                            Some(signature) => Proposal::with_signature(&[][..], signature.clone()),
                            None => Proposal::from_bytes(&[][..]),
                        };
                        if timed {
                            leader.propose_timed(proposal).await
                        } else {
                            leader.propose(proposal).await.map(|result| (result, None))
                        }
                    };
                    let mut record = |outcome| match outcome {
                        Ok((ConsensusResult::Committed { .. }, timing)) => {
                            timings.extend(timing);
                        }
                        other => panic!("operation failed: {other:?}"),
                    };
                    if size == 1 {
                        // One call needs no join_all (and its allocation per operation).
                        record(propose().await);
                    } else {
                        let calls = (0..size).map(|_| propose());
                        futures::future::join_all(calls)
                            .await
                            .into_iter()
                            .for_each(&mut record);
                    }
                    done += size;
                }
                timings
            }));
        }
        let mut results = Vec::new();
        for task in tasks {
            results.push(task.await.expect("client task"));
        }
        results
    });
    let elapsed = started.elapsed();

    // A benchmark that loses operations is wrong, not fast: every member must apply them all.
    let all_applied = client.block_on(async {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let counts: Vec<u64> = counters
                .iter()
                .map(|c| c.0.load(Ordering::Relaxed))
                .collect();
            if counts.iter().all(|&c| c == options.operations) {
                return Ok(counts);
            }
            if Instant::now() > deadline || counts.iter().any(|&c| c > options.operations) {
                return Err(counts);
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    });
    let mut to_commit = Latencies::new();
    let mut to_apply = Latencies::new();
    for timing in timings.iter().flatten() {
        to_commit.record(timing.committed - timing.submitted);
        to_apply.record(timing.applied - timing.committed);
    }
    let show = |name: &str, latencies: &Latencies| {
        println!(
            "{name}: p50 {:?}, p90 {:?}, p99 {:?}",
            latencies.quantile(0.50),
            latencies.quantile(0.90),
            latencies.quantile(0.99)
        );
    };
    println!(
        "latency of {} calls (one in {LATENCY_SAMPLE_EVERY} per client):",
        to_commit.len()
    );
    show("submit->commit", &to_commit);
    show("commit->apply", &to_apply);
    match all_applied {
        Ok(counts) => println!(
            "verified: every member applied {} operations {counts:?}",
            options.operations
        ),
        Err(counts) => {
            eprintln!(
                "bench: members applied {counts:?}, expected {} each",
                options.operations
            );
            std::process::exit(1);
        }
    }
    if options.algorithm.signs_messages() {
        let checking: Duration = engines
            .iter()
            .map(|e| e.metrics().vote_processing_total)
            .sum();
        println!(
            "signature checks and vote counting ({}): {:.1}% of the {} driver threads' time",
            match options.verifier {
                Verifier::Cpu => "cpu",
                Verifier::Gpu => "gpu",
                Verifier::Auto => "auto",
            },
            100.0 * checking.as_secs_f64() / (elapsed.as_secs_f64() * options.members as f64),
            options.members
        );
    }
    let seconds = elapsed.as_secs_f64();
    let ns_per_op = elapsed.as_nanos() as f64 / options.operations as f64;
    let ops_per_ms = options.operations as f64 / (seconds * 1000.0);
    println!(
        "clients: {}, n: {}, batch: {}, members: {}: time: {:.3}s, ns/op: {:.0}, op/ms: {:.0}",
        options.clients,
        options.operations,
        options.batch,
        options.members,
        seconds,
        ns_per_op,
        ops_per_ms
    );
    drop(engines);
    drop(leader);
    server.shutdown_background();
    client.shutdown_background();
}

type Backends = (
    Arc<dyn consensus::gpu::SignatureVerifier>,
    Arc<dyn consensus::gpu::VoteAggregator>,
);

/// The GPU signature verifier and vote aggregator, with the adapter's name printed: for
/// `Verifier::Gpu` used for every batch (a software adapter included, which the automatic ones
/// would never choose), for `Verifier::Auto` the automatic ones.
#[cfg(feature = "gpu")]
fn gpu_backends(verifier: Verifier) -> Backends {
    use consensus::gpu::{
        AdaptiveVoteAggregator, AutoSignatureVerifier, GpuConfig, GpuContext, GpuSignatureVerifier,
        GpuVoteAggregator,
    };
    let context = Arc::new(GpuContext::new(GpuConfig::default()).expect("a GPU adapter"));
    println!("gpu backends on {:?}", context.adapter_name());
    let gpu =
        GpuSignatureVerifier::new(context.clone()).expect("the GPU verifier passes its self-check");
    let votes = GpuVoteAggregator::with_context(context).expect("the GPU vote aggregator");
    match verifier {
        Verifier::Gpu => (
            Arc::new(AutoSignatureVerifier::with_crossover(Some(gpu), 1)),
            Arc::new(votes),
        ),
        _ => (
            Arc::new(AutoSignatureVerifier::new(Some(gpu))),
            Arc::new(AdaptiveVoteAggregator::new(votes)),
        ),
    }
}

#[cfg(not(feature = "gpu"))]
fn gpu_backends(_: Verifier) -> Backends {
    eprintln!("bench: --verifier gpu and auto need the gpu feature");
    std::process::exit(2);
}

/// Installs the OTLP export when `OTEL_EXPORTER_OTLP_ENDPOINT` names a collector.
#[cfg(feature = "otlp")]
fn export_traces(runtime: &tokio::runtime::Handle) -> Option<consensus::telemetry::OtlpGuard> {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    let export = consensus::telemetry::TelemetryConfig::default()
        .resolve("bench")
        .expect("telemetry settings")?;
    let (layer, guard) = export.layer(runtime.clone()).expect("OTLP exporter");
    tracing_subscriber::registry().with(layer).init();
    eprintln!("exporting traces to {}", export.traces_url);
    Some(guard)
}

#[cfg(not(feature = "otlp"))]
fn export_traces(_: &tokio::runtime::Handle) -> Option<()> {
    None
}
