//! The normal case: requests reach the primary, which orders them in batches (PRE-PREPARE);
//! backups agree on the order (PREPARE) and on its being prepared at a quorum (COMMIT); every
//! replica executes committed batches strictly in sequence order.

use std::collections::BTreeSet;

use bytes::Bytes;

use crate::gpu::votes::{CpuVoteAggregator, Threshold, Vote, VoteOutcome};
use crate::protocol::{Output, RejectReason, Rejection};
use crate::types::{Entry, NodeId, Payload, ProposalTag};

use super::message::{
    Batch, CommittedBatch, Message, PreparedCertificate, Request, Seq, Signed, Statement,
    chain_state, encode,
};
use super::node::{Accepted, PbftNode};
use super::records;

impl PbftNode {
    pub(super) fn on_propose(&mut self, request_id: u64, data: Bytes, out: &mut Output<Message>) {
        let request = Request {
            tag: ProposalTag {
                proposer: self.config.id,
                request_id,
            },
            data,
        };
        let reject = |reason| Rejection { request_id, reason };
        if request.size_bytes() > self.config.max_batch_bytes {
            out.rejected.push(reject(RejectReason::TooLarge {
                size: request.data.len(),
                limit: self.config.max_batch_bytes,
            }));
            return;
        }
        if self.own_pending.len() >= self.config.max_pending_proposals {
            out.rejected.push(reject(RejectReason::Overloaded {
                limit: self.config.max_pending_proposals,
            }));
            return;
        }
        // Kept until it executes, so that a view change hands it to the next primary.
        self.own_pending
            .insert(request_id, (request.clone(), self.ticks));
        if !self.view_active {
            return;
        }
        if self.is_primary() {
            self.enqueue(request, out);
        } else {
            self.send(self.primary(), Message::Forward(vec![request]), out);
        }
    }

    pub(super) fn on_forward(&mut self, requests: Vec<Request>, out: &mut Output<Message>) {
        if !self.view_active || !self.is_primary() {
            // The proposer sends a request that waits too long to every replica: a backup
            // watches it (and times out on the primary if it never executes), and orders it
            // should it become the primary.
            for request in requests {
                if request.size_bytes() <= self.config.max_batch_bytes
                    && self.watched.len() < self.config.max_pending_proposals
                    && !self.applied.contains(request.tag)
                {
                    self.watched.insert(request.tag, request);
                }
            }
            return;
        }
        for request in requests {
            if request.size_bytes() <= self.config.max_batch_bytes
                && self.queue.len() < self.config.max_pending_proposals
            {
                self.enqueue(request, out);
            }
        }
    }

    fn enqueue(&mut self, request: Request, out: &mut Output<Message>) {
        if self.queue.is_empty() {
            self.queue_wait_ticks = 0;
        }
        self.queue_bytes += request.size_bytes();
        self.queue.push_back(request);
        if self.queue.len() >= self.config.batch_size
            || self.queue_bytes >= self.config.max_batch_bytes
        {
            self.cut_batches(out);
        }
    }

    /// The primary assigns queued requests to sequence numbers, as far as the window allows.
    pub(super) fn cut_batches(&mut self, out: &mut Output<Message>) {
        while !self.queue.is_empty() && self.next_seq <= self.high_watermark() {
            let mut batch = Batch::default();
            let mut bytes = 0;
            while let Some(request) = self.queue.front() {
                let size = request.size_bytes();
                if batch.requests.len() >= self.config.batch_size
                    || (!batch.requests.is_empty() && bytes + size > self.config.max_batch_bytes)
                {
                    break;
                }
                bytes += size;
                self.queue_bytes -= size;
                batch.requests.extend(self.queue.pop_front());
            }
            let seq = self.next_seq;
            self.next_seq += 1;
            self.propose_batch(seq, batch, out);
        }
        self.queue_wait_ticks = 0;
    }

    /// The primary signs and accepts a pre-prepare for `batch` at `seq` in the current view and
    /// sends it once that is durable.
    pub(super) fn propose_batch(&mut self, seq: Seq, batch: Batch, out: &mut Output<Message>) {
        let digest = batch.digest();
        let pre_prepare = self.sign(Statement::PrePrepare {
            view: self.view,
            seq,
            digest,
        });
        self.accept(seq, pre_prepare.clone(), batch.clone(), out);
        self.broadcast_after_write(Message::PrePrepare { pre_prepare, batch }, out);
    }

