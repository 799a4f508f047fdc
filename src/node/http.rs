//! The node's HTTP API (axum): the key-value routes, `/status`, `/metrics`, `/byzantine`, and
//! the membership routes under `/cluster`.
//!
//! Every key-value request becomes one command through the log, reads included, so any node
//! answers any request linearizably (a follower's engine forwards the proposal to the leader).
//! A 2xx answer means the command committed and was applied; when the engine cannot say
//! (no leader, deadline passed) the answer is 503/504 with a JSON reason, never 2xx.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Router;
use axum::extract::{DefaultBodyLimit, Path, Request, State};
use axum::http::{HeaderMap, StatusCode, Uri, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use serde_json::json;

use super::kv::{KvCommand, KvResponse, KvStore};
use crate::client_signature::{ClientSignature, http_statement};
use crate::engine::ConsensusEngine;
use crate::error::{Error, StorageError};
use crate::keys::decode_hex;
use crate::protocol::RejectReason;
use crate::telemetry::{TraceContext, TraceSampler, with_trace_decision};

/// The largest request body accepted (1 MiB); larger ones get 413 Payload Too Large.
pub const MAX_BODY_BYTES: usize = 1 << 20;

/// The routes, serving `engine` (which must run a [`KvStore`]).
pub fn router(engine: Arc<ConsensusEngine>) -> Router {
    let sampler = engine.trace_sampler();
    Router::new()
        .route("/kv/{key}", get(get_key).put(put_key).delete(delete_key))
        .route("/kv/{key}/cas", post(cas_key))
        .route("/status", get(status))
        .route("/metrics", get(metrics))
        .route("/byzantine", get(byzantine))
        .route("/cluster", get(cluster))
        .route("/cluster/learners", post(add_learner))
        .route("/cluster/voters", put(change_voters))
        .route_layer(axum::middleware::from_fn_with_state(sampler, trace_request))
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(engine)
}

/// Runs a request inside an `http.server` span when it is traced: when it names a sampled
/// W3C `traceparent` (the caller's trace continues here), or when the engine's sampler picks
/// it. Either way the decision holds for the request's proposal
/// ([`with_trace_decision`](crate::telemetry::with_trace_decision)): a traced request's proposal
/// is traced, and an untraced one's is not, so nothing is picked twice. Other requests create
/// no span.
async fn trace_request(
    State(sampler): State<TraceSampler>,
    request: Request,
    next: Next,
) -> Response {
    use tracing::Instrument;
    let parent = request
        .headers()
        .get("traceparent")
        .and_then(|value| value.to_str().ok())
        .and_then(TraceContext::from_traceparent)
        .filter(TraceContext::is_sampled);
    if parent.is_none() && !sampler.pick() {
        return with_trace_decision(false, next.run(request)).await;
    }
    let route = request
        .extensions()
        .get::<axum::extract::MatchedPath>()
        .map_or_else(
            || request.uri().path().to_owned(),
            |path| path.as_str().to_owned(),
        );
    let method = request.method().as_str().to_owned();
    let span = tracing::info_span!(
        target: "consensus::trace",
        "http.server",
        otel.name = format!("{method} {route}"),
        otel.kind = "server",
        http.request.method = %method,
        http.route = %route,
        url.path = %request.uri().path(),
        http.response.status_code = tracing::field::Empty,
    );
    if let Some(parent) = parent {
        parent.adopt(&span);
    }
    let response = with_trace_decision(true, next.run(request))
        .instrument(span.clone())
        .await;
    span.record("http.response.status_code", response.status().as_u16());
    response
}

/// The body of `POST /kv/{key}/cas`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct CasRequest {
    /// The expected value; `null` expects the key to be absent.
    from: Option<String>,
    /// The value to set.
    to: String,
}

