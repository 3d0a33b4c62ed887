//! The C ABI called from Rust exactly as C would: real MiniLM adapters give the CLI's numbers,
//! every misuse gives its documented status and a message, and one gate serves many threads.

mod common;

use common::{adapter_dir, assert_same_numbers, cli_report, minilm_base, ADAPTERS};
use intruder_gate::adapter::load_peft_dir;
use intruder_gate::base::BaseModel;
use intruder_gate::ffi::*;
use intruder_gate::limits::Limits;
use serde_json::Value;
use std::ffi::{c_char, c_void, CStr, CString};
use std::path::Path;
use std::ptr::{null, null_mut};

fn c(s: impl AsRef<str>) -> CString {
    CString::new(s.as_ref()).unwrap()
}

fn c_path(p: &Path) -> CString {
    c(p.to_str().unwrap())
}

fn last_error() -> String {
    unsafe {
        let n = ig_last_error(null_mut(), 0);
        let mut buf = vec![0u8; n];
        assert_eq!(ig_last_error(buf.as_mut_ptr().cast(), n), n);
        CStr::from_bytes_with_nul(&buf)
            .unwrap()
            .to_str()
            .unwrap()
            .to_owned()
    }
}

/// Asserts `status` and that this thread's last error mentions `phrase`.
#[track_caller]
fn assert_status(status: ig_status, want: ig_status, phrase: &str) {
    let msg = last_error();
    assert_eq!(
        status, want,
        "status {status} (want {want}), last error: {msg}"
    );
    assert!(
        msg.contains(phrase),
        "{phrase:?} missing from last error: {msg}"
    );
}

#[track_caller]
fn ok(status: ig_status) {
    assert_status(status, IG_STATUS_OK, "");
}

/// A gate without a disk cache, MiniLM attached.
fn gate() -> *mut ig_gate {
    unsafe {
        let cfg = ig_config_new();
        ok(ig_config_set_cache_dir(cfg, null()));
        let mut g = null_mut();
        ok(ig_gate_new(cfg, &mut g));
        ig_config_free(cfg);
        ok(ig_gate_attach_base(g, c_path(&minilm_base()).as_ptr()));
        g
    }
}

fn json(r: *const ig_report) -> Value {
    unsafe {
        let mut needed = 0;
        assert_eq!(
            ig_report_json(r, null_mut(), 0, &mut needed),
            IG_STATUS_BUFFER_TOO_SMALL
        );
        let mut buf = vec![0u8; needed];
        ok(ig_report_json(
            r,
            buf.as_mut_ptr().cast(),
            needed,
            &mut needed,
        ));
        serde_json::from_slice(&buf[..needed - 1]).unwrap()
    }
}

fn screen_dir(g: *mut ig_gate, adapter: &str) -> Value {
    unsafe {
        let mut r = null_mut();
        ok(ig_gate_screen_adapter(
            g,
            c_path(&adapter_dir(adapter)).as_ptr(),
            &mut r,
        ));
        let v = json(r);
        ig_report_free(r);
        v
    }
}

/// A fixture adapter rebuilt in host memory through `ig_adapter_add_module`, its factors
/// encoded as `dtype`.
fn in_memory(adapter: &str, dtype: ig_dtype) -> *mut ig_adapter {
    let loaded = load_peft_dir(&adapter_dir(adapter), &Limits::default()).unwrap();
    let enc = |v: &[f32]| match dtype {
        IG_DTYPE_F32 => bytemuck::cast_slice(v).to_vec(),
        IG_DTYPE_F16 => v
            .iter()
            .flat_map(|x| half::f16::from_f32(*x).to_ne_bytes())
            .collect(),
        _ => v
            .iter()
            .flat_map(|x| half::bf16::from_f32(*x).to_ne_bytes())
            .collect::<Vec<u8>>(),
    };
    let a = ig_adapter_new();
    for m in &loaded.modules {
        let (fa, fb) = (enc(&m.a), enc(&m.b));
        ok(unsafe {
            ig_adapter_add_module(
                a,
                c(format!("{}.weight", m.name)).as_ptr(),
                fa.as_ptr().cast(),
                fb.as_ptr().cast(),
                dtype,
                m.rank,
                m.in_features,
                m.out_features,
                m.scale as f32,
            )
        });
    }
    a
}

