//! `/metrics` on the ops listener after a known workload over real sockets:
//! exact counts per label set, tokens equal to the usage the engine
//! reported, cost by the configured prices, histogram counts, and a body
//! that parses as Prometheus text.

mod support;

use std::collections::BTreeMap;

use serde_json::{Value, json};
use support::*;

const MODEL: &str = "deepseek-v4-flash";
const ACME: &str = "sk-test-acme";
const CAPPED: &str = "sk-test-capped";
const LIMITED: &str = "sk-test-limited";
const EVIL: &str = "sk-test-evil";
const BROKEN: &str = "sk-test-broken";
const GHOST: &str = "sk-test-ghost";
const VALIDATED: &str = "sk-test-validated";

/// DeepSeek-like prices, USD per million tokens.
const HIT: f64 = 0.07;
const MISS: f64 = 0.27;
const OUT: f64 = 1.10;

/// One sample: metric name and its labels, sorted.
type Key = (String, Vec<(String, String)>);

/// Parse the Prometheus text format strictly: every line is a comment
/// (`# HELP` / `# TYPE`) or `name{labels} value`.
fn parse(text: &str) -> BTreeMap<Key, f64> {
    let mut out = BTreeMap::new();
    for line in text.lines() {
        if line.is_empty() {
            continue;
        }
        if let Some(c) = line.strip_prefix("# ") {
            assert!(
                c.starts_with("HELP ") || c.starts_with("TYPE "),
                "unknown comment: {line}"
            );
            continue;
        }
        let name_end = line
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
            .unwrap_or_else(|| panic!("no value: {line}"));
        let name = &line[..name_end];
        assert!(
            !name.is_empty() && !name.starts_with(|c: char| c.is_ascii_digit()),
            "bad metric name: {line}"
        );
        let mut rest = &line[name_end..];
        let mut labels = Vec::new();
        if let Some(r) = rest.strip_prefix('{') {
            let mut r = r;
            loop {
                if let Some(after) = r.strip_prefix('}') {
                    r = after;
                    break;
                }
                let eq = r.find('=').unwrap_or_else(|| panic!("bad label: {line}"));
                let key = &r[..eq];
                assert!(
                    !key.is_empty() && key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'),
                    "bad label name {key:?}: {line}"
                );
                r = r[eq + 1..]
                    .strip_prefix('"')
                    .unwrap_or_else(|| panic!("unquoted label value: {line}"));
                let mut value = String::new();
                let mut chars = r.char_indices();
                let end = loop {
                    match chars.next() {
                        Some((_, '\\')) => match chars.next() {
                            Some((_, 'n')) => value.push('\n'),
                            Some((_, c)) => value.push(c),
                            None => panic!("bad escape: {line}"),
                        },
                        Some((i, '"')) => break i,
                        Some((_, c)) => value.push(c),
                        None => panic!("unterminated label value: {line}"),
                    }
                };
                labels.push((key.to_owned(), value));
                r = &r[end + 1..];
                r = r.strip_prefix(',').unwrap_or(r);
            }
            rest = r;
        }
        let value = rest
            .strip_prefix(' ')
            .unwrap_or_else(|| panic!("no space before the value: {line}"));
        let value: f64 = match value {
            "+Inf" => f64::INFINITY,
            "-Inf" => f64::NEG_INFINITY,
            v => v
                .parse()
                .unwrap_or_else(|_| panic!("bad value {v:?}: {line}")),
        };
        labels.sort();
        assert!(
            out.insert((name.to_owned(), labels), value).is_none(),
            "duplicate sample: {line}"
        );
    }
    out
}

struct Scrape(BTreeMap<Key, f64>);

impl Scrape {
    /// The sample with exactly these labels; 0 when absent (a counter not
    /// yet created).
    fn get(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        let mut l: Vec<(String, String)> = labels
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        l.sort();
        self.0.get(&(name.to_owned(), l)).copied().unwrap_or(0.0)
    }

    /// Sum over every sample of `name`.
    fn sum(&self, name: &str) -> f64 {
        self.0
            .iter()
            .filter(|((n, _), _)| n == name)
            .map(|(_, v)| v)
            .sum()
    }

