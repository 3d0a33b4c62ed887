//! One opened CUDA device: its context, one stream, and the cuBLAS and cuSOLVER handles bound
//! to it. The wrappers (`blas`, `solver`, `rand`) call through it; `budgeted` composes them
//! into the [`super::engine::Engine`] operations.

use super::error::{driver, CudaError};
use cudarc::cublas::CudaBlas;
use cudarc::cusolver::DnHandle;
use cudarc::driver::{CudaContext, CudaSlice, CudaStream};
use std::ffi::c_int;
use std::sync::{Arc, Mutex, MutexGuard};

pub struct Device {
    // Handles first: they are dropped before the stream and context they were created on.
    pub(super) blas: CudaBlas,
    pub(super) solver: DnHandle,
    pub(super) stream: Arc<CudaStream>,
    ctx: Arc<CudaContext>,
    pub(super) name: String,
    /// One stream and one set of handles: calls from several threads (and several gates, which
    /// share the device) take turns, which also makes the free-memory check before each call
    /// meaningful.
    lock: Mutex<()>,
}

impl Device {
    /// Opens `ordinal`, which the caller has checked exists.
    pub fn open(ordinal: usize) -> Result<Device, CudaError> {
        let ctx =
            CudaContext::new(ordinal).map_err(|source| CudaError::Open { ordinal, source })?;
        let stream = ctx.new_stream().map_err(CudaError::Stream)?;
        let blas = CudaBlas::new(stream.clone()).map_err(CudaError::BlasHandle)?;
        let solver = DnHandle::new(stream.clone()).map_err(CudaError::SolverHandle)?;
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
        let dev = Device {
            blas,
            solver,
            stream,
            ctx,
            name: format!("{device}{driver}"),
            lock: Mutex::new(()),
        };
        dev.set_default_math()?;
        Ok(dev)
    }

    /// This thread's turn on the device, with its context current.
    pub fn turn(&self) -> Result<MutexGuard<'_, ()>, CudaError> {
        let guard = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        self.ctx
            .bind_to_thread()
            .map_err(driver("bind the CUDA context"))?;
        Ok(guard)
    }

    pub fn free_memory(&self) -> Option<usize> {
        self.ctx.mem_get_info().ok().map(|(free, _total)| free)
    }

    pub fn synchronize(&self) -> Result<(), CudaError> {
        self.stream.synchronize().map_err(driver("synchronize"))
    }

    /// Uninitialised device memory for `len` values that the next call overwrites entirely.
    pub(super) fn scratch<T: cudarc::driver::DeviceRepr>(
        &self,
        len: usize,
    ) -> Result<CudaSlice<T>, CudaError> {
        // SAFETY: only ever passed as a workspace or an output the library fills before reading.
        unsafe { self.stream.alloc::<T>(len.max(1)) }.map_err(driver("allocate workspace"))
    }
}
