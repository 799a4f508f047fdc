//! Durable state of a node: the log, the hard state (current term and vote), and a core's
//! records (a small ordered key-value map for anything else a core must never forget, such as
//! PBFT's certificates, checkpoint proofs and view-change message).
//!
//! [`LogStore`] is the small trait the engine and the simulator drive; [`MemoryLogStore`] keeps
//! everything in memory but models durability exactly (what was not synced is lost in a crash),
//! which is what the simulator needs. Every protocol core writes through one [`LogWrite`], so
//! this module depends on no protocol: the cores import it, never the reverse.

mod faults;
mod fjall;
mod memory;

pub use self::fjall::{
    DATABASE_DIR, FjallLogStore, HARD_STATE_KEY, LOG_KEYSPACE, META_KEYSPACE, RECORDS_KEYSPACE,
    SNAPSHOT_DIR, SNAPSHOT_KEY, SYNCED_MARK_FILE, SyncPolicy,
};
pub use faults::{FaultHandle, FaultInjectingStore};
pub use memory::MemoryLogStore;

use std::collections::BTreeMap;

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::error::StorageError;
use crate::types::{Entry, LogIndex, NodeId, Term};

/// The state a node must never forget: a Raft node that forgot its vote could vote twice in one
/// term. (A PBFT replica keeps its view in `term`.)
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HardState {
    /// The latest term this node has seen.
    pub term: Term,
    /// The candidate this node voted for in `term`, if any.
    pub voted_for: Option<NodeId>,
}

/// Writes snapshots' bytes durably beside the driver (see [`LogStore::snapshot_stager`]).
pub trait SnapshotStager: Send + Sync {
    /// Writes `snapshot`'s bytes durably where its store will look for them once a
    /// [`LogWrite::snapshot`] names it. A snapshot staged but never persisted is removed by a
    /// later one.
    fn stage(&self, snapshot: &Snapshot) -> Result<(), StorageError>;
}

/// The applied state through a log index: what the state machine (and the apply stage's table
/// of applied proposals) held after applying every entry through `index`, whose term is `term`.
/// Opaque to stores and cores; the apply stage writes and reads `data`.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Snapshot {
    /// The last entry the snapshot covers.
    pub index: LogIndex,
    /// That entry's term.
    pub term: Term,
    /// The encoded state.
    pub data: Bytes,
    /// The membership in force at `index`, for a core that changes its members (Raft): the
    /// log before the snapshot, which held it, is gone. `None` for one that does not.
    pub membership: Option<crate::membership::Membership>,
}

impl std::fmt::Debug for Snapshot {
    // The data may be a gigabyte: its size says enough.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Snapshot")
            .field("index", &self.index)
            .field("term", &self.term)
            .field("bytes", &self.data.len())
            .field("membership", &self.membership)
            .finish()
    }
}

/// What a store hands back on start-up.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RecoveredState {
    /// The last hard state made durable.
    pub hard_state: HardState,
    /// Every durable log entry, in index order and contiguous. The first need not be index 1:
    /// a compacted store starts at or before one past its snapshot.
    pub entries: Vec<Entry>,
    /// The latest durable snapshot, if the log was ever compacted or a snapshot installed.
    pub snapshot: Option<Snapshot>,
    /// Every durable record of the core (see [`RecordWrite`]); empty for a core that keeps none.
    pub records: BTreeMap<Vec<u8>, Vec<u8>>,
}

/// The longest record key a store accepts: fjall's limit on a key, kept by every store so that
/// the simulator refuses what the disk would.
pub const MAX_RECORD_KEY_BYTES: usize = u16::MAX as usize;
/// The largest record value a store accepts. Records are small by design (a certificate, a
/// proof, one message); a bound keeps a runaway value from reaching the journal.
pub const MAX_RECORD_VALUE_BYTES: usize = 64 << 20;

