//! The small dense kernels every solver stage shares: products, norms, dot products and the
//! clipped spectral gap. Single-threaded on purpose (see [`mul`]).

use faer::linalg::matmul::matmul;
use faer::{Accum, ColRef, Mat, MatRef, Par};

/// `a · b`, single-threaded: these products are small, modules are screened in parallel
/// already, and rayon's fork/join costs more than the product itself at these sizes.
pub(crate) fn mul(a: MatRef<'_, f64>, b: MatRef<'_, f64>) -> Mat<f64> {
    let mut out = Mat::zeros(a.nrows(), b.ncols());
    matmul(out.as_mut(), Accum::Replace, a, b, 1.0, Par::Seq);
    out
}

/// `Mat::from_fn`, filled a column at a time through slices. faer's `from_fn` cost about four
/// times as much per element, which at these sizes (hundreds of rows, tens of columns) was as
/// much as the products the solver stages build these matrices for.
pub(crate) fn filled<T: faer::traits::ComplexField + Copy>(
    rows: usize,
    cols: usize,
    f: impl Fn(usize, usize) -> T,
) -> Mat<T> {
    let mut out = Mat::<T>::zeros(rows, cols);
    for j in 0..cols {
        for (i, o) in out.col_as_slice_mut(j).iter_mut().enumerate() {
            *o = f(i, j);
        }
    }
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
