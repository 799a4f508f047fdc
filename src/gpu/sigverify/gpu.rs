//! The wgpu backend: SHA-512 of `R ‖ A ‖ M` on CPU threads (rayon), everything else in one WGSL
//! kernel (`shaders/ed25519_verify.wgsl`), one invocation per signature, which interprets the
//! verification program of [`super::program`] (one call site per field operation; see there why).
//!
//! A call splits the batch into submissions sized from the adapter's measured throughput, so
//! that each takes about a quarter of `kernel_launch_timeout` (the bound is per submission, and
//! a batch of any size completes on a slow adapter), and never more than
//! [`GpuVerifierOptions::max_items_per_dispatch`] items. Building the verifier compiles the
//! kernel and runs the self-check under `pipeline_compile_timeout` (see
//! [`GpuContext::warm_up`]), then runs it again to measure the throughput; every submission
//! updates the measure. For each dispatch it packs the items
//! (40 words each: `A`, `R`, `s`, digest), writes them into pooled buffers, dispatches, and while
//! the GPU works it already hashes and packs the next dispatch; then it reads the verdicts back
//! through a pooled staging buffer. The program (~24 KiB) and the base-point table (`[j·16^w]B`,
//! 1024 affine points, 240 KiB, computed exactly on the CPU) are uploaded once, when the verifier
//! is built, and stay resident.

use std::num::NonZeroU64;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use rayon::prelude::*;
use sha2::{Digest, Sha512};

use super::super::context::{GpuContext, GpuError, PooledBuffer, buffer_binding as binding};
use super::program::STATE_WORDS;
use super::vectors::{self, OwnedItem};
use super::{SigVerifyError, SignatureItem, SignatureVerifier, verify_strict_reference};

/// Field, scalar and batch-layout code, then the kernel file.
macro_rules! ed25519_kernel {
    ($file:literal) => {
        concat!(
            include_str!("../../../shaders/ed25519_field.wgsl"),
            "\n",
            include_str!("../../../shaders/ed25519_field_unrolled.wgsl"),
            "\n",
            include_str!("../../../shaders/ed25519_scalar.wgsl"),
            "\n",
            include_str!("../../../shaders/ed25519_batch.wgsl"),
            "\n",
            include_str!($file),
        )
    };
}

/// The verification kernel (the program interpreter).
const VERIFY_SHADER: &str = ed25519_kernel!("../../../shaders/ed25519_verify.wgsl");

/// Building-block kernels for the tests (field, scalar); see [`run_building_block`].
const SELFTEST_SHADER: &str = ed25519_kernel!("../../../shaders/ed25519_selftest.wgsl");

/// Words per packed item; `ITEM_WORDS` in `ed25519_batch.wgsl`.
pub(crate) const ITEM_WORDS: usize = 40;
/// Limbs per field element; the kernels read it from the uniform (`Params::limbs`).
const FIELD_LIMBS: u32 = 20;
/// `@workgroup_size` of every kernel.
const WORKGROUP_SIZE: u32 = 64;

/// Program ops per dispatch on CPU-type adapters (llvmpipe), which silently exit every loop of
/// an invocation after 65 535 iterations: ~50 iterations per op were measured there, plus ~2 000
/// to load and store the state between segments.
pub const SOFTWARE_ADAPTER_OPS_PER_DISPATCH: usize = 512;

/// A submission is sized to take `kernel_launch_timeout / SUBMISSION_SHARE_OF_BOUND` at the
/// measured throughput: a host four times busier than when measured still fits the bound.
const SUBMISSION_SHARE_OF_BOUND: u32 = 4;

/// How often a long batch logs how far it got.
const PROGRESS_INTERVAL: Duration = Duration::from_secs(5);

