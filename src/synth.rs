//! Deterministic synthetic bases and adapters: for the demo, the tests and the benchmark.
//! Bases have a chosen spectrum (random orthonormal singular vectors); adapters can plant
//! intruders (random directions, nearly orthogonal to every base vector, with a singular value
//! above the base's top) or stay clean (small updates).

use crate::error::Result;
use crate::safetensors_file;
use crate::tensor::{encode, DType};
use faer::Mat;
use std::collections::BTreeMap;
use std::path::Path;

/// splitmix64 → uniform and normal samples; deterministic across platforms.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed ^ 0x5DEE_CE66_D1CE_4E5B)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
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
    std::fs::create_dir_all(dir).map_err(|e| crate::Error::io(dir, e))?;
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
        .map_err(|e| crate::Error::io(&path, e))?;
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
