//! Replication: proposals and batching, pipelined appends, heartbeats, back-off, commit, and the
//! leader's periodic duties (heartbeats, check-quorum, transfer timeouts, priority hand-over).

use bytes::Bytes;

use crate::protocol::raft::message::{ConflictHint, Message};
use crate::protocol::raft::node::{RaftNode, Role};
use crate::protocol::raft::progress::ProgressState;
use crate::protocol::raft::{Output, RejectReason, Rejection};
use crate::types::{Entry, LogIndex, NodeId, Payload, ProposalTag, Term};

impl RaftNode {
    /// A client proposal arrived at this node.
    pub(crate) fn propose(&mut self, request_id: u64, data: Bytes, out: &mut Output) {
        if self.removed {
            let reason = RejectReason::Removed;
            out.rejected.push(Rejection { request_id, reason });
            return;
        }
        if self.role != Role::Leader {
            if self.config.forward_proposals {
                self.forward_proposal(request_id, data, out);
                return;
            }
            let reject = |reason| Rejection { request_id, reason };
            match self.leader {
                Some(leader) => {
                    out.rejected.push(reject(RejectReason::NotLeader {
                        leader: Some(leader),
                    }));
                }
                None => out.rejected.push(reject(RejectReason::NoLeader)),
            }
            return;
        }
        let tag = ProposalTag {
            proposer: self.config.id,
            request_id,
        };
        if let Err(reason) = self.buffer_proposal(tag, data, out) {
            out.rejected.push(Rejection { request_id, reason });
        }
    }

    /// Proposals a follower passed on. Refusals are not reported back: the proposer's client
    /// times out, which is exact (the entry was never appended).
    pub(crate) fn handle_forwarded_proposals(
        &mut self,
        from: NodeId,
        proposals: Vec<(u64, Bytes)>,
        out: &mut Output,
    ) {
        if self.role != Role::Leader {
            return;
        }
        for (request_id, data) in proposals {
            let tag = ProposalTag {
                proposer: from,
                request_id,
            };
            if self.buffer_proposal(tag, data, out).is_err() {
                return;
            }
        }
    }

    /// Adds a proposal to the leader's batch, appending the batch when it is full. During a
    /// leadership transfer nothing is appended (the target must catch up with a log that stands
    /// still): the batch waits, and goes to the new leader if the transfer succeeds
    /// (`forwarding.rs`) or is appended if it is abandoned.
    pub(crate) fn buffer_proposal(
        &mut self,
        tag: ProposalTag,
        data: Bytes,
        out: &mut Output,
    ) -> Result<(), RejectReason> {
        let size = data.len() + 16;
        let (limit_bytes, limit_pending) = (
            self.config.max_batch_bytes,
            self.config.max_pending_proposals,
        );
        let (batch_size, batching) = (self.config.batch_size, self.config.enable_batching);
        let Some(state) = self.leader_state.as_mut() else {
            return Err(RejectReason::NoLeader);
        };
        if size > limit_bytes {
            return Err(RejectReason::TooLarge {
                size,
                limit: limit_bytes,
            });
        }
        if state.batch.proposals.len() >= limit_pending {
            return Err(RejectReason::Overloaded {
                limit: limit_pending,
            });
        }
        if state.batch.proposals.is_empty() {
            state.batch.age_ticks = 0;
        }
        state.batch.proposals.push((tag, data));
        state.batch.bytes += size;
        let full = state.batch.proposals.len() >= batch_size || state.batch.bytes >= limit_bytes;
        if full || !batching {
            self.flush_proposals(out);
        }
        Ok(())
    }

    /// Appends every buffered proposal to the log and starts replicating them; at a node that
    /// does not lead, forwards the batch of proposals to forward.
    pub(crate) fn flush_proposals(&mut self, out: &mut Output) {
        let Some(state) = self.leader_state.as_mut() else {
            self.flush_forwards(out);
            self.flush_reads(out);
            return;
        };
        if state.batch.proposals.is_empty() || state.transfer.is_some() {
            self.start_read_round_if_needed(out);
            return;
        }
        let proposals = std::mem::take(&mut state.batch.proposals);
        state.batch.sent_before.clear();
        state.batch.bytes = 0;
        state.batch.age_ticks = 0;
        let (term, first_index) = (self.term, self.log.last_index() + 1);
        let entries = proposals
            .into_iter()
            .zip(first_index..)
            .map(|((tag, data), index)| Entry {
                term,
                index,
                payload: Payload::Command { tag, data },
            })
            .collect();
        self.append_to_own_log(entries, out);
        self.start_read_round_if_needed(out);
    }

