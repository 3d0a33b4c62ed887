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
fn tuned_model_comparison_lists_unchanged_matrices_and_dense_stays_the_reference() {
    let dir = tempfile::tempdir().unwrap();
    let p = planted_in(dir.path(), 0);
    // A "fully fine-tuned" copy: the base itself, so every top vector is a base vector.
    let run = |extra: &[&str]| {
        let out = cli()
            .args(["scan", "--no-cache", "--format", "json"])
            .args(extra)
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
        serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap()
    };
    // auto (the default): byte-identical matrices are unchanged, no maths.
    let v = run(&[]);
    assert_eq!(v["method"], "auto");
    assert_eq!(v["total_intruders"], 0);
    assert_eq!(v["modules"].as_array().unwrap().len(), 0);
    assert_eq!(v["unchanged"].as_array().unwrap().len(), 2);
    assert!(v["tuned"].is_string());
    let v = run(&["--method", "dense"]);
    assert_eq!(v["method"], "dense");
    assert_eq!(v["total_intruders"], 0);
    assert_eq!(v["modules"].as_array().unwrap().len(), 2);
    assert!(v.get("unchanged").is_none());
}

fn json_of(out: &std::process::Output) -> serde_json::Value {
    assert_eq!(out.status.code(), Some(0), "{}", stderr(out));
    serde_json::from_slice(&out.stdout).unwrap()
}

/// `W0 + s·B·A` for every module of `p`'s adapter, plus `noise` times a Gaussian matrix: the
/// planted base's matrices as a merged (noise 0) or fine-tuned checkpoint, f32.
fn checkpoint_of(p: &Planted, path: &Path, noise: f64) {
    use intruder_gate::safetensors_file::{self, SafetensorsFile};
    use intruder_gate::tensor::{encode, DType};
    let adapter = intruder_gate::adapter::load_peft_dir(&p.adapter, &Default::default()).unwrap();
    let base = SafetensorsFile::open(&p.base, &Default::default()).unwrap();
    let mut rng = synth::Rng::new(5);
    let tensors: Vec<_> = adapter
        .modules
        .iter()
        .map(|m| {
            let name = format!("{}.weight", m.name);
            let w0 = base.matrix(&name).unwrap().to_f64();
            let (out, inn, r) = (m.out_features, m.in_features, m.rank);
            let w1: Vec<f32> = (0..out * inn)
                .map(|t| {
                    let (i, j) = (t / inn, t % inn);
                    let ba: f64 = (0..r)
                        .map(|k| m.b[i * r + k] as f64 * m.a[k * inn + j] as f64)
                        .sum();
                    (w0[t] + m.scale * ba + noise * rng.normal()) as f32
                })
                .collect();
            (name, DType::F32, vec![out, inn], encode(&w1, DType::F32))
        })
        .collect();
    safetensors_file::write(path, &tensors, &Default::default()).unwrap();
}

/// What the JSON says about each `--tuned` matrix: a merged LoRA is `merged-lora` with its rank
/// and the adapter scan's intruders, and no seed (nothing randomized ran); a full-rank change is
/// screened by the randomized solver, with its residual and the seed given.
#[test]
fn tuned_checkpoints_report_how_each_matrix_was_screened() {
    let dir = tempfile::tempdir().unwrap();
    let p = planted_in(dir.path(), 2);
    let tuned = |path: &Path| {
        cli()
            .args(["scan", "--no-cache", "--backend", "cpu", "--format", "json"])
            .args(["--seed", "5", "--base"])
            .arg(&p.base)
            .arg("--tuned")
            .arg(path)
            .output()
            .unwrap()
    };
    let scanned = json_of(&scan(&p.base, &p.adapter, &["--format", "json"]));
    let merged = dir.path().join("merged.safetensors");
    checkpoint_of(&p, &merged, 0.0);
    let v = json_of(&tuned(&merged));
    assert_eq!(v["method"], "auto");
    assert!(
        v.get("seed").is_none() && v.get("unchanged").is_none(),
        "{v}"
    );
    let modules = v["modules"].as_array().unwrap();
    assert_eq!(modules.len(), 2);
    for (m, a) in modules.iter().zip(scanned["modules"].as_array().unwrap()) {
        assert_eq!(m["base_tensor"], a["base_tensor"]);
        assert_eq!(m["solver"], "merged-lora", "{m}");
        assert_eq!(m["detected_rank"], 4, "{m}");
        assert_eq!(m["rank"], 4);
        assert!(m["low_rank_residual"].as_f64().unwrap() < 1e-5, "{m}");
        assert!(m.get("residual").is_none());
        assert_eq!(m["intruders"], a["intruders"], "{m}");
    }
    let finetuned = dir.path().join("ft.safetensors");
    checkpoint_of(&p, &finetuned, 0.02);
    let v = json_of(&tuned(&finetuned));
    assert_eq!(v["seed"], 5, "{v}");
    for m in v["modules"].as_array().unwrap() {
        let solver = m["solver"].as_str().unwrap();
        assert!(solver.starts_with("randomized"), "{m}");
        assert!(m.get("detected_rank").is_none(), "{m}");
        assert!(m["residual"].as_f64().unwrap() <= 1e-9, "{m}");
    }
}

