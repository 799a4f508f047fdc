//! Applying each proposal once even when it was appended twice.
//!
//! A follower forwards a proposal to the leader in a [`Message::ForwardProposals`]; if the
//! network duplicates that message, the leader appends the proposal twice and both copies
//! commit. Appending cannot be prevented in general (a duplicate may reach a later leader that
//! never saw the first copy), so drivers filter at apply time instead: the decision depends only
//! on the committed log, hence is the same on every replica.
//!
//! [`Message::ForwardProposals`]: crate::protocol::raft::Message::ForwardProposals

use std::collections::BTreeMap;

use crate::types::{NodeId, ProposalTag};

/// Runs of consecutive request ids remembered per proposer. Ids are consecutive per proposer
/// except where a proposal was refused or lost, so a run usually covers thousands of proposals;
/// past this many runs the lowest is forgotten, and a duplicate of a proposal in it would be
/// applied again. Proposers restart their ids from a random base, so no order across restarts is
/// assumed.
pub const DEDUP_RUNS_PER_PROPOSER: usize = 4096;

/// Remembers which proposals were applied.
///
/// The state depends only on the order of application, so every replica decides alike.
#[derive(Clone, Debug, Default)]
pub struct AppliedProposals {
    per_proposer: BTreeMap<NodeId, IdRuns>,
}

/// Disjoint runs of ids: start → end (inclusive).
#[derive(Clone, Debug, Default)]
struct IdRuns {
    runs: BTreeMap<u64, u64>,
}

impl IdRuns {
    /// Adds `id`; false if it was already present.
    fn insert(&mut self, id: u64) -> bool {
        // The common case: the next id of the newest run.
        if let Some(mut last) = self.runs.last_entry()
            && last.get().checked_add(1) == Some(id)
        {
            *last.get_mut() = id;
            return true;
        }
        let before = self
            .runs
            .range(..=id)
            .next_back()
            .map(|(&start, &end)| (start, end));
        if before.is_some_and(|(_, end)| id <= end) {
            return false;
        }
        let joins_before = before.filter(|&(_, end)| end.checked_add(1) == Some(id));
        let after = id
            .checked_add(1)
            .and_then(|next| self.runs.get(&next).map(|&end| (next, end)));
        match (joins_before, after) {
            (Some((start, _)), Some((next, end))) => {
                self.runs.remove(&next);
                self.runs.insert(start, end);
            }
            (Some((start, _)), None) => {
                self.runs.insert(start, id);
            }
            (None, Some((next, end))) => {
                self.runs.remove(&next);
                self.runs.insert(id, end);
            }
            (None, None) => {
                self.runs.insert(id, id);
                if self.runs.len() > DEDUP_RUNS_PER_PROPOSER {
                    self.runs.pop_first();
                }
            }
        }
        true
    }
}

impl AppliedProposals {
    /// Nothing applied yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Records `tag` and returns true the first time it is seen (apply the entry), false for a
    /// duplicate (skip it).
    pub fn first_application(&mut self, tag: ProposalTag) -> bool {
        self.per_proposer
            .entry(tag.proposer)
            .or_default()
            .insert(tag.request_id)
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
    fn runs_merge_from_both_sides() {
        let mut runs = IdRuns::default();
        for id in [5, 7, 6, 4, 9, u64::MAX, 0] {
            assert!(runs.insert(id), "{id}");
        }
        assert_eq!(
            runs.runs.iter().map(|(&s, &e)| (s, e)).collect::<Vec<_>>(),
            vec![(0, 0), (4, 7), (9, 9), (u64::MAX, u64::MAX)]
        );
        for id in [4, 5, 6, 7, 9, u64::MAX, 0] {
            assert!(!runs.insert(id), "{id} is a duplicate");
        }
        assert!(runs.insert(8));
        assert_eq!(runs.runs.len(), 3, "8 joins 4..=7 and 9");
    }

    #[test]
    fn memory_stays_bounded() {
        let mut applied = AppliedProposals::new();
        for run in 0..(DEDUP_RUNS_PER_PROPOSER as u64 + 10) {
            assert!(applied.first_application(tag(1, run * 10)));
        }
        let runs = &applied.per_proposer[&NodeId(1)].runs;
        assert_eq!(runs.len(), DEDUP_RUNS_PER_PROPOSER);
        assert!(
            applied.first_application(tag(1, 0)),
            "the lowest runs are forgotten first"
        );
        let recent = DEDUP_RUNS_PER_PROPOSER as u64 * 10;
        assert!(
            !applied.first_application(tag(1, recent)),
            "recent ids are remembered"
        );
    }
}
