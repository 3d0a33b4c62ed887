//! The C ABI called from Rust exactly as C would: real MiniLM adapters give the CLI's numbers,
//! every misuse gives its documented status and a message, and one gate serves many threads.

mod common;

use common::{adapter_dir, assert_same_numbers, cli_report, minilm_base, ADAPTERS};
use faer::Mat;
use intruder_gate::adapter::load_peft_dir;
use intruder_gate::base::BaseModel;
use intruder_gate::ffi::*;
use intruder_gate::limits::Limits;
use intruder_gate::{ClampMode, ClampOptions, Config, Gate, Target};
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
        expect(
            ig_config_set_policy_json(null_mut(), nul.as_ptr()),
            "config is NULL",
        );
        let cfg = ig_config_new();
        expect(
            ig_config_set_policy_json(cfg, null()),
            "policy_json is NULL",
        );
        ig_config_free(cfg);
        let (all, exact) = (IG_CLAMP_TARGET_ALL, IG_CLAMP_MODE_EXACT);
        expect(
            ig_gate_clamp(null_mut(), report, 0.5, all, exact, 0, &mut out_a),
            "gate is NULL",
        );
        expect(
            ig_gate_clamp(g, null(), 0.5, all, exact, 0, &mut out_a),
            "report is NULL",
        );
        expect(
            ig_gate_clamp(g, report, 0.5, all, exact, 0, null_mut()),
            "out is NULL",
        );
        expect(
            ig_adapter_write_peft(null(), nul.as_ptr()),
            "adapter is NULL",
        );
        expect(ig_adapter_write_peft(a, null()), "dir is NULL");
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
        let a = adapter_off_the_base();
        let f = [0.5f32; 2 * 384];
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

        // The reason, same convention: lora_r2's default-policy verdict is warn, from one rule
        // that the JSON lists too.
        let report = json(r);
        let want = report["fired_rules"][0]["reason"]
            .as_str()
            .unwrap()
            .to_owned();
        assert_eq!(report["fired_rules"].as_array().unwrap().len(), 1);
        assert_status(
            ig_report_reason(r, small.as_mut_ptr(), 4, &mut needed),
            IG_STATUS_BUFFER_TOO_SMALL,
            "needs",
        );
        assert_eq!(needed, want.len() + 1);
        let mut reason = vec![0u8; needed];
        ok(ig_report_reason(
            r,
            reason.as_mut_ptr().cast(),
            needed,
            &mut needed,
        ));
        assert_eq!(std::str::from_utf8(&reason[..needed - 1]).unwrap(), want);
        assert_status(
            ig_report_reason(null(), null_mut(), 0, &mut needed),
            IG_STATUS_INVALID_ARGUMENT,
            "report is NULL",
        );

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

/// An in-memory adapter whose one module, `decoder.nowhere`, is not in the MiniLM base.
fn adapter_off_the_base() -> *mut ig_adapter {
    let a = ig_adapter_new();
    let f = [0.5f32; 2 * 384];
    ok(unsafe {
        ig_adapter_add_module(
            a,
            c("decoder.nowhere.weight").as_ptr(),
            f.as_ptr().cast(),
            f.as_ptr().cast(),
            IG_DTYPE_F32,
            2,
            384,
            384,
            1.0,
        )
    });
    a
}

/// A PEFT directory with real weights (lora_r2's) and an adapter_config.json that does not parse.
fn broken_adapter_dir() -> tempfile::TempDir {
    let broken = tempfile::tempdir().unwrap();
    std::fs::write(broken.path().join("adapter_config.json"), "{").unwrap();
    let weights = "adapter_model.safetensors";
    std::fs::copy(
        adapter_dir("lora_r2").join(weights),
        broken.path().join(weights),
    )
    .unwrap();
    broken
}

