//! Loading a PEFT `save_pretrained` directory: `adapter_config.json` and
//! `adapter_model.safetensors`.

use super::{map_in_pool, Adapter, AdapterConfig, LoraModule};
use crate::bail;
use crate::error::{Error, Result};
use crate::limits::Limits;
use crate::safetensors_file::{read_text, SafetensorsFile};
use crate::tensor::TensorRef;
use regex::Regex;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::LazyLock;

const CONFIG: &str = "adapter_config.json";
const WEIGHTS: &str = "adapter_model.safetensors";
const PICKLE: &str = "adapter_model.bin";
const PREFIX: &str = "base_model.model.";

impl PeftDir {
    /// Reads `adapter_config.json` and the weights' header, and checks every LoRA pair's dtype,
    /// shape and rank against each other, the config and `limits`.
    pub fn open(dir: &Path, limits: &Limits) -> Result<PeftDir> {
        let d = dir.display();
        match std::fs::metadata(dir) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                bail!(Io, "{d}: no such directory")
            }
            Err(e) => return Err(Error::io(dir, e)),
            Ok(m) if !m.is_dir() => bail!(
                Io,
                "{d}: expected a PEFT directory ({CONFIG} + {WEIGHTS}), got a file"
            ),
            Ok(_) => {}
        }
        let weights_path = dir.join(WEIGHTS);
        // `exists`, not `is_file`: a weights path that is there but not a regular file (a FIFO, a
        // directory) is refused by name when opened, not reported missing.
        if !weights_path.exists() {
            if dir.join(PICKLE).is_file() {
                bail!(
                Unsupported,
                "{d}: only {PICKLE} is present; pickle weights are refused: they can execute code on load; convert to safetensors"
            );
            }
            bail!(
                Io,
                "{d}: {WEIGHTS} is missing (a PEFT adapter directory holds {CONFIG} and {WEIGHTS})"
            );
        }
        let config = read_config(&dir.join(CONFIG), limits)?;
        let file = SafetensorsFile::open(&weights_path, limits)?;
        let (pairs, mut magnitudes, not_screened) =
            lora_pairs(&file).map_err(|e| e.context(weights_path.display()))?;
        // DoRA: `use_dora` and a magnitude vector per module go together; either alone is a file
        // PEFT itself would not load as written.
        if let Some((module, key)) = magnitudes.iter().find(|(m, _)| !pairs.contains_key(*m)) {
            bail!(
                Format,
                "{d}: {key} has no lora_A/lora_B pair for module {module}"
            );
        }
        if !config.use_dora {
            if let Some((module, _)) = magnitudes.iter().next() {
                bail!(
                    Format,
                    "{d}: module {module} has a lora_magnitude_vector (DoRA) but {CONFIG} does not set use_dora"
                );
            }
        } else if let Some(module) = pairs.keys().find(|m| !magnitudes.contains_key(*m)) {
            bail!(
                Format,
                "{d}: {CONFIG} sets use_dora (DoRA) but module {module} has no lora_magnitude_vector"
            );
        }
        let modules = pairs
            .into_iter()
            .map(|(name, (a_key, b_key))| {
                let magnitude_key = magnitudes.remove(&name);
                let mut m = module_shape(&file, name, a_key, b_key, &config, limits)?;
                if let Some(key) = magnitude_key {
                    magnitude_shape(&file, &key, m.out_features)?;
                    m.magnitude_key = Some(key);
                }
                Ok(m)
            })
            .map(|m: Result<ModuleShape>| m.map_err(|e| e.context(weights_path.display())))
            .collect::<Result<Vec<_>>>()?;
        Ok(PeftDir {
            dir: dir.to_path_buf(),
            config,
            file,
            modules,
            not_screened,
        })
    }
}

/// Loads a PEFT `save_pretrained` directory: [`PeftDir::open`], then [`PeftDir::load`].
pub fn load_peft_dir(dir: &Path, limits: &Limits) -> Result<Adapter> {
    PeftDir::open(dir, limits)?.load(limits)
}