fn screen(g: *mut ig_gate, a: *const ig_adapter) -> Value {
    unsafe {
        let mut r = null_mut();
        ok(ig_gate_screen(g, a, &mut r));
        let v = json(r);
        ig_report_free(r);
        v
    }
}

#[test]
fn committed_header_matches_a_fresh_cbindgen_run() {
    let fresh = include_str!(concat!(env!("OUT_DIR"), "/intruder_gate.h"));
    let committed = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/include/intruder_gate.h"
    ))
    .unwrap_or_default();
    assert!(
        committed == fresh,
        "include/intruder_gate.h is stale: regenerate it with `IG_UPDATE_HEADER=1 cargo build`"
    );
}

#[test]
fn version_abi_and_status_strings() {
    let s = |p: *const c_char| unsafe { CStr::from_ptr(p) }.to_str().unwrap();
    assert_eq!(s(ig_version()), env!("CARGO_PKG_VERSION"));
    assert_eq!(ig_abi_version(), IG_ABI_VERSION);
    assert_eq!(s(ig_status_str(IG_STATUS_OK)), "ok");
    assert_eq!(
        s(ig_status_str(IG_STATUS_BUFFER_TOO_SMALL)),
        "buffer too small"
    );
    assert_eq!(s(ig_status_str(9999)), "unknown status");
    let all: Vec<&str> = (IG_STATUS_OK..=IG_STATUS_INTERNAL)
        .map(|st| s(ig_status_str(st)))
        .collect();
    let mut distinct = all.clone();
    distinct.sort();
    distinct.dedup();
    assert_eq!(distinct.len(), all.len(), "{all:?}");
}

#[test]
fn peft_directories_give_the_clis_numbers() {
    let g = gate();
    for name in ADAPTERS {
        let got = screen_dir(g, name);
        assert_eq!(got["adapter"], name);
        assert_same_numbers(&got, &cli_report(name));
    }
    unsafe { ig_gate_free(g) };
}

#[test]
fn in_memory_adapters_give_the_clis_numbers() {
    let g = gate();
    for name in ADAPTERS {
        let a = in_memory(name, IG_DTYPE_F32);
        let got = screen(g, a);
        assert_same_numbers(&got, &cli_report(name));
        // The report's summaries agree with its JSON.
        let r = unsafe {
            let mut r = null_mut();
            ok(ig_gate_screen(g, a, &mut r));
            r
        };
        unsafe {
            assert_eq!(
                ig_report_total_intruders(r) as u64,
                got["total_intruders"].as_u64().unwrap()
            );
            assert_eq!(
                ig_report_verdict(r) == IG_VERDICT_ACCEPT,
                got["verdict"] == "accept"
            );
            let modules = got["modules"].as_array().unwrap();
            assert_eq!(ig_report_module_count(r), modules.len());
            for (i, m) in modules.iter().enumerate() {
                let mut s = std::mem::zeroed::<ig_module_summary>();
                ok(ig_report_module(r, i, &mut s));
                assert_eq!(CStr::from_ptr(s.name).to_str().unwrap(), m["module"]);
                assert_eq!(
                    CStr::from_ptr(s.base_tensor).to_str().unwrap(),
                    m["base_tensor"]
                );
                assert_eq!(s.rank as u64, m["rank"].as_u64().unwrap());
                assert_eq!(
                    s.intruders as usize,
                    m["intruders"].as_array().unwrap().len()
                );
                let min = m["max_cos"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|x| x.as_f64().unwrap());
                assert!((s.min_max_cos - min.fold(f64::INFINITY, f64::min)).abs() < 1e-12);
                assert_eq!(
                    (s.out_features, s.in_features),
                    (
                        m["shape"][0].as_u64().unwrap() as usize,
                        m["shape"][1].as_u64().unwrap() as usize
                    )
                );
            }
            ig_report_free(r);
            ig_adapter_free(a);
        }
    }
    unsafe { ig_gate_free(g) };
}

