//! What travels between nodes: the tarpc service (a handshake and batch delivery) and the
//! encoding of a batch of messages.
//!
//! A batch payload is one flag byte, then the body: `0` = the body as is; `1` = a little-endian
//! `u32` of the body's length followed by the body compressed as one LZ4 block. The body is a run
//! of messages, each a little-endian `u32` length and the message in postcard
//! ([`crate::encoding`]). tarpc's envelope around the payload is postcard too ([`Codec`]).
//! Before protocol version 8 both were bincode 1.3, which is no longer maintained.
//! A length with its top bit set marks a message that carries a traced proposal: the
//! [`TraceAttachment`] (41 bytes) comes between the length and the message, and the length
//! (less that bit) counts the message alone.
//! Payloads are compressed only when the sender enables `message_compression`, the body is at
//! least [`COMPRESSION_THRESHOLD`] bytes, and compression makes it smaller; a receiver decodes
//! both forms whatever its own setting.

use std::pin::Pin;
use std::time::{Duration, Instant};

use std::marker::PhantomData;

use bytes::{Bytes, BytesMut};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tarpc::tokio_serde::{Deserializer, Serializer};

use crate::encoding::{self, DecodeError};
use crate::telemetry::TraceAttachment;
use crate::types::NodeId;

/// Version of this wire protocol; a peer speaking another one is refused in the handshake.
/// 2: Raft's `Commit` message and the `NotCertified` refusal. 3: trace attachments. 4: Raft's
/// heartbeat rounds and read indexes (`ReadIndex`, `ReadIndexResponse`). 5: Raft's snapshot
/// transfer (`InstallSnapshot`, `InstallSnapshotResponse`). 6: membership entries
/// (`Payload::Membership`) and the snapshot's membership in `InstallSnapshot`. 7: members'
/// addresses in memberships, and forwarded membership changes (`ForwardMembership`,
/// `MembershipAnswer`). 8: postcard instead of bincode, for the messages and tarpc's envelope.
pub(crate) const PROTOCOL_VERSION: u32 = 8;

/// The top bit of a message length: a trace attachment precedes the message.
const TRACED: u32 = 1 << 31;

/// Bodies shorter than this go uncompressed: LZ4 gains little on them and costs a copy.
pub(crate) const COMPRESSION_THRESHOLD: usize = 512;

/// Bytes of a delivery frame that are not the payload (tarpc's request envelope: ids, deadline,
/// trace context, enum tags), with room to spare; batches are cut to the frame limit minus this.
pub(crate) const FRAME_OVERHEAD: usize = 1024;

const FLAG_RAW: u8 = 0;
const FLAG_LZ4: u8 = 1;

/// What each side of a connection says about itself.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Hello {
    /// [`PROTOCOL_VERSION`] of the sender.
    pub(crate) protocol_version: u32,
    /// The cluster the sender belongs to; nodes of different clusters never talk.
    pub(crate) cluster_id: String,
    /// The sender's node id.
    pub(crate) node_id: NodeId,
}

/// Why a server refused a call. The client closes the connection on any refusal.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub(crate) enum Refusal {
    /// The peers speak different protocol versions.
    #[error("protocol version {got} is not {expected}")]
    ProtocolVersion { expected: u32, got: u32 },
    /// The peers belong to different clusters.
    #[error("cluster {got:?} is not {expected:?}")]
    WrongCluster { expected: String, got: String },
    /// The caller claims the server's own node id (a misconfiguration, or a node dialing itself).
    #[error("node id {0} is the server's own")]
    SameNodeId(NodeId),
    /// A second hello on one connection with another id.
    #[error("connection already introduced as {0}")]
    AlreadyIntroduced(NodeId),
    /// A delivery before the hello.
    #[error("deliver before hello")]
    NotIntroduced,
    /// The batch payload does not decode.
    #[error("malformed batch: {0}")]
    MalformedBatch(String),
    /// The caller's hello claims another node than the one its TLS certificate names.
    #[error("the certificate names {certified}, not {claimed}")]
    NotCertified { certified: NodeId, claimed: NodeId },
}

