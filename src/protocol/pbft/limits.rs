//! What a well-formed message looks like, checked before its signatures are: no honest replica
//! sends a certificate with more signers than there are members, more certificates than the
//! window has sequence numbers, a batch larger than the batch limits, or a pre-prepare with a
//! batch other than the one it names, or statements nested deeper than an honest message
//! nests them (see `nesting`). Anything else comes from a faulty replica, and checking
//! it first keeps the work a message costs its receiver bounded by the settings instead of by
//! the message's length (every signature in a message is verified before it is stepped).

use super::config::PbftConfig;
use super::evidence::Evidence;
use super::message::{Batch, CheckpointProof, Message, Signed, Statement, ViewChange};

/// The bounds of honest messages under one replica's settings.
pub(super) struct Limits {
    /// Members: the most signers a certificate can have.
    members: usize,
    /// Sequence numbers in the window (twice the checkpoint interval): the most certificates a
    /// view-change or catch-up holds, and the most re-proposals of a new-view.
    window: usize,
    batch_size: usize,
    max_batch_bytes: usize,
    /// The most requests one forward holds.
    max_pending_proposals: usize,
}

impl Limits {
    pub(super) fn of(config: &PbftConfig, members: usize) -> Self {
        Limits {
            members,
            window: usize::try_from(config.checkpoint_interval.saturating_mul(2))
                .unwrap_or(usize::MAX),
            batch_size: config.batch_size,
            max_batch_bytes: config.max_batch_bytes,
            max_pending_proposals: config.max_pending_proposals,
        }
    }

    /// True for a message an honest replica could have sent: within every bound, and a
    /// pre-prepare's batch is the one its signature vouches for.
    pub(super) fn admits(&self, message: &Message) -> bool {
        match message {
            Message::Forward(requests) => {
                requests.len() <= self.max_pending_proposals
                    && requests
                        .iter()
                        .all(|request| request.size_bytes() <= self.max_batch_bytes)
            }
            Message::PrePrepare { pre_prepare, batch } => {
                // Sizes first: hashing a huge batch is the work this check saves.
                self.batch_fits(batch)
                    && matches!(pre_prepare.statement,
                        Statement::PrePrepare { digest, .. } if digest == batch.digest())
            }
            Message::Signed(signed) => self.statement_fits(signed),
            Message::Progress { .. } | Message::Fetch { .. } => true,
            // What an honest replica's `seen` index can hold: per sequence number it keeps, a
            // slot per view of each statement, and at most one digest per statement of a slot.
            Message::Audit(slots) => {
                slots.len()
                    <= self
                        .seqs_seen()
                        .saturating_mul(self.statements_per_slot())
                        .saturating_mul(super::detection::SEEN_VIEWS)
                    && slots.iter().all(|slot| {
                        slot.digests.len() <= self.statements_per_slot()
                            && slot.statements.len() <= self.statements_per_slot()
                    })
            }
            // One slot's phase statements, one per member and kind at most.
            Message::Statements(statements) => {
                statements.len() <= self.statements_per_slot()
                    && statements.iter().all(|signed| {
                        matches!(
                            signed.statement,
                            Statement::PrePrepare { .. }
                                | Statement::Prepare { .. }
                                | Statement::Commit { .. }
                        )
                    })
            }
            Message::CatchUp(catch_up) => {
                catch_up
                    .checkpoint
                    .as_ref()
                    .is_none_or(|proof| self.proof_fits(proof))
                    && catch_up.certified.len() <= self.window
                    && catch_up.pre_prepares.len()
                        <= self.window.saturating_mul(super::detection::SEEN_VIEWS)
                    && catch_up
                        .pre_prepares
                        .iter()
                        .all(|signed| matches!(signed.statement, Statement::PrePrepare { .. }))
                    && catch_up.certified.iter().all(|committed| {
                        committed.commits.len() <= self.members
                            && committed.commits.iter().all(is_leaf)
                            && self.batch_fits(&committed.batch)
                    })
            }
            Message::Evidence(evidence) => match evidence.as_ref() {
                Evidence::Conflicting { first, second } => {
                    self.statement_fits(first) && self.statement_fits(second)
                }
                Evidence::UnjustifiedNewView { new_view } => self.statement_fits(new_view),
            },
        }
    }

    /// Sequence numbers a replica's `seen` index keeps: the window and some below it.
    fn seqs_seen(&self) -> usize {
        let window = self.window as u64;
        let below = super::detection::seen_seqs_below_stable(window);
        usize::try_from(window.saturating_add(below)).unwrap_or(usize::MAX)
    }

    /// Pre-prepares, prepares and commits: one of each per member.
    fn statements_per_slot(&self) -> usize {
        self.members.saturating_mul(3)
    }

