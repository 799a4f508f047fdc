//! Finding, checking, sharing and acting on evidence (see [`super::evidence`]).

use std::collections::BTreeMap;

use crate::protocol::{Event, Output};
use crate::types::NodeId;

use super::evidence::{Evidence, PunishmentPolicy};
use super::message::{Message, Seq, Signed, SlotDigests, Statement, View, encode};
use super::node::PbftNode;
use super::records;

/// How many views `seen` keeps statements of per signer, kind and sequence number: the
/// newest. Counted per signer so that a replica signing statements for many views can push out
/// only its own.
pub(super) const SEEN_VIEWS: usize = 6;

/// The fewest sequence numbers at or below the stable checkpoint that `seen` keeps: a window
/// of a few sequence numbers (a small checkpoint interval) moves past an offence before the
/// next audit could compare it.
const SEEN_SEQS_BELOW_STABLE_AT_LEAST: Seq = 64;

/// Sequence numbers at or below the stable checkpoint that `seen` keeps, for a window of
/// `window` sequence numbers: as many as the window holds, and at least
/// [`SEEN_SEQS_BELOW_STABLE_AT_LEAST`].
pub(super) fn seen_seqs_below_stable(window: u64) -> Seq {
    window.max(SEEN_SEQS_BELOW_STABLE_AT_LEAST)
}

/// Sequence numbers below `seen` whose statements a replica still remembers (in
/// `old_statements`), to compare with what a replica that was cut off brings back: one cut
/// off for longer than this many batches can no longer prove an offence whose other half
/// only the others saw. Bounded: this × members × 3 kinds × [`SEEN_VIEWS`] statements.
const OLD_STATEMENTS_KEPT: Seq = 1024;

/// Audits of a peer that still differ in one slot, with nothing new here, before this replica
/// answers them again (see [`PbftNode::on_audit`]).
const AUDITS_BEFORE_ANSWERING_AGAIN: u32 = 3;

/// The kind a [`SeenKey`] files a statement under: 0 pre-prepare, 1 prepare, 2 commit, 3 any
/// other (never filed).
fn statement_kind(statement: &Statement) -> u8 {
    match statement {
        Statement::PrePrepare { .. } => 0,
        Statement::Prepare { .. } => 1,
        Statement::Commit { .. } => 2,
        _ => 3,
    }
}

/// Where a phase statement is remembered: (sequence number, kind, signer, view).
pub(super) type SeenKey = (Seq, u8, NodeId, View);

