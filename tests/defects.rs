//! Regression tests for the defects an outside round of fuzzing and fault injection found
//! (issue 15, item 2), library level: each failed before its fix.

mod common;

use common::{planted_trio, PLANTED};
use intruder_gate::adapter::{load_peft_dir, AdapterConfig};
use intruder_gate::backend::BackendChoice;
use intruder_gate::base::BaseModel;
use intruder_gate::limits::Limits;
use intruder_gate::safetensors_file::{write, SafetensorsFile};
use intruder_gate::tensor::{encode, DType};
use intruder_gate::{Config, Error, ErrorKind, Gate, Policy};
use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

#[track_caller]
fn assert_err<T: std::fmt::Debug>(r: Result<T, Error>, kind: ErrorKind, phrases: &[&str]) {
    let e = r.expect_err("expected an error");
    assert_eq!(e.kind(), kind, "wrong kind for: {e}");
    for p in phrases {
        assert!(e.message().contains(p), "{p:?} missing from: {e}");
    }
}

/// Runs `f` on its own thread and fails the test if it has not returned after `secs`: a call
/// that blocks forever (the defect) becomes a failure instead of a hung test run.
#[track_caller]
fn within<T: Send + 'static>(secs: u64, what: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    match rx.recv_timeout(Duration::from_secs(secs)) {
        Ok(v) => v,
        Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
            panic!("{what} did not return within {secs} s")
        }
        Err(_) => panic!("{what} panicked (see above)"),
    }
}

fn gate(cache: Option<&Path>) -> Gate {
    Gate::new(Config {
        cache_dir: cache.map(Path::to_path_buf),
        backend: BackendChoice::Cpu,
        ..Config::default()
    })
    .unwrap()
}

fn mkfifo(path: &Path) {
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: a NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0, "mkfifo");
}

type Tensor = (String, DType, Vec<usize>, Vec<u8>);

fn t(name: &str, rows: usize, cols: usize, values: &[f32]) -> Tensor {
    (
        name.into(),
        DType::F32,
        vec![rows, cols],
        encode(values, DType::F32),
    )
}

/// A PEFT directory with `config` and one module `q` of rank `r` (`[r, inn]`, `[out, r]`).
fn peft_dir(config: &str, r: usize, inn: usize, out: usize) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("adapter_config.json"), config).unwrap();
    let ramp = |n: usize| (0..n).map(|i| (i % 7) as f32 * 0.1).collect::<Vec<_>>();
    write(
        &dir.path().join("adapter_model.safetensors"),
        &[
            t("base_model.model.q.lora_A.weight", r, inn, &ramp(r * inn)),
            t("base_model.model.q.lora_B.weight", out, r, &ramp(out * r)),
        ],
        &BTreeMap::new(),
    )
    .unwrap();
    dir
}

// ---- files that are not what they should be ----

