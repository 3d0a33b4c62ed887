//! The base-spectrum cache: in memory (bounded, shared by all threads) → on disk (one safetensors
//! file per base tensor) → compute. Keyed by a fingerprint of the tensor's bytes, never its name.
//! Concurrent requests for one tensor compute it once (single flight).

use super::fingerprints::Fingerprints;
pub use super::probe::probe;
use crate::backend::Spectrum;
use crate::error::{Error, Result};
use crate::floats::Floats;
use crate::limits::Limits;
use crate::safetensors_file::{self, FileIdentity, SafetensorsFile};
use crate::tensor::{encode, DType, TensorRef};
use parking_lot::Mutex;
use std::collections::{BTreeMap, HashMap};
use std::hash::Hasher;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use twox_hash::{XxHash3_128, XxHash3_64};

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
            fingerprint: XxHash3_128::oneshot(t.bytes),
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
    /// A cache file existed but was corrupt, truncated, mismatched or not the SVD of its tensor
    /// (see [`probe`]): ignored and rebuilt.
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

/// What [`SpectrumCache::get_or_compute`] found or made.
pub struct Fetched {
    pub spectrum: Arc<Spectrum>,
    pub source: Source,
    /// Why a disk entry was not used (corrupt, mismatched, or failing the probe), when it was not.
    pub rebuilt: Option<String>,
    /// Why a computed spectrum could not be written to disk: the spectrum is still good.
    pub not_written: Option<String>,
}

/// One computation in progress: waiters block on the lock and find the result inside.
type Flight = Mutex<Option<Arc<Spectrum>>>;

