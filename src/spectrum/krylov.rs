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

use super::small_eigen::top_eigenpairs;
use faer::linalg::matmul::matmul;
use faer::{Accum, ColRef, Mat, MatMut, MatRef, Par};

/// `a · b`, single-threaded: these products are small, modules are screened in parallel
/// already, and rayon's fork/join costs more than the product itself at these sizes.
pub(crate) fn mul(a: MatRef<'_, f64>, b: MatRef<'_, f64>) -> Mat<f64> {
    let mut out = Mat::zeros(a.nrows(), b.ncols());
    matmul(out.as_mut(), Accum::Replace, a, b, 1.0, Par::Seq);
    out
}

/// Euclidean norm of a column. faer's `norm_l2` rescales to avoid overflow, which cost a third of
/// the whole solve here; these columns come from f32 data, whose squares cannot overflow f64.
pub(crate) fn norm(c: ColRef<'_, f64>) -> f64 {
    match c.try_as_col_major() {
        Some(c) => dot(c.as_slice(), c.as_slice()).sqrt(),
        None => c.iter().map(|x| x * x).sum::<f64>().sqrt(),
    }
}

/// `Σ aᵢbᵢ` with four independent partial sums: a plain sum is one serial chain of additions,
/// which the compiler may not reorder, and at these lengths (tens to hundreds) its latency is the
/// cost of the Rayleigh–Ritz and Householder loops that call it.
pub(crate) fn dot(a: &[f64], b: &[f64]) -> f64 {
    let n = a.len().min(b.len());
    let (a4, b4) = (a[..n].chunks_exact(4), b[..n].chunks_exact(4));
    let (ta, tb) = (a4.remainder(), b4.remainder());
    let mut acc = [0.0; 4];
    for (x, y) in a4.zip(b4) {
        for k in 0..4 {
            acc[k] += x[k] * y[k];
        }
    }
    let tail: f64 = ta.iter().zip(tb).map(|(x, y)| x * y).sum();
    (acc[0] + acc[1]) + (acc[2] + acc[3]) + tail
}

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

pub struct KrylovSettings {
    /// Relative residual tolerance (to σ₁).
    pub tol: f64,
    /// Largest Krylov basis (columns) before giving up.
    pub max_dim: usize,
    pub seed: u64,
}

