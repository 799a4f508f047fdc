//! Engine metrics: a cheap snapshot for [`ConsensusEngine::metrics`](crate::ConsensusEngine::metrics)
//! and a Prometheus registry carrying the spec's six metric names (plus a few more).
//!
//! The driver thread updates atomics and prometheus-client metrics (themselves atomics), so
//! readers never block the protocol.
//!
//! Every family is registered and exported from the start, because the product spec promises the
//! names. `consensus_gpu_cpu_fallbacks_total` counts the GPU batches (signature checks, vote
//! counts) that the engine's GPU context answered on the CPU instead (a lost device, a failed
//! or timed-out dispatch); it stays at zero on an engine without `gpu_enabled`.
//! `consensus_byzantine_detections_total` counts replicas proven Byzantine (once each).
//! `consensus_vote_processing_duration_seconds` times, under the algorithms that sign (PBFT,
//! GPU-optimized Raft), each driver round's batch of signature checks together with the
//! stepping of the round, where its votes and acknowledgements are counted in one aggregator
//! batch (Raft checks and batches nothing, and records none).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use prometheus_client::encoding::text::encode;
use prometheus_client::encoding::{EncodeMetric, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::metrics::{MetricType, TypedMetric};
use prometheus_client::registry::Registry;

use crate::protocol::InvalidReason;
use crate::types::NodeId;

/// Reads a running count kept elsewhere (a TCP transport's rejected frames, a GPU context's
/// fallbacks or submissions).
pub(crate) type RunningTotal = Box<dyn Fn() -> u64 + Send + Sync>;

/// A watched running count, and how much of it was counted already.
#[derive(Default)]
struct TotalWatch {
    read: Option<RunningTotal>,
    counted: u64,
}

impl std::fmt::Debug for TotalWatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TotalWatch")
            .field("watching", &self.read.is_some())
            .field("counted", &self.counted)
            .finish()
    }
}

impl TotalWatch {
    /// Watches `read` from now on, from zero.
    fn start(watch: &std::sync::Mutex<TotalWatch>, read: RunningTotal) {
        *crate::sync::lock(watch) = TotalWatch {
            read: Some(read),
            counted: 0,
        };
    }

    /// How much the watched total grew since the last call (0 when nothing is watched).
    fn news(watch: &std::sync::Mutex<TotalWatch>) -> u64 {
        let mut watch = crate::sync::lock(watch);
        let Some(total) = watch.read.as_ref().map(|read| read()) else {
            return 0;
        };
        let news = total.saturating_sub(watch.counted);
        watch.counted = watch.counted.max(total);
        news
    }
}

/// The `outcome` label of `consensus_proposals_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
struct OutcomeLabel {
    outcome: &'static str,
}

/// The `follower` label of `consensus_replication_lag_entries`: the member's configured name.
#[derive(Clone, Debug, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
struct FollowerLabel {
    follower: String,
}

/// The `from` label of `consensus_peer_messages_received_total`: the sender's name.
#[derive(Clone, Debug, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
struct SenderLabel {
    from: String,
}

/// The `source` label of `consensus_snapshots_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
struct SourceLabel {
    source: &'static str,
}

/// The `reason` label of `consensus_invalid_messages_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
struct ReasonLabel {
    reason: &'static str,
}

