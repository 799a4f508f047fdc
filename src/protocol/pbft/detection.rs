//! Finding, checking, sharing and acting on evidence (see [`super::evidence`]).

use crate::protocol::{Event, Output};
use crate::types::NodeId;

use super::evidence::{Evidence, PunishmentPolicy};
use super::message::{Message, Seq, Signed, Statement, View, encode};
use super::node::PbftNode;
use super::records;

/// How many views before the current one [`PbftNode::note_statements`] remembers.
const SEEN_VIEWS_BEHIND: View = 4;

/// Where a phase statement is remembered: (sequence number, view, kind, signer).
pub(super) type SeenKey = (Seq, View, u8, NodeId);

impl PbftNode {
    /// Remembers every signed PRE-PREPARE, PREPARE and COMMIT in `message`, nested ones
    /// included (the certificates of view-changes, new-views and catch-ups), and turns any that
    /// conflicts with one remembered into evidence. Slots forget the statements of a view when
    /// the view changes and of a sequence number once it executes; this index keeps them from
    /// the stable checkpoint to the high watermark and for a few views, so that two halves of
    /// an offence that reach a replica apart (a twin's two votes, one in a certificate after
    /// the partition healed) still meet. Bounded: window × members × 3 kinds × views kept.
    pub(super) fn note_statements(&mut self, message: &Message, out: &mut Output<Message>) {
        if !self.config.detection_enabled {
            return;
        }
        let (low, high) = (self.stable.seq, self.high_watermark());
        let (min_view, max_view) = (self.view.saturating_sub(SEEN_VIEWS_BEHIND), self.view + 1);
        if min_view > self.seen_from_view {
            self.seen.retain(|&(_, view, _, _), _| view >= min_view);
            self.seen_from_view = min_view;
        }
        let members = &self.members;
        let seen = &mut self.seen;
        let mut conflicts = Vec::new();
        message.for_each_signed(&mut |signed: &Signed| {
            let kind = match signed.statement {
                Statement::PrePrepare { .. } => 0,
                Statement::Prepare { .. } => 1,
                Statement::Commit { .. } => 2,
                _ => return,
            };
            let Some((view, seq, _)) = signed.statement.phase() else {
                return;
            };
            if seq <= low
                || seq > high
                || !(min_view..=max_view).contains(&view)
                || members.binary_search(&signed.signer).is_err()
            {
                return;
            }
            match seen.entry((seq, view, kind, signed.signer)) {
                std::collections::btree_map::Entry::Vacant(entry) => {
                    entry.insert(signed.clone());
                }
                std::collections::btree_map::Entry::Occupied(entry) => {
                    if Evidence::conflicting(entry.get(), signed) {
                        conflicts.push((entry.get().clone(), signed.clone()));
                    }
                }
            }
        });
        for (held, new) in conflicts {
            self.check_conflict(&held, &new, out);
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
