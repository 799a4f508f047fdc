//! A sans-IO Raft core.
//!
//! [`RaftNode`] is a deterministic state machine: feed it one [`Input`] at a time (a tick, a peer
//! message, a client proposal, a transfer request) and it appends what must happen to an
//! [`Output`]. It never touches a clock, a socket, a file or a global random number generator:
//! time is a tick count and randomness comes from [`RaftConfig::seed`]. The same core runs under
//! the async engine, under the deterministic simulator and in unit tests, so a failing simulation
//! seed replays exactly.
//!
//! # The driver's contract
//! After one or more calls to [`RaftNode::step`] that wrote into the same [`Output`]:
//! 1. persist [`Output::hard_state`], then apply [`Output::truncate_from`] and [`Output::append`] to
//!    the log store, and make them durable;
//! 2. only then send [`Output::messages`];
//! 3. then apply [`Output::committed`] to the state machine, in order.
//!
//! Persisting before sending is what lets a vote or an acknowledgement be trusted after a crash;
//! batching several steps into one persist is how the engine gets group commit.
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
mod log;
mod message;
mod node;
mod output;
mod progress;
mod replication;

pub use config::{InjectedBugs, RaftConfig};
pub use dedup::{AppliedProposals, DEDUP_RUNS_PER_PROPOSER};
pub use log::RaftLog;
pub use message::{ConflictHint, Envelope, Message};
pub use node::{RaftNode, Role};
pub use output::{Event, Output, RejectReason, Rejection};
pub use progress::{Progress, ProgressState};

use bytes::Bytes;

use crate::types::NodeId;

/// One thing that happens to a node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Input {
    /// One unit of logical time passed. Election timeouts, heartbeats and batch timeouts are
    /// counted in ticks; the driver decides how long a tick is.
    Tick,
    /// A message from a peer.
    Message(Envelope),
    /// A client's proposal, identified by a request id unique on this node. When the entry carrying
    /// it is committed it shows up in [`Output::committed`] tagged with this node and this id; if
    /// it cannot be accepted, a [`Rejection`] with this id is emitted instead.
    Propose {
        /// Unique on this node; chosen by the driver.
        request_id: u64,
        /// The command bytes.
        data: Bytes,
    },
    /// Ask the leader to hand leadership to `to` (Raft thesis §3.10).
    TransferLeadership {
        /// The voter that should become leader.
        to: NodeId,
    },
    /// Append buffered proposals now. The engine sends this when its input queue is drained, so
    /// proposals that arrived together go out together without waiting for the batch timeout.
    FlushProposals,
}

#[cfg(test)]
mod tests;
