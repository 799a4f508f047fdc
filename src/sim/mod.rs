//! The deterministic cluster simulator (feature `sim`): real protocol cores, [`MemoryLogStore`]s
//! and the [`SimulatedNetwork`], the engine's own apply stage with a [`StateMachine`](crate::StateMachine) on every
//! node, concurrent clients, and a fault injector, all driven by one seeded random generator over
//! simulated time.
//!
//! It is generic over the core ([`SimProtocol`], implemented by [`RaftNode`], `PbftNode`, and
//! [`byzantine::Maverick`] for PBFT clusters with Byzantine replicas). The invariants
//! are split: the shared ones (one leader per term, state-machine safety, linearizability of
//! the client history) are checked for every core; each core adds its own
//! ([`SimProtocol::check_new_leader`], [`SimProtocol::check_all`]: leader completeness and log
//! matching for Raft).
//!
//! The clients run a key-value workload ([`KvInput`], checked against [`KvModel`]). The
//! replicated state machine is [`KvStateMachine`] unless [`SimConfig::with_state_machine`] names
//! another: a library user can run their own implementation of that workload under faults and
//! have its answers checked for linearizability.
//!
//! ```
//! use std::collections::HashMap;
//!
//! use consensus::StateMachine;
//! use consensus::sim::{KvInput, KvModel, KvOutput, Sim, SimConfig};
//!
//! /// The user's own store: a hash map.
//! #[derive(Default)]
//! struct MyStore(HashMap<u64, u64>);
//!
//! impl StateMachine for MyStore {
//!     type Command = KvInput;
//!     type Response = KvOutput;
//!     fn apply(&mut self, command: KvInput) -> KvOutput {
//!         let key = command.key();
//!         let (value, output) = KvModel::apply(self.0.get(&key).copied(), &command);
//!         if let Some(value) = value {
//!             self.0.insert(key, value);
//!         }
//!         output
//!     }
//! }
//!
//! let config = SimConfig::chaos(7).with_state_machine(MyStore::default);
//! let mut sim: Sim = Sim::new(config).unwrap();
//! sim.start_clients();
//! sim.start_faults();
//! sim.run_until(1_000_000).unwrap();
//! sim.heal_everything();
//! sim.stop_clients();
//! sim.run_until(3_000_000).unwrap();
//! sim.check_linearizability().unwrap();
//! ```
//!
//! Time is in simulated microseconds. Each node ticks every [`TICK_US`] (10 ms), at its own phase
//! (and, when [`SimConfig::clock_skew`] is set, at its own slightly wrong rate).
//! One loop takes the earliest of: a scheduled action (client invocation, retry or timeout, fault,
//! restart, heal), a network delivery, or a tick, and processes it; ties go in that order, then by
//! node and send order, so a seed replays bit for bit. After every step of a node the simulator
//! carries out the core's [`Output`] as the contract in [`crate::protocol`] says (send what may
//! go at once, persist and sync, send the rest, apply through the apply stage, acknowledge the
//! write with [`Input::Durable`]) and runs the cheap invariant checks; every 100 ms of simulated
//! time it runs the pairwise ones. The first violation stops the run.
//!
//! A replica can run as twins ([`Twins`]): two instances with one identity, each on its own side
//! of the network; the simulator hosts both and routes each message to the instance on the
//! sender's side.
//!
//! Clients have at most one operation outstanding. A definite refusal (the core's rejection, or a
//! node that is down) makes the client retry the same operation on another node; a refusal that
//! lasts past the operation's deadline means the operation never took effect and it is dropped
//! from the history. Silence past the deadline, or the crash of the node holding the request,
//! leaves the operation pending forever in the history (it may or may not have taken effect) and
//! the client moves on.

pub mod byzantine;
mod clients;
mod config;
mod faults;
mod hints;
pub mod invariants;
mod kv;
pub mod linearizability;
mod protocol;
mod twins;
mod verifier;

pub use crate::engine::apply::ApplyBugs;
pub use config::{ConnectionHints, FaultProfile, SimConfig, SimFailure, SimReport};
pub use invariants::{SafetyMonitor, Violation};
pub use kv::KvStateMachine;
pub use linearizability::{KvInput, KvModel, KvOutput};
pub use protocol::SimProtocol;
pub use twins::Twins;
pub use verifier::MemoizingVerifier;