/// Live metrics of one engine, shared between the driver and readers.
#[derive(Debug)]
pub struct Metrics {
    started: Instant,
    term: Gauge,
    committed_index: Gauge,
    applied_index: Gauge,
    proposal_latency: LatencyHistogram,
    /// `consensus_vote_processing_duration_seconds`: each round's signature checks and vote
    /// counting (signing algorithms only).
    vote_processing: Histogram,
    leader_changes: Counter,
    /// `consensus_byzantine_detections_total`: replicas proven Byzantine, once per offender
    /// (forged messages prove nothing and count in `consensus_invalid_messages_total`).
    byzantine_detections: Counter,
    /// `consensus_invalid_messages_total{reason}`: peer messages dropped unread, by
    /// [`InvalidReason`] (never evidence: anyone can forge a bad signature in another's name).
    invalid_messages: Family<ReasonLabel, Counter>,
    /// Where the TCP transport's count of connections it closed for a malformed or oversized
    /// frame is read, and how much of it was already added (as `reason="malformed"`).
    rejected_frames: std::sync::Mutex<TotalWatch>,
    /// `consensus_proposals_total{outcome}`: this node's clients' proposals by outcome; the
    /// four series' counters are held here so that counting needs no label lookup.
    proposals_committed: Counter,
    proposals_rejected: Counter,
    proposals_timed_out: Counter,
    proposals_stopped: Counter,
    /// `consensus_fsync_duration_seconds`: one durable write of the log store (its fsync
    /// included), for each batch the driver persists.
    fsync_duration: LatencyHistogram,
    /// `consensus_replication_lag_entries{follower}`: on the leader, entries each follower is
    /// not known to hold; no series elsewhere.
    replication_lag: Family<FollowerLabel, Gauge>,
    /// `consensus_peer_messages_received_total{from}`: messages the TCP transport handed to the
    /// driver, by authenticated sender.
    peer_messages: Family<SenderLabel, Counter>,
    /// Names of the members by id, for the `follower` and `from` labels.
    member_names: std::sync::Mutex<std::collections::HashMap<NodeId, String>>,
    /// `consensus_gpu_dispatches_total`: command buffers the engine's GPU context submitted.
    gpu_dispatches: Counter,
    gpu_dispatch_watch: std::sync::Mutex<TotalWatch>,
    /// `consensus_gpu_cpu_fallbacks_total`: GPU batches answered on the CPU instead, as the
    /// engine's [`GpuContext`](crate::gpu::GpuContext) counts them (read when the metrics are).
    gpu_cpu_fallbacks: Counter,
    gpu_fallback_watch: std::sync::Mutex<TotalWatch>,
    /// `consensus_log_entries`: entries the log holds (after the snapshot), and the most it
    /// held since start.
    log_entries: Gauge,
    log_entries_max: AtomicU64,
    /// `consensus_snapshot_blocked_seconds`: how long the driver stopped to capture each
    /// snapshot it took (the state machine's copy-on-write capture; the serialization runs on
    /// a thread of its own).
    snapshot_blocked: LatencyHistogram,
    /// The longest of those, for [`MetricsSnapshot::snapshot_blocked_max`].
    snapshot_blocked_max_nanos: AtomicU64,
    /// `consensus_snapshot_duration_seconds`: each snapshot's serialization, off the driver.
    snapshot_duration: LatencyHistogram,
    /// `consensus_snapshot_size_bytes`: the size of the latest snapshot taken or installed.
    snapshot_size: Gauge,
    /// `consensus_snapshots_total{source}`: snapshots taken here (`taken`) and installed from
    /// a leader (`installed`).
    snapshots_taken: Counter,
    snapshots_installed: Counter,
    latency_total_nanos: AtomicU64,
    latency_count: AtomicU64,
    /// With `vote_count`, the mean behind [`MetricsSnapshot::vote_processing_time`]; zero until
    /// vote processing is recorded.
    vote_total_nanos: AtomicU64,
    vote_count: AtomicU64,
    registry: Registry,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Fresh metrics with every series registered.
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let term = Gauge::default();
        let committed_index = Gauge::default();
        let applied_index = Gauge::default();
        let proposal_latency = LatencyHistogram::new(exponential_buckets(10e-6, 2.0, 20));
        let vote_processing = Histogram::new(exponential_buckets(1e-6, 2.0, 24));
        let leader_changes = Counter::default();
        let byzantine_detections = Counter::default();
        let invalid_messages = Family::<ReasonLabel, Counter>::default();
        // Every reason is exported from the start, at zero.
        for reason in InvalidReason::ALL {
            drop(invalid_messages.get_or_create(&ReasonLabel {
                reason: reason.as_str(),
            }));
        }
        let proposals = Family::<OutcomeLabel, Counter>::default();
        let outcome = |outcome| proposals.get_or_create(&OutcomeLabel { outcome }).clone();
        let proposals_committed = outcome("committed");
        let proposals_rejected = outcome("rejected");
        let proposals_timed_out = outcome("timed_out");
        let proposals_stopped = outcome("stopped");
        let fsync_duration = LatencyHistogram::new(exponential_buckets(10e-6, 2.0, 20));
        let replication_lag = Family::<FollowerLabel, Gauge>::default();
        let peer_messages = Family::<SenderLabel, Counter>::default();
        let gpu_dispatches = Counter::default();
        let gpu_cpu_fallbacks = Counter::default();
        let log_entries = Gauge::default();
        let snapshot_blocked = LatencyHistogram::new(exponential_buckets(1e-6, 2.0, 24));
        let snapshot_duration = LatencyHistogram::new(exponential_buckets(1e-4, 2.0, 20));
        let snapshot_size = Gauge::default();
        let snapshots = Family::<SourceLabel, Counter>::default();
        let source = |source| snapshots.get_or_create(&SourceLabel { source }).clone();
        let snapshots_taken = source("taken");
        let snapshots_installed = source("installed");
        registry.register(
            "consensus_term_current",
            "Current term (or view)",
            term.clone(),
        );
        registry.register(
            "consensus_committed_index",
            "Highest committed log index",
            committed_index.clone(),
        );
        registry.register(
            "consensus_applied_index",
            "Highest log index applied to the state machine",
            applied_index.clone(),
        );
        registry.register(
            "consensus_proposal_latency_seconds",
            "Time from a proposal's submission to its commit and apply",
            proposal_latency.clone(),
        );
        registry.register(
            "consensus_vote_processing_duration_seconds",
            "Time spent aggregating or verifying a batch of votes",
            vote_processing.clone(),
        );
        registry.register(
            "consensus_leader_changes",
            "Times this node saw the leader change",
            leader_changes.clone(),
        );
        registry.register(
            "consensus_byzantine_detections",
            "Byzantine behaviours detected (equivocations, forged messages)",
            byzantine_detections.clone(),
        );
        registry.register(
            "consensus_invalid_messages",
            "Peer messages dropped unread, by reason (bad_signature, unknown_signer, malformed, stale, excluded)",
            invalid_messages.clone(),
        );
        registry.register(
            "consensus_proposals",
            "Proposals of this node's clients by outcome: committed (and applied), rejected \
             (refused, never appended), timed_out (deadline passed, outcome unknown), stopped \
             (the engine stopped first)",
            proposals,
        );
        registry.register(
            "consensus_fsync_duration_seconds",
            "Time to write one batch of the log durably, fsync included",
            fsync_duration.clone(),
        );
        registry.register(
            "consensus_replication_lag_entries",
            "On the leader: entries of its log each follower is not known to hold",
            replication_lag.clone(),
        );
        registry.register(
            "consensus_peer_messages_received",
            "Peer messages handed to the protocol, by sender (over TCP: the sender its TLS \
             certificate names)",
            peer_messages.clone(),
        );
        registry.register(
            "consensus_gpu_dispatches",
            "GPU command buffers submitted (signature checks, vote counts)",
            gpu_dispatches.clone(),
        );
        registry.register(
            "consensus_gpu_cpu_fallbacks",
            "GPU calls answered by the CPU backend after a timeout or a lost device",
            gpu_cpu_fallbacks.clone(),
        );
        registry.register(
            "consensus_log_entries",
            "Entries the log holds (after the latest snapshot, where the log is compacted)",
            log_entries.clone(),
        );
        registry.register(
            "consensus_snapshot_blocked_seconds",
            "Time the driver stopped to capture a snapshot (serialization runs beside it)",
            snapshot_blocked.clone(),
        );
        registry.register(
            "consensus_snapshot_duration_seconds",
            "Time to serialize one snapshot, on a thread beside the driver",
            snapshot_duration.clone(),
        );
        registry.register(
            "consensus_snapshot_size_bytes",
            "Size of the latest snapshot taken or installed",
            snapshot_size.clone(),
        );
        registry.register(
            "consensus_snapshots",
            "Snapshots taken on this node (source=taken) and installed from a leader \
             (source=installed)",
            snapshots,
        );
        Metrics {
            started: Instant::now(),
            term,
            committed_index,
            applied_index,
            proposal_latency,
            vote_processing,
            leader_changes,
            byzantine_detections,
            invalid_messages,
            rejected_frames: std::sync::Mutex::default(),
            gpu_fallback_watch: std::sync::Mutex::default(),
            proposals_committed,
            proposals_rejected,
            proposals_timed_out,
            proposals_stopped,
            fsync_duration,
            replication_lag,
            peer_messages,
            member_names: std::sync::Mutex::default(),
            gpu_dispatches,
            gpu_dispatch_watch: std::sync::Mutex::default(),
            gpu_cpu_fallbacks,
            log_entries,
            log_entries_max: AtomicU64::new(0),
            snapshot_blocked,
            snapshot_blocked_max_nanos: AtomicU64::new(0),
            snapshot_duration,
            snapshot_size,
            snapshots_taken,
            snapshots_installed,
            latency_total_nanos: AtomicU64::new(0),
            latency_count: AtomicU64::new(0),
            vote_total_nanos: AtomicU64::new(0),
            vote_count: AtomicU64::new(0),
            registry,
        }
    }

    pub(crate) fn set_term(&self, term: u64) {
        self.term.set(i64::try_from(term).unwrap_or(i64::MAX));
    }

    pub(crate) fn set_committed_index(&self, index: u64) {
        self.committed_index
            .set(i64::try_from(index).unwrap_or(i64::MAX));
    }

    pub(crate) fn set_applied_index(&self, index: u64) {
        self.applied_index
            .set(i64::try_from(index).unwrap_or(i64::MAX));
    }

    #[cfg(test)]
    pub(crate) fn record_commit(&self, latency: Duration) {
        self.record_commits(latency, 1);
    }

    /// Records `count` proposals committed with the same `latency` (the driver answers the
    /// requests of one round together, and they share their submit time): one update of each
    /// series per round instead of per proposal.
    pub(crate) fn record_commits(&self, latency: Duration, count: u64) {
        if count == 0 {
            return;
        }
        self.proposals_committed.inc_by(count);
        self.proposal_latency.observe_many(latency, count);
        let nanos = u64::try_from(latency.as_nanos()).unwrap_or(u64::MAX);
        self.latency_total_nanos
            .fetch_add(nanos.saturating_mul(count), Ordering::Relaxed);
        self.latency_count.fetch_add(count, Ordering::Relaxed);
    }

    pub(crate) fn record_rejection(&self) {
        self.proposals_rejected.inc();
    }

    /// Records a proposal whose deadline passed before its outcome was known.
    pub(crate) fn record_timeout(&self) {
        self.proposals_timed_out.inc();
    }

    /// Records a proposal the engine stopped before answering.
    pub(crate) fn record_stopped(&self) {
        self.proposals_stopped.inc();
    }

    /// Records one durable write of the log store.
    pub(crate) fn record_fsync(&self, duration: Duration) {
        self.fsync_duration.observe_many(duration, 1);
    }

    pub(crate) fn set_log_entries(&self, entries: u64) {
        self.log_entries
            .set(i64::try_from(entries).unwrap_or(i64::MAX));
        self.log_entries_max.fetch_max(entries, Ordering::Relaxed);
    }

    /// The driver stopped for `blocked` to capture a snapshot.
    pub(crate) fn record_snapshot_capture(&self, blocked: Duration) {
        self.snapshot_blocked.observe_many(blocked, 1);
        let nanos = u64::try_from(blocked.as_nanos()).unwrap_or(u64::MAX);
        self.snapshot_blocked_max_nanos
            .fetch_max(nanos, Ordering::Relaxed);
    }

    /// A snapshot of `bytes` was serialized in `took`, beside the driver.
    pub(crate) fn record_snapshot_taken(&self, bytes: usize, took: Duration) {
        self.snapshot_duration.observe_many(took, 1);
        self.snapshot_size
            .set(i64::try_from(bytes).unwrap_or(i64::MAX));
        self.snapshots_taken.inc();
    }

    /// A leader's snapshot of `bytes` was installed.
    pub(crate) fn record_snapshot_installed(&self, bytes: usize) {
        self.snapshot_size
            .set(i64::try_from(bytes).unwrap_or(i64::MAX));
        self.snapshots_installed.inc();
    }

    /// Names the members for the `follower` label (ids without a name show as `n<id>`).
    pub(crate) fn set_member_names(&self, names: impl IntoIterator<Item = (NodeId, String)>) {
        *crate::sync::lock(&self.member_names) = names.into_iter().collect();
    }

    /// The counter of messages received from `sender`; the caller keeps it, so that counting
    /// a message is one atomic add.
    pub(crate) fn peer_messages_from(&self, sender: NodeId) -> Counter {
        let from = self.name_of(sender);
        self.peer_messages
            .get_or_create(&SenderLabel { from })
            .clone()
    }

    fn name_of(&self, id: NodeId) -> String {
        crate::sync::lock(&self.member_names)
            .get(&id)
            .cloned()
            .unwrap_or_else(|| id.to_string())
    }

    /// Sets each follower's replication lag (see [`Protocol::replication_lag`]); an empty list
    /// (not the leader) removes the series.
    ///
    /// [`Protocol::replication_lag`]: crate::protocol::Protocol::replication_lag
    pub(crate) fn set_replication_lag(&self, lags: &[(NodeId, u64)]) {
        if lags.is_empty() {
            self.replication_lag.clear();
            return;
        }
        let names = crate::sync::lock(&self.member_names);
        for &(id, lag) in lags {
            let follower = names.get(&id).cloned().unwrap_or_else(|| id.to_string());
            self.replication_lag
                .get_or_create(&FollowerLabel { follower })
                .set(i64::try_from(lag).unwrap_or(i64::MAX));
        }
    }

    pub(crate) fn record_leader_change(&self) {
        self.leader_changes.inc();
    }

    /// Records one batch of vote aggregation or signature verification.
    pub(crate) fn record_vote_processing(&self, duration: Duration) {
        self.vote_processing.observe(duration.as_secs_f64());
        let nanos = u64::try_from(duration.as_nanos()).unwrap_or(u64::MAX);
        self.vote_total_nanos.fetch_add(nanos, Ordering::Relaxed);
        self.vote_count.fetch_add(1, Ordering::Relaxed);
    }

    /// Records `count` peer messages dropped for `reason`.
    pub(crate) fn record_invalid_messages(&self, reason: InvalidReason, count: u64) {
        if count > 0 {
            self.invalid_messages
                .get_or_create(&ReasonLabel {
                    reason: reason.as_str(),
                })
                .inc_by(count);
        }
    }

    /// Counts, as `reason="malformed"`, the connections a TCP transport closes for a frame
    /// that is oversized or does not decode: `rejected` reads its running total (read when
    /// the metrics are).
    pub(crate) fn watch_rejected_frames(&self, rejected: RunningTotal) {
        TotalWatch::start(&self.rejected_frames, rejected);
    }

    /// Counts the GPU batches answered on the CPU: `fallbacks` reads the GPU context's running
    /// total (read when the metrics are).
    #[cfg(feature = "gpu")]
    pub(crate) fn watch_gpu_fallbacks(&self, fallbacks: RunningTotal) {
        TotalWatch::start(&self.gpu_fallback_watch, fallbacks);
    }

    /// Counts the GPU context's submissions: `dispatches` reads its running total.
    #[cfg(feature = "gpu")]
    pub(crate) fn watch_gpu_dispatches(&self, dispatches: RunningTotal) {
        TotalWatch::start(&self.gpu_dispatch_watch, dispatches);
    }

    /// Adds the GPU fallbacks and dispatches since the last read.
    fn sync_gpu_fallbacks(&self) {
        self.gpu_dispatches
            .inc_by(TotalWatch::news(&self.gpu_dispatch_watch));
        self.gpu_cpu_fallbacks
            .inc_by(TotalWatch::news(&self.gpu_fallback_watch));
    }

    /// Adds what the watched transport rejected since the last read.
    fn sync_rejected_frames(&self) {
        let news = TotalWatch::news(&self.rejected_frames);
        self.record_invalid_messages(InvalidReason::Malformed, news);
    }

    fn invalid_messages_total(&self) -> u64 {
        InvalidReason::ALL
            .into_iter()
            .map(|reason| {
                self.invalid_messages
                    .get_or_create(&ReasonLabel {
                        reason: reason.as_str(),
                    })
                    .get()
            })
            .sum()
    }

    /// Records a replica proven Byzantine (once per offender).
    pub(crate) fn record_byzantine_detection(&self) {
        self.byzantine_detections.inc();
    }

    /// Records a GPU call answered by the CPU.
    #[allow(
        dead_code,
        reason = "the GPU-optimized Raft issue calls it from the engine"
    )]
    pub(crate) fn record_gpu_fallback(&self) {
        self.gpu_cpu_fallbacks.inc();
    }

    /// A consistent-enough point-in-time view.
    pub fn snapshot(&self) -> MetricsSnapshot {
        self.sync_rejected_frames();
        self.sync_gpu_fallbacks();
        let average = |total: &AtomicU64, count: &AtomicU64| {
            let count = count.load(Ordering::Relaxed);
            Duration::from_nanos(
                total
                    .load(Ordering::Relaxed)
                    .checked_div(count)
                    .unwrap_or(0),
            )
        };
        let committed = self.proposals_committed.get();
        let elapsed = self.started.elapsed().as_secs_f64().max(1e-9);
        MetricsSnapshot {
            current_term: u64::try_from(self.term.get()).unwrap_or(0),
            last_committed_index: u64::try_from(self.committed_index.get()).unwrap_or(0),
            last_applied_index: u64::try_from(self.applied_index.get()).unwrap_or(0),
            throughput: committed as f64 / elapsed,
            average_latency: average(&self.latency_total_nanos, &self.latency_count),
            vote_processing_time: average(&self.vote_total_nanos, &self.vote_count),
            vote_processing_total: Duration::from_nanos(
                self.vote_total_nanos.load(Ordering::Relaxed),
            ),
            proposals_committed: committed,
            proposals_rejected: self.proposals_rejected.get(),
            leader_changes: self.leader_changes.get(),
            byzantine_detections: self.byzantine_detections.get(),
            invalid_messages: self.invalid_messages_total(),
            gpu_cpu_fallbacks: self.gpu_cpu_fallbacks.get(),
            log_entries: u64::try_from(self.log_entries.get()).unwrap_or(0),
            log_entries_max: self.log_entries_max.load(Ordering::Relaxed),
            snapshot_bytes: u64::try_from(self.snapshot_size.get()).unwrap_or(0),
            snapshots_taken: self.snapshots_taken.get(),
            snapshots_installed: self.snapshots_installed.get(),
            snapshot_blocked_max: Duration::from_nanos(
                self.snapshot_blocked_max_nanos.load(Ordering::Relaxed),
            ),
        }
    }

    /// The Prometheus text exposition of every series.
    pub fn encode_prometheus(&self) -> String {
        self.sync_rejected_frames();
        self.sync_gpu_fallbacks();
        let mut text = String::new();
        // Writing into a String cannot fail.
        encode(&mut text, &self.registry).expect("formatting into a String");
        text
    }
}

