//! [`ConsensusConfig`]: the builder of the seed and its `[consensus]` TOML table, validated into
//! typed errors that name the bad key and value.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::error::ConfigError;
use crate::gpu::GpuConfig;
use crate::protocol::pbft::PbftConfig;
use crate::protocol::raft::RaftConfig;
use crate::transport::tcp::{NetworkConfig, PeerAddress, PeerTls, TcpTransportConfig};
use crate::types::NodeId;

/// How [`ConsensusEngine::read`](crate::ConsensusEngine::read) (and a read-only command given
/// to `execute_command`) is made linearizable. PBFT orders every read through its log whatever
/// this says: a read outside the log would need `f + 1` matching answers, which one replica
/// cannot gather.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum ReadMode {
    /// ReadIndex (Raft thesis §6.4): the leader confirms its leadership with one heartbeat
    /// round (shared by every read that arrives meanwhile) and serves at its commit index; a
    /// follower asks the leader for that index and serves locally. No log write, no clock
    /// assumption. The default.
    #[default]
    ReadIndex,
    /// Lease reads: the leader serves at once while the lease its last answered heartbeat
    /// round earned runs ([`RaftConfig::lease_reads`](crate::protocol::raft::RaftConfig::lease_reads)
    /// says what it rests on: clocks that drift at most
    /// [`ConsensusConfig::max_clock_drift_percent`] apart, and a failover that waits out a
    /// full election timeout). Needs check-quorum, which the engine always runs.
    Lease,
    /// Every read is a command ordered through the log, as a write is (the behaviour before
    /// reads had a path of their own; kept for comparison and for state machines whose reads
    /// must be in the log).
    Log,
}

impl ReadMode {
    /// The spelling used in TOML files.
    pub fn as_str(self) -> &'static str {
        match self {
            ReadMode::ReadIndex => "read_index",
            ReadMode::Lease => "lease",
            ReadMode::Log => "log",
        }
    }

    /// The mode named as in TOML (`read_index`, `lease`, `log`).
    pub fn parse(value: &str) -> Option<Self> {
        match value {
            "read_index" => Some(ReadMode::ReadIndex),
            "lease" => Some(ReadMode::Lease),
            "log" => Some(ReadMode::Log),
            _ => None,
        }
    }
}

/// Which protocol a cluster runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Algorithm {
    /// Raft (CPU).
    Raft,
    /// Practical Byzantine Fault Tolerance with ed25519-signed messages.
    Pbft,
    /// Raft whose votes and acknowledgements are signed and checked/tallied in GPU batches.
    GpuOptimizedRaft,
}

impl Algorithm {
    /// The spelling used in TOML files.
    pub fn as_str(self) -> &'static str {
        match self {
            Algorithm::Raft => "raft",
            Algorithm::Pbft => "pbft",
            Algorithm::GpuOptimizedRaft => "gpu_optimized_raft",
        }
    }

    /// Whether the algorithm signs its messages, and so needs [`ConsensusConfig::key_file`] and
    /// a complete [`ConsensusConfig::validators`] table: PBFT and GPU-optimized Raft do, Raft does
    /// not.
    pub fn signs_messages(self) -> bool {
        matches!(self, Algorithm::Pbft | Algorithm::GpuOptimizedRaft)
    }

    /// The algorithm named as in TOML (`raft`, `pbft`, `gpu_optimized_raft`).
    pub fn parse(value: &str) -> Option<Self> {
        match value {
            "raft" => Some(Algorithm::Raft),
            "pbft" => Some(Algorithm::Pbft),
            "gpu_optimized_raft" => Some(Algorithm::GpuOptimizedRaft),
            _ => None,
        }
    }
}

/// Leader election timing, as in the seed's `ElectionConfig`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ElectionConfig {
    /// Minimum time without a leader before a follower campaigns (randomized up to twice this).
    pub election_timeout: Duration,
    /// How often a leader sends heartbeats.
    pub heartbeat_interval: Duration,
    /// Hand leadership to the caught-up node of highest priority.
    pub priority_based: bool,
    /// Priority per node name (absent: 0). Only used with `priority_based`.
    pub priorities: BTreeMap<String, u32>,
}

impl Default for ElectionConfig {
    fn default() -> Self {
        ElectionConfig {
            election_timeout: Duration::from_millis(150),
            heartbeat_interval: Duration::from_millis(50),
            priority_based: false,
            priorities: BTreeMap::new(),
        }
    }
}

impl ElectionConfig {
    /// Sets the election timeout.
    pub fn election_timeout(mut self, timeout: Duration) -> Self {
        self.election_timeout = timeout;
        self
    }
    /// Sets the heartbeat interval.
    pub fn heartbeat_interval(mut self, interval: Duration) -> Self {
        self.heartbeat_interval = interval;
        self
    }
    /// Turns priority-based elections on or off.
    pub fn priority_based(mut self, enabled: bool) -> Self {
        self.priority_based = enabled;
        self
    }
    /// Sets the priority of the node named `node`.
    pub fn priority(mut self, node: impl Into<String>, priority: u32) -> Self {
        self.priorities.insert(node.into(), priority);
        self
    }
}

