//! Memory-mapped safetensors files, validated against `Limits` before anything of a
//! declared size is allocated or mapped, and an atomic writer.

use crate::bail;
use crate::error::{Error, ErrorKind, Result};
use crate::floats::Floats;
use crate::limits::Limits;
use crate::tensor::{DType, TensorRef};
use memmap2::Mmap;
use serde::Deserialize;
use std::collections::{BTreeMap, HashSet};
use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// One tensor's header entry; `start..end` is relative to the data section.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorInfo {
    pub dtype_name: String,
    /// `None` for dtypes we do no maths on (I64, BOOL, F8, …).
    pub dtype: Option<DType>,
    pub shape: Vec<usize>,
    pub start: usize,
    pub end: usize,
}

#[derive(Debug)]
pub struct SafetensorsFile {
    path: PathBuf,
    // Shared so that f32 tensors can be used in place beyond the file's lifetime.
    mmap: std::sync::Arc<Mmap>,
    tensors: BTreeMap<String, TensorInfo>,
    metadata: BTreeMap<String, String>,
    data_offset: usize,
    owner_only: bool,
}

#[derive(Deserialize)]
struct RawInfo {
    dtype: String,
    shape: Vec<usize>,
    data_offsets: (usize, usize),
}

impl SafetensorsFile {
    pub fn open(path: &Path, limits: &Limits) -> Result<Self> {
        let p = path.display();
        let (mut file, file_len) = open_regular(path)?;
        if file_len > limits.max_file_bytes {
            bail!(
                Limit,
                "{p}: file is {file_len} bytes, over the limit of {} (max_file_bytes)",
                limits.max_file_bytes
            );
        }
        if file_len < 8 {
            bail!(
                Format,
                "{p}: not a safetensors file: {file_len} bytes, shorter than the 8-byte header length"
            );
        }
        let mut len_bytes = [0u8; 8];
        file.read_exact(&mut len_bytes)
            .map_err(|e| Error::io(path, e))?;
        let header_len = u64::from_le_bytes(len_bytes);
        // Every safetensors header is a JSON object; anything else (a text file, a pickle) is
        // named for what it is rather than by the absurd length its first 8 bytes decode to.
        let mut first = [0u8; 1];
        if file_len > 8 {
            file.read_exact(&mut first)
                .map_err(|e| Error::io(path, e))?;
            if first[0] != b'{' {
                bail!(
                    Format,
                    "{p}: not a safetensors file: its JSON header must start with '{{' at byte 8"
                );
            }
        }
        if header_len > limits.max_header_bytes {
            bail!(
                Limit,
                "{p}: safetensors header of {header_len} bytes is over the limit of {} (max_header_bytes)",
                limits.max_header_bytes
            );
        }
        if header_len > file_len - 8 {
            bail!(
                Format,
                "{p}: truncated safetensors file: header of {header_len} bytes runs past the end of the {file_len}-byte file"
            );
        }
        // Both bounds above make this allocation at most max_header_bytes and within the file.
        let mut header = vec![0u8; header_len as usize];
        if let Some((head, rest)) = header.split_first_mut() {
            *head = first[0];
            file.read_exact(rest).map_err(|e| Error::io(path, e))?;
        }
        let data_offset = 8 + header_len as usize;
        let data_len = (file_len - 8 - header_len) as usize;
        let (tensors, metadata) =
            parse_header(&header, data_len, limits).map_err(|e| e.context(&p))?;

        // SAFETY: the map is read-only; like every safetensors reader we assume the file is
        // not truncated under us while mapped.
        let mmap = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
        if mmap.len() as u64 != file_len {
            bail!(Io, "{p}: file changed size while being opened");
        }
        // Second opinion from the reference parser on the same bytes.
        if let Err(e) = safetensors::SafeTensors::deserialize(&mmap) {
            bail!(Format, "{p}: invalid safetensors file: {e}");
        }
        Ok(SafetensorsFile {
            path: path.to_path_buf(),
            mmap: mmap.into(),
            tensors,
            metadata,
            data_offset,
            owner_only: writable_only_by_us(&file),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.tensors.keys().map(String::as_str)
    }

    /// Whether the opened file is owned by this process's effective user and writable by no
    /// one else (unix; false elsewhere).
    pub fn writable_only_by_us(&self) -> bool {
        self.owner_only
    }

    pub fn info(&self, name: &str) -> Option<&TensorInfo> {
        self.tensors.get(name)
    }

    /// Drops this tensor's pages from the process's resident set (the map stays valid: pages
    /// are read again from the file on the next access). Keeps a scan's memory bounded by the
    /// modules in flight rather than by every tensor it has touched.
    pub fn release(&self, name: &str) {
        let Some(info) = self.tensors.get(name) else {
            return;
        };
        let page = 4096;
        let start = (self.data_offset + info.start).div_ceil(page) * page;
        let end = (self.data_offset + info.end) / page * page;
        if end > start {
            // SAFETY: a read-only private file mapping; dropping its pages cannot change what
            // is read from it, only when it is read from disk.
            let _ = unsafe {
                self.mmap.unchecked_advise_range(
                    memmap2::UncheckedAdvice::DontNeed,
                    start,
                    end - start,
                )
            };
        }
    }

    pub fn bytes(&self, name: &str) -> Option<&[u8]> {
        let info = self.tensors.get(name)?;
        Some(&self.mmap[self.data_offset + info.start..self.data_offset + info.end])
    }

    /// An F32 tensor's values in place (they stay valid after this file is dropped); None for
    /// another dtype, or when they cannot be used in place (see [`Floats::mapped`]).
    pub fn floats(&self, name: &str) -> Option<Floats> {
        let info = self.tensors.get(name)?;
        let start = self.data_offset + info.start;
        (info.dtype == Some(DType::F32))
            .then(|| Floats::mapped(&self.mmap, start..self.data_offset + info.end))
            .flatten()
    }

    /// 2-D float tensor as TensorRef; clear Shape/Unsupported error otherwise.
    pub fn matrix(&self, name: &str) -> Result<TensorRef<'_>> {
        let p = self.path.display();
        let Some(info) = self.tensors.get(name) else {
            bail!(Format, "{p}: no tensor named {name}");
        };
        let Some(dtype) = info.dtype else {
            bail!(
                Unsupported,
                "{p}: tensor {name} has dtype {}; only F32, F16, BF16 and F64 are supported",
                info.dtype_name
            );
        };
        let &[rows, cols] = info.shape.as_slice() else {
            bail!(
                Shape,
                "{p}: tensor {name} has shape {:?}; a 2-D matrix is required",
                info.shape
            );
        };
        let bytes = self.bytes(name).unwrap_or_default();
        TensorRef::new(dtype, rows, cols, bytes).map_err(|e| e.context(format!("{p}: {name}")))
    }

    /// The `__metadata__` string map (empty when absent).
    pub fn metadata(&self) -> &BTreeMap<String, String> {
        &self.metadata
    }
}

type Header = (BTreeMap<String, TensorInfo>, BTreeMap<String, String>);

/// Parses and checks the JSON header against a data section of `data_len` bytes.
fn parse_header(header: &[u8], data_len: usize, limits: &Limits) -> Result<Header> {
    let Ok(text) = std::str::from_utf8(header) else {
        bail!(Format, "safetensors header is not UTF-8");
    };
    let not_object = |e: serde_json::Error| {
        Error::new(
            ErrorKind::Format,
            format!("safetensors header is not a JSON object: {e}"),
        )
    };
    // In file order with repeats kept: a map would silently keep the last of two entries
    // with one name (as the reference parser does), and a reader could be shown either.
    let mut de = serde_json::Deserializer::from_str(text);
    let raw: Vec<(String, serde_json::Value)> = ordered(&mut de).map_err(not_object)?;
    de.end().map_err(not_object)?;
    let mut seen = HashSet::new();
    if let Some((name, _)) = raw.iter().find(|(n, _)| !seen.insert(n.as_str())) {
        bail!(Format, "safetensors header names {name:?} more than once");
    }
    let mut tensors = BTreeMap::new();
    let mut metadata = BTreeMap::new();
    for (name, value) in raw {
        if name == "__metadata__" {
            metadata = serde_json::from_value(value).map_err(|e| {
                Error::new(
                    ErrorKind::Format,
                    format!("__metadata__ must map strings to strings: {e}"),
                )
            })?;
            continue;
        }
        let info: RawInfo = serde_json::from_value(value).map_err(|e| {
            Error::new(
                ErrorKind::Format,
                format!("tensor {name}: malformed header entry: {e}"),
            )
        })?;
        tensors.insert(name.clone(), check_entry(&name, info, limits)?);
    }
    check_layout(&tensors, data_len)?;
    Ok((tensors, metadata))
}

/// Dtype, dimension limit and byte size of one entry.
fn check_entry(name: &str, raw: RawInfo, limits: &Limits) -> Result<TensorInfo> {
    let dtype_name = raw.dtype;
    let bits =
        serde_json::from_value::<safetensors::Dtype>(serde_json::Value::String(dtype_name.clone()))
            .map(|d| d.bitsize());
    let Ok(bits) = bits else {
        bail!(Format, "tensor {name}: unknown dtype {dtype_name:?}");
    };
    if let Some(&d) = raw.shape.iter().find(|&&d| d > limits.max_dim) {
        bail!(
            Limit,
            "tensor {name}: dimension {d} of shape {:?} is over the limit of {} (max_dim)",
            raw.shape,
            limits.max_dim
        );
    }
    let (start, end) = raw.data_offsets;
    let nbits = raw
        .shape
        .iter()
        .try_fold(1usize, |n, &d| n.checked_mul(d))
        .and_then(|n| n.checked_mul(bits));
    let want = nbits.filter(|b| b % 8 == 0).map(|b| b / 8);
    if end < start || want != Some(end - start) {
        bail!(
            Format,
            "tensor {name}: shape {:?} of {dtype_name} needs {} bytes but data_offsets [{start}, {end}] hold {}",
            raw.shape,
            want.map_or("an impossible number of".into(), |n| n.to_string()),
            end as i128 - start as i128
        );
    }
    Ok(TensorInfo {
        dtype: DType::from_safetensors_name(&dtype_name),
        dtype_name,
        shape: raw.shape,
        start,
        end,
    })
}

/// The tensors must tile the data section exactly: no gaps, overlaps or bytes past it.
fn check_layout(tensors: &BTreeMap<String, TensorInfo>, data_len: usize) -> Result<()> {
    let mut ranges: Vec<(&str, usize, usize)> = tensors
        .iter()
        .map(|(n, i)| (n.as_str(), i.start, i.end))
        .collect();
    ranges.sort_by_key(|&(_, s, e)| (s, e));
    let mut pos = 0;
    for (name, start, end) in ranges {
        if end > data_len {
            bail!(
                Format,
                "tensor {name}: data_offsets [{start}, {end}] lie outside the {data_len}-byte data section"
            );
        }
        if start != pos {
            let what = if start < pos {
                "overlaps"
            } else {
                "leaves a gap before"
            };
            bail!(
                Format,
                "tensor {name}: data_offsets [{start}, {end}] {what} the previous tensor (ranges must be contiguous)"
            );
        }
        pos = end;
    }
    if pos != data_len {
        bail!(
            Format,
            "tensors cover {pos} bytes but the data section holds {data_len} (ranges must be contiguous)"
        );
    }
    Ok(())
}

/// Whether `meta` is owned by this process's effective user and neither group- nor
/// other-writable (unix; false elsewhere).
pub fn owned_and_private(meta: &std::fs::Metadata) -> bool {
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        // SAFETY: geteuid has no preconditions and cannot fail.
        let euid = unsafe { libc::geteuid() };
        meta.uid() == euid && meta.mode() & 0o022 == 0
    }
    #[cfg(not(unix))]
    {
        let _ = meta;
        false
    }
}

