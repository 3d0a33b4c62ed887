//! Unit tests of the CUDA backend: plans against row-major host products, the algorithms run on
//! host models of every call (`host`), the probe without CUDA, and — where a device can be
//! opened — the device itself (skipped with a printed reason otherwise; failing instead under
//! `IG_REQUIRE_CUDA=1`).

use super::host::*;
use super::plan::*;
use super::svd::{apply_r_signs, canonical_signs, descending_spectrum};
use super::*;
use std::cell::Cell;

fn gemm0(s: &GemmShape, a: &[f64], b: &[f64]) -> Vec<f64> {
    let mut c = vec![0.0; s.ldc * s.n];
    host_gemm(s, 1.0, a, b, 0.0, &mut c);
    c
}

fn syrk0(s: &SyrkShape, a: &[f64]) -> Vec<f64> {
    let mut c = vec![f64::NAN; s.ldc * s.n];
    host_syrk_lower(s, a, &mut c);
    c
}

/// The device algorithm with every call replaced by its host model.
fn host_svd(w: &[f32], rows: usize, cols: usize) -> Spectrum {
    let plan = SvdPlan::new(rows, cols).unwrap();
    svd::thin_svd(&HostEngine::default(), w, &plan).unwrap()
}

#[test]
fn svd_plan_gram_matches_row_major_products() {
    for &(rows, cols) in &[(3, 5), (5, 3), (4, 4), (1, 6), (6, 1)] {
        let plan = SvdPlan::new(rows, cols).unwrap();
        let w = random(rows * cols, (rows * 31 + cols) as u64);
        let g = &plan.gram;
        assert!(g.lda >= if g.trans { g.k } else { g.n }, "lda too small");
        assert!(
            extent(
                if g.trans { g.k } else { g.n },
                if g.trans { g.n } else { g.k },
                g.lda
            ) <= w.len()
        );
        let c = syrk0(g, &w);
        let s = plan.small;
        for i in 0..s {
            for j in 0..=i {
                // Row-major reference: W·Wᵀ when rows ≤ cols, else Wᵀ·W.
                let want: f64 = if plan.eig_side_is_u {
                    (0..cols).map(|t| w[i * cols + t] * w[j * cols + t]).sum()
                } else {
                    (0..rows).map(|t| w[t * cols + i] * w[t * cols + j]).sum()
                };
                assert!(
                    (c[i + j * s] - want).abs() < 1e-12,
                    "{rows}×{cols} G[{i},{j}]"
                );
            }
        }
    }
}

#[test]
fn svd_plan_back_multiply_matches_row_major_products() {
    for &(rows, cols) in &[(3, 5), (5, 3), (4, 4), (1, 6), (6, 1)] {
        let plan = SvdPlan::new(rows, cols).unwrap();
        let (s, l) = (plan.small, plan.large);
        let w = random(rows * cols, 7 + rows as u64);
        // E: s vectors of length s, contiguous (what descending_spectrum produces).
        let e = random(s * s, 11 + cols as u64);
        let b = &plan.back;
        assert_eq!((b.m, b.n, b.ldc), (l, s, l));
        let (ar, ac) = if b.transa { (b.k, b.m) } else { (b.m, b.k) };
        assert!(b.lda >= ar && extent(ar, ac, b.lda) <= w.len());
        assert!(b.ldb >= b.k && extent(b.k, b.n, b.ldb) <= e.len());
        let y = gemm0(b, &w, &e);
        for j in 0..s {
            for t in 0..l {
                // Column j of Y = Wᵀ·e_j (length cols) or W·e_j (length rows).
                let want: f64 = if plan.eig_side_is_u {
                    (0..rows).map(|i| w[i * cols + t] * e[j * s + i]).sum()
                } else {
                    (0..cols).map(|i| w[t * cols + i] * e[j * s + i]).sum()
                };
                assert!(
                    (y[t + j * l] - want).abs() < 1e-12,
                    "{rows}×{cols} Y[{t},{j}]"
                );
            }
        }
    }
}

#[test]
fn project_gemm_matches_naive_triple_loop() {
    for &(k, n, r) in &[(3, 4, 2), (1, 5, 1), (4, 1, 3), (2, 3, 5)] {
        let basis = random(k * n, 3);
        let x = random(n * r, 5);
        let g = project_gemm(k, n, r);
        assert!(!g.transa && !g.transb);
        assert!(g.lda >= g.m && extent(g.m, g.k, g.lda) <= x.len());
        assert!(g.ldb >= g.k && extent(g.k, g.n, g.ldb) <= basis.len());
        let out = gemm0(&g, &x, &basis);
        assert_eq!(out.len(), k * r);
        for i in 0..k {
            for j in 0..r {
                let want: f64 = (0..n).map(|t| basis[i * n + t] * x[t * r + j]).sum();
                assert!((out[i * r + j] - want).abs() < 1e-12);
            }
        }
    }
}

