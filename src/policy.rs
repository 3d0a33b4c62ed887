//! Verdict rules over a screening report. Each rule reads one number off the report, compares it
//! with a threshold and names an action; the most severe action among the rules that fire is the
//! verdict (none fired: accept). A policy is a small JSON document (`intruder-gate scan --policy`).
//!
//! The default policy (see README, "Policy and clamping", for the reasoning from the paper):
//! any intruder → `warn`; intruders in at least a quarter of the adapted matrices → `clamp`;
//! nothing rejects on intruder counts alone; malformed adapters are rejected.

use crate::error::{Error, ErrorKind, Result};
use serde::{Deserialize, Serialize};

/// A screening's outcome, in increasing severity.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    Accept,
    Warn,
    Clamp,
    Reject,
}

impl Verdict {
    /// The JSON value, and the `verdict` label of the metrics.
    pub fn label(self) -> &'static str {
        match self {
            Verdict::Accept => "accept",
            Verdict::Warn => "warn",
            Verdict::Clamp => "clamp",
            Verdict::Reject => "reject",
        }
    }
}

/// What a rule reads off one screened matrix (the report's modules implement it).
pub trait Screened {
    /// Intruder dimensions found in this matrix.
    fn intruder_count(&self) -> usize;
    /// The smallest max|cos| of any tested vector.
    fn min_max_cos(&self) -> f64;
}

/// The number a rule looks at.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Metric {
    /// Intruders summed over all matrices; fires when `≥ threshold`.
    TotalIntruders,
    /// Intruders in the worst single matrix; fires when `≥ threshold`.
    ModuleIntruders,
    /// Fraction of matrices with at least one intruder; fires when `≥ threshold`.
    FractionModulesWithIntruders,
    /// The smallest max|cos| over every tested vector of every matrix; fires when `< threshold`
    /// (a vector orthogonal to the whole base is a stronger intruder than one near ε).
    MinMaxCos,
}

impl Metric {
    fn label(self) -> &'static str {
        match self {
            Metric::TotalIntruders => "total_intruders",
            Metric::ModuleIntruders => "module_intruders",
            Metric::FractionModulesWithIntruders => "fraction_modules_with_intruders",
            Metric::MinMaxCos => "min_max_cos",
        }
    }

    /// The metric's value on a set of screened matrices.
    fn value<M: Screened>(self, modules: &[M]) -> f64 {
        let counts = modules.iter().map(M::intruder_count);
        match self {
            Metric::TotalIntruders => counts.sum::<usize>() as f64,
            Metric::ModuleIntruders => counts.max().unwrap_or(0) as f64,
            Metric::FractionModulesWithIntruders if modules.is_empty() => 0.0,
            Metric::FractionModulesWithIntruders => {
                counts.filter(|&c| c > 0).count() as f64 / modules.len() as f64
            }
            Metric::MinMaxCos => modules
                .iter()
                .map(M::min_max_cos)
                .fold(f64::INFINITY, f64::min),
        }
    }

    fn fires(self, value: f64, threshold: f64) -> bool {
        match self {
            Metric::MinMaxCos => value < threshold,
            _ => value >= threshold,
        }
    }
}

/// What a fired rule asks for. `Accept` is not an action: a rule that accepts would never matter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    Warn,
    Clamp,
    Reject,
}

impl Action {
    pub fn verdict(self) -> Verdict {
        match self {
            Action::Warn => Verdict::Warn,
            Action::Clamp => Verdict::Clamp,
            Action::Reject => Verdict::Reject,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rule {
    pub metric: Metric,
    pub threshold: f64,
    pub action: Action,
}

/// What a malformed adapter (bad shapes, NaN, unsupported format, no matching base tensor, a
/// limit exceeded) turns into.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum OnInvalid {
    /// A report with verdict `reject` and the error in `report.error`.
    #[default]
    Reject,
    /// The call fails with the error (the pre-policy behaviour).
    Fail,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Policy {
    pub rules: Vec<Rule>,
    #[serde(default)]
    pub on_invalid: OnInvalid,
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            rules: vec![
                Rule {
                    metric: Metric::TotalIntruders,
                    threshold: 1.0,
                    action: Action::Warn,
                },
                Rule {
                    metric: Metric::FractionModulesWithIntruders,
                    threshold: 0.25,
                    action: Action::Clamp,
                },
            ],
            on_invalid: OnInvalid::Reject,
        }
    }
}

/// A rule that fired, with the value that made it fire.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FiredRule {
    pub rule: Rule,
    pub value: f64,
    /// E.g. "total_intruders = 12 ≥ 1 → warn".
    pub reason: String,
}

impl Policy {
    pub fn parse(json: &str) -> Result<Policy> {
        let p: Policy = serde_json::from_str(json).map_err(|e| {
            Error::new(
                ErrorKind::InvalidArgument,
                format!("policy is not valid JSON of the expected form: {e}"),
            )
            .with_source(e)
        })?;
        p.validate()?;
        Ok(p)
    }

    /// Reads a policy file (`scan --policy`), bounded like every JSON document the tool reads
    /// (`max_config_bytes`).
    pub fn load(path: &std::path::Path, limits: &crate::limits::Limits) -> Result<Policy> {
        let text =
            crate::safetensors_file::read_text(path, limits.max_config_bytes, "max_config_bytes")?;
        Policy::parse(&text).map_err(|e| e.context(path.display()))
    }

    pub fn validate(&self) -> Result<()> {
        for (i, r) in self.rules.iter().enumerate() {
            let ok = match r.metric {
                Metric::TotalIntruders | Metric::ModuleIntruders => r.threshold >= 0.0,
                Metric::FractionModulesWithIntruders | Metric::MinMaxCos => {
                    (0.0..=1.0).contains(&r.threshold)
                }
            };
            if !ok || !r.threshold.is_finite() {
                crate::bail!(
                    InvalidArgument,
                    "policy rule {i} ({}): threshold {} is out of range",
                    r.metric.label(),
                    r.threshold
                );
            }
        }
        Ok(())
    }

