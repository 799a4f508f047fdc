//! One pass of the GPU vote kernels: the pipelines and their shared bind group layout, the
//! buffers of a pass, the dispatches, and decoding of the result records read back.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use bytemuck::{Pod, Zeroable};

use super::{GpuVoteAggregator, MAX_INDEX, SHADER, WGSL_VOTE_BYTES};
use crate::gpu::context::{GpuContext, GpuError, PooledBuffer, buffer_binding as binding};
use crate::gpu::votes::{Equivocation, RawTally, Vote};

/// Pipeline cache label of the kernels sharing the main layout.
const LABEL: &str = "votes";
/// Pipeline cache label of `prepare` (its own automatic layout).
const PREPARE_LABEL: &str = "votes-prepare";
/// Invocations per workgroup, as `@workgroup_size` in the shader.
const WORKGROUP_SIZE: u32 = 256;
/// Votes each invocation walks (grid stride) before more workgroups are launched: enough that
/// the per-invocation run sums of `tally` save most atomics, few enough to fill a large GPU.
const VOTES_PER_INVOCATION: u32 = 8;
/// u32 words per tally record (`TALLY_WORDS` in the shader).
pub(super) const TALLY_WORDS: usize = 10;
/// u32 words per evidence record (`EVIDENCE_WORDS` in the shader).
pub(super) const EVIDENCE_WORDS: usize = 12;
/// Bytes of the counters buffer (two counters, padded).
const COUNTER_BYTES: u64 = 16;
/// Records of each kind read back with the counters in the first read-back; more take a second.
const FIRST_READBACK_RECORDS: usize = 256;
/// `struct Params` in the shader.
#[repr(C)]
#[derive(Debug, Clone, Copy, Pod, Zeroable)]
pub(super) struct Params {
    vote_count: u32,
    table_mask: u32,
    tally_capacity: u32,
    evidence_capacity: u32,
    evidence_workgroups: u32,
    pad: [u32; 3],
}

pub(super) struct Kernels {
    layout: wgpu::BindGroupLayout,
    insert: Arc<wgpu::ComputePipeline>,
    prepare: Arc<wgpu::ComputePipeline>,
    tally: Arc<wgpu::ComputePipeline>,
    evidence: Vec<Arc<wgpu::ComputePipeline>>,
    /// Whether an aggregator has started the warm-up (first dispatch) of these kernels.
    warm_up_started: AtomicBool,
}

fn storage_entry(binding: u32, read_only: bool) -> wgpu::BindGroupLayoutEntry {
    wgpu::BindGroupLayoutEntry {
        binding,
        visibility: wgpu::ShaderStages::COMPUTE,
        ty: wgpu::BindingType::Buffer {
            ty: wgpu::BufferBindingType::Storage { read_only },
            has_dynamic_offset: false,
            min_binding_size: None,
        },
        count: None,
    }
}

