//! Randomized top-k SVD of a matrix given as an operator (`X ↦ W'·X`, `Y ↦ W'ᵀ·Y` on blocks), for
//! the weights the Brand update does not cover: fully fine-tuned matrices, and DoRA's row-rescaled
//! `W0 + s·B·A`. One solver serves every operator; the stages are kept apart so a device backend
//! can run the same plan:
//!
//! 1. **Sketch** (Halko–Martinsson–Tropp range finder): a seeded Gaussian `Ω` (cols × b,
//!    `b = k + oversampling`), `Y = W'·Ω`, orthonormalised: the start block.
//! 2. **Block Krylov** (Musco & Musco): the basis grows by `W'W'ᵀ` times its newest block,
//!    re-orthonormalised against the whole basis every step.
//! 3. **Rayleigh–Ritz** on the basis (`Zᵀ Z`, `Z = W'ᵀ Q`) at checkpoints: the top k Ritz
//!    triplets and their residuals.
//! 4. **Stop** when every returned triplet meets the Brand solver's test, checked explicitly with
//!    one more product each way: `‖W'v − σu‖ ≤ tol·σ₁` and `‖W'ᵀu − σv‖ ≤ tol·σ₁`. Never on an
//!    iteration count: with a fixed small count, vectors of a flat spectrum come out nearly random.
//! 5. **Fallback**: when the basis reaches `max_basis` first, a dense f64 SVD of the materialised
//!    operator, named in the result (`solver`).
//!
//! The solver works in f64 whatever the stored dtype: f32/bf16 weights are exact f64 numbers, so
//! the operator is exact and `tol = 1e-9` is reachable (rounding leaves ~1e-15·√n·σ₁); the f32
//! storage limits only how closely the *cached base* vectors compare, not this solve.

use super::brand::dense_top;
use super::kernels::{mul, norm};
use super::krylov::{rayleigh_ritz, Triplets};
use super::operators::Transposed;
pub use super::operators::{materialise, DenseOp, DoraOp, DoraParts, LowRankOp, RowScaledOp};
use super::orthonormalize::orthonormalize_into;
pub use super::rng::gaussian_block;
use crate::backend::sketch::{Round, SketchRule, Step};
use crate::backend::SketchParams;
use crate::error::Result;
use faer::{Mat, MatRef};

pub use super::krylov::Operator;

/// Settings of [`top_k`]. `Default` gives the documented defaults.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RandomizedParams {
    /// Sketch columns beyond k (HMT's p): the block size is `k + oversampling`. Default 10.
    pub oversampling: usize,
    /// Residual tolerance relative to σ₁, for both residuals of every returned triplet.
    /// Default 1e-9, the Brand solver's (`Config::krylov_tolerance`).
    pub tol: f64,
    /// Largest Krylov basis (columns) before the dense fallback. Default 1024; it is also capped
    /// at half of `min(rows, cols)`, past which a dense SVD costs less than the basis.
    pub max_basis: usize,
    /// Seed of the Gaussian sketch: the same operator and seed give the same result, bit for bit.
    pub seed: u64,
}

impl Default for RandomizedParams {
    fn default() -> Self {
        RandomizedParams {
            oversampling: 10,
            tol: 1e-9,
            max_basis: 1024,
            seed: DEFAULT_SEED,
        }
    }
}

/// The default sketch seed (also `Config::seed`'s).
pub const DEFAULT_SEED: u64 = 0x1A7E_5EED;

/// How the triplets were found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Solver {
    /// Sketch + block Krylov, residual-checked.
    Randomized,
    /// The operator is so small that the block would cover half of it: dense SVD up front.
    DenseSmall,
    /// The Krylov basis hit `max_basis` before the residual test passed: dense SVD.
    DenseFallback,
}

impl Solver {
    pub fn label(self) -> &'static str {
        match self {
            Solver::Randomized => "randomized",
            Solver::DenseSmall => "randomized-dense-small",
            Solver::DenseFallback => "randomized-dense-fallback",
        }
    }
}

