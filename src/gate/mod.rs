//! The gate: a base model attached once, a base-spectrum cache, a backend, metrics; screens any
//! number of adapters, from many threads at once. Data flows one way:
//! parse → map to base → base spectrum → update → verdict → metrics.
//!
//! One file per job: [`base_set`] (the attached base), [`plan`] (mapping and shape checks),
//! [`module`] (one module's screening), [`screen`] (a whole adapter, verdict and metrics),
//! [`index`] (precomputing the cache), [`tuned`] (fully fine-tuned or merged checkpoints),
//! [`progress`] (what `index` reports). Clamping is [`crate::clamp`], over a gate and a report.

mod base_set;
mod index;
mod module;
mod plan;
mod progress;
mod screen;
mod tuned;

pub(crate) use module::{refuse_dora, Solved};
pub use module::{ModuleSolution, Solutions};
pub use progress::{IndexProgress, IndexSummary};

use crate::backend::{self, Backend, BackendKind};
use crate::config::Config;
use crate::error::{Error, ErrorKind, Result};
use crate::metrics::{Info, Metrics, ScreenOutcome};
use crate::spectrum::cache::{Key, SpectrumCache};
use base_set::BaseSet;
use parking_lot::{Mutex, RwLock};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

/// What the event hook is told after each screening, on the screening thread.
#[derive(Debug, Clone, Copy)]
pub struct ScreenEvent<'a> {
    pub adapter: &'a str,
    pub outcome: ScreenOutcome,
    pub intruders: u64,
    pub modules: u64,
    pub seconds: f64,
}

/// Called after every screening (see [`Gate::set_event_hook`]).
pub type EventHook = Box<dyn Fn(&ScreenEvent<'_>) + Send + Sync>;

pub struct Gate {
    config: Config,
    backend: Arc<dyn Backend>,
    backend_fallback: Option<String>,
    cache: SpectrumCache,
    base: RwLock<BaseSet>,
    keys: Mutex<HashMap<String, Key>>,
    metrics: Metrics,
    event_hook: RwLock<Option<EventHook>>,
    /// Screening work: one job per module.
    pool: rayon::ThreadPool,
    /// Base-spectrum computations (see `Gate::off_pool`).
    compute_pool: rayon::ThreadPool,
}

impl Gate {
    pub fn new(config: Config) -> Result<Gate> {
        config.validate()?;
        let selected = backend::select(config.backend, config.gpu_memory_bytes)?;
        let pool = thread_pool(config.threads, "intruder-gate")?;
        let compute_pool = thread_pool(config.threads, "intruder-gate-svd")?;
        let metrics = Metrics::new(
            config.metrics,
            Info {
                version: env!("CARGO_PKG_VERSION").into(),
                backend: selected.backend.kind().label().into(),
                device: selected.backend.device(),
            },
        );
        Ok(Gate {
            cache: SpectrumCache::new(
                config.cache_dir.clone(),
                config.cache_dtype,
                config.memory_cache_bytes,
                config.limits,
            ),
            backend: selected.backend,
            backend_fallback: selected.fallback_reason,
            base: RwLock::new(BaseSet::default()),
            keys: Mutex::new(HashMap::new()),
            metrics,
            event_hook: RwLock::new(None),
            pool,
            compute_pool,
            config,
        })
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    pub fn backend_kind(&self) -> BackendKind {
        self.backend.kind()
    }

    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// Sets (or with `None` clears) the hook called after every screening, once its metrics are
    /// recorded, on the screening thread. Waits for running calls of the previous hook, so once
    /// this returns the previous hook is never called again; a hook must therefore not call it.
    pub fn set_event_hook(&self, hook: Option<EventHook>) {
        *self.event_hook.write() = hook;
    }
}

pub(super) fn ms(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1e3
}

fn thread_pool(threads: usize, name: &'static str) -> Result<rayon::ThreadPool> {
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .thread_name(move |i| format!("{name}-{i}"))
        .build()
        .map_err(|e| Error::new(ErrorKind::Internal, format!("thread pool: {e}")))
}
