//! Property tests of the module → base tensor mapping (src/base/mapping.rs) on generated model
//! layouts: whatever the layer count and the prefixes the base and the adapter use, every
//! module lands on its own layer's tensor; a module of a missing layer, one that fits two base
//! tensors, and two modules on one tensor are errors that name them.

use intruder_gate::base::mapping::map_modules;
use intruder_gate::ErrorKind;
use proptest::prelude::*;
use proptest::sample::subsequence;

const LEAVES: [&str; 5] = [
    "self_attn.q_proj",
    "self_attn.v_proj",
    "mlp.up_proj",
    "mlp.down_proj",
    "attention.self.query",
];

/// A layout: base prefix, adapter prefix (PEFT strips `base_model.model.`; what is left may or
/// may not repeat the base's prefix), layer count, and the (layer, leaf) pairs adapted.
fn layout() -> impl Strategy<Value = (String, String, usize, Vec<(usize, usize)>)> {
    let prefixes = prop_oneof![
        Just(""),
        Just("model."),
        Just("bert.encoder."),
        Just("transformer.h.")
    ];
    (prefixes.clone(), prefixes, 1usize..48).prop_flat_map(|(bp, ap, layers)| {
        let all: Vec<(usize, usize)> = (0..layers)
            .flat_map(|l| (0..LEAVES.len()).map(move |k| (l, k)))
            .collect();
        let n = all.len();
        (
            Just(bp.to_string()),
            Just(ap.to_string()),
            Just(layers),
            subsequence(all, 1..=n.min(40)),
        )
    })
}

fn base_names(prefix: &str, layers: usize) -> Vec<String> {
    let mut names: Vec<String> = (0..layers)
        .flat_map(|l| {
            LEAVES
                .iter()
                .map(move |leaf| format!("{prefix}layers.{l}.{leaf}.weight"))
        })
        .collect();
    // Tensors no adapter touches, some sharing a leaf name with adapted ones.
    names.push(format!("{prefix}embed_tokens.weight"));
    names.push(format!("{prefix}norm.weight"));
    names.push("lm_head.weight".into());
    names.push(format!("{prefix}layers.0.input_layernorm.weight"));
    names
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn every_module_maps_to_its_own_tensor((bp, ap, layers, picked) in layout()) {
        let base = base_names(&bp, layers);
        let modules: Vec<String> = picked.iter().map(|&(l, k)| format!("{ap}layers.{l}.{}", LEAVES[k])).collect();
        let refs: Vec<&str> = modules.iter().map(String::as_str).collect();
        let mapped = map_modules(&refs, &base).unwrap();
        for (&(l, k), target) in picked.iter().zip(&mapped) {
            prop_assert_eq!(target, &format!("{bp}layers.{l}.{}.weight", LEAVES[k]));
        }
    }

    #[test]
    fn a_module_of_a_missing_layer_is_an_error((bp, ap, layers, picked) in layout(), extra in 0usize..4) {
        let base = base_names(&bp, layers);
        let missing = format!("{ap}layers.{}.{}", layers + extra, LEAVES[extra]);
        let mut modules: Vec<String> = picked.iter().map(|&(l, k)| format!("{ap}layers.{l}.{}", LEAVES[k])).collect();
        modules.push(missing.clone());
        let refs: Vec<&str> = modules.iter().map(String::as_str).collect();
        let err = map_modules(&refs, &base).unwrap_err();
        prop_assert_eq!(err.kind(), ErrorKind::BaseMismatch);
        let msg = err.to_string();
        prop_assert!(msg.contains(&missing), "error does not name {}: {}", missing, msg);
        prop_assert!(msg.contains("1 module(s) match no base tensor"), "{}", msg);
    }

    #[test]
    fn a_module_matching_two_tensors_is_ambiguous(layers in 1usize..24, layer in 0usize..24, k in 0usize..5) {
        let layer = layer % layers;
        // Two stacks (an encoder and a decoder) with the same layer names.
        let mut base = base_names("encoder.", layers);
        base.extend(base_names("decoder.", layers));
        let module = format!("layers.{layer}.{}", LEAVES[k]);
        let err = map_modules(&[module.as_str()], &base).unwrap_err();
        prop_assert_eq!(err.kind(), ErrorKind::BaseMismatch);
        let msg = err.to_string();
        for stack in ["encoder", "decoder"] {
            let candidate = format!("{stack}.layers.{layer}.{}.weight", LEAVES[k]);
            prop_assert!(msg.contains(&candidate), "error does not list {}: {}", candidate, msg);
        }
        // With the stack named, the same module is unambiguous.
        let named = format!("decoder.{module}");
        prop_assert_eq!(
            map_modules(&[named.as_str()], &base).unwrap(),
            vec![format!("decoder.{module}.weight")]
        );
    }

    #[test]
    fn two_modules_on_one_tensor_are_an_error((bp, _ap, layers, picked) in layout()) {
        let base = base_names(&bp, layers);
        let (l, k) = picked[0];
        // The same module spelt with and without a prefix both land on one tensor.
        let a = format!("layers.{l}.{}", LEAVES[k]);
        let b = format!("{bp}other.layers.{l}.{}", LEAVES[k]);
        let short = format!("{bp}layers.{l}.{}", LEAVES[k]);
        let modules: Vec<&str> = if bp.is_empty() { vec![a.as_str(), b.as_str()] } else { vec![a.as_str(), short.as_str()] };
        let result = map_modules(&modules, &base);
        // "other." is not in the base, so it can still only match by suffix: the same tensor.
        let err = result.unwrap_err();
        prop_assert_eq!(err.kind(), ErrorKind::BaseMismatch);
        prop_assert!(err.to_string().contains("several modules adapt the same base tensor"), "{}", err);
    }
}
