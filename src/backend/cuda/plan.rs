//! Everything about a device call that can be decided without a device: the column-major shape
//! of each cuBLAS/cuSOLVER call, how far each operand reaches into its buffer, and the device
//! memory each algorithm needs. The wrappers check every operand against these extents, and the
//! unit tests check the shapes against row-major products computed on the host.
//!
//! Layout: a row-major `rows×cols` buffer *is* the column-major `cols×rows` matrix `Wᵀ`, and a
//! column-major `n×k` matrix whose columns are vectors *is* the row-major "k vectors of length n"
//! layout. Every call is phrased that way, so nothing is transposed by copying.

use super::error::CudaError;
use std::ffi::c_int;

/// Device memory kept free beyond our own buffers, for cuBLAS/cuSOLVER internal workspaces.
pub const LIBRARY_HEADROOM_BYTES: usize = 64 << 20;

pub fn int(x: usize) -> Result<c_int, CudaError> {
    c_int::try_from(x).map_err(|_| CudaError::Dimension(x))
}

/// Elements a column-major `rows×cols` operand with leading dimension `ld` reaches (0 if empty).
pub fn extent(rows: usize, cols: usize, ld: usize) -> usize {
    if rows == 0 || cols == 0 {
        0
    } else {
        (cols - 1) * ld + rows
    }
}

/// `C(m×n) = α·op(A)·op(B) + β·C`, all column-major, as passed to cublas?gemm.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GemmShape {
    pub transa: bool,
    pub transb: bool,
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub lda: usize,
    pub ldb: usize,
    pub ldc: usize,
}

impl GemmShape {
    /// Element extents of A, B and C.
    pub fn extents(&self) -> [usize; 3] {
        let (ar, ac) = if self.transa {
            (self.k, self.m)
        } else {
            (self.m, self.k)
        };
        let (br, bc) = if self.transb {
            (self.n, self.k)
        } else {
            (self.k, self.n)
        };
        [
            extent(ar, ac, self.lda),
            extent(br, bc, self.ldb),
            extent(self.m, self.n, self.ldc),
        ]
    }
    /// Leading dimensions too small for the operands are a plan bug, caught before the call.
    pub fn lds_fit(&self) -> bool {
        let ar = if self.transa { self.k } else { self.m };
        let br = if self.transb { self.n } else { self.k };
        self.lda >= ar.max(1) && self.ldb >= br.max(1) && self.ldc >= self.m.max(1)
    }
}

/// `C(n×n) = op(A)·op(A)ᵀ` (lower triangle), as passed to cublas?syrk; `trans` means op(A) = Aᵀ.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SyrkShape {
    pub trans: bool,
    pub n: usize,
    pub k: usize,
    pub lda: usize,
    pub ldc: usize,
}

impl SyrkShape {
    pub fn extents(&self) -> [usize; 2] {
        let (ar, ac) = if self.trans {
            (self.k, self.n)
        } else {
            (self.n, self.k)
        };
        [extent(ar, ac, self.lda), extent(self.n, self.n, self.ldc)]
    }
}

/// `out(k×r, row-major) = basis(k×n, row-major) · x(n×r, row-major)`. In column-major terms the
/// buffers are `xᵀ` (r×n, ld r), `basisᵀ` (n×k, ld n) and `outᵀ` (r×k, ld r), and
/// `outᵀ = xᵀ·basisᵀ` needs no transpose flag at all.
pub fn project_gemm(k: usize, n: usize, r: usize) -> GemmShape {
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
pub struct SvdPlan {
    pub rows: usize,
    pub cols: usize,
    /// ρ = min(rows, cols): the side whose Gram matrix is decomposed.
    pub small: usize,
    pub large: usize,
    /// rows ≤ cols: G = W·Wᵀ = AᵀA and its eigenvectors are U; else G = WᵀW = AAᵀ, eigenvectors V.
    pub eig_side_is_u: bool,
    pub gram: SyrkShape,
    /// Y (large×ρ, ld large) = op(A)·E with E the ρ×ρ eigenvectors (descending): Wᵀ·U or W·V.
    pub back: GemmShape,
}

impl SvdPlan {
    pub fn new(rows: usize, cols: usize) -> Result<Self, CudaError> {
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
        };
        // Fail early (and without a device) on sizes the 32-bit cuBLAS/cuSOLVER API cannot take.
        for x in [rows, cols, large + 1] {
            int(x)?;
        }
        int(small
            .checked_mul(small)
            .ok_or_else(|| CudaError::Overflow("thin_svd: ρ² overflows".into()))?)?;
        Ok(plan)
    }

    /// Peak device bytes over the three phases, given the workspace sizes (in doubles).
    pub fn device_bytes(&self, ws_eig: usize, ws_qr: usize) -> Option<usize> {
        svd_device_bytes(self.rows, self.cols, ws_eig, ws_qr)
    }
}

