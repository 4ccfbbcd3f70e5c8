//! Every failure of the foundation, seen from the client: status, OpenAI
//! error shape, layer and trace id.

mod support;

use std::time::Duration;

use futures_util::StreamExt;
use serde_json::{Value, json};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const KEY: &str = "sk-test-acme";

async fn gateway_over_sim(
    sim_flags: &[&str],
    pool_extra: &str,
    limits: &str,
) -> (sluice::sim::SimHandle, Gateway) {
    let engine = sim_engine(sim_flags).await;
    let body = format!("{limits}\n")
        + &pool("p", &[url(&engine)], pool_extra)
        + &tenant("acme", "p", KEY, "");
    (engine, Gateway::start(&body).await)
}

fn post(gw: &Gateway) -> reqwest::RequestBuilder {
    http_client().post(gw.http_url("/v1/chat/completions"))
}

#[tokio::test]
async fn missing_and_bad_keys_are_401_customer() {
    let (_e, gw) = gateway_over_sim(&[], "", "").await;
    let (s, e, _) = error_of(
        post(&gw)
            .json(&chat("deepseek-v4-flash", false))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(
        (s, e["layer"].as_str(), e["code"].as_str()),
        (401, Some("customer"), Some("missing_api_key"))
    );
    let (s, e, _) = error_of(
        post(&gw)
            .bearer_auth("sk-wrong")
            .json(&chat("deepseek-v4-flash", false))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(
        (s, e["type"].as_str(), e["layer"].as_str()),
        (401, Some("authentication_error"), Some("customer"))
    );
    gw.shutdown().await;
}

#[tokio::test]
async fn malformed_json_is_400_naming_the_position() {
    let (_e, gw) = gateway_over_sim(&[], "", "").await;
    let resp = post(&gw)
        .bearer_auth(KEY)
        .header("content-type", "application/json")
        .body("{\"model\": \"deepseek-v4-flash\",\n \"messages\": [}")
        .send()
        .await
        .unwrap();
    let (s, e, _) = error_of(resp).await;
    assert_eq!(s, 400);
    assert_eq!(e["code"], "invalid_json");
    assert_eq!(e["layer"], "customer");
    let m = e["message"].as_str().unwrap();
    assert!(m.contains("line 2 column"), "{m}");

    // Missing model: a data error, pointing at the field.
    let resp = post(&gw)
        .bearer_auth(KEY)
        .json(&json!({"messages": []}))
        .send()
        .await
        .unwrap();
    let (s, e, _) = error_of(resp).await;
    assert_eq!((s, e["param"].as_str()), (400, Some("model")));
    gw.shutdown().await;
}

#[tokio::test]
async fn deep_json_is_400() {
    let (_e, gw) = gateway_over_sim(&[], "", "[limits]\nmax_json_depth = 8").await;
    let deep = format!(
        "{{\"model\":\"deepseek-v4-flash\",\"x\":{}1{}}}",
        "[".repeat(20),
        "]".repeat(20)
    );
    let (s, e, _) = error_of(post(&gw).bearer_auth(KEY).body(deep).send().await.unwrap()).await;
    assert_eq!((s, e["code"].as_str()), (400, Some("json_too_deep")));
    gw.shutdown().await;
}

#[tokio::test]
async fn body_over_the_cap_is_413_with_and_without_content_length() {
    let (_e, gw) = gateway_over_sim(&[], "", "[limits]\nmax_body_bytes = 1024").await;
    let big = json!({"model": "deepseek-v4-flash", "messages": [{"role": "user", "content": "x".repeat(5000)}]});
    let (s, e, _) = error_of(post(&gw).bearer_auth(KEY).json(&big).send().await.unwrap()).await;
    assert_eq!(
        (s, e["code"].as_str(), e["layer"].as_str()),
        (413, Some("body_too_large"), Some("customer"))
    );
    // Chunked, no length announced: the cap holds while reading.
    let chunks =
        futures_util::stream::iter((0..10).map(|_| Ok::<_, std::io::Error>(vec![b' '; 500])));
    let resp = post(&gw)
        .bearer_auth(KEY)
        .body(reqwest::Body::wrap_stream(chunks))
        .send()
        .await
        .unwrap();
    let (s, _, _) = error_of(resp).await;
    assert_eq!(s, 413);
    gw.shutdown().await;
}

#[tokio::test]
async fn unknown_model_and_route_are_404() {
    let (_e, gw) = gateway_over_sim(&[], "", "").await;
    let (s, e, _) = error_of(
        post(&gw)
            .bearer_auth(KEY)
            .json(&chat("gpt-9", false))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(
        (s, e["code"].as_str(), e["param"].as_str()),
        (404, Some("model_not_found"), Some("model"))
    );
    let resp = http_client()
        .get(gw.http_url("/v1/nope"))
        .bearer_auth(KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(error_of(resp).await.0, 404);
    let resp = http_client()
        .get(gw.http_url("/v1/chat/completions"))
        .bearer_auth(KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(error_of(resp).await.0, 405);
    gw.shutdown().await;
}

#[tokio::test]
async fn unreachable_engine_is_502_provider() {
    // A port nobody listens on.
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = dead.local_addr().unwrap();
    drop(dead);
    let body = pool("p", &[format!("http://{addr}")], "") + &tenant("acme", "p", KEY, "");
    let gw = Gateway::start(&body).await;
    let (s, e, _) = error_of(
        post(&gw)
            .bearer_auth(KEY)
            .json(&chat("deepseek-v4-flash", false))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(
        (s, e["code"].as_str(), e["layer"].as_str()),
        (502, Some("engine_unreachable"), Some("provider"))
    );
    gw.shutdown().await;
}

#[tokio::test]
async fn a_dead_replica_is_retried_on_a_live_one() {
    let live = sim_engine(&["--ttft", "1", "--tpot", "1"]).await;
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dead_url = format!("http://{}", dead.local_addr().unwrap());
    drop(dead);
    let body = pool("p", &[dead_url, url(&live)], "retries = 1") + &tenant("acme", "p", KEY, "");
    let gw = Gateway::start(&body).await;
    for _ in 0..8 {
        let r = post(&gw)
            .bearer_auth(KEY)
            .json(&chat("deepseek-v4-flash", false))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
    }
    gw.shutdown().await;
}

#[tokio::test]
async fn engine_timeout_before_first_token_is_504() {
    let (_e, gw) = gateway_over_sim(
        &["--ttft", "1"],
        "ttft_timeout = \"300ms\"\nrequest_timeout = \"300ms\"\nretries = 0",
        "",
    )
    .await;
    for stream in [true, false] {
        let mut req = chat("deepseek-v4-flash", stream);
        req["sim"] = json!({"ttft_ms": 5000});
        let (s, e, _) = error_of(post(&gw).bearer_auth(KEY).json(&req).send().await.unwrap()).await;
        assert_eq!(
            (s, e["code"].as_str(), e["layer"].as_str()),
            (504, Some("engine_timeout"), Some("provider")),
            "stream={stream}"
        );
    }
    gw.shutdown().await;
}

#[tokio::test]
async fn engine_5xx_is_502_and_engine_400_keeps_its_message() {
    let (_e, gw) = gateway_over_sim(&["--max-model-len", "64"], "retries = 0", "").await;
    let mut req = chat("deepseek-v4-flash", false);
    req["sim"] = json!({"fault": "error"});
    let (s, e, _) = error_of(post(&gw).bearer_auth(KEY).json(&req).send().await.unwrap()).await;
    assert_eq!(
        (s, e["code"].as_str(), e["layer"].as_str()),
        (502, Some("engine_error"), Some("provider"))
    );

    let mut req = chat("deepseek-v4-flash", false);
    req["messages"][0]["content"] = json!("word ".repeat(200));
    let (s, e, _) = error_of(post(&gw).bearer_auth(KEY).json(&req).send().await.unwrap()).await;
    assert_eq!((s, e["layer"].as_str()), (400, Some("customer")));
    assert!(
        e["message"]
            .as_str()
            .unwrap()
            .contains("maximum context length is 64 tokens"),
        "{e}"
    );
    gw.shutdown().await;
}

#[tokio::test]
async fn broken_and_stalled_streams_end_with_an_error_event() {
    let (_e, gw) = gateway_over_sim(
        &["--ttft", "1", "--tpot", "1"],
        "idle_timeout = \"300ms\"",
        "",
    )
    .await;
    for fault in ["drop", "stall"] {
        let mut req = chat("deepseek-v4-flash", true);
        req["sim"] = json!({"fault": fault, "output_tokens": 50});
        let resp = post(&gw).bearer_auth(KEY).json(&req).send().await.unwrap();
        assert_eq!(resp.status(), 200, "{fault}: status was already sent");
        let trace = resp.headers()["traceparent"].to_str().unwrap()[3..35].to_owned();
        let text = resp
            .text()
            .await
            .expect("the stream ends cleanly with an error event");
        let last: Value = serde_json::from_str(sse_data(&text).last().unwrap()).unwrap();
        let e = &last["error"];
        let code = if fault == "drop" {
            "engine_stream_broken"
        } else {
            "engine_timeout"
        };
        assert_eq!(
            (e["code"].as_str(), e["layer"].as_str()),
            (Some(code), Some("provider")),
            "{fault}: {last}"
        );
        assert_eq!(e["trace_id"], trace);
    }
    gw.shutdown().await;
}

#[tokio::test]
async fn overload_is_503_with_retry_after_and_tenant_cap_is_429() {
    let engine = sim_engine(&["--ttft", "1", "--tpot", "20"]).await;
    let body = "[limits]\nmax_inflight_requests = 2\n".to_owned()
        + &pool("p", &[url(&engine)], "")
        + &tenant("acme", "p", KEY, "max_concurrent_requests = 1")
        + &tenant("beta", "p", "sk-test-beta", "");
    let gw = Gateway::start(&body).await;
    let mut req = chat("deepseek-v4-flash", true);
    req["sim"] = json!({"output_tokens": 300});
    let hold = post(&gw).bearer_auth(KEY).json(&req).send().await.unwrap();
    let mut hold = hold.bytes_stream();
    hold.next().await.unwrap().unwrap();

    // acme is at its own cap: 429, customer.
    let (s, e, h) = error_of(
        post(&gw)
            .bearer_auth(KEY)
            .json(&chat("deepseek-v4-flash", false))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(
        (s, e["type"].as_str(), e["layer"].as_str()),
        (429, Some("rate_limit_error"), Some("customer"))
    );
    assert!(h.contains_key("retry-after"));

    // beta still gets through; a second held request fills the gateway.
    let hold2 = post(&gw)
        .bearer_auth("sk-test-beta")
        .json(&req)
        .send()
        .await
        .unwrap();
    let mut hold2 = hold2.bytes_stream();
    hold2.next().await.unwrap().unwrap();
    let (s, e, h) = error_of(
        post(&gw)
            .bearer_auth("sk-test-beta")
            .json(&chat("deepseek-v4-flash", false))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!((s, e["layer"].as_str()), (503, Some("gateway")));
    assert_eq!(h["retry-after"], "1");
    drop(hold);
    drop(hold2);
    gw.shutdown().await;
}

#[tokio::test]
async fn oversized_headers_are_refused() {
    let (_e, gw) = gateway_over_sim(&[], "", "[limits]\nmax_header_bytes = 8192").await;
    let resp = post(&gw)
        .bearer_auth(KEY)
        .header("x-big", "a".repeat(20_000))
        .json(&chat("deepseek-v4-flash", false))
        .send()
        .await;
    match resp {
        Ok(r) => assert_eq!(r.status(), 431),
        Err(e) => assert!(
            e.is_request() || e.is_connect() || e.to_string().contains("connection"),
            "{e}"
        ),
    }
    gw.shutdown().await;
}

#[tokio::test]
async fn slowloris_connection_is_closed_after_the_header_timeout() {
    let (_e, gw) = gateway_over_sim(&[], "", "[limits]\nheader_read_timeout = \"300ms\"").await;
    let mut tcp = tokio::net::TcpStream::connect(gw.http).await.unwrap();
    tcp.write_all(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    // Never finish the head. The gateway must close the connection.
    let mut buf = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), tcp.read_to_end(&mut buf)).await;
    assert!(
        read.is_ok(),
        "connection still open long after the header timeout"
    );
    gw.shutdown().await;
}

#[tokio::test]
async fn connections_over_the_cap_get_503() {
    let (_e, gw) = gateway_over_sim(&[], "", "[limits]\nmax_connections = 1").await;
    let mut first = tokio::net::TcpStream::connect(gw.http).await.unwrap();
    first
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut one = [0u8; 12];
    first.read_exact(&mut one).await.unwrap(); // the first connection is being served
    let resp = http_client()
        .post(gw.http_url("/v1/chat/completions"))
        .bearer_auth(KEY)
        .json(&chat("deepseek-v4-flash", false))
        .send()
        .await
        .unwrap();
    let (s, e, h) = error_of(resp).await;
    assert_eq!(
        (s, e["code"].as_str(), e["layer"].as_str()),
        (503, Some("too_many_connections"), Some("gateway"))
    );
    assert!(h.contains_key("retry-after"));
    drop(first);
    gw.shutdown().await;
}

#[tokio::test]
async fn a_json_array_body_is_400_not_a_crash() {
    let (_e, gw) = gateway_over_sim(&[], "", "").await;
    let resp = post(&gw)
        .bearer_auth(KEY)
        .header("content-type", "application/json")
        .body(r#"["deepseek-v4-flash", true]"#)
        .send()
        .await
        .unwrap();
    let (s, e, _) = error_of(resp).await;
    assert_eq!((s, e["code"].as_str()), (400, Some("invalid_request")));
    assert!(e["message"].as_str().unwrap().contains("JSON object"));
    gw.shutdown().await;
}

#[tokio::test]
async fn a_saturated_engine_pool_is_503_with_retry_after() {
    let engine = EchoEngine::start_status(429, json!({"error": {"message": "queue full"}})).await;
    let body = pool("p", &[engine.url()], "") + &tenant("acme", "p", KEY, "");
    let gw = Gateway::start(&body).await;
    let (s, e, h) = error_of(
        post(&gw)
            .bearer_auth(KEY)
            .json(&chat("deepseek-v4-flash", false))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(
        (s, e["code"].as_str(), e["layer"].as_str()),
        (503, Some("engine_busy"), Some("provider"))
    );
    assert_eq!(h["retry-after"], "1");
    gw.shutdown().await;
}
