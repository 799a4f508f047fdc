//! Snapshots under load, two checks of the snapshots issue on this machine.
//!
//! `cargo run --release --example state_sync [-- --ops N --interval I --clients C
//! --sync-mib M --value-kib K --skip-bounded --skip-sync]`
//!
//! Both start three engines in this process over TCP on loopback (plaintext), each with a
//! fjall data directory (fsync per batch) and the node's [`KvStore`].
//!
//! 1. **Bounded log.** `N` puts (default 1,000,000; 64-byte values over 10,000 keys) from `C`
//!    concurrent clients (default 64) through the leader, with `snapshot_interval = I` (default
//!    10,000). Prints, per node, the most entries its log held at once (the target: at most
//!    `2 × I`), the snapshots taken, the longest the driver stopped to capture one, and the
//!    data directory's size at the end; fails if a log held more than `2 × I`.
//! 2. **State sync.** One follower is stopped and its directory removed; `M` MiB (default 1024)
//!    of `K` KiB values (default 64) are written through the leader, whose snapshot then holds
//!    them all; the follower starts empty, as a new node, and can only catch up from that
//!    snapshot, sent in checksummed chunks over the same TCP transport. Prints the snapshot's
//!    size, the time from the follower's start to its install and the rate in GB/s, and the
//!    leader's commit latency (p50, p99) for sequential 64-byte puts (at most one a millisecond)
//!    before and during the transfer, and the snapshots the leader took during it (they would
//!    compete with the transfer); fails if the follower does not hold every key afterwards.
//!    Then it times a first touch of as much fresh memory as the snapshot holds, in this
//!    process: the least any node installing it here must spend, since it holds the state in
//!    memory.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use consensus::node::kv::{KvCommand, KvResponse, KvStore};
use consensus::{ConsensusConfig, ConsensusEngine};

#[path = "../benches/common/latency.rs"]
mod latency;
#[path = "../tests/common/ports.rs"]
mod ports;

use latency::Latencies;

struct Options {
    ops: usize,
    interval: u64,
    clients: usize,
    sync_mib: usize,
    value_kib: usize,
    bounded: bool,
    sync: bool,
}

fn parse_options() -> Result<Options, String> {
    let mut options = Options {
        ops: 1_000_000,
        interval: 10_000,
        clients: 64,
        sync_mib: 1024,
        value_kib: 64,
        bounded: true,
        sync: true,
    };
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let mut number = |name: &str| -> Result<u64, String> {
            let text = args.next().ok_or(format!("{name} needs a value"))?;
            let value: u64 = text
                .replace('_', "")
                .parse()
                .map_err(|_| format!("{name}: not a number: {text}"))?;
            if value == 0 {
                return Err(format!("{name} must be at least 1"));
            }
            Ok(value)
        };
        match flag.as_str() {
            "--ops" => options.ops = number("--ops")? as usize,
            "--interval" => options.interval = number("--interval")?,
            "--clients" => options.clients = number("--clients")? as usize,
            "--sync-mib" => options.sync_mib = number("--sync-mib")? as usize,
            "--value-kib" => options.value_kib = number("--value-kib")? as usize,
            "--skip-bounded" => options.bounded = false,
            "--skip-sync" => options.sync = false,
            other => return Err(format!("unknown option {other}")),
        }
    }
    Ok(options)
}

/// One member: its name, addresses and data directory.
struct Member {
    name: String,
    bind: String,
    peers: Vec<String>,
    dir: PathBuf,
}

impl Member {
    async fn start(&self, interval: u64) -> Result<ConsensusEngine, String> {
        let config = ConsensusConfig::default()
            .node_id(self.name.as_str())
            .bind_address(self.bind.as_str())
            .peers(self.peers.clone())
            .persistent_state(&self.dir)
            .insecure_plaintext(true)
            .snapshot_interval(interval)
            .request_timeout(Duration::from_secs(30));
        let mut engine = ConsensusEngine::new(config).map_err(|e| e.to_string())?;
        engine
            .set_state_machine(KvStore::new())
            .map_err(|e| e.to_string())?;
        engine.start().await.map_err(|e| e.to_string())?;
        Ok(engine)
    }
}

fn members(dir: &Path) -> Vec<Member> {
    let names = ["alpha", "bravo", "charlie"];
    names
        .iter()
        .zip(ports::loopback_members(&names))
        .map(|(name, member)| Member {
            name: name.to_string(),
            bind: member.bind,
            peers: member.peers,
            dir: dir.join(name),
        })
        .collect()
}

