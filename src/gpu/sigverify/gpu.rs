//! The wgpu backend: SHA-512 of `R ‖ A ‖ M` on CPU threads (rayon), everything else in WGSL
//! (`shaders/ed25519_*.wgsl`), one invocation per signature.
//!
//! A call splits the batch into dispatches of at most
//! [`GpuVerifierOptions::max_items_per_dispatch`] items. For each dispatch it packs the items
//! (40 words each: `A`, `R`, `s`, digest), writes them into pooled buffers, dispatches, and while
//! the GPU works it already hashes and packs the next dispatch; then it reads the verdicts back
//! through a pooled staging buffer. The base-point table (`[j·16^w]B`, 1024 affine points, 240 KiB)
//! is computed on the GPU once, when the verifier is built, and stays resident.

use std::num::NonZeroU64;
use std::sync::Arc;

use rayon::prelude::*;
use sha2::{Digest, Sha512};

use super::super::context::{GpuContext, GpuError, PooledBuffer};
use super::{SigVerifyError, SignatureItem, SignatureVerifier};

/// The verify kernel: field, curve and scalar code, then the entry point.
const VERIFY_SHADER: &str = concat!(
    include_str!("../../../shaders/ed25519_field.wgsl"),
    "\n",
    include_str!("../../../shaders/ed25519_curve.wgsl"),
    "\n",
    include_str!("../../../shaders/ed25519_scalar.wgsl"),
    "\n",
    include_str!("../../../shaders/ed25519_verify.wgsl"),
);

/// The one-off base-point table kernel.
const TABLE_SHADER: &str = concat!(
    include_str!("../../../shaders/ed25519_field.wgsl"),
    "\n",
    include_str!("../../../shaders/ed25519_curve.wgsl"),
    "\n",
    include_str!("../../../shaders/ed25519_table.wgsl"),
);

/// Words per packed item; must match `ITEM_WORDS` in `ed25519_verify.wgsl`.
pub(crate) const ITEM_WORDS: usize = 40;
/// Entries of the base-point table (64 windows × 16 digits).
const TABLE_ENTRIES: u64 = 1024;
/// Words per table entry (three 20-limb field elements); `NIELS_WORDS` in the shader.
const NIELS_WORDS: u64 = 60;
/// `@workgroup_size` of both kernels.
const WORKGROUP_SIZE: u32 = 64;

/// Tuning of [`GpuSignatureVerifier`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GpuVerifierOptions {
    /// Most items in one dispatch; larger batches are split. Bounded further by the device's
    /// storage-binding limit and by 65 535 workgroups.
    pub max_items_per_dispatch: usize,
}

impl Default for GpuVerifierOptions {
    /// 65 536 items (10 MiB of input) per dispatch: large enough to fill an H100, small enough
    /// that one dispatch stays well inside a watchdog or `kernel_launch_timeout` on slow adapters.
    fn default() -> Self {
        Self {
            max_items_per_dispatch: 1 << 16,
        }
    }
}

/// ed25519 `verify_strict` in WGSL on the context's device.
pub struct GpuSignatureVerifier {
    context: Arc<GpuContext>,
    verify_pipeline: Arc<wgpu::ComputePipeline>,
    base_table: wgpu::Buffer,
    max_items_per_dispatch: usize,
}

impl std::fmt::Debug for GpuSignatureVerifier {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("GpuSignatureVerifier")
            .field("adapter", &self.context.adapter_name())
            .field("max_items_per_dispatch", &self.max_items_per_dispatch)
            .finish()
    }
}

/// One submitted dispatch whose verdicts are not read yet; the pooled buffers go back to the
/// pool when it is dropped.
struct InFlight {
    count: usize,
    staging: PooledBuffer,
    _items: PooledBuffer,
    _verdicts: PooledBuffer,
    _params: PooledBuffer,
}