/// Tuning of [`GpuSignatureVerifier`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GpuVerifierOptions {
    /// Most items in one dispatch; larger batches are split. Bounded further by the device's
    /// storage-binding limit and by 65 535 workgroups.
    pub max_items_per_dispatch: usize,
    /// Program ops per dispatch: `None` runs the whole program (~6 700 ops) in one dispatch on
    /// hardware adapters and [`SOFTWARE_ADAPTER_OPS_PER_DISPATCH`] on CPU-type adapters. Shorter
    /// segments pass each invocation's 8 KiB state through memory between dispatches.
    pub ops_per_dispatch: Option<usize>,
}

impl Default for GpuVerifierOptions {
    /// 65 536 items (10 MiB of input) per dispatch: large enough to fill an H100, small enough
    /// that one dispatch stays well inside a watchdog or `kernel_launch_timeout` on slow adapters;
    /// automatic segmenting of the program.
    fn default() -> Self {
        Self {
            max_items_per_dispatch: 1 << 16,
            ops_per_dispatch: None,
        }
    }
}

/// ed25519 `verify_strict` in WGSL on the context's device.
pub struct GpuSignatureVerifier {
    context: Arc<GpuContext>,
    pipeline: Arc<wgpu::ComputePipeline>,
    program: wgpu::Buffer,
    /// `[begin, end)` ops of each dispatch of one batch, covering the program in order.
    segments: Vec<(u32, u32)>,
    /// Byte stride between the segments' parameter blocks (the uniform offset alignment).
    params_stride: u64,
    base_table: wgpu::Buffer,
    max_items_per_dispatch: usize,
    /// Measured GPU time per item, in nanoseconds (0 before the first measure): a slowdown is
    /// taken at once, a speed-up a quarter at a time.
    nanos_per_item: AtomicU64,
}

impl std::fmt::Debug for GpuSignatureVerifier {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("GpuSignatureVerifier")
            .field("adapter", &self.context.adapter_name())
            .field("max_items_per_dispatch", &self.max_items_per_dispatch)
            .field("items_per_submission", &self.items_per_submission())
            .finish()
    }
}

/// One submitted dispatch whose verdicts are not read yet; the pooled buffers go back to the
/// pool when it is dropped.
struct InFlight {
    count: usize,
    submitted: Instant,
    staging: PooledBuffer,
    _items: PooledBuffer,
    _verdicts: PooledBuffer,
    _params: PooledBuffer,
    _state: PooledBuffer,
}

impl GpuSignatureVerifier {
    /// Compiles the kernel, uploads the program and the base-point table, runs a known-answer
    /// self-check against the CPU reference (the warm-up: its first dispatch is where Mesa
    /// compiles, bounded by `pipeline_compile_timeout`) and runs it once more to measure the
    /// adapter's throughput, with default options.
    ///
    /// # Errors
    /// [`SigVerifyError::Gpu`] when the shader does not compile, an upload or a dispatch fails
    /// or times out (the [`GpuError::Timeout`] names the bound that ran out); [`SigVerifyError::SelfCheckFailed`] when the kernels give a verdict
    /// that differs from `verify_strict` on the self-check batch. Either way the caller should use
    /// the CPU backend.
    pub fn new(context: Arc<GpuContext>) -> Result<Self, SigVerifyError> {
        Self::with_options(context, GpuVerifierOptions::default())
    }

