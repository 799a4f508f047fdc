//! [`ConsensusEngine`]: the public face of a node. It owns the clocks, sockets, disk and threads,
//! and drives the same sans-IO core that the simulator drives.
//!
//! Every client call has a deadline ([`ConsensusConfig::request_timeout`]): a call answers with a
//! commit, a definite refusal ([`ConsensusResult::Rejected`]: never appended, never will be), or
//! [`Error::Timeout`] when the outcome is unknown. The deadline counts from when the driver
//! thread takes the call in (microseconds after it is made, unless the driver's input queue is
//! backed up), so that a call reads no clock of its own. The driver answers each call by its
//! deadline (it checks them every tick), so a call never hangs; only a driver held up inside the
//! log store or the state machine answers late, once that call returns.
//!
//! A call made on a multi-threaded tokio runtime is answered through a dispatcher task the engine
//! starts on that runtime, which takes each round's answers in one hand-off (see `reply.rs`);
//! other calls are answered by the driver thread directly. Without a data directory the log is
//! kept once, in the protocol core, and survives a stop and start of the same engine
//! (see `retained.rs`).

pub(crate) mod apply;
mod core;
mod disk_space;
mod driver;
mod election_traces;
mod handover;
mod local;
mod membership_calls;
mod pending;
mod precise_timer;
mod reply;
mod retained;
mod retired_routes;
mod snapshots;
mod traces;

pub use self::core::EngineNetwork;
pub use driver::{Inbox, LeaderInfo};
pub use local::{LocalNetwork, LocalTransport};

use std::collections::HashMap;
use std::sync::mpsc::TrySendError;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Instant;

use bytes::Bytes;
use tokio::sync::{oneshot, watch};

use crate::config::{Algorithm, ConsensusConfig};
use crate::error::{Error, Result};
use crate::keys::SigningIdentity;
use crate::metrics::{Metrics, MetricsSnapshot};
use crate::protocol::RejectReason;
use crate::protocol::gpu_raft::GpuRaftNode;
use crate::protocol::pbft::PbftNode;
use crate::protocol::raft::RaftNode;
use crate::state_machine::{ErasedStateMachine, StateMachine, encode_command};
use crate::storage::{FjallLogStore, LogStore, SyncPolicy};
use crate::sync::lock;
use crate::telemetry::latency_probe::{self, Hop};
use crate::transport::Transport;
use crate::transport::tcp::{Deliver, Inbound, TcpTransport};
use crate::types::{ConsensusResult, NodeId, Proposal};

use self::core::{CoreInputs, CoreSettings, EngineCore, Network, TcpHandle};
use self::snapshots::SnapshotTaker;
use apply::{ApplyStage, Unanswered};
use driver::{Applied, ClientRequest, Driver, DriverSettings, LeaderCallbacks};
use reply::{ReplyPoster, ReplyRouter};
use retained::{CoreHeldLog, RetainedState};

/// Bound on the driver's input queue; beyond it proposals are refused as overloaded and peer
/// messages dropped (the protocol retransmits).
const INPUT_QUEUE_CAPACITY: usize = 1 << 16;

/// How long an idle driver polls its input queue before parking (see `DriverSettings::spin`).
/// Measured on 2 cores with the in-process bench: one client's commit takes 10 to 16 µs with
/// it and 28 to 41 µs without.
const DRIVER_SPIN: std::time::Duration = std::time::Duration::from_micros(50);

/// The same for an engine over TCP, whose answers are a network round trip away (on loopback
/// here: 40 µs and a wake-up, often past 50). `cargo bench --bench consensus`, interleaved,
/// 150 against 50 µs: tcp_memory p99 105 against 121-126 µs, concurrent_256 547-574 against
/// 493-506 k/s; 0 (park at once) doubled the single client's p50 (a parked thread on an idle
/// virtual core wakes slowly).
const TCP_DRIVER_SPIN: std::time::Duration = std::time::Duration::from_micros(150);

/// How long [`ConsensusEngine::start`] waits for `host:port` peers to tell their ids.
const PEER_DISCOVERY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// A node of [`ConsensusEngine::peer_directory`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerEntry {
    /// Its name (`node_id` in its configuration).
    pub name: String,
    /// Where it listens for peers (`host:port`), if this node knows.
    pub address: Option<String>,
}

/// What runs once [`ConsensusEngine::start`] succeeded.
struct Running {
    inputs: CoreInputs,
    thread: Option<JoinHandle<std::result::Result<(), crate::error::StorageError>>>,
    /// Dropped once the transport has shut down: the driver's thread, which runs the
    /// transport's tasks on its runtime, then ends.
    io_release: Option<oneshot::Sender<()>>,
    /// The TCP transport and the task passing its unreachable-peer hints to the driver.
    tcp: Option<(TcpHandle, tokio::task::JoinHandle<()>)>,
    /// The voters the protocol started with (this node included), for [`ConsensusEngine::members`].
    voters: Vec<NodeId>,
    /// The membership in force, as the driver last saw it (see [`ConsensusEngine::membership`]).
    membership: Arc<Mutex<Option<crate::membership::Membership>>>,
}

/// One consensus node.
pub struct ConsensusEngine {
    config: ConsensusConfig,
    /// This node's key and every member's, for the algorithms that sign their messages.
    identity: Option<SigningIdentity>,
    /// What checks peers' signatures (see [`ConsensusEngine::with_signature_verifier`]).
    verifier: Option<Arc<dyn crate::gpu::SignatureVerifier>>,
    /// What counts PBFT votes (see [`ConsensusEngine::with_vote_aggregator`]).
    votes: Option<Arc<dyn crate::gpu::VoteAggregator>>,
    /// Byzantine settings, detections and their listeners (shared with the driver).
    byzantine: crate::byzantine::SharedByzantine,
    /// The Byzantine settings the core runs with.
    byzantine_config: crate::byzantine::ByzantineConfig,
    /// With `gpu_enabled` under PBFT: the adapter of the GPU verifier, or why there is none.
    gpu_verifier: Option<std::result::Result<String, String>>,
    /// The peer TLS identity given with [`ConsensusEngine::with_peer_tls`], used instead of
    /// reading [`ConsensusConfig::tls`].
    peer_tls: Option<crate::transport::tcp::PeerTls>,
    /// Held until start; behind a mutex only so that the engine is `Sync` (stores and state
    /// machines need only be `Send`), never contended.
    store: Mutex<Option<Box<dyn LogStore>>>,
    network: Option<Network>,
    state_machine: Mutex<Option<Box<dyn ErasedStateMachine>>>,
    metrics: Arc<Metrics>,
    leader: watch::Sender<LeaderInfo>,
    /// Set when the driver stopped because the store failed (see
    /// [`ConsensusEngine::storage_failed`]).
    storage_failed: watch::Sender<bool>,
    /// The index of the committed membership that removed this node, while it is removed
    /// (see [`ConsensusEngine::removed`]).
    removed: watch::Sender<Option<crate::types::LogIndex>>,
    leader_callbacks: LeaderCallbacks,
    /// Hands the driver's answers to dispatcher tasks on the callers' runtimes.
    replies: Arc<ReplyRouter>,
    /// Without a durable store: the node's state between a stop and the next start.
    retained: RetainedState,
    /// Picks the proposals that are traced.
    trace_sampler: crate::telemetry::TraceSampler,
    /// Refuses writes while the state directory's filesystem is under its reserve.
    disk_space: disk_space::DiskSpaceGate,
    running: Option<Running>,
}