impl Kernels {
    pub(super) fn build(context: &GpuContext) -> Result<Self, GpuError> {
        let device = context.device();
        let (layout, pipeline_layout) = context.validated(|| {
            let mut entries = vec![storage_entry(0, true)];
            entries.push(wgpu::BindGroupLayoutEntry {
                binding: 1,
                visibility: wgpu::ShaderStages::COMPUTE,
                ty: wgpu::BindingType::Buffer {
                    ty: wgpu::BufferBindingType::Uniform,
                    has_dynamic_offset: false,
                    min_binding_size: None,
                },
                count: None,
            });
            entries.extend((2..=8).map(|binding| storage_entry(binding, false)));
            let layout = device.create_bind_group_layout(&wgpu::BindGroupLayoutDescriptor {
                label: Some("votes"),
                entries: &entries,
            });
            let pipeline_layout = device.create_pipeline_layout(&wgpu::PipelineLayoutDescriptor {
                label: Some("votes"),
                bind_group_layouts: &[Some(&layout)],
                immediate_size: 0,
            });
            (layout, pipeline_layout)
        })?;
        let with_layout = |entry: &'static str| {
            context.compute_pipeline_with_layout(LABEL, SHADER, entry, &pipeline_layout)
        };
        const EVIDENCE_ENTRIES: [&str; 8] = [
            "evidence0",
            "evidence1",
            "evidence2",
            "evidence3",
            "evidence4",
            "evidence5",
            "evidence6",
            "evidence7",
        ];
        Ok(Self {
            insert: with_layout("insert")?,
            tally: with_layout("tally")?,
            evidence: EVIDENCE_ENTRIES
                .iter()
                .map(|entry| with_layout(entry))
                .collect::<Result<_, _>>()?,
            prepare: context.compute_pipeline(PREPARE_LABEL, SHADER, "prepare")?,
            layout,
            warm_up_started: AtomicBool::new(false),
        })
    }

    /// True for the one caller that should run the warm-up (until it fails).
    pub(super) fn begin_warm_up(&self) -> bool {
        !self.warm_up_started.swap(true, Ordering::SeqCst)
    }

    /// Lets the next aggregator try the warm-up again.
    pub(super) fn warm_up_failed(&self) {
        self.warm_up_started.store(false, Ordering::SeqCst);
    }
}

/// What one pass found.
pub(super) struct PassResult {
    pub(super) tallies: Vec<RawTally>,
    pub(super) equivocations: Vec<Equivocation>,
}

/// Buffers of one pass; on failure they are discarded, not pooled, because work still in flight
/// may write to them.
struct PassBuffers {
    buffers: Vec<PooledBuffer>,
}

impl PassBuffers {
    fn get(&self, at: usize) -> &wgpu::Buffer {
        &self.buffers[at]
    }

    fn discard(self) {
        self.buffers.into_iter().for_each(PooledBuffer::discard);
    }
}

fn word_pair(low: u32, high: u32) -> u64 {
    u64::from(low) | (u64::from(high) << 32)
}

fn parse_tally(words: &[u32]) -> RawTally {
    RawTally {
        term: word_pair(words[0], words[1]),
        proposal_id: word_pair(words[2], words[3]),
        yes_count: u64::from(words[4]),
        no_count: u64::from(words[5]),
        yes_weight: word_pair(words[6], words[7]),
        no_weight: word_pair(words[8], words[9]),
    }
}

pub(super) fn parse_evidence(words: &[u32]) -> Equivocation {
    let voter = words[0];
    let term = word_pair(words[1], words[2]);
    // The order words are stored inverted (minimum by atomicMax).
    let vote = |at: usize| Vote {
        voter,
        term,
        proposal_id: word_pair(!words[at + 1], !words[at]),
        approve: !words[at + 2] != 0,
        weight: !words[at + 3],
    };
    Equivocation {
        voter,
        term,
        first: vote(3),
        second: vote(7),
    }
}

impl GpuVoteAggregator {
    /// Runs the kernels over `count` votes in `votes` and reads the results back, resizing the
    /// result arrays and rerunning once if they were too small.
    pub(super) fn run_pass(
        &self,
        votes: &wgpu::Buffer,
        count: usize,
    ) -> Result<PassResult, GpuError> {
        let initial = self.options.initial_result_capacity.max(1);
        let mut tally_capacity = count.min(initial);
        let mut evidence_capacity = (count / 2).clamp(1, initial);
        loop {
            let (counts, buffers) =
                self.dispatch_pass(votes, count, tally_capacity, evidence_capacity)?;
            let (tally_count, evidence_count, result) = counts;
            if tally_count <= tally_capacity && evidence_count <= evidence_capacity {
                drop(buffers);
                return Ok(result);
            }
            drop(buffers);
            tally_capacity = tally_capacity.max(tally_count);
            evidence_capacity = evidence_capacity.max(evidence_count);
        }
    }