    /// As [`Self::new`] with explicit options.
    ///
    /// # Errors
    /// As [`Self::new`].
    pub fn with_options(
        context: Arc<GpuContext>,
        options: GpuVerifierOptions,
    ) -> Result<Self, SigVerifyError> {
        let pipeline = context.compute_pipeline("ed25519_verify", VERIFY_SHADER, "verify_main")?;
        let program_words = super::program::verify_program();
        let program_len =
            u32::try_from(program_words.len()).map_err(|_| GpuError::InputTooLarge {
                detail: "verification program".to_string(),
            })?;
        let program = upload(&context, "ed25519 program", program_words)?;
        let base_table = upload(
            &context,
            "ed25519 base table",
            &super::base_table::table_words(),
        )?;
        let software = context.adapter_info().device_type == wgpu::DeviceType::Cpu;
        let ops_per_dispatch = match options.ops_per_dispatch {
            Some(ops) => ops.max(1),
            None if software => SOFTWARE_ADAPTER_OPS_PER_DISPATCH,
            None => program_words.len(),
        };
        let segments: Vec<(u32, u32)> = (0..program_len)
            .step_by(ops_per_dispatch)
            .map(|begin| {
                (
                    begin,
                    program_len.min(begin.saturating_add(ops_per_dispatch as u32)),
                )
            })
            .collect();
        let item_bytes = if segments.len() > 1 {
            (STATE_WORDS * 4) as u64
        } else {
            (ITEM_WORDS * 4) as u64
        };
        let params_stride = u64::from(context.limits().min_uniform_buffer_offset_alignment).max(16);
        let by_binding = context.max_storage_binding_bytes() / item_bytes;
        let by_workgroups = 65_535 * u64::from(WORKGROUP_SIZE);
        let limit = by_binding.min(by_workgroups).max(1) as usize;
        let verifier = Self {
            context,
            pipeline,
            program,
            segments,
            params_stride,
            base_table,
            max_items_per_dispatch: options.max_items_per_dispatch.clamp(1, limit),
            nanos_per_item: AtomicU64::new(0),
        };
        verifier.context.warm_up("ed25519_verify", || {
            verifier.self_check()?;
            // The first run's time is mostly compilation: measure again, compiled.
            verifier.nanos_per_item.store(0, Ordering::Relaxed);
            verifier.self_check()
        })?;
        tracing::info!(
            adapter = %verifier.context.adapter_name(),
            nanos_per_item = verifier.nanos_per_item.load(Ordering::Relaxed),
            items_per_submission = verifier.items_per_submission(),
            "ed25519 GPU verifier ready"
        );
        Ok(verifier)
    }

    /// Known-answer check: honest signatures, tampered ones, a small-order key and a
    /// non-canonical s, compared with the CPU reference. A GPU stack that miscompiles the
    /// kernels must not give consensus wrong verdicts, so any difference refuses the backend.
    fn self_check(&self) -> Result<(), SigVerifyError> {
        let mut items = vectors::random_valid_items(0x5e1f, 6, 64);
        let mut tampered = items.clone();
        for (index, item) in tampered.iter_mut().enumerate() {
            match index % 3 {
                0 => item.message[index] ^= 1,
                1 => item.signature[index] ^= 0x10,
                _ => item.signature[63] |= 0x20,
            }
        }
        items.extend(tampered);
        let mut weak = items[0].clone();
        weak.public_key = vectors::small_order_encodings()[0];
        items.push(weak);
        let refs: Vec<SignatureItem<'_>> = items.iter().map(OwnedItem::as_item).collect();
        let expected: Vec<bool> = refs.iter().map(verify_strict_reference).collect();
        let got = self.verify_batch(&refs)?;
        let mismatches = expected
            .iter()
            .zip(&got)
            .filter(|(expected, got)| expected != got)
            .count();
        if mismatches > 0 || got.len() != expected.len() {
            tracing::error!(
                mismatches,
                adapter = %self.context.adapter_name(),
                "ed25519 GPU kernels disagree with verify_strict; GPU backend refused"
            );
            return Err(SigVerifyError::SelfCheckFailed {
                mismatches,
                checked: expected.len(),
            });
        }
        Ok(())
    }

    /// The context this verifier runs on.
    pub fn context(&self) -> &Arc<GpuContext> {
        &self.context
    }

    /// How many dispatches one batch's program is split into (1 on hardware adapters).
    pub fn program_segments(&self) -> usize {
        self.segments.len()
    }

    /// The effective dispatch size after the device limits.
    pub fn max_items_per_dispatch(&self) -> usize {
        self.max_items_per_dispatch
    }

