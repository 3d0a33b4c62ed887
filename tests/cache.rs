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

/// Rewrites a cache entry with other singular vectors and values, and the checksum recomputed,
/// as anyone who can write the cache directory can (the checksum is unkeyed).
fn forge(path: &Path, u: &[f32], s: &[f32], v: &[f32]) {
    use intruder_gate::safetensors_file::{write, SafetensorsFile};
    use intruder_gate::tensor::{encode, DType};
    let f = SafetensorsFile::open(path, &intruder_gate::limits::Limits::default()).unwrap();
    let mut meta = f.metadata().clone();
    let shape = |n: &str| f.info(n).unwrap().shape.clone();
    let (su, ss, sv) = (shape("u"), shape("s"), shape("v"));
    drop(f);
    let mut bytes = Vec::new();
    for part in [u, s, v] {
        bytes.extend_from_slice(bytemuck::cast_slice(part));
    }
    meta.insert(
        "checksum".into(),
        format!("{:016x}", xxhash_rust::xxh3::xxh3_64(&bytes)),
    );
    let t =
        |n: &str, sh: Vec<usize>, x: &[f32]| (n.to_string(), DType::F32, sh, encode(x, DType::F32));
    write(path, &[t("u", su, u), t("s", ss, s), t("v", sv, v)], &meta).unwrap();
}

/// Makes the (u, s, v) of a forged entry for base tensor `name`, module `index`.
type Forgery<'a> = &'a dyn Fn(&str, usize) -> (Vec<f32>, Vec<f32>, Vec<f32>);

/// The spectrum stored in a cache entry, as f32 (u, s, v row-major as written).
fn entry(path: &Path) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    use intruder_gate::safetensors_file::SafetensorsFile;
    let f = SafetensorsFile::open(path, &intruder_gate::limits::Limits::default()).unwrap();
    let get = |n: &str| {
        f.bytes(n)
            .unwrap()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect::<Vec<f32>>()
    };
    (get("u"), get("s"), get("v"))
}

