//! Fault injection on the on-disk base-spectrum cache, through the CLI as a pipeline runs it:
//! a read-only cache directory, a full disk, entries replaced by a directory / an empty file /
//! another tensor's entry, a process killed in the middle of writing an entry, and eight
//! processes filling one cold cache at once. Each run must give the report of a clean
//! `--no-cache` run (numbers, verdict, intruders) or a clean error, and nothing half-written may
//! be used or left behind.

mod common;

use common::{assert_same_numbers, planted, PlantedSpec, PLANTED};
use serde_json::Value;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_intruder-gate");

/// A synthetic base and planted adapter, and the report of a clean `--no-cache` scan.
struct Setup {
    dir: tempfile::TempDir,
    base: PathBuf,
    adapter: PathBuf,
    clean: Value,
}

impl Setup {
    fn new(seed: u64) -> Setup {
        Setup::with(&PLANTED, seed)
    }

    fn with(shapes: &[(&str, usize, usize)], seed: u64) -> Setup {
        let dir = tempfile::tempdir().unwrap();
        let p = planted(dir.path(), &PlantedSpec::new(shapes, 8, &[2, 0, 1], seed));
        let mut s = Setup {
            dir,
            base: p.base,
            adapter: p.adapter,
            clean: Value::Null,
        };
        s.clean = json(&s.scan(None));
        assert_eq!(s.modules(), shapes.len(), "clean report: {}", s.clean);
        s
    }

    fn modules(&self) -> usize {
        self.clean["modules"].as_array().map_or(0, Vec::len)
    }

    /// `scan --format json` with this cache directory (`None`: `--no-cache`).
    fn scan(&self, cache: Option<&Path>) -> Command {
        let mut c = Command::new(BIN);
        c.args(["scan", "--format", "json", "--threads", "2", "--base"])
            .arg(&self.base)
            .arg("--adapter")
            .arg(&self.adapter);
        match cache {
            Some(d) => c.arg("--cache-dir").arg(d),
            None => c.arg("--no-cache"),
        };
        c
    }

    fn index(&self, cache: &Path) -> Command {
        let mut c = Command::new(BIN);
        c.args(["index", "--threads", "1", "--base"])
            .arg(&self.base)
            .arg("--cache-dir")
            .arg(cache);
        c
    }

    fn cache(&self, name: &str) -> PathBuf {
        let d = self.dir.path().join(name);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    /// Scans with `cache` and checks the report against the clean one.
    fn scan_same(&self, cache: &Path) -> Value {
        let v = json(&self.scan(Some(cache)));
        assert_same_numbers(&v, &self.clean);
        v
    }
}

/// Runs `cmd`, requires success, parses stdout as JSON.
#[track_caller]
fn json(cmd: &Command) -> Value {
    let out = run(cmd);
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("JSON report")
}

fn run(cmd: &Command) -> Output {
    let mut c = Command::new(cmd.get_program());
    c.args(cmd.get_args());
    c.output().unwrap()
}

/// `cmd` run through `sh -c PRELUDE; exec …` (limits and signal dispositions for the child only).
fn through_sh(prelude: &str, cmd: &Command) -> Command {
    let mut c = Command::new("sh");
    c.arg("-c")
        .arg(format!("{prelude}; exec \"$0\" \"$@\""))
        .arg(cmd.get_program())
        .args(cmd.get_args());
    c
}

/// Each module's `base_spectrum` (where its base spectrum came from), sorted.
fn sources(v: &Value) -> Vec<String> {
    let mut s: Vec<String> = v["modules"]
        .as_array()
        .expect("modules")
        .iter()
        .map(|m| m["base_spectrum"].as_str().unwrap().to_string())
        .collect();
    s.sort();
    s
}

fn warnings(v: &Value) -> Vec<String> {
    v["warnings"]
        .as_array()
        .map(|w| w.iter().map(|x| x.as_str().unwrap().to_string()).collect())
        .unwrap_or_default()
}

/// Complete cache entries (`*.safetensors`) and temporaries (hidden `*.tmp`) in `dir`.
fn listing(dir: &Path) -> (Vec<PathBuf>, Vec<PathBuf>) {
    let mut entries = Vec::new();
    let mut temps = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        let name = p.file_name().unwrap().to_string_lossy().into_owned();
        if name.starts_with('.') && name.ends_with(".tmp") {
            temps.push(p);
        } else if name.ends_with(".safetensors") {
            entries.push(p);
        }
    }
    entries.sort();
    temps.sort();
    (entries, temps)
}

