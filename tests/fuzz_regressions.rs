//! Regression tests for crashes the fuzz targets (fuzz/) found; each input is also in the
//! committed seed corpus, fuzz/corpus/<target>/.

use intruder_gate::ffi::*;
use std::ffi::{CStr, CString};

/// ffi_screen, `crash-93f1506776f915fa`: `ig_last_error` cut a message inside a multi-byte
/// character, so a C host got invalid UTF-8 before the NUL.
#[test]
fn ig_last_error_truncates_at_a_character_boundary() {
    // An error whose message names a module of two-byte characters: adding it twice.
    let name = CString::new("é".repeat(20)).unwrap();
    let a = ig_adapter_new();
    let x = [0.5f32; 4];
    let add = || unsafe {
        ig_adapter_add_module(
            a,
            name.as_ptr(),
            x.as_ptr().cast(),
            x.as_ptr().cast(),
            IG_DTYPE_F32,
            1,
            4,
            4,
            1.0,
        )
    };
    assert_eq!(add(), IG_STATUS_OK);
    assert_eq!(
        add(),
        IG_STATUS_INVALID_ARGUMENT,
        "a module added twice is refused"
    );
    let need = unsafe { ig_last_error(std::ptr::null_mut(), 0) };
    let mut full = vec![0u8; need];
    unsafe { ig_last_error(full.as_mut_ptr().cast(), need) };
    let full = CStr::from_bytes_with_nul(&full)
        .unwrap()
        .to_str()
        .unwrap()
        .to_string();
    let mut split_one = false;
    for cap in 1..=need {
        let mut buf = vec![0xffu8; cap];
        unsafe { ig_last_error(buf.as_mut_ptr().cast(), cap) };
        let got = CStr::from_bytes_until_nul(&buf).unwrap();
        let got = got
            .to_str()
            .unwrap_or_else(|e| panic!("cap {cap}: invalid UTF-8: {e}"));
        assert!(full.starts_with(got), "cap {cap}: not a prefix");
        // As much as fits: at most 3 bytes (the rest of one character) short of cap - 1.
        assert!(
            got.len() < cap && got.len() + 4 >= cap.min(need),
            "cap {cap}: {} bytes",
            got.len()
        );
        split_one |= !full.is_char_boundary(cap - 1);
    }
    assert!(split_one, "the message has no multi-byte character: {full}");
    unsafe { ig_adapter_free(a) };
}
