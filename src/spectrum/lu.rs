//! Dense LU with partial pivoting for the small systems of the shift-inverse (2r×2r).

use faer::Mat;

/// `a⁻¹ b` by Gaussian elimination with partial pivoting (a is p×p, p = 2r: tens of rows, where
/// a general blocked LU costs more in setup than in arithmetic). `None` on an exactly zero pivot.
/// Works in place on the column-major `a` and `b`, so that each row operation runs over a
/// contiguous column; one small buffer (the multipliers) is the only allocation.
pub(crate) fn solve_dense(mut a: Mat<f64>, mut b: Mat<f64>) -> Option<Mat<f64>> {
    let (p, c) = (a.nrows(), b.ncols());
    let mut f = vec![0.0; p];
    for k in 0..p {
        let col = a.col_as_slice(k);
        let pivot = (k..p).max_by(|&i, &j| col[i].abs().total_cmp(&col[j].abs()))?;
        let pv = col[pivot];
        if pv == 0.0 {
            return None;
        }
        // Columns before k hold only multipliers below row k, which are not used again.
        if pivot != k {
            for j in k..p {
                a.col_as_slice_mut(j).swap(k, pivot);
            }
            for j in 0..c {
                b.col_as_slice_mut(j).swap(k, pivot);
            }
        }
        // Multipliers below the pivot, then each later column loses f·(its pivot-row entry).
        for (fi, x) in f[k + 1..].iter_mut().zip(&a.col_as_slice(k)[k + 1..]) {
            *fi = x / pv;
        }
        let eliminate = |v: &mut [f64]| {
            let vk = v[k];
            if vk != 0.0 {
                for (vi, fi) in v[k + 1..].iter_mut().zip(&f[k + 1..]) {
                    *vi -= fi * vk;
                }
            }
        };
        for j in k + 1..p {
            eliminate(a.col_as_slice_mut(j));
        }
        for j in 0..c {
            eliminate(b.col_as_slice_mut(j));
        }
    }
    for j in 0..c {
        let v = b.col_as_slice_mut(j);
        for k in (0..p).rev() {
            let ak = a.col_as_slice(k);
            let xk = v[k] / ak[k];
            v[k] = xk;
            for (vi, ai) in v[..k].iter_mut().zip(&ak[..k]) {
                *vi -= ai * xk;
            }
        }
    }
    Some(b)
}
