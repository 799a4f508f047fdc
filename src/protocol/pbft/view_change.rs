//! View changes: when the primary makes no progress, replicas move to the next view; its
//! primary gathers 2f + 1 VIEW-CHANGEs and starts the view with a NEW-VIEW whose re-proposals
//! every backup recomputes from the same VIEW-CHANGEs before it follows.
//!
//! Why a request committed in an earlier view survives: it prepared at 2f + 1 replicas, at
//! least f + 1 of them honest; any 2f + 1 VIEW-CHANGEs include one of those, whose prepared
//! certificate makes the new primary re-propose the same batch at the same sequence number (a
//! certificate of a higher view can only be for the same batch, by the same argument one view
//! later).

use std::collections::BTreeMap;

use crate::protocol::Output;
use crate::types::NodeId;

use super::evidence::Evidence;
use super::message::{
    Batch, CheckpointProof, Message, NewView, PreparedCertificate, Request, Seq, Signed, Statement,
    View, ViewChange,
};
use super::node::PbftNode;

/// How many of its own latest view-changes a replica retransmits while changing view.
const RECENT_VIEW_CHANGES: usize = 4;

/// What a new view re-proposes: the stable checkpoint it starts from, and a batch for every
/// sequence number after it up to the highest one prepared anywhere in the view-changes.
pub(super) struct Reproposals {
    pub(super) checkpoint: CheckpointProof,
    pub(super) batches: Vec<(Seq, Batch)>,
}

impl PbftNode {
    /// Stops accepting messages of the current view and asks for `target`.
    pub(super) fn start_view_change(&mut self, target: View, out: &mut Output<Message>) {
        let target = self.next_view_with_honest_primary(target);
        if target <= self.view {
            return;
        }
        self.view = target;
        self.view_active = false;
        self.new_view = None;
        self.failed_views = self.failed_views.saturating_add(1);
        self.idle_ticks = 0;
        self.queue.clear();
        self.queue_bytes = 0;
        self.forget_old_views();
        let mut prepared: Vec<PreparedCertificate> = self
            .slots
            .range(self.stable.seq + 1..)
            .filter_map(|(_, slot)| slot.prepared.clone())
            .collect();
        prepared.sort_by_key(certificate_seq);
        let view_change = self.sign(Statement::ViewChange(ViewChange {
            new_view: target,
            checkpoint: self.stable.clone(),
            prepared,
        }));
        self.own_view_change = Some(view_change.clone());
        self.recent_view_changes.insert(target, view_change.clone());
        while self.recent_view_changes.len() > RECENT_VIEW_CHANGES {
            self.recent_view_changes.pop_first();
        }
        self.view_changes.retain(|&view, _| view >= target);
        self.view_changes
            .entry(target)
            .or_default()
            .insert(self.config.id, view_change.clone());
        self.save_view(out);
        self.broadcast_after_write(Message::Signed(view_change), out);
        tracing::debug!(node = %self.config.id, view = target, "view change");
        self.maybe_send_new_view(out);
    }

    /// Drops what slots hold for views before the current one, keeping prepared certificates
    /// (a view-change carries them) and commit certificates (the batch is committed).
    fn forget_old_views(&mut self) {
        let view = self.view;
        for slot in self.slots.values_mut().filter(|slot| slot.view < view) {
            slot.view = view;
            slot.accepted = None;
            slot.prepares.clear();
            slot.commits.clear();
            slot.commit_sent = false;
        }
    }

