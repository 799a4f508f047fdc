//! The listening side: accept connections, check the handshake, decode batches in order and hand
//! their messages to the inbound channel.

use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use serde::de::DeserializeOwned;
use tarpc::context::Context;
use tarpc::server::{BaseChannel, Channel};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::codec::LengthDelimitedCodec;
use tokio_util::sync::CancellationToken;

use super::wire::{self, Hello, PROTOCOL_VERSION, PeerService, Refusal};
use super::{PeerStream, Shared, TcpTransportConfig, bump, configure_stream, new_socket, tls};
use crate::telemetry::latency_probe::{self, Hop};
use crate::types::NodeId;

/// Binds the listening socket with the configured buffer sizes (accepted sockets inherit them).
pub(super) fn listen(config: &TcpTransportConfig) -> std::io::Result<TcpListener> {
    let socket = new_socket(config.bind_address, &config.network)?;
    // A node restarted on its port must not wait out the old connections' TIME_WAIT.
    socket.set_reuseaddr(true)?;
    socket.bind(config.bind_address)?;
    socket.listen(1024)
}

/// Accepts connections until the transport shuts down.
pub(super) async fn accept_loop<M>(shared: Arc<Shared<M>>, listener: TcpListener)
where
    M: DeserializeOwned + Send + 'static,
{
    let slots = Arc::new(Semaphore::new(shared.config.max_inbound_connections));
    loop {
        let (stream, remote) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(error) => {
                // Out of file descriptors and the like: pause rather than spin.
                tracing::error!(%error, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            tracing::warn!(%remote, "too many inbound connections; closing this one");
            bump(&shared.counters.connections_rejected, 1);
            continue;
        };
        let connection_shared = shared.clone();
        super::spawn_guarded(&shared, async move {
            serve_connection(connection_shared, stream, remote).await;
            drop(slot);
        });
    }
}

/// Serves one inbound connection: requests are handled one after another, so one peer's batches
/// reach the inbound channel in the order they were sent.
async fn serve_connection<M>(shared: Arc<Shared<M>>, stream: TcpStream, remote: SocketAddr)
where
    M: DeserializeOwned + Send + 'static,
{
    let config = &shared.config;
    if let Err(error) = configure_stream(&stream, &config.network) {
        tracing::warn!(%remote, %error, "cannot set socket options on an inbound connection");
    }
    let Some((stream, certified)) = secure(&shared, stream, remote).await else {
        bump(&shared.counters.connections_rejected, 1);
        return;
    };
    // The frame limit is checked on the length prefix, before the frame is read or decoded.
    let framed = LengthDelimitedCodec::builder()
        .max_frame_length(config.max_frame_bytes)
        .new_framed(stream);
    let transport = tarpc::serde_transport::new(framed, wire::ServerCodec::default());
    let mut requests = BaseChannel::with_defaults(transport).requests();
    let handler = Inbound {
        shared: shared.clone(),
        peer: Arc::new(OnceLock::new()),
        close: CancellationToken::new(),
        remote,
        certified,
    };
    let handshake_deadline = tokio::time::sleep(config.handshake_timeout);
    tokio::pin!(handshake_deadline);
    loop {
        tokio::select! {
            biased;
            // The handler found a malformed batch or refused the peer; it logged why.
            () = handler.close.cancelled() => break,
            () = &mut handshake_deadline, if handler.peer.get().is_none() => {
                tracing::warn!(%remote, "no handshake in time; closing the connection");
                bump(&shared.counters.connections_rejected, 1);
                break;
            }
            next = requests.next() => match next {
                None => {
                    tracing::debug!(%remote, "inbound connection closed by the peer");
                    break;
                }
                Some(Err(error)) => {
                    tracing::error!(
                        %remote,
                        error = %tarpc_error_chain(&error),
                        "closing inbound connection: oversized or malformed frame"
                    );
                    bump(&shared.counters.connections_rejected, 1);
                    break;
                }
                Some(Ok(request)) => {
                    request.execute(handler.clone().serve()).await;
                    // What was delivered is handled before the acknowledgement is written (the
                    // next poll of the channel writes it): on a runtime shared with the driver
                    // the batch's messages reach the protocol first.
                    tokio::task::yield_now().await;
                }
            }
        }
    }
}

/// With TLS configured, completes the TLS handshake (within the handshake timeout) and returns
/// the stream with the id its verified certificate names; `None` (logged) when the peer has no
/// certificate from the cluster CA or the handshake fails. Without TLS, the plain stream.
async fn secure<M>(
    shared: &Shared<M>,
    stream: TcpStream,
    remote: SocketAddr,
) -> Option<(PeerStream, Option<NodeId>)> {
    let config = &shared.config;
    let Some(tls) = &config.tls else {
        return Some((PeerStream::Left(stream), None));
    };
    let acceptor = tokio_rustls::TlsAcceptor::from(tls.server_config());
    let accepted = tokio::time::timeout(config.handshake_timeout, acceptor.accept(stream)).await;
    let stream = match accepted {
        Ok(Ok(stream)) => stream,
        Ok(Err(error)) => {
            tracing::warn!(%remote, %error, "TLS handshake refused; closing the connection");
            return None;
        }
        Err(_) => {
            tracing::warn!(%remote, "no TLS handshake in time; closing the connection");
            return None;
        }
    };
    let certified = tls::certified_peer(stream.get_ref().1);
    let Some(certified) = certified else {
        // The verifier requires a certificate; this is a certificate without a node name.
        tracing::warn!(%remote, "the peer's certificate names no node; closing the connection");
        return None;
    };
    Some((PeerStream::Right(stream.into()), Some(certified)))
}

/// tarpc wraps the codec's error; the cause (e.g. "frame size too big") is in its sources. Some
/// causes display as nothing, so those are shown in their debug form.
fn tarpc_error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let shown = cause.to_string();
        text.push_str(": ");
        if shown.is_empty() {
            text.push_str(&format!("{cause:?}"));
        } else {
            text.push_str(&shown);
        }
        source = cause.source();
    }
    text
}

