//! Traces as an SRE sees them in Jaeger: one trace per exchange, the span
//! tree and its attributes, and the layer that failed — exported over OTLP
//! (HTTP/protobuf here) to an in-process collector.

mod support;

use std::sync::OnceLock;

use serde_json::{Value, json};
use support::otlp::{Collector, Span};
use support::*;

const KEY: &str = "sk-test-acme";
const MODEL: &str = "deepseek-v4-flash";

/// One exporter per test process (the tracing subscriber is global).
fn collector() -> &'static Collector {
    static C: OnceLock<Collector> = OnceLock::new();
    C.get_or_init(|| {
        let (collector, http, _grpc) = support::otlp::start();
        let settings = sluice::telemetry::otel::Settings {
            endpoint: format!("http://{http}/v1/traces"),
            protocol: sluice::config::OtlpProtocol::HttpProtobuf,
            service_name: "sluice-test".into(),
            queue: 4096,
            timeout: std::time::Duration::from_secs(5),
        };
        let provider = sluice::telemetry::init(Some(&settings)).unwrap();
        // The simulated engine exports as a service of its own, like vLLM.
        let engine_settings = sluice::telemetry::otel::Settings {
            service_name: "vllm-sim".into(),
            ..settings
        };
        let engine_provider = sluice::telemetry::otel::provider(&engine_settings).unwrap();
        sluice::sim::trace::install(sluice::telemetry::otel::tracer(&engine_provider));
        // Both kept for the life of the process.
        std::mem::forget((provider, engine_provider));
        collector
    })
}

fn plugin(builtin: &str, config: &str) -> String {
    format!("\n[[tenants.plugins]]\nbuiltin = {builtin:?}\nconfig = {config}\n")
}

/// Send with a caller's `traceparent`; returns status, body, and the
/// response's trace id.
async fn call(gw: &Gateway, key: &str, body: Value, parent: &str) -> (u16, String, String) {
    let resp = http_client()
        .post(gw.http_url("/v1/chat/completions"))
        .bearer_auth(key)
        .header("traceparent", parent)
        .json(&body)
        .send()
        .await
        .unwrap();
    let status = resp.status().as_u16();
    let tp = resp.headers()["traceparent"].to_str().unwrap().to_owned();
    let text = resp.text().await.unwrap();
    let trace_id = tp.split('-').nth(1).unwrap().to_owned();
    if status >= 400 {
        // The error body names the trace the response header names.
        let err: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(err["error"]["trace_id"], trace_id.as_str(), "{text}");
    }
    (status, text, trace_id)
}

fn new_parent() -> (String, String, String) {
    let trace = format!("{:032x}", fastrand::u128(1..));
    let span = format!("{:016x}", fastrand::u64(1..));
    (format!("00-{trace}-{span}-01"), trace, span)
}

fn one<'a>(spans: &'a [Span], name: &str) -> &'a Span {
    let found: Vec<&Span> = spans.iter().filter(|s| s.name == name).collect();
    assert_eq!(found.len(), 1, "{name} in {spans:#?}");
    found[0]
}

fn server(spans: &[Span]) -> &Span {
    let s = one(spans, "POST /v1/chat/completions");
    assert_eq!(s.kind, 2, "SERVER");
    s
}

fn assert_failed(s: &Span, layer: &str, code: &str) {
    assert_eq!(s.status, 2, "{} is an error: {:?}", s.name, s.attrs);
    assert_eq!(s.attr("sluice.error.layer"), layer, "{}", s.name);
    assert_eq!(s.attr("error.type"), code, "{}", s.name);
}

