//! The five built-in policy plugins, end to end through the proxy over real
//! sockets: what a client sees, and what the engine is sent.

mod support;

use std::time::Duration;

use serde_json::{Value, json};
use sluice::config::hash_key;
use support::*;

const KEY: &str = "sk-test-acme";
const MODEL: &str = "deepseek-v4-flash";

/// A `[[tenants.plugins]]` block; append it after the tenant's text.
fn plugin(builtin: &str, config: &str) -> String {
    format!("\n[[tenants.plugins]]\nbuiltin = {builtin:?}\nconfig = {config}\n")
}

/// A further `[[tenants.api_keys]]` block for the last tenant.
fn api_key(id: &str, key: &str) -> String {
    format!(
        "\n[[tenants.api_keys]]\nid = {id:?}\nsha256 = {:?}\n",
        hash_key(key)
    )
}

/// Start a gateway with the default plugin host settings (10ms of CPU per
/// hook call: a loaded machine must not fail honest plugins).
async fn start(body: &str) -> Gateway {
    Gateway::start(body).await
}

fn post(gw: &Gateway, key: &str) -> reqwest::RequestBuilder {
    http_client()
        .post(gw.http_url("/v1/chat/completions"))
        .bearer_auth(key)
}

/// Expect a 200 and return the body.
async fn ok_text(resp: reqwest::Response) -> String {
    let status = resp.status();
    let text = resp.text().await.unwrap();
    assert_eq!(status, 200, "{text}");
    text
}

/// Send and expect a 200 with a JSON body.
async fn ok_json(req: reqwest::RequestBuilder) -> Value {
    let resp = req.send().await.unwrap();
    let status = resp.status();
    let text = resp.text().await.unwrap();
    assert_eq!(status, 200, "{text}");
    serde_json::from_str(&text).unwrap()
}

/// Send a stream request, expect 200, and return its `data:` payloads.
async fn ok_stream(req: reqwest::RequestBuilder) -> Vec<String> {
    let resp = req.send().await.unwrap();
    let status = resp.status();
    let text = resp.text().await.unwrap();
    assert_eq!(status, 200, "{text}");
    sse_data(&text)
}

/// The JSON body the engine received last.
fn last_body(engine: &EchoEngine) -> Value {
    serde_json::from_slice(&engine.last().body).expect("forwarded body is JSON")
}

fn seen_count(engine: &EchoEngine) -> usize {
    engine.seen.lock().unwrap().len()
}

/// Retry-After in whole seconds.
fn retry_after(h: &reqwest::header::HeaderMap) -> u64 {
    h.get("retry-after")
        .expect("429 carries Retry-After")
        .to_str()
        .unwrap()
        .parse()
        .expect("Retry-After is whole seconds")
}

/// Send `n` copies of a request at once; every one gets an answer.
async fn burst(gw: &Gateway, key: &str, body: &Value, n: usize) -> Vec<reqwest::Response> {
    let client = http_client();
    let url = gw.http_url("/v1/chat/completions");
    let sends = (0..n).map(|_| client.post(&url).bearer_auth(key).json(body).send());
    futures_util::future::join_all(sends)
        .await
        .into_iter()
        .map(|r| r.expect("every request of the burst is answered"))
        .collect()
}

