//! One changed matrix screened against its cached base spectrum when no LoRA factors come with
//! it: a merged or fully fine-tuned checkpoint's `W'` (`scan --tuned --method auto`), or a DoRA
//! module's row-rescaled `W0 + s·B·A`.
//!
//! For a checkpoint, a randomized rank-revealing sketch of `ΔW = W' − W0` decides first: when
//! ΔW is of low rank (a merged LoRA), it is factored and the exact Brand update runs on it;
//! otherwise the top k of `W'` come from the randomized solver and are compared with the cached
//! base vectors `U0`. With a device backend the sketch and the top-k solve run on the device
//! (`spectrum::device`), and the Brand update's projections too (`Backend::project`); the CPU
//! solvers run whenever the device declines.

use super::brand::{self, Update};
use super::krylov::Triplets;
use super::params::SolverParams;
use super::randomized::{
    self, DenseOp, LowRank, LowRankParams, Operator, RandomizedParams, RandomizedSvd,
};
use super::Solver;
use crate::backend::{Backend, BackendKind, DeviceOperator, Spectrum};
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
    // On the CPU, ΔW is formed in f64 in the same pass that takes the norms; a device backend
    // forms it itself from the stored matrices, so only the norms are taken here.
    let (mut fro_delta, mut fro_w1) = (0.0f64, 0.0f64);
    let mut add = |(d2, w2): (f64, f64)| {
        fro_delta += d2;
        fro_w1 += w2;
    };
    let host_delta = if backend.kind() == BackendKind::Cpu {
        Some(DenseOp::from_rows(rows, cols, |i, row| {
            add(delta_row(w0, w1, i, Some(row)))
        }))
    } else {
        (0..rows).for_each(|i| add(delta_row(w0, w1, i, None)));
        None
    };
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
    let sketch = lr.sketch(fro_delta, threshold, floor);
    let on_host =
        |delta_op: DenseOp| randomized::low_rank(&delta_op, fro_delta, threshold, floor, &lr);
    let decided = match host_delta {
        Some(delta_op) => on_host(delta_op),
        None => {
            // ΔW = W' − W0 on the device (both uploaded once, as one f64 matrix).
            let delta = DeviceOperator {
                rows,
                cols,
                dense: vec![(1.0, *w1), (-1.0, *w0)],
                low_rank: None,
                row_scale: None,
            };
            match super::device::low_rank(backend, &delta, &sketch)? {
                Some(decided) => decided,
                None => on_host(DenseOp::from_rows(rows, cols, |i, row| {
                    delta_row(w0, w1, i, Some(row));
                })),
            }
        }
    };
    match decided {
        Ok(f) => merged_lora(backend, base, &f, fro_delta, want, krylov),
        Err(_) => {
            let tuned = DeviceOperator {
                rows,
                cols,
                dense: vec![(1.0, *w1)],
                low_rank: None,
                row_scale: None,
            };
            if let Some(s) = screen_on_device(backend, base, &tuned, want, params)? {
                return Ok(s);
            }
            screen_operator(
                backend,
                base,
                &DenseOp::from_row_major(&w1.to_f32(), rows, cols),
                want,
                params,
            )
        }
    }
}

/// Row `i` of `ΔW = W' − W0` (into `delta`, when given) and its share of the norms:
/// `(‖ΔW_i‖², ‖W'_i‖²)`. A row at a time: whole f32 copies of a Llama MLP pair would be 360 MB of
/// page faults and writes for values read once.
fn delta_row(
    w0: &TensorRef<'_>,
    w1: &TensorRef<'_>,
    i: usize,
    delta: Option<&mut [f64]>,
) -> (f64, f64) {
    let (r0, r1) = (w0.row(i).to_f32(), w1.row(i).to_f32());
    let (mut d2, mut w2) = (0.0f64, 0.0f64);
    let mut each = |x0: f32, x1: f32| {
        let d = f64::from(x1) - f64::from(x0);
        d2 += d * d;
        w2 += f64::from(x1) * f64::from(x1);
        d
    };
    match delta {
        Some(row) => {
            for ((o, &x0), &x1) in row.iter_mut().zip(&r0).zip(&r1) {
                *o = each(x0, x1);
            }
        }
        None => r0.iter().zip(&r1).for_each(|(&x0, &x1)| {
            each(x0, x1);
        }),
    }
    (d2, w2)
}