/// The top k triplets (descending; `x` rows×k left, `y` cols×k right) with both residuals of each,
/// as checked (`‖W' y_j − σ_j x_j‖`, `‖W'ᵀ x_j − σ_j y_j‖`).
pub struct RandomizedSvd {
    pub triplets: Triplets,
    pub left_residuals: Vec<f64>,
    pub right_residuals: Vec<f64>,
    /// Krylov basis columns when it stopped (0 for the dense paths).
    pub basis: usize,
    pub solver: Solver,
}

impl RandomizedSvd {
    /// The largest residual of any returned triplet, relative to σ₁ (0 when σ₁ = 0).
    pub fn worst_relative_residual(&self) -> f64 {
        let s1 = self.triplets.sigma.first().copied().unwrap_or(0.0);
        let worst = self
            .left_residuals
            .iter()
            .chain(&self.right_residuals)
            .fold(0.0f64, |a, &b| a.max(b));
        if s1 > 0.0 {
            worst / s1
        } else {
            0.0
        }
    }
}

/// The top `k` singular triplets of `op`.
pub fn top_k(op: &dyn Operator, k: usize, p: &RandomizedParams) -> Result<RandomizedSvd> {
    // The Krylov vectors live in the shorter dimension: less to orthonormalise.
    if op.rows() > op.cols() {
        let mut t = top_k(&Transposed(op), k, p)?;
        std::mem::swap(&mut t.triplets.x, &mut t.triplets.y);
        std::mem::swap(&mut t.left_residuals, &mut t.right_residuals);
        return Ok(t);
    }
    let (n, cols) = (op.rows(), op.cols());
    let k = k.min(n);
    let b = (k + p.oversampling).min(n);
    let cap = p.max_basis.min(n / 2);
    if k == 0 || b > cap {
        return dense(op, k, Solver::DenseSmall);
    }
    // 1. Sketch.
    let omega = gaussian_block(cols, b, p.seed);
    let mut start = Mat::zeros(n, b);
    op.apply(omega.as_ref(), start.as_mut());
    let mut basis = Basis::new(n, cols);
    let mut newest = basis.extend(op, start.as_ref(), cap);
    let mut next_check = 0;
    loop {
        let m = basis.m;
        let exhausted = newest == 0 || m == n;
        if exhausted && m < k {
            // The operator's rank is below k: its remaining singular values are zero, with
            // vectors the Krylov space cannot supply.
            return dense(op, k, Solver::DenseFallback);
        }
        if m >= k && (m >= next_check || m >= cap || exhausted) {
            // 3. Rayleigh–Ritz, then 4. the explicit residual test.
            let rr = basis.ritz(k);
            let limit = p.tol * rr.triplets.sigma.first().copied().unwrap_or(0.0);
            if exhausted || rr.residual_norms.iter().all(|&r| r <= limit) {
                let checked = checked(op, rr.triplets, m, Solver::Randomized);
                if checked.passes(p.tol) {
                    return Ok(checked);
                }
                // The Ritz estimate passed but the explicit products did not (rounding in a
                // huge basis): the dense path is the honest answer.
                return dense(op, k, Solver::DenseFallback);
            }
            // Rayleigh–Ritz costs O(m³); checking after every block would dominate a long
            // solve, checking rarely would overshoot a short one.
            next_check = m + b.max(m / 4);
        }
        if m >= cap {
            return dense(op, k, Solver::DenseFallback);
        }
        // 2. Block Krylov: W'W'ᵀ times the newest block, which `w` already holds.
        let from = m - newest;
        let next = basis.w.as_ref().subcols(from, newest).to_owned();
        newest = basis.extend(op, next.as_ref(), cap);
    }
}

/// The growing orthonormal basis `q` (n × m), `z = W'ᵀ q`, `w = W' z` and `t = zᵀ z`.
struct Basis {
    q: Mat<f64>,
    z: Mat<f64>,
    w: Mat<f64>,
    t: Mat<f64>,
    m: usize,
}

impl Basis {
    fn new(n: usize, cols: usize) -> Basis {
        Basis {
            q: Mat::zeros(n, 0),
            z: Mat::zeros(cols, 0),
            w: Mat::zeros(n, 0),
            t: Mat::zeros(0, 0),
            m: 0,
        }
    }

