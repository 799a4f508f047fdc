//! Decoding that cannot recurse without bound. A [`Statement::NewView`] holds signed
//! statements, a view-change holds signed statements, and a [`Signed`] may hold any statement:
//! decoded naively, a message could nest new-views in new-views as deep as its bytes allow, and
//! decoding recurses once per level: a message far below the frame limit overflowed the stack
//! and aborted the process, before any signature was looked at. Honest messages nest at most
//! this deep: a new-view holds view-changes and pre-prepares, a view-change holds checkpoint
//! votes and prepared certificates, and a certificate or a catch-up holds pre-prepares,
//! prepares, commits and checkpoint votes ("leaves", which hold nothing). The fields that
//! nest decode through the types here, which mirror [`Statement`] without the variants that
//! cannot appear there (same names, same order, so every format reads them alike).

use bytes::Bytes;
use serde::{Deserialize, Deserializer};

use crate::types::NodeId;

use super::message::{Digest, Seq, Signed, Statement, View, ViewChange};

/// [`Statement`] without the variants that hold other statements.
#[derive(Deserialize)]
#[serde(rename = "Statement")]
enum Leaf {
    PrePrepare {
        view: View,
        seq: Seq,
        digest: Digest,
    },
    Prepare {
        view: View,
        seq: Seq,
        digest: Digest,
    },
    Commit {
        view: View,
        seq: Seq,
        digest: Digest,
    },
    Checkpoint {
        seq: Seq,
        state: Digest,
    },
}

impl From<Leaf> for Statement {
    fn from(leaf: Leaf) -> Statement {
        match leaf {
            Leaf::PrePrepare { view, seq, digest } => Statement::PrePrepare { view, seq, digest },
            Leaf::Prepare { view, seq, digest } => Statement::Prepare { view, seq, digest },
            Leaf::Commit { view, seq, digest } => Statement::Commit { view, seq, digest },
            Leaf::Checkpoint { seq, state } => Statement::Checkpoint { seq, state },
        }
    }
}

/// [`Statement`] without new-views: what a new-view holds.
#[derive(Deserialize)]
#[serde(rename = "Statement")]
enum InNewView {
    PrePrepare {
        view: View,
        seq: Seq,
        digest: Digest,
    },
    Prepare {
        view: View,
        seq: Seq,
        digest: Digest,
    },
    Commit {
        view: View,
        seq: Seq,
        digest: Digest,
    },
    Checkpoint {
        seq: Seq,
        state: Digest,
    },
    ViewChange(ViewChange),
}

impl From<InNewView> for Statement {
    fn from(statement: InNewView) -> Statement {
        match statement {
            InNewView::PrePrepare { view, seq, digest } => {
                Statement::PrePrepare { view, seq, digest }
            }
            InNewView::Prepare { view, seq, digest } => Statement::Prepare { view, seq, digest },
            InNewView::Commit { view, seq, digest } => Statement::Commit { view, seq, digest },
            InNewView::Checkpoint { seq, state } => Statement::Checkpoint { seq, state },
            InNewView::ViewChange(view_change) => Statement::ViewChange(view_change),
        }
    }
}

/// [`Signed`] with a statement of type `S`.
#[derive(Deserialize)]
#[serde(rename = "Signed")]
struct SignedAs<S> {
    statement: S,
    signer: NodeId,
    signature: Bytes,
}

impl<S: Into<Statement>> From<SignedAs<S>> for Signed {
    fn from(signed: SignedAs<S>) -> Signed {
        Signed {
            statement: signed.statement.into(),
            signer: signed.signer,
            signature: signed.signature,
        }
    }
}

/// Decodes a signed statement that holds no other.
pub(super) fn leaf<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Signed, D::Error> {
    SignedAs::<Leaf>::deserialize(deserializer).map(Signed::from)
}

/// Decodes signed statements that hold no others.
pub(super) fn leaves<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Vec<Signed>, D::Error> {
    let signed = Vec::<SignedAs<Leaf>>::deserialize(deserializer)?;
    Ok(signed.into_iter().map(Signed::from).collect())
}

