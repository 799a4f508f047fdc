//! Fuzzing the decoders of the records the fjall store reads back from disk: log entries, the
//! hard state, snapshot metadata and log keys. Inputs are valid records of random content, then
//! damaged: bytes flipped, cut or added, the length field rewritten, or the body changed and the
//! record resealed with a correct checksum (so the body decoders behind the checksum are reached
//! too), or decoded as another kind. Each must decode or give `StorageError::Corrupt`, never
//! panic; a length field is checked against the bytes present before the body is read.

use proptest::prelude::*;

use super::*;
use crate::fuzzing::config;

#[derive(Debug, Clone)]
enum Record {
    Entry(Entry),
    HardState(HardState),
    Snapshot(SnapshotRecord),
}

fn record() -> impl Strategy<Value = Record> {
    let data = || prop::collection::vec(any::<u8>(), 0..48);
    prop_oneof![
        (
            any::<u64>(),
            any::<u64>(),
            prop::option::of((any::<u64>(), any::<u64>(), data()))
        )
            .prop_map(|(term, index, command)| Record::Entry(Entry {
                term,
                index,
                payload: match command {
                    None => Payload::Blank,
                    Some((proposer, request_id, data)) => Payload::Command {
                        tag: ProposalTag {
                            proposer: NodeId(proposer),
                            request_id,
                        },
                        data: data.into(),
                    },
                },
            })),
        (any::<u64>(), prop::option::of(any::<u64>())).prop_map(|(term, vote)| {
            Record::HardState(HardState {
                term,
                voted_for: vote.map(NodeId),
            })
        }),
        (
            (any::<u64>(), any::<u64>(), any::<u64>(), any::<u32>()),
            prop::option::of(prop::array::uniform3(prop::collection::btree_set(
                any::<u64>().prop_map(NodeId),
                0..4
            )))
        )
            .prop_map(|((index, term, length, crc), sets)| {
                Record::Snapshot(SnapshotRecord {
                    index,
                    term,
                    length,
                    crc,
                    membership: sets.map(|[voters, outgoing, learners]| {
                        crate::membership::Membership {
                            voters,
                            outgoing,
                            learners,
                            addresses: Default::default(),
                            keys: Default::default(),
                        }
                    }),
                })
            }),
    ]
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
    Append(Vec<u8>),
    /// Rewrites the header's body length.
    Length(u32),
    /// Changes the body and reseals it with its kind and a correct checksum.
    Reseal {
        at: usize,
        byte: u8,
        cut: Option<usize>,
    },
    /// Decodes the record as another kind (0: entry, 1: hard state, 2: snapshot).
    AsKind(u8),
}

fn damage() -> impl Strategy<Value = Damage> {
    prop_oneof![
        1 => Just(Damage::None),
        3 => (any::<usize>(), 1..=255u8).prop_map(|(at, mask)| Damage::Flip { at, mask }),
        2 => any::<usize>().prop_map(|at| Damage::Cut { at }),
        1 => prop::collection::vec(any::<u8>(), 1..8).prop_map(Damage::Append),
        2 => prop_oneof![Just(u32::MAX), Just(0), any::<u32>()].prop_map(Damage::Length),
        4 => (any::<usize>(), any::<u8>(), prop::option::of(any::<usize>()))
            .prop_map(|(at, byte, cut)| Damage::Reseal { at, byte, cut }),
        1 => (0..3u8).prop_map(Damage::AsKind),
    ]
}

fn encode(record: &Record) -> (Vec<u8>, RecordKind) {
    match record {
        Record::Entry(entry) => (encode_entry(entry), RecordKind::Entry),
        Record::HardState(state) => (encode_hard_state(*state), RecordKind::HardState),
        Record::Snapshot(meta) => (encode_snapshot(meta), RecordKind::Snapshot),
    }
}

/// Decodes `bytes` as `kind`; `Ok(true)` when it decoded to `original`.
fn decode(bytes: &[u8], kind: RecordKind, original: &Record) -> Result<bool, StorageError> {
    Ok(match kind {
        RecordKind::Entry => {
            let entry = decode_entry(bytes, "log index 1")?;
            matches!(original, Record::Entry(expected) if *expected == entry)
        }
        RecordKind::HardState => {
            let state = decode_hard_state(bytes)?;
            matches!(original, Record::HardState(expected) if *expected == state)
        }
        RecordKind::Snapshot | RecordKind::CoreRecord => {
            let meta = decode_snapshot(bytes)?;
            matches!(original, Record::Snapshot(expected) if *expected == meta)
        }
    })
}

proptest! {
    #![proptest_config(config(30_000))]

    #[test]
    fn fuzz_stored_records(record in record(), damage in damage(), key in prop::collection::vec(any::<u8>(), 0..12)) {
        let (mut bytes, mut kind) = encode(&record);
        let mut intact = false;
        // Damage that the header or the checksum must catch (all but a resealed body).
        let mut detectable = false;
        match damage.clone() {
            Damage::None => intact = true,
            Damage::Flip { at, mask } => {
                let at = at % bytes.len();
                bytes[at] ^= mask;
                detectable = true;
            }
            Damage::Cut { at } => {
                bytes.truncate(at % bytes.len());
                detectable = true;
            }
            Damage::Append(extra) => {
                bytes.extend_from_slice(&extra);
                detectable = true;
            }
            Damage::Length(length) => {
                detectable = bytes[2..6] != length.to_le_bytes();
                bytes[2..6].copy_from_slice(&length.to_le_bytes());
            }
            Damage::Reseal { at, byte, cut } => {
                let mut body = bytes[HEADER_LEN..].to_vec();
                let at = at % body.len().max(1);
                if let Some(slot) = body.get_mut(at) {
                    *slot = byte;
                }
                if let Some(cut) = cut {
                    body.truncate(cut % (body.len() + 1));
                }
                bytes = seal(kind, &body);
            }
            Damage::AsKind(other) => {
                kind = [RecordKind::Entry, RecordKind::HardState, RecordKind::Snapshot][other as usize];
            }
        }
        match decode(&bytes, kind, &record) {
            Ok(same) => prop_assert!(same || !intact),
            Err(StorageError::Corrupt { .. }) => prop_assert!(!intact, "an intact record was refused"),
            Err(other) => prop_assert!(false, "not a corruption error: {other}"),
        }
        if detectable {
            prop_assert!(decode(&bytes, kind, &record).is_err(), "{:?} went unnoticed", damage);
        }
        match decode_key(&key) {
            Ok(index) => prop_assert_eq!(key.as_slice(), &encode_key(index)[..]),
            Err(StorageError::Corrupt { .. }) => prop_assert_ne!(key.len(), 8),
            Err(other) => prop_assert!(false, "not a corruption error: {other}"),
        }
    }
}
