//! A deterministic in-memory network for simulation tests, behind the same [`Transport`] trait the
//! engine uses.
//!
//! Every message sent through a [`SimulatedEndpoint`] is given a delivery time drawn from a seeded
//! latency model (in simulated microseconds) and queued; the test driver asks the network for the
//! next message due ([`SimulatedNetwork::pop_due`]) and hands it to the recipient. Drops,
//! duplicates, long delays and reordering (which falls out of random latency) are drawn from the
//! same seeded generator, and partitions, one-way link failures and isolated nodes are set by the
//! driver. Nothing depends on a wall clock, a hash map's iteration order or thread scheduling: the
//! same seed and the same calls give the same deliveries, in the same order, bit for bit. Ties in
//! delivery time are broken by send order.
//!
//! The network is shared through an `Arc<Mutex<_>>` only so that endpoints can satisfy
//! `Transport: Send + Sync`; a simulation drives it from one thread.
//!
//! ```
//! use consensus::NodeId;
//! use consensus::transport::Transport;
//! use consensus::transport::simulated::{LatencyModel, NetworkConfig, SimulatedNetwork};
//!
//! let config = NetworkConfig { latency: LatencyModel::uniform(100, 900), ..NetworkConfig::default() };
//! let network = SimulatedNetwork::new(42, config)?;
//! let (a, b) = (NodeId(1), NodeId(2));
//! network.endpoint(a).send(b, "hello");
//! network.block(b, a); // one way: b can no longer reach a
//! network.endpoint(b).send(a, "lost");
//! // The driver advances simulated time to the next delivery and hands the message over.
//! let at = network.next_delivery_at().expect("one message in flight");
//! network.advance_to(at);
//! let delivery = network.pop_due(at).expect("due now");
//! assert_eq!((delivery.from, delivery.to, delivery.message), (a, b, "hello"));
//! assert!(network.next_delivery_at().is_none());
//! # Ok::<(), consensus::ConfigError>(())
//! ```

use std::cmp::Ordering;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap};
use std::sync::{Arc, Mutex};

use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::error::ConfigError;
use crate::sync::lock;
use crate::transport::Transport;
use crate::types::NodeId;

/// How long a message takes, in simulated microseconds.
///
/// Most messages take a time drawn uniformly from `min_us..=max_us`; with probability
/// `tail_probability` a message instead takes a time drawn uniformly from `max_us..=tail_max_us`,
/// modelling the occasional long delay (a congested link, a retransmission).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LatencyModel {
    /// Shortest ordinary latency.
    pub min_us: u64,
    /// Longest ordinary latency.
    pub max_us: u64,
    /// Chance that a message is delayed into the tail.
    pub tail_probability: f64,
    /// Longest tail latency.
    pub tail_max_us: u64,
}

impl LatencyModel {
    /// Every message takes exactly `latency_us`.
    pub fn fixed(latency_us: u64) -> Self {
        LatencyModel {
            min_us: latency_us,
            max_us: latency_us,
            tail_probability: 0.0,
            tail_max_us: latency_us,
        }
    }

    /// Uniform in `min_us..=max_us`, no tail.
    pub fn uniform(min_us: u64, max_us: u64) -> Self {
        LatencyModel {
            min_us,
            max_us,
            tail_probability: 0.0,
            tail_max_us: max_us,
        }
    }

    fn sample(&self, rng: &mut ChaCha8Rng) -> u64 {
        if self.tail_probability > 0.0 && rng.random_bool(self.tail_probability) {
            rng.random_range(self.max_us..=self.tail_max_us)
        } else {
            rng.random_range(self.min_us..=self.max_us)
        }
    }
}

/// Settings of a [`SimulatedNetwork`]. They may be changed while the simulation runs.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct NetworkConfig {
    /// Latency of each message.
    pub latency: LatencyModel,
    /// Chance that a message is lost.
    pub drop_probability: f64,
    /// Chance that a message is delivered twice (the copy gets its own latency).
    pub duplicate_probability: f64,
    /// Messages queued on one directed link at most; more are dropped and counted, as a real
    /// transport's bounded per-peer queue would.
    pub max_in_flight_per_link: usize,
}

impl Default for NetworkConfig {
    /// A healthy LAN: 0.5–3 ms, nothing lost, 4,096 messages per link.
    fn default() -> Self {
        NetworkConfig {
            latency: LatencyModel::uniform(500, 3_000),
            drop_probability: 0.0,
            duplicate_probability: 0.0,
            max_in_flight_per_link: 4_096,
        }
    }
}

