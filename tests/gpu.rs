//! GPU runtime and vote aggregation suite: the wgpu backend against the CPU reference.
//!
//! GPU tests follow the `CONSENSUS_REQUIRE_GPU` rule of `tests/common/gpu.rs`: they skip with a
//! printed reason when no adapter works, and fail when the variable is `1`.

#[path = "common/gpu.rs"]
mod gpu_common;

use std::sync::Arc;
use std::time::Duration;

use consensus::gpu::context::{BufferPool, GpuConfig, GpuContext, GpuError};
use consensus::gpu::votes::{
    AdaptiveVoteAggregator, CpuVoteAggregator, GpuVoteAggregator, GpuVoteOptions, Threshold, Vote,
    VoteAggregator, VoteBackend, VoteError, VoteOutcome,
};
use gpu_common::gpu_context_or_skip;
use proptest::prelude::*;

#[test]
fn adapters_are_listed_in_a_stable_order_and_bad_device_ids_are_typed_errors() {
    let Some(context) = gpu_context_or_skip("adapters_listed") else {
        return;
    };
    let adapters = GpuContext::adapters();
    assert!(!adapters.is_empty());
    assert_eq!(
        adapters,
        GpuContext::adapters(),
        "order must be deterministic"
    );
    assert_eq!(adapters[0].name, context.adapter_name());
    let count = adapters.len();
    let error = GpuContext::new(GpuConfig {
        device_id: count as u32,
        ..GpuConfig::default()
    })
    .expect_err("index past the end");
    assert_eq!(
        error,
        GpuError::DeviceIdOutOfRange {
            device_id: count as u32,
            adapter_count: count
        }
    );
}

#[test]
fn pipelines_are_compiled_once_and_shader_errors_are_typed() {
    let Some(context) = gpu_context_or_skip("pipelines_compiled_once") else {
        return;
    };
    const SOURCE: &str = "@group(0) @binding(0) var<storage, read_write> data: array<u32>;\n\
        @compute @workgroup_size(64) fn double(@builtin(global_invocation_id) id: vec3<u32>) {\n\
            if id.x < arrayLength(&data) { data[id.x] = data[id.x] * 2u; } }";
    let first = context
        .compute_pipeline("test-double", SOURCE, "double")
        .unwrap();
    let second = context
        .compute_pipeline("test-double", SOURCE, "double")
        .unwrap();
    assert!(std::sync::Arc::ptr_eq(&first, &second));
    let broken = context.compute_pipeline("test-broken", "fn nope( {", "main");
    assert!(matches!(broken, Err(GpuError::Shader { .. })), "{broken:?}");
}

#[test]
fn pool_reuses_buffers_and_reads_back_kernel_output() {
    let Some(context) = gpu_context_or_skip("pool_reuses_buffers") else {
        return;
    };
    const SOURCE: &str = "@group(0) @binding(0) var<storage, read_write> data: array<u32>;\n\
        @compute @workgroup_size(64) fn add_one(@builtin(global_invocation_id) id: vec3<u32>) {\n\
            if id.x < arrayLength(&data) { data[id.x] = data[id.x] + 1u; } }";
    let pipeline = context
        .compute_pipeline("test-add-one", SOURCE, "add_one")
        .unwrap();
    let input: Vec<u32> = (0..1000).collect();
    let bytes = (input.len() * 4) as u64;
    for round in 0..3 {
        let storage = context
            .buffers()
            .acquire(
                "test-data",
                bytes,
                wgpu::BufferUsages::STORAGE
                    | wgpu::BufferUsages::COPY_DST
                    | wgpu::BufferUsages::COPY_SRC,
            )
            .unwrap();
        let staging = context
            .buffers()
            .acquire(
                "test-staging",
                bytes,
                wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
            )
            .unwrap();
        context
            .queue()
            .write_buffer(&storage, 0, bytemuck::cast_slice(&input));
        let bind_group = context
            .device()
            .create_bind_group(&wgpu::BindGroupDescriptor {
                label: None,
                layout: &pipeline.get_bind_group_layout(0),
                entries: &[wgpu::BindGroupEntry {
                    binding: 0,
                    resource: wgpu::BindingResource::Buffer(wgpu::BufferBinding {
                        buffer: &storage,
                        offset: 0,
                        size: std::num::NonZeroU64::new(bytes),
                    }),
                }],
            });
        let mut encoder = context.device().create_command_encoder(&Default::default());
        {
            let mut pass = encoder.begin_compute_pass(&Default::default());
            pass.set_pipeline(&pipeline);
            pass.set_bind_group(0, &bind_group, &[]);
            pass.dispatch_workgroups((input.len() as u32).div_ceil(64), 1, 1);
        }
        encoder.copy_buffer_to_buffer(&storage, 0, &staging, 0, bytes);
        let submission = context.submit([encoder.finish()]).unwrap();
        context.wait_for_submission(Some(submission)).unwrap();
        let output: Vec<u32> = context.read_back(&staging, bytes).unwrap();
        assert_eq!(
            output,
            input.iter().map(|x| x + 1).collect::<Vec<_>>(),
            "round {round}"
        );
    }
    let stats = context.buffers().stats();
    assert!(stats.reuses >= 4, "{stats:?}");
    assert!(BufferPool::size_class(bytes) >= bytes);
}

