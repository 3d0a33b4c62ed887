//! Brand's low-rank SVD update: the top singular triplets of `W' = W0 + s·B·A` from the cached
//! thin SVD of `W0` (docs/design.md, "Why it is fast").
//!
//! `W' = [U0 P_B] · K · [V0 P_A]ᵀ` with `K = diag(Σ0, 0) + s·[M_B; R_B]·[M_A; R_A]ᵀ`. Because
//! `U0ᵀ P_B = 0`, the cosines of a left singular vector `u'_j = [U0 P_B] x_j` with every base vector
//! are simply the first ρ entries of `x_j`.

use super::kernels::{filled, mul, norm};
use super::krylov::{self, Operator, Triplets};
use super::orthonormalize::orthonormalize_into;
use super::params::SolverParams;
use super::shift_invert::ShiftedGram;
use super::Solver;
use crate::backend::{Backend, Spectrum};
use crate::error::Result;
use faer::linalg::matmul::matmul;
use faer::{Accum, Mat, MatMut, MatRef, Par};

/// One LoRA update seen from the base spectrum's side.
pub struct Update<'a> {
    /// Base spectrum in W0's orientation (rows = out, cols = in).
    pub base: &'a Spectrum,
    /// `A`, r×in row-major.
    pub a: &'a [f32],
    /// `B`, out×r row-major.
    pub b: &'a [f32],
    pub rank: usize,
    pub scale: f64,
}

/// The Brand quantities: enough to decide (cosines) and to rebuild `u'_j`, `v'_j` for a clamp.
pub struct BrandSolution {
    pub rho: usize,
    /// Top triplets of K: `x` is (ρ+p_B)×n, `y` is (ρ+p_A)×n.
    pub triplets: Triplets,
    /// Orthonormal residual bases outside the base spans: out×p_B and in×p_A.
    pub p_b: Mat<f64>,
    pub p_a: Mat<f64>,
    /// "davidson"; "dense-core" (chosen up front: r is large relative to min(out, in)); or
    /// "dense-core-fallback" (the iterative solve did not converge within its budget).
    pub solver: Solver,
}

impl BrandSolution {
    /// `max_i |⟨u0_i, u'_j⟩|` for every returned j.
    pub fn max_cos(&self) -> Vec<f64> {
        let x = &self.triplets.x;
        (0..x.ncols())
            .map(|j| (0..self.rho).map(|i| x[(i, j)].abs()).fold(0.0, f64::max))
            .collect()
    }

    /// `‖X[ρ:, j]‖`: the part of `u'_j` outside the base's column space.
    pub fn outside_base_span(&self) -> Vec<f64> {
        let x = &self.triplets.x;
        (0..x.ncols())
            .map(|j| {
                (self.rho..x.nrows())
                    .fold(0.0, |acc, i| acc + x[(i, j)].powi(2))
                    .sqrt()
            })
            .collect()
    }

    /// `u'_j` (out) and `v'_j` (in) in the original coordinates.
    pub fn singular_vectors(&self, base: &Spectrum, j: usize) -> (Vec<f64>, Vec<f64>) {
        let u = lift(
            &base.u,
            base.rows,
            self.rho,
            &self.p_b,
            self.triplets.x.col(j),
        );
        let v = lift(
            &base.v,
            base.cols,
            self.rho,
            &self.p_a,
            self.triplets.y.col(j),
        );
        (u, v)
    }

    /// `u'_jᵀ W0 v'_j` in base coordinates: `Σ_i x_ij σ0_i y_ij`, since `U0ᵀ u'_j = x[:ρ, j]`
    /// and `V0ᵀ v'_j = y[:ρ, j]`.
    pub fn base_rayleigh(&self, base: &Spectrum, j: usize) -> f64 {
        let (x, y) = (&self.triplets.x, &self.triplets.y);
        (0..self.rho)
            .map(|i| x[(i, j)] * base.s[i] as f64 * y[(i, j)])
            .sum()
    }
}

