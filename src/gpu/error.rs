//! [`GpuError`]: what can go wrong on the GPU side.
//!
//! It is there without the `gpu` feature too, so that the CPU-only build has the same error
//! enums ([`VoteError`](super::VoteError), [`SigVerifyError`](super::SigVerifyError)) as the
//! full one: enabling a feature never changes the variants a caller matches on.

use std::time::Duration;

/// Which of a [`GpuConfig`](super::GpuConfig)'s two wait bounds a wait ran under.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum WaitBound {
    /// `kernel_launch_timeout`: one submission of a batch (batches are split so that each fits).
    KernelLaunch,
    /// `pipeline_compile_timeout`: building a pipeline, or the warm-up that runs each kernel
    /// once so the driver compiles it (on Mesa the compile happens at first dispatch).
    PipelineCompile,
}

impl std::fmt::Display for WaitBound {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.write_str(match self {
            Self::KernelLaunch => "kernel_launch_timeout (the bound of one dispatch)",
            Self::PipelineCompile => {
                "pipeline_compile_timeout (the bound of shader compilation and first dispatch)"
            }
        })
    }
}

/// What went wrong on the GPU side. Every variant carries the values needed to act on it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GpuError {
    /// wgpu found no adapter at all (no Vulkan/Metal/DX12/GL driver).
    #[error("no GPU adapter found (backends tried: {backends})")]
    NoAdapter {
        /// The backends wgpu searched.
        backends: String,
    },
    /// `device_id` is past the end of the adapter list.
    #[error("device_id {device_id} is out of range: {adapter_count} adapter(s) found")]
    DeviceIdOutOfRange {
        /// The requested index.
        device_id: u32,
        /// How many adapters exist.
        adapter_count: usize,
    },
    /// The adapter refused to open a device.
    #[error("requesting a device from adapter {adapter:?} failed: {reason}")]
    RequestDevice {
        /// The adapter's name.
        adapter: String,
        /// wgpu's message.
        reason: String,
    },
    /// The GPU did not finish within one of the two wait bounds: `kernel_launch_timeout` for one
    /// dispatch, or `pipeline_compile_timeout` for compiling pipelines and the first dispatch.
    #[error("GPU work did not complete within {waited:?}: {bound} ran out")]
    Timeout {
        /// Which bound ran out.
        bound: WaitBound,
        /// The bound's value.
        waited: Duration,
    },
    /// The device was lost (driver reset, GPU removed, or destroyed).
    #[error("GPU device lost: {reason}")]
    DeviceLost {
        /// wgpu's reason and message.
        reason: String,
    },
    /// A buffer request does not fit in what is left of `memory_pool_size`.
    #[error(
        "GPU buffer pool exhausted: {requested} bytes requested, {in_use} of {capacity} in use"
    )]
    PoolExhausted {
        /// Bytes requested (after rounding to the pool's size class).
        requested: u64,
        /// Bytes held by buffers currently lent out.
        in_use: u64,
        /// The pool's bound (`memory_pool_size`).
        capacity: u64,
    },
    /// A single buffer larger than the device allows.
    #[error("buffer of {requested} bytes exceeds the device's max_buffer_size {max}")]
    BufferTooLarge {
        /// Bytes requested.
        requested: u64,
        /// The device limit.
        max: u64,
    },
    /// A WGSL module or pipeline failed to compile or validate.
    #[error("shader {label:?} failed to compile: {message}")]
    Shader {
        /// The pipeline's label.
        label: String,
        /// wgpu's / naga's message.
        message: String,
    },
    /// wgpu rejected a command (a bug in a kernel's host code or an input past a device limit).
    #[error("GPU validation error: {0}")]
    Validation(String),
    /// Mapping a buffer for read-back failed.
    #[error("mapping a GPU buffer failed: {0}")]
    Map(String),
    /// Polling the device failed for a reason other than a timeout.
    #[error("polling the GPU failed: {0}")]
    Poll(String),
    /// An input is larger than a kernel can take even after splitting.
    #[error("input too large for the GPU: {detail}")]
    InputTooLarge {
        /// What limit was hit.
        detail: String,
    },
}

impl GpuError {
    /// Whether a CPU backend should answer the call instead: the GPU is slow or gone, not the
    /// input or the program wrong.
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            GpuError::Timeout { .. } | GpuError::DeviceLost { .. } | GpuError::PoolExhausted { .. }
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transient_errors_are_the_ones_a_cpu_backend_should_answer() {
        let timeout = GpuError::Timeout {
            bound: WaitBound::PipelineCompile,
            waited: Duration::from_millis(1),
        };
        assert!(timeout.is_transient());
        let message = timeout.to_string();
        assert!(message.contains("pipeline_compile_timeout"), "{message}");
        assert!(GpuError::DeviceLost { reason: "x".into() }.is_transient());
        assert!(!GpuError::Validation("x".into()).is_transient());
        let message = GpuError::DeviceIdOutOfRange {
            device_id: 3,
            adapter_count: 2,
        }
        .to_string();
        assert!(message.contains("2 adapter"), "{message}");
    }
}
