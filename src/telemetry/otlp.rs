//! OTLP export of the engine's traces (feature `otlp`): what `consensus-node` installs when a
//! collector is named, and what a library user may install the same way.

use std::time::Duration;

use bytes::Bytes;
use opentelemetry::trace::{Link, SpanKind, TraceId, TracerProvider as _};
use opentelemetry::{Context, KeyValue};
use opentelemetry_sdk::trace::{Sampler, SamplingResult, SdkTracerProvider, ShouldSample};
use serde::{Deserialize, Serialize};

/// The `[telemetry]` table of a node's configuration file. Every field is optional; export is
/// off unless an endpoint is named here or in `OTEL_EXPORTER_OTLP_ENDPOINT`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TelemetryConfig {
    /// The collector's OTLP/HTTP base address, such as `http://localhost:4318` (spans go to
    /// `/v1/traces` under it; an address already ending in `/v1/traces` is used as it is). When
    /// absent, `OTEL_EXPORTER_OTLP_ENDPOINT`. Only `http://`: a collector beside the node, or a
    /// local agent, is the usual set-up; say so in an issue if you need TLS to it.
    pub otlp_endpoint: Option<String>,
    /// `service.name` of the exported spans. When absent, `OTEL_SERVICE_NAME`, then
    /// `consensus-node`. The node's id is the `service.instance.id`.
    pub service_name: Option<String>,
    /// The fraction of proposals traced (`0.0..=1.0`; default 0.01), also the sampling ratio of
    /// other root spans except elections, leader changes and snapshots, which are always kept.
    pub sample_ratio: Option<f64>,
    /// At most this many proposals traced a second per node (default 200; see
    /// [`ConsensusConfig::trace_max_per_second`](crate::ConsensusConfig)); also the engine's.
    pub max_traces_per_second: Option<u32>,
}

/// Why telemetry could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    /// The endpoint is not an `http://` URL.
    #[error("telemetry: otlp_endpoint {endpoint:?} {reason}")]
    Endpoint {
        /// The endpoint given.
        endpoint: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// `sample_ratio` is outside `0.0..=1.0`.
    #[error("telemetry: sample_ratio {0} is not within 0.0..=1.0")]
    SampleRatio(f64),
    /// The exporter could not be built.
    #[error("telemetry: the OTLP exporter could not be built: {0}")]
    Exporter(String),
}

/// Default [`TelemetryConfig::sample_ratio`].
pub const DEFAULT_SAMPLE_RATIO: f64 = 0.01;

/// A resolved export: where spans go and under which names.
#[derive(Clone, Debug, PartialEq)]
pub struct OtlpExport {
    /// The full URL spans are posted to (`…/v1/traces`).
    pub traces_url: String,
    /// `service.name`.
    pub service_name: String,
    /// `service.instance.id` (the node's id).
    pub instance: String,
    /// The sampling ratio of root spans (see [`TelemetryConfig::sample_ratio`]).
    pub sample_ratio: f64,
}

impl TelemetryConfig {
    /// The sample ratio, checked.
    pub fn sample_ratio(&self) -> Result<f64, TelemetryError> {
        let ratio = self.sample_ratio.unwrap_or(DEFAULT_SAMPLE_RATIO);
        if (0.0..=1.0).contains(&ratio) {
            Ok(ratio)
        } else {
            Err(TelemetryError::SampleRatio(ratio))
        }
    }

    /// The export this table and the standard variables describe for node `instance`, or `None`
    /// when no endpoint is named (export off).
    pub fn resolve(&self, instance: &str) -> Result<Option<OtlpExport>, TelemetryError> {
        self.resolve_with(instance, |name| std::env::var(name).ok())
    }