/// A DoRA adapter (PEFT's layout: `use_dora` and a `lora_magnitude_vector` per module) is
/// screened by the randomized solver; clamping it exits 2 naming DoRA, writing nothing.
#[test]
fn dora_adapters_are_screened_and_their_clamp_is_refused() {
    use intruder_gate::safetensors_file::{self, SafetensorsFile};
    use intruder_gate::tensor::{encode, DType};
    let dir = tempfile::tempdir().unwrap();
    let p = planted_in(dir.path(), 2);
    let file = SafetensorsFile::open(&weights(&p.adapter), &Default::default()).unwrap();
    let mut tensors: Vec<_> = file
        .names()
        .map(|n| {
            let info = file.info(n).unwrap();
            let (dtype, shape) = (info.dtype.unwrap(), info.shape.clone());
            (n.to_string(), dtype, shape, file.bytes(n).unwrap().to_vec())
        })
        .collect();
    for (m, out) in [("layers.0.attn.q", 64), ("layers.0.mlp.up", 96)] {
        let b = file
            .matrix(&format!("base_model.model.{m}.lora_B.weight"))
            .unwrap();
        assert_eq!(b.rows, out);
        // Any positive magnitudes make a valid DoRA weight; these differ row to row.
        let magnitude: Vec<f32> = (0..out).map(|i| 1.0 + 0.05 * i as f32).collect();
        tensors.push((
            format!("base_model.model.{m}.lora_magnitude_vector"),
            DType::F32,
            vec![out],
            encode(&magnitude, DType::F32),
        ));
    }
    drop(file);
    safetensors_file::write(&weights(&p.adapter), &tensors, &Default::default()).unwrap();
    rewrite_config(&p.adapter, |v| v["use_dora"] = true.into());
    let v = json_of(&scan(&p.base, &p.adapter, &["--format", "json"]));
    assert!(v["seed"].is_u64(), "{v}");
    for m in v["modules"].as_array().unwrap() {
        assert!(
            m["solver"].as_str().unwrap().starts_with("randomized"),
            "{m}"
        );
    }
    let out_dir = dir.path().join("clamped");
    let out = clamp_cmd(&p, &out_dir, &[]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("DoRA adapters are screened but not clamped"),
        "{}",
        stderr(&out)
    );
    assert!(!out_dir.exists());
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

    // The entries; the remembered fingerprints of the base file are beside them.
    let files: Vec<_> = std::fs::read_dir(&cache)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
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
    if !tool_or_skip("script", "the terminal half (util-linux `script`)") {
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

// ---- defects found tried as a new user would (issue 15, item 2) ----

fn stderr(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn mkfifo(path: &Path) {
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: a NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0, "mkfifo");
}

/// `--metrics-file` "replaced atomically" whatever it named: as root, /dev/full became a
/// regular file. Anything but a regular file or nothing is refused, and left as it was.
#[test]
fn metrics_file_must_be_a_regular_file_or_absent() {
    use std::os::unix::fs::FileTypeExt;
    let dir = tempfile::tempdir().unwrap();
    let p = planted_in(dir.path(), 1);
    let fifo = dir.path().join("metrics.fifo");
    mkfifo(&fifo);
    let target = dir.path().join("target.prom");
    std::fs::write(&target, "# kept\n").unwrap();
    let link = dir.path().join("metrics.link");
    std::os::unix::fs::symlink(&target, &link).unwrap();
    for path in [&fifo, &link, &dir.path().to_path_buf()] {
        let out = scan(
            &p.base,
            &p.adapter,
            &["--metrics-file", path.to_str().unwrap()],
        );
        assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
        assert!(
            stderr(&out).contains("not a regular file; refusing to replace it"),
            "{}",
            stderr(&out)
        );
    }
    assert!(std::fs::symlink_metadata(&fifo)
        .unwrap()
        .file_type()
        .is_fifo());
    assert!(std::fs::symlink_metadata(&link)
        .unwrap()
        .file_type()
        .is_symlink());
    assert_eq!(std::fs::read_to_string(&target).unwrap(), "# kept\n");
    // A regular file, or none yet, is written.
    let prom = dir.path().join("m.prom");
    for _ in 0..2 {
        let out = scan(
            &p.base,
            &p.adapter,
            &["--metrics-file", prom.to_str().unwrap()],
        );
        assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
        assert!(std::fs::read_to_string(&prom)
            .unwrap()
            .contains("intruder_gate_"));
    }
}

fn clamp_cmd(p: &Planted, out: &Path, extra: &[&str]) -> std::process::Output {
    cli()
        .args(["clamp", "--no-cache", "--backend", "cpu", "--base"])
        .arg(&p.base)
        .arg("--adapter")
        .arg(&p.adapter)
        .arg("--out")
        .arg(out)
        .args(extra)
        .output()
        .unwrap()
}

fn dir_bytes(dir: &Path) -> Vec<(std::path::PathBuf, Vec<u8>)> {
    let mut v: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file())
        .map(|p| {
            let b = std::fs::read(&p).unwrap();
            (p, b)
        })
        .collect();
    v.sort();
    v
}

/// `clamp --out DIR` with DIR the input adapter replaced the input with the clamped adapter
/// (exit 0). The input, a directory inside it, and a non-empty directory without `--force` are
/// refused, and nothing is written.
#[test]
fn clamp_never_writes_over_its_input_or_a_non_empty_directory() {
    let dir = tempfile::tempdir().unwrap();
    let p = planted_in(dir.path(), 2);
    let before = dir_bytes(&p.adapter);
    let dotted = p.adapter.join("..").join(p.adapter.file_name().unwrap());
    for out in [p.adapter.clone(), dotted, p.adapter.join("clamped")] {
        let o = clamp_cmd(&p, &out, &[]);
        assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
        assert!(
            stderr(&o).contains("is the input adapter directory or inside it"),
            "{}",
            stderr(&o)
        );
    }
    assert_eq!(dir_bytes(&p.adapter), before, "the input changed");
    assert!(!p.adapter.join("clamped").exists());

    let busy = dir.path().join("busy");
    std::fs::create_dir(&busy).unwrap();
    std::fs::write(busy.join("notes.txt"), "mine").unwrap();
    let o = clamp_cmd(&p, &busy, &[]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("pass --force"), "{}", stderr(&o));
    assert!(!busy.join("adapter_model.safetensors").exists());
    let o = clamp_cmd(&p, &busy, &["--force"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert!(busy.join("adapter_model.safetensors").exists());
    assert_eq!(
        std::fs::read_to_string(busy.join("notes.txt")).unwrap(),
        "mine"
    );

    // An empty directory, or a new one, is fine; the summary speaks the CLI's words.
    let empty = dir.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    let o = clamp_cmd(
        &p,
        &empty,
        &["--target", "top1", "--mode", "rank-preserving"],
    );
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(text.contains("(top1, rank-preserving)"), "{text}");
    let o = clamp_cmd(&p, &dir.path().join("new"), &[]);
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(
        text.contains("(all, exact)") && !text.contains("All"),
        "{text}"
    );
}

/// `scan … 2>&1 | head -2` panicked (exit 101, broken pipe). A closed stdout/stderr now ends the
/// process quietly, as for any filter (SIGPIPE).
#[test]
fn a_closed_pipe_ends_the_cli_quietly() {
    use std::os::unix::process::ExitStatusExt;
    let dir = tempfile::tempdir().unwrap();
    let p = planted_in(dir.path(), 1);
    for args in [&["scan"][..], &["scan", "--format", "json"]] {
        let mut child = cli()
            .args(args)
            .args(["--no-cache", "--backend", "cpu", "--base"])
            .arg(&p.base)
            .arg("--adapter")
            .arg(&p.adapter)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        // The reader goes away before anything is written.
        drop(child.stdout.take());
        drop(child.stderr.take());
        let status = child.wait().unwrap();
        assert_ne!(status.code(), Some(101), "panicked: {status:?}");
        assert!(
            status.success() || status.signal() == Some(libc::SIGPIPE),
            "{status:?}"
        );
    }
}

/// `--epsilon -1` / `--lambda -1` were taken for flags; they are values, refused by validation.
#[test]
fn negative_values_are_values_and_are_validated() {
    let dir = tempfile::tempdir().unwrap();
    let p = planted_in(dir.path(), 1);
    let o = scan(&p.base, &p.adapter, &["--epsilon", "-1"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(
        stderr(&o).contains("epsilon must be in (0, 1], got -1"),
        "{}",
        stderr(&o)
    );
    let o = clamp_cmd(&p, &dir.path().join("out"), &["--lambda", "-1"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(
        stderr(&o).contains("lambda must be finite and at least 0, got -1"),
        "{}",
        stderr(&o)
    );
    assert!(!dir.path().join("out").exists());
}

/// `--top-k`, `--epsilon`, `--backend`, `--method`, `--format`, `--target`, `--mode` had no help.
#[test]
fn every_option_has_help() {
    let help = |cmd: &str| {
        let o = cli().args([cmd, "--help"]).output().unwrap();
        String::from_utf8(o.stdout).unwrap()
    };
    let (scan, clamp) = (help("scan"), help("clamp"));
    for (text, flag) in [
        (&scan, "--top-k"),
        (&scan, "--epsilon"),
        (&scan, "--backend"),
        (&scan, "--method"),
        (&scan, "--format"),
        (&clamp, "--target"),
        (&clamp, "--mode"),
        (&clamp, "--lambda"),
    ] {
        // clap prints `  --flag <VALUE>` then the help on the same line or the next ones.
        let at = text
            .find(&format!("      {flag}"))
            .unwrap_or_else(|| panic!("{flag}: {text}"));
        let entry: Vec<&str> = text[at..].lines().take(2).collect();
        let described = entry[0]
            .split_once('>')
            .is_some_and(|(_, h)| !h.trim().is_empty())
            || entry
                .get(1)
                .is_some_and(|l| !l.trim().starts_with('-') && !l.trim().is_empty());
        assert!(described, "{flag} has no help: {entry:?}");
    }
}

/// "1 intruder dimensions"; and `index --include` matching nothing exited 0 silently.
#[test]
fn singular_counts_and_an_include_that_matches_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let p = planted(
        dir.path(),
        &PlantedSpec::new(&[("layers.0.attn.q", 64, 64)], 4, &[1], 9),
    );
    let json = scan(&p.base, &p.adapter, &["--format", "json"]);
    let v: serde_json::Value = serde_json::from_slice(&json.stdout).unwrap();
    assert_eq!(v["total_intruders"], 1, "the planted direction is found");
    let text = String::from_utf8(scan(&p.base, &p.adapter, &[]).stdout).unwrap();
    assert!(
        text.contains("1 module, 1 with intruders, 1 intruder dimension in total"),
        "{text}"
    );

    let o = cli()
        .args(["index", "--backend", "cpu", "--base"])
        .arg(&p.base)
        .arg("--cache-dir")
        .arg(dir.path().join("cache"))
        .args(["--include", "no_such_tensor"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("`no_such_tensor` matches none of the base's 1 2-D float tensors"),
        "{}",
        stderr(&o)
    );
}
