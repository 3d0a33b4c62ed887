//! Cost of the cache's anti-forgery probe (`spectrum::cache::probe`) on the shapes of one Llama-7B
//! layer, beside the cost of reading and decoding the cached entry it checks.
//! `cargo run --example probe_cost` (the dev profile is opt-level 3).
//!
//! The probe's work does not depend on the values, only on the shapes, so the tensor is built
//! with a known exact SVD (`W0 = diag(Σ)` padded, U0 and V0 coordinate vectors) instead of
//! computing one: the probe passes, and so runs every product.

use intruder_gate::backend::Spectrum;
use intruder_gate::limits::Limits;
use intruder_gate::safetensors_file::{write, SafetensorsFile};
use intruder_gate::spectrum::cache::probe;
use intruder_gate::tensor::{encode, DType, TensorRef};
use std::collections::BTreeMap;
use std::time::Instant;

fn main() {
    let dir = std::env::temp_dir().join(format!("probe-cost-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for (name, m, n) in [("q_proj", 4096, 4096), ("gate_proj", 11008, 4096)] {
        let rho = m.min(n);
        // Exactly representable in bf16, so one spectrum serves every dtype of W0.
        let s: Vec<f32> = (0..rho)
            .map(|i| half::bf16::from_f32(1.0 / (1.0 + i as f32)).to_f32())
            .collect();
        let mut w = vec![0f32; m * n];
        let mut u = vec![0f32; rho * m];
        let mut v = vec![0f32; rho * n];
        for i in 0..rho {
            w[i * n + i] = s[i];
            u[i * m + i] = 1.0;
            v[i * n + i] = 1.0;
        }
        let spectrum = Spectrum {
            rows: m,
            cols: n,
            u: u.into(),
            s,
            v: v.into(),
        };
        for dtype in [DType::BF16, DType::F32] {
            let bytes = encode(&w, dtype);
            let w0 = TensorRef::new(dtype, m, n, &bytes).unwrap();
            probe(&spectrum, &w0, DType::F32).unwrap(); // warm-up
            let reps = 5;
            let t = Instant::now();
            for _ in 0..reps {
                probe(&spectrum, &w0, DType::F32).unwrap();
            }
            let probe_ms = t.elapsed().as_secs_f64() * 1e3 / reps as f64;
            println!("{name} [{m}x{n}] W0 {dtype:?}: probe {probe_ms:.1} ms");
        }
        // What a disk hit costs besides: open the entry and decode U0, V0 (f32 on disk).
        let path = dir.join(format!("{name}.safetensors"));
        let t = |k: &str, r: usize, c: usize, x: &[f32]| {
            (k.to_string(), DType::F32, vec![r, c], encode(x, DType::F32))
        };
        write(
            &path,
            &[
                t("u", rho, m, &spectrum.u),
                t("s", 1, rho, &spectrum.s),
                t("v", rho, n, &spectrum.v),
            ],
            &BTreeMap::new(),
        )
        .unwrap();
        let mut best = f64::INFINITY;
        for _ in 0..5 {
            let t = Instant::now();
            let f = SafetensorsFile::open(&path, &Limits::default()).unwrap();
            let total: usize = ["u", "s", "v"]
                .iter()
                .map(|k| {
                    let i = f.info(k).unwrap();
                    TensorRef::new(DType::F32, i.shape[0], i.shape[1], f.bytes(k).unwrap())
                        .unwrap()
                        .to_f32()
                        .len()
                })
                .sum();
            assert!(total > 0);
            best = best.min(t.elapsed().as_secs_f64() * 1e3);
        }
        println!("{name} [{m}x{n}]: reading the f32 entry (page cache warm) {best:.1} ms");
    }
    let _ = std::fs::remove_dir_all(&dir);
}
