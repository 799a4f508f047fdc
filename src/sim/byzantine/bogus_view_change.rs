//! What a [`Behaviour::BogusViewChange`](super::Behaviour::BogusViewChange) replica sends:
//!
//! - beside each of its VIEW-CHANGEs, one for the same view with a forged prepared certificate:
//!   prepares signed with its key in others' names, prepares for another view and digest, fewer
//!   prepares than the quorum needs, or a certificate for a sequence number past the window.
//!   Every honest replica must reject it and blame no one: an invalid certificate could have
//!   been put together by anyone, and nothing in it conflicts with what its sender signed;
//! - as the primary of a new view, instead of its NEW-VIEW, one that re-proposes null requests
//!   where the VIEW-CHANGEs it carries prove requests prepared. It signed it, and anyone can
//!   recompute the re-proposals from the VIEW-CHANGEs inside: every honest replica that gets
//!   it must hold the evidence ([`Evidence::UnjustifiedNewView`]) and exclude the sender.
//!
//! [`Evidence::UnjustifiedNewView`]: crate::protocol::pbft::Evidence::UnjustifiedNewView

use rand::RngExt;

use crate::protocol::pbft::{
    Batch, Digest, Message, NewView, PreparedCertificate, Seq, Signed, Statement, View, ViewChange,
};
use crate::protocol::{Envelope, Protocol};
use crate::types::NodeId;

use super::Maverick;

/// How many of its NEW-VIEWs it remembers the tampered version of.
const TAMPERED_KEPT: usize = 4;
/// How many of its VIEW-CHANGEs it remembers the forged companion of (one forgery per
/// VIEW-CHANGE, repeated with it: forging afresh for every recipient and retransmission only
/// costs signatures).
const FORGED_KEPT: usize = 8;

/// How a forged VIEW-CHANGE's certificates are wrong.
#[derive(Clone, Copy, Debug)]
enum Forgery {
    /// Prepares signed with its own key in other replicas' names.
    ForeignSigners,
    /// Its own prepares, for another view and digest than the pre-prepare's.
    WrongSlot,
    /// One prepare fewer than the 2f a certificate needs.
    TooFew,
    /// A certificate for the sequence number just past the window of its checkpoint.
    OutOfWindow,
}

impl Forgery {
    fn name(self) -> &'static str {
        match self {
            Forgery::ForeignSigners => "forged view-change: prepares in others' names",
            Forgery::WrongSlot => "forged view-change: prepares for another view and digest",
            Forgery::TooFew => "forged view-change: fewer prepares than a quorum",
            Forgery::OutOfWindow => "forged view-change: certificate past the window",
        }
    }
}

impl Maverick {
    pub(super) fn bogus_view_change(
        &mut self,
        envelope: Envelope<Message>,
        sent: &mut Vec<Envelope<Message>>,
    ) {
        let Message::Signed(signed) = &envelope.message else {
            sent.push(envelope);
            return;
        };
        match &signed.statement {
            Statement::ViewChange(view_change) => {
                let cached = self
                    .forged
                    .iter()
                    .find(|(honest, _)| *honest == signed.signature)
                    .map(|(_, forged)| forged.clone());
                let forged = match cached {
                    Some(forged) => forged,
                    None => {
                        let forged = self.forged_view_change(view_change);
                        self.forged.push((signed.signature.clone(), forged.clone()));
                        if self.forged.len() > FORGED_KEPT {
                            self.forged.remove(0);
                        }
                        forged
                    }
                };
                self.count("forged view-change sent");
                sent.push(Envelope {
                    message: Message::Signed(forged),
                    ..envelope.clone()
                });
                sent.push(envelope);
            }
            Statement::NewView(_) => match self.tampered_new_view(signed) {
                Some(tampered) => sent.push(Envelope {
                    message: Message::Signed(tampered),
                    ..envelope
                }),
                None => sent.push(envelope),
            },
            _ => sent.push(envelope),
        }
    }

    /// `view_change` with a forged certificate, signed.
    fn forged_view_change(&mut self, view_change: &ViewChange) -> Signed {
        let forgeries: &[Forgery] = if view_change.prepared.is_empty() {
            &[Forgery::ForeignSigners, Forgery::OutOfWindow]
        } else {
            &[
                Forgery::ForeignSigners,
                Forgery::WrongSlot,
                Forgery::TooFew,
                Forgery::OutOfWindow,
            ]
        };
        let forgery = forgeries[self.rng.random_range(0..forgeries.len())];
        self.count(forgery.name());
        let mut forged = view_change.clone();
        let quorum_of_prepares = 2 * self.node.f();
        match forgery {
            Forgery::ForeignSigners => {
                if forged.prepared.is_empty() {
                    forged.prepared.push(self.invented_certificate(view_change));
                }
                let me = self.node.id();
                for certificate in &mut forged.prepared {
                    for prepare in &mut certificate.prepares {
                        if prepare.signer != me {
                            prepare.signature = self.sign(prepare.statement.clone()).signature;
                        }
                    }
                }
            }
            Forgery::WrongSlot => {
                for certificate in &mut forged.prepared {
                    let seq = certificate_seq(certificate);
                    // A view no replica reaches, and a digest fixed by the sequence number:
                    // two of these never conflict with each other or with an honest prepare.
                    let prepare = self.sign(Statement::Prepare {
                        view: View::MAX,
                        seq,
                        digest: Digest::of(&[b"another view", &seq.to_be_bytes()]),
                    });
                    certificate.prepares = vec![prepare; quorum_of_prepares];
                }
            }
            Forgery::TooFew => {
                for certificate in &mut forged.prepared {
                    certificate
                        .prepares
                        .truncate(quorum_of_prepares.saturating_sub(1));
                }
            }
            Forgery::OutOfWindow => {
                let certificate = self.out_of_window_certificate(view_change);
                forged.prepared.push(certificate);
            }
        }
        self.sign(Statement::ViewChange(forged))
    }

