//! Synthetic bases with an LLM-like spectrum and adapters planting a chosen number of intruders.

use crate::synth::{self, AdapterSpec, Rng, SynthModule};
use intruder_gate::tensor::DType;
use std::path::{Path, PathBuf};

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
