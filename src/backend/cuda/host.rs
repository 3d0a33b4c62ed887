//! Host models of every device operation, as the reference BLAS/LAPACK define them, behind the
//! same [`Engine`] the device implements: the algorithms run unchanged on them in the tests. The
//! model also enforces the wrappers' operand checks, counts live and peak "device" bytes
//! (workspaces included), records the budget reservations and logs the call sequence.

use super::engine::{Engine, R};
use super::error::fits;
use super::plan::{
    check_device_memory, extent, qr_workspace_guess, syevd_workspace_guess, GemmShape, SyrkShape,
};
use super::solver::Sym;
use std::cell::{Cell, RefCell};
use std::rc::Rc;

pub struct HostBuf {
    pub data: Vec<f64>,
    live: Rc<Cell<usize>>,
}

impl Drop for HostBuf {
    fn drop(&mut self) {
        self.live.set(self.live.get() - 8 * self.data.len());
    }
}

#[derive(Default)]
pub struct HostEngine {
    live: Rc<Cell<usize>>,
    pub peak: Cell<usize>,
    pub budget: Option<usize>,
    /// (what, bytes) of every `reserve`/`recheck`.
    pub reserved: RefCell<Vec<(String, usize)>>,
    pub calls: RefCell<Vec<&'static str>>,
}

impl HostEngine {
    pub fn with_budget(budget: usize) -> HostEngine {
        HostEngine {
            budget: Some(budget),
            ..HostEngine::default()
        }
    }
    fn buf(&self, data: Vec<f64>) -> HostBuf {
        self.transient(8 * data.len());
        self.live.set(self.live.get() + 8 * data.len());
        HostBuf {
            data,
            live: self.live.clone(),
        }
    }
    /// Counts `bytes` on top of what is live, as a call's internal workspace would.
    fn transient(&self, bytes: usize) {
        self.peak.set(self.peak.get().max(self.live.get() + bytes));
    }
    fn log(&self, call: &'static str) {
        self.calls.borrow_mut().push(call);
    }
    pub fn count(&self, call: &str) -> usize {
        self.calls.borrow().iter().filter(|c| **c == call).count()
    }
    pub fn largest_reservation(&self) -> usize {
        self.reserved
            .borrow()
            .iter()
            .map(|r| r.1)
            .max()
            .unwrap_or(0)
    }
}

pub fn at(m: &[f64], ld: usize, i: usize, j: usize) -> f64 {
    m[i + j * ld]
}

/// `C = α·op(A)·op(B) + β·C` on column-major slices (C's untouched entries stay).
pub fn host_gemm(s: &GemmShape, alpha: f64, a: &[f64], b: &[f64], beta: f64, c: &mut [f64]) {
    for j in 0..s.n {
        for i in 0..s.m {
            let mut acc = 0.0;
            for p in 0..s.k {
                let x = if s.transa {
                    at(a, s.lda, p, i)
                } else {
                    at(a, s.lda, i, p)
                };
                let y = if s.transb {
                    at(b, s.ldb, j, p)
                } else {
                    at(b, s.ldb, p, j)
                };
                acc += x * y;
            }
            let old = if beta == 0.0 {
                0.0
            } else {
                beta * c[i + j * s.ldc]
            };
            c[i + j * s.ldc] = alpha * acc + old;
        }
    }
}

pub fn host_syrk_lower(s: &SyrkShape, a: &[f64], c: &mut [f64]) {
    for j in 0..s.n {
        for i in j..s.n {
            let mut acc = 0.0;
            for p in 0..s.k {
                acc += if s.trans {
                    at(a, s.lda, p, i) * at(a, s.lda, p, j)
                } else {
                    at(a, s.lda, i, p) * at(a, s.lda, j, p)
                };
            }
            c[i + j * s.ldc] = acc;
        }
    }
}

/// Symmetric eigen-decomposition by cyclic Jacobi, f64: (eigenvalues, column-major vectors).
pub fn host_jacobi(mut a: Vec<f64>, n: usize) -> (Vec<f64>, Vec<f64>) {
    let mut v = vec![0.0; n * n];
    (0..n).for_each(|i| v[i * n + i] = 1.0);
    let frob2: f64 = a.iter().map(|x| x * x).sum();
    for _sweep in 0..60 {
        let off: f64 = (0..n)
            .flat_map(|j| (0..n).filter(move |&i| i != j).map(move |i| (i, j)))
            .map(|(i, j)| a[i + j * n].powi(2))
            .sum();
        if off <= 1e-30 * frob2 {
            break;
        }
        for p in 0..n {
            for q in p + 1..n {
                let apq = a[p + q * n];
                if apq.abs() < 1e-300 {
                    continue;
                }
                let theta = (a[q + q * n] - a[p + p * n]) / (2.0 * apq);
                let t = theta.signum() / (theta.abs() + (theta * theta + 1.0).sqrt());
                let t = if theta == 0.0 { 1.0 } else { t };
                let c = 1.0 / (t * t + 1.0).sqrt();
                let s = t * c;
                for k in 0..n {
                    let (akp, akq) = (a[k + p * n], a[k + q * n]);
                    a[k + p * n] = c * akp - s * akq;
                    a[k + q * n] = s * akp + c * akq;
                }
                for k in 0..n {
                    let (apk, aqk) = (a[p + k * n], a[q + k * n]);
                    a[p + k * n] = c * apk - s * aqk;
                    a[q + k * n] = s * apk + c * aqk;
                }
                for k in 0..n {
                    let (vkp, vkq) = (v[k + p * n], v[k + q * n]);
                    v[k + p * n] = c * vkp - s * vkq;
                    v[k + q * n] = s * vkp + c * vkq;
                }
            }
        }
    }
    ((0..n).map(|i| a[i + i * n]).collect(), v)
}