#[test]
fn a_failed_screening_leaves_the_gate_as_it_was() {
    let g = gate();
    let before = screen_dir(g, "rslora_r16");
    let broken = broken_adapter_dir();
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

/// A gate with `policy` (JSON), no disk cache, MiniLM attached.
fn gate_with_policy(policy: &str) -> *mut ig_gate {
    unsafe {
        let cfg = ig_config_new();
        ok(ig_config_set_cache_dir(cfg, null()));
        ok(ig_config_set_policy_json(cfg, c(policy).as_ptr()));
        let mut g = null_mut();
        ok(ig_gate_new(cfg, &mut g));
        ig_config_free(cfg);
        ok(ig_gate_attach_base(g, c_path(&minilm_base()).as_ptr()));
        g
    }
}

fn screen_dir_report(g: *mut ig_gate, dir: &Path) -> *mut ig_report {
    let mut r = null_mut();
    ok(unsafe { ig_gate_screen_adapter(g, c_path(dir).as_ptr(), &mut r) });
    r
}

#[test]
fn a_policy_document_sets_the_verdict_rules() {
    let g = gate_with_policy(
        r#"{"rules": [{"metric": "total_intruders", "threshold": 1, "action": "reject"}],
            "on_invalid": "fail"}"#,
    );
    let got = screen_dir(g, "lora_r2");
    assert_eq!(got["verdict"], "reject");
    assert_eq!(
        got["fired_rules"][0]["reason"],
        format!("total_intruders = {} ≥ 1 → reject", got["total_intruders"])
    );
    unsafe {
        let cfg = ig_config_new();
        ok(ig_config_set_cache_dir(cfg, null()));
        for (bad, phrase) in [
            ("{", "policy is not valid JSON"),
            (
                r#"{"rules": [{"metric": "min_max_cos", "threshold": 2, "action": "warn"}]}"#,
                "threshold 2 is out of range",
            ),
        ] {
            assert_status(
                ig_config_set_policy_json(cfg, c(bad).as_ptr()),
                IG_STATUS_INVALID_ARGUMENT,
                phrase,
            );
        }
        // The refused documents left the C default policy in place.
        let mut g2 = null_mut();
        ok(ig_gate_new(cfg, &mut g2));
        ig_config_free(cfg);
        ok(ig_gate_attach_base(g2, c_path(&minilm_base()).as_ptr()));
        assert_eq!(screen_dir(g2, "lora_r16_qv")["verdict"], "clamp");
        ig_gate_free(g2);
        ig_gate_free(g);
    }
}

/// One module of an adapter handle, copied out through `ig_adapter_module`.
#[derive(Debug, Clone, PartialEq)]
struct Factors {
    name: String,
    rank: usize,
    in_features: usize,
    out_features: usize,
    scale: f32,
    a: Vec<f32>,
    b: Vec<f32>,
}

impl Factors {
    /// `scale · B · A` in f64.
    fn delta(&self) -> Mat<f64> {
        let (r, n) = (self.rank, self.in_features);
        let b = Mat::<f64>::from_fn(self.out_features, r, |i, k| self.b[i * r + k] as f64);
        let a = Mat::<f64>::from_fn(r, n, |k, j| self.a[k * n + j] as f64);
        b * a * faer::Scale(self.scale as f64)
    }
}

fn factors(a: *const ig_adapter) -> Vec<Factors> {
    unsafe {
        (0..ig_adapter_module_count(a))
            .map(|i| {
                let mut f = std::mem::zeroed::<ig_lora_factors>();
                ok(ig_adapter_module(a, i, &mut f));
                Factors {
                    name: CStr::from_ptr(f.name).to_str().unwrap().to_owned(),
                    rank: f.rank,
                    in_features: f.in_features,
                    out_features: f.out_features,
                    scale: f.scale,
                    a: std::slice::from_raw_parts(f.lora_a, f.rank * f.in_features).to_vec(),
                    b: std::slice::from_raw_parts(f.lora_b, f.out_features * f.rank).to_vec(),
                }
            })
            .collect()
    }
}

fn clamp(
    g: *mut ig_gate,
    r: *const ig_report,
    lambda: f64,
    target: ig_clamp_target,
    mode: ig_clamp_mode,
    pad_rank_to: usize,
) -> *mut ig_adapter {
    let mut out = null_mut();
    ok(unsafe { ig_gate_clamp(g, r, lambda, target, mode, pad_rank_to, &mut out) });
    assert!(!out.is_null());
    out
}

fn rel(a: &Mat<f64>, b: &Mat<f64>) -> f64 {
    (a - b).norm_l2() / b.norm_l2()
}

