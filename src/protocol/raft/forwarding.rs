//! A non-leader's own client proposals on their way to the leader, kept until they are seen
//! committed so that a change of leader does not lose them.
//!
//! A follower passes its clients' proposals to the leader it knows
//! ([`Message::ForwardProposals`]). If that leader dies or hands over before appending them,
//! nothing tells the follower: without a copy, its clients would wait for their deadlines. So
//! the follower keeps each proposal until an entry carrying it commits, and sends every kept
//! proposal again to each new leader it learns of. A proposal made while no leader is known
//! (an election is on) is held and sent once one is. A leader that steps down keeps its own
//! buffered proposals the same way (they were never appended), and a node that becomes leader
//! appends what it kept.
//!
//! Proposals to forward are batched like the leader's own: a round's proposals go to the leader
//! in one [`Message::ForwardProposals`] when the driver flushes
//! ([`Input::FlushProposals`](crate::protocol::Input::FlushProposals)), when the batch is full,
//! or after the batch timeout, so that a busy follower sends one message per round, not one per
//! proposal.
//!
//! Sending again may append a proposal twice (the first copy may have been appended after
//! all); the apply stage applies each proposal once ([`AppliedProposals`]), on every replica
//! alike, so a second copy has no effect.
//!
//! Bounds: at most [`RaftConfig::max_pending_proposals`] kept; each kept at most
//! [`FORWARD_RETENTION_ELECTION_TIMEOUTS`] election timeouts; a proposal held without a leader
//! for [`HOLD_WITHOUT_LEADER_ELECTION_TIMEOUTS`] election timeouts is refused
//! ([`RejectReason::NoLeader`]: exact, it never left this node).
//!
//! [`Message::ForwardProposals`]: crate::protocol::raft::Message::ForwardProposals
//! [`AppliedProposals`]: crate::protocol::raft::AppliedProposals
//! [`RaftConfig::max_pending_proposals`]: crate::protocol::raft::RaftConfig::max_pending_proposals

use bytes::Bytes;

use crate::protocol::raft::message::Message;
use crate::protocol::raft::node::{RaftNode, Role};
use crate::protocol::raft::{Output, RejectReason, Rejection};
use crate::types::{Entry, NodeId, Payload};

/// How long a proposal is kept for sending again, in election timeouts. Past it the client's
/// deadline has passed in any sensible configuration.
pub const FORWARD_RETENTION_ELECTION_TIMEOUTS: u32 = 20;

/// How long a node without a leader holds proposals before refusing them, in election
/// timeouts: long enough for an election to finish, short enough that a node cut off from the
/// cluster answers its clients soon.
pub const HOLD_WITHOUT_LEADER_ELECTION_TIMEOUTS: u32 = 2;

/// One kept proposal.
#[derive(Debug)]
pub(crate) struct KeptProposal {
    data: Bytes,
    /// Ticks since it was kept.
    age_ticks: u32,
    /// It left this node at least once (so it may have been appended somewhere).
    sent: bool,
}

/// Kept proposals waiting to be forwarded together, by request id.
#[derive(Debug, Default)]
pub(crate) struct ForwardBatch {
    request_ids: Vec<u64>,
    bytes: usize,
    /// Ticks since the oldest proposal in the batch arrived.
    age_ticks: u32,
}

impl RaftNode {
    /// A client proposal at a node that does not lead, with forwarding on: sent to the leader
    /// and kept, or held while no leader is known, or refused.
    pub(crate) fn forward_proposal(&mut self, request_id: u64, data: Bytes, out: &mut Output) {
        let limit = self.config.max_pending_proposals;
        let reject = |reason| Rejection { request_id, reason };
        if self.kept_proposals.len() >= limit {
            out.rejected
                .push(reject(RejectReason::Overloaded { limit }));
            return;
        }
        match self.leader {
            Some(_) => {}
            None if self.holds_without_leader() => {}
            None => {
                out.rejected.push(reject(RejectReason::NoLeader));
                return;
            }
        }
        let size = data.len();
        let kept = KeptProposal {
            data,
            age_ticks: 0,
            sent: false,
        };
        self.kept_proposals.insert(request_id, kept);
        if self.leader.is_none() {
            return; // held: sent to the leader once one is known
        }
        let batch = &mut self.forward_batch;
        if batch.request_ids.is_empty() {
            batch.age_ticks = 0;
        }
        batch.request_ids.push(request_id);
        batch.bytes += size;
        let full = batch.request_ids.len() >= self.config.batch_size
            || batch.bytes >= self.config.max_batch_bytes;
        if full || !self.config.enable_batching {
            self.flush_forwards(out);
        }
    }

    /// Sends the batch of proposals to forward to the leader, in one message. Proposals a new
    /// leader already got ([`RaftNode::send_kept_proposals`]) or that this node appended as
    /// leader are no longer in the batch; without a leader the batch stays kept, unsent.
    pub(crate) fn flush_forwards(&mut self, out: &mut Output) {
        if self.forward_batch.request_ids.is_empty() {
            return;
        }
        let request_ids = std::mem::take(&mut self.forward_batch.request_ids);
        self.forward_batch.bytes = 0;
        self.forward_batch.age_ticks = 0;
        let Some(leader) = self.leader.filter(|&leader| leader != self.config.id) else {
            return;
        };
        let proposals: Vec<(u64, Bytes)> = request_ids
            .into_iter()
            .filter_map(|request_id| {
                let kept = self.kept_proposals.get_mut(&request_id)?;
                kept.sent = true;
                Some((request_id, kept.data.clone()))
            })
            .collect();
        if !proposals.is_empty() {
            let term = self.term;
            self.send(leader, Message::ForwardProposals { term, proposals }, out);
        }
    }

