//! Trace export over gRPC (OTLP/gRPC to an in-process collector). The HTTP
//! path is `traces.rs`; a hung collector is `traces_stalled.rs` (the tracing
//! subscriber is global, so each exporter setup needs a process of its own).

mod support;

use std::time::Duration;

use serde_json::json;
use support::*;

const KEY: &str = "sk-test-acme";

fn settings(
    endpoint: String,
    protocol: sluice::config::OtlpProtocol,
    queue: usize,
) -> sluice::telemetry::otel::Settings {
    sluice::telemetry::otel::Settings {
        endpoint,
        protocol,
        service_name: "sluice-test".into(),
        queue,
        timeout: Duration::from_secs(30),
    }
}

async fn gateway() -> (sluice::sim::SimHandle, Gateway) {
    let engine = sim_engine(&[]).await;
    let gw = Gateway::start(&format!(
        "{}{}",
        pool("p", &[url(&engine)], ""),
        tenant("acme", "p", KEY, "")
    ))
    .await;
    (engine, gw)
}

async fn ok_request(gw: &Gateway) -> String {
    let resp = http_client()
        .post(gw.http_url("/v1/chat/completions"))
        .bearer_auth(KEY)
        .json(&json!({"model": "deepseek-v4-flash", "max_tokens": 3,
            "messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let tp = resp.headers()["traceparent"].to_str().unwrap().to_owned();
    tp.split('-').nth(1).unwrap().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_export_reaches_the_collector() {
    let (collector, _http, grpc) = support::otlp::start();
    let provider = sluice::telemetry::init(Some(&settings(
        format!("http://{grpc}"),
        sluice::config::OtlpProtocol::Grpc,
        4096,
    )))
    .unwrap();
    let (_engine, gw) = gateway().await;
    let trace = ok_request(&gw).await;
    let spans = collector
        .wait_for(&trace, |s| s.name == "POST /v1/chat/completions")
        .await;
    assert!(
        spans
            .iter()
            .any(|s| s.name == "chat deepseek-v4-flash" && s.kind == 3),
        "{spans:#?}"
    );
    drop(provider);
}