/// The C clamp, of a report screened from a directory or from host memory, gives the factors
/// of the Rust `Gate::clamp` for every target and mode; `pad_rank_to` only adds zeros.
#[test]
fn clamp_through_the_c_abi_gives_the_rust_clamp() {
    let rust = Gate::new(Config {
        cache_dir: None,
        ..Config::default()
    })
    .unwrap();
    rust.attach_base(&minilm_base()).unwrap();
    let adapter = load_peft_dir(&adapter_dir("lora_r16_qv"), &Limits::default()).unwrap();
    let report = rust.screen(&adapter).unwrap();

    let g = gate();
    let from_dir = screen_dir_report(g, &adapter_dir("lora_r16_qv"));
    let host = in_memory("lora_r16_qv", IG_DTYPE_F32);
    let mut from_memory = null_mut();
    ok(unsafe { ig_gate_screen(g, host, &mut from_memory) });
    for (lambda, target, mode, t, m) in [
        (
            0.3,
            IG_CLAMP_TARGET_ALL,
            IG_CLAMP_MODE_EXACT,
            Target::All,
            ClampMode::Exact,
        ),
        (
            0.75,
            IG_CLAMP_TARGET_TOP1,
            IG_CLAMP_MODE_EXACT,
            Target::Top1,
            ClampMode::Exact,
        ),
        (
            0.0,
            IG_CLAMP_TARGET_ALL,
            IG_CLAMP_MODE_RANK_PRESERVING,
            Target::All,
            ClampMode::RankPreserving,
        ),
    ] {
        let opts = ClampOptions {
            lambda,
            target: t,
            mode: m,
        };
        let want = intruder_gate::clamp::clamp(&rust, &adapter, &report, &opts).unwrap();
        assert!(want.clamped_directions() > 0);
        for r in [from_dir, from_memory] {
            let got_handle = clamp(g, r, lambda, target, mode, 0);
            let got = factors(got_handle);
            assert_eq!(got.len(), want.modules.len());
            for (f, w) in got.iter().zip(&want.modules) {
                assert_eq!(
                    (&f.name, f.rank, f.scale),
                    (&w.name, w.rank, 1.0),
                    "{opts:?}"
                );
                let w_delta = Factors {
                    name: w.name.clone(),
                    rank: w.rank,
                    in_features: w.in_features,
                    out_features: w.out_features,
                    scale: 1.0,
                    a: w.a.clone(),
                    b: w.b.clone(),
                }
                .delta();
                let err = rel(&f.delta(), &w_delta);
                assert!(err <= 1e-6, "{} {opts:?}: ΔW differs by {err:.1e}", f.name);
            }
            // Padded: the same ΔW, every module at rank 32.
            let padded_handle = clamp(g, r, lambda, target, mode, 32);
            for (p, f) in factors(padded_handle).iter().zip(&got) {
                assert_eq!(p.rank, 32);
                assert!(rel(&p.delta(), &f.delta()) <= 1e-12, "{}", p.name);
            }
            unsafe {
                ig_adapter_free(padded_handle);
                ig_adapter_free(got_handle);
            }
        }
    }
    unsafe {
        ig_report_free(from_dir);
        ig_report_free(from_memory);
        ig_adapter_free(host);
        ig_gate_free(g);
    }
}

