//! `ig_config`: the settings of a gate, changed one at a time and checked at once.

use super::{ffi_try, ffi_value, free_handle, ig_status, into_handle, str_arg, Failure};
use crate::config::Config;
use crate::policy::Policy;
use std::ffi::c_char;
use std::path::PathBuf;

/// Settings for `ig_gate_new`. Opaque; create with `ig_config_new`, free with `ig_config_free`.
pub struct ig_config {
    pub(crate) config: Config,
}

/// Applies `change` to a copy and keeps it only when the result is valid, so a rejected setting
/// leaves the config as it was.
///
/// # Safety
/// `c` is NULL or a live `ig_config` not used by another thread during the call.
unsafe fn set(c: *mut ig_config, change: impl FnOnce(&mut Config)) -> Result<(), Failure> {
    let c = c.as_mut().ok_or_else(|| super::invalid("config"))?;
    let mut next = c.config.clone();
    change(&mut next);
    next.validate()?;
    c.config = next;
    Ok(())
}

/// New settings with the defaults: top_k 10, epsilon 0.5, method brand, backend auto, disk
/// cache in the user's cache directory ($XDG_CACHE_HOME/intruder-gate), the default policy.
/// An invalid adapter (malformed file, shape or NaN, modules not in the base) fails the call
/// with its status and `ig_last_error` rather than returning a `reject` report: C hosts branch
/// on statuses. NULL only on an internal panic. Free with `ig_config_free`.
#[no_mangle]
pub extern "C" fn ig_config_new() -> *mut ig_config {
    ffi_value(std::ptr::null_mut(), || {
        into_handle(ig_config {
            config: c_default(),
        })
    })
}

/// The library's defaults, except that invalid adapters fail the call (see `ig_config_new`).
fn c_default() -> Config {
    let mut config = Config::default();
    config.policy.on_invalid = crate::policy::OnInvalid::Fail;
    config
}

/// How many top singular vectors of the adapted weight are tested (1..=4096).
///
/// # Safety
/// `c` is NULL or a live config, not used by another thread during the call.
#[no_mangle]
pub unsafe extern "C" fn ig_config_set_top_k(c: *mut ig_config, k: u32) -> ig_status {
    ffi_try(|| set(c, |cfg| cfg.top_k = k as usize))
}

/// A singular vector is an intruder when its max |cos| with every base singular vector is below
/// `eps`, in (0, 1].
///
/// # Safety
/// `c` is NULL or a live config, not used by another thread during the call.
#[no_mangle]
pub unsafe extern "C" fn ig_config_set_epsilon(c: *mut ig_config, eps: f32) -> ig_status {
    ffi_try(|| set(c, |cfg| cfg.epsilon = eps as f64))
}

/// Directory of the on-disk base-spectrum cache; NULL disables the disk cache.
///
/// # Safety
/// `c` is NULL or a live config, not used by another thread during the call; `dir` is NULL or a
/// NUL-terminated UTF-8 string.
#[no_mangle]
pub unsafe extern "C" fn ig_config_set_cache_dir(
    c: *mut ig_config,
    dir: *const c_char,
) -> ig_status {
    ffi_try(|| {
        let dir = match dir.is_null() {
            true => None,
            false => Some(PathBuf::from(str_arg(dir, "dir")?)),
        };
        set(c, |cfg| cfg.cache_dir = dir)
    })
}

/// Sets the verdict rules from a policy document: JSON text (copied), the format of
/// `intruder-gate scan --policy` (README, "The policy"), e.g.
/// `{"rules": [{"metric": "total_intruders", "threshold": 1, "action": "clamp"}]}`. As there, a
/// document without `"on_invalid"` turns an invalid adapter into a `reject` report carrying the
/// error (see `ig_report_json`) rather than a failed call; add `"on_invalid": "fail"` to keep
/// the C default. Malformed JSON, an unknown metric or action, or a threshold out of range:
/// IG_STATUS_INVALID_ARGUMENT, and the config keeps its policy.
///
/// # Safety
/// `c` is NULL or a live config, not used by another thread during the call; `policy_json` is
/// NULL or a NUL-terminated UTF-8 string.
#[no_mangle]
pub unsafe extern "C" fn ig_config_set_policy_json(
    c: *mut ig_config,
    policy_json: *const c_char,
) -> ig_status {
    ffi_try(|| {
        if c.is_null() {
            return Err(super::invalid("config"));
        }
        let policy = Policy::parse(str_arg(policy_json, "policy_json")?)?;
        set(c, |cfg| cfg.policy = policy)
    })
}

/// How many distinct adapters the `intruder_gate_adapter_intruders` gauge keeps a series for,
/// the most recently screened ones (default 64; 0 drops the gauge). Bounds the label
/// cardinality, since adapter names come from outside.
///
/// # Safety
/// `c` is NULL or a live config, not used by another thread during the call.
#[no_mangle]
pub unsafe extern "C" fn ig_config_set_recent_adapters(c: *mut ig_config, n: usize) -> ig_status {
    ffi_try(|| set(c, |cfg| cfg.metrics.recent_adapters = n))
}

/// Frees a config. NULL is a no-op. Gates created from it keep their own copy.
///
/// # Safety
/// `c` is NULL or came from `ig_config_new` and was not freed before.
#[no_mangle]
pub unsafe extern "C" fn ig_config_free(c: *mut ig_config) {
    free_handle(c)
}

/// The settings `c` points to, or the defaults for NULL.
///
/// # Safety
/// `c` is NULL or a live config.
pub(crate) unsafe fn config_or_default(c: *const ig_config) -> Config {
    c.as_ref().map_or_else(c_default, |c| c.config.clone())
}