impl std::fmt::Debug for ConsensusEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConsensusEngine")
            .field("node_id", &self.config.node_id)
            .field("running", &self.running.is_some())
            .finish_non_exhaustive()
    }
}

impl ConsensusEngine {
    /// Validates `config` and prepares a node. Nothing runs until [`ConsensusEngine::start`].
    ///
    /// Refuses an algorithm that is not available yet with [`Error::Unsupported`], rather than
    /// silently running another one. For PBFT, reads and checks the signing key and the
    /// validator table ([`ConsensusConfig::signing_identity`]) here, so that a key problem is
    /// reported before anything starts.
    pub fn new(config: ConsensusConfig) -> Result<Self> {
        let trace_sampler = crate::telemetry::TraceSampler::new(
            config.trace_sample_ratio,
            config.trace_max_per_second,
        );
        config.validate()?;
        let byzantine_config = crate::byzantine::ByzantineConfig {
            fault_threshold: config.byzantine_threshold,
            detection_enabled: config.byzantine_fault_tolerance,
            punishment_policy: crate::byzantine::PunishmentPolicy::Exclude,
        };
        let identity = match config.algorithm {
            Algorithm::Raft => None,
            Algorithm::Pbft => {
                if config.byzantine_fault_tolerance {
                    byzantine_config.validate_for(config.voter_ids().len())?;
                }
                Some(config.signing_identity()?)
            }
            Algorithm::GpuOptimizedRaft => Some(config.signing_identity()?),
        };
        let disk_space = disk_space::DiskSpaceGate::new(
            config.persistent_state.clone(),
            config.disk_reserve_bytes,
        );
        Ok(ConsensusEngine {
            config,
            identity,
            verifier: None,
            votes: None,
            gpu_verifier: None,
            peer_tls: None,
            byzantine: Default::default(),
            byzantine_config,
            store: Mutex::new(None),
            network: None,
            state_machine: Mutex::new(None),
            metrics: Arc::new(Metrics::new()),
            leader: watch::Sender::new(LeaderInfo::default()),
            storage_failed: watch::Sender::new(false),
            removed: watch::Sender::new(None),
            leader_callbacks: Arc::new(Mutex::new(Vec::new())),
            replies: Arc::new(ReplyRouter::default()),
            retained: RetainedState::default(),
            trace_sampler,
            disk_space,
            running: None,
        })
    }

    /// Secures the peer connections with `tls`, a TLS identity already loaded, instead of
    /// reading the files of [`ConsensusConfig::tls`] at start (which are then not read, and
    /// may be absent): e.g. [`PeerTls::from_pem`](crate::transport::tcp::PeerTls::from_pem)
    /// over PEM text from a secret store, or the identity a program loaded once for an HTTPS
    /// listener of its own, as `consensus-node` does. It is checked as the files would be:
    /// [`ConsensusEngine::start`] refuses a certificate that names another node than
    /// `node_id`, and a configuration with `insecure_plaintext`. Only the TCP transport reads
    /// it.
    pub fn with_peer_tls(mut self, tls: crate::transport::tcp::PeerTls) -> Self {
        self.peer_tls = Some(tls);
        self
    }

    /// Uses `store` for the log and hard state instead of the one the configuration implies.
    pub fn with_log_store(mut self, store: impl LogStore + 'static) -> Self {
        self.store = Mutex::new(Some(Box::new(store)));
        self
    }

    /// Checks peers' signatures (PBFT, GPU-optimized Raft) with `verifier` instead of the CPU one: e.g. an
    /// [`AutoSignatureVerifier`](crate::gpu::AutoSignatureVerifier) over a GPU context, which
    /// sends batches above its crossover to the GPU. The driver hands it each round's
    /// signatures as one batch. Plain Raft signs nothing and ignores it.
    ///
    /// Without it, a signing engine with [`ConsensusConfig::gpu_enabled`] opens the automatic
    /// verifier over one GPU context per process (the first start pays for compiling the
    /// pipelines: seconds on a cold shader cache); otherwise the CPU checks signatures.
    pub fn with_signature_verifier(
        mut self,
        verifier: Arc<dyn crate::gpu::SignatureVerifier>,
    ) -> Self {
        self.verifier = Some(verifier);
        self
    }

    /// Counts PBFT prepares and commits, or GPU-optimized Raft acknowledgements, with
    /// `aggregator` instead of the CPU one: each driver round's votes go to it as one batch (e.g. an
    /// [`AdaptiveVoteAggregator`](crate::gpu::AdaptiveVoteAggregator), which sends batches
    /// above its crossover to the GPU). Only its counts are used; the replica judges them by
    /// its own quorum, whatever the aggregator's threshold. Plain Raft ignores it.
    ///
    /// Without it, a signing engine with [`ConsensusConfig::gpu_enabled`] uses the automatic one
    /// over the same GPU context as its signature verifier.
    pub fn with_vote_aggregator(mut self, aggregator: Arc<dyn crate::gpu::VoteAggregator>) -> Self {
        self.votes = Some(aggregator);
        self
    }

    /// Sets how this node treats Byzantine replicas (instead of the configuration's
    /// `byzantine_fault_tolerance` and `byzantine_threshold`). Needs PBFT: Raft assumes no
    /// replica lies. Refuses a threshold the member count cannot honour, saying why.
    pub fn with_byzantine_config(
        mut self,
        config: crate::byzantine::ByzantineConfig,
    ) -> Result<Self> {
        if self.config.algorithm != Algorithm::Pbft {
            return Err(Error::Unsupported {
                what: format!(
                    "Byzantine tolerance under {}",
                    self.config.algorithm.as_str()
                ),
                reason: "Raft assumes no replica lies; use algorithm pbft",
            });
        }
        config.validate_for(self.config.voter_ids().len())?;
        self.byzantine_config = config;
        Ok(self)
    }

    /// Registers `detector` to see every replica this node proves Byzantine.
    pub fn register_detector(&self, detector: crate::byzantine::ByzantineDetector) {
        lock(&self.byzantine).detectors.push(detector);
    }

    /// Runs `callback` with each replica this node proves Byzantine, once per offender, on the
    /// driver thread (keep it short). Under [`PunishmentPolicy::Exclude`] the offender is
    /// already excluded when it runs.
    ///
    /// [`PunishmentPolicy::Exclude`]: crate::byzantine::PunishmentPolicy::Exclude
    pub fn on_byzantine_detected(&self, callback: impl Fn(NodeId) + Send + 'static) {
        lock(&self.byzantine).callbacks.push(Box::new(callback));
    }

    /// The offenders this node holds evidence against, and those it excludes.
    pub fn byzantine_report(&self) -> crate::byzantine::ByzantineReport {
        lock(&self.byzantine).report.clone()
    }

