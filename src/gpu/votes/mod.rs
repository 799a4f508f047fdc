//! Batch vote aggregation: one definition of what a batch of votes means, computed by a CPU
//! backend ([`CpuVoteAggregator`]) and a wgpu backend ([`GpuVoteAggregator`], WGSL in
//! `shaders/votes.wgsl`) that give identical answers, and an [`AdaptiveVoteAggregator`] that picks
//! the faster one by batch size.
//!
//! The wgpu backend and the adaptive aggregator need the `gpu` feature; the CPU backend and the
//! types below are always built.
//!
//! # Semantics (both backends, every input)
//!
//! A [`Vote`] is `(voter, proposal_id, term, approve, weight)`. A voter's *ballot* is the pair
//! `(term, voter)`: in one term (or view) a voter may cast one vote.
//!
//! 1. **Duplicates.** Votes equal in all five fields are one vote; copies are ignored.
//! 2. **Equivocation.** A ballot holding two or more *distinct* votes (two proposals, yes and no
//!    on one proposal, or the same choice with two weights) is an equivocation. It produces one
//!    [`Equivocation`] naming the voter, the term and the two smallest distinct votes of that
//!    ballot in the order `(proposal_id, approve, weight)` (`false < true`), and **none** of that
//!    ballot's votes count anywhere.
//! 3. **Tallies.** Every `(term, proposal_id)` that appears in the input gets one
//!    [`ProposalTally`], even if all its votes were discarded. A ballot that is not an
//!    equivocation counts once, for its proposal: in `yes_count`/`yes_weight` or
//!    `no_count`/`no_weight`. `voters = yes_count + no_count` is the number of distinct voters
//!    counted. Weights are summed exactly in `u64`.
//! 4. **Passing.** `passed` applies the aggregator's [`Threshold`] to the tally's counts or weights.
//! 5. **Order.** Tallies are sorted by `(term, proposal_id)`, equivocations by `(term, voter)`.
//!    Input order never matters, so outputs of the two backends compare with `==`.

#[cfg(feature = "gpu")]
mod adaptive;
mod cpu;
#[cfg(feature = "gpu")]
mod gpu;

use futures::future::BoxFuture;

#[cfg(feature = "gpu")]
#[cfg_attr(docsrs, doc(cfg(feature = "gpu")))]
pub use adaptive::{AdaptiveVoteAggregator, DEFAULT_GPU_CROSSOVER_VOTES, VoteBackend};
pub use cpu::{CpuVoteAggregator, MAX_RECYCLED_SLOTS};
#[cfg(feature = "gpu")]
#[cfg_attr(docsrs, doc(cfg(feature = "gpu")))]
pub use gpu::{GpuVote, GpuVoteAggregator, GpuVoteOptions, ResidentVotes, WGSL_VOTE_BYTES};

use crate::gpu::GpuError;

/// One vote.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Vote {
    /// Index of the voter in the electorate.
    pub voter: u32,
    /// The proposal voted on.
    pub proposal_id: u64,
    /// Term (Raft) or view (PBFT) the vote belongs to.
    pub term: u64,
    /// Approve (`true`) or reject.
    pub approve: bool,
    /// Voting weight; 1 unless the electorate is weighted.
    pub weight: u32,
}

impl Vote {
    /// A vote of weight 1 in term 0, as in the seed's `Vote::new(node, proposal_id, approve)`.
    pub fn new(voter: u32, proposal_id: u64, approve: bool) -> Self {
        Self {
            voter,
            proposal_id,
            term: 0,
            approve,
            weight: 1,
        }
    }

    /// The same vote in `term`.
    pub fn in_term(self, term: u64) -> Self {
        Self { term, ..self }
    }

    /// The same vote with `weight`.
    pub fn with_weight(self, weight: u32) -> Self {
        Self { weight, ..self }
    }

    /// The key that orders the votes of one ballot: `(proposal_id, approve, weight)`.
    pub fn ballot_order_key(&self) -> (u64, bool, u32) {
        (self.proposal_id, self.approve, self.weight)
    }
}

