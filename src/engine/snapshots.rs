//! Taking snapshots without stopping the driver: every `snapshot_interval` applied entries the
//! driver captures the applied state (the state machine's copy-on-write
//! [`SnapshotWriter`](crate::state_machine::SnapshotWriter) and the table of applied proposals,
//! the only time it is blocked, and measured), a worker thread serializes it, and a later
//! round hands the finished snapshot to the core
//! ([`Input::SnapshotTaken`](crate::protocol::Input::SnapshotTaken)), which persists it and
//! compacts the log behind the previous one. Where the store has a
//! [`SnapshotStager`], the same thread also writes the bytes durably, so that persisting the
//! snapshot on the driver writes only its metadata.

use std::collections::HashMap;
use std::io;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;
use std::sync::mpsc::{Receiver, SendError, SyncSender, TryRecvError, sync_channel};
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
    /// The index of the snapshot being serialized.
    writing: Option<LogIndex>,
    /// The thread that serializes them, started with the first.
    worker: Option<SnapshotWorker>,
    /// Writes the serialized bytes durably on the same thread, where the store can.
    stager: Option<Arc<dyn SnapshotStager>>,
}

/// The thread that writes this node's snapshots, one at a time, for as long as its
/// [`SnapshotTaker`] lives (dropping the taker ends it). One thread for the node's lifetime,
/// not one per snapshot: starting and ending a thread maps and unmaps its stack, and each
/// unmap interrupts every core to flush its TLB; at the in-process bench's rate (a snapshot
/// per thousand entries on each member) that was 8 % of the cycles.
struct SnapshotWorker {
    jobs: SyncSender<SnapshotCapture>,
    results: Receiver<Finished>,
}

impl SnapshotWorker {
    fn start(stager: Option<Arc<dyn SnapshotStager>>) -> io::Result<Self> {
        // One snapshot is written at a time (`SnapshotTaker::due`), so neither queue holds
        // more than one.
        let (jobs, queued) = sync_channel::<SnapshotCapture>(1);
        let (done, results) = sync_channel(1);
        std::thread::Builder::new()
            .name("consensus-snapshot".into())
            .spawn(move || {
                for capture in queued {
                    let started = Instant::now();
                    // A state machine's writer that panics fails this snapshot, not the
                    // worker: the next interval tries again.
                    let written = catch_unwind(AssertUnwindSafe(|| {
                        let snapshot = capture.write()?;
                        if let Some(stager) = &stager {
                            stager.stage(&snapshot).map_err(io::Error::other)?;
                        }
                        Ok(snapshot)
                    }))
                    .unwrap_or_else(|_| Err(writer_panicked()));
                    if done.send((written, started.elapsed())).is_err() {
                        return; // the driver stopped meanwhile: nobody to tell
                    }
                }
            })?;
        Ok(SnapshotWorker { jobs, results })
    }
}

fn writer_panicked() -> io::Error {
    io::Error::other("the state machine's snapshot writer panicked")
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
            worker: None,
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

    /// Hands `capture` to the worker thread to serialize, starting the thread if it is not
    /// running. A thread that cannot be started leaves the log uncompacted until the next
    /// interval, with a warning.
    pub(crate) fn start(&mut self, capture: SnapshotCapture) {
        let index = capture.index;
        let mut capture = capture;
        // A worker found gone (it cannot end while the taker lives, short of an abort in the
        // writer) is replaced once.
        for _ in 0..2 {
            let worker = match self.worker.take() {
                Some(worker) => worker,
                None => match SnapshotWorker::start(self.stager.clone()) {
                    Ok(worker) => worker,
                    Err(error) => {
                        tracing::warn!(%error, index, "could not start the snapshot thread");
                        self.latest = index;
                        return;
                    }
                },
            };
            match worker.jobs.send(capture) {
                Ok(()) => {
                    self.worker = Some(worker);
                    self.writing = Some(index);
                    return;
                }
                Err(SendError(returned)) => capture = returned,
            }
        }
        tracing::warn!(index, "the snapshot thread stopped at once");
        self.latest = index;
    }

    /// The snapshot being written, once it is finished: the snapshot, or why it failed (a
    /// state machine whose writer failed or panicked). `None` while none is finished.
    pub(crate) fn finished(&mut self) -> Option<Finished> {
        let index = self.writing?;
        let worker = self.worker.as_ref()?;
        let finished = match worker.results.try_recv() {
            Ok(finished) => finished,
            Err(TryRecvError::Empty) => return None,
            Err(TryRecvError::Disconnected) => {
                self.worker = None;
                (Err(writer_panicked()), Duration::ZERO)
            }
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;
    use std::thread::ThreadId;

    fn wait_for(taker: &mut SnapshotTaker) -> Finished {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(finished) = taker.finished() {
                return finished;
            }
            assert!(Instant::now() < deadline, "the snapshot was never finished");
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// Every snapshot is written on the one worker thread, a writer that panics included:
    /// that snapshot fails, the worker lives on, and the next is written.
    #[test]
    fn one_worker_writes_every_snapshot_and_outlives_a_panicking_writer() {
        let threads: Arc<Mutex<Vec<ThreadId>>> = Arc::default();
        let capture = |index: LogIndex, panics: bool| {
            let threads = threads.clone();
            SnapshotCapture::of_state(
                index,
                1,
                Box::new(move |out: &mut dyn io::Write| {
                    threads.lock().unwrap().push(std::thread::current().id());
                    assert!(!panics, "a state machine whose writer panics");
                    out.write_all(&index.to_le_bytes())
                }),
            )
        };
        let mut taker = SnapshotTaker::new(10, 0, None);
        assert!(taker.due(10) && !taker.due(9));
        taker.start(capture(10, false));
        assert!(!taker.due(20), "one snapshot at a time");
        let (first, _) = wait_for(&mut taker);
        assert_eq!(first.unwrap().index, 10);
        assert!(taker.due(20));
        taker.start(capture(20, true));
        let (failed, _) = wait_for(&mut taker);
        assert!(failed.unwrap_err().to_string().contains("panicked"));
        assert!(!taker.due(29) && taker.due(30), "retried an interval later");
        taker.start(capture(30, false));
        let (third, _) = wait_for(&mut taker);
        let third = third.unwrap();
        assert_eq!(third.index, 30);
        assert!(third.data.ends_with(&30u64.to_le_bytes()));
        let threads = threads.lock().unwrap();
        assert_eq!(threads.len(), 3);
        assert!(threads.iter().all(|id| *id == threads[0]), "{threads:?}");
        assert_ne!(threads[0], std::thread::current().id());
    }
}
