//! The screening report: per module and in total, with a fixed JSON schema (`schema_version`).

use crate::backend::BackendKind;
pub use crate::policy::Verdict;
use crate::policy::{FiredRule, Screened};
use crate::spectrum::cache::Source;
use crate::spectrum::Solver;
use serde::Serialize;
use std::collections::BTreeMap;

/// Bumped whenever a JSON field changes meaning or disappears (adding fields does not bump it).
pub const SCHEMA_VERSION: u32 = 1;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Method {
    /// Cached base spectrum + Brand update (default).
    #[default]
    Brand,
    /// Thin SVD of `W'` and `W0` in f64: the reference.
    Dense,
    /// Whatever is exact and fastest per matrix against the cached base spectrum: the Brand
    /// update for LoRA modules; the randomized solver for DoRA modules; for `--tuned`,
    /// unchanged / merged LoRA (low-rank ΔW, Brand) / randomized top-k of `W'`.
    Auto,
}

impl Method {
    pub fn label(self) -> &'static str {
        match self {
            Method::Brand => "brand",
            Method::Dense => "dense",
            Method::Auto => "auto",
        }
    }
}

/// One screened matrix.
#[derive(Debug, Clone, Serialize)]
pub struct ModuleReport {
    /// Adapter module path (`base_model.model.` stripped); the tensor name for `--tuned`.
    pub module: String,
    pub base_tensor: String,
    /// `[out, in]` of `W0` in PyTorch `Linear` layout.
    pub shape: [usize; 2],
    pub rank: usize,
    pub scale: f64,
    /// Top-k singular values of `W'`, descending.
    pub singular_values: Vec<f64>,
    /// For each of those: max |cos| with every left singular vector of `W0`.
    pub max_cos: Vec<f64>,
    /// Indices j < k with `max_cos[j] < epsilon`.
    pub intruders: Vec<usize>,
    /// Indices whose singular value is within the tie tolerance of a neighbour: their vectors
    /// are not individually defined, so their `max_cos` may legitimately differ between methods.
    pub tied: Vec<usize>,
    /// Norm of each `u'_j`'s part outside `W0`'s column space (0 when `W0` has full row rank).
    pub outside_base_span: Vec<f64>,
    /// Indices j whose `max_cos` lies within `EPSILON_BAND` of ε: the verdict there is fragile.
    pub near_epsilon: Vec<usize>,
    /// How the triplets were found: "davidson" (iterative, residual-checked), "dense-core"
    /// (exact SVD of the small Brand core, chosen when r is large relative to min(out, in)),
    /// "dense-core-fallback" (the iterative solve did not converge within its budget),
    /// "dense" (the reference method), "merged-lora" (`--tuned`: ΔW = W' − W0 has low rank,
    /// factored and solved by the Brand update), "randomized" (sketch + block Krylov,
    /// residual-checked), "randomized-dense-small" / "randomized-dense-fallback" (a dense f64
    /// SVD: the matrix was too small for a sketch / the Krylov basis hit its cap).
    pub solver: Solver,
    /// "merged-lora": the rank found for ΔW.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detected_rank: Option<usize>,
    /// "merged-lora": `‖ΔW − L·Rᵀ‖_F / ‖ΔW‖_F` of the factorisation screened (below the
    /// rounding of the stored dtype).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub low_rank_residual: Option<f64>,
    /// Randomized solver: the worst of `‖W'v − σu‖`, `‖W'ᵀu − σv‖` over the returned triplets,
    /// relative to σ₁ (at most the Krylov tolerance unless a dense fallback ran).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub residual: Option<f64>,
    /// Where the base spectrum came from: "memory_hit", "disk_hit", "computed",
    /// "rebuilt_corrupt", or "none" (dense method).
    #[serde(serialize_with = "base_spectrum_label")]
    pub base_spectrum: Option<Source>,
    pub timings_ms: BTreeMap<String, f64>,
}

/// Width of the band around ε inside which a verdict is flagged as fragile.
pub const EPSILON_BAND: f64 = 0.02;

impl Screened for ModuleReport {
    fn intruder_count(&self) -> usize {
        self.intruders.len()
    }

    fn min_max_cos(&self) -> f64 {
        self.max_cos.iter().copied().fold(f64::INFINITY, f64::min)
    }
}

/// `base_spectrum` as in schema 1: the cache source's label, or "none" (dense method).
fn base_spectrum_label<S: serde::Serializer>(
    s: &Option<Source>,
    ser: S,
) -> Result<S::Ok, S::Error> {
    ser.serialize_str(s.map_or("none", Source::label))
}

