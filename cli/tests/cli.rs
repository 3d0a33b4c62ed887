//! The command line's contract: exit 0 / 1 (`--fail-on`) / 2 (any error, `error:` on stderr,
//! never a panic), for every malformed input the loader refuses.

mod common;

use common::*;
use std::path::Path;

fn planted_in(dir: &Path, planted_dirs: usize) -> Planted {
    planted(
        dir,
        &PlantedSpec::new(
            &[("layers.0.attn.q", 64, 64), ("layers.0.mlp.up", 96, 64)],
            4,
            &[planted_dirs],
            9,
        ),
    )
}

fn scan(base: &Path, adapter: &Path, extra: &[&str]) -> std::process::Output {
    cli()
        .args(["scan", "--no-cache", "--backend", "cpu"])
        .arg("--base")
        .arg(base)
        .arg("--adapter")
        .arg(adapter)
        .args(extra)
        .output()
        .unwrap()
}

#[test]
fn fail_on_sets_the_exit_code() {
    let dir = tempfile::tempdir().unwrap();
    let p = planted_in(dir.path(), 2);
    assert_eq!(scan(&p.base, &p.adapter, &[]).status.code(), Some(0));
    assert_eq!(
        scan(&p.base, &p.adapter, &["--fail-on", "warn"])
            .status
            .code(),
        Some(1)
    );
    let clean_dir = tempfile::tempdir().unwrap();
    let c = planted_in(clean_dir.path(), 0);
    assert_eq!(
        scan(&c.base, &c.adapter, &["--fail-on", "warn"])
            .status
            .code(),
        Some(0)
    );
    let text = String::from_utf8(scan(&p.base, &p.adapter, &[]).stdout).unwrap();
    // Intruders in 2 of 2 modules: the default policy's fraction rule clamps.
    assert!(text.contains("verdict: clamp"), "{text}");
}

/// One corruption of a valid adapter directory, and a phrase its error must contain.
type Breakage = (&'static str, &'static str, fn(&Path));

fn rewrite_config(dir: &Path, f: impl Fn(&mut serde_json::Value)) {
    let p = dir.join("adapter_config.json");
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    f(&mut v);
    std::fs::write(&p, v.to_string()).unwrap();
}

fn weights(dir: &Path) -> std::path::PathBuf {
    dir.join("adapter_model.safetensors")
}

const BREAKAGES: &[Breakage] = &[
    ("weights cut in the data", "outside the", |d| {
        let b = std::fs::read(weights(d)).unwrap();
        std::fs::write(weights(d), &b[..b.len() / 2]).unwrap();
    }),
    ("weights cut in the header", "truncated", |d| {
        let b = std::fs::read(weights(d)).unwrap();
        std::fs::write(weights(d), &b[..40]).unwrap();
    }),
    ("NaN in lora_B", "NaN", |d| {
        // The last 4 bytes are the last element of the last tensor in data order.
        let mut b = std::fs::read(weights(d)).unwrap();
        let n = b.len();
        b[n - 4..].copy_from_slice(&f32::NAN.to_le_bytes());
        std::fs::write(weights(d), b).unwrap();
    }),
    ("absurd header length", "header", |d| {
        let mut b = std::fs::read(weights(d)).unwrap();
        b[..8].copy_from_slice(&(1u64 << 60).to_le_bytes());
        std::fs::write(weights(d), b).unwrap();
    }),
    ("header not JSON", "JSON", |d| {
        let mut b = std::fs::read(weights(d)).unwrap();
        b[8] = b'#';
        std::fs::write(weights(d), b).unwrap();
    }),
    ("missing weights", "missing", |d| {
        std::fs::remove_file(weights(d)).unwrap()
    }),
    ("pickle weights", "pickle", |d| {
        std::fs::remove_file(weights(d)).unwrap();
        std::fs::write(d.join("adapter_model.bin"), b"\x80\x04").unwrap();
    }),
    ("config not JSON", "JSON", |d| {
        std::fs::write(d.join("adapter_config.json"), "{r: 4").unwrap()
    }),
    ("config without r", "no rank \"r\"", |d| {
        rewrite_config(d, |v| {
            v.as_object_mut().unwrap().remove("r");
        })
    }),
    ("config without lora_alpha", "lora_alpha", |d| {
        rewrite_config(d, |v| {
            v.as_object_mut().unwrap().remove("lora_alpha");
        })
    }),
    ("not LoRA", "peft_type", |d| {
        rewrite_config(d, |v| v["peft_type"] = "IA3".into())
    }),
    ("r = 0", "r", |d| rewrite_config(d, |v| v["r"] = 0.into())),
    ("configured r differs from the tensors", "rank", |d| {
        rewrite_config(d, |v| v["r"] = 8.into())
    }),
    ("DoRA", "DoRA", |d| {
        rewrite_config(d, |v| v["use_dora"] = true.into())
    }),
];

#[test]
fn every_malformed_adapter_exits_2_with_a_clear_error_and_no_panic() {
    for (what, phrase, breakage) in BREAKAGES {
        let dir = tempfile::tempdir().unwrap();
        let p = planted_in(dir.path(), 1);
        breakage(&p.adapter);
        let out = scan(&p.base, &p.adapter, &[]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{what}: {err}");
        assert!(err.starts_with("error:"), "{what}: {err}");
        assert!(err.contains(phrase), "{what}: `{phrase}` not in: {err}");
        assert!(!err.contains("panicked"), "{what}: {err}");
        // With the default policy an invalid adapter's report is a reject without any module
        // screened; I/O errors fail the call and print no report at all.
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            stdout.is_empty()
                || (stdout.contains("verdict: reject") && stdout.contains("0 modules")),
            "{what}: {stdout}"
        );
    }
}

