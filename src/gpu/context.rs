//! The GPU runtime shared by every batch kernel: adapter choice, one device and queue, compute
//! pipelines compiled once, a bounded pool of device and staging buffers, and bounded waits.
//!
//! A [`GpuContext`] is built from a [`GpuConfig`]. It enumerates the wgpu adapters in a
//! deterministic order (see [`GpuContext::adapters`]), opens the one `device_id` names with the
//! adapter's own limits (so large storage buffers are allowed), and logs the chosen adapter's name.
//! Kernels built on it (vote aggregation, signature verification) get their pipelines from
//! [`GpuContext::compute_pipeline`], their buffers from [`GpuContext::buffers`] and wait for the GPU
//! only through [`GpuContext::wait_for_submission`] / [`GpuContext::read_back`], which give up
//! after `kernel_launch_timeout` with [`GpuError::Timeout`]. Building a pipeline, and the
//! warm-up each kernel runs when it is built ([`GpuContext::warm_up`]: the first dispatch, where
//! Mesa compiles), are bounded by `pipeline_compile_timeout` instead, and report progress while
//! they run long. When a caller answers such a call on
//! the CPU instead it records that with [`GpuContext::record_cpu_fallback`], a counter readable
//! through [`GpuContext::metrics`] and registrable with Prometheus.

use std::any::{Any, TypeId};
use std::cell::Cell;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub use super::buffer_pool::{BufferPool, PoolStats, PooledBuffer};
// Also importable from here, as they always were; they live in their own files so that the build
// without the `gpu` feature has them too.
pub use super::config::GpuConfig;
pub use super::error::{GpuError, WaitBound};

use prometheus_client::metrics::counter::Counter;
use prometheus_client::registry::Registry;

use crate::sync::lock;

/// How often a long wait (a compile, a slow dispatch) logs that it is still running.
const PROGRESS_INTERVAL: Duration = Duration::from_secs(5);

thread_local! {
    /// Set while this thread runs inside [`GpuContext::warm_up`].
    static WARMING_UP: Cell<bool> = const { Cell::new(false) };
}

/// One adapter as [`GpuContext::adapters`] lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdapterSummary {
    /// Its `device_id` in a [`GpuConfig`].
    pub index: u32,
    /// The adapter's name, e.g. "llvmpipe (LLVM 15.0.6, 256 bits)".
    pub name: String,
    /// Backend (Vulkan, Metal, Dx12, Gl).
    pub backend: wgpu::Backend,
    /// Discrete, integrated, virtual, CPU or other.
    pub device_type: wgpu::DeviceType,
    /// Driver name and version as reported.
    pub driver: String,
}

/// Counters of a context, as a snapshot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct GpuMetrics {
    /// Calls that a CPU backend answered because the GPU timed out or was lost.
    pub cpu_fallbacks: u64,
    /// Waits that hit `kernel_launch_timeout`.
    pub timeouts: u64,
    /// Command buffers submitted through [`GpuContext::submit`].
    pub submissions: u64,
    /// Buffers the pool created.
    pub buffer_allocations: u64,
    /// Buffer requests the pool served from idle buffers.
    pub buffer_reuses: u64,
    /// Bytes held by the pool now (in use and idle).
    pub pool_bytes: u64,
}

/// The GPU runtime: device, queue, pipelines, buffer pool, bounded waits and metrics.
///
/// It is `Send + Sync`; share it in an [`Arc`] between kernels.
pub struct GpuContext {
    config: GpuConfig,
    info: wgpu::AdapterInfo,
    limits: wgpu::Limits,
    device: wgpu::Device,
    queue: wgpu::Queue,
    pipelines: Mutex<HashMap<(&'static str, &'static str), Arc<wgpu::ComputePipeline>>>,
    shared: Mutex<HashMap<TypeId, Arc<dyn Any + Send + Sync>>>,
    pool: BufferPool,
    lost: Arc<DeviceLostState>,
    cpu_fallbacks: Counter,
    timeouts: Counter,
    submissions: AtomicU64,
    /// Held around every `device.poll` and `queue.submit`: wgpu-core 30 reads the fence and
    /// then retires the queue's finished submissions in two steps, so a thread polling while
    /// another polls or submits on the same device can see a queue emptied by the other with
    /// a stale fence value, and its defensive
    /// assertion ("If the queue is empty, the current submission index ... should be at least
    /// the wait submission index") panics. Engines of one process share a context (their
    /// driver threads verify and count concurrently), which is how it was found.
    poll_lock: Mutex<()>,
}