/// When a proposal passes. All comparisons are exact (`u128` arithmetic). The default is
/// [`Threshold::MajorityOfVotesCast`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Threshold {
    /// More yes than no among the votes counted (`yes_count > no_count`): the seed's behaviour,
    /// for callers that do not know the electorate.
    #[default]
    MajorityOfVotesCast,
    /// More than half of an electorate of `electorate` voters approve (`2 * yes_count >
    /// electorate`); abstentions count against.
    Majority {
        /// Size of the electorate (at least 1).
        electorate: u64,
    },
    /// Byzantine quorum of `replicas` replicas: with `f = (replicas - 1) / 3`, passes when
    /// `yes_count >= (replicas + f) / 2 + 1`, which is `2f + 1` for `replicas = 3f + 1` and stays
    /// a safe intersecting quorum for other sizes.
    ByzantineQuorum {
        /// Number of replicas `n` (at least 1).
        replicas: u64,
    },
    /// More than half of the total weight approves (`2 * yes_weight > total_weight`).
    WeightedMajority {
        /// Total weight of the electorate (at least 1).
        total_weight: u64,
    },
    /// More than two thirds of the total weight approves (`3 * yes_weight > 2 * total_weight`).
    WeightedByzantine {
        /// Total weight of the electorate (at least 1).
        total_weight: u64,
    },
}

impl Threshold {
    /// Rejects thresholds that no tally could meet sensibly (an empty electorate).
    pub fn validate(self) -> Result<Self, VoteError> {
        let size = match self {
            Threshold::MajorityOfVotesCast => 1,
            Threshold::Majority { electorate } => electorate,
            Threshold::ByzantineQuorum { replicas } => replicas,
            Threshold::WeightedMajority { total_weight }
            | Threshold::WeightedByzantine { total_weight } => total_weight,
        };
        if size == 0 {
            return Err(VoteError::InvalidThreshold {
                threshold: self,
                reason: "electorate size or total weight must be at least 1",
            });
        }
        Ok(self)
    }

    /// Yes votes needed by [`Threshold::ByzantineQuorum`] for `replicas` replicas.
    pub fn byzantine_quorum(replicas: u64) -> u64 {
        let faulty = replicas.saturating_sub(1) / 3;
        (replicas + faulty) / 2 + 1
    }

    /// Whether a tally with these counts and weights passes.
    pub fn passes(self, yes_count: u64, no_count: u64, yes_weight: u64) -> bool {
        let yes = u128::from(yes_count);
        let yes_weight = u128::from(yes_weight);
        match self {
            Threshold::MajorityOfVotesCast => yes_count > no_count,
            Threshold::Majority { electorate } => 2 * yes > u128::from(electorate),
            Threshold::ByzantineQuorum { replicas } => {
                yes_count >= Self::byzantine_quorum(replicas)
            }
            Threshold::WeightedMajority { total_weight } => {
                2 * yes_weight > u128::from(total_weight)
            }
            Threshold::WeightedByzantine { total_weight } => {
                3 * yes_weight > 2 * u128::from(total_weight)
            }
        }
    }
}

/// The result for one `(term, proposal_id)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ProposalTally {
    /// Term or view.
    pub term: u64,
    /// The proposal.
    pub proposal_id: u64,
    /// Distinct voters counted (`yes_count + no_count`); equivocators are not counted.
    pub voters: u64,
    /// Counted approvals.
    pub yes_count: u64,
    /// Counted rejections.
    pub no_count: u64,
    /// Sum of the weights of counted approvals.
    pub yes_weight: u64,
    /// Sum of the weights of counted rejections.
    pub no_weight: u64,
    /// Whether the aggregator's [`Threshold`] is met.
    pub passed: bool,
}

/// Evidence that `voter` cast two different votes in `term`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Equivocation {
    /// The equivocating voter.
    pub voter: u32,
    /// The term or view.
    pub term: u64,
    /// The smallest of the ballot's distinct votes in `(proposal_id, approve, weight)` order.
    pub first: Vote,
    /// The second smallest distinct vote; differs from `first`.
    pub second: Vote,
}

/// Everything a batch of votes says.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct VoteOutcome {
    /// One entry per `(term, proposal_id)` in the input, sorted by that pair.
    pub tallies: Vec<ProposalTally>,
    /// One entry per equivocating ballot, sorted by `(term, voter)`.
    pub equivocations: Vec<Equivocation>,
}

