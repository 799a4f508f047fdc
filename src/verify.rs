//! Offline checks of a GPU-optimized Raft data directory: [`verify_log`].
//!
//! A node of that algorithm keeps, beside its log, the newest [`CommitCertificate`] it holds
//! and one every [`CERTIFICATE_SPACING`](crate::protocol::gpu_raft::CERTIFICATE_SPACING) indices, and the voters' public keys. Each certificate
//! is a quorum of signatures over the chain value of the log prefix it covers (see
//! [`gpu_raft::chain`](crate::protocol::gpu_raft::chain)), so recomputing the chain from the
//! stored entries and checking every certificate proves, with nothing but the directory, that
//! the log through the newest certificate was stored by a quorum of voters.

use std::collections::BTreeMap;
use std::path::Path;

use ed25519_dalek::VerifyingKey;

use crate::client_signature::unframe;
use crate::error::StorageError;
use crate::gpu::sigverify::verdicts_or_reference;
use crate::gpu::{CpuSignatureVerifier, SignatureItem, SignatureVerifier};
use crate::protocol::gpu_raft::chain::{Hash, chain_link, entry_digest};
use crate::protocol::gpu_raft::{
    CertificateError, CommitCertificate, VALIDATORS, is_history_key, latest_key,
};
use crate::storage::{FjallLogStore, LogStore, RecoveredState, SyncPolicy};
use crate::types::{Entry, LogIndex, NodeId, Payload};

/// What [`verify_log`] found: every certificate checks.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LogVerification {
    /// Entries in the log.
    pub entries: LogIndex,
    /// The highest certified index: every entry up to it was stored by a quorum.
    pub certified_through: LogIndex,
    /// Certificates checked.
    pub certificates: usize,
    /// Voters whose keys the certificates were checked against: the ones the group started
    /// with and those of the memberships the certificates name.
    pub validators: usize,
    /// Client signatures of commands in the log, all checked again.
    pub client_signatures: usize,
}

