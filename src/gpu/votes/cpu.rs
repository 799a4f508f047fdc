//! The CPU backend: one pass over the votes on one core, the reference the GPU backend is tested
//! against.
//!
//! Each ballot `(term, voter)` has a state word: empty, the index of its first vote, or that index
//! with [`FLAG`] set once a different vote showed up. The first vote of a ballot is added to its
//! proposal's tally at once; when the ballot turns out to equivocate, that vote is taken back out
//! and the ballot's two smallest distinct votes are tracked from then on. While the batch has few
//! terms and small voter indices (the usual case) the states live in one array per term indexed
//! by voter, grown on demand; the first vote that breaks that shape moves them to a hash map and
//! the pass goes on from there.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::{Arc, Mutex};

use futures::future::BoxFuture;

use super::{
    Equivocation, RawTally, Threshold, Vote, VoteAggregator, VoteError, VoteOutcome, finish,
};

/// Ballot state: no vote yet.
const EMPTY: u32 = u32::MAX;
/// Ballot state bit: the ballot equivocates.
const FLAG: u32 = 1 << 31;
/// Most votes one call takes: a vote index must fit beside [`FLAG`] without reaching [`EMPTY`].
pub(crate) const MAX_CPU_VOTES: usize = (FLAG - 1) as usize;
/// Most ballot slots kept between calls (64 MiB).
pub const MAX_RECYCLED_SLOTS: usize = 1 << 24;
/// Most distinct terms for the per-term ballot arrays.
const MAX_DENSE_TERMS: usize = 8;
/// The per-term ballot arrays may hold [`MAX_DENSE_TERMS`] slots per vote plus this many (small
/// batches with voter indices up to 65535 stay in arrays).
const DENSE_SLACK_SLOTS: usize = 1 << 16;

/// A multiply-rotate hasher for the integer keys of this module (std's SipHash costs more than the
/// rest of the per-vote work). Not flood-resistant: inputs come from the node's own batches.
#[derive(Default, Clone, Copy)]
struct IntHasher(u64);

impl Hasher for IntHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &byte in bytes {
            self.write_u64(u64::from(byte));
        }
    }

    fn write_u32(&mut self, value: u32) {
        self.write_u64(u64::from(value));
    }

    fn write_u64(&mut self, value: u64) {
        self.0 = (self.0.rotate_left(5) ^ value).wrapping_mul(0x51_7c_c1_b7_27_22_0a_95);
    }
}

type IntMap<K, V> = HashMap<K, V, BuildHasherDefault<IntHasher>>;

/// Where ballot states live.
trait BallotStates {
    /// The state word of ballot `(term, voter)`, or `None` if this store cannot hold it (the
    /// caller then moves to a store that can).
    fn state(&mut self, term: u64, voter: u32) -> Option<&mut u32>;
}

/// One array per term, indexed by voter, for at most [`MAX_DENSE_TERMS`] terms and at most
/// `max_slots` slots in all.
struct DenseBallots {
    terms: Vec<u64>,
    states: Vec<Vec<u32>>,
    /// Index in `terms` of the term of the previous vote, and that term (`None` before the
    /// first vote), so that a run of one term costs one comparison.
    current: usize,
    current_term: Option<u64>,
    slots: usize,
    max_slots: usize,
    /// All-empty arrays of an earlier call, reused for new terms (saves page faults).
    recycled: Vec<Vec<u32>>,
}

impl DenseBallots {
    fn new(max_slots: usize, recycled: Vec<Vec<u32>>) -> Self {
        Self {
            terms: Vec::with_capacity(MAX_DENSE_TERMS),
            states: Vec::with_capacity(MAX_DENSE_TERMS),
            current: 0,
            current_term: None,
            slots: 0,
            max_slots,
            recycled,
        }
    }

    /// Resets the arrays to empty and hands them back for the next call, if they are small
    /// enough to keep.
    fn recycle(mut self) -> Vec<Vec<u32>> {
        if self.slots > MAX_RECYCLED_SLOTS {
            return Vec::new();
        }
        for states in &mut self.states {
            states.fill(EMPTY);
        }
        self.states.append(&mut self.recycled);
        self.states
    }

