//! intruder-gate: screens LoRA adapters for intruder dimensions at load time.

pub mod error;
pub mod limits;
pub mod tensor;

pub use error::{Error, ErrorKind, Result};
pub mod backend;
pub mod metrics;
pub mod spectrum;
