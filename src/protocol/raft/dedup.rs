//! Applying each proposal once even when it was appended twice.
//!
//! A follower forwards a proposal to the leader in a [`Message::ForwardProposals`]; if the
//! network duplicates that message, the leader appends the proposal twice and both copies
//! commit. Appending cannot be prevented in general (a duplicate may reach a later leader that
//! never saw the first copy), so drivers filter at apply time instead: the decision depends only
//! on the committed log, hence is the same on every replica.
//!
//! [`Message::ForwardProposals`]: crate::protocol::raft::Message::ForwardProposals

use std::collections::{BTreeMap, BTreeSet};

use crate::types::{NodeId, ProposalTag};

/// Request ids remembered per proposer. A duplicate arriving after this many later proposals of
/// the same proposer were applied would be applied again; proposers restart their request ids
/// from a random base, so ids are not assumed to be monotonic across restarts.
pub const DEDUP_WINDOW_PER_PROPOSER: usize = 65_536;

/// Remembers recently applied proposal tags.
#[derive(Clone, Debug, Default)]
pub struct AppliedProposals {
    per_proposer: BTreeMap<NodeId, BTreeSet<u64>>,
}

impl AppliedProposals {
    /// Nothing applied yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Records `tag` and returns true the first time it is seen (apply the entry), false for a
    /// duplicate (skip it).
    pub fn first_application(&mut self, tag: ProposalTag) -> bool {
        let seen = self.per_proposer.entry(tag.proposer).or_default();
        if !seen.insert(tag.request_id) {
            return false;
        }
        if seen.len() > DEDUP_WINDOW_PER_PROPOSER {
            seen.pop_first();
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tag(proposer: u64, request_id: u64) -> ProposalTag {
        ProposalTag {
            proposer: NodeId(proposer),
            request_id,
        }
    }

    #[test]
    fn a_tag_applies_once_per_proposer() {
        let mut applied = AppliedProposals::new();
        assert!(applied.first_application(tag(1, 5)));
        assert!(
            applied.first_application(tag(2, 5)),
            "another proposer's id 5 is different"
        );
        assert!(!applied.first_application(tag(1, 5)));
        assert!(
            applied.first_application(tag(1, 4)),
            "out-of-order ids are fine"
        );
    }

    #[test]
    fn memory_stays_within_the_window() {
        let mut applied = AppliedProposals::new();
        for id in 0..(DEDUP_WINDOW_PER_PROPOSER as u64 + 10) {
            assert!(applied.first_application(tag(1, id)));
        }
        assert_eq!(
            applied.per_proposer[&NodeId(1)].len(),
            DEDUP_WINDOW_PER_PROPOSER
        );
        assert!(
            !applied.first_application(tag(1, DEDUP_WINDOW_PER_PROPOSER as u64 + 5)),
            "recent ids are remembered"
        );
    }
}