/// The RPCs between two nodes. The dialing node calls `hello` once, then `deliver` for each batch.
#[tarpc::service]
pub(crate) trait PeerService {
    /// Introduces the caller; the answer introduces the server.
    async fn hello(hello: Hello) -> Result<Hello, Refusal>;
    /// Delivers one batch payload (see the module documentation) from the introduced caller.
    async fn deliver(payload: Bytes) -> Result<(), Refusal>;
}

/// tarpc's frames (requests and responses) in postcard: the codec of a connection's client side,
/// and of its server side inside [`ServerCodec`]. A frame must decode whole.
pub(crate) struct Codec<Item, SinkItem> {
    types: PhantomData<fn(SinkItem) -> Item>,
}

impl<Item, SinkItem> Default for Codec<Item, SinkItem> {
    fn default() -> Self {
        Codec { types: PhantomData }
    }
}

impl<Item, SinkItem> Deserializer<Item> for Codec<Item, SinkItem>
where
    Item: DeserializeOwned,
{
    type Error = std::io::Error;

    fn deserialize(self: Pin<&mut Self>, src: &BytesMut) -> Result<Item, Self::Error> {
        encoding::decode_whole(src)
            .map_err(|error| std::io::Error::new(std::io::ErrorKind::InvalidData, error))
    }
}

impl<Item, SinkItem> Serializer<SinkItem> for Codec<Item, SinkItem>
where
    SinkItem: Serialize,
{
    type Error = std::io::Error;

    fn serialize(self: Pin<&mut Self>, item: &SinkItem) -> Result<Bytes, Self::Error> {
        encoding::to_vec(item)
            .map(Bytes::from)
            .map_err(|error| std::io::Error::new(std::io::ErrorKind::InvalidData, error))
    }
}

/// The codec of frames a server reads: [`Codec`], after one check of its own. tarpc turns a
/// request's deadline, sent as a duration, into `Instant::now() + duration`, which panics when
/// the sum overflows: a peer sending a deadline of ~2^64 seconds would panic the task reading its
/// connection. Such a frame is refused as invalid data instead (the connection then closes).
pub(crate) struct ServerCodec<Item, SinkItem> {
    inner: Codec<Item, SinkItem>,
}

impl<Item, SinkItem> Default for ServerCodec<Item, SinkItem> {
    fn default() -> Self {
        Self {
            inner: Codec::default(),
        }
    }
}

/// Checks the deadline of a tarpc `ClientMessage::Request` (variant 0, whose first field is its
/// context, whose first field is the deadline) before tarpc adds it to the clock.
fn check_request_deadline(frame: &[u8]) -> std::io::Result<()> {
    let prefix = postcard::take_from_bytes::<(u32, Duration)>(frame);
    match prefix {
        Ok(((0, deadline), _)) if Instant::now().checked_add(deadline).is_none() => {
            Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("request deadline {deadline:?} from now is past the clock's range"),
            ))
        }
        // Another variant, or a frame that does not decode: tarpc's decoder reports the latter.
        _ => Ok(()),
    }
}

impl<Item, SinkItem> Deserializer<Item> for ServerCodec<Item, SinkItem>
where
    Item: DeserializeOwned + Unpin,
    SinkItem: Unpin,
{
    type Error = std::io::Error;

    fn deserialize(self: Pin<&mut Self>, src: &BytesMut) -> Result<Item, Self::Error> {
        check_request_deadline(src)?;
        Pin::new(&mut self.get_mut().inner).deserialize(src)
    }
}

