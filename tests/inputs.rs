//! The input layer end to end: real PEFT adapters, and every malformed input refused with
//! the right kind and a message that says why.

mod common;

use common::fixtures;
use intruder_gate::adapter::{load_peft_dir, Adapter, AdapterConfig, LoraModule};
use intruder_gate::base::{map_modules, BaseModel};
use intruder_gate::limits::Limits;
use intruder_gate::safetensors_file::{write, SafetensorsFile};
use intruder_gate::tensor::{encode, DType};
use intruder_gate::{Error, ErrorKind};
use std::collections::BTreeMap;
use std::path::Path;

fn limits() -> Limits {
    Limits::default()
}

/// Asserts the error's kind and that its message contains every phrase.
#[track_caller]
fn assert_err<T: std::fmt::Debug>(r: Result<T, Error>, kind: ErrorKind, phrases: &[&str]) {
    let e = r.expect_err("expected an error");
    assert_eq!(e.kind(), kind, "wrong kind for: {e}");
    for p in phrases {
        assert!(e.message().contains(p), "{p:?} missing from: {e}");
    }
}

type Tensor = (String, DType, Vec<usize>, Vec<u8>);

fn t(name: &str, shape: &[usize], values: &[f32]) -> Tensor {
    (
        name.into(),
        DType::F32,
        shape.to_vec(),
        encode(values, DType::F32),
    )
}

fn ramp(n: usize) -> Vec<f32> {
    (0..n).map(|i| (i as f32 + 1.0) / n as f32).collect()
}

const LORA_CONFIG: &str = r#"{"peft_type": "LORA", "r": 2, "lora_alpha": 4}"#;

/// A PEFT directory with the given config and tensors.
fn peft_dir(config: &str, tensors: &[Tensor]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("adapter_config.json"), config).unwrap();
    write(
        &dir.path().join("adapter_model.safetensors"),
        tensors,
        &BTreeMap::new(),
    )
    .unwrap();
    dir
}

/// lora_A [r, in] and lora_B [out, r] for `module` under PEFT's prefix.
fn pair(module: &str, r: usize, inp: usize, out: usize) -> [Tensor; 2] {
    let key = format!("base_model.model.{module}");
    [
        t(&format!("{key}.lora_A.weight"), &[r, inp], &ramp(r * inp)),
        t(&format!("{key}.lora_B.weight"), &[out, r], &ramp(out * r)),
    ]
}

// ---- the real MiniLM adapters ----

#[test]
fn real_fixtures_load_with_their_scales() {
    for (dir, count, rank, scale) in [
        ("lora_r2", 36, 2, 2.0),
        ("lora_r16_qv", 12, 16, 2.0),
        ("rslora_r16", 36, 16, 4.0),
    ] {
        let a = load_peft_dir(&fixtures().join(dir), &limits()).unwrap();
        assert_eq!(a.name, dir);
        assert_eq!(a.modules.len(), count, "{dir}");
        assert!(!a.fan_in_fan_out);
        assert!(a.modules.windows(2).all(|w| w[0].name < w[1].name));
        for m in &a.modules {
            assert!(!m.name.starts_with("base_model."), "{}", m.name);
            assert_eq!(m.rank, rank);
            assert_eq!(m.dtype, DType::F32);
            assert!(
                (m.scale - scale).abs() < 1e-12,
                "{dir} {}: {}",
                m.name,
                m.scale
            );
            assert_eq!(m.a.len(), m.rank * m.in_features);
            assert_eq!(m.b.len(), m.out_features * m.rank);
            assert!(m.b.iter().any(|&v| v != 0.0), "trained B is not zero");
        }
    }
}

