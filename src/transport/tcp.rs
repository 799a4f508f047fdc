//! The TCP transport: tarpc over tokio, one outbound connection per peer.
//!
//! # Shape
//! Each node listens on [`TcpTransportConfig::bind_address`] and dials each configured peer. A
//! dialed connection carries only the dialer's messages (the listener answers each batch with a
//! small acknowledgement), so between two nodes there are two connections, one per direction, and
//! a node's sending never waits on the other's.
//!
//! On a new connection the dialer calls `hello` with its node id, cluster id and protocol version,
//! and the listener answers with its own: this is how a peer given as `host:port` gets its id, and
//! how an `id@host:port` peer is checked. Nodes of different clusters or protocol versions refuse
//! each other. Then the dialer calls `deliver` once per batch.
//!
//! # Sending
//! [`Transport::send`] never blocks: it puts the message on the peer's bounded queue, or drops
//! and counts it ([`TransportStats`]) when the queue is full or the peer's id is not known yet.
//! The peer's task takes everything queued (up to the frame limit) as one batch, so whatever
//! queued while earlier batches were in flight goes as one RPC; up to
//! [`TcpTransportConfig::max_in_flight_per_peer`] batches are in flight at once. Batches leave in
//! queue order and the listener handles one connection's batches in order, so messages from one
//! node to another arrive in the order they were sent unless a connection breaks in between.
//! A broken connection is redialed with exponential backoff between
//! [`TcpTransportConfig::reconnect_backoff_min`] and `reconnect_backoff_max`; batches in flight on
//! it are lost (the protocols retransmit).
//!
//! # Noticing a dead peer
//! When a peer's connection breaks (closed or reset, as a killed process's sockets are) or a
//! redial is refused (nothing listens on its port), the transport reports that peer on the
//! channel [`TcpTransport::unreachable_peers`] returns. A slow peer keeps its connection (a
//! delivery past its deadline does not close it) and is not reported. The reports are hints for
//! the protocol (Raft campaigns at once when its leader is reported): best effort, dropped when
//! nobody reads them fast enough.
//!
//! # Receiving
//! Frames are length-delimited and a frame longer than [`TcpTransportConfig::max_frame_bytes`] is
//! refused from its length prefix, before any of it is read or decoded. An oversized or malformed
//! frame, or a batch that does not decode, closes that connection with a `tracing` error; the node
//! and its other connections go on. Inbound messages go to one bounded tokio channel as
//! `(sender, message)`; when it is full, reading from the sockets waits (backpressure). A
//! transport started with [`TcpTransport::start_delivering`] instead hands each message to a
//! function, on the task that read it: no hand-off to another task (an engine's transport does
//! this, its function queueing the message for the driver).
//!
//! # Threading
//! Everything runs as tasks on the tokio runtime [`TcpTransport::start`] was called on; `send`
//! may be called from any thread, inside or outside the runtime.

mod address;
mod peer;
mod server;
pub mod tls;
mod wire;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use address::{PeerAddress, PeerAddressError};
pub use tls::{PeerTls, TlsError};

use crate::error::ConfigError;
use crate::telemetry::TraceAttachment;
use crate::transport::Transport;
use crate::types::NodeId;

/// Socket and payload options, as the seed's `ConsensusConfig::network_config` takes them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NetworkConfig {
    /// Compress batch payloads of at least 512 bytes with LZ4 when that makes them smaller.
    /// Receivers decode compressed and plain payloads either way.
    pub message_compression: bool,
    /// Set `TCP_NODELAY` on every connection (no Nagle delay on small messages).
    pub tcp_nodelay: bool,
    /// `SO_SNDBUF` in bytes for every connection; 0 keeps the OS default (and its autotuning).
    pub send_buffer_size: usize,
    /// `SO_RCVBUF` in bytes for every connection, set before connecting or listening so that it
    /// shapes the TCP window; 0 keeps the OS default (and its autotuning).
    pub recv_buffer_size: usize,
}

impl Default for NetworkConfig {
    fn default() -> Self {
        NetworkConfig {
            message_compression: false,
            tcp_nodelay: true,
            send_buffer_size: 0,
            recv_buffer_size: 0,
        }
    }
}

