//! The wgpu backend: `shaders/votes.wgsl` run on a [`GpuContext`].
//!
//! One *pass* takes up to [`GpuVoteAggregator::max_votes_per_pass`] votes resident on the device:
//! `insert` claims every ballot and every `(term, proposal)` in two hash tables and flags ballots
//! whose votes differ, `tally` counts each unflagged ballot's first vote, and eight short
//! `evidence` passes (skipped by an indirect dispatch when nothing equivocates) find the two
//! smallest distinct votes of each flagged ballot. The host reads back only the counters and the
//! compact result records.
//!
//! The pass itself (pipelines, buffers, dispatches, decoding) is in the `pass` submodule; this
//! file holds the public type, uploads and the splitting of large inputs.
//!
//! Larger inputs are split by a hash of the ballot `(term, voter)`, so no ballot spans two passes
//! and equivocations are found exactly; the passes' tallies are then summed per proposal on the
//! host (a merge of result records, not of votes). If the result arrays sized for a pass turn out
//! too small (many proposals or equivocations), the pass is rerun with exact sizes.

mod pass;

use std::sync::Arc;

use bytemuck::{Pod, Zeroable};
use futures::future::BoxFuture;

use super::{Threshold, Vote, VoteAggregator, VoteError, VoteOutcome, finish};
use crate::gpu::context::{GpuConfig, GpuContext, GpuError, PooledBuffer};
use pass::{EVIDENCE_WORDS, Kernels, PassResult, TALLY_WORDS};

/// The WGSL source.
const SHADER: &str = include_str!("../../../shaders/votes.wgsl");
/// Pool bytes one vote of a pass needs before size-class rounding: 28 on the device, 28 in
/// staging, 4 tables of up to 3 slots of 4 bytes.
const POOL_BYTES_PER_VOTE: u64 = 2 * WGSL_VOTE_BYTES as u64 + 4 * 3 * 4;
/// Largest vote index a table slot can hold beside the equivocation flag.
const MAX_INDEX: usize = (1 << 31) - 2;

/// A vote as the shader reads it: `struct Vote` in `shaders/votes.wgsl`, 7 words, 28 bytes.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Pod, Zeroable)]
pub struct GpuVote {
    /// Voter index.
    pub voter: u32,
    /// Weight.
    pub weight: u32,
    /// 1 for approve, 0 for reject.
    pub approve: u32,
    /// Low word of the proposal id.
    pub proposal_lo: u32,
    /// High word of the proposal id.
    pub proposal_hi: u32,
    /// Low word of the term.
    pub term_lo: u32,
    /// High word of the term.
    pub term_hi: u32,
}

/// Size of `struct Vote` in the shader, which [`GpuVote`] must match.
pub const WGSL_VOTE_BYTES: usize = 28;

impl From<&Vote> for GpuVote {
    #[inline]
    fn from(vote: &Vote) -> Self {
        Self {
            voter: vote.voter,
            weight: vote.weight,
            approve: u32::from(vote.approve),
            proposal_lo: vote.proposal_id as u32,
            proposal_hi: (vote.proposal_id >> 32) as u32,
            term_lo: vote.term as u32,
            term_hi: (vote.term >> 32) as u32,
        }
    }
}

/// Tuning of the GPU backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GpuVoteOptions {
    /// Most votes per pass; `None` takes the most the device's binding limits allow. Smaller
    /// values exercise the split path in tests.
    pub max_votes_per_pass: Option<usize>,
    /// Tally and evidence records a pass reserves at first (a pass that finds more reruns).
    pub initial_result_capacity: usize,
    /// Most workgroups per dispatch; invocations loop over the rest with a grid stride.
    pub max_workgroups: u32,
}

impl Default for GpuVoteOptions {
    fn default() -> Self {
        Self {
            max_votes_per_pass: None,
            initial_result_capacity: 1 << 16,
            max_workgroups: 4096,
        }
    }
}

/// Votes uploaded once and aggregated many times (the "resident" benchmark).
pub struct ResidentVotes {
    votes: PooledBuffer,
    count: usize,
}

impl ResidentVotes {
    /// Number of votes.
    pub fn len(&self) -> usize {
        self.count
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }
}

