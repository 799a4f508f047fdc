//! [`GpuRaftConfig`]: Raft's settings plus the keys and the batch engines.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use ed25519_dalek::{SigningKey, VerifyingKey};

use crate::error::ConfigError;
use crate::gpu::votes::CpuVoteAggregator;
use crate::gpu::{CpuSignatureVerifier, SignatureVerifier, Threshold, VoteAggregator};
use crate::protocol::raft::RaftConfig;
use crate::types::NodeId;

/// The settings of a [`GpuRaftNode`](super::GpuRaftNode).
#[derive(Clone)]
pub struct GpuRaftConfig {
    /// The Raft core's settings (this node, the voters, timeouts, batching).
    pub raft: RaftConfig,
    /// This node's signing key.
    pub signing_key: SigningKey,
    /// Every voter's public key, this node's included.
    pub validators: BTreeMap<NodeId, VerifyingKey>,
    /// Checks a round's signatures (votes, acknowledgements, certificates) in one batch.
    pub verifier: Arc<dyn SignatureVerifier>,
    /// Counts a round's acknowledgements toward the commit index. Only its counts are used:
    /// the leader judges them by a majority of its voters, whatever the aggregator's threshold.
    /// A backend that fails is replaced by the CPU count for that round.
    pub votes: Arc<dyn VoteAggregator>,
    /// The clients allowed to propose, by ed25519 public key. When set, every command must be
    /// signed by one of them ([`Proposal::signed`](crate::Proposal::signed)); when `None`,
    /// unsigned commands are accepted and signed ones need only verify.
    pub client_keys: Option<BTreeSet<[u8; 32]>>,
    /// Bugs the simulator's control tests inject, to prove its checks can fail.
    #[cfg(any(test, feature = "sim"))]
    pub injected_bugs: InjectedBugs,
}

/// Deliberate bugs (simulator builds only).
#[cfg(any(test, feature = "sim"))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct InjectedBugs {
    /// Count acknowledgements without checking their signatures.
    pub accept_unchecked_acks: bool,
    /// Count a joint membership's incoming voters alone, as if the change were done.
    pub ignore_outgoing_voters: bool,
}

impl std::fmt::Debug for GpuRaftConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GpuRaftConfig")
            .field("raft", &self.raft)
            .field("validators", &self.validators.keys().collect::<Vec<_>>())
            .field("verifier", &self.verifier.backend_name())
            .finish_non_exhaustive()
    }
}

impl GpuRaftConfig {
    /// `raft` with the given keys, checking on the CPU.
    pub fn new(
        raft: RaftConfig,
        signing_key: SigningKey,
        validators: BTreeMap<NodeId, VerifyingKey>,
    ) -> Self {
        GpuRaftConfig {
            raft,
            signing_key,
            validators,
            verifier: Arc::new(CpuSignatureVerifier),
            votes: Arc::new(CpuVoteAggregator::new(Threshold::MajorityOfVotesCast)),
            client_keys: None,
            #[cfg(any(test, feature = "sim"))]
            injected_bugs: InjectedBugs::default(),
        }
    }

    /// Checks the Raft settings, that every voter has a key, and that this node's key is the
    /// one the validators name for it.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.raft.validate()?;
        if let Some(missing) = self
            .raft
            .voters
            .iter()
            .find(|voter| !self.validators.contains_key(voter))
        {
            return Err(ConfigError::Invalid {
                field: "validators",
                value: missing.to_string(),
                reason: "every voter needs a public key",
            });
        }
        if self.validators.get(&self.raft.id) != Some(&self.signing_key.verifying_key()) {
            return Err(ConfigError::Invalid {
                field: "key_file",
                value: self.raft.id.to_string(),
                reason: "this node's key is not the one the validators name for it",
            });
        }
        Ok(())
    }
}
