//! Per-gate metrics, rendered in the Prometheus text exposition format 0.0.4.
//!
//! Hot-path updates are lock-free atomics, except the per-adapter gauge (one
//! short mutex section per screening) and `record_error` (rare by nature).
//! There is no global registry: each gate owns one `Metrics`, so several gates
//! in one process never share or clobber counters.

use crate::policy::Verdict;
use crate::spectrum::cache::Source;
use std::collections::{BTreeMap, HashMap};
use std::fmt::{self, Write as _};
use std::sync::atomic::{AtomicU64, Ordering};

use parking_lot::{Mutex, RwLock};

/// `Content-Type` to serve `Metrics::render` output with.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Most distinct `errors_total` kinds kept, the `other` series included.
const MAX_ERROR_KINDS: usize = 32;
/// Error kinds past the cap are counted under this one.
const OVERFLOW_ERROR_KIND: &str = "other";

/// A single screening spans one small adapter (~1 ms) to a huge one (~1 min).
const SCREEN_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];
/// A base-model spectrum spans one small matrix (~10 ms) to a 70B model (~10 min).
const COMPUTE_BUCKETS: &[f64] = &[
    0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0,
];

/// How one screening ended: a verdict, or an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ScreenOutcome {
    Verdict(Verdict),
    Error,
}

impl ScreenOutcome {
    /// Every outcome, in rendering order.
    pub const ALL: [ScreenOutcome; 5] = [
        ScreenOutcome::Verdict(Verdict::Accept),
        ScreenOutcome::Verdict(Verdict::Warn),
        ScreenOutcome::Verdict(Verdict::Clamp),
        ScreenOutcome::Verdict(Verdict::Reject),
        ScreenOutcome::Error,
    ];

    /// The `verdict` label: the verdict's own label, or "error".
    pub fn label(self) -> &'static str {
        match self {
            ScreenOutcome::Verdict(v) => v.label(),
            ScreenOutcome::Error => "error",
        }
    }

    fn index(self) -> usize {
        match self {
            ScreenOutcome::Verdict(v) => v as usize,
            ScreenOutcome::Error => 4,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MetricsConfig {
    /// How many distinct adapters `adapter_intruders` keeps a series for.
    /// Adapter names are caller-controlled, so the label set must be bounded.
    pub recent_adapters: usize,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        MetricsConfig {
            recent_adapters: 64,
        }
    }
}

/// Build/runtime identity, exported as the `intruder_gate_info` gauge.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Info {
    pub version: String,
    pub backend: String,
    pub device: String,
}

/// Metrics of one gate. `Send + Sync`; share it by reference or `Arc`.
pub struct Metrics {
    screenings: [AtomicU64; 5],
    intruder_dimensions: AtomicU64,
    modules_screened: AtomicU64,
    screen_duration: Histogram,
    cache_requests: [AtomicU64; 4],
    spectrum_compute: Histogram,
    errors: Mutex<BTreeMap<String, u64>>,
    adapters: Mutex<RecentAdapters>,
    info: RwLock<Info>,
}

impl fmt::Debug for Metrics {
    // Counters are only meaningful as a whole; `render` is the way to read them.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Metrics {
    pub fn new(cfg: MetricsConfig, info: Info) -> Self {
        Metrics {
            screenings: Default::default(),
            intruder_dimensions: AtomicU64::new(0),
            modules_screened: AtomicU64::new(0),
            screen_duration: Histogram::new(SCREEN_BUCKETS),
            cache_requests: Default::default(),
            spectrum_compute: Histogram::new(COMPUTE_BUCKETS),
            errors: Mutex::new(BTreeMap::new()),
            adapters: Mutex::new(RecentAdapters::new(cfg.recent_adapters)),
            info: RwLock::new(info),
        }
    }

    pub fn set_info(&self, info: Info) {
        *self.info.write() = info;
    }

