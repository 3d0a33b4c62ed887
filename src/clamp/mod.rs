//! The paper's intervention: scale intruder singular values by λ and hand the result back as a
//! LoRA adapter (docs/design.md, "The quantity").
//!
//! For the clamped set J of a module, `ΔW'' = s·B·A + (λ − 1)·Σ_{j∈J} σ'_j u'_j v'_jᵀ`, with
//! `u'_j = [U0 P_B]·x_j` and `v'_j = [V0 P_A]·y_j` lifted from the Brand solution (no SVD of `W'`).
//!
//! **Scale convention.** Every clamped module has scale 1 (`lora_alpha = r` per module): the
//! module's own scale is folded into B, so `B'' = [s·B, (λ−1)σ'_j u'_j …]` and
//! `A'' = [A; v'_jᵀ …]`. Both blocks keep the magnitudes of the input (unit vectors on A's side,
//! σ-sized columns on B's), and a server that ignores `rank_pattern` / `alpha_pattern` (vLLM reads
//! only `r` and `lora_alpha`) still applies the right scale, because it is 1 everywhere.

use crate::adapter::{self, Adapter, LoraModule};
use crate::error::{Error, ErrorKind, Result};
use crate::gate::{Gate, ModuleSolution, Solutions};

mod verify;
use crate::report::Report;
use crate::tensor::{DType, TensorRef};
use faer::Mat;
use serde::Serialize;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
pub use verify::{verify, DirectionCheck, ModuleVerification, Verification};

/// Which intruders of a module are clamped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Target {
    /// Every intruder in the top k (PEFT's `reduce_intruder_dimension`).
    All,
    /// The highest-ranked intruder of each module (the paper's experiments).
    Top1,
}

/// How `ΔW''` is returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum ClampMode {
    /// Exactly, as a LoRA of rank r + m (m = directions clamped in that module).
    Exact,
    /// Its best rank-r approximation (what PEFT does), with the truncation error reported.
    RankPreserving,
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct ClampOptions {
    /// Factor applied to each clamped singular value; 1 changes nothing, 0 removes the direction.
    pub lambda: f64,
    pub target: Target,
    pub mode: ClampMode,
}

impl Default for ClampOptions {
    /// λ = 0.75 and every intruder, as PEFT; exact, so nothing but the intruders changes.
    fn default() -> Self {
        ClampOptions {
            lambda: 0.75,
            target: Target::All,
            mode: ClampMode::Exact,
        }
    }
}

impl ClampOptions {
    pub fn validate(&self) -> Result<()> {
        if !(self.lambda.is_finite() && self.lambda >= 0.0) {
            crate::bail!(
                InvalidArgument,
                "lambda must be finite and at least 0, got {}",
                self.lambda
            );
        }
        Ok(())
    }
}

/// One singular direction of `W'` that was scaled.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ClampedDirection {
    /// Position among the top k of `W'` (0 = largest).
    pub index: usize,
    /// `σ'_j` before the clamp.
    pub sigma: f64,
    pub max_cos: f64,
}

/// The error of a rank-preserving truncation `ΔW'' → ΔW''_r`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Truncation {
    /// `‖ΔW'' − ΔW''_r‖_F / ‖ΔW''‖_F`.
    pub relative: f64,
    /// `‖ΔW'' − ΔW''_r‖_F`: by Weyl, no singular value of `W''` moves by more.
    pub absolute: f64,
}

/// One module of a clamped adapter: `ΔW'' = B·A` (scale 1).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ClampedModule {
    pub name: String,
    pub base_tensor: String,
    pub out_features: usize,
    pub in_features: usize,
    pub rank: usize,
    /// `[rank, in]`, row-major.
    #[serde(skip)]
    pub a: Vec<f32>,
    /// `[out, rank]`, row-major.
    #[serde(skip)]
    pub b: Vec<f32>,
    pub clamped: Vec<ClampedDirection>,
    /// Rank-preserving mode, modules with clamped directions only.
    pub truncation: Option<Truncation>,
}

impl ClampedModule {
    /// Always 1 (see the module docs); `lora_alpha` is therefore `rank`.
    pub const SCALE: f64 = 1.0;
}