/// Configuration of one node. Every setter of the seed is here; see each field for its meaning.
///
/// Some settings the spec names are accepted and validated before the code that would act on
/// them exists (snapshots, PBFT, Byzantine fault tolerance, the GPU path); each field says which
/// issue will use it, and [`ConsensusConfig::unread_settings`] lists those a caller changed.
///
/// The default algorithm is [`Algorithm::Raft`], not the seed's GPU-optimized Raft: GPU-optimized
/// Raft signs every vote and acknowledgement, so it needs a key file and the validators' public
/// keys, and a default that fails to start without them would be a trap.
#[derive(Clone, Debug)]
pub struct ConsensusConfig {
    /// The protocol.
    pub algorithm: Algorithm,
    /// This node's name (`"node-001"`); its [`NodeId`] is [`NodeId::from_name`] of it.
    pub node_id: String,
    /// Where this node listens for peers.
    pub bind_address: String,
    /// Names the cluster; nodes of another cluster are refused in the handshake.
    pub cluster_id: String,
    /// Socket and compression options of the TCP transport.
    pub network_config: NetworkConfig,
    /// GPU adapter and memory settings: a PBFT or GPU-optimized Raft engine with `gpu_enabled`
    /// opens its GPU context
    /// from them (`gpu_device` and `gpu_memory_pool` take precedence over its two fields).
    pub gpu_config: GpuConfig,
    /// The other members: names for in-process clusters, or `host:port` / `name@host:port` for
    /// TCP (TOML: `bootstrap_peers`).
    pub peers: Vec<String>,
    /// Smallest cluster this node will run in (members including itself).
    pub min_cluster_size: usize,
    /// Raft and GPU-optimized Raft: this node joins a running cluster instead of forming one
    /// with `peers`. It starts as no member (it neither votes nor campaigns), and a member's
    /// leader adds it ([`ConsensusEngine::add_learner`](crate::ConsensusEngine::add_learner);
    /// GPU-optimized Raft: [`add_learner_with_key`](crate::ConsensusEngine::add_learner_with_key));
    /// it learns the members, and their keys, from the leader's log or snapshot. `peers` still
    /// name whom it can reach; a joining node's `validators` need name only itself. PBFT
    /// refuses it.
    pub joining: bool,
    /// Election timing.
    pub election: ElectionConfig,
    /// Deadline of every client call (propose, execute_command, forwarding).
    pub request_timeout: Duration,
    /// Use the GPU for vote aggregation and signature batches.
    ///
    /// PBFT and GPU-optimized Raft: check peers' signatures with the automatic verifier over a
    /// GPU context (GPU above its crossover batch size, CPU below), and count votes and
    /// acknowledgements with the adaptive aggregator on the same context. Raft signs nothing
    /// and does not read it.
    pub gpu_enabled: bool,
    /// Which wgpu adapter (index in enumeration order; TOML `gpu_device_id`). Read with
    /// `gpu_enabled` (PBFT and GPU-optimized Raft).
    pub gpu_device: u32,
    /// GPU buffer pool bound in bytes (TOML `gpu_memory_pool_mb`, in MiB).
    ///
    /// Read with `gpu_enabled` (PBFT and GPU-optimized Raft).
    pub gpu_memory_pool: u64,
    /// Append at most this many proposals per batch.
    pub batch_size: usize,
    /// How long a proposal may wait for others to share its batch; zero appends whatever queued
    /// up as soon as the engine's input queue drains (lowest latency, still batched under load).
    pub batch_timeout: Duration,
    /// Upper bound on a batch's bytes, and on one proposal.
    pub max_batch_bytes: usize,
    /// Free space, in bytes, kept on the filesystem of `persistent_state` (TOML
    /// `disk_reserve_mb`): below it a node refuses writes with
    /// [`StorageError::DiskFull`](crate::StorageError::DiskFull) (HTTP 507) while reads, and
    /// the protocol's own state (votes, replicated entries), go on into the reserve. Writes
    /// resume when space returns. The free space is read again at least every 10 ms under
    /// load (and sooner when the writes since could have used up the room it showed), not on
    /// every write. Zero turns the check off.
    pub disk_reserve_bytes: u64,
    /// Batch proposals at all.
    pub enable_batching: bool,
    /// Directory of the durable log and state. `None` keeps everything in memory, once (in the
    /// protocol core): an engine stopped and started again in the same process recovers its
    /// votes and log, but nothing survives the process (benchmarks and tests).
    pub persistent_state: Option<PathBuf>,
    /// Applied entries between snapshots (Raft; at least 1, default [`DEFAULT_SNAPSHOT_INTERVAL`],
    /// 10,000).
    ///
    /// Every `snapshot_interval` applied entries the engine captures the state machine's
    /// state ([`StateMachine::snapshot`](crate::StateMachine::snapshot): the driver stops only
    /// for that capture, measured as `consensus_snapshot_blocked_seconds`), serializes it on a
    /// thread of its own and persists it. The log keeps the last `snapshot_interval` entries
    /// (more only where the latest snapshot does not reach yet) and is compacted behind them
    /// in steps of an eighth of an interval, so it holds at most two intervals. A follower that
    /// fell behind the compacted log, or a new one, gets the latest snapshot; a restarted node
    /// starts from its own and replays the log after it. A state machine
    /// that takes no snapshots keeps the whole log. PBFT and GPU-optimized Raft keep the whole
    /// log (their signed certificates cover it) and do not read this setting.
    pub snapshot_interval: u64,
    /// PBFT: how long a replica waits for progress, while work is outstanding, before it asks
    /// for a view change (TOML `view_change_timeout_ms`); doubled for each consecutive view
    /// change that brought no progress, up to 8 times. Unused by Raft.
    pub view_change_timeout: Duration,
    /// PBFT: sequence numbers (batches) between checkpoints; the window of sequence numbers a
    /// replica accepts is twice this past its stable checkpoint. Unused by Raft.
    pub checkpoint_interval: u64,
    /// PBFT: detect provably Byzantine replicas and exclude them (the engine's
    /// [`ByzantineConfig`](crate::ByzantineConfig) with its defaults otherwise; see
    /// [`ConsensusEngine::with_byzantine_config`](crate::ConsensusEngine::with_byzantine_config)).
    /// PBFT tolerates f faulty replicas either way; this adds evidence and punishment. Unused
    /// by Raft.
    pub byzantine_fault_tolerance: bool,
    /// Fraction of members that may be Byzantine (in `[0, 1/3]`). With
    /// `byzantine_fault_tolerance` under PBFT the member count must honour it
    /// ([`ByzantineConfig::validate_for`](crate::ByzantineConfig::validate_for)).
    pub byzantine_threshold: f64,
    /// File holding this node's ed25519 secret key: 64 hex characters (32 bytes), surrounding
    /// whitespace allowed; `consensus-node keygen FILE` or [`crate::keys::generate_key_file`]
    /// writes one. A relative path is resolved against the working directory, like
    /// `state_dir`.
    ///
    /// Required by the algorithms that sign their messages ([`Algorithm::signs_messages`]); read
    /// by [`ConsensusConfig::signing_identity`].
    pub key_file: Option<PathBuf>,
    /// Every member's ed25519 public key, 64 hex characters, by member name (TOML: the
    /// `[consensus.validators]` table). A replica's identity is its public key.
    ///
    /// Keyed by the same names the members' [`NodeId`]s come from: `node_id` for this node, and
    /// for each `bootstrap_peers` entry the part before `@`, or the whole entry when it has no
    /// `@` (so a peer given as `"10.0.0.2:7000"` is keyed `"10.0.0.2:7000"`, which TOML writes
    /// quoted). [`ConsensusConfig::validate`] checks that every entry names a member and decodes
    /// to a public key; the signed algorithms also need an entry for every member
    /// ([`ConsensusConfig::validate_signing`]).
    pub validators: BTreeMap<String, String>,
    /// GPU-optimized Raft: the clients allowed to propose, as ed25519 public keys in hex (TOML
    /// `client_keys`). When non-empty, every command must be signed by one of them
    /// ([`Proposal::signed`](crate::Proposal::signed), or the HTTP node's signature headers);
    /// when empty, unsigned commands are accepted and signed ones need only verify.
    pub client_keys: Vec<String>,
    /// Mutual TLS 1.3 on every peer connection (TOML: the `[consensus.tls]` table with `cert`,
    /// `key` and `ca`): this node's certificate chain and key and the cluster CA, PEM files.
    /// A peer's id is then the node name its certificate carries as its common name, never what
    /// it claims (see [`tls`](crate::transport::tcp::tls); `consensus-node gen-certs` or
    /// [`generate_certificates`](crate::transport::tcp::tls::generate_certificates) write a
    /// quick-start CA and certificates). The certificate must name `node_id`.
    ///
    /// A node over TCP needs this or [`ConsensusConfig::insecure_plaintext`].
    pub tls: Option<TlsFiles>,
    /// Peer connections over plain TCP, unauthenticated and unencrypted (TOML
    /// `insecure_plaintext = true`): anyone who reaches `bind_address` can claim to be a member
    /// and send it votes or entries. Only for a trusted network or a loopback test; the node
    /// logs a warning at start. Exclusive with `tls`.
    pub insecure_plaintext: bool,
    /// The fraction of proposals traced end to end (`0.0..=1.0`, default 0.01; TOML
    /// `trace_sample_ratio`; see [`telemetry`](crate::telemetry)). A traced proposal creates
    /// spans on every node it passes; the others create none, which is what keeps tracing off
    /// the hot path. A caller that decided for itself (a traced HTTP request, a caller's own
    /// trace) says so with [`with_trace_decision`](crate::telemetry::with_trace_decision), and
    /// the ratio is not asked. Spans are recorded only when a subscriber is installed; the crate
    /// never installs one.
    pub trace_sample_ratio: f64,
    /// At most this many proposals traced a second on this node, whatever the ratio (default
    /// 200; TOML `trace_max_per_second`): the cost of tracing then stays bounded as the load
    /// grows (see [`TraceSampler`](crate::telemetry::TraceSampler) for why). Proposals that a
    /// caller chose to trace, and those traced on another node, do not count.
    pub trace_max_per_second: u32,
    /// How reads are made linearizable (default [`ReadMode::ReadIndex`]; TOML `read_mode` =
    /// `"read_index"`, `"lease"` or `"log"`).
    pub read_mode: ReadMode,
    /// The bound on clock drift between nodes that [`ReadMode::Lease`] assumes, in percent
    /// (default 5; TOML `max_clock_drift_percent`); the lease is shortened by it.
    pub max_clock_drift_percent: u32,
    /// How long the engine's driver thread, idle, keeps polling for its next input before it
    /// parks (TOML `driver_spin_us`, microseconds; at most [`MAX_DRIVER_SPIN`]). `None`, the
    /// default, polls 150 µs for an engine over TCP and 50 µs for one in process.
    ///
    /// Polling catches an answer that is a round trip away without the wake-up of a parked
    /// thread, which is what a lone client's commit latency is made of; but a polling thread
    /// holds its core. Where nodes share a machine's cores with each other and with their
    /// clients (a local cluster), zero (park at once) leaves those cores to the work: on 2
    /// cores, three nodes under the `kv_cluster` load served 1.09× the operations with zero
    /// and a one-worker runtime each (see the README), while a lone client's commit over TCP
    /// takes about twice as long with zero.
    pub driver_spin: Option<Duration>,
    /// How long a Raft leader (and GPU-optimized Raft's), once a write of several entries is
    /// done, keeps gathering proposals before its next round, at most (TOML
    /// `leader_linger_us`, microseconds; at most [`MAX_DRIVER_SPIN`]; zero: the next round
    /// goes at once). `None`, the default: [`DEFAULT_TCP_LEADER_LINGER`] scaled by
    /// [`DEFAULT_TCP_LEADER_LINGER_PER_ENTRY`] for an engine over TCP, zero for one in
    /// process (whose rounds cost no network hops and were not measured with it).
    ///
    /// Every round is an fsync and a message to each follower on every node, and a write
    /// several clients wait on says that more of them are about to send: a short wait then
    /// turns several rounds into one. A leader lingers only after a write that carried two
    /// entries or more, so a lone client's commit never waits for it. The wait ends within
    /// microseconds of its deadline where the driver has an I/O reactor on Linux (a
    /// `timerfd`; every engine over TCP, and one in process that sets a linger), elsewhere on
    /// tokio's millisecond timer. Measured on 2 cores with `kv_vs_etcd` (three nodes, 16
    /// clients, four alternated pairs against no linger; `benches/FORWARDING_NOTES.md`,
    /// 2026-12-05), the default served PUTs through every node at 1.19× (pairwise median),
    /// through a follower at 1.18× and through the leader at 1.13×, with PUT p99s of 3.2-8.5 ms
    /// against 7.7-13.9 ms, and reads at 1.02-1.06×. PBFT ignores it.
    pub leader_linger: Option<Duration>,
    /// Scales [`ConsensusConfig::leader_linger`] with the load (TOML
    /// `leader_linger_per_entry_us`, microseconds; at most [`MAX_DRIVER_SPIN`]): after a write
    /// of `n` entries a leader gathers for `n` times this, and never longer than
    /// `leader_linger`. `None`, the default: [`DEFAULT_TCP_LEADER_LINGER_PER_ENTRY`] with the
    /// default linger; with a `leader_linger` you set, unscaled (the whole linger after any
    /// write of several entries).
    ///
    /// A write's size says how many clients are waiting on the leader, so the wait follows
    /// them: a few clients (small writes) wait little, many (full writes) up to the cap, and a
    /// lone client never. Measured on 2 cores under `kv_cluster` (three nodes sharing the cores
    /// with their clients), 70 µs an entry up to 1 ms served 16 clients like a fixed 700 µs
    /// (12,868 against 13,189 ops/s, medians of five alternated runs; 11,058 with a fixed
    /// 200 µs), while 4 clients served 0.95× what they did with the fixed 200 µs (the fixed
    /// 700 µs: 0.77×). Those lingers ran on tokio's millisecond timer and mostly ended late;
    /// timed to the microsecond the same setting served 1.01× (pairwise, six alternated runs).
    pub leader_linger_per_entry: Option<Duration>,
}

