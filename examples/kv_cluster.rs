//! The project's main demonstration: a local three-node replicated key-value cluster.
//!
//! `cargo run --release --example kv_cluster [-- --ops N --clients C --data-dir DIR
//! --algorithm raft|pbft|gpu_optimized_raft --nodes N --failovers K --rolling-restart]` starts
//! three (PBFT: four; the signing algorithms with a fresh key per node) `consensus-node`
//! processes (this program re-run as `kv_cluster node --config FILE`, so it needs no separately
//! built binary) over TCP on loopback with fjall logs,
//! waits for a leader, and runs a mixed workload (puts, gets, compare-and-swaps, deletes) through
//! every node with a progress bar. Meanwhile it SIGKILLs the leader `--failovers K` times (default
//! 1), spread over the run, restarting each killed node once a new leader is elected and waiting
//! for it to rejoin before the next kill; with `--rolling-restart` it instead stops every node in
//! turn with SIGTERM (a clean stop: a leader hands over first) and restarts it. Then it checks
//! that every acknowledged write is readable through every node and prints throughput, latency
//! (all requests, then reads and writes apart), the failover percentiles (leader killed → first
//! acknowledged write) or, for the rolling restart, the failed requests and the longest write
//! stall. It exits non-zero if any check fails (for the rolling restart: also if any request
//! failed).
//!
//! Each client keeps one HTTP connection alive to the node it is using (a new connection per
//! request cost as much as the request). A request whose connection is refused (its node is
//! stopped) was never sent, and one answered
//! 503 `stopping` was not acted on; the client sends either to the next node and does not count
//! it as failed. Any other request without a success
//! answer (an error status, a dropped connection, a timeout) is a failed request.
//!
//! Each client owns its keys and writes unique values, so it knows what every key must hold: the
//! last acknowledged value, or (after a request whose outcome is unknown: a timeout or a dropped
//! connection) one of the values of those requests.

use std::collections::{BTreeMap, BTreeSet};
use std::io::ErrorKind;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use consensus::node::client::{self, ClientError, Connection, HttpResponse};
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::Value;

// The benches' latency record: one way to compute percentiles for every program here.
#[path = "../benches/common/latency.rs"]
mod latency;
#[path = "../tests/common/ports.rs"]
mod ports;

use latency::Latencies;

// The nodes this binary runs (its `node` subcommand) allocate as `consensus-node` does; its load
// generator shares the allocator.
#[global_allocator]
static ALLOCATOR: consensus::node::NodeAllocator = consensus::node::NodeAllocator;

const CLIENT_TIMEOUT: Duration = Duration::from_secs(5);

struct Options {
    ops: usize,
    algorithm: consensus::Algorithm,
    nodes: Option<usize>,
    clients: usize,
    keys: usize,
    data_dir: Option<PathBuf>,
    failovers: usize,
    rolling_restart: bool,
}

fn parse_options() -> Result<Options, String> {
    let mut options = Options {
        ops: 20_000,
        algorithm: consensus::Algorithm::Raft,
        nodes: None,
        clients: 16,
        keys: 32,
        data_dir: None,
        failovers: 1,
        rolling_restart: false,
    };
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let mut value = || args.next().ok_or_else(|| format!("{flag} needs a value"));
        let number = |text: String| {
            text.parse::<usize>()
                .ok()
                .filter(|n| *n > 0)
                .ok_or_else(|| format!("{flag}: expected a positive number, got {text:?}"))
        };
        match flag.as_str() {
            "--ops" => options.ops = number(value()?)?,
            "--clients" => options.clients = number(value()?)?,
            "--keys" => options.keys = number(value()?)?,
            "--data-dir" => options.data_dir = Some(PathBuf::from(value()?)),
            "--nodes" => options.nodes = Some(number(value()?)?),
            "--failovers" => {
                let text = value()?;
                options.failovers = text.parse().map_err(|_| {
                    format!("--failovers: expected a number of leader kills, got {text:?}")
                })?;
            }
            "--rolling-restart" => options.rolling_restart = true,
            "--algorithm" => {
                let name = value()?;
                options.algorithm = consensus::Algorithm::parse(&name).ok_or_else(|| {
                    format!("--algorithm: expected raft, pbft or gpu_optimized_raft, got {name:?}")
                })?;
            }
            other => {
                return Err(format!(
                    "unexpected argument {other:?}; expected --ops N --clients C --keys K \
                     --data-dir DIR --algorithm raft|pbft|gpu_optimized_raft --nodes N \
                     --failovers K --rolling-restart"
                ));
            }
        }
    }
    Ok(options)
}

