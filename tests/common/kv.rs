//! The replicated key-value state machine the simulator runs on every node: put, get and
//! compare-and-swap on `u64` keys and values. Reads go through the log like writes, so their
//! answers are linearizable when Raft is.
//!
//! It remembers which proposals it has applied and applies each at most once: a forwarded proposal
//! duplicated by the network may be appended twice, and exactly-once execution is the state
//! machine's job (Raft thesis §6.3, client sessions). Every replica makes the same decision, so
//! this is deterministic replicated state like the rest.

use std::collections::{BTreeMap, BTreeSet};

use bytes::Bytes;
use consensus::protocol::raft::AppliedProposals;
use consensus::{Entry, LogIndex, Payload, ProposalTag};

use crate::common::linearizability::{KvInput, KvModel, KvOutput};

/// A command that does not decode.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KvError {
    /// The bytes are not a command of this state machine.
    #[error("malformed command of {len} bytes at log index {index}")]
    Malformed {
        /// Where the entry sits.
        index: LogIndex,
        /// Its length.
        len: usize,
    },
    /// Entries must be applied in index order without gaps.
    #[error("applied index {got} after {last_applied}")]
    OutOfOrder {
        /// The last index applied.
        last_applied: LogIndex,
        /// The index offered.
        got: LogIndex,
    },
}

/// Encodes a command: a kind byte, the key, then the operands, all big-endian.
pub fn encode(input: &KvInput) -> Bytes {
    let mut out = Vec::with_capacity(26);
    match *input {
        KvInput::Put { key, value } => {
            out.push(0);
            out.extend_from_slice(&key.to_be_bytes());
            out.extend_from_slice(&value.to_be_bytes());
        }
        KvInput::Get { key } => {
            out.push(1);
            out.extend_from_slice(&key.to_be_bytes());
        }
        KvInput::Cas { key, expected, new } => {
            out.push(2);
            out.extend_from_slice(&key.to_be_bytes());
            out.push(u8::from(expected.is_some()));
            out.extend_from_slice(&expected.unwrap_or(0).to_be_bytes());
            out.extend_from_slice(&new.to_be_bytes());
        }
    }
    out.into()
}

/// Decodes what [`encode`] wrote; `None` for anything else.
pub fn decode(data: &[u8]) -> Option<KvInput> {
    let word = |at: usize| -> Option<u64> {
        Some(u64::from_be_bytes(data.get(at..at + 8)?.try_into().ok()?))
    };
    let key = word(1)?;
    match (data.first()?, data.len()) {
        (0, 17) => Some(KvInput::Put {
            key,
            value: word(9)?,
        }),
        (1, 9) => Some(KvInput::Get { key }),
        (2, 26) => {
            let expected = match data[9] {
                0 => None,
                1 => Some(word(10)?),
                _ => return None,
            };
            Some(KvInput::Cas {
                key,
                expected,
                new: word(18)?,
            })
        }
        _ => None,
    }
}

/// What applying one entry did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Applied {
    /// A leader's no-op.
    Blank,
    /// A command ran; its proposer answers its client with `output`.
    Command {
        /// Whose proposal it was.
        tag: ProposalTag,
        /// The command.
        input: KvInput,
        /// The answer.
        output: KvOutput,
    },
    /// A second copy of a proposal already applied; it changed nothing.
    Duplicate {
        /// Whose proposal it was.
        tag: ProposalTag,
    },
}

/// One replica of the store.
#[derive(Clone, Debug, Default)]
pub struct KvStateMachine {
    values: BTreeMap<u64, u64>,
    /// The library's apply-time filter, so the simulator exercises what the engine runs.
    applied_proposals: AppliedProposals,
    last_applied: LogIndex,
}

impl KvStateMachine {
    /// An empty store that has applied nothing.
    pub fn new() -> Self {
        Self::default()
    }

    /// The index of the last entry applied.
    pub fn last_applied(&self) -> LogIndex {
        self.last_applied
    }

    /// The value of `key`.
    pub fn get(&self, key: u64) -> Option<u64> {
        self.values.get(&key).copied()
    }

    /// Applies the next committed entry.
    pub fn apply(&mut self, entry: &Entry) -> Result<Applied, KvError> {
        if entry.index != self.last_applied + 1 {
            return Err(KvError::OutOfOrder {
                last_applied: self.last_applied,
                got: entry.index,
            });
        }
        self.last_applied = entry.index;
        match &entry.payload {
            Payload::Blank => Ok(Applied::Blank),
            Payload::Command { tag, data } => {
                let input = decode(data).ok_or(KvError::Malformed {
                    index: entry.index,
                    len: data.len(),
                })?;
                if !self.applied_proposals.first_application(*tag) {
                    return Ok(Applied::Duplicate { tag: *tag });
                }
                let key = input.key();
                let (value, output) = KvModel::apply(self.get(key), &input);
                if let Some(value) = value {
                    self.values.insert(key, value);
                }
                Ok(Applied::Command {
                    tag: *tag,
                    input,
                    output,
                })
            }
        }
    }
}
