//! The durable [`LogStore`]: the log, the hard state, a core's records and snapshot metadata in a
//! fjall database under the node's `state_dir`.
//!
//! # Layout
//! The fjall database lives in `state_dir/`[`DATABASE_DIR`]. Three keyspaces: [`LOG_KEYSPACE`] maps each log index (big-endian `u64`, so that key order is
//! index order) to one entry record. [`META_KEYSPACE`] holds the hard state under
//! [`HARD_STATE_KEY`] and the snapshot metadata under [`SNAPSHOT_KEY`] (index, term, length and
//! CRC-32 of the snapshot's bytes, which live in a file of their own under
//! `state_dir/`[`SNAPSHOT_DIR`]: a snapshot may be a gigabyte, too big to pass through the
//! journal and the memtables). [`RECORDS_KEYSPACE`] holds
//! a core's records ([`RecordWrite`]): each key as the core gave it, each value sealed in a
//! record of its own kind. A database made before records existed lacks that keyspace; opening
//! it creates it empty.
//!
//! # Record format
//! Every value is a record: a 10-byte header — format version, record kind, body length
//! (`u32` LE), CRC-32 (`u32` LE) over the version, kind, length and body — then the body. Log
//! entries are version 2 (commands in postcard); an intact version 1 entry (commands in bincode,
//! written before that change) is refused as [`StorageError::UnsupportedVersion`] rather than
//! applied as whatever its bytes decode to. Other records are version 1. A record
//! whose checksum, length, kind or version does not match, or whose body does not decode, is
//! reported as [`StorageError::Corrupt`] naming the record, and so is a log that is not a
//! contiguous run of indexes or an entry stored under another index's key. fjall's journal and
//! tables carry their own checksums; ours also catches records that are intact for fjall but wrong
//! for us (a bug, a misdirected write, a byte flipped in memory before it was written).
//!
//! fjall's journal recovery cuts a journal at the first entry that does not decode, which keeps
//! a torn tail from a crash out but would also silently drop every batch after a damaged byte in
//! the middle. The synced-through mark ([`SYNCED_MARK_FILE`] beside the database) catches that:
//! a recovered log that ends before the last synced index is refused, naming the journal fjall
//! cut and the offset of the cut.
//!
//! # Durability and crash safety
//! Each write call commits one fjall write batch, which fjall's journal makes atomic: after a crash
//! the store holds a prefix of the committed batches, never part of one. Writes reach the OS and
//! the disk only at [`LogStore::sync`], as [`SyncPolicy`] says. [`FjallLogStore::persist`] puts a
//! whole [`LogWrite`](crate::storage::LogWrite) (hard state, record changes, truncation, appends) into a single batch followed by a single
//! sync, so concurrent proposals the engine gathered into one write share one fsync (group
//! commit) and a crash leaves either all of it or none. A truncation deletes the suffix in the same
//! batch as whatever follows it, so no crash point can leave a gap in the log.

use std::collections::BTreeMap;
use std::ops::{Bound, Range};
use std::path::{Path, PathBuf};

use ::fjall::{Database, Keyspace, KeyspaceCreateOptions, OwnedWriteBatch, PersistMode};
use bytes::Bytes;

use crate::error::StorageError;
use crate::storage::{
    HardState, LogStore, LogWrite, RecordWrite, RecoveredState, Snapshot, SnapshotStager,
};
use crate::types::{Entry, LogIndex, NodeId, Payload, ProposalTag, Term};

/// Subdirectory of the state directory that holds the fjall database.
pub const DATABASE_DIR: &str = "fjall";
/// Where a new database is built before it is renamed to [`DATABASE_DIR`].
const STAGING_DIR: &str = "fjall.creating";
/// Name of the keyspace holding the log.
pub const LOG_KEYSPACE: &str = "raft_log";
/// Name of the keyspace holding the hard state and snapshot metadata.
pub const META_KEYSPACE: &str = "raft_meta";
/// Name of the keyspace holding a core's records ([`RecordWrite`]).
pub const RECORDS_KEYSPACE: &str = "records";
/// Key of the hard state record in [`META_KEYSPACE`].
pub const HARD_STATE_KEY: &[u8] = b"hard_state";
/// Key of the snapshot metadata record in [`META_KEYSPACE`].
pub const SNAPSHOT_KEY: &[u8] = b"snapshot";
/// Subdirectory of the state directory holding snapshot files, one per snapshot index
/// (`snapshot-<index>.bin`); the metadata record names which one is current, and the others are
/// removed after the sync that made it current.
pub const SNAPSHOT_DIR: &str = "snapshots";

/// Version byte of the records this code writes, by kind (see [`RecordKind::version`]).
const RECORD_VERSION: u8 = 1;
/// Version byte of a log entry: 2 since commands are encoded with postcard
/// ([`crate::encoding`]); the command bytes of a version 1 entry were bincode's.
const ENTRY_RECORD_VERSION: u8 = 2;
/// Header bytes before a record's body: version, kind, body length, CRC-32.
const HEADER_LEN: usize = 1 + 1 + 4 + 4;

/// What a record holds; part of the header so that a record stored under the wrong key is caught.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
enum RecordKind {
    Entry = 1,
    HardState = 2,
    Snapshot = 3,
    /// A value in [`RECORDS_KEYSPACE`]: the body is the core's value, whole.
    CoreRecord = 4,
}

impl RecordKind {
    /// The version this code writes and reads for records of this kind.
    fn version(self) -> u8 {
        match self {
            RecordKind::Entry => ENTRY_RECORD_VERSION,
            RecordKind::HardState | RecordKind::Snapshot | RecordKind::CoreRecord => RECORD_VERSION,
        }
    }
}

/// When the store forces its writes to disk.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum SyncPolicy {
    /// Every [`LogStore::sync`] (one per [`LogStore::persist`]) fsyncs the journal: what was
    /// acknowledged survives a power cut. The default.
    #[default]
    EveryBatch,
    /// Never fsync: each sync hands the writes to the OS, which writes them out when it likes. A
    /// crash of the process loses nothing; a power cut or kernel crash may lose the latest writes.
    /// For benchmarks and throwaway clusters.
    Never,
}

impl SyncPolicy {
    fn persist_mode(self) -> PersistMode {
        match self {
            SyncPolicy::EveryBatch => PersistMode::SyncAll,
            SyncPolicy::Never => PersistMode::Buffer,
        }
    }
}

/// The metadata record of a snapshot: where its file is and how to check it.
#[derive(Clone, Debug, PartialEq, Eq)]
struct SnapshotRecord {
    index: LogIndex,
    term: Term,
    length: u64,
    crc: u32,
    membership: Option<crate::membership::Membership>,
}

impl SnapshotRecord {
    fn of(snapshot: &Snapshot) -> Self {
        SnapshotRecord {
            index: snapshot.index,
            term: snapshot.term,
            length: snapshot.data.len() as u64,
            crc: crc32fast::hash(&snapshot.data),
            membership: snapshot.membership.clone(),
        }
    }
}

/// Writes a snapshot's file (and its checksum) on the thread that serialized it, so that
/// [`FjallLogStore`] writes only the metadata record on the driver when the snapshot becomes
/// current. A file staged but never made current is pruned after a later snapshot's sync, or
/// at the first sync after a restart.
struct FjallSnapshotStager {
    state_dir: PathBuf,
    staged: std::sync::Arc<std::sync::Mutex<BTreeMap<LogIndex, SnapshotRecord>>>,
}

impl SnapshotStager for FjallSnapshotStager {
    fn stage(&self, snapshot: &Snapshot) -> Result<(), StorageError> {
        let record = SnapshotRecord::of(snapshot);
        write_snapshot_file(&self.state_dir, snapshot)?;
        crate::sync::lock(&self.staged).insert(snapshot.index, record);
        Ok(())
    }
}

/// Where the log stands after the writes made so far (durable or not).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Bounds {
    /// The lowest index the log may hold: 1, or one past a compacted prefix.
    first_index: LogIndex,
    /// One past the last entry.
    next_index: LogIndex,
}