    /// Orthonormalises `new` against the basis and appends what survives (at most up to `cap`
    /// columns); returns how many columns were added.
    fn extend(&mut self, op: &dyn Operator, new: MatRef<'_, f64>, cap: usize) -> usize {
        let (n, cols, m) = (self.q.nrows(), self.z.nrows(), self.m);
        let want = (m + new.ncols()).min(cap);
        if want > self.q.ncols() {
            // Grown geometrically: zeroing the whole cap up front cost more than short solves.
            let c = want.max(2 * self.q.ncols()).min(cap);
            self.q.resize_with(n, c, |_, _| 0.0);
            self.z.resize_with(cols, c, |_, _| 0.0);
            self.w.resize_with(n, c, |_, _| 0.0);
            self.t.resize_with(c, c, |_, _| 0.0);
        }
        let room = want - m;
        let added = orthonormalize_into(
            self.q.as_mut().subcols_mut(0, want),
            m,
            new.subcols(0, room.min(new.ncols())),
        );
        if added == 0 {
            return 0;
        }
        let m1 = m + added;
        op.apply_t(
            self.q.as_ref().subcols(m, added),
            self.z.as_mut().subcols_mut(m, added),
        );
        op.apply(
            self.z.as_ref().subcols(m, added),
            self.w.as_mut().subcols_mut(m, added),
        );
        let zt = mul(
            self.z.as_ref().subcols(0, m1).transpose(),
            self.z.as_ref().subcols(m, added),
        );
        for i in 0..m1 {
            for j in 0..added {
                self.t[(i, m + j)] = zt[(i, j)];
                self.t[(m + j, i)] = zt[(i, j)];
            }
        }
        self.m = m1;
        added
    }

    fn ritz(&self, k: usize) -> super::krylov::RitzPairs {
        rayleigh_ritz(&self.q, &self.z, &self.w, &self.t, self.m, k)
    }
}

impl RandomizedSvd {
    fn passes(&self, tol: f64) -> bool {
        let limit = tol * self.triplets.sigma.first().copied().unwrap_or(0.0);
        self.left_residuals
            .iter()
            .chain(&self.right_residuals)
            .all(|&r| r <= limit)
    }
}

/// Both residuals of every triplet, from one product each way.
fn checked(op: &dyn Operator, t: Triplets, basis: usize, solver: Solver) -> RandomizedSvd {
    let k = t.sigma.len();
    let mut wy = Mat::zeros(op.rows(), k);
    op.apply(t.y.as_ref(), wy.as_mut());
    let mut wtx = Mat::zeros(op.cols(), k);
    op.apply_t(t.x.as_ref(), wtx.as_mut());
    let residual = |prod: &Mat<f64>, vec: &Mat<f64>, j: usize| {
        let s = t.sigma[j];
        let d = Mat::from_fn(prod.nrows(), 1, |i, _| prod[(i, j)] - s * vec[(i, j)]);
        norm(d.col(0))
    };
    let left = (0..k).map(|j| residual(&wy, &t.x, j)).collect();
    let right = (0..k).map(|j| residual(&wtx, &t.y, j)).collect();
    RandomizedSvd {
        triplets: t,
        left_residuals: left,
        right_residuals: right,
        basis,
        solver,
    }
}

/// The dense path: the operator materialised (applied to the identity, in column blocks) and its
/// thin SVD in f64.
fn dense(op: &dyn Operator, k: usize, solver: Solver) -> Result<RandomizedSvd> {
    let m = materialise(op);
    let t = dense_top(&m, k)?;
    Ok(checked(op, t, 0, solver))
}

/// Settings of [`low_rank`]. `Default` gives the documented defaults.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LowRankParams {
    /// The largest rank reported as low. Default 512: past it the Brand core costs as much as
    /// the randomized solve of `W'` itself.
    pub max_rank: usize,
    /// Sketch columns of the first round (default 32, enough for the usual LoRA ranks with
    /// room to oversample); each later round doubles the sketch.
    pub first_block: usize,
    /// Sketch columns kept beyond `max_rank` (default 10).
    pub oversampling: usize,
    pub seed: u64,
}

impl Default for LowRankParams {
    fn default() -> Self {
        LowRankParams {
            max_rank: 512,
            first_block: 32,
            oversampling: 10,
            seed: DEFAULT_SEED,
        }
    }
}

