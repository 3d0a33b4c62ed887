//! The C and C++ examples, compiled with the system compiler against the freshly built
//! `libintruder_gate.so` and run on the MiniLM fixtures; their numbers must be the CLI's.

mod common;

use common::{adapter_dir, assert_same_numbers, cli, cli_report, minilm_base, tool_or_skip};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

/// `target/<profile>`: the test binary lives in its `deps/`, the library and `.pc` next to it.
/// A plain `cargo test` in a fresh clone builds the cdylib only into `deps/` (uplifting it is
/// `cargo build`'s job), so it is copied up once — also over an older one a previous
/// `cargo build` left — the way `cargo build` would place it.
fn profile_dir() -> PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let exe = std::env::current_exe().unwrap();
        let dir = exe.parent().unwrap().parent().unwrap().to_path_buf();
        let lib = dir.join("libintruder_gate.so");
        let built = dir.join("deps/libintruder_gate.so");
        let mtime = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
        if built.is_file() && (!lib.is_file() || mtime(&built) > mtime(&lib)) {
            let tmp = dir.join(format!("libintruder_gate.so.{}.tmp", std::process::id()));
            std::fs::copy(&built, &tmp).unwrap();
            std::fs::rename(&tmp, &lib).unwrap();
        }
        assert!(lib.is_file(), "no libintruder_gate.so in {}", dir.display());
        dir
    })
    .clone()
}

/// Temporary outputs of this test binary: compiled examples and their private cache.
fn work_dir() -> &'static Path {
    static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();
    DIR.get_or_init(|| tempfile::tempdir().unwrap()).path()
}

/// Compiles one example with `compiler` (flags `-I include -L … -l intruder_gate`, rpath set).
fn build(compiler: &str, source: &str, extra: &[&str]) -> PathBuf {
    let lib = profile_dir();
    let exe = work_dir().join(Path::new(source).file_stem().unwrap());
    let out = Command::new(compiler)
        .args(extra)
        .args(["-Wall", "-Wextra", "-Werror", "-g", "-o"])
        .arg(&exe)
        .arg(Path::new(ROOT).join("cpp_examples").join(source))
        .arg(format!("-I{ROOT}/include"))
        .arg(format!("-L{}", lib.display()))
        .arg(format!("-Wl,-rpath,{}", lib.display()))
        .arg("-lintruder_gate")
        .output()
        .unwrap_or_else(|e| panic!("{compiler}: {e}"));
    assert!(
        out.status.success(),
        "{compiler} {source}:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    exe
}

fn screen_adapter() -> &'static Path {
    static EXE: OnceLock<PathBuf> = OnceLock::new();
    EXE.get_or_init(|| build("cc", "screen_adapter.c", &["-std=c11", "-pedantic"]))
}

fn adapter_registry() -> &'static Path {
    static EXE: OnceLock<PathBuf> = OnceLock::new();
    EXE.get_or_init(|| build("c++", "adapter_registry.cpp", &["-std=c++17"]))
}

