//! Top singular triplets of a matrix given only as an operator (y ↦ K y, x ↦ Kᵀ x).
//!
//! A block subspace method on `G = K Kᵀ` with full re-orthogonalisation and Rayleigh–Ritz on
//! `Zᵀ Z`, `Z = Kᵀ Q`. It stops on a residual test, never on an iteration count:
//! `‖K y − σ x‖ ≤ tol·σ₁` for every returned triplet. A block (not a single vector) keeps
//! exactly repeated singular values from hiding each other.
//!
//! The subspace grows by block Krylov steps (`G` times the newest block), or — when the operator
//! knows the diagonal of `G` — by Davidson steps: each unconverged Ritz pair's residual divided
//! by `θ − diag(G)`. For the Brand core `G` is diagonal plus low rank, so that preconditioner is
//! exact up to the low-rank part and a handful of steps converge where Krylov needs dozens.
//! When the operator can also shift-invert `G` (the Brand core for r ≤ 32), pairs that are
//! already close take a Jacobi–Davidson step instead, which converges cubically.

use super::kernels::{clipped_gap, filled, mul, norm};
use super::orthonormalize::orthonormalize_into;
use super::params::SolverParams;
use super::rng::seeded_block;
use super::small_eigen::top_eigenpairs;
use faer::{Mat, MatMut, MatRef};

/// A linear operator from `R^cols` to `R^rows`, applied to blocks of column vectors.
pub trait Operator {
    fn rows(&self) -> usize;
    fn cols(&self) -> usize;
    /// `out = K · y` (y: cols×b, out: rows×b).
    fn apply(&self, y: MatRef<'_, f64>, out: MatMut<'_, f64>);
    /// `out = Kᵀ · x` (x: rows×b, out: cols×b).
    fn apply_t(&self, x: MatRef<'_, f64>, out: MatMut<'_, f64>);
    /// A diagonal close to that of `K Kᵀ` (up to a low-rank part), enabling Davidson steps.
    fn gram_diagonal(&self) -> Option<Vec<f64>> {
        None
    }
    /// `(K Kᵀ − θI)⁻¹ · rhs`, when the operator can apply it cheaply; enables Jacobi–Davidson
    /// steps. `None` when it cannot (or the solve broke down): the diagonal step is used instead.
    fn shift_invert(&self, _theta: f64, _rhs: MatRef<'_, f64>) -> Option<Mat<f64>> {
        None
    }
}

/// Top singular triplets, descending: `x` rows×n, `y` cols×n.
pub struct Triplets {
    pub sigma: Vec<f64>,
    pub x: Mat<f64>,
    pub y: Mat<f64>,
}

/// Runs the solve for the top `want` triplets; `None` when the residual test is not met within
/// `max_dim` basis vectors (the caller falls back to a dense SVD and says so). `start` is the
/// first block (rows × b); a start close to the wanted subspace converges in a few blocks. Without
/// one, a seeded random block is used.
pub fn top_triplets(
    op: &dyn Operator,
    want: usize,
    start: Option<MatRef<'_, f64>>,
    s: &SolverParams,
) -> Option<Triplets> {
    let n = op.rows();
    let want = want.min(n).min(op.cols());
    if want == 0 {
        return Some(Triplets {
            sigma: vec![],
            x: Mat::zeros(n, 0),
            y: Mat::zeros(op.cols(), 0),
        });
    }
    let block = start.map_or(want.clamp(2, 16), |b| b.ncols()).min(n);
    let max_dim = s.max_dim.min(n).max(block);
    // The basis grows on demand: zeroing max_dim columns up front cost more than the solve.
    let (mut q, mut z, mut w, mut t) = (
        Mat::<f64>::zeros(n, 0),
        Mat::zeros(op.cols(), 0),
        Mat::zeros(n, 0),
        Mat::zeros(0, 0),
    );

    let mut next = match start {
        Some(b) => b.to_owned(),
        None => seeded_block(n, block, s.seed),
    };
    let diag = op.gram_diagonal();
    let mut m = 0;
    loop {
        let m0 = m;
        let cap = (m + next.ncols()).min(max_dim);
        if cap > q.ncols() {
            let cap = cap.max(2 * q.ncols()).min(max_dim);
            q.resize_with(n, cap, |_, _| 0.0);
            z.resize_with(op.cols(), cap, |_, _| 0.0);
            w.resize_with(n, cap, |_, _| 0.0);
            t.resize_with(cap, cap, |_, _| 0.0);
        }
        let added = orthonormalize_into(q.as_mut().subcols_mut(0, cap), m, next.as_ref());
        let exhausted = added == 0;
        if !exhausted {
            let m1 = m + added;
            op.apply_t(
                q.as_ref().subcols(m0, added),
                z.as_mut().subcols_mut(m0, added),
            );
            op.apply(
                z.as_ref().subcols(m0, added),
                w.as_mut().subcols_mut(m0, added),
            );
            // T = Zᵀ Z, extended by the new columns (and their mirror).
            let zt_new = mul(
                z.as_ref().subcols(0, m1).transpose(),
                z.as_ref().subcols(m0, added),
            );
            for i in 0..m1 {
                for j in 0..added {
                    t[(i, m0 + j)] = zt_new[(i, j)];
                    t[(m0 + j, i)] = zt_new[(i, j)];
                }
            }
            m = m1;
        }
        let mut ritz = None;
        if m >= want || exhausted {
            let rr = rayleigh_ritz(&q, &z, &w, &t, m, want);
            let limit = s.tol * rr.triplets.sigma.first().copied().unwrap_or(0.0);
            if exhausted || m >= n || rr.residual_norms.iter().all(|&r| r <= limit) {
                return Some(rr.triplets);
            }
            ritz = Some((rr, limit));
        }
        if exhausted || m >= max_dim {
            return None;
        }
        let room = max_dim - m;
        next = match (&diag, ritz) {
            (Some(d), Some((rr, limit))) => {
                let c = davidson_block(op, &rr, d, limit, room, s);
                if c.all_jacobi_davidson {
                    if let Some(done) = polish(op, &rr, &c, d, s) {
                        return Some(done);
                    }
                }
                c.block
            }
            // Krylov: G times the newest block, which `w` already holds.
            _ => w.as_ref().subcols(m0, added.min(room)).to_owned(),
        };
    }
}

