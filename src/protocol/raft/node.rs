//! The [`RaftNode`] state and its input dispatch. Election handlers live in `election.rs`,
//! replication and commit in `replication.rs`.

use std::collections::BTreeMap;

use bytes::Bytes;
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::error::ConfigError;
use crate::membership::Membership;
use crate::protocol::raft::config::RaftConfig;
use crate::protocol::raft::log::RaftLog;
use crate::protocol::raft::membership::MembershipLog;
use crate::protocol::raft::message::Message;
use crate::protocol::raft::progress::Progress;
use crate::protocol::raft::{Control, Envelope, Input, Output};
use crate::protocol::{Event, Protocol, Status};
use crate::storage::Snapshot;
use crate::storage::{HardState, RecoveredState};
use crate::types::{LogIndex, NodeId, Term};

/// The part a node plays in its current term.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// Follows a leader (or waits for one).
    Follower,
    /// Asking for pre-votes; has not bumped its term.
    PreCandidate,
    /// Campaigning in its current term.
    Candidate,
    /// Leads its current term.
    Leader,
}

/// Proposals waiting on the leader to be appended together.
#[derive(Debug, Default)]
pub(crate) struct ProposalBatch {
    pub(crate) proposals: Vec<(crate::types::ProposalTag, Bytes)>,
    pub(crate) bytes: usize,
    /// Ticks since the oldest buffered proposal arrived.
    pub(crate) age_ticks: u32,
    /// Request ids of this node's own proposals in the batch that left it before, as forwards
    /// to an earlier leader (see `forwarding.rs`): if this leader steps down before appending
    /// them, they may still commit through the copy sent then, so they must never be refused.
    pub(crate) sent_before: std::collections::BTreeSet<u64>,
}

/// Leader-only state.
#[derive(Debug)]
pub(crate) struct LeaderState {
    pub(crate) progress: BTreeMap<NodeId, Progress>,
    pub(crate) batch: ProposalBatch,
    /// Target and elapsed ticks of a leadership transfer in progress.
    pub(crate) transfer: Option<(NodeId, u32)>,
    /// Heartbeat rounds, reads being confirmed, the lease (see `read_index.rs`).
    pub(crate) reads: crate::protocol::raft::read_index::LeaderReads,
}

/// One Raft node's protocol state. See the [module documentation](crate::protocol::raft).
#[derive(Debug)]
pub struct RaftNode {
    pub(crate) config: RaftConfig,
    pub(crate) rng: ChaCha8Rng,
    pub(crate) role: Role,
    pub(crate) term: Term,
    pub(crate) voted_for: Option<NodeId>,
    pub(crate) leader: Option<NodeId>,
    pub(crate) log: RaftLog,
    /// The last index the driver reported durable ([`Input::Durable`]) that is still in the
    /// log. A leader counts itself toward a quorum only up to here.
    pub(crate) durable_index: LogIndex,
    pub(crate) commit_index: LogIndex,
    /// Ticks since the last election-timer reset.
    pub(crate) election_elapsed: u32,
    /// The randomized timeout for the current wait.
    pub(crate) election_timeout: u32,
    /// Ticks since the last heartbeat (leader).
    pub(crate) heartbeat_elapsed: u32,
    /// Votes (or pre-votes) received in the current campaign: voter → granted.
    pub(crate) votes: BTreeMap<NodeId, bool>,
    /// The transport reported [`RaftNode::leader`] unreachable since this node last heard from
    /// it (see [`RaftNode::on_peer_unreachable`]). Cleared by the leader's next message and by
    /// any change of leader.
    pub(crate) leader_unreachable: bool,
    /// Pre-vote rounds this node started since it last knew a leader (see
    /// `pre_candidate_yields_to`).
    pub(crate) pre_vote_rounds: u32,
    /// This node's own proposals on their way to a leader, by request id (see `forwarding.rs`).
    pub(crate) kept_proposals: BTreeMap<u64, crate::protocol::raft::forwarding::KeptProposal>,
    /// Kept proposals not yet forwarded, sent together at the next flush.
    pub(crate) forward_batch: crate::protocol::raft::forwarding::ForwardBatch,
    /// Ticks since this node last knew a leader (0 at start: it holds proposals while it looks
    /// for one).
    pub(crate) leaderless_ticks: u32,
    pub(crate) leader_state: Option<LeaderState>,
    /// This node's reads waiting for a leader's read index (see `read_index.rs`).
    pub(crate) follower_reads: crate::protocol::raft::read_index::FollowerReads,
    /// Ticks since this node last heard from a leader of its term, or since it started: what a
    /// voter's side of a read lease counts ([`RaftNode::honours_lease`]).
    pub(crate) since_leader_heard: u32,
    /// Set by a wrapper that counts the leader's quorum itself (GPU-optimized Raft, from
    /// signed acknowledgements): the leader then commits only through
    /// [`RaftNode::commit_certified`].
    pub(crate) commit_by_certificate: bool,
    /// Set with the bootstrap voters' keys by a wrapper whose members sign (GPU-optimized
    /// Raft): every membership then carries its members' public keys.
    pub(crate) member_keys_required: bool,
    /// The newest snapshot taken here or installed from a leader (see `snapshot.rs`).
    pub(crate) snapshot: Option<crate::storage::Snapshot>,
    /// A leader's snapshot arriving in chunks.
    pub(crate) incoming_snapshot: Option<crate::protocol::raft::snapshot::IncomingSnapshot>,
    /// The CRC-32 of the snapshot with this index, once a transfer computed it: a leader
    /// sending one snapshot to several followers reads its bytes once.
    pub(crate) snapshot_checksum: Option<(LogIndex, u32)>,
    /// The memberships in the log (see `membership.rs`); the last one is in force.
    pub(crate) members: crate::protocol::raft::membership::MembershipLog,
    /// This node reported its removal ([`Event::Removed`]).
    pub(crate) removed: bool,
    /// The number of the last membership change this node forwarded to its leader.
    pub(crate) membership_requests: u64,
}