use std::collections::BTreeMap;

use bytes::Bytes;
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::engine::apply::{Answer, ApplyStage, Unanswered};
use crate::protocol::raft::RaftNode;
use crate::protocol::{Envelope, Input, Output, Protocol, RejectReason};
use crate::storage::{LogStore, MemoryLogStore};
use crate::transport::Transport;
use crate::transport::simulated::{SimulatedEndpoint, SimulatedNetwork};
use crate::{LogIndex, NodeId, Term};

use crate::sim::linearizability::{CheckOutcome, Operation, check_kv};

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

/// How many earlier messages the adversary keeps to replay.
const REPLAYABLE: usize = 256;

/// Where an answer of a node's apply stage goes: (client, history operation).
type ClientOp = (usize, usize);

/// Something scheduled at a simulated time.
#[derive(Clone, Debug)]
enum Action {
    Invoke {
        client: usize,
    },
    Retry {
        client: usize,
        op: usize,
    },
    Deadline {
        client: usize,
        op: usize,
    },
    Restart {
        node: usize,
    },
    Heal,
    RestoreWeather,
    Fault,
    /// A membership change (see [`SimConfig::churn_us`]).
    Churn,
    Flush {
        node: usize,
        incarnation: u64,
    },
    /// The transport of `node` (in its incarnation) reports `peer` unreachable.
    Hint {
        node: usize,
        incarnation: u64,
        peer: NodeId,
    },
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

struct SimNode<P: Protocol> {
    /// The replica it runs (twins share one).
    id: NodeId,
    /// Where the network delivers to it: its id, or for a twin's second instance an address
    /// past the cluster size (see [`Twins`]). Always its index in `Sim::nodes` plus one.
    address: NodeId,
    core: Option<P>,
    store: MemoryLogStore,
    /// The engine's apply stage: this node's clients' requests, dedup and the state machine.
    apply: ApplyStage<ClientOp, u64>,
    incarnation: u64,
    next_tick_us: u64,
    /// This node's tick interval (its clock's rate).
    tick_us: u64,
    /// Output of steps not yet carried out (group commit).
    out: Output<P::Message>,
    /// A flush of `out` is scheduled.
    flush_scheduled: bool,
    /// The index of the last snapshot this node took or restored.
    snapshot_index: LogIndex,
}

/// A leader crash whose replacement the failover measurement waits for.
#[derive(Clone, Copy, Debug)]
struct FailoverWatch {
    crashed_term: Term,
    crashed_at_us: u64,
}

/// A running simulation of core `P`. See the module documentation.
pub struct Sim<P: SimProtocol = RaftNode> {
    config: SimConfig<P::Settings>,
    rng: ChaCha8Rng,
    now_us: u64,
    network: SimulatedNetwork<Envelope<P::Message>>,
    endpoints: Vec<SimulatedEndpoint<Envelope<P::Message>>>,
    nodes: Vec<SimNode<P>>,
    clients: Vec<Client>,
    history: Vec<Operation<KvInput, KvOutput>>,
    ops: Vec<OpMeta>,
    monitor: SafetyMonitor,
    agenda: BTreeMap<(u64, u64), Action>,
    agenda_sequence: u64,
    next_value: u64,
    faults_active: bool,
    failure: Option<SimFailure>,
    last_full_check_us: u64,
    crashes: usize,
    /// Copies of applied proposals skipped by the apply stages of nodes since crashed.
    duplicate_applies: u64,
    failover: Option<FailoverWatch>,
    failover_samples: Vec<u64>,
    /// Connection hints delivered so far: (true, false).
    hints_delivered: (usize, usize),
    /// Scratch space for the apply stages' answers.
    answers: Vec<Answer<ClientOp, u64>>,
    /// Replicas on different sides of the twins' layout hear each other (see [`Twins`]).
    sides_joined: bool,
    /// Messages sent so far that the adversary may replay ([`SimConfig::forgeries`]).
    replayable: Vec<Envelope<P::Message>>,
    forgeries_sent: u64,
    /// Snapshots taken, and snapshots installed from a leader.
    snapshots: (u64, u64),
    /// Membership changes asked of a leader.
    membership_changes_asked: u64,
    /// Final (not joint) memberships a leader committed.
    memberships_committed: u64,
}

impl<P: SimProtocol> Sim<P> {
    /// A cluster at time 0 with every node up, no client active and no fault scheduled.
    pub fn new(config: SimConfig<P::Settings>) -> Result<Self, SimFailure> {
        let fail = |detail: String| SimFailure {
            seed: config.seed,
            at_us: 0,
            violation: Violation::Scenario { detail },
        };
        let network = SimulatedNetwork::new(mix(config.seed, 0x9e7), config.network)
            .map_err(|e| fail(format!("network settings: {e}")))?;
        config.twins.validate(config.nodes).map_err(fail)?;
        if config.spares > 0 && !config.twins.twinned.is_empty() {
            return Err(fail(
                "spare nodes and twins both take the addresses after `nodes`".into(),
            ));
        }
        let mut rng = ChaCha8Rng::seed_from_u64(mix(config.seed, 0x5eed));
        // Every replica at its id, then the twins' second instances (see `Twins`).
        let instances: Vec<(NodeId, NodeId)> = (1..=(config.nodes + config.spares) as u64)
            .map(|id| (NodeId(id), NodeId(id)))
            .chain(config.twins.second_addresses(config.nodes))
            .collect();
        let endpoints = instances
            .iter()
            .map(|&(_, address)| network.endpoint(address))
            .collect();
        let nodes = instances
            .iter()
            .map(|&(id, address)| SimNode {
                id,
                address,
                core: None,
                store: MemoryLogStore::new(),
                apply: ApplyStage::new(id, 1, None),
                incarnation: 0,
                next_tick_us: rng.random_range(1..=TICK_US),
                out: Output::default(),
                flush_scheduled: false,
                tick_us: TICK_US,
                snapshot_index: 0,
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
            next_value: 1,
            faults_active: false,
            failure: None,
            last_full_check_us: 0,
            crashes: 0,
            duplicate_applies: 0,
            replayable: Vec::new(),
            forgeries_sent: 0,
            snapshots: (0, 0),
            membership_changes_asked: 0,
            memberships_committed: 0,
            failover: None,
            failover_samples: Vec::new(),
            hints_delivered: (0, 0),
            answers: Vec::new(),
            sides_joined: !config.twins.separate_sides,
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
    pub fn config(&self) -> &SimConfig<P::Settings> {
        &self.config
    }

    /// The network, for scenario-specific faults.
    pub fn network(&self) -> &SimulatedNetwork<Envelope<P::Message>> {
        &self.network
    }

    /// The node at network address `address` (a replica's id, or the address of a twin's
    /// second instance, see [`Twins`]), when it is up.
    pub fn node(&self, address: NodeId) -> Option<&P> {
        self.nodes
            .get(address.0.checked_sub(1)? as usize)?
            .core
            .as_ref()
    }

    /// Every node's network address: the replicas' ids, then the twins' second instances.
    pub fn node_ids(&self) -> Vec<NodeId> {
        self.nodes.iter().map(|n| n.address).collect()
    }

    /// The live node that leads the highest term, if any.
    pub fn leader(&self) -> Option<NodeId> {
        self.nodes
            .iter()
            .filter_map(|n| n.core.as_ref())
            .map(|r| (r.id(), r.status()))
            .filter(|(_, status)| status.is_leader)
            .max_by_key(|(_, status)| status.term)
            .map(|(id, _)| id)
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
                .filter_map(|n| n.core.as_ref())
                .map(|r| r.status().term)
                .max()
                .unwrap_or(0),
            committed: self
                .monitor
                .applied()
                .keys()
                .next_back()
                .copied()
                .unwrap_or(0),
            duplicate_applies: (self.duplicate_applies
                + self
                    .nodes
                    .iter()
                    .map(|n| n.apply.duplicates_skipped())
                    .sum::<u64>()) as usize,
            checker_steps: 0,
            hints: self.hints_delivered,
            network: self.network.stats(),
            invalid_dropped: self
                .nodes
                .iter()
                .filter_map(|n| n.core.as_ref())
                .map(|core| core.invalid_messages().total())
                .sum(),
            forgeries_sent: self.forgeries_sent,
            snapshots: self.snapshots,
            membership_changes: (self.membership_changes_asked, self.memberships_committed),
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
        mut done: impl FnMut(&Sim<P>) -> bool,
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
                .filter(|(_, n)| n.core.is_some())
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
                    self.trace(|| {
                        let message = &delivery.message.message;
                        format!("{} -> {}: {message:?}", delivery.from, delivery.to)
                    });
                    let from_proposer = P::carries_proposals(&delivery.message.message);
                    self.step(node, Input::Message(delivery.message));
                    if from_proposer {
                        self.maybe_flush(node);
                    }
                }
            } else if let Some((_, node)) = next_tick {
                self.nodes[node].next_tick_us += self.nodes[node].tick_us;
                self.step(node, Input::Tick);
                let now = self.now_us;
                let mut answers = std::mem::take(&mut self.answers);
                self.nodes[node].apply.expire(now, &mut answers);
                self.deliver_answers(node, &mut answers);
                self.answers = answers;
            }
            if self.now_us >= self.last_full_check_us + FULL_CHECK_EVERY_US {
                self.last_full_check_us = self.now_us;
                if let Err(violation) = self.full_check() {
                    self.fail(violation);
                }
            }
        }
    }