/// LAPACK's dsyevd workspace for vectors, 1 + 6n + 2n² doubles; cuSOLVER's actual size is
/// queried later and re-checked.
pub fn syevd_workspace_guess(n: usize) -> usize {
    n.saturating_mul(n)
        .saturating_mul(2)
        .saturating_add(n.saturating_mul(6))
        .saturating_add(1)
}

/// geqrf/orgqr use a blocked panel of about 64 columns' worth of n.
pub fn qr_workspace_guess(n: usize) -> usize {
    n.saturating_mul(64)
}

/// One `int` of cuSOLVER status, at allocation granularity.
const INFO_BYTES: usize = 256;

/// Peak device bytes of `thin_svd`, over its three phases (f64 everywhere, `ws_*` in doubles):
/// Gram + eigen: W, G, λ, syevd workspace; back-multiply: W, G, λ, Y; QR: Y, τ, diag, workspace.
pub fn svd_device_bytes(rows: usize, cols: usize, ws_eig: usize, ws_qr: usize) -> Option<usize> {
    let small = rows.min(cols);
    let large = rows.max(cols);
    let f = |elems: usize| elems.checked_mul(8);
    let w = f(rows.checked_mul(cols)?)?;
    let g = f(small.checked_mul(small)?)?;
    let vec = f(small)?;
    let y = f(large.checked_mul(small)?)?;
    let eig_phase = w
        .checked_add(g)?
        .checked_add(vec)?
        .checked_add(f(ws_eig)?)?
        .checked_add(INFO_BYTES)?;
    let back_phase = w.checked_add(g)?.checked_add(vec)?.checked_add(y)?;
    let qr_phase = y
        .checked_add(vec.checked_mul(2)?)?
        .checked_add(f(ws_qr)?)?
        .checked_add(INFO_BYTES)?;
    Some(eig_phase.max(back_phase).max(qr_phase))
}

/// Device bytes of `project`: basis, x and the result in f32.
pub fn project_device_bytes(k: usize, n: usize, r: usize) -> Option<usize> {
    k.checked_mul(n)?
        .checked_add(n.checked_mul(r)?)?
        .checked_add(k.checked_mul(r)?)?
        .checked_mul(4)
}

/// Err when `need` exceeds the budget, or (with headroom for the libraries) the free memory.
pub fn check_device_memory(
    what: &str,
    need: usize,
    budget: Option<usize>,
    free: Option<usize>,
) -> Result<(), CudaError> {
    if let Some(budget) = budget {
        if need > budget {
            return Err(CudaError::OverBudget {
                what: what.to_string(),
                need,
                budget,
            });
        }
    }
    if let Some(free) = free {
        if need
            .checked_add(LIBRARY_HEADROOM_BYTES)
            .is_none_or(|total| total > free)
        {
            return Err(CudaError::OutOfMemory {
                what: what.to_string(),
                need,
                headroom: LIBRARY_HEADROOM_BYTES,
                free,
            });
        }
    }
    Ok(())
}

/// GEMM shapes of the operator products on blocks of `b` columns, for a row-major rows×cols
/// dense term (read column-major as `W'ᵀ`, ld cols) and the low-rank term `B·A` (B row-major
/// rows×r = column-major `Bᵀ`, ld r; A row-major r×cols = column-major `Aᵀ`, ld cols).
/// `t = false` is `W'·X` (X cols×b → rows×b), `t = true` is `W'ᵀ·Y` (Y rows×b → cols×b).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OpShapes {
    pub rows: usize,
    pub cols: usize,
    pub rank: usize,
}