    /// Under PBFT or GPU-optimized Raft with [`ConsensusConfig::gpu_enabled`], once started: `Ok(adapter name)` when
    /// signatures go to a GPU verifier (above its crossover batch size), or `Err(why not)` when
    /// the CPU checks them all; `None` when the engine opened no GPU verifier.
    pub fn gpu_signature_verifier(&self) -> Option<std::result::Result<&str, &str>> {
        self.gpu_verifier
            .as_ref()
            .map(|status| status.as_ref().map(String::as_str).map_err(String::as_str))
    }

    /// Joins an in-process network (no sockets) instead of TCP: a `LocalNetwork` (Raft's) or a
    /// `LocalNetwork<PbftNode>`, matching [`ConsensusConfig::algorithm`] (a mismatch is refused
    /// at [`ConsensusEngine::start`]).
    pub fn with_local_network(mut self, network: &impl EngineNetwork) -> Self {
        self.network = Some(network.to_network());
        self
    }

    /// Sets the replicated state machine. It must be set before [`ConsensusEngine::start`], so
    /// that it sees every committed command from the first: a state machine attached later would
    /// miss history and diverge from its replicas.
    pub fn set_state_machine<S: StateMachine>(&mut self, state_machine: S) -> Result<()> {
        if self.running.is_some() {
            return Err(Error::InvalidState(
                "set_state_machine must be called before start",
            ));
        }
        self.state_machine = Mutex::new(Some(Box::new(state_machine)));
        Ok(())
    }

    /// This node's id.
    pub fn node_id(&self) -> NodeId {
        self.config.id()
    }

    /// The cluster's voting members, sorted. Before start, the ids the configuration names
    /// (this node included). Once started, the voters in force: under Raft those of
    /// [`ConsensusEngine::membership`] (both sets while a change is under way; none on a node
    /// that joined and was not added yet), otherwise the voters the protocol runs with (peers
    /// given as `host:port` are known by their handshake ids).
    pub fn members(&self) -> Vec<NodeId> {
        match &self.running {
            Some(running) => match lock(&running.membership).as_ref() {
                Some(membership) => membership.all_voters().into_iter().collect(),
                None => running.voters.clone(),
            },
            None => self.config.voter_ids(),
        }
    }

    /// The configuration the engine runs with.
    pub fn config(&self) -> &ConsensusConfig {
        &self.config
    }

    /// Recovers the log store and starts the protocol.
    pub async fn start(&mut self) -> Result<()> {
        if self.running.is_some() {
            return Err(Error::InvalidState("engine already started"));
        }
        // Without a store of the caller's or a data directory, the core's own log is the only
        // copy (a second one in memory was never read), and it is retained across a stop.
        let given_store = self.store.get_mut().ok().and_then(Option::take);
        let (store, recovered, retain): (Box<dyn LogStore>, _, _) =
            match (given_store, &self.config.persistent_state) {
                (Some(mut store), _) => {
                    let recovered = store.recover()?;
                    (store, Some(recovered), None)
                }
                (None, Some(dir)) => {
                    let mut store = FjallLogStore::open(dir, SyncPolicy::EveryBatch)?;
                    let recovered = store.recover()?;
                    (Box::new(store), Some(recovered), None)
                }
                (None, None) => (Box::new(CoreHeldLog), None, Some(self.retained.clone())),
            };
        match self.config.algorithm {
            Algorithm::Raft => self.start_core::<RaftNode>(store, recovered, retain).await,
            Algorithm::Pbft => self.start_core::<PbftNode>(store, recovered, retain).await,
            Algorithm::GpuOptimizedRaft => {
                self.start_core::<GpuRaftNode>(store, recovered, retain)
                    .await
            }
        }
    }