#[test]
fn half_precision_factors_are_converted_on_add() {
    let g = gate();
    for dtype in [IG_DTYPE_F16, IG_DTYPE_BF16] {
        // The same factors rounded to half precision, handed over as f32: identical reports.
        let half = in_memory("lora_r2", dtype);
        let n = unsafe { ig_adapter_module_count(half) };
        let rounded = ig_adapter_new();
        for i in 0..n {
            unsafe {
                let mut f = std::mem::zeroed::<ig_lora_factors>();
                ok(ig_adapter_module(half, i, &mut f));
                let name = format!("{}.weight", CStr::from_ptr(f.name).to_str().unwrap());
                ok(ig_adapter_add_module(
                    rounded,
                    c(name).as_ptr(),
                    f.lora_a.cast(),
                    f.lora_b.cast(),
                    IG_DTYPE_F32,
                    f.rank,
                    f.in_features,
                    f.out_features,
                    f.scale,
                ));
            }
        }
        assert_eq!(
            common::numbers(&screen(g, half)),
            common::numbers(&screen(g, rounded))
        );
        unsafe {
            ig_adapter_free(half);
            ig_adapter_free(rounded);
        }
    }
    unsafe { ig_gate_free(g) };
}

#[test]
fn base_tensors_from_host_memory_give_the_clis_numbers() {
    let base = BaseModel::open(&minilm_base(), &Limits::default()).unwrap();
    let a = in_memory("lora_r16_qv", IG_DTYPE_F32);
    let mut g = null_mut();
    unsafe {
        let cfg = ig_config_new();
        ok(ig_config_set_cache_dir(cfg, null()));
        ok(ig_gate_new(cfg, &mut g));
        ig_config_free(cfg);
        for i in 0..ig_adapter_module_count(a) {
            let mut f = std::mem::zeroed::<ig_lora_factors>();
            ok(ig_adapter_module(a, i, &mut f));
            let name = format!("{}.weight", CStr::from_ptr(f.name).to_str().unwrap());
            let t = base.matrix(&name).unwrap();
            ok(ig_gate_attach_base_tensor(
                g,
                c(&name).as_ptr(),
                t.bytes.as_ptr().cast(),
                IG_DTYPE_F32,
                t.rows,
                t.cols,
            ));
        }
    }
    let got = screen(g, a);
    assert_eq!(got["base"], "<host memory>");
    assert_same_numbers(&got, &cli_report("lora_r16_qv"));
    unsafe {
        ig_adapter_free(a);
        ig_gate_free(g);
    }
}

