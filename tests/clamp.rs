//! Clamping: exact and rank-preserving factors against an independent dense f64 computation of
//! the paper's formula, the built-in verification, and the written PEFT adapter's round trip.

mod common;

use faer::Mat;
use intruder_gate::adapter::{load_peft_dir, Adapter};
use intruder_gate::base::BaseModel;
use intruder_gate::limits::Limits;
use intruder_gate::report::{ModuleReport, Report};
use intruder_gate::tensor::DType;
use intruder_gate::{ClampMode, ClampOptions, ClampedAdapter, Config, ErrorKind, Gate, Target};
use std::path::Path;

fn gate(base: &Path) -> Gate {
    let g = Gate::new(Config {
        cache_dir: None,
        backend: intruder_gate::backend::BackendChoice::Cpu,
        ..Config::default()
    })
    .unwrap();
    g.attach_base(base).unwrap();
    g
}

fn screened(g: &Gate, dir: &Path) -> (Adapter, Report) {
    let adapter = load_peft_dir(dir, &Limits::default()).unwrap();
    let report = g.screen(&adapter).unwrap();
    (adapter, report)
}

const LAMBDAS: [f64; 3] = [0.0, 0.3, 0.75];
const TARGETS: [Target; 2] = [Target::All, Target::Top1];

fn opts(lambda: f64, target: Target, mode: ClampMode) -> ClampOptions {
    ClampOptions {
        lambda,
        target,
        mode,
    }
}

/// `W0` (out×in, f64) of the module's base tensor.
fn w0(base: &BaseModel, tensor: &str) -> Mat<f64> {
    let t = base.matrix(tensor).unwrap();
    let v = t.to_f64();
    Mat::from_fn(t.rows, t.cols, |i, j| v[i * t.cols + j])
}

/// The paper's `ΔW''` by a dense f64 SVD of `W'`, for the given indices: the independent reference.
fn dense_delta(
    w0: &Mat<f64>,
    adapter: &Adapter,
    module: &str,
    dirs: &[usize],
    lambda: f64,
) -> Mat<f64> {
    let m = adapter.modules.iter().find(|m| m.name == module).unwrap();
    let b = Mat::<f64>::from_fn(m.out_features, m.rank, |i, c| m.b[i * m.rank + c] as f64);
    let a = Mat::<f64>::from_fn(m.rank, m.in_features, |c, j| {
        m.a[c * m.in_features + j] as f64
    });
    let mut delta = &b * &a * faer::Scale(m.scale);
    let svd = (w0 + &delta).thin_svd().unwrap();
    for &j in dirs {
        let s = svd.S().column_vector()[j];
        delta += svd.U().col(j) * svd.V().col(j).transpose() * faer::Scale((lambda - 1.0) * s);
    }
    delta
}

/// `B''·A''` of a clamped module, in f64.
fn product(c: &ClampedAdapter, module: &str) -> Mat<f64> {
    let m = c.module(module).unwrap();
    let b = Mat::<f64>::from_fn(m.out_features, m.rank, |i, k| m.b[i * m.rank + k] as f64);
    let a = Mat::<f64>::from_fn(m.rank, m.in_features, |k, j| {
        m.a[k * m.in_features + j] as f64
    });
    b * a
}

fn module_report<'a>(r: &'a Report, module: &str) -> &'a ModuleReport {
    r.modules.iter().find(|m| m.module == module).unwrap()
}

fn rel(a: &Mat<f64>, b: &Mat<f64>) -> f64 {
    (a - b).norm_l2() / b.norm_l2()
}