#[test]
fn adapters_that_do_not_fit_the_base_exit_2() {
    let dir = tempfile::tempdir().unwrap();
    let p = planted_in(dir.path(), 1);
    // A base whose tensors have other names: nothing matches.
    let other = tempfile::tempdir().unwrap();
    let q = planted(
        other.path(),
        &PlantedSpec::new(&[("decoder.block.3.ffn", 64, 64)], 4, &[0], 1),
    );
    let out = scan(&q.base, &p.adapter, &[]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("match no base tensor")
            && err.contains("layers.0.attn.q")
            && err.contains("layers.0.mlp.up"),
        "{err}"
    );

    // Same names, other shapes: B·A does not fit W0.
    let shaped = tempfile::tempdir().unwrap();
    let s = planted(
        shaped.path(),
        &PlantedSpec::new(
            &[("layers.0.attn.q", 64, 32), ("layers.0.mlp.up", 96, 64)],
            4,
            &[0],
            2,
        ),
    );
    let out = scan(&s.base, &p.adapter, &[]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("B·A is [64, 64]") && err.contains("[64, 32]"),
        "{err}"
    );
}

#[test]
fn usage_errors_and_missing_paths_exit_2() {
    let out = cli()
        .args([
            "scan",
            "--base",
            "/nonexistent/base.safetensors",
            "--adapter",
            "/nonexistent",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).starts_with("error:"));
    let out = cli().args(["scan", "--adapter", "x"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2), "clap usage errors exit 2");
}

#[test]
fn demo_runs_and_finds_the_planted_intruders() {
    let out = cli().arg("demo").output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(
        text.contains("adapter `clean`: verdict accept, 0 intruder dimensions"),
        "{text}"
    );
    assert!(
        text.contains("adapter `planted`: verdict clamp, 4 intruder dimensions"),
        "{text}"
    );
    assert!(
        text.contains("adapter `malformed`: verdict reject, 0 intruder dimensions")
            && text.contains("malformed (non_finite)"),
        "{text}"
    );
}

#[test]
fn tuned_model_comparison_uses_the_dense_method() {
    let dir = tempfile::tempdir().unwrap();
    let p = planted_in(dir.path(), 0);
    // A "fully fine-tuned" copy: the base itself, so every top vector is a base vector.
    let out = cli()
        .args(["scan", "--no-cache", "--format", "json"])
        .arg("--base")
        .arg(&p.base)
        .arg("--tuned")
        .arg(&p.base)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["method"], "dense");
    assert_eq!(v["total_intruders"], 0);
    assert_eq!(v["modules"].as_array().unwrap().len(), 2);
    assert!(v["tuned"].is_string());
}

/// `index` fills the cache, resumes without recomputing what is there, and reports progress as
/// one line per tensor in a pipe and as a bar redrawn in place on a terminal.
#[test]
fn index_resumes_and_reports_progress() {
    let dir = tempfile::tempdir().unwrap();
    let p = planted_in(dir.path(), 1);
    let cache = dir.path().join("cache");
    let index = |extra: &[&str]| {
        let out = cli()
            .args(["index", "--backend", "cpu", "--base"])
            .arg(&p.base)
            .arg("--cache-dir")
            .arg(&cache)
            .args(extra)
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        let text = |b: &[u8]| String::from_utf8(b.to_vec()).unwrap();
        (text(&out.stdout), text(&out.stderr))
    };
    let (summary, lines) = index(&[]);
    assert!(summary.contains("indexed 2 tensors: 2 computed, 0 already cached"));
    assert_eq!(lines.lines().count(), 2, "{lines}");
    for l in lines.lines() {
        assert!(l.contains(" computed (") && l.contains("ETA"), "{l}");
    }

    let files: Vec<_> = std::fs::read_dir(&cache)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(files.len(), 2);
    std::fs::remove_file(&files[0]).unwrap();
    let (summary, lines) = index(&[]);
    assert!(
        summary.contains("indexed 2 tensors: 1 computed, 1 already cached"),
        "{summary}"
    );
    assert!(lines.contains(" disk_hit ("), "{lines}");

    // A terminal: util-linux `script` runs the command on a pseudo-terminal.
    if std::process::Command::new("script")
        .arg("--version")
        .output()
        .is_err()
    {
        println!("skipped the terminal half: `script` (util-linux) is not installed");
        return;
    }
    let command = format!(
        "{} index --backend cpu --base {} --cache-dir {}",
        env!("CARGO_BIN_EXE_intruder-gate"),
        p.base.display(),
        cache.display()
    );
    let out = std::process::Command::new("script")
        .args(["-qec", &command, "/dev/null"])
        .output()
        .unwrap();
    let shown = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{shown}");
    assert!(
        shown.contains("\r[###############...............] 1/2  50%"),
        "{shown:?}"
    );
    assert!(
        shown.contains("\r[##############################] 2/2 100%"),
        "{shown:?}"
    );
    assert!(
        !shown.contains(" disk_hit ("),
        "no per-tensor lines on a terminal: {shown:?}"
    );
    assert!(shown.contains("indexed 2 tensors: 0 computed, 2 already cached"));
}
