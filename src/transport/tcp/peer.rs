//! The task that owns one outbound peer: dial, handshake, send batches, redial with backoff.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use futures::stream::FuturesUnordered;
use serde::Serialize;
use std::future::Future;
use std::pin::Pin;
use tarpc::client::RpcError;
use tokio::sync::mpsc;
use tokio_util::codec::LengthDelimitedCodec;

use super::wire::{
    self, FRAME_OVERHEAD, Hello, PROTOCOL_VERSION, PeerServiceClient, Pushed, Refusal,
};
use super::{
    Dialer, Outgoing, PeerAddress, PeerStream, Shared, bump, configure_stream, new_socket, tls,
};
use crate::telemetry::latency_probe::{self, Hop};
use crate::types::NodeId;

/// Exponential backoff with jitter, so that nodes restarted together do not redial in lockstep.
struct Backoff {
    min: Duration,
    max: Duration,
    next: Duration,
}

impl Backoff {
    fn new(min: Duration, max: Duration) -> Self {
        Backoff {
            min,
            max,
            next: min,
        }
    }

    fn reset(&mut self) {
        self.next = self.min;
    }

    /// The wait before the next attempt: the current step plus up to a quarter more.
    fn next_wait(&mut self) -> Duration {
        let step = self.next;
        self.next = (self.next * 2).min(self.max);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        step + step.mul_f64(f64::from(nanos % 1000) / 4000.0)
    }
}

/// tarpc's client half of a connection: writes requests, reads responses. It runs inside the
/// peer's task rather than as a task of its own, which saves a task wake-up per batch and per
/// acknowledgement; it ends when the connection breaks, and dropping it closes the socket.
type Dispatch = Pin<Box<dyn Future<Output = ()> + Send>>;

/// A dialed connection that completed the handshake.
struct Connection {
    client: PeerServiceClient,
    peer_id: NodeId,
    dispatch: Dispatch,
}

