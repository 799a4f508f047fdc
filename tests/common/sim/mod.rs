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

mod clients;
mod config;
mod faults;

pub use config::{FaultProfile, SimConfig, SimFailure, SimReport};

use std::collections::BTreeMap;

use bytes::Bytes;
use consensus::protocol::raft::{Envelope, Input, Output, RaftNode, RejectReason};
use consensus::storage::{LogStore, MemoryLogStore};
use consensus::transport::Transport;
use consensus::transport::simulated::{SimulatedEndpoint, SimulatedNetwork};
use consensus::{LogIndex, NodeId, Term};
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::common::invariants::{SafetyMonitor, Violation, check_log_matching};
use crate::common::kv::{Applied, KvStateMachine};
use crate::common::linearizability::{CheckOutcome, KvInput, KvOutput, Operation, check_kv};

/// Simulated microseconds per tick.
pub const TICK_US: u64 = 10_000;
/// Simulated microseconds between pairwise invariant checks.
const FULL_CHECK_EVERY_US: u64 = 100_000;
/// The key the liveness probe writes, apart from the clients' keys.
const PROBE_KEY: u64 = 1 << 40;

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
