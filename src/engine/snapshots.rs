//! Taking snapshots without stopping the driver: every `snapshot_interval` applied entries the
//! driver captures the applied state (the state machine's copy-on-write
//! [`SnapshotWriter`](crate::state_machine::SnapshotWriter) and the table of applied proposals,
//! the only time it is blocked, and measured), a thread of its own serializes it, and a later
//! round hands the finished snapshot to the core
//! ([`Input::SnapshotTaken`](crate::protocol::Input::SnapshotTaken)), which persists it and
//! compacts the log behind the previous one. Where the store has a
//! [`SnapshotStager`], the same thread also writes the bytes durably, so that persisting the
//! snapshot on the driver writes only its metadata.

use std::collections::HashMap;
use std::io;
use std::sync::Arc;
use std::sync::mpsc::{Receiver, TryRecvError, sync_channel};
use std::time::{Duration, Instant};

use tracing::Span;

use crate::engine::apply::SnapshotCapture;
use crate::protocol::Event;
use crate::storage::{Snapshot, SnapshotStager};
use crate::types::{LogIndex, NodeId};

/// A snapshot finished beside the driver, and how long its serialization took.
pub(crate) type Finished = (io::Result<Snapshot>, Duration);

/// When to take the next snapshot, and the one being written.
pub(crate) struct SnapshotTaker {
    /// Applied entries between snapshots; 0 takes none.
    interval: u64,
    /// The index of the latest snapshot this node holds (taken, installed or recovered), or
    /// of the latest attempt that failed (so that a failing state machine is retried once an
    /// interval, not every round).
    latest: LogIndex,
    /// The snapshot being serialized: its index and where its result arrives.
    writing: Option<(LogIndex, Receiver<Finished>)>,
    /// Writes the serialized bytes durably on the same thread, where the store can.
    stager: Option<Arc<dyn SnapshotStager>>,
}

impl SnapshotTaker {
    /// Takes a snapshot every `interval` applied entries after `latest`, staging its bytes
    /// with `stager` when the store has one.
    pub(crate) fn new(
        interval: u64,
        latest: LogIndex,
        stager: Option<Arc<dyn SnapshotStager>>,
    ) -> Self {
        SnapshotTaker {
            interval,
            latest,
            writing: None,
            stager,
        }
    }

    /// Whether `applied` reaches the next snapshot and none is being written.
    pub(crate) fn due(&self, applied: LogIndex) -> bool {
        self.interval > 0 && self.writing.is_none() && applied >= self.latest + self.interval
    }

    /// Stops taking snapshots (the state machine takes none: the log is kept whole).
    pub(crate) fn stop(&mut self) {
        self.interval = 0;
    }

    /// Serializes `capture` on a thread of its own. A thread that cannot be started leaves the
    /// log uncompacted until the next interval, with a warning.
    pub(crate) fn start(&mut self, capture: SnapshotCapture) {
        let index = capture.index;
        let (done, finished) = sync_channel(1);
        let stager = self.stager.clone();
        let spawned = std::thread::Builder::new()
            .name("consensus-snapshot".into())
            .spawn(move || {
                let started = Instant::now();
                let written = capture.write().and_then(|snapshot| {
                    if let Some(stager) = stager {
                        stager.stage(&snapshot).map_err(io::Error::other)?;
                    }
                    Ok(snapshot)
                });
                // The driver may have stopped meanwhile: nobody to tell.
                let _ = done.send((written, started.elapsed()));
            });
        match spawned {
            Ok(_) => self.writing = Some((index, finished)),
            Err(error) => {
                tracing::warn!(%error, index, "could not start the snapshot thread");
                self.latest = index;
            }
        }
    }

    /// The snapshot being written, once it is finished: the snapshot, or why it failed (a
    /// state machine whose writer failed or panicked). `None` while none is finished.
    pub(crate) fn finished(&mut self) -> Option<Finished> {
        let (index, receiver) = self.writing.as_ref()?;
        let index = *index;
        let finished = match receiver.try_recv() {
            Ok(finished) => finished,
            Err(TryRecvError::Empty) => return None,
            Err(TryRecvError::Disconnected) => (
                Err(io::Error::other(
                    "the state machine's snapshot writer panicked",
                )),
                Duration::ZERO,
            ),
        };
        self.writing = None;
        self.latest = self.latest.max(index);
        Some(finished)
    }

    /// A snapshot through `index` was installed: the next one is an interval after it.
    pub(crate) fn installed(&mut self, index: LogIndex) {
        self.latest = self.latest.max(index);
    }
}