    pub(super) fn on_pre_prepare(
        &mut self,
        pre_prepare: Signed,
        batch: Batch,
        out: &mut Output<Message>,
    ) {
        let Statement::PrePrepare { view, seq, digest } = pre_prepare.statement else {
            return;
        };
        if !self.view_active
            || view != self.view
            || pre_prepare.signer != self.primary()
            || self.is_primary()
            || !self.in_window(seq)
            || seq <= self.executed
            || batch.digest() != digest
            || batch.requests.len() > self.config.batch_size
            || batch.size_bytes() > self.config.max_batch_bytes
        {
            return;
        }
        if let Some(slot) = self.slots.get(&seq)
            && slot.view == view
            && let Some(accepted) = &slot.accepted
        {
            if accepted.digest != digest {
                // Two pre-prepares for one (view, seq): the primary equivocated, provably.
                // Whatever the punishment policy, it is replaced now rather than after a
                // timeout.
                let held = accepted.pre_prepare.clone();
                self.check_conflict(&held, &pre_prepare, out);
                if self.view == view && self.view_active {
                    self.start_view_change(self.view + 1, out);
                }
            }
            return;
        }
        self.accept(seq, pre_prepare, batch, out);
        let prepare = self.sign(Statement::Prepare { view, seq, digest });
        let me = self.config.id;
        self.slot_mut(seq).prepares.insert(me, prepare.clone());
        self.broadcast_after_write(Message::Signed(prepare), out);
        self.check_prepared(seq, out);
    }

    /// Accepts a pre-prepare (the primary's own, or one received) and persists it.
    pub(super) fn accept(
        &mut self,
        seq: Seq,
        pre_prepare: Signed,
        batch: Batch,
        out: &mut Output<Message>,
    ) {
        let digest = batch.digest();
        let now = self.ticks;
        let slot = self.slot_mut(seq);
        slot.accepted_at = now;
        slot.accepted = Some(Accepted {
            pre_prepare,
            batch,
            digest,
        });
        self.save_slot(seq, out);
    }

    /// The slot of `seq`, reset to the current view if it held an older one.
    pub(super) fn slot_mut(&mut self, seq: Seq) -> &mut super::node::Slot {
        let view = self.view;
        let slot = self.slots.entry(seq).or_default();
        if slot.view != view {
            slot.view = view;
            slot.accepted = None;
            slot.prepares.clear();
            slot.commits.clear();
            slot.commit_sent = false;
        }
        slot
    }

    pub(super) fn on_prepare(&mut self, prepare: Signed, out: &mut Output<Message>) {
        let Statement::Prepare { view, seq, .. } = prepare.statement else {
            return;
        };
        // A prepare from the primary is a fault: the primary speaks through its pre-prepare.
        if !self.view_active
            || view != self.view
            || prepare.signer == self.primary()
            || !self.in_window(seq)
            || seq <= self.executed
        {
            return;
        }
        let signer = prepare.signer;
        self.relay_if_disagreeing(&prepare, out);
        match self.slot_mut(seq).prepares.get(&signer).cloned() {
            Some(held) => self.check_conflict(&held, &prepare, out),
            None => {
                self.slot_mut(seq).prepares.insert(signer, prepare);
                self.check_prepared(seq, out);
            }
        }
    }

    /// Marks `seq`'s votes for counting: at the end of the round of messages being stepped, or
    /// now when no round is (a pre-prepare of the primary's own, a new view).
    pub(super) fn check_prepared(&mut self, seq: Seq, out: &mut Output<Message>) {
        self.to_count.insert(seq);
        if !self.in_round {
            self.count_votes(out);
        }
    }

    /// Counts the votes of every slot marked since the last count, all slots in one
    /// [`VoteAggregator`](crate::gpu::VoteAggregator) batch, and takes the steps the counts
    /// allow: *prepared* (the pre-prepare, as the primary's vote, and matching prepares from
    /// a quorum) persists the certificate and sends this replica's commit; *committed-local*
    /// (matching commits from a quorum, once prepared here) executes. A slot that becomes
    /// prepared holding enough commits to commit is counted again at once.
    pub(super) fn count_votes(&mut self, out: &mut Output<Message>) {
        while !self.to_count.is_empty() {
            let seqs = std::mem::take(&mut self.to_count);
            let (ballots, votes) = self.ballots(&seqs);
            if ballots.is_empty() {
                return;
            }
            let outcome = self.aggregate(&votes);
            for (index, &(seq, phase)) in ballots.iter().enumerate() {
                let counted = outcome
                    .tally(index as u64, 0)
                    .map_or(0, |tally| tally.yes_count as usize);
                match phase {
                    Phase::Prepare if counted >= self.quorum() => self.prepared(seq, out),
                    Phase::Commit if counted >= self.commit_quorum() => self.committed(seq, out),
                    _ => {}
                }
            }
        }
    }

