//! The top eigenpairs of a small dense symmetric matrix (the Rayleigh–Ritz matrices of
//! `krylov`, tens of rows): Householder tridiagonalisation, its eigenvalues by implicit QL,
//! inverse iteration for the wanted ones' vectors, and the reflectors applied back.
//!
//! faer's general solver computes every eigenpair with blocked kernels built for large
//! matrices; at these sizes it spent ~0.1–0.6 ms per call, more than half of a module's whole
//! screening. Only the top few pairs are ever used, and computing just those is a few times
//! cheaper. This is the classic EISPACK / LAPACK route (tred, tql1, dstein, dormtr), unblocked.

use super::krylov::dot;
use faer::{Mat, MatRef};

/// The `take` largest eigenvalues of the symmetric `a` (descending) and their orthonormal
/// eigenvectors as the columns of an m×take matrix.
pub fn top_eigenpairs(a: MatRef<'_, f64>, take: usize) -> (Vec<f64>, Mat<f64>) {
    let m = a.nrows();
    let take = take.min(m);
    let mut h: Vec<f64> = (0..m)
        .flat_map(|i| (0..m).map(move |j| a[(i, j)]))
        .collect();
    let (d, e, reflectors) = tridiagonalize(&mut h, m);
    let norm = d
        .iter()
        .enumerate()
        .map(|(i, di)| {
            di.abs()
                + e.get(i).map_or(0.0, |x| x.abs())
                + i.checked_sub(1).map_or(0.0, |j| e[j].abs())
        })
        .fold(0.0, f64::max);
    let mut values = tridiagonal_eigenvalues(&d, &e);
    values.truncate(take);
    let mut vectors = Mat::<f64>::zeros(m, take);
    let mut found: Vec<Vec<f64>> = Vec::with_capacity(take);
    for (j, &lambda) in values.iter().enumerate() {
        // Vectors of eigenvalues closer than this are made orthogonal explicitly (dstein's rule).
        let cluster: Vec<&Vec<f64>> = found
            .iter()
            .zip(&values)
            .filter(|(_, &l)| (l - lambda).abs() <= 1e-3 * norm)
            .map(|(v, _)| v)
            .collect();
        let y = inverse_iteration(&d, &e, lambda, norm, &cluster, j);
        found.push(y);
    }
    for (j, y) in found.iter().enumerate() {
        let x = apply_reflectors(&reflectors, y, m);
        for (i, &xi) in x.iter().enumerate() {
            vectors[(i, j)] = xi;
        }
    }
    (values, vectors)
}

/// One Householder reflector `I − β v vᵀ` acting on rows `start..m`.
struct Reflector {
    start: usize,
    v: Vec<f64>,
    beta: f64,
}

