//! What PBFT replicas say to each other, and how it is signed.
//!
//! Every statement that can commit a replica (pre-prepare, prepare, commit, checkpoint,
//! view-change, new-view) is a [`Statement`] inside a [`Signed`]: the statement, its signer,
//! and an ed25519 signature over a domain tag, the signer and the statement's postcard bytes.
//! Statements are kept whole inside certificates, so that two of them signed by one replica
//! that contradict each other are, together, evidence anyone can check alone.
//!
//! Requests forwarded to the primary and state-transfer messages are not signed: they carry
//! no promise, and what they deliver is checked against signed statements (a batch against the
//! digest in a signed pre-prepare, transferred entries against signed checkpoints and commits).

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use crate::gpu::sigverify::{SignatureVerifier, sign_and_tell};
use crate::types::{Entry, NodeId, ProposalTag};

/// A PBFT view. The primary of view `v` is member `v mod n`.
pub type View = u64;
/// A PBFT sequence number: the position of a batch in the total order. The first batch is 1.
pub type Seq = u64;

/// Separates our signatures from any other use of the same key.
const SIGNING_DOMAIN: &[u8] = b"stratoswarm-consensus/pbft/v1";

/// A SHA-256 digest.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
pub struct Digest(pub [u8; 32]);

impl Digest {
    /// SHA-256 of the concatenation of `parts`.
    pub fn of(parts: &[&[u8]]) -> Digest {
        let mut hasher = Sha256::new();
        for part in parts {
            hasher.update(part);
        }
        Digest(hasher.finalize().into())
    }
}

/// A client's command with the tag that routes its answer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Request {
    /// Who waits for it.
    pub tag: ProposalTag,
    /// The command.
    pub data: Bytes,
}

impl Request {
    /// Bytes this request counts toward batch limits.
    pub fn size_bytes(&self) -> usize {
        self.data.len() + 16
    }
}

/// The requests ordered at one sequence number. An empty batch is the null request a new
/// primary proposes for a gap.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Batch {
    /// In execution order.
    pub requests: Vec<Request>,
}

impl Batch {
    /// The digest a pre-prepare names.
    pub fn digest(&self) -> Digest {
        Digest::of(&[b"batch", &encode(self)])
    }

    /// Bytes of all requests.
    pub fn size_bytes(&self) -> usize {
        self.requests.iter().map(Request::size_bytes).sum()
    }
}

/// The state after executing `seq`: a hash chain over every sequence number executed and the
/// log entries it appended (none for a null request or a batch of duplicates). Honest replicas
/// execute the same batches in the same order and filter duplicates alike, so they hold the
/// same chain; a replica that fetches entries checks them against it.
pub fn chain_state(previous: &Digest, seq: Seq, entries: &[Entry]) -> Digest {
    Digest::of(&[
        b"state",
        &previous.0,
        &seq.to_be_bytes(),
        &Digest::of(&[&encode(&entries)]).0,
    ])
}

/// [`chain_state`] from `state` through every sequence number of `seqs`, taking each one's
/// entries from the front of `entries` (in order, an entry's `term` being its sequence
/// number); `at_each` sees the state after each.
pub fn chain_over(
    mut state: Digest,
    seqs: std::ops::RangeInclusive<Seq>,
    mut entries: &[Entry],
    mut at_each: impl FnMut(Seq, Digest),
) -> Digest {
    for seq in seqs {
        let count = entries.partition_point(|e| e.term == seq);
        state = chain_state(&state, seq, &entries[..count]);
        entries = &entries[count..];
        at_each(seq, state);
    }
    state
}

/// What a replica signs.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Statement {
    /// The primary of `view` assigns the batch with `digest` to `seq`.
    PrePrepare {
        /// The view.
        view: View,
        /// The sequence number.
        seq: Seq,
        /// The batch's digest.
        digest: Digest,
    },
    /// A backup accepted that pre-prepare.
    Prepare {
        /// The view.
        view: View,
        /// The sequence number.
        seq: Seq,
        /// The batch's digest.
        digest: Digest,
    },
    /// The signer holds a prepared certificate for it.
    Commit {
        /// The view.
        view: View,
        /// The sequence number.
        seq: Seq,
        /// The batch's digest.
        digest: Digest,
    },
    /// The signer's state after executing `seq`.
    Checkpoint {
        /// A multiple of the checkpoint interval.
        seq: Seq,
        /// [`chain_state`] after it.
        state: Digest,
    },
    /// The signer asks to move to `new_view`.
    ViewChange(ViewChange),
    /// The primary of a view starts it.
    NewView(NewView),
}

impl Statement {
    /// (view, seq, digest) of a pre-prepare, prepare or commit.
    pub fn phase(&self) -> Option<(View, Seq, Digest)> {
        match *self {
            Statement::PrePrepare { view, seq, digest }
            | Statement::Prepare { view, seq, digest }
            | Statement::Commit { view, seq, digest } => Some((view, seq, digest)),
            _ => None,
        }
    }
}

