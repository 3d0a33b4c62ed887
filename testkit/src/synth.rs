//! Deterministic synthetic bases and adapters: for the demo, the tests and the benchmark.
//! Bases have a chosen spectrum (random orthonormal singular vectors); adapters can plant
//! intruders (random directions, nearly orthogonal to every base vector, with a singular value
//! above the base's top) or stay clean (small updates).

use faer::Mat;
use intruder_gate::error::Result;
use intruder_gate::safetensors_file;
use intruder_gate::spectrum::rng::SplitMix64;
use intruder_gate::tensor::{encode, DType};
use std::collections::BTreeMap;
use std::path::Path;

/// splitmix64 → uniform and normal samples; deterministic across platforms.
pub struct Rng(SplitMix64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(SplitMix64::new(seed ^ 0x5DEE_CE66_D1CE_4E5B))
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0.next_u64()
    }
    /// Uniform in (0, 1).
    pub fn uniform(&mut self) -> f64 {
        ((self.next_u64() >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    }
    pub fn normal(&mut self) -> f64 {
        let (u1, u2) = (self.uniform(), self.uniform());
        (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
    }
    pub fn gaussian(&mut self, rows: usize, cols: usize) -> Mat<f64> {
        Mat::from_fn(rows, cols, |_, _| self.normal())
    }
}

/// `n × k` with orthonormal columns (QR of a Gaussian matrix).
pub fn orthonormal(rng: &mut Rng, n: usize, k: usize) -> Mat<f64> {
    rng.gaussian(n, k).qr().compute_thin_Q()
}

/// A power-law bulk with a few outliers: σ_i = 1/(1+i)^0.5 scaled, the first `outliers` ×3.
/// This is the shape of trained LLM weight spectra (a heavy top, a slowly decaying bulk).
pub fn llm_like_spectrum(rho: usize, outliers: usize) -> Vec<f64> {
    (0..rho)
        .map(|i| {
            let s = 2.0 / (1.0 + i as f64).powf(0.5);
            if i < outliers {
                s * 3.0 / (1.0 + i as f64 * 0.1)
            } else {
                s
            }
        })
        .collect()
}

/// `U diag(σ) Vᵀ`, rows×cols row-major f64, with random orthonormal U, V.
pub fn matrix_with_spectrum(rng: &mut Rng, rows: usize, cols: usize, sigma: &[f64]) -> Vec<f64> {
    let rho = rows.min(cols);
    let u = orthonormal(rng, rows, rho);
    let v = orthonormal(rng, cols, rho);
    let us = Mat::from_fn(rows, rho, |i, j| u[(i, j)] * sigma[j]);
    let w = us * v.transpose();
    (0..rows)
        .flat_map(|i| (0..cols).map(move |j| (i, j)))
        .map(|(i, j)| w[(i, j)])
        .collect()
}

/// A LoRA pair `(A r×in, B out×r)` row-major. `planted` columns of B are random unit directions
/// with magnitude `strength` (with unit-norm rows of A): each adds a singular value ≈ scale·strength
/// in a direction nearly orthogonal to every base vector. The rest are small (`1e-3·strength`).
pub fn lora_pair(
    rng: &mut Rng,
    out: usize,
    inn: usize,
    r: usize,
    planted: usize,
    strength: f64,
) -> (Vec<f64>, Vec<f64>) {
    let a_dirs = orthonormal(rng, inn, r);
    let b_dirs = orthonormal(rng, out, r);
    let a = (0..r)
        .flat_map(|i| (0..inn).map(move |j| (i, j)))
        .map(|(i, j)| a_dirs[(j, i)])
        .collect();
    let b = (0..out)
        .flat_map(|i| (0..r).map(move |j| (i, j)))
        .map(|(i, j)| {
            let m = if j < planted {
                strength * (1.0 + 0.37 * j as f64)
            } else {
                1e-3 * strength
            };
            b_dirs[(i, j)] * m
        })
        .collect();
    (a, b)
}

/// One LoRA module of a synthetic adapter (A r×in, B out×r, row-major).
pub struct SynthModule {
    /// Module path without `base_model.model.`.
    pub name: String,
    pub rank: usize,
    pub a: Vec<f64>,
    pub b: Vec<f64>,
}

/// A PEFT adapter directory: `adapter_config.json` + `adapter_model.safetensors`.
pub struct AdapterSpec<'a> {
    pub r: usize,
    pub alpha: f64,
    pub use_rslora: bool,
    pub dtype: DType,
    pub modules: &'a [SynthModule],
    pub rank_pattern: &'a [(String, usize)],
    pub alpha_pattern: &'a [(String, f64)],
}

pub fn write_adapter(dir: &Path, spec: &AdapterSpec<'_>) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| intruder_gate::Error::io(dir, e))?;
    let targets: Vec<&str> = spec
        .modules
        .iter()
        .map(|m| m.name.rsplit('.').next().unwrap_or(&m.name))
        .collect();
    let ranks: serde_json::Map<_, _> = spec
        .rank_pattern
        .iter()
        .map(|(k, v)| (k.clone(), (*v).into()))
        .collect();
    let alphas: serde_json::Map<_, _> = spec
        .alpha_pattern
        .iter()
        .map(|(k, v)| (k.clone(), (*v).into()))
        .collect();
    let config = serde_json::json!({
        "peft_type": "LORA",
        "r": spec.r,
        "lora_alpha": spec.alpha,
        "use_rslora": spec.use_rslora,
        "fan_in_fan_out": false,
        "use_dora": false,
        "target_modules": targets,
        "rank_pattern": ranks,
        "alpha_pattern": alphas,
        "base_model_name_or_path": "synthetic",
    });
    let path = dir.join("adapter_config.json");
    std::fs::write(&path, serde_json::to_string_pretty(&config).expect("json"))
        .map_err(|e| intruder_gate::Error::io(&path, e))?;
    let f32s = |v: &[f64]| v.iter().map(|&x| x as f32).collect::<Vec<f32>>();
    let mut tensors = Vec::new();
    for m in spec.modules {
        let (inn, out) = (m.a.len() / m.rank, m.b.len() / m.rank);
        let key = |ab: &str| format!("base_model.model.{}.lora_{ab}.weight", m.name);
        tensors.push((
            key("A"),
            spec.dtype,
            vec![m.rank, inn],
            encode(&f32s(&m.a), spec.dtype),
        ));
        tensors.push((
            key("B"),
            spec.dtype,
            vec![out, m.rank],
            encode(&f32s(&m.b), spec.dtype),
        ));
    }
    safetensors_file::write(
        &dir.join("adapter_model.safetensors"),
        &tensors,
        &BTreeMap::new(),
    )
}

/// Writes a base model safetensors file from named row-major f64 matrices, stored as `dtype`.
pub fn write_base(
    path: &Path,
    dtype: DType,
    tensors: &[(String, usize, usize, Vec<f64>)],
) -> Result<()> {
    let t: Vec<_> = tensors
        .iter()
        .map(|(n, r, c, v)| {
            let f: Vec<f32> = v.iter().map(|&x| x as f32).collect();
            (n.clone(), dtype, vec![*r, *c], encode(&f, dtype))
        })
        .collect();
    safetensors_file::write(path, &t, &BTreeMap::new())
}

/// The seven linear modules of one Llama-style decoder layer: (path, out, in).
pub fn llama_layer_modules(
    layer: usize,
    hidden: usize,
    intermediate: usize,
) -> Vec<(String, usize, usize)> {
    let attn = ["q_proj", "k_proj", "v_proj", "o_proj"].map(|m| {
        (
            format!("model.layers.{layer}.self_attn.{m}"),
            hidden,
            hidden,
        )
    });
    let mlp = [
        ("gate_proj", intermediate, hidden),
        ("up_proj", intermediate, hidden),
        ("down_proj", hidden, intermediate),
    ]
    .map(|(m, o, i)| (format!("model.layers.{layer}.mlp.{m}"), o, i));
    attn.into_iter().chain(mlp).collect()
}

/// A large weight-like matrix, cheap to generate (no SVD): a Gaussian bulk with decaying column
/// scales `(1+j)^-0.3` (a Marchenko–Pastur-like bulk bent into a slow power-law decay) plus four
/// rank-one outliers of strength 8, 6, 5, 4 × the bulk's top — the shape of trained LLM spectra.
/// Rows are generated in parallel from per-row seeds, so the result does not depend on threads.
pub fn llm_like_matrix(seed: u64, rows: usize, cols: usize) -> Vec<f32> {
    use rayon::prelude::*;
    let mut rng = Rng::new(seed);
    let unit = |rng: &mut Rng, n: usize| {
        let v: Vec<f64> = (0..n).map(|_| rng.normal()).collect();
        let norm = v.iter().map(|x| x * x).sum::<f64>().sqrt();
        v.into_iter().map(|x| x / norm).collect::<Vec<f64>>()
    };
    let bulk_top = 1.0 + (cols as f64 / rows as f64).sqrt();
    let outliers: Vec<(f64, Vec<f64>, Vec<f64>)> = [8.0, 6.0, 5.0, 4.0]
        .iter()
        .map(|&s| (s * bulk_top, unit(&mut rng, rows), unit(&mut rng, cols)))
        .collect();
    let col_scale: Vec<f64> = (0..cols)
        .map(|j| (1.0 + j as f64).powf(-0.3) * (cols as f64).powf(0.3) / 2.0)
        .collect();
    let inv_sqrt = 1.0 / (rows as f64).sqrt();
    let mut w = vec![0f32; rows * cols];
    w.par_chunks_mut(cols).enumerate().for_each(|(i, row)| {
        let mut r = Rng::new(seed ^ (i as u64).wrapping_mul(0xA24B_AED4_963E_E407));
        for (j, x) in row.iter_mut().enumerate() {
            let mut v = r.normal() * col_scale[j] * inv_sqrt;
            for (s, u, vv) in &outliers {
                v += s * u[i] * vv[j];
            }
            *x = v as f32;
        }
    });
    w
}

/// Writes a sharded Llama-shaped base (one shard per layer + `model.safetensors.index.json`).
pub fn write_llama_base(
    dir: &Path,
    layers: usize,
    hidden: usize,
    intermediate: usize,
    dtype: DType,
    seed: u64,
) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| intruder_gate::Error::io(dir, e))?;
    let mut weight_map = serde_json::Map::new();
    for layer in 0..layers {
        let shard = format!("model-{:05}-of-{layers:05}.safetensors", layer + 1);
        let tensors: Vec<_> = llama_layer_modules(layer, hidden, intermediate)
            .into_iter()
            .enumerate()
            .map(|(i, (m, out, inn))| {
                let w = llm_like_matrix(seed ^ ((layer * 7 + i) as u64 + 1) << 20, out, inn);
                let name = format!("{m}.weight");
                weight_map.insert(name.clone(), shard.clone().into());
                (name, dtype, vec![out, inn], encode(&w, dtype))
            })
            .collect();
        safetensors_file::write(&dir.join(&shard), &tensors, &BTreeMap::new())?;
    }
    let index = serde_json::json!({"metadata": {}, "weight_map": weight_map});
    let path = dir.join("model.safetensors.index.json");
    std::fs::write(&path, index.to_string()).map_err(|e| intruder_gate::Error::io(&path, e))
}

