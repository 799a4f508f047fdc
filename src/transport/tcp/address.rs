//! Peer addresses as configured: `host:port` (the node id is learned in the handshake, as for
//! the seed's `bootstrap_peers`) or `id@host:port` (the id is known and checked in the handshake).

use std::fmt;
use std::net::Ipv6Addr;
use std::str::FromStr;

use crate::types::NodeId;

/// Where a peer listens, and its node id when the configuration says it.
///
/// The host is a DNS name or an IP address (IPv6 in brackets: `[::1]:7000`); it is resolved at
/// each connection attempt, so a peer that moves to another address under the same name is found
/// again. The id is a decimal `u64`, optionally written as [`NodeId`]'s display form (`n7`).
///
/// ```
/// use consensus::transport::tcp::PeerAddress;
/// use consensus::NodeId;
///
/// let peer: PeerAddress = "7@node-002:7000".parse().unwrap();
/// assert_eq!(peer.node_id, Some(NodeId(7)));
/// assert_eq!((peer.host.as_str(), peer.port), ("node-002", 7000));
/// let bare: PeerAddress = "[::1]:7000".parse().unwrap();
/// assert_eq!((bare.node_id, bare.host.as_str()), (None, "::1"));
/// ```
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct PeerAddress {
    /// The peer's id, if configured; otherwise learned in the handshake.
    pub node_id: Option<NodeId>,
    /// Host name or IP address (IPv6 without brackets).
    pub host: String,
    /// TCP port, never 0.
    pub port: u16,
}

/// Why a peer address does not parse.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PeerAddressError {
    /// The text is empty.
    #[error("empty peer address")]
    Empty,
    /// No `:port` after the host.
    #[error("peer address {input:?} has no port (expected host:port or id@host:port)")]
    MissingPort {
        /// The whole address as given.
        input: String,
    },
    /// The port is not a number in 1..=65535.
    #[error("peer address {input:?}: invalid port {port:?} (expected 1..=65535)")]
    InvalidPort {
        /// The whole address as given.
        input: String,
        /// The port text.
        port: String,
    },
    /// The part before `@` is not a node id.
    #[error("peer address {input:?}: invalid node id {id:?} (expected a number such as 7 or n7)")]
    InvalidNodeId {
        /// The whole address as given.
        input: String,
        /// The id text.
        id: String,
    },
    /// The host is empty or holds characters no host name or IP address has.
    #[error("peer address {input:?}: invalid host {host:?}: {reason}")]
    InvalidHost {
        /// The whole address as given.
        input: String,
        /// The host text.
        host: String,
        /// What is wrong with it.
        reason: &'static str,
    },
}

impl PeerAddress {
    /// An address with a known id.
    pub fn with_id(node_id: NodeId, host: impl Into<String>, port: u16) -> Self {
        PeerAddress {
            node_id: Some(node_id),
            host: host.into(),
            port,
        }
    }

    /// An address whose id the handshake will tell.
    pub fn without_id(host: impl Into<String>, port: u16) -> Self {
        PeerAddress {
            node_id: None,
            host: host.into(),
            port,
        }
    }
}

impl fmt::Display for PeerAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(id) = self.node_id {
            write!(f, "{}@", id.0)?;
        }
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

impl FromStr for PeerAddress {
    type Err = PeerAddressError;

    fn from_str(input: &str) -> Result<Self, Self::Err> {
        if input.is_empty() {
            return Err(PeerAddressError::Empty);
        }
        let (node_id, rest) = match input.split_once('@') {
            Some((id, rest)) => (Some(parse_node_id(input, id)?), rest),
            None => (None, input),
        };
        let (host, port) = if let Some(bracketed) = rest.strip_prefix('[') {
            let Some((host, after)) = bracketed.split_once(']') else {
                return Err(invalid_host(input, rest, "unclosed '['"));
            };
            if host.parse::<Ipv6Addr>().is_err() {
                return Err(invalid_host(input, host, "not an IPv6 address"));
            }
            let Some(port) = after.strip_prefix(':') else {
                return Err(PeerAddressError::MissingPort {
                    input: input.to_owned(),
                });
            };
            (host, port)
        } else {
            let Some((host, port)) = rest.rsplit_once(':') else {
                return Err(PeerAddressError::MissingPort {
                    input: input.to_owned(),
                });
            };
            if host.contains(':') {
                return Err(invalid_host(
                    input,
                    host,
                    "an IPv6 address must be in brackets",
                ));
            }
            validate_host_name(input, host)?;
            (host, port)
        };
        let digits_only = !port.is_empty() && port.chars().all(|c| c.is_ascii_digit());
        let port = match port.parse::<u16>() {
            Ok(number) if number != 0 && digits_only => number,
            _ => {
                return Err(PeerAddressError::InvalidPort {
                    input: input.to_owned(),
                    port: port.to_owned(),
                });
            }
        };
        Ok(PeerAddress {
            node_id,
            host: host.to_owned(),
            port,
        })
    }
}