/// One node process and how to reach it.
struct Node {
    name: String,
    http: SocketAddr,
    config: PathBuf,
    log: PathBuf,
}

impl Node {
    fn spawn(&self) -> std::io::Result<Child> {
        let log = std::fs::File::options()
            .create(true)
            .append(true)
            .open(&self.log)?;
        Command::new(std::env::current_exe()?)
            .arg("node")
            .arg("--config")
            .arg(&self.config)
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
    }
}

/// Writes `count` node configurations for `algorithm` into `dir`.
fn configure(
    dir: &Path,
    count: usize,
    algorithm: consensus::Algorithm,
) -> Result<Vec<Node>, String> {
    let ports = ports::try_free_ports(2 * count).map_err(|e| format!("no free port: {e}"))?;
    let files = consensus::node::write_loopback_cluster_of(dir, &ports, algorithm)
        .map_err(|e| format!("cannot write node configurations in {}: {e}", dir.display()))?;
    let nodes = files
        .into_iter()
        .map(|f| Node {
            name: f.name,
            http: f.http,
            config: f.config,
            log: f.log,
        })
        .collect();
    Ok(nodes)
}

async fn call(address: SocketAddr, method: &str, path: &str, body: &[u8]) -> Option<HttpResponse> {
    client::request(address, method, path, body, CLIENT_TIMEOUT)
        .await
        .ok()
}