    #[inline]
    fn select_term(&mut self, term: u64) -> Option<()> {
        if let Some(slot) = self.terms.iter().position(|&known| known == term) {
            self.current = slot;
        } else if self.terms.len() == MAX_DENSE_TERMS {
            return None;
        } else {
            let mut states = self.recycled.pop().unwrap_or_default();
            states.truncate(self.max_slots.saturating_sub(self.slots));
            self.slots += states.len();
            self.terms.push(term);
            self.states.push(states);
            self.current = self.terms.len() - 1;
        }
        self.current_term = Some(term);
        Some(())
    }

    #[cold]
    fn grow(&mut self, voter: usize) -> Option<()> {
        let states = &mut self.states[self.current];
        let needed = voter + 1;
        // Doubling stops at a per-term share of the bound, so that eight terms of voters up to
        // the batch size all fit.
        let share = self.max_slots / MAX_DENSE_TERMS;
        let doubled = needed.max((2 * states.len()).max(1024).min(share));
        let length = if self.slots - states.len() + doubled <= self.max_slots {
            doubled
        } else if self.slots - states.len() + needed <= self.max_slots {
            needed
        } else {
            return None;
        };
        self.slots = self.slots - states.len() + length;
        states.resize(length, EMPTY);
        Some(())
    }

    /// Moves every state into a hash map.
    fn into_sparse(self) -> SparseBallots {
        let mut sparse = SparseBallots {
            states: IntMap::default(),
        };
        for (term, states) in self.terms.iter().zip(&self.states) {
            for (voter, &state) in states.iter().enumerate() {
                if state != EMPTY {
                    // `voter` < states.len() <= u32::MAX + 1 slots were indexed by a u32.
                    sparse.states.insert((*term, voter as u32), state);
                }
            }
        }
        sparse
    }
}

impl BallotStates for DenseBallots {
    #[inline(always)]
    fn state(&mut self, term: u64, voter: u32) -> Option<&mut u32> {
        if self.current_term != Some(term) {
            self.select_term(term)?;
        }
        let voter = voter as usize;
        if voter >= self.states[self.current].len() {
            self.grow(voter)?;
        }
        self.states[self.current].get_mut(voter)
    }
}

/// Hash map for everything else.
struct SparseBallots {
    states: IntMap<(u64, u32), u32>,
}

impl BallotStates for SparseBallots {
    #[inline(always)]
    fn state(&mut self, term: u64, voter: u32) -> Option<&mut u32> {
        Some(self.states.entry((term, voter)).or_insert(EMPTY))
    }
}

/// Tallies by `(term, proposal_id)`, with a one-entry cache for runs of the same proposal.
#[derive(Default)]
struct Tallies {
    ids: IntMap<(u64, u64), usize>,
    keys: Vec<(u64, u64)>,
    /// `[no_count, yes_count, no_weight, yes_weight]`, indexed by `approve as usize` (+ 2 for
    /// weights) so that the hot loop has no data-dependent branch.
    sums: Vec<[u64; 4]>,
    last_key: Option<(u64, u64)>,
    last_id: usize,
}

impl Tallies {
    #[inline(always)]
    fn id(&mut self, term: u64, proposal_id: u64) -> usize {
        let key = (term, proposal_id);
        if self.last_key == Some(key) {
            return self.last_id;
        }
        let next = self.keys.len();
        let id = *self.ids.entry(key).or_insert(next);
        if id == next {
            self.keys.push(key);
            self.sums.push([0; 4]);
        }
        self.last_key = Some(key);
        self.last_id = id;
        id
    }

    #[inline(always)]
    fn add(&mut self, id: usize, vote: &Vote) {
        let side = usize::from(vote.approve);
        let sums = &mut self.sums[id];
        sums[side] += 1;
        sums[side + 2] += u64::from(vote.weight);
    }

    fn remove(&mut self, vote: &Vote) {
        let id = self.ids[&(vote.term, vote.proposal_id)];
        let side = usize::from(vote.approve);
        let sums = &mut self.sums[id];
        sums[side] -= 1;
        sums[side + 2] -= u64::from(vote.weight);
    }

    fn into_raw(self) -> Vec<RawTally> {
        self.keys
            .iter()
            .zip(&self.sums)
            .map(|(&(term, proposal_id), sums)| RawTally {
                term,
                proposal_id,
                yes_count: sums[1],
                no_count: sums[0],
                yes_weight: sums[3],
                no_weight: sums[2],
            })
            .collect()
    }
}