impl PbftNode {
    /// Remembers every signed PRE-PREPARE, PREPARE and COMMIT in `message`, nested ones
    /// included (the certificates of view-changes, new-views and catch-ups), and turns any that
    /// conflicts with one remembered into evidence. Slots forget the statements of a view when
    /// the view changes and of a sequence number once it executes; this index keeps them from
    /// a little below the stable checkpoint to the high watermark, for the newest few views of
    /// each signer, so that two halves of an offence that reach a replica apart (a twin's two
    /// votes, one in a certificate after the partition healed) still meet, and so that
    /// [`PbftNode::audit`] can compare them with other replicas' before they go. Views are
    /// counted per signer rather than back from the current view: a replica cut off from a
    /// quorum runs through view after view alone, and the offence it must still be able to
    /// compare after the partition heals lies in the view it left. Bounded: (window + what it
    /// keeps below the window) × members × 3 kinds × [`SEEN_VIEWS`].
    pub(super) fn note_statements(&mut self, message: &Message, out: &mut Output<Message>) {
        if !self.config.detection_enabled {
            return;
        }
        let (low, high) = (self.seen_low(), self.high_watermark());
        let max_view = self.view + 1;
        let members = &self.members;
        let seen = &mut self.seen;
        let old_statements = &self.old_statements;
        let mut conflicts = Vec::new();
        // Statements noted and forgotten here, for the store (a handful per batch, beside the
        // slot record written anyway): a restart must not forget one half of an offence.
        let mut noted = Vec::new();
        let mut evicted = Vec::new();
        message.for_each_signed(&mut |signed: &Signed| {
            let kind = statement_kind(&signed.statement);
            if kind > 2 {
                return;
            }
            let Some((view, seq, _)) = signed.statement.phase() else {
                return;
            };
            if seq > high || view > max_view || members.binary_search(&signed.signer).is_err() {
                return;
            }
            if seq <= low {
                // Below the window: only compared with what was kept from it (what a replica
                // that was cut off brings back, against what this one held then).
                if let Some(held) = old_statements.get(&(seq, kind, signed.signer, view))
                    && Evidence::conflicting(held, signed)
                {
                    conflicts.push((held.clone(), signed.clone()));
                }
                return;
            }
            let signer = signed.signer;
            match seen.entry((seq, kind, signer, view)) {
                std::collections::btree_map::Entry::Vacant(entry) => {
                    entry.insert(signed.clone());
                    noted.push((seq, kind, signer, view, signed.clone()));
                }
                std::collections::btree_map::Entry::Occupied(entry) => {
                    if Evidence::conflicting(entry.get(), signed) {
                        conflicts.push((entry.get().clone(), signed.clone()));
                    }
                    return;
                }
            }
            let views = (seq, kind, signer, 0)..=(seq, kind, signer, View::MAX);
            if seen.range(views.clone()).count() > SEEN_VIEWS
                && let Some((&oldest, _)) = seen.range(views).next()
            {
                seen.remove(&oldest);
                evicted.push(oldest);
            }
        });
        for (seq, kind, signer, view, signed) in noted {
            let key = records::seen_key(seq, kind, signer, view);
            self.put_record(key, encode(&signed), out);
        }
        for (seq, kind, signer, view) in evicted {
            let key = records::seen_key(seq, kind, signer, view);
            let mut end = key.clone();
            end.push(0);
            self.delete_records(key, end, out);
        }
        for (held, new) in conflicts {
            self.check_conflict(&held, &new, out);
        }
    }

    /// The highest sequence number `seen` no longer keeps.
    pub(super) fn seen_low(&self) -> Seq {
        let window = self.config.checkpoint_interval.saturating_mul(2);
        self.stable
            .seq
            .saturating_sub(seen_seqs_below_stable(window))
    }

    /// Forgets what `seen` no longer keeps after the stable checkpoint moved.
    pub(super) fn forget_seen_below_window(&mut self, out: &mut Output<Message>) {
        let low = self.seen_low();
        let oldest_kept = low.saturating_sub(OLD_STATEMENTS_KEPT);
        // On disk both are kept, so that a restart remembers the old ones too.
        self.delete_records(
            records::seen_key(0, 0, NodeId(0), 0),
            records::seen_key(oldest_kept + 1, 0, NodeId(0), 0),
            out,
        );
        let kept = self.seen.split_off(&(low + 1, 0, NodeId(0), 0));
        let forgotten = std::mem::replace(&mut self.seen, kept);
        // Slots this replica never executed itself (its window jumped past them, on a
        // checkpoint learned from others after it was cut off): what it heard there, the
        // others may not have heard, and they forgot what they did. Sent to them, it meets
        // their `old_statements`.
        let mut unexecuted: BTreeMap<(Seq, View), Vec<Signed>> = BTreeMap::new();
        for (key, signed) in forgotten {
            let (seq, _, _, view) = key;
            if seq > self.executed_in_order {
                unexecuted
                    .entry((seq, view))
                    .or_default()
                    .push(signed.clone());
            }
            self.old_statements.insert(key, signed);
        }
        for statements in unexecuted.into_values() {
            for &to in &self.members {
                if to != self.config.id && !self.excluded.contains(&to) {
                    self.send(to, Message::Statements(statements.clone()), out);
                }
            }
        }
        self.old_statements = (self.old_statements).split_off(&(oldest_kept + 1, 0, NodeId(0), 0));
        self.audited = self.audited.split_off(&(low + 1, 0, NodeId(0)));
    }

