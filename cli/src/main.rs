//! The command line: `scan`, `clamp`, `index`, `demo`. Exit 0 on success, 1 when the verdict
//! reaches `--fail-on` or `clamp --verify` fails, 2 on any error (with a message on stderr
//! starting `error:`), including a malformed adapter that the policy rejected.

mod bench;
mod demo;
mod one_shot;

use clap::{Args, Parser, Subcommand, ValueEnum};
use intruder_gate::adapter::load_peft_dir;
use intruder_gate::backend::BackendChoice;
use intruder_gate::policy::OnInvalid;
use intruder_gate::report::plural;
use intruder_gate::report::{Method, Report, Verdict};
use intruder_gate::spectrum::cache::CacheDType;
use intruder_gate::tensor::DType;
use intruder_gate::{ClampMode, ClampOptions, Policy, Target};
use intruder_gate::{Config, Error, ErrorKind, Gate};
use std::io::{IsTerminal as _, Write as _};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "intruder-gate",
    version,
    about = "Screens LoRA adapters for intruder dimensions"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Screen a PEFT adapter (or a fully fine-tuned model) against its base.
    Scan(ScanArgs),
    /// Scale the intruders of a PEFT adapter by lambda and write the result as a PEFT adapter.
    Clamp(ClampArgs),
    /// Precompute the base-spectrum cache for a whole base model.
    Index(IndexArgs),
    /// Generate a small synthetic base and three adapters, screen them, print what was found.
    Demo,
    /// Time the dense method against the Brand update (cold, warm in memory, warm on disk).
    Bench(BenchArgs),
    /// Write a synthetic Llama-shaped base (sharded) and LoRA adapters, for benchmarks and the GPU check.
    Synth(SynthArgs),
}

#[derive(Args)]
struct SynthArgs {
    /// Output directory: base/, adapter/ (all layers) and adapter-layer0/.
    #[arg(long)]
    out: PathBuf,
    #[arg(long, default_value_t = 1)]
    layers: usize,
    #[arg(long, default_value_t = 4096)]
    hidden: usize,
    #[arg(long, default_value_t = 11008)]
    intermediate: usize,
    #[arg(long, default_value_t = 16)]
    rank: usize,
    /// Intruder directions planted in each q_proj and down_proj.
    #[arg(long, default_value_t = 2)]
    planted: usize,
    #[arg(long, value_enum, default_value = "bf16")]
    dtype: DTypeArg,
    #[arg(long, default_value_t = 7)]
    seed: u64,
}

#[derive(Args)]
struct BenchArgs {
    /// The MiniLM base (scripts/fetch-minilm.sh prints its path); with --fixtures, benches the three real adapters.
    #[arg(long)]
    minilm: Option<PathBuf>,
    #[arg(long, default_value = "tests/fixtures/minilm")]
    fixtures: PathBuf,
    /// Also bench one synthetic Llama-7B layer (q,k,v,o 4096², gate/up 11008×4096, down 4096×11008) at these ranks.
    #[arg(long, value_delimiter = ',')]
    llama_ranks: Vec<usize>,
    /// Also bench `scan --tuned` (auto vs dense): with --minilm, the lora_r16_qv fixture merged
    /// into MiniLM; with --tuned-llama, checkpoints of the synthetic Llama layer.
    #[arg(long)]
    tuned: bool,
    /// With --tuned: also the Llama layer with the r = 16 adapter merged, and a
    /// full-fine-tune-like perturbation of it (dense: tens of minutes per repetition).
    #[arg(long, requires = "tuned")]
    tuned_llama: bool,
    /// Repetitions of the Brand runs: one cold and five warm screenings each (medians are reported).
    #[arg(long, default_value_t = 5)]
    reps: usize,
    /// Repetitions of the dense method.
    #[arg(long, default_value_t = 3)]
    dense_reps: usize,
    /// Skip the clamp-against-scan rows (each costs about four cold screenings per repetition).
    #[arg(long)]
    no_clamp: bool,
    /// Scratch directory for generated models and caches.
    #[arg(long, default_value = "target/bench")]
    work: PathBuf,
    /// Only the one-shot table for the MiniLM adapters: fresh `scan` processes, warm disk cache
    /// against `--method dense --no-cache`, alternating, this many of each.
    #[arg(long)]
    one_shot: Option<usize>,
}

