//! Typed safe wrappers over the cuSOLVER dense calls, one per call (each size query is its own
//! call). Every wrapper checks its operands against their buffers before the one `unsafe` block;
//! a call's `info` lands in a device int that [`Device::check_info`] reads back.

use super::device::Device;
use super::error::fits;
use super::error::{solver, CudaError};
use super::plan::{extent, int};
use cudarc::cusolver::sys as solver_sys;
use cudarc::driver::{CudaSlice, DevicePtr, DevicePtrMut};
use std::ffi::c_int;

fn fill(upper: bool) -> solver_sys::cublasFillMode_t {
    if upper {
        solver_sys::cublasFillMode_t::CUBLAS_FILL_MODE_UPPER
    } else {
        solver_sys::cublasFillMode_t::CUBLAS_FILL_MODE_LOWER
    }
}

const VECTORS: solver_sys::cusolverEigMode_t =
    solver_sys::cusolverEigMode_t::CUSOLVER_EIG_MODE_VECTOR;

fn workspace_len(lwork: c_int) -> Result<usize, CudaError> {
    usize::try_from(lwork).map_err(|_| CudaError::Workspace(lwork))
}

/// The symmetric n×n matrix (leading dimension `ld`, triangle `upper` or lower) of a syevd call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sym {
    pub n: usize,
    pub ld: usize,
    pub upper: bool,
}

impl Device {
    /// Workspace (doubles) `syevd` needs for `sym` with eigenvectors.
    pub fn syevd_buffer_size(
        &self,
        sym: Sym,
        a: &impl DevicePtr<f64>,
        w: &impl DevicePtr<f64>,
    ) -> Result<usize, CudaError> {
        fits(
            "syevd_bufferSize",
            "A",
            extent(sym.n, sym.n, sym.ld),
            a.len(),
        )?;
        fits("syevd_bufferSize", "W", sym.n, w.len())?;
        let (n, ld) = (int(sym.n)?, int(sym.ld.max(1))?);
        let st = &self.stream;
        let (pa, _ra) = a.device_ptr(st);
        let (pw, _rw) = w.device_ptr(st);
        let mut lwork: c_int = 0;
        // SAFETY: a size query reading nothing beyond the checked extents; writes one int.
        unsafe {
            solver_sys::cusolverDnDsyevd_bufferSize(
                self.solver.cu(),
                VECTORS,
                fill(sym.upper),
                n,
                pa as *const f64,
                ld,
                pw as *const f64,
                &mut lwork,
            )
        }
        .result()
        .map_err(solver("syevd_bufferSize"))?;
        workspace_len(lwork)
    }

    /// Eigenvalues ascending into `w`; the eigenvectors overwrite `a`'s n×n block, as columns.
    pub fn syevd(
        &self,
        sym: Sym,
        a: &mut impl DevicePtrMut<f64>,
        w: &mut impl DevicePtrMut<f64>,
        work: &mut CudaSlice<f64>,
        info: &mut CudaSlice<c_int>,
    ) -> Result<(), CudaError> {
        fits("syevd", "A", extent(sym.n, sym.n, sym.ld), a.len())?;
        fits("syevd", "W", sym.n, w.len())?;
        fits("syevd", "info", 1, info.len())?;
        let (n, ld, lwork) = (int(sym.n)?, int(sym.ld.max(1))?, int(work.len())?);
        let st = &self.stream;
        let (pa, _ra) = a.device_ptr_mut(st);
        let (pw, _rw) = w.device_ptr_mut(st);
        let (pk, _rk) = work.device_ptr_mut(st);
        let (pi, _ri) = info.device_ptr_mut(st);
        // SAFETY: A, W and info checked above; the workspace is its whole buffer, passed with its
        // own length (callers size it by `syevd_buffer_size`).
        unsafe {
            solver_sys::cusolverDnDsyevd(
                self.solver.cu(),
                VECTORS,
                fill(sym.upper),
                n,
                pa as *mut f64,
                ld,
                pw as *mut f64,
                pk as *mut f64,
                lwork,
                pi as *mut c_int,
            )
        }
        .result()
        .map_err(solver("syevd"))
    }

    /// Workspace (doubles) `geqrf` needs for an m×n matrix with leading dimension m.
    pub fn geqrf_buffer_size(
        &self,
        m: usize,
        n: usize,
        a: &mut impl DevicePtrMut<f64>,
    ) -> Result<usize, CudaError> {
        fits("geqrf_bufferSize", "A", extent(m, n, m), a.len())?;
        let (mi, ni, ld) = (int(m)?, int(n)?, int(m.max(1))?);
        let (pa, _ra) = a.device_ptr_mut(&self.stream);
        let mut lwork: c_int = 0;
        // SAFETY: a size query within the checked extent; writes one int.
        unsafe {
            solver_sys::cusolverDnDgeqrf_bufferSize(
                self.solver.cu(),
                mi,
                ni,
                pa as *mut f64,
                ld,
                &mut lwork,
            )
        }
        .result()
        .map_err(solver("geqrf_bufferSize"))?;
        workspace_len(lwork)
    }

