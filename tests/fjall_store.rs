//! The fjall log store: what is written comes back after a restart, damage is reported as a typed
//! error, and a process killed with SIGKILL at random moments never loses an acknowledged entry.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use consensus::storage::{
    DATABASE_DIR, FjallLogStore, HARD_STATE_KEY, HardState, LOG_KEYSPACE, LogStore, LogWrite,
    MAX_RECORD_KEY_BYTES, META_KEYSPACE, RECORDS_KEYSPACE, RecordWrite, SNAPSHOT_DIR, Snapshot,
    SnapshotPart, SyncPolicy,
};
use consensus::{Entry, LogIndex, NodeId, Payload, ProposalTag, StorageError, Term};

/// A small deterministic generator, so a failing trial can be replayed from its printed seed.
struct SplitMix(u64);

impl SplitMix {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, bound: u64) -> u64 {
        self.next() % bound
    }
}

/// The one payload an entry at `index` written in `term` carries in these tests, so that any entry
/// read back can be checked for damage on its own.
fn expected_payload(index: LogIndex, term: Term) -> Payload {
    if (index + term).is_multiple_of(11) {
        return Payload::Blank;
    }
    let mut rng = SplitMix(index ^ (term << 40));
    let len = rng.below(300) as usize;
    let data: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
    Payload::Command {
        tag: ProposalTag {
            proposer: NodeId(term),
            request_id: index,
        },
        data: Bytes::from(data),
    }
}

fn entry(index: LogIndex, term: Term) -> Entry {
    Entry {
        index,
        term,
        payload: expected_payload(index, term),
    }
}

fn entries(range: std::ops::RangeInclusive<LogIndex>, term: Term) -> Vec<Entry> {
    range.map(|index| entry(index, term)).collect()
}

fn open(dir: &Path) -> FjallLogStore {
    FjallLogStore::open(dir, SyncPolicy::EveryBatch).expect("open store")
}

/// A store that syncs every batch says it waits for the disk (the engine then persists beside
/// its driver's thread); one that never syncs, and the memory store, do not.
#[test]
fn only_a_store_that_syncs_says_it_waits_for_the_disk() {
    let synced = tempfile::tempdir().unwrap();
    assert!(open(synced.path()).waits_for_disk());
    let buffered = tempfile::tempdir().unwrap();
    let store = FjallLogStore::open(buffered.path(), SyncPolicy::Never).expect("open store");
    assert!(!store.waits_for_disk());
    assert!(!consensus::storage::MemoryLogStore::default().waits_for_disk());
}

#[test]
fn reopen_after_clean_stop_returns_exactly_what_was_written() {
    let dir = tempfile::tempdir().unwrap();
    let hard_state = HardState {
        term: 3,
        voted_for: Some(NodeId(2)),
    };
    let written = [entries(1..=40, 1), entries(41..=70, 3)].concat();
    {
        let mut store = open(dir.path());
        assert_eq!(
            store.recover().unwrap(),
            Default::default(),
            "a new store is empty"
        );
        store.save_hard_state(hard_state).unwrap();
        store.append(&written[..40]).unwrap();
        store.append(&written[40..]).unwrap();
        store.sync().unwrap();
    }
    let mut store = open(dir.path());
    let recovered = store.recover().unwrap();
    assert_eq!(recovered.hard_state, hard_state);
    assert_eq!(recovered.entries, written);
    assert_eq!(store.next_index(), 71);
    // Writing goes on where the log ends.
    store.append(&[entry(71, 3)]).unwrap();
    let err = store.append(&[entry(73, 3)]).unwrap_err();
    assert!(
        matches!(
            err,
            StorageError::NonContiguous {
                expected: 72,
                got: 73
            }
        ),
        "{err}"
    );
}

#[test]
fn a_gap_inside_one_append_is_refused_and_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = open(dir.path());
    store.append(&entries(1..=2, 1)).unwrap();
    let err = store.append(&[entry(3, 1), entry(5, 1)]).unwrap_err();
    assert!(
        matches!(
            err,
            StorageError::NonContiguous {
                expected: 4,
                got: 5
            }
        ),
        "{err}"
    );
    store.sync().unwrap();
    assert_eq!(store.recover().unwrap().entries, entries(1..=2, 1));
}

#[test]
fn truncate_then_append_replaces_the_suffix_durably() {
    let dir = tempfile::tempdir().unwrap();
    {
        let mut store = open(dir.path());
        store.append(&entries(1..=10, 1)).unwrap();
        store.sync().unwrap();
        store.truncate_from(6).unwrap();
        store.append(&entries(6..=8, 2)).unwrap();
        store.sync().unwrap();
        // Truncating past the end removes nothing; truncating everything empties the log.
        store.truncate_from(100).unwrap();
        assert_eq!(store.next_index(), 9);
    }
    let mut store = open(dir.path());
    let expected = [entries(1..=5, 1), entries(6..=8, 2)].concat();
    assert_eq!(store.recover().unwrap().entries, expected);
    store.truncate_from(1).unwrap();
    store.append(&entries(1..=2, 4)).unwrap();
    store.sync().unwrap();
    drop(store);
    assert_eq!(
        open(dir.path()).recover().unwrap().entries,
        entries(1..=2, 4)
    );
}