/// Decodes the signed statements a new-view holds: anything but new-views.
pub(super) fn in_new_view<'de, D: Deserializer<'de>>(
    deserializer: D,
) -> Result<Vec<Signed>, D::Error> {
    let signed = Vec::<SignedAs<InNewView>>::deserialize(deserializer)?;
    Ok(signed.into_iter().map(Signed::from).collect())
}

#[cfg(test)]
mod tests {
    use super::super::message::{
        Batch, CheckpointProof, CommittedBatch, Message, NewView, PreparedCertificate,
    };
    use super::*;

    fn signed(statement: Statement) -> Signed {
        Signed {
            statement,
            signer: NodeId(2),
            signature: Bytes::from_static(&[9; 64]),
        }
    }

    fn new_view(view_changes: Vec<Signed>) -> Signed {
        signed(Statement::NewView(NewView {
            view: 1,
            view_changes,
            pre_prepares: vec![signed(Statement::PrePrepare {
                view: 1,
                seq: 3,
                digest: Digest::of(&[b"a"]),
            })],
        }))
    }

    #[test]
    fn every_honest_shape_decodes_as_it_was_encoded() {
        let prepare = signed(Statement::Prepare {
            view: 0,
            seq: 3,
            digest: Digest::of(&[b"a"]),
        });
        let checkpoint = CheckpointProof {
            seq: 2,
            state: Digest::of(&[b"s"]),
            votes: vec![signed(Statement::Checkpoint {
                seq: 2,
                state: Digest::of(&[b"s"]),
            })],
        };
        let view_change = signed(Statement::ViewChange(ViewChange {
            new_view: 1,
            checkpoint: checkpoint.clone(),
            prepared: vec![PreparedCertificate {
                pre_prepare: signed(Statement::PrePrepare {
                    view: 0,
                    seq: 3,
                    digest: Digest::of(&[b"a"]),
                }),
                batch: Batch::default(),
                prepares: vec![prepare.clone()],
            }],
        }));
        let commit = signed(Statement::Commit {
            view: 0,
            seq: 3,
            digest: Digest::of(&[b"a"]),
        });
        let messages = [
            Message::Signed(new_view(vec![view_change.clone(), prepare])),
            Message::Signed(view_change),
            Message::CatchUp(Box::new(super::super::message::CatchUp {
                checkpoint: Some(checkpoint),
                entries: Vec::new(),
                certified: vec![CommittedBatch {
                    batch: Batch::default(),
                    commits: vec![commit.clone()],
                }],
                pre_prepares: vec![commit],
            })),
        ];
        for message in messages {
            // The same encoding on the wire and on disk.
            let bytes = crate::encoding::to_vec(&message).unwrap();
            let decoded: Message = crate::encoding::decode_whole(&bytes).unwrap();
            assert_eq!(decoded, message);
        }
    }

    #[test]
    fn a_new_view_inside_a_new_view_does_not_decode() {
        let nested = Message::Signed(new_view(vec![new_view(Vec::new())]));
        let bytes = crate::encoding::to_vec(&nested).unwrap();
        assert!(crate::encoding::decode_whole::<Message>(&bytes).is_err());
    }

    #[test]
    fn a_deep_nesting_is_refused_at_its_second_level_without_recursing() {
        // The bytes of new-views nested 100,000 deep, built without building the value: each
        // level is the same prefix before the inner one and suffix after it.
        let inner = new_view(Vec::new());
        let outer = new_view(vec![inner.clone()]);
        let inner_bytes = crate::encoding::to_vec(&inner).unwrap();
        let outer_bytes = crate::encoding::to_vec(&outer).unwrap();
        let at = outer_bytes
            .windows(inner_bytes.len())
            .position(|w| w == inner_bytes.as_slice())
            .unwrap();
        let (prefix, suffix) = (&outer_bytes[..at], &outer_bytes[at + inner_bytes.len()..]);
        let depth = 100_000;
        let mut bytes = prefix.repeat(depth);
        bytes.extend_from_slice(&inner_bytes);
        bytes.extend_from_slice(&suffix.repeat(depth));
        assert!(crate::encoding::decode_whole::<Signed>(&bytes).is_err());
    }
}
