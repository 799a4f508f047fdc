//! An in-memory [`LogStore`] that keeps what was synced apart from what was only written, so that a
//! simulated crash ([`MemoryLogStore::crash`]) loses exactly the unsynced writes.

use crate::error::StorageError;
use crate::storage::{HardState, LogStore, RecordWrite, RecoveredState, Snapshot};
use crate::types::{Entry, LogIndex};

/// A write not yet made durable.
#[derive(Clone, Debug)]
enum PendingWrite {
    HardState(HardState),
    TruncateFrom(LogIndex),
    Append(Vec<Entry>),
    Records(Vec<RecordWrite>),
    Snapshot(Snapshot),
    CompactThrough(LogIndex),
}

/// In-memory log store with crash semantics.
#[derive(Clone, Debug, Default)]
pub struct MemoryLogStore {
    /// What survives a crash, except for the unsynced tail of `durable.entries` that
    /// [`MemoryLogStore::unsynced_from`] marks.
    durable: RecoveredState,
    /// Unsynced writes to replay in order at the next sync: hard states, record changes,
    /// truncations, and the appends that come after a truncation.
    pending: Vec<PendingWrite>,
    /// Where the entries appended since the last sync start in `durable.entries`, if any were
    /// appended in place. Appends with no truncation pending (the common case: the driver appends
    /// and syncs at once) go straight to their final place, which a crash cuts off again; copying
    /// them into a pending list and moving them once more at sync showed in profiles.
    unsynced_from: Option<usize>,
    /// True once a truncation or compaction is pending: later appends must wait for it, in
    /// `pending`.
    truncation_pending: bool,
    /// The last index as the writes so far (durable or not) leave it, to reject gaps at once.
    written_last_index: LogIndex,
    /// The snapshot's index as the writes so far leave it.
    written_snapshot_index: LogIndex,
    /// The highest index durably compacted away: where the log resumes when it holds nothing.
    durable_compacted: LogIndex,
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
        self.written_last_index = self
            .durable
            .entries
            .last()
            .map_or(self.durable_compacted, |e| e.index);
        self.written_snapshot_index = self.durable.snapshot.as_ref().map_or(0, |s| s.index);
    }

    /// A copy of the durable state (what [`LogStore::recover`] would return after a crash now),
    /// without consuming anything.
    pub fn durable(&self) -> RecoveredState {
        let synced = self.unsynced_from.unwrap_or(self.durable.entries.len());
        RecoveredState {
            hard_state: self.durable.hard_state,
            entries: self.durable.entries[..synced].to_vec(),
            records: self.durable.records.clone(),
            snapshot: self.durable.snapshot.clone(),
        }
    }

    /// Moves the entries appended in place since the last sync to the pending list, ahead of a
    /// truncation or compaction: they must not outlive a crash, nor be cut by a change that
    /// itself may not.
    fn hold_back_appended(&mut self) {
        if let Some(position) = self.unsynced_from.take() {
            let appended = self.durable.entries.split_off(position);
            self.pending.push(PendingWrite::Append(appended));
        }
        self.truncation_pending = true;
    }
}

impl LogStore for MemoryLogStore {
    fn save_hard_state(&mut self, hard_state: HardState) -> Result<(), StorageError> {
        self.pending.push(PendingWrite::HardState(hard_state));
        Ok(())
    }

    fn truncate_from(&mut self, from: LogIndex) -> Result<(), StorageError> {
        if from <= self.written_snapshot_index {
            // The snapshot holds only committed entries, which are never removed.
            return Err(StorageError::NonContiguous {
                expected: self.written_snapshot_index + 1,
                got: from,
            });
        }
        self.hold_back_appended();
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
        if self.truncation_pending {
            self.pending.push(PendingWrite::Append(entries.to_vec()));
        } else {
            self.unsynced_from.get_or_insert(self.durable.entries.len());
            self.durable.entries.extend_from_slice(entries);
        }
        Ok(())
    }

    /// Checks every change first, so that a refused call leaves nothing pending.
    fn write_records(&mut self, records: &[RecordWrite]) -> Result<(), StorageError> {
        if records.is_empty() {
            return Ok(());
        }
        for record in records {
            record.check_size()?;
        }
        self.pending.push(PendingWrite::Records(records.to_vec()));
        Ok(())
    }

    fn supports_snapshots(&self) -> bool {
        true
    }

    fn save_snapshot(&mut self, snapshot: &Snapshot) -> Result<(), StorageError> {
        if snapshot.index < self.written_snapshot_index {
            return Err(StorageError::NonContiguous {
                expected: self.written_snapshot_index,
                got: snapshot.index,
            });
        }
        self.written_snapshot_index = snapshot.index;
        self.pending.push(PendingWrite::Snapshot(snapshot.clone()));
        Ok(())
    }