/// 64-bit ballot hash for splitting inputs into passes (host side; independent of the shader's
/// table hash).
#[inline]
fn ballot_hash(vote: &Vote) -> u64 {
    let mut x =
        vote.term.rotate_left(29) ^ u64::from(vote.voter).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    x ^= x >> 33;
    x = x.wrapping_mul(0xff51_afd7_ed55_8ccd);
    x ^= x >> 33;
    x = x.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    x ^ (x >> 33)
}

/// The wgpu backend. See the [module documentation](super) for the semantics. It never answers
/// from the CPU: a timeout or lost device is returned as [`VoteError::Gpu`]; the
/// [`AdaptiveVoteAggregator`](super::AdaptiveVoteAggregator) turns those into CPU answers.
pub struct GpuVoteAggregator {
    context: Arc<GpuContext>,
    kernels: Arc<Kernels>,
    threshold: Threshold,
    options: GpuVoteOptions,
}

impl std::fmt::Debug for GpuVoteAggregator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GpuVoteAggregator")
            .field("adapter", &self.context.adapter_name())
            .field("threshold", &self.threshold)
            .field("options", &self.options)
            .finish_non_exhaustive()
    }
}

impl GpuVoteAggregator {
    /// Opens adapter `device_id` with otherwise default [`GpuConfig`], as the seed's
    /// `GpuVoteAggregator::new(gpu_device)`.
    pub fn new(device_id: u32) -> Result<Self, VoteError> {
        let context = GpuContext::new(GpuConfig {
            device_id,
            ..GpuConfig::default()
        })?;
        Self::with_context(Arc::new(context))
    }

    /// Uses an existing context (pipelines are compiled here, once per context, and the first
    /// aggregator on a context runs a small batch as the warm-up under
    /// `pipeline_compile_timeout`: see [`GpuContext::warm_up`]).
    pub fn with_context(context: Arc<GpuContext>) -> Result<Self, VoteError> {
        let kernels = context.shared_state(|| Kernels::build(&context))?;
        let aggregator = Self {
            context,
            kernels,
            threshold: Threshold::default(),
            options: GpuVoteOptions::default(),
        };
        if aggregator.kernels.begin_warm_up() {
            // Two proposals, one voter voting both ways on one of them: every kernel runs.
            let sample = [
                Vote::new(0, 1, true),
                Vote::new(0, 1, false),
                Vote::new(1, 1, true),
                Vote::new(1, 2, true),
            ];
            let warmed = aggregator
                .context
                .warm_up("votes", || aggregator.aggregate_blocking(&sample));
            if let Err(error) = warmed {
                aggregator.kernels.warm_up_failed();
                return Err(error);
            }
        }
        Ok(aggregator)
    }

    /// Sets the threshold.
    pub fn with_threshold(mut self, threshold: Threshold) -> Result<Self, VoteError> {
        self.threshold = threshold.validate()?;
        Ok(self)
    }

    /// Sets the tuning options.
    pub fn with_options(mut self, options: GpuVoteOptions) -> Self {
        self.options = options;
        self
    }

    /// The context.
    pub fn context(&self) -> &Arc<GpuContext> {
        &self.context
    }

    /// The threshold.
    pub fn threshold(&self) -> Threshold {
        self.threshold
    }

    /// Most votes one pass takes: bounded by the storage binding limit (28-byte votes, 40-byte
    /// tally records in the worst case of one proposal per vote, a hash table of
    /// `next_power_of_two(1.5 n)` u32 slots), by the context's `memory_pool_size` (about 200
    /// bytes per vote with rounding) and by [`GpuVoteOptions::max_votes_per_pass`].
    pub fn max_votes_per_pass(&self) -> usize {
        let binding = self.context.max_storage_binding_bytes();
        let by_records = binding / (TALLY_WORDS as u64 * 4);
        // The largest power of two of u32 slots one binding holds, filled to at most 2/3.
        let table_slots = 1u64 << (63 - (binding / 4).max(1).leading_zeros());
        let by_table = table_slots * 2 / 3;
        // A pass holds the votes twice (device and staging), four tables of at most 3 slots per
        // vote and the result arrays; size classes may round each buffer up to twice its size.
        let pool = self.context.buffers().capacity();
        let reserved = (self.options.initial_result_capacity as u64)
            * 4
            * (TALLY_WORDS + EVIDENCE_WORDS) as u64;
        let by_pool = pool.saturating_sub(2 * reserved) / (2 * POOL_BYTES_PER_VOTE);
        let limit = by_records.min(by_table).min(by_pool).min(MAX_INDEX as u64) as usize;
        match self.options.max_votes_per_pass {
            Some(requested) => requested.clamp(1, limit.max(1)),
            None => limit.max(1),
        }
    }