/// The body of `GET /status`.
#[derive(Debug, Serialize)]
struct Status {
    node_id: String,
    name: String,
    role: &'static str,
    term: u64,
    leader: Option<String>,
    commit_index: u64,
    applied_index: u64,
    members: Vec<String>,
    /// `raft` or `pbft`.
    algorithm: &'static str,
    /// PBFT: the view (the same number as `term`).
    #[serde(skip_serializing_if = "Option::is_none")]
    view: Option<u64>,
    /// PBFT: the primary of `view` (members ranked by id, `view mod n`), even while the view
    /// change that leads to it is under way.
    #[serde(skip_serializing_if = "Option::is_none")]
    primary: Option<String>,
    /// PBFT: how many faulty replicas the cluster tolerates (n = 3f + 1).
    #[serde(skip_serializing_if = "Option::is_none")]
    f: Option<usize>,
    /// PBFT: replicas proven Byzantine whose messages this node drops.
    #[serde(skip_serializing_if = "Option::is_none")]
    excluded: Option<Vec<String>>,
}

/// One entry of `GET /byzantine`.
#[derive(Debug, Serialize)]
struct DetectionBody {
    offender: String,
    offence: &'static str,
}

/// The body of `GET /byzantine`.
#[derive(Debug, Serialize)]
struct ByzantineBody {
    detections: Vec<DetectionBody>,
    excluded: Vec<String>,
}

/// Middleware: while the node is stopping (`stopping` set), key-value requests are answered
/// 503 with error `stopping` and nothing is done, so the client can send them to another node;
/// `/status`, `/metrics` and `/byzantine` still answer.
pub async fn refuse_while_stopping(
    State(stopping): State<Arc<AtomicBool>>,
    request: Request,
    next: Next,
) -> Response {
    if stopping.load(Ordering::Relaxed) && request.uri().path().starts_with("/kv/") {
        let mut response = failure(
            StatusCode::SERVICE_UNAVAILABLE,
            "stopping",
            "this node is stopping; nothing was done: send the request to another node",
        );
        response.headers_mut().insert(
            header::CONNECTION,
            header::HeaderValue::from_static("close"),
        );
        return response;
    }
    next.run(request).await
}

/// The bearer token a node's write and admin routes require (`[http] token_file`).
#[derive(Clone)]
pub struct BearerToken(Arc<str>);

impl BearerToken {
    /// A token; its text is what clients send after `Authorization: Bearer `.
    pub fn new(token: &str) -> Self {
        Self(Arc::from(token))
    }

    /// The token's text, for a node that calls another's API (`--join`).
    pub(crate) fn text(&self) -> &str {
        &self.0
    }

    /// Whether `presented` is the token, in time that does not depend on where they differ.
    fn matches(&self, presented: &str) -> bool {
        let (expected, presented) = (self.0.as_bytes(), presented.as_bytes());
        expected.len() == presented.len()
            && expected
                .iter()
                .zip(presented)
                .fold(0u8, |difference, (a, b)| difference | (a ^ b))
                == 0
    }
}

impl std::fmt::Debug for BearerToken {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.write_str("BearerToken(..)")
    }
}

/// Whether a request needs the bearer token: writes (`PUT`, `DELETE`, `POST`: keys and
/// membership changes) and the admin routes (`/metrics`, `/byzantine`); reads of keys,
/// `/status` and `/cluster` do not.
fn needs_token(method: &axum::http::Method, path: &str) -> bool {
    let read = method == axum::http::Method::GET || method == axum::http::Method::HEAD;
    !(read && (path.starts_with("/kv/") || path == "/status" || path == "/cluster"))
}

