//! `sluice plugin build DIR`: a Rust plugin crate (a copy of
//! `plugins/template`) into a `sluice:policy` component, validated.
//!
//! Steps, as `build.rs` does for the built-in plugins:
//! 1. `cargo metadata` names the crate and checks it is a `cdylib`;
//! 2. the `wasm32-unknown-unknown` target is added with rustup when missing
//!    (automatic rustup installs may be off);
//! 3. `cargo build --release --target wasm32-unknown-unknown`, in cargo's
//!    usual target directory: the crate's own `DIR/target` (the template is
//!    a workspace of its own), or `CARGO_TARGET_DIR` when that is set;
//! 4. the core module is encoded as a component with `wit-component`;
//! 5. it is written (default `DIR/<crate name>.wasm`) and validated like
//!    `sluice plugin validate`.
//!
//! `cargo`, `rustc` and `rustup` are the ones on `PATH`, run in `DIR`, so a
//! `rust-toolchain.toml` there picks the toolchain.

use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{Context, bail};
use serde_json::Value;

pub const WASM_TARGET: &str = "wasm32-unknown-unknown";

/// Build the plugin crate in `dir`, write the component to `out` (default
/// `dir/<crate name>.wasm`), validate it with `config` (JSON). Returns the
/// report: the path written, then `validate`'s (name, size, sha256, hooks).
pub fn build(dir: &Path, out: Option<&Path>, config: &str) -> anyhow::Result<String> {
    let manifest = dir.join("Cargo.toml");
    if !manifest.is_file() {
        bail!(
            "no Cargo.toml here; give the folder of a plugin crate (start from a copy of plugins/template)"
        );
    }
    let manifest = manifest
        .canonicalize()
        .with_context(|| format!("cannot resolve {}", manifest.display()))?;
    // Fail early on a config that is not JSON, before a build.
    serde_json::from_str::<Value>(config)
        .map_err(|e| anyhow::anyhow!("--config is not JSON: {e}"))?;

    let name = crate_name(dir, &manifest)?;
    ensure_wasm_target(dir)?;
    let module = compile(dir, &manifest)?;
    let bytes =
        std::fs::read(&module).with_context(|| format!("cannot read {}", module.display()))?;
    let component = componentize(&bytes)?;

    let out = out
        .map(Path::to_owned)
        .unwrap_or_else(|| dir.join(format!("{name}.wasm")));
    if let Some(parent) = out.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("cannot create {}", parent.display()))?;
    }
    std::fs::write(&out, &component).with_context(|| format!("cannot write {}", out.display()))?;
    let report = super::validate(&out, config)
        .with_context(|| format!("{} was built but does not validate", out.display()))?;
    Ok(format!("built {}\n{report}", out.display()))
}

/// A command from `PATH`, run in the plugin's folder.
fn tool(name: &str, dir: &Path) -> Command {
    let mut cmd = Command::new(name);
    cmd.current_dir(dir);
    cmd
}

fn run_failed(name: &str, e: std::io::Error) -> anyhow::Error {
    if e.kind() == std::io::ErrorKind::NotFound {
        anyhow::anyhow!("`{name}` is not on PATH; install Rust with rustup (https://rustup.rs)")
    } else {
        anyhow::anyhow!("cannot run `{name}`: {e}")
    }
}

/// The package whose manifest is `manifest`; it must build a `cdylib`.
fn crate_name(dir: &Path, manifest: &Path) -> anyhow::Result<String> {
    let out = tool("cargo", dir)
        .args([
            "metadata",
            "--no-deps",
            "--format-version",
            "1",
            "--manifest-path",
        ])
        .arg(manifest)
        .stderr(Stdio::inherit())
        .output()
        .map_err(|e| run_failed("cargo", e))?;
    if !out.status.success() {
        bail!(
            "`cargo metadata` failed ({}); its messages are above",
            out.status
        );
    }
    let meta: Value =
        serde_json::from_slice(&out.stdout).context("`cargo metadata` printed no JSON")?;
    let package = meta["packages"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|p| p["manifest_path"].as_str().map(Path::new) == Some(manifest))
        .context(
            "Cargo.toml has no [package] (a workspace?); give the plugin crate's own folder",
        )?;
    let name = package["name"].as_str().unwrap_or_default().to_owned();
    let cdylib = package["targets"]
        .as_array()
        .into_iter()
        .flatten()
        .any(|t| crate_types(t).any(|c| c == "cdylib"));
    if !cdylib {
        bail!(
            "package {name} does not build a cdylib; add `[lib] crate-type = [\"cdylib\"]` to its Cargo.toml"
        );
    }
    Ok(name)
}

fn crate_types(target: &Value) -> impl Iterator<Item = &str> {
    target["crate_types"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
}

/// Add the wasm target with rustup when the toolchain lacks it.
fn ensure_wasm_target(dir: &Path) -> anyhow::Result<()> {
    let libdir = tool("rustc", dir)
        .args(["--print", "target-libdir", "--target", WASM_TARGET])
        .output()
        .map_err(|e| run_failed("rustc", e))?;
    let installed = libdir.status.success()
        && Path::new(String::from_utf8_lossy(&libdir.stdout).trim()).exists();
    if installed {
        return Ok(());
    }
    eprintln!("adding the {WASM_TARGET} target: rustup target add {WASM_TARGET}");
    let status = tool("rustup", dir)
        .args(["target", "add", WASM_TARGET])
        .status()
        .map_err(|e| run_failed("rustup", e))?;
    if !status.success() {
        bail!("`rustup target add {WASM_TARGET}` failed ({status})");
    }
    Ok(())
}

/// `cargo build` for wasm; the path of the crate's core module. Cargo's
/// progress and diagnostics go to stderr as usual; its JSON messages on
/// stdout name the artifact.
fn compile(dir: &Path, manifest: &Path) -> anyhow::Result<PathBuf> {
    let mut child = tool("cargo", dir)
        .args(["build", "--release", "--target", WASM_TARGET])
        .args([
            "--message-format",
            "json-render-diagnostics",
            "--manifest-path",
        ])
        .arg(manifest)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .map_err(|e| run_failed("cargo", e))?;
    let mut module = None;
    let stdout = child.stdout.take().expect("stdout is piped");
    for line in std::io::BufReader::new(stdout).lines() {
        let line = line.context("reading cargo's messages")?;
        let Ok(msg) = serde_json::from_str::<Value>(&line) else {
            continue;
        };
        let ours = msg["reason"] == "compiler-artifact"
            && msg["manifest_path"].as_str().map(Path::new) == Some(manifest)
            && crate_types(&msg["target"]).any(|c| c == "cdylib");
        if ours {
            module = msg["filenames"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(Value::as_str)
                .find(|f| f.ends_with(".wasm"))
                .map(PathBuf::from);
        }
    }
    let status = child.wait().context("waiting for cargo")?;
    if !status.success() {
        bail!("`cargo build` failed ({status}); its messages are above");
    }
    module.context("`cargo build` succeeded but named no .wasm module for this crate")
}

/// Encode a core module that carries the `sluice:policy` type information
/// (the kit's bindings put it there) as a component.
pub fn componentize(module: &[u8]) -> anyhow::Result<Vec<u8>> {
    wit_component::ComponentEncoder::default()
        .module(module)
        .and_then(|e| e.validate(true).encode())
        .map_err(|e| {
            anyhow::anyhow!(
                "the module is not a sluice:policy plugin (does it use sluice-plugin-kit and `export_plugin!`?): {e:#}"
            )
        })
}