/// `[basis P] · c` where `basis` holds ρ vectors of length n as rows.
fn lift(basis: &[f32], n: usize, rho: usize, p: &Mat<f64>, c: faer::ColRef<'_, f64>) -> Vec<f64> {
    let mut out = vec![0.0; n];
    for i in 0..rho {
        let ci = c[i];
        if ci != 0.0 {
            for (o, &b) in out.iter_mut().zip(&basis[i * n..(i + 1) * n]) {
                *o += ci * b as f64;
            }
        }
    }
    for k in 0..p.ncols() {
        let ck = c[rho + k];
        for (t, o) in out.iter_mut().enumerate() {
            *o += ck * p[(t, k)];
        }
    }
    out
}

/// The core `K = diag(Σ0, 0) + s·L·Rᵀ`, applied without forming it.
struct Core {
    sigma0: Vec<f64>,
    l: Mat<f64>,
    r: Mat<f64>,
    scale: f64,
    /// `K Kᵀ` as diagonal plus low rank, when shift-inverting it is cheap (small r).
    shifted: Option<ShiftedGram>,
}

impl Core {
    /// `max_shift_invert_rank`: [`SolverParams::max_shift_invert_rank`].
    fn new(
        sigma0: Vec<f64>,
        l: Mat<f64>,
        r: Mat<f64>,
        scale: f64,
        max_shift_invert_rank: usize,
    ) -> Core {
        let mut core = Core {
            sigma0,
            l,
            r,
            scale,
            shifted: None,
        };
        let rank = core.l.ncols();
        if scale != 0.0 && rank <= max_shift_invert_rank {
            core.shifted = Some(core.left_gram());
        }
        core
    }

    /// `K Kᵀ = D + Z·M·Zᵀ` with `D = diag(Σ0², 0)`, `Z = [Σ̃R, L]` (Σ̃ = diag(Σ0, 0), rows × cols)
    /// and `M = [[0, sI], [sI, s²RᵀR]]`, whose inverse is `[[−RᵀR, I/s], [I/s, 0]]`.
    fn left_gram(&self) -> ShiftedGram {
        let (rows, rank, s) = (self.l.nrows(), self.l.ncols(), self.scale);
        let z = filled(rows, 2 * rank, |i, j| {
            match (j < rank, self.sigma0.get(i)) {
                (true, Some(&sigma)) => sigma * self.r[(i, j)],
                (true, None) => 0.0,
                (false, _) => self.l[(i, j - rank)],
            }
        });
        let gram_r = mul(self.r.transpose(), self.r.as_ref());
        let m_inv = Mat::from_fn(2 * rank, 2 * rank, |i, j| match (i < rank, j < rank) {
            (true, true) => -gram_r[(i, j)],
            (true, false) => f64::from(u8::from(j - rank == i)) / s,
            (false, true) => f64::from(u8::from(i - rank == j)) / s,
            (false, false) => 0.0,
        });
        ShiftedGram::new(self.squared_diagonal(), z, m_inv)
    }

    /// `diag(Σ0², 0)`, rows long: the diagonal part of `K Kᵀ`.
    fn squared_diagonal(&self) -> Vec<f64> {
        let mut d: Vec<f64> = self.sigma0.iter().map(|s| s * s).collect();
        d.resize(self.l.nrows(), 0.0);
        d
    }

    fn diag_plus_low_rank(
        &self,
        v: MatRef<'_, f64>,
        left: &Mat<f64>,
        right: &Mat<f64>,
        mut out: MatMut<'_, f64>,
    ) {
        out.fill(0.0);
        for j in 0..v.ncols() {
            for (i, &s) in self.sigma0.iter().enumerate() {
                out[(i, j)] = s * v[(i, j)];
            }
        }
        let inner = mul(right.transpose(), v);
        matmul(
            out,
            Accum::Add,
            left.as_ref(),
            inner.as_ref(),
            self.scale,
            Par::Seq,
        );
    }

