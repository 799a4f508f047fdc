//! A minimal HTTP/1.1 client for the node's API, used by the `kv_cluster` example and the
//! node tests: one connection per request (`Connection: close`, [`request`]) or one kept alive
//! across a client's requests ([`Connection`]), bodies with a `Content-Length` (what the node
//! sends). Kept here rather than pulling a full HTTP client into the build.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Why a request got no usable answer.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Connecting, writing or reading failed.
    #[error("I/O: {0}")]
    Io(#[from] std::io::Error),
    /// No complete answer within the timeout.
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    /// The answer is not an HTTP/1.1 response this client understands.
    #[error("malformed response: {0}")]
    Malformed(&'static str),
}

/// A response: status and body.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HttpResponse {
    /// The status code.
    pub status: u16,
    /// The body, exactly `Content-Length` bytes.
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
    tokio::time::timeout(timeout, exchange(address, method, path, headers, body))
        .await
        .map_err(|_| ClientError::Timeout(timeout))?
}

async fn exchange(
    address: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Result<HttpResponse, ClientError> {
    let mut stream = TcpStream::connect(address).await?;
    stream.set_nodelay(true)?;
    let extra: String = headers
        .iter()
        .map(|(name, value)| format!("{name}: {value}\r\n"))
        .collect();
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {address}\r\nContent-Length: {}\r\n{extra}\
         Connection: close\r\n\r\n",
        body.len()
    );
    let mut message = head.into_bytes();
    message.extend_from_slice(body);
    // A server may answer (e.g. 413) and close before reading a large body: a failed write is
    // then not the end, the answer may still be there to read.
    let written = stream.write_all(&message).await;
    let mut received = Vec::new();
    let read = stream.read_to_end(&mut received).await;
    if received.is_empty() {
        written?;
        read?;
        return Err(ClientError::Malformed("empty response"));
    }
    parse(&received)
}

/// One client's connection to one node, kept alive across its requests (one at a time): a
/// connection per request cost the `kv_cluster` clients a TCP handshake, an accept and a
/// teardown per operation. Any failure closes it; the next request dials again.
#[derive(Debug)]
pub struct Connection {
    address: SocketAddr,
    stream: Option<TcpStream>,
    received: Vec<u8>,
}

impl Connection {
    /// A connection to `address`, dialed by the first request.
    pub fn new(address: SocketAddr) -> Self {
        Connection {
            address,
            stream: None,
            received: Vec::new(),
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
            self.stream = None;
        }
        result
    }

    async fn exchange(
        &mut self,
        method: &str,
        path: &str,
        body: &[u8],
    ) -> Result<HttpResponse, ClientError> {
        let stream = match &mut self.stream {
            Some(stream) => stream,
            None => {
                let stream = TcpStream::connect(self.address).await?;
                stream.set_nodelay(true)?;
                self.stream.insert(stream)
            }
        };
        let head = format!(
            "{method} {path} HTTP/1.1\r\nHost: {}\r\nContent-Length: {}\r\n\r\n",
            self.address,
            body.len()
        );
        let mut message = head.into_bytes();
        message.extend_from_slice(body);
        stream.write_all(&message).await?;
        self.received.clear();
        // Read until the headers and `Content-Length` bytes of body are in.
        let mut chunk = [0u8; 4096];
        loop {
            if let Some(whole) = complete_length(&self.received)? {
                let response = parse(&self.received[..whole])?;
                let closing = head_says_close(&self.received[..whole]);
                if closing || whole != self.received.len() {
                    self.stream = None; // closing, or more than one answer: start afresh
                }
                return Ok(response);
            }
            let read = stream.read(&mut chunk).await?;
            if read == 0 {
                let closed = std::io::ErrorKind::UnexpectedEof;
                let error = std::io::Error::new(closed, "connection closed before the answer");
                return Err(ClientError::Io(error));
            }
            self.received.extend_from_slice(&chunk[..read]);
        }
    }
}

