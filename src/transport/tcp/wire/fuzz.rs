//! Fuzzing what a server reads from a peer: a length-delimited frame (tokio's codec with the
//! frame limit), tarpc's request in postcard (through [`ServerCodec`]), and the batch payload in a
//! delivery ([`open_payload`]) of Raft messages. Inputs are valid frames built from random
//! messages, then damaged: bytes flipped, cut, inserted, length fields and the deadline
//! overwritten. Each case must decode or fail with an error, never panic, and a declared length
//! past the frame limit (the frame's prefix, a compressed body's size) must get the length error,
//! which comes before anything of that size is allocated.

use std::pin::Pin;
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use proptest::prelude::*;
use tarpc::tokio_serde::{Deserializer, Serializer};
use tokio_util::codec::{Decoder, LengthDelimitedCodec};

use super::*;
use crate::fuzzing::config;
use crate::protocol::raft::Message;
use crate::types::{Entry, Payload, ProposalTag};

type Request = tarpc::ClientMessage<PeerServiceRequest>;

fn entry() -> impl Strategy<Value = Entry> {
    (
        any::<u64>(),
        any::<u64>(),
        prop::option::of((
            any::<u64>(),
            any::<u64>(),
            prop::collection::vec(any::<u8>(), 0..64),
        )),
    )
        .prop_map(|(term, index, command)| Entry {
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
        })
}

fn message() -> impl Strategy<Value = Message> {
    prop_oneof![
        (any::<u64>(), any::<u64>(), any::<u64>()).prop_map(|(term, index, last)| {
            Message::PreVote {
                term,
                last_log_index: index,
                last_log_term: last,
            }
        }),
        (any::<u64>(), any::<bool>())
            .prop_map(|(term, granted)| Message::RequestVoteResponse { term, granted }),
        (
            any::<u64>(),
            any::<u64>(),
            any::<u64>(),
            prop::collection::vec(entry(), 0..6),
            any::<u64>()
        )
            .prop_map(
                |(term, prev_log_index, prev_log_term, entries, leader_commit)| {
                    Message::AppendEntries {
                        term,
                        prev_log_index,
                        prev_log_term,
                        entries,
                        leader_commit,
                    }
                }
            ),
    ]
}

/// How a valid input is damaged.
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
    /// Overwrites 4 bytes (a length field, somewhere) with `value`, little- or big-endian.
    Word {
        at: usize,
        value: u32,
        big_endian: bool,
    },
    /// Overwrites a run with 0xff: varints that claim huge lengths, deadlines, counts.
    Saturate {
        at: usize,
        len: usize,
    },
    /// Inserts a postcard varint u64 (seven bits a byte, low first) in place of the byte at
    /// `at`: a length, count or duration field that claims `value`.
    Varint {
        at: usize,
        value: u64,
    },
}

fn damage() -> impl Strategy<Value = Damage> {
    let value = prop_oneof![
        Just(u32::MAX),
        Just(0x7fff_ffff),
        Just(16 << 20),
        any::<u32>()
    ];
    prop_oneof![
        1 => Just(Damage::None),
        3 => (any::<usize>(), 1..=255u8).prop_map(|(at, mask)| Damage::Flip { at, mask }),
        2 => any::<usize>().prop_map(|at| Damage::Cut { at }),
        2 => (any::<usize>(), prop::collection::vec(any::<u8>(), 1..16))
            .prop_map(|(at, bytes)| Damage::Insert { at, bytes }),
        3 => (any::<usize>(), value, any::<bool>())
            .prop_map(|(at, value, big_endian)| Damage::Word { at, value, big_endian }),
        2 => (any::<usize>(), 1..12usize).prop_map(|(at, len)| Damage::Saturate { at, len }),
        3 => (0..24usize, prop_oneof![Just(u64::MAX), Just(1 << 40), any::<u64>()])
            .prop_map(|(at, value)| Damage::Varint { at, value }),
    ]
}

fn apply(bytes: &mut Vec<u8>, damage: &[Damage]) {
    for damage in damage {
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
            Damage::Word {
                at,
                value,
                big_endian,
            } => {
                let word = if *big_endian {
                    value.to_be_bytes()
                } else {
                    value.to_le_bytes()
                };
                let at = at % len;
                for (offset, byte) in word.iter().enumerate() {
                    if let Some(slot) = bytes.get_mut(at + offset) {
                        *slot = *byte;
                    }
                }
            }
            Damage::Varint { at, value } => {
                // Mostly near the front, where the envelope's fields are.
                if *at < bytes.len() {
                    bytes.splice(*at..*at + 1, varint(*value));
                }
            }
            Damage::Saturate { at, len: run } => {
                let at = at % len;
                for slot in bytes.iter_mut().skip(at).take(*run) {
                    *slot = 0xff;
                }
            }
        }
    }
}

/// `value` as postcard writes a u64.
fn varint(mut value: u64) -> Vec<u8> {
    let mut bytes = Vec::new();
    loop {
        let low = (value & 0x7f) as u8;
        value >>= 7;
        if value == 0 {
            bytes.push(low);
            return bytes;
        }
        bytes.push(low | 0x80);
    }
}

