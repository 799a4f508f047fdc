//! Signed acknowledgements and the commit certificates a quorum of them makes.
//!
//! A follower that stored the leader's log through index `j` in term `t` signs
//! `(voter, t, j, chain(j))` ([`SignedAck`]). Because `chain(j)` covers every entry up to `j`
//! (see [`chain`](super::chain)), one acknowledgement vouches for the whole prefix. A
//! [`CommitCertificate`] for index `c` is a quorum of such acknowledgements, of the leader's term,
//! at indices `j ≥ c`, with the chain value at `c` and the digests of the entries between `c`
//! and the highest `j`, so that anyone holding the log can recompute every signed value from the
//! log alone: it proves, offline, that the log through `c` was stored by a quorum of voters.
//!
//! The voters are those of the membership the leader counted under, the one in force in its log
//! ([`CommitCertificate::membership_index`]). The leader counts only acknowledgements that reach
//! that membership's entry, so the entry lies inside the certified prefix and whoever holds the
//! log finds the voters, and their keys, in it.

use std::collections::{BTreeMap, BTreeSet};

use bytes::Bytes;
use ed25519_dalek::{SigningKey, VerifyingKey};
use serde::{Deserialize, Serialize};

use super::chain::{Hash, chain_link};
use crate::gpu::sigverify::{sign_and_tell, verdicts_or_reference};
use crate::gpu::{SignatureItem, SignatureVerifier};
use crate::membership::Membership;
use crate::types::{LogIndex, NodeId, Term};

/// Domain separation: an acknowledgement's signature reads as nothing else this crate signs.
const ACK_DOMAIN: &[u8] = b"stratoswarm-consensus/raft-ack/v1";

/// "In `term`, my log matches the leader's through `index`, where the chain value is `chain`",
/// signed by `voter`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignedAck {
    /// Who acknowledges (and signed).
    pub voter: NodeId,
    /// The leader's term.
    pub term: Term,
    /// The last index stored.
    pub index: LogIndex,
    /// The chain value at `index`.
    pub chain: Hash,
    /// ed25519 over [`SignedAck::signing_bytes`] (64 bytes when well formed).
    pub signature: Bytes,
}

impl SignedAck {
    /// `voter`'s acknowledgement, signed with `key`.
    pub fn sign(voter: NodeId, term: Term, index: LogIndex, chain: Hash, key: &SigningKey) -> Self {
        Self::sign_and_tell(voter, term, index, chain, key, None)
    }

    /// [`SignedAck::sign`], also telling `verifier` of the signature (see
    /// [`SignatureVerifier::signed_here`]).
    pub(crate) fn sign_and_tell(
        voter: NodeId,
        term: Term,
        index: LogIndex,
        chain: Hash,
        key: &SigningKey,
        verifier: Option<&dyn SignatureVerifier>,
    ) -> Self {
        let bytes = Self::signing_bytes(voter, term, index, &chain);
        let signature = sign_and_tell(key, &bytes, verifier);
        SignedAck {
            voter,
            term,
            index,
            chain,
            signature: Bytes::copy_from_slice(&signature),
        }
    }

    /// The bytes the signature covers: the domain, then the fields at fixed width.
    pub fn signing_bytes(voter: NodeId, term: Term, index: LogIndex, chain: &Hash) -> Vec<u8> {
        let mut bytes = Vec::with_capacity(ACK_DOMAIN.len() + 56);
        bytes.extend_from_slice(ACK_DOMAIN);
        bytes.extend_from_slice(&voter.0.to_be_bytes());
        bytes.extend_from_slice(&term.to_be_bytes());
        bytes.extend_from_slice(&index.to_be_bytes());
        bytes.extend_from_slice(chain);
        bytes
    }

    /// The signature, if it has the right length.
    pub(crate) fn signature_bytes(&self) -> Option<[u8; 64]> {
        self.signature.as_ref().try_into().ok()
    }
}

