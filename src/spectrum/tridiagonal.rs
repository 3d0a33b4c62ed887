//! The symmetric tridiagonal eigenproblem: every eigenvalue by implicit QL, and the vectors of
//! the wanted ones by inverse iteration on a pivoted tridiagonal LU (EISPACK tql1, LAPACK dstein
//! and dlagtf, unblocked: the matrices have tens of rows).

use super::kernels::dot;

/// Every eigenvalue of the tridiagonal (d, e), descending, by the implicit QL method with
/// Wilkinson-like shifts (EISPACK tql1; no vectors, so O(m²)). Bisection on Sturm counts was
/// simpler but its serial divisions made it the slowest part of the solve.
pub(super) fn tridiagonal_eigenvalues(d: &[f64], e: &[f64]) -> Vec<f64> {
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
pub(super) fn inverse_iteration(
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