    fn dense(&self) -> Mat<f64> {
        let mut k = &self.l * self.r.transpose() * faer::Scale(self.scale);
        for (i, &s) in self.sigma0.iter().enumerate() {
            k[(i, i)] += s;
        }
        k
    }
}

impl Operator for Core {
    fn rows(&self) -> usize {
        self.l.nrows()
    }
    fn cols(&self) -> usize {
        self.r.nrows()
    }
    fn apply(&self, y: MatRef<'_, f64>, out: MatMut<'_, f64>) {
        self.diag_plus_low_rank(y, &self.l, &self.r, out);
    }
    fn apply_t(&self, x: MatRef<'_, f64>, out: MatMut<'_, f64>) {
        self.diag_plus_low_rank(x, &self.r, &self.l, out);
    }
    /// `K Kᵀ = diag(Σ0², 0) + low rank`.
    fn gram_diagonal(&self) -> Option<Vec<f64>> {
        Some(self.squared_diagonal())
    }
    fn shift_invert(&self, theta: f64, rhs: MatRef<'_, f64>) -> Option<Mat<f64>> {
        self.shifted.as_ref()?.solve(theta, rhs)
    }
}

/// Splits an n×r factor into its coordinates in the base basis (ρ×r) and an orthonormal
/// residual basis with its coefficients (n×p, p×r). `basis` has ρ vectors of length n as rows.
fn split(
    backend: &dyn Backend,
    basis: &[f32],
    rho: usize,
    n: usize,
    f: &[f32],
    r: usize,
    residual_drop: f64,
) -> Result<(Mat<f64>, Mat<f64>, Mat<f64>)> {
    let coords = backend.project(basis, rho, n, f, r)?;
    let mut m = filled(rho, r, |i, j| coords[i * r + j] as f64);
    if rho == n {
        // The base vectors span all of R^n: nothing lies outside.
        return Ok((m, Mat::zeros(n, 0), Mat::zeros(0, r)));
    }
    let fm = MatRef::from_row_major_slice(f, n, r);
    let bt = MatRef::from_row_major_slice(basis, rho, n);
    let mut res = filled(n, r, |i, j| fm[(i, j)] as f64);
    let f_norm = frobenius(&res);
    // Classical Gram–Schmidt against the base vectors, repeated only when the residual is
    // small relative to the factor (then one pass leaves it measurably non-orthogonal).
    // Sequential products: modules are screened in parallel already.
    let mut coef = m.clone();
    for pass in 0..2 {
        let before = frobenius(&res);
        let coef32 = filled(rho, r, |i, j| coef[(i, j)] as f32);
        let mut back = Mat::<f32>::zeros(n, r);
        matmul(
            back.as_mut(),
            Accum::Replace,
            bt.transpose(),
            coef32.as_ref(),
            1.0,
            Par::Seq,
        );
        for j in 0..r {
            for i in 0..n {
                res[(i, j)] -= back[(i, j)] as f64;
            }
        }
        if pass == 1 || frobenius(&res) > 0.5 * before {
            break;
        }
        let res32 = filled(n, r, |i, j| res[(i, j)] as f32);
        let mut c = Mat::<f32>::zeros(rho, r);
        matmul(
            c.as_mut(),
            Accum::Replace,
            bt,
            res32.as_ref(),
            1.0,
            Par::Seq,
        );
        coef = filled(rho, r, |i, j| c[(i, j)] as f64);
        m += &coef;
    }
    if frobenius(&res) <= residual_drop * f_norm {
        return Ok((m, Mat::zeros(n, 0), Mat::zeros(0, r)));
    }
    // `res = P·R` with P orthonormal, by the Krylov basis' block orthonormalisation (Cholesky QR,
    // DGKS for near-dependent columns, which it drops): faer's Householder QR of this tall,
    // thin block was half the split of a 1536-row factor, with its rayon fork-joins inside the
    // module's job. R = Pᵀ·res keeps `res = P·R` exact to rounding even when a column is dropped.
    let mut p = Mat::zeros(n, r);
    let kept = orthonormalize_into(p.as_mut(), 0, res.as_ref());
    p.truncate(n, kept);
    let rr = mul(p.transpose(), res.as_ref());
    Ok((m, p, rr))
}

