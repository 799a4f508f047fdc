//! A minimal HTTP/1.1 client for the node's API, used by the `kv_cluster` example and the
//! node tests: one connection per request (`Connection: close`), bodies with a
//! `Content-Length` (what the node sends). Kept here rather than pulling a full HTTP client
//! into the build.

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
    fn refuses_truncated_or_garbled_responses() {
        assert!(parse(b"HTTP/1.1 200 OK\r\ncontent-length: 9\r\n\r\nabc").is_err());
        assert!(parse(b"HTTP/1.1 200 OK\r\ncontent-length: 1").is_err());
        assert!(parse(b"garbage\r\n\r\n").is_err());
        assert!(parse(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n").is_err());
    }
}