    /// Records one finished screening of `adapter` taking `seconds`.
    /// Failures should also call `record_error` to say what kind they were.
    pub fn record_screening(
        &self,
        adapter: &str,
        outcome: ScreenOutcome,
        intruders: u64,
        modules: u64,
        seconds: f64,
    ) {
        // Relaxed suffices: each counter is independent and only needs exact totals.
        self.screenings[outcome.index()].fetch_add(1, Ordering::Relaxed);
        self.intruder_dimensions
            .fetch_add(intruders, Ordering::Relaxed);
        self.modules_screened.fetch_add(modules, Ordering::Relaxed);
        self.screen_duration.observe(seconds);
        self.adapters.lock().update(adapter, intruders);
    }

    /// Counts one error of `kind` (a short fixed label such as "format", "shape", "io").
    pub fn record_error(&self, kind: &str) {
        let mut errors = self.errors.lock();
        if let Some(n) = errors.get_mut(kind) {
            *n += 1;
            return;
        }
        // Keep a slot free for `other` so the cap holds once it is needed.
        let reserved = usize::from(!errors.contains_key(OVERFLOW_ERROR_KIND));
        let key = if errors.len() + reserved < MAX_ERROR_KINDS {
            kind
        } else {
            OVERFLOW_ERROR_KIND
        };
        *errors.entry(key.to_owned()).or_insert(0) += 1;
    }

    pub fn record_cache(&self, result: Source) {
        self.cache_requests[result as usize].fetch_add(1, Ordering::Relaxed);
    }

    pub fn record_spectrum_compute(&self, seconds: f64) {
        self.spectrum_compute.observe(seconds);
    }

    /// Renders every family in the Prometheus text exposition format 0.0.4.
    pub fn render(&self) -> String {
        let mut out = String::with_capacity(4096);
        self.write_text(&mut out)
            .expect("formatting into a String cannot fail");
        out
    }

    fn write_text(&self, out: &mut String) -> fmt::Result {
        let screenings = ScreenOutcome::ALL.map(|o| {
            let n = self.screenings[o.index()].load(Ordering::Relaxed);
            (o.label(), n)
        });
        family(
            out,
            ("intruder_gate_screenings_total", "counter"),
            "Adapter screenings by verdict.",
            "verdict",
            screenings,
        )?;
        single(
            out,
            "intruder_gate_intruder_dimensions_total",
            "Intruder dimensions found across all screenings.",
            self.intruder_dimensions.load(Ordering::Relaxed),
        )?;
        single(
            out,
            "intruder_gate_modules_screened_total",
            "LoRA modules screened across all screenings.",
            self.modules_screened.load(Ordering::Relaxed),
        )?;
        self.screen_duration.write(
            out,
            "intruder_gate_screen_duration_seconds",
            "Wall time of one adapter screening.",
        )?;
        let lookups = Source::ALL.map(|s| {
            (
                s.label(),
                self.cache_requests[s as usize].load(Ordering::Relaxed),
            )
        });
        family(
            out,
            (
                "intruder_gate_base_spectrum_cache_requests_total",
                "counter",
            ),
            "Base-model spectrum cache lookups by how they were served.",
            "result",
            lookups,
        )?;
        self.spectrum_compute.write(
            out,
            "intruder_gate_base_spectrum_compute_seconds",
            "Wall time of computing one base-model spectrum.",
        )?;
        family(
            out,
            ("intruder_gate_errors_total", "counter"),
            "Errors by kind.",
            "kind",
            self.errors.lock().iter().map(|(k, n)| (k.as_str(), *n)),
        )?;
        family(
            out,
            ("intruder_gate_adapter_intruders", "gauge"),
            "Intruder dimensions of the most recently screened adapters.",
            "adapter",
            self.adapters.lock().iter(),
        )?;
        header(
            out,
            "intruder_gate_info",
            "gauge",
            "Version, backend and device of this gate; always 1.",
        )?;
        let info = self.info.read();
        writeln!(
            out,
            "intruder_gate_info{{version=\"{}\",backend=\"{}\",device=\"{}\"}} 1",
            Escaped(&info.version),
            Escaped(&info.backend),
            Escaped(&info.device)
        )
    }
}