impl RaftNode {
    /// A node starting from what its log store recovered. The recovered log may start past
    /// index 1 (a compacted store) and follow a snapshot; it must be contiguous and agree with
    /// the snapshot, or the store is corrupt and this refuses with [`ConfigError::Invalid`]
    /// naming `recovered.entries`.
    pub fn new(config: RaftConfig, recovered: RecoveredState) -> Result<Self, ConfigError> {
        config.validate()?;
        let rng = ChaCha8Rng::seed_from_u64(config.seed);
        let snapshot = recovered.snapshot;
        let log = RaftLog::recovered(
            recovered.entries,
            snapshot.as_ref().map(|s| (s.index, s.term)),
        )
        .map_err(|reason| ConfigError::Invalid {
            field: "recovered.entries",
            value: String::new(),
            reason,
        })?;
        // Everything recovered is durable; what a snapshot covers, and entries before the
        // log's start (compacted into a snapshot), were committed.
        let durable_index = log.last_index();
        let commit_index = snapshot
            .as_ref()
            .map_or(0, |s| s.index)
            .max(log.first_index().saturating_sub(1));
        // The snapshot's membership (the bootstrap voters without one), then the log's.
        let (base_index, base) = match &snapshot {
            Some(Snapshot {
                index,
                membership: Some(membership),
                ..
            }) => (*index, membership.clone()),
            _ => (0, Membership::of_voters(config.voters.iter().copied())),
        };
        let mut members = MembershipLog::new(base_index, base);
        let from = log.first_index().max(base_index + 1);
        for entry in log.slice(from, log.last_index()) {
            members.appended(entry);
        }
        let mut node = RaftNode {
            rng,
            role: Role::Follower,
            term: recovered.hard_state.term,
            voted_for: recovered.hard_state.voted_for,
            leader: None,
            log,
            durable_index,
            commit_index,
            election_elapsed: 0,
            election_timeout: config.election_timeout_ticks,
            heartbeat_elapsed: 0,
            votes: BTreeMap::new(),
            leader_unreachable: false,
            pre_vote_rounds: 0,
            kept_proposals: BTreeMap::new(),
            forward_batch: Default::default(),
            leaderless_ticks: 0,
            leader_state: None,
            follower_reads: Default::default(),
            since_leader_heard: 0,
            commit_by_certificate: false,
            member_keys_required: false,
            snapshot,
            incoming_snapshot: None,
            snapshot_checksum: None,
            removed: false,
            membership_requests: 0,
            members,
            config,
        };
        // A node restarted after its removal committed stays removed.
        let me = node.config.id;
        let membership = node.membership();
        node.removed = node.members.latest_index() <= node.commit_index
            && !membership.voters.is_empty()
            && !membership.contains(me);
        node.reset_election_timer();
        Ok(node)
    }