/// A latency histogram that takes many equal observations at once, on atomics.
///
/// prometheus-client's [`Histogram`] takes a write lock per observation and has no way to add
/// several; the driver records the latency of a whole round of answers, so it would take that
/// lock once per proposal. This one counts in nanoseconds and reports seconds.
#[derive(Clone, Debug)]
struct LatencyHistogram {
    inner: Arc<LatencyHistogramInner>,
}

#[derive(Debug)]
struct LatencyHistogramInner {
    /// Upper bounds in seconds, ascending, the last one `f64::MAX` (the `+Inf` bucket).
    upper_bounds: Vec<f64>,
    /// The same bounds in nanoseconds, for the comparison on the hot path.
    upper_bounds_nanos: Vec<u64>,
    /// Observations per bucket (not cumulative: the encoder accumulates).
    counts: Vec<AtomicU64>,
    sum_nanos: AtomicU64,
    count: AtomicU64,
}

impl LatencyHistogram {
    /// A histogram with the given upper bounds in seconds, plus `+Inf`.
    fn new(upper_bounds: impl IntoIterator<Item = f64>) -> Self {
        let upper_bounds: Vec<f64> = upper_bounds
            .into_iter()
            .chain(std::iter::once(f64::MAX))
            .collect();
        let upper_bounds_nanos = upper_bounds
            .iter()
            .map(|&seconds| {
                if seconds >= u64::MAX as f64 / 1e9 {
                    u64::MAX
                } else {
                    (seconds * 1e9) as u64
                }
            })
            .collect();
        let counts = upper_bounds.iter().map(|_| AtomicU64::new(0)).collect();
        LatencyHistogram {
            inner: Arc::new(LatencyHistogramInner {
                upper_bounds,
                upper_bounds_nanos,
                counts,
                sum_nanos: AtomicU64::new(0),
                count: AtomicU64::new(0),
            }),
        }
    }

