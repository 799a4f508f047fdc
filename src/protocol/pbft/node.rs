//! [`PbftNode`]: the replica's state, its start from durable state, and the dispatch of inputs.
//! The rules live beside the state they change: `normal.rs` (pre-prepare, prepare, commit,
//! execution), `checkpoint.rs` (checkpoints, garbage collection, catch-up) and
//! `view_change.rs` (view-change and new-view).

use std::collections::{BTreeMap, VecDeque};

use crate::error::ConfigError;
use crate::gpu::SignatureItem;
use crate::gpu::sigverify::verdicts_or_reference;
use crate::gpu::votes::Threshold;
use crate::protocol::raft::AppliedProposals;
use crate::protocol::{
    Envelope, Event, Input, InvalidCounts, InvalidReason, Output, Protocol, Status,
};
use crate::storage::{HardState, RecordWrite, RecoveredState};
use crate::types::{Entry, LogIndex, NodeId, Payload};

use super::config::{InjectedBugs, PbftConfig};
use super::limits::Limits;
use super::message::{
    Batch, CheckpointProof, CommittedBatch, Digest, Message, PreparedCertificate, Request, Seq,
    Signed, Statement, View, chain_over, decode, encode,
};
use super::{Control, records};

/// What a replica knows about one sequence number.
#[derive(Clone, Debug, Default)]
pub(super) struct Slot {
    /// The view `accepted`, `prepares` and `commits` belong to.
    pub(super) view: View,
    /// The pre-prepare accepted in `view`, with its batch.
    pub(super) accepted: Option<Accepted>,
    /// Prepares of `view`, one per signer.
    pub(super) prepares: BTreeMap<NodeId, Signed>,
    /// Commits of `view`, one per signer.
    pub(super) commits: BTreeMap<NodeId, Signed>,
    /// The certificate of the highest view this slot prepared in (kept across views: a
    /// view-change must carry it).
    pub(super) prepared: Option<PreparedCertificate>,
    /// This replica sent its commit in `view`.
    pub(super) commit_sent: bool,
    /// Committed locally: the batch and its commit certificate.
    pub(super) committed: Option<CommittedBatch>,
    /// The tick at which `accepted` was set (retransmission waits a while before repeating).
    pub(super) accepted_at: u64,
}

/// An accepted pre-prepare.
#[derive(Clone, Debug)]
pub(super) struct Accepted {
    pub(super) pre_prepare: Signed,
    pub(super) batch: Batch,
    pub(super) digest: Digest,
}

/// A PBFT replica (Castro and Liskov, OSDI '99), as a sans-IO state machine.
///
/// Drive it like every core (see [`crate::protocol`]), with one more duty: every peer message
/// passes through [`Protocol::authenticate`] (a round's messages in one batch) before it is
/// stepped, because the core trusts the signatures of what it is stepped with.
pub struct PbftNode {
    pub(super) config: PbftConfig,
    /// Members ranked by id; the primary of view `v` is `members[v mod n]`.
    pub(super) members: Vec<NodeId>,
    /// Faulty replicas tolerated: n = 3f + 1 (or more; extra replicas add no tolerance, and
    /// enlarge the quorum: see [`PbftNode::quorum_size`]).
    pub(super) f: usize,
    pub(super) bugs: InjectedBugs,

    pub(super) view: View,
    /// False while this replica is changing to `view` (it sent a view-change and has not
    /// accepted a new-view yet).
    pub(super) view_active: bool,
    pub(super) slots: BTreeMap<Seq, Slot>,
    /// The primary's next sequence number to assign.
    pub(super) next_seq: Seq,
    /// Requests waiting at the primary for a batch.
    pub(super) queue: VecDeque<Request>,
    pub(super) queue_bytes: usize,
    pub(super) queue_wait_ticks: u32,

    /// Executed entries from index 1 (an entry's `term` is its batch's sequence number).
    pub(super) log: Vec<Entry>,
    pub(super) applied: AppliedProposals,
    pub(super) executed: Seq,
    /// The state chain after `executed`.
    pub(super) state: Digest,
    /// Entries not yet handed to the driver as committed (replayed after a restart).
    pub(super) replay_from: Option<LogIndex>,

    /// The latest stable checkpoint: the low watermark.
    pub(super) stable: CheckpointProof,
    /// Every stable checkpoint proof this replica holds, for replicas that catch up.
    pub(super) proofs: BTreeMap<Seq, CheckpointProof>,
    pub(super) checkpoint_votes: BTreeMap<Seq, BTreeMap<NodeId, Signed>>,
    /// This replica's state at each checkpoint it executed and that is not stable yet.
    pub(super) own_checkpoints: BTreeMap<Seq, Digest>,

