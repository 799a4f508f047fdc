//! The deterministic cluster simulator: real [`RaftNode`]s, [`MemoryLogStore`]s and the
//! [`SimulatedNetwork`], a replicated key-value store on every node, concurrent clients, and a
//! fault injector, all driven by one seeded random generator over simulated time.
//!
//! Time is in simulated microseconds. Each node ticks every [`TICK_US`] (10 ms), at its own phase
//! (and, when [`SimConfig::clock_skew`] is set, at its own slightly wrong rate).
//! One loop takes the earliest of: a scheduled action (client invocation, retry or timeout, fault,
//! restart, heal), a network delivery, or a tick, and processes it; ties go in that order, then by
//! node and send order, so a seed replays bit for bit. After every step of a node the driver
//! carries out the core's [`Output`] as the contract in `protocol::raft` says (persist and sync,
//! then send, then apply) and runs the cheap invariant checks; every 100 ms of simulated time it
//! runs the pairwise ones. The first violation stops the run.
//!
//! Clients have at most one operation outstanding. A definite refusal (the core's rejection, or a
//! node that is down) makes the client retry the same operation on another node; a refusal that
//! lasts past the operation's deadline means the operation never took effect and it is dropped
//! from the history. Silence past the deadline, or the crash of the node holding the request,
//! leaves the operation pending forever in the history (it may or may not have taken effect) and
//! the client moves on.

use std::collections::BTreeMap;

use bytes::Bytes;
use consensus::protocol::raft::{Envelope, Input, Output, RaftConfig, RaftNode, RejectReason};
use consensus::storage::{LogStore, MemoryLogStore};
use consensus::transport::Transport;
use consensus::transport::simulated::{
    LatencyModel, NetworkConfig, NetworkStats, SimulatedEndpoint, SimulatedNetwork,
};
use consensus::{LogIndex, NodeId, Term};
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::common::invariants::{SafetyMonitor, Violation, check_log_matching};
use crate::common::kv::{Applied, KvStateMachine, encode};
use crate::common::linearizability::{CheckOutcome, KvInput, KvOutput, Operation, check_kv};

/// Simulated microseconds per tick.
pub const TICK_US: u64 = 10_000;
/// Simulated microseconds between pairwise invariant checks.
const FULL_CHECK_EVERY_US: u64 = 100_000;
/// The key the liveness probe writes, apart from the clients' keys.
const PROBE_KEY: u64 = 1 << 40;

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
            max_down_us: 1_000_000,
            max_fault_us: 1_200_000,
        }
    }

    fn total_weight(&self) -> u32 {
        self.crash
            + self.crash_leader
            + self.partition
            + self.one_way
            + self.isolate_leader
            + self.weather
            + self.transfer
    }
}

/// Everything a run depends on besides its seed's random draws.
#[derive(Clone, Debug)]
pub struct SimConfig {
    /// The seed; every random choice of the run derives from it.
    pub seed: u64,
    /// Cluster size.
    pub nodes: usize,
    /// Settings for every node; `id`, `voters` and `seed` are filled in per node and incarnation.
    pub raft: RaftConfig,
    /// The healthy network (bad weather departs from it and returns to it).
    pub network: NetworkConfig,
    /// Fault injection during the fault phase.
    pub faults: FaultProfile,
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
    /// [`TICK_US`]).
    pub clock_skew: f64,
}

