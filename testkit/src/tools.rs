//! The optional tools some tests need: curl, promtool, pkg-config, cmake, valgrind and
//! util-linux `script` (the README lists them; `.ci/run` installs them).

use std::io::Write;

/// Whether `tool` runs. When it does not, the calling test skips: it says so on stderr outside
/// libtest's output capture (only `print!`-style macros are captured), so the skip shows in a
/// plain `cargo test`; under `IG_REQUIRE_TOOLS=1` (set by `.ci/run` once it has installed them)
/// it panics instead, so CI cannot pass by skipping.
pub fn tool_or_skip(tool: &str, what: &str) -> bool {
    let runs = std::process::Command::new(tool)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if runs {
        return true;
    }
    if std::env::var_os("IG_REQUIRE_TOOLS").is_some_and(|v| v == "1") {
        panic!("{what} needs `{tool}`, which does not run (IG_REQUIRE_TOOLS=1)");
    }
    let _ = writeln!(
        std::io::stderr(),
        "skipped {what}: `{tool}` is not installed"
    );
    false
}
