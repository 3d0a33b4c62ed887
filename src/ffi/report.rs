//! `ig_report`: the result of one screening, read through getters or as JSON.

use super::{arg, ffi_try, ffi_value, free_handle, ig_status, out_arg, Failure};
use crate::adapter::Adapter;
use crate::gate::Solutions;
use crate::policy::Screened as _;
use crate::report::{Report, Verdict};
use std::ffi::{c_char, CString};

/// What the gate concluded about an adapter.
pub type ig_verdict = u32;
/// No intruder dimension: load it.
pub const IG_VERDICT_ACCEPT: ig_verdict = 0;
/// Intruder dimensions found: load it, but look at the report.
pub const IG_VERDICT_WARN: ig_verdict = 1;
/// Load only with the intruder directions damped (clamped factors).
pub const IG_VERDICT_CLAMP: ig_verdict = 2;
/// Do not load it.
pub const IG_VERDICT_REJECT: ig_verdict = 3;
/// Only in `ig_event`: the screening failed with an error.
pub const IG_VERDICT_ERROR: ig_verdict = 4;
/// Returned for a NULL report: not a verdict; treat it as a refusal.
pub const IG_VERDICT_INVALID: ig_verdict = 255;

/// A screening report. Opaque; immutable, so it may be read from many threads at once.
pub struct ig_report {
    pub(crate) report: Report,
    /// `(module, base_tensor)` of each module as C strings, for `ig_report_module`.
    c_names: Vec<(CString, CString)>,
    json: String,
    reason: String,
    /// The `ig_gate::id` of the gate that screened it.
    pub(crate) gate: u64,
    /// The adapter screened, for `ig_gate_clamp`; `None` when the screening failed (a `reject`
    /// report carrying the error).
    pub(crate) adapter: Option<Adapter>,
    /// The screening's Brand solutions (intruder vectors lifted), so that `ig_gate_clamp` solves
    /// nothing again; empty for the dense method or a failed screening. Immutable like the rest,
    /// and tied to `adapter` by the clamp's checks.
    pub(crate) solutions: Solutions,
}

impl ig_report {
    pub(crate) fn new(
        report: Report,
        gate: u64,
        adapter: Option<Adapter>,
        solutions: Solutions,
    ) -> Result<Self, Failure> {
        let c = |s: &str| {
            CString::new(s)
                .map_err(|_| Failure::new(super::IG_STATUS_FORMAT, "a name contains NUL"))
        };
        let c_names = report
            .modules
            .iter()
            .map(|m| Ok((c(&m.module)?, c(&m.base_tensor)?)))
            .collect::<Result<_, Failure>>()?;
        Ok(ig_report {
            json: report.to_json(),
            reason: report.reason(),
            adapter: adapter.filter(|_| report.error.is_none()),
            solutions,
            report,
            c_names,
            gate,
        })
    }
}

/// One screened module, borrowed from an `ig_report`.
#[repr(C)]
pub struct ig_module_summary {
    /// Adapter module path; valid while the report lives.
    pub name: *const c_char,
    /// The base tensor it adapts; valid while the report lives.
    pub base_tensor: *const c_char,
    /// Shape `[out_features, in_features]` of the base tensor.
    pub out_features: usize,
    pub in_features: usize,
    pub rank: u32,
    /// Number of intruder dimensions among the top-k singular vectors.
    pub intruders: u32,
    /// The smallest max |cos| over the top-k singular vectors (below epsilon = intruder).
    pub min_max_cos: f64,
}

/// The verdict; IG_VERDICT_INVALID for NULL.
///
/// # Safety
/// `r` is NULL or a live report.
#[no_mangle]
pub unsafe extern "C" fn ig_report_verdict(r: *const ig_report) -> ig_verdict {
    ffi_value(IG_VERDICT_INVALID, || {
        r.as_ref()
            .map_or(IG_VERDICT_INVALID, |r| ig_verdict_of(r.report.verdict))
    })
}