    /// The verdict for these matrices and every rule that fired, in policy order.
    pub fn evaluate<M: Screened>(&self, modules: &[M]) -> (Verdict, Vec<FiredRule>) {
        let fired: Vec<FiredRule> = self
            .rules
            .iter()
            .filter_map(|r| {
                let value = r.metric.value(modules);
                r.metric.fires(value, r.threshold).then(|| FiredRule {
                    rule: r.clone(),
                    value,
                    reason: format!(
                        "{} = {} {} {} → {}",
                        r.metric.label(),
                        round(value),
                        if r.metric == Metric::MinMaxCos {
                            "<"
                        } else {
                            "≥"
                        },
                        r.threshold,
                        r.action.verdict().label()
                    ),
                })
            })
            .collect();
        let verdict = fired
            .iter()
            .map(|f| f.rule.action.verdict())
            .max()
            .unwrap_or(Verdict::Accept);
        (verdict, fired)
    }
}

/// Four significant decimals: enough to read a reason, short enough to print.
fn round(v: f64) -> f64 {
    (v * 1e4).round() / 1e4
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Module {
        intruders: usize,
        max_cos: Vec<f64>,
    }

    impl Screened for Module {
        fn intruder_count(&self) -> usize {
            self.intruders
        }
        fn min_max_cos(&self) -> f64 {
            self.max_cos.iter().copied().fold(f64::INFINITY, f64::min)
        }
    }

    fn module(intruders: Vec<usize>, max_cos: Vec<f64>) -> Module {
        Module {
            intruders: intruders.len(),
            max_cos,
        }
    }

    #[test]
    fn most_severe_fired_rule_wins_and_every_fired_rule_is_listed() {
        let mods = [
            module(vec![0, 2], vec![0.1, 0.9, 0.3]),
            module(vec![], vec![0.9, 0.8, 0.7]),
            module(vec![], vec![0.95, 0.9, 0.6]),
            module(vec![], vec![0.95, 0.9, 0.6]),
        ];
        let p = Policy::parse(
            r#"{"rules": [
                {"metric": "total_intruders", "threshold": 1, "action": "warn"},
                {"metric": "module_intruders", "threshold": 2, "action": "reject"},
                {"metric": "fraction_modules_with_intruders", "threshold": 0.5, "action": "clamp"},
                {"metric": "min_max_cos", "threshold": 0.2, "action": "clamp"}
            ]}"#,
        )
        .unwrap();
        let (v, fired) = p.evaluate(&mods);
        assert_eq!(v, Verdict::Reject);
        let metrics: Vec<_> = fired.iter().map(|f| f.rule.metric).collect();
        assert_eq!(
            metrics,
            [
                Metric::TotalIntruders,
                Metric::ModuleIntruders,
                Metric::MinMaxCos
            ]
        );
        assert_eq!(fired[0].reason, "total_intruders = 2 ≥ 1 → warn");
        assert_eq!(fired[2].reason, "min_max_cos = 0.1 < 0.2 → clamp");
    }

    #[test]
    fn default_policy_warns_on_one_intruder_and_clamps_when_widespread() {
        let p = Policy::default();
        let clean = || module(vec![], vec![0.9]);
        let dirty = || module(vec![0], vec![0.1]);
        assert_eq!(p.evaluate(&[clean(), clean()]).0, Verdict::Accept);
        let few = [dirty(), clean(), clean(), clean(), clean()];
        assert_eq!(p.evaluate(&few).0, Verdict::Warn);
        assert_eq!(p.evaluate(&[dirty(), clean(), clean()]).0, Verdict::Clamp);
    }

    #[test]
    fn bad_policies_are_refused() {
        for json in [
            r#"{"rules": [{"metric": "min_max_cos", "threshold": 1.5, "action": "warn"}]}"#,
            r#"{"rules": [{"metric": "total_intruders", "threshold": -1, "action": "warn"}]}"#,
            r#"{"rules": [{"metric": "total_intruders", "threshold": 1, "action": "accept"}]}"#,
            r#"{"rules": [{"metric": "nope", "threshold": 1, "action": "warn"}]}"#,
            r#"{"rules": [], "on_invalid": "ignore"}"#,
            r#"{"rules": [], "extra": 1}"#,
        ] {
            let e = Policy::parse(json).unwrap_err();
            assert_eq!(e.kind(), ErrorKind::InvalidArgument, "{json}: {e}");
        }
        let p = Policy::parse(r#"{"rules": [], "on_invalid": "fail"}"#).unwrap();
        assert_eq!(p.on_invalid, OnInvalid::Fail);
    }

    /// Found by the `policy` fuzz target (`fuzz/corpus/policy/crash-float-roundtrip`): without
    /// serde_json's `float_roundtrip`, 1e-28 read back from our own JSON was one ulp off.
    #[test]
    fn thresholds_survive_a_json_round_trip_bit_for_bit() {
        for t in [
            1e-28f64,
            0.30000000000000004,
            2.2250738585072014e-308,
            123456.78901234568,
        ] {
            let text = format!(
                r#"{{"rules":[{{"metric":"total_intruders","threshold":{t:e},"action":"warn"}}]}}"#
            );
            let p = Policy::parse(&text).unwrap();
            let again = Policy::parse(&serde_json::to_string(&p).unwrap()).unwrap();
            assert_eq!(again, p, "{t:e}");
            assert_eq!(again.rules[0].threshold.to_bits(), t.to_bits(), "{t:e}");
        }
    }
}
