//! The CPU backend: faer's thin SVD and GEMM (rayon-parallel). Always available; the reference.

use super::{Backend, BackendKind, Spectrum};
use crate::bail;
use crate::error::Result;
use faer::linalg::matmul::matmul;
use faer::{Accum, Mat, MatRef, Par};

pub struct CpuBackend;

/// Matrices up to this many multiply-adds (`rows·cols·ρ`, about a 1024² matrix) get their SVD in
/// f64: it costs ~1.7× f32 there and buys vectors accurate to f32 storage precision. Larger ones use
/// f32 (f64 is ~2.3× slower at 2048² and beyond), whose vectors are accurate to ~1e-7·σ₁/gap.
const F64_SVD_MAX_WORK: usize = 1 << 30;

impl Backend for CpuBackend {
    fn kind(&self) -> BackendKind {
        BackendKind::Cpu
    }

    fn device(&self) -> String {
        format!("cpu ({} threads)", rayon::current_num_threads())
    }

    fn thin_svd(&self, w: &[f32], rows: usize, cols: usize) -> Result<Spectrum> {
        if w.len() != rows * cols {
            bail!(
                Internal,
                "thin_svd: {} values for a {rows}×{cols} matrix",
                w.len()
            );
        }
        let rho = rows.min(cols);
        let a = MatRef::from_row_major_slice(w, rows, cols);
        if rows * cols * rho <= F64_SVD_MAX_WORK {
            let a64 = Mat::<f64>::from_fn(rows, cols, |i, j| a[(i, j)] as f64);
            svd_to_spectrum(a64.as_ref(), |x| x as f32)
        } else {
            svd_to_spectrum(a, |x| x)
        }
    }

    fn project(&self, basis: &[f32], k: usize, n: usize, x: &[f32], r: usize) -> Result<Vec<f32>> {
        if basis.len() != k * n || x.len() != n * r {
            bail!(
                Internal,
                "project: shapes {k}×{n} · {n}×{r} do not fit the buffers"
            );
        }
        let b = MatRef::from_row_major_slice(basis, k, n);
        let xm = MatRef::from_row_major_slice(x, n, r);
        // Sequential: modules are screened in parallel already. Computed as `(xᵀ · basisᵀ)ᵀ`,
        // whose operands are already in the column-major layout the kernel reads, and whose
        // columns are the rows of the row-major result.
        let mut pt = Mat::<f32>::zeros(r, k);
        matmul(
            pt.as_mut(),
            Accum::Replace,
            xm.transpose(),
            b.transpose(),
            1.0,
            Par::Seq,
        );
        let mut out = Vec::with_capacity(k * r);
        for i in 0..k {
            out.extend_from_slice(pt.col_as_slice(i));
        }
        Ok(out)
    }
}

fn svd_to_spectrum<T: faer::traits::RealField + Copy>(
    a: MatRef<'_, T>,
    to_f32: impl Fn(T) -> f32 + Copy,
) -> Result<Spectrum> {
    let (rows, cols) = (a.nrows(), a.ncols());
    let svd = match a.thin_svd() {
        Ok(svd) => svd,
        Err(e) => bail!(
            Internal,
            "SVD of a {rows}×{cols} matrix did not converge: {e:?}"
        ),
    };
    let (u, s, v) = (svd.U(), svd.S().column_vector(), svd.V());
    let rho = s.nrows();
    // Store vectors as rows: u[i*rows + t] = U[t, i].
    let u_rows = (0..rho)
        .flat_map(|i| (0..rows).map(move |t| to_f32(u[(t, i)])))
        .collect();
    let v_rows = (0..rho)
        .flat_map(|i| (0..cols).map(move |t| to_f32(v[(t, i)])))
        .collect();
    Ok(Spectrum {
        rows,
        cols,
        u: u_rows,
        s: (0..rho).map(|i| to_f32(s[i])).collect(),
        v: v_rows,
    })
}