    /// Valid view-changes received, by view and signer.
    pub(super) view_changes: BTreeMap<View, BTreeMap<NodeId, Signed>>,
    /// This replica's view-change for `view` (while changing, and after, for retransmission).
    pub(super) own_view_change: Option<Signed>,
    /// This replica's view-changes for the last few views it asked for, retransmitted while it
    /// changes view: replicas still collecting for an earlier view need them (a replica that
    /// ran ahead and its peers could otherwise wait on each other forever).
    pub(super) recent_view_changes: BTreeMap<View, Signed>,
    /// The new-view that started `view`, if one did.
    pub(super) new_view: Option<Signed>,
    /// View changes since the last execution: the view-change timeout doubles with each.
    pub(super) failed_views: u32,
    /// Ticks without execution progress while work is outstanding.
    pub(super) idle_ticks: u32,
    pub(super) ticks: u64,
    /// Requests received here, by request id, until they execute (re-forwarded to each new
    /// primary).
    pub(super) own_pending: BTreeMap<u64, (Request, u64)>,
    /// Other replicas' requests this replica heard of and has not seen execute, by tag: a
    /// backup that waits on them suspects the primary as a client of PBFT would, and a new
    /// primary orders them.
    pub(super) watched: BTreeMap<crate::types::ProposalTag, Request>,
    /// The highest sequence number each peer proved it executed (by a checkpoint or a commit).
    pub(super) peers_executed: BTreeMap<NodeId, Seq>,
    /// `executed` at the last retransmission: unchanged since means stalled.
    pub(super) executed_at_retransmit: Seq,

    /// The first evidence held against each offender.
    pub(super) evidence: BTreeMap<NodeId, super::Evidence>,
    /// Per offender, the peers known to hold evidence against it (they sent some here): the
    /// evidence is repeated to the others only.
    pub(super) evidence_holders: BTreeMap<NodeId, std::collections::BTreeSet<NodeId>>,
    /// Replicas whose messages are dropped and who count toward no quorum (offenders, under
    /// [`PunishmentPolicy::Exclude`](super::PunishmentPolicy::Exclude)).
    pub(super) excluded: std::collections::BTreeSet<NodeId>,
    /// The durable records as the store holds them once the pending write is durable.
    pub(super) records: BTreeMap<Vec<u8>, Vec<u8>>,
    /// Peer messages dropped unread, by reason.
    pub(super) invalid: InvalidCounts,
    /// True while a round of peer messages is being stepped: vote counts wait for its end.
    pub(super) in_round: bool,
    /// Slots whose prepares or commits changed since they were last counted.
    pub(super) to_count: std::collections::BTreeSet<Seq>,
    /// Every phase statement heard in the window and a little below it, the newest few views
    /// of each signer, for evidence (see [`PbftNode::note_statements`]).
    pub(super) seen: BTreeMap<super::detection::SeenKey, Signed>,
    /// Per (sequence number, view, peer), how many statements of that slot this replica last
    /// sent the peer after an audit, and how many of the peer's audits it let pass since (see
    /// [`PbftNode::on_audit`]).
    pub(super) audited: BTreeMap<(Seq, View, NodeId), (usize, u32)>,
    /// What `seen` forgot, for a thousand sequence numbers below it, keyed alike: compared
    /// with what replicas that were cut off bring back, and the pre-prepares go with the
    /// catch-ups this replica sends (see [`PbftNode::pre_prepares_after`]).
    pub(super) old_statements: BTreeMap<super::detection::SeenKey, Signed>,
    /// The last sequence number executed here one by one (not installed from a checkpoint
    /// that others proved).
    pub(super) executed_in_order: Seq,
    /// The leader last announced in an event.
    pub(super) announced: Option<(View, Option<NodeId>)>,
}