/// The largest socket buffer the configuration accepts (the kernel takes an `int`).
const MAX_SOCKET_BUFFER: usize = 1 << 30;

impl NetworkConfig {
    /// Checks that every field can be honoured.
    pub fn validate(&self) -> Result<(), ConfigError> {
        for (field, value) in [
            ("send_buffer_size", self.send_buffer_size),
            ("recv_buffer_size", self.recv_buffer_size),
        ] {
            if value > MAX_SOCKET_BUFFER {
                return Err(ConfigError::Invalid {
                    field,
                    value: value.to_string(),
                    reason: "must be at most 1 GiB (0 keeps the OS default)",
                });
            }
        }
        Ok(())
    }
}

/// Everything [`TcpTransport`] needs besides its peers. Build with [`TcpTransportConfig::new`]
/// and adjust the public fields; [`TcpTransport::start`] validates.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TcpTransportConfig {
    /// This node's id, sent in the handshake.
    pub node_id: NodeId,
    /// Identifies the cluster; peers with another cluster id are refused.
    pub cluster_id: String,
    /// Where to listen (port 0 picks a free port; see [`TcpTransport::local_addr`]).
    pub bind_address: SocketAddr,
    /// Socket and compression options.
    pub network: NetworkConfig,
    /// The largest frame sent or accepted, in bytes; batches are cut to fit. 4 KiB ..= 1 GiB.
    pub max_frame_bytes: usize,
    /// Messages queued per peer before `send` drops them.
    pub peer_queue_capacity: usize,
    /// Inbound messages buffered for the receiver before reading from sockets waits.
    pub inbound_queue_capacity: usize,
    /// Batches on the wire to one peer awaiting acknowledgement.
    pub max_in_flight_per_peer: usize,
    /// First wait before redialing a peer.
    pub reconnect_backoff_min: Duration,
    /// Longest wait before redialing a peer; the wait doubles up to this.
    pub reconnect_backoff_max: Duration,
    /// Deadline of one delivery RPC.
    pub request_timeout: Duration,
    /// Deadline for connecting and completing the handshake, both ways.
    pub handshake_timeout: Duration,
    /// Inbound connections open at once; more are closed on accept.
    pub max_inbound_connections: usize,
    /// Mutual TLS 1.3 on every connection, both ways (see [`tls`]): a peer's id is then the
    /// one its certificate names, and a hello claiming another is refused. `None` is plain
    /// TCP: anyone who reaches the port can claim any id. The certificate must name `node_id`.
    pub tls: Option<PeerTls>,
}

impl TcpTransportConfig {
    /// A configuration with the defaults: 16 MiB frames, 4096-message peer queues, 16384-message
    /// inbound queue, 32 batches in flight per peer, redial backoff 20 ms ..= 2 s, 5 s delivery
    /// deadline, 2 s handshake deadline, 1024 inbound connections, default [`NetworkConfig`].
    pub fn new(node_id: NodeId, cluster_id: impl Into<String>, bind_address: SocketAddr) -> Self {
        TcpTransportConfig {
            node_id,
            cluster_id: cluster_id.into(),
            bind_address,
            network: NetworkConfig::default(),
            max_frame_bytes: 16 << 20,
            peer_queue_capacity: 4096,
            inbound_queue_capacity: 16384,
            max_in_flight_per_peer: 32,
            reconnect_backoff_min: Duration::from_millis(20),
            reconnect_backoff_max: Duration::from_secs(2),
            request_timeout: Duration::from_secs(5),
            handshake_timeout: Duration::from_secs(2),
            max_inbound_connections: 1024,
            tls: None,
        }
    }