    /// One ballot per slot of `seqs` still waiting for a quorum in this view, and the votes
    /// that match its accepted digest: `Vote { term: ballot, proposal_id: 0, voter: rank }`.
    /// An excluded replica's votes are left out: it counts toward no quorum.
    fn ballots(&self, seqs: &BTreeSet<Seq>) -> (Vec<(Seq, Phase)>, Vec<Vote>) {
        let mut ballots = Vec::new();
        let mut votes = Vec::new();
        for &seq in seqs {
            let Some(slot) = self.slots.get(&seq) else {
                continue;
            };
            let Some(accepted) = &slot.accepted else {
                continue;
            };
            if slot.view != self.view || slot.committed.is_some() {
                continue;
            }
            let (phase, statements) = if slot.commit_sent {
                (Phase::Commit, &slot.commits)
            } else {
                (Phase::Prepare, &slot.prepares)
            };
            let ballot = ballots.len() as u64;
            let expected = Some((self.view, seq, accepted.digest));
            let mut vote = |signer| {
                if let Some(rank) = self.rank(signer)
                    && !self.excluded.contains(&signer)
                {
                    votes.push(Vote::new(rank, 0, true).in_term(ballot));
                }
            };
            if phase == Phase::Prepare {
                vote(accepted.pre_prepare.signer);
            }
            for statement in statements.values() {
                if statement.statement.phase() == expected {
                    vote(statement.signer);
                }
            }
            ballots.push((seq, phase));
        }
        (ballots, votes)
    }

    /// The configured aggregator's count, or the CPU's when its backend fails (a GPU lost
    /// mid-run says nothing about the votes).
    fn aggregate(&self, votes: &[Vote]) -> VoteOutcome {
        match futures::executor::block_on(self.config.votes.aggregate_votes(votes)) {
            Ok(outcome) => outcome,
            Err(error) => {
                tracing::warn!(node = %self.config.id, %error,
                    "vote aggregator failed; counting this round on the CPU");
                CpuVoteAggregator::new(Threshold::MajorityOfVotesCast)
                    .aggregate_blocking(votes)
                    .unwrap_or_default()
            }
        }
    }

    /// A member's rank (its index among the ranked members), the voter number of its votes.
    fn rank(&self, id: NodeId) -> Option<u32> {
        let rank = self.members.binary_search(&id).ok()?;
        u32::try_from(rank).ok()
    }

    /// Commits needed to commit locally (fewer only under an injected bug).
    fn commit_quorum(&self) -> usize {
        if self.bugs.commit_when_prepared {
            1
        } else {
            self.quorum()
        }
    }

    /// `seq` prepared in this view: persist the certificate (the pre-prepare and a quorum less
    /// one of matching prepares from distinct backups), then commit.
    fn prepared(&mut self, seq: Seq, out: &mut Output<Message>) {
        let view = self.view;
        let needed = self.quorum() - 1;
        let Some(slot) = self.slots.get(&seq) else {
            return;
        };
        let Some(accepted) = &slot.accepted else {
            return;
        };
        let matching: Vec<Signed> = slot
            .prepares
            .values()
            .filter(|p| {
                p.statement.phase() == Some((view, seq, accepted.digest))
                    && !self.excluded.contains(&p.signer)
                    && p.signer != accepted.pre_prepare.signer
            })
            .take(needed)
            .cloned()
            .collect();
        if matching.len() < needed {
            return;
        }
        let certificate = PreparedCertificate {
            pre_prepare: accepted.pre_prepare.clone(),
            batch: accepted.batch.clone(),
            prepares: matching,
        };
        let digest = accepted.digest;
        out.events.push(crate::protocol::Event::Prepared {
            view,
            sequence: seq,
            proposals: accepted.batch.requests.iter().map(|r| r.tag).collect(),
        });
        let commit = self.sign(Statement::Commit { view, seq, digest });
        let slot = self.slot_mut(seq);
        slot.prepared = Some(certificate);
        slot.commit_sent = true;
        slot.commits.insert(commit.signer, commit.clone());
        self.save_slot(seq, out);
        self.broadcast_after_write(Message::Signed(commit), out);
        // Commits that came before the prepares may already make a quorum.
        if self.slot_mut(seq).commits.len() >= self.commit_quorum() {
            self.to_count.insert(seq);
        }
    }

