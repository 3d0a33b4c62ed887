//! Loading a PEFT `save_pretrained` directory: `adapter_config.json` and
//! `adapter_model.safetensors`.

use super::{Adapter, AdapterConfig, LoraModule};
use crate::bail;
use crate::error::{Error, Result};
use crate::limits::Limits;
use crate::safetensors_file::SafetensorsFile;
use crate::tensor::TensorRef;
use regex::Regex;
use std::collections::BTreeMap;
use std::io::Read;
use std::path::Path;
use std::sync::LazyLock;

const CONFIG: &str = "adapter_config.json";
const WEIGHTS: &str = "adapter_model.safetensors";
const PICKLE: &str = "adapter_model.bin";
const PREFIX: &str = "base_model.model.";

pub fn load_peft_dir(dir: &Path, limits: &Limits) -> Result<Adapter> {
    let d = dir.display();
    let weights_path = dir.join(WEIGHTS);
    if !weights_path.is_file() {
        if dir.join(PICKLE).is_file() {
            bail!(
                Unsupported,
                "{d}: only {PICKLE} is present; pickle weights are refused: they can execute code on load; convert to safetensors"
            );
        }
        bail!(Io, "{d}: {WEIGHTS} is missing");
    }
    let config = read_config(&dir.join(CONFIG), limits)?;
    let file = SafetensorsFile::open(&weights_path, limits)?;
    let (pairs, not_screened) = lora_pairs(&file).map_err(|e| e.context(weights_path.display()))?;
    if config.use_dora {
        bail!(
            Unsupported,
            "{d}: DoRA adapters are not supported: {CONFIG} sets use_dora"
        );
    }
    let mut modules = Vec::with_capacity(pairs.len());
    for (module, (a_key, b_key)) in &pairs {
        let m = load_module(&file, module, a_key, b_key, &config, limits)
            .map_err(|e| e.context(weights_path.display()))?;
        modules.push(m);
    }
    let adapter = Adapter {
        name: dir
            .file_name()
            .map_or_else(|| d.to_string(), |n| n.to_string_lossy().into_owned()),
        path: Some(dir.to_path_buf()),
        fan_in_fan_out: config.fan_in_fan_out,
        config: Some(config),
        modules,
        not_screened,
    };
    adapter.validate(limits)
}

fn read_config(path: &Path, limits: &Limits) -> Result<AdapterConfig> {
    let p = path.display();
    let meta = std::fs::metadata(path).map_err(|e| Error::io(path, e))?;
    if meta.len() > limits.max_config_bytes {
        bail!(
            Limit,
            "{p}: {} bytes is over the limit of {} (max_config_bytes)",
            meta.len(),
            limits.max_config_bytes
        );
    }
    let mut text = String::new();
    std::fs::File::open(path)
        .map_err(|e| Error::io(path, e))?
        // The file may grow after the size check; never read more than the limit.
        .take(limits.max_config_bytes)
        .read_to_string(&mut text)
        .map_err(|e| Error::io(path, e))?;
    AdapterConfig::parse(&text).map_err(|e| e.context(p))
}

/// A PEFT module path and the keys of its lora_A and lora_B.
type Pairs = BTreeMap<String, (String, String)>;

/// Module path → (lora_A key, lora_B key), and the keys that are not LoRA A/B pairs (embedding
/// LoRA, `modules_to_save` copies, …): those are not screened, and the report says so.
/// Refuses DoRA and unpaired tensors.
fn lora_pairs(file: &SafetensorsFile) -> Result<(Pairs, Vec<String>)> {
    let mut halves: BTreeMap<String, [Option<String>; 2]> = BTreeMap::new();
    let mut others = Vec::new();
    for key in file.names() {
        let path = key.strip_prefix(PREFIX).unwrap_or(key);
        if let Some(i) = path.find(".lora_magnitude_vector") {
            bail!(
                Unsupported,
                "DoRA adapters are not supported: module {} has lora_magnitude_vector",
                &path[..i]
            );
        }
        let Some((module, side)) = split_lora_key(path) else {
            others.push(key.to_string());
            continue;
        };
        let slot = &mut halves.entry(module.to_string()).or_default()[side];
        if let Some(previous) = slot.replace(key.to_string()) {
            bail!(
                Format,
                "module {module} has two lora_{} tensors: {previous} and {key}",
                ["A", "B"][side]
            );
        }
    }
    let pairs = halves
        .into_iter()
        .map(|(module, [a, b])| match (a, b) {
            (Some(a), Some(b)) => Ok((module, (a, b))),
            (Some(a), None) => bail!(Format, "module {module}: {a} has no matching lora_B"),
            (None, Some(b)) => bail!(Format, "module {module}: {b} has no matching lora_A"),
            (None, None) => unreachable!("a module is recorded with at least one half"),
        })
        .collect::<Result<Pairs>>()?;
    Ok((pairs, others))
}