    /// Checks every bound; the error names the field and the value.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = ConfigError::invalid::<()>;
        if self.cluster_id.is_empty() || self.cluster_id.len() > 255 {
            return invalid(
                "cluster_id",
                format!("{:?}", self.cluster_id),
                "must be 1 to 255 bytes",
            );
        }
        if !(4096..=(1 << 30)).contains(&self.max_frame_bytes) {
            return invalid(
                "max_frame_bytes",
                self.max_frame_bytes.to_string(),
                "must be between 4096 and 1 GiB",
            );
        }
        for (field, value) in [
            ("peer_queue_capacity", self.peer_queue_capacity),
            ("inbound_queue_capacity", self.inbound_queue_capacity),
            ("max_in_flight_per_peer", self.max_in_flight_per_peer),
            ("max_inbound_connections", self.max_inbound_connections),
        ] {
            if value == 0 || value > 1 << 24 {
                return invalid(field, value.to_string(), "must be between 1 and 16777216");
            }
        }
        for (field, value) in [
            ("reconnect_backoff_min", self.reconnect_backoff_min),
            ("request_timeout", self.request_timeout),
            ("handshake_timeout", self.handshake_timeout),
        ] {
            if value.is_zero() || value > Duration::from_secs(3600) {
                return invalid(
                    field,
                    format!("{value:?}"),
                    "must be above 0 and at most 1 h",
                );
            }
        }
        if self.reconnect_backoff_max < self.reconnect_backoff_min
            || self.reconnect_backoff_max > Duration::from_secs(3600)
        {
            return invalid(
                "reconnect_backoff_max",
                format!("{:?}", self.reconnect_backoff_max),
                "must be at least reconnect_backoff_min and at most 1 h",
            );
        }
        if let Some(tls) = &self.tls
            && tls.node_id() != self.node_id
        {
            return invalid(
                "tls.cert",
                format!("{:?}", tls.node_name()),
                "the certificate names another node than node_id",
            );
        }
        self.network.validate()
    }
}

/// Why the transport could not start.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// See [`ConfigError`].
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// [`TcpTransport::start`] was awaited outside a tokio runtime; the transport's tasks need one.
    #[error("the TCP transport must be started inside a tokio runtime")]
    NoRuntime,
    /// The listening socket could not be set up.
    #[error("cannot listen on {address}: {source}")]
    Bind {
        /// The configured bind address.
        address: SocketAddr,
        /// The OS error.
        source: std::io::Error,
    },
}

/// Counters of what the transport did, since start.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TransportStats {
    /// Messages `send` put on a peer queue.
    pub messages_queued: u64,
    /// Messages dropped because the peer's queue was full.
    pub dropped_queue_full: u64,
    /// Messages dropped because no peer with that id is configured or learned yet.
    pub dropped_unknown_peer: u64,
    /// Messages dropped after leaving the queue: unencodable, larger than a frame, or in a batch
    /// whose delivery failed.
    pub dropped_undelivered: u64,
    /// Messages the receiving peer acknowledged.
    pub messages_delivered: u64,
    /// Batches the receiving peer acknowledged.
    pub batches_delivered: u64,
    /// Messages received from peers and handed to the inbound channel.
    pub messages_received: u64,
    /// Outbound connections that completed the handshake.
    pub connections_established: u64,
    /// Dial attempts that failed (peer down, unresolvable, handshake refused or timed out).
    pub dial_failures: u64,
    /// Inbound connections closed for an oversized or malformed frame or a refused handshake.
    pub connections_rejected: u64,
    /// Times a peer was reported unreachable: a connection to it broke or a redial was refused.
    pub unreachable_reports: u64,
}

#[derive(Default)]
struct Counters {
    messages_queued: AtomicU64,
    dropped_queue_full: AtomicU64,
    dropped_unknown_peer: AtomicU64,
    dropped_undelivered: AtomicU64,
    messages_delivered: AtomicU64,
    batches_delivered: AtomicU64,
    messages_received: AtomicU64,
    connections_established: AtomicU64,
    dial_failures: AtomicU64,
    connections_rejected: AtomicU64,
    unreachable_reports: AtomicU64,
}

fn bump(counter: &AtomicU64, by: u64) {
    counter.fetch_add(by, Ordering::Relaxed);
}

/// A message a peer delivered, with the trace context of the traced proposal it carries, if any
/// (see [`crate::telemetry`]).
#[derive(Debug)]
pub struct Inbound<M> {
    /// The peer, as its handshake (and certificate) identified it.
    pub from: NodeId,
    /// The message.
    pub message: M,
    /// The trace attachment that came with it.
    pub trace: Option<Box<TraceAttachment>>,
}

