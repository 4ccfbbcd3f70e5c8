//! A new user's way, with the real binary: run the demo, build a plugin from
//! the kit's template, upload it with the CLI, and see the next request obey
//! it; then list, roll back, edit the chain, and find it all in the audit log.

mod support;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};

const BIN: &str = env!("CARGO_BIN_EXE_sluice");

struct Demo {
    child: Child,
    http: String,
    ops: String,
    operator_key: String,
    log: Arc<Mutex<String>>,
}

impl Drop for Demo {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `sluice demo` on ephemeral ports; reads the addresses and the operator
/// key from its banner.
fn start_demo(data_dir: &Path) -> Demo {
    let mut child = Command::new(BIN)
        .args([
            "demo",
            "--http",
            "127.0.0.1:0",
            "--https",
            "127.0.0.1:0",
            "--ops",
            "127.0.0.1:0",
            "--data-dir",
        ])
        .arg(data_dir)
        .env("SLUICE_LOG", "info")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let log = Arc::new(Mutex::new(String::new()));
    let stderr = child.stderr.take().unwrap();
    let sink = log.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let mut l = sink.lock().unwrap();
            l.push_str(&line);
            l.push('\n');
        }
    });
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let (mut http, mut ops, mut operator_key) = (None, None, None);
    for line in lines.by_ref() {
        let line = line.unwrap();
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.first() {
            Some(&"http:") => http = Some(words[1].to_owned()),
            Some(&"admin:") => {
                ops = Some(words[1].trim_end_matches("/admin/v1").to_owned());
                operator_key = words.last().map(|k| k.to_string());
            }
            Some(&"try:") => break,
            _ => {}
        }
    }
    assert!(http.is_some(), "no banner; log: {}", log.lock().unwrap());
    // Keep draining stdout so the demo never blocks on a full pipe.
    std::thread::spawn(move || for _ in lines {});
    Demo {
        child,
        http: http.unwrap(),
        ops: ops.unwrap(),
        operator_key: operator_key.unwrap(),
        log,
    }
}

/// Run `sluice <args>` against the demo's admin API with `key`.
fn cli(demo: &Demo, key: &str, args: &[&str]) -> (bool, String) {
    let out = Command::new(BIN)
        .args(args)
        .env("SLUICE_ADMIN_URL", &demo.ops)
        .env("SLUICE_ADMIN_KEY", key)
        .env_remove("SLUICE_TENANT")
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success(), text)
}

fn chat(demo: &Demo, content: &str) -> (u16, serde_json::Value) {
    let body = serde_json::json!({"model": "v4", "max_tokens": 4,
        "messages": [{"role": "user", "content": content}]});
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let resp = support::http_client()
            .post(format!("{}/v1/chat/completions", demo.http))
            .bearer_auth("sk-sluice-demo")
            .json(&body)
            .send()
            .await
            .unwrap();
        (resp.status().as_u16(), resp.json().await.unwrap())
    })
}

const ADMIN: &str = "sk-sluice-demo-admin";