/// Reduces the row-major symmetric `h` (m×m) to tridiagonal form `Qᵀ h Q`: returns its diagonal,
/// its off-diagonal and `Q` as reflectors (`Q = H_0 H_1 …`). Only the lower triangle is kept up
/// to date.
fn tridiagonalize(h: &mut [f64], m: usize) -> (Vec<f64>, Vec<f64>, Vec<Reflector>) {
    let mut e = vec![0.0; m.saturating_sub(1)];
    let mut reflectors = Vec::with_capacity(m.saturating_sub(2));
    let mut p = vec![0.0; m];
    for k in 0..m.saturating_sub(2) {
        let s = k + 1;
        let x: Vec<f64> = (s..m).map(|i| h[i * m + k]).collect();
        let alpha = x[0];
        let tail = dot(&x[1..], &x[1..]);
        if tail == 0.0 {
            e[k] = alpha;
            continue;
        }
        let norm = (alpha * alpha + tail).sqrt();
        let beta_sign = if alpha > 0.0 { -norm } else { norm };
        // v = x − β_sign e_1, scaled so v[0] = 1.
        let v0 = alpha - beta_sign;
        let mut v = x;
        v[0] = 1.0;
        for vi in &mut v[1..] {
            *vi /= v0;
        }
        let beta = -v0 / beta_sign;
        e[k] = beta_sign;
        // p = β·H22·v (H22 symmetric; its full rows are kept), w = p − (β/2)(pᵀv)·v.
        let n = m - s;
        for (i, pi) in p[..n].iter_mut().enumerate() {
            let row = &h[(s + i) * m + s..(s + i) * m + m];
            *pi = beta * dot(row, &v);
        }
        let pv = dot(&p[..n], &v);
        let half = 0.5 * beta * pv;
        for (pi, vi) in p[..n].iter_mut().zip(&v) {
            *pi -= half * vi;
        }
        // H22 −= v wᵀ + w vᵀ, whole rows so the products above stay contiguous.
        for i in 0..n {
            let (vi, wi) = (v[i], p[i]);
            let row = &mut h[(s + i) * m + s..(s + i) * m + m];
            for ((hij, vj), wj) in row.iter_mut().zip(&v).zip(&p[..n]) {
                *hij -= vi * wj + wi * vj;
            }
        }
        reflectors.push(Reflector { start: s, v, beta });
    }
    if m >= 2 {
        e[m - 2] = h[(m - 1) * m + (m - 2)];
    }
    let d = (0..m).map(|i| h[i * m + i]).collect();
    (d, e, reflectors)
}

/// Every eigenvalue of the tridiagonal (d, e), descending, by the implicit QL method with
/// Wilkinson-like shifts (EISPACK tql1; no vectors, so O(m²)). Bisection on Sturm counts was
/// simpler but its serial divisions made it the slowest part of the solve.
fn tridiagonal_eigenvalues(d: &[f64], e: &[f64]) -> Vec<f64> {
    let n = d.len();
    let mut d = d.to_vec();
    // e[i] couples i and i+1; a trailing zero keeps the indexing uniform.
    let mut e: Vec<f64> = e.iter().copied().chain([0.0]).collect();
    for l in 0..n {
        for _ in 0..60 {
            // The first negligible coupling at or after l ends the unreduced block.
            let mut m = l;
            while m + 1 < n {
                let dd = d[m].abs() + d[m + 1].abs();
                if e[m].abs() <= f64::EPSILON * dd {
                    break;
                }
                m += 1;
            }
            if m == l {
                break;
            }
            let mut g = (d[l + 1] - d[l]) / (2.0 * e[l]);
            let mut r = (g * g + 1.0).sqrt();
            g = d[m] - d[l] + e[l] / (g + r.copysign(g));
            let (mut s, mut c, mut p) = (1.0, 1.0, 0.0);
            let mut deflated = false;
            for i in (l..m).rev() {
                let f = s * e[i];
                let b = c * e[i];
                // Plain sqrt, not hypot (a libm call that was a tenth of the solve): these entries
                // are squares of f32-sized values, far from overflow.
                r = (f * f + g * g).sqrt();
                e[i + 1] = r;
                if r == 0.0 {
                    // Underflow: the block splits here; retry from the top.
                    d[i + 1] -= p;
                    e[m] = 0.0;
                    deflated = true;
                    break;
                }
                s = f / r;
                c = g / r;
                g = d[i + 1] - p;
                r = (d[i] - g) * s + 2.0 * c * b;
                p = s * r;
                d[i + 1] = g + p;
                g = c * r - b;
            }
            if !deflated {
                d[l] -= p;
                e[l] = g;
                e[m] = 0.0;
            }
        }
    }
    d.sort_by(|a, b| b.total_cmp(a));
    d
}