/// A warm cache must now serve every module from disk, with the clean report.
#[track_caller]
fn assert_warm(s: &Setup, cache: &Path) {
    let v = s.scan_same(cache);
    assert_eq!(sources(&v), vec!["disk_hit"; s.modules()], "{cache:?}");
    let (entries, temps) = listing(cache);
    assert_eq!(entries.len(), s.modules(), "one entry per base tensor");
    assert!(temps.is_empty(), "temporaries left: {temps:?}");
}

/// Runs `cmd` unable to write where the file modes say so. As root, file modes do not bind
/// (CAP_DAC_OVERRIDE): the child then runs without that capability, through setpriv. `None`
/// when neither is possible here.
fn without_override(cmd: &Command) -> Option<Command> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc_geteuid() } != 0 {
        let mut c = Command::new(cmd.get_program());
        c.args(cmd.get_args());
        return Some(c);
    }
    let ok = Command::new("setpriv")
        .args([
            "--bounding-set=-dac_override,-dac_read_search,-fowner",
            "--",
            "true",
        ])
        .status()
        .is_ok_and(|s| s.success());
    ok.then(|| {
        let mut c = Command::new("setpriv");
        c.args([
            "--bounding-set=-dac_override,-dac_read_search,-fowner",
            "--",
        ])
        .arg(cmd.get_program())
        .args(cmd.get_args());
        c
    })
}

extern "C" {
    #[link_name = "geteuid"]
    fn libc_geteuid() -> u32;
}

#[test]
fn a_read_only_cache_directory_gives_the_same_report_computed_with_a_warning() {
    let s = Setup::new(11);
    let cache = s.cache("ro");
    std::fs::set_permissions(&cache, std::fs::Permissions::from_mode(0o555)).unwrap();
    let mut probe = Command::new("sh");
    probe.args(["-c", "touch \"$0\"/probe"]).arg(&cache);
    let Some(probe) = without_override(&probe) else {
        eprintln!("skipped: running as root without setpriv, a read-only directory cannot be made");
        return;
    };
    assert!(
        !run(&probe).status.success(),
        "the cache directory is still writable"
    );

    // Cold: every spectrum is computed, each unwritable entry is a warning, nothing is written.
    let cold = json(&without_override(&s.scan(Some(&cache))).unwrap());
    assert_same_numbers(&cold, &s.clean);
    assert_eq!(sources(&cold), vec!["computed"; s.modules()]);
    let w = warnings(&cold);
    assert_eq!(
        w.iter()
            .filter(|w| w.contains("not cached on disk"))
            .count(),
        s.modules(),
        "one warning per unwritable entry: {w:?}"
    );
    assert_eq!(std::fs::read_dir(&cache).unwrap().count(), 0);

    // Warm, then read-only: served from disk, no warning.
    std::fs::set_permissions(&cache, std::fs::Permissions::from_mode(0o755)).unwrap();
    s.scan_same(&cache);
    std::fs::set_permissions(&cache, std::fs::Permissions::from_mode(0o555)).unwrap();
    let warm = json(&without_override(&s.scan(Some(&cache))).unwrap());
    assert_same_numbers(&warm, &s.clean);
    assert_eq!(sources(&warm), vec!["disk_hit"; s.modules()]);
    assert!(warnings(&warm).is_empty(), "{:?}", warnings(&warm));
    std::fs::set_permissions(&cache, std::fs::Permissions::from_mode(0o755)).unwrap();
}

