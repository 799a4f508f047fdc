//! [`AdaptiveVoteAggregator`]: the CPU backend for small batches, the wgpu backend for large
//! ones, and the CPU again when the GPU fails. Needs the `gpu` feature.

use std::fmt;
use std::sync::Arc;
use std::time::Instant;

use futures::future::BoxFuture;

use super::{
    CpuVoteAggregator, GpuVoteAggregator, Threshold, Vote, VoteAggregator, VoteError, VoteOutcome,
};
use crate::gpu::context::{GpuConfig, GpuContext, GpuError};

/// Which backend answered a call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VoteBackend {
    /// [`CpuVoteAggregator`].
    Cpu,
    /// [`GpuVoteAggregator`].
    Gpu,
}

/// Batch size (votes) from which [`AdaptiveVoteAggregator`] sends work to a real GPU unless
/// calibrated otherwise.
///
/// On software Vulkan (llvmpipe, 2 cores) the GPU path never beat the CPU backend at any size up
/// to 2^24 votes, so adapters of type `Cpu` get no crossover at all (always CPU). On an NVIDIA
/// H100 (`cargo run --release --example gpu_votes -- --max 100000000`, medians of 5, one
/// proposal) the GPU end to end tied the CPU at 10^5 votes (151 vs 155 M/s) and won at 10^6
/// (311 vs 140 M/s) and 10^7 (218 vs 119 M/s), so 2^20 stands. Beyond one pass (41 M votes
/// there) the split makes the GPU lose again (10^8: 39 vs 94 M/s), so by default such batches go
/// to the CPU ([`AdaptiveVoteAggregator::with_gpu_max_votes`]). Use
/// [`AdaptiveVoteAggregator::calibrate`] to measure the crossover on the machine at hand.
pub const DEFAULT_GPU_CROSSOVER_VOTES: usize = 1 << 20;

/// Picks the CPU backend below a crossover batch size and the GPU from it up to what one GPU pass
/// holds (larger batches, which the GPU must split, go back to the CPU unless
/// [`AdaptiveVoteAggregator::with_gpu_max_votes`] says otherwise). When the GPU times out, loses
/// its device, runs out of pool memory or cannot split an input (one ballot with more votes than a
/// pass holds), the CPU backend answers that call and the context's fallback counter
/// ([`GpuContext::cpu_fallback_count`]) counts it.
pub struct AdaptiveVoteAggregator {
    cpu: CpuVoteAggregator,
    gpu: Option<GpuVoteAggregator>,
    crossover_votes: Option<usize>,
    /// The largest batch sent to the GPU; `None`: no bound.
    gpu_max_votes: Option<usize>,
}

impl fmt::Debug for AdaptiveVoteAggregator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AdaptiveVoteAggregator")
            .field(
                "gpu",
                &self.gpu.as_ref().map(|gpu| gpu.context().adapter_name()),
            )
            .field("crossover_votes", &self.crossover_votes)
            .field("gpu_max_votes", &self.gpu_max_votes)
            .finish()
    }
}

impl AdaptiveVoteAggregator {
    /// Uses `gpu` from the default crossover for its adapter type (none for CPU adapters) up to
    /// one pass of `gpu`.
    pub fn new(gpu: GpuVoteAggregator) -> Self {
        let crossover_votes = match gpu.context().adapter_info().device_type {
            wgpu::DeviceType::Cpu => None,
            _ => Some(DEFAULT_GPU_CROSSOVER_VOTES),
        };
        Self {
            cpu: CpuVoteAggregator::new(gpu.threshold()),
            gpu_max_votes: Some(gpu.max_votes_per_pass()),
            gpu: Some(gpu),
            crossover_votes,
        }
    }

    /// Opens adapter `config.device_id`; if no GPU is usable, every call goes to the CPU (the
    /// reason is logged).
    pub fn from_config(config: GpuConfig, threshold: Threshold) -> Result<Self, VoteError> {
        let threshold = threshold.validate()?;
        match GpuContext::new(config) {
            Ok(context) => Ok(Self::new(
                GpuVoteAggregator::with_context(Arc::new(context))?.with_threshold(threshold)?,
            )),
            Err(error) => {
                tracing::warn!(%error, "no GPU for vote aggregation; using the CPU backend");
                Ok(Self::cpu_only(threshold))
            }
        }
    }

    /// CPU only.
    pub fn cpu_only(threshold: Threshold) -> Self {
        Self {
            cpu: CpuVoteAggregator::new(threshold),
            gpu: None,
            crossover_votes: None,
            gpu_max_votes: None,
        }
    }