    pub(super) fn on_commit(&mut self, commit: Signed, out: &mut Output<Message>) {
        let Statement::Commit { view, seq, .. } = commit.statement else {
            return;
        };
        let signer = commit.signer;
        if !self.view_active || view != self.view || !self.in_window(seq) || seq <= self.executed {
            return;
        }
        self.relay_if_disagreeing(&commit, out);
        match self.slot_mut(seq).commits.get(&signer).cloned() {
            Some(held) => self.check_conflict(&held, &commit, out),
            None => {
                self.slot_mut(seq).commits.insert(signer, commit);
                self.check_committed(seq, out);
            }
        }
    }

    /// A peer voted in this view for another digest than the pre-prepare accepted here: one of
    /// the two pre-prepares is the primary's second. The primary signed it, so anyone may pass
    /// it on: send ours to that peer, which then holds both and the evidence. With it go the
    /// votes held here for our digest: a replica that voted both ways (to peers that could not
    /// hear each other, as twins do) is then caught by whoever holds its other vote.
    fn relay_if_disagreeing(&self, vote: &Signed, out: &mut Output<Message>) {
        let Some((view, seq, digest)) = vote.statement.phase() else {
            return;
        };
        if let Some(slot) = self.slots.get(&seq)
            && slot.view == view
            && let Some(accepted) = &slot.accepted
            && accepted.digest != digest
            && vote.signer != self.config.id
        {
            let message = Message::PrePrepare {
                pre_prepare: accepted.pre_prepare.clone(),
                batch: accepted.batch.clone(),
            };
            self.send(vote.signer, message, out);
            let ours = Some((view, seq, accepted.digest));
            for held in slot.prepares.values().chain(slot.commits.values()) {
                if held.statement.phase() == ours && held.signer != vote.signer {
                    self.send(vote.signer, Message::Signed(held.clone()), out);
                }
            }
        }
    }

    /// Marks `seq`'s commits for counting (see [`PbftNode::check_prepared`]).
    pub(super) fn check_committed(&mut self, seq: Seq, out: &mut Output<Message>) {
        self.check_prepared(seq, out);
    }

    /// Committed-local: prepared here and a quorum of matching commits (this replica's
    /// included): keep the batch with its commit certificate and execute what is ready.
    fn committed(&mut self, seq: Seq, out: &mut Output<Message>) {
        let needed = self.commit_quorum();
        let view = self.view;
        let Some(slot) = self.slots.get(&seq) else {
            return;
        };
        let Some(accepted) = &slot.accepted else {
            return;
        };
        let commits: Vec<Signed> = slot
            .commits
            .values()
            .filter(|c| {
                c.statement.phase() == Some((view, seq, accepted.digest))
                    && !self.excluded.contains(&c.signer)
            })
            .take(needed)
            .cloned()
            .collect();
        if commits.len() < needed {
            return;
        }
        let batch = accepted.batch.clone();
        self.slot_mut(seq).committed = Some(CommittedBatch { batch, commits });
        self.execute_ready(out);
    }

    /// Executes committed batches in order, from the one after the last executed.
    pub(super) fn execute_ready(&mut self, out: &mut Output<Message>) {
        let first = self.executed;
        while let Some(batch) = self
            .slots
            .get(&(self.executed + 1))
            .and_then(|slot| slot.committed.as_ref())
            .map(|committed| committed.batch.clone())
        {
            let seq = self.executed + 1;
            self.execute(seq, &batch, out);
            self.save_slot(seq, out);
        }
        if self.executed > first {
            self.save_executed(out);
        }
    }