/// The longest [`ConsensusConfig::driver_spin`] (and [`ConsensusConfig::leader_linger`])
/// accepted: past it a spinning driver is a busy loop, and a lingering leader a stalled one, not
/// a short wait.
pub const MAX_DRIVER_SPIN: Duration = Duration::from_millis(10);

/// The longest a Raft leader over TCP lingers by default (see
/// [`ConsensusConfig::leader_linger`]): about three fsyncs on a small virtual machine's disk,
/// reached after a write of twelve entries at [`DEFAULT_TCP_LEADER_LINGER_PER_ENTRY`].
pub const DEFAULT_TCP_LEADER_LINGER: Duration = Duration::from_micros(600);

/// How the default linger grows with the write before it: this much per entry.
pub const DEFAULT_TCP_LEADER_LINGER_PER_ENTRY: Duration = Duration::from_micros(50);

/// The default [`ConsensusConfig::snapshot_interval`]: 10,000 applied entries.
///
/// A snapshot writes the whole state, the log only what changed, so the interval sets how many
/// bytes of snapshot each byte of log costs. At 1,000 (the default until 2026-12-04) a
/// key-value store of 10,000 keys wrote several times more snapshot than log, thirteen
/// snapshots a second per node under `kv_vs_etcd`, and PUTs measured 5-19 % slower than with
/// snapshots ten or a hundred times rarer (alternated pairs, `benches/FORWARDING_NOTES.md`).
/// At 10,000 the log still holds at most 20,000 entries: what a restart replays after its own
/// snapshot, and what a follower that fell behind by less can still get from the log rather
/// than as a snapshot. (etcd 3.4's `--snapshot-count` is 100,000.)
pub const DEFAULT_SNAPSHOT_INTERVAL: u64 = 10_000;

/// The PEM files of [`ConsensusConfig::tls`]. Relative paths are resolved against the working
/// directory, like `state_dir`.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsFiles {
    /// This node's certificate (its chain: the node's certificate first).
    pub cert: PathBuf,
    /// This node's private key.
    pub key: PathBuf,
    /// The cluster CA's certificate(s).
    pub ca: PathBuf,
}

impl TlsFiles {
    /// The files of `node` in a directory written by `consensus-node gen-certs DIR`:
    /// `DIR/<node>.pem`, `DIR/<node>.key` and `DIR/ca.pem`.
    pub fn in_dir(dir: impl AsRef<Path>, node: &str) -> Self {
        let dir = dir.as_ref();
        TlsFiles {
            cert: dir.join(format!("{node}.pem")),
            key: dir.join(format!("{node}.key")),
            ca: dir.join("ca.pem"),
        }
    }

    /// Reads and checks the files (see [`PeerTls::load`]).
    pub fn load(&self) -> Result<PeerTls, crate::transport::tcp::TlsError> {
        PeerTls::load(&self.cert, &self.key, &self.ca)
    }
}

impl Default for ConsensusConfig {
    fn default() -> Self {
        ConsensusConfig {
            algorithm: Algorithm::Raft,
            node_id: "node-001".into(),
            bind_address: "127.0.0.1:7000".into(),
            cluster_id: "stratoswarm".into(),
            network_config: NetworkConfig::default(),
            gpu_config: GpuConfig::default(),
            peers: Vec::new(),
            min_cluster_size: 1,
            joining: false,
            election: ElectionConfig::default(),
            request_timeout: Duration::from_secs(1),
            gpu_enabled: false,
            gpu_device: 0,
            gpu_memory_pool: 1 << 30,
            batch_size: 1024,
            batch_timeout: Duration::ZERO,
            max_batch_bytes: 1 << 20,
            disk_reserve_bytes: 64 << 20,
            enable_batching: true,
            persistent_state: None,
            snapshot_interval: DEFAULT_SNAPSHOT_INTERVAL,
            view_change_timeout: Duration::from_secs(5),
            checkpoint_interval: 100,
            byzantine_fault_tolerance: false,
            byzantine_threshold: 0.33,
            key_file: None,
            validators: BTreeMap::new(),
            client_keys: Vec::new(),
            tls: None,
            insecure_plaintext: false,
            trace_sample_ratio: 0.01,
            trace_max_per_second: 200,
            read_mode: ReadMode::ReadIndex,
            max_clock_drift_percent: 5,
            driver_spin: None,
            leader_linger: None,
            leader_linger_per_entry: None,
        }
    }
}

