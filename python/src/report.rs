//! `Report` and `ModuleReport`: the library's report, attributes named as in its JSON.

use intruder_gate::adapter::Adapter;
use intruder_gate::gate::Solutions;
use pyo3::prelude::*;
use std::collections::BTreeMap;
use std::sync::Arc;

use crate::gate::PyGate;

/// `json.loads(text)`: dicts and lists exactly as the JSON schema has them (serde writes
/// shortest round-trip floats, so every number is the library's f64).
pub fn json_loads<'py>(py: Python<'py>, text: &str) -> PyResult<Bound<'py, PyAny>> {
    py.import("json")?.call_method1("loads", (text,))
}

#[pyclass(module = "intruder_gate", name = "Report", frozen)]
pub struct PyReport {
    pub report: intruder_gate::Report,
    /// The screened adapter, for `Gate.clamp`; `None` when it was rejected before it loaded.
    pub adapter: Option<Arc<Adapter>>,
    /// The screening's Brand solutions, so that `Gate.clamp` solves nothing again.
    pub solutions: Arc<Solutions>,
    /// The gate that screened it: `Gate.clamp` needs that one, and `peft.clamp_model` finds it
    /// here.
    pub gate: Py<PyGate>,
}

#[pymethods]
impl PyReport {
    /// "accept", "warn", "clamp" or "reject".
    #[getter]
    fn verdict(&self) -> &'static str {
        self.report.verdict.label()
    }
    #[getter]
    fn total_intruders(&self) -> usize {
        self.report.total_intruders
    }
    #[getter]
    fn modules_with_intruders(&self) -> usize {
        self.report.modules_with_intruders
    }
    #[getter]
    fn modules(&self) -> Vec<PyModuleReport> {
        self.report
            .modules
            .iter()
            .map(PyModuleReport::from)
            .collect()
    }
    /// The policy rules that fired, as dicts (`rule`, `action`, ... as in the JSON).
    #[getter]
    fn fired_rules<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        json_loads(
            py,
            &serde_json::to_string(&self.report.fired_rules).unwrap_or_default(),
        )
    }
    /// `{"kind": ..., "message": ...}` when a malformed adapter was rejected, else None.
    #[getter]
    fn error<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        json_loads(
            py,
            &serde_json::to_string(&self.report.error).unwrap_or_default(),
        )
    }
    #[getter]
    fn warnings(&self) -> Vec<String> {
        self.report.warnings.clone()
    }
    #[getter]
    fn adapter(&self) -> Option<String> {
        self.report.adapter.clone()
    }
    #[getter]
    fn base(&self) -> String {
        self.report.base.clone()
    }
    #[getter]
    fn method(&self) -> &'static str {
        self.report.method.label()
    }
    #[getter]
    fn backend(&self) -> &'static str {
        self.report.backend.label()
    }
    #[getter]
    fn device(&self) -> String {
        self.report.device.clone()
    }
    #[getter]
    fn top_k(&self) -> usize {
        self.report.top_k
    }
    #[getter]
    fn epsilon(&self) -> f64 {
        self.report.epsilon
    }
    #[getter]
    fn schema_version(&self) -> u32 {
        self.report.schema_version
    }
    /// The randomized solver's sketch seed, when any module used it.
    #[getter]
    fn seed(&self) -> Option<u64> {
        self.report.seed
    }
    /// `--tuned`: the matrices byte-identical to the base (not screened).
    #[getter]
    fn unchanged(&self) -> Vec<String> {
        self.report.unchanged.clone()
    }
    #[getter]
    fn timings_ms(&self) -> BTreeMap<String, f64> {
        self.report.timings_ms.clone()
    }
    /// The gate that made this report.
    #[getter(_gate)]
    fn gate(&self, py: Python<'_>) -> Py<PyGate> {
        self.gate.clone_ref(py)
    }
    /// The library's JSON (the CLI's `scan --format json`).
    fn to_json(&self) -> String {
        self.report.to_json()
    }
    fn to_dict<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        json_loads(py, &self.report.to_json())
    }
    fn __repr__(&self) -> String {
        format!(
            "Report(adapter={:?}, verdict={:?}, total_intruders={}, modules={})",
            self.report.adapter.as_deref().unwrap_or(""),
            self.report.verdict.label(),
            self.report.total_intruders,
            self.report.modules.len()
        )
    }
}

/// One screened matrix (the JSON's `modules[i]`).
#[pyclass(module = "intruder_gate", name = "ModuleReport", frozen, get_all)]
#[derive(Clone)]
pub struct PyModuleReport {
    module: String,
    base_tensor: String,
    shape: (usize, usize),
    rank: usize,
    scale: f64,
    singular_values: Vec<f64>,
    max_cos: Vec<f64>,
    intruders: Vec<usize>,
    tied: Vec<usize>,
    outside_base_span: Vec<f64>,
    near_epsilon: Vec<usize>,
    solver: String,
    base_spectrum: String,
    timings_ms: BTreeMap<String, f64>,
    /// `--tuned`: the rank of `ΔW = W' − W0` when it was found to be low (a merged LoRA).
    detected_rank: Option<usize>,
    /// `--tuned` merged LoRA: `‖ΔW − L·Rᵀ‖_F / ‖ΔW‖_F`.
    low_rank_residual: Option<f64>,
    /// Randomized solver: the worst residual of the returned triplets, relative to σ₁.
    residual: Option<f64>,
}

impl From<&intruder_gate::report::ModuleReport> for PyModuleReport {
    fn from(m: &intruder_gate::report::ModuleReport) -> Self {
        PyModuleReport {
            module: m.module.clone(),
            base_tensor: m.base_tensor.clone(),
            shape: (m.shape[0], m.shape[1]),
            rank: m.rank,
            scale: m.scale,
            singular_values: m.singular_values.clone(),
            max_cos: m.max_cos.clone(),
            intruders: m.intruders.clone(),
            tied: m.tied.clone(),
            outside_base_span: m.outside_base_span.clone(),
            near_epsilon: m.near_epsilon.clone(),
            solver: m.solver.label().to_string(),
            base_spectrum: m.base_spectrum.map_or("none", |s| s.label()).to_string(),
            timings_ms: m.timings_ms.clone(),
            detected_rank: m.detected_rank,
            low_rank_residual: m.low_rank_residual,
            residual: m.residual,
        }
    }
}

#[pymethods]
impl PyModuleReport {
    fn __repr__(&self) -> String {
        format!(
            "ModuleReport(module={:?}, rank={}, intruders={:?})",
            self.module, self.rank, self.intruders
        )
    }
}
