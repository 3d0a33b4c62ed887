//! One module's screening: its base spectrum (through the cache), then the Brand update or the
//! dense reference (a DoRA module: the randomized solver on its operator), then its line of the
//! report.

use super::base_set::BaseSet;
use super::plan::Job;
use super::{ms, Gate};
use crate::adapter::{Adapter, LoraModule};
use crate::backend::{DeviceOperator, LowRankTerm, Spectrum};
use crate::error::Result;
use crate::report::{classify, Method, ModuleReport};
use crate::spectrum::brand::{self, BrandSolution, Update};
use crate::spectrum::cache::{Fetched, Source};
use crate::spectrum::params::SolverParams;
use crate::spectrum::randomized::{materialise, DenseOp, DoraParts, RandomizedParams};
use crate::spectrum::tuned::{self, Screened};
use crate::spectrum::{dense, Solver};
use crate::tensor::TensorRef;
use rayon::prelude::*;
use std::collections::BTreeMap;
use std::hash::Hasher;
use std::sync::Arc;
use std::time::Instant;
use twox_hash::XxHash3_64;

/// What a clamp needs of one module's Brand solution, kept from its screening: the solved
/// spectrum of `W'` and the singular vectors of the report's intruders, lifted while the base
/// spectrum was at hand. Small (`intruders × (out + in)` values), so a caller may hold it as long
/// as the report without pinning any base spectrum.
#[derive(Debug, Clone)]
pub struct ModuleSolution {
    base_tensor: String,
    sigma: Vec<f64>,
    max_cos: Vec<f64>,
    /// `(j, u'_j, v'_j)` for each lifted direction, ascending in j.
    vectors: Vec<(usize, Vec<f64>, Vec<f64>)>,
    /// [`factor_fingerprint`] of the module screened.
    factors: u64,
}

impl ModuleSolution {
    pub fn base_tensor(&self) -> &str {
        &self.base_tensor
    }

    /// The solved singular values of `W'`, descending (top k + 1).
    pub fn sigma(&self) -> &[f64] {
        &self.sigma
    }

    pub fn max_cos(&self) -> &[f64] {
        &self.max_cos
    }

    /// `u'_j` and `v'_j` in `W0`'s `[out, in]` orientation, when direction `j` was lifted.
    pub fn singular_vectors(&self, j: usize) -> Option<(&[f64], &[f64])> {
        self.vectors
            .iter()
            .find(|v| v.0 == j)
            .map(|(_, u, v)| (u.as_slice(), v.as_slice()))
    }

    /// The directions whose vectors were lifted.
    pub fn lifted(&self) -> impl Iterator<Item = usize> + '_ {
        self.vectors.iter().map(|v| v.0)
    }

    /// Whether `lora` is the module that was solved (same shape, scale and factor bits).
    pub fn solves(&self, lora: &LoraModule) -> bool {
        self.factors == factor_fingerprint(lora)
    }
}

/// The Brand solutions of one screening, module name → solution (see
/// [`Gate::screen_with_solutions`]). Empty when the screening used the dense method.
pub type Solutions = BTreeMap<String, ModuleSolution>;

/// xxh3 of a module's shape, scale and factor bits: ties a kept solution to the factors it solved,
/// at the cost of reading them once.
fn factor_fingerprint(lora: &LoraModule) -> u64 {
    let mut h = XxHash3_64::new();
    for n in [lora.rank, lora.out_features, lora.in_features] {
        h.write(&(n as u64).to_le_bytes());
    }
    h.write(&lora.scale.to_bits().to_le_bytes());
    h.write(bytemuck::cast_slice(&lora.a));
    h.write(bytemuck::cast_slice(&lora.b));
    h.finish()
}

/// One module's line of the report, its warning, and its kept solution (see [`Gate::run`]).
pub(super) type ModuleRun = (ModuleReport, Option<String>, Option<ModuleSolution>);

/// One module's Brand solution, with the base spectrum in `W0`'s `[out, in]` orientation (what
/// [`BrandSolution::singular_vectors`] lifts into).
pub(crate) struct Solved {
    pub(super) module: String,
    pub(super) base_tensor: String,
    pub(super) sol: BrandSolution,
    pub(super) base: Arc<Spectrum>,
    pub(super) source: Source,
    pub(super) warning: Option<String>,
}

