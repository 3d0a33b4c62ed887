//! The base-spectrum cache: in memory (bounded, shared by all threads) → on disk (one safetensors
//! file per base tensor) → compute. Keyed by a fingerprint of the tensor's bytes, never its name.
//! Concurrent requests for one tensor compute it once (single flight).

use crate::backend::Spectrum;
use crate::error::{Error, Result};
use crate::limits::Limits;
use crate::safetensors_file::{self, SafetensorsFile};
use crate::tensor::{encode, DType, TensorRef};
use parking_lot::Mutex;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use xxhash_rust::xxh3::{xxh3_128, Xxh3};

/// Bumped whenever the file layout or the maths behind a cached spectrum changes.
pub const FORMAT_VERSION: u32 = 1;

/// Identity of a base tensor's contents.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Key {
    pub fingerprint: u128,
    pub dtype: DType,
    pub rows: usize,
    pub cols: usize,
}

impl Key {
    /// xxh3-128 of the raw bytes; dtype and shape are part of the key too. xxh3 is not a
    /// cryptographic hash: it guards against accidents (another base, a changed file), and
    /// hashes at memory speed, which matters when a 7B base is fingerprinted at load time.
    pub fn of(t: &TensorRef<'_>) -> Key {
        Key {
            fingerprint: xxh3_128(t.bytes),
            dtype: t.dtype,
            rows: t.rows,
            cols: t.cols,
        }
    }

    fn file_name(&self) -> String {
        format!(
            "{:032x}-{}x{}-{}.v{FORMAT_VERSION}.safetensors",
            self.fingerprint,
            self.rows,
            self.cols,
            self.dtype.safetensors_name().to_lowercase()
        )
    }

    fn metadata(&self) -> BTreeMap<String, String> {
        BTreeMap::from([
            ("format_version".into(), FORMAT_VERSION.to_string()),
            ("fingerprint".into(), format!("{:032x}", self.fingerprint)),
            ("dtype".into(), self.dtype.safetensors_name().into()),
            ("rows".into(), self.rows.to_string()),
            ("cols".into(), self.cols.to_string()),
        ])
    }
}

/// Precision of the singular vectors on disk. Σ is always f32.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CacheDType {
    /// Reproduces a float64 reference to ~5e-6 in max|cos| on MiniLM.
    #[default]
    F32,
    /// Half the size; ~4e-4 in max|cos|, worse as singular-value gaps shrink.
    F16,
}

/// Where a spectrum came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    MemoryHit,
    DiskHit,
    Computed,
    /// A cache file existed but was corrupt, truncated or mismatched: ignored and rebuilt.
    RebuiltCorrupt,
}

impl Source {
    /// Every source, in rendering order (the metrics index by discriminant).
    pub const ALL: [Source; 4] = [
        Source::MemoryHit,
        Source::DiskHit,
        Source::Computed,
        Source::RebuiltCorrupt,
    ];

    /// The report's `base_spectrum` value and the metrics' `result` label.
    pub fn label(self) -> &'static str {
        match self {
            Source::MemoryHit => "memory_hit",
            Source::DiskHit => "disk_hit",
            Source::Computed => "computed",
            Source::RebuiltCorrupt => "rebuilt_corrupt",
        }
    }
}

/// One computation in progress: waiters block on the lock and find the result inside.
type Flight = Mutex<Option<Arc<Spectrum>>>;

pub struct SpectrumCache {
    dir: Option<PathBuf>,
    disk_dtype: CacheDType,
    memory: Mutex<Lru>,
    in_flight: Mutex<HashMap<Key, Arc<Flight>>>,
    limits: Limits,
}

struct Lru {
    capacity_bytes: usize,
    used_bytes: usize,
    tick: u64,
    entries: HashMap<Key, (Arc<Spectrum>, u64)>,
}

impl Lru {
    fn get(&mut self, key: &Key) -> Option<Arc<Spectrum>> {
        self.tick += 1;
        let tick = self.tick;
        self.entries.get_mut(key).map(|(s, t)| {
            *t = tick;
            s.clone()
        })
    }

    fn insert(&mut self, key: Key, s: Arc<Spectrum>) {
        let size = s.bytes();
        if size > self.capacity_bytes || self.entries.contains_key(&key) {
            return;
        }
        while self.used_bytes + size > self.capacity_bytes {
            let oldest = *self
                .entries
                .iter()
                .min_by_key(|(_, (_, t))| *t)
                .expect("non-empty")
                .0;
            let (gone, _) = self.entries.remove(&oldest).expect("present");
            self.used_bytes -= gone.bytes();
        }
        self.tick += 1;
        self.used_bytes += size;
        self.entries.insert(key, (s, self.tick));
    }
}

impl SpectrumCache {
    pub fn new(
        dir: Option<PathBuf>,
        disk_dtype: CacheDType,
        memory_bytes: usize,
        limits: Limits,
    ) -> Self {
        SpectrumCache {
            dir,
            disk_dtype,
            memory: Mutex::new(Lru {
                capacity_bytes: memory_bytes,
                used_bytes: 0,
                tick: 0,
                entries: HashMap::new(),
            }),
            in_flight: Mutex::new(HashMap::new()),
            limits,
        }
    }

    pub fn dir(&self) -> Option<&Path> {
        self.dir.as_deref()
    }

    /// True when the spectrum is already in memory or in a valid-looking file on disk.
    pub fn contains(&self, key: &Key) -> bool {
        self.memory.lock().entries.contains_key(key)
            || self
                .dir
                .as_ref()
                .is_some_and(|d| d.join(key.file_name()).is_file())
    }