impl<Item, SinkItem> Serializer<SinkItem> for ServerCodec<Item, SinkItem>
where
    Item: Unpin,
    SinkItem: Serialize + Unpin,
{
    type Error = std::io::Error;

    fn serialize(self: Pin<&mut Self>, item: &SinkItem) -> Result<Bytes, Self::Error> {
        Pin::new(&mut self.get_mut().inner).serialize(item)
    }
}

/// Why a batch payload does not decode.
#[derive(Debug, thiserror::Error)]
pub(crate) enum BatchError {
    #[error("empty payload")]
    Empty,
    #[error("unknown payload flag {0}")]
    UnknownFlag(u8),
    #[error("compressed payload claims {claimed} bytes, the limit is {limit}")]
    TooLarge { claimed: usize, limit: usize },
    #[error("payload ends inside {0}")]
    Truncated(&'static str),
    #[error("LZ4 block does not decompress: {0}")]
    Decompress(String),
    #[error("message {index} does not decode: {source}")]
    Message { index: usize, source: DecodeError },
}

/// Why a message cannot go into a batch.
#[derive(Debug, thiserror::Error)]
pub(crate) enum EncodeError {
    #[error(transparent)]
    Postcard(#[from] postcard::Error),
    #[error("message of {0} bytes exceeds 2 GiB")]
    TooLarge(usize),
}

/// Serializes one message as it goes into a batch body: length prefix and postcard bytes.
#[cfg(test)]
pub(crate) fn encode_message<M: Serialize>(message: &M) -> Result<Vec<u8>, EncodeError> {
    encode_traced_message(message, None)
}

/// [`encode_message`], with the trace attachment of a traced proposal it carries.
#[cfg(test)]
pub(crate) fn encode_traced_message<M: Serialize>(
    message: &M,
    trace: Option<&TraceAttachment>,
) -> Result<Vec<u8>, EncodeError> {
    let mut builder = PayloadBuilder::new();
    builder.push(message, trace, usize::MAX)?;
    let mut encoded = builder.payload;
    encoded.remove(0);
    Ok(encoded)
}

/// A batch payload being built: the flag byte, then each message encoded in place, so that a
/// message's bytes are copied once on their way into the frame (a snapshot chunk of 1 MiB was
/// copied four times here when each message was encoded on its own and the body sealed after).
pub(crate) struct PayloadBuilder {
    payload: Vec<u8>,
}

/// What [`PayloadBuilder::push`] did with a message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Pushed {
    /// It is in the batch.
    Added,
    /// It does not fit beside the messages already in the batch; the batch is unchanged.
    Full,
    /// It does not fit in a batch on its own; the batch is unchanged.
    TooLarge {
        /// Its encoded size.
        bytes: usize,
    },
}

impl PayloadBuilder {
    /// An empty, uncompressed batch.
    pub(crate) fn new() -> Self {
        PayloadBuilder {
            payload: vec![FLAG_RAW],
        }
    }

    /// The body's length so far (the payload less its flag).
    pub(crate) fn body_len(&self) -> usize {
        self.payload.len() - 1
    }

    /// Appends `message` (with the attachment of the traced proposal it carries) if the body
    /// stays within `max_body` bytes.
    pub(crate) fn push<M: Serialize>(
        &mut self,
        message: &M,
        trace: Option<&TraceAttachment>,
        max_body: usize,
    ) -> Result<Pushed, EncodeError> {
        let size = encoding::encoded_len(message)?;
        let size = u32::try_from(size)
            .ok()
            .filter(|&size| size < TRACED)
            .ok_or(EncodeError::TooLarge(size))?;
        let attachment = trace.map(TraceAttachment::to_bytes);
        let extra = attachment.as_ref().map_or(0, |bytes| bytes.len());
        let encoded = 4 + extra + size as usize;
        if encoded > max_body {
            return Ok(Pushed::TooLarge { bytes: encoded });
        }
        if self.body_len() + encoded > max_body {
            return Ok(Pushed::Full);
        }
        let start = self.payload.len();
        self.payload.reserve(encoded);
        let marked = if attachment.is_some() {
            size | TRACED
        } else {
            size
        };
        self.payload.extend_from_slice(&marked.to_le_bytes());
        if let Some(bytes) = &attachment {
            self.payload.extend_from_slice(bytes);
        }
        if let Err(error) = encoding::append(message, &mut self.payload) {
            self.payload.truncate(start);
            return Err(error.into());
        }
        Ok(Pushed::Added)
    }

