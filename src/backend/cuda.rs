//! CUDA backend: the base matrix's thin SVD (cuBLAS + cuSOLVER, f64) and the SGEMM projections.
//!
//! Everything that can be decided without a device (leading dimensions and transpose flags of each
//! BLAS call, device-memory estimates, budget checks, eigenvalue ordering) lives in small pure
//! functions with unit tests, so that a machine without CUDA still tests them. `probe` never panics
//! without CUDA: it checks that the shared libraries load before cudarc touches them (cudarc panics
//! on a missing library), and catches any panic as a second line of defence.
//!
//! Layout: a row-major `rows×cols` buffer *is* the column-major `cols×rows` matrix `Wᵀ`, and a
//! column-major `n×k` matrix whose columns are vectors *is* our row-major "k vectors of length n"
//! layout. Every call below is phrased that way, so nothing is transposed by copying.

use super::{Backend, BackendKind, Spectrum};
use crate::error::{Error, ErrorKind, Result};
use cudarc::cublas::{sys as blas_sys, CudaBlas};
use cudarc::cusolver::{sys as solver_sys, DnHandle};
use cudarc::driver::{CudaContext, CudaSlice, CudaStream, DevicePtr, DevicePtrMut};
use std::any::Any;
use std::ffi::c_int;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{Arc, Mutex};

/// Device memory kept free beyond our own buffers, for cuBLAS/cuSOLVER internal workspaces.
const LIBRARY_HEADROOM_BYTES: usize = 64 << 20;

/// An opened CUDA device with its cuBLAS and cuSOLVER handles, bound to one stream.
pub struct CudaBackend {
    // Handles first: they are dropped before the stream and context they were created on.
    blas: CudaBlas,
    solver: DnHandle,
    stream: Arc<CudaStream>,
    ctx: Arc<CudaContext>,
    name: String,
    budget: Option<usize>,
    /// One stream and one set of handles: calls from several threads take turns, which also makes
    /// the free-memory check before each call meaningful.
    lock: Mutex<()>,
}

impl CudaBackend {
    /// Opens device `ordinal`. Never panics; any failure is `Err` of kind `Cuda` naming what is
    /// missing. `memory_budget_bytes` caps the device memory one call may use.
    pub fn probe(ordinal: usize, memory_budget_bytes: Option<usize>) -> Result<CudaBackend> {
        match catch_unwind(AssertUnwindSafe(|| {
            Self::probe_inner(ordinal, memory_budget_bytes)
        })) {
            Ok(result) => result,
            Err(payload) => Err(cuda(format!(
                "CUDA probe failed inside cudarc: {}",
                panic_message(payload.as_ref())
            ))),
        }
    }

    fn probe_inner(ordinal: usize, budget: Option<usize>) -> Result<CudaBackend> {
        // cudarc panics the first time it needs a library it cannot load, so look first.
        // SAFETY: each check only tries to dlopen the library and closes it again.
        let libraries = [
            ("libcuda (CUDA driver)", unsafe {
                cudarc::driver::sys::is_culib_present()
            }),
            ("libcublas (cuBLAS)", unsafe {
                cudarc::cublas::sys::is_culib_present()
            }),
            ("libcusolver (cuSOLVER)", unsafe {
                cudarc::cusolver::sys::is_culib_present()
            }),
            ("libcurand (cuRAND)", unsafe {
                cudarc::curand::sys::is_culib_present()
            }),
        ];
        if let Some(message) = missing_libraries_message(&libraries) {
            return Err(cuda(message));
        }

        let count = CudaContext::device_count()
            .map_err(|e| cuda(format!("CUDA driver found but cuInit failed: {e:?}")))?;
        let count = usize::try_from(count).unwrap_or(0);
        if count == 0 {
            return Err(cuda("CUDA driver found but it reports no CUDA device"));
        }
        if ordinal >= count {
            return Err(cuda(format!(
                "CUDA device {ordinal} requested but only {count} device(s) present"
            )));
        }
        let ctx = CudaContext::new(ordinal)
            .map_err(|e| cuda(format!("cannot open CUDA device {ordinal}: {e:?}")))?;
        let stream = ctx
            .new_stream()
            .map_err(|e| cuda(format!("cannot create a CUDA stream: {e:?}")))?;
        let blas = CudaBlas::new(stream.clone())
            .map_err(|e| cuda(format!("cannot create a cuBLAS handle: {e:?}")))?;
        // Default math never uses TF32 for SGEMM/DGEMM (TF32 needs CUBLAS_TF32_TENSOR_OP_MATH);
        // set it explicitly so an inherited handle default cannot change our precision.
        // SAFETY: the handle is valid; the mode is a plain enum.
        unsafe {
            blas_sys::cublasSetMathMode(*blas.handle(), blas_sys::cublasMath_t::CUBLAS_DEFAULT_MATH)
        }
        .result()
        .map_err(|e| cuda(format!("cannot set the cuBLAS math mode: {e:?}")))?;
        let solver = DnHandle::new(stream.clone())
            .map_err(|e| cuda(format!("cannot create a cuSOLVER handle: {e:?}")))?;

        let device = ctx
            .name()
            .unwrap_or_else(|_| format!("CUDA device {ordinal}"));
        let mut version: c_int = 0;
        // SAFETY: writes one int.
        let driver = unsafe { cudarc::driver::sys::cuDriverGetVersion(&mut version) }
            .result()
            .ok()
            .map(|()| format!(" (driver {}.{})", version / 1000, (version % 1000) / 10))
            .unwrap_or_default();

        Ok(CudaBackend {
            blas,
            solver,
            stream,
            ctx,
            name: format!("{device}{driver}"),
            budget,
            lock: Mutex::new(()),
        })
    }

    /// Device name and the CUDA version its driver supports, e.g. "NVIDIA H200 (driver 12.8)".
    pub fn device_name(&self) -> String {
        self.name.clone()
    }