    /// Uploads votes to the device for repeated [`GpuVoteAggregator::aggregate_resident`] calls.
    /// They must fit one pass.
    pub fn upload(&self, votes: &[Vote]) -> Result<ResidentVotes, VoteError> {
        let max = self.max_votes_per_pass();
        if votes.len() > max {
            return Err(VoteError::TooManyVotes {
                votes: votes.len(),
                max,
            });
        }
        let bytes = (votes.len().max(1) * WGSL_VOTE_BYTES) as u64;
        let pool = self.context.buffers();
        let device_votes = pool.acquire(
            "votes",
            bytes,
            wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_DST,
        )?;
        let staging = self.fill_staging(bytes, votes.iter().map(GpuVote::from))?;
        let mut encoder =
            self.context
                .device()
                .create_command_encoder(&wgpu::CommandEncoderDescriptor {
                    label: Some("votes-upload"),
                });
        encoder.copy_buffer_to_buffer(&staging, 0, &device_votes, 0, bytes);
        let submission = self.context.submit([encoder.finish()])?;
        if let Err(error) = self.context.wait_for_submission(Some(submission)) {
            staging.discard();
            device_votes.discard();
            return Err(error.into());
        }
        Ok(ResidentVotes {
            votes: device_votes,
            count: votes.len(),
        })
    }

    /// Aggregates votes already on the device (no upload; tally and read-back only).
    pub fn aggregate_resident(&self, resident: &ResidentVotes) -> Result<VoteOutcome, VoteError> {
        if resident.count == 0 {
            return Ok(finish(Vec::new(), Vec::new(), self.threshold));
        }
        let result = self.run_pass(&resident.votes, resident.count)?;
        Ok(finish(result.tallies, result.equivocations, self.threshold))
    }

    /// Aggregates on the GPU, blocking the calling thread.
    pub fn aggregate_blocking(&self, votes: &[Vote]) -> Result<VoteOutcome, VoteError> {
        if votes.is_empty() {
            // Nothing to dispatch: the empty outcome is the definition's answer.
            return Ok(finish(Vec::new(), Vec::new(), self.threshold));
        }
        let span = tracing::info_span!(
            target: "consensus::gpu",
            "gpu.dispatch",
            gpu.kernel = "vote_tally",
            gpu.adapter = %self.context.adapter_name(),
            gpu.batch_size = votes.len(),
        );
        let _entered = span.enter();
        let max = self.max_votes_per_pass();
        if votes.len() <= max {
            let result = self.upload_and_run(votes.len(), votes.iter().map(GpuVote::from))?;
            return Ok(finish(result.tallies, result.equivocations, self.threshold));
        }
        let (order, bounds) = self.split(votes, max)?;
        let mut tallies = Vec::new();
        let mut equivocations = Vec::new();
        for part in bounds.windows(2) {
            let members = &order[part[0]..part[1]];
            if members.is_empty() {
                continue;
            }
            let selected = members
                .iter()
                .map(|&index| GpuVote::from(&votes[index as usize]));
            let result = self.upload_and_run(members.len(), selected)?;
            tallies.extend(result.tallies);
            equivocations.extend(result.equivocations);
        }
        Ok(finish(tallies, equivocations, self.threshold))
    }