    /// How many items the next submission of a batch takes: what the adapter verifies in a
    /// quarter of `kernel_launch_timeout` at its measured throughput, at least 1 and at most
    /// [`Self::max_items_per_dispatch`].
    pub fn items_per_submission(&self) -> usize {
        let nanos_per_item = self.nanos_per_item.load(Ordering::Relaxed).max(1);
        let budget = self.context.config().kernel_launch_timeout / SUBMISSION_SHARE_OF_BOUND;
        let items = budget.as_nanos() / u128::from(nanos_per_item);
        usize::try_from(items)
            .unwrap_or(usize::MAX)
            .clamp(1, self.max_items_per_dispatch)
    }

    /// Folds one submission's time into the measured throughput.
    fn record_throughput(&self, count: usize, elapsed: Duration) {
        let measured = u64::try_from(elapsed.as_nanos() / count.max(1) as u128)
            .unwrap_or(u64::MAX)
            .max(1);
        let previous = self.nanos_per_item.load(Ordering::Relaxed);
        let next = if previous == 0 || measured >= previous {
            measured
        } else {
            previous - (previous - measured) / 4
        };
        self.nanos_per_item.store(next, Ordering::Relaxed);
    }

    /// Hashes and packs items into the kernel's 40-word records, on all cores.
    fn pack(items: &[SignatureItem<'_>]) -> Vec<u32> {
        let records: Vec<[u32; ITEM_WORDS]> =
            items.par_iter().with_min_len(64).map(pack_one).collect();
        records.into_iter().flatten().collect()
    }

    /// Writes one packed dispatch into pooled buffers and submits it.
    fn submit_dispatch(&self, packed: &[u32], count: usize) -> Result<InFlight, GpuError> {
        let context = &self.context;
        let pool = context.buffers();
        let item_bytes = (count * ITEM_WORDS * 4) as u64;
        let verdict_bytes = (count * 4) as u64;
        let items = pool.acquire(
            "ed25519 items",
            item_bytes,
            wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_DST,
        )?;
        let verdicts = pool.acquire(
            "ed25519 verdicts",
            verdict_bytes,
            wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC,
        )?;
        let staging = pool.acquire(
            "ed25519 verdict staging",
            verdict_bytes,
            wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
        )?;
        let params = pool.acquire(
            "ed25519 params",
            self.params_stride * self.segments.len() as u64,
            wgpu::BufferUsages::UNIFORM | wgpu::BufferUsages::COPY_DST,
        )?;
        // Only a segmented program passes state between dispatches; otherwise a token binding.
        let state_bytes = if self.segments.len() > 1 {
            (count * STATE_WORDS * 4) as u64
        } else {
            4
        };
        let state = pool.acquire("ed25519 state", state_bytes, wgpu::BufferUsages::STORAGE)?;
        let queue = context.queue();
        queue.write_buffer(&items, 0, bytemuck::cast_slice(packed));
        let count_u32 = u32::try_from(count).map_err(|_| GpuError::InputTooLarge {
            detail: format!("{count} items in one dispatch"),
        })?;
        let mut params_bytes = vec![0u8; (self.params_stride as usize) * self.segments.len()];
        for (block, &(begin, end)) in params_bytes
            .chunks_exact_mut(self.params_stride as usize)
            .zip(&self.segments)
        {
            block[..16].copy_from_slice(bytemuck::cast_slice(&[
                count_u32,
                FIELD_LIMBS,
                begin,
                end,
            ]));
        }
        queue.write_buffer(&params, 0, &params_bytes);
        let commands = context.validated(|| {
            let device = context.device();
            let bind_groups: Vec<wgpu::BindGroup> = (0..self.segments.len())
                .map(|segment| {
                    let resources = vec![
                        binding(&items, item_bytes),
                        self.program.as_entire_binding(),
                        self.base_table.as_entire_binding(),
                        binding(&verdicts, verdict_bytes),
                        wgpu::BindingResource::Buffer(wgpu::BufferBinding {
                            buffer: &params,
                            offset: segment as u64 * self.params_stride,
                            size: NonZeroU64::new(16),
                        }),
                        binding(&state, state_bytes),
                    ];
                    bind_group(device, "ed25519 verify", &self.pipeline, resources)
                })
                .collect();
            let mut encoder = device.create_command_encoder(&wgpu::CommandEncoderDescriptor {
                label: Some("ed25519 verify"),
            });
            {
                let mut pass = encoder.begin_compute_pass(&wgpu::ComputePassDescriptor {
                    label: Some("ed25519 verify"),
                    timestamp_writes: None,
                });
                pass.set_pipeline(&self.pipeline);
                for bind_group in &bind_groups {
                    pass.set_bind_group(0, bind_group, &[]);
                    pass.dispatch_workgroups(count_u32.div_ceil(WORKGROUP_SIZE), 1, 1);
                }
            }
            encoder.copy_buffer_to_buffer(&verdicts, 0, &staging, 0, verdict_bytes);
            encoder.finish()
        })?;
        let submitted = Instant::now();
        context.submit([commands])?;
        Ok(InFlight {
            count,
            submitted,
            staging,
            _items: items,
            _verdicts: verdicts,
            _params: params,
            _state: state,
        })
    }

    /// Waits for a dispatch and appends its verdicts.
    fn finish_dispatch(&self, in_flight: InFlight, out: &mut Vec<bool>) -> Result<(), GpuError> {
        let words: Vec<u32> = self
            .context
            .read_back(&in_flight.staging, (in_flight.count * 4) as u64)?;
        self.record_throughput(in_flight.count, in_flight.submitted.elapsed());
        out.extend(words.into_iter().map(|word| word == 1));
        Ok(())
    }
}

/// Splits off and returns the first `count` items of `rest` (all of them when fewer).
fn take_front<'a, 'b>(rest: &mut &'b [SignatureItem<'a>], count: usize) -> &'b [SignatureItem<'a>] {
    let (front, back) = rest.split_at(count.min(rest.len()));
    *rest = back;
    front
}