/// Send until the token limiter admits the request (bounded; a refusal takes
/// nothing from the bucket). Returns the admitted response.
async fn admitted_soon(gw: &Gateway, key: &str, body: &Value) -> reqwest::Response {
    for _ in 0..100 {
        let resp = post(gw, key).json(body).send().await.unwrap();
        if resp.status() != 429 {
            return resp;
        }
        let (_, e, _) = error_of(resp).await;
        assert_eq!(e["code"], "token_limit_exceeded", "{e}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("the token budget never came back");
}

fn parse_chunks(data: &[String]) -> Vec<Value> {
    data.iter()
        .filter(|d| d.as_str() != "[DONE]")
        .map(|d| serde_json::from_str(d).expect("chunk is JSON"))
        .collect()
}

fn is_usage_only(chunk: &Value) -> bool {
    chunk["choices"].as_array().is_some_and(Vec::is_empty)
}

// --- request-shaper ----------------------------------------------------------

const SHAPER: &str = r#"{ model_aliases = { fast = "deepseek-v4-flash" }, defaults = { temperature = 0.6, max_tokens = 256 }, clamp = { temperature = [0.0, 1.0], top_p = [0.1, 0.9], max_tokens = [1, 1024] } }"#;

async fn shaper_gateway(config: &str) -> (EchoEngine, Gateway) {
    let echo = EchoEngine::start().await;
    let body = pool("p", &[echo.url()], "")
        + &tenant("acme", "p", KEY, "")
        + &plugin("request-shaper", config);
    (echo, start(&body).await)
}

#[tokio::test]
async fn shaper_rewrites_an_alias_and_unknown_names_still_404() {
    let (echo, gw) = shaper_gateway(SHAPER).await;
    let v = ok_json(post(&gw, KEY).json(&chat("fast", false))).await;
    assert_eq!(v["choices"][0]["message"]["content"], "echo");
    assert_eq!(
        last_body(&echo)["model"],
        MODEL,
        "the engine sees the model"
    );

    let before = seen_count(&echo);
    let (s, e, _) = error_of(
        post(&gw, KEY)
            .json(&chat("slow", false))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(
        (s, e["code"].as_str(), e["layer"].as_str()),
        (404, Some("model_not_found"), Some("customer"))
    );
    assert_eq!(seen_count(&echo), before, "the engine was not called");
    gw.shutdown().await;
}

#[tokio::test]
async fn shaper_fills_defaults_keeps_given_values_and_clamps() {
    let (echo, gw) = shaper_gateway(SHAPER).await;

    // Absent: the defaults; a clamp alone adds nothing (top_p).
    let mut req = chat(MODEL, false);
    req["stop"] = json!(["\n\n"]);
    ok_json(post(&gw, KEY).json(&req)).await;
    let seen = last_body(&echo);
    assert_eq!(seen["temperature"], 0.6);
    assert_eq!(seen["max_tokens"], 256);
    assert!(seen.get("top_p").is_none(), "{seen}");
    assert_eq!(seen["stop"], json!(["\n\n"]), "other fields pass through");
    assert_eq!(seen["messages"], req["messages"]);

    // Present and in range: kept as sent.
    let mut req = chat(MODEL, false);
    req["temperature"] = json!(0.3);
    req["top_p"] = json!(0.5);
    req["max_tokens"] = json!(64);
    ok_json(post(&gw, KEY).json(&req)).await;
    let seen = last_body(&echo);
    assert_eq!(
        (&seen["temperature"], &seen["top_p"], &seen["max_tokens"]),
        (&json!(0.3), &json!(0.5), &json!(64))
    );

    // Out of range: clamped.
    let mut req = chat(MODEL, false);
    req["temperature"] = json!(1.7);
    req["top_p"] = json!(0.99);
    req["max_tokens"] = json!(5000);
    ok_json(post(&gw, KEY).json(&req)).await;
    let seen = last_body(&echo);
    assert_eq!(
        (&seen["temperature"], &seen["top_p"], &seen["max_tokens"]),
        (&json!(1.0), &json!(0.9), &json!(1024))
    );

    // The newer spelling is clamped too and rewritten as the vLLM one, so no
    // larger value is left where the engine would prefer it.
    let mut req = chat(MODEL, false);
    req["max_completion_tokens"] = json!(5000);
    ok_json(post(&gw, KEY).json(&req)).await;
    let seen = last_body(&echo);
    assert_eq!(seen["max_tokens"], 1024);
    assert!(seen.get("max_completion_tokens").is_none(), "{seen}");
    gw.shutdown().await;
}

/// Messages with every kind of field a client may send.
fn rich_messages(with_system: bool) -> Value {
    let mut m = vec![
        json!({"role": "user", "name": "alice", "content": [{"type": "text", "text": "Weather in Oslo?"}]}),
        json!({"role": "assistant", "content": null, "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\":\"Oslo\"}"}}]}),
        json!({"role": "tool", "tool_call_id": "c1", "content": "sunny"}),
    ];
    if with_system {
        m.insert(0, json!({"role": "system", "content": "Mine."}));
    }
    Value::Array(m)
}

#[tokio::test]
async fn shaper_prepends_the_system_prompt_keeping_every_message() {
    let echo = EchoEngine::start().await;
    let body = pool("p", &[echo.url()], "")
        + &tenant("pre", "p", KEY, "")
        + &plugin(
            "request-shaper",
            r#"{ system_prompt = { text = "You are Acme's assistant.", mode = "prepend" } }"#,
        )
        + &tenant("ifm", "p", "sk-test-ifm", "")
        + &plugin(
            "request-shaper",
            r#"{ system_prompt = { text = "You are Acme's assistant.", mode = "if-missing" } }"#,
        );
    let gw = start(&body).await;
    let system = json!({"role": "system", "content": "You are Acme's assistant."});

    for (key, with_system, prepended) in [
        (KEY, true, true),
        (KEY, false, true),
        ("sk-test-ifm", false, true),
        ("sk-test-ifm", true, false),
    ] {
        let messages = rich_messages(with_system);
        let req = json!({"model": MODEL, "messages": messages});
        ok_json(post(&gw, key).json(&req)).await;
        let seen = last_body(&echo)["messages"].clone();
        let want = if prepended {
            let mut all = vec![system.clone()];
            all.extend(messages.as_array().unwrap().iter().cloned());
            Value::Array(all)
        } else {
            messages
        };
        assert_eq!(seen, want, "key {key}, own system message: {with_system}");
    }
    gw.shutdown().await;
}

