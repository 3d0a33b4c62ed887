//! Shared test helpers, from the testkit crate: the real MiniLM base and fixtures, synthetic
//! planted adapters, the CLI binary and report comparison; and one test body per backend.
#![allow(unused_imports, dead_code)] // each test binary uses its own subset

pub use intruder_gate_testkit::*;

/// Whether the CUDA variant of a per-backend test can run: `true` with a device; without one it
/// prints the skip reason and returns `false` — or panics when `IG_REQUIRE_CUDA=1` (what
/// `scripts/gpu-check.sh` sets), so a GPU run can never pass by skipping.
#[cfg(feature = "cuda")]
pub fn cuda_device_or_skip() -> bool {
    match intruder_gate::backend::cuda::CudaBackend::probe(0, None) {
        Ok(_) => true,
        Err(why) if std::env::var("IG_REQUIRE_CUDA").as_deref() == Ok("1") => {
            panic!("IG_REQUIRE_CUDA=1 but no CUDA device can be opened: {why}")
        }
        Err(why) => {
            println!("skipped: no CUDA device ({why})");
            false
        }
    }
}

/// One test body, run on every backend: `per_backend! { fn name(backend) { … } }` makes a module
/// `name` with a test `cpu` and, with the `cuda` feature, a test `cuda` (skipped with a printed
/// reason without a device, failing instead under `IG_REQUIRE_CUDA=1`). `backend` is the
/// `BackendChoice` the body screens with.
#[allow(unused_macros)] // each test binary uses its own subset
macro_rules! per_backend {
    ($(#[$meta:meta])* fn $name:ident($backend:ident) $body:block) => {
        $(#[$meta])*
        mod $name {
            #[allow(unused_imports)]
            use super::*;
            use intruder_gate::backend::BackendChoice;

            fn body($backend: BackendChoice) $body

            #[test]
            fn cpu() {
                body(BackendChoice::Cpu)
            }

            #[cfg(feature = "cuda")]
            #[test]
            fn cuda() {
                if $crate::common::cuda_device_or_skip() {
                    body(BackendChoice::Cuda)
                }
            }
        }
    };
}
#[allow(unused_imports)]
pub(crate) use per_backend;