#[test]
fn persist_writes_a_whole_output_in_one_batch() {
    let dir = tempfile::tempdir().unwrap();
    let hard_state = HardState {
        term: 5,
        voted_for: None,
    };
    {
        let mut store = open(dir.path());
        store.append(&entries(1..=6, 1)).unwrap();
        store.sync().unwrap();
        let output = LogWrite {
            hard_state: Some(hard_state),
            truncate_from: Some(4),
            append: entries(4..=9, 5),
            ..Default::default()
        };
        store.persist(&output).unwrap();
        // A bad output is refused as a whole: nothing of it is written.
        let bad = LogWrite {
            hard_state: Some(HardState {
                term: 9,
                voted_for: None,
            }),
            append: vec![entry(11, 9)],
            ..Default::default()
        };
        assert!(matches!(
            store.persist(&bad),
            Err(StorageError::NonContiguous { .. })
        ));
        store.sync().unwrap();
    }
    let recovered = open(dir.path()).recover().unwrap();
    assert_eq!(recovered.hard_state, hard_state);
    assert_eq!(
        recovered.entries,
        [entries(1..=3, 1), entries(4..=9, 5)].concat()
    );
}

#[test]
fn snapshots_and_compaction_survive_reopen() {
    // (The store prunes older snapshot files on a thread of its own: see the helper.)
    let dir = tempfile::tempdir().unwrap();
    let snapshot = Snapshot {
        index: 5,
        term: 1,
        data: Bytes::from_static(b"state machine image"),
        // Kept with the snapshot: the log that held it is compacted away.
        membership: Some(consensus::Membership {
            voters: [NodeId(1), NodeId(2), NodeId(4)].into(),
            outgoing: Default::default(),
            learners: [NodeId(5)].into(),
            addresses: [(NodeId(5), "node-5@127.0.0.1:7005".to_string())].into(),
            keys: Default::default(),
        }),
    };
    {
        let mut store = open(dir.path());
        store.append(&entries(1..=8, 1)).unwrap();
        let err = store.compact_through(5).unwrap_err();
        assert!(
            err.to_string().contains("snapshot"),
            "compaction needs a snapshot: {err}"
        );
        store.save_snapshot(&snapshot).unwrap();
        store.compact_through(5).unwrap();
        store.sync().unwrap();
        assert_eq!(store.snapshot(), Some(&snapshot));
    }
    let mut store = open(dir.path());
    assert_eq!(store.snapshot(), Some(&snapshot));
    let recovered = store.recover().unwrap();
    assert_eq!(recovered.entries, entries(6..=8, 1));
    assert_eq!(recovered.snapshot, Some(snapshot.clone()));
    // Committed entries are never truncated, so nothing the snapshot covers may be.
    assert!(matches!(
        store.truncate_from(5),
        Err(StorageError::NonContiguous { .. })
    ));
    // A snapshot past the end of the log discards the log; appends go on after it. One
    // persisted write carries all three, as a follower installing a snapshot sends them.
    let ahead = Snapshot {
        index: 20,
        term: 2,
        data: Bytes::from(vec![7u8; 100_000]),
        membership: None,
    };
    store
        .persist(&LogWrite {
            snapshot: Some(ahead.clone()),
            compact_through: Some(20),
            append: vec![entry(21, 2)],
            ..Default::default()
        })
        .unwrap();
    drop(store);
    let mut store = open(dir.path());
    let recovered = store.recover().unwrap();
    assert_eq!(recovered.entries, vec![entry(21, 2)]);
    assert_eq!(recovered.snapshot, Some(ahead.clone()));
    let files = snapshot_files_once_pruned(dir.path(), 1);
    assert_eq!(
        files.len(),
        1,
        "the older snapshot's file is gone: {files:?}"
    );
    let older = Snapshot { index: 3, ..ahead };
    assert!(
        store.save_snapshot(&older).is_err(),
        "an older snapshot is refused"
    );
}

#[test]
fn a_damaged_or_missing_snapshot_file_is_reported_not_loaded() {
    let dir = tempfile::tempdir().unwrap();
    {
        let mut store = open(dir.path());
        store.append(&entries(1..=4, 1)).unwrap();
        store
            .persist(&LogWrite {
                snapshot: Some(Snapshot {
                    index: 3,
                    term: 1,
                    data: Bytes::from_static(b"the applied state through 3"),
                    membership: None,
                }),
                compact_through: Some(3),
                ..Default::default()
            })
            .unwrap();
    }
    let file = std::fs::read_dir(dir.path().join(SNAPSHOT_DIR))
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    let mut bytes = std::fs::read(&file).unwrap();
    bytes[4] ^= 1;
    std::fs::write(&file, &bytes).unwrap();
    let err = FjallLogStore::open(dir.path(), SyncPolicy::EveryBatch).unwrap_err();
    assert!(
        matches!(err, StorageError::Corrupt { .. }) && err.to_string().contains("CRC-32"),
        "{err}"
    );
    std::fs::remove_file(&file).unwrap();
    let err = FjallLogStore::open(dir.path(), SyncPolicy::EveryBatch).unwrap_err();
    assert!(matches!(err, StorageError::Corrupt { .. }), "{err}");
}