#[tokio::test]
async fn shaper_routes_by_header_and_task_only_to_allowed_pools() {
    let a = EchoEngine::start().await;
    let b = EchoEngine::start().await;
    let c = EchoEngine::start().await;
    let d = EchoEngine::start().await;
    let body = pool("a", &[a.url()], "")
        + &pool("b", &[b.url()], "")
        + &pool("c", &[c.url()], "")
        + &pool("d", &[d.url()], "")
        + &tenant("acme", "a", KEY, "extra_pools = [\"b\", \"c\"]")
        + &plugin(
            "request-shaper",
            r#"{ routes = { header = "x-sluice-pool", allowed_pools = ["a", "b", "d"], tasks = { batch = "b" } } }"#,
        );
    let gw = start(&body).await;
    let req = chat(MODEL, false);

    ok_json(post(&gw, KEY).json(&req)).await;
    assert_eq!(
        (seen_count(&a), seen_count(&b)),
        (1, 0),
        "no header: own pool"
    );

    ok_json(post(&gw, KEY).header("x-sluice-pool", "b").json(&req)).await;
    assert_eq!((seen_count(&a), seen_count(&b)), (1, 1), "header: pool b");

    ok_json(post(&gw, KEY).header("x-sluice-task", "batch").json(&req)).await;
    assert_eq!((seen_count(&a), seen_count(&b)), (1, 2), "task: pool b");

    // A pool the tenant may use, but not one the header may pick.
    let (s, e, _) = error_of(
        post(&gw, KEY)
            .header("x-sluice-pool", "c")
            .json(&req)
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(
        (s, e["code"].as_str(), e["layer"].as_str()),
        (400, Some("invalid_pool"), Some("customer"))
    );

    // The plugin allows it, but the tenant may not use pool d: refused, and
    // the request never reaches d.
    let resp = post(&gw, KEY)
        .header("x-sluice-pool", "d")
        .json(&req)
        .send()
        .await
        .unwrap();
    let (s, e, _) = error_of(resp).await;
    assert_eq!(
        (s, e["code"].as_str(), e["layer"].as_str()),
        (500, Some("plugin_bad_decision"), Some("plugin")),
        "{e}"
    );

    assert_eq!(
        (
            seen_count(&a),
            seen_count(&b),
            seen_count(&c),
            seen_count(&d)
        ),
        (1, 2, 0, 0)
    );
    gw.shutdown().await;
}

// --- rate-limit --------------------------------------------------------------

#[tokio::test]
async fn request_burst_admits_exactly_the_burst() {
    let engine = sim_engine(&["--ttft", "1", "--tpot", "1"]).await;
    let body = pool("p", &[url(&engine)], "")
        + &tenant("acme", "p", KEY, "")
        + &plugin(
            "rate-limit",
            "{ requests_per_minute = 1, request_burst = 10 }",
        );
    let gw = start(&body).await;
    let mut req = chat(MODEL, false);
    req["max_tokens"] = json!(4);

    let mut admitted = 0;
    let mut refused = 0;
    for resp in burst(&gw, KEY, &req, 40).await {
        if resp.status() == 200 {
            admitted += 1;
            continue;
        }
        let (s, e, h) = error_of(resp).await;
        assert_eq!(
            (s, e["code"].as_str(), e["layer"].as_str()),
            (429, Some("rate_limit_exceeded"), Some("customer")),
            "{e}"
        );
        assert!(retry_after(&h) >= 1);
        refused += 1;
    }
    assert_eq!((admitted, refused), (10, 30));
    gw.shutdown().await;
}

#[tokio::test]
async fn per_key_request_buckets_are_independent() {
    let engine = sim_engine(&["--ttft", "1", "--tpot", "1"]).await;
    let other = "sk-test-acme-2";
    let body = pool("p", &[url(&engine)], "")
        + &tenant("acme", "p", KEY, "")
        + &api_key("acme-key-2", other)
        + &plugin(
            "rate-limit",
            "{ per_key = { requests_per_minute = 1, request_burst = 2 } }",
        );
    let gw = start(&body).await;
    let mut req = chat(MODEL, false);
    req["max_tokens"] = json!(4);

    for key in [KEY, other] {
        for _ in 0..2 {
            ok_json(post(&gw, key).json(&req)).await;
        }
        let (s, e, h) = error_of(post(&gw, key).json(&req).send().await.unwrap()).await;
        assert_eq!(
            (s, e["code"].as_str(), e["layer"].as_str()),
            (429, Some("rate_limit_exceeded"), Some("customer")),
            "{key}"
        );
        assert!(
            e["message"].as_str().unwrap().contains("API key limit"),
            "{e}"
        );
        assert!(retry_after(&h) >= 1);
    }
    gw.shutdown().await;
}

#[tokio::test]
async fn concurrent_token_burst_never_overshoots() {
    let engine = sim_engine(&["--ttft", "1", "--tpot", "1"]).await;
    const BURST: u64 = 1000;
    const MAX_TOKENS: u64 = 100;
    // A slow refill: nothing comes back during the test.
    let body = pool("p", &[url(&engine)], "")
        + &tenant("acme", "p", KEY, "")
        + &plugin(
            "rate-limit",
            &format!("{{ tokens_per_minute = 1, token_burst = {BURST} }}"),
        );
    let gw = start(&body).await;
    // Streams that stall after their first token: admitted requests stay in
    // flight, holding their reservations, until the end of the test.
    let mut req = chat(MODEL, true);
    req["max_tokens"] = json!(MAX_TOKENS);
    req["sim"] = json!({"fault": "stall"});

    let mut held = Vec::new();
    let mut refused = 0;
    for resp in burst(&gw, KEY, &req, 40).await {
        if resp.status() == 200 {
            held.push(resp);
            continue;
        }
        let (s, e, h) = error_of(resp).await;
        assert_eq!(
            (s, e["code"].as_str(), e["layer"].as_str()),
            (429, Some("token_limit_exceeded"), Some("customer")),
            "{e}"
        );
        assert!(retry_after(&h) >= 1);
        refused += 1;
    }
    let admitted = held.len() as u64;
    assert_eq!(admitted + refused, 40);
    // Each request reserves its estimated input (the text plus per-message
    // overhead: more than 4 tokens) plus max_tokens.
    let estimate_low = MAX_TOKENS + 5;
    let estimate_high = MAX_TOKENS + 40;
    assert!(
        admitted * estimate_low <= BURST,
        "{admitted} requests admitted: more than the burst can hold"
    );
    assert!(
        admitted >= BURST / estimate_high,
        "only {admitted} admitted: the burst was not used"
    );
    drop(held);
    gw.shutdown().await;
}

/// Tokens per minute 1 (no refill to speak of), burst 300; each request
/// reserves its input plus max_tokens 200 (over 200), so without settlement
/// only one request could ever pass. The sim answers 5 tokens.
async fn settling_gateway() -> (sluice::sim::SimHandle, Gateway) {
    let engine = sim_engine(&["--ttft", "1", "--tpot", "1"]).await;
    let body = pool("p", &[url(&engine)], "")
        + &tenant("acme", "p", KEY, "")
        + &plugin("rate-limit", "{ tokens_per_minute = 1, token_burst = 300 }");
    (engine, start(&body).await)
}

fn small_answer(stream: bool) -> Value {
    let mut req = chat(MODEL, stream);
    req["max_tokens"] = json!(200);
    req["sim"] = json!({"output_tokens": 5});
    req
}

#[tokio::test]
async fn token_reservations_settle_against_usage() {
    let (_engine, gw) = settling_gateway().await;
    let req = small_answer(false);
    for i in 0..3 {
        let v = ok_json(post(&gw, KEY).json(&req)).await;
        assert_eq!(v["usage"]["completion_tokens"], 5, "request {i}");
    }

    // The bucket still bites: one request held in flight reserves over 200
    // of what is left, and the next one is refused.
    let mut hold = small_answer(true);
    hold["sim"] = json!({"fault": "stall"});
    let held = post(&gw, KEY).json(&hold).send().await.unwrap();
    assert_eq!(held.status(), 200);
    let (s, e, h) = error_of(post(&gw, KEY).json(&req).send().await.unwrap()).await;
    assert_eq!(
        (s, e["code"].as_str(), e["layer"].as_str()),
        (429, Some("token_limit_exceeded"), Some("customer"))
    );
    assert!(retry_after(&h) >= 1);
    drop(held);
    gw.shutdown().await;
}

#[tokio::test]
async fn streams_settle_and_usage_reaches_only_clients_that_asked() {
    let (_engine, gw) = settling_gateway().await;

    // No include_usage: sluice asks the engine for usage (to settle) but the
    // client's stream has no usage chunk.
    let data = ok_stream(post(&gw, KEY).json(&small_answer(true))).await;
    assert_eq!(data.last().map(String::as_str), Some("[DONE]"));
    let chunks = parse_chunks(&data);
    assert!(
        chunks.iter().any(|c| c["choices"][0]["delta"]["content"]
            .as_str()
            .is_some_and(|s| !s.is_empty())),
        "{data:?}"
    );
    assert!(
        chunks
            .iter()
            .all(|c| !is_usage_only(c) && c.get("usage").is_none_or(Value::is_null)),
        "a usage chunk reached a client that did not ask: {data:?}"
    );

    // The first stream settled: the next one is admitted; it asked for usage
    // and gets it.
    let mut req = small_answer(true);
    req["stream_options"] = json!({"include_usage": true});
    let resp = admitted_soon(&gw, KEY, &req).await;
    let data = sse_data(&ok_text(resp).await);
    assert_eq!(data.last().map(String::as_str), Some("[DONE]"));
    let chunks = parse_chunks(&data);
    let usage: Vec<&Value> = chunks.iter().filter(|c| is_usage_only(c)).collect();
    assert_eq!(usage.len(), 1, "{data:?}");
    assert_eq!(usage[0]["usage"]["completion_tokens"], 5);

    // And that one settled too.
    let resp = admitted_soon(&gw, KEY, &small_answer(false)).await;
    ok_text(resp).await;
    gw.shutdown().await;
}

#[tokio::test]
async fn a_refused_request_gives_back_what_an_earlier_bucket_reserved() {
    // Per-key buckets are drawn before the tenant's. A request the tenant
    // bucket refuses must not keep the per-key reservation it made.
    let engine = sim_engine(&["--ttft", "1", "--tpot", "1"]).await;
    let second = "sk-test-acme-2";
    let body = pool("p", &[url(&engine)], "")
        + &tenant("acme", "p", KEY, "")
        + &api_key("acme-key-2", second)
        + &plugin(
            "rate-limit",
            "{ tokens_per_minute = 1, token_burst = 300, per_key = { tokens_per_minute = 1, token_burst = 250 } }",
        );
    let gw = start(&body).await;

    // The first key uses about 160 of the tenant's 300 for good.
    let mut req = chat(MODEL, false);
    req["max_tokens"] = json!(200);
    req["sim"] = json!({"output_tokens": 150});
    let v = ok_json(post(&gw, KEY).json(&req)).await;
    assert_eq!(v["usage"]["completion_tokens"], 150);
    assert!(v["usage"]["prompt_tokens"].as_u64().unwrap() < 40, "{v}");

    // The second key: its own bucket (250) covers ~209, the tenant's (~140)
    // does not.
    let (s, e, _) = error_of(post(&gw, second).json(&req).send().await.unwrap()).await;
    assert_eq!(
        (s, e["code"].as_str()),
        (429, Some("token_limit_exceeded")),
        "{e}"
    );
    assert!(e["message"].as_str().unwrap().contains("tenant"), "{e}");

    // ~59 tokens: fits the tenant's ~140, and the key's bucket only if the
    // refused request's ~209 came back (250 - 209 = 41 otherwise).
    req["max_tokens"] = json!(50);
    req["sim"] = json!({"output_tokens": 5});
    ok_json(post(&gw, second).json(&req)).await;
    gw.shutdown().await;
}

// --- context-cap -------------------------------------------------------------

#[tokio::test]
async fn context_cap_refuses_long_prompts_before_the_engine() {
    let echo = EchoEngine::start().await;
    let body = pool("p", &[echo.url()], "")
        + &tenant("acme", "p", KEY, "")
        + &plugin("context-cap", "{ max_input_tokens = 50 }");
    let gw = start(&body).await;

    let mut req = chat(MODEL, false);
    req["messages"][0]["content"] = json!("word ".repeat(200));
    let (s, e, _) = error_of(post(&gw, KEY).json(&req).send().await.unwrap()).await;
    assert_eq!(
        (s, e["code"].as_str(), e["layer"].as_str()),
        (400, Some("context_length_exceeded"), Some("customer"))
    );
    assert!(
        e["message"]
            .as_str()
            .unwrap()
            .contains("the limit for deepseek-v4-flash is 50 input tokens"),
        "{e}"
    );
    assert_eq!(seen_count(&echo), 0, "the engine never saw it");

    // A short prompt passes.
    ok_json(post(&gw, KEY).json(&chat(MODEL, false))).await;
    assert_eq!(seen_count(&echo), 1);
    gw.shutdown().await;
}

#[tokio::test]
async fn context_cap_clamps_or_rejects_max_tokens() {
    let echo = EchoEngine::start().await;
    let oai = EchoEngine::start().await;
    let strict = "sk-test-strict";
    let body = pool("p", &[echo.url()], "")
        + &tenant("acme", "p", KEY, "")
        + &plugin("context-cap", "{ max_output_tokens = 100 }")
        + &tenant("strict", "p", strict, "")
        + &plugin(
            "context-cap",
            r#"{ max_output_tokens = 100, on_output_over = "reject" }"#,
        )
        + &pool("o", &[oai.url()], "dialect = \"openai\"")
        + &tenant("oai", "o", "sk-test-oai", "")
        + &plugin("context-cap", "{ max_output_tokens = 100 }");
    let gw = start(&body).await;

    for (field, asked, want) in [
        (Some("max_tokens"), 5000, 100),
        (Some("max_completion_tokens"), 5000, 100),
        (Some("max_tokens"), 50, 50),
        (None, 0, 100),
    ] {
        let mut req = chat(MODEL, false);
        if let Some(f) = field {
            req[f] = json!(asked);
        }
        ok_json(post(&gw, KEY).json(&req)).await;
        let seen = last_body(&echo);
        assert_eq!(seen["max_tokens"], want, "{field:?} {asked}: {seen}");
        assert!(seen.get("max_completion_tokens").is_none(), "{seen}");
    }

    let before = seen_count(&echo);
    let mut req = chat(MODEL, false);
    req["max_tokens"] = json!(5000);
    let (s, e, _) = error_of(post(&gw, strict).json(&req).send().await.unwrap()).await;
    assert_eq!(
        (s, e["code"].as_str(), e["layer"].as_str()),
        (400, Some("max_tokens_exceeded"), Some("customer"))
    );
    assert_eq!(seen_count(&echo), before, "the engine never saw it");
    req["max_tokens"] = json!(100);
    ok_json(post(&gw, strict).json(&req)).await;
    assert_eq!(last_body(&echo)["max_tokens"], 100);

    // An `openai` pool reads max_completion_tokens: the cap goes there and
    // no larger max_tokens is left behind.
    for field in ["max_tokens", "max_completion_tokens"] {
        let mut req = chat(MODEL, false);
        req[field] = json!(5000);
        ok_json(post(&gw, "sk-test-oai").json(&req)).await;
        let seen = last_body(&oai);
        assert_eq!(seen["max_completion_tokens"], 100, "{field}: {seen}");
        assert!(seen.get("max_tokens").is_none(), "{field}: {seen}");
    }
    gw.shutdown().await;
}

// --- thinking-policy ---------------------------------------------------------

const THINKING: &str = r#"{ default = "allow", tasks = { agent = "force-on", autocomplete = "force-off" }, max_reasoning_effort = "medium" }"#;

#[tokio::test]
async fn thinking_is_forced_in_the_vllm_way() {
    let echo = EchoEngine::start().await;
    let body = pool("p", &[echo.url()], "")
        + &tenant("acme", "p", KEY, "")
        + &plugin("thinking-policy", THINKING);
    let gw = start(&body).await;

    // Forced on, whatever the request said and however it said it.
    let mut req = chat(MODEL, false);
    req["chat_template_kwargs"] = json!({"enable_thinking": false, "keep": 1});
    req["thinking"] = json!({"type": "disabled"});
    ok_json(post(&gw, KEY).header("x-sluice-task", "agent").json(&req)).await;
    let seen = last_body(&echo);
    assert_eq!(
        seen["chat_template_kwargs"],
        json!({"keep": 1, "thinking": true})
    );
    assert!(seen.get("thinking").is_none(), "{seen}");

    // Forced off: the switch off, the effort gone.
    let mut req = chat(MODEL, false);
    req["chat_template_kwargs"] = json!({"thinking": true});
    req["reasoning_effort"] = json!("high");
    ok_json(
        post(&gw, KEY)
            .header("x-sluice-task", "autocomplete")
            .json(&req),
    )
    .await;
    let seen = last_body(&echo);
    assert_eq!(seen["chat_template_kwargs"]["thinking"], false);
    assert!(seen.get("reasoning_effort").is_none(), "{seen}");

    // Allowed: kept, with the effort capped at the ceiling.
    req["reasoning_effort"] = json!("high");
    ok_json(post(&gw, KEY).json(&req)).await;
    let seen = last_body(&echo);
    assert_eq!(seen["chat_template_kwargs"]["thinking"], true);
    assert_eq!(seen["reasoning_effort"], "medium");
    req["reasoning_effort"] = json!("low");
    ok_json(post(&gw, KEY).json(&req)).await;
    assert_eq!(last_body(&echo)["reasoning_effort"], "low");

    // Nothing said, no task: left to the engine.
    ok_json(post(&gw, KEY).json(&chat(MODEL, false))).await;
    let seen = last_body(&echo);
    assert!(
        seen.get("chat_template_kwargs").is_none() && seen.get("thinking").is_none(),
        "{seen}"
    );
    gw.shutdown().await;
}

#[tokio::test]
async fn thinking_is_written_the_deepseek_way_on_deepseek_pools() {
    let echo = EchoEngine::start().await;
    let body = pool("p", &[echo.url()], "dialect = \"deepseek\"")
        + &tenant("acme", "p", KEY, "")
        + &plugin("thinking-policy", THINKING);
    let gw = start(&body).await;

    let mut req = chat(MODEL, false);
    req["chat_template_kwargs"] = json!({"thinking": false, "keep": 1});
    ok_json(post(&gw, KEY).header("x-sluice-task", "agent").json(&req)).await;
    let seen = last_body(&echo);
    assert_eq!(seen["thinking"], json!({"type": "enabled"}));
    assert_eq!(seen["chat_template_kwargs"], json!({"keep": 1}));

    let mut req = chat(MODEL, false);
    req["chat_template_kwargs"] = json!({"thinking": true});
    ok_json(
        post(&gw, KEY)
            .header("x-sluice-task", "autocomplete")
            .json(&req),
    )
    .await;
    let seen = last_body(&echo);
    assert_eq!(seen["thinking"], json!({"type": "disabled"}));
    assert!(
        seen["chat_template_kwargs"].get("thinking").is_none(),
        "{seen}"
    );
    gw.shutdown().await;
}

#[tokio::test]
async fn forced_thinking_makes_the_engine_reason() {
    let engine = sim_engine(&["--ttft", "1", "--tpot", "1"]).await;
    let body = pool("v", &[url(&engine)], "")
        + &pool("d", &[url(&engine)], "dialect = \"deepseek\"")
        + &tenant("acme", "v", KEY, "")
        + &plugin("thinking-policy", THINKING)
        + &tenant("deep", "d", "sk-test-deep", "")
        + &plugin("thinking-policy", THINKING);
    let gw = start(&body).await;
    let reasoning = |v: &Value| {
        v["choices"][0]["message"]["reasoning_content"]
            .as_str()
            .is_some_and(|s| !s.is_empty())
    };

    for key in [KEY, "sk-test-deep"] {
        let v = ok_json(
            post(&gw, key)
                .header("x-sluice-task", "agent")
                .json(&chat(MODEL, false)),
        )
        .await;
        assert!(reasoning(&v), "{key}: {v}");

        let v = ok_json(post(&gw, key).json(&chat(MODEL, false))).await;
        assert!(!reasoning(&v), "{key}: thinking is off by default: {v}");

        let mut req = chat(MODEL, false);
        req["chat_template_kwargs"] = json!({"thinking": true});
        let v = ok_json(
            post(&gw, key)
                .header("x-sluice-task", "autocomplete")
                .json(&req),
        )
        .await;
        assert!(!reasoning(&v), "{key}: forced off: {v}");
    }
    gw.shutdown().await;
}

// --- output-validator --------------------------------------------------------

fn city_schema() -> Value {
    json!({
        "type": "object",
        "properties": {"city": {"type": "string"}, "temp_c": {"type": "number"}},
        "required": ["city", "temp_c"],
        "additionalProperties": false
    })
}

fn schema_request(stream: bool) -> Value {
    let mut req = chat(MODEL, stream);
    req["response_format"] = json!({
        "type": "json_schema",
        "json_schema": {"name": "weather", "schema": city_schema()}
    });
    req
}

async fn validator_gateway() -> (sluice::sim::SimHandle, Gateway) {
    let engine = sim_engine(&["--ttft", "1", "--tpot", "1"]).await;
    let body = pool("p", &[url(&engine)], "")
        + &tenant("acme", "p", KEY, "")
        + &plugin("output-validator", "{ max_retries = 2 }");
    (engine, start(&body).await)
}

#[tokio::test]
async fn valid_json_answers_pass_the_validator() {
    let (engine, gw) = validator_gateway().await;
    let before = engine.metrics().completed;
    let v = ok_json(post(&gw, KEY).json(&schema_request(false))).await;
    let content = v["choices"][0]["message"]["content"].as_str().unwrap();
    let parsed: Value = serde_json::from_str(content).expect("content is JSON");
    assert!(parsed["city"].is_string(), "{parsed}");
    assert!(parsed["temp_c"].is_number(), "{parsed}");
    assert_eq!(engine.metrics().completed - before, 1, "no retry");

    let data = ok_stream(post(&gw, KEY).json(&schema_request(true))).await;
    assert_eq!(data.last().map(String::as_str), Some("[DONE]"), "{data:?}");
    let content: String = parse_chunks(&data)
        .iter()
        .filter_map(|c| {
            c["choices"][0]["delta"]["content"]
                .as_str()
                .map(str::to_owned)
        })
        .collect();
    let parsed: Value = serde_json::from_str(&content).expect("streamed content is JSON");
    assert!(parsed["city"].is_string(), "{parsed}");
    gw.shutdown().await;
}

#[tokio::test]
async fn invalid_json_is_retried_then_refused_with_422() {
    let (engine, gw) = validator_gateway().await;
    let before = engine.metrics().completed;
    let mut req = schema_request(false);
    req["sim"] = json!({"fault": "invalid_json"});
    let (s, e, _) = error_of(post(&gw, KEY).json(&req).send().await.unwrap()).await;
    assert_eq!(
        (s, e["code"].as_str(), e["layer"].as_str()),
        (422, Some("output_validation_failed"), Some("customer")),
        "{e}"
    );
    assert!(
        e["message"].as_str().unwrap().contains("(after 2 retries)"),
        "{e}"
    );
    assert_eq!(
        engine.metrics().completed - before,
        3,
        "the first answer and max_retries = 2 retries"
    );
    gw.shutdown().await;
}

#[tokio::test]
async fn invalid_json_stream_ends_with_an_error_event_not_done() {
    let (_engine, gw) = validator_gateway().await;
    let mut req = schema_request(true);
    req["sim"] = json!({"fault": "invalid_json"});
    let resp = post(&gw, KEY).json(&req).send().await.unwrap();
    assert_eq!(resp.status(), 200, "the status was sent before the end");
    let trace = resp.headers()["traceparent"].to_str().unwrap()[3..35].to_owned();
    let data = sse_data(&resp.text().await.unwrap());
    assert!(!data.iter().any(|d| d == "[DONE]"), "{data:?}");
    let last: Value = serde_json::from_str(data.last().unwrap()).unwrap();
    let e = &last["error"];
    assert_eq!(
        (e["code"].as_str(), e["layer"].as_str()),
        (Some("output_validation_failed"), Some("customer")),
        "{last}"
    );
    assert_eq!(e["trace_id"], trace);
    assert_eq!(
        data.iter().filter(|d| d.contains("\"error\"")).count(),
        1,
        "one error event: {data:?}"
    );
    assert!(
        data.len() > 1,
        "the answer's chunks were relayed before the error"
    );
    gw.shutdown().await;
}

fn weather_tools() -> Value {
    json!([{
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Current weather",
            "parameters": city_schema()
        }
    }])
}