/// A [`LogStore`] on fjall. See the module documentation for layout and guarantees.
pub struct FjallLogStore {
    db: Database,
    log: Keyspace,
    meta: Keyspace,
    records: Keyspace,
    sync_policy: SyncPolicy,
    path: PathBuf,
    bounds: Bounds,
    /// The latest snapshot saved (durable or not).
    snapshot: Option<Snapshot>,
    /// Snapshot files may be pruned after the next sync (a newer one was saved).
    snapshot_files_stale: bool,
    /// Snapshot files written beside the driver ([`FjallSnapshotStager`]) and not yet made
    /// current, by index.
    staged: std::sync::Arc<std::sync::Mutex<BTreeMap<LogIndex, SnapshotRecord>>>,
    /// Snapshot files were pruned since the store opened.
    pruned_since_open: bool,
    /// The file of a leader's snapshot being received, written part by part as it arrives
    /// ([`LogStore::write_snapshot_part`]).
    receiving: Option<ReceivingFile>,
    /// How far the log reached at the last sync (see [`synced_mark`]).
    mark: SyncedMark,
    /// The mark as found at open, checked by [`LogStore::recover`].
    mark_at_open: Option<LogIndex>,
    /// Journals fjall's recovery shortened when this store opened.
    journal_cuts: Vec<JournalCut>,
}

impl std::fmt::Debug for FjallLogStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FjallLogStore")
            .field("path", &self.path)
            .field("sync_policy", &self.sync_policy)
            .field("first_index", &self.bounds.first_index)
            .field("next_index", &self.bounds.next_index)
            .finish_non_exhaustive()
    }
}

impl FjallLogStore {
    /// Opens (creating if needed) the store in `state_dir`.
    ///
    /// Reads only what it needs to accept writes (the last log key and the snapshot metadata);
    /// [`LogStore::recover`] reads and validates everything and must be called before the node
    /// serves. A directory another open store holds is refused (fjall locks it).
    pub fn open(
        state_dir: impl AsRef<Path>,
        sync_policy: SyncPolicy,
    ) -> Result<Self, StorageError> {
        let path = state_dir.as_ref().to_path_buf();
        let journals_before = synced_mark::journal_sizes(&path.join(DATABASE_DIR))?;
        let db = open_database(&path)?;
        let journal_cuts = synced_mark::cuts(
            &journals_before,
            &synced_mark::journal_sizes(&path.join(DATABASE_DIR))?,
        );
        for cut in &journal_cuts {
            tracing::warn!(
                journal = %cut.path.display(),
                offset = cut.offset,
                length = cut.length,
                "fjall's recovery cut a journal (a torn tail, unless entries synced before are missing)"
            );
        }
        let (mark, mark_at_open) = SyncedMark::open(&path)?;
        let log = db
            .keyspace(LOG_KEYSPACE, KeyspaceCreateOptions::default)
            .map_err(|e| fjall_error(e, "log keyspace"))?;
        let meta = db
            .keyspace(META_KEYSPACE, KeyspaceCreateOptions::default)
            .map_err(|e| fjall_error(e, "meta keyspace"))?;
        // Created here, not only with a new database, so that a database from before records
        // existed opens too.
        let records = db
            .keyspace(RECORDS_KEYSPACE, KeyspaceCreateOptions::default)
            .map_err(|e| fjall_error(e, "records keyspace"))?;
        let snapshot = match meta
            .get(SNAPSHOT_KEY)
            .map_err(|e| fjall_error(e, "snapshot"))?
        {
            Some(value) => Some(read_snapshot_file(&path, decode_snapshot(&value)?)?),
            None => None,
        };
        let floor = snapshot.as_ref().map_or(1, |s| s.index + 1);
        let first_key = match log.first_key_value() {
            Some(guard) => Some(decode_key(
                &guard.key().map_err(|e| fjall_error(e, "log"))?,
            )?),
            None => None,
        };
        let last_key = match log.last_key_value() {
            Some(guard) => Some(decode_key(
                &guard.key().map_err(|e| fjall_error(e, "log"))?,
            )?),
            None => None,
        };
        let bounds = match (first_key, last_key) {
            (Some(first), Some(last)) => Bounds {
                first_index: first,
                next_index: last + 1,
            },
            _ => Bounds {
                first_index: floor,
                next_index: floor,
            },
        };
        Ok(FjallLogStore {
            db,
            log,
            meta,
            records,
            sync_policy,
            path,
            bounds,
            snapshot,
            snapshot_files_stale: true,
            staged: Default::default(),
            pruned_since_open: false,
            receiving: None,
            mark,
            mark_at_open,
            journal_cuts,
        })
    }

    /// The directory the store lives in.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The sync policy the store was opened with.
    pub fn sync_policy(&self) -> SyncPolicy {
        self.sync_policy
    }

    /// One past the last entry, as the writes so far leave the log.
    pub fn next_index(&self) -> LogIndex {
        self.bounds.next_index
    }

    /// The latest snapshot saved, if any.
    pub fn snapshot(&self) -> Option<&Snapshot> {
        self.snapshot.as_ref()
    }

    /// Writes the snapshot's file (synced, under a temporary name first, so that a crash leaves
    /// no half file under a real name) and stages its metadata record. A snapshot older than the
    /// current one is refused: it would let a later compaction lose entries it does not cover.
    fn stage_snapshot(
        &mut self,
        batch: &mut OwnedWriteBatch,
        snapshot: &Snapshot,
    ) -> Result<(), StorageError> {
        if let Some(current) = &self.snapshot
            && snapshot.index < current.index
        {
            return Err(StorageError::NonContiguous {
                expected: current.index,
                got: snapshot.index,
            });
        }
        let staged = crate::sync::lock(&self.staged).remove(&snapshot.index);
        let record = match staged {
            // Its file was written beside the driver: only the record is left to write.
            // The membership is the core's, known only now.
            Some(record)
                if record.term == snapshot.term && record.length == snapshot.data.len() as u64 =>
            {
                SnapshotRecord {
                    membership: snapshot.membership.clone(),
                    ..record
                }
            }
            _ => {
                if !self.finish_received(snapshot) {
                    write_snapshot_file(&self.path, snapshot)?;
                }
                SnapshotRecord::of(snapshot)
            }
        };
        batch.insert(&self.meta, SNAPSHOT_KEY, encode_snapshot(&record));
        Ok(())
    }

    /// Makes the received file of `snapshot`, when every byte of it was written there, its
    /// snapshot file: synced, then renamed. False when there is no such file (its parts did not
    /// all come here, or writing one failed): the caller writes the whole snapshot.
    fn finish_received(&mut self, snapshot: &Snapshot) -> bool {
        let Some(received) = self.receiving.take() else {
            return false;
        };
        if received.index != snapshot.index || received.written != snapshot.data.len() as u64 {
            return false;
        }
        let dir = self.path.join(SNAPSHOT_DIR);
        let index = received.index;
        let renamed = received
            .finish()
            .and_then(|()| {
                std::fs::rename(
                    dir.join(receiving_file_name(index)),
                    dir.join(snapshot_file_name(index)),
                )
            })
            .and_then(|()| std::fs::File::open(&dir)?.sync_all());
        match renamed {
            Ok(()) => true,
            Err(error) => {
                tracing::warn!(%error, index = snapshot.index,
                    "the received snapshot file could not be kept; writing the snapshot whole");
                false
            }
        }
    }

    /// Stages the removal of every entry `<= through`, which `covered` (the snapshot's index
    /// once this write lands) must reach; returns the bounds it leaves.
    fn stage_compaction(
        &self,
        batch: &mut OwnedWriteBatch,
        bounds: Bounds,
        through: LogIndex,
        covered: LogIndex,
    ) -> Result<Bounds, StorageError> {
        if through > covered {
            return Err(StorageError::Backend(format!(
                "cannot compact through index {through}: the snapshot covers only up to {covered}"
            )));
        }
        if through < bounds.first_index {
            return Ok(bounds);
        }
        let end = (through + 1).min(bounds.next_index);
        // Lowest first: a prefix of this order still leaves a contiguous log.
        for index in bounds.first_index..end {
            batch.remove(&self.log, encode_key(index));
        }
        Ok(Bounds {
            first_index: through + 1,
            next_index: bounds.next_index.max(through + 1),
        })
    }

