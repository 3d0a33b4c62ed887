//! The check that a cached base spectrum is an SVD of the tensor it is used for: cheap random
//! products, so an entry forged by someone who can write a shared cache directory (and so
//! recompute its checksum) is caught before it is used.

use crate::backend::Spectrum;
use crate::error::Result;
use crate::tensor::{DType, TensorRef};
use faer::linalg::matmul::matmul;
use faer::{Accum, Mat, MatRef, Par};

/// Tolerances of [`probe`], relative, by the dtype the singular vectors were stored in. Genuine
/// entries measured 2e-7 (96×96) to 4e-6 (2048×1024) in f32, growing with the size, and ~3e-4
/// in f16; the forgeries of `tests/cache.rs` 5e-2 to 3.
fn probe_tolerance(stored: DType) -> f64 {
    match stored {
        DType::F16 | DType::BF16 => 1e-2,
        DType::F32 | DType::F64 => 1e-3,
    }
}

/// Checks that a cached spectrum is an SVD of `w0`, independently of the checksum (which anyone
/// who can write the cache directory can recompute), at the cost of a few matrix-vector products:
/// for random sign vectors x ∈ {±1}ⁿ and y ∈ {±1}^ρ, fresh for each call,
///
/// - reconstruction: `‖W0·x − U0·(Σ0·(V0ᵀ·x))‖ ≤ tol·‖W0‖_F` (for such x,
///   `E‖D·x‖² = ‖D‖²_F`, so this bounds `‖W0 − U0Σ0V0ᵀ‖_F` relative to `‖W0‖_F`);
/// - orthonormality: `‖U0ᵀ·U0·y − y‖ ≤ tol·‖y‖` and the same for V0.
///
/// An entry passing both is, to `tol`, an SVD of `w0`. What it cannot see: singular directions
/// exchanged within a part of the spectrum whose singular values are below `tol·‖W0‖_F`, which
/// change `W0` by less than that. The signs are drawn from the process's random hash keys, so a
/// forger cannot aim at them. Also fails on a NaN or Inf in `w0`.
pub fn probe(s: &Spectrum, w0: &TensorRef<'_>, stored: DType) -> Result<()> {
    let tol = probe_tolerance(stored);
    let (m, n, rho) = (w0.rows, w0.cols, s.rank());
    if (s.rows, s.cols) != (m, n) || s.u.len() != rho * m || s.v.len() != rho * n {
        crate::bail!(Format, "cached spectrum does not have the tensor's shape");
    }
    let mut signs = Signs::new();
    let x: Vec<f32> = (0..n).map(|_| signs.next()).collect();
    let (w0x, w0_norm) = times_sign_vector(w0, &x)?;
    if !w0_norm.is_finite() {
        crate::bail!(NonFinite, "the base tensor holds a NaN or Inf");
    }
    let yu: Vec<f32> = (0..rho).map(|_| signs.next()).collect();
    let yv: Vec<f32> = (0..rho).map(|_| signs.next()).collect();
    // The bases as faer views: row i of `u` is u_i, so `ut` is U0 (m×ρ) and `vt` is V0 (n×ρ).
    let ut = MatRef::from_row_major_slice(&s.u, rho, m).transpose();
    let vt = MatRef::from_row_major_slice(&s.v, rho, n).transpose();
    // Two passes over each basis. V0: V0·yv, then V0ᵀ·[x, V0·yv].
    let vy = product(vt, MatRef::from_column_major_slice(&yv, rho, 1));
    let xs = Mat::<f32>::from_fn(n, 2, |i, j| if j == 0 { x[i] } else { vy[(i, 0)] });
    let back_v = product(vt.transpose(), xs.as_ref());
    // U0: U0·[Σ0·V0ᵀ·x, yu], then U0ᵀ·(U0·yu).
    let cy = Mat::<f32>::from_fn(rho, 2, |i, j| {
        if j == 0 {
            s.s[i] * back_v[(i, 0)]
        } else {
            yu[i]
        }
    });
    let us = product(ut, cy.as_ref());
    let back_u = product(ut.transpose(), us.col(1).as_mat());
    let col64 =
        |m: &Mat<f32>, j: usize| -> Vec<f64> { m.col(j).iter().map(|&v| f64::from(v)).collect() };
    let (recon, vtvy, utuy) = (col64(&us, 0), col64(&back_v, 1), col64(&back_u, 0));

    let residual = distance(&w0x, &recon);
    if residual.is_nan() || residual > tol * w0_norm {
        crate::bail!(
            Format,
            "cached spectrum is not an SVD of the base tensor: probe residual {:.2e} of ‖W0‖, over the tolerance {tol:.0e}",
            residual / w0_norm
        );
    }
    for (name, back, y) in [("U0", &utuy, &yu), ("V0", &vtvy, &yv)] {
        let y64: Vec<f64> = y.iter().map(|&v| f64::from(v)).collect();
        let err = distance(back, &y64) / (rho as f64).sqrt();
        if err.is_nan() || err > tol {
            crate::bail!(
                Format,
                "cached spectrum's {name} is not orthonormal: probe error {err:.2e}, over the tolerance {tol:.0e}"
            );
        }
    }
    Ok(())
}

