//! Orthonormalising new basis blocks against an orthonormal basis: block Gram–Schmidt with
//! Cholesky QR when the block is well conditioned, column-by-column DGKS re-orthogonalisation
//! otherwise.

use super::cholesky::cholesky;
use super::kernels::{mul, norm};
use faer::linalg::matmul::matmul;
use faer::{Accum, Mat, MatMut, MatRef, Par};

/// Orthonormalises `new` against the first `m` columns of `q` and among itself, appending what
/// survives after column `m`; returns how many columns were added. Usually a block method
/// (`block_orthonormalize`) does it with matrix products. When that cannot vouch for the result
/// (a column close to dependent), two block Gram–Schmidt passes against the existing basis, then
/// each column against the ones added before it, repeated until a pass no longer shrinks it by
/// half (Daniel–Gragg–Kaufman–Stewart): even a column that lies almost inside the span comes out
/// orthogonal to working precision, and one that keeps shrinking is inside the span and dropped.
pub(crate) fn orthonormalize_into(mut q: MatMut<'_, f64>, m: usize, new: MatRef<'_, f64>) -> usize {
    let norms0: Vec<f64> = (0..new.ncols()).map(|j| norm(new.col(j))).collect();
    let cap = q.ncols() - m;
    if new.ncols() <= cap {
        if let Some(block) = block_orthonormalize(q.as_ref().subcols(0, m), new, &norms0) {
            q.subcols_mut(m, new.ncols()).copy_from(&block);
            return new.ncols();
        }
    }
    let mut v = new.to_owned();
    if m > 0 {
        for _ in 0..2 {
            project_out(q.as_ref().subcols(0, m), v.as_mut());
        }
    }
    let mut added = 0;
    for (j, &norm0) in norms0.iter().enumerate() {
        if added == cap {
            break;
        }
        if norm0 == 0.0 || !norm0.is_finite() {
            continue;
        }
        let mut col = v.col(j).to_owned();
        let mut prev = norm(col.as_ref());
        let mut independent = prev > 0.5 * norm0;
        for pass in 0..4 {
            // After the block passes only the columns added in this call are new; a column
            // that shrank a lot is re-projected against the whole basis.
            let from = if pass == 0 && independent { m } else { 0 };
            let basis = q.as_ref().subcols(from, m + added - from);
            let coef = basis.transpose() * &col;
            matmul(
                col.as_mut(),
                Accum::Add,
                basis,
                coef.as_ref(),
                -1.0,
                Par::Seq,
            );
            let after = norm(col.as_ref());
            if after <= 1e-13 * norm0 {
                independent = false;
                break;
            }
            independent = after > 0.5 * prev;
            if independent {
                break;
            }
            prev = after;
        }
        if !independent {
            continue;
        }
        let nv = norm(col.as_ref());
        for r in 0..col.nrows() {
            q[(r, m + added)] = col[r] / nv;
        }
        added += 1;
    }
    added
}

/// `v −= basis · (basisᵀ v)`: one block Gram–Schmidt pass.
fn project_out(basis: MatRef<'_, f64>, v: MatMut<'_, f64>) {
    let coef = mul(basis.transpose(), v.as_ref());
    matmul(v, Accum::Add, basis, coef.as_ref(), -1.0, Par::Seq);
}

/// `new` orthonormalised against the orthonormal `basis` and among itself by two rounds of a
/// block Gram–Schmidt pass followed by a Cholesky QR pass (`VᵀV = LLᵀ`, `V ← V L⁻ᵀ`): a few
/// matrix products instead of a loop over columns. The second projection removes what the first
/// Cholesky pass amplified of the basis components. `None` when this could cost accuracy: when a
/// column is close to dependent (less than `1e-4` of its norm `norms0` lies outside the span of
/// the basis and the columns before it), or when the first round left the columns measurably
/// non-orthogonal (the second Cholesky factor is not within `1e-6` of `I`).
fn block_orthonormalize(
    basis: MatRef<'_, f64>,
    new: MatRef<'_, f64>,
    norms0: &[f64],
) -> Option<Mat<f64>> {
    let mut v = new.to_owned();
    for round in 0..2 {
        if basis.ncols() > 0 {
            project_out(basis, v.as_mut());
        }
        let l = cholesky(mul(v.transpose(), v.as_ref()))?;
        let b = l.nrows();
        let acceptable = if round == 0 {
            (0..b).all(|j| l[(j, j)] > 1e-4 * norms0[j])
        } else {
            (0..b).all(|j| (0..=j).all(|i| (l[(j, i)] - f64::from(u8::from(i == j))).abs() <= 1e-6))
        };
        if !acceptable {
            return None;
        }
        // V Lᵀ⁻¹, solved as L Xᵀ = Vᵀ.
        faer::linalg::triangular_solve::solve_lower_triangular_in_place(
            l.as_ref(),
            v.as_mut().transpose_mut(),
            Par::Seq,
        );
    }
    Some(v)
}
