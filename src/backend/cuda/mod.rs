//! CUDA backend: the base matrix's thin SVD (cuBLAS + cuSOLVER, f64), the SGEMM projections, the
//! randomized top-k solver and the rank-revealing sketch of `W' − W0` (cuRAND sketches, cuBLAS,
//! cuSOLVER QR and eigensolver, f64).
//!
//! * `plan` — shapes, operand extents and device-memory sizes, decided without a device;
//! * `blas`, `solver`, `rand` — one typed safe wrapper per library call;
//! * `device` — the opened device (context, stream, handles);
//! * `budgeted` — the [`engine::Engine`] operations built from the wrappers, under a gate's budget;
//! * `svd`, `randomized`, `sketch` — the algorithms, written against `Engine`, so the tests run the same
//!   code on host models of every call (`host`);
//! * `error` — [`CudaError`], with the cudarc status as its source.
//!
//! `probe` never panics without CUDA: it checks that the shared libraries load before cudarc
//! touches them (cudarc panics on a missing library), and catches any panic as a second line of
//! defence. The probe's outcome and the opened devices are process-wide: every gate shares one
//! context, stream and set of handles per device.

mod blas;
mod budgeted;
mod device;
mod engine;
pub mod error;
#[cfg(test)]
mod host;
mod plan;
mod rand;
mod randomized;
mod sketch;
mod solver;
mod svd;

pub use error::CudaError;

use super::{
    Backend, BackendKind, DeviceOperator, DeviceSketch, DeviceTopK, SketchParams, Spectrum,
    TopKParams,
};
use crate::error::{Error, ErrorKind, Result};
use budgeted::Budgeted;
use device::Device;
use once_cell::sync::Lazy;
use parking_lot::Mutex;
use plan::{check_device_memory, project_device_bytes, project_gemm, SvdPlan};
use std::any::Any;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;

/// The process's CUDA probe: libraries present, driver initialised, how many devices. Decided
/// once (dlopen and cuInit are process-wide anyway).
static DEVICE_COUNT: Lazy<std::result::Result<usize, CudaError>> = Lazy::new(|| {
    catch_unwind(count_devices)
        .unwrap_or_else(|p| Err(CudaError::ProbePanicked(panic_message(p.as_ref()))))
});

/// Devices opened so far, by ordinal.
type Opened = Vec<(usize, Arc<Device>)>;
static OPENED: Lazy<Mutex<Opened>> = Lazy::new(|| Mutex::new(Vec::new()));

fn count_devices() -> std::result::Result<usize, CudaError> {
    // cudarc panics the first time it needs a library it cannot load, so look first. The driver
    // alone first: without it no device can be used, whatever else is installed, and each check
    // tries every candidate name along the loader path (the three toolkit ones cost ~1.5 ms of
    // every process start on a host without CUDA, a twentieth of a one-shot scan).
    // SAFETY: each check only tries to dlopen the library and closes it again.
    if !unsafe { cudarc::driver::sys::is_culib_present() } {
        return Err(CudaError::MissingLibraries(vec!["libcuda (CUDA driver)"]));
    }
    // SAFETY: as above.
    let libraries = unsafe {
        [
            (
                "libcublas (cuBLAS)",
                cudarc::cublas::sys::is_culib_present(),
            ),
            (
                "libcusolver (cuSOLVER)",
                cudarc::cusolver::sys::is_culib_present(),
            ),
            (
                "libcurand (cuRAND)",
                cudarc::curand::sys::is_culib_present(),
            ),
        ]
    };
    if let Some(missing) = missing_libraries(&libraries) {
        return Err(missing);
    }
    let count = cudarc::driver::CudaContext::device_count().map_err(CudaError::Init)?;
    match usize::try_from(count).unwrap_or(0) {
        0 => Err(CudaError::NoDevice),
        n => Ok(n),
    }
}

/// An opened CUDA device (shared) with this gate's memory budget.
pub struct CudaBackend {
    dev: Arc<Device>,
    budget: Option<usize>,
}

impl CudaBackend {
    /// Opens device `ordinal`. Never panics; any failure is `Err` of kind `Cuda` naming what is
    /// missing. `memory_budget_bytes` caps the device memory one call may use.
    pub fn probe(ordinal: usize, memory_budget_bytes: Option<usize>) -> Result<CudaBackend> {
        let dev = catch_unwind(|| open(ordinal))
            .unwrap_or_else(|p| Err(CudaError::ProbePanicked(panic_message(p.as_ref()))))?;
        Ok(CudaBackend {
            dev,
            budget: memory_budget_bytes,
        })
    }