impl GpuSignatureVerifier {
    /// Compiles the kernels and builds the base-point table with default options.
    ///
    /// # Errors
    /// A [`GpuError`] when a shader does not compile or the table build fails.
    pub fn new(context: Arc<GpuContext>) -> Result<Self, GpuError> {
        Self::with_options(context, GpuVerifierOptions::default())
    }

    /// As [`Self::new`] with explicit options.
    ///
    /// # Errors
    /// As [`Self::new`].
    pub fn with_options(
        context: Arc<GpuContext>,
        options: GpuVerifierOptions,
    ) -> Result<Self, GpuError> {
        let verify_pipeline =
            context.compute_pipeline("ed25519_verify", VERIFY_SHADER, "verify_main")?;
        let base_table = build_base_table(&context)?;
        let by_binding = context.max_storage_binding_bytes() / (ITEM_WORDS as u64 * 4);
        let by_workgroups = 65_535 * u64::from(WORKGROUP_SIZE);
        let limit = by_binding.min(by_workgroups).max(1) as usize;
        Ok(Self {
            context,
            verify_pipeline,
            base_table,
            max_items_per_dispatch: options.max_items_per_dispatch.clamp(1, limit),
        })
    }

    /// The context this verifier runs on.
    pub fn context(&self) -> &Arc<GpuContext> {
        &self.context
    }

    /// The effective dispatch size after the device limits.
    pub fn max_items_per_dispatch(&self) -> usize {
        self.max_items_per_dispatch
    }

    /// Reads the base-point table back (1024 entries × 60 words), for tests and diagnostics.
    ///
    /// # Errors
    /// A [`GpuError`] when the copy or the read-back fails.
    pub fn base_table_words(&self) -> Result<Vec<u32>, GpuError> {
        let bytes = self.base_table.size();
        let staging = self.context.buffers().acquire(
            "ed25519 table staging",
            bytes,
            wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
        )?;
        let mut encoder = self
            .context
            .device()
            .create_command_encoder(&wgpu::CommandEncoderDescriptor {
                label: Some("ed25519 table read"),
            });
        encoder.copy_buffer_to_buffer(&self.base_table, 0, &staging, 0, bytes);
        self.context.submit([encoder.finish()])?;
        self.context.read_back(&staging, bytes)
    }

    /// Hashes and packs items into the kernel's 40-word records, on all cores.
    fn pack(items: &[SignatureItem<'_>]) -> Vec<u32> {
        let records: Vec<[u32; ITEM_WORDS]> = items.par_iter().with_min_len(64).map(pack_one).collect();
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
            16,
            wgpu::BufferUsages::UNIFORM | wgpu::BufferUsages::COPY_DST,
        )?;
        let queue = context.queue();
        queue.write_buffer(&items, 0, bytemuck::cast_slice(packed));
        let count_u32 = u32::try_from(count).map_err(|_| GpuError::InputTooLarge {
            detail: format!("{count} items in one dispatch"),
        })?;
        queue.write_buffer(&params, 0, bytemuck::cast_slice(&[count_u32, 0, 0, 0]));
        let commands = context.validated(|| {
            let bind_group = context
                .device()
                .create_bind_group(&wgpu::BindGroupDescriptor {
                    label: Some("ed25519 verify"),
                    layout: &self.verify_pipeline.get_bind_group_layout(0),
                    entries: &[
                        wgpu::BindGroupEntry {
                            binding: 0,
                            resource: binding(&items, item_bytes),
                        },
                        wgpu::BindGroupEntry {
                            binding: 1,
                            resource: binding(&verdicts, verdict_bytes),
                        },
                        wgpu::BindGroupEntry {
                            binding: 2,
                            resource: self.base_table.as_entire_binding(),
                        },
                        wgpu::BindGroupEntry {
                            binding: 3,
                            resource: binding(&params, 16),
                        },
                    ],
                });
            let mut encoder =
                context
                    .device()
                    .create_command_encoder(&wgpu::CommandEncoderDescriptor {
                        label: Some("ed25519 verify"),
                    });
            {
                let mut pass = encoder.begin_compute_pass(&wgpu::ComputePassDescriptor {
                    label: Some("ed25519 verify"),
                    timestamp_writes: None,
                });
                pass.set_pipeline(&self.verify_pipeline);
                pass.set_bind_group(0, &bind_group, &[]);
                pass.dispatch_workgroups(count_u32.div_ceil(WORKGROUP_SIZE), 1, 1);
            }
            encoder.copy_buffer_to_buffer(&verdicts, 0, &staging, 0, verdict_bytes);
            encoder.finish()
        })?;
        context.submit([commands])?;
        Ok(InFlight {
            count,
            staging,
            _items: items,
            _verdicts: verdicts,
            _params: params,
        })
    }