/// One signature to check: the signer, the bytes it signed, and the signature (`None` when it
/// is not 64 bytes long).
pub(crate) type SignedPart = (NodeId, Vec<u8>, Option<[u8; 64]>);

/// A quorum of signed acknowledgements proving the log through [`CommitCertificate::index`]
/// committed. See the [module documentation](super).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommitCertificate {
    /// The leader's term; every acknowledgement is of it, and so is the entry at `index`
    /// (Raft commits by counting only entries of the leader's term).
    pub term: Term,
    /// The last committed index the certificate covers.
    pub index: LogIndex,
    /// The chain value at `index`.
    pub chain: Hash,
    /// The digests of the entries after `index`, up to the highest acknowledged one.
    pub path: Vec<Hash>,
    /// One acknowledgement per voter of the quorum, at indices from `index` to
    /// `index + path.len()`.
    pub acks: Vec<SignedAck>,
    /// The index of the membership entry whose voters acknowledged (0: the voters the group
    /// started with); at most `index`, so the certified log holds it.
    pub membership_index: LogIndex,
}

/// A certificate as written before memberships changed: no `membership_index` (read as 0).
#[derive(Deserialize)]
#[cfg_attr(test, derive(Serialize))]
struct CertificateV1 {
    term: Term,
    index: LogIndex,
    chain: Hash,
    path: Vec<Hash>,
    acks: Vec<SignedAck>,
}

/// Why a certificate proves nothing.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum CertificateError {
    /// An acknowledgement of another term, outside the covered indices, or whose chain value
    /// does not follow from the certificate's.
    #[error("acknowledgement of {voter} does not fit the certificate: {why}")]
    Inconsistent {
        /// The acknowledging voter.
        voter: NodeId,
        /// What does not fit.
        why: &'static str,
    },
    /// The same voter twice, or a voter that is not a member.
    #[error("{0} is counted twice or is not a voter")]
    NotAVoter(NodeId),
    /// A signature that does not verify (or is not 64 bytes).
    #[error("the signature of {0} does not verify")]
    BadSignature(NodeId),
    /// Counted under a membership the checker's log does not hold at that index.
    #[error("counted under the membership at {0}, which this log does not hold there")]
    UnknownMembership(LogIndex),
    /// Fewer distinct voters than a majority.
    #[error("{have} acknowledgements, a quorum is {need}")]
    NoQuorum {
        /// Distinct valid acknowledgements.
        have: usize,
        /// A majority of the voters.
        need: usize,
    },
}

impl CommitCertificate {
    /// Decodes a stored certificate, in this form or the one written before memberships
    /// changed; `None` when the bytes are neither (a damaged record), or hold more than one
    /// certificate's worth.
    pub fn decode(bytes: &[u8]) -> Option<Self> {
        if let Ok(certificate) = crate::encoding::decode_whole::<CommitCertificate>(bytes) {
            return Some(certificate);
        }
        let old: CertificateV1 = crate::encoding::decode_whole(bytes).ok()?;
        Some(CommitCertificate {
            term: old.term,
            index: old.index,
            chain: old.chain,
            path: old.path,
            acks: old.acks,
            membership_index: 0,
        })
    }

    /// The chain value at each index from `index` to `index + path.len()`.
    fn chain_values(&self) -> Vec<Hash> {
        let mut values = Vec::with_capacity(self.path.len() + 1);
        values.push(self.chain);
        for digest in &self.path {
            let next = chain_link(values.last().expect("non-empty"), digest);
            values.push(next);
        }
        values
    }