/// A bind group for group 0 of `pipeline` whose binding `i` is `resources[i]`.
fn bind_group(
    device: &wgpu::Device,
    label: &str,
    pipeline: &wgpu::ComputePipeline,
    resources: Vec<wgpu::BindingResource<'_>>,
) -> wgpu::BindGroup {
    let entries: Vec<wgpu::BindGroupEntry<'_>> = resources
        .into_iter()
        .enumerate()
        .map(|(slot, resource)| wgpu::BindGroupEntry {
            binding: slot as u32,
            resource,
        })
        .collect();
    device.create_bind_group(&wgpu::BindGroupDescriptor {
        label: Some(label),
        layout: &pipeline.get_bind_group_layout(0),
        entries: &entries,
    })
}

/// One item as the kernel reads it: `A`, `R`, `s` as little-endian words, then
/// SHA-512(R ‖ A ‖ M) over the bytes exactly as given.
fn pack_one(item: &SignatureItem<'_>) -> [u32; ITEM_WORDS] {
    let mut hasher = Sha512::new();
    hasher.update(&item.signature[..32]);
    hasher.update(item.public_key);
    hasher.update(item.message);
    let digest: [u8; 64] = hasher.finalize().into();
    let mut record = [0u32; ITEM_WORDS];
    let sources: [&[u8]; 4] = [
        &item.public_key,
        &item.signature[..32],
        &item.signature[32..],
        &digest,
    ];
    let mut words = record.iter_mut();
    for source in sources {
        // The source goes first in the zip so that its end does not consume a word.
        for (chunk, word) in source.chunks_exact(4).zip(words.by_ref()) {
            *word = u32::from_le_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
        }
    }
    record
}

/// A resident read-only storage buffer holding `words`.
fn upload(context: &GpuContext, label: &str, words: &[u32]) -> Result<wgpu::Buffer, GpuError> {
    let buffer = context.validated(|| {
        context.device().create_buffer(&wgpu::BufferDescriptor {
            label: Some(label),
            size: (words.len() * 4) as u64,
            usage: wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        })
    })?;
    context
        .queue()
        .write_buffer(&buffer, 0, bytemuck::cast_slice(words));
    Ok(buffer)
}

