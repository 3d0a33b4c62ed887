//! The operators the randomized solver runs on, given only by products with blocks: a dense
//! matrix, a base plus a factored low-rank update, a row rescaling, and DoRA's adapted weight.

use super::kernels::mul;
use super::krylov::Operator;
use crate::error::Result;
use faer::linalg::matmul::matmul;
use faer::{Accum, Mat, MatMut, MatRef, Par};

/// `op` as a dense rows × cols matrix.
pub fn materialise(op: &dyn Operator) -> Mat<f64> {
    let (rows, cols) = (op.rows(), op.cols());
    let mut out = Mat::zeros(rows, cols);
    const BLOCK: usize = 256;
    for c0 in (0..cols).step_by(BLOCK) {
        let w = BLOCK.min(cols - c0);
        let e = Mat::from_fn(cols, w, |i, j| f64::from(u8::from(i == c0 + j)));
        op.apply(e.as_ref(), out.as_mut().subcols_mut(c0, w));
    }
    out
}

/// `Wᵀ` of an operator.
pub(super) struct Transposed<'a>(pub(super) &'a dyn Operator);

impl Operator for Transposed<'_> {
    fn rows(&self) -> usize {
        self.0.cols()
    }
    fn cols(&self) -> usize {
        self.0.rows()
    }
    fn apply(&self, y: MatRef<'_, f64>, out: MatMut<'_, f64>) {
        self.0.apply_t(y, out)
    }
    fn apply_t(&self, x: MatRef<'_, f64>, out: MatMut<'_, f64>) {
        self.0.apply(x, out)
    }
}

/// A dense matrix in f64. Products are sequential: modules are screened in parallel already.
pub struct DenseOp {
    /// `Wᵀ` column-major, i.e. `W` row-major: the safetensors layout, copied without a transpose.
    wt: Mat<f64>,
}

impl DenseOp {
    /// From a row-major rows × cols buffer (f32 or f64 values).
    pub fn from_row_major<T: Copy + Into<f64>>(w: &[T], rows: usize, cols: usize) -> DenseOp {
        assert_eq!(w.len(), rows * cols, "buffer does not fit {rows}×{cols}");
        let mut wt = Mat::<f64>::zeros(cols, rows);
        for i in 0..rows {
            let src = &w[i * cols..(i + 1) * cols];
            for (d, &s) in wt.col_mut(i).iter_mut().zip(src) {
                *d = s.into();
            }
        }
        DenseOp { wt }
    }

    /// Row by row: `fill(i, row)` writes row `i` (cols long).
    pub fn from_rows(rows: usize, cols: usize, mut fill: impl FnMut(usize, &mut [f64])) -> DenseOp {
        let mut wt = Mat::<f64>::zeros(cols, rows);
        for i in 0..rows {
            fill(i, wt.col_as_slice_mut(i));
        }
        DenseOp { wt }
    }

    /// `‖W − Q·Btᵀ‖_F²` (`q` rows × m, `bt` cols × m), formed a block of rows at a time.
    pub fn residual_squared(&self, q: MatRef<'_, f64>, bt: MatRef<'_, f64>) -> f64 {
        const BLOCK: usize = 256;
        let rows = self.wt.ncols();
        let mut sum = 0.0;
        for i0 in (0..rows).step_by(BLOCK) {
            let n = BLOCK.min(rows - i0);
            // Columns of Wᵀ − Bt·Qᵀ are the rows of the residual.
            let mut e = self.wt.as_ref().subcols(i0, n).to_owned();
            matmul(
                e.as_mut(),
                Accum::Add,
                bt,
                q.subrows(i0, n).transpose(),
                -1.0,
                Par::Seq,
            );
            sum += e.squared_norm_l2();
        }
        sum
    }

    /// Row `i` of `W`.
    pub fn row(&self, i: usize) -> &[f64] {
        self.wt.col_as_slice(i)
    }
}

impl Operator for DenseOp {
    fn rows(&self) -> usize {
        self.wt.ncols()
    }
    fn cols(&self) -> usize {
        self.wt.nrows()
    }
    fn apply(&self, y: MatRef<'_, f64>, out: MatMut<'_, f64>) {
        matmul(out, Accum::Replace, self.wt.transpose(), y, 1.0, Par::Seq);
    }
    fn apply_t(&self, x: MatRef<'_, f64>, out: MatMut<'_, f64>) {
        matmul(out, Accum::Replace, self.wt.as_ref(), x, 1.0, Par::Seq);
    }
}

/// `W0 + L·Rᵀ`: a base operator plus a low-rank update in factored form (`L` rows × r,
/// `R` cols × r), e.g. `L = s·B`, `R = Aᵀ` for a LoRA update.
pub struct LowRankOp<'a> {
    pub base: &'a dyn Operator,
    pub left: Mat<f64>,
    pub right: Mat<f64>,
}

