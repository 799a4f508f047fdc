//! The replicated key-value state machine behind `consensus-node`: keys and values are byte
//! strings. Writes go through the log; a get is read-only, so the engine serves it without a log
//! write (ReadIndex or a lease, per `read_mode`), still linearizable on any node.

use std::io::{Read, Write};

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::state_machine::{SnapshotWriter, StateMachine};

/// The first bytes of a [`KvStore`] snapshot, then its format version.
const SNAPSHOT_MAGIC: &[u8; 4] = b"SKV1";

/// A command of [`KvStore`], replicated through the log (postcard-encoded by the engine).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum KvCommand {
    /// Sets `key` to `value`.
    Put {
        /// The key.
        key: Vec<u8>,
        /// The new value.
        value: Vec<u8>,
    },
    /// Removes `key` (absent keys too).
    Delete {
        /// The key.
        key: Vec<u8>,
    },
    /// Reads `key` at its position in the log.
    Get {
        /// The key.
        key: Vec<u8>,
    },
    /// Sets `key` to `to` if its value is `from` (`None`: absent).
    Cas {
        /// The key.
        key: Vec<u8>,
        /// The value expected now; `None` expects the key to be absent.
        from: Option<Vec<u8>>,
        /// The value to set.
        to: Vec<u8>,
    },
}

/// What applying a [`KvCommand`] answers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KvResponse {
    /// A put or delete took effect.
    Done,
    /// The value a get found (`None`: absent).
    Value(Option<Vec<u8>>),
    /// A compare-and-swap: whether it swapped, and the value before the command.
    Cas {
        /// True if the value was `from` and is now `to`.
        swapped: bool,
        /// The value before the command (the one that did not match when `swapped` is false).
        previous: Option<Vec<u8>>,
    },
}

/// An in-memory ordered map, restored on restart from the latest snapshot and the log after
/// it.
///
/// The map is persistent ([`imbl::OrdMap`]): a snapshot clones it in constant time and a
/// background thread writes the clone while writes go on (each write after it copies only
/// the path to its key).
#[derive(Clone, Debug, Default)]
pub struct KvStore {
    data: imbl::OrdMap<Bytes, Bytes>,
}

impl KvStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    /// The number of keys present.
    pub fn len(&self) -> usize {
        self.data.len()
    }

    /// True if no key is present.
    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }
}

impl StateMachine for KvStore {
    type Command = KvCommand;
    type Response = KvResponse;

    fn is_read_only(command: &KvCommand) -> bool {
        matches!(command, KvCommand::Get { .. })
    }

    fn apply(&mut self, command: KvCommand) -> KvResponse {
        match command {
            KvCommand::Put { key, value } => {
                self.data.insert(key.into(), value.into());
                KvResponse::Done
            }
            KvCommand::Delete { key } => {
                self.data.remove(key.as_slice());
                KvResponse::Done
            }
            KvCommand::Get { key } => KvResponse::Value(self.value(&key)),
            KvCommand::Cas { key, from, to } => {
                let previous = self.value(&key);
                let swapped = previous == from;
                if swapped {
                    self.data.insert(key.into(), to.into());
                }
                KvResponse::Cas { swapped, previous }
            }
        }
    }

    /// The map's clone (constant time), written as: magic, the number of keys (u64), then per
    /// key in order its length (u32), bytes, the value's length (u32) and bytes; little-endian.
    fn snapshot(&self) -> Option<SnapshotWriter> {
        let data = self.data.clone();
        Some(Box::new(move |out: &mut dyn Write| {
            out.write_all(SNAPSHOT_MAGIC)?;
            out.write_all(&(data.len() as u64).to_le_bytes())?;
            for (key, value) in &data {
                for field in [key, value] {
                    let length = u32::try_from(field.len()).map_err(|_| {
                        std::io::Error::other("a key or value of 4 GiB or more cannot be written")
                    })?;
                    out.write_all(&length.to_le_bytes())?;
                    out.write_all(field)?;
                }
            }
            Ok(())
        }))
    }

    /// Reads what [`KvStore::snapshot`] wrote (into memory, then as
    /// [`KvStore::restore_from_bytes`]).
    fn restore(&mut self, snapshot: &mut dyn Read) -> std::io::Result<()> {
        let mut bytes = Vec::new();
        snapshot.read_to_end(&mut bytes)?;
        self.restore_from_bytes(bytes.into())
    }