/// The index of the single engine that leads and that every running engine follows.
async fn agreed_leader(engines: &[Option<ConsensusEngine>]) -> Result<usize, String> {
    let until = Instant::now() + Duration::from_secs(20);
    loop {
        let leaders: Vec<usize> = (0..engines.len())
            .filter(|&i| engines[i].as_ref().is_some_and(|e| e.is_leader()))
            .collect();
        if let [leader] = leaders[..] {
            let id = engines[leader].as_ref().map(|e| e.current_leader());
            if engines
                .iter()
                .flatten()
                .all(|e| Some(e.current_leader()) == id)
            {
                return Ok(leader);
            }
        }
        if Instant::now() > until {
            return Err("no leader agreed within 20 s".into());
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn put(engine: &ConsensusEngine, key: String, value: Vec<u8>) -> Result<(), String> {
    let command = KvCommand::Put {
        key: key.into_bytes(),
        value,
    };
    match engine.execute_command::<KvStore>(command).await {
        Ok(KvResponse::Done) => Ok(()),
        Ok(other) => Err(format!("a put answered {other:?}")),
        Err(error) => Err(error.to_string()),
    }
}

/// Bytes under `dir`, recursively.
fn disk_usage(dir: &Path) -> u64 {
    let Ok(listing) = std::fs::read_dir(dir) else {
        return 0;
    };
    listing
        .flatten()
        .map(|entry| match entry.metadata() {
            Ok(meta) if meta.is_dir() => disk_usage(&entry.path()),
            Ok(meta) => meta.len(),
            Err(_) => 0,
        })
        .sum()
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

async fn bounded_log(options: &Options, dir: &Path) -> Result<(), String> {
    let members = members(dir);
    let mut engines = Vec::new();
    for member in &members {
        engines.push(Some(member.start(options.interval).await?));
    }
    let leader = agreed_leader(&engines).await?;
    let engines: Arc<Vec<ConsensusEngine>> = Arc::new(engines.into_iter().flatten().collect());
    println!(
        "bounded log: {} puts from {} clients through the leader, snapshot_interval {}",
        options.ops, options.clients, options.interval
    );
    let next = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let clients: Vec<_> = (0..options.clients)
        .map(|_| {
            let (engines, next, ops) = (engines.clone(), next.clone(), options.ops);
            tokio::spawn(async move {
                loop {
                    let op = next.fetch_add(1, Ordering::Relaxed);
                    if op >= ops {
                        return Ok::<(), String>(());
                    }
                    let value = format!("{op:064}").into_bytes();
                    put(&engines[leader], format!("key-{}", op % 10_000), value).await?;
                }
            })
        })
        .collect();
    for client in clients {
        client.await.map_err(|e| e.to_string())??;
    }
    let took = started.elapsed();
    println!(
        "  {} puts in {:.1} s: {:.0} puts/s",
        options.ops,
        took.as_secs_f64(),
        options.ops as f64 / took.as_secs_f64()
    );
    let bound = 2 * options.interval;
    let mut failed = Vec::new();
    println!("  node      log max   log now  snapshots  capture max  data dir");
    for (engine, member) in engines.iter().zip(&members) {
        let metrics = engine.metrics();
        println!(
            "  {:<8} {:>8} {:>9} {:>10} {:>9.1?} {:>8.1} MiB",
            member.name,
            metrics.log_entries_max,
            metrics.log_entries,
            metrics.snapshots_taken,
            metrics.snapshot_blocked_max,
            mib(disk_usage(&member.dir)),
        );
        if metrics.log_entries_max > bound {
            failed.push(format!(
                "{} held {} entries, more than 2 × snapshot_interval = {bound}",
                member.name, metrics.log_entries_max
            ));
        }
        if metrics.snapshots_taken == 0 {
            failed.push(format!("{} took no snapshot", member.name));
        }
    }
    let mut engines = Arc::try_unwrap(engines).map_err(|_| "clients still hold the engines")?;
    for engine in &mut engines {
        engine.stop().await.map_err(|e| e.to_string())?;
    }
    if failed.is_empty() {
        println!("  every log held at most 2 × snapshot_interval = {bound} entries");
        Ok(())
    } else {
        Err(failed.join("; "))
    }
}

/// The probe's period: see [`probe`].
const PROBE_PERIOD: Duration = Duration::from_millis(1);

/// Sequential 64-byte puts to `engine` until `stop`, at most one a millisecond, recording each
/// commit's latency. Paced, so that the probe's own entries stay far below the snapshot
/// interval: back to back it wrote about 3,500 a second, which during the baseline and the
/// transfer took the leader and the other follower past their next snapshot, and each
/// captured and wrote another GiB beside the transfer.
async fn probe(engine: Arc<ConsensusEngine>, stop: Arc<AtomicBool>) -> Result<Latencies, String> {
    let mut latencies = Latencies::new();
    let mut i = 0u64;
    let mut pace = tokio::time::interval(PROBE_PERIOD);
    pace.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    while !stop.load(Ordering::Relaxed) {
        pace.tick().await;
        let started = Instant::now();
        put(&engine, format!("probe-{}", i % 100), vec![b'p'; 64]).await?;
        latencies.record(started.elapsed());
        i += 1;
    }
    Ok(latencies)
}

async fn state_sync(options: &Options, dir: &Path) -> Result<(), String> {
    let value_bytes = options.value_kib * 1024;
    let count = (options.sync_mib * 1024 * 1024).div_ceil(value_bytes);
    // One snapshot at the end of the load (a little before its last value, so that it falls
    // inside the load even after a batch's overshoot): it holds nearly every value, and the log
    // the node replays after it is short. The next is due only a whole load's worth of entries
    // later, so that the probe's puts during the transfer do not make the leader and the other
    // follower serialize another 1 GiB beside it (with half the load as the interval, they did:
    // 10 s of each core's time, and the transfer took 28 s instead of about 8).
    let interval = (count as u64).saturating_sub(64).max(1);
    let members = members(dir);
    let mut engines = Vec::new();
    for member in &members {
        engines.push(Some(member.start(interval).await?));
    }
    let leader = agreed_leader(&engines).await?;
    let newcomer = (leader + 1) % 3;
    engines[newcomer]
        .take()
        .ok_or("no newcomer")?
        .stop()
        .await
        .map_err(|e| e.to_string())?;
    std::fs::remove_dir_all(&members[newcomer].dir).map_err(|e| e.to_string())?;
    println!(
        "state sync: {count} values of {} KiB ({} MiB) through the leader, then a node with an \
         empty data directory joins",
        options.value_kib, options.sync_mib
    );
    let engine = Arc::new(engines[leader].take().ok_or("no leader")?);
    let next = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let writers: Vec<_> = (0..16)
        .map(|_| {
            let (engine, next) = (engine.clone(), next.clone());
            tokio::spawn(async move {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= count {
                        return Ok::<(), String>(());
                    }
                    let value = vec![(i % 251) as u8; value_bytes];
                    put(&engine, format!("big-{i:08}"), value).await?;
                }
            })
        })
        .collect();
    for writer in writers {
        writer.await.map_err(|e| e.to_string())??;
    }
    println!("  loaded in {:.1} s", started.elapsed().as_secs_f64());
    let until = Instant::now() + Duration::from_secs(120);
    let mut filler = 0u64;
    while engine.metrics().snapshots_taken < 1 {
        if Instant::now() > until {
            return Err("the leader took no snapshot".into());
        }
        // Small writes until the snapshot is due, if the load fell short of it.
        put(&engine, format!("filler-{filler}"), vec![b'f'; 64]).await?;
        filler += 1;
    }
    println!(
        "  leader's snapshots: {} taken, the latest of {:.0} MiB (with {filler} small writes \
         after the load)",
        engine.metrics().snapshots_taken,
        mib(engine.metrics().snapshot_bytes),
    );

    // The leader's commit latency alone, then while it streams the snapshot.
    let stop = Arc::new(AtomicBool::new(false));
    let baseline = tokio::spawn(probe(engine.clone(), stop.clone()));
    tokio::time::sleep(Duration::from_secs(3)).await;
    stop.store(true, Ordering::Relaxed);
    let baseline = baseline.await.map_err(|e| e.to_string())??;

    let stop = Arc::new(AtomicBool::new(false));
    let during = tokio::spawn(probe(engine.clone(), stop.clone()));
    let taken_before = engine.metrics().snapshots_taken;
    let joined = Instant::now();
    let joiner = members[newcomer].start(interval).await?;
    let start_took = joined.elapsed();
    let until = Instant::now() + Duration::from_secs(300);
    while joiner.metrics().snapshots_installed == 0 {
        if Instant::now() > until {
            return Err("the new node installed no snapshot within 300 s".into());
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let took = joined.elapsed();
    let taken_during = engine.metrics().snapshots_taken - taken_before;
    stop.store(true, Ordering::Relaxed);
    let during = during.await.map_err(|e| e.to_string())??;
    let snapshot_bytes = joiner.metrics().snapshot_bytes;
    println!(
        "  snapshot of {:.0} MiB installed (restored and on disk) on the new node {:.2} s after its start was called \
         ({:.2} s of it in start): {:.2} GB/s",
        mib(snapshot_bytes),
        took.as_secs_f64(),
        start_took.as_secs_f64(),
        snapshot_bytes as f64 / took.as_secs_f64() / 1e9
    );
    println!("  snapshots the leader took during the transfer: {taken_during}");
    let touched = first_touch(snapshot_bytes as usize);
    println!(
        "  first touch of {:.0} MiB of fresh memory in this process now (the new node must hold \
         the state in memory): {:.2} s, a ceiling of {:.2} GB/s for any install here",
        mib(snapshot_bytes),
        touched.as_secs_f64(),
        snapshot_bytes as f64 / touched.as_secs_f64() / 1e9
    );
    for (what, latencies) in [("before", &baseline), ("during", &during)] {
        println!(
            "  leader commit latency {what} the transfer: p50 {:.2?}, p99 {:.2?} ({} puts)",
            latencies.quantile(0.5),
            latencies.quantile(0.99),
            latencies.len()
        );
    }

    // The new node holds every value.
    for i in (0..count).step_by((count / 64).max(1)).chain([count - 1]) {
        let key = format!("big-{i:08}").into_bytes();
        let expected = Some(vec![(i % 251) as u8; value_bytes]);
        match joiner.read::<KvStore>(KvCommand::Get { key }).await {
            Ok(KvResponse::Value(value)) if value == expected => {}
            Ok(_) => return Err(format!("the new node holds a wrong value for big-{i:08}")),
            Err(error) => return Err(format!("reading big-{i:08} on the new node: {error}")),
        }
    }
    println!("  the new node holds every value it was checked for");
    let mut joiner = joiner;
    joiner.stop().await.map_err(|e| e.to_string())?;
    let mut engine = Arc::try_unwrap(engine).map_err(|_| "probes still hold the leader")?;
    engine.stop().await.map_err(|e| e.to_string())?;
    for engine in engines.iter_mut().flatten() {
        engine.stop().await.map_err(|e| e.to_string())?;
    }
    Ok(())
}

/// How long writing one byte to each 4 KiB page of a fresh `bytes`-long allocation takes:
/// the kernel (and, on a VM, the host) must supply and clear every page. A node receiving a
/// snapshot of that size must do at least this much, whatever the protocol. Measured after
/// the transfer, so that the pages it frees cannot speed the transfer up.
fn first_touch(bytes: usize) -> Duration {
    const PAGE: usize = 4096;
    let started = Instant::now();
    // `vec![0; n]` maps the pages without touching them: the writes below do.
    let mut fresh = vec![0u8; bytes];
    for page in fresh.chunks_mut(PAGE) {
        page[0] = 1;
    }
    std::hint::black_box(&fresh);
    started.elapsed()
}

fn main() -> ExitCode {
    let options = match parse_options() {
        Ok(options) => options,
        Err(error) => {
            eprintln!("{error}");
            return ExitCode::from(2);
        }
    };
    // The engines' logs and spans as text when RUST_LOG asks for them (e.g.
    // `RUST_LOG=warn,consensus::trace=info` shows the snapshots and their transfers).
    if std::env::var_os("RUST_LOG").is_some() {
        tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .init();
    }
    let runtime = tokio::runtime::Runtime::new().expect("a tokio runtime");
    let dir = tempfile::tempdir().expect("a temporary directory");
    let result = runtime.block_on(async {
        if options.bounded {
            bounded_log(&options, &dir.path().join("bounded")).await?;
        }
        if options.sync {
            state_sync(&options, &dir.path().join("sync")).await?;
        }
        Ok::<(), String>(())
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("state_sync: {error}");
            ExitCode::FAILURE
        }
    }
}