/// Frobenius norm by columns with `kernels::norm` (faer's overflow-safe norm was slow here).
fn frobenius(a: &Mat<f64>) -> f64 {
    a.col_iter().map(|c| norm(c).powi(2)).sum::<f64>().sqrt()
}

/// Stacks `[top; bottom]` (same column count).
fn stack(top: &Mat<f64>, bottom: &Mat<f64>) -> Mat<f64> {
    let (t, c) = (top.nrows(), top.ncols());
    filled(t + bottom.nrows(), c, |i, j| {
        if i < t {
            top[(i, j)]
        } else {
            bottom[(i - t, j)]
        }
    })
}

/// Solves for the top `want` triplets of `W'`.
pub fn solve(
    backend: &dyn Backend,
    up: &Update<'_>,
    want: usize,
    settings: &SolverParams,
) -> Result<BrandSolution> {
    let base = up.base;
    let (out, inn, rho, r) = (base.rows, base.cols, base.rank(), up.rank);
    // Aᵀ as in×r row-major.
    let at: Vec<f32> = (0..inn)
        .flat_map(|i| (0..r).map(move |j| up.a[j * inn + i]))
        .collect();
    let (m_b, p_b, r_b) = split(backend, &base.u, rho, out, up.b, r, settings.residual_drop)?;
    let (m_a, p_a, r_a) = split(backend, &base.v, rho, inn, &at, r, settings.residual_drop)?;
    let core = Core::new(
        base.s.iter().map(|&s| s as f64).collect(),
        stack(&m_b, &r_b),
        stack(&m_a, &r_a),
        up.scale,
        settings.max_shift_invert_rank,
    );
    let n_l = core.l.nrows();
    let lead = (want + settings.start_extra).min(rho);
    // Cost-aware: when the start block would already cover half the core (large r relative to
    // min(out, in)), the iterative solve cannot pay off; a dense SVD of the small core is exact
    // and cheaper than anything on W' itself.
    if 2 * (lead + r) >= n_l {
        let triplets = dense_top(&core.dense(), want)?;
        return Ok(BrandSolution {
            rho,
            triplets,
            p_b,
            p_a,
            solver: Solver::DenseCore,
        });
    }
    // Start from the top base directions and the adapter's left factor: the top left singular
    // space of W' lies close to their span, so the solve needs only a few blocks.
    let start = filled(n_l, lead + r, |i, j| {
        if j < lead {
            f64::from(u8::from(i == j))
        } else {
            core.l[(i, j - lead)]
        }
    });
    let (triplets, solver) = match krylov::top_triplets(&core, want, Some(start.as_ref()), settings)
    {
        Some(t) => (t, Solver::Davidson),
        None => (dense_top(&core.dense(), want)?, Solver::DenseCoreFallback),
    };
    Ok(BrandSolution {
        rho,
        triplets,
        p_b,
        p_a,
        solver,
    })
}

/// Top `want` triplets of a dense matrix (fallback and reference).
pub fn dense_top(k: &Mat<f64>, want: usize) -> Result<Triplets> {
    let svd = match k.thin_svd() {
        Ok(s) => s,
        Err(e) => crate::bail!(Internal, "dense SVD did not converge: {e:?}"),
    };
    let n = want.min(svd.S().column_vector().nrows());
    Ok(Triplets {
        sigma: (0..n).map(|j| svd.S().column_vector()[j]).collect(),
        x: svd.U().subcols(0, n).to_owned(),
        y: svd.V().subcols(0, n).to_owned(),
    })
}
