//! Settings of one PBFT replica, in ticks and counts (the engine converts durations to ticks).

use std::collections::BTreeMap;
use std::sync::Arc;

use ed25519_dalek::{SigningKey, VerifyingKey};

use crate::error::ConfigError;
use crate::gpu::votes::{CpuVoteAggregator, Threshold, VoteAggregator};
use crate::gpu::{CpuSignatureVerifier, SignatureVerifier};
use crate::types::NodeId;

/// Deliberate protocol bugs, for proving that the simulator's checkers catch them. Every switch
/// is off by default; only builds with the `sim` feature (and the crate's own tests) can turn
/// one on.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct InjectedBugs {
    /// Count a batch committed as soon as it prepared here, without waiting for 2f + 1
    /// commits (the commit phase is what makes a batch survive a view change that none of its
    /// other preparers takes part in). Committing on 2f commits instead would be the subtler
    /// bug, but with crash faults alone 2f preparers always meet any 2f + 1 view-changes; it
    /// takes lying replicas to exploit it, which is the Byzantine suite's business.
    pub commit_when_prepared: bool,
    /// Compute a new view's re-proposals ignoring the prepared certificates (a null request at
    /// every sequence number), on the new primary and on every backup alike.
    pub new_view_drops_prepared: bool,
}

/// Settings of one PBFT replica.
#[derive(Clone)]
pub struct PbftConfig {
    /// This replica.
    pub id: NodeId,
    /// Every replica, this one included; n = 3f + 1 with n ≥ 4. The order does not matter:
    /// replicas are ranked by id, and the primary of view `v` is the one of rank `v mod n`.
    pub members: Vec<NodeId>,
    /// This replica's signing key.
    pub signing_key: SigningKey,
    /// Every member's public key, this replica's included.
    pub validators: BTreeMap<NodeId, VerifyingKey>,
    /// Checks incoming signatures, a whole round's at a time.
    pub verifier: Arc<dyn SignatureVerifier>,
    /// Counts a round's prepares and commits, every slot's in one batch. Only the counts are
    /// used: the replica judges them by its own quorum (see [`PbftNode::quorum_size`]), so the
    /// aggregator's [`Threshold`] does not matter and one aggregator may serve clusters of any
    /// size. A backend that fails is replaced by the CPU count for that round.
    ///
    /// [`PbftNode::quorum_size`]: super::PbftNode::quorum_size
    pub votes: Arc<dyn VoteAggregator>,
    /// Sequence numbers between checkpoints (K in the paper). The window of sequence numbers a
    /// replica accepts is twice this past its stable checkpoint.
    pub checkpoint_interval: u64,
    /// Requests per batch at most.
    pub batch_size: usize,
    /// Bytes per batch at most; also the largest request accepted.
    pub max_batch_bytes: usize,
    /// Cut a batch once its oldest request waited this many ticks (0: at the next flush).
    pub batch_timeout_ticks: u32,
    /// Requests waiting at the primary, or waiting for execution at the replica that received
    /// them, at most; more are refused as overloaded.
    pub max_pending_proposals: usize,
    /// Ticks without progress while work is outstanding before a backup asks for a view
    /// change; doubled for each consecutive view change that brought no progress, up to 8 times.
    pub view_change_timeout_ticks: u32,
    /// Ticks between retransmissions of what this replica said about unfinished work.
    pub retransmit_ticks: u32,
    /// Ticks between audits, in which a replica tells its peers which digests it holds signed
    /// statements about, so that two halves of an offence that reached different replicas
    /// meet (see `PbftNode::audit`). Only with `detection_enabled`.
    pub audit_interval_ticks: u32,
    /// Look for provable misbehaviour (conflicting signed statements, unjustified new-views),
    /// keep the evidence and share it.
    pub detection_enabled: bool,
    /// What to do about a replica proven Byzantine.
    pub punishment_policy: super::PunishmentPolicy,
    /// Deliberate bugs for the simulator's self-tests (feature `sim`).
    #[cfg(any(test, feature = "sim"))]
    pub injected_bugs: InjectedBugs,
}