/// The two smallest distinct votes of an equivocating ballot seen so far (`first < second`).
fn track_smallest(pair: &mut (Vote, Vote), vote: &Vote) {
    let key = vote.ballot_order_key();
    if key == pair.0.ballot_order_key() || key == pair.1.ballot_order_key() {
        return;
    }
    if key < pair.0.ballot_order_key() {
        pair.1 = pair.0;
        pair.0 = *vote;
    } else if key < pair.1.ballot_order_key() {
        pair.1 = *vote;
    }
}

fn ordered(a: Vote, b: Vote) -> (Vote, Vote) {
    if a.ballot_order_key() <= b.ballot_order_key() {
        (a, b)
    } else {
        (b, a)
    }
}

/// Everything one pass accumulates besides the ballot states.
#[derive(Default)]
struct Pass {
    tallies: Tallies,
    evidence: IntMap<(u64, u32), (Vote, Vote)>,
}

impl Pass {
    /// Processes `votes[start..]`; stops early and returns the index of the first vote `ballots`
    /// cannot hold.
    fn run<B: BallotStates>(
        &mut self,
        votes: &[Vote],
        start: usize,
        ballots: &mut B,
    ) -> Option<usize> {
        for (index, vote) in votes.iter().enumerate().skip(start) {
            let id = self.tallies.id(vote.term, vote.proposal_id);
            let Some(state) = ballots.state(vote.term, vote.voter) else {
                return Some(index);
            };
            if *state == EMPTY {
                // `index` < MAX_CPU_VOTES, checked by the caller.
                *state = index as u32;
                self.tallies.add(id, vote);
            } else if *state & FLAG == 0 {
                let first = &votes[*state as usize];
                if first != vote {
                    *state |= FLAG;
                    self.tallies.remove(first);
                    self.evidence
                        .insert((vote.term, vote.voter), ordered(*first, *vote));
                }
            } else if let Some(pair) = self.evidence.get_mut(&(vote.term, vote.voter)) {
                track_smallest(pair, vote);
            }
        }
        None
    }

    fn finish(self, threshold: Threshold) -> VoteOutcome {
        let equivocations = self
            .evidence
            .into_iter()
            .map(|((term, voter), (first, second))| Equivocation {
                voter,
                term,
                first,
                second,
            })
            .collect();
        finish(self.tallies.into_raw(), equivocations, threshold)
    }
}

/// Runs the pass with per-term arrays, moving to a hash map at the first vote that does not fit
/// them (a ninth term, or voter indices far beyond the batch size).
fn aggregate(votes: &[Vote], threshold: Threshold, scratch: &Mutex<Vec<Vec<u32>>>) -> VoteOutcome {
    let mut pass = Pass::default();
    // Room for every term to index voters up to the batch size: voters numbered 0..n over a
    // few terms (the usual shape) never leave the arrays.
    let max_slots = MAX_DENSE_TERMS * votes.len() + DENSE_SLACK_SLOTS;
    // A concurrent call keeps the scratch arrays; this one then allocates its own.
    let recycled = scratch
        .try_lock()
        .map(|mut kept| std::mem::take(&mut *kept))
        .unwrap_or_default();
    let mut dense = DenseBallots::new(max_slots, recycled);
    match pass.run(votes, 0, &mut dense) {
        None => {
            let arrays = dense.recycle();
            if let Ok(mut kept) = scratch.try_lock() {
                *kept = arrays;
            }
        }
        Some(stopped) => {
            let mut sparse = dense.into_sparse();
            let finished = pass.run(votes, stopped, &mut sparse);
            debug_assert!(finished.is_none(), "the hash map holds every ballot");
        }
    }
    pass.finish(threshold)
}

/// The CPU backend. See the [module documentation](super) for the semantics.
///
/// It keeps the per-term ballot arrays of its last call (at most [`MAX_RECYCLED_SLOTS`] slots,
/// 4 bytes each) to reuse them; clones share them.
#[derive(Debug, Clone, Default)]
pub struct CpuVoteAggregator {
    threshold: Threshold,
    scratch: Arc<Mutex<Vec<Vec<u32>>>>,
}

impl CpuVoteAggregator {
    /// An aggregator judging tallies by `threshold`.
    pub fn new(threshold: Threshold) -> Self {
        Self {
            threshold,
            scratch: Arc::default(),
        }
    }

