//! [`GpuConfig`]: which adapter a [`GpuContext`](super::GpuContext) opens and its bounds.
//!
//! Plain data with no wgpu types, so it is there without the `gpu` feature too: a node's
//! configuration parses and validates its GPU settings on every build.

use std::time::Duration;

/// How a [`GpuContext`](super::GpuContext) is set up. Field names follow the seed's `GpuConfig`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GpuConfig {
    /// Index of the adapter to use, in the order
    /// [`GpuContext::adapters`](super::GpuContext::adapters) lists them.
    pub device_id: u32,
    /// Upper bound, in bytes, on all buffers the context's pool holds at once (in use and idle).
    pub memory_pool_size: u64,
    /// Longest wait for one submission or one read-back before the call gives up with
    /// [`GpuError::Timeout`](super::GpuError::Timeout). Kernels split large batches into
    /// submissions sized from the adapter's measured throughput so that each fits well inside
    /// it: it bounds a dispatch, not a batch.
    pub kernel_launch_timeout: Duration,
    /// Longest time for building one pipeline, and for the warm-up that kernels run when they
    /// are built (each kernel dispatched once, so that a driver that compiles at first dispatch,
    /// as Mesa does, compiles then). A cold shader cache on a software adapter takes minutes
    /// here, which is why it is separate from `kernel_launch_timeout`.
    pub pipeline_compile_timeout: Duration,
    /// Peer access between GPUs (a CUDA notion). wgpu has no equivalent: the flag is accepted,
    /// stored, and logged as not applied.
    pub enable_peer_access: bool,
}

impl Default for GpuConfig {
    /// Adapter 0, a 1 GiB pool (the seed's `gpu_memory_pool_mb = 1024`), a 10 s bound per
    /// dispatch (large enough for software Vulkan on a laptop-class CPU; set it lower on real
    /// GPUs), 10 minutes for compiling pipelines and their first dispatch (a cold cache on two
    /// busy cores), no peer access.
    fn default() -> Self {
        Self {
            device_id: 0,
            memory_pool_size: 1 << 30,
            kernel_launch_timeout: Duration::from_secs(10),
            pipeline_compile_timeout: Duration::from_secs(600),
            enable_peer_access: false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_config_matches_the_seed_defaults() {
        let config = GpuConfig::default();
        assert_eq!(config.device_id, 0);
        assert_eq!(config.memory_pool_size, 1 << 30);
        assert!(!config.enable_peer_access);
    }
}