/// The per-connection RPC handler.
struct Inbound<M> {
    shared: Arc<Shared<M>>,
    /// The caller's id, set by its hello.
    peer: Arc<OnceLock<NodeId>>,
    /// Cancelled to close the connection.
    close: CancellationToken,
    remote: SocketAddr,
    /// The id the caller's TLS certificate names (with TLS): its hello must claim that one.
    certified: Option<NodeId>,
}

impl<M> Clone for Inbound<M> {
    fn clone(&self) -> Self {
        Inbound {
            shared: self.shared.clone(),
            peer: self.peer.clone(),
            close: self.close.clone(),
            remote: self.remote,
            certified: self.certified,
        }
    }
}

impl<M> Inbound<M> {
    fn check_hello(&self, hello: &Hello) -> Result<(), Refusal> {
        let config = &self.shared.config;
        if hello.protocol_version != PROTOCOL_VERSION {
            return Err(Refusal::ProtocolVersion {
                expected: PROTOCOL_VERSION,
                got: hello.protocol_version,
            });
        }
        if hello.cluster_id != config.cluster_id {
            return Err(Refusal::WrongCluster {
                expected: config.cluster_id.clone(),
                got: hello.cluster_id.clone(),
            });
        }
        if hello.node_id == config.node_id {
            return Err(Refusal::SameNodeId(hello.node_id));
        }
        if let Some(certified) = self.certified
            && certified != hello.node_id
        {
            return Err(Refusal::NotCertified {
                certified,
                claimed: hello.node_id,
            });
        }
        let introduced = *self.peer.get_or_init(|| hello.node_id);
        if introduced != hello.node_id {
            return Err(Refusal::AlreadyIntroduced(introduced));
        }
        Ok(())
    }
}