impl std::fmt::Debug for PbftNode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PbftNode")
            .field("id", &self.config.id)
            .field("view", &self.view)
            .field("view_active", &self.view_active)
            .field("executed", &self.executed)
            .field("stable", &self.stable.seq)
            .field("next_seq", &self.next_seq)
            .field("queued", &self.queue.len())
            .field("own_pending", &self.own_pending.len())
            .field("watched", &self.watched.len())
            .field("failed_views", &self.failed_views)
            .field("idle_ticks", &self.idle_ticks)
            .field(
                "unexecuted_slots",
                &self
                    .slots
                    .range(self.executed + 1..)
                    .take(4)
                    .map(|(seq, slot)| {
                        format!(
                            "{seq}: view {} accepted {} prepares {} commits {} prepared {} committed {}",
                            slot.view,
                            slot.accepted.is_some(),
                            slot.prepares.len(),
                            slot.commits.len(),
                            slot.prepared.is_some(),
                            slot.committed.is_some()
                        )
                    })
                    .collect::<Vec<_>>(),
            )
            .field(
                "view_changes",
                &self
                    .view_changes
                    .iter()
                    .map(|(view, by)| (*view, by.keys().copied().collect::<Vec<_>>()))
                    .collect::<Vec<_>>(),
            )
            .field(
                "checkpoint_votes",
                &self
                    .checkpoint_votes
                    .iter()
                    .map(|(seq, votes)| (*seq, votes.keys().copied().collect::<Vec<_>>()))
                    .collect::<Vec<_>>(),
            )
            .field("own_checkpoints", &self.own_checkpoints.keys().collect::<Vec<_>>())
            .field("peers_executed", &self.peers_executed)
            .finish_non_exhaustive()
    }
}

/// What the `view` record holds.
#[derive(serde::Serialize, serde::Deserialize)]
pub(super) struct ViewRecord {
    pub(super) active: bool,
    pub(super) own_view_change: Option<Signed>,
    pub(super) new_view: Option<Signed>,
    /// This replica's latest view-changes, still retransmitted after a restart.
    pub(super) recent_view_changes: Vec<Signed>,
}

/// What a `slot/` record holds.
#[derive(serde::Serialize, serde::Deserialize)]
pub(super) struct SlotRecord {
    /// The accepted pre-prepare of the slot's view, with its batch.
    pub(super) accepted: Option<(Signed, Batch)>,
    pub(super) prepared: Option<PreparedCertificate>,
    /// Once executed: the batch with its commit certificate, so that a replica restarted from
    /// its store can still prove to others what it executed since the stable checkpoint.
    pub(super) committed: Option<CommittedBatch>,
}

fn corrupt(what: &str, detail: impl std::fmt::Display) -> ConfigError {
    ConfigError::Invalid {
        field: "persistent_state",
        value: format!("{what} record: {detail}"),
        reason: "the store holds a corrupt PBFT record",
    }
}

impl PbftNode {
    /// Starts a replica from what its store recovered.
    ///
    /// # Errors
    /// Invalid settings, or recovered records that do not decode or contradict each other.
    pub fn new(config: PbftConfig, recovered: RecoveredState) -> Result<Self, ConfigError> {
        config.validate()?;
        let mut members = config.members.clone();
        members.sort();
        let f = (members.len() - 1) / 3;
        let bugs = config.bugs();
        let mut node = PbftNode {
            config,
            members,
            f,
            bugs,
            view: recovered.hard_state.term,
            view_active: true,
            slots: BTreeMap::new(),
            next_seq: 1,
            queue: VecDeque::new(),
            queue_bytes: 0,
            queue_wait_ticks: 0,
            log: Vec::new(),
            applied: AppliedProposals::new(),
            executed: 0,
            state: Digest::default(),
            replay_from: None,
            stable: CheckpointProof::default(),
            proofs: BTreeMap::new(),
            checkpoint_votes: BTreeMap::new(),
            own_checkpoints: BTreeMap::new(),
            view_changes: BTreeMap::new(),
            own_view_change: None,
            recent_view_changes: BTreeMap::new(),
            new_view: None,
            failed_views: 0,
            idle_ticks: 0,
            ticks: 0,
            own_pending: BTreeMap::new(),
            watched: BTreeMap::new(),
            peers_executed: BTreeMap::new(),
            executed_at_retransmit: 0,
            evidence: BTreeMap::new(),
            evidence_holders: BTreeMap::new(),
            excluded: std::collections::BTreeSet::new(),
            records: recovered.records.clone(),
            invalid: InvalidCounts::default(),
            in_round: false,
            to_count: Default::default(),
            seen: BTreeMap::new(),
            audited: BTreeMap::new(),
            old_statements: BTreeMap::new(),
            executed_in_order: 0,
            announced: None,
        };
        node.recover(recovered)?;
        Ok(node)
    }

