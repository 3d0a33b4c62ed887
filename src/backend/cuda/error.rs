//! What can go wrong on the device, as one type: each variant names the step, and keeps the
//! cudarc status it came from as its `source`. Converted into the crate's `Error` (kind `Cuda`,
//! except numerical failures, `Internal`, and sizes the 32-bit API cannot take, `Limit`) with this
//! error as the source, so a caller can walk down to the driver's or library's status.

use crate::error::{Error, ErrorKind};
use cudarc::cublas::result::CublasError;
use cudarc::curand::result::CurandError;
use cudarc::cusolver::result::CusolverError;
use cudarc::driver::DriverError;
use std::ffi::c_int;

#[derive(Debug, Clone, thiserror::Error)]
pub enum CudaError {
    #[error(
        "CUDA unavailable: cannot load {} (install the NVIDIA driver / CUDA 12 runtime \
         libraries or add them to LD_LIBRARY_PATH)",
        .0.join(", ")
    )]
    MissingLibraries(Vec<&'static str>),
    #[error("CUDA driver found but cuInit failed: {0:?}")]
    Init(#[source] DriverError),
    #[error("CUDA driver found but it reports no CUDA device")]
    NoDevice,
    #[error("CUDA device {ordinal} requested but only {count} device(s) present")]
    NoSuchDevice { ordinal: usize, count: usize },
    #[error("cannot open CUDA device {ordinal}: {source:?}")]
    Open { ordinal: usize, source: DriverError },
    #[error("cannot create a CUDA stream: {0:?}")]
    Stream(#[source] DriverError),
    #[error("cannot create a cuBLAS handle: {0:?}")]
    BlasHandle(#[source] CublasError),
    #[error("cannot set the cuBLAS math mode: {0:?}")]
    MathMode(#[source] CublasError),
    #[error("cannot create a cuSOLVER handle: {0:?}")]
    SolverHandle(#[source] CusolverError),
    #[error("CUDA probe failed inside cudarc: {0}")]
    ProbePanicked(String),
    #[error("CUDA call panicked: {0}")]
    Panicked(String),
    #[error("CUDA driver: {what} failed: {source:?}")]
    Driver {
        what: &'static str,
        source: DriverError,
    },
    #[error("cuBLAS {what} failed: {source:?}")]
    Blas {
        what: &'static str,
        source: CublasError,
    },
    #[error("cuSOLVER {what} failed: {source:?}")]
    Solver {
        what: &'static str,
        source: CusolverError,
    },
    #[error("cuRAND {what} failed: {source:?}")]
    Rand {
        what: &'static str,
        source: CurandError,
    },
    #[error("cuSOLVER asked for a workspace of {0}")]
    Workspace(c_int),
    #[error("{what} needs {} MiB of GPU memory, budget {} MiB", mib(*.need), mib(*.budget))]
    OverBudget {
        what: String,
        need: usize,
        budget: usize,
    },
    #[error(
        "{what} needs {} MiB of GPU memory (+{} MiB for cuBLAS/cuSOLVER), only {} MiB free",
        mib(*.need), mib(*.headroom), mib(*.free)
    )]
    OutOfMemory {
        what: String,
        need: usize,
        headroom: usize,
        free: usize,
    },
    #[error("cuSOLVER {what} did not converge (info = {info})")]
    NotConverged { what: &'static str, info: c_int },
    #[error("cuSOLVER {what} rejected argument (info = {info:?})")]
    BadArgument {
        what: &'static str,
        info: Option<c_int>,
    },
    #[error("dimension {0} exceeds what cuBLAS/cuSOLVER take")]
    Dimension(usize),
    /// A size that overflows `usize` (the message says which).
    #[error("{0}")]
    Overflow(String),
    /// A wrapper was handed a buffer too small for the shape it was told: a bug in a plan.
    #[error("{call}: operand {operand} needs {need} elements, the buffer holds {len}")]
    Operand {
        call: &'static str,
        operand: &'static str,
        need: usize,
        len: usize,
    },
}

impl CudaError {
    pub fn kind(&self) -> ErrorKind {
        match self {
            CudaError::NotConverged { .. }
            | CudaError::BadArgument { .. }
            | CudaError::Operand { .. } => ErrorKind::Internal,
            CudaError::Dimension(_) | CudaError::Overflow(_) => ErrorKind::Limit,
            _ => ErrorKind::Cuda,
        }
    }
}

impl From<CudaError> for Error {
    fn from(e: CudaError) -> Error {
        Error::new(e.kind(), e.to_string()).with_source(e)
    }
}

/// `map_err(driver("upload W"))`.
pub fn driver(what: &'static str) -> impl Fn(DriverError) -> CudaError {
    move |source| CudaError::Driver { what, source }
}

pub fn blas(what: &'static str) -> impl Fn(CublasError) -> CudaError {
    move |source| CudaError::Blas { what, source }
}

pub fn solver(what: &'static str) -> impl Fn(CusolverError) -> CudaError {
    move |source| CudaError::Solver { what, source }
}

pub fn rand(what: &'static str) -> impl Fn(CurandError) -> CudaError {
    move |source| CudaError::Rand { what, source }
}

pub fn mib(bytes: usize) -> String {
    format!("{:.1}", bytes as f64 / (1u64 << 20) as f64)
}

/// Err(Operand) unless `need` elements fit in a buffer of `len`.
pub fn fits(
    call: &'static str,
    operand: &'static str,
    need: usize,
    len: usize,
) -> Result<(), CudaError> {
    if need <= len {
        Ok(())
    } else {
        Err(CudaError::Operand {
            call,
            operand,
            need,
            len,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cudarc::cublas::sys as cublas_sys;
    use std::error::Error as _;

    #[test]
    fn converted_errors_keep_kind_text_and_the_cudarc_status_as_source() {
        // A cuBLAS status: formatting a driver status would dlopen libcuda.
        let status = CublasError(cublas_sys::cublasStatus_t::CUBLAS_STATUS_ALLOC_FAILED);
        let e: Error = CudaError::Blas {
            what: "DGEMM",
            source: status,
        }
        .into();
        assert_eq!(e.kind(), ErrorKind::Cuda);
        assert_eq!(
            e.message(),
            "cuBLAS DGEMM failed: CublasError(CUBLAS_STATUS_ALLOC_FAILED)"
        );
        let cuda = e.source().unwrap().downcast_ref::<CudaError>().unwrap();
        let inner = cuda.source().unwrap().downcast_ref::<CublasError>();
        assert_eq!(inner, Some(&status));

        let e: Error = CudaError::NotConverged {
            what: "syevd",
            info: 3,
        }
        .into();
        assert_eq!(e.kind(), ErrorKind::Internal);
        assert_eq!(e.message(), "cuSOLVER syevd did not converge (info = 3)");
        let e: Error = CudaError::Dimension(1 << 40).into();
        assert_eq!(e.kind(), ErrorKind::Limit);
        assert_eq!(
            CudaError::MissingLibraries(vec!["a", "b"]).to_string(),
            "CUDA unavailable: cannot load a, b (install the NVIDIA driver / CUDA 12 runtime \
             libraries or add them to LD_LIBRARY_PATH)"
        );
    }
}