impl<M> PeerService for Inbound<M>
where
    M: DeserializeOwned + Send + 'static,
{
    async fn hello(self, _: Context, hello: Hello) -> Result<Hello, Refusal> {
        if let Err(refusal) = self.check_hello(&hello) {
            // The answer tells the dialer why; the connection closes at the handshake deadline
            // unless the dialer closes it first.
            tracing::warn!(remote = %self.remote, %refusal, "refusing a peer's handshake");
            bump(&self.shared.counters.connections_rejected, 1);
            return Err(refusal);
        }
        self.shared.peer_introduced(hello.node_id);
        let config = &self.shared.config;
        Ok(Hello {
            protocol_version: PROTOCOL_VERSION,
            cluster_id: config.cluster_id.clone(),
            node_id: config.node_id,
        })
    }

    async fn deliver(self, _: Context, payload: Bytes) -> Result<(), Refusal> {
        latency_probe::stamp(Hop::BatchArrived, self.shared.config.node_id);
        let Some(&from) = self.peer.get() else {
            tracing::error!(remote = %self.remote, "delivery before handshake; closing the connection");
            bump(&self.shared.counters.connections_rejected, 1);
            self.close.cancel();
            return Err(Refusal::NotIntroduced);
        };
        let messages = match wire::open_payload::<M>(&payload, self.shared.config.max_frame_bytes) {
            Ok(messages) => messages,
            Err(error) => {
                tracing::error!(
                    remote = %self.remote, %from, %error,
                    "closing inbound connection: malformed batch"
                );
                bump(&self.shared.counters.connections_rejected, 1);
                self.close.cancel();
                return Err(Refusal::MalformedBatch(error.to_string()));
            }
        };
        for (message, trace) in messages {
            // Waiting here when the receiver lags stops reading this socket: backpressure.
            let inbound = super::Inbound {
                from,
                message,
                trace,
            };
            if !self.shared.inbound.deliver(inbound).await {
                // The receiver is gone: the node is shutting down.
                return Ok(());
            }
            bump(&self.shared.counters.messages_received, 1);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use tarpc::client::RpcError;
    use tokio::net::TcpStream;

    use super::super::wire::{PeerServiceClient, encode_message, seal_payload};
    use super::super::{TcpTransport, TcpTransportConfig};
    use super::*;

    async fn raw_client(address: SocketAddr) -> PeerServiceClient {
        let stream = TcpStream::connect(address).await.unwrap();
        let framed = LengthDelimitedCodec::builder().new_framed(stream);
        let transport = tarpc::serde_transport::new(framed, wire::ServerCodec::default());
        PeerServiceClient::new(tarpc::client::Config::default(), transport).spawn()
    }

    fn context() -> Context {
        let mut context = tarpc::context::current();
        context.deadline = Instant::now() + Duration::from_secs(5);
        context
    }

    fn hello(cluster: &str, id: u64) -> Hello {
        Hello {
            protocol_version: PROTOCOL_VERSION,
            cluster_id: cluster.into(),
            node_id: NodeId(id),
        }
    }

    /// Calls that are well-formed frames but break the protocol: each is refused, and the
    /// connection closes where the module documentation says so.
    #[tokio::test]
    async fn protocol_violations_inside_good_frames_are_refused() {
        let config = TcpTransportConfig::new(NodeId(1), "c", "127.0.0.1:0".parse().unwrap());
        let (server, mut inbound) = TcpTransport::<String>::start(config, vec![]).await.unwrap();
        let address = server.local_addr();
        let good = seal_payload(encode_message(&"hi".to_owned()).unwrap(), false);

        // A delivery before the hello closes the connection.
        let client = raw_client(address).await;
        let refused = client.deliver(context(), good.clone()).await;
        assert!(
            matches!(refused, Ok(Err(Refusal::NotIntroduced)) | Err(_)),
            "{refused:?}"
        );
        let after = client.hello(context(), hello("c", 5)).await;
        assert!(
            matches!(
                after,
                Err(RpcError::Shutdown | RpcError::Channel(_) | RpcError::Send(_))
            ),
            "{after:?}"
        );

        // Wrong cluster, own id: refused with the reason.
        let client = raw_client(address).await;
        let wrong = client.hello(context(), hello("other", 5)).await.unwrap();
        assert!(
            matches!(wrong, Err(Refusal::WrongCluster { .. })),
            "{wrong:?}"
        );
        let client = raw_client(address).await;
        let itself = client.hello(context(), hello("c", 1)).await.unwrap();
        assert_eq!(itself, Err(Refusal::SameNodeId(NodeId(1))));

        // Introduced: a good batch arrives tagged with the hello's id; a second hello with another
        // id is refused; a malformed batch closes the connection.
        let client = raw_client(address).await;
        let answer = client
            .hello(context(), hello("c", 5))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(answer.node_id, NodeId(1));
        client.deliver(context(), good).await.unwrap().unwrap();
        let received = inbound.recv().await.map(|got| (got.from, got.message));
        assert_eq!(received, Some((NodeId(5), "hi".to_owned())));
        let again = client.hello(context(), hello("c", 6)).await.unwrap();
        assert_eq!(again, Err(Refusal::AlreadyIntroduced(NodeId(5))));
        let malformed = client
            .deliver(context(), Bytes::from_static(&[9, 9, 9]))
            .await;
        assert!(
            matches!(malformed, Ok(Err(Refusal::MalformedBatch(_))) | Err(_)),
            "{malformed:?}"
        );
        let after = client.hello(context(), hello("c", 5)).await;
        assert!(after.is_err(), "the connection is closed: {after:?}");
        assert!(
            server.stats().connections_rejected >= 4,
            "{:?}",
            server.stats()
        );
        server.shutdown().await;
    }
}