/// Exact mode: merging gives `W0 + ΔW''` to f32 round-off of the dense reference, for every
/// module whose clamped directions are well separated (tied vectors are not individually defined).
fn check_exact_against_dense(base_path: &Path, g: &Gate, adapter: &Adapter, report: &Report) {
    let base = BaseModel::open(base_path, &Limits::default()).unwrap();
    for &lambda in &LAMBDAS {
        for &target in &TARGETS {
            let c = intruder_gate::clamp::clamp(
                g,
                adapter,
                report,
                &opts(lambda, target, ClampMode::Exact),
            )
            .unwrap();
            assert!(c.clamped_directions() > 0);
            for m in &c.modules {
                let r = module_report(report, &m.name);
                let dirs: Vec<usize> = m.clamped.iter().map(|d| d.index).collect();
                if dirs.iter().any(|j| r.tied.contains(j)) {
                    continue;
                }
                let w0m = w0(&base, &m.base_tensor);
                let reference = &w0m + dense_delta(&w0m, adapter, &m.name, &dirs, lambda);
                let t = base.matrix(&m.base_tensor).unwrap();
                let mut merged = vec![0f32; t.len()];
                c.merge_into(&m.name, &t, &mut merged).unwrap();
                let merged = Mat::from_fn(t.rows, t.cols, |i, j| merged[i * t.cols + j] as f64);
                let err = rel(&merged, &reference);
                assert!(
                    err < 2e-6,
                    "{} λ={lambda} {target:?}: merged vs dense {err:.2e}",
                    m.name
                );
                assert_eq!(m.rank, r.rank + dirs.len());
            }
            let v = intruder_gate::clamp::verify(
                g,
                adapter,
                &c,
                &c.to_adapter(DType::F32, None).unwrap(),
            )
            .unwrap();
            assert!(v.passed, "λ={lambda} {target:?}:\n{v}");
        }
    }
}

#[test]
fn exact_clamp_matches_the_dense_formula_on_planted_intruders() {
    let tmp = tempfile::tempdir().unwrap();
    let (base, dir) = common::planted_trio(tmp.path(), [2, 0, 3], 41);
    let g = gate(&base);
    let (adapter, report) = screened(&g, &dir);
    let counts: Vec<usize> = report.modules.iter().map(|m| m.intruders.len()).collect();
    assert_eq!(
        counts,
        [3, 2, 0],
        "planted intruders found (sorted by base tensor)"
    );
    check_exact_against_dense(&base, &g, &adapter, &report);
}

#[test]
fn exact_clamp_matches_the_dense_formula_on_minilm() {
    let base = common::minilm_base();
    let g = gate(&base);
    let (adapter, report) = screened(&g, &common::fixtures().join("lora_r16_qv"));
    assert_eq!(
        report.total_intruders, 12,
        "the fixture's reference count at ε = 0.5"
    );
    check_exact_against_dense(&base, &g, &adapter, &report);
}

#[test]
fn verify_passes_on_every_minilm_fixture_for_each_lambda_and_target() {
    let base = common::minilm_base();
    let g = gate(&base);
    for name in ["lora_r2", "lora_r16_qv", "rslora_r16"] {
        let (adapter, report) = screened(&g, &common::fixtures().join(name));
        for &lambda in &LAMBDAS {
            for &target in &TARGETS {
                let c = intruder_gate::clamp::clamp(
                    &g,
                    &adapter,
                    &report,
                    &opts(lambda, target, ClampMode::Exact),
                )
                .unwrap();
                let v = intruder_gate::clamp::verify(
                    &g,
                    &adapter,
                    &c,
                    &c.to_adapter(DType::F32, None).unwrap(),
                )
                .unwrap();
                assert!(v.passed, "{name} λ={lambda} {target:?}:\n{v}");
                let worst = v
                    .modules
                    .iter()
                    .flat_map(|m| &m.clamped)
                    .map(|d| d.factor_error)
                    .fold(0.0, f64::max);
                assert!(worst <= 1e-4, "{name}: factor error {worst:.2e}");
                let after: usize = v.modules.iter().map(|m| m.intruders_after).sum();
                assert!(after <= report.total_intruders);
            }
        }
    }
}

