//! Elections: pre-vote, votes, check-quorum leases, leadership transfer, priority hand-over, and
//! the term rules every incoming message passes through first.

use std::collections::BTreeMap;

use crate::protocol::raft::message::Message;
use crate::protocol::raft::node::{LeaderState, ProposalBatch, RaftNode, Role};
use crate::protocol::raft::progress::Progress;
use crate::protocol::raft::{Envelope, Output, RejectReason, Rejection};
use crate::protocol::{ElectionRound, Event};
use crate::storage::HardState;
use crate::types::{Entry, NodeId, Payload, Term};

impl RaftNode {
    /// Entry point for peer messages: applies the term rules, then hands the message to its
    /// handler.
    pub(crate) fn receive(&mut self, envelope: Envelope, out: &mut Output) {
        let Envelope { from, to, message } = envelope;
        // A leader's messages, and requests for votes, are heeded from any node the transport
        // let through: a node behind a membership change may not know its new leader or the
        // new voters yet, and a group can need its vote to elect one. (Safety never rested on
        // this filter: a candidate counts the votes of its own membership's voters only, and a
        // removed node's campaign is refused on its log or inside a leader's lease.) Everything
        // else comes from members only.
        if to != self.config.id
            || from == self.config.id
            || !(message.is_from_leader()
                || message.asks_for_vote()
                || self.membership().contains(from))
        {
            return; // misrouted, or from a stranger: nothing in it can be trusted to apply here
        }
        let message_term = message.term();
        if message_term > self.term {
            match &message {
                // Pre-votes are asked and granted at the proposed term without anyone moving to it.
                Message::PreVote { .. } | Message::PreVoteResponse { granted: true, .. } => {}
                Message::RequestVote {
                    leadership_transfer: false,
                    ..
                } if self.in_lease() => {
                    // A live leader was heard from within an election timeout: this candidate is
                    // the disruptive kind (partitioned and back). Ignore it, term included.
                    return;
                }
                _ if message.is_from_leader() => {
                    self.become_follower(message_term, Some(from), out);
                }
                _ => self.become_follower(message_term, None, out),
            }
        } else if message_term < self.term {
            self.answer_stale(from, &message, out);
            return;
        }

        match message {
            Message::PreVote {
                term,
                last_log_index,
                last_log_term,
            } => {
                let granted = term > self.term
                    && !self.in_lease()
                    && self.log.is_up_to_date(last_log_index, last_log_term)
                    && self.pre_candidate_yields_to(from, last_log_index, last_log_term);
                let term = if granted { term } else { self.term };
                self.send(from, Message::PreVoteResponse { term, granted }, out);
            }
            Message::RequestVote {
                last_log_index,
                last_log_term,
                leadership_transfer: transfer,
                ..
            } => {
                self.handle_request_vote(from, last_log_index, last_log_term, transfer, out);
            }
            Message::PreVoteResponse { term, granted } => {
                let expected_term = if granted { self.term + 1 } else { self.term };
                if self.role == Role::PreCandidate && term == expected_term {
                    self.record_vote(from, granted, out);
                }
            }
            Message::RequestVoteResponse { granted, .. } => {
                if self.role == Role::Candidate {
                    self.record_vote(from, granted, out);
                }
            }
            Message::TimeoutNow { .. } => {
                if self.role != Role::Leader && self.is_voter() {
                    self.start_campaign(true, out);
                }
            }
            Message::AppendEntries {
                prev_log_index,
                prev_log_term,
                entries,
                leader_commit,
                ..
            } => {
                self.follow(from, out);
                self.handle_append_entries(
                    from,
                    prev_log_index,
                    prev_log_term,
                    entries,
                    leader_commit,
                    out,
                );
            }
            Message::Heartbeat { commit, round, .. } => {
                self.follow(from, out);
                self.handle_heartbeat(from, commit, round, out);
            }
            Message::AppendEntriesResponse { index, reject, .. } => {
                self.handle_append_response(from, index, reject, out);
            }
            Message::Commit {
                commit,
                commit_term,
                ..
            } => {
                self.follow(from, out);
                self.handle_commit(commit, commit_term, out);
            }
            Message::HeartbeatResponse { round, .. } => {
                self.handle_heartbeat_response(from, round, out)
            }
            Message::ForwardProposals { proposals, .. } => {
                self.handle_forwarded_proposals(from, proposals, out);
            }
            Message::ForwardMembership { tag, change, .. } => {
                self.handle_forwarded_membership(from, tag, change, out);
            }
            Message::MembershipAnswer { tag, result, .. } => {
                let result = result.map_err(|refused| *refused);
                out.events
                    .push(Event::MembershipForwardAnswered { tag, result });
            }
            Message::ReadIndex { read_ids, .. } => self.handle_read_index(from, read_ids, out),
            Message::ReadIndexResponse {
                read_ids,
                index,
                index_term,
                ..
            } => {
                if self.role != Role::Leader {
                    self.follow(from, out);
                    self.handle_read_index_response(read_ids, index, index_term, out);
                }
            }
            Message::InstallSnapshot {
                index,
                snapshot_term,
                total,
                checksum,
                offset,
                chunk_checksum,
                data,
                membership,
                ..
            } => {
                self.follow(from, out);
                let chunk = crate::protocol::raft::snapshot::SnapshotChunk {
                    index,
                    snapshot_term,
                    total,
                    checksum,
                    offset,
                    data,
                    chunk_checksum,
                    membership: membership.map(|membership| *membership),
                };
                self.handle_install_snapshot(from, chunk, out);
            }
            Message::InstallSnapshotResponse {
                index, received, ..
            } => self.handle_install_snapshot_response(from, index, received, out),
        }
    }