#[test]
fn null_pointers_are_refused_and_frees_accept_null() {
    let nul = c("x");
    let data = [0f32; 4];
    let d: *const c_void = data.as_ptr().cast();
    let g = gate();
    let a = in_memory("lora_r2", IG_DTYPE_F32);
    let mut report = null_mut();
    ok(unsafe { ig_gate_screen(g, a, &mut report) });
    let (mut out_g, mut out_r, mut out_a): (*mut ig_gate, *mut ig_report, *mut ig_adapter) =
        (null_mut(), null_mut(), null_mut());
    let mut needed = 0usize;
    let mut module = unsafe { std::mem::zeroed::<ig_module_summary>() };
    let mut factors = unsafe { std::mem::zeroed::<ig_lora_factors>() };
    let (mut rows, mut cols) = (0usize, 0usize);
    // Each call is checked at once: the last error is per call.
    let expect = |status, phrase| assert_status(status, IG_STATUS_INVALID_ARGUMENT, phrase);
    unsafe {
        expect(ig_config_set_top_k(null_mut(), 3), "config is NULL");
        expect(ig_config_set_epsilon(null_mut(), 0.3), "config is NULL");
        expect(
            ig_config_set_cache_dir(null_mut(), nul.as_ptr()),
            "config is NULL",
        );
        expect(ig_gate_new(null(), null_mut()), "out is NULL");
        expect(
            ig_gate_attach_base(null_mut(), nul.as_ptr()),
            "gate is NULL",
        );
        expect(ig_gate_attach_base(g, null()), "base_path is NULL");
        expect(
            ig_gate_attach_base_tensor(null_mut(), nul.as_ptr(), d, IG_DTYPE_F32, 2, 2),
            "gate is NULL",
        );
        expect(
            ig_gate_attach_base_tensor(g, null(), d, IG_DTYPE_F32, 2, 2),
            "name is NULL",
        );
        expect(
            ig_gate_attach_base_tensor(g, nul.as_ptr(), null(), IG_DTYPE_F32, 2, 2),
            "data is NULL",
        );
        expect(
            ig_gate_screen_adapter(null_mut(), nul.as_ptr(), &mut out_r),
            "gate is NULL",
        );
        expect(
            ig_gate_screen_adapter(g, null(), &mut out_r),
            "adapter_dir is NULL",
        );
        expect(
            ig_gate_screen_adapter(g, nul.as_ptr(), null_mut()),
            "out is NULL",
        );
        expect(ig_gate_screen(null_mut(), a, &mut out_r), "gate is NULL");
        expect(ig_gate_screen(g, null(), &mut out_r), "adapter is NULL");
        expect(ig_gate_screen(g, a, null_mut()), "out is NULL");
        expect(
            ig_gate_copy_base_tensor(null(), nul.as_ptr(), null_mut(), 0, &mut rows, &mut cols),
            "gate is NULL",
        );
        expect(
            ig_gate_copy_base_tensor(g, nul.as_ptr(), null_mut(), 0, null_mut(), &mut cols),
            "rows is NULL",
        );
        expect(
            ig_adapter_add_module(null_mut(), nul.as_ptr(), d, d, IG_DTYPE_F32, 1, 2, 2, 1.0),
            "adapter is NULL",
        );
        expect(
            ig_adapter_add_module(a, null(), d, d, IG_DTYPE_F32, 1, 2, 2, 1.0),
            "base_tensor is NULL",
        );
        expect(
            ig_adapter_add_module(a, nul.as_ptr(), null(), d, IG_DTYPE_F32, 1, 2, 2, 1.0),
            "lora_a is NULL",
        );
        expect(
            ig_adapter_add_module(a, nul.as_ptr(), d, null(), IG_DTYPE_F32, 1, 2, 2, 1.0),
            "lora_b is NULL",
        );
        expect(
            ig_adapter_load_peft(null(), &mut out_a),
            "adapter_dir is NULL",
        );
        expect(
            ig_adapter_load_peft(nul.as_ptr(), null_mut()),
            "out is NULL",
        );
        expect(
            ig_adapter_module(null(), 0, &mut factors),
            "adapter is NULL",
        );
        expect(ig_adapter_module(a, 0, null_mut()), "out is NULL");
        expect(ig_report_module(null(), 0, &mut module), "report is NULL");
        expect(ig_report_module(report, 0, null_mut()), "out is NULL");
        expect(
            ig_report_json(null(), null_mut(), 0, &mut needed),
            "report is NULL",
        );
        expect(
            ig_report_json(report, null_mut(), 0, null_mut()),
            "needed is NULL",
        );
        expect(
            ig_config_set_recent_adapters(null_mut(), 4),
            "config is NULL",
        );
        expect(
            ig_adapter_set_name(null_mut(), nul.as_ptr()),
            "adapter is NULL",
        );
        expect(ig_adapter_set_name(a, null()), "name is NULL");
        expect(
            ig_gate_metrics(null(), null_mut(), 0, &mut needed),
            "gate is NULL",
        );
        expect(
            ig_gate_metrics(g, null_mut(), 0, null_mut()),
            "needed is NULL",
        );
        expect(
            ig_gate_set_event_callback(null_mut(), None, null_mut()),
            "gate is NULL",
        );
    }
    assert!(
        out_g.is_null() && out_r.is_null() && out_a.is_null(),
        "out-params written on failure"
    );
    unsafe {
        assert_eq!(ig_report_verdict(null()), IG_VERDICT_INVALID);
        assert_eq!(ig_report_total_intruders(null()), 0);
        assert_eq!(ig_report_module_count(null()), 0);
        assert_eq!(ig_adapter_module_count(null()), 0);
        ig_config_free(null_mut());
        ig_gate_free(null_mut());
        ig_adapter_free(null_mut());
        ig_report_free(null_mut());
        // Freed handles set to NULL by the caller may be freed again.
        ig_report_free(report);
        report = null_mut();
        ig_report_free(report);
        ig_adapter_free(a);
        ig_gate_free(g);
        // A NULL config means the defaults.
        ok(ig_gate_new(null(), &mut out_g));
        ig_gate_free(out_g);
    }
}

