//! Device and staging buffers reused across calls, within a byte budget: the pool every GPU
//! kernel takes its buffers from ([`super::GpuContext::buffers`]).

use std::ops::Deref;
use std::sync::{Arc, Mutex};

use super::context::GpuError;
use crate::sync::lock;

/// Bytes in one mebibyte.
const MIB: u64 = 1 << 20;

/// Requests below this are rounded up to a power of two so that buffers of similar sizes are
/// interchangeable in the pool; above it they are rounded to [`LARGE_BUFFER_GRANULE`] so that a
/// 300 MiB request does not take 512 MiB.
const POWER_OF_TWO_CLASS_LIMIT: u64 = 64 * MIB;

/// Size granule of large pooled buffers.
const LARGE_BUFFER_GRANULE: u64 = 16 * MIB;

/// Smallest pooled buffer, in bytes.
const MIN_POOLED_BUFFER: u64 = 256;

/// Pool statistics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PoolStats {
    /// Bytes of all buffers the pool holds (lent out and idle).
    pub allocated_bytes: u64,
    /// Bytes of buffers lent out now.
    pub in_use_bytes: u64,
    /// Buffers created so far.
    pub allocations: u64,
    /// Requests served by an idle buffer.
    pub reuses: u64,
}

struct IdleBuffer {
    buffer: wgpu::Buffer,
    usage: wgpu::BufferUsages,
    last_used: u64,
}

#[derive(Default)]
struct PoolState {
    idle: Vec<IdleBuffer>,
    stats: PoolStats,
    clock: u64,
}

struct PoolShared {
    device: wgpu::Device,
    capacity: u64,
    max_buffer_size: u64,
    state: Mutex<PoolState>,
}

/// Device and staging buffers reused across calls. All buffers it holds, lent out or idle, stay
/// within `memory_pool_size` bytes: a request that does not fit evicts idle buffers (least
/// recently used first) and fails with [`GpuError::PoolExhausted`] if that is not enough.
///
/// Requests are rounded up to a size class, so a buffer is usually larger than asked for: bind
/// it with an explicit size.
#[derive(Clone)]
pub struct BufferPool {
    shared: Arc<PoolShared>,
}

impl BufferPool {
    pub(crate) fn new(device: wgpu::Device, capacity: u64, max_buffer_size: u64) -> Self {
        Self {
            shared: Arc::new(PoolShared {
                device,
                capacity,
                max_buffer_size,
                state: Mutex::new(PoolState::default()),
            }),
        }
    }

    /// The size class a request of `bytes` is rounded to.
    pub fn size_class(bytes: u64) -> u64 {
        let bytes = bytes.max(MIN_POOLED_BUFFER);
        if bytes <= POWER_OF_TWO_CLASS_LIMIT {
            bytes.next_power_of_two()
        } else {
            bytes.div_ceil(LARGE_BUFFER_GRANULE) * LARGE_BUFFER_GRANULE
        }
    }

    /// The pool's bound in bytes.
    pub fn capacity(&self) -> u64 {
        self.shared.capacity
    }

    /// Current statistics.
    pub fn stats(&self) -> PoolStats {
        lock(&self.shared.state).stats
    }

    /// Lends a buffer of at least `bytes` bytes with exactly `usage`. It returns to the pool when
    /// dropped. Its contents are whatever the last user left: initialise what you read.
    pub fn acquire(
        &self,
        label: &'static str,
        bytes: u64,
        usage: wgpu::BufferUsages,
    ) -> Result<PooledBuffer, GpuError> {
        let mut size = Self::size_class(bytes);
        if size > self.shared.max_buffer_size {
            // The rounding must not push a request that fits over the device limit.
            size = bytes.div_ceil(4) * 4;
        }
        if size > self.shared.max_buffer_size {
            return Err(GpuError::BufferTooLarge {
                requested: bytes,
                max: self.shared.max_buffer_size,
            });
        }
        let mut state = lock(&self.shared.state);
        state.clock += 1;
        let position = state
            .idle
            .iter()
            .position(|idle| idle.usage == usage && idle.buffer.size() == size);
        if let Some(position) = position {
            let idle = state.idle.swap_remove(position);
            state.stats.reuses += 1;
            state.stats.in_use_bytes += size;
            return Ok(PooledBuffer {
                buffer: Some(idle.buffer),
                usage,
                pool: Arc::clone(&self.shared),
            });
        }
        while state.stats.allocated_bytes + size > self.shared.capacity && !state.idle.is_empty() {
            let oldest = state
                .idle
                .iter()
                .enumerate()
                .min_by_key(|(_, idle)| idle.last_used)
                .map(|(index, _)| index)
                .unwrap_or(0);
            let evicted = state.idle.swap_remove(oldest);
            state.stats.allocated_bytes -= evicted.buffer.size();
            evicted.buffer.destroy();
        }
        if state.stats.allocated_bytes + size > self.shared.capacity {
            return Err(GpuError::PoolExhausted {
                requested: size,
                in_use: state.stats.in_use_bytes,
                capacity: self.shared.capacity,
            });
        }
        let buffer = self.shared.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some(label),
            size,
            usage,
            mapped_at_creation: false,
        });
        state.stats.allocations += 1;
        state.stats.allocated_bytes += size;
        state.stats.in_use_bytes += size;
        Ok(PooledBuffer {
            buffer: Some(buffer),
            usage,
            pool: Arc::clone(&self.shared),
        })
    }

    /// Drops every idle buffer (e.g. after a burst of large calls).
    pub fn trim(&self) {
        let mut state = lock(&self.shared.state);
        for idle in std::mem::take(&mut state.idle) {
            state.stats.allocated_bytes -= idle.buffer.size();
            idle.buffer.destroy();
        }
    }
}

/// A buffer lent by a [`BufferPool`]; dereferences to [`wgpu::Buffer`] and goes back to the pool
/// when dropped.
pub struct PooledBuffer {
    buffer: Option<wgpu::Buffer>,
    usage: wgpu::BufferUsages,
    pool: Arc<PoolShared>,
}

impl PooledBuffer {
    /// Removes the buffer from the pool for good instead of returning it: for buffers that work
    /// still in flight (after a timeout) may yet write to. wgpu frees it once that work is done.
    pub fn discard(mut self) {
        if let Some(buffer) = self.buffer.take() {
            let mut state = lock(&self.pool.state);
            state.stats.in_use_bytes -= buffer.size();
            state.stats.allocated_bytes -= buffer.size();
        }
    }
}

impl Deref for PooledBuffer {
    type Target = wgpu::Buffer;

    fn deref(&self) -> &wgpu::Buffer {
        // Invariant: `buffer` is `Some` until `discard` or `drop`, both of which consume `self`.
        self.buffer
            .as_ref()
            .expect("pooled buffer used after release")
    }
}

impl Drop for PooledBuffer {
    fn drop(&mut self) {
        if let Some(buffer) = self.buffer.take() {
            let mut state = lock(&self.pool.state);
            state.clock += 1;
            let last_used = state.clock;
            state.stats.in_use_bytes -= buffer.size();
            state.idle.push(IdleBuffer {
                buffer,
                usage: self.usage,
                last_used,
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn size_classes_round_up_and_stay_close_for_large_requests() {
        assert_eq!(BufferPool::size_class(0), MIN_POOLED_BUFFER);
        assert_eq!(BufferPool::size_class(257), 512);
        assert_eq!(BufferPool::size_class(64 * MIB), 64 * MIB);
        assert_eq!(BufferPool::size_class(64 * MIB + 1), 80 * MIB);
        assert_eq!(BufferPool::size_class(300 * MIB), 304 * MIB);
    }
}