/// A unit eigenvector of the tridiagonal for `lambda`, orthogonal to `cluster` (vectors of
/// eigenvalues too close for inverse iteration alone to separate).
fn inverse_iteration(
    d: &[f64],
    e: &[f64],
    lambda: f64,
    norm: f64,
    cluster: &[&Vec<f64>],
    seed: usize,
) -> Vec<f64> {
    let m = d.len();
    let lu = TridiagonalLu::new(d, e, lambda, (f64::EPSILON * norm).max(f64::MIN_POSITIVE));
    // A start with a component along every eigenvector, different for each vector computed.
    let mut y: Vec<f64> = (0..m)
        .map(|i| 1.0 + (((i + 1) * (2 * seed + 3) * 7919) % 101) as f64 / 101.0)
        .collect();
    orthonormalize(&mut y, cluster);
    for _ in 0..3 {
        let mut next = y.clone();
        lu.solve(&mut next);
        // A solve that overflows (λ is an exact eigenvalue of a tiny matrix) keeps the last
        // iterate, which is already an eigenvector to working precision.
        if !orthonormalize(&mut next, cluster) {
            break;
        }
        y = next;
    }
    y
}

/// Removes the `cluster` components of `y` and scales it to unit length; false (and `y` is
/// garbage) when nothing finite and nonzero is left.
fn orthonormalize(y: &mut [f64], cluster: &[&Vec<f64>]) -> bool {
    for c in cluster {
        let yc = dot(y, c);
        for (yi, ci) in y.iter_mut().zip(c.iter()) {
            *yi -= yc * ci;
        }
    }
    let n = dot(y, y).sqrt();
    if n == 0.0 || !n.is_finite() {
        return false;
    }
    for yi in y.iter_mut() {
        *yi /= n;
    }
    true
}

/// `T − λI = P L U` for a tridiagonal `T`, with partial pivoting (LAPACK dlagtf): `U` has two
/// superdiagonals. Zero pivots are replaced by `tiny`, as inverse iteration wants.
struct TridiagonalLu {
    /// Reciprocals of U's diagonal: the back substitution is a serial chain, and a multiply
    /// there is several times shorter than a divide.
    inv_u0: Vec<f64>,
    u1: Vec<f64>,
    u2: Vec<f64>,
    l: Vec<f64>,
    swapped: Vec<bool>,
}

impl TridiagonalLu {
    fn new(d: &[f64], e: &[f64], lambda: f64, tiny: f64) -> Self {
        let m = d.len();
        let mut u0: Vec<f64> = d.iter().map(|x| x - lambda).collect();
        let mut u1: Vec<f64> = e.to_vec();
        let mut u2 = vec![0.0; m.saturating_sub(2)];
        let mut l = vec![0.0; m.saturating_sub(1)];
        let mut swapped = vec![false; m.saturating_sub(1)];
        // Row i+1 below the diagonal holds e[i]; pivot between rows i and i+1.
        let mut sub: Vec<f64> = e.to_vec();
        for i in 0..m.saturating_sub(1) {
            if u0[i].abs() >= sub[i].abs() {
                let piv = if u0[i] == 0.0 { tiny } else { u0[i] };
                u0[i] = piv;
                l[i] = sub[i] / piv;
                u0[i + 1] -= l[i] * u1[i];
            } else {
                // Swap rows i and i+1: row i+1 = [sub, d_{i+1}−λ, e_{i+1}].
                swapped[i] = true;
                let piv = sub[i];
                l[i] = u0[i] / piv;
                let (a, b) = (u1[i], u0[i + 1]);
                u0[i] = piv;
                u1[i] = b;
                u0[i + 1] = a - l[i] * b;
                if i + 1 < m - 1 {
                    u2[i] = u1[i + 1];
                    u1[i + 1] *= -l[i];
                }
            }
            sub[i] = 0.0;
        }
        if m > 0 && u0[m - 1] == 0.0 {
            u0[m - 1] = tiny;
        }
        TridiagonalLu {
            inv_u0: u0.iter().map(|x| 1.0 / x).collect(),
            u1,
            u2,
            l,
            swapped,
        }
    }

    /// Overwrites `y` with `(T − λI)⁻¹ y`.
    fn solve(&self, y: &mut [f64]) {
        let m = y.len();
        for i in 0..m.saturating_sub(1) {
            if self.swapped[i] {
                y.swap(i, i + 1);
            }
            y[i + 1] -= self.l[i] * y[i];
        }
        for i in (0..m).rev() {
            let mut s = y[i];
            if i + 1 < m {
                s -= self.u1[i] * y[i + 1];
            }
            if i + 2 < m {
                s -= self.u2[i] * y[i + 2];
            }
            y[i] = s * self.inv_u0[i];
        }
    }
}