pub struct SpectrumCache {
    dir: Option<PathBuf>,
    disk_dtype: CacheDType,
    memory: Mutex<Lru>,
    in_flight: Mutex<HashMap<Key, Arc<Flight>>>,
    limits: Limits,
    fingerprints: Option<Fingerprints>,
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
        if let Some(d) = &dir {
            remove_stale_temporaries(d);
        }
        SpectrumCache {
            disk_dtype,
            memory: Mutex::new(Lru {
                capacity_bytes: memory_bytes,
                used_bytes: 0,
                tick: 0,
                entries: HashMap::new(),
            }),
            in_flight: Mutex::new(HashMap::new()),
            fingerprints: dir.as_deref().map(|d| Fingerprints::new(d, &limits)),
            dir,
            limits,
        }
    }

    /// The cache key of tensor `name` of a base file, remembered or computed (and then
    /// remembered, written by [`SpectrumCache::save_fingerprints`]; see
    /// [`super::fingerprints`]).
    pub fn key(&self, file: Option<FileIdentity>, name: &str, w0: &TensorRef<'_>) -> Key {
        let remembered = self.fingerprints.as_ref().zip(file);
        if let Some(fingerprint) = remembered.and_then(|(f, id)| f.get(&id, name)) {
            return Key {
                fingerprint,
                dtype: w0.dtype,
                rows: w0.rows,
                cols: w0.cols,
            };
        }
        let key = Key::of(w0);
        if let Some((f, id)) = remembered {
            f.put(&id, name, key.fingerprint);
        }
        key
    }

    pub fn save_fingerprints(&self) {
        if let Some(f) = &self.fingerprints {
            f.save();
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

    /// The spectrum of `w0` (whose key is `key`), from memory, disk, or `compute` (once, however
    /// many threads ask). An entry read from disk is used only once [`probe`] has checked it
    /// against `w0`; one that fails any check is rebuilt, and [`Fetched::rebuilt`] says why.
    pub fn get_or_compute(
        &self,
        key: &Key,
        w0: &TensorRef<'_>,
        compute: impl FnOnce() -> Result<Spectrum>,
    ) -> Result<Fetched> {
        let hit = |spectrum, source| Fetched {
            spectrum,
            source,
            rebuilt: None,
            not_written: None,
        };
        if let Some(s) = self.memory.lock().get(key) {
            return Ok(hit(s, Source::MemoryHit));
        }
        let slot = self.in_flight.lock().entry(*key).or_default().clone();
        let mut guard = slot.lock();
        if let Some(s) = guard.as_ref() {
            // Another thread computed it while we waited.
            return Ok(hit(s.clone(), Source::MemoryHit));
        }
        let result = self.load_or_compute(key, w0, compute);
        if let Ok(f) = &result {
            *guard = Some(f.spectrum.clone());
            self.memory.lock().insert(*key, f.spectrum.clone());
        }
        drop(guard);
        self.in_flight.lock().remove(key);
        result
    }

    fn load_or_compute(
        &self,
        key: &Key,
        w0: &TensorRef<'_>,
        compute: impl FnOnce() -> Result<Spectrum>,
    ) -> Result<Fetched> {
        let mut rebuilt = None;
        if let Some(path) = self.dir.as_ref().map(|d| d.join(key.file_name())) {
            if path.exists() {
                let checked = self.read(&path, key).and_then(|(s, stored, trusted)| {
                    if !trusted {
                        probe(&s, w0, stored)?;
                    }
                    Ok(s)
                });
                match checked {
                    Ok(s) => {
                        return Ok(Fetched {
                            spectrum: Arc::new(s),
                            source: Source::DiskHit,
                            rebuilt: None,
                            not_written: None,
                        })
                    }
                    Err(e) => rebuilt = Some(format!("cache entry ignored and rebuilt: {e}")),
                }
            }
        }
        let s = compute()?;
        let not_written = match self.dir.as_ref() {
            Some(dir) => self
                .write(dir, key, &s)
                .err()
                .map(|e| format!("base spectrum not cached on disk: {e}")),
            None => None,
        };
        Ok(Fetched {
            spectrum: Arc::new(s),
            source: match rebuilt {
                Some(_) => Source::RebuiltCorrupt,
                None => Source::Computed,
            },
            rebuilt,
            not_written,
        })
    }

    /// Reads and checks a cache file: metadata, shapes, checksum, finiteness. Also returns the
    /// dtype the singular vectors were stored in, and whether only this user can have written
    /// the entry: the file and its directory are ours and writable by no one else. Such an
    /// entry is one this user's own gate wrote (with its checksum, which rules out accidents),
    /// so the [`probe`], which guards against entries forged by others, is not needed for it.
    fn read(&self, path: &Path, key: &Key) -> Result<(Spectrum, DType, bool)> {
        let f = SafetensorsFile::open(path, &self.limits)?;
        let trusted = f.writable_only_by_us()
            && path
                .parent()
                .and_then(|d| std::fs::metadata(d).ok())
                .is_some_and(|m| safetensors_file::owned_and_private(&m));
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
        let stored = f.info("u").and_then(|i| i.dtype).unwrap_or(DType::F32);
        let u = read_vectors(&f, "u", rho, key.rows)?;
        let v = read_vectors(&f, "v", rho, key.cols)?;
        let s = read_vectors(&f, "s", 1, rho)?.to_vec();
        let (sum, finite) = checksum(&[&u, &s, &v]);
        if !finite {
            crate::bail!(
                Format,
                "{}: cache entry holds non-finite values",
                path.display()
            );
        }
        if meta.get("checksum") != Some(&sum) {
            crate::bail!(Format, "{}: checksum mismatch", path.display());
        }
        if !s.windows(2).all(|w| w[0] >= w[1]) || s.iter().any(|x| *x < 0.0) {
            crate::bail!(Format, "{}: singular values not sorted", path.display());
        }
        let spectrum = Spectrum {
            rows: key.rows,
            cols: key.cols,
            u,
            s,
            v,
        };
        Ok((spectrum, stored, trusted))
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
        meta.insert("checksum".into(), checksum(&[&u, &s.s, &v]).0);
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

/// Removes the temporary files of cache entries whose writer is gone (a process killed while
/// writing leaves one, up to a few hundred MB), and returns how many. Only names of this cache's
/// own temporaries (`.<name>.<pid>.<seq>.tmp` of entries and of remembered fingerprints, see
/// `safetensors_file::temp_sibling`) are touched, and only when both the writer's lock on the file can be taken (a live writer holds
/// it until its rename) and the process id in the name is not alive (writers without that lock).
/// Anything else, or any error, leaves the file alone.
pub fn remove_stale_temporaries(dir: &Path) -> usize {
    static TEMP: std::sync::LazyLock<regex::Regex> = std::sync::LazyLock::new(|| {
        regex::Regex::new(
            r"^\.(?:[0-9a-f]{32}-[0-9]+x[0-9]+-[a-z0-9]+\.v[0-9]+\.safetensors|fingerprints-[0-9a-f]+-[0-9a-f]+\.json)\.([0-9]+)\.[0-9]+\.tmp$",
        )
        .expect("a valid regex")
    });
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    let mut removed = 0;
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| TEMP.captures(n))
            .and_then(|c| c[1].parse::<u32>().ok())
        else {
            continue;
        };
        let path = entry.path();
        // Regular files only, never followed through a link.
        if !entry.file_type().is_ok_and(|t| t.is_file()) || process_alive(pid) {
            continue;
        }
        let Ok(f) = std::fs::File::open(&path) else {
            continue;
        };
        if safetensors_file::try_lock(&f) && std::fs::remove_file(&path).is_ok() {
            removed += 1;
        }
    }
    removed
}

/// Whether process `pid` exists (ours counts). Unknown means alive.
fn process_alive(pid: u32) -> bool {
    if pid == std::process::id() {
        return true;
    }
    #[cfg(unix)]
    {
        let Ok(pid) = libc::pid_t::try_from(pid) else {
            return true;
        };
        // SAFETY: signal 0 only checks for existence and permission; nothing is sent.
        let r = unsafe { libc::kill(pid, 0) };
        r == 0 || std::io::Error::last_os_error().raw_os_error() != Some(libc::ESRCH)
    }
    #[cfg(not(unix))]
    {
        true
    }
}

/// A stored basis, in place when it is stored as f32 (see [`Floats::mapped`]), else converted.
fn read_vectors(f: &SafetensorsFile, name: &str, rows: usize, cols: usize) -> Result<Floats> {
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
    if let Some(values) = f.floats(name) {
        return Ok(values);
    }
    let bytes = f.bytes(name).expect("listed tensor");
    let values = TensorRef::new(dtype, rows, cols, bytes)?.to_f32();
    // The copy is what is kept; the mapped pages need not stay resident beside it.
    f.release(name);
    Ok(values.into())
}

/// xxh3-64 of the values' bytes, and whether they are all finite: one pass, chunk by chunk, so
/// each chunk is checked while it is in cache.
fn checksum(parts: &[&[f32]]) -> (String, bool) {
    let mut h = XxHash3_64::new();
    let mut finite = true;
    for chunk in parts.iter().flat_map(|p| p.chunks(16 * 1024)) {
        // A fold rather than `all`: without the early exit the check vectorises.
        finite &= chunk.iter().fold(true, |ok, x| ok & x.is_finite());
        h.write(bytemuck::cast_slice(chunk));
    }
    (format!("{:016x}", h.finish()), finite)
}