#[test]
fn pool_is_bounded_by_memory_pool_size() {
    let Some(_shared) = gpu_context_or_skip("pool_is_bounded") else {
        return;
    };
    let context = GpuContext::new(GpuConfig {
        memory_pool_size: 1 << 20,
        kernel_launch_timeout: Duration::from_secs(60),
        ..GpuConfig::default()
    })
    .unwrap();
    let usage = wgpu::BufferUsages::STORAGE;
    let held = context.buffers().acquire("a", 600 << 10, usage).unwrap();
    let error = context
        .buffers()
        .acquire("b", 600 << 10, usage)
        .map(|_| ())
        .unwrap_err();
    assert!(matches!(error, GpuError::PoolExhausted { capacity, .. } if capacity == 1 << 20));
    drop(held);
    // The idle buffer is evicted to make room for a differently sized one.
    let other = context.buffers().acquire("c", 700 << 10, usage).unwrap();
    assert!(context.buffers().stats().allocated_bytes <= 1 << 20);
    drop(other);
}

// ---------------------------------------------------------------------------------------------
// Vote aggregation: GPU against CPU.
// ---------------------------------------------------------------------------------------------

fn cpu_outcome(votes: &[Vote], threshold: Threshold) -> VoteOutcome {
    CpuVoteAggregator::new(threshold)
        .aggregate_blocking(votes)
        .expect("CPU backend")
}

/// SplitMix64, for large deterministic inputs without proptest's per-value cost.
struct SplitMix(u64);

impl SplitMix {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
}

/// Votes from small domains, so that duplicates and equivocations are frequent, and with values
/// that use the high words of the 64-bit fields.
fn vote_strategy(voters: u32, proposals: u64, terms: u64) -> impl Strategy<Value = Vote> {
    (
        0..voters,
        0..proposals,
        0..terms,
        any::<bool>(),
        prop_oneof![Just(1u32), 0u32..4, Just(u32::MAX)],
        any::<bool>(),
    )
        .prop_map(|(voter, proposal, term, approve, weight, high)| {
            let (proposal_id, term) = if high {
                (proposal | (u64::MAX << 40), term | (7 << 33))
            } else {
                (proposal, term)
            };
            Vote {
                voter,
                proposal_id,
                term,
                approve,
                weight,
            }
        })
}

/// Inputs that repeat some of their own votes verbatim (exact duplicates).
fn batch_strategy(max_len: usize) -> impl Strategy<Value = Vec<Vote>> {
    (
        prop::collection::vec(vote_strategy(40, 6, 3), 0..max_len),
        prop::collection::vec(any::<prop::sample::Index>(), 0..max_len / 4 + 1),
    )
        .prop_map(|(mut votes, copies)| {
            if !votes.is_empty() {
                for index in copies {
                    let copy = *index.get(&votes);
                    votes.push(copy);
                }
            }
            votes
        })
}