    /// The pre-prepares this replica remembers for the window after `executed` (a peer's
    /// last executed sequence number), for a catch-up to that peer: the peer may hold another
    /// pre-prepare for one of them, and these are what proves the equivocation to it.
    pub(super) fn pre_prepares_after(&self, executed: Seq) -> Vec<Signed> {
        let last = executed.saturating_add(self.config.checkpoint_interval.saturating_mul(2));
        let range = (executed + 1, 0, NodeId(0), 0)..=(last, u8::MAX, NodeId(u64::MAX), View::MAX);
        let old = self.old_statements.range(range.clone());
        let recent = self.seen.range(range);
        old.chain(recent)
            .filter(|((_, kind, _, _), _)| *kind == 0)
            .map(|(_, signed)| signed)
            .take(self.pre_prepares_per_catch_up())
            .cloned()
            .collect()
    }

    /// The most pre-prepares a catch-up carries: as many views per sequence number of the
    /// window as `seen` keeps.
    pub(super) fn pre_prepares_per_catch_up(&self) -> usize {
        let window = usize::try_from(self.config.checkpoint_interval.saturating_mul(2));
        window.unwrap_or(usize::MAX).saturating_mul(SEEN_VIEWS)
    }

    /// Puts back into `seen` and `old_statements` what the store kept of them, and into
    /// `seen` the statements in the recovered slots' certificates.
    pub(super) fn recover_seen(&mut self) -> Result<(), crate::encoding::DecodeError> {
        let mut statements: Vec<Signed> = Vec::new();
        for (key, bytes) in self.records.range(records::SEEN_PREFIX.to_vec()..) {
            if !key.starts_with(records::SEEN_PREFIX) {
                break;
            }
            statements.push(super::message::decode(bytes)?);
        }
        for slot in self.slots.values() {
            statements.extend(slot.accepted.iter().map(|a| a.pre_prepare.clone()));
            if let Some(prepared) = &slot.prepared {
                statements.push(prepared.pre_prepare.clone());
                statements.extend(prepared.prepares.iter().cloned());
            }
            if let Some(committed) = &slot.committed {
                statements.extend(committed.commits.iter().cloned());
            }
        }
        let low = self.seen_low();
        for signed in statements {
            let kind = statement_kind(&signed.statement);
            if kind > 2 {
                continue;
            }
            if let Some((view, seq, _)) = signed.statement.phase() {
                let key = (seq, kind, signed.signer, view);
                if seq > low {
                    self.seen.insert(key, signed);
                } else {
                    self.old_statements.insert(key, signed);
                }
            }
        }
        Ok(())
    }

    /// Tells every peer which digests this replica holds statements about, per slot of
    /// `seen`. Two halves of an offence can reach different honest replicas and never meet
    /// there: a twin's two instances each talk to one part of the cluster, and an equivocating
    /// primary's two pre-prepares may each go only to replicas that do not pass them on. A
    /// replica whose own digests for a slot differ from the ones audited answers with its
    /// statements for that slot ([`PbftNode::on_audit`]); whichever of the two then holds both
    /// halves proves the offence and shares the evidence. Honest replicas' statements for a
    /// slot all name one digest, so in a healthy cluster an audit costs one message per peer
    /// per [`PbftConfig::audit_interval_ticks`](super::PbftConfig::audit_interval_ticks) and
    /// nothing more.
    pub(super) fn audit(&mut self, out: &mut Output<Message>) {
        if !self.config.detection_enabled || self.seen.is_empty() {
            return;
        }
        let slots = self.slot_digests();
        // What was sent about slots `seen` no longer holds matters no more.
        self.audited
            .retain(|&(seq, view, _), _| slots.contains_key(&(seq, view)));
        let slots: Vec<SlotDigests> = slots.into_values().collect();
        for &to in &self.members {
            if to != self.config.id && !self.excluded.contains(&to) {
                self.send(to, Message::Audit(slots.clone()), out);
            }
        }
    }