    fn recover(&mut self, recovered: RecoveredState) -> Result<(), ConfigError> {
        if let Some(first) = recovered.entries.first()
            && first.index != 1
        {
            return Err(corrupt("log", "a PBFT log starts at index 1"));
        }
        for entry in &recovered.entries {
            if let Payload::Command { tag, .. } = &entry.payload {
                self.applied.first_application(*tag);
            }
        }
        self.log = recovered.entries;
        if !self.log.is_empty() {
            self.replay_from = Some(1);
        }
        if let Some(bytes) = self.records.get(records::EXECUTED) {
            let (executed, state): (Seq, Digest) =
                decode(bytes).map_err(|e| corrupt("executed", e))?;
            self.executed = executed;
            self.state = state;
        }
        self.executed_in_order = self.executed;
        if self.log.last().is_some_and(|e| e.term > self.executed) {
            return Err(corrupt("executed", "the log holds entries past it"));
        }
        for (key, bytes) in self.records.range(records::CHECKPOINT_PREFIX.to_vec()..) {
            if !key.starts_with(records::CHECKPOINT_PREFIX) {
                break;
            }
            let proof: CheckpointProof = decode(bytes).map_err(|e| corrupt("checkpoint", e))?;
            if proof.seq > self.stable.seq {
                self.stable = proof.clone();
            }
            self.proofs.insert(proof.seq, proof);
        }
        let evidence: Vec<super::Evidence> = self
            .records
            .range(records::EVIDENCE_PREFIX.to_vec()..)
            .take_while(|(key, _)| key.starts_with(records::EVIDENCE_PREFIX))
            .map(|(_, bytes)| decode(bytes).map_err(|e| corrupt("evidence", e)))
            .collect::<Result<_, ConfigError>>()?;
        for evidence in evidence {
            let offender = evidence.offender();
            if self.config.punishment_policy == super::PunishmentPolicy::Exclude {
                self.excluded.insert(offender);
            }
            self.evidence.insert(offender, evidence);
        }
        if let Some(bytes) = self.records.get(records::VIEW) {
            let record: ViewRecord = decode(bytes).map_err(|e| corrupt("view", e))?;
            self.view_active = record.active;
            self.own_view_change = record.own_view_change;
            self.new_view = record.new_view;
            for signed in record.recent_view_changes {
                if let Statement::ViewChange(view_change) = &signed.statement {
                    self.recent_view_changes
                        .insert(view_change.new_view, signed.clone());
                }
            }
            // Its own view-change counts toward the view it is changing to, as before the
            // crash (without it a new primary would wait for itself forever).
            if let Some(own) = &self.own_view_change
                && let Statement::ViewChange(view_change) = &own.statement
                && view_change.new_view == self.view
            {
                self.view_changes
                    .entry(self.view)
                    .or_default()
                    .insert(self.config.id, own.clone());
            }
        }
        let slot_records: Vec<(Seq, SlotRecord)> = self
            .records
            .range(records::SLOT_PREFIX.to_vec()..)
            .take_while(|(key, _)| key.starts_with(records::SLOT_PREFIX))
            .map(|(key, bytes)| {
                let seq = records::seq_of(key).ok_or_else(|| corrupt("slot", "bad key"))?;
                let record = decode(bytes).map_err(|e| corrupt("slot", e))?;
                Ok((seq, record))
            })
            .collect::<Result<_, ConfigError>>()?;
        for (seq, record) in slot_records {
            let slot = self.slots.entry(seq).or_default();
            slot.prepared = record.prepared;
            slot.committed = record.committed;
            if let Some((pre_prepare, batch)) = record.accepted
                && let Some((view, _, digest)) = pre_prepare.statement.phase()
                && view == self.view
            {
                slot.view = view;
                slot.accepted = Some(Accepted {
                    pre_prepare,
                    batch,
                    digest,
                });
                self.next_seq = self.next_seq.max(seq + 1);
            }
        }
        // Nothing at or below the stable checkpoint is proposed again: its slot records are
        // gone, and a checkpoint learned from others can lie past what this replica executed,
        // so a primary that restarted would otherwise sign a second pre-prepare for a sequence
        // number it had already proposed in this view.
        self.next_seq = self.next_seq.max(self.executed.max(self.stable.seq) + 1);
        self.recover_own_checkpoints();
        self.recover_seen().map_err(|e| corrupt("seen", e))?;
        Ok(())
    }