    /// Groups the votes into passes of at most `max` votes such that no ballot spans two passes.
    /// Returns vote indices ordered by pass and the passes' start offsets (plus the end).
    ///
    /// First by a ballot hash modulo a pass count sized for 3/4 full passes (one counting sort);
    /// if the hash spreads unevenly (tiny `max`, or heavy repetition of some ballots), by sorting
    /// the votes on their 64-bit ballot hash and cutting between distinct hashes. That fails only
    /// when one ballot alone holds more than `max` votes.
    fn split(&self, votes: &[Vote], max: usize) -> Result<(Vec<u32>, Vec<usize>), VoteError> {
        let parts = votes.len().div_ceil((max * 3 / 4).max(1)).max(2);
        let mut sizes = vec![0usize; parts];
        let part_of: Vec<u32> = votes
            .iter()
            .map(|vote| {
                // `parts` <= votes.len() < 2^31, so the remainder fits.
                let part = (ballot_hash(vote) % parts as u64) as u32;
                sizes[part as usize] += 1;
                part
            })
            .collect();
        if sizes.iter().all(|&size| size <= max) {
            let mut bounds = Vec::with_capacity(parts + 1);
            bounds.push(0);
            for size in &sizes {
                bounds.push(bounds.last().copied().unwrap_or(0) + size);
            }
            let mut next = bounds[..parts].to_vec();
            let mut order = vec![0u32; votes.len()];
            for (index, &part) in part_of.iter().enumerate() {
                order[next[part as usize]] = index as u32;
                next[part as usize] += 1;
            }
            return Ok((order, bounds));
        }
        drop(part_of);
        let mut keyed: Vec<(u64, u32)> = votes
            .iter()
            .enumerate()
            .map(|(index, vote)| (ballot_hash(vote), index as u32))
            .collect();
        keyed.sort_unstable();
        let mut bounds = vec![0usize];
        let mut run_start = 0usize;
        for position in 1..=keyed.len() {
            let run_ends = position == keyed.len() || keyed[position].0 != keyed[run_start].0;
            if !run_ends {
                continue;
            }
            let run = position - run_start;
            if run > max {
                return Err(GpuError::InputTooLarge {
                    detail: format!(
                        "ballot (term {}, voter {}) alone has {run} votes, more than the {max} \
                         votes of one pass",
                        votes[keyed[run_start].1 as usize].term,
                        votes[keyed[run_start].1 as usize].voter
                    ),
                }
                .into());
            }
            let part_start = bounds.last().copied().unwrap_or(0);
            if position - part_start > max {
                bounds.push(run_start);
            }
            run_start = position;
        }
        bounds.push(keyed.len());
        Ok((keyed.into_iter().map(|(_, index)| index).collect(), bounds))
    }

    /// Fills a pooled `MAP_WRITE` staging buffer of `bytes` bytes through `fill`.
    fn fill_staging(
        &self,
        bytes: u64,
        votes: impl Iterator<Item = GpuVote>,
    ) -> Result<PooledBuffer, GpuError> {
        let staging = self.context.buffers().acquire(
            "votes-staging",
            bytes,
            wgpu::BufferUsages::MAP_WRITE | wgpu::BufferUsages::COPY_SRC,
        )?;
        let slice = staging.slice(0..bytes);
        if let Err(error) = self.context.map_and_wait(&slice, wgpu::MapMode::Write) {
            staging.discard();
            return Err(error);
        }
        {
            let mut view = slice
                .get_mapped_range_mut()
                .map_err(|error| GpuError::Map(error.to_string()))?;
            // Mapped memory may be write-combined: write each record once, never read it.
            let (records, _) = view.slice(..).into_chunks::<WGSL_VOTE_BYTES>();
            records.write_iter(votes.map(bytemuck::cast::<GpuVote, [u8; WGSL_VOTE_BYTES]>));
        }
        staging.unmap();
        Ok(staging)
    }

    fn upload_and_run(
        &self,
        count: usize,
        votes: impl Iterator<Item = GpuVote>,
    ) -> Result<PassResult, GpuError> {
        let bytes = (count * WGSL_VOTE_BYTES) as u64;
        let device_votes = self.context.buffers().acquire(
            "votes",
            bytes,
            wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_DST,
        )?;
        let staging = self.fill_staging(bytes, votes)?;
        let mut encoder =
            self.context
                .device()
                .create_command_encoder(&wgpu::CommandEncoderDescriptor {
                    label: Some("votes-upload"),
                });
        encoder.copy_buffer_to_buffer(&staging, 0, &device_votes, 0, bytes);
        // The copy is submitted on its own and ordered before the pass by the queue, so the pass
        // can be retried without uploading again.
        self.context.submit([encoder.finish()])?;
        match self.run_pass(&device_votes, count) {
            Ok(result) => Ok(result),
            Err(error) => {
                staging.discard();
                device_votes.discard();
                Err(error)
            }
        }
    }
}