/// Independently of the library's own maths: against a dense f64 SVD of `W' = W0 + s·B·A`, the
/// clamped `W'' = W0 + B''·A''` maps each clamped right singular vector to `λ·σ_j·u_j` and every
/// other top-k one to `σ_i·u_i` (relative error ≤ 1e-4); re-screening the clamped in-memory
/// adapter through the C ABI shows the same spectrum, the clamped values scaled by λ.
#[test]
fn the_clamped_adapter_has_each_clamped_sigma_times_lambda_and_the_rest_unchanged() {
    let lambda = 0.3;
    let g = gate();
    let r = screen_dir_report(g, &adapter_dir("lora_r16_qv"));
    let before = json(r);
    let clamped = clamp(g, r, lambda, IG_CLAMP_TARGET_ALL, IG_CLAMP_MODE_EXACT, 0);
    let after = screen(g, clamped);
    let base = BaseModel::open(&minilm_base(), &Limits::default()).unwrap();
    let original = load_peft_dir(&adapter_dir("lora_r16_qv"), &Limits::default()).unwrap();
    let k = before["top_k"].as_u64().unwrap() as usize;
    let indices = |v: &Value| -> Vec<usize> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as usize)
            .collect()
    };
    let mut checked = 0;
    for ((f, m), m_after) in factors(clamped)
        .iter()
        .zip(before["modules"].as_array().unwrap())
        .zip(after["modules"].as_array().unwrap())
    {
        assert_eq!(m["module"], f.name.as_str());
        let clamped_dirs = indices(&m["intruders"]);
        assert_eq!(
            f.rank,
            m["rank"].as_u64().unwrap() as usize + clamped_dirs.len()
        );

        // Re-screened: the old top k with the clamped values scaled and re-sorted; entries that
        // fell below the top k are replaced from below, so compare the first k − m.
        let sigma = |v: &Value| -> Vec<f64> {
            v["singular_values"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_f64().unwrap())
                .collect()
        };
        let mut expected = sigma(m);
        for &j in &clamped_dirs {
            expected[j] *= lambda;
        }
        expected.sort_by(|a, b| b.total_cmp(a));
        for (i, (got, want)) in sigma(m_after)
            .iter()
            .zip(&expected)
            .take(k - clamped_dirs.len())
            .enumerate()
        {
            assert!(
                (got - want).abs() <= 1e-4 * want,
                "{} re-screened σ[{i}]: {got} vs {want}",
                f.name
            );
        }

        // Dense: tied vectors are not individually defined, so modules whose clamped
        // directions are tied are left to the re-screen check above.
        if clamped_dirs.iter().any(|j| indices(&m["tied"]).contains(j)) {
            continue;
        }
        let t = base.matrix(m["base_tensor"].as_str().unwrap()).unwrap();
        let w = t.to_f64();
        let w0 = Mat::from_fn(t.rows, t.cols, |i, j| w[i * t.cols + j]);
        let lora = original.modules.iter().find(|l| l.name == f.name).unwrap();
        let b = Mat::<f64>::from_fn(lora.out_features, lora.rank, |i, c| {
            lora.b[i * lora.rank + c] as f64
        });
        let a = Mat::<f64>::from_fn(lora.rank, lora.in_features, |c, j| {
            lora.a[c * lora.in_features + j] as f64
        });
        let svd = (&w0 + b * a * faer::Scale(lora.scale)).thin_svd().unwrap();
        let w2 = &w0 + f.delta();
        for i in 0..k {
            let s = svd.S().column_vector()[i];
            let want = if clamped_dirs.contains(&i) {
                lambda * s
            } else {
                s
            };
            let residual = (&w2 * svd.V().col(i) - svd.U().col(i) * faer::Scale(want)).norm_l2();
            assert!(
                residual <= 1e-4 * s,
                "{} σ[{i}] = {s}: ‖W''v − {want}·u‖ = {residual:.2e}",
                f.name
            );
        }
        checked += 1;
    }
    assert!(checked >= 6, "only {checked} modules checked densely");
    assert!(
        after["total_intruders"].as_u64().unwrap() <= before["total_intruders"].as_u64().unwrap()
    );
    unsafe {
        ig_adapter_free(clamped);
        ig_report_free(r);
        ig_gate_free(g);
    }
}

