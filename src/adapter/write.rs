//! Writing a PEFT `save_pretrained` directory that PEFT and vLLM load unchanged.

use super::{Adapter, LoraModule};
use crate::bail;
use crate::error::{Error, Result};
use crate::safetensors_file;
use crate::tensor::encode;
use std::collections::BTreeMap;
use std::path::Path;

/// Writes `adapter_config.json` and `adapter_model.safetensors` (each module in its own dtype).
///
/// Every module's scale must be `alpha / rank` (no rsLoRA). The top-level `r` / `lora_alpha` are
/// those of the highest-rank module, so a server's `max_lora_rank` check sees the true maximum;
/// modules that differ get exact-name `rank_pattern` / `alpha_pattern` entries. The other fields
/// of `source`'s config (task type, target modules, base model, …) are kept. `provenance` goes
/// into the safetensors metadata, where no loader trips over it.
pub fn write_peft_dir(
    dir: &Path,
    adapter: &Adapter,
    source: Option<&Path>,
    provenance: &serde_json::Value,
) -> Result<()> {
    for m in &adapter.modules {
        if (m.scale - m.alpha / m.rank as f64).abs() > 1e-12 * m.scale.abs().max(1.0) {
            bail!(
                InvalidArgument,
                "module {}: scale {} is not alpha/rank = {}/{}; only plain-LoRA scales can be written",
                m.name,
                m.scale,
                m.alpha,
                m.rank
            );
        }
    }
    let Some(top) = adapter.modules.iter().max_by_key(|m| m.rank) else {
        bail!(
            InvalidArgument,
            "an adapter to write needs at least one module"
        );
    };
    let mut config = match source.map(|d| d.join("adapter_config.json")) {
        Some(p) if p.is_file() => {
            let text = std::fs::read_to_string(&p).map_err(|e| Error::io(&p, e))?;
            match serde_json::from_str(&text) {
                Ok(serde_json::Value::Object(o)) => o,
                _ => bail!(Format, "{}: not a JSON object", p.display()),
            }
        }
        _ => serde_json::Map::new(),
    };
    // Their tensors (a classifier head, say) are not LoRA pairs and are not carried over.
    if config
        .get("modules_to_save")
        .is_some_and(|v| !v.is_null() && v.as_array().is_none_or(|a| !a.is_empty()))
    {
        bail!(
            Unsupported,
            "the source adapter has modules_to_save; their tensors would be lost"
        );
    }
    let differs = |m: &&LoraModule| m.rank != top.rank || m.alpha != top.alpha;
    let pattern = |f: fn(&LoraModule) -> serde_json::Value| -> serde_json::Value {
        adapter
            .modules
            .iter()
            .filter(differs)
            .map(|m| (regex::escape(&m.name), f(m)))
            .collect::<serde_json::Map<_, _>>()
            .into()
    };
    let mut leaves: Vec<&str> = adapter
        .modules
        .iter()
        .map(|m| m.name.rsplit('.').next().unwrap_or(&m.name))
        .collect();
    leaves.sort_unstable();
    leaves.dedup();
    let fields = [
        ("peft_type", "LORA".into()),
        ("r", top.rank.into()),
        ("lora_alpha", top.alpha.into()),
        ("use_rslora", false.into()),
        ("use_dora", false.into()),
        ("fan_in_fan_out", adapter.fan_in_fan_out.into()),
        ("rank_pattern", pattern(|m| m.rank.into())),
        ("alpha_pattern", pattern(|m| m.alpha.into())),
    ];
    for (k, v) in fields {
        config.insert(k.into(), v);
    }
    config
        .entry("target_modules")
        .or_insert_with(|| leaves.into());
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let mut tensors = Vec::with_capacity(2 * adapter.modules.len());
    for m in &adapter.modules {
        let key = |ab: &str| format!("base_model.model.{}.lora_{ab}.weight", m.name);
        tensors.push((
            key("A"),
            m.dtype,
            vec![m.rank, m.in_features],
            encode(&m.a, m.dtype),
        ));
        tensors.push((
            key("B"),
            m.dtype,
            vec![m.out_features, m.rank],
            encode(&m.b, m.dtype),
        ));
    }
    let metadata = BTreeMap::from([
        ("format".to_string(), "pt".to_string()),
        ("intruder_gate".to_string(), provenance.to_string()),
    ]);
    safetensors_file::write(&dir.join("adapter_model.safetensors"), &tensors, &metadata)?;
    let path = dir.join("adapter_config.json");
    let text = serde_json::to_string_pretty(&config).expect("a JSON map always serializes");
    std::fs::write(&path, text).map_err(|e| Error::io(&path, e))
}