    /// Thin SVD of a row-major f32 `rows×cols` matrix.
    ///
    /// Method: f64 Gram matrix of the smaller side (DSYRK), its eigen-decomposition
    /// (`cusolverDnDsyevd`, ascending, reversed here), the other side's vectors as `Wᵀu` (or `Wv`)
    /// by DGEMM, then made orthonormal by an f64 Householder QR (`geqrf` + `orgqr`) taken in
    /// descending-σ order, with the signs of R's diagonal folded back in. Why this rather than
    /// `gesvd`/`gesvdj`/`Xgesvdp`: it is a handful of calls that run at GEMM speed on the GPU
    /// (for a 4096-square matrix `syevd` should take well under a second, `gesvd` several seconds
    /// and `gesvdj` longer still — expected, not yet timed), and f64 leaves ample room for f32:
    /// * σ: absolute error about √ε₆₄·σ₁ ≈ 1.5e-8·σ₁ in the worst case (tiny σ), far below 1e-5·σ₁;
    /// * U, V: orthonormal to f32 rounding (~1e-7), since one comes from `syevd` and the other
    ///   from QR, never from dividing by σ — so zero or tiny σ are harmless;
    /// * the Gram side's vector i is off by about ε₆₄·σ₁²/(σᵢ²−σⱼ²), i.e. for a relative gap
    ///   of 1e-3 within 1e-4 of |cos| = 1 as long as σᵢ ≳ 1e-5·σ₁; the QR side inherits that.
    ///   Only vectors far down an ill-conditioned spectrum are less accurate than a direct SVD.
    ///
    /// TF32 is off (default math mode, f64 throughout). Device memory: `W` plus the Gram matrix
    /// and the `large×ρ` product, all f64, checked against the budget before allocating.
    pub fn thin_svd(&self, w: &[f32], rows: usize, cols: usize) -> Result<Spectrum> {
        let len = rows
            .checked_mul(cols)
            .ok_or_else(|| limit(format!("thin_svd: {rows}×{cols} overflows")))?;
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
                u: Vec::new(),
                s: Vec::new(),
                v: Vec::new(),
            });
        }
        if w.iter().any(|x| !x.is_finite()) {
            return Err(Error::new(
                ErrorKind::NonFinite,
                format!("thin_svd: the {rows}×{cols} matrix holds NaN or Inf"),
            ));
        }
        let plan = SvdPlan::new(rows, cols)?;
        let need = svd_device_bytes(
            rows,
            cols,
            syevd_workspace_guess(plan.small),
            qr_workspace_guess(plan.small),
        )
        .ok_or_else(|| limit(format!("thin_svd: {rows}×{cols} overflows a size")))?;
        let _turn = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        self.guarded(|| {
            self.check_memory(&format!("thin_svd of {rows}×{cols}"), need)?;
            self.thin_svd_device(w, &plan)
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
        let (bl, xl, ol) = match (k.checked_mul(n), n.checked_mul(r), k.checked_mul(r)) {
            (Some(a), Some(b), Some(c)) => (a, b, c),
            _ => return Err(limit(format!("project: {k}×{n} · {n}×{r} overflows"))),
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
        let cfg = gemm.to_ints()?;
        let need = project_device_bytes(k, n, r)
            .ok_or_else(|| limit(format!("project: {k}×{n} · {n}×{r} overflows a size")))?;
        let _turn = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        self.guarded(|| {
            self.check_memory(&format!("project {k}×{n} · {n}×{r}"), need)?;
            self.bind()?;
            let s = &self.stream;
            let d_basis = s.clone_htod(basis).map_err(drv("upload basis"))?;
            let d_x = s.clone_htod(x).map_err(drv("upload x"))?;
            let mut d_out = s.alloc_zeros::<f32>(ol).map_err(drv("allocate output"))?;
            {
                let (a, _ra) = d_x.device_ptr(s);
                let (b, _rb) = d_basis.device_ptr(s);
                let (c, _rc) = d_out.device_ptr_mut(s);
                let (alpha, beta) = (1.0f32, 0.0f32);
                // SAFETY: sizes come from `project_gemm`, whose bounds the unit tests check.
                unsafe {
                    blas_sys::cublasSgemm_v2(
                        *self.blas.handle(),
                        op(cfg.transa),
                        op(cfg.transb),
                        cfg.m,
                        cfg.n,
                        cfg.k,
                        &alpha,
                        a as *const f32,
                        cfg.lda,
                        b as *const f32,
                        cfg.ldb,
                        &beta,
                        c as *mut f32,
                        cfg.ldc,
                    )
                }
                .result()
                .map_err(blas("SGEMM"))?;
            }
            let out = s.clone_dtoh(&d_out).map_err(drv("download result"))?;
            s.synchronize().map_err(drv("synchronize"))?;
            Ok(out)
        })
    }

    fn thin_svd_device(&self, w: &[f32], plan: &SvdPlan) -> Result<Spectrum> {
        self.bind()?;
        let s = &self.stream;
        let (small, large) = (plan.small, plan.large);
        let h = self.solver.cu();
        let small_i = int(small)?;
        let large_i = int(large)?;

        // Gram matrix of the smaller side in f64, lower triangle (all syevd reads).
        let w64: Vec<f64> = w.iter().map(|&x| f64::from(x)).collect();
        let d_w = s.clone_htod(&w64).map_err(drv("upload W"))?;
        drop(w64);
        // SAFETY (all allocs below): every buffer is fully written by the call that follows.
        let mut d_g = unsafe { s.alloc::<f64>(small * small) }.map_err(drv("allocate Gram"))?;
        let mut d_eig = unsafe { s.alloc::<f64>(small) }.map_err(drv("allocate eigenvalues"))?;
        let mut d_info = s.alloc_zeros::<c_int>(1).map_err(drv("allocate info"))?;
        {
            let g = plan.gram.to_ints()?;
            let (a, _ra) = d_w.device_ptr(s);
            let (c, _rc) = d_g.device_ptr_mut(s);
            let (alpha, beta) = (1.0f64, 0.0f64);
            // SAFETY: dimensions from `SvdPlan`, checked by the unit tests against a host model.
            unsafe {
                blas_sys::cublasDsyrk_v2(
                    *self.blas.handle(),
                    blas_sys::cublasFillMode_t::CUBLAS_FILL_MODE_LOWER,
                    op(g.trans),
                    g.n,
                    g.k,
                    &alpha,
                    a as *const f64,
                    g.lda,
                    &beta,
                    c as *mut f64,
                    g.ldc,
                )
            }
            .result()
            .map_err(blas("DSYRK"))?;
        }

        // Eigen-decomposition of the Gram matrix; eigenvectors overwrite it, as columns.
        let jobz = solver_sys::cusolverEigMode_t::CUSOLVER_EIG_MODE_VECTOR;
        let lower = solver_sys::cublasFillMode_t::CUBLAS_FILL_MODE_LOWER;
        let mut lwork: c_int = 0;
        {
            let (g, _rg) = d_g.device_ptr(s);
            let (e, _re) = d_eig.device_ptr(s);
            // SAFETY: a size query; pointers are valid allocations of the right size.
            unsafe {
                solver_sys::cusolverDnDsyevd_bufferSize(
                    h,
                    jobz,
                    lower,
                    small_i,
                    g as *const f64,
                    small_i,
                    e as *const f64,
                    &mut lwork,
                )
            }
            .result()
            .map_err(solver("syevd_bufferSize"))?;
        }
        let ws_eig = workspace_len(lwork)?;
        self.check_exact(plan, ws_eig, qr_workspace_guess(small))?;
        let mut d_work = unsafe { s.alloc::<f64>(ws_eig.max(1)) }.map_err(drv("allocate work"))?;
        {
            let (g, _rg) = d_g.device_ptr_mut(s);
            let (e, _re) = d_eig.device_ptr_mut(s);
            let (wk, _rw) = d_work.device_ptr_mut(s);
            let (info, _ri) = d_info.device_ptr_mut(s);
            // SAFETY: buffers sized as queried above.
            unsafe {
                solver_sys::cusolverDnDsyevd(
                    h,
                    jobz,
                    lower,
                    small_i,
                    g as *mut f64,
                    small_i,
                    e as *mut f64,
                    wk as *mut f64,
                    lwork,
                    info as *mut c_int,
                )
            }
            .result()
            .map_err(solver("syevd"))?;
        }
        self.check_info(&d_info, "syevd")?;
        drop(d_work);
        let eig = s.clone_dtoh(&d_eig).map_err(drv("download eigenvalues"))?;
        let vecs = s.clone_dtoh(&d_g).map_err(drv("download eigenvectors"))?;
        s.synchronize().map_err(drv("synchronize"))?;
        drop(d_eig);
        let (sigma, mut eig_side) = descending_spectrum(&eig, &vecs, small);
        canonical_signs(&mut eig_side, small);

        // The other side: Y = op(Wᵀ)·E, columns in descending-σ order, then QR.
        s.memcpy_htod(&eig_side, &mut d_g)
            .map_err(drv("upload sorted eigenvectors"))?;
        let mut d_y = unsafe { s.alloc::<f64>(large * small) }.map_err(drv("allocate Y"))?;
        {
            let g = plan.back.to_ints()?;
            let (a, _ra) = d_w.device_ptr(s);
            let (b, _rb) = d_g.device_ptr(s);
            let (c, _rc) = d_y.device_ptr_mut(s);
            let (alpha, beta) = (1.0f64, 0.0f64);
            // SAFETY: dimensions from `SvdPlan`, checked by the unit tests against a host model.
            unsafe {
                blas_sys::cublasDgemm_v2(
                    *self.blas.handle(),
                    op(g.transa),
                    op(g.transb),
                    g.m,
                    g.n,
                    g.k,
                    &alpha,
                    a as *const f64,
                    g.lda,
                    b as *const f64,
                    g.ldb,
                    &beta,
                    c as *mut f64,
                    g.ldc,
                )
            }
            .result()
            .map_err(blas("DGEMM"))?;
        }
        drop(d_w);
        drop(d_g);

        let mut d_tau = unsafe { s.alloc::<f64>(small) }.map_err(drv("allocate tau"))?;
        let mut d_diag = unsafe { s.alloc::<f64>(small) }.map_err(drv("allocate diag"))?;
        let (mut lw_qr, mut lw_org): (c_int, c_int) = (0, 0);
        {
            let (y, _ry) = d_y.device_ptr_mut(s);
            let (t, _rt) = d_tau.device_ptr(s);
            // SAFETY: size queries on valid allocations.
            unsafe {
                solver_sys::cusolverDnDgeqrf_bufferSize(
                    h,
                    large_i,
                    small_i,
                    y as *mut f64,
                    large_i,
                    &mut lw_qr,
                )
            }
            .result()
            .map_err(solver("geqrf_bufferSize"))?;
            unsafe {
                solver_sys::cusolverDnDorgqr_bufferSize(
                    h,
                    large_i,
                    small_i,
                    small_i,
                    y as *const f64,
                    large_i,
                    t as *const f64,
                    &mut lw_org,
                )
            }
            .result()
            .map_err(solver("orgqr_bufferSize"))?;
        }
        let ws_qr = workspace_len(lw_qr)?.max(workspace_len(lw_org)?);
        self.check_exact(plan, ws_eig, ws_qr)?;
        let lw = int(ws_qr.max(1))?;
        let mut d_work = unsafe { s.alloc::<f64>(ws_qr.max(1)) }.map_err(drv("allocate work"))?;
        {
            let (y, _ry) = d_y.device_ptr_mut(s);
            let (t, _rt) = d_tau.device_ptr_mut(s);
            let (wk, _rw) = d_work.device_ptr_mut(s);
            let (info, _ri) = d_info.device_ptr_mut(s);
            // SAFETY: buffers sized as queried above.
            unsafe {
                solver_sys::cusolverDnDgeqrf(
                    h,
                    large_i,
                    small_i,
                    y as *mut f64,
                    large_i,
                    t as *mut f64,
                    wk as *mut f64,
                    lw,
                    info as *mut c_int,
                )
            }
            .result()
            .map_err(solver("geqrf"))?;
        }
        self.check_info(&d_info, "geqrf")?;
        {
            // R's diagonal sits at stride ld+1; orgqr overwrites it, so copy it out first.
            let (y, _ry) = d_y.device_ptr(s);
            let (d, _rd) = d_diag.device_ptr_mut(s);
            // SAFETY: `small` elements at stride large+1 stay inside the large×small buffer.
            unsafe {
                blas_sys::cublasDcopy_v2(
                    *self.blas.handle(),
                    small_i,
                    y as *const f64,
                    int(plan.diag_stride)?,
                    d as *mut f64,
                    1,
                )
            }
            .result()
            .map_err(blas("DCOPY"))?;
        }
        {
            let (y, _ry) = d_y.device_ptr_mut(s);
            let (t, _rt) = d_tau.device_ptr(s);
            let (wk, _rw) = d_work.device_ptr_mut(s);
            let (info, _ri) = d_info.device_ptr_mut(s);
            // SAFETY: buffers sized as queried above.
            unsafe {
                solver_sys::cusolverDnDorgqr(
                    h,
                    large_i,
                    small_i,
                    small_i,
                    y as *mut f64,
                    large_i,
                    t as *const f64,
                    wk as *mut f64,
                    lw,
                    info as *mut c_int,
                )
            }
            .result()
            .map_err(solver("orgqr"))?;
        }
        self.check_info(&d_info, "orgqr")?;
        let mut qr_side = s.clone_dtoh(&d_y).map_err(drv("download Q"))?;
        let diag = s.clone_dtoh(&d_diag).map_err(drv("download R diagonal"))?;
        s.synchronize().map_err(drv("synchronize"))?;
        apply_r_signs(&mut qr_side, &diag, large);

        let to32 = |v: Vec<f64>| v.into_iter().map(|x| x as f32).collect::<Vec<f32>>();
        let (u, v) = if plan.eig_side_is_u {
            (to32(eig_side), to32(qr_side))
        } else {
            (to32(qr_side), to32(eig_side))
        };
        Ok(Spectrum {
            rows: plan.rows,
            cols: plan.cols,
            u,
            s: sigma.into_iter().map(|x| x as f32).collect(),
            v,
        })
    }

    /// Runs device work with the context current on this thread, turning a stray panic inside
    /// cudarc (its `Drop`s unwrap) into an error instead of unwinding through the caller.
    fn guarded<T>(&self, f: impl FnOnce() -> Result<T>) -> Result<T> {
        match catch_unwind(AssertUnwindSafe(f)) {
            Ok(r) => r,
            Err(p) => Err(cuda(format!(
                "CUDA call panicked: {}",
                panic_message(p.as_ref())
            ))),
        }
    }

    fn bind(&self) -> Result<()> {
        self.ctx
            .bind_to_thread()
            .map_err(drv("bind the CUDA context"))
    }

    fn check_memory(&self, what: &str, need: usize) -> Result<()> {
        self.bind()?;
        let free = self.ctx.mem_get_info().ok().map(|(free, _total)| free);
        check_device_memory(what, need, self.budget, free)
    }

    /// Re-checks with the workspace sizes cuSOLVER actually asked for.
    fn check_exact(&self, plan: &SvdPlan, ws_eig: usize, ws_qr: usize) -> Result<()> {
        let what = format!("thin_svd of {}×{}", plan.rows, plan.cols);
        let need = svd_device_bytes(plan.rows, plan.cols, ws_eig, ws_qr)
            .ok_or_else(|| limit(format!("{what}: workspace size overflows")))?;
        check_device_memory(&what, need, self.budget, None)
    }

    fn check_info(&self, d_info: &CudaSlice<c_int>, what: &str) -> Result<()> {
        let info = self
            .stream
            .clone_dtoh(d_info)
            .map_err(drv("download info"))?;
        self.stream.synchronize().map_err(drv("synchronize"))?;
        match info.first() {
            Some(0) => Ok(()),
            Some(&i) if i > 0 => Err(Error::new(
                ErrorKind::Internal,
                format!("cuSOLVER {what} did not converge (info = {i})"),
            )),
            other => Err(Error::new(
                ErrorKind::Internal,
                format!("cuSOLVER {what} rejected argument (info = {other:?})"),
            )),
        }
    }
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
}

// ---------------------------------------------------------------------------------------------
// Errors

fn cuda(message: impl Into<String>) -> Error {
    Error::new(ErrorKind::Cuda, message)
}

fn limit(message: impl Into<String>) -> Error {
    Error::new(ErrorKind::Limit, message)
}

fn drv<E: std::fmt::Debug>(what: &'static str) -> impl Fn(E) -> Error {
    move |e| cuda(format!("CUDA driver: {what} failed: {e:?}"))
}

fn blas<E: std::fmt::Debug>(what: &'static str) -> impl Fn(E) -> Error {
    move |e| cuda(format!("cuBLAS {what} failed: {e:?}"))
}

fn solver<E: std::fmt::Debug>(what: &'static str) -> impl Fn(E) -> Error {
    move |e| cuda(format!("cuSOLVER {what} failed: {e:?}"))
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

/// `None` when every library is present, else one message naming each missing one.
fn missing_libraries_message(libraries: &[(&str, bool)]) -> Option<String> {
    let missing: Vec<&str> = libraries
        .iter()
        .filter(|(_, present)| !present)
        .map(|(name, _)| *name)
        .collect();
    if missing.is_empty() {
        return None;
    }
    Some(format!(
        "CUDA unavailable: cannot load {} (install the NVIDIA driver / CUDA 12 runtime \
         libraries or add them to LD_LIBRARY_PATH)",
        missing.join(", ")
    ))
}

// ---------------------------------------------------------------------------------------------
// BLAS call shapes (column-major, as cuBLAS sees them)

fn int(x: usize) -> Result<c_int> {
    c_int::try_from(x)
        .map_err(|_| limit(format!("dimension {x} exceeds what cuBLAS/cuSOLVER take")))
}

fn op(trans: bool) -> blas_sys::cublasOperation_t {
    if trans {
        blas_sys::cublasOperation_t::CUBLAS_OP_T
    } else {
        blas_sys::cublasOperation_t::CUBLAS_OP_N
    }
}

fn workspace_len(lwork: c_int) -> Result<usize> {
    usize::try_from(lwork).map_err(|_| cuda(format!("cuSOLVER asked for a workspace of {lwork}")))
}

/// `C(m×n) = op(A)·op(B)`, all column-major, as passed to cublas?gemm.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct GemmShape<T> {
    transa: bool,
    transb: bool,
    m: T,
    n: T,
    k: T,
    lda: T,
    ldb: T,
    ldc: T,
}

impl GemmShape<usize> {
    fn to_ints(self) -> Result<GemmShape<c_int>> {
        Ok(GemmShape {
            transa: self.transa,
            transb: self.transb,
            m: int(self.m)?,
            n: int(self.n)?,
            k: int(self.k)?,
            lda: int(self.lda)?,
            ldb: int(self.ldb)?,
            ldc: int(self.ldc)?,
        })
    }
}

/// `C(n×n) = op(A)·op(A)ᵀ` (lower triangle), as passed to cublas?syrk; `trans` means op(A) = Aᵀ.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct SyrkShape<T> {
    trans: bool,
    n: T,
    k: T,
    lda: T,
    ldc: T,
}

