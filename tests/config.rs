//! `sluice check-config`: valid files pass, every problem is reported with
//! its field path, and the shipped example stays valid.

use std::process::Command;

fn check(path: &std::path::Path) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_sluice"))
        .arg("check-config")
        .arg(path)
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success(), text)
}

#[test]
fn shipped_example_is_valid() {
    let dir = tempfile::tempdir().unwrap();
    let example = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/deploy/sluice.example.toml"
    ))
    .unwrap();
    let cfg = dir.path().join("sluice.toml");
    std::fs::write(&cfg, example).unwrap();
    sluice::server::tls::generate_self_signed(&dir.path().join("certs")).unwrap();
    let (ok, text) = check(&cfg);
    assert!(ok, "{text}");
    assert!(text.contains("2 pool(s), 2 tenant(s)"), "{text}");
}

#[test]
fn every_problem_is_reported_with_its_path() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("bad.toml");
    std::fs::write(
        &cfg,
        r#"
[server]
https = { listen = "127.0.0.1:8443", cert = "missing.pem", key = "missing-key.pem" }

[limits]
max_body_bytes = 0

[[pools]]
name = "p"
endpoints = ["ftp://x", "https://engine:8000"]
models = []

[[pools]]
name = "p"
endpoints = ["http://a:1", "http://b:1"]
models = ["m"]

[[tenants]]
id = "Bad Id"
deployment = "dedicated-gpu"
pool = "p"
[[tenants.api_keys]]
id = "k"
sha256 = "nothex"

[[tenants]]
id = "t2"
deployment = "serverless"
pool = "nope"
"#,
    )
    .unwrap();
    let (ok, text) = check(&cfg);
    assert!(!ok);
    for expected in [
        "server.https.cert",
        "server.https.key",
        "limits.max_body_bytes",
        "pools[0].endpoints[0]",
        "pools[0].endpoints[1]: \"https://engine:8000\": https engine endpoints are not supported",
        "pools[0].models",
        "pools[1].name: duplicate pool name",
        "tenants[0].id",
        "tenants[0].api_keys[0].sha256",
        "tenants[1].pool: no pool named \"nope\"",
        "tenants[1].api_keys: needs at least one key",
    ] {
        assert!(text.contains(expected), "missing {expected:?} in:\n{text}");
    }
}

#[test]
fn unknown_fields_and_bad_values_are_parse_errors_with_location() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("typo.toml");
    std::fs::write(
        &cfg,
        "[server]\nhttp = \"127.0.0.1:8080\"\n\n[limits]\nmax_conections = 5\n",
    )
    .unwrap();
    let (ok, text) = check(&cfg);
    assert!(!ok);
    assert!(
        text.contains("max_conections") && text.contains("line 5"),
        "{text}"
    );

    std::fs::write(&cfg, "[server]\nhttp = \"127.0.0.1:8080\"\n[[pools]]\nname = \"p\"\nendpoints = [\"http://a:1\"]\nmodels = [\"m\"]\nttft_timeout = \"soon\"\n").unwrap();
    let (ok, text) = check(&cfg);
    assert!(!ok);
    assert!(
        text.contains("ttft_timeout") || text.contains("line 7"),
        "{text}"
    );
}

#[test]
fn prices_are_checked() {
    use sluice::config::Config;
    let base = "[server]\nhttp = \"127.0.0.1:8080\"\n[[pools]]\nname = \"p\"\nendpoints = [\"http://a:1\"]\nmodels = [\"m\", \"n\"]\n";
    let price = |model: &str, hit: &str| {
        format!(
            "[[prices]]\nmodel = {model:?}\ninput_cache_hit_per_million = {hit}\ninput_cache_miss_per_million = 0.28\noutput_per_million = 0.42\n"
        )
    };
    let issues = |text: &str| -> Vec<String> {
        Config::parse(text, std::path::Path::new("."))
            .unwrap()
            .validate()
            .iter()
            .map(ToString::to_string)
            .collect()
    };
    assert!(issues(base).is_empty());
    assert!(issues(&(base.to_owned() + &price("m", "0.028") + &price("n", "0"))).is_empty());
    let text = base.to_owned()
        + &price("m", "0.028")
        + &price("m", "0.028")
        + &price("gpt-x", "0.1")
        + &price("n", "-1")
        + &price("n", "nan");
    let found = issues(&text);
    for expected in [
        "prices[1].model: model \"m\" is priced twice",
        "prices[2].model: no pool serves a model \"gpt-x\"",
        "prices[3].input_cache_hit_per_million: must be a non-negative number of USD, is -1",
        "prices[4].input_cache_hit_per_million: must be a non-negative number of USD, is NaN",
        "prices[4].model: model \"n\" is priced twice",
    ] {
        assert!(
            found.iter().any(|i| i == expected),
            "missing {expected:?} in {found:?}"
        );
    }
    assert_eq!(found.len(), 5, "{found:?}");
    // Strict: a misspelt field is a parse error, every price field is required.
    let typo = base.to_owned() + &price("m", "0.028").replace("output_per", "outptu_per");
    let err = Config::parse(&typo, std::path::Path::new(".")).unwrap_err();
    assert!(err.contains("outptu_per_million"), "{err}");
    let missing = base.to_owned() + "[[prices]]\nmodel = \"m\"\n";
    let err = Config::parse(&missing, std::path::Path::new(".")).unwrap_err();
    assert!(err.contains("input_cache_hit_per_million"), "{err}");
}

#[test]
fn dedicated_pools_serve_one_tenant() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("shared.toml");
    let key = |s: &str| sluice::config::hash_key(s);
    std::fs::write(
        &cfg,
        format!(
            r#"
[server]
http = "127.0.0.1:8080"
[[pools]]
name = "gpu"
endpoints = ["http://a:1", "http://b:1"]
models = ["m"]
[[tenants]]
id = "a"
deployment = "dedicated-gpu"
pool = "gpu"
[[tenants.api_keys]]
id = "k"
sha256 = "{}"
[[tenants]]
id = "b"
deployment = "serverless"
pool = "gpu"
[[tenants.api_keys]]
id = "k"
sha256 = "{}"
"#,
            key("a"),
            key("b")
        ),
    )
    .unwrap();
    let (ok, text) = check(&cfg);
    assert!(!ok);
    assert!(
        text.contains("is dedicated-gpu for tenant \"a\" but also used by \"b\""),
        "{text}"
    );
    assert!(
        text.contains("must have exactly one endpoint, has 2"),
        "{text}"
    );
}

#[test]
fn extra_pools_cannot_reach_into_a_dedicated_pool() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("extra.toml");
    let key = |s: &str| sluice::config::hash_key(s);
    std::fs::write(
        &cfg,
        format!(
            r#"
[server]
http = "127.0.0.1:8080"
[[pools]]
name = "shared"
endpoints = ["http://a:1"]
models = ["m"]
[[pools]]
name = "acme-own"
endpoints = ["http://b:1"]
models = ["m"]
[[tenants]]
id = "acme"
deployment = "dedicated"
pool = "acme-own"
[[tenants.api_keys]]
id = "k"
sha256 = "{}"
[[tenants]]
id = "sneaky"
deployment = "serverless"
pool = "shared"
extra_pools = ["acme-own"]
[[tenants.api_keys]]
id = "k"
sha256 = "{}"
"#,
            key("a"),
            key("b")
        ),
    )
    .unwrap();
    let (ok, text) = check(&cfg);
    assert!(!ok);
    assert!(
        text.contains("is dedicated for tenant \"acme\" but also used by \"sneaky\""),
        "{text}"
    );
}