/// The seed's single-proposal result: `result.passed`, `result.yes_count`, `result.no_count`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VoteSummary {
    /// Whether the proposal passed.
    pub passed: bool,
    /// Counted approvals.
    pub yes_count: u64,
    /// Counted rejections.
    pub no_count: u64,
    /// The full tally.
    pub tally: ProposalTally,
    /// Equivocations found in the batch.
    pub equivocations: usize,
}

impl VoteOutcome {
    /// The summary of a batch about exactly one `(term, proposal_id)`.
    pub fn summary(&self) -> Result<VoteSummary, VoteError> {
        match self.tallies.as_slice() {
            [tally] => Ok(VoteSummary {
                passed: tally.passed,
                yes_count: tally.yes_count,
                no_count: tally.no_count,
                tally: *tally,
                equivocations: self.equivocations.len(),
            }),
            tallies => Err(VoteError::NotSingleProposal {
                proposals: tallies.len(),
            }),
        }
    }

    /// The tally of `(term, proposal_id)`, if any vote named it.
    pub fn tally(&self, term: u64, proposal_id: u64) -> Option<&ProposalTally> {
        self.tallies
            .binary_search_by_key(&(term, proposal_id), |tally| {
                (tally.term, tally.proposal_id)
            })
            .ok()
            .map(|index| &self.tallies[index])
    }
}

/// Raw sums for one `(term, proposal_id)`, before the threshold is applied. Both backends produce
/// these and share [`finish`] so that they cannot differ in the last step.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct RawTally {
    pub(crate) term: u64,
    pub(crate) proposal_id: u64,
    pub(crate) yes_count: u64,
    pub(crate) no_count: u64,
    pub(crate) yes_weight: u64,
    pub(crate) no_weight: u64,
}

impl RawTally {
    /// Adds another partial sum of the same `(term, proposal_id)`.
    pub(crate) fn merge(&mut self, other: &RawTally) {
        debug_assert_eq!(
            (self.term, self.proposal_id),
            (other.term, other.proposal_id)
        );
        self.yes_count += other.yes_count;
        self.no_count += other.no_count;
        self.yes_weight += other.yes_weight;
        self.no_weight += other.no_weight;
    }
}

/// Sorts, merges partial tallies of equal keys, applies the threshold.
pub(crate) fn finish(
    mut tallies: Vec<RawTally>,
    mut equivocations: Vec<Equivocation>,
    threshold: Threshold,
) -> VoteOutcome {
    tallies.sort_unstable_by_key(|tally| (tally.term, tally.proposal_id));
    let mut merged: Vec<RawTally> = Vec::with_capacity(tallies.len());
    for tally in tallies {
        match merged.last_mut() {
            Some(last) if (last.term, last.proposal_id) == (tally.term, tally.proposal_id) => {
                last.merge(&tally)
            }
            _ => merged.push(tally),
        }
    }
    equivocations.sort_unstable_by_key(|evidence| (evidence.term, evidence.voter));
    VoteOutcome {
        tallies: merged
            .into_iter()
            .map(|raw| ProposalTally {
                term: raw.term,
                proposal_id: raw.proposal_id,
                voters: raw.yes_count + raw.no_count,
                yes_count: raw.yes_count,
                no_count: raw.no_count,
                yes_weight: raw.yes_weight,
                no_weight: raw.no_weight,
                passed: threshold.passes(raw.yes_count, raw.no_count, raw.yes_weight),
            })
            .collect(),
        equivocations,
    }
}

/// Vote aggregation errors.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VoteError {
    /// The GPU backend failed (see [`GpuError::is_transient`] for which errors a CPU may answer).
    #[error(transparent)]
    Gpu(#[from] GpuError),
    /// A threshold that cannot be evaluated.
    #[error("invalid threshold {threshold:?}: {reason}")]
    InvalidThreshold {
        /// The threshold given.
        threshold: Threshold,
        /// Why it is invalid.
        reason: &'static str,
    },
    /// [`VoteOutcome::summary`] on a batch that is not about exactly one proposal.
    #[error("expected votes on exactly one proposal, found {proposals}")]
    NotSingleProposal {
        /// How many `(term, proposal_id)` pairs the batch named.
        proposals: usize,
    },
    /// More votes than one call takes.
    #[error("{votes} votes in one call; at most {max} are supported")]
    TooManyVotes {
        /// Votes given.
        votes: usize,
        /// The limit.
        max: usize,
    },
}