    /// Feeds one input; what the driver must do is appended to `out`.
    pub fn step(&mut self, input: Input, out: &mut Output) {
        #[cfg(debug_assertions)]
        let before = (self.term, self.commit_index);
        match input {
            Input::Tick => self.tick(out),
            Input::Message(envelope) => self.receive(envelope, out),
            Input::Propose { request_id, data } => self.propose(request_id, data, out),
            Input::Read { request_id } => self.read(request_id, out),
            Input::Control(Control::TransferLeadership { to }) => self.transfer_leadership(to, out),
            Input::Control(Control::HandOver) => self.hand_over(out),
            Input::Control(Control::ChangeMembership(change)) => {
                self.change_membership_asked(change, out);
            }
            Input::FlushProposals => self.flush_proposals(out),
            Input::HardStateDurable(hard_state) => self.on_hard_state_durable(hard_state, out),
            Input::Durable { index, term } => self.on_durable(index, term, out),
            Input::PeerUnreachable { peer } => self.on_peer_unreachable(peer, out),
            Input::SnapshotTaken(snapshot) => self.on_snapshot_taken(snapshot, out),
        }
        #[cfg(debug_assertions)]
        {
            debug_assert!(self.term >= before.0, "term went backwards");
            debug_assert!(self.commit_index >= before.1, "commit index went backwards");
            debug_assert!(
                self.commit_index <= self.log.last_index(),
                "commit past the log"
            );
            debug_assert!(
                self.durable_index <= self.log.last_index(),
                "durable past the log"
            );
        }
    }

    /// This node's id.
    pub fn id(&self) -> NodeId {
        self.config.id
    }

    /// The settings the node runs with.
    pub fn config(&self) -> &RaftConfig {
        &self.config
    }

    /// The node's role.
    pub fn role(&self) -> Role {
        self.role
    }

    /// The node's current term.
    pub fn term(&self) -> Term {
        self.term
    }

    /// Who this node voted for in its current term.
    pub fn voted_for(&self) -> Option<NodeId> {
        self.voted_for
    }

    /// The leader of the current term, as far as this node knows.
    pub fn leader(&self) -> Option<NodeId> {
        self.leader
    }

    /// True if this node leads its current term.
    pub fn is_leader(&self) -> bool {
        self.role == Role::Leader
    }

    /// Highest index known to be committed.
    pub fn commit_index(&self) -> LogIndex {
        self.commit_index
    }

    /// The log (including entries not yet made durable by the driver).
    pub fn log(&self) -> &RaftLog {
        &self.log
    }

    /// Replication progress of `peer`, when this node is leader.
    pub fn progress(&self, peer: NodeId) -> Option<&Progress> {
        self.leader_state.as_ref()?.progress.get(&peer)
    }

    /// A leader heard from `peer`: marks it live for check-quorum and returns its progress.
    pub(crate) fn progress_heard_from(&mut self, peer: NodeId) -> Option<&mut Progress> {
        let progress = self.progress_mut(peer)?;
        progress.recently_active = true;
        Some(progress)
    }

    /// The leader's replication progress of `peer` (none when not leading).
    pub(crate) fn progress_mut(&mut self, peer: NodeId) -> Option<&mut Progress> {
        self.leader_state.as_mut()?.progress.get_mut(&peer)
    }

    /// The peer a leadership transfer is handing over to, if one is in progress.
    pub fn transfer_target(&self) -> Option<NodeId> {
        self.leader_state.as_ref()?.transfer.map(|(to, _)| to)
    }

    /// The current hard state.
    pub fn hard_state(&self) -> HardState {
        HardState {
            term: self.term,
            voted_for: self.voted_for,
        }
    }

    /// What a store holding every write this node asked for would recover: its hard state, its
    /// log and its snapshot (Raft writes no records). For a driver that stops after carrying out
    /// every output, that is exactly its durable state.
    pub fn into_recovered_state(self) -> RecoveredState {
        RecoveredState {
            hard_state: self.hard_state(),
            entries: self.log.into_entries(),
            records: Default::default(),
            snapshot: self.snapshot,
        }
    }