#[tokio::test]
async fn valid_tool_calls_pass_the_validator() {
    let (engine, gw) = validator_gateway().await;
    let mut req = chat(MODEL, false);
    req["tools"] = weather_tools();
    let before = engine.metrics().completed;
    let v = ok_json(post(&gw, KEY).json(&req)).await;
    assert_eq!(engine.metrics().completed - before, 1, "no retry");
    let choice = &v["choices"][0];
    assert_eq!(choice["finish_reason"], "tool_calls");
    let f = &choice["message"]["tool_calls"][0]["function"];
    assert_eq!(f["name"], "get_weather");
    let args: Value = serde_json::from_str(f["arguments"].as_str().unwrap()).unwrap();
    assert!(args["city"].is_string(), "{args}");

    req["stream"] = json!(true);
    let data = ok_stream(post(&gw, KEY).json(&req)).await;
    assert_eq!(data.last().map(String::as_str), Some("[DONE]"), "{data:?}");
    let chunks = parse_chunks(&data);
    assert!(chunks.iter().all(|c| c.get("error").is_none()), "{data:?}");
    let args: String = chunks
        .iter()
        .filter_map(|c| {
            c["choices"][0]["delta"]["tool_calls"][0]["function"]["arguments"]
                .as_str()
                .map(str::to_owned)
        })
        .collect();
    let args: Value = serde_json::from_str(&args).expect("streamed arguments are JSON");
    assert!(args["city"].is_string(), "{args}");
    gw.shutdown().await;
}

