//! The screening maths against independent references: the float64 numpy results shipped with the
//! MiniLM fixtures, and the in-tree dense f64 SVD of `W'` on planted synthetic adapters.

mod common;

use common::*;
use intruder_gate::backend::BackendChoice;
use intruder_gate::report::{Method, ModuleReport, Report};
use intruder_gate::tensor::DType;
use intruder_gate::{Config, Gate};
use serde_json::Value;
use std::collections::HashMap;

fn scan_json(
    base: &std::path::Path,
    adapter: &std::path::Path,
    method: &str,
    cache: &std::path::Path,
) -> Value {
    let out = cli()
        .args([
            "scan",
            "--format",
            "json",
            "--backend",
            "cpu",
            "--method",
            method,
        ])
        .arg("--base")
        .arg(base)
        .arg("--adapter")
        .arg(adapter)
        .arg("--cache-dir")
        .arg(cache)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "scan failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("scan prints one JSON object")
}

/// Acceptance: every fixture, both methods, module by module: the same intruder indices as the
/// reference and max|cos| within 1e-3, except within 0.02 of ε or in a flagged tie.
#[test]
fn minilm_scan_json_matches_float64_reference() {
    let base = minilm_base();
    let cache = tempfile::tempdir().unwrap();
    for fixture in FIXTURES {
        let reference: Value = serde_json::from_str(
            &std::fs::read_to_string(fixtures().join("reference").join(format!("{fixture}.json")))
                .unwrap(),
        )
        .unwrap();
        let refs: HashMap<&str, &Value> = reference["matrices"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| (m["name"].as_str().unwrap(), m))
            .collect();
        for method in ["brand", "dense"] {
            let report = scan_json(&base, &fixtures().join(fixture), method, cache.path());
            assert_eq!(report["schema_version"], 1);
            assert_eq!(report["method"], method);
            let modules = report["modules"].as_array().unwrap();
            assert_eq!(
                modules.len(),
                refs.len(),
                "{fixture}: every adapted matrix is screened"
            );
            let mut worst = 0.0f64;
            for m in modules {
                let name = m["base_tensor"].as_str().unwrap();
                let r = refs[name];
                let ref_cos: Vec<f64> = f64s(&r["left"]["max_abs_cos"]);
                let got_cos = f64s(&m["max_cos"]);
                let tied: Vec<u64> = m["tied"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|v| v.as_u64().unwrap())
                    .collect();
                let got_intr: Vec<u64> = m["intruders"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|v| v.as_u64().unwrap())
                    .collect();
                for (j, (&g, &w)) in got_cos.iter().zip(&ref_cos).enumerate() {
                    let fragile = tied.contains(&(j as u64)) || (w - 0.5).abs() <= 0.02;
                    if fragile {
                        continue;
                    }
                    worst = worst.max((g - w).abs());
                    assert!(
                        (g - w).abs() <= 1e-3,
                        "{fixture}/{method}/{name}[{j}]: {g} vs {w}"
                    );
                    assert_eq!(
                        got_intr.contains(&(j as u64)),
                        w < 0.5,
                        "{fixture}/{method}/{name}[{j}]"
                    );
                }
                let sv = f64s(&m["singular_values"]);
                for (g, w) in sv.iter().zip(f64s(&r["top_singular_values"])) {
                    assert!((g - w).abs() <= 1e-5 * w, "{fixture}/{name}: σ {g} vs {w}");
                }
            }
            let total = report["total_intruders"].as_u64().unwrap();
            assert_eq!(
                total,
                reference["totals"]["left"]["0.5"].as_u64().unwrap(),
                "{fixture}/{method} total at ε=0.5"
            );
            eprintln!("{fixture} {method}: worst |Δ max_cos| = {worst:.2e}");
        }
    }
}

fn f64s(v: &Value) -> Vec<f64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect()
}

fn screen(base: &std::path::Path, adapter: &std::path::Path, method: Method) -> Report {
    screen_on(BackendChoice::Cpu, base, adapter, method)
}

fn screen_on(
    backend: BackendChoice,
    base: &std::path::Path,
    adapter: &std::path::Path,
    method: Method,
) -> Report {
    let gate = Gate::new(Config {
        method,
        cache_dir: None,
        backend,
        ..Config::default()
    })
    .unwrap();
    gate.attach_base(base).unwrap();
    gate.screen_adapter_dir(adapter).unwrap()
}