/// The length of the first complete response in `received` (headers and `Content-Length` bytes
/// of body), or `None` while it is incomplete.
fn complete_length(received: &[u8]) -> Result<Option<usize>, ClientError> {
    let Some(end) = received.windows(4).position(|window| window == b"\r\n\r\n") else {
        return Ok(None);
    };
    let head =
        std::str::from_utf8(&received[..end]).map_err(|_| ClientError::Malformed("headers"))?;
    let mut length = None;
    for line in head.split("\r\n").skip(1) {
        if let Some((name, value)) = line.split_once(':')
            && name.trim().eq_ignore_ascii_case("content-length")
        {
            let value = value.trim().parse::<usize>();
            length = Some(value.map_err(|_| ClientError::Malformed("content-length"))?);
        }
    }
    // Without a length the body would end with the connection: not kept alive.
    let length = length.ok_or(ClientError::Malformed("no content-length"))?;
    let whole = end + 4 + length;
    Ok((received.len() >= whole).then_some(whole))
}

/// True when the response's headers say the server closes the connection after it.
fn head_says_close(response: &[u8]) -> bool {
    let end = response
        .windows(4)
        .position(|window| window == b"\r\n\r\n")
        .unwrap_or(response.len());
    String::from_utf8_lossy(&response[..end])
        .split("\r\n")
        .filter_map(|line| line.split_once(':'))
        .any(|(name, value)| {
            name.trim().eq_ignore_ascii_case("connection")
                && value.trim().eq_ignore_ascii_case("close")
        })
}

/// Parses a complete `Content-Length` response.
fn parse(received: &[u8]) -> Result<HttpResponse, ClientError> {
    let end = received
        .windows(4)
        .position(|window| window == b"\r\n\r\n")
        .ok_or(ClientError::Malformed("no end of headers"))?;
    let head =
        std::str::from_utf8(&received[..end]).map_err(|_| ClientError::Malformed("headers"))?;
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status = status_line
        .split(' ')
        .nth(1)
        .and_then(|code| code.parse::<u16>().ok())
        .ok_or(ClientError::Malformed("status line"))?;
    let mut length = None;
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        let name = name.trim();
        if name.eq_ignore_ascii_case("content-length") {
            length = Some(
                value
                    .trim()
                    .parse::<usize>()
                    .map_err(|_| ClientError::Malformed("content-length"))?,
            );
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            return Err(ClientError::Malformed("transfer-encoding is not supported"));
        }
    }
    let body = &received[end + 4..];
    let body = match length {
        Some(length) if body.len() < length => {
            return Err(ClientError::Malformed("body shorter than content-length"));
        }
        Some(length) => &body[..length],
        None => body,
    };
    Ok(HttpResponse {
        status,
        body: body.to_vec(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_status_and_exact_body() {
        let response =
            parse(b"HTTP/1.1 409 Conflict\r\ncontent-length: 4\r\nx: y\r\n\r\nabcdEXTRA").unwrap();
        assert_eq!(response.status, 409);
        assert_eq!(response.body, b"abcd");
    }

    #[test]
    fn finds_where_a_kept_alive_answer_ends() {
        let answer = b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\n\r\nabcHTTP/1.1";
        assert_eq!(complete_length(&answer[..20]).unwrap(), None);
        assert_eq!(complete_length(&answer[..40]).unwrap(), None);
        assert_eq!(complete_length(answer).unwrap(), Some(41));
        assert!(complete_length(b"HTTP/1.1 200 OK\r\n\r\n").is_err());
        assert!(head_says_close(
            b"HTTP/1.1 503 x\r\nConnection: close\r\n\r\n"
        ));
        assert!(!head_says_close(
            b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n"
        ));
    }

    #[test]
    fn refuses_truncated_or_garbled_responses() {
        assert!(parse(b"HTTP/1.1 200 OK\r\ncontent-length: 9\r\n\r\nabc").is_err());
        assert!(parse(b"HTTP/1.1 200 OK\r\ncontent-length: 1").is_err());
        assert!(parse(b"garbage\r\n\r\n").is_err());
        assert!(parse(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n").is_err());
    }
}