/// `Q y` with `Q = H_0 H_1 … H_{m−3}`: the last reflector first.
fn apply_reflectors(reflectors: &[Reflector], y: &[f64], m: usize) -> Vec<f64> {
    let mut x = y.to_vec();
    debug_assert_eq!(x.len(), m);
    for r in reflectors.iter().rev() {
        let part = &mut x[r.start..];
        let f = r.beta * dot(part, &r.v);
        for (xi, vi) in part.iter_mut().zip(&r.v) {
            *xi -= f * vi;
        }
    }
    x
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `V diag(values) Vᵀ` for a deterministic orthogonal V (Householder products).
    fn with_spectrum(values: &[f64]) -> Mat<f64> {
        let m = values.len();
        let mut q = Mat::<f64>::identity(m, m);
        for k in 0..3 {
            let v: Vec<f64> = (0..m)
                .map(|i| (((i + 1) * (k + 5) * 31) % 17) as f64 - 8.0)
                .collect();
            let vv: f64 = v.iter().map(|x| x * x).sum();
            let h = Mat::<f64>::from_fn(m, m, |i, j| {
                f64::from(u8::from(i == j)) - 2.0 * v[i] * v[j] / vv
            });
            q = &q * &h;
        }
        let d = Mat::<f64>::from_fn(m, m, |i, j| if i == j { values[i] } else { 0.0 });
        &q * &d * q.transpose()
    }

    fn check(a: &Mat<f64>, take: usize) {
        let m = a.nrows();
        let svd = a.self_adjoint_eigen(faer::Side::Lower).unwrap();
        let reference: Vec<f64> = (0..m).rev().map(|i| svd.S()[i]).collect();
        let (values, vectors) = top_eigenpairs(a.as_ref(), take);
        // The floor keeps a tolerance for the zero matrix.
        let scale = reference
            .iter()
            .fold(1e-200, |acc: f64, v| acc.max(v.abs()));
        for j in 0..take {
            assert!(
                (values[j] - reference[j]).abs() <= 1e-12 * scale,
                "value {j}: {} vs {}",
                values[j],
                reference[j]
            );
            let x = vectors.col(j);
            let ax = a * x;
            let residual = (0..m)
                .map(|i| (ax[i] - values[j] * x[i]).powi(2))
                .sum::<f64>()
                .sqrt();
            assert!(residual <= 1e-11 * scale, "vector {j}: residual {residual}");
        }
        let gram = vectors.transpose() * &vectors;
        for i in 0..take {
            for j in 0..take {
                let want = f64::from(u8::from(i == j));
                assert!(
                    (gram[(i, j)] - want).abs() < 1e-11,
                    "orthogonality ({i}, {j})"
                );
            }
        }
    }

    #[test]
    fn matches_faer_on_random_symmetric_matrices() {
        for &m in &[1usize, 2, 3, 7, 35, 80] {
            let b =
                Mat::<f64>::from_fn(m, m, |i, j| (((i * 37 + j * 11) % 23) as f64) / 23.0 - 0.4);
            let a = &b + b.transpose();
            check(&a, m.min(11));
        }
    }

    #[test]
    fn repeated_tiny_and_graded_eigenvalues() {
        // Exact ties at the top, a tie straddling the cut, zeros and a graded tail.
        let mut values = vec![5.0, 5.0, 5.0, 3.0, 2.0, 2.0, 1e-9, 0.0, 0.0];
        values.extend((0..30).map(|i| 0.5f64.powi(i)));
        check(&with_spectrum(&values), 6);
        check(&Mat::<f64>::identity(12, 12), 5);
        check(&Mat::<f64>::zeros(5, 5), 3);
    }
}
