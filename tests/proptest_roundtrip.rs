//! Property tests: what the writers write, the readers read back unchanged — the safetensors
//! writer against our reader and the reference `safetensors` crate, and a PEFT directory written
//! by `write_peft_dir` against `load_peft_dir` (ranks, alphas, scales and factors per module).

use intruder_gate::adapter::{load_peft_dir, write_peft_dir, Adapter, LoraModule};
use intruder_gate::limits::Limits;
use intruder_gate::safetensors_file::{self, SafetensorsFile};
use intruder_gate::tensor::DType;
use proptest::collection::{btree_map, vec};
use proptest::prelude::*;

fn dtype() -> impl Strategy<Value = DType> {
    prop_oneof![
        Just(DType::F32),
        Just(DType::F16),
        Just(DType::BF16),
        Just(DType::F64)
    ]
}

/// A tensor: any name but the reserved one, a shape of 0–3 dims (zero-sized ones included),
/// and raw bytes of exactly that size.
fn tensor() -> impl Strategy<Value = (String, DType, Vec<usize>, Vec<u8>)> {
    (
        "[a-zA-Z0-9_./ é-]{1,24}".prop_filter("reserved", |n| n != "__metadata__"),
        dtype(),
        vec(0usize..6, 0..=3),
    )
        .prop_flat_map(|(name, dtype, shape)| {
            let n = shape.iter().product::<usize>() * dtype.size();
            (Just(name), Just(dtype), Just(shape), vec(any::<u8>(), n))
        })
}

fn tensors() -> impl Strategy<Value = Vec<(String, DType, Vec<usize>, Vec<u8>)>> {
    vec(tensor(), 0..6).prop_map(|mut v| {
        let mut seen = std::collections::HashSet::new();
        v.retain(|t| seen.insert(t.0.clone()));
        v
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn safetensors_write_read_round_trip(
        tensors in tensors(),
        metadata in btree_map("[a-z_]{1,8}", "[ -~é]{0,16}", 0..4),
    ) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.safetensors");
        safetensors_file::write(&path, &tensors, &metadata).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        let header_len = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
        prop_assert_eq!((8 + header_len) % 8, 0, "data section not 8-byte aligned");

        let file = SafetensorsFile::open(&path, &Limits::default()).unwrap();
        let reference = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        prop_assert_eq!(file.metadata(), &metadata);
        prop_assert_eq!(file.names().count(), tensors.len());
        prop_assert_eq!(reference.len(), tensors.len());
        for (name, dtype, shape, data) in &tensors {
            let info = file.info(name).unwrap();
            prop_assert_eq!(info.dtype, Some(*dtype));
            prop_assert_eq!(&info.shape, shape);
            prop_assert_eq!(file.bytes(name).unwrap(), data.as_slice());
            let view = reference.tensor(name).unwrap();
            prop_assert_eq!(view.shape(), shape.as_slice());
            prop_assert_eq!(view.data(), data.as_slice());
        }
        // Nothing but the file itself is left in the directory (no temporary).
        prop_assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }
}

/// Values exactly representable in `dtype`, so the written file holds exactly them.
fn representable(dtype: DType, x: f32) -> f32 {
    match dtype {
        DType::F16 => half::f16::from_f32(x).to_f32(),
        DType::BF16 => half::bf16::from_f32(x).to_f32(),
        _ => x,
    }
}

/// Module names with shared dotted suffixes on purpose ("…q_proj" inside another name's
/// path), since the writer records per-module ranks as patterns that PEFT full-matches
/// against `(.*\.)?KEY`.
fn module_name() -> impl Strategy<Value = String> {
    (
        prop_oneof![Just(""), Just("model."), Just("x.model."), Just("encoder.")],
        0usize..3,
        prop_oneof![
            Just("q_proj"),
            Just("v_proj"),
            Just("mlp.up_proj"),
            Just("dense")
        ],
    )
        .prop_map(|(prefix, layer, leaf)| format!("{prefix}layers.{layer}.{leaf}"))
}

fn module() -> impl Strategy<Value = LoraModule> {
    (
        module_name(),
        dtype().prop_filter("adapters are f32/f16/bf16", |d| *d != DType::F64),
        1usize..5,
        1usize..7,
        1usize..7,
        1u32..64,
    )
        .prop_flat_map(|(name, dtype, rank, inn, out, alpha)| {
            let values = move |n| {
                vec(-4.0f32..4.0, n).prop_map(move |v| {
                    v.into_iter()
                        .map(|x| representable(dtype, x))
                        .collect::<Vec<_>>()
                })
            };
            (
                Just((name, dtype, rank, inn, out, alpha as f64 / 2.0)),
                values(rank * inn),
                values(out * rank),
            )
        })
        .prop_map(
            |((name, dtype, rank, in_features, out_features, alpha), a, b)| LoraModule {
                name,
                rank,
                in_features,
                out_features,
                a,
                b,
                alpha,
                scale: alpha / rank as f64,
                dtype,
                magnitude: None,
            },
        )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, ..ProptestConfig::default() })]

    #[test]
    fn peft_dir_write_load_round_trip(modules in vec(module(), 1..6)) {
        let mut modules = modules;
        modules.sort_by(|x, y| x.name.cmp(&y.name));
        modules.dedup_by(|x, y| x.name == y.name);
        let limits = Limits::default();
        let adapter = Adapter::from_modules("prop", modules.clone(), &limits).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("adapter");
        write_peft_dir(&out, &adapter, None, &serde_json::json!({"test": true})).unwrap();
        let loaded = load_peft_dir(&out, &limits).unwrap();
        prop_assert_eq!(loaded.modules.len(), modules.len());
        for (got, want) in loaded.modules.iter().zip(&modules) {
            prop_assert_eq!(&got.name, &want.name);
            prop_assert_eq!(got.rank, want.rank, "rank of {}", want.name);
            prop_assert_eq!(got.alpha, want.alpha, "alpha of {}", want.name);
            prop_assert!((got.scale - want.scale).abs() <= 1e-12 * want.scale, "scale of {}", want.name);
            prop_assert_eq!((got.in_features, got.out_features, got.dtype), (want.in_features, want.out_features, want.dtype));
            prop_assert_eq!(&got.a, &want.a);
            prop_assert_eq!(&got.b, &want.b);
        }
        // The staging directory is gone: only the adapter is left.
        let left: Vec<_> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
        prop_assert_eq!(left, vec![std::ffi::OsString::from("adapter")]);
    }
}
