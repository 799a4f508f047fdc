//! Traces reach a real OTLP/HTTP receiver: three `consensus-node`s export to a receiver this test
//! runs (decoding the protobuf requests with `opentelemetry-proto`), a write goes through a
//! follower with a caller's W3C `traceparent` (the sampling ratio is 0, so only such requests are
//! traced), and one trace, the caller's, must hold the follower's request (a child of the
//! caller's span) and proposal, the leader's commit span, and both followers' append spans
//! below it; writes without the header make no proposal spans; and the first election's pre-vote
//! and vote rounds arrive as children of its election span. A second test exports a GPU
//! dispatch span through the library's exporter when an adapter is present.

use std::collections::{BTreeSet, HashMap};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::State;
use axum::routing::post;
use consensus::node::client;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::any_value::Value as AnyValue;
use prost::Message as _;

#[path = "common/ports.rs"]
mod ports;
use ports::free_ports;

const BINARY: &str = env!("CARGO_BIN_EXE_consensus-node");
const TIMEOUT: Duration = Duration::from_secs(5);

/// One span the receiver got.
#[derive(Clone, Debug)]
struct Received {
    /// `service.instance.id` of the exporting process (the node's id).
    instance: String,
    name: String,
    trace_id: Vec<u8>,
    span_id: Vec<u8>,
    parent_span_id: Vec<u8>,
    attributes: HashMap<String, String>,
}

type Spans = Arc<Mutex<Vec<Received>>>;

fn text(value: &Option<opentelemetry_proto::tonic::common::v1::AnyValue>) -> String {
    match value.as_ref().and_then(|value| value.value.as_ref()) {
        Some(AnyValue::StringValue(text)) => text.clone(),
        Some(AnyValue::IntValue(number)) => number.to_string(),
        Some(AnyValue::BoolValue(flag)) => flag.to_string(),
        Some(AnyValue::DoubleValue(number)) => number.to_string(),
        _ => String::new(),
    }
}

async fn export(State(spans): State<Spans>, body: Bytes) -> (axum::http::StatusCode, Vec<u8>) {
    let Ok(request) = ExportTraceServiceRequest::decode(body) else {
        return (axum::http::StatusCode::BAD_REQUEST, Vec::new());
    };
    let mut received = spans.lock().unwrap();
    for resource_spans in request.resource_spans {
        let instance = resource_spans
            .resource
            .iter()
            .flat_map(|resource| &resource.attributes)
            .find(|attribute| attribute.key == "service.instance.id")
            .map(|attribute| text(&attribute.value))
            .unwrap_or_default();
        for scope in resource_spans.scope_spans {
            for span in scope.spans {
                received.push(Received {
                    instance: instance.clone(),
                    name: span.name,
                    trace_id: span.trace_id,
                    span_id: span.span_id,
                    parent_span_id: span.parent_span_id,
                    attributes: span
                        .attributes
                        .iter()
                        .map(|attribute| (attribute.key.clone(), text(&attribute.value)))
                        .collect(),
                });
            }
        }
    }
    // An empty ExportTraceServiceResponse is zero bytes of protobuf.
    (axum::http::StatusCode::OK, Vec::new())
}