macro_rules! setters {
    ($($(#[$doc:meta])* $name:ident: $ty:ty),* $(,)?) => {
        $(
            $(#[$doc])*
            pub fn $name(mut self, value: $ty) -> Self {
                self.$name = value;
                self
            }
        )*
    };
}

impl ConsensusConfig {
    setters! {
        /// Sets [`ConsensusConfig::algorithm`].
        algorithm: Algorithm,
        /// Sets [`ConsensusConfig::gpu_device`].
        gpu_device: u32,
        /// Sets [`ConsensusConfig::batch_size`].
        batch_size: usize,
        /// Sets [`ConsensusConfig::batch_timeout`].
        batch_timeout: Duration,
        /// Sets [`ConsensusConfig::max_batch_bytes`].
        max_batch_bytes: usize,
        /// Sets [`ConsensusConfig::disk_reserve_bytes`].
        disk_reserve_bytes: u64,
        /// Sets [`ConsensusConfig::enable_batching`].
        enable_batching: bool,
        /// Sets [`ConsensusConfig::gpu_memory_pool`] (bytes).
        gpu_memory_pool: u64,
        /// Sets [`ConsensusConfig::view_change_timeout`].
        view_change_timeout: Duration,
        /// Sets [`ConsensusConfig::checkpoint_interval`].
        checkpoint_interval: u64,
        /// Sets [`ConsensusConfig::request_timeout`].
        request_timeout: Duration,
        /// Sets [`ConsensusConfig::election`].
        election: ElectionConfig,
        /// Sets [`ConsensusConfig::min_cluster_size`].
        min_cluster_size: usize,
        /// Sets [`ConsensusConfig::joining`].
        joining: bool,
        /// Sets [`ConsensusConfig::gpu_enabled`].
        gpu_enabled: bool,
        /// Sets [`ConsensusConfig::snapshot_interval`].
        snapshot_interval: u64,
        /// Sets [`ConsensusConfig::network_config`].
        network_config: NetworkConfig,
        /// Sets [`ConsensusConfig::gpu_config`].
        gpu_config: GpuConfig,
        /// Sets [`ConsensusConfig::insecure_plaintext`].
        insecure_plaintext: bool,
        /// Sets [`ConsensusConfig::trace_sample_ratio`].
        trace_sample_ratio: f64,
        /// Sets [`ConsensusConfig::trace_max_per_second`].
        trace_max_per_second: u32,
        /// Sets [`ConsensusConfig::read_mode`].
        read_mode: ReadMode,
        /// Sets [`ConsensusConfig::max_clock_drift_percent`].
        max_clock_drift_percent: u32,
        /// Sets [`ConsensusConfig::driver_spin`].
        driver_spin: Option<Duration>,
        /// Sets [`ConsensusConfig::leader_linger`].
        leader_linger: Option<Duration>,
        /// Sets [`ConsensusConfig::leader_linger_per_entry`].
        leader_linger_per_entry: Option<Duration>,
    }

    /// Sets [`ConsensusConfig::tls`].
    pub fn tls(mut self, files: TlsFiles) -> Self {
        self.tls = Some(files);
        self
    }

    /// Sets [`ConsensusConfig::cluster_id`].
    pub fn cluster_id(mut self, id: impl Into<String>) -> Self {
        self.cluster_id = id.into();
        self
    }

    /// Sets [`ConsensusConfig::node_id`].
    pub fn node_id(mut self, name: impl Into<String>) -> Self {
        self.node_id = name.into();
        self
    }

    /// Sets [`ConsensusConfig::bind_address`].
    pub fn bind_address(mut self, address: impl Into<String>) -> Self {
        self.bind_address = address.into();
        self
    }

    /// Sets [`ConsensusConfig::peers`].
    pub fn peers<S: Into<String>>(mut self, peers: impl IntoIterator<Item = S>) -> Self {
        self.peers = peers.into_iter().map(Into::into).collect();
        self
    }

    /// Sets [`ConsensusConfig::persistent_state`]: the node's data directory.
    pub fn persistent_state(mut self, dir: impl Into<PathBuf>) -> Self {
        self.persistent_state = Some(dir.into());
        self
    }

    /// Sets [`ConsensusConfig::key_file`]: the file of this node's ed25519 secret key.
    pub fn key_file(mut self, path: impl Into<PathBuf>) -> Self {
        self.key_file = Some(path.into());
        self
    }

    /// Adds or replaces the entry of the member named `node` in
    /// [`ConsensusConfig::validators`]: its ed25519 public key in hex.
    pub fn validator(mut self, node: impl Into<String>, public_key_hex: impl Into<String>) -> Self {
        self.validators.insert(node.into(), public_key_hex.into());
        self
    }

    /// The settings set to something other than their default that nothing reads yet, in field
    /// order: `snapshot_interval` (read by Raft only); `view_change_timeout`,
    /// `checkpoint_interval`, `byzantine_fault_tolerance`, `byzantine_threshold` (read by PBFT);
    /// `gpu_enabled`, `gpu_device`, `gpu_memory_pool` and `gpu_config` (read by the signing
    /// algorithms); then `key_file` and `validators` when the algorithm is Raft, which signs
    /// nothing, and `client_keys` unless it is GPU-optimized Raft; `read_mode` under PBFT (which
    /// orders reads through its log) and `max_clock_drift_percent` outside lease reads. The
    /// names are the fields' (and setters'); TOML spells three
    /// of them with their unit (`view_change_timeout_ms`, `gpu_device_id`,
    /// `gpu_memory_pool_mb`), and `gpu_config` has no TOML key.
    ///
    /// Meant to be logged when an engine starts, so that a setting that does nothing yet is not
    /// mistaken for one that works.
    pub fn unread_settings(&self) -> Vec<&'static str> {
        let default = ConsensusConfig::default();
        [
            (
                "snapshot_interval",
                self.algorithm != Algorithm::Raft
                    && self.snapshot_interval != default.snapshot_interval,
            ),
            (
                "view_change_timeout",
                self.algorithm != Algorithm::Pbft
                    && self.view_change_timeout != default.view_change_timeout,
            ),
            (
                "checkpoint_interval",
                self.algorithm != Algorithm::Pbft
                    && self.checkpoint_interval != default.checkpoint_interval,
            ),
            (
                "byzantine_fault_tolerance",
                self.algorithm != Algorithm::Pbft
                    && self.byzantine_fault_tolerance != default.byzantine_fault_tolerance,
            ),
            (
                "byzantine_threshold",
                self.algorithm != Algorithm::Pbft
                    && self.byzantine_threshold != default.byzantine_threshold,
            ),
            (
                "gpu_enabled",
                !self.algorithm.signs_messages() && self.gpu_enabled != default.gpu_enabled,
            ),
            (
                "gpu_device",
                !self.algorithm.signs_messages() && self.gpu_device != default.gpu_device,
            ),
            (
                "gpu_memory_pool",
                !self.algorithm.signs_messages() && self.gpu_memory_pool != default.gpu_memory_pool,
            ),
            (
                "gpu_config",
                !self.algorithm.signs_messages() && self.gpu_config != default.gpu_config,
            ),
            (
                "key_file",
                !self.algorithm.signs_messages() && self.key_file.is_some(),
            ),
            (
                "validators",
                !self.algorithm.signs_messages() && !self.validators.is_empty(),
            ),
            (
                "client_keys",
                self.algorithm != Algorithm::GpuOptimizedRaft && !self.client_keys.is_empty(),
            ),
            (
                "read_mode",
                self.algorithm == Algorithm::Pbft && self.read_mode != default.read_mode,
            ),
            (
                "max_clock_drift_percent",
                (self.algorithm == Algorithm::Pbft || self.read_mode != ReadMode::Lease)
                    && self.max_clock_drift_percent != default.max_clock_drift_percent,
            ),
        ]
        .into_iter()
        .filter_map(|(name, changed)| changed.then_some(name))
        .collect()
    }

    /// This node's id.
    pub fn id(&self) -> NodeId {
        NodeId::from_name(&self.node_id)
    }

    /// The peers' names (the part before `@`, or the whole entry when it has none).
    pub fn peer_names(&self) -> Vec<&str> {
        self.peers
            .iter()
            .map(|p| p.split_once('@').map_or(p.as_str(), |(name, _)| name))
            .collect()
    }

    /// Every voter's id, this node's included, in a stable order.
    pub fn voter_ids(&self) -> Vec<NodeId> {
        let mut voters: Vec<NodeId> = self
            .peer_names()
            .into_iter()
            .map(NodeId::from_name)
            .collect();
        voters.push(self.id());
        voters.sort();
        voters
    }

    /// The tick the engine drives the core with: a fifth of the heartbeat interval (at least
    /// 1 ms), fine enough that timeouts land within 20% of their configured length.
    pub fn tick(&self) -> Duration {
        (self.election.heartbeat_interval / 5).max(Duration::from_millis(1))
    }

    /// Checks every field and their combinations, whatever the algorithm.
    ///
    /// What only the signed algorithms need (PBFT's four members, `key_file`, a validators entry
    /// for every member) is checked by [`ConsensusConfig::validate_signing`], which an engine of
    /// those algorithms runs through [`ConsensusConfig::signing_identity`].
    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = ConfigError::invalid::<()>;
        if self.node_id.is_empty() {
            return invalid("node_id", String::new(), "must not be empty");
        }
        if self.insecure_plaintext && self.tls.is_some() {
            return invalid(
                "insecure_plaintext",
                "true".into(),
                "contradicts [consensus.tls]: set one or the other",
            );
        }
        if !(0.0..=1.0).contains(&self.trace_sample_ratio) {
            return invalid(
                "trace_sample_ratio",
                self.trace_sample_ratio.to_string(),
                "must be within 0.0..=1.0",
            );
        }
        // The driver's short waits share one bound: past it a wait is a stall.
        let driver_waits = [
            ("driver_spin_us", self.driver_spin),
            ("leader_linger_us", self.leader_linger),
            ("leader_linger_per_entry_us", self.leader_linger_per_entry),
        ];
        for (field, wait) in driver_waits {
            if let Some(wait) = wait.filter(|wait| *wait > MAX_DRIVER_SPIN) {
                return invalid(field, wait.as_micros().to_string(), "at most 10000 (10 ms)");
            }
        }
        if self.max_clock_drift_percent >= 100 {
            return invalid(
                "max_clock_drift_percent",
                self.max_clock_drift_percent.to_string(),
                "must be below 100",
            );
        }
        if self.read_mode == ReadMode::Lease && self.raft_config().lease_ticks() == 0 {
            return invalid(
                "read_mode",
                "lease".into(),
                "the election timeout is too few ticks for a lease at this clock drift bound",
            );
        }
        let voters = self.voter_ids();
        let mut distinct = voters.clone();
        distinct.dedup();
        if distinct.len() != voters.len() {
            return invalid(
                "bootstrap_peers",
                format!("{:?}", self.peers),
                "names must be distinct and differ from node_id",
            );
        }
        self.validate_validator_table()?;
        self.client_key_set()?;
        if self.joining && self.algorithm == Algorithm::Pbft {
            return invalid(
                "joining",
                "true".into(),
                "PBFT keeps its validators; Raft and GPU-optimized Raft change their members",
            );
        }
        if voters.len() < self.min_cluster_size {
            return invalid(
                "min_cluster_size",
                self.min_cluster_size.to_string(),
                "exceeds the members configured (node_id plus bootstrap_peers)",
            );
        }
        let election = &self.election;
        if election.heartbeat_interval.is_zero() {
            return invalid("heartbeat_interval_ms", "0".into(), "must be at least 1 ms");
        }
        if election.election_timeout < election.heartbeat_interval * 2 {
            return invalid(
                "election_timeout_ms",
                election.election_timeout.as_millis().to_string(),
                "must be at least twice heartbeat_interval_ms",
            );
        }
        if self.request_timeout.is_zero() {
            return invalid("request_timeout_ms", "0".into(), "must be at least 1 ms");
        }
        for (field, value) in [
            ("batch_size", self.batch_size as u64),
            ("max_batch_bytes", self.max_batch_bytes as u64),
            ("snapshot_interval", self.snapshot_interval),
            ("checkpoint_interval", self.checkpoint_interval),
            ("gpu_memory_pool_mb", self.gpu_memory_pool),
        ] {
            if value == 0 {
                return invalid(field, "0".into(), "must be at least 1");
            }
        }
        self.network_config.validate()?;
        if self.cluster_id.is_empty() {
            return invalid("cluster_id", String::new(), "must not be empty");
        }
        if !(0.0..1.0 / 3.0 + 1e-9).contains(&self.byzantine_threshold) {
            return invalid(
                "byzantine_threshold",
                self.byzantine_threshold.to_string(),
                "must be in [0, 1/3]: BFT needs n >= 3f + 1",
            );
        }
        Ok(())
    }

    /// The linger a leader of this node takes, at most and per entry (see
    /// [`ConsensusConfig::leader_linger`]), with its defaults resolved for an engine over TCP
    /// or in process. PBFT never lingers.
    pub(crate) fn effective_leader_linger(&self, over_tcp: bool) -> (Duration, Option<Duration>) {
        match (self.algorithm, self.leader_linger) {
            (crate::Algorithm::Pbft, _) => (Duration::ZERO, None),
            (_, Some(linger)) => (linger, self.leader_linger_per_entry),
            (_, None) if over_tcp => (
                DEFAULT_TCP_LEADER_LINGER,
                Some(
                    self.leader_linger_per_entry
                        .unwrap_or(DEFAULT_TCP_LEADER_LINGER_PER_ENTRY),
                ),
            ),
            (_, None) => (Duration::ZERO, None),
        }
    }

    /// The core's settings for this node.
    pub fn raft_config(&self) -> RaftConfig {
        let tick = self.tick().as_nanos().max(1);
        let ticks = |d: Duration| u32::try_from(d.as_nanos().div_ceil(tick)).unwrap_or(u32::MAX);
        let mut raft = RaftConfig::new(self.id(), self.voter_ids());
        raft.election_timeout_ticks = ticks(self.election.election_timeout).max(2);
        raft.heartbeat_interval_ticks = ticks(self.election.heartbeat_interval).max(1);
        raft.priority_based = self.election.priority_based;
        raft.priorities = self
            .election
            .priorities
            .iter()
            .map(|(name, &priority)| (NodeId::from_name(name), priority))
            .collect();
        raft.enable_batching = self.enable_batching;
        raft.batch_size = self.batch_size;
        raft.batch_timeout_ticks = ticks(self.batch_timeout).max(1);
        raft.max_batch_bytes = self.max_batch_bytes;
        raft.max_bytes_per_append = raft.max_bytes_per_append.max(self.max_batch_bytes);
        raft.lease_reads = self.read_mode == ReadMode::Lease;
        raft.max_clock_drift_percent = self.max_clock_drift_percent;
        raft.log_retention = self.snapshot_interval;
        raft
    }

    /// The PBFT replica settings of this node, signing with `identity`: timeouts in ticks of
    /// [`ConsensusConfig::tick`], retransmission every heartbeat interval, the CPU signature
    /// verifier and vote counter. (An engine swaps in its own verifier, vote counter and
    /// Byzantine settings; this is for driving a [`PbftNode`](crate::protocol::pbft::PbftNode)
    /// by hand with a node's exact settings.)
    pub fn pbft_config(&self, identity: &crate::keys::SigningIdentity) -> PbftConfig {
        let tick = self.tick().as_nanos().max(1);
        let ticks = |d: Duration| u32::try_from(d.as_nanos().div_ceil(tick)).unwrap_or(u32::MAX);
        let mut pbft = PbftConfig::new(
            self.id(),
            self.voter_ids(),
            identity.signing_key.clone(),
            identity.validators.clone(),
        );
        pbft.checkpoint_interval = self.checkpoint_interval;
        pbft.batch_size = if self.enable_batching {
            self.batch_size
        } else {
            1
        };
        pbft.max_batch_bytes = self.max_batch_bytes;
        pbft.batch_timeout_ticks = if self.enable_batching {
            ticks(self.batch_timeout)
        } else {
            0
        };
        pbft.view_change_timeout_ticks = ticks(self.view_change_timeout).max(2);
        pbft.retransmit_ticks = ticks(self.election.heartbeat_interval).max(1);
        pbft.audit_interval_ticks = pbft.retransmit_ticks.saturating_mul(4);
        pbft.detection_enabled = self.byzantine_fault_tolerance;
        pbft
    }

    /// Where other nodes can dial this one: `bind_address` when it names a specific IP and a
    /// port (not `0.0.0.0`, `::` or port 0, which say where to listen, not where to be found).
    pub fn advertised_address(&self) -> Option<SocketAddr> {
        self.bind_address
            .parse::<SocketAddr>()
            .ok()
            .filter(|address| !address.ip().is_unspecified() && address.port() != 0)
    }

    /// The peers of `bootstrap_peers`: `name@host:port` (the id is the name's) or `host:port`
    /// (the id is learned from the peer's handshake).
    pub fn peer_addresses(&self) -> Result<Vec<PeerAddress>, ConfigError> {
        self.peers.iter().map(|entry| parse_peer(entry)).collect()
    }

    /// The TCP transport settings of this node: its id, cluster id, `bind_address`, network
    /// settings and request timeout, and its TLS identity read from [`ConsensusConfig::tls`].
    pub fn tcp_transport_config(&self) -> Result<TcpTransportConfig, ConfigError> {
        self.tcp_transport_config_with(None)
    }

    /// [`ConsensusConfig::tcp_transport_config`] with a TLS identity already loaded (see
    /// [`ConsensusEngine::with_peer_tls`](crate::ConsensusEngine::with_peer_tls)): `loaded`
    /// is used instead of reading [`ConsensusConfig::tls`]'s files, and is checked the same
    /// way (it must name `node_id`, and contradicts `insecure_plaintext`).
    pub fn tcp_transport_config_with(
        &self,
        loaded: Option<&PeerTls>,
    ) -> Result<TcpTransportConfig, ConfigError> {
        let bind: SocketAddr = self
            .bind_address
            .parse()
            .map_err(|_| ConfigError::Invalid {
                field: "bind_address",
                value: self.bind_address.clone(),
                reason: "expected ip:port",
            })?;
        let mut transport = TcpTransportConfig::new(self.id(), self.cluster_id.clone(), bind);
        transport.network = self.network_config;
        transport.request_timeout = self.request_timeout;
        transport.tls = match (loaded, &self.tls, self.insecure_plaintext) {
            (Some(_), _, true) => {
                return Err(ConfigError::Invalid {
                    field: "insecure_plaintext",
                    value: "true".into(),
                    reason: "contradicts the TLS identity given to the engine (with_peer_tls)",
                });
            }
            (Some(tls), _, false) => Some(tls.clone()),
            (None, Some(files), _) => Some(files.load()?),
            (None, None, true) => None,
            (None, None, false) => {
                return Err(ConfigError::Invalid {
                    field: "tls",
                    value: String::new(),
                    reason: "peer connections need [consensus.tls] (cert, key, ca; \
                             `consensus-node gen-certs` writes them), a TLS identity given \
                             to the engine (with_peer_tls) or an explicit \
                             insecure_plaintext = true",
                });
            }
        };
        if let Some(tls) = &transport.tls
            && tls.node_id() != self.id()
        {
            return Err(ConfigError::Invalid {
                field: "tls.cert",
                value: format!("{:?}", tls.node_name()),
                reason: "the certificate names another node than node_id",
            });
        }
        Ok(transport)
    }

    /// Reads the `[consensus]` table of a TOML file (the seed's keys; unknown keys are errors so
    /// that a typo is not silently ignored).
    pub fn from_toml_file(path: impl AsRef<Path>) -> Result<Self, ConfigError> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|error| ConfigError::File {
            path: path.display().to_string(),
            reason: error.to_string(),
        })?;
        Self::from_toml_str(&text)
    }

    /// Parses the `[consensus]` table of a TOML document. Other tables are ignored (a node's
    /// file also has `[http]`).
    pub fn from_toml_str(text: &str) -> Result<Self, ConfigError> {
        let document: TomlDocument = toml::from_str(text).map_err(|error| {
            // One line naming the offending line of the file, which shows the key and value.
            let line = error.span().map(|span| {
                let number = text[..span.start.min(text.len())].matches('\n').count() + 1;
                let content = text.lines().nth(number - 1).unwrap_or("").trim();
                format!(" (line {number}: `{content}`)")
            });
            ConfigError::Toml {
                reason: format!("{}{}", error.message(), line.unwrap_or_default()),
            }
        })?;
        let table = document.consensus.ok_or(ConfigError::Toml {
            reason: "missing [consensus] table".to_string(),
        })?;
        table.into_config()
    }
}