impl SimConfig {
    /// A healthy `nodes`-node cluster with election timeout 150 ms and heartbeat 50 ms, three
    /// clients, and no faults.
    pub fn new(seed: u64, nodes: usize) -> Self {
        let mut raft = RaftConfig::new(NodeId(1), vec![NodeId(1)]);
        raft.election_timeout_ticks = 15;
        raft.heartbeat_interval_ticks = 5;
        SimConfig {
            seed,
            nodes,
            raft,
            network: NetworkConfig::default(),
            faults: FaultProfile::none(),
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
        let raft = &mut config.raft;
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
    /// Steps the linearizability search took.
    pub checker_steps: u64,
    /// Network counters.
    pub network: NetworkStats,
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

/// splitmix64 of `seed` and `salt`: independent-looking seeds for nodes, incarnations and parts.
pub fn mix(seed: u64, salt: u64) -> u64 {
    let mut z = seed ^ salt.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Something scheduled at a simulated time.
#[derive(Clone, Debug)]
enum Action {
    Invoke { client: usize },
    Retry { client: usize, op: usize },
    Deadline { client: usize, op: usize },
    Restart { node: usize },
    Heal,
    RestoreWeather,
    Fault,
    Flush { node: usize, incarnation: u64 },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ClientState {
    /// No operation outstanding.
    Idle,
    /// Waiting for `node` to answer `request_id` about `op`.
    Waiting {
        op: usize,
        node: usize,
        request_id: u64,
    },
    /// Refused; retrying `op` soon.
    Backoff { op: usize },
}

struct Client {
    state: ClientState,
    /// Invokes new operations.
    active: bool,
    /// Stops after its first completed operation (the liveness probe).
    probe: bool,
    timeout_us: u64,
    /// The node that answered last: a good guess for the leader.
    preferred: Option<usize>,
    /// Where a refusal said the leader is.
    hint: Option<usize>,
    /// Last value seen per key, for compare-and-swap operands.
    seen: BTreeMap<u64, Option<u64>>,
    completed: usize,
}

/// Bookkeeping of one history operation beside the history itself.
struct OpMeta {
    data: Bytes,
    deadline_us: u64,
    abandoned: bool,
    /// Log index at which it was applied, once answered.
    index: Option<LogIndex>,
}

struct SimNode {
    id: NodeId,
    raft: Option<RaftNode>,
    store: MemoryLogStore,
    kv: KvStateMachine,
    incarnation: u64,
    next_tick_us: u64,
    /// Requests this node holds for clients: request id → (client, op).
    waiting: BTreeMap<u64, (usize, usize)>,
    /// This node's tick interval (its clock's rate).
    tick_us: u64,
    /// Output of steps not yet carried out (group commit).
    out: Output,
    /// A flush of `out` is scheduled.
    flush_scheduled: bool,
}

/// A leader crash whose replacement the failover measurement waits for.
#[derive(Clone, Copy, Debug)]
struct FailoverWatch {
    crashed_term: Term,
    crashed_at_us: u64,
}

/// A running simulation. See the module documentation.
pub struct Sim {
    config: SimConfig,
    rng: ChaCha8Rng,
    now_us: u64,
    network: SimulatedNetwork<Envelope>,
    endpoints: Vec<SimulatedEndpoint<Envelope>>,
    nodes: Vec<SimNode>,
    clients: Vec<Client>,
    history: Vec<Operation<KvInput, KvOutput>>,
    ops: Vec<OpMeta>,
    monitor: SafetyMonitor,
    agenda: BTreeMap<(u64, u64), Action>,
    agenda_sequence: u64,
    next_request_id: u64,
    next_value: u64,
    faults_active: bool,
    failure: Option<SimFailure>,
    last_full_check_us: u64,
    crashes: usize,
    duplicate_applies: usize,
    failover: Option<FailoverWatch>,
    failover_samples: Vec<u64>,
}

impl Sim {
    /// A cluster at time 0 with every node up, no client active and no fault scheduled.
    pub fn new(config: SimConfig) -> Result<Self, SimFailure> {
        let fail = |detail: String| SimFailure {
            seed: config.seed,
            at_us: 0,
            violation: Violation::Scenario { detail },
        };
        let network = SimulatedNetwork::new(mix(config.seed, 0x9e7), config.network)
            .map_err(|e| fail(format!("network settings: {e}")))?;
        let mut rng = ChaCha8Rng::seed_from_u64(mix(config.seed, 0x5eed));
        let ids: Vec<NodeId> = (1..=config.nodes as u64).map(NodeId).collect();
        let endpoints = ids.iter().map(|&id| network.endpoint(id)).collect();
        let nodes = ids
            .iter()
            .map(|&id| SimNode {
                id,
                raft: None,
                store: MemoryLogStore::new(),
                kv: KvStateMachine::new(),
                incarnation: 0,
                next_tick_us: rng.random_range(1..=TICK_US),
                waiting: BTreeMap::new(),
                out: Output::default(),
                flush_scheduled: false,
                tick_us: TICK_US,
            })
            .collect();
        let clients = (0..=config.clients)
            .map(|i| Client {
                state: ClientState::Idle,
                active: false,
                probe: i == config.clients,
                timeout_us: config.client_timeout_us,
                preferred: None,
                hint: None,
                seen: BTreeMap::new(),
                completed: 0,
            })
            .collect();
        let mut sim = Sim {
            rng,
            now_us: 0,
            network,
            endpoints,
            nodes,
            clients,
            history: Vec::new(),
            ops: Vec::new(),
            monitor: SafetyMonitor::new(),
            agenda: BTreeMap::new(),
            agenda_sequence: 0,
            next_request_id: 1,
            next_value: 1,
            faults_active: false,
            failure: None,
            last_full_check_us: 0,
            crashes: 0,
            duplicate_applies: 0,
            failover: None,
            failover_samples: Vec::new(),
            config,
        };
        let skew = sim.config.clock_skew;
        for node in 0..sim.nodes.len() {
            if skew > 0.0 {
                let rate = 1.0 + sim.rng.random_range(-skew..skew);
                sim.nodes[node].tick_us = (TICK_US as f64 * rate) as u64;
            }
            sim.start_node(node);
        }
        match sim.failure.take() {
            Some(failure) => Err(failure),
            None => Ok(sim),
        }
    }

    // ---- accessors ----

    /// Simulated time now.
    pub fn now_us(&self) -> u64 {
        self.now_us
    }

    /// The configuration.
    pub fn config(&self) -> &SimConfig {
        &self.config
    }

    /// The network, for scenario-specific faults.
    pub fn network(&self) -> &SimulatedNetwork<Envelope> {
        &self.network
    }

    /// The node `id`, when it is up.
    pub fn node(&self, id: NodeId) -> Option<&RaftNode> {
        self.nodes.get(id.0.checked_sub(1)? as usize)?.raft.as_ref()
    }

    /// Every node id.
    pub fn node_ids(&self) -> Vec<NodeId> {
        self.nodes.iter().map(|n| n.id).collect()
    }

    /// The live node that leads the highest term, if any.
    pub fn leader(&self) -> Option<NodeId> {
        self.nodes
            .iter()
            .filter_map(|n| n.raft.as_ref())
            .filter(|r| r.is_leader())
            .max_by_key(|r| r.term())
            .map(|r| r.id())
    }

    /// The client history so far (operations refused until their deadline left out).
    pub fn history(&self) -> Vec<Operation<KvInput, KvOutput>> {
        self.history
            .iter()
            .zip(&self.ops)
            .filter(|(_, meta)| !meta.abandoned)
            .map(|(op, _)| op.clone())
            .collect()
    }

    /// Failover samples (crash → new leader commits), in simulated microseconds.
    pub fn failover_samples(&self) -> &[u64] {
        &self.failover_samples
    }

    /// Counters of the run so far.
    pub fn report(&self) -> SimReport {
        let history = self.history();
        SimReport {
            seed: self.config.seed,
            nodes: self.config.nodes,
            end_us: self.now_us,
            ops_completed: history.iter().filter(|op| op.response.is_some()).count(),
            ops_pending: history.iter().filter(|op| op.response.is_none()).count(),
            ops_abandoned: self.ops.iter().filter(|m| m.abandoned).count(),
            crashes: self.crashes,
            leader_terms: self.monitor.leaders().len(),
            max_term: self
                .nodes
                .iter()
                .filter_map(|n| n.raft.as_ref())
                .map(|r| r.term())
                .max()
                .unwrap_or(0),
            committed: self
                .monitor
                .applied()
                .keys()
                .next_back()
                .copied()
                .unwrap_or(0),
            duplicate_applies: self.duplicate_applies,
            checker_steps: 0,
            network: self.network.stats(),
        }
    }

    // ---- the event loop ----

    fn fail(&mut self, violation: Violation) {
        if self.failure.is_none() {
            self.failure = Some(SimFailure {
                seed: self.config.seed,
                at_us: self.now_us,
                violation,
            });
        }
    }

    fn check_failure(&mut self) -> Result<(), SimFailure> {
        match self.failure.take() {
            Some(failure) => Err(failure),
            None => Ok(()),
        }
    }

    fn schedule(&mut self, at_us: u64, action: Action) {
        self.agenda.insert((at_us, self.agenda_sequence), action);
        self.agenda_sequence += 1;
    }

    /// Runs until simulated time `until_us` (or the first violation).
    pub fn run_until(&mut self, until_us: u64) -> Result<(), SimFailure> {
        self.run_until_or(until_us, |_| false).map(|_| ())
    }

    /// Runs until `until_us` or until `done` holds (checked after every event); returns whether
    /// `done` held.
    pub fn run_until_or(
        &mut self,
        until_us: u64,
        mut done: impl FnMut(&Sim) -> bool,
    ) -> Result<bool, SimFailure> {
        loop {
            self.check_failure()?;
            if done(self) {
                return Ok(true);
            }
            let next_agenda = self.agenda.keys().next().map(|&(at, _)| at);
            let next_delivery = self.network.next_delivery_at();
            let next_tick = self
                .nodes
                .iter()
                .enumerate()
                .filter(|(_, n)| n.raft.is_some())
                .map(|(i, n)| (n.next_tick_us, i))
                .min();
            let Some(at) = [next_agenda, next_delivery, next_tick.map(|(t, _)| t)]
                .into_iter()
                .flatten()
                .min()
            else {
                self.now_us = self.now_us.max(until_us);
                return Ok(false);
            };
            if at > until_us {
                self.now_us = self.now_us.max(until_us);
                self.network.advance_to(self.now_us);
                return Ok(false);
            }
            self.now_us = at;
            self.network.advance_to(at);
            if next_agenda == Some(at) {
                let Some((_, action)) = self.agenda.pop_first() else {
                    continue;
                };
                self.perform(action);
            } else if next_delivery == Some(at) {
                if let Some(delivery) = self.network.pop_due(at) {
                    let node = delivery.to.0 as usize - 1;
                    let from_proposer = matches!(
                        delivery.message.message,
                        consensus::protocol::raft::Message::ForwardProposals { .. }
                    );
                    self.step(node, Input::Message(delivery.message));
                    if from_proposer {
                        self.maybe_flush(node);
                    }
                }
            } else if let Some((_, node)) = next_tick {
                self.nodes[node].next_tick_us += self.nodes[node].tick_us;
                self.step(node, Input::Tick);
            }
            if self.now_us >= self.last_full_check_us + FULL_CHECK_EVERY_US {
                self.last_full_check_us = self.now_us;
                if let Err(violation) = self.full_check() {
                    self.fail(violation);
                }
            }
        }
    }

    fn perform(&mut self, action: Action) {
        match action {
            Action::Invoke { client } => self.invoke(client),
            Action::Retry { client, op } => self.retry(client, op),
            Action::Deadline { client, op } => self.deadline(client, op),
            Action::Restart { node } => self.restart(node),
            Action::Heal => self.network.heal(),
            Action::RestoreWeather => {
                if let Err(e) = self.network.set_config(self.config.network) {
                    self.fail(Violation::Scenario {
                        detail: format!("network settings: {e}"),
                    });
                }
            }
            Action::Fault => self.inject_fault(),
            Action::Flush { node, incarnation } => {
                if self.nodes[node].incarnation == incarnation {
                    self.flush(node);
                }
            }
        }
    }

    /// Feeds `input` to node `index` and carries out the output, now or (group commit) a little
    /// later together with the outputs of the node's next steps.
    pub fn step(&mut self, index: usize, input: Input) {
        let node = &mut self.nodes[index];
        let Some(raft) = node.raft.as_mut() else {
            return; // a crashed node hears nothing
        };
        raft.step(input, &mut node.out);
        let observed = self.monitor.observe_node(raft);
        let flush_scheduled = node.flush_scheduled;
        if let Err(violation) = observed {
            self.fail(violation);
        }
        if flush_scheduled {
            return;
        }
        let (probability, max_delay_us) = self.config.group_commit;
        if probability > 0.0 && self.rng.random_bool(probability) {
            let node = &mut self.nodes[index];
            node.flush_scheduled = true;
            let action = Action::Flush {
                node: index,
                incarnation: node.incarnation,
            };
            let at = self.now_us + self.rng.random_range(0..=max_delay_us);
            self.schedule(at, action);
            return;
        }
        self.flush(index);
    }

    /// Carries out the node's accumulated output as the driver contract says: persist and sync,
    /// then send, then apply (answering this node's clients), then hand back refusals.
    fn flush(&mut self, index: usize) {
        let node = &mut self.nodes[index];
        node.flush_scheduled = false;
        let Some(raft) = node.raft.as_ref() else {
            return;
        };
        let (id, term, is_leader) = (node.id, raft.term(), raft.is_leader());
        let mut out = std::mem::take(&mut node.out);
        // 1. Persist and sync before anything leaves the node.
        if let Err(e) = node.store.persist(&out) {
            self.fail(Violation::Storage {
                node: id,
                detail: e.to_string(),
            });
            out.clear();
            self.nodes[index].out = out;
            return;
        }
        // 2. Send.
        for envelope in out.messages.drain(..) {
            self.endpoints[index].send(envelope.to, envelope);
        }
        // 3. Apply, answering this node's clients.
        for entry in &out.committed {
            if let Err(violation) = self.monitor.observe_applied(id, term, entry) {
                self.fail(violation);
            }
            match self.nodes[index].kv.apply(entry) {
                Ok(Applied::Command { tag, input, output }) if tag.proposer == id => {
                    if let Some((client, op)) = self.nodes[index].waiting.remove(&tag.request_id) {
                        if self.history[op].input != input {
                            self.fail(Violation::Apply {
                                node: id,
                                detail: format!(
                                    "request {} applied as {input:?}, sent as {:?}",
                                    tag.request_id, self.history[op].input
                                ),
                            });
                        }
                        self.complete(client, op, index, output, entry.index);
                    }
                }
                Ok(Applied::Duplicate { .. }) => self.duplicate_applies += 1,
                Ok(_) => {}
                Err(e) => self.fail(Violation::Apply {
                    node: id,
                    detail: e.to_string(),
                }),
            }
        }
        if let Some(watch) = self.failover
            && is_leader
            && term > watch.crashed_term
            && !out.committed.is_empty()
        {
            self.failover_samples
                .push(self.now_us - watch.crashed_at_us);
            self.failover = None;
        }
        for rejection in out.rejected.drain(..) {
            if let Some((client, op)) = self.nodes[index].waiting.remove(&rejection.request_id) {
                let hint = match rejection.reason {
                    RejectReason::NotLeader {
                        leader: Some(leader),
                    } => Some(leader.0 as usize - 1),
                    _ => None,
                };
                self.refused(client, op, hint);
            }
        }
        out.clear();
        self.nodes[index].out = out;
    }

    fn maybe_flush(&mut self, node: usize) {
        if self.config.flush_probability > 0.0
            && self.rng.random_bool(self.config.flush_probability)
        {
            self.step(node, Input::FlushProposals);
        }
    }

    /// The pairwise checks: log matching between every two live nodes, and leader completeness
    /// of every live leader against everything applied so far.
    pub fn full_check(&self) -> Result<(), Violation> {
        let logs: Vec<_> = self
            .nodes
            .iter()
            .filter_map(|n| n.raft.as_ref())
            .map(|r| (r.id(), r.log()))
            .collect();
        check_log_matching(&logs)?;
        for raft in self.nodes.iter().filter_map(|n| n.raft.as_ref()) {
            self.monitor.check_leader_completeness(raft)?;
        }
        Ok(())
    }

    // ---- nodes ----

    fn start_node(&mut self, index: usize) {
        let node = &mut self.nodes[index];
        let recovered = match node.store.recover() {
            Ok(recovered) => recovered,
            Err(e) => {
                let id = node.id;
                self.fail(Violation::Storage {
                    node: id,
                    detail: e.to_string(),
                });
                return;
            }
        };
        let mut config = self.config.raft.clone();
        config.id = node.id;
        config.voters = (1..=self.config.nodes as u64).map(NodeId).collect();
        config.seed = mix(self.config.seed, (node.id.0 << 32) | node.incarnation);
        match RaftNode::new(config, recovered) {
            Ok(raft) => {
                node.raft = Some(raft);
                node.kv = KvStateMachine::new();
                node.next_tick_us = self.now_us + self.rng.random_range(1..=TICK_US);
            }
            Err(e) => {
                let detail = format!("node settings: {e}");
                self.fail(Violation::Scenario { detail });
            }
        }
    }

    /// Crashes node `id`: unsynced writes are lost, the core and the state machine are dropped,
    /// and the clients waiting on it learn nothing about their operations.
    pub fn crash(&mut self, id: NodeId) {
        let index = id.0 as usize - 1;
        if self.nodes[index].raft.is_none() {
            return;
        }
        self.crashes += 1;
        let node = &mut self.nodes[index];
        node.store.crash();
        node.raft = None;
        node.out.clear(); // never persisted, never sent
        node.flush_scheduled = false;
        node.kv = KvStateMachine::new();
        let waiting = std::mem::take(&mut node.waiting);
        for (_, (client, op)) in waiting {
            // Outcome unknown: the operation stays pending forever; the client moves on.
            if matches!(self.clients[client].state,
                ClientState::Waiting { op: o, node, .. } if o == op && node == index)
            {
                self.clients[client].state = ClientState::Idle;
                self.clients[client].preferred = None;
                let at = self.now_us + self.think_time();
                self.schedule(at, Action::Invoke { client });
            }
        }
        if self.rng.random_bool(0.5) {
            // Its connections reset: what it had sent and what was sent to it is gone too.
            self.network.discard_for(id);
        }
    }

    /// Restarts node `id` from its store's durable state with a fresh state machine.
    pub fn restart_node(&mut self, id: NodeId) {
        self.restart(id.0 as usize - 1);
    }

    fn restart(&mut self, index: usize) {
        if self.nodes[index].raft.is_some() {
            return;
        }
        self.nodes[index].incarnation += 1;
        self.start_node(index);
    }

    /// Asks node `id` (normally the leader) to transfer leadership to `to`.
    pub fn transfer_leadership(&mut self, id: NodeId, to: NodeId) {
        self.step(id.0 as usize - 1, Input::TransferLeadership { to });
    }

    /// Starts watching for the crash of the leader of `term` at `now` to be repaired.
    fn watch_failover(&mut self, crashed_term: Term) {
        self.failover = Some(FailoverWatch {
            crashed_term,
            crashed_at_us: self.now_us,
        });
    }

    /// Crashes the current leader and measures until a leader of a later term commits an entry.
    /// Returns the crashed leader, or `None` if there was no leader.
    pub fn crash_leader_and_watch(&mut self) -> Option<NodeId> {
        let leader = self.leader()?;
        let term = self.node(leader)?.term();
        self.watch_failover(term);
        self.crash(leader);
        Some(leader)
    }

    /// True while a watched failover has not completed.
    pub fn failover_pending(&self) -> bool {
        self.failover.is_some()
    }

    /// Highest index every live node has applied.
    pub fn min_applied(&self) -> LogIndex {
        self.nodes
            .iter()
            .map(|n| {
                if n.raft.is_some() {
                    n.kv.last_applied()
                } else {
                    0
                }
            })
            .min()
            .unwrap_or(0)
    }

    // ---- clients ----

    fn think_time(&mut self) -> u64 {
        let (low, high) = self.config.think_us;
        self.rng.random_range(low..=high.max(low))
    }

    /// Lets the regular clients start invoking operations.
    pub fn start_clients(&mut self) {
        for client in 0..self.config.clients {
            self.clients[client].active = true;
            let at = self.now_us + self.think_time();
            self.schedule(at, Action::Invoke { client });
        }
    }

    /// Stops the regular clients from invoking new operations (outstanding ones run their course).
    pub fn stop_clients(&mut self) {
        for client in &mut self.clients[..self.config.clients] {
            client.active = false;
        }
    }

    /// True when no regular client has an operation outstanding.
    pub fn clients_quiet(&self) -> bool {
        self.clients[..self.config.clients]
            .iter()
            .all(|c| c.state == ClientState::Idle)
    }

    /// Starts the liveness probe: one client that writes a fresh value to its own key, retrying
    /// every 500 ms, until one write completes.
    pub fn start_probe(&mut self) {
        let probe = self.config.clients;
        self.clients[probe].active = true;
        self.clients[probe].timeout_us = 500_000;
        self.schedule(self.now_us, Action::Invoke { client: probe });
    }

    /// The log index of the probe's completed write, once it completed.
    pub fn probe_index(&self) -> Option<LogIndex> {
        let probe = self.config.clients;
        if self.clients[probe].completed == 0 {
            return None;
        }
        self.history
            .iter()
            .zip(&self.ops)
            .rev()
            .find(|(op, meta)| {
                op.client == probe as u64 && op.response.is_some() && meta.index.is_some()
            })?
            .1
            .index
    }

    fn choose_input(&mut self, client: usize) -> KvInput {
        if self.clients[client].probe {
            self.next_value += 1;
            return KvInput::Put {
                key: PROBE_KEY,
                value: self.next_value,
            };
        }
        let key = self.rng.random_range(0..self.config.keys);
        match self.rng.random_range(0..10) {
            0..4 => {
                self.next_value += 1;
                KvInput::Put {
                    key,
                    value: self.next_value,
                }
            }
            4..7 => KvInput::Get { key },
            _ => {
                self.next_value += 1;
                let expected = match self.clients[client].seen.get(&key) {
                    Some(&seen) if self.rng.random_bool(0.8) => seen,
                    _ => None,
                };
                KvInput::Cas {
                    key,
                    expected,
                    new: self.next_value,
                }
            }
        }
    }

    fn invoke(&mut self, client: usize) {
        let c = &self.clients[client];
        if !c.active || c.state != ClientState::Idle || (c.probe && c.completed > 0) {
            return;
        }
        let input = self.choose_input(client);
        let op = self.history.len();
        let deadline_us = self.now_us + self.clients[client].timeout_us;
        self.history.push(Operation {
            client: client as u64,
            input,
            call_us: self.now_us,
            response: None,
        });
        self.ops.push(OpMeta {
            data: encode(&input),
            deadline_us,
            abandoned: false,
            index: None,
        });
        self.schedule(deadline_us, Action::Deadline { client, op });
        let node = self.pick_node(client, None);
        self.attempt(client, op, node);
    }

    fn pick_node(&mut self, client: usize, avoid: Option<usize>) -> usize {
        let c = &mut self.clients[client];
        if let Some(hint) = c.hint.take()
            && hint < self.nodes.len()
        {
            return hint;
        }
        if let Some(preferred) = c.preferred
            && Some(preferred) != avoid
            && self.rng.random_bool(0.7)
        {
            return preferred;
        }
        loop {
            let node = self.rng.random_range(0..self.nodes.len());
            if Some(node) != avoid || self.nodes.len() == 1 {
                return node;
            }
        }
    }

    fn attempt(&mut self, client: usize, op: usize, node: usize) {
        if self.nodes[node].raft.is_none() {
            // Connection refused: a definite refusal.
            self.clients[client].state = ClientState::Backoff { op };
            self.clients[client].preferred = None;
            let at = self.now_us + self.rng.random_range(1_000..10_000);
            self.schedule(at, Action::Retry { client, op });
            return;
        }
        let request_id = self.next_request_id;
        self.next_request_id += 1;
        self.nodes[node].waiting.insert(request_id, (client, op));
        self.clients[client].state = ClientState::Waiting {
            op,
            node,
            request_id,
        };
        let data = self.ops[op].data.clone();
        self.step(node, Input::Propose { request_id, data });
        self.maybe_flush(node);
    }

    fn refused(&mut self, client: usize, op: usize, hint: Option<usize>) {
        let ClientState::Waiting {
            op: current, node, ..
        } = self.clients[client].state
        else {
            return;
        };
        if current != op {
            return;
        }
        self.clients[client].state = ClientState::Backoff { op };
        self.clients[client].hint = hint;
        if self.clients[client].preferred == Some(node) {
            self.clients[client].preferred = None;
        }
        let at = self.now_us + self.rng.random_range(1_000..20_000);
        self.schedule(at, Action::Retry { client, op });
    }

    fn retry(&mut self, client: usize, op: usize) {
        if self.clients[client].state != (ClientState::Backoff { op }) {
            return;
        }
        if self.now_us >= self.ops[op].deadline_us {
            self.abandon(client, op);
            return;
        }
        let node = self.pick_node(client, None);
        self.attempt(client, op, node);
    }

    fn abandon(&mut self, client: usize, op: usize) {
        // Every attempt was refused: the operation never took effect.
        self.ops[op].abandoned = true;
        self.clients[client].state = ClientState::Idle;
        let at = self.now_us + self.think_time();
        self.schedule(at, Action::Invoke { client });
    }

    fn deadline(&mut self, client: usize, op: usize) {
        match self.clients[client].state {
            ClientState::Backoff { op: current } if current == op => self.abandon(client, op),
            ClientState::Waiting {
                op: current,
                node,
                request_id,
            } if current == op => {
                // Silence: the operation may still take effect, but nobody will hear of it.
                self.nodes[node].waiting.remove(&request_id);
                self.clients[client].state = ClientState::Idle;
                self.clients[client].preferred = None;
                let at = self.now_us + self.think_time();
                self.schedule(at, Action::Invoke { client });
            }
            _ => {}
        }
    }

    fn complete(
        &mut self,
        client: usize,
        op: usize,
        node: usize,
        output: KvOutput,
        index: LogIndex,
    ) {
        self.history[op].response = Some((self.now_us, output));
        self.ops[op].index = Some(index);
        let c = &mut self.clients[client];
        c.completed += 1;
        c.state = ClientState::Idle;
        c.preferred = Some(node);
        let key = self.history[op].input.key();
        match (self.history[op].input, output) {
            (KvInput::Put { value, .. }, _) => {
                c.seen.insert(key, Some(value));
            }
            (KvInput::Get { .. }, KvOutput::Get(value)) => {
                c.seen.insert(key, value);
            }
            (KvInput::Cas { new, .. }, KvOutput::Cas(true)) => {
                c.seen.insert(key, Some(new));
            }
            _ => {}
        }
        let at = self.now_us + self.think_time();
        self.schedule(at, Action::Invoke { client });
    }

    // ---- faults ----

    /// Turns the fault injector on (if the profile has any faults).
    pub fn start_faults(&mut self) {
        if self.config.faults.mean_interval_us > 0 && self.config.faults.total_weight() > 0 {
            self.faults_active = true;
            self.schedule_next_fault();
        }
    }

    fn schedule_next_fault(&mut self) {
        let mean = self.config.faults.mean_interval_us;
        let at = self.now_us + self.rng.random_range(mean / 4..=mean * 7 / 4);
        self.schedule(at, Action::Fault);
    }

    fn random_duration(&mut self, max_us: u64) -> u64 {
        self.rng.random_range(max_us / 10..=max_us.max(1))
    }

    fn inject_fault(&mut self) {
        if !self.faults_active {
            return;
        }
        self.schedule_next_fault();
        let f = self.config.faults.clone();
        let mut pick = self.rng.random_range(0..f.total_weight());
        let mut chosen = 0;
        for (i, weight) in [
            f.crash,
            f.crash_leader,
            f.partition,
            f.one_way,
            f.isolate_leader,
            f.weather,
            f.transfer,
        ]
        .into_iter()
        .enumerate()
        {
            if pick < weight {
                chosen = i;
                break;
            }
            pick -= weight;
        }
        let n = self.nodes.len();
        let leader = self.leader();
        match chosen {
            0 | 1 => {
                let target = if chosen == 1 { leader } else { None }
                    .unwrap_or_else(|| NodeId(self.rng.random_range(1..=n as u64)));
                if self.node(target).is_some() {
                    self.crash(target);
                    let at = self.now_us + self.random_duration(f.max_down_us);
                    self.schedule(
                        at,
                        Action::Restart {
                            node: target.0 as usize - 1,
                        },
                    );
                }
            }
            2 => {
                let mut ids = self.node_ids();
                for i in (1..ids.len()).rev() {
                    ids.swap(i, self.rng.random_range(0..=i));
                }
                let cut = self.rng.random_range(1..n);
                self.network.partition(&ids[..cut], &ids[cut..]);
                let at = self.now_us + self.random_duration(f.max_fault_us);
                self.schedule(at, Action::Heal);
            }
            3 => {
                for _ in 0..self.rng.random_range(1..=n) {
                    let from = NodeId(self.rng.random_range(1..=n as u64));
                    let to = NodeId(self.rng.random_range(1..=n as u64));
                    if from != to {
                        self.network.block(from, to);
                    }
                }
                let at = self.now_us + self.random_duration(f.max_fault_us);
                self.schedule(at, Action::Heal);
            }
            4 => {
                if let Some(leader) = leader {
                    self.network.isolate(leader);
                    let at = self.now_us + self.random_duration(f.max_fault_us);
                    self.schedule(at, Action::Heal);
                }
            }
            5 => {
                let mut weather = self.config.network;
                weather.drop_probability = self.rng.random_range(0.0..0.3);
                weather.duplicate_probability = self.rng.random_range(0.0..0.2);
                weather.latency.tail_probability = self.rng.random_range(0.0..0.2);
                weather.latency.tail_max_us =
                    weather.latency.max_us + self.rng.random_range(0..300_000);
                if let Err(e) = self.network.set_config(weather) {
                    self.fail(Violation::Scenario {
                        detail: format!("weather: {e}"),
                    });
                }
                let at = self.now_us + self.random_duration(f.max_fault_us);
                self.schedule(at, Action::RestoreWeather);
            }
            _ => {
                if let Some(leader) = leader {
                    let to = NodeId(self.rng.random_range(1..=n as u64));
                    self.transfer_leadership(leader, to);
                }
            }
        }
    }

    /// Ends the fault phase: no more faults, every link restored, the healthy network back, every
    /// crashed node restarted.
    pub fn heal_everything(&mut self) {
        self.faults_active = false;
        self.agenda.retain(|_, action| {
            !matches!(
                action,
                Action::Fault | Action::Heal | Action::RestoreWeather | Action::Restart { .. }
            )
        });
        self.network.heal();
        if let Err(e) = self.network.set_config(self.config.network) {
            self.fail(Violation::Scenario {
                detail: format!("network settings: {e}"),
            });
        }
        for index in 0..self.nodes.len() {
            self.restart(index);
        }
    }

    /// Checks the recorded history for linearizability; returns the search steps taken.
    pub fn check_linearizability(&self) -> Result<u64, SimFailure> {
        let fail = |violation| SimFailure {
            seed: self.config.seed,
            at_us: self.now_us,
            violation,
        };
        let history = self.history();
        let (outcome, stats) = check_kv(&history, self.config.checker_budget).map_err(|e| {
            fail(Violation::Scenario {
                detail: format!("malformed history: {e}"),
            })
        })?;
        match outcome {
            CheckOutcome::Linearizable => Ok(stats.steps),
            CheckOutcome::NotLinearizable {
                partition,
                operations,
                longest,
            } => {
                let ops: Vec<String> = operations
                    .iter()
                    .map(|&i| format!("{:?}", history[i]))
                    .collect();
                Err(fail(Violation::Linearizability {
                    detail: format!(
                        "key {partition}: no linearization of its {} operations (longest prefix {longest}):\n  {}",
                        operations.len(),
                        ops.join("\n  ")
                    ),
                }))
            }
            CheckOutcome::BudgetExceeded { partition, steps } => {
                Err(fail(Violation::CheckerBudget {
                    detail: format!("key {partition} undecided after {steps} steps"),
                }))
            }
        }
    }
}
