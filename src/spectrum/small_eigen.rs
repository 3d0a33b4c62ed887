//! The top eigenpairs of a small dense symmetric matrix (the Rayleigh–Ritz matrices of
//! `krylov`, tens of rows): Householder tridiagonalisation, its eigenvalues by implicit QL,
//! inverse iteration for the wanted ones' vectors, and the reflectors applied back.
//!
//! faer's general solver computes every eigenpair with blocked kernels built for large
//! matrices; at these sizes it spent ~0.1–0.6 ms per call, more than half of a module's whole
//! screening. Only the top few pairs are ever used, and computing just those is a few times
//! cheaper. This is the classic EISPACK / LAPACK route (tred, tql1, dstein, dormtr), unblocked.

use super::kernels::dot;
use super::tridiagonal::{inverse_iteration, tridiagonal_eigenvalues};
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