impl LowRankParams {
    /// The sketch's settings for an operator of norm `frobenius` (the device's form).
    pub fn sketch(&self, frobenius: f64, threshold: f64, floor: f64) -> SketchParams {
        SketchParams {
            frobenius,
            threshold,
            floor,
            max_rank: self.max_rank,
            first_block: self.first_block,
            oversampling: self.oversampling,
            seed: self.seed,
        }
    }
}

/// `ΔW ≈ L·Rᵀ`: `left` rows × r with orthonormal columns, `right` cols × r.
pub struct LowRank {
    pub left: Mat<f64>,
    pub right: Mat<f64>,
    pub rank: usize,
    /// `‖ΔW − L·Rᵀ‖_F`.
    pub residual: f64,
}

/// Why [`low_rank`] found no factorisation.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct NotLowRank {
    /// Sketch columns used before deciding.
    pub sketched: usize,
    /// `‖(I − QQᵀ)ΔW‖_F` of the last sketch.
    pub residual: f64,
}

/// A randomized rank-revealing sketch of `op` (HMT's adaptive range finder): seeded Gaussian
/// sketches `op·Ω` of growing size, until the part of `op` outside their span,
/// `‖(I − QQᵀ)op‖_F` (from `frobenius = ‖op‖_F`, formed explicitly near the end), is at most
/// `threshold`; then the rank is revealed by the SVD of `Qᵀop`, dropping singular values no
/// larger than `floor` (noise: a direction above it is kept) while the total residual stays
/// within `threshold`. `Err` when more than `max_rank`
/// directions are needed — or, earlier, when the sketch shows that they would be: the effective
/// rank `‖op‖_F⁴ / Σσ⁴` (Σσ⁴ by Hutchinson's estimator on the first sketch) is more than twice
/// `max_rank`, or the energy still outside the sketch exceeds twice what the directions left
/// could hold at the rate the last round captured. Those early answers are estimates; a wrong
/// one costs only time (the caller then solves `W'` itself), never a wrong factorisation.
/// The decisions are [`SketchRule`]'s, which the device sketch takes too.
pub fn low_rank(
    op: &DenseOp,
    frobenius: f64,
    threshold: f64,
    floor: f64,
    p: &LowRankParams,
) -> std::result::Result<LowRank, NotLowRank> {
    let (rows, cols) = (op.rows(), op.cols());
    let rule = SketchRule::new(rows, cols, &p.sketch(frobenius, threshold, floor));
    let mut q = Mat::<f64>::zeros(rows, 0);
    let mut bt = Mat::<f64>::zeros(cols, 0);
    let (mut m, mut captured, mut round) = (0usize, 0.0f64, 0u64);
    loop {
        let take = rule.take(m);
        if take == 0 {
            return Err(NotLowRank {
                sketched: m,
                residual: rule.tail2(captured).sqrt(),
            });
        }
        let omega = gaussian_block(cols, take, p.seed.wrapping_add(round));
        round += 1;
        let mut y = Mat::zeros(rows, take);
        op.apply(omega.as_ref(), y.as_mut());
        q.resize_with(rows, m + take, |_, _| 0.0);
        let added = orthonormalize_into(q.as_mut(), m, y.as_ref());
        q.resize_with(rows, m + added, |_, _| 0.0);
        bt.resize_with(cols, m + added, |_, _| 0.0);
        op.apply_t(
            q.as_ref().subcols(m, added),
            bt.as_mut().subcols_mut(m, added),
        );
        let gained = (m..m + added).map(|j| norm(bt.col(j)).powi(2)).sum::<f64>();
        captured += gained;
        m += added;
        let mut tail2 = rule.tail2(captured);
        if rule.wants_explicit(tail2, added, take) {
            tail2 = op.residual_squared(q.as_ref(), bt.as_ref());
        }
        let numbers = Round {
            m,
            added,
            take,
            gained,
            tail2,
            first: round == 1,
        };
        // Hutchinson: opᵀ Y = Bt (Qᵀ Y) since Y lies in span(Q).
        let s4 = || {
            let qty = mul(q.transpose(), y.as_ref());
            Ok(mul(bt.as_ref(), qty.as_ref()).squared_norm_l2() / take as f64)
        };
        let Ok(step) = rule.step::<std::convert::Infallible>(numbers, s4);
        match step {
            Step::Reveal => return Ok(reveal(q, bt, tail2, &rule)),
            Step::NotLowRank => {
                return Err(NotLowRank {
                    sketched: m,
                    residual: tail2.sqrt(),
                })
            }
            Step::Continue => {}
        }
    }
}

