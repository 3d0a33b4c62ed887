//! Settings of a gate. Defaults follow the paper (k = 10, ε = 0.5).

use crate::backend::BackendChoice;
use crate::limits::Limits;
use crate::metrics::MetricsConfig;
use crate::policy::Policy;
use crate::report::Method;
use crate::spectrum::cache::CacheDType;
use std::path::PathBuf;

#[derive(Debug, Clone)]
pub struct Config {
    /// How many top singular vectors of `W'` are tested.
    pub top_k: usize,
    /// A vector is an intruder when its max |cos| with every base vector is below this.
    pub epsilon: f64,
    pub method: Method,
    pub backend: BackendChoice,
    /// On-disk base-spectrum cache; `None` disables it.
    pub cache_dir: Option<PathBuf>,
    pub cache_dtype: CacheDType,
    /// In-memory base-spectrum cache capacity (0 disables it; single flight still holds).
    pub memory_cache_bytes: usize,
    /// Neighbouring singular values closer than this (relative) are flagged as tied.
    pub tie_tolerance: f64,
    /// Residual tolerance of the Krylov solve, relative to σ₁ (also the randomized solver's).
    pub krylov_tolerance: f64,
    /// Seed of the randomized solver's Gaussian sketches (`--tuned` and DoRA): the same input
    /// and seed give the same report. Reported when the randomized solver ran.
    pub seed: u64,
    /// Worker threads for screening modules concurrently (0 = one per core; at most
    /// [`crate::limits::max_threads`], four per core).
    pub threads: usize,
    /// Device memory budget for the CUDA backend.
    pub gpu_memory_bytes: Option<usize>,
    pub limits: Limits,
    /// Turns a report into a verdict.
    pub policy: Policy,
    pub metrics: MetricsConfig,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            top_k: 10,
            epsilon: 0.5,
            method: Method::Brand,
            backend: BackendChoice::Auto,
            cache_dir: default_cache_dir(),
            cache_dtype: CacheDType::F32,
            memory_cache_bytes: 2 << 30,
            // Matches the fixtures' note: below ~0.1 % the individual vectors are ill-defined.
            tie_tolerance: 1e-3,
            krylov_tolerance: 1e-9,
            seed: crate::spectrum::randomized::DEFAULT_SEED,
            threads: 0,
            gpu_memory_bytes: None,
            limits: Limits::default(),
            policy: Policy::default(),
            metrics: MetricsConfig::default(),
        }
    }
}

impl Config {
    pub fn validate(&self) -> crate::Result<()> {
        if self.top_k == 0 || self.top_k > 4096 {
            crate::bail!(
                InvalidArgument,
                "top_k must be in 1..=4096, got {}",
                self.top_k
            );
        }
        if !(self.epsilon > 0.0 && self.epsilon <= 1.0) {
            crate::bail!(
                InvalidArgument,
                "epsilon must be in (0, 1], got {}",
                self.epsilon
            );
        }
        if !(self.tie_tolerance >= 0.0 && self.tie_tolerance < 1.0) {
            crate::bail!(
                InvalidArgument,
                "tie tolerance must be in [0, 1), got {}",
                self.tie_tolerance
            );
        }
        if !(self.krylov_tolerance > 0.0 && self.krylov_tolerance < 1e-2) {
            crate::bail!(
                InvalidArgument,
                "krylov tolerance must be in (0, 0.01), got {}",
                self.krylov_tolerance
            );
        }
        let max = crate::limits::max_threads();
        if self.threads > max {
            crate::bail!(
                InvalidArgument,
                "threads must be at most {max} (4 per core, at least 16), got {}",
                self.threads
            );
        }
        self.policy.validate()
    }
}

/// `$XDG_CACHE_HOME/intruder-gate` (or the platform's equivalent).
pub fn default_cache_dir() -> Option<PathBuf> {
    dirs::cache_dir().map(|d| d.join("intruder-gate"))
}