#[tokio::test]
async fn invalid_tool_arguments_are_retried_with_tool_feedback_or_refused_in_streams() {
    let (engine, gw) = validator_gateway().await;
    let mut req = chat(MODEL, false);
    req["tools"] = weather_tools();
    req["sim"] = json!({"fault": "invalid_json"});
    let before = engine.metrics().completed;
    // Non-stream: the feedback goes back as a tool message answering the bad
    // call (the protocol's way); the engine then answers in text, which passes.
    let resp = post(&gw, KEY).json(&req).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    let v: Value = resp.json().await.unwrap();
    assert!(v["choices"][0]["message"]["tool_calls"].is_null(), "{v}");
    assert!(
        v["choices"][0]["message"]["content"]
            .as_str()
            .is_some_and(|c| !c.is_empty()),
        "{v}"
    );
    assert_eq!(engine.metrics().completed - before, 2, "one retry");

    req["stream"] = json!(true);
    let data = ok_stream(post(&gw, KEY).json(&req)).await;
    assert!(!data.iter().any(|d| d == "[DONE]"), "{data:?}");
    let last: Value = serde_json::from_str(data.last().unwrap()).unwrap();
    assert_eq!(last["error"]["code"], "output_validation_failed", "{last}");
    gw.shutdown().await;
}