    /// Removes the snapshot files other than the current one's (after a sync made it current).
    fn prune_snapshot_files(&mut self) {
        self.snapshot_files_stale = false;
        // The current file, those staged for a later write and the one being received stay.
        let keep: Vec<String> = (crate::sync::lock(&self.staged).keys().copied())
            .chain(self.snapshot.as_ref().map(|s| s.index))
            .map(snapshot_file_name)
            .chain(
                self.receiving
                    .as_ref()
                    .map(|r| receiving_file_name(r.index)),
            )
            .collect();
        let Ok(listing) = std::fs::read_dir(self.path.join(SNAPSHOT_DIR)) else {
            return;
        };
        // A file being staged is partial until renamed; those a crash left are removed by
        // the first pruning after the store opened, before any snapshot is staged.
        let first_pruning = !std::mem::replace(&mut self.pruned_since_open, true);
        let doomed: Vec<PathBuf> = listing
            .flatten()
            .filter(|file| {
                let name = file.file_name();
                let name = name.to_string_lossy();
                !keep.iter().any(|kept| name == **kept)
                    && (first_pruning || !name.ends_with(".partial"))
            })
            .map(|file| file.path())
            .collect();
        if doomed.is_empty() {
            return;
        }
        // Unlinking a file of a gigabyte takes the filesystem a while: not on the driver.
        let remove = move || {
            for path in doomed {
                // Best effort: a file left over is removed at the next pruning.
                let _ = std::fs::remove_file(path);
            }
        };
        let spawned = std::thread::Builder::new()
            .name("consensus-prune".into())
            .spawn(remove.clone());
        if spawned.is_err() {
            remove();
        }
    }

    /// Stages the removal of entries `>= from`; returns the bounds it leaves.
    fn stage_truncate(
        &self,
        batch: &mut OwnedWriteBatch,
        bounds: Bounds,
        from: LogIndex,
    ) -> Result<Bounds, StorageError> {
        let from = from.max(1);
        if let Some(snapshot) = &self.snapshot
            && from <= snapshot.index
        {
            // The snapshot holds only committed entries, and committed entries are never removed.
            return Err(StorageError::NonContiguous {
                expected: snapshot.index + 1,
                got: from,
            });
        }
        let doomed: Range<LogIndex> = from.max(bounds.first_index)..bounds.next_index;
        // Highest first: fjall applies a batch atomically, but should a batch ever be split, a
        // prefix of this order still leaves a contiguous log.
        for index in doomed.rev() {
            batch.remove(&self.log, encode_key(index));
        }
        Ok(Bounds {
            first_index: bounds.first_index.min(from),
            next_index: bounds.next_index.min(from),
        })
    }

    /// Stages `entries` after the log as `bounds` leaves it; returns the new bounds.
    fn stage_append(
        &self,
        batch: &mut OwnedWriteBatch,
        bounds: Bounds,
        entries: &[Entry],
    ) -> Result<Bounds, StorageError> {
        let mut expected = bounds.next_index;
        for entry in entries {
            if entry.index != expected {
                return Err(StorageError::NonContiguous {
                    expected,
                    got: entry.index,
                });
            }
            batch.insert(&self.log, encode_key(entry.index), encode_entry(entry));
            expected += 1;
        }
        Ok(Bounds {
            first_index: bounds.first_index,
            next_index: expected,
        })
    }

    /// Stages record changes; checks them all first, so that a refused change stages nothing.
    ///
    /// fjall gives every item of a batch the same sequence number, so two items for one key would
    /// not keep their order: the changes are folded into the last one per key before staging, and
    /// a range delete also takes the keys put earlier in the same changes.
    fn stage_records(
        &self,
        batch: &mut OwnedWriteBatch,
        records: &[RecordWrite],
    ) -> Result<(), StorageError> {
        for record in records {
            record.check_size()?;
        }
        // The last change per key: a value to store, or `None` to remove the key.
        let mut last: BTreeMap<Vec<u8>, Option<&[u8]>> = BTreeMap::new();
        for record in records {
            match record {
                RecordWrite::Put { key, value } => {
                    last.insert(key.clone(), Some(value));
                }
                RecordWrite::Delete { key } => {
                    last.insert(key.clone(), None);
                }
                RecordWrite::DeleteRange { from, to } => {
                    if from >= to {
                        continue;
                    }
                    let range = (
                        Bound::Included(from.as_slice()),
                        Bound::Excluded(to.as_slice()),
                    );
                    for (_, change) in last.range_mut::<[u8], _>(range) {
                        *change = None;
                    }
                    for guard in self.records.range::<&[u8], _>(range) {
                        let key = guard.key().map_err(|e| fjall_error(e, "records"))?;
                        last.insert(key.to_vec(), None);
                    }
                }
            }
        }
        for (key, change) in last {
            match change {
                Some(value) => {
                    batch.insert(&self.records, key, seal(RecordKind::CoreRecord, value));
                }
                None => batch.remove(&self.records, key),
            }
        }
        Ok(())
    }

    /// Flushes (and under `SyncPolicy::EveryBatch` fsyncs) the journal, moving the mark.
    fn sync_journal(&mut self) -> Result<(), StorageError> {
        // Only a sync that fsyncs moves the mark: under `SyncPolicy::Never` a power cut may keep
        // the mark and lose the journal's writes, which the check would take for damage.
        let fsyncs = self.sync_policy == SyncPolicy::EveryBatch;
        let last = self.bounds.next_index.saturating_sub(1);
        if !fsyncs {
            return self
                .db
                .persist(self.sync_policy.persist_mode())
                .map_err(|error| fjall_error(error, "journal flush"));
        }
        self.mark
            .before_sync(last)
            .map_err(|source| StorageError::SyncFailed {
                what: "the synced-through mark",
                source,
            })?;
        self.db
            .persist(self.sync_policy.persist_mode())
            .map_err(|error| match error {
                ::fjall::Error::Io(source) => StorageError::SyncFailed {
                    what: "the journal",
                    source,
                },
                other => fjall_error(other, "journal sync"),
            })?;
        // Without an fsync (see `synced_mark`): a failure to write it only weakens the check.
        if let Err(error) = self.mark.after_sync(last) {
            tracing::warn!(%error, "cannot write the synced-through mark");
        }
        Ok(())
    }

    fn commit(&mut self, batch: OwnedWriteBatch, bounds: Bounds) -> Result<(), StorageError> {
        batch.commit().map_err(|e| fjall_error(e, "write batch"))?;
        self.bounds = bounds;
        Ok(())
    }
}

impl LogStore for FjallLogStore {
    fn save_hard_state(&mut self, hard_state: HardState) -> Result<(), StorageError> {
        let mut batch = self.db.batch();
        batch.insert(&self.meta, HARD_STATE_KEY, encode_hard_state(hard_state));
        self.commit(batch, self.bounds)
    }

    fn truncate_from(&mut self, from: LogIndex) -> Result<(), StorageError> {
        let mut batch = self.db.batch();
        let bounds = self.stage_truncate(&mut batch, self.bounds, from)?;
        self.commit(batch, bounds)
    }

    fn append(&mut self, entries: &[Entry]) -> Result<(), StorageError> {
        if entries.is_empty() {
            return Ok(());
        }
        let mut batch = self.db.batch();
        let bounds = self.stage_append(&mut batch, self.bounds, entries)?;
        self.commit(batch, bounds)
    }

    /// One batch per call, like every other write; durable at the next sync.
    fn write_records(&mut self, records: &[RecordWrite]) -> Result<(), StorageError> {
        if records.is_empty() {
            return Ok(());
        }
        let mut batch = self.db.batch();
        self.stage_records(&mut batch, records)?;
        self.commit(batch, self.bounds)
    }

    fn supports_snapshots(&self) -> bool {
        true
    }

    fn waits_for_disk(&self) -> bool {
        self.sync_policy == SyncPolicy::EveryBatch
    }

    fn snapshot_stager(&self) -> Option<std::sync::Arc<dyn SnapshotStager>> {
        Some(std::sync::Arc::new(FjallSnapshotStager {
            state_dir: self.path.clone(),
            staged: self.staged.clone(),
        }))
    }

