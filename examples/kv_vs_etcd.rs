//! Side by side with etcd: the same HTTP load against three `consensus-node`s and, when an `etcd`
//! binary is on the PATH (Debian package `etcd-server`), against a three-member etcd cluster on
//! the same machine, with the same durability (ours: fjall with an fsync per batch; etcd: its WAL
//! fsync, the default). One table of throughput and latency, with the ratio.
//!
//! ```text
//! cargo run --release --example kv_vs_etcd [-- --seconds S --clients C --keys K --value-bytes B
//!                                               --rounds R --compare-reads]
//! ```
//!
//! Each phase runs for S seconds (default 5) with C clients (16), each on one kept-alive HTTP/1
//! connection (hyper, through `consensus::node::client::Connection`), over K keys (10,000) with
//! B-byte values (64). With `--rounds R` (default 1) the phases run R times over the same two
//! clusters, each phase ours and then etcd's, so that a slow spell of the machine falls on both;
//! a line per round gives its ratios, and the table then gives the medians of the rounds (each
//! ratio the median of the rounds' ratios). The phases:
//!
//! - `PUT → leader`, `PUT → follower`: every client writes through that node;
//! - `PUT → any node`: client i writes through node i mod 3, as users spread load;
//! - `GET → leader`, `GET → follower`, `GET → any node`: linearizable reads (ours by ReadIndex,
//!   the node's default `read_mode`; etcd's serializable=false range is its linearizable read,
//!   also a ReadIndex).
//!
//! `--compare-reads` then measures our reads once per `read_mode` (`read_index`, `lease`, and
//! `log`: every read an entry of the log, as before reads had a path of their own), each on a
//! fresh cluster whose keys a short unreported write phase filled, and prints a second table
//! with the ratios to `log`.
//!
//! Our nodes run with the engine's and runtime's defaults, as etcd's members run with theirs
//! (`kv_cluster` gives its nodes a share of the cores instead; see
//! `consensus::node::write_loopback_cluster`).
//!
//! Both clusters secure their peer links alike: mutual TLS with certificates from a cluster CA
//! (ours: each node's `[consensus.tls]`, as `write_loopback_cluster` writes it; etcd's members:
//! `--peer-cert-file`, `--peer-key-file`, `--peer-trusted-ca-file` and
//! `--peer-client-cert-auth`, with certificates from the same generator). The client API is plain
//! HTTP on both.
//!
//! Ours: `PUT /kv/{key}` and `GET /kv/{key}`. etcd: its v3 JSON gateway, `POST /v3/kv/put` and
//! `POST /v3/kv/range` with base64 keys and values. A request counts when it is answered 200;
//! anything else is an error and is reported. Without etcd the program runs ours alone and says
//! why.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine as _;
use consensus::ReadMode;
use consensus::node::client::{self, Connection};
use serde_json::Value;

#[path = "../benches/common/latency.rs"]
mod latency;

use latency::Latencies;

// The nodes this binary runs (its `node` subcommand) allocate as `consensus-node` does; its load
// generator shares the allocator, for etcd's phases as for ours.
#[global_allocator]
static ALLOCATOR: consensus::node::NodeAllocator = consensus::node::NodeAllocator;

const TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Clone, Copy)]
struct Options {
    seconds: u64,
    clients: usize,
    keys: usize,
    value_bytes: usize,
    compare_reads: bool,
    rounds: usize,
}

