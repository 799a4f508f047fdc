//! What one or more steps of the core ask the driver to do.

use crate::protocol::raft::message::Envelope;
use crate::storage::HardState;
use crate::types::{Entry, LogIndex, NodeId, Term};

/// Why a proposal was refused. A refused proposal was never appended to any log.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RejectReason {
    /// This node is not the leader and knows of none to forward to.
    #[error("no leader is known")]
    NoLeader,
    /// This node is not the leader and does not forward proposals.
    #[error("not the leader; the leader is {leader:?}")]
    NotLeader {
        /// The leader this node knows of, if any.
        leader: Option<NodeId>,
    },
    /// The leader is handing over leadership and accepts no proposals until that ends.
    #[error("leadership transfer in progress")]
    TransferInProgress,
    /// The buffer of proposals waiting to be appended is full.
    #[error("too many pending proposals (limit {limit})")]
    Overloaded {
        /// The configured bound.
        limit: usize,
    },
    /// The proposal is larger than one batch may be.
    #[error("proposal of {size} bytes exceeds max_batch_bytes {limit}")]
    TooLarge {
        /// The proposal's size.
        size: usize,
        /// The configured bound.
        limit: usize,
    },
}

/// A refused proposal.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rejection {
    /// The id given in [`Input::Propose`](crate::protocol::raft::Input::Propose).
    pub request_id: u64,
    /// Why.
    pub reason: RejectReason,
}

/// Something the driver may want to tell the world about.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// The node learned of a new leader, or lost track of the old one.
    LeaderChanged {
        /// The term in which this is so.
        term: Term,
        /// The leader, or `None` while an election is on.
        leader: Option<NodeId>,
    },
}

/// Actions for the driver, accumulated over one or more steps. See the module documentation for
/// the order in which they must be carried out.
#[derive(Debug, Default)]
pub struct Output {
    /// Persist this hard state (term, vote) before sending anything.
    pub hard_state: Option<HardState>,
    /// Remove every stored entry at or after this index, before appending [`Output::append`].
    pub truncate_from: Option<LogIndex>,
    /// Entries to append to the log store, in index order.
    pub append: Vec<Entry>,
    /// Messages to send once the above is durable.
    pub messages: Vec<Envelope>,
    /// Newly committed entries, in index order, to apply once the above is durable.
    pub committed: Vec<Entry>,
    /// Proposals refused.
    pub rejected: Vec<Rejection>,
    /// Notifications.
    pub events: Vec<Event>,
}

impl Output {
    /// True when there is nothing to do.
    pub fn is_empty(&self) -> bool {
        self.hard_state.is_none()
            && self.truncate_from.is_none()
            && self.append.is_empty()
            && self.messages.is_empty()
            && self.committed.is_empty()
            && self.rejected.is_empty()
            && self.events.is_empty()
    }

    /// Empties every field, keeping allocations for reuse.
    pub fn clear(&mut self) {
        self.hard_state = None;
        self.truncate_from = None;
        self.append.clear();
        self.messages.clear();
        self.committed.clear();
        self.rejected.clear();
        self.events.clear();
    }

    /// Records a log write: drop stored entries from `truncate_from` (if any), then append
    /// `entries`. Merges with earlier writes of the same output so that one persist carries out
    /// the effect of all steps in order.
    pub(crate) fn write_log(&mut self, truncate_from: Option<LogIndex>, entries: &[Entry]) {
        if let Some(from) = truncate_from {
            self.append.retain(|e| e.index < from);
            self.truncate_from = Some(self.truncate_from.map_or(from, |t| t.min(from)));
        }
        debug_assert!(
            match (self.append.last(), entries.first()) {
                (Some(last), Some(first)) => last.index + 1 == first.index,
                _ => true,
            },
            "log writes of one output must be contiguous"
        );
        self.append.extend_from_slice(entries);
    }
}