    /// The leader appends entries of its own term and replicates them.
    pub(crate) fn append_to_own_log(&mut self, entries: Vec<Entry>, out: &mut Output) {
        debug_assert!(self.role == Role::Leader);
        out.write.merge_log(None, &entries);
        let mut membership_changed = false;
        for entry in entries {
            membership_changed |= self.members.appended(&entry);
            self.log.push(entry);
        }
        if membership_changed {
            self.membership_changed(out);
        }
        self.maybe_commit(out);
        let replicas: Vec<NodeId> = self
            .leader_state
            .as_ref()
            .map(|state| state.progress.keys().copied().collect())
            .unwrap_or_default();
        for peer in replicas {
            self.send_appends(peer, out);
        }
    }

    /// Sends `peer` as many appends as its progress allows.
    pub(crate) fn send_appends(&mut self, peer: NodeId, out: &mut Output) {
        let (term, commit) = (self.term, self.commit_index);
        let last_index = self.log.last_index();
        let (max_entries, max_bytes) = (
            self.config.max_entries_per_append as u64,
            self.config.max_bytes_per_append,
        );
        loop {
            // The fields, not `progress_mut`: the log is read while `progress` is held.
            let Some(progress) = self
                .leader_state
                .as_mut()
                .and_then(|s| s.progress.get_mut(&peer))
            else {
                return;
            };
            if !progress.can_send() {
                return;
            }
            let next = progress.next_index;
            if next > last_index && progress.state == ProgressState::Replicate {
                return; // in step and nothing new: heartbeats keep it alive
            }
            let prev_log_index = next - 1;
            // next_index never passes last_index + 1, so the term is missing only for an index
            // compacted away: such a follower needs the snapshot.
            let Some(prev_log_term) = self.log.term_at(prev_log_index) else {
                self.start_snapshot_transfer(peer, out);
                return;
            };
            // As many entries as fit in `max_bytes`, but at least one: counted first, then
            // copied into a vector of exactly that size (pushing one by one regrew it
            // log2(n) times per append, which showed in the leader's profile).
            let candidates = self
                .log
                .slice(next, (next + max_entries - 1).min(last_index));
            let mut bytes = 0;
            let fitting = candidates
                .iter()
                .take_while(|entry| {
                    bytes += entry.payload.size_bytes();
                    bytes <= max_bytes
                })
                .count();
            let entries = candidates[..fitting.max(candidates.len().min(1))].to_vec();
            let last_sent = prev_log_index + entries.len() as u64;
            progress.on_append_sent(last_sent);
            progress.commit_sent = progress.commit_sent.max(commit.min(last_sent));
            let probing = progress.state == ProgressState::Probe;
            let message = Message::AppendEntries {
                term,
                prev_log_index,
                prev_log_term,
                entries,
                leader_commit: commit,
            };
            self.send(peer, message, out);
            if probing {
                return;
            }
        }
    }

