//! Linearizable reads without a log write (Raft thesis §6.4): ReadIndex, and lease reads.
//!
//! **ReadIndex.** A read that reaches the leader takes the leader's commit index as its read
//! index, and is served once (1) the leader has confirmed that it still led after the read
//! arrived: a quorum answered a heartbeat round sent after the read came in; and (2) the state
//! machine has applied through the read index (the driver's part: [`ReadState`]). A newer leader
//! could have committed something the read would miss only with the votes of a quorum that moved
//! to a newer term, and a quorum just answered in ours. A leader takes read indexes only once it
//! has committed an entry of its own term (its blank entry), so that its commit index covers
//! everything any earlier leader committed; reads that arrive before wait for that.
//!
//! Reads are batched by round: a read needs the round after the last one sent. A read that finds
//! no round unanswered starts one at once; reads that arrive while rounds are out start one
//! together when the driver's round of inputs ends ([`Input::FlushProposals`]) or an answer
//! comes in, with at most [`READ_ROUNDS_IN_FLIGHT`] rounds unanswered, so that a read waits
//! about one round trip and a busy leader sends one round per batch of reads, not per read.
//! The periodic heartbeats are rounds too.
//!
//! [`Input::FlushProposals`]: crate::protocol::Input::FlushProposals
//!
//! **Lease reads** ([`RaftConfig::lease_reads`]). A quorum that answered round `n` promises not
//! to vote for anyone else for an election timeout after it heard round `n`; so until
//! [`RaftConfig::lease_ticks`] of the leader's ticks after it sent round `n`, no other leader can
//! exist, and the leader serves reads at its commit index without a round. A voter keeps the
//! promise whatever else it hears (a newer term, its transport's hint that the leader is gone,
//! its own restart: see `RaftNode::honours_lease`); a leader that asks another voter to take
//! over ([`Message::TimeoutNow`]) gives its lease up for the rest of its term, since that voter
//! may win without waiting.
//!
//! **On a follower** a client's read goes to the leader ([`Message::ReadIndex`]), and is served
//! here once this node has applied through the index the leader answers. The request itself
//! answers for the follower: it left the follower after the read began, in the leader's term, so
//! the follower was in that term after the read began, just as if it had answered a round. When
//! the leader and that follower make a quorum (a cluster of three), the leader answers at once,
//! and a follower's read costs one round trip instead of two. Reads are idempotent,
//! so the follower sends them again to every new leader and whenever no answer came within an
//! election timeout, and refuses them (retry elsewhere) after
//! [`READ_RETENTION_ELECTION_TIMEOUTS`].
//!
//! [`RaftConfig::lease_reads`]: crate::protocol::raft::RaftConfig::lease_reads
//! [`RaftConfig::lease_ticks`]: crate::protocol::raft::RaftConfig::lease_ticks

use std::collections::{BTreeMap, VecDeque};

use crate::protocol::ReadState;
use crate::protocol::raft::message::Message;
use crate::protocol::raft::node::{RaftNode, Role};
use crate::protocol::raft::{Output, RejectReason, Rejection};
use crate::types::{LogIndex, NodeId};

/// A follower refuses a read (its client retries) when no leader answered it within this many
/// election timeouts.
pub const READ_RETENTION_ELECTION_TIMEOUTS: u32 = 3;

/// Heartbeat rounds a leader keeps unanswered at most for reads (the periodic ones aside).
pub const READ_ROUNDS_IN_FLIGHT: u64 = 4;

/// Rounds whose send time a leader remembers for its lease: an answer to an older round
/// extends nothing (a newer one will have been answered by then).
const ROUNDS_REMEMBERED: usize = 64;

/// Whose read a leader is confirming.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Reader {
    /// A client of this node, by request id.
    Local(u64),
    /// A client of a follower, by the follower's request id.
    Remote(NodeId, u64),
}

/// A read at the leader waiting for its round to be answered by a quorum.
#[derive(Debug)]
struct WaitingRead {
    round: u64,
    index: LogIndex,
    reader: Reader,
}

/// A leader's reads and rounds, for its current term.
#[derive(Debug, Default)]
pub(crate) struct LeaderReads {
    /// Heartbeat rounds sent in this term (the number of the last).
    pub(crate) round: u64,
    /// The highest round a quorum (this node included) answered.
    confirmed: u64,
    /// Reads waiting for their round, in round order.
    waiting: VecDeque<WaitingRead>,
    /// Reads that arrived before an entry of this term was committed.
    before_term_commit: Vec<Reader>,
    /// Ticks since this node became leader.
    pub(crate) ticks: u64,
    /// `(round, ticks)` when each recent round was sent, oldest first.
    round_sent_at: VecDeque<(u64, u64)>,
    /// Lease reads are served while `ticks < lease_until`.
    lease_until: u64,
    /// A [`Message::TimeoutNow`] left in this term: no more leases.
    lease_forfeited: bool,
}