/// Cache forgery (issue 15): entries rewritten with a valid-looking checksum but not the SVD of
/// their base tensor — the SVD of the adapted weight W' itself (which makes every direction of W'
/// look like a base direction, hiding the intruders), a non-orthonormal U0 with Σ0 compensating
/// (same product), two singular vectors swapped — are each caught by the probe, rebuilt, counted
/// and reported; genuine entries, f32 and f16, pass it. The probe runs on entries others could
/// have written: here the cache directory is group-writable. In a directory only this user can
/// write, entries are this user's own and are not probed; a forged one is then used, which
/// marks the boundary (and a group-writable entry file is probed again).
#[test]
fn forged_cache_entries_fail_the_probe_and_are_rebuilt() {
    use intruder_gate::adapter::load_peft_dir;
    use intruder_gate::backend::{cpu::CpuBackend, Backend};
    use intruder_gate::base::BaseModel;
    use intruder_gate::limits::Limits;
    use intruder_gate::spectrum::cache::Key;

    let dir = tempfile::tempdir().unwrap();
    let p = setup(dir.path(), 21);
    for dtype in [CacheDType::F32, CacheDType::F16] {
        let cache = tempfile::tempdir().unwrap();
        set_mode(cache.path(), 0o770);
        let g = gate(Some(cache.path()), Method::Brand, dtype);
        g.attach_base(&p.base).unwrap();
        let clean = g.screen_adapter_dir(&p.adapter).unwrap();
        assert!(
            clean.total_intruders > 0,
            "the planted adapter has intruders"
        );
        let g = gate(Some(cache.path()), Method::Brand, dtype);
        g.attach_base(&p.base).unwrap();
        let again = g.screen_adapter_dir(&p.adapter).unwrap();
        assert_eq!(
            sources(&again),
            ["disk_hit"; 3],
            "{dtype:?}: genuine entries pass"
        );
        assert!(again.warnings.is_empty(), "{:?}", again.warnings);
    }

    let cache = tempfile::tempdir().unwrap();
    set_mode(cache.path(), 0o770);
    let g = gate(Some(cache.path()), Method::Brand, CacheDType::F32);
    g.attach_base(&p.base).unwrap();
    let clean = g.screen_adapter_dir(&p.adapter).unwrap();
    let base = BaseModel::open(&p.base, &Limits::default()).unwrap();
    let adapter = load_peft_dir(&p.adapter, &Limits::default()).unwrap();
    let path_of = |t: &str| {
        let fp = format!("{:032x}", Key::of(&base.matrix(t).unwrap()).fingerprint);
        cache_files(cache.path())
            .into_iter()
            .find(|f| f.file_name().unwrap().to_str().unwrap().starts_with(&fp))
            .unwrap()
    };
    let forgeries: [(&str, Forgery<'_>); 3] = [
        ("not an SVD", &|t: &str, i: usize| {
            // W' = W0 + s·B·A, and its own SVD in W0's entry.
            let w0 = base.matrix(t).unwrap();
            let m = &adapter.modules[i];
            let mut w = w0.to_f32();
            for r in 0..m.out_features {
                for c in 0..m.in_features {
                    let d: f32 = (0..m.rank)
                        .map(|k| m.b[r * m.rank + k] * m.a[k * m.in_features + c])
                        .sum();
                    w[r * w0.cols + c] += m.scale as f32 * d;
                }
            }
            let s = CpuBackend.thin_svd(&w, w0.rows, w0.cols).unwrap();
            (s.u.to_vec(), s.s, s.v.to_vec())
        }),
        ("not orthonormal", &|t: &str, _| {
            let (mut u, mut s, v) = entry(&path_of(t));
            u.iter_mut().for_each(|x| *x *= 2.0);
            s.iter_mut().for_each(|x| *x *= 0.5);
            (u, s, v)
        }),
        ("not an SVD", &|t: &str, _| {
            let (mut u, s, v) = entry(&path_of(t));
            let rows = u.len() / s.len();
            let (first, second) = u.split_at_mut(rows);
            first.swap_with_slice(&mut second[..rows]);
            (u, s, v)
        }),
    ];
    for (why, forgery) in forgeries {
        for (i, m) in clean.modules.iter().enumerate() {
            assert_eq!(m.module, adapter.modules[i].name);
            let (u, s, v) = forgery(&m.base_tensor, i);
            forge(&path_of(&m.base_tensor), &u, &s, &v);
        }
        let g = gate(Some(cache.path()), Method::Brand, CacheDType::F32);
        g.attach_base(&p.base).unwrap();
        let r = g.screen_adapter_dir(&p.adapter).unwrap();
        assert_eq!(sources(&r), ["rebuilt_corrupt"; 3], "{why}");
        assert_eq!(r.total_intruders, clean.total_intruders, "{why}");
        assert_eq!(cos(&r), cos(&clean), "{why}");
        assert_eq!(r.warnings.len(), 3, "{why}: {:?}", r.warnings);
        assert!(
            r.warnings.iter().all(|w| w.contains(why)),
            "{why}: {:?}",
            r.warnings
        );
        let metrics = g.metrics().render();
        assert!(
            metrics.contains(
                "intruder_gate_base_spectrum_cache_requests_total{result=\"rebuilt_corrupt\"} 3"
            ),
            "{metrics}"
        );
    }

    // The trust boundary: forged entries in a private directory are used as they are; one
    // group-writable entry file among them is probed and rebuilt.
    let screen = || {
        let g = gate(Some(cache.path()), Method::Brand, CacheDType::F32);
        g.attach_base(&p.base).unwrap();
        g.screen_adapter_dir(&p.adapter).unwrap()
    };
    let forge_all = || {
        for (i, m) in clean.modules.iter().enumerate() {
            let (u, s, v) = forgeries[0].1(&m.base_tensor, i);
            forge(&path_of(&m.base_tensor), &u, &s, &v);
        }
    };
    set_mode(cache.path(), 0o700);
    forge_all();
    assert_eq!(
        sources(&screen()),
        ["disk_hit"; 3],
        "a private directory is trusted"
    );
    forge_all();
    set_mode(&path_of(&clean.modules[0].base_tensor), 0o664);
    let r = screen();
    assert_eq!(
        sources(&r),
        ["rebuilt_corrupt", "disk_hit", "disk_hit"],
        "a group-writable entry is probed"
    );
}

fn set_mode(path: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// A process killed while writing an entry leaves `.<entry>.<pid>.<seq>.tmp` behind (issue 15);
/// the next gate on that directory removes it when its writer is gone, and nothing else: not a
/// live process's temporary, not one whose writer still holds its lock, not other names.
#[test]
fn stale_temporaries_of_dead_writers_are_removed_on_start() {
    let cache = tempfile::tempdir().unwrap();
    let mut child = std::process::Command::new("true").spawn().unwrap();
    let dead = child.id();
    child.wait().unwrap();
    let entry = format!("{:032x}-96x96-f32.v1.safetensors", 0xabcdu128);
    let temp = |pid: u32, seq: u32| cache.path().join(format!(".{entry}.{pid}.{seq}.tmp"));
    let stale = [temp(dead, 0), temp(dead, 7)];
    let live = temp(std::process::id(), 0);
    let locked = temp(dead, 3);
    let others = [
        cache.path().join(format!(".{entry}.{dead}.tmp")),
        cache
            .path()
            .join(format!(".other.safetensors.{dead}.0.tmp")),
        cache.path().join(format!("{entry}.{dead}.0.tmp")),
    ];
    for f in stale.iter().chain([&live, &locked]).chain(&others) {
        std::fs::write(f, b"partial").unwrap();
    }
    // A writer in another PID namespace would look dead by its id; it holds the lock.
    let held = std::fs::File::open(&locked).unwrap();
    assert!(intruder_gate::safetensors_file::try_lock(&held));

    let _gate = gate(Some(cache.path()), Method::Brand, CacheDType::F32);
    for f in &stale {
        assert!(!f.exists(), "{} left behind", f.display());
    }
    for f in [&live, &locked].into_iter().chain(&others) {
        assert!(f.exists(), "{} removed", f.display());
    }
}