impl std::fmt::Debug for GpuContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GpuContext")
            .field("adapter", &self.info.name)
            .field("backend", &self.info.backend)
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

/// Set by wgpu's device-lost and uncaptured-error callbacks, read before and after every wait.
#[derive(Default)]
struct DeviceLostState {
    lost: AtomicBool,
    reason: Mutex<Option<String>>,
}

/// The first `bytes` of `buffer` as a binding (at least 4 bytes: wgpu refuses an empty one).
pub(crate) fn buffer_binding(buffer: &wgpu::Buffer, bytes: u64) -> wgpu::BindingResource<'_> {
    wgpu::BindingResource::Buffer(wgpu::BufferBinding {
        buffer,
        offset: 0,
        size: std::num::NonZeroU64::new(bytes.max(4)),
    })
}

fn backend_rank(backend: wgpu::Backend) -> u8 {
    match backend {
        wgpu::Backend::Vulkan => 0,
        wgpu::Backend::Metal => 1,
        wgpu::Backend::Dx12 => 2,
        wgpu::Backend::Gl => 3,
        _ => 4,
    }
}

fn device_type_rank(device_type: wgpu::DeviceType) -> u8 {
    match device_type {
        wgpu::DeviceType::DiscreteGpu => 0,
        wgpu::DeviceType::IntegratedGpu => 1,
        wgpu::DeviceType::VirtualGpu => 2,
        wgpu::DeviceType::Cpu => 3,
        wgpu::DeviceType::Other => 4,
    }
}

fn instance_descriptor() -> wgpu::InstanceDescriptor {
    wgpu::InstanceDescriptor::new_without_display_handle_from_env()
}

/// Enumerates adapters sorted deterministically: by backend (Vulkan, Metal, DX12, GL, others),
/// then device type (discrete, integrated, virtual, CPU), keeping the driver's order among equals
/// (a stable sort), so `device_id` 0 is the best real GPU and identical cards keep their bus order.
fn sorted_adapters(instance: &wgpu::Instance, backends: wgpu::Backends) -> Vec<wgpu::Adapter> {
    let mut adapters = pollster::block_on(instance.enumerate_adapters(backends));
    adapters.sort_by_key(|adapter| {
        let info = adapter.get_info();
        (
            backend_rank(info.backend),
            device_type_rank(info.device_type),
        )
    });
    adapters
}

fn summary(index: usize, info: &wgpu::AdapterInfo) -> AdapterSummary {
    AdapterSummary {
        index: u32::try_from(index).unwrap_or(u32::MAX),
        name: info.name.clone(),
        backend: info.backend,
        device_type: info.device_type,
        driver: format!("{} {}", info.driver, info.driver_info)
            .trim()
            .to_owned(),
    }
}

impl GpuContext {
    /// Lists the adapters wgpu finds, in the order `device_id` indexes them.
    pub fn adapters() -> Vec<AdapterSummary> {
        let descriptor = instance_descriptor();
        let backends = descriptor.backends;
        let instance = wgpu::Instance::new(descriptor);
        sorted_adapters(&instance, backends)
            .iter()
            .enumerate()
            .map(|(index, adapter)| summary(index, &adapter.get_info()))
            .collect()
    }