/// `W0·x` and `‖W0‖_F` in one pass over the tensor, in place when it is aligned f32.
fn times_sign_vector(w0: &TensorRef<'_>, x: &[f32]) -> Result<(Vec<f64>, f64)> {
    let n = w0.cols;
    let mut w0x = Vec::with_capacity(w0.rows);
    let mut norm2 = 0.0f64;
    let mut row_pass = |row: &[f32]| {
        w0x.push(dot(row, x));
        norm2 += dot(row, row);
    };
    match (w0.dtype, bytemuck::try_cast_slice::<u8, f32>(w0.bytes)) {
        (DType::F32, Ok(values)) if cfg!(target_endian = "little") => {
            values.chunks_exact(n).for_each(row_pass)
        }
        _ => {
            for row in w0.bytes.chunks_exact(n * w0.dtype.size()) {
                row_pass(&TensorRef::new(w0.dtype, 1, n, row)?.to_f32());
            }
        }
    }
    Ok((w0x, norm2.sqrt()))
}

/// `a·b`, sequential: modules are probed in parallel already.
fn product(a: MatRef<'_, f32>, b: MatRef<'_, f32>) -> Mat<f32> {
    let mut out = Mat::<f32>::zeros(a.nrows(), b.ncols());
    matmul(out.as_mut(), Accum::Replace, a, b, 1.0, Par::Seq);
    out
}

/// `a·b` with eight f32 lanes (so it vectorises) summed in f64.
fn dot(a: &[f32], b: &[f32]) -> f64 {
    let mut lanes = [0.0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f64 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(&x, &y)| f64::from(x) * f64::from(y))
        .sum();
    for (x, y) in ca.zip(cb) {
        for l in 0..8 {
            lanes[l] += x[l] * y[l];
        }
    }
    tail + lanes.iter().map(|&l| f64::from(l)).sum::<f64>()
}

fn distance(a: &[f64], b: &[f64]) -> f64 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).powi(2))
        .sum::<f64>()
        .sqrt()
}

/// Random ±1, splitmix64 seeded from the process's random hash keys (std's `RandomState`).
struct Signs {
    state: u64,
    bits: u64,
    left: u32,
}

impl Signs {
    fn new() -> Self {
        use std::hash::{BuildHasher, Hasher};
        let seed = std::collections::hash_map::RandomState::new()
            .build_hasher()
            .finish();
        Signs {
            state: seed,
            bits: 0,
            left: 0,
        }
    }

    fn next(&mut self) -> f32 {
        if self.left == 0 {
            self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = self.state;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            self.bits = z ^ (z >> 31);
            self.left = 64;
        }
        self.left -= 1;
        let bit = self.bits & 1;
        self.bits >>= 1;
        if bit == 1 {
            1.0
        } else {
            -1.0
        }
    }
}