    /// The voters other than this node (both sets of a joint membership): whom elections ask.
    pub(crate) fn peers(&self) -> impl Iterator<Item = NodeId> + '_ {
        let me = self.config.id;
        self.membership()
            .all_voters()
            .into_iter()
            .filter(move |&id| id != me)
    }

    /// Every member other than this node, learners included: whom a leader replicates to.
    pub(crate) fn replicas(&self) -> impl Iterator<Item = NodeId> + '_ {
        let me = self.config.id;
        self.membership()
            .all_members()
            .into_iter()
            .filter(move |&id| id != me)
    }

    /// Queues `message` for `to`, before or after the output's write as the message allows
    /// ([`Message::may_precede_write`]).
    pub(crate) fn send(&self, to: NodeId, message: Message, out: &mut Output) {
        let queue = if message.may_precede_write() {
            &mut out.messages
        } else {
            &mut out.messages_after_write
        };
        queue.push(Envelope {
            from: self.config.id,
            to,
            message,
        });
    }

    pub(crate) fn save_hard_state(&self, out: &mut Output) {
        out.write.hard_state = Some(self.hard_state());
    }

    /// The driver made the log durable through `index`. Ignored when the entry there is no
    /// longer the one written (a later truncation replaced it; its own write will be
    /// acknowledged in turn).
    fn on_durable(&mut self, index: LogIndex, term: crate::types::Term, out: &mut Output) {
        if index <= self.durable_index || self.log.term_at(index) != Some(term) {
            return;
        }
        self.durable_index = index;
        if self.role == Role::Leader {
            self.maybe_commit(out);
        }
        self.compact_log(out);
    }

    /// The last index this node has reported durable.
    pub fn durable_index(&self) -> LogIndex {
        self.durable_index
    }

    pub(crate) fn reset_election_timer(&mut self) {
        self.election_elapsed = 0;
        let base = self.config.election_timeout_ticks;
        self.election_timeout = base + self.rng.random_range(0..base);
    }

    pub(crate) fn set_leader(&mut self, leader: Option<NodeId>, out: &mut Output) {
        if self.leader != leader {
            self.leader = leader;
            self.leader_unreachable = false;
            if let Some(leader) = leader {
                self.pre_vote_rounds = 0;
                self.send_kept_proposals(leader, out);
                self.send_waiting_reads(leader, out);
            }
            out.events.push(Event::LeaderChanged {
                term: self.term,
                leader,
            });
        }
    }

    fn tick(&mut self, out: &mut Output) {
        self.tick_kept_proposals(out);
        self.tick_reads(out);
        if self.role == Role::Leader {
            self.tick_leader(out);
        } else {
            self.election_elapsed += 1;
            if self.election_elapsed >= self.election_timeout && self.is_voter() {
                self.start_campaign(false, out);
            } else if self.role == Role::PreCandidate {
                let retry = self.config.pre_vote_retry_ticks;
                if retry > 0 && self.election_elapsed.is_multiple_of(retry) {
                    self.ask_pre_votes_again(out);
                }
            }
        }
    }

    /// True if this node may campaign: it votes in its latest membership, or in the one
    /// before while the latest is not known committed here. Without the second case a group
    /// could stall for good: a leader that appended the final membership of a change that
    /// removes it, then restarted before it committed, would never campaign again, while the
    /// new voters, lacking that entry, need its vote under the joint membership and are refused
    /// it (their log is behind). Campaigning is always safe; the votes are counted under the
    /// latest membership, whose quorums meet those of the one before.
    pub(crate) fn is_voter(&self) -> bool {
        let me = self.config.id;
        let latest = self.members.latest_index();
        self.membership().is_voter(me)
            || (latest > self.commit_index && self.members.at(latest - 1).is_voter(me))
    }
}

impl Protocol for RaftNode {
    type Message = Message;
    type Control = Control;

    const SERVES_READS: bool = true;
    const COMPACTS_LOG: bool = true;

    fn carried_proposals(
        message: &Message,
        sender: NodeId,
        visit: &mut dyn FnMut(crate::types::ProposalTag),
    ) -> crate::protocol::Carriage {
        use crate::protocol::Carriage;
        use crate::types::{Payload, ProposalTag};
        match message {
            Message::ForwardProposals { proposals, .. } => {
                for &(request_id, _) in proposals {
                    visit(ProposalTag {
                        proposer: sender,
                        request_id,
                    });
                }
                Carriage::Forwarded
            }
            Message::AppendEntries { entries, .. } if !entries.is_empty() => {
                for entry in entries {
                    if let Payload::Command { tag, .. } = &entry.payload {
                        visit(*tag);
                    }
                }
                Carriage::Entries
            }
            _ => Carriage::Nothing,
        }
    }

    fn id(&self) -> NodeId {
        self.config.id
    }

    fn step(&mut self, input: Input, out: &mut Output) {
        RaftNode::step(self, input, out)
    }

    fn status(&self) -> Status {
        Status {
            term: self.term,
            leader: self.leader,
            is_leader: self.role == Role::Leader,
            commit_index: self.commit_index,
            log_entries: self.log.last_index() + 1 - self.log.first_index(),
        }
    }

    fn replication_lag(&self) -> Vec<(NodeId, u64)> {
        let Some(leader) = &self.leader_state else {
            return Vec::new();
        };
        let last = self.log.last_index();
        leader
            .progress
            .iter()
            .map(|(&id, progress)| (id, last.saturating_sub(progress.match_index)))
            .collect()
    }

    fn into_recovered_state(self) -> RecoveredState {
        RaftNode::into_recovered_state(self)
    }

    fn membership(&self) -> Option<Membership> {
        Some(RaftNode::membership(self).clone())
    }

    fn membership_control(change: crate::membership::MembershipChange) -> Option<Control> {
        Some(Control::ChangeMembership(change))
    }
}