impl SyrkShape<usize> {
    fn to_ints(self) -> Result<SyrkShape<c_int>> {
        Ok(SyrkShape {
            trans: self.trans,
            n: int(self.n)?,
            k: int(self.k)?,
            lda: int(self.lda)?,
            ldc: int(self.ldc)?,
        })
    }
}

/// `out(k×r, row-major) = basis(k×n, row-major) · x(n×r, row-major)`. In column-major terms the
/// buffers are `xᵀ` (r×n, ld r), `basisᵀ` (n×k, ld n) and `outᵀ` (r×k, ld r), and
/// `outᵀ = xᵀ·basisᵀ` needs no transpose flag at all.
fn project_gemm(k: usize, n: usize, r: usize) -> GemmShape<usize> {
    GemmShape {
        transa: false,
        transb: false,
        m: r,
        n: k,
        k: n,
        lda: r,
        ldb: n,
        ldc: r,
    }
}

/// Every shape the thin SVD needs. `A` below is the uploaded buffer read column-major: `Wᵀ`,
/// cols×rows with ld = cols.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct SvdPlan {
    rows: usize,
    cols: usize,
    /// ρ = min(rows, cols): the side whose Gram matrix is decomposed.
    small: usize,
    large: usize,
    /// rows ≤ cols: G = W·Wᵀ = AᵀA and its eigenvectors are U; else G = WᵀW = AAᵀ, eigenvectors V.
    eig_side_is_u: bool,
    gram: SyrkShape<usize>,
    /// Y (large×ρ, ld large) = op(A)·E with E the ρ×ρ eigenvectors (descending): Wᵀ·U or W·V.
    back: GemmShape<usize>,
    /// Stride between R's diagonal entries in the geqrf output (ld + 1).
    diag_stride: usize,
}