    /// Householder QR of the m×n matrix `a` (ld m): R above the diagonal and the reflectors
    /// below it, their scalars in `tau`.
    pub fn geqrf(
        &self,
        m: usize,
        n: usize,
        a: &mut impl DevicePtrMut<f64>,
        tau: &mut CudaSlice<f64>,
        work: &mut CudaSlice<f64>,
        info: &mut CudaSlice<c_int>,
    ) -> Result<(), CudaError> {
        fits("geqrf", "A", extent(m, n, m), a.len())?;
        fits("geqrf", "tau", m.min(n), tau.len())?;
        fits("geqrf", "info", 1, info.len())?;
        let (mi, ni, ld, lwork) = (int(m)?, int(n)?, int(m.max(1))?, int(work.len())?);
        let st = &self.stream;
        let (pa, _ra) = a.device_ptr_mut(st);
        let (pt, _rt) = tau.device_ptr_mut(st);
        let (pk, _rk) = work.device_ptr_mut(st);
        let (pi, _ri) = info.device_ptr_mut(st);
        // SAFETY: A, tau and info checked above; the workspace passed with its own length.
        unsafe {
            solver_sys::cusolverDnDgeqrf(
                self.solver.cu(),
                mi,
                ni,
                pa as *mut f64,
                ld,
                pt as *mut f64,
                pk as *mut f64,
                lwork,
                pi as *mut c_int,
            )
        }
        .result()
        .map_err(solver("geqrf"))
    }

    /// Workspace (doubles) `orgqr` needs to form Q (m×n) from n reflectors.
    pub fn orgqr_buffer_size(
        &self,
        m: usize,
        n: usize,
        a: &impl DevicePtr<f64>,
        tau: &CudaSlice<f64>,
    ) -> Result<usize, CudaError> {
        fits("orgqr_bufferSize", "A", extent(m, n, m), a.len())?;
        fits("orgqr_bufferSize", "tau", n, tau.len())?;
        let (mi, ni, ld) = (int(m)?, int(n)?, int(m.max(1))?);
        let st = &self.stream;
        let (pa, _ra) = a.device_ptr(st);
        let (pt, _rt) = tau.device_ptr(st);
        let mut lwork: c_int = 0;
        // SAFETY: a size query within the checked extents; writes one int.
        unsafe {
            solver_sys::cusolverDnDorgqr_bufferSize(
                self.solver.cu(),
                mi,
                ni,
                ni,
                pa as *const f64,
                ld,
                pt as *const f64,
                &mut lwork,
            )
        }
        .result()
        .map_err(solver("orgqr_bufferSize"))?;
        workspace_len(lwork)
    }

    /// Overwrites geqrf's output with the first n columns of Q.
    pub fn orgqr(
        &self,
        m: usize,
        n: usize,
        a: &mut impl DevicePtrMut<f64>,
        tau: &CudaSlice<f64>,
        work: &mut CudaSlice<f64>,
        info: &mut CudaSlice<c_int>,
    ) -> Result<(), CudaError> {
        fits("orgqr", "A", extent(m, n, m), a.len())?;
        fits("orgqr", "tau", n, tau.len())?;
        fits("orgqr", "info", 1, info.len())?;
        let (mi, ni, ld, lwork) = (int(m)?, int(n)?, int(m.max(1))?, int(work.len())?);
        let st = &self.stream;
        let (pa, _ra) = a.device_ptr_mut(st);
        let (pt, _rt) = tau.device_ptr(st);
        let (pk, _rk) = work.device_ptr_mut(st);
        let (pi, _ri) = info.device_ptr_mut(st);
        // SAFETY: A, tau and info checked above; the workspace passed with its own length.
        unsafe {
            solver_sys::cusolverDnDorgqr(
                self.solver.cu(),
                mi,
                ni,
                ni,
                pa as *mut f64,
                ld,
                pt as *const f64,
                pk as *mut f64,
                lwork,
                pi as *mut c_int,
            )
        }
        .result()
        .map_err(solver("orgqr"))
    }

    /// Reads a call's `info` back: 0 is success, > 0 no convergence, < 0 a rejected argument.
    pub fn check_info(&self, info: &CudaSlice<c_int>, what: &'static str) -> Result<(), CudaError> {
        let host = self
            .stream
            .clone_dtoh(info)
            .map_err(super::error::driver("download info"))?;
        self.stream
            .synchronize()
            .map_err(super::error::driver("synchronize"))?;
        match host.first() {
            Some(0) => Ok(()),
            Some(&i) if i > 0 => Err(CudaError::NotConverged { what, info: i }),
            other => Err(CudaError::BadArgument {
                what,
                info: other.copied(),
            }),
        }
    }
}