/// A metric without labels: its header and its one sample.
fn single(out: &mut String, name: &str, help: &str, n: u64) -> fmt::Result {
    header(out, name, "counter", help)?;
    writeln!(out, "{name} {n}")
}

/// A metric with one label: its header and one sample per (label value, count).
fn family<'a>(
    out: &mut String,
    (name, kind): (&str, &str),
    help: &str,
    label: &str,
    rows: impl IntoIterator<Item = (&'a str, u64)>,
) -> fmt::Result {
    header(out, name, kind, help)?;
    for (value, n) in rows {
        writeln!(out, "{name}{{{label}=\"{}\"}} {n}", Escaped(value))?;
    }
    Ok(())
}

fn header(out: &mut String, name: &str, kind: &str, help: &str) -> fmt::Result {
    writeln!(out, "# HELP {name} {help}")?;
    writeln!(out, "# TYPE {name} {kind}")
}

/// Formats a float so Prometheus parses it back to the same value.
struct PromFloat(f64);

impl fmt::Display for PromFloat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Rust's `{}` would print "inf"/"NaN" spellings Prometheus does not use.
        match self.0 {
            v if v == f64::INFINITY => f.write_str("+Inf"),
            v if v == f64::NEG_INFINITY => f.write_str("-Inf"),
            v if v.is_nan() => f.write_str("NaN"),
            v => write!(f, "{v}"),
        }
    }
}

/// A label value escaped per the exposition format: `\`, `"` and newline.
struct Escaped<'a>(&'a str);

impl fmt::Display for Escaped<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for c in self.0.chars() {
            match c {
                '\\' => f.write_str("\\\\")?,
                '"' => f.write_str("\\\"")?,
                '\n' => f.write_str("\\n")?,
                c => f.write_char(c)?,
            }
        }
        Ok(())
    }
}

/// Fixed-bucket histogram on atomics.
struct Histogram {
    bounds: &'static [f64],
    /// Per-bucket (non-cumulative) counts; the extra last slot is `+Inf`.
    /// `_count` is derived from these so it always equals the `+Inf` bucket,
    /// even when rendered while observations are in flight.
    buckets: Box<[AtomicU64]>,
    /// `f64` bits, updated by compare-and-swap.
    sum: AtomicU64,
}

impl Histogram {
    fn new(bounds: &'static [f64]) -> Self {
        Histogram {
            bounds,
            buckets: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(),
            sum: AtomicU64::new(0f64.to_bits()),
        }
    }

    fn observe(&self, seconds: f64) {
        // A NaN or infinite duration is a caller bug; recording it would
        // poison `_sum` for the life of the process.
        if !seconds.is_finite() {
            return;
        }
        let v = seconds.max(0.0);
        let i = self.bounds.partition_point(|&b| b < v);
        self.buckets[i].fetch_add(1, Ordering::Relaxed);
        // The closure always returns Some, so this cannot fail.
        let _ = self
            .sum
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |bits| {
                Some((f64::from_bits(bits) + v).to_bits())
            });
    }

    fn write(&self, out: &mut String, name: &str, help: &str) -> fmt::Result {
        header(out, name, "histogram", help)?;
        let mut cumulative = 0u64;
        for (i, bucket) in self.buckets.iter().enumerate() {
            cumulative += bucket.load(Ordering::Relaxed);
            let le = self.bounds.get(i).copied().unwrap_or(f64::INFINITY);
            writeln!(
                out,
                "{name}_bucket{{le=\"{}\"}} {cumulative}",
                PromFloat(le)
            )?;
        }
        let sum = f64::from_bits(self.sum.load(Ordering::Relaxed));
        writeln!(out, "{name}_sum {}", PromFloat(sum))?;
        writeln!(out, "{name}_count {cumulative}")
    }
}