    /// Connects core `P` to its peers, builds it from what the store recovered, and starts its
    /// driver thread.
    async fn start_core<P>(
        &mut self,
        store: Box<dyn LogStore>,
        recovered: Option<crate::storage::RecoveredState>,
        retain: Option<RetainedState>,
    ) -> Result<()>
    where
        P: EngineCore,
        P::Message: serde::Serialize + serde::de::DeserializeOwned,
    {
        // Before the transport starts: its counters are labelled with these names.
        self.metrics.set_member_names(
            self.config
                .peer_names()
                .into_iter()
                .chain([self.config.node_id.as_str()])
                .map(|name| (NodeId::from_name(name), name.to_string())),
        );
        let (inputs, receiver) = driver::input_queue::<P>(INPUT_QUEUE_CAPACITY);
        let inbox = Inbox {
            sender: inputs.clone(),
        };
        let over_tcp = self.network.is_none();
        let (linger, linger_per_entry) = self.config.effective_leader_linger(over_tcp);
        // The driver's thread starts first, with its runtime: the TCP transport starts on it.
        // A reactor also times a linger to the microsecond (see `PreciseTimer`).
        let reactor = over_tcp || !linger.is_zero();
        let driver_thread = driver::start_thread::<P>(
            format!("consensus-{}", self.config.node_id),
            reactor,
            self.storage_failed.clone(),
        )
        .await
        .map_err(|error| Error::Io(format!("cannot start the driver's thread: {error}")))?;
        let io = driver_thread.runtime.clone();
        let mut members = self.config.voter_ids();
        let mut tcp = None;
        let transport: Arc<dyn Transport<P::Message>> = match &self.network {
            Some(network) => {
                let network = P::local_network(network).ok_or(Error::InvalidState(
                    "the local network given runs another algorithm than the configuration's",
                ))?;
                network.register(self.node_id(), inbox);
                Arc::new(network.transport(self.node_id()))
            }
            None => {
                if !P::LEARNS_MEMBERS_BY_HANDSHAKE {
                    self::core::require_named_peers(&self.config)?;
                }
                let (transport, voters, hints) = self.start_tcp::<P>(inbox, &io).await?;
                if P::LEARNS_MEMBERS_BY_HANDSHAKE {
                    members = voters;
                }
                tcp = Some((P::tcp(transport.clone()), hints));
                transport
            }
        };
        #[cfg(feature = "gpu")]
        if self.verifier.is_none() && self.config.gpu_enabled && self.identity.is_some() {
            let config = self.config.clone();
            let shared =
                tokio::task::spawn_blocking(move || self::core::shared_gpu_verifier(&config))
                    .await
                    .map_err(|error| Error::Io(error.to_string()))?;
            self.verifier = Some(shared.verifier);
            self.votes.get_or_insert(shared.votes);
            self.gpu_verifier = Some(shared.gpu);
            if let Some(context) = shared.context {
                let dispatches = context.clone();
                self.metrics
                    .watch_gpu_fallbacks(Box::new(move || context.cpu_fallback_count()));
                self.metrics
                    .watch_gpu_dispatches(Box::new(move || dispatches.metrics().submissions));
            }
        }
        lock(&self.byzantine).policy = self.byzantine_config.punishment_policy;
        let settings = CoreSettings {
            config: self.config.clone(),
            identity: self.identity.clone(),
            verifier: self.verifier.clone(),
            votes: self.votes.clone(),
            byzantine: self.byzantine_config,
        };
        // Checked before the retained state is taken, so that a refused start keeps it.
        P::check(&settings, &members)?;
        let recovered = match recovered {
            Some(recovered) => recovered,
            None => self.retained.take().ok_or(Error::InvalidState(
                "this engine keeps its state in memory and lost it when its driver failed; \
                 starting blank could vote twice in a term: use a new node id, or persistent_state",
            ))?,
        };
        let snapshot = recovered.snapshot.clone();
        let snapshot_index = snapshot.as_ref().map_or(0, |snapshot| snapshot.index);
        if recovered.entries.first().is_some_and(|e| e.index > 1) && snapshot.is_none() {
            // The state machine would need the snapshot that replaced the missing prefix.
            return Err(Error::Storage(crate::error::StorageError::Corrupt {
                location: "log start".into(),
                detail: "the log was compacted but no snapshot covers its missing prefix".into(),
            }));
        }
        let persisted_through = recovered
            .entries
            .last()
            .map_or(snapshot_index, |entry| entry.index.max(snapshot_index));
        let node = P::build(&settings, members.clone(), recovered)?;
        for setting in self.config.unread_settings() {
            tracing::warn!(
                setting,
                "configured but not used by this version; see its rustdoc"
            );
        }
        let state_machine = self.state_machine.get_mut().ok().and_then(Option::take);
        let mut apply =
            ApplyStage::new(self.config.id(), rand::random::<u64>() >> 1, state_machine);
        if let Some(snapshot) = &snapshot {
            // The state machine starts from the latest snapshot; the log after it replays.
            apply.restore(snapshot, &mut Vec::new()).map_err(|detail| {
                Error::Storage(crate::error::StorageError::Corrupt {
                    location: format!("snapshot through index {}", snapshot.index),
                    detail,
                })
            })?;
            self.metrics.set_applied_index(snapshot.index);
        }
        let invalid_seen = node.invalid_messages();
        let start_membership = node.membership();
        let retired_routes = retired_routes::RetiredRoutes::new(
            node.id(),
            start_membership.as_ref(),
            self.config.election.election_timeout * retired_routes::GRACE_ELECTION_TIMEOUTS,
        );
        let membership = Arc::new(Mutex::new(start_membership));
        // A store written before snapshots existed keeps the whole log.
        let snapshots = SnapshotTaker::new(
            if P::COMPACTS_LOG && store.supports_snapshots() {
                self.config.snapshot_interval
            } else {
                0
            },
            snapshot_index,
            store.snapshot_stager(),
        );
        let driver = Driver {
            invalid_seen,
            persisted_through,
            apply,
            answers: Vec::new(),
            node,
            persist_beside: tcp.is_some() && store.waits_for_disk(),
            in_flight: None,
            spare_output: Default::default(),
            linger_until: None,
            store: Arc::new(Mutex::new(store)),
            transport,
            inputs: receiver,
            metrics: self.metrics.clone(),
            leader: self.leader.clone(),
            leader_callbacks: self.leader_callbacks.clone(),
            byzantine: self.byzantine.clone(),
            settings: DriverSettings {
                tick: self.config.tick(),
                request_timeout: self.config.request_timeout,
                flush_on_drain: self.config.batch_timeout.is_zero() || !self.config.enable_batching,
                max_inputs_per_round: 4096,
                spin: self.config.driver_spin.unwrap_or(if tcp.is_some() {
                    TCP_DRIVER_SPIN
                } else {
                    DRIVER_SPIN
                }),
                io_on_this_thread: tcp.is_some(),
                reactor_on_this_thread: reactor,
                write_stall: match self.config.algorithm {
                    crate::Algorithm::Pbft => self.config.view_change_timeout,
                    _ => self.config.election.election_timeout,
                },
                linger,
                linger_per_entry,
                catch_up_ticks: (self.config.read_mode == crate::ReadMode::Lease).then(|| {
                    self.config
                        .raft_config()
                        .election_timeout_ticks
                        .saturating_mul(2)
                }),
            },
            replies: ReplyPoster::new(self.replies.clone()),
            retain,
            traces: traces::ProposalTraces::default(),
            elections: Default::default(),
            snapshots,
            snapshot_spans: Default::default(),
            membership: membership.clone(),
            membership_calls: Default::default(),
            removed: self.removed.clone(),
            retired_routes,
        };
        self.storage_failed.send_replace(false);
        if driver_thread.driver.send(driver).is_err() {
            return Err(Error::Stopped(
                "driver thread ended before it started".into(),
            ));
        }
        self.running = Some(Running {
            inputs: P::inputs(inputs),
            thread: Some(driver_thread.thread),
            io_release: Some(driver_thread.release),
            tcp,
            voters: members,
            membership,
        });
        Ok(())
    }