impl OpShapes {
    pub fn dense(&self, b: usize, t: bool) -> GemmShape {
        let (rows, cols) = (self.rows, self.cols);
        let (m, k) = if t { (cols, rows) } else { (rows, cols) };
        GemmShape {
            transa: !t,
            transb: false,
            m,
            n: b,
            k,
            lda: cols,
            ldb: k,
            ldc: m,
        }
    }
    /// `A·X` (r×b), or `Bᵀ·Y` when `t`.
    pub fn low_rank_inner(&self, b: usize, t: bool) -> GemmShape {
        let (rows, cols, r) = (self.rows, self.cols, self.rank);
        let (k, lda) = if t { (rows, r) } else { (cols, cols) };
        GemmShape {
            transa: !t,
            transb: false,
            m: r,
            n: b,
            k,
            lda,
            ldb: k,
            ldc: r,
        }
    }
    /// `B·tmp` (rows×b), or `Aᵀ·tmp` (cols×b) when `t`, added onto the dense products.
    pub fn low_rank_outer(&self, b: usize, t: bool) -> GemmShape {
        let (rows, cols, r) = (self.rows, self.cols, self.rank);
        let (m, lda) = if t { (cols, cols) } else { (rows, r) };
        GemmShape {
            transa: !t,
            transb: false,
            m,
            n: b,
            k: r,
            lda,
            ldb: r,
            ldc: m,
        }
    }
}

/// Sizes of one randomized top-k solve on the device. The Krylov vectors live on the shorter
/// side (`n`); `c` is the longer. Every buffer is allocated up front, so the peak is the sum plus
/// the larger of the two cuSOLVER workspaces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RsvdPlan {
    pub op: OpShapes,
    /// The operator has dense terms (held summed, as one rows×cols matrix).
    pub dense: bool,
    pub n: usize,
    pub c: usize,
    /// rows > cols: the Krylov operator is `W'ᵀ`.
    pub transposed: bool,
    pub k: usize,
    /// Block size `k + oversampling` (≤ n).
    pub b: usize,
    /// Largest basis, `min(max_basis, n/2)`.
    pub cap: usize,
}

impl RsvdPlan {
    /// `None` when the block would not fit under the cap (the caller's dense-small path).
    pub fn new(
        op: OpShapes,
        dense: bool,
        k: usize,
        oversampling: usize,
        max_basis: usize,
    ) -> Result<Option<RsvdPlan>, CudaError> {
        let (n, c) = (op.rows.min(op.cols), op.rows.max(op.cols));
        let k = k.min(n);
        let b = k.saturating_add(oversampling).min(n);
        let cap = max_basis.min(n / 2);
        if k == 0 || b > cap {
            return Ok(None);
        }
        for x in [op.rows, op.cols, op.rank, cap.saturating_mul(cap)] {
            int(x)?;
        }
        int(c
            .checked_mul(b)
            .ok_or_else(|| CudaError::Overflow("sketch size".into()))?)?;
        Ok(Some(RsvdPlan {
            op,
            dense,
            n,
            c,
            transposed: op.rows > op.cols,
            k,
            b,
            cap,
        }))
    }

    /// The `t` flag of [`OpShapes`] for the Krylov operator's `K·X` (`kt = false`) or `Kᵀ·Y`:
    /// K is W', or W'ᵀ when transposed.
    pub fn k_side(&self, kt: bool) -> bool {
        kt != self.transposed
    }

    /// Bytes the solve holds on the device, given the workspaces (doubles) of syevd on the
    /// cap×cap Rayleigh–Ritz matrix and of QR on an n×b block.
    pub fn device_bytes(&self, ws_eig: usize, ws_qr: usize) -> Option<usize> {
        let RsvdPlan {
            op,
            n,
            c,
            k,
            b,
            cap,
            ..
        } = *self;
        let elems = [
            usize::from(self.dense).checked_mul(op.rows.checked_mul(op.cols)?)?,
            op.rank.checked_mul(op.rows.checked_add(op.cols)?)?,
            op.rank.checked_mul(b)?, // low-rank intermediate
            super::rand::normal_count(c.checked_mul(b)?),
            n.checked_mul(cap)?.checked_mul(2)?,   // Q, W
            c.checked_mul(cap)?,                   // Z
            cap.checked_mul(cap)?.checked_mul(2)?, // T and its eigenvectors
            cap,
            n.checked_mul(b)?,                                 // the new block
            cap.checked_mul(b)?,                               // its projection on the basis
            b.checked_mul(b)?,                                 // its Gram matrix (column norms)
            b,                                                 // R's diagonal
            n.checked_add(c)?.checked_mul(k)?.checked_mul(3)?, // Ritz vectors, products, checks
        ];
        held_and_workspace(&elems, ws_eig, ws_qr.checked_add(b)?)
    }
}