/// Intruder counts of the last `cap` distinct adapters screened, oldest evicted first.
struct RecentAdapters {
    cap: usize,
    next_seq: u64,
    /// Adapter name -> its key in `by_seq`.
    seq_of: HashMap<String, u64>,
    /// Recency order (ascending = oldest first) -> (adapter, intruders).
    by_seq: BTreeMap<u64, (String, u64)>,
}

impl RecentAdapters {
    fn new(cap: usize) -> Self {
        RecentAdapters {
            cap,
            next_seq: 0,
            seq_of: HashMap::new(),
            by_seq: BTreeMap::new(),
        }
    }

    fn update(&mut self, adapter: &str, intruders: u64) {
        if self.cap == 0 {
            return;
        }
        let seq = self.next_seq;
        self.next_seq += 1;
        if let Some(old) = self.seq_of.get_mut(adapter) {
            let (name, _) = self
                .by_seq
                .remove(old)
                .expect("seq_of and by_seq index the same adapters");
            *old = seq;
            self.by_seq.insert(seq, (name, intruders));
            return;
        }
        if self.seq_of.len() == self.cap {
            if let Some((_, (oldest, _))) = self.by_seq.pop_first() {
                self.seq_of.remove(&oldest);
            }
        }
        self.seq_of.insert(adapter.to_owned(), seq);
        self.by_seq.insert(seq, (adapter.to_owned(), intruders));
    }