#[test]
fn a_database_left_half_created_by_a_crash_is_rebuilt() {
    // A process killed while fjall was creating its files leaves some of them (found by the
    // SIGKILL test); only the staging directory can hold such leftovers.
    let dir = tempfile::tempdir().unwrap();
    let staging = dir.path().join(format!("{DATABASE_DIR}.creating"));
    std::fs::create_dir_all(&staging).unwrap();
    std::fs::write(staging.join("lock"), b"").unwrap();
    {
        let mut store = open(dir.path());
        assert_eq!(store.recover().unwrap(), Default::default());
        store.append(&entries(1..=3, 1)).unwrap();
        store.sync().unwrap();
    }
    assert!(!staging.exists());
    assert_eq!(
        open(dir.path()).recover().unwrap().entries,
        entries(1..=3, 1)
    );
}

#[test]
fn a_directory_in_use_is_refused_with_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let _store = open(dir.path());
    let err = FjallLogStore::open(dir.path(), SyncPolicy::EveryBatch).unwrap_err();
    assert!(
        matches!(err, StorageError::Backend(_) | StorageError::Io(_)),
        "{err}"
    );
}

/// Writes a store with entries 1..=5 and a hard state, then lets `damage` change the raw
/// keyspaces, and returns what the reopened store says.
fn recover_after_damage(
    damage: impl FnOnce(&fjall::Keyspace, &fjall::Keyspace),
) -> Result<(), StorageError> {
    let dir = tempfile::tempdir().unwrap();
    {
        let mut store = open(dir.path());
        store
            .save_hard_state(HardState {
                term: 1,
                voted_for: Some(NodeId(1)),
            })
            .unwrap();
        store.append(&entries(1..=5, 1)).unwrap();
        store.sync().unwrap();
    }
    {
        let db = fjall::Database::builder(dir.path().join(DATABASE_DIR))
            .open()
            .unwrap();
        let log = db
            .keyspace(LOG_KEYSPACE, fjall::KeyspaceCreateOptions::default)
            .unwrap();
        let meta = db
            .keyspace(META_KEYSPACE, fjall::KeyspaceCreateOptions::default)
            .unwrap();
        damage(&log, &meta);
        db.persist(fjall::PersistMode::SyncAll).unwrap();
    }
    let mut store = FjallLogStore::open(dir.path(), SyncPolicy::EveryBatch)?;
    store.recover().map(|_| ())
}

fn assert_corrupt(result: Result<(), StorageError>, location: &str, detail: &str) {
    match result {
        Err(StorageError::Corrupt {
            location: got_location,
            detail: got_detail,
        }) => {
            assert_eq!(got_location, location, "detail: {got_detail}");
            assert!(
                got_detail.contains(detail),
                "{got_detail:?} should mention {detail:?}"
            );
        }
        other => panic!("expected Corrupt at {location}, got {other:?}"),
    }
}

fn key(index: LogIndex) -> [u8; 8] {
    index.to_be_bytes()
}

#[test]
fn damaged_records_are_typed_corruption_errors() {
    assert!(
        recover_after_damage(|_, _| {}).is_ok(),
        "the undamaged store recovers"
    );

    let flipped = recover_after_damage(|log, _| {
        let mut value = log.get(key(3)).unwrap().unwrap().to_vec();
        let last = value.len() - 1;
        value[last] ^= 0x01;
        log.insert(key(3), value).unwrap();
    });
    assert_corrupt(flipped, "log index 3", "checksum");

    let truncated = recover_after_damage(|log, _| {
        let value = log.get(key(2)).unwrap().unwrap().to_vec();
        log.insert(key(2), value[..value.len() - 3].to_vec())
            .unwrap();
    });
    assert_corrupt(truncated, "log index 2", "truncated");

    let misplaced = recover_after_damage(|log, _| {
        let value = log.get(key(2)).unwrap().unwrap();
        log.insert(key(4), value).unwrap();
    });
    assert_corrupt(misplaced, "log index 4", "index 2");

    let gap = recover_after_damage(|log, _| log.remove(key(3)).unwrap());
    assert_corrupt(gap, "log index 4", "gap");

    let garbage =
        recover_after_damage(|log, _| log.insert(key(5), b"not a record".to_vec()).unwrap());
    assert_corrupt(garbage, "log index 5", "");

    let hard_state = recover_after_damage(|_, meta| {
        let mut value = meta.get(HARD_STATE_KEY).unwrap().unwrap().to_vec();
        value[12] ^= 0xff;
        meta.insert(HARD_STATE_KEY, value).unwrap();
    });
    assert_corrupt(hard_state, "hard state", "checksum");

    let bad_key = recover_after_damage(|log, _| log.insert(b"x".to_vec(), b"y".to_vec()).unwrap());
    assert!(
        matches!(bad_key, Err(StorageError::Corrupt { .. })),
        "{bad_key:?}"
    );
}

/// A log entry as a release before the postcard change wrote it (record version 1, its
/// command in bincode) is refused with a typed error naming it, not applied as whatever its
/// bytes decode to in postcard; other records keep version 1 and still open.
#[test]
fn an_entry_of_the_bincode_era_is_refused_as_an_unsupported_version() {
    let old_entry = recover_after_damage(|log, _| {
        let value = log.get(key(2)).unwrap().unwrap().to_vec();
        assert_eq!(value[0], 2, "entries are written as version 2");
        let body = &value[10..];
        let mut hasher = crc32fast::Hasher::new();
        hasher.update(&[1, value[1]]);
        hasher.update(&(body.len() as u32).to_le_bytes());
        hasher.update(body);
        let mut resealed = vec![1, value[1]];
        resealed.extend_from_slice(&(body.len() as u32).to_le_bytes());
        resealed.extend_from_slice(&hasher.finalize().to_le_bytes());
        resealed.extend_from_slice(body);
        log.insert(key(2), resealed).unwrap();
    });
    match old_entry {
        Err(StorageError::UnsupportedVersion {
            location,
            version: 1,
            reason,
        }) => {
            assert_eq!(location, "log index 2");
            assert!(reason.contains("bincode"), "{reason}");
        }
        other => panic!("expected UnsupportedVersion at log index 2, got {other:?}"),
    }
}

