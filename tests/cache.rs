//! The base-spectrum cache: hits, corrupt entries rebuilt, bases never sharing entries, single
//! flight under concurrency, and the f16 option's accuracy.

mod common;

use common::*;
use intruder_gate::backend::BackendChoice;
use intruder_gate::report::{Method, Report};
use intruder_gate::spectrum::cache::CacheDType;
use intruder_gate::{Config, Gate};
use std::path::Path;

const SHAPES: [(&str, usize, usize); 3] = [
    ("model.layers.0.self_attn.q_proj", 96, 96),
    ("model.layers.0.mlp.up_proj", 128, 96),
    ("model.layers.0.mlp.down_proj", 96, 128),
];

fn setup(dir: &Path, seed: u64) -> Planted {
    planted(dir, &PlantedSpec::new(&SHAPES, 8, &[2], seed))
}

fn gate(cache: Option<&Path>, method: Method, dtype: CacheDType) -> Gate {
    Gate::new(Config {
        cache_dir: cache.map(Path::to_path_buf),
        cache_dtype: dtype,
        method,
        backend: BackendChoice::Cpu,
        ..Config::default()
    })
    .unwrap()
}

fn sources(r: &Report) -> Vec<&str> {
    r.modules
        .iter()
        .map(|m| m.base_spectrum.map_or("none", |s| s.label()))
        .collect()
}

fn cos(r: &Report) -> Vec<Vec<f64>> {
    r.modules.iter().map(|m| m.max_cos.clone()).collect()
}

fn cache_files(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut v: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    v.sort();
    v
}

#[test]
fn memory_then_disk_hits_give_identical_results() {
    let dir = tempfile::tempdir().unwrap();
    let cache = tempfile::tempdir().unwrap();
    let p = setup(dir.path(), 1);
    let g = gate(Some(cache.path()), Method::Brand, CacheDType::F32);
    g.attach_base(&p.base).unwrap();
    let first = g.screen_adapter_dir(&p.adapter).unwrap();
    assert_eq!(sources(&first), ["computed"; 3]);
    let again = g.screen_adapter_dir(&p.adapter).unwrap();
    assert_eq!(sources(&again), ["memory_hit"; 3]);
    let g2 = gate(Some(cache.path()), Method::Brand, CacheDType::F32);
    g2.attach_base(&p.base).unwrap();
    let from_disk = g2.screen_adapter_dir(&p.adapter).unwrap();
    assert_eq!(sources(&from_disk), ["disk_hit"; 3]);
    assert_eq!(cos(&first), cos(&again));
    assert_eq!(cos(&first), cos(&from_disk));
    let files = cache_files(cache.path());
    assert_eq!(
        files.len(),
        3,
        "one file per base tensor, no temp files left: {files:?}"
    );
    assert!(files
        .iter()
        .all(|f| f.extension().unwrap() == "safetensors"));
}

#[test]
fn corrupt_truncated_or_foreign_cache_files_are_ignored_and_rebuilt() {
    let dir = tempfile::tempdir().unwrap();
    let cache = tempfile::tempdir().unwrap();
    let p = setup(dir.path(), 2);
    let g = gate(Some(cache.path()), Method::Brand, CacheDType::F32);
    g.attach_base(&p.base).unwrap();
    let good = g.screen_adapter_dir(&p.adapter).unwrap();
    let files = cache_files(cache.path());
    // One flipped bit in the data, one truncated file, one file replaced by another entry's bytes.
    let mut b = std::fs::read(&files[0]).unwrap();
    let n = b.len();
    b[n - 100] ^= 0x10;
    std::fs::write(&files[0], b).unwrap();
    let b = std::fs::read(&files[1]).unwrap();
    std::fs::write(&files[1], &b[..b.len() / 3]).unwrap();
    std::fs::copy(&files[0], &files[2]).unwrap();

    let g2 = gate(Some(cache.path()), Method::Brand, CacheDType::F32);
    g2.attach_base(&p.base).unwrap();
    let rebuilt = g2.screen_adapter_dir(&p.adapter).unwrap();
    assert_eq!(sources(&rebuilt), ["rebuilt_corrupt"; 3]);
    assert_eq!(cos(&good), cos(&rebuilt));
    let metrics = g2.metrics().render();
    assert!(
        metrics.contains(
            "intruder_gate_base_spectrum_cache_requests_total{result=\"rebuilt_corrupt\"} 3"
        ),
        "{metrics}"
    );
    // The rewritten files are good again.
    let g3 = gate(Some(cache.path()), Method::Brand, CacheDType::F32);
    g3.attach_base(&p.base).unwrap();
    assert_eq!(
        sources(&g3.screen_adapter_dir(&p.adapter).unwrap()),
        ["disk_hit"; 3]
    );
}