    /// Re-derives the checkpoints executed here and not stable yet (they live only in memory),
    /// with this replica's vote for each: without them a cluster whose replicas restarted
    /// between executing a checkpoint and seeing it stable would never make it stable, and its
    /// primary would stop at the high watermark for good.
    fn recover_own_checkpoints(&mut self) {
        let interval = self.config.checkpoint_interval;
        let entries = &self.log[self.log.partition_point(|e| e.term <= self.stable.seq)..];
        let mut checkpoints = Vec::new();
        let state = chain_over(
            self.stable.state,
            self.stable.seq + 1..=self.executed,
            entries,
            |seq, state| {
                if seq.is_multiple_of(interval) {
                    checkpoints.push((seq, state));
                }
            },
        );
        for (seq, state) in checkpoints {
            self.own_checkpoints.insert(seq, state);
            let vote = self.sign(Statement::Checkpoint { seq, state });
            self.checkpoint_votes
                .entry(seq)
                .or_default()
                .insert(self.config.id, vote);
        }
        if state != self.state {
            tracing::error!(node = %self.config.id, executed = self.executed,
                "the log does not rebuild the recorded state chain");
        }
    }

    /// The ranked members.
    pub fn members(&self) -> &[NodeId] {
        &self.members
    }

    /// Faulty replicas tolerated.
    pub fn f(&self) -> usize {
        self.f
    }

    /// The current view.
    pub fn view(&self) -> View {
        self.view
    }

    /// The primary of the current view.
    pub fn primary(&self) -> NodeId {
        self.primary_of(self.view)
    }

    /// True while this replica is changing view.
    pub fn is_changing_view(&self) -> bool {
        !self.view_active
    }

    /// The last sequence number executed.
    pub fn executed_seq(&self) -> Seq {
        self.executed
    }

    /// The state chain after [`PbftNode::executed_seq`] (see
    /// [`chain_state`](super::message::chain_state)).
    pub fn state_digest(&self) -> Digest {
        self.state
    }

    /// The sequence number of the latest stable checkpoint (the low watermark).
    pub fn stable_checkpoint(&self) -> Seq {
        self.stable.seq
    }

    /// Executed entries, from index 1.
    pub fn log(&self) -> &[Entry] {
        &self.log
    }

    /// The evidence this replica holds, one piece per offender.
    pub fn evidence(&self) -> &BTreeMap<NodeId, super::Evidence> {
        &self.evidence
    }

    /// Replicas this replica no longer hears or counts.
    pub fn excluded(&self) -> &std::collections::BTreeSet<NodeId> {
        &self.excluded
    }

    /// Sequence numbers this replica holds protocol state for (bounded by the watermarks).
    pub fn slots_held(&self) -> usize {
        self.slots.len()
    }

    #[cfg(test)]
    pub(super) fn clone_records(&self) -> BTreeMap<Vec<u8>, Vec<u8>> {
        self.records.clone()
    }

    pub(super) fn primary_of(&self, view: View) -> NodeId {
        self.members[(view % self.members.len() as u64) as usize]
    }

    pub(super) fn is_primary(&self) -> bool {
        self.primary() == self.config.id
    }

    /// The quorum: 2f + 1 for n = 3f + 1.
    pub(super) fn quorum(&self) -> usize {
        self.quorum_size()
    }

    /// Replicas in a quorum: the smallest q with 2q − n > f, so that any two quorums share an
    /// honest replica. That is 2f + 1 when n = 3f + 1, and more for the sizes between (n = 5
    /// and 6 tolerate f = 1 but need 4 and 5): with 2f + 1 there, two quorums of 3 out of 5
    /// meet in one replica, which may be the faulty one, and an equivocating primary could
    /// commit two batches at one sequence number.
    pub fn quorum_size(&self) -> usize {
        Threshold::byzantine_quorum(self.members.len() as u64) as usize
    }

    /// The high watermark: the last sequence number this replica accepts.
    pub(super) fn high_watermark(&self) -> Seq {
        self.stable.seq + 2 * self.config.checkpoint_interval
    }

    pub(super) fn in_window(&self, seq: Seq) -> bool {
        seq > self.stable.seq && seq <= self.high_watermark()
    }

    pub(super) fn is_member(&self, id: NodeId) -> bool {
        self.members.binary_search(&id).is_ok()
    }

    pub(super) fn sign(&self, statement: Statement) -> Signed {
        Signed::sign_and_tell(
            statement,
            self.config.id,
            &self.config.signing_key,
            Some(&*self.config.verifier),
        )
    }