fn writable_only_by_us(file: &File) -> bool {
    file.metadata().is_ok_and(|m| owned_and_private(&m))
}

/// Opens `path` for reading when it is a regular file (symlinks followed) and returns it with
/// its length. Anything else is refused before `open(2)` could block (a FIFO) or touch a device;
/// the type is checked again on the opened descriptor, so a swap in between is caught too.
pub fn open_regular(path: &Path) -> Result<(File, u64)> {
    let not_regular = |t: std::fs::FileType| {
        let what = if t.is_dir() {
            "a directory"
        } else if t.is_symlink() {
            "a dangling symlink"
        } else {
            "not a regular file (a FIFO, socket or device)"
        };
        Error::new(
            ErrorKind::Io,
            format!("{}: {what}; expected a regular file", path.display()),
        )
    };
    let meta = std::fs::metadata(path).map_err(|e| Error::io(path, e))?;
    if !meta.is_file() {
        return Err(not_regular(meta.file_type()));
    }
    let mut options = std::fs::OpenOptions::new();
    options.read(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        // Should the path become a FIFO after the check, open(2) returns at once instead of
        // waiting for a writer. No effect on regular files.
        options.custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY);
    }
    let file = options.open(path).map_err(|e| Error::io(path, e))?;
    let meta = file.metadata().map_err(|e| Error::io(path, e))?;
    if !meta.is_file() {
        return Err(not_regular(meta.file_type()));
    }
    Ok((file, meta.len()))
}