    /// A message from an older term. Answer the ones whose sender is waiting on us, so that it
    /// learns the newer term: a deposed leader steps down, a pre-candidate gives up.
    fn answer_stale(&mut self, from: NodeId, message: &Message, out: &mut Output) {
        let term = self.term;
        match message {
            Message::AppendEntries { .. }
            | Message::Heartbeat { .. }
            | Message::InstallSnapshot { .. } => {
                self.send(from, Message::HeartbeatResponse { term, round: 0 }, out);
            }
            Message::PreVote { .. } => {
                self.send(
                    from,
                    Message::PreVoteResponse {
                        term,
                        granted: false,
                    },
                    out,
                );
            }
            Message::RequestVote { .. } => {
                self.send(
                    from,
                    Message::RequestVoteResponse {
                        term,
                        granted: false,
                    },
                    out,
                );
            }
            _ => {}
        }
    }

    /// True while this node has reason to believe a leader is alive: it heard from one (or, as
    /// leader, confirmed a quorum) within the last election timeout, and its transport has not
    /// reported that leader's connections broken since (see [`RaftNode::on_peer_unreachable`]).
    /// Only meaningful with check-quorum, which is what makes the leader's side of the lease
    /// hold. With lease reads, also while this voter keeps a read lease's promise
    /// ([`RaftNode::honours_lease`]), which no hint cancels.
    pub(crate) fn in_lease(&self) -> bool {
        let heard_recently = self.config.check_quorum
            && self.leader.is_some()
            && !self.leader_unreachable
            && self.election_elapsed < self.config.election_timeout_ticks;
        heard_recently || self.honours_lease()
    }

    /// The transport reports that every connection to `peer` broke ([`Input::PeerUnreachable`]).
    ///
    /// When `peer` is this follower's leader, the follower starts a pre-vote now instead of
    /// waiting out its election timeout, and stops counting on the leader's lease when it
    /// answers pre-votes and votes. Why that is enough, and safe:
    ///
    /// - A hint alone would not help if voters kept honouring the lease: the other followers
    ///   heard from the leader a moment ago too, and would refuse the pre-vote. But their
    ///   connections to a dead leader break as well, so they get the hint too, and a voter that
    ///   has it no longer counts the lease ([`RaftNode::in_lease`]); the pre-vote can win.
    /// - A false hint (a connection blip to a live leader) cannot depose a leader that holds a
    ///   quorum: the leader itself and every voter still hearing from it without a hint refuse
    ///   the pre-vote, and a pre-vote that loses changes no term. The hint is cleared by the
    ///   leader's next message, so a blip is forgotten within a heartbeat.
    /// - The hint never bumps a term and never skips the pre-vote: without pre-vote configured it
    ///   is ignored. Election safety does not depend on leases or hints at all; they only decide
    ///   how soon an election may start.
    /// - A merely slow leader keeps its connections, so it sends no hint and still gets the
    ///   whole timeout.
    ///
    /// The followers of a dead leader all get the hint at about the same moment; had they all
    /// started at once, each would vote for itself and split the vote. So they start in the
    /// order of their ids, [`RaftConfig::unreachable_leader_stagger_ticks`] apart.
    ///
    /// [`Input::PeerUnreachable`]: crate::protocol::Input::PeerUnreachable
    /// [`RaftConfig::unreachable_leader_stagger_ticks`]:
    ///     crate::protocol::raft::RaftConfig::unreachable_leader_stagger_ticks
    pub(crate) fn on_peer_unreachable(&mut self, peer: NodeId, out: &mut Output) {
        // With lease reads the voters wait out the lease anyway; an early start could only
        // spend this node's own vote inside the lease it promised.
        let acts = self.role == Role::Follower
            && !self.config.lease_reads
            && self.leader == Some(peer)
            && peer != self.config.id
            && !self.leader_unreachable
            && self.config.pre_vote
            && self.is_voter();
        if !acts {
            return;
        }
        self.leader_unreachable = true;
        let me = self.config.id;
        let rank = self.peers().filter(|&p| p != peer && p < me).count() as u32;
        let delay = rank.saturating_mul(self.config.unreachable_leader_stagger_ticks);
        if delay == 0 {
            self.start_campaign(false, out);
        } else {
            // The timer fires `delay` ticks from now, or sooner if it was due sooner anyway.
            let due = self.election_elapsed.saturating_add(delay);
            self.election_timeout = self.election_timeout.min(due);
        }
    }