    /// Sends `message` to every other member once `out.write` is durable.
    pub(super) fn broadcast_after_write(&self, message: Message, out: &mut Output<Message>) {
        for &to in self.members.iter().filter(|&&m| m != self.config.id) {
            out.messages_after_write.push(Envelope {
                from: self.config.id,
                to,
                message: message.clone(),
            });
        }
    }

    pub(super) fn send(&self, to: NodeId, message: Message, out: &mut Output<Message>) {
        out.messages.push(Envelope {
            from: self.config.id,
            to,
            message,
        });
    }

    /// Records `value` under `key` in the pending write and in the mirror.
    pub(super) fn put_record(&mut self, key: Vec<u8>, value: Vec<u8>, out: &mut Output<Message>) {
        self.write_record(RecordWrite::Put { key, value }, out);
    }

    /// Deletes the records in `[from, to)`, writing nothing when there are none.
    pub(super) fn delete_records(&mut self, from: Vec<u8>, to: Vec<u8>, out: &mut Output<Message>) {
        if self
            .records
            .range(from.clone()..to.clone())
            .next()
            .is_some()
        {
            self.write_record(RecordWrite::DeleteRange { from, to }, out);
        }
    }

    /// Applies `write` to the mirror, as the store will, and queues it for the store.
    fn write_record(&mut self, write: RecordWrite, out: &mut Output<Message>) {
        write.apply(&mut self.records);
        out.write.records.push(write);
    }

    /// Persists what the replica knows about `seq` (before it says anything about it).
    pub(super) fn save_slot(&mut self, seq: Seq, out: &mut Output<Message>) {
        let Some(slot) = self.slots.get(&seq) else {
            return;
        };
        let record = SlotRecord {
            accepted: slot
                .accepted
                .as_ref()
                .map(|a| (a.pre_prepare.clone(), a.batch.clone())),
            prepared: slot.prepared.clone(),
            committed: slot.committed.clone().filter(|_| seq <= self.executed),
        };
        let value = encode(&record);
        self.put_record(records::slot_key(seq), value, out);
    }

    /// Persists the view, whether it is active, and what this replica said to change it.
    pub(super) fn save_view(&mut self, out: &mut Output<Message>) {
        out.write.hard_state = Some(HardState {
            term: self.view,
            voted_for: None,
        });
        let record = ViewRecord {
            active: self.view_active,
            own_view_change: self.own_view_change.clone(),
            new_view: self.new_view.clone(),
            recent_view_changes: self.recent_view_changes.values().cloned().collect(),
        };
        let value = encode(&record);
        self.put_record(records::VIEW.to_vec(), value, out);
    }

    /// Announces the primary when it changed since the last announcement.
    pub(super) fn announce_leader(&mut self, out: &mut Output<Message>) {
        let leader = self.view_active.then(|| self.primary());
        if self.announced != Some((self.view, leader)) {
            self.announced = Some((self.view, leader));
            out.events.push(Event::LeaderChanged {
                term: self.view,
                leader,
            });
        }
    }

    fn on_message(&mut self, from: NodeId, message: Message, out: &mut Output<Message>) {
        if !self.is_member(from) || from == self.config.id {
            self.invalid.add(InvalidReason::UnknownSigner, 1);
            return;
        }
        // An excluded replica is not heard, except when it relays evidence (checked alone).
        if self.excluded.contains(&from) && !matches!(message, Message::Evidence(_)) {
            self.invalid.add(InvalidReason::Excluded, 1);
            return;
        }
        if self.is_stale(&message) {
            // Counted only: the handlers drop what they cannot use, and keep what they can
            // (a late pre-prepare of an old view may still complete evidence).
            self.invalid.add(InvalidReason::Stale, 1);
        }
        self.note_statements(&message, out);
        match message {
            Message::Forward(requests) => self.on_forward(requests, out),
            Message::PrePrepare { pre_prepare, batch } => {
                self.on_pre_prepare(pre_prepare, batch, out)
            }
            Message::Signed(signed) => {
                if !self.is_member(signed.signer) {
                    self.invalid.add(InvalidReason::UnknownSigner, 1);
                    return;
                }
                if self.excluded.contains(&signed.signer) {
                    self.invalid.add(InvalidReason::Excluded, 1);
                    return;
                }
                match &signed.statement {
                    Statement::Prepare { .. } => self.on_prepare(signed, out),
                    Statement::Commit { .. } => self.on_commit(signed, out),
                    Statement::Checkpoint { .. } => self.on_checkpoint(signed, out),
                    Statement::ViewChange(_) => self.on_view_change(signed, out),
                    Statement::NewView(_) => self.on_new_view(signed, out),
                    // A pre-prepare travels with its batch, never alone.
                    Statement::PrePrepare { .. } => {}
                }
            }
            Message::Progress { executed } => {
                let seen = self.peers_executed.entry(from).or_default();
                *seen = (*seen).max(executed);
            }
            Message::Fetch { executed } => self.on_fetch(from, executed, out),
            Message::CatchUp(catch_up) => self.on_catch_up(*catch_up, out),
            Message::Evidence(evidence) => self.on_evidence(from, *evidence, out),
            Message::Audit(slots) => self.on_audit(from, slots, out),
            // Noted above, which is all they are for.
            Message::Statements(_) => {}
        }
    }