#[derive(Clone, Copy, ValueEnum)]
enum DTypeArg {
    F32,
    F16,
    Bf16,
}

impl From<DTypeArg> for intruder_gate::tensor::DType {
    fn from(d: DTypeArg) -> Self {
        match d {
            DTypeArg::F32 => Self::F32,
            DTypeArg::F16 => Self::F16,
            DTypeArg::Bf16 => Self::BF16,
        }
    }
}

#[derive(Args)]
struct Common {
    /// Base model: a safetensors file, or a directory (sharded or not).
    #[arg(long)]
    base: PathBuf,
    /// Base-spectrum cache directory (default: the user's cache directory).
    #[arg(long, conflicts_with = "no_cache")]
    cache_dir: Option<PathBuf>,
    /// Do not read or write the on-disk cache.
    #[arg(long)]
    no_cache: bool,
    /// Store cached singular vectors as f16 (half the size, ~4e-4 in max|cos|).
    #[arg(long)]
    cache_f16: bool,
    /// Where the SVDs and projections run: cuda when a GPU is usable (auto), or forced.
    #[arg(long, value_enum, default_value = "auto")]
    backend: BackendArg,
    /// Worker threads (0 = one per core; at most 4 per core).
    #[arg(long, default_value_t = 0)]
    threads: usize,
}

/// The intruder test's settings, shared by `scan` and `clamp`.
#[derive(Args)]
struct Screening {
    /// How many top singular vectors of the adapted weight are tested (1..=4096).
    #[arg(long, default_value_t = 10)]
    top_k: usize,
    /// A vector is an intruder when its max |cos| with every base singular vector is below
    /// this, in (0, 1].
    #[arg(long, default_value_t = 0.5, allow_negative_numbers = true)]
    epsilon: f64,
}

#[derive(Args)]
struct ClampArgs {
    #[command(flatten)]
    common: Common,
    #[command(flatten)]
    screening: Screening,
    /// PEFT adapter directory to clamp.
    #[arg(long)]
    adapter: PathBuf,
    /// Output directory for the clamped PEFT adapter (not the input, nor inside it).
    #[arg(long)]
    out: PathBuf,
    /// Write into an --out directory that exists and is not empty (its adapter files are replaced).
    #[arg(long)]
    force: bool,
    /// Factor for each clamped singular value (0 removes the direction; > 1 amplifies it).
    #[arg(long, default_value_t = 0.75, allow_negative_numbers = true)]
    lambda: f64,
    /// Which intruders of each module are scaled.
    #[arg(long, value_enum, default_value = "all")]
    target: TargetArg,
    /// How the clamped update is written.
    #[arg(long, value_enum, default_value = "exact")]
    mode: ModeArg,
    /// Pad every module with zeros to this rank (servers with a fixed max_lora_rank).
    #[arg(long)]
    pad_rank_to: Option<usize>,
    /// Output dtype (default: the input's).
    #[arg(long, value_enum)]
    dtype: Option<DTypeArg>,
    /// Reload the written adapter, re-screen it and check the clamp; exit 1 if it fails.
    #[arg(long)]
    verify: bool,
}

#[derive(Clone, Copy, ValueEnum)]
enum TargetArg {
    /// Every intruder among the top k (PEFT's reduce_intruder_dimension).
    All,
    /// The highest-ranked intruder of each module (the paper's experiments).
    Top1,
}

#[derive(Clone, Copy, ValueEnum)]
enum ModeArg {
    /// Exactly, as a LoRA of rank r + m (m = directions clamped): nothing else changes.
    Exact,
    /// Its best rank-r approximation (as PEFT): the rank is kept, with a truncation error.
    RankPreserving,
}

