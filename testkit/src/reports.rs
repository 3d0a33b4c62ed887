//! Comparing reports: the CLI's JSON as the reference, numbers equal to 1e-9 relative.

use crate::cli::cli;
use crate::data::{adapter_dir, minilm_base};
use serde_json::Value;

/// `intruder-gate scan --format json` on a fixture adapter, without the disk cache.
pub fn cli_report(adapter: &str) -> Value {
    let out = cli()
        .args(["scan", "--no-cache", "--format", "json", "--base"])
        .arg(minilm_base())
        .arg("--adapter")
        .arg(adapter_dir(adapter))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "CLI failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// The parts of a report that must agree between two screenings of the same adapter: verdict,
/// totals, and per module its identity, spectrum, cosines and intruders.
pub fn numbers(report: &Value) -> Value {
    let modules: Vec<Value> = report["modules"]
        .as_array()
        .expect("modules")
        .iter()
        .map(|m| {
            serde_json::json!({
                "module": m["module"], "base_tensor": m["base_tensor"], "shape": m["shape"],
                "rank": m["rank"], "scale": m["scale"], "singular_values": m["singular_values"],
                "max_cos": m["max_cos"], "intruders": m["intruders"], "tied": m["tied"],
            })
        })
        .collect();
    serde_json::json!({
        "schema_version": report["schema_version"], "verdict": report["verdict"],
        "top_k": report["top_k"], "epsilon": report["epsilon"],
        "total_intruders": report["total_intruders"],
        "modules_with_intruders": report["modules_with_intruders"], "modules": modules,
    })
}

/// Asserts two reports carry the same numbers (floats to 1e-9 relative).
#[track_caller]
pub fn assert_same_numbers(got: &Value, want: &Value) {
    let (g, w) = (numbers(got), numbers(want));
    if let Err(path) = close(&g, &w, String::new()) {
        panic!("reports differ at {path}:\n got {g}\nwant {w}");
    }
}

fn close(a: &Value, b: &Value, path: String) -> Result<(), String> {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => {
            let (x, y) = (x.as_f64().unwrap(), y.as_f64().unwrap());
            match (x - y).abs() <= 1e-9 * x.abs().max(y.abs()).max(1.0) {
                true => Ok(()),
                false => Err(format!("{path}: {x} vs {y}")),
            }
        }
        (Value::Array(x), Value::Array(y)) if x.len() == y.len() => x
            .iter()
            .zip(y)
            .enumerate()
            .try_for_each(|(i, (x, y))| close(x, y, format!("{path}[{i}]"))),
        (Value::Object(x), Value::Object(y)) if x.len() == y.len() => x
            .iter()
            .try_for_each(|(k, v)| close(v, &y[k], format!("{path}.{k}"))),
        _ if a == b => Ok(()),
        _ => Err(format!("{path}: {a} vs {b}")),
    }
}