fn threshold_strategy() -> impl Strategy<Value = Threshold> {
    prop_oneof![
        Just(Threshold::MajorityOfVotesCast),
        (1u64..50).prop_map(|electorate| Threshold::Majority { electorate }),
        (1u64..50).prop_map(|replicas| Threshold::ByzantineQuorum { replicas }),
        (1u64..200).prop_map(|total_weight| Threshold::WeightedMajority { total_weight }),
        (1u64..200).prop_map(|total_weight| Threshold::WeightedByzantine { total_weight }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 40, ..ProptestConfig::default() })]

    #[test]
    fn gpu_matches_cpu_on_random_batches(
        votes in batch_strategy(700),
        threshold in threshold_strategy(),
    ) {
        let Some(context) = gpu_context_or_skip("gpu_matches_cpu_on_random_batches") else {
            return Ok(());
        };
        let gpu = GpuVoteAggregator::with_context(context).unwrap().with_threshold(threshold).unwrap();
        let expected = cpu_outcome(&votes, threshold);
        prop_assert_eq!(gpu.aggregate_blocking(&votes).unwrap(), expected);
    }

    #[test]
    fn gpu_matches_cpu_when_split_into_small_passes_with_small_result_arrays(
        votes in batch_strategy(400),
        max_votes_per_pass in 1usize..64,
        initial_result_capacity in 1usize..4,
        max_workgroups in 1u32..3,
    ) {
        let Some(context) = gpu_context_or_skip("gpu_matches_cpu_when_split") else {
            return Ok(());
        };
        let gpu = GpuVoteAggregator::with_context(context).unwrap().with_options(GpuVoteOptions {
            max_votes_per_pass: Some(max_votes_per_pass),
            initial_result_capacity,
            max_workgroups,
        });
        let expected = cpu_outcome(&votes, Threshold::default());
        match gpu.aggregate_blocking(&votes) {
            Ok(outcome) => prop_assert_eq!(outcome, expected),
            // One ballot with more distinct copies than a pass takes cannot be split by ballot.
            Err(VoteError::Gpu(GpuError::InputTooLarge { .. })) => {
                let mut ballots = std::collections::HashMap::new();
                for vote in &votes {
                    *ballots.entry((vote.term, vote.voter)).or_insert(0usize) += 1;
                }
                prop_assert!(ballots.values().any(|&count| count > max_votes_per_pass));
            }
            Err(other) => prop_assert!(false, "unexpected error {other}"),
        }
    }

    #[test]
    fn input_order_does_not_matter(votes in batch_strategy(300), seed in any::<u64>()) {
        let Some(context) = gpu_context_or_skip("input_order_does_not_matter") else {
            return Ok(());
        };
        let gpu = GpuVoteAggregator::with_context(context).unwrap();
        let mut shuffled = votes.clone();
        let mut random = SplitMix(seed);
        for index in (1..shuffled.len()).rev() {
            shuffled.swap(index, (random.next() % (index as u64 + 1)) as usize);
        }
        prop_assert_eq!(
            gpu.aggregate_blocking(&shuffled).unwrap(),
            cpu_outcome(&votes, Threshold::default())
        );
    }
}

#[test]
fn empty_and_single_vote_inputs() {
    let Some(context) = gpu_context_or_skip("empty_and_single_vote_inputs") else {
        return;
    };
    let gpu = GpuVoteAggregator::with_context(context).unwrap();
    assert_eq!(gpu.aggregate_blocking(&[]).unwrap(), VoteOutcome::default());
    let one = [Vote::new(3, u64::MAX, false)
        .in_term(u64::MAX)
        .with_weight(u32::MAX)];
    let outcome = gpu.aggregate_blocking(&one).unwrap();
    assert_eq!(outcome, cpu_outcome(&one, Threshold::default()));
    let summary = outcome.summary().unwrap();
    assert_eq!(
        (summary.yes_count, summary.no_count, summary.passed),
        (0, 1, false)
    );
    assert_eq!(summary.tally.no_weight, u64::from(u32::MAX));
}

