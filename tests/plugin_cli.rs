//! `sluice plugin validate`: accepts real components, explains refusals.

mod support;

use std::process::Command;

use support::{component, patched};

fn validate(path: &std::path::Path) -> (bool, String) {
    sluice(&["plugin", "validate", &path.to_string_lossy()])
}

/// Run the binary; whether it succeeded, and its stdout + stderr.
fn sluice(args: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_sluice"))
        .args(args)
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success(), text)
}

#[test]
fn built_in_plugins_validate() {
    let dir = tempfile::tempdir().unwrap();
    for name in [
        "request-shaper",
        "rate-limit",
        "context-cap",
        "thinking-policy",
        "output-validator",
    ] {
        let f = dir.path().join(format!("{name}.wasm"));
        std::fs::write(&f, component(name)).unwrap();
        let (ok, text) = validate(&f);
        assert!(ok, "{text}");
        assert!(
            text.contains(&format!("ok: {name} ")) && text.contains("sha256"),
            "{text}"
        );
    }
}

#[test]
fn refusals_say_what_is_wrong() {
    let dir = tempfile::tempdir().unwrap();
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        (
            "garbage.wasm",
            b"this is not wasm".to_vec(),
            "not a WebAssembly component",
        ),
        ("core.wasm", b"\0asm\x01\0\0\0".to_vec(), "core module"),
        (
            "old.wasm",
            patched(
                patched(
                    component("hostile"),
                    b"sluice:policy/host@0.2.0",
                    b"sluice:policy/host@0.1.0",
                ),
                b"sluice:policy/types@0.2.0",
                b"sluice:policy/types@0.1.0",
            ),
            "sluice:policy/host@0.1.0",
        ),
        (
            "future.wasm",
            patched(
                patched(
                    component("hostile"),
                    b"sluice:policy/host@0.2.0",
                    b"sluice:policy/host@9.0.0",
                ),
                b"sluice:policy/types@0.2.0",
                b"sluice:policy/types@9.0.0",
            ),
            "sluice:policy/host@9.0.0",
        ),
        (
            "other-world.wasm",
            patched(component("hostile"), b"on-request", b"on-rekuest"),
            "does not fit the sluice:policy",
        ),
    ];
    for (name, bytes, expected) in cases {
        let f = dir.path().join(name);
        std::fs::write(&f, bytes).unwrap();
        let (ok, text) = validate(&f);
        assert!(!ok, "{name} accepted: {text}");
        assert!(
            text.contains(expected),
            "{name}: expected {expected:?} in {text}"
        );
    }
    let (ok, text) = validate(&dir.path().join("missing.wasm"));
    assert!(!ok && text.contains("No such file"), "{text}");
}

#[test]
fn a_refused_config_fails_validation_with_the_plugins_message() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("context-cap.wasm");
    std::fs::write(&f, component("context-cap")).unwrap();
    let f = f.to_string_lossy();

    let (ok, text) = sluice(&[
        "plugin",
        "validate",
        &f,
        "--config",
        r#"{"max_input_tokens": "lots"}"#,
    ]);
    assert!(!ok, "{text}");
    assert!(
        text.contains(r#"the plugin refused its config: max_input_tokens: invalid type: string "lots", expected u32"#),
        "{text}"
    );

    let (ok, text) = sluice(&[
        "plugin",
        "validate",
        &f,
        "--config",
        r#"{"max_input_tokens": 32768}"#,
    ]);
    assert!(ok && text.contains("ok: context-cap "), "{text}");
}

/// `sluice plugin build` on the template: a real cargo build for wasm, then
/// the component validates and behaves as its config says.
#[test]
fn the_template_builds_into_a_component_that_validates() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("my.wasm");
    // Under this build's target directory, not in the source tree; kept
    // between runs, so only the first build is slow.
    let target = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("plugin-template");
    let built = Command::new(env!("CARGO_BIN_EXE_sluice"))
        .args(["plugin", "build"])
        .arg(root.join("plugins/template"))
        .arg("--out")
        .arg(&out)
        .env("CARGO_TARGET_DIR", &target)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&built.stdout);
    assert!(
        built.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&built.stderr)
    );
    assert!(
        stdout.starts_with(&format!("built {}\n", out.display()))
            && stdout.contains("ok: my-policy 0.1.0")
            && stdout.contains("sha256")
            && stdout.contains("hooks: on-request"),
        "{stdout}"
    );
    assert!(
        !root.join("plugins/template/target").exists(),
        "the build used CARGO_TARGET_DIR"
    );

    let (ok, text) = validate(&out);
    assert!(ok && text.contains("ok: my-policy "), "{text}");
    let out = out.to_string_lossy();
    let (ok, text) = sluice(&[
        "plugin",
        "validate",
        &out,
        "--config",
        r#"{"blocked_words": ["secret", ""]}"#,
    ]);
    assert!(!ok, "{text}");
    assert!(
        text.contains("the plugin refused its config: blocked_words[1]: must not be empty"),
        "{text}"
    );
}

#[test]
fn plugin_build_explains_what_it_cannot_build() {
    let dir = tempfile::tempdir().unwrap();
    let (ok, text) = sluice(&["plugin", "build", &dir.path().to_string_lossy()]);
    assert!(!ok && text.contains("no Cargo.toml here"), "{text}");

    std::fs::write(
        dir.path().join("Cargo.toml"),
        "[package]\nname = \"not-a-plugin\"\nversion = \"0.1.0\"\nedition = \"2024\"\n[workspace]\n",
    )
    .unwrap();
    std::fs::create_dir(dir.path().join("src")).unwrap();
    std::fs::write(dir.path().join("src/lib.rs"), "").unwrap();
    let (ok, text) = sluice(&["plugin", "build", &dir.path().to_string_lossy()]);
    assert!(!ok && text.contains("does not build a cdylib"), "{text}");
}