fn parse_options() -> Result<Options, String> {
    let mut options = Options {
        seconds: 5,
        clients: 16,
        keys: 10_000,
        value_bytes: 64,
        compare_reads: false,
        rounds: 1,
    };
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let mut number = || -> Result<u64, String> {
            let text = args.next().ok_or(format!("{flag} needs a value"))?;
            text.parse()
                .map_err(|_| format!("{flag}: not a number: {text:?}"))
        };
        match flag.as_str() {
            "--seconds" => options.seconds = number()?.max(1),
            "--clients" => options.clients = number()?.max(1) as usize,
            "--keys" => options.keys = number()?.max(1) as usize,
            "--value-bytes" => options.value_bytes = number()? as usize,
            "--rounds" => options.rounds = number()?.max(1) as usize,
            "--compare-reads" => options.compare_reads = true,
            other => {
                return Err(format!(
                    "unexpected argument {other:?}; expected --seconds S --clients C --keys K \
                     --value-bytes B --rounds R --compare-reads"
                ));
            }
        }
    }
    Ok(options)
}

#[path = "../tests/common/ports.rs"]
mod ports;

fn free_ports(count: usize) -> Result<Vec<u16>, String> {
    ports::try_free_ports(count).map_err(|e| format!("no free port: {e}"))
}

/// Child processes stopped when the program ends, however it ends.
#[derive(Default)]
struct Processes(Vec<Child>);