impl SvdPlan {
    fn new(rows: usize, cols: usize) -> Result<Self> {
        let eig_side_is_u = rows <= cols;
        let (small, large) = if eig_side_is_u {
            (rows, cols)
        } else {
            (cols, rows)
        };
        let plan = SvdPlan {
            rows,
            cols,
            small,
            large,
            eig_side_is_u,
            gram: SyrkShape {
                // W·Wᵀ = AᵀA (A is k×n = cols×rows) needs op = T; WᵀW = AAᵀ needs op = N.
                trans: eig_side_is_u,
                n: small,
                k: large,
                lda: cols,
                ldc: small,
            },
            back: GemmShape {
                // Wᵀ·U = A·U (no transpose); W·V = Aᵀ·V.
                transa: !eig_side_is_u,
                transb: false,
                m: large,
                n: small,
                k: small,
                lda: cols,
                ldb: small,
                ldc: large,
            },
            diag_stride: large + 1,
        };
        // Fail early (and without a device) on sizes the 32-bit cuBLAS/cuSOLVER API cannot take.
        plan.gram.to_ints()?;
        plan.back.to_ints()?;
        int(plan.diag_stride)?;
        int(small
            .checked_mul(small)
            .ok_or_else(|| limit("thin_svd: ρ² overflows"))?)?;
        Ok(plan)
    }
}

// ---------------------------------------------------------------------------------------------
// Device-memory estimates and checks

/// LAPACK's dsyevd workspace for vectors, 1 + 6n + 2n² doubles; cuSOLVER's actual size is
/// queried later and re-checked.
fn syevd_workspace_guess(n: usize) -> usize {
    n.saturating_mul(n)
        .saturating_mul(2)
        .saturating_add(n.saturating_mul(6))
        .saturating_add(1)
}

/// geqrf/orgqr use a blocked panel of about 64 columns' worth of n.
fn qr_workspace_guess(n: usize) -> usize {
    n.saturating_mul(64)
}

/// Peak device bytes of `thin_svd`, over its three phases (f64 everywhere, `ws_*` in doubles):
/// Gram + eigen: W, G, λ, syevd workspace; back-multiply: W, G, λ, Y; QR: Y, τ, diag, workspace.
fn svd_device_bytes(rows: usize, cols: usize, ws_eig: usize, ws_qr: usize) -> Option<usize> {
    let small = rows.min(cols);
    let large = rows.max(cols);
    let f = |elems: usize| elems.checked_mul(8);
    let w = f(rows.checked_mul(cols)?)?;
    let g = f(small.checked_mul(small)?)?;
    let vec = f(small)?;
    let y = f(large.checked_mul(small)?)?;
    let info = 256; // one int, at allocation granularity
    let eig_phase = w
        .checked_add(g)?
        .checked_add(vec)?
        .checked_add(f(ws_eig)?)?
        .checked_add(info)?;
    let back_phase = w.checked_add(g)?.checked_add(vec)?.checked_add(y)?;
    let qr_phase = y
        .checked_add(vec.checked_mul(2)?)?
        .checked_add(f(ws_qr)?)?
        .checked_add(info)?;
    Some(eig_phase.max(back_phase).max(qr_phase))
}

