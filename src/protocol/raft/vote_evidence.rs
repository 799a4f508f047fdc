//! Signed Raft votes and the evidence two of them make: a voter that grants its vote to two
//! candidates in one term broke Raft's one promise per term, and its own two signatures prove
//! it to anyone holding its public key. The CPU Raft core signs nothing; these are the format
//! the GPU-optimized Raft algorithm signs its votes in, so that its Byzantine layer can cut
//! evidence out of the votes it checks.
//!
//! Only granted votes are promises. A pre-vote promises nothing (a voter may answer many), and
//! a refusal is not a vote, so neither is ever evidence.

use std::collections::BTreeMap;

use bytes::Bytes;
use ed25519_dalek::{SigningKey, VerifyingKey};
use serde::{Deserialize, Serialize};

use crate::gpu::sigverify::{sign_and_tell, verdicts_or_reference};
use crate::gpu::{SignatureItem, SignatureVerifier};
use crate::types::{NodeId, Term};

/// Domain separation: a Raft vote signature can never be read as any other signed statement
/// of this crate (PBFT's statements sign under their own domain).
const VOTE_DOMAIN: &[u8] = b"stratoswarm-consensus/raft-vote/v1";

/// "In `term`, `voter` grants its vote to `candidate`", signed by `voter`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignedVote {
    /// The term of the election.
    pub term: Term,
    /// Who the vote is for.
    pub candidate: NodeId,
    /// Who voted (and signed).
    pub voter: NodeId,
    /// ed25519 over [`SignedVote::signing_bytes`] (64 bytes when well formed).
    pub signature: Bytes,
}

impl SignedVote {
    /// `voter`'s vote for `candidate` in `term`, signed with `key`.
    pub fn sign(term: Term, candidate: NodeId, voter: NodeId, key: &SigningKey) -> Self {
        Self::sign_and_tell(term, candidate, voter, key, None)
    }

    /// [`SignedVote::sign`], also telling `verifier` of the signature (see
    /// [`SignatureVerifier::signed_here`]).
    pub(crate) fn sign_and_tell(
        term: Term,
        candidate: NodeId,
        voter: NodeId,
        key: &SigningKey,
        verifier: Option<&dyn SignatureVerifier>,
    ) -> Self {
        let bytes = Self::signing_bytes(term, candidate, voter);
        let signature = sign_and_tell(key, &bytes, verifier);
        SignedVote {
            term,
            candidate,
            voter,
            signature: Bytes::copy_from_slice(&signature),
        }
    }

    /// The bytes a vote's signature covers: the domain, then voter, term and candidate as
    /// big-endian integers (fixed width, so no two votes share their bytes).
    pub fn signing_bytes(term: Term, candidate: NodeId, voter: NodeId) -> Vec<u8> {
        let mut bytes = Vec::with_capacity(VOTE_DOMAIN.len() + 24);
        bytes.extend_from_slice(VOTE_DOMAIN);
        bytes.extend_from_slice(&voter.0.to_be_bytes());
        bytes.extend_from_slice(&term.to_be_bytes());
        bytes.extend_from_slice(&candidate.0.to_be_bytes());
        bytes
    }
}

/// Two votes of one voter in one term for two different candidates.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VoteEquivocation {
    /// One vote.
    pub first: SignedVote,
    /// The other, for another candidate.
    pub second: SignedVote,
}

/// Why a [`VoteEquivocation`] proves nothing.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum VoteEvidenceError {
    /// The votes are not one voter's in one term for two candidates.
    #[error("the votes do not conflict: {0}")]
    NotConflicting(&'static str),
    /// The voter has no known public key.
    #[error("{0} is not a validator")]
    UnknownVoter(NodeId),
    /// A signature does not verify (or is not 64 bytes): anyone could have made it.
    #[error("a signature of {0} does not verify")]
    BadSignature(NodeId),
}

impl VoteEquivocation {
    /// The pair, if it is one voter's two votes in one term for different candidates (what
    /// is then left to check is the signatures: see [`VoteEquivocation::verify`]).
    pub fn new(first: SignedVote, second: SignedVote) -> Result<Self, VoteEvidenceError> {
        if first.voter != second.voter {
            return Err(VoteEvidenceError::NotConflicting("two voters"));
        }
        if first.term != second.term {
            return Err(VoteEvidenceError::NotConflicting("two terms"));
        }
        if first.candidate == second.candidate {
            return Err(VoteEvidenceError::NotConflicting("one candidate"));
        }
        Ok(VoteEquivocation { first, second })
    }

    /// The voter the evidence accuses.
    pub fn offender(&self) -> NodeId {
        self.first.voter
    }

