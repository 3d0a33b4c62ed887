//! Verdict policy end to end: rules over real and synthetic reports, malformed adapters turned
//! into `reject` (or failing the call), and `scan --policy`.

mod common;

use intruder_gate::policy::{Action, Metric, OnInvalid, Policy, Rule};
use intruder_gate::{Config, ErrorKind, Gate, Verdict};
use std::path::Path;

fn gate(base: &Path, policy: Policy) -> Gate {
    let g = Gate::new(Config {
        cache_dir: None,
        backend: intruder_gate::backend::BackendChoice::Cpu,
        policy,
        ..Config::default()
    })
    .unwrap();
    g.attach_base(base).unwrap();
    g
}

#[test]
fn default_policy_on_the_minilm_fixtures() {
    let base = common::minilm_base();
    let g = gate(&base, Policy::default());
    // lora_r16_qv: 12 intruders spread over the q/v matrices → clamp; rslora_r16: 2 intruders
    // in 36 matrices → warn only.
    for (name, verdict) in [
        ("lora_r16_qv", Verdict::Clamp),
        ("rslora_r16", Verdict::Warn),
    ] {
        let r = g
            .screen_adapter_dir(&common::fixtures().join(name))
            .unwrap();
        assert_eq!(r.verdict, verdict, "{name}: {:?}", r.fired_rules);
        let reasons: Vec<&str> = r.fired_rules.iter().map(|f| f.reason.as_str()).collect();
        assert!(reasons[0].starts_with("total_intruders = "), "{reasons:?}");
        assert!(r.to_json().contains("\"fired_rules\""));
    }
}

#[test]
fn the_most_severe_rule_decides_and_clean_adapters_pass() {
    let tmp = tempfile::tempdir().unwrap();
    let (base, dir) = common::planted_trio(tmp.path(), [2, 0, 3], 41);
    let policy = Policy {
        rules: vec![
            Rule {
                metric: Metric::ModuleIntruders,
                threshold: 3.0,
                action: Action::Reject,
            },
            Rule {
                metric: Metric::MinMaxCos,
                // Every intruder has max|cos| < ε = 0.5, so this fires whenever one exists.
                threshold: 0.5,
                action: Action::Clamp,
            },
        ],
        on_invalid: OnInvalid::Reject,
    };
    let g = gate(&base, policy);
    let r = g.screen_adapter_dir(&dir).unwrap();
    assert_eq!(r.verdict, Verdict::Reject);
    assert_eq!(r.fired_rules.len(), 2);
    assert_eq!(r.fired_rules[0].value, 3.0);

    let clean_tmp = tempfile::tempdir().unwrap();
    let (_, clean) = common::planted_trio(clean_tmp.path(), [0, 0, 0], 41);
    // Same seed, same base; nothing planted.
    let r = g.screen_adapter_dir(&clean).unwrap();
    assert_eq!(r.total_intruders, 0);
    assert_eq!(r.verdict, Verdict::Accept);
    assert!(r.fired_rules.is_empty());
}

#[test]
fn malformed_adapters_are_rejected_with_the_error_unless_the_policy_says_fail() {
    let tmp = tempfile::tempdir().unwrap();
    let (base, dir) = common::planted_trio(tmp.path(), [1, 0, 0], 3);
    // Corrupt the weights: the loader refuses them as a format error.
    let weights = dir.join("adapter_model.safetensors");
    let mut bytes = std::fs::read(&weights).unwrap();
    bytes.truncate(bytes.len() - 16);
    std::fs::write(&weights, bytes).unwrap();

    let r = gate(&base, Policy::default())
        .screen_adapter_dir(&dir)
        .unwrap();
    assert_eq!(r.verdict, Verdict::Reject);
    let e = r.error.as_ref().expect("the error is carried");
    assert_eq!(e.kind, "format", "{}", e.message);
    assert!(r.modules.is_empty() && r.fired_rules.is_empty());

    let fail = Policy {
        on_invalid: OnInvalid::Fail,
        ..Policy::default()
    };
    let e = gate(&base, fail).screen_adapter_dir(&dir).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Format, "{e}");

    // Not a validation error: a missing directory fails the call whatever the policy.
    let e = gate(&base, Policy::default())
        .screen_adapter_dir(&tmp.path().join("nope"))
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Io);
}

#[test]
fn cli_scan_with_a_policy_file() {
    let tmp = tempfile::tempdir().unwrap();
    let (base, dir) = common::planted_trio(tmp.path(), [2, 0, 3], 41);
    let policy = tmp.path().join("policy.json");
    std::fs::write(
        &policy,
        r#"{"rules": [{"metric": "total_intruders", "threshold": 5, "action": "reject"}]}"#,
    )
    .unwrap();
    let scan = |policy: &Path, fail_on: &str| {
        common::cli()
            .args(["scan", "--no-cache", "--backend", "cpu", "--format", "json"])
            .args(["--fail-on", fail_on])
            .arg("--base")
            .arg(&base)
            .arg("--adapter")
            .arg(&dir)
            .arg("--policy")
            .arg(policy)
            .output()
            .unwrap()
    };
    let out = scan(&policy, "reject");
    assert_eq!(out.status.code(), Some(1));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["verdict"], "reject");
    assert_eq!(
        report["fired_rules"][0]["reason"],
        "total_intruders = 5 ≥ 5 → reject"
    );

    std::fs::write(&policy, r#"{"rules": [], "mood": "strict"}"#).unwrap();
    let out = scan(&policy, "reject");
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown field"));
}

#[test]
fn io_and_json_errors_keep_their_cause() {
    use std::error::Error as _;
    let io = intruder_gate::Error::io(
        std::path::Path::new("/x"),
        std::io::Error::from(std::io::ErrorKind::NotFound),
    );
    assert_eq!(io.kind(), intruder_gate::ErrorKind::Io);
    let cause = io.source().expect("io source");
    assert!(
        cause.downcast_ref::<std::io::Error>().is_some(),
        "{cause:?}"
    );
    let json = intruder_gate::Policy::parse("{").unwrap_err();
    let cause = json.source().expect("serde source");
    assert!(
        cause.downcast_ref::<serde_json::Error>().is_some(),
        "{cause:?}"
    );
    // The message is unchanged: the cause is carried, not appended twice.
    assert!(json.message().starts_with("policy is not valid JSON"));
}
