//! `Gate`: the library's gate, the Python objects whose memory it borrows, and the calls into
//! it, each with the GIL released and panics turned into `InternalError`.

use crate::clamp::PyClampedAdapter;
use crate::errors::{self, detached, invalid};
use crate::report::PyReport;
use crate::tensors::{host_array, HostArray, Use};
use intruder_gate::adapter::{Adapter, LoraModule};
use intruder_gate::backend::BackendChoice;
use intruder_gate::gate::{ScreenEvent, Solutions};
use intruder_gate::report::Method;
use intruder_gate::tensor::DType;
use intruder_gate::{ClampMode, ClampOptions, Config, Error, ErrorKind, Policy, Target};
use parking_lot::Mutex;
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyMapping, PyString, PyTuple};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::PathBuf;
use std::sync::Arc;

/// `cache_dir`: omitted → the library's default directory; `None` → no disk cache.
pub enum CacheDir {
    Default,
    Off,
    Dir(PathBuf),
}

impl<'a, 'py> FromPyObject<'a, 'py> for CacheDir {
    type Error = PyErr;

    fn extract(obj: Borrowed<'a, 'py, PyAny>) -> PyResult<Self> {
        if obj.is_none() {
            Ok(CacheDir::Off)
        } else {
            Ok(CacheDir::Dir(obj.extract()?))
        }
    }
}

#[pyclass(module = "intruder_gate", name = "Gate", frozen)]
pub struct PyGate {
    // Declared first, so it is dropped before the memory it borrows.
    gate: intruder_gate::Gate,
    /// Base tensors attached from host memory: the library reads them through raw pointers, so
    /// their Python owners live exactly as long as this gate.
    borrowed: Mutex<Vec<(String, HostArray)>>,
}

fn non_negative(name: &str, v: i64) -> PyResult<usize> {
    usize::try_from(v).or_else(|_| invalid(format!("{name} must not be negative, got {v}")))
}

fn parse_policy(py: Python<'_>, policy: Option<&Bound<'_, PyAny>>) -> PyResult<Policy> {
    let Some(p) = policy.filter(|p| !p.is_none()) else {
        return Ok(Policy::default());
    };
    let text: String = if p.is_instance_of::<PyMapping>() || p.is_instance_of::<PyDict>() {
        py.import("json")?.call_method1("dumps", (p,))?.extract()?
    } else {
        let path: PathBuf = p.extract().map_err(|_| {
            errors::to_py(Error::new(
                ErrorKind::InvalidArgument,
                "policy must be a dict, a path to a policy JSON file, or None",
            ))
        })?;
        std::fs::read_to_string(&path).map_err(|e| errors::to_py(Error::io(&path, e)))?
    };
    Policy::parse(&text).map_err(errors::to_py)
}

fn parse_backend(name: &str) -> PyResult<BackendChoice> {
    serde_json::from_value(serde_json::Value::String(name.into())).or_else(|_| {
        invalid(format!(
            "backend must be \"auto\", \"cpu\" or \"cuda\", got {name:?}"
        ))
    })
}

/// The CLI's `--method` names.
fn parse_method(name: &str) -> PyResult<Method> {
    serde_json::from_value(serde_json::Value::String(name.into())).or_else(|_| {
        invalid(format!(
            "method must be \"brand\", \"dense\" or \"auto\", got {name:?}"
        ))
    })
}

