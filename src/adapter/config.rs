//! `adapter_config.json`: the fields that change ΔW = s·B·A, with PEFT's per-module overrides.

use crate::bail;
use crate::error::{Error, ErrorKind, Result};
use crate::safetensors_file::ordered;
use regex::{RegexSet, RegexSetBuilder};
use serde::Deserialize;

#[derive(Debug, Clone, PartialEq)]
pub struct AdapterConfig {
    pub r: usize,
    pub lora_alpha: f64,
    pub use_rslora: bool,
    /// In JSON order: PEFT takes the first key that matches.
    pub rank_pattern: Vec<(String, usize)>,
    pub alpha_pattern: Vec<(String, f64)>,
    pub fan_in_fan_out: bool,
    pub use_dora: bool,
    pub target_modules: Option<serde_json::Value>,
    pub base_model_name_or_path: Option<String>,
    /// The two pattern maps, compiled once when parsed.
    matchers: Matchers,
}

/// Most keys accepted in each of `rank_pattern` and `alpha_pattern`. Per-layer keys for every
/// module of an 80-layer model are 560; lookups and compilation grow with the count.
pub const MAX_PATTERN_KEYS: usize = 4096;

/// Bound on the compiled size of each pattern map (all its keys together), which bounds the
/// time compiling and matching them can take, whatever the keys.
const PATTERN_SIZE_LIMIT: usize = 8 << 20;

/// The keys of one pattern map as one regex set: indices follow JSON order, so the lowest index
/// that matches is PEFT's first match.
#[derive(Debug, Clone)]
struct Matchers {
    rank: RegexSet,
    alpha: RegexSet,
}

/// Built from the keys, which [`AdapterConfig`] compares already.
impl PartialEq for Matchers {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

/// The file as written; `null` and absence mean the same for every optional field.
#[derive(Deserialize)]
struct Raw {
    peft_type: Option<String>,
    r: Option<usize>,
    lora_alpha: Option<f64>,
    use_rslora: Option<bool>,
    #[serde(default, deserialize_with = "ordered")]
    rank_pattern: Vec<(String, usize)>,
    #[serde(default, deserialize_with = "ordered")]
    alpha_pattern: Vec<(String, f64)>,
    fan_in_fan_out: Option<bool>,
    use_dora: Option<bool>,
    target_modules: Option<serde_json::Value>,
    base_model_name_or_path: Option<String>,
}

impl AdapterConfig {
    pub fn parse(json: &str) -> Result<Self> {
        let raw: Raw = serde_json::from_str(json).map_err(|e| {
            Error::new(
                ErrorKind::Format,
                format!("adapter config is not valid JSON of the expected form: {e}"),
            )
            .with_source(e)
        })?;
        if let Some(t) = raw.peft_type.as_deref().filter(|&t| t != "LORA") {
            bail!(
                Format,
                "adapter config has peft_type {t:?}; only \"LORA\" adapters can be screened"
            );
        }
        let Some(r) = raw.r else {
            bail!(Format, "adapter config has no rank \"r\"");
        };
        let Some(lora_alpha) = raw.lora_alpha else {
            bail!(Format, "adapter config has no \"lora_alpha\"");
        };
        if r == 0 {
            bail!(
                Format,
                "adapter config has r = 0; a LoRA rank must be at least 1"
            );
        }
        let rank_pattern = python_dict(raw.rank_pattern);
        let alpha_pattern = python_dict(raw.alpha_pattern);
        let matchers = Matchers {
            rank: compile("rank_pattern", &rank_pattern)?,
            alpha: compile("alpha_pattern", &alpha_pattern)?,
        };
        if let Some((k, _)) = rank_pattern.iter().find(|(_, v)| *v == 0) {
            bail!(Format, "adapter config rank_pattern {k:?} sets rank 0");
        }
        Ok(AdapterConfig {
            r,
            lora_alpha,
            use_rslora: raw.use_rslora.unwrap_or(false),
            rank_pattern,
            alpha_pattern,
            fan_in_fan_out: raw.fan_in_fan_out.unwrap_or(false),
            use_dora: raw.use_dora.unwrap_or(false),
            target_modules: raw.target_modules,
            base_model_name_or_path: raw.base_model_name_or_path,
            matchers,
        })
    }

    /// PEFT rule: the first pattern key such that `module` full-matches `(.*\.)?(KEY)$`, else r.
    pub fn rank_for(&self, module: &str) -> usize {
        first_match(&self.matchers.rank, &self.rank_pattern, module).unwrap_or(self.r)
    }

    pub fn alpha_for(&self, module: &str) -> f64 {
        first_match(&self.matchers.alpha, &self.alpha_pattern, module).unwrap_or(self.lora_alpha)
    }

