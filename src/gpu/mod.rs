//! GPU batch work (vote aggregation, signature verification) on wgpu, each with a CPU twin that
//! gives identical answers.
//!
//! The wgpu side ([`GpuContext`], its buffer pool, the GPU backends and the aggregators that choose
//! between GPU and CPU) needs the `gpu` feature, on by default. Without it this module still has
//! the CPU backends ([`CpuVoteAggregator`], [`CpuSignatureVerifier`]), the traits they implement,
//! and [`GpuConfig`] and [`GpuError`], so that configuration files and error types are the same on
//! every build.

#[cfg(feature = "gpu")]
mod buffer_pool;
mod config;
#[cfg(feature = "gpu")]
#[cfg_attr(docsrs, doc(cfg(feature = "gpu")))]
pub mod context;
mod error;
pub mod sigverify;
pub mod votes;

pub use config::GpuConfig;
pub use error::{GpuError, WaitBound};

// ---- re-exports of context.rs and votes.rs ----
#[cfg(feature = "gpu")]
#[cfg_attr(docsrs, doc(cfg(feature = "gpu")))]
pub use context::{AdapterSummary, GpuContext, GpuMetrics};
#[cfg(feature = "gpu")]
#[cfg_attr(docsrs, doc(cfg(feature = "gpu")))]
pub use votes::{AdaptiveVoteAggregator, GpuVoteAggregator};
pub use votes::{
    CpuVoteAggregator, Equivocation, ProposalTally, Threshold, Vote, VoteAggregator, VoteError,
    VoteOutcome, VoteSummary,
};

// ---- re-exports of sigverify.rs ----
#[cfg(feature = "gpu")]
#[cfg_attr(docsrs, doc(cfg(feature = "gpu")))]
pub use sigverify::{
    AutoSignatureVerifier, GPU_CROSSOVER_BATCH, GpuSignatureVerifier, GpuVerifierOptions,
};
pub use sigverify::{CpuSignatureVerifier, SigVerifyError, SignatureItem, SignatureVerifier};