    /// One line of the run's trace (see [`SimConfig::trace`]), cut to a readable length.
    pub(crate) fn trace(&self, line: impl FnOnce() -> String) {
        const MAX_CHARS: usize = 400;
        if !self.config.trace {
            return;
        }
        let line = line();
        match line.char_indices().nth(MAX_CHARS) {
            Some((cut, _)) => eprintln!("{:>10} us  {}…", self.now_us, &line[..cut]),
            None => eprintln!("{:>10} us  {line}", self.now_us),
        }
    }

    fn perform(&mut self, action: Action) {
        match action {
            Action::Invoke { client } => self.invoke(client),
            Action::Retry { client, op } => self.retry(client, op),
            Action::Deadline { client, op } => self.deadline(client, op),
            Action::Restart { node } => self.restart(node),
            Action::Heal => {
                self.trace(|| "heal the links".to_string());
                self.network.heal();
            }
            Action::RestoreWeather => {
                self.trace(|| "weather back to healthy".to_string());
                if let Err(e) = self.network.set_config(self.config.network) {
                    self.fail(Violation::Scenario {
                        detail: format!("network settings: {e}"),
                    });
                }
            }
            Action::Fault => self.inject_fault(),
            Action::Churn => self.churn(),
            Action::Flush { node, incarnation } => {
                if self.nodes[node].incarnation == incarnation {
                    self.flush(node);
                }
            }
            Action::Hint {
                node,
                incarnation,
                peer,
            } => {
                if self.nodes[node].incarnation == incarnation && self.nodes[node].core.is_some() {
                    self.hints_delivered.0 += 1;
                    self.step(node, Input::PeerUnreachable { peer });
                }
            }
        }
    }