/// A LoRA adapter over the given Llama layers (all seven modules each), with `planted` intruder
/// directions in the q and down projections (strength set to land above the base's top σ).
pub fn write_llama_adapter(
    dir: &Path,
    layers: &[usize],
    hidden: usize,
    intermediate: usize,
    rank: usize,
    planted: usize,
    seed: u64,
) -> Result<()> {
    let mut rng = Rng::new(seed);
    let modules: Vec<SynthModule> = layers
        .iter()
        .flat_map(|&l| llama_layer_modules(l, hidden, intermediate))
        .map(|(name, out, inn)| {
            let p = if name.ends_with("q_proj") || name.ends_with("down_proj") {
                planted
            } else {
                0
            };
            let bulk_top = 1.0 + (inn as f64 / out as f64).sqrt();
            // scale = alpha / r = 2; 8·bulk_top is the strongest base outlier.
            let (a, b) = lora_pair(&mut rng, out, inn, rank, p.min(rank), 6.0 * bulk_top);
            SynthModule { name, rank, a, b }
        })
        .collect();
    write_adapter(
        dir,
        &AdapterSpec {
            r: rank,
            alpha: 2.0 * rank as f64,
            use_rslora: false,
            dtype: DType::BF16,
            modules: &modules,
            rank_pattern: &[],
            alpha_pattern: &[],
        },
    )
}
