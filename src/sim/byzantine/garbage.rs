//! What a [`Behaviour::Garbage`](super::Behaviour::Garbage) replica sends beside its honest
//! messages: malformed, truncated, absurd and oversized messages, each made to fail one check of
//! the receiver. None may make an honest replica panic, stall, work without bound, or blame the
//! sender: nothing here is provable, so nothing here signs two different statements for one
//! (kind, view, sequence number) or a NEW-VIEW an honest replica would read.

use std::collections::BTreeMap;

use bytes::Bytes;
use rand::RngExt;

use crate::protocol::pbft::{
    Batch, CatchUp, CheckpointProof, Digest, Evidence, Message, NewView, PreparedCertificate,
    Request, Signed, Statement, View, ViewChange,
};
use crate::protocol::{Envelope, Protocol};
use crate::types::{NodeId, ProposalTag};

use super::{Maverick, other_batch};

/// The share of its messages a garbage replica sends garbage beside.
const GARBAGE_PER_MESSAGE: f64 = 0.25;
/// Entries of the oversized certificates: far more than any honest one holds.
const THOUSANDS: usize = 2_000;
/// Levels of the nested new-view: more than an honest message nests (the receiver's check
/// refuses it at the second; the unit tests of decoding try 100,000), few enough to sign cheaply.
const NESTED_LEVELS: usize = 8;
/// Garbage signatures remembered at most.
const SIGNATURES_KEPT: usize = 256;

/// Genuine messages of other replicas it heard lately, which garbage is made from, and what it
/// keeps of the garbage it made to save making it again.
#[derive(Debug, Default)]
pub(super) struct Heard {
    /// A pre-prepare with its batch.
    pre_prepare: Option<(Signed, Batch)>,
    /// A prepare or commit of another replica.
    vote: Option<Signed>,
    /// A new-view of another replica.
    new_view: Option<Signed>,
    /// Not heard but made, once: a request payload over the size limit.
    huge_payload: Option<Bytes>,
    /// Signatures of garbage it signed, by signed bytes (bounded).
    signatures: BTreeMap<Vec<u8>, Bytes>,
    /// Its view-change with a huge certificate.
    huge_view_change: Option<Signed>,
}

impl Heard {
    pub(super) fn hear(&mut self, message: &Message) {
        match message {
            Message::PrePrepare { pre_prepare, batch } => {
                self.pre_prepare = Some((pre_prepare.clone(), batch.clone()));
            }
            Message::Signed(signed) => match signed.statement {
                Statement::Prepare { .. } | Statement::Commit { .. } => {
                    self.vote = Some(signed.clone());
                }
                Statement::NewView(_) => self.new_view = Some(signed.clone()),
                _ => {}
            },
            _ => {}
        }
    }
}

/// The kinds of garbage, drawn uniformly.
#[derive(Clone, Copy, Debug)]
enum Kind {
    /// A copy of the message with a signature 0, 63 or 65 bytes long.
    WrongSignatureLength,
    /// Validly signed statements for views and sequence numbers near `u64::MAX` (far past the
    /// watermarks), and unsigned claims of having executed that far.
    AbsurdNumbers,
    /// A genuine pre-prepare with a batch it does not name.
    MismatchedBatch,
    /// A genuine pre-prepare with a batch over `batch_size` or `max_batch_bytes`.
    OversizedBatch,
    /// A view-change, a catch-up and a new-view with thousands of entries or nested levels.
    HugeCertificate,
    /// Forwarded requests: empty ones (valid, ordered as no-ops) or one over the size limit.
    OddRequests,
    /// Evidence that proves nothing: a statement paired with itself, a justified new-view.
    FalseEvidence,
    /// A pre-prepare without its batch, and a new-view holding a prepare where a view-change
    /// belongs.
    Misplaced,
}

const KINDS: [Kind; 8] = [
    Kind::WrongSignatureLength,
    Kind::AbsurdNumbers,
    Kind::MismatchedBatch,
    Kind::OversizedBatch,
    Kind::HugeCertificate,
    Kind::OddRequests,
    Kind::FalseEvidence,
    Kind::Misplaced,
];

impl Maverick {
    /// Now and then, a piece of garbage for the recipient of `envelope`.
    pub(super) fn maybe_garbage(
        &mut self,
        envelope: &Envelope<Message>,
    ) -> Option<Envelope<Message>> {
        if !self.rng.random_bool(GARBAGE_PER_MESSAGE) {
            return None;
        }
        let kind = KINDS[self.rng.random_range(0..KINDS.len())];
        let message = self.garbage(kind, &envelope.message)?;
        self.count(kind.name());
        Some(Envelope {
            from: envelope.from,
            to: envelope.to,
            message,
        })
    }