/// A FIFO where a file is expected blocked `open(2)` forever; devices were opened too.
#[test]
fn fifos_and_devices_are_refused_without_being_opened() {
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("w.safetensors");
    mkfifo(&fifo);
    let f = fifo.clone();
    let e = within(20, "opening a FIFO", move || {
        SafetensorsFile::open(&f, &Limits::default()).map(|_| ())
    });
    assert_err(e, ErrorKind::Io, &["not a regular file", "w.safetensors"]);
    let f = fifo.clone();
    assert_err(
        within(20, "a FIFO as base", move || {
            BaseModel::open(&f, &Limits::default()).map(|_| ())
        }),
        ErrorKind::Io,
        &["not a regular file"],
    );
    assert_err(
        BaseModel::open(Path::new("/dev/zero"), &Limits::default()),
        ErrorKind::Io,
        &["/dev/zero", "not a regular file"],
    );

    // In an adapter directory: as the weights, as the config; as a policy file.
    for name in ["adapter_model.safetensors", "adapter_config.json"] {
        let a = peft_dir(r#"{"r": 2, "lora_alpha": 4}"#, 2, 3, 4);
        let p = a.path().join(name);
        std::fs::remove_file(&p).unwrap();
        mkfifo(&p);
        let d = a.path().to_path_buf();
        assert_err(
            within(20, name, move || {
                load_peft_dir(&d, &Limits::default()).map(|_| ())
            }),
            ErrorKind::Io,
            &[name, "not a regular file"],
        );
    }
    let policy = dir.path().join("policy.json");
    mkfifo(&policy);
    assert_err(
        within(20, "a FIFO policy", move || {
            Policy::load(&policy, &Limits::default()).map(|_| ())
        }),
        ErrorKind::Io,
        &["not a regular file"],
    );
}

/// Every JSON document the tool reads has the 1 MiB limit of `adapter_config.json`: the policy
/// file had none.
#[test]
fn a_policy_file_over_the_config_limit_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("policy.json");
    let ok = r#"{"rules": [], "on_invalid": "fail"}"#;
    std::fs::write(&p, ok).unwrap();
    assert_eq!(Policy::load(&p, &Limits::default()).unwrap().rules, vec![]);
    let padded = format!("{ok}{}", " ".repeat(1 << 20));
    std::fs::write(&p, padded).unwrap();
    assert_err(
        Policy::load(&p, &Limits::default()),
        ErrorKind::Limit,
        &["policy.json", "max_config_bytes"],
    );
}

/// A safetensors header naming a tensor twice was accepted (the last entry won), so two readers
/// could disagree on what the file holds.
#[test]
fn duplicate_header_keys_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("dup.safetensors");
    let header = r#"{"x":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"x":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}"#;
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(header.as_bytes());
    bytes.extend_from_slice(&1f32.to_le_bytes());
    std::fs::write(&path, bytes).unwrap();
    assert_err(
        SafetensorsFile::open(&path, &Limits::default()),
        ErrorKind::Format,
        &["dup.safetensors", "\"x\" more than once"],
    );
}

/// A text file given as the base reported an 8-quintillion-byte header over the limit.
#[test]
fn a_text_file_as_base_is_not_a_safetensors_file() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("notes.txt");
    std::fs::write(&p, "these are not the weights you are looking for\n").unwrap();
    assert_err(
        BaseModel::open(&p, &Limits::default()),
        ErrorKind::Format,
        &["notes.txt", "not a safetensors file"],
    );
}

