//! The dense method: thin SVDs of `W0` and of `W'` themselves, then `max |U'ᵀ U0|`. This is what the
//! paper's code and PEFT's `reduce_intruder_dimension` do. In f64 it is the in-tree reference the
//! tests compare against; in f32 it is the baseline the benchmark times.

use crate::bail;
use crate::error::Result;
use faer::traits::RealField;
use faer::{Mat, MatRef};

/// Top singular values of `W'`, and per left vector its max |cos| with all of `W0`'s and the norm
/// of its part outside `W0`'s column space.
pub struct DenseScreen {
    pub sigma: Vec<f64>,
    pub max_cos: Vec<f64>,
    pub outside_base_span: Vec<f64>,
}

/// Compares the top `want` left singular vectors of `tuned` with all left singular vectors of `base`.
pub fn compare<T: RealField + Copy + Into<f64>>(
    base: MatRef<'_, T>,
    tuned: MatRef<'_, T>,
    want: usize,
) -> Result<DenseScreen> {
    if base.nrows() != tuned.nrows() || base.ncols() != tuned.ncols() {
        bail!(
            Shape,
            "base is {}×{} but the tuned matrix is {}×{}",
            base.nrows(),
            base.ncols(),
            tuned.nrows(),
            tuned.ncols()
        );
    }
    let svd0 = thin_svd(base)?;
    let svd1 = thin_svd(tuned)?;
    let s1 = svd1.S().column_vector();
    let want = want.min(s1.nrows());
    let u1 = svd1.U().subcols(0, want);
    let cos = u1.transpose() * svd0.U();
    let mut max_cos = Vec::with_capacity(want);
    let mut outside = Vec::with_capacity(want);
    for j in 0..want {
        let (mut best, mut inside) = (0.0f64, 0.0f64);
        for i in 0..cos.ncols() {
            let c: f64 = cos[(j, i)].into();
            best = best.max(c.abs());
            inside += c * c;
        }
        max_cos.push(best);
        outside.push((1.0 - inside).max(0.0).sqrt());
    }
    Ok(DenseScreen {
        sigma: (0..want).map(|j| s1[j].into()).collect(),
        max_cos,
        outside_base_span: outside,
    })
}

fn thin_svd<T: RealField + Copy>(a: MatRef<'_, T>) -> Result<faer::linalg::solvers::Svd<T>> {
    match a.thin_svd() {
        Ok(s) => Ok(s),
        Err(e) => bail!(
            Internal,
            "SVD of a {}×{} matrix did not converge: {e:?}",
            a.nrows(),
            a.ncols()
        ),
    }
}

/// `W0 + s·B·A` in f64 (`w0` out×in, `a` r×in, `b` out×r, all row-major).
pub fn effective_weight(
    w0: &[f64],
    out: usize,
    inn: usize,
    a: &[f32],
    b: &[f32],
    r: usize,
    scale: f64,
) -> Mat<f64> {
    let am = Mat::<f64>::from_fn(r, inn, |i, j| a[i * inn + j] as f64);
    let bm = Mat::<f64>::from_fn(out, r, |i, j| b[i * r + j] as f64);
    let delta = &bm * &am;
    Mat::from_fn(out, inn, |i, j| w0[i * inn + j] + scale * delta[(i, j)])
}