    fn garbage(&mut self, kind: Kind, beside: &Message) -> Option<Message> {
        Some(match kind {
            Kind::WrongSignatureLength => {
                let length = [0, 63, 65][self.rng.random_range(0..3)];
                let signature = Bytes::from(vec![0x5a; length]);
                match beside {
                    Message::PrePrepare { pre_prepare, batch } => Message::PrePrepare {
                        pre_prepare: Signed {
                            signature,
                            ..pre_prepare.clone()
                        },
                        batch: batch.clone(),
                    },
                    Message::Signed(signed) => Message::Signed(Signed {
                        signature,
                        ..signed.clone()
                    }),
                    _ => Message::Signed(Signed {
                        signature,
                        ..self.absurd_statement(0)
                    }),
                }
            }
            Kind::AbsurdNumbers => match self.rng.random_range(0..6) {
                0 => Message::Progress { executed: u64::MAX },
                1 => Message::Fetch { executed: u64::MAX },
                which => Message::Signed(self.absurd_statement(which)),
            },
            Kind::MismatchedBatch => {
                let (pre_prepare, batch) = self.a_pre_prepare(beside)?;
                Message::PrePrepare {
                    pre_prepare,
                    batch: other_batch(&batch),
                }
            }
            Kind::OversizedBatch => {
                let (pre_prepare, _) = self.a_pre_prepare(beside)?;
                Message::PrePrepare {
                    pre_prepare,
                    batch: self.oversized_batch(),
                }
            }
            Kind::HugeCertificate => match self.rng.random_range(0..3) {
                0 => Message::Signed(self.huge_view_change()),
                1 => Message::CatchUp(Box::new(CatchUp {
                    checkpoint: Some(CheckpointProof {
                        seq: self.limits.checkpoint_interval,
                        state: Digest::of(&[b"garbage state"]),
                        votes: self.thousands_of(Statement::Checkpoint {
                            seq: self.limits.checkpoint_interval,
                            state: Digest::of(&[b"garbage state"]),
                        }),
                    }),
                    ..CatchUp::default()
                })),
                _ => Message::Signed(self.nested_new_view()),
            },
            Kind::OddRequests => {
                let requests = if self.rng.random_bool(0.5) {
                    (0..3).map(|_| self.garbage_request(Bytes::new())).collect()
                } else {
                    let huge = self.huge_payload();
                    vec![self.garbage_request(huge)]
                };
                Message::Forward(requests)
            }
            Kind::FalseEvidence => {
                let evidence = match (&self.heard.vote, &self.heard.new_view) {
                    (_, Some(new_view)) if self.rng.random_bool(0.5) => {
                        Evidence::UnjustifiedNewView {
                            new_view: new_view.clone(),
                        }
                    }
                    (Some(vote), _) => Evidence::Conflicting {
                        first: vote.clone(),
                        second: vote.clone(),
                    },
                    (None, _) => return None,
                };
                Message::Evidence(Box::new(evidence))
            }
            Kind::Misplaced => {
                if let Some((pre_prepare, _)) = &self.heard.pre_prepare
                    && self.rng.random_bool(0.5)
                {
                    Message::Signed(pre_prepare.clone())
                } else {
                    let prepare = self.absurd_statement(2);
                    let mut new_view = self.sign_garbage(Statement::NewView(NewView {
                        view: self.view_not_led(),
                        view_changes: vec![prepare],
                        pre_prepares: Vec::new(),
                    }));
                    new_view.signature = Bytes::from(vec![0x5a; 65]);
                    Message::Signed(new_view)
                }
            }
        })
    }

    /// A statement of kind `which` (2 to 5) signed by this replica with numbers near
    /// `u64::MAX`, each with a digest fixed by its kind and numbers (so that two never conflict).
    fn absurd_statement(&mut self, which: u64) -> Signed {
        let far = u64::MAX - which;
        let digest = Digest::of(&[b"garbage", &which.to_be_bytes()]);
        let statement = match which {
            2 => Statement::Prepare {
                view: View::MAX,
                seq: far,
                digest,
            },
            // The current view, a sequence number far outside the watermarks.
            3 => Statement::Commit {
                view: self.node.view(),
                seq: far,
                digest,
            },
            4 => Statement::Checkpoint {
                seq: far,
                state: digest,
            },
            _ => Statement::ViewChange(ViewChange {
                new_view: View::MAX,
                checkpoint: CheckpointProof::default(),
                prepared: Vec::new(),
            }),
        };
        self.sign_garbage(statement)
    }

    /// `statement` signed by this replica, from memory when it signed the same before (garbage
    /// repeats itself, and signing is most of what making it costs).
    fn sign_garbage(&mut self, statement: Statement) -> Signed {
        let bytes = Signed::signing_bytes(&statement, self.node.id());
        if let Some(signature) = self.heard.signatures.get(&bytes) {
            return Signed {
                statement,
                signer: self.node.id(),
                signature: signature.clone(),
            };
        }
        let signed = self.sign(statement);
        if self.heard.signatures.len() >= SIGNATURES_KEPT {
            self.heard.signatures.clear();
        }
        self.heard
            .signatures
            .insert(bytes, signed.signature.clone());
        signed
    }