impl Solved {
    pub(crate) fn module(&self) -> &str {
        &self.module
    }

    /// The solved singular values of `W'`, descending.
    pub(crate) fn sigma(&self) -> &[f64] {
        &self.sol.triplets.sigma
    }

    pub(crate) fn max_cos(&self) -> Vec<f64> {
        self.sol.max_cos()
    }

    /// `u'_j` (out) and `v'_j` (in), lifted to `W0`'s `[out, in]` orientation.
    pub(crate) fn singular_vectors(&self, j: usize) -> (Vec<f64>, Vec<f64>) {
        self.sol.singular_vectors(&self.base, j)
    }

    /// `u'_jᵀ W0 v'_j`.
    pub(crate) fn base_rayleigh(&self, j: usize) -> f64 {
        self.sol.base_rayleigh(&self.base, j)
    }

    /// What a clamp of `lora` (the module solved) along `dirs` needs, without the base spectrum.
    /// Directions past the solved ones are left out (the clamp names them as missing).
    pub(crate) fn keep(&self, lora: &LoraModule, dirs: &[usize]) -> ModuleSolution {
        let mut dirs: Vec<usize> = dirs
            .iter()
            .copied()
            .filter(|&j| j < self.sigma().len())
            .collect();
        dirs.sort_unstable();
        dirs.dedup();
        ModuleSolution {
            base_tensor: self.base_tensor.clone(),
            sigma: self.sigma().to_vec(),
            max_cos: self.max_cos(),
            vectors: dirs
                .into_iter()
                .map(|j| {
                    let (u, v) = self.singular_vectors(j);
                    (j, u, v)
                })
                .collect(),
            factors: factor_fingerprint(lora),
        }
    }
}

