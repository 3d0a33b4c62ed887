//! Shared pieces of the fuzz targets: a tiny synthetic base attached once per process, the
//! input layout of the end-to-end target, and the checks every successful report must pass.

use intruder_gate::limits::Limits;
use intruder_gate::tensor::DType;
use intruder_gate::{Config, Gate, Report};
use intruder_gate_testkit::synth::{self, AdapterSpec, Rng, SynthModule};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// The base of the end-to-end targets: the demo's module names (`intruder-gate demo`), at a
/// size where a screening costs well under a millisecond.
pub const BASE_MODULES: [(&str, usize, usize); 3] = [
    ("model.layers.0.self_attn.q_proj.weight", 16, 16),
    ("model.layers.0.self_attn.v_proj.weight", 16, 16),
    ("model.layers.0.mlp.up_proj.weight", 32, 16),
];

/// Limits far below the defaults, so no input can ask for more than a few MB or a long solve.
pub fn limits() -> Limits {
    Limits {
        max_file_bytes: 4 << 20,
        max_header_bytes: 64 << 10,
        max_config_bytes: 16 << 10,
        max_rank: 64,
        max_dim: 256,
        // The default: the range-safety limit is about the maths, not the input size.
        ..Limits::default()
    }
}

/// A directory of this process's own (fuzz jobs may run side by side).
pub fn scratch() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let root = if Path::new("/dev/shm").is_dir() {
            PathBuf::from("/dev/shm")
        } else {
            std::env::temp_dir()
        };
        let d = root.join(format!("intruder-gate-fuzz-{}", std::process::id()));
        std::fs::create_dir_all(&d).expect("create the fuzz scratch directory");
        d
    })
}

/// Row-major f64 matrices of the base: an LLM-like spectrum, deterministic.
pub fn base_matrices() -> Vec<(String, usize, usize, Vec<f64>)> {
    let mut rng = Rng::new(2410_21228);
    BASE_MODULES
        .iter()
        .map(|&(name, out, inn)| {
            let sigma = synth::llm_like_spectrum(out.min(inn), 2);
            let w = synth::matrix_with_spectrum(&mut rng, out, inn, &sigma);
            (name.to_string(), out, inn, w)
        })
        .collect()
}

/// The gate settings of the end-to-end targets: no disk cache (the memory cache keeps each base
/// spectrum after the first screening), one thread, low limits.
pub fn config() -> Config {
    Config {
        cache_dir: None,
        threads: 1,
        limits: limits(),
        ..Config::default()
    }
}

/// One gate per process with the synthetic base attached from a safetensors file.
pub fn gate() -> &'static Gate {
    static GATE: OnceLock<Gate> = OnceLock::new();
    GATE.get_or_init(|| {
        let path = scratch().join("base.safetensors");
        synth::write_base(&path, DType::F32, &base_matrices()).expect("write the fuzz base");
        let gate = Gate::new(config()).expect("fuzz gate");
        gate.attach_base(&path).expect("attach the fuzz base");
        gate
    })
}

/// A PEFT directory adapting every base module with rank-4 factors; `planted` strong directions
/// per module make intruders (0 gives a clean adapter).
pub fn write_seed_adapter(dir: &Path, planted: usize, dtype: DType, use_rslora: bool, seed: u64) {
    let mut rng = Rng::new(seed);
    let strength = if planted > 0 { 5.0 } else { 0.05 };
    let modules: Vec<SynthModule> = BASE_MODULES
        .iter()
        .map(|&(name, out, inn)| {
            let (a, b) = synth::lora_pair(&mut rng, out, inn, 4, planted, strength);
            SynthModule {
                name: name.trim_end_matches(".weight").to_string(),
                rank: 4,
                a,
                b,
            }
        })
        .collect();
    let spec = AdapterSpec {
        r: 4,
        alpha: 8.0,
        use_rslora,
        dtype,
        modules: &modules,
        rank_pattern: &[],
        alpha_pattern: &[],
    };
    synth::write_adapter(dir, &spec).expect("write a seed adapter");
}

/// A report with intruders in every module, from the synthetic base: what policies are
/// evaluated on.
pub fn sample_report() -> &'static Report {
    static REPORT: OnceLock<Report> = OnceLock::new();
    REPORT.get_or_init(|| {
        let dir = scratch().join("sample");
        write_seed_adapter(&dir, 1, DType::F32, false, 7);
        gate()
            .screen_adapter_dir(&dir)
            .expect("screen the sample adapter")
    })
}

/// Input of `adapter_dir`: a little-endian u16 length, that many bytes of
/// `adapter_config.json`, then `adapter_model.safetensors`.
pub fn split_adapter_input(data: &[u8]) -> Option<(&[u8], &[u8])> {
    let (len, rest) = data.split_first_chunk::<2>()?;
    let n = (u16::from_le_bytes(*len) as usize).min(rest.len());
    Some(rest.split_at(n))
}

/// The inverse of [`split_adapter_input`], for writing seeds.
pub fn join_adapter_input(config: &[u8], weights: &[u8]) -> Vec<u8> {
    let n = u16::try_from(config.len()).expect("a seed config under 64 KB");
    let mut v = n.to_le_bytes().to_vec();
    v.extend_from_slice(config);
    v.extend_from_slice(weights);
    v
}

/// What every report the gate returns must satisfy, whatever the input: numbers where numbers
/// are promised, the verdict's counts consistent with the modules, values in their ranges.
pub fn check_report(r: &Report) {
    let json = r.to_json();
    let v: serde_json::Value = serde_json::from_str(&json).expect("report JSON parses");
    if r.error.is_some() {
        assert!(
            r.modules.is_empty(),
            "an error report lists modules: {json}"
        );
        return;
    }
    assert!(!r.modules.is_empty(), "a report without error has modules");
    let mut total = 0;
    for (m, mv) in r
        .modules
        .iter()
        .zip(v["modules"].as_array().expect("modules array"))
    {
        for field in ["singular_values", "max_cos", "outside_base_span"] {
            let arr = mv[field].as_array().expect("array field");
            assert!(
                arr.iter().all(|x| x.as_f64().is_some()),
                "module {}: {field} has a non-number: {}",
                m.module,
                mv[field]
            );
        }
        assert!(
            m.scale.is_finite(),
            "module {}: scale {}",
            m.module,
            m.scale
        );
        assert_eq!(m.singular_values.len(), m.max_cos.len(), "{}", m.module);
        assert!(
            m.singular_values.windows(2).all(|w| w[0] >= w[1])
                && m.singular_values.iter().all(|&s| s >= 0.0),
            "module {}: singular values not non-negative and descending: {:?}",
            m.module,
            m.singular_values
        );
        assert!(
            m.max_cos.iter().all(|&c| (0.0..=1.0 + 1e-6).contains(&c)),
            "module {}: max|cos| outside [0, 1]: {:?}",
            m.module,
            m.max_cos
        );
        let eps = r.epsilon;
        let want: Vec<usize> = (0..m.max_cos.len())
            .filter(|&j| m.max_cos[j] < eps)
            .collect();
        assert_eq!(
            m.intruders, want,
            "module {}: intruders vs max|cos| < ε",
            m.module
        );
        total += m.intruders.len();
    }
    assert_eq!(r.total_intruders, total, "total_intruders");
    let with = r.modules.iter().filter(|m| !m.intruders.is_empty()).count();
    assert_eq!(r.modules_with_intruders, with, "modules_with_intruders");
}