#[test]
fn oversized_dimensions_are_a_limit_error_before_any_device_work() {
    let e = Error::from(SvdPlan::new(3_000_000_000, 2).unwrap_err());
    assert_eq!(e.kind(), ErrorKind::Limit);
    assert!(int(project_gemm(1 << 31, 2, 2).n).is_err());
    assert!(
        SvdPlan::new(50_000, 50_000).is_err(),
        "ρ² = 2.5e9 overflows c_int"
    );
}

#[test]
fn device_byte_estimates_are_exact_and_overflow_checked() {
    // 300×200: W 480000, G 320000, λ 1600, Y 480000 bytes.
    let (w, g, v, y) = (300 * 200 * 8, 200 * 200 * 8, 200 * 8, 300 * 200 * 8);
    let eig = w + g + v + 1000 * 8 + 256;
    let back = w + g + v + y;
    let qr = y + 2 * v + 10 * 8 + 256;
    assert_eq!(
        svd_device_bytes(300, 200, 1000, 10),
        Some(eig.max(back).max(qr))
    );
    assert_eq!(
        svd_device_bytes(200, 300, 1000, 10),
        svd_device_bytes(300, 200, 1000, 10)
    );
    assert_eq!(svd_device_bytes(usize::MAX, 2, 0, 0), None);
    assert_eq!(svd_device_bytes(4, 4, usize::MAX, 0), None);
    assert_eq!(project_device_bytes(2, 3, 4), Some(4 * (6 + 12 + 8)));
    assert_eq!(project_device_bytes(usize::MAX, 2, 1), None);
    assert_eq!(project_device_bytes(1 << 62, 1, 1), None);
    assert_eq!(syevd_workspace_guess(10), 1 + 60 + 200);
    assert_eq!(syevd_workspace_guess(usize::MAX), usize::MAX);
}

#[test]
fn memory_checks_name_need_and_budget() {
    let mb = 1 << 20;
    assert!(check_device_memory("x", 10 * mb, Some(10 * mb), None).is_ok());
    let e = Error::from(
        check_device_memory("thin_svd of 4×4", 12 * mb + mb / 2, Some(8 * mb), None).unwrap_err(),
    );
    assert_eq!(e.kind(), ErrorKind::Cuda);
    assert_eq!(
        e.message(),
        "thin_svd of 4×4 needs 12.5 MiB of GPU memory, budget 8.0 MiB"
    );
    let e = Error::from(check_device_memory("p", 10 * mb, None, Some(70 * mb)).unwrap_err());
    assert!(
        e.message().contains("only 70.0 MiB free"),
        "{}",
        e.message()
    );
    assert!(check_device_memory("p", 10 * mb, None, Some(80 * mb)).is_ok());
    assert!(check_device_memory("p", usize::MAX, None, Some(usize::MAX)).is_err());
}

#[test]
fn eigenvalues_reverse_and_clamp() {
    // n = 3, column j of the eigenvector matrix is [j, j, j] + [0, 10, 20].
    let vecs = vec![0.0, 10.0, 20.0, 1.0, 11.0, 21.0, 2.0, 12.0, 22.0];
    let (s, v) = descending_spectrum(&[-1e-18, 4.0, 9.0], &vecs, 3);
    assert_eq!(s, vec![3.0, 2.0, 0.0]);
    assert_eq!(v, vec![2.0, 12.0, 22.0, 1.0, 11.0, 21.0, 0.0, 10.0, 20.0]);
    let (s, _) = descending_spectrum(&[-0.0, 0.0], &[1.0, 0.0, 0.0, 1.0], 2);
    assert_eq!(s, vec![0.0, 0.0]);
}

#[test]
fn signs_are_canonical_and_follow_r() {
    let mut v = vec![0.1, -0.9, 0.3, 0.5, 0.2, -0.1];
    canonical_signs(&mut v, 3);
    assert_eq!(v, vec![-0.1, 0.9, -0.3, 0.5, 0.2, -0.1]);
    let mut q = vec![1.0, 2.0, 3.0, 4.0];
    apply_r_signs(&mut q, &[-2.0, 0.0], 2);
    assert_eq!(q, vec![-1.0, -2.0, 3.0, 4.0]);
}