    /// Follower side of [`Message::AppendEntries`].
    pub(crate) fn handle_append_entries(
        &mut self,
        leader: NodeId,
        prev_log_index: LogIndex,
        prev_log_term: u64,
        entries: Vec<Entry>,
        leader_commit: LogIndex,
        out: &mut Output,
    ) {
        let term = self.term;
        if self.role == Role::Leader {
            return;
        }
        let (mut prev_log_index, mut prev_log_term, mut entries) =
            (prev_log_index, prev_log_term, entries);
        let last_sent_index = prev_log_index + entries.len() as u64;
        if prev_log_index < self.commit_index && self.log.term_at(prev_log_index).is_none() {
            // The append starts in what this node compacted away (a late one, or sent before
            // the leader learned of a snapshot installed here). What it carries up to the
            // commit index is committed here already, hence the same: start after it.
            let commit_term = self.log.term_at(self.commit_index);
            debug_assert!(commit_term.is_some(), "the commit index's term is known");
            entries.retain(|e| e.index > self.commit_index);
            prev_log_index = self.commit_index;
            prev_log_term = commit_term.unwrap_or(prev_log_term);
        }
        if self.log.term_at(prev_log_index) != Some(prev_log_term) {
            let hint = match self.log.term_at(prev_log_index) {
                None => ConflictHint {
                    conflict_term: None,
                    first_index: self.log.last_index() + 1,
                },
                Some(conflict_term) => ConflictHint {
                    conflict_term: Some(conflict_term),
                    first_index: self.log.first_index_of_term_at(prev_log_index),
                },
            };
            let message = Message::AppendEntriesResponse {
                term,
                index: prev_log_index,
                reject: Some(hint),
            };
            self.send(leader, message, out);
            return;
        }
        let last_new_index = last_sent_index.max(prev_log_index + entries.len() as u64);
        // Skip what we already hold; the first differing entry and all after it are replaced.
        let mut first_new = entries.len();
        let mut truncate_from = None;
        for (position, entry) in entries.iter().enumerate() {
            match self.log.term_at(entry.index) {
                Some(existing) if existing == entry.term => continue,
                Some(_) => {
                    assert!(
                        entry.index > self.commit_index,
                        "leader {leader} rewrites committed index {} (commit {})",
                        entry.index,
                        self.commit_index
                    );
                    truncate_from = Some(entry.index);
                }
                None => {}
            }
            first_new = position;
            break;
        }
        let mut membership_changed = false;
        if let Some(from) = truncate_from {
            self.log.truncate_from(from);
            membership_changed |= self.members.truncated_from(from);
            self.durable_index = self.durable_index.min(from - 1);
        }
        if truncate_from.is_some() || first_new < entries.len() {
            out.write.merge_log(truncate_from, &entries[first_new..]);
            // Moved, not cloned: the message is ours, and a clone per entry showed in profiles.
            for entry in entries.into_iter().skip(first_new) {
                membership_changed |= self.members.appended(&entry);
                self.log.push(entry);
            }
        }
        if membership_changed {
            self.membership_changed(out);
        }
        self.commit_to(leader_commit.min(last_new_index), out);
        let message = Message::AppendEntriesResponse {
            term,
            index: last_new_index,
            reject: None,
        };
        self.send(leader, message, out);
    }

    /// Follower side of [`Message::Heartbeat`]. The leader caps `commit` at what it knows we
    /// hold, so everything up to it matches the leader's log.
    pub(crate) fn handle_heartbeat(
        &mut self,
        leader: NodeId,
        commit: LogIndex,
        round: u64,
        out: &mut Output,
    ) {
        if self.role == Role::Leader {
            return;
        }
        self.commit_to(commit.min(self.log.last_index()), out);
        let term = self.term;
        self.send(leader, Message::HeartbeatResponse { term, round }, out);
    }

    /// Leader side of [`Message::AppendEntriesResponse`].
    pub(crate) fn handle_append_response(
        &mut self,
        from: NodeId,
        index: LogIndex,
        reject: Option<ConflictHint>,
        out: &mut Output,
    ) {
        let retry_from = reject.map(|hint| match hint.conflict_term {
            Some(term) => self
                .log
                .last_index_of_term(term)
                .map_or(hint.first_index, |i| i + 1),
            None => hint.first_index,
        });
        let Some(progress) = self.progress_heard_from(from) else {
            return;
        };
        match retry_from {
            None => {
                if progress.on_match(index) {
                    self.maybe_commit(out);
                }
                self.send_appends(from, out);
                self.send_owed_commit(from, out);
                self.send_timeout_now_if_caught_up(from, out);
            }
            Some(retry_from) => {
                if progress.on_reject(index, retry_from) {
                    self.send_appends(from, out);
                }
            }
        }
    }

    /// Leader side of [`Message::HeartbeatResponse`].
    pub(crate) fn handle_heartbeat_response(&mut self, from: NodeId, round: u64, out: &mut Output) {
        let last_index = self.log.last_index();
        let Some(progress) = self.progress_heard_from(from) else {
            return;
        };
        progress.on_heartbeat_response(last_index);
        let behind = progress.match_index < last_index;
        self.snapshot_heartbeat(from, out);
        self.round_answered(from, round, out);
        if behind {
            self.send_appends(from, out);
        }
    }