#[test]
fn real_fixtures_map_to_the_reference_base_names() {
    for dir in ["lora_r2", "lora_r16_qv", "rslora_r16"] {
        let text =
            std::fs::read_to_string(fixtures().join(format!("reference/{dir}.json"))).unwrap();
        let reference: serde_json::Value = serde_json::from_str(&text).unwrap();
        let expected: BTreeMap<String, String> = reference["matrices"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| {
                let module = m["module"].as_str().unwrap();
                let module = module.strip_prefix("base_model.model.").unwrap();
                (module.to_string(), m["name"].as_str().unwrap().to_string())
            })
            .collect();
        // All of MiniLM's matrices, not just the adapted ones.
        let mut base: Vec<String> = vec![
            "embeddings.word_embeddings.weight".into(),
            "pooler.dense.weight".into(),
        ];
        for l in 0..6 {
            for s in [
                "attention.self.query",
                "attention.self.key",
                "attention.self.value",
                "attention.output.dense",
                "intermediate.dense",
                "output.dense",
            ] {
                base.push(format!("encoder.layer.{l}.{s}.weight"));
            }
        }
        let a = load_peft_dir(&fixtures().join(dir), &limits()).unwrap();
        let modules: Vec<&str> = a.modules.iter().map(|m| m.name.as_str()).collect();
        let mapped = map_modules(&modules, &base).unwrap();
        for (m, b) in modules.iter().zip(&mapped) {
            assert_eq!(&expected[*m], b, "{dir}");
        }
        assert_eq!(mapped.len(), expected.len());
    }
}

// ---- safetensors files ----

#[test]
fn write_open_round_trip_in_every_float_dtype() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("x.safetensors");
    let values = [1.0f32, -2.5, 0.125, 3.0, 384.0, -0.0];
    let tensors: Vec<Tensor> = [DType::F32, DType::F16, DType::BF16, DType::F64]
        .into_iter()
        .map(|d| (format!("m_{d:?}"), d, vec![2, 3], encode(&values, d)))
        .chain([t("vec", &[3], &[1.0, 2.0, 3.0])])
        .collect();
    let meta = BTreeMap::from([("format".to_string(), "pt".to_string())]);
    write(&path, &tensors, &meta).unwrap();

    let raw = std::fs::read(&path).unwrap();
    let header_len = u64::from_le_bytes(raw[..8].try_into().unwrap());
    assert_eq!((8 + header_len) % 8, 0, "data section is 8-byte aligned");
    safetensors::SafeTensors::deserialize(&raw).expect("the reference parser agrees");

    let f = SafetensorsFile::open(&path, &limits()).unwrap();
    assert_eq!(f.metadata(), &meta);
    assert_eq!(f.names().count(), 5);
    for (name, dtype, _, bytes) in &tensors[..4] {
        let m = f.matrix(name).unwrap();
        assert_eq!((m.dtype, m.rows, m.cols), (*dtype, 2, 3));
        assert_eq!(m.bytes, bytes.as_slice());
        assert_eq!(m.to_f32(), values, "{dtype:?} holds these values exactly");
    }
    assert_eq!(f.info("vec").unwrap().shape, vec![3]);
    assert_err(f.matrix("vec"), ErrorKind::Shape, &["vec", "2-D"]);
    assert_err(
        f.matrix("nope"),
        ErrorKind::Format,
        &["no tensor named nope"],
    );
    assert!(!dir.path().read_dir().unwrap().any(|e| e
        .unwrap()
        .file_name()
        .to_string_lossy()
        .ends_with(".tmp")));
}

#[test]
fn write_refuses_a_buffer_of_the_wrong_size() {
    let dir = tempfile::tempdir().unwrap();
    let bad = ("x".to_string(), DType::F32, vec![2, 2], vec![0u8; 15]);
    assert_err(
        write(&dir.path().join("x.safetensors"), &[bad], &BTreeMap::new()),
        ErrorKind::InvalidArgument,
        &["x", "16"],
    );
}

#[test]
fn missing_safetensors_file_is_an_io_error_naming_it() {
    assert_err(
        SafetensorsFile::open(Path::new("/nonexistent/w.safetensors"), &limits()),
        ErrorKind::Io,
        &["/nonexistent/w.safetensors"],
    );
}

// ---- adapters: malformed inputs ----

/// `t` (one of `pair`'s tensors) with `value` at row-major index `at` instead of its ramp value.
fn poisoned(mut t: Tensor, at: usize, value: f32) -> Tensor {
    let mut vals = ramp(t.2.iter().product());
    vals[at] = value;
    t.3 = encode(&vals, DType::F32);
    t
}

#[test]
fn nan_in_b_is_refused_with_its_position() {
    let [a, b] = pair("layer.q", 2, 3, 4);
    // Row 2, col 1 of [4, 2].
    let dir = peft_dir(LORA_CONFIG, &[a, poisoned(b, 5, f32::NAN)]);
    assert_err(
        load_peft_dir(dir.path(), &limits()),
        ErrorKind::NonFinite,
        &["layer.q.lora_B.weight", "(row 2, col 1)"],
    );
}