    /// Adds `count` observations of `latency`.
    fn observe_many(&self, latency: Duration, count: u64) {
        let inner = &*self.inner;
        let nanos = u64::try_from(latency.as_nanos()).unwrap_or(u64::MAX);
        let bucket = inner
            .upper_bounds_nanos
            .iter()
            .position(|&bound| nanos <= bound)
            .unwrap_or(inner.counts.len() - 1);
        inner.counts[bucket].fetch_add(count, Ordering::Relaxed);
        inner
            .sum_nanos
            .fetch_add(nanos.saturating_mul(count), Ordering::Relaxed);
        inner.count.fetch_add(count, Ordering::Relaxed);
    }
}

impl TypedMetric for LatencyHistogram {
    const TYPE: MetricType = MetricType::Histogram;
}

impl EncodeMetric for LatencyHistogram {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        let inner = &*self.inner;
        let buckets: Vec<(f64, u64)> = inner
            .upper_bounds
            .iter()
            .zip(&inner.counts)
            .map(|(&bound, count)| (bound, count.load(Ordering::Relaxed)))
            .collect();
        // Read apart from the buckets, so a scrape during a round may see them a round apart:
        // as with any lock-free histogram, consistent enough for monitoring.
        let sum = inner.sum_nanos.load(Ordering::Relaxed) as f64 / 1e9;
        let count = inner.count.load(Ordering::Relaxed);
        encoder.encode_histogram::<NoLabelSet>(sum, count, &buckets, None)
    }

    fn metric_type(&self) -> MetricType {
        Self::TYPE
    }
}