    /// Starts the tarpc transport on the driver's runtime `io`, learns the ids of peers given as
    /// `host:port` by handshake, and has inbound messages queued for the driver by the tasks
    /// that read them. Returns the voters (this node included) and the task that passes on the
    /// transport's unreachable-peer hints.
    async fn start_tcp<P>(
        &self,
        inbox: Inbox<P>,
        io: &tokio::runtime::Handle,
    ) -> Result<(
        Arc<TcpTransport<P::Message>>,
        Vec<NodeId>,
        tokio::task::JoinHandle<()>,
    )>
    where
        P: EngineCore,
        P::Message: serde::Serialize + serde::de::DeserializeOwned,
    {
        let peers = self.config.peer_addresses()?;
        let transport_config = self
            .config
            .tcp_transport_config_with(self.peer_tls.as_ref())?;
        match &transport_config.tls {
            Some(tls) => tracing::info!(
                certified_as = tls.node_name(),
                "peer connections use mutual TLS 1.3"
            ),
            None => tracing::warn!(
                bind = %transport_config.bind_address,
                "insecure_plaintext = true: peer connections are neither authenticated nor \
                 encrypted; anyone who reaches this port can act as a member"
            ),
        }
        let metrics = self.metrics.clone();
        let this_node = self.node_id();
        let counters: Mutex<HashMap<NodeId, prometheus_client::metrics::counter::Counter>> =
            Mutex::default();
        let feed = inbox.clone();
        let deliver: Deliver<P::Message> = Arc::new(move |inbound: Inbound<P::Message>| {
            latency_probe::stamp(Hop::Forwarded, this_node);
            lock(&counters)
                .entry(inbound.from)
                .or_insert_with(|| metrics.peer_messages_from(inbound.from))
                .inc();
            // A full queue drops the message, which the protocol retransmits.
            feed.deliver_traced(inbound.from, inbound.message, inbound.trace);
            true
        });
        let transport = io
            .spawn(TcpTransport::start_delivering(
                transport_config,
                peers.clone(),
                deliver,
            ))
            .await
            .map_err(|error| Error::Io(error.to_string()))?
            .map_err(|error| Error::Io(error.to_string()))?;
        let transport = Arc::new(transport);
        let watched = Arc::downgrade(&transport);
        self.metrics.watch_rejected_frames(Box::new(move || {
            watched
                .upgrade()
                .map_or(0, |transport| transport.stats().connections_rejected)
        }));
        // Peers named in the configuration are voters at once; the others once they said who
        // they are. The voter set must be known before the protocol starts.
        let named: Vec<NodeId> = peers.iter().filter_map(|p| p.node_id).collect();
        let unnamed = peers.len() - named.len();
        let deadline = Instant::now() + PEER_DISCOVERY_TIMEOUT;
        let mut voters = loop {
            let known = transport.known_peers();
            let learned = known.iter().filter(|id| !named.contains(id)).count();
            if learned >= unnamed {
                break known;
            }
            if Instant::now() > deadline {
                return Err(Error::Io(format!(
                    "{unnamed} peer(s) given as host:port did not complete a handshake within \
                     {PEER_DISCOVERY_TIMEOUT:?}; give them as name@host:port to start without them"
                )));
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        };
        voters.push(self.node_id());
        voters.sort();
        voters.dedup();
        let mut unreachable = transport.unreachable_peers();
        // Messages received before a hint are already queued: they are queued as they are read.
        let hints = io.spawn(async move {
            while let Some(peer) = unreachable.recv().await {
                inbox.peer_unreachable(peer);
            }
        });
        Ok((transport, voters, hints))
    }

    /// Resolves once the driver has stopped because the store failed (an fsync or a write
    /// failed, or the disk is full past its reserve): the node no longer takes part in
    /// consensus, nothing is retried, and [`ConsensusEngine::stop`] returns the typed
    /// [`Error::Storage`]. A server waits on it beside its shutdown signal.
    pub async fn storage_failed(&self) {
        let mut failed = self.storage_failed.subscribe();
        // The sender lives in `self`, so the channel stays open while this borrows it.
        let _ = failed.wait_for(|failed| *failed).await;
    }

    /// Resolves once a committed membership leaves this node out (Raft, GPU-optimized Raft), with the index of the
    /// entry that set it: the node neither votes nor campaigns and refuses requests
    /// ([`RejectReason::Removed`]); what is left is to stop it, which `consensus-node` does.
    /// Immediately if that happened already. A node removed while it was down learns it only
    /// from a member that tells it (a leader tells those it removes, once).
    pub async fn removed(&self) -> crate::types::LogIndex {
        let mut removed = self.removed.subscribe();
        // The sender lives in `self`, so the channel stays open while this borrows it.
        let index = removed.wait_for(Option::is_some).await.map(|index| *index);
        match index {
            Ok(index) => index.unwrap_or_default(),
            Err(_) => std::future::pending().await,
        }
    }

    /// Stops the node: pending calls get [`Error::Stopped`]. What was committed stays committed.
    ///
    /// A Raft leader first hands leadership to its most caught-up voter and waits for another
    /// node to lead, for at most two election timeouts, so that the others go on at once.
    pub async fn stop(&mut self) -> Result<()> {
        self.hand_over_leadership().await;
        let Some(mut running) = self.running.take() else {
            return Ok(());
        };
        if let Some(network) = &self.network {
            network.disconnect(self.node_id());
        }
        running.inputs.shutdown(true);
        if let Some((transport, hints)) = running.tcp.take() {
            hints.abort();
            transport.shutdown().await; // frees the port for a restart
        }
        drop(running.io_release.take());
        if let Some(thread) = running.thread.take() {
            let outcome = tokio::task::spawn_blocking(move || thread.join())
                .await
                .map_err(|error| Error::Io(error.to_string()))?;
            match outcome {
                Ok(Ok(())) => {}
                Ok(Err(error)) => return Err(Error::Storage(error)),
                Err(_) => return Err(Error::Stopped("driver thread panicked".into())),
            }
        }
        Ok(())
    }

    /// If this node leads (Raft), hands leadership to its most caught-up voter and waits until
    /// it knows another leader, for at most two election timeouts; returns whether another node
    /// leads. [`ConsensusEngine::stop`] does this first; a server calls it earlier, while it
    /// still answers its clients. Proposals made meanwhile go to the new leader.
    pub async fn hand_over_leadership(&self) -> bool {
        let Some(running) = &self.running else {
            return false;
        };
        let bound = self.config.election.election_timeout * 2;
        handover::hand_over(&running.inputs, &self.leader, self.node_id(), bound).await
    }

    /// Replicates `proposal`; answers once it is committed and applied on this node.
    pub async fn propose(&self, proposal: Proposal) -> Result<ConsensusResult> {
        self.disk_space.check(proposal.data.len() as u64)?;
        let data = self.encode_proposal(proposal.data, proposal.signature.as_ref())?;
        match self.submit(data).await {
            Ok(applied) => Ok(ConsensusResult::Committed {
                index: applied.index,
                term: applied.term,
            }),
            Err(Error::Rejected(reason)) => Ok(ConsensusResult::Rejected { reason }),
            Err(error) => Err(error),
        }
    }

    /// Like [`ConsensusEngine::propose`], with the moments the proposal was submitted, seen
    /// committed, and applied on this node (for latency breakdowns).
    pub async fn propose_timed(
        &self,
        proposal: Proposal,
    ) -> Result<(ConsensusResult, Option<ProposalTimings>)> {
        let submitted = Instant::now();
        let data = self.encode_proposal(proposal.data, proposal.signature.as_ref())?;
        match self.submit(data).await {
            Ok(applied) => {
                let timings = ProposalTimings {
                    submitted,
                    committed: applied.committed_at,
                    applied: applied.applied_at,
                };
                let result = ConsensusResult::Committed {
                    index: applied.index,
                    term: applied.term,
                };
                Ok((result, Some(timings)))
            }
            Err(Error::Rejected(reason)) => Ok((ConsensusResult::Rejected { reason }, None)),
            Err(error) => Err(error),
        }
    }

    /// Replicates a command of the state machine `S` and returns what applying it answered.
    ///
    /// The state machine's type is named at the call (`execute_command::<MyStore>(..)`): the
    /// engine holds it type-erased, so the seed's turbofish-free form cannot know the response
    /// type. A mismatch is reported as [`Error::StateMachine`], never a panic.
    ///
    /// A command the state machine marks read-only ([`StateMachine::is_read_only`]) is served
    /// as [`ConsensusEngine::read`] serves it, without a log write, unless
    /// [`ConsensusConfig::read_mode`] is [`ReadMode::Log`](crate::ReadMode::Log).
    pub async fn execute_command<S: StateMachine>(
        &self,
        command: S::Command,
    ) -> Result<S::Response> {
        if S::is_read_only(&command) && self.reads_outside_log() {
            return self.read::<S>(command).await;
        }
        self.execute_encoded::<S>(command, None).await
    }

    /// A linearizable read: applies the read-only `command` ([`StateMachine::is_read_only`]) to
    /// this node's state machine once that has applied everything committed before the call,
    /// and returns what it answered. Any node serves it: a follower asks the leader for its
    /// commit index and reads locally once it has caught up to it.
    ///
    /// How the leader proves that index current is [`ConsensusConfig::read_mode`]: a heartbeat
    /// round (ReadIndex, the default), a lease, or (`Log`) ordering the read through the log
    /// like a write. Under PBFT reads always go through the log, and so they do under
    /// GPU-optimized Raft with [`ConsensusConfig::client_keys`], where every command, reads
    /// included, must carry an allowed client's signature.
    ///
    /// A command that is not read-only is refused with [`Error::NotReadOnly`]: applying it on
    /// one node alone would make the replicas diverge. A read that cannot be confirmed (no
    /// leader within the retention, or the deadline) fails with [`Error::Rejected`] or
    /// [`Error::Timeout`]; retrying it is always safe.
    pub async fn read<S: StateMachine>(&self, command: S::Command) -> Result<S::Response> {
        if !S::is_read_only(&command) {
            return Err(Error::NotReadOnly);
        }
        let data = Bytes::from(encode_command(&command).map_err(Error::StateMachine)?);
        let applied = if self.reads_outside_log() {
            self.submit_read(data).await?
        } else {
            let data = self.encode_proposal(data, None)?;
            self.submit(data).await?
        };
        downcast_response::<S>(applied)
    }

    /// Whether reads are served outside the log (see [`ConsensusEngine::read`]).
    fn reads_outside_log(&self) -> bool {
        let config = &self.config;
        let reads_need_signatures =
            config.algorithm == Algorithm::GpuOptimizedRaft && !config.client_keys.is_empty();
        config.read_mode != crate::ReadMode::Log
            && config.algorithm != Algorithm::Pbft
            && !reads_need_signatures
    }

    /// [`ConsensusEngine::execute_command`] with a client's signature (GPU-optimized Raft; see
    /// [`Proposal::signed`]): refused with [`Error::Rejected`] and
    /// [`RejectReason::ClientSignature`] when it does not verify or its key is not allowed.
    pub async fn execute_signed_command<S: StateMachine>(
        &self,
        command: S::Command,
        signature: crate::ClientSignature,
    ) -> Result<S::Response> {
        self.execute_encoded::<S>(command, Some(&signature)).await
    }

    async fn execute_encoded<S: StateMachine>(
        &self,
        command: S::Command,
        signature: Option<&crate::ClientSignature>,
    ) -> Result<S::Response> {
        let data = encode_command(&command).map_err(Error::StateMachine)?;
        if !S::is_read_only(&command) {
            self.disk_space.check(data.len() as u64)?;
        }
        let data = self.encode_proposal(Bytes::from(data), signature)?;
        let applied = self.submit(data).await?;
        downcast_response::<S>(applied)
    }

    /// Hands a read of `command` to the driver and waits for its answer (see
    /// [`ConsensusEngine::submit_request`]).
    async fn submit_read(&self, command: Bytes) -> Result<Applied> {
        self.submit_request(|reply, route| ClientRequest::Read {
            command,
            reply,
            route,
        })
        .await
    }

    /// What goes into the log for a command: under GPU-optimized Raft, the command in its frame
    /// (see [`client_signature`](crate::client_signature)); elsewhere the command itself, and a
    /// signature is refused rather than silently dropped.
    fn encode_proposal(
        &self,
        data: Bytes,
        signature: Option<&crate::ClientSignature>,
    ) -> Result<Bytes> {
        if self.config.algorithm == Algorithm::GpuOptimizedRaft {
            return crate::client_signature::frame(&data, signature).map_err(|error| {
                Error::Rejected(RejectReason::ClientSignature { reason: error.0 })
            });
        }
        match signature {
            Some(_) => Err(Error::Unsupported {
                what: format!(
                    "signed client commands under {}",
                    self.config.algorithm.as_str()
                ),
                reason: "only gpu_optimized_raft checks and keeps client signatures",
            }),
            None => Ok(data),
        }
    }

    /// Hands the proposal of `data` to the driver and waits for its answer (see
    /// [`ConsensusEngine::submit_request`]).
    async fn submit(&self, data: Bytes) -> Result<Applied> {
        self.submit_request(|reply, route| ClientRequest::Propose {
            data,
            reply,
            route,
            trace: self.proposal_span(),
        })
        .await
    }

    /// Hands the request `make` builds (given where its answer goes) to the driver and waits
    /// for the answer. Reads no clock: the driver stamps the call's submit time and deadline
    /// when it takes the call in, with one clock reading for all the calls of its round (a
    /// reading per call showed in client profiles).
    async fn submit_request(
        &self,
        make: impl FnOnce(oneshot::Sender<driver::Reply>, u32) -> ClientRequest,
    ) -> Result<Applied> {
        let running = self
            .running
            .as_ref()
            .ok_or(Error::InvalidState("engine not started"))?;
        let (reply, answer) = oneshot::channel();
        let route = self.replies.route_here();
        match running.inputs.submit(make(reply, route)) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => {
                return Err(Error::Rejected(RejectReason::QueueFull));
            }
            Err(TrySendError::Disconnected(_)) => {
                return Err(Error::Stopped("engine is not running".into()));
            }
        }
        wait_for(answer).await
    }