/// What a transport started with [`TcpTransport::start_delivering`] hands each inbound message
/// to; it returns false once nothing takes messages any more (the node is shutting down).
pub type Deliver<M> = Arc<dyn Fn(Inbound<M>) -> bool + Send + Sync>;

/// Where inbound messages go.
pub(crate) enum InboundSink<M> {
    /// A bounded channel: reading waits while it is full.
    Channel(mpsc::Sender<Inbound<M>>),
    /// A function called on the reading task (see [`TcpTransport::start_delivering`]).
    Deliver(Deliver<M>),
}

impl<M> InboundSink<M> {
    /// Hands `message` on; false once nothing takes messages any more.
    async fn deliver(&self, message: Inbound<M>) -> bool {
        match self {
            InboundSink::Channel(channel) => channel.send(message).await.is_ok(),
            InboundSink::Deliver(deliver) => deliver(message),
        }
    }
}

/// What stops one outbound peer's task.
#[derive(Clone, Debug)]
pub(crate) struct Dialer {
    serial: u64,
    stop: CancellationToken,
}

/// The dialers by peer id ([`Transport::remove_member`] stops them): the one given that id,
/// and any `host:port` dialer whose handshake learned it. With the ids removed from the group
/// and not added back, so that a `host:port` dialer that learns one of them stops instead of
/// filing it again.
#[derive(Default)]
struct Dialers {
    by_peer: HashMap<NodeId, Vec<Dialer>>,
    removed: std::collections::HashSet<NodeId>,
}

impl Dialers {
    /// Takes back the filing of dialer `serial` under `peer`.
    fn unfile(&mut self, peer: NodeId, serial: u64) {
        if let Some(filed) = self.by_peer.get_mut(&peer) {
            filed.retain(|dialer| dialer.serial != serial);
            if filed.is_empty() {
                self.by_peer.remove(&peer);
            }
        }
    }
}

/// A queued message and its trace attachment.
pub(crate) type Outgoing<M> = (M, Option<Box<TraceAttachment>>);

/// State shared by the transport handle and its tasks.
struct Shared<M> {
    config: TcpTransportConfig,
    counters: Counters,
    /// Peer id → that peer's queue. Configured ids are here from the start, learned ones from
    /// their first handshake.
    routes: RwLock<HashMap<NodeId, mpsc::Sender<Outgoing<M>>>>,
    inbound: InboundSink<M>,
    /// Where peers whose connections broke are reported (see [`TcpTransport::unreachable_peers`]).
    unreachable: std::sync::Mutex<Option<mpsc::Sender<NodeId>>>,
    /// Per peer, what wakes its dialer from a backoff wait: a peer that dials this node is up.
    redial: std::sync::Mutex<HashMap<NodeId, Arc<tokio::sync::Notify>>>,
    /// The dialers by the peer id they reach, and the ids removed from the group. Locked before
    /// `routes` where both are held.
    dialers: std::sync::Mutex<Dialers>,
    /// Numbers the dialers, so that one can take back its own registration.
    next_dialer: AtomicU64,
    shutdown: CancellationToken,
    tasks: TaskTracker,
    runtime: tokio::runtime::Handle,
}