/// Brand and dense agree module by module: σ to 1e-6 relative, max|cos| to 1e-4 outside ties,
/// and the same intruders outside the fragile band around ε.
fn assert_agree(label: &str, brand: &[ModuleReport], dense: &[ModuleReport]) {
    assert_eq!(brand.len(), dense.len());
    for (b, d) in brand.iter().zip(dense) {
        assert_eq!(b.base_tensor, d.base_tensor);
        // Small ranks run the iterative solve and it converges (no fallback); r = 64 on a
        // 120..200-wide module may choose the exact dense SVD of the small core up front.
        let allowed: &[&str] = if b.rank <= 16 {
            &["davidson"]
        } else {
            &["davidson", "dense-core"]
        };
        assert!(
            allowed.contains(&b.solver.label()),
            "{label}/{}: {}",
            b.module,
            b.solver.label()
        );
        for (j, (x, y)) in b.singular_values.iter().zip(&d.singular_values).enumerate() {
            assert!(
                (x - y).abs() <= 1e-6 * d.singular_values[0],
                "{label}/{}: σ{j} {x} vs {y}",
                b.module
            );
        }
        for j in 0..d.max_cos.len() {
            if d.tied.contains(&j) {
                continue;
            }
            let (x, y) = (b.max_cos[j], d.max_cos[j]);
            assert!(
                (x - y).abs() <= 1e-4,
                "{label}/{}: max_cos[{j}] {x} vs {y}",
                b.module
            );
            if (y - 0.5).abs() > 0.02 {
                assert_eq!(
                    b.intruders.contains(&j),
                    d.intruders.contains(&j),
                    "{label}/{}[{j}]",
                    b.module
                );
            }
        }
    }
}

#[test]
fn brand_matches_dense_on_planted_intruders_all_shapes_ranks_and_dtypes() {
    let shapes: [(&str, usize, usize); 3] = [
        ("model.layers.0.self_attn.q_proj", 160, 160),
        ("model.layers.0.mlp.up_proj", 200, 120),
        ("model.layers.0.mlp.down_proj", 120, 200),
    ];
    let mut seed = 1;
    for rank in [1, 4, 16, 64] {
        for (bd, ad) in [
            (DType::F32, DType::F32),
            (DType::F16, DType::BF16),
            (DType::BF16, DType::F16),
        ] {
            seed += 1;
            let dir = tempfile::tempdir().unwrap();
            let p = planted(
                dir.path(),
                &PlantedSpec {
                    shapes: &shapes,
                    rank,
                    planted: &[2],
                    base_dtype: bd,
                    adapter_dtype: ad,
                    use_rslora: false,
                    rank_pattern: &[],
                    alpha_pattern: &[],
                    seed,
                },
            );
            let label = format!("r={rank} base {bd:?} adapter {ad:?}");
            let brand = screen(&p.base, &p.adapter, Method::Brand);
            let dense = screen(&p.base, &p.adapter, Method::Dense);
            assert!(
                dense.total_intruders >= 3,
                "{label}: planted intruders are found ({})",
                dense.total_intruders
            );
            assert_agree(&label, &brand.modules, &dense.modules);
        }
    }
}

per_backend! {
fn rslora_and_rank_alpha_patterns_give_each_module_its_own_scale(backend) {
    let shapes: [(&str, usize, usize); 3] = [
        ("model.layers.0.self_attn.q_proj", 96, 96),
        ("model.layers.0.self_attn.v_proj", 96, 96),
        ("model.layers.0.mlp.up_proj", 128, 96),
    ];
    let dir = tempfile::tempdir().unwrap();
    let p = planted(
        dir.path(),
        &PlantedSpec {
            shapes: &shapes,
            rank: 8,
            planted: &[1],
            base_dtype: DType::F32,
            adapter_dtype: DType::F32,
            use_rslora: true,
            rank_pattern: &[("v_proj".into(), 4)],
            alpha_pattern: &[("up_proj".into(), 64.0)],
            seed: 77,
        },
    );
    let brand = screen_on(backend, &p.base, &p.adapter, Method::Brand);
    let dense = screen_on(backend, &p.base, &p.adapter, Method::Dense);
    let scale = |name: &str| {
        brand
            .modules
            .iter()
            .find(|m| m.module.ends_with(name))
            .unwrap()
    };
    // rsLoRA: alpha / sqrt(r), with r and alpha from the patterns.
    assert!((scale("q_proj").scale - 16.0 / 8f64.sqrt()).abs() < 1e-12);
    assert!((scale("v_proj").scale - 16.0 / 4f64.sqrt()).abs() < 1e-12);
    assert_eq!(scale("v_proj").rank, 4);
    assert!((scale("up_proj").scale - 64.0 / 8f64.sqrt()).abs() < 1e-12);
    assert_agree("rslora+patterns", &brand.modules, &dense.modules);
}
}

per_backend! {
fn a_clean_adapter_has_no_intruders(backend) {
    let dir = tempfile::tempdir().unwrap();
    let p = planted(
        dir.path(),
        &PlantedSpec::new(&[("layers.0.attn.q", 128, 128)], 8, &[0], 5),
    );
    let r = screen_on(backend, &p.base, &p.adapter, Method::Brand);
    assert_eq!(r.total_intruders, 0);
    assert_eq!(r.verdict, intruder_gate::Verdict::Accept);
    assert!(r.modules[0].max_cos.iter().all(|&c| c > 0.99));
}
}