impl Operator for LowRankOp<'_> {
    fn rows(&self) -> usize {
        self.base.rows()
    }
    fn cols(&self) -> usize {
        self.base.cols()
    }
    fn apply(&self, y: MatRef<'_, f64>, mut out: MatMut<'_, f64>) {
        self.base.apply(y, out.as_mut());
        let inner = mul(self.right.transpose(), y);
        matmul(
            out,
            Accum::Add,
            self.left.as_ref(),
            inner.as_ref(),
            1.0,
            Par::Seq,
        );
    }
    fn apply_t(&self, x: MatRef<'_, f64>, mut out: MatMut<'_, f64>) {
        self.base.apply_t(x, out.as_mut());
        let inner = mul(self.left.transpose(), x);
        matmul(
            out,
            Accum::Add,
            self.right.as_ref(),
            inner.as_ref(),
            1.0,
            Par::Seq,
        );
    }
}

/// `diag(d) · W`: every row of an operator rescaled (DoRA's `m / ‖row‖`).
pub struct RowScaledOp<'a> {
    pub inner: &'a dyn Operator,
    pub scale: Vec<f64>,
}

impl Operator for RowScaledOp<'_> {
    fn rows(&self) -> usize {
        self.inner.rows()
    }
    fn cols(&self) -> usize {
        self.inner.cols()
    }
    fn apply(&self, y: MatRef<'_, f64>, mut out: MatMut<'_, f64>) {
        self.inner.apply(y, out.as_mut());
        for j in 0..out.ncols() {
            for (o, &d) in out.as_mut().col_mut(j).iter_mut().zip(&self.scale) {
                *o *= d;
            }
        }
    }
    fn apply_t(&self, x: MatRef<'_, f64>, out: MatMut<'_, f64>) {
        let scaled = Mat::from_fn(x.nrows(), x.ncols(), |i, j| self.scale[i] * x[(i, j)]);
        self.inner.apply_t(scaled.as_ref(), out);
    }
}

/// DoRA's adapted weight `W' = m ⊙ (W0 + s·B·A) / ‖W0 + s·B·A‖_row` as an operator, as PEFT's
/// `DoraLinearLayer` computes it (`peft/tuners/lora/dora.py`): the norm is taken per output row,
/// over the input dimension, of the LoRA-adapted weight with the scale inside, and it is a
/// constant at inference (PEFT detaches it), so `W'` is `diag(m / ‖·‖)` times `W0 + s·B·A`.
pub struct DoraOp<'a> {
    op: RowScaledOp<'a>,
}

/// The pieces a [`DoraOp`] borrows: the base and the low-rank update, owned by the caller.
pub struct DoraParts<'a> {
    pub adapted: LowRankOp<'a>,
    /// `m_i / ‖row_i(W0 + s·B·A)‖`.
    pub row_scale: Vec<f64>,
}

impl<'a> DoraParts<'a> {
    /// `w0` is the base as a dense operator (rows = out, cols = in); `a` r × in and `b` out × r
    /// row-major; `magnitude` out long. Fails on a row of `W0 + s·B·A` with zero norm (PEFT's
    /// division would produce Inf/NaN there).
    pub fn new(
        w0: &'a DenseOp,
        a: &[f32],
        b: &[f32],
        rank: usize,
        scale: f64,
        magnitude: &[f32],
    ) -> Result<DoraParts<'a>> {
        let (out, inn) = (w0.rows(), w0.cols());
        assert_eq!(a.len(), rank * inn);
        assert_eq!(b.len(), out * rank);
        assert_eq!(magnitude.len(), out);
        let left = Mat::<f64>::from_fn(out, rank, |i, j| scale * b[i * rank + j] as f64);
        let right = Mat::<f64>::from_fn(inn, rank, |i, j| a[j * inn + i] as f64);
        // Row norms of W0 + s·B·A, one row at a time (never the whole adapted matrix).
        let mut row = vec![0.0; inn];
        let mut row_scale = Vec::with_capacity(out);
        for i in 0..out {
            row.copy_from_slice(w0.row(i));
            for k in 0..rank {
                let c = left[(i, k)];
                if c != 0.0 {
                    for (x, &aj) in row.iter_mut().zip(&a[k * inn..(k + 1) * inn]) {
                        *x += c * aj as f64;
                    }
                }
            }
            let n = row.iter().map(|x| x * x).sum::<f64>().sqrt();
            if n == 0.0 || !n.is_finite() {
                crate::bail!(
                    NonFinite,
                    "row {i} of W0 + s·B·A has norm {n}: DoRA's m / ‖row‖ is undefined there"
                );
            }
            row_scale.push(magnitude[i] as f64 / n);
        }
        Ok(DoraParts {
            adapted: LowRankOp {
                base: w0,
                left,
                right,
            },
            row_scale,
        })
    }

    pub fn operator(&'a self) -> DoraOp<'a> {
        DoraOp {
            op: RowScaledOp {
                inner: &self.adapted,
                scale: self.row_scale.clone(),
            },
        }
    }
}

impl Operator for DoraOp<'_> {
    fn rows(&self) -> usize {
        self.op.rows()
    }
    fn cols(&self) -> usize {
        self.op.cols()
    }
    fn apply(&self, y: MatRef<'_, f64>, out: MatMut<'_, f64>) {
        self.op.apply(y, out)
    }
    fn apply_t(&self, x: MatRef<'_, f64>, out: MatMut<'_, f64>) {
        self.op.apply_t(x, out)
    }
}