    pub(super) fn on_view_change(&mut self, signed: Signed, out: &mut Output<Message>) {
        let Statement::ViewChange(view_change) = &signed.statement else {
            return;
        };
        let (target, signer) = (view_change.new_view, signed.signer);
        if target < self.view {
            return;
        }
        if target == self.view && self.view_active {
            // The signer missed the new-view that started this view.
            if let Some(new_view) = &self.new_view
                && self.is_primary()
            {
                self.send(signer, Message::Signed(new_view.clone()), out);
            }
            return;
        }
        // Bounded memory: one view-change per signer and view for the n views past this one
        // (a signer's view-changes for several views are all kept: replicas that are still
        // collecting for an earlier view need them), and beyond those only each signer's
        // highest. Those far ahead still count toward the f + 1 rule below: a replica cut off
        // while the others escalated view after view must be able to join them, or, once an
        // offender is excluded and every remaining replica is needed for a quorum, none can
        // ever form one.
        if !self.valid_view_change(view_change) {
            return;
        }
        let near = self.view + self.members.len() as View;
        if target > near {
            let signers_far_ahead: Vec<View> = (self.view_changes.range(near + 1..))
                .filter(|(_, by_signer)| by_signer.contains_key(&signer))
                .map(|(&view, _)| view)
                .collect();
            if signers_far_ahead.iter().any(|&view| view >= target) {
                return;
            }
            for view in signers_far_ahead {
                if let Some(by_signer) = self.view_changes.get_mut(&view) {
                    by_signer.remove(&signer);
                    if by_signer.is_empty() {
                        self.view_changes.remove(&view);
                    }
                }
            }
        }
        self.view_changes
            .entry(target)
            .or_default()
            .entry(signer)
            .or_insert_with(|| signed.clone());
        // f + 1 replicas ask for views above this one: at least one honest replica timed out,
        // so join the highest view that f + 1 of them ask for (at least), rather than wait for
        // a timeout of our own.
        let current = self.view;
        let mut highest_by_signer: BTreeMap<NodeId, View> = BTreeMap::new();
        for (&view, by_signer) in self.view_changes.range(current + 1..) {
            for &asker in by_signer.keys().filter(|&&s| s != self.config.id) {
                highest_by_signer.insert(asker, view);
            }
        }
        let mut asked: Vec<View> = highest_by_signer.into_values().collect();
        asked.sort_unstable_by(|a, b| b.cmp(a));
        if let Some(&view) = asked.get(self.f) {
            self.start_view_change(view, out);
        }
        self.maybe_send_new_view(out);
    }

    /// A view-change is well formed: a valid stable-checkpoint proof, and valid prepared
    /// certificates of earlier views inside its window, at most one per sequence number.
    pub(super) fn valid_view_change(&self, view_change: &ViewChange) -> bool {
        let checkpoint = &view_change.checkpoint;
        if !self.valid_checkpoint_proof(checkpoint) {
            return false;
        }
        let window_end = checkpoint.seq + 2 * self.config.checkpoint_interval;
        let mut last_seq = checkpoint.seq;
        for certificate in &view_change.prepared {
            let Statement::PrePrepare { view, seq, digest } = certificate.pre_prepare.statement
            else {
                return false;
            };
            let expected = Statement::Prepare { view, seq, digest };
            let primary = self.primary_of(view);
            if view >= view_change.new_view
                || seq <= last_seq
                || seq > window_end
                || certificate.pre_prepare.signer != primary
                || certificate.batch.digest() != digest
                || certificate.prepares.iter().any(|p| p.signer == primary)
                || self.distinct_members(&certificate.prepares, |p| p.statement == expected)
                    < self.quorum() - 1
            {
                return false;
            }
            last_seq = seq;
        }
        true
    }

    /// What the new view re-proposes, from its view-changes (the same computation on the new
    /// primary and on every backup).
    pub(super) fn reproposals(&self, view_changes: &[&ViewChange]) -> Reproposals {
        let checkpoint = view_changes
            .iter()
            .map(|vc| &vc.checkpoint)
            .max_by_key(|checkpoint| checkpoint.seq)
            .cloned()
            .unwrap_or_default();
        // Per sequence number, the certificate of the highest view.
        let mut best: BTreeMap<Seq, (View, &PreparedCertificate)> = BTreeMap::new();
        for certificate in view_changes.iter().flat_map(|vc| &vc.prepared) {
            let seq = certificate_seq(certificate);
            let Some((view, _, _)) = certificate.pre_prepare.statement.phase() else {
                continue;
            };
            if seq <= checkpoint.seq {
                continue;
            }
            if best
                .get(&seq)
                .is_none_or(|(best_view, _)| view > *best_view)
            {
                best.insert(seq, (view, certificate));
            }
        }
        let highest = best.keys().next_back().copied().unwrap_or(checkpoint.seq);
        let batches = (checkpoint.seq + 1..=highest)
            .map(|seq| {
                let batch = match best.get(&seq) {
                    Some((_, certificate)) if !self.bugs.new_view_drops_prepared => {
                        certificate.batch.clone()
                    }
                    _ => Batch::default(),
                };
                (seq, batch)
            })
            .collect();
        Reproposals {
            checkpoint,
            batches,
        }
    }