/// One change to a core's durable records: a small ordered key-value map kept beside the log for
/// state a core must never forget that is neither a log entry nor the hard state.
///
/// Keys are ordered byte-wise, so a core that puts a big-endian sequence number after a fixed
/// prefix can drop a whole stretch of them with one [`RecordWrite::DeleteRange`]. A store refuses
/// (with [`StorageError::RecordTooLarge`], before writing anything) a key longer than
/// [`MAX_RECORD_KEY_BYTES`] or a value larger than [`MAX_RECORD_VALUE_BYTES`]; the bounds of a
/// range are not limited.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RecordWrite {
    /// Store `value` under `key`, replacing what was there.
    Put {
        /// The key.
        key: Vec<u8>,
        /// The value stored under it.
        value: Vec<u8>,
    },
    /// Remove `key` (no error if absent).
    Delete {
        /// The key.
        key: Vec<u8>,
    },
    /// Remove every key in `[from, to)` (byte-wise order).
    DeleteRange {
        /// The first key removed, if present.
        from: Vec<u8>,
        /// The first key past the range (kept). A range with `to <= from` is empty.
        to: Vec<u8>,
    },
}

impl RecordWrite {
    /// Carries out this change on an in-memory copy of the records: what a store does, for a core
    /// that mirrors its records (to answer [`Protocol::into_recovered_state`], say).
    ///
    /// [`Protocol::into_recovered_state`]: crate::protocol::Protocol::into_recovered_state
    pub fn apply(&self, records: &mut BTreeMap<Vec<u8>, Vec<u8>>) {
        match self {
            RecordWrite::Put { key, value } => {
                records.insert(key.clone(), value.clone());
            }
            RecordWrite::Delete { key } => {
                records.remove(key);
            }
            RecordWrite::DeleteRange { from, to } => {
                // Removes the keys in [from, to) one by one: cheap when few go, however many
                // stay (cutting the map and appending the rest rebuilt it whole each time). A
                // backwards range holds nothing.
                if from < to {
                    use std::ops::Bound;
                    let range = (
                        Bound::Included(from.as_slice()),
                        Bound::Excluded(to.as_slice()),
                    );
                    let doomed: Vec<Vec<u8>> = records
                        .range::<[u8], _>(range)
                        .map(|(key, _)| key.clone())
                        .collect();
                    for key in doomed {
                        records.remove(&key);
                    }
                }
            }
        }
    }

    /// Refuses a change no store can hold; see the type's documentation.
    pub(crate) fn check_size(&self) -> Result<(), StorageError> {
        let (key_bytes, value_bytes) = match self {
            RecordWrite::Put { key, value } => (key.len(), value.len()),
            RecordWrite::Delete { key } => (key.len(), 0),
            RecordWrite::DeleteRange { .. } => return Ok(()),
        };
        if key_bytes > MAX_RECORD_KEY_BYTES || value_bytes > MAX_RECORD_VALUE_BYTES {
            return Err(StorageError::RecordTooLarge {
                key_bytes,
                value_bytes,
            });
        }
        Ok(())
    }
}

/// One durable write a protocol core asks for: a new hard state, changes to the core's records,
/// a truncation of the log's tail, a snapshot, a compaction of its head, and entries to append,
/// carried out in that order as one unit. (The truncation comes before the snapshot so that a
/// store can refuse, as a bug, a truncation into what its snapshot so far covers, while a
/// follower installing a leader's snapshot may still drop its conflicting tail below the new
/// one.)
///
/// A core accumulates the writes of several steps into one `LogWrite` (group commit);
/// [`LogWrite::merge_log`] keeps the result equal to doing them one after another, and so does
/// pushing record changes in the order the steps make them (a later change to a key wins).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LogWrite {
    /// Persist this hard state (term, vote).
    pub hard_state: Option<HardState>,
    /// Store this snapshot, replacing the one held (a store refuses an older one).
    pub snapshot: Option<Snapshot>,
    /// Remove every stored entry at or after this index, before appending [`LogWrite::append`].
    pub truncate_from: Option<LogIndex>,
    /// Remove every stored entry at or before this index, which the stored snapshot covers;
    /// when the log ends before it, the next append is `compact_through + 1`.
    pub compact_through: Option<LogIndex>,
    /// Entries to append to the log, in index order.
    pub append: Vec<Entry>,
    /// Changes to the core's records, carried out in order.
    pub records: Vec<RecordWrite>,
    /// Bytes of a leader's snapshot still arriving, in the order they came (see
    /// [`SnapshotPart`]). Not part of [`LogWrite::is_empty`]: they are written ahead and never
    /// synced on their own.
    pub snapshot_parts: Vec<SnapshotPart>,
}

