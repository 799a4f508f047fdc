//! The simulator's settings, fault profiles, and what a run reports.

use crate::NodeId;
use crate::protocol::gpu_raft::GpuRaftConfig;
use crate::protocol::pbft::{PbftConfig, test_signing_key, test_validators};
use crate::protocol::raft::RaftConfig;
use crate::transport::simulated::{LatencyModel, NetworkConfig, NetworkStats};
use crate::{LogIndex, Term};
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;

use std::sync::Arc;

use crate::engine::apply::ApplyBugs;
use crate::sim::invariants::Violation;
use crate::sim::linearizability::{KvInput, KvOutput};
use crate::sim::{KvStateMachine, Twins, mix};
use crate::state_machine::{ErasedStateMachine, StateMachine};

/// Which faults the injector chooses from, and how often. Weights are relative; zero disables.
#[derive(Clone, Debug)]
pub struct FaultProfile {
    /// Mean simulated time between fault events; 0 turns the injector off.
    pub mean_interval_us: u64,
    /// Crash a random live node (restarted after up to `max_down_us`).
    pub crash: u32,
    /// Crash the current leader.
    pub crash_leader: u32,
    /// Split the cluster in two, both ways.
    pub partition: u32,
    /// Block a few directed links.
    pub one_way: u32,
    /// Cut the current leader off from everyone.
    pub isolate_leader: u32,
    /// Bad weather: random drop, duplication and long-tail delay for a while.
    pub weather: u32,
    /// Ask the leader to hand over to a random voter.
    pub transfer: u32,
    /// Ask the leader for a random membership change: add a learner, or change the voters
    /// (a core with fixed members ignores it; see [`SimConfig::spares`]).
    pub membership: u32,
    /// Longest downtime of a crashed node.
    pub max_down_us: u64,
    /// Longest partition or bad-weather spell.
    pub max_fault_us: u64,
}

impl FaultProfile {
    /// No faults at all.
    pub fn none() -> Self {
        FaultProfile {
            mean_interval_us: 0,
            crash: 0,
            crash_leader: 0,
            partition: 0,
            one_way: 0,
            isolate_leader: 0,
            weather: 0,
            transfer: 0,
            membership: 0,
            max_down_us: 0,
            max_fault_us: 0,
        }
    }

    /// Everything, a fault every 300 ms on average.
    pub fn chaos() -> Self {
        FaultProfile {
            mean_interval_us: 300_000,
            crash: 3,
            crash_leader: 3,
            partition: 3,
            one_way: 2,
            isolate_leader: 2,
            weather: 3,
            transfer: 1,
            membership: 0,
            max_down_us: 1_000_000,
            max_fault_us: 1_200_000,
        }
    }

    pub(super) fn total_weight(&self) -> u32 {
        self.crash
            + self.crash_leader
            + self.partition
            + self.one_way
            + self.isolate_leader
            + self.weather
            + self.transfer
            + self.membership
    }
}

/// How the simulated transports report broken connections
/// ([`Input::PeerUnreachable`](crate::protocol::Input::PeerUnreachable)). A real transport
/// reports a killed peer within a millisecond (its sockets are reset, redials are refused), but
/// not one behind a silent partition, and a blip on a live peer's connections looks the same.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ConnectionHints {
    /// The chance that each live node is told, after a crash, that the crashed node is
    /// unreachable; otherwise that node's hint is lost.
    pub delivery_probability: f64,
    /// The longest delay between a crash and its hints.
    pub max_delay_us: u64,
    /// The chance, at each fault event of the fault phase, that one live node is also told that
    /// a live peer (the leader, when there is one) is unreachable: a false hint.
    pub false_hint_probability: f64,
}

impl ConnectionHints {
    /// No hints: the nodes learn of a crash only by silence.
    pub fn none() -> Self {
        ConnectionHints {
            delivery_probability: 0.0,
            max_delay_us: 0,
            false_hint_probability: 0.0,
        }
    }

    /// Every crash reported to every live node within `max_delay_us`; no false hints.
    pub fn delivered(max_delay_us: u64) -> Self {
        ConnectionHints {
            delivery_probability: 1.0,
            max_delay_us,
            false_hint_probability: 0.0,
        }
    }
}

/// Builds each node's state machine (at start and at every restart).
#[derive(Clone)]
pub(crate) struct MachineFactory(Arc<dyn Fn() -> Box<dyn ErasedStateMachine> + Send + Sync>);