impl<M> Shared<M> {
    fn routes_read(
        &self,
    ) -> std::sync::RwLockReadGuard<'_, HashMap<NodeId, mpsc::Sender<Outgoing<M>>>> {
        crate::sync::read(&self.routes)
    }

    fn routes_write(
        &self,
    ) -> std::sync::RwLockWriteGuard<'_, HashMap<NodeId, mpsc::Sender<Outgoing<M>>>> {
        crate::sync::write(&self.routes)
    }

    /// What wakes the dialer of `peer` from its backoff wait.
    fn redial_signal(&self, peer: NodeId) -> Arc<tokio::sync::Notify> {
        crate::sync::lock(&self.redial)
            .entry(peer)
            .or_default()
            .clone()
    }

    /// A `host:port` dialer's handshake told it that its peer is `peer` (before: `previous`):
    /// routes `peer`'s messages to the dialer's queue and files the dialer under `peer`, so that
    /// removing `peer` stops it. False, changing nothing, when `peer` was removed from the group
    /// (perhaps while the dialer did not know whom it dialed): the dialer must stop.
    fn learned_peer_id(
        &self,
        previous: Option<NodeId>,
        peer: NodeId,
        dialer: &Dialer,
        queue: &mpsc::Sender<Outgoing<M>>,
    ) -> bool {
        let mut dialers = crate::sync::lock(&self.dialers);
        if dialers.removed.contains(&peer) {
            return false;
        }
        // Under the dialers' lock, so that a removal cannot slip between the check and this.
        let mut routes = self.routes_write();
        if let Some(previous) = previous {
            routes.remove(&previous);
            dialers.unfile(previous, dialer.serial);
        }
        routes.insert(peer, queue.clone());
        dialers
            .by_peer
            .entry(peer)
            .or_default()
            .push(dialer.clone());
        true
    }

    /// A dialer that had learned `peer` stops (its peer now answers as a removed member): its
    /// route and filing go.
    fn forget_learned_peer_id(&self, peer: NodeId, serial: u64) {
        let mut dialers = crate::sync::lock(&self.dialers);
        self.routes_write().remove(&peer);
        dialers.unfile(peer, serial);
    }

    /// `peer` dialed this node and introduced itself: it is up, so a dialer waiting out a
    /// backoff to reach it dials now (a restarted node would otherwise hear nothing from this
    /// one for up to `reconnect_backoff_max`).
    fn peer_introduced(&self, peer: NodeId) {
        if let Some(signal) = crate::sync::lock(&self.redial).get(&peer) {
            signal.notify_one();
        }
    }

    /// Reports `peer` unreachable to whoever listens; dropped when nobody does or the listener
    /// is behind (a hint, not a promise).
    fn report_unreachable(&self, peer: NodeId) {
        bump(&self.counters.unreachable_reports, 1);
        if let Some(listener) = crate::sync::lock(&self.unreachable).as_ref() {
            let _ = listener.try_send(peer);
        }
    }
}

/// Reports of unreachable peers buffered for the listener before more are dropped.
const UNREACHABLE_QUEUE_CAPACITY: usize = 64;

/// A [`Transport`] over TCP. See the module documentation.
pub struct TcpTransport<M> {
    shared: Arc<Shared<M>>,
    local_addr: SocketAddr,
}

impl<M> std::fmt::Debug for TcpTransport<M> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TcpTransport")
            .field("node_id", &self.shared.config.node_id)
            .field("local_addr", &self.local_addr)
            .finish_non_exhaustive()
    }
}