    /// Keeps a proposal of this node's that it buffered as leader and never appended; `sent`
    /// when it had left this node before (a forward to an earlier leader), so that it is never
    /// refused as if it could not commit.
    pub(crate) fn keep_unappended(&mut self, request_id: u64, data: Bytes, sent: bool) {
        let kept = KeptProposal {
            data,
            age_ticks: 0,
            sent,
        };
        self.kept_proposals.insert(request_id, kept);
    }

    /// True while a node without a leader holds proposals rather than refusing them.
    fn holds_without_leader(&self) -> bool {
        let window = self
            .config
            .election_timeout_ticks
            .saturating_mul(HOLD_WITHOUT_LEADER_ELECTION_TIMEOUTS);
        self.leaderless_ticks <= window
    }

    /// A new leader other than this node is known: send it every kept proposal, in messages of
    /// at most [`RaftConfig::max_batch_bytes`](crate::protocol::raft::RaftConfig) each (one
    /// larger proposal goes alone).
    pub(crate) fn send_kept_proposals(&mut self, leader: NodeId, out: &mut Output) {
        // Everything kept goes now, the batch included.
        self.forward_batch = ForwardBatch::default();
        if self.kept_proposals.is_empty() || leader == self.config.id {
            return;
        }
        let all: Vec<(u64, Bytes)> = self
            .kept_proposals
            .iter_mut()
            .map(|(&request_id, kept)| {
                kept.sent = true;
                (request_id, kept.data.clone())
            })
            .collect();
        let (term, max_bytes) = (self.term, self.config.max_batch_bytes);
        let mut proposals = Vec::new();
        let mut bytes = 0;
        for (request_id, data) in all {
            if bytes + data.len() > max_bytes && !proposals.is_empty() {
                let proposals = std::mem::take(&mut proposals);
                self.send(leader, Message::ForwardProposals { term, proposals }, out);
                bytes = 0;
            }
            bytes += data.len();
            proposals.push((request_id, data));
        }
        if !proposals.is_empty() {
            self.send(leader, Message::ForwardProposals { term, proposals }, out);
        }
    }

    /// This node became leader: what it kept becomes its own proposals.
    pub(crate) fn append_kept_proposals(&mut self, out: &mut Output) {
        debug_assert_eq!(self.role, Role::Leader);
        self.forward_batch = ForwardBatch::default();
        for (request_id, kept) in std::mem::take(&mut self.kept_proposals) {
            let tag = crate::types::ProposalTag {
                proposer: self.config.id,
                request_id,
            };
            if kept.sent
                && let Some(state) = self.leader_state.as_mut()
            {
                state.batch.sent_before.insert(request_id);
            }
            if let Err(reason) = self.buffer_proposal(tag, kept.data, out) {
                // Sent before, it may still commit through another copy: only a proposal that
                // never left may be refused.
                if let Some(state) = self.leader_state.as_mut() {
                    state.batch.sent_before.remove(&request_id);
                }
                if !kept.sent {
                    out.rejected.push(Rejection { request_id, reason });
                }
            }
        }
    }

    /// Entries were committed: forget the kept proposals they carry.
    pub(crate) fn forget_committed_proposals(&mut self, entries: &[Entry]) {
        if self.kept_proposals.is_empty() {
            return;
        }
        let me = self.config.id;
        for entry in entries {
            if let Payload::Command { tag, .. } = &entry.payload
                && tag.proposer == me
            {
                self.kept_proposals.remove(&tag.request_id);
            }
        }
    }

    /// A tick at a node that does not lead: ages what it keeps, drops what is past retention,
    /// and refuses what it held too long without a leader.
    pub(crate) fn tick_kept_proposals(&mut self, out: &mut Output) {
        if self.leader.is_none() {
            self.leaderless_ticks = self.leaderless_ticks.saturating_add(1);
        } else {
            self.leaderless_ticks = 0;
        }
        if !self.forward_batch.request_ids.is_empty() {
            self.forward_batch.age_ticks += 1;
            if self.forward_batch.age_ticks >= self.config.batch_timeout_ticks {
                self.flush_forwards(out);
            }
        }
        if self.kept_proposals.is_empty() {
            return;
        }
        let retention = self
            .config
            .election_timeout_ticks
            .saturating_mul(FORWARD_RETENTION_ELECTION_TIMEOUTS);
        let holding = self.leader.is_some() || self.holds_without_leader();
        self.kept_proposals.retain(|&request_id, kept| {
            kept.age_ticks = kept.age_ticks.saturating_add(1);
            let keep = kept.age_ticks <= retention && (holding || kept.sent);
            if !keep && !kept.sent {
                out.rejected.push(Rejection {
                    request_id,
                    reason: RejectReason::NoLeader,
                });
            }
            keep
        });
    }

    /// Proposals this node keeps for sending to a leader (see the module documentation).
    pub fn kept_proposals(&self) -> usize {
        self.kept_proposals.len()
    }
}