impl std::fmt::Debug for MachineFactory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MachineFactory")
    }
}

/// Everything a run depends on besides its seed's random draws. `S` is the core's settings
/// ([`RaftConfig`] for Raft).
#[derive(Clone, Debug)]
pub struct SimConfig<S = RaftConfig> {
    /// The seed; every random choice of the run derives from it.
    pub seed: u64,
    /// Cluster size.
    pub nodes: usize,
    /// Settings for every node; per-node fields (for Raft `id`, `voters` and `seed`) are filled
    /// in per node and incarnation.
    pub protocol: S,
    /// Deliberate bugs in the apply stage, for proving that the checks catch them.
    pub apply_bugs: ApplyBugs,
    /// Builds each node's replicated state machine; [`KvStateMachine`] by default.
    pub(crate) machine: MachineFactory,
    /// The healthy network (bad weather departs from it and returns to it).
    pub network: NetworkConfig,
    /// Fault injection during the fault phase.
    pub faults: FaultProfile,
    /// What the nodes' transports tell them when a peer's connections break.
    pub connection_hints: ConnectionHints,
    /// Length of the fault phase; then everything heals.
    pub fault_phase_us: u64,
    /// After healing, a leader must commit the probe and every node catch up within this.
    pub liveness_deadline_us: u64,
    /// Concurrent clients.
    pub clients: usize,
    /// Keys the clients use (0..keys).
    pub keys: u64,
    /// Pause between a client's operations (inclusive range).
    pub think_us: (u64, u64),
    /// A client gives up on an operation this long after invoking it.
    pub client_timeout_us: u64,
    /// Step budget of the linearizability search, per key.
    pub checker_budget: u64,
    /// Chance that a node is told to flush its proposal batch right after receiving proposals
    /// (otherwise the batch timeout appends them).
    pub flush_probability: f64,
    /// Group commit: the chance that a step's output waits (up to the given simulated
    /// microseconds) so that the node's next steps are persisted, sent and applied with it.
    pub group_commit: (f64, u64),
    /// Each node's clock runs at a rate drawn from `1 ± clock_skew` (0: every tick is exactly
    /// [`TICK_US`](crate::sim::TICK_US)).
    pub clock_skew: f64,
    /// Replicas that run as two instances with one identity, and who hears which (none by
    /// default).
    pub twins: Twins,
    /// Chance that a message a node sends is followed by an adversary's: a forged copy
    /// ([`SimProtocol::forge`](crate::sim::SimProtocol::forge)) or a replay of an earlier
    /// message of any node, half each (0 by default).
    pub forgeries: f64,
    /// Clients' reads go through the log as writes do, rather than through the core's read
    /// path ([`Input::Read`](crate::protocol::Input::Read): ReadIndex, or lease reads when the
    /// core's settings say so). Off by default; a core without a read path orders them through
    /// the log either way.
    pub reads_through_log: bool,
    /// Each node snapshots its applied state every this many applied entries and tells its
    /// core ([`Input::SnapshotTaken`](crate::protocol::Input::SnapshotTaken)), which compacts
    /// its log and sends snapshots to followers the log no longer reaches; 0 (the default):
    /// never. Only for cores that compact ([`Protocol::COMPACTS_LOG`](crate::protocol::Protocol)).
    pub snapshot_interval: u64,
    /// Nodes beyond `nodes` that start outside the group, as nodes started to join it do
    /// (Raft): membership changes add them as learners and promote them, and remove voters.
    /// Not with twins, whose second instances take the addresses after `nodes`.
    pub spares: usize,
    /// Churn: a membership change asked of the leader this often (on average) during the fault
    /// phase, besides those the fault injector picks; 0 for none.
    pub churn_us: u64,
    /// Writes one line per event to stderr, for whoever replays a failing seed: each message
    /// delivered (sender, receiver, the message), crash, restart, fault, heal and operator
    /// request, stamped with the simulated time. Off by default; the suites turn it on with
    /// `SIM_TRACE=1`. Tracing changes nothing the run does.
    pub trace: bool,
}

