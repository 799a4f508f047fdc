//! Taking snapshots without stopping the driver: every `snapshot_interval` applied entries the
//! driver captures the applied state (the state machine's copy-on-write
//! [`SnapshotWriter`](crate::state_machine::SnapshotWriter) and the table of applied proposals,
//! the only time it is blocked, and measured), a thread of its own serializes it, and a later
//! round hands the finished snapshot to the core
//! ([`Input::SnapshotTaken`](crate::protocol::Input::SnapshotTaken)), which persists it and
//! compacts the log behind the previous one. Where the store has a
//! [`SnapshotStager`], the same thread also writes the bytes durably, so that persisting the
//! snapshot on the driver writes only its metadata.

use std::io;
use std::sync::Arc;
use std::sync::mpsc::{Receiver, TryRecvError, sync_channel};
use std::time::{Duration, Instant};

use crate::engine::apply::SnapshotCapture;
use crate::storage::{Snapshot, SnapshotStager};
use crate::types::LogIndex;

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
