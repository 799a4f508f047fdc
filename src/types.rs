//! The vocabulary shared by every layer: node ids, terms, log positions, entries, proposals and their
//! results.

use std::fmt;

use bytes::Bytes;
use serde::{Deserialize, Serialize};

/// A Raft term (or PBFT view). Starts at 0 and never decreases on a node.
pub type Term = u64;

/// A position in the replicated log. Index 0 is the empty prefix; the first entry has index 1.
pub type LogIndex = u64;

/// Identifies one member of a cluster. Stable across restarts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct NodeId(pub u64);

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "n{}", self.0)
    }
}

impl NodeId {
    /// The id of a node named in configuration. A name that is a decimal number is that number
    /// (so `"3"` and `NodeId(3)` agree); any other name maps to its 64-bit FNV-1a hash, which is
    /// stable across runs, platforms and versions.
    pub fn from_name(name: &str) -> NodeId {
        if let Ok(number) = name.parse::<u64>() {
            return NodeId(number);
        }
        const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
        const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;
        let hash = name.bytes().fold(FNV_OFFSET, |hash, byte| {
            (hash ^ u64::from(byte)).wrapping_mul(FNV_PRIME)
        });
        NodeId(hash)
    }
}

impl From<u64> for NodeId {
    fn from(id: u64) -> Self {
        NodeId(id)
    }
}

/// Who proposed an entry: the node that accepted the client's request and a request number unique on
/// that node. The proposer answers its client when it applies the entry carrying this tag, so a
/// proposal forwarded from a follower to the leader needs no reply message of its own.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct ProposalTag {
    /// The node whose client is waiting for this entry.
    pub proposer: NodeId,
    /// Unique per proposer for the proposer's lifetime (the engine keeps it monotonic).
    pub request_id: u64,
}

/// What a log entry carries.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Payload {
    /// Appended by every new leader so that it can commit entries of earlier terms (Raft §5.4.2).
    Blank,
    /// A client command, opaque to consensus.
    Command {
        /// Who is waiting for this entry to be applied.
        tag: ProposalTag,
        /// The command bytes given to [`StateMachine::apply`](crate::StateMachine::apply).
        data: Bytes,
    },
    /// A new membership (see [`crate::membership`]): in force on each node from the moment the
    /// entry is in its log. Raft and GPU-optimized Raft; the state machine never sees it. Boxed: inline, its four
    /// collections made every entry half again as large, and the copies of entries on the
    /// commit path cost the in-process bench about a tenth of its throughput.
    Membership(Box<crate::membership::Membership>),
}

impl Payload {
    /// Bytes this payload contributes to batch and message size limits.
    pub fn size_bytes(&self) -> usize {
        match self {
            Payload::Blank => 0,
            Payload::Command { data, .. } => data.len() + 16,
            Payload::Membership(membership) => 16 + 8 * membership.all_members().len(),
        }
    }
}

/// One replicated log entry.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    /// The term of the leader that created the entry.
    pub term: Term,
    /// The entry's position in the log.
    pub index: LogIndex,
    /// What the entry carries.
    pub payload: Payload,
}

/// A value to replicate, as in the seed's `Proposal::new("key", "value")`.
///
/// Consensus treats the payload as opaque bytes; [`Proposal::new`] encodes a key and value so that
/// the simple key-value use of the seed works without a state machine of one's own.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Proposal {
    /// The bytes to replicate.
    pub data: Bytes,
    /// A client's signature over the command (GPU-optimized Raft only: the other algorithms
    /// refuse a signed proposal rather than drop the signature).
    pub signature: Option<crate::ClientSignature>,
}

impl Proposal {
    /// A key/value proposal. The encoding is `u32 key length (big-endian) ‖ key ‖ value`, so that
    /// any key and value round-trip through [`Proposal::key_value`].
    pub fn new(key: impl AsRef<[u8]>, value: impl AsRef<[u8]>) -> Self {
        let (key, value) = (key.as_ref(), value.as_ref());
        let mut data = Vec::with_capacity(4 + key.len() + value.len());
        let key_len = u32::try_from(key.len()).expect("keys over 4 GiB are not representable");
        data.extend_from_slice(&key_len.to_be_bytes());
        data.extend_from_slice(key);
        data.extend_from_slice(value);
        Proposal {
            data: data.into(),
            signature: None,
        }
    }