    /// The payload: as built, or compressed when that is asked and pays.
    pub(crate) fn seal(self, compress: bool) -> Bytes {
        let body = &self.payload[1..];
        if compress && body.len() >= COMPRESSION_THRESHOLD {
            let compressed = lz4_flex::block::compress(body);
            if compressed.len() + 5 < body.len() + 1 {
                let mut payload = Vec::with_capacity(compressed.len() + 5);
                payload.push(FLAG_LZ4);
                // The body is cut below the frame limit, itself below 4 GiB (checked by
                // validation).
                payload.extend_from_slice(&(body.len() as u32).to_le_bytes());
                payload.extend_from_slice(&compressed);
                return payload.into();
            }
        }
        self.payload.into()
    }
}

/// A decoded message, with the trace attachment it came with (`None` also when the attachment
/// named no valid context: a bad trace context costs the trace, not the message).
pub(crate) type Received<M> = (M, Option<Box<TraceAttachment>>);

/// Turns a body of encoded messages into a payload, compressing it when that is asked and pays.
#[cfg(test)]
pub(crate) fn seal_payload(body: Vec<u8>, compress: bool) -> Bytes {
    let mut builder = PayloadBuilder::new();
    builder.payload.extend_from_slice(&body);
    builder.seal(compress)
}

/// Decodes a payload into its messages. `max_body_bytes` bounds what a compressed payload may
/// expand to, so that a small frame cannot make the receiver allocate without limit.
pub(crate) fn open_payload<M: DeserializeOwned>(
    payload: &[u8],
    max_body_bytes: usize,
) -> Result<Vec<Received<M>>, BatchError> {
    let (&flag, rest) = payload.split_first().ok_or(BatchError::Empty)?;
    let decompressed;
    let body = match flag {
        FLAG_RAW => rest,
        FLAG_LZ4 => {
            let (length, compressed) = rest
                .split_first_chunk::<4>()
                .ok_or(BatchError::Truncated("the length"))?;
            let claimed = u32::from_le_bytes(*length) as usize;
            if claimed > max_body_bytes {
                return Err(BatchError::TooLarge {
                    claimed,
                    limit: max_body_bytes,
                });
            }
            decompressed = lz4_flex::block::decompress(compressed, claimed)
                .map_err(|e| BatchError::Decompress(e.to_string()))?;
            if decompressed.len() != claimed {
                return Err(BatchError::Decompress(format!(
                    "{} bytes, the header says {claimed}",
                    decompressed.len()
                )));
            }
            &decompressed[..]
        }
        other => return Err(BatchError::UnknownFlag(other)),
    };
    let mut messages = Vec::new();
    let mut rest = body;
    while !rest.is_empty() {
        let (length, after) = rest
            .split_first_chunk::<4>()
            .ok_or(BatchError::Truncated("a message length"))?;
        let length = u32::from_le_bytes(*length);
        let (trace, after) = if length & TRACED == 0 {
            (None, after)
        } else {
            let (attachment, after) = after
                .split_first_chunk::<{ TraceAttachment::ENCODED_LEN }>()
                .ok_or(BatchError::Truncated("a trace attachment"))?;
            (TraceAttachment::from_bytes(attachment).map(Box::new), after)
        };
        let length = (length & !TRACED) as usize;
        let (encoded, after) = after
            .split_at_checked(length)
            .ok_or(BatchError::Truncated("a message"))?;
        let message = encoding::decode_whole(encoded).map_err(|source| BatchError::Message {
            index: messages.len(),
            source,
        })?;
        messages.push((message, trace));
        rest = after;
    }
    Ok(messages)
}

#[cfg(all(test, feature = "gpu", feature = "server"))]
mod fuzz;

#[cfg(test)]
mod tests {
    use super::*;