    /// [`TelemetryConfig::resolve`] with the environment given as a function (for tests).
    pub fn resolve_with(
        &self,
        instance: &str,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Option<OtlpExport>, TelemetryError> {
        let sample_ratio = self.sample_ratio()?;
        let Some(endpoint) = self
            .otlp_endpoint
            .clone()
            .or_else(|| env("OTEL_EXPORTER_OTLP_ENDPOINT"))
            .filter(|endpoint| !endpoint.trim().is_empty())
        else {
            return Ok(None);
        };
        let endpoint = endpoint.trim();
        let invalid = |reason| TelemetryError::Endpoint {
            endpoint: endpoint.to_owned(),
            reason,
        };
        let uri: http::Uri = endpoint.parse().map_err(|_| invalid("is not a URL"))?;
        if uri.scheme_str() != Some("http") {
            return Err(invalid(
                "must start with http:// (export over TLS is not built in)",
            ));
        }
        if uri.host().is_none() {
            return Err(invalid("names no host"));
        }
        let base = endpoint.trim_end_matches('/');
        let traces_url = if base.ends_with("/v1/traces") {
            base.to_owned()
        } else {
            format!("{base}/v1/traces")
        };
        let service_name = self
            .service_name
            .clone()
            .or_else(|| env("OTEL_SERVICE_NAME"))
            .filter(|name| !name.is_empty())
            .unwrap_or_else(|| "consensus-node".to_owned());
        Ok(Some(OtlpExport {
            traces_url,
            service_name,
            instance: instance.to_owned(),
            sample_ratio,
        }))
    }
}

/// Keeps the exporter running; dropping it flushes what is buffered (waiting up to five
/// seconds) and stops it.
#[derive(Debug)]
pub struct OtlpGuard {
    provider: SdkTracerProvider,
}

impl OtlpGuard {
    /// Sends what is buffered now.
    pub fn flush(&self) {
        if let Err(error) = self.provider.force_flush() {
            tracing::debug!(%error, "telemetry: flush failed");
        }
    }
}

impl Drop for OtlpGuard {
    fn drop(&mut self) {
        let _ = self.provider.shutdown_with_timeout(Duration::from_secs(5));
    }
}

impl OtlpExport {
    /// A `tracing-opentelemetry` layer, filtered to the engine's spans (targets under
    /// `consensus`, `INFO` and up), that batches them and posts them to
    /// [`OtlpExport::traces_url`], with the guard that keeps it running. `runtime` runs the
    /// HTTP posts (the SDK's batch thread hands each one to it).
    pub fn layer<S>(
        &self,
        runtime: tokio::runtime::Handle,
    ) -> Result<(impl tracing_subscriber::Layer<S> + use<S>, OtlpGuard), TelemetryError>
    where
        S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
    {
        use opentelemetry_otlp::{WithExportConfig, WithHttpConfig};
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_protocol(opentelemetry_otlp::Protocol::HttpBinary)
            .with_endpoint(self.traces_url.clone())
            .with_timeout(Duration::from_secs(10))
            .with_http_client(HyperExportClient { runtime })
            .build()
            .map_err(|error| TelemetryError::Exporter(error.to_string()))?;
        let resource = opentelemetry_sdk::Resource::builder()
            .with_service_name(self.service_name.clone())
            .with_attribute(KeyValue::new("service.instance.id", self.instance.clone()))
            .build();
        let provider = SdkTracerProvider::builder()
            .with_batch_exporter(exporter)
            .with_sampler(ChosenOrRatio::new(self.sample_ratio))
            .with_resource(resource)
            .build();
        let tracer = provider.tracer("consensus");
        // The engine's spans only, `INFO` and up: tarpc's per-call spans would trace batches,
        // not proposals (a proposal's context travels beside its message instead), and
        // anything finer would put every debug event of the hot path through the exporter.
        let engine_spans = tracing_subscriber::filter::Targets::new()
            .with_target("consensus", tracing::Level::INFO);
        let layer = tracing_subscriber::Layer::with_filter(
            tracing_opentelemetry::layer().with_tracer(tracer),
            engine_spans,
        );
        Ok((layer, OtlpGuard { provider }))
    }
}

/// The exported spans' sampler. Spans the engine already chose (a sampled proposal and the
/// request that carries it) and rare ones worth every instance (leader changes, view changes,
/// snapshots and their transfers) are kept; other root spans are kept at the ratio, and
/// children follow their parent.
#[derive(Clone, Debug)]
struct ChosenOrRatio {
    otherwise: Sampler,
}

/// Span names kept whatever the ratio.
const ALWAYS_KEPT: [&str; 7] = [
    "consensus.proposal",
    "http.server",
    "consensus.election",
    "consensus.leader_change",
    "consensus.snapshot",
    "consensus.snapshot_send",
    "consensus.snapshot_receive",
];

impl ChosenOrRatio {
    fn new(ratio: f64) -> Self {
        ChosenOrRatio {
            otherwise: Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(ratio))),
        }
    }
}

impl ShouldSample for ChosenOrRatio {
    fn should_sample(
        &self,
        parent_context: Option<&Context>,
        trace_id: TraceId,
        name: &str,
        span_kind: &SpanKind,
        attributes: &[KeyValue],
        links: &[Link],
    ) -> SamplingResult {
        // A traced request's span is named `{method} {route}` by the time it is sampled.
        let chosen_request = *span_kind == SpanKind::Server
            && attributes
                .iter()
                .any(|attribute| attribute.key.as_str() == "http.route");
        if chosen_request || ALWAYS_KEPT.contains(&name) {
            return Sampler::AlwaysOn.should_sample(
                parent_context,
                trace_id,
                name,
                span_kind,
                attributes,
                links,
            );
        }
        self.otherwise
            .should_sample(parent_context, trace_id, name, span_kind, attributes, links)
    }
}

/// The exporter's HTTP client: hyper's HTTP/1 client connection, one per export, run on a tokio
/// runtime (the SDK's batch thread has none; it waits for the answer on a channel).
#[derive(Debug)]
struct HyperExportClient {
    runtime: tokio::runtime::Handle,
}