/// The one mapping of a verdict to its C value.
pub(super) fn ig_verdict_of(v: Verdict) -> ig_verdict {
    match v {
        Verdict::Accept => IG_VERDICT_ACCEPT,
        Verdict::Warn => IG_VERDICT_WARN,
        Verdict::Clamp => IG_VERDICT_CLAMP,
        Verdict::Reject => IG_VERDICT_REJECT,
    }
}

/// Intruder dimensions over all modules (0 for NULL).
///
/// # Safety
/// `r` is NULL or a live report.
#[no_mangle]
pub unsafe extern "C" fn ig_report_total_intruders(r: *const ig_report) -> u32 {
    ffi_value(0, || {
        r.as_ref().map_or(0, |r| saturate(r.report.total_intruders))
    })
}

/// Number of screened modules (0 for NULL).
///
/// # Safety
/// `r` is NULL or a live report.
#[no_mangle]
pub unsafe extern "C" fn ig_report_module_count(r: *const ig_report) -> usize {
    ffi_value(0, || r.as_ref().map_or(0, |r| r.report.modules.len()))
}

/// Module `i` (0-based, sorted by base tensor name). `*out` is written only on success.
///
/// # Safety
/// `r` is NULL or a live report; `out` is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn ig_report_module(
    r: *const ig_report,
    i: usize,
    out: *mut ig_module_summary,
) -> ig_status {
    ffi_try(|| {
        let r = arg(r, "report")?;
        let out = out_arg(out, "out")?;
        let m = r.report.modules.get(i).ok_or_else(|| {
            Failure::new(
                super::IG_STATUS_INVALID_ARGUMENT,
                format!(
                    "module index {i} out of range (report has {})",
                    r.report.modules.len()
                ),
            )
        })?;
        let (name, base_tensor) = &r.c_names[i];
        *out = ig_module_summary {
            name: name.as_ptr(),
            base_tensor: base_tensor.as_ptr(),
            out_features: m.shape[0],
            in_features: m.shape[1],
            rank: saturate(m.rank),
            intruders: saturate(m.intruders.len()),
            min_max_cos: m.min_max_cos(),
        };
        Ok(())
    })
}

/// The full report as JSON, the same schema as the CLI's `scan --format json`. Writes it with a
/// NUL into `buf` when it fits in `cap` bytes; otherwise returns IG_STATUS_BUFFER_TOO_SMALL and
/// writes nothing to `buf`. `*needed` (size including the NUL) is written in both cases, so
/// `buf` may be NULL with `cap` 0 to ask for the size first.
///
/// # Safety
/// `r` is NULL or a live report; `buf` is NULL or holds `cap` writable bytes; `needed` is NULL
/// or writable.
#[no_mangle]
pub unsafe extern "C" fn ig_report_json(
    r: *const ig_report,
    buf: *mut c_char,
    cap: usize,
    needed: *mut usize,
) -> ig_status {
    ffi_try(|| {
        let r = arg(r, "report")?;
        super::text_out(&r.json, buf, cap, needed, "the JSON report")
    })
}

/// Why the report's verdict is what it is, one line of UTF-8: the error of a report that carries
/// one (`"<kind> error: <message>"`), else the policy rules that fired, `; `-separated (e.g.
/// `"total_intruders = 7 ≥ 1 → reject"`), else `"no policy rule fired"`. Buffer convention as
/// [`ig_report_json`].
///
/// # Safety
/// As [`ig_report_json`].
#[no_mangle]
pub unsafe extern "C" fn ig_report_reason(
    r: *const ig_report,
    buf: *mut c_char,
    cap: usize,
    needed: *mut usize,
) -> ig_status {
    ffi_try(|| {
        let r = arg(r, "report")?;
        super::text_out(&r.reason, buf, cap, needed, "the reason")
    })
}

/// Frees a report. NULL is a no-op.
///
/// # Safety
/// `r` is NULL or came from a screening call and was not freed before.
#[no_mangle]
pub unsafe extern "C" fn ig_report_free(r: *mut ig_report) {
    free_handle(r)
}

fn saturate(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}