/// Middleware: a write (`PUT`, `DELETE`, `POST` under `/kv/`) or an admin request (`/metrics`,
/// `/byzantine`) without `Authorization: Bearer <token>` (or with another token) is answered 401
/// with error `unauthorized`, and nothing is done; reads of keys and `/status` pass.
pub async fn require_token(
    State(token): State<BearerToken>,
    request: Request,
    next: Next,
) -> Response {
    if !needs_token(request.method(), request.uri().path()) {
        return next.run(request).await;
    }
    let presented = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.strip_prefix("Bearer "))
        .map(str::trim);
    if presented.is_some_and(|presented| token.matches(presented)) {
        return next.run(request).await;
    }
    let mut response = failure(
        StatusCode::UNAUTHORIZED,
        "unauthorized",
        "writes and admin routes need Authorization: Bearer <token> ([http] token_file)",
    );
    response.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        header::HeaderValue::from_static("Bearer"),
    );
    response
}

/// A JSON error answer.
fn failure(status: StatusCode, error: &str, reason: impl Into<String>) -> Response {
    let body = json!({ "error": error, "reason": reason.into() });
    (status, axum::Json(body)).into_response()
}

/// Runs `command` through the log; maps engine errors to the non-2xx answers above.
async fn execute(engine: &ConsensusEngine, command: KvCommand) -> Result<KvResponse, Response> {
    execute_signed(engine, command, None).await
}

/// [`execute`] with the client's signature, if the request carried one.
async fn execute_signed(
    engine: &ConsensusEngine,
    command: KvCommand,
    signature: Option<ClientSignature>,
) -> Result<KvResponse, Response> {
    let result = match signature {
        Some(signature) => {
            engine
                .execute_signed_command::<KvStore>(command, signature)
                .await
        }
        None => engine.execute_command::<KvStore>(command).await,
    };
    match result {
        Ok(response) => Ok(response),
        Err(Error::Rejected(RejectReason::ClientSignature { reason })) => Err(failure(
            StatusCode::FORBIDDEN,
            "client_signature",
            format!("refused, never applied: {reason}"),
        )),
        Err(Error::Unsupported { what, reason }) => Err(failure(
            StatusCode::BAD_REQUEST,
            "unsupported",
            format!("{what}: {reason}"),
        )),
        Err(Error::Timeout) if engine.current_leader().is_none() => Err(failure(
            StatusCode::SERVICE_UNAVAILABLE,
            "no_leader",
            "no leader was reachable within the request deadline; the request may or may not \
             take effect",
        )),
        Err(Error::Timeout) => Err(failure(
            StatusCode::GATEWAY_TIMEOUT,
            "timeout",
            "the request did not commit within the deadline; it may or may not take effect",
        )),
        Err(Error::Rejected(reason)) => Err(failure(
            StatusCode::SERVICE_UNAVAILABLE,
            "rejected",
            format!("refused, never applied: {reason}"),
        )),
        Err(Error::Storage(error @ StorageError::DiskFull { .. })) => Err(failure(
            StatusCode::INSUFFICIENT_STORAGE,
            "disk_full",
            format!("refused, never applied: {error}"),
        )),
        Err(Error::Stopped(reason)) => Err(failure(
            StatusCode::SERVICE_UNAVAILABLE,
            "stopped",
            format!("the node is shutting down: {reason}"),
        )),
        Err(error) => {
            tracing::error!(%error, "command failed");
            Err(failure(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                error.to_string(),
            ))
        }
    }
}

/// The request headers that carry a client's signature: its ed25519 public key (64 hex
/// characters) and its signature (128 hex characters) over [`http_statement`] of the request.
pub const CLIENT_KEY_HEADER: &str = "x-client-key";
/// See [`CLIENT_KEY_HEADER`].
pub const CLIENT_SIGNATURE_HEADER: &str = "x-client-signature";