    /// The primary of the view being changed to starts it once 2f + 1 view-changes are in.
    fn maybe_send_new_view(&mut self, out: &mut Output<Message>) {
        if self.view_active || !self.is_primary() || self.new_view.is_some() {
            return;
        }
        let Some(by_signer) = self.view_changes.get(&self.view) else {
            return;
        };
        if by_signer.len() < self.quorum() || !by_signer.contains_key(&self.config.id) {
            return;
        }
        // Its own first, then others by id: deterministic.
        let mut chosen: Vec<Signed> = vec![by_signer[&self.config.id].clone()];
        chosen.extend(
            by_signer
                .iter()
                .filter(|&(&signer, _)| signer != self.config.id)
                .map(|(_, signed)| signed.clone())
                .take(self.quorum() - 1),
        );
        let plan = {
            let view_changes: Vec<&ViewChange> = chosen.iter().filter_map(view_change_of).collect();
            self.reproposals(&view_changes)
        };
        let view = self.view;
        let pre_prepares: Vec<Signed> = plan
            .batches
            .iter()
            .map(|(seq, batch)| {
                self.sign(Statement::PrePrepare {
                    view,
                    seq: *seq,
                    digest: batch.digest(),
                })
            })
            .collect();
        let new_view = self.sign(Statement::NewView(NewView {
            view,
            view_changes: chosen,
            pre_prepares: pre_prepares.clone(),
        }));
        self.broadcast_after_write(Message::Signed(new_view.clone()), out);
        self.enter_view(new_view, plan, pre_prepares, out);
    }

    pub(super) fn on_new_view(&mut self, signed: Signed, out: &mut Output<Message>) {
        let Statement::NewView(new_view) = &signed.statement else {
            return;
        };
        let view = new_view.view;
        if signed.signer != self.primary_of(view) {
            return;
        }
        if view < self.view || (view == self.view && self.view_active) {
            // Too late to start anything, but still checked: whether a NEW-VIEW follows from
            // its view-changes depends on the message and the cluster's parameters alone, and
            // an unjustified one that reached every honest replica after they moved on must
            // prove its primary faulty to them all the same. (Its signatures were checked with
            // the round's; this costs a pass over what it carries.)
            if !self.evidence.contains_key(&signed.signer)
                && self.new_view.as_ref() != Some(&signed)
                && self.new_view_plan(&signed).is_none()
            {
                tracing::warn!(node = %self.config.id, primary = %signed.signer, view,
                    "an old new-view's re-proposals do not follow from its view-changes");
                self.record_evidence(Evidence::UnjustifiedNewView { new_view: signed }, out);
            }
            return;
        }
        let Some((plan, pre_prepares)) = self.new_view_plan(&signed) else {
            // Signed by the primary of its view, every signature in it valid, and yet it does
            // not follow from its own view-changes: the primary's doing, provably.
            tracing::warn!(node = %self.config.id, primary = %signed.signer, view,
                "new-view re-proposals do not follow from its view-changes");
            self.record_evidence(Evidence::UnjustifiedNewView { new_view: signed }, out);
            return;
        };
        if view > self.view {
            self.view = view;
            self.forget_old_views();
        }
        self.enter_view(signed, plan, pre_prepares, out);
    }