    fn statement_fits(&self, signed: &Signed) -> bool {
        match &signed.statement {
            Statement::ViewChange(view_change) => self.view_change_fits(view_change),
            // Only view-changes and pre-prepares inside: a new-view nested in a new-view could
            // nest without end, and every walk over a message (signature collection, clone,
            // drop) recurses once per level. Its signer did sign it, but a message that cannot
            // be read safely proves nothing.
            Statement::NewView(new_view) => {
                new_view.view_changes.len() <= self.members
                    && new_view.pre_prepares.len() <= self.window
                    && new_view.view_changes.iter().all(|signed| {
                        matches!(&signed.statement,
                            Statement::ViewChange(view_change) if self.view_change_fits(view_change))
                    })
                    && new_view
                        .pre_prepares
                        .iter()
                        .all(|signed| matches!(signed.statement, Statement::PrePrepare { .. }))
            }
            Statement::PrePrepare { .. }
            | Statement::Prepare { .. }
            | Statement::Commit { .. }
            | Statement::Checkpoint { .. } => true,
        }
    }

    fn view_change_fits(&self, view_change: &ViewChange) -> bool {
        self.proof_fits(&view_change.checkpoint)
            && view_change.prepared.len() <= self.window
            && view_change.prepared.iter().all(|certificate| {
                certificate.prepares.len() <= self.members
                    && is_leaf(&certificate.pre_prepare)
                    && certificate.prepares.iter().all(is_leaf)
                    && self.batch_fits(&certificate.batch)
            })
    }

    fn proof_fits(&self, proof: &CheckpointProof) -> bool {
        proof.votes.len() <= self.members && proof.votes.iter().all(is_leaf)
    }

    fn batch_fits(&self, batch: &Batch) -> bool {
        batch.requests.len() <= self.batch_size && batch.size_bytes() <= self.max_batch_bytes
    }
}