/// Bytes at `offset` of the snapshot through `index` that a follower is receiving from its
/// leader. A store may write them as they come, not durably, so that saving the whole snapshot
/// ([`LogWrite::snapshot`]) once every byte arrived only has to sync what it already holds
/// rather than write it all then ([`LogStore::write_snapshot_part`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SnapshotPart {
    /// The index the snapshot covers.
    pub index: LogIndex,
    /// Where in the snapshot's bytes `data` starts.
    pub offset: u64,
    /// The bytes (shared with the core's receive buffer, not copied).
    pub data: bytes::Bytes,
}

impl LogWrite {
    /// True when there is nothing to write.
    pub fn is_empty(&self) -> bool {
        self.hard_state.is_none()
            && self.snapshot.is_none()
            && self.truncate_from.is_none()
            && self.compact_through.is_none()
            && self.append.is_empty()
            && self.records.is_empty()
    }

    /// Empties every field, keeping allocations for reuse.
    pub fn clear(&mut self) {
        self.hard_state = None;
        self.snapshot = None;
        self.truncate_from = None;
        self.compact_through = None;
        self.append.clear();
        self.records.clear();
        self.snapshot_parts.clear();
    }

    /// Adds a [`RecordWrite::Put`] after the record changes already held.
    pub fn put_record(&mut self, key: impl Into<Vec<u8>>, value: impl Into<Vec<u8>>) {
        self.records.push(RecordWrite::Put {
            key: key.into(),
            value: value.into(),
        });
    }

    /// Adds a [`RecordWrite::Delete`] after the record changes already held.
    pub fn delete_record(&mut self, key: impl Into<Vec<u8>>) {
        self.records.push(RecordWrite::Delete { key: key.into() });
    }

    /// Adds a [`RecordWrite::DeleteRange`] of `[from, to)` after the record changes already held.
    pub fn delete_record_range(&mut self, from: impl Into<Vec<u8>>, to: impl Into<Vec<u8>>) {
        self.records.push(RecordWrite::DeleteRange {
            from: from.into(),
            to: to.into(),
        });
    }

    /// The last entry this write appends: its index and term.
    pub fn last_appended(&self) -> Option<(LogIndex, Term)> {
        self.append.last().map(|e| (e.index, e.term))
    }

    /// Adds a compaction through `through` after the writes already held: entries this write
    /// would append at or below it are dropped (the snapshot covers them).
    pub fn compact(&mut self, through: LogIndex) {
        self.append.retain(|e| e.index > through);
        self.compact_through = Some(self.compact_through.map_or(through, |t| t.max(through)));
    }

    /// Adds a log write after the ones already held: drop stored entries from `truncate_from`
    /// (if any), then append `entries`. Merged so that one persist has the effect of all the
    /// writes in order.
    pub fn merge_log(&mut self, truncate_from: Option<LogIndex>, entries: &[Entry]) {
        if let Some(from) = truncate_from {
            self.append.retain(|e| e.index < from);
            self.truncate_from = Some(self.truncate_from.map_or(from, |t| t.min(from)));
        }
        debug_assert!(
            match (self.append.last(), entries.first()) {
                (Some(last), Some(first)) => last.index + 1 == first.index,
                _ => true,
            },
            "log writes of one output must be contiguous"
        );
        self.append.extend_from_slice(entries);
    }
}

