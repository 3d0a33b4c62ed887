//! Writes the committed seed corpus, fuzz/corpus/<target>/:
//!     cargo run --manifest-path fuzz/Cargo.toml --example seeds
//! Real inputs (the MiniLM fixtures), synthetic adapters for the fuzz base, and one input per
//! defect of issue 15 that the target can express (named `defect-*`).

use intruder_gate::tensor::DType;
use intruder_gate::Policy;
use intruder_gate_fuzz::{join_adapter_input, scratch, write_seed_adapter, BASE_MODULES};
use intruder_gate_testkit::synth::{self, AdapterSpec, Rng, SynthModule};
use std::path::{Path, PathBuf};

fn main() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let fixtures = root.join("../tests/fixtures/minilm");
    let corpus = root.join("corpus");
    let put = |target: &str, name: &str, bytes: &[u8]| {
        let dir = corpus.join(target);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(name), bytes).unwrap();
    };

    // Synthetic adapters on the fuzz base: clean, planted, other dtypes, rsLoRA.
    let synthetic: Vec<(&str, PathBuf)> = [
        ("clean-f32", 0, DType::F32, false),
        ("planted-f32", 2, DType::F32, false),
        ("planted-bf16", 1, DType::BF16, false),
        ("clean-f16-rslora", 0, DType::F16, true),
    ]
    .iter()
    .enumerate()
    .map(|(i, &(name, planted, dtype, rslora))| {
        let dir = scratch().join("seeds").join(name);
        write_seed_adapter(&dir, planted, dtype, rslora, 100 + i as u64);
        (name, dir)
    })
    .collect();
    let read = |p: PathBuf| std::fs::read(p).unwrap();
    let planted_weights = read(synthetic[1].1.join("adapter_model.safetensors"));

    // safetensors_header: real adapter files, the synthetic ones, a base, and malformed headers.
    for name in ["lora_r2", "lora_r16_qv"] {
        put(
            "safetensors_header",
            &format!("minilm-{name}"),
            &read(fixtures.join(name).join("adapter_model.safetensors")),
        );
    }
    for (name, dir) in &synthetic {
        put(
            "safetensors_header",
            name,
            &read(dir.join("adapter_model.safetensors")),
        );
    }
    let base = scratch().join("seeds/base.safetensors");
    synth::write_base(&base, DType::BF16, &intruder_gate_fuzz::base_matrices()).unwrap();
    put("safetensors_header", "base-bf16", &read(base));
    let raw = |header: &str, data: &[u8]| {
        let mut v = (header.len() as u64).to_le_bytes().to_vec();
        v.extend_from_slice(header.as_bytes());
        v.extend_from_slice(data);
        v
    };
    put(
        "safetensors_header",
        "metadata-and-i64",
        &raw(
            r#"{"__metadata__":{"format":"pt"},"a":{"dtype":"F32","shape":[2,2],"data_offsets":[0,16]},"n":{"dtype":"I64","shape":[1],"data_offsets":[16,24]}}"#,
            &[0; 24],
        ),
    );
    // Defect: a duplicate key in the header was accepted, the last one winning.
    put(
        "safetensors_header",
        "defect-duplicate-key",
        &raw(
            r#"{"a":{"dtype":"F32","shape":[1,2],"data_offsets":[0,8]},"a":{"dtype":"F32","shape":[2,1],"data_offsets":[0,8]}}"#,
            &[0; 8],
        ),
    );

    // adapter_config: the fixtures' configs, synthetic ones, and defect inputs.
    for name in ["lora_r2", "lora_r16_qv", "rslora_r16"] {
        put(
            "adapter_config",
            &format!("minilm-{name}"),
            &read(fixtures.join(name).join("adapter_config.json")),
        );
    }
    for (name, dir) in &synthetic {
        put(
            "adapter_config",
            name,
            &read(dir.join("adapter_config.json")),
        );
    }
    let patterns = r#"{"peft_type":"LORA","r":8,"lora_alpha":16,"rank_pattern":{"q_proj":4,"layers\\.0\\..*":2},"alpha_pattern":{"v_proj":32.5},"use_rslora":null,"target_modules":"all-linear"}"#;
    put("adapter_config", "patterns", patterns.as_bytes());
    // Defect: a finite lora_alpha whose products overflow f32.
    let huge_alpha =
        r#"{"peft_type":"LORA","r":4,"lora_alpha":1.8e308,"target_modules":["q_proj"]}"#;
    put("adapter_config", "defect-huge-alpha", huge_alpha.as_bytes());
    // Defect: pattern keys compiled as regexes on every lookup (10 keys keep the seed quick
    // before the fix; the issue's 50 cost 5 s).
    let keys: Vec<String> = (0..10)
        .map(|i| format!(r#""\\w{{50}}x{i}":{}"#, i + 1))
        .collect();
    let regex_dos = format!(
        r#"{{"peft_type":"LORA","r":4,"lora_alpha":8,"rank_pattern":{{{}}}}}"#,
        keys.join(",")
    );
    put(
        "adapter_config",
        "defect-pattern-regex-per-lookup",
        regex_dos.as_bytes(),
    );

    // policy: the default (README) and variants.
    put(
        "policy",
        "default",
        serde_json::to_string_pretty(&Policy::default())
            .unwrap()
            .as_bytes(),
    );
    put("policy", "reject-fail", br#"{"rules":[{"metric":"module_intruders","threshold":3,"action":"reject"},{"metric":"min_max_cos","threshold":0.1,"action":"clamp"}],"on_invalid":"fail"}"#);
    put("policy", "empty", br#"{"rules":[]}"#);
    put(
        "policy",
        "big-threshold",
        br#"{"rules":[{"metric":"total_intruders","threshold":1e308,"action":"warn"}]}"#,
    );

    // adapter_dir: each synthetic adapter, a fixture's config with synthetic weights, defects.
    for (name, dir) in &synthetic {
        let config = read(dir.join("adapter_config.json"));
        put(
            "adapter_dir",
            name,
            &join_adapter_input(&config, &read(dir.join("adapter_model.safetensors"))),
        );
    }
    put(
        "adapter_dir",
        "defect-huge-alpha",
        &join_adapter_input(huge_alpha.as_bytes(), &planted_weights),
    );
    put(
        "adapter_dir",
        "defect-pattern-regex-per-lookup",
        &join_adapter_input(regex_dos.as_bytes(), &planted_weights),
    );
    // Defect: declared sizes inside the limits but far larger than the base tensors.
    let big = scratch().join("seeds/bigger-than-base");
    let mut rng = Rng::new(5);
    let (a, b) = synth::lora_pair(&mut rng, 256, 64, 4, 0, 0.05);
    let module = SynthModule {
        name: BASE_MODULES[0].0.trim_end_matches(".weight").into(),
        rank: 4,
        a,
        b,
    };
    synth::write_adapter(
        &big,
        &AdapterSpec {
            r: 4,
            alpha: 8.0,
            use_rslora: false,
            dtype: DType::F32,
            modules: &[module],
            rank_pattern: &[],
            alpha_pattern: &[],
        },
    )
    .unwrap();
    put(
        "adapter_dir",
        "defect-bigger-than-base",
        &join_adapter_input(
            &read(big.join("adapter_config.json")),
            &read(big.join("adapter_model.safetensors")),
        ),
    );
    // A NaN in B (the demo's "malformed" adapter).
    let nan = scratch().join("seeds/nan");
    let mut rng = Rng::new(6);
    let (a, mut b) = synth::lora_pair(&mut rng, 16, 16, 4, 0, 0.05);
    b[3] = f64::NAN;
    let module = SynthModule {
        name: BASE_MODULES[1].0.trim_end_matches(".weight").into(),
        rank: 4,
        a,
        b,
    };
    synth::write_adapter(
        &nan,
        &AdapterSpec {
            r: 4,
            alpha: 8.0,
            use_rslora: false,
            dtype: DType::F32,
            modules: &[module],
            rank_pattern: &[],
            alpha_pattern: &[],
        },
    )
    .unwrap();
    put(
        "adapter_dir",
        "nan",
        &join_adapter_input(
            &read(nan.join("adapter_config.json")),
            &read(nan.join("adapter_model.safetensors")),
        ),
    );

    // ffi_screen: programs in the target's input layout (see fuzz_targets/ffi_screen.rs).
    for (name, program) in ffi_programs() {
        put("ffi_screen", name, &program);
    }
    let _ = std::fs::remove_dir_all(scratch());
}

/// One `ig_adapter_add_module` call in ffi_screen's layout.
struct Module {
    /// Selector: base module index + 64·(0: name.weight, 2: name without .weight, 3: raw name).
    sel: u8,
    raw_name: &'static str,
    dtype: u8,
    rank: u8,
    /// None: the base module's shape; Some((in, out)).
    shape: Option<(u8, u8)>,
    /// 0: 1.0, 1: 0.25, 2: 16.0, or raw f32 bits.
    scale: Result<u8, f32>,
    /// Magnitude index of A and B (1e-3, 0.1, 1, 10, 3e19), or raw bytes for B.
    a_mag: u8,
    b: Result<u8, &'static [u8]>,
    nulls: u8,
}

const fn good(i: u8, dtype: u8, b_mag: u8) -> Module {
    Module {
        sel: i,
        raw_name: "",
        dtype,
        rank: 4,
        shape: None,
        scale: Ok(0),
        a_mag: 2,
        b: Ok(b_mag),
        nulls: 0,
    }
}

fn encode(err_cap: u8, modules: &[Module], name: Option<&str>, clamp_opts: u8, pad: u8) -> Vec<u8> {
    let mut v = vec![err_cap, modules.len() as u8];
    let string = |v: &mut Vec<u8>, s: &str| {
        v.push(s.len() as u8);
        v.extend_from_slice(s.as_bytes());
    };
    for (i, m) in modules.iter().enumerate() {
        v.push(m.sel);
        if m.sel >> 6 == 3 {
            string(&mut v, m.raw_name);
        }
        v.extend([m.dtype, m.rank]);
        match m.shape {
            None => v.push(0),
            Some((inn, out)) => v.extend([1 | (inn << 1), out]),
        }
        match m.scale {
            Ok(s) => v.push(s),
            Err(x) => {
                v.push(3);
                v.extend(x.to_bits().to_le_bytes());
            }
        }
        v.push(m.a_mag << 1);
        v.extend((0x9e37_79b9_7f4a_7c15u64 + i as u64).to_le_bytes());
        match m.b {
            Ok(mag) => {
                v.push(mag << 1);
                v.extend((0x2545_f491_4f6c_dd1du64 + i as u64).to_le_bytes());
            }
            Err(raw) => {
                v.extend([1, raw.len() as u8]);
                v.extend_from_slice(raw);
            }
        }
        v.push(m.nulls);
    }
    match name {
        Some(n) => {
            v.push(1);
            string(&mut v, n);
        }
        None => v.push(0),
    }
    v.extend([clamp_opts, pad]);
    v
}

fn ffi_programs() -> Vec<(&'static str, Vec<u8>)> {
    // λ = 0.75 (index 2), target all, mode exact.
    let clamp = 2;
    let nan: &[u8] = &[0, 0, 0xc0, 0x7f];
    vec![
        (
            "clean-f32",
            encode(
                255,
                &[good(0, 0, 1), good(1, 0, 1), good(2, 0, 1)],
                None,
                clamp,
                0,
            ),
        ),
        (
            "planted-clamp-pad",
            encode(
                255,
                &[good(0, 0, 3), good(1, 0, 3), good(2, 0, 3)],
                Some("planted"),
                clamp,
                8,
            ),
        ),
        (
            "bf16-f16-rank-preserving",
            encode(255, &[good(0, 2, 3), good(1, 1, 2)], None, 2 | (1 << 5), 0),
        ),
        (
            "nan-in-b",
            encode(
                255,
                &[Module {
                    b: Err(nan),
                    ..good(0, 0, 0)
                }],
                None,
                0,
                0,
            ),
        ),
        (
            "wrong-shape",
            encode(
                255,
                &[Module {
                    shape: Some((20, 7)),
                    ..good(0, 0, 1)
                }],
                None,
                0,
                0,
            ),
        ),
        (
            "duplicate-module",
            encode(
                255,
                &[
                    good(0, 0, 1),
                    Module {
                        sel: 129,
                        ..good(0, 0, 1)
                    },
                ],
                None,
                0,
                0,
            ),
        ),
        (
            "nan-scale-rank-0",
            encode(
                255,
                &[
                    Module {
                        scale: Err(f32::NAN),
                        ..good(0, 0, 1)
                    },
                    Module {
                        rank: 0,
                        ..good(1, 0, 1)
                    },
                ],
                None,
                0,
                0,
            ),
        ),
        (
            "null-factor",
            encode(
                255,
                &[Module {
                    nulls: 1,
                    ..good(2, 0, 1)
                }],
                None,
                0,
                0,
            ),
        ),
        (
            "metrics-label-chars",
            encode(
                255,
                &[good(0, 0, 3)],
                Some("a\"b\\c\n{x=\"1\"} 2"),
                clamp,
                0,
            ),
        ),
        // Defect: ig_last_error truncated inside a multi-byte character. The message names the
        // unmatched module, all two-byte characters, so one of two caps splits one.
        (
            "defect-last-error-utf8-a",
            encode(
                41,
                &[Module {
                    sel: 192,
                    raw_name: "éééééééééééééééé",
                    ..good(0, 0, 1)
                }],
                None,
                0,
                0,
            ),
        ),
        (
            "defect-last-error-utf8-b",
            encode(
                42,
                &[Module {
                    sel: 192,
                    raw_name: "éééééééééééééééé",
                    ..good(0, 0, 1)
                }],
                None,
                0,
                0,
            ),
        ),
        // Defect: pad_rank_to above the rank limit (255 > the limit the library may set).
        (
            "defect-pad-rank",
            encode(255, &[good(0, 0, 3)], None, clamp, 255),
        ),
    ]
}