    /// Checks the evidence alone: the votes conflict, and both signatures verify under the
    /// voter's key in `validators` (in one batch through `verifier`; if its backend fails, on
    /// the CPU). Returns the offender.
    pub fn verify(
        &self,
        validators: &BTreeMap<NodeId, VerifyingKey>,
        verifier: &dyn SignatureVerifier,
    ) -> Result<NodeId, VoteEvidenceError> {
        let checked = VoteEquivocation::new(self.first.clone(), self.second.clone())?;
        let voter = checked.offender();
        let key = validators
            .get(&voter)
            .ok_or(VoteEvidenceError::UnknownVoter(voter))?
            .to_bytes();
        let votes = [&self.first, &self.second];
        let messages: Vec<Vec<u8>> = votes
            .iter()
            .map(|v| SignedVote::signing_bytes(v.term, v.candidate, v.voter))
            .collect();
        let mut items = Vec::with_capacity(2);
        for (vote, message) in votes.iter().zip(&messages) {
            let signature: [u8; 64] = vote.signature.as_ref().try_into().map_err(|_| {
                VoteEvidenceError::BadSignature(voter) // not even the length of one
            })?;
            items.push(SignatureItem {
                public_key: key,
                message,
                signature,
            });
        }
        let verdicts = verdicts_or_reference(verifier, &items);
        if verdicts.iter().all(|&valid| valid) {
            Ok(voter)
        } else {
            Err(VoteEvidenceError::BadSignature(voter))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gpu::CpuSignatureVerifier;

    fn key(seed: u8) -> SigningKey {
        SigningKey::from_bytes(&[seed; 32])
    }

    fn validators() -> BTreeMap<NodeId, VerifyingKey> {
        (1..=3u8)
            .map(|i| (NodeId(u64::from(i)), key(i).verifying_key()))
            .collect()
    }

    #[test]
    fn two_votes_in_one_term_for_two_candidates_convict_the_voter() {
        let a = SignedVote::sign(7, NodeId(1), NodeId(3), &key(3));
        let b = SignedVote::sign(7, NodeId(2), NodeId(3), &key(3));
        let evidence = VoteEquivocation::new(a, b).unwrap();
        assert_eq!(
            evidence.verify(&validators(), &CpuSignatureVerifier),
            Ok(NodeId(3))
        );
    }

    #[test]
    fn what_is_no_conflict_is_refused() {
        let vote = |term, candidate, voter: u8| {
            SignedVote::sign(
                term,
                NodeId(candidate),
                NodeId(u64::from(voter)),
                &key(voter),
            )
        };
        for (first, second) in [
            (vote(7, 1, 3), vote(7, 1, 3)), // the same vote twice
            (vote(7, 1, 3), vote(8, 2, 3)), // two terms
            (vote(7, 1, 3), vote(7, 2, 2)), // two voters
        ] {
            assert!(matches!(
                VoteEquivocation::new(first, second),
                Err(VoteEvidenceError::NotConflicting(_))
            ));
        }
    }

    /// Evidence with any byte changed, or signed with another key, or naming a voter with no
    /// key, proves nothing.
    #[test]
    fn evidence_with_any_byte_changed_is_rejected() {
        let a = SignedVote::sign(7, NodeId(1), NodeId(3), &key(3));
        let b = SignedVote::sign(7, NodeId(2), NodeId(3), &key(3));
        let good = VoteEquivocation::new(a, b).unwrap();
        for byte in 0..64 {
            for which in 0..2 {
                let mut bad = good.clone();
                let vote = if which == 0 {
                    &mut bad.first
                } else {
                    &mut bad.second
                };
                let mut signature = vote.signature.to_vec();
                signature[byte] ^= 0x01;
                vote.signature = signature.into();
                assert_eq!(
                    bad.verify(&validators(), &CpuSignatureVerifier),
                    Err(VoteEvidenceError::BadSignature(NodeId(3))),
                    "byte {byte} of vote {which}"
                );
            }
        }
        let mut retermed = good.clone();
        retermed.first.term = 9;
        retermed.second.term = 9;
        assert!(
            retermed
                .verify(&validators(), &CpuSignatureVerifier)
                .is_err()
        );
        let mut truncated = good.clone();
        truncated.second.signature = truncated.second.signature.slice(..63);
        assert!(
            truncated
                .verify(&validators(), &CpuSignatureVerifier)
                .is_err()
        );
        // Signed by someone else in voter 3's name.
        let forged = VoteEquivocation::new(
            SignedVote::sign(7, NodeId(1), NodeId(3), &key(1)),
            SignedVote::sign(7, NodeId(2), NodeId(3), &key(1)),
        )
        .unwrap();
        assert!(forged.verify(&validators(), &CpuSignatureVerifier).is_err());
        let mut strangers = validators();
        strangers.remove(&NodeId(3));
        assert_eq!(
            good.verify(&strangers, &CpuSignatureVerifier),
            Err(VoteEvidenceError::UnknownVoter(NodeId(3)))
        );
    }
}
