//! The paper's full fine-tuning comparison: a tuned model against the base, tensor by tensor.

use super::{ms, Gate};
use crate::base::BaseModel;
use crate::error::Result;
use crate::report::{Method, ModuleReport, Report};
use crate::spectrum::{dense, Solver};
use crate::tensor::TensorRef;
use rayon::prelude::*;
use std::collections::BTreeMap;
use std::path::Path;
use std::time::Instant;

impl Gate {
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
                        Solver::Dense,
                        None,
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
        report.method = Method::Dense;
        Ok(report)
    }
}
