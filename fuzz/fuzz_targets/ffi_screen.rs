//! The C ABI's in-memory path, as a C host drives it: `ig_adapter_add_module` with names,
//! dtypes, shapes, scales and factor values taken from the input, `ig_adapter_set_name`,
//! `ig_gate_screen`, then `ig_report_*`, `ig_gate_clamp` and `ig_gate_metrics` on what came
//! back. Nothing may return IG_STATUS_PANIC, and every text out of the library is valid UTF-8.
#![no_main]

use intruder_gate::ffi::*;
use intruder_gate_fuzz::BASE_MODULES;
use libfuzzer_sys::fuzz_target;
use std::ffi::{c_char, c_void, CStr, CString};
use std::sync::OnceLock;

/// Reads the input front to back; zeros once it runs out, so every input is a valid program.
struct Input<'a>(&'a [u8]);

impl Input<'_> {
    fn byte(&mut self) -> u8 {
        let (&b, rest) = self.0.split_first().unwrap_or((&0, &[]));
        self.0 = rest;
        b
    }
    fn bytes(&mut self, n: usize) -> &[u8] {
        let (head, rest) = self.0.split_at(n.min(self.0.len()));
        self.0 = rest;
        head
    }
    fn u32(&mut self) -> u32 {
        u32::from_le_bytes([self.byte(), self.byte(), self.byte(), self.byte()])
    }
    fn u64(&mut self) -> u64 {
        (self.u32() as u64) << 32 | self.u32() as u64
    }
    /// A C string: up to `max` input bytes, cut at the first NUL.
    fn c_string(&mut self, max: usize) -> CString {
        let n = self.byte() as usize % (max + 1);
        let raw = self.bytes(n);
        let end = raw.iter().position(|&b| b == 0).unwrap_or(raw.len());
        CString::new(&raw[..end]).expect("no NUL before end")
    }
}

struct Gate(*mut ig_gate);
// SAFETY: an ig_gate may be used from many threads (include/intruder_gate.h).
unsafe impl Send for Gate {}
unsafe impl Sync for Gate {}

/// A gate with the synthetic base attached from host memory (borrowed, so leaked on purpose).
fn gate() -> *mut ig_gate {
    static GATE: OnceLock<Gate> = OnceLock::new();
    GATE.get_or_init(|| unsafe {
        let c = ig_config_new();
        assert_eq!(ig_config_set_cache_dir(c, std::ptr::null()), IG_STATUS_OK);
        let mut g = std::ptr::null_mut();
        assert_eq!(ig_gate_new(c, &mut g), IG_STATUS_OK);
        ig_config_free(c);
        for (name, rows, cols, w) in intruder_gate_fuzz::base_matrices() {
            let data: &'static [f32] = w.iter().map(|&x| x as f32).collect::<Vec<_>>().leak();
            let name = CString::new(name).unwrap();
            let st = ig_gate_attach_base_tensor(
                g,
                name.as_ptr(),
                data.as_ptr().cast(),
                IG_DTYPE_F32,
                rows,
                cols,
            );
            assert_eq!(st, IG_STATUS_OK);
        }
        Gate(g)
    })
    .0
}

/// Checks the thread's last error: the size it reports, and a truncated copy (any capacity)
/// being a valid UTF-8 prefix of the whole message.
fn check_last_error(cap: usize) {
    unsafe {
        let need = ig_last_error(std::ptr::null_mut(), 0);
        assert!(need >= 1);
        let mut full = vec![0u8; need];
        assert_eq!(ig_last_error(full.as_mut_ptr().cast(), need), need);
        let full = CStr::from_bytes_with_nul(&full).expect("one NUL, at the end");
        let full = full.to_str().expect("last error is UTF-8");
        let cap = cap.min(need);
        if cap > 0 {
            let mut part = vec![0xffu8; cap];
            ig_last_error(part.as_mut_ptr().cast(), cap);
            let part = CStr::from_bytes_until_nul(&part).expect("truncated copy is NUL-terminated");
            let part = part.to_str().expect("truncated last error is UTF-8");
            assert!(full.starts_with(part), "truncated error is not a prefix");
        }
    }
}

