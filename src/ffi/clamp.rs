//! `ig_gate_clamp`: the paper's intervention on a screened adapter, returned as a new
//! `ig_adapter` the host activates through `ig_adapter_module` or writes with
//! `ig_adapter_write_peft`.

use super::{
    arg, ffi_try, ig_adapter, ig_gate, ig_report, ig_status, into_handle, out_arg, Failure,
    IG_STATUS_INVALID_ARGUMENT,
};
use crate::clamp::{check_pad_rank, ClampMode, ClampOptions, Target};
use crate::limits::Limits;

/// Which intruders of each module `ig_gate_clamp` scales.
pub type ig_clamp_target = u32;
/// Every intruder among the top k (PEFT's `reduce_intruder_dimension`).
pub const IG_CLAMP_TARGET_ALL: ig_clamp_target = 0;
/// The highest-ranked intruder (the paper's experiments).
pub const IG_CLAMP_TARGET_TOP1: ig_clamp_target = 1;

/// How `ig_gate_clamp` returns the clamped update ΔW''.
pub type ig_clamp_mode = u32;
/// Exactly, as a LoRA of rank r + m (m = directions clamped in that module): nothing but the
/// clamped singular values changes.
pub const IG_CLAMP_MODE_EXACT: ig_clamp_mode = 0;
/// Its best rank-r approximation (what PEFT does): the rank is kept, and every singular value
/// may move by up to the truncation error.
pub const IG_CLAMP_MODE_RANK_PRESERVING: ig_clamp_mode = 1;

fn invalid(message: String) -> Failure {
    Failure::new(IG_STATUS_INVALID_ARGUMENT, message)
}

/// Clamps the adapter report `r` was screened from: in each module, each intruder that `target`
/// selects among those the report lists has its singular value σ'_j scaled to λ·σ'_j (README,
/// "The clamp"). `lambda` is finite and ≥ 0: 0 removes the direction, 1 changes nothing, the
/// paper used 0.3–0.75 (above 1 amplifies the intruder).
///
/// `*out` gets a new adapter with every module of the original, clamped or not, each with scale
/// 1 (the original scale is folded into B) and its factors rounded to the original's dtype (held
/// as f32). Read them with `ig_adapter_module` to activate them, or write them with
/// `ig_adapter_write_peft`; free it with `ig_adapter_free`. `pad_rank_to` > 0 pads every module
/// with zero rows of A / columns of B to that rank (for servers with a fixed maximum LoRA rank),
/// 0 leaves the ranks as they are.
///
/// `r` must come from a screening on this gate (`ig_gate_screen` or `ig_gate_screen_adapter`)
/// that succeeded. IG_STATUS_INVALID_ARGUMENT for a NULL pointer, a bad `lambda`, an unknown
/// `target` or `mode`, a report from another gate or from a failed screening (a `reject` report
/// carrying the error), or a `pad_rank_to` below a module's clamped rank; IG_STATUS_LIMIT for a
/// `pad_rank_to` over the rank limit (4096). On failure nothing is
/// written and nothing changes. Solves nothing again: the report keeps its screening's Brand
/// solutions (each intruder's singular vectors, `(out + in)` doubles each), so a clamp costs the
/// factor assembly only; a report of a dense-method gate keeps none, and its clamp costs about one
/// screening (base spectra from the cache). Safe to call from many threads at once, like screening.
///
/// # Safety
/// `g` is NULL or a live gate; `r` is NULL or a live report; `out` is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn ig_gate_clamp(
    g: *mut ig_gate,
    r: *const ig_report,
    lambda: f64,
    target: ig_clamp_target,
    mode: ig_clamp_mode,
    pad_rank_to: usize,
    out: *mut *mut ig_adapter,
) -> ig_status {
    ffi_try(|| {
        let g = arg(g, "gate")?;
        let r = arg(r, "report")?;
        let out = out_arg(out, "out")?;
        let opts = ClampOptions {
            lambda,
            target: match target {
                IG_CLAMP_TARGET_ALL => Target::All,
                IG_CLAMP_TARGET_TOP1 => Target::Top1,
                t => return Err(invalid(format!("unknown ig_clamp_target {t}"))),
            },
            mode: match mode {
                IG_CLAMP_MODE_EXACT => ClampMode::Exact,
                IG_CLAMP_MODE_RANK_PRESERVING => ClampMode::RankPreserving,
                m => return Err(invalid(format!("unknown ig_clamp_mode {m}"))),
            },
        };
        opts.validate()?;
        let pad = (pad_rank_to > 0).then_some(pad_rank_to);
        // Before the clamp's work, and before anything of that size is allocated.
        check_pad_rank(pad, &Limits::default())?;
        if r.gate != g.id {
            return Err(invalid(
                "the report was screened on another gate; clamp on the gate that screened it"
                    .into(),
            ));
        }
        let adapter = r.adapter.as_ref().ok_or_else(|| {
            let why = r.report.error.as_ref().map_or("", |e| e.message.as_str());
            invalid(format!(
                "the report has no adapter to clamp: its screening failed: {why}"
            ))
        })?;
        let clamped = if r.solutions.is_empty() {
            crate::clamp::clamp(&g.gate, adapter, &r.report, &opts)?
        } else {
            crate::clamp::clamp_solved(adapter, &r.report, &r.solutions, &opts)?
        };
        let modules = clamped.to_adapter(clamped.dtype, pad)?;
        *out = into_handle(ig_adapter::from_adapter(
            modules,
            clamped.source.clone(),
            clamped.provenance(),
        )?);
        Ok(())
    })
}