impl PyGate {
    fn attach_tensors(&self, py: Python<'_>, mapping: &Bound<'_, PyAny>) -> PyResult<()> {
        let items = mapping.call_method0("items").map_err(|_| {
            errors::to_py(Error::new(
                ErrorKind::InvalidArgument,
                "attach_base_tensors takes a mapping of tensor name -> 2-D array",
            ))
        })?;
        // Every tensor is checked before any is attached.
        let mut arrays = Vec::new();
        for item in items.try_iter()? {
            let (name, value): (String, Bound<'_, PyAny>) = item?.extract()?;
            let array = host_array(&value, &format!("base tensor `{name}`"), Use::Borrow)?;
            arrays.push((name, array));
        }
        py.detach(|| {
            let mut borrowed = self.borrowed.lock();
            for (name, array) in arrays {
                errors::guarded(|| {
                    // SAFETY: `array` keeps its owner alive and goes into `self.borrowed`,
                    // which outlives `self.gate`; the caller promises not to mutate it.
                    unsafe {
                        self.gate.attach_base_tensor(
                            &name,
                            array.ptr as *const u8,
                            array.dtype,
                            array.rows,
                            array.cols,
                        )
                    }
                })?;
                borrowed.push((name, array));
            }
            Ok(())
        })
        .map_err(errors::to_py)
    }

    fn attach(&self, py: Python<'_>, base: &Bound<'_, PyAny>) -> PyResult<()> {
        if base.is_instance_of::<PyString>() || base.hasattr("__fspath__")? {
            let path: PathBuf = base.extract()?;
            detached(py, || self.gate.attach_base(&path))
        } else {
            self.attach_tensors(py, base)
        }
    }

    fn report(
        slf: &Bound<'_, Self>,
        report: intruder_gate::Report,
        adapter: Option<Adapter>,
        solutions: Solutions,
    ) -> PyReport {
        PyReport {
            report,
            adapter: adapter.map(Arc::new),
            solutions: Arc::new(solutions),
            gate: slf.clone().unbind(),
        }
    }
}

/// A screened event as the dict handed to `on_event` callbacks.
fn event_dict<'py>(py: Python<'py>, ev: &ScreenEvent<'_>) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    d.set_item("adapter", ev.adapter)?;
    d.set_item("outcome", ev.outcome.label())?;
    d.set_item("intruders", ev.intruders)?;
    d.set_item("modules", ev.modules)?;
    d.set_item("seconds", ev.seconds)?;
    Ok(d)
}