#[derive(Args)]
struct ScanArgs {
    #[command(flatten)]
    common: Common,
    #[command(flatten)]
    screening: Screening,
    /// Verdict rules (JSON; see README, "Policy and clamping"). Default: the built-in policy.
    #[arg(long)]
    policy: Option<PathBuf>,
    /// PEFT adapter directory (adapter_config.json + adapter_model.safetensors).
    #[arg(long, required_unless_present = "tuned", conflicts_with = "tuned")]
    adapter: Option<PathBuf>,
    /// A fully fine-tuned or merged checkpoint to compare with the base.
    #[arg(long)]
    tuned: Option<PathBuf>,
    /// How the spectrum of the adapted weight is found: `brand` (adapters' default; DoRA modules
    /// use the randomized solver), `auto` (`--tuned`'s default: unchanged / merged LoRA by the
    /// Brand update / randomized top-k of W'), or `dense` (f64 SVDs of W0 and W': the reference).
    #[arg(long, value_enum)]
    method: Option<MethodArg>,
    /// Seed of the randomized solver's Gaussian sketches (reported as `seed`).
    #[arg(long)]
    seed: Option<u64>,
    /// Report format on stdout.
    #[arg(long, value_enum, default_value = "text")]
    format: Format,
    /// Exit 1 when the verdict is at least this severe.
    #[arg(long, value_enum)]
    fail_on: Option<FailOn>,
    /// After the run, write the gate's metrics here (Prometheus text format, replaced
    /// atomically), also when the scan fails; e.g. for node_exporter's textfile collector.
    /// Must be a regular file or not exist yet.
    #[arg(long)]
    metrics_file: Option<PathBuf>,
}

#[derive(Args)]
struct IndexArgs {
    #[command(flatten)]
    common: Common,
    /// Only tensors whose name matches this regular expression.
    #[arg(long)]
    include: Option<String>,
}

#[derive(Clone, Copy, ValueEnum)]
enum BackendArg {
    /// CUDA when a usable GPU is found, else the CPU (the report says why).
    Auto,
    Cpu,
    /// CUDA, or an error.
    Cuda,
}

#[derive(Clone, Copy, ValueEnum)]
enum MethodArg {
    /// Cached base spectrum + Brand update: fast, the default.
    Brand,
    /// Thin SVD of the base and the adapted weight in f64: the slow reference.
    Dense,
    /// Per matrix, whatever is exact and fastest against the cached base spectrum.
    Auto,
}

#[derive(Clone, Copy, ValueEnum, PartialEq)]
enum Format {
    /// A table for people.
    Text,
    /// The report's fixed JSON schema.
    Json,
}

#[derive(Clone, Copy, ValueEnum)]
enum FailOn {
    Warn,
    Clamp,
    Reject,
}

/// A CLI process lives for one scan: memory it frees is better kept for its next allocation than
/// handed back to the kernel. glibc's defaults return large blocks (and trimmed heap tops of the
/// worker threads' arenas) at once, so every module's working set was page-faulted and zeroed
/// afresh: a fifth of a warm r = 16 one-shot scan's CPU time. Blocks up to 32 MiB come from the
/// heap, and up to 128 MiB of free heap is kept. Library hosts keep their own allocator settings.
fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets allocator parameters; called before any other thread exists.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 128 << 20);
    }
}

fn main() -> ExitCode {
    // A closed stdout or stderr (`scan … | head -2`) ends the process quietly, as for any
    // filter, instead of a panic in println!.
    #[cfg(unix)]
    // SAFETY: restores the default action of one signal, before any other thread exists.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    keep_freed_memory();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Scan(a) => scan(a),
        Command::Clamp(a) => clamp(a),
        Command::Index(a) => index(a),
        Command::Demo => demo(),
        Command::Synth(a) => synth(a),
        Command::Bench(a) => bench(a),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(2)
        }
    }
}

