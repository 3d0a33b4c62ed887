//! The C ABI (rustls-ffi style): opaque handles, `ig_status` results, out-params written only on
//! success, every pointer NULL-checked, every entry point behind `catch_unwind`. Nothing here
//! does maths; it translates between C and the Rust API. `build.rs` turns these files into
//! `include/intruder_gate.h` with cbindgen.
#![allow(non_camel_case_types)]

mod adapter;
mod clamp;
mod config;
mod gate;
mod report;

pub use adapter::*;
pub use clamp::*;
pub use config::*;
pub use gate::*;
pub use report::*;

use crate::error::{Error, ErrorKind};
use std::cell::RefCell;
use std::ffi::{c_char, CStr};
use std::panic::{catch_unwind, AssertUnwindSafe};

/// Bumped on any change that breaks source or binary compatibility of this header.
pub const IG_ABI_VERSION: u32 = 1;

/// The result of every fallible call. On anything but `IG_STATUS_OK`, `ig_last_error` holds
/// this thread's message.
pub type ig_status = u32;
/// Success.
pub const IG_STATUS_OK: ig_status = 0;
/// A NULL pointer, a bad setting, a non-UTF-8 string, or a call out of order.
pub const IG_STATUS_INVALID_ARGUMENT: ig_status = 1;
/// Reading a file failed (missing, unreadable).
pub const IG_STATUS_IO: ig_status = 2;
/// A file is malformed: corrupt safetensors, bad adapter_config.json, duplicate module.
pub const IG_STATUS_FORMAT: ig_status = 3;
/// Tensor shapes do not fit together (B·A vs the base tensor, rank 0, …).
pub const IG_STATUS_SHAPE: ig_status = 4;
/// NaN or Inf in an adapter tensor or scale.
pub const IG_STATUS_NON_FINITE: ig_status = 5;
/// Valid input refused on purpose (pickle weights, integer dtypes, …).
pub const IG_STATUS_UNSUPPORTED: ig_status = 6;
/// Adapter modules that match no base tensor (or several), or an adapter with no module.
pub const IG_STATUS_BASE_MISMATCH: ig_status = 7;
/// A size limit (file, header, rank, dimension) was exceeded.
pub const IG_STATUS_LIMIT: ig_status = 8;
/// The output buffer is too small; the needed size was written where the call says.
pub const IG_STATUS_BUFFER_TOO_SMALL: ig_status = 9;
/// The CUDA backend was asked for and cannot run.
pub const IG_STATUS_CUDA: ig_status = 10;
/// A bug: the library panicked. The handle stays usable; please report the message.
pub const IG_STATUS_PANIC: ig_status = 11;
/// A bug or numerical failure inside the library.
pub const IG_STATUS_INTERNAL: ig_status = 12;

/// Element type of tensors handed over from host memory (row-major, native little-endian).
pub type ig_dtype = u32;
pub const IG_DTYPE_F32: ig_dtype = 0;
pub const IG_DTYPE_F16: ig_dtype = 1;
pub const IG_DTYPE_BF16: ig_dtype = 2;

thread_local! {
    static LAST_ERROR: RefCell<String> = const { RefCell::new(String::new()) };
}

/// Why a call failed: a status and the message `ig_last_error` will return.
pub(crate) struct Failure {
    status: ig_status,
    message: String,
}

impl Failure {
    pub(crate) fn new(status: ig_status, message: impl Into<String>) -> Self {
        Failure {
            status,
            message: message.into(),
        }
    }
}

impl From<Error> for Failure {
    fn from(e: Error) -> Self {
        Failure::new(status_of(e.kind()), e.message())
    }
}

fn status_of(kind: ErrorKind) -> ig_status {
    match kind {
        ErrorKind::InvalidArgument => IG_STATUS_INVALID_ARGUMENT,
        ErrorKind::Io => IG_STATUS_IO,
        ErrorKind::Format => IG_STATUS_FORMAT,
        ErrorKind::Shape => IG_STATUS_SHAPE,
        ErrorKind::NonFinite => IG_STATUS_NON_FINITE,
        ErrorKind::Unsupported => IG_STATUS_UNSUPPORTED,
        ErrorKind::BaseMismatch => IG_STATUS_BASE_MISMATCH,
        ErrorKind::Limit => IG_STATUS_LIMIT,
        ErrorKind::Cuda => IG_STATUS_CUDA,
        ErrorKind::Internal => IG_STATUS_INTERNAL,
    }
}

fn set_last_error(message: String) {
    LAST_ERROR.with(|e| *e.borrow_mut() = message);
}

/// Runs one entry point: catches panics, records the message of any failure for this thread.
pub(crate) fn ffi_try(f: impl FnOnce() -> Result<(), Failure>) -> ig_status {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(())) => IG_STATUS_OK,
        Ok(Err(fail)) => {
            set_last_error(fail.message);
            fail.status
        }
        Err(payload) => {
            set_last_error(format!("internal panic: {}", panic_message(&payload)));
            IG_STATUS_PANIC
        }
    }
}

/// For entry points that return a value, not a status: `fallback` on panic.
pub(crate) fn ffi_value<T>(fallback: T, f: impl FnOnce() -> T) -> T {
    catch_unwind(AssertUnwindSafe(f)).unwrap_or_else(|payload| {
        set_last_error(format!("internal panic: {}", panic_message(&payload)));
        fallback
    })
}

fn panic_message(payload: &(dyn std::any::Any + Send)) -> &str {
    payload
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| payload.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("(no message)")
}

fn invalid(what: &str) -> Failure {
    Failure::new(IG_STATUS_INVALID_ARGUMENT, format!("{what} is NULL"))
}