#[test]
fn bad_settings_and_inputs_get_their_status_and_a_message() {
    unsafe {
        let cfg = ig_config_new();
        assert_status(
            ig_config_set_top_k(cfg, 0),
            IG_STATUS_INVALID_ARGUMENT,
            "top_k must be in 1..=4096",
        );
        assert_status(
            ig_config_set_epsilon(cfg, f32::NAN),
            IG_STATUS_INVALID_ARGUMENT,
            "epsilon",
        );
        assert_status(
            ig_config_set_epsilon(cfg, 1.5),
            IG_STATUS_INVALID_ARGUMENT,
            "epsilon must be in (0, 1]",
        );
        ok(ig_config_set_top_k(cfg, 5));
        ok(ig_config_set_epsilon(cfg, 0.4));
        let mut g = null_mut();
        ok(ig_gate_new(cfg, &mut g));
        ig_config_free(cfg);

        let missing = c("/nonexistent/intruder-gate/model.safetensors");
        assert_status(
            ig_gate_attach_base(g, missing.as_ptr()),
            IG_STATUS_IO,
            "/nonexistent/intruder-gate",
        );
        ok(ig_gate_attach_base(g, c_path(&minilm_base()).as_ptr()));
        assert_status(
            ig_gate_attach_base(g, c_path(&minilm_base()).as_ptr()),
            IG_STATUS_INVALID_ARGUMENT,
            "already attached",
        );

        // The settings reached the gate.
        let got = screen_dir(g, "lora_r2");
        assert_eq!(got["top_k"], 5);
        assert!((got["epsilon"].as_f64().unwrap() - 0.4).abs() < 1e-6);

        let mut r = null_mut();
        let bad = tempfile::tempdir().unwrap();
        std::fs::write(
            bad.path().join("adapter_config.json"),
            r#"{"peft_type": "LORA", "r": 2, "lora_alpha": 4}"#,
        )
        .unwrap();
        std::fs::write(
            bad.path().join("adapter_model.safetensors"),
            b"\x10\x00\x00\x00\x00\x00\x00\x00{not json",
        )
        .unwrap();
        assert_status(
            ig_gate_screen_adapter(g, c_path(bad.path()).as_ptr(), &mut r),
            IG_STATUS_FORMAT,
            "adapter_model.safetensors",
        );
        assert_status(
            ig_gate_screen_adapter(g, c("/nonexistent/adapter").as_ptr(), &mut r),
            IG_STATUS_IO,
            "/nonexistent/adapter",
        );
        assert!(r.is_null());

        // Modules that are not in the base; shapes that do not fit; non-finite factors.
        let a = ig_adapter_new();
        let f = [0.5f32; 2 * 384];
        ok(ig_adapter_add_module(
            a,
            c("decoder.nowhere.weight").as_ptr(),
            f.as_ptr().cast(),
            f.as_ptr().cast(),
            IG_DTYPE_F32,
            2,
            384,
            384,
            1.0,
        ));
        assert_status(
            ig_gate_screen(g, a, &mut r),
            IG_STATUS_BASE_MISMATCH,
            "decoder.nowhere",
        );
        ig_adapter_free(a);
        let a = ig_adapter_new();
        ok(ig_adapter_add_module(
            a,
            c("encoder.layer.0.attention.self.query.weight").as_ptr(),
            f.as_ptr().cast(),
            f.as_ptr().cast(),
            IG_DTYPE_F32,
            1,
            384,
            768,
            1.0,
        ));
        assert_status(
            ig_gate_screen(g, a, &mut r),
            IG_STATUS_SHAPE,
            "encoder.layer.0.attention.self.query",
        );
        assert_status(
            ig_adapter_add_module(
                a,
                c("encoder.layer.0.attention.self.query.weight").as_ptr(),
                f.as_ptr().cast(),
                f.as_ptr().cast(),
                IG_DTYPE_F32,
                1,
                384,
                768,
                1.0,
            ),
            IG_STATUS_INVALID_ARGUMENT,
            "already added",
        );
        let mut nan = f;
        nan[7] = f32::NAN;
        assert_status(
            ig_adapter_add_module(
                a,
                c("x.weight").as_ptr(),
                nan.as_ptr().cast(),
                f.as_ptr().cast(),
                IG_DTYPE_F32,
                2,
                384,
                384,
                1.0,
            ),
            IG_STATUS_NON_FINITE,
            "lora_A has non-finite value",
        );
        assert_status(
            ig_adapter_add_module(
                a,
                c("x.weight").as_ptr(),
                f.as_ptr().cast(),
                f.as_ptr().cast(),
                IG_DTYPE_F32,
                0,
                384,
                384,
                1.0,
            ),
            IG_STATUS_SHAPE,
            "rank 0",
        );
        assert_status(
            ig_adapter_add_module(
                a,
                c("x.weight").as_ptr(),
                f.as_ptr().cast(),
                f.as_ptr().cast(),
                IG_DTYPE_F32,
                1 << 20,
                1 << 20,
                384,
                1.0,
            ),
            IG_STATUS_LIMIT,
            "over the limit",
        );
        assert_status(
            ig_adapter_add_module(
                a,
                c("x.weight").as_ptr(),
                f.as_ptr().cast(),
                f.as_ptr().cast(),
                7,
                2,
                384,
                384,
                1.0,
            ),
            IG_STATUS_INVALID_ARGUMENT,
            "unknown ig_dtype 7",
        );
        assert_eq!(
            ig_adapter_module_count(a),
            1,
            "failed adds changed the adapter"
        );
        let mut factors = std::mem::zeroed::<ig_lora_factors>();
        assert_status(
            ig_adapter_module(a, 1, &mut factors),
            IG_STATUS_INVALID_ARGUMENT,
            "out of range",
        );
        ig_adapter_free(a);
        assert!(r.is_null());

        let (mut rows, mut cols) = (0, 0);
        let name = c("encoder.layer.0.attention.self.query.weight");
        assert_status(
            ig_gate_copy_base_tensor(g, name.as_ptr(), null_mut(), 0, &mut rows, &mut cols),
            IG_STATUS_BUFFER_TOO_SMALL,
            "needs 147456 floats",
        );
        assert_eq!((rows, cols), (384, 384));
        let mut w = vec![0f32; rows * cols];
        ok(ig_gate_copy_base_tensor(
            g,
            name.as_ptr(),
            w.as_mut_ptr(),
            w.len(),
            &mut rows,
            &mut cols,
        ));
        assert!(w.iter().any(|&x| x != 0.0));
        assert_status(
            ig_gate_copy_base_tensor(
                g,
                c("nope").as_ptr(),
                w.as_mut_ptr(),
                w.len(),
                &mut rows,
                &mut cols,
            ),
            IG_STATUS_BASE_MISMATCH,
            "nope",
        );
        ig_gate_free(g);
    }
}