/// A statement with its signer and signature.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Signed {
    /// What was said.
    pub statement: Statement,
    /// Who said it.
    pub signer: NodeId,
    /// 64 bytes of ed25519 over [`Signed::signing_bytes`]; any other length never verifies.
    pub signature: Bytes,
}

impl Signed {
    /// Signs `statement` as `signer`.
    pub fn sign(statement: Statement, signer: NodeId, key: &ed25519_dalek::SigningKey) -> Signed {
        Self::sign_and_tell(statement, signer, key, None)
    }

    /// [`Signed::sign`], also telling `verifier` of the signature (see
    /// [`SignatureVerifier::signed_here`]).
    pub(crate) fn sign_and_tell(
        statement: Statement,
        signer: NodeId,
        key: &ed25519_dalek::SigningKey,
        verifier: Option<&dyn SignatureVerifier>,
    ) -> Signed {
        let bytes = Self::signing_bytes(&statement, signer);
        let signature = sign_and_tell(key, &bytes, verifier);
        Signed {
            statement,
            signer,
            signature: Bytes::copy_from_slice(&signature),
        }
    }

    /// The bytes a signature covers.
    pub fn signing_bytes(statement: &Statement, signer: NodeId) -> Vec<u8> {
        let mut bytes = SIGNING_DOMAIN.to_vec();
        bytes.extend_from_slice(&signer.0.to_be_bytes());
        bytes.extend_from_slice(&encode(statement));
        bytes
    }

    /// Every signed statement inside this one, this one included (a view-change holds
    /// checkpoint and prepared certificates, a new-view holds view-changes and pre-prepares).
    pub fn for_each_signed<'a>(&'a self, visit: &mut impl FnMut(&'a Signed)) {
        visit(self);
        match &self.statement {
            Statement::ViewChange(view_change) => view_change.for_each_signed(visit),
            Statement::NewView(new_view) => {
                for signed in new_view.view_changes.iter().chain(&new_view.pre_prepares) {
                    signed.for_each_signed(visit);
                }
            }
            _ => {}
        }
    }
}

/// Proof that a checkpoint is stable: 2f + 1 signed checkpoints with one (seq, state). The
/// genesis checkpoint (seq 0, the zero digest) needs no votes.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckpointProof {
    /// The checkpoint's sequence number.
    pub seq: Seq,
    /// The state after it.
    pub state: Digest,
    /// The signed [`Statement::Checkpoint`]s.
    #[serde(deserialize_with = "super::nesting::leaves")]
    pub votes: Vec<Signed>,
}

/// Proof that a batch prepared: the primary's pre-prepare, the batch, and 2f prepares from
/// distinct backups.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PreparedCertificate {
    /// The signed [`Statement::PrePrepare`].
    #[serde(deserialize_with = "super::nesting::leaf")]
    pub pre_prepare: Signed,
    /// The batch it names.
    pub batch: Batch,
    /// The signed [`Statement::Prepare`]s.
    #[serde(deserialize_with = "super::nesting::leaves")]
    pub prepares: Vec<Signed>,
}

/// A VIEW-CHANGE: the signer's stable checkpoint and what prepared after it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ViewChange {
    /// The view asked for.
    pub new_view: View,
    /// The signer's latest stable checkpoint.
    pub checkpoint: CheckpointProof,
    /// For each sequence number after the checkpoint that prepared at the signer, the
    /// certificate of the highest view it prepared in.
    pub prepared: Vec<PreparedCertificate>,
}

impl ViewChange {
    fn for_each_signed<'a>(&'a self, visit: &mut impl FnMut(&'a Signed)) {
        for vote in &self.checkpoint.votes {
            visit(vote);
        }
        for certificate in &self.prepared {
            visit(&certificate.pre_prepare);
            for prepare in &certificate.prepares {
                visit(prepare);
            }
        }
    }
}

/// A NEW-VIEW: the 2f + 1 view-changes that justify it and the pre-prepares they imply.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NewView {
    /// The view it starts.
    pub view: View,
    /// Signed [`Statement::ViewChange`]s for `view` from distinct replicas.
    #[serde(deserialize_with = "super::nesting::in_new_view")]
    pub view_changes: Vec<Signed>,
    /// Signed [`Statement::PrePrepare`]s in `view`, one per re-proposed sequence number, in
    /// order. Every backup recomputes them from `view_changes` and refuses any difference.
    #[serde(deserialize_with = "super::nesting::leaves")]
    pub pre_prepares: Vec<Signed>,
}

