//! An HTTP/1.1 client for the node's API, used by the `kv_cluster` example, the node tests and
//! `consensus-node --join`: hyper's client connection (`hyper::client::conn::http1`) on a TCP
//! stream, one request at a time. [`request`] opens a connection per request
//! (`Connection: close`); a [`Connection`] keeps one alive across a client's requests;
//! [`request_over`] also speaks HTTPS to a node that serves its API with its certificate.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::{self, SendRequest};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

/// Why a request got no usable answer.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Connecting failed (a refused dial means nothing was sent), or the connection broke.
    #[error("I/O: {0}")]
    Io(#[from] std::io::Error),
    /// No complete answer within the timeout.
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    /// The request could not be built (a method, path or header that is not valid HTTP).
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    /// The exchange failed at the HTTP level: a malformed or truncated answer, or the
    /// connection closed before the answer.
    #[error("HTTP: {0}")]
    Http(String),
}

impl From<hyper::Error> for ClientError {
    fn from(error: hyper::Error) -> Self {
        ClientError::Http(error_chain(&error))
    }
}

/// hyper's error with its causes (e.g. "connection closed before message completed").
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// A response: status and body.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HttpResponse {
    /// The status code.
    pub status: u16,
    /// The body, whole.
    pub body: Vec<u8>,
}

impl HttpResponse {
    /// The body as text (lossy), for messages and JSON.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// Sends `method path` with `body` to `address` and reads the whole response, all within
/// `timeout`.
pub async fn request(
    address: SocketAddr,
    method: &str,
    path: &str,
    body: &[u8],
    timeout: Duration,
) -> Result<HttpResponse, ClientError> {
    request_with_headers(address, method, path, &[], body, timeout).await
}

/// [`request`] with extra `(name, value)` headers (e.g. a client's signature pair).
pub async fn request_with_headers(
    address: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
    timeout: Duration,
) -> Result<HttpResponse, ClientError> {
    request_over(None, address, method, path, headers, body, timeout).await
}

/// How a client checks a node's HTTPS certificate: as the node's peers check it (TLS 1.3, the
/// chain must lead to the cluster's CA; see [`crate::transport::tcp::tls`]), since the API is
/// served with the node's own certificate.
#[derive(Clone)]
pub struct Https {
    connector: tokio_rustls::TlsConnector,
}

impl Https {
    /// Trusts what `tls` (a node's own TLS material) trusts: certificates of its cluster's CA.
    pub fn as_peer(tls: &crate::transport::tcp::tls::PeerTls) -> Self {
        Https {
            connector: tokio_rustls::TlsConnector::from(tls.client_config()),
        }
    }
}

impl std::fmt::Debug for Https {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Https(the cluster's CA)")
    }
}

/// [`request_with_headers`] over HTTPS when `https` is given (checked as [`Https`] says; a
/// certificate it does not trust is [`ClientError::Io`]), plain HTTP otherwise.
pub async fn request_over(
    https: Option<&Https>,
    address: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
    timeout: Duration,
) -> Result<HttpResponse, ClientError> {
    let exchange = async {
        let mut sender = connect(address, https).await?;
        let mut headers = headers.to_vec();
        headers.push(("connection", "close"));
        send(&mut sender, address, method, path, &headers, body).await
    };
    tokio::time::timeout(timeout, exchange)
        .await
        .map_err(|_| ClientError::Timeout(timeout))?
}

/// Dials `address` (then TLS, with the node's certificate checked as `https` says, when given)
/// and starts hyper's connection task, which ends when the connection closes.
async fn connect(
    address: SocketAddr,
    https: Option<&Https>,
) -> Result<SendRequest<Full<Bytes>>, ClientError> {
    let stream = TcpStream::connect(address).await?;
    stream.set_nodelay(true)?;
    match https {
        None => start_connection(address, stream).await,
        Some(https) => {
            let name = crate::transport::tcp::tls::PeerTls::server_name();
            start_connection(address, https.connector.connect(name, stream).await?).await
        }
    }
}

/// hyper's handshake on `io` and its connection task.
async fn start_connection<I>(
    address: SocketAddr,
    io: I,
) -> Result<SendRequest<Full<Bytes>>, ClientError>
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (sender, connection) = http1::handshake(TokioIo::new(io)).await?;
    tokio::spawn(async move {
        if let Err(error) = connection.await {
            tracing::debug!(%address, %error, "HTTP client connection ended");
        }
    });
    Ok(sender)
}