#[test]
fn infinity_in_a_is_refused() {
    let [a, b] = pair("layer.q", 2, 3, 4);
    let dir = peft_dir(LORA_CONFIG, &[poisoned(a, 0, f32::INFINITY), b]);
    assert_err(
        load_peft_dir(dir.path(), &limits()),
        ErrorKind::NonFinite,
        &["lora_A", "(row 0, col 0)"],
    );
}

#[test]
fn a_load_on_a_pool_names_the_first_bad_module_in_module_order() {
    // `a.big` sorts first and is slow to check (its NaN is its last value); `b.small` has a NaN
    // at its first. On a pool of two, a load that returned whichever error came first in time
    // would name b.small.
    let [big_a, big_b] = pair("a.big", 2, 500_000, 4);
    let [small_a, small_b] = pair("b.small", 2, 3, 4);
    let dir = peft_dir(
        LORA_CONFIG,
        &[
            poisoned(big_a, 999_999, f32::NAN),
            big_b,
            poisoned(small_a, 0, f32::NAN),
            small_b,
        ],
    );
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(2)
        .build()
        .unwrap();
    for _ in 0..10 {
        assert_err(
            pool.install(|| load_peft_dir(dir.path(), &limits())),
            ErrorKind::NonFinite,
            &["a.big.lora_A.weight", "(row 1, col 499999)"],
        );
    }
    assert_err(
        load_peft_dir(dir.path(), &limits()),
        ErrorKind::NonFinite,
        &["a.big.lora_A.weight"],
    );
}

#[test]
fn a_without_b_and_b_without_a_are_refused() {
    let [a, b] = pair("layer.q", 2, 3, 4);
    let dir = peft_dir(LORA_CONFIG, &[a]);
    assert_err(
        load_peft_dir(dir.path(), &limits()),
        ErrorKind::Format,
        &["layer.q", "no matching lora_B"],
    );
    let dir = peft_dir(LORA_CONFIG, &[b]);
    assert_err(
        load_peft_dir(dir.path(), &limits()),
        ErrorKind::Format,
        &["layer.q", "no matching lora_A"],
    );
}

#[test]
fn rank_of_a_and_b_must_agree() {
    let [a, _] = pair("layer.q", 2, 3, 4);
    let b = t("base_model.model.layer.q.lora_B.weight", &[4, 3], &ramp(12));
    let dir = peft_dir(LORA_CONFIG, &[a, b]);
    assert_err(
        load_peft_dir(dir.path(), &limits()),
        ErrorKind::Shape,
        &["layer.q", "rank 2 (rows)", "rank 3 (columns)"],
    );
}

#[test]
fn tensor_rank_must_match_the_config_after_rank_pattern() {
    // r = 2 in the config, but the tensors are rank 4.
    let dir = peft_dir(LORA_CONFIG, &pair("layer.q", 4, 3, 4));
    assert_err(
        load_peft_dir(dir.path(), &limits()),
        ErrorKind::Shape,
        &["layer.q", "rank 4", "r = 2"],
    );

    // rank_pattern says 8 for q, the tensors say 2.
    let cfg = r#"{"r": 2, "lora_alpha": 4, "rank_pattern": {"q": 8}}"#;
    let mut tensors = pair("layer.q", 2, 3, 4).to_vec();
    tensors.extend(pair("layer.k", 2, 3, 4));
    let dir = peft_dir(cfg, &tensors);
    assert_err(
        load_peft_dir(dir.path(), &limits()),
        ErrorKind::Shape,
        &["layer.q", "r = 8", "rank_pattern"],
    );

    // And with the right ranks it loads, per-module r and scale.
    let mut tensors = pair("layer.q", 8, 3, 4).to_vec();
    tensors.extend(pair("layer.k", 2, 3, 4));
    let dir = peft_dir(cfg, &tensors);
    let a = load_peft_dir(dir.path(), &limits()).unwrap();
    let ranks: Vec<_> = a
        .modules
        .iter()
        .map(|m| (m.name.as_str(), m.rank, m.scale))
        .collect();
    assert_eq!(ranks, [("layer.k", 2, 2.0), ("layer.q", 8, 0.5)]);
}