impl NetworkConfig {
    /// Checks that the settings describe a network (probabilities in `[0, 1]`, ordered latency
    /// bounds, room for at least one message per link).
    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = ConfigError::invalid::<()>;
        for (field, p) in [
            ("drop_probability", self.drop_probability),
            ("duplicate_probability", self.duplicate_probability),
            ("latency.tail_probability", self.latency.tail_probability),
        ] {
            if !(0.0..=1.0).contains(&p) {
                return invalid(field, p.to_string(), "must be a probability in [0, 1]");
            }
        }
        if self.latency.min_us > self.latency.max_us {
            return invalid(
                "latency.min_us",
                self.latency.min_us.to_string(),
                "must not exceed max_us",
            );
        }
        if self.latency.max_us > self.latency.tail_max_us {
            return invalid(
                "latency.tail_max_us",
                self.latency.tail_max_us.to_string(),
                "must not be below max_us",
            );
        }
        if self.max_in_flight_per_link == 0 {
            return invalid("max_in_flight_per_link", "0".into(), "must be at least 1");
        }
        Ok(())
    }
}

/// Counters of what happened to the messages sent so far.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NetworkStats {
    /// Messages handed to [`Transport::send`].
    pub sent: u64,
    /// Messages handed to the driver by [`SimulatedNetwork::pop_due`].
    pub delivered: u64,
    /// Lost to the random drop probability.
    pub dropped_random: u64,
    /// Lost to a partition, a blocked link or an isolated node (at send or at delivery time).
    pub dropped_partition: u64,
    /// Lost because the link's queue was full.
    pub dropped_overflow: u64,
    /// Extra copies queued.
    pub duplicated: u64,
}

/// A message leaving the network.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Delivery<M> {
    /// The sender.
    pub from: NodeId,
    /// The recipient.
    pub to: NodeId,
    /// Simulated time at which it arrives.
    pub deliver_at_us: u64,
    /// What was sent.
    pub message: M,
}

/// A queued message; ordered so that a max-heap pops the earliest `(deliver_at_us, sequence)`.
struct InFlight<M> {
    deliver_at_us: u64,
    sequence: u64,
    from: NodeId,
    to: NodeId,
    message: M,
}

impl<M> PartialEq for InFlight<M> {
    fn eq(&self, other: &Self) -> bool {
        (self.deliver_at_us, self.sequence) == (other.deliver_at_us, other.sequence)
    }
}

impl<M> Eq for InFlight<M> {}

impl<M> PartialOrd for InFlight<M> {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl<M> Ord for InFlight<M> {
    fn cmp(&self, other: &Self) -> Ordering {
        (other.deliver_at_us, other.sequence).cmp(&(self.deliver_at_us, self.sequence))
    }
}

struct NetworkState<M> {
    config: NetworkConfig,
    rng: ChaCha8Rng,
    now_us: u64,
    next_sequence: u64,
    queue: BinaryHeap<InFlight<M>>,
    in_flight_per_link: BTreeMap<(NodeId, NodeId), usize>,
    /// Directed links that lose everything.
    blocked: BTreeSet<(NodeId, NodeId)>,
    /// Nodes cut off in both directions from everyone.
    isolated: BTreeSet<NodeId>,
    stats: NetworkStats,
}

impl<M: Clone> NetworkState<M> {
    fn link_is_cut(&self, from: NodeId, to: NodeId) -> bool {
        self.isolated.contains(&from)
            || self.isolated.contains(&to)
            || self.blocked.contains(&(from, to))
    }

