//! GPU-optimized Raft: Raft whose promises are signed, checked and counted in batches.
//!
//! [`GpuRaftNode`] runs the [`RaftNode`](crate::protocol::raft::RaftNode) core unchanged in its
//! rules and adds authentication around it:
//!
//! 1. **Signed votes and acknowledgements.** Every granted vote and pre-vote, and every
//!    successful append acknowledgement, leaves signed by its voter
//!    ([`Message::Grant`], [`Message::Ack`]); an unsigned one is refused. A driver passes each
//!    round of peer messages through [`Protocol::authenticate`](crate::protocol::Protocol::authenticate), which checks all their
//!    signatures as one [`SignatureVerifier`](crate::gpu::SignatureVerifier) batch, so a GPU
//!    verifier sees whole rounds.
//! 2. **Commit by signed count, with certificates.** The leader commits only what a quorum of
//!    checked acknowledgements holds, counted per round with the
//!    [`VoteAggregator`](crate::gpu::VoteAggregator): each candidate index is a ballot, and a
//!    voter whose newest acknowledgement reaches it votes for it. The acknowledgements that
//!    commit an index form a [`CommitCertificate`], persisted beside the log and sent to the
//!    followers with the next heartbeat, so anyone holding a node's data directory can check
//!    offline that its log was stored by a quorum ([`verify_log`](crate::verify_log)). An
//!    acknowledgement signs the [`chain`] value of the log prefix it acknowledges, so one
//!    signature vouches for every entry before it, and an acknowledgement of another log than
//!    the leader's is never counted.
//! 3. **Evidence.** A new leader sends its peers the signed votes that elected it
//!    ([`Message::Elected`]); a voter that also granted its vote to another candidate in that
//!    term is proven to have voted twice ([`VoteEquivocation`](crate::protocol::raft::VoteEquivocation)),
//!    and the node reports it as [`Event::ByzantineDetected`](crate::protocol::Event).
//!
//! What this does not make Byzantine-tolerant: Raft trusts its leader, and the messages that
//! promise nothing (appends, heartbeats, requests) are authenticated by the transport, not
//! signed. Signatures here make every counted promise provable and every forged one useless;
//! tolerating a lying leader is PBFT's job.

mod certificate;
pub mod chain;
mod config;
#[cfg(all(test, feature = "gpu", feature = "server"))]
mod fuzz;
mod node;

use serde::{Deserialize, Serialize};

pub use certificate::{CertificateError, CommitCertificate, SignedAck};
pub use config::GpuRaftConfig;
#[cfg(any(test, feature = "sim"))]
pub use config::InjectedBugs;
pub use node::{CERTIFICATE_SPACING, GpuRaftNode};
pub(crate) use node::{VALIDATORS, is_history_key, latest_key};

use crate::protocol::raft::{self, SignedVote};
use crate::types::Term;

/// GPU-optimized Raft's operator requests: Raft's.
pub type Control = raft::Control;

/// What GPU-optimized Raft nodes send each other.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Message {
    /// A Raft message that promises nothing a signature must back: requests, refusals, appends,
    /// heartbeats without a new certificate, rejected appends, hand-overs and forwards.
    Raft(raft::Message),
    /// A granted vote or pre-vote, signed by its voter (the sender) for the candidate (the
    /// receiver).
    Grant {
        /// The term voted in.
        term: Term,
        /// A pre-vote (which promises nothing) rather than a vote.
        pre_vote: bool,
        /// ed25519 by the sender ([`SignedVote::signing_bytes`] for a vote).
        signature: bytes::Bytes,
    },
    /// A successful append acknowledgement.
    Ack(SignedAck),
    /// A leader's heartbeat, with a certificate newer than the last one it sent.
    Certified {
        /// The heartbeat.
        message: raft::Message,
        /// The leader's newest certificate.
        certificate: Box<CommitCertificate>,
    },
    /// A new leader's announcement of the signed votes that elected it.
    Elected {
        /// The term it leads.
        term: Term,
        /// Votes for the sender in `term`.
        votes: Vec<SignedVote>,
    },
}

impl Message {
    /// True for a message that hands the receiver client proposals.
    pub fn carries_proposals(&self) -> bool {
        matches!(self, Message::Raft(raft::Message::ForwardProposals { .. }))
    }
}

/// One thing that happens to a GPU-optimized Raft node.
pub type Input = crate::protocol::Input<Message, Control>;
/// What one or more steps ask the driver to do.
pub type Output = crate::protocol::Output<Message>;
/// A message with its sender and receiver.
pub type Envelope = crate::protocol::Envelope<Message>;

#[cfg(test)]
mod tests;