impl<M> TcpTransport<M>
where
    M: Serialize + DeserializeOwned + Send + 'static,
{
    /// Validates the configuration, listens, starts dialing `peers`, and returns the transport
    /// with the channel on which inbound messages arrive as `(sender, message)`.
    pub async fn start(
        config: TcpTransportConfig,
        peers: Vec<PeerAddress>,
    ) -> Result<(Self, mpsc::Receiver<Inbound<M>>), TransportError> {
        let (inbound, inbound_rx) = mpsc::channel(config.inbound_queue_capacity.max(1));
        let transport = Self::start_with(config, peers, InboundSink::Channel(inbound)).await?;
        Ok((transport, inbound_rx))
    }

    /// Like [`TcpTransport::start`], but each inbound message is handed to `deliver` on the task
    /// that read it, in the order its connection delivered it, instead of to a channel: no
    /// hand-off between tasks. `deliver` must not block (it runs on the runtime's thread);
    /// it drops what it cannot take, as a full queue would be dropped by the protocol's retries.
    /// [`TcpTransportConfig::inbound_queue_capacity`] is then unused.
    pub async fn start_delivering(
        config: TcpTransportConfig,
        peers: Vec<PeerAddress>,
        deliver: Deliver<M>,
    ) -> Result<Self, TransportError> {
        Self::start_with(config, peers, InboundSink::Deliver(deliver)).await
    }

    async fn start_with(
        config: TcpTransportConfig,
        peers: Vec<PeerAddress>,
        inbound: InboundSink<M>,
    ) -> Result<Self, TransportError> {
        config.validate()?;
        let runtime =
            tokio::runtime::Handle::try_current().map_err(|_| TransportError::NoRuntime)?;
        let listener = server::listen(&config).map_err(|source| TransportError::Bind {
            address: config.bind_address,
            source,
        })?;
        let local_addr = listener
            .local_addr()
            .map_err(|source| TransportError::Bind {
                address: config.bind_address,
                source,
            })?;
        let shared = Arc::new(Shared {
            config,
            counters: Counters::default(),
            routes: RwLock::new(HashMap::new()),
            inbound,
            unreachable: std::sync::Mutex::new(None),
            redial: std::sync::Mutex::new(HashMap::new()),
            dialers: std::sync::Mutex::new(Dialers::default()),
            next_dialer: AtomicU64::new(0),
            shutdown: CancellationToken::new(),
            tasks: TaskTracker::new(),
            runtime,
        });
        spawn_guarded(&shared, server::accept_loop(shared.clone(), listener));
        let transport = TcpTransport { shared, local_addr };
        for peer in peers {
            transport.add_peer(peer);
        }
        tracing::info!(node = %transport.shared.config.node_id, %local_addr, "transport listening");
        Ok(transport)
    }

    /// Starts dialing another peer. An `id@host:port` peer is reachable by `send` at once
    /// (messages queue until connected); a `host:port` peer once its handshake told its id.
    pub fn add_peer(&self, peer: PeerAddress) {
        let (queue_tx, queue_rx) = mpsc::channel(self.shared.config.peer_queue_capacity);
        let stop = self.shared.shutdown.child_token();
        let dialer = Dialer {
            serial: self.shared.next_dialer.fetch_add(1, Ordering::Relaxed),
            stop: stop.clone(),
        };
        if let Some(id) = peer.node_id {
            let mut dialers = crate::sync::lock(&self.shared.dialers);
            // Added (back) by name: no longer removed.
            dialers.removed.remove(&id);
            self.shared.routes_write().insert(id, queue_tx.clone());
            // This dialer replaces any other that reaches `id`.
            let replaced = dialers.by_peer.insert(id, vec![dialer.clone()]);
            drop(dialers);
            for previous in replaced.into_iter().flatten() {
                previous.stop.cancel();
            }
        }
        let dialer = peer::run(self.shared.clone(), peer, dialer, queue_tx, queue_rx);
        spawn_guarded(&self.shared, async move {
            tokio::select! {
                () = stop.cancelled() => {}
                () = dialer => {}
            }
        });
    }
}

impl<M> TcpTransport<M> {
    /// The address the transport listens on (the real port when the configuration said 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// This node's id.
    pub fn node_id(&self) -> NodeId {
        self.shared.config.node_id
    }

    /// The ids `send` can reach now: configured ones and those learned in handshakes, sorted.
    pub fn known_peers(&self) -> Vec<NodeId> {
        let mut ids: Vec<NodeId> = self.shared.routes_read().keys().copied().collect();
        ids.sort();
        ids
    }

    /// From now on, each peer whose connection breaks or whose redial is refused arrives on the
    /// returned channel (see the module documentation). One listener at a time: a new call
    /// replaces the previous one.
    pub fn unreachable_peers(&self) -> mpsc::Receiver<NodeId> {
        let (sender, receiver) = mpsc::channel(UNREACHABLE_QUEUE_CAPACITY);
        *crate::sync::lock(&self.shared.unreachable) = Some(sender);
        receiver
    }

    /// The counters so far.
    pub fn stats(&self) -> TransportStats {
        let c = &self.shared.counters;
        let get = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        TransportStats {
            messages_queued: get(&c.messages_queued),
            dropped_queue_full: get(&c.dropped_queue_full),
            dropped_unknown_peer: get(&c.dropped_unknown_peer),
            dropped_undelivered: get(&c.dropped_undelivered),
            messages_delivered: get(&c.messages_delivered),
            batches_delivered: get(&c.batches_delivered),
            messages_received: get(&c.messages_received),
            connections_established: get(&c.connections_established),
            dial_failures: get(&c.dial_failures),
            connections_rejected: get(&c.connections_rejected),
            unreachable_reports: get(&c.unreachable_reports),
        }
    }

    /// Stops listening, closes every connection and waits until all tasks have ended, so the
    /// port is free when this returns. Dropping the transport stops it too, without waiting.
    pub async fn shutdown(self) {
        self.shared.shutdown.cancel();
        self.shared.tasks.close();
        self.shared.tasks.wait().await;
    }
}