#[tokio::test]
async fn a_streamed_answer_is_one_trace_under_the_callers_span() {
    let c = collector();
    let engine = sim_engine(&[]).await;
    let seen = EchoEngine::start().await;
    let _ = &seen;
    let gw = Gateway::start(&format!(
        "{}{}",
        pool("p", &[url(&engine)], ""),
        tenant("acme", "p", KEY, "")
    ))
    .await;
    let (parent, trace, parent_span) = new_parent();
    // The engine would say 12 tokens; max_tokens cuts it at 5.
    let body = json!({"model": MODEL, "stream": true, "max_tokens": 5,
        "stream_options": {"include_usage": true},
        "sim": {"output_tokens": 12}, "messages": [{"role": "user", "content": "hello there"}]});
    let (status, text, trace_id) = call(&gw, KEY, body, &parent).await;
    assert_eq!(status, 200, "{text}");
    assert_eq!(trace_id, trace, "the caller's trace continues");

    let spans = c
        .wait_for(&trace, |s| s.name == "POST /v1/chat/completions")
        .await;
    let srv = server(&spans);
    assert_eq!(srv.parent_span_id, parent_span);
    assert_eq!(srv.service, "sluice-test");
    assert_eq!(srv.attr("sluice.tenant"), "acme");
    assert_eq!(srv.attr("gen_ai.request.model"), MODEL);
    assert_eq!(srv.attr("http.response.status_code"), "200");
    assert_ne!(srv.status, 2);

    let auth = one(&spans, "authenticate");
    assert_eq!(auth.parent_span_id, srv.span_id);
    let route = one(&spans, "route");
    assert_eq!(route.parent_span_id, srv.span_id);
    assert_eq!(route.attr("sluice.pool"), "p");

    let eng = one(&spans, &format!("chat {MODEL}"));
    assert_eq!(eng.kind, 3, "CLIENT");
    assert_eq!(eng.parent_span_id, srv.span_id);
    assert_eq!(eng.attr("gen_ai.operation.name"), "chat");
    assert_eq!(eng.attr("gen_ai.provider.name"), "vllm");
    assert_eq!(eng.attr("gen_ai.request.model"), MODEL);
    assert_eq!(eng.attr("gen_ai.request.max_tokens"), "5");
    assert_eq!(eng.attr("gen_ai.request.stream"), "true");
    assert_eq!(eng.attr("gen_ai.usage.output_tokens"), "5");
    assert!(
        eng.attr("gen_ai.usage.input_tokens")
            .parse::<u64>()
            .unwrap()
            > 0
    );
    assert_eq!(eng.attr("gen_ai.response.finish_reasons"), "length");
    assert!(eng.attr("gen_ai.response.id").starts_with("chatcmpl-"));
    assert!(
        eng.attr("gen_ai.response.time_to_first_chunk")
            .parse::<f64>()
            .unwrap()
            > 0.0
    );
    assert_eq!(eng.attr("sluice.attempt"), "1");

    // The engine's own spans are in the same trace, under the attempt.
    let spans = c.wait_for(&trace, |s| s.name == "llm_request").await;
    let llm = one(&spans, "llm_request");
    assert_eq!(llm.service, "vllm-sim");
    assert_eq!(llm.kind, 2);
    assert_eq!(llm.parent_span_id, eng.span_id);
    assert_eq!(llm.attr("gen_ai.usage.output_tokens"), "5");
    for phase in ["queue", "prefill", "decode"] {
        let p = one(&spans, phase);
        assert_eq!(p.parent_span_id, llm.span_id, "{phase}");
        assert_eq!(p.service, "vllm-sim");
    }
}

#[tokio::test]
async fn the_engine_is_sent_the_attempts_span_as_its_parent() {
    let c = collector();
    let engine = EchoEngine::start().await;
    let gw = Gateway::start(&format!(
        "{}{}",
        pool("p", &[engine.url()], ""),
        tenant("acme", "p", KEY, "")
    ))
    .await;
    let (parent, trace, _) = new_parent();
    let body = json!({"model": MODEL, "messages": [{"role": "user", "content": "hi"}]});
    let (status, text, _) = call(&gw, KEY, body, &parent).await;
    assert_eq!(status, 200, "{text}");
    let sent = engine.last().headers["traceparent"]
        .to_str()
        .unwrap()
        .to_owned();
    let spans = c.wait_for(&trace, |s| s.kind == 3).await;
    let eng = spans.iter().find(|s| s.kind == 3).unwrap();
    assert_eq!(sent, format!("00-{trace}-{}-01", eng.span_id));
}

#[tokio::test]
async fn a_bad_key_is_the_customers_failure() {
    let c = collector();
    let engine = EchoEngine::start().await;
    let gw = Gateway::start(&format!(
        "{}{}",
        pool("p", &[engine.url()], ""),
        tenant("acme", "p", KEY, "")
    ))
    .await;
    let (parent, trace, _) = new_parent();
    let body = json!({"model": MODEL, "messages": [{"role": "user", "content": "hi"}]});
    let (status, text, _) = call(&gw, "sk-wrong", body, &parent).await;
    assert_eq!(status, 401, "{text}");
    let err: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(err["error"]["trace_id"], trace.as_str());
    let spans = c.wait_for(&trace, |s| s.kind == 2).await;
    assert_failed(server(&spans), "customer", "invalid_api_key");
    assert_failed(one(&spans, "authenticate"), "customer", "invalid_api_key");
    assert!(spans.iter().all(|s| s.kind != 3), "no engine attempt");
}