/// geqrf + orgqr as LAPACK defines them (R's diagonal is −sign(x₀)·‖x‖, so it can be negative):
/// returns (Q as contiguous columns, R's diagonal).
pub fn host_geqrf_orgqr(mut a: Vec<f64>, m: usize, n: usize) -> (Vec<f64>, Vec<f64>) {
    let mut vs = Vec::with_capacity(n);
    let mut diag = Vec::with_capacity(n);
    for j in 0..n {
        let x: Vec<f64> = (j..m).map(|i| a[i + j * m]).collect();
        let norm = x.iter().map(|t| t * t).sum::<f64>().sqrt();
        if norm == 0.0 {
            vs.push((vec![0.0; m - j], 0.0));
            diag.push(0.0);
            continue;
        }
        let beta = -x[0].signum() * norm;
        let mut v: Vec<f64> = x.iter().map(|t| t / (x[0] - beta)).collect();
        v[0] = 1.0;
        let tau = (beta - x[0]) / beta;
        for c in j..n {
            let dot: f64 = (0..m - j).map(|i| v[i] * a[j + i + c * m]).sum();
            (0..m - j).for_each(|i| a[j + i + c * m] -= tau * v[i] * dot);
        }
        diag.push(beta);
        vs.push((v, tau));
    }
    let mut q = vec![0.0; m * n];
    (0..n).for_each(|j| q[j + j * m] = 1.0);
    for (j, (v, tau)) in vs.iter().enumerate().rev() {
        for c in 0..n {
            let dot: f64 = (0..m - j).map(|i| v[i] * q[j + i + c * m]).sum();
            (0..m - j).for_each(|i| q[j + i + c * m] -= tau * v[i] * dot);
        }
    }
    (q, diag)
}

/// `U diag(σ) Vᵀ` (rows × cols, row-major) with random orthonormal U, V.
pub fn with_spectrum(rows: usize, cols: usize, sigma: &[f64], seed: u64) -> Vec<f64> {
    let r = sigma.len();
    let (u, _) = host_geqrf_orgqr(random(rows * r, seed), rows, r);
    let (v, _) = host_geqrf_orgqr(random(cols * r, seed + 1), cols, r);
    let mut w = vec![0.0; rows * cols];
    for (t, s) in sigma.iter().enumerate() {
        for i in 0..rows {
            for j in 0..cols {
                w[i * cols + j] += u[i + t * rows] * s * v[j + t * cols];
            }
        }
    }
    w
}

