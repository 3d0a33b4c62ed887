//! `ig_adapter`: LoRA factors the host holds in memory, or loaded from a PEFT directory.

use super::{
    arg, ffi_try, ffi_value, free_handle, ig_dtype, ig_status, into_handle, out_arg, str_arg,
    Failure, IG_DTYPE_BF16, IG_DTYPE_F16, IG_DTYPE_F32, IG_STATUS_INVALID_ARGUMENT,
};
use crate::adapter::{self, load_peft_dir, validate_module, Adapter, LoraModule};
use crate::limits::Limits;
use crate::tensor::{DType, TensorRef};
use std::ffi::{c_char, c_void, CString};
use std::path::{Path, PathBuf};

/// An adapter: a list of LoRA modules with their factors copied to f32. Opaque.
pub struct ig_adapter {
    name: String,
    modules: Vec<LoraModule>,
    /// `modules[i].name` as C strings, for `ig_adapter_module`.
    c_names: Vec<CString>,
    fan_in_fan_out: bool,
    /// The PEFT directory it came from (directly or, when clamped, through its original), whose
    /// `adapter_config.json` fields `ig_adapter_write_peft` keeps.
    source: Option<PathBuf>,
    /// What `ig_adapter_write_peft` records in the safetensors metadata.
    provenance: serde_json::Value,
}

impl ig_adapter {
    /// The adapter as the gate screens it, validated against the gate's limits.
    pub(crate) fn to_adapter(&self, limits: &Limits) -> crate::Result<Adapter> {
        let mut a = Adapter::from_modules(&self.name, self.modules.clone(), limits)?;
        a.fan_in_fan_out = self.fan_in_fan_out;
        a.path.clone_from(&self.source);
        Ok(a)
    }

    /// A handle for a loaded or clamped adapter.
    pub(crate) fn from_adapter(
        a: Adapter,
        source: Option<PathBuf>,
        provenance: serde_json::Value,
    ) -> Result<Self, Failure> {
        let c_names = a
            .modules
            .iter()
            .map(|m| CString::new(m.name.clone()))
            .collect::<Result<_, _>>()
            .map_err(|_| Failure::new(super::IG_STATUS_FORMAT, "a module name contains NUL"))?;
        Ok(ig_adapter {
            name: a.name,
            modules: a.modules,
            c_names,
            fan_in_fan_out: a.fan_in_fan_out,
            source,
            provenance,
        })
    }
}

fn tool_provenance() -> serde_json::Value {
    serde_json::json!({ "tool": adapter::TOOL })
}

/// One module's factors, borrowed from an `ig_adapter` (valid until it is freed or changed).
#[repr(C)]
pub struct ig_lora_factors {
    /// Module path (for modules added with `ig_adapter_add_module`: the base tensor name
    /// without a trailing ".weight").
    pub name: *const c_char,
    pub rank: usize,
    pub in_features: usize,
    pub out_features: usize,
    /// ΔW = scale · B · A.
    pub scale: f32,
    /// A, `[rank, in_features]`, row-major f32.
    pub lora_a: *const f32,
    /// B, `[out_features, rank]`, row-major f32.
    pub lora_b: *const f32,
}

pub(crate) fn dtype_of(dtype: ig_dtype) -> Result<DType, Failure> {
    match dtype {
        IG_DTYPE_F32 => Ok(DType::F32),
        IG_DTYPE_F16 => Ok(DType::F16),
        IG_DTYPE_BF16 => Ok(DType::BF16),
        d => Err(Failure::new(
            IG_STATUS_INVALID_ARGUMENT,
            format!("unknown ig_dtype {d}"),
        )),
    }
}

/// Copies `rows × cols` elements of `dtype` from host memory and converts them to f32.
///
/// # Safety
/// `data` points to `rows · cols` readable elements of `dtype`.
pub(crate) unsafe fn host_f32(
    data: *const c_void,
    dtype: DType,
    rows: usize,
    cols: usize,
    what: &str,
) -> Result<Vec<f32>, Failure> {
    if data.is_null() {
        return Err(super::invalid(what));
    }
    let len = rows
        .checked_mul(cols)
        .and_then(|n| n.checked_mul(dtype.size()))
        .filter(|&n| n <= isize::MAX as usize)
        .ok_or_else(|| {
            crate::error::Error::new(
                crate::ErrorKind::Limit,
                format!("{what}: [{rows}, {cols}] is too large"),
            )
        })?;
    let bytes = std::slice::from_raw_parts(data.cast::<u8>(), len);
    Ok(TensorRef::new(dtype, rows, cols, bytes)?.to_f32())
}

