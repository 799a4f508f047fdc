//! Helpers shared by the integration suites: scenarios and seed sweeps over the library's
//! simulator (`consensus::sim`).
//!
//! Each suite compiles this module on its own and uses a different part of it, so items unused by
//! one suite (and re-exports unused by it) are expected.
#![allow(dead_code, unused_imports)]

pub mod scenario;
