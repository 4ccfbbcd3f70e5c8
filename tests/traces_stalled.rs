//! A collector that accepts connections and never answers: requests go on
//! at full success, nothing waits for export, and the spans that do not fit
//! the bounded queue are dropped and counted.

mod support;

use std::time::Duration;

use serde_json::json;
use support::*;

const KEY: &str = "sk-test-acme";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_collector_neither_fails_nor_holds_requests() {
    // Accepts, reads nothing, answers nothing.
    let hung = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = hung.local_addr().unwrap();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for s in hung.incoming() {
            held.push(s);
        }
    });
    let settings = sluice::telemetry::otel::Settings {
        endpoint: format!("http://{addr}/v1/traces"),
        protocol: sluice::config::OtlpProtocol::HttpProtobuf,
        service_name: "sluice-test".into(),
        queue: 16,
        // Longer than this test: the export thread stays stuck in its first
        // request the whole time.
        timeout: Duration::from_secs(600),
    };
    let _provider = sluice::telemetry::init(Some(&settings)).unwrap();

    let engine = sim_engine(&[]).await;
    let gw = Gateway::start(&format!(
        "{}{}",
        pool("p", &[url(&engine)], ""),
        tenant("acme", "p", KEY, "")
    ))
    .await;
    let client = http_client();
    for _ in 0..40 {
        let resp = client
            .post(gw.http_url("/v1/chat/completions"))
            .bearer_auth(KEY)
            .json(&json!({"model": "deepseek-v4-flash", "max_tokens": 3,
                "messages": [{"role": "user", "content": "hi"}]}))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        resp.bytes().await.unwrap();
    }
    // 40 requests of several spans each went through a 16-span queue whose
    // only consumer is stuck: the rest were dropped, not waited for.
    assert_eq!(sluice::telemetry::otel::exported_spans(), 0);
    let dropped = sluice::telemetry::otel::dropped_spans();
    assert!(dropped >= 40, "dropped {dropped}");
    // And /metrics says so.
    let text = http_client()
        .get(format!("http://{}/metrics", gw.ops))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let line = text
        .lines()
        .find(|l| l.starts_with("sluice_otel_spans_dropped_total "))
        .unwrap_or_else(|| panic!("{text}"));
    let shown: u64 = line.rsplit(' ').next().unwrap().parse().unwrap();
    assert!(shown >= dropped, "{line}");
}
