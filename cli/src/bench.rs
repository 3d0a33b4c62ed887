//! `intruder-gate bench`: the dense method against the Brand update, on the same inputs, in one
//! run. `dense` is what the paper's code and PEFT's `reduce_intruder_dimension` do (f32 thin SVDs
//! of `W0` and `W'`, then `max |U'ᵀ U0|`), implemented here with the same SVD library;
//! `brand-cold` includes computing the base spectra; `brand-warm` finds them cached in memory
//! (a long-lived gate) or on disk (a gate without a memory cache), median of `WARM_SAMPLES`
//! screenings per repetition. With `--tuned`, the same columns for `scan --tuned`: `dense` on
//! every changed matrix against `auto` (unchanged / merged LoRA / randomized). Speed lives here,
//! never in unit tests.

use intruder_gate::adapter::{self, Adapter};
use intruder_gate::backend::BackendChoice;
use intruder_gate::base::{mapping, BaseModel};
use intruder_gate::error::Result;
use intruder_gate::report::{Method, Report};
use intruder_gate::safetensors_file;
use intruder_gate::spectrum::dense;
use intruder_gate::tensor::{encode, DType};
use intruder_gate::{Config, Gate};
use std::path::{Path, PathBuf};
use std::time::Instant;

/// One configuration's timings (seconds, medians) and checks.
pub struct Row {
    pub name: String,
    pub modules: usize,
    pub dense: f64,
    pub brand_cold: f64,
    pub brand_warm_memory: f64,
    pub brand_warm_disk: f64,
    /// Peak RSS of a fresh `intruder-gate scan` process screening from the disk cache.
    pub warm_scan_peak_rss_mib: f64,
    pub dense_intruders: usize,
    pub brand_intruders: usize,
    /// Module-by-module intruder indices equal, outside ties and the band around ε.
    pub verdicts_agree: bool,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn timed<T>(f: impl FnOnce() -> Result<T>) -> Result<(f64, T)> {
    let t = Instant::now();
    let x = f()?;
    Ok((t.elapsed().as_secs_f64(), x))
}

/// The paper/PEFT method on one matrix: f32 SVDs of `W0` and `W'`; the intruder indices.
fn dense_f32_pair(
    w0: &[f32],
    w1: &[f32],
    out: usize,
    inn: usize,
    k: usize,
    epsilon: f64,
) -> Result<Vec<usize>> {
    let d = dense::compare(
        faer::MatRef::from_row_major_slice(w0, out, inn),
        faer::MatRef::from_row_major_slice(w1, out, inn),
        k,
    )?;
    Ok((0..d.max_cos.len())
        .filter(|&j| d.max_cos[j] < epsilon)
        .collect())
}

/// The paper/PEFT method on every module: f32 SVDs of `W0` and `W'`. Returns intruder indices.
fn dense_f32(
    base: &BaseModel,
    adapter: &Adapter,
    k: usize,
    epsilon: f64,
) -> Result<Vec<Vec<usize>>> {
    let names: Vec<&str> = adapter.modules.iter().map(|m| m.name.as_str()).collect();
    let targets = mapping::map_modules(&names, &base.matrix_names())?;
    let mut pairs: Vec<_> = adapter.modules.iter().zip(targets).collect();
    pairs.sort_by(|a, b| a.1.cmp(&b.1));
    pairs
        .iter()
        .map(|(m, t)| {
            let w0 = base.matrix(t)?;
            let (out, inn) = (w0.rows, w0.cols);
            let w = w0.to_f32();
            let delta = faer::MatRef::from_row_major_slice(&m.b, out, m.rank)
                * faer::MatRef::from_row_major_slice(&m.a, m.rank, inn);
            let w1: Vec<f32> = (0..out * inn)
                .map(|t| w[t] + m.scale as f32 * delta[(t / inn, t % inn)])
                .collect();
            dense_f32_pair(&w, &w1, out, inn, k, epsilon)
        })
        .collect()
}

fn gate(cache: Option<&Path>, memory: bool) -> Result<Gate> {
    Gate::new(Config {
        cache_dir: cache.map(Path::to_path_buf),
        memory_cache_bytes: if memory { 8 << 30 } else { 0 },
        backend: BackendChoice::Cpu,
        // Adapters: the Brand update; `--tuned`: unchanged / merged LoRA / randomized.
        method: Method::Auto,
        ..Config::default()
    })
}

fn agree(dense: &[Vec<usize>], brand: &Report) -> bool {
    dense.iter().zip(&brand.modules).all(|(d, b)| {
        (0..b.max_cos.len())
            .filter(|j| !b.tied.contains(j) && !b.near_epsilon.contains(j))
            .all(|j| d.contains(&j) == b.intruders.contains(&j))
    })
}

/// Peak RSS (MiB) of `intruder-gate scan` run as a child on the warm disk cache. The child
/// reports its own high-water mark (`VmHWM`): a parent's `getrusage(RUSAGE_CHILDREN)` would
/// count the parent's pages shared at fork time.
/// `subject` is `("--adapter", dir)` or `("--tuned", checkpoint)`.
fn warm_scan_rss(base: &Path, subject: (&str, &Path), cache: &Path, scratch: &Path) -> Result<f64> {
    let exe = std::env::current_exe()
        .map_err(|e| intruder_gate::Error::io(Path::new("current_exe"), e))?;
    let report = scratch.join("peak-rss.txt");
    let status = std::process::Command::new(exe)
        .args(["scan", "--backend", "cpu", "--format", "json", "--base"])
        .arg(base)
        .arg(subject.0)
        .arg(subject.1)
        .arg("--cache-dir")
        .arg(cache)
        .env(PEAK_RSS_ENV, &report)
        .stdout(std::process::Stdio::null())
        .status()
        .map_err(|e| intruder_gate::Error::io(Path::new("intruder-gate scan"), e))?;
    if status.code() == Some(2) || status.code().is_none() {
        intruder_gate::bail!(Internal, "warm scan child failed: {status}");
    }
    let text =
        std::fs::read_to_string(&report).map_err(|e| intruder_gate::Error::io(&report, e))?;
    let kib: f64 = text.trim().parse().map_err(|_| {
        intruder_gate::Error::new(
            intruder_gate::ErrorKind::Internal,
            format!("{}: not a number", report.display()),
        )
    })?;
    Ok(kib / 1024.0)
}

/// Set by `bench` for its child `scan`: the file to write the process's peak RSS (KiB) into.
pub const PEAK_RSS_ENV: &str = "INTRUDER_GATE_PEAK_RSS_FILE";

/// Writes this process's `VmHWM` (KiB) to `$INTRUDER_GATE_PEAK_RSS_FILE`, when set (Linux).
pub fn write_peak_rss_if_asked() {
    let Some(path) = std::env::var_os(PEAK_RSS_ENV) else {
        return;
    };
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    if let Some(kib) = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
    {
        let _ = std::fs::write(path, kib.to_string());
    }
}

/// Warm screenings timed per repetition (the median of all is reported). They are cheap, and a
/// single one swings by a third on a shared machine (page faults on the first allocations after
/// the cold pass, a pool thread waking up): a server's gate screens many adapters.
const WARM_SAMPLES: usize = 5;

/// `reps` (at least one) timed runs of `f`: the median time and the last result.
fn repeated<T>(reps: usize, mut f: impl FnMut() -> Result<T>) -> Result<(f64, T)> {
    let mut times = Vec::new();
    let mut last = None;
    for _ in 0..reps.max(1) {
        let (t, x) = timed(&mut f)?;
        times.push(t);
        last = Some(x);
    }
    Ok((median(times), last.expect("at least one repetition")))
}

/// The Brand side of a row, as the CLI runs it: per repetition a fresh cache under `cache_root`,
/// one cold screening and [`WARM_SAMPLES`] warm ones with the spectra in memory, then as many on a
/// gate without a memory cache (every spectrum read from disk). Medians, and the last warm report.
/// Repetition 0's cache is left for [`warm_scan_rss`].
struct BrandTimes {
    cold: f64,
    warm_memory: f64,
    warm_disk: f64,
    report: Report,
}

fn time_brand(
    cache_root: &Path,
    base_path: &Path,
    reps: usize,
    screen: impl Fn(&Gate) -> Result<Report>,
) -> Result<BrandTimes> {
    let (mut cold, mut warm_mem, mut warm_disk) = (Vec::new(), Vec::new(), Vec::new());
    let mut report = None;
    for rep in 0..reps.max(1) {
        let cache = cache_root.join(rep.to_string());
        let _ = std::fs::remove_dir_all(&cache);
        let g = gate(Some(&cache), true)?;
        g.attach_base(base_path)?;
        cold.push(timed(|| screen(&g))?.0);
        for _ in 0..WARM_SAMPLES {
            let (t, r) = timed(|| screen(&g))?;
            warm_mem.push(t);
            report = Some(r);
        }
        let fresh = gate(Some(&cache), false)?;
        fresh.attach_base(base_path)?;
        for _ in 0..WARM_SAMPLES {
            warm_disk.push(timed(|| screen(&fresh))?.0);
        }
    }
    Ok(BrandTimes {
        cold: median(cold),
        warm_memory: median(warm_mem),
        warm_disk: median(warm_disk),
        report: report.expect("at least one repetition"),
    })
}

/// Times one base + adapter configuration. `reps` repetitions for the cheap methods, `dense_reps`
/// for the dense one (minutes per repetition at LLM scale).
pub fn measure(
    name: &str,
    base_path: &Path,
    adapter_path: &Path,
    scratch: &Path,
    reps: usize,
    dense_reps: usize,
) -> Result<Row> {
    let base = BaseModel::open(base_path, &Default::default())?;
    let adapter = adapter::load_peft_dir(adapter_path, &Default::default())?;
    let (dense, dense_intruders) = repeated(dense_reps, || dense_f32(&base, &adapter, 10, 0.5))?;
    let cache_root = scratch.join(format!("bench-cache-{name}"));
    let brand = time_brand(&cache_root, base_path, reps, |g| g.screen(&adapter))?;
    let rss = warm_scan_rss(
        base_path,
        ("--adapter", adapter_path),
        &cache_root.join("0"),
        scratch,
    )?;
    let _ = std::fs::remove_dir_all(&cache_root);
    Ok(Row {
        name: name.to_string(),
        modules: adapter.modules.len(),
        dense,
        brand_cold: brand.cold,
        brand_warm_memory: brand.warm_memory,
        brand_warm_disk: brand.warm_disk,
        warm_scan_peak_rss_mib: rss,
        dense_intruders: dense_intruders.iter().map(Vec::len).sum(),
        brand_intruders: brand.report.total_intruders,
        verdicts_agree: agree(&dense_intruders, &brand.report),
    })
}

/// Times `scan --tuned` (`auto`) on one base + checkpoint against the paper/PEFT method (f32 SVDs
/// of `W0` and `W'` for every changed matrix). The row's brand columns hold `auto`'s times.
pub fn measure_tuned(
    name: &str,
    base_path: &Path,
    tuned_path: &Path,
    scratch: &Path,
    reps: usize,
    dense_reps: usize,
) -> Result<Row> {
    let base = BaseModel::open(base_path, &Default::default())?;
    let tuned = BaseModel::open(tuned_path, &Default::default())?;
    let changed: Vec<String> = tuned
        .matrix_names()
        .into_iter()
        .filter(|n| match (base.matrix(n), tuned.matrix(n)) {
            (Ok(b), Ok(t)) => (b.rows, b.cols) == (t.rows, t.cols) && b.bytes != t.bytes,
            _ => false,
        })
        .collect();
    let (dense, dense_intruders) = repeated(dense_reps, || {
        changed
            .iter()
            .map(|n| {
                let (b, t) = (base.matrix(n)?, tuned.matrix(n)?);
                dense_f32_pair(&b.to_f32(), &t.to_f32(), b.rows, b.cols, 10, 0.5)
            })
            .collect::<Result<Vec<_>>>()
    })?;
    drop((base, tuned));
    let cache_root = scratch.join(format!("bench-cache-{}", name.replace(' ', "_")));
    let brand = time_brand(&cache_root, base_path, reps, |g| g.screen_tuned(tuned_path))?;
    let report = &brand.report;
    let rss = warm_scan_rss(
        base_path,
        ("--tuned", tuned_path),
        &cache_root.join("0"),
        scratch,
    )?;
    let _ = std::fs::remove_dir_all(&cache_root);
    let agree = changed.iter().zip(&dense_intruders).all(|(n, d)| {
        report
            .modules
            .iter()
            .find(|m| &m.base_tensor == n)
            .is_some_and(|b| {
                (0..b.max_cos.len())
                    .filter(|j| !b.tied.contains(j) && !b.near_epsilon.contains(j))
                    .all(|j| d.contains(&j) == b.intruders.contains(&j))
            })
    });
    let solvers: Vec<String> = report
        .modules
        .iter()
        .map(|m| match m.detected_rank {
            Some(r) => format!("{}(r={r})", m.solver.label()),
            None => m.solver.label().to_string(),
        })
        .collect();
    eprintln!("{name}: solvers {solvers:?}, seed {:?}", report.seed);
    Ok(Row {
        name: name.to_string(),
        modules: changed.len(),
        dense,
        brand_cold: brand.cold,
        brand_warm_memory: brand.warm_memory,
        brand_warm_disk: brand.warm_disk,
        warm_scan_peak_rss_mib: rss,
        dense_intruders: dense_intruders.iter().map(Vec::len).sum(),
        brand_intruders: report.total_intruders,
        verdicts_agree: agree && report.modules.len() == changed.len(),
    })
}

/// The Markdown table the README shows.
pub fn table(rows: &[Row]) -> String {
    table_for(rows, "brand")
}

/// [`table`] with the fast method's columns named `fast` ("brand", or "auto" for `--tuned`).
pub fn table_for(rows: &[Row], fast: &str) -> String {
    let mut s = format!(
        "| configuration | modules | dense | {fast}-cold | {fast}-warm (memory) | {fast}-warm (disk) | dense / warm (memory) | dense / warm (disk) | dense / cold | warm scan peak RSS | intruders dense / {fast} | verdicts |\n|---|---|---|---|---|---|---|---|---|---|---|---|\n",
    );
    let t = seconds;
    for r in rows {
        s += &format!(
            "| {} | {} | {} | {} | {} | {} | {:.0}× | {:.0}× | {:.2}× | {:.0} MiB | {} / {} | {} |\n",
            r.name,
            r.modules,
            t(r.dense),
            t(r.brand_cold),
            t(r.brand_warm_memory),
            t(r.brand_warm_disk),
            r.dense / r.brand_warm_memory,
            r.dense / r.brand_warm_disk,
            r.dense / r.brand_cold,
            r.warm_scan_peak_rss_mib,
            r.dense_intruders,
            r.brand_intruders,
            if r.verdicts_agree { "identical" } else { "DIFFER" }
        );
    }
    s
}

/// `W0 + s·B·A` for every module of `adapter_dir`, every other base tensor copied: a merged
/// checkpoint, written once under `dir` as one safetensors file in `dtype`.
pub fn merged_checkpoint(
    dir: &Path,
    name: &str,
    base_path: &Path,
    adapter_dir: &Path,
    dtype: DType,
) -> Result<PathBuf> {
    let path = dir.join(format!("{name}.safetensors"));
    if path.exists() {
        return Ok(path);
    }
    let base = BaseModel::open(base_path, &Default::default())?;
    let adapter = adapter::load_peft_dir(adapter_dir, &Default::default())?;
    let names: Vec<&str> = adapter.modules.iter().map(|m| m.name.as_str()).collect();
    let targets = mapping::map_modules(&names, &base.matrix_names())?;
    let mut tensors = Vec::new();
    for n in base.matrix_names() {
        let t = base.matrix(&n)?;
        let mut w = t.to_f32();
        if let Some(i) = targets.iter().position(|x| *x == n) {
            let m = &adapter.modules[i];
            let delta = faer::MatRef::from_row_major_slice(&m.b, t.rows, m.rank)
                * faer::MatRef::from_row_major_slice(&m.a, m.rank, t.cols);
            for (k, x) in w.iter_mut().enumerate() {
                *x += m.scale as f32 * delta[(k / t.cols, k % t.cols)];
            }
        }
        tensors.push((n, dtype, vec![t.rows, t.cols], encode(&w, dtype)));
    }
    safetensors_file::write(&path, &tensors, &Default::default())?;
    Ok(path)
}

/// A full-fine-tune-like checkpoint of the synthetic Llama layer: each matrix plus a dense
/// perturbation with a decaying spectrum (a Gaussian bulk with power-law column scales, a
/// quarter of the base's) and four strong new directions (`synth::llm_like_matrix`'s outliers),
/// bf16, written once under `dir`.
pub fn llama_full_finetune(dir: &Path, base_path: &Path) -> Result<PathBuf> {
    let path = dir.join("llama-layer-full-ft.safetensors");
    if path.exists() {
        return Ok(path);
    }
    let base = BaseModel::open(base_path, &Default::default())?;
    let mut tensors = Vec::new();
    for (i, n) in base.matrix_names().into_iter().enumerate() {
        let t = base.matrix(&n)?;
        let delta =
            intruder_gate_testkit::synth::llm_like_matrix(0xF00D + i as u64, t.rows, t.cols);
        let w: Vec<f32> = t
            .to_f32()
            .iter()
            .zip(&delta)
            .map(|(w, d)| w + 0.25 * d)
            .collect();
        tensors.push((
            n,
            DType::BF16,
            vec![t.rows, t.cols],
            encode(&w, DType::BF16),
        ));
    }
    safetensors_file::write(&path, &tensors, &Default::default())?;
    Ok(path)
}

/// The synthetic Llama layer of the benchmark, written once under `dir`.
pub fn llama_layer(dir: &Path, rank: usize) -> Result<(PathBuf, PathBuf)> {
    let base = dir.join("llama-layer-base");
    if !base.join("model.safetensors.index.json").exists() {
        intruder_gate_testkit::synth::write_llama_base(&base, 1, 4096, 11008, DType::BF16, 7)?;
    }
    let adapter = dir.join(format!("llama-layer-r{rank}"));
    intruder_gate_testkit::synth::write_llama_adapter(&adapter, &[0], 4096, 11008, rank, 2, 8)?;
    Ok((base, adapter))
}

/// `clamp` against `scan` on one configuration, as the CLI runs them (no memory cache): cold with
/// no cache at all (`--no-cache`), warm from a populated disk cache. Seconds, medians.
pub struct ClampRow {
    pub name: String,
    pub modules: usize,
    pub scan_cold: f64,
    /// One screening keeping its solutions, then the factor assembly.
    pub clamp_cold: f64,
    /// The report-only path: a screening, then `clamp::clamp` solving every module again.
    pub two_pass_cold: f64,
    pub scan_warm: f64,
    pub clamp_warm: f64,
    pub two_pass_warm: f64,
    pub directions: usize,
    /// The one-pass factors equal the two-pass ones bit for bit.
    pub identical: bool,
}

/// Times [`ClampRow`]'s columns, interleaved within each repetition so that drift on a shared
/// machine hits them alike.
pub fn measure_clamp(
    name: &str,
    base_path: &Path,
    adapter_path: &Path,
    scratch: &Path,
    reps: usize,
) -> Result<ClampRow> {
    use intruder_gate::clamp::{self, ClampOptions};
    let adapter = adapter::load_peft_dir(adapter_path, &Default::default())?;
    let opts = ClampOptions::default();
    let one_pass = |g: &Gate| {
        let (report, solutions) = g.screen_with_solutions(&adapter)?;
        clamp::clamp_solved(&adapter, &report, &solutions, &opts)
    };
    let two_pass = |g: &Gate| clamp::clamp(g, &adapter, &g.screen(&adapter)?, &opts);
    let fresh = |cache: Option<&Path>| -> Result<Gate> {
        let g = gate(cache, false)?;
        g.attach_base(base_path)?;
        Ok(g)
    };
    let cache = scratch.join(format!("bench-clamp-cache-{name}"));
    let _ = std::fs::remove_dir_all(&cache);
    fresh(Some(&cache))?.screen(&adapter)?;
    let mut t: [Vec<f64>; 6] = Default::default();
    let (mut once, mut twice) = (None, None);
    for _ in 0..reps.max(1) {
        t[0].push(timed(|| fresh(None)?.screen(&adapter))?.0);
        let (s, c) = timed(|| one_pass(&fresh(None)?))?;
        t[1].push(s);
        once = Some(c);
        let (s, c) = timed(|| two_pass(&fresh(None)?))?;
        t[2].push(s);
        twice = Some(c);
        // A gate without a memory cache reads every spectrum from disk, like a fresh process.
        let g = fresh(Some(&cache))?;
        for _ in 0..WARM_SAMPLES {
            t[3].push(timed(|| g.screen(&adapter))?.0);
            t[4].push(timed(|| one_pass(&g))?.0);
            t[5].push(timed(|| two_pass(&g))?.0);
        }
    }
    let _ = std::fs::remove_dir_all(&cache);
    let (once, twice) = (
        once.expect("one repetition"),
        twice.expect("one repetition"),
    );
    let [scan_cold, clamp_cold, two_pass_cold, scan_warm, clamp_warm, two_pass_warm] =
        t.map(median);
    Ok(ClampRow {
        name: name.to_string(),
        modules: adapter.modules.len(),
        scan_cold,
        clamp_cold,
        two_pass_cold,
        scan_warm,
        clamp_warm,
        two_pass_warm,
        directions: once.clamped_directions(),
        identical: once.modules == twice.modules,
    })
}

fn seconds(x: f64) -> String {
    if x < 1.0 {
        format!("{:.1} ms", x * 1e3)
    } else {
        format!("{x:.2} s")
    }
}

/// The Markdown table of [`ClampRow`]s the README shows.
pub fn clamp_table(rows: &[ClampRow]) -> String {
    let mut s = String::from(
        "| configuration | modules | scan cold | clamp cold | clamp / scan cold | two-pass clamp cold | scan warm (disk) | clamp warm | clamp / scan warm | two-pass clamp warm | directions clamped | factors vs two-pass |\n|---|---|---|---|---|---|---|---|---|---|---|---|\n",
    );
    for r in rows {
        s += &format!(
            "| {} | {} | {} | {} | {:.2}× | {} | {} | {} | {:.2}× | {} | {} | {} |\n",
            r.name,
            r.modules,
            seconds(r.scan_cold),
            seconds(r.clamp_cold),
            r.clamp_cold / r.scan_cold,
            seconds(r.two_pass_cold),
            seconds(r.scan_warm),
            seconds(r.clamp_warm),
            r.clamp_warm / r.scan_warm,
            seconds(r.two_pass_warm),
            r.directions,
            if r.identical { "identical" } else { "DIFFER" }
        );
    }
    s
}