    /// The spectrum for `key`, from memory, disk, or `compute` (once, however many threads ask).
    /// A disk write failure is returned as a warning, not an error: the spectrum is still good.
    pub fn get_or_compute(
        &self,
        key: &Key,
        compute: impl FnOnce() -> Result<Spectrum>,
    ) -> Result<(Arc<Spectrum>, Source, Option<String>)> {
        if let Some(s) = self.memory.lock().get(key) {
            return Ok((s, Source::MemoryHit, None));
        }
        let slot = self.in_flight.lock().entry(*key).or_default().clone();
        let mut guard = slot.lock();
        if let Some(s) = guard.as_ref() {
            // Another thread computed it while we waited.
            return Ok((s.clone(), Source::MemoryHit, None));
        }
        let result = self.load_or_compute(key, compute);
        if let Ok((s, _, _)) = &result {
            *guard = Some(s.clone());
            self.memory.lock().insert(*key, s.clone());
        }
        drop(guard);
        self.in_flight.lock().remove(key);
        result
    }

    fn load_or_compute(
        &self,
        key: &Key,
        compute: impl FnOnce() -> Result<Spectrum>,
    ) -> Result<(Arc<Spectrum>, Source, Option<String>)> {
        let mut source = Source::Computed;
        if let Some(path) = self.dir.as_ref().map(|d| d.join(key.file_name())) {
            if path.exists() {
                match self.read(&path, key) {
                    Ok(s) => return Ok((Arc::new(s), Source::DiskHit, None)),
                    Err(_) => source = Source::RebuiltCorrupt,
                }
            }
        }
        let s = compute()?;
        let warning = match self.dir.as_ref() {
            Some(dir) => self
                .write(dir, key, &s)
                .err()
                .map(|e| format!("base spectrum not cached on disk: {e}")),
            None => None,
        };
        Ok((Arc::new(s), source, warning))
    }

    /// Reads and checks a cache file: metadata, shapes, checksum, finiteness.
    fn read(&self, path: &Path, key: &Key) -> Result<Spectrum> {
        let f = SafetensorsFile::open(path, &self.limits)?;
        let meta = f.metadata();
        for (k, v) in key.metadata() {
            if meta.get(&k) != Some(&v) {
                crate::bail!(
                    Format,
                    "{}: cache entry does not match ({k})",
                    path.display()
                );
            }
        }
        let rho = key.rows.min(key.cols);
        let u = read_vectors(&f, "u", rho, key.rows)?;
        let v = read_vectors(&f, "v", rho, key.cols)?;
        let s = read_vectors(&f, "s", 1, rho)?;
        if meta.get("checksum") != Some(&checksum(&[&u, &s, &v])) {
            crate::bail!(Format, "{}: checksum mismatch", path.display());
        }
        if !s.windows(2).all(|w| w[0] >= w[1]) || s.iter().any(|x| *x < 0.0) {
            crate::bail!(Format, "{}: singular values not sorted", path.display());
        }
        Ok(Spectrum {
            rows: key.rows,
            cols: key.cols,
            u,
            s,
            v,
        })
    }

    fn write(&self, dir: &Path, key: &Key, s: &Spectrum) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        let vec_dtype = match self.disk_dtype {
            CacheDType::F32 => DType::F32,
            CacheDType::F16 => DType::F16,
        };
        // The checksum covers the values as they will be read back.
        let stored = |x: &[f32]| -> Vec<f32> {
            match vec_dtype {
                DType::F16 => x.iter().map(|&v| half::f16::from_f32(v).to_f32()).collect(),
                _ => x.to_vec(),
            }
        };
        let (u, v) = (stored(&s.u), stored(&s.v));
        let mut meta = key.metadata();
        meta.insert("checksum".into(), checksum(&[&u, &s.s, &v]));
        meta.insert("tool_version".into(), env!("CARGO_PKG_VERSION").into());
        let rho = s.rank();
        safetensors_file::write(
            &dir.join(key.file_name()),
            &[
                (
                    "u".into(),
                    vec_dtype,
                    vec![rho, s.rows],
                    encode(&u, vec_dtype),
                ),
                ("s".into(), DType::F32, vec![rho], encode(&s.s, DType::F32)),
                (
                    "v".into(),
                    vec_dtype,
                    vec![rho, s.cols],
                    encode(&v, vec_dtype),
                ),
            ],
            &meta,
        )
    }
}

fn read_vectors(f: &SafetensorsFile, name: &str, rows: usize, cols: usize) -> Result<Vec<f32>> {
    let info = f.info(name).ok_or_else(|| {
        Error::new(
            crate::ErrorKind::Format,
            format!("cache entry lacks `{name}`"),
        )
    })?;
    let numel: usize = info.shape.iter().product();
    let dtype = info.dtype.filter(|_| numel == rows * cols);
    let Some(dtype) = dtype else {
        crate::bail!(Format, "cache entry `{name}` has shape {:?}", info.shape);
    };
    let bytes = f.bytes(name).expect("listed tensor");
    let values = TensorRef::new(dtype, rows, cols, bytes)?.to_f32();
    // The copy is what is kept; the mapped pages need not stay resident beside it.
    f.release(name);
    // A fold rather than `any`: without the early exit the scan vectorises.
    if !values.iter().fold(true, |ok, x| ok & x.is_finite()) {
        crate::bail!(Format, "cache entry `{name}` holds non-finite values");
    }
    Ok(values)
}

fn checksum(parts: &[&[f32]]) -> String {
    let mut h = Xxh3::new();
    for p in parts {
        h.update(bytemuck::cast_slice(p));
    }
    format!("{:016x}", h.digest())
}