#[test]
fn missing_library_message_lists_each_one() {
    assert!(missing_libraries(&[("a", true), ("b", true)]).is_none());
    let m = missing_libraries(&[
        ("libcuda (CUDA driver)", false),
        ("libcusolver (cuSOLVER)", true),
        ("libcublas (cuBLAS)", false),
    ])
    .unwrap()
    .to_string();
    assert!(
        m.contains("libcuda (CUDA driver), libcublas (cuBLAS)"),
        "{m}"
    );
    let boxed: Box<dyn Any + Send> = Box::new(String::from("boom"));
    assert_eq!(panic_message(boxed.as_ref()), "boom");
}

thread_local!(static PANICKED_HERE: Cell<bool> = const { Cell::new(false) });

#[test]
fn probe_without_cuda_is_a_clean_error() {
    // Record panics on this thread (a caught one still runs the hook and prints).
    let previous = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        PANICKED_HERE.with(|p| p.set(true));
        previous(info)
    }));
    let result = CudaBackend::probe(0, None);
    assert!(
        !PANICKED_HERE.with(Cell::get),
        "probe panicked (and printed it)"
    );
    // SAFETY: only tries to dlopen.
    if unsafe { cudarc::driver::sys::is_culib_present() } {
        if let Err(e) = result {
            assert_eq!(e.kind(), ErrorKind::Cuda);
        }
        let e = CudaBackend::probe(1 << 20, None)
            .err()
            .expect("no machine has 2^20 GPUs");
        assert_eq!(e.kind(), ErrorKind::Cuda);
        assert!(!PANICKED_HERE.with(Cell::get));
        return;
    }
    let e = result.err().expect("probe cannot succeed without libcuda");
    assert_eq!(e.kind(), ErrorKind::Cuda);
    assert!(e.message().contains("libcuda"), "{}", e.message());
}

#[test]
fn backend_is_send_and_sync() {
    fn check<T: Send + Sync>() {}
    check::<CudaBackend>();
}

// --- device tests: pass with a note where no CUDA device can be opened ---

pub(super) fn device() -> Option<CudaBackend> {
    match CudaBackend::probe(0, None) {
        Ok(b) => Some(b),
        Err(e) if std::env::var("IG_REQUIRE_CUDA").as_deref() == Ok("1") => {
            panic!("IG_REQUIRE_CUDA=1 but no CUDA device: {}", e.message())
        }
        Err(e) => {
            println!("skipped: no CUDA device ({})", e.message());
            None
        }
    }
}

/// A random rows×cols matrix of exactly rank `rank` (row-major).
fn low_rank(rows: usize, cols: usize, rank: usize) -> Vec<f32> {
    let a = random32(rows * rank, 1);
    let b = random32(rank * cols, 2);
    (0..rows * cols)
        .map(|ij| {
            (0..rank)
                .map(|t| a[(ij / cols) * rank + t] * b[t * cols + ij % cols])
                .sum()
        })
        .collect()
}

/// Host reference: σ descending and left singular vectors (rows) from W·Wᵀ by Jacobi in f64.
fn host_left_svd(w: &[f32], rows: usize, cols: usize) -> (Vec<f64>, Vec<Vec<f64>>) {
    let mut g = vec![0.0; rows * rows];
    for i in 0..rows {
        for j in 0..rows {
            g[i + j * rows] = (0..cols)
                .map(|t| f64::from(w[i * cols + t]) * f64::from(w[j * cols + t]))
                .sum();
        }
    }
    let (lam, vecs) = host_jacobi(g, rows);
    let mut order: Vec<usize> = (0..rows).collect();
    order.sort_by(|&a, &b| lam[b].total_cmp(&lam[a]));
    let rho = rows.min(cols);
    let s = order[..rho]
        .iter()
        .map(|&i| lam[i].max(0.0).sqrt())
        .collect();
    let u = order[..rho]
        .iter()
        .map(|&i| vecs[i * rows..(i + 1) * rows].to_vec())
        .collect();
    (s, u)
}

