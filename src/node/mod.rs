//! `consensus-node`: a replicated key-value node over HTTP, built from the engine, the
//! [`kv::KvStore`] state machine and the [`http`] routes.
//!
//! The configuration file is the seed's TOML: the `[consensus]` table (read by
//! [`ConsensusConfig::from_toml_str`]) plus an `[http]` table with `address`, and optionally
//! `token_file` and `tls`. [`main`] is the whole command line (`consensus-node --config FILE
//! [--http ADDR]`; `consensus-node keygen FILE` to write a signing key; `consensus-node
//! gen-certs DIR --nodes A,B,C` to write a cluster CA and node certificates); the binary and
//! the `kv_cluster` example both call it.

pub mod client;
pub mod http;
mod join;
pub mod kv;
mod tls_listener;

use std::ffi::OsString;
use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use serde::Deserialize;

use crate::config::ConsensusConfig;
use crate::engine::ConsensusEngine;
use crate::error::{ConfigError, Error};
use crate::keys::{self, KeyFileError};

/// The global allocator of the binaries that run a node: `consensus-node`, and the `kv_cluster`
/// and `kv_vs_etcd` examples, each with
///
/// ```no_run
/// #[global_allocator]
/// static ALLOCATOR: consensus::node::NodeAllocator = consensus::node::NodeAllocator;
/// # fn main() {}
/// ```
///
/// A request crosses several threads (the HTTP worker, the driver, the persist thread, the peer
/// links), each allocating what the next one frees: the pattern mimalloc's per-thread heaps are
/// built for. Measured with `kv_vs_etcd` (ours alone, alternated with the same code on the system
/// allocator, twelve pairs): PUT through every node 1.076× (pairwise median),
/// through the leader 1.085×. An application embedding the library picks its own allocator: the
/// library never sets one, and `examples/bench` (the in-process comparison with openraft, whose
/// benchmark runs on the system allocator) keeps the system's so that it compares the libraries.
pub use mimalloc::MiMalloc as NodeAllocator;

/// Exit code for a bad command line or configuration.
pub const EXIT_CONFIG: u8 = 2;
/// Exit code for a failure while starting or running.
pub const EXIT_FAILURE: u8 = 1;
/// Exit code when the store failed: an fsync or a write failed while running (the node stops
/// at once and retries nothing), or the data directory is damaged at start.
pub const EXIT_STORAGE: u8 = 3;

/// Environment variable of a failpoint for tests: with `N`, the node's fjall store lets `N` syncs
/// succeed and fails every later one with EIO (see
/// [`FaultInjectingStore`](crate::storage::FaultInjectingStore)), as a dying disk would.
pub const FAILPOINT_FSYNC_ERROR_AFTER: &str = "CONSENSUS_FAILPOINT_FSYNC_ERROR_AFTER";

/// How long shutdown waits for in-flight requests to let go of the engine before stopping it
/// anyway.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// How long a stopping node answers key-value requests with 503 `stopping` (after handing
/// leadership over) before it closes its HTTP listener: clients about to connect learn to go
/// elsewhere, rather than having their connections reset when the listener closes.
const STOPPING_NOTICE: Duration = Duration::from_millis(100);