    fn handle_request_vote(
        &mut self,
        from: NodeId,
        last_log_index: u64,
        last_log_term: Term,
        leadership_transfer: bool,
        out: &mut Output,
    ) {
        let promised_a_lease = self.honours_lease() && !leadership_transfer;
        let free_to_vote = self.voted_for == Some(from)
            || (self.voted_for.is_none() && self.leader.is_none() && !promised_a_lease)
            || (self.config.bugs().vote_twice_in_a_term && self.role != Role::Leader);
        let granted = free_to_vote && self.log.is_up_to_date(last_log_index, last_log_term);
        if granted {
            self.voted_for = Some(from);
            self.save_hard_state(out);
            self.reset_election_timer();
        }
        let term = self.term;
        self.send(from, Message::RequestVoteResponse { term, granted }, out);
    }

    /// Counts a (pre-)vote and moves on once the outcome is decided.
    fn record_vote(&mut self, from: NodeId, granted: bool, out: &mut Output) {
        if !self.membership().is_voter(from) {
            return;
        }
        self.votes.entry(from).or_insert(granted);
        let membership = self.membership();
        let won = membership.has_quorum(|id| self.votes.get(&id) == Some(&true));
        let lost = membership.has_quorum(|id| self.votes.get(&id) == Some(&false));
        if won {
            match self.role {
                Role::PreCandidate => self.campaign(false, out),
                Role::Candidate => self.become_leader(out),
                _ => {}
            }
        } else if lost {
            let term = self.term;
            self.become_follower(term, None, out);
        }
    }

    /// The election timer fired (or a transfer asked for it): campaign, with a pre-vote round
    /// first unless this is a leadership transfer.
    pub(crate) fn start_campaign(&mut self, leadership_transfer: bool, out: &mut Output) {
        if self.config.pre_vote && !leadership_transfer {
            self.role = Role::PreCandidate;
            self.leader_state = None;
            self.set_leader(None, out);
            self.reset_election_timer();
            self.votes.clear();
            self.pre_vote_rounds = self.pre_vote_rounds.saturating_add(1);
            let (term, last_log_index, last_log_term) =
                (self.term + 1, self.log.last_index(), self.log.last_term());
            out.events.push(Event::ElectionRound {
                round: ElectionRound::PreVote,
                term,
            });
            for peer in self.peers().collect::<Vec<_>>() {
                let message = Message::PreVote {
                    term,
                    last_log_index,
                    last_log_term,
                };
                self.send(peer, message, out);
            }
            self.record_vote(self.config.id, true, out);
        } else {
            self.campaign(leadership_transfer, out);
        }
    }

    /// True unless this node is itself a pre-candidate with a better claim than `from`: a longer
    /// log (by last term, then length) or, with equal logs in its first round since it last
    /// knew a leader, a lower id. Two pre-candidates that
    /// granted each other would both campaign in the same term, each vote for itself, and split
    /// the vote (a full election timeout lost); with this order exactly one of them yields.
    /// After a leader crash reported by the transport the followers pre-vote nearly together,
    /// and this is what keeps them from splitting. Refusing a pre-vote never affects safety.
    fn pre_candidate_yields_to(
        &self,
        from: NodeId,
        last_log_index: u64,
        last_log_term: Term,
    ) -> bool {
        if self.role != Role::PreCandidate {
            return true;
        }
        let theirs = (last_log_term, last_log_index);
        let ours = (self.log.last_term(), self.log.last_index());
        // The order holds for a pre-candidate's first round only. One whose earlier round
        // elected no one may be unable to win (a voter it needs cannot reach it: one that lacks
        // the membership entry giving its address), and refusing an equal log then could keep
        // the group leaderless for good; yielding costs at worst a split vote.
        theirs > ours || (theirs == ours && (from < self.config.id || self.pre_vote_rounds > 1))
    }