/// `p` as a reference, or an invalid-argument failure naming the parameter.
///
/// # Safety
/// `p` is NULL or points to a live `T`.
pub(crate) unsafe fn arg<'a, T>(p: *const T, what: &str) -> Result<&'a T, Failure> {
    p.as_ref().ok_or_else(|| invalid(what))
}

/// Checks an out-param before any work, so a NULL one fails without side effects.
pub(crate) fn out_arg<T>(p: *mut T, what: &str) -> Result<*mut T, Failure> {
    if p.is_null() {
        Err(invalid(what))
    } else {
        Ok(p)
    }
}

/// A NUL-terminated UTF-8 string argument.
///
/// # Safety
/// `p` is NULL or points to a NUL-terminated string.
pub(crate) unsafe fn str_arg<'a>(p: *const c_char, what: &str) -> Result<&'a str, Failure> {
    if p.is_null() {
        return Err(invalid(what));
    }
    CStr::from_ptr(p)
        .to_str()
        .map_err(|_| Failure::new(IG_STATUS_INVALID_ARGUMENT, format!("{what} is not UTF-8")))
}

/// Moves `value` to the heap and hands ownership to C.
pub(crate) fn into_handle<T>(value: T) -> *mut T {
    Box::into_raw(Box::new(value))
}

/// Takes ownership back from C and drops it; NULL is a no-op.
///
/// # Safety
/// `p` is NULL or came from `into_handle` and was not freed before.
pub(crate) unsafe fn free_handle<T>(p: *mut T) {
    if !p.is_null() {
        ffi_value((), || drop(Box::from_raw(p)));
    }
}

/// The library version, e.g. "0.1.0". A static string; do not free it.
#[no_mangle]
pub extern "C" fn ig_version() -> *const c_char {
    concat!(env!("CARGO_PKG_VERSION"), "\0").as_ptr().cast()
}

/// `IG_ABI_VERSION` of the library actually loaded: compare it with the header's to detect a
/// mismatched shared library.
#[no_mangle]
pub extern "C" fn ig_abi_version() -> u32 {
    IG_ABI_VERSION
}

/// A short description of a status ("ok", "i/o error", …). A static string; unknown values
/// give "unknown status".
#[no_mangle]
pub extern "C" fn ig_status_str(status: ig_status) -> *const c_char {
    let s: &'static str = match status {
        IG_STATUS_OK => "ok\0",
        IG_STATUS_INVALID_ARGUMENT => "invalid argument\0",
        IG_STATUS_IO => "i/o error\0",
        IG_STATUS_FORMAT => "malformed input\0",
        IG_STATUS_SHAPE => "shape mismatch\0",
        IG_STATUS_NON_FINITE => "non-finite value\0",
        IG_STATUS_UNSUPPORTED => "unsupported input\0",
        IG_STATUS_BASE_MISMATCH => "adapter does not match the base\0",
        IG_STATUS_LIMIT => "limit exceeded\0",
        IG_STATUS_BUFFER_TOO_SMALL => "buffer too small\0",
        IG_STATUS_CUDA => "CUDA error\0",
        IG_STATUS_PANIC => "internal panic\0",
        IG_STATUS_INTERNAL => "internal error\0",
        _ => "unknown status\0",
    };
    s.as_ptr().cast()
}

/// Copies this thread's last error message into `buf` (at most `cap` bytes, always
/// NUL-terminated when `cap > 0`, truncated when short at a UTF-8
/// character boundary, so the copy is always valid UTF-8) and returns the size needed including
/// the NUL. `buf` may be NULL when `cap` is 0, to ask for the size. Empty ("") when no call on
/// this thread has failed yet. Successful calls do not clear it.
///
/// # Safety
/// `buf` is NULL or points to at least `cap` writable bytes.
#[no_mangle]
pub unsafe extern "C" fn ig_last_error(buf: *mut c_char, cap: usize) -> usize {
    ffi_value(0, || {
        LAST_ERROR.with(|e| {
            let msg = e.borrow();
            if !buf.is_null() && cap > 0 {
                write_truncated(&msg, buf, cap);
            }
            msg.len() + 1
        })
    })
}

/// The `buf` / `cap` / `needed` convention of `ig_report_json` and `ig_gate_metrics`: `text`
/// and a NUL into `buf` when they fit in `cap` bytes, else IG_STATUS_BUFFER_TOO_SMALL and
/// nothing in `buf`; `*needed` is written either way.
///
/// # Safety
/// `buf` is NULL or holds `cap` writable bytes; `needed` is NULL or writable.
pub(crate) unsafe fn text_out(
    text: &str,
    buf: *mut c_char,
    cap: usize,
    needed: *mut usize,
    what: &str,
) -> Result<(), Failure> {
    let needed = out_arg(needed, "needed")?;
    let want = text.len() + 1;
    *needed = want;
    if cap < want || buf.is_null() {
        return Err(Failure::new(
            IG_STATUS_BUFFER_TOO_SMALL,
            format!("{what} needs {want} bytes, buffer holds {cap}"),
        ));
    }
    write_truncated(text, buf, cap);
    Ok(())
}

/// Writes `text` and a NUL into `buf[..cap]`, truncating to fit at a character boundary, so
/// the copy is always valid UTF-8. `cap > 0`.
///
/// # Safety
/// `buf` points to at least `cap` writable bytes.
pub(crate) unsafe fn write_truncated(text: &str, buf: *mut c_char, cap: usize) {
    let mut n = text.len().min(cap - 1);
    while !text.is_char_boundary(n) {
        n -= 1;
    }
    std::ptr::copy_nonoverlapping(text.as_ptr(), buf.cast::<u8>(), n);
    *buf.add(n) = 0;
}