/// Metrics at one moment, with the seed's accessor names.
#[derive(Clone, Debug, PartialEq)]
pub struct MetricsSnapshot {
    current_term: u64,
    last_committed_index: u64,
    /// The highest log index applied on this node.
    pub last_applied_index: u64,
    throughput: f64,
    average_latency: Duration,
    vote_processing_time: Duration,
    /// Total time spent in vote aggregation and signature verification batches since start.
    pub vote_processing_total: Duration,
    /// Proposals of this node's clients committed since start.
    pub proposals_committed: u64,
    /// Proposals of this node's clients refused since start.
    pub proposals_rejected: u64,
    /// Leader changes seen since start.
    pub leader_changes: u64,
    /// Replicas proven Byzantine since start (once per offender).
    pub byzantine_detections: u64,
    /// Peer messages dropped unread since start, for any reason (see
    /// [`InvalidReason`]; the Prometheus counter has them by reason).
    pub invalid_messages: u64,
    /// GPU calls answered by the CPU since start. Zero until the GPU-optimized Raft issue runs
    /// GPU batches from the engine.
    pub gpu_cpu_fallbacks: u64,
    /// Entries this node's log holds: under Raft with snapshots, those after the snapshot
    /// before the latest (see
    /// [`ConsensusConfig::snapshot_interval`](crate::ConsensusConfig::snapshot_interval)).
    pub log_entries: u64,
    /// The most entries this node's log held at once since start.
    pub log_entries_max: u64,
    /// The size of the latest snapshot taken or installed here (zero before the first).
    pub snapshot_bytes: u64,
    /// Snapshots this node took since start (see
    /// [`ConsensusConfig::snapshot_interval`](crate::ConsensusConfig::snapshot_interval)).
    pub snapshots_taken: u64,
    /// Snapshots installed from a leader since start (this node had fallen behind its log).
    pub snapshots_installed: u64,
    /// The longest the driver stopped to capture one snapshot (zero before the first).
    pub snapshot_blocked_max: Duration,
}