#[test]
fn a_different_base_never_reuses_another_bases_entries() {
    let (d1, d2) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let cache = tempfile::tempdir().unwrap();
    // Same tensor names and shapes, different weights.
    let (p1, p2) = (setup(d1.path(), 3), setup(d2.path(), 4));
    let g1 = gate(Some(cache.path()), Method::Brand, CacheDType::F32);
    g1.attach_base(&p1.base).unwrap();
    g1.screen_adapter_dir(&p1.adapter).unwrap();
    let g2 = gate(Some(cache.path()), Method::Brand, CacheDType::F32);
    g2.attach_base(&p2.base).unwrap();
    let r2 = g2.screen_adapter_dir(&p1.adapter).unwrap();
    assert_eq!(sources(&r2), ["computed"; 3]);
    assert_eq!(cache_files(cache.path()).len(), 6);
    // And the answer is the one for base 2, as the dense reference computes it.
    let gd = gate(None, Method::Dense, CacheDType::F32);
    gd.attach_base(&p2.base).unwrap();
    let dense = gd.screen_adapter_dir(&p1.adapter).unwrap();
    for (a, b) in r2.modules.iter().zip(&dense.modules) {
        assert_eq!(a.intruders, b.intruders);
        assert!((a.singular_values[0] - b.singular_values[0]).abs() < 1e-5 * b.singular_values[0]);
    }
}

#[test]
fn concurrent_screenings_compute_each_base_spectrum_once() {
    let dir = tempfile::tempdir().unwrap();
    let p = setup(dir.path(), 5);
    for cache_dir in [None, Some(tempfile::tempdir().unwrap())] {
        let g = gate(
            cache_dir.as_ref().map(|d| d.path()),
            Method::Brand,
            CacheDType::F32,
        );
        g.attach_base(&p.base).unwrap();
        let reports: Vec<Report> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..8)
                .map(|_| s.spawn(|| g.screen_adapter_dir(&p.adapter).unwrap()))
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let metrics = g.metrics().render();
        assert!(
            metrics.contains(
                "intruder_gate_base_spectrum_cache_requests_total{result=\"computed\"} 3\n"
            ),
            "single flight: each of 3 spectra computed once\n{metrics}"
        );
        for r in &reports[1..] {
            assert_eq!(cos(r), cos(&reports[0]));
        }
    }
}

#[test]
fn an_f16_cache_is_half_the_size_and_accurate_to_about_1e_3() {
    let dir = tempfile::tempdir().unwrap();
    let p = setup(dir.path(), 6);
    let (c32, c16) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let size = |d: &Path| {
        cache_files(d)
            .iter()
            .map(|f| f.metadata().unwrap().len())
            .sum::<u64>()
    };
    let mut results = Vec::new();
    for (d, t) in [(c32.path(), CacheDType::F32), (c16.path(), CacheDType::F16)] {
        gate(Some(d), Method::Brand, t)
            .attach_base(&p.base)
            .map(|_| ())
            .unwrap();
        let g = gate(Some(d), Method::Brand, t);
        g.attach_base(&p.base).unwrap();
        g.screen_adapter_dir(&p.adapter).unwrap();
        // Read back from disk, so the stored precision is what is measured.
        let g = gate(Some(d), Method::Brand, t);
        g.attach_base(&p.base).unwrap();
        results.push(g.screen_adapter_dir(&p.adapter).unwrap());
    }
    let (s32, s16) = (size(c32.path()), size(c16.path()));
    assert!(s16 * 100 < s32 * 55, "f16 cache {s16} bytes vs f32 {s32}");
    let worst = results[0]
        .modules
        .iter()
        .zip(&results[1].modules)
        .flat_map(|(a, b)| a.max_cos.iter().zip(&b.max_cos).map(|(x, y)| (x - y).abs()))
        .fold(0.0, f64::max);
    eprintln!("f16 cache: worst |Δ max_cos| vs f32 cache = {worst:.2e}");
    assert!(worst < 1e-3, "{worst}");
    assert_eq!(results[0].total_intruders, results[1].total_intruders);
}

/// Callers on many threads asking a cold gate for the same base spectra while the SVD forks work
/// on the screening pool: a thread holding a spectrum's flight must never pick up another
/// caller's job for the same tensor (that deadlocked). A watchdog turns a hang into a failure.
#[test]
fn many_callers_on_a_cold_gate_never_deadlock() {
    const BIG: [(&str, usize, usize); 4] = [
        ("model.layers.0.self_attn.q_proj", 384, 384),
        ("model.layers.0.self_attn.v_proj", 384, 384),
        ("model.layers.1.self_attn.q_proj", 384, 384),
        ("model.layers.1.self_attn.v_proj", 384, 384),
    ];
    let dir = tempfile::tempdir().unwrap();
    let p = planted(dir.path(), &PlantedSpec::new(&BIG, 4, &[1], 11));
    let (done, finished) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for _round in 0..4 {
            let g = Gate::new(Config {
                cache_dir: None,
                backend: BackendChoice::Cpu,
                threads: 4,
                ..Config::default()
            })
            .unwrap();
            g.attach_base(&p.base).unwrap();
            std::thread::scope(|s| {
                for _ in 0..8 {
                    s.spawn(|| g.screen_adapter_dir(&p.adapter).unwrap());
                }
            });
        }
        done.send(()).unwrap();
    });
    finished
        .recv_timeout(std::time::Duration::from_secs(600))
        .expect("screening threads did not finish within 10 minutes: deadlock");
}