/// Why a data directory does not check out.
#[derive(Debug, thiserror::Error)]
pub enum VerifyLogError {
    /// The directory could not be opened or read.
    #[error("cannot read the log store: {0}")]
    Storage(#[from] StorageError),
    /// No such directory.
    #[error("{0} is not a directory")]
    NotADirectory(String),
    /// Neither the directory nor the caller names the voters' keys.
    #[error("no validator keys: not a gpu_optimized_raft data directory (or give the keys)")]
    NoValidators,
    /// A record that does not decode.
    #[error("the {0} record does not decode: the store is damaged")]
    Corrupt(&'static str),
    /// The keys recorded in the directory are not the ones the caller pinned.
    #[error("the validator keys recorded in the directory differ from the configured ones")]
    ValidatorsDiffer,
    /// The first index that cannot be certified, and why.
    #[error("index {index}: {why}")]
    Bad {
        /// The first index that does not check out.
        index: LogIndex,
        /// Why.
        why: String,
    },
}

/// Checks the GPU-optimized Raft data directory `dir` (a node's `persistent_state`, the node
/// stopped): every certificate verifies under the voters' keys recorded in it, or under
/// `validators` when given (then each recorded key must be the one given for its voter; a node
/// that joined records none, and its certificates name memberships in its log), and certifies
/// the stored entries. Opens the store with the CPU verifier.
pub fn verify_log(
    dir: &Path,
    validators: Option<&BTreeMap<NodeId, VerifyingKey>>,
) -> Result<LogVerification, VerifyLogError> {
    if !dir.is_dir() {
        return Err(VerifyLogError::NotADirectory(dir.display().to_string()));
    }
    let mut store = FjallLogStore::open(dir, SyncPolicy::EveryBatch)?;
    let recovered = store.recover()?;
    verify_recovered(&recovered, validators, &CpuSignatureVerifier)
}

/// [`verify_log`] over a recovered state, checking signatures with `verifier`.
pub fn verify_recovered(
    recovered: &RecoveredState,
    pinned: Option<&BTreeMap<NodeId, VerifyingKey>>,
    verifier: &dyn SignatureVerifier,
) -> Result<LogVerification, VerifyLogError> {
    let recorded = match recovered.records.get(VALIDATORS) {
        Some(bytes) => Some(decode_validators(bytes)?),
        None => None,
    };
    // The recorded keys are those of the voters the node started with (none for a node that
    // joined; it may be configured with more, its own among them): each must be the one the
    // caller pinned for that voter.
    let validators = match (pinned, recorded) {
        (Some(pinned), Some(recorded))
            if recorded.iter().any(|(id, key)| pinned.get(id) != Some(key)) =>
        {
            return Err(VerifyLogError::ValidatorsDiffer);
        }
        (_, Some(recorded)) => recorded,
        (Some(pinned), None) => pinned.clone(),
        (None, None) => return Err(VerifyLogError::NoValidators),
    };
    let mut certificates: BTreeMap<LogIndex, CommitCertificate> = BTreeMap::new();
    for (key, value) in &recovered.records {
        if key.as_slice() == latest_key() || is_history_key(key) {
            let certificate =
                CommitCertificate::decode(value).ok_or(VerifyLogError::Corrupt("certificate"))?;
            certificates.insert(certificate.index, certificate);
        }
    }
    let entries = &recovered.entries;
    if let Some(first) = entries.first()
        && first.index != 1
    {
        return Err(VerifyLogError::Bad {
            index: first.index,
            why: "the log does not start at index 1 (compacted logs are not supported)".into(),
        });
    }
    // The chain value after each entry.
    let mut chain: Vec<Hash> = Vec::with_capacity(entries.len() + 1);
    chain.push([0; 32]);
    for entry in entries {
        let next = chain_link(chain.last().expect("non-empty"), &entry_digest(entry));
        chain.push(next);
    }
    let last = entries.len() as LogIndex;
    let mut certified_through = 0;
    let mut signers: std::collections::BTreeSet<NodeId> = validators.keys().copied().collect();
    for (&index, certificate) in &certificates {
        let first_uncertified = certified_through + 1;
        if index == 0 {
            return Err(VerifyLogError::Bad {
                index: 0,
                why: "a certificate of index 0 certifies nothing".into(),
            });
        }
        if index > last {
            return Err(VerifyLogError::Bad {
                index: first_uncertified,
                why: format!(
                    "a certificate covers index {index} but the log ends at {last}: entries are missing"
                ),
            });
        }
        if chain[index as usize] != certificate.chain {
            return Err(VerifyLogError::Bad {
                index: first_uncertified,
                why: format!(
                    "the entries {first_uncertified}..={index} are not the ones the certificate at \
                     {index} was signed over"
                ),
            });
        }
        if entries[index as usize - 1].term != certificate.term {
            return Err(VerifyLogError::Bad {
                index,
                why: format!(
                    "the certificate is of term {} but the entry is of term {}",
                    certificate.term,
                    entries[index as usize - 1].term
                ),
            });
        }
        // The voters (and their keys) the certificate was counted under: the ones the group
        // started with, or those of a membership entry inside the prefix it certifies.
        let verified = match certificate.membership_index {
            0 => certificate.verify(&validators, verifier),
            at => match entries.get(at as usize - 1).map(|entry| &entry.payload) {
                Some(Payload::Membership(membership)) if at <= index => {
                    signers.extend(membership.keys.keys().copied());
                    certificate.verify_under(membership, verifier)
                }
                _ => Err(CertificateError::UnknownMembership(at)),
            },
        };
        verified.map_err(|error| VerifyLogError::Bad {
            index: first_uncertified,
            why: format!("the certificate at {index} does not verify: {error}"),
        })?;
        certified_through = index;
    }
    let client_signatures = check_client_signatures(entries, verifier)?;
    Ok(LogVerification {
        entries: last,
        certified_through,
        certificates: certificates.len(),
        validators: signers.len(),
        client_signatures,
    })
}

/// Every command is in its frame, and every client signature verifies (one batch); returns how
/// many there were.
fn check_client_signatures(
    entries: &[Entry],
    verifier: &dyn SignatureVerifier,
) -> Result<usize, VerifyLogError> {
    let mut checks = Vec::new();
    for entry in entries {
        let Payload::Command { data, .. } = &entry.payload else {
            continue;
        };
        let framed = unframe(data).map_err(|error| VerifyLogError::Bad {
            index: entry.index,
            why: error.to_string(),
        })?;
        if let Some(check) = framed.to_check() {
            checks.push((entry.index, check));
        }
    }
    let items: Vec<SignatureItem<'_>> = checks
        .iter()
        .map(|(_, (public_key, signature, message))| SignatureItem {
            public_key: *public_key,
            message,
            signature: *signature,
        })
        .collect();
    let verdicts = verdicts_or_reference(verifier, &items);
    match checks.iter().zip(verdicts).find(|(_, valid)| !valid) {
        Some(((index, _), _)) => Err(VerifyLogError::Bad {
            index: *index,
            why: "the client's signature of the command does not verify".into(),
        }),
        None => Ok(checks.len()),
    }
}

pub(crate) fn decode_validators(
    bytes: &[u8],
) -> Result<BTreeMap<NodeId, VerifyingKey>, VerifyLogError> {
    let table: Vec<(NodeId, [u8; 32])> =
        crate::encoding::decode_whole(bytes).map_err(|_| VerifyLogError::Corrupt("validators"))?;
    table
        .into_iter()
        .map(|(id, key)| {
            VerifyingKey::from_bytes(&key)
                .map(|key| (id, key))
                .map_err(|_| VerifyLogError::Corrupt("validators"))
        })
        .collect()
}