// --- the whole chain ---------------------------------------------------------

#[tokio::test]
async fn the_five_plugins_chained_serve_requests_and_streams() {
    let engine = sim_engine(&["--ttft", "1", "--tpot", "1"]).await;
    let body = pool("p", &[url(&engine)], "")
        + &tenant("acme", "p", KEY, "max_concurrent_requests = 64")
        + &plugin(
            "request-shaper",
            r#"{ model_aliases = { "v4" = "deepseek-v4-flash", "flash" = "deepseek-v4-flash" }, defaults = { temperature = 0.6 }, clamp = { temperature = [0.0, 1.5], max_tokens = [1, 16384] } }"#,
        )
        + &plugin(
            "rate-limit",
            "{ requests_per_minute = 600, request_burst = 50, tokens_per_minute = 300000 }",
        )
        + &plugin(
            "context-cap",
            "{ max_input_tokens = 32768, max_output_tokens = 8192 }",
        )
        + &plugin(
            "thinking-policy",
            r#"{ default = "allow", tasks = { "agent" = "force-on", "autocomplete" = "force-off" }, max_reasoning_effort = "medium" }"#,
        )
        + &plugin("output-validator", "{ max_retries = 1 }");
    let gw = start(&body).await;

    let v = ok_json(post(&gw, KEY).json(&chat("v4", false))).await;
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(v["model"], MODEL);
    assert!(
        !v["choices"][0]["message"]["content"]
            .as_str()
            .unwrap()
            .is_empty()
    );
    assert!(v["usage"]["prompt_tokens"].as_u64().unwrap() > 0);

    let data = ok_stream(
        post(&gw, KEY)
            .header("x-sluice-task", "agent")
            .json(&chat("flash", true)),
    )
    .await;
    assert_eq!(data.last().map(String::as_str), Some("[DONE]"), "{data:?}");
    let chunks = parse_chunks(&data);
    let text = |field: &str| -> String {
        chunks
            .iter()
            .filter_map(|c| c["choices"][0]["delta"][field].as_str().map(str::to_owned))
            .collect()
    };
    assert!(!text("content").is_empty(), "{data:?}");
    assert!(!text("reasoning_content").is_empty(), "agent task thinks");
    assert!(
        chunks
            .iter()
            .all(|c| c.get("error").is_none() && !is_usage_only(c)),
        "{data:?}"
    );
    gw.shutdown().await;
}