impl Gate {
    /// One module's line of the report and, with `keep` and the Brand method, what a clamp of
    /// its intruders needs (lifted here, while the base spectrum is at hand). DoRA modules keep
    /// nothing: they are screened, not clamped.
    pub(super) fn run(&self, job: &Job<'_>, keep: bool) -> Result<ModuleRun> {
        if job.lora.magnitude.is_some() {
            let (report, warning) = self.run_dora(job)?;
            return Ok((report, warning, None));
        }
        let lora = job.lora;
        let k = self.config.top_k;
        let mut timings = BTreeMap::new();
        let t = Instant::now();
        let mut kept = None;
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
                    Solver::Dense,
                    None,
                    None,
                )
            }
            Method::Brand | Method::Auto => {
                let solved = self.brand_solve(job, k + 1, &mut timings)?;
                let (mc, out) = (solved.sol.max_cos(), solved.sol.outside_base_span());
                let row = (
                    solved.sigma().to_vec(),
                    mc,
                    out,
                    solved.sol.solver,
                    Some(solved.source),
                    solved.warning.clone(),
                );
                kept = keep.then_some(solved);
                row
            }
        };
        let report = self.module_report(
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
        );
        // Every intruder of the report: both clamp targets pick among them.
        let kept = kept.map(|s| s.keep(lora, &report.intruders));
        Ok((report, warning, kept))
    }

    /// A DoRA module: `W' = m ⊙ (W0 + s·B·A) / ‖W0 + s·B·A‖_row` is not a low-rank update of
    /// `W0`, so no Brand update: the randomized solver on `W'` as an operator against the cached
    /// base spectrum (on the backend's device when it has one and the base is stored `[out, in]`),
    /// or (`Method::Dense`) the f64 SVDs of `W0` and the materialised `W'`.
    fn run_dora(&self, job: &Job<'_>) -> Result<(ModuleReport, Option<String>)> {
        let lora = job.lora;
        let magnitude = lora.magnitude.as_deref().expect("a DoRA module");
        let k = self.config.top_k;
        let (out, inn) = (lora.out_features, lora.in_features);
        let mut timings = BTreeMap::new();
        if self.config.method == Method::Dense {
            check_base_values(&job.base_tensor, &job.w0, &self.config.limits)?;
        }
        let w0 = DenseOp::from_row_major(&oriented_f64(&job.w0, job.transposed), out, inn);
        let parts = DoraParts::new(&w0, &lora.a, &lora.b, lora.rank, lora.scale, magnitude)
            .map_err(|e| e.context(format!("module {}", lora.name)))?;
        let op = parts.operator();
        let (screened, source, warning) = if self.config.method == Method::Dense {
            let t = Instant::now();
            let (w0m, w1) = (materialise(&w0), materialise(&op));
            let d = dense::compare(w0m.as_ref(), w1.as_ref(), k + 1)?;
            timings.insert("dense".into(), ms(t));
            let s = Screened {
                sigma: d.sigma,
                max_cos: d.max_cos,
                outside_base_span: d.outside_base_span,
                solver: Solver::Dense,
                detected_rank: None,
                low_rank_residual: None,
                residual: None,
            };
            (s, None, None)
        } else {
            let (base, source, warning) = self.job_base(job, &mut timings)?;
            let t = Instant::now();
            let (backend, params) = (self.backend.as_ref(), self.randomized_params());
            // On the device, when the backend has one: W0 as stored (not transposed), the
            // factors and d = m / ‖W0 + s·B·A‖_row, i.e. diag(d)·(W0 + s·B·A).
            let on_device = if job.transposed {
                None
            } else {
                let factors = DoraFactors::new(lora);
                let dora = factors.operator(lora, job.w0, &parts.row_scale);
                tuned::screen_on_device(backend, &base, &dora, k + 1, &params)?
            };
            let s = match on_device {
                Some(s) => s,
                None => tuned::screen_operator(backend, &base, &op, k + 1, &params)?,
            };
            timings.insert("update".into(), ms(t));
            (s, Some(source), warning)
        };
        let report = self.screened_report(
            lora.name.clone(),
            job.base_tensor.clone(),
            [out, inn],
            lora.rank,
            lora.scale,
            screened,
            source,
            timings,
        );
        Ok((report, warning))
    }

    /// Plans `adapter` and solves every module for its top `want(module)` triplets by the Brand
    /// update (whatever the configured method: clamping needs the Brand quantities), in parallel.
    /// The result is sorted by module name.
    pub(crate) fn solve_modules(
        &self,
        adapter: &Adapter,
        want: &(dyn Fn(&str) -> usize + Sync),
    ) -> Result<Vec<Solved>> {
        refuse_dora(adapter)?;
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
    pub(super) fn brand_solve(
        &self,
        job: &Job<'_>,
        want: usize,
        timings: &mut BTreeMap<String, f64>,
    ) -> Result<Solved> {
        let (base, source, warning) = self.job_base(job, timings)?;
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
            &self.solver_params(),
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
    pub(super) fn module_report(
        &self,
        module: String,
        base_tensor: String,
        shape: [usize; 2],
        rank: usize,
        scale: f64,
        mut sigma: Vec<f64>,
        mut max_cos: Vec<f64>,
        mut outside: Vec<f64>,
        solver: Solver,
        source: Option<Source>,
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
            solver,
            detected_rank: None,
            low_rank_residual: None,
            residual: None,
            base_spectrum: source,
            timings_ms,
        }
    }

    /// A module report from a [`Screened`] matrix (rank and scale as the module has them).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn screened_report(
        &self,
        module: String,
        base_tensor: String,
        shape: [usize; 2],
        rank: usize,
        scale: f64,
        s: Screened,
        source: Option<Source>,
        timings: BTreeMap<String, f64>,
    ) -> ModuleReport {
        let mut m = self.module_report(
            module,
            base_tensor,
            shape,
            rank,
            scale,
            s.sigma,
            s.max_cos,
            s.outside_base_span,
            s.solver,
            source,
            timings,
        );
        m.detected_rank = s.detected_rank;
        m.low_rank_residual = s.low_rank_residual;
        m.residual = s.residual;
        m
    }

    /// The randomized solver's settings: the Brand solver's tolerance, the configured seed.
    pub(super) fn randomized_params(&self) -> RandomizedParams {
        RandomizedParams {
            tol: self.config.krylov_tolerance,
            seed: self.config.seed,
            ..RandomizedParams::default()
        }
    }

    pub(super) fn solver_params(&self) -> SolverParams {
        SolverParams::for_screening(self.config.top_k, self.config.krylov_tolerance)
    }

    /// The base spectrum of one stored base tensor (its own orientation), via the cache.
    pub(super) fn base_spectrum(
        &self,
        base: &BaseSet,
        name: &str,
        w0: &TensorRef<'_>,
    ) -> Result<Fetched> {
        let key = self.key(base, name, w0);
        let started = Instant::now();
        let computed = self.cache.get_or_compute(&key, w0, || {
            check_base_values(name, w0, &self.config.limits)?;
            self.off_pool(|| self.backend.thin_svd(&w0.to_f32(), w0.rows, w0.cols))
        });
        // Fingerprinting and computing read the whole tensor; its pages need not stay resident.
        base.release(name);
        let fetched = computed?;
        let source = fetched.source;
        self.metrics.record_cache(source);
        if matches!(source, Source::Computed | Source::RebuiltCorrupt) {
            self.metrics
                .record_spectrum_compute(started.elapsed().as_secs_f64());
        }
        Ok(fetched)
    }

    /// The job's base spectrum in the adapter's orientation, timed as `base_spectrum`.
    fn job_base(
        &self,
        job: &Job<'_>,
        timings: &mut BTreeMap<String, f64>,
    ) -> Result<(Arc<Spectrum>, Source, Option<String>)> {
        let t = Instant::now();
        let (spectrum, source, warning) = self.fetch_base(job.base, &job.base_tensor, &job.w0)?;
        timings.insert("base_spectrum".into(), ms(t));
        let base = if job.transposed {
            Arc::new(transpose_spectrum(&spectrum))
        } else {
            spectrum
        };
        Ok((base, source, warning))
    }

    /// [`Gate::base_spectrum`] with what went wrong on the way (a rebuilt entry, a spectrum that
    /// could not be written) as one report warning.
    pub(super) fn fetch_base(
        &self,
        base: &BaseSet,
        name: &str,
        w0: &TensorRef<'_>,
    ) -> Result<(Arc<Spectrum>, Source, Option<String>)> {
        let fetched = self.base_spectrum(base, name, w0)?;
        let warning = [fetched.rebuilt, fetched.not_written]
            .into_iter()
            .flatten()
            .map(|w| format!("base tensor `{name}`: {w}"))
            .reduce(|a, b| format!("{a}; {b}"));
        Ok((fetched.spectrum, fetched.source, warning))
    }

    /// Runs `f` (a base-spectrum computation, called while holding that spectrum's cache flight)
    /// on the compute pool, from a plain thread. Run on the screening pool, the SVD's fork/join
    /// would let this thread steal other screening jobs while it waits; one of them for the same
    /// base tensor (another caller's adapter) then blocks on the flight this thread holds, and
    /// the gate deadlocks. A plain thread blocked in `install` steals nothing.
    pub(super) fn off_pool<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        std::thread::scope(|s| {
            s.spawn(|| self.compute_pool.install(f))
                .join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
        })
    }
}

