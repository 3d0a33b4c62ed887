//! `intruder-gate bench --one-shot N`: what a CI pipeline or a hub operator runs — a fresh
//! `intruder-gate scan` process per adapter — timed as child processes of this binary, with a
//! warm disk cache against `--method dense --no-cache`, alternating so that both see the same
//! machine. Process start, reading the base and the adapter, the cache and the JSON are all in.

use intruder_gate::error::{Error, Result};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Instant;

/// One adapter's one-shot timings (seconds, medians over the repetitions).
pub struct Row {
    pub name: String,
    pub dense: f64,
    pub warm: f64,
}

fn scan(base: &Path, adapter: &Path, extra: &[&std::ffi::OsStr]) -> Result<f64> {
    let exe = std::env::current_exe().map_err(|e| Error::io(Path::new("current_exe"), e))?;
    let started = Instant::now();
    let status = Command::new(exe)
        .args(["scan", "--backend", "cpu", "--format", "json", "--base"])
        .arg(base)
        .arg("--adapter")
        .arg(adapter)
        .args(extra)
        .stdout(Stdio::null())
        .status()
        .map_err(|e| Error::io(Path::new("intruder-gate scan"), e))?;
    let seconds = started.elapsed().as_secs_f64();
    // Exit codes 0 and 1 are verdicts; 2 is an error.
    if !matches!(status.code(), Some(0 | 1)) {
        intruder_gate::bail!(Internal, "scan child failed: {status}");
    }
    Ok(seconds)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// Warms `cache` with one scan, then alternates `reps` dense and warm scans.
pub fn measure(name: &str, base: &Path, adapter: &Path, cache: &Path, reps: usize) -> Result<Row> {
    let _ = std::fs::remove_dir_all(cache);
    let warm_args = ["--cache-dir".as_ref(), cache.as_os_str()];
    scan(base, adapter, &warm_args)?;
    let dense_args = ["--method", "dense", "--no-cache"].map(std::ffi::OsStr::new);
    let (mut dense, mut warm) = (Vec::new(), Vec::new());
    for _ in 0..reps.max(1) {
        dense.push(scan(base, adapter, &dense_args)?);
        warm.push(scan(base, adapter, &warm_args)?);
    }
    let _ = std::fs::remove_dir_all(cache);
    Ok(Row {
        name: name.to_string(),
        dense: median(dense),
        warm: median(warm),
    })
}

/// The Markdown table the README shows.
pub fn table(rows: &[Row]) -> String {
    let mut s = String::from(
        "| adapter | `scan --method dense --no-cache` | `scan`, warm disk cache | ratio |\n|---|---|---|---|\n",
    );
    for r in rows {
        s += &format!(
            "| {} | {:.2} s | {:.1} ms | {:.0}× |\n",
            r.name,
            r.dense,
            r.warm * 1e3,
            r.dense / r.warm
        );
    }
    s
}