/// Why the node could not be configured or run.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    /// The command line is none of `--config FILE [--http ADDR] [--join HTTP_ADDR]`,
    /// `keygen FILE`, `gen-certs DIR --nodes A,B,C` and `verify-log DIR [--config FILE]`.
    #[error(
        "usage: {0}; expected: consensus-node --config FILE [--http ADDR] [--join HTTP_ADDR], \
         consensus-node keygen FILE, consensus-node gen-certs DIR --nodes NAME,NAME,..., or \
         consensus-node verify-log DIR [--config FILE]"
    )]
    Usage(String),
    /// `--join`: the member asked did not add this node.
    #[error("joining through {member}: {reason}")]
    Join {
        /// The member's HTTP address.
        member: SocketAddr,
        /// What it answered, or why it could not be asked.
        reason: String,
    },
    /// The configuration file is unreadable or invalid.
    #[error("{0}")]
    Config(#[from] ConfigError),
    /// The HTTP address is missing or not `ip:port`.
    #[error("invalid http.address {value:?}: {reason}")]
    HttpAddress {
        /// The offending value.
        value: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// `keygen` could not write the key file.
    #[error("{0}")]
    KeyFile(#[from] KeyFileError),
    /// The engine refused to start or failed.
    #[error("engine: {0}")]
    Engine(#[from] Error),
    /// The HTTP listener or the runtime failed.
    #[error("I/O: {0}")]
    Io(#[from] std::io::Error),
    /// The `[telemetry]` table (or an `OTEL_*` variable) is invalid.
    #[error("{0}")]
    Telemetry(#[from] crate::telemetry::TelemetryError),
}

impl NodeError {
    /// The process exit code for this error: 2 for configuration, 1 otherwise.
    pub fn exit_code(&self) -> u8 {
        match self {
            NodeError::Usage(_)
            | NodeError::Config(_)
            | NodeError::HttpAddress { .. }
            | NodeError::KeyFile(_)
            | NodeError::Telemetry(_)
            | NodeError::Engine(Error::Config(_) | Error::Unsupported { .. }) => EXIT_CONFIG,
            NodeError::Engine(Error::Storage(_)) => EXIT_STORAGE,
            _ => EXIT_FAILURE,
        }
    }
}

/// A node's whole configuration.
#[derive(Clone, Debug)]
pub struct NodeConfig {
    /// The engine's configuration (`[consensus]`).
    pub consensus: ConsensusConfig,
    /// Where the HTTP API listens (`[http] address`, or `--http`).
    pub http_address: SocketAddr,
    /// `[http] token_file`: a file holding the bearer token that writes and admin routes then
    /// require (401 without it); read when the node starts.
    pub http_token_file: Option<PathBuf>,
    /// `[http] tls = true`: serve the API over HTTPS (TLS 1.2 or 1.3) with the node's
    /// `[consensus.tls]` certificate and key, which must then be set. Clients verify it against
    /// the cluster CA (`ca.pem`); certificates from `gen-certs` name `localhost`, `127.0.0.1`
    /// and `::1` as well as the node.
    pub http_tls: bool,
    /// `[telemetry]`: OTLP export of traces (off unless an endpoint is named, here or in
    /// `OTEL_EXPORTER_OTLP_ENDPOINT`). Its `sample_ratio` and `max_traces_per_second`, when
    /// set, are the engine's [`ConsensusConfig::trace_sample_ratio`] and
    /// [`ConsensusConfig::trace_max_per_second`].
    pub telemetry: crate::telemetry::TelemetryConfig,
    /// `[runtime] worker_threads`: the threads of the node's tokio runtime, which serves the
    /// HTTP API (the engine's driver has a thread of its own besides). `None`, the default,
    /// takes one per core but the one the driver keeps busy (see
    /// [`NodeConfig::runtime_worker_threads`]). A node that shares the machine's cores with
    /// other nodes does better with fewer still: each extra idle worker is woken to steal
    /// work, and those wake-ups cost more than they save when the cores are already busy (see
    /// [`write_loopback_cluster`]).
    pub worker_threads: Option<usize>,
    /// `--join HTTP_ADDR`: join the running Raft cluster of which a member's API listens there
    /// (see `node/join.rs`; over HTTPS when this node serves HTTPS); `bootstrap_peers` must
    /// then be empty.
    pub join: Option<SocketAddr>,
}

#[derive(Deserialize)]
struct HttpDocument {
    http: Option<HttpTable>,
    telemetry: Option<crate::telemetry::TelemetryConfig>,
    runtime: Option<RuntimeTable>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RuntimeTable {
    worker_threads: Option<usize>,
}

/// The most `[runtime] worker_threads` accepted (tokio's own bound is 32,768; far past any
/// useful number for one node).
const MAX_WORKER_THREADS: usize = 1024;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct HttpTable {
    address: Option<String>,
    token_file: Option<PathBuf>,
    tls: Option<bool>,
}

/// The default worker threads of a node's runtime on `cores` cores: one per core but one, and
/// at least one. Under load the engine's driver thread (which polls for its next input while
/// busy) and its fsyncs occupy about a core, so a worker on every core only adds threads
/// that wake one another to steal work. On 2 cores, `kv_vs_etcd`'s nodes with one worker
/// each instead of two served more PUTs through every node in 15 of 19 alternated pairs
/// (pairwise medians 1.03-1.09) and about 1.1× the reads, and as many through one follower;
/// see `benches/FORWARDING_NOTES.md`.
fn default_worker_threads(cores: usize) -> usize {
    cores.saturating_sub(1).max(1)
}

/// The cores this process may run on (one when the platform cannot say).
fn this_machines_cores() -> usize {
    std::thread::available_parallelism().map_or(1, usize::from)
}

impl NodeConfig {
    /// The worker threads the node's runtime starts with: `[runtime] worker_threads` if set,
    /// else one per core of this machine but one, and at least one.
    pub fn runtime_worker_threads(&self) -> usize {
        self.worker_threads
            .unwrap_or_else(|| default_worker_threads(this_machines_cores()))
    }

    /// Reads `path`; `http_override` (from `--http`) replaces `[http] address`.
    pub fn load(path: &Path, http_override: Option<&str>) -> Result<Self, NodeError> {
        let text = std::fs::read_to_string(path).map_err(|error| ConfigError::File {
            path: path.display().to_string(),
            reason: error.to_string(),
        })?;
        Self::parse(&text, http_override)
    }

    /// Parses a configuration document.
    pub fn parse(text: &str, http_override: Option<&str>) -> Result<Self, NodeError> {
        let mut consensus = ConsensusConfig::from_toml_str(text)?;
        let document: HttpDocument = toml::from_str(text).map_err(|error| ConfigError::Toml {
            reason: format!("[http], [telemetry] or [runtime]: {}", error.message()),
        })?;
        let telemetry = document.telemetry.unwrap_or_default();
        if telemetry.sample_ratio.is_some() {
            consensus.trace_sample_ratio = telemetry.sample_ratio()?;
        }
        if let Some(cap) = telemetry.max_traces_per_second {
            consensus.trace_max_per_second = cap;
        }
        let worker_threads = document.runtime.and_then(|table| table.worker_threads);
        if let Some(threads) = worker_threads.filter(|n| !(1..=MAX_WORKER_THREADS).contains(n)) {
            return Err(NodeError::Config(ConfigError::Invalid {
                field: "runtime.worker_threads",
                value: threads.to_string(),
                reason: "must be within 1..=1024",
            }));
        }
        let (configured, http_token_file, http_tls) = match document.http {
            Some(table) => (table.address, table.token_file, table.tls.unwrap_or(false)),
            None => (None, None, false),
        };
        if http_tls && consensus.tls.is_none() {
            return Err(NodeError::Config(ConfigError::Invalid {
                field: "http.tls",
                value: "true".into(),
                reason: "HTTPS uses the node's [consensus.tls] cert and key, which are not set",
            }));
        }
        let address = http_override
            .map(str::to_string)
            .or(configured)
            .ok_or_else(|| NodeError::HttpAddress {
                value: String::new(),
                reason: "missing: set [http] address or pass --http",
            })?;
        let http_address = address.parse().map_err(|_| NodeError::HttpAddress {
            value: address.clone(),
            reason: "expected ip:port",
        })?;
        Ok(NodeConfig {
            consensus,
            http_address,
            http_token_file,
            http_tls,
            telemetry,
            worker_threads,
            join: None,
        })
    }
}

/// What the command line asks for.
#[derive(Debug, PartialEq, Eq)]
enum Command {
    /// `--config FILE [--http ADDR] [--join HTTP_ADDR]`: run a node.
    Run {
        config: PathBuf,
        http: Option<String>,
        join: Option<String>,
    },
    /// `keygen FILE`: write a fresh signing key.
    Keygen { path: PathBuf },
    /// `verify-log DIR [--config FILE]`: check a GPU-optimized Raft data directory offline.
    VerifyLog {
        dir: PathBuf,
        config: Option<PathBuf>,
    },
    /// `gen-certs DIR --nodes A,B,C`: write a cluster CA and node certificates.
    GenCerts { dir: PathBuf, nodes: Vec<String> },
}

/// Parses the command line (without the program name).
fn parse_args(args: &[OsString]) -> Result<Command, NodeError> {
    if args.first().is_some_and(|arg| arg == "keygen") {
        return match &args[1..] {
            [path] => Ok(Command::Keygen { path: path.into() }),
            [] => Err(NodeError::Usage("keygen needs a FILE".into())),
            [_, extra, ..] => Err(NodeError::Usage(format!(
                "unexpected argument {:?} after keygen FILE",
                extra.to_string_lossy()
            ))),
        };
    }
    if args.first().is_some_and(|arg| arg == "gen-certs") {
        return match &args[1..] {
            [dir, flag, nodes] if flag == "--nodes" => Ok(Command::GenCerts {
                dir: dir.into(),
                nodes: nodes
                    .to_string_lossy()
                    .split(',')
                    .map(|name| name.trim().to_string())
                    .collect(),
            }),
            _ => Err(NodeError::Usage(
                "gen-certs needs a DIR and --nodes NAME,NAME,...".into(),
            )),
        };
    }
    if args.first().is_some_and(|arg| arg == "verify-log") {
        return match &args[1..] {
            [dir] => Ok(Command::VerifyLog {
                dir: dir.into(),
                config: None,
            }),
            [dir, flag, config] if flag == "--config" => Ok(Command::VerifyLog {
                dir: dir.into(),
                config: Some(config.into()),
            }),
            _ => Err(NodeError::Usage(
                "verify-log needs a DIR, optionally followed by --config FILE".into(),
            )),
        };
    }
    let mut config = None;
    let mut http = None;
    let mut join = None;
    let mut rest = args.iter();
    while let Some(arg) = rest.next() {
        let flag = arg.to_string_lossy();
        let mut value = || {
            rest.next()
                .cloned()
                .ok_or_else(|| NodeError::Usage(format!("{flag} needs a value")))
        };
        match flag.as_ref() {
            "--config" => config = Some(PathBuf::from(value()?)),
            "--http" => http = Some(value()?.to_string_lossy().into_owned()),
            "--join" => join = Some(value()?.to_string_lossy().into_owned()),
            other => return Err(NodeError::Usage(format!("unexpected argument {other:?}"))),
        }
    }
    let config = config.ok_or_else(|| NodeError::Usage("--config is required".into()))?;
    Ok(Command::Run { config, http, join })
}

/// `verify-log DIR [--config FILE]`: checks every commit certificate of a stopped node's data
/// directory (against the validators of FILE when given, else those recorded in DIR). Prints
/// what it checked and exits 0, or prints the first index that does not check out and why and
/// exits 1 (2 for a bad command line or configuration).
fn verify_log_command(dir: &Path, config: Option<&Path>) -> ExitCode {
    let pinned = match config.map(ConsensusConfig::from_toml_file) {
        None => None,
        Some(Ok(config)) => match config.validator_keys() {
            Ok(keys) => Some(keys),
            Err(error) => {
                eprintln!("consensus-node: {error}");
                return ExitCode::from(EXIT_CONFIG);
            }
        },
        Some(Err(error)) => {
            eprintln!("consensus-node: {error}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    match crate::verify_log(dir, pinned.as_ref()) {
        Ok(report) => {
            println!(
                "{}: {} entries, certified through index {} by {} certificate(s) over {} \
                 validators; {} client signatures verified",
                dir.display(),
                report.entries,
                report.certified_through,
                report.certificates,
                report.validators,
                report.client_signatures
            );
            ExitCode::SUCCESS
        }
        Err(error) => {
            println!("{}: {error}", dir.display());
            ExitCode::from(EXIT_FAILURE)
        }
    }
}

/// `keygen FILE`: writes a fresh key to `path` and prints its public key in hex, alone, on
/// stdout, for the other members' validators tables.
fn keygen(path: &Path) -> Result<(), NodeError> {
    let public_key = keys::generate_key_file(path)?;
    let mut stdout = std::io::stdout().lock();
    writeln!(stdout, "{}", keys::public_key_hex(&public_key))?;
    stdout.flush()?;
    Ok(())
}

/// `gen-certs DIR --nodes A,B`: writes the cluster CA (or reuses the one in DIR) and each node's
/// certificate and key (see [`generate_certificates`]), and prints each node's
/// `[consensus.tls]` table.
///
/// [`generate_certificates`]: crate::transport::tcp::tls::generate_certificates
fn gen_certs(dir: &Path, nodes: &[String]) -> Result<(), NodeError> {
    let written =
        crate::transport::tcp::tls::generate_certificates(dir, nodes).map_err(ConfigError::from)?;
    let mut stdout = std::io::stdout().lock();
    writeln!(stdout, "cluster CA: {}", dir.join("ca.pem").display())?;
    for files in written {
        writeln!(
            stdout,
            "{}: [consensus.tls] cert = \"{}\", key = \"{}\", ca = \"{}\"",
            files.node,
            files.cert.display(),
            files.key.display(),
            dir.join("ca.pem").display()
        )?;
    }
    stdout.flush()?;
    Ok(())
}

/// The files of one member of a loopback cluster written by [`write_loopback_cluster`].
#[derive(Clone, Debug)]
pub struct LoopbackNodeFiles {
    /// The node's name (`node-1`, ...).
    pub name: String,
    /// Where its HTTP API listens.
    pub http: SocketAddr,
    /// Its TOML configuration file.
    pub config: PathBuf,
    /// Where a runner may send its stderr.
    pub log: PathBuf,
}

/// Writes the configurations of a cluster on 127.0.0.1 into `dir`: one node per pair of
/// `ports` (the first half are the peer ports, the second half the HTTP ports), peers named
/// `node-N@127.0.0.1:PORT`, a 150 ms election timeout, 50 ms heartbeats, a 2 s request deadline
/// and a fjall data dir `dir/node-N`.
///
/// The nodes share this machine's cores, so each takes its share of them and no more: a runtime
/// of `cores / nodes` worker threads (at least one), and a driver that parks at once when idle
/// (`driver_spin_us = 0`) instead of polling a core that another node or a client needs. On 2
/// cores under the `kv_cluster` load (clients on every node) these served 1.09× the operations
/// of a worker per core and a 150 µs poll per node; see
/// `benches/FORWARDING_NOTES.md`. For the same reason a leader gathers proposals longer after
/// a write of several entries than the default linger over TCP does (50 µs an entry, at most
/// 600 µs): 70 µs for each entry it carried and at most 1 ms (`leader_linger_us = 1000`,
/// `leader_linger_per_entry_us = 70`): fewer, fuller rounds under many clients, a short wait
/// under a few, and none for a lone client. Under the `kv_cluster` load this served 1.06× the
/// operations of a fixed 200 µs pairwise (medians of five alternated runs 12,868 and 11,058
/// ops/s), at 4 clients 0.95×, both when lingers ran on tokio's millisecond timer.
///
/// `[http]` is the file's last table, so that lines appended to it (`tls = true`, a
/// `token_file`) land there.
///
/// Peers talk mutual TLS: a cluster CA and node
/// certificates are written to `dir/certs` (as `consensus-node gen-certs` would) and named in
/// each node's `[consensus.tls]`. Used by the `kv_cluster` example and the node tests.
pub fn write_loopback_cluster(
    dir: &Path,
    ports: &[u16],
) -> std::io::Result<Vec<LoopbackNodeFiles>> {
    write_loopback_cluster_of(dir, ports, crate::Algorithm::Raft)
}

/// [`write_loopback_cluster`] for `algorithm`. For the algorithms that sign (PBFT,
/// GPU-optimized Raft) it also writes a fresh key file per node (`<node>.key`), names it in the
/// node's `key_file`, and gives every node the `[consensus.validators]` table of all their
/// public keys; PBFT nodes also get a 500 ms view-change timeout and Byzantine detection.
pub fn write_loopback_cluster_of(
    dir: &Path,
    ports: &[u16],
    algorithm: crate::Algorithm,
) -> std::io::Result<Vec<LoopbackNodeFiles>> {
    write_loopback_files(
        dir,
        ports,
        algorithm,
        crate::ReadMode::default(),
        ports.len() / 2,
        true,
    )
}

/// [`write_loopback_cluster`] with reads served by `read_mode` (see
/// [`ConsensusConfig::read_mode`](crate::ConsensusConfig::read_mode)), and the engine's and
/// runtime's defaults instead of a share of the cores: the `kv_vs_etcd` example compares the
/// modes side by side with it, and etcd's members beside them run with their defaults too.
/// (Its phases that load one node gain from the defaults: with the shared-core settings a
/// leader alone served 0.8× the writes.)
pub fn write_loopback_cluster_reading(
    dir: &Path,
    ports: &[u16],
    read_mode: crate::ReadMode,
) -> std::io::Result<Vec<LoopbackNodeFiles>> {
    write_loopback_files(
        dir,
        ports,
        crate::Algorithm::Raft,
        read_mode,
        ports.len() / 2,
        false,
    )
}

/// [`write_loopback_cluster`] where only the first `founders` nodes form the cluster (each
/// names the other founders in `bootstrap_peers`); the others have no `bootstrap_peers` and
/// join it with `consensus-node --join` (their certificates come from the same CA). For
/// GPU-optimized Raft a founder's validators table names the founders, and a joiner's itself
/// alone: it learns the members' keys from the log.
pub fn write_loopback_cluster_with_joiners(
    dir: &Path,
    ports: &[u16],
    founders: usize,
    algorithm: crate::Algorithm,
) -> std::io::Result<Vec<LoopbackNodeFiles>> {
    write_loopback_files(
        dir,
        ports,
        algorithm,
        crate::ReadMode::default(),
        founders,
        true,
    )
}

fn write_loopback_files(
    dir: &Path,
    ports: &[u16],
    algorithm: crate::Algorithm,
    read_mode: crate::ReadMode,
    founders: usize,
    share_cores: bool,
) -> std::io::Result<Vec<LoopbackNodeFiles>> {
    let size = ports.len() / 2;
    let names: Vec<String> = (1..=size).map(|i| format!("node-{i}")).collect();
    // See `write_loopback_cluster` for why nodes that share the cores take these.
    let (spin_line, runtime_table) = if share_cores {
        let worker_threads = (this_machines_cores() / size.max(1)).max(1);
        (
            "driver_spin_us = 0\nleader_linger_us = 1000\nleader_linger_per_entry_us = 70\n",
            format!("[runtime]\nworker_threads = {worker_threads}\n\n"),
        )
    } else {
        ("", String::new())
    };
    let certs = dir.join("certs");
    crate::transport::tcp::tls::generate_certificates(&certs, &names)
        .map_err(std::io::Error::other)?;
    let signed = algorithm.signs_messages();
    let mut public_keys = Vec::new();
    if signed {
        for name in &names {
            let public = keys::generate_key_file(dir.join(format!("{name}.key")))
                .map_err(std::io::Error::other)?;
            public_keys.push(format!(
                "\"{name}\" = \"{}\"\n",
                keys::public_key_hex(&public)
            ));
        }
    }
    let mut nodes = Vec::new();
    for (i, name) in names.iter().enumerate() {
        let mut validators = String::new();
        if signed {
            validators.push_str("\n[consensus.validators]\n");
            let table: &[String] = if i < founders {
                &public_keys[..founders.min(size)]
            } else {
                &public_keys[i..=i]
            };
            validators.extend(table.iter().map(String::as_str));
        }
        let peers: Vec<String> = (0..founders.min(size))
            .filter(|&j| j != i && i < founders)
            .map(|j| format!("\"{}@127.0.0.1:{}\"", names[j], ports[j]))
            .collect();
        let http: SocketAddr = ([127, 0, 0, 1], ports[size + i]).into();
        let mut signing = String::new();
        if signed {
            let key = dir.join(format!("{name}.key"));
            signing.push_str(&format!("key_file = \"{}\"\n", key.display()));
        }
        if algorithm == crate::Algorithm::Pbft {
            signing.push_str("view_change_timeout_ms = 500\nbyzantine_fault_tolerance = true\n");
        }
        let tls = crate::config::TlsFiles::in_dir(&certs, name);
        let tls = format!(
            "\n[consensus.tls]\ncert = \"{}\"\nkey = \"{}\"\nca = \"{}\"\n",
            tls.cert.display(),
            tls.key.display(),
            tls.ca.display()
        );
        let text = format!(
            "[consensus]\nalgorithm = \"{}\"\nnode_id = \"{name}\"\nbind_address = \"127.0.0.1:{}\"\n\
             bootstrap_peers = [{}]\nelection_timeout_ms = 150\nheartbeat_interval_ms = 50\n\
             request_timeout_ms = 2000\nread_mode = \"{}\"\nstate_dir = \"{}\"\n{spin_line}\
             {signing}{tls}{validators}\n{runtime_table}[http]\naddress = \"{http}\"\n",
            algorithm.as_str(),
            ports[i],
            peers.join(", "),
            read_mode.as_str(),
            dir.join(name).display(),
        );
        let config = dir.join(format!("{name}.toml"));
        std::fs::write(&config, text)?;
        let log = dir.join(format!("{name}.log"));
        nodes.push(LoopbackNodeFiles {
            name: name.clone(),
            http,
            config,
            log,
        });
    }
    Ok(nodes)
}

/// The command line: parses `args` (without the program name), runs the node until SIGTERM or
/// Ctrl-C, and returns the exit code (2 for a bad command line or configuration, with a
/// one-line message on stderr). `keygen FILE` writes a key file instead (see
/// [`keys::generate_key_file`]) and prints its public key in hex on stdout.
pub fn main(args: impl IntoIterator<Item = OsString>) -> ExitCode {
    let args: Vec<OsString> = args.into_iter().collect();
    let fail = |error: NodeError| {
        eprintln!("consensus-node: {error}");
        ExitCode::from(error.exit_code())
    };
    let config = match parse_args(&args) {
        Err(error) => return fail(error),
        Ok(Command::VerifyLog { dir, config }) => {
            return verify_log_command(&dir, config.as_deref());
        }
        Ok(Command::Keygen { path }) => {
            return keygen(&path).map_or_else(fail, |()| ExitCode::SUCCESS);
        }
        Ok(Command::GenCerts { dir, nodes }) => {
            return gen_certs(&dir, &nodes).map_or_else(fail, |()| ExitCode::SUCCESS);
        }
        Ok(Command::Run { config, http, join }) => {
            match NodeConfig::load(&config, http.as_deref()) {
                Ok(mut config) => match join.map(|join| join.parse::<SocketAddr>()) {
                    None => config,
                    Some(Ok(member)) => {
                        config.join = Some(member);
                        config
                    }
                    Some(Err(_)) => {
                        return fail(NodeError::Usage(
                            "--join needs a member's HTTP address as ip:port".into(),
                        ));
                    }
                },
                Err(error) => return fail(error),
            }
        }
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(config.runtime_worker_threads())
        .enable_all()
        .build();
    let runtime = match runtime {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("consensus-node: cannot start the runtime: {error}");
            return ExitCode::from(EXIT_FAILURE);
        }
    };
    let _export = match install_subscriber(&config, runtime.handle()) {
        Ok(export) => export,
        Err(error) => return fail(error),
    };
    match runtime.block_on(run(config, shutdown_signal())) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("consensus-node: {error}");
            ExitCode::from(error.exit_code())
        }
    }
}

/// Installs the node's subscriber: log lines on stderr (`RUST_LOG`, default `info`) and, when
/// `[telemetry]` or `OTEL_EXPORTER_OTLP_ENDPOINT` names a collector, the OTLP export of the
/// engine's spans (targets under `consensus`, `INFO` and up). The guard flushes the export when
/// dropped, after the node stopped.
fn install_subscriber(
    config: &NodeConfig,
    runtime: &tokio::runtime::Handle,
) -> Result<Option<crate::telemetry::OtlpGuard>, NodeError> {
    use tracing_subscriber::Layer;
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Spans are not log lines: the log filter keeps every span out, so that only the exporter
    // records them.
    let logs = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_filter(filter)
        .with_filter(tracing_subscriber::filter::filter_fn(|metadata| {
            !metadata.is_span()
        }));
    let export = config.telemetry.resolve(&config.consensus.node_id)?;
    match export {
        None => {
            let _ = tracing_subscriber::registry().with(logs).try_init();
            Ok(None)
        }
        Some(export) => {
            let (layer, guard) = export.layer(runtime.clone())?;
            let _ = tracing_subscriber::registry()
                .with(logs)
                .with(layer)
                .try_init();
            tracing::info!(
                endpoint = %export.traces_url,
                service = %export.service_name,
                sample_ratio = export.sample_ratio,
                "telemetry: exporting traces over OTLP/HTTP"
            );
            Ok(Some(guard))
        }
    }
}

/// Reads the bearer token of `[http] token_file`: the file's text, trimmed; an unreadable or
/// empty file is a configuration error.
fn read_token(path: &Path) -> Result<http::BearerToken, NodeError> {
    let text = std::fs::read_to_string(path).map_err(|error| ConfigError::File {
        path: path.display().to_string(),
        reason: error.to_string(),
    })?;
    let token = text.trim();
    if token.is_empty() || token.chars().any(char::is_whitespace) {
        return Err(NodeError::Config(ConfigError::Invalid {
            field: "http.token_file",
            value: path.display().to_string(),
            reason: "the file must hold one token: non-empty, without spaces",
        }));
    }
    Ok(http::BearerToken::new(token))
}

/// The fjall store wrapped in a [`FaultInjectingStore`](crate::storage::FaultInjectingStore)
/// when [`FAILPOINT_FSYNC_ERROR_AFTER`] is set; `None` otherwise.
fn failpoint_store(
    config: &ConsensusConfig,
) -> Result<Option<crate::storage::FaultInjectingStore<crate::storage::FjallLogStore>>, NodeError> {
    let Ok(value) = std::env::var(FAILPOINT_FSYNC_ERROR_AFTER) else {
        return Ok(None);
    };
    let invalid = |reason: &'static str| {
        NodeError::Config(ConfigError::Invalid {
            field: FAILPOINT_FSYNC_ERROR_AFTER,
            value: value.clone(),
            reason,
        })
    };
    let syncs: u64 = value
        .trim()
        .parse()
        .map_err(|_| invalid("expected a number of syncs"))?;
    let dir = config
        .persistent_state
        .as_ref()
        .ok_or_else(|| invalid("the failpoint needs a state_dir"))?;
    tracing::warn!(
        syncs,
        "failpoint armed: every sync after the first {syncs} fails with EIO"
    );
    let store = crate::storage::FjallLogStore::open(dir, crate::storage::SyncPolicy::EveryBatch)
        .map_err(|error| NodeError::Engine(Error::Storage(error)))?;
    Ok(Some(
        crate::storage::FaultInjectingStore::new(store).fail_syncs_after(syncs),
    ))
}

/// Resolves on SIGTERM or Ctrl-C.
pub async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut terminate) => {
                tokio::select! {
                    _ = terminate.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
            }
            Err(error) => {
                tracing::warn!(%error, "cannot watch SIGTERM; only Ctrl-C stops the node");
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// Why a running node stops.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Stop {
    /// SIGTERM, Ctrl-C, or the caller's shutdown future.
    Asked,
    /// The store failed (see [`ConsensusEngine::storage_failed`]).
    StoreFailed,
    /// A committed membership left this node out (see [`ConsensusEngine::removed`]).
    Removed(u64),
}

/// Runs a node until `shutdown` resolves, then stops it so that clients never notice: a
/// leader hands leadership to its most caught-up voter, new key-value requests are answered
/// 503 `stopping` (nothing was done: send it to another node) for 100 ms, then the
/// HTTP listener closes, in-flight requests finish (each bounded by the request deadline), and
/// the engine stops. A Raft node that a committed membership leaves out stops the same way on
/// its own (logging that it was removed, and at which index), and `run` returns `Ok`.
///
/// The TLS files of `[consensus.tls]` are read once, here, and serve both the peer
/// connections ([`ConsensusEngine::with_peer_tls`]) and, with `tls = true` under `[http]`, the
/// HTTP listener. An algorithm that signs its messages then loads this node's signing identity
/// ([`ConsensusConfig::signing_identity`]), so that a missing, unreadable or mismatched key is
/// the error reported before anything is logged or the engine is built.
pub async fn run(
    mut config: NodeConfig,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), NodeError> {
    // Read once: the same identity secures the peer connections and, with `tls = true` under
    // `[http]`, the HTTP listener.
    let peer_tls = match &config.consensus.tls {
        Some(files) => Some(files.load().map_err(ConfigError::from)?),
        None => None,
    };
    let https = peer_tls.clone().filter(|_| config.http_tls);
    let join_over = https.as_ref().map(client::Https::as_peer);
    let joined = match config.join {
        Some(member) => Some((
            member,
            join::prepare(&mut config.consensus, member, join_over.as_ref()).await?,
        )),
        None => None,
    };
    if config.consensus.algorithm.signs_messages() {
        let identity = config.consensus.signing_identity()?;
        tracing::info!(
            public_key = %keys::public_key_hex(&identity.signing_key.verifying_key()),
            validators = identity.validators.len(),
            "signing key loaded"
        );
    }
    if config.consensus.persistent_state.is_none() {
        tracing::warn!(
            "no state_dir: the log lives in memory and a restarted node starts empty; \
             set state_dir for a durable node"
        );
    }
    let token = match &config.http_token_file {
        Some(path) => Some(read_token(path)?),
        None => None,
    };
    let mut engine = ConsensusEngine::new(config.consensus.clone())?;
    if let Some(tls) = peer_tls {
        engine = engine.with_peer_tls(tls);
    }
    if let Some(store) = failpoint_store(&config.consensus)? {
        engine = engine.with_log_store(store);
    }
    engine.set_state_machine(kv::KvStore::new())?;
    let listener = tokio::net::TcpListener::bind(config.http_address).await?;
    engine.start().await?;
    if let Some((member, view)) = &joined {
        join::ask_to_be_added(
            &config.consensus,
            *member,
            join_over.as_ref(),
            view,
            token.as_ref().map(|t| t.text()),
        )
        .await?;
    }
    let engine = Arc::new(engine);
    tracing::info!(
        node = %config.consensus.node_id,
        id = %engine.node_id(),
        raft = %config.consensus.bind_address,
        http = %listener.local_addr()?,
        https = https.is_some(),
        "node started"
    );
    let stopping = Arc::new(AtomicBool::new(false));
    let (drained, drain) = tokio::sync::oneshot::channel::<()>();
    let hand_over = {
        let (engine, stopping) = (engine.clone(), stopping.clone());
        tokio::spawn(async move {
            let reason = tokio::select! {
                () = shutdown => Stop::Asked,
                () = engine.storage_failed() => Stop::StoreFailed,
                index = engine.removed() => Stop::Removed(index),
            };
            stopping.store(true, Ordering::Relaxed);
            if reason == Stop::StoreFailed {
                // The driver is gone: nothing to hand over; stop serving at once.
                tracing::error!("the store failed: the node stops");
            } else if let Stop::Removed(index) = reason {
                // No longer a member: nothing to hand over (a removed leader stepped down).
                tracing::warn!(
                    index,
                    "removed from the cluster by the membership committed at \
                    this index: the node stops"
                );
                tokio::time::sleep(STOPPING_NOTICE).await;
            } else {
                tracing::info!("stopping: handing over and sending clients elsewhere");
                engine.hand_over_leadership().await;
                tokio::time::sleep(STOPPING_NOTICE).await;
            }
            let _ = drained.send(());
        })
    };
    let mut app = http::router(engine.clone()).layer(axum::middleware::from_fn_with_state(
        stopping,
        http::refuse_while_stopping,
    ));
    if let Some(token) = token {
        app = app.layer(axum::middleware::from_fn_with_state(
            token,
            http::require_token,
        ));
    }
    let drained = async {
        let _ = drain.await;
    };
    let served = match https {
        Some(tls) => {
            let listener = tls_listener::TlsListener::new(listener, tls.serving_config());
            axum::serve(listener, app)
                .with_graceful_shutdown(drained)
                .await
        }
        None => {
            axum::serve(without_nagle(listener), app)
                .with_graceful_shutdown(drained)
                .await
        }
    };
    hand_over.abort(); // done already, unless serving ended on its own
    let _ = hand_over.await;
    tracing::info!("HTTP stopped; stopping the engine");
    let mut engine = engine;
    let deadline = tokio::time::Instant::now() + SHUTDOWN_GRACE;
    let stopped = loop {
        match Arc::try_unwrap(engine) {
            Ok(mut owned) => break owned.stop().await,
            Err(shared) if tokio::time::Instant::now() < deadline => {
                engine = shared;
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            Err(_) => {
                // Dropping the last handle still asks the driver to stop.
                tracing::warn!("requests still hold the engine; leaving it to stop on exit");
                break Ok(());
            }
        }
    };
    served?;
    stopped?;
    tracing::info!("node stopped");
    Ok(())
}

/// The plain-HTTP listener: its connections send without Nagle's algorithm, as the HTTPS
/// listener's do (axum's own leaves it on), so that a response written while the one before
/// is unacknowledged does not wait for the client's delayed acknowledgement.
fn without_nagle(
    listener: tokio::net::TcpListener,
) -> impl axum::serve::Listener<Io = tokio::net::TcpStream, Addr = std::net::SocketAddr> {
    use axum::serve::ListenerExt;
    listener.tap_io(|stream| {
        if let Err(error) = stream.set_nodelay(true) {
            tracing::debug!(%error, "could not set TCP_NODELAY on an HTTP connection");
        }
    })
}

#[cfg(all(test, feature = "gpu", feature = "server"))]
mod fuzz;

#[cfg(test)]
mod tests {
    use super::*;

    const CONFIG: &str = r#"
[consensus]
node_id = "a"
bind_address = "127.0.0.1:7001"
bootstrap_peers = ["b@127.0.0.1:7002"]

[http]
address = "127.0.0.1:8001"
"#;

    fn args(list: &[&str]) -> Vec<OsString> {
        list.iter().map(OsString::from).collect()
    }

    #[test]
    fn reads_both_tables_and_the_override_wins() {
        let config = NodeConfig::parse(CONFIG, None).unwrap();
        assert_eq!(config.http_address, "127.0.0.1:8001".parse().unwrap());
        assert_eq!(config.consensus.node_id, "a");
        let config = NodeConfig::parse(CONFIG, Some("127.0.0.1:9000")).unwrap();
        assert_eq!(config.http_address.port(), 9000);
    }

    #[tokio::test]
    async fn plain_http_connections_send_without_nagle() {
        use axum::serve::Listener;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let mut listener = without_nagle(listener);
        let client = tokio::net::TcpStream::connect(address);
        let ((accepted, _), client) = tokio::join!(listener.accept(), client);
        client.unwrap();
        assert!(accepted.nodelay().unwrap());
    }

    #[test]
    fn the_runtime_takes_a_worker_per_core_but_the_drivers_unless_told() {
        for (cores, workers) in [(0, 1), (1, 1), (2, 1), (3, 2), (16, 15)] {
            assert_eq!(default_worker_threads(cores), workers, "{cores} cores");
        }
        let unset = NodeConfig::parse(CONFIG, None).unwrap();
        assert!(unset.runtime_worker_threads() >= 1);
        assert!(unset.runtime_worker_threads() <= this_machines_cores());
        let four = format!("{CONFIG}\n[runtime]\nworker_threads = 4\n");
        assert_eq!(
            NodeConfig::parse(&four, None)
                .unwrap()
                .runtime_worker_threads(),
            4
        );
    }

    #[test]
    fn the_runtime_table_sets_the_worker_threads_within_bounds() {
        assert_eq!(
            NodeConfig::parse(CONFIG, None).unwrap().worker_threads,
            None
        );
        let two = format!("{CONFIG}\n[runtime]\nworker_threads = 2\n");
        assert_eq!(
            NodeConfig::parse(&two, None).unwrap().worker_threads,
            Some(2)
        );
        let most = format!("{CONFIG}\n[runtime]\nworker_threads = {MAX_WORKER_THREADS}\n");
        assert_eq!(
            NodeConfig::parse(&most, None).unwrap().worker_threads,
            Some(MAX_WORKER_THREADS)
        );
        let too_many = format!("worker_threads = {}", MAX_WORKER_THREADS + 1);
        for bad in ["worker_threads = 0", too_many.as_str(), "workers = 2"] {
            let text = format!("{CONFIG}\n[runtime]\n{bad}\n");
            let error = NodeConfig::parse(&text, None).unwrap_err();
            assert_eq!(error.exit_code(), EXIT_CONFIG, "{bad}");
            let named = if bad.starts_with("workers") {
                "workers"
            } else {
                "worker_threads"
            };
            assert!(error.to_string().contains(named), "{bad}: {error}");
            if named == "worker_threads" {
                // The reason is a literal: it must name the bound the check uses.
                let bound = MAX_WORKER_THREADS.to_string();
                assert!(error.to_string().contains(&bound), "{bad}: {error}");
            }
        }
    }

    #[test]
    fn configuration_errors_name_the_problem_and_exit_2() {
        let missing = CONFIG.replace("address = \"127.0.0.1:8001\"", "");
        let error = NodeConfig::parse(&missing, None).unwrap_err();
        assert!(error.to_string().contains("http.address"), "{error}");
        let bad = CONFIG.replace("127.0.0.1:8001", "nowhere");
        let error = NodeConfig::parse(&bad, None).unwrap_err();
        assert!(error.to_string().contains("nowhere"), "{error}");
        let typo = CONFIG.replace("address =", "adress =");
        let error = NodeConfig::parse(&typo, None).unwrap_err();
        assert!(error.to_string().contains("adress"), "{error}");
        let bad_value = CONFIG.replace(
            "node_id = \"a\"",
            "node_id = \"a\"\nelection_timeout_ms = 1",
        );
        let error = NodeConfig::parse(&bad_value, None).unwrap_err();
        assert!(error.to_string().contains("election_timeout_ms"), "{error}");
        for error in [
            NodeConfig::parse(&missing, None).unwrap_err(),
            NodeConfig::load(Path::new("/nonexistent/node.toml"), None).unwrap_err(),
        ] {
            assert_eq!(error.exit_code(), EXIT_CONFIG);
            assert!(!error.to_string().contains('\n'), "one line: {error}");
        }
    }

    #[test]
    fn command_line_needs_config_and_values() {
        let command = parse_args(&args(&["--config", "f.toml", "--http", "h:1"])).unwrap();
        assert_eq!(
            command,
            Command::Run {
                config: PathBuf::from("f.toml"),
                http: Some("h:1".into()),
                join: None,
            }
        );
        let command = parse_args(&args(&["--config", "f.toml", "--join", "127.0.0.1:8001"]));
        assert_eq!(
            command.unwrap(),
            Command::Run {
                config: PathBuf::from("f.toml"),
                http: None,
                join: Some("127.0.0.1:8001".into()),
            }
        );
        assert!(parse_args(&args(&["--config", "f.toml", "--join"])).is_err());
        assert_eq!(
            parse_args(&args(&["keygen", "a.key"])).unwrap(),
            Command::Keygen {
                path: PathBuf::from("a.key")
            }
        );
        for bad in [
            &[][..],
            &["--config"][..],
            &["--verbose"][..],
            &["keygen"][..],
            &["keygen", "a.key", "b.key"][..],
        ] {
            let error = parse_args(&args(bad)).unwrap_err();
            assert_eq!(error.exit_code(), EXIT_CONFIG, "{error}");
        }
    }
}
