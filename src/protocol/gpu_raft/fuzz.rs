//! Fuzzing the decoders of the records GPU-optimized Raft keeps in its store and reads back on
//! start-up and in `verify_log`: commit certificates and vote evidence (postcard), as
//! [`GpuRaftNode::new`](super::GpuRaftNode::new) and `crate::verify` decode them. Inputs are
//! encodings of random records, then damaged: bytes flipped, cut, inserted, or a varint (a
//! length, count or field) rewritten to claim up to 2^64. Each must decode or fail with
//! postcard's error, never panic; postcard checks a declared length against the bytes left
//! before it reads them.

use bytes::Bytes;
use proptest::prelude::*;

use super::{CommitCertificate, SignedAck};
use crate::fuzzing::config;
use crate::protocol::raft::{SignedVote, VoteEquivocation};
use crate::types::NodeId;

fn ack() -> impl Strategy<Value = SignedAck> {
    (
        any::<u64>(),
        any::<u64>(),
        any::<u64>(),
        any::<[u8; 32]>(),
        prop::collection::vec(any::<u8>(), 0..70),
    )
        .prop_map(|(voter, term, index, chain, signature)| SignedAck {
            voter: NodeId(voter),
            term,
            index,
            chain,
            signature: Bytes::from(signature),
        })
}

fn certificate() -> impl Strategy<Value = CommitCertificate> {
    (
        any::<u64>(),
        any::<u64>(),
        any::<[u8; 32]>(),
        prop::collection::vec(any::<[u8; 32]>(), 0..3),
        prop::collection::vec(ack(), 0..4),
        any::<u64>(),
    )
        .prop_map(
            |(term, index, chain, path, acks, membership_index)| CommitCertificate {
                term,
                index,
                chain,
                path,
                acks,
                membership_index,
            },
        )
}

fn vote() -> impl Strategy<Value = SignedVote> {
    (
        any::<u64>(),
        any::<u64>(),
        any::<u64>(),
        prop::collection::vec(any::<u8>(), 0..70),
    )
        .prop_map(|(term, candidate, voter, signature)| SignedVote {
            term,
            candidate: NodeId(candidate),
            voter: NodeId(voter),
            signature: Bytes::from(signature),
        })
}

#[derive(Debug, Clone)]
enum Damage {
    None,
    Flip {
        at: usize,
        mask: u8,
    },
    Cut {
        at: usize,
    },
    Insert {
        at: usize,
        bytes: Vec<u8>,
    },
    /// A postcard varint claiming `value` in place of the byte at `at`.
    Varint {
        at: usize,
        value: u64,
    },
}

fn damage() -> impl Strategy<Value = Damage> {
    prop_oneof![
        Just(Damage::None),
        (any::<usize>(), 1..=255u8).prop_map(|(at, mask)| Damage::Flip { at, mask }),
        any::<usize>().prop_map(|at| Damage::Cut { at }),
        (any::<usize>(), prop::collection::vec(any::<u8>(), 1..8))
            .prop_map(|(at, bytes)| Damage::Insert { at, bytes }),
        (
            any::<usize>(),
            prop_oneof![Just(u64::MAX), Just(u64::from(u32::MAX)), any::<u64>()]
        )
            .prop_map(|(at, value)| Damage::Varint { at, value }),
    ]
}

fn apply(bytes: &mut Vec<u8>, damage: &Damage) {
    let len = bytes.len().max(1);
    match damage {
        Damage::None => {}
        Damage::Flip { at, mask } => {
            if let Some(byte) = bytes.get_mut(at % len) {
                *byte ^= mask;
            }
        }
        Damage::Cut { at } => bytes.truncate(at % len),
        Damage::Insert {
            at,
            bytes: inserted,
        } => {
            let at = at % (bytes.len() + 1);
            bytes.splice(at..at, inserted.iter().copied());
        }
        Damage::Varint { at, value } => {
            let at = at % (bytes.len() + 1);
            let mut varint = Vec::new();
            let mut rest = *value;
            loop {
                let low = (rest & 0x7f) as u8;
                rest >>= 7;
                if rest == 0 {
                    varint.push(low);
                    break;
                }
                varint.push(low | 0x80);
            }
            let end = (at + 1).min(bytes.len());
            bytes.splice(at..end, varint);
        }
    }
}

proptest! {
    #![proptest_config(config(20_000))]

    #[test]
    fn fuzz_gpu_raft_records(
        certificate in certificate(),
        first in vote(),
        second in vote(),
        damage in prop::collection::vec(damage(), 1..3),
    ) {
        let mut bytes = postcard::to_stdvec(&certificate).expect("encodes");
        for damage in &damage {
            apply(&mut bytes, damage);
        }
        if let Ok(decoded) = postcard::from_bytes::<CommitCertificate>(&bytes)
            && matches!(damage.as_slice(), [Damage::None])
        {
            prop_assert_eq!(decoded, certificate);
        }
        let evidence = VoteEquivocation { first, second };
        let mut bytes = postcard::to_stdvec(&evidence).expect("encodes");
        for damage in &damage {
            apply(&mut bytes, damage);
        }
        let _ = postcard::from_bytes::<VoteEquivocation>(&bytes);
        let _ = crate::verify::decode_validators(&bytes);
    }
}
