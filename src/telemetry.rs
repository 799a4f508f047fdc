//! Traces of the engine's work, as `tracing` spans that an OpenTelemetry layer turns into
//! OpenTelemetry spans, and the trace context that carries one proposal's trace from node to node.
//!
//! The crate never installs a subscriber: a library user installs their own (any `tracing`
//! subscriber; spans reach OpenTelemetry only through a `tracing-opentelemetry` layer), and
//! `consensus-node` installs one with an OTLP exporter when its `[telemetry]` table or
//! `OTEL_EXPORTER_OTLP_ENDPOINT` names a collector (see [`OtlpExport`], feature `otlp`).
//!
//! # What is traced
//!
//! One proposal in [`ConsensusConfig::trace_sample_ratio`](crate::ConsensusConfig) (default
//! 1 in 100, at most `trace_max_per_second`) is traced from end to end, or the ones a caller
//! chose with [`with_trace_decision`]; the others create no span at all, so that tracing costs
//! the hot path a task-local read and a thread-local addition per proposal. A traced
//! proposal's spans:
//!
//! | span | where | parent | attributes and events |
//! |---|---|---|---|
//! | `consensus.proposal` | the node a client called; ends when its client is answered | the caller's current span (the node's `PUT /kv/{key}` span) | `consensus.node`, `consensus.request_id`, `consensus.log.index`; events `forwarded` (`consensus.leader`), `appended` (`consensus.batch.entries`: the size of the write it joined, on the leader for its own proposals), `persisted` (on the leader, for its own proposals), `committed` |
//! | `consensus.commit` | the leader, for a forwarded proposal; ends at its commit | `consensus.proposal` on the forwarding node | `consensus.proposer`, `consensus.request_id`, `consensus.log.index`; events `appended`, `persisted` (`db.system.name`, `db.operation.name`, `db.client.operation.duration_us`: the fsync) |
//! | `consensus.append` | each follower that stores the entry; ends when its acknowledgement is sent | the leader's `consensus.commit` (or its `consensus.proposal`) | `consensus.leader`, `consensus.request_id`, `consensus.log.index`; events `appended`, `persisted` |
//!
//! Under PBFT the primary is the leader and a pre-prepare carries entries: the same spans, each
//! with a `prepared` event (`consensus.view`, `consensus.sequence`) when its batch is prepared
//! on that replica.
//!
//! A leader's own proposals have no commit span: their proposal span is on the leader already,
//! and one span less per traced proposal is what keeps export cheap. Work done once per batch or
//! per event is traced every time it happens (GPU dispatches, `gpu.dispatch`, target
//! `consensus::gpu`; elections and leader changes, `consensus.election` with a
//! `consensus.pre_vote` or `consensus.vote` child for each round a Raft node runs, and
//! `consensus.leader_change`, which under PBFT are view changes; snapshots and their transfers,
//! `consensus.snapshot`, `consensus.snapshot_send` and `consensus.snapshot_receive`). The
//! README's Observability section has the full table.
//!
//! # Across nodes
//!
//! A traced proposal's context crosses nodes beside the message that carries the proposal: the
//! TCP transport sends a [`TraceAttachment`] (the proposal's tag and a W3C trace context: trace
//! id, parent span id, flags) in the same frame, and the receiving driver opens its span as a
//! child of that context. tarpc's own per-call context cannot do this: one call carries a batch of
//! many nodes' proposals, of which at most a few are traced.

use std::cell::Cell;
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::types::ProposalTag;

/// A W3C trace context (<https://www.w3.org/TR/trace-context/>): the trace, the span that is the
/// parent of what the receiver does, and the trace flags (bit 0: sampled).
#[derive(Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct TraceContext {
    /// The trace id; never all zero.
    pub trace_id: [u8; 16],
    /// The parent span id; never all zero.
    pub span_id: [u8; 8],
    /// The trace flags.
    pub flags: u8,
}

impl TraceContext {
    /// The `traceparent` header value: `00-{trace id}-{span id}-{flags}` in lower-case hex.
    pub fn traceparent(&self) -> String {
        let mut text = String::with_capacity(55);
        text.push_str("00-");
        push_hex(&mut text, &self.trace_id);
        text.push('-');
        push_hex(&mut text, &self.span_id);
        text.push('-');
        push_hex(&mut text, &[self.flags]);
        text
    }