impl<M> Drop for TcpTransport<M> {
    fn drop(&mut self) {
        self.shared.shutdown.cancel();
        self.shared.tasks.close();
    }
}

impl<M> Transport<M> for TcpTransport<M>
where
    M: Serialize + DeserializeOwned + Send + 'static,
{
    fn send(&self, to: NodeId, message: M) {
        self.enqueue(to, (message, None));
    }

    fn send_traced(&self, to: NodeId, message: M, trace: TraceAttachment) {
        self.enqueue(to, (message, Some(Box::new(trace))));
    }

    fn add_member(&self, id: NodeId, address: &str) {
        if id == self.shared.config.node_id || self.shared.routes_read().contains_key(&id) {
            return;
        }
        let host_port = address.split_once('@').map_or(address, |(_, rest)| rest);
        match host_port.parse::<PeerAddress>() {
            Ok(peer) if peer.node_id.is_none() => {
                tracing::info!(%id, address, "dialing a member added to the group");
                self.add_peer(PeerAddress::with_id(id, peer.host, peer.port));
            }
            _ => tracing::warn!(%id, address, "a member's address does not parse; not dialing it"),
        }
    }

    /// Forgets `id`: messages to it are dropped as to an unknown peer, and the dialers that
    /// reach it stop (closing their connections), so a member removed from the group is not
    /// redialed forever. That covers a peer configured as a bare `host:port` whether or not
    /// its handshake told its id yet: the transport remembers the removal until `id` is added
    /// again, and a dialer whose handshake learns a removed id stops.
    fn remove_member(&self, id: NodeId) {
        let stopped = {
            let mut dialers = crate::sync::lock(&self.shared.dialers);
            dialers.removed.insert(id);
            self.shared.routes_write().remove(&id);
            dialers.by_peer.remove(&id)
        };
        for dialer in stopped.iter().flatten() {
            dialer.stop.cancel();
        }
        if stopped.is_some() {
            tracing::info!(%id, "no longer dialing a member removed from the group");
        }
        // After the dialers stopped, so that none files its wake-up signal again.
        crate::sync::lock(&self.shared.redial).remove(&id);
    }
}

impl<M> TcpTransport<M> {
    fn enqueue(&self, to: NodeId, message: Outgoing<M>) {
        let counters = &self.shared.counters;
        let routes = self.shared.routes_read();
        let Some(queue) = routes.get(&to) else {
            drop(routes);
            bump(&counters.dropped_unknown_peer, 1);
            tracing::trace!(%to, "dropping a message to an unknown peer");
            return;
        };
        match queue.try_send(message) {
            Ok(()) => bump(&counters.messages_queued, 1),
            Err(mpsc::error::TrySendError::Full(_)) => bump(&counters.dropped_queue_full, 1),
            // The peer's task ended (shutdown, or the peer turned out to be this node).
            Err(mpsc::error::TrySendError::Closed(_)) => bump(&counters.dropped_unknown_peer, 1),
        }
    }
}

/// Runs `task` on the transport's runtime until it ends or the transport shuts down.
fn spawn_guarded<M, F>(shared: &Shared<M>, task: F)
where
    F: Future<Output = ()> + Send + 'static,
{
    let shutdown = shared.shutdown.clone();
    shared.tasks.spawn_on(
        async move {
            tokio::select! {
                () = shutdown.cancelled() => {}
                () = task => {}
            }
        },
        &shared.runtime,
    );
}

/// A peer connection: plain TCP, or TLS over it.
type PeerStream = tokio_util::either::Either<TcpStream, tokio_rustls::TlsStream<TcpStream>>;

/// Applies `network` to a connected stream. Buffer sizes are also set before connecting or
/// listening (see [`new_socket`]); setting them again here covers accepted sockets on systems
/// that do not inherit them.
fn configure_stream(stream: &TcpStream, network: &NetworkConfig) -> std::io::Result<()> {
    stream.set_nodelay(network.tcp_nodelay)?;
    let socket = socket2::SockRef::from(stream);
    if network.send_buffer_size > 0 {
        socket.set_send_buffer_size(network.send_buffer_size)?;
    }
    if network.recv_buffer_size > 0 {
        socket.set_recv_buffer_size(network.recv_buffer_size)?;
    }
    Ok(())
}