fn config(c: &Common) -> Config {
    Config {
        backend: match c.backend {
            BackendArg::Auto => BackendChoice::Auto,
            BackendArg::Cpu => BackendChoice::Cpu,
            BackendArg::Cuda => BackendChoice::Cuda,
        },
        cache_dir: if c.no_cache {
            None
        } else {
            c.cache_dir
                .clone()
                .or_else(intruder_gate::config::default_cache_dir)
        },
        cache_dtype: if c.cache_f16 {
            CacheDType::F16
        } else {
            CacheDType::F32
        },
        // One process, one scan: the disk cache is the warm path; memory would only hold
        // spectra that are never asked for again.
        memory_cache_bytes: 0,
        threads: c.threads,
        ..Config::default()
    }
}

fn scan(a: ScanArgs) -> Result<ExitCode, Error> {
    if let Some(path) = &a.metrics_file {
        replaceable(path, "--metrics-file")?;
    }
    let policy = match &a.policy {
        Some(p) => Policy::load(p, &intruder_gate::limits::Limits::default())?,
        None => Policy::default(),
    };
    let cfg = Config {
        top_k: a.screening.top_k,
        epsilon: a.screening.epsilon,
        policy,
        method: match (a.method, a.tuned.is_some()) {
            (Some(MethodArg::Brand), _) | (None, false) => Method::Brand,
            (Some(MethodArg::Dense), _) => Method::Dense,
            (Some(MethodArg::Auto), _) | (None, true) => Method::Auto,
        },
        seed: a
            .seed
            .unwrap_or(intruder_gate::spectrum::randomized::DEFAULT_SEED),
        ..config(&a.common)
    };
    let gate = Gate::new(cfg)?;
    let outcome = screen_and_print(&gate, &a);
    let Some(path) = &a.metrics_file else {
        return outcome;
    };
    let text = gate.metrics().render();
    let written = replaceable(path, "--metrics-file").and_then(|()| {
        intruder_gate::safetensors_file::write_atomically(path, |f| f.write_all(text.as_bytes()))
    });
    match written {
        Ok(()) => outcome,
        Err(e) if outcome.is_ok() => Err(e),
        // The scan's own error is the one to exit with.
        Err(e) => {
            eprintln!("error: {e}");
            outcome
        }
    }
}

/// `path` may be replaced by a file this run writes: absent, or a regular file (not a device, a
/// directory, a FIFO or a symlink, which an atomic rename would replace rather than write).
fn replaceable(path: &Path, flag: &str) -> Result<(), Error> {
    match std::fs::symlink_metadata(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(Error::io(path, e)),
        Ok(m) if m.file_type().is_file() => Ok(()),
        Ok(_) => Err(Error::new(
            ErrorKind::InvalidArgument,
            format!(
                "{flag} {}: not a regular file; refusing to replace it",
                path.display()
            ),
        )),
    }
}

/// The clamp's output directory: never the input adapter or a directory inside it, and an
/// existing non-empty one only with `--force`.
fn check_out(adapter: &Path, out: &Path, force: bool) -> Result<(), Error> {
    let bad = |why: String| Err(Error::new(ErrorKind::InvalidArgument, why));
    let o = out.display();
    if let (Ok(input), Some(target)) = (adapter.canonicalize(), resolved(out)) {
        if target.starts_with(&input) {
            return bad(format!(
                "--out {o} is the input adapter directory or inside it; refusing to overwrite the input"
            ));
        }
    }
    match std::fs::symlink_metadata(out) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(Error::io(out, e)),
        Ok(m) if !m.is_dir() => bad(format!("--out {o} exists and is not a directory")),
        Ok(_) => {
            let empty = std::fs::read_dir(out)
                .map_err(|e| Error::io(out, e))?
                .next()
                .is_none();
            if empty || force {
                Ok(())
            } else {
                bad(format!(
                    "--out {o} exists and is not empty; pass --force to replace its adapter files"
                ))
            }
        }
    }
}

