//! Checkpoints, garbage collection and catch-up.
//!
//! Every `checkpoint_interval` sequence numbers a replica signs its state chain; 2f + 1
//! matching signatures make the checkpoint stable: the low watermark moves to it and the
//! protocol state of every sequence number up to it (accepted pre-prepares, prepares, commits,
//! certificates) is dropped from memory and from the store.
//!
//! Executed entries stay: the log is the state machine's history, which a restarted replica
//! replays (the `StateMachine` trait has no snapshot yet; the snapshots issue adds one, and
//! with it the log below a checkpoint can go too). Stable checkpoint proofs stay as well, a few
//! hundred bytes each, so that a replica can prove any executed prefix to one that fell behind.
//!
//! A replica that fell behind (it was down, or cut off) learns it from peers' checkpoints and
//! commits, and asks them for what it missed ([`Message::Fetch`]). An answer
//! ([`Message::CatchUp`]) is trusted only through signatures the sender cannot forge: the
//! entries up to a stable checkpoint must rebuild the checkpoint's signed state chain from the
//! asker's own state, and each later batch comes with 2f + 1 signed commits.

use std::collections::BTreeMap;

use crate::protocol::Output;
use crate::types::{Entry, Payload};

use super::message::{
    CatchUp, CheckpointProof, Message, Seq, Signed, Statement, chain_over, encode,
};
use super::node::PbftNode;
use super::records;

/// Entries one catch-up answer carries at most (one more checkpoint's worth is always allowed,
/// so that an answer proves something).
const MAX_CATCH_UP_ENTRIES: usize = 16_384;

impl PbftNode {
    pub(super) fn sign_checkpoint(&mut self, seq: Seq, out: &mut Output<Message>) {
        let vote = self.sign(Statement::Checkpoint {
            seq,
            state: self.state,
        });
        self.own_checkpoints.insert(seq, self.state);
        self.checkpoint_votes
            .entry(seq)
            .or_default()
            .insert(self.config.id, vote.clone());
        self.broadcast_after_write(Message::Signed(vote), out);
        self.check_stable(seq, out);
    }

    pub(super) fn on_checkpoint(&mut self, vote: Signed, out: &mut Output<Message>) {
        let Statement::Checkpoint { seq, .. } = vote.statement else {
            return;
        };
        let signer = vote.signer;
        let seen = self.peers_executed.entry(signer).or_default();
        *seen = (*seen).max(seq);
        if seq <= self.stable.seq {
            return;
        }
        // Bounded memory: beyond the window, only each signer's latest vote is kept.
        if seq > self.high_watermark() {
            let high = self.high_watermark();
            for (_, votes) in self.checkpoint_votes.range_mut(high + 1..) {
                votes.remove(&signer);
            }
            self.checkpoint_votes.retain(|_, votes| !votes.is_empty());
        }
        self.checkpoint_votes
            .entry(seq)
            .or_default()
            .insert(signer, vote);
        self.check_stable(seq, out);
    }

    /// Makes the checkpoint at `seq` stable once 2f + 1 replicas signed one state for it.
    fn check_stable(&mut self, seq: Seq, out: &mut Output<Message>) {
        let Some(votes) = self.checkpoint_votes.get(&seq) else {
            return;
        };
        let mut by_state: BTreeMap<_, Vec<Signed>> = BTreeMap::new();
        for vote in votes.values() {
            if let Statement::Checkpoint { state, .. } = vote.statement {
                by_state.entry(state).or_default().push(vote.clone());
            }
        }
        let quorum = self.quorum();
        let Some((state, votes)) = by_state.into_iter().find(|(_, v)| v.len() >= quorum) else {
            return;
        };
        if self.executed >= seq && self.own_checkpoints.get(&seq) != Some(&state) {
            // 2f + 1 replicas, so at least f + 1 honest ones, hold another state than this
            // one: this replica's state is wrong, which no fault of others can cause.
            tracing::error!(node = %self.config.id, seq, "state differs from a stable checkpoint");
            return;
        }
        let proof = CheckpointProof {
            seq,
            state,
            votes: votes.into_iter().take(quorum).collect(),
        };
        self.make_stable(proof, out);
    }

    /// Moves the low watermark to `proof` and forgets what lies below it.
    pub(super) fn make_stable(&mut self, proof: CheckpointProof, out: &mut Output<Message>) {
        let seq = proof.seq;
        if seq <= self.stable.seq {
            return;
        }
        self.put_record(records::checkpoint_key(seq), encode(&proof), out);
        self.proofs.insert(seq, proof.clone());
        self.stable = proof;
        self.slots = self.slots.split_off(&(seq + 1));
        self.checkpoint_votes = self.checkpoint_votes.split_off(&(seq + 1));
        self.own_checkpoints = self.own_checkpoints.split_off(&(seq + 1));
        self.forget_seen_below_window(out);
        self.delete_records(records::slot_key(0), records::slot_key(seq + 1), out);
        self.next_seq = self.next_seq.max(seq + 1);
        if self.view_active && self.is_primary() {
            self.cut_batches(out); // the window moved
        }
    }

    /// Asks the peers that proved they are ahead for what this replica missed, when nothing
    /// executed here since the last retransmission.
    pub(super) fn request_catch_up(&mut self, out: &mut Output<Message>) {
        let stalled = self.executed == self.executed_at_retransmit;
        self.executed_at_retransmit = self.executed;
        if !stalled {
            return;
        }
        let executed = self.executed;
        let ahead: Vec<_> = self
            .peers_executed
            .iter()
            .filter(|&(_, &seq)| seq > executed)
            .map(|(&peer, _)| peer)
            .collect();
        for peer in ahead {
            self.send(peer, Message::Fetch { executed }, out);
        }
    }