/// `op ≈ Q·Btᵀ = (Q V) Σ Uᵀ` from the SVD `Bt = U Σ Vᵀ`, truncated by [`SketchRule::truncate`].
fn reveal(q: Mat<f64>, bt: Mat<f64>, outside2: f64, rule: &SketchRule) -> LowRank {
    let m = q.ncols();
    if m == 0 {
        return LowRank {
            left: q,
            right: bt,
            rank: 0,
            residual: outside2.sqrt(),
        };
    }
    let svd = bt.thin_svd().expect("SVD of a sketch converges");
    let s = svd.S().column_vector();
    let sigma: Vec<f64> = (0..s.nrows()).map(|i| s[i]).collect();
    let (rank, dropped) = rule.truncate(&sigma, outside2);
    let left = mul(q.as_ref(), svd.V().subcols(0, rank));
    let right = Mat::from_fn(bt.nrows(), rank, |i, j| svd.U()[(i, j)] * s[j]);
    LowRank {
        left,
        right,
        rank,
        residual: dropped.sqrt(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `U diag(σ) Vᵀ` with random orthonormal U, V (rows × cols), row-major.
    fn with_spectrum(rows: usize, cols: usize, sigma: &[f64], seed: u64) -> Vec<f64> {
        let rho = rows.min(cols);
        let u = gaussian_block(rows, rho, seed).qr().compute_thin_Q();
        let v = gaussian_block(cols, rho, seed + 1).qr().compute_thin_Q();
        let us = Mat::from_fn(rows, rho, |i, j| u[(i, j)] * sigma[j]);
        let w = &us * v.transpose();
        (0..rows * cols).map(|t| w[(t / cols, t % cols)]).collect()
    }

    /// Checks `got` against the dense f64 SVD of `w`: every residual bound, every σ, and every
    /// vector whose σ is separated from its neighbours by more than `gap` (relative).
    fn check(w: &[f64], rows: usize, cols: usize, got: &RandomizedSvd, tol: f64, gap: f64) {
        let a = MatRef::from_row_major_slice(w, rows, cols);
        let svd = a.thin_svd().unwrap();
        let s = svd.S().column_vector();
        let s1 = s[0];
        let k = got.triplets.sigma.len();
        for j in 0..k {
            assert!(
                got.left_residuals[j] <= tol * s1 && got.right_residuals[j] <= tol * s1,
                "triplet {j}: residuals {:e} {:e} over {tol}·σ₁",
                got.left_residuals[j],
                got.right_residuals[j]
            );
            // Recomputed here, not trusted from the solver.
            let (x, y) = (got.triplets.x.col(j), got.triplets.y.col(j));
            let r1 = norm((a * y - x * faer::Scale(got.triplets.sigma[j])).as_ref());
            let r2 = norm((a.transpose() * x - y * faer::Scale(got.triplets.sigma[j])).as_ref());
            assert!(
                r1 <= 2.0 * tol * s1 && r2 <= 2.0 * tol * s1,
                "{j}: {r1:e} {r2:e}"
            );
            assert!(
                (got.triplets.sigma[j] - s[j]).abs() <= 10.0 * tol * s1,
                "σ{j}: {} vs {}",
                got.triplets.sigma[j],
                s[j]
            );
            let sep = if j > 0 { (s[j - 1] - s[j]) / s1 } else { 1.0 }.min((s[j] - s[j + 1]) / s1);
            if sep > gap {
                let cos: f64 = (0..rows).map(|i| x[i] * svd.U()[(i, j)]).sum();
                // Vector error ≲ residual / gap.
                assert!(
                    1.0 - cos.abs() <= (tol / sep).powi(2) * 10.0 + 1e-12,
                    "u{j}: |cos| {cos} (gap {sep:e})"
                );
            }
        }
    }

    fn params() -> RandomizedParams {
        RandomizedParams::default()
    }

    #[test]
    fn decaying_spectra_match_dense_in_both_orientations() {
        for &(rows, cols) in &[(300, 200), (200, 300)] {
            let sigma: Vec<f64> = (0..200).map(|i| 10.0 * 0.93f64.powi(i)).collect();
            let w = with_spectrum(rows, cols, &sigma, 7);
            let op = DenseOp::from_row_major(&w, rows, cols);
            let got = top_k(&op, 11, &params()).unwrap();
            assert_eq!(got.solver, Solver::Randomized);
            check(&w, rows, cols, &got, params().tol, 1e-3);
        }
    }

    /// A Gaussian 1024² matrix: the flat spectrum where a fixed small number of power iterations
    /// returns nearly random vectors. Only the residual stopping rule passes this.
    #[test]
    fn flat_gaussian_spectrum_matches_dense() {
        let n = 1024;
        let g = gaussian_block(n, n, 42);
        let w: Vec<f64> = (0..n * n).map(|t| g[(t / n, t % n)]).collect();
        let op = DenseOp::from_row_major(&w, n, n);
        let got = top_k(&op, 11, &params()).unwrap();
        assert_eq!(got.solver, Solver::Randomized, "basis {}", got.basis);
        check(&w, n, n, &got, params().tol, 1e-4);
    }

    #[test]
    fn operators_of_rank_below_k_are_solved_exactly() {
        let sigma: Vec<f64> = (0..120)
            .map(|i| if i < 4 { 4.0 - i as f64 } else { 0.0 })
            .collect();
        let w = with_spectrum(150, 120, &sigma, 3);
        let op = DenseOp::from_row_major(&w, 150, 120);
        let got = top_k(&op, 11, &params()).unwrap();
        check(&w, 150, 120, &got, params().tol, 1e-3);
        assert!(got.triplets.sigma[4..].iter().all(|&s| s < 1e-12));
    }

    #[test]
    fn falls_back_to_dense_and_says_so() {
        let n = 400;
        let g = gaussian_block(n, n, 5);
        let w: Vec<f64> = (0..n * n).map(|t| g[(t / n, t % n)]).collect();
        let op = DenseOp::from_row_major(&w, n, n);
        let p = RandomizedParams {
            max_basis: 40,
            ..params()
        };
        let got = top_k(&op, 11, &p).unwrap();
        assert_eq!(got.solver, Solver::DenseFallback);
        check(&w, n, n, &got, p.tol, 1e-4);
        let small = DenseOp::from_row_major(&w[..20 * n], 20, n);
        assert_eq!(top_k(&small, 11, &p).unwrap().solver, Solver::DenseSmall);
    }

    #[test]
    fn same_seed_same_bits_other_seed_same_answer() {
        let sigma: Vec<f64> = (0..100).map(|i| 1.0 / (1.0 + i as f64)).collect();
        let w = with_spectrum(100, 260, &sigma, 11);
        let op = DenseOp::from_row_major(&w, 100, 260);
        let a = top_k(&op, 10, &params()).unwrap();
        let b = top_k(&op, 10, &params()).unwrap();
        assert_eq!(a.triplets.sigma, b.triplets.sigma);
        assert_eq!(a.triplets.x, b.triplets.x);
        let c = top_k(
            &op,
            10,
            &RandomizedParams {
                seed: 99,
                ..params()
            },
        )
        .unwrap();
        for j in 0..10 {
            assert!((a.triplets.sigma[j] - c.triplets.sigma[j]).abs() < 1e-9);
        }
    }

    #[test]
    fn operators_match_their_materialised_matrices() {
        let (out, inn, r, s) = (37, 53, 3, 0.7);
        let w0: Vec<f64> = {
            let g = gaussian_block(out, inn, 1);
            (0..out * inn).map(|t| g[(t / inn, t % inn)]).collect()
        };
        let ga = gaussian_block(r, inn, 2);
        let gb = gaussian_block(out, r, 3);
        let a: Vec<f32> = (0..r * inn)
            .map(|t| ga[(t / inn, t % inn)] as f32)
            .collect();
        let b: Vec<f32> = (0..out * r).map(|t| gb[(t / r, t % r)] as f32).collect();
        let magnitude: Vec<f32> = (0..out).map(|i| 0.5 + (i % 7) as f32 * 0.1).collect();
        let base = DenseOp::from_row_major(&w0, out, inn);
        let parts = DoraParts::new(&base, &a, &b, r, s, &magnitude).unwrap();
        let dora = parts.operator();
        // Reference: W' = m ⊙ V / ‖V‖_row with V = W0 + s·B·A, built entry by entry.
        let v = Mat::<f64>::from_fn(out, inn, |i, j| {
            w0[i * inn + j]
                + s * (0..r)
                    .map(|k| b[i * r + k] as f64 * a[k * inn + j] as f64)
                    .sum::<f64>()
        });
        let want = Mat::<f64>::from_fn(out, inn, |i, j| {
            let n = (0..inn).map(|t| v[(i, t)].powi(2)).sum::<f64>().sqrt();
            magnitude[i] as f64 * v[(i, j)] / n
        });
        let got = materialise(&dora);
        assert!((&got - &want).norm_max() < 1e-13);
        let got_t = materialise(&Transposed(&dora));
        assert!((&got_t - want.transpose()).norm_max() < 1e-13);
        let low = materialise(&parts.adapted);
        assert!((&low - &v).norm_max() < 1e-13);
        // And the solver on the DoRA operator equals the dense SVD of the materialised W'.
        let flat: Vec<f64> = (0..out * inn).map(|t| want[(t / inn, t % inn)]).collect();
        let p = RandomizedParams {
            max_basis: 1024,
            ..params()
        };
        check(&flat, out, inn, &top_k(&dora, 5, &p).unwrap(), p.tol, 1e-3);
    }

    fn frobenius(w: &[f64]) -> f64 {
        w.iter().map(|x| x * x).sum::<f64>().sqrt()
    }

    #[test]
    fn low_rank_sketch_reveals_a_noisy_rank_and_refuses_full_rank() {
        let (rows, cols, r) = (300, 250, 12);
        let sigma: Vec<f64> = (0..cols)
            .map(|i| if i < r { 5.0 / (1.0 + i as f64) } else { 0.0 })
            .collect();
        let w = with_spectrum(rows, cols, &sigma, 21);
        let noise = gaussian_block(rows, cols, 22);
        let eps = 1e-7;
        let noisy: Vec<f64> = (0..rows * cols)
            .map(|t| w[t] + eps * noise[(t / cols, t % cols)])
            .collect();
        let op = DenseOp::from_row_major(&noisy, rows, cols);
        let threshold = 2.0 * eps * ((rows * cols) as f64).sqrt();
        let f = low_rank(
            &op,
            frobenius(&noisy),
            threshold,
            threshold,
            &LowRankParams::default(),
        )
        .unwrap();
        assert_eq!(f.rank, r);
        // The residual it claims is the residual it has, and within the threshold.
        let approx = &f.left * f.right.transpose();
        let actual = (0..rows * cols)
            .map(|t| (noisy[t] - approx[(t / cols, t % cols)]).powi(2))
            .sum::<f64>()
            .sqrt();
        assert!(actual <= threshold, "{actual:e} > {threshold:e}");
        assert!(
            (actual - f.residual).abs() <= 1e-3 * actual,
            "{actual:e} vs {:e}",
            f.residual
        );
        // Full rank, flat and decaying: no factorisation within max_rank.
        let p = LowRankParams {
            max_rank: 60,
            ..LowRankParams::default()
        };
        let g = gaussian_block(rows, cols, 23);
        let flat: Vec<f64> = (0..rows * cols).map(|t| g[(t / cols, t % cols)]).collect();
        let op = DenseOp::from_row_major(&flat, rows, cols);
        assert!(low_rank(&op, frobenius(&flat), 1e-6 * frobenius(&flat), 0.0, &p).is_err());
        let sigma: Vec<f64> = (0..cols).map(|i| 0.97f64.powi(i as i32)).collect();
        let decaying = with_spectrum(rows, cols, &sigma, 24);
        let op = DenseOp::from_row_major(&decaying, rows, cols);
        let fro = frobenius(&decaying);
        assert!(low_rank(&op, fro, 1e-6 * fro, 0.0, &p).is_err());
    }
}