    /// Device name and the CUDA version its driver supports, e.g. "NVIDIA H200 (driver 12.8)".
    pub fn device_name(&self) -> String {
        self.dev.name.clone()
    }

    fn engine(&self) -> Budgeted<'_> {
        Budgeted {
            dev: &self.dev,
            budget: self.budget,
        }
    }

    /// Thin SVD of a row-major f32 `rows×cols` matrix (see `svd` for the method and its
    /// accuracy). TF32 is off (default math mode, f64 throughout). Device memory: `W` plus the
    /// Gram matrix and the `large×ρ` product, all f64, checked against the budget first.
    pub fn thin_svd(&self, w: &[f32], rows: usize, cols: usize) -> Result<Spectrum> {
        let len = rows.checked_mul(cols).ok_or_else(|| {
            Error::new(
                ErrorKind::Limit,
                format!("thin_svd: {rows}×{cols} overflows"),
            )
        })?;
        if w.len() != len {
            return Err(Error::new(
                ErrorKind::Internal,
                format!("thin_svd: {} values for a {rows}×{cols} matrix", w.len()),
            ));
        }
        if len == 0 {
            return Ok(Spectrum {
                rows,
                cols,
                u: Vec::new().into(),
                s: Vec::new(),
                v: Vec::new().into(),
            });
        }
        if w.iter().any(|x| !x.is_finite()) {
            return Err(Error::new(
                ErrorKind::NonFinite,
                format!("thin_svd: the {rows}×{cols} matrix holds NaN or Inf"),
            ));
        }
        let plan = SvdPlan::new(rows, cols)?;
        self.guarded(|| {
            let _turn = self.dev.turn()?;
            Ok(svd::thin_svd(&self.engine(), w, &plan)?)
        })
    }

    /// `basis · x` for a k×n row-major basis (rows are vectors) and an n×r row-major x; returns a
    /// k×r row-major result. SGEMM with f32 accumulation, TF32 off.
    pub fn project(
        &self,
        basis: &[f32],
        k: usize,
        n: usize,
        x: &[f32],
        r: usize,
    ) -> Result<Vec<f32>> {
        let limit = || {
            Error::new(
                ErrorKind::Limit,
                format!("project: {k}×{n} · {n}×{r} overflows"),
            )
        };
        let (bl, xl, ol) = match (k.checked_mul(n), n.checked_mul(r), k.checked_mul(r)) {
            (Some(a), Some(b), Some(c)) => (a, b, c),
            _ => return Err(limit()),
        };
        if basis.len() != bl || x.len() != xl {
            return Err(Error::new(
                ErrorKind::Internal,
                format!("project: shapes {k}×{n} · {n}×{r} do not fit the buffers"),
            ));
        }
        if ol == 0 || n == 0 {
            return Ok(vec![0.0; ol]);
        }
        let gemm = project_gemm(k, n, r);
        for d in [gemm.m, gemm.n, gemm.k] {
            plan::int(d)?;
        }
        let need = project_device_bytes(k, n, r).ok_or_else(|| {
            Error::new(
                ErrorKind::Limit,
                format!("project: {k}×{n} · {n}×{r} overflows a size"),
            )
        })?;
        self.guarded(|| {
            let _turn = self.dev.turn()?;
            let what = format!("project {k}×{n} · {n}×{r}");
            check_device_memory(&what, need, self.budget, self.dev.free_memory())?;
            let s = &self.dev.stream;
            let up = error::driver("upload");
            let d_basis = s.clone_htod(basis).map_err(&up)?;
            let d_x = s.clone_htod(x).map_err(&up)?;
            let mut d_out = s
                .alloc_zeros::<f32>(ol)
                .map_err(error::driver("allocate output"))?;
            self.dev
                .gemm(&gemm, 1.0f32, &d_x, &d_basis, 0.0, &mut d_out)?;
            let out = s
                .clone_dtoh(&d_out)
                .map_err(error::driver("download result"))?;
            self.dev.synchronize()?;
            Ok(out)
        })
    }

    /// Runs device work, turning a stray panic inside cudarc (its `Drop`s unwrap) into an error
    /// instead of unwinding through the caller.
    fn guarded<T>(&self, f: impl FnOnce() -> Result<T>) -> Result<T> {
        match catch_unwind(AssertUnwindSafe(f)) {
            Ok(r) => r,
            Err(p) => Err(CudaError::Panicked(panic_message(p.as_ref())).into()),
        }
    }
}

