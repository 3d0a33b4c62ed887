//! Shared test helpers, from the testkit crate.
#![allow(unused_imports)] // each test binary uses its own subset

pub use intruder_gate_testkit::*;
