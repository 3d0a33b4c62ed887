//! `clamp --verify`: re-screen the written adapter and check, module by module, that each clamped
//! singular value became λσ'_j, that the other top-k triplets did not move, and that the intruder
//! count did not grow.

use super::{module, ClampedAdapter, ClampedModule};
use crate::adapter::{Adapter, LoraModule};
use crate::error::{Error, ErrorKind, Result};
use crate::gate::{Gate, Solved};
use crate::tensor::DType;
use serde::Serialize;
use std::fmt;

/// The outcome of [`verify`].
#[derive(Debug, Clone, Serialize)]
pub struct Verification {
    pub passed: bool,
    /// Relative tolerance used (by the candidate's dtype; loosened by the truncation error in
    /// rank-preserving mode).
    pub tolerance: f64,
    pub modules: Vec<ModuleVerification>,
}

#[derive(Debug, Clone, Serialize)]
pub struct DirectionCheck {
    pub index: usize,
    pub sigma_before: f64,
    /// `u'_jᵀ W'' v'_j`, which the clamp makes `λ·σ'_j`.
    pub sigma_after: f64,
    /// `|sigma_after / sigma_before − λ|`.
    pub factor_error: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct ModuleVerification {
    pub module: String,
    pub clamped: Vec<DirectionCheck>,
    /// Largest relative difference between the re-screened top-k singular values and the
    /// expected ones (the old spectrum with the clamped values scaled, re-sorted).
    pub sigma_error: f64,
    /// Largest change of max|cos| among matched, untied triplets (exact mode only).
    pub max_cos_error: Option<f64>,
    pub intruders_before: usize,
    pub intruders_after: usize,
    pub passed: bool,
}

/// max|cos| may drift by this much between two Brand solves of the same vector (at f32; rounding
/// the factors to a half-precision dtype moves the vectors by about that dtype's tolerance).
const COS_TOLERANCE: f64 = 1e-3;

/// Re-screens `candidate` (the clamped adapter as written, or [`ClampedAdapter::to_adapter`])
/// against `original` and checks, module by module, that each clamped singular value became
/// λ times itself, that every other top-k triplet is unchanged, and that the intruder count
/// at ε did not grow.
pub fn verify(
    gate: &Gate,
    original: &Adapter,
    clamped: &ClampedAdapter,
    candidate: &Adapter,
) -> Result<Verification> {
    let (k, eps) = (gate.config().top_k, gate.config().epsilon);
    let m_of = |name: &str| clamped.module(name).map_or(0, |m| m.clamped.len());
    let want = |name: &str| k + m_of(name) + 1;
    let old = gate.solve_modules(original, &want)?;
    let new = gate.solve_modules(candidate, &want)?;
    if old.len() != new.len() || old.iter().zip(&new).any(|(a, b)| a.module() != b.module()) {
        crate::bail!(
            InvalidArgument,
            "the candidate adapter's modules differ from the original's"
        );
    }
    let tolerance = candidate
        .modules
        .iter()
        .map(|m| dtype_tolerance(m.dtype))
        .fold(0.0, f64::max);
    let modules = old
        .iter()
        .zip(&new)
        .map(|(o, n)| {
            let c = module(candidate, o.module())?;
            let cm = clamped.module(o.module()).ok_or_else(|| {
                Error::new(
                    ErrorKind::InvalidArgument,
                    format!("the clamped adapter has no module {}", o.module()),
                )
            })?;
            Ok(verify_module(
                o,
                n,
                c,
                cm,
                clamped.options.lambda,
                k,
                eps,
                gate.config().tie_tolerance,
                tolerance,
            ))
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(Verification {
        passed: modules.iter().all(|m| m.passed),
        tolerance,
        modules,
    })
}

/// Rounding a factor to the dtype perturbs singular values by about this much, relatively.
fn dtype_tolerance(dtype: DType) -> f64 {
    match dtype {
        DType::F32 | DType::F64 => 1e-4,
        DType::F16 => 4e-3,
        DType::BF16 => 3e-2,
    }
}

#[allow(clippy::too_many_arguments)]
fn verify_module(
    old: &Solved,
    new: &Solved,
    cand: &LoraModule,
    cm: &ClampedModule,
    lambda: f64,
    k: usize,
    eps: f64,
    tie_tolerance: f64,
    tol: f64,
) -> ModuleVerification {
    let (s_old, c_old) = (old.sigma(), old.max_cos());
    let (s_new, c_new) = (new.sigma(), new.max_cos());
    let slack = cm.truncation.map_or(0.0, |t| t.absolute);
    let dirs: Vec<usize> = cm.clamped.iter().map(|d| d.index).collect();
    let mut expected: Vec<(f64, f64)> = (0..s_old.len())
        .map(|i| {
            let f = if dirs.contains(&i) { lambda } else { 1.0 };
            (f * s_old[i], c_old[i])
        })
        .collect();
    expected.sort_by(|a, b| b.0.total_cmp(&a.0));
    let top = s_old.first().copied().unwrap_or(0.0);
    let n = k.min(expected.len()).min(s_new.len());
    let mut sigma_error: f64 = 0.0;
    let mut cos_error: f64 = 0.0;
    let mut ok = true;
    let close = |a: f64, b: f64| (a - b).abs() <= tie_tolerance * a.abs().max(b.abs());
    for i in 0..n {
        let (se, ce) = expected[i];
        let d = (s_new[i] - se).abs();
        sigma_error = sigma_error.max(d / se.max(1e-6 * top));
        ok &= d <= tol * se.max(1e-6 * top) + slack;
        let tied = (i > 0 && close(expected[i - 1].0, se))
            || (i + 1 < expected.len() && close(se, expected[i + 1].0));
        if !tied {
            cos_error = cos_error.max((c_new[i] - ce).abs());
        }
    }
    let exact = cm.truncation.is_none();
    if exact {
        ok &= cos_error <= COS_TOLERANCE.max(tol);
    }
    let clamped: Vec<DirectionCheck> = cm
        .clamped
        .iter()
        .map(|d| {
            let after = rayleigh(old, d.index, cand);
            let factor_error = (after / d.sigma - lambda).abs();
            ok &= factor_error <= tol + slack / d.sigma;
            DirectionCheck {
                index: d.index,
                sigma_before: d.sigma,
                sigma_after: after,
                factor_error,
            }
        })
        .collect();
    let count = |c: &[f64]| c.iter().take(k).filter(|&&x| x < eps).count();
    let (before, after) = (count(&c_old), count(&c_new));
    ok &= after <= before;
    ModuleVerification {
        module: old.module().to_string(),
        clamped,
        sigma_error,
        max_cos_error: exact.then_some(cos_error),
        intruders_before: before,
        intruders_after: after,
        passed: ok,
    }
}

/// `u'_jᵀ W'' v'_j` with `W'' = W0 + s·B·A` of the candidate: `u'ᵀ W0 v'` in base coordinates
/// (`Σ_i x_ij σ0_i y_ij`, since `U0ᵀ u' = x[:ρ]`, `V0ᵀ v' = y[:ρ]`), the LoRA part from its factors.
fn rayleigh(old: &Solved, j: usize, cand: &LoraModule) -> f64 {
    let base = old.base_rayleigh(j);
    let (u, v) = old.singular_vectors(j);
    let (r, inn) = (cand.rank, cand.in_features);
    let ub: Vec<f64> = (0..r)
        .map(|c| (0..u.len()).map(|i| u[i] * cand.b[i * r + c] as f64).sum())
        .collect();
    let av: Vec<f64> = (0..r)
        .map(|c| (0..inn).map(|i| cand.a[c * inn + i] as f64 * v[i]).sum())
        .collect();
    base + cand.scale * ub.iter().zip(&av).map(|(p, q)| p * q).sum::<f64>()
}

impl fmt::Display for Verification {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for m in self
            .modules
            .iter()
            .filter(|m| !m.clamped.is_empty() || !m.passed)
        {
            writeln!(
                f,
                "{}: intruders {} -> {}, other top-k sigma rel err {:.1e}{} {}",
                m.module,
                m.intruders_before,
                m.intruders_after,
                m.sigma_error,
                m.max_cos_error
                    .map_or(String::new(), |e| format!(", max|cos| drift {e:.1e}")),
                if m.passed { "ok" } else { "FAILED" }
            )?;
            for d in &m.clamped {
                writeln!(
                    f,
                    "  sigma[{}] {:.6} -> {:.6} (x{:.6}, factor err {:.1e})",
                    d.index,
                    d.sigma_before,
                    d.sigma_after,
                    d.sigma_after / d.sigma_before,
                    d.factor_error
                )?;
            }
        }
        let clamped: usize = self.modules.iter().map(|m| m.clamped.len()).sum();
        let before: usize = self.modules.iter().map(|m| m.intruders_before).sum();
        let after: usize = self.modules.iter().map(|m| m.intruders_after).sum();
        writeln!(
            f,
            "verify: {} ({} modules, {clamped} directions clamped, intruders {before} -> {after}, tolerance {:.0e})",
            if self.passed { "PASSED" } else { "FAILED" },
            self.modules.len(),
            self.tolerance
        )
    }
}