    /// The sampler that picks this engine's traced proposals (see
    /// [`ConsensusConfig::trace_sample_ratio`]); a server that samples its requests asks this
    /// one, so that requests and proposals share one ratio and one cap.
    pub fn trace_sampler(&self) -> crate::telemetry::TraceSampler {
        self.trace_sampler.clone()
    }

    /// The span of a proposal about to be submitted, if it is traced: as the caller decided
    /// ([`with_trace_decision`](crate::telemetry::with_trace_decision)), otherwise as the
    /// sampler picks. Its parent is the caller's current span. `None` also when no subscriber
    /// records the span.
    ///
    /// The caller's own trace is not looked up to decide (a proposal inside a sampled span is
    /// not traced for that alone): finding the current span's OpenTelemetry context costs
    /// every proposal a registry lookup, about as much as the rest of tracing together at
    /// the bench's rates. A caller who traces a request says so with `with_trace_decision`.
    #[inline]
    fn proposal_span(&self) -> Option<Box<tracing::Span>> {
        // The decision first: a task-local read and a thread-local addition. Asking the
        // subscriber whether it records the span costs a call through its filters, so only a
        // picked proposal asks.
        let traced = match crate::telemetry::caller_decision() {
            Some(decided) => decided,
            None => self.trace_sampler.pick(),
        };
        if traced {
            self.traced_proposal_span()
        } else {
            None
        }
    }

    #[cold]
    #[inline(never)]
    fn traced_proposal_span(&self) -> Option<Box<tracing::Span>> {
        let span = tracing::info_span!(
            target: "consensus::trace",
            "consensus.proposal",
            consensus.node = %self.config.node_id,
            consensus.request_id = tracing::field::Empty,
        );
        (!span.is_disabled()).then(|| Box::new(span))
    }

