//! The randomized solves on the backend's device, when it has one (CUDA), returned in the CPU
//! solvers' types:
//!
//! * [`top_k`]: the plan and stopping rule of [`randomized::top_k`], run by
//!   `Backend::randomized_top_k` on any [`DeviceOperator`] (a tuned `W'`, DoRA's
//!   `diag(d)·(W0 + s·B·A)`);
//! * [`low_rank`]: the rank-revealing sketch of [`randomized::low_rank`] (its decisions are the
//!   shared `SketchRule`'s), run by `Backend::low_rank_sketch` on `W' − W0`.
//!
//! `None` means "run the CPU solver": no device solver, an operator too small for the Krylov
//! block, or a device solve that reached its basis cap first (the CPU solver then ends in its
//! named dense fallback).
//!
//! [`randomized::top_k`]: super::randomized::top_k
//! [`randomized::low_rank`]: super::randomized::low_rank

use super::krylov::Triplets;
use super::randomized::{LowRank, NotLowRank, RandomizedParams, RandomizedSvd, Solver};
use crate::backend::{Backend, DeviceOperator, DeviceSketch, SketchParams, TopKParams};
use crate::error::Result;
use faer::Mat;

/// Top `k` of `op` on `backend`'s device.
pub fn top_k(
    backend: &dyn Backend,
    op: &DeviceOperator<'_>,
    k: usize,
    p: &RandomizedParams,
) -> Result<Option<RandomizedSvd>> {
    let params = TopKParams {
        k,
        oversampling: p.oversampling,
        tol: p.tol,
        max_basis: p.max_basis,
        seed: p.seed,
    };
    let Some(t) = backend.randomized_top_k(op, &params)? else {
        return Ok(None);
    };
    if !t.converged {
        return Ok(None);
    }
    let (rows, cols, k) = (op.rows, op.cols, t.sigma.len());
    Ok(Some(RandomizedSvd {
        triplets: Triplets {
            sigma: t.sigma,
            x: columns(&t.x, rows, k),
            y: columns(&t.y, cols, k),
        },
        left_residuals: t.left_residuals,
        right_residuals: t.right_residuals,
        basis: t.basis,
        solver: Solver::Randomized,
    }))
}

/// The rank-revealing sketch of `op` (dense terms: `W' − W0`) on `backend`'s device.
pub fn low_rank(
    backend: &dyn Backend,
    op: &DeviceOperator<'_>,
    p: &SketchParams,
) -> Result<Option<std::result::Result<LowRank, NotLowRank>>> {
    Ok(backend.low_rank_sketch(op, p)?.map(|s| match s {
        DeviceSketch::LowRank {
            left,
            right,
            rank,
            residual,
        } => Ok(LowRank {
            left: columns(&left, op.rows, rank),
            right: columns(&right, op.cols, rank),
            rank,
            residual,
        }),
        DeviceSketch::NotLowRank { sketched, residual } => Err(NotLowRank { sketched, residual }),
    }))
}

/// `k` contiguous vectors of length `len` as the columns of a len × k matrix.
fn columns(v: &[f64], len: usize, k: usize) -> Mat<f64> {
    Mat::from_fn(len, k, |i, j| v[j * len + i])
}

#[cfg(all(test, feature = "cuda"))]
mod tests {
    use super::*;
    use crate::backend::cpu::CpuBackend;
    use crate::spectrum::randomized::{self, DenseOp};
    use crate::tensor::{encode, DType, TensorRef};

    /// The device code path (on host models of every CUDA call) against the CPU solver on the
    /// same stored matrix: the same σ and vectors, both residual tests met.
    #[test]
    fn the_device_path_equals_the_cpu_solver() {
        let (rows, cols, k) = (150, 220, 6);
        // A decaying spectrum: W = Σ 0.85^t · g_t h_tᵀ with pseudo-random g, h, plus small noise.
        let mut s = 0x2545_F491_4F6C_DD1Du64;
        let mut r = move || {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s >> 11) as f64 / (1u64 << 53) as f64 - 0.5
        };
        let (g, h): (Vec<f64>, Vec<f64>) = (
            (0..rows * 30).map(|_| r()).collect(),
            (0..cols * 30).map(|_| r()).collect(),
        );
        let w: Vec<f32> = (0..rows * cols)
            .map(|ij| {
                let (i, j) = (ij / cols, ij % cols);
                let signal: f64 = (0..30)
                    .map(|t| 0.85f64.powi(t as i32) * g[i * 30 + t] * h[j * 30 + t])
                    .sum();
                (signal + 1e-3 * r()) as f32
            })
            .collect();
        let bytes = encode(&w, DType::F32);
        let op = DeviceOperator {
            rows,
            cols,
            dense: vec![(1.0, TensorRef::new(DType::F32, rows, cols, &bytes).unwrap())],
            low_rank: None,
            row_scale: None,
        };
        let p = RandomizedParams::default();
        assert!(
            top_k(&CpuBackend, &op, k, &p).unwrap().is_none(),
            "the CPU backend has no device"
        );
        let dev = top_k(&crate::backend::cuda::HostModelBackend, &op, k, &p)
            .unwrap()
            .expect("converged on the device path");
        let cpu = randomized::top_k(&DenseOp::from_row_major(&w, rows, cols), k, &p).unwrap();
        let s1 = cpu.triplets.sigma[0];
        assert!(
            dev.worst_relative_residual() <= p.tol,
            "{:e}",
            dev.worst_relative_residual()
        );
        for j in 0..k {
            assert!(
                (dev.triplets.sigma[j] - cpu.triplets.sigma[j]).abs() <= 1e-9 * s1,
                "σ{j}"
            );
            let cos: f64 = (0..rows)
                .map(|i| dev.triplets.x[(i, j)] * cpu.triplets.x[(i, j)])
                .sum();
            assert!(cos.abs() > 1.0 - 1e-8, "x{j}: |cos| {}", cos.abs());
        }
    }
}