/// The shared device `ordinal`, opened on first use.
fn open(ordinal: usize) -> std::result::Result<Arc<Device>, CudaError> {
    let count = DEVICE_COUNT.clone()?;
    if ordinal >= count {
        return Err(CudaError::NoSuchDevice { ordinal, count });
    }
    let mut opened = OPENED.lock();
    if let Some((_, dev)) = opened.iter().find(|(o, _)| *o == ordinal) {
        return Ok(dev.clone());
    }
    let dev = Arc::new(Device::open(ordinal)?);
    opened.push((ordinal, dev.clone()));
    Ok(dev)
}

impl Backend for CudaBackend {
    fn kind(&self) -> BackendKind {
        BackendKind::Cuda
    }
    fn device(&self) -> String {
        self.device_name()
    }
    fn thin_svd(&self, w: &[f32], rows: usize, cols: usize) -> Result<Spectrum> {
        CudaBackend::thin_svd(self, w, rows, cols)
    }
    fn project(&self, basis: &[f32], k: usize, n: usize, x: &[f32], r: usize) -> Result<Vec<f32>> {
        CudaBackend::project(self, basis, k, n, x, r)
    }
    /// cuRAND Philox sketch, cuBLAS DGEMM (default math: no TF32), cuSOLVER QR and syevd; the
    /// operator uploaded once, converted to f64 on the host (see `randomized`).
    fn randomized_top_k(
        &self,
        op: &DeviceOperator<'_>,
        params: &TopKParams,
    ) -> Result<Option<DeviceTopK>> {
        self.guarded(|| {
            let _turn = self.dev.turn()?;
            Ok(randomized::top_k(&self.engine(), op, params)?)
        })
    }
    /// cuRAND Philox sketches, cuBLAS DGEMM, cuSOLVER QR and syevd, on `W' − W0` uploaded once
    /// as one f64 matrix (see `sketch`).
    fn low_rank_sketch(
        &self,
        op: &DeviceOperator<'_>,
        params: &SketchParams,
    ) -> Result<Option<DeviceSketch>> {
        self.guarded(|| {
            let _turn = self.dev.turn()?;
            Ok(Some(sketch::low_rank(&self.engine(), op, params)?))
        })
    }
}

/// The device algorithms run on the host models of every CUDA call (the CPU backend's projection
/// for the rest): lets tests outside this module drive the device code path end to end.
#[cfg(test)]
pub(crate) struct HostModelBackend;

#[cfg(test)]
impl Backend for HostModelBackend {
    fn kind(&self) -> BackendKind {
        BackendKind::Cuda
    }
    fn device(&self) -> String {
        "host models of the CUDA calls".into()
    }
    fn thin_svd(&self, w: &[f32], rows: usize, cols: usize) -> Result<Spectrum> {
        let plan = SvdPlan::new(rows, cols)?;
        Ok(svd::thin_svd(&host::HostEngine::default(), w, &plan)?)
    }
    fn project(&self, basis: &[f32], k: usize, n: usize, x: &[f32], r: usize) -> Result<Vec<f32>> {
        super::cpu::CpuBackend.project(basis, k, n, x, r)
    }
    fn randomized_top_k(
        &self,
        op: &DeviceOperator<'_>,
        params: &TopKParams,
    ) -> Result<Option<DeviceTopK>> {
        Ok(randomized::top_k(&host::HostEngine::default(), op, params)?)
    }
    fn low_rank_sketch(
        &self,
        op: &DeviceOperator<'_>,
        params: &SketchParams,
    ) -> Result<Option<DeviceSketch>> {
        Ok(Some(sketch::low_rank(
            &host::HostEngine::default(),
            op,
            params,
        )?))
    }
}

fn panic_message(payload: &(dyn Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "unknown panic".to_string()
    }
}

/// `None` when every library is present, else one error naming each missing one.
fn missing_libraries(libraries: &[(&'static str, bool)]) -> Option<CudaError> {
    let missing: Vec<&'static str> = libraries
        .iter()
        .filter(|(_, present)| !present)
        .map(|(name, _)| *name)
        .collect();
    (!missing.is_empty()).then_some(CudaError::MissingLibraries(missing))
}

#[cfg(test)]
mod tests;