pub fn rng(seed: u64) -> impl FnMut() -> f64 {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    move || {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        (s >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0
    }
}

/// Uniform in [-1, 1).
pub fn random(len: usize, seed: u64) -> Vec<f64> {
    let mut r = rng(seed);
    (0..len).map(|_| r()).collect()
}

pub fn random32(len: usize, seed: u64) -> Vec<f32> {
    random(len, seed).into_iter().map(|x| x as f32).collect()
}

impl Engine for HostEngine {
    type Buf = HostBuf;

    fn reserve(&self, what: &str, need: usize) -> R<()> {
        self.log("reserve");
        self.reserved.borrow_mut().push((what.to_string(), need));
        check_device_memory(what, need, self.budget, None)
    }
    fn recheck(&self, what: &str, need: usize) -> R<()> {
        self.reserve(what, need)
    }
    fn zeros(&self, len: usize) -> R<HostBuf> {
        Ok(self.buf(vec![0.0; len]))
    }
    fn upload(&self, host: &[f64]) -> R<HostBuf> {
        self.log("upload");
        Ok(self.buf(host.to_vec()))
    }
    fn write(&self, host: &[f64], dst: &mut HostBuf, offset: usize) -> R<()> {
        fits("write", "dst", offset + host.len(), dst.data.len())?;
        self.log("upload");
        dst.data[offset..offset + host.len()].copy_from_slice(host);
        Ok(())
    }
    fn read(&self, src: &HostBuf, offset: usize, len: usize) -> R<Vec<f64>> {
        fits("read", "src", offset + len, src.data.len())?;
        self.log("download");
        Ok(src.data[offset..offset + len].to_vec())
    }
    fn copy(&self, src: (&HostBuf, usize), dst: (&mut HostBuf, usize), len: usize) -> R<()> {
        fits("copy", "src", src.1 + len, src.0.data.len())?;
        fits("copy", "dst", dst.1 + len, dst.0.data.len())?;
        dst.0.data[dst.1..dst.1 + len].copy_from_slice(&src.0.data[src.1..src.1 + len]);
        Ok(())
    }
    fn gemm(
        &self,
        s: &GemmShape,
        alpha: f64,
        a: (&HostBuf, usize),
        b: (&HostBuf, usize),
        beta: f64,
        c: (&mut HostBuf, usize),
    ) -> R<()> {
        self.log("gemm");
        let [ea, eb, ec] = s.extents();
        fits("DGEMM", "A", a.1 + ea, a.0.data.len())?;
        fits("DGEMM", "B", b.1 + eb, b.0.data.len())?;
        fits("DGEMM", "C", c.1 + ec, c.0.data.len())?;
        assert!(s.lds_fit(), "leading dimensions of {s:?}");
        let out = &mut c.0.data[c.1..];
        host_gemm(s, alpha, &a.0.data[a.1..], &b.0.data[b.1..], beta, out);
        Ok(())
    }
    fn syrk_lower(&self, s: &SyrkShape, a: &HostBuf, c: &mut HostBuf) -> R<()> {
        self.log("syrk");
        let [ea, ec] = s.extents();
        fits("DSYRK", "A", ea, a.data.len())?;
        fits("DSYRK", "C", ec, c.data.len())?;
        host_syrk_lower(s, &a.data, &mut c.data);
        Ok(())
    }
    fn syevd_workspace(&self, sym: Sym, _a: &HostBuf, _w: &HostBuf) -> R<usize> {
        Ok(syevd_workspace_guess(sym.n))
    }
    fn syevd(&self, sym: Sym, a: &mut HostBuf, w: &mut HostBuf) -> R<()> {
        self.log("syevd");
        let Sym { n, ld, upper } = sym;
        fits("syevd", "A", extent(n, n, ld), a.data.len())?;
        fits("syevd", "W", n, w.data.len())?;
        self.transient(8 * syevd_workspace_guess(n) + 256);
        // Only the named triangle is read, as LAPACK does.
        let mut full = vec![0.0; n * n];
        for j in 0..n {
            for i in 0..n {
                let (r, c) = if (i <= j) == upper { (i, j) } else { (j, i) };
                full[i + j * n] = a.data[r + c * ld];
            }
        }
        let (lam, vecs) = host_jacobi(full, n);
        let mut order: Vec<usize> = (0..n).collect();
        order.sort_by(|&x, &y| lam[x].total_cmp(&lam[y]));
        for (j, &o) in order.iter().enumerate() {
            w.data[j] = lam[o];
            a.data[j * ld..j * ld + n].copy_from_slice(&vecs[o * n..(o + 1) * n]);
        }
        Ok(())
    }
    fn qr_workspace(&self, _m: usize, n: usize, _a: &mut HostBuf, _offset: usize) -> R<usize> {
        Ok(qr_workspace_guess(n))
    }
    fn qr(&self, m: usize, n: usize, a: &mut HostBuf, offset: usize, diag: &mut HostBuf) -> R<()> {
        self.log("qr");
        fits("qr", "A", offset + m * n, a.data.len())?;
        fits("qr", "diag", n, diag.data.len())?;
        self.transient(8 * (n + qr_workspace_guess(n)) + 256);
        let block = a.data[offset..offset + m * n].to_vec();
        let (q, d) = host_geqrf_orgqr(block, m, n);
        a.data[offset..offset + m * n].copy_from_slice(&q);
        diag.data[..n].copy_from_slice(&d);
        Ok(())
    }
    fn gaussian(&self, seed: u64, dst: &mut HostBuf) -> R<()> {
        self.log("gaussian");
        fits(
            "gaussian",
            "out",
            super::rand::normal_count(dst.data.len()),
            dst.data.len(),
        )?;
        let mut u = rng(seed);
        for pair in dst.data.chunks_mut(2) {
            let (u1, u2) = ((u() + 1.0) / 2.0, (u() + 1.0) / 2.0);
            let r = (-2.0 * (u1.max(1e-300)).ln()).sqrt();
            let t = std::f64::consts::TAU * u2;
            pair[0] = r * t.cos();
            if let Some(x) = pair.get_mut(1) {
                *x = r * t.sin();
            }
        }
        Ok(())
    }
}