impl LeaderReads {
    /// Reads waiting for a round or for the term's first commit.
    pub(crate) fn waiting(&self) -> usize {
        self.waiting.len() + self.before_term_commit.len()
    }
}

/// A follower's (or candidate's) reads waiting for a leader's read index.
#[derive(Debug, Default)]
pub(crate) struct FollowerReads {
    /// Request id → ticks since the read was made.
    waiting: BTreeMap<u64, u32>,
    /// Reads not yet sent to the current leader, sent at the next flush.
    unsent: Vec<u64>,
}

impl RaftNode {
    /// A client's read on this node ([`Input::Read`](crate::protocol::Input::Read)).
    pub(crate) fn read(&mut self, request_id: u64, out: &mut Output) {
        if self.removed {
            let reason = RejectReason::Removed;
            out.rejected.push(Rejection { request_id, reason });
            return;
        }
        if self.role == Role::Leader {
            self.leader_read(Reader::Local(request_id), out);
            return;
        }
        if !self.config.forward_proposals {
            let reason = RejectReason::NotLeader {
                leader: self.leader,
            };
            out.rejected.push(Rejection { request_id, reason });
            return;
        }
        let limit = self.config.max_pending_proposals;
        if self.follower_reads.waiting.len() >= limit {
            let reason = RejectReason::Overloaded { limit };
            out.rejected.push(Rejection { request_id, reason });
            return;
        }
        self.follower_reads.waiting.insert(request_id, 0);
        if self.leader.is_none() {
            return; // held: sent to the leader once one is known
        }
        self.follower_reads.unsent.push(request_id);
        if !self.config.enable_batching
            || self.follower_reads.unsent.len() >= self.config.batch_size
        {
            self.flush_reads(out);
        }
    }

    /// Sends the reads made since the last flush to the leader, in one message.
    pub(crate) fn flush_reads(&mut self, out: &mut Output) {
        if self.follower_reads.unsent.is_empty() {
            return;
        }
        let read_ids = std::mem::take(&mut self.follower_reads.unsent);
        if let Some(leader) = self.leader.filter(|&leader| leader != self.config.id) {
            let term = self.term;
            self.send(leader, Message::ReadIndex { term, read_ids }, out);
        }
    }

    /// A new leader other than this node is known (or the last one did not answer): send it
    /// every read waiting here, in messages of at most a batch each.
    pub(crate) fn send_waiting_reads(&mut self, leader: NodeId, out: &mut Output) {
        self.follower_reads.unsent.clear();
        if self.follower_reads.waiting.is_empty() || leader == self.config.id {
            return;
        }
        let all: Vec<u64> = self.follower_reads.waiting.keys().copied().collect();
        let term = self.term;
        for read_ids in all.chunks(self.config.batch_size) {
            let read_ids = read_ids.to_vec();
            self.send(leader, Message::ReadIndex { term, read_ids }, out);
        }
    }

    /// A tick at any node: ages the reads waiting for a leader's answer, sends them again each
    /// election timeout, refuses those past retention.
    pub(crate) fn tick_reads(&mut self, out: &mut Output) {
        self.since_leader_heard = self.since_leader_heard.saturating_add(1);
        if let Some(state) = self.leader_state.as_mut() {
            state.reads.ticks += 1;
        }
        if self.follower_reads.waiting.is_empty() {
            return;
        }
        self.flush_reads(out);
        let timeout = self.config.election_timeout_ticks.max(1);
        let retention = timeout.saturating_mul(READ_RETENTION_ELECTION_TIMEOUTS);
        let mut ask_again = false;
        self.follower_reads.waiting.retain(|&request_id, age| {
            *age = age.saturating_add(1);
            if *age > retention {
                let reason = RejectReason::NoLeader;
                out.rejected.push(Rejection { request_id, reason });
                return false;
            }
            ask_again |= age.is_multiple_of(timeout);
            true
        });
        if ask_again && let Some(leader) = self.leader {
            self.send_waiting_reads(leader, out);
        }
    }

    /// Leader side of [`Message::ReadIndex`]. A node that does not lead ignores it: the
    /// follower sends its reads again to the leader it learns of next.
    pub(crate) fn handle_read_index(&mut self, from: NodeId, read_ids: Vec<u64>, out: &mut Output) {
        if self.role != Role::Leader {
            return;
        }
        for read_id in read_ids {
            self.leader_read(Reader::Remote(from, read_id), out);
        }
    }