impl<S> SimConfig<S> {
    /// Runs `make()`'s state machine on every node instead of [`KvStateMachine`]: the user's own
    /// implementation of the key-value workload, checked under faults like the default one.
    pub fn with_state_machine<M>(mut self, make: impl Fn() -> M + Send + Sync + 'static) -> Self
    where
        M: StateMachine<Command = KvInput, Response = KvOutput>,
    {
        self.machine = MachineFactory(Arc::new(move || Box::new(make())));
        self
    }

    pub(crate) fn new_machine(&self) -> Box<dyn ErasedStateMachine> {
        (self.machine.0)()
    }
}

impl SimConfig<RaftConfig> {
    /// A healthy `nodes`-node cluster with election timeout 150 ms and heartbeat 50 ms, three
    /// clients, and no faults.
    pub fn new(seed: u64, nodes: usize) -> Self {
        let mut raft = RaftConfig::new(NodeId(1), vec![NodeId(1)]);
        raft.election_timeout_ticks = 15;
        raft.heartbeat_interval_ticks = 5;
        SimConfig {
            seed,
            nodes,
            protocol: raft,
            apply_bugs: ApplyBugs::default(),
            machine: MachineFactory(Arc::new(|| Box::new(KvStateMachine::new()))),
            network: NetworkConfig::default(),
            faults: FaultProfile::none(),
            connection_hints: ConnectionHints::none(),
            fault_phase_us: 3_000_000,
            liveness_deadline_us: 10_000_000,
            clients: 3,
            keys: 4,
            think_us: (5_000, 40_000),
            client_timeout_us: 1_000_000,
            checker_budget: 2_000_000,
            flush_probability: 0.5,
            group_commit: (0.0, 0),
            clock_skew: 0.0,
            twins: Twins::default(),
            forgeries: 0.0,
            reads_through_log: false,
            snapshot_interval: 0,
            spares: 0,
            churn_us: 0,
            trace: false,
        }
    }