/// `W0` as row-major f64 in `[out, in]` layout.
pub(super) fn oriented_f64(t: &TensorRef<'_>, transposed: bool) -> Vec<f64> {
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

/// A DoRA module's factors in f64, for its device operator.
struct DoraFactors {
    b: Vec<f64>,
    a: Vec<f64>,
}

impl DoraFactors {
    fn new(lora: &LoraModule) -> DoraFactors {
        let f64s = |v: &[f32]| v.iter().map(|&x| f64::from(x)).collect();
        DoraFactors {
            b: f64s(&lora.b),
            a: f64s(&lora.a),
        }
    }

    /// `W' = diag(d)·(W0 + s·B·A)` for the base `w0` stored `[out, in]` and `d = m / ‖W0 +
    /// s·B·A‖_row` ([`DoraParts::row_scale`]).
    fn operator<'a>(
        &'a self,
        lora: &LoraModule,
        w0: TensorRef<'a>,
        row_scale: &'a [f64],
    ) -> DeviceOperator<'a> {
        DeviceOperator {
            rows: lora.out_features,
            cols: lora.in_features,
            dense: vec![(1.0, w0)],
            low_rank: Some(LowRankTerm {
                b: &self.b,
                a: &self.a,
                rank: lora.rank,
                scale: lora.scale,
            }),
            row_scale: Some(row_scale),
        }
    }
}