#[derive(Debug, Clone, Serialize)]
pub struct ClampedAdapter {
    pub name: String,
    pub options: ClampOptions,
    /// The input's dtype: what [`ClampedAdapter::write_peft`] writes unless told otherwise.
    #[serde(skip)]
    pub dtype: DType,
    pub fan_in_fan_out: bool,
    /// The input directory, whose `adapter_config.json` fields the written config keeps.
    #[serde(skip)]
    pub source: Option<PathBuf>,
    /// Sorted by name; every module of the input, clamped or not.
    pub modules: Vec<ClampedModule>,
}

impl ClampedAdapter {
    pub fn module(&self, name: &str) -> Option<&ClampedModule> {
        self.modules.iter().find(|m| m.name == name)
    }

    /// Number of directions clamped over all modules.
    pub fn clamped_directions(&self) -> usize {
        self.modules.iter().map(|m| m.clamped.len()).sum()
    }

    /// The adapter as it would be written: factors rounded to `dtype` and, with `pad_rank_to`,
    /// padded with zero rows of A / columns of B (which change nothing) to that rank.
    pub fn to_adapter(&self, dtype: DType, pad_rank_to: Option<usize>) -> Result<Adapter> {
        let limits = crate::limits::Limits::default();
        check_pad_rank(pad_rank_to, &limits)?;
        let modules = self
            .modules
            .iter()
            .map(|m| {
                let rank = match pad_rank_to {
                    Some(n) if n < m.rank => crate::bail!(
                        InvalidArgument,
                        "module {}: rank {} does not fit in a padded rank of {n}",
                        m.name,
                        m.rank
                    ),
                    Some(n) => n,
                    None => m.rank,
                };
                let mut a = round_to(&m.a, dtype);
                a.resize(rank * m.in_features, 0.0);
                let b_in = round_to(&m.b, dtype);
                let mut b = vec![0.0; m.out_features * rank];
                for (row, src) in b.chunks_mut(rank).zip(b_in.chunks(m.rank)) {
                    row[..m.rank].copy_from_slice(src);
                }
                Ok(LoraModule {
                    name: m.name.clone(),
                    rank,
                    in_features: m.in_features,
                    out_features: m.out_features,
                    a,
                    b,
                    alpha: rank as f64 * ClampedModule::SCALE,
                    scale: ClampedModule::SCALE,
                    dtype,
                    magnitude: None,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let mut adapter = Adapter::from_modules(&self.name, modules, &limits)?;
        adapter.fan_in_fan_out = self.fan_in_fan_out;
        Ok(adapter)
    }

    /// Writes a PEFT adapter directory (see [`adapter::write_peft_dir`]) in `dtype` (default: the
    /// input's), optionally padded to a fixed rank for servers with a `max_lora_rank`.
    pub fn write_peft(
        &self,
        dir: &Path,
        dtype: Option<DType>,
        pad_rank_to: Option<usize>,
    ) -> Result<()> {
        let adapter = self.to_adapter(dtype.unwrap_or(self.dtype), pad_rank_to)?;
        adapter::write_peft_dir(dir, &adapter, self.source.as_deref(), &self.provenance())
    }

    /// What [`ClampedAdapter::write_peft`] records in the safetensors metadata: the tool and the
    /// clamp (options, and per module the directions clamped and any truncation error).
    pub fn provenance(&self) -> serde_json::Value {
        serde_json::json!({
            "tool": adapter::TOOL,
            "clamp": self,
        })
    }

    /// `out = W0 + ΔW''` for one module, in the stored base tensor's layout (`[in, out]` when
    /// `fan_in_fan_out`): for servers that merge instead of running a LoRA.
    pub fn merge_into(&self, module: &str, base: &TensorRef<'_>, out: &mut [f32]) -> Result<()> {
        let Some(m) = self.module(module) else {
            crate::bail!(
                InvalidArgument,
                "the clamped adapter has no module {module}"
            );
        };
        let stored = if self.fan_in_fan_out {
            (m.in_features, m.out_features)
        } else {
            (m.out_features, m.in_features)
        };
        if (base.rows, base.cols) != stored || out.len() != base.len() {
            crate::bail!(
                Shape,
                "module {module}: base is [{}, {}] with an output of {} values; expected [{}, {}]",
                base.rows,
                base.cols,
                out.len(),
                stored.0,
                stored.1
            );
        }
        let bm = faer::MatRef::from_row_major_slice(&m.b, m.out_features, m.rank);
        let am = faer::MatRef::from_row_major_slice(&m.a, m.rank, m.in_features);
        let delta = bm * am;
        let w0 = base.to_f32();
        for (idx, (o, w)) in out.iter_mut().zip(&w0).enumerate() {
            let (i, j) = (idx / base.cols, idx % base.cols);
            let d = if self.fan_in_fan_out {
                delta[(j, i)]
            } else {
                delta[(i, j)]
            };
            *o = w + d;
        }
        Ok(())
    }
}

/// A padded rank must be within the rank limit, checked before padded factors of that size are
/// allocated (a rank of 2^40 would abort the process on allocation).
pub fn check_pad_rank(pad_rank_to: Option<usize>, limits: &crate::limits::Limits) -> Result<()> {
    match pad_rank_to {
        Some(n) if n > limits.max_rank => crate::bail!(
            Limit,
            "pad_rank_to {n} is over the rank limit of {} (max_rank)",
            limits.max_rank
        ),
        _ => Ok(()),
    }
}

/// What f32 values become once stored as `dtype` and read back.
fn round_to(v: &[f32], dtype: DType) -> Vec<f32> {
    match dtype {
        DType::F32 | DType::F64 => v.to_vec(),
        DType::F16 => v.iter().map(|&x| half::f16::from_f32(x).to_f32()).collect(),
        DType::BF16 => v
            .iter()
            .map(|&x| half::bf16::from_f32(x).to_f32())
            .collect(),
    }
}

/// Clamps the intruders `report` found in `adapter` (the report of screening this adapter on
/// this gate). Every module is returned, unclamped ones with their factors unchanged (scale
/// folded into B). For a caller that holds only the report: the Brand solution is recomputed per
/// module (base spectra from the gate's cache). One that screens in order to clamp calls
/// [`Gate::screen_with_solutions`] and [`clamp_solved`] instead, and solves each module once.
pub fn clamp(
    gate: &Gate,
    adapter: &Adapter,
    report: &Report,
    opts: &ClampOptions,
) -> Result<ClampedAdapter> {
    opts.validate()?;
    // Before anything else: the refusal names DoRA, not a symptom of it.
    crate::gate::refuse_dora(adapter)?;
    let targets = targets(adapter, report, opts.target)?;
    let k = gate.config().top_k;
    let solutions = gate
        .solve_modules(adapter, &|_: &str| k + 1)?
        .iter()
        .map(|s| {
            let lora = module(adapter, s.module())?;
            Ok((s.module().to_string(), s.keep(lora, &targets[s.module()])))
        })
        .collect::<Result<Solutions>>()?;
    assemble(adapter, &solutions, &targets, opts)
}

/// [`clamp`] from the Brand solutions kept by the screening that made `report`
/// ([`Gate::screen_with_solutions`]): no base spectrum is fetched and nothing is solved again,
/// and the result is the same. The solutions must be that screening's: each module's solved
/// spectrum must equal the report's, its intruders must have been lifted, and its factors must be
/// `adapter`'s (checked by fingerprint), else `InvalidArgument`. A dense-method screening keeps
/// no solutions; clamp its report with [`clamp`].
pub fn clamp_solved(
    adapter: &Adapter,
    report: &Report,
    solutions: &Solutions,
    opts: &ClampOptions,
) -> Result<ClampedAdapter> {
    opts.validate()?;
    crate::gate::refuse_dora(adapter)?;
    let targets = targets(adapter, report, opts.target)?;
    let mismatch = |why: String| {
        Error::new(
            ErrorKind::InvalidArgument,
            format!(
                "the solutions are not those of this screening of adapter {}: {why}",
                adapter.name
            ),
        )
    };
    if solutions.len() != report.modules.len() {
        return Err(mismatch(format!(
            "{} modules solved, {} screened (a dense-method screening keeps none: use clamp)",
            solutions.len(),
            report.modules.len()
        )));
    }
    for m in &report.modules {
        let s = solutions
            .get(&m.module)
            .ok_or_else(|| mismatch(format!("no solution for module {}", m.module)))?;
        let n = m.singular_values.len();
        let same = s.base_tensor() == m.base_tensor
            && s.sigma().get(..n) == Some(&m.singular_values[..])
            && s.max_cos().get(..m.max_cos.len()) == Some(&m.max_cos[..])
            && m.intruders.iter().all(|j| s.lifted().any(|l| l == *j));
        if !same {
            return Err(mismatch(format!(
                "module {} was solved differently",
                m.module
            )));
        }
        if !s.solves(module(adapter, &m.module)?) {
            return Err(mismatch(format!(
                "module {} has other factors than the ones solved",
                m.module
            )));
        }
    }
    assemble(adapter, solutions, &targets, opts)
}

/// The clamped adapter from one solution per module (in module-name order).
fn assemble(
    adapter: &Adapter,
    solutions: &Solutions,
    targets: &BTreeMap<String, Vec<usize>>,
    opts: &ClampOptions,
) -> Result<ClampedAdapter> {
    let modules = solutions
        .iter()
        .map(|(name, s)| clamp_module(module(adapter, name)?, s, &targets[name], opts))
        .collect::<Result<Vec<_>>>()?;
    Ok(ClampedAdapter {
        name: adapter.name.clone(),
        options: *opts,
        dtype: adapter.modules[0].dtype,
        fan_in_fan_out: adapter.fan_in_fan_out,
        source: adapter.path.clone(),
        modules,
    })
}

pub(super) fn module<'a>(adapter: &'a Adapter, name: &str) -> Result<&'a LoraModule> {
    adapter
        .modules
        .iter()
        .find(|m| m.name == name)
        .ok_or_else(|| {
            Error::new(
                ErrorKind::InvalidArgument,
                format!("adapter {} has no module {name}", adapter.name),
            )
        })
}

/// Module name → indices to clamp, after checking that the report describes this adapter.
fn targets(
    adapter: &Adapter,
    report: &Report,
    target: Target,
) -> Result<BTreeMap<String, Vec<usize>>> {
    let mismatch = |why: String| {
        Error::new(
            ErrorKind::InvalidArgument,
            format!(
                "the report does not describe adapter {}: {why}",
                adapter.name
            ),
        )
    };
    if report.modules.len() != adapter.modules.len() {
        return Err(mismatch(format!(
            "{} modules screened, {} in the adapter",
            report.modules.len(),
            adapter.modules.len()
        )));
    }
    let mut out = BTreeMap::new();
    for m in &report.modules {
        let Some(lora) = adapter.modules.iter().find(|l| l.name == m.module) else {
            return Err(mismatch(format!("no module {}", m.module)));
        };
        if m.rank != lora.rank || m.shape != [lora.out_features, lora.in_features] {
            return Err(mismatch(format!("module {} differs in shape", m.module)));
        }
        let idx = match target {
            Target::All => m.intruders.clone(),
            Target::Top1 => m.intruders.iter().copied().min().into_iter().collect(),
        };
        out.insert(m.module.clone(), idx);
    }
    Ok(out)
}

fn clamp_module(
    lora: &LoraModule,
    s: &ModuleSolution,
    dirs: &[usize],
    opts: &ClampOptions,
) -> Result<ClampedModule> {
    let (out, inn, r) = (lora.out_features, lora.in_features, lora.rank);
    let sigma = s.sigma();
    if let Some(&j) = dirs.iter().find(|&&j| j >= sigma.len()) {
        crate::bail!(
            InvalidArgument,
            "module {}: the report names direction {j}, but only {} were solved",
            lora.name,
            sigma.len()
        );
    }
    let max_cos = s.max_cos();
    let m = dirs.len();
    // L = B'' (out × (r+m)), R = A''ᵀ (in × (r+m)).
    let mut l = Mat::<f64>::from_fn(out, r + m, |i, c| {
        if c < r {
            lora.scale * lora.b[i * r + c] as f64
        } else {
            0.0
        }
    });
    let mut rt = Mat::<f64>::from_fn(inn, r + m, |i, c| {
        if c < r {
            lora.a[c * inn + i] as f64
        } else {
            0.0
        }
    });
    for (c, &j) in dirs.iter().enumerate() {
        let (u, v) = s.singular_vectors(j).ok_or_else(|| {
            Error::new(
                ErrorKind::InvalidArgument,
                format!(
                    "module {}: direction {j} is not among the solution's lifted ones",
                    lora.name
                ),
            )
        })?;
        let w = (opts.lambda - 1.0) * sigma[j];
        for (i, x) in u.iter().enumerate() {
            l[(i, r + c)] = w * x;
        }
        for (i, x) in v.iter().enumerate() {
            rt[(i, r + c)] = *x;
        }
    }
    let truncation = if m > 0 && opts.mode == ClampMode::RankPreserving {
        let (lr, rr, t) = best_rank(&l, &rt, r)?;
        (l, rt) = (lr, rr);
        Some(t)
    } else {
        None
    };
    fit_dtype(&mut l, &mut rt, &lora.name, lora.dtype)?;
    let rank = l.ncols();
    Ok(ClampedModule {
        name: lora.name.clone(),
        base_tensor: s.base_tensor().to_string(),
        out_features: out,
        in_features: inn,
        rank,
        a: (0..rank)
            .flat_map(|c| (0..inn).map(move |i| (i, c)))
            .map(|(i, c)| rt[(i, c)] as f32)
            .collect(),
        b: (0..out)
            .flat_map(|i| (0..rank).map(move |c| (i, c)))
            .map(|(i, c)| l[(i, c)] as f32)
            .collect(),
        clamped: dirs
            .iter()
            .map(|&j| ClampedDirection {
                index: j,
                sigma: sigma[j],
                max_cos: max_cos[j],
            })
            .collect(),
        truncation,
    })
}

/// Makes every factor value representable in `dtype` (the module's own, which a written
/// adapter keeps) without changing `L·Rᵀ`. A column pair whose values leave that range (a huge
/// scale folded into `B` beside a tiny `A`: the product is within `max_norm`, the factor is
/// not) makes every column pair rebalanced to equal norms, which puts each side at the square
/// root of its product's size; factors already in range stay exactly as assembled. What still
/// does not fit is an error, never an infinity in the factors.
fn fit_dtype(l: &mut Mat<f64>, rt: &mut Mat<f64>, module: &str, dtype: DType) -> Result<()> {
    let largest = match dtype {
        DType::F16 => f64::from(half::f16::MAX),
        DType::BF16 => f64::from(half::bf16::MAX),
        DType::F32 | DType::F64 => f64::from(f32::MAX),
    };
    // Headroom for the rounding of the conversion.
    let range = largest / 16.0;
    let peak = |m: &Mat<f64>, c: usize| m.col(c).iter().fold(0.0f64, |p, x| p.max(x.abs()));
    if (0..l.ncols()).all(|c| peak(l, c) <= range && peak(rt, c) <= range) {
        return Ok(());
    }
    // Every column, so that ‖B''‖_F·‖A''‖_F (the gate's bound on the update) is the sum of the
    // columns' products and the clamped adapter passes `max_norm` like its source.
    for c in 0..l.ncols() {
        let (nl, nr) = (l.col(c).norm_l2(), rt.col(c).norm_l2());
        if nl > 0.0 && nr > 0.0 && nl.is_finite() && nr.is_finite() {
            let k = (nr / nl).sqrt();
            l.col_mut(c).iter_mut().for_each(|x| *x *= k);
            rt.col_mut(c).iter_mut().for_each(|x| *x /= k);
        }
        if peak(l, c) > range || peak(rt, c) > range {
            crate::bail!(
                Limit,
                "module {module}: the clamped factors do not fit {dtype:?} (a column of B''·A''ᵀ of size {:.1e})",
                nl * nr
            );
        }
    }
    Ok(())
}

/// The best rank-`rank` approximation of `L·Rᵀ`, as factors (`out × rank`, `in × rank`), from
/// thin QRs of L and R and an SVD of the small core `R_L·R_Rᵀ`: never a dense out×in SVD.
/// Singular values are split evenly (√σ on each side) to keep both factors balanced.
pub fn best_rank(
    l: &Mat<f64>,
    r: &Mat<f64>,
    rank: usize,
) -> Result<(Mat<f64>, Mat<f64>, Truncation)> {
    let (ql, rl) = thin_qr(l);
    let (qr, rr) = thin_qr(r);
    let core = &rl * rr.transpose();
    let svd = core
        .thin_svd()
        .map_err(|e| Error::new(ErrorKind::Internal, format!("core SVD failed: {e:?}")))?;
    let s = svd.S().column_vector();
    let n = rank.min(s.nrows());
    let total: f64 = (0..s.nrows()).map(|i| s[i] * s[i]).sum();
    let tail: f64 = (n..s.nrows()).map(|i| s[i] * s[i]).sum();
    let half = |q: &Mat<f64>, w: faer::MatRef<'_, f64>| {
        let f = q * w.subcols(0, n);
        Mat::from_fn(q.nrows(), rank, |i, c| {
            if c < n {
                f[(i, c)] * s[c].sqrt()
            } else {
                0.0
            }
        })
    };
    Ok((
        half(&ql, svd.U()),
        half(&qr, svd.V()),
        Truncation {
            relative: if total > 0.0 {
                (tail / total).sqrt()
            } else {
                0.0
            },
            absolute: tail.sqrt(),
        },
    ))
}

fn thin_qr(m: &Mat<f64>) -> (Mat<f64>, Mat<f64>) {
    let qr = m.qr();
    (qr.compute_thin_Q(), qr.thin_R().to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Fuzz finds `crash-clamp-f16-overflow` / `crash-clamp-f32-overflow` (fuzz/corpus): a huge
    /// scale folded into B beside a tiny A gave factors past the dtype's range. The columns are
    /// then rebalanced with the product unchanged; factors in range stay bit for bit; what
    /// cannot fit is a Limit error.
    #[test]
    fn factors_past_the_dtype_range_are_rebalanced_or_refused() {
        let l0 = Mat::<f64>::from_fn(3, 2, |i, c| if c == 0 { 1e6 * (i + 1) as f64 } else { 0.5 });
        let r0 = Mat::<f64>::from_fn(
            4,
            2,
            |i, c| if c == 0 { 1e-6 * (i + 2) as f64 } else { 0.25 },
        );
        let (mut l, mut r) = (l0.clone(), r0.clone());
        fit_dtype(&mut l, &mut r, "m", DType::F16).unwrap();
        let limit = f64::from(half::f16::MAX) / 16.0;
        assert!(l
            .col(0)
            .iter()
            .chain(r.col(0).iter())
            .all(|x| x.abs() <= limit));
        let (want, got) = (&l0 * r0.transpose(), &l * r.transpose());
        for i in 0..3 {
            for j in 0..4 {
                assert!((want[(i, j)] - got[(i, j)]).abs() <= 1e-12 * want[(i, j)].abs().max(1.0));
            }
        }
        // The other column is balanced too, its product unchanged (checked above).
        assert!((l.col(1).norm_l2() - r.col(1).norm_l2()).abs() <= 1e-12);
        // In f32 the same factors fit as they are.
        let (mut l, mut r) = (l0.clone(), r0.clone());
        fit_dtype(&mut l, &mut r, "m", DType::F32).unwrap();
        assert_eq!((l, r), (l0, r0));
        // A product too large for f16 on either side.
        let mut l = Mat::<f64>::from_fn(1, 1, |_, _| 1e9);
        let mut r = Mat::<f64>::from_fn(1, 1, |_, _| 1.0);
        let e = fit_dtype(&mut l, &mut r, "m", DType::F16).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Limit);
        assert!(e.message().contains("do not fit"), "{e}");
    }
}