/// Fills `intruders`, `tied` and `near_epsilon` from the spectrum and cosines.
/// `sigma` may carry one value more than `max_cos` (the (k+1)-th), so the k-th's tie is judged too.
pub fn classify(
    sigma: &[f64],
    max_cos: &[f64],
    epsilon: f64,
    tie_tolerance: f64,
) -> (Vec<usize>, Vec<usize>, Vec<usize>) {
    let k = max_cos.len();
    let intruders = (0..k).filter(|&j| max_cos[j] < epsilon).collect();
    let near = (0..k)
        .filter(|&j| (max_cos[j] - epsilon).abs() <= EPSILON_BAND)
        .collect();
    let close = |a: f64, b: f64| (a - b).abs() <= tie_tolerance * a.abs().max(b.abs());
    let tied = (0..k)
        .filter(|&j| {
            (j > 0 && close(sigma[j - 1], sigma[j]))
                || (j + 1 < sigma.len() && close(sigma[j], sigma[j + 1]))
        })
        .collect();
    (intruders, tied, near)
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub schema_version: u32,
    pub tool_version: &'static str,
    pub base: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub adapter: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tuned: Option<String>,
    pub method: Method,
    pub backend: BackendKind,
    pub device: String,
    /// Why `auto` did not pick CUDA, when it did not.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backend_fallback: Option<String>,
    pub top_k: usize,
    pub epsilon: f64,
    pub tie_tolerance: f64,
    pub verdict: Verdict,
    /// The policy rules that fired, in policy order; the most severe one set the verdict.
    pub fired_rules: Vec<FiredRule>,
    /// Why a malformed adapter was rejected (the policy turned a validation error into `reject`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<ReportError>,
    pub total_intruders: usize,
    pub modules_with_intruders: usize,
    pub modules: Vec<ModuleReport>,
    pub timings_ms: BTreeMap<String, f64>,
    pub warnings: Vec<String>,
    /// The randomized solver's sketch seed, when any module used it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub seed: Option<u64>,
    /// `--tuned`: matrices byte-identical to the base (not screened, not in `modules`).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub unchanged: Vec<String>,
}

/// A validation error carried by a `reject` report.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ReportError {
    /// [`crate::ErrorKind::label`].
    pub kind: &'static str,
    pub message: String,
}

impl Report {
    /// Why the verdict is what it is, in one line: the error of a report that carries one, else
    /// the rules that fired (`; `-separated), else that none did.
    pub fn reason(&self) -> String {
        match &self.error {
            Some(e) => format!("{} error: {}", e.kind, e.message),
            None if self.fired_rules.is_empty() => "no policy rule fired".to_string(),
            None => {
                let reasons: Vec<&str> =
                    self.fired_rules.iter().map(|f| f.reason.as_str()).collect();
                reasons.join("; ")
            }
        }
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).expect("report serialises")
    }

    /// A readable table: one line per module, then totals and the verdict.
    pub fn to_text(&self) -> String {
        let mut s = String::new();
        let subject = self
            .adapter
            .as_deref()
            .or(self.tuned.as_deref())
            .unwrap_or("");
        s += &format!(
            "intruder-gate {}: {} vs base {}\nmethod {}, backend {}, top-k {}, epsilon {}\n\n",
            self.tool_version,
            subject,
            self.base,
            self.method.label(),
            self.backend.label(),
            self.top_k,
            self.epsilon
        );
        s += &format!(
            "{:<60} {:>11} {:>5} {:>9} {:>12}  flags\n",
            "module", "shape", "rank", "intruders", "min max|cos|"
        );
        for m in &self.modules {
            let mut flags = Vec::new();
            if !m.tied.is_empty() {
                flags.push(format!("tied{:?}", m.tied));
            }
            if !m.near_epsilon.is_empty() {
                flags.push(format!("near-eps{:?}", m.near_epsilon));
            }
            if matches!(
                m.solver,
                Solver::DenseCoreFallback | Solver::RandomizedDenseFallback
            ) {
                flags.push("dense-fallback".into());
            }
            if let Some(r) = m.detected_rank {
                flags.push(format!("merged-lora(r={r})"));
            }
            s += &format!(
                "{:<60} {:>11} {:>5} {:>9} {:>12.4}  {}\n",
                m.module,
                format!("{}x{}", m.shape[0], m.shape[1]),
                m.rank,
                m.intruders.len(),
                m.min_max_cos(),
                flags.join(" ")
            );
        }
        if !self.unchanged.is_empty() {
            s += &format!(
                "{} matrices unchanged from the base\n",
                self.unchanged.len()
            );
        }
        s += &format!(
            "\n{}, {} with intruders, {} in total\nverdict: {}\n",
            plural(self.modules.len(), "module"),
            self.modules_with_intruders,
            plural(self.total_intruders, "intruder dimension"),
            self.verdict.label()
        );
        for f in &self.fired_rules {
            s += &format!("  rule fired: {}\n", f.reason);
        }
        if let Some(e) = &self.error {
            s += &format!("  rejected: {} error: {}\n", e.kind, e.message);
        }
        for w in &self.warnings {
            s += &format!("warning: {w}\n");
        }
        s
    }
}

/// "1 module", "2 modules".
pub fn plural(n: usize, noun: &str) -> String {
    if n == 1 {
        format!("1 {noun}")
    } else {
        format!("{n} {noun}s")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classify_flags_intruders_ties_and_the_band_around_epsilon() {
        let sigma = [10.0, 9.0, 8.999, 5.0, 4.9999];
        let cos = [0.99, 0.3, 0.51, 0.495];
        let (intr, tied, near) = classify(&sigma, &cos, 0.5, 1e-3);
        assert_eq!(intr, vec![1, 3]);
        assert_eq!(tied, vec![1, 2, 3]);
        assert_eq!(near, vec![2, 3]);
    }
}