    /// Hands the part to the writer thread of the snapshot's receiving file (started by the
    /// part at offset 0), so that the driver goes on receiving while the disk writes, and
    /// saving the snapshot only waits for the rest, syncs and renames. A part that does not
    /// continue the file, or a write that fails, drops the file: the snapshot is then written
    /// whole when saved.
    fn write_snapshot_part(&mut self, part: &super::SnapshotPart) -> Result<(), StorageError> {
        if part.offset == 0 {
            self.receiving = None;
            match ReceivingFile::start(&self.path.join(SNAPSHOT_DIR), part.index) {
                Ok(receiving) => self.receiving = Some(receiving),
                Err(error) => {
                    tracing::warn!(%error, "cannot start a file for the snapshot being received");
                    return Ok(());
                }
            }
        }
        let Some(receiving) = self.receiving.as_mut() else {
            return Ok(());
        };
        // A part that does not continue the file, or a writer that stopped (its error comes
        // out when the file is finished): drop it, the snapshot is written whole when saved.
        if receiving.index != part.index
            || receiving.written != part.offset
            || receiving.parts.send(part.data.clone()).is_err()
        {
            self.receiving = None;
            return Ok(());
        }
        receiving.written += part.data.len() as u64;
        Ok(())
    }

    fn save_snapshot(&mut self, snapshot: &Snapshot) -> Result<(), StorageError> {
        let mut batch = self.db.batch();
        self.stage_snapshot(&mut batch, snapshot)?;
        self.commit(batch, self.bounds)?;
        self.snapshot = Some(snapshot.clone());
        self.snapshot_files_stale = true;
        Ok(())
    }

    fn compact_through(&mut self, through: LogIndex) -> Result<(), StorageError> {
        let covered = self.snapshot.as_ref().map_or(0, |s| s.index);
        let mut batch = self.db.batch();
        let bounds = self.stage_compaction(&mut batch, self.bounds, through, covered)?;
        self.commit(batch, bounds)
    }

    fn sync(&mut self) -> Result<(), StorageError> {
        self.sync_journal()?;
        if self.snapshot_files_stale {
            self.prune_snapshot_files();
        }
        Ok(())
    }

    /// Reads and validates the whole store. Meant for start-up: on a store that has been written
    /// since it was opened, writes not yet synced are returned too. When a snapshot compacted the
    /// log, `entries` starts at or before one past the snapshot (returned too, its file checked
    /// against the length and CRC-32 of its record) instead of at index 1.
    fn recover(&mut self) -> Result<RecoveredState, StorageError> {
        synced_mark::check(
            self.bounds.next_index.saturating_sub(1),
            self.mark_at_open,
            &self.journal_cuts,
        )?;
        let hard_state = match self
            .meta
            .get(HARD_STATE_KEY)
            .map_err(|e| fjall_error(e, "hard state"))?
        {
            Some(value) => decode_hard_state(&value)?,
            None => HardState::default(),
        };
        let snapshot_index = self.snapshot.as_ref().map(|s| s.index);
        let mut entries = Vec::new();
        let mut expected: Option<LogIndex> = None;
        for guard in self.log.iter() {
            let (key, value) = guard.into_inner().map_err(|e| fjall_error(e, "log"))?;
            let key_index = decode_key(&key)?;
            let location = format!("log index {key_index}");
            let entry = decode_entry(&value, &location)?;
            if entry.index != key_index {
                return Err(corrupt(
                    location,
                    format!("record holds the entry of index {}", entry.index),
                ));
            }
            match expected {
                Some(expected) if key_index != expected => {
                    return Err(corrupt(
                        location,
                        format!("gap: expected index {expected} next"),
                    ));
                }
                None => {
                    // The log starts at 1, or anywhere up to just past the snapshot (a compaction
                    // may have stopped early); a later start would leave a hole nothing covers.
                    let latest_start = snapshot_index.map_or(1, |s| s + 1);
                    if key_index == 0 || key_index > latest_start {
                        return Err(corrupt(
                            location,
                            format!("log starts at {key_index}, expected at most {latest_start}"),
                        ));
                    }
                }
                Some(_) => {}
            }
            expected = Some(key_index + 1);
            entries.push(entry);
        }
        let mut records = BTreeMap::new();
        for guard in self.records.iter() {
            let (key, value) = guard.into_inner().map_err(|e| fjall_error(e, "records"))?;
            let location = format!("record {}", key.escape_ascii());
            let body = open_record(&value, RecordKind::CoreRecord, &location)?;
            records.insert(key.to_vec(), body.to_vec());
        }
        Ok(RecoveredState {
            hard_state,
            entries,
            records,
            snapshot: self.snapshot.clone(),
        })
    }

    /// One batch and one sync for the whole output: see the module documentation.
    fn persist(&mut self, output: &LogWrite) -> Result<(), StorageError> {
        for part in &output.snapshot_parts {
            self.write_snapshot_part(part)?;
        }
        if output.is_empty() {
            return Ok(());
        }
        let mut batch = self.db.batch();
        let mut bounds = self.bounds;
        if let Some(hard_state) = output.hard_state {
            batch.insert(&self.meta, HARD_STATE_KEY, encode_hard_state(hard_state));
        }
        self.stage_records(&mut batch, &output.records)?;
        // Checked against the snapshot held before this write (see `LogWrite`).
        if let Some(from) = output.truncate_from {
            bounds = self.stage_truncate(&mut batch, bounds, from)?;
        }
        if let Some(snapshot) = &output.snapshot {
            self.stage_snapshot(&mut batch, snapshot)?;
        }
        let covered = output
            .snapshot
            .as_ref()
            .or(self.snapshot.as_ref())
            .map_or(0, |s| s.index);
        if let Some(through) = output.compact_through {
            bounds = self.stage_compaction(&mut batch, bounds, through, covered)?;
        }
        bounds = self.stage_append(&mut batch, bounds, &output.append)?;
        self.commit(batch, bounds)?;
        if let Some(snapshot) = &output.snapshot {
            self.snapshot = Some(snapshot.clone());
            self.snapshot_files_stale = true;
        }
        self.sync()
    }
}

/// The most journal fjall keeps before it flushes memtables (its minimum is 64 MiB).
const MAX_JOURNALING_BYTES: u64 = 128 << 20;

fn database_builder(path: &Path) -> ::fjall::DatabaseBuilder<Database> {
    // Writes must reach the OS only at `sync`, so that one persist is one journal flush.
    // A journal is deleted only once every keyspace flushed what it holds, and the metadata
    // keyspace (a few small records) would pin them for ever: past this total fjall flushes
    // the oldest memtables, which bounds the disk a compacted log takes (fjall's default of
    // 512 MiB let a log of a few thousand entries hold hundreds of MiB of journal).
    Database::builder(path)
        .manual_journal_persist(true)
        .max_journaling_size(MAX_JOURNALING_BYTES)
}

/// Opens the database in `state_dir`, creating it first if there is none.
///
/// fjall creates a database in several steps (lock file, journal, version marker) and refuses a
/// directory where a killed process left only some of them. So a new database is built in a
/// staging directory, closed, and renamed into place: a crash during creation leaves only the
/// staging directory, which held no acknowledged write and is discarded on the next open.
fn open_database(state_dir: &Path) -> Result<Database, StorageError> {
    let live = state_dir.join(DATABASE_DIR);
    if !live.try_exists()? {
        std::fs::create_dir_all(state_dir)?;
        let staging = state_dir.join(STAGING_DIR);
        if staging.try_exists()? {
            tracing::warn!(path = %staging.display(), "removing a database left half-created by a crash");
            std::fs::remove_dir_all(&staging)?;
        }
        {
            let db = database_builder(&staging)
                .open()
                .map_err(|e| fjall_error(e, "new database"))?;
            for name in [LOG_KEYSPACE, META_KEYSPACE, RECORDS_KEYSPACE] {
                db.keyspace(name, KeyspaceCreateOptions::default)
                    .map_err(|e| fjall_error(e, "new keyspace"))?;
            }
            db.persist(PersistMode::SyncAll)
                .map_err(|e| fjall_error(e, "new database"))?;
            // Dropping the handles closes the database (and stops its threads) before the rename.
        }
        std::fs::rename(&staging, &live)?;
        // The rename is durable once the directory holding both names is synced.
        std::fs::File::open(state_dir)?.sync_all()?;
    }
    // fjall's journal recovery asserts (in debug builds) on some damaged entries instead of
    // returning an error: a damaged data directory must be a typed refusal, not a crash.
    let opened = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        database_builder(&live).open()
    }));
    let journals = || {
        let names: Vec<String> = synced_mark::journal_sizes(&live)
            .unwrap_or_default()
            .iter()
            .map(|(path, length)| format!("{} ({length} bytes)", path.display()))
            .collect();
        format!("journal {}", names.join(", "))
    };
    match opened {
        Ok(Err(::fjall::Error::JournalRecovery(error))) => Err(corrupt(
            journals(),
            format!(
                "a batch is damaged ({error:?}; fjall does not report the offset); \
                 refusing to start"
            ),
        )),
        Ok(opened) => opened.map_err(|e| fjall_error(e, "database")),
        Err(panic) => {
            let message = panic
                .downcast_ref::<String>()
                .map(String::as_str)
                .or_else(|| panic.downcast_ref::<&str>().copied())
                .unwrap_or("no message");
            Err(corrupt(
                journals(),
                format!(
                    "fjall's recovery failed on a damaged entry ({message}); refusing to start"
                ),
            ))
        }
    }
}