#[test]
fn rank_preserving_is_the_dense_best_rank_r_of_the_clamped_update() {
    let tmp = tempfile::tempdir().unwrap();
    let (base_path, dir) = common::planted_trio(tmp.path(), [2, 1, 3], 7);
    let minilm = common::minilm_base();
    for (base_path, dir) in [
        (base_path, dir),
        (minilm, common::fixtures().join("lora_r16_qv")),
    ] {
        let g = gate(&base_path);
        let base = BaseModel::open(&base_path, &Limits::default()).unwrap();
        let (adapter, report) = screened(&g, &dir);
        let c = intruder_gate::clamp::clamp(
            &g,
            &adapter,
            &report,
            &opts(0.3, Target::All, ClampMode::RankPreserving),
        )
        .unwrap();
        for m in &c.modules {
            let r = module_report(&report, &m.name);
            assert_eq!(m.rank, r.rank, "rank preserved");
            let dirs: Vec<usize> = m.clamped.iter().map(|d| d.index).collect();
            if dirs.is_empty() || dirs.iter().any(|j| r.tied.contains(j)) {
                continue;
            }
            let reference = dense_delta(&w0(&base, &m.base_tensor), &adapter, &m.name, &dirs, 0.3);
            let svd = reference.thin_svd().unwrap();
            let s = svd.S().column_vector();
            let rr = r.rank;
            let best = svd.U().subcols(0, rr)
                * Mat::from_fn(rr, rr, |i, j| if i == j { s[i] } else { 0.0 })
                * svd.V().subcols(0, rr).transpose();
            let err = rel(&product(&c, &m.name), &best);
            assert!(
                err < 1e-5,
                "{}: factors vs dense best rank-r {err:.2e}",
                m.name
            );
            let tail: f64 = (rr..s.nrows()).map(|i| s[i] * s[i]).sum::<f64>().sqrt();
            let t = m.truncation.expect("truncation reported");
            let want = tail / reference.norm_l2();
            assert!(
                (t.relative - want).abs() <= 1e-5 * want.max(1e-3),
                "{}: truncation error {} vs dense {want}",
                m.name,
                t.relative
            );
            assert!(t.relative > 0.0);
        }
        let v = intruder_gate::clamp::verify(
            &g,
            &adapter,
            &c,
            &c.to_adapter(DType::F32, None).unwrap(),
        )
        .unwrap();
        assert!(v.passed, "{v}");
    }
}

#[test]
fn written_adapter_round_trips_and_rescreens_to_the_clamped_spectrum() {
    let tmp = tempfile::tempdir().unwrap();
    let base = common::minilm_base();
    let g = gate(&base);
    let (adapter, report) = screened(&g, &common::fixtures().join("lora_r16_qv"));
    let c = intruder_gate::clamp::clamp(
        &g,
        &adapter,
        &report,
        &opts(0.3, Target::All, ClampMode::Exact),
    )
    .unwrap();

    let out = tmp.path().join("clamped");
    c.write_peft(&out, None, None).unwrap();
    let written = load_peft_dir(&out, &Limits::default()).unwrap();
    assert_eq!(
        written.modules,
        c.to_adapter(DType::F32, None).unwrap().modules
    );
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("adapter_config.json")).unwrap())
            .unwrap();
    let top = c.modules.iter().map(|m| m.rank).max().unwrap();
    assert_eq!(config["r"], top);
    assert_eq!(config["lora_alpha"], top as f64);
    assert_eq!(config["use_rslora"], false);
    assert_eq!(
        config["auto_mapping"]["base_model_class"], "BertModel",
        "source fields kept"
    );
    assert_eq!(
        config["target_modules"],
        serde_json::json!(["query", "value"])
    );
    for m in &written.modules {
        assert_eq!(m.scale, 1.0, "{}: every module's scale is 1", m.name);
    }

    // Re-screening the written adapter shows the clamped spectrum.
    let rescreen = g.screen(&written).unwrap();
    for m in &c.modules {
        let (before, after) = (
            module_report(&report, &m.name),
            module_report(&rescreen, &m.name),
        );
        let mut expected: Vec<f64> = before.singular_values.clone();
        for d in &m.clamped {
            expected[d.index] *= 0.3;
        }
        expected.sort_by(|a, b| b.total_cmp(a));
        // Entries that fell below the top k are replaced by ones from below; compare the rest.
        let keep = before.singular_values.len() - m.clamped.len();
        for (i, (got, want)) in after
            .singular_values
            .iter()
            .zip(&expected)
            .take(keep)
            .enumerate()
        {
            assert!(
                (got - want).abs() / want < 1e-4,
                "{} σ[{i}]: {got} vs {want}",
                m.name
            );
        }
    }
    assert!(rescreen.total_intruders <= report.total_intruders);

    // Padded to a fixed rank in f16: every module has that rank and verify still passes.
    let padded = tmp.path().join("padded");
    c.write_peft(&padded, Some(DType::F16), Some(32)).unwrap();
    let p = load_peft_dir(&padded, &Limits::default()).unwrap();
    assert!(p
        .modules
        .iter()
        .all(|m| m.rank == 32 && m.dtype == DType::F16));
    let v = intruder_gate::clamp::verify(&g, &adapter, &c, &p).unwrap();
    assert!(v.passed, "{v}");
    let e = c.write_peft(&padded, None, Some(16)).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidArgument, "{e}");
}

