//! A sans-IO PBFT core (Castro and Liskov, "Practical Byzantine Fault Tolerance", OSDI '99).
//!
//! [`PbftNode`] tolerates `f` arbitrarily faulty replicas out of `n = 3f + 1`: it orders
//! clients' requests in batches through PRE-PREPARE, PREPARE and COMMIT; executes them strictly
//! in sequence order; takes a checkpoint every `checkpoint_interval` sequence numbers and drops
//! the protocol state below the latest stable one; replaces a primary that makes no progress
//! through VIEW-CHANGE and NEW-VIEW, which every backup checks by recomputing it; and brings a
//! replica that fell behind up to date from its peers, checked against signed checkpoints and
//! commits.
//!
//! Every statement is ed25519-signed ([`Signed`]). A driver passes each round's peer messages
//! through [`Protocol::authenticate`](crate::protocol::Protocol::authenticate), which checks
//! all their signatures in one batch through the configured
//! [`SignatureVerifier`](crate::gpu::SignatureVerifier) and drops any message carrying a bad
//! one; the core then trusts what it is stepped with. A replica makes what it signed durable
//! before it sends it (`messages_after_write`), so that after a restart it cannot sign two
//! different statements for one (view, sequence number, phase).
//!
//! The log a PBFT replica writes holds the entries it executed, numbered from 1 across batches;
//! an entry's `term` is the sequence number of its batch (not the view: honest replicas may
//! commit one batch in different views, and their logs must still be identical). Protocol
//! state (accepted pre-prepares, prepared certificates, checkpoint proofs, the view-change
//! in progress) lives in the store's records.

mod checkpoint;
mod config;
mod detection;
mod evidence;
mod limits;
mod message;
mod nesting;
mod node;
mod normal;
mod view_change;

#[cfg(any(test, feature = "sim"))]
pub use config::InjectedBugs;
pub use config::PbftConfig;
pub use evidence::{Evidence, Offence, PunishmentPolicy};
pub use message::{
    Batch, CatchUp, CheckpointProof, CommittedBatch, Digest, Message, NewView, PreparedCertificate,
    Request, Seq, Signed, Statement, View, ViewChange, chain_state,
};
pub use node::PbftNode;

/// PBFT has no operator requests yet: its primary is chosen by the view number alone.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Control {}

/// One thing that happens to a PBFT replica.
pub type Input = crate::protocol::Input<Message, Control>;
/// What one or more steps of a PBFT replica ask the driver to do.
pub type Output = crate::protocol::Output<Message>;
/// A PBFT message with its sender and receiver.
pub type Envelope = crate::protocol::Envelope<Message>;

/// Keys of the records a replica keeps in its store.
pub(crate) mod records {
    use super::Seq;

    /// The view-change state ([`super::node::ViewRecord`]).
    pub const VIEW: &[u8] = b"pbft/view";
    /// The last executed sequence number and the state chain after it.
    pub const EXECUTED: &[u8] = b"pbft/executed";
    /// Per sequence number: the accepted pre-prepare and the prepared certificate.
    pub const SLOT_PREFIX: &[u8] = b"pbft/slot/";
    /// Per stable checkpoint: its proof.
    pub const CHECKPOINT_PREFIX: &[u8] = b"pbft/checkpoint/";
    /// Per offender: the first evidence against it.
    pub const EVIDENCE_PREFIX: &[u8] = b"pbft/evidence/";
    /// Per (sequence number, kind, signer, view): a statement in the detection index
    /// (`seen`), so that a restart does not forget one half of an offence before it met the
    /// other.
    pub const SEEN_PREFIX: &[u8] = b"pbft/seen/";

    fn keyed(prefix: &[u8], seq: Seq) -> Vec<u8> {
        let mut key = prefix.to_vec();
        key.extend_from_slice(&seq.to_be_bytes());
        key
    }

    pub fn slot_key(seq: Seq) -> Vec<u8> {
        keyed(SLOT_PREFIX, seq)
    }

    pub fn checkpoint_key(seq: Seq) -> Vec<u8> {
        keyed(CHECKPOINT_PREFIX, seq)
    }

    pub fn evidence_key(offender: crate::types::NodeId) -> Vec<u8> {
        keyed(EVIDENCE_PREFIX, offender.0)
    }

    pub fn seen_key(
        seq: Seq,
        kind: u8,
        signer: crate::types::NodeId,
        view: super::View,
    ) -> Vec<u8> {
        let mut key = keyed(SEEN_PREFIX, seq);
        key.push(kind);
        key.extend_from_slice(&signer.0.to_be_bytes());
        key.extend_from_slice(&view.to_be_bytes());
        key
    }

    /// The sequence number of a slot or checkpoint key.
    pub fn seq_of(key: &[u8]) -> Option<Seq> {
        let tail = key.get(key.len().checked_sub(8)?..)?;
        Some(Seq::from_be_bytes(tail.try_into().ok()?))
    }
}

/// The identity of a replica in the simulator and in tests: a key derived from its id. Never
/// use outside tests: anyone can derive it.
#[cfg(any(test, feature = "sim"))]
pub fn test_signing_key(id: crate::types::NodeId) -> ed25519_dalek::SigningKey {
    let seed = message::Digest::of(&[b"stratoswarm test key", &id.0.to_be_bytes()]);
    ed25519_dalek::SigningKey::from_bytes(&seed.0)
}

/// [`test_signing_key`]'s public halves for `members`.
#[cfg(any(test, feature = "sim"))]
pub fn test_validators(
    members: &[crate::types::NodeId],
) -> std::collections::BTreeMap<crate::types::NodeId, ed25519_dalek::VerifyingKey> {
    members
        .iter()
        .map(|&id| (id, test_signing_key(id).verifying_key()))
        .collect()
}

#[cfg(test)]
mod tests;