/// The client's signature of a write request, if it sent the header pair; 400 with a JSON
/// reason when only one of them came or one does not decode.
pub(super) fn signature_of(
    headers: &HeaderMap,
    method: &str,
    uri: &Uri,
    body: &[u8],
) -> Result<Option<ClientSignature>, Box<Response>> {
    let text = |name: &str| {
        headers
            .get(name)
            .map(|value| value.to_str().map_err(|_| format!("{name} is not ASCII")))
            .transpose()
    };
    let bad = |reason: String| {
        Box::new(failure(
            StatusCode::BAD_REQUEST,
            "bad_signature_headers",
            reason,
        ))
    };
    let (key, signature) = match (text(CLIENT_KEY_HEADER), text(CLIENT_SIGNATURE_HEADER)) {
        (Ok(None), Ok(None)) => return Ok(None),
        (Ok(Some(key)), Ok(Some(signature))) => (key, signature),
        (Err(reason), _) | (_, Err(reason)) => return Err(bad(reason)),
        _ => {
            return Err(bad(format!(
                "send both {CLIENT_KEY_HEADER} and {CLIENT_SIGNATURE_HEADER}, or neither"
            )));
        }
    };
    let public_key = decode_hex::<32>(key.trim())
        .map_err(|reason| bad(format!("{CLIENT_KEY_HEADER}: {reason}")))?;
    let signature = decode_hex::<64>(signature.trim())
        .map_err(|reason| bad(format!("{CLIENT_SIGNATURE_HEADER}: {reason}")))?;
    Ok(Some(ClientSignature {
        public_key,
        signature,
        statement: Some(http_statement(method, uri.path(), body).into()),
    }))
}

/// The answer for a response of an unexpected shape (a bug, never a client error).
fn unexpected(response: &KvResponse) -> Response {
    tracing::error!(?response, "state machine answered an unexpected response");
    failure(
        StatusCode::INTERNAL_SERVER_ERROR,
        "internal",
        "unexpected state machine response",
    )
}

async fn get_key(State(engine): State<Arc<ConsensusEngine>>, Path(key): Path<String>) -> Response {
    let command = KvCommand::Get {
        key: key.into_bytes(),
    };
    match execute(&engine, command).await {
        Ok(KvResponse::Value(Some(value))) => (StatusCode::OK, value).into_response(),
        Ok(KvResponse::Value(None)) => failure(StatusCode::NOT_FOUND, "not_found", "no such key"),
        Ok(other) => unexpected(&other),
        Err(answer) => answer,
    }
}

async fn put_key(
    State(engine): State<Arc<ConsensusEngine>>,
    Path(key): Path<String>,
    uri: Uri,
    headers: HeaderMap,
    value: Bytes,
) -> Response {
    let signature = match signature_of(&headers, "PUT", &uri, &value) {
        Ok(signature) => signature,
        Err(answer) => return *answer,
    };
    let command = KvCommand::Put {
        key: key.into_bytes(),
        value: value.to_vec(),
    };
    match execute_signed(&engine, command, signature).await {
        Ok(KvResponse::Done) => StatusCode::OK.into_response(),
        Ok(other) => unexpected(&other),
        Err(answer) => answer,
    }
}

async fn delete_key(
    State(engine): State<Arc<ConsensusEngine>>,
    Path(key): Path<String>,
    uri: Uri,
    headers: HeaderMap,
) -> Response {
    let signature = match signature_of(&headers, "DELETE", &uri, b"") {
        Ok(signature) => signature,
        Err(answer) => return *answer,
    };
    let command = KvCommand::Delete {
        key: key.into_bytes(),
    };
    match execute_signed(&engine, command, signature).await {
        Ok(KvResponse::Done) => StatusCode::OK.into_response(),
        Ok(other) => unexpected(&other),
        Err(answer) => answer,
    }
}

