//! The gate: a base model attached once, a base-spectrum cache, a backend, metrics; screens any
//! number of adapters, from many threads at once. Data flows one way:
//! parse → map to base → base spectrum → update → verdict → metrics.

use crate::adapter::{self, Adapter, LoraModule};
use crate::backend::{self, Backend, Spectrum};
use crate::base::{mapping, BaseModel};
use crate::config::Config;
use crate::error::{Error, ErrorKind, Result};
use crate::metrics::{CacheResult, Info, Metrics, ScreenOutcome};
use crate::policy::OnInvalid;
use crate::report::{classify, Method, ModuleReport, Report, ReportError, Verdict, SCHEMA_VERSION};
use crate::spectrum::brand::{self, BrandSolution, Update};
use crate::spectrum::cache::{Fetched, Key, Source, SpectrumCache};
use crate::spectrum::dense;
use crate::spectrum::krylov::KrylovSettings;
use crate::tensor::{DType, TensorRef};
use parking_lot::{Mutex, RwLock};
use rayon::prelude::*;
use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

/// A base tensor the host keeps in its own memory (C ABI). The host guarantees it stays alive and
/// unchanged while the gate lives.
struct HostTensor {
    ptr: *const u8,
    len: usize,
    dtype: DType,
    rows: usize,
    cols: usize,
}

// SAFETY: the memory is only read, and the host promises it outlives the gate unchanged.
unsafe impl Send for HostTensor {}
unsafe impl Sync for HostTensor {}

#[derive(Default)]
struct BaseSet {
    model: Option<BaseModel>,
    host: BTreeMap<String, HostTensor>,
}

impl BaseSet {
    fn label(&self) -> String {
        match &self.model {
            Some(m) => m.path().display().to_string(),
            None => "<host memory>".into(),
        }
    }

    fn names(&self) -> Vec<String> {
        let mut names = self
            .model
            .as_ref()
            .map(|m| m.matrix_names())
            .unwrap_or_default();
        names.extend(self.host.keys().cloned());
        names.sort();
        names.dedup();
        names
    }

    /// Lets the OS drop a file-backed tensor's pages once its bytes have been read.
    fn release(&self, name: &str) {
        if let Some(m) = &self.model {
            m.release(name);
        }
    }

    fn matrix(&self, name: &str) -> Result<TensorRef<'_>> {
        if let Some(h) = self.host.get(name) {
            // SAFETY: see HostTensor.
            let bytes = unsafe { std::slice::from_raw_parts(h.ptr, h.len) };
            return TensorRef::new(h.dtype, h.rows, h.cols, bytes);
        }
        match &self.model {
            Some(m) => m.matrix(name),
            None => crate::bail!(BaseMismatch, "no base tensor named `{name}`"),
        }
    }
}

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

/// One module ready for the maths: validated and mapped.
struct Job<'a> {
    base: &'a BaseSet,
    lora: &'a LoraModule,
    base_tensor: String,
    w0: TensorRef<'a>,
    /// The stored base tensor is `[in, out]` (`fan_in_fan_out`).
    transposed: bool,
}