/// When every unconverged pair took a Jacobi–Davidson step, `x − correction` is its
/// Rayleigh-quotient iterate and usually converged already: a Rayleigh–Ritz on just those
/// vectors (instead of on the whole basis grown by the corrections) confirms it with the same
/// residual test, and saves the largest Rayleigh–Ritz of the solve. A pair still short of the
/// test takes another Jacobi–Davidson step from its polished value, up to `s.polish_rounds` times.
/// Each polished σ² must also stay within twice its first Ritz value's residual bound
/// (`|λ − θ| ≤ ‖Gx − θx‖` holds for some eigenvalue λ of the symmetric G): an iterate that
/// jumped to an eigenpair outside the wanted set cannot pass for one inside it. `None` when any
/// check fails; the caller then grows the basis as usual.
fn polish(
    op: &dyn Operator,
    rr: &RitzPairs,
    first: &Corrections,
    diag: &[f64],
    s: &SolverParams,
) -> Option<Triplets> {
    let tol = s.tol;
    let (n, take) = rr.triplets.x.shape();
    let mut from = rr.triplets.x.clone();
    let mut c = None;
    let mut round = 1;
    loop {
        let step = c.as_ref().unwrap_or(first);
        for (col, &j) in step.pairs.iter().enumerate() {
            for (f, &b) in from
                .col_as_slice_mut(j)
                .iter_mut()
                .zip(step.block.col_as_slice(col))
            {
                *f -= b;
            }
        }
        let mut q = Mat::zeros(n, take);
        if orthonormalize_into(q.as_mut(), 0, from.as_ref()) < take {
            return None;
        }
        let mut z = Mat::zeros(op.cols(), take);
        op.apply_t(q.as_ref(), z.as_mut());
        let mut w = Mat::zeros(n, take);
        op.apply(z.as_ref(), w.as_mut());
        let t = mul(z.transpose(), z.as_ref());
        let polished = rayleigh_ritz(&q, &z, &w, &t, take, take);
        let limit = tol * polished.triplets.sigma.first().copied().unwrap_or(0.0);
        // ‖Gx − θx‖ = ‖K y − σ x‖·σ for the Ritz pair before polishing.
        let stayed = (0..take).all(|j| {
            let (before, after) = (rr.triplets.sigma[j], polished.triplets.sigma[j]);
            (after * after - before * before).abs()
                <= 2.0 * rr.residual_norms[j] * before + limit * after
        });
        if !stayed {
            return None;
        }
        if polished.residual_norms.iter().all(|&r| r <= limit) {
            return Some(polished.triplets);
        }
        if round == s.polish_rounds {
            return None;
        }
        round += 1;
        let next = davidson_block(op, &polished, diag, limit, take, s);
        if !next.all_jacobi_davidson {
            return None;
        }
        from = polished.triplets.x;
        c = Some(next);
    }
}