    pub(super) fn on_fetch(
        &mut self,
        from: crate::types::NodeId,
        executed: Seq,
        out: &mut Output<Message>,
    ) {
        if executed >= self.executed {
            return;
        }
        let mut catch_up = CatchUp::default();
        let mut through = executed;
        // The furthest proven checkpoint whose entries fit, or else the nearest one.
        let candidates = self.proofs.range(executed + 1..=self.executed);
        let mut chosen = None;
        for (&seq, proof) in candidates {
            let entries = self.entries_between(executed, seq).len();
            if chosen.is_none() || entries <= MAX_CATCH_UP_ENTRIES {
                chosen = Some(proof);
            }
            if entries > MAX_CATCH_UP_ENTRIES {
                break;
            }
        }
        if let Some(proof) = chosen {
            catch_up.entries = self.entries_between(executed, proof.seq).to_vec();
            catch_up.checkpoint = Some(proof.clone());
            through = proof.seq;
        }
        for seq in through + 1..=self.executed {
            let Some(committed) = self.slots.get(&seq).and_then(|s| s.committed.clone()) else {
                break;
            };
            catch_up.certified.push(committed);
            if catch_up.certified.len() as u64 >= 2 * self.config.checkpoint_interval {
                break;
            }
        }
        catch_up.pre_prepares = self.pre_prepares_after(executed);
        if catch_up.checkpoint.is_some() || !catch_up.certified.is_empty() {
            self.send(from, Message::CatchUp(Box::new(catch_up)), out);
        }
    }

    /// Log entries of the sequence numbers in `(after, through]`.
    fn entries_between(&self, after: Seq, through: Seq) -> &[Entry] {
        let start = self.log.partition_point(|e| e.term <= after);
        let end = self.log.partition_point(|e| e.term <= through);
        &self.log[start..end]
    }

    /// True when `proof` holds 2f + 1 checkpoint signatures of distinct members for its
    /// (seq, state) (signatures were verified on arrival), or is the genesis checkpoint.
    pub(super) fn valid_checkpoint_proof(&self, proof: &CheckpointProof) -> bool {
        if proof.seq == 0 {
            return proof.votes.is_empty() && proof.state == super::message::Digest::default();
        }
        let expected = Statement::Checkpoint {
            seq: proof.seq,
            state: proof.state,
        };
        self.distinct_members(&proof.votes, |vote| vote.statement == expected) >= self.quorum()
            && proof.seq.is_multiple_of(self.config.checkpoint_interval)
    }

    /// How many distinct members signed a statement of `votes` that passes `matches` (all must).
    pub(super) fn distinct_members(
        &self,
        votes: &[Signed],
        matches: impl Fn(&Signed) -> bool,
    ) -> usize {
        let mut signers: Vec<_> = votes.iter().map(|v| v.signer).collect();
        signers.sort();
        signers.dedup();
        let all_match = votes
            .iter()
            .all(|vote| matches(vote) && self.is_member(vote.signer));
        if all_match && signers.len() == votes.len() {
            signers.len()
        } else {
            0
        }
    }

    pub(super) fn on_catch_up(&mut self, catch_up: CatchUp, out: &mut Output<Message>) {
        let before = self.executed;
        if let Some(proof) = catch_up.checkpoint
            && proof.seq > self.executed
            && self.valid_checkpoint_proof(&proof)
            && self.install_checkpoint_entries(&proof, &catch_up.entries, out)
        {
            self.make_stable(proof, out);
        }
        for committed in catch_up.certified {
            let Some((view, seq, digest)) =
                committed.commits.first().and_then(|c| c.statement.phase())
            else {
                break;
            };
            let expected = Statement::Commit { view, seq, digest };
            if seq != self.executed + 1
                || committed.batch.digest() != digest
                || self.distinct_members(&committed.commits, |c| c.statement == expected)
                    < self.quorum()
            {
                break;
            }
            self.execute(seq, &committed.batch, out);
            self.slots.entry(seq).or_default().committed = Some(committed);
            self.save_slot(seq, out);
        }
        if self.executed > before {
            self.execute_ready(out);
            self.save_executed(out);
        }
    }

    /// Appends `entries` (those of every sequence number after the last executed through the
    /// checkpoint) if they rebuild the checkpoint's state from this replica's own.
    fn install_checkpoint_entries(
        &mut self,
        proof: &CheckpointProof,
        entries: &[Entry],
        out: &mut Output<Message>,
    ) -> bool {
        let first_index = self.log.len() as u64 + 1;
        let well_formed = entries.iter().enumerate().all(|(i, entry)| {
            entry.index == first_index + i as u64
                && entry.term > self.executed
                && entry.term <= proof.seq
                && matches!(entry.payload, Payload::Command { .. })
        }) && entries.windows(2).all(|pair| pair[0].term <= pair[1].term);
        if !well_formed {
            return false;
        }
        if chain_over(
            self.state,
            self.executed + 1..=proof.seq,
            entries,
            |_, _| {},
        ) != proof.state
        {
            return false;
        }
        for entry in entries {
            if let Payload::Command { tag, .. } = &entry.payload {
                self.applied.first_application(*tag);
                if tag.proposer == self.config.id {
                    self.own_pending.remove(&tag.request_id);
                }
            }
        }
        self.log.extend_from_slice(entries);
        out.write.append.extend_from_slice(entries);
        out.committed.extend_from_slice(entries);
        self.executed = proof.seq;
        self.state = proof.state;
        self.idle_ticks = 0;
        true
    }
}