#[test]
fn rank_over_the_limit_is_refused() {
    let cfg = r#"{"r": 4, "lora_alpha": 4}"#;
    let dir = peft_dir(cfg, &pair("layer.q", 4, 3, 4));
    let small = Limits {
        max_rank: 3,
        ..limits()
    };
    assert_err(
        load_peft_dir(dir.path(), &small),
        ErrorKind::Limit,
        &["rank 4", "max_rank"],
    );
}

#[test]
fn one_dimensional_lora_tensor_is_a_shape_error() {
    let a = t("base_model.model.layer.q.lora_A.weight", &[6], &ramp(6));
    let [_, b] = pair("layer.q", 2, 3, 4);
    let dir = peft_dir(LORA_CONFIG, &[a, b]);
    assert_err(
        load_peft_dir(dir.path(), &limits()),
        ErrorKind::Shape,
        &["lora_A.weight", "2-D"],
    );
}

#[test]
fn pickle_only_dir_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("adapter_config.json"), LORA_CONFIG).unwrap();
    std::fs::write(dir.path().join("adapter_model.bin"), b"\x80\x04pickle").unwrap();
    assert_err(
        load_peft_dir(dir.path(), &limits()),
        ErrorKind::Unsupported,
        &["pickle weights are refused", "convert to safetensors"],
    );
}

#[test]
fn missing_weights_or_config_are_io_errors() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("adapter_config.json"), LORA_CONFIG).unwrap();
    assert_err(
        load_peft_dir(dir.path(), &limits()),
        ErrorKind::Io,
        &["adapter_model.safetensors"],
    );

    let dir = peft_dir(LORA_CONFIG, &pair("layer.q", 2, 3, 4));
    std::fs::remove_file(dir.path().join("adapter_config.json")).unwrap();
    assert_err(
        load_peft_dir(dir.path(), &limits()),
        ErrorKind::Io,
        &["adapter_config.json"],
    );
}