fn check_status(st: ig_status, what: &str, err_cap: usize) {
    assert_ne!(st, IG_STATUS_PANIC, "{what} panicked");
    if st != IG_STATUS_OK {
        assert!(st <= IG_STATUS_INTERNAL, "{what}: unknown status {st}");
        check_last_error(err_cap);
    }
}

/// Text out of a buf/cap/needed call, asking for the size first as a C host would.
unsafe fn text(call: impl Fn(*mut c_char, usize, *mut usize) -> ig_status, what: &str) -> String {
    let mut need = 0usize;
    let st = call(std::ptr::null_mut(), 0, &mut need);
    assert_eq!(st, IG_STATUS_BUFFER_TOO_SMALL, "{what}: size query");
    // Metrics may grow between the calls when other threads screen; not here.
    let mut buf = vec![0u8; need];
    let st = call(buf.as_mut_ptr().cast(), need, &mut need);
    assert_eq!(st, IG_STATUS_OK, "{what}");
    String::from_utf8(buf[..need - 1].to_vec()).expect("UTF-8 text")
}

/// Factor values: mostly a deterministic pseudo-random matrix of a given magnitude, sometimes
/// raw input bits (NaN, Inf, subnormals, huge values), a length byte and up to 64 bytes repeated.
fn factor(inp: &mut Input, dtype: ig_dtype, n: usize) -> Vec<u8> {
    let size = if dtype == IG_DTYPE_F32 { 4 } else { 2 };
    let mode = inp.byte();
    let mut out = Vec::with_capacity(n * size);
    if mode & 1 == 0 {
        let mut state = inp.u64() | 1;
        let magnitude = [1e-3f32, 0.1, 1.0, 10.0, 3e19][(mode >> 1) as usize % 5];
        for _ in 0..n {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            let x = ((state >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * magnitude;
            match dtype {
                IG_DTYPE_F32 => out.extend_from_slice(&x.to_le_bytes()),
                IG_DTYPE_BF16 => out.extend_from_slice(&((x.to_bits() >> 16) as u16).to_le_bytes()),
                // Any 16 bits are a valid f16 pattern; scale down to stay mostly finite.
                _ => out.extend_from_slice(&((x.to_bits() >> 19) as u16).to_le_bytes()),
            }
        }
    } else {
        let n_raw = inp.byte() as usize % 65;
        let raw = inp.bytes(n_raw).to_vec();
        for i in 0..n * size {
            out.push(raw.get(i % raw.len().max(1)).copied().unwrap_or(0));
        }
    }
    out
}

fuzz_target!(|data: &[u8]| {
    let g = gate();
    let mut inp = Input(data);
    let err_cap = inp.byte() as usize;
    unsafe {
        let a = ig_adapter_new();
        assert!(!a.is_null());
        let modules = inp.byte() % 5;
        for _ in 0..modules {
            let sel = inp.byte();
            let (base, out_f, in_f) = BASE_MODULES[sel as usize % 3];
            let name = match sel >> 6 {
                0 | 1 => CString::new(base).unwrap(),
                2 => CString::new(base.trim_end_matches(".weight")).unwrap(),
                _ => inp.c_string(48),
            };
            let dtype = (inp.byte() % 4) as ig_dtype; // 3 is no dtype
            let rank = (inp.byte() % 20) as usize;
            let shape = inp.byte();
            let (in_f, out_f) = if shape & 1 == 0 {
                (in_f, out_f)
            } else {
                ((shape >> 1) as usize % 40, inp.byte() as usize % 40)
            };
            let scale = match inp.byte() % 4 {
                0 => 1.0,
                1 => 0.25,
                2 => 16.0,
                _ => f32::from_bits(inp.u32()),
            };
            let fa = factor(&mut inp, dtype, rank * in_f);
            let fb = factor(&mut inp, dtype, out_f * rank);
            let nulls = inp.byte();
            let pa: *const c_void = if nulls == 1 {
                std::ptr::null()
            } else {
                fa.as_ptr().cast()
            };
            let pb: *const c_void = if nulls == 2 {
                std::ptr::null()
            } else {
                fb.as_ptr().cast()
            };
            let st =
                ig_adapter_add_module(a, name.as_ptr(), pa, pb, dtype, rank, in_f, out_f, scale);
            check_status(st, "ig_adapter_add_module", err_cap);
        }
        if inp.byte() & 1 == 1 {
            let name = inp.c_string(32);
            check_status(
                ig_adapter_set_name(a, name.as_ptr()),
                "ig_adapter_set_name",
                err_cap,
            );
        }
        let count = ig_adapter_module_count(a);
        for i in 0..=count {
            let mut f = std::mem::zeroed::<ig_lora_factors>();
            let st = ig_adapter_module(a, i, &mut f);
            if i < count {
                assert_eq!(st, IG_STATUS_OK);
                CStr::from_ptr(f.name)
                    .to_str()
                    .expect("module name is UTF-8");
            } else {
                assert_ne!(st, IG_STATUS_OK, "module past the end");
            }
        }

        let mut r = std::ptr::null_mut();
        let st = ig_gate_screen(g, a, &mut r);
        check_status(st, "ig_gate_screen", err_cap);
        if st == IG_STATUS_OK {
            assert!(!r.is_null());
            let json = text(|b, c, n| ig_report_json(r, b, c, n), "ig_report_json");
            let report: serde_json::Value =
                serde_json::from_str(&json).expect("report JSON parses");
            let n = ig_report_module_count(r);
            assert_eq!(n, report["modules"].as_array().map_or(0, Vec::len));
            let mut total = 0u32;
            for i in 0..n {
                let mut m = std::mem::zeroed::<ig_module_summary>();
                assert_eq!(ig_report_module(r, i, &mut m), IG_STATUS_OK);
                assert!(
                    m.min_max_cos.is_finite(),
                    "min max|cos| is {}",
                    m.min_max_cos
                );
                total += m.intruders;
            }
            assert_eq!(total, ig_report_total_intruders(r));
            for mv in report["modules"].as_array().into_iter().flatten() {
                for field in ["singular_values", "max_cos"] {
                    let arr = mv[field].as_array().expect("array");
                    assert!(
                        arr.iter().all(|x| x.as_f64().is_some()),
                        "{field}: {}",
                        mv[field]
                    );
                }
            }

            let opts = inp.byte();
            let lambda = [0.0, 0.3, 0.75, 1.0, -1.0, f64::NAN][opts as usize % 6];
            let target = (opts >> 3) as ig_clamp_target % 3; // 2 is no target
            let mode = (opts >> 5) as ig_clamp_mode % 3; // 2 is no mode
            let pad = inp.byte() as usize;
            let mut clamped = std::ptr::null_mut();
            let st = ig_gate_clamp(g, r, lambda, target, mode, pad, &mut clamped);
            check_status(st, "ig_gate_clamp", err_cap);
            if st == IG_STATUS_OK {
                // The clamped adapter screens like any other (same modules, same base).
                let mut again = std::ptr::null_mut();
                let st = ig_gate_screen(g, clamped, &mut again);
                check_status(st, "ig_gate_screen of a clamped adapter", err_cap);
                assert_eq!(st, IG_STATUS_OK, "a clamped adapter must screen");
                assert_eq!(ig_report_module_count(again), n);
                ig_report_free(again);
                ig_adapter_free(clamped);
            }
            ig_report_free(r);
        }
        ig_adapter_free(a);

        let metrics = text(|b, c, n| ig_gate_metrics(g, b, c, n), "ig_gate_metrics");
        for line in metrics
            .lines()
            .filter(|l| !l.starts_with('#') && !l.is_empty())
        {
            let value = line.rsplit(' ').next().unwrap_or_default();
            assert!(
                value.parse::<f64>().is_ok() || ["+Inf", "-Inf", "NaN"].contains(&value),
                "metrics line does not end in a value: {line:?}"
            );
        }
    }
});