    /// Appends the batch's first-seen requests to the log and to `out.committed`, and signs a
    /// checkpoint when `seq` is due for one.
    pub(super) fn execute(&mut self, seq: Seq, batch: &Batch, out: &mut Output<Message>) {
        debug_assert_eq!(seq, self.executed + 1, "batches execute in sequence order");
        let first_new = self.log.len();
        for request in &batch.requests {
            if request.tag.proposer == self.config.id {
                self.own_pending.remove(&request.tag.request_id);
            }
            self.watched.remove(&request.tag);
            if !self.applied.first_application(request.tag) {
                continue;
            }
            let entry = Entry {
                term: seq,
                index: self.log.len() as u64 + 1,
                payload: Payload::Command {
                    tag: request.tag,
                    data: request.data.clone(),
                },
            };
            self.log.push(entry);
        }
        let entries = &self.log[first_new..];
        self.state = chain_state(&self.state, seq, entries);
        out.write.append.extend_from_slice(entries);
        out.committed.extend_from_slice(entries);
        self.executed = seq;
        self.executed_in_order = seq;
        self.idle_ticks = 0;
        self.failed_views = 0;
        if seq.is_multiple_of(self.config.checkpoint_interval) {
            self.sign_checkpoint(seq, out);
        }
    }

    pub(super) fn save_executed(&mut self, out: &mut Output<Message>) {
        let value = encode(&(self.executed, self.state));
        self.put_record(records::EXECUTED.to_vec(), value, out);
    }

    /// Says again what this replica said about unfinished work, for peers that lost it; asks
    /// for a catch-up when peers proved they are ahead and nothing moved here.
    pub(super) fn retransmit(&mut self, out: &mut Output<Message>) {
        if !self.view_active {
            let recent: Vec<Signed> = self.recent_view_changes.values().cloned().collect();
            let current_is_recent = self
                .own_view_change
                .as_ref()
                .is_some_and(|own| recent.contains(own));
            for view_change in recent {
                self.broadcast_now(Message::Signed(view_change), out);
            }
            if !current_is_recent && let Some(view_change) = &self.own_view_change {
                self.broadcast_now(Message::Signed(view_change.clone()), out);
            }
        } else {
            let primary = self.is_primary();
            let mut messages = Vec::new();
            let settled = self
                .ticks
                .saturating_sub(u64::from(self.config.retransmit_ticks));
            for slot in self.slots.range(self.executed + 1..).map(|(_, slot)| slot) {
                if slot.view != self.view || slot.accepted_at > settled {
                    continue;
                }
                let Some(accepted) = &slot.accepted else {
                    continue;
                };
                if primary {
                    messages.push(Message::PrePrepare {
                        pre_prepare: accepted.pre_prepare.clone(),
                        batch: accepted.batch.clone(),
                    });
                } else if let Some(prepare) = slot.prepares.get(&self.config.id) {
                    messages.push(Message::Signed(prepare.clone()));
                }
                if let Some(commit) = slot.commits.get(&self.config.id) {
                    messages.push(Message::Signed(commit.clone()));
                }
            }
            for message in messages {
                self.broadcast_now(message, out);
            }
            if !primary {
                let requests: Vec<Request> = self
                    .own_pending
                    .values()
                    .filter(|(_, sent)| *sent <= settled)
                    .map(|(request, _)| request.clone())
                    .collect();
                if !requests.is_empty() {
                    // Waited a while: every replica hears of it, so that all of them time out
                    // on a primary that ignores it.
                    self.broadcast_now(Message::Forward(requests), out);
                }
            }
            if let Some(new_view) = &self.new_view
                && primary
                && self.slots.range(self.executed + 1..).next().is_some()
            {
                self.broadcast_now(Message::Signed(new_view.clone()), out);
            }
        }
        // The latest checkpoint this replica executed (stable or not): peers that fell behind
        // learn from it that they did, and peers still collecting votes get this one.
        if let Some((&seq, &state)) = self.own_checkpoints.iter().next_back() {
            let vote = self.sign(Statement::Checkpoint { seq, state });
            self.broadcast_now(Message::Signed(vote), out);
        } else if self.stable.seq > 0 {
            let (seq, state) = (self.stable.seq, self.stable.state);
            let vote = self.sign(Statement::Checkpoint { seq, state });
            self.broadcast_now(Message::Signed(vote), out);
        }
        if self.executed > 0 {
            let executed = self.executed;
            self.broadcast_now(Message::Progress { executed }, out);
        }
        self.repeat_evidence(out);
        self.request_catch_up(out);
    }

    /// Sends `message` to every other member now (it repeats something already durable).
    pub(super) fn broadcast_now(&self, message: Message, out: &mut Output<Message>) {
        for &to in self.members.iter().filter(|&&m| m != self.config.id) {
            self.send(to, message.clone(), out);
        }
    }
}

/// What a ballot counts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    Prepare,
    Commit,
}