#[test]
fn config_errors_are_format_errors() {
    for (cfg, phrase) in [
        ("{not json", "not valid JSON"),
        (r#"{"lora_alpha": 4}"#, "no rank \"r\""),
        (r#"{"r": 2}"#, "lora_alpha"),
        (
            r#"{"peft_type": "IA3", "r": 2, "lora_alpha": 4}"#,
            "peft_type \"IA3\"",
        ),
        (r#"{"r": 0, "lora_alpha": 4}"#, "r = 0"),
    ] {
        let dir = peft_dir(cfg, &pair("layer.q", 2, 3, 4));
        assert_err(
            load_peft_dir(dir.path(), &limits()),
            ErrorKind::Format,
            &[phrase, "adapter_config.json"],
        );
    }
}

#[test]
fn oversized_config_is_refused_before_reading() {
    let big = format!(
        r#"{{"r": 2, "lora_alpha": 4, "pad": "{}"}}"#,
        "x".repeat(2000)
    );
    let dir = peft_dir(&big, &pair("layer.q", 2, 3, 4));
    let small = Limits {
        max_config_bytes: 1000,
        ..limits()
    };
    assert_err(
        load_peft_dir(dir.path(), &small),
        ErrorKind::Limit,
        &["max_config_bytes"],
    );
}

#[test]
fn dora_loads_its_magnitudes_and_refuses_half_a_dora_adapter() {
    let dora_cfg = r#"{"r": 2, "lora_alpha": 4, "use_dora": true}"#;
    let mut tensors = pair("layer.q", 2, 3, 4).to_vec();
    tensors.push(t(
        "base_model.model.layer.q.lora_magnitude_vector",
        &[4],
        &ramp(4),
    ));
    let dir = peft_dir(dora_cfg, &tensors);
    let a = load_peft_dir(dir.path(), &limits()).unwrap();
    assert_eq!(a.modules[0].magnitude.as_deref(), Some(&ramp(4)[..]));
    // A magnitude vector without use_dora, use_dora without one, and one of the wrong length
    // (refused from the header, before the weights are read).
    let dir = peft_dir(LORA_CONFIG, &tensors);
    assert_err(
        load_peft_dir(dir.path(), &limits()),
        ErrorKind::Format,
        &[
            "module layer.q has a lora_magnitude_vector (DoRA)",
            "use_dora",
        ],
    );
    let dir = peft_dir(dora_cfg, &pair("layer.q", 2, 3, 4));
    assert_err(
        load_peft_dir(dir.path(), &limits()),
        ErrorKind::Format,
        &["use_dora (DoRA)", "layer.q has no lora_magnitude_vector"],
    );
    let mut short = pair("layer.q", 2, 3, 4).to_vec();
    short.push(t(
        "base_model.model.layer.q.lora_magnitude_vector",
        &[3],
        &ramp(3),
    ));
    let dir = peft_dir(dora_cfg, &short);
    assert_err(
        intruder_gate::adapter::PeftDir::open(dir.path(), &limits()).map(|_| ()),
        ErrorKind::Shape,
        &["lora_magnitude_vector", "out_features = 4"],
    );
}

#[test]
fn adapter_without_lora_tensors_touches_nothing() {
    let dir = peft_dir(
        LORA_CONFIG,
        &[t("base_model.model.classifier.weight", &[2, 2], &ramp(4))],
    );
    assert_err(
        load_peft_dir(dir.path(), &limits()),
        ErrorKind::BaseMismatch,
        &["no LoRA modules"],
    );
}

#[test]
fn non_float_lora_tensor_is_unsupported() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("adapter_config.json"), LORA_CONFIG).unwrap();
    // Built by hand: `write` only speaks float dtypes.
    let header = r#"{"base_model.model.q.lora_A.weight":{"dtype":"I32","shape":[2,1],"data_offsets":[0,8]},"base_model.model.q.lora_B.weight":{"dtype":"F32","shape":[1,2],"data_offsets":[8,16]}}"#;
    let mut raw = (header.len() as u64).to_le_bytes().to_vec();
    raw.extend_from_slice(header.as_bytes());
    raw.extend_from_slice(&[0u8; 16]);
    std::fs::write(dir.path().join("adapter_model.safetensors"), raw).unwrap();
    assert_err(
        load_peft_dir(dir.path(), &limits()),
        ErrorKind::Unsupported,
        &["q.lora_A.weight", "I32"],
    );
}

#[test]
fn named_adapter_keys_fan_in_fan_out_and_half_precision_load() {
    let a = (
        "base_model.model.h.0.attn.c_attn.lora_A.default.weight".to_string(),
        DType::BF16,
        vec![2, 3],
        encode(&ramp(6), DType::BF16),
    );
    let b = (
        "base_model.model.h.0.attn.c_attn.lora_B.default.weight".to_string(),
        DType::BF16,
        vec![5, 2],
        encode(&ramp(10), DType::BF16),
    );
    let cfg = r#"{"r": 2, "lora_alpha": 8, "fan_in_fan_out": true, "target_modules": ["c_attn"], "base_model_name_or_path": "gpt2"}"#;
    let dir = peft_dir(cfg, &[a, b]);
    let ad = load_peft_dir(dir.path(), &limits()).unwrap();
    assert!(ad.fan_in_fan_out);
    let m = &ad.modules[0];
    assert_eq!(
        (m.name.as_str(), m.rank, m.in_features, m.out_features),
        ("h.0.attn.c_attn", 2, 3, 5)
    );
    assert_eq!((m.dtype, m.alpha, m.scale), (DType::BF16, 8.0, 4.0));
    let config = ad.config.unwrap();
    assert_eq!(config.base_model_name_or_path.as_deref(), Some("gpt2"));
    assert_eq!(config.target_modules, Some(serde_json::json!(["c_attn"])));
}

// ---- adapters built in memory ----

fn module(name: &str, rank: usize) -> LoraModule {
    LoraModule {
        name: name.into(),
        rank,
        in_features: 3,
        out_features: 4,
        a: ramp(rank * 3),
        b: ramp(4 * rank),
        alpha: 2.0,
        scale: 1.0,
        dtype: DType::F32,
        magnitude: None,
    }
}

#[test]
fn from_modules_sorts_and_validates() {
    let a = Adapter::from_modules("host", vec![module("z", 2), module("a", 1)], &limits()).unwrap();
    let names: Vec<_> = a.modules.iter().map(|m| m.name.as_str()).collect();
    assert_eq!(names, ["a", "z"]);
    assert!(a.config.is_none() && a.path.is_none());

    assert_err(
        Adapter::from_modules("host", vec![], &limits()),
        ErrorKind::BaseMismatch,
        &["no LoRA modules"],
    );
    assert_err(
        Adapter::from_modules("host", vec![module("a", 0)], &limits()),
        ErrorKind::Shape,
        &["rank 0"],
    );
    assert_err(
        Adapter::from_modules("host", vec![module("a", 1), module("a", 1)], &limits()),
        ErrorKind::Format,
        &["more than once"],
    );
    let mut m = module("a", 2);
    m.b[7] = f32::NAN;
    assert_err(
        Adapter::from_modules("host", vec![m], &limits()),
        ErrorKind::NonFinite,
        &["lora_B", "(row 3, col 1)"],
    );
    let mut m = module("a", 2);
    m.a.pop();
    assert_err(
        Adapter::from_modules("host", vec![m], &limits()),
        ErrorKind::Shape,
        &["lora_A holds 5 values"],
    );
}

#[test]
fn config_patterns_first_match_wins() {
    let c = AdapterConfig::parse(
        r#"{"r": 8, "lora_alpha": 16, "rank_pattern": {"layer.0.*query": 4, "query": 2, "value": 32},
            "alpha_pattern": {"value": 8, "attention.self.value": 99}}"#,
    )
    .unwrap();
    assert_eq!(
        c.rank_pattern[0],
        ("layer.0.*query".to_string(), 4),
        "kept in file order"
    );
    assert_eq!(c.rank_for("encoder.layer.0.attention.self.query"), 4);
    assert_eq!(c.rank_for("encoder.layer.1.attention.self.query"), 2);
    assert_eq!(
        c.rank_for("encoder.layer.1.attention.self.subquery"),
        8,
        "query must not match subquery"
    );
    assert_eq!(c.rank_for("encoder.layer.1.attention.self.query.inner"), 8);
    assert_eq!(
        c.alpha_for("encoder.layer.1.attention.self.value"),
        8.0,
        "first key wins"
    );
    assert_eq!(
        c.scale_for("encoder.layer.1.attention.self.value"),
        8.0 / 32.0
    );
    assert_eq!(c.scale_for("x.key"), 2.0);
}