impl std::fmt::Debug for PbftConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PbftConfig")
            .field("id", &self.id)
            .field("members", &self.members)
            .field("verifier", &self.verifier.backend_name())
            .field("checkpoint_interval", &self.checkpoint_interval)
            .field("batch_size", &self.batch_size)
            .field("max_batch_bytes", &self.max_batch_bytes)
            .field("view_change_timeout_ticks", &self.view_change_timeout_ticks)
            .field("retransmit_ticks", &self.retransmit_ticks)
            .field("audit_interval_ticks", &self.audit_interval_ticks)
            .finish_non_exhaustive()
    }
}

impl PbftConfig {
    /// Settings with the usual values: checkpoints every 128 sequence numbers, batches of up to
    /// 1,024 requests or 1 MiB, a view change after 20 ticks without progress, retransmission
    /// every 4 ticks, an audit every 16, the CPU signature verifier and vote counter, detection on with offenders
    /// excluded.
    pub fn new(
        id: NodeId,
        members: Vec<NodeId>,
        signing_key: SigningKey,
        validators: BTreeMap<NodeId, VerifyingKey>,
    ) -> Self {
        let replicas = members.len().max(1) as u64;
        PbftConfig {
            id,
            members,
            signing_key,
            validators,
            verifier: Arc::new(CpuSignatureVerifier),
            votes: Arc::new(CpuVoteAggregator::new(Threshold::ByzantineQuorum {
                replicas,
            })),
            checkpoint_interval: 128,
            batch_size: 1024,
            max_batch_bytes: 1 << 20,
            batch_timeout_ticks: 0,
            max_pending_proposals: 1 << 16,
            view_change_timeout_ticks: 20,
            retransmit_ticks: 4,
            audit_interval_ticks: 16,
            detection_enabled: true,
            punishment_policy: super::PunishmentPolicy::Exclude,
            #[cfg(any(test, feature = "sim"))]
            injected_bugs: InjectedBugs::default(),
        }
    }

    /// The bugs switched on (none outside the simulator).
    pub(crate) fn bugs(&self) -> InjectedBugs {
        #[cfg(any(test, feature = "sim"))]
        {
            self.injected_bugs
        }
        #[cfg(not(any(test, feature = "sim")))]
        {
            InjectedBugs::default()
        }
    }

    /// Checks the settings; the error names the first problem.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let mut members = self.members.clone();
        members.sort();
        members.dedup();
        if members.len() != self.members.len() {
            return ConfigError::invalid(
                "members",
                format!("{:?}", self.members),
                "a member is named twice",
            );
        }
        if members.len() < 4 {
            return ConfigError::invalid(
                "members",
                format!("{} replicas", members.len()),
                "PBFT needs n = 3f + 1 >= 4 replicas to tolerate one faulty replica",
            );
        }
        if !members.contains(&self.id) {
            return ConfigError::invalid("id", self.id.to_string(), "this replica is not a member");
        }
        if let Some(missing) = members.iter().find(|m| !self.validators.contains_key(m)) {
            return ConfigError::invalid(
                "validators",
                missing.to_string(),
                "every member needs a public key",
            );
        }
        if self.validators.get(&self.id) != Some(&self.signing_key.verifying_key()) {
            return ConfigError::invalid(
                "signing_key",
                self.id.to_string(),
                "does not match this replica's entry in validators",
            );
        }
        let at_least_one = [
            ("checkpoint_interval", self.checkpoint_interval),
            ("batch_size", self.batch_size as u64),
            ("max_batch_bytes", self.max_batch_bytes as u64),
            ("max_pending_proposals", self.max_pending_proposals as u64),
            (
                "view_change_timeout_ticks",
                u64::from(self.view_change_timeout_ticks),
            ),
            ("retransmit_ticks", u64::from(self.retransmit_ticks)),
        ];
        for (field, value) in at_least_one {
            if value == 0 {
                return ConfigError::invalid(field, "0".into(), "must be at least 1");
            }
        }
        Ok(())
    }
}