    /// Reads what [`KvStore::snapshot`] wrote; the state is replaced only once the whole of it
    /// read back (bad magic, a length running past the end, keys out of order or trailing
    /// bytes are errors, and leave the store as it was). Keys and values are slices of
    /// `snapshot`, not copies: restoring 1 GiB of 64 KiB values took 1.4 s with a copy of
    /// each (most of it the kernel clearing fresh pages for them) and now takes a walk over
    /// the lengths. The buffer is freed once every key and value restored from it is gone.
    fn restore_from_bytes(&mut self, snapshot: Bytes) -> std::io::Result<()> {
        fn invalid(what: &str) -> std::io::Error {
            std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("not a KV store snapshot: {what}"),
            )
        }
        fn take(rest: &mut Bytes, length: usize) -> std::io::Result<Bytes> {
            if rest.len() < length {
                return Err(invalid("cut short"));
            }
            Ok(rest.split_to(length))
        }
        fn number(rest: &mut Bytes, width: usize) -> std::io::Result<u64> {
            let mut le = [0; 8];
            le[..width].copy_from_slice(&take(rest, width)?);
            Ok(u64::from_le_bytes(le))
        }
        let mut rest = snapshot;
        if take(&mut rest, SNAPSHOT_MAGIC.len())?.as_ref() != SNAPSHOT_MAGIC {
            return Err(invalid("bad magic"));
        }
        let count = number(&mut rest, 8)?;
        let mut data = imbl::OrdMap::new();
        let mut previous: Option<Bytes> = None;
        for _ in 0..count {
            let key_length = number(&mut rest, 4)? as usize;
            let key = take(&mut rest, key_length)?;
            let value_length = number(&mut rest, 4)? as usize;
            let value = take(&mut rest, value_length)?;
            if previous.as_ref().is_some_and(|previous| *previous >= key) {
                return Err(invalid("keys out of order"));
            }
            previous = Some(key.clone());
            data.insert(key, value);
        }
        if !rest.is_empty() {
            return Err(invalid("trailing bytes"));
        }
        self.data = data;
        Ok(())
    }
}