    /// A normal-case statement about a view before this replica's or a sequence number at or
    /// below its stable checkpoint.
    fn is_stale(&self, message: &Message) -> bool {
        let phase = match message {
            Message::PrePrepare { pre_prepare, .. } => pre_prepare.statement.phase(),
            Message::Signed(signed) => signed.statement.phase(),
            _ => None,
        };
        phase.is_some_and(|(view, seq, _)| view < self.view || seq <= self.stable.seq)
    }

    fn on_tick(&mut self, out: &mut Output<Message>) {
        self.ticks += 1;
        if self.view_active && self.is_primary() && !self.queue.is_empty() {
            self.queue_wait_ticks += 1;
            if self.queue_wait_ticks >= self.config.batch_timeout_ticks {
                self.cut_batches(out);
            }
        }
        // While changing view, the timer runs only once 2f + 1 replicas asked for this view
        // (Castro and Liskov §4.5.2): a replica that ran ahead alone waits for the others
        // instead of escalating further from them.
        let view_change_gathered = self
            .view_changes
            .get(&self.view)
            .is_some_and(|by_signer| by_signer.len() >= self.quorum());
        if !self.has_outstanding_work() {
            self.idle_ticks = 0;
        } else if self.view_active || view_change_gathered {
            self.idle_ticks += 1;
        }
        // Doubled per view change without progress, up to 8 times the base: unbounded doubling
        // left a cluster that lost several primaries in a row (crashed, or silent Byzantine
        // ones) waiting tens of seconds for a primary that was already back.
        let timeout = self
            .config
            .view_change_timeout_ticks
            .saturating_mul(1 << self.failed_views.min(3));
        if self.idle_ticks >= timeout {
            self.idle_ticks = 0;
            self.start_view_change(self.view + 1, out);
        }
        if self
            .ticks
            .is_multiple_of(u64::from(self.config.retransmit_ticks))
        {
            self.retransmit(out);
        }
        if self
            .ticks
            .is_multiple_of(u64::from(self.config.audit_interval_ticks.max(1)))
        {
            self.audit(out);
        }
    }

    /// Work this replica waits on: its own or others' requests, an accepted batch not executed
    /// yet, or a view change in progress.
    fn has_outstanding_work(&self) -> bool {
        !self.view_active
            || !self.own_pending.is_empty()
            || !self.watched.is_empty()
            || self.slots.range(self.executed + 1..).any(|(_, slot)| {
                slot.view == self.view && (slot.accepted.is_some() || !slot.commits.is_empty())
            })
    }

    /// Hands the driver entries recovered from the store, once, for its state machine.
    fn replay(&mut self, out: &mut Output<Message>) {
        if let Some(from) = self.replay_from.take() {
            out.committed
                .extend(self.log[(from as usize - 1)..].iter().cloned());
        }
    }