    /// What the signatures of the acknowledgements must verify: `(voter, signing bytes,
    /// signature)`, after the checks that need no signature (each ack's term and index fit, its
    /// chain value follows from the certificate's, each voter is a distinct voter of
    /// `membership`, and they are a quorum of it).
    pub(crate) fn signed_parts(
        &self,
        membership: &Membership,
    ) -> Result<Vec<SignedPart>, CertificateError> {
        let values = self.chain_values();
        let mut seen = BTreeSet::new();
        let mut parts = Vec::with_capacity(self.acks.len());
        for ack in &self.acks {
            let inconsistent = |why| CertificateError::Inconsistent {
                voter: ack.voter,
                why,
            };
            if ack.term != self.term {
                return Err(inconsistent("another term"));
            }
            let Some(offset) = ack.index.checked_sub(self.index) else {
                return Err(inconsistent("below the certified index"));
            };
            let Some(expected) = values.get(offset as usize) else {
                return Err(inconsistent("beyond the certificate's path"));
            };
            if &ack.chain != expected {
                return Err(inconsistent("chain value does not follow"));
            }
            if !membership.is_voter(ack.voter) || !seen.insert(ack.voter) {
                return Err(CertificateError::NotAVoter(ack.voter));
            }
            parts.push((
                ack.voter,
                SignedAck::signing_bytes(ack.voter, ack.term, ack.index, &ack.chain),
                ack.signature_bytes(),
            ));
        }
        if self.membership_index > self.index {
            return Err(CertificateError::Inconsistent {
                voter: self.acks.first().map_or(NodeId(0), |ack| ack.voter),
                why: "counted under a membership beyond the certified index",
            });
        }
        if !membership.has_quorum(|id| seen.contains(&id)) {
            return Err(CertificateError::NoQuorum {
                have: seen.len(),
                need: membership.smallest_quorum(),
            });
        }
        Ok(parts)
    }

    /// Checks the certificate alone against the voters' keys: a majority of distinct voters of
    /// `validators` acknowledged, in its term, chain values that follow from its own, with
    /// signatures that verify (one batch through `verifier`; on a backend failure, on the CPU).
    /// Whether its chain value is the one of a given log is the caller's check.
    pub fn verify(
        &self,
        validators: &BTreeMap<NodeId, VerifyingKey>,
        verifier: &dyn SignatureVerifier,
    ) -> Result<(), CertificateError> {
        let membership = Membership {
            keys: validators
                .iter()
                .map(|(&id, key)| (id, key.to_bytes()))
                .collect(),
            ..Membership::of_voters(validators.keys().copied())
        };
        self.verify_under(&membership, verifier)
    }