/// Runs an example with its own spectrum cache (XDG_CACHE_HOME) and optional stdin.
fn run(cmd: &mut Command, stdin: &str) -> Output {
    let mut child = cmd
        .env("XDG_CACHE_HOME", work_dir().join("cache"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    child.wait_with_output().unwrap()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[test]
fn screen_adapter_c_prints_the_clis_report() {
    for name in common::ADAPTERS {
        let out = run(
            Command::new(screen_adapter())
                .arg(minilm_base())
                .arg(adapter_dir(name)),
            "",
        );
        let stdout = text(&out.stdout);
        assert!(out.status.success(), "{}", text(&out.stderr));
        let want = cli_report(name);
        let json_start = stdout.find('{').expect("JSON in the output");
        let got: serde_json::Value = serde_json::from_str(&stdout[json_start..]).unwrap();
        assert_same_numbers(&got, &want);
        assert!(
            stdout.starts_with(&format!(
                "verdict: {}\nintruders: {} in {} modules\n",
                want["verdict"].as_str().unwrap(),
                want["total_intruders"],
                want["modules"].as_array().unwrap().len()
            )),
            "{stdout}"
        );
    }
}

#[test]
fn screen_adapter_c_fails_with_the_message() {
    let out = run(
        Command::new(screen_adapter())
            .arg("/nonexistent/base.safetensors")
            .arg(adapter_dir("lora_r2")),
        "",
    );
    assert_eq!(out.status.code(), Some(1));
    let stderr = text(&out.stderr);
    assert!(
        stderr.starts_with("error: attaching the base: i/o error: /nonexistent/base.safetensors"),
        "{stderr}"
    );
    let out = run(
        Command::new(screen_adapter())
            .arg(minilm_base())
            .arg("/nonexistent/adapter"),
        "",
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("screening the adapter: i/o error"),
        "{}",
        text(&out.stderr)
    );
}

/// Loads two adapters, refuses a broken one and a duplicate name, lists, unloads; with and
/// without `--merge`.
#[test]
fn adapter_registry_cpp_screens_before_activating() {
    let (r2, rs) = (cli_report("lora_r2"), cli_report("rslora_r16"));
    let line = |name: &str, want: &serde_json::Value, how: &str| {
        format!(
            "loaded {name}: verdict {}, {} modules, {} intruder dimensions, {how}",
            want["verdict"].as_str().unwrap(),
            want["modules"].as_array().unwrap().len(),
            want["total_intruders"]
        )
    };
    let script = format!(
        "load a {}\nload b {}\nload a {}\nload broken /nonexistent/adapter\nlist\nunload a\nunload a\nlist\nfrobnicate\n",
        adapter_dir("lora_r2").display(),
        adapter_dir("rslora_r16").display(),
        adapter_dir("lora_r2").display(),
    );
    for (flag, how) in [(None, "unmerged"), (Some("--merge"), "merged")] {
        let mut cmd = Command::new(adapter_registry());
        cmd.args(flag).arg(minilm_base());
        let out = run(&mut cmd, &script);
        let stdout = text(&out.stdout);
        assert!(out.status.success(), "{stdout}\n{}", text(&out.stderr));
        let lines: Vec<&str> = stdout.lines().collect();
        assert_eq!(lines[0], line("a", &r2, how), "{stdout}");
        assert_eq!(lines[1], line("b", &rs, how), "{stdout}");
        assert_eq!(
            lines[2], "error: an adapter named a is already loaded",
            "{stdout}"
        );
        assert!(
            lines[3].starts_with("error: reading the adapter: i/o error: /nonexistent/adapter"),
            "{stdout}"
        );
        assert_eq!(lines[4], "2 active", "{stdout}");
        assert!(
            lines[5].starts_with(&format!(
                "  a {} {} intruders 36 modules",
                r2["verdict"].as_str().unwrap(),
                r2["total_intruders"]
            )),
            "{stdout}"
        );
        assert_eq!(lines[7], "unloaded a", "{stdout}");
        assert_eq!(lines[8], "error: no adapter named a", "{stdout}");
        assert_eq!(lines[9], "1 active", "{stdout}");
        assert_eq!(lines[11], "error: unknown command: frobnicate", "{stdout}");
    }
}

/// Under a policy that clamps on any intruder, the registry activates the clamped factors: its
/// report of each clamp (directions added to the served ranks) is the Rust `Gate::clamp`'s, with
/// and without `--merge`; an adapter without intruders is served as it is.
#[test]
fn adapter_registry_cpp_activates_clamped_factors_under_a_policy() {
    let tmp = tempfile::tempdir().unwrap();
    let policy = tmp.path().join("policy.json");
    std::fs::write(&policy, CLAMP_ON_ANY_INTRUDER).unwrap();
    let quiet = edited_r2(
        tmp.path(),
        "quiet",
        |c| c["lora_alpha"] = 0.001.into(),
        str::to_owned,
    );
    let gate = intruder_gate::Gate::new(intruder_gate::Config {
        cache_dir: None,
        policy: intruder_gate::Policy::parse(CLAMP_ON_ANY_INTRUDER).unwrap(),
        ..intruder_gate::Config::default()
    })
    .unwrap();
    gate.attach_base(&minilm_base()).unwrap();
    let want = |fixture: &str| {
        let adapter = intruder_gate::adapter::load_peft_dir(
            &adapter_dir(fixture),
            &intruder_gate::limits::Limits::default(),
        )
        .unwrap();
        let report = gate.screen(&adapter).unwrap();
        assert_eq!(report.verdict, intruder_gate::Verdict::Clamp);
        let opts = intruder_gate::ClampOptions {
            lambda: 0.3,
            ..Default::default()
        };
        let c = intruder_gate::clamp::clamp(&gate, &adapter, &report, &opts).unwrap();
        let modules = c.modules.iter().filter(|m| !m.clamped.is_empty()).count();
        format!(
            "verdict clamp, {} modules, {} intruder dimensions, clamped {} directions in {modules} modules (lambda 0.3)",
            c.modules.len(),
            report.total_intruders,
            c.clamped_directions()
        )
    };
    let script = format!(
        "load r2 {}\nload qv {}\nload quiet {}\nlist\nunload qv\n",
        adapter_dir("lora_r2").display(),
        adapter_dir("lora_r16_qv").display(),
        quiet.display()
    );
    for (flag, how) in [(None, "unmerged"), (Some("--merge"), "merged")] {
        let mut cmd = Command::new(adapter_registry());
        cmd.args(flag)
            .arg("--policy")
            .arg(&policy)
            .args(["--lambda", "0.3"])
            .arg(minilm_base());
        let out = run(&mut cmd, &script);
        let stdout = text(&out.stdout);
        assert!(out.status.success(), "{stdout}\n{}", text(&out.stderr));
        let lines: Vec<&str> = stdout.lines().collect();
        assert_eq!(lines[0], format!("loaded r2: {}, {how}", want("lora_r2")));
        assert_eq!(
            lines[1],
            format!("loaded qv: {}, {how}", want("lora_r16_qv"))
        );
        assert_eq!(
            lines[2],
            format!("loaded quiet: verdict accept, 36 modules, 0 intruder dimensions, {how}")
        );
        assert_eq!(lines[3], "3 active", "{stdout}");
        assert_eq!(lines[7], "unloaded qv", "{stdout}");
    }
    // A policy file that is not a policy stops the registry before it reads a command.
    std::fs::write(&policy, r#"{"rules": [{"metric": "nope"}]}"#).unwrap();
    let out = run(
        Command::new(adapter_registry())
            .arg("--policy")
            .arg(&policy)
            .arg(minilm_base()),
        "",
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr)
            .starts_with("error: setting the policy: invalid argument: policy is not valid JSON"),
        "{}",
        text(&out.stderr)
    );
}

/// A refused adapter's line names why: the policy rule that rejected it, or the error of an
/// adapter the gate could not screen — each as the CLI reports it under the same policy.
#[test]
fn adapter_registry_cpp_refusals_give_the_reason() {
    let tmp = tempfile::tempdir().unwrap();
    let policy = tmp.path().join("policy.json");
    std::fs::write(
        &policy,
        r#"{"rules": [{"metric": "total_intruders", "threshold": 1, "action": "reject"}], "on_invalid": "reject"}"#,
    )
    .unwrap();
    let mismatched = edited_r2(
        tmp.path(),
        "mismatched",
        |_| {},
        |h| h.replace(".query.", ".qvery."),
    );
    let cli_json = |dir: &Path| -> serde_json::Value {
        let out = cli()
            .args(["scan", "--no-cache", "--format", "json", "--policy"])
            .arg(&policy)
            .arg("--base")
            .arg(minilm_base())
            .arg("--adapter")
            .arg(dir)
            .output()
            .unwrap();
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {out:?}"))
    };
    let (r2, bad) = (cli_json(&adapter_dir("lora_r2")), cli_json(&mismatched));
    let rule = r2["fired_rules"][0]["reason"].as_str().unwrap().to_owned();
    let error = format!(
        "{} error: {}",
        bad["error"]["kind"].as_str().unwrap(),
        bad["error"]["message"].as_str().unwrap()
    );
    let script = format!(
        "load r2 {}\nload bad {}\n",
        adapter_dir("lora_r2").display(),
        mismatched.display()
    );
    let mut cmd = Command::new(adapter_registry());
    cmd.arg("--policy").arg(&policy).arg(minilm_base());
    let out = run(&mut cmd, &script);
    let stdout = text(&out.stdout);
    let lines: Vec<&str> = stdout.lines().collect();
    assert!(
        lines[0].starts_with("refused r2: verdict reject ("),
        "{stdout}"
    );
    assert!(lines[0].ends_with(&format!("): {rule}")), "{stdout}");
    assert!(
        lines[1].starts_with("refused bad: verdict reject ("),
        "{stdout}"
    );
    assert!(lines[1].ends_with(&format!("): {error}")), "{stdout}");
}

const CLAMP_ON_ANY_INTRUDER: &str =
    r#"{"rules": [{"metric": "total_intruders", "threshold": 1, "action": "clamp"}]}"#;

/// A copy of `lora_r2` in `dir/name` with its config and safetensors header edited; the header
/// must keep its length, so the data offsets stay valid byte for byte.
fn edited_r2(
    dir: &Path,
    name: &str,
    config: impl FnOnce(&mut serde_json::Value),
    header: impl FnOnce(&str) -> String,
) -> PathBuf {
    let (src, out) = (adapter_dir("lora_r2"), dir.join(name));
    std::fs::create_dir_all(&out).unwrap();
    let file = |d: &Path| d.join("adapter_config.json");
    let mut cfg: serde_json::Value =
        serde_json::from_slice(&std::fs::read(file(&src)).unwrap()).unwrap();
    config(&mut cfg);
    std::fs::write(file(&out), cfg.to_string()).unwrap();
    let file = |d: &Path| d.join("adapter_model.safetensors");
    let mut bytes = std::fs::read(file(&src)).unwrap();
    let end = 8 + u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let edited = header(std::str::from_utf8(&bytes[8..end]).unwrap());
    bytes[8..end].copy_from_slice(edited.as_bytes());
    std::fs::write(file(&out), bytes).unwrap();
    out
}

/// `text` through `promtool check metrics`: its exit status and output, or None when absent.
fn promtool_check(metrics: &str) -> Option<(bool, String)> {
    let mut child = match Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
    {
        Ok(c) => c,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
        Err(e) => panic!("promtool: {e}"),
    };
    child
        .stdin
        .take()
        .unwrap()
        .write_all(metrics.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    Some((out.status.success(), text(&out.stdout) + &text(&out.stderr)))
}

/// The registry serves /metrics while it loads adapters from stdin: the counters match the
/// loads, promtool accepts the text, and the event callback logs each screening.
#[test]
fn adapter_registry_cpp_serves_metrics_while_loading() {
    if !tool_or_skip("curl", "the metrics scrape") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    // lora_alpha 0.001 shrinks ΔW until no direction intrudes: accepted.
    let quiet = edited_r2(
        tmp.path(),
        "quiet",
        |c| c["lora_alpha"] = 0.001.into(),
        str::to_owned,
    );
    // Modules adapting a `qvery` projection MiniLM lacks: valid PEFT, so the registry reads
    // it, but the gate's default policy rejects it.
    let mismatched = edited_r2(
        tmp.path(),
        "mismatched",
        |_| {},
        |h| h.replace(".query.", ".qvery."),
    );
    let mut child = Command::new(adapter_registry())
        .args(["--metrics-port", "0"])
        .arg(minilm_base())
        .env("XDG_CACHE_HOME", work_dir().join("cache"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let mut stdout = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut stderr = BufReader::new(child.stderr.take().unwrap()).lines();
    let first = stderr.next().unwrap().unwrap();
    let url = first
        .strip_prefix("serving metrics on ")
        .unwrap_or_else(|| panic!("{first}"))
        .to_owned();

    let loads = [
        ("quiet", quiet),
        ("r2", adapter_dir("lora_r2")),
        ("qv", adapter_dir("lora_r16_qv")),
        ("bad", mismatched),
    ];
    let mut answers = Vec::new();
    for (name, dir) in &loads {
        writeln!(stdin, "load {name} {}", dir.display()).unwrap();
        answers.push(stdout.next().unwrap().unwrap());
    }
    // The C default config fails the call for an invalid adapter (status + message), which the
    // registry reports as an error and the gate counts under verdict="error".
    let verdict_of = |answer: &str| {
        if answer.starts_with("error") {
            return "error".to_owned();
        }
        answer
            .split("verdict ")
            .nth(1)
            .and_then(|v| v.split([',', ' ']).next())
            .unwrap_or_else(|| panic!("{answer}"))
            .to_owned()
    };
    let verdicts: Vec<String> = answers.iter().map(|a| verdict_of(a)).collect();
    assert_eq!(
        verdicts,
        ["accept", "warn", "clamp", "error"],
        "{answers:?}"
    );

    let out = Command::new("curl")
        .args(["-sS", "--max-time", "20", "-i"])
        .arg(&url)
        .output()
        .unwrap();
    assert!(out.status.success(), "curl: {}", text(&out.stderr));
    let response = text(&out.stdout);
    let (head, body) = response.split_once("\r\n\r\n").unwrap();
    assert!(head.starts_with("HTTP/1.1 200 OK"), "{head}");
    assert!(
        head.contains("Content-Type: text/plain; version=0.0.4; charset=utf-8"),
        "{head}"
    );
    for verdict in ["accept", "warn", "clamp", "reject", "error"] {
        let want = verdicts.iter().filter(|v| *v == verdict).count();
        let series = format!("intruder_gate_screenings_total{{verdict=\"{verdict}\"}} {want}\n");
        assert!(body.contains(&series), "{series} missing:\n{body}");
    }
    assert!(
        body.contains("intruder_gate_adapter_intruders{adapter=\"qv\"} "),
        "{body}"
    );
    match promtool_check(body) {
        None => assert!(!tool_or_skip("promtool", "promtool's check of the scrape")),
        Some((passed, output)) => {
            println!("promtool check metrics: passed={passed} output={output:?}");
            assert!(passed && output.trim().is_empty(), "{output}\n{body}");
        }
    }
    let out = Command::new("curl")
        .args([
            "-sS",
            "--max-time",
            "20",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
        ])
        .arg(url.replace("/metrics", "/other"))
        .output()
        .unwrap();
    assert_eq!(text(&out.stdout), "404");

    drop(stdin);
    assert!(child.wait().unwrap().success());
    let events: Vec<String> = stderr.map(Result::unwrap).collect();
    assert_eq!(events.len(), loads.len(), "{events:?}");
    for (i, ((name, _), verdict)) in loads.iter().zip(&verdicts).enumerate() {
        let want = format!("event {}: {name} {verdict}, ", i + 1);
        assert!(events[i].starts_with(&want), "{want:?} vs {events:?}");
    }
}

#[test]
fn pkg_config_file_points_at_the_built_library() {
    if !tool_or_skip("pkg-config", "the pkg-config file check") {
        return;
    }
    let out = Command::new("pkg-config")
        .args(["--cflags", "--libs", "intruder_gate"])
        .env("PKG_CONFIG_PATH", profile_dir())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    let flags = text(&out.stdout);
    assert!(
        flags.contains(&format!("-L{}", profile_dir().display())),
        "{flags}"
    );
    assert!(
        flags.contains("-lintruder_gate") && flags.contains(&format!("-I{ROOT}/include")),
        "{flags}"
    );
}

#[test]
fn cmake_builds_the_examples_through_pkg_config() {
    if !tool_or_skip("cmake", "the CMake build") {
        return;
    }
    let build = work_dir().join("cmake-build");
    let cmake = |args: &[&str]| {
        let out = Command::new("cmake")
            .args(args)
            .env("PKG_CONFIG_PATH", profile_dir())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "cmake {args:?}:\n{}{}",
            text(&out.stdout),
            text(&out.stderr)
        );
    };
    cmake(&[
        "-S",
        &format!("{ROOT}/cpp_examples"),
        "-B",
        build.to_str().unwrap(),
    ]);
    cmake(&["--build", build.to_str().unwrap()]);
    let out = run(
        Command::new(build.join("screen_adapter"))
            .arg(minilm_base())
            .arg(adapter_dir("lora_r16_qv")),
        "",
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("\"schema_version\""));
}

/// Runs `exe args` once to warm the disk cache (so under valgrind only the per-adapter maths
/// runs), then under valgrind, which must find no leak and no error. The suppressions cover two
/// "possibly lost" reports that are not leaks (see the file).
fn assert_valgrind_clean(exe: &Path, args: &[&std::ffi::OsStr], stdin: &str) -> Option<Output> {
    if !tool_or_skip("valgrind", "the valgrind run") {
        return None;
    }
    assert!(run(Command::new(exe).args(args), stdin).status.success());
    let mut cmd = Command::new("valgrind");
    cmd.args(["--leak-check=full", "--error-exitcode=1", "--quiet"])
        .arg(format!("--suppressions={ROOT}/cpp_examples/valgrind.supp"))
        .arg(exe)
        .args(args);
    let out = run(&mut cmd, stdin);
    assert!(out.status.success(), "valgrind:\n{}", text(&out.stderr));
    Some(out)
}

/// CI runs this with valgrind installed: the C example must be leak- and error-free.
#[test]
fn screen_adapter_c_is_valgrind_clean() {
    let (base, adapter) = (minilm_base(), adapter_dir("lora_r16_qv"));
    assert_valgrind_clean(
        screen_adapter(),
        &[base.as_os_str(), adapter.as_os_str()],
        "",
    );
}

/// The registry's clamp path (screen, clamp, activate, merge, unload) under valgrind.
#[test]
fn adapter_registry_cpp_clamp_is_valgrind_clean() {
    let base = minilm_base();
    let script = format!(
        "load qv {}\nunload qv\n",
        adapter_dir("lora_r16_qv").display()
    );
    let args = [std::ffi::OsStr::new("--merge"), base.as_os_str()];
    if let Some(out) = assert_valgrind_clean(adapter_registry(), &args, &script) {
        assert!(
            text(&out.stdout).starts_with("loaded qv: verdict clamp, 12 modules, 12 intruder dimensions, clamped 12 directions in 9 modules (lambda 0.75), merged\nunloaded qv\n"),
            "{}",
            text(&out.stdout)
        );
    }
}