    /// Follower side of [`Message::ReadIndexResponse`]: the reads still waiting here may be
    /// served once `index` is applied.
    pub(crate) fn handle_read_index_response(
        &mut self,
        read_ids: Vec<u64>,
        index: LogIndex,
        index_term: crate::types::Term,
        out: &mut Output,
    ) {
        if self.log.term_at(index) == Some(index_term) {
            self.commit_to(index, out);
        }
        for request_id in read_ids {
            if self.follower_reads.waiting.remove(&request_id).is_some() {
                out.reads.push(ReadState { request_id, index });
            }
        }
    }

    /// A read at the leader: served at once from a lease, in a cluster of one, or when the
    /// follower that asked completes a quorum with this node (see the module documentation);
    /// otherwise queued for the next round, which starts now unless a round is already
    /// unanswered.
    fn leader_read(&mut self, reader: Reader, out: &mut Output) {
        let commit = self.commit_index;
        let committed_in_term = self.log.term_at(commit) == Some(self.term);
        // A follower asking for a read index has heard from this leader: with it this node
        // may already be a quorum (in a group of three voters).
        let me = self.config.id;
        let asking = match reader {
            Reader::Remote(follower, _) => Some(follower),
            Reader::Local(_) => None,
        };
        let vouched = self
            .membership()
            .has_quorum(|id| id == me || Some(id) == asking);
        let immediate =
            vouched || self.holds_lease() || self.config.bugs().read_without_confirming_leadership;
        let Some(state) = self.leader_state.as_mut() else {
            return;
        };
        let reads = &mut state.reads;
        if !committed_in_term {
            reads.before_term_commit.push(reader);
            return;
        }
        if immediate {
            self.serve_reads([(reader, commit)], out);
            return;
        }
        let round = reads.round + 1;
        reads.waiting.push_back(WaitingRead {
            round,
            index: commit,
            reader,
        });
        if reads.confirmed >= reads.round {
            self.broadcast_heartbeats(out);
        }
    }

    /// Starts the round the waiting reads need, unless one is already sent for them or
    /// [`READ_ROUNDS_IN_FLIGHT`] rounds are unanswered.
    pub(crate) fn start_read_round_if_needed(&mut self, out: &mut Output) {
        let Some(state) = self.leader_state.as_ref() else {
            return;
        };
        let reads = &state.reads;
        let needed = reads.waiting.back().is_some_and(|r| r.round > reads.round);
        if needed && reads.round - reads.confirmed < READ_ROUNDS_IN_FLIGHT {
            self.broadcast_heartbeats(out);
        }
    }

    /// The leader's lease is in force (see the module documentation).
    pub(crate) fn holds_lease(&self) -> bool {
        self.config.lease_reads
            && self.leader_state.as_ref().is_some_and(|state| {
                !state.reads.lease_forfeited && state.reads.ticks < state.reads.lease_until
            })
    }

    /// The leader sends heartbeat round `round` now (`broadcast_heartbeats`).
    pub(crate) fn round_sent(&mut self) -> u64 {
        let Some(state) = self.leader_state.as_mut() else {
            return 0;
        };
        let reads = &mut state.reads;
        reads.round += 1;
        if reads.round_sent_at.len() == ROUNDS_REMEMBERED {
            reads.round_sent_at.pop_front();
        }
        reads.round_sent_at.push_back((reads.round, reads.ticks));
        reads.round
    }

    /// Leader side of a heartbeat answer for `round` from `from`: confirms the rounds a quorum
    /// has now answered, extends the lease, serves the reads they confirm, and starts the round
    /// the reads that arrived meanwhile need.
    pub(crate) fn round_answered(&mut self, from: NodeId, round: u64, out: &mut Output) {
        let (lease_reads, lease_ticks) = (self.config.lease_reads, self.config.lease_ticks());
        let me = self.config.id;
        let Some(state) = self.leader_state.as_mut() else {
            return;
        };
        let sent = state.reads.round;
        let Some(progress) = state.progress.get_mut(&from) else {
            return;
        };
        // Only rounds this leader sent: an answer naming a later one is not to be believed.
        progress.round_answered = progress.round_answered.max(round.min(sent));
        let Some(state) = self.leader_state.as_ref() else {
            return;
        };
        let confirmed = self.membership().quorum_value(|id| {
            if id == me {
                sent
            } else {
                state.progress.get(&id).map_or(0, |p| p.round_answered)
            }
        });
        let Some(state) = self.leader_state.as_mut() else {
            return;
        };
        let reads = &mut state.reads;
        if confirmed <= reads.confirmed {
            return;
        }
        reads.confirmed = confirmed;
        if lease_reads && !reads.lease_forfeited {
            let sent_at = reads
                .round_sent_at
                .iter()
                .find(|&&(round, _)| round == confirmed);
            if let Some(&(_, sent_at)) = sent_at {
                reads.lease_until = reads.lease_until.max(sent_at + u64::from(lease_ticks));
            }
        }
        let mut ready = Vec::new();
        while let Some(read) = reads.waiting.front()
            && read.round <= confirmed
        {
            ready.push((read.reader, read.index));
            reads.waiting.pop_front();
        }
        self.serve_reads(ready, out);
        self.start_read_round_if_needed(out);
    }