/// A PEFT directory checked from its config and its safetensors header alone: names, dtypes,
/// shapes and ranks, with nothing of a declared size read yet. A caller compares the shapes with
/// its base before [`PeftDir::load`] reads the weights, so an adapter declaring tensors far
/// larger than the base (a sparse file of a few KB) is refused without being materialised.
pub struct PeftDir {
    dir: PathBuf,
    config: AdapterConfig,
    file: SafetensorsFile,
    modules: Vec<ModuleShape>,
    not_screened: Vec<String>,
}

/// One LoRA pair as its header declares it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModuleShape {
    /// Module path, `base_model.model.` stripped.
    pub name: String,
    pub rank: usize,
    pub in_features: usize,
    pub out_features: usize,
    a_key: String,
    b_key: String,
    /// DoRA: the key of the module's `lora_magnitude_vector`.
    magnitude_key: Option<String>,
}

impl PeftDir {
    /// The modules, sorted by name.
    pub fn modules(&self) -> &[ModuleShape] {
        &self.modules
    }

    pub fn config(&self) -> &AdapterConfig {
        &self.config
    }

    /// Reads the weights: finiteness, conversion to f32, and the checks of
    /// [`Adapter::from_modules`].
    pub fn load(self, limits: &Limits) -> Result<Adapter> {
        let d = self.dir.display();
        let weights_path = self.dir.join(WEIGHTS);
        // Module by module, in parallel on the gate's pool when it loads (`map_in_pool`): decoding
        // and checking the weights ran serially before the parallel screening. Every module is read
        // before an error is returned, so the error is the first in module order, as serially.
        let modules = map_in_pool(&self.modules, |m| load_module(&self.file, m, &self.config))
            .into_iter()
            .collect::<Result<Vec<_>>>()
            .map_err(|e| e.context(weights_path.display()))?;
        let adapter = Adapter {
            name: self
                .dir
                .file_name()
                .map_or_else(|| d.to_string(), |n| n.to_string_lossy().into_owned()),
            path: Some(self.dir.clone()),
            fan_in_fan_out: self.config.fan_in_fan_out,
            config: Some(self.config),
            modules,
            not_screened: self.not_screened,
        };
        adapter.validate(limits)
    }
}

fn read_config(path: &Path, limits: &Limits) -> Result<AdapterConfig> {
    let text = read_text(path, limits.max_config_bytes, "max_config_bytes")?;
    AdapterConfig::parse(&text).map_err(|e| e.context(path.display()))
}

/// A PEFT module path and the keys of its lora_A and lora_B.
type Pairs = BTreeMap<String, (String, String)>;