/// `p` with every existing ancestor resolved (symlinks, `..`), the missing rest appended.
fn resolved(p: &Path) -> Option<PathBuf> {
    let abs = std::path::absolute(p).ok()?;
    let mut existing = abs.as_path();
    let mut rest = Vec::new();
    while !existing.exists() {
        rest.push(existing.file_name()?);
        existing = existing.parent()?;
    }
    let mut out = existing.canonicalize().ok()?;
    out.extend(rest.iter().rev());
    Some(out)
}

fn screen_and_print(gate: &Gate, a: &ScanArgs) -> Result<ExitCode, Error> {
    gate.attach_base(&a.common.base)?;
    let report = match (&a.adapter, &a.tuned) {
        (Some(dir), _) => gate.screen_adapter_dir(dir)?,
        (None, Some(t)) => gate.screen_tuned(t)?,
        (None, None) => unreachable!("clap requires one"),
    };
    print_report(&report, a.format);
    bench::write_peak_rss_if_asked();
    if let Some(e) = &report.error {
        eprintln!("error: {}", e.message);
        return Ok(ExitCode::from(2));
    }
    let threshold = a.fail_on.map(|f| match f {
        FailOn::Warn => Verdict::Warn,
        FailOn::Clamp => Verdict::Clamp,
        FailOn::Reject => Verdict::Reject,
    });
    Ok(match threshold {
        Some(t) if report.verdict >= t => ExitCode::from(1),
        _ => ExitCode::SUCCESS,
    })
}

fn print_report(r: &Report, format: Format) {
    match format {
        Format::Json => println!("{}", r.to_json()),
        Format::Text => print!("{}", r.to_text()),
    }
}