    /// Per slot of `seen`, the distinct digests its statements name, in order, and where
    /// there are several, which statement named which.
    fn slot_digests(&self) -> BTreeMap<(Seq, View), SlotDigests> {
        let mut slots: BTreeMap<(Seq, View), SlotDigests> = BTreeMap::new();
        let heard = self.seen.iter().filter(|((_, _, signer, _), _)| {
            !self.excluded.contains(signer) // proven already: nothing left to compare
        });
        for (&(seq, _, _, view), signed) in heard.clone() {
            if let Some((_, _, digest)) = signed.statement.phase() {
                let slot = slots.entry((seq, view)).or_insert_with(|| SlotDigests {
                    view,
                    seq,
                    digests: Vec::new(),
                    statements: Vec::new(),
                });
                if let Err(at) = slot.digests.binary_search(&digest) {
                    slot.digests.insert(at, digest);
                }
            }
        }
        // Contested slots only (rare: they take a Byzantine replica), in a second pass.
        for (&(seq, kind, signer, view), signed) in heard {
            if let Some(slot) = slots.get_mut(&(seq, view))
                && slot.digests.len() > 1
                && let Some((_, _, digest)) = signed.statement.phase()
            {
                slot.statements.push((kind, signer, digest));
            }
        }
        slots
    }

    /// A peer's audit: for each slot where it named a digest this replica holds no statement
    /// about, or this replica holds one the peer did not name, sends the peer this replica's
    /// statements for the slot, again only when it holds more or the peer still differs a few
    /// audits later (the peer notes them and finds any
    /// conflict; where the peer holds the other half, the next audit the other way brings it
    /// here too). A slot neither holds a statement about is skipped: there is nothing to
    /// compare.
    pub(super) fn on_audit(
        &mut self,
        from: NodeId,
        slots: Vec<SlotDigests>,
        out: &mut Output<Message>,
    ) {
        if !self.config.detection_enabled {
            return;
        }
        let low = self.seen_low();
        for slot in slots {
            if slot.seq <= low || slot.digests.is_empty() {
                continue;
            }
            let held = self
                .seen
                .range(
                    (slot.seq, 0, NodeId(0), 0)..=(slot.seq, u8::MAX, NodeId(u64::MAX), View::MAX),
                )
                .filter(|((_, _, signer, view), _)| {
                    *view == slot.view && !self.excluded.contains(signer)
                })
                .map(|(_, signed)| signed);
            // A digest the peer holds nothing about, or, in a slot contested at both, a
            // statement the peer holds another digest from.
            let differs = held.clone().any(|signed| {
                let Some((_, _, digest)) = signed.statement.phase() else {
                    return false;
                };
                slot.digests.binary_search(&digest).is_err()
                    || slot.statements.iter().any(|&(kind, signer, theirs)| {
                        signer == signed.signer
                            && kind == statement_kind(&signed.statement)
                            && theirs != digest
                    })
            });
            if !differs {
                continue;
            }
            let statements: Vec<Signed> = held.cloned().collect();
            // Sent again when something was added here since, or after a few audits that
            // still differ (the answer, or what the peer made of it, may have been lost); a
            // difference that proves nothing (one Byzantine vote for a digest no one
            // proposed) costs one answer per few audits until the window moves past it.
            let key = (slot.seq, slot.view, from);
            let (sent, audits_since) = self.audited.entry(key).or_insert((0, 0));
            if *sent == statements.len() && *audits_since < AUDITS_BEFORE_ANSWERING_AGAIN {
                *audits_since += 1;
                continue;
            }
            *sent = statements.len();
            *audits_since = 0;
            self.send(from, Message::Statements(statements), out);
        }
    }

    /// Two statements from one signer for one slot: evidence if their digests differ.
    pub(super) fn check_conflict(
        &mut self,
        held: &Signed,
        new: &Signed,
        out: &mut Output<Message>,
    ) {
        if Evidence::conflicting(held, new) {
            let evidence = Evidence::Conflicting {
                first: held.clone(),
                second: new.clone(),
            };
            self.record_evidence(evidence, out);
        }
    }