#[test]
fn seed_example_through_the_async_trait() {
    let Some(context) = gpu_context_or_skip("seed_example_through_the_async_trait") else {
        return;
    };
    let aggregator: Box<dyn VoteAggregator> =
        Box::new(GpuVoteAggregator::with_context(context).unwrap());
    let votes = vec![
        Vote::new(1, 42, true),
        Vote::new(2, 42, true),
        Vote::new(3, 42, false),
    ];
    let result = futures::executor::block_on(aggregator.aggregate_votes(&votes))
        .unwrap()
        .summary()
        .unwrap();
    assert!(result.passed);
    assert_eq!((result.yes_count, result.no_count), (2, 1));
}

#[test]
fn sizes_around_the_workgroup_size_and_many_proposals() {
    let Some(context) = gpu_context_or_skip("sizes_around_the_workgroup_size") else {
        return;
    };
    let gpu = GpuVoteAggregator::with_context(context).unwrap();
    let mut random = SplitMix(7);
    for count in [255usize, 256, 257, 511, 4097, 65_537] {
        let votes: Vec<Vote> = (0..count)
            .map(|_| {
                let bits = random.next();
                Vote::new((bits % 1000) as u32, (bits >> 16) % 5, bits & 1 == 0)
                    .in_term((bits >> 24) % 3)
                    .with_weight((bits >> 32) as u32 % 7)
            })
            .collect();
        assert_eq!(
            gpu.aggregate_blocking(&votes).unwrap(),
            cpu_outcome(&votes, Threshold::default()),
            "{count} votes"
        );
    }
    // One proposal per vote: more tallies than the first read-back holds and than the initial
    // result arrays, and every fifth voter equivocating.
    let votes: Vec<Vote> = (0..100_000u32)
        .map(|index| {
            Vote::new(
                if index % 5 == 1 { index - 1 } else { index },
                u64::from(index),
                true,
            )
        })
        .collect();
    let gpu_small = GpuVoteAggregator::with_context(Arc::clone(gpu.context()))
        .unwrap()
        .with_options(GpuVoteOptions {
            initial_result_capacity: 1000,
            ..GpuVoteOptions::default()
        });
    let expected = cpu_outcome(&votes, Threshold::default());
    assert_eq!(expected.tallies.len(), 100_000);
    assert!(!expected.equivocations.is_empty());
    assert_eq!(gpu_small.aggregate_blocking(&votes).unwrap(), expected);
}

#[test]
fn more_than_two_to_the_24_votes() {
    let Some(context) = gpu_context_or_skip("more_than_two_to_the_24_votes") else {
        return;
    };
    let gpu = GpuVoteAggregator::with_context(context).unwrap();
    let count = (1usize << 24) + 1000;
    let mut random = SplitMix(24);
    // A million voters over 4 terms and 16 proposals, with about 1 vote in 1000 replaced by a
    // duplicate or a conflicting vote of an earlier voter.
    let mut votes: Vec<Vote> = Vec::with_capacity(count);
    for index in 0..count {
        let bits = random.next();
        let vote = if index > 0 && bits.is_multiple_of(1000) {
            let earlier = votes[(bits >> 10) as usize % index];
            Vote {
                approve: earlier.approve ^ ((bits >> 20) & 1 == 1),
                ..earlier
            }
        } else {
            Vote::new((index % (1 << 22)) as u32, (bits >> 8) % 16, bits & 4 != 0)
                .in_term((index >> 22) as u64)
        };
        votes.push(vote);
    }
    let started = std::time::Instant::now();
    let outcome = gpu.aggregate_blocking(&votes).unwrap();
    eprintln!(
        "{count} votes on {}: {:?}",
        gpu.context().adapter_name(),
        started.elapsed()
    );
    let expected = cpu_outcome(&votes, Threshold::default());
    assert!(!expected.equivocations.is_empty());
    assert_eq!(outcome, expected);
}

