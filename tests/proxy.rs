//! The proxy path over real sockets: protocols, TLS, streaming, pass-through.

mod support;

use futures_util::StreamExt;
use serde_json::{Value, json};
use support::*;

const KEY: &str = "sk-test-acme";

async fn setup(sim_flags: &[&str]) -> (sluice::sim::SimHandle, Gateway) {
    let engine = sim_engine(sim_flags).await;
    let body = pool("p", &[url(&engine)], "") + &tenant("acme", "p", KEY, "");
    (engine, Gateway::start(&body).await)
}

async fn check_chat(client: &reqwest::Client, url: String, version: http::Version) {
    let resp = client
        .post(url)
        .bearer_auth(KEY)
        .json(&chat("deepseek-v4-flash", false))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.version(), version);
    assert!(resp.headers().contains_key("x-request-id"));
    assert!(
        resp.headers()["traceparent"]
            .to_str()
            .unwrap()
            .starts_with("00-")
    );
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["object"], "chat.completion");
    assert!(
        !v["choices"][0]["message"]["content"]
            .as_str()
            .unwrap()
            .is_empty()
    );
    assert!(v["usage"]["prompt_tokens"].as_u64().unwrap() > 0);
}

#[tokio::test]
async fn chat_over_http1_https_h1_https_h2_and_h2c() {
    let (_engine, gw) = setup(&["--ttft", "1", "--tpot", "1"]).await;
    check_chat(
        &http_client(),
        gw.http_url("/v1/chat/completions"),
        http::Version::HTTP_11,
    )
    .await;
    check_chat(
        &gw.tls_client("http/1.1"),
        gw.https_url("/v1/chat/completions"),
        http::Version::HTTP_11,
    )
    .await;
    check_chat(
        &gw.tls_client("h2"),
        gw.https_url("/v1/chat/completions"),
        http::Version::HTTP_2,
    )
    .await;
    install_tls_provider();
    let h2c = reqwest::Client::builder()
        .no_proxy()
        .http2_prior_knowledge()
        .build()
        .unwrap();
    check_chat(
        &h2c,
        gw.http_url("/v1/chat/completions"),
        http::Version::HTTP_2,
    )
    .await;
    gw.shutdown().await;
}

