//! A fully fine-tuned or merged checkpoint against the base, tensor by tensor: the paper's full
//! fine-tuning comparison (`Method::Dense`), or `auto` against the cached base spectra.

use super::base_set::BaseSet;
use super::{ms, Gate};
use crate::base::BaseModel;
use crate::error::Result;
use crate::report::{Method, ModuleReport, Report};
use crate::spectrum::{dense, tuned, Solver};
use crate::tensor::TensorRef;
use rayon::prelude::*;
use std::collections::BTreeMap;
use std::path::Path;
use std::time::Instant;

impl Gate {
    /// Compares a fully fine-tuned or merged checkpoint with the base: every 2-D float tensor
    /// present in both with the same shape. `Method::Dense`: f64 SVDs of both (the reference).
    /// Otherwise (`auto`): byte-identical matrices are listed as unchanged; a low-rank
    /// `ΔW = W' − W0` (a merged LoRA) is factored and screened by the Brand update; anything else
    /// by the randomized top-k of `W'` against the cached base spectrum.
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
        let dense = self.config.method == Method::Dense;
        let (unchanged, changed): (Vec<_>, Vec<_>) = pairs
            .into_iter()
            .partition(|(_, b, t)| !dense && b.dtype == t.dtype && b.bytes == t.bytes);
        let results: Result<Vec<(ModuleReport, Option<String>)>> = self.pool.install(|| {
            changed
                .par_iter()
                .map(|(name, b, t)| {
                    // NaN or Inf would only fail the solvers' convergence, unnamed.
                    t.checked_norm(&format!("tuned tensor `{name}`"))?;
                    if dense {
                        Ok((self.tuned_dense(name, b, t)?, None))
                    } else {
                        self.tuned_auto(&base, name, b, t)
                    }
                })
                .collect()
        });
        let (mut modules, mut warnings) = (Vec::new(), Vec::new());
        for (m, w) in results? {
            modules.push(m);
            warnings.extend(w);
        }
        let timings = BTreeMap::from([("total".to_string(), ms(started))]);
        let mut report = self.assemble(
            base.label(),
            None,
            Some(tuned_path.display().to_string()),
            modules,
            timings,
            warnings,
        );
        report.method = if dense { Method::Dense } else { Method::Auto };
        report.unchanged = unchanged.into_iter().map(|(n, _, _)| n).collect();
        Ok(report)
    }

    /// One `--tuned` matrix by the dense f64 reference.
    fn tuned_dense(
        &self,
        name: &str,
        b: &TensorRef<'_>,
        t: &TensorRef<'_>,
    ) -> Result<ModuleReport> {
        let t0 = Instant::now();
        let (w0, w1) = (b.to_f64(), t.to_f64());
        let bm = faer::MatRef::from_row_major_slice(&w0, b.rows, b.cols);
        let tm = faer::MatRef::from_row_major_slice(&w1, t.rows, t.cols);
        let d = dense::compare(bm, tm, self.config.top_k + 1)?;
        let timings = BTreeMap::from([("dense".to_string(), ms(t0))]);
        Ok(self.module_report(
            name.to_string(),
            name.to_string(),
            [b.rows, b.cols],
            0,
            0.0,
            d.sigma,
            d.max_cos,
            d.outside_base_span,
            Solver::Dense,
            None,
            timings,
        ))
    }

    /// One changed `--tuned` matrix against the cached base spectrum.
    fn tuned_auto(
        &self,
        base: &BaseSet,
        name: &str,
        b: &TensorRef<'_>,
        t: &TensorRef<'_>,
    ) -> Result<(ModuleReport, Option<String>)> {
        let t0 = Instant::now();
        let (spectrum, source, warning) = self.fetch_base(base, name, b)?;
        let mut timings = BTreeMap::from([("base_spectrum".to_string(), ms(t0))]);
        let t1 = Instant::now();
        let s = tuned::screen_checkpoint_matrix(
            self.backend.as_ref(),
            &spectrum,
            b,
            t,
            self.config.top_k + 1,
            &self.solver_params(),
            &self.randomized_params(),
        )?;
        timings.insert("update".into(), ms(t1));
        // A merged LoRA is reported as one of rank r and scale 1 (ΔW = L·Rᵀ).
        let (rank, scale) = match s.detected_rank {
            Some(r) => (r, 1.0),
            None => (0, 0.0),
        };
        let report = self.screened_report(
            name.to_string(),
            name.to_string(),
            [b.rows, b.cols],
            rank,
            scale,
            s,
            Some(source),
            timings,
        );
        Ok((report, warning))
    }
}