#[test]
fn bad_clamp_calls_get_a_status_and_a_message_and_change_nothing() {
    let g = gate();
    let r = screen_dir_report(g, &adapter_dir("lora_r16_qv"));
    let (all, exact) = (IG_CLAMP_TARGET_ALL, IG_CLAMP_MODE_EXACT);
    let reference = clamp(g, r, 0.5, all, exact, 0);
    let numbers_before = common::numbers(&screen_dir(g, "lora_r2"));

    // Another gate's report; reports of failed screenings (a directory that does not parse,
    // and an in-memory adapter whose module is not in the base) under a policy that rejects
    // invalid adapters with a report rather than failing the call.
    let other = gate();
    let foreign = screen_dir_report(other, &adapter_dir("lora_r16_qv"));
    let rejecting = gate_with_policy(r#"{"rules": []}"#);
    let broken = broken_adapter_dir();
    let unparsed = screen_dir_report(rejecting, broken.path());
    let mismatched = adapter_off_the_base();
    let mut unmatched = null_mut();
    unsafe {
        ok(ig_gate_screen(rejecting, mismatched, &mut unmatched));
        assert_eq!(ig_report_verdict(unparsed), IG_VERDICT_REJECT);
        assert_eq!(ig_report_verdict(unmatched), IG_VERDICT_REJECT);
    }

    let cases: [(*mut ig_gate, *const ig_report, f64, u32, u32, usize, &str); 10] = [
        (
            g,
            r,
            f64::NAN,
            all,
            exact,
            0,
            "lambda must be finite and at least 0, got NaN",
        ),
        (
            g,
            r,
            -0.1,
            all,
            exact,
            0,
            "lambda must be finite and at least 0",
        ),
        (g, r, f64::INFINITY, all, exact, 0, "lambda must be finite"),
        (g, r, 0.5, 2, exact, 0, "unknown ig_clamp_target 2"),
        (g, r, 0.5, all, 7, 0, "unknown ig_clamp_mode 7"),
        (
            g,
            foreign,
            0.5,
            all,
            exact,
            0,
            "the report was screened on another gate",
        ),
        (
            other,
            r,
            0.5,
            all,
            exact,
            0,
            "the report was screened on another gate",
        ),
        (
            rejecting,
            unparsed,
            0.5,
            all,
            exact,
            0,
            "its screening failed: ",
        ),
        (rejecting, unmatched, 0.5, all, exact, 0, "decoder.nowhere"),
        (
            g,
            r,
            0.5,
            all,
            exact,
            4,
            "does not fit in a padded rank of 4",
        ),
    ];
    for (gate, report, lambda, target, mode, pad, phrase) in cases {
        let mut out = null_mut();
        assert_status(
            unsafe { ig_gate_clamp(gate, report, lambda, target, mode, pad, &mut out) },
            IG_STATUS_INVALID_ARGUMENT,
            phrase,
        );
        assert!(out.is_null(), "{phrase}: out written on failure");
    }

    // Nothing changed: the same clamp gives the same factors, screening the same numbers.
    let again = clamp(g, r, 0.5, all, exact, 0);
    assert_eq!(factors(again), factors(reference));
    assert_eq!(common::numbers(&screen_dir(g, "lora_r2")), numbers_before);
    unsafe {
        for a in [again, reference, mismatched] {
            ig_adapter_free(a);
        }
        for rep in [r, foreign, unparsed, unmatched] {
            ig_report_free(rep);
        }
        for gate in [g, other, rejecting] {
            ig_gate_free(gate);
        }
    }
}

/// `ig_adapter_write_peft` writes a PEFT directory that loads back to the same factors and
/// screens to the same numbers; it keeps the source's config fields, replaces an existing
/// directory's files, and refuses what it cannot write.
#[test]
fn write_peft_round_trips_clamped_and_host_adapters() {
    let tmp = tempfile::tempdir().unwrap();
    let g = gate();
    let r = screen_dir_report(g, &adapter_dir("lora_r16_qv"));
    let clamped = clamp(g, r, 0.3, IG_CLAMP_TARGET_ALL, IG_CLAMP_MODE_EXACT, 0);
    let host = in_memory("lora_r2", IG_DTYPE_F32);
    for (name, a) in [("clamped", clamped), ("host", host)] {
        let dir = tmp.path().join("out").join(name);
        for _ in 0..2 {
            // The second write replaces the first one's files.
            ok(unsafe { ig_adapter_write_peft(a, c_path(&dir).as_ptr()) });
        }
        let mut loaded = null_mut();
        ok(unsafe { ig_adapter_load_peft(c_path(&dir).as_ptr(), &mut loaded) });
        assert_eq!(factors(loaded), factors(a), "{name}");
        let mut from_dir = null_mut();
        ok(unsafe { ig_gate_screen_adapter(g, c_path(&dir).as_ptr(), &mut from_dir) });
        assert_same_numbers(&json(from_dir), &screen(g, a));
        unsafe {
            ig_report_free(from_dir);
            ig_adapter_free(loaded);
        }
    }
    let config: Value = serde_json::from_slice(
        &std::fs::read(tmp.path().join("out/clamped/adapter_config.json")).unwrap(),
    )
    .unwrap();
    let top = factors(clamped).iter().map(|f| f.rank).max().unwrap();
    assert_eq!(config["r"], top);
    assert_eq!(config["lora_alpha"], top as f64);
    assert_eq!(
        config["auto_mapping"]["base_model_class"], "BertModel",
        "the source's fields are kept"
    );
    let mut names: Vec<_> = std::fs::read_dir(tmp.path().join("out"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    names.sort();
    assert_eq!(names, ["clamped", "host"], "no staging directory left");

    unsafe {
        let file = tmp.path().join("a-file");
        std::fs::write(&file, "x").unwrap();
        assert_status(
            ig_adapter_write_peft(clamped, c_path(&file).as_ptr()),
            IG_STATUS_IO,
            "a-file",
        );
        assert_eq!(std::fs::read_to_string(&file).unwrap(), "x");
        let mut rs = null_mut();
        ok(ig_adapter_load_peft(
            c_path(&adapter_dir("rslora_r16")).as_ptr(),
            &mut rs,
        ));
        assert_status(
            ig_adapter_write_peft(rs, c_path(&tmp.path().join("rs")).as_ptr()),
            IG_STATUS_INVALID_ARGUMENT,
            "only plain-LoRA scales can be written",
        );
        assert!(!tmp.path().join("rs").exists());
        ig_adapter_free(rs);
        ig_adapter_free(clamped);
        ig_adapter_free(host);
        ig_report_free(r);
        ig_gate_free(g);
    }
}

/// `ig_last_error` cut inside a multi-byte character, leaving an invalid byte before the NUL
/// (issue 15); it now cuts at the last character boundary that fits.
#[test]
fn last_error_is_cut_at_a_character_boundary() {
    unsafe {
        let cfg = ig_config_new();
        ok(ig_config_set_cache_dir(cfg, null()));
        let mut g = null_mut();
        ok(ig_gate_new(cfg, &mut g));
        ig_config_free(cfg);
        let dir = tempfile::tempdir().unwrap();
        // 'é' is two bytes, '€' three.
        let missing = dir.path().join("é€é");
        assert_status(
            ig_gate_attach_base(g, c_path(&missing).as_ptr()),
            IG_STATUS_IO,
            "é€é",
        );
        let full = last_error();
        let start = full.find("é€é").unwrap();
        for cap in start + 1..start + 9 {
            let mut buf = vec![b'#' as c_char; cap];
            assert_eq!(ig_last_error(buf.as_mut_ptr(), cap), full.len() + 1);
            let got = CStr::from_ptr(buf.as_ptr()).to_bytes();
            let text = std::str::from_utf8(got)
                .unwrap_or_else(|e| panic!("cap {cap}: invalid UTF-8 {got:?}: {e}"));
            assert!(full.starts_with(text), "cap {cap}: {text:?}");
            // The longest prefix that fits and ends on a boundary.
            let want = (0..cap).rev().find(|&n| full.is_char_boundary(n)).unwrap();
            assert_eq!(text.len(), want, "cap {cap}");
        }
        ig_gate_free(g);
    }
}

/// `pad_rank_to` was not bounded before the padded factors were allocated: `SIZE_MAX` gave
/// IG_STATUS_PANIC and 2^40 aborted the host (issue 15). Both are IG_STATUS_LIMIT now, and the
/// gate and report stay usable.
#[test]
fn a_pad_rank_over_the_rank_limit_is_refused_before_allocation() {
    let g = gate();
    let r = screen_dir_report(g, &adapter_dir("lora_r16_qv"));
    let (all, exact) = (IG_CLAMP_TARGET_ALL, IG_CLAMP_MODE_EXACT);
    let limit = Limits::default().max_rank;
    for pad in [usize::MAX, 1 << 40, limit + 1] {
        let mut out = null_mut();
        assert_status(
            unsafe { ig_gate_clamp(g, r, 0.5, all, exact, pad, &mut out) },
            IG_STATUS_LIMIT,
            &format!("pad_rank_to {pad} is over the rank limit of {limit}"),
        );
        assert!(out.is_null());
    }
    let padded = clamp(g, r, 0.5, all, exact, 64);
    assert!(factors(padded).iter().all(|f| f.rank == 64));
    unsafe {
        ig_adapter_free(padded);
        ig_report_free(r);
        ig_gate_free(g);
    }
}
