//! `(G − θI)⁻¹ b` for a Gram matrix that is diagonal plus low rank, `G = D + Z·M·Zᵀ`, by the
//! Woodbury identity: `E b − E Z (M⁻¹ + Zᵀ E Z)⁻¹ Zᵀ E b` with `E = (D − θI)⁻¹`.
//!
//! The Brand core's left Gram has this form with `Z` only 2r columns wide, so one shift costs a
//! 2r×n×2r product and a 2r×2r solve. `krylov` uses it for Rayleigh-quotient (Jacobi–Davidson)
//! expansion steps once a Ritz pair is close: one such step takes a residual of ~1e-4·σ₁ below
//! the 1e-9 tolerance, where diagonal steps need two or three more, each paying a Rayleigh–Ritz
//! solve on a growing basis.

use super::kernels::{clipped_gap, mul};
use super::lu::solve_dense;
use faer::linalg::matmul::triangular::BlockStructure;
use faer::linalg::matmul::{matmul, triangular};
use faer::{Accum, Mat, MatRef, Par};

pub struct ShiftedGram {
    /// The diagonal `D`.
    d: Vec<f64>,
    /// n×p.
    z: Mat<f64>,
    /// `Zᵀ` stored column-major: the capacitance product reads it faster than a transposed view.
    zt: Mat<f64>,
    /// `M⁻¹`, p×p.
    m_inv: Mat<f64>,
}

impl ShiftedGram {
    pub fn new(d: Vec<f64>, z: Mat<f64>, m_inv: Mat<f64>) -> ShiftedGram {
        let zt = z.transpose().to_owned();
        ShiftedGram { d, z, zt, m_inv }
    }

    /// `(G − θI)⁻¹ · rhs`, or `None` when `θ` is (numerically) an eigenvalue of `G` and the
    /// solve breaks down. Entries of `D − θ` closer to zero than `1e-6·θ` are moved out to that
    /// distance (`clipped_gap`), as for the diagonal Davidson step: the solve then belongs to a
    /// nearby matrix, which is all a preconditioner needs (the caller's residual test decides).
    pub fn solve(&self, theta: f64, rhs: MatRef<'_, f64>) -> Option<Mat<f64>> {
        let e: Vec<f64> = self
            .d
            .iter()
            .map(|&d| 1.0 / clipped_gap(d, theta))
            .collect();
        let ez = scaled_rows(&e, self.z.as_ref());
        let eb = scaled_rows(&e, rhs);
        // The capacitance is symmetric: only its lower triangle is computed, then mirrored.
        let mut capacitance = self.m_inv.clone();
        triangular::matmul(
            capacitance.as_mut(),
            BlockStructure::TriangularLower,
            Accum::Add,
            self.zt.as_ref(),
            BlockStructure::Rectangular,
            ez.as_ref(),
            BlockStructure::Rectangular,
            1.0,
            Par::Seq,
        );
        for j in 1..capacitance.ncols() {
            for i in 0..j {
                capacitance[(i, j)] = capacitance[(j, i)];
            }
        }
        let inner = solve_dense(capacitance, mul(self.zt.as_ref(), eb.as_ref()))?;
        let mut out = eb;
        matmul(
            out.as_mut(),
            Accum::Add,
            ez.as_ref(),
            inner.as_ref(),
            -1.0,
            Par::Seq,
        );
        let finite = out.col_iter().all(|c| c.iter().all(|v| v.is_finite()));
        finite.then_some(out)
    }
}

/// `diag(e) · a`.
fn scaled_rows(e: &[f64], a: MatRef<'_, f64>) -> Mat<f64> {
    let mut out = Mat::zeros(a.nrows(), a.ncols());
    for j in 0..a.ncols() {
        for ((o, &x), &ei) in out
            .col_as_slice_mut(j)
            .iter_mut()
            .zip(a.col(j).iter())
            .zip(e)
        {
            *o = ei * x;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use faer::linalg::solvers::DenseSolveCore;

    /// A deterministic dense test matrix with entries in [-0.5, 0.5).
    fn filled(n: usize, p: usize, seed: u64) -> Mat<f64> {
        Mat::from_fn(n, p, |i, j| {
            let h = (i as u64 * 7919 + j as u64 * 104_729 + seed * 1_299_709) % 10_007;
            h as f64 / 10_007.0 - 0.5
        })
    }

    #[test]
    fn matches_a_dense_solve_of_the_shifted_gram() {
        let (n, p) = (40, 6);
        let d: Vec<f64> = (0..n).map(|i| 1.0 / (1.0 + i as f64)).collect();
        let z = filled(n, p, 1);
        let m = {
            let a = filled(p, p, 2);
            &a + a.transpose()
        };
        let gram = {
            let mut g = &z * &m * z.transpose();
            for (i, di) in d.iter().enumerate() {
                g[(i, i)] += di;
            }
            g
        };
        let shifted = ShiftedGram::new(d, z, m.partial_piv_lu().inverse());
        let b = filled(n, 2, 3);
        for theta in [0.37, 2.5, -0.1] {
            let t = shifted.solve(theta, b.as_ref()).expect("nonsingular shift");
            let mut g = gram.clone();
            for i in 0..n {
                g[(i, i)] -= theta;
            }
            let back = &g * &t - &b;
            assert!(
                back.norm_l2() <= 1e-10 * b.norm_l2(),
                "θ = {theta}: {back:?}"
            );
        }
    }
}