/// One correction per unconverged Ritz pair (x, θ = σ², residual r = Gx − θx). Close to
/// convergence, with the operator's shift-inverse P = (G − θ)⁻¹, it is the Jacobi–Davidson
/// (Olsen) correction `P r − ε P x`, ε making it orthogonal to x: for an exact P this is the
/// Rayleigh-quotient direction, which converges cubically. Otherwise it is the residual divided
/// by `diag(G) − θ`.
fn davidson_block(
    op: &dyn Operator,
    rr: &RitzPairs,
    diag: &[f64],
    limit: f64,
    room: usize,
    s: &SolverParams,
) -> Corrections {
    let unconverged: Vec<usize> = (0..rr.residual_norms.len())
        .filter(|&c| rr.residual_norms[c] > limit)
        .collect();
    let mut all_jacobi_davidson = unconverged.len() <= room;
    let todo: Vec<usize> = unconverged.into_iter().take(room).collect();
    let n = rr.residuals.nrows();
    let sigma1 = rr.triplets.sigma.first().copied().unwrap_or(0.0);
    let mut out = Mat::zeros(n, todo.len());
    for (c, &j) in todo.iter().enumerate() {
        let theta = rr.triplets.sigma[j].powi(2);
        let (x, r) = (rr.triplets.x.col(j), rr.residuals.col(j));
        if rr.residual_norms[j] <= s.shift_invert_below * sigma1 {
            let rhs = filled(n, 2, |i, k| if k == 0 { r[i] } else { x[i] });
            if let Some(p) = op.shift_invert(theta, rhs.as_ref()) {
                let (pr, px) = (p.col(0), p.col(1));
                let eps = (x.transpose() * pr) / (x.transpose() * px);
                if eps.is_finite() {
                    let (pr, px) = (p.col_as_slice(0), p.col_as_slice(1));
                    for ((o, &a), &b) in out.col_as_slice_mut(c).iter_mut().zip(pr).zip(px) {
                        *o = a - eps * b;
                    }
                    continue;
                }
            }
        }
        all_jacobi_davidson = false;
        for (i, o) in out.col_as_slice_mut(c).iter_mut().enumerate() {
            *o = r[i] / clipped_gap(diag[i], theta);
        }
    }
    Corrections {
        block: out,
        pairs: todo,
        all_jacobi_davidson,
    }
}

/// One correction per unconverged Ritz pair: column c of `block` belongs to pair `pairs[c]`.
struct Corrections {
    block: Mat<f64>,
    pairs: Vec<usize>,
    /// Every pair got a Jacobi–Davidson correction (and none was left out for lack of room).
    all_jacobi_davidson: bool,
}

/// Ritz triplets and, per triplet, the residual `G x − σ² x` and `‖K y − σ x‖`.
pub(crate) struct RitzPairs {
    pub(crate) triplets: Triplets,
    pub(crate) residuals: Mat<f64>,
    pub(crate) residual_norms: Vec<f64>,
}