    fn send(&mut self, from: NodeId, to: NodeId, message: M) {
        self.stats.sent += 1;
        if self.link_is_cut(from, to) {
            self.stats.dropped_partition += 1;
            return;
        }
        if self.config.drop_probability > 0.0 && self.rng.random_bool(self.config.drop_probability)
        {
            self.stats.dropped_random += 1;
            return;
        }
        let copies = if self.config.duplicate_probability > 0.0
            && self.rng.random_bool(self.config.duplicate_probability)
        {
            2
        } else {
            1
        };
        for copy in 0..copies {
            let queued = self.in_flight_per_link.entry((from, to)).or_insert(0);
            if *queued >= self.config.max_in_flight_per_link {
                self.stats.dropped_overflow += 1;
                continue;
            }
            *queued += 1;
            if copy > 0 {
                self.stats.duplicated += 1;
            }
            let deliver_at_us = self.now_us + self.config.latency.sample(&mut self.rng);
            let sequence = self.next_sequence;
            self.next_sequence += 1;
            self.queue.push(InFlight {
                deliver_at_us,
                sequence,
                from,
                to,
                message: message.clone(),
            });
        }
    }
}

/// The shared network. Clone it freely: clones are handles to the same network.
pub struct SimulatedNetwork<M> {
    state: Arc<Mutex<NetworkState<M>>>,
}

impl<M> Clone for SimulatedNetwork<M> {
    fn clone(&self) -> Self {
        SimulatedNetwork {
            state: Arc::clone(&self.state),
        }
    }
}

/// One node's handle on a [`SimulatedNetwork`]: what it sends leaves from `node`.
pub struct SimulatedEndpoint<M> {
    node: NodeId,
    state: Arc<Mutex<NetworkState<M>>>,
}

impl<M> SimulatedEndpoint<M> {
    /// The node this endpoint sends from.
    pub fn node(&self) -> NodeId {
        self.node
    }
}

impl<M: Clone + Send> Transport<M> for SimulatedEndpoint<M> {
    fn send(&self, to: NodeId, message: M) {
        lock(&self.state).send(self.node, to, message);
    }
}

impl<M: Clone + Send> SimulatedNetwork<M> {
    /// A network whose randomness is drawn from `seed`.
    pub fn new(seed: u64, config: NetworkConfig) -> Result<Self, ConfigError> {
        config.validate()?;
        Ok(SimulatedNetwork {
            state: Arc::new(Mutex::new(NetworkState {
                config,
                rng: ChaCha8Rng::seed_from_u64(seed),
                now_us: 0,
                next_sequence: 0,
                queue: BinaryHeap::new(),
                in_flight_per_link: BTreeMap::new(),
                blocked: BTreeSet::new(),
                isolated: BTreeSet::new(),
                stats: NetworkStats::default(),
            })),
        })
    }

    /// The handle through which `node` sends.
    pub fn endpoint(&self, node: NodeId) -> SimulatedEndpoint<M> {
        SimulatedEndpoint {
            node,
            state: Arc::clone(&self.state),
        }
    }

    /// Sends as `from` would (the same as `self.endpoint(from).send(to, message)`).
    pub fn send(&self, from: NodeId, to: NodeId, message: M) {
        lock(&self.state).send(from, to, message);
    }

    /// Moves the clock that stamps sends. Time never goes back: an earlier time is ignored.
    pub fn advance_to(&self, now_us: u64) {
        let mut state = lock(&self.state);
        state.now_us = state.now_us.max(now_us);
    }

    /// The network's current time.
    pub fn now_us(&self) -> u64 {
        lock(&self.state).now_us
    }

    /// When the earliest queued message arrives, if any is queued.
    pub fn next_delivery_at(&self) -> Option<u64> {
        lock(&self.state).queue.peek().map(|m| m.deliver_at_us)
    }

    /// The earliest queued message due at or before `now_us`, removed from the queue. Messages
    /// whose link was cut while they were in flight are dropped (and counted) instead.
    pub fn pop_due(&self, now_us: u64) -> Option<Delivery<M>> {
        let mut state = lock(&self.state);
        while state
            .queue
            .peek()
            .is_some_and(|m| m.deliver_at_us <= now_us)
        {
            let Some(m) = state.queue.pop() else { break };
            if let Some(count) = state.in_flight_per_link.get_mut(&(m.from, m.to)) {
                *count -= 1;
            }
            if state.link_is_cut(m.from, m.to) {
                state.stats.dropped_partition += 1;
                continue;
            }
            state.stats.delivered += 1;
            return Some(Delivery {
                from: m.from,
                to: m.to,
                deliver_at_us: m.deliver_at_us,
                message: m.message,
            });
        }
        None
    }

    /// When the last message queued from `from` to `to` is due, if any is in flight.
    pub fn last_delivery_at(&self, from: NodeId, to: NodeId) -> Option<u64> {
        lock(&self.state)
            .queue
            .iter()
            .filter(|m| m.from == from && m.to == to)
            .map(|m| m.deliver_at_us)
            .max()
    }

    /// Messages queued and not yet delivered.
    pub fn in_flight(&self) -> usize {
        lock(&self.state).queue.len()
    }

    /// The current settings.
    pub fn config(&self) -> NetworkConfig {
        lock(&self.state).config
    }

    /// Replaces the settings; messages already queued keep their delivery times.
    pub fn set_config(&self, config: NetworkConfig) -> Result<(), ConfigError> {
        config.validate()?;
        lock(&self.state).config = config;
        Ok(())
    }