#[pymethods]
impl PyGate {
    #[new]
    #[pyo3(signature = (base=None, *, top_k=10, epsilon=0.5, policy=None, cache_dir=CacheDir::Default, backend="auto", threads=None, method="brand", seed=None))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
        base: Option<&Bound<'_, PyAny>>,
        top_k: i64,
        epsilon: f64,
        policy: Option<&Bound<'_, PyAny>>,
        cache_dir: CacheDir,
        backend: &str,
        threads: Option<i64>,
        method: &str,
        seed: Option<i128>,
    ) -> PyResult<Self> {
        let mut config = Config {
            top_k: non_negative("top_k", top_k)?,
            epsilon,
            policy: parse_policy(py, policy)?,
            backend: parse_backend(backend)?,
            method: parse_method(method)?,
            ..Config::default()
        };
        if let Some(seed) = seed {
            config.seed = u64::try_from(seed)
                .or_else(|_| invalid(format!("seed must be in 0..2**64, got {seed}")))?;
        }
        match cache_dir {
            CacheDir::Default => {}
            CacheDir::Off => config.cache_dir = None,
            CacheDir::Dir(d) => config.cache_dir = Some(d),
        }
        config.threads = match threads {
            None => 0,
            Some(n @ 1..=1024) => n as usize,
            Some(n) => {
                return invalid(format!(
                    "threads must be in 1..=1024 (None: one per core), got {n}"
                ))
            }
        };
        let gate = detached(py, || intruder_gate::Gate::new(config))?;
        let gate = PyGate {
            gate,
            borrowed: Mutex::new(Vec::new()),
        };
        if let Some(b) = base.filter(|b| !b.is_none()) {
            gate.attach(py, b)?;
        }
        Ok(gate)
    }

    /// "cpu" or "cuda": the backend `backend="auto"` picked.
    #[getter]
    fn backend(&self) -> &'static str {
        self.gate.backend_kind().label()
    }

    #[getter]
    fn top_k(&self) -> usize {
        self.gate.config().top_k
    }

    #[getter]
    fn epsilon(&self) -> f64 {
        self.gate.config().epsilon
    }

    /// "brand", "dense" or "auto".
    #[getter]
    fn method(&self) -> &'static str {
        self.gate.config().method.label()
    }

    /// The randomized solver's sketch seed (`--tuned` and DoRA modules).
    #[getter]
    fn seed(&self) -> u64 {
        self.gate.config().seed
    }

    /// The disk cache directory, or None when disabled.
    #[getter]
    fn cache_dir(&self) -> Option<PathBuf> {
        self.gate.config().cache_dir.clone()
    }

    fn attach_base(&self, py: Python<'_>, path: PathBuf) -> PyResult<()> {
        detached(py, || self.gate.attach_base(&path))
    }

    fn attach_base_tensors(&self, py: Python<'_>, tensors: &Bound<'_, PyAny>) -> PyResult<()> {
        self.attach_tensors(py, tensors)
    }

    fn screen_adapter(slf: &Bound<'_, Self>, directory: PathBuf) -> PyResult<PyReport> {
        let this = slf.get();
        let (report, adapter, solutions) = detached(slf.py(), || {
            this.gate.load_and_screen_with_solutions(&directory)
        })?;
        Ok(Self::report(slf, report, adapter, solutions))
    }

    /// A fully fine-tuned or merged checkpoint (a safetensors file, a sharded index or a model
    /// directory) against the attached base, matrix by matrix: `scan --tuned`. The report has no
    /// adapter to clamp.
    fn screen_tuned(slf: &Bound<'_, Self>, path: PathBuf) -> PyResult<PyReport> {
        let this = slf.get();
        let report = detached(slf.py(), || this.gate.screen_tuned(&path))?;
        Ok(Self::report(slf, report, None, Solutions::new()))
    }

    #[pyo3(signature = (modules, name="in-memory", *, fan_in_fan_out=false))]
    fn screen(
        slf: &Bound<'_, Self>,
        modules: &Bound<'_, PyAny>,
        name: &str,
        fan_in_fan_out: bool,
    ) -> PyResult<PyReport> {
        let (py, this) = (slf.py(), slf.get());
        let items = modules.call_method0("items").map_err(|_| {
            errors::to_py(Error::new(
                ErrorKind::InvalidArgument,
                "screen takes a mapping of module -> (lora_A, lora_B, scale)",
            ))
        })?;
        let mut parts = Vec::new();
        for item in items.try_iter()? {
            let (key, value): (String, Bound<'_, PyAny>) = item?.extract()?;
            let what = |f: &str| format!("module `{key}`: {f}");
            let tuple = value.cast::<PyTuple>().ok().filter(|t| t.len() == 3);
            let Some(tuple) = tuple else {
                return invalid(what("expected a tuple (lora_A, lora_B, scale)"));
            };
            let a = host_array(&tuple.get_item(0)?, &what("lora_A"), Use::Copy)?;
            let b = host_array(&tuple.get_item(1)?, &what("lora_B"), Use::Copy)?;
            let scale: f64 = tuple.get_item(2)?.extract()?;
            // A base tensor name is accepted for the module path it belongs to.
            let module = key.strip_suffix(".weight").unwrap_or(&key).to_string();
            parts.push((module, a, b, scale));
        }
        let adapter = py
            .detach(|| {
                errors::guarded(|| {
                    let modules = parts
                        .iter()
                        .map(|(module, a, b, scale)| lora_module(module, a, b, *scale))
                        .collect::<intruder_gate::Result<Vec<_>>>()?;
                    let mut adapter =
                        Adapter::from_modules(name, modules, &this.gate.config().limits)?;
                    adapter.fan_in_fan_out = fan_in_fan_out;
                    Ok(adapter)
                })
            })
            .map_err(errors::to_py)?;
        let (report, solutions) = detached(py, || this.gate.screen_with_solutions(&adapter))?;
        Ok(Self::report(slf, report, Some(adapter), solutions))
    }

    #[pyo3(signature = (report, lam=0.75, target="all", mode="exact", pad_rank_to=0))]
    fn clamp(
        slf: &Bound<'_, Self>,
        report: &PyReport,
        lam: f64,
        target: &str,
        mode: &str,
        pad_rank_to: i64,
    ) -> PyResult<PyClampedAdapter> {
        let (py, this) = (slf.py(), slf.get());
        if report.gate.as_ptr() != slf.as_ptr() {
            return invalid("this report was made by another Gate; clamp it with that one");
        }
        let Some(adapter) = report.adapter.clone() else {
            return invalid(match &report.report.error {
                Some(e) => format!(
                    "the adapter was rejected before it loaded ({}); there is nothing to clamp",
                    e.message
                ),
                None => "this report screened a checkpoint (screen_tuned), not an adapter; \
                         there is nothing to clamp"
                    .to_string(),
            });
        };
        let opts = ClampOptions {
            lambda: lam,
            target: match target {
                "all" => Target::All,
                "top1" => Target::Top1,
                _ => {
                    return invalid(format!(
                        "target must be \"all\" or \"top1\", got {target:?}"
                    ))
                }
            },
            mode: match mode {
                "exact" => ClampMode::Exact,
                "rank-preserving" | "rank_preserving" => ClampMode::RankPreserving,
                _ => {
                    return invalid(format!(
                        "mode must be \"exact\" or \"rank-preserving\", got {mode:?}"
                    ))
                }
            },
        };
        let pad = match non_negative("pad_rank_to", pad_rank_to)? {
            0 => None,
            n => Some(n),
        };
        let solutions = report.solutions.clone();
        let report = &report.report;
        let (clamped, factors) = detached(py, || {
            // The screening's solutions: nothing is solved again (dense-method gates keep none).
            let clamped = if solutions.is_empty() {
                intruder_gate::clamp::clamp(&this.gate, &adapter, report, &opts)?
            } else {
                intruder_gate::clamp::clamp_solved(&adapter, report, &solutions, &opts)?
            };
            let factors = clamped.to_adapter(DType::F32, pad)?;
            Ok((clamped, factors))
        })?;
        Ok(PyClampedAdapter {
            clamped,
            factors,
            pad_rank_to: pad,
        })
    }

    /// Names of the base tensors attached from host memory (for `intruder_gate.peft`).
    fn _host_tensor_names(&self) -> Vec<String> {
        self.borrowed
            .lock()
            .iter()
            .map(|(n, _)| n.clone())
            .collect()
    }

    /// The gate's metrics in the Prometheus text format.
    fn metrics(&self, py: Python<'_>) -> PyResult<String> {
        detached(py, || Ok(self.gate.metrics().render()))
    }

    /// Calls `callback(event: dict)` after every screening (None removes it).
    #[pyo3(signature = (callback))]
    fn on_event(&self, py: Python<'_>, callback: Option<Py<PyAny>>) -> PyResult<()> {
        let callback = callback.filter(|c| !c.is_none(py));
        if let Some(c) = &callback {
            if !c.bind(py).is_callable() {
                return invalid("on_event takes a callable or None");
            }
        }
        let hook = callback.map(|cb| -> intruder_gate::gate::EventHook {
            Box::new(move |ev: &ScreenEvent<'_>| {
                // A failing callback is reported through sys.unraisablehook, never raised
                // into the screening; nothing may unwind into the library either.
                let _ = catch_unwind(AssertUnwindSafe(|| {
                    Python::attach(|py| {
                        let cb = cb.bind(py);
                        if let Err(e) = event_dict(py, ev).and_then(|d| cb.call1((d,))) {
                            e.write_unraisable(py, Some(cb));
                        }
                    })
                }));
            })
        });
        // Waits for running calls of the previous hook, which need the GIL.
        detached(py, || {
            self.gate.set_event_hook(hook);
            Ok(())
        })
    }

    fn __repr__(&self) -> String {
        let c = self.gate.config();
        format!(
            "Gate(backend={:?}, top_k={}, epsilon={})",
            self.gate.backend_kind().label(),
            c.top_k,
            c.epsilon
        )
    }
}

/// One in-memory module: `ΔW = scale · B · A`, with A `[r, in]` and B `[out, r]`.
fn lora_module(
    name: &str,
    a: &HostArray,
    b: &HostArray,
    scale: f64,
) -> intruder_gate::Result<LoraModule> {
    if b.cols != a.rows {
        intruder_gate::bail!(
            Shape,
            "module `{name}`: lora_A is [{}, {}] (rank {}) but lora_B is [{}, {}]; lora_B must be [out, rank]",
            a.rows,
            a.cols,
            a.rows,
            b.rows,
            b.cols
        );
    }
    Ok(LoraModule {
        name: name.to_string(),
        rank: a.rows,
        in_features: a.cols,
        out_features: b.rows,
        a: a.to_f32()?,
        b: b.to_f32()?,
        alpha: scale * a.rows as f64,
        scale,
        dtype: a.dtype,
        magnitude: None,
    })
}
