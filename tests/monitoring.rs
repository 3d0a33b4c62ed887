//! Metrics and screening events seen from outside: the per-adapter gauge stays bounded, the
//! event hook sees every screening, and `scan --metrics-file` writes the exposition text.

mod common;

use intruder_gate::adapter::load_peft_dir;
use intruder_gate::metrics::{MetricsConfig, ScreenOutcome};
use intruder_gate::{Config, Gate, Verdict};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// Samples of one metric family (not its HELP/TYPE lines).
fn series<'a>(text: &'a str, name: &str) -> Vec<&'a str> {
    let prefix = format!("{name}{{");
    text.lines().filter(|l| l.starts_with(&prefix)).collect()
}

fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

/// Adapter names come from outside: 1,000 distinct ones must still give N series.
#[test]
fn adapter_gauge_keeps_n_series_over_1000_adapter_names() {
    let dir = tempfile::tempdir().unwrap();
    let (base, adapter_dir) = common::planted_trio(dir.path(), [2, 0, 1], 7);
    let n = 16;
    let gate = Gate::new(Config {
        cache_dir: None,
        metrics: MetricsConfig { recent_adapters: n },
        ..Config::default()
    })
    .unwrap();
    gate.attach_base(&base).unwrap();
    let events = Arc::new(AtomicU64::new(0));
    let seen = Arc::clone(&events);
    gate.set_event_hook(Some(Box::new(move |e| {
        // Any intruder in a third of the modules is a clamp under the default policy.
        assert_eq!(e.outcome, ScreenOutcome::Verdict(Verdict::Clamp), "{e:?}");
        seen.fetch_add(1, Ordering::Relaxed);
    })));
    let mut adapter = load_peft_dir(&adapter_dir, &gate.config().limits).unwrap();
    let mut last = None;
    for i in 0..1000 {
        adapter.name = format!("tenant-{i}/adapter");
        last = Some(gate.screen(&adapter).unwrap());
    }
    let intruders = last.unwrap().total_intruders as f64;
    assert!(intruders > 0.0);
    let text = gate.metrics().render();
    let gauge = series(&text, "intruder_gate_adapter_intruders");
    assert_eq!(gauge.len(), n, "{text}");
    assert_eq!(
        sample(
            &text,
            r#"intruder_gate_adapter_intruders{adapter="tenant-999/adapter"}"#
        ),
        Some(intruders)
    );
    assert_eq!(
        sample(&text, r#"intruder_gate_screenings_total{verdict="clamp"}"#),
        Some(1000.0)
    );
    assert_eq!(events.load(Ordering::Relaxed), 1000);
}

/// The file is written after the run, also when the scan fails (exit 2), with no temp file
/// left beside it.
#[test]
fn scan_metrics_file_is_written_on_success_and_on_failure() {
    let dir = tempfile::tempdir().unwrap();
    let (base, adapter) = common::planted_trio(dir.path(), [1, 0, 0], 3);
    let metrics = dir.path().join("out/intruder_gate.prom");
    std::fs::create_dir(metrics.parent().unwrap()).unwrap();
    let scan = |adapter: &std::path::Path| {
        common::cli()
            .args(["scan", "--no-cache", "--base"])
            .arg(&base)
            .arg("--adapter")
            .arg(adapter)
            .arg("--metrics-file")
            .arg(&metrics)
            .output()
            .unwrap()
    };
    let out = scan(&adapter);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = std::fs::read_to_string(&metrics).unwrap();
    assert_eq!(
        sample(&text, r#"intruder_gate_screenings_total{verdict="clamp"}"#),
        Some(1.0),
        "{text}"
    );

    let out = scan(&dir.path().join("missing"));
    assert_eq!(out.status.code(), Some(2));
    let text = std::fs::read_to_string(&metrics).unwrap();
    assert_eq!(
        sample(&text, r#"intruder_gate_screenings_total{verdict="error"}"#),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        sample(&text, r#"intruder_gate_errors_total{kind="io"}"#),
        Some(1.0),
        "{text}"
    );
    let names: Vec<_> = std::fs::read_dir(metrics.parent().unwrap())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, ["intruder_gate.prom"]);
}