#[derive(Deserialize)]
struct TomlDocument {
    consensus: Option<TomlConsensus>,
}

/// The seed's `[consensus]` keys, plus `key_file` and the `[consensus.validators]` sub-table.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TomlConsensus {
    algorithm: Option<String>,
    node_id: Option<String>,
    bind_address: Option<String>,
    bootstrap_peers: Option<Vec<String>>,
    min_cluster_size: Option<u64>,
    election_timeout_ms: Option<u64>,
    heartbeat_interval_ms: Option<u64>,
    request_timeout_ms: Option<u64>,
    gpu_enabled: Option<bool>,
    gpu_device_id: Option<u32>,
    gpu_memory_pool_mb: Option<u64>,
    state_dir: Option<PathBuf>,
    snapshot_interval: Option<u64>,
    byzantine_fault_tolerance: Option<bool>,
    byzantine_threshold: Option<f64>,
    batch_size: Option<u64>,
    batch_timeout_ms: Option<u64>,
    max_batch_bytes: Option<u64>,
    disk_reserve_mb: Option<u64>,
    enable_batching: Option<bool>,
    priority_based: Option<bool>,
    view_change_timeout_ms: Option<u64>,
    checkpoint_interval: Option<u64>,
    key_file: Option<PathBuf>,
    validators: Option<BTreeMap<String, String>>,
    client_keys: Option<Vec<String>>,
    tls: Option<TlsFiles>,
    insecure_plaintext: Option<bool>,
    trace_sample_ratio: Option<f64>,
    trace_max_per_second: Option<u32>,
    read_mode: Option<String>,
    max_clock_drift_percent: Option<u32>,
    driver_spin_us: Option<u64>,
    leader_linger_us: Option<u64>,
    leader_linger_per_entry_us: Option<u64>,
}