/// A valid frame: a tarpc request carrying a hello or a delivery of `messages`.
fn frame(messages: &[Message], compress: bool, hello: bool) -> Vec<u8> {
    let request = if hello {
        PeerServiceRequest::Hello {
            hello: Hello {
                protocol_version: PROTOCOL_VERSION,
                cluster_id: "fuzz".to_owned(),
                node_id: NodeId(2),
            },
        }
    } else {
        let body: Vec<u8> = messages
            .iter()
            .flat_map(|message| encode_message(message).expect("encodes"))
            .collect();
        PeerServiceRequest::Deliver {
            payload: seal_payload(body, compress),
        }
    };
    let mut context = tarpc::context::current();
    context.deadline = std::time::Instant::now() + Duration::from_secs(10);
    let message: Request = tarpc::ClientMessage::Request(tarpc::Request {
        context,
        id: 7,
        message: request,
    });
    let mut codec = ServerCodec::<Request, Request>::default();
    let encoded: Bytes = Pin::new(&mut codec).serialize(&message).expect("encodes");
    let mut framed = Vec::with_capacity(encoded.len() + 4);
    framed.put_u32(encoded.len() as u32);
    framed.extend_from_slice(&encoded);
    framed
}

/// How far the server got with the bytes of a connection.
#[derive(Debug, PartialEq, Eq)]
enum Served {
    /// The frame is not complete (the server waits for more bytes).
    Incomplete,
    /// The length prefix is past the frame limit: refused before the frame is read.
    FrameTooLong,
    /// The frame is not a request tarpc understands.
    BadRequest,
    /// A hello, decoded.
    Hello,
    /// A delivery whose compressed body claims more than the limit: refused before
    /// decompressing.
    BatchTooLarge,
    /// A delivery whose batch does not decode.
    BadBatch,
    /// A delivery and its messages.
    Messages(usize),
}

/// What the server does with the bytes of a connection, up to its first request: the frame,
/// the request, and for a delivery the batch.
fn serve_bytes(bytes: &[u8], max_frame_bytes: usize) -> Served {
    let mut codec = LengthDelimitedCodec::builder()
        .max_frame_length(max_frame_bytes)
        .new_codec();
    let mut buffer = BytesMut::from(bytes);
    let frame = match codec.decode(&mut buffer) {
        Ok(Some(frame)) => frame,
        Ok(None) => return Served::Incomplete,
        Err(_) => return Served::FrameTooLong,
    };
    let mut server = ServerCodec::<Request, Request>::default();
    let Ok(tarpc::ClientMessage::Request(request)) = Pin::new(&mut server).deserialize(&frame)
    else {
        return Served::BadRequest;
    };
    match request.message {
        PeerServiceRequest::Hello { .. } => Served::Hello,
        PeerServiceRequest::Deliver { payload } => {
            match open_payload::<Message>(&payload, max_frame_bytes) {
                Ok(messages) => Served::Messages(messages.len()),
                Err(BatchError::TooLarge { .. }) => Served::BatchTooLarge,
                Err(_) => Served::BadBatch,
            }
        }
    }
}

/// The length a compressed payload inside `frame` claims, if the frame is a delivery of one.
fn claimed_body(frame: &[u8]) -> Option<usize> {
    let mut server = ServerCodec::<Request, Request>::default();
    let Ok(tarpc::ClientMessage::Request(request)) =
        Pin::new(&mut server).deserialize(&BytesMut::from(frame))
    else {
        return None;
    };
    let PeerServiceRequest::Deliver { payload } = request.message else {
        return None;
    };
    match payload.split_first() {
        Some((&1, rest)) => rest
            .first_chunk::<4>()
            .map(|length| u32::from_le_bytes(*length) as usize),
        _ => None,
    }
}

proptest! {
    #![proptest_config(config(30_000))]

    #[test]
    fn fuzz_peer_frames(
        messages in prop::collection::vec(message(), 0..5),
        compress in any::<bool>(),
        hello in prop::bool::weighted(0.1),
        damage in prop::collection::vec(damage(), 1..4),
        small_limit in any::<bool>(),
    ) {
        let max_frame_bytes = if small_limit { 4096 } else { 16 << 20 };
        let mut bytes = frame(&messages, compress, hello);
        apply(&mut bytes, &damage);
        let served = serve_bytes(&bytes, max_frame_bytes);
        if let Some(prefix) = bytes.first_chunk::<4>() {
            let declared = u32::from_be_bytes(*prefix) as usize;
            if declared > max_frame_bytes {
                prop_assert_eq!(&served, &Served::FrameTooLong);
            } else if bytes.len() >= 4 + declared
                && claimed_body(&bytes[4..4 + declared]).is_some_and(|claimed| claimed > max_frame_bytes)
            {
                prop_assert_eq!(&served, &Served::BatchTooLarge);
            }
        }
        if matches!(damage.as_slice(), [Damage::None]) && bytes.len() <= max_frame_bytes {
            prop_assert!(matches!(served, Served::Hello | Served::Messages(_)), "{:?}", served);
        }
    }
}

#[test]
fn a_valid_frame_is_served_and_a_huge_deadline_is_refused_not_a_panic() {
    let bytes = frame(
        &[Message::RequestVoteResponse {
            term: 3,
            granted: true,
        }],
        false,
        false,
    );
    assert_eq!(serve_bytes(&bytes, 4096), Served::Messages(1));
    // The deadline follows the variant tag (one byte) and is a varint u64 of seconds (one byte
    // for 10 s): make it u64::MAX (ten bytes).
    let mut request = bytes[4..].to_vec();
    assert!(request[1] < 0x80, "the seconds take one byte");
    request.splice(1..2, varint(u64::MAX));
    let error = check_request_deadline(&request).expect_err("a deadline past the clock");
    assert!(error.to_string().contains("deadline"), "{error}");
    let mut framed = (request.len() as u32).to_be_bytes().to_vec();
    framed.extend_from_slice(&request);
    assert_eq!(serve_bytes(&framed, 1 << 20), Served::BadRequest);
}
