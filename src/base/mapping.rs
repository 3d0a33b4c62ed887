//! Which base tensor each adapter module adapts. Checkpoints disagree on prefixes
//! (`bert.`, `model.`, none), so names are matched by their longest shared dotted suffix.

use crate::bail;
use crate::error::Result;
use std::collections::HashMap;

/// Maps adapter module paths (already stripped of `base_model.model.`) to base tensor names:
/// candidate = module + ".weight"; match by the longest unambiguous dotted suffix: for L from
/// the candidate's component count down to 2, the base names equal to, or ending with "." + ,
/// the last L components; the first L with any match decides: one match → mapped, several →
/// ambiguous. The matched suffix must keep every numeric component (layer and expert indices), so
/// `layers.40.mlp.down_proj` never lands on layer 0 of a shallower base just because
/// `mlp.down_proj.weight` is unique there. Any unmatched or ambiguous module, and two modules that
/// land on one base tensor, is a BaseMismatch error that lists ALL of them (and for ambiguous
/// ones, the candidates). Zero modules is a BaseMismatch error ("adapter touches no base tensor").
pub fn map_modules(modules: &[&str], base_names: &[String]) -> Result<Vec<String>> {
    if modules.is_empty() {
        bail!(BaseMismatch, "adapter touches no base tensor");
    }
    // Every dotted suffix of every base name → the names that end with it.
    let mut by_suffix: HashMap<&str, Vec<&str>> = HashMap::new();
    for name in base_names {
        let mut suffix: &str = name;
        loop {
            by_suffix.entry(suffix).or_default().push(name);
            match suffix.find('.') {
                Some(i) => suffix = &suffix[i + 1..],
                None => break,
            }
        }
    }
    let mut mapped = Vec::with_capacity(modules.len());
    let mut unmatched = Vec::new();
    let mut ambiguous = Vec::new();
    for &module in modules {
        let candidate = format!("{module}.weight");
        let parts: Vec<&str> = candidate.split('.').collect();
        let shortest = parts
            .iter()
            .position(|p| p.bytes().all(|b| b.is_ascii_digit()))
            .map_or(2, |i| (parts.len() - i).max(2));
        let hit = (shortest..=parts.len())
            .rev()
            .find_map(|l| by_suffix.get(parts[parts.len() - l..].join(".").as_str()));
        match hit.map(Vec::as_slice) {
            Some([one]) => mapped.push(one.to_string()),
            Some(several) => {
                let mut several = several.to_vec();
                several.sort_unstable();
                ambiguous.push(format!("{module} (candidates: {})", several.join(", ")))
            }
            None => unmatched.push(module),
        }
    }
    let mut seen: HashMap<&str, &str> = HashMap::new();
    let mut shared = Vec::new();
    for (&module, target) in modules.iter().zip(&mapped) {
        if let Some(first) = seen.insert(target, module) {
            shared.push(format!("{first} and {module} -> {target}"));
        }
    }
    if unmatched.is_empty() && ambiguous.is_empty() && shared.is_empty() {
        return Ok(mapped);
    }
    let mut parts = Vec::new();
    if !shared.is_empty() {
        parts.push(format!(
            "several modules adapt the same base tensor: {}",
            shared.join("; ")
        ));
    }
    if !unmatched.is_empty() {
        parts.push(format!(
            "{} module(s) match no base tensor: {}",
            unmatched.len(),
            unmatched.join(", ")
        ));
    }
    if !ambiguous.is_empty() {
        parts.push(format!(
            "{} module(s) match several base tensors: {}",
            ambiguous.len(),
            ambiguous.join("; ")
        ));
    }
    bail!(
        BaseMismatch,
        "adapter does not fit the base model: {}",
        parts.join("; ")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn llama_prefixes_map_either_way() {
        let module = "model.layers.0.self_attn.q_proj";
        for base in [
            "layers.0.self_attn.q_proj.weight",
            "model.layers.0.self_attn.q_proj.weight",
        ] {
            assert_eq!(
                map_modules(
                    &[module],
                    &names(&[base, "layers.1.self_attn.q_proj.weight"])
                )
                .unwrap(),
                [base]
            );
        }
    }

    #[test]
    fn the_longest_suffix_decides_before_ambiguity() {
        // Both end in "q_proj.weight", but only one shares the full path.
        let base = names(&[
            "model.layers.0.self_attn.q_proj.weight",
            "layers.0.self_attn.q_proj.weight",
        ]);
        assert_eq!(
            map_modules(&["model.layers.0.self_attn.q_proj"], &base).unwrap(),
            [base[0].clone()]
        );
        let e = map_modules(&["layers.0.self_attn.q_proj"], &base).unwrap_err();
        assert!(e.message().contains("candidates"), "{e}");
    }

    #[test]
    fn layer_indices_must_match() {
        let base = names(&["model.layers.0.mlp.down_proj.weight"]);
        let e = map_modules(&["model.layers.40.mlp.down_proj"], &base).unwrap_err();
        assert!(e.message().contains("match no base tensor"), "{e}");
    }

    #[test]
    fn two_modules_on_one_tensor_are_refused() {
        let base = names(&["encoder.layer.0.attention.self.query.weight"]);
        let mods = [
            "bert.encoder.layer.0.attention.self.query",
            "encoder.layer.0.attention.self.query",
        ];
        let e = map_modules(&mods, &base).unwrap_err();
        assert!(e.message().contains("same base tensor"), "{e}");
    }

    #[test]
    fn components_are_whole_words() {
        // "layer.1.fc.weight" is a dotted suffix of itself only, not of "layer.11.fc.weight".
        let base = names(&["layer.11.fc.weight", "layer.1.fc.weight"]);
        assert_eq!(
            map_modules(&["x.layer.1.fc"], &base).unwrap(),
            ["layer.1.fc.weight"]
        );
    }
}