    /// Parses a `traceparent` header value of version `00` (or a later version, reading the
    /// fields version `00` defines, as the specification asks). `None` for anything malformed,
    /// including the all-zero ids the specification forbids.
    pub fn from_traceparent(header: &str) -> Option<TraceContext> {
        let mut fields = header.trim().split('-');
        let version = fields.next()?;
        let (trace_id, span_id, flags) = (fields.next()?, fields.next()?, fields.next()?);
        if version.len() != 2 || version == "ff" || (version == "00" && fields.next().is_some()) {
            return None;
        }
        let _ = parse_hex::<1>(version)?;
        let context = TraceContext {
            trace_id: parse_hex(trace_id)?,
            span_id: parse_hex(span_id)?,
            flags: parse_hex::<1>(flags)?[0],
        };
        context.is_valid().then_some(context)
    }

    /// Whether both ids are non-zero, as the specification requires.
    pub fn is_valid(&self) -> bool {
        self.trace_id != [0; 16] && self.span_id != [0; 8]
    }

    /// Whether the sampled flag is set.
    pub fn is_sampled(&self) -> bool {
        self.flags & 1 == 1
    }

    /// The OpenTelemetry context of a remote parent with these ids.
    pub fn to_otel(&self) -> opentelemetry::Context {
        use opentelemetry::trace::{
            SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState,
        };
        let span = SpanContext::new(
            TraceId::from_bytes(self.trace_id),
            SpanId::from_bytes(self.span_id),
            TraceFlags::new(self.flags),
            true,
            TraceState::default(),
        );
        opentelemetry::Context::new().with_remote_span_context(span)
    }

    /// The context of `span` as OpenTelemetry knows it, if a `tracing-opentelemetry` layer
    /// records it (otherwise there is no trace to continue).
    pub fn of_span(span: &tracing::Span) -> Option<TraceContext> {
        use opentelemetry::trace::TraceContextExt;
        use tracing_opentelemetry::OpenTelemetrySpanExt;
        if span.is_disabled() {
            return None;
        }
        let context = span.context();
        let span_context = context.span().span_context().clone();
        let context = TraceContext {
            trace_id: span_context.trace_id().to_bytes(),
            span_id: span_context.span_id().to_bytes(),
            flags: span_context.trace_flags().to_u8(),
        };
        context.is_valid().then_some(context)
    }

    /// Makes this context the parent of `span` (which must not have been entered yet).
    pub fn adopt(&self, span: &tracing::Span) {
        use tracing_opentelemetry::OpenTelemetrySpanExt;
        if !span.is_disabled() {
            // Fails only when no OpenTelemetry layer records the span: nothing to link then.
            let _ = span.set_parent(self.to_otel());
        }
    }
}

impl fmt::Debug for TraceContext {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.traceparent())
    }
}

fn push_hex(text: &mut String, bytes: &[u8]) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    for byte in bytes {
        text.push(DIGITS[usize::from(byte >> 4)] as char);
        text.push(DIGITS[usize::from(byte & 15)] as char);
    }
}

fn parse_hex<const N: usize>(text: &str) -> Option<[u8; N]> {
    let digits = text.as_bytes();
    if digits.len() != 2 * N {
        return None;
    }
    let nibble = |digit: u8| match digit {
        b'0'..=b'9' => Some(digit - b'0'),
        b'a'..=b'f' => Some(digit - b'a' + 10),
        _ => None, // upper case is invalid in a traceparent
    };
    let mut bytes = [0u8; N];
    for (byte, pair) in bytes.iter_mut().zip(digits.chunks_exact(2)) {
        *byte = nibble(pair[0])? << 4 | nibble(pair[1])?;
    }
    Some(bytes)
}

/// What travels beside a message that carries a traced proposal: which proposal, and the span
/// on the sender that is the parent of the receiver's.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TraceAttachment {
    /// The traced proposal.
    pub tag: ProposalTag,
    /// The sender's span for it.
    pub context: TraceContext,
}

impl TraceAttachment {
    /// Bytes of [`TraceAttachment::to_bytes`].
    pub const ENCODED_LEN: usize = 16 + 16 + 8 + 1;

    /// The fixed-size encoding the TCP transport sends.
    pub fn to_bytes(&self) -> [u8; Self::ENCODED_LEN] {
        let mut bytes = [0u8; Self::ENCODED_LEN];
        bytes[..8].copy_from_slice(&self.tag.proposer.0.to_le_bytes());
        bytes[8..16].copy_from_slice(&self.tag.request_id.to_le_bytes());
        bytes[16..32].copy_from_slice(&self.context.trace_id);
        bytes[32..40].copy_from_slice(&self.context.span_id);
        bytes[40] = self.context.flags;
        bytes
    }