/// `M.lora_A.weight` or `M.lora_A.<adapter name>.weight` → (M, 0); the same for B → 1.
fn split_lora_key(path: &str) -> Option<(&str, usize)> {
    static KEY: LazyLock<Regex> = LazyLock::new(|| {
        Regex::new(r"^(.+)\.lora_([AB])(?:\.[^.]+)?\.weight$").expect("a valid regex")
    });
    let caps = KEY.captures(path)?;
    let side = usize::from(&caps[2] == "B");
    Some((caps.get(1)?.as_str(), side))
}

fn load_module(
    file: &SafetensorsFile,
    module: &str,
    a_key: &str,
    b_key: &str,
    config: &AdapterConfig,
    limits: &Limits,
) -> Result<LoraModule> {
    let a = tensor(file, a_key)?;
    let b = tensor(file, b_key)?;
    if a.rows != b.cols {
        bail!(
            Shape,
            "module {module}: {a_key} has rank {} (rows) but {b_key} has rank {} (columns)",
            a.rows,
            b.cols
        );
    }
    let rank = a.rows;
    if rank == 0 {
        bail!(Shape, "module {module}: rank 0 tensors");
    }
    let want = config.rank_for(module);
    if rank != want {
        bail!(
            Shape,
            "module {module}: tensors have rank {rank} but the config gives r = {want} (after rank_pattern)"
        );
    }
    if rank > limits.max_rank {
        bail!(
            Limit,
            "module {module}: rank {rank} is over the limit of {} (max_rank)",
            limits.max_rank
        );
    }
    for (key, t) in [(a_key, &a), (b_key, &b)] {
        if let Some((row, col)) = t.first_non_finite() {
            bail!(
                NonFinite,
                "{key} has a NaN or Inf at (row {row}, col {col})"
            );
        }
    }
    Ok(LoraModule {
        name: module.to_string(),
        rank,
        in_features: a.cols,
        out_features: b.rows,
        a: a.to_f32(),
        b: b.to_f32(),
        alpha: config.alpha_for(module),
        scale: config.scale_for(module),
        // Mixed A/B dtypes are legal; A's stands for the pair.
        dtype: a.dtype,
    })
}

/// A 2-D float tensor, with the errors phrased for adapter weights.
fn tensor<'a>(file: &'a SafetensorsFile, key: &str) -> Result<TensorRef<'a>> {
    let info = file.info(key).expect("key comes from this file");
    if info.dtype.is_none() {
        bail!(
            Unsupported,
            "{key} has dtype {}; LoRA weights must be F32, F16, BF16 or F64",
            info.dtype_name
        );
    }
    if info.shape.len() != 2 {
        bail!(
            Shape,
            "{key} has shape {:?}; LoRA weights must be 2-D",
            info.shape
        );
    }
    file.matrix(key)
}

#[cfg(test)]
mod tests {
    use super::split_lora_key;

    #[test]
    fn lora_keys_with_and_without_adapter_name() {
        assert_eq!(split_lora_key("enc.q.lora_A.weight"), Some(("enc.q", 0)));
        assert_eq!(
            split_lora_key("enc.q.lora_B.default.weight"),
            Some(("enc.q", 1))
        );
        assert_eq!(
            split_lora_key("enc.q.lora_A.lora_x.weight"),
            Some(("enc.q", 0))
        );
        assert_eq!(split_lora_key("enc.q.lora_A.a.b.weight"), None);
        assert_eq!(split_lora_key("enc.q.lora_embedding_A"), None);
        assert_eq!(split_lora_key("enc.q.weight"), None);
        assert_eq!(split_lora_key("lora_A.weight"), None);
    }
}