    /// Opens the adapter `config.device_id` names (blocking; call it from a blocking context or at
    /// start-up). The device gets the adapter's full limits.
    pub fn new(config: GpuConfig) -> Result<Self, GpuError> {
        let descriptor = instance_descriptor();
        let backends = descriptor.backends;
        let instance = wgpu::Instance::new(descriptor);
        let adapters = sorted_adapters(&instance, backends);
        if adapters.is_empty() {
            return Err(GpuError::NoAdapter {
                backends: format!("{backends:?}"),
            });
        }
        let adapter =
            adapters
                .get(config.device_id as usize)
                .ok_or(GpuError::DeviceIdOutOfRange {
                    device_id: config.device_id,
                    adapter_count: adapters.len(),
                })?;
        let info = adapter.get_info();
        let adapter_limits = adapter.limits();
        let (device, queue) = pollster::block_on(adapter.request_device(&wgpu::DeviceDescriptor {
            label: Some("consensus-gpu"),
            required_limits: adapter_limits.clone(),
            ..Default::default()
        }))
        .map_err(|error| GpuError::RequestDevice {
            adapter: info.name.clone(),
            reason: error.to_string(),
        })?;
        let limits = device.limits();
        tracing::info!(
            adapter = %info.name,
            backend = ?info.backend,
            device_type = ?info.device_type,
            device_id = config.device_id,
            max_storage_buffer_binding_size = limits.max_storage_buffer_binding_size,
            max_buffer_size = limits.max_buffer_size,
            "GPU context opened"
        );
        if config.enable_peer_access {
            tracing::warn!(
                "enable_peer_access = true is not applied: wgpu has no peer access between GPUs"
            );
        }

        let lost = Arc::new(DeviceLostState::default());
        let lost_for_callback = Arc::clone(&lost);
        device.set_device_lost_callback(move |reason, message| {
            tracing::error!(?reason, %message, "GPU device lost");
            *lock(&lost_for_callback.reason) = Some(format!("{reason:?}: {message}"));
            lost_for_callback.lost.store(true, Ordering::SeqCst);
        });
        // wgpu's default handler panics; errors outside an error scope are logged instead, and the
        // calls that could raise them run inside scopes and turn them into `GpuError`s.
        device.on_uncaptured_error(Arc::new(|error: wgpu::Error| {
            tracing::error!(%error, "uncaptured wgpu error");
        }));

        let pool = BufferPool::new(
            device.clone(),
            config.memory_pool_size,
            limits.max_buffer_size,
        );
        Ok(Self {
            config,
            info,
            limits,
            device,
            queue,
            pipelines: Mutex::new(HashMap::new()),
            shared: Mutex::new(HashMap::new()),
            pool,
            lost,
            cpu_fallbacks: Counter::default(),
            timeouts: Counter::default(),
            submissions: AtomicU64::new(0),
            poll_lock: Mutex::new(()),
        })
    }

    /// The chosen adapter's name as wgpu reports it.
    pub fn adapter_name(&self) -> &str {
        &self.info.name
    }

    /// Everything wgpu reports about the chosen adapter.
    pub fn adapter_info(&self) -> &wgpu::AdapterInfo {
        &self.info
    }

    /// The device.
    pub fn device(&self) -> &wgpu::Device {
        &self.device
    }

    /// The queue.
    pub fn queue(&self) -> &wgpu::Queue {
        &self.queue
    }

    /// The limits the device was opened with (the adapter's own).
    pub fn limits(&self) -> &wgpu::Limits {
        &self.limits
    }

    /// The configuration the context was built from.
    pub fn config(&self) -> &GpuConfig {
        &self.config
    }

    /// The buffer pool.
    pub fn buffers(&self) -> &BufferPool {
        &self.pool
    }

    /// Largest storage buffer binding, in bytes, clamped to what a `u32` byte offset can address.
    pub fn max_storage_binding_bytes(&self) -> u64 {
        self.limits
            .max_storage_buffer_binding_size
            .min(self.limits.max_buffer_size)
            .min(u64::from(u32::MAX))
    }