fn corrupt(location: impl Into<String>, detail: impl Into<String>) -> StorageError {
    StorageError::Corrupt {
        location: location.into(),
        detail: detail.into(),
    }
}

/// Sorts fjall's failures: damaged data is `Corrupt` (the node must not start on it), a failing
/// device is `Io`, the rest (a locked directory, a poisoned database) is `Backend`.
fn fjall_error(error: ::fjall::Error, location: &str) -> StorageError {
    match error {
        ::fjall::Error::Io(e) => StorageError::Io(e),
        ::fjall::Error::Storage(::fjall::LsmError::Io(e)) => StorageError::Io(e),
        ::fjall::Error::Storage(inner) => corrupt(location, format!("fjall table: {inner:?}")),
        e @ (::fjall::Error::JournalRecovery(_)
        | ::fjall::Error::InvalidVersion(_)
        | ::fjall::Error::Decompress(_)
        | ::fjall::Error::InvalidTrailer
        | ::fjall::Error::InvalidTag(_)
        | ::fjall::Error::Unrecoverable) => corrupt(location, format!("fjall: {e:?}")),
        other => StorageError::Backend(format!("{location}: {other:?}")),
    }
}

fn encode_key(index: LogIndex) -> [u8; 8] {
    index.to_be_bytes()
}

fn decode_key(key: &[u8]) -> Result<LogIndex, StorageError> {
    let bytes: [u8; 8] = key
        .try_into()
        .map_err(|_| corrupt("log key", format!("key of {} bytes, expected 8", key.len())))?;
    Ok(LogIndex::from_be_bytes(bytes))
}

/// The checksum over a record's header fields and body. The version is an argument so that a
/// record of an older version can be told from a damaged one.
fn record_crc(version: u8, kind: RecordKind, body: &[u8]) -> u32 {
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(&[version, kind as u8]);
    // Bodies are far below 4 GiB: fjall refuses values that large before we get here, and a
    // core's record values are bounded by `MAX_RECORD_VALUE_BYTES`.
    hasher.update(&(body.len() as u32).to_le_bytes());
    hasher.update(body);
    hasher.finalize()
}

fn seal(kind: RecordKind, body: &[u8]) -> Vec<u8> {
    let mut record = Vec::with_capacity(HEADER_LEN + body.len());
    record.push(kind.version());
    record.push(kind as u8);
    record.extend_from_slice(&(body.len() as u32).to_le_bytes());
    record.extend_from_slice(&record_crc(kind.version(), kind, body).to_le_bytes());
    record.extend_from_slice(body);
    record
}

/// Checks a record's header and checksum and returns its body.
fn open_record<'a>(
    record: &'a [u8],
    kind: RecordKind,
    location: &str,
) -> Result<&'a [u8], StorageError> {
    let Some((header, body)) = record.split_at_checked(HEADER_LEN) else {
        return Err(corrupt(
            location,
            format!(
                "record of {} bytes is shorter than its header",
                record.len()
            ),
        ));
    };
    // The kind first: each kind has its own version.
    if header[1] != kind as u8 {
        return Err(corrupt(
            location,
            format!(
                "record kind {} where {} was expected",
                header[1], kind as u8
            ),
        ));
    }
    let version = header[0];
    // An entry of version 1 holds its command in bincode. It is only called that once its
    // checksum (which covers the version) holds: a flipped version byte is damage.
    let bincode_era_entry = kind == RecordKind::Entry && version == 1;
    if version != kind.version() && !bincode_era_entry {
        return Err(corrupt(
            location,
            format!("unknown record version {version}"),
        ));
    }
    let length = u32::from_le_bytes([header[2], header[3], header[4], header[5]]) as usize;
    if length != body.len() {
        return Err(corrupt(
            location,
            format!(
                "record body is {} bytes, header says {length} (truncated or extended)",
                body.len()
            ),
        ));
    }
    let stored = u32::from_le_bytes([header[6], header[7], header[8], header[9]]);
    let computed = record_crc(version, kind, body);
    if stored != computed {
        return Err(corrupt(
            location,
            format!("checksum mismatch: stored {stored:#010x}, computed {computed:#010x}"),
        ));
    }
    if bincode_era_entry {
        return Err(StorageError::UnsupportedVersion {
            location: location.to_owned(),
            version,
            reason: "its command is in bincode, from before commands moved to postcard",
        });
    }
    Ok(body)
}

/// Reads fixed-size fields off a record body.
struct BodyReader<'a> {
    rest: &'a [u8],
    location: &'a str,
}

impl<'a> BodyReader<'a> {
    fn u8(&mut self, field: &str) -> Result<u8, StorageError> {
        let Some((&byte, rest)) = self.rest.split_first() else {
            return Err(corrupt(self.location, format!("body ends before {field}")));
        };
        self.rest = rest;
        Ok(byte)
    }

    fn array<const N: usize>(&mut self, field: &str) -> Result<[u8; N], StorageError> {
        let Some((bytes, rest)) = self.rest.split_first_chunk::<N>() else {
            return Err(corrupt(self.location, format!("body ends before {field}")));
        };
        self.rest = rest;
        Ok(*bytes)
    }

    fn u64(&mut self, field: &str) -> Result<u64, StorageError> {
        self.array(field).map(u64::from_le_bytes)
    }

    fn u32(&mut self, field: &str) -> Result<u32, StorageError> {
        self.array(field).map(u32::from_le_bytes)
    }

    /// A count of `noun`s (`field`), each taking at least `each` bytes: refused when the rest
    /// of the body could not hold them, so that a damaged count never sizes a loop.
    fn count(&mut self, field: &str, noun: &str, each: u64) -> Result<u64, StorageError> {
        let count = self.u64(field)?;
        if count > self.rest.len() as u64 / each {
            return Err(corrupt(
                self.location,
                format!("{field}: {count} {noun} in {} bytes", self.rest.len()),
            ));
        }
        Ok(count)
    }

    fn finish(self) -> Result<(), StorageError> {
        if self.rest.is_empty() {
            Ok(())
        } else {
            Err(corrupt(
                self.location,
                format!("{} unexpected bytes after the body", self.rest.len()),
            ))
        }
    }
}

const PAYLOAD_BLANK: u8 = 0;
const PAYLOAD_COMMAND: u8 = 1;
const PAYLOAD_MEMBERSHIP: u8 = 2;

/// Entry body: term, index, payload tag, then for a command the tag's proposer and request id and
/// the data (the rest of the body).
fn encode_entry(entry: &Entry) -> Vec<u8> {
    let mut body = Vec::with_capacity(17 + entry.payload.size_bytes());
    body.extend_from_slice(&entry.term.to_le_bytes());
    body.extend_from_slice(&entry.index.to_le_bytes());
    match &entry.payload {
        Payload::Blank => body.push(PAYLOAD_BLANK),
        Payload::Command { tag, data } => {
            body.push(PAYLOAD_COMMAND);
            body.extend_from_slice(&tag.proposer.0.to_le_bytes());
            body.extend_from_slice(&tag.request_id.to_le_bytes());
            body.extend_from_slice(data);
        }
        Payload::Membership(membership) => {
            body.push(PAYLOAD_MEMBERSHIP);
            encode_membership(membership, &mut body);
        }
    }
    seal(RecordKind::Entry, &body)
}