/// Module path → (lora_A key, lora_B key); module path → DoRA magnitude key; and the keys that
/// are neither (embedding LoRA, `modules_to_save` copies, …): those are not screened, and the
/// report says so. Refuses unpaired and repeated tensors.
fn lora_pairs(file: &SafetensorsFile) -> Result<(Pairs, BTreeMap<String, String>, Vec<String>)> {
    let mut halves: BTreeMap<String, [Option<String>; 2]> = BTreeMap::new();
    let mut magnitudes = BTreeMap::new();
    let mut others = Vec::new();
    for key in file.names() {
        let path = key.strip_prefix(PREFIX).unwrap_or(key);
        if let Some(module) = split_magnitude_key(path) {
            if let Some(previous) = magnitudes.insert(module.to_string(), key.to_string()) {
                bail!(
                    Format,
                    "module {module} has two lora_magnitude_vector tensors: {previous} and {key}"
                );
            }
            continue;
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
    Ok((pairs, magnitudes, others))
}

/// `M.lora_magnitude_vector` as PEFT saves it, or with `.weight` and/or an adapter name → M.
fn split_magnitude_key(path: &str) -> Option<&str> {
    static KEY: LazyLock<Regex> = LazyLock::new(|| {
        Regex::new(r"^(.+)\.lora_magnitude_vector(?:\.[^.]+)?(?:\.weight)?$")
            .expect("a valid regex")
    });
    Some(KEY.captures(path)?.get(1)?.as_str())
}

/// A DoRA magnitude vector's header: a float dtype, 1-D (or [out, 1] / [1, out]), `out` long.
fn magnitude_shape(file: &SafetensorsFile, key: &str, out: usize) -> Result<()> {
    let info = file.info(key).expect("key comes from this file");
    if info.dtype.is_none() {
        bail!(
            Unsupported,
            "{key} has dtype {}; DoRA magnitudes must be F32, F16, BF16 or F64",
            info.dtype_name
        );
    }
    let n: usize = info.shape.iter().product();
    if n != out || info.shape.iter().filter(|&&d| d != 1).count() > 1 {
        bail!(
            Shape,
            "{key} has shape {:?}; DoRA's magnitude vector must hold out_features = {out} values",
            info.shape
        );
    }
    Ok(())
}

/// A DoRA magnitude vector's values (header checked by [`magnitude_shape`]), finite.
fn magnitude(file: &SafetensorsFile, key: &str, out: usize) -> Result<Vec<f32>> {
    let dtype = file
        .info(key)
        .and_then(|i| i.dtype)
        .expect("checked when the directory was opened");
    let t = TensorRef::new(dtype, 1, out, file.bytes(key).unwrap_or_default())?;
    if let Some((_, col)) = t.first_non_finite() {
        bail!(NonFinite, "{key} has a NaN or Inf at index {col}");
    }
    Ok(t.to_f32())
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

/// Shapes and ranks of one pair, from the header.
fn module_shape(
    file: &SafetensorsFile,
    name: String,
    a_key: String,
    b_key: String,
    config: &AdapterConfig,
    limits: &Limits,
) -> Result<ModuleShape> {
    let module = &name;
    let [a_rows, a_cols] = matrix_shape(file, &a_key)?;
    let [b_rows, b_cols] = matrix_shape(file, &b_key)?;
    if a_rows != b_cols {
        bail!(
            Shape,
            "module {module}: {a_key} has rank {a_rows} (rows) but {b_key} has rank {b_cols} (columns)"
        );
    }
    let rank = a_rows;
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
    Ok(ModuleShape {
        name,
        rank,
        in_features: a_cols,
        out_features: b_rows,
        a_key,
        b_key,
        magnitude_key: None,
    })
}

fn load_module(
    file: &SafetensorsFile,
    m: &ModuleShape,
    config: &AdapterConfig,
) -> Result<LoraModule> {
    let a = file.matrix(&m.a_key)?;
    let b = file.matrix(&m.b_key)?;
    for (key, t) in [(&m.a_key, &a), (&m.b_key, &b)] {
        if let Some((row, col)) = t.first_non_finite() {
            bail!(
                NonFinite,
                "{key} has a NaN or Inf at (row {row}, col {col})"
            );
        }
    }
    Ok(LoraModule {
        name: m.name.clone(),
        rank: m.rank,
        in_features: m.in_features,
        out_features: m.out_features,
        a: a.to_f32(),
        b: b.to_f32(),
        alpha: config.alpha_for(&m.name),
        scale: config.scale_for(&m.name),
        // Mixed A/B dtypes are legal; A's stands for the pair.
        dtype: a.dtype,
        magnitude: m
            .magnitude_key
            .as_deref()
            .map(|key| magnitude(file, key, m.out_features))
            .transpose()?,
    })
}

/// `[rows, cols]` of a 2-D float tensor, from the header, with the errors phrased for adapter
/// weights.
fn matrix_shape(file: &SafetensorsFile, key: &str) -> Result<[usize; 2]> {
    let info = file.info(key).expect("key comes from this file");
    if info.dtype.is_none() {
        bail!(
            Unsupported,
            "{key} has dtype {}; LoRA weights must be F32, F16, BF16 or F64",
            info.dtype_name
        );
    }
    match *info.shape.as_slice() {
        [rows, cols] => Ok([rows, cols]),
        _ => bail!(
            Shape,
            "{key} has shape {:?}; LoRA weights must be 2-D",
            info.shape
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::{split_lora_key, split_magnitude_key};

    #[test]
    fn dora_magnitude_keys_as_peft_saves_them() {
        assert_eq!(
            split_magnitude_key("enc.q.lora_magnitude_vector"),
            Some("enc.q")
        );
        assert_eq!(
            split_magnitude_key("enc.q.lora_magnitude_vector.weight"),
            Some("enc.q")
        );
        assert_eq!(
            split_magnitude_key("enc.q.lora_magnitude_vector.default.weight"),
            Some("enc.q")
        );
        assert_eq!(split_magnitude_key("enc.q.lora_A.weight"), None);
        assert_eq!(split_magnitude_key("lora_magnitude_vector"), None);
    }

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
