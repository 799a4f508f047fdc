//! [`FaultInjectingStore`]: a [`LogStore`] wrapper that makes syncs fail on demand, for tests of
//! what a node does when its disk fails, and for the `consensus-node` failpoint
//! `CONSENSUS_FAILPOINT_FSYNC_ERROR_AFTER=N` (every sync after the first N fails with EIO).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::error::StorageError;
use crate::storage::{HardState, LogStore, LogWrite, RecordWrite, RecoveredState};
use crate::types::{Entry, LogIndex};

/// Shared switches and counters of a [`FaultInjectingStore`].
#[derive(Debug, Default)]
struct Faults {
    /// Syncs that succeed before every later one fails (`u64::MAX`: none fails).
    syncs_before_failure: AtomicU64,
    /// Syncs attempted (failed ones included).
    sync_attempts: AtomicU64,
}

/// A handle to change and watch a [`FaultInjectingStore`] after it was given to an engine.
#[derive(Clone, Debug)]
pub struct FaultHandle(Arc<Faults>);

impl FaultHandle {
    /// Every sync from now on fails with EIO.
    pub fn fail_syncs_from_now(&self) {
        let attempts = self.0.sync_attempts.load(Ordering::SeqCst);
        self.0
            .syncs_before_failure
            .store(attempts, Ordering::SeqCst);
    }

    /// Syncs attempted so far, failed ones included.
    pub fn sync_attempts(&self) -> u64 {
        self.0.sync_attempts.load(Ordering::SeqCst)
    }
}

/// Passes every call to the wrapped store, except that syncs fail with an I/O error
/// (`StorageError::SyncFailed`, EIO) once the configured number of syncs has succeeded. A
/// failing [`LogStore::persist`] still writes (unsynced), as a real failed fsync leaves the
/// writes in an unknown state.
#[derive(Debug)]
pub struct FaultInjectingStore<S> {
    inner: S,
    faults: Arc<Faults>,
}

impl<S: LogStore> FaultInjectingStore<S> {
    /// Wraps `inner` with no fault armed.
    pub fn new(inner: S) -> Self {
        let faults = Faults {
            syncs_before_failure: AtomicU64::new(u64::MAX),
            sync_attempts: AtomicU64::new(0),
        };
        Self {
            inner,
            faults: Arc::new(faults),
        }
    }

    /// Lets `syncs` syncs succeed, then fails every later one.
    pub fn fail_syncs_after(self, syncs: u64) -> Self {
        self.faults
            .syncs_before_failure
            .store(syncs, Ordering::SeqCst);
        self
    }

    /// A handle to arm faults and read counters later.
    pub fn handle(&self) -> FaultHandle {
        FaultHandle(Arc::clone(&self.faults))
    }

    /// Counts one sync attempt and says whether it must fail.
    fn sync_fails(&self) -> bool {
        let attempt = self.faults.sync_attempts.fetch_add(1, Ordering::SeqCst);
        attempt >= self.faults.syncs_before_failure.load(Ordering::SeqCst)
    }

    fn injected() -> StorageError {
        StorageError::SyncFailed {
            what: "the journal (injected fault)",
            source: std::io::Error::from_raw_os_error(5), // EIO, as a failing disk reports
        }
    }
}

impl<S: LogStore> LogStore for FaultInjectingStore<S> {
    fn save_hard_state(&mut self, hard_state: HardState) -> Result<(), StorageError> {
        self.inner.save_hard_state(hard_state)
    }

    fn truncate_from(&mut self, from: LogIndex) -> Result<(), StorageError> {
        self.inner.truncate_from(from)
    }

    fn append(&mut self, entries: &[Entry]) -> Result<(), StorageError> {
        self.inner.append(entries)
    }

    fn sync(&mut self) -> Result<(), StorageError> {
        if self.sync_fails() {
            return Err(Self::injected());
        }
        self.inner.sync()
    }

    fn recover(&mut self) -> Result<RecoveredState, StorageError> {
        self.inner.recover()
    }

    fn write_records(&mut self, records: &[RecordWrite]) -> Result<(), StorageError> {
        self.inner.write_records(records)
    }

    fn supports_snapshots(&self) -> bool {
        self.inner.supports_snapshots()
    }

    /// The wrapped store's: an engine writes beside its driver for a disk, as it would
    /// without the faults.
    fn waits_for_disk(&self) -> bool {
        self.inner.waits_for_disk()
    }

    fn snapshot_stager(&self) -> Option<std::sync::Arc<dyn crate::storage::SnapshotStager>> {
        self.inner.snapshot_stager()
    }

    fn write_snapshot_part(
        &mut self,
        part: &crate::storage::SnapshotPart,
    ) -> Result<(), StorageError> {
        self.inner.write_snapshot_part(part)
    }

    fn save_snapshot(&mut self, snapshot: &crate::storage::Snapshot) -> Result<(), StorageError> {
        self.inner.save_snapshot(snapshot)
    }

    fn compact_through(&mut self, through: LogIndex) -> Result<(), StorageError> {
        self.inner.compact_through(through)
    }

    fn persist(&mut self, write: &LogWrite) -> Result<(), StorageError> {
        if write.is_empty() {
            // Parts of a snapshot alone are not synced: no sync to fail.
            return self.inner.persist(write);
        }
        if self.sync_fails() {
            // The parts are written, as by the default `persist`, and the sync fails.
            if let Some(hard_state) = write.hard_state {
                self.inner.save_hard_state(hard_state)?;
            }
            self.inner.write_records(&write.records)?;
            if let Some(from) = write.truncate_from {
                self.inner.truncate_from(from)?;
            }
            self.inner.append(&write.append)?;
            return Err(Self::injected());
        }
        self.inner.persist(write)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::MemoryLogStore;

    #[test]
    fn syncs_fail_after_the_configured_count_and_are_counted() {
        let mut store = FaultInjectingStore::new(MemoryLogStore::default()).fail_syncs_after(1);
        let handle = store.handle();
        assert!(store.sync().is_ok());
        let error = store.sync().unwrap_err();
        assert!(matches!(error, StorageError::SyncFailed { .. }), "{error}");
        assert!(error.to_string().contains("never retried"), "{error}");
        assert_eq!(handle.sync_attempts(), 2);
    }
}
