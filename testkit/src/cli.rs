//! The `intruder-gate` binary for tests of other packages: built on first use with the same
//! profile as the running test (a no-op when it is fresh), so a test never runs a stale CLI.

use std::path::PathBuf;
use std::process::Command;
use std::sync::OnceLock;

/// Path of the CLI binary in the running test's target directory.
pub fn cli_path() -> PathBuf {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| {
        // Test executables live in target/<profile>/deps/.
        let exe = std::env::current_exe().expect("test executable path");
        let profile_dir = exe
            .parent()
            .and_then(|deps| deps.parent())
            .expect("test executable inside target/<profile>/deps");
        let profile = match profile_dir.file_name().and_then(|n| n.to_str()) {
            Some("debug") => "dev".to_string(),
            Some(p) => p.to_string(),
            None => panic!("unexpected target layout at {}", profile_dir.display()),
        };
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let status = Command::new(cargo)
            .args([
                "build",
                "--quiet",
                "-p",
                "intruder-gate-cli",
                "--bin",
                "intruder-gate",
            ])
            .args(["--profile", &profile])
            .current_dir(crate::data::workspace_root())
            .status()
            .expect("run cargo to build the CLI");
        assert!(status.success(), "building the intruder-gate CLI failed");
        profile_dir.join("intruder-gate")
    })
    .clone()
}

/// A command running the CLI binary.
pub fn cli() -> Command {
    Command::new(cli_path())
}