/// Storage of the log, the hard state and a core's records.
///
/// Writes may be buffered; only [`LogStore::sync`] promises durability: when it returns `Ok`,
/// every earlier write survives a crash. Writes are applied in call order.
pub trait LogStore: Send {
    /// Records the hard state.
    fn save_hard_state(&mut self, hard_state: HardState) -> Result<(), StorageError>;
    /// Removes every entry with index `>= from`.
    fn truncate_from(&mut self, from: LogIndex) -> Result<(), StorageError>;
    /// Appends entries; the first must directly follow the last stored entry.
    fn append(&mut self, entries: &[Entry]) -> Result<(), StorageError>;
    /// Makes every earlier write durable.
    fn sync(&mut self) -> Result<(), StorageError>;
    /// Reads back the durable state.
    fn recover(&mut self) -> Result<RecoveredState, StorageError>;

    /// Applies record changes in order (made durable by the next `sync`). The default refuses any
    /// non-empty change with a typed error ([`StorageError::RecordsUnsupported`]), so a store
    /// written before records existed fails loudly rather than forgetting them; both stores in
    /// this crate implement it.
    fn write_records(&mut self, records: &[RecordWrite]) -> Result<(), StorageError> {
        if records.is_empty() {
            Ok(())
        } else {
            Err(StorageError::RecordsUnsupported)
        }
    }

    /// Whether this store keeps snapshots ([`LogStore::save_snapshot`] and
    /// [`LogStore::compact_through`]). The default, false, is a store written before snapshots
    /// existed: the engine then takes none and keeps the whole log.
    fn supports_snapshots(&self) -> bool {
        false
    }

    /// A handle that writes a snapshot's bytes durably from a thread beside the driver, ahead
    /// of the [`LogWrite::snapshot`] that makes it current, so that persisting it writes only
    /// its metadata on the driver. `None` (the default): [`LogStore::save_snapshot`] writes
    /// the bytes itself.
    fn snapshot_stager(&self) -> Option<std::sync::Arc<dyn SnapshotStager>> {
        None
    }

    /// Whether a write waits for the disk (an fsync per batch). An engine whose transport runs
    /// on its driver's thread then persists on a blocking thread beside it, so that the
    /// transport goes on reading and writing sockets while the disk works. The default, false,
    /// persists on the driver's thread (a store in memory answers in microseconds).
    fn waits_for_disk(&self) -> bool {
        false
    }

    /// Writes `part` of a snapshot still arriving ahead of it, without syncing (see
    /// [`SnapshotPart`]); the parts of one snapshot come in order, from offset 0. The default
    /// ignores them: [`LogStore::save_snapshot`] then writes the whole snapshot. Answer `Ok`
    /// when the part could not be kept: saving the snapshot must then still write it whole.
    fn write_snapshot_part(&mut self, part: &SnapshotPart) -> Result<(), StorageError> {
        let _ = part;
        Ok(())
    }

    /// Stores `snapshot`, replacing the one held; durable at the next sync. The default refuses
    /// with [`StorageError::SnapshotsUnsupported`] (a store written before snapshots existed):
    /// the engine takes no snapshot on such a store ([`LogStore::supports_snapshots`]).
    fn save_snapshot(&mut self, snapshot: &Snapshot) -> Result<(), StorageError> {
        let _ = snapshot;
        Err(StorageError::SnapshotsUnsupported)
    }

    /// Removes every entry with index `<= through`, which the stored snapshot must cover; when
    /// the log ends before `through`, the next append must be `through + 1`. Durable at the next
    /// sync. The default refuses, as [`LogStore::save_snapshot`] does.
    fn compact_through(&mut self, through: LogIndex) -> Result<(), StorageError> {
        let _ = through;
        Err(StorageError::SnapshotsUnsupported)
    }