    /// Every sample of `name` whose labels include these.
    fn matching(&self, name: &str, labels: &[(&str, &str)]) -> Vec<(Vec<(String, String)>, f64)> {
        self.0
            .iter()
            .filter(|((n, l), _)| {
                n == name
                    && labels
                        .iter()
                        .all(|(k, v)| l.iter().any(|(lk, lv)| lk == k && lv == v))
            })
            .map(|((_, l), v)| (l.clone(), *v))
            .collect()
    }
}

async fn scrape(gw: &Gateway) -> (String, String) {
    let resp = http_client()
        .get(format!("http://{}/metrics", gw.ops))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let ct = resp.headers()["content-type"].to_str().unwrap().to_owned();
    (ct, resp.text().await.unwrap())
}

/// Usage the engine reported, summed.
#[derive(Default, Debug, Clone, Copy)]
struct Tokens {
    input: u64,
    cached: u64,
    output: u64,
    reasoning: u64,
}

impl Tokens {
    fn add(&mut self, usage: &Value) {
        let n = |p: &str| usage.pointer(p).and_then(Value::as_u64).unwrap_or(0);
        self.input += n("/prompt_tokens");
        self.cached += n("/prompt_tokens_details/cached_tokens");
        self.output += n("/completion_tokens");
        self.reasoning += n("/completion_tokens_details/reasoning_tokens");
    }

    fn cost(&self) -> f64 {
        (self.cached as f64 * HIT
            + (self.input - self.cached) as f64 * MISS
            + self.output as f64 * OUT)
            / 1e6
    }
}

fn post(gw: &Gateway, key: &str, body: &Value) -> reqwest::RequestBuilder {
    http_client()
        .post(gw.http_url("/v1/chat/completions"))
        .bearer_auth(key)
        .json(body)
}

/// A prompt long enough for the engine's prefix cache to hit on repeats.
fn request(stream: bool, output_tokens: u64) -> Value {
    let mut r = chat(MODEL, stream);
    r["messages"][0]["content"] = json!("Tell me about rivers and their deltas. ".repeat(20));
    r["sim"] = json!({"output_tokens": output_tokens});
    r
}

/// A successful non-stream request: its usage.
async fn whole(gw: &Gateway, key: &str, body: &Value) -> Value {
    let resp = post(gw, key, body).send().await.unwrap();
    let status = resp.status();
    let v: Value = resp.json().await.unwrap();
    assert_eq!(status, 200, "{v}");
    v["usage"].clone()
}

/// A stream: (HTTP status, its usage chunk's usage if any, whether it
/// ended with an error event).
async fn streamed(gw: &Gateway, key: &str, body: &Value) -> (u16, Option<Value>, bool) {
    let resp = post(gw, key, body).send().await.unwrap();
    let status = resp.status().as_u16();
    let text = resp.text().await.unwrap();
    let mut usage = None;
    let mut failed = false;
    for d in sse_data(&text) {
        if d == "[DONE]" {
            continue;
        }
        let v: Value = serde_json::from_str(&d).unwrap();
        if v.get("error").is_some() {
            failed = true;
        }
        if v["usage"].is_object() {
            usage = Some(v["usage"].clone());
        }
    }
    (status, usage, failed)
}

async fn status_of(req: reqwest::RequestBuilder) -> u16 {
    let resp = req.send().await.unwrap();
    let status = resp.status().as_u16();
    let _ = resp.bytes().await;
    status
}