fn decode_entry(record: &[u8], location: &str) -> Result<Entry, StorageError> {
    let body = open_record(record, RecordKind::Entry, location)?;
    let mut reader = BodyReader {
        rest: body,
        location,
    };
    let term = reader.u64("term")?;
    let index = reader.u64("index")?;
    let payload = match reader.u8("payload tag")? {
        PAYLOAD_BLANK => {
            reader.finish()?;
            Payload::Blank
        }
        PAYLOAD_COMMAND => {
            let proposer = NodeId(reader.u64("proposer")?);
            let request_id = reader.u64("request id")?;
            let data = Bytes::copy_from_slice(reader.rest);
            Payload::Command {
                tag: ProposalTag {
                    proposer,
                    request_id,
                },
                data,
            }
        }
        PAYLOAD_MEMBERSHIP => {
            let membership = decode_membership(&mut reader)?;
            reader.finish()?;
            Payload::Membership(Box::new(membership))
        }
        other => return Err(corrupt(location, format!("unknown payload tag {other}"))),
    };
    Ok(Entry {
        term,
        index,
        payload,
    })
}

fn encode_hard_state(hard_state: HardState) -> Vec<u8> {
    let mut body = Vec::with_capacity(17);
    body.extend_from_slice(&hard_state.term.to_le_bytes());
    match hard_state.voted_for {
        None => body.push(0),
        Some(node) => {
            body.push(1);
            body.extend_from_slice(&node.0.to_le_bytes());
        }
    }
    seal(RecordKind::HardState, &body)
}

fn decode_hard_state(record: &[u8]) -> Result<HardState, StorageError> {
    let location = "hard state";
    let body = open_record(record, RecordKind::HardState, location)?;
    let mut reader = BodyReader {
        rest: body,
        location,
    };
    let term = reader.u64("term")?;
    let voted_for = match reader.u8("vote tag")? {
        0 => None,
        1 => Some(NodeId(reader.u64("vote")?)),
        other => return Err(corrupt(location, format!("unknown vote tag {other}"))),
    };
    reader.finish()?;
    Ok(HardState { term, voted_for })
}

fn encode_snapshot(record: &SnapshotRecord) -> Vec<u8> {
    let mut body = Vec::with_capacity(28);
    body.extend_from_slice(&record.index.to_le_bytes());
    body.extend_from_slice(&record.term.to_le_bytes());
    body.extend_from_slice(&record.length.to_le_bytes());
    body.extend_from_slice(&record.crc.to_le_bytes());
    // Records written before memberships existed end here; a membership follows a 1.
    if let Some(membership) = &record.membership {
        body.push(1);
        encode_membership(membership, &mut body);
    }
    seal(RecordKind::Snapshot, &body)
}

fn decode_snapshot(record: &[u8]) -> Result<SnapshotRecord, StorageError> {
    let location = "snapshot metadata";
    let body = open_record(record, RecordKind::Snapshot, location)?;
    let mut reader = BodyReader {
        rest: body,
        location,
    };
    let index = reader.u64("snapshot index")?;
    let term = reader.u64("snapshot term")?;
    let length = reader.u64("snapshot length")?;
    let crc = reader.u32("snapshot checksum")?;
    let membership = if reader.rest.is_empty() {
        None
    } else {
        match reader.u8("snapshot membership tag")? {
            1 => Some(decode_membership(&mut reader)?),
            other => {
                return Err(corrupt(
                    location,
                    format!("unknown snapshot membership tag {other}"),
                ));
            }
        }
    };
    reader.finish()?;
    Ok(SnapshotRecord {
        index,
        term,
        length,
        crc,
        membership,
    })
}

/// A membership: its voters, outgoing voters and learners, each a count and the ids; then,
/// when there are any, its addresses: a count and, for each, the id, the length and the UTF-8
/// bytes; then, when there are any, its members' public keys: a count and, for each, the id and
/// the 32 bytes (the address count is written, maybe 0, before them). A membership always ends
/// its record, so records written before addresses or keys existed still read, as a membership
/// without them.
fn encode_membership(membership: &crate::membership::Membership, body: &mut Vec<u8>) {
    for set in [
        &membership.voters,
        &membership.outgoing,
        &membership.learners,
    ] {
        body.extend_from_slice(&(set.len() as u64).to_le_bytes());
        for id in set {
            body.extend_from_slice(&id.0.to_le_bytes());
        }
    }
    if !membership.addresses.is_empty() || !membership.keys.is_empty() {
        body.extend_from_slice(&(membership.addresses.len() as u64).to_le_bytes());
        for (id, address) in &membership.addresses {
            body.extend_from_slice(&id.0.to_le_bytes());
            body.extend_from_slice(&(address.len() as u64).to_le_bytes());
            body.extend_from_slice(address.as_bytes());
        }
    }
    if !membership.keys.is_empty() {
        body.extend_from_slice(&(membership.keys.len() as u64).to_le_bytes());
        for (id, key) in &membership.keys {
            body.extend_from_slice(&id.0.to_le_bytes());
            body.extend_from_slice(key);
        }
    }
}

fn decode_membership(
    reader: &mut BodyReader<'_>,
) -> Result<crate::membership::Membership, StorageError> {
    let mut set = |what: &str| -> Result<std::collections::BTreeSet<NodeId>, StorageError> {
        let count = reader.count(what, "ids", 8)?;
        (0..count).map(|_| Ok(NodeId(reader.u64(what)?))).collect()
    };
    let voters = set("voters")?;
    let outgoing = set("outgoing voters")?;
    let learners = set("learners")?;
    let mut addresses = std::collections::BTreeMap::new();
    if !reader.rest.is_empty() {
        // An id and a length at least.
        for _ in 0..reader.count("address count", "addresses", 16)? {
            let id = NodeId(reader.u64("address id")?);
            let length = reader.u64("address length")?;
            if length > reader.rest.len() as u64 {
                return Err(corrupt(
                    reader.location,
                    format!("an address of {length} bytes in {}", reader.rest.len()),
                ));
            }
            let (bytes, rest) = reader.rest.split_at(length as usize);
            reader.rest = rest;
            let address = std::str::from_utf8(bytes)
                .map_err(|_| corrupt(reader.location, "an address is not UTF-8".to_string()))?;
            addresses.insert(id, address.to_string());
        }
    }
    let mut keys = std::collections::BTreeMap::new();
    if !reader.rest.is_empty() {
        for _ in 0..reader.count("key count", "keys", 40)? {
            let id = NodeId(reader.u64("key id")?);
            keys.insert(id, reader.array("key")?);
        }
    }
    Ok(crate::membership::Membership {
        voters,
        outgoing,
        learners,
        addresses,
        keys,
    })
}

fn snapshot_file_name(index: LogIndex) -> String {
    format!("snapshot-{index:020}.bin")
}

/// The file a snapshot being received is written to, renamed to its [`snapshot_file_name`]
/// once complete and synced (a crash leaves it, removed at the first pruning).
fn receiving_file_name(index: LogIndex) -> String {
    format!("snapshot-{index:020}.bin.receiving")
}

/// A leader's snapshot being written as it arrives.
#[derive(Debug)]
struct ReceivingFile {
    index: LogIndex,
    /// Bytes handed to the writer so far, from the start.
    written: u64,
    /// The parts for the writer thread, which owns the file.
    parts: std::sync::mpsc::SyncSender<bytes::Bytes>,
    /// The writer: the file once every part is written, or the first error.
    writer: std::thread::JoinHandle<std::io::Result<std::fs::File>>,
}

/// Parts a receiving file's writer may hold unwritten: the driver waits beyond this many
/// (about 64 MiB of 1 MiB chunks), so that a disk slower than the network bounds the memory.
const RECEIVING_PARTS_QUEUED: usize = 64;

