//! `intruder-gate demo`: a small deterministic synthetic base and three adapters (clean, with
//! planted intruders, malformed), screened end to end through the same path as `scan`.

use intruder_gate::error::Result;
use intruder_gate::policy::Screened as _;
use intruder_gate::tensor::DType;
use intruder_gate::{Config, Gate};
use intruder_gate_testkit::synth::{self, AdapterSpec, Rng, SynthModule};
use std::fmt::Write;
use std::path::Path;

const MODULES: [(&str, usize, usize); 3] = [
    ("model.layers.0.self_attn.q_proj", 256, 256),
    ("model.layers.0.self_attn.v_proj", 256, 256),
    ("model.layers.0.mlp.up_proj", 512, 256),
];

/// Writes the demo inputs under `dir`, screens them, and returns the printed summary.
pub fn run(dir: &Path) -> Result<String> {
    std::fs::create_dir_all(dir).map_err(|e| crate::Error::io(dir, e))?;
    let mut rng = Rng::new(2410_21228);
    let base_path = dir.join("base.safetensors");
    let tensors: Vec<_> = MODULES
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
    synth::write_base(&base_path, DType::F32, &tensors)?;

    // scale = 16 / 8 = 2; base σ₁ = 6, so planted directions of strength 5 land at σ ≈ 10+.
    let adapter = |planted: usize, strength: f64, rng: &mut Rng| -> Vec<SynthModule> {
        MODULES
            .iter()
            .enumerate()
            .map(|(i, &(m, out, inn))| {
                let p = if i == 1 { 0 } else { planted };
                let (a, b) = synth::lora_pair(rng, out, inn, 8, p, strength);
                SynthModule {
                    name: m.into(),
                    rank: 8,
                    a,
                    b,
                }
            })
            .collect()
    };
    let write = |name: &str, modules: &[SynthModule]| -> Result<std::path::PathBuf> {
        let path = dir.join(name);
        synth::write_adapter(
            &path,
            &AdapterSpec {
                r: 8,
                alpha: 16.0,
                use_rslora: false,
                dtype: DType::F32,
                modules,
                rank_pattern: &[],
                alpha_pattern: &[],
            },
        )?;
        Ok(path)
    };
    let clean = write("clean", &adapter(0, 0.05, &mut rng))?;
    let planted = write("planted", &adapter(2, 5.0, &mut rng))?;
    let mut bad = adapter(0, 0.05, &mut rng);
    bad[0].b[3] = f64::NAN;
    let malformed = write("malformed", &bad)?;

    let gate = Gate::new(Config {
        cache_dir: Some(dir.join("cache")),
        ..Config::default()
    })?;
    gate.attach_base(&base_path)?;
    let mut out = String::new();
    writeln!(
        out,
        "intruder-gate demo: synthetic base with 3 matrices (256x256, 256x256, 512x256)"
    )
    .ok();
    writeln!(out, "backend: {}\n", gate.backend_kind().label()).ok();
    for path in [&clean, &planted, &malformed] {
        let name = path.file_name().unwrap_or_default().to_string_lossy();
        match gate.screen_adapter_dir(path) {
            Ok(r) => {
                writeln!(
                    out,
                    "adapter `{name}`: verdict {}, {} intruder dimensions",
                    r.verdict.label(),
                    r.total_intruders
                )
                .ok();
                if let Some(e) = &r.error {
                    writeln!(out, "  malformed ({}): {}", e.kind, e.message).ok();
                }
                for m in &r.modules {
                    writeln!(
                        out,
                        "  {:<36} intruders {:?}  min max|cos| {:.3}  σ'₁ {:.2}",
                        m.module,
                        m.intruders,
                        m.min_max_cos(),
                        m.singular_values.first().copied().unwrap_or(0.0)
                    )
                    .ok();
                }
            }
            Err(e) => {
                writeln!(out, "adapter `{name}`: refused ({}): {e}", e.kind().label()).ok();
            }
        }
    }
    writeln!(out, "\nmetrics:\n{}", gate.metrics().render()).ok();
    Ok(out)
}