/// A gateway config with one tenant whose chain is `plugins` (from
/// [`plugin`]); the pool's engine is never called.
fn chain_config(plugins: &str) -> sluice::config::Config {
    let text = "[server]\nhttp = \"127.0.0.1:0\"\n".to_owned()
        + &pool("p", &["http://127.0.0.1:9".to_owned()], "")
        + &tenant("acme", "p", KEY, "")
        + plugins;
    let cfg = sluice::config::Config::parse(&text, std::path::Path::new("."))
        .expect("test config parses");
    assert!(cfg.validate().is_empty(), "{:?}", cfg.validate());
    cfg
}

/// The gateway's load error for a chain, as `sluice serve` would print it.
fn load_error(plugins: &str) -> String {
    match sluice::pipeline::Gateway::new(chain_config(plugins)) {
        Ok(_) => panic!("the chain loaded: {plugins}"),
        Err(e) => format!("{e:#}"),
    }
}

#[tokio::test]
async fn a_refused_config_stops_the_chain_from_loading_with_the_plugins_message() {
    // Refused in `describe`, when the chain loads: not per call with a 500.
    let e = load_error(
        &(plugin("rate-limit", "{ requests_per_minute = 60 }")
            + &plugin("context-cap", r#"{ max_input_tokens = "lots" }"#)),
    );
    assert_eq!(
        e,
        r#"tenants[0].plugins[1]: the plugin refused its config: max_input_tokens: invalid type: string "lots", expected u32"#
    );

    // Every built-in checks its config (serde's and its own `check`).
    for name in [
        "request-shaper",
        "rate-limit",
        "context-cap",
        "thinking-policy",
        "output-validator",
    ] {
        let e = load_error(&plugin(name, "{ max_tokenz = 5 }"));
        assert!(
            e.starts_with("tenants[0].plugins[0]: the plugin refused its config: max_tokenz: unknown field `max_tokenz`"),
            "{name}: {e}"
        );
    }
    let e = load_error(&plugin(
        "context-cap",
        "{ models = { small = { max_output_tokens = 0 } } }",
    ));
    assert!(
        e.ends_with("the plugin refused its config: models.small.max_output_tokens: must be at least 1 (omit it for no cap)"),
        "{e}"
    );

    // The same configs, well formed, load.
    sluice::pipeline::Gateway::new(chain_config(
        &(plugin("rate-limit", "{ requests_per_minute = 60 }")
            + &plugin("context-cap", "{ max_input_tokens = 100 }")),
    ))
    .expect("a good chain loads");
}

#[tokio::test]
async fn more_tenants_than_instance_slots_share_the_pool() {
    // Six tenants, one plugin each, and room for four instances: an idle
    // instance of one tenant gives its slot to the next that needs one.
    let echo = EchoEngine::start().await;
    let mut body = "[plugin_host]\nmax_instances = 4\n".to_owned() + &pool("p", &[echo.url()], "");
    for t in 0..6 {
        body += &tenant(&format!("t{t}"), "p", &format!("sk-test-t{t}"), "");
        body += &plugin("context-cap", "{ max_input_tokens = 1000 }");
    }
    let gw = start(&body).await;
    for round in 0..3 {
        for t in 0..6 {
            let v = ok_json(post(&gw, &format!("sk-test-t{t}")).json(&chat(MODEL, false))).await;
            assert_eq!(
                v["choices"][0]["message"]["content"], "echo",
                "t{t}, round {round}"
            );
        }
    }
    assert_eq!(seen_count(&echo), 18);
    gw.shutdown().await;
}