/// The spans of snapshots (the README's Observability table): taking one, and each transfer
/// this node sends or receives. Snapshots are rare, so every one is traced.
#[derive(Default)]
pub(crate) struct SnapshotSpans {
    taking: Option<Span>,
    sending: HashMap<NodeId, Span>,
    receiving: Option<(NodeId, Span)>,
}

impl SnapshotSpans {
    /// This node captured its state through `index`, which stopped the driver for `blocked`;
    /// the span lasts until the snapshot is written.
    pub(crate) fn taking(&mut self, node: NodeId, index: LogIndex, blocked: Duration) {
        let span = tracing::info_span!(
            target: "consensus::trace",
            "consensus.snapshot",
            consensus.node = %node,
            consensus.log.index = index,
            consensus.snapshot.bytes = tracing::field::Empty,
            consensus.snapshot.outcome = tracing::field::Empty,
        );
        span.in_scope(|| {
            tracing::event!(target: "consensus::trace", tracing::Level::INFO,
                consensus.snapshot.blocked_us = micros(blocked),
                "captured"
            )
        });
        self.taking = Some(span);
    }

    /// The snapshot being taken was written (`Some(bytes)`) or failed; `took` is its
    /// serialization and staging.
    pub(crate) fn taken(&mut self, bytes: Option<usize>, took: Duration) {
        let Some(span) = self.taking.take() else {
            return;
        };
        match bytes {
            Some(bytes) => {
                span.record("consensus.snapshot.bytes", bytes);
                span.record("consensus.snapshot.outcome", "taken");
            }
            None => {
                span.record("consensus.snapshot.outcome", "failed");
            }
        }
        span.in_scope(|| {
            tracing::event!(target: "consensus::trace", tracing::Level::INFO,
                consensus.snapshot.write_us = micros(took),
                "written"
            )
        });
    }

    /// What the core said about a transfer (see [`Event`]); other events are not about one.
    pub(crate) fn transfer(&mut self, node: NodeId, event: &Event) {
        match *event {
            Event::SnapshotSendStarted { to, index, bytes } => {
                let span = tracing::info_span!(
                    target: "consensus::trace",
                    "consensus.snapshot_send",
                    consensus.node = %node,
                    consensus.follower = %to,
                    consensus.log.index = index,
                    consensus.snapshot.bytes = bytes,
                    consensus.snapshot.outcome = tracing::field::Empty,
                );
                if let Some(earlier) = self.sending.insert(to, span) {
                    earlier.record("consensus.snapshot.outcome", "abandoned");
                }
            }
            Event::SnapshotSendFinished { to, .. } => {
                if let Some(span) = self.sending.remove(&to) {
                    span.record("consensus.snapshot.outcome", "sent");
                }
            }
            Event::SnapshotReceiveStarted { from, index, bytes } => {
                let span = tracing::info_span!(
                    target: "consensus::trace",
                    "consensus.snapshot_receive",
                    consensus.node = %node,
                    consensus.leader = %from,
                    consensus.log.index = index,
                    consensus.snapshot.bytes = bytes,
                    consensus.snapshot.outcome = tracing::field::Empty,
                );
                if let Some((_, earlier)) = self.receiving.replace((from, span)) {
                    earlier.record("consensus.snapshot.outcome", "abandoned");
                }
            }
            Event::LeaderChanged { leader, .. } => {
                // A leader's transfers end with its leadership; a follower's with its leader.
                if leader != Some(node) {
                    for (_, span) in self.sending.drain() {
                        span.record("consensus.snapshot.outcome", "abandoned");
                    }
                }
                if let Some((from, _)) = &self.receiving
                    && leader != Some(*from)
                    && let Some((_, span)) = self.receiving.take()
                {
                    span.record("consensus.snapshot.outcome", "abandoned");
                }
            }
            Event::ByzantineDetected { .. }
            | Event::ElectionRound { .. }
            | Event::Prepared { .. }
            | Event::MembershipChanged { .. }
            | Event::MembershipRefused { .. }
            | Event::MembershipForwarded { .. }
            | Event::MembershipForwardAnswered { .. }
            | Event::Removed { .. } => {}
        }
    }

    /// The received snapshot was restored, which took `took` on the driver.
    pub(crate) fn installed(&mut self, took: Duration) {
        let Some((_, span)) = self.receiving.take() else {
            return;
        };
        span.record("consensus.snapshot.outcome", "installed");
        span.in_scope(|| {
            tracing::event!(target: "consensus::trace", tracing::Level::INFO,
                consensus.snapshot.restore_us = micros(took),
                "installed"
            )
        });
    }
}

fn micros(duration: Duration) -> u64 {
    duration.as_micros().try_into().unwrap_or(u64::MAX)
}