    /// Waits for a dispatch and appends its verdicts.
    fn finish_dispatch(&self, in_flight: InFlight, out: &mut Vec<bool>) -> Result<(), GpuError> {
        let words: Vec<u32> = self
            .context
            .read_back(&in_flight.staging, (in_flight.count * 4) as u64)?;
        out.extend(words.into_iter().map(|word| word == 1));
        Ok(())
    }
}

/// The first `bytes` of `buffer` as a binding.
fn binding(buffer: &wgpu::Buffer, bytes: u64) -> wgpu::BindingResource<'_> {
    wgpu::BindingResource::Buffer(wgpu::BufferBinding {
        buffer,
        offset: 0,
        size: NonZeroU64::new(bytes),
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

/// Computes the base-point table on the GPU (1024 invocations) into a resident buffer.
fn build_base_table(context: &GpuContext) -> Result<wgpu::Buffer, GpuError> {
    let pipeline = context.compute_pipeline("ed25519_table", TABLE_SHADER, "build_table_main")?;
    let bytes = TABLE_ENTRIES * NIELS_WORDS * 4;
    let (table, commands) = context.validated(|| {
        let table = context.device().create_buffer(&wgpu::BufferDescriptor {
            label: Some("ed25519 base table"),
            size: bytes,
            usage: wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC,
            mapped_at_creation: false,
        });
        let bind_group = context
            .device()
            .create_bind_group(&wgpu::BindGroupDescriptor {
                label: Some("ed25519 base table"),
                layout: &pipeline.get_bind_group_layout(0),
                entries: &[wgpu::BindGroupEntry {
                    binding: 0,
                    resource: table.as_entire_binding(),
                }],
            });
        let mut encoder = context
            .device()
            .create_command_encoder(&wgpu::CommandEncoderDescriptor {
                label: Some("ed25519 base table"),
            });
        {
            let mut pass = encoder.begin_compute_pass(&wgpu::ComputePassDescriptor {
                label: Some("ed25519 base table"),
                timestamp_writes: None,
            });
            pass.set_pipeline(&pipeline);
            pass.set_bind_group(0, &bind_group, &[]);
            pass.dispatch_workgroups((TABLE_ENTRIES as u32).div_ceil(WORKGROUP_SIZE), 1, 1);
        }
        (table, encoder.finish())
    })?;
    let submission = context.submit([commands])?;
    context.wait_for_submission(Some(submission))?;
    Ok(table)
}

impl SignatureVerifier for GpuSignatureVerifier {
    fn verify_batch(&self, items: &[SignatureItem<'_>]) -> Result<Vec<bool>, SigVerifyError> {
        let mut verdicts = Vec::with_capacity(items.len());
        let mut chunks = items.chunks(self.max_items_per_dispatch).peekable();
        let Some(first) = chunks.peek() else {
            return Ok(verdicts);
        };
        let mut packed = Self::pack(first);
        while let Some(chunk) = chunks.next() {
            let in_flight = self.submit_dispatch(&packed, chunk.len())?;
            // Overlap: hash and pack the next dispatch while the GPU runs this one.
            if let Some(next) = chunks.peek() {
                packed = Self::pack(next);
            }
            self.finish_dispatch(in_flight, &mut verdicts)?;
        }
        Ok(verdicts)
    }

    fn backend_name(&self) -> &'static str {
        "gpu"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
