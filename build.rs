//! Builds the WebAssembly plugins in `plugins/` (the built-in policies and the
//! hostile test fixtures) and turns each into a component, so that
//! `cargo build` / `cargo test` on a fresh machine need nothing but rustup.
//!
//! Steps: add the `wasm32-unknown-unknown` target when missing (automatic
//! rustup installs may be off), `cargo build` the plugin workspace for it in
//! a target directory of its own, then encode each core module as a
//! component with `wit-component`. The built-in plugins are embedded into the
//! binary; all components are also left in `$OUT_DIR/components` for tests.

use std::path::{Path, PathBuf};
use std::process::Command;

const WASM_TARGET: &str = "wasm32-unknown-unknown";

/// Built-in policies, embedded in the binary (crate name = plugin name).
const BUILTIN: &[&str] = &[
    "request-shaper",
    "rate-limit",
    "context-cap",
    "thinking-policy",
    "output-validator",
];

fn main() {
    let root = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").unwrap());
    let out = PathBuf::from(std::env::var("OUT_DIR").unwrap());
    println!("cargo:rerun-if-changed=plugins");
    println!("cargo:rerun-if-changed=wit");

    ensure_target();
    let target_dir = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target"))
        .join("plugins-wasm");
    build_plugins(&root.join("plugins"), &target_dir);

    let modules = target_dir.join(WASM_TARGET).join("release");
    let components = out.join("components");
    std::fs::create_dir_all(&components).unwrap();
    let mut built = Vec::new();
    for entry in std::fs::read_dir(&modules).expect("plugin build output") {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "wasm") {
            let name = path
                .file_stem()
                .unwrap()
                .to_string_lossy()
                .replace('_', "-");
            let component = componentize(&path);
            std::fs::write(components.join(format!("{name}.wasm")), component).unwrap();
            built.push(name);
        }
    }

    let mut table = String::from(
        "/// Built-in plugins: (name, component bytes).\npub static BUILTIN: &[(&str, &[u8])] = &[\n",
    );
    for name in BUILTIN {
        assert!(
            built.iter().any(|b| b == name),
            "built-in plugin {name} was not built"
        );
        table.push_str(&format!(
            "    ({name:?}, include_bytes!(concat!(env!(\"OUT_DIR\"), \"/components/{name}.wasm\"))),\n"
        ));
    }
    table.push_str("];\n");
    std::fs::write(out.join("builtin_plugins.rs"), table).unwrap();
    println!(
        "cargo:rustc-env=SLUICE_PLUGIN_COMPONENTS={}",
        components.display()
    );
}

fn ensure_target() {
    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    let libdir = Command::new(&rustc)
        .args(["--print", "target-libdir", "--target", WASM_TARGET])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| PathBuf::from(String::from_utf8_lossy(&o.stdout).trim()));
    if libdir.as_deref().is_some_and(Path::exists) {
        return;
    }
    let status = Command::new("rustup")
        .args(["target", "add", WASM_TARGET])
        .status()
        .expect("rustup is needed to add the wasm32-unknown-unknown target");
    assert!(status.success(), "`rustup target add {WASM_TARGET}` failed");
}

fn build_plugins(workspace: &Path, target_dir: &Path) {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(workspace)
        .args(["build", "--release", "--workspace", "--target", WASM_TARGET])
        .arg("--target-dir")
        .arg(target_dir);
    if workspace.join("Cargo.lock").exists() {
        cmd.arg("--locked");
    }
    // The outer build's settings are for the host, not for the guests.
    for var in [
        "CARGO_TARGET_DIR",
        "CARGO_BUILD_TARGET",
        "RUSTFLAGS",
        "CARGO_ENCODED_RUSTFLAGS",
        "CARGO_BUILD_RUSTFLAGS",
        "RUSTC_WORKSPACE_WRAPPER",
    ] {
        cmd.env_remove(var);
    }
    let out = cmd.output().expect("cargo runs");
    if !out.status.success() {
        panic!(
            "building the plugins failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

fn componentize(module: &Path) -> Vec<u8> {
    let bytes = std::fs::read(module).unwrap();
    wit_component::ComponentEncoder::default()
        .module(&bytes)
        .and_then(|e| e.validate(true).encode())
        .unwrap_or_else(|e| panic!("{}: not a sluice:policy module: {e:#}", module.display()))
}