impl KvStore {
    fn value(&self, key: &[u8]) -> Option<Vec<u8>> {
        self.data.get(key).map(|value| value.to_vec())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn put(key: &str, value: &str) -> KvCommand {
        KvCommand::Put {
            key: key.into(),
            value: value.into(),
        }
    }

    fn get(store: &mut KvStore, key: &str) -> KvResponse {
        store.apply(KvCommand::Get { key: key.into() })
    }

    #[test]
    fn put_get_delete() {
        let mut store = KvStore::new();
        assert_eq!(get(&mut store, "a"), KvResponse::Value(None));
        assert_eq!(store.apply(put("a", "1")), KvResponse::Done);
        assert_eq!(get(&mut store, "a"), KvResponse::Value(Some(b"1".to_vec())));
        assert_eq!(store.apply(put("a", "2")), KvResponse::Done);
        assert_eq!(get(&mut store, "a"), KvResponse::Value(Some(b"2".to_vec())));
        let delete = KvCommand::Delete { key: b"a".to_vec() };
        assert_eq!(store.apply(delete.clone()), KvResponse::Done);
        assert_eq!(store.apply(delete), KvResponse::Done, "absent keys too");
        assert!(store.is_empty());
    }

    #[test]
    fn cas_swaps_only_on_a_match_and_reports_the_previous_value() {
        let mut store = KvStore::new();
        let cas = |from: Option<&str>, to: &str| KvCommand::Cas {
            key: b"k".to_vec(),
            from: from.map(Into::into),
            to: to.into(),
        };
        let refused = store.apply(cas(Some("x"), "y"));
        assert_eq!(
            refused,
            KvResponse::Cas {
                swapped: false,
                previous: None
            }
        );
        assert!(store.is_empty(), "a refused cas changes nothing");
        let created = store.apply(cas(None, "v1"));
        assert_eq!(
            created,
            KvResponse::Cas {
                swapped: true,
                previous: None
            }
        );
        let stale = store.apply(cas(None, "v2"));
        assert_eq!(
            stale,
            KvResponse::Cas {
                swapped: false,
                previous: Some(b"v1".to_vec())
            }
        );
        let swapped = store.apply(cas(Some("v1"), "v2"));
        assert_eq!(
            swapped,
            KvResponse::Cas {
                swapped: true,
                previous: Some(b"v1".to_vec())
            }
        );
        assert_eq!(
            get(&mut store, "k"),
            KvResponse::Value(Some(b"v2".to_vec()))
        );
    }

    #[test]
    fn replicas_applying_the_same_commands_agree() {
        let commands = vec![
            put("a", "1"),
            KvCommand::Cas {
                key: b"a".to_vec(),
                from: Some(b"1".to_vec()),
                to: b"2".to_vec(),
            },
            put("b", "x"),
            KvCommand::Delete { key: b"b".to_vec() },
        ];
        let (mut one, mut two) = (KvStore::new(), KvStore::new());
        for command in commands {
            let encoded = crate::encoding::to_vec(&command).unwrap();
            let decoded: KvCommand = crate::encoding::decode_whole(&encoded).unwrap();
            assert_eq!(one.apply(command), two.apply(decoded));
        }
        assert_eq!(one.data, two.data);
        assert_eq!(one.len(), 1);
    }

    fn snapshot_bytes(store: &KvStore) -> Vec<u8> {
        let mut bytes = Vec::new();
        store.snapshot().expect("the KV store takes snapshots")(&mut bytes).unwrap();
        bytes
    }

    #[test]
    fn a_snapshot_restores_the_state_it_captured_not_later_writes() {
        let mut store = KvStore::new();
        for i in 0..300u32 {
            store.apply(put(&format!("key-{i:03}"), &"v".repeat(i as usize % 7)));
        }
        store.apply(KvCommand::Delete {
            key: b"key-007".to_vec(),
        });
        let writer = store.snapshot().unwrap();
        // Writes after the capture do not reach the snapshot (copy-on-write).
        store.apply(put("key-000", "changed"));
        store.apply(put("late", "x"));
        let mut bytes = Vec::new();
        writer(&mut bytes).unwrap();
        let mut restored = KvStore::new();
        restored.apply(put("stale", "gone after restore"));
        restored.restore(&mut bytes.as_slice()).unwrap();
        assert_eq!(restored.len(), 299);
        assert_eq!(
            get(&mut restored, "key-000"),
            KvResponse::Value(Some(vec![]))
        );
        assert_eq!(get(&mut restored, "key-007"), KvResponse::Value(None));
        assert_eq!(get(&mut restored, "late"), KvResponse::Value(None));
        assert_eq!(get(&mut restored, "stale"), KvResponse::Value(None));
        assert_eq!(snapshot_bytes(&restored), bytes, "a round trip is exact");
    }

    #[test]
    fn a_damaged_snapshot_is_refused_and_leaves_the_store_as_it_was() {
        let mut source = KvStore::new();
        source.apply(put("a", "1"));
        source.apply(put("b", "2"));
        let good = snapshot_bytes(&source);
        let mut huge_length = good.clone();
        huge_length[12..16].copy_from_slice(&u32::MAX.to_le_bytes());
        let mut out_of_order = KvStore::new();
        out_of_order.apply(put("a", "1"));
        let mut swapped = snapshot_bytes(&source);
        swapped[16] = b'c'; // "a" becomes "c", after which "b" is out of order
        let damaged = [
            (b"XKV1".iter().chain(&good[4..]).copied().collect(), "magic"),
            (good[..good.len() - 1].to_vec(), "cut short"),
            ([good.as_slice(), b"!"].concat(), "trailing"),
            (huge_length, "cut short"),
            (swapped, "out of order"),
        ];
        for (bytes, expected) in damaged {
            let mut store = KvStore::new();
            store.apply(put("kept", "yes"));
            let error = store.restore(&mut bytes.as_slice()).unwrap_err();
            let message = error.to_string();
            assert!(
                message.contains(expected) || error.kind() == std::io::ErrorKind::UnexpectedEof,
                "{expected}: {message}"
            );
            assert_eq!(store.len(), 1, "{expected}: the store is untouched");
            assert_eq!(
                get(&mut store, "kept"),
                KvResponse::Value(Some(b"yes".to_vec()))
            );
        }
    }
}