/// Written through the page cache (where direct I/O is refused), the receiving file is synced
/// each time this many bytes were written since the last sync, so that the disk writes while
/// the rest arrives and the sync at the end has little left. Without it the kernel starts
/// writing back only when the dirty pages pass its thresholds (a tenth of memory, or 30 s
/// old), so a 1 GiB snapshot was written to disk entirely by the final sync: 1 to 2.5 s on
/// this machine's disk after the last byte arrived.
const RECEIVING_SYNC_BYTES: usize = 32 << 20;

/// Direct I/O's alignment of memory, lengths and offsets (the largest logical block size in
/// common use).
const DIRECT_ALIGN: usize = 4096;

/// The direct writer's staging buffer: each write to the disk is this many bytes.
const DIRECT_STAGING: usize = 4 << 20;

/// Writes a received snapshot's parts to its file, in order. Where the file system allows it
/// (Linux, `O_DIRECT`) the bytes go to the disk without the page cache: a snapshot the size of
/// the state neither evicts the node's hot pages nor pays for fresh page-cache pages, which on
/// the VM measured cost more than the disk (writing a GiB into fresh pages: 3.1 s; the state
/// sync of a GiB took 5.24 s against 5.60 s, and the leader's commit p99 meanwhile was 7-13 ms
/// against 35-42 ms). Direct writes need aligned memory, lengths and
/// offsets: parts are gathered in an aligned staging buffer written whole, and the tail is
/// written padded, then the file is cut back to its size. A file system that refuses direct
/// I/O, at the start or at a write, gets buffered writes synced every
/// [`RECEIVING_SYNC_BYTES`].
struct SnapshotFileWriter {
    file: std::fs::File,
    direct: bool,
    /// `DIRECT_STAGING + DIRECT_ALIGN` bytes, of which `staging[aligned..aligned +
    /// DIRECT_STAGING]` is aligned (found with `align_offset`, the allocation never moves).
    staging: Vec<u8>,
    aligned: usize,
    /// Bytes in the staging buffer.
    staged: usize,
    /// Bytes in the file, from the start.
    written: u64,
    /// Buffered bytes written since the last sync.
    unsynced: usize,
}

impl SnapshotFileWriter {
    /// A writer of `file`, asking for direct I/O if `try_direct`.
    fn new(file: std::fs::File, try_direct: bool) -> Self {
        let staging = if try_direct {
            vec![0; DIRECT_STAGING + DIRECT_ALIGN]
        } else {
            Vec::new()
        };
        let aligned = staging.as_ptr().align_offset(DIRECT_ALIGN);
        // The file is switched to direct I/O only once an aligned buffer is there to feed it.
        let direct = try_direct && aligned < DIRECT_ALIGN && Self::ask_for_direct_io(&file);
        SnapshotFileWriter {
            file,
            direct,
            staging,
            aligned,
            staged: 0,
            written: 0,
            unsynced: 0,
        }
    }

    #[cfg(target_os = "linux")]
    fn ask_for_direct_io(file: &std::fs::File) -> bool {
        use rustix::fs::{OFlags, fcntl_getfl, fcntl_setfl};
        fcntl_getfl(file).is_ok_and(|flags| fcntl_setfl(file, flags | OFlags::DIRECT).is_ok())
    }

    #[cfg(not(target_os = "linux"))]
    fn ask_for_direct_io(_: &std::fs::File) -> bool {
        false
    }

    /// Back to buffered writes (a direct write was refused).
    fn give_up_direct_io(&mut self) -> std::io::Result<()> {
        #[cfg(target_os = "linux")]
        {
            use rustix::fs::{OFlags, fcntl_getfl, fcntl_setfl};
            let flags = fcntl_getfl(&self.file)?;
            fcntl_setfl(&self.file, flags - OFlags::DIRECT)?;
        }
        self.direct = false;
        Ok(())
    }

    fn push(&mut self, mut part: &[u8]) -> std::io::Result<()> {
        use std::io::Write;
        while self.direct && !part.is_empty() {
            let room = DIRECT_STAGING - self.staged;
            let taken = room.min(part.len());
            let at = self.aligned + self.staged;
            self.staging[at..at + taken].copy_from_slice(&part[..taken]);
            self.staged += taken;
            part = &part[taken..];
            if self.staged == DIRECT_STAGING {
                self.write_staged(DIRECT_STAGING)?;
            }
        }
        if part.is_empty() {
            return Ok(());
        }
        self.file.write_all(part)?;
        self.written += part.len() as u64;
        self.unsynced += part.len();
        if self.unsynced >= RECEIVING_SYNC_BYTES {
            self.file.sync_data()?;
            self.unsynced = 0;
        }
        Ok(())
    }

    /// Writes the staged bytes at the end of the file: `length` of them, the staged ones
    /// padded to a multiple of [`DIRECT_ALIGN`]. A refused direct write is made buffered.
    fn write_staged(&mut self, length: usize) -> std::io::Result<()> {
        use std::io::{Seek, Write};
        let bytes = &self.staging[self.aligned..self.aligned + length];
        match self.file.write_all(bytes) {
            Ok(()) => {}
            Err(error) if error.raw_os_error() == Some(rustix::io::Errno::INVAL.raw_os_error()) => {
                tracing::debug!(%error, "direct I/O refused; writing the snapshot through the page cache");
                self.give_up_direct_io()?;
                // From where the refused write started, whatever it wrote.
                self.file.seek(std::io::SeekFrom::Start(self.written))?;
                let bytes = &self.staging[self.aligned..self.aligned + length];
                self.file.write_all(bytes)?;
            }
            Err(error) => return Err(error),
        }
        self.written += self.staged as u64;
        self.staged = 0;
        Ok(())
    }

    /// Writes what is staged and returns the file, at its size.
    fn finish(mut self) -> std::io::Result<std::fs::File> {
        if self.staged > 0 {
            let padded = self.staged.next_multiple_of(DIRECT_ALIGN);
            let at = self.aligned + self.staged;
            self.staging[at..self.aligned + padded].fill(0);
            self.write_staged(padded)?;
        }
        // The padding of the last direct write goes (and the position with it: nothing is
        // written after this).
        self.file.set_len(self.written)?;
        Ok(self.file)
    }
}

impl ReceivingFile {
    /// Starts the file of the snapshot through `index` and its writer thread.
    fn start(dir: &Path, index: LogIndex) -> std::io::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let file = std::fs::File::create(dir.join(receiving_file_name(index)))?;
        let (parts, queue) = std::sync::mpsc::sync_channel::<bytes::Bytes>(RECEIVING_PARTS_QUEUED);
        let writer = std::thread::Builder::new()
            .name("consensus-snapshot-receive".into())
            .spawn(move || {
                let mut writer = SnapshotFileWriter::new(file, true);
                for part in queue {
                    writer.push(&part)?;
                }
                writer.finish()
            })?;
        Ok(ReceivingFile {
            index,
            written: 0,
            parts,
            writer,
        })
    }

    /// Waits for every part to be written and syncs the file.
    fn finish(self) -> std::io::Result<()> {
        drop(self.parts);
        let file = self
            .writer
            .join()
            .map_err(|_| std::io::Error::other("the snapshot writer thread panicked"))??;
        file.sync_all()
    }
}

/// Writes the snapshot's bytes to their file and syncs the file and the directory.
fn write_snapshot_file(state_dir: &Path, snapshot: &Snapshot) -> Result<(), StorageError> {
    use std::io::Write;
    let dir = state_dir.join(SNAPSHOT_DIR);
    std::fs::create_dir_all(&dir)?;
    let name = snapshot_file_name(snapshot.index);
    let staging = dir.join(format!("{name}.partial"));
    let sync_failed = |what| move |source| StorageError::SyncFailed { what, source };
    let mut file = std::fs::File::create(&staging)?;
    file.write_all(&snapshot.data)?;
    file.sync_all().map_err(sync_failed("a snapshot file"))?;
    std::fs::rename(&staging, dir.join(name))?;
    std::fs::File::open(&dir)?
        .sync_all()
        .map_err(sync_failed("the snapshot directory"))?;
    Ok(())
}