    #[allow(clippy::type_complexity)]
    fn dispatch_pass(
        &self,
        votes: &wgpu::Buffer,
        count: usize,
        tally_capacity: usize,
        evidence_capacity: usize,
    ) -> Result<((usize, usize, PassResult), PassBuffers), GpuError> {
        if count > MAX_INDEX {
            return Err(GpuError::InputTooLarge {
                detail: format!("{count} votes in one pass (at most {MAX_INDEX})"),
            });
        }
        let context = &self.context;
        let pool = context.buffers();
        let storage = wgpu::BufferUsages::STORAGE;
        let table_slots = (count + count / 2).max(16).next_power_of_two() as u64;
        let table_bytes = table_slots * 4;
        let tally_bytes = (tally_capacity * TALLY_WORDS * 4) as u64;
        let evidence_bytes = (evidence_capacity * EVIDENCE_WORDS * 4) as u64;
        let first_tallies = tally_capacity.min(FIRST_READBACK_RECORDS);
        let first_evidence = evidence_capacity.min(FIRST_READBACK_RECORDS);
        let first_tally_bytes = (first_tallies * TALLY_WORDS * 4) as u64;
        let first_evidence_bytes = (first_evidence * EVIDENCE_WORDS * 4) as u64;
        let readback_bytes = COUNTER_BYTES + first_tally_bytes + first_evidence_bytes;

        let mut held = Vec::with_capacity(10);
        let mut take = |label, bytes, usage| -> Result<usize, GpuError> {
            held.push(pool.acquire(label, bytes, usage)?);
            Ok(held.len() - 1)
        };
        let clearable = storage | wgpu::BufferUsages::COPY_DST;
        let readable = storage | wgpu::BufferUsages::COPY_SRC;
        let params_at = take(
            "votes-params",
            32,
            wgpu::BufferUsages::UNIFORM | wgpu::BufferUsages::COPY_DST,
        )?;
        let ballots_at = take("votes-ballots", table_bytes, clearable)?;
        let ballot_aux_at = take("votes-ballot-aux", table_bytes, storage)?;
        let proposals_at = take("votes-proposals", table_bytes, clearable)?;
        let proposal_ids_at = take("votes-proposal-ids", table_bytes, storage)?;
        let counters_at = take("votes-counters", COUNTER_BYTES, clearable | readable)?;
        let tallies_at = take("votes-tallies", tally_bytes, readable)?;
        let evidence_at = take("votes-evidence", evidence_bytes, readable)?;
        let indirect_at = take("votes-indirect", 16, storage | wgpu::BufferUsages::INDIRECT)?;
        let readback_at = take(
            "votes-readback",
            readback_bytes,
            wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
        )?;
        let buffers = PassBuffers { buffers: held };
        let buffer = |at: usize| buffers.get(at);

        let groups = (count as u32)
            .div_ceil(WORKGROUP_SIZE * VOTES_PER_INVOCATION)
            .clamp(1, self.options.max_workgroups.max(1))
            .min(context.limits().max_compute_workgroups_per_dimension);
        let params = Params {
            vote_count: count as u32,
            table_mask: (table_slots - 1) as u32,
            tally_capacity: tally_capacity as u32,
            evidence_capacity: evidence_capacity as u32,
            evidence_workgroups: groups,
            pad: [0; 3],
        };

        let encoded = context.validated(|| {
            let device = context.device();
            context
                .queue()
                .write_buffer(buffer(params_at), 0, bytemuck::bytes_of(&params));
            let main = device.create_bind_group(&wgpu::BindGroupDescriptor {
                label: Some("votes"),
                layout: &self.kernels.layout,
                entries: &[
                    (0, binding(votes, (count * WGSL_VOTE_BYTES) as u64)),
                    (1, binding(buffer(params_at), 32)),
                    (2, binding(buffer(ballots_at), table_bytes)),
                    (3, binding(buffer(ballot_aux_at), table_bytes)),
                    (4, binding(buffer(proposals_at), table_bytes)),
                    (5, binding(buffer(proposal_ids_at), table_bytes)),
                    (6, binding(buffer(counters_at), COUNTER_BYTES)),
                    (7, binding(buffer(tallies_at), tally_bytes)),
                    (8, binding(buffer(evidence_at), evidence_bytes)),
                ]
                .map(|(binding, resource)| wgpu::BindGroupEntry { binding, resource }),
            });
            let prepare_main = device.create_bind_group(&wgpu::BindGroupDescriptor {
                label: Some("votes-prepare"),
                layout: &self.kernels.prepare.get_bind_group_layout(0),
                entries: &[
                    wgpu::BindGroupEntry {
                        binding: 1,
                        resource: binding(buffer(params_at), 32),
                    },
                    wgpu::BindGroupEntry {
                        binding: 6,
                        resource: binding(buffer(counters_at), COUNTER_BYTES),
                    },
                ],
            });
            let prepare_indirect = device.create_bind_group(&wgpu::BindGroupDescriptor {
                label: Some("votes-indirect"),
                layout: &self.kernels.prepare.get_bind_group_layout(1),
                entries: &[wgpu::BindGroupEntry {
                    binding: 0,
                    resource: binding(buffer(indirect_at), 16),
                }],
            });
            let mut encoder = device.create_command_encoder(&wgpu::CommandEncoderDescriptor {
                label: Some("votes"),
            });
            encoder.clear_buffer(buffer(ballots_at), 0, Some(table_bytes));
            encoder.clear_buffer(buffer(proposals_at), 0, Some(table_bytes));
            encoder.clear_buffer(buffer(counters_at), 0, Some(COUNTER_BYTES));
            {
                let mut pass = encoder.begin_compute_pass(&wgpu::ComputePassDescriptor {
                    label: Some("votes-insert"),
                    timestamp_writes: None,
                });
                pass.set_pipeline(&self.kernels.insert);
                pass.set_bind_group(0, &main, &[]);
                pass.dispatch_workgroups(groups, 1, 1);
                pass.set_pipeline(&self.kernels.prepare);
                pass.set_bind_group(0, &prepare_main, &[]);
                pass.set_bind_group(1, &prepare_indirect, &[]);
                pass.dispatch_workgroups(1, 1, 1);
            }
            {
                // A new pass, so that `indirect` is no longer bound as storage when it is read
                // as dispatch arguments.
                let mut pass = encoder.begin_compute_pass(&wgpu::ComputePassDescriptor {
                    label: Some("votes-tally"),
                    timestamp_writes: None,
                });
                pass.set_bind_group(0, &main, &[]);
                pass.set_pipeline(&self.kernels.tally);
                pass.dispatch_workgroups(groups, 1, 1);
                for stage in &self.kernels.evidence {
                    pass.set_pipeline(stage);
                    pass.dispatch_workgroups_indirect(buffer(indirect_at), 0);
                }
            }
            let readback = buffer(readback_at);
            encoder.copy_buffer_to_buffer(buffer(counters_at), 0, readback, 0, COUNTER_BYTES);
            encoder.copy_buffer_to_buffer(
                buffer(tallies_at),
                0,
                readback,
                COUNTER_BYTES,
                first_tally_bytes,
            );
            encoder.copy_buffer_to_buffer(
                buffer(evidence_at),
                0,
                readback,
                COUNTER_BYTES + first_tally_bytes,
                first_evidence_bytes,
            );
            encoder.finish()
        });
        let commands = match encoded {
            Ok(commands) => commands,
            Err(error) => {
                buffers.discard();
                return Err(error);
            }
        };
        let read = context.submit([commands]).and_then(|submission| {
            context.wait_for_submission(Some(submission))?;
            context.read_back::<u32>(buffer(readback_at), readback_bytes)
        });
        let words = match read {
            Ok(words) => words,
            Err(error) => {
                buffers.discard();
                return Err(error);
            }
        };
        let tally_count = words[0] as usize;
        let evidence_count = words[1] as usize;
        if tally_count > tally_capacity || evidence_count > evidence_capacity {
            return Ok(((tally_count, evidence_count, PassResult::empty()), buffers));
        }
        let tally_words = &words[4..4 + first_tallies * TALLY_WORDS];
        let evidence_words = &words[4 + first_tallies * TALLY_WORDS..];
        let mut tallies: Vec<RawTally> = tally_words
            .chunks_exact(TALLY_WORDS)
            .take(tally_count)
            .map(parse_tally)
            .collect();
        let mut equivocations: Vec<Equivocation> = evidence_words
            .chunks_exact(EVIDENCE_WORDS)
            .take(evidence_count)
            .map(parse_evidence)
            .collect();
        if tally_count > first_tallies || evidence_count > first_evidence {
            let rest = self.read_rest(
                &buffers,
                (tallies_at, first_tallies, tally_count),
                (evidence_at, first_evidence, evidence_count),
            );
            match rest {
                Ok((more_tallies, more_evidence)) => {
                    tallies.extend(more_tallies);
                    equivocations.extend(more_evidence);
                }
                Err(error) => {
                    buffers.discard();
                    return Err(error);
                }
            }
        }
        Ok((
            (
                tally_count,
                evidence_count,
                PassResult {
                    tallies,
                    equivocations,
                },
            ),
            buffers,
        ))
    }