impl MetricsSnapshot {
    /// The node's current term.
    pub fn current_term(&self) -> u64 {
        self.current_term
    }
    /// The highest committed log index the node knows.
    pub fn last_committed_index(&self) -> u64 {
        self.last_committed_index
    }
    /// Proposals of this node's clients committed per second since the engine started.
    pub fn throughput(&self) -> f64 {
        self.throughput
    }
    /// Mean time from submission to commit and apply of this node's clients' proposals.
    pub fn average_latency(&self) -> Duration {
        self.average_latency
    }
    /// Mean time per batch of vote aggregation or signature verification: each driver round's
    /// signature checks under PBFT; zero under Raft until the GPU-optimized Raft issue records
    /// its vote batches.
    pub fn vote_processing_time(&self) -> Duration {
        self.vote_processing_time
    }
}

/// Shared handle to an engine's metrics.
pub type SharedMetrics = Arc<Metrics>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_six_spec_metric_names_are_exported() {
        let metrics = Metrics::new();
        metrics.record_commit(Duration::from_micros(50));
        metrics.record_leader_change();
        let text = metrics.encode_prometheus();
        for name in [
            "consensus_term_current",
            "consensus_committed_index",
            "consensus_proposal_latency_seconds",
            "consensus_vote_processing_duration_seconds",
            "consensus_leader_changes_total",
            "consensus_byzantine_detections_total",
        ] {
            assert!(
                text.contains(&format!("# TYPE {name}")) || text.contains(name),
                "{name}"
            );
            assert!(
                text.lines().any(|l| l.starts_with(name)),
                "{name} has no sample:\n{text}"
            );
        }
    }

    #[test]
    fn families_nothing_records_yet_are_exported_at_zero() {
        let text = Metrics::new().encode_prometheus();
        for sample in [
            "consensus_byzantine_detections_total 0",
            "consensus_gpu_cpu_fallbacks_total 0",
            "consensus_gpu_dispatches_total 0",
            "consensus_vote_processing_duration_seconds_count 0",
            "consensus_fsync_duration_seconds_count 0",
            "consensus_proposals_total{outcome=\"timed_out\"} 0",
        ] {
            assert!(text.lines().any(|l| l == sample), "{sample}:\n{text}");
        }
    }

    #[test]
    fn proposals_by_outcome_fsyncs_and_replication_lag_by_follower_name() {
        let metrics = Metrics::new();
        metrics.record_commits(Duration::from_micros(20), 2);
        metrics.record_rejection();
        metrics.record_timeout();
        metrics.record_stopped();
        metrics.record_stopped();
        metrics.record_fsync(Duration::from_micros(70));
        metrics.set_member_names([(NodeId(2), "node-2".to_string())]);
        metrics.set_replication_lag(&[(NodeId(2), 5), (NodeId(3), 0)]);
        let text = metrics.encode_prometheus();
        for sample in [
            "consensus_proposals_total{outcome=\"committed\"} 2",
            "consensus_proposals_total{outcome=\"rejected\"} 1",
            "consensus_proposals_total{outcome=\"timed_out\"} 1",
            "consensus_proposals_total{outcome=\"stopped\"} 2",
            "consensus_fsync_duration_seconds_count 1",
            "consensus_fsync_duration_seconds_bucket{le=\"0.00008\"} 1",
            "consensus_fsync_duration_seconds_bucket{le=\"0.00004\"} 0",
            "consensus_replication_lag_entries{follower=\"node-2\"} 5",
            "consensus_replication_lag_entries{follower=\"n3\"} 0",
            "# TYPE consensus_replication_lag_entries gauge",
            "# TYPE consensus_fsync_duration_seconds histogram",
        ] {
            assert!(text.lines().any(|l| l == sample), "{sample}:\n{text}");
        }
        let snapshot = metrics.snapshot();
        assert_eq!(
            (snapshot.proposals_committed, snapshot.proposals_rejected),
            (2, 1)
        );
        // No longer the leader: the lag series go.
        metrics.set_replication_lag(&[]);
        assert!(
            !metrics
                .encode_prometheus()
                .contains("consensus_replication_lag_entries{")
        );
    }

    #[test]
    fn invalid_messages_are_counted_by_reason_and_rejected_frames_as_malformed() {
        let metrics = Metrics::new();
        let text = metrics.encode_prometheus();
        for reason in InvalidReason::ALL {
            let sample = format!(
                "consensus_invalid_messages_total{{reason=\"{}\"}} 0",
                reason.as_str()
            );
            assert!(text.lines().any(|l| l == sample), "{sample}:\n{text}");
        }
        metrics.record_invalid_messages(InvalidReason::BadSignature, 3);
        metrics.record_invalid_messages(InvalidReason::Stale, 2);
        let frames = Arc::new(AtomicU64::new(4));
        let read = frames.clone();
        metrics.watch_rejected_frames(Box::new(move || read.load(Ordering::Relaxed)));
        assert_eq!(metrics.snapshot().invalid_messages, 3 + 2 + 4);
        frames.store(5, Ordering::Relaxed);
        let text = metrics.encode_prometheus();
        for sample in [
            r#"consensus_invalid_messages_total{reason="bad_signature"} 3"#,
            r#"consensus_invalid_messages_total{reason="stale"} 2"#,
            r#"consensus_invalid_messages_total{reason="malformed"} 5"#,
        ] {
            assert!(text.lines().any(|l| l == sample), "{sample}:\n{text}");
        }
        assert_eq!(
            metrics.snapshot().invalid_messages,
            10,
            "each frame counted once"
        );
    }

    #[test]
    fn latency_histogram_counts_many_observations_at_once() {
        let metrics = Metrics::new();
        metrics.record_commits(Duration::from_micros(15), 3);
        metrics.record_commits(Duration::from_secs(3600), 1);
        let text = metrics.encode_prometheus();
        let sample = |name: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(name))
                .map(str::trim)
                .unwrap_or_else(|| panic!("{name} missing:\n{text}"))
                .to_string()
        };
        assert_eq!(sample("consensus_proposal_latency_seconds_count"), "4");
        // 10 µs < 15 µs <= 20 µs: three in the second bucket, none in the first.
        assert_eq!(
            sample("consensus_proposal_latency_seconds_bucket{le=\"0.00001\"}"),
            "0"
        );
        assert_eq!(
            sample("consensus_proposal_latency_seconds_bucket{le=\"0.00002\"}"),
            "3"
        );
        // An hour is past the last finite bound: only +Inf holds it.
        assert_eq!(
            sample("consensus_proposal_latency_seconds_bucket{le=\"+Inf\"}"),
            "4"
        );
        let sum: f64 = sample("consensus_proposal_latency_seconds_sum")
            .parse()
            .unwrap();
        assert!((sum - 3600.000045).abs() < 1e-6, "{sum}");
        assert_eq!(metrics.snapshot().proposals_committed, 4);
    }

    #[test]
    fn snapshot_averages_latency() {
        let metrics = Metrics::new();
        metrics.record_commit(Duration::from_micros(10));
        metrics.record_commit(Duration::from_micros(30));
        let snapshot = metrics.snapshot();
        assert_eq!(snapshot.average_latency(), Duration::from_micros(20));
        assert_eq!(snapshot.proposals_committed, 2);
    }
}