/// A new, empty adapter for modules the host holds in memory. NULL only on an internal panic.
/// Free with `ig_adapter_free`.
#[no_mangle]
pub extern "C" fn ig_adapter_new() -> *mut ig_adapter {
    ffi_value(std::ptr::null_mut(), || {
        into_handle(ig_adapter {
            name: "<host memory>".into(),
            modules: Vec::new(),
            c_names: Vec::new(),
            fan_in_fan_out: false,
            source: None,
            provenance: tool_provenance(),
        })
    })
}

/// Adds one LoRA module adapting base tensor `base_tensor` (e.g.
/// "encoder.layer.0.attention.self.query.weight", shape `[out_features, in_features]`):
/// ΔW = scale · B · A with A `[rank, in_features]` and B `[out_features, rank]`, row-major,
/// both of `dtype` (f32, f16 or bf16). The factors are copied (as f32): the host may free them
/// when this returns. Fails with IG_STATUS_SHAPE, IG_STATUS_NON_FINITE or IG_STATUS_LIMIT on
/// bad factors, IG_STATUS_INVALID_ARGUMENT when the module was already added; the adapter is
/// unchanged then.
///
/// # Safety
/// `a` is NULL or a live adapter not used by another thread during the call; `base_tensor` is
/// NULL or NUL-terminated; `lora_a` / `lora_b` are NULL or point to `rank · in_features` /
/// `out_features · rank` elements of `dtype`.
#[no_mangle]
#[allow(clippy::too_many_arguments)]
pub unsafe extern "C" fn ig_adapter_add_module(
    a: *mut ig_adapter,
    base_tensor: *const c_char,
    lora_a: *const c_void,
    lora_b: *const c_void,
    dtype: ig_dtype,
    rank: usize,
    in_features: usize,
    out_features: usize,
    scale: f32,
) -> ig_status {
    ffi_try(|| {
        let a = a.as_mut().ok_or_else(|| super::invalid("adapter"))?;
        let base_tensor = str_arg(base_tensor, "base_tensor")?;
        let dtype = dtype_of(dtype)?;
        let mut module = LoraModule {
            name: base_tensor
                .strip_suffix(".weight")
                .unwrap_or(base_tensor)
                .to_string(),
            rank,
            in_features,
            out_features,
            a: Vec::new(),
            b: Vec::new(),
            alpha: scale as f64 * rank as f64,
            scale: scale as f64,
            dtype,
            magnitude: None,
        };
        let limits = Limits::default();
        // An absurd shape is refused before anything is read or allocated (validate_module
        // reports which limit).
        if rank > limits.max_rank || in_features > limits.max_dim || out_features > limits.max_dim {
            validate_module(&module, &limits)?;
        }
        module.a = host_f32(lora_a, dtype, rank, in_features, "lora_a")?;
        module.b = host_f32(lora_b, dtype, out_features, rank, "lora_b")?;
        validate_module(&module, &limits)?;
        if a.modules.iter().any(|m| m.name == module.name) {
            return Err(Failure::new(
                IG_STATUS_INVALID_ARGUMENT,
                format!("module `{}` was already added to this adapter", module.name),
            ));
        }
        let c_name = CString::new(module.name.clone()).expect("came from a C string");
        a.modules.push(module);
        a.c_names.push(c_name);
        Ok(())
    })
}

/// Names the adapter (default "<host memory>"; for PEFT directories, the directory's name): the
/// name reports, events and the `intruder_gate_adapter_intruders` metric show. Copied.
///
/// # Safety
/// `a` is NULL or a live adapter not used by another thread during the call; `name` is NULL or
/// NUL-terminated.
#[no_mangle]
pub unsafe extern "C" fn ig_adapter_set_name(a: *mut ig_adapter, name: *const c_char) -> ig_status {
    ffi_try(|| {
        let a = a.as_mut().ok_or_else(|| super::invalid("adapter"))?;
        a.name = str_arg(name, "name")?.to_string();
        Ok(())
    })
}