/// Parsed from the raw body so that clients need not send a JSON content type.
async fn cas_key(
    State(engine): State<Arc<ConsensusEngine>>,
    Path(key): Path<String>,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let signature = match signature_of(&headers, "POST", &uri, &body) {
        Ok(signature) => signature,
        Err(answer) => return *answer,
    };
    let request: CasRequest = match serde_json::from_slice(&body) {
        Ok(request) => request,
        Err(error) => {
            return failure(
                StatusCode::BAD_REQUEST,
                "bad_request",
                format!("expected {{\"from\": string or null, \"to\": string}}: {error}"),
            );
        }
    };
    let command = KvCommand::Cas {
        key: key.into_bytes(),
        from: request.from.map(String::into_bytes),
        to: request.to.into_bytes(),
    };
    match execute_signed(&engine, command, signature).await {
        Ok(KvResponse::Cas { swapped: true, .. }) => StatusCode::OK.into_response(),
        Ok(KvResponse::Cas {
            swapped: false,
            previous,
        }) => {
            let current = previous.map(|value| String::from_utf8_lossy(&value).into_owned());
            (
                StatusCode::CONFLICT,
                axum::Json(json!({ "current": current })),
            )
                .into_response()
        }
        Ok(other) => unexpected(&other),
        Err(answer) => answer,
    }
}

async fn status(State(engine): State<Arc<ConsensusEngine>>) -> Response {
    let info = engine.leader_election().info();
    let metrics = engine.metrics();
    // The engine publishes who leads, not the candidate state: without a known leader this
    // node is electing (a candidate or a follower waiting to hear from one).
    let role = if info.is_leader {
        "leader"
    } else if info.leader.is_some() {
        "follower"
    } else {
        "electing"
    };
    let members = engine.members();
    let pbft = engine.config().algorithm == crate::Algorithm::Pbft && !members.is_empty();
    let primary = pbft.then(|| members[(info.term % members.len() as u64) as usize].to_string());
    let body = Status {
        algorithm: engine.config().algorithm.as_str(),
        view: pbft.then_some(info.term),
        primary,
        f: pbft.then(|| (members.len() - 1) / 3),
        excluded: pbft.then(|| {
            let report = engine.byzantine_report();
            report.excluded.iter().map(ToString::to_string).collect()
        }),
        node_id: engine.node_id().to_string(),
        name: engine.config().node_id.clone(),
        role,
        term: info.term,
        leader: info.leader.map(|id| id.to_string()),
        commit_index: metrics.last_committed_index(),
        applied_index: metrics.last_applied_index,
        members: members.iter().map(ToString::to_string).collect(),
    };
    axum::Json(body).into_response()
}

/// The body of `GET /cluster`, and of a membership change's 200: node names throughout.
#[derive(Debug, Serialize)]
struct ClusterBody {
    /// The voters in force.
    voters: Vec<String>,
    /// While a change of voters is under way: the voters before it, who must agree as well.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    joint_with: Vec<String>,
    /// Members that receive the log and never vote.
    learners: Vec<String>,
    /// The leader this node knows, if any.
    leader: Option<String>,
    /// Where each node this one can name listens for peers (`host:port`): what a node joining
    /// with `--join` dials.
    addresses: std::collections::BTreeMap<String, String>,
    /// GPU-optimized Raft: each member's ed25519 public key (hex), as the membership carries it.
    #[serde(skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    keys: std::collections::BTreeMap<String, String>,
}

/// The body of `POST /cluster/learners`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct LearnerRequest {
    /// The new node's name (its `node_id`).
    id: String,
    /// Where it listens for peers (`host:port`).
    address: String,
    /// Its ed25519 public key in hex: GPU-optimized Raft needs it (its members sign); Raft
    /// ignores it.
    #[serde(default)]
    public_key: Option<String>,
}

fn cluster_body(
    engine: &ConsensusEngine,
    membership: Option<crate::membership::Membership>,
) -> ClusterBody {
    let directory = engine.peer_directory();
    let name = |id: &crate::NodeId| {
        directory
            .get(id)
            .map_or_else(|| id.to_string(), |entry| entry.name.clone())
    };
    let names = |ids: &mut dyn Iterator<Item = &crate::NodeId>| ids.map(name).collect();
    let (voters, joint_with, learners) = match &membership {
        Some(membership) => (
            names(&mut membership.voters.iter()),
            names(&mut membership.outgoing.iter()),
            names(&mut membership.learners.iter()),
        ),
        // PBFT: the voters it started with, for good.
        None => (names(&mut engine.members().iter()), Vec::new(), Vec::new()),
    };
    let keys = membership
        .iter()
        .flat_map(|membership| &membership.keys)
        .map(|(id, key)| (name(id), crate::keys::encode_hex(key)))
        .collect();
    ClusterBody {
        voters,
        joint_with,
        learners,
        leader: engine.current_leader().as_ref().map(name),
        addresses: directory
            .values()
            .filter_map(|entry| Some((entry.name.clone(), entry.address.clone()?)))
            .collect(),
        keys,
    }
}