/// Ritz triplets of the top `want` from the basis (`q` orthonormal, `z = Kᵀq`, `w = K z`,
/// `t = zᵀz`, first `m` columns), with their residuals.
pub(crate) fn rayleigh_ritz(
    q: &Mat<f64>,
    z: &Mat<f64>,
    w: &Mat<f64>,
    t: &Mat<f64>,
    m: usize,
    want: usize,
) -> RitzPairs {
    let tm = t.as_ref().submatrix(0, 0, m, m).to_owned();
    let (vals, coeff) = top_eigenpairs(tm.as_ref(), want.min(m));
    let take = vals.len();
    let sigma: Vec<f64> = vals.iter().map(|v| v.max(0.0).sqrt()).collect();
    let x = mul(q.as_ref().subcols(0, m), coeff.as_ref());
    let zc = mul(z.as_ref().subcols(0, m), coeff.as_ref());
    let wc = mul(w.as_ref().subcols(0, m), coeff.as_ref());
    let mut y = zc;
    let mut residuals = Mat::zeros(x.nrows(), take);
    for (c, &sig) in sigma.iter().enumerate() {
        let theta = sig * sig;
        let (wc, x) = (wc.col_as_slice(c), x.col_as_slice(c));
        for ((r, &w), &xi) in residuals.col_as_slice_mut(c).iter_mut().zip(wc).zip(x) {
            *r = w - theta * xi;
        }
    }
    let mut residual_norms = Vec::with_capacity(take);
    for (c, &sig) in sigma.iter().enumerate() {
        // ‖K y − σ x‖ with y = Kᵀx/σ equals ‖G x − σ² x‖/σ. A zero σ has y = 0 and is exact.
        if sig > 0.0 {
            residual_norms.push(norm(residuals.col(c)) / sig);
            for v in y.col_as_slice_mut(c) {
                *v /= sig;
            }
        } else {
            residual_norms.push(0.0);
        }
    }
    RitzPairs {
        triplets: Triplets { sigma, x, y },
        residuals,
        residual_norms,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Dense(Mat<f64>);
    impl Operator for Dense {
        fn rows(&self) -> usize {
            self.0.nrows()
        }
        fn cols(&self) -> usize {
            self.0.ncols()
        }
        fn apply(&self, y: MatRef<'_, f64>, mut out: MatMut<'_, f64>) {
            out.copy_from(&self.0 * y);
        }
        fn apply_t(&self, x: MatRef<'_, f64>, mut out: MatMut<'_, f64>) {
            out.copy_from(self.0.transpose() * x);
        }
    }

    fn settings() -> SolverParams {
        SolverParams {
            tol: 1e-10,
            max_dim: 400,
            seed: 1,
            ..SolverParams::default()
        }
    }

    #[test]
    fn matches_dense_svd_on_rectangular_matrices() {
        for &(r, c) in &[(60, 40), (40, 60), (50, 50)] {
            let a = Mat::<f64>::from_fn(r, c, |i, j| ((i * 31 + j * 17) % 23) as f64 / 23.0 - 0.4);
            let svd = a.thin_svd().unwrap();
            let got = top_triplets(&Dense(a.clone()), 5, None, &settings()).unwrap();
            for j in 0..5 {
                let want = svd.S().column_vector()[j];
                assert!((got.sigma[j] - want).abs() <= 1e-9 * want, "σ{j}");
                let cos: f64 = (0..r).map(|i| got.x[(i, j)] * svd.U()[(i, j)]).sum();
                assert!((cos.abs() - 1.0).abs() < 1e-8, "u{j}: |cos| {cos}");
            }
        }
    }

    #[test]
    fn finds_both_copies_of_a_repeated_singular_value() {
        let mut a = Mat::<f64>::zeros(30, 30);
        for i in 0..30 {
            a[(i, i)] = if i < 3 { 5.0 } else { 1.0 / (i as f64) };
        }
        let got = top_triplets(&Dense(a), 4, None, &settings()).unwrap();
        for j in 0..3 {
            assert!((got.sigma[j] - 5.0).abs() < 1e-10);
        }
        assert!(got.sigma[3] < 1.0);
    }

    /// ‖QᵀQ − I‖_max over the first `k` columns.
    fn orthogonality_error(q: &Mat<f64>, k: usize) -> f64 {
        let g = mul(
            q.as_ref().subcols(0, k).transpose(),
            q.as_ref().subcols(0, k),
        );
        let mut worst = 0.0f64;
        for i in 0..k {
            for j in 0..k {
                worst = worst.max((g[(i, j)] - f64::from(u8::from(i == j))).abs());
            }
        }
        worst
    }

    #[test]
    fn orthonormalizes_blocks_and_drops_dependent_columns() {
        let n = 50;
        let mut q = Mat::<f64>::zeros(n, 12);
        let first = Mat::<f64>::from_fn(n, 4, |i, j| ((i * 13 + j * 7) % 11) as f64 - 5.0);
        assert_eq!(orthonormalize_into(q.as_mut(), 0, first.as_ref()), 4);
        // Nearly parallel columns (condition number ~1e3, where one Cholesky QR pass leaves them
        // ~1e-10 from orthogonal): every one is kept, and the span is unchanged.
        let block = Mat::<f64>::from_fn(n, 5, |i, j| {
            ((i * 3 % 7) as f64 - 3.0) + 1e-3 * (((i * 31 + j * 17) % 23) as f64 - 11.0)
        });
        assert_eq!(orthonormalize_into(q.as_mut(), 4, block.as_ref()), 5);
        assert!(
            orthogonality_error(&q, 9) < 1e-14,
            "{:e}",
            orthogonality_error(&q, 9)
        );
        let basis = q.as_ref().subcols(0, 9);
        let outside = &block - basis * (basis.transpose() * &block);
        assert!(outside.norm_max() < 1e-12 * block.norm_max());
        // A column inside the span already there, and one nearly inside: the first is dropped,
        // the second kept and made orthogonal to working precision.
        let mut dependent = Mat::<f64>::from_fn(n, 2, |i, j| q[(i, j)] + q[(i, 5 + j)]);
        dependent[(7, 1)] += 1e-9;
        assert_eq!(orthonormalize_into(q.as_mut(), 9, dependent.as_ref()), 1);
        assert!(orthogonality_error(&q, 10) < 1e-14);
    }

    #[test]
    fn gives_up_instead_of_returning_unconverged_vectors() {
        let a = Mat::<f64>::from_fn(200, 200, |i, j| ((i * 7 + j * 13) % 29) as f64 - 14.0);
        let s = SolverParams {
            tol: 1e-14,
            max_dim: 12,
            seed: 3,
            ..SolverParams::default()
        };
        assert!(top_triplets(&Dense(a), 10, None, &s).is_none());
    }
}