// ---- records ------------------------------------------------------------------------------------

type Records = BTreeMap<Vec<u8>, Vec<u8>>;

fn records(pairs: &[(&str, &str)]) -> Records {
    pairs
        .iter()
        .map(|(key, value)| (key.as_bytes().to_vec(), value.as_bytes().to_vec()))
        .collect()
}

fn put(key: &str, value: &str) -> RecordWrite {
    RecordWrite::Put {
        key: key.as_bytes().to_vec(),
        value: value.as_bytes().to_vec(),
    }
}

#[test]
fn records_put_delete_and_range_delete_survive_reopen() {
    let dir = tempfile::tempdir().unwrap();
    {
        let mut store = open(dir.path());
        store
            .write_records(&[
                put("cert/01", "a"),
                put("cert/02", "b"),
                put("cert/03", "c"),
                put("cert/04", "d"),
                put("view", "1"),
                put("zz", ""),
            ])
            .unwrap();
        store.sync().unwrap();
    }
    {
        let mut store = open(dir.path());
        assert_eq!(
            store.recover().unwrap().records,
            records(&[
                ("cert/01", "a"),
                ("cert/02", "b"),
                ("cert/03", "c"),
                ("cert/04", "d"),
                ("view", "1"),
                ("zz", ""),
            ])
        );
        // In one batch, the last change to a key wins, and a range delete takes the keys put
        // before it in the same write as well as the stored ones.
        let mut write = LogWrite::default();
        write.put_record("view", "2");
        write.delete_record("view");
        write.put_record("view", "3");
        write.put_record("cert/025", "early");
        write.delete_record_range("cert/02", "cert/04");
        write.put_record("cert/03", "late");
        write.delete_record("zz");
        write.delete_record("never stored");
        write.delete_record_range("zz", "a");
        store.persist(&write).unwrap();
    }
    let mut store = open(dir.path());
    assert_eq!(
        store.recover().unwrap().records,
        records(&[
            ("cert/01", "a"),
            ("cert/03", "late"),
            ("cert/04", "d"),
            ("view", "3"),
        ])
    );
    // Separate calls before one sync keep their order too.
    store.write_records(&[put("k", "1")]).unwrap();
    store
        .write_records(&[RecordWrite::Delete { key: b"k".to_vec() }])
        .unwrap();
    store
        .write_records(&[RecordWrite::DeleteRange {
            from: Vec::new(),
            to: b"d".to_vec(),
        }])
        .unwrap();
    store.sync().unwrap();
    drop(store);
    assert_eq!(
        open(dir.path()).recover().unwrap().records,
        records(&[("view", "3")])
    );
}

#[test]
fn records_share_one_persist_with_the_log_and_the_hard_state() {
    let dir = tempfile::tempdir().unwrap();
    let hard_state = HardState {
        term: 4,
        voted_for: Some(NodeId(1)),
    };
    {
        let mut store = open(dir.path());
        store.append(&entries(1..=5, 1)).unwrap();
        store.sync().unwrap();
        let mut write = LogWrite {
            hard_state: Some(hard_state),
            truncate_from: Some(4),
            append: entries(4..=6, 4),
            ..Default::default()
        };
        write.put_record("checkpoint", "proof");
        store.persist(&write).unwrap();
        // A write refused as a whole leaves its records out too.
        let mut bad = LogWrite {
            append: vec![entry(9, 4)],
            ..Default::default()
        };
        bad.put_record("lost", "x");
        bad.delete_record("checkpoint");
        assert!(matches!(
            store.persist(&bad),
            Err(StorageError::NonContiguous { .. })
        ));
        store.sync().unwrap();
    }
    let recovered = open(dir.path()).recover().unwrap();
    assert_eq!(recovered.hard_state, hard_state);
    assert_eq!(
        recovered.entries,
        [entries(1..=3, 1), entries(4..=6, 4)].concat()
    );
    assert_eq!(recovered.records, records(&[("checkpoint", "proof")]));
}

#[test]
fn an_oversized_record_is_refused_without_writing_anything() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = open(dir.path());
    let mut write = LogWrite {
        append: entries(1..=1, 1),
        ..Default::default()
    };
    write.put_record("fine", "v");
    write.put_record(vec![b'k'; MAX_RECORD_KEY_BYTES + 1], "v");
    let err = store.persist(&write).unwrap_err();
    assert!(
        matches!(err, StorageError::RecordTooLarge { key_bytes, .. } if key_bytes == MAX_RECORD_KEY_BYTES + 1),
        "{err}"
    );
    store.sync().unwrap();
    let recovered = store.recover().unwrap();
    assert!(recovered.entries.is_empty());
    assert!(recovered.records.is_empty());
}

