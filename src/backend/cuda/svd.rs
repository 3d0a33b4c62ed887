//! The base matrix's thin SVD on the device, f64 throughout.
//!
//! Method: f64 Gram matrix of the smaller side (DSYRK), its eigen-decomposition
//! (`cusolverDnDsyevd`, ascending, reversed here), the other side's vectors as `Wᵀu` (or `Wv`)
//! by DGEMM, then made orthonormal by an f64 Householder QR (`geqrf` + `orgqr`) taken in
//! descending-σ order, with the signs of R's diagonal folded back in. Why this rather than
//! `gesvd`/`gesvdj`/`Xgesvdp`: it is a handful of calls that run at GEMM speed on the GPU
//! (for a 4096-square matrix `syevd` should take well under a second, `gesvd` several seconds
//! and `gesvdj` longer still — expected, not yet timed), and f64 leaves ample room for f32:
//! * σ: absolute error about √ε₆₄·σ₁ ≈ 1.5e-8·σ₁ in the worst case (tiny σ), far below 1e-5·σ₁;
//! * U, V: orthonormal to f32 rounding (~1e-7), since one comes from `syevd` and the other
//!   from QR, never from dividing by σ — so zero or tiny σ are harmless;
//! * the Gram side's vector i is off by about ε₆₄·σ₁²/(σᵢ²−σⱼ²), i.e. for a relative gap
//!   of 1e-3 within 1e-4 of |cos| = 1 as long as σᵢ ≳ 1e-5·σ₁; the QR side inherits that.
//!   Only vectors far down an ill-conditioned spectrum are less accurate than a direct SVD.

use super::engine::{Engine, R};
use super::plan::{qr_workspace_guess, syevd_workspace_guess, SvdPlan};
use super::solver::Sym;
use crate::backend::Spectrum;

/// Thin SVD of the row-major f32 matrix `w` (finite, `plan.rows × plan.cols` values).
pub fn thin_svd<E: Engine>(e: &E, w: &[f32], plan: &SvdPlan) -> R<Spectrum> {
    let (small, large) = (plan.small, plan.large);
    let what = format!("thin_svd of {}×{}", plan.rows, plan.cols);
    let guess = plan
        .device_bytes(syevd_workspace_guess(small), qr_workspace_guess(small))
        .ok_or_else(|| overflow(&what))?;
    e.reserve(&what, guess)?;

    // Gram matrix of the smaller side, lower triangle (all syevd reads).
    let w64: Vec<f64> = w.iter().map(|&x| f64::from(x)).collect();
    let d_w = e.upload(&w64)?;
    drop(w64);
    let mut d_g = e.zeros(small * small)?;
    let mut d_eig = e.zeros(small)?;
    e.syrk_lower(&plan.gram, &d_w, &mut d_g)?;

    // Eigen-decomposition; eigenvectors overwrite the Gram matrix, as columns.
    let sym = Sym {
        n: small,
        ld: small,
        upper: false,
    };
    let ws_eig = e.syevd_workspace(sym, &d_g, &d_eig)?;
    let exact = |ws_qr| {
        plan.device_bytes(ws_eig, ws_qr)
            .ok_or_else(|| overflow(&what))
    };
    e.recheck(&what, exact(qr_workspace_guess(small))?)?;
    e.syevd(sym, &mut d_g, &mut d_eig)?;
    let eig = e.read(&d_eig, 0, small)?;
    let vecs = e.read(&d_g, 0, small * small)?;
    drop(d_eig);
    let (sigma, mut eig_side) = descending_spectrum(&eig, &vecs, small);
    canonical_signs(&mut eig_side, small);

    // The other side: Y = op(Wᵀ)·E, columns in descending-σ order, then QR.
    e.write(&eig_side, &mut d_g, 0)?;
    let mut d_y = e.zeros(large * small)?;
    e.gemm(&plan.back, 1.0, (&d_w, 0), (&d_g, 0), 0.0, (&mut d_y, 0))?;
    drop(d_w);
    drop(d_g);
    let ws_qr = e.qr_workspace(large, small, &mut d_y, 0)?;
    e.recheck(&what, exact(ws_qr)?)?;
    let mut d_diag = e.zeros(small)?;
    e.qr(large, small, &mut d_y, 0, &mut d_diag)?;
    let mut qr_side = e.read(&d_y, 0, large * small)?;
    let diag = e.read(&d_diag, 0, small)?;
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
        u: u.into(),
        s: to32(sigma),
        v: v.into(),
    })
}

fn overflow(what: &str) -> super::error::CudaError {
    super::error::CudaError::Overflow(format!("{what}: a size overflows"))
}

/// From syevd's ascending eigenvalues and column-major eigenvectors (n×n), σ descending with
/// negative round-off eigenvalues clamped to 0 (a PSD Gram matrix has none), and the vectors in the
/// same order, each contiguous (= rows of a row-major n×n).
pub fn descending_spectrum(
    eig_asc: &[f64],
    vecs_colmajor: &[f64],
    n: usize,
) -> (Vec<f64>, Vec<f64>) {
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
pub fn canonical_signs(vecs: &mut [f64], n: usize) {
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
pub fn apply_r_signs(q: &mut [f64], r_diag: &[f64], len: usize) {
    for (col, &d) in q.chunks_exact_mut(len).zip(r_diag) {
        if d < 0.0 {
            col.iter_mut().for_each(|x| *x = -*x);
        }
    }
}
