#![cfg(feature = "cuda")]
//! The CUDA backend against the CPU backend, and test bodies shared by both (`per_backend!`). On
//! a machine without CUDA the CUDA side prints `skipped: no CUDA device (reason)` and passes —
//! fails instead under `IG_REQUIRE_CUDA=1` — and the no-GPU path itself is tested: `auto` falls
//! back to the CPU and says why, `cuda` is a clean error, and nothing panics.

mod common;

use common::*;
use intruder_gate::backend::cuda::CudaBackend;
use intruder_gate::backend::BackendChoice;
use intruder_gate::report::Report;
use intruder_gate::tensor::DType;
use intruder_gate::{Config, ErrorKind, Gate};
use std::path::Path;

fn screen(backend: BackendChoice, base: &Path, adapter: &Path) -> intruder_gate::Result<Report> {
    let gate = Gate::new(Config {
        backend,
        cache_dir: None,
        ..Config::default()
    })?;
    gate.attach_base(base)?;
    gate.screen_adapter_dir(adapter)
}

#[test]
fn without_a_gpu_auto_falls_back_and_cuda_is_a_clean_error() {
    let Err(why) = CudaBackend::probe(0, None) else {
        eprintln!("skipped: a CUDA device is present; the no-GPU path cannot be exercised here");
        return;
    };
    assert_eq!(why.kind(), ErrorKind::Cuda);
    let dir = tempfile::tempdir().unwrap();
    let p = planted(
        dir.path(),
        &PlantedSpec::new(&[("layers.0.attn.q", 64, 64)], 4, &[1], 3),
    );
    let auto = screen(BackendChoice::Auto, &p.base, &p.adapter).unwrap();
    assert_eq!(auto.backend.label(), "cpu");
    assert!(auto
        .backend_fallback
        .as_deref()
        .unwrap()
        .contains("CUDA unavailable"));
    let err = screen(BackendChoice::Cuda, &p.base, &p.adapter)
        .err()
        .unwrap();
    assert_eq!(err.kind(), ErrorKind::Cuda);
    let out = cli()
        .args(["scan", "--no-cache", "--backend", "cuda", "--base"])
        .arg(&p.base)
        .arg("--adapter")
        .arg(&p.adapter)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.starts_with("error: CUDA unavailable"), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}

/// Same verdicts, and max|cos| within 1e-3, outside ties and the fragile band around ε.
fn assert_same(label: &str, cpu: &Report, gpu: &Report) {
    assert_eq!(gpu.backend.label(), "cuda");
    let mut worst = 0.0f64;
    for (c, g) in cpu.modules.iter().zip(&gpu.modules) {
        for j in 0..c.max_cos.len() {
            if c.tied.contains(&j) || c.near_epsilon.contains(&j) {
                continue;
            }
            let d = (c.max_cos[j] - g.max_cos[j]).abs();
            worst = worst.max(d);
            assert!(
                d <= 1e-3,
                "{label}/{}[{j}]: cpu {} cuda {}",
                c.module,
                c.max_cos[j],
                g.max_cos[j]
            );
            assert_eq!(
                c.intruders.contains(&j),
                g.intruders.contains(&j),
                "{label}/{}[{j}]",
                c.module
            );
        }
    }
    eprintln!("{label}: cuda vs cpu worst |Δ max_cos| = {worst:.2e}");
}

#[test]
fn cuda_and_cpu_agree_on_minilm_and_planted_adapters() {
    if !cuda_device_or_skip() {
        return;
    }
    let base = minilm_base();
    for fixture in FIXTURES {
        let adapter = fixtures().join(fixture);
        if !adapter.exists() {
            eprintln!("skipped {fixture}: not present at {}", adapter.display());
            continue;
        }
        let cpu = screen(BackendChoice::Cpu, &base, &adapter).unwrap();
        let gpu = screen(BackendChoice::Cuda, &base, &adapter).unwrap();
        assert_same(fixture, &cpu, &gpu);
    }
    let dir = tempfile::tempdir().unwrap();
    let p = planted(
        dir.path(),
        &PlantedSpec {
            shapes: &[
                ("layers.0.attn.q", 256, 256),
                ("layers.0.mlp.up", 512, 256),
                ("layers.0.mlp.down", 256, 512),
            ],
            rank: 16,
            planted: &[2],
            base_dtype: DType::BF16,
            adapter_dtype: DType::F16,
            use_rslora: false,
            rank_pattern: &[],
            alpha_pattern: &[],
            seed: 11,
        },
    );
    let cpu = screen(BackendChoice::Cpu, &p.base, &p.adapter).unwrap();
    let gpu = screen(BackendChoice::Cuda, &p.base, &p.adapter).unwrap();
    assert!(cpu.total_intruders >= 4);
    assert_same("planted", &cpu, &gpu);
}

per_backend! {
/// Planted directions are found on every backend in every module (bf16 base, f16 adapter).
fn planted_intruders_are_found_in_every_module(backend) {
    let dir = tempfile::tempdir().unwrap();
    let shapes = [("layers.0.attn.q", 96, 96), ("layers.0.mlp.up", 160, 96)];
    let p = planted(
        dir.path(),
        &PlantedSpec {
            base_dtype: DType::BF16,
            adapter_dtype: DType::F16,
            ..PlantedSpec::new(&shapes, 8, &[2], 5)
        },
    );
    let report = screen(backend, &p.base, &p.adapter).unwrap();
    assert_eq!(report.modules.len(), 2);
    for m in &report.modules {
        assert!(m.intruders.len() >= 2, "{}: {:?}", m.module, m.max_cos);
    }
}
}
