//! A sans-IO Raft core.
//!
//! [`RaftNode`] is a deterministic state machine: feed it one [`Input`] at a time (a tick, a peer
//! message, a client proposal, a transfer request) and it appends what must happen to an
//! [`Output`]. It never touches a clock, a socket, a file or a global random number generator:
//! time is a tick count and randomness comes from [`RaftConfig::seed`]. The same core runs under
//! the async engine, under the deterministic simulator and in unit tests, so a failing simulation
//! seed replays exactly.
//!
//! The driver's contract is the one of every core, in the [`protocol`](crate::protocol) module:
//! a leader's appends may leave while its own write is being made durable, votes and
//! acknowledgements only after, the leader counts its own entries toward a quorum only once
//! [`Input::Durable`](crate::protocol::Input::Durable) said they are on disk, and a candidate
//! its own vote only once [`Input::HardStateDurable`](crate::protocol::Input::HardStateDurable)
//! said so of the write recording it.
//!
//! The core implements randomized election timeouts, pre-vote and check-quorum (a node cut off
//! from the cluster cannot depose a healthy leader when it returns), priority-based elections
//! (a leader hands over to a caught-up voter of higher priority), leadership transfer
//! ([`Message::TimeoutNow`]), pipelined replication with a bounded window per follower and fast
//! back-off on conflicts, proposal batching, and the commit rule of Raft §5.4.2 (only entries of
//! the leader's own term are committed by counting replicas).

mod config;
mod dedup;
mod election;
mod forwarding;
mod log;
mod membership;
mod message;
mod node;
mod progress;
mod read_index;
mod replication;
mod snapshot;
mod vote_evidence;

pub use crate::membership::MembershipChange;
#[cfg(any(test, feature = "sim"))]
pub use config::InjectedBugs;
pub use config::{RaftConfig, SNAPSHOT_CHUNKS_IN_FLIGHT};
pub use dedup::{AppliedProposals, DEDUP_RUNS_PER_PROPOSER};
pub use forwarding::{FORWARD_RETENTION_ELECTION_TIMEOUTS, HOLD_WITHOUT_LEADER_ELECTION_TIMEOUTS};
pub use log::RaftLog;
pub use message::{ConflictHint, Message};
pub use node::{RaftNode, Role};
pub use read_index::{READ_RETENTION_ELECTION_TIMEOUTS, READ_ROUNDS_IN_FLIGHT};
pub use vote_evidence::{SignedVote, VoteEquivocation, VoteEvidenceError};

pub use crate::protocol::{Event, RejectReason, Rejection};

use crate::types::NodeId;

/// Raft's operator requests.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Control {
    /// Ask the leader to hand leadership to `to` (Raft thesis §3.10).
    TransferLeadership {
        /// The voter that should become leader.
        to: NodeId,
    },
    /// Hand leadership to the most caught-up voter (the engine sends this before a clean stop
    /// of the leader, so that the cluster need not wait out an election timeout). Ignored by a
    /// node that does not lead or has no other voter.
    HandOver,
    /// Change the membership (leader only): the outcome shows as
    /// [`Event::MembershipChanged`] or [`Event::MembershipRefused`].
    ChangeMembership(MembershipChange),
}

/// One thing that happens to a Raft node.
pub type Input = crate::protocol::Input<Message, Control>;
/// What one or more steps of a Raft node ask the driver to do.
pub type Output = crate::protocol::Output<Message>;
/// A Raft message with its sender and receiver.
pub type Envelope = crate::protocol::Envelope<Message>;

#[cfg(test)]
mod failover_tests;
#[cfg(test)]
mod read_index_tests;
#[cfg(test)]
mod tests;