    /// Evidence received from a peer: checked here before anything is done with it. Against an
    /// offender already proven it adds nothing, except that its sender holds evidence too and
    /// does not know that this replica does: told once, it stops repeating it here.
    pub(super) fn on_evidence(
        &mut self,
        from: NodeId,
        evidence: Evidence,
        out: &mut Output<Message>,
    ) {
        let offender = evidence.offender();
        if let Some(held) = self.evidence.get(&offender) {
            if self
                .evidence_holders
                .entry(offender)
                .or_default()
                .insert(from)
            {
                self.send(from, Message::Evidence(Box::new(held.clone())), out);
            }
            return;
        }
        if self.evidence_holds(&evidence) {
            self.evidence_holders
                .entry(offender)
                .or_default()
                .insert(from);
            self.record_evidence(evidence, out);
        }
    }

    /// Repeats every piece of evidence to the peers not known to hold evidence against its
    /// offender (it may have been lost on the way). Repeating it to everyone forever cost
    /// every replica n messages per retransmission per offender, and an unjustified new-view's
    /// evidence carries a whole NEW-VIEW with its certificates. Who holds what is not
    /// persisted: a restarted replica repeats its evidence to the peers that learned before the
    /// restart that it held it (they do not answer twice), as every replica used to.
    pub(super) fn repeat_evidence(&self, out: &mut Output<Message>) {
        for (offender, evidence) in &self.evidence {
            let holders = self.evidence_holders.get(offender);
            for &to in &self.members {
                if to != self.config.id
                    && to != *offender
                    && !holders.is_some_and(|holders| holders.contains(&to))
                {
                    self.send(to, Message::Evidence(Box::new(evidence.clone())), out);
                }
            }
        }
    }

    /// True when `evidence` proves what it claims (its signatures were checked on arrival).
    pub(super) fn evidence_holds(&self, evidence: &Evidence) -> bool {
        if !self.is_member(evidence.offender()) {
            return false;
        }
        match evidence {
            Evidence::Conflicting { first, second } => Evidence::conflicting(first, second),
            Evidence::UnjustifiedNewView { new_view } => match &new_view.statement {
                Statement::NewView(body) => {
                    new_view.signer == self.primary_of(body.view)
                        && self.new_view_plan(new_view).is_none()
                }
                _ => false,
            },
        }
    }

    /// Keeps, persists and shares the first evidence against its offender, tells the driver,
    /// and, under [`PunishmentPolicy::Exclude`], stops hearing and counting the offender.
    pub(super) fn record_evidence(&mut self, evidence: Evidence, out: &mut Output<Message>) {
        let offender = evidence.offender();
        if !self.config.detection_enabled
            || offender == self.config.id
            || self.evidence.contains_key(&offender)
        {
            return;
        }
        tracing::warn!(node = %self.config.id, %offender, offence = ?evidence.offence(),
            "Byzantine behaviour proven");
        self.put_record(records::evidence_key(offender), encode(&evidence), out);
        out.events.push(Event::ByzantineDetected {
            offender,
            offence: evidence.offence().as_str(),
        });
        self.broadcast_after_write(Message::Evidence(Box::new(evidence.clone())), out);
        self.evidence.insert(offender, evidence);
        if self.config.punishment_policy == PunishmentPolicy::Exclude {
            self.exclude(offender, out);
        }
    }

    /// Forgets the offender's votes and, if it leads, replaces it now.
    fn exclude(&mut self, offender: NodeId, out: &mut Output<Message>) {
        self.excluded.insert(offender);
        for slot in self.slots.values_mut() {
            slot.prepares.remove(&offender);
            slot.commits.remove(&offender);
        }
        for votes in self.checkpoint_votes.values_mut() {
            votes.remove(&offender);
        }
        for by_signer in self.view_changes.values_mut() {
            by_signer.remove(&offender);
        }
        self.watched.retain(|tag, _| tag.proposer != offender);
        if self.primary() == offender {
            self.start_view_change(self.view + 1, out);
        }
    }

    /// The first view from `view` whose primary is not excluded (all of them, if every
    /// replica were: then exclusion cannot help).
    pub(super) fn next_view_with_honest_primary(&self, mut view: View) -> View {
        for _ in 0..self.members.len() {
            if !self.excluded.contains(&self.primary_of(view)) {
                return view;
            }
            view += 1;
        }
        view
    }
}
