//! The base model: one safetensors file, a directory holding `model.safetensors`, a sharded
//! directory with `model.safetensors.index.json`, or a directory of `*.safetensors` files.

pub mod mapping;

use crate::bail;
use crate::error::{Error, ErrorKind, Result};
use crate::limits::Limits;
use crate::safetensors_file::{read_text, SafetensorsFile};
use crate::tensor::TensorRef;
use serde::Deserialize;
use std::collections::BTreeMap;
use std::path::{Component, Path, PathBuf};

pub use mapping::map_modules;

const INDEX_FILE: &str = "model.safetensors.index.json";
const SINGLE_FILE: &str = "model.safetensors";
/// What marks a PEFT adapter directory, given where a model was expected.
const ADAPTER_CONFIG: &str = "adapter_config.json";
const ADAPTER_WEIGHTS: &str = "adapter_model.safetensors";

#[derive(Debug)]
pub struct BaseModel {
    path: PathBuf,
    files: Vec<SafetensorsFile>,
    /// Tensor name → index into `files`.
    owner: BTreeMap<String, usize>,
}

#[derive(Deserialize)]
struct Index {
    weight_map: BTreeMap<String, String>,
}

impl BaseModel {
    pub fn open(path: &Path, limits: &Limits) -> Result<Self> {
        let meta = std::fs::metadata(path).map_err(|e| Error::io(path, e))?;
        if !meta.is_dir() {
            return Self::from_files(path, vec![SafetensorsFile::open(path, limits)?]);
        }
        let index = path.join(INDEX_FILE);
        if index.is_file() {
            return Self::open_sharded(path, &index, limits);
        }
        let single = path.join(SINGLE_FILE);
        if single.is_file() {
            return Self::from_files(path, vec![SafetensorsFile::open(&single, limits)?]);
        }
        let mut shards = Vec::new();
        for entry in std::fs::read_dir(path).map_err(|e| Error::io(path, e))? {
            let p = entry.map_err(|e| Error::io(path, e))?.path();
            if p.extension().is_some_and(|x| x == "safetensors") && p.is_file() {
                shards.push(p);
            }
        }
        // An adapter directory holds one *.safetensors file too: say what it is instead of
        // screening the adapter against itself.
        let adapter_weights = path.join(ADAPTER_WEIGHTS);
        if path.join(ADAPTER_CONFIG).is_file() && shards.iter().all(|p| *p == adapter_weights) {
            bail!(
                Io,
                "{}: this looks like a PEFT adapter directory ({ADAPTER_CONFIG}), not a model: give it as the adapter, and the model it was trained on as the base",
                path.display()
            );
        }
        if shards.is_empty() {
            bail!(
                Io,
                "{}: no {INDEX_FILE}, {SINGLE_FILE} or *.safetensors file in this directory",
                path.display()
            );
        }
        shards.sort();
        let files = shards
            .iter()
            .map(|p| SafetensorsFile::open(p, limits))
            .collect::<Result<Vec<_>>>()?;
        Self::from_files(path, files)
    }

    /// Every tensor of every file; a name in two files is ambiguous, so an error.
    fn from_files(path: &Path, files: Vec<SafetensorsFile>) -> Result<Self> {
        let mut owner = BTreeMap::new();
        for (i, f) in files.iter().enumerate() {
            for name in f.names() {
                if let Some(j) = owner.insert(name.to_string(), i) {
                    bail!(
                        Format,
                        "{}: tensor {name} appears in both {} and {}",
                        path.display(),
                        files[j].path().display(),
                        f.path().display()
                    );
                }
            }
        }
        Ok(BaseModel {
            path: path.to_path_buf(),
            files,
            owner,
        })
    }

    fn open_sharded(dir: &Path, index_path: &Path, limits: &Limits) -> Result<Self> {
        let ip = index_path.display();
        // Index files are JSON headers in all but name; bound them the same way.
        let text = read_text(index_path, limits.max_header_bytes, "max_header_bytes")?;
        let index: Index = serde_json::from_str(&text).map_err(|e| {
            Error::new(
                ErrorKind::Format,
                format!("{ip}: not a safetensors index (JSON with a \"weight_map\" object): {e}"),
            )
            .with_source(e)
        })?;
        let mut shard_names: Vec<&str> = index.weight_map.values().map(String::as_str).collect();
        shard_names.sort_unstable();
        shard_names.dedup();
        let mut files = Vec::with_capacity(shard_names.len());
        for shard in &shard_names {
            // A shard is a file inside the model directory, never somewhere else on disk.
            let rel = Path::new(shard);
            if !rel.components().all(|c| matches!(c, Component::Normal(_))) {
                bail!(
                    Format,
                    "{ip}: shard path {shard:?} leaves the model directory"
                );
            }
            let p = dir.join(rel);
            if !p.is_file() {
                bail!(Io, "{ip}: shard {shard} is missing ({})", p.display());
            }
            files.push(SafetensorsFile::open(&p, limits)?);
        }
        let mut owner = BTreeMap::new();
        for (name, shard) in &index.weight_map {
            let i = shard_names
                .binary_search(&shard.as_str())
                .expect("collected above");
            if files[i].info(name).is_none() {
                bail!(
                    Format,
                    "{ip}: tensor {name} is listed in shard {shard} but absent from it"
                );
            }
            owner.insert(name.clone(), i);
        }
        Ok(BaseModel {
            path: dir.to_path_buf(),
            files,
            owner,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Names of all 2-D float tensors (f32/f16/bf16/f64), sorted. 1-D and non-float tensors
    /// are ignored.
    pub fn matrix_names(&self) -> Vec<String> {
        self.owner
            .keys()
            .filter(|n| self.shape(n).is_some())
            .cloned()
            .collect()
    }

    /// `(rows, cols)` of a 2-D float tensor; `None` for anything else.
    pub fn shape(&self, name: &str) -> Option<(usize, usize)> {
        let info = self.files[*self.owner.get(name)?].info(name)?;
        match (info.dtype, info.shape.as_slice()) {
            (Some(_), &[rows, cols]) => Some((rows, cols)),
            _ => None,
        }
    }

    /// The identity of the file that holds tensor `name`.
    pub fn identity_of(&self, name: &str) -> Option<crate::safetensors_file::FileIdentity> {
        self.files[*self.owner.get(name)?].identity()
    }

    /// See [`SafetensorsFile::release`].
    pub fn release(&self, name: &str) {
        if let Some(&i) = self.owner.get(name) {
            self.files[i].release(name);
        }
    }

    pub fn matrix(&self, name: &str) -> Result<TensorRef<'_>> {
        let Some(&i) = self.owner.get(name) else {
            bail!(
                BaseMismatch,
                "base model {} has no tensor named {name}",
                self.path.display()
            );
        };
        self.files[i].matrix(name)
    }
}