/// A building block of the verification kernel, exposed so tests can compare it with a CPU
/// reference on its own (the layouts are in `shaders/ed25519_selftest.wgsl`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BuildingBlock {
    /// 16 words in (a, b) → 32 out: a·b, a+b, a−b, a^4, canonical, mod p.
    Field,
    /// 16 words in (a, unused) → 16 out: 1/a and a^(2^200) (long multiplication loops).
    FieldPow,
    /// 16 words in (h) → 9 out: h mod L, and whether the low 8 words are ≥ L.
    Scalar,
}

impl BuildingBlock {
    fn entry_point(self) -> &'static str {
        match self {
            Self::Field => "field_main",
            Self::FieldPow => "field_pow_main",
            Self::Scalar => "scalar_main",
        }
    }

    /// Output words per case.
    pub fn output_words(self) -> usize {
        match self {
            Self::Field => 32,
            Self::FieldPow => 16,
            Self::Scalar => 9,
        }
    }
}

/// Runs one building-block kernel over `inputs` (16 words per case) and returns its outputs.
///
/// # Errors
/// A [`GpuError`] when the kernel does not compile or the dispatch fails.
pub fn run_building_block(
    context: &GpuContext,
    block: BuildingBlock,
    inputs: &[u32],
) -> Result<Vec<u32>, GpuError> {
    let count = inputs.len() / 16;
    if count == 0 {
        return Ok(Vec::new());
    }
    let pipeline =
        context.compute_pipeline("ed25519_selftest", SELFTEST_SHADER, block.entry_point())?;
    let pool = context.buffers();
    let input_bytes = (count * 16 * 4) as u64;
    let output_bytes = (count * block.output_words() * 4) as u64;
    let input = pool.acquire(
        "ed25519 selftest in",
        input_bytes,
        wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_DST,
    )?;
    let output = pool.acquire(
        "ed25519 selftest out",
        output_bytes,
        wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC,
    )?;
    let staging = pool.acquire(
        "ed25519 selftest staging",
        output_bytes,
        wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
    )?;
    let params = pool.acquire(
        "ed25519 selftest params",
        16,
        wgpu::BufferUsages::UNIFORM | wgpu::BufferUsages::COPY_DST,
    )?;
    let count_u32 = u32::try_from(count).map_err(|_| GpuError::InputTooLarge {
        detail: format!("{count} self-test cases"),
    })?;
    context
        .queue()
        .write_buffer(&input, 0, bytemuck::cast_slice(&inputs[..count * 16]));
    context.queue().write_buffer(
        &params,
        0,
        bytemuck::cast_slice(&[count_u32, FIELD_LIMBS, 0, 0]),
    );
    let commands = context.validated(|| {
        let bind_group = bind_group(
            context.device(),
            "ed25519 selftest",
            &pipeline,
            vec![
                binding(&input, input_bytes),
                binding(&output, output_bytes),
                binding(&params, 16),
            ],
        );
        let mut encoder =
            context
                .device()
                .create_command_encoder(&wgpu::CommandEncoderDescriptor {
                    label: Some("ed25519 selftest"),
                });
        {
            let mut pass = encoder.begin_compute_pass(&wgpu::ComputePassDescriptor {
                label: Some("ed25519 selftest"),
                timestamp_writes: None,
            });
            pass.set_pipeline(&pipeline);
            pass.set_bind_group(0, &bind_group, &[]);
            pass.dispatch_workgroups(count_u32.div_ceil(WORKGROUP_SIZE), 1, 1);
        }
        encoder.copy_buffer_to_buffer(&output, 0, &staging, 0, output_bytes);
        encoder.finish()
    })?;
    context.submit([commands])?;
    context.read_back(&staging, output_bytes)
}