/// A socket for `address`'s family with the buffer sizes of `network`.
fn new_socket(address: SocketAddr, network: &NetworkConfig) -> std::io::Result<TcpSocket> {
    let socket = if address.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    // The kernel takes an int: validation keeps sizes at or below 1 GiB.
    if network.send_buffer_size > 0 {
        socket.set_send_buffer_size(network.send_buffer_size as u32)?;
    }
    if network.recv_buffer_size > 0 {
        socket.set_recv_buffer_size(network.recv_buffer_size as u32)?;
    }
    Ok(socket)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_configuration_is_valid_and_each_bound_is_checked() {
        let base = TcpTransportConfig::new(NodeId(1), "c", "127.0.0.1:0".parse().unwrap());
        base.validate().unwrap();
        let field_of = |config: TcpTransportConfig| match config.validate() {
            Err(ConfigError::Invalid { field, .. }) => field,
            Err(other) => panic!("validation gave a non-field error: {other}"),
            Ok(()) => "valid",
        };
        type Change = Box<dyn Fn(&mut TcpTransportConfig)>;
        let cases: Vec<(&str, Change)> = vec![
            ("cluster_id", Box::new(|c| c.cluster_id.clear())),
            ("max_frame_bytes", Box::new(|c| c.max_frame_bytes = 100)),
            ("max_frame_bytes", Box::new(|c| c.max_frame_bytes = 2 << 30)),
            (
                "peer_queue_capacity",
                Box::new(|c| c.peer_queue_capacity = 0),
            ),
            (
                "inbound_queue_capacity",
                Box::new(|c| c.inbound_queue_capacity = 0),
            ),
            (
                "max_in_flight_per_peer",
                Box::new(|c| c.max_in_flight_per_peer = 0),
            ),
            (
                "max_inbound_connections",
                Box::new(|c| c.max_inbound_connections = 0),
            ),
            (
                "reconnect_backoff_min",
                Box::new(|c| c.reconnect_backoff_min = Duration::ZERO),
            ),
            (
                "request_timeout",
                Box::new(|c| c.request_timeout = Duration::ZERO),
            ),
            (
                "handshake_timeout",
                Box::new(|c| c.handshake_timeout = Duration::ZERO),
            ),
            (
                "reconnect_backoff_max",
                Box::new(|c| c.reconnect_backoff_max = Duration::from_millis(1)),
            ),
            (
                "send_buffer_size",
                Box::new(|c| c.network.send_buffer_size = 2 << 30),
            ),
            (
                "recv_buffer_size",
                Box::new(|c| c.network.recv_buffer_size = 2 << 30),
            ),
        ];
        for (field, change) in cases {
            let mut config = base.clone();
            change(&mut config);
            assert_eq!(field_of(config), field);
        }
    }

    #[tokio::test]
    async fn network_options_reach_the_sockets() {
        for network in [
            NetworkConfig {
                message_compression: false,
                tcp_nodelay: true,
                send_buffer_size: 256 * 1024,
                recv_buffer_size: 512 * 1024,
            },
            NetworkConfig {
                message_compression: false,
                tcp_nodelay: false,
                send_buffer_size: 64 * 1024,
                recv_buffer_size: 96 * 1024,
            },
        ] {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let address = listener.local_addr().unwrap();
            let socket = new_socket(address, &network).unwrap();
            let stream = socket.connect(address).await.unwrap();
            configure_stream(&stream, &network).unwrap();
            assert_eq!(stream.nodelay().unwrap(), network.tcp_nodelay);
            let socket = socket2::SockRef::from(&stream);
            // Linux doubles the value for bookkeeping; others store it as given. Either way it is
            // at least what was asked and far from the other case's value.
            let send = socket.send_buffer_size().unwrap();
            let recv = socket.recv_buffer_size().unwrap();
            assert!((network.send_buffer_size..=2 * network.send_buffer_size).contains(&send));
            assert!((network.recv_buffer_size..=2 * network.recv_buffer_size).contains(&recv));
        }
    }
}