    /// alpha/r, or alpha/√r with rsLoRA, using the module's own r and alpha.
    pub fn scale_for(&self, module: &str) -> f64 {
        let r = self.rank_for(module) as f64;
        let alpha = self.alpha_for(module);
        if self.use_rslora {
            alpha / r.sqrt()
        } else {
            alpha / r
        }
    }
}

/// Repeated keys as Python's `json.load` leaves them (PEFT reads the file so): the first
/// one's position, the last one's value.
fn python_dict<T>(pairs: Vec<(String, T)>) -> Vec<(String, T)> {
    let mut out: Vec<(String, T)> = Vec::with_capacity(pairs.len());
    let mut at: std::collections::HashMap<String, usize> = std::collections::HashMap::new();
    for (k, v) in pairs {
        match at.get(&k) {
            Some(&i) => out[i].1 = v,
            None => {
                at.insert(k.clone(), out.len());
                out.push((k, v));
            }
        }
    }
    out
}

/// PEFT's rule for each key, `re.match(rf"(.*\.)?({key})$", module)`: the key matches the
/// whole of `module` or of a suffix of it that starts after a `.`. Compiled as `^(?:KEY)$`, all
/// keys in one set, and tried on each such suffix (see [`first_match`]): the shared `(.*\.)?`
/// prefix, Unicode-aware, would cost more to compile than the keys themselves.
fn compile<T>(field: &str, pairs: &[(String, T)]) -> Result<RegexSet> {
    if pairs.len() > MAX_PATTERN_KEYS {
        bail!(
            Limit,
            "adapter config {field} has {} keys, over the limit of {MAX_PATTERN_KEYS}",
            pairs.len()
        );
    }
    RegexSetBuilder::new(pairs.iter().map(|(k, _)| format!("^(?:{k})$")))
        .size_limit(PATTERN_SIZE_LIMIT)
        .dfa_size_limit(PATTERN_SIZE_LIMIT)
        .build()
        .map_err(|e| match e {
            // The message quotes the offending key.
            regex::Error::Syntax(why) => Error::new(
                ErrorKind::Format,
                format!("adapter config {field} has a key that is not a valid regex: {why}"),
            ),
            e => Error::new(
                ErrorKind::Limit,
                format!("adapter config {field} is too complex to match: {e}"),
            ),
        })
}

/// The value of the first key (in JSON order) that matches `module` by PEFT's rule.
fn first_match<T: Copy>(set: &RegexSet, patterns: &[(String, T)], module: &str) -> Option<T> {
    let starts = std::iter::once(0).chain(module.match_indices('.').map(|(i, _)| i + 1));
    // Set indices are JSON order: the smallest over every suffix is the first key that matches.
    let i = starts
        .filter_map(|p| set.matches(&module[p..]).into_iter().next())
        .min()?;
    Some(patterns[i].1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn null_patterns_and_unknown_fields_are_fine() {
        let c = AdapterConfig::parse(
            r#"{"r": 4, "lora_alpha": 8.5, "rank_pattern": null, "alpha_pattern": {}, "use_rslora": null, "new_field": [1]}"#,
        )
        .unwrap();
        assert!(c.rank_pattern.is_empty() && c.alpha_pattern.is_empty());
        assert!(!c.use_rslora && !c.use_dora && !c.fan_in_fan_out);
        assert_eq!(c.scale_for("any"), 8.5 / 4.0);
    }

    #[test]
    fn bad_patterns_are_format_errors() {
        for json in [
            r#"{"r": 4, "lora_alpha": 8, "rank_pattern": {"q(": 2}}"#,
            r#"{"r": 4, "lora_alpha": 8, "rank_pattern": {"q": 0}}"#,
            r#"{"r": 4, "lora_alpha": 8, "rank_pattern": [1]}"#,
            r#"{"r": 4.5, "lora_alpha": 8}"#,
        ] {
            let e = AdapterConfig::parse(json).unwrap_err();
            assert_eq!(e.kind(), ErrorKind::Format, "{json}: {e}");
        }
    }

    #[test]
    fn key_is_a_regex_anchored_at_a_component() {
        let c = AdapterConfig::parse(
            r#"{"r": 4, "lora_alpha": 8, "rank_pattern": {"q|v": 2, "layers\\.1\\..*": 6}}"#,
        )
        .unwrap();
        assert_eq!(c.rank_for("a.q"), 2);
        assert_eq!(c.rank_for("v"), 2);
        assert_eq!(c.rank_for("a.kv"), 4);
        assert_eq!(c.rank_for("m.layers.1.k"), 6);
    }
}