/// Runs the solve for the top `want` triplets; `None` when the residual test is not met within
/// `max_dim` basis vectors (the caller falls back to a dense SVD and says so). `start` is the
/// first block (rows × b); a start close to the wanted subspace converges in a few blocks. Without
/// one, a seeded random block is used.
pub fn top_triplets(
    op: &dyn Operator,
    want: usize,
    start: Option<MatRef<'_, f64>>,
    s: &KrylovSettings,
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
                let c = davidson_block(op, &rr, d, limit, room);
                if c.all_jacobi_davidson {
                    if let Some(done) = polish(op, &rr, &c, d, s.tol) {
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
/// test takes another Jacobi–Davidson step from its polished value, up to `POLISH_ROUNDS` times.
/// Each polished σ² must also stay within twice its first Ritz value's residual bound
/// (`|λ − θ| ≤ ‖Gx − θx‖` holds for some eigenvalue λ of the symmetric G): an iterate that
/// jumped to an eigenpair outside the wanted set cannot pass for one inside it. `None` when any
/// check fails; the caller then grows the basis as usual.
fn polish(
    op: &dyn Operator,
    rr: &RitzPairs,
    first: &Corrections,
    diag: &[f64],
    tol: f64,
) -> Option<Triplets> {
    let (n, take) = rr.triplets.x.shape();
    let mut from = rr.triplets.x.clone();
    let mut c = None;
    let mut round = 1;
    loop {
        let step = c.as_ref().unwrap_or(first);
        for (col, &j) in step.pairs.iter().enumerate() {
            for i in 0..n {
                from[(i, j)] -= step.block[(i, col)];
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
        if round == POLISH_ROUNDS {
            return None;
        }
        round += 1;
        let next = davidson_block(op, &polished, diag, limit, take);
        if !next.all_jacobi_davidson {
            return None;
        }
        from = polished.triplets.x;
        c = Some(next);
    }
}

/// Jacobi–Davidson rounds on the polished pairs before the basis grows instead: each is cheap
/// (take vectors), and one more usually finishes a pair that the first left just short.
const POLISH_ROUNDS: usize = 3;

/// A Ritz pair whose residual is below this (relative to σ₁) is expanded by a shift-inverse
/// step when the operator offers one. Further out, Rayleigh-quotient steps converge no faster
/// than the diagonal ones (the Ritz value is still far from its eigenvalue) and cost a 2r×2r
/// solve each; measured on the MiniLM fixtures, 1e-3 beat 1e-1, 1e-2 and 1e-4.
const SHIFT_INVERT_BELOW: f64 = 1e-3;

/// `d − θ`, moved out to `1e-6·θ` when closer to zero: next to a pole a correction is huge
/// along e_i, and the direction is what counts.
pub(crate) fn clipped_gap(d: f64, theta: f64) -> f64 {
    let floor = 1e-6 * theta.abs().max(f64::MIN_POSITIVE);
    let gap = d - theta;
    if gap.abs() < floor {
        floor.copysign(gap)
    } else {
        gap
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
        if rr.residual_norms[j] <= SHIFT_INVERT_BELOW * sigma1 {
            let rhs = Mat::from_fn(n, 2, |i, k| if k == 0 { r[i] } else { x[i] });
            if let Some(p) = op.shift_invert(theta, rhs.as_ref()) {
                let (pr, px) = (p.col(0), p.col(1));
                let eps = (x.transpose() * pr) / (x.transpose() * px);
                if eps.is_finite() {
                    for i in 0..n {
                        out[(i, c)] = pr[i] - eps * px[i];
                    }
                    continue;
                }
            }
        }
        all_jacobi_davidson = false;
        for i in 0..n {
            out[(i, c)] = r[i] / clipped_gap(diag[i], theta);
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
    let residuals = Mat::from_fn(x.nrows(), take, |r, c| {
        wc[(r, c)] - sigma[c] * sigma[c] * x[(r, c)]
    });
    let mut residual_norms = Vec::with_capacity(take);
    for (c, &sig) in sigma.iter().enumerate() {
        // ‖K y − σ x‖ with y = Kᵀx/σ equals ‖G x − σ² x‖/σ. A zero σ has y = 0 and is exact.
        if sig > 0.0 {
            residual_norms.push(norm(residuals.col(c)) / sig);
            for r in 0..y.nrows() {
                y[(r, c)] /= sig;
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

/// The lower Cholesky factor of a small symmetric positive definite matrix (unblocked: tens of
/// rows); `None` when a pivot is not positive.
fn cholesky(mut a: Mat<f64>) -> Option<Mat<f64>> {
    let n = a.nrows();
    for j in 0..n {
        let mut d = a[(j, j)];
        for k in 0..j {
            d -= a[(j, k)] * a[(j, k)];
        }
        if d.is_nan() || d <= 0.0 {
            return None;
        }
        let d = d.sqrt();
        a[(j, j)] = d;
        for i in j + 1..n {
            let mut s = a[(i, j)];
            for k in 0..j {
                s -= a[(i, k)] * a[(j, k)];
            }
            a[(i, j)] = s / d;
        }
        for i in 0..j {
            a[(i, j)] = 0.0;
        }
    }
    Some(a)
}

/// A deterministic pseudo-random start block (splitmix64), so both runs and backends agree.
fn seeded_block(n: usize, b: usize, seed: u64) -> Mat<f64> {
    let mut state = seed ^ 0x9E37_79B9_7F4A_7C15;
    let mut next = move || {
        state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        (z >> 11) as f64 / (1u64 << 53) as f64 - 0.5
    };
    Mat::from_fn(n, b, |_, _| next())
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

    fn settings() -> KrylovSettings {
        KrylovSettings {
            tol: 1e-10,
            max_dim: 400,
            seed: 1,
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
        let s = KrylovSettings {
            tol: 1e-14,
            max_dim: 12,
            seed: 3,
        };
        assert!(top_triplets(&Dense(a), 10, None, &s).is_none());
    }
}