fn clamp(a: ClampArgs) -> Result<ExitCode, Error> {
    let cfg = Config {
        top_k: a.screening.top_k,
        epsilon: a.screening.epsilon,
        // A malformed adapter cannot be clamped: fail rather than report.
        policy: Policy {
            on_invalid: OnInvalid::Fail,
            ..Policy::default()
        },
        ..config(&a.common)
    };
    let opts = ClampOptions {
        lambda: a.lambda,
        target: match a.target {
            TargetArg::All => Target::All,
            TargetArg::Top1 => Target::Top1,
        },
        mode: match a.mode {
            ModeArg::Exact => ClampMode::Exact,
            ModeArg::RankPreserving => ClampMode::RankPreserving,
        },
    };
    let dtype = a.dtype.map(DType::from);
    // Every argument is checked before the work.
    opts.validate()?;
    check_out(&a.adapter, &a.out, a.force)?;
    let gate = Gate::new(cfg)?;
    intruder_gate::clamp::check_pad_rank(a.pad_rank_to, &gate.config().limits)?;
    gate.attach_base(&a.common.base)?;
    let adapter = gate.load_checked(&a.adapter)?;
    // One solve per module: the clamp assembles its factors from the screening's solutions.
    let (report, solutions) = gate.screen_with_solutions(&adapter)?;
    let clamped = intruder_gate::clamp::clamp_solved(&adapter, &report, &solutions, &opts)?;
    clamped.write_peft(&a.out, dtype, a.pad_rank_to)?;
    for m in clamped.modules.iter().filter(|m| !m.clamped.is_empty()) {
        let dirs: Vec<String> = m
            .clamped
            .iter()
            .map(|d| {
                format!(
                    "sigma[{}]={:.4} (max|cos| {:.3})",
                    d.index, d.sigma, d.max_cos
                )
            })
            .collect();
        let trunc = m.truncation.map_or(String::new(), |t| {
            format!(", truncation error {:.2e}", t.relative)
        });
        println!(
            "{}: rank {} -> {}: {}{trunc}",
            m.name,
            report_rank(&report, &m.name),
            m.rank,
            dirs.join(", ")
        );
    }
    println!(
        "clamped {} in {} of {} modules by lambda {} ({}, {}); wrote {}",
        plural(clamped.clamped_directions(), "direction"),
        clamped
            .modules
            .iter()
            .filter(|m| !m.clamped.is_empty())
            .count(),
        clamped.modules.len(),
        opts.lambda,
        name(a.target),
        name(a.mode),
        a.out.display()
    );
    if !a.verify {
        return Ok(ExitCode::SUCCESS);
    }
    let written = load_peft_dir(&a.out, &gate.config().limits)?;
    let verification = intruder_gate::clamp::verify(&gate, &adapter, &clamped, &written)?;
    print!("{verification}");
    Ok(if verification.passed {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

/// A value's spelling on the command line (`all`, `rank-preserving`).
fn name(v: impl ValueEnum) -> String {
    v.to_possible_value()
        .map_or_else(String::new, |p| p.get_name().to_string())
}

fn report_rank(report: &Report, module: &str) -> usize {
    report
        .modules
        .iter()
        .find(|m| m.module == module)
        .map_or(0, |m| m.rank)
}

fn index(a: IndexArgs) -> Result<ExitCode, Error> {
    let gate = Gate::new(config(&a.common))?;
    if gate.config().cache_dir.is_none() {
        return Err(Error::new(
            intruder_gate::ErrorKind::InvalidArgument,
            "index needs a cache directory (--cache-dir, not --no-cache)",
        ));
    }
    gate.attach_base(&a.common.base)?;
    let include = match &a.include {
        Some(re) => Some(regex::Regex::new(re).map_err(|e| {
            Error::new(
                intruder_gate::ErrorKind::InvalidArgument,
                format!("--include: {e}"),
            )
        })?),
        None => None,
    };
    // A bar redrawn in place on a terminal; one line per tensor in logs and pipes.
    let tty = std::io::stderr().is_terminal();
    let summary = gate.index(include.as_ref(), &|p| {
        if tty {
            eprint!("\r{}\x1b[K", progress_bar(p));
        } else {
            eprintln!("{p}");
        }
    });
    if tty {
        eprintln!();
    }
    println!("{}", summary?);
    Ok(ExitCode::SUCCESS)
}

/// `[#######.............]  12/224  5%  model.layers.1.mlp.up_proj  38s, ETA 11m 2s`.
fn progress_bar(p: &intruder_gate::gate::IndexProgress<'_>) -> String {
    const WIDTH: usize = 30;
    let filled = WIDTH * p.done / p.total.max(1);
    let clock = |s: f64| {
        let s = s.round() as u64;
        match s {
            0..60 => format!("{s}s"),
            60..3600 => format!("{}m {}s", s / 60, s % 60),
            _ => format!("{}h {}m", s / 3600, s % 3600 / 60),
        }
    };
    format!(
        "[{}{}] {}/{} {:>3}%  {}  {}, ETA {}",
        "#".repeat(filled),
        ".".repeat(WIDTH - filled),
        p.done,
        p.total,
        100 * p.done / p.total.max(1),
        p.name,
        clock(p.elapsed_s),
        clock(p.eta_s())
    )
}

fn demo() -> Result<ExitCode, Error> {
    let dir = std::env::temp_dir().join(format!("intruder-gate-demo-{}", std::process::id()));
    let result = demo::run(&dir);
    let _ = std::fs::remove_dir_all(&dir);
    print!("{}", result?);
    Ok(ExitCode::SUCCESS)
}

fn synth(a: SynthArgs) -> Result<ExitCode, Error> {
    use intruder_gate_testkit::synth;
    let dtype = a.dtype.into();
    let (h, i) = (a.hidden, a.intermediate);
    synth::write_llama_base(&a.out.join("base"), a.layers, h, i, dtype, a.seed)?;
    let all: Vec<usize> = (0..a.layers).collect();
    synth::write_llama_adapter(
        &a.out.join("adapter"),
        &all,
        h,
        i,
        a.rank,
        a.planted,
        a.seed + 1,
    )?;
    synth::write_llama_adapter(
        &a.out.join("adapter-layer0"),
        &[0],
        h,
        i,
        a.rank,
        a.planted,
        a.seed + 1,
    )?;
    println!(
        "wrote {} (base: {} layers × 7 modules, {h}/{i}; adapters r={})",
        a.out.display(),
        a.layers,
        a.rank
    );
    Ok(ExitCode::SUCCESS)
}

fn bench(a: BenchArgs) -> Result<ExitCode, Error> {
    std::fs::create_dir_all(&a.work).map_err(|e| Error::io(&a.work, e))?;
    let mut configs = Vec::new();
    if let Some(base) = &a.minilm {
        for name in ["lora_r2", "lora_r16_qv", "rslora_r16"] {
            configs.push((
                format!("MiniLM {name}"),
                base.clone(),
                a.fixtures.join(name),
            ));
        }
    }
    if let Some(reps) = a.one_shot {
        let mut rows = Vec::new();
        for (name, base, adapter) in &configs {
            let cache = a.work.join("one-shot-cache");
            let row = one_shot::measure(name, base, adapter, &cache, reps)?;
            eprint!("{}", one_shot::table(std::slice::from_ref(&row)));
            rows.push(row);
        }
        println!("{}", one_shot::table(&rows));
        return Ok(ExitCode::SUCCESS);
    }
    for &r in &a.llama_ranks {
        let (base, adapter) = bench::llama_layer(&a.work, r)?;
        configs.push((format!("Llama-7B layer r={r}"), base, adapter));
    }
    let (mut rows, mut clamp_rows) = (Vec::new(), Vec::new());
    for (name, base, adapter) in &configs {
        let row = bench::measure(name, base, adapter, &a.work, a.reps, a.dense_reps)?;
        eprint!("{}", bench::table(std::slice::from_ref(&row)));
        rows.push(row);
        if !a.no_clamp {
            let row = bench::measure_clamp(name, base, adapter, &a.work, a.reps)?;
            eprint!("{}", bench::clamp_table(std::slice::from_ref(&row)));
            clamp_rows.push(row);
        }
    }
    let mut tuned_rows = Vec::new();
    if a.tuned {
        let mut tuned = Vec::new();
        if let Some(base) = &a.minilm {
            let merged = bench::merged_checkpoint(
                &a.work,
                "minilm-merged-lora_r16_qv",
                base,
                &a.fixtures.join("lora_r16_qv"),
                DType::F32,
            )?;
            tuned.push((
                "MiniLM lora_r16_qv merged (f32)".to_string(),
                base.clone(),
                merged,
            ));
        }
        if a.tuned_llama {
            let (base, adapter) = bench::llama_layer(&a.work, 16)?;
            let merged = bench::merged_checkpoint(
                &a.work,
                "llama-layer-merged-r16",
                &base,
                &adapter,
                DType::BF16,
            )?;
            tuned.push((
                "Llama-7B layer merged r=16 (bf16)".to_string(),
                base.clone(),
                merged,
            ));
            let ft = bench::llama_full_finetune(&a.work, &base)?;
            tuned.push(("Llama-7B layer full-FT-like (bf16)".to_string(), base, ft));
        }
        for (name, base, t) in &tuned {
            let row = bench::measure_tuned(name, base, t, &a.work, a.reps, a.dense_reps)?;
            eprint!("{}", bench::table_for(std::slice::from_ref(&row), "auto"));
            tuned_rows.push(row);
        }
    }
    let threads = rayon::current_num_threads();
    println!("{threads} threads\n\n{}", bench::table(&rows));
    if !a.no_clamp {
        println!("\n{}", bench::clamp_table(&clamp_rows));
    }
    if !tuned_rows.is_empty() {
        println!(
            "\n`scan --tuned`:\n\n{}",
            bench::table_for(&tuned_rows, "auto")
        );
    }
    Ok(ExitCode::SUCCESS)
}