/// Waits until the nodes `among` agree on a leader that is one of them.
async fn agreed_leader(nodes: &[Node], among: &[usize], within: Duration) -> Option<usize> {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        let mut leaders = Vec::new();
        let mut ids = Vec::new();
        for &i in among {
            let status: Option<Value> = call(nodes[i].http, "GET", "/status", b"")
                .await
                .and_then(|r| serde_json::from_slice(&r.body).ok());
            leaders.push(
                status
                    .as_ref()
                    .and_then(|s| s["leader"].as_str().map(String::from)),
            );
            ids.push(
                status
                    .as_ref()
                    .and_then(|s| s["node_id"].as_str().map(String::from)),
            );
        }
        if let Some(Some(leader)) = leaders.first()
            && leaders.iter().all(|l| l.as_ref() == Some(leader))
            && let Some(position) = ids.iter().position(|id| id.as_ref() == Some(leader))
        {
            return Some(among[position]);
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    None
}

/// What one key may hold, as its owning client knows it.
#[derive(Clone, Default)]
struct KeyState {
    /// The last acknowledged value (`None`: absent).
    known: Option<String>,
    /// Values of requests whose outcome is unknown: any of them may have taken effect.
    uncertain: BTreeSet<Option<String>>,
}

impl KeyState {
    fn allows(&self, value: &Option<String>) -> bool {
        *value == self.known || self.uncertain.contains(value)
    }
}

/// A client's counters and findings.
#[derive(Default)]
struct ClientReport {
    /// Acknowledged requests' latencies, split: linearizable reads (`GET`) and writes (puts,
    /// compare-and-swaps, deletes), whose paths differ (a read takes no log entry). The
    /// summary's overall figures merge the two.
    read_latencies: Latencies,
    write_latencies: Latencies,
    /// Requests without a success answer: an error status, a dropped connection, a timeout.
    failed: usize,
    /// Connections refused (a stopped node): the request went to the next node instead.
    refused: usize,
    /// What the failed requests got, by kind.
    failures: BTreeMap<String, usize>,
    violations: Vec<String>,
    keys: Vec<(String, KeyState)>,
}

/// One SIGKILL of the leader: when, and when the first write invoked after it was acknowledged.
#[derive(Clone, Copy)]
struct Kill {
    at: Instant,
    first_write: Option<Instant>,
}

/// Shared between clients and the coordinator of the kills or restarts.
struct Shared {
    nodes: Vec<Node>,
    next_op: AtomicUsize,
    done: AtomicUsize,
    ops: usize,
    /// While set, clients go on past `ops`: the kills or restarts are not over yet.
    disrupting: AtomicBool,
    kills: Mutex<Vec<Kill>>,
    /// During a rolling restart: the last write acknowledgement and the longest gap between two.
    stall: Mutex<(Option<Instant>, Duration)>,
    recording_stalls: AtomicBool,
    progress: ProgressBar,
}

impl Shared {
    /// A client's write invoked at `started` was acknowledged now.
    fn write_acknowledged(&self, started: Instant) {
        let now = Instant::now();
        if let Some(kill) = self.kills.lock().unwrap().last_mut()
            && started > kill.at
        {
            kill.first_write.get_or_insert(now);
        }
        if self.recording_stalls.load(Ordering::Relaxed) {
            let mut stall = self.stall.lock().unwrap();
            if let Some(last) = stall.0 {
                stall.1 = stall.1.max(now.duration_since(last));
            }
            stall.0 = Some(now);
        }
    }
}

/// A small deterministic generator (xorshift64*): the workload mix needs no quality randomness.
struct Mix(u64);

impl Mix {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

fn value_of(response: &HttpResponse) -> Option<String> {
    (response.status == 200).then(|| response.text())
}

/// Sends a request through node `*node` on the client's kept-alive connection to it
/// (`connections`, one per node), moving on to the next node while connections are refused (a
/// stopped node: nothing was sent), and pausing briefly once every node refused. `None` when
/// the outcome is unknown (dropped connection, timeout).
async fn send(
    shared: &Shared,
    node: &mut usize,
    connections: &mut [Connection],
    (refused, outcome): (&mut usize, &mut String),
    request: (&str, &str, &[u8]),
) -> Option<HttpResponse> {
    let (method, path, body) = request;
    let count = shared.nodes.len();
    for attempt in 1..=count * 50 {
        let connection = &mut connections[*node];
        match connection.request(method, path, body, CLIENT_TIMEOUT).await {
            Ok(response) if response.status == 503 && response.text().contains("\"stopping\"") => {
                // The node is stopping and did nothing: as good as a refused connection. Its
                // connection is dropped before it closes it under a request.
                *connection = Connection::new(connection.address());
                *refused += 1;
                *node = (*node + 1) % count;
            }
            Ok(response) => {
                let mut text = response.text();
                text.truncate(80);
                *outcome = format!("status {}: {text}", response.status);
                return Some(response);
            }
            Err(ClientError::Io(error)) if error.kind() == ErrorKind::ConnectionRefused => {
                *refused += 1;
                *node = (*node + 1) % count;
                if attempt % count == 0 {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }
            Err(error) => {
                *outcome = error.to_string();
                return None;
            }
        }
    }
    *outcome = "every node refused connections".into();
    None
}

async fn run_client(shared: Arc<Shared>, id: usize, keys: usize) -> ClientReport {
    let mut report = ClientReport::default();
    let mut state: Vec<KeyState> = vec![KeyState::default(); keys];
    let mut mix = Mix(0x9e37_79b9_7f4a_7c15 ^ (id as u64 + 1));
    let mut node = id % shared.nodes.len();
    let mut connections: Vec<Connection> = shared
        .nodes
        .iter()
        .map(|n| Connection::new(n.http))
        .collect();
    let mut sequence = 0u64;
    while shared.next_op.fetch_add(1, Ordering::Relaxed) < shared.ops
        || shared.disrupting.load(Ordering::Relaxed)
    {
        let slot = (mix.next() % keys as u64) as usize;
        let key = format!("c{id}-k{slot}");
        let path = format!("/kv/{key}");
        let kind = mix.next() % 100;
        sequence += 1;
        let fresh = format!("c{id}-v{sequence}");
        let started = Instant::now();
        let entry = &mut state[slot];
        let mut outcome = String::new();
        let refused = (&mut report.refused, &mut outcome);
        let (answered, is_write) = if kind < 40 {
            let request = ("PUT", path.as_str(), fresh.as_bytes());
            match send(&shared, &mut node, &mut connections, refused, request)
                .await
                .map(|r| r.status)
            {
                Some(200) => {
                    entry.known = Some(fresh);
                    (true, true)
                }
                _ => {
                    entry.uncertain.insert(Some(fresh));
                    (false, true)
                }
            }
        } else if kind < 80 {
            match send(
                &shared,
                &mut node,
                &mut connections,
                refused,
                ("GET", &path, b""),
            )
            .await
            {
                Some(response) if response.status == 200 || response.status == 404 => {
                    let seen = value_of(&response);
                    if !entry.allows(&seen) {
                        report.violations.push(format!(
                            "read {key} = {seen:?}, expected {:?} or one of {:?}",
                            entry.known, entry.uncertain
                        ));
                    }
                    entry.known = seen;
                    (true, false)
                }
                _ => (false, false),
            }
        } else if kind < 95 {
            let body = serde_json::json!({ "from": entry.known, "to": fresh }).to_string();
            let cas_path = format!("{path}/cas");
            let request = ("POST", cas_path.as_str(), body.as_bytes());
            match send(&shared, &mut node, &mut connections, refused, request).await {
                Some(response) if response.status == 200 => {
                    entry.known = Some(fresh);
                    (true, true)
                }
                Some(response) if response.status == 409 => {
                    let current: Option<String> = serde_json::from_slice::<Value>(&response.body)
                        .ok()
                        .and_then(|v| v["current"].as_str().map(String::from));
                    if !entry.allows(&current) || entry.uncertain.is_empty() {
                        report.violations.push(format!(
                            "cas on {key} refused with current {current:?}, expected {:?}",
                            entry.known
                        ));
                    }
                    entry.known = current;
                    (true, true)
                }
                _ => {
                    entry.uncertain.insert(Some(fresh));
                    (false, true)
                }
            }
        } else {
            let request = ("DELETE", path.as_str(), &b""[..]);
            match send(&shared, &mut node, &mut connections, refused, request)
                .await
                .map(|r| r.status)
            {
                Some(200) => {
                    entry.known = None;
                    (true, true)
                }
                _ => {
                    entry.uncertain.insert(None);
                    (false, true)
                }
            }
        };
        if answered {
            let took = started.elapsed();
            if is_write {
                report.write_latencies.record(took);
                shared.write_acknowledged(started);
            } else {
                report.read_latencies.record(took);
            }
        } else {
            report.failed += 1;
            *report.failures.entry(outcome).or_default() += 1;
            node = (node + 1) % shared.nodes.len(); // that node may be down: try the next one
        }
        shared.done.fetch_add(1, Ordering::Relaxed);
        shared.progress.inc(1);
    }
    report.keys = state
        .into_iter()
        .enumerate()
        .map(|(slot, state)| (format!("c{id}-k{slot}"), state))
        .collect();
    report
}

fn stop_all(children: &mut [Option<Child>]) {
    for child in children.iter_mut().flatten() {
        let _ = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status();
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    for child in children.iter_mut() {
        if let Some(mut process) = child.take() {
            while Instant::now() < deadline && matches!(process.try_wait(), Ok(None)) {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = process.kill();
            let _ = process.wait();
        }
    }
}

/// What the coordinator did while the clients ran.
enum Disruption {
    /// Leader kills: the node killed, and how long until the survivors agreed on a new leader.
    Kills(Vec<(usize, Duration)>),
    /// Clean restarts: the node, whether it led when stopped, and how long its stop took.
    Rolling(Vec<(usize, bool, Duration)>),
}

type Children = Arc<Mutex<Vec<Option<Child>>>>;

/// SIGKILLs the leader `count` times, spread over the run (the k-th once k/(count+1) of the
/// operations are done); restarts each killed node once the survivors agree on a new leader,
/// and waits for it to rejoin before the next kill (three nodes tolerate one down at a time).
async fn kill_leaders(
    shared: &Shared,
    children: &Children,
    count: usize,
) -> Result<Vec<(usize, Duration)>, String> {
    let all: Vec<usize> = (0..shared.nodes.len()).collect();
    let mut killed = Vec::new();
    for round in 0..count {
        let due = shared.ops * (round + 1) / (count + 1);
        while shared.done.load(Ordering::Relaxed) < due {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let leader = agreed_leader(&shared.nodes, &all, Duration::from_secs(20))
            .await
            .ok_or("no agreed leader at the failover point")?;
        let at = Instant::now();
        if let Some(child) = children.lock().unwrap()[leader].as_mut() {
            child.kill().map_err(|e| e.to_string())?;
            let _ = child.wait();
        }
        shared.kills.lock().unwrap().push(Kill {
            at,
            first_write: None,
        });
        let name = &shared.nodes[leader].name;
        shared
            .progress
            .set_message(format!("killed leader {name} ({}/{count})", round + 1));
        let survivors: Vec<usize> = all.iter().copied().filter(|&i| i != leader).collect();
        agreed_leader(&shared.nodes, &survivors, Duration::from_secs(20))
            .await
            .ok_or("no new leader within 20 s of killing the old one")?;
        killed.push((leader, at.elapsed()));
        let restarted = shared.nodes[leader]
            .spawn()
            .map_err(|e| format!("cannot restart {name}: {e}"))?;
        children.lock().unwrap()[leader] = Some(restarted);
        shared.progress.set_message(format!("restarted {name}"));
        agreed_leader(&shared.nodes, &all, Duration::from_secs(30))
            .await
            .ok_or_else(|| format!("{name} did not rejoin within 30 s of its restart"))?;
    }
    Ok(killed)
}

/// Once a quarter of the operations are done, stops every node in turn with SIGTERM (a leader
/// hands over first), restarts it, and waits until it rejoins before stopping the next;
/// records the longest gap between write acknowledgements meanwhile.
async fn rolling_restart(
    shared: &Shared,
    children: &Children,
) -> Result<Vec<(usize, bool, Duration)>, String> {
    let all: Vec<usize> = (0..shared.nodes.len()).collect();
    while shared.done.load(Ordering::Relaxed) < shared.ops / 4 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    shared.recording_stalls.store(true, Ordering::Relaxed);
    let mut restarted = Vec::new();
    for node in 0..shared.nodes.len() {
        let leader = agreed_leader(&shared.nodes, &all, Duration::from_secs(30))
            .await
            .ok_or("no agreed leader before a restart")?;
        let name = &shared.nodes[node].name;
        shared.progress.set_message(format!("stopping {name}"));
        let stopping = Instant::now();
        let mut child = children.lock().unwrap()[node]
            .take()
            .ok_or_else(|| format!("{name} is not running"))?;
        let signalled = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status()
            .map_err(|e| format!("cannot signal {name}: {e}"))?;
        if !signalled.success() {
            return Err(format!("kill -TERM {name} failed"));
        }
        let deadline = stopping + Duration::from_secs(15);
        loop {
            match child.try_wait() {
                Ok(Some(_)) => break,
                Ok(None) if Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
                _ => {
                    let _ = child.kill();
                    return Err(format!("{name} did not stop within 15 s of SIGTERM"));
                }
            }
        }
        let down = stopping.elapsed();
        let spawned = shared.nodes[node]
            .spawn()
            .map_err(|e| format!("cannot restart {name}: {e}"))?;
        children.lock().unwrap()[node] = Some(spawned);
        shared.progress.set_message(format!("restarted {name}"));
        agreed_leader(&shared.nodes, &all, Duration::from_secs(30))
            .await
            .ok_or_else(|| format!("{name} did not rejoin within 30 s of its restart"))?;
        restarted.push((node, node == leader, down));
    }
    shared.recording_stalls.store(false, Ordering::Relaxed);
    Ok(restarted)
}

async fn cluster_run(options: Options, dir: &Path) -> Result<(), String> {
    let default_nodes = if options.algorithm == consensus::Algorithm::Pbft {
        4
    } else {
        3
    };
    let nodes = configure(
        dir,
        options.nodes.unwrap_or(default_nodes),
        options.algorithm,
    )?;
    let mut children: Vec<Option<Child>> = Vec::new();
    for node in &nodes {
        children.push(Some(
            node.spawn()
                .map_err(|e| format!("cannot start {}: {e}", node.name))?,
        ));
    }
    let children = Arc::new(Mutex::new(children));
    let outcome = workload(options, nodes, children.clone()).await;
    stop_all(&mut children.lock().unwrap());
    outcome.map_err(|error| format!("{error}\n(node logs are in {})", dir.display()))
}

async fn workload(
    options: Options,
    nodes: Vec<Node>,
    children: Arc<Mutex<Vec<Option<Child>>>>,
) -> Result<(), String> {
    let all: Vec<usize> = (0..nodes.len()).collect();
    let started = Instant::now();
    let leader = agreed_leader(&nodes, &all, Duration::from_secs(30))
        .await
        .ok_or("no leader within 30 s")?;
    println!(
        "{} nodes up ({}), leader {} elected in {:.2?}; running {} operations with {} clients",
        nodes.len(),
        options.algorithm.as_str(),
        nodes[leader].name,
        started.elapsed(),
        options.ops,
        options.clients
    );
    let progress = ProgressBar::new(options.ops as u64);
    progress.set_style(
        ProgressStyle::with_template("{bar:40} {pos}/{len} ops {per_sec} eta {eta} {msg}")
            .map_err(|e| e.to_string())?,
    );
    let shared = Arc::new(Shared {
        nodes,
        next_op: AtomicUsize::new(0),
        done: AtomicUsize::new(0),
        ops: options.ops,
        disrupting: AtomicBool::new(options.rolling_restart || options.failovers > 0),
        kills: Mutex::new(Vec::new()),
        stall: Mutex::new((None, Duration::ZERO)),
        recording_stalls: AtomicBool::new(false),
        progress: progress.clone(),
    });

    let coordinator = {
        let shared = shared.clone();
        let children = children.clone();
        let (rolling, failovers) = (options.rolling_restart, options.failovers);
        tokio::spawn(async move {
            let outcome = if rolling {
                rolling_restart(&shared, &children)
                    .await
                    .map(Disruption::Rolling)
            } else {
                kill_leaders(&shared, &children, failovers)
                    .await
                    .map(Disruption::Kills)
            };
            shared.disrupting.store(false, Ordering::Relaxed);
            if outcome.is_err() {
                // The run has failed: the clients stop after their current request.
                shared.next_op.fetch_max(shared.ops, Ordering::Relaxed);
            }
            outcome
        })
    };

    let workload_started = Instant::now();
    let clients: Vec<_> = (0..options.clients)
        .map(|id| tokio::spawn(run_client(shared.clone(), id, options.keys)))
        .collect();
    let mut reports = Vec::new();
    for client in clients {
        reports.push(client.await.map_err(|e| e.to_string())?);
    }
    let elapsed = workload_started.elapsed();
    progress.finish();
    let disruption = coordinator.await.map_err(|e| e.to_string())??;

    // Every acknowledged write must be readable through every node, the restarted one included.
    agreed_leader(&shared.nodes, &all, Duration::from_secs(30))
        .await
        .ok_or("the restarted node did not rejoin within 30 s")?;
    let mut violations: Vec<String> = reports.iter().flat_map(|r| r.violations.clone()).collect();
    let mut checked = 0;
    for report in &reports {
        for (key, state) in &report.keys {
            for node in &shared.nodes {
                let mut answer = None;
                let deadline = Instant::now() + Duration::from_secs(15);
                while answer.is_none() && Instant::now() < deadline {
                    answer = call(node.http, "GET", &format!("/kv/{key}"), b"")
                        .await
                        .filter(|r| r.status == 200 || r.status == 404);
                    if answer.is_none() {
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                }
                match answer {
                    Some(response) => {
                        let seen = value_of(&response);
                        if !state.allows(&seen) {
                            violations.push(format!(
                                "{key} on {}: {seen:?}, expected {:?} or one of {:?}",
                                node.name, state.known, state.uncertain
                            ));
                        }
                        checked += 1;
                    }
                    None => violations.push(format!("{key} on {}: no answer", node.name)),
                }
            }
        }
    }

    let (mut latencies, mut reads, mut writes) =
        (Latencies::new(), Latencies::new(), Latencies::new());
    for report in &reports {
        latencies.merge(&report.read_latencies);
        latencies.merge(&report.write_latencies);
        reads.merge(&report.read_latencies);
        writes.merge(&report.write_latencies);
    }
    let failed: usize = reports.iter().map(|r| r.failed).sum();
    let refused: usize = reports.iter().map(|r| r.refused).sum();
    let mut failures: BTreeMap<&str, usize> = BTreeMap::new();
    for (kind, count) in reports.iter().flat_map(|r| &r.failures) {
        *failures.entry(kind).or_default() += count;
    }
    println!("--- kv_cluster summary ---");
    println!(
        "operations:  {} ({} acknowledged, {failed} failed; {refused} refused connections or \
         `stopping` answers sent on to another node)",
        shared.done.load(Ordering::Relaxed),
        latencies.len(),
    );
    for (kind, count) in &failures {
        println!("  failed:    {count} × {kind}");
    }
    println!(
        "throughput:  {:.0} ops/s over {:.2?} ({} clients)",
        latencies.len() as f64 / elapsed.as_secs_f64(),
        elapsed,
        options.clients
    );
    println!(
        "latency:     (acknowledged) p50 {:.2?}  p99 {:.2?}  max {:.2?}",
        latencies.quantile(0.50),
        latencies.quantile(0.99),
        latencies.max()
    );
    for (name, split) in [("reads", &reads), ("writes", &writes)] {
        println!(
            "  {name:<7}    {} acknowledged, p50 {:.2?}  p99 {:.2?}",
            split.len(),
            split.quantile(0.50),
            split.quantile(0.99)
        );
    }
    let mut disruption_failed = None;
    match &disruption {
        Disruption::Kills(killed) if !killed.is_empty() => {
            let kills = shared.kills.lock().unwrap().clone();
            let mut to_write = Latencies::new();
            let mut elected = Latencies::new();
            for (kill, (_, agreed)) in kills.iter().zip(killed) {
                if let Some(at) = kill.first_write {
                    to_write.record(at.duration_since(kill.at));
                }
                elected.record(*agreed);
            }
            let names: Vec<&str> = killed
                .iter()
                .map(|(node, _)| shared.nodes[*node].name.as_str())
                .collect();
            println!(
                "failover:    SIGKILL of the leader × {} ({})",
                killed.len(),
                names.join(", ")
            );
            println!(
                "             leader killed → first acknowledged write: p50 {:.2?}  p99 {:.2?}  \
                 max {:.2?}",
                to_write.quantile(0.50),
                to_write.quantile(0.99),
                to_write.max()
            );
            println!(
                "             leader killed → new leader agreed:        p50 {:.2?}  p99 {:.2?}  \
                 max {:.2?}",
                elected.quantile(0.50),
                elected.quantile(0.99),
                elected.max()
            );
            let without_write = kills.iter().filter(|k| k.first_write.is_none()).count();
            if without_write > 0 {
                disruption_failed = Some(format!(
                    "{without_write} of {} kills saw no acknowledged write after them",
                    killed.len()
                ));
            }
        }
        Disruption::Kills(_) => println!("failover:    none (--failovers 0)"),
        Disruption::Rolling(restarted) => {
            let longest_stall = shared.stall.lock().unwrap().1;
            let steps: Vec<String> = restarted
                .iter()
                .map(|(node, was_leader, down)| {
                    let role = if *was_leader { "leader" } else { "follower" };
                    format!(
                        "{} ({role}, stopped in {down:.2?})",
                        shared.nodes[*node].name
                    )
                })
                .collect();
            println!(
                "rolling restart: {} nodes stopped with SIGTERM and restarted one at a time: {}; \
                 failed requests {failed}; longest write stall {longest_stall:.2?}",
                restarted.len(),
                steps.join(", ")
            );
            if failed > 0 {
                disruption_failed = Some(format!(
                    "{failed} requests failed during the rolling restart"
                ));
            }
        }
    }
    println!(
        "verified:    {checked} reads of {} keys across {} nodes, {} violations",
        reports.iter().map(|r| r.keys.len()).sum::<usize>(),
        shared.nodes.len(),
        violations.len()
    );
    if let Some(failure) = disruption_failed {
        Err(failure)
    } else if violations.is_empty() {
        Ok(())
    } else {
        for violation in violations.iter().take(20) {
            eprintln!("violation: {violation}");
        }
        Err(format!("{} violations", violations.len()))
    }
}

fn main() -> ExitCode {
    let mut args = std::env::args_os().skip(1).peekable();
    if args.peek().is_some_and(|a| a == "node") {
        return consensus::node::main(args.skip(1));
    }
    let options = match parse_options() {
        Ok(options) => options,
        Err(error) => {
            eprintln!("kv_cluster: {error}");
            return ExitCode::from(2);
        }
    };
    let temporary;
    let dir = match &options.data_dir {
        Some(dir) => {
            if let Err(error) = std::fs::create_dir_all(dir) {
                eprintln!("kv_cluster: {}: {error}", dir.display());
                return ExitCode::from(2);
            }
            dir.clone()
        }
        None => match tempfile::tempdir() {
            Ok(dir) => {
                temporary = dir;
                temporary.path().to_path_buf()
            }
            Err(error) => {
                eprintln!("kv_cluster: no temp dir: {error}");
                return ExitCode::FAILURE;
            }
        },
    };
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("kv_cluster: {error}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(cluster_run(options, &dir)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("kv_cluster: FAILED: {error}");
            ExitCode::FAILURE
        }
    }
}