    /// A genuine pre-prepare: the one `beside` carries, or the last one heard.
    fn a_pre_prepare(&self, beside: &Message) -> Option<(Signed, Batch)> {
        match beside {
            Message::PrePrepare { pre_prepare, batch } => {
                Some((pre_prepare.clone(), batch.clone()))
            }
            _ => self.heard.pre_prepare.clone(),
        }
    }

    /// One request more than `batch_size`, or one request over `max_batch_bytes`.
    fn oversized_batch(&mut self) -> Batch {
        let requests = if self.rng.random_bool(0.5) {
            (0..=self.limits.batch_size)
                .map(|_| self.garbage_request(Bytes::new()))
                .collect()
        } else {
            let huge = self.huge_payload();
            vec![self.garbage_request(huge)]
        };
        Batch { requests }
    }

    /// A payload one byte over `max_batch_bytes`, made once (clones share it).
    fn huge_payload(&mut self) -> Bytes {
        let size = self.limits.max_batch_bytes + 1;
        self.heard
            .huge_payload
            .get_or_insert_with(|| Bytes::from(vec![0x47; size]))
            .clone()
    }

    /// A request in this replica's name with an id its own clients never use (theirs stay
    /// below 2^63), so that garbage is never mistaken for a client's request.
    fn garbage_request(&mut self, data: Bytes) -> Request {
        Request {
            tag: ProposalTag {
                proposer: self.node.id(),
                request_id: u64::MAX - self.rng.random_range(0..1 << 32),
            },
            data,
        }
    }

    /// A view-change with a certificate of thousands of prepares, made once (its statement is
    /// too long to remember by).
    fn huge_view_change(&mut self) -> Signed {
        if let Some(view_change) = &self.heard.huge_view_change {
            return view_change.clone();
        }
        let certificate = self.huge_certificate();
        let view_change = self.sign(Statement::ViewChange(ViewChange {
            new_view: View::MAX,
            checkpoint: CheckpointProof::default(),
            prepared: vec![certificate],
        }));
        self.heard.huge_view_change = Some(view_change.clone());
        view_change
    }

    /// A prepared certificate with thousands of prepares, every one a forgery.
    fn huge_certificate(&mut self) -> PreparedCertificate {
        let digest = Batch::default().digest();
        PreparedCertificate {
            pre_prepare: self.sign_garbage(Statement::PrePrepare {
                view: View::MAX - 1,
                seq: 1,
                digest,
            }),
            batch: Batch::default(),
            prepares: self.thousands_of(Statement::Prepare {
                view: View::MAX - 1,
                seq: 1,
                digest,
            }),
        }
    }

    /// `statement` thousands of times, in ever other signers' names, under this replica's one
    /// signature (so none verifies but its own).
    fn thousands_of(&mut self, statement: Statement) -> Vec<Signed> {
        let signed = self.sign_garbage(statement);
        let n = self.node.members().len() as u64;
        (0..THOUSANDS as u64)
            .map(|i| Signed {
                signer: NodeId(i % n + 1),
                ..signed.clone()
            })
            .collect()
    }

    /// New-views nested in new-views, each signed for a view this replica does not lead.
    fn nested_new_view(&mut self) -> Signed {
        let view = self.view_not_led();
        let mut nested = self.sign_garbage(Statement::NewView(NewView {
            view,
            view_changes: Vec::new(),
            pre_prepares: Vec::new(),
        }));
        for _ in 1..NESTED_LEVELS {
            nested = self.sign_garbage(Statement::NewView(NewView {
                view,
                view_changes: vec![nested],
                pre_prepares: Vec::new(),
            }));
        }
        nested
    }

    /// A view far ahead whose primary is another replica: a new-view of this replica for it
    /// is not even read, let alone evidence.
    fn view_not_led(&self) -> View {
        let members = self.node.members();
        let n = members.len() as u64;
        let rank = members
            .iter()
            .position(|&m| m == self.node.id())
            .unwrap_or(0) as u64;
        let far = View::MAX - View::MAX % n; // a view whose primary has rank 0
        far - n + (rank + 1) % n
    }
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::WrongSignatureLength => "garbage: wrong signature length",
            Kind::AbsurdNumbers => "garbage: absurd numbers",
            Kind::MismatchedBatch => "garbage: batch not the one named",
            Kind::OversizedBatch => "garbage: oversized batch",
            Kind::HugeCertificate => "garbage: huge certificate or nesting",
            Kind::OddRequests => "garbage: empty or huge requests",
            Kind::FalseEvidence => "garbage: evidence of nothing",
            Kind::Misplaced => "garbage: misplaced statement",
        }
    }
}