impl TomlConsensus {
    fn into_config(self) -> Result<ConsensusConfig, ConfigError> {
        let mut config = ConsensusConfig::default();
        if let Some(name) = self.algorithm {
            config.algorithm = Algorithm::parse(&name).ok_or(ConfigError::Invalid {
                field: "algorithm",
                value: name,
                reason: "expected raft, pbft or gpu_optimized_raft",
            })?;
        }
        let size = |field: &'static str, value: u64| {
            usize::try_from(value).map_err(|_| ConfigError::Invalid {
                field,
                value: value.to_string(),
                reason: "too large for this platform",
            })
        };
        let millis = Duration::from_millis;
        config.node_id = self.node_id.unwrap_or(config.node_id);
        config.bind_address = self.bind_address.unwrap_or(config.bind_address);
        config.peers = self.bootstrap_peers.unwrap_or_default();
        if let Some(value) = self.min_cluster_size {
            config.min_cluster_size = size("min_cluster_size", value)?;
        }
        if let Some(ms) = self.election_timeout_ms {
            config.election.election_timeout = millis(ms);
        }
        if let Some(ms) = self.heartbeat_interval_ms {
            config.election.heartbeat_interval = millis(ms);
        }
        if let Some(ms) = self.request_timeout_ms {
            config.request_timeout = millis(ms);
        }
        config.election.priority_based = self.priority_based.unwrap_or(false);
        config.gpu_enabled = self.gpu_enabled.unwrap_or(config.gpu_enabled);
        config.gpu_device = self.gpu_device_id.unwrap_or(config.gpu_device);
        if let Some(mb) = self.gpu_memory_pool_mb {
            config.gpu_memory_pool = mb.checked_mul(1 << 20).ok_or(ConfigError::Invalid {
                field: "gpu_memory_pool_mb",
                value: mb.to_string(),
                reason: "too large",
            })?;
        }
        config.persistent_state = self.state_dir;
        config.snapshot_interval = self.snapshot_interval.unwrap_or(config.snapshot_interval);
        config.byzantine_fault_tolerance = self
            .byzantine_fault_tolerance
            .unwrap_or(config.byzantine_fault_tolerance);
        config.byzantine_threshold = self
            .byzantine_threshold
            .unwrap_or(config.byzantine_threshold);
        if let Some(value) = self.batch_size {
            config.batch_size = size("batch_size", value)?;
        }
        if let Some(ms) = self.batch_timeout_ms {
            config.batch_timeout = millis(ms);
        }
        if let Some(mb) = self.disk_reserve_mb {
            config.disk_reserve_bytes = mb.checked_mul(1 << 20).ok_or(ConfigError::Invalid {
                field: "disk_reserve_mb",
                value: mb.to_string(),
                reason: "too large",
            })?;
        }
        if let Some(value) = self.max_batch_bytes {
            config.max_batch_bytes = size("max_batch_bytes", value)?;
        }
        config.enable_batching = self.enable_batching.unwrap_or(config.enable_batching);
        if let Some(ms) = self.view_change_timeout_ms {
            config.view_change_timeout = millis(ms);
        }
        config.checkpoint_interval = self
            .checkpoint_interval
            .unwrap_or(config.checkpoint_interval);
        config.key_file = self.key_file;
        config.validators = self.validators.unwrap_or_default();
        config.client_keys = self.client_keys.unwrap_or_default();
        config.tls = self.tls;
        config.insecure_plaintext = self.insecure_plaintext.unwrap_or(false);
        config.trace_sample_ratio = self.trace_sample_ratio.unwrap_or(config.trace_sample_ratio);
        config.trace_max_per_second = self
            .trace_max_per_second
            .unwrap_or(config.trace_max_per_second);
        if let Some(name) = self.read_mode {
            config.read_mode = ReadMode::parse(&name).ok_or(ConfigError::Invalid {
                field: "read_mode",
                value: name,
                reason: "expected read_index, lease or log",
            })?;
        }
        config.max_clock_drift_percent = self
            .max_clock_drift_percent
            .unwrap_or(config.max_clock_drift_percent);
        config.driver_spin = self.driver_spin_us.map(Duration::from_micros);
        config.leader_linger = self.leader_linger_us.map(Duration::from_micros);
        config.leader_linger_per_entry = self.leader_linger_per_entry_us.map(Duration::from_micros);
        config.validate()?;
        Ok(config)
    }
}