    /// The threshold.
    pub fn threshold(&self) -> Threshold {
        self.threshold
    }

    /// Aggregates on the calling thread.
    pub fn aggregate_blocking(&self, votes: &[Vote]) -> Result<VoteOutcome, VoteError> {
        if votes.len() > MAX_CPU_VOTES {
            return Err(VoteError::TooManyVotes {
                votes: votes.len(),
                max: MAX_CPU_VOTES,
            });
        }
        Ok(aggregate(votes, self.threshold, &self.scratch))
    }
}

impl VoteAggregator for CpuVoteAggregator {
    fn aggregate_votes<'a>(
        &'a self,
        votes: &'a [Vote],
    ) -> BoxFuture<'a, Result<VoteOutcome, VoteError>> {
        Box::pin(async move { self.aggregate_blocking(votes) })
    }

    fn threshold(&self) -> Threshold {
        self.threshold
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(votes: &[Vote], threshold: Threshold) -> VoteOutcome {
        CpuVoteAggregator::new(threshold)
            .aggregate_blocking(votes)
            .unwrap()
    }

    #[test]
    fn seed_example_counts_and_passes() {
        let votes = [
            Vote::new(1, 7, true),
            Vote::new(2, 7, true),
            Vote::new(3, 7, false),
        ];
        let summary = run(&votes, Threshold::default()).summary().unwrap();
        assert!(summary.passed);
        assert_eq!((summary.yes_count, summary.no_count), (2, 1));
        assert_eq!(summary.tally.voters, 3);
        assert_eq!(summary.equivocations, 0);
    }

    #[test]
    fn empty_input_gives_empty_outcome() {
        assert_eq!(run(&[], Threshold::default()), VoteOutcome::default());
    }

    #[test]
    fn exact_duplicates_count_once() {
        let vote = Vote::new(4, 1, true).with_weight(5);
        let outcome = run(&[vote, vote, vote], Threshold::Majority { electorate: 1 });
        let tally = outcome.tally(0, 1).unwrap();
        assert_eq!((tally.yes_count, tally.yes_weight, tally.voters), (1, 5, 1));
        assert!(tally.passed);
        assert!(outcome.equivocations.is_empty());
    }

    #[test]
    fn yes_and_no_from_one_voter_is_evidence_and_counts_for_nothing() {
        let votes = [
            Vote::new(9, 1, true),
            Vote::new(2, 1, true),
            Vote::new(9, 1, false),
            Vote::new(9, 1, true),
        ];
        let outcome = run(&votes, Threshold::Majority { electorate: 3 });
        let tally = outcome.tally(0, 1).unwrap();
        assert_eq!((tally.yes_count, tally.no_count), (1, 0));
        assert!(
            !tally.passed,
            "1 of 3 is no majority once the equivocator is dropped"
        );
        assert_eq!(
            outcome.equivocations,
            vec![Equivocation {
                voter: 9,
                term: 0,
                first: Vote::new(9, 1, false),
                second: Vote::new(9, 1, true),
            }]
        );
    }

    #[test]
    fn two_proposals_in_one_term_names_the_two_smallest_votes() {
        let votes = [
            Vote::new(3, 30, true).in_term(5),
            Vote::new(3, 20, true).in_term(5),
            Vote::new(3, 10, false).in_term(5),
            Vote::new(3, 20, true).in_term(5),
            Vote::new(3, 10, false).in_term(6),
        ];
        let outcome = run(&votes, Threshold::default());
        assert_eq!(outcome.equivocations.len(), 1);
        let evidence = outcome.equivocations[0];
        assert_eq!((evidence.voter, evidence.term), (3, 5));
        assert_eq!(evidence.first.proposal_id, 10);
        assert_eq!(evidence.second.proposal_id, 20);
        // Every proposal named in the input has a tally; only the term-6 vote counts.
        let keys: Vec<_> = outcome
            .tallies
            .iter()
            .map(|t| (t.term, t.proposal_id, t.no_count + t.yes_count))
            .collect();
        assert_eq!(keys, vec![(5, 10, 0), (5, 20, 0), (5, 30, 0), (6, 10, 1)]);
    }

    #[test]
    fn different_weights_for_the_same_choice_are_an_equivocation() {
        let votes = [Vote::new(1, 1, true).with_weight(2), Vote::new(1, 1, true)];
        let outcome = run(&votes, Threshold::default());
        assert_eq!(outcome.equivocations[0].first.weight, 1);
        assert_eq!(outcome.equivocations[0].second.weight, 2);
        assert_eq!(outcome.tallies[0].voters, 0);
    }

    #[test]
    fn byzantine_threshold_edges_on_a_batch() {
        // n = 7 = 3f + 1 with f = 2: 5 approvals pass, 4 do not.
        let threshold = Threshold::ByzantineQuorum { replicas: 7 };
        let votes: Vec<Vote> = (0..7).map(|voter| Vote::new(voter, 1, voter < 4)).collect();
        assert!(!run(&votes, threshold).summary().unwrap().passed);
        let votes: Vec<Vote> = (0..7).map(|voter| Vote::new(voter, 1, voter < 5)).collect();
        assert!(run(&votes, threshold).summary().unwrap().passed);
    }

    #[test]
    fn weights_sum_exactly_past_u32() {
        let votes: Vec<Vote> = (0..4)
            .map(|voter| Vote::new(voter, 1, true).with_weight(u32::MAX))
            .collect();
        let tally = run(
            &votes,
            Threshold::WeightedMajority {
                total_weight: 8 * u64::from(u32::MAX),
            },
        )
        .tallies[0];
        assert_eq!(tally.yes_weight, 4 * u64::from(u32::MAX));
        assert!(!tally.passed, "exactly half is not a majority");
    }

    #[test]
    fn reused_ballot_arrays_start_empty() {
        let reused = CpuVoteAggregator::new(Threshold::default());
        let batches: Vec<Vec<Vote>> = vec![
            (0..3000)
                .map(|voter| Vote::new(voter, 1, true).in_term(2))
                .collect(),
            (0..10)
                .map(|voter| Vote::new(voter, 1, false).in_term(2))
                .collect(),
            (0..5000)
                .map(|voter| Vote::new(voter % 7, 2, voter % 2 == 0))
                .collect(),
            (0..100)
                .map(|voter| Vote::new(voter, 3, true).in_term(voter.into()))
                .collect(),
            Vec::new(),
        ];
        for batch in batches.iter().chain(&batches) {
            assert_eq!(
                reused.aggregate_blocking(batch).unwrap(),
                run(batch, Threshold::default())
            );
        }
    }

    #[test]
    fn dense_and_sparse_ballot_states_agree() {
        // The same votes with small voter indices (per-term arrays), with huge ones (hash map
        // from the start), and with one huge index in the middle (move to the map mid-pass).
        let mut state = 12345u64;
        let mut next = || {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            state >> 33
        };
        let votes: Vec<Vote> = (0..5000)
            .map(|_| {
                Vote::new((next() % 300) as u32, next() % 4, next() % 2 == 0).in_term(next() % 3)
            })
            .collect();
        let dense = run(&votes, Threshold::default());
        assert!(!dense.equivocations.is_empty());
        let mut mixed = votes.clone();
        mixed[2500].voter = u32::MAX;
        mixed[2500].term = 99;
        let mut expected = votes.clone();
        expected[2500] = mixed[2500];
        assert_eq!(
            run(&mixed, Threshold::default()),
            run(&expected, Threshold::default())
        );
        let scale = 10_000_000;
        let spread: Vec<Vote> = votes
            .iter()
            .map(|v| Vote {
                voter: v.voter * scale,
                ..*v
            })
            .collect();
        let sparse = run(&spread, Threshold::default());
        assert_eq!(dense.tallies, sparse.tallies);
        let unscale = |e: &Equivocation| {
            (
                e.term,
                e.voter / scale,
                e.first.proposal_id,
                e.second.proposal_id,
            )
        };
        let key = |e: &Equivocation| (e.term, e.voter, e.first.proposal_id, e.second.proposal_id);
        assert_eq!(
            sparse.equivocations.iter().map(unscale).collect::<Vec<_>>(),
            dense.equivocations.iter().map(key).collect::<Vec<_>>()
        );
        // Nine terms also leave the arrays.
        let terms: Vec<Vote> = (0..9)
            .map(|term| Vote::new(1, 1, true).in_term(term))
            .collect();
        assert_eq!(run(&terms, Threshold::default()).tallies.len(), 9);
    }
}