#[tokio::test]
async fn a_plugin_rejection_and_a_plugin_trap_name_their_layer() {
    let c = collector();
    let engine = sim_engine(&[]).await;
    let hostile = format!("{}/hostile.wasm", env!("SLUICE_PLUGIN_COMPONENTS"));
    let trap_tenant = format!(
        "{}\n[[tenants.plugins]]\npath = {hostile:?}\nconfig = {{ mode = \"trap\" }}\n",
        tenant("trap", "p", "sk-test-trap", "")
    );
    let gw = Gateway::start(&format!(
        "{}{}{}{trap_tenant}",
        pool("p", &[url(&engine)], ""),
        tenant("acme", "p", KEY, ""),
        plugin("context-cap", "{ max_input_tokens = 20 }"),
    ))
    .await;

    let (parent, trace, _) = new_parent();
    let long =
        json!({"model": MODEL, "messages": [{"role": "user", "content": "word ".repeat(100)}]});
    let (status, text, _) = call(&gw, KEY, long, &parent).await;
    assert_eq!(status, 400, "{text}");
    let spans = c.wait_for(&trace, |s| s.kind == 2).await;
    assert_failed(server(&spans), "customer", "context_length_exceeded");
    let p = one(&spans, "plugin context-cap on-request");
    assert_eq!(p.parent_span_id, server(&spans).span_id);
    assert_eq!(p.attr("sluice.plugin.decision"), "reject");
    assert_eq!(p.attr("sluice.plugin.rejection"), "context_length_exceeded");
    assert_eq!(p.attr("sluice.tenant"), "acme");
    assert_eq!(p.attr("sluice.plugin.sha256").len(), 64);
    assert!(spans.iter().all(|s| s.kind != 3), "no engine attempt");

    let (parent, trace, _) = new_parent();
    let short = json!({"model": MODEL, "messages": [{"role": "user", "content": "hi"}]});
    let (status, text, _) = call(&gw, "sk-test-trap", short, &parent).await;
    assert_eq!(status, 500, "{text}");
    let spans = c.wait_for(&trace, |s| s.kind == 2).await;
    assert_failed(server(&spans), "plugin", "plugin_trap");
    let p = one(&spans, "plugin hostile on-request");
    assert_failed(p, "plugin", "plugin_trap");
    assert_eq!(p.attr("sluice.plugin.decision"), "fault");
}

#[tokio::test]
async fn engine_failures_are_the_providers() {
    let c = collector();
    let failing = EchoEngine::start_status(500, json!({"error": {"message": "boom"}})).await;
    let sim = sim_engine(&[]).await;
    let gw = Gateway::start(&format!(
        "{}{}{}{}",
        pool("bad", &[failing.url()], "retries = 0"),
        tenant("acme", "bad", KEY, ""),
        pool(
            "slow",
            &[url(&sim)],
            "ttft_timeout = \"300ms\"\nretries = 0"
        ),
        tenant("slow", "slow", "sk-test-slow", ""),
    ))
    .await;
    let body = json!({"model": MODEL, "messages": [{"role": "user", "content": "hi"}]});

    // Engine 5xx.
    let (parent, trace, _) = new_parent();
    let (status, text, _) = call(&gw, KEY, body.clone(), &parent).await;
    assert_eq!(status, 502, "{text}");
    let spans = c.wait_for(&trace, |s| s.kind == 2).await;
    assert_failed(server(&spans), "provider", "engine_error");
    let eng = spans.iter().find(|s| s.kind == 3).expect("an engine span");
    assert_failed(eng, "provider", "engine_error");
    assert_eq!(eng.attr("http.response.status_code"), "500");

    // No first token in time.
    let (parent, trace, _) = new_parent();
    let mut slow = body.clone();
    slow["stream"] = json!(true);
    slow["sim"] = json!({"ttft_ms": 3000});
    let (status, text, _) = call(&gw, "sk-test-slow", slow, &parent).await;
    assert_eq!(status, 504, "{text}");
    let spans = c.wait_for(&trace, |s| s.kind == 2).await;
    assert_failed(server(&spans), "provider", "engine_timeout");
    assert_failed(
        spans.iter().find(|s| s.kind == 3).unwrap(),
        "provider",
        "engine_timeout",
    );

    // A stream that breaks after it began: 200 on the wire, an error event,
    // and the failure on both spans.
    let (parent, trace, _) = new_parent();
    let mut broken = body.clone();
    broken["stream"] = json!(true);
    broken["sim"] = json!({"fault": "drop", "output_tokens": 40});
    let (status, text, _) = call(&gw, "sk-test-slow", broken, &parent).await;
    assert_eq!(status, 200);
    assert!(text.contains("engine_stream_broken"), "{text}");
    let spans = c.wait_for(&trace, |s| s.kind == 2).await;
    assert_failed(server(&spans), "provider", "engine_stream_broken");
    assert_failed(
        spans.iter().find(|s| s.kind == 3).unwrap(),
        "provider",
        "engine_stream_broken",
    );
}