impl VoteAggregator for GpuVoteAggregator {
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
    use super::pass::{Params, parse_evidence};
    use super::*;

    #[test]
    fn gpu_vote_matches_the_wgsl_struct() {
        // `struct Vote` in shaders/votes.wgsl: seven u32 fields.
        assert_eq!(std::mem::size_of::<GpuVote>(), WGSL_VOTE_BYTES);
        assert!(SHADER.contains("struct Vote {"));
        let fields = SHADER
            .split("struct Vote {")
            .nth(1)
            .and_then(|rest| rest.split('}').next())
            .map(|body| body.matches(": u32").count());
        assert_eq!(fields, Some(WGSL_VOTE_BYTES / 4));
        assert_eq!(std::mem::size_of::<Params>(), 32);
    }

    #[test]
    fn shader_validates_and_its_structs_match_the_rust_layouts() {
        let module = naga::front::wgsl::parse_str(SHADER).expect("votes.wgsl parses");
        naga::valid::Validator::new(
            naga::valid::ValidationFlags::all(),
            naga::valid::Capabilities::empty(),
        )
        .validate(&module)
        .expect("votes.wgsl validates");
        let mut layouter = naga::proc::Layouter::default();
        layouter.update(module.to_ctx()).expect("layout");
        let size_of = |name: &str| {
            module
                .types
                .iter()
                .find(|(_, ty)| ty.name.as_deref() == Some(name))
                .map(|(handle, _)| layouter[handle].size as usize)
        };
        assert_eq!(size_of("Vote"), Some(std::mem::size_of::<GpuVote>()));
        assert_eq!(size_of("Params"), Some(std::mem::size_of::<Params>()));
        for entry in ["insert", "prepare", "tally", "evidence0", "evidence7"] {
            assert!(
                module.entry_points.iter().any(|point| point.name == entry),
                "entry point {entry}"
            );
        }
    }

    #[test]
    fn gpu_vote_splits_64_bit_fields() {
        let vote = Vote {
            voter: 7,
            proposal_id: 0x0102_0304_0506_0708,
            term: 0xffff_0000_0000_0001,
            approve: true,
            weight: 9,
        };
        let gpu = GpuVote::from(&vote);
        assert_eq!(
            (gpu.proposal_lo, gpu.proposal_hi),
            (0x0506_0708, 0x0102_0304)
        );
        assert_eq!((gpu.term_lo, gpu.term_hi), (1, 0xffff_0000));
        assert_eq!(gpu.approve, 1);
    }

    #[test]
    fn evidence_records_decode_inverted_words() {
        let mut words = [0u32; EVIDENCE_WORDS];
        words[0] = 5;
        words[1] = 2;
        words[2] = 1;
        let first = [0u32, 3, 0, 1];
        let second = [0u32, 3, 1, 1];
        for k in 0..4 {
            words[3 + k] = !first[k];
            words[7 + k] = !second[k];
        }
        let evidence = parse_evidence(&words);
        assert_eq!(evidence.term, (1 << 32) | 2);
        assert_eq!(
            evidence.first,
            Vote::new(5, 3, false).in_term((1 << 32) | 2)
        );
        assert_eq!(
            evidence.second,
            Vote::new(5, 3, true).in_term((1 << 32) | 2)
        );
    }

    #[test]
    fn ballot_hash_ignores_everything_but_the_ballot() {
        let vote = Vote::new(4, 1, true).in_term(9);
        let other_choice = Vote::new(4, 2, false).in_term(9).with_weight(3);
        assert_eq!(ballot_hash(&vote), ballot_hash(&other_choice));
        assert_ne!(ballot_hash(&vote), ballot_hash(&vote.in_term(10)));
    }
}