/// Reads the snapshot `record` names and checks its length and checksum.
fn read_snapshot_file(state_dir: &Path, record: SnapshotRecord) -> Result<Snapshot, StorageError> {
    let path = state_dir
        .join(SNAPSHOT_DIR)
        .join(snapshot_file_name(record.index));
    let location = format!("snapshot file {}", path.display());
    let data = std::fs::read(&path).map_err(|error| corrupt(&location, error.to_string()))?;
    if data.len() as u64 != record.length || crc32fast::hash(&data) != record.crc {
        return Err(corrupt(
            location,
            format!(
                "{} bytes with CRC-32 {:08x}, but the metadata says {} bytes with CRC-32 {:08x}",
                data.len(),
                crc32fast::hash(&data),
                record.length,
                record.crc
            ),
        ));
    }
    Ok(Snapshot {
        index: record.index,
        term: record.term,
        data: data.into(),
        membership: record.membership,
    })
}

#[cfg(all(test, feature = "gpu", feature = "server"))]
mod fuzz;
mod synced_mark;

pub use synced_mark::SYNCED_MARK_FILE;
use synced_mark::{JournalCut, SyncedMark};

#[cfg(test)]
mod tests {
    /// Parts of odd sizes, across the staging buffer's size and with a tail that is no multiple
    /// of the alignment, make the same file written directly or through the page cache.
    #[test]
    fn the_snapshot_file_writer_keeps_every_byte_direct_or_not() {
        use super::{DIRECT_STAGING, SnapshotFileWriter};
        let dir = tempfile::tempdir().unwrap();
        let data: Vec<u8> = (0..2 * DIRECT_STAGING + 12_345)
            .map(|i| (i % 253) as u8)
            .collect();
        for try_direct in [true, false] {
            let path = dir.path().join(format!("direct-{try_direct}"));
            let file = std::fs::File::create(&path).unwrap();
            // Where the file system refuses O_DIRECT both runs are buffered.
            let mut writer = SnapshotFileWriter::new(file, try_direct);
            for part in data.chunks(1_000_003) {
                writer.push(part).unwrap();
            }
            drop(writer.finish().unwrap());
            assert!(
                std::fs::read(&path).unwrap() == data,
                "direct: {try_direct}"
            );
        }
    }

    /// A direct write refused part-way through the file (here: the staging buffer knocked off
    /// its alignment after the first direct write, which `O_DIRECT` refuses with `EINVAL`)
    /// turns the writer buffered from where that write started, and the file still holds
    /// every byte once. Where the file system refuses `O_DIRECT` from the start there is no
    /// direct write to refuse, and the test says so.
    #[test]
    fn a_direct_write_refused_mid_file_is_written_again_through_the_page_cache() {
        use super::{DIRECT_STAGING, SnapshotFileWriter};
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("refused");
        let file = std::fs::File::create(&path).unwrap();
        let mut writer = SnapshotFileWriter::new(file, true);
        if !writer.direct {
            eprintln!(
                "skipped: {} refuses O_DIRECT, so no direct write can be refused mid-file",
                dir.path().display()
            );
            return;
        }
        let data: Vec<u8> = (0..3 * DIRECT_STAGING + 777)
            .map(|i| (i % 251) as u8)
            .collect();
        let (first, rest) = data.split_at(DIRECT_STAGING);
        writer.push(first).unwrap();
        assert!(writer.direct, "the first staging buffer went out directly");
        assert_eq!((writer.written, writer.staged), (DIRECT_STAGING as u64, 0));
        // Nothing is staged, so moving the staging window one byte moves no data.
        writer.aligned += 1;
        for part in rest.chunks(999_983) {
            writer.push(part).unwrap();
        }
        assert!(
            !writer.direct,
            "the misaligned write was refused and the writer gave up"
        );
        drop(writer.finish().unwrap());
        assert!(std::fs::read(&path).unwrap() == data);
    }

    use super::*;

    fn command(index: LogIndex, term: Term, data: &[u8]) -> Entry {
        Entry {
            index,
            term,
            payload: Payload::Command {
                tag: ProposalTag {
                    proposer: NodeId(3),
                    request_id: index.wrapping_mul(7),
                },
                data: Bytes::copy_from_slice(data),
            },
        }
    }

    /// Version 1 entries are an older format only when their checksum says so; a version 2
    /// entry whose version byte was flipped to 1 is damage.
    #[test]
    fn a_version_byte_flipped_to_one_is_corruption_not_an_old_entry() {
        let mut record = encode_entry(&command(4, 2, b"x"));
        assert_eq!(record[0], ENTRY_RECORD_VERSION);
        record[0] = 1;
        match decode_entry(&record, "log index 4") {
            Err(StorageError::Corrupt { detail, .. }) => {
                assert!(detail.contains("checksum"), "{detail}")
            }
            other => panic!("expected a checksum mismatch, got {other:?}"),
        }
        let body = &record[HEADER_LEN..];
        let old = {
            let mut old = record[..HEADER_LEN].to_vec();
            old[6..10].copy_from_slice(&record_crc(1, RecordKind::Entry, body).to_le_bytes());
            old.extend_from_slice(body);
            old
        };
        assert!(matches!(
            decode_entry(&old, "log index 4"),
            Err(StorageError::UnsupportedVersion { version: 1, .. })
        ));
    }

    #[test]
    fn records_round_trip() {
        for entry in [
            command(1, 1, b""),
            command(u64::MAX, 9, b"\x00\xffpayload"),
            Entry {
                index: 5,
                term: 2,
                payload: Payload::Blank,
            },
        ] {
            assert_eq!(decode_entry(&encode_entry(&entry), "t").unwrap(), entry);
        }
        for hard_state in [
            HardState::default(),
            HardState {
                term: 7,
                voted_for: Some(NodeId(u64::MAX)),
            },
        ] {
            assert_eq!(
                decode_hard_state(&encode_hard_state(hard_state)).unwrap(),
                hard_state
            );
        }
        let mut snapshot = SnapshotRecord {
            index: 10,
            term: 3,
            length: 4,
            crc: 0xdead_beef,
            membership: None,
        };
        assert_eq!(
            decode_snapshot(&encode_snapshot(&snapshot)).unwrap(),
            snapshot
        );
        snapshot.membership = Some(crate::membership::Membership {
            voters: [NodeId(2), NodeId(3)].into(),
            outgoing: [NodeId(1), NodeId(2)].into(),
            learners: [NodeId(7)].into(),
            addresses: [(NodeId(7), "node-7@10.0.0.7:7000".to_string())].into(),
            keys: Default::default(),
        });
        assert_eq!(
            decode_snapshot(&encode_snapshot(&snapshot)).unwrap(),
            snapshot
        );
        let entry = Entry {
            term: 4,
            index: 11,
            payload: Payload::Membership(Box::new(snapshot.membership.clone().unwrap())),
        };
        assert_eq!(decode_entry(&encode_entry(&entry), "test").unwrap(), entry);
        // Keys, with and without addresses before them.
        let mut keyed = snapshot.membership.clone().unwrap();
        keyed.keys = [(NodeId(2), [2; 32]), (NodeId(7), [7; 32])].into();
        for addresses in [keyed.addresses.clone(), Default::default()] {
            let entry = Entry {
                payload: Payload::Membership(Box::new(crate::membership::Membership {
                    addresses,
                    ..keyed.clone()
                })),
                ..entry.clone()
            };
            assert_eq!(decode_entry(&encode_entry(&entry), "test").unwrap(), entry);
        }
    }

    #[test]
    fn every_single_byte_flip_and_truncation_is_detected() {
        let record = encode_entry(&command(4, 2, b"some command bytes"));
        for position in 0..record.len() {
            let mut damaged = record.clone();
            damaged[position] ^= 0x20;
            let err = decode_entry(&damaged, "log index 4").unwrap_err();
            assert!(
                matches!(err, StorageError::Corrupt { .. }),
                "flip at {position}: {err}"
            );
        }
        for length in 0..record.len() {
            let err = decode_entry(&record[..length], "log index 4").unwrap_err();
            assert!(
                matches!(err, StorageError::Corrupt { .. }),
                "cut at {length}: {err}"
            );
        }
    }

    #[test]
    fn a_record_of_another_kind_is_refused() {
        let record = encode_hard_state(HardState {
            term: 1,
            voted_for: None,
        });
        let err = decode_entry(&record, "log index 1").unwrap_err();
        assert!(err.to_string().contains("kind"), "{err}");
    }
}