    /// The nodes this one can name: itself, its configured peers and the members added while
    /// the group ran, each with its name and, where known, the `host:port` it listens on for
    /// peers (this node's own when its `bind_address` is a specific IP, a configured peer's
    /// from `name@host:port`, an added member's from the membership). A node joining the group
    /// dials the addresses it gets here from any member (`consensus-node --join`). Peers
    /// configured as a bare `host:port` have no name and are left out.
    pub fn peer_directory(&self) -> std::collections::BTreeMap<NodeId, PeerEntry> {
        let mut directory = std::collections::BTreeMap::new();
        let own_address = self
            .config
            .advertised_address()
            .map(|address| address.to_string());
        directory.insert(
            self.node_id(),
            PeerEntry {
                name: self.config.node_id.clone(),
                address: own_address,
            },
        );
        let named = self
            .config
            .peers
            .iter()
            .map(|peer| match peer.split_once('@') {
                Some((name, address)) => (name, Some(address)),
                None if peer.parse::<crate::transport::tcp::PeerAddress>().is_ok() => ("", None),
                None => (peer.as_str(), None),
            })
            .filter(|(name, _)| !name.is_empty());
        let added = self.membership().into_iter().flat_map(|membership| {
            membership
                .addresses
                .into_values()
                .filter_map(|entry| {
                    let (name, address) = entry.split_once('@')?;
                    Some((name.to_string(), Some(address.to_string())))
                })
                .collect::<Vec<_>>()
        });
        for (name, address) in named
            .map(|(name, address)| (name.to_string(), address.map(str::to_string)))
            .chain(added)
        {
            directory.insert(NodeId::from_name(&name), PeerEntry { name, address });
        }
        directory
    }

    /// The membership in force on this node (Raft and GPU-optimized Raft): its voters, the
    /// outgoing voters of a change in progress, and its learners (and, GPU-optimized Raft, their
    /// keys). `None` before start and for PBFT, whose members are fixed (see
    /// [`ConsensusEngine::members`]).
    pub fn membership(&self) -> Option<crate::membership::Membership> {
        let running = self.running.as_ref()?;
        lock(&running.membership).clone()
    }

    /// Adds the node named `name` (its `node_id`, as in [`ConsensusConfig`]) as a learner
    /// (Raft; GPU-optimized Raft takes [`ConsensusEngine::add_learner_with_key`]): it receives
    /// the log, or a snapshot, and never votes. `address` is where it listens for peers (`host:port`); every member dials it there, and it is kept in the
    /// membership (as `name@host:port`, [`Membership::addresses`]) so that later members and
    /// restarts find it too. `None` for a node this engine's transport already reaches (an
    /// in-process [`LocalNetwork`], or a configured peer). The node should have been started
    /// with [`ConsensusConfig::joining`](crate::ConsensusConfig::joining).
    ///
    /// Answers with the membership once the change committed. Asked of a follower, the change
    /// goes to the leader it knows and answers when the follower sees it commit. Asking again
    /// for a learner already added (same address) succeeds at once: a node that retries its
    /// join does no harm.
    ///
    /// Refused with [`Error::Membership`] when no leader is known ([`MembershipError::NotLeader`]),
    /// while another change is in flight, for a node that already votes, or for an address that
    /// is not `host:port` ([`MembershipError::BadAddress`]). [`MembershipError::NotLeader`] after
    /// the change was appended means leadership moved on before it committed: it may still
    /// commit ([`ConsensusEngine::membership`] tells).
    ///
    /// [`Membership::addresses`]: crate::Membership::addresses
    /// [`MembershipError::NotLeader`]: crate::MembershipError::NotLeader
    /// [`MembershipError::BadAddress`]: crate::MembershipError::BadAddress
    pub async fn add_learner(
        &self,
        name: &str,
        address: Option<&str>,
    ) -> Result<crate::membership::Membership> {
        self.add_learner_keyed(name, address, None).await
    }

    /// [`ConsensusEngine::add_learner`] with the node's ed25519 public key, which GPU-optimized
    /// Raft needs: its members sign their acknowledgements and votes, and every membership
    /// carries every member's key, so that each node (and a node that joins later) checks them
    /// from the log. Without one, GPU-optimized Raft refuses the learner with
    /// [`MembershipError::MissingKey`](crate::MembershipError::MissingKey); Raft ignores it.
    /// The key is the one the node's `key_file` holds
    /// ([`keys::public_key_hex`](crate::keys::public_key_hex) prints it).
    pub async fn add_learner_with_key(
        &self,
        name: &str,
        address: Option<&str>,
        public_key: &ed25519_dalek::VerifyingKey,
    ) -> Result<crate::membership::Membership> {
        self.add_learner_keyed(name, address, Some(public_key.to_bytes()))
            .await
    }

    async fn add_learner_keyed(
        &self,
        name: &str,
        address: Option<&str>,
        key: Option<[u8; 32]>,
    ) -> Result<crate::membership::Membership> {
        let bad = |reason: &str| {
            Error::Membership(crate::membership::MembershipError::BadAddress {
                address: format!("{name}@{}", address.unwrap_or_default()),
                reason: reason.to_string(),
            })
        };
        if name.is_empty() || name.contains(['@', ' ', '/']) {
            return Err(bad(
                "the name must be non-empty, without '@', '/' or spaces",
            ));
        }
        let address = match address {
            None => None,
            Some(host_port) => match host_port.parse::<crate::transport::tcp::PeerAddress>() {
                Ok(peer) if peer.node_id.is_none() => Some(format!("{name}@{host_port}")),
                Ok(_) => return Err(bad("give host:port; the name is given apart")),
                Err(error) => return Err(bad(&error.to_string())),
            },
        };
        self.change_members(crate::membership::MembershipChange::AddLearner {
            id: NodeId::from_name(name),
            address,
            key,
        })
        .await
    }

    /// Makes `voters` the voter set (Raft, on the leader), through a joint membership: learners
    /// named are promoted, voters not named are removed (a removed leader steps down once the
    /// change commits, and a removed node stops voting). Answers with the final membership
    /// once it committed. Refused with [`Error::Membership`] for an empty set, an id that is
    /// not yet a learner or voter, a learner still catching up, a set of which no majority was
    /// heard from lately, or while another change is in flight.
    pub async fn change_membership(
        &self,
        voters: impl IntoIterator<Item = NodeId>,
    ) -> Result<crate::membership::Membership> {
        let voters = voters.into_iter().collect();
        self.change_members(crate::membership::MembershipChange::ChangeVoters(voters))
            .await
    }

    async fn change_members(
        &self,
        change: crate::membership::MembershipChange,
    ) -> Result<crate::membership::Membership> {
        let running = self
            .running
            .as_ref()
            .ok_or(Error::InvalidState("engine not started"))?;
        let (reply, answer) = tokio::sync::oneshot::channel();
        running.inputs.change_membership(change, reply)?;
        match tokio::time::timeout(self.config.request_timeout, answer).await {
            Ok(Ok(Ok(membership))) => Ok(membership),
            Ok(Ok(Err(refused))) => Err(Error::Membership(refused)),
            Ok(Err(_)) => Err(Error::InvalidState("the engine stopped")),
            Err(_) => Err(Error::Timeout),
        }
    }