impl SignatureVerifier for GpuSignatureVerifier {
    fn verify_batch(&self, items: &[SignatureItem<'_>]) -> Result<Vec<bool>, SigVerifyError> {
        // Upload: hashing, packing, writing and submitting; run: from the submission until the
        // verdicts are read back (a read-back waits for the run, so the two are one figure).
        let span = tracing::info_span!(
            target: "consensus::gpu",
            "gpu.dispatch",
            gpu.kernel = "ed25519_verify",
            gpu.adapter = %self.context.adapter_name(),
            gpu.batch_size = items.len(),
            gpu.submissions = tracing::field::Empty,
            gpu.upload_us = tracing::field::Empty,
            gpu.run_and_read_back_us = tracing::field::Empty,
        );
        let _entered = span.enter();
        let (mut upload, mut run, mut submissions) = (Duration::ZERO, Duration::ZERO, 0u64);
        let mut verdicts = Vec::with_capacity(items.len());
        let started = Instant::now();
        let mut next_report = started + PROGRESS_INTERVAL;
        let mut rest = items;
        let mut next = take_front(&mut rest, self.items_per_submission());
        let mut packed = Self::pack(next);
        upload += started.elapsed();
        while !next.is_empty() {
            let submitting = Instant::now();
            let in_flight = self.submit_dispatch(&packed, next.len())?;
            // Overlap: hash and pack the next submission while the GPU runs this one.
            next = take_front(&mut rest, self.items_per_submission());
            if !next.is_empty() {
                packed = Self::pack(next);
            }
            upload += submitting.elapsed();
            let reading = Instant::now();
            self.finish_dispatch(in_flight, &mut verdicts)?;
            run += reading.elapsed();
            submissions += 1;
            if verdicts.len() < items.len() && Instant::now() >= next_report {
                tracing::info!(
                    verified = verdicts.len(),
                    total = items.len(),
                    elapsed = ?started.elapsed(),
                    items_per_submission = self.items_per_submission(),
                    "ed25519 GPU batch in progress"
                );
                next_report = Instant::now() + PROGRESS_INTERVAL;
            }
        }
        span.record("gpu.submissions", submissions);
        span.record("gpu.upload_us", upload.as_micros() as u64);
        span.record("gpu.run_and_read_back_us", run.as_micros() as u64);
        Ok(verdicts)
    }

    fn backend_name(&self) -> &'static str {
        "gpu"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Both shaders parse and validate without a GPU, and the interpreter's register and flag
    /// counts are the program's.
    #[test]
    fn shaders_validate_and_agree_with_the_program() {
        for (name, source) in [("verify", VERIFY_SHADER), ("selftest", SELFTEST_SHADER)] {
            let module = naga::front::wgsl::parse_str(source)
                .unwrap_or_else(|error| panic!("{name}: {}", error.emit_to_string(source)));
            naga::valid::Validator::new(
                naga::valid::ValidationFlags::all(),
                naga::valid::Capabilities::empty(),
            )
            .validate(&module)
            .unwrap_or_else(|error| panic!("{name}: {error:?}"));
        }
        let registers = format!(
            "const REGISTERS: u32 = {}u;",
            super::super::program::REGISTERS
        );
        let flags = format!("const FLAGS: u32 = {}u;", super::super::program::FLAGS);
        assert!(VERIFY_SHADER.contains(&registers), "{registers}");
        assert!(VERIFY_SHADER.contains(&flags), "{flags}");
    }

    #[test]
    fn pack_layout_matches_the_shader_header() {
        let item = SignatureItem {
            public_key: [1; 32],
            message: b"m",
            signature: {
                let mut signature = [2; 64];
                signature[32..].fill(3);
                signature
            },
        };
        let record = pack_one(&item);
        assert_eq!(record[0], 0x0101_0101);
        assert_eq!(record[8], 0x0202_0202);
        assert_eq!(record[16], 0x0303_0303);
        let mut hasher = Sha512::new();
        hasher.update([2u8; 32]);
        hasher.update([1u8; 32]);
        hasher.update(b"m");
        let digest: [u8; 64] = hasher.finalize().into();
        assert_eq!(
            record[24],
            u32::from_le_bytes([digest[0], digest[1], digest[2], digest[3]])
        );
        assert_eq!(
            record[39],
            u32::from_le_bytes([digest[60], digest[61], digest[62], digest[63]])
        );
    }
}
