//! Screening an adapter: plan, the modules in parallel, the policy's verdict, the metrics and
//! the event hook; a validation error becomes a `reject` report when the policy says so.

use super::module::{ModuleRun, Solutions};
use super::{ms, Gate, ScreenEvent};
use crate::adapter::{self, Adapter};
use crate::error::{Error, Result};
use crate::metrics::ScreenOutcome;
use crate::policy::OnInvalid;
use crate::report::{ModuleReport, Report, ReportError, Verdict, SCHEMA_VERSION};
use rayon::prelude::*;
use std::collections::BTreeMap;
use std::path::Path;
use std::time::Instant;

impl Gate {
    /// Loads and screens a PEFT adapter directory.
    pub fn screen_adapter_dir(&self, dir: &Path) -> Result<Report> {
        self.load_and_screen(dir).map(|(report, _)| report)
    }

    /// [`Gate::screen_adapter_dir`], also handing back the loaded adapter (e.g. to
    /// [`crate::clamp::clamp`] it); `None` when it could not be loaded and the policy rejected it.
    pub fn load_and_screen(&self, dir: &Path) -> Result<(Report, Option<Adapter>)> {
        let started = Instant::now();
        match self.load_checked(dir) {
            Ok(a) => Ok((self.screen(&a)?, Some(a))),
            Err(e) => Ok((self.rejected_dir(dir, e, started)?, None)),
        }
    }

    /// [`Gate::load_and_screen`] keeping the solutions, as [`Gate::screen_with_solutions`].
    pub fn load_and_screen_with_solutions(
        &self,
        dir: &Path,
    ) -> Result<(Report, Option<Adapter>, Solutions)> {
        let started = Instant::now();
        match self.load_checked(dir) {
            Ok(a) => {
                let (report, solutions) = self.screen_with_solutions(&a)?;
                Ok((report, Some(a), solutions))
            }
            Err(e) => Ok((self.rejected_dir(dir, e, started)?, None, Solutions::new())),
        }
    }

    fn rejected_dir(&self, dir: &Path, e: Error, started: Instant) -> Result<Report> {
        let name = dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        self.finish(&name, Err(e), started)
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
        // On the gate's pool, which the loader uses to read the modules in parallel.
        self.pool.install(|| peft.load(limits))
    }

    /// Screens an adapter already in memory.
    pub fn screen(&self, adapter: &Adapter) -> Result<Report> {
        let started = Instant::now();
        let result = self.screen_inner(adapter, started, false);
        self.finish(&adapter.name, result.map(|(r, _)| r), started)
    }

    /// [`Gate::screen`], also keeping each module's Brand solution (its intruders' singular
    /// vectors lifted) so that [`crate::clamp::clamp_solved`] clamps without solving again. The
    /// solutions stay beside the report, never in it; they are empty when the screening used the
    /// dense method or ended in an error report. Costs the screening plus, per intruder, one
    /// product with each base basis.
    pub fn screen_with_solutions(&self, adapter: &Adapter) -> Result<(Report, Solutions)> {
        let started = Instant::now();
        let mut solutions = Solutions::new();
        let result = self.screen_inner(adapter, started, true).map(|(r, s)| {
            solutions = s;
            r
        });
        let report = self.finish(&adapter.name, result, started)?;
        if report.error.is_some() {
            solutions.clear();
        }
        Ok((report, solutions))
    }

    /// Applies the policy's `on_invalid` to a validation error, then records the outcome.
    pub(super) fn finish(
        &self,
        adapter: &str,
        result: Result<Report>,
        started: Instant,
    ) -> Result<Report> {
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
                ScreenOutcome::Verdict(report.verdict),
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
    pub(super) fn rejected(&self, adapter: &str, e: Error) -> Report {
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

    pub(super) fn screen_inner(
        &self,
        adapter: &Adapter,
        started: Instant,
        keep: bool,
    ) -> Result<(Report, Solutions)> {
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
        let results: Vec<Result<ModuleRun>> = self
            .pool
            .install(|| jobs.par_iter().map(|j| self.run(j, keep)).collect());
        self.cache.save_fingerprints();
        let mut modules = Vec::with_capacity(results.len());
        let mut solutions = Solutions::new();
        for r in results {
            let (m, w, s) = r?;
            if let Some(s) = s {
                solutions.insert(m.module.clone(), s);
            }
            modules.push(m);
            warnings.extend(w);
        }
        let mut timings = BTreeMap::from([("plan".to_string(), planned_ms)]);
        timings.insert("total".into(), ms(started));
        let report = self.assemble(
            base.label(),
            Some(adapter.name.clone()),
            None,
            modules,
            timings,
            warnings,
        );
        Ok((report, solutions))
    }

    pub(super) fn assemble(
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
        let randomized = modules.iter().any(|m| m.solver.is_randomized());
        Report {
            schema_version: SCHEMA_VERSION,
            tool_version: env!("CARGO_PKG_VERSION"),
            base,
            adapter,
            tuned,
            method: self.config.method,
            backend: self.backend.kind(),
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
            seed: randomized.then_some(self.config.seed),
            unchanged: vec![],
        }
    }
}
