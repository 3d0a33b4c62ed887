//! `adapter_config.json`: the fields that change ΔW = s·B·A, with PEFT's per-module overrides.

use crate::bail;
use crate::error::{Error, ErrorKind, Result};
use regex::Regex;
use serde::de::{Deserializer, MapAccess, Visitor};
use serde::Deserialize;
use std::fmt;
use std::marker::PhantomData;

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
        // Reject bad patterns here so rank_for/alpha_for cannot meet one later.
        for key in raw
            .rank_pattern
            .iter()
            .map(|(k, _)| k)
            .chain(raw.alpha_pattern.iter().map(|(k, _)| k))
        {
            if let Err(e) = pattern(key) {
                bail!(
                    Format,
                    "adapter config pattern {key:?} is not a valid regex: {e}"
                );
            }
        }
        if let Some((k, _)) = raw.rank_pattern.iter().find(|(_, v)| *v == 0) {
            bail!(Format, "adapter config rank_pattern {k:?} sets rank 0");
        }
        Ok(AdapterConfig {
            r,
            lora_alpha,
            use_rslora: raw.use_rslora.unwrap_or(false),
            rank_pattern: raw.rank_pattern,
            alpha_pattern: raw.alpha_pattern,
            fan_in_fan_out: raw.fan_in_fan_out.unwrap_or(false),
            use_dora: raw.use_dora.unwrap_or(false),
            target_modules: raw.target_modules,
            base_model_name_or_path: raw.base_model_name_or_path,
        })
    }

    /// PEFT rule: the first pattern key such that `module` full-matches `(.*\.)?(KEY)$`, else r.
    pub fn rank_for(&self, module: &str) -> usize {
        first_match(&self.rank_pattern, module).unwrap_or(self.r)
    }

    pub fn alpha_for(&self, module: &str) -> f64 {
        first_match(&self.alpha_pattern, module).unwrap_or(self.lora_alpha)
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

fn pattern(key: &str) -> std::result::Result<Regex, regex::Error> {
    Regex::new(&format!(r"^(?:.*\.)?(?:{key})$"))
}

fn first_match<T: Copy>(patterns: &[(String, T)], module: &str) -> Option<T> {
    patterns
        .iter()
        .find(|(key, _)| pattern(key).is_ok_and(|re| re.is_match(module)))
        .map(|&(_, v)| v)
}

/// A JSON object (or null) as key/value pairs in file order, which serde_json's default map
/// would sort.
fn ordered<'de, D, T>(d: D) -> std::result::Result<Vec<(String, T)>, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de>,
{
    struct Pairs<T>(PhantomData<T>);
    impl<'de, T: Deserialize<'de>> Visitor<'de> for Pairs<T> {
        type Value = Vec<(String, T)>;
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("an object or null")
        }
        fn visit_unit<E>(self) -> std::result::Result<Self::Value, E> {
            Ok(Vec::new())
        }
        fn visit_none<E>(self) -> std::result::Result<Self::Value, E> {
            Ok(Vec::new())
        }
        fn visit_map<M: MapAccess<'de>>(
            self,
            mut m: M,
        ) -> std::result::Result<Self::Value, M::Error> {
            let mut out = Vec::new();
            while let Some(pair) = m.next_entry()? {
                out.push(pair);
            }
            Ok(out)
        }
    }
    d.deserialize_any(Pairs(PhantomData))
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