    /// Sets the batch size from which the GPU is used (`None`: never).
    pub fn with_crossover(mut self, crossover_votes: Option<usize>) -> Self {
        self.crossover_votes = crossover_votes;
        self
    }

    /// Sets the largest batch sent to the GPU (`None`: no bound, batches beyond one pass are
    /// split on the GPU). The default is one pass of the GPU backend: on the H100 a split batch
    /// ran at 0.4 of the CPU's rate (see [`DEFAULT_GPU_CROSSOVER_VOTES`]).
    pub fn with_gpu_max_votes(mut self, gpu_max_votes: Option<usize>) -> Self {
        self.gpu_max_votes = gpu_max_votes;
        self
    }

    /// The largest batch sent to the GPU, if bounded.
    pub fn gpu_max_votes(&self) -> Option<usize> {
        self.gpu_max_votes
    }

    /// The batch size from which the GPU is used, if ever.
    pub fn crossover_votes(&self) -> Option<usize> {
        self.crossover_votes.filter(|_| self.gpu.is_some())
    }

    /// The GPU backend, if any.
    pub fn gpu(&self) -> Option<&GpuVoteAggregator> {
        self.gpu.as_ref()
    }

    /// Which backend a batch of `votes` votes goes to.
    pub fn backend_for(&self, votes: usize) -> VoteBackend {
        let within_bound = self.gpu_max_votes.is_none_or(|max| votes <= max);
        match self.crossover_votes() {
            Some(crossover) if votes >= crossover && within_bound => VoteBackend::Gpu,
            _ => VoteBackend::Cpu,
        }
    }

    /// Measures both backends on synthetic batches of 2^10, 2^12, ... up to `max_votes` votes
    /// (one voter per vote, one proposal) and sets the crossover to the smallest size from which
    /// the GPU was faster at every measured size; `None` if it never was. Returns the new value.
    pub fn calibrate(&mut self, max_votes: usize) -> Result<Option<usize>, VoteError> {
        let Some(gpu) = &self.gpu else {
            return Ok(None);
        };
        let mut crossover = None;
        let mut size = 1 << 10;
        while size <= max_votes.max(1 << 10) {
            let votes: Vec<Vote> = (0..size as u32)
                .map(|voter| Vote::new(voter, 1, voter % 3 != 0))
                .collect();
            // One warm-up call compiles pipelines and fills the buffer pool.
            gpu.aggregate_blocking(&votes)?;
            let best = |run: &dyn Fn() -> Result<VoteOutcome, VoteError>| {
                let mut best = f64::INFINITY;
                for _ in 0..3 {
                    let start = Instant::now();
                    run()?;
                    best = best.min(start.elapsed().as_secs_f64());
                }
                Ok::<f64, VoteError>(best)
            };
            let cpu_seconds = best(&|| self.cpu.aggregate_blocking(&votes))?;
            let gpu_seconds = best(&|| gpu.aggregate_blocking(&votes))?;
            if gpu_seconds < cpu_seconds {
                crossover.get_or_insert(size);
            } else {
                crossover = None;
            }
            size *= 4;
        }
        self.crossover_votes = crossover;
        Ok(crossover)
    }

    /// Aggregates on the chosen backend (blocking).
    pub fn aggregate_blocking(&self, votes: &[Vote]) -> Result<VoteOutcome, VoteError> {
        let gpu = match (&self.gpu, self.backend_for(votes.len())) {
            (Some(gpu), VoteBackend::Gpu) => gpu,
            _ => return self.cpu.aggregate_blocking(votes),
        };
        match gpu.aggregate_blocking(votes) {
            Err(VoteError::Gpu(error))
                if error.is_transient()
                    || matches!(
                        error,
                        GpuError::InputTooLarge { .. } | GpuError::BufferTooLarge { .. }
                    ) =>
            {
                gpu.context().record_cpu_fallback(&error);
                self.cpu.aggregate_blocking(votes)
            }
            other => other,
        }
    }
}

impl VoteAggregator for AdaptiveVoteAggregator {
    fn aggregate_votes<'a>(
        &'a self,
        votes: &'a [Vote],
    ) -> BoxFuture<'a, Result<VoteOutcome, VoteError>> {
        Box::pin(async move { self.aggregate_blocking(votes) })
    }

    fn threshold(&self) -> Threshold {
        self.cpu.threshold()
    }
}
