//! intruder-gate: screens LoRA adapters for intruder dimensions at load time.
//!
//! Flow: parse ([`adapter`], [`base`]) → map to base → base spectrum ([`spectrum::cache`]) →
//! update ([`spectrum::brand`]) → verdict ([`policy`], [`report`]) → clamp ([`clamp`]) →
//! metrics ([`metrics`]).

pub mod adapter;
pub mod backend;
pub mod base;
pub mod clamp;
pub mod config;
pub mod error;
pub mod ffi;
pub mod floats;
pub mod gate;
pub mod limits;
pub mod metrics;
pub mod policy;
pub mod report;
pub mod safetensors_file;
pub mod spectrum;
pub mod tensor;

pub use clamp::{ClampMode, ClampOptions, ClampedAdapter, Target};
pub use config::Config;
pub use error::{Error, ErrorKind, Result};
pub use gate::Gate;
pub use policy::Policy;
pub use report::{Report, Verdict};