/// One `bootstrap_peers` entry.
fn parse_peer(entry: &str) -> Result<PeerAddress, ConfigError> {
    let bad = |reason: &'static str| ConfigError::Invalid {
        field: "bootstrap_peers",
        value: entry.to_string(),
        reason,
    };
    let (name, address) = match entry.split_once('@') {
        Some((name, address)) => (Some(name), address),
        None => (None, entry),
    };
    let parsed: PeerAddress = address
        .parse()
        .map_err(|_| bad("expected host:port or name@host:port"))?;
    match name {
        Some("") => Err(bad("empty name before @")),
        Some(name) => Ok(PeerAddress::with_id(
            NodeId::from_name(name),
            parsed.host,
            parsed.port,
        )),
        None => Ok(parsed),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEED_TOML: &str = r#"
[consensus]
algorithm = "gpu_optimized_raft"
node_id = "node-001"
bind_address = "0.0.0.0:7000"
bootstrap_peers = ["node-002:7000", "node-003:7000"]
min_cluster_size = 3
election_timeout_ms = 150
heartbeat_interval_ms = 50
request_timeout_ms = 1000
gpu_enabled = true
gpu_device_id = 0
gpu_memory_pool_mb = 1024
state_dir = "/var/lib/stratoswarm/consensus"
snapshot_interval = 1000
byzantine_fault_tolerance = true
byzantine_threshold = 0.33

[http]
address = "127.0.0.1:8080"
"#;

    #[test]
    fn the_seed_file_parses_with_every_key() {
        let config = ConsensusConfig::from_toml_str(SEED_TOML).unwrap();
        assert_eq!(config.algorithm, Algorithm::GpuOptimizedRaft);
        assert_eq!(config.peers.len(), 2);
        assert_eq!(config.min_cluster_size, 3);
        assert_eq!(config.election.election_timeout, Duration::from_millis(150));
        assert_eq!(config.gpu_memory_pool, 1024 << 20);
        assert_eq!(
            config.persistent_state.unwrap(),
            PathBuf::from("/var/lib/stratoswarm/consensus")
        );
        assert!(config.byzantine_fault_tolerance);
    }

    #[test]
    fn a_bad_value_is_named_in_the_error() {
        let text = SEED_TOML.replace("heartbeat_interval_ms = 50", "heartbeat_interval_ms = 100");
        let error = ConsensusConfig::from_toml_str(&text)
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("election_timeout_ms") && error.contains("150"),
            "{error}"
        );
        let text = SEED_TOML.replace("\"gpu_optimized_raft\"", "\"paxos\"");
        let error = ConsensusConfig::from_toml_str(&text)
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("algorithm") && error.contains("paxos"),
            "{error}"
        );
    }

    #[test]
    fn an_unknown_key_or_wrong_type_is_an_error() {
        let text = SEED_TOML.replace("snapshot_interval", "snapshot_intervall");
        let error = ConsensusConfig::from_toml_str(&text)
            .unwrap_err()
            .to_string();
        assert!(error.contains("snapshot_intervall"), "{error}");
        let text = SEED_TOML.replace("min_cluster_size = 3", "min_cluster_size = \"three\"");
        assert!(ConsensusConfig::from_toml_str(&text).is_err());
    }

    #[test]
    fn builder_sets_seed_fields_and_converts_to_ticks() {
        let config = ConsensusConfig::default()
            .node_id("a")
            .peers(vec!["b", "c"])
            .batch_size(10)
            .batch_timeout(Duration::from_millis(10))
            .max_batch_bytes(4096)
            .enable_batching(true)
            .view_change_timeout(Duration::from_secs(5))
            .checkpoint_interval(100);
        config.validate().unwrap();
        let raft = config.raft_config();
        assert_eq!(raft.voters.len(), 3);
        assert_eq!(
            (raft.election_timeout_ticks, raft.heartbeat_interval_ticks),
            (15, 5)
        );
        assert_eq!(raft.batch_timeout_ticks, 1);
        assert_eq!(raft.batch_size, 10);
    }

    #[test]
    fn the_driver_spin_comes_from_toml_and_a_busy_loop_is_refused() {
        let parse = |line: &str| {
            ConsensusConfig::from_toml_str(&format!("[consensus]\nnode_id = \"a\"\n{line}\n"))
        };
        assert_eq!(parse("").unwrap().driver_spin, None);
        assert_eq!(
            parse("driver_spin_us = 0").unwrap().driver_spin,
            Some(Duration::ZERO)
        );
        let most = MAX_DRIVER_SPIN.as_micros();
        assert_eq!(
            parse(&format!("driver_spin_us = {most}"))
                .unwrap()
                .driver_spin,
            Some(MAX_DRIVER_SPIN)
        );
        let error = parse(&format!("driver_spin_us = {}", most + 1))
            .unwrap_err()
            .to_string();
        assert!(error.contains("driver_spin_us"), "{error}");
        // The reason is a literal: it must name the bound the check uses.
        assert!(error.contains(&most.to_string()), "{error}");
        let error = ConsensusConfig::default()
            .driver_spin(Some(Duration::from_secs(1)))
            .validate()
            .unwrap_err()
            .to_string();
        assert!(error.contains("driver_spin_us"), "{error}");
    }

    #[test]
    fn the_leader_linger_comes_from_toml_and_is_bounded() {
        let parse = |line: &str| {
            ConsensusConfig::from_toml_str(&format!("[consensus]\nnode_id = \"a\"\n{line}\n"))
        };
        assert_eq!(parse("").unwrap().leader_linger, None);
        assert_eq!(
            parse("leader_linger_us = 200").unwrap().leader_linger,
            Some(Duration::from_micros(200))
        );
        let most = MAX_DRIVER_SPIN.as_micros();
        let error = parse(&format!("leader_linger_us = {}", most + 1))
            .unwrap_err()
            .to_string();
        assert!(error.contains("leader_linger_us"), "{error}");
        let error = ConsensusConfig::default()
            .leader_linger(Some(Duration::from_secs(1)))
            .validate()
            .unwrap_err()
            .to_string();
        assert!(error.contains("leader_linger_us"), "{error}");
        assert_eq!(parse("").unwrap().leader_linger_per_entry, None);
        assert_eq!(
            parse("leader_linger_per_entry_us = 70")
                .unwrap()
                .leader_linger_per_entry,
            Some(Duration::from_micros(70))
        );
        let error = parse(&format!("leader_linger_per_entry_us = {}", most + 1))
            .unwrap_err()
            .to_string();
        assert!(error.contains("leader_linger_per_entry_us"), "{error}");
    }

    #[test]
    fn the_default_linger_is_scaled_over_tcp_none_in_process_and_a_set_one_is_kept() {
        let micros = Duration::from_micros;
        let default = ConsensusConfig::default();
        let tcp_default = (
            DEFAULT_TCP_LEADER_LINGER,
            Some(DEFAULT_TCP_LEADER_LINGER_PER_ENTRY),
        );
        assert_eq!(default.effective_leader_linger(true), tcp_default);
        assert_eq!(
            default.effective_leader_linger(false),
            (Duration::ZERO, None)
        );
        // A step alone scales the default cap; a linger set keeps its own meaning.
        let stepped = default.clone().leader_linger_per_entry(Some(micros(20)));
        assert_eq!(
            stepped.effective_leader_linger(true),
            (DEFAULT_TCP_LEADER_LINGER, Some(micros(20)))
        );
        let fixed = default.clone().leader_linger(Some(micros(200)));
        assert_eq!(fixed.effective_leader_linger(true), (micros(200), None));
        assert_eq!(fixed.effective_leader_linger(false), (micros(200), None));
        let off = default.clone().leader_linger(Some(Duration::ZERO));
        assert_eq!(off.effective_leader_linger(true).0, Duration::ZERO);
        // PBFT has no leader rounds to gather.
        let pbft = fixed.algorithm(crate::Algorithm::Pbft);
        assert_eq!(pbft.effective_leader_linger(true), (Duration::ZERO, None));
        assert_eq!(
            ConsensusConfig::default()
                .algorithm(crate::Algorithm::Pbft)
                .effective_leader_linger(true),
            (Duration::ZERO, None)
        );
    }

    #[test]
    fn the_snapshot_interval_defaults_to_ten_thousand_and_comes_from_toml() {
        let parse = |line: &str| {
            ConsensusConfig::from_toml_str(&format!("[consensus]\nnode_id = \"a\"\n{line}\n"))
        };
        let default = parse("").unwrap();
        assert_eq!(default.snapshot_interval, 10_000);
        assert_eq!(default.snapshot_interval, DEFAULT_SNAPSHOT_INTERVAL);
        // The log keeps what the interval says, under Raft.
        assert_eq!(default.raft_config().log_retention, 10_000);
        let seed = ConsensusConfig::from_toml_str(SEED_TOML).unwrap();
        assert_eq!(seed.snapshot_interval, 1000);
        let error = parse("snapshot_interval = 0").unwrap_err().to_string();
        assert!(error.contains("snapshot_interval"), "{error}");
    }

    #[test]
    fn read_mode_and_drift_come_from_toml_and_bad_ones_are_named() {
        let text =
            "[consensus]\nnode_id = \"a\"\nread_mode = \"lease\"\nmax_clock_drift_percent = 10\n";
        let config = ConsensusConfig::from_toml_str(text).unwrap();
        assert_eq!(config.read_mode, ReadMode::Lease);
        assert_eq!(config.max_clock_drift_percent, 10);
        assert!(config.raft_config().lease_reads);
        assert!(config.unread_settings().is_empty());
        let default = ConsensusConfig::from_toml_str("[consensus]\nnode_id = \"a\"\n").unwrap();
        assert_eq!(default.read_mode, ReadMode::ReadIndex);
        assert!(!default.raft_config().lease_reads);
        for (bad, field) in [
            ("read_mode = \"stale\"", "read_mode"),
            ("max_clock_drift_percent = 100", "max_clock_drift_percent"),
        ] {
            let text = format!("[consensus]\nnode_id = \"a\"\n{bad}\n");
            let error = ConsensusConfig::from_toml_str(&text)
                .unwrap_err()
                .to_string();
            assert!(error.contains(field), "{bad}: {error}");
        }
        // A lease needs an election timeout of enough ticks at the drift bound.
        let short = ConsensusConfig::default()
            .read_mode(ReadMode::Lease)
            .max_clock_drift_percent(99);
        let error = short.validate().unwrap_err().to_string();
        assert!(error.contains("read_mode"), "{error}");
        // Under PBFT the read mode is not read; outside leases the drift bound is not.
        let pbft = ConsensusConfig::default()
            .algorithm(Algorithm::Pbft)
            .read_mode(ReadMode::Log);
        assert_eq!(pbft.unread_settings(), vec!["read_mode"]);
        // Only Raft compacts its log.
        let snapshots = ConsensusConfig::default().snapshot_interval(5);
        assert!(snapshots.unread_settings().is_empty());
        let pbft = snapshots.algorithm(Algorithm::Pbft);
        assert_eq!(pbft.unread_settings(), vec!["snapshot_interval"]);
        let drift = ConsensusConfig::default().max_clock_drift_percent(10);
        assert_eq!(drift.unread_settings(), vec!["max_clock_drift_percent"]);
    }

    #[test]
    fn unread_settings_names_only_the_changed_ones() {
        assert!(ConsensusConfig::default().unread_settings().is_empty());
        // The seed file leaves every unread key at its default except these two (its algorithm,
        // GPU-optimized Raft, reads `gpu_enabled` but keeps its whole log, and its
        // `snapshot_interval = 1000` is not the default).
        let seed = ConsensusConfig::from_toml_str(SEED_TOML).unwrap();
        assert_eq!(
            seed.unread_settings(),
            vec!["snapshot_interval", "byzantine_fault_tolerance"]
        );
        // Settings that are read do not count.
        let used = ConsensusConfig::default()
            .batch_size(7)
            .request_timeout(Duration::from_secs(9));
        assert!(used.unread_settings().is_empty());
        let mut all = ConsensusConfig::default()
            .snapshot_interval(5)
            .view_change_timeout(Duration::from_secs(1))
            .checkpoint_interval(7)
            .gpu_enabled(true)
            .gpu_device(1)
            .gpu_memory_pool(1 << 20)
            .gpu_config(GpuConfig {
                device_id: 2,
                ..GpuConfig::default()
            });
        all.byzantine_fault_tolerance = true;
        all.byzantine_threshold = 0.2;
        assert_eq!(
            all.unread_settings(),
            vec![
                "view_change_timeout",
                "checkpoint_interval",
                "byzantine_fault_tolerance",
                "byzantine_threshold",
                "gpu_enabled",
                "gpu_device",
                "gpu_memory_pool",
                "gpu_config",
            ]
        );
    }

    #[test]
    fn keys_are_unread_settings_under_raft_only() {
        let keyed = ConsensusConfig::default()
            .key_file("a.key")
            .validator("node-001", "00");
        assert_eq!(keyed.unread_settings(), vec!["key_file", "validators"]);
        for algorithm in [Algorithm::Pbft, Algorithm::GpuOptimizedRaft] {
            assert!(
                keyed
                    .clone()
                    .algorithm(algorithm)
                    .unread_settings()
                    .is_empty()
            );
        }
    }

    #[test]
    fn duplicate_members_are_refused() {
        let config = ConsensusConfig::default().node_id("a").peers(vec!["a"]);
        assert!(config.validate().is_err());
    }
}
