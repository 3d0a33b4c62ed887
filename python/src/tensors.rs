//! numpy arrays and torch tensors as borrowed row-major 2-D tensors, without a numpy or torch
//! build dependency: numpy through `__array_interface__`, torch through `data_ptr()` (bf16 has no
//! numpy dtype). The owner object is kept, so the memory stays alive as long as the view does.

use crate::errors;
use intruder_gate::tensor::{DType, TensorRef};
use intruder_gate::{Error, ErrorKind};
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyTuple};

/// A 2-D tensor's memory, held alive by `owner`.
pub struct HostArray {
    /// Held, never read: keeps the memory alive.
    pub _owner: Py<PyAny>,
    pub ptr: usize,
    pub dtype: DType,
    pub rows: usize,
    pub cols: usize,
}

/// How strict [`host_array`] is about a tensor it would have to copy.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Use {
    /// A base tensor the gate borrows for its lifetime: zero copy, so a non-contiguous tensor is
    /// an error; a device tensor is copied to the host once, with a logged warning.
    Borrow,
    /// LoRA factors, which the library copies anyway: anything array-like is made contiguous.
    Copy,
}

impl HostArray {
    pub fn len_bytes(&self) -> usize {
        self.rows * self.cols * self.dtype.size()
    }

    /// The elements as a tensor view.
    ///
    /// # Safety
    /// Valid while `owner` is alive and nobody resizes it; both hold as long as `self` lives and
    /// the caller does not mutate the array concurrently.
    pub unsafe fn view(&self) -> intruder_gate::Result<TensorRef<'_>> {
        let bytes = std::slice::from_raw_parts(self.ptr as *const u8, self.len_bytes());
        TensorRef::new(self.dtype, self.rows, self.cols, bytes)
    }

    /// Row-major f32 copy (f16 / bf16 / f64 converted by the library).
    pub fn to_f32(&self) -> intruder_gate::Result<Vec<f32>> {
        // SAFETY: `self` holds the owner.
        unsafe { self.view() }.map(|t| t.to_f32())
    }
}

fn err(kind: ErrorKind, msg: String) -> PyErr {
    errors::to_py(Error::new(kind, msg))
}

fn is_torch(obj: &Bound<'_, PyAny>) -> PyResult<bool> {
    let module: String = obj.get_type().getattr("__module__")?.extract()?;
    Ok(module.starts_with("torch") && obj.hasattr("data_ptr")?)
}

/// `obj` (numpy array, torch tensor or, for [`Use::Copy`], anything `numpy.asarray` takes) as a
/// 2-D host tensor. `what` names it in errors.
pub fn host_array(obj: &Bound<'_, PyAny>, what: &str, mode: Use) -> PyResult<HostArray> {
    if is_torch(obj)? {
        torch_array(obj, what, mode)
    } else {
        numpy_array(obj, what, mode)
    }
}

fn two_dims(shape: &[usize], what: &str) -> PyResult<(usize, usize)> {
    match shape {
        [r, c] => Ok((*r, *c)),
        _ => Err(err(
            ErrorKind::Shape,
            format!("{what}: expected a 2-D tensor, got shape {shape:?}"),
        )),
    }
}

