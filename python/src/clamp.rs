//! `ClampedAdapter`: the clamp's factors as numpy arrays (or torch tensors), and a PEFT writer.

use crate::errors::{self, detached};
use crate::report::json_loads;
use intruder_gate::adapter::Adapter;
use intruder_gate::tensor::DType;
use pyo3::prelude::*;
use pyo3::types::{PyByteArray, PyDict, PyTuple};
use std::path::PathBuf;

#[pyclass(module = "intruder_gate", name = "ClampedAdapter", frozen)]
pub struct PyClampedAdapter {
    pub clamped: intruder_gate::ClampedAdapter,
    /// `clamped` as f32 factors padded to `pad_rank_to` (what `modules` hands out).
    pub factors: Adapter,
    pub pad_rank_to: Option<usize>,
}

/// A writable numpy array `[rows, cols]` f32 holding a copy of `values`.
fn numpy_f32<'py>(
    py: Python<'py>,
    values: &[f32],
    rows: usize,
    cols: usize,
) -> PyResult<Bound<'py, PyAny>> {
    let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
    let buf = PyByteArray::new(py, &bytes);
    py.import("numpy")?
        .call_method1("frombuffer", (buf, "<f4"))?
        .call_method1("reshape", (rows, cols))
}

fn parse_dtype(name: &str) -> PyResult<DType> {
    match name.to_ascii_lowercase().trim_start_matches("torch.") {
        "f32" | "float32" => Ok(DType::F32),
        "f16" | "float16" => Ok(DType::F16),
        "bf16" | "bfloat16" => Ok(DType::BF16),
        _ => errors::invalid(format!(
            "dtype must be \"float32\", \"float16\" or \"bfloat16\", got {name:?}"
        )),
    }
}

#[pymethods]
impl PyClampedAdapter {
    /// Module name → `(lora_A [rank, in], lora_B [out, rank])` float32 numpy arrays, scale 1.
    #[getter]
    fn modules<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let out = PyDict::new(py);
        for m in &self.factors.modules {
            let a = numpy_f32(py, &m.a, m.rank, m.in_features)?;
            let b = numpy_f32(py, &m.b, m.out_features, m.rank)?;
            out.set_item(&m.name, PyTuple::new(py, [a, b])?)?;
        }
        Ok(out)
    }

    /// `modules` as torch tensors (`torch.from_numpy`, no further copy), optionally cast/moved.
    #[pyo3(signature = (dtype=None, device=None))]
    fn as_torch<'py>(
        &self,
        py: Python<'py>,
        dtype: Option<Bound<'py, PyAny>>,
        device: Option<Bound<'py, PyAny>>,
    ) -> PyResult<Bound<'py, PyDict>> {
        let torch = py.import("torch")?;
        let out = PyDict::new(py);
        for (name, pair) in self.modules(py)?.iter() {
            let pair = pair.cast::<PyTuple>()?;
            let mut tensors = Vec::with_capacity(2);
            for x in pair.iter() {
                let t = torch.call_method1("from_numpy", (x,))?;
                let kw = PyDict::new(py);
                if let Some(d) = &dtype {
                    kw.set_item("dtype", d)?;
                }
                if let Some(d) = &device {
                    kw.set_item("device", d)?;
                }
                tensors.push(t.call_method("to", (), Some(&kw))?);
            }
            out.set_item(name, PyTuple::new(py, tensors)?)?;
        }
        Ok(out)
    }

    /// Module name → rank of its clamped factors (r + m in exact mode, after padding).
    #[getter]
    fn ranks(&self) -> std::collections::BTreeMap<String, usize> {
        self.factors
            .modules
            .iter()
            .map(|m| (m.name.clone(), m.rank))
            .collect()
    }

    /// The largest module rank (what a server's `max_lora_rank` must allow).
    #[getter]
    fn rank(&self) -> usize {
        self.factors.modules.iter().map(|m| m.rank).max().unwrap_or(0)
    }

    /// Singular directions clamped over all modules.
    #[getter]
    fn clamped_directions(&self) -> usize {
        self.clamped.clamped_directions()
    }

    #[getter]
    fn fan_in_fan_out(&self) -> bool {
        self.clamped.fan_in_fan_out
    }

    /// What was clamped: options, and per module the directions and any truncation error (the
    /// provenance `save_pretrained` writes into the safetensors metadata).
    fn to_dict<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        json_loads(py, &self.clamped.provenance()["clamp"].to_string())
    }

    /// Writes a PEFT adapter directory atomically (`adapter_config.json` +
    /// `adapter_model.safetensors`); `dtype` defaults to the input adapter's.
    #[pyo3(signature = (directory, dtype=None))]
    fn save_pretrained(
        &self,
        py: Python<'_>,
        directory: PathBuf,
        dtype: Option<&str>,
    ) -> PyResult<()> {
        let dtype = dtype.map(parse_dtype).transpose()?;
        detached(py, || {
            self.clamped
                .write_peft(&directory, dtype, self.pad_rank_to)
        })
    }

    fn __repr__(&self) -> String {
        format!(
            "ClampedAdapter(name={:?}, modules={}, rank={}, clamped_directions={})",
            self.clamped.name,
            self.clamped.modules.len(),
            self.rank(),
            self.clamped.clamped_directions()
        )
    }
}