#[derive(Debug, thiserror::Error)]
enum DialError {
    #[error("cannot resolve: {0}")]
    Resolve(std::io::Error),
    #[error("resolves to no address")]
    NoAddress,
    #[error("cannot connect: {0}")]
    Connect(std::io::Error),
    #[error("timed out")]
    Timeout,
    #[error("connection closed during the handshake")]
    Closed,
    #[error("handshake failed: {0}")]
    Rpc(#[from] RpcError),
    #[error("refused: {0}")]
    Refused(#[from] Refusal),
    #[error("answered as {got}, but is configured as {expected}")]
    WrongId { expected: NodeId, got: NodeId },
    #[error("is this node itself")]
    Itself,
    #[error("TLS handshake failed: {0}")]
    Tls(std::io::Error),
    #[error("its certificate names no node")]
    NoCertifiedName,
    #[error("its certificate names {certified}, but it answered as {claimed}")]
    NotCertified { certified: NodeId, claimed: NodeId },
}

/// Runs the peer until the transport shuts down (the caller drops this future then).
pub(super) async fn run<M>(
    shared: Arc<Shared<M>>,
    address: PeerAddress,
    dialer: Dialer,
    queue_tx: mpsc::Sender<Outgoing<M>>,
    mut queue: mpsc::Receiver<Outgoing<M>>,
) where
    M: Serialize + Send + 'static,
{
    let config = &shared.config;
    let mut backoff = Backoff::new(config.reconnect_backoff_min, config.reconnect_backoff_max);
    let mut learned_id = address.node_id;
    let mut failures_in_a_row = 0u32;
    // A message taken off the queue that did not fit in the previous batch.
    let mut carry: Option<Outgoing<M>> = None;
    loop {
        let connection = match tokio::time::timeout(
            config.handshake_timeout,
            dial(&shared, &address),
        )
        .await
        .unwrap_or(Err(DialError::Timeout))
        {
            Ok(connection) => connection,
            Err(DialError::Itself) => {
                tracing::error!(peer = %address, "peer address points at this node; not dialing it");
                if let Some(id) = learned_id.filter(|_| address.node_id.is_none()) {
                    shared.routes_write().remove(&id);
                }
                return;
            }
            Err(error) => {
                bump(&shared.counters.dial_failures, 1);
                failures_in_a_row += 1;
                if let Some(id) = learned_id.filter(|_| error.says_nothing_listens()) {
                    shared.report_unreachable(id);
                }
                // The first failure of a streak is news; the rest are the same news.
                if failures_in_a_row == 1 {
                    tracing::warn!(peer = %address, %error, "cannot reach peer; will redial");
                } else {
                    tracing::debug!(peer = %address, %error, failures_in_a_row, "redial failed");
                }
                wait_to_redial(&shared, learned_id, &mut backoff).await;
                continue;
            }
        };
        failures_in_a_row = 0;
        backoff.reset();
        bump(&shared.counters.connections_established, 1);
        // Only a `host:port` peer learns its id; a peer given with one answers as it or is
        // refused.
        if learned_id != Some(connection.peer_id) {
            if !shared.learned_peer_id(learned_id, connection.peer_id, &dialer, &queue_tx) {
                tracing::info!(peer = %address, id = %connection.peer_id,
                    "the peer at this address was removed from the group; not dialing it");
                if let Some(old) = learned_id {
                    shared.forget_learned_peer_id(old, dialer.serial);
                }
                return;
            }
            learned_id = Some(connection.peer_id);
        }
        let peer_id = connection.peer_id;
        tracing::debug!(peer = %address, id = %peer_id, "connected");
        if send_batches(&shared, connection, &mut queue, &mut carry).await == Ended::Broken {
            shared.report_unreachable(peer_id);
        }
        tracing::debug!(peer = %address, id = %peer_id, "connection lost; redialing");
        wait_to_redial(&shared, learned_id, &mut backoff).await;
    }
}

/// Waits out the backoff before the next dial, or less: until the peer, once known, dials
/// this node (then the backoff starts over).
async fn wait_to_redial<M>(shared: &Shared<M>, peer: Option<NodeId>, backoff: &mut Backoff) {
    let wait = tokio::time::sleep(backoff.next_wait());
    let Some(peer) = peer else {
        return wait.await;
    };
    let signal = shared.redial_signal(peer);
    tokio::select! {
        () = wait => {}
        () = signal.notified() => backoff.reset(),
    }
}

/// Resolves, connects, sets the socket options, starts tarpc's dispatch and shakes hands.
async fn dial<M>(shared: &Arc<Shared<M>>, address: &PeerAddress) -> Result<Connection, DialError> {
    let config = &shared.config;
    let mut last_error = DialError::NoAddress;
    let candidates = tokio::net::lookup_host((address.host.as_str(), address.port))
        .await
        .map_err(DialError::Resolve)?;
    let mut stream = None;
    for candidate in candidates {
        let attempt = async {
            let socket = new_socket(candidate, &config.network)?;
            socket.connect(candidate).await
        };
        match attempt.await {
            Ok(connected) => {
                stream = Some(connected);
                break;
            }
            Err(e) => last_error = DialError::Connect(e),
        }
    }
    let stream = stream.ok_or(last_error)?;
    configure_stream(&stream, &config.network).map_err(DialError::Connect)?;
    let (stream, certified) = match &config.tls {
        None => (PeerStream::Left(stream), None),
        Some(tls) => {
            let connector = tokio_rustls::TlsConnector::from(tls.client_config());
            let stream = connector
                .connect(tls::PeerTls::server_name(), stream)
                .await
                .map_err(DialError::Tls)?;
            let certified =
                tls::certified_peer(stream.get_ref().1).ok_or(DialError::NoCertifiedName)?;
            (PeerStream::Right(stream.into()), Some(certified))
        }
    };
    let framed = LengthDelimitedCodec::builder()
        .max_frame_length(config.max_frame_bytes)
        .new_framed(stream);
    let transport = tarpc::serde_transport::new(framed, wire::Codec::default());
    let client_config = {
        let mut c = tarpc::client::Config::default();
        // Our own window bounds what is in flight; tarpc's must not be the tighter one.
        c.max_in_flight_requests = config.max_in_flight_per_peer + 1;
        c.pending_request_buffer = config.max_in_flight_per_peer + 1;
        c
    };
    let new_client = PeerServiceClient::new(client_config, transport);
    let peer = address.to_string();
    let dispatch = new_client.dispatch;
    let mut dispatch: Dispatch = Box::pin(async move {
        if let Err(error) = dispatch.await {
            tracing::debug!(%peer, %error, "outbound connection ended");
        }
    });
    let client = new_client.client;
    let hello = Hello {
        protocol_version: PROTOCOL_VERSION,
        cluster_id: config.cluster_id.clone(),
        node_id: config.node_id,
    };
    let reply = tokio::select! {
        reply = client.hello(deadline_in(config.handshake_timeout), hello) => reply??,
        () = &mut dispatch => return Err(DialError::Closed),
    };
    if reply.protocol_version != PROTOCOL_VERSION {
        return Err(Refusal::ProtocolVersion {
            expected: PROTOCOL_VERSION,
            got: reply.protocol_version,
        }
        .into());
    }
    if reply.cluster_id != config.cluster_id {
        return Err(Refusal::WrongCluster {
            expected: config.cluster_id.clone(),
            got: reply.cluster_id,
        }
        .into());
    }
    if reply.node_id == config.node_id {
        return Err(DialError::Itself);
    }
    if let Some(certified) = certified
        && certified != reply.node_id
    {
        return Err(DialError::NotCertified {
            certified,
            claimed: reply.node_id,
        });
    }
    if let Some(expected) = address.node_id
        && expected != reply.node_id
    {
        return Err(DialError::WrongId {
            expected,
            got: reply.node_id,
        });
    }
    Ok(Connection {
        client,
        peer_id: reply.node_id,
        dispatch,
    })
}

impl DialError {
    /// True when the peer's host answered that nothing listens on the port (or cut the
    /// connection during the handshake): what a killed or stopped node looks like, as opposed
    /// to a timeout, which a slow or partitioned one gives too.
    fn says_nothing_listens(&self) -> bool {
        use std::io::ErrorKind;
        match self {
            DialError::Connect(error) => matches!(
                error.kind(),
                ErrorKind::ConnectionRefused
                    | ErrorKind::ConnectionReset
                    | ErrorKind::ConnectionAborted
            ),
            DialError::Closed => true,
            _ => false,
        }
    }
}

/// A batch takes no more messages once it holds this many bytes (or the frame is full). Small
/// messages still go by the thousand; large ones (snapshot chunks, big appends) go one or two
/// to a frame, whose buffers the allocator then reuses, instead of 16 MiB frames that were
/// fresh memory each time (a 1 GiB snapshot transfer: 4.7-5.2 s with whole frames, 4.1-4.2 s
/// with this).
const BATCH_TARGET_BYTES: usize = 1 << 20;

/// Why [`send_batches`] returned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Ended {
    /// The connection closed or failed under us: the peer may be gone.
    Broken,
    /// The peer refused a batch; we hung up to redial.
    Refused,
    /// The queue closed: the transport is shutting down.
    QueueClosed,
}

fn deadline_in(timeout: Duration) -> tarpc::context::Context {
    let mut context = tarpc::context::current();
    context.deadline = Instant::now() + timeout;
    context
}

/// Sends batches until the connection breaks. Several batches may be in flight; each takes
/// everything queued that fits in a frame.
async fn send_batches<M>(
    shared: &Arc<Shared<M>>,
    connection: Connection,
    queue: &mut mpsc::Receiver<Outgoing<M>>,
    carry: &mut Option<Outgoing<M>>,
) -> Ended
where
    M: Serialize,
{
    let config = &shared.config;
    let counters = &shared.counters;
    let max_body = config.max_frame_bytes - FRAME_OVERHEAD;
    let Connection {
        client,
        peer_id,
        mut dispatch,
    } = connection;
    let mut in_flight = FuturesUnordered::new();
    // Messages in batches sent but not yet acknowledged; lost if the connection breaks.
    let mut unacknowledged = 0u64;
    let ended = loop {
        let window_open = in_flight.len() < config.max_in_flight_per_peer;
        tokio::select! {
            // In this order: a batch pushed in the previous round is first polled (handed to the
            // dispatch) and then written by the dispatch in the same round.
            biased;
            Some((count, result)) = in_flight.next(), if !in_flight.is_empty() => {
                unacknowledged -= count;
                match result {
                    Ok(Ok(())) => {
                        bump(&counters.messages_delivered, count);
                        bump(&counters.batches_delivered, 1);
                    }
                    Ok(Err(refusal)) => {
                        bump(&counters.dropped_undelivered, count);
                        tracing::error!(peer = %peer_id, %refusal, "peer refused a batch; reconnecting");
                        break Ended::Refused;
                    }
                    Err(RpcError::DeadlineExceeded) => {
                        // The peer is slow, not gone: keep the connection.
                        bump(&counters.dropped_undelivered, count);
                        tracing::debug!(peer = %peer_id, "batch delivery timed out");
                    }
                    Err(error) => {
                        bump(&counters.dropped_undelivered, count);
                        tracing::debug!(peer = %peer_id, %error, "batch delivery failed");
                        break Ended::Broken;
                    }
                }
            }
            () = &mut dispatch => break Ended::Broken,
            first = next_message(queue, carry), if window_open => {
                let Some(first) = first else { break Ended::QueueClosed };
                let mut batch = wire::PayloadBuilder::new();
                let mut count = 0u64;
                // The first, then whatever else is queued, up to the batch target.
                let mut next = Some(first);
                while batch.body_len() < BATCH_TARGET_BYTES
                    && let Some(message) = next.take().or_else(|| queue.try_recv().ok())
                {
                    match push_or_drop(&mut batch, &message, max_body, counters) {
                        Pushed::Added => count += 1,
                        Pushed::Full => {
                            *carry = Some(message);
                            break;
                        }
                        Pushed::TooLarge { .. } => {}
                    }
                }
                if count == 0 {
                    continue; // every message taken was dropped
                }
                latency_probe::stamp(Hop::BatchTaken, config.node_id);
                let payload = batch.seal(config.network.message_compression);
                let call = client.deliver(deadline_in(config.request_timeout), payload);
                in_flight.push(async move { (count, call.await) });
                unacknowledged += count;
            }
        }
    };
    bump(&counters.dropped_undelivered, unacknowledged);
    ended
}

/// The next message to send: the carried-over one or the next from the queue. `None` when the
/// queue is closed (the transport is shutting down).
async fn next_message<M>(
    queue: &mut mpsc::Receiver<Outgoing<M>>,
    carry: &mut Option<Outgoing<M>>,
) -> Option<Outgoing<M>> {
    match carry.take() {
        Some(message) => Some(message),
        None => queue.recv().await,
    }
}

/// Encodes a message into `batch`, or counts and logs it as dropped when it cannot be encoded
/// or would not fit in `max_body` bytes on its own (reported as `TooLarge`). `Full`: it does
/// not fit beside what the batch holds, and belongs in the next one.
fn push_or_drop<M: Serialize>(
    batch: &mut wire::PayloadBuilder,
    (message, trace): &Outgoing<M>,
    max_body: usize,
    counters: &super::Counters,
) -> Pushed {
    match batch.push(message, trace.as_deref(), max_body) {
        Ok(Pushed::TooLarge { bytes }) => {
            bump(&counters.dropped_undelivered, 1);
            tracing::error!(bytes, max_body, "message larger than a frame; dropped");
            Pushed::TooLarge { bytes }
        }
        Ok(pushed) => pushed,
        Err(error) => {
            bump(&counters.dropped_undelivered, 1);
            tracing::error!(%error, "message does not serialize; dropped");
            Pushed::TooLarge { bytes: 0 }
        }
    }
}