    fn body_of(messages: &[String]) -> Vec<u8> {
        messages
            .iter()
            .flat_map(|m| encode_message(m).unwrap())
            .collect()
    }

    #[test]
    fn batches_round_trip_compressed_or_not() {
        let small = vec!["a".to_owned(), String::new()];
        let large: Vec<String> = (0..200)
            .map(|i| format!("message number {i} ").repeat(5))
            .collect();
        for messages in [small, large] {
            for compress in [false, true] {
                let payload = seal_payload(body_of(&messages), compress);
                let decoded: Vec<Received<String>> = open_payload(&payload, 1 << 20).unwrap();
                let decoded: Vec<String> = decoded.into_iter().map(|(m, _)| m).collect();
                assert_eq!(decoded, messages, "compress = {compress}");
            }
        }
        let large_payload = seal_payload(body_of(&["x".repeat(4096)]), true);
        assert_eq!(
            large_payload[0], FLAG_LZ4,
            "a repetitive large body is compressed"
        );
        assert!(large_payload.len() < 200);
    }

    #[test]
    fn trace_attachments_travel_with_their_message_only() {
        use crate::telemetry::TraceContext;
        let attachment = TraceAttachment {
            tag: crate::ProposalTag {
                proposer: NodeId(3),
                request_id: 9,
            },
            context: TraceContext {
                trace_id: [1; 16],
                span_id: [2; 8],
                flags: 1,
            },
        };
        let mut body = encode_message(&"plain".to_owned()).unwrap();
        body.extend(encode_traced_message(&"traced".to_owned(), Some(&attachment)).unwrap());
        let mut invalid = attachment;
        invalid.context.span_id = [0; 8];
        body.extend(encode_traced_message(&"bad context".to_owned(), Some(&invalid)).unwrap());
        for compress in [false, true] {
            let decoded: Vec<Received<String>> =
                open_payload(&seal_payload(body.clone(), compress), 1 << 20).unwrap();
            assert_eq!(
                decoded,
                vec![
                    ("plain".to_owned(), None),
                    ("traced".to_owned(), Some(Box::new(attachment))),
                    ("bad context".to_owned(), None),
                ]
            );
        }
        // A marked length with the attachment cut off.
        let traced = encode_traced_message(&"x".to_owned(), Some(&attachment)).unwrap();
        let mut cut = vec![FLAG_RAW];
        cut.extend_from_slice(&traced[..20]);
        assert!(matches!(
            open_payload::<String>(&cut, 100),
            Err(BatchError::Truncated("a trace attachment"))
        ));
    }

    #[test]
    fn malformed_payloads_are_errors_not_panics() {
        let good = seal_payload(body_of(&["y".repeat(2000)]), true);
        assert!(matches!(
            open_payload::<String>(&[], 100),
            Err(BatchError::Empty)
        ));
        assert!(matches!(
            open_payload::<String>(&[7, 1], 100),
            Err(BatchError::UnknownFlag(7))
        ));
        assert!(matches!(
            open_payload::<String>(&good, 100),
            Err(BatchError::TooLarge { .. })
        ));
        assert!(open_payload::<String>(&good[..good.len() - 3], 1 << 20).is_err());
        assert!(matches!(
            open_payload::<String>(&[0, 9, 0, 0, 0, 1], 100),
            Err(BatchError::Truncated(_))
        ));
        // A length that fits but bytes that are not a String.
        assert!(matches!(
            open_payload::<String>(&[0, 2, 0, 0, 0, 5, 0xff], 100),
            Err(BatchError::Message { index: 0, .. })
        ));
    }
}