/// Device bytes of `project`: basis, x and the result in f32.
fn project_device_bytes(k: usize, n: usize, r: usize) -> Option<usize> {
    k.checked_mul(n)?
        .checked_add(n.checked_mul(r)?)?
        .checked_add(k.checked_mul(r)?)?
        .checked_mul(4)
}

fn mib(bytes: usize) -> String {
    format!("{:.1}", bytes as f64 / (1u64 << 20) as f64)
}

/// Err(Cuda) when `need` exceeds the budget, or (with headroom for the libraries) the free memory.
fn check_device_memory(
    what: &str,
    need: usize,
    budget: Option<usize>,
    free: Option<usize>,
) -> Result<()> {
    if let Some(budget) = budget {
        if need > budget {
            return Err(cuda(format!(
                "{what} needs {} MiB of GPU memory, budget {} MiB",
                mib(need),
                mib(budget)
            )));
        }
    }
    if let Some(free) = free {
        if need
            .checked_add(LIBRARY_HEADROOM_BYTES)
            .is_none_or(|total| total > free)
        {
            return Err(cuda(format!(
                "{what} needs {} MiB of GPU memory (+{} MiB for cuBLAS/cuSOLVER), only {} MiB free",
                mib(need),
                mib(LIBRARY_HEADROOM_BYTES),
                mib(free)
            )));
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Host-side post-processing

/// From syevd's ascending eigenvalues and column-major eigenvectors (n×n), σ descending with
/// negative round-off eigenvalues clamped to 0 (a PSD Gram matrix has none), and the vectors in the
/// same order, each contiguous (= rows of a row-major n×n).
fn descending_spectrum(eig_asc: &[f64], vecs_colmajor: &[f64], n: usize) -> (Vec<f64>, Vec<f64>) {
    let mut sigma = Vec::with_capacity(n);
    let mut vecs = Vec::with_capacity(n * n);
    for j in (0..n).rev() {
        let lambda = eig_asc[j];
        sigma.push(if lambda > 0.0 { lambda.sqrt() } else { 0.0 });
        vecs.extend_from_slice(&vecs_colmajor[j * n..(j + 1) * n]);
    }
    (sigma, vecs)
}

/// Makes each length-n vector's largest-magnitude entry positive, so results do not depend on
/// the solver's arbitrary sign. The other side follows through Y = op(A)·E and QR.
fn canonical_signs(vecs: &mut [f64], n: usize) {
    for v in vecs.chunks_exact_mut(n) {
        let big = v
            .iter()
            .copied()
            .fold(0.0f64, |m, x| if x.abs() > m.abs() { x } else { m });
        if big < 0.0 {
            v.iter_mut().for_each(|x| *x = -*x);
        }
    }
}

/// Q's column j from orgqr has R[j][j]'s sign divided out; put it back so column j points along
/// op(A)·e_j (i.e. σⱼ·uⱼ or σⱼ·vⱼ). Columns are contiguous, length `len`.
fn apply_r_signs(q: &mut [f64], r_diag: &[f64], len: usize) {
    for (col, &d) in q.chunks_exact_mut(len).zip(r_diag) {
        if d < 0.0 {
            col.iter_mut().for_each(|x| *x = -*x);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;

    // --- host models of the BLAS calls, exactly as the reference BLAS defines them ---

    fn at(m: &[f64], ld: usize, i: usize, j: usize) -> f64 {
        m[i + j * ld]
    }

    fn host_gemm(s: &GemmShape<usize>, a: &[f64], b: &[f64]) -> Vec<f64> {
        let mut c = vec![0.0; s.ldc * s.n];
        for j in 0..s.n {
            for i in 0..s.m {
                let mut acc = 0.0;
                for p in 0..s.k {
                    let x = if s.transa {
                        at(a, s.lda, p, i)
                    } else {
                        at(a, s.lda, i, p)
                    };
                    let y = if s.transb {
                        at(b, s.ldb, j, p)
                    } else {
                        at(b, s.ldb, p, j)
                    };
                    acc += x * y;
                }
                c[i + j * s.ldc] = acc;
            }
        }
        c
    }

    fn host_syrk_lower(s: &SyrkShape<usize>, a: &[f64]) -> Vec<f64> {
        let mut c = vec![f64::NAN; s.ldc * s.n];
        for j in 0..s.n {
            for i in j..s.n {
                let mut acc = 0.0;
                for p in 0..s.k {
                    acc += if s.trans {
                        at(a, s.lda, p, i) * at(a, s.lda, p, j)
                    } else {
                        at(a, s.lda, i, p) * at(a, s.lda, j, p)
                    };
                }
                c[i + j * s.ldc] = acc;
            }
        }
        c
    }

    /// Index bound a column-major operand of `rows×cols` with leading dimension `ld` touches.
    fn extent(rows: usize, cols: usize, ld: usize) -> usize {
        (cols - 1) * ld + rows
    }

    fn rng(seed: u64) -> impl FnMut() -> f64 {
        let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        move || {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0
        }
    }

    fn random(len: usize, seed: u64) -> Vec<f64> {
        let mut r = rng(seed);
        (0..len).map(|_| r()).collect()
    }

    #[test]
    fn svd_plan_gram_matches_row_major_products() {
        for &(rows, cols) in &[(3, 5), (5, 3), (4, 4), (1, 6), (6, 1)] {
            let plan = SvdPlan::new(rows, cols).unwrap();
            let w = random(rows * cols, (rows * 31 + cols) as u64);
            let g = &plan.gram;
            assert!(g.lda >= if g.trans { g.k } else { g.n }, "lda too small");
            assert!(
                extent(
                    if g.trans { g.k } else { g.n },
                    if g.trans { g.n } else { g.k },
                    g.lda
                ) <= w.len()
            );
            let c = host_syrk_lower(g, &w);
            let s = plan.small;
            for i in 0..s {
                for j in 0..=i {
                    // Row-major reference: W·Wᵀ when rows ≤ cols, else Wᵀ·W.
                    let want: f64 = if plan.eig_side_is_u {
                        (0..cols).map(|t| w[i * cols + t] * w[j * cols + t]).sum()
                    } else {
                        (0..rows).map(|t| w[t * cols + i] * w[t * cols + j]).sum()
                    };
                    assert!(
                        (c[i + j * s] - want).abs() < 1e-12,
                        "{rows}×{cols} G[{i},{j}]"
                    );
                }
            }
        }
    }

    #[test]
    fn svd_plan_back_multiply_matches_row_major_products() {
        for &(rows, cols) in &[(3, 5), (5, 3), (4, 4), (1, 6), (6, 1)] {
            let plan = SvdPlan::new(rows, cols).unwrap();
            let (s, l) = (plan.small, plan.large);
            let w = random(rows * cols, 7 + rows as u64);
            // E: s vectors of length s, contiguous (what descending_spectrum produces).
            let e = random(s * s, 11 + cols as u64);
            let b = &plan.back;
            assert_eq!((b.m, b.n, b.ldc), (l, s, l));
            let (ar, ac) = if b.transa { (b.k, b.m) } else { (b.m, b.k) };
            assert!(b.lda >= ar && extent(ar, ac, b.lda) <= w.len());
            assert!(b.ldb >= b.k && extent(b.k, b.n, b.ldb) <= e.len());
            let y = host_gemm(b, &w, &e);
            for j in 0..s {
                for t in 0..l {
                    // Column j of Y = Wᵀ·e_j (length cols) or W·e_j (length rows).
                    let want: f64 = if plan.eig_side_is_u {
                        (0..rows).map(|i| w[i * cols + t] * e[j * s + i]).sum()
                    } else {
                        (0..cols).map(|i| w[t * cols + i] * e[j * s + i]).sum()
                    };
                    assert!(
                        (y[t + j * l] - want).abs() < 1e-12,
                        "{rows}×{cols} Y[{t},{j}]"
                    );
                }
            }
            assert_eq!(plan.diag_stride, l + 1);
            assert!(
                (s - 1) * plan.diag_stride < l * s,
                "diagonal stays inside Y"
            );
        }
    }

    #[test]
    fn project_gemm_matches_naive_triple_loop() {
        for &(k, n, r) in &[(3, 4, 2), (1, 5, 1), (4, 1, 3), (2, 3, 5)] {
            let basis = random(k * n, 3);
            let x = random(n * r, 5);
            let g = project_gemm(k, n, r);
            assert!(!g.transa && !g.transb);
            assert!(g.lda >= g.m && extent(g.m, g.k, g.lda) <= x.len());
            assert!(g.ldb >= g.k && extent(g.k, g.n, g.ldb) <= basis.len());
            let out = host_gemm(&g, &x, &basis);
            assert_eq!(out.len(), k * r);
            for i in 0..k {
                for j in 0..r {
                    let want: f64 = (0..n).map(|t| basis[i * n + t] * x[t * r + j]).sum();
                    assert!((out[i * r + j] - want).abs() < 1e-12);
                }
            }
        }
    }

    #[test]
    fn oversized_dimensions_are_a_limit_error_before_any_device_work() {
        let e = SvdPlan::new(3_000_000_000, 2).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Limit);
        assert!(project_gemm(1 << 31, 2, 2).to_ints().is_err());
        assert!(
            SvdPlan::new(50_000, 50_000).is_err(),
            "ρ² = 2.5e9 overflows c_int"
        );
    }

    #[test]
    fn device_byte_estimates_are_exact_and_overflow_checked() {
        // 300×200: W 480000, G 320000, λ 1600, Y 480000 bytes.
        let (w, g, v, y) = (300 * 200 * 8, 200 * 200 * 8, 200 * 8, 300 * 200 * 8);
        let eig = w + g + v + 1000 * 8 + 256;
        let back = w + g + v + y;
        let qr = y + 2 * v + 10 * 8 + 256;
        assert_eq!(
            svd_device_bytes(300, 200, 1000, 10),
            Some(eig.max(back).max(qr))
        );
        assert_eq!(
            svd_device_bytes(200, 300, 1000, 10),
            svd_device_bytes(300, 200, 1000, 10)
        );
        assert_eq!(svd_device_bytes(usize::MAX, 2, 0, 0), None);
        assert_eq!(svd_device_bytes(4, 4, usize::MAX, 0), None);
        assert_eq!(project_device_bytes(2, 3, 4), Some(4 * (6 + 12 + 8)));
        assert_eq!(project_device_bytes(usize::MAX, 2, 1), None);
        assert_eq!(project_device_bytes(1 << 62, 1, 1), None);
        assert_eq!(syevd_workspace_guess(10), 1 + 60 + 200);
        assert_eq!(syevd_workspace_guess(usize::MAX), usize::MAX);
    }

    #[test]
    fn memory_checks_name_need_and_budget() {
        let mb = 1 << 20;
        assert!(check_device_memory("x", 10 * mb, Some(10 * mb), None).is_ok());
        let e = check_device_memory("thin_svd of 4×4", 12 * mb + mb / 2, Some(8 * mb), None)
            .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Cuda);
        assert_eq!(
            e.message(),
            "thin_svd of 4×4 needs 12.5 MiB of GPU memory, budget 8.0 MiB"
        );
        let e = check_device_memory("p", 10 * mb, None, Some(70 * mb)).unwrap_err();
        assert!(
            e.message().contains("only 70.0 MiB free"),
            "{}",
            e.message()
        );
        assert!(check_device_memory("p", 10 * mb, None, Some(80 * mb)).is_ok());
        assert!(check_device_memory("p", usize::MAX, None, Some(usize::MAX)).is_err());
    }

    #[test]
    fn eigenvalues_reverse_and_clamp() {
        // n = 3, column j of the eigenvector matrix is [j, j, j] + [0, 10, 20].
        let vecs = vec![0.0, 10.0, 20.0, 1.0, 11.0, 21.0, 2.0, 12.0, 22.0];
        let (s, v) = descending_spectrum(&[-1e-18, 4.0, 9.0], &vecs, 3);
        assert_eq!(s, vec![3.0, 2.0, 0.0]);
        assert_eq!(v, vec![2.0, 12.0, 22.0, 1.0, 11.0, 21.0, 0.0, 10.0, 20.0]);
        let (s, _) = descending_spectrum(&[-0.0, 0.0], &[1.0, 0.0, 0.0, 1.0], 2);
        assert_eq!(s, vec![0.0, 0.0]);
    }

    #[test]
    fn signs_are_canonical_and_follow_r() {
        let mut v = vec![0.1, -0.9, 0.3, 0.5, 0.2, -0.1];
        canonical_signs(&mut v, 3);
        assert_eq!(v, vec![-0.1, 0.9, -0.3, 0.5, 0.2, -0.1]);
        let mut q = vec![1.0, 2.0, 3.0, 4.0];
        apply_r_signs(&mut q, &[-2.0, 0.0], 2);
        assert_eq!(q, vec![-1.0, -2.0, 3.0, 4.0]);
    }

    #[test]
    fn missing_library_message_lists_each_one() {
        assert_eq!(missing_libraries_message(&[("a", true), ("b", true)]), None);
        let m = missing_libraries_message(&[
            ("libcuda (CUDA driver)", false),
            ("libcusolver (cuSOLVER)", true),
            ("libcublas (cuBLAS)", false),
        ])
        .unwrap();
        assert!(
            m.contains("libcuda (CUDA driver), libcublas (cuBLAS)"),
            "{m}"
        );
        let boxed: Box<dyn Any + Send> = Box::new(String::from("boom"));
        assert_eq!(panic_message(boxed.as_ref()), "boom");
    }

    thread_local!(static PANICKED_HERE: Cell<bool> = const { Cell::new(false) });

    #[test]
    fn probe_without_cuda_is_a_clean_error() {
        // Record panics on this thread (a caught one still runs the hook and prints).
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            PANICKED_HERE.with(|p| p.set(true));
            previous(info)
        }));
        let result = CudaBackend::probe(0, None);
        assert!(
            !PANICKED_HERE.with(Cell::get),
            "probe panicked (and printed it)"
        );
        // SAFETY: only tries to dlopen.
        if unsafe { cudarc::driver::sys::is_culib_present() } {
            if let Err(e) = result {
                assert_eq!(e.kind(), ErrorKind::Cuda);
            }
            let e = CudaBackend::probe(1 << 20, None)
                .err()
                .expect("no machine has 2^20 GPUs");
            assert_eq!(e.kind(), ErrorKind::Cuda);
            assert!(!PANICKED_HERE.with(Cell::get));
            return;
        }
        let e = result.err().expect("probe cannot succeed without libcuda");
        assert_eq!(e.kind(), ErrorKind::Cuda);
        assert!(e.message().contains("libcuda"), "{}", e.message());
    }

    #[test]
    fn backend_is_send_and_sync() {
        fn check<T: Send + Sync>() {}
        check::<CudaBackend>();
    }

    // --- device tests: pass with a note where no CUDA device can be opened ---

    fn device() -> Option<CudaBackend> {
        match CudaBackend::probe(0, None) {
            Ok(b) => Some(b),
            Err(e) => {
                println!("skipped: no CUDA device ({})", e.message());
                None
            }
        }
    }

    /// A random rows×cols matrix of exactly rank `rank` (row-major).
    fn low_rank(rows: usize, cols: usize, rank: usize) -> Vec<f32> {
        let a = random32(rows * rank, 1);
        let b = random32(rank * cols, 2);
        (0..rows * cols)
            .map(|ij| {
                (0..rank)
                    .map(|t| a[(ij / cols) * rank + t] * b[t * cols + ij % cols])
                    .sum()
            })
            .collect()
    }

    fn random32(len: usize, seed: u64) -> Vec<f32> {
        random(len, seed).into_iter().map(|x| x as f32).collect()
    }

    /// Symmetric eigen-decomposition by cyclic Jacobi, f64: (eigenvalues, column-major vectors).
    fn host_jacobi(mut a: Vec<f64>, n: usize) -> (Vec<f64>, Vec<f64>) {
        let mut v = vec![0.0; n * n];
        (0..n).for_each(|i| v[i * n + i] = 1.0);
        let frob2: f64 = a.iter().map(|x| x * x).sum();
        for _sweep in 0..60 {
            let off: f64 = (0..n)
                .flat_map(|j| (0..n).filter(move |&i| i != j).map(move |i| (i, j)))
                .map(|(i, j)| a[i + j * n].powi(2))
                .sum();
            if off <= 1e-30 * frob2 {
                break;
            }
            for p in 0..n {
                for q in p + 1..n {
                    let apq = a[p + q * n];
                    if apq.abs() < 1e-300 {
                        continue;
                    }
                    let theta = (a[q + q * n] - a[p + p * n]) / (2.0 * apq);
                    let t = theta.signum() / (theta.abs() + (theta * theta + 1.0).sqrt());
                    let t = if theta == 0.0 { 1.0 } else { t };
                    let c = 1.0 / (t * t + 1.0).sqrt();
                    let s = t * c;
                    for k in 0..n {
                        let (akp, akq) = (a[k + p * n], a[k + q * n]);
                        a[k + p * n] = c * akp - s * akq;
                        a[k + q * n] = s * akp + c * akq;
                    }
                    for k in 0..n {
                        let (apk, aqk) = (a[p + k * n], a[q + k * n]);
                        a[p + k * n] = c * apk - s * aqk;
                        a[q + k * n] = s * apk + c * aqk;
                    }
                    for k in 0..n {
                        let (vkp, vkq) = (v[k + p * n], v[k + q * n]);
                        v[k + p * n] = c * vkp - s * vkq;
                        v[k + q * n] = s * vkp + c * vkq;
                    }
                }
            }
        }
        ((0..n).map(|i| a[i + i * n]).collect(), v)
    }

    /// Host reference: σ descending and left singular vectors (rows) from W·Wᵀ by Jacobi in f64.
    fn host_left_svd(w: &[f32], rows: usize, cols: usize) -> (Vec<f64>, Vec<Vec<f64>>) {
        let mut g = vec![0.0; rows * rows];
        for i in 0..rows {
            for j in 0..rows {
                g[i + j * rows] = (0..cols)
                    .map(|t| f64::from(w[i * cols + t]) * f64::from(w[j * cols + t]))
                    .sum();
            }
        }
        let (lam, vecs) = host_jacobi(g, rows);
        let mut order: Vec<usize> = (0..rows).collect();
        order.sort_by(|&a, &b| lam[b].total_cmp(&lam[a]));
        let rho = rows.min(cols);
        let s = order[..rho]
            .iter()
            .map(|&i| lam[i].max(0.0).sqrt())
            .collect();
        let u = order[..rho]
            .iter()
            .map(|&i| vecs[i * rows..(i + 1) * rows].to_vec())
            .collect();
        (s, u)
    }

    fn check_spectrum(sp: &Spectrum, w: &[f32], rows: usize, cols: usize) {
        let rho = rows.min(cols);
        assert_eq!((sp.rows, sp.cols), (rows, cols));
        assert_eq!(
            (sp.u.len(), sp.s.len(), sp.v.len()),
            (rho * rows, rho, rho * cols)
        );
        assert!(sp.s.windows(2).all(|p| p[0] >= p[1]), "σ not descending");
        let mut err2 = 0.0f64;
        let mut norm2 = 0.0f64;
        for i in 0..rows {
            for j in 0..cols {
                let rec: f64 = (0..rho)
                    .map(|t| {
                        f64::from(sp.u[t * rows + i])
                            * f64::from(sp.s[t])
                            * f64::from(sp.v[t * cols + j])
                    })
                    .sum();
                let x = f64::from(w[i * cols + j]);
                err2 += (x - rec).powi(2);
                norm2 += x * x;
            }
        }
        let rel = (err2 / norm2.max(f64::MIN_POSITIVE)).sqrt();
        assert!(rel < 1e-5, "reconstruction error {rel:e}");
        for (name, m, len) in [("U", &sp.u, rows), ("V", &sp.v, cols)] {
            let mut worst = 0.0f64;
            for a in 0..rho {
                for b in 0..=a {
                    let dot: f64 = (0..len)
                        .map(|t| f64::from(m[a * len + t]) * f64::from(m[b * len + t]))
                        .sum();
                    worst = worst.max((dot - if a == b { 1.0 } else { 0.0 }).abs());
                }
            }
            assert!(worst < 1e-5, "{name} orthonormality {worst:e}");
        }
    }

    fn check_against_host(sp: &Spectrum, w: &[f32], rows: usize, cols: usize) {
        let (s_ref, u_ref) = host_left_svd(w, rows, cols);
        let s1 = s_ref[0];
        for (i, (&a, &b)) in sp.s.iter().zip(&s_ref).enumerate() {
            assert!((f64::from(a) - b).abs() <= 1e-5 * s1, "σ{i}: {a} vs {b}");
        }
        for i in 0..s_ref.len() {
            let gap = [i.checked_sub(1), Some(i + 1)]
                .into_iter()
                .flatten()
                .filter_map(|j| s_ref.get(j))
                .map(|&sj| (s_ref[i] - sj).abs() / s_ref[i].max(f64::MIN_POSITIVE))
                .fold(f64::INFINITY, f64::min);
            if gap <= 1e-3 || s_ref[i] < 1e-3 * s1 {
                continue;
            }
            let cos: f64 = (0..rows)
                .map(|t| f64::from(sp.u[i * rows + t]) * u_ref[i][t])
                .sum();
            assert!(cos.abs() > 1.0 - 1e-4, "u{i}: |cos| = {}", cos.abs());
        }
    }

    /// geqrf + orgqr as LAPACK defines them (R's diagonal is −sign(x₀)·‖x‖, so it can be negative):
    /// returns (Q as contiguous columns, R's diagonal).
    fn host_geqrf_orgqr(mut a: Vec<f64>, m: usize, n: usize) -> (Vec<f64>, Vec<f64>) {
        let mut vs = Vec::with_capacity(n);
        let mut diag = Vec::with_capacity(n);
        for j in 0..n {
            let x: Vec<f64> = (j..m).map(|i| a[i + j * m]).collect();
            let norm = x.iter().map(|t| t * t).sum::<f64>().sqrt();
            if norm == 0.0 {
                vs.push((vec![0.0; m - j], 0.0));
                diag.push(0.0);
                continue;
            }
            let beta = -x[0].signum() * norm;
            let mut v: Vec<f64> = x.iter().map(|t| t / (x[0] - beta)).collect();
            v[0] = 1.0;
            let tau = (beta - x[0]) / beta;
            for c in j..n {
                let dot: f64 = (0..m - j).map(|i| v[i] * a[j + i + c * m]).sum();
                (0..m - j).for_each(|i| a[j + i + c * m] -= tau * v[i] * dot);
            }
            diag.push(beta);
            vs.push((v, tau));
        }
        let mut q = vec![0.0; m * n];
        (0..n).for_each(|j| q[j + j * m] = 1.0);
        for (j, (v, tau)) in vs.iter().enumerate().rev() {
            for c in 0..n {
                let dot: f64 = (0..m - j).map(|i| v[i] * q[j + i + c * m]).sum();
                (0..m - j).for_each(|i| q[j + i + c * m] -= tau * v[i] * dot);
            }
        }
        (q, diag)
    }

    /// The device pipeline with each cuBLAS/cuSOLVER call replaced by its host model: checks the
    /// plan, orderings and sign handling end to end without a GPU.
    fn host_pipeline(w: &[f32], rows: usize, cols: usize) -> Spectrum {
        let plan = SvdPlan::new(rows, cols).unwrap();
        let (s, l) = (plan.small, plan.large);
        let w64: Vec<f64> = w.iter().map(|&x| f64::from(x)).collect();
        let mut g = host_syrk_lower(&plan.gram, &w64);
        for j in 0..s {
            for i in 0..j {
                g[i + j * s] = g[j + i * s];
            }
        }
        // syevd's contract: eigenvalues ascending, vectors as columns in the same order.
        let (lam, vecs) = host_jacobi(g, s);
        let mut order: Vec<usize> = (0..s).collect();
        order.sort_by(|&a, &b| lam[a].total_cmp(&lam[b]));
        let eig: Vec<f64> = order.iter().map(|&i| lam[i]).collect();
        let cols_sorted: Vec<f64> = order
            .iter()
            .flat_map(|&i| vecs[i * s..(i + 1) * s].to_vec())
            .collect();
        let (sigma, mut e) = descending_spectrum(&eig, &cols_sorted, s);
        canonical_signs(&mut e, s);
        let y = host_gemm(&plan.back, &w64, &e);
        let (mut q, diag) = host_geqrf_orgqr(y, l, s);
        apply_r_signs(&mut q, &diag, l);
        let to32 = |v: Vec<f64>| v.into_iter().map(|x| x as f32).collect::<Vec<f32>>();
        let (u, v) = if plan.eig_side_is_u { (e, q) } else { (q, e) };
        Spectrum {
            rows,
            cols,
            u: to32(u),
            s: to32(sigma),
            v: to32(v),
        }
    }

    #[test]
    fn host_model_of_the_pipeline_is_an_svd() {
        for &(rows, cols) in &[(30, 20), (20, 30), (1, 7), (7, 1), (16, 16)] {
            let w = random32(rows * cols, (rows * 1000 + cols) as u64);
            let sp = host_pipeline(&w, rows, cols);
            check_spectrum(&sp, &w, rows, cols);
            check_against_host(&sp, &w, rows, cols);
        }
        // Rank 3 in 12×25 and its transpose: the zero-σ side must still be orthonormal.
        let (rows, cols, rank) = (12, 25, 3);
        let w = low_rank(rows, cols, rank);
        for (r, c, m) in [
            (rows, cols, w.clone()),
            (cols, rows, transpose(&w, rows, cols)),
        ] {
            let sp = host_pipeline(&m, r, c);
            check_spectrum(&sp, &m, r, c);
            assert!(sp.s[rank] < 1e-5 * sp.s[0]);
        }
    }

    #[test]
    fn device_thin_svd_random_wide_and_tall() {
        let Some(dev) = device() else { return };
        println!("device: {}", dev.device_name());
        for &(rows, cols) in &[(300, 200), (200, 300), (1, 7), (7, 1), (64, 64)] {
            let w = random32(rows * cols, (rows * 1000 + cols) as u64);
            let sp = dev.thin_svd(&w, rows, cols).unwrap();
            check_spectrum(&sp, &w, rows, cols);
            check_against_host(&sp, &w, rows, cols);
        }
    }

    #[test]
    fn device_thin_svd_rank_deficient_and_graded() {
        let Some(dev) = device() else { return };
        // Rank 5 in a 40×90: thirty-five zero σ, whose vectors must still come out orthonormal.
        let (rows, cols, rank) = (40, 90, 5);
        let w = low_rank(rows, cols, rank);
        for (r, c, m) in [
            (rows, cols, w.clone()),
            (cols, rows, transpose(&w, rows, cols)),
        ] {
            let sp = dev.thin_svd(&m, r, c).unwrap();
            check_spectrum(&sp, &m, r, c);
            assert!(
                sp.s[rank] < 1e-5 * sp.s[0],
                "σ after the rank: {}",
                sp.s[rank]
            );
        }
        // Columns scaled over six decades: an ill-conditioned but full-rank matrix.
        let (rows, cols) = (120, 80);
        let mut w = random32(rows * cols, 9);
        for (ij, x) in w.iter_mut().enumerate() {
            *x *= 10f32.powf(-6.0 * (ij % cols) as f32 / cols as f32);
        }
        let sp = dev.thin_svd(&w, rows, cols).unwrap();
        check_spectrum(&sp, &w, rows, cols);
        let zero = dev.thin_svd(&[0.0; 12], 3, 4).unwrap();
        check_spectrum_zero(&zero);
    }

    fn check_spectrum_zero(sp: &Spectrum) {
        assert!(sp.s.iter().all(|&s| s == 0.0));
        assert!(sp.u.iter().chain(&sp.v).all(|x| x.is_finite()));
    }

    fn transpose(w: &[f32], rows: usize, cols: usize) -> Vec<f32> {
        (0..rows * cols)
            .map(|ij| w[(ij % rows) * cols + ij / rows])
            .collect()
    }

    #[test]
    fn device_project_matches_triple_loop() {
        let Some(dev) = device() else { return };
        for &(k, n, r) in &[(16, 300, 8), (1, 1, 1), (200, 64, 3), (5, 0, 4), (0, 3, 2)] {
            let basis = random32(k * n, 21);
            let x = random32(n * r, 22);
            let out = dev.project(&basis, k, n, &x, r).unwrap();
            assert_eq!(out.len(), k * r);
            for i in 0..k {
                for j in 0..r {
                    let want: f64 = (0..n)
                        .map(|t| f64::from(basis[i * n + t]) * f64::from(x[t * r + j]))
                        .sum();
                    let scale: f64 = (0..n)
                        .map(|t| (f64::from(basis[i * n + t]) * f64::from(x[t * r + j])).abs())
                        .sum();
                    assert!((f64::from(out[i * r + j]) - want).abs() <= 1e-5 * scale.max(1e-30));
                }
            }
        }
    }

    #[test]
    fn device_budget_is_enforced_before_allocating() {
        let Some(_) = device() else { return };
        let dev = CudaBackend::probe(0, Some(1 << 20)).unwrap();
        let w = vec![1.0f32; 600 * 500];
        let e = dev.thin_svd(&w, 600, 500).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Cuda);
        assert!(e.message().contains("budget 1.0 MiB"), "{}", e.message());
        let e = dev.project(&w, 600, 500, &w[..500 * 100], 100).unwrap_err();
        assert!(e.message().contains("budget"), "{}", e.message());
    }
}