#[test]
fn a_report_of_another_adapter_or_a_bad_lambda_is_refused() {
    let base = common::minilm_base();
    let g = gate(&base);
    let (adapter, _) = screened(&g, &common::fixtures().join("lora_r16_qv"));
    let (_, other) = screened(&g, &common::fixtures().join("lora_r2"));
    let e =
        intruder_gate::clamp::clamp(&g, &adapter, &other, &ClampOptions::default()).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidArgument, "{e}");
    assert!(e.message().contains("does not describe"), "{e}");
    let (_, report) = screened(&g, &common::fixtures().join("lora_r16_qv"));
    for lambda in [-0.1, f64::NAN] {
        let e = intruder_gate::clamp::clamp(
            &g,
            &adapter,
            &report,
            &opts(lambda, Target::All, ClampMode::Exact),
        )
        .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidArgument);
    }
}

#[test]
fn cli_clamp_verify_on_minilm() {
    let tmp = tempfile::tempdir().unwrap();
    let base = common::minilm_base();
    let out = tmp.path().join("out");
    let run = common::cli()
        .args([
            "clamp",
            "--no-cache",
            "--backend",
            "cpu",
            "--lambda",
            "0.3",
            "--verify",
        ])
        .arg("--base")
        .arg(&base)
        .arg("--adapter")
        .arg(common::fixtures().join("lora_r16_qv"))
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&run.stdout);
    assert!(
        run.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&run.stderr)
    );
    assert!(stdout.contains("verify: PASSED"), "{stdout}");
    assert!(out.join("adapter_model.safetensors").is_file());
}

/// The base spectra the gate computed so far (its metrics; without any cache every request
/// computes one).
fn spectra_computed(g: &Gate) -> u64 {
    let text = g.metrics().render();
    let prefix = "intruder_gate_base_spectrum_cache_requests_total{result=\"computed\"} ";
    text.lines()
        .find_map(|l| l.strip_prefix(prefix))
        .unwrap_or_else(|| panic!("no computed counter in\n{text}"))
        .parse()
        .unwrap()
}

fn uncached_gate(base: &Path) -> Gate {
    let g = Gate::new(Config {
        cache_dir: None,
        memory_cache_bytes: 0,
        backend: intruder_gate::backend::BackendChoice::Cpu,
        ..Config::default()
    })
    .unwrap();
    g.attach_base(base).unwrap();
    g
}