    /// A pre-candidate asks the voters that refused or did not answer once more (see
    /// [`RaftConfig::pre_vote_retry_ticks`](crate::protocol::raft::RaftConfig)).
    pub(crate) fn ask_pre_votes_again(&mut self, out: &mut Output) {
        self.votes.retain(|_, granted| *granted);
        let (term, last_log_index, last_log_term) =
            (self.term + 1, self.log.last_index(), self.log.last_term());
        let asked: Vec<NodeId> = self
            .peers()
            .filter(|peer| !self.votes.contains_key(peer))
            .collect();
        for peer in asked {
            let message = Message::PreVote {
                term,
                last_log_index,
                last_log_term,
            };
            self.send(peer, message, out);
        }
    }

    /// A real election: bump the term, vote for ourselves, ask everyone.
    fn campaign(&mut self, leadership_transfer: bool, out: &mut Output) {
        self.role = Role::Candidate;
        self.leader_state = None;
        self.term += 1;
        self.voted_for = Some(self.config.id);
        self.save_hard_state(out);
        self.set_leader(None, out);
        self.reset_election_timer();
        self.votes.clear();
        let (term, last_log_index, last_log_term) =
            (self.term, self.log.last_index(), self.log.last_term());
        out.events.push(Event::ElectionRound {
            round: ElectionRound::Vote,
            term,
        });
        for peer in self.peers().collect::<Vec<_>>() {
            let message = Message::RequestVote {
                term,
                last_log_index,
                last_log_term,
                leadership_transfer,
            };
            self.send(peer, message, out);
        }
        // Its own vote counts once the write recording it is durable
        // (`on_hard_state_durable`), like anyone else's.
    }

    /// The driver made `hard_state` durable: a candidate's vote for itself in its term now
    /// counts. Counted before, a sole voter would lead the term at once, and a crash before the
    /// write would let it vote in that term again, for another candidate, which would lead the
    /// same term (two chaos seeds of 300,000, 3110783 and 3392937, each a sole voter left by a
    /// membership change and killed just after it took the lead). Other voters' grants leave
    /// only after their own writes, and this candidate's requests only after this one.
    pub(crate) fn on_hard_state_durable(&mut self, hard_state: HardState, out: &mut Output) {
        let me = self.config.id;
        if self.role == Role::Candidate
            && hard_state.term == self.term
            && hard_state.voted_for == Some(me)
        {
            self.record_vote(me, true, out);
        }
    }

    /// Moves to `term` (when newer) as a follower of `leader`.
    pub(crate) fn become_follower(&mut self, term: Term, leader: Option<NodeId>, out: &mut Output) {
        if term > self.term {
            self.term = term;
            self.voted_for = None;
            self.save_hard_state(out);
        }
        if let Some(mut state) = self.leader_state.take() {
            let reads = std::mem::take(&mut state.reads);
            self.requeue_reads(reads, out);
            // Buffered proposals were never appended. With forwarding, this node's own go to
            // the next leader (`forwarding.rs`) and the others' are dropped: their proposers
            // keep them and send them there themselves. Without, refusing them is exact.
            let me = self.config.id;
            for (tag, data) in state.batch.proposals {
                if self.config.forward_proposals {
                    if tag.proposer == me {
                        let sent = state.batch.sent_before.contains(&tag.request_id);
                        self.keep_unappended(tag.request_id, data, sent);
                    }
                } else {
                    let reason = RejectReason::NotLeader { leader };
                    out.rejected.push(Rejection {
                        request_id: tag.request_id,
                        reason,
                    });
                }
            }
        }
        self.role = Role::Follower;
        self.votes.clear();
        self.set_leader(leader, out);
        self.reset_election_timer();
    }