#[test]
fn a_full_disk_gives_the_same_report_and_leaves_nothing_half_written() {
    let s = Setup::new(12);
    // RLIMIT_FSIZE below one entry (each is ~50-80 KB) with SIGXFSZ ignored: every write of an
    // entry fails with EFBIG, as on a full disk.
    let cache = s.cache("fsize");
    let full = json(&through_sh(
        "trap '' XFSZ; ulimit -f 16",
        &s.scan(Some(&cache)),
    ));
    assert_same_numbers(&full, &s.clean);
    assert_eq!(sources(&full), vec!["computed"; s.modules()]);
    assert!(
        warnings(&full)
            .iter()
            .any(|w| w.contains("not cached on disk")),
        "{:?}",
        warnings(&full)
    );
    let (entries, temps) = listing(&cache);
    assert!(
        entries.is_empty() && temps.is_empty(),
        "{entries:?} {temps:?}"
    );
    // With room again, the cache fills and serves.
    s.scan_same(&cache);
    assert_warm(&s, &cache);

    // A real ENOSPC: a 96 KB tmpfs holds the first entry, not all (root only).
    let mnt = s.cache("tmpfs");
    let mounted = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=96k", "tmpfs"])
        .arg(&mnt)
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|st| st.success());
    if !mounted {
        eprintln!("skipped the tmpfs part: mount needs root");
        return;
    }
    struct Unmount<'a>(&'a Path);
    impl Drop for Unmount<'_> {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg(self.0).status();
        }
    }
    let _guard = Unmount(&mnt);
    let v = s.scan_same(&mnt);
    assert!(
        warnings(&v)
            .iter()
            .any(|w| w.contains("not cached on disk")),
        "{:?}",
        warnings(&v)
    );
    let (entries, temps) = listing(&mnt);
    assert!(
        temps.is_empty(),
        "temporaries left on the full disk: {temps:?}"
    );
    assert!(
        entries.len() < s.modules(),
        "the disk was not full: {entries:?}"
    );
    // Whatever did fit is whole: served from disk, the rest computed again.
    let again = s.scan_same(&mnt);
    let hits = sources(&again).iter().filter(|x| *x == "disk_hit").count();
    assert_eq!(hits, entries.len(), "{:?}", sources(&again));
}

#[test]
fn an_entry_replaced_by_a_directory_an_empty_file_or_another_entry_is_rebuilt() {
    let s = Setup::new(13);
    let cache = s.cache("replaced");
    s.scan_same(&cache);
    let (entries, _) = listing(&cache);
    assert_eq!(entries.len(), 3);
    let other = std::fs::read(&entries[0]).unwrap();
    std::fs::remove_file(&entries[0]).unwrap();
    std::fs::create_dir(&entries[0]).unwrap();
    std::fs::write(entries[0].join("inside"), b"x").unwrap();
    std::fs::write(&entries[1], b"").unwrap();
    std::fs::write(&entries[2], &other).unwrap();

    let metrics = s.dir.path().join("metrics.prom");
    let mut cmd = s.scan(Some(&cache));
    cmd.arg("--metrics-file").arg(&metrics);
    let v = json(&cmd);
    assert_same_numbers(&v, &s.clean);
    assert_eq!(sources(&v), vec!["rebuilt_corrupt"; 3]);
    let text = std::fs::read_to_string(&metrics).unwrap();
    assert!(
        text.contains(
            "intruder_gate_base_spectrum_cache_requests_total{result=\"rebuilt_corrupt\"} 3"
        ),
        "{text}"
    );
    // The empty and the foreign entry were rewritten; the directory cannot be replaced by a
    // rename, which is a warning, and is recomputed every time.
    let w = warnings(&v);
    assert!(w.iter().any(|w| w.contains("not cached on disk")), "{w:?}");
    let again = s.scan_same(&cache);
    assert_eq!(
        sources(&again),
        ["disk_hit", "disk_hit", "rebuilt_corrupt"],
        "{again}"
    );
    assert!(listing(&cache).1.is_empty());
}