#[tokio::test]
async fn without_a_caller_the_trace_starts_here_and_unsampled_callers_are_honoured() {
    let c = collector();
    let engine = EchoEngine::start().await;
    let gw = Gateway::start(&format!(
        "{}{}",
        pool("p", &[engine.url()], ""),
        tenant("acme", "p", KEY, "")
    ))
    .await;
    let body = json!({"model": MODEL, "messages": [{"role": "user", "content": "hi"}]});

    // No traceparent: a root trace, whose id the response and the error body give.
    let resp = http_client()
        .post(gw.http_url("/v1/chat/completions"))
        .bearer_auth("sk-wrong")
        .json(&body)
        .send()
        .await
        .unwrap();
    let tp = resp.headers()["traceparent"].to_str().unwrap().to_owned();
    let err: Value = resp.json().await.unwrap();
    let trace = tp.split('-').nth(1).unwrap().to_owned();
    assert_eq!(err["error"]["trace_id"], trace.as_str());
    let spans = c.wait_for(&trace, |s| s.kind == 2).await;
    assert_eq!(server(&spans).parent_span_id, "", "a root span");

    // A caller that did not sample: nothing exported, and the engine is told
    // the same.
    let trace = format!("{:032x}", fastrand::u128(1..));
    let parent = format!("00-{trace}-{:016x}-00", fastrand::u64(1..));
    let (status, text, got) = call(&gw, KEY, body.clone(), &parent).await;
    assert_eq!(status, 200, "{text}");
    assert_eq!(got, trace);
    let sent = engine.last().headers["traceparent"]
        .to_str()
        .unwrap()
        .to_owned();
    assert!(
        sent.starts_with(&format!("00-{trace}-")) && sent.ends_with("-00"),
        "{sent}"
    );
    // A sampled request after it proves the exporter is flowing...
    let (parent2, trace2, _) = new_parent();
    call(&gw, KEY, body, &parent2).await;
    c.wait_for(&trace2, |s| s.kind == 2).await;
    // ...and the unsampled one never arrived.
    assert!(c.trace(&trace).is_empty(), "{:#?}", c.trace(&trace));
}

#[tokio::test]
async fn an_engine_failure_shows_in_the_engines_own_spans() {
    let c = collector();
    let engine = sim_engine(&[]).await;
    let gw = Gateway::start(&format!(
        "{}{}",
        pool("p", &[url(&engine)], "retries = 0"),
        tenant("acme", "p", KEY, "")
    ))
    .await;
    let (parent, trace, _) = new_parent();
    let body = json!({"model": MODEL, "sim": {"fault": "error"},
        "messages": [{"role": "user", "content": "hi"}]});
    let (status, text, _) = call(&gw, KEY, body, &parent).await;
    assert_eq!(status, 502, "{text}");
    let spans = c.wait_for(&trace, |s| s.name == "llm_request").await;
    let eng = spans.iter().find(|s| s.kind == 3).unwrap();
    assert_failed(eng, "provider", "engine_error");
    let llm = one(&spans, "llm_request");
    assert_eq!(llm.parent_span_id, eng.span_id);
    assert_eq!(llm.status, 2, "the engine's span is failed too");
}

#[tokio::test]
async fn a_stream_a_plugin_refuses_at_its_end_is_failed_in_the_trace() {
    let c = collector();
    let engine = sim_engine(&[]).await;
    let gw = Gateway::start(&format!(
        "{}{}{}",
        pool("p", &[url(&engine)], ""),
        tenant("acme", "p", KEY, ""),
        plugin("output-validator", "{ max_retries = 0 }"),
    ))
    .await;
    let (parent, trace, _) = new_parent();
    let body = json!({"model": MODEL, "stream": true, "response_format": {"type": "json_object"},
        "sim": {"fault": "invalid_json"}, "messages": [{"role": "user", "content": "hi"}]});
    let (status, text, _) = call(&gw, KEY, body, &parent).await;
    assert_eq!(status, 200);
    assert!(text.contains("\"layer\":\"customer\""), "{text}");
    let spans = c
        .wait_for(&trace, |s| s.name == "plugin output-validator on-response")
        .await;
    let srv = server(&spans);
    assert_eq!(srv.status, 2, "{:?}", srv.attrs);
    assert_eq!(srv.attr("sluice.error.layer"), "customer");
    let hook = one(&spans, "plugin output-validator on-response");
    assert_eq!(
        hook.parent_span_id, srv.span_id,
        "the hook is in the request's trace"
    );
    assert_eq!(hook.attr("sluice.plugin.decision"), "reject");
}