    /// Asks the leader to hand leadership to `to` (only meaningful on the leader; Raft only:
    /// a PBFT primary follows from the view number).
    pub fn transfer_leadership(&self, to: NodeId) -> Result<()> {
        let running = self
            .running
            .as_ref()
            .ok_or(Error::InvalidState("engine not started"))?;
        running.inputs.transfer_leadership(to)
    }

    /// A metrics snapshot (term, last committed index, throughput, latency, ...).
    pub fn metrics(&self) -> MetricsSnapshot {
        self.metrics.snapshot()
    }

    /// The Prometheus text exposition of this node's metrics.
    pub fn prometheus_metrics(&self) -> String {
        self.metrics.encode_prometheus()
    }

    /// Leader status and notifications for this node.
    pub fn leader_election(&self) -> LeaderElection {
        LeaderElection {
            info: self.leader.subscribe(),
            callbacks: self.leader_callbacks.clone(),
        }
    }

    /// True if this node currently leads.
    pub fn is_leader(&self) -> bool {
        self.leader.borrow().is_leader
    }

    /// The leader this node knows of.
    pub fn current_leader(&self) -> Option<NodeId> {
        self.leader.borrow().leader
    }
}

/// Parses a configured peer: `name@host:port` (id from the name, as [`NodeId::from_name`]) or
/// `host:port` (id learned in the handshake).
impl Drop for ConsensusEngine {
    fn drop(&mut self) {
        if let Some(running) = self.running.take() {
            if let Some(network) = &self.network {
                network.disconnect(self.node_id());
            }
            // The thread exits on its own; joining here could block an async runtime.
            running.inputs.shutdown(false);
        }
    }
}

/// When a proposal passed each stage, as seen on the proposing node.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProposalTimings {
    /// The client handed it to the engine.
    pub submitted: Instant,
    /// The engine learned it was committed.
    pub committed: Instant,
    /// The state machine finished applying it.
    pub applied: Instant,
}

/// Leader status of one engine, as in the seed's `LeaderElection`.
///
/// The seed constructs it standalone from an `ElectionConfig`; an election needs a cluster, so
/// here the election settings go into [`ConsensusConfig::election`] and the handle comes from
/// [`ConsensusEngine::leader_election`].
#[derive(Clone)]
pub struct LeaderElection {
    info: watch::Receiver<LeaderInfo>,
    callbacks: LeaderCallbacks,
}

impl std::fmt::Debug for LeaderElection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LeaderElection")
            .field("info", &*self.info.borrow())
            .finish()
    }
}

impl LeaderElection {
    /// True if this node currently leads.
    pub fn is_leader(&self) -> bool {
        self.info.borrow().is_leader
    }

    /// The leader this node knows of.
    pub fn current_leader(&self) -> Option<NodeId> {
        self.info.borrow().leader
    }

    /// Term and leader as last seen.
    pub fn info(&self) -> LeaderInfo {
        *self.info.borrow()
    }

    /// Runs `callback` with the new leader (or `None` during an election) at every change. It
    /// runs on the engine's driver thread: keep it short.
    pub fn on_leader_change(&self, callback: impl Fn(Option<NodeId>) + Send + 'static) {
        lock(&self.callbacks).push(Box::new(callback));
    }

    /// Waits until some node is known as leader, or `timeout` passes.
    pub async fn wait_for_leader(&mut self, timeout: std::time::Duration) -> Option<NodeId> {
        let wait = self.info.wait_for(|info| info.leader.is_some());
        match tokio::time::timeout(timeout, wait).await {
            Ok(Ok(info)) => info.leader,
            _ => None,
        }
    }
}

/// Waits for the driver's answer to one request. No timer of our own: the driver answers every
/// request by its deadline (it checks them each tick), and a driver that stops or panics drops
/// the reply sender, which ends this wait too. A tokio timer per call was a seventh of the
/// client's cost per proposal.
async fn wait_for(answer: oneshot::Receiver<driver::Reply>) -> Result<Applied> {
    match answer.await {
        Ok(Ok(applied)) => Ok(applied),
        Ok(Err(Unanswered::Rejected(reason))) => Err(Error::Rejected(reason)),
        Ok(Err(Unanswered::TimedOut)) => Err(Error::Timeout),
        Ok(Err(Unanswered::Stopped(reason))) => Err(Error::Stopped(reason)),
        Err(_) => Err(Error::Stopped("engine stopped".into())),
    }
}

/// The state machine's answer in an applied request, as the response type of `S`.
fn downcast_response<S: StateMachine>(applied: Applied) -> Result<S::Response> {
    match applied.response {
        Some(Ok(response)) => response.downcast::<S::Response>().map(|r| *r).map_err(|_| {
            Error::StateMachine("the engine's state machine is not of the type named".into())
        }),
        Some(Err(reason)) => Err(Error::StateMachine(reason)),
        None => Err(Error::InvalidState("no state machine is set")),
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::config::ElectionConfig;

    /// The client side keeps no timer of its own: a call that cannot commit must still end at
    /// its deadline, answered by the driver's tick.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_leader_cut_off_from_its_followers_answers_timeout_at_the_deadline() {
        let names = ["cut-1", "cut-2", "cut-3"];
        let network = LocalNetwork::new();
        let mut engines = Vec::new();
        for name in names {
            let peers: Vec<&str> = names.iter().copied().filter(|n| *n != name).collect();
            // A long election timeout keeps the cut-off leader in office (check-quorum steps it
            // down only after a whole timeout without a quorum) well past the request deadline.
            let config = ConsensusConfig::default()
                .node_id(name)
                .peers(peers)
                .election(
                    ElectionConfig::default()
                        .election_timeout(Duration::from_millis(600))
                        .heartbeat_interval(Duration::from_millis(50)),
                )
                .request_timeout(Duration::from_millis(200));
            let mut engine = ConsensusEngine::new(config)
                .unwrap()
                .with_local_network(&network);
            engine.start().await.unwrap();
            engines.push(engine);
        }
        let until = Instant::now() + Duration::from_secs(10);
        let leader = loop {
            if let Some(leader) = engines.iter().find(|e| e.is_leader()) {
                break leader;
            }
            assert!(Instant::now() < until, "no leader elected");
            tokio::time::sleep(Duration::from_millis(5)).await;
        };
        let committed = leader.propose(Proposal::new("k", "1")).await.unwrap();
        assert!(matches!(committed, ConsensusResult::Committed { .. }));
        // The driver counts a commit before it answers, so the caller sees it at once.
        assert_eq!(leader.metrics().proposals_committed, 1);
        for follower in engines.iter().filter(|e| !e.is_leader()) {
            network.disconnect(follower.node_id());
        }
        let started = Instant::now();
        let call = leader.propose(Proposal::new("k", "2"));
        let outcome = tokio::time::timeout(Duration::from_secs(5), call)
            .await
            .expect("the call outlived its deadline by seconds");
        let waited = started.elapsed();
        assert!(matches!(outcome, Err(Error::Timeout)), "{outcome:?}");
        assert!(
            waited >= Duration::from_millis(200) && waited < Duration::from_secs(1),
            "answered after {waited:?}, deadline 200 ms"
        );
    }
}