    fn compact_through(&mut self, through: LogIndex) -> Result<(), StorageError> {
        if through > self.written_snapshot_index {
            return Err(StorageError::Backend(format!(
                "cannot compact through index {through}: the snapshot covers only up to {}",
                self.written_snapshot_index
            )));
        }
        self.hold_back_appended();
        self.pending.push(PendingWrite::CompactThrough(through));
        self.written_last_index = self.written_last_index.max(through);
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
                PendingWrite::Records(records) => {
                    for record in &records {
                        record.apply(&mut self.durable.records);
                    }
                }
                PendingWrite::Snapshot(snapshot) => self.durable.snapshot = Some(snapshot),
                PendingWrite::CompactThrough(through) => {
                    self.durable.entries.retain(|e| e.index > through);
                    self.durable_compacted = self.durable_compacted.max(through);
                }
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
    use crate::storage::LogWrite;
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

    fn records(pairs: &[(&[u8], &[u8])]) -> std::collections::BTreeMap<Vec<u8>, Vec<u8>> {
        pairs
            .iter()
            .map(|(key, value)| (key.to_vec(), value.to_vec()))
            .collect()
    }

    #[test]
    fn records_survive_sync_and_recover() {
        let mut store = MemoryLogStore::new();
        let mut write = LogWrite {
            hard_state: Some(HardState {
                term: 2,
                voted_for: None,
            }),
            append: vec![entry(1, 2)],
            ..Default::default()
        };
        write.put_record(b"cert/1".as_slice(), b"one".as_slice());
        write.put_record(b"view".as_slice(), b"change".as_slice());
        store.persist(&write).unwrap();
        let expected = records(&[(b"cert/1", b"one"), (b"view", b"change")]);
        assert_eq!(store.durable().records, expected);
        let recovered = store.recover().unwrap();
        assert_eq!(recovered.records, expected);
        assert_eq!(recovered.entries, vec![entry(1, 2)]);
        assert_eq!(recovered.hard_state.term, 2);
    }

    #[test]
    fn unsynced_record_changes_are_lost_in_a_crash() {
        let mut store = MemoryLogStore::new();
        store
            .write_records(&[RecordWrite::Put {
                key: b"a".to_vec(),
                value: b"1".to_vec(),
            }])
            .unwrap();
        store.sync().unwrap();
        store
            .write_records(&[
                RecordWrite::Put {
                    key: b"b".to_vec(),
                    value: b"2".to_vec(),
                },
                RecordWrite::Delete { key: b"a".to_vec() },
            ])
            .unwrap();
        assert_eq!(
            store.durable().records,
            records(&[(b"a", b"1")]),
            "not durable before the sync"
        );
        store.crash();
        assert_eq!(store.recover().unwrap().records, records(&[(b"a", b"1")]));
        // What the crash lost is not replayed by a later sync either.
        store.sync().unwrap();
        assert_eq!(store.recover().unwrap().records, records(&[(b"a", b"1")]));
    }

    #[test]
    fn record_changes_of_one_write_apply_in_order() {
        let mut store = MemoryLogStore::new();
        let mut write = LogWrite::default();
        write.put_record(b"k".as_slice(), b"old".as_slice());
        write.delete_record(b"k".as_slice());
        write.put_record(b"k".as_slice(), b"new".as_slice());
        write.put_record(b"gone".as_slice(), b"x".as_slice());
        write.delete_record(b"gone".as_slice());
        write.delete_record(b"never there".as_slice());
        store.persist(&write).unwrap();
        assert_eq!(store.recover().unwrap().records, records(&[(b"k", b"new")]));
    }

    #[test]
    fn a_range_delete_removes_exactly_its_half_open_range() {
        let mut store = MemoryLogStore::new();
        let mut write = LogWrite::default();
        for key in [b"s/1".as_slice(), b"s/2", b"s/3", b"s/4", b"t"] {
            write.put_record(key, b"v".as_slice());
        }
        store.persist(&write).unwrap();
        write.clear();
        // A key put before the range delete in the same write goes with it; one after stays.
        write.put_record(b"s/25".as_slice(), b"early".as_slice());
        write.delete_record_range(b"s/2".as_slice(), b"s/4".as_slice());
        write.put_record(b"s/3".as_slice(), b"late".as_slice());
        // Backwards and empty ranges remove nothing.
        write.delete_record_range(b"t".as_slice(), b"s/1".as_slice());
        write.delete_record_range(b"t".as_slice(), b"t".as_slice());
        store.persist(&write).unwrap();
        assert_eq!(
            store.recover().unwrap().records,
            records(&[
                (b"s/1", b"v"),
                (b"s/3", b"late"),
                (b"s/4", b"v"),
                (b"t", b"v")
            ])
        );
    }

    #[test]
    fn an_oversized_record_is_refused_and_nothing_of_the_call_is_kept() {
        let mut store = MemoryLogStore::new();
        let err = store
            .write_records(&[
                RecordWrite::Put {
                    key: b"fine".to_vec(),
                    value: Vec::new(),
                },
                RecordWrite::Delete {
                    key: vec![0; crate::storage::MAX_RECORD_KEY_BYTES + 1],
                },
            ])
            .unwrap_err();
        assert!(
            matches!(err, StorageError::RecordTooLarge { value_bytes: 0, .. }),
            "{err}"
        );
        store.sync().unwrap();
        assert!(store.recover().unwrap().records.is_empty());
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