fn check_spectrum(sp: &Spectrum, w: &[f32], rows: usize, cols: usize) {
    let rho = rows.min(cols);
    assert_eq!((sp.rows, sp.cols), (rows, cols));
    assert_eq!(
        (sp.u.len(), sp.s.len(), sp.v.len()),
        (rho * rows, rho, rho * cols)
    );
    assert!(sp.s.windows(2).all(|p| p[0] >= p[1]), "σ not descending");
    let mut err2 = 0.0f64;
    let mut norm2 = 0.0f64;
    for i in 0..rows {
        for j in 0..cols {
            let rec: f64 = (0..rho)
                .map(|t| {
                    f64::from(sp.u[t * rows + i])
                        * f64::from(sp.s[t])
                        * f64::from(sp.v[t * cols + j])
                })
                .sum();
            let x = f64::from(w[i * cols + j]);
            err2 += (x - rec).powi(2);
            norm2 += x * x;
        }
    }
    let rel = (err2 / norm2.max(f64::MIN_POSITIVE)).sqrt();
    assert!(rel < 1e-5, "reconstruction error {rel:e}");
    for (name, m, len) in [("U", &sp.u, rows), ("V", &sp.v, cols)] {
        let mut worst = 0.0f64;
        for a in 0..rho {
            for b in 0..=a {
                let dot: f64 = (0..len)
                    .map(|t| f64::from(m[a * len + t]) * f64::from(m[b * len + t]))
                    .sum();
                worst = worst.max((dot - if a == b { 1.0 } else { 0.0 }).abs());
            }
        }
        assert!(worst < 1e-5, "{name} orthonormality {worst:e}");
    }
}

fn check_against_host(sp: &Spectrum, w: &[f32], rows: usize, cols: usize) {
    let (s_ref, u_ref) = host_left_svd(w, rows, cols);
    let s1 = s_ref[0];
    for (i, (&a, &b)) in sp.s.iter().zip(&s_ref).enumerate() {
        assert!((f64::from(a) - b).abs() <= 1e-5 * s1, "σ{i}: {a} vs {b}");
    }
    for i in 0..s_ref.len() {
        let gap = [i.checked_sub(1), Some(i + 1)]
            .into_iter()
            .flatten()
            .filter_map(|j| s_ref.get(j))
            .map(|&sj| (s_ref[i] - sj).abs() / s_ref[i].max(f64::MIN_POSITIVE))
            .fold(f64::INFINITY, f64::min);
        if gap <= 1e-3 || s_ref[i] < 1e-3 * s1 {
            continue;
        }
        let cos: f64 = (0..rows)
            .map(|t| f64::from(sp.u[i * rows + t]) * u_ref[i][t])
            .sum();
        assert!(cos.abs() > 1.0 - 1e-4, "u{i}: |cos| = {}", cos.abs());
    }
}

#[test]
fn host_model_of_the_pipeline_is_an_svd() {
    for &(rows, cols) in &[(30, 20), (20, 30), (1, 7), (7, 1), (16, 16)] {
        let w = random32(rows * cols, (rows * 1000 + cols) as u64);
        let sp = host_svd(&w, rows, cols);
        check_spectrum(&sp, &w, rows, cols);
        check_against_host(&sp, &w, rows, cols);
    }
    // Rank 3 in 12×25 and its transpose: the zero-σ side must still be orthonormal.
    let (rows, cols, rank) = (12, 25, 3);
    let w = low_rank(rows, cols, rank);
    for (r, c, m) in [
        (rows, cols, w.clone()),
        (cols, rows, transpose(&w, rows, cols)),
    ] {
        let sp = host_svd(&m, r, c);
        check_spectrum(&sp, &m, r, c);
        assert!(sp.s[rank] < 1e-5 * sp.s[0]);
    }
}

#[test]
fn device_thin_svd_random_wide_and_tall() {
    let Some(dev) = device() else { return };
    println!("device: {}", dev.device_name());
    for &(rows, cols) in &[(300, 200), (200, 300), (1, 7), (7, 1), (64, 64)] {
        let w = random32(rows * cols, (rows * 1000 + cols) as u64);
        let sp = dev.thin_svd(&w, rows, cols).unwrap();
        check_spectrum(&sp, &w, rows, cols);
        check_against_host(&sp, &w, rows, cols);
    }
}

