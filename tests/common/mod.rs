//! Helpers shared by the integration suites: the deterministic Raft cluster simulator, its
//! replicated key-value state machine, the history recorder, the invariant checkers and the
//! linearizability checker.
//!
//! Each suite compiles this module on its own and uses a different part of it, so items unused by
//! one suite (and re-exports unused by it) are expected.
#![allow(dead_code, unused_imports)]

pub mod invariants;
pub mod kv;
pub mod linearizability;
pub mod scenario;
pub mod sim;