fn parse_node_id(input: &str, id: &str) -> Result<NodeId, PeerAddressError> {
    let digits = id.strip_prefix('n').unwrap_or(id);
    if digits.is_empty() || !digits.chars().all(|c| c.is_ascii_digit()) {
        return Err(PeerAddressError::InvalidNodeId {
            input: input.to_owned(),
            id: id.to_owned(),
        });
    }
    digits
        .parse::<u64>()
        .map(NodeId)
        .map_err(|_| PeerAddressError::InvalidNodeId {
            input: input.to_owned(),
            id: id.to_owned(),
        })
}

fn invalid_host(input: &str, host: &str, reason: &'static str) -> PeerAddressError {
    PeerAddressError::InvalidHost {
        input: input.to_owned(),
        host: host.to_owned(),
        reason,
    }
}

/// Host names (RFC 1123, plus `_`, which some container networks use) and IPv4 addresses.
fn validate_host_name(input: &str, host: &str) -> Result<(), PeerAddressError> {
    if host.is_empty() {
        return Err(invalid_host(input, host, "empty"));
    }
    if host.len() > 253 {
        return Err(invalid_host(input, host, "longer than 253 characters"));
    }
    let label_ok = |label: &str| {
        !label.is_empty()
            && label.len() <= 63
            && !label.starts_with('-')
            && !label.ends_with('-')
            && label
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    };
    if host.split('.').all(label_ok) {
        Ok(())
    } else {
        Err(invalid_host(input, host, "not a host name or IPv4 address"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_accepted_form() {
        let cases = [
            ("node-002:7000", None, "node-002", 7000),
            ("127.0.0.1:1", None, "127.0.0.1", 1),
            ("3@127.0.0.1:65535", Some(3), "127.0.0.1", 65535),
            ("n12@db_1.internal:7000", Some(12), "db_1.internal", 7000),
            ("[::1]:7000", None, "::1", 7000),
            ("9@[fe80::1]:80", Some(9), "fe80::1", 80),
        ];
        for (text, id, host, port) in cases {
            let parsed: PeerAddress = text.parse().unwrap_or_else(|e| panic!("{text}: {e}"));
            assert_eq!(parsed.node_id, id.map(NodeId), "{text}");
            assert_eq!((parsed.host.as_str(), parsed.port), (host, port), "{text}");
            let again: PeerAddress = parsed.to_string().parse().unwrap();
            assert_eq!(again, parsed, "display round-trips for {text}");
        }
    }

    #[test]
    fn refuses_malformed_addresses_with_the_right_error() {
        use PeerAddressError as E;
        let check = |text: &str, ok: fn(&E) -> bool| {
            let err = text.parse::<PeerAddress>().unwrap_err();
            assert!(ok(&err), "{text}: unexpected {err:?}");
        };
        check("", |e| matches!(e, E::Empty));
        check("node-002", |e| matches!(e, E::MissingPort { .. }));
        check("[::1]", |e| matches!(e, E::MissingPort { .. }));
        check("host:", |e| matches!(e, E::InvalidPort { .. }));
        check("host:0", |e| matches!(e, E::InvalidPort { .. }));
        check("host:65536", |e| matches!(e, E::InvalidPort { .. }));
        check("host:+80", |e| matches!(e, E::InvalidPort { .. }));
        check("host:http", |e| matches!(e, E::InvalidPort { .. }));
        check("x@host:1", |e| matches!(e, E::InvalidNodeId { .. }));
        check("@host:1", |e| matches!(e, E::InvalidNodeId { .. }));
        check("99999999999999999999@host:1", |e| {
            matches!(e, E::InvalidNodeId { .. })
        });
        check(":7000", |e| matches!(e, E::InvalidHost { .. }));
        check("::1:7000", |e| matches!(e, E::InvalidHost { .. }));
        check("[::1:7000", |e| matches!(e, E::InvalidHost { .. }));
        check("[nothost]:7000", |e| matches!(e, E::InvalidHost { .. }));
        check("bad host:7000", |e| matches!(e, E::InvalidHost { .. }));
        check("-bad.example:7000", |e| matches!(e, E::InvalidHost { .. }));
        check("a..b:7000", |e| matches!(e, E::InvalidHost { .. }));
        check("1@2@host:7000", |e| matches!(e, E::InvalidHost { .. }));
    }
}