    /// Cuts every link between `side_a` and `side_b`, both ways.
    pub fn partition(&self, side_a: &[NodeId], side_b: &[NodeId]) {
        let mut state = lock(&self.state);
        for &a in side_a {
            for &b in side_b {
                state.blocked.insert((a, b));
                state.blocked.insert((b, a));
            }
        }
    }

    /// Cuts the link from `from` to `to` only: `to` still reaches `from`.
    pub fn block(&self, from: NodeId, to: NodeId) {
        lock(&self.state).blocked.insert((from, to));
    }

    /// Restores the link from `from` to `to` (not the reverse).
    pub fn unblock(&self, from: NodeId, to: NodeId) {
        lock(&self.state).blocked.remove(&(from, to));
    }

    /// Cuts `node` off from everyone, both ways, until [`SimulatedNetwork::rejoin`] or
    /// [`SimulatedNetwork::heal`].
    pub fn isolate(&self, node: NodeId) {
        lock(&self.state).isolated.insert(node);
    }

    /// Ends the isolation of `node` (links blocked one by one stay blocked).
    pub fn rejoin(&self, node: NodeId) {
        lock(&self.state).isolated.remove(&node);
    }

    /// Restores every link and ends every isolation.
    pub fn heal(&self) {
        let mut state = lock(&self.state);
        state.blocked.clear();
        state.isolated.clear();
    }

    /// True if a message from `from` to `to` would be lost to a partition now.
    pub fn is_cut(&self, from: NodeId, to: NodeId) -> bool {
        lock(&self.state).link_is_cut(from, to)
    }

    /// True if any link is blocked or any node isolated.
    pub fn has_faults(&self) -> bool {
        let state = lock(&self.state);
        !state.blocked.is_empty() || !state.isolated.is_empty()
    }

    /// Drops every message queued to or from `node`, as a crashed process's connections do.
    pub fn discard_for(&self, node: NodeId) {
        let mut state = lock(&self.state);
        let queue = std::mem::take(&mut state.queue);
        let mut kept = BinaryHeap::with_capacity(queue.len());
        for m in queue.into_vec() {
            if m.from == node || m.to == node {
                if let Some(count) = state.in_flight_per_link.get_mut(&(m.from, m.to)) {
                    *count -= 1;
                }
                state.stats.dropped_partition += 1;
            } else {
                kept.push(m);
            }
        }
        state.queue = kept;
    }