/// One request on `sender`, and its whole response.
async fn send(
    sender: &mut SendRequest<Full<Bytes>>,
    address: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Result<HttpResponse, ClientError> {
    let mut builder = hyper::Request::builder()
        .method(method)
        .uri(path)
        .header(hyper::header::HOST, address.to_string());
    for (name, value) in headers {
        builder = builder.header(*name, *value);
    }
    let request = builder
        .body(Full::new(Bytes::copy_from_slice(body)))
        .map_err(|error| ClientError::InvalidRequest(error.to_string()))?;
    sender.ready().await?;
    let response = sender.send_request(request).await?;
    let status = response.status().as_u16();
    let body = response.into_body().collect().await?.to_bytes().to_vec();
    Ok(HttpResponse { status, body })
}

/// One client's connection to one node, kept alive across its requests (one at a time): a
/// connection per request cost the `kv_cluster` clients a TCP handshake, an accept and a
/// teardown per operation. Any failure, or an answer that closes the connection, drops it; the
/// next request dials again.
#[derive(Debug)]
pub struct Connection {
    address: SocketAddr,
    sender: Option<SendRequest<Full<Bytes>>>,
}

impl Connection {
    /// A connection to `address`, dialed by the first request.
    pub fn new(address: SocketAddr) -> Self {
        Connection {
            address,
            sender: None,
        }
    }

    /// The node this connection goes to.
    pub fn address(&self) -> SocketAddr {
        self.address
    }

    /// Sends `method path` with `body` and reads its response, all within `timeout`. A refused
    /// dial is [`ClientError::Io`] with [`std::io::ErrorKind::ConnectionRefused`], as with
    /// [`request`]: nothing was sent. Any other failure leaves the outcome unknown.
    pub async fn request(
        &mut self,
        method: &str,
        path: &str,
        body: &[u8],
        timeout: Duration,
    ) -> Result<HttpResponse, ClientError> {
        let result = tokio::time::timeout(timeout, self.exchange(method, path, body))
            .await
            .map_err(|_| ClientError::Timeout(timeout))
            .and_then(|result| result);
        if result.is_err() {
            self.sender = None;
        }
        result
    }

    async fn exchange(
        &mut self,
        method: &str,
        path: &str,
        body: &[u8],
    ) -> Result<HttpResponse, ClientError> {
        // A connection the server closed (`Connection: close`, an idle timeout) is redialed.
        if self.sender.as_ref().is_none_or(|sender| sender.is_closed()) {
            self.sender = Some(connect(self.address, None).await?);
        }
        let sender = self.sender.as_mut().expect("set just above");
        send(sender, self.address, method, path, &[], body).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A server that answers each connection's requests with `answers` in turn, raw.
    async fn raw_server(answers: Vec<&'static [u8]>) -> SocketAddr {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                let answers = answers.clone();
                tokio::spawn(async move {
                    let mut buffer = [0u8; 4096];
                    for answer in answers {
                        if stream.read(&mut buffer).await.unwrap_or(0) == 0 {
                            return;
                        }
                        let _ = stream.write_all(answer).await;
                    }
                });
            }
        });
        address
    }

    #[tokio::test]
    async fn reads_status_and_exact_body_and_keeps_the_connection() {
        let address = raw_server(vec![
            b"HTTP/1.1 409 Conflict\r\ncontent-length: 4\r\nx: y\r\n\r\nabcd",
            b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok",
        ])
        .await;
        let mut connection = Connection::new(address);
        let first = connection
            .request("PUT", "/kv/a", b"v", Duration::from_secs(5))
            .await
            .unwrap();
        assert_eq!((first.status, first.body.as_slice()), (409, &b"abcd"[..]));
        // The second answer only exists on the same connection.
        let second = connection
            .request("GET", "/kv/a", b"", Duration::from_secs(5))
            .await
            .unwrap();
        assert_eq!((second.status, second.text().as_str()), (200, "ok"));
    }

    #[tokio::test]
    async fn truncated_or_garbled_answers_and_refused_dials_are_typed_errors() {
        for answer in [
            &b"HTTP/1.1 200 OK\r\ncontent-length: 9\r\n\r\nabc"[..],
            b"garbage\r\n\r\n",
            b"",
        ] {
            let address = raw_server(vec![answer]).await;
            let error = request(address, "GET", "/", b"", Duration::from_secs(5))
                .await
                .unwrap_err();
            assert!(matches!(error, ClientError::Http(_)), "{answer:?}: {error}");
        }
        let closed = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = closed.local_addr().unwrap();
        drop(closed);
        let refused = request(address, "GET", "/", b"", Duration::from_secs(5)).await;
        assert!(
            matches!(&refused, Err(ClientError::Io(e)) if e.kind() == std::io::ErrorKind::ConnectionRefused),
            "{refused:?}"
        );
        let bad = request(
            address,
            "GET",
            "no spaces allowed",
            b"",
            Duration::from_secs(5),
        )
        .await;
        assert!(bad.is_err());
    }
}
