//! The [`Engine`] operations the algorithms use, on one opened device under one gate's
//! device-memory budget, composed from the typed wrappers.

use super::device::Device;
use super::engine::{Engine, R};
use super::error::{driver, fits};
use super::plan::{check_device_memory, GemmShape, SyrkShape};
use super::rand::Philox;
use super::solver::Sym;
use cudarc::driver::CudaSlice;
use std::ffi::c_int;

/// A device-memory budget on top of the shared device (each gate has its own).
pub struct Budgeted<'d> {
    pub dev: &'d Device,
    pub budget: Option<usize>,
}

fn at(call: &'static str, len: usize, offset: usize) -> R<()> {
    fits(call, "offset", offset, len)
}

impl Engine for Budgeted<'_> {
    type Buf = CudaSlice<f64>;

    fn reserve(&self, what: &str, need: usize) -> R<()> {
        check_device_memory(what, need, self.budget, self.dev.free_memory())
    }

    fn zeros(&self, len: usize) -> R<CudaSlice<f64>> {
        self.dev
            .stream
            .alloc_zeros::<f64>(len.max(1))
            .map_err(driver("allocate"))
    }

    fn upload(&self, host: &[f64]) -> R<CudaSlice<f64>> {
        self.dev.stream.clone_htod(host).map_err(driver("upload"))
    }

    fn write(&self, host: &[f64], dst: &mut CudaSlice<f64>, offset: usize) -> R<()> {
        fits("write", "dst", offset + host.len(), dst.len())?;
        let mut view = dst.slice_mut(offset..offset + host.len());
        self.dev
            .stream
            .memcpy_htod(host, &mut view)
            .map_err(driver("upload"))
    }

    fn read(&self, src: &CudaSlice<f64>, offset: usize, len: usize) -> R<Vec<f64>> {
        fits("read", "src", offset + len, src.len())?;
        let out = self
            .dev
            .stream
            .clone_dtoh(&src.slice(offset..offset + len))
            .map_err(driver("download"))?;
        self.dev.synchronize()?;
        Ok(out)
    }

    fn copy(
        &self,
        src: (&CudaSlice<f64>, usize),
        dst: (&mut CudaSlice<f64>, usize),
        len: usize,
    ) -> R<()> {
        fits("copy", "src", src.1 + len, src.0.len())?;
        fits("copy", "dst", dst.1 + len, dst.0.len())?;
        let mut view = dst.0.slice_mut(dst.1..dst.1 + len);
        self.dev
            .stream
            .memcpy_dtod(&src.0.slice(src.1..src.1 + len), &mut view)
            .map_err(driver("device copy"))
    }

    fn gemm(
        &self,
        s: &GemmShape,
        alpha: f64,
        a: (&CudaSlice<f64>, usize),
        b: (&CudaSlice<f64>, usize),
        beta: f64,
        c: (&mut CudaSlice<f64>, usize),
    ) -> R<()> {
        at("DGEMM", a.0.len(), a.1)?;
        at("DGEMM", b.0.len(), b.1)?;
        at("DGEMM", c.0.len(), c.1)?;
        let mut cv = c.0.slice_mut(c.1..);
        self.dev.gemm(
            s,
            alpha,
            &a.0.slice(a.1..),
            &b.0.slice(b.1..),
            beta,
            &mut cv,
        )
    }

    fn syrk_lower(&self, s: &SyrkShape, a: &CudaSlice<f64>, c: &mut CudaSlice<f64>) -> R<()> {
        self.dev.syrk_lower(s, a, c)
    }

    fn recheck(&self, what: &str, need: usize) -> R<()> {
        check_device_memory(what, need, self.budget, None)
    }

    fn syevd_workspace(&self, sym: Sym, a: &CudaSlice<f64>, w: &CudaSlice<f64>) -> R<usize> {
        self.dev.syevd_buffer_size(sym, a, w)
    }

    fn syevd(&self, sym: Sym, a: &mut CudaSlice<f64>, w: &mut CudaSlice<f64>) -> R<()> {
        let lwork = self.dev.syevd_buffer_size(sym, a, w)?;
        let mut work = self.dev.scratch::<f64>(lwork)?;
        let mut info = self
            .dev
            .stream
            .alloc_zeros::<c_int>(1)
            .map_err(driver("allocate info"))?;
        self.dev.syevd(sym, a, w, &mut work, &mut info)?;
        self.dev.check_info(&info, "syevd")
    }

    fn qr_workspace(&self, m: usize, n: usize, a: &mut CudaSlice<f64>, offset: usize) -> R<usize> {
        fits("qr", "A", offset + m * n, a.len())?;
        let mut block = a.slice_mut(offset..offset + m * n);
        let tau = self.dev.scratch::<f64>(n)?;
        let geqrf = self.dev.geqrf_buffer_size(m, n, &mut block)?;
        let orgqr = self.dev.orgqr_buffer_size(m, n, &block, &tau)?;
        Ok(geqrf.max(orgqr))
    }

    fn qr(
        &self,
        m: usize,
        n: usize,
        a: &mut CudaSlice<f64>,
        offset: usize,
        diag: &mut CudaSlice<f64>,
    ) -> R<()> {
        fits("qr", "A", offset + m * n, a.len())?;
        let mut block = a.slice_mut(offset..offset + m * n);
        let mut tau = self.dev.scratch::<f64>(n)?;
        let geqrf = self.dev.geqrf_buffer_size(m, n, &mut block)?;
        let orgqr = self.dev.orgqr_buffer_size(m, n, &block, &tau)?;
        let mut work = self.dev.scratch::<f64>(geqrf.max(orgqr))?;
        let mut info = self
            .dev
            .stream
            .alloc_zeros::<c_int>(1)
            .map_err(driver("allocate info"))?;
        self.dev
            .geqrf(m, n, &mut block, &mut tau, &mut work, &mut info)?;
        self.dev.check_info(&info, "geqrf")?;
        // R's diagonal sits at stride m + 1; orgqr overwrites it, so copy it out first.
        self.dev.copy_strided(n, &block, m + 1, diag)?;
        self.dev
            .orgqr(m, n, &mut block, &tau, &mut work, &mut info)?;
        self.dev.check_info(&info, "orgqr")
    }

    fn gaussian(&self, seed: u64, dst: &mut CudaSlice<f64>) -> R<()> {
        Philox::new(self.dev, seed)?.fill_normal(dst)
    }
}
