//! An engine without a durable store: the protocol core's own in-memory log is the only copy of
//! the log, and the node's state is retained across [`ConsensusEngine::stop`] and the next
//! [`ConsensusEngine::start`] of the same engine.
//!
//! The core keeps every entry in memory anyway, so an in-memory log store beside it held a
//! second copy of every entry that nothing read back: on a busy leader the copying and the
//! fresh pages it touched were about a tenth of the engine's work. Instead the driver writes
//! nothing while it runs ([`CoreHeldLog`]) and, when it stops cleanly (having carried out every
//! output, so the core's state is exactly what a store would hold), hands the core's hard state,
//! log and records to [`RetainedState`], which the next start recovers from. Nothing survives the
//! process. A driver that dies of a panic retains nothing, and the engine then refuses to start
//! again rather than come back with a blank memory (see [`RetainedState::take`]).
//!
//! [`ConsensusEngine::stop`]: crate::ConsensusEngine::stop
//! [`ConsensusEngine::start`]: crate::ConsensusEngine::start

use std::sync::{Arc, Mutex};

use crate::error::StorageError;
use crate::storage::{HardState, LogStore, RecordWrite, RecoveredState};
use crate::sync::lock;
use crate::types::{Entry, LogIndex};

/// A node's state between a stop and the next start; empty before the first start.
#[derive(Clone, Default)]
pub(crate) struct RetainedState(Arc<Mutex<Retained>>);

#[derive(Default)]
struct Retained {
    state: RecoveredState,
    /// True from a start until its driver hands the state back. Still true at the next start
    /// means the driver ended without doing so (it panicked, or never ran), and the state is
    /// lost: starting empty could then vote twice in one term or drop acknowledged entries.
    lent: bool,
}

impl RetainedState {
    /// Keeps `state` for the next start.
    pub(crate) fn keep(&self, state: RecoveredState) {
        let mut retained = lock(&self.0);
        retained.state = state;
        retained.lent = false;
    }

    /// Takes what was kept for a start (an empty state before the first), or `None` if the
    /// previous start's driver never handed its state back.
    pub(crate) fn take(&self) -> Option<RecoveredState> {
        let mut retained = lock(&self.0);
        if retained.lent {
            return None;
        }
        retained.lent = true;
        Some(std::mem::take(&mut retained.state))
    }
}

/// The log store of an engine whose core holds the only copy of the log: every write is already
/// in the core's memory, which is as durable as this mode gets, so there is nothing to do.
pub(crate) struct CoreHeldLog;

impl LogStore for CoreHeldLog {
    fn save_hard_state(&mut self, _: HardState) -> Result<(), StorageError> {
        Ok(())
    }

    fn truncate_from(&mut self, _: LogIndex) -> Result<(), StorageError> {
        Ok(())
    }

    fn append(&mut self, _: &[Entry]) -> Result<(), StorageError> {
        Ok(())
    }

    /// The core keeps its records in memory too, and hands them back with its log.
    fn write_records(&mut self, _: &[RecordWrite]) -> Result<(), StorageError> {
        Ok(())
    }

    fn sync(&mut self) -> Result<(), StorageError> {
        Ok(())
    }

    /// Never called by the engine, which recovers from [`RetainedState`]; empty.
    fn recover(&mut self) -> Result<RecoveredState, StorageError> {
        Ok(RecoveredState::default())
    }

    fn supports_snapshots(&self) -> bool {
        true // the core holds its snapshot, as it holds its log
    }

    /// Nothing to persist: the core's log is the store.
    fn persist(&mut self, _: &crate::storage::LogWrite) -> Result<(), StorageError> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_is_lent_to_one_start_and_kept_by_a_clean_stop() {
        let retained = RetainedState::default();
        let first = retained
            .take()
            .expect("nothing lent before the first start");
        assert_eq!(first, RecoveredState::default());
        assert!(
            retained.take().is_none(),
            "a second start before the first one's state came back is refused"
        );
        let state = RecoveredState {
            hard_state: HardState {
                term: 7,
                voted_for: None,
            },
            entries: Vec::new(),
            records: [(b"view change".to_vec(), b"signed".to_vec())].into(),
            snapshot: None,
        };
        retained.keep(state.clone());
        assert_eq!(retained.take(), Some(state));
    }
}
