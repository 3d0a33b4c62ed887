//! Generates the C header from `src/ffi` with cbindgen into OUT_DIR (a test compares it with the
//! committed `include/intruder_gate.h`; `IG_UPDATE_HEADER=1 cargo build` rewrites that), and a
//! pkg-config file next to the built library so C/C++ builds can find it.

use std::path::{Path, PathBuf};

fn main() {
    let root = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").unwrap());
    let out = PathBuf::from(std::env::var("OUT_DIR").unwrap());
    println!("cargo:rerun-if-changed=cbindgen.toml");
    println!("cargo:rerun-if-changed=src/ffi");
    println!("cargo:rerun-if-env-changed=IG_UPDATE_HEADER");

    let config = cbindgen::Config::from_file(root.join("cbindgen.toml")).expect("cbindgen.toml");
    // cbindgen follows the `mod` items of src/ffi/mod.rs into the other files.
    let builder = cbindgen::Builder::new()
        .with_config(config)
        .with_src(root.join("src/ffi/mod.rs"));
    let header = out.join("intruder_gate.h");
    builder
        .generate()
        .expect("cbindgen failed on src/ffi")
        .write_to_file(&header);
    if std::env::var_os("IG_UPDATE_HEADER").is_some_and(|v| v == "1") {
        std::fs::copy(&header, root.join("include/intruder_gate.h")).expect("include/");
    }

    // OUT_DIR is <target>/<profile>/build/<pkg>-<hash>/out: the library lands in <profile>.
    let profile_dir = out.ancestors().nth(3).expect("profile dir");
    write_pkg_config(profile_dir, &root.join("include"));
}

fn write_pkg_config(libdir: &Path, includedir: &Path) {
    let pc = format!(
        "libdir={}\nincludedir={}\n\nName: intruder_gate\n\
         Description: Screens LoRA adapters for intruder dimensions (C ABI)\n\
         Version: {}\nLibs: -L${{libdir}} -lintruder_gate\n\
         Libs.private: -lpthread -ldl -lm\nCflags: -I${{includedir}}\n",
        libdir.display(),
        includedir.display(),
        std::env::var("CARGO_PKG_VERSION").unwrap()
    );
    std::fs::write(libdir.join("intruder_gate.pc"), pc).expect("write intruder_gate.pc");
}
