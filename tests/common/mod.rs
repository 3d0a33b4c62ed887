//! Shared by the integration tests: the MiniLM fixtures and base, and a planted-intruder base.
#![allow(dead_code)] // each test crate uses a different part

use intruder_gate::synth::{self, AdapterSpec, Rng, SynthModule};
use intruder_gate::tensor::DType;
use std::path::{Path, PathBuf};

/// The real MiniLM adapters with their float64 reference results.
pub fn fixtures() -> PathBuf {
    let local = Path::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../shared/fixtures/minilm"
    ));
    if local.is_dir() {
        return local.to_path_buf();
    }
    std::env::var_os("INTRUDER_GATE_FIXTURES")
        .map(PathBuf::from)
        .expect("MiniLM fixtures: not next to the crate and INTRUDER_GATE_FIXTURES unset")
}

/// The MiniLM base model, downloaded (and hash-checked) by `scripts/fetch-minilm.sh` if missing.
pub fn minilm_base() -> PathBuf {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/fetch-minilm.sh");
    let out = std::process::Command::new("bash")
        .arg(script)
        .output()
        .expect("run fetch-minilm.sh");
    assert!(
        out.status.success(),
        "fetch-minilm.sh failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    PathBuf::from(String::from_utf8(out.stdout).unwrap().trim())
}

pub const PLANTED: [(&str, usize, usize); 3] = [
    ("model.layers.0.self_attn.q_proj", 96, 96),
    ("model.layers.0.self_attn.v_proj", 96, 128),
    ("model.layers.0.mlp.down_proj", 64, 160),
];

/// A synthetic base with an LLM-like spectrum and an adapter (r = 8, alpha 16, f32) planting
/// `planted[i]` intruders into module i. Returns (base file, adapter dir).
pub fn planted(dir: &Path, planted: [usize; 3], seed: u64) -> (PathBuf, PathBuf) {
    let mut rng = Rng::new(seed);
    let base = dir.join("base.safetensors");
    let tensors: Vec<_> = PLANTED
        .iter()
        .map(|&(m, out, inn)| {
            let sigma = synth::llm_like_spectrum(out.min(inn), 4);
            (
                format!("{m}.weight"),
                out,
                inn,
                synth::matrix_with_spectrum(&mut rng, out, inn, &sigma),
            )
        })
        .collect();
    synth::write_base(&base, DType::F32, &tensors).unwrap();
    let modules: Vec<SynthModule> = PLANTED
        .iter()
        .zip(planted)
        .map(|(&(m, out, inn), p)| {
            let (a, b) = synth::lora_pair(&mut rng, out, inn, 8, p, 5.0);
            SynthModule {
                name: m.into(),
                rank: 8,
                a,
                b,
            }
        })
        .collect();
    let adapter = dir.join("adapter");
    synth::write_adapter(
        &adapter,
        &AdapterSpec {
            r: 8,
            alpha: 16.0,
            use_rslora: false,
            dtype: DType::F32,
            modules: &modules,
            rank_pattern: &[],
            alpha_pattern: &[],
        },
    )
    .unwrap();
    (base, adapter)
}