#[test]
fn rslora_scale_uses_the_square_root() {
    let c = AdapterConfig::parse(
        r#"{"r": 16, "lora_alpha": 16, "use_rslora": true, "rank_pattern": {"q": 4}}"#,
    )
    .unwrap();
    assert_eq!(c.scale_for("k"), 4.0);
    assert_eq!(c.scale_for("a.q"), 8.0);
}

// ---- base models and mapping ----

fn bert_base(prefix: &str) -> Vec<Tensor> {
    let mut v = Vec::new();
    for l in 0..2 {
        for s in ["query", "key"] {
            v.push(t(
                &format!("{prefix}encoder.layer.{l}.attention.self.{s}.weight"),
                &[4, 3],
                &ramp(12),
            ));
            v.push(t(
                &format!("{prefix}encoder.layer.{l}.attention.self.{s}.bias"),
                &[4],
                &ramp(4),
            ));
        }
    }
    v
}

#[test]
fn base_single_file_and_dir_with_model_safetensors() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("model.safetensors");
    let mut tensors = bert_base("");
    tensors.push((
        "ids".into(),
        DType::F16,
        vec![2, 2],
        encode(&[0.0; 4], DType::F16),
    ));
    write(&path, &tensors, &BTreeMap::new()).unwrap();
    for p in [path.as_path(), dir.path()] {
        let base = BaseModel::open(p, &limits()).unwrap();
        assert_eq!(base.path(), p);
        assert_eq!(
            base.matrix_names().len(),
            5,
            "biases excluded, f16 matrix included"
        );
        assert_eq!(
            base.shape("encoder.layer.1.attention.self.key.weight"),
            Some((4, 3))
        );
        assert_eq!(base.shape("encoder.layer.1.attention.self.key.bias"), None);
        let m = base
            .matrix("encoder.layer.0.attention.self.query.weight")
            .unwrap();
        assert_eq!(m.to_f32(), ramp(12));
        assert_err(
            base.matrix("nope.weight"),
            ErrorKind::BaseMismatch,
            &["nope.weight"],
        );
    }
}