/// A whole small text file (a JSON config, a policy) of at most `max_bytes`, read through
/// [`open_regular`]; `limit` names the limit in the error.
pub fn read_text(path: &Path, max_bytes: u64, limit: &str) -> Result<String> {
    let p = path.display();
    let (file, len) = open_regular(path)?;
    let over = || {
        Error::new(
            ErrorKind::Limit,
            format!("{p}: file is over the limit of {max_bytes} bytes ({limit})"),
        )
    };
    if len > max_bytes {
        return Err(over());
    }
    let mut bytes = Vec::new();
    // The file may grow after the size check: never read past the limit.
    file.take(max_bytes + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| Error::io(path, e))?;
    if bytes.len() as u64 > max_bytes {
        return Err(over());
    }
    String::from_utf8(bytes)
        .map_err(|_| Error::new(ErrorKind::Format, format!("{p}: not UTF-8 text")))
}

/// Writes a safetensors file atomically (temp file in the same dir + fsync + rename), header
/// padded so data starts 8-byte aligned.
pub fn write(
    path: &Path,
    tensors: &[(String, DType, Vec<usize>, Vec<u8>)],
    metadata: &BTreeMap<String, String>,
) -> Result<()> {
    let mut header = serde_json::Map::new();
    if !metadata.is_empty() {
        header.insert("__metadata__".into(), serde_json::json!(metadata));
    }
    let mut offset = 0usize;
    for (name, dtype, shape, bytes) in tensors {
        let want = shape
            .iter()
            .try_fold(dtype.size(), |n, &d| n.checked_mul(d));
        if want != Some(bytes.len()) {
            bail!(
                InvalidArgument,
                "tensor {name}: shape {shape:?} of {dtype:?} needs {want:?} bytes, got {}",
                bytes.len()
            );
        }
        if name == "__metadata__" || header.contains_key(name) {
            bail!(
                InvalidArgument,
                "tensor name {name:?} is reserved or repeated"
            );
        }
        let end = offset + bytes.len();
        header.insert(
            name.clone(),
            serde_json::json!({"dtype": dtype.safetensors_name(), "shape": shape, "data_offsets": [offset, end]}),
        );
        offset = end;
    }
    let mut json = serde_json::to_vec(&header).expect("a JSON map always serializes");
    // Spaces are valid JSON padding; 8 + len(header) ≡ 0 (mod 8) aligns the data section.
    json.resize(json.len().next_multiple_of(8), b' ');

    write_atomically(path, |f| {
        f.write_all(&(json.len() as u64).to_le_bytes())?;
        f.write_all(&json)?;
        for (_, _, _, bytes) in tensors {
            f.write_all(bytes)?;
        }
        Ok(())
    })
}