#[tokio::test]
async fn completions_and_models() {
    let (_engine, gw) = setup(&["--ttft", "1", "--tpot", "1"]).await;
    let c = http_client();
    let v: Value = c
        .post(gw.http_url("/v1/completions"))
        .bearer_auth(KEY)
        .json(&json!({"model": "deepseek-v4-flash", "prompt": "Once upon a time", "max_tokens": 5}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(v["object"], "text_completion");
    assert_eq!(v["usage"]["completion_tokens"], 5);

    let resp = c
        .get(gw.http_url("/v1/models"))
        .bearer_auth(KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["object"], "list");
    assert_eq!(v["data"][0]["id"], "deepseek-v4-flash");
    gw.shutdown().await;
}

#[tokio::test]
async fn stream_arrives_in_order_and_ends_with_usage_and_done() {
    let (_engine, gw) = setup(&["--ttft", "1", "--tpot", "1"]).await;
    for client in [gw.tls_client("h2"), gw.tls_client("http/1.1")] {
        let mut req = chat("deepseek-v4-flash", true);
        req["stream_options"] = json!({"include_usage": true});
        req["max_tokens"] = json!(12);
        let resp = client
            .post(gw.https_url("/v1/chat/completions"))
            .bearer_auth(KEY)
            .json(&req)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        assert!(
            resp.headers()["content-type"]
                .to_str()
                .unwrap()
                .starts_with("text/event-stream")
        );
        let text = resp.text().await.unwrap();
        let data = sse_data(&text);
        assert_eq!(data.last().unwrap(), "[DONE]");
        let chunks: Vec<Value> = data[..data.len() - 1]
            .iter()
            .map(|d| serde_json::from_str(d).unwrap())
            .collect();
        let usage = &chunks.last().unwrap()["usage"];
        assert_eq!(usage["completion_tokens"], 12);
        let tokens = chunks
            .iter()
            .filter(|c| {
                c["choices"][0]["delta"]["content"]
                    .as_str()
                    .is_some_and(|s| !s.is_empty())
            })
            .count();
        assert_eq!(tokens, 12, "one token per chunk, none lost");
        let id = &chunks[0]["id"];
        assert!(chunks.iter().all(|c| &c["id"] == id), "one stream, one id");
    }
    gw.shutdown().await;
}

#[tokio::test]
async fn first_chunk_reaches_client_while_engine_still_generates() {
    // 40 tokens at 50 ms each: the engine needs ~2 s. The client must see the
    // first token while the engine is still running the request.
    let (engine, gw) = setup(&["--ttft", "1", "--tpot", "50"]).await;
    let mut req = chat("deepseek-v4-flash", true);
    req["max_tokens"] = json!(40);
    req["sim"] = json!({"output_tokens": 40});
    let resp = http_client()
        .post(gw.http_url("/v1/chat/completions"))
        .bearer_auth(KEY)
        .json(&req)
        .send()
        .await
        .unwrap();
    let mut stream = resp.bytes_stream();
    let mut seen = String::new();
    while !has_token(&seen) {
        let chunk = stream.next().await.expect("stream continues").unwrap();
        seen.push_str(std::str::from_utf8(&chunk).unwrap());
    }
    let m = engine.metrics();
    assert_eq!(
        m.running, 1,
        "engine still generating when the first token arrived"
    );
    assert_eq!(m.completed, 0);
    assert!(!seen.contains("[DONE]"));
    // Drain the rest: it all arrives.
    let mut rest = seen;
    while let Some(c) = stream.next().await {
        rest.push_str(std::str::from_utf8(&c.unwrap()).unwrap());
    }
    assert!(rest.trim_end().ends_with("data: [DONE]"));
    gw.shutdown().await;
}

fn has_token(sse: &str) -> bool {
    sse_data(sse).iter().any(|d| {
        serde_json::from_str::<Value>(d)
            .ok()
            .and_then(|v| {
                v["choices"][0]["delta"]["content"]
                    .as_str()
                    .map(|s| !s.is_empty())
            })
            .unwrap_or(false)
    })
}

#[tokio::test]
async fn client_disconnect_cancels_the_engine_request() {
    let (engine, gw) = setup(&["--ttft", "1", "--tpot", "20"]).await;
    let cases = [
        (http_client(), gw.http_url("/v1/chat/completions")),
        (gw.tls_client("h2"), gw.https_url("/v1/chat/completions")),
    ];
    for (client, url) in cases {
        let before = engine.metrics().cancelled;
        let mut req = chat("deepseek-v4-flash", true);
        req["sim"] = json!({"output_tokens": 500});
        let resp = client
            .post(url)
            .bearer_auth(KEY)
            .json(&req)
            .send()
            .await
            .unwrap();
        let mut stream = resp.bytes_stream();
        stream.next().await.unwrap().unwrap();
        assert!(eventually(100, || engine.metrics().running == 1).await);
        drop(stream);
        drop(client);
        assert!(
            eventually(250, || engine.metrics().cancelled == before + 1).await,
            "engine did not see the cancel"
        );
        assert!(eventually(250, || engine.metrics().running == 0).await);
    }
    gw.shutdown().await;
}

#[tokio::test]
async fn unknown_fields_and_bytes_pass_through_and_credentials_do_not() {
    let engine = EchoEngine::start().await;
    let body = pool("p", &[engine.url()], "") + &tenant("acme", "p", KEY, "");
    let gw = Gateway::start(&body).await;
    let raw = r#"{"model":"deepseek-v4-flash","messages":[{"role":"user","content":"hi"}],"x_vendor":{"keep":[1,2,3]},"top_k":7}"#;
    let resp = http_client()
        .post(gw.http_url("/v1/chat/completions"))
        .bearer_auth(KEY)
        .header("content-type", "application/json")
        .header("x-custom", "kept")
        .header(
            "traceparent",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        )
        .body(raw)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let back_tp = resp.headers()["traceparent"].to_str().unwrap().to_owned();
    let seen = engine.last();
    assert_eq!(seen.path, "/v1/chat/completions");
    assert_eq!(seen.body, raw.as_bytes(), "body forwarded byte for byte");
    assert!(
        seen.headers.get("authorization").is_none(),
        "client key never reaches the engine"
    );
    assert_eq!(seen.headers["x-custom"], "kept");
    let tp = seen.headers["traceparent"].to_str().unwrap();
    assert!(
        tp.starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-"),
        "trace continues: {tp}"
    );
    assert_ne!(
        tp, "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        "new span id"
    );
    assert_eq!(tp, back_tp);
    gw.shutdown().await;
}

#[tokio::test]
async fn load_spreads_over_replicas_by_outstanding_requests() {
    let a = sim_engine(&["--ttft", "1", "--tpot", "20"]).await;
    let b = sim_engine(&["--ttft", "1", "--tpot", "20"]).await;
    let body = pool("p", &[url(&a), url(&b)], "") + &tenant("acme", "p", KEY, "");
    let gw = Gateway::start(&body).await;
    let client = http_client();
    let mut streams = Vec::new();
    for _ in 0..6 {
        let mut req = chat("deepseek-v4-flash", true);
        req["sim"] = json!({"output_tokens": 200});
        let resp = client
            .post(gw.http_url("/v1/chat/completions"))
            .bearer_auth(KEY)
            .json(&req)
            .send()
            .await
            .unwrap();
        let mut s = resp.bytes_stream();
        s.next().await.unwrap().unwrap();
        streams.push(s);
    }
    assert_eq!(
        a.metrics().running,
        3,
        "least-outstanding puts half on each replica"
    );
    assert_eq!(b.metrics().running, 3);
    drop(streams);
    gw.shutdown().await;
}

#[tokio::test]
async fn ops_health_and_readiness() {
    let (_engine, gw) = setup(&[]).await;
    let c = http_client();
    let r = c
        .get(format!("http://{}/healthz", gw.ops))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let r = c
        .get(format!("http://{}/readyz", gw.ops))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    gw.shutdown().await;
}

#[tokio::test]
async fn reasoning_arrives_as_reasoning_content_whatever_the_engine_called_it() {
    // Newer vLLM names the field `reasoning`.
    let engine = EchoEngine::start_with(json!({
        "id": "chatcmpl-r", "object": "chat.completion", "created": 0, "model": "deepseek-v4-flash",
        "choices": [{"index": 0, "finish_reason": "stop",
            "message": {"role": "assistant", "content": "42", "reasoning": "6 times 7"}}],
    }))
    .await;
    let body = pool("p", &[engine.url()], "") + &tenant("acme", "p", KEY, "");
    let gw = Gateway::start(&body).await;
    let v: Value = http_client()
        .post(gw.http_url("/v1/chat/completions"))
        .bearer_auth(KEY)
        .json(&chat("deepseek-v4-flash", false))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let msg = &v["choices"][0]["message"];
    assert_eq!(msg["reasoning_content"], "6 times 7", "{v}");
    assert!(msg.get("reasoning").is_none());
    gw.shutdown().await;
}