    /// Decodes [`TraceAttachment::to_bytes`]; `None` when the context is not valid.
    pub fn from_bytes(bytes: &[u8; Self::ENCODED_LEN]) -> Option<TraceAttachment> {
        let word = |at: usize| {
            let mut word = [0u8; 8];
            word.copy_from_slice(&bytes[at..at + 8]);
            u64::from_le_bytes(word)
        };
        let mut trace_id = [0u8; 16];
        trace_id.copy_from_slice(&bytes[16..32]);
        let mut span_id = [0u8; 8];
        span_id.copy_from_slice(&bytes[32..40]);
        let context = TraceContext {
            trace_id,
            span_id,
            flags: bytes[40],
        };
        context.is_valid().then_some(TraceAttachment {
            tag: ProposalTag {
                proposer: crate::NodeId(word(0)),
                request_id: word(8),
            },
            context,
        })
    }
}

/// Picks which proposals are traced: `ratio` of them, spread evenly (every proposal at 1.0, every
/// hundredth at 0.01), and at most `max_per_second` a second on one node (shared by every clone
/// of the sampler). The ratio is counted per thread, so that a proposal that is not picked
/// costs one thread-local addition and touches no shared cache line; only a picked one reads
/// the clock and the shared count.
///
/// Why a cap: a traced proposal costs its spans (a few microseconds each to build, batch and
/// encode), so at a fixed ratio the cost of tracing grows with the load. At a million commits a
/// second, 1% is ten thousand traces a second and a quarter of a small machine; the cap keeps
/// tracing's share bounded while the ratio governs at ordinary rates.
#[derive(Clone, Debug)]
pub struct TraceSampler {
    ratio: f64,
    limit: std::sync::Arc<RateLimit>,
}

/// The per-second cap of a [`TraceSampler`].
#[derive(Debug)]
struct RateLimit {
    max_per_second: u32,
    epoch: std::time::Instant,
    /// The second (since `epoch`) the count is of, in the high 32 bits; the count, low 32.
    window: std::sync::atomic::AtomicU64,
}

impl RateLimit {
    fn admit(&self) -> bool {
        use std::sync::atomic::Ordering;
        let second = self.epoch.elapsed().as_secs() as u32;
        let mut current = self.window.load(Ordering::Relaxed);
        loop {
            let (window, count) = ((current >> 32) as u32, current as u32);
            let next = if window == second {
                if count >= self.max_per_second {
                    return false;
                }
                current + 1
            } else {
                (u64::from(second) << 32) | 1
            };
            match self.window.compare_exchange_weak(
                current,
                next,
                Ordering::Relaxed,
                Ordering::Relaxed,
            ) {
                Ok(_) => return true,
                Err(seen) => current = seen,
            }
        }
    }
}

thread_local! {
    static SAMPLING_CREDIT: Cell<f64> = const { Cell::new(0.0) };
}

impl TraceSampler {
    /// A sampler of `ratio` (clamped to `0.0..=1.0`; NaN is 0) and at most `max_per_second`
    /// picks a second.
    pub fn new(ratio: f64, max_per_second: u32) -> Self {
        TraceSampler {
            ratio: if ratio.is_nan() {
                0.0
            } else {
                ratio.clamp(0.0, 1.0)
            },
            limit: std::sync::Arc::new(RateLimit {
                max_per_second,
                epoch: std::time::Instant::now(),
                window: std::sync::atomic::AtomicU64::new(0),
            }),
        }
    }

    /// Whether the next proposal on this thread is traced.
    #[inline]
    pub fn pick(&self) -> bool {
        if self.ratio <= 0.0 {
            return false;
        }
        let picked = SAMPLING_CREDIT.with(|credit| {
            let next = credit.get() + self.ratio;
            if next >= 1.0 {
                credit.set(next - 1.0);
                true
            } else {
                credit.set(next);
                false
            }
        });
        picked && self.limit.admit()
    }
}

tokio::task_local! {
    /// Whether the proposals of the running task are traced, when its caller decided that.
    static CALLER_DECIDED: bool;
}

/// Runs `future` with its caller's decision on tracing: the proposals it makes are traced when
/// `traced` (inside a sampled span, which is then their parent), and none when not: the
/// engine's own sampler is not asked. A server that samples its requests wraps each handler in
/// this, so that a request and its proposal are picked once, not twice.
pub async fn with_trace_decision<F: std::future::Future>(traced: bool, future: F) -> F::Output {
    CALLER_DECIDED.scope(traced, future).await
}

/// The decision of [`with_trace_decision`] around the running task, if any.
pub(crate) fn caller_decision() -> Option<bool> {
    CALLER_DECIDED.try_with(|traced| *traced).ok()
}