/// A hidden name beside `path` (same directory, so a rename moves it into place), unique per
/// process and call, so concurrent writers never share a temporary file or directory.
pub fn temp_sibling(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy())
        .unwrap_or_default();
    static SEQ: AtomicU64 = AtomicU64::new(0);
    let seq = SEQ.fetch_add(1, Ordering::Relaxed);
    path.with_file_name(format!(".{name}.{}.{seq}.tmp", std::process::id()))
}

/// Writes `path` atomically: `fill` writes a temp file in the same directory, which is synced
/// and renamed over `path`, so readers see the old file or the whole new one, never a part.
pub fn write_atomically(
    path: &Path,
    fill: impl FnOnce(&mut File) -> std::io::Result<()>,
) -> Result<()> {
    let dir = parent_dir(path);
    let tmp = temp_sibling(path);
    let written = (|| {
        let mut f = File::create(&tmp)?;
        // Held until the rename (the file is closed after it): a cleaner that can take this
        // lock knows the writer is gone (see `spectrum::cache`).
        try_lock(&f);
        fill(&mut f)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(Error::io(path, e));
    }
    sync_dir(dir);
    Ok(())
}

/// Takes an exclusive advisory lock on `f` without waiting; true when taken. Released when the
/// file is closed, also when its process is killed. Always false where flock is missing.
pub fn try_lock(f: &File) -> bool {
    #[cfg(unix)]
    {
        use std::os::fd::AsRawFd;
        // SAFETY: flock on a descriptor this File owns; no memory is passed.
        unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) == 0 }
    }
    #[cfg(not(unix))]
    {
        let _ = f;
        false
    }
}

