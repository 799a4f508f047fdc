//! `consensus-node --join HTTP_ADDRESS`: a new node joins a running Raft or GPU-optimized Raft
//! cluster through any member's HTTP API (GPU-optimized Raft: it sends its public key along,
//! and learns the members' keys from the log).
//!
//! Before its engine starts, the node asks the member for `GET /cluster` and takes the members'
//! peer addresses from it (its own `bootstrap_peers` must be empty), and starts as a joining
//! node ([`ConsensusConfig::joining`]): no member, neither voting nor campaigning. Once its
//! transport listens it asks `POST /cluster/learners` with its name and `bind_address`; the
//! member forwards that to the leader, every member dials the new node, and the leader sends it
//! the log or a snapshot. Promoting it to voter is the operator's `PUT /cluster/voters`.
//!
//! Joining again with the same name and address (a restart with `--join` still given) is
//! harmless: the cluster answers that the learner is already there, and a node that became a
//! voter is not asked for again.
//!
//! A node whose own API is HTTPS (`[http] tls = true`) asks over HTTPS: the members of one
//! cluster serve their APIs alike. It trusts the member's certificate as a peer would (its chain
//! leads to the cluster's CA, [`client::Https::as_peer`]), and refuses any other.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use serde::Deserialize;

use super::NodeError;
use super::client::{self, HttpResponse};
use crate::config::ConsensusConfig;
use crate::error::ConfigError;

/// How long a joining node keeps asking: the member may be starting, or a change in flight.
const JOIN_PATIENCE: Duration = Duration::from_secs(60);
/// Each request's own deadline.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(15);
/// The wait between two tries.
const RETRY_PAUSE: Duration = Duration::from_millis(500);

/// The part of `GET /cluster` a joining node reads.
#[derive(Debug, Deserialize)]
pub(super) struct ClusterView {
    pub(super) voters: Vec<String>,
    #[serde(default)]
    pub(super) addresses: std::collections::BTreeMap<String, String>,
}

/// Reads the cluster from `member` and makes `consensus` a joining node that dials its
/// members. Refuses a configuration that names peers itself, or whose `bind_address` other
/// nodes could not dial.
pub(super) async fn prepare(
    consensus: &mut ConsensusConfig,
    member: SocketAddr,
    https: Option<&client::Https>,
) -> Result<ClusterView, NodeError> {
    if !consensus.peers.is_empty() {
        return Err(NodeError::Usage(
            "--join takes the peers from the cluster: remove bootstrap_peers".into(),
        ));
    }
    advertised_address(consensus)?;
    let view = ask(
        https,
        member,
        "GET",
        "/cluster",
        b"",
        None,
        |response| match response.status {
            200 => serde_json::from_slice::<ClusterView>(&response.body)
                .map(Some)
                .map_err(|error| format!("GET /cluster answered JSON it cannot read: {error}")),
            status => Err(format!(
                "GET /cluster answered {status}: {}",
                response.text()
            )),
        },
    )
    .await?;
    let own = &consensus.node_id;
    consensus.peers = view
        .addresses
        .iter()
        .filter(|(name, _)| *name != own)
        .map(|(name, address)| format!("{name}@{address}"))
        .collect();
    if consensus.peers.is_empty() {
        return Err(NodeError::Usage(format!(
            "the member at {member} told no peer addresses to dial"
        )));
    }
    consensus.joining = true;
    consensus.validate()?;
    Ok(view)
}

/// Asks `member` to add this node as a learner, unless `view` shows it votes already; waits
/// for the change to commit. `token` is the bearer token the members' API requires, if any.
pub(super) async fn ask_to_be_added(
    consensus: &ConsensusConfig,
    member: SocketAddr,
    https: Option<&client::Https>,
    view: &ClusterView,
    token: Option<&str>,
) -> Result<(), NodeError> {
    let name = &consensus.node_id;
    if view.voters.contains(name) {
        tracing::info!(node = %name, "already a voter: not asking to join again");
        return Ok(());
    }
    let mut body = serde_json::json!({
        "id": name,
        "address": advertised_address(consensus)?.to_string(),
    });
    // GPU-optimized Raft adds a learner only with its key: the one this node signs with,
    // which its validators table names (checked against its key file at start).
    if consensus.algorithm.signs_messages()
        && let Some(public_key) = consensus.validators.get(name)
    {
        body["public_key"] = public_key.trim().into();
    }
    let body = body.to_string();
    ask(
        https,
        member,
        "POST",
        "/cluster/learners",
        body.as_bytes(),
        token,
        |response| match response.status {
            200 => Ok(Some(())),
            // No leader yet, another change in flight, the deadline passed: try again.
            409 | 503 | 504 => Ok(None),
            status => Err(format!(
                "POST /cluster/learners answered {status}: {}",
                response.text()
            )),
        },
    )
    .await?;
    tracing::info!(node = %name, %member, "added to the cluster as a learner");
    Ok(())
}

/// The address other nodes dial this one at: its `bind_address`, which must name a specific
/// IP and port.
fn advertised_address(consensus: &ConsensusConfig) -> Result<SocketAddr, NodeError> {
    consensus.advertised_address().ok_or_else(|| {
        NodeError::Config(ConfigError::Invalid {
            field: "bind_address",
            value: consensus.bind_address.clone(),
            reason: "a joining node tells the cluster this address: it needs a specific \
                         IP and port that the members can dial",
        })
    })
}

/// Sends one request until `read` says what it answered (`Ok(Some)`), giving up on `Err` or
/// after [`JOIN_PATIENCE`]; connection failures and `Ok(None)` are retried.
async fn ask<T>(
    https: Option<&client::Https>,
    member: SocketAddr,
    method: &str,
    path: &str,
    body: &[u8],
    token: Option<&str>,
    read: impl Fn(&HttpResponse) -> Result<Option<T>, String>,
) -> Result<T, NodeError> {
    let deadline = Instant::now() + JOIN_PATIENCE;
    let authorization = token.map(|token| format!("Bearer {token}"));
    let mut headers = vec![("content-type", "application/json")];
    if let Some(value) = &authorization {
        headers.push(("authorization", value));
    }
    loop {
        let last = match client::request_over(
            https,
            member,
            method,
            path,
            &headers,
            body,
            REQUEST_TIMEOUT,
        )
        .await
        {
            Ok(response) => match read(&response) {
                Ok(Some(answer)) => return Ok(answer),
                Ok(None) => format!("{method} {path} answered {}", response.status),
                Err(reason) => return Err(NodeError::Join { member, reason }),
            },
            Err(error) => error.to_string(),
        };
        if Instant::now() + RETRY_PAUSE > deadline {
            return Err(NodeError::Join {
                member,
                reason: format!("gave up after {JOIN_PATIENCE:?}; last: {last}"),
            });
        }
        tracing::info!(%member, %last, "joining: trying again");
        tokio::time::sleep(RETRY_PAUSE).await;
    }
}
