//! An in-memory [`LogStore`] that keeps what was synced apart from what was only written, so that a
//! simulated crash ([`MemoryLogStore::crash`]) loses exactly the unsynced writes.

use crate::error::StorageError;
use crate::storage::{HardState, LogStore, RecoveredState};
use crate::types::{Entry, LogIndex};

/// A write not yet made durable.
#[derive(Clone, Debug)]
enum PendingWrite {
    HardState(HardState),
    TruncateFrom(LogIndex),
    Append(Vec<Entry>),
}

/// In-memory log store with crash semantics.
#[derive(Clone, Debug, Default)]
pub struct MemoryLogStore {
    durable: RecoveredState,
    pending: Vec<PendingWrite>,
    /// The last index as the writes so far (durable or not) leave it, to reject gaps at once.
    written_last_index: LogIndex,
}

impl MemoryLogStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    /// Forgets every write since the last [`LogStore::sync`], as a power cut would.
    pub fn crash(&mut self) {
        self.pending.clear();
        self.written_last_index = self.durable.entries.last().map_or(0, |e| e.index);
    }

    /// The durable state, without consuming anything.
    pub fn durable(&self) -> &RecoveredState {
        &self.durable
    }
}

impl LogStore for MemoryLogStore {
    fn save_hard_state(&mut self, hard_state: HardState) -> Result<(), StorageError> {
        self.pending.push(PendingWrite::HardState(hard_state));
        Ok(())
    }

    fn truncate_from(&mut self, from: LogIndex) -> Result<(), StorageError> {
        self.pending.push(PendingWrite::TruncateFrom(from));
        self.written_last_index = self.written_last_index.min(from.saturating_sub(1));
        Ok(())
    }

    fn append(&mut self, entries: &[Entry]) -> Result<(), StorageError> {
        let Some(first) = entries.first() else {
            return Ok(());
        };
        if first.index != self.written_last_index + 1 {
            return Err(StorageError::NonContiguous {
                expected: self.written_last_index + 1,
                got: first.index,
            });
        }
        self.written_last_index = entries.last().map_or(0, |e| e.index);
        self.pending.push(PendingWrite::Append(entries.to_vec()));
        Ok(())
    }

    fn sync(&mut self) -> Result<(), StorageError> {
        for write in self.pending.drain(..) {
            match write {
                PendingWrite::HardState(hard_state) => self.durable.hard_state = hard_state,
                PendingWrite::TruncateFrom(from) => {
                    self.durable.entries.retain(|e| e.index < from);
                }
                PendingWrite::Append(entries) => self.durable.entries.extend(entries),
            }
        }
        Ok(())
    }

    fn recover(&mut self) -> Result<RecoveredState, StorageError> {
        self.crash();
        Ok(self.durable.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::Payload;

    fn entry(index: LogIndex, term: u64) -> Entry {
        Entry {
            index,
            term,
            payload: Payload::Blank,
        }
    }

    #[test]
    fn crash_loses_only_unsynced_writes() {
        let mut store = MemoryLogStore::new();
        store.append(&[entry(1, 1), entry(2, 1)]).unwrap();
        store
            .save_hard_state(HardState {
                term: 1,
                voted_for: None,
            })
            .unwrap();
        store.sync().unwrap();
        store.append(&[entry(3, 1)]).unwrap();
        store.truncate_from(2).unwrap();
        store.crash();
        let recovered = store.recover().unwrap();
        assert_eq!(recovered.entries, vec![entry(1, 1), entry(2, 1)]);
        assert_eq!(recovered.hard_state.term, 1);
    }

    #[test]
    fn truncate_then_append_replaces_the_suffix() {
        let mut store = MemoryLogStore::new();
        store
            .append(&[entry(1, 1), entry(2, 1), entry(3, 1)])
            .unwrap();
        store.truncate_from(2).unwrap();
        store.append(&[entry(2, 2)]).unwrap();
        store.sync().unwrap();
        assert_eq!(
            store.recover().unwrap().entries,
            vec![entry(1, 1), entry(2, 2)]
        );
    }

    #[test]
    fn a_gap_is_refused() {
        let mut store = MemoryLogStore::new();
        let err = store.append(&[entry(2, 1)]).unwrap_err();
        assert!(matches!(
            err,
            StorageError::NonContiguous {
                expected: 1,
                got: 2
            }
        ));
    }
}