/// The directory `path` is in: `.` for a bare file name.
pub fn parent_dir(path: &Path) -> &Path {
    match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    }
}

/// Makes a rename into `dir` durable; not every platform can open a directory, so best effort.
pub fn sync_dir(dir: &Path) {
    if let Ok(d) = File::open(dir) {
        let _ = d.sync_all();
    }
}

/// A JSON object (or null) as key/value pairs in file order, repeated keys kept, which
/// serde_json's default map would sort and merge.
pub(crate) fn ordered<'de, D, T>(d: D) -> std::result::Result<Vec<(String, T)>, D::Error>
where
    D: serde::de::Deserializer<'de>,
    T: serde::Deserialize<'de>,
{
    struct Pairs<T>(std::marker::PhantomData<T>);
    impl<'de, T: serde::Deserialize<'de>> serde::de::Visitor<'de> for Pairs<T> {
        type Value = Vec<(String, T)>;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("an object or null")
        }
        fn visit_unit<E>(self) -> std::result::Result<Self::Value, E> {
            Ok(Vec::new())
        }
        fn visit_none<E>(self) -> std::result::Result<Self::Value, E> {
            Ok(Vec::new())
        }
        fn visit_map<M: serde::de::MapAccess<'de>>(
            self,
            mut m: M,
        ) -> std::result::Result<Self::Value, M::Error> {
            let mut out = Vec::new();
            while let Some(pair) = m.next_entry()? {
                out.push(pair);
            }
            Ok(out)
        }
    }
    d.deserialize_any(Pairs(std::marker::PhantomData))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ErrorKind;

    /// A file of an 8-byte length, `header` and `data`, exactly as given.
    fn raw(dir: &tempfile::TempDir, len: u64, header: &str, data: &[u8]) -> PathBuf {
        let path = dir.path().join("t.safetensors");
        let mut bytes = len.to_le_bytes().to_vec();
        bytes.extend_from_slice(header.as_bytes());
        bytes.extend_from_slice(data);
        std::fs::write(&path, bytes).unwrap();
        path
    }

    fn open_header(header: &str, data_len: usize, limits: &Limits) -> Error {
        let dir = tempfile::tempdir().unwrap();
        let path = raw(&dir, header.len() as u64, header, &vec![0u8; data_len]);
        let e = SafetensorsFile::open(&path, limits).unwrap_err();
        assert!(e.message().contains("t.safetensors"), "names the file: {e}");
        e
    }

    #[track_caller]
    fn check(e: Error, kind: ErrorKind, phrase: &str) {
        assert_eq!(e.kind(), kind, "{e}");
        assert!(e.message().contains(phrase), "{phrase:?} missing from: {e}");
    }

    const ONE: &str = r#"{"x":{"dtype":"F32","shape":[2,2],"data_offsets":[0,16]}}"#;

    #[test]
    fn a_valid_hand_built_file_opens() {
        let dir = tempfile::tempdir().unwrap();
        let path = raw(&dir, ONE.len() as u64, ONE, &[0u8; 16]);
        let f = SafetensorsFile::open(&path, &Limits::default()).unwrap();
        assert_eq!(f.path(), path);
        assert_eq!(f.bytes("x").unwrap().len(), 16);
        assert!(f.metadata().is_empty());
    }

    #[test]
    fn short_truncated_and_oversized_files() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.safetensors");
        std::fs::write(&path, [1u8, 2, 3]).unwrap();
        let lim = Limits::default();
        check(
            SafetensorsFile::open(&path, &lim).unwrap_err(),
            ErrorKind::Format,
            "shorter than the 8-byte",
        );

        let path = raw(&dir, 1 << 60, "{}", &[]);
        check(
            SafetensorsFile::open(&path, &lim).unwrap_err(),
            ErrorKind::Limit,
            "max_header_bytes",
        );

        let path = raw(&dir, 1000, ONE, &[]);
        check(
            SafetensorsFile::open(&path, &lim).unwrap_err(),
            ErrorKind::Format,
            "truncated",
        );

        let path = raw(&dir, ONE.len() as u64, ONE, &[0u8; 16]);
        let small = Limits {
            max_file_bytes: 20,
            ..lim
        };
        check(
            SafetensorsFile::open(&path, &small).unwrap_err(),
            ErrorKind::Limit,
            "max_file_bytes",
        );

        // Data cut short: the tensor's range runs past the end.
        let path = raw(&dir, ONE.len() as u64, ONE, &[0u8; 10]);
        check(
            SafetensorsFile::open(&path, &lim).unwrap_err(),
            ErrorKind::Format,
            "outside the 10-byte data section",
        );
    }

    #[test]
    fn header_must_be_utf8_json() {
        let lim = Limits::default();
        let dir = tempfile::tempdir().unwrap();
        let path = raw(&dir, 4, "{\u{0}\u{0}\u{0}", &[]);
        check(
            SafetensorsFile::open(&path, &lim).unwrap_err(),
            ErrorKind::Format,
            "not a JSON object",
        );
        let path = dir.path().join("t.safetensors");
        let mut bytes = 2u64.to_le_bytes().to_vec();
        bytes.extend_from_slice(&[b'{', 0xfe]);
        std::fs::write(&path, bytes).unwrap();
        check(
            SafetensorsFile::open(&path, &lim).unwrap_err(),
            ErrorKind::Format,
            "not UTF-8",
        );
        check(
            open_header("[1, 2]", 0, &lim),
            ErrorKind::Format,
            "not a safetensors file",
        );
        check(
            open_header(r#"{"x": 3}"#, 0, &lim),
            ErrorKind::Format,
            "malformed header entry",
        );
    }

    #[test]
    fn entries_must_describe_their_bytes() {
        let lim = Limits::default();
        let e = open_header(
            r#"{"x":{"dtype":"Q7","shape":[1],"data_offsets":[0,4]}}"#,
            4,
            &lim,
        );
        check(e, ErrorKind::Format, "unknown dtype \"Q7\"");
        let e = open_header(
            r#"{"x":{"dtype":"F32","shape":[2,3],"data_offsets":[0,16]}}"#,
            16,
            &lim,
        );
        check(e, ErrorKind::Format, "needs 24 bytes");
        let e = open_header(
            r#"{"x":{"dtype":"F32","shape":[2,2],"data_offsets":[16,32]}}"#,
            16,
            &lim,
        );
        check(e, ErrorKind::Format, "outside the 16-byte data section");
        let e = open_header(
            r#"{"x":{"dtype":"F32","shape":[2,2],"data_offsets":[16,0]}}"#,
            16,
            &lim,
        );
        check(e, ErrorKind::Format, "data_offsets [16, 0]");
        let e = open_header(
            r#"{"x":{"dtype":"F32","shape":[4],"data_offsets":[0,16]},"y":{"dtype":"F32","shape":[2],"data_offsets":[8,16]}}"#,
            16,
            &lim,
        );
        check(e, ErrorKind::Format, "overlaps");
        let e = open_header(
            r#"{"x":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"y":{"dtype":"F32","shape":[1],"data_offsets":[12,16]}}"#,
            16,
            &lim,
        );
        check(e, ErrorKind::Format, "gap");
        check(
            open_header(ONE, 24, &lim),
            ErrorKind::Format,
            "cover 16 bytes but the data section holds 24",
        );
        let overflow =
            r#"{"x":{"dtype":"F64","shape":[4294967296,4294967296],"data_offsets":[0,8]}}"#;
        let unbounded = Limits {
            max_dim: usize::MAX,
            ..lim
        };
        check(
            open_header(overflow, 8, &unbounded),
            ErrorKind::Format,
            "impossible",
        );
        let small = Limits { max_dim: 1, ..lim };
        check(open_header(ONE, 16, &small), ErrorKind::Limit, "max_dim");
    }

    #[test]
    fn non_float_tensors_are_listed_but_not_matrices() {
        let header = r#"{"__metadata__":{"format":"pt"},"ids":{"dtype":"I64","shape":[1,2],"data_offsets":[0,16]}}"#;
        let dir = tempfile::tempdir().unwrap();
        let path = raw(&dir, header.len() as u64, header, &[0u8; 16]);
        let f = SafetensorsFile::open(&path, &Limits::default()).unwrap();
        let info = f.info("ids").unwrap();
        assert_eq!((info.dtype_name.as_str(), info.dtype), ("I64", None));
        assert_eq!(f.metadata()["format"], "pt");
        check(
            f.matrix("ids").unwrap_err(),
            ErrorKind::Unsupported,
            "dtype I64",
        );
    }
}