fn torch_array(obj: &Bound<'_, PyAny>, what: &str, mode: Use) -> PyResult<HostArray> {
    let py = obj.py();
    // detach(): same storage, no autograd on the view.
    let mut t = obj.call_method0("detach")?;
    let device: String = t.getattr("device")?.getattr("type")?.extract()?;
    if device == "meta" {
        return Err(err(
            ErrorKind::InvalidArgument,
            format!("{what}: a meta tensor has no data"),
        ));
    }
    if device != "cpu" {
        if mode == Use::Borrow {
            let shape: Vec<usize> = t.getattr("shape")?.extract()?;
            py.import("logging")?
                .call_method1("getLogger", ("intruder_gate",))?
                .call_method1(
                    "warning",
                    (format!(
                        "{what}: {device} tensor {shape:?} copied to host memory once (the gate \
                         reads base weights from the host)"
                    ),),
                )?;
        }
        t = t.call_method1("to", ("cpu",))?;
    }
    let dtype = match t.getattr("dtype")?.str()?.to_str()? {
        "torch.float32" => DType::F32,
        "torch.float16" => DType::F16,
        "torch.bfloat16" => DType::BF16,
        "torch.float64" => DType::F64,
        other => {
            return Err(err(
                ErrorKind::Unsupported,
                format!("{what}: dtype {other} is not supported (float32, float16, bfloat16, float64)"),
            ))
        }
    };
    let shape: Vec<usize> = t.getattr("shape")?.extract()?;
    let (rows, cols) = two_dims(&shape, what)?;
    if !t.call_method0("is_contiguous")?.extract::<bool>()? {
        if mode == Use::Borrow {
            return Err(err(
                ErrorKind::InvalidArgument,
                format!(
                    "{what}: tensor is not contiguous; base tensors are borrowed without a copy, \
                     pass tensor.contiguous()"
                ),
            ));
        }
        t = t.call_method0("contiguous")?;
    }
    let ptr: usize = t.call_method0("data_ptr")?.extract()?;
    Ok(HostArray {
        _owner: t.unbind(),
        ptr,
        dtype,
        rows,
        cols,
    })
}

fn numpy_array(obj: &Bound<'_, PyAny>, what: &str, mode: Use) -> PyResult<HostArray> {
    let py = obj.py();
    let np = py.import("numpy")?;
    let mut arr = if obj.hasattr("__array_interface__")? {
        obj.clone()
    } else {
        np.call_method1("asarray", (obj,))?
    };
    let mut iface = interface(&arr)?;
    if !iface.contiguous {
        if mode == Use::Borrow {
            return Err(err(
                ErrorKind::InvalidArgument,
                format!(
                    "{what}: array is not C-contiguous; base tensors are borrowed without a copy, \
                     pass numpy.ascontiguousarray(a)"
                ),
            ));
        }
        arr = np.call_method1("ascontiguousarray", (arr,))?;
        iface = interface(&arr)?;
    }
    let dtype = match iface.typestr.as_str() {
        "<f4" => DType::F32,
        "<f2" => DType::F16,
        "<f8" => DType::F64,
        other => {
            return Err(err(
                ErrorKind::Unsupported,
                format!(
                    "{what}: array dtype {other} is not supported (little-endian float32, float16, \
                     float64; bfloat16 through a torch tensor)"
                ),
            ))
        }
    };
    let (rows, cols) = two_dims(&iface.shape, what)?;
    Ok(HostArray {
        _owner: arr.unbind(),
        ptr: iface.ptr,
        dtype,
        rows,
        cols,
    })
}

struct Interface {
    ptr: usize,
    shape: Vec<usize>,
    typestr: String,
    contiguous: bool,
}

fn interface(arr: &Bound<'_, PyAny>) -> PyResult<Interface> {
    let d = arr.getattr("__array_interface__")?;
    let d = d.cast::<PyDict>()?;
    let get = |k: &str| -> PyResult<Bound<'_, PyAny>> {
        d.get_item(k)?.ok_or_else(|| {
            err(
                ErrorKind::InvalidArgument,
                format!("__array_interface__ has no `{k}`"),
            )
        })
    };
    let shape: Vec<usize> = get("shape")?.extract()?;
    let typestr: String = get("typestr")?.extract()?;
    let data = get("data")?;
    let ptr: usize = data.cast::<PyTuple>()?.get_item(0)?.extract()?;
    let strides = d.get_item("strides")?.filter(|s| !s.is_none());
    let contiguous = match strides {
        None => true,
        Some(s) => {
            let strides: Vec<isize> = s.extract()?;
            let item = typestr[2..].parse::<isize>().unwrap_or(0);
            let mut want = item;
            let mut ok = true;
            for (i, &n) in shape.iter().enumerate().rev() {
                // A dimension of length 1 may carry any stride.
                if n > 1 && strides[i] != want {
                    ok = false;
                }
                want *= n as isize;
            }
            ok
        }
    };
    Ok(Interface {
        ptr,
        shape,
        typestr,
        contiguous,
    })
}