#[test]
fn a_database_from_before_records_opens_with_none() {
    // An old database holds only the log and meta keyspaces: copy those of a store written now
    // into a database made with just them.
    let current = tempfile::tempdir().unwrap();
    let hard_state = HardState {
        term: 2,
        voted_for: Some(NodeId(3)),
    };
    {
        let mut store = open(current.path());
        store.save_hard_state(hard_state).unwrap();
        store.append(&entries(1..=4, 2)).unwrap();
        store.sync().unwrap();
    }
    let old = tempfile::tempdir().unwrap();
    {
        let from = fjall::Database::builder(current.path().join(DATABASE_DIR))
            .open()
            .unwrap();
        let to = fjall::Database::builder(old.path().join(DATABASE_DIR))
            .open()
            .unwrap();
        for name in [LOG_KEYSPACE, META_KEYSPACE] {
            let source = from
                .keyspace(name, fjall::KeyspaceCreateOptions::default)
                .unwrap();
            let target = to
                .keyspace(name, fjall::KeyspaceCreateOptions::default)
                .unwrap();
            for guard in source.iter() {
                let (key, value) = guard.into_inner().unwrap();
                target.insert(key, value).unwrap();
            }
        }
        to.persist(fjall::PersistMode::SyncAll).unwrap();
        assert!(!to.keyspace_exists(RECORDS_KEYSPACE));
    }
    {
        let mut store = open(old.path());
        let recovered = store.recover().unwrap();
        assert_eq!(recovered.hard_state, hard_state);
        assert_eq!(recovered.entries, entries(1..=4, 2));
        assert!(recovered.records.is_empty());
        let mut write = LogWrite {
            append: entries(5..=5, 2),
            ..Default::default()
        };
        write.put_record("new", "record");
        store.persist(&write).unwrap();
    }
    let recovered = open(old.path()).recover().unwrap();
    assert_eq!(recovered.entries, entries(1..=5, 2));
    assert_eq!(recovered.records, records(&[("new", "record")]));
}

#[test]
fn a_damaged_record_is_a_typed_corruption_error() {
    let damage = |change: &dyn Fn(&fjall::Keyspace)| -> Result<Records, StorageError> {
        let dir = tempfile::tempdir().unwrap();
        {
            let mut store = open(dir.path());
            store
                .write_records(&[put("cert/7", "signatures"), put("view", "vc")])
                .unwrap();
            store.sync().unwrap();
        }
        {
            let db = fjall::Database::builder(dir.path().join(DATABASE_DIR))
                .open()
                .unwrap();
            let records = db
                .keyspace(RECORDS_KEYSPACE, fjall::KeyspaceCreateOptions::default)
                .unwrap();
            change(&records);
            db.persist(fjall::PersistMode::SyncAll).unwrap();
        }
        open(dir.path())
            .recover()
            .map(|recovered| recovered.records)
    };
    assert_eq!(
        damage(&|_| {}).unwrap(),
        records(&[("cert/7", "signatures"), ("view", "vc")])
    );
    let flipped = damage(&|records| {
        let mut value = records.get("view").unwrap().unwrap().to_vec();
        let last = value.len() - 1;
        value[last] ^= 0x01;
        records.insert("view", value).unwrap();
    });
    assert_corrupt(flipped.map(drop), "record view", "checksum");
    let garbage = damage(&|records| records.insert("cert/7", b"junk".to_vec()).unwrap());
    assert_corrupt(
        garbage.map(drop),
        "record cert/7",
        "shorter than its header",
    );
    // A log entry stored as a record has the wrong kind.
    let misplaced = damage(&|records| {
        let db_value = records.get("cert/7").unwrap().unwrap().to_vec();
        let mut value = db_value;
        value[1] = 1;
        records.insert("view", value).unwrap();
    });
    assert_corrupt(misplaced.map(drop), "record view", "kind");
}

// ---- the crash test ------------------------------------------------------------------------------

const CHILD_DIR_VAR: &str = "FJALL_CRASH_CHILD_DIR";
const CHILD_SEED_VAR: &str = "FJALL_CRASH_CHILD_SEED";
const CHILD_POLICY_VAR: &str = "FJALL_CRASH_CHILD_POLICY";

fn say(line: &str) {
    // Straight to the pipe, past the test harness's capture, one write per line.
    let mut out = std::io::stdout().lock();
    out.write_all(format!("{line}\n").as_bytes()).unwrap();
    out.flush().unwrap();
}