/// `GET /cluster`: the members in force on this node, the leader it knows, and the peer
/// addresses it can tell.
async fn cluster(State(engine): State<Arc<ConsensusEngine>>) -> Response {
    axum::Json(cluster_body(&engine, engine.membership())).into_response()
}

/// `POST /cluster/learners` with `{"id": NAME, "address": "host:port"}` (and, for GPU-optimized
/// Raft, `"public_key": HEX`): adds the node as a learner (on any member: a follower forwards it
/// to the leader). 200 with the cluster once the change committed; asked again for the same
/// node, address and key, 200 at once.
async fn add_learner(State(engine): State<Arc<ConsensusEngine>>, body: Bytes) -> Response {
    let request: LearnerRequest = match serde_json::from_slice(&body) {
        Ok(request) => request,
        Err(error) => {
            return failure(
                StatusCode::BAD_REQUEST,
                "bad_request",
                format!("expected {{\"id\": NAME, \"address\": \"host:port\"}}: {error}"),
            );
        }
    };
    let key = match request.public_key.as_deref().map(str::trim) {
        None => None,
        Some(hex) => match crate::keys::public_key_from_hex(hex) {
            Ok(key) => Some(key),
            Err(reason) => {
                return failure(
                    StatusCode::BAD_REQUEST,
                    "bad_request",
                    format!("public_key: {reason}"),
                );
            }
        },
    };
    let address = Some(request.address.as_str());
    let result = match key {
        None => engine.add_learner(&request.id, address).await,
        Some(key) => {
            engine
                .add_learner_with_key(&request.id, address, &key)
                .await
        }
    };
    membership_answer(&engine, result)
}

/// `PUT /cluster/voters` with `[NAME, ...]`: makes these the whole voter set, through a joint
/// membership (on any member: a follower forwards it to the leader). 200 with the cluster once
/// the final membership committed.
async fn change_voters(State(engine): State<Arc<ConsensusEngine>>, body: Bytes) -> Response {
    let names: Vec<String> = match serde_json::from_slice(&body) {
        Ok(names) => names,
        Err(error) => {
            return failure(
                StatusCode::BAD_REQUEST,
                "bad_request",
                format!("expected a JSON array of node names: {error}"),
            );
        }
    };
    let voters = names.iter().map(|name| crate::NodeId::from_name(name));
    let result = engine.change_membership(voters).await;
    membership_answer(&engine, result)
}

/// A membership change's answer: 200 with the cluster once committed; 400 for a change that
/// cannot be made as asked (an empty set, unknown nodes, a voter added as a learner, a bad
/// address), 409 while the group's state refuses it (another change in flight, a learner
/// still catching up, no quorum of the new voters reachable), 503 without a leader, 504 when
/// the deadline passed (it may still commit: `GET /cluster` tells).
fn membership_answer(
    engine: &ConsensusEngine,
    result: Result<crate::membership::Membership, Error>,
) -> Response {
    match result {
        Ok(membership) => axum::Json(cluster_body(engine, Some(membership))).into_response(),
        Err(error) => {
            let (status, code) = membership_refusal(&error);
            if status == StatusCode::INTERNAL_SERVER_ERROR {
                tracing::error!(%error, "membership change failed");
            }
            let reason = match &error {
                Error::Membership(refused) => format!("nothing was changed: {refused}"),
                Error::Timeout => "the change did not commit within the deadline; it may \
                                   still: GET /cluster tells"
                    .to_string(),
                other => other.to_string(),
            };
            failure(status, code, reason)
        }
    }
}