    /// The primary of `view`.
    fn primary_of(&self, view: View) -> NodeId {
        let members = self.node.members();
        members[(view % members.len() as u64) as usize]
    }

    /// A certificate for the first sequence number after the checkpoint, in a view no replica
    /// reaches, signed with this replica's key in the names of its primary and of 2f backups.
    fn invented_certificate(&self, view_change: &ViewChange) -> PreparedCertificate {
        let view = View::MAX - 2;
        let seq = view_change.checkpoint.seq + 1;
        let digest = Batch::default().digest();
        let primary = self.primary_of(view);
        let in_name_of = |signer: NodeId, statement: Statement| Signed {
            signer,
            ..self.sign(statement)
        };
        let prepares = self
            .node
            .members()
            .iter()
            .filter(|&&m| m != primary)
            .take(2 * self.node.f())
            .map(|&backup| in_name_of(backup, Statement::Prepare { view, seq, digest }))
            .collect();
        PreparedCertificate {
            pre_prepare: in_name_of(primary, Statement::PrePrepare { view, seq, digest }),
            batch: Batch::default(),
            prepares,
        }
    }

    /// A certificate for the sequence number just past the window of the view-change's
    /// checkpoint, with its own prepares and, if it led one of the last n views, its own
    /// pre-prepare from that view (so that every signature verifies and the window is what an
    /// honest replica finds wrong; it never assigned a sequence number that far ahead there,
    /// its window then ending lower). Otherwise the pre-prepare names the view's primary, under
    /// this replica's signature.
    fn out_of_window_certificate(&self, view_change: &ViewChange) -> PreparedCertificate {
        let me = self.node.id();
        let seq: Seq = view_change.checkpoint.seq + 2 * self.limits.checkpoint_interval + 1;
        let led = (0..view_change.new_view)
            .rev()
            .take(self.node.members().len())
            .find(|&view| self.primary_of(view) == me);
        let view = led.unwrap_or(view_change.new_view.saturating_sub(1));
        let digest = Batch::default().digest();
        let statement = Statement::PrePrepare { view, seq, digest };
        let pre_prepare = Signed {
            signer: self.primary_of(view),
            ..self.sign(statement)
        };
        let prepare = self.sign(Statement::Prepare { view, seq, digest });
        PreparedCertificate {
            pre_prepare,
            batch: Batch::default(),
            prepares: vec![prepare; 2 * self.node.f()],
        }
    }

    /// The NEW-VIEW to send instead of `honest`: the same VIEW-CHANGEs, null requests at every
    /// re-proposed sequence number. `None` when the honest one re-proposes nothing but null
    /// requests (there is then no prepared request to drop).
    fn tampered_new_view(&mut self, honest: &Signed) -> Option<Signed> {
        if let Some((_, tampered)) = self
            .tampered
            .iter()
            .find(|(signature, _)| *signature == honest.signature)
        {
            return tampered.clone();
        }
        let Statement::NewView(new_view) = &honest.statement else {
            return None;
        };
        let null = Batch::default().digest();
        let phases: Vec<(View, Seq, Digest)> = new_view
            .pre_prepares
            .iter()
            .filter_map(|p| p.statement.phase())
            .collect();
        let tampered = if phases.iter().all(|&(_, _, digest)| digest == null) {
            self.count("new-view with no prepared request to drop");
            None
        } else {
            let pre_prepares = phases
                .iter()
                .map(|&(view, seq, _)| {
                    self.sign(Statement::PrePrepare {
                        view,
                        seq,
                        digest: null,
                    })
                })
                .collect();
            Some(self.sign(Statement::NewView(NewView {
                view: new_view.view,
                view_changes: new_view.view_changes.clone(),
                pre_prepares,
            })))
        };
        self.tampered
            .push((honest.signature.clone(), tampered.clone()));
        if self.tampered.len() > TAMPERED_KEPT {
            self.tampered.remove(0);
        }
        tampered
    }
}

fn certificate_seq(certificate: &PreparedCertificate) -> Seq {
    certificate
        .pre_prepare
        .statement
        .phase()
        .map_or(0, |(_, seq, _)| seq)
}