    /// A message from the leader of our current term arrived: make sure we follow it and that
    /// our election timer knows it is alive.
    fn follow(&mut self, leader: NodeId, out: &mut Output) {
        if self.role == Role::Leader {
            // Two leaders in one term would be an election-safety violation; the simulator's
            // checker reports it, and we refuse to follow a rival.
            return;
        }
        if self.role != Role::Follower || self.leader != Some(leader) {
            let term = self.term;
            self.become_follower(term, Some(leader), out);
        }
        if self.leader_unreachable {
            // The leader is alive after all: the lease holds again, and the early start the
            // hint scheduled is called off.
            self.leader_unreachable = false;
            self.reset_election_timer();
        }
        self.election_elapsed = 0;
        self.since_leader_heard = 0;
    }

    fn become_leader(&mut self, out: &mut Output) {
        debug_assert_eq!(self.role, Role::Candidate);
        self.role = Role::Leader;
        self.votes.clear();
        self.election_elapsed = 0;
        self.heartbeat_elapsed = 0;
        let last_index = self.log.last_index();
        let max_inflight = self.config.max_inflight_appends;
        let progress: BTreeMap<NodeId, Progress> = self
            .replicas()
            .map(|peer| (peer, Progress::new(last_index, max_inflight)))
            .collect();
        self.leader_state = Some(LeaderState {
            progress,
            batch: ProposalBatch::default(),
            transfer: None,
            reads: Default::default(),
        });
        let id = self.config.id;
        self.set_leader(Some(id), out);
        // A blank entry of the new term lets earlier-term entries commit (Raft §5.4.2, §8).
        let blank = Entry {
            term: self.term,
            index: last_index + 1,
            payload: Payload::Blank,
        };
        self.append_to_own_log(vec![blank], out);
        self.append_kept_proposals(out);
        self.lead_waiting_reads(out);
    }

    /// Hands leadership over before a clean stop: to a voter heard from since the last
    /// check-quorum round if there is one (a dead one would only waste the transfer's timeout),
    /// among those the one with the longest matching log, then the highest priority, then the
    /// lowest id. The transfer brings it up to date before it sends TimeoutNow.
    pub(crate) fn hand_over(&mut self, out: &mut Output) {
        let Some(state) = self.leader_state.as_ref() else {
            return;
        };
        let membership = self.membership();
        let target = state
            .progress
            .iter()
            .filter(|(peer, _)| membership.is_voter(**peer))
            .max_by_key(|(peer, progress)| {
                (
                    progress.recently_active,
                    progress.match_index,
                    self.config.priority_of(**peer),
                    std::cmp::Reverse(**peer),
                )
            })
            .map(|(&peer, _)| peer);
        if let Some(target) = target {
            self.transfer_leadership(target, out);
        }
    }

    /// Starts handing leadership to `to` (Raft thesis §3.10): stop taking proposals, bring `to`
    /// up to date, then tell it to campaign at once. Abandoned after an election timeout.
    pub(crate) fn transfer_leadership(&mut self, to: NodeId, out: &mut Output) {
        if self.role != Role::Leader || to == self.config.id || !self.membership().is_voter(to) {
            return;
        }
        if self.transfer_target() == Some(to) {
            return;
        }
        self.flush_proposals(out);
        if let Some(state) = self.leader_state.as_mut() {
            state.transfer = Some((to, 0));
        }
        self.send_timeout_now_if_caught_up(to, out);
    }

    /// Sends [`Message::TimeoutNow`] to the transfer target once its log matches ours.
    pub(crate) fn send_timeout_now_if_caught_up(&mut self, peer: NodeId, out: &mut Output) {
        if self.transfer_target() != Some(peer) {
            return;
        }
        let caught_up = self
            .progress(peer)
            .is_some_and(|p| p.match_index == self.log.last_index());
        if caught_up {
            let term = self.term;
            self.forfeit_lease();
            self.send(peer, Message::TimeoutNow { term }, out);
        } else {
            self.send_appends(peer, out);
        }
    }

    /// With priority-based elections, the caught-up, live voter of highest priority above ours.
    pub(crate) fn preferred_leader(&self) -> Option<NodeId> {
        if !self.config.priority_based {
            return None;
        }
        let state = self.leader_state.as_ref()?;
        let my_priority = self.config.priority_of(self.config.id);
        let last_index = self.log.last_index();
        state
            .progress
            .iter()
            .filter(|(peer, p)| {
                self.membership().is_voter(**peer)
                    && p.recently_active
                    && p.match_index == last_index
            })
            .map(|(&peer, _)| (self.config.priority_of(peer), peer))
            .filter(|&(priority, _)| priority > my_priority)
            .max()
            .map(|(_, peer)| peer)
    }
}
