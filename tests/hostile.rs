//! Hostile plugins (built from `plugins/fixtures/hostile`) are cut off, one
//! call at a time, while the proxy and other tenants carry on.

mod support;

use serde_json::Value;
use support::*;

const EVIL: &str = "sk-test-evil";
const GOOD: &str = "sk-test-good";

fn fixture() -> String {
    format!("{}/hostile.wasm", env!("SLUICE_PLUGIN_COMPONENTS"))
}

/// The deadline leaves room for the memory modes to reach the 16 MiB cap
/// first, even on a loaded machine; the loop modes run into the deadline.
async fn setup(mode: &str, failure: &str) -> (sluice::sim::SimHandle, Gateway) {
    let engine = sim_engine(&["--ttft", "1", "--tpot", "1"]).await;
    let body = format!(
        "[plugin_host]\ntimeout = \"100ms\"\nmax_memory = 16777216\n{}{}\n[[tenants.plugins]]\npath = {:?}\nconfig = {{ mode = \"{mode}\" }}\nfailure = \"{failure}\"\n{}\n[[tenants.plugins]]\nbuiltin = \"rate-limit\"\nconfig = {{ requests_per_minute = 100000 }}\n",
        pool("p", &[url(&engine)], ""),
        tenant("evil", "p", EVIL, ""),
        fixture(),
        tenant("good", "p", GOOD, ""),
    );
    (engine, Gateway::start(&body).await)
}

async fn ask(gw: &Gateway, key: &str) -> (u16, Value) {
    let resp = http_client()
        .post(gw.http_url("/v1/chat/completions"))
        .bearer_auth(key)
        .json(&chat("deepseek-v4-flash", false))
        .send()
        .await
        .unwrap();
    (resp.status().as_u16(), resp.json().await.unwrap())
}

#[tokio::test]
async fn every_hostile_mode_is_cut_off_and_neighbours_are_untouched() {
    let cases = [
        ("loop", "plugin_timeout"),
        ("host-call-loop", "plugin_timeout"),
        ("grow-memory", "plugin_out_of_memory"),
        ("recurse", "plugin_trap"),
        ("trap", "plugin_trap"),
        ("huge-output", "plugin_out_of_memory"),
    ];
    for (mode, code) in cases {
        let (_engine, gw) = setup(mode, "fail-closed").await;
        // The hostile tenant and a well-behaved one, at the same time.
        let evil = async {
            let mut out = Vec::new();
            for _ in 0..3 {
                out.push(ask(&gw, EVIL).await);
            }
            out
        };
        let good = async {
            let mut statuses = Vec::new();
            for _ in 0..20 {
                statuses.push(ask(&gw, GOOD).await.0);
            }
            statuses
        };
        let (evil, good) = tokio::join!(evil, good);
        for (status, body) in evil {
            assert_eq!(status, 500, "{mode}: {body}");
            assert_eq!(body["error"]["layer"], "plugin", "{mode}: {body}");
            assert_eq!(body["error"]["code"], code, "{mode}: {body}");
            let msg = body["error"]["message"].as_str().unwrap();
            assert!(msg.contains("hostile"), "{mode}: names the plugin: {msg}");
        }
        assert!(
            good.iter().all(|s| *s == 200),
            "{mode}: neighbour saw {good:?}"
        );
        // And the proxy is alive afterwards.
        assert_eq!(ask(&gw, GOOD).await.0, 200);
        gw.shutdown().await;
    }
}

#[tokio::test]
async fn fail_open_goes_on_and_fail_closed_refuses() {
    let (_e, gw) = setup("trap", "fail-open").await;
    let (status, body) = ask(&gw, EVIL).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["object"], "chat.completion");
    gw.shutdown().await;

    let (_e, gw) = setup("trap", "fail-closed").await;
    assert_eq!(ask(&gw, EVIL).await.0, 500);
    gw.shutdown().await;
}

#[tokio::test]
async fn a_plugin_that_keeps_crashing_is_suspended() {
    let (_e, gw) = setup("trap", "fail-closed").await;
    for _ in 0..5 {
        let (status, body) = ask(&gw, EVIL).await;
        assert_eq!(
            (status, body["error"]["code"].as_str()),
            (500, Some("plugin_trap"))
        );
    }
    // The breaker is open: no more calls into the plugin for a while.
    let resp = http_client()
        .post(gw.http_url("/v1/chat/completions"))
        .bearer_auth(EVIL)
        .json(&chat("deepseek-v4-flash", false))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 503);
    assert!(resp.headers().contains_key("retry-after"));
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["error"]["code"], "plugin_suspended");
    assert_eq!(body["error"]["layer"], "plugin");
    assert_eq!(ask(&gw, GOOD).await.0, 200);
    gw.shutdown().await;
}

#[tokio::test]
async fn a_well_behaved_instance_is_reused_and_keeps_serving() {
    let (_e, gw) = setup("ok", "fail-closed").await;
    for _ in 0..50 {
        assert_eq!(ask(&gw, EVIL).await.0, 200);
    }
    gw.shutdown().await;
}