/// Temporaries of a process that is gone must not survive the next run.
#[track_caller]
fn assert_no_stale_temps(cache: &Path) {
    let (_, temps) = listing(cache);
    assert!(temps.is_empty(), "stale temporaries left: {temps:?}");
}

#[test]
fn a_process_killed_while_writing_an_entry_leaves_nothing_that_is_used() {
    let s = Setup::new(14);
    // SIGXFSZ at its default action kills the process inside write(2), exactly where the file
    // size limit falls: a deterministic kill in the middle of writing the first entry.
    let cache = s.cache("xfsz");
    let out = run(&through_sh("ulimit -f 16", &s.index(&cache)));
    assert_eq!(
        out.status.signal(),
        Some(25),
        "not killed by SIGXFSZ: {out:?}"
    );
    let (entries, temps) = listing(&cache);
    assert!(
        entries.is_empty(),
        "a partial entry was published: {entries:?}"
    );
    assert_eq!(temps.len(), 1, "the killed write's temporary: {temps:?}");
    assert_eq!(std::fs::metadata(&temps[0]).unwrap().len(), 16 * 512);

    let v = s.scan_same(&cache);
    assert_eq!(sources(&v), vec!["computed"; s.modules()]);
    assert_no_stale_temps(&cache);
    assert_warm(&s, &cache);
}

#[test]
fn kill_9_during_index_then_a_rerun_gives_the_same_report() {
    // Bigger tensors, so writing an entry (~1.5 MB) takes long enough to be caught in the act.
    let shapes = [
        ("model.layers.0.self_attn.q_proj", 384, 384),
        ("model.layers.0.self_attn.k_proj", 384, 384),
        ("model.layers.0.self_attn.v_proj", 384, 384),
        ("model.layers.0.self_attn.o_proj", 384, 384),
    ];
    let s = Setup::with(&shapes, 15);
    let cache = s.cache("kill9");
    let mut child = {
        let mut c = s.index(&cache);
        c.stdout(Stdio::null()).stderr(Stdio::null());
        c.spawn().unwrap()
    };
    // Kill -9 the moment a temporary appears (or at the end, if none is ever seen).
    let started = Instant::now();
    let mut caught = false;
    while child.try_wait().unwrap().is_none() && started.elapsed() < Duration::from_secs(120) {
        if !listing(&cache).1.is_empty() {
            child.kill().unwrap();
            caught = true;
            break;
        }
        std::thread::sleep(Duration::from_micros(200));
    }
    let status = child.wait().unwrap();
    let (entries, temps) = listing(&cache);
    eprintln!(
        "kill -9 {}: {} entries, {} temporaries left",
        if caught {
            "during a write"
        } else {
            "missed every write"
        },
        entries.len(),
        temps.len()
    );
    if caught {
        assert_eq!(status.signal(), Some(9));
    }
    // Every published entry is whole, the rerun computes the rest and uses no temporary.
    let v = s.scan_same(&cache);
    let hits = sources(&v).iter().filter(|x| *x == "disk_hit").count();
    assert_eq!(hits, entries.len(), "{:?}", sources(&v));
    assert!(!sources(&v).iter().any(|x| x == "rebuilt_corrupt"));
    assert_no_stale_temps(&cache);
    // A rerun of index finishes the job.
    let out = run(&s.index(&cache));
    assert!(out.status.success(), "{out:?}");
    assert_warm(&s, &cache);
}

#[test]
fn eight_processes_on_one_cold_cache_give_the_same_reports() {
    let s = Setup::new(16);
    let cache = s.cache("shared");
    let children: Vec<_> = (0..8)
        .map(|_| {
            let mut c = s.scan(Some(&cache));
            c.stdout(Stdio::piped()).stderr(Stdio::piped());
            c.spawn().unwrap()
        })
        .collect();
    for child in children {
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v: Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_same_numbers(&v, &s.clean);
        assert!(
            sources(&v)
                .iter()
                .all(|x| x == "computed" || x == "disk_hit"),
            "{:?}",
            sources(&v)
        );
        assert!(warnings(&v).is_empty(), "{:?}", warnings(&v));
    }
    assert_warm(&s, &cache);
}