    /// The chaos suite's configuration for `seed`: 3, 5 or 7 nodes, every fault, and settings of
    /// the core (batching, pipelining window, append sizes) drawn from the seed too.
    pub fn chaos(seed: u64) -> Self {
        let mut rng = ChaCha8Rng::seed_from_u64(mix(seed, 0xc4a0));
        let nodes = [3, 3, 5, 5, 7][rng.random_range(0..5)];
        let mut config = SimConfig::new(seed, nodes);
        config.faults = FaultProfile::chaos();
        config.faults.mean_interval_us = rng.random_range(150_000..500_000);
        config.fault_phase_us = rng.random_range(2_000_000..6_000_000);
        config.clients = rng.random_range(2..8);
        config.keys = rng.random_range(2..7);
        config.think_us = (
            rng.random_range(2_000..10_000),
            rng.random_range(20_000..80_000),
        );
        config.client_timeout_us = rng.random_range(300_000..1_500_000);
        config.network.latency = LatencyModel {
            min_us: rng.random_range(100..1_000),
            max_us: rng.random_range(1_000..8_000),
            tail_probability: 0.0,
            tail_max_us: 8_000,
        };
        let raft = &mut config.protocol;
        raft.pre_vote = rng.random_bool(0.8);
        raft.check_quorum = rng.random_bool(0.8);
        raft.election_timeout_ticks = rng.random_range(5..=20);
        raft.heartbeat_interval_ticks = rng.random_range(1..=raft.election_timeout_ticks / 3);
        raft.enable_batching = rng.random_bool(0.7);
        raft.batch_size = rng.random_range(1..16);
        raft.batch_timeout_ticks = rng.random_range(1..3);
        raft.max_inflight_appends = rng.random_range(1..8);
        raft.max_entries_per_append = rng.random_range(1..32);
        raft.forward_proposals = rng.random_bool(0.8);
        if rng.random_bool(0.2) {
            raft.priority_based = true;
            for id in 1..=nodes as u64 {
                raft.priorities.insert(NodeId(id), rng.random_range(0..4));
            }
        }
        config.flush_probability = rng.random_range(0.0..1.0);
        if rng.random_bool(0.5) {
            config.clock_skew = rng.random_range(0.0..0.2);
        }
        if rng.random_bool(0.5) {
            config.group_commit = (rng.random_range(0.0..0.8), rng.random_range(0..3_000));
        }
        // Hints always, sometimes or never delivered, and sometimes false.
        config.connection_hints = ConnectionHints {
            delivery_probability: [0.0, 0.5, 1.0][rng.random_range(0..3)],
            max_delay_us: rng.random_range(0..5_000),
            false_hint_probability: [0.0, 0.3, 1.0][rng.random_range(0..3)],
        };
        // Reads: through the log, by ReadIndex, or (with check-quorum) from a lease whose
        // clock-drift bound is the skew this run's clocks have.
        config.reads_through_log = rng.random_bool(0.2);
        if config.protocol.check_quorum && rng.random_bool(0.3) {
            config.protocol.lease_reads = true;
            config.protocol.max_clock_drift_percent = (config.clock_skew * 100.0).ceil() as u32 + 1;
        }
        // Snapshots in most runs, often enough that crashed nodes come back behind the
        // leader's compacted log, in chunks small enough that a transfer takes several.
        if rng.random_bool(0.7) {
            config.snapshot_interval = rng.random_range(4..64);
            config.protocol.snapshot_chunk_bytes = rng.random_range(8..256);
            // The engine's policy (a tail of one interval, compacted after durable writes) in
            // most seeds, the previous-snapshot policy in the rest.
            if rng.random_bool(0.7) {
                config.protocol.log_retention = config.snapshot_interval;
            }
        }
        // Membership changes in most runs: spare nodes to add, changes among the faults, and
        // in a quarter of the runs churn (a change every few hundred ms).
        if rng.random_bool(0.75) {
            config.spares = rng.random_range(1..=2);
            config.faults.membership = rng.random_range(1..=3);
            if rng.random_bool(0.33) {
                config.churn_us = rng.random_range(100_000..600_000);
            }
        }
        config
    }
}

/// What a finished run looked like.
#[derive(Clone, Debug, Default)]
pub struct SimReport {
    /// The seed.
    pub seed: u64,
    /// Cluster size.
    pub nodes: usize,
    /// Simulated time at the end.
    pub end_us: u64,
    /// Operations that returned.
    pub ops_completed: usize,
    /// Operations that never returned (pending forever).
    pub ops_pending: usize,
    /// Operations refused until their deadline (no effect, left out of the history).
    pub ops_abandoned: usize,
    /// Crashes injected.
    pub crashes: usize,
    /// Terms that had a leader.
    pub leader_terms: usize,
    /// Highest term reached.
    pub max_term: Term,
    /// Entries applied (the longest committed prefix).
    pub committed: LogIndex,
    /// Applications of an entry whose proposal was already applied (a forwarded proposal the
    /// network duplicated gets appended twice); counted per node, skipped by the store.
    pub duplicate_applies: usize,
    /// Connection hints delivered: true ones (a crashed peer) and false ones (a live peer).
    pub hints: (usize, usize),
    /// Steps the linearizability search took.
    pub checker_steps: u64,
    /// Network counters.
    pub network: NetworkStats,
    /// Peer messages the live nodes dropped unread (bad signatures, forgeries, stale), as
    /// their cores count them since their last start.
    pub invalid_dropped: u64,
    /// Adversary messages injected ([`SimConfig::forgeries`]).
    pub forgeries_sent: u64,
    /// Snapshots the nodes took ([`SimConfig::snapshot_interval`]), and snapshots followers
    /// installed from a leader.
    pub snapshots: (u64, u64),
    /// Membership changes asked of a leader ([`FaultProfile::membership`],
    /// [`SimConfig::churn_us`]), and final memberships a leader committed.
    pub membership_changes: (u64, u64),
}

/// A failed run: the seed, when, and what broke.
#[derive(Clone, Debug)]
pub struct SimFailure {
    /// The seed to replay.
    pub seed: u64,
    /// Simulated time of the violation.
    pub at_us: u64,
    /// What broke.
    pub violation: Violation,
}

impl std::fmt::Display for SimFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "seed {} failed at {} us: {}",
            self.seed, self.at_us, self.violation
        )
    }
}

impl<S> SimConfig<S> {
    /// The same run with other core settings.
    pub fn map_protocol<T>(self, map: impl FnOnce(S) -> T) -> SimConfig<T> {
        SimConfig {
            seed: self.seed,
            nodes: self.nodes,
            protocol: map(self.protocol),
            apply_bugs: self.apply_bugs,
            machine: self.machine,
            network: self.network,
            faults: self.faults,
            connection_hints: self.connection_hints,
            fault_phase_us: self.fault_phase_us,
            liveness_deadline_us: self.liveness_deadline_us,
            clients: self.clients,
            keys: self.keys,
            think_us: self.think_us,
            client_timeout_us: self.client_timeout_us,
            checker_budget: self.checker_budget,
            flush_probability: self.flush_probability,
            group_commit: self.group_commit,
            clock_skew: self.clock_skew,
            twins: self.twins,
            forgeries: self.forgeries,
            reads_through_log: self.reads_through_log,
            snapshot_interval: self.snapshot_interval,
            spares: self.spares,
            churn_us: self.churn_us,
            trace: self.trace,
        }
    }

