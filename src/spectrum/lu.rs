//! Dense LU with partial pivoting for the small systems of the shift-inverse (2r×2r).

use faer::Mat;

/// `a⁻¹ b` by Gaussian elimination with partial pivoting (a is p×p, p = 2r: tens of rows, where
/// a general blocked LU costs more in setup than in arithmetic). `None` on an exactly zero pivot.
/// Works on the transposes, so that each row operation runs over a contiguous column.
pub(crate) fn solve_dense(a: Mat<f64>, b: Mat<f64>) -> Option<Mat<f64>> {
    let (p, c) = (a.nrows(), b.ncols());
    // at[k] is column k of a; bt[j] is column j of b.
    let mut at: Vec<Vec<f64>> = (0..p).map(|k| a.col_as_slice(k).to_vec()).collect();
    let mut bt: Vec<Vec<f64>> = (0..c).map(|j| b.col_as_slice(j).to_vec()).collect();
    for k in 0..p {
        let col = &at[k];
        let pivot = (k..p).max_by(|&i, &j| col[i].abs().total_cmp(&col[j].abs()))?;
        if col[pivot] == 0.0 {
            return None;
        }
        for v in at.iter_mut().chain(bt.iter_mut()) {
            v.swap(k, pivot);
        }
        // Multipliers below the pivot, then each later column loses f·(its pivot-row entry).
        let f: Vec<f64> = at[k][k + 1..].iter().map(|x| x / at[k][k]).collect();
        for v in at[k + 1..].iter_mut().chain(bt.iter_mut()) {
            let vk = v[k];
            if vk != 0.0 {
                for (vi, fi) in v[k + 1..].iter_mut().zip(&f) {
                    *vi -= fi * vk;
                }
            }
        }
    }
    let mut out = Mat::zeros(p, c);
    for (j, v) in bt.iter_mut().enumerate() {
        for k in (0..p).rev() {
            let xk = v[k] / at[k][k];
            v[k] = xk;
            for (vi, ai) in v[..k].iter_mut().zip(&at[k][..k]) {
                *vi -= ai * xk;
            }
        }
        out.col_as_slice_mut(j).copy_from_slice(v);
    }
    Some(out)
}