/// An adapter directory given as the base was opened as a model (its one `*.safetensors`).
#[test]
fn an_adapter_directory_as_base_is_named_for_what_it_is() {
    let a = peft_dir(r#"{"r": 2, "lora_alpha": 4}"#, 2, 3, 4);
    assert_err(
        BaseModel::open(a.path(), &Limits::default()),
        ErrorKind::Io,
        &["looks like a PEFT adapter directory"],
    );
}

/// `--adapter /nonexistent`, a file, and a directory without weights all said
/// "adapter_model.safetensors is missing".
#[test]
fn adapter_paths_that_are_not_adapter_directories_say_what_they_are() {
    let dir = tempfile::tempdir().unwrap();
    assert_err(
        load_peft_dir(&dir.path().join("nonexistent"), &Limits::default()),
        ErrorKind::Io,
        &["nonexistent: no such directory"],
    );
    let file = dir.path().join("adapter_model.safetensors");
    std::fs::write(&file, b"x").unwrap();
    assert_err(
        load_peft_dir(&file, &Limits::default()),
        ErrorKind::Io,
        &["expected a PEFT directory", "got a file"],
    );
    let empty = tempfile::tempdir().unwrap();
    assert_err(
        load_peft_dir(empty.path(), &Limits::default()),
        ErrorKind::Io,
        &[
            "adapter_model.safetensors is missing",
            "a PEFT adapter directory holds",
        ],
    );
}

// ---- rank_pattern / alpha_pattern ----

/// Keys were compiled as regexes on every lookup: 2,000 keys like `\w{50}x<i>` (37 KB) cost more
/// than 300 s of CPU. Now they are compiled once, and a compiled size or a key count over the
/// limits is refused.
#[test]
fn heavy_pattern_maps_are_compiled_once_or_refused() {
    let keys = |n: usize, key: &dyn Fn(usize) -> String| {
        let m: serde_json::Map<_, _> = (0..n).map(|i| (key(i), serde_json::json!(3))).collect();
        serde_json::json!({"r": 2, "lora_alpha": 4, "rank_pattern": m}).to_string()
    };
    let heavy = keys(2000, &|i| format!(r"\w{{50}}x{i}"));
    let parsed = within(120, "parsing 2,000 heavy keys", move || {
        AdapterConfig::parse(&heavy).map(|c| (c.rank_for("a.q"), c.alpha_for("a.q")))
    });
    match parsed {
        Ok(v) => assert_eq!(v, (2, 4.0)),
        Err(e) => assert_eq!(e.kind(), ErrorKind::Limit, "{e}"),
    }
    // 50 such keys in an adapter's config took 5 s of CPU per module; they are now over the
    // compiled-size limit, refused at once.
    let fifty = keys(50, &|i| format!(r"\w{{50}}x{i}"));
    let a = peft_dir(&fifty, 2, 3, 4);
    let d = a.path().to_path_buf();
    assert_err(
        within(60, "loading with 50 heavy keys", move || {
            load_peft_dir(&d, &Limits::default()).map(|_| ())
        }),
        ErrorKind::Limit,
        &["rank_pattern is too complex"],
    );
    // Many plain per-layer keys, as tools write them, are fine.
    let layers = keys(4096, &|i| format!(r"model\.layers\.{i}\.self_attn\.q_proj"));
    let c = within(60, "4,096 per-layer keys", move || {
        AdapterConfig::parse(&layers).unwrap()
    });
    assert_eq!(c.rank_for("base.model.layers.17.self_attn.q_proj"), 3);
    assert_eq!(c.rank_for("base.model.layers.17.self_attn.k_proj"), 2);

    let many = keys(5000, &|i| format!("layers.{i}.q"));
    assert_err(
        AdapterConfig::parse(&many),
        ErrorKind::Limit,
        &["rank_pattern has 5000 keys", "4096"],
    );
    let huge = keys(1, &|_| r"\w{1000}\w{1000}\w{1000}".to_string());
    assert_err(
        AdapterConfig::parse(&huge),
        ErrorKind::Limit,
        &["rank_pattern is too complex"],
    );
}

/// PEFT's rule is kept: the first key in file order whose `(.*\.)?(KEY)$` matches the whole
/// module path; a repeated key keeps its first position and its last value (Python's
/// `json.load`, which is how PEFT reads the file).
#[test]
fn pattern_maps_keep_peft_semantics() {
    let c = AdapterConfig::parse(
        r#"{"r": 8, "lora_alpha": 16,
            "rank_pattern": {"q": 2, "layers\\.1\\.q": 4, "q": 6, "k|v": 3},
            "alpha_pattern": {"layers\\.\\d+\\.v": 1.5}}"#,
    )
    .unwrap();
    assert_eq!(c.rank_pattern.len(), 3);
    assert_eq!(c.rank_for("m.layers.1.q"), 6, "first position, last value");
    assert_eq!(c.rank_for("q"), 6);
    assert_eq!(c.rank_for("m.v"), 3);
    assert_eq!(c.rank_for("m.vv"), 8, "the key matches whole components");
    assert_eq!(c.alpha_for("m.layers.12.v"), 1.5);
    assert_eq!(c.alpha_for("m.layers.12.k"), 16.0);
    assert_eq!(c.scale_for("m.layers.12.v"), 1.5 / 3.0);
}

// ---- limits ----