    /// Checks the certificate alone against `membership`, the one it names
    /// ([`CommitCertificate::membership_index`]), whose [`keys`](Membership::keys) hold every
    /// voter's: a quorum of it acknowledged, as in [`CommitCertificate::verify`].
    pub fn verify_under(
        &self,
        membership: &Membership,
        verifier: &dyn SignatureVerifier,
    ) -> Result<(), CertificateError> {
        let parts = self.signed_parts(membership)?;
        let mut keyed = Vec::with_capacity(parts.len());
        for (voter, bytes, signature) in &parts {
            let signature = signature.ok_or(CertificateError::BadSignature(*voter))?;
            let key = membership
                .keys
                .get(voter)
                .ok_or(CertificateError::BadSignature(*voter))?;
            keyed.push((*voter, *key, bytes, signature));
        }
        let items: Vec<SignatureItem<'_>> = keyed
            .iter()
            .map(|(_, public_key, message, signature)| SignatureItem {
                public_key: *public_key,
                message,
                signature: *signature,
            })
            .collect();
        let verdicts = verdicts_or_reference(verifier, &items);
        match keyed.iter().zip(verdicts).find(|(_, valid)| !valid) {
            Some(((voter, ..), _)) => Err(CertificateError::BadSignature(*voter)),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gpu::CpuSignatureVerifier;
    use crate::protocol::pbft::{test_signing_key, test_validators};

    fn certificate(voters: &[u64], acked: &[LogIndex]) -> CommitCertificate {
        let path = vec![[7; 32], [8; 32]];
        let start = [1; 32];
        let values = [start, chain_link(&start, &path[0]), {
            let one = chain_link(&start, &path[0]);
            chain_link(&one, &path[1])
        }];
        let acks = voters
            .iter()
            .zip(acked)
            .map(|(&voter, &index)| {
                let voter = NodeId(voter);
                let chain = values[(index - 10) as usize];
                SignedAck::sign(voter, 3, index, chain, &test_signing_key(voter))
            })
            .collect();
        CommitCertificate {
            term: 3,
            index: 10,
            chain: start,
            path,
            acks,
            membership_index: 0,
        }
    }

    #[test]
    fn a_quorum_of_acks_at_or_past_the_index_certifies_it() {
        let validators = test_validators(&[NodeId(1), NodeId(2), NodeId(3)]);
        let verifier = CpuSignatureVerifier;
        let good = certificate(&[1, 3], &[12, 10]);
        assert_eq!(good.verify(&validators, &verifier), Ok(()));

        let short = certificate(&[1], &[11]);
        assert!(matches!(
            short.verify(&validators, &verifier),
            Err(CertificateError::NoQuorum { have: 1, need: 2 })
        ));

        let mut twice = certificate(&[1, 1], &[11, 12]);
        assert_eq!(
            twice.verify(&validators, &verifier),
            Err(CertificateError::NotAVoter(NodeId(1)))
        );
        twice.acks.pop();
        let stranger = certificate(&[1, 9], &[11, 12]);
        assert_eq!(
            stranger.verify(&validators, &verifier),
            Err(CertificateError::NotAVoter(NodeId(9)))
        );
    }

    #[test]
    fn a_stored_certificate_decodes_in_either_form_and_nothing_more() {
        let mut current = certificate(&[1, 2], &[10, 11]);
        current.membership_index = 4;
        let bytes = crate::encoding::to_vec(&current).unwrap();
        assert_eq!(CommitCertificate::decode(&bytes), Some(current.clone()));

        let old = CertificateV1 {
            term: current.term,
            index: current.index,
            chain: current.chain,
            path: current.path.clone(),
            acks: current.acks.clone(),
        };
        let old_bytes = crate::encoding::to_vec(&old).unwrap();
        let upgraded = CommitCertificate::decode(&old_bytes).unwrap();
        assert_eq!(upgraded.membership_index, 0);
        assert_eq!(upgraded.acks, current.acks);

        // Bytes past either form are damage, not fields to ignore. (Two of them: one byte
        // after the old form reads as the current form's membership index.)
        for mut damaged in [bytes, old_bytes] {
            damaged.extend_from_slice(&[0, 0]);
            assert_eq!(CommitCertificate::decode(&damaged), None);
        }
    }

    #[test]
    fn any_changed_byte_breaks_the_certificate() {
        let validators = test_validators(&[NodeId(1), NodeId(2), NodeId(3)]);
        let verifier = CpuSignatureVerifier;
        let good = certificate(&[1, 2, 3], &[10, 11, 12]);
        let mut changes: Vec<CommitCertificate> = Vec::new();
        let mut c = good.clone();
        c.chain[0] ^= 1;
        changes.push(c);
        let mut c = good.clone();
        c.path[1][5] ^= 1;
        changes.push(c);
        let mut c = good.clone();
        c.term += 1;
        changes.push(c);
        let mut c = good.clone();
        c.index -= 1;
        changes.push(c);
        let mut c = good.clone();
        let mut signature = c.acks[1].signature.to_vec();
        signature[10] ^= 1;
        c.acks[1].signature = signature.into();
        changes.push(c);
        let mut c = good.clone();
        c.acks[2].signature = c.acks[2].signature.slice(..63);
        changes.push(c);
        for (n, changed) in changes.iter().enumerate() {
            assert!(
                changed.verify(&validators, &verifier).is_err(),
                "change {n} went unnoticed"
            );
        }
    }
}