/// Starts the receiver; its address and what it collects.
async fn start_receiver() -> (SocketAddr, Spans) {
    let spans = Spans::default();
    let app = axum::Router::new()
        .route("/v1/traces", post(export))
        .with_state(spans.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (address, spans)
}

/// Child processes killed when the test ends, however it ends.
struct Nodes(Vec<Child>);

impl Drop for Nodes {
    fn drop(&mut self) {
        for child in &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// The trace, if any, in which a follower's request reached the leader's commit and both
/// followers appended the entry below that commit: `(follower, leader)` names it.
fn complete_trace(spans: &[Received], follower: &str, leader: &str) -> Option<Vec<u8>> {
    let by_id: HashMap<&[u8], &Received> = spans
        .iter()
        .map(|span| (span.span_id.as_slice(), span))
        .collect();
    let descends_from = |span: &Received, ancestor: &Received| {
        let mut current = span;
        for _ in 0..32 {
            if current.parent_span_id == ancestor.span_id {
                return true;
            }
            match by_id.get(current.parent_span_id.as_slice()) {
                Some(parent) => current = parent,
                None => return false,
            }
        }
        false
    };
    spans
        .iter()
        .filter(|span| span.name == "consensus.commit" && span.instance == leader)
        .find_map(|commit| {
            let trace: Vec<&Received> = spans
                .iter()
                .filter(|span| span.trace_id == commit.trace_id)
                .collect();
            let proposal = trace
                .iter()
                .find(|span| span.name == "consensus.proposal" && span.instance == follower)?;
            let request = trace.iter().find(|span| {
                span.instance == follower
                    && span.attributes.get("http.route").map(String::as_str) == Some("/kv/{key}")
            })?;
            let appenders: BTreeSet<&str> = trace
                .iter()
                .filter(|span| {
                    span.name == "consensus.append"
                        && span.instance != leader
                        && descends_from(span, commit)
                })
                .map(|span| span.instance.as_str())
                .collect();
            (descends_from(commit, proposal)
                && descends_from(proposal, request)
                && appenders.len() == 2)
                .then(|| commit.trace_id.clone())
        })
}

/// Whether an election round named `name` (`consensus.pre_vote`, `consensus.vote`) was
/// exported with its term, as a child of a `consensus.election` span of the same node.
fn election_round(spans: &[Received], name: &str) -> bool {
    spans.iter().any(|round| {
        round.name == name
            && round.attributes.contains_key("consensus.term")
            && spans.iter().any(|election| {
                election.name == "consensus.election"
                    && election.instance == round.instance
                    && election.trace_id == round.trace_id
                    && election.span_id == round.parent_span_id
            })
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_through_a_follower_is_one_trace_across_three_nodes() {
    let (receiver, spans) = start_receiver().await;
    let dir = tempfile::tempdir().unwrap();
    let ports = free_ports(6);
    let files = consensus::node::write_loopback_cluster(dir.path(), &ports).unwrap();
    let mut nodes = Nodes(Vec::new());
    for file in &files {
        let mut text = std::fs::read_to_string(&file.config).unwrap();
        text.push_str(&format!(
            "\n[telemetry]\notlp_endpoint = \"http://{receiver}\"\nservice_name = \
             \"traces-test\"\nsample_ratio = 0.0\n"
        ));
        std::fs::write(&file.config, text).unwrap();
        let child = Command::new(BINARY)
            .arg("--config")
            .arg(&file.config)
            // Export every 100 ms rather than every 5 s.
            .env("OTEL_BSP_SCHEDULE_DELAY", "100")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        nodes.0.push(child);
    }

    // Find the leader (status names nodes by id; the spans by name), then write through a
    // follower until the trace is complete.
    let until = Instant::now() + Duration::from_secs(30);
    let leader = loop {
        let mut ids = Vec::new();
        let mut leaders = BTreeSet::new();
        for file in &files {
            let status = client::request(file.http, "GET", "/status", b"", TIMEOUT).await;
            let status: Option<serde_json::Value> = status
                .ok()
                .and_then(|response| serde_json::from_slice(&response.body).ok());
            let status = status.unwrap_or_default();
            ids.push(status["node_id"].as_str().unwrap_or_default().to_owned());
            leaders.insert(status["leader"].as_str().map(str::to_owned));
        }
        if let [Some(leader)] = &leaders.into_iter().collect::<Vec<_>>()[..]
            && let Some(i) = ids.iter().position(|id| id == leader)
        {
            break files[i].name.clone();
        }
        assert!(Instant::now() < until, "no agreed leader within 30 s");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let follower = files.iter().find(|file| file.name != leader).unwrap();
    // The ratio is 0: only requests that carry a sampled `traceparent` are traced, each in the
    // caller's trace, as a child of the caller's span. Untraced writes go in between.
    let caller_span = [0xc0, 0xff, 0xee, 0, 0, 0, 0, 1];
    let mut our_traces = BTreeSet::new();
    let until = Instant::now() + Duration::from_secs(60);
    let mut written = 0u64;
    loop {
        let path = format!("/kv/traced-{written}");
        let mut trace_id = [0xab; 16];
        trace_id[8..].copy_from_slice(&written.to_be_bytes());
        our_traces.insert(trace_id.to_vec());
        let traceparent = consensus::telemetry::TraceContext {
            trace_id,
            span_id: caller_span,
            flags: 1,
        }
        .traceparent();
        let headers = [("traceparent", traceparent.as_str())];
        let response =
            client::request_with_headers(follower.http, "PUT", &path, &headers, b"value", TIMEOUT)
                .await;
        let untraced = client::request(follower.http, "PUT", "/kv/untraced", b"v", TIMEOUT).await;
        if response.is_ok_and(|response| response.status == 200)
            && untraced.is_ok_and(|response| response.status == 200)
        {
            written += 1;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        let collected = spans.lock().unwrap().clone();
        // The first election's rounds are exported too, each a child of its election span.
        if let Some(trace) = complete_trace(&collected, &follower.name, &leader)
            && election_round(&collected, "consensus.pre_vote")
            && election_round(&collected, "consensus.vote")
        {
            let in_trace: Vec<String> = collected
                .iter()
                .filter(|span| span.trace_id == trace)
                .map(|span| format!("{}@{}", span.name, span.instance))
                .collect();
            eprintln!("one trace: {in_trace:?}");
            assert!(our_traces.contains(&trace), "the trace is the caller's");
            let request = collected
                .iter()
                .find(|span| span.trace_id == trace && span.attributes.contains_key("http.route"))
                .unwrap();
            assert_eq!(
                request.parent_span_id, caller_span,
                "the caller's span is the parent"
            );
            let stray: Vec<&Received> = collected
                .iter()
                .filter(|span| {
                    matches!(
                        span.name.as_str(),
                        "consensus.proposal" | "consensus.commit"
                    ) && !our_traces.contains(&span.trace_id)
                })
                .collect();
            assert!(stray.is_empty(), "untraced writes made spans: {stray:?}");
            return;
        }
        assert!(
            Instant::now() < until,
            "after {written} writes through {} (leader {leader}), no complete trace among {} \
             spans: {:?}",
            follower.name,
            collected.len(),
            collected
                .iter()
                .map(|span| format!("{}@{}", span.name, span.instance))
                .collect::<BTreeSet<_>>()
        );
    }
}

#[path = "common/gpu.rs"]
mod gpu_common;

/// The library's exporter, installed by hand as a user would, carries a GPU dispatch span with
/// its kernel and batch size to the receiver.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gpu_dispatch_is_exported_as_a_span() {
    use consensus::gpu::{GpuVoteAggregator, Vote};
    use consensus::telemetry::TelemetryConfig;
    use tracing_subscriber::layer::SubscriberExt;

    let Some(context) = gpu_common::gpu_context_or_skip("a_gpu_dispatch_is_exported_as_a_span")
    else {
        return;
    };
    let (receiver, spans) = start_receiver().await;
    let export = TelemetryConfig {
        otlp_endpoint: Some(format!("http://{receiver}")),
        service_name: Some("gpu-test".into()),
        sample_ratio: Some(1.0),
        max_traces_per_second: None,
    }
    .resolve("gpu-node")
    .unwrap()
    .unwrap();
    let (layer, guard) = export.layer(tokio::runtime::Handle::current()).unwrap();
    let subscriber = tracing_subscriber::registry().with(layer);
    let aggregator = GpuVoteAggregator::with_context(context).expect("aggregator");
    let votes: Vec<Vote> = (0..64).map(|voter| Vote::new(voter, 7, true)).collect();
    tokio::task::spawn_blocking(move || {
        tracing::subscriber::with_default(subscriber, || {
            aggregator.aggregate_blocking(&votes).expect("tally");
        });
        guard.flush();
        drop(guard);
    })
    .await
    .unwrap();
    let until = Instant::now() + Duration::from_secs(30);
    loop {
        let found = spans.lock().unwrap().iter().any(|span| {
            span.name == "gpu.dispatch"
                && span.instance == "gpu-node"
                && span.attributes.get("gpu.kernel").map(String::as_str) == Some("vote_tally")
                && span.attributes.get("gpu.batch_size").map(String::as_str) == Some("64")
        });
        if found {
            return;
        }
        assert!(
            Instant::now() < until,
            "no gpu.dispatch span reached the receiver"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
