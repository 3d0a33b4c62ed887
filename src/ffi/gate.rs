//! `ig_gate`: one base model, screened against from any number of threads.

use super::{
    arg, config_or_default, dtype_of, ffi_try, free_handle, ig_adapter, ig_config, ig_dtype,
    ig_report, ig_status, into_handle, out_arg, str_arg, Failure, IG_STATUS_BUFFER_TOO_SMALL,
};
use crate::gate::Gate;
use std::ffi::{c_char, c_void};
use std::path::Path;

/// A gate: a base model and its spectrum cache. Opaque. Thread-safe: every function taking a
/// gate may be called from many threads at once on the same gate.
pub struct ig_gate {
    gate: Gate,
}

/// Creates a gate with the settings in `c` (copied; NULL = defaults). `*out` is written only on
/// success; free it with `ig_gate_free`.
///
/// # Safety
/// `c` is NULL or a live config; `out` is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn ig_gate_new(c: *const ig_config, out: *mut *mut ig_gate) -> ig_status {
    ffi_try(|| {
        let out = out_arg(out, "out")?;
        let gate = Gate::new(config_or_default(c))?;
        *out = into_handle(ig_gate { gate });
        Ok(())
    })
}

/// Attaches the base model: a safetensors file, or a directory holding one or a sharded set.
/// Once per gate (a second call fails with IG_STATUS_INVALID_ARGUMENT). The file is memory
/// mapped and must not change while the gate lives. On failure the gate is unchanged.
///
/// # Safety
/// `g` is NULL or a live gate; `base_path` is NULL or NUL-terminated.
#[no_mangle]
pub unsafe extern "C" fn ig_gate_attach_base(
    g: *mut ig_gate,
    base_path: *const c_char,
) -> ig_status {
    ffi_try(|| {
        let g = arg(g, "gate")?;
        let path = str_arg(base_path, "base_path")?;
        Ok(g.gate.attach_base(Path::new(path))?)
    })
}

/// Attaches one base tensor from host memory: `rows × cols` (PyTorch `Linear` layout
/// `[out, in]`), row-major, of `dtype`. Borrowed, not copied: the host keeps `data` alive and
/// unchanged while the gate lives. Names must be unique across the base.
///
/// # Safety
/// `g` is NULL or a live gate; `name` is NULL or NUL-terminated; `data` is NULL or points to
/// `rows · cols` elements of `dtype` that outlive the gate unchanged.
#[no_mangle]
pub unsafe extern "C" fn ig_gate_attach_base_tensor(
    g: *mut ig_gate,
    name: *const c_char,
    data: *const c_void,
    dtype: ig_dtype,
    rows: usize,
    cols: usize,
) -> ig_status {
    ffi_try(|| {
        let g = arg(g, "gate")?;
        let name = str_arg(name, "name")?;
        if data.is_null() {
            return Err(super::invalid("data"));
        }
        let dtype = dtype_of(dtype)?;
        Ok(g.gate
            .attach_base_tensor(name, data.cast(), dtype, rows, cols)?)
    })
}

/// Loads and screens a PEFT adapter directory. `*out` is written only on success; free it with
/// `ig_report_free`. A failure (unreadable or malformed adapter, modules not in the base, …)
/// leaves the gate exactly as it was.
///
/// # Safety
/// `g` is NULL or a live gate; `adapter_dir` is NULL or NUL-terminated; `out` is NULL or
/// writable.
#[no_mangle]
pub unsafe extern "C" fn ig_gate_screen_adapter(
    g: *mut ig_gate,
    adapter_dir: *const c_char,
    out: *mut *mut ig_report,
) -> ig_status {
    ffi_try(|| {
        let g = arg(g, "gate")?;
        let dir = str_arg(adapter_dir, "adapter_dir")?;
        let out = out_arg(out, "out")?;
        let report = g.gate.screen_adapter_dir(Path::new(dir))?;
        *out = into_handle(ig_report::new(report)?);
        Ok(())
    })
}

/// Screens an adapter held in memory. Same rules as `ig_gate_screen_adapter`; the adapter is
/// only read, so one adapter may be screened by several threads at once.
///
/// # Safety
/// `g` is NULL or a live gate; `a` is NULL or a live adapter not being changed; `out` is NULL
/// or writable.
#[no_mangle]
pub unsafe extern "C" fn ig_gate_screen(
    g: *mut ig_gate,
    a: *const ig_adapter,
    out: *mut *mut ig_report,
) -> ig_status {
    ffi_try(|| {
        let g = arg(g, "gate")?;
        let a = arg(a, "adapter")?;
        let out = out_arg(out, "out")?;
        let adapter = a.to_adapter(&g.gate.config().limits)?;
        let report = g.gate.screen(&adapter)?;
        *out = into_handle(ig_report::new(report)?);
        Ok(())
    })
}

/// Copies base tensor `name` as row-major f32 into `buf` (capacity `cap` floats), e.g. for a
/// host that merges adapters into its own copy of the weights. Writes `*rows` and `*cols` on
/// success and on IG_STATUS_BUFFER_TOO_SMALL (so `buf` may be NULL with `cap` 0 to ask);
/// IG_STATUS_BASE_MISMATCH when there is no such tensor.
///
/// # Safety
/// `g` is NULL or a live gate; `name` is NULL or NUL-terminated; `buf` is NULL or holds `cap`
/// writable floats; `rows` and `cols` are NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn ig_gate_copy_base_tensor(
    g: *const ig_gate,
    name: *const c_char,
    buf: *mut f32,
    cap: usize,
    rows: *mut usize,
    cols: *mut usize,
) -> ig_status {
    ffi_try(|| {
        let g = arg(g, "gate")?;
        let name = str_arg(name, "name")?;
        let (rows, cols) = (out_arg(rows, "rows")?, out_arg(cols, "cols")?);
        let (r, c, values) = g.gate.base_tensor_f32(name)?;
        (*rows, *cols) = (r, c);
        if cap < values.len() || buf.is_null() {
            return Err(Failure::new(
                IG_STATUS_BUFFER_TOO_SMALL,
                format!(
                    "base tensor `{name}` needs {} floats, buffer holds {cap}",
                    values.len()
                ),
            ));
        }
        std::ptr::copy_nonoverlapping(values.as_ptr(), buf, values.len());
        Ok(())
    })
}

/// Frees a gate. NULL is a no-op. No other thread may be using it; reports stay valid.
///
/// # Safety
/// `g` is NULL or came from `ig_gate_new` and was not freed before.
#[no_mangle]
pub unsafe extern "C" fn ig_gate_free(g: *mut ig_gate) {
    free_handle(g)
}