    /// What a signed NEW-VIEW starts its view with, if it is justified: 2f + 1 valid
    /// VIEW-CHANGEs for its view from distinct members, and exactly the pre-prepares (signed by
    /// its signer) that they imply. `None` for any other NEW-VIEW.
    pub(super) fn new_view_plan(&self, signed: &Signed) -> Option<(Reproposals, Vec<Signed>)> {
        let Statement::NewView(new_view) = &signed.statement else {
            return None;
        };
        let view = new_view.view;
        let mut signers: Vec<NodeId> = Vec::new();
        let mut view_changes = Vec::new();
        for vc in &new_view.view_changes {
            let view_change = view_change_of(vc)?;
            if view_change.new_view != view
                || !self.is_member(vc.signer)
                || signers.contains(&vc.signer)
                || !self.valid_view_change(view_change)
            {
                return None;
            }
            signers.push(vc.signer);
            view_changes.push(view_change);
        }
        if signers.len() < self.quorum() {
            return None;
        }
        let plan = self.reproposals(&view_changes);
        let matches = plan.batches.len() == new_view.pre_prepares.len()
            && plan.batches.iter().zip(&new_view.pre_prepares).all(
                |((seq, batch), pre_prepare)| {
                    pre_prepare.signer == signed.signer
                        && pre_prepare.statement
                            == Statement::PrePrepare {
                                view,
                                seq: *seq,
                                digest: batch.digest(),
                            }
                },
            );
        matches.then(|| (plan, new_view.pre_prepares.clone()))
    }

    /// Starts the view of `new_view` (already checked, or made here): adopt its checkpoint,
    /// accept its re-proposals, and hand this replica's waiting requests to the primary.
    fn enter_view(
        &mut self,
        new_view: Signed,
        plan: Reproposals,
        pre_prepares: Vec<Signed>,
        out: &mut Output<Message>,
    ) {
        self.view_active = true;
        self.new_view = Some(new_view);
        self.idle_ticks = 0;
        self.queue.clear();
        self.queue_bytes = 0;
        self.forget_old_views();
        if plan.checkpoint.seq > self.stable.seq {
            // Proven by 2f + 1 signatures; if this replica has not executed that far, it
            // catches up from the replicas that have.
            let seq = plan.checkpoint.seq;
            for vc in plan.checkpoint.votes.iter() {
                let seen = self.peers_executed.entry(vc.signer).or_default();
                *seen = (*seen).max(seq);
            }
            self.make_stable(plan.checkpoint, out);
        }
        self.save_view(out);
        let primary = self.is_primary();
        let mut highest = self.stable.seq.max(self.executed);
        for ((seq, batch), pre_prepare) in plan.batches.into_iter().zip(pre_prepares) {
            highest = highest.max(seq);
            if seq <= self.executed {
                continue;
            }
            let digest = batch.digest();
            self.accept(seq, pre_prepare, batch, out);
            if !primary {
                let prepare = self.sign(Statement::Prepare {
                    view: self.view,
                    seq,
                    digest,
                });
                let me = self.config.id;
                self.slot_mut(seq).prepares.insert(me, prepare.clone());
                self.broadcast_after_write(Message::Signed(prepare), out);
            }
        }
        if primary {
            self.next_seq = highest + 1;
        }
        let waiting: Vec<_> = self.own_pending.values().map(|(r, _)| r.clone()).collect();
        if primary {
            let watched: Vec<Request> = std::mem::take(&mut self.watched).into_values().collect();
            self.on_forward(waiting, out);
            self.on_forward(watched, out);
            self.cut_batches(out);
        } else if !waiting.is_empty() {
            self.send(self.primary(), Message::Forward(waiting), out);
        }
        tracing::debug!(node = %self.config.id, view = self.view, "entered view");
    }
}

fn certificate_seq(certificate: &PreparedCertificate) -> Seq {
    certificate
        .pre_prepare
        .statement
        .phase()
        .map_or(0, |(_, seq, _)| seq)
}

fn view_change_of(signed: &Signed) -> Option<&ViewChange> {
    match &signed.statement {
        Statement::ViewChange(view_change) => Some(view_change),
        _ => None,
    }
}