    /// (adapter, intruders), oldest first.
    fn iter(&self) -> impl Iterator<Item = (&str, u64)> {
        self.by_seq.values().map(|(name, n)| (name.as_str(), *n))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write as _;
    use std::process::{Command, Stdio};
    use std::sync::Arc;

    fn metrics(recent_adapters: usize) -> Metrics {
        Metrics::new(
            MetricsConfig { recent_adapters },
            Info {
                version: "0.1.0".into(),
                backend: "cpu".into(),
                device: "none".into(),
            },
        )
    }

    /// Value of the sample whose name and labels are exactly `series`.
    fn sample(text: &str, series: &str) -> Option<f64> {
        text.lines().find_map(|line| {
            let value = line.strip_prefix(series)?.strip_prefix(' ')?;
            Some(value.parse().expect("sample value parses as f64"))
        })
    }

    fn series_of<'a>(text: &'a str, name: &'a str) -> impl Iterator<Item = &'a str> {
        text.lines()
            .filter(move |line| !line.starts_with('#') && line.starts_with(name))
            .filter(move |line| matches!(line.as_bytes().get(name.len()), Some(b'{' | b' ')))
    }

    #[test]
    fn label_values_are_escaped() {
        let m = metrics(4);
        m.record_screening(
            "a\\b\"c\nd",
            ScreenOutcome::Verdict(Verdict::Accept),
            3,
            1,
            0.01,
        );
        m.record_error("bad\"kind");
        m.set_info(Info {
            version: "1\\2".into(),
            backend: "x\"y".into(),
            device: "gpu\n0".into(),
        });
        let text = m.render();
        assert_eq!(
            sample(
                &text,
                r#"intruder_gate_adapter_intruders{adapter="a\\b\"c\nd"}"#
            ),
            Some(3.0),
            "{text}"
        );
        assert_eq!(
            sample(&text, r#"intruder_gate_errors_total{kind="bad\"kind"}"#),
            Some(1.0)
        );
        assert_eq!(
            sample(
                &text,
                r#"intruder_gate_info{version="1\\2",backend="x\"y",device="gpu\n0"}"#
            ),
            Some(1.0)
        );
        // No raw newline may split a sample line.
        assert!(text
            .lines()
            .all(|l| l.starts_with('#') || l.starts_with("intruder_gate_")));
    }

    #[test]
    fn histogram_is_cumulative_with_exact_count_and_sum() {
        let m = metrics(4);
        // One observation per interesting spot: below the first bound, on a
        // bound (le is inclusive), between bounds, beyond the last bound.
        let observations = [0.0005, 0.001, 0.003, 0.5, 7.0, 100.0];
        for s in observations {
            m.record_screening("a", ScreenOutcome::Verdict(Verdict::Accept), 0, 0, s);
        }
        let text = m.render();
        let name = "intruder_gate_screen_duration_seconds";
        let buckets: Vec<(String, f64)> = series_of(&text, &format!("{name}_bucket"))
            .map(|line| {
                let (series, value) = line.rsplit_once(' ').unwrap();
                let le = series.split('"').nth(1).unwrap().to_owned();
                (le, value.parse().unwrap())
            })
            .collect();
        assert_eq!(buckets.len(), SCREEN_BUCKETS.len() + 1);
        assert!(buckets.windows(2).all(|w| w[0].1 <= w[1].1), "{buckets:?}");
        let bucket = |le: &str| buckets.iter().find(|(l, _)| l == le).unwrap().1;
        assert_eq!(bucket("0.001"), 2.0);
        assert_eq!(bucket("0.0025"), 2.0);
        assert_eq!(bucket("0.005"), 3.0);
        assert_eq!(bucket("0.5"), 4.0);
        assert_eq!(bucket("10"), 5.0);
        assert_eq!(bucket("60"), 5.0);
        assert_eq!(buckets.last().unwrap().0, "+Inf");
        let count = sample(&text, &format!("{name}_count")).unwrap();
        assert_eq!(bucket("+Inf"), count);
        assert_eq!(count, observations.len() as f64);
        let sum = sample(&text, &format!("{name}_sum")).unwrap();
        assert!(
            (sum - observations.iter().sum::<f64>()).abs() < 1e-9,
            "{sum}"
        );
    }

    #[test]
    fn bad_durations_do_not_poison_sum() {
        let m = metrics(4);
        m.record_spectrum_compute(f64::NAN);
        m.record_spectrum_compute(f64::INFINITY);
        m.record_spectrum_compute(-1.0);
        m.record_spectrum_compute(2.0);
        let text = m.render();
        let name = "intruder_gate_base_spectrum_compute_seconds";
        assert_eq!(sample(&text, &format!("{name}_sum")), Some(2.0));
        assert_eq!(sample(&text, &format!("{name}_count")), Some(2.0));
        assert_eq!(
            sample(&text, &format!("{name}_bucket{{le=\"0.01\"}}")),
            Some(1.0)
        );
    }

    #[test]
    fn every_outcome_and_cache_result_is_counted_and_always_rendered() {
        let m = metrics(4);
        let text = m.render();
        for o in ScreenOutcome::ALL {
            let series = format!(
                "intruder_gate_screenings_total{{verdict=\"{}\"}}",
                o.label()
            );
            assert_eq!(sample(&text, &series), Some(0.0), "{series}");
        }
        for r in Source::ALL {
            let series = format!(
                "intruder_gate_base_spectrum_cache_requests_total{{result=\"{}\"}}",
                r.label()
            );
            assert_eq!(sample(&text, &series), Some(0.0), "{series}");
        }

        for (i, o) in ScreenOutcome::ALL.into_iter().enumerate() {
            for _ in 0..=i {
                m.record_screening("a", o, 2, 10, 0.1);
            }
        }
        for (i, r) in Source::ALL.into_iter().enumerate() {
            for _ in 0..=i {
                m.record_cache(r);
            }
        }
        let text = m.render();
        for (i, o) in ScreenOutcome::ALL.into_iter().enumerate() {
            let series = format!(
                "intruder_gate_screenings_total{{verdict=\"{}\"}}",
                o.label()
            );
            assert_eq!(sample(&text, &series), Some(i as f64 + 1.0), "{series}");
        }
        for (i, r) in Source::ALL.into_iter().enumerate() {
            let series = format!(
                "intruder_gate_base_spectrum_cache_requests_total{{result=\"{}\"}}",
                r.label()
            );
            assert_eq!(sample(&text, &series), Some(i as f64 + 1.0), "{series}");
        }
        // 1+2+3+4+5 screenings.
        assert_eq!(
            sample(&text, "intruder_gate_intruder_dimensions_total"),
            Some(30.0)
        );
        assert_eq!(
            sample(&text, "intruder_gate_modules_screened_total"),
            Some(150.0)
        );
    }

    #[test]
    fn adapter_gauge_keeps_only_the_most_recent_distinct_adapters() {
        const N: usize = 64;
        let m = metrics(N);
        for i in 0..1000u64 {
            m.record_screening(
                &format!("adapter-{i}"),
                ScreenOutcome::Verdict(Verdict::Accept),
                i,
                1,
                0.01,
            );
        }
        let text = m.render();
        let series: Vec<&str> = series_of(&text, "intruder_gate_adapter_intruders").collect();
        assert_eq!(series.len(), N);
        for i in 1000 - N as u64..1000 {
            let s = format!("intruder_gate_adapter_intruders{{adapter=\"adapter-{i}\"}}");
            assert_eq!(sample(&text, &s), Some(i as f64), "{s}");
        }

        // Re-screening the oldest survivor refreshes it, so the next newcomer
        // evicts the one after it instead.
        let oldest = 1000 - N as u64;
        m.record_screening(
            &format!("adapter-{oldest}"),
            ScreenOutcome::Verdict(Verdict::Warn),
            7,
            1,
            0.01,
        );
        m.record_screening(
            "newcomer",
            ScreenOutcome::Verdict(Verdict::Accept),
            1,
            1,
            0.01,
        );
        let text = m.render();
        assert_eq!(
            series_of(&text, "intruder_gate_adapter_intruders").count(),
            N
        );
        let s = |name: String| format!("intruder_gate_adapter_intruders{{adapter=\"{name}\"}}");
        assert_eq!(sample(&text, &s(format!("adapter-{oldest}"))), Some(7.0));
        assert_eq!(sample(&text, &s(format!("adapter-{}", oldest + 1))), None);
        assert_eq!(sample(&text, &s("newcomer".into())), Some(1.0));
    }

    #[test]
    fn zero_recent_adapters_disables_the_gauge() {
        let m = metrics(0);
        m.record_screening("a", ScreenOutcome::Verdict(Verdict::Accept), 1, 1, 0.01);
        let text = m.render();
        assert_eq!(
            series_of(&text, "intruder_gate_adapter_intruders").count(),
            0
        );
    }

    #[test]
    fn error_kinds_are_capped_with_overflow_into_other() {
        let m = metrics(4);
        for i in 0..100 {
            m.record_error(&format!("kind{i}"));
        }
        m.record_error("kind0");
        let text = m.render();
        assert_eq!(
            series_of(&text, "intruder_gate_errors_total").count(),
            MAX_ERROR_KINDS
        );
        assert_eq!(
            sample(&text, r#"intruder_gate_errors_total{kind="kind0"}"#),
            Some(2.0)
        );
        let kept = MAX_ERROR_KINDS - 1;
        assert_eq!(
            sample(&text, r#"intruder_gate_errors_total{kind="other"}"#),
            Some((100 - kept) as f64)
        );
        // Known kinds keep counting after the cap is reached.
        m.record_error(&format!("kind{}", kept - 1));
        let series = format!("intruder_gate_errors_total{{kind=\"kind{}\"}}", kept - 1);
        assert_eq!(sample(&m.render(), &series), Some(2.0));
    }

    #[test]
    fn concurrent_recording_is_exact() {
        const THREADS: u64 = 8;
        const PER_THREAD: u64 = 1000;
        let m = Arc::new(metrics(16));
        let handles: Vec<_> = (0..THREADS)
            .map(|t| {
                let m = Arc::clone(&m);
                std::thread::spawn(move || {
                    for i in 0..PER_THREAD {
                        let outcome = ScreenOutcome::ALL[(i % 5) as usize];
                        // 0.5 sums exactly in f64, so the total must match exactly.
                        m.record_screening(&format!("t{t}-{}", i % 50), outcome, 2, 3, 0.5);
                        m.record_cache(Source::MemoryHit);
                        m.record_error("io");
                    }
                })
            })
            .collect();
        for h in handles {
            h.join().unwrap();
        }
        let total = THREADS * PER_THREAD;
        let text = m.render();
        for o in ScreenOutcome::ALL {
            let series = format!(
                "intruder_gate_screenings_total{{verdict=\"{}\"}}",
                o.label()
            );
            assert_eq!(sample(&text, &series), Some((total / 5) as f64), "{series}");
        }
        assert_eq!(
            sample(&text, "intruder_gate_intruder_dimensions_total"),
            Some((2 * total) as f64)
        );
        assert_eq!(
            sample(&text, "intruder_gate_modules_screened_total"),
            Some((3 * total) as f64)
        );
        let name = "intruder_gate_screen_duration_seconds";
        assert_eq!(sample(&text, &format!("{name}_count")), Some(total as f64));
        assert_eq!(
            sample(&text, &format!("{name}_sum")),
            Some(total as f64 * 0.5)
        );
        assert_eq!(
            sample(
                &text,
                r#"intruder_gate_base_spectrum_cache_requests_total{result="memory_hit"}"#
            ),
            Some(total as f64)
        );
        assert_eq!(
            sample(&text, r#"intruder_gate_errors_total{kind="io"}"#),
            Some(total as f64)
        );
        assert_eq!(
            series_of(&text, "intruder_gate_adapter_intruders").count(),
            16
        );
    }

    #[test]
    fn every_family_has_help_and_type() {
        let text = metrics(4).render();
        for (name, kind) in [
            ("intruder_gate_screenings_total", "counter"),
            ("intruder_gate_intruder_dimensions_total", "counter"),
            ("intruder_gate_modules_screened_total", "counter"),
            ("intruder_gate_screen_duration_seconds", "histogram"),
            (
                "intruder_gate_base_spectrum_cache_requests_total",
                "counter",
            ),
            ("intruder_gate_base_spectrum_compute_seconds", "histogram"),
            ("intruder_gate_errors_total", "counter"),
            ("intruder_gate_adapter_intruders", "gauge"),
            ("intruder_gate_info", "gauge"),
        ] {
            assert!(text.contains(&format!("# HELP {name} ")), "{name}");
            assert!(text.contains(&format!("# TYPE {name} {kind}\n")), "{name}");
        }
    }

    /// Validates the output with the real Prometheus parser and linter.
    #[test]
    fn promtool_accepts_rendered_text() {
        let m = metrics(4);
        for (i, o) in ScreenOutcome::ALL.into_iter().enumerate() {
            m.record_screening(
                &format!("adapter\\{i}\"\n"),
                o,
                i as u64,
                4,
                0.02 * i as f64,
            );
        }
        m.record_cache(Source::DiskHit);
        m.record_spectrum_compute(12.5);
        m.record_error("format");
        m.record_error("sh\"ape\n");
        let text = m.render();

        let mut child = match Command::new("promtool")
            .args(["check", "metrics"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
        {
            Ok(child) => child,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                println!("skipped: promtool not installed");
                return;
            }
            Err(e) => panic!("spawning promtool: {e}"),
        };
        child
            .stdin
            .take()
            .unwrap()
            .write_all(text.as_bytes())
            .unwrap();
        let output = child.wait_with_output().unwrap();
        let stdout = String::from_utf8_lossy(&output.stdout);
        let stderr = String::from_utf8_lossy(&output.stderr);
        println!(
            "promtool status: {}\nstdout: {stdout}\nstderr: {stderr}",
            output.status
        );
        // promtool exits non-zero on parse errors and on lint problems alike;
        // lint problems are also printed, so require silence as well.
        assert!(output.status.success(), "{stdout}{stderr}\n{text}");
        assert!(
            stdout.trim().is_empty() && stderr.trim().is_empty(),
            "{stdout}{stderr}"
        );
    }
}