type HttpError = opentelemetry_http::HttpError;

#[async_trait::async_trait]
impl opentelemetry_http::HttpClient for HyperExportClient {
    async fn send_bytes(
        &self,
        request: http::Request<Bytes>,
    ) -> Result<http::Response<Bytes>, HttpError> {
        let (answer, answered) = futures::channel::oneshot::channel();
        self.runtime.spawn(async move {
            let result = tokio::time::timeout(Duration::from_secs(10), post(request))
                .await
                .unwrap_or_else(|_| Err("OTLP export timed out after 10 s".into()));
            let _ = answer.send(result);
        });
        answered.await?
    }
}

async fn post(request: http::Request<Bytes>) -> Result<http::Response<Bytes>, HttpError> {
    use http_body_util::{BodyExt, Full};
    let uri = request.uri();
    let host = uri.host().ok_or("OTLP endpoint without a host")?.to_owned();
    let port = uri.port_u16().unwrap_or(80);
    let stream = tokio::net::TcpStream::connect((host.as_str(), port)).await?;
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await?;
    tokio::spawn(connection);
    let (mut parts, body) = request.into_parts();
    // An HTTP/1 request line takes the path; the host goes in its header.
    parts.uri = parts
        .uri
        .path_and_query()
        .map(|path| path.as_str())
        .unwrap_or("/")
        .parse()?;
    parts
        .headers
        .entry(http::header::HOST)
        .or_insert(http::HeaderValue::from_str(&format!("{host}:{port}"))?);
    let response = sender
        .send_request(http::Request::from_parts(parts, Full::new(body)))
        .await?;
    let (parts, body) = response.into_parts();
    let body = body.collect().await?.to_bytes();
    Ok(http::Response::from_parts(parts, body))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env_of(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> + use<> {
        let pairs: Vec<(String, String)> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |name| {
            pairs
                .iter()
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.clone())
        }
    }

    #[test]
    fn the_file_wins_over_the_environment_and_export_is_off_without_an_endpoint() {
        let none = TelemetryConfig::default();
        assert_eq!(none.resolve_with("node-1", env_of(&[])).unwrap(), None);
        let from_env = none
            .resolve_with(
                "node-1",
                env_of(&[
                    ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4318/"),
                    ("OTEL_SERVICE_NAME", "kv"),
                ]),
            )
            .unwrap()
            .unwrap();
        assert_eq!(from_env.traces_url, "http://collector:4318/v1/traces");
        assert_eq!(from_env.service_name, "kv");
        assert_eq!(from_env.sample_ratio, DEFAULT_SAMPLE_RATIO);
        let file = TelemetryConfig {
            otlp_endpoint: Some("http://127.0.0.1:9/v1/traces".into()),
            service_name: None,
            sample_ratio: Some(1.0),
            max_traces_per_second: None,
        };
        let export = file
            .resolve_with(
                "node-2",
                env_of(&[("OTEL_EXPORTER_OTLP_ENDPOINT", "http://other:4318")]),
            )
            .unwrap()
            .unwrap();
        assert_eq!(export.traces_url, "http://127.0.0.1:9/v1/traces");
        assert_eq!(export.service_name, "consensus-node");
        assert_eq!(export.instance, "node-2");
    }

    #[test]
    fn bad_endpoints_and_ratios_are_typed_errors() {
        for endpoint in [
            "https://collector:4318",
            "not a url",
            "collector:4318",
            "/v1",
        ] {
            let config = TelemetryConfig {
                otlp_endpoint: Some(endpoint.into()),
                ..TelemetryConfig::default()
            };
            assert!(
                matches!(
                    config.resolve_with("n", env_of(&[])),
                    Err(TelemetryError::Endpoint { .. })
                ),
                "{endpoint}"
            );
        }
        for ratio in [-0.1, 1.5, f64::NAN] {
            let config = TelemetryConfig {
                sample_ratio: Some(ratio),
                ..TelemetryConfig::default()
            };
            assert!(matches!(
                config.resolve_with("n", env_of(&[])),
                Err(TelemetryError::SampleRatio(_))
            ));
        }
    }

    #[test]
    fn chosen_spans_are_kept_and_other_roots_follow_the_ratio() {
        use opentelemetry_sdk::trace::SamplingDecision;
        let sampler = ChosenOrRatio::new(0.0);
        let decide = |name: &str| {
            sampler
                .should_sample(
                    None,
                    TraceId::from_bytes([7; 16]),
                    name,
                    &SpanKind::Internal,
                    &[],
                    &[],
                )
                .decision
        };
        assert_eq!(
            decide("consensus.proposal"),
            SamplingDecision::RecordAndSample
        );
        assert_eq!(decide("http.server"), SamplingDecision::RecordAndSample);
        assert_eq!(decide("gpu.dispatch"), SamplingDecision::Drop);
    }
}