#[test]
fn json_and_last_error_buffers_report_the_size_needed() {
    let g = gate();
    unsafe {
        let mut r = null_mut();
        ok(ig_gate_screen_adapter(
            g,
            c_path(&adapter_dir("lora_r2")).as_ptr(),
            &mut r,
        ));
        let mut needed = 0;
        let mut small = [b'#' as c_char; 16];
        assert_status(
            ig_report_json(r, small.as_mut_ptr(), small.len(), &mut needed),
            IG_STATUS_BUFFER_TOO_SMALL,
            "needs",
        );
        assert!(needed > 1000);
        assert!(
            small.iter().all(|&b| b == b'#' as c_char),
            "buffer written on failure"
        );
        assert!(last_error().contains(&format!("needs {needed} bytes")));
        let mut exact = vec![0u8; needed];
        ok(ig_report_json(
            r,
            exact.as_mut_ptr().cast(),
            needed,
            &mut needed,
        ));
        assert_eq!(exact[needed - 1], 0);

        // ig_last_error truncates, always NUL-terminates, and returns the full size.
        assert_status(
            ig_gate_attach_base(g, c("/x").as_ptr()),
            IG_STATUS_INVALID_ARGUMENT,
            "already attached",
        );
        let full = last_error();
        let mut buf = [b'#' as c_char; 8];
        assert_eq!(ig_last_error(buf.as_mut_ptr(), buf.len()), full.len() + 1);
        assert_eq!(CStr::from_ptr(buf.as_ptr()).to_str().unwrap(), &full[..7]);
        assert_eq!(ig_last_error(buf.as_mut_ptr(), 1), full.len() + 1);
        assert_eq!(buf[0], 0);
        ig_report_free(r);
        ig_gate_free(g);
    }
}