/// The crashing child, run by [`acknowledged_entries_survive_sigkill`] as a re-execution of this
/// test binary. It recovers the store, then appends batches (sometimes truncating a suffix under a
/// new term first), and after each persist returns prints `ACK from to term`; before a truncating
/// persist (which also saves a new term as the hard state) it prints `INTENT from term`. It runs until killed, or stops after a few seconds.
#[test]
#[ignore = "helper process for the SIGKILL crash test; does nothing on its own"]
fn crash_child() {
    let Ok(dir) = std::env::var(CHILD_DIR_VAR) else {
        eprintln!("{CHILD_DIR_VAR} is not set: this test only runs as the crash test's child");
        return;
    };
    let seed: u64 = std::env::var(CHILD_SEED_VAR).unwrap().parse().unwrap();
    let policy = match std::env::var(CHILD_POLICY_VAR).as_deref() {
        Ok("never") => SyncPolicy::Never,
        _ => SyncPolicy::EveryBatch,
    };
    let mut rng = SplitMix(seed);
    let mut store = match FjallLogStore::open(&dir, policy) {
        Ok(store) => store,
        Err(e) => {
            say(&format!("ERROR open: {e}"));
            std::process::exit(2);
        }
    };
    let recovered = match store.recover() {
        Ok(recovered) => recovered,
        Err(e) => {
            say(&format!("ERROR recover: {e}"));
            std::process::exit(2);
        }
    };
    let mut term = recovered.hard_state.term.max(1);
    let mut next = recovered.entries.last().map_or(1, |e| e.index + 1);
    say(&format!("READY {next}"));
    let give_up = Instant::now() + Duration::from_secs(5);
    while Instant::now() < give_up {
        let mut output = LogWrite::default();
        let mut from = next;
        if next > 3 && rng.below(6) == 0 {
            from = next - 1 - rng.below(3);
            term += 1;
            output.hard_state = Some(HardState {
                term,
                voted_for: Some(NodeId(term % 3)),
            });
            output.truncate_from = Some(from);
            say(&format!("INTENT {from} {term}"));
        }
        let to = from + rng.below(8);
        output.append = entries(from..=to, term);
        if let Err(e) = store.persist(&output) {
            say(&format!("ERROR persist: {e}"));
            std::process::exit(3);
        }
        say(&format!("ACK {from} {to} {term}"));
        next = to + 1;
    }
}

/// The child's report in a line of its stdout: the test harness may have written the start of
/// the line ("test crash_child ... ").
fn child_report(line: &str) -> &str {
    ["READY", "INTENT", "ACK", "ERROR"]
        .iter()
        .filter_map(|keyword| line.find(keyword))
        .min()
        .map_or("", |start| &line[start..])
}

/// What the parent knows is durable: acknowledged entries, the acknowledged hard state term, and
/// a truncation under a new term that was announced but not acknowledged (which may or may not
/// have happened).
#[derive(Default)]
struct Model {
    terms: BTreeMap<LogIndex, Term>,
    hard_state_term: Term,
    pending_truncation: Option<(LogIndex, Term)>,
}

impl Model {
    fn apply(&mut self, line: &str) {
        let words: Vec<&str> = child_report(line).split_whitespace().collect();
        match words.as_slice() {
            ["INTENT", from, term] => {
                self.pending_truncation = Some((from.parse().unwrap(), term.parse().unwrap()));
            }
            ["ACK", from, to, term] => {
                let (from, to, term): (LogIndex, LogIndex, Term) = (
                    from.parse().unwrap(),
                    to.parse().unwrap(),
                    term.parse().unwrap(),
                );
                self.terms.retain(|&index, _| index < from);
                self.terms.extend((from..=to).map(|index| (index, term)));
                if let Some((_, new_term)) = self.pending_truncation.take() {
                    self.hard_state_term = new_term;
                }
            }
            ["ERROR", ..] => panic!("the child failed: {line}"),
            _ => {}
        }
    }

    /// Checks the recovered store against what was acknowledged, then adopts it as the new truth.
    fn check_and_adopt(&mut self, store: &mut FjallLogStore, trial: usize) {
        let recovered = store
            .recover()
            .unwrap_or_else(|e| panic!("trial {trial}: recovery after SIGKILL failed: {e}"));
        for (position, entry) in recovered.entries.iter().enumerate() {
            assert_eq!(
                entry.index,
                position as LogIndex + 1,
                "trial {trial}: not a prefix"
            );
            assert_eq!(
                entry.payload,
                expected_payload(entry.index, entry.term),
                "trial {trial}: entry {} damaged",
                entry.index
            );
        }
        for (&index, &term) in &self.terms {
            if self
                .pending_truncation
                .is_some_and(|(from, _)| index >= from)
            {
                continue;
            }
            let found = recovered.entries.get(index as usize - 1).map(|e| e.term);
            assert_eq!(
                found,
                Some(term),
                "trial {trial}: acknowledged entry {index} lost"
            );
        }
        let term = recovered.hard_state.term;
        assert!(
            term == self.hard_state_term || self.pending_truncation.is_some_and(|(_, t)| t == term),
            "trial {trial}: hard state term {term}, acknowledged {}",
            self.hard_state_term
        );
        self.terms = recovered
            .entries
            .iter()
            .map(|e| (e.index, e.term))
            .collect();
        self.hard_state_term = term;
        self.pending_truncation = None;
    }
}