    /// Feeds `input` to node `index` and carries out the output, now or (group commit) a little
    /// later together with the outputs of the node's next steps.
    pub fn step(&mut self, index: usize, input: Input<P::Message, P::Control>) {
        let node = &mut self.nodes[index];
        let Some(core) = node.core.as_mut() else {
            return; // a crashed node hears nothing
        };
        let commit_before = core.status().commit_index;
        // A peer message is a round of one: authenticated first, then stepped as a round, as
        // in the engine's driver.
        match input {
            Input::Message(envelope) => {
                let mut round = vec![envelope];
                core.authenticate(&mut round);
                if round.is_empty() {
                    return;
                }
                core.step_round(&mut round, &mut node.out);
            }
            other => core.step(other, &mut node.out),
        }
        let status = core.status();
        if status.is_leader && status.commit_index > commit_before {
            let nodes: Vec<(NodeId, Option<&P>)> =
                self.nodes.iter().map(|n| (n.id, n.core.as_ref())).collect();
            if let Some(leader) = nodes[index].1
                && let Err(violation) = leader.check_commit(commit_before, &nodes)
            {
                self.fail(violation);
            }
        }
        let node = &mut self.nodes[index];
        // What may leave before the write is durable leaves now, as the engine sends it.
        let leaving = std::mem::take(&mut node.out.messages);
        self.send_all(index, leaving);
        let node = &mut self.nodes[index];
        let Some(core) = node.core.as_mut() else {
            return;
        };
        let observed = self.monitor.observe_node(core);
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
    /// send what waited for the write, apply through the apply stage (answering this node's
    /// clients), hand back refusals, then acknowledge the write to the core.
    fn flush(&mut self, index: usize) {
        let node = &mut self.nodes[index];
        node.flush_scheduled = false;
        let Some(core) = node.core.as_ref() else {
            return;
        };
        let (id, status, honest) = (node.id, core.status(), core.is_honest());
        let mut out = std::mem::take(&mut node.out);
        // 1. Persist and sync; only then may votes and acknowledgements leave.
        if let Err(e) = node.store.persist(&out.write) {
            self.fail(Violation::Storage {
                node: id,
                detail: e.to_string(),
            });
            out.clear();
            self.nodes[index].out = out;
            return;
        }
        let durable = crate::protocol::Durability::of(&out.write);
        if status.is_leader {
            self.memberships_committed += out
                .events
                .iter()
                .filter(|event| {
                    matches!(event, crate::protocol::Event::MembershipChanged {
                        committed: true, membership, ..
                    } if !membership.is_joint())
                })
                .count() as u64;
        }
        let leaving = std::mem::take(&mut out.messages_after_write);
        self.send_all(index, leaving);
        // 2. Apply through the engine's apply stage, answering this node's clients. Only the
        // honest replicas promise state-machine safety: what a Byzantine one applies (a twin's
        // instance cut off with its own quorum, say) is its own business.
        for entry in out.committed.iter().filter(|_| honest) {
            if let Err(violation) = self.monitor.observe_applied(id, status.term, entry) {
                self.fail(violation);
            }
        }
        if let Some(watch) = self.failover
            && status.is_leader
            && status.term > watch.crashed_term
            && !out.committed.is_empty()
        {
            self.failover_samples
                .push(self.now_us - watch.crashed_at_us);
            self.failover = None;
        }
        let mut answers = std::mem::take(&mut self.answers);
        let node = &mut self.nodes[index];
        if let Some(snapshot) = out.restore.take() {
            node.snapshot_index = snapshot.index;
            if let Err(detail) = node.apply.restore(&snapshot, &mut answers) {
                self.fail(Violation::Apply { node: id, detail });
            }
            self.snapshots.1 += 1;
        }
        let node = &mut self.nodes[index];
        node.apply.apply(out.committed.drain(..), &mut answers);
        node.apply.reads_ready(out.reads.drain(..), &mut answers);
        node.apply.reject(out.rejected.drain(..), &mut answers);
        self.deliver_answers(index, &mut answers);
        self.answers = answers;
        out.clear();
        self.nodes[index].out = out;
        // 3. Tell the core what is durable.
        if let Some(hard_state) = durable.hard_state {
            self.step(index, Input::HardStateDurable(hard_state));
        }
        if let Some((index_durable, term)) = durable.last_appended {
            self.step(
                index,
                Input::Durable {
                    index: index_durable,
                    term,
                },
            );
        }
        self.maybe_snapshot(index);
    }

    /// Snapshots node `index`'s applied state when a snapshot interval passed since its last,
    /// as the engine does (here at once; the engine writes it on a background thread).
    fn maybe_snapshot(&mut self, index: usize) {
        let interval = self.config.snapshot_interval;
        let node = &mut self.nodes[index];
        if interval == 0
            || !P::COMPACTS_LOG
            || node.core.is_none()
            || node.apply.applied_index() < node.snapshot_index + interval
        {
            return;
        }
        let Some(capture) = node.apply.capture_snapshot() else {
            return;
        };
        let id = node.id;
        match capture.write() {
            Ok(snapshot) => {
                node.snapshot_index = snapshot.index;
                self.snapshots.0 += 1;
                self.step(index, Input::SnapshotTaken(snapshot));
            }
            Err(error) => self.fail(Violation::Apply {
                node: id,
                detail: format!("snapshot: {error}"),
            }),
        }
    }

    /// Hands `envelopes` of node `index` to the network, each to the instance of its recipient
    /// that the twins' layout routes it to (the recipient itself when there are no twins), and
    /// tells the core what left.
    fn send_all(&mut self, index: usize, envelopes: Vec<Envelope<P::Message>>) {
        let node = &mut self.nodes[index];
        let Some(core) = node.core.as_mut() else {
            return;
        };
        for envelope in envelopes {
            let to = if self.config.twins.twinned.is_empty() {
                Some(envelope.to)
            } else {
                self.config.twins.route(
                    self.config.nodes,
                    node.id,
                    node.address,
                    envelope.to,
                    self.sides_joined,
                )
            };
            if let Some(to) = to {
                core.sent(&envelope);
                let forgery = self.config.forgeries > 0.0
                    && self.rng.random_bool(self.config.forgeries)
                    && P::AUTHENTICATES;
                if forgery {
                    let entropy = self.rng.random::<u64>();
                    let injected = if entropy % 2 == 0 || self.replayable.is_empty() {
                        P::forge(&envelope, entropy >> 1)
                    } else {
                        let old = (entropy >> 1) as usize % self.replayable.len();
                        Some(self.replayable[old].clone())
                    };
                    if let Some(injected) = injected {
                        self.forgeries_sent += 1;
                        let to = injected.to;
                        self.endpoints[index].send(to, injected);
                    }
                    if self.replayable.len() < REPLAYABLE {
                        self.replayable.push(envelope.clone());
                    } else {
                        let slot = (entropy >> 8) as usize % REPLAYABLE;
                        self.replayable[slot] = envelope.clone();
                    }
                }
                self.endpoints[index].send(to, envelope);
            }
        }
    }

    /// Hands the apply stage's answers of node `index` to the clients still waiting for them.
    fn deliver_answers(&mut self, index: usize, answers: &mut Vec<Answer<ClientOp, u64>>) {
        for answer in answers.drain(..) {
            let (client, op) = answer.reply;
            let waiting_here = matches!(self.clients[client].state,
                ClientState::Waiting { op: o, node, .. } if o == op && node == index);
            if !waiting_here {
                continue; // the client gave up on this request (its deadline passed)
            }
            match answer.outcome {
                Ok(applied) => {
                    let output = match applied.response {
                        Some(Ok(response)) => response.downcast::<KvOutput>().map(|o| *o).ok(),
                        _ => None,
                    };
                    match output {
                        Some(output) => self.complete(client, op, index, output, applied.index),
                        None => self.fail(Violation::Apply {
                            node: self.nodes[index].id,
                            detail: format!(
                                "request of operation {op} applied at {} without a KvOutput",
                                applied.index
                            ),
                        }),
                    }
                }
                Err(Unanswered::Rejected(reason)) => {
                    let hint = match reason {
                        RejectReason::NotLeader {
                            leader: Some(leader),
                        } => self.nodes.iter().position(|n| n.id == leader),
                        _ => None,
                    };
                    self.refused(client, op, hint);
                }
                // Silence as far as the client knows: its own deadline handles it.
                Err(Unanswered::TimedOut | Unanswered::Stopped(_)) => {}
            }
        }
    }

    fn maybe_flush(&mut self, node: usize) {
        if self.config.flush_probability > 0.0
            && self.rng.random_bool(self.config.flush_probability)
        {
            self.step(node, Input::FlushProposals);
        }
    }

    /// The pairwise checks of the core (for Raft: log matching between every two live nodes,
    /// and leader completeness of every live leader against everything applied so far).
    pub fn full_check(&self) -> Result<(), Violation> {
        let live: Vec<&P> = self.nodes.iter().filter_map(|n| n.core.as_ref()).collect();
        P::check_all(&live, &self.monitor)
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
        // A spare starts as a node started to join does: knowing no members.
        let voters: Vec<NodeId> = if node.id.0 <= self.config.nodes as u64 {
            (1..=self.config.nodes as u64).map(NodeId).collect()
        } else {
            Vec::new()
        };
        // Twins draw apart (their apply stages hand out request ids from different bases).
        let seed = mix(self.config.seed, (node.address.0 << 32) | node.incarnation);
        let snapshot = recovered.snapshot.clone();
        match P::start(&self.config.protocol, node.id, voters, seed, recovered) {
            Ok(core) => {
                node.core = Some(core);
                // A fresh state machine starts from the snapshot, if any, and replays the log
                // after it, as a restarted engine.
                let first_request_id = mix(seed, 0x1d) >> 1;
                node.apply =
                    ApplyStage::new(node.id, first_request_id, Some(self.config.new_machine()));
                node.apply.bugs = self.config.apply_bugs;
                node.next_tick_us = self.now_us + self.rng.random_range(1..=TICK_US);
                node.snapshot_index = 0;
                if let Some(snapshot) = snapshot {
                    node.snapshot_index = snapshot.index;
                    let id = node.id;
                    if let Err(detail) = node.apply.restore(&snapshot, &mut Vec::new()) {
                        self.fail(Violation::Apply { node: id, detail });
                    }
                }
            }
            Err(e) => {
                let detail = format!("node settings: {e}");
                self.fail(Violation::Scenario { detail });
            }
        }
    }

    /// Crashes the node at address `id` (see [`Sim::node`]): unsynced writes are lost, the core
    /// and the state machine are dropped, and the clients waiting on it learn nothing about their
    /// operations.
    pub fn crash(&mut self, id: NodeId) {
        let index = id.0 as usize - 1;
        if self.nodes[index].core.is_none() {
            return;
        }
        self.crashes += 1;
        self.trace(|| format!("crash {id}"));
        let node = &mut self.nodes[index];
        node.store.crash();
        node.core = None;
        node.out.clear(); // never persisted, never sent
        node.flush_scheduled = false;
        self.duplicate_applies += node.apply.duplicates_skipped();
        let mut waiting = Vec::new();
        node.apply.fail_all("crashed", &mut waiting);
        node.apply = ApplyStage::new(node.id, 1, None);
        for answer in waiting {
            let (client, op) = answer.reply;
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
        self.hint_unreachable(id);
    }

    /// Restarts the node at address `id` from its store's durable state with a fresh state
    /// machine.
    pub fn restart_node(&mut self, id: NodeId) {
        self.restart(id.0 as usize - 1);
    }

    fn restart(&mut self, index: usize) {
        if self.nodes[index].core.is_some() {
            return;
        }
        self.nodes[index].incarnation += 1;
        self.trace(|| format!("restart n{}", index + 1));
        self.start_node(index);
    }

    /// Hands the node at address `id` an operator request (e.g. a Raft leadership transfer).
    pub fn control(&mut self, id: NodeId, control: P::Control) {
        self.trace(|| format!("control at {id}: {control:?}"));
        self.step(id.0 as usize - 1, Input::Control(control));
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
        let term = self.node(leader)?.status().term;
        self.watch_failover(term);
        self.crash(leader);
        Some(leader)
    }

    /// True while a watched failover has not completed.
    pub fn failover_pending(&self) -> bool {
        self.failover.is_some()
    }

    /// [`SimProtocol::check_settled`] on the leader, if there is one.
    pub fn check_settled(&self) -> Result<(), Violation> {
        match self.leader().and_then(|leader| self.node(leader)) {
            Some(leader) => leader.check_settled(),
            None => Ok(()),
        }
    }

    /// One line per node: down, or its term, leader, commit and applied index and what its core
    /// says of itself ([`SimProtocol::describe`]).
    pub fn describe_nodes(&self) -> String {
        self.nodes
            .iter()
            .map(|n| match &n.core {
                None => format!("{}: down", n.address),
                Some(core) => {
                    let status = core.status();
                    format!(
                        "{}: term {}, leader {:?}, commit {}, applied {}, {}",
                        n.address,
                        status.term,
                        status.leader,
                        status.commit_index,
                        n.apply.applied_index(),
                        core.describe()
                    )
                }
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// Highest index every live node has applied (every member, as the leader sees the
    /// membership, for a core that changes it: a removed node or a spare never added is not
    /// waited for).
    pub fn min_applied(&self) -> LogIndex {
        let members = self
            .leader()
            .and_then(|leader| self.node(leader))
            .and_then(P::members);
        self.nodes
            .iter()
            .filter(|n| members.as_ref().is_none_or(|m| m.contains(&n.id)))
            .filter(|n| n.core.as_ref().is_none_or(P::is_honest))
            .map(|n| {
                if n.core.is_some() {
                    n.apply.applied_index()
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

impl Sim<RaftNode> {
    /// Asks node `id` (normally the leader) to transfer leadership to `to`.
    pub fn transfer_leadership(&mut self, id: NodeId, to: NodeId) {
        self.control(
            id,
            crate::protocol::raft::Control::TransferLeadership { to },
        );
    }
}