    /// What happened to the messages so far.
    pub fn stats(&self) -> NetworkStats {
        lock(&self.state).stats
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: NodeId = NodeId(1);
    const B: NodeId = NodeId(2);
    const C: NodeId = NodeId(3);

    fn drain(network: &SimulatedNetwork<u32>) -> Vec<Delivery<u32>> {
        let mut out = Vec::new();
        while let Some(at) = network.next_delivery_at() {
            network.advance_to(at);
            if let Some(d) = network.pop_due(at) {
                out.push(d);
            }
        }
        out
    }

    fn busy_network(seed: u64) -> Vec<Delivery<u32>> {
        let config = NetworkConfig {
            latency: LatencyModel {
                min_us: 10,
                max_us: 500,
                tail_probability: 0.1,
                tail_max_us: 5_000,
            },
            drop_probability: 0.2,
            duplicate_probability: 0.2,
            max_in_flight_per_link: 64,
        };
        let network = SimulatedNetwork::new(seed, config).unwrap();
        let (a, b) = (network.endpoint(A), network.endpoint(B));
        for i in 0..200 {
            network.advance_to(i * 7);
            a.send(B, i as u32);
            b.send(C, 1_000 + i as u32);
        }
        drain(&network)
    }

    #[test]
    fn the_same_seed_gives_the_same_deliveries() {
        assert_eq!(busy_network(7), busy_network(7));
        assert_ne!(busy_network(7), busy_network(8));
    }

    #[test]
    fn deliveries_come_in_time_order_and_random_latency_reorders() {
        let deliveries = busy_network(3);
        assert!(
            deliveries
                .windows(2)
                .all(|w| w[0].deliver_at_us <= w[1].deliver_at_us)
        );
        let from_a: Vec<u32> = deliveries
            .iter()
            .filter(|d| d.from == A)
            .map(|d| d.message)
            .collect();
        assert!(
            from_a.windows(2).any(|w| w[0] > w[1]),
            "latency spread must reorder some messages"
        );
    }

    #[test]
    fn drops_and_duplicates_are_counted_and_happen() {
        let config = NetworkConfig {
            drop_probability: 0.3,
            duplicate_probability: 0.3,
            ..NetworkConfig::default()
        };
        let network = SimulatedNetwork::new(1, config).unwrap();
        for i in 0..1_000 {
            network.send(A, B, i);
        }
        let delivered = drain(&network);
        let stats = network.stats();
        assert_eq!(stats.sent, 1_000);
        assert!(
            stats.dropped_random > 200 && stats.dropped_random < 400,
            "{stats:?}"
        );
        assert!(stats.duplicated > 100, "{stats:?}");
        assert_eq!(delivered.len() as u64, stats.delivered);
        assert_eq!(
            stats.delivered,
            1_000 - stats.dropped_random + stats.duplicated
        );
    }

    #[test]
    fn symmetric_and_one_way_partitions_and_isolation() {
        let network = SimulatedNetwork::new(1, NetworkConfig::default()).unwrap();
        network.partition(&[A], &[B, C]);
        assert!(network.is_cut(A, B) && network.is_cut(C, A) && !network.is_cut(B, C));
        network.heal();
        network.block(A, B);
        assert!(network.is_cut(A, B) && !network.is_cut(B, A));
        network.send(A, B, 1);
        network.send(B, A, 2);
        assert_eq!(
            drain(&network)
                .iter()
                .map(|d| d.message)
                .collect::<Vec<_>>(),
            vec![2]
        );
        network.unblock(A, B);
        network.isolate(C);
        assert!(network.is_cut(C, A) && network.is_cut(B, C) && !network.is_cut(A, B));
        network.rejoin(C);
        assert!(!network.has_faults());
    }

    #[test]
    fn a_cut_made_while_a_message_is_in_flight_loses_it() {
        let network = SimulatedNetwork::new(1, NetworkConfig::default()).unwrap();
        network.send(A, B, 1);
        network.isolate(B);
        assert!(drain(&network).is_empty());
        assert_eq!(network.stats().dropped_partition, 1);
    }

    #[test]
    fn the_per_link_queue_is_bounded() {
        let config = NetworkConfig {
            max_in_flight_per_link: 3,
            ..NetworkConfig::default()
        };
        let network = SimulatedNetwork::new(1, config).unwrap();
        for i in 0..5 {
            network.send(A, B, i);
        }
        network.send(A, C, 9);
        assert_eq!(network.in_flight(), 4);
        assert_eq!(network.stats().dropped_overflow, 2);
        drain(&network);
        network.send(A, B, 10);
        assert_eq!(network.in_flight(), 1, "delivery frees the link's queue");
    }

    #[test]
    fn nothing_is_delivered_before_its_time_and_ties_keep_send_order() {
        let network = SimulatedNetwork::new(
            1,
            NetworkConfig {
                latency: LatencyModel::fixed(100),
                ..NetworkConfig::default()
            },
        )
        .unwrap();
        network.send(A, B, 1);
        network.send(C, B, 2);
        assert_eq!(network.next_delivery_at(), Some(100));
        assert!(network.pop_due(99).is_none());
        assert_eq!(network.pop_due(100).map(|d| d.message), Some(1));
        assert_eq!(network.pop_due(100).map(|d| d.message), Some(2));
    }

    #[test]
    fn discarding_a_crashed_nodes_traffic() {
        let network = SimulatedNetwork::new(1, NetworkConfig::default()).unwrap();
        network.send(A, B, 1);
        network.send(B, C, 2);
        network.send(C, A, 3);
        network.discard_for(A);
        assert_eq!(
            drain(&network)
                .iter()
                .map(|d| d.message)
                .collect::<Vec<_>>(),
            vec![2]
        );
    }

    #[test]
    fn bad_settings_are_refused_with_a_typed_error() {
        let bad = NetworkConfig {
            drop_probability: 1.5,
            ..NetworkConfig::default()
        };
        assert!(matches!(
            SimulatedNetwork::<u32>::new(1, bad),
            Err(ConfigError::Invalid {
                field: "drop_probability",
                ..
            })
        ));
        let bad = NetworkConfig {
            latency: LatencyModel::uniform(10, 5),
            ..NetworkConfig::default()
        };
        assert!(bad.validate().is_err());
        let bad = NetworkConfig {
            max_in_flight_per_link: 0,
            ..NetworkConfig::default()
        };
        assert!(bad.validate().is_err());
    }
}