/// One module's Brand solution, with the base spectrum in `W0`'s `[out, in]` orientation (what
/// [`BrandSolution::singular_vectors`] lifts into).
pub(crate) struct Solved {
    pub module: String,
    pub base_tensor: String,
    pub sol: BrandSolution,
    pub base: Arc<Spectrum>,
    source: Source,
    warning: Option<String>,
}

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
                backend: selected.backend.name().into(),
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

    pub fn backend_name(&self) -> &'static str {
        self.backend.name()
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

    /// Attaches a base model (safetensors file, or directory, sharded or not). Once per gate.
    pub fn attach_base(&self, path: &Path) -> Result<()> {
        let mut base = self.base.write();
        if base.model.is_some() {
            crate::bail!(
                InvalidArgument,
                "a base model is already attached to this gate"
            );
        }
        // Opened before anything changes, so a failure leaves the gate as it was.
        base.model = Some(BaseModel::open(path, &self.config.limits)?);
        Ok(())
    }

    /// Attaches one base tensor from host memory (row-major `rows × cols`).
    ///
    /// # Safety
    /// `data` must point to `rows·cols` elements of `dtype`, stay valid and unchanged while
    /// the gate lives.
    pub unsafe fn attach_base_tensor(
        &self,
        name: &str,
        data: *const u8,
        dtype: DType,
        rows: usize,
        cols: usize,
    ) -> Result<()> {
        if name.is_empty() || data.is_null() {
            crate::bail!(InvalidArgument, "a base tensor needs a name and data");
        }
        let limits = &self.config.limits;
        if rows == 0 || cols == 0 || rows > limits.max_dim || cols > limits.max_dim {
            crate::bail!(
                Limit,
                "base tensor `{name}`: shape [{rows}, {cols}] outside 1..={}",
                limits.max_dim
            );
        }
        let mut base = self.base.write();
        if base.host.contains_key(name)
            || base.model.as_ref().is_some_and(|m| m.shape(name).is_some())
        {
            crate::bail!(InvalidArgument, "base tensor `{name}` is already attached");
        }
        base.host.insert(
            name.to_string(),
            HostTensor {
                ptr: data,
                len: rows * cols * dtype.size(),
                dtype,
                rows,
                cols,
            },
        );
        Ok(())
    }

    /// A base tensor as row-major f32 with its shape `(rows, cols)`, for hosts that keep their
    /// own copy of the weights (e.g. to merge accepted adapters).
    pub fn base_tensor_f32(&self, name: &str) -> Result<(usize, usize, Vec<f32>)> {
        let base = self.base.read();
        let t = base.matrix(name)?;
        Ok((t.rows, t.cols, t.to_f32()))
    }

    /// Loads and screens a PEFT adapter directory.
    pub fn screen_adapter_dir(&self, dir: &Path) -> Result<Report> {
        self.load_and_screen(dir).map(|(report, _)| report)
    }

    /// [`Gate::screen_adapter_dir`], also handing back the loaded adapter (e.g. to
    /// [`Gate::clamp`] it); `None` when it could not be loaded and the policy rejected it.
    pub fn load_and_screen(&self, dir: &Path) -> Result<(Report, Option<Adapter>)> {
        let started = Instant::now();
        match self.load_checked(dir) {
            Ok(a) => Ok((self.screen(&a)?, Some(a))),
            Err(e) => {
                let name = dir
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default();
                Ok((self.finish(&name, Err(e), started)?, None))
            }
        }
    }

    /// Loads a PEFT directory whose modules' shapes, read from its header alone, fit their base
    /// tensors: an adapter declaring tensors far larger than its base is refused before any of
    /// them is read.
    pub fn load_checked(&self, dir: &Path) -> Result<Adapter> {
        let limits = &self.config.limits;
        let peft = adapter::PeftDir::open(dir, limits)?;
        // No module at all is the loader's error to give.
        if !peft.modules().is_empty() {
            let shapes: Vec<_> = peft
                .modules()
                .iter()
                .map(|m| (m.name.as_str(), m.out_features, m.in_features))
                .collect();
            let base = self.base.read();
            Self::map_checked(&base, &shapes, peft.config().fan_in_fan_out)?;
        }
        peft.load(limits)
    }

    /// Screens an adapter already in memory.
    pub fn screen(&self, adapter: &Adapter) -> Result<Report> {
        let started = Instant::now();
        let result = self.screen_inner(adapter, started);
        self.finish(&adapter.name, result, started)
    }

    /// Applies the policy's `on_invalid` to a validation error, then records the outcome.
    fn finish(&self, adapter: &str, result: Result<Report>, started: Instant) -> Result<Report> {
        let result = match result {
            Err(e)
                if e.kind().is_validation()
                    && self.config.policy.on_invalid == OnInvalid::Reject =>
            {
                self.metrics.record_error(e.kind().label());
                Ok(self.rejected(adapter, e))
            }
            r => r,
        };
        let (outcome, intruders, modules) = match &result {
            Ok(report) => (
                match report.verdict {
                    Verdict::Accept => ScreenOutcome::Accept,
                    Verdict::Warn => ScreenOutcome::Warn,
                    Verdict::Clamp => ScreenOutcome::Clamp,
                    Verdict::Reject => ScreenOutcome::Reject,
                },
                report.total_intruders as u64,
                report.modules.len() as u64,
            ),
            Err(e) => {
                self.metrics.record_error(e.kind().label());
                (ScreenOutcome::Error, 0, 0)
            }
        };
        let event = ScreenEvent {
            adapter,
            outcome,
            intruders,
            modules,
            seconds: started.elapsed().as_secs_f64(),
        };
        self.metrics
            .record_screening(adapter, outcome, intruders, modules, event.seconds);
        // Recursive: a hook may screen on this gate even while a writer waits.
        if let Some(hook) = &*self.event_hook.read_recursive() {
            hook(&event);
        }
        result
    }

    /// The report of an adapter refused before any maths: no modules, verdict `reject`.
    fn rejected(&self, adapter: &str, e: Error) -> Report {
        let label = self.base.read().label();
        let mut report = self.assemble(
            label,
            Some(adapter.to_string()),
            None,
            vec![],
            BTreeMap::new(),
            vec![],
        );
        report.verdict = Verdict::Reject;
        report.fired_rules.clear();
        report.error = Some(ReportError {
            kind: e.kind().label(),
            message: e.message().to_string(),
        });
        report
    }

    fn screen_inner(&self, adapter: &Adapter, started: Instant) -> Result<Report> {
        let base = self.base.read();
        let jobs = self.plan(&base, adapter)?;
        let planned_ms = ms(started);
        let mut warnings = Vec::new();
        if !adapter.not_screened.is_empty() {
            warnings.push(format!(
                "{} tensor(s) are not LoRA A/B pairs and were not screened: {}",
                adapter.not_screened.len(),
                adapter.not_screened.join(", ")
            ));
        }
        let results: Vec<Result<(ModuleReport, Option<String>)>> = self
            .pool
            .install(|| jobs.par_iter().map(|j| self.run(j)).collect());
        let mut modules = Vec::with_capacity(results.len());
        for r in results {
            let (m, w) = r?;
            modules.push(m);
            warnings.extend(w);
        }
        let mut timings = BTreeMap::from([("plan".to_string(), planned_ms)]);
        timings.insert("total".into(), ms(started));
        Ok(self.assemble(
            base.label(),
            Some(adapter.name.clone()),
            None,
            modules,
            timings,
            warnings,
        ))
    }

    /// Maps every module to its base tensor and checks shapes, before any maths.
    fn plan<'a>(&self, base: &'a BaseSet, adapter: &'a Adapter) -> Result<Vec<Job<'a>>> {
        let shapes: Vec<_> = adapter
            .modules
            .iter()
            .map(|m| (m.name.as_str(), m.out_features, m.in_features))
            .collect();
        let targets = Self::map_checked(base, &shapes, adapter.fan_in_fan_out)?;
        let mut jobs = Vec::with_capacity(targets.len());
        for (lora, base_tensor) in adapter.modules.iter().zip(targets) {
            jobs.push(Job {
                base,
                lora,
                w0: base.matrix(&base_tensor)?,
                base_tensor,
                transposed: adapter.fan_in_fan_out,
            });
        }
        jobs.sort_by(|a, b| a.base_tensor.cmp(&b.base_tensor));
        Ok(jobs)
    }

    /// The base tensor of each `(module, out_features, in_features)`, after checking that its
    /// shape is `[out, in]` (`[in, out]` when `transposed`, for `fan_in_fan_out`).
    fn map_checked(
        base: &BaseSet,
        modules: &[(&str, usize, usize)],
        transposed: bool,
    ) -> Result<Vec<String>> {
        if base.model.is_none() && base.host.is_empty() {
            crate::bail!(
                InvalidArgument,
                "no base attached: attach a base model (or base tensors) before screening"
            );
        }
        let names: Vec<&str> = modules.iter().map(|m| m.0).collect();
        let targets = mapping::map_modules(&names, &base.names())?;
        for (&(module, out_features, in_features), base_tensor) in modules.iter().zip(&targets) {
            let w0 = base.matrix(base_tensor)?;
            let (out, inn) = if transposed {
                (w0.cols, w0.rows)
            } else {
                (w0.rows, w0.cols)
            };
            if (out, inn) != (out_features, in_features) {
                crate::bail!(
                    Shape,
                    "module `{module}`: B·A is [{out_features}, {in_features}] but base tensor `{base_tensor}` is [{out}, {inn}]{}",
                    if transposed { " (after fan_in_fan_out transpose)" } else { "" }
                );
            }
        }
        Ok(targets)
    }

    fn run(&self, job: &Job<'_>) -> Result<(ModuleReport, Option<String>)> {
        let lora = job.lora;
        let k = self.config.top_k;
        let mut timings = BTreeMap::new();
        let t = Instant::now();
        let (sigma, max_cos, outside, solver, source, warning) = match self.config.method {
            Method::Dense => {
                check_base_values(&job.base_tensor, &job.w0, &self.config.limits)?;
                let w0 = oriented_f64(&job.w0, job.transposed);
                let (out, inn) = (lora.out_features, lora.in_features);
                let w1 =
                    dense::effective_weight(&w0, out, inn, &lora.a, &lora.b, lora.rank, lora.scale);
                let w0m = faer::MatRef::from_row_major_slice(&w0, out, inn);
                let d = dense::compare(w0m, w1.as_ref(), k + 1)?;
                timings.insert("dense".into(), ms(t));
                (
                    d.sigma,
                    d.max_cos,
                    d.outside_base_span,
                    "dense",
                    "none",
                    None,
                )
            }
            Method::Brand => {
                let solved = self.brand_solve(job, k + 1, &mut timings)?;
                let (mc, out) = (solved.sol.max_cos(), solved.sol.outside_base_span());
                (
                    solved.sol.triplets.sigma,
                    mc,
                    out,
                    solved.sol.solver,
                    solved.source.label(),
                    solved.warning,
                )
            }
        };
        Ok((
            self.module_report(
                lora.name.clone(),
                job.base_tensor.clone(),
                [lora.out_features, lora.in_features],
                lora.rank,
                lora.scale,
                sigma,
                max_cos,
                outside,
                solver,
                source,
                timings,
            ),
            warning,
        ))
    }

    /// Plans `adapter` and solves every module for its top `want(module)` triplets by the Brand
    /// update (whatever the configured method: clamping needs the Brand quantities), in parallel.
    /// The result is sorted by module name.
    pub(crate) fn solve_modules(
        &self,
        adapter: &Adapter,
        want: &(dyn Fn(&str) -> usize + Sync),
    ) -> Result<Vec<Solved>> {
        let base = self.base.read();
        let jobs = self.plan(&base, adapter)?;
        let mut solved = self.pool.install(|| {
            jobs.par_iter()
                .map(|j| self.brand_solve(j, want(&j.lora.name), &mut BTreeMap::new()))
                .collect::<Result<Vec<_>>>()
        })?;
        solved.sort_by(|a, b| a.module.cmp(&b.module));
        Ok(solved)
    }

    /// The top `want` triplets of one planned module's `W'` by the Brand update.
    fn brand_solve(
        &self,
        job: &Job<'_>,
        want: usize,
        timings: &mut BTreeMap<String, f64>,
    ) -> Result<Solved> {
        let t = Instant::now();
        let fetched = self.base_spectrum(job.base, &job.base_tensor, &job.w0)?;
        let (spectrum, source) = (fetched.spectrum, fetched.source);
        let warning = [fetched.rebuilt, fetched.not_written]
            .into_iter()
            .flatten()
            .map(|w| format!("base tensor `{}`: {w}", job.base_tensor))
            .reduce(|a, b| format!("{a}; {b}"));
        timings.insert("base_spectrum".into(), ms(t));
        let base = if job.transposed {
            Arc::new(transpose_spectrum(&spectrum))
        } else {
            spectrum
        };
        let t = Instant::now();
        let lora = job.lora;
        let sol = brand::solve(
            self.backend.as_ref(),
            &Update {
                base: &base,
                a: &lora.a,
                b: &lora.b,
                rank: lora.rank,
                scale: lora.scale,
            },
            want,
            &self.krylov_settings(),
        )?;
        timings.insert("update".into(), ms(t));
        Ok(Solved {
            module: lora.name.clone(),
            base_tensor: job.base_tensor.clone(),
            sol,
            base,
            source,
            warning,
        })
    }

    #[allow(clippy::too_many_arguments)]
    fn module_report(
        &self,
        module: String,
        base_tensor: String,
        shape: [usize; 2],
        rank: usize,
        scale: f64,
        mut sigma: Vec<f64>,
        mut max_cos: Vec<f64>,
        mut outside: Vec<f64>,
        solver: &str,
        source: &str,
        timings_ms: BTreeMap<String, f64>,
    ) -> ModuleReport {
        let k = self.config.top_k.min(max_cos.len());
        max_cos.truncate(k);
        outside.truncate(k);
        let (intruders, tied, near_epsilon) = classify(
            &sigma,
            &max_cos,
            self.config.epsilon,
            self.config.tie_tolerance,
        );
        sigma.truncate(k);
        ModuleReport {
            module,
            base_tensor,
            shape,
            rank,
            scale,
            singular_values: sigma,
            max_cos,
            intruders,
            tied,
            outside_base_span: outside,
            near_epsilon,
            solver: solver.into(),
            base_spectrum: source.into(),
            timings_ms,
        }
    }

    fn krylov_settings(&self) -> KrylovSettings {
        KrylovSettings {
            tol: self.config.krylov_tolerance,
            max_dim: 40 * self.config.top_k.clamp(2, 16),
            seed: 0x1A7E_5EED,
        }
    }

    /// The base spectrum of one stored base tensor (its own orientation), via the cache.
    fn base_spectrum(&self, base: &BaseSet, name: &str, w0: &TensorRef<'_>) -> Result<Fetched> {
        let key = self.key(name, w0);
        let started = Instant::now();
        let computed = self.cache.get_or_compute(&key, w0, || {
            check_base_values(name, w0, &self.config.limits)?;
            self.off_pool(|| self.backend.thin_svd(&w0.to_f32(), w0.rows, w0.cols))
        });
        // Fingerprinting and computing read the whole tensor; its pages need not stay resident.
        base.release(name);
        let fetched = computed?;
        let source = fetched.source;
        self.metrics.record_cache(match source {
            Source::MemoryHit => CacheResult::MemoryHit,
            Source::DiskHit => CacheResult::DiskHit,
            Source::Computed => CacheResult::Computed,
            Source::RebuiltCorrupt => CacheResult::RebuiltCorrupt,
        });
        if matches!(source, Source::Computed | Source::RebuiltCorrupt) {
            self.metrics
                .record_spectrum_compute(started.elapsed().as_secs_f64());
        }
        Ok(fetched)
    }

    /// Runs `f` (a base-spectrum computation, called while holding that spectrum's cache flight)
    /// on the compute pool, from a plain thread. Run on the screening pool, the SVD's fork/join
    /// would let this thread steal other screening jobs while it waits; one of them for the same
    /// base tensor (another caller's adapter) then blocks on the flight this thread holds, and
    /// the gate deadlocks. A plain thread blocked in `install` steals nothing.
    fn off_pool<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        std::thread::scope(|s| {
            s.spawn(|| self.compute_pool.install(f))
                .join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
        })
    }

    /// The cache key of a base tensor, fingerprinted once per gate (the base does not change
    /// while it is attached).
    fn key(&self, name: &str, w0: &TensorRef<'_>) -> Key {
        if let Some(k) = self.keys.lock().get(name) {
            return *k;
        }
        let k = Key::of(w0);
        self.keys.lock().insert(name.to_string(), k);
        k
    }

    /// Computes and caches the base spectrum of every 2-D float base tensor (matching `include`),
    /// in parallel. Entries already cached are verified, not recomputed, so an interrupted run
    /// resumes where it stopped. `progress` is called once per finished tensor.
    pub fn index(
        &self,
        include: Option<&regex::Regex>,
        progress: &(dyn Fn(&IndexProgress<'_>) + Sync),
    ) -> Result<IndexSummary> {
        let started = Instant::now();
        let base = self.base.read();
        let names: Vec<String> = base
            .names()
            .into_iter()
            .filter(|n| include.is_none_or(|re| re.is_match(n)))
            .collect();
        if let (Some(re), true) = (include, names.is_empty()) {
            crate::bail!(
                InvalidArgument,
                "the include pattern `{re}` matches none of the base's {} 2-D float tensors",
                base.names().len()
            );
        }
        let total = names.len();
        let done = std::sync::atomic::AtomicUsize::new(0);
        let sources: Result<Vec<Source>> = self.pool.install(|| {
            names
                .par_iter()
                .map(|name| {
                    let w0 = base.matrix(name)?;
                    let fetched = self.base_spectrum(&base, name, &w0)?;
                    let source = fetched.source;
                    // Indexing fills the disk cache: an entry not written fails it.
                    if let Some(w) = fetched.not_written {
                        crate::bail!(Io, "{w}");
                    }
                    progress(&IndexProgress {
                        done: done.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1,
                        total,
                        name,
                        shape: [w0.rows, w0.cols],
                        source,
                        elapsed_s: started.elapsed().as_secs_f64(),
                    });
                    Ok(source)
                })
                .collect()
        });
        let sources = sources?;
        let count = |s: Source| sources.iter().filter(|&&x| x == s).count();
        Ok(IndexSummary {
            tensors: total,
            computed: count(Source::Computed) + count(Source::RebuiltCorrupt),
            already_cached: count(Source::DiskHit) + count(Source::MemoryHit),
            seconds: started.elapsed().as_secs_f64(),
        })
    }

    /// Compares a fully fine-tuned model with the base: every 2-D float tensor present in both
    /// with the same shape, by the dense method.
    pub fn screen_tuned(&self, tuned_path: &Path) -> Result<Report> {
        let started = Instant::now();
        let base = self.base.read();
        let tuned = BaseModel::open(tuned_path, &self.config.limits)?;
        let pairs: Vec<(String, TensorRef<'_>, TensorRef<'_>)> = tuned
            .matrix_names()
            .into_iter()
            .filter_map(|n| {
                let b = base.matrix(&n).ok()?;
                let t = tuned.matrix(&n).ok()?;
                ((b.rows, b.cols) == (t.rows, t.cols)).then_some((n, b, t))
            })
            .collect();
        if pairs.is_empty() {
            crate::bail!(
                BaseMismatch,
                "the tuned model shares no 2-D tensor of the same shape with the base"
            );
        }
        let k = self.config.top_k;
        let modules: Result<Vec<ModuleReport>> = self.pool.install(|| {
            pairs
                .par_iter()
                .map(|(name, b, t)| {
                    let t0 = Instant::now();
                    let (w0, w1) = (b.to_f64(), t.to_f64());
                    let bm = faer::MatRef::from_row_major_slice(&w0, b.rows, b.cols);
                    let tm = faer::MatRef::from_row_major_slice(&w1, t.rows, t.cols);
                    let d = dense::compare(bm, tm, k + 1)?;
                    let timings = BTreeMap::from([("dense".to_string(), ms(t0))]);
                    Ok(self.module_report(
                        name.clone(),
                        name.clone(),
                        [b.rows, b.cols],
                        0,
                        0.0,
                        d.sigma,
                        d.max_cos,
                        d.outside_base_span,
                        "dense",
                        "none",
                        timings,
                    ))
                })
                .collect()
        });
        let timings = BTreeMap::from([("total".to_string(), ms(started))]);
        let mut report = self.assemble(
            base.label(),
            None,
            Some(tuned_path.display().to_string()),
            modules?,
            timings,
            vec![],
        );
        report.method = Method::Dense.label();
        Ok(report)
    }

    fn assemble(
        &self,
        base: String,
        adapter: Option<String>,
        tuned: Option<String>,
        modules: Vec<ModuleReport>,
        timings_ms: BTreeMap<String, f64>,
        warnings: Vec<String>,
    ) -> Report {
        let total: usize = modules.iter().map(|m| m.intruders.len()).sum();
        let (verdict, fired_rules) = self.config.policy.evaluate(&modules);
        Report {
            schema_version: SCHEMA_VERSION,
            tool_version: env!("CARGO_PKG_VERSION"),
            base,
            adapter,
            tuned,
            method: self.config.method.label(),
            backend: self.backend.name(),
            device: self.backend.device(),
            backend_fallback: self.backend_fallback.clone(),
            top_k: self.config.top_k,
            epsilon: self.config.epsilon,
            tie_tolerance: self.config.tie_tolerance,
            verdict,
            fired_rules,
            error: None,
            total_intruders: total,
            modules_with_intruders: modules.iter().filter(|m| !m.intruders.is_empty()).count(),
            modules,
            timings_ms,
            warnings,
        }
    }
}

/// One tensor finished by `index`.
pub struct IndexProgress<'a> {
    /// Tensors finished so far, this one included.
    pub done: usize,
    pub total: usize,
    pub name: &'a str,
    pub shape: [usize; 2],
    pub source: Source,
    pub elapsed_s: f64,
}

