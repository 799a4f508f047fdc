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
    /// What survives a crash, except for the unsynced tail of `durable.entries` that
    /// [`MemoryLogStore::unsynced_from`] marks.
    durable: RecoveredState,
    /// Unsynced writes to replay in order at the next sync: hard states, truncations, and the
    /// appends that come after a truncation.
    pending: Vec<PendingWrite>,
    /// Where the entries appended since the last sync start in `durable.entries`, if any were
    /// appended in place. Appends with no truncation pending (the common case: the driver appends
    /// and syncs at once) go straight to their final place, which a crash cuts off again; copying
    /// them into a pending list and moving them once more at sync showed in profiles.
    unsynced_from: Option<usize>,
    /// True once a truncation is pending: later appends must wait for it, in `pending`.
    truncation_pending: bool,
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
        if let Some(from) = self.unsynced_from.take() {
            self.durable.entries.truncate(from);
        }
        self.pending.clear();
        self.truncation_pending = false;
        self.written_last_index = self.durable.entries.last().map_or(0, |e| e.index);
    }

    /// A copy of the durable state (what [`LogStore::recover`] would return after a crash now),
    /// without consuming anything.
    pub fn durable(&self) -> RecoveredState {
        let synced = self.unsynced_from.unwrap_or(self.durable.entries.len());
        RecoveredState {
            hard_state: self.durable.hard_state,
            entries: self.durable.entries[..synced].to_vec(),
        }
    }
}

impl LogStore for MemoryLogStore {
    fn save_hard_state(&mut self, hard_state: HardState) -> Result<(), StorageError> {
        self.pending.push(PendingWrite::HardState(hard_state));
        Ok(())
    }

    fn truncate_from(&mut self, from: LogIndex) -> Result<(), StorageError> {
        // The entries appended in place must not outlive a crash, nor be cut by a truncation
        // that itself may not: they move to the pending list, ahead of the truncation.
        if let Some(position) = self.unsynced_from.take() {
            let appended = self.durable.entries.split_off(position);
            self.pending.push(PendingWrite::Append(appended));
        }
        self.pending.push(PendingWrite::TruncateFrom(from));
        self.truncation_pending = true;
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
        if self.truncation_pending {
            self.pending.push(PendingWrite::Append(entries.to_vec()));
        } else {
            self.unsynced_from.get_or_insert(self.durable.entries.len());
            self.durable.entries.extend_from_slice(entries);
        }
        Ok(())
    }

    fn sync(&mut self) -> Result<(), StorageError> {
        self.unsynced_from = None;
        self.truncation_pending = false;
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
    fn appends_in_place_are_lost_in_a_crash_and_kept_by_a_sync() {
        let mut store = MemoryLogStore::new();
        store.append(&[entry(1, 1)]).unwrap();
        store.sync().unwrap();
        store.append(&[entry(2, 1)]).unwrap();
        store.append(&[entry(3, 1)]).unwrap();
        assert_eq!(store.durable().entries, vec![entry(1, 1)]);
        store.crash();
        assert_eq!(store.recover().unwrap().entries, vec![entry(1, 1)]);
        store.append(&[entry(2, 2)]).unwrap();
        store.sync().unwrap();
        assert_eq!(store.durable().entries, vec![entry(1, 1), entry(2, 2)]);
    }

    #[test]
    fn a_truncation_after_appends_in_place_keeps_write_order() {
        let mut store = MemoryLogStore::new();
        store.append(&[entry(1, 1), entry(2, 1)]).unwrap();
        store.sync().unwrap();
        // Unsynced: append 3 and 4, cut from 2 (into the durable part), append a new 2.
        store.append(&[entry(3, 1), entry(4, 1)]).unwrap();
        store.truncate_from(2).unwrap();
        store.append(&[entry(2, 3)]).unwrap();
        let mut crashed = store.clone();
        crashed.crash();
        assert_eq!(
            crashed.recover().unwrap().entries,
            vec![entry(1, 1), entry(2, 1)],
            "a crash keeps the durable entries the unsynced truncation would have cut"
        );
        store.sync().unwrap();
        assert_eq!(store.durable().entries, vec![entry(1, 1), entry(2, 3)]);
        // A truncation inside entries appended in place since the last sync.
        store.append(&[entry(3, 3), entry(4, 3)]).unwrap();
        store.truncate_from(4).unwrap();
        store.append(&[entry(4, 4)]).unwrap();
        store.sync().unwrap();
        assert_eq!(
            store.recover().unwrap().entries,
            vec![entry(1, 1), entry(2, 3), entry(3, 3), entry(4, 4)]
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
