//! Writing a PEFT `save_pretrained` directory that PEFT and vLLM load unchanged.

use super::{Adapter, LoraModule};
use crate::bail;
use crate::error::{Error, Result};
use crate::safetensors_file;
use crate::tensor::encode;
use std::collections::BTreeMap;
use std::path::Path;

/// Names the writer in the provenance written into the safetensors metadata.
pub const TOOL: &str = concat!("intruder-gate ", env!("CARGO_PKG_VERSION"));

const CONFIG: &str = "adapter_config.json";
const WEIGHTS: &str = "adapter_model.safetensors";

/// Writes `adapter_config.json` and `adapter_model.safetensors` (each module in its own dtype).
///
/// Atomic: everything is checked and encoded first, then both files are written into a hidden
/// directory beside `dir` and moved into place. A new `dir` appears whole, with one rename; in an
/// existing `dir` each file is replaced by a rename (other files there are left alone). A failure
/// leaves `dir` as it was and no staging directory behind.
///
/// Every module's scale must be `alpha / rank` (no rsLoRA). The top-level `r` / `lora_alpha` are
/// those of the highest-rank module, so a server's `max_lora_rank` check sees the true maximum;
/// modules that differ get exact-name `rank_pattern` / `alpha_pattern` entries (see
/// [`pattern_modules`]). The other fields
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
    let config = peft_config(adapter, source)?;
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
    let text = serde_json::to_string_pretty(&config).expect("a JSON map always serializes");

    if dir.file_name().is_none() {
        bail!(
            InvalidArgument,
            "{}: not a directory name to write an adapter to",
            dir.display()
        );
    }
    let parent = safetensors_file::parent_dir(dir);
    std::fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
    let stage = safetensors_file::temp_sibling(dir);
    std::fs::create_dir(&stage).map_err(|e| Error::io(&stage, e))?;
    let written = (|| {
        safetensors_file::write(&stage.join(WEIGHTS), &tensors, &metadata)?;
        let path = stage.join(CONFIG);
        std::fs::write(&path, text).map_err(|e| Error::io(&path, e))?;
        publish(&stage, dir)
    })();
    // Gone after a whole-directory rename; otherwise empty or holding the failed attempt.
    let _ = std::fs::remove_dir_all(&stage);
    safetensors_file::sync_dir(parent);
    written
}

/// The `adapter_config.json` to write: `source`'s (when given) with the LoRA fields of
/// `adapter` set (see [`write_peft_dir`]).
fn peft_config(
    adapter: &Adapter,
    source: Option<&Path>,
) -> Result<serde_json::Map<String, serde_json::Value>> {
    let Some(top) = adapter.modules.iter().max_by_key(|m| m.rank) else {
        bail!(
            InvalidArgument,
            "an adapter to write needs at least one module"
        );
    };
    let mut config = match source.map(|d| d.join(CONFIG)) {
        Some(p) if p.is_file() => {
            let max = crate::limits::Limits::default().max_config_bytes;
            let text = crate::safetensors_file::read_text(&p, max, "max_config_bytes")?;
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
    let keyed = pattern_modules(&adapter.modules, top);
    let pattern = |f: fn(&LoraModule) -> serde_json::Value| -> serde_json::Value {
        keyed
            .iter()
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
    Ok(config)
}

/// The modules that get `rank_pattern` / `alpha_pattern` keys, in the order they are written.
///
/// Those whose rank or alpha differ from the top level's; and, because PEFT's rule
/// `(.*\.)?(KEY)$` lets a key match every name that extends it after a dot and the first
/// matching key wins, every module whose name extends a key ("model.layers.0.q" for
/// "layers.0.q") gets its own key, written before the shorter one.
fn pattern_modules<'a>(modules: &'a [LoraModule], top: &LoraModule) -> Vec<&'a LoraModule> {
    let differs = |m: &LoraModule| m.rank != top.rank || m.alpha != top.alpha;
    let extends = |m: &LoraModule, k: &LoraModule| {
        m.name.len() > k.name.len()
            && m.name.ends_with(k.name.as_str())
            && m.name.as_bytes()[m.name.len() - k.name.len() - 1] == b'.'
    };
    let mut keyed: Vec<&LoraModule> = modules
        .iter()
        .filter(|m| differs(m) || modules.iter().any(|k| differs(k) && extends(m, k)))
        .collect();
    // A name is longer than every key it extends.
    keyed.sort_by_key(|m| std::cmp::Reverse(m.name.len()));
    keyed
}

/// Moves the staged files into `dir`: the whole directory when `dir` does not exist (or is
/// empty), else file by file.
fn publish(stage: &Path, dir: &Path) -> Result<()> {
    let whole = std::fs::rename(stage, dir);
    if whole.is_ok() {
        return Ok(());
    }
    if !dir.is_dir() {
        return whole.map_err(|e| Error::io(dir, e));
    }
    for name in [WEIGHTS, CONFIG] {
        let to = dir.join(name);
        std::fs::rename(stage.join(name), &to).map_err(|e| Error::io(&to, e))?;
    }
    safetensors_file::sync_dir(dir);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::limits::Limits;
    use crate::tensor::DType;
    use crate::ErrorKind;

    fn adapter() -> Adapter {
        let m = LoraModule {
            name: "layer.q".into(),
            rank: 1,
            in_features: 2,
            out_features: 3,
            a: vec![1.0, 2.0],
            b: vec![3.0, 4.0, 5.0],
            alpha: 2.0,
            scale: 2.0,
            dtype: DType::F32,
            magnitude: None,
        };
        Adapter::from_modules("t", vec![m], &Limits::default()).unwrap()
    }

    fn entries(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    #[test]
    fn writes_a_new_directory_or_replaces_the_files_of_an_existing_one() {
        let tmp = tempfile::tempdir().unwrap();
        let fresh = tmp.path().join("nested/new");
        write_peft_dir(&fresh, &adapter(), None, &serde_json::json!({})).unwrap();
        assert_eq!(entries(&fresh), [CONFIG, WEIGHTS]);

        let existing = tmp.path().join("existing");
        std::fs::create_dir(&existing).unwrap();
        std::fs::write(existing.join("README.md"), "kept").unwrap();
        std::fs::write(existing.join(CONFIG), "old").unwrap();
        write_peft_dir(&existing, &adapter(), None, &serde_json::json!({})).unwrap();
        assert_eq!(entries(&existing), ["README.md", CONFIG, WEIGHTS]);
        assert_ne!(
            std::fs::read_to_string(existing.join(CONFIG)).unwrap(),
            "old"
        );
        assert_eq!(
            entries(tmp.path()),
            ["existing", "nested"],
            "no staging left"
        );
    }

    #[test]
    fn a_failed_write_leaves_nothing_behind() {
        let tmp = tempfile::tempdir().unwrap();
        let file = tmp.path().join("a-file");
        std::fs::write(&file, "x").unwrap();
        let e = write_peft_dir(&file, &adapter(), None, &serde_json::json!({})).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Io, "{e}");
        assert!(e.message().contains("a-file"), "{e}");
        assert_eq!(std::fs::read_to_string(&file).unwrap(), "x");
        assert_eq!(entries(tmp.path()), ["a-file"], "no staging left");
        let e = write_peft_dir(
            &tmp.path().join(".."),
            &adapter(),
            None,
            &serde_json::json!({}),
        )
        .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidArgument, "{e}");
    }
}