/// Committed batches and their proof, sent to a replica that fell behind.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CatchUp {
    /// A stable checkpoint after the asker's last executed sequence number, if the sender has
    /// one; with `entries`, the log entries of every sequence number up to it.
    pub checkpoint: Option<CheckpointProof>,
    /// Log entries after the asker's last executed sequence number through the checkpoint, in
    /// index order (an entry's `term` is the sequence number of its batch).
    pub entries: Vec<Entry>,
    /// Batches executed after the checkpoint, each with its commit certificate.
    pub certified: Vec<CommittedBatch>,
    /// The signed PRE-PREPAREs of the first sequence numbers the catch-up covers, as far as
    /// the sender remembers them: the asker may hold another pre-prepare for one of them (an
    /// equivocating primary's, while the two were cut apart), and these are what it proves
    /// the equivocation with before its window moves past them. They vouch for nothing else.
    #[serde(deserialize_with = "super::nesting::leaves")]
    pub pre_prepares: Vec<Signed>,
}

/// A batch with 2f + 1 signed commits for it from one view.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommittedBatch {
    /// The batch.
    pub batch: Batch,
    /// The signed [`Statement::Commit`]s.
    #[serde(deserialize_with = "super::nesting::leaves")]
    pub commits: Vec<Signed>,
}

/// A PBFT message.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Message {
    /// Clients' requests handed to the primary by the replica that received them.
    Forward(Vec<Request>),
    /// A signed pre-prepare with the batch it names.
    PrePrepare {
        /// The signed [`Statement::PrePrepare`].
        pre_prepare: Signed,
        /// The batch.
        batch: Batch,
    },
    /// A prepare, commit, checkpoint, view-change or new-view.
    Signed(Signed),
    /// "I executed through `executed`", sent now and then so that a replica that missed the
    /// end of the work learns it fell behind. Unsigned: a lie costs the liar's peers one
    /// [`Message::Fetch`] each, which it then answers with nothing.
    Progress {
        /// The sender's last executed sequence number.
        executed: Seq,
    },
    /// "I executed through `executed`; send me what committed after it."
    Fetch {
        /// The asker's last executed sequence number.
        executed: Seq,
    },
    /// The answer to a [`Message::Fetch`].
    CatchUp(Box<CatchUp>),
    /// Proof that a replica misbehaved, passed on to every replica.
    Evidence(Box<super::Evidence>),
    /// Which digests the sender holds statements about, per slot of its window: sent now and
    /// then so that two halves of an offence held by different replicas meet (see
    /// `PbftNode::audit`). Unsigned: a lie costs its receiver one [`Message::Statements`].
    Audit(Vec<SlotDigests>),
    /// The signed PRE-PREPAREs, PREPAREs and COMMITs the sender holds for one slot, sent to a
    /// replica whose [`Message::Audit`] named a digest there that the sender did not hold.
    Statements(Vec<Signed>),
}

/// The digests named by the statements a replica holds for one (view, sequence number).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SlotDigests {
    /// The view.
    pub view: View,
    /// The sequence number.
    pub seq: Seq,
    /// Distinct, in ascending order; one unless someone signed two statements for the slot.
    pub digests: Vec<Digest>,
    /// Where `digests` holds more than one: which statement named which, as (kind: 0
    /// pre-prepare, 1 prepare, 2 commit; signer; digest). Two replicas can each hold both
    /// digests of a contested slot, from different signers; only this tells them apart.
    pub statements: Vec<(u8, NodeId, Digest)>,
}

impl Message {
    /// Every signed statement the message carries, nested ones included.
    pub fn for_each_signed<'a>(&'a self, visit: &mut impl FnMut(&'a Signed)) {
        match self {
            Message::Forward(_)
            | Message::Progress { .. }
            | Message::Fetch { .. }
            | Message::Audit(_) => {}
            Message::Statements(statements) => statements.iter().for_each(visit),
            Message::PrePrepare { pre_prepare, .. } => visit(pre_prepare),
            Message::Signed(signed) => signed.for_each_signed(visit),
            Message::Evidence(evidence) => evidence.for_each_signed(visit),
            Message::CatchUp(catch_up) => {
                if let Some(checkpoint) = &catch_up.checkpoint {
                    checkpoint.votes.iter().for_each(&mut *visit);
                }
                for batch in &catch_up.certified {
                    batch.commits.iter().for_each(&mut *visit);
                }
                catch_up.pre_prepares.iter().for_each(&mut *visit);
            }
        }
    }
}

/// postcard bytes of a value whose encoding cannot fail (plain data: no maps with failing
/// keys, no sequences of unknown length).
pub(crate) fn encode<T: Serialize + ?Sized>(value: &T) -> Vec<u8> {
    // Invariant: postcard fails only on serializers it does not support (unknown-length
    // sequences) or a full fixed buffer; `to_stdvec` grows its buffer, and every type encoded
    // here derives `Serialize` over sized fields.
    postcard::to_stdvec(value).expect("postcard encodes plain derived data")
}

/// Decodes a value written with [`encode`], refusing bytes left over after it.
pub(crate) fn decode<T: serde::de::DeserializeOwned>(
    bytes: &[u8],
) -> Result<T, crate::encoding::DecodeError> {
    crate::encoding::decode_whole(bytes)
}
