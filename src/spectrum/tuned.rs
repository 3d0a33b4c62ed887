//! One changed matrix screened against its cached base spectrum when no LoRA factors come with
//! it: a merged or fully fine-tuned checkpoint's `W'` (`scan --tuned --method auto`), or a DoRA
//! module's row-rescaled `W0 + s·B·A`.
//!
//! For a checkpoint, a randomized rank-revealing sketch of `ΔW = W' − W0` decides first: when
//! ΔW is of low rank (a merged LoRA), it is factored and the exact Brand update runs on it;
//! otherwise the top k of `W'` come from the randomized solver and are compared with the cached
//! base vectors `U0`.

use super::brand::{self, Update};
use super::krylov::Triplets;
use super::params::SolverParams;
use super::randomized::{self, DenseOp, LowRankParams, Operator, RandomizedParams, RandomizedSvd};
use super::Solver;
use crate::backend::{Backend, Spectrum};
use crate::error::Result;
use crate::tensor::{DType, TensorRef};

/// What the screening of one matrix found (the module report's numbers).
pub struct Screened {
    pub sigma: Vec<f64>,
    pub max_cos: Vec<f64>,
    pub outside_base_span: Vec<f64>,
    /// `MergedLora` (low-rank ΔW, Brand update), or one of the randomized solver's.
    pub solver: Solver,
    /// The rank of ΔW when it was found to be low.
    pub detected_rank: Option<usize>,
    /// "merged-lora": `‖ΔW − L·Rᵀ‖_F / ‖ΔW‖_F`, the part of ΔW the factorisation dropped.
    pub low_rank_residual: Option<f64>,
    /// Randomized solver: its worst residual over the returned triplets, relative to σ₁.
    pub residual: Option<f64>,
}

/// Unit roundoff of a storage dtype: storing a value rounds it by at most this, relatively.
pub fn unit_roundoff(d: DType) -> f64 {
    match d {
        DType::F64 => f64::EPSILON / 2.0,
        DType::F32 => f32::EPSILON as f64 / 2.0,
        DType::F16 => 2f64.powi(-11),
        DType::BF16 => 2f64.powi(-8),
    }
}

/// The tuned matrix `w1` against the base `w0` (same shape, stored orientation) with `base`, the
/// cached spectrum of `w0`. `want` triplets (k + 1, for the tie test of the k-th).
pub fn screen_checkpoint_matrix(
    backend: &dyn Backend,
    base: &Spectrum,
    w0: &TensorRef<'_>,
    w1: &TensorRef<'_>,
    want: usize,
    krylov: &SolverParams,
    params: &RandomizedParams,
) -> Result<Screened> {
    let (rows, cols) = (w0.rows, w0.cols);
    let (a0, a1) = (w0.to_f32(), w1.to_f32());
    let (mut fro_delta, mut fro_w1) = (0.0f64, 0.0f64);
    let delta_op = DenseOp::from_rows(rows, cols, |i, row| {
        let (r0, r1) = (&a0[i * cols..(i + 1) * cols], &a1[i * cols..(i + 1) * cols]);
        for ((d, &x0), &x1) in row.iter_mut().zip(r0).zip(r1) {
            *d = x1 as f64 - x0 as f64;
            fro_delta += *d * *d;
            fro_w1 += (x1 as f64) * (x1 as f64);
        }
    });
    drop(a0);
    let (fro_delta, fro_w1) = (fro_delta.sqrt(), fro_w1.sqrt());
    // What storing W' in its dtype may have changed (≤ u·|w'| per entry), plus the arithmetic
    // slack of the solver's tolerance: a residual below this is not a property of the weights.
    let u = unit_roundoff(w1.dtype);
    let threshold = u * (fro_w1 + fro_delta) + krylov.tol * fro_delta;
    // A factorisation pays only well below min(rows, cols): past a quarter of it the Brand core
    // is as large as the matrix.
    let defaults = LowRankParams::default();
    let lr = LowRankParams {
        max_rank: defaults.max_rank.min(rows.min(cols) / 4),
        seed: params.seed,
        ..defaults
    };
    // The rounding is spread over every direction: for independent entries its spectral norm
    // is about ‖N‖_F·(1/√rows + 1/√cols); its entries scale with |w'|, not uniformly, so 4×
    // that. A singular value of ΔW above it is the weights', and kept.
    let floor = 4.0 * threshold * (1.0 / (rows as f64).sqrt() + 1.0 / (cols as f64).sqrt());
    match randomized::low_rank(&delta_op, fro_delta, threshold, floor, &lr) {
        Ok(f) => {
            drop(delta_op);
            let r = f.rank;
            if r == 0 {
                // ΔW is within the storage rounding of W': as far as its dtype can tell, W' is
                // W0, whose top vectors are the base's own.
                let n = want.min(base.rank());
                return Ok(Screened {
                    sigma: base.s[..n].iter().map(|&s| s as f64).collect(),
                    max_cos: vec![1.0; n],
                    outside_base_span: vec![0.0; n],
                    solver: Solver::MergedLora,
                    detected_rank: Some(0),
                    low_rank_residual: Some(f.residual / fro_delta.max(f64::MIN_POSITIVE)),
                    residual: None,
                });
            }
            // ΔW ≈ L·Rᵀ = B·A with B = L (rows × r) and A = Rᵀ (r × cols), scale 1.
            let b: Vec<f32> = (0..rows)
                .flat_map(|i| (0..r).map(move |j| (i, j)))
                .map(|(i, j)| f.left[(i, j)] as f32)
                .collect();
            let a: Vec<f32> = (0..r)
                .flat_map(|i| (0..cols).map(move |j| (i, j)))
                .map(|(i, j)| f.right[(j, i)] as f32)
                .collect();
            let sol = brand::solve(
                backend,
                &Update {
                    base,
                    a: &a,
                    b: &b,
                    rank: r,
                    scale: 1.0,
                },
                want,
                krylov,
            )?;
            Ok(Screened {
                max_cos: sol.max_cos(),
                outside_base_span: sol.outside_base_span(),
                sigma: sol.triplets.sigma,
                solver: Solver::MergedLora,
                detected_rank: Some(r),
                low_rank_residual: Some(f.residual / fro_delta),
                residual: None,
            })
        }
        Err(_) => {
            drop(delta_op);
            if let Some(svd) = super::device::top_k(backend, w1, want, params)? {
                return screened(backend, base, svd);
            }
            screen_operator(
                backend,
                base,
                &DenseOp::from_row_major(&a1, rows, cols),
                want,
                params,
            )
        }
    }
}