#[test]
fn a_clamp_from_the_screening_solves_each_module_once() {
    let base = common::minilm_base();
    let g = uncached_gate(&base);
    let adapter =
        load_peft_dir(&common::fixtures().join("lora_r16_qv"), &Limits::default()).unwrap();
    let (report, solutions) = g.screen_with_solutions(&adapter).unwrap();
    let n = report.modules.len() as u64;
    assert_eq!(spectra_computed(&g), n);
    assert_eq!(solutions.len(), report.modules.len());
    let once =
        intruder_gate::clamp::clamp_solved(&adapter, &report, &solutions, &ClampOptions::default())
            .unwrap();
    assert!(once.clamped_directions() > 0);
    assert_eq!(
        spectra_computed(&g),
        n,
        "clamp_solved fetched a base spectrum"
    );
    // The report-only path solves every module again: the counter sees it.
    let twice =
        intruder_gate::clamp::clamp(&g, &adapter, &report, &ClampOptions::default()).unwrap();
    assert_eq!(spectra_computed(&g), 2 * n);
    assert_eq!(once.modules, twice.modules);
}

#[test]
fn clamp_from_solutions_equals_the_two_pass_clamp_on_every_minilm_fixture() {
    let base = common::minilm_base();
    let g = gate(&base);
    for name in ["lora_r2", "lora_r16_qv", "rslora_r16"] {
        let adapter = load_peft_dir(&common::fixtures().join(name), &Limits::default()).unwrap();
        let (report, solutions) = g.screen_with_solutions(&adapter).unwrap();
        // The report is the one a plain screening gives.
        let plain = g.screen(&adapter).unwrap();
        assert_eq!(report.modules.len(), plain.modules.len());
        for (a, b) in report.modules.iter().zip(&plain.modules) {
            assert_eq!(
                (&a.singular_values, &a.max_cos, &a.intruders),
                (&b.singular_values, &b.max_cos, &b.intruders)
            );
        }
        for mode in [ClampMode::Exact, ClampMode::RankPreserving] {
            for &target in &TARGETS {
                let o = opts(0.3, target, mode);
                let once =
                    intruder_gate::clamp::clamp_solved(&adapter, &report, &solutions, &o).unwrap();
                let twice = intruder_gate::clamp::clamp(&g, &adapter, &report, &o).unwrap();
                assert!(once.clamped_directions() > 0, "{name}");
                // Bit for bit: the same solve, the same lifted vectors, the same assembly.
                assert_eq!(once.modules, twice.modules, "{name} {target:?} {mode:?}");
            }
        }
    }
}

#[test]
fn solutions_of_another_screening_or_a_dense_screening_are_refused() {
    let base = common::minilm_base();
    let g = gate(&base);
    let load = |name: &str| load_peft_dir(&common::fixtures().join(name), &Limits::default());
    let adapter = load("lora_r16_qv").unwrap();
    let (report, solutions) = g.screen_with_solutions(&adapter).unwrap();
    let o = ClampOptions::default();
    let refused = |e: intruder_gate::Error, what: &str| {
        assert_eq!(e.kind(), ErrorKind::InvalidArgument, "{e}");
        assert!(e.message().contains(what), "{e}");
    };
    // Another adapter's solutions with this report.
    let other = load("lora_r2").unwrap();
    let (_, other_solutions) = g.screen_with_solutions(&other).unwrap();
    refused(
        intruder_gate::clamp::clamp_solved(&adapter, &report, &other_solutions, &o).unwrap_err(),
        "not those of this screening",
    );
    // The same shapes and report, but factors changed after the screening.
    let mut changed = adapter.clone();
    changed.modules[0].b[0] += 1.0;
    refused(
        intruder_gate::clamp::clamp_solved(&changed, &report, &solutions, &o).unwrap_err(),
        "other factors",
    );
    // A dense-method screening keeps none.
    let dense = Gate::new(Config {
        cache_dir: None,
        method: intruder_gate::report::Method::Dense,
        backend: intruder_gate::backend::BackendChoice::Cpu,
        ..Config::default()
    })
    .unwrap();
    dense.attach_base(&base).unwrap();
    let (dense_report, none) = dense.screen_with_solutions(&adapter).unwrap();
    assert!(none.is_empty());
    refused(
        intruder_gate::clamp::clamp_solved(&adapter, &dense_report, &none, &o).unwrap_err(),
        "use clamp",
    );
}