/// `threads` was unbounded: 10,000 threads made a pool thread panic and the process hang.
#[test]
fn thread_counts_beyond_the_limit_are_refused() {
    let max = intruder_gate::limits::max_threads();
    assert!(max >= 16);
    for threads in [max + 1, 10_000, usize::MAX] {
        let cfg = Config {
            threads,
            cache_dir: None,
            ..Config::default()
        };
        assert_err(
            within(60, "Gate::new", move || Gate::new(cfg).map(|_| ())),
            ErrorKind::InvalidArgument,
            &["threads must be at most", &max.to_string()],
        );
    }
    let cfg = Config {
        threads: max,
        cache_dir: None,
        ..Config::default()
    };
    assert!(cfg.validate().is_ok());
}

// ---- finite inputs that overflow f32 ----

/// A base with 3.4e38 entries screened to exit 0 with singular values 0.0 and max|cos| NaN
/// (printed as null).
#[test]
fn base_values_that_overflow_f32_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (_, adapter) = planted_trio(dir.path(), [1, 1, 1], 3);
    let base = dir.path().join("huge.safetensors");
    let tensors: Vec<_> = PLANTED
        .iter()
        .map(|&(m, out, inn)| {
            let v: Vec<f32> = (0..out * inn)
                .map(|i| if i % 3 == 0 { 3.4e38 } else { -1.0 })
                .collect();
            t(&format!("{m}.weight"), out, inn, &v)
        })
        .collect();
    write(&base, &tensors, &BTreeMap::new()).unwrap();
    for method in [
        intruder_gate::report::Method::Brand,
        intruder_gate::report::Method::Dense,
    ] {
        let g = Gate::new(Config {
            cache_dir: None,
            backend: BackendChoice::Cpu,
            method,
            policy: Policy {
                on_invalid: intruder_gate::policy::OnInvalid::Fail,
                ..Policy::default()
            },
            ..Config::default()
        })
        .unwrap();
        g.attach_base(&base).unwrap();
        assert_err(
            g.screen_adapter_dir(&adapter),
            ErrorKind::Limit,
            &["max_norm", "overflow"],
        );
    }
}

/// A `lora_alpha` near f64's largest (1.8e308 itself is out of JSON's f64 range) was accepted:
/// ΔW overflowed f32 and the report held NaN.
#[test]
fn a_scale_that_overflows_f32_is_refused() {
    let a = peft_dir(r#"{"r": 2, "lora_alpha": 1.7e308}"#, 2, 3, 4);
    assert_err(
        load_peft_dir(a.path(), &Limits::default()),
        ErrorKind::Limit,
        &["module q", "max_norm"],
    );
    // Under the default policy it is a `reject` report carrying the error, with no NaN in it.
    let dir = tempfile::tempdir().unwrap();
    let (base, adapter) = planted_trio(dir.path(), [1, 1, 1], 4);
    let cfg = adapter.join("adapter_config.json");
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&cfg).unwrap()).unwrap();
    v["lora_alpha"] = serde_json::json!(1.7e308);
    std::fs::write(&cfg, v.to_string()).unwrap();
    let g = gate(None);
    g.attach_base(&base).unwrap();
    let r = g.screen_adapter_dir(&adapter).unwrap();
    assert_eq!(r.verdict, intruder_gate::Verdict::Reject);
    assert_eq!(r.error.as_ref().unwrap().kind, "limit");
    assert!(!r.to_json().contains("null"), "{}", r.to_json());
}

/// A NaN in a base tensor said "SVD did not converge".
#[test]
fn a_nan_in_a_base_tensor_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let (base, adapter) = planted_trio(dir.path(), [1, 1, 1], 5);
    let f = SafetensorsFile::open(&base, &Limits::default()).unwrap();
    let mut tensors: Vec<Tensor> = f
        .names()
        .map(|n| {
            let i = f.info(n).unwrap();
            (
                n.to_string(),
                DType::F32,
                i.shape.clone(),
                f.bytes(n).unwrap().to_vec(),
            )
        })
        .collect();
    drop(f);
    let (name, _, shape, bytes) = &mut tensors[0];
    let at = shape[1] + 2; // (row 1, col 2)
    bytes[4 * at..4 * at + 4].copy_from_slice(&f32::NAN.to_le_bytes());
    let name = name.clone();
    let nan_base = dir.path().join("nan.safetensors");
    write(&nan_base, &tensors, &BTreeMap::new()).unwrap();
    for method in [
        intruder_gate::report::Method::Brand,
        intruder_gate::report::Method::Dense,
    ] {
        let g = Gate::new(Config {
            cache_dir: None,
            backend: BackendChoice::Cpu,
            method,
            policy: Policy {
                on_invalid: intruder_gate::policy::OnInvalid::Fail,
                ..Policy::default()
            },
            ..Config::default()
        })
        .unwrap();
        g.attach_base(&nan_base).unwrap();
        assert_err(
            g.screen_adapter_dir(&adapter),
            ErrorKind::NonFinite,
            &[&format!("base tensor `{name}`"), "NaN", "(row 1, col 2)"],
        );
    }
}