#[test]
fn a_plugin_from_the_template_goes_live_on_the_demo_with_the_cli() {
    let dir = tempfile::tempdir().unwrap();
    let wasm = dir.path().join("my-policy.wasm");

    // Build the template as a user would.
    let template = Path::new(env!("CARGO_MANIFEST_DIR")).join("plugins/template");
    let target = Path::new(env!("CARGO_TARGET_TMPDIR")).join("plugin-template");
    let out = Command::new(BIN)
        .args(["plugin", "build"])
        .arg(&template)
        .arg("--out")
        .arg(&wasm)
        .env("CARGO_TARGET_DIR", &target)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    let demo = start_demo(&dir.path().join("demo"));
    assert_eq!(chat(&demo, "say forbidden").0, 200);

    // Upload and append to the demo's chain (the five built-ins stay).
    let wasm_arg = wasm.to_str().unwrap();
    let (ok, text) = cli(
        &demo,
        ADMIN,
        &[
            "plugin",
            "upload",
            wasm_arg,
            "--chain",
            "--config",
            r#"{"blocked_words": ["forbidden"]}"#,
        ],
    );
    assert!(ok, "{text}");
    assert!(text.contains("uploaded my-policy v1"), "{text}");
    assert!(
        text.contains("built-in rate-limit") && text.contains("5. my-policy v1"),
        "{text}"
    );

    // The next request obeys it; others still pass the whole chain.
    let (status, body) = chat(&demo, "please say forbidden");
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["error"]["code"], "blocked_word", "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("forbidden"),
        "{body}"
    );
    assert_eq!(chat(&demo, "hello").0, 200);

    // A second version with a config the plugin refuses never goes live.
    let (ok, text) = cli(
        &demo,
        ADMIN,
        &[
            "plugin",
            "chain",
            "add",
            "my-policy",
            "--config",
            r#"{"blocked_words": "all"}"#,
        ],
    );
    assert!(!ok, "{text}");
    assert!(
        text.contains("422 plugin_config_refused") && text.contains("blocked_words"),
        "{text}"
    );

    let (ok, text) = cli(&demo, ADMIN, &["plugin", "list"]);
    assert!(ok, "{text}");
    assert!(
        text.contains("my-policy  (in chain)") && text.contains("* v1"),
        "{text}"
    );

    let (ok, text) = cli(&demo, ADMIN, &["plugin", "rollback", "my-policy"]);
    assert!(!ok && text.contains("409 no_earlier_version"), "{text}");
    let (ok, text) = cli(&demo, ADMIN, &["plugin", "delete", "my-policy"]);
    assert!(!ok && text.contains("409 plugin_in_chain"), "{text}");

    let (ok, text) = cli(&demo, ADMIN, &["plugin", "chain", "remove", "my-policy"]);
    assert!(ok && !text.contains("my-policy"), "{text}");
    assert_eq!(chat(&demo, "please say forbidden").0, 200);
    let (ok, text) = cli(&demo, ADMIN, &["plugin", "delete", "my-policy"]);
    assert!(ok && text.contains("my-policy: deleted"), "{text}");
    let (ok, text) = cli(&demo, ADMIN, &["plugin", "chain", "reset"]);
    assert!(ok && text.contains("from config"), "{text}");

    // An operator key must name the tenant; a wrong key is refused.
    let (ok, text) = cli(&demo, &demo.operator_key, &["plugin", "list"]);
    assert!(!ok && text.contains("--tenant"), "{text}");
    let (ok, text) = cli(
        &demo,
        &demo.operator_key,
        &["plugin", "list", "--tenant", "demo"],
    );
    assert!(
        ok && text.contains("no plugins uploaded for tenant demo"),
        "{text}"
    );
    let (ok, text) = cli(&demo, "sk-wrong", &["plugin", "list", "--tenant", "demo"]);
    assert!(!ok && text.contains("401 invalid_admin_key"), "{text}");
    let (ok, text) = cli(&demo, ADMIN, &["plugin", "list", "--tenant", "ghost"]);
    assert!(!ok && text.contains("404 tenant_not_found"), "{text}");

    // Every change and refusal is in the audit log, with the sha256.
    let sha = {
        use sha2::Digest;
        hex::encode(sha2::Sha256::digest(std::fs::read(&wasm).unwrap()))
    };
    let log = demo.log.lock().unwrap().clone();
    let audit: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("sluice::audit"))
        .collect();
    let upload = audit
        .iter()
        .find(|l| l.contains("action=\"upload\""))
        .unwrap_or_else(|| panic!("no upload audit line in:\n{log}"));
    assert!(
        upload.contains(&sha)
            && upload.contains("tenant=\"demo\"")
            && upload.contains("actor=\"demo-admin\""),
        "{upload}"
    );
    for action in ["set-chain", "rollback", "delete", "reset-chain"] {
        assert!(
            audit
                .iter()
                .any(|l| l.contains(&format!("action=\"{action}\""))),
            "{action} not audited:\n{log}"
        );
    }
    // Refusals too: a config the plugin refused, a wrong key, another tenant.
    for (what, code) in [
        ("set-chain", "plugin_config_refused"),
        ("read", "invalid_admin_key"),
        ("read", "tenant_not_found"),
    ] {
        assert!(
            audit.iter().any(|l| l.contains("outcome=\"refused\"")
                && l.contains(&format!("action=\"{what}\""))
                && l.contains(&format!("code=\"{code}\""))),
            "{what}/{code} refusal not audited:\n{log}"
        );
    }
    assert!(
        audit
            .iter()
            .any(|l| l.contains("tenant=\"ghost\"") && l.contains("actor=\"demo-admin\"")),
        "{log}"
    );
}
