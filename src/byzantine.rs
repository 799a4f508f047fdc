//! Byzantine detection and punishment at the engine: the seed's `ByzantineConfig`,
//! `ByzantineDetector` and `on_byzantine_detected`, over the evidence the PBFT core finds
//! ([`crate::protocol::pbft::Evidence`]).
//!
//! Only provable offences are ever reported: two conflicting statements signed by one replica,
//! or a NEW-VIEW that does not follow from the VIEW-CHANGEs it carries. A bad signature,
//! garbage, a replay or silence could be anyone's doing; such messages are dropped and counted
//! (`consensus_invalid_messages_total`) and nobody is blamed.

use std::sync::{Arc, Mutex};

use crate::error::ConfigError;
use crate::sync::lock;
use crate::types::NodeId;

pub use crate::protocol::pbft::{Evidence, Offence, PunishmentPolicy};
/// Signed Raft votes and the evidence two of them in one term make, for the GPU-optimized
/// Raft algorithm's Byzantine layer.
pub use crate::protocol::raft::{SignedVote, VoteEquivocation, VoteEvidenceError};

/// How an engine treats Byzantine replicas (the seed's `ByzantineConfig`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ByzantineConfig {
    /// The fraction of members that may be Byzantine. The cluster must be able to honour it:
    /// `round(fault_threshold × n)` replicas may not exceed `f = ⌊(n − 1) / 3⌋`, so 0.33 is
    /// accepted with 4, 7 or 100 members and refused with 3 (see
    /// [`ByzantineConfig::validate_for`]).
    pub fault_threshold: f64,
    /// Look for provable misbehaviour, keep the evidence and share it.
    pub detection_enabled: bool,
    /// What to do about a replica proven Byzantine.
    pub punishment_policy: PunishmentPolicy,
}

impl Default for ByzantineConfig {
    /// A third of the members, detection on, offenders excluded.
    fn default() -> Self {
        ByzantineConfig {
            fault_threshold: 0.33,
            detection_enabled: true,
            punishment_policy: PunishmentPolicy::Exclude,
        }
    }
}

impl ByzantineConfig {
    /// Sets [`ByzantineConfig::fault_threshold`].
    pub fn fault_threshold(mut self, fraction: f64) -> Self {
        self.fault_threshold = fraction;
        self
    }

    /// Sets [`ByzantineConfig::detection_enabled`].
    pub fn detection_enabled(mut self, enabled: bool) -> Self {
        self.detection_enabled = enabled;
        self
    }

    /// Sets [`ByzantineConfig::punishment_policy`].
    pub fn punishment_policy(mut self, policy: PunishmentPolicy) -> Self {
        self.punishment_policy = policy;
        self
    }

    /// Checks that `members` replicas can tolerate the threshold; the error says why not.
    pub fn validate_for(&self, members: usize) -> Result<(), ConfigError> {
        if !(0.0..1.0).contains(&self.fault_threshold) {
            return ConfigError::invalid(
                "byzantine_threshold",
                self.fault_threshold.to_string(),
                "must be a fraction in [0, 1)",
            );
        }
        let tolerated = members.saturating_sub(1) / 3;
        let asked = (self.fault_threshold * members as f64).round() as usize;
        if asked > tolerated {
            return ConfigError::invalid(
                "byzantine_threshold",
                format!(
                    "{} with {members} members ({asked} Byzantine replicas)",
                    self.fault_threshold
                ),
                "n members tolerate at most f = (n - 1) / 3 Byzantine replicas (3f + 1 <= n): \
                 add members or lower the threshold",
            );
        }
        Ok(())
    }
}

/// One offender, as an engine learned of it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Detection {
    /// The replica proven Byzantine.
    pub offender: NodeId,
    /// What it did ([`Offence::as_str`]).
    pub offence: &'static str,
}

