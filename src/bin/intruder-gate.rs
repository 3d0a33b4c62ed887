//! The command line: `scan`, `index`, `demo`. Exit 0 on success, 1 when the verdict reaches
//! `--fail-on`, 2 on any error (with a message on stderr starting `error:`).

use clap::{Args, Parser, Subcommand, ValueEnum};
use intruder_gate::backend::BackendChoice;
use intruder_gate::report::{Method, Report, Verdict};
use intruder_gate::spectrum::cache::CacheDType;
use intruder_gate::{Config, Error, Gate};
use std::path::PathBuf;
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
    #[arg(long, default_value = "../shared/fixtures/minilm")]
    fixtures: PathBuf,
    /// Also bench one synthetic Llama-7B layer (q,k,v,o 4096², gate/up 11008×4096, down 4096×11008) at these ranks.
    #[arg(long, value_delimiter = ',')]
    llama_ranks: Vec<usize>,
    /// Repetitions of the Brand runs (medians are reported).
    #[arg(long, default_value_t = 5)]
    reps: usize,
    /// Repetitions of the dense method.
    #[arg(long, default_value_t = 3)]
    dense_reps: usize,
    /// Scratch directory for generated models and caches.
    #[arg(long, default_value = "target/bench")]
    work: PathBuf,
}

#[derive(Clone, Copy, ValueEnum)]
enum DTypeArg {
    F32,
    F16,
    Bf16,
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
    #[arg(long, value_enum, default_value = "auto")]
    backend: BackendArg,
    /// Worker threads (0 = one per core).
    #[arg(long, default_value_t = 0)]
    threads: usize,
}

#[derive(Args)]
struct ScanArgs {
    #[command(flatten)]
    common: Common,
    /// PEFT adapter directory (adapter_config.json + adapter_model.safetensors).
    #[arg(long, required_unless_present = "tuned", conflicts_with = "tuned")]
    adapter: Option<PathBuf>,
    /// A fully fine-tuned model to compare with the base (dense method).
    #[arg(long)]
    tuned: Option<PathBuf>,
    #[arg(long, default_value_t = 10)]
    top_k: usize,
    #[arg(long, default_value_t = 0.5)]
    epsilon: f64,
    #[arg(long, value_enum, default_value = "brand")]
    method: MethodArg,
    #[arg(long, value_enum, default_value = "text")]
    format: Format,
    /// Exit 1 when the verdict is at least this severe.
    #[arg(long, value_enum)]
    fail_on: Option<FailOn>,
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
    Auto,
    Cpu,
    Cuda,
}

#[derive(Clone, Copy, ValueEnum)]
enum MethodArg {
    Brand,
    Dense,
}

#[derive(Clone, Copy, ValueEnum, PartialEq)]
enum Format {
    Text,
    Json,
}

#[derive(Clone, Copy, ValueEnum)]
enum FailOn {
    Warn,
    Clamp,
    Reject,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Scan(a) => scan(a),
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
    let cfg = Config {
        top_k: a.top_k,
        epsilon: a.epsilon,
        method: match a.method {
            MethodArg::Brand => Method::Brand,
            MethodArg::Dense => Method::Dense,
        },
        ..config(&a.common)
    };
    let gate = Gate::new(cfg)?;
    gate.attach_base(&a.common.base)?;
    let report = match (&a.adapter, &a.tuned) {
        (Some(dir), _) => gate.screen_adapter_dir(dir)?,
        (None, Some(t)) => gate.screen_tuned(t)?,
        (None, None) => unreachable!("clap requires one"),
    };
    print_report(&report, a.format);
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
    let summary = gate.index(include.as_ref(), &|p| eprintln!("{p}"))?;
    println!("{summary}");
    Ok(ExitCode::SUCCESS)
}

fn demo() -> Result<ExitCode, Error> {
    let dir = std::env::temp_dir().join(format!("intruder-gate-demo-{}", std::process::id()));
    let result = intruder_gate::demo::run(&dir);
    let _ = std::fs::remove_dir_all(&dir);
    print!("{}", result?);
    Ok(ExitCode::SUCCESS)
}

fn synth(a: SynthArgs) -> Result<ExitCode, Error> {
    use intruder_gate::synth;
    use intruder_gate::tensor::DType;
    let dtype = match a.dtype {
        DTypeArg::F32 => DType::F32,
        DTypeArg::F16 => DType::F16,
        DTypeArg::Bf16 => DType::BF16,
    };
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
    use intruder_gate::bench;
    std::fs::create_dir_all(&a.work).map_err(|e| Error::io(&a.work, e))?;
    let mut rows = Vec::new();
    if let Some(base) = &a.minilm {
        for name in ["lora_r2", "lora_r16_qv", "rslora_r16"] {
            let row = bench::measure(
                &format!("MiniLM {name}"),
                base,
                &a.fixtures.join(name),
                &a.work,
                a.reps,
                a.dense_reps,
            )?;
            eprint!("{}", bench::table(std::slice::from_ref(&row)));
            rows.push(row);
        }
    }
    for &r in &a.llama_ranks {
        let (base, adapter) = bench::llama_layer(&a.work, r)?;
        let row = bench::measure(
            &format!("Llama-7B layer r={r}"),
            &base,
            &adapter,
            &a.work,
            a.reps,
            a.dense_reps,
        )?;
        eprint!("{}", bench::table(std::slice::from_ref(&row)));
        rows.push(row);
    }
    let threads = rayon::current_num_threads();
    println!("{threads} threads\n\n{}", bench::table(&rows));
    Ok(ExitCode::SUCCESS)
}
