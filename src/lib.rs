//! # stratoswarm-consensus
//!
//! Replicated state consensus: Raft, PBFT and a GPU-optimized Raft over one log store and one
//! transport, with batch vote aggregation and signature checks running as WGSL compute shaders on
//! any GPU wgpu reaches, and an exact CPU path everywhere else.
//!
//! The protocol cores in [`protocol`] are sans-IO state machines; the engine drives them with real
//! clocks, sockets and disks, and the test simulator drives the very same cores deterministically.

//!
//! # Cargo features
//!
//! - `gpu` (default): the wgpu runtime and the GPU backends of [`gpu::votes`] and
//!   [`gpu::sigverify`]. Without it the CPU backends answer everything.
//! - `server` (default): the HTTP key-value node in `node` and the `consensus-node` binary.
//! - `sim`: reserved for the deterministic simulator; it enables nothing yet.

// Nothing here needs `unsafe`: bytes cross to the GPU through bytemuck's checked casts.
#![forbid(unsafe_code)]
#![cfg_attr(docsrs, feature(doc_cfg))]
// CPU-only docs still name the GPU items (saying which feature brings them); those links resolve
// in the full build, which is the one docs.rs publishes.
#![cfg_attr(not(feature = "gpu"), allow(rustdoc::broken_intra_doc_links))]

pub mod byzantine;
pub mod client_signature;
pub mod config;
mod encoding;
pub mod engine;
pub mod error;
#[cfg(all(test, feature = "gpu", feature = "server"))]
mod fuzzing;
pub mod gpu;
pub mod keys;
pub mod membership;
pub mod metrics;
#[cfg(feature = "server")]
#[cfg_attr(docsrs, doc(cfg(feature = "server")))]
pub mod node;
pub mod protocol;
#[cfg(feature = "sim")]
pub mod sim;
pub mod state_machine;
pub mod storage;
mod sync;
pub mod telemetry;
pub mod transport;
pub mod types;
pub mod verify;

pub use byzantine::{ByzantineConfig, ByzantineDetector, ByzantineReport, PunishmentPolicy};
pub use client_signature::ClientSignature;
pub use config::{
    Algorithm, ConsensusConfig, DEFAULT_SNAPSHOT_INTERVAL, DEFAULT_TCP_LEADER_LINGER,
    DEFAULT_TCP_LEADER_LINGER_PER_ENTRY, ElectionConfig, MAX_DRIVER_SPIN, ReadMode, TlsFiles,
};
pub use engine::{ConsensusEngine, LeaderElection, LocalNetwork, PeerEntry, ProposalTimings};
pub use error::{ConfigError, Error, Result, StorageError};
pub use membership::{Membership, MembershipChange, MembershipError};
pub use metrics::MetricsSnapshot;
pub use state_machine::StateMachine;
pub use types::{ConsensusResult, Entry, LogIndex, NodeId, Payload, Proposal, ProposalTag, Term};
pub use verify::{LogVerification, VerifyLogError, verify_log};