    /// The same run without membership changes or spare nodes (for a core whose members are
    /// fixed).
    pub fn without_membership_changes(mut self) -> Self {
        self.spares = 0;
        self.churn_us = 0;
        self.faults.membership = 0;
        self
    }
}

impl SimConfig<PbftConfig> {
    /// A healthy PBFT cluster of `nodes` replicas (at least 4) with checkpoints every 16
    /// sequence numbers, a view change after 200 ms without progress, three clients, and no
    /// faults.
    pub fn pbft(seed: u64, nodes: usize) -> Self {
        let first = NodeId(1);
        let mut pbft = PbftConfig::new(
            first,
            vec![first],
            test_signing_key(first),
            test_validators(&[first]),
        );
        pbft.verifier = Arc::new(crate::sim::MemoizingVerifier::default());
        pbft.checkpoint_interval = 16;
        pbft.batch_size = 64;
        pbft.view_change_timeout_ticks = 20;
        pbft.retransmit_ticks = 5;
        pbft.audit_interval_ticks = 20;
        SimConfig::new(seed, nodes).map_protocol(|_| pbft)
    }

    /// The PBFT chaos suite's configuration for `seed`: 4, 5, 7 or 10 replicas (5 for a size
    /// between two 3f + 1, whose quorum is larger than 2f + 1), every fault, and the replica's
    /// settings (batch size, checkpoint interval, timeouts) drawn from the seed.
    pub fn pbft_chaos(seed: u64) -> Self {
        let mut rng = ChaCha8Rng::seed_from_u64(mix(seed, 0xbf7));
        let nodes = [4, 4, 5, 7, 7, 10][rng.random_range(0..6)];
        // The Raft chaos suite's faults, clients and network for this seed, with PBFT settings.
        let mut config = SimConfig::chaos(seed)
            .without_membership_changes()
            .map_protocol(|_| SimConfig::pbft(seed, nodes).protocol);
        config.nodes = nodes;
        let pbft = &mut config.protocol;
        pbft.checkpoint_interval = [2, 4, 8, 16, 32][rng.random_range(0..5)];
        pbft.batch_size = rng.random_range(1..16);
        pbft.batch_timeout_ticks = rng.random_range(0..3);
        pbft.view_change_timeout_ticks = rng.random_range(10..30);
        pbft.retransmit_ticks = rng.random_range(2..8);
        pbft.audit_interval_ticks = pbft.retransmit_ticks * rng.random_range(2..6);
        // PBFT ignores the hints; none are drawn, so its runs stay as they were.
        config.connection_hints = ConnectionHints::none();
        config
    }

    /// A healthy `nodes`-voter GPU-optimized Raft cluster: [`SimConfig::new`]'s Raft settings
    /// with the test keys (each replica's [`SimProtocol::start`](crate::sim::SimProtocol::start)
    /// fills in its own), checked through a memoizing verifier.
    pub fn gpu_raft(seed: u64, nodes: usize) -> SimConfig<GpuRaftConfig> {
        SimConfig::new(seed, nodes).map_protocol(gpu_raft_settings)
    }

    /// The GPU-optimized Raft chaos suite's configuration for `seed`: the Raft chaos suite's
    /// faults, clients, network, Raft settings and membership changes (spares added with their
    /// keys) over 3 or 5 voters, with forged and replayed messages injected (see
    /// [`SimConfig::forgeries`]). No snapshots: GPU-optimized Raft keeps its whole log.
    pub fn gpu_raft_chaos(seed: u64) -> SimConfig<GpuRaftConfig> {
        let mut rng = ChaCha8Rng::seed_from_u64(mix(seed, 0x6b0));
        let mut config = SimConfig::chaos(seed).map_protocol(gpu_raft_settings);
        config.nodes = [3, 5][rng.random_range(0..2)];
        config.forgeries = rng.random_range(0.01..0.1);
        config
    }
}

/// `raft` wrapped with a placeholder identity (node 1's) and the simulator's memoizing verifier.
fn gpu_raft_settings(raft: RaftConfig) -> GpuRaftConfig {
    let first = NodeId(1);
    let mut config = GpuRaftConfig::new(raft, test_signing_key(first), test_validators(&[first]));
    config.verifier = Arc::new(crate::sim::MemoizingVerifier::default());
    config
}