/// Runs `trials` children on one directory, each killed with SIGKILL after a random delay, and
/// checks after each that every acknowledged write is there, intact, in a contiguous log.
fn crash_trials(trials: usize, policy: &str, base_seed: u64) {
    let dir = tempfile::tempdir().unwrap();
    let exe = std::env::current_exe().unwrap();
    let mut rng = SplitMix(base_seed);
    let mut model = Model::default();
    let mut acknowledged_total = 0;
    // Where the kills landed: before the child finished recovering, and between announcing a
    // truncation and its acknowledgement.
    let (mut killed_starting, mut killed_truncating) = (0, 0);
    for trial in 0..trials {
        let seed = rng.next();
        let mut child = Command::new(&exe)
            .args([
                "--exact",
                "crash_child",
                "--ignored",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(CHILD_DIR_VAR, dir.path())
            .env(CHILD_SEED_VAR, seed.to_string())
            .env(CHILD_POLICY_VAR, policy)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (line_tx, line_rx) = std::sync::mpsc::channel::<String>();
        let reader = std::thread::spawn(move || {
            let mut reader = BufReader::new(stdout);
            let mut line = Vec::new();
            // A line cut by the kill has no newline and is ignored: it acknowledged nothing.
            while reader.read_until(b'\n', &mut line).unwrap() > 0 {
                if line.ends_with(b"\n") {
                    let _ = line_tx.send(String::from_utf8_lossy(&line).trim_end().to_owned());
                }
                line.clear();
            }
        });
        let mut lines = Vec::new();
        if trial % 4 == 0 {
            // Counted from the spawn: start-up (exec, open, recovery) takes some of this, so
            // these kills often land in the child's own recovery.
            std::thread::sleep(Duration::from_millis(rng.below(60)));
        } else {
            // Counted from the end of recovery, which grows with the log: these land in writes.
            let ready_by = Instant::now() + Duration::from_secs(20);
            while !lines
                .iter()
                .any(|l: &String| child_report(l).starts_with("READY"))
            {
                let left = ready_by.saturating_duration_since(Instant::now());
                match line_rx.recv_timeout(left) {
                    Ok(line) => lines.push(line),
                    Err(e) => panic!("trial {trial} seed {seed}: child never got ready: {e}"),
                }
            }
            std::thread::sleep(Duration::from_millis(rng.below(25)));
        }
        child.kill().unwrap();
        let status = child.wait().unwrap();
        reader.join().unwrap();
        lines.extend(line_rx.try_iter());
        assert!(
            status.code().is_none_or(|code| code == 0),
            "trial {trial} seed {seed}: child exited {status}: {lines:?}"
        );
        for line in &lines {
            model.apply(line);
        }
        let reports: Vec<&str> = lines.iter().map(|l| child_report(l)).collect();
        acknowledged_total += reports.iter().filter(|r| r.starts_with("ACK")).count();
        killed_starting += usize::from(!reports.iter().any(|r| r.starts_with("READY")));
        killed_truncating += usize::from(model.pending_truncation.is_some());
        let mut store = FjallLogStore::open(dir.path(), SyncPolicy::EveryBatch)
            .unwrap_or_else(|e| panic!("trial {trial} seed {seed}: reopen failed: {e}"));
        model.check_and_adopt(&mut store, trial);
    }
    eprintln!(
        "{trials} trials ({policy}): {acknowledged_total} acknowledged persists, {killed_starting} \
         kills during start-up, {killed_truncating} during a truncation, final log of {} entries",
        model.terms.len()
    );
    assert!(
        acknowledged_total > trials,
        "the children acknowledged too little to test anything"
    );
}

#[test]
fn acknowledged_entries_survive_sigkill() {
    crash_trials(50, "every_batch", 0x5eed_0001);
}

#[test]
fn acknowledged_entries_survive_sigkill_without_fsync() {
    // A process crash (not a power cut) must not lose what `sync` handed to the OS.
    crash_trials(12, "never", 0x5eed_0002);
}

/// The snapshot files under `dir`, once at most `expected` are left (the store removes older
/// ones on a thread of its own after a sync), or after 10 s.
fn snapshot_files_once_pruned(dir: &Path, expected: usize) -> Vec<std::ffi::OsString> {
    let until = Instant::now() + Duration::from_secs(10);
    loop {
        let files: Vec<_> = std::fs::read_dir(dir.join(SNAPSHOT_DIR))
            .unwrap()
            .map(|f| f.unwrap().file_name())
            .collect();
        if files.len() <= expected || Instant::now() > until {
            return files;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn a_snapshot_staged_beside_the_driver_is_persisted_by_its_record_alone() {
    let dir = tempfile::tempdir().unwrap();
    let staged = Snapshot {
        index: 4,
        term: 1,
        data: Bytes::from(vec![9u8; 300_000]),
        membership: None,
    };
    let never_used = Snapshot {
        index: 6,
        term: 1,
        data: Bytes::from_static(b"staged, then a crash before its record was written"),
        membership: None,
    };
    {
        let mut store = open(dir.path());
        store.append(&entries(1..=8, 1)).unwrap();
        store.sync().unwrap();
        let stager = store.snapshot_stager().expect("fjall stages snapshots");
        stager.stage(&staged).unwrap();
        // The file is in place (under its final name) before the store hears of it ...
        let file = dir
            .path()
            .join(SNAPSHOT_DIR)
            .join(format!("snapshot-{:020}.bin", staged.index));
        assert_eq!(std::fs::read(&file).unwrap(), staged.data);
        // ... so persisting the snapshot writes its record, and reads the same file back.
        let marker = b"if persist wrote the file again, this would be overwritten";
        std::fs::write(&file, marker).unwrap();
        store
            .persist(&LogWrite {
                snapshot: Some(staged.clone()),
                compact_through: Some(4),
                ..Default::default()
            })
            .unwrap();
        assert_eq!(
            std::fs::read(&file).unwrap(),
            marker,
            "written once, by the stager"
        );
        std::fs::write(&file, &staged.data).unwrap();
        stager.stage(&never_used).unwrap();
    }
    let mut store = open(dir.path());
    let recovered = store.recover().unwrap();
    assert_eq!(recovered.snapshot, Some(staged.clone()));
    assert_eq!(recovered.entries, entries(5..=8, 1));
    // The first sync after the restart prunes the file whose record never came.
    store.sync().unwrap();
    let files = snapshot_files_once_pruned(dir.path(), 1);
    assert_eq!(files.len(), 1, "{files:?}");
}

/// A received snapshot of many parts (80 MiB in 1 MiB parts, so the writer also syncs the file
/// while parts still arrive) is the snapshot's file once saved, byte for byte, and what a
/// restart recovers.
#[test]
fn a_large_snapshot_received_in_many_parts_is_recovered_whole() {
    let dir = tempfile::tempdir().unwrap();
    let pattern: Vec<u8> = (0..=250u8).collect();
    let data = Bytes::from(pattern.repeat((80 << 20) / pattern.len() + 1));
    let snapshot = Snapshot {
        index: 10,
        term: 2,
        data: data.clone(),
        membership: None,
    };
    const PART: usize = 1 << 20;
    {
        let mut store = open(dir.path());
        store.append(&entries(1..=3, 1)).unwrap();
        for offset in (0..data.len()).step_by(PART) {
            store
                .persist(&LogWrite {
                    snapshot_parts: vec![SnapshotPart {
                        index: 10,
                        offset: offset as u64,
                        data: data.slice(offset..(offset + PART).min(data.len())),
                    }],
                    ..Default::default()
                })
                .unwrap();
        }
        store
            .persist(&LogWrite {
                snapshot: Some(snapshot.clone()),
                compact_through: Some(10),
                ..Default::default()
            })
            .unwrap();
    }
    let file = dir
        .path()
        .join(SNAPSHOT_DIR)
        .join(format!("snapshot-{:020}.bin", 10));
    assert!(
        std::fs::read(&file).unwrap() == data[..],
        "the file holds the snapshot's bytes"
    );
    let mut store = open(dir.path());
    let recovered = store.recover().unwrap().snapshot.expect("a snapshot");
    assert_eq!((recovered.index, recovered.term), (10, 2));
    assert!(
        recovered.data == data,
        "the recovered snapshot is the one received"
    );
}

/// The parts of a leader's snapshot written as they arrive become the snapshot's file when it
/// is saved (synced and renamed: the same file, not written again); parts that do not follow
/// each other leave nothing behind, and the snapshot is written whole.
#[cfg(unix)]
#[test]
fn a_received_snapshot_written_part_by_part_is_kept_by_a_rename() {
    use std::os::unix::fs::MetadataExt;
    let dir = tempfile::tempdir().unwrap();
    let data = Bytes::from((0..300_000u32).map(|i| (i % 251) as u8).collect::<Vec<_>>());
    let snapshot = Snapshot {
        index: 10,
        term: 2,
        data: data.clone(),
        membership: None,
    };
    let parts = |index, cuts: &[usize]| -> Vec<SnapshotPart> {
        cuts.windows(2)
            .map(|w| SnapshotPart {
                index,
                offset: w[0] as u64,
                data: data.slice(w[0]..w[1]),
            })
            .collect()
    };
    let receiving = |dir: &Path| -> Vec<std::fs::DirEntry> {
        std::fs::read_dir(dir.join(SNAPSHOT_DIR))
            .map(|listing| listing.flatten().collect::<Vec<_>>())
            .unwrap_or_default()
            .into_iter()
            .filter(|file| file.file_name().to_string_lossy().ends_with(".receiving"))
            .collect()
    };
    {
        let mut store = open(dir.path());
        store.append(&entries(1..=3, 1)).unwrap();
        // Parts alone: handed to the file's writer, nothing else (the write is empty otherwise).
        let write = LogWrite {
            snapshot_parts: parts(10, &[0, 100_000, 250_000, 300_000]),
            ..Default::default()
        };
        assert!(write.is_empty());
        store.persist(&write).unwrap();
        let files = receiving(dir.path());
        assert_eq!(files.len(), 1, "one file for the snapshot being received");
        let inode = files[0].metadata().unwrap().ino();
        store
            .persist(&LogWrite {
                snapshot: Some(snapshot.clone()),
                compact_through: Some(10),
                ..Default::default()
            })
            .unwrap();
        assert!(receiving(dir.path()).is_empty());
        let kept = dir
            .path()
            .join(SNAPSHOT_DIR)
            .join(format!("snapshot-{:020}.bin", 10));
        assert_eq!(
            std::fs::metadata(&kept).unwrap().ino(),
            inode,
            "the received file itself became the snapshot's"
        );
    }
    let mut store = open(dir.path());
    assert_eq!(store.recover().unwrap().snapshot, Some(snapshot.clone()));

    // A gap (the part at 100,000 never came): the file is dropped, the snapshot written whole.
    let later = Snapshot {
        index: 20,
        ..snapshot.clone()
    };
    let mut gapped = parts(20, &[0, 100_000, 250_000, 300_000]);
    gapped.remove(1);
    store
        .persist(&LogWrite {
            snapshot_parts: gapped,
            ..Default::default()
        })
        .unwrap();
    store
        .persist(&LogWrite {
            snapshot: Some(later.clone()),
            compact_through: Some(20),
            ..Default::default()
        })
        .unwrap();
    drop(store);
    let mut store = open(dir.path());
    assert_eq!(store.recover().unwrap().snapshot, Some(later));
}