/// What an engine knows about Byzantine replicas ([`ConsensusEngine::byzantine_report`]).
///
/// [`ConsensusEngine::byzantine_report`]: crate::ConsensusEngine::byzantine_report
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ByzantineReport {
    /// Every offender this node holds evidence against, in the order it learned of them.
    pub detections: Vec<Detection>,
    /// The offenders whose messages this node drops and whom it counts toward no quorum.
    pub excluded: Vec<NodeId>,
}

/// Collects the detections of the engines it is registered with (the seed's
/// `ByzantineDetector`). Cheap to clone; clones share what they saw.
#[derive(Clone, Debug, Default)]
pub struct ByzantineDetector {
    seen: Arc<Mutex<Vec<Detection>>>,
}

impl ByzantineDetector {
    /// A detector that has seen nothing.
    pub fn new() -> Self {
        Self::default()
    }

    /// Every detection seen so far, in order.
    pub fn detections(&self) -> Vec<Detection> {
        lock(&self.seen).clone()
    }

    /// The distinct offenders seen so far.
    pub fn offenders(&self) -> Vec<NodeId> {
        let mut offenders: Vec<NodeId> = lock(&self.seen).iter().map(|d| d.offender).collect();
        offenders.sort();
        offenders.dedup();
        offenders
    }

    pub(crate) fn observe(&self, detection: &Detection) {
        lock(&self.seen).push(detection.clone());
    }
}

/// What the engine and its driver share about Byzantine replicas.
#[derive(Default)]
pub(crate) struct ByzantineState {
    pub(crate) report: ByzantineReport,
    pub(crate) detectors: Vec<ByzantineDetector>,
    pub(crate) callbacks: Vec<Box<dyn Fn(NodeId) + Send>>,
    pub(crate) policy: PunishmentPolicy,
}

impl ByzantineState {
    /// Records a detection from the core and tells everyone registered.
    pub(crate) fn detected(&mut self, offender: NodeId, offence: &'static str) {
        if self
            .report
            .detections
            .iter()
            .any(|d| d.offender == offender)
        {
            return;
        }
        let detection = Detection { offender, offence };
        if self.policy == PunishmentPolicy::Exclude {
            self.report.excluded.push(offender);
        }
        for detector in &self.detectors {
            detector.observe(&detection);
        }
        for callback in &self.callbacks {
            callback(offender);
        }
        self.report.detections.push(detection);
    }
}

/// Shared between the engine and its driver thread.
pub(crate) type SharedByzantine = Arc<Mutex<ByzantineState>>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_threshold_the_members_cannot_honour_is_refused_with_the_reason() {
        let config = ByzantineConfig::default();
        let error = config.validate_for(3).unwrap_err().to_string();
        assert!(error.contains("3f + 1"), "{error}");
        for members in [4, 7, 10, 31, 100] {
            config.validate_for(members).unwrap();
        }
        assert!(config.fault_threshold(0.5).validate_for(100).is_err());
        assert!(config.fault_threshold(-0.1).validate_for(100).is_err());
        ByzantineConfig::default()
            .fault_threshold(0.0)
            .validate_for(1)
            .unwrap();
    }

    #[test]
    fn a_detection_reaches_detectors_and_callbacks_once_per_offender() {
        let detector = ByzantineDetector::new();
        let calls = Arc::new(Mutex::new(Vec::new()));
        let mut state = ByzantineState {
            detectors: vec![detector.clone()],
            ..ByzantineState::default()
        };
        let seen = calls.clone();
        state
            .callbacks
            .push(Box::new(move |node| lock(&seen).push(node)));
        state.detected(NodeId(3), "double_vote");
        state.detected(NodeId(3), "equivocating_primary");
        state.detected(NodeId(4), "double_vote");
        assert_eq!(detector.offenders(), vec![NodeId(3), NodeId(4)]);
        assert_eq!(*lock(&calls), vec![NodeId(3), NodeId(4)]);
        assert_eq!(state.report.excluded, vec![NodeId(3), NodeId(4)]);
    }
}
