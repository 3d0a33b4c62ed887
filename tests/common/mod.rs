//! Shared test helpers, from the testkit crate: the real MiniLM base and fixtures, synthetic
//! planted adapters, the CLI binary and report comparison.
#![allow(unused_imports)] // each test binary uses its own subset

pub use intruder_gate_testkit::*;