#[tokio::test]
async fn metrics_count_a_known_workload_exactly() {
    let engine = sim_engine(&["--ttft", "1", "--tpot", "1"]).await;
    let five_hundred = json!({"error": {"message": "engine exploded", "type": "internal"}});
    let bad1 = EchoEngine::start_status(500, five_hundred.clone()).await;
    let bad2 = EchoEngine::start_status(500, five_hundred).await;
    // A port nobody listens on: connection refused.
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        format!("http://{}", l.local_addr().unwrap())
    };
    let hostile = format!("{}/hostile.wasm", env!("SLUICE_PLUGIN_COMPONENTS"));
    let config = pool("main", &[url(&engine)], "")
        + &pool("broken", &[bad1.url(), bad2.url()], "")
        + &pool("dead", std::slice::from_ref(&dead), "eject_for = \"1h\"")
        + &tenant("acme", "main", ACME, "")
        + &tenant("capped", "main", CAPPED, "")
        + "\n[[tenants.plugins]]\nbuiltin = \"context-cap\"\nconfig = { max_input_tokens = 50 }\n"
        + &tenant("limited", "main", LIMITED, "")
        + "\n[[tenants.plugins]]\nbuiltin = \"rate-limit\"\nconfig = { requests_per_minute = 1, request_burst = 1 }\n"
        + &tenant("evil", "main", EVIL, "")
        + &format!("\n[[tenants.plugins]]\npath = {hostile:?}\nconfig = {{ mode = \"trap\" }}\n")
        + &tenant("validated", "main", VALIDATED, "")
        + "\n[[tenants.plugins]]\nbuiltin = \"output-validator\"\nconfig = { max_retries = 1 }\n"
        + &tenant("broken", "broken", BROKEN, "")
        + &tenant("ghost", "dead", GHOST, "")
        + &format!(
            "\n[[prices]]\nmodel = {MODEL:?}\ninput_cache_hit_per_million = {HIT}\ninput_cache_miss_per_million = {MISS}\noutput_per_million = {OUT}\n"
        );
    let gw = Gateway::start(&config).await;

    // --- acme: 3 whole answers (one thinking), 3 streams with usage asked
    // for and one without, one stream the engine drops, one unknown model.
    let mut acme = Tokens::default();
    for i in 0..3 {
        let mut body = request(false, 4 + i);
        if i == 2 {
            body["chat_template_kwargs"] = json!({"thinking": true});
        }
        acme.add(&whole(&gw, ACME, &body).await);
    }
    let mut streams_with_usage = 0;
    for i in 0..3 {
        let mut body = request(true, 3 + i);
        body["stream_options"] = json!({"include_usage": true});
        let (status, usage, failed) = streamed(&gw, ACME, &body).await;
        assert_eq!((status, failed), (200, false));
        acme.add(&usage.expect("the usage chunk"));
        streams_with_usage += 1;
    }
    let (status, usage, failed) = streamed(&gw, ACME, &request(true, 5)).await;
    assert_eq!((status, usage, failed), (200, None, false));
    let mut dropped = request(true, 40);
    dropped["stream_options"] = json!({"include_usage": true});
    dropped["sim"]["fault"] = json!("drop");
    let (drop_status, usage, failed) = streamed(&gw, ACME, &dropped).await;
    assert!(usage.is_none());
    // Normally the stream starts, then ends in an error event; if the engine
    // dropped before its first chunk, it is a plain 502.
    let drop_started = drop_status == 200;
    assert!(failed || drop_status == 502, "{drop_status}");
    assert_eq!(
        status_of(post(&gw, ACME, &chat("gpt-made-up", false))).await,
        404
    );

    // --- bad keys.
    for _ in 0..2 {
        assert_eq!(
            status_of(post(&gw, "sk-wrong", &request(false, 2))).await,
            401
        );
    }

    // --- a plugin rejection (context cap) and a short prompt that passes.
    let mut long = chat(MODEL, false);
    long["messages"][0]["content"] = json!("word ".repeat(200));
    assert_eq!(status_of(post(&gw, CAPPED, &long)).await, 400);
    let mut capped = Tokens::default();
    capped.add(&whole(&gw, CAPPED, &chat(MODEL, false)).await);

    // --- the request bucket: one passes, the next is refused.
    let mut limited = Tokens::default();
    limited.add(&whole(&gw, LIMITED, &chat(MODEL, false)).await);
    assert_eq!(
        status_of(post(&gw, LIMITED, &chat(MODEL, false))).await,
        429
    );

    // --- answers an output validator judges: a whole answer it accepts
    // (buffered), a stream it refuses at its end (after the usage chunk).
    let mut validated = Tokens::default();
    let mut schema = request(false, 20);
    let city =
        json!({"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]});
    schema["response_format"] =
        json!({"type": "json_schema", "json_schema": {"name": "w", "schema": city}});
    validated.add(&whole(&gw, VALIDATED, &schema).await);
    schema["stream"] = json!(true);
    schema["stream_options"] = json!({"include_usage": true});
    schema["sim"]["fault"] = json!("invalid_json");
    let (status, usage, failed) = streamed(&gw, VALIDATED, &schema).await;
    assert_eq!((status, failed), (200, true));
    validated.add(&usage.expect("the usage chunk came before the refusal"));

    // --- a plugin that traps, an engine 5xx on both replicas, a dead replica.
    assert_eq!(status_of(post(&gw, EVIL, &chat(MODEL, false))).await, 500);
    assert_eq!(status_of(post(&gw, BROKEN, &chat(MODEL, false))).await, 502);
    assert_eq!(status_of(post(&gw, GHOST, &chat(MODEL, false))).await, 502);

    // Every request is recorded when its last byte is relayed; the scrape
    // waits for the in-flight count to reach zero (bounded, no timing).
    let total = 3 + 4 + 1 + 1 + 2 + 2 + 2 + 2 + 3;
    let mut text = String::new();
    let mut ct = String::new();
    for _ in 0..250 {
        (ct, text) = scrape(&gw).await;
        let s = Scrape(parse(&text));
        if s.sum("sluice_requests_total") == total as f64
            && s.get("sluice_inflight_requests", &[]) == 0.0
        {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert!(ct.starts_with("text/plain; version=0.0.4"), "{ct}");
    let s = Scrape(parse(&text));
    assert_eq!(s.sum("sluice_requests_total"), total as f64, "{text}");
    assert_eq!(s.get("sluice_inflight_requests", &[]), 0.0, "{text}");

    // Requests by tenant, model, status and layer.
    let req = |tenant: &str, model: &str, status: &str, layer: &str| {
        s.get(
            "sluice_requests_total",
            &[
                ("tenant", tenant),
                ("model", model),
                ("status", status),
                ("layer", layer),
            ],
        )
    };
    assert_eq!(req("acme", MODEL, "200", "none"), 7.0, "{text}");
    assert_eq!(req("acme", MODEL, "502", "provider"), 1.0, "{text}");
    assert_eq!(req("acme", "other", "404", "customer"), 1.0, "{text}");
    assert_eq!(req("", "", "401", "customer"), 2.0, "{text}");
    assert_eq!(req("capped", MODEL, "400", "customer"), 1.0, "{text}");
    assert_eq!(req("capped", MODEL, "200", "none"), 1.0, "{text}");
    assert_eq!(req("limited", MODEL, "200", "none"), 1.0, "{text}");
    assert_eq!(req("limited", MODEL, "429", "customer"), 1.0, "{text}");
    assert_eq!(req("evil", MODEL, "500", "plugin"), 1.0, "{text}");
    assert_eq!(req("validated", MODEL, "200", "none"), 1.0, "{text}");
    assert_eq!(req("validated", MODEL, "422", "customer"), 1.0, "{text}");
    assert_eq!(req("broken", MODEL, "502", "provider"), 1.0, "{text}");
    assert_eq!(req("ghost", MODEL, "502", "provider"), 1.0, "{text}");
    assert!(
        s.matching("sluice_requests_total", &[("status", "499")])
            .is_empty(),
        "no request was abandoned: {text}"
    );

    // Tokens and cost equal what the engine reported.
    for (tenant, t) in [
        ("acme", acme),
        ("capped", capped),
        ("limited", limited),
        ("validated", validated),
    ] {
        let tok = |kind: &str| {
            s.get(
                "sluice_tokens_total",
                &[("tenant", tenant), ("model", MODEL), ("type", kind)],
            )
        };
        assert_eq!(tok("input"), t.input as f64, "{tenant}: {text}");
        assert_eq!(tok("cached_input"), t.cached as f64, "{tenant}: {text}");
        assert_eq!(tok("output"), t.output as f64, "{tenant}: {text}");
        assert_eq!(tok("reasoning"), t.reasoning as f64, "{tenant}: {text}");
        let cost = s.get(
            "sluice_cost_usd_total",
            &[("tenant", tenant), ("model", MODEL)],
        );
        assert!(
            (cost - t.cost()).abs() <= 1e-9 * t.cost().max(1e-9),
            "{tenant}: cost {cost} != {} ({t:?})",
            t.cost()
        );
    }
    assert!(acme.cached > 0, "the prefix cache hit on repeats: {acme:?}");
    assert!(acme.reasoning > 0, "the thinking answer reasoned: {acme:?}");
    assert_eq!(
        s.matching("sluice_tokens_total", &[]).len(),
        4 * 4,
        "{text}"
    );

    // Histograms: one duration per request that named a model; TTFT per
    // stream that started; TPOT per completed stream with usage.
    let count = |name: &str, tenant: &str, model: &str| {
        s.get(
            &format!("{name}_count"),
            &[("tenant", tenant), ("model", model)],
        )
    };
    let duration = "gen_ai_server_request_duration_seconds";
    assert_eq!(count(duration, "acme", MODEL), 8.0, "{text}");
    assert_eq!(count(duration, "acme", "other"), 1.0, "{text}");
    for (tenant, n) in [
        ("capped", 2.0),
        ("limited", 2.0),
        ("validated", 2.0),
        ("evil", 1.0),
        ("broken", 1.0),
    ] {
        assert_eq!(count(duration, tenant, MODEL), n, "{tenant}: {text}");
    }
    assert!(
        s.matching(&format!("{duration}_count"), &[("tenant", "")])
            .is_empty()
    );
    let ttft = "gen_ai_server_time_to_first_token_seconds";
    let started_streams = 4.0 + f64::from(u8::from(drop_started));
    assert_eq!(count(ttft, "acme", MODEL), started_streams, "{text}");
    assert_eq!(count(ttft, "validated", MODEL), 1.0, "{text}");
    assert_eq!(s.sum(&format!("{ttft}_count")), started_streams + 1.0);
    let tpot = "gen_ai_server_time_per_output_token_seconds";
    assert_eq!(
        count(tpot, "acme", MODEL),
        f64::from(streams_with_usage),
        "{text}"
    );
    assert_eq!(
        s.sum(&format!("{tpot}_count")),
        f64::from(streams_with_usage)
    );
    assert_eq!(
        s.get(
            &format!("{ttft}_bucket"),
            &[("tenant", "acme"), ("model", MODEL), ("le", "+Inf")]
        ),
        started_streams
    );

    // Plugins: call times, the rejection, the limiter, the trap.
    let calls = |tenant: &str, plugin: &str, hook: &str| {
        s.get(
            "sluice_plugin_call_seconds_count",
            &[("tenant", tenant), ("plugin", plugin), ("hook", hook)],
        )
    };
    assert_eq!(calls("capped", "context-cap", "on-request"), 2.0, "{text}");
    assert_eq!(calls("limited", "rate-limit", "on-request"), 2.0, "{text}");
    assert_eq!(calls("evil", "hostile", "on-request"), 1.0, "{text}");
    let validator = "output-validator";
    assert_eq!(calls("validated", validator, "on-response"), 2.0, "{text}");
    let rejections = |tenant: &str, plugin: &str, code: &str| {
        s.get(
            "sluice_plugin_rejections_total",
            &[("tenant", tenant), ("plugin", plugin), ("code", code)],
        )
    };
    assert_eq!(
        rejections("capped", "context-cap", "context_length_exceeded"),
        1.0
    );
    assert_eq!(
        rejections("limited", "rate-limit", "rate_limit_exceeded"),
        1.0
    );
    assert_eq!(
        rejections("validated", validator, "output_validation_failed"),
        1.0
    );
    assert_eq!(s.sum("sluice_plugin_rejections_total"), 3.0, "{text}");
    assert_eq!(
        s.get(
            "sluice_limiter_rejections_total",
            &[
                ("tenant", "limited"),
                ("plugin", "rate-limit"),
                ("kind", "requests")
            ]
        ),
        1.0,
        "{text}"
    );
    assert_eq!(s.sum("sluice_limiter_rejections_total"), 1.0, "{text}");
    assert_eq!(
        s.get(
            "sluice_plugin_faults_total",
            &[("tenant", "evil"), ("plugin", "hostile"), ("fault", "trap")]
        ),
        1.0,
        "{text}"
    );
    assert_eq!(s.sum("sluice_plugin_faults_total"), 1.0, "{text}");

    // Engines: every attempt by outcome, retries, replica health.
    let attempts = |pool: &str, replica: &str, outcome: &str| {
        s.get(
            "sluice_engine_attempts_total",
            &[("pool", pool), ("replica", replica), ("outcome", outcome)],
        )
    };
    let main = url(&engine);
    // acme 8 (the unknown model never left), capped 1, limited 1,
    // validated 2, evil 0; a drop before the first chunk is a reset.
    let drop_reset = f64::from(u8::from(!drop_started));
    assert_eq!(attempts("main", &main, "ok"), 12.0 - drop_reset, "{text}");
    assert_eq!(attempts("main", &main, "reset"), drop_reset, "{text}");
    assert_eq!(attempts("broken", &bad1.url(), "status_5xx"), 1.0, "{text}");
    assert_eq!(attempts("broken", &bad2.url(), "status_5xx"), 1.0, "{text}");
    assert_eq!(attempts("dead", &dead, "connect_error"), 1.0, "{text}");
    assert_eq!(s.sum("sluice_engine_attempts_total"), 15.0, "{text}");
    let retries = |pool: &str| s.get("sluice_engine_retries_total", &[("pool", pool)]);
    assert_eq!(
        (retries("main"), retries("broken"), retries("dead")),
        (0.0, 1.0, 0.0),
        "{text}"
    );
    let replica = |name: &str, pool: &str, replica: &str| {
        s.get(name, &[("pool", pool), ("replica", replica)])
    };
    assert_eq!(replica("sluice_replica_healthy", "main", &main), 1.0);
    assert_eq!(
        replica("sluice_replica_healthy", "broken", &bad1.url()),
        1.0
    );
    assert_eq!(
        replica("sluice_replica_healthy", "dead", &dead),
        0.0,
        "ejected: {text}"
    );
    assert_eq!(s.sum("sluice_replica_outstanding"), 0.0, "{text}");
    assert_eq!(s.matching("sluice_replica_healthy", &[]).len(), 4, "{text}");

    assert_eq!(
        s.get(
            "sluice_build_info",
            &[("version", env!("CARGO_PKG_VERSION"))]
        ),
        1.0
    );
    gw.shutdown().await;
}

#[tokio::test]
async fn a_client_that_leaves_a_stream_is_counted_as_499() {
    let engine = sim_engine(&["--ttft", "1", "--tpot", "20"]).await;
    let config = pool("main", &[url(&engine)], "") + &tenant("acme", "main", ACME, "");
    let gw = Gateway::start(&config).await;
    let mut body = request(true, 500);
    body["stream_options"] = json!({"include_usage": true});
    let mut resp = post(&gw, ACME, &body).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    // Read the first chunk, then hang up.
    assert!(resp.chunk().await.unwrap().is_some());
    drop(resp);
    let mut s = Scrape(BTreeMap::new());
    let labels = [
        ("tenant", "acme"),
        ("model", MODEL),
        ("status", "499"),
        ("layer", "customer"),
    ];
    for _ in 0..250 {
        s = Scrape(parse(&scrape(&gw).await.1));
        if s.get("sluice_requests_total", &labels) == 1.0
            && s.get("sluice_inflight_requests", &[]) == 0.0
        {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert_eq!(s.get("sluice_requests_total", &labels), 1.0);
    assert_eq!(s.sum("sluice_requests_total"), 1.0);
    assert_eq!(s.get("sluice_inflight_requests", &[]), 0.0);
    // No usage arrived: nothing is counted as tokens.
    assert!(s.matching("sluice_tokens_total", &[]).is_empty());
    gw.shutdown().await;
}