#[test]
fn a_failed_screening_leaves_the_gate_as_it_was() {
    let g = gate();
    let before = screen_dir(g, "rslora_r16");
    let broken = tempfile::tempdir().unwrap();
    std::fs::write(broken.path().join("adapter_config.json"), "{").unwrap();
    let weights = "adapter_model.safetensors";
    std::fs::copy(
        adapter_dir("lora_r2").join(weights),
        broken.path().join(weights),
    )
    .unwrap();
    unsafe {
        let mut r = null_mut();
        assert_status(
            ig_gate_screen_adapter(g, c_path(broken.path()).as_ptr(), &mut r),
            IG_STATUS_FORMAT,
            "adapter_config.json",
        );
        let a = ig_adapter_new();
        let f = [1f32; 384];
        ok(ig_adapter_add_module(
            a,
            c("encoder.layer.1.output.dense.weight").as_ptr(),
            f.as_ptr().cast(),
            f.as_ptr().cast(),
            IG_DTYPE_F32,
            1,
            384,
            384,
            1.0,
        ));
        assert_status(
            ig_gate_screen(g, a, &mut r),
            IG_STATUS_SHAPE,
            "encoder.layer.1.output.dense",
        );
        ig_adapter_free(a);
    }
    assert_eq!(
        common::numbers(&screen_dir(g, "rslora_r16")),
        common::numbers(&before)
    );
    unsafe { ig_gate_free(g) };
}

/// Events the callback below saw: (adapter, verdict, intruders, modules, seconds).
type Events = std::sync::Mutex<Vec<(String, ig_verdict, u64, u64, f64)>>;

unsafe extern "C" fn record_event(e: *const ig_event, user_data: *mut c_void) {
    let e = &*e;
    let events = &*user_data.cast::<Events>();
    let name = CStr::from_ptr(e.adapter).to_str().unwrap().to_owned();
    events
        .lock()
        .unwrap()
        .push((name, e.verdict, e.intruders, e.modules, e.duration_seconds));
}

fn metrics_text(g: *const ig_gate) -> String {
    unsafe {
        let mut needed = 0;
        assert_status(
            ig_gate_metrics(g, null_mut(), 0, &mut needed),
            IG_STATUS_BUFFER_TOO_SMALL,
            "the metrics text needs",
        );
        let mut buf = vec![0u8; needed];
        ok(ig_gate_metrics(
            g,
            buf.as_mut_ptr().cast(),
            needed,
            &mut needed,
        ));
        CStr::from_bytes_with_nul(&buf)
            .unwrap()
            .to_str()
            .unwrap()
            .to_owned()
    }
}

