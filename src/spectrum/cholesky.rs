//! Cholesky factorisation of the small Gram matrices of a basis block.

use faer::Mat;

/// The lower Cholesky factor of a small symmetric positive definite matrix (unblocked: tens of
/// rows); `None` when a pivot is not positive.
pub(crate) fn cholesky(mut a: Mat<f64>) -> Option<Mat<f64>> {
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