impl Drop for Processes {
    fn drop(&mut self) {
        for child in &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A key-value service under test: how to write and read one key through a connection.
#[derive(Clone, Copy, PartialEq, Eq)]
enum System {
    Ours,
    Etcd,
}

impl System {
    fn name(self) -> &'static str {
        match self {
            System::Ours => "consensus-node",
            System::Etcd => "etcd 3.4",
        }
    }

    /// The method, path and body of a write or a linearizable read of `key`.
    fn request(self, write: bool, key: &str, value: &[u8]) -> (&'static str, String, Vec<u8>) {
        let b64 = |bytes: &[u8]| base64::engine::general_purpose::STANDARD.encode(bytes);
        match (self, write) {
            (System::Ours, true) => ("PUT", format!("/kv/{key}"), value.to_vec()),
            (System::Ours, false) => ("GET", format!("/kv/{key}"), Vec::new()),
            (System::Etcd, true) => {
                let body = serde_json::json!({"key": b64(key.as_bytes()), "value": b64(value)});
                ("POST", "/v3/kv/put".into(), body.to_string().into_bytes())
            }
            (System::Etcd, false) => {
                let body = serde_json::json!({"key": b64(key.as_bytes())});
                ("POST", "/v3/kv/range".into(), body.to_string().into_bytes())
            }
        }
    }
}

/// A running cluster: its members' HTTP addresses, the leader first.
struct Cluster {
    system: System,
    leader: SocketAddr,
    followers: Vec<SocketAddr>,
}

impl Cluster {
    fn all(&self) -> Vec<SocketAddr> {
        std::iter::once(self.leader)
            .chain(self.followers.iter().copied())
            .collect()
    }
}

async fn json(address: SocketAddr, method: &str, path: &str, body: &[u8]) -> Option<Value> {
    let response = client::request(address, method, path, body, TIMEOUT)
        .await
        .ok()?;
    (response.status == 200)
        .then(|| serde_json::from_slice(&response.body).ok())
        .flatten()
}

/// Starts three of our nodes (this program re-run as `kv_vs_etcd node --config FILE`) and waits
/// for them to agree on a leader.
async fn start_ours(
    dir: &Path,
    processes: &mut Processes,
    read_mode: ReadMode,
) -> Result<Cluster, String> {
    let ports = free_ports(6)?;
    let files = consensus::node::write_loopback_cluster_reading(dir, &ports, read_mode)
        .map_err(|e| format!("cannot write node configurations: {e}"))?;
    for file in &files {
        let log = std::fs::File::create(&file.log).map_err(|e| e.to_string())?;
        let child = Command::new(std::env::current_exe().map_err(|e| e.to_string())?)
            .arg("node")
            .arg("--config")
            .arg(&file.config)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .map_err(|e| format!("cannot start a node: {e}"))?;
        processes.0.push(child);
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        let mut ids = Vec::new();
        let mut leaders = Vec::new();
        for file in &files {
            let status = json(file.http, "GET", "/status", b"").await;
            ids.push(
                status
                    .as_ref()
                    .and_then(|s| s["node_id"].as_str().map(String::from)),
            );
            leaders.push(status.and_then(|s| s["leader"].as_str().map(String::from)));
        }
        if let Some(Some(leader)) = leaders.first()
            && leaders.iter().all(|l| l.as_ref() == Some(leader))
            && let Some(index) = ids.iter().position(|id| id.as_ref() == Some(leader))
        {
            return Ok(Cluster {
                system: System::Ours,
                leader: files[index].http,
                followers: (0..files.len())
                    .filter(|&i| i != index)
                    .map(|i| files[i].http)
                    .collect(),
            });
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Err(format!(
        "our nodes agreed on no leader within 30 s (logs in {})",
        dir.display()
    ))
}

/// `etcd` on the PATH, if any.
fn etcd_binary() -> Option<PathBuf> {
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|dir| dir.join("etcd"))
        .find(|candidate| candidate.is_file())
}

/// Starts a three-member etcd cluster in `dir` and waits for its leader.
async fn start_etcd(
    binary: &Path,
    dir: &Path,
    processes: &mut Processes,
) -> Result<Cluster, String> {
    let ports = free_ports(6)?;
    // Peer links as secure as ours: mutual TLS, certificates from a cluster CA of etcd's own.
    let names: Vec<String> = (0..3).map(|i| format!("e{i}")).collect();
    let certs = dir.join("certs");
    consensus::transport::tcp::tls::generate_certificates(&certs, &names)
        .map_err(|e| format!("cannot write etcd's peer certificates: {e}"))?;
    let peer = |i: usize| format!("https://127.0.0.1:{}", ports[3 + i]);
    let initial: Vec<String> = (0..3).map(|i| format!("e{i}={}", peer(i))).collect();
    let clients: Vec<SocketAddr> = (0..3)
        .map(|i| SocketAddr::from(([127, 0, 0, 1], ports[i])))
        .collect();
    for (i, client) in clients.iter().enumerate() {
        let log =
            std::fs::File::create(dir.join(format!("e{i}.log"))).map_err(|e| e.to_string())?;
        let tls = consensus::TlsFiles::in_dir(&certs, &names[i]);
        let child = Command::new(binary)
            .arg(format!("--name=e{i}"))
            .arg(format!(
                "--data-dir={}",
                dir.join(format!("e{i}")).display()
            ))
            .arg(format!("--listen-client-urls=http://{client}"))
            .arg(format!("--advertise-client-urls=http://{client}"))
            .arg(format!("--listen-peer-urls={}", peer(i)))
            .arg(format!("--initial-advertise-peer-urls={}", peer(i)))
            .arg(format!("--initial-cluster={}", initial.join(",")))
            .arg("--initial-cluster-state=new")
            .arg("--initial-cluster-token=kv-vs-etcd")
            .arg(format!("--peer-cert-file={}", tls.cert.display()))
            .arg(format!("--peer-key-file={}", tls.key.display()))
            .arg(format!("--peer-trusted-ca-file={}", tls.ca.display()))
            .arg("--peer-client-cert-auth")
            .arg("--logger=zap")
            .arg("--log-level=error")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .map_err(|e| format!("cannot start etcd: {e}"))?;
        processes.0.push(child);
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        let mut statuses = Vec::new();
        for &address in &clients {
            statuses.push(json(address, "POST", "/v3/maintenance/status", b"{}").await);
        }
        let leader = statuses
            .iter()
            .flatten()
            .find_map(|s| s["leader"].as_str().map(String::from));
        if let Some(leader) = leader
            && statuses.iter().all(Option::is_some)
            && let Some(index) = statuses.iter().position(|s| {
                s.as_ref().and_then(|s| s["header"]["member_id"].as_str()) == Some(&leader)
            })
        {
            return Ok(Cluster {
                system: System::Etcd,
                leader: clients[index],
                followers: (0..3).filter(|&i| i != index).map(|i| clients[i]).collect(),
            });
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Err(format!(
        "etcd found no leader within 30 s (logs in {})",
        dir.display()
    ))
}

/// What one phase measured.
struct Outcome {
    per_second: f64,
    latencies: Latencies,
    errors: u64,
}

/// Runs `clients` clients for `seconds`, client i on `targets[i % len]`, writing or reading.
async fn run_phase(
    system: System,
    targets: &[SocketAddr],
    write: bool,
    options: &Options,
) -> Outcome {
    let value: Arc<Vec<u8>> = Arc::new(vec![b'v'; options.value_bytes]);
    let until = Instant::now() + Duration::from_secs(options.seconds);
    let started = Instant::now();
    let tasks: Vec<_> = (0..options.clients)
        .map(|i| {
            let target = targets[i % targets.len()];
            let value = value.clone();
            let keys = options.keys;
            tokio::spawn(async move {
                let mut connection = Connection::new(target);
                let mut latencies = Latencies::new();
                let mut errors = 0u64;
                let mut n = i as u64;
                while Instant::now() < until {
                    // A cheap spread over the keys (Knuth's multiplicative hash).
                    n = n.wrapping_add(1);
                    let key = format!("k{}", n.wrapping_mul(2_654_435_761) % keys as u64);
                    let (method, path, body) = system.request(write, &key, &value);
                    let sent = Instant::now();
                    match connection.request(method, &path, &body, TIMEOUT).await {
                        // Our GET of a key never written answers 404, and that is an answer.
                        Ok(response)
                            if response.status == 200 || (!write && response.status == 404) =>
                        {
                            latencies.record(sent.elapsed())
                        }
                        _ => errors += 1,
                    }
                }
                (latencies, errors)
            })
        })
        .collect();
    let mut latencies = Latencies::new();
    let mut errors = 0;
    for task in tasks {
        if let Ok((mine, failed)) = task.await {
            latencies.merge(&mine);
            errors += failed;
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    Outcome {
        per_second: latencies.len() as f64 / elapsed,
        latencies,
        errors,
    }
}

/// The phases, by name: (targets, write).
fn phases(cluster: &Cluster) -> Vec<(&'static str, Vec<SocketAddr>, bool)> {
    vec![
        ("PUT → leader", vec![cluster.leader], true),
        ("PUT → follower", vec![cluster.followers[0]], true),
        ("PUT → any node", cluster.all(), true),
        ("GET → leader", vec![cluster.leader], false),
        ("GET → follower", vec![cluster.followers[0]], false),
        ("GET → any node", cluster.all(), false),
    ]
}

/// Our reads once per read mode, each on a fresh cluster (the others stopped): a table of
/// throughput and latency per read phase, with the ratio of throughput to `log` reads.
async fn compare_reads(dir: &Path, options: &Options) -> Result<u64, String> {
    let modes = [ReadMode::ReadIndex, ReadMode::Lease, ReadMode::Log];
    let mut rows = Vec::new();
    let mut errors = 0;
    for mode in modes {
        let mut processes = Processes::default();
        let mode_dir = dir.join(format!("reads-{}", mode.as_str()));
        std::fs::create_dir_all(&mode_dir).map_err(|e| e.to_string())?;
        let cluster = start_ours(&mode_dir, &mut processes, mode).await?;
        let fill = Options {
            seconds: 1,
            ..*options
        };
        run_phase(System::Ours, &cluster.all(), true, &fill).await;
        let mut outcomes = Vec::new();
        for (_, targets, write) in phases(&cluster).into_iter().filter(|p| !p.2) {
            let outcome = run_phase(System::Ours, &targets, write, options).await;
            errors += outcome.errors;
            outcomes.push(outcome);
        }
        rows.push((mode, outcomes));
    }
    println!();
    println!("Our linearizable reads by read_mode, each on a fresh cluster:");
    println!(
        "| read_mode | GET → leader req/s | p50 | p99 | GET → follower req/s | p50 | p99 | GET → any node req/s | p50 | p99 | ÷ log (leader, follower, any) |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|");
    let log_rates: Vec<f64> = rows
        .last()
        .map(|(_, outcomes)| outcomes.iter().map(|o| o.per_second).collect())
        .unwrap_or_default();
    for (mode, outcomes) in &rows {
        let mut line = format!("| {} |", mode.as_str());
        for outcome in outcomes {
            line.push_str(&format!(
                " {:.0} | {} | {} |",
                outcome.per_second,
                millis(outcome.latencies.quantile(0.5)),
                millis(outcome.latencies.quantile(0.99)),
            ));
        }
        let ratios: Vec<String> = outcomes
            .iter()
            .zip(&log_rates)
            .map(|(o, log)| format!("{:.2}×", o.per_second / log.max(1e-9)))
            .collect();
        line.push_str(&format!(" {} |", ratios.join(", ")));
        println!("{line}");
    }
    Ok(errors)
}

fn millis(duration: Duration) -> String {
    format!("{:.2} ms", duration.as_secs_f64() * 1e3)
}

/// One phase's figures in one round: throughput, and latency p50 and p99 in seconds.
#[derive(Clone, Copy)]
struct Figures {
    per_second: f64,
    p50: f64,
    p99: f64,
}

impl Figures {
    fn of(outcome: &Outcome) -> Self {
        Figures {
            per_second: outcome.per_second,
            p50: outcome.latencies.quantile(0.5).as_secs_f64(),
            p99: outcome.latencies.quantile(0.99).as_secs_f64(),
        }
    }
}

/// One round of one phase: ours, then etcd's when it runs.
#[derive(Clone, Copy)]
struct Round {
    ours: Figures,
    etcd: Option<Figures>,
}

/// How many times etcd's figure ours is (etcd's floored, so that a phase it failed entirely
/// still prints).
fn times(ours: f64, etcd: f64) -> f64 {
    ours / etcd.max(1e-9)
}

/// The middle value (the mean of the two middle ones for an even count); zero for none.
fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    match values.len() {
        0 => 0.0,
        n if n % 2 == 1 => values[n / 2],
        n => (values[n / 2 - 1] + values[n / 2]) / 2.0,
    }
}

fn print_header() {
    println!(
        "| load | {} req/s | p50 | p99 | etcd req/s | p50 | p99 | throughput ÷ etcd | p99 ÷ etcd |",
        System::Ours.name()
    );
    println!("|---|---|---|---|---|---|---|---|---|");
}

/// A phase's row: the medians of its rounds (one round: its figures), each ratio the median of
/// the rounds' ratios; etcd's columns hold dashes when etcd did not run.
fn print_row(name: &str, rounds: &[Round]) {
    let of = |pick: fn(&Round) -> f64| median(rounds.iter().map(pick).collect());
    let seconds = |value: f64| millis(Duration::from_secs_f64(value));
    let ours = format!(
        "| {name} | {:.0} | {} | {} |",
        of(|r| r.ours.per_second),
        seconds(of(|r| r.ours.p50)),
        seconds(of(|r| r.ours.p99)),
    );
    let etcd: Option<Vec<Figures>> = rounds.iter().map(|r| r.etcd).collect();
    match etcd {
        Some(etcd) if !etcd.is_empty() => {
            let pick = |f: fn(&Figures) -> f64| median(etcd.iter().map(f).collect());
            let ratio = |f: fn(&Figures) -> f64| {
                median(
                    rounds
                        .iter()
                        .zip(&etcd)
                        .map(|(r, e)| times(f(&r.ours), f(e)))
                        .collect(),
                )
            };
            println!(
                "{ours} {:.0} | {} | {} | {:.2}× | {:.2}× |",
                pick(|f| f.per_second),
                seconds(pick(|f| f.p50)),
                seconds(pick(|f| f.p99)),
                ratio(|f| f.per_second),
                ratio(|f| f.p99),
            );
        }
        _ => println!("{ours} – | – | – | – | – |"),
    }
}

async fn run(options: Options) -> Result<(), String> {
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let mut processes = Processes::default();
    let ours_dir = dir.path().join("ours");
    std::fs::create_dir_all(&ours_dir).map_err(|e| e.to_string())?;
    let ours = start_ours(&ours_dir, &mut processes, ReadMode::default()).await?;
    let etcd = match etcd_binary() {
        Some(binary) => {
            let etcd_dir = dir.path().join("etcd");
            std::fs::create_dir_all(&etcd_dir).map_err(|e| e.to_string())?;
            Some(start_etcd(&binary, &etcd_dir, &mut processes).await?)
        }
        None => {
            println!(
                "no `etcd` on the PATH (Debian: apt-get install etcd-server): running ours alone"
            );
            None
        }
    };
    let peers = if etcd.is_some() {
        "peer links on mutual TLS in both clusters"
    } else {
        "peer links on mutual TLS"
    };
    println!(
        "{} clients, {} keys, {}-byte values, {} s per phase, each cluster alone on this machine \
         while it is measured; {peers}",
        options.clients, options.keys, options.value_bytes, options.seconds
    );
    let ours_phases = phases(&ours);
    let etcd_phases = etcd.as_ref().map(phases);
    if options.rounds == 1 {
        print_header();
    }
    // Per phase, each round's figures: ours, and etcd's beside them.
    let mut measured: Vec<Vec<Round>> = vec![Vec::new(); ours_phases.len()];
    let mut errors = 0;
    for round in 1..=options.rounds {
        for (index, (name, targets, write)) in ours_phases.iter().enumerate() {
            let mine = run_phase(ours.system, targets, *write, &options).await;
            errors += mine.errors;
            let theirs = match etcd_phases.as_ref().map(|phases| &phases[index]) {
                Some((_, targets, write)) => {
                    let outcome = run_phase(System::Etcd, targets, *write, &options).await;
                    errors += outcome.errors;
                    Some(Figures::of(&outcome))
                }
                None => None,
            };
            measured[index].push(Round {
                ours: Figures::of(&mine),
                etcd: theirs,
            });
            if options.rounds == 1 {
                print_row(name, &measured[index]);
            }
        }
        if options.rounds > 1 {
            let ratios: Vec<String> = ours_phases
                .iter()
                .zip(&measured)
                .map(|((name, ..), rounds)| match &rounds[round - 1] {
                    Round {
                        ours,
                        etcd: Some(etcd),
                    } => format!("{name} {:.2}×", times(ours.per_second, etcd.per_second)),
                    Round { ours, etcd: None } => format!("{name} {:.0} req/s", ours.per_second),
                })
                .collect();
            println!("round {round} of {}: {}", options.rounds, ratios.join(", "));
        }
    }
    if options.rounds > 1 {
        println!("medians of the {} rounds:", options.rounds);
        print_header();
        for ((name, ..), rounds) in ours_phases.iter().zip(&measured) {
            print_row(name, rounds);
        }
    }
    if options.compare_reads {
        drop(processes); // both clusters stopped: each read mode runs alone
        errors += compare_reads(dir.path(), &options).await?;
    }
    if errors > 0 {
        return Err(format!("{errors} requests were not answered 200"));
    }
    Ok(())
}

fn main() -> ExitCode {
    let mut args = std::env::args().skip(1).peekable();
    if args.peek().is_some_and(|a| a == "node") {
        return consensus::node::main(args.skip(1).map(Into::into));
    }
    let options = match parse_options() {
        Ok(options) => options,
        Err(message) => {
            eprintln!("kv_vs_etcd: {message}");
            return ExitCode::from(2);
        }
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    match runtime.block_on(run(options)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("kv_vs_etcd: {message}");
            ExitCode::FAILURE
        }
    }
}