#[test]
fn timeouts_are_errors_on_the_gpu_backend_and_cpu_answers_in_the_adaptive_one() {
    let Some(_shared) = gpu_context_or_skip("timeouts_fall_back_to_the_cpu") else {
        return;
    };
    let context = Arc::new(
        GpuContext::new(GpuConfig {
            memory_pool_size: 1 << 30,
            kernel_launch_timeout: Duration::from_nanos(1),
            ..GpuConfig::default()
        })
        .unwrap(),
    );
    let gpu = GpuVoteAggregator::with_context(Arc::clone(&context)).unwrap();
    // A device that finishes a batch before its first wait is polled answers it, rightly: a
    // timeout only exists for work still running. A fast host's llvmpipe finishes a million
    // votes that quickly, so the batch grows until the 1 ns bound is hit.
    let mut found = None;
    for voters in [1_000_000u32, 4_000_000, 12_000_000] {
        let votes: Vec<Vote> = (0..voters)
            .map(|voter| Vote::new(voter, 1, voter % 2 == 0))
            .collect();
        match gpu.aggregate_blocking(&votes) {
            Ok(outcome) => assert_eq!(outcome, cpu_outcome(&votes, Threshold::default())),
            Err(error) => {
                found = Some((votes, error));
                break;
            }
        }
    }
    let Some((votes, error)) = found else {
        eprintln!(
            "skipping the timeout checks: this device finished 12 M votes within 1 ns + one poll"
        );
        return;
    };
    assert_eq!(context.metrics().timeouts, 1, "{error}");
    assert!(
        matches!(error, VoteError::Gpu(GpuError::Timeout { .. })),
        "{error}"
    );
    assert_eq!(
        context.cpu_fallback_count(),
        0,
        "the GPU backend itself never falls back"
    );

    let adaptive = AdaptiveVoteAggregator::new(gpu).with_crossover(Some(1));
    assert_eq!(adaptive.backend_for(votes.len()), VoteBackend::Gpu);
    let outcome = adaptive.aggregate_blocking(&votes).unwrap();
    assert_eq!(outcome, cpu_outcome(&votes, Threshold::default()));
    assert_eq!(context.cpu_fallback_count(), 1);
    assert_eq!(context.metrics().cpu_fallbacks, 1);
    assert!(context.metrics().timeouts >= 2);
}

#[test]
fn a_lost_device_makes_the_cpu_answer() {
    let Some(_shared) = gpu_context_or_skip("a_lost_device_makes_the_cpu_answer") else {
        return;
    };
    let context = Arc::new(GpuContext::new(GpuConfig::default()).unwrap());
    let gpu = GpuVoteAggregator::with_context(Arc::clone(&context)).unwrap();
    let adaptive = AdaptiveVoteAggregator::new(gpu).with_crossover(Some(1));
    let votes: Vec<Vote> = (0..1000u32)
        .map(|voter| Vote::new(voter, 9, voter % 3 != 0))
        .collect();
    assert_eq!(
        adaptive.aggregate_blocking(&votes).unwrap(),
        cpu_outcome(&votes, Threshold::default())
    );
    assert_eq!(context.cpu_fallback_count(), 0);
    context.device().destroy();
    assert_eq!(
        adaptive.aggregate_blocking(&votes).unwrap(),
        cpu_outcome(&votes, Threshold::default())
    );
    assert_eq!(context.cpu_fallback_count(), 1);
    let direct = adaptive
        .gpu()
        .unwrap()
        .aggregate_blocking(&votes)
        .unwrap_err();
    assert!(
        matches!(direct, VoteError::Gpu(GpuError::DeviceLost { .. })),
        "{direct}"
    );
}

#[test]
fn adaptive_aggregator_uses_the_cpu_below_the_crossover_and_on_cpu_adapters() {
    let Some(context) = gpu_context_or_skip("adaptive_crossover") else {
        return;
    };
    let gpu = GpuVoteAggregator::with_context(Arc::clone(&context)).unwrap();
    let adaptive = AdaptiveVoteAggregator::new(gpu).with_crossover(Some(100));
    assert_eq!(adaptive.backend_for(99), VoteBackend::Cpu);
    assert_eq!(adaptive.backend_for(100), VoteBackend::Gpu);
    let default =
        AdaptiveVoteAggregator::new(GpuVoteAggregator::with_context(Arc::clone(&context)).unwrap());
    if context.adapter_info().device_type == wgpu::DeviceType::Cpu {
        assert_eq!(
            default.crossover_votes(),
            None,
            "software adapters never beat the CPU backend"
        );
    }
    let cpu_only = AdaptiveVoteAggregator::cpu_only(Threshold::default());
    assert_eq!(cpu_only.backend_for(usize::MAX), VoteBackend::Cpu);
}