pub mod latency_probe;
#[cfg(feature = "otlp")]
mod otlp;
#[cfg(feature = "otlp")]
pub use otlp::{OtlpExport, OtlpGuard, TelemetryConfig, TelemetryError};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traceparent_round_trips_and_rejects_what_the_specification_rejects() {
        let context = TraceContext {
            trace_id: [0x4b; 16],
            span_id: [0x0a, 1, 2, 3, 4, 5, 6, 0xff],
            flags: 1,
        };
        let header = context.traceparent();
        assert_eq!(
            header,
            "00-4b4b4b4b4b4b4b4b4b4b4b4b4b4b4b4b-0a010203040506ff-01"
        );
        assert_eq!(TraceContext::from_traceparent(&header), Some(context));
        // A later version may add fields; version 00 may not.
        let later = "01-4b4b4b4b4b4b4b4b4b4b4b4b4b4b4b4b-0a010203040506ff-01-extra";
        assert_eq!(TraceContext::from_traceparent(later), Some(context));
        for bad in [
            "",
            "00",
            "00-4b4b4b4b4b4b4b4b4b4b4b4b4b4b4b4b-0a010203040506ff-01-extra",
            "ff-4b4b4b4b4b4b4b4b4b4b4b4b4b4b4b4b-0a010203040506ff-01",
            "00-00000000000000000000000000000000-0a010203040506ff-01",
            "00-4b4b4b4b4b4b4b4b4b4b4b4b4b4b4b4b-0000000000000000-01",
            "00-4B4B4B4B4B4B4B4B4B4B4B4B4B4B4B4B-0a010203040506ff-01",
            "00-4b4b-0a010203040506ff-01",
            "00-4b4b4b4b4b4b4b4b4b4b4b4b4b4b4b4b-0a010203040506ff-1",
            "0x-4b4b4b4b4b4b4b4b4b4b4b4b4b4b4b4b-0a010203040506ff-01",
        ] {
            assert_eq!(TraceContext::from_traceparent(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn attachments_round_trip_and_invalid_contexts_are_refused() {
        let attachment = TraceAttachment {
            tag: ProposalTag {
                proposer: crate::NodeId(u64::MAX - 3),
                request_id: 77,
            },
            context: TraceContext {
                trace_id: [9; 16],
                span_id: [8; 8],
                flags: 0,
            },
        };
        assert_eq!(
            TraceAttachment::from_bytes(&attachment.to_bytes()),
            Some(attachment)
        );
        let mut zero_trace = attachment.to_bytes();
        zero_trace[16..32].fill(0);
        assert_eq!(TraceAttachment::from_bytes(&zero_trace), None);
    }

    #[test]
    fn the_sampler_picks_its_ratio_evenly() {
        for (ratio, expected) in [(0.0, 0), (0.01, 10), (0.25, 250), (1.0, 1000), (7.0, 1000)] {
            let sampler = TraceSampler::new(ratio, u32::MAX);
            // A fresh thread, so that another test's credit does not count.
            let picked = std::thread::spawn(move || (0..1000).filter(|_| sampler.pick()).count())
                .join()
                .unwrap();
            assert_eq!(picked, expected, "ratio {ratio}");
        }
        assert!(!TraceSampler::new(f64::NAN, u32::MAX).pick());
    }

    #[test]
    fn the_cap_bounds_picks_per_second_across_clones_and_threads() {
        let sampler = TraceSampler::new(1.0, 50);
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let sampler = sampler.clone();
                std::thread::spawn(move || (0..1000).filter(|_| sampler.pick()).count())
            })
            .collect();
        let picked: usize = threads.into_iter().map(|t| t.join().unwrap()).sum();
        // Within one second 50 are admitted; a run that straddles a second boundary may admit
        // one more window's worth, never more.
        assert!((50..=100).contains(&picked), "{picked} picked");
    }

    #[tokio::test]
    async fn a_callers_decision_is_seen_inside_its_future_only() {
        assert_eq!(caller_decision(), None);
        assert_eq!(
            with_trace_decision(false, async { caller_decision() }).await,
            Some(false)
        );
        assert_eq!(
            with_trace_decision(true, async { caller_decision() }).await,
            Some(true)
        );
        assert_eq!(caller_decision(), None);
    }

    #[test]
    fn without_an_opentelemetry_layer_a_span_has_no_context_to_send() {
        let subscriber = tracing_subscriber::registry();
        tracing::subscriber::with_default(subscriber, || {
            let span = tracing::info_span!("consensus.proposal");
            assert_eq!(TraceContext::of_span(&span), None);
        });
        assert_eq!(TraceContext::of_span(&tracing::Span::none()), None);
    }
}
