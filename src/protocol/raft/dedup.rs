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
    /// The newest run of the proposer seen last, extended here without a map look-up while ids
    /// keep coming in sequence from that proposer (the common case: a profile put two map
    /// searches per applied entry at a tenth of the driver's work). The map's copy of this run
    /// may end lower until [`AppliedProposals::settle`] writes it back.
    hot: Option<HotRun>,
}

/// The run [`AppliedProposals::hot`] extends: always its proposer's newest (highest) run, so
/// the id after its end cannot be in any run.
#[derive(Clone, Copy, Debug)]
struct HotRun {
    proposer: NodeId,
    start: u64,
    end: u64,
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
        if let Some(hot) = self.hot.as_mut()
            && hot.proposer == tag.proposer
            && hot.end.checked_add(1) == Some(tag.request_id)
        {
            hot.end = tag.request_id;
            return true;
        }
        self.settle();
        let runs = self.per_proposer.entry(tag.proposer).or_default();
        let first = runs.insert(tag.request_id);
        self.hot = runs.runs.last_key_value().map(|(&start, &end)| HotRun {
            proposer: tag.proposer,
            start,
            end,
        });
        first
    }

    /// True if `tag` was applied (without recording anything).
    pub fn contains(&self, tag: ProposalTag) -> bool {
        if let Some(hot) = &self.hot
            && hot.proposer == tag.proposer
            && (hot.start..=hot.end).contains(&tag.request_id)
        {
            return true;
        }
        self.per_proposer.get(&tag.proposer).is_some_and(|runs| {
            runs.runs
                .range(..=tag.request_id)
                .next_back()
                .is_some_and(|(_, &end)| tag.request_id <= end)
        })
    }

    /// The table as bytes, for a snapshot (what [`AppliedProposals::decode`] reads back).
    pub fn encode(&self) -> Vec<u8> {
        let mut settled = self.clone();
        settled.settle();
        let table: Vec<(NodeId, Vec<(u64, u64)>)> = settled
            .per_proposer
            .iter()
            .map(|(&proposer, runs)| {
                let runs = runs
                    .runs
                    .iter()
                    .map(|(&start, &end)| (start, end))
                    .collect();
                (proposer, runs)
            })
            .collect();
        postcard::to_stdvec(&table).expect("encoding into a vector cannot fail")
    }

    /// The table [`AppliedProposals::encode`] wrote; refuses bytes it did not write (runs out
    /// of order, overlapping or backwards, or more than [`DEDUP_RUNS_PER_PROPOSER`] of them).
    pub fn decode(bytes: &[u8]) -> Result<Self, String> {
        let table: Vec<(NodeId, Vec<(u64, u64)>)> =
            crate::encoding::decode_whole(bytes).map_err(|e| format!("applied proposals: {e}"))?;
        let mut per_proposer = BTreeMap::new();
        for (proposer, runs) in table {
            let ordered = runs.iter().all(|&(start, end)| start <= end)
                && runs.windows(2).all(|pair| pair[0].1 < pair[1].0);
            if !ordered || runs.len() > DEDUP_RUNS_PER_PROPOSER {
                return Err(format!(
                    "applied proposals: the runs of {proposer:?} are not disjoint and ordered"
                ));
            }
            let runs = IdRuns {
                runs: runs.into_iter().collect(),
            };
            if per_proposer.insert(proposer, runs).is_some() {
                return Err(format!("applied proposals: {proposer:?} appears twice"));
            }
        }
        Ok(AppliedProposals {
            per_proposer,
            hot: None,
        })
    }

    /// Writes the hot run's end back into the map.
    fn settle(&mut self) {
        if let Some(hot) = self.hot.take()
            && let Some(end) = self
                .per_proposer
                .get_mut(&hot.proposer)
                .and_then(|runs| runs.runs.get_mut(&hot.start))
        {
            *end = hot.end;
        }
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
        assert!(applied.contains(tag(1, 4)) && applied.contains(tag(1, 5)));
        assert!(!applied.contains(tag(1, 6)) && !applied.contains(tag(3, 5)));
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
    fn interleaved_proposers_and_late_duplicates_are_told_apart() {
        let mut applied = AppliedProposals::new();
        for id in 100..110 {
            assert!(applied.first_application(tag(1, id)));
        }
        assert!(
            applied.first_application(tag(2, 105)),
            "same id, other proposer"
        );
        assert!(
            !applied.first_application(tag(1, 109)),
            "proposer 1's run was kept"
        );
        assert!(applied.first_application(tag(1, 110)));
        assert!(
            !applied.first_application(tag(1, 100)),
            "duplicate of the run's start"
        );
        assert!(
            applied.first_application(tag(1, 200)),
            "a gap starts a new run"
        );
        assert!(applied.first_application(tag(1, 201)));
        assert!(applied.first_application(tag(1, 150)), "inside the gap");
        for id in [100, 105, 110, 150, 200, 201] {
            assert!(!applied.first_application(tag(1, id)), "{id} again");
        }
        assert!(!applied.first_application(tag(2, 105)));
        applied.settle();
        let runs: Vec<(u64, u64)> = applied.per_proposer[&NodeId(1)]
            .runs
            .iter()
            .map(|(&s, &e)| (s, e))
            .collect();
        assert_eq!(runs, vec![(100, 110), (150, 150), (200, 201)]);
    }

    #[test]
    fn the_table_survives_encoding_and_damage_is_refused() {
        let mut applied = AppliedProposals::new();
        for id in (100..110).chain([150, 200, 201]) {
            applied.first_application(tag(1, id));
        }
        applied.first_application(tag(2, 7));
        let mut decoded = AppliedProposals::decode(&applied.encode()).unwrap();
        for id in (100..110).chain([150, 200, 201]) {
            assert!(!decoded.first_application(tag(1, id)), "{id} was applied");
        }
        assert!(!decoded.first_application(tag(2, 7)));
        assert!(decoded.first_application(tag(1, 110)));
        assert!(decoded.first_application(tag(3, 1)));
        let backwards = postcard::to_stdvec(&vec![(NodeId(1), vec![(5u64, 3u64)])]).unwrap();
        assert!(AppliedProposals::decode(&backwards).is_err());
        let overlapping =
            postcard::to_stdvec(&vec![(NodeId(1), vec![(1u64, 5u64), (5, 9)])]).unwrap();
        assert!(AppliedProposals::decode(&overlapping).is_err());
        assert!(AppliedProposals::decode(&[0xff, 0xff]).is_err());
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