/// A statement that holds no other: what certificates, checkpoint proofs and catch-ups hold
/// (the same rule decoding enforces, see `nesting`, so that whatever is admitted here can be
/// recorded and read back).
fn is_leaf(signed: &Signed) -> bool {
    !matches!(
        signed.statement,
        Statement::ViewChange(_) | Statement::NewView(_)
    )
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use bytes::Bytes;

    use super::super::message::{NewView, PreparedCertificate, Request};
    use super::super::{PbftNode, test_signing_key, test_validators};
    use super::*;
    use crate::gpu::sigverify::verify_strict_reference;
    use crate::gpu::{SigVerifyError, SignatureItem, SignatureVerifier};
    use crate::protocol::{Envelope, Protocol};
    use crate::storage::RecoveredState;
    use crate::types::{NodeId, ProposalTag};

    /// The CPU reference, counting the signatures it is asked about.
    #[derive(Default)]
    struct CountingVerifier(AtomicUsize);

    impl SignatureVerifier for CountingVerifier {
        fn verify_batch(&self, items: &[SignatureItem<'_>]) -> Result<Vec<bool>, SigVerifyError> {
            self.0.fetch_add(items.len(), Ordering::Relaxed);
            Ok(items.iter().map(verify_strict_reference).collect())
        }

        fn backend_name(&self) -> &'static str {
            "counting"
        }
    }

    fn replica(verifier: Arc<CountingVerifier>) -> PbftNode {
        let members: Vec<NodeId> = (1..=4).map(NodeId).collect();
        let mut config = PbftConfig::new(
            NodeId(2),
            members.clone(),
            test_signing_key(NodeId(2)),
            test_validators(&members),
        );
        config.checkpoint_interval = 4;
        config.batch_size = 2;
        config.max_batch_bytes = 64;
        config.verifier = verifier;
        PbftNode::new(config, RecoveredState::default()).unwrap()
    }

    fn signed(statement: Statement, by: u64) -> Signed {
        Signed::sign(statement, NodeId(by), &test_signing_key(NodeId(by)))
    }

    fn request(bytes: usize) -> Request {
        Request {
            tag: ProposalTag {
                proposer: NodeId(3),
                request_id: 1,
            },
            data: Bytes::from(vec![7; bytes]),
        }
    }

    fn pre_prepare(batch: &Batch) -> Signed {
        let digest = batch.digest();
        signed(
            Statement::PrePrepare {
                view: 0,
                seq: 1,
                digest,
            },
            1,
        )
    }

    /// (dropped, signatures the verifier was asked about) for `message` from replica 1.
    fn authenticate(message: Message) -> (usize, usize) {
        let verifier = Arc::new(CountingVerifier::default());
        let mut node = replica(Arc::clone(&verifier));
        let mut round = vec![Envelope {
            from: NodeId(1),
            to: NodeId(2),
            message,
        }];
        let dropped = node.authenticate(&mut round);
        assert_eq!(node.invalid_messages().total(), dropped as u64);
        (dropped, verifier.0.load(Ordering::Relaxed))
    }

    #[test]
    fn an_honest_pre_prepare_is_admitted_and_its_signature_checked() {
        let batch = Batch {
            requests: vec![request(8), request(8)],
        };
        let message = Message::PrePrepare {
            pre_prepare: pre_prepare(&batch),
            batch,
        };
        assert_eq!(authenticate(message), (0, 1));
    }

    #[test]
    fn a_batch_its_pre_prepare_does_not_name_or_over_the_limits_is_refused_unchecked() {
        let named = Batch {
            requests: vec![request(8)],
        };
        let other = Batch {
            requests: vec![request(9)],
        };
        let too_many = Batch {
            requests: vec![request(1); 3],
        };
        let too_big = Batch {
            requests: vec![request(64)],
        };
        for (pre_prepare, batch) in [
            (pre_prepare(&named), other),
            (pre_prepare(&too_many), too_many),
            (pre_prepare(&too_big), too_big),
        ] {
            assert_eq!(
                authenticate(Message::PrePrepare { pre_prepare, batch }),
                (1, 0)
            );
        }
        let forward = Message::Forward(vec![request(8), request(64)]);
        assert_eq!(authenticate(forward), (1, 0));
    }

    #[test]
    fn audits_and_statements_beyond_what_an_index_holds_are_refused_unchecked() {
        let digest = Batch::default().digest();
        let slot = |seq| super::super::message::SlotDigests {
            view: 0,
            seq,
            digests: vec![digest],
            statements: Vec::new(),
        };
        // 4 members, a window of 8: 72 sequence numbers kept, 12 statements each, 6 views.
        let too_many_slots = Message::Audit((0..72 * 12 * 6 + 1).map(slot).collect());
        assert_eq!(authenticate(too_many_slots), (1, 0));
        let mut crowded = slot(1);
        crowded.digests = vec![digest; 13];
        assert_eq!(authenticate(Message::Audit(vec![crowded])), (1, 0));
        assert_eq!(authenticate(Message::Audit(vec![slot(1), slot(2)])), (0, 0));
        let prepare = signed(
            Statement::Prepare {
                view: 0,
                seq: 1,
                digest,
            },
            3,
        );
        assert_eq!(
            authenticate(Message::Statements(vec![prepare.clone(); 13])),
            (1, 0)
        );
        let checkpoint = signed(
            Statement::Checkpoint {
                seq: 4,
                state: digest,
            },
            3,
        );
        assert_eq!(
            authenticate(Message::Statements(vec![prepare.clone(), checkpoint])),
            (1, 0),
            "only phase statements"
        );
        assert_eq!(authenticate(Message::Statements(vec![prepare; 2])), (0, 2));
    }

    #[test]
    fn a_certificate_with_thousands_of_prepares_costs_no_signature_check() {
        let batch = Batch::default();
        let prepare = signed(
            Statement::Prepare {
                view: 0,
                seq: 1,
                digest: batch.digest(),
            },
            3,
        );
        let certificate = PreparedCertificate {
            pre_prepare: pre_prepare(&batch),
            batch,
            prepares: (0..2_000)
                .map(|i| Signed {
                    signer: NodeId(i % 4 + 1),
                    ..prepare.clone()
                })
                .collect(),
        };
        let view_change = signed(
            Statement::ViewChange(ViewChange {
                new_view: 1,
                checkpoint: CheckpointProof::default(),
                prepared: vec![certificate.clone()],
            }),
            1,
        );
        assert_eq!(authenticate(Message::Signed(view_change)), (1, 0));
        // The same certificate with the two prepares an honest one holds is checked in full.
        let honest = PreparedCertificate {
            prepares: certificate.prepares[1..3].to_vec(),
            ..certificate
        };
        let view_change = signed(
            Statement::ViewChange(ViewChange {
                new_view: 1,
                checkpoint: CheckpointProof::default(),
                prepared: vec![honest],
            }),
            1,
        );
        let (_, checked) = authenticate(Message::Signed(view_change));
        assert_eq!(
            checked, 4,
            "the view-change, the pre-prepare and two prepares"
        );
    }

    #[test]
    fn a_new_view_nested_in_a_new_view_is_refused_unread() {
        let inner = signed(
            Statement::NewView(NewView {
                view: 5,
                view_changes: Vec::new(),
                pre_prepares: Vec::new(),
            }),
            2,
        );
        let outer = signed(
            Statement::NewView(NewView {
                view: 5,
                view_changes: vec![inner],
                pre_prepares: Vec::new(),
            }),
            2,
        );
        assert_eq!(authenticate(Message::Signed(outer)), (1, 0));
    }
}