/// Loads a PEFT adapter directory (adapter_config.json + adapter_model.safetensors) into
/// memory, e.g. to keep its factors for serving. `*out` is written only on success; free it
/// with `ig_adapter_free`.
///
/// # Safety
/// `dir` is NULL or NUL-terminated; `out` is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn ig_adapter_load_peft(
    dir: *const c_char,
    out: *mut *mut ig_adapter,
) -> ig_status {
    ffi_try(|| {
        let dir = str_arg(dir, "adapter_dir")?;
        let out = out_arg(out, "out")?;
        let loaded = load_peft_dir(Path::new(dir), &Limits::default())?;
        let source = loaded.path.clone();
        *out = into_handle(ig_adapter::from_adapter(loaded, source, tool_provenance())?);
        Ok(())
    })
}

/// Number of modules in the adapter (0 for NULL).
///
/// # Safety
/// `a` is NULL or a live adapter.
#[no_mangle]
pub unsafe extern "C" fn ig_adapter_module_count(a: *const ig_adapter) -> usize {
    ffi_value(0, || a.as_ref().map_or(0, |a| a.modules.len()))
}

/// Module `i` (0-based, in the order added or, for PEFT directories and clamped adapters,
/// sorted by name). The pointers in `*out` stay valid until the adapter is freed or a module is
/// added.
///
/// # Safety
/// `a` is NULL or a live adapter; `out` is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn ig_adapter_module(
    a: *const ig_adapter,
    i: usize,
    out: *mut ig_lora_factors,
) -> ig_status {
    ffi_try(|| {
        let a = arg(a, "adapter")?;
        let out = out_arg(out, "out")?;
        let m = a.modules.get(i).ok_or_else(|| {
            Failure::new(
                IG_STATUS_INVALID_ARGUMENT,
                format!(
                    "module index {i} out of range (adapter has {})",
                    a.modules.len()
                ),
            )
        })?;
        *out = ig_lora_factors {
            name: a.c_names[i].as_ptr(),
            rank: m.rank,
            in_features: m.in_features,
            out_features: m.out_features,
            scale: m.scale as f32,
            lora_a: m.a.as_ptr(),
            lora_b: m.b.as_ptr(),
        };
        Ok(())
    })
}

/// Writes the adapter as a standard PEFT directory (`adapter_config.json` +
/// `adapter_model.safetensors`, each module in the dtype it was given or loaded in), which
/// `ig_adapter_load_peft`, PEFT's `from_pretrained` and vLLM load. `dir` and missing parents are
/// created. Atomic: a new directory appears whole; in an existing one each of the two files is
/// replaced by a rename (other files are left alone); on failure `dir` is left as it was. An
/// adapter read from a PEFT directory (or clamped from one) keeps that config's other fields
/// (task type, base model, …). Fails with IG_STATUS_INVALID_ARGUMENT for rsLoRA scales (only
/// scale = lora_alpha / r can be written; clamped adapters always can), IG_STATUS_IO when the
/// directory cannot be written.
///
/// # Safety
/// `a` is NULL or a live adapter not being changed; `dir` is NULL or NUL-terminated.
#[no_mangle]
pub unsafe extern "C" fn ig_adapter_write_peft(
    a: *const ig_adapter,
    dir: *const c_char,
) -> ig_status {
    ffi_try(|| {
        let a = arg(a, "adapter")?;
        let dir = str_arg(dir, "dir")?;
        let adapter = a.to_adapter(&Limits::default())?;
        Ok(adapter::write_peft_dir(
            Path::new(dir),
            &adapter,
            a.source.as_deref(),
            &a.provenance,
        )?)
    })
}

/// Frees an adapter. NULL is a no-op. Reports screened from it stay valid.
///
/// # Safety
/// `a` is NULL or came from `ig_adapter_new`, `ig_adapter_load_peft` or `ig_gate_clamp` and was
/// not freed before.
#[no_mangle]
pub unsafe extern "C" fn ig_adapter_free(a: *mut ig_adapter) {
    free_handle(a)
}
