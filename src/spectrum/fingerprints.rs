//! Remembered fingerprints: the cache keys of a base file's tensors, kept in the cache directory
//! beside the entries and keyed by the file's identity (device, inode, size, mtime, ctime; see
//! [`FileIdentity`]). A one-shot scan with a warm cache then finds its entries without hashing
//! the base tensors, which it would otherwise read only for that.
//!
//! One small JSON file per base file. It is used only when it and its directory are writable by
//! this user alone and the identity matches the opened base file, so neither another user nor
//! a changed base file can point a tensor at a wrong entry; anything else (missing, foreign,
//! stale, unreadable) is ignored and the tensor is hashed. Writes are atomic; two processes
//! adding to one file at once can only lose each other's additions, which are hashed again.

use crate::limits::Limits;
use crate::safetensors_file::{self, owned_and_private, FileIdentity};
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

#[derive(Debug, Default, Serialize, Deserialize)]
struct Remembered {
    identity: Option<FileIdentity>,
    /// Tensor name → xxh3-128 of its bytes, as 32 hex digits.
    tensors: BTreeMap<String, String>,
}

struct File {
    remembered: Remembered,
    changed: bool,
}

pub struct Fingerprints {
    dir: PathBuf,
    files: Mutex<HashMap<FileIdentity, File>>,
    max_bytes: u64,
}

impl Fingerprints {
    pub fn new(dir: &Path, limits: &Limits) -> Fingerprints {
        Fingerprints {
            dir: dir.to_path_buf(),
            files: Mutex::new(HashMap::new()),
            max_bytes: limits.max_config_bytes,
        }
    }

    fn path(&self, id: &FileIdentity) -> PathBuf {
        self.dir
            .join(format!("fingerprints-{:x}-{:x}.json", id.dev, id.ino))
    }

    /// The remembered fingerprint of tensor `name` of the file `id`.
    pub fn get(&self, id: &FileIdentity, name: &str) -> Option<u128> {
        let mut files = self.files.lock();
        let file = files.entry(*id).or_insert_with(|| File {
            remembered: self.load(id),
            changed: false,
        });
        u128::from_str_radix(file.remembered.tensors.get(name)?, 16).ok()
    }

    /// Remembers a fingerprint, written by the next [`Fingerprints::save`].
    pub fn put(&self, id: &FileIdentity, name: &str, fingerprint: u128) {
        let mut files = self.files.lock();
        let file = files.entry(*id).or_insert_with(|| File {
            remembered: self.load(id),
            changed: false,
        });
        file.remembered.identity = Some(*id);
        file.remembered
            .tensors
            .insert(name.to_string(), format!("{fingerprint:032x}"));
        file.changed = true;
    }

    /// Writes every file with new fingerprints. Best effort: a failure only means they are
    /// computed again next time.
    pub fn save(&self) {
        let mut files = self.files.lock();
        for (id, file) in files.iter_mut().filter(|(_, f)| f.changed) {
            let text = serde_json::to_vec(&file.remembered).expect("a map always serializes");
            let path = self.path(id);
            let written = std::fs::create_dir_all(&self.dir).is_ok()
                && safetensors_file::write_atomically(&path, |f| {
                    std::io::Write::write_all(f, &text)
                })
                .is_ok();
            file.changed = !written;
        }
    }

    /// What is remembered for `id`, or nothing when it cannot be trusted (see the module).
    fn load(&self, id: &FileIdentity) -> Remembered {
        let path = self.path(id);
        let private = |p: &Path| std::fs::metadata(p).is_ok_and(|m| owned_and_private(&m));
        if !private(&self.dir) || !private(&path) {
            return Remembered::default();
        }
        safetensors_file::read_text(&path, self.max_bytes, "max_config_bytes")
            .ok()
            .and_then(|t| serde_json::from_str::<Remembered>(&t).ok())
            .filter(|r| r.identity.as_ref() == Some(id))
            .unwrap_or_default()
    }
}