#[test]
fn resident_votes_aggregate_like_uploaded_ones() {
    let Some(context) = gpu_context_or_skip("resident_votes") else {
        return;
    };
    let gpu = GpuVoteAggregator::with_context(context).unwrap();
    let mut random = SplitMix(3);
    let votes: Vec<Vote> = (0..10_000)
        .map(|_| {
            let bits = random.next();
            Vote::new((bits % 3000) as u32, bits >> 62, bits & 1 == 0)
        })
        .collect();
    let resident = gpu.upload(&votes).unwrap();
    assert_eq!(resident.len(), votes.len());
    let expected = cpu_outcome(&votes, Threshold::default());
    for _ in 0..3 {
        assert_eq!(gpu.aggregate_resident(&resident).unwrap(), expected);
    }
}

/// A context of the test's own (its fallback counter starts at zero) and a GPU backend whose
/// passes hold 10 votes.
fn own_context_with_ten_vote_passes() -> (Arc<GpuContext>, GpuVoteAggregator) {
    let context = Arc::new(GpuContext::new(GpuConfig::default()).unwrap());
    let gpu = GpuVoteAggregator::with_context(Arc::clone(&context))
        .unwrap()
        .with_options(GpuVoteOptions {
            max_votes_per_pass: Some(10),
            ..GpuVoteOptions::default()
        });
    (context, gpu)
}

#[test]
fn inputs_the_gpu_cannot_split_are_answered_by_the_cpu() {
    let Some(_shared) = gpu_context_or_skip("inputs_the_gpu_cannot_split") else {
        return;
    };
    let (context, gpu) = own_context_with_ten_vote_passes();
    // One voter, 50 distinct votes in one term: a ballot larger than a pass.
    let votes: Vec<Vote> = (0..50)
        .map(|proposal| Vote::new(7, proposal, true))
        .collect();
    let error = gpu.aggregate_blocking(&votes).unwrap_err();
    assert!(
        matches!(error, VoteError::Gpu(GpuError::InputTooLarge { .. })),
        "{error}"
    );
    // Unbounded, so that the batch reaches the GPU and comes back as one it cannot split.
    let adaptive = AdaptiveVoteAggregator::new(gpu)
        .with_crossover(Some(1))
        .with_gpu_max_votes(None);
    let outcome = adaptive.aggregate_blocking(&votes).unwrap();
    assert_eq!(outcome, cpu_outcome(&votes, Threshold::default()));
    assert_eq!(outcome.equivocations.len(), 1);
    assert_eq!(context.cpu_fallback_count(), 1);
}

#[test]
fn batches_beyond_one_gpu_pass_go_to_the_cpu_by_default() {
    let Some(_shared) = gpu_context_or_skip("batches_beyond_one_gpu_pass") else {
        return;
    };
    let (context, gpu) = own_context_with_ten_vote_passes();
    let adaptive = AdaptiveVoteAggregator::new(gpu).with_crossover(Some(1));
    assert_eq!(
        adaptive.gpu_max_votes(),
        Some(10),
        "one pass of the GPU backend"
    );
    assert_eq!(adaptive.backend_for(10), VoteBackend::Gpu);
    assert_eq!(adaptive.backend_for(11), VoteBackend::Cpu);
    // Distinct voters: a batch the GPU could split, but the split path loses to the CPU.
    let votes: Vec<Vote> = (0..50u32)
        .map(|voter| Vote::new(voter, 1, voter % 4 != 0))
        .collect();
    let outcome = adaptive.aggregate_blocking(&votes).unwrap();
    assert_eq!(outcome, cpu_outcome(&votes, Threshold::default()));
    assert_eq!(
        context.cpu_fallback_count(),
        0,
        "routed to the CPU up front, not fallen back"
    );
    let unbounded = adaptive.with_gpu_max_votes(None);
    assert_eq!(unbounded.backend_for(50), VoteBackend::Gpu);
    assert_eq!(
        unbounded.aggregate_blocking(&votes).unwrap(),
        outcome,
        "split on the GPU, same answer"
    );
}
