//! [`AutoSignatureVerifier`]: the CPU for small batches, the wgpu backend for large ones, and the
//! CPU again (counted) when the GPU fails. Needs the `gpu` feature.

use std::sync::atomic::{AtomicU64, Ordering};

use super::{
    CpuSignatureVerifier, GpuSignatureVerifier, SigVerifyError, SignatureItem, SignatureVerifier,
};

/// Batch size from which [`AutoSignatureVerifier`] sends a batch to a hardware GPU; smaller
/// batches go to the CPU. Measured with `cargo bench --bench sigverify` on an NVIDIA H100 against
/// its host's 16 cores (`benches/SIGVERIFY_NOTES.md`): the GPU answers a batch in no less than
/// ~5 ms, so it loses at 1024 items (0.9× the CPU) and wins from 4096 (3×) on.
pub const GPU_CROSSOVER_BATCH: usize = 4096;

/// Picks the CPU for batches below a crossover size and the GPU above it; when the GPU fails the
/// CPU answers instead and [`AutoSignatureVerifier::gpu_fallbacks`] counts it.
pub struct AutoSignatureVerifier {
    cpu: CpuSignatureVerifier,
    gpu: Option<GpuSignatureVerifier>,
    crossover_batch: usize,
    gpu_fallbacks: AtomicU64,
}

impl AutoSignatureVerifier {
    /// An engine with the given GPU backend (or none: CPU only) and [`GPU_CROSSOVER_BATCH`].
    ///
    /// A GPU backend on a software adapter (llvmpipe: the CPU emulating a GPU, ~100 times slower
    /// than the CPU backend) is kept but never chosen; use [`Self::with_crossover`] to force it.
    pub fn new(gpu: Option<GpuSignatureVerifier>) -> Self {
        let software = gpu
            .as_ref()
            .is_some_and(|gpu| gpu.context().adapter_info().device_type == wgpu::DeviceType::Cpu);
        let crossover = if software {
            usize::MAX
        } else {
            GPU_CROSSOVER_BATCH
        };
        Self::with_crossover(gpu, crossover)
    }

    /// As [`Self::new`] with an explicit crossover batch size (at least 1).
    pub fn with_crossover(gpu: Option<GpuSignatureVerifier>, crossover_batch: usize) -> Self {
        Self {
            cpu: CpuSignatureVerifier::new(),
            gpu,
            crossover_batch: crossover_batch.max(1),
            gpu_fallbacks: AtomicU64::new(0),
        }
    }

    /// How many batches meant for the GPU were answered by the CPU because the GPU failed.
    pub fn gpu_fallbacks(&self) -> u64 {
        self.gpu_fallbacks.load(Ordering::Relaxed)
    }

    /// Whether a batch of `batch_len` items would go to the GPU.
    pub fn uses_gpu_for(&self, batch_len: usize) -> bool {
        self.gpu.is_some() && batch_len >= self.crossover_batch
    }
}

impl SignatureVerifier for AutoSignatureVerifier {
    fn verify_batch(&self, items: &[SignatureItem<'_>]) -> Result<Vec<bool>, SigVerifyError> {
        if let Some(gpu) = self.gpu.as_ref().filter(|_| self.uses_gpu_for(items.len())) {
            match gpu.verify_batch(items) {
                Ok(verdicts) => return Ok(verdicts),
                Err(error) => {
                    self.gpu_fallbacks.fetch_add(1, Ordering::Relaxed);
                    match &error {
                        SigVerifyError::Gpu(gpu_error) => {
                            gpu.context().record_cpu_fallback(gpu_error)
                        }
                        other => {
                            tracing::warn!(error = %other, "GPU signature batch failed; CPU answers")
                        }
                    }
                }
            }
        }
        self.cpu.verify_batch(items)
    }

    fn backend_name(&self) -> &'static str {
        "auto"
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gpu::sigverify::vectors;

    #[test]
    fn auto_without_gpu_uses_cpu() {
        let auto = AutoSignatureVerifier::with_crossover(None, 1);
        assert!(!auto.uses_gpu_for(1_000_000));
        let items = vectors::random_valid_items(3, 4, 7);
        let refs: Vec<_> = items.iter().map(|item| item.as_item()).collect();
        assert_eq!(auto.verify_batch(&refs).expect("cpu"), vec![true; 4]);
        assert_eq!(auto.gpu_fallbacks(), 0);
    }
}
