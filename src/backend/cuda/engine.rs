//! The handful of f64 device operations the algorithms (`svd`, `randomized`) are written in.
//! `Device` implements them with the wrappers in `blas`, `solver` and `rand`; the tests implement
//! them with the reference BLAS/LAPACK definitions on the host (`host::HostEngine`), so the very
//! code that runs on a GPU is exercised, shapes, orderings, memory and call sequence included,
//! on a machine without one.

use super::error::CudaError;
use super::plan::{GemmShape, SyrkShape};
use super::solver::Sym;

pub type R<T> = Result<T, CudaError>;

pub trait Engine {
    /// A device buffer of f64.
    type Buf;
    /// Err when `need` bytes do not fit the budget or the free device memory (before allocating).
    fn reserve(&self, what: &str, need: usize) -> R<()>;
    /// Err when `need` bytes do not fit the budget (a re-check once exact workspaces are known).
    fn recheck(&self, what: &str, need: usize) -> R<()>;
    fn zeros(&self, len: usize) -> R<Self::Buf>;
    fn upload(&self, host: &[f64]) -> R<Self::Buf>;
    /// `host` into `dst[offset..]`.
    fn write(&self, host: &[f64], dst: &mut Self::Buf, offset: usize) -> R<()>;
    /// `len` elements from `src[offset..]`, after all queued work.
    fn read(&self, src: &Self::Buf, offset: usize, len: usize) -> R<Vec<f64>>;
    /// Copies `len` elements from `src.0[src.1..]` into `dst.0[dst.1..]`.
    fn copy(&self, src: (&Self::Buf, usize), dst: (&mut Self::Buf, usize), len: usize) -> R<()>;
    /// `C = α·op(A)·op(B) + β·C` with each operand starting at its element offset.
    #[allow(clippy::too_many_arguments)]
    fn gemm(
        &self,
        s: &GemmShape,
        alpha: f64,
        a: (&Self::Buf, usize),
        b: (&Self::Buf, usize),
        beta: f64,
        c: (&mut Self::Buf, usize),
    ) -> R<()>;
    /// Lower triangle of `op(A)·op(A)ᵀ`.
    fn syrk_lower(&self, s: &SyrkShape, a: &Self::Buf, c: &mut Self::Buf) -> R<()>;
    /// Workspace (doubles) of [`Engine::syevd`] on these buffers.
    fn syevd_workspace(&self, sym: Sym, a: &Self::Buf, w: &Self::Buf) -> R<usize>;
    /// Eigenvalues ascending into `w`, eigenvectors (columns) over `a`.
    fn syevd(&self, sym: Sym, a: &mut Self::Buf, w: &mut Self::Buf) -> R<()>;
    /// Workspace (doubles) of [`Engine::qr`] (the larger of geqrf's and orgqr's).
    fn qr_workspace(&self, m: usize, n: usize, a: &mut Self::Buf, offset: usize) -> R<usize>;
    /// Householder QR of the m×n block (ld m) at `a[offset..]`: Q (m×n) overwrites it and R's
    /// diagonal lands in `diag[..n]`.
    fn qr(
        &self,
        m: usize,
        n: usize,
        a: &mut Self::Buf,
        offset: usize,
        diag: &mut Self::Buf,
    ) -> R<()>;
    /// Fills `dst` (even length) with seeded N(0, 1) samples.
    fn gaussian(&self, seed: u64, dst: &mut Self::Buf) -> R<()>;
}
