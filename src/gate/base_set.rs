//! The base the gate screens against: attached once (a model on disk, or tensors the host keeps
//! in memory), fingerprinted once per tensor.

use super::Gate;
use crate::base::BaseModel;
use crate::error::Result;
use crate::spectrum::cache::Key;
use crate::tensor::{DType, TensorRef};
use std::collections::BTreeMap;
use std::path::Path;

/// A base tensor the host keeps in its own memory (C ABI). The host guarantees it stays alive and
/// unchanged while the gate lives.
pub(super) struct HostTensor {
    ptr: *const u8,
    len: usize,
    dtype: DType,
    rows: usize,
    cols: usize,
}

// SAFETY: the memory is only read, and the host promises it outlives the gate unchanged.
unsafe impl Send for HostTensor {}
unsafe impl Sync for HostTensor {}

/// The attached base: a model on disk, tensors in host memory, or both.
#[derive(Default)]
pub(super) struct BaseSet {
    pub(super) model: Option<BaseModel>,
    pub(super) host: BTreeMap<String, HostTensor>,
}

impl BaseSet {
    pub(super) fn label(&self) -> String {
        match &self.model {
            Some(m) => m.path().display().to_string(),
            None => "<host memory>".into(),
        }
    }

    pub(super) fn names(&self) -> Vec<String> {
        let mut names = self
            .model
            .as_ref()
            .map(|m| m.matrix_names())
            .unwrap_or_default();
        names.extend(self.host.keys().cloned());
        names.sort();
        names.dedup();
        names
    }

    /// Lets the OS drop a file-backed tensor's pages once its bytes have been read.
    pub(super) fn release(&self, name: &str) {
        if let Some(m) = &self.model {
            m.release(name);
        }
    }

    pub(super) fn matrix(&self, name: &str) -> Result<TensorRef<'_>> {
        if let Some(h) = self.host.get(name) {
            // SAFETY: see HostTensor.
            let bytes = unsafe { std::slice::from_raw_parts(h.ptr, h.len) };
            return TensorRef::new(h.dtype, h.rows, h.cols, bytes);
        }
        match &self.model {
            Some(m) => m.matrix(name),
            None => crate::bail!(BaseMismatch, "no base tensor named `{name}`"),
        }
    }
}

impl Gate {
    /// Attaches a base model (safetensors file, or directory, sharded or not). Once per gate.
    pub fn attach_base(&self, path: &Path) -> Result<()> {
        let mut base = self.base.write();
        if base.model.is_some() {
            crate::bail!(
                InvalidArgument,
                "a base model is already attached to this gate"
            );
        }
        // Opened before anything changes, so a failure leaves the gate as it was.
        base.model = Some(BaseModel::open(path, &self.config.limits)?);
        Ok(())
    }

    /// Attaches one base tensor from host memory (row-major `rows × cols`).
    ///
    /// # Safety
    /// `data` must point to `rows·cols` elements of `dtype`, stay valid and unchanged while
    /// the gate lives.
    pub unsafe fn attach_base_tensor(
        &self,
        name: &str,
        data: *const u8,
        dtype: DType,
        rows: usize,
        cols: usize,
    ) -> Result<()> {
        if name.is_empty() || data.is_null() {
            crate::bail!(InvalidArgument, "a base tensor needs a name and data");
        }
        let limits = &self.config.limits;
        if rows == 0 || cols == 0 || rows > limits.max_dim || cols > limits.max_dim {
            crate::bail!(
                Limit,
                "base tensor `{name}`: shape [{rows}, {cols}] outside 1..={}",
                limits.max_dim
            );
        }
        let mut base = self.base.write();
        if base.host.contains_key(name)
            || base.model.as_ref().is_some_and(|m| m.shape(name).is_some())
        {
            crate::bail!(InvalidArgument, "base tensor `{name}` is already attached");
        }
        base.host.insert(
            name.to_string(),
            HostTensor {
                ptr: data,
                len: rows * cols * dtype.size(),
                dtype,
                rows,
                cols,
            },
        );
        Ok(())
    }

    /// A base tensor as row-major f32 with its shape `(rows, cols)`, for hosts that keep their
    /// own copy of the weights (e.g. to merge accepted adapters).
    pub fn base_tensor_f32(&self, name: &str) -> Result<(usize, usize, Vec<f32>)> {
        let base = self.base.read();
        let t = base.matrix(name)?;
        Ok((t.rows, t.cols, t.to_f32()))
    }

    /// The cache key of a base tensor, found once per gate (the base does not change while it
    /// is attached).
    pub(super) fn key(&self, base: &BaseSet, name: &str, w0: &TensorRef<'_>) -> Key {
        if let Some(k) = self.keys.lock().get(name) {
            return *k;
        }
        let file = base.model.as_ref().and_then(|m| m.identity_of(name));
        let k = self.cache.key(file, name, w0);
        self.keys.lock().insert(name.to_string(), k);
        k
    }
}