/// Clamping needs the Brand quantities of `W0 + s·B·A`; a DoRA module's weight is not that.
pub(crate) fn refuse_dora(adapter: &Adapter) -> Result<()> {
    match adapter.modules.iter().find(|m| m.magnitude.is_some()) {
        Some(m) => crate::bail!(
            Unsupported,
            "adapter {}: module {} is DoRA; DoRA adapters are screened but not clamped (see README, \"DoRA\")",
            adapter.name,
            m.name
        ),
        None => Ok(()),
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

/// DoRA's device operator as `run_dora` builds it, solved on the host models of every CUDA call,
/// against the dense f64 SVD of the materialised `W'` (PEFT's definition, `DoraOp`).
#[cfg(all(test, feature = "cuda"))]
mod tests {
    use super::*;
    use crate::backend::cuda::HostModelBackend;
    use crate::spectrum::device;
    use crate::spectrum::randomized::gaussian_block;
    use crate::tensor::{encode, DType};

    #[test]
    fn dora_on_the_device_path_equals_the_dense_svd_of_the_materialised_weight() {
        let (out, inn, r, k) = (90, 130, 4, 6);
        // A decaying base, Σ 0.7^t g_t h_tᵀ: well-separated top singular values.
        let (g, h) = (gaussian_block(out, 30, 1), gaussian_block(inn, 30, 2));
        let w0f: Vec<f32> = (0..out * inn)
            .map(|ij| {
                let (i, j) = (ij / inn, ij % inn);
                (0..30)
                    .map(|t| 0.7f64.powi(t) * g[(i, t as usize)] * h[(j, t as usize)])
                    .sum::<f64>() as f32
            })
            .collect();
        let (ga, gb) = (gaussian_block(r, inn, 3), gaussian_block(out, r, 4));
        for dtype in [DType::F32, DType::BF16] {
            let bytes = encode(&w0f, dtype);
            let w0 = TensorRef::new(dtype, out, inn, &bytes).unwrap();
            let base = DenseOp::from_row_major(&w0.to_f64(), out, inn);
            let mut lora = LoraModule {
                name: "m".into(),
                rank: r,
                in_features: inn,
                out_features: out,
                a: (0..r * inn)
                    .map(|t| ga[(t / inn, t % inn)] as f32)
                    .collect(),
                b: (0..out * r)
                    .map(|t| 0.5 * gb[(t / r, t % r)] as f32)
                    .collect(),
                alpha: 8.0,
                scale: 2.0,
                dtype: DType::F32,
                magnitude: None,
            };
            // As PEFT initialises it (the row norms of W0 + s·B·A), then perturbed so that the
            // rescaling changes the spectrum.
            let ones = vec![1.0f32; out];
            let norms = DoraParts::new(&base, &lora.a, &lora.b, r, lora.scale, &ones)
                .unwrap()
                .row_scale;
            let magnitude: Vec<f32> = (0..out)
                .map(|i| ((1.0 + 0.4 * (i % 5) as f64) / norms[i]) as f32)
                .collect();
            lora.magnitude = Some(magnitude.clone());
            let parts = DoraParts::new(&base, &lora.a, &lora.b, r, lora.scale, &magnitude).unwrap();
            let factors = DoraFactors::new(&lora);
            let op = factors.operator(&lora, w0, &parts.row_scale);
            let got = device::top_k(&HostModelBackend, &op, k, &RandomizedParams::default())
                .unwrap()
                .expect("converged on the device path");
            let want = materialise(&parts.operator()).thin_svd().unwrap();
            let s = want.S().column_vector();
            for j in 0..k {
                assert!(
                    (got.triplets.sigma[j] - s[j]).abs() <= 1e-9 * s[0],
                    "{dtype:?} σ{j}: {} vs {}",
                    got.triplets.sigma[j],
                    s[j]
                );
                let cos = |x: faer::ColRef<'_, f64>, y: faer::ColRef<'_, f64>| {
                    (0..x.nrows()).map(|i| x[i] * y[i]).sum::<f64>().abs()
                };
                let (cu, cv) = (
                    cos(got.triplets.x.col(j), want.U().col(j)),
                    cos(got.triplets.y.col(j), want.V().col(j)),
                );
                assert!(
                    cu > 1.0 - 1e-8 && cv > 1.0 - 1e-8,
                    "{dtype:?} {j}: |cos| {cu} {cv}"
                );
            }
        }
    }
}