    /// Advances the commit index to the highest index stored on a quorum, provided that entry is
    /// of the current term (Raft §5.4.2: earlier-term entries commit only indirectly).
    pub(crate) fn maybe_commit(&mut self, out: &mut Output) {
        if self.commit_by_certificate {
            return;
        }
        let Some(state) = self.leader_state.as_ref() else {
            return;
        };
        let me = self.config.id;
        // This node counts only what is on its disk; learners are in `progress` but never in
        // a quorum.
        let counted = if self.config.bugs().count_learners_in_quorum {
            let mut with_learners = self.membership().clone();
            with_learners
                .voters
                .extend(with_learners.learners.iter().copied());
            std::borrow::Cow::Owned(with_learners)
        } else {
            std::borrow::Cow::Borrowed(self.membership())
        };
        let quorum_index = counted.quorum_value(|id| {
            if id == me {
                self.durable_index
            } else {
                state.progress.get(&id).map_or(0, |p| p.match_index)
            }
        });
        if quorum_index <= self.commit_index {
            return;
        }
        let of_current_term = self.log.term_at(quorum_index) == Some(self.term);
        if of_current_term || self.config.bugs().commit_previous_term_by_counting {
            let newly_committed = self.commit_index + 1;
            self.commit_to(quorum_index, out);
            self.notify_waiting_proposers(newly_committed, out);
        }
    }

    /// A leader whose quorum is counted outside the core (see
    /// `RaftNode::commit_by_certificate`) commits through `index`, which a quorum holds: only an
    /// entry of the leader's own term commits by counting (Raft §5.4.2), so anything else is
    /// ignored, as is an index the log does not reach or one already committed.
    pub(crate) fn commit_certified(&mut self, index: LogIndex, out: &mut Output) {
        if self.role != Role::Leader
            || index <= self.commit_index
            || index > self.log.last_index()
            || self.log.term_at(index) != Some(self.term)
        {
            return;
        }
        let newly_committed = self.commit_index + 1;
        self.commit_to(index, out);
        self.notify_waiting_proposers(newly_committed, out);
    }

    /// A follower whose client proposal (forwarded to us) just committed answers its client only
    /// when it learns the commit: record that it is owed it and tell it now
    /// ([`RaftNode::send_owed_commit`]). Followers with no proposal waiting learn the commit from
    /// the next append or heartbeat: notifying everyone on every commit would double the
    /// messages.
    fn notify_waiting_proposers(&mut self, from_index: LogIndex, out: &mut Output) {
        let me = self.config.id;
        let mut owed: Vec<(NodeId, LogIndex)> = self
            .log
            .slice(from_index, self.commit_index)
            .iter()
            .filter_map(|entry| match &entry.payload {
                Payload::Command { tag, .. } if tag.proposer != me => {
                    Some((tag.proposer, entry.index))
                }
                _ => None,
            })
            .collect();
        if owed.is_empty() {
            return;
        }
        // Per proposer, its last entry committed now.
        owed.sort_unstable();
        owed.dedup_by(|later, earlier| {
            let same = later.0 == earlier.0;
            if same {
                earlier.1 = earlier.1.max(later.1);
            }
            same
        });
        for (peer, index) in owed {
            let Some(progress) = self.progress_mut(peer) else {
                continue;
            };
            progress.owed_commit = progress.owed_commit.max(index);
            self.send_owed_commit(peer, out);
        }
    }

    /// Sends `peer` a [`Message::Commit`] if it is owed a commit that no append, heartbeat or
    /// commit carried yet. Sent at once, whether or not appends are in flight to it and whether
    /// or not its own acknowledgement is in: under load there nearly always is an append in
    /// flight, and another follower's acknowledgement usually commits the entry first, so
    /// waiting for either (or for the next append to carry the commit) held a forwarding
    /// follower's answers back by a round trip or more.
    pub(crate) fn send_owed_commit(&mut self, peer: NodeId, out: &mut Output) {
        let (term, commit) = (self.term, self.commit_index);
        let Some(commit_term) = self.log.term_at(commit) else {
            return;
        };
        let Some(progress) = self.progress_mut(peer) else {
            return;
        };
        if progress.owed_commit > progress.commit_sent.max(progress.commit_told) {
            progress.commit_told = commit;
            let message = Message::Commit {
                term,
                commit,
                commit_term,
            };
            self.send(peer, message, out);
        }
    }

