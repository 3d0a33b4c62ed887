//! Compute backends for the two heavy operations: the base matrix's thin SVD and the projections
//! of adapter factors onto a base's singular vectors. Everything else is small and runs on the CPU.

pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod sketch;

use crate::error::Result;
use crate::floats::Floats;
use crate::tensor::TensorRef;
use std::sync::Arc;

/// Thin SVD `W = U Σ Vᵀ` of a rows×cols matrix, ρ = min(rows, cols). Singular vectors are stored as
/// rows: `u` is ρ×rows row-major (row i is u_i), `v` is ρ×cols row-major, `s` descending. The
/// vectors are shared (cloning is cheap) and, read from the disk cache, used in place.
#[derive(Debug, Clone, PartialEq)]
pub struct Spectrum {
    pub rows: usize,
    pub cols: usize,
    pub u: Floats,
    pub s: Vec<f32>,
    pub v: Floats,
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
    /// The randomized top-k solve of `op` on this backend's device, when it has one: `None`
    /// means "run the CPU solver" (the CPU backend, and the CUDA backend for an operator too
    /// small for the Krylov block, which the CPU solver handles densely).
    fn randomized_top_k(
        &self,
        _op: &DeviceOperator<'_>,
        _params: &TopKParams,
    ) -> Result<Option<DeviceTopK>> {
        Ok(None)
    }
    /// The rank-revealing sketch of `op` (dense terms only: `W' − W0`) on this backend's device,
    /// when it has one: `None` means "run the CPU sketch". It takes the CPU sketch's decisions
    /// ([`sketch::SketchRule`]) on the device's numbers.
    fn low_rank_sketch(
        &self,
        _op: &DeviceOperator<'_>,
        _params: &SketchParams,
    ) -> Result<Option<DeviceSketch>> {
        Ok(None)
    }
}

/// An operator in a form a device can hold: `W' = diag(d) · (Σ cᵢ·Mᵢ + s·B·A)`, so one shape
/// covers a dense fine-tuned matrix (`W'`), the difference from the base (`W' − W0`, for the
/// merged-LoRA rank sketch), `W0 + s·B·A`, and DoRA's row-rescaled form (`d` = m / ‖W0 + s·B·A‖
/// per row). Stored dtypes stay as they are until the upload.
pub struct DeviceOperator<'a> {
    pub rows: usize,
    pub cols: usize,
    /// Dense rows×cols terms with their coefficients.
    pub dense: Vec<(f64, TensorRef<'a>)>,
    pub low_rank: Option<LowRankTerm<'a>>,
    /// Per-row factor `d` (length rows), applied to every term.
    pub row_scale: Option<&'a [f64]>,
}

/// `scale · B · A` with B rows×r and A r×cols, row-major f64.
pub struct LowRankTerm<'a> {
    pub b: &'a [f64],
    pub a: &'a [f64],
    pub rank: usize,
    pub scale: f64,
}

/// Settings of the device solve (the CPU solver's `RandomizedParams`, plus k).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TopKParams {
    pub k: usize,
    pub oversampling: usize,
    /// Both residuals of every returned triplet ≤ tol·σ₁.
    pub tol: f64,
    pub max_basis: usize,
    pub seed: u64,
}

/// The top k triplets from a device solve, descending: `x` holds k vectors of length rows
/// (contiguous, i.e. a column-major rows×k matrix), `y` k vectors of length cols, with both
/// residuals of each as checked by explicit products (`‖W'y − σx‖`, `‖W'ᵀx − σy‖`).
#[derive(Debug, Clone, PartialEq)]
pub struct DeviceTopK {
    pub sigma: Vec<f64>,
    pub x: Vec<f64>,
    pub y: Vec<f64>,
    pub left_residuals: Vec<f64>,
    pub right_residuals: Vec<f64>,
    /// Krylov basis columns when it stopped.
    pub basis: usize,
    /// False when the basis reached its cap (or the explicit check failed) first: the caller
    /// runs the dense fallback and names it in the report.
    pub converged: bool,
}

/// Settings of the rank-revealing sketch (the CPU sketch's `LowRankParams`, plus the norm of
/// the operator and the two tolerances of its decisions).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SketchParams {
    /// `‖op‖_F`.
    pub frobenius: f64,
    /// The largest `‖op − L·Rᵀ‖_F` accepted.
    pub threshold: f64,
    /// Singular values of the sketch up to this are noise, and dropped (within the threshold).
    pub floor: f64,
    pub max_rank: usize,
    pub first_block: usize,
    pub oversampling: usize,
    /// Round `i` sketches with `seed + i`.
    pub seed: u64,
}

/// What the sketch decided.
#[derive(Debug, Clone, PartialEq)]
pub enum DeviceSketch {
    /// `op ≈ L·Rᵀ`: `left` holds `rank` orthonormal vectors of length rows (contiguous, i.e. a
    /// column-major rows×rank matrix), `right` `rank` vectors of length cols, descending in
    /// their norms (the revealed singular values); `residual` is `‖op − L·Rᵀ‖_F`.
    LowRank {
        left: Vec<f64>,
        right: Vec<f64>,
        rank: usize,
        residual: f64,
    },
    /// More than `max_rank` directions needed: `sketched` columns used before deciding, and
    /// `‖(I − QQᵀ)op‖_F` of the last sketch.
    NotLowRank { sketched: usize, residual: f64 },
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
