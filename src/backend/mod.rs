//! Compute backends for the two heavy operations: the base matrix's thin SVD and the projections
//! of adapter factors onto a base's singular vectors. Everything else is small and runs on the CPU.

pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;

use crate::error::Result;
use std::sync::Arc;

/// Thin SVD `W = U Σ Vᵀ` of a rows×cols matrix, ρ = min(rows, cols). Singular vectors are stored as
/// rows: `u` is ρ×rows row-major (row i is u_i), `v` is ρ×cols row-major, `s` descending.
#[derive(Debug, Clone, PartialEq)]
pub struct Spectrum {
    pub rows: usize,
    pub cols: usize,
    pub u: Vec<f32>,
    pub s: Vec<f32>,
    pub v: Vec<f32>,
}

impl Spectrum {
    pub fn rank(&self) -> usize {
        self.s.len()
    }
    pub fn bytes(&self) -> usize {
        4 * (self.u.len() + self.s.len() + self.v.len())
    }
}

/// What the screening needs from a device. Implementations must be thread-safe.
pub trait Backend: Send + Sync {
    fn kind(&self) -> BackendKind;
    /// Human-readable device description for reports and metrics.
    fn device(&self) -> String;
    /// Thin SVD of a row-major f32 matrix.
    fn thin_svd(&self, w: &[f32], rows: usize, cols: usize) -> Result<Spectrum>;
    /// `basis · x` for a k×n row-major basis and an n×r row-major x; k×r row-major.
    fn project(&self, basis: &[f32], k: usize, n: usize, x: &[f32], r: usize) -> Result<Vec<f32>>;
}

/// Which backend to use; `Auto` picks CUDA when a device can be opened, else the CPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendChoice {
    #[default]
    Auto,
    Cpu,
    Cuda,
}

/// Which backend ran a screening: the report's `backend` and the metrics' `backend` label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendKind {
    Cpu,
    Cuda,
}

impl BackendKind {
    pub fn label(self) -> &'static str {
        match self {
            BackendKind::Cpu => "cpu",
            BackendKind::Cuda => "cuda",
        }
    }
}

/// The chosen backend and, when `Auto` fell back to the CPU, why.
pub struct Selected {
    pub backend: Arc<dyn Backend>,
    pub fallback_reason: Option<String>,
}

/// Opens the requested backend. `Cuda` without a usable device is an error; `Auto` falls back.
pub fn select(choice: BackendChoice, gpu_memory_bytes: Option<usize>) -> Result<Selected> {
    let cpu = || -> Arc<dyn Backend> { Arc::new(cpu::CpuBackend) };
    match choice {
        BackendChoice::Cpu => Ok(Selected {
            backend: cpu(),
            fallback_reason: None,
        }),
        BackendChoice::Cuda => Ok(Selected {
            backend: open_cuda(gpu_memory_bytes)?,
            fallback_reason: None,
        }),
        BackendChoice::Auto => match open_cuda(gpu_memory_bytes) {
            Ok(backend) => Ok(Selected {
                backend,
                fallback_reason: None,
            }),
            Err(e) => Ok(Selected {
                backend: cpu(),
                fallback_reason: Some(e.message().to_string()),
            }),
        },
    }
}

#[cfg(feature = "cuda")]
fn open_cuda(gpu_memory_bytes: Option<usize>) -> Result<Arc<dyn Backend>> {
    Ok(Arc::new(cuda::CudaBackend::probe(0, gpu_memory_bytes)?))
}

#[cfg(not(feature = "cuda"))]
fn open_cuda(_gpu_memory_bytes: Option<usize>) -> Result<Arc<dyn Backend>> {
    crate::bail!(
        Cuda,
        "this build has no CUDA support (cargo feature `cuda` is off)"
    )
}