    /// Checks the signatures of `messages` in one batch and keeps only the well-formed
    /// messages whose every signature (nested ones included) verifies under the signer's
    /// validator key. Returns how many were dropped.
    pub(super) fn authenticate_batch(&mut self, messages: &mut Vec<Envelope<Message>>) -> usize {
        // (message index, signing bytes, key, signature) for every signature of every message.
        let mut owners = Vec::new();
        let mut bytes = Vec::new();
        let mut keys_and_signatures = Vec::new();
        let mut refused: Vec<Option<InvalidReason>> = vec![None; messages.len()];
        let limits = Limits::of(&self.config, self.members.len());
        for (index, envelope) in messages.iter().enumerate() {
            // Refused before its signatures cost anything (see `limits`).
            if !limits.admits(&envelope.message) {
                refused[index] = Some(InvalidReason::Malformed);
                continue;
            }
            envelope.message.for_each_signed(&mut |signed: &Signed| {
                let key = self.config.validators.get(&signed.signer);
                let signature: Option<[u8; 64]> = signed.signature.as_ref().try_into().ok();
                match (key, signature) {
                    (Some(key), Some(signature)) => {
                        owners.push(index);
                        bytes.push(Signed::signing_bytes(&signed.statement, signed.signer));
                        keys_and_signatures.push((key.to_bytes(), signature));
                    }
                    (None, _) => {
                        refused[index].get_or_insert(InvalidReason::UnknownSigner);
                    }
                    (_, None) => {
                        refused[index].get_or_insert(InvalidReason::Malformed);
                    }
                }
            });
        }
        let items: Vec<SignatureItem<'_>> = bytes
            .iter()
            .zip(&keys_and_signatures)
            .map(|(message, &(public_key, signature))| SignatureItem {
                public_key,
                message,
                signature,
            })
            .collect();
        let verdicts = verdicts_or_reference(&*self.config.verifier, &items);
        crate::protocol::drop_refused(messages, refused, owners, verdicts, &mut self.invalid)
    }
}

impl Protocol for PbftNode {
    type Message = Message;
    type Control = Control;

    fn carried_proposals(
        message: &Message,
        _sender: NodeId,
        visit: &mut dyn FnMut(crate::types::ProposalTag),
    ) -> crate::protocol::Carriage {
        use crate::protocol::Carriage;
        let (requests, carriage) = match message {
            Message::Forward(requests) => (requests, Carriage::Forwarded),
            Message::PrePrepare { batch, .. } => (&batch.requests, Carriage::Entries),
            _ => return Carriage::Nothing,
        };
        for request in requests {
            visit(request.tag);
        }
        carriage
    }

    fn id(&self) -> NodeId {
        self.config.id
    }

    fn step(&mut self, input: Input<Message, Control>, out: &mut Output<Message>) {
        self.replay(out);
        match input {
            Input::Tick => self.on_tick(out),
            Input::Message(envelope) => self.on_message(envelope.from, envelope.message, out),
            Input::Propose { request_id, data } => self.on_propose(request_id, data, out),
            // A read outside the log would have to be answered by f + 1 matching replicas,
            // which one replica's driver cannot gather: reads are ordered like writes.
            Input::Read { request_id } => out.rejected.push(crate::protocol::Rejection {
                request_id,
                reason: crate::protocol::RejectReason::ReadsThroughLog,
            }),
            Input::Control(control) => match control {},
            Input::FlushProposals => {
                if self.view_active && self.is_primary() {
                    self.cut_batches(out);
                }
            }
            // Nothing waits for a durability acknowledgement: every signed statement leaves
            // only after the write that records it (`messages_after_write`).
            Input::Durable { .. } | Input::HardStateDurable(_) => {}
            // A view change needs f + 1 replicas' timeouts, which a hint from one replica's
            // transport cannot stand in for: the primary is replaced on the usual timer.
            Input::PeerUnreachable { .. } => {}
            // PBFT keeps its own checkpoints and never compacts the shared log's way.
            Input::SnapshotTaken(_) => {}
        }
        self.announce_leader(out);
    }

    const AUTHENTICATES: bool = true;

    fn authenticate(&mut self, messages: &mut Vec<Envelope<Message>>) -> usize {
        self.authenticate_batch(messages)
    }

    /// Steps the round's messages, then counts every slot's prepares and commits that they
    /// changed in one vote-aggregator batch.
    fn step_round(&mut self, messages: &mut Vec<Envelope<Message>>, out: &mut Output<Message>) {
        self.in_round = true;
        for envelope in messages.drain(..) {
            self.step(Input::Message(envelope), out);
        }
        self.in_round = false;
        self.count_votes(out);
        self.announce_leader(out);
    }

    fn invalid_messages(&self) -> InvalidCounts {
        self.invalid
    }

    fn status(&self) -> Status {
        Status {
            term: self.view,
            leader: self.view_active.then(|| self.primary()),
            is_leader: self.view_active && self.is_primary(),
            commit_index: self.log.len() as LogIndex,
            log_entries: self.log.len() as u64,
        }
    }

    fn into_recovered_state(self) -> RecoveredState {
        RecoveredState {
            hard_state: HardState {
                term: self.view,
                voted_for: None,
            },
            entries: self.log,
            records: self.records,
            snapshot: None,
        }
    }
}