/// Every screening (errors too) reaches the callback once, with the report's numbers, and the
/// metrics text counts it; a cleared callback is not called again.
#[test]
fn event_callback_and_metrics_see_every_screening() {
    let events = Events::default();
    let user_data = (&events as *const Events).cast_mut().cast();
    unsafe {
        let cfg = ig_config_new();
        ok(ig_config_set_cache_dir(cfg, null()));
        ok(ig_config_set_recent_adapters(cfg, 2));
        let mut g = null_mut();
        ok(ig_gate_new(cfg, &mut g));
        ig_config_free(cfg);
        ok(ig_gate_attach_base(g, c_path(&minilm_base()).as_ptr()));
        ok(ig_gate_set_event_callback(g, Some(record_event), user_data));

        let r2 = screen_dir(g, "lora_r2");
        let a = in_memory("lora_r16_qv", IG_DTYPE_F32);
        ok(ig_adapter_set_name(a, c("qv in memory").as_ptr()));
        let qv = screen(g, a);
        let mut r = null_mut();
        assert_eq!(
            ig_gate_screen_adapter(g, c("/nonexistent/gone").as_ptr(), &mut r),
            IG_STATUS_IO
        );

        let seen = events.lock().unwrap().clone();
        assert_eq!(seen.len(), 3, "{seen:?}");
        let verdict = |v: &Value| match v["verdict"].as_str().unwrap() {
            "accept" => IG_VERDICT_ACCEPT,
            "warn" => IG_VERDICT_WARN,
            "clamp" => IG_VERDICT_CLAMP,
            _ => IG_VERDICT_REJECT,
        };
        for ((name, v, intruders, modules, seconds), (want_name, want)) in
            seen.iter().zip([("lora_r2", &r2), ("qv in memory", &qv)])
        {
            assert_eq!(name, want_name);
            assert_eq!(*v, verdict(want));
            assert_eq!(*intruders, want["total_intruders"].as_u64().unwrap());
            assert_eq!(*modules, want["modules"].as_array().unwrap().len() as u64);
            assert!(*seconds > 0.0 && *seconds < 60.0, "{seconds}");
        }
        assert_eq!(&seen[2].0, "gone");
        assert_eq!((seen[2].1, seen[2].2, seen[2].3), (IG_VERDICT_ERROR, 0, 0));

        let text = metrics_text(g);
        assert!(
            text.contains("intruder_gate_screenings_total{verdict=\"error\"} 1\n"),
            "{text}"
        );
        assert!(
            text.contains("intruder_gate_errors_total{kind=\"io\"} 1\n"),
            "{text}"
        );
        let gauge: Vec<&str> = text
            .lines()
            .filter(|l| l.starts_with("intruder_gate_adapter_intruders{"))
            .collect();
        // recent_adapters = 2: the oldest of the three names is gone.
        assert_eq!(gauge.len(), 2, "{text}");
        assert!(gauge[0].contains("adapter=\"qv in memory\""), "{text}");

        ok(ig_gate_set_event_callback(g, None, null_mut()));
        screen_dir(g, "lora_r2");
        assert_eq!(events.lock().unwrap().len(), 3);
        ig_adapter_free(a);
        ig_gate_free(g);
    }
}

/// The data-race stress test: 8 threads × 4 adapters (three directories and one in-memory
/// adapter) × 3 rounds on one gate, started cold so the threads also race on the spectrum
/// cache; every report must equal the serial one from a separate gate.
#[test]
fn eight_threads_four_adapters_on_one_gate_match_serial() {
    struct Shared(*mut ig_gate, *mut ig_adapter);
    // SAFETY: the header documents gates and adapters as usable from many threads at once.
    unsafe impl Sync for Shared {}
    let in_mem = in_memory("lora_r16_qv", IG_DTYPE_BF16);
    // Adapter i of the four: a fixture directory, or the in-memory one.
    fn nth(g: *mut ig_gate, in_mem: *const ig_adapter, i: usize) -> Value {
        match ADAPTERS.get(i) {
            Some(name) => common::numbers(&screen_dir(g, name)),
            None => common::numbers(&screen(g, in_mem)),
        }
    }
    let serial_gate = gate();
    let serial: Vec<Value> = (0..4).map(|i| nth(serial_gate, in_mem, i)).collect();
    let shared = Shared(gate(), in_mem);
    std::thread::scope(|s| {
        for t in 0..8 {
            let (serial, shared) = (&serial, &shared);
            s.spawn(move || {
                for round in 0..3 {
                    let i = (t + round) % 4;
                    assert_eq!(
                        nth(shared.0, shared.1, i),
                        serial[i],
                        "thread {t} round {round}"
                    );
                }
            });
        }
    });
    unsafe {
        ig_gate_free(shared.0);
        ig_gate_free(serial_gate);
        ig_adapter_free(in_mem);
    }
}