/// A merged LoRA: `ΔW ≈ L·Rᵀ` of rank `f.rank` (0: within the storage rounding), screened by the
/// exact Brand update against the cached base spectrum.
fn merged_lora(
    backend: &dyn Backend,
    base: &Spectrum,
    f: &LowRank,
    fro_delta: f64,
    want: usize,
    krylov: &SolverParams,
) -> Result<Screened> {
    let (rows, cols, r) = (f.left.nrows(), f.right.nrows(), f.rank);
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

/// [`screen_operator`] on the backend's device, when it has one (`None`: run the CPU solver).
pub fn screen_on_device(
    backend: &dyn Backend,
    base: &Spectrum,
    op: &DeviceOperator<'_>,
    want: usize,
    params: &RandomizedParams,
) -> Result<Option<Screened>> {
    match super::device::top_k(backend, op, want, params)? {
        Some(svd) => Ok(Some(screened(backend, base, svd)?)),
        None => Ok(None),
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

/// The device code path (host models of every CUDA call) against the CPU solvers and, as the
/// independent reference, dense f64 SVDs.
#[cfg(all(test, feature = "cuda"))]
mod tests {
    use super::*;
    use crate::backend::cpu::CpuBackend;
    use crate::backend::cuda::HostModelBackend;
    use crate::spectrum::dense;
    use crate::spectrum::randomized::gaussian_block;
    use crate::tensor::encode;

    const ROWS: usize = 96;
    const COLS: usize = 140;
    const WANT: usize = 7;

    /// `Σ_t 0.8^t g_t h_tᵀ` (40 terms) plus a little noise: a decaying, full-rank base.
    fn base_weights(seed: u64) -> Vec<f32> {
        let (g, h) = (
            gaussian_block(ROWS, 40, seed),
            gaussian_block(COLS, 40, seed + 1),
        );
        let noise = gaussian_block(ROWS, COLS, seed + 2);
        (0..ROWS * COLS)
            .map(|ij| {
                let (i, j) = (ij / COLS, ij % COLS);
                let s: f64 = (0..40)
                    .map(|t| 0.8f64.powi(t as i32) * g[(i, t)] * h[(j, t)])
                    .sum();
                (s + 0.01 * noise[(i, j)]) as f32
            })
            .collect()
    }

    /// Stored values: what `dtype` keeps of `w`.
    fn stored(w: &[f32], dtype: DType) -> (Vec<u8>, Vec<f64>) {
        let bytes = encode(w, dtype);
        let values = TensorRef::new(dtype, ROWS, COLS, &bytes).unwrap().to_f64();
        (bytes, values)
    }

    fn screen(backend: &dyn Backend, w0: &TensorRef<'_>, w1: &TensorRef<'_>) -> Screened {
        let base = CpuBackend.thin_svd(&w0.to_f32(), ROWS, COLS).unwrap();
        screen_checkpoint_matrix(
            backend,
            &base,
            w0,
            w1,
            WANT,
            &SolverParams::default(),
            &RandomizedParams::default(),
        )
        .unwrap()
    }

    /// The screening numbers against the dense f64 comparison of `w0` and `w1` (row-major).
    fn check_against_dense(got: &Screened, w0: &[f64], w1: &[f64], tol: f64, what: &str) {
        let m0 = faer::MatRef::from_row_major_slice(w0, ROWS, COLS);
        let m1 = faer::MatRef::from_row_major_slice(w1, ROWS, COLS);
        let want = dense::compare(m0, m1, WANT).unwrap();
        let s1 = want.sigma[0];
        for j in 0..WANT {
            assert!(
                (got.sigma[j] - want.sigma[j]).abs() <= tol * s1,
                "{what}: σ{j} {} vs {}",
                got.sigma[j],
                want.sigma[j]
            );
            assert!(
                (got.max_cos[j] - want.max_cos[j]).abs() <= tol,
                "{what}: max|cos|{j} {} vs {}",
                got.max_cos[j],
                want.max_cos[j]
            );
        }
    }

    /// A merged LoRA `W' = W0 + B·A` (r = 5) stored in f32 and in bf16: the device sketch finds
    /// rank r, its factors reproduce ΔW to the residual it claims, and both paths screen the
    /// checkpoint as the dense f64 comparison of W0 with the exact `W0 + B·A` does.
    #[test]
    fn merged_checkpoints_are_found_low_rank_on_the_device_path_as_on_the_cpu() {
        let r = 5;
        let w0f = base_weights(1);
        let (ga, gb) = (gaussian_block(r, COLS, 4), gaussian_block(ROWS, r, 5));
        for (dtype, tol) in [(DType::F32, 1e-5), (DType::BF16, 1e-3)] {
            let (b0, w0) = stored(&w0f, dtype);
            let exact: Vec<f64> = (0..ROWS * COLS)
                .map(|ij| {
                    let (i, j) = (ij / COLS, ij % COLS);
                    w0[ij] + 0.3 * (0..r).map(|t| gb[(i, t)] * ga[(t, j)]).sum::<f64>()
                })
                .collect();
            let (b1, w1) = stored(&exact.iter().map(|&x| x as f32).collect::<Vec<_>>(), dtype);
            let t0 = TensorRef::new(dtype, ROWS, COLS, &b0).unwrap();
            let t1 = TensorRef::new(dtype, ROWS, COLS, &b1).unwrap();

            // The sketch itself, on the device path: rank r, and the residual it claims is the
            // residual its factors have (recomputed here), within the threshold screening uses.
            let delta: Vec<f64> = w1.iter().zip(&w0).map(|(a, b)| a - b).collect();
            let fro = delta.iter().map(|x| x * x).sum::<f64>().sqrt();
            let fro1 = w1.iter().map(|x| x * x).sum::<f64>().sqrt();
            let threshold = unit_roundoff(dtype) * (fro1 + fro) + 1e-9 * fro;
            let floor = 4.0 * threshold * (1.0 / (ROWS as f64).sqrt() + 1.0 / (COLS as f64).sqrt());
            let op = DeviceOperator {
                rows: ROWS,
                cols: COLS,
                dense: vec![(1.0, t1), (-1.0, t0)],
                low_rank: None,
                row_scale: None,
            };
            let p = LowRankParams {
                max_rank: 24,
                ..LowRankParams::default()
            };
            let f = super::super::device::low_rank(
                &HostModelBackend,
                &op,
                &p.sketch(fro, threshold, floor),
            )
            .unwrap()
            .expect("the host models run the sketch")
            .unwrap_or_else(|e| panic!("{dtype:?}: not low rank: {e:?}"));
            assert_eq!(f.rank, r, "{dtype:?}");
            let approx = &f.left * f.right.transpose();
            let actual = (0..ROWS * COLS)
                .map(|ij| (delta[ij] - approx[(ij / COLS, ij % COLS)]).powi(2))
                .sum::<f64>()
                .sqrt();
            assert!(actual <= threshold, "{dtype:?}: {actual:e} > {threshold:e}");
            assert!(
                (actual - f.residual).abs() <= 1e-6 * fro,
                "{dtype:?}: {actual:e} vs claimed {:e}",
                f.residual
            );
            let ltl = f.left.transpose() * &f.left;
            for i in 0..r {
                for j in 0..r {
                    let id = f64::from(u8::from(i == j));
                    assert!((ltl[(i, j)] - id).abs() < 1e-12, "{dtype:?}: LᵀL");
                }
            }

            // The whole screening, both paths: merged-lora of rank r, the adapter's numbers.
            let (cpu, dev) = (
                screen(&CpuBackend, &t0, &t1),
                screen(&HostModelBackend, &t0, &t1),
            );
            for (name, s) in [("cpu", &cpu), ("device", &dev)] {
                assert_eq!(s.solver, Solver::MergedLora, "{dtype:?} {name}");
                assert_eq!(s.detected_rank, Some(r), "{dtype:?} {name}");
                check_against_dense(s, &w0, &exact, tol, &format!("{dtype:?} {name}"));
            }
        }
    }

    /// A full-rank ΔW (a dense Gaussian perturbation): neither path finds it low rank, and both
    /// screen W' as the dense f64 comparison does.
    #[test]
    fn a_full_rank_delta_is_not_low_rank_on_either_path() {
        let w0f = base_weights(7);
        let noise = gaussian_block(ROWS, COLS, 9);
        let w1f: Vec<f32> = (0..ROWS * COLS)
            .map(|ij| w0f[ij] + 0.05 * noise[(ij / COLS, ij % COLS)] as f32)
            .collect();
        let (b0, w0) = stored(&w0f, DType::F32);
        let (b1, w1) = stored(&w1f, DType::F32);
        let t0 = TensorRef::new(DType::F32, ROWS, COLS, &b0).unwrap();
        let t1 = TensorRef::new(DType::F32, ROWS, COLS, &b1).unwrap();
        let (cpu, dev) = (
            screen(&CpuBackend, &t0, &t1),
            screen(&HostModelBackend, &t0, &t1),
        );
        for (name, s) in [("cpu", &cpu), ("device", &dev)] {
            assert_eq!(s.detected_rank, None, "{name}");
            // W' of this size reaches the Krylov cap first: the named dense fallback.
            assert!(
                matches!(
                    s.solver,
                    Solver::Randomized | Solver::RandomizedDenseFallback
                ),
                "{name}: {:?}",
                s.solver
            );
            assert!(s.residual.unwrap() <= 1e-9, "{name}: {:?}", s.residual);
            // The cached base vectors are f32: |cos| to ~1e-6.
            check_against_dense(s, &w0, &w1, 1e-5, name);
        }
    }
}