#[test]
fn device_thin_svd_rank_deficient_and_graded() {
    let Some(dev) = device() else { return };
    // Rank 5 in a 40×90: thirty-five zero σ, whose vectors must still come out orthonormal.
    let (rows, cols, rank) = (40, 90, 5);
    let w = low_rank(rows, cols, rank);
    for (r, c, m) in [
        (rows, cols, w.clone()),
        (cols, rows, transpose(&w, rows, cols)),
    ] {
        let sp = dev.thin_svd(&m, r, c).unwrap();
        check_spectrum(&sp, &m, r, c);
        assert!(
            sp.s[rank] < 1e-5 * sp.s[0],
            "σ after the rank: {}",
            sp.s[rank]
        );
    }
    // Columns scaled over six decades: an ill-conditioned but full-rank matrix.
    let (rows, cols) = (120, 80);
    let mut w = random32(rows * cols, 9);
    for (ij, x) in w.iter_mut().enumerate() {
        *x *= 10f32.powf(-6.0 * (ij % cols) as f32 / cols as f32);
    }
    let sp = dev.thin_svd(&w, rows, cols).unwrap();
    check_spectrum(&sp, &w, rows, cols);
    let zero = dev.thin_svd(&[0.0; 12], 3, 4).unwrap();
    check_spectrum_zero(&zero);
}

fn check_spectrum_zero(sp: &Spectrum) {
    assert!(sp.s.iter().all(|&s| s == 0.0));
    assert!(sp.u.iter().chain(sp.v.iter()).all(|x| x.is_finite()));
}

fn transpose(w: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    (0..rows * cols)
        .map(|ij| w[(ij % rows) * cols + ij / rows])
        .collect()
}

#[test]
fn device_project_matches_triple_loop() {
    let Some(dev) = device() else { return };
    for &(k, n, r) in &[(16, 300, 8), (1, 1, 1), (200, 64, 3), (5, 0, 4), (0, 3, 2)] {
        let basis = random32(k * n, 21);
        let x = random32(n * r, 22);
        let out = dev.project(&basis, k, n, &x, r).unwrap();
        assert_eq!(out.len(), k * r);
        for i in 0..k {
            for j in 0..r {
                let want: f64 = (0..n)
                    .map(|t| f64::from(basis[i * n + t]) * f64::from(x[t * r + j]))
                    .sum();
                let scale: f64 = (0..n)
                    .map(|t| (f64::from(basis[i * n + t]) * f64::from(x[t * r + j])).abs())
                    .sum();
                assert!((f64::from(out[i * r + j]) - want).abs() <= 1e-5 * scale.max(1e-30));
            }
        }
    }
}

#[test]
fn device_budget_is_enforced_before_allocating() {
    let Some(_) = device() else { return };
    let dev = CudaBackend::probe(0, Some(1 << 20)).unwrap();
    let w = vec![1.0f32; 600 * 500];
    let e = dev.thin_svd(&w, 600, 500).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Cuda);
    assert!(e.message().contains("budget 1.0 MiB"), "{}", e.message());
    let e = dev.project(&w, 600, 500, &w[..500 * 100], 100).unwrap_err();
    assert!(e.message().contains("budget"), "{}", e.message());
}

#[test]
fn host_models_of_the_svd_stay_within_the_memory_plan_and_call_each_library_once() {
    for &(rows, cols) in &[(48, 20), (20, 48)] {
        let w = random32(rows * cols, 5);
        let plan = SvdPlan::new(rows, cols).unwrap();
        let e = HostEngine::default();
        let sp = svd::thin_svd(&e, &w, &plan).unwrap();
        check_spectrum(&sp, &w, rows, cols);
        let (peak, planned) = (e.peak.get(), e.largest_reservation());
        assert!(peak <= planned, "peak {peak} over the plan {planned}");
        assert!(
            planned <= 2 * peak,
            "plan {planned} loose against peak {peak}"
        );
        for (call, times) in [("syrk", 1), ("syevd", 1), ("gemm", 1), ("qr", 1)] {
            assert_eq!(e.count(call), times, "{call}: {:?}", e.calls.borrow());
        }
        let budgeted = HostEngine::with_budget(planned - 1);
        let err = svd::thin_svd(&budgeted, &w, &plan).unwrap_err();
        assert!(matches!(err, CudaError::OverBudget { .. }), "{err}");
        assert_eq!(budgeted.count("upload"), 0, "refused before uploading");
    }
}

#[test]
fn the_probe_runs_once_per_process_and_devices_are_shared() {
    match (
        CudaBackend::probe(0, None),
        CudaBackend::probe(0, Some(1 << 30)),
    ) {
        (Ok(a), Ok(b)) => assert!(Arc::ptr_eq(&a.dev, &b.dev), "one context per device"),
        (Err(a), Err(b)) => {
            assert_eq!(a, b);
            assert!(
                std::error::Error::source(&a).is_some(),
                "the CudaError is kept"
            );
        }
        _ => panic!("the same probe gave two answers"),
    }
}