    /// Carries out one [`LogWrite`] and syncs it: when it returns `Ok` the whole write is
    /// durable. The parts go in this order: hard state, records, truncation, snapshot,
    /// compaction, append, then one sync. Does nothing (not even a sync) when the write is
    /// empty.
    fn persist(&mut self, write: &LogWrite) -> Result<(), StorageError> {
        for part in &write.snapshot_parts {
            self.write_snapshot_part(part)?;
        }
        if write.is_empty() {
            return Ok(());
        }
        if let Some(hard_state) = write.hard_state {
            self.save_hard_state(hard_state)?;
        }
        if !write.records.is_empty() {
            self.write_records(&write.records)?;
        }
        if let Some(from) = write.truncate_from {
            self.truncate_from(from)?;
        }
        if let Some(snapshot) = &write.snapshot {
            self.save_snapshot(snapshot)?;
        }
        if let Some(through) = write.compact_through {
            self.compact_through(through)?;
        }
        if !write.append.is_empty() {
            self.append(&write.append)?;
        }
        self.sync()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A store written before records existed: it implements only the required methods.
    #[derive(Default)]
    struct LogOnlyStore {
        syncs: usize,
    }

    impl LogStore for LogOnlyStore {
        fn save_hard_state(&mut self, _: HardState) -> Result<(), StorageError> {
            Ok(())
        }

        fn truncate_from(&mut self, _: LogIndex) -> Result<(), StorageError> {
            Ok(())
        }

        fn append(&mut self, _: &[Entry]) -> Result<(), StorageError> {
            Ok(())
        }

        fn sync(&mut self) -> Result<(), StorageError> {
            self.syncs += 1;
            Ok(())
        }

        fn recover(&mut self) -> Result<RecoveredState, StorageError> {
            Ok(RecoveredState::default())
        }
    }

    #[test]
    fn the_default_write_records_refuses_changes_and_accepts_none() {
        let mut store = LogOnlyStore::default();
        store.write_records(&[]).unwrap();
        let err = store
            .write_records(&[RecordWrite::Delete { key: b"k".to_vec() }])
            .unwrap_err();
        assert!(matches!(err, StorageError::RecordsUnsupported), "{err}");
        assert!(err.to_string().contains("write_records"), "{err}");

        // Through `persist`: a write without records goes through, one with records fails
        // before it is synced.
        store
            .persist(&LogWrite {
                hard_state: Some(HardState::default()),
                ..Default::default()
            })
            .unwrap();
        assert_eq!(store.syncs, 1);
        let mut write = LogWrite::default();
        write.put_record(b"k".as_slice(), b"v".as_slice());
        assert!(matches!(
            store.persist(&write),
            Err(StorageError::RecordsUnsupported)
        ));
        assert_eq!(store.syncs, 1, "a refused write is not synced");
    }

    #[test]
    fn record_changes_count_in_is_empty_and_clear() {
        let mut write = LogWrite::default();
        assert!(write.is_empty());
        write.delete_record_range(b"a".as_slice(), b"b".as_slice());
        assert!(!write.is_empty());
        write.clear();
        assert!(write.is_empty());
        assert!(write.records.is_empty());
    }

    #[test]
    fn pushers_keep_the_order_of_the_steps() {
        let mut write = LogWrite::default();
        write.delete_record(b"k".as_slice());
        write.put_record(b"k".as_slice(), b"v".as_slice());
        write.delete_record_range(b"a".as_slice(), b"z".as_slice());
        assert_eq!(
            write.records,
            vec![
                RecordWrite::Delete { key: b"k".to_vec() },
                RecordWrite::Put {
                    key: b"k".to_vec(),
                    value: b"v".to_vec(),
                },
                RecordWrite::DeleteRange {
                    from: b"a".to_vec(),
                    to: b"z".to_vec(),
                },
            ]
        );
    }

    #[test]
    fn apply_deletes_a_half_open_range_and_ignores_a_backwards_one() {
        let mut records: BTreeMap<Vec<u8>, Vec<u8>> = [b"a", b"b", b"c", b"d"]
            .into_iter()
            .map(|key| (key.to_vec(), key.to_vec()))
            .collect();
        let range = |from: &[u8], to: &[u8]| RecordWrite::DeleteRange {
            from: from.to_vec(),
            to: to.to_vec(),
        };
        range(b"d", b"a").apply(&mut records);
        range(b"b", b"b").apply(&mut records);
        assert_eq!(records.len(), 4);
        range(b"b", b"d").apply(&mut records);
        assert_eq!(
            records.keys().cloned().collect::<Vec<_>>(),
            vec![b"a".to_vec(), b"d".to_vec()]
        );
        range(b"", b"\xff").apply(&mut records);
        assert!(records.is_empty());
    }
}