    /// Returns the compute pipeline for `entry_point` of the WGSL `source`, compiling it on first
    /// use. Pipelines use wgpu's automatic layout; bind groups come from
    /// `pipeline.get_bind_group_layout(0)`. `label` must name one source: the cache key is
    /// `(label, entry_point)`.
    pub fn compute_pipeline(
        &self,
        label: &'static str,
        source: &'static str,
        entry_point: &'static str,
    ) -> Result<Arc<wgpu::ComputePipeline>, GpuError> {
        self.build_pipeline(label, source, entry_point, None)
    }

    /// Like [`GpuContext::compute_pipeline`], with an explicit pipeline layout, so that several
    /// pipelines can share one bind group. `label` must name one source and one layout.
    pub fn compute_pipeline_with_layout(
        &self,
        label: &'static str,
        source: &'static str,
        entry_point: &'static str,
        layout: &wgpu::PipelineLayout,
    ) -> Result<Arc<wgpu::ComputePipeline>, GpuError> {
        self.build_pipeline(label, source, entry_point, Some(layout))
    }

    fn build_pipeline(
        &self,
        label: &'static str,
        source: &'static str,
        entry_point: &'static str,
        layout: Option<&wgpu::PipelineLayout>,
    ) -> Result<Arc<wgpu::ComputePipeline>, GpuError> {
        let mut pipelines = lock(&self.pipelines);
        if let Some(pipeline) = pipelines.get(&(label, entry_point)) {
            return Ok(Arc::clone(pipeline));
        }
        // The driver may take minutes on a cold shader cache, and `create_compute_pipeline`
        // blocks: it runs on its own thread so that this one can report progress and give up
        // after `pipeline_compile_timeout` (the thread then finishes in the background).
        let device = self.device.clone();
        let layout = layout.cloned();
        let (sender, receiver) = std::sync::mpsc::channel();
        let name = format!("{label}::{entry_point}");
        std::thread::Builder::new()
            .name("gpu-pipeline-build".to_owned())
            .spawn(move || {
                let scope = device.push_error_scope(wgpu::ErrorFilter::Validation);
                let module = device.create_shader_module(wgpu::ShaderModuleDescriptor {
                    label: Some(label),
                    source: wgpu::ShaderSource::Wgsl(source.into()),
                });
                let pipeline = device.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
                    label: Some(label),
                    layout: layout.as_ref(),
                    module: &module,
                    entry_point: Some(entry_point),
                    compilation_options: Default::default(),
                    cache: None,
                });
                let error = pollster::block_on(scope.pop());
                // The receiver is gone only after a timeout, which was reported already.
                let _ = sender.send(match error {
                    Some(error) => Err(error.to_string()),
                    None => Ok(pipeline),
                });
            })
            .map_err(|error| GpuError::Shader {
                label: name.clone(),
                message: format!("cannot start the pipeline build thread: {error}"),
            })?;
        let bound = self.config.pipeline_compile_timeout;
        let started = Instant::now();
        let built = loop {
            if let Ok(built) = receiver.try_recv() {
                break built;
            }
            let remaining = bound.saturating_sub(started.elapsed());
            if remaining.is_zero() {
                self.timeouts.inc();
                tracing::error!(pipeline = %name, ?bound, "building a GPU pipeline timed out");
                return Err(GpuError::Timeout {
                    bound: WaitBound::PipelineCompile,
                    waited: bound,
                });
            }
            match receiver.recv_timeout(remaining.min(PROGRESS_INTERVAL)) {
                Ok(built) => break built,
                Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                    break Err("the pipeline build thread ended without a result".to_owned());
                }
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) if started.elapsed() >= bound => {}
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                    tracing::info!(
                        pipeline = %name,
                        elapsed = ?started.elapsed(),
                        ?bound,
                        "still building a GPU pipeline (a cold shader cache compiles from scratch)"
                    );
                }
            }
        };
        let pipeline = built.map_err(|message| GpuError::Shader {
            label: name.clone(),
            message,
        })?;
        tracing::debug!(pipeline = %name, elapsed = ?started.elapsed(), "GPU pipeline built");
        let pipeline = Arc::new(pipeline);
        pipelines.insert((label, entry_point), Arc::clone(&pipeline));
        Ok(pipeline)
    }

    /// Runs `work` (a kernel's first dispatches) with every wait this thread makes on this
    /// context bounded by `pipeline_compile_timeout` instead of `kernel_launch_timeout`, and
    /// progress logged while it runs long. Drivers that compile a pipeline at its first dispatch
    /// (Mesa's llvmpipe does, taking minutes on a cold shader cache) compile here, so that no
    /// later dispatch counts compilation against `kernel_launch_timeout`. Kernels call it when
    /// they are built.
    pub fn warm_up<T>(&self, what: &str, work: impl FnOnce() -> T) -> T {
        struct Restore(bool);
        impl Drop for Restore {
            fn drop(&mut self) {
                WARMING_UP.with(|flag| flag.set(self.0));
            }
        }
        let _restore = Restore(WARMING_UP.with(|flag| flag.replace(true)));
        let started = Instant::now();
        let result = work();
        tracing::info!(
            kernel = what,
            elapsed = ?started.elapsed(),
            adapter = %self.info.name,
            "GPU kernel warmed up (compiled and run once)"
        );
        result
    }

    /// The bound of a wait made now on this thread.
    fn wait_bound(&self) -> (WaitBound, Duration) {
        if WARMING_UP.with(Cell::get) {
            (
                WaitBound::PipelineCompile,
                self.config.pipeline_compile_timeout,
            )
        } else {
            (WaitBound::KernelLaunch, self.config.kernel_launch_timeout)
        }
    }

    /// Logs that a wait is still running: at info during a warm-up (a compile), debug otherwise.
    fn report_progress(&self, bound: WaitBound, elapsed: Duration, limit: Duration) {
        match bound {
            WaitBound::PipelineCompile => tracing::info!(
                ?elapsed,
                ?limit,
                adapter = %self.info.name,
                "still waiting for the first dispatch of a GPU kernel (the driver compiles it)"
            ),
            WaitBound::KernelLaunch => tracing::debug!(
                ?elapsed,
                ?limit,
                adapter = %self.info.name,
                "still waiting for a GPU dispatch"
            ),
        }
    }

    /// Returns the context's one value of type `T`, building it with `init` on first use. Kernels
    /// keep their pipelines and bind group layouts here, so that every aggregator or verifier on
    /// one context shares them (bind groups built for one fit the pipelines of all).
    pub fn shared_state<T: Any + Send + Sync>(
        &self,
        init: impl FnOnce() -> Result<T, GpuError>,
    ) -> Result<Arc<T>, GpuError> {
        let mut shared = lock(&self.shared);
        if let Some(existing) = shared.get(&TypeId::of::<T>())
            && let Ok(value) = Arc::clone(existing).downcast::<T>()
        {
            return Ok(value);
        }
        let value = Arc::new(init()?);
        shared.insert(
            TypeId::of::<T>(),
            Arc::clone(&value) as Arc<dyn Any + Send + Sync>,
        );
        Ok(value)
    }

    /// Runs `encode` inside a validation error scope and turns a captured error into
    /// [`GpuError::Validation`]. Use it around bind group creation and encoding, where a wrong
    /// size or a limit would otherwise only be logged.
    pub fn validated<T>(&self, encode: impl FnOnce() -> T) -> Result<T, GpuError> {
        let scope = self.device.push_error_scope(wgpu::ErrorFilter::Validation);
        let value = encode();
        match pollster::block_on(scope.pop()) {
            Some(error) => Err(GpuError::Validation(error.to_string())),
            None => Ok(value),
        }
    }

    /// `device.poll`, one thread at a time (see `poll_lock`).
    fn poll(&self, kind: wgpu::PollType) -> Result<wgpu::PollStatus, wgpu::PollError> {
        let _polling = lock(&self.poll_lock);
        self.device.poll(kind)
    }

    /// Submits command buffers and counts the submission.
    pub fn submit(
        &self,
        commands: impl IntoIterator<Item = wgpu::CommandBuffer>,
    ) -> Result<wgpu::SubmissionIndex, GpuError> {
        self.check_not_lost()?;
        self.submissions.fetch_add(1, Ordering::Relaxed);
        // A submission retires finished ones too: it must not run inside another thread's poll.
        let _polling = lock(&self.poll_lock);
        Ok(self.queue.submit(commands))
    }

    /// Fails with [`GpuError::DeviceLost`] once wgpu has reported the device lost.
    pub fn check_not_lost(&self) -> Result<(), GpuError> {
        if self.lost.lost.load(Ordering::SeqCst) {
            let reason = lock(&self.lost.reason)
                .clone()
                .unwrap_or_else(|| "unknown".to_owned());
            return Err(GpuError::DeviceLost { reason });
        }
        Ok(())
    }

    /// Blocks until `submission` (or, with `None`, everything submitted so far) has completed,
    /// for at most `kernel_launch_timeout` (`pipeline_compile_timeout` inside
    /// [`GpuContext::warm_up`]).
    pub fn wait_for_submission(
        &self,
        submission: Option<wgpu::SubmissionIndex>,
    ) -> Result<(), GpuError> {
        let (bound, waited) = self.wait_bound();
        let started = Instant::now();
        loop {
            self.check_not_lost()?;
            let remaining = waited.saturating_sub(started.elapsed());
            // Short steps, so that progress is reported and other threads get the poll lock.
            let result = self.poll(wgpu::PollType::Wait {
                submission_index: submission.clone(),
                timeout: Some(remaining.min(PROGRESS_INTERVAL)),
            });
            match result {
                Ok(_) => return self.check_not_lost(),
                Err(wgpu::PollError::Timeout) if started.elapsed() >= waited => {
                    self.timeouts.inc();
                    tracing::warn!(?waited, %bound, adapter = %self.info.name, "GPU wait timed out");
                    return Err(GpuError::Timeout { bound, waited });
                }
                Err(wgpu::PollError::Timeout) => {
                    self.report_progress(bound, started.elapsed(), waited);
                }
                Err(error) => return Err(GpuError::Poll(error.to_string())),
            }
        }
    }

    /// Maps the first `bytes` of a `MAP_READ` buffer, copies them out as `T`s and unmaps it,
    /// waiting at most `kernel_launch_timeout`. `bytes` must be a multiple of 4 and of
    /// `size_of::<T>()`.
    pub fn read_back<T: bytemuck::Pod>(
        &self,
        buffer: &wgpu::Buffer,
        bytes: u64,
    ) -> Result<Vec<T>, GpuError> {
        let mut out = Vec::new();
        self.read_back_into(buffer, bytes, &mut out)?;
        Ok(out)
    }

    /// Like [`GpuContext::read_back`], but replaces the contents of `out`, reusing its
    /// allocation.
    pub fn read_back_into<T: bytemuck::Pod>(
        &self,
        buffer: &wgpu::Buffer,
        bytes: u64,
        out: &mut Vec<T>,
    ) -> Result<(), GpuError> {
        out.clear();
        if bytes == 0 {
            return Ok(());
        }
        let element = std::mem::size_of::<T>() as u64;
        if !bytes.is_multiple_of(4)
            || element == 0
            || !bytes.is_multiple_of(element)
            || bytes > buffer.size()
        {
            return Err(GpuError::Map(format!(
                "cannot read {bytes} bytes as {element}-byte elements from a {}-byte buffer",
                buffer.size()
            )));
        }
        let slice = buffer.slice(0..bytes);
        self.map_and_wait(&slice, wgpu::MapMode::Read)?;
        {
            let view = slice
                .get_mapped_range()
                .map_err(|error| GpuError::Map(error.to_string()))?;
            out.extend_from_slice(bytemuck::cast_slice(&view));
        }
        buffer.unmap();
        Ok(())
    }

    /// Maps `slice` and waits, at most `kernel_launch_timeout`, until the mapping is ready. Polls
    /// in short steps: when several threads share the device, another thread's poll may be the
    /// one that runs this mapping's callback.
    pub fn map_and_wait(
        &self,
        slice: &wgpu::BufferSlice<'_>,
        mode: wgpu::MapMode,
    ) -> Result<(), GpuError> {
        let (sender, receiver) = std::sync::mpsc::channel();
        slice.map_async(mode, move |result| {
            // The receiver lives until this function returns; later results are moot.
            let _ = sender.send(result);
        });
        let (bound, waited) = self.wait_bound();
        let started = Instant::now();
        let deadline = started + waited;
        let mut next_report = started + PROGRESS_INTERVAL;
        loop {
            self.check_not_lost()?;
            let remaining = deadline.saturating_duration_since(Instant::now());
            let step = remaining.min(Duration::from_millis(5));
            match self.poll(wgpu::PollType::Wait {
                submission_index: None,
                timeout: Some(step),
            }) {
                Ok(_) | Err(wgpu::PollError::Timeout) => {}
                Err(error) => return Err(GpuError::Poll(error.to_string())),
            }
            match receiver.recv_timeout(step.max(Duration::from_micros(50))) {
                Ok(Ok(())) => return Ok(()),
                Ok(Err(error)) => {
                    // A destroyed or lost device fails pending mappings; report the cause.
                    let _ = self.poll(wgpu::PollType::Poll);
                    self.check_not_lost()?;
                    return Err(GpuError::Map(error.to_string()));
                }
                Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                    return Err(GpuError::Map("mapping callback dropped".to_owned()));
                }
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
            }
            let now = Instant::now();
            if now >= deadline {
                self.timeouts.inc();
                tracing::warn!(?waited, %bound, adapter = %self.info.name, "GPU buffer mapping timed out");
                return Err(GpuError::Timeout { bound, waited });
            }
            if now >= next_report {
                self.report_progress(bound, now - started, waited);
                next_report = now + PROGRESS_INTERVAL;
            }
        }
    }

    /// Counts one call answered by a CPU backend because of `error` (a timeout or a lost device).
    pub fn record_cpu_fallback(&self, error: &GpuError) {
        self.cpu_fallbacks.inc();
        let _fallback = tracing::info_span!(
            target: "consensus::gpu",
            "gpu.cpu_fallback",
            gpu.adapter = %self.info.name,
            error.type = %error,
        );
        tracing::warn!(%error, adapter = %self.info.name, "GPU call answered by the CPU backend");
    }

    /// Calls answered by a CPU backend so far.
    pub fn cpu_fallback_count(&self) -> u64 {
        self.cpu_fallbacks.get()
    }

    /// A snapshot of the context's counters.
    pub fn metrics(&self) -> GpuMetrics {
        let pool = self.pool.stats();
        GpuMetrics {
            cpu_fallbacks: self.cpu_fallbacks.get(),
            timeouts: self.timeouts.get(),
            submissions: self.submissions.load(Ordering::Relaxed),
            buffer_allocations: pool.allocations,
            buffer_reuses: pool.reuses,
            pool_bytes: pool.allocated_bytes,
        }
    }

    /// Registers `consensus_gpu_cpu_fallbacks` and `consensus_gpu_timeouts` (counters; the
    /// exporter appends `_total`) in a Prometheus registry. The registry shares the counters, so
    /// it stays current.
    pub fn register_metrics(&self, registry: &mut Registry) {
        registry.register(
            "consensus_gpu_cpu_fallbacks",
            "GPU calls answered by the CPU backend after a timeout or device loss",
            self.cpu_fallbacks.clone(),
        );
        registry.register(
            "consensus_gpu_timeouts",
            "GPU waits that exceeded kernel_launch_timeout",
            self.timeouts.clone(),
        );
    }
}