    /// Reads records `[read, count)` of the tally and evidence arrays that the first read-back
    /// did not cover.
    #[allow(clippy::type_complexity)]
    fn read_rest(
        &self,
        buffers: &PassBuffers,
        (tallies_at, tallies_read, tally_count): (usize, usize, usize),
        (evidence_at, evidence_read, evidence_count): (usize, usize, usize),
    ) -> Result<(Vec<RawTally>, Vec<Equivocation>), GpuError> {
        let tally_range = (
            (tallies_read * TALLY_WORDS * 4) as u64,
            (tally_count.saturating_sub(tallies_read) * TALLY_WORDS * 4) as u64,
        );
        let evidence_range = (
            (evidence_read * EVIDENCE_WORDS * 4) as u64,
            (evidence_count.saturating_sub(evidence_read) * EVIDENCE_WORDS * 4) as u64,
        );
        let total = tally_range.1 + evidence_range.1;
        let readback = self.context.buffers().acquire(
            "votes-readback-rest",
            total,
            wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
        )?;
        let mut encoder =
            self.context
                .device()
                .create_command_encoder(&wgpu::CommandEncoderDescriptor {
                    label: Some("votes-rest"),
                });
        if tally_range.1 > 0 {
            encoder.copy_buffer_to_buffer(
                &buffers.buffers[tallies_at],
                tally_range.0,
                &readback,
                0,
                tally_range.1,
            );
        }
        if evidence_range.1 > 0 {
            encoder.copy_buffer_to_buffer(
                &buffers.buffers[evidence_at],
                evidence_range.0,
                &readback,
                tally_range.1,
                evidence_range.1,
            );
        }
        let submission = self.context.submit([encoder.finish()])?;
        let words = self
            .context
            .wait_for_submission(Some(submission))
            .and_then(|()| self.context.read_back::<u32>(&readback, total));
        let words = match words {
            Ok(words) => words,
            Err(error) => {
                readback.discard();
                return Err(error);
            }
        };
        let split = (tally_range.1 / 4) as usize;
        Ok((
            words[..split]
                .chunks_exact(TALLY_WORDS)
                .map(parse_tally)
                .collect(),
            words[split..]
                .chunks_exact(EVIDENCE_WORDS)
                .map(parse_evidence)
                .collect(),
        ))
    }
}

impl PassResult {
    fn empty() -> Self {
        Self {
            tallies: Vec::new(),
            equivocations: Vec::new(),
        }
    }
}