/// Sizes of one rank-revealing sketch on the device (`sketch`): the dense operator (rows×cols),
/// the basis Q (rows×cap) and `Bt = opᵀQ` (cols×cap), a sketch block of up to `block` columns
/// with its Gaussian Ω and a copy of the first round's for Hutchinson's estimate, the explicit
/// residual in blocks of `residual_rows` rows, and the reveal (`BtᵀBt`, its eigenvectors and
/// the two factors).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SketchPlan {
    pub op: OpShapes,
    /// Most sketch columns, `min(max_rank + oversampling, min(rows, cols))`.
    pub cap: usize,
    /// Columns of the first round.
    pub first: usize,
    /// The widest round: the first, or half the cap (each later round doubles the sketch).
    pub block: usize,
    pub residual_rows: usize,
}

/// Elements of one block of the explicit residual (bounds its buffer and keeps each dot
/// product's length within a cuBLAS `int`).
pub const RESIDUAL_BLOCK_ELEMS: usize = 1 << 21;

impl SketchPlan {
    pub fn new(
        rows: usize,
        cols: usize,
        cap: usize,
        first: usize,
    ) -> Result<SketchPlan, CudaError> {
        let first = first.min(cap);
        let block = first.max(cap / 2);
        for x in [rows, cols, cap.saturating_mul(cap)] {
            int(x)?;
        }
        for (a, b) in [(rows, block), (cols, block), (rows, cap), (cols, cap)] {
            int(a
                .checked_mul(b)
                .ok_or_else(|| CudaError::Overflow("sketch size".into()))?)?;
        }
        Ok(SketchPlan {
            op: OpShapes {
                rows,
                cols,
                rank: 0,
            },
            cap,
            first,
            block,
            residual_rows: (RESIDUAL_BLOCK_ELEMS / cols.max(1)).clamp(1, rows.max(1)),
        })
    }

    /// Bytes the sketch holds on the device, given the workspaces (doubles) of syevd on the
    /// cap×cap `BtᵀBt` and of QR on a rows×block block.
    pub fn device_bytes(&self, ws_eig: usize, ws_qr: usize) -> Option<usize> {
        let SketchPlan {
            op: OpShapes { rows, cols, .. },
            cap,
            first,
            block,
            residual_rows,
        } = *self;
        let elems = [
            rows.checked_mul(cols)?,
            rows.checked_add(cols)?.checked_mul(cap)?.checked_mul(2)?, // Q, Bt; L, R
            super::rand::normal_count(cols.checked_mul(block)?),       // Ω
            rows.checked_mul(block)?,                                  // the block
            cap.checked_mul(block)?,                                   // its projection
            block.checked_mul(block)?.checked_add(block)?,             // Gram, R's diagonal
            rows.checked_mul(first)?,                                  // the first sketch, kept
            cols.checked_mul(first)?
                .checked_add(cap.checked_mul(first)?)?, // Hutchinson
            cols.checked_mul(residual_rows)?.checked_add(1)?,          // residual block, dot
            cap.checked_mul(cap)?.checked_add(cap)?,                   // BtᵀBt, eigenvalues
        ];
        held_and_workspace(&elems, ws_eig, ws_qr.checked_add(block)?)
    }
}

/// Bytes of a solve: the f64 buffers it holds (`elems`) plus the larger of the syevd workspace
/// (`ws_eig` elements) and the QR's (`ws_qr` elements, τ included), each with its info word;
/// `None` on overflow.
fn held_and_workspace(elems: &[usize], ws_eig: usize, ws_qr: usize) -> Option<usize> {
    let held = elems
        .iter()
        .try_fold(0usize, |acc, &e| acc.checked_add(e))?
        .checked_mul(8)?;
    let eig = ws_eig.checked_mul(8)?.checked_add(INFO_BYTES)?;
    let qr = ws_qr.checked_mul(8)?.checked_add(INFO_BYTES)?;
    held.checked_add(eig.max(qr))
}