    /// Follower side of [`Message::Commit`]: commits through `commit` if this node's entry there
    /// is the leader's (same term), and ignores it otherwise (the entry has not arrived yet; the
    /// append that brings it carries the commit).
    pub(crate) fn handle_commit(&mut self, commit: LogIndex, commit_term: Term, out: &mut Output) {
        if self.role == Role::Leader || self.log.term_at(commit) != Some(commit_term) {
            return;
        }
        self.commit_to(commit, out);
    }

    /// Marks everything up to `index` committed and hands it out for applying.
    pub(crate) fn commit_to(&mut self, index: LogIndex, out: &mut Output) {
        if index <= self.commit_index {
            return;
        }
        debug_assert!(index <= self.log.last_index());
        let first_new = out.committed.len();
        out.committed
            .extend_from_slice(self.log.slice(self.commit_index + 1, index));
        self.forget_committed_proposals(&out.committed[first_new..]);
        let before = self.commit_index;
        self.commit_index = index;
        self.release_reads_after_term_commit(out);
        self.membership_committed(before, out);
    }

    /// The leader's share of a tick: heartbeats, check-quorum, transfer timeout, batch timeout,
    /// priority hand-over.
    pub(crate) fn tick_leader(&mut self, out: &mut Output) {
        self.heartbeat_elapsed += 1;
        self.election_elapsed += 1;
        let election_timeout = self.config.election_timeout_ticks;
        let batch_timeout = self.config.batch_timeout_ticks;
        let Some(state) = self.leader_state.as_mut() else {
            return;
        };
        if let Some((_, elapsed)) = state.transfer.as_mut() {
            *elapsed += 1;
            if *elapsed >= election_timeout {
                state.transfer = None; // the target did not take over in time: lead on
            }
        }
        let batch_due = !state.batch.proposals.is_empty() && {
            state.batch.age_ticks += 1;
            state.batch.age_ticks >= batch_timeout
        };
        if batch_due {
            self.flush_proposals(out);
        }
        if self.election_elapsed >= election_timeout {
            self.election_elapsed = 0;
            if self.config.check_quorum && !self.check_quorum_round() {
                let term = self.term;
                self.become_follower(term, None, out);
                return;
            }
        }
        if self.heartbeat_elapsed >= self.config.heartbeat_interval_ticks {
            self.heartbeat_elapsed = 0;
            self.broadcast_heartbeats(out);
            if self.transfer_target().is_none()
                && let Some(preferred) = self.preferred_leader()
            {
                self.transfer_leadership(preferred, out);
            }
        }
    }

    /// True if a quorum (ourselves included) was heard from since the last round; starts a new
    /// round.
    fn check_quorum_round(&mut self) -> bool {
        let me = self.config.id;
        let Some(state) = self.leader_state.as_ref() else {
            return false;
        };
        let active = self.membership().has_quorum(|id| {
            id == me || state.progress.get(&id).is_some_and(|p| p.recently_active)
        });
        if let Some(state) = self.leader_state.as_mut() {
            for progress in state.progress.values_mut() {
                progress.active_last_round = progress.recently_active;
                progress.recently_active = false;
            }
        }
        active
    }

    /// Sends the next heartbeat round to every follower (periodically, and when reads need
    /// the leadership confirmed: see `read_index.rs`).
    pub(crate) fn broadcast_heartbeats(&mut self, out: &mut Output) {
        let round = self.round_sent();
        let Some(state) = self.leader_state.as_ref() else {
            return;
        };
        let (term, commit) = (self.term, self.commit_index);
        let beats: Vec<(NodeId, LogIndex)> = state
            .progress
            .iter()
            .map(|(&peer, p)| (peer, p.match_index.min(commit)))
            .collect();
        if let Some(state) = self.leader_state.as_mut() {
            state.progress.values_mut().for_each(|p| {
                p.acked_since_heartbeat = false;
                p.commit_sent = p.commit_sent.max(p.match_index.min(commit));
            });
        }
        for (peer, commit) in beats {
            self.send(
                peer,
                Message::Heartbeat {
                    term,
                    commit,
                    round,
                },
                out,
            );
        }
    }
}