/// The top `want` triplets of `op` by the randomized solver, their left vectors compared with
/// every base vector `U0` (`base` in `op`'s orientation).
pub fn screen_operator(
    backend: &dyn Backend,
    base: &Spectrum,
    op: &dyn Operator,
    want: usize,
    params: &RandomizedParams,
) -> Result<Screened> {
    screened(backend, base, randomized::top_k(op, want, params)?)
}

/// A randomized solve's triplets compared with the base.
fn screened(backend: &dyn Backend, base: &Spectrum, svd: RandomizedSvd) -> Result<Screened> {
    let (max_cos, outside) = against_base(backend, base, &svd.triplets)?;
    Ok(Screened {
        residual: Some(svd.worst_relative_residual()),
        low_rank_residual: None,
        solver: match svd.solver {
            randomized::Solver::Randomized => Solver::Randomized,
            randomized::Solver::DenseSmall => Solver::RandomizedDenseSmall,
            randomized::Solver::DenseFallback => Solver::RandomizedDenseFallback,
        },
        sigma: svd.triplets.sigma,
        max_cos,
        outside_base_span: outside,
        detected_rank: None,
    })
}

/// Per left vector: max |cos| with the base's left vectors, and the norm of its part outside
/// their span. `U0ᵀ X` by the backend's projection (f32: the cached vectors are f32).
fn against_base(
    backend: &dyn Backend,
    base: &Spectrum,
    t: &Triplets,
) -> Result<(Vec<f64>, Vec<f64>)> {
    let (n, k, rho) = (t.x.nrows(), t.x.ncols(), base.rank());
    let x: Vec<f32> = (0..n)
        .flat_map(|i| (0..k).map(move |j| (i, j)))
        .map(|(i, j)| t.x[(i, j)] as f32)
        .collect();
    let c = backend.project(&base.u, rho, n, &x, k)?;
    let mut max_cos = vec![0.0f64; k];
    let mut inside = vec![0.0f64; k];
    for i in 0..rho {
        for j in 0..k {
            let v = c[i * k + j] as f64;
            max_cos[j] = max_cos[j].max(v.abs());
            inside[j] += v * v;
        }
    }
    let outside = inside.iter().map(|s| (1.0 - s).max(0.0).sqrt()).collect();
    Ok((max_cos, outside))
}
