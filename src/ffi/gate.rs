//! `ig_gate`: one base model, screened against from any number of threads.

use super::{
    arg, config_or_default, dtype_of, ffi_try, free_handle, ig_adapter, ig_config, ig_dtype,
    ig_report, ig_status, ig_verdict, into_handle, out_arg, str_arg, text_out, Failure,
    IG_STATUS_BUFFER_TOO_SMALL, IG_VERDICT_ERROR,
};
use crate::gate::{Gate, ScreenEvent};
use crate::metrics::ScreenOutcome;
use std::ffi::{c_char, c_void, CString};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

/// A gate: a base model and its spectrum cache. Opaque. Thread-safe: every function taking a
/// gate may be called from many threads at once on the same gate.
pub struct ig_gate {
    pub(crate) gate: Gate,
    /// Unique in the process (addresses are reused), so a report knows which gate screened it.
    pub(crate) id: u64,
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
        static NEXT_ID: AtomicU64 = AtomicU64::new(1);
        let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
        *out = into_handle(ig_gate { gate, id });
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
/// leaves the gate exactly as it was. The report keeps a copy of the adapter's factors (f32),
/// for `ig_gate_clamp`, until it is freed.
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
        let (report, adapter, solutions) = g.gate.load_and_screen_with_solutions(Path::new(dir))?;
        *out = into_handle(ig_report::new(report, g.id, adapter, solutions)?);
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
        let (report, solutions) = g.gate.screen_with_solutions(&adapter)?;
        *out = into_handle(ig_report::new(report, g.id, Some(adapter), solutions)?);
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

/// The gate's metrics in the Prometheus text exposition format 0.0.4 (serve it with
/// `Content-Type: text/plain; version=0.0.4; charset=utf-8`; see README, "Monitoring"). Same
/// buffer convention as `ig_report_json`; the text grows as adapters are screened, so call
/// again with `*needed` bytes when IG_STATUS_BUFFER_TOO_SMALL comes back.
///
/// # Safety
/// `g` is NULL or a live gate; `buf` is NULL or holds `cap` writable bytes; `needed` is NULL or
/// writable.
#[no_mangle]
pub unsafe extern "C" fn ig_gate_metrics(
    g: *const ig_gate,
    buf: *mut c_char,
    cap: usize,
    needed: *mut usize,
) -> ig_status {
    ffi_try(|| {
        let g = arg(g, "gate")?;
        text_out(
            &g.gate.metrics().render(),
            buf,
            cap,
            needed,
            "the metrics text",
        )
    })
}

/// One finished screening, as told to an `ig_event_callback`.
#[repr(C)]
pub struct ig_event {
    /// The adapter's name (its directory's, the one given to `ig_adapter_set_name`, or
    /// "<host memory>"); valid only during the call.
    pub adapter: *const c_char,
    /// IG_VERDICT_ACCEPT … IG_VERDICT_REJECT, or IG_VERDICT_ERROR when the screening failed.
    pub verdict: ig_verdict,
    /// Intruder dimensions over all modules (0 on error).
    pub intruders: u64,
    /// Modules screened (0 on error).
    pub modules: u64,
    /// Wall time of the screening.
    pub duration_seconds: f64,
}

/// Called after every screening with the event and the `user_data` given to
/// `ig_gate_set_event_callback`.
pub type ig_event_callback =
    Option<unsafe extern "C" fn(event: *const ig_event, user_data: *mut c_void)>;

/// The host's `user_data`, which it promises may be used from any screening thread.
struct UserData(*mut c_void);

// SAFETY: the contract of ig_gate_set_event_callback makes thread safety the host's promise.
unsafe impl Send for UserData {}
unsafe impl Sync for UserData {}

impl UserData {
    // A method, so closures capture the whole Send + Sync wrapper, not its raw pointer field.
    fn get(&self) -> *mut c_void {
        self.0
    }
}

fn verdict_of(outcome: ScreenOutcome) -> ig_verdict {
    match outcome {
        ScreenOutcome::Verdict(v) => super::report::ig_verdict_of(v),
        ScreenOutcome::Error => IG_VERDICT_ERROR,
    }
}

/// Sets the callback called after every screening on this gate (NULL `cb` clears it), after
/// the screening's metrics are recorded and before the screening call returns.
///
/// Contract:
/// - It runs on the screening thread, so concurrently when several threads screen: it and
///   `user_data` must be thread-safe. It must return quickly and must not throw.
/// - It must not free the gate nor call `ig_gate_set_event_callback` on the same gate (that
///   call waits for running callbacks: a deadlock). It may call the other functions on the gate,
///   e.g. `ig_gate_metrics`.
/// - Once this returns, the previous callback is not running and is never called again, so its
///   `user_data` may be freed.
///
/// # Safety
/// `g` is NULL or a live gate; `cb` is NULL or a function following the contract above.
#[no_mangle]
pub unsafe extern "C" fn ig_gate_set_event_callback(
    g: *mut ig_gate,
    cb: ig_event_callback,
    user_data: *mut c_void,
) -> ig_status {
    ffi_try(|| {
        let g = arg(g, "gate")?;
        let hook = cb.map(|cb| {
            let user_data = UserData(user_data);
            Box::new(move |e: &ScreenEvent<'_>| {
                // A name cannot hold a NUL in C: the host sees it up to the first one.
                let name = e.adapter.split('\0').next().unwrap_or_default();
                let name = CString::new(name).expect("split at every NUL");
                let event = ig_event {
                    adapter: name.as_ptr(),
                    verdict: verdict_of(e.outcome),
                    intruders: e.intruders,
                    modules: e.modules,
                    duration_seconds: e.seconds,
                };
                cb(&event, user_data.get());
            }) as crate::gate::EventHook
        });
        g.gate.set_event_hook(hook);
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
