//! GPU batch work (vote aggregation, signature verification) on wgpu, each with a CPU twin that
//! gives identical answers.

mod buffer_pool;
pub mod context;
pub mod sigverify;
pub mod votes;

// ---- re-exports of context.rs and votes.rs ----
pub use context::{AdapterSummary, GpuConfig, GpuContext, GpuError, GpuMetrics};
pub use votes::{
    AdaptiveVoteAggregator, CpuVoteAggregator, Equivocation, GpuVoteAggregator, ProposalTally,
    Threshold, Vote, VoteAggregator, VoteError, VoteOutcome, VoteSummary,
};

// ---- re-exports of sigverify.rs ----
pub use sigverify::{
    AutoSignatureVerifier, CpuSignatureVerifier, GPU_CROSSOVER_BATCH, GpuSignatureVerifier,
    GpuVerifierOptions, SigVerifyError, SignatureItem, SignatureVerifier,
};