// ---- the order of the checks ----

/// An adapter declaring tensors far larger than its base (a sparse file) was read and converted
/// to f32 before its shapes were compared with the base. The header alone now decides: here the
/// first value is a NaN, which loading would report, and the shape error comes first.
#[test]
fn an_adapter_larger_than_its_base_is_refused_from_its_header() {
    let dir = tempfile::tempdir().unwrap();
    let (base, _) = planted_trio(dir.path(), [1, 1, 1], 6);
    let big = tempfile::tempdir().unwrap();
    std::fs::write(
        big.path().join("adapter_config.json"),
        r#"{"peft_type": "LORA", "r": 16, "lora_alpha": 16}"#,
    )
    .unwrap();
    let (r, n) = (16usize, 1usize << 20);
    let key = |s: &str| format!("base_model.model.{}.lora_{s}.weight", PLANTED[0].0);
    let header = serde_json::json!({
        key("A"): {"dtype": "F32", "shape": [r, n], "data_offsets": [0, 4 * r * n]},
        key("B"): {"dtype": "F32", "shape": [n, r], "data_offsets": [4 * r * n, 8 * r * n]},
    })
    .to_string();
    let path = big.path().join("adapter_model.safetensors");
    let mut head = (header.len() as u64).to_le_bytes().to_vec();
    head.extend_from_slice(header.as_bytes());
    head.extend_from_slice(&f32::NAN.to_le_bytes());
    std::fs::write(&path, &head).unwrap();
    // 128 MiB declared, a few hundred bytes on disk.
    let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    f.set_len((head.len() - 4 + 8 * r * n) as u64).unwrap();
    drop(f);

    let g = Gate::new(Config {
        cache_dir: None,
        backend: BackendChoice::Cpu,
        policy: Policy {
            on_invalid: intruder_gate::policy::OnInvalid::Fail,
            ..Policy::default()
        },
        ..Config::default()
    })
    .unwrap();
    g.attach_base(&base).unwrap();
    assert_err(
        g.screen_adapter_dir(big.path()),
        ErrorKind::Shape,
        &["B·A is [1048576, 1048576]", "is [96, 96]"],
    );
    assert_err(
        g.load_checked(big.path()),
        ErrorKind::Shape,
        &["B·A is [1048576, 1048576]"],
    );
}

/// Screening before any base was attached said "4 modules match no base tensor".
#[test]
fn screening_before_a_base_is_attached_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let (_, adapter) = planted_trio(dir.path(), [1, 1, 1], 7);
    let g = gate(None);
    assert_err(
        g.screen_adapter_dir(&adapter),
        ErrorKind::InvalidArgument,
        &["no base attached"],
    );
    let loaded = load_peft_dir(&adapter, &Limits::default()).unwrap();
    assert_err(
        g.screen(&loaded),
        ErrorKind::InvalidArgument,
        &["no base attached"],
    );
}

/// `Limits` is what a host serialises; the new field keeps the default when absent.
#[test]
fn limits_without_max_norm_deserialise_to_the_default() {
    let l: Limits = serde_json::from_str(r#"{"max_rank": 64}"#).unwrap();
    assert_eq!(l.max_rank, 64);
    assert_eq!(l.max_norm, Limits::default().max_norm);
}