/// Aggregates batches of votes. Implementations give the answers the module documentation
/// defines, whatever the input order.
pub trait VoteAggregator: Send + Sync {
    /// Aggregates `votes`. GPU implementations block the calling task for at most the context's
    /// `kernel_launch_timeout` per wait; run them on a blocking thread in latency-sensitive tasks.
    fn aggregate_votes<'a>(
        &'a self,
        votes: &'a [Vote],
    ) -> BoxFuture<'a, Result<VoteOutcome, VoteError>>;

    /// The threshold tallies are judged by.
    fn threshold(&self) -> Threshold;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byzantine_quorum_is_two_f_plus_one_for_three_f_plus_one() {
        for faulty in 0..20u64 {
            assert_eq!(Threshold::byzantine_quorum(3 * faulty + 1), 2 * faulty + 1);
        }
        // n = 5 tolerates f = 1; two quorums of 4 intersect in 3 > f replicas.
        assert_eq!(Threshold::byzantine_quorum(5), 4);
        assert_eq!(Threshold::byzantine_quorum(1), 1);
    }

    #[test]
    fn thresholds_at_their_edges() {
        let majority = Threshold::Majority { electorate: 4 };
        assert!(!majority.passes(2, 0, 2), "2 of 4 is not a majority");
        assert!(majority.passes(3, 1, 3));
        let odd = Threshold::Majority { electorate: 5 };
        assert!(!odd.passes(2, 3, 2));
        assert!(odd.passes(3, 0, 3));
        let bft = Threshold::ByzantineQuorum { replicas: 4 };
        assert!(!bft.passes(2, 0, 2));
        assert!(bft.passes(3, 1, 3));
        let weighted = Threshold::WeightedMajority { total_weight: 10 };
        assert!(!weighted.passes(9, 0, 5));
        assert!(weighted.passes(1, 9, 6));
        let weighted_bft = Threshold::WeightedByzantine { total_weight: 9 };
        assert!(
            !weighted_bft.passes(1, 0, 6),
            "exactly two thirds is not enough"
        );
        assert!(weighted_bft.passes(1, 0, 7));
        let huge = Threshold::WeightedMajority {
            total_weight: u64::MAX,
        };
        assert!(huge.passes(1, 0, u64::MAX / 2 + 1));
        assert!(!huge.passes(1, 0, u64::MAX / 2));
        assert!(!Threshold::MajorityOfVotesCast.passes(1, 1, 1));
        assert!(Threshold::MajorityOfVotesCast.passes(2, 1, 2));
    }

    #[test]
    fn empty_electorates_are_rejected() {
        assert!(matches!(
            Threshold::Majority { electorate: 0 }.validate(),
            Err(VoteError::InvalidThreshold { .. })
        ));
        assert!(
            Threshold::ByzantineQuorum { replicas: 0 }
                .validate()
                .is_err()
        );
        assert!(
            Threshold::WeightedByzantine { total_weight: 1 }
                .validate()
                .is_ok()
        );
    }

    #[test]
    fn finish_merges_partial_tallies_and_sorts() {
        let part = |term, proposal_id, yes| RawTally {
            term,
            proposal_id,
            yes_count: yes,
            yes_weight: yes,
            ..RawTally::default()
        };
        let outcome = finish(
            vec![part(2, 1, 1), part(1, 9, 2), part(2, 1, 3)],
            Vec::new(),
            Threshold::Majority { electorate: 7 },
        );
        let keys: Vec<_> = outcome
            .tallies
            .iter()
            .map(|t| (t.term, t.proposal_id))
            .collect();
        assert_eq!(keys, vec![(1, 9), (2, 1)]);
        assert_eq!(outcome.tallies[1].yes_count, 4);
        assert!(outcome.tallies[1].passed);
        assert!(!outcome.tallies[0].passed);
        assert_eq!(outcome.tally(2, 1).map(|t| t.voters), Some(4));
        assert_eq!(
            outcome.summary(),
            Err(VoteError::NotSingleProposal { proposals: 2 })
        );
    }
}