/// The status and error code of a membership change that did not answer 200.
fn membership_refusal(error: &Error) -> (StatusCode, &'static str) {
    use crate::membership::MembershipError;
    match error {
        Error::Membership(refused) if refused.is_bad_request() => {
            (StatusCode::BAD_REQUEST, "bad_membership")
        }
        Error::Membership(MembershipError::NotLeader { .. }) => {
            (StatusCode::SERVICE_UNAVAILABLE, "no_leader")
        }
        Error::Membership(_) => (StatusCode::CONFLICT, "membership_conflict"),
        Error::Timeout => (StatusCode::GATEWAY_TIMEOUT, "timeout"),
        _ => (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
    }
}

/// `GET /byzantine`: the replicas this node proved Byzantine, what each did, and which it
/// excludes (empty under Raft, which assumes no replica lies).
async fn byzantine(State(engine): State<Arc<ConsensusEngine>>) -> Response {
    let report = engine.byzantine_report();
    let body = ByzantineBody {
        detections: report
            .detections
            .iter()
            .map(|d| DetectionBody {
                offender: d.offender.to_string(),
                offence: d.offence,
            })
            .collect(),
        excluded: report.excluded.iter().map(ToString::to_string).collect(),
    };
    axum::Json(body).into_response()
}

async fn metrics(State(engine): State<Arc<ConsensusEngine>>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        engine.prometheus_metrics(),
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn membership_refusals_map_to_400_409_503_and_504() {
        use crate::membership::{Membership, MembershipError as Refused};
        let status = |error: Error| membership_refusal(&error).0.as_u16();
        assert_eq!(status(Error::Membership(Refused::NoVoters)), 400);
        assert_eq!(
            status(Error::Membership(Refused::UnknownNode(crate::NodeId(9)))),
            400
        );
        assert_eq!(
            status(Error::Membership(Refused::AlreadyVoter(crate::NodeId(1)))),
            400
        );
        assert_eq!(
            status(Error::Membership(Refused::Unsupported("PBFT".into()))),
            400
        );
        let pending = Box::new(Membership::default());
        assert_eq!(
            status(Error::Membership(Refused::ChangeInProgress { pending })),
            409
        );
        let behind = Refused::LearnerBehind {
            id: crate::NodeId(4),
            matched: 1,
            commit: 900,
        };
        assert_eq!(status(Error::Membership(behind)), 409);
        let reachable = vec![crate::NodeId(1)];
        assert_eq!(
            status(Error::Membership(Refused::NoReachableQuorum { reachable })),
            409
        );
        assert_eq!(
            status(Error::Membership(Refused::NotLeader { leader: None })),
            503
        );
        assert_eq!(status(Error::Timeout), 504);
    }

    #[test]
    fn reads_are_open_and_writes_and_admin_routes_need_the_token() {
        use axum::http::Method;
        assert!(!needs_token(&Method::GET, "/kv/a"));
        assert!(!needs_token(&Method::GET, "/status"));
        assert!(!needs_token(&Method::GET, "/cluster"));
        assert!(needs_token(&Method::POST, "/cluster/learners"));
        assert!(needs_token(&Method::PUT, "/cluster/voters"));
        assert!(needs_token(&Method::PUT, "/kv/a"));
        assert!(needs_token(&Method::DELETE, "/kv/a"));
        assert!(needs_token(&Method::POST, "/kv/a/cas"));
        assert!(needs_token(&Method::GET, "/metrics"));
        assert!(needs_token(&Method::GET, "/byzantine"));
        let token = BearerToken::new("s3cret");
        assert!(token.matches("s3cret"));
        assert!(!token.matches("s3cre"));
        assert!(!token.matches("s3creT"));
        assert!(!format!("{token:?}").contains("s3cret"));
    }
}