    /// The term's first entry committed: the reads that waited for it take their index now.
    pub(crate) fn release_reads_after_term_commit(&mut self, out: &mut Output) {
        let Some(state) = self.leader_state.as_mut() else {
            return;
        };
        if state.reads.before_term_commit.is_empty()
            || self.log.term_at(self.commit_index) != Some(self.term)
        {
            return;
        }
        for reader in std::mem::take(&mut state.reads.before_term_commit) {
            self.leader_read(reader, out);
        }
    }

    /// This leader asked another voter to take over: it may win without waiting out anyone's
    /// lease, so this term's lease ends here.
    pub(crate) fn forfeit_lease(&mut self) {
        if let Some(state) = self.leader_state.as_mut() {
            state.reads.lease_forfeited = true;
            state.reads.lease_until = 0;
        }
    }

    /// A leader stepping down: its own clients' reads wait for the next leader, as a follower's
    /// do; a follower's reads are dropped (that follower sends them to the next leader itself).
    pub(crate) fn requeue_reads(&mut self, reads: LeaderReads, out: &mut Output) {
        let local = reads
            .waiting
            .iter()
            .map(|read| read.reader)
            .chain(reads.before_term_commit.iter().copied())
            .filter_map(|reader| match reader {
                Reader::Local(request_id) => Some(request_id),
                Reader::Remote(..) => None,
            });
        for request_id in local {
            if self.config.forward_proposals {
                self.follower_reads.waiting.insert(request_id, 0);
            } else {
                let reason = RejectReason::NotLeader { leader: None };
                out.rejected.push(Rejection { request_id, reason });
            }
        }
    }

    /// This node became leader: the reads it was waiting on a leader for are its own now.
    pub(crate) fn lead_waiting_reads(&mut self, out: &mut Output) {
        self.follower_reads.unsent.clear();
        let waiting = std::mem::take(&mut self.follower_reads.waiting);
        for request_id in waiting.into_keys() {
            self.leader_read(Reader::Local(request_id), out);
        }
    }

    /// Serves confirmed reads: this node's through [`Output::reads`], a follower's in one
    /// [`Message::ReadIndexResponse`] per follower and index.
    fn serve_reads(
        &mut self,
        ready: impl IntoIterator<Item = (Reader, LogIndex)>,
        out: &mut Output,
    ) {
        let mut remote: BTreeMap<(NodeId, LogIndex), Vec<u64>> = BTreeMap::new();
        for (reader, index) in ready {
            match reader {
                Reader::Local(request_id) => out.reads.push(ReadState { request_id, index }),
                Reader::Remote(peer, read_id) => {
                    remote.entry((peer, index)).or_default().push(read_id)
                }
            }
        }
        let term = self.term;
        for ((peer, index), read_ids) in remote {
            let Some(index_term) = self.log.term_at(index) else {
                continue; // compacted away: the follower asks again
            };
            let message = Message::ReadIndexResponse {
                term,
                read_ids,
                index,
                index_term,
            };
            self.send(peer, message, out);
        }
    }

    /// True while this voter keeps the promise a lease rests on: it heard from a leader less
    /// than an election timeout ago, or started less than one ago (it may have answered a
    /// round just before a restart). It then grants no vote and no pre-vote, except to a
    /// leadership transfer. Only with [`RaftConfig::lease_reads`].
    ///
    /// [`RaftConfig::lease_reads`]: crate::protocol::raft::RaftConfig::lease_reads
    pub(crate) fn honours_lease(&self) -> bool {
        self.config.lease_reads && self.since_leader_heard < self.config.election_timeout_ticks
    }

    /// Reads waiting on this node: at the leader for a round or the term's first commit,
    /// elsewhere for a leader's read index.
    pub fn waiting_reads(&self) -> usize {
        let leading = self.leader_state.as_ref().map_or(0, |s| s.reads.waiting());
        leading + self.follower_reads.waiting.len()
    }
}