    /// A proposal of raw bytes, for state machines with their own command encoding.
    pub fn from_bytes(data: impl Into<Bytes>) -> Self {
        Proposal {
            data: data.into(),
            signature: None,
        }
    }

    /// `data` signed by the client holding `key`: GPU-optimized Raft checks the signature
    /// (in a batch with the others waiting) before appending, refuses the proposal with
    /// [`RejectReason::ClientSignature`](crate::protocol::RejectReason::ClientSignature) when
    /// it does not verify or the key is not allowed, and keeps it in the log.
    pub fn signed(data: impl Into<Bytes>, key: &ed25519_dalek::SigningKey) -> Self {
        let data = data.into();
        let signature = crate::ClientSignature::sign(&data, key);
        Proposal {
            data,
            signature: Some(signature),
        }
    }

    /// `data` with a signature made elsewhere (e.g. by the client of a node).
    pub fn with_signature(data: impl Into<Bytes>, signature: crate::ClientSignature) -> Self {
        Proposal {
            data: data.into(),
            signature: Some(signature),
        }
    }

    /// The key and value of a proposal made with [`Proposal::new`], or `None` if the bytes are not
    /// in that encoding.
    pub fn key_value(&self) -> Option<(&[u8], &[u8])> {
        let len_bytes: [u8; 4] = self.data.get(..4)?.try_into().ok()?;
        let key_len = usize::try_from(u32::from_be_bytes(len_bytes)).ok()?;
        let rest = &self.data[4..];
        (key_len <= rest.len()).then(|| rest.split_at(key_len))
    }
}

/// The outcome of a proposal.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ConsensusResult {
    /// The proposal is durably replicated on a quorum at this log position.
    Committed {
        /// Where the proposal sits in the log. Under PBFT too this is the position of the
        /// command itself (a batch's commands take consecutive positions), not the batch's
        /// sequence number, so that every command has its own.
        index: LogIndex,
        /// Raft: the term of the leader that appended it. PBFT: the sequence number of the batch
        /// that carried it (not the view, which may differ between replicas that committed the
        /// same batch; see [`crate::protocol::pbft`]).
        term: Term,
    },
    /// The proposal was never appended to the log and never will be.
    Rejected {
        /// Why, matchable (e.g. [`RejectReason::NotLeader`] names the leader to redirect to);
        /// its `Display` is the message for people.
        ///
        /// [`RejectReason::NotLeader`]: crate::protocol::RejectReason::NotLeader
        reason: crate::protocol::RejectReason,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Entries are moved and copied on every commit: a large variant of a rare payload must
    /// not make all of them larger (an inline membership cost the in-process bench ~10%).
    #[test]
    fn an_entry_stays_as_small_as_a_command_needs() {
        let command = std::mem::size_of::<ProposalTag>() + std::mem::size_of::<Bytes>();
        assert!(std::mem::size_of::<Payload>() <= command + 8);
        assert!(std::mem::size_of::<Entry>() <= command + 8 + 16);
    }

    #[test]
    fn key_value_round_trips_including_empty_and_binary() {
        for (k, v) in [
            (&b""[..], &b""[..]),
            (b"key", b"value"),
            (b"\x00\xff", b"\x00"),
        ] {
            let p = Proposal::new(k, v);
            assert_eq!(p.key_value(), Some((k, v)));
        }
    }

    #[test]
    fn node_names_map_to_stable_ids() {
        assert_eq!(NodeId::from_name("7"), NodeId(7));
        assert_eq!(NodeId::from_name("node-001"), NodeId::from_name("node-001"));
        assert_ne!(NodeId::from_name("node-001"), NodeId::from_name("node-002"));
        // FNV-1a of "a" (a published test vector), so ids never change between versions.
        assert_eq!(NodeId::from_name("a"), NodeId(0xaf63_dc4c_8601_ec8c));
    }

    #[test]
    fn key_value_refuses_bytes_not_in_its_encoding() {
        assert_eq!(Proposal::from_bytes(&b"\x00\x00"[..]).key_value(), None);
        assert_eq!(
            Proposal::from_bytes(&b"\x00\x00\x00\x09abc"[..]).key_value(),
            None
        );
    }
}