impl IndexProgress<'_> {
    /// Seconds left at the average pace so far.
    pub fn eta_s(&self) -> f64 {
        self.elapsed_s / self.done as f64 * (self.total - self.done) as f64
    }
}

impl std::fmt::Display for IndexProgress<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "[{}/{}] {} [{}x{}] {} ({:.1}s elapsed, ETA {:.0}s)",
            self.done,
            self.total,
            self.name,
            self.shape[0],
            self.shape[1],
            self.source.label(),
            self.elapsed_s,
            self.eta_s()
        )
    }
}

/// What `index` did.
#[derive(Debug, Clone, PartialEq)]
pub struct IndexSummary {
    pub tensors: usize,
    pub computed: usize,
    pub already_cached: usize,
    pub seconds: f64,
}

impl std::fmt::Display for IndexSummary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "indexed {} tensors: {} computed, {} already cached, in {:.1}s",
            self.tensors, self.computed, self.already_cached, self.seconds
        )
    }
}

fn ms(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1e3
}

/// `W0` as row-major f64 in `[out, in]` layout.
fn oriented_f64(t: &TensorRef<'_>, transposed: bool) -> Vec<f64> {
    let v = t.to_f64();
    if !transposed {
        return v;
    }
    let (r, c) = (t.rows, t.cols);
    (0..c)
        .flat_map(|j| (0..r).map(move |i| (i, j)))
        .map(|(i, j)| v[i * c + j])
        .collect()
}

/// The spectrum of `Wᵀ`: left and right swap.
fn transpose_spectrum(s: &Spectrum) -> Spectrum {
    Spectrum {
        rows: s.cols,
        cols: s.rows,
        u: s.v.clone(),
        s: s.s.clone(),
        v: s.u.clone(),
    }
}

/// A NaN or Inf in a base tensor is named (the SVD would only fail to converge), and finite
/// values too large for the f32 arithmetic are refused (they give zeros and NaN, not an error).
fn check_base_values(name: &str, w0: &TensorRef<'_>, limits: &crate::limits::Limits) -> Result<()> {
    let norm = w0.checked_norm(&format!("base tensor `{name}`"))?;
    if norm > limits.max_norm {
        crate::bail!(
            Limit,
            "base tensor `{name}` has a Frobenius norm of {norm:.3e}, over the limit of {:e} (max_norm): values this large overflow the screen's f32 arithmetic",
            limits.max_norm
        );
    }
    Ok(())
}

fn thread_pool(threads: usize, name: &'static str) -> Result<rayon::ThreadPool> {
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .thread_name(move |i| format!("{name}-{i}"))
        .build()
        .map_err(|e| Error::new(ErrorKind::Internal, format!("thread pool: {e}")))
}