#[test]
fn sharded_base_with_index() {
    let dir = tempfile::tempdir().unwrap();
    let tensors = bert_base("");
    let (first, second) = tensors.split_at(4);
    write(
        &dir.path().join("model-00001-of-00002.safetensors"),
        first,
        &BTreeMap::new(),
    )
    .unwrap();
    write(
        &dir.path().join("model-00002-of-00002.safetensors"),
        second,
        &BTreeMap::new(),
    )
    .unwrap();
    let weight_map: BTreeMap<&str, &str> = first
        .iter()
        .map(|t| (t.0.as_str(), "model-00001-of-00002.safetensors"))
        .chain(
            second
                .iter()
                .map(|t| (t.0.as_str(), "model-00002-of-00002.safetensors")),
        )
        .collect();
    let index = serde_json::json!({"metadata": {"total_size": 1}, "weight_map": weight_map});
    let index_path = dir.path().join("model.safetensors.index.json");
    std::fs::write(&index_path, index.to_string()).unwrap();

    let base = BaseModel::open(dir.path(), &limits()).unwrap();
    assert_eq!(base.matrix_names().len(), 4);
    for name in base.matrix_names() {
        assert_eq!(base.matrix(&name).unwrap().to_f32(), ramp(12));
    }

    // A tensor listed in the index but absent from its shard.
    let mut bad = index.clone();
    bad["weight_map"]["ghost.weight"] = "model-00001-of-00002.safetensors".into();
    std::fs::write(&index_path, bad.to_string()).unwrap();
    assert_err(
        BaseModel::open(dir.path(), &limits()),
        ErrorKind::Format,
        &["ghost.weight", "absent"],
    );

    // A missing shard.
    let mut bad = index.clone();
    bad["weight_map"]["ghost.weight"] = "model-00003-of-00002.safetensors".into();
    std::fs::write(&index_path, bad.to_string()).unwrap();
    assert_err(
        BaseModel::open(dir.path(), &limits()),
        ErrorKind::Io,
        &["model-00003-of-00002.safetensors", "missing"],
    );

    // A shard outside the directory.
    let mut bad = index.clone();
    bad["weight_map"]["ghost.weight"] = "../elsewhere.safetensors".into();
    std::fs::write(&index_path, bad.to_string()).unwrap();
    assert_err(
        BaseModel::open(dir.path(), &limits()),
        ErrorKind::Format,
        &["leaves the model directory"],
    );

    std::fs::write(&index_path, "weights, probably").unwrap();
    assert_err(
        BaseModel::open(dir.path(), &limits()),
        ErrorKind::Format,
        &["model.safetensors.index.json", "weight_map"],
    );

    // Without an index the shards are still found.
    std::fs::remove_file(&index_path).unwrap();
    assert_eq!(
        BaseModel::open(dir.path(), &limits())
            .unwrap()
            .matrix_names()
            .len(),
        4
    );
}

#[test]
fn base_dir_without_weights_is_an_io_error() {
    let dir = tempfile::tempdir().unwrap();
    assert_err(
        BaseModel::open(dir.path(), &limits()),
        ErrorKind::Io,
        &["no model.safetensors.index.json"],
    );
}

#[test]
fn prefixes_differ_between_base_and_adapter() {
    for (base_prefix, module_prefix) in [("", "bert."), ("bert.", "")] {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("model.safetensors");
        write(&path, &bert_base(base_prefix), &BTreeMap::new()).unwrap();
        let base = BaseModel::open(&path, &limits()).unwrap();
        let module = format!("{module_prefix}encoder.layer.1.attention.self.query");
        let mapped = map_modules(&[module.as_str()], &base.matrix_names()).unwrap();
        assert_eq!(
            mapped,
            [format!(
                "{base_prefix}encoder.layer.1.attention.self.query.weight"
            )]
        );
    }
}

#[test]
fn unmatched_and_ambiguous_modules_are_all_listed() {
    let mut base: Vec<String> = bert_base("").into_iter().map(|t| t.0).collect();
    base.push("other.attention.self.value.weight".into());
    base.push("more.attention.self.value.weight".into());
    let e = map_modules(
        &[
            "encoder.layer.0.attention.self.query",
            "foo.gate",
            "attention.self.value",
            "foo.up",
        ],
        &base,
    )
    .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::BaseMismatch);
    for p in [
        "2 module(s) match no base tensor: foo.gate, foo.up",
        "attention.self.value (candidates: more.attention.self.value.weight, other.attention.self.value.weight)",
    ] {
        assert!(e.message().contains(p), "{p:?} missing from: {e}");
    }
    assert_err(
        map_modules(&[], &base),
        ErrorKind::BaseMismatch,
        &["adapter touches no base tensor"],
    );
}
