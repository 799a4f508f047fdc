//! The replicated key-value state machine behind `consensus-node`: keys and values are byte
//! strings. Writes go through the log; a get is read-only, so the engine serves it without a log
//! write (ReadIndex or a lease, per `read_mode`), still linearizable on any node.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::state_machine::StateMachine;

/// A command of [`KvStore`], replicated through the log (bincode-encoded by the engine).
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

/// An in-memory ordered map, rebuilt on restart by replaying the log.
#[derive(Clone, Debug, Default)]
pub struct KvStore {
    data: BTreeMap<Vec<u8>, Vec<u8>>,
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
                self.data.insert(key, value);
                KvResponse::Done
            }
            KvCommand::Delete { key } => {
                self.data.remove(&key);
                KvResponse::Done
            }
            KvCommand::Get { key } => KvResponse::Value(self.data.get(&key).cloned()),
            KvCommand::Cas { key, from, to } => {
                let previous = self.data.get(&key).cloned();
                let swapped = previous == from;
                if swapped {
                    self.data.insert(key, to);
                }
                KvResponse::Cas { swapped, previous }
            }
        }
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
            let encoded = bincode::serialize(&command).unwrap();
            let decoded: KvCommand = bincode::deserialize(&encoded).unwrap();
            assert_eq!(one.apply(command), two.apply(decoded));
        }
        assert_eq!(one.data, two.data);
        assert_eq!(one.len(), 1);
    }
}
