//! Typed safe wrappers over the cuBLAS calls the backend makes, one per call. Each takes the
//! column-major shape from `plan` and device buffers, checks that every operand lies inside its
//! buffer, and only then calls the library: the one `unsafe` block per call relies on that check.

use super::device::Device;
use super::error::fits;
use super::error::{blas, CudaError};
use super::plan::{int, GemmShape, SyrkShape};
use cudarc::cublas::sys as blas_sys;
use cudarc::driver::{DevicePtr, DevicePtrMut};
use std::ffi::c_int;

fn op(trans: bool) -> blas_sys::cublasOperation_t {
    if trans {
        blas_sys::cublasOperation_t::CUBLAS_OP_T
    } else {
        blas_sys::cublasOperation_t::CUBLAS_OP_N
    }
}

/// The element types cuBLAS has a GEMM for here: f32 (`project`) and f64 (the solvers).
pub trait GemmScalar: cudarc::driver::DeviceRepr + Copy {
    const NAME: &'static str;
    /// # Safety
    /// The raw cublas?gemm_v2 contract: pointers valid for the extents of the shape.
    #[allow(clippy::too_many_arguments)]
    unsafe fn raw(
        handle: blas_sys::cublasHandle_t,
        ta: blas_sys::cublasOperation_t,
        tb: blas_sys::cublasOperation_t,
        m: c_int,
        n: c_int,
        k: c_int,
        alpha: &Self,
        a: *const Self,
        lda: c_int,
        b: *const Self,
        ldb: c_int,
        beta: &Self,
        c: *mut Self,
        ldc: c_int,
    ) -> blas_sys::cublasStatus_t;
}

/// `impl GemmScalar` for one element type and its cuBLAS routine.
macro_rules! gemm_scalar {
    ($t:ty, $name:literal, $routine:ident) => {
        impl GemmScalar for $t {
            const NAME: &'static str = $name;
            unsafe fn raw(
                h: blas_sys::cublasHandle_t,
                ta: blas_sys::cublasOperation_t,
                tb: blas_sys::cublasOperation_t,
                m: c_int,
                n: c_int,
                k: c_int,
                alpha: &$t,
                a: *const $t,
                lda: c_int,
                b: *const $t,
                ldb: c_int,
                beta: &$t,
                c: *mut $t,
                ldc: c_int,
            ) -> blas_sys::cublasStatus_t {
                blas_sys::$routine(h, ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc)
            }
        }
    };
}

gemm_scalar!(f32, "SGEMM", cublasSgemm_v2);
gemm_scalar!(f64, "DGEMM", cublasDgemm_v2);

impl Device {
    /// Default math mode: no TF32 (that needs CUBLAS_TF32_TENSOR_OP_MATH) for SGEMM, plain f64
    /// for DGEMM. Set explicitly so an inherited handle default cannot change our precision.
    pub fn set_default_math(&self) -> Result<(), CudaError> {
        // SAFETY: the handle is live for `self`; the mode is a plain enum.
        unsafe {
            blas_sys::cublasSetMathMode(
                *self.blas.handle(),
                blas_sys::cublasMath_t::CUBLAS_DEFAULT_MATH,
            )
        }
        .result()
        .map_err(CudaError::MathMode)
    }

    /// `C = α·op(A)·op(B) + β·C`.
    pub fn gemm<T: GemmScalar>(
        &self,
        s: &GemmShape,
        alpha: T,
        a: &impl DevicePtr<T>,
        b: &impl DevicePtr<T>,
        beta: T,
        c: &mut impl DevicePtrMut<T>,
    ) -> Result<(), CudaError> {
        let [ea, eb, ec] = s.extents();
        fits(T::NAME, "A", ea, a.len())?;
        fits(T::NAME, "B", eb, b.len())?;
        fits(T::NAME, "C", ec, c.len())?;
        if !s.lds_fit() {
            return Err(CudaError::Operand {
                call: T::NAME,
                operand: "leading dimension",
                need: s.m.max(s.k),
                len: s.lda.min(s.ldb).min(s.ldc),
            });
        }
        let (m, n, k) = (int(s.m)?, int(s.n)?, int(s.k)?);
        let (lda, ldb, ldc) = (int(s.lda)?, int(s.ldb)?, int(s.ldc)?);
        let st = &self.stream;
        let (pa, _ra) = a.device_ptr(st);
        let (pb, _rb) = b.device_ptr(st);
        let (pc, _rc) = c.device_ptr_mut(st);
        // SAFETY: every operand's extent was checked against its buffer above, the leading
        // dimensions cover their rows, and C cannot alias A or B (it is borrowed mutably).
        unsafe {
            T::raw(
                *self.blas.handle(),
                op(s.transa),
                op(s.transb),
                m,
                n,
                k,
                &alpha,
                pa as *const T,
                lda,
                pb as *const T,
                ldb,
                &beta,
                pc as *mut T,
                ldc,
            )
        }
        .result()
        .map_err(blas(T::NAME))
    }

    /// Lower triangle of `C = op(A)·op(A)ᵀ`, f64.
    pub fn syrk_lower(
        &self,
        s: &SyrkShape,
        a: &impl DevicePtr<f64>,
        c: &mut impl DevicePtrMut<f64>,
    ) -> Result<(), CudaError> {
        let [ea, ec] = s.extents();
        fits("DSYRK", "A", ea, a.len())?;
        fits("DSYRK", "C", ec, c.len())?;
        let rows_a = if s.trans { s.k } else { s.n };
        fits("DSYRK", "lda", rows_a.max(1), s.lda)?;
        fits("DSYRK", "ldc", s.n.max(1), s.ldc)?;
        let (n, k, lda, ldc) = (int(s.n)?, int(s.k)?, int(s.lda)?, int(s.ldc)?);
        let st = &self.stream;
        let (pa, _ra) = a.device_ptr(st);
        let (pc, _rc) = c.device_ptr_mut(st);
        let (alpha, beta) = (1.0f64, 0.0f64);
        // SAFETY: operand extents and leading dimensions checked above; C is a separate buffer.
        unsafe {
            blas_sys::cublasDsyrk_v2(
                *self.blas.handle(),
                blas_sys::cublasFillMode_t::CUBLAS_FILL_MODE_LOWER,
                op(s.trans),
                n,
                k,
                &alpha,
                pa as *const f64,
                lda,
                &beta,
                pc as *mut f64,
                ldc,
            )
        }
        .result()
        .map_err(blas("DSYRK"))
    }

    /// `y[i] = x[i·stride]` for i < n, f64 (a matrix diagonal is stride ld + 1).
    pub fn copy_strided(
        &self,
        n: usize,
        x: &impl DevicePtr<f64>,
        stride: usize,
        y: &mut impl DevicePtrMut<f64>,
    ) -> Result<(), CudaError> {
        fits("DCOPY", "x", super::plan::extent(1, n, stride), x.len())?;
        fits("DCOPY", "y", n, y.len())?;
        let (n, incx) = (int(n)?, int(stride.max(1))?);
        let st = &self.stream;
        let (px, _rx) = x.device_ptr(st);
        let (py, _ry) = y.device_ptr_mut(st);
        // SAFETY: n elements at `stride` lie inside x and n contiguous ones inside y (checked).
        unsafe {
            blas_sys::cublasDcopy_v2(
                *self.blas.handle(),
                n,
                px as *const f64,
                incx,
                py as *mut f64,
                1,
            )
        }
        .result()
        .map_err(blas("DCOPY"))
    }
}
