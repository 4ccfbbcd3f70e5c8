//! The simulated engine over real sockets, driven with reqwest.

use std::time::Duration;

use serde_json::{Value, json};
use sluice::sim::{self, SimHandle, SimOptions, SimSnapshot};

const CHAT: &str = "/v1/chat/completions";

async fn start(opts: SimOptions) -> SimHandle {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    sim::spawn(listener, opts).await.unwrap()
}

/// No sleeping unless a request asks for it; fixed seed for stable text.
fn fast() -> SimOptions {
    SimOptions {
        zero_latency: true,
        seed: Some(7),
        ..SimOptions::default()
    }
}

fn client() -> reqwest::Client {
    // reqwest is built without a bundled crypto provider, and even a
    // plain-HTTP client needs one installed.
    let _ = std::sync::Arc::unwrap_or_clone(sluice::server::tls::provider()).install_default();
    reqwest::Client::builder().no_proxy().build().unwrap()
}

fn url(h: &SimHandle, path: &str) -> String {
    format!("http://{}{path}", h.addr)
}

async fn post(h: &SimHandle, path: &str, body: &Value) -> reqwest::Response {
    client().post(url(h, path)).json(body).send().await.unwrap()
}

async fn post_ok(h: &SimHandle, path: &str, body: &Value) -> Value {
    let resp = post(h, path, body).await;
    assert_eq!(resp.status(), 200);
    resp.json().await.unwrap()
}

fn user(text: &str) -> Value {
    json!([{"role": "user", "content": text}])
}

/// Polls the engine's counters until `cond` holds (bounded: ~5 s).
async fn wait_for(h: &SimHandle, cond: impl Fn(&SimSnapshot) -> bool) -> SimSnapshot {
    for _ in 0..500 {
        let snap = h.metrics();
        if cond(&snap) {
            return snap;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("condition never held; last snapshot {:?}", h.metrics());
}

/// Incremental SSE reader: yields each event's `data:` payload.
struct Sse {
    resp: reqwest::Response,
    buf: String,
}

impl Sse {
    fn new(resp: reqwest::Response) -> Self {
        assert_eq!(resp.status(), 200);
        let ct = resp.headers()["content-type"].to_str().unwrap();
        assert!(ct.starts_with("text/event-stream"), "{ct}");
        Self {
            resp,
            buf: String::new(),
        }
    }

    async fn next(&mut self) -> Option<Result<String, reqwest::Error>> {
        loop {
            if let Some(end) = self.buf.find("\n\n") {
                let event: String = self.buf.drain(..end + 2).collect();
                let data = event.trim_end().strip_prefix("data: ").unwrap();
                return Some(Ok(data.to_owned()));
            }
            match self.resp.chunk().await {
                Ok(Some(bytes)) => self.buf.push_str(std::str::from_utf8(&bytes).unwrap()),
                Ok(None) => return None,
                Err(e) => return Some(Err(e)),
            }
        }
    }

    async fn json(&mut self) -> Value {
        let data = self.next().await.unwrap().unwrap();
        serde_json::from_str(&data).unwrap()
    }

    /// Every remaining payload, `[DONE]` included.
    async fn rest(&mut self) -> Vec<String> {
        let mut out = Vec::new();
        while let Some(ev) = self.next().await {
            out.push(ev.unwrap());
        }
        out
    }
}

async fn stream(h: &SimHandle, path: &str, body: &Value) -> Sse {
    Sse::new(post(h, path, body).await)
}

fn parse_all(events: &[String]) -> Vec<Value> {
    events
        .iter()
        .filter(|e| *e != "[DONE]")
        .map(|e| serde_json::from_str(e).unwrap())
        .collect()
}

fn long_prompt() -> String {
    (0..120)
        .map(|i| format!("word{i}"))
        .collect::<Vec<_>>()
        .join(" ")
}

#[tokio::test]
async fn non_stream_chat_shape_and_usage() {
    let h = start(fast()).await;
    let body = json!({"model": "deepseek-v4-flash", "messages": user("Hello there"), "temperature": 0.2, "unknown_field": [1]});
    let r = post_ok(&h, CHAT, &body).await;
    assert!(r["id"].as_str().unwrap().starts_with("chatcmpl-"));
    assert_eq!(r["object"], "chat.completion");
    assert_eq!(r["model"], "deepseek-v4-flash");
    assert!(r["created"].as_u64().unwrap() > 0);
    let choice = &r["choices"][0];
    assert_eq!(choice["message"]["role"], "assistant");
    assert!(!choice["message"]["content"].as_str().unwrap().is_empty());
    assert_eq!(choice["finish_reason"], "stop");
    assert!(choice["message"].get("reasoning_content").is_none());
    let u = &r["usage"];
    let prompt = u["prompt_tokens"].as_u64().unwrap();
    assert!(prompt > 0);
    assert_eq!(u["completion_tokens"], 64, "the default natural length");
    assert_eq!(u["total_tokens"].as_u64().unwrap(), prompt + 64);
    assert_eq!(u["prompt_tokens_details"]["cached_tokens"], 0);
    assert_eq!(u["completion_tokens_details"]["reasoning_tokens"], 0);

    // Same prompt, same engine: same text. max_tokens cuts it with "length".
    let cut = post_ok(
        &h,
        CHAT,
        &json!({"messages": user("Hello there"), "max_tokens": 5}),
    )
    .await;
    assert_eq!(cut["choices"][0]["finish_reason"], "length");
    assert_eq!(cut["usage"]["completion_tokens"], 5);
    let full = choice["message"]["content"].as_str().unwrap();
    let short = cut["choices"][0]["message"]["content"].as_str().unwrap();
    assert!(full.starts_with(short), "{full:?} / {short:?}");

    // max_completion_tokens and the sim extension work too.
    let r = post_ok(
        &h,
        CHAT,
        &json!({"messages": user("x"), "max_completion_tokens": 3, "sim": {"output_tokens": 2}}),
    )
    .await;
    assert_eq!(r["usage"]["completion_tokens"], 2);
    assert_eq!(r["choices"][0]["finish_reason"], "stop");
    assert_eq!(h.metrics().completed, 3);
}

#[tokio::test]
async fn stream_events_in_order_with_usage_and_done() {
    let h = start(fast()).await;
    let body = json!({
        "messages": user("Stream please"),
        "stream": true,
        "stream_options": {"include_usage": true},
        "sim": {"output_tokens": 6, "ttft_ms": 1, "tpot_ms": 1},
    });
    let events = stream(&h, CHAT, &body).await.rest().await;
    assert_eq!(events.last().unwrap(), "[DONE]");
    let chunks = parse_all(&events);
    assert_eq!(chunks.len(), 1 + 6 + 1, "role, one chunk per token, usage");
    let id = chunks[0]["id"].as_str().unwrap();
    assert!(id.starts_with("chatcmpl-"));
    for c in &chunks {
        assert_eq!(c["id"], id);
        assert_eq!(c["object"], "chat.completion.chunk");
    }
    assert_eq!(
        chunks[0]["choices"][0]["delta"],
        json!({"role": "assistant", "content": ""})
    );
    let tokens = &chunks[1..7];
    for (i, c) in tokens.iter().enumerate() {
        let delta = &c["choices"][0]["delta"];
        assert!(!delta["content"].as_str().unwrap().is_empty());
        let finish = &c["choices"][0]["finish_reason"];
        if i == 5 {
            assert_eq!(finish, "stop");
        } else {
            assert!(finish.is_null());
        }
    }
    let usage = &chunks[7];
    assert_eq!(usage["choices"], json!([]));
    assert_eq!(usage["usage"]["completion_tokens"], 6);

    // Without include_usage there is no usage chunk.
    let body =
        json!({"messages": user("Stream please"), "stream": true, "sim": {"output_tokens": 3}});
    let events = stream(&h, CHAT, &body).await.rest().await;
    assert_eq!(events.len(), 1 + 3 + 1);
    assert_eq!(events.last().unwrap(), "[DONE]");
}

#[tokio::test]
async fn repeated_prompt_hits_prefix_cache() {
    let h = start(fast()).await;
    let body = json!({"messages": user(&long_prompt()), "max_tokens": 4});
    let first = post_ok(&h, CHAT, &body).await;
    assert_eq!(first["usage"]["prompt_tokens_details"]["cached_tokens"], 0);
    let before = h.metrics();
    assert_eq!(before.prefix_hits, 0);
    let prompt = first["usage"]["prompt_tokens"].as_u64().unwrap();
    assert_eq!(before.prefix_queries, prompt);

    let second = post_ok(&h, CHAT, &body).await;
    let cached = second["usage"]["prompt_tokens_details"]["cached_tokens"]
        .as_u64()
        .unwrap();
    assert!(cached > 0 && cached < prompt, "{cached} of {prompt}");
    assert_eq!(cached % 16, 0, "whole blocks only");
    let after = h.metrics();
    assert_eq!(after.prefix_hits, cached);
    assert_eq!(after.prefix_queries, 2 * prompt);

    // A different first message shares no prefix.
    let other = json!({"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": long_prompt()}], "max_tokens": 4});
    let r = post_ok(&h, CHAT, &other).await;
    assert_eq!(r["usage"]["prompt_tokens_details"]["cached_tokens"], 0);
}

#[tokio::test]
async fn thinking_request_styles() {
    let h = start(fast()).await;
    let on = [
        json!({"chat_template_kwargs": {"thinking": true}}),
        json!({"chat_template_kwargs": {"enable_thinking": true}}),
        json!({"thinking": {"type": "enabled"}}),
    ];
    for extra in on {
        let mut body = json!({"messages": user("Think about it"), "sim": {"output_tokens": 20}});
        body.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        let r = post_ok(&h, CHAT, &body).await;
        let msg = &r["choices"][0]["message"];
        assert!(
            !msg["reasoning_content"].as_str().unwrap().is_empty(),
            "{extra}"
        );
        assert!(!msg["content"].as_str().unwrap().is_empty());
        let u = &r["usage"];
        let reasoning = u["completion_tokens_details"]["reasoning_tokens"]
            .as_u64()
            .unwrap();
        assert_eq!(reasoning, 10, "about half of the budget");
        assert_eq!(u["completion_tokens"], 20);
    }

    let high = post_ok(
        &h,
        CHAT,
        &json!({"messages": user("x"), "thinking": {"type": "enabled"}, "reasoning_effort": "high", "sim": {"output_tokens": 20}}),
    )
    .await;
    assert_eq!(
        high["usage"]["completion_tokens_details"]["reasoning_tokens"],
        15
    );

    let off = [
        json!({}),
        json!({"chat_template_kwargs": {"thinking": false}}),
        json!({"chat_template_kwargs": {"enable_thinking": false}}),
        json!({"thinking": {"type": "disabled"}}),
    ];
    for extra in off {
        let mut body = json!({"messages": user("Think about it")});
        body.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        let r = post_ok(&h, CHAT, &body).await;
        let msg = &r["choices"][0]["message"];
        assert!(
            msg.get("reasoning_content").is_none_or(Value::is_null),
            "{extra}"
        );
        assert_eq!(
            r["usage"]["completion_tokens_details"]["reasoning_tokens"],
            0
        );
    }

    // Streaming: reasoning deltas come first, then content.
    let body = json!({"messages": user("x"), "stream": true, "thinking": {"type": "enabled"}, "sim": {"output_tokens": 6}});
    let chunks = parse_all(&stream(&h, CHAT, &body).await.rest().await);
    let kinds: Vec<&str> = chunks[1..]
        .iter()
        .map(|c| {
            let d = &c["choices"][0]["delta"];
            if d.get("reasoning_content").is_some() {
                "r"
            } else {
                "c"
            }
        })
        .collect();
    assert_eq!(kinds, ["r", "r", "r", "c", "c", "c"]);
}

fn weather_tools() -> Value {
    json!([
        {"type": "function", "function": {"name": "noop"}},
        {"type": "function", "function": {
            "name": "get_weather",
            "parameters": {
                "type": "object",
                "properties": {
                    "city": {"type": "string"},
                    "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
                    "days": {"type": "integer", "minimum": 1, "maximum": 7},
                    "hourly": {"type": "boolean"},
                    "coords": {"type": "object", "properties": {"lat": {"type": "number"}, "lon": {"type": "number"}}},
                    "fields": {"type": "array", "items": {"type": "string"}}
                },
                "required": ["city"]
            }
        }}
    ])
}

fn check_weather_args(args: &Value) {
    let obj = args.as_object().unwrap();
    let keys: Vec<&str> = obj.keys().map(String::as_str).collect();
    assert_eq!(keys, ["city", "unit", "days", "hourly", "coords", "fields"]);
    assert!(args["city"].is_string());
    assert_eq!(args["unit"], "celsius");
    let days = args["days"].as_i64().unwrap();
    assert!((1..=7).contains(&days));
    assert!(args["hourly"].is_boolean());
    assert!(args["coords"]["lat"].is_number() && args["coords"]["lon"].is_number());
    assert!(args["fields"][0].is_string());
}

#[tokio::test]
async fn tool_call_non_stream() {
    let h = start(fast()).await;
    let body = json!({
        "messages": user("Weather in Paris?"),
        "tools": weather_tools(),
        "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
    });
    let r = post_ok(&h, CHAT, &body).await;
    let choice = &r["choices"][0];
    assert_eq!(choice["finish_reason"], "tool_calls");
    assert!(choice["message"]["content"].is_null());
    let call = &choice["message"]["tool_calls"][0];
    assert!(call["id"].as_str().unwrap().starts_with("chatcmpl-tool-"));
    assert_eq!(call["type"], "function");
    assert_eq!(call["function"]["name"], "get_weather");
    let args: Value =
        serde_json::from_str(call["function"]["arguments"].as_str().unwrap()).unwrap();
    check_weather_args(&args);

    // Without a named choice the first tool is called.
    let auto = post_ok(
        &h,
        CHAT,
        &json!({"messages": user("x"), "tools": weather_tools()}),
    )
    .await;
    let call = &auto["choices"][0]["message"]["tool_calls"][0]["function"];
    assert_eq!(call["name"], "noop");
    assert_eq!(call["arguments"], "{}");

    // tool_choice "none" answers in text.
    let none = post_ok(
        &h,
        CHAT,
        &json!({"messages": user("x"), "tools": weather_tools(), "tool_choice": "none"}),
    )
    .await;
    assert!(none["choices"][0]["message"]["content"].is_string());

    // After a tool result the model answers in text, ending the loop.
    let follow_up = json!({
        "messages": [
            {"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": null, "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\":\"Paris\"}"}}]},
            {"role": "tool", "tool_call_id": "c1", "content": "sunny"}
        ],
        "tools": weather_tools(),
    });
    let r = post_ok(&h, CHAT, &follow_up).await;
    assert_eq!(r["choices"][0]["finish_reason"], "stop");
    assert!(
        !r["choices"][0]["message"]["content"]
            .as_str()
            .unwrap()
            .is_empty()
    );
    assert!(r["choices"][0]["message"].get("tool_calls").is_none());

    // Naming an undeclared tool is a client error.
    let resp = post(&h, CHAT, &json!({"messages": user("x"), "tools": weather_tools(), "tool_choice": {"type": "function", "function": {"name": "nope"}}})).await;
    assert_eq!(resp.status(), 400);
}

#[tokio::test]
async fn tool_call_stream_fragments_form_json() {
    let h = start(fast()).await;
    let body = json!({
        "messages": user("Weather in Paris?"),
        "tools": weather_tools(),
        "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
        "stream": true,
    });
    let chunks = parse_all(&stream(&h, CHAT, &body).await.rest().await);
    let header = &chunks[1]["choices"][0]["delta"]["tool_calls"][0];
    assert_eq!(header["index"], 0);
    assert!(header["id"].as_str().unwrap().starts_with("chatcmpl-tool-"));
    assert_eq!(header["type"], "function");
    assert_eq!(header["function"]["name"], "get_weather");
    assert_eq!(header["function"]["arguments"], "");
    let fragments: Vec<&Value> = chunks[2..]
        .iter()
        .map(|c| &c["choices"][0]["delta"]["tool_calls"][0])
        .collect();
    assert!(fragments.len() > 3);
    let mut args = String::new();
    for f in &fragments {
        assert_eq!(f["index"], 0);
        assert!(f.get("id").is_none());
        args.push_str(f["function"]["arguments"].as_str().unwrap());
    }
    check_weather_args(&serde_json::from_str(&args).unwrap());
    let last = chunks.last().unwrap();
    assert_eq!(last["choices"][0]["finish_reason"], "tool_calls");
}

#[tokio::test]
async fn structured_output() {
    let h = start(fast()).await;
    let schema = json!({
        "type": "object",
        "properties": {
            "title": {"type": "string"},
            "year": {"type": "integer"},
            "tags": {"type": "array", "items": {"type": "string"}},
            "meta": {"type": "object", "properties": {"ok": {"type": "boolean"}}}
        }
    });
    let body = json!({
        "messages": user("Give me JSON"),
        "response_format": {"type": "json_schema", "json_schema": {"name": "doc", "schema": schema}},
    });
    let r = post_ok(&h, CHAT, &body).await;
    let content: Value =
        serde_json::from_str(r["choices"][0]["message"]["content"].as_str().unwrap()).unwrap();
    let keys: Vec<&str> = content
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    assert_eq!(keys, ["title", "year", "tags", "meta"]);
    assert!(content["year"].is_i64() && content["meta"]["ok"].is_boolean());

    let body = json!({"messages": user("JSON"), "response_format": {"type": "json_object"}});
    let r = post_ok(&h, CHAT, &body).await;
    let content: Value =
        serde_json::from_str(r["choices"][0]["message"]["content"].as_str().unwrap()).unwrap();
    assert!(content.is_object());

    // The invalid_json fault breaks the JSON, streamed or not.
    let body = json!({"messages": user("JSON"), "response_format": {"type": "json_object"}, "sim": {"fault": "invalid_json"}});
    let r = post_ok(&h, CHAT, &body).await;
    let text = r["choices"][0]["message"]["content"].as_str().unwrap();
    assert!(!text.is_empty());
    assert!(serde_json::from_str::<Value>(text).is_err(), "{text}");

    let body = json!({"messages": user("JSON"), "stream": true, "response_format": {"type": "json_schema", "json_schema": {"schema": schema}}, "sim": {"fault": "invalid_json"}});
    let chunks = parse_all(&stream(&h, CHAT, &body).await.rest().await);
    let text: String = chunks[1..]
        .iter()
        .map(|c| c["choices"][0]["delta"]["content"].as_str().unwrap())
        .collect();
    assert!(text.starts_with('{'));
    assert!(serde_json::from_str::<Value>(&text).is_err(), "{text}");
}

#[tokio::test]
async fn context_length_is_enforced_like_vllm() {
    let h = start(SimOptions {
        max_model_len: 100,
        ..fast()
    })
    .await;
    let messages = user("How long can this be?");
    let ok = post_ok(&h, CHAT, &json!({"messages": messages, "max_tokens": 1})).await;
    let p = ok["usage"]["prompt_tokens"].as_u64().unwrap();

    let resp = post(&h, CHAT, &json!({"messages": messages, "max_tokens": 200})).await;
    assert_eq!(resp.status(), 400);
    let err: Value = resp.json().await.unwrap();
    assert_eq!(err["error"]["type"], "BadRequestError");
    assert_eq!(err["error"]["code"], 400);
    let expected = format!(
        "This model's maximum context length is 100 tokens. However, you requested {} tokens \
         ({p} in the messages, 200 in the completion). Please reduce the length of the messages \
         or completion.",
        p + 200
    );
    assert_eq!(err["error"]["message"], expected);

    // Exactly filling the window is allowed; without max_tokens the answer
    // is capped by what is left of it.
    let fill = post_ok(
        &h,
        CHAT,
        &json!({"messages": messages, "max_tokens": 100 - p}),
    )
    .await;
    assert_eq!(fill["usage"]["completion_tokens"], 64);
    let capped = post_ok(
        &h,
        CHAT,
        &json!({"messages": messages, "sim": {"output_tokens": 1000}}),
    )
    .await;
    assert_eq!(
        capped["usage"]["completion_tokens"].as_u64().unwrap(),
        100 - p
    );
    assert_eq!(capped["choices"][0]["finish_reason"], "length");
    let huge = json!({"messages": messages, "thinking": {"type": "enabled"}, "reasoning_effort": "high", "sim": {"output_tokens": u64::MAX}});
    let huge = post_ok(&h, CHAT, &huge).await;
    // Thinking adds a template token, so compare against the whole window.
    assert_eq!(huge["usage"]["total_tokens"], 100);
    assert_eq!(huge["choices"][0]["finish_reason"], "length");

    let resp = post(&h, CHAT, &json!({"messages": user(&long_prompt())})).await;
    assert_eq!(resp.status(), 400);
    let err: Value = resp.json().await.unwrap();
    assert!(
        err["error"]["message"]
            .as_str()
            .unwrap()
            .starts_with("This model's maximum context length is 100 tokens.")
    );

    // Absurd numbers are a clean 400, not an overflow.
    let resp = post(
        &h,
        CHAT,
        &json!({"messages": messages, "max_tokens": u64::MAX}),
    )
    .await;
    assert_eq!(resp.status(), 400);
}

#[tokio::test]
async fn queue_when_all_slots_are_busy() {
    let h = start(SimOptions {
        max_num_seqs: 1,
        max_waiting: 1,
        ..fast()
    })
    .await;
    let slow = json!({"messages": user("slow"), "stream": true, "sim": {"output_tokens": 100000, "tpot_ms": 5}});
    let mut first = stream(&h, CHAT, &slow).await;
    first.json().await; // role chunk: it is running
    assert_eq!(h.metrics().running, 1);

    // Stream headers come back at once; the request waits for the slot.
    let mut second = stream(&h, CHAT, &slow).await;
    let snap = wait_for(&h, |s| s.waiting == 1).await;
    assert_eq!(snap.running, 1);

    // The queue is bounded at one: the next request is turned away.
    let resp = post(&h, CHAT, &json!({"messages": user("x")})).await;
    assert_eq!(resp.status(), 503);
    assert_eq!(resp.headers()["retry-after"], "1");
    let err: Value = resp.json().await.unwrap();
    assert_eq!(err["error"]["code"], 503);

    // When the first client leaves, the queued one runs.
    drop(first);
    wait_for(&h, |s| s.waiting == 0 && s.running == 1).await;
    let role = second.json().await;
    assert_eq!(role["choices"][0]["delta"]["role"], "assistant");
    drop(second);
    let snap = wait_for(&h, |s| s.running == 0).await;
    assert_eq!(snap.cancelled, 2);
    assert_eq!(snap.kv_usage, 0.0);
}

#[tokio::test]
async fn error_fault_is_a_500_before_any_byte() {
    let h = start(fast()).await;
    for stream in [false, true] {
        let resp = post(
            &h,
            CHAT,
            &json!({"messages": user("x"), "stream": stream, "sim": {"fault": "error"}}),
        )
        .await;
        assert_eq!(resp.status(), 500);
        let err: Value = resp.json().await.unwrap();
        assert_eq!(err["error"]["type"], "InternalServerError");
        assert_eq!(err["error"]["code"], 500);
    }

    // Rates apply to every request unless the request says otherwise.
    let h = start(SimOptions {
        error_rate: 1.0,
        ..fast()
    })
    .await;
    let resp = post(&h, CHAT, &json!({"messages": user("x")})).await;
    assert_eq!(resp.status(), 500);
    post_ok(
        &h,
        CHAT,
        &json!({"messages": user("x"), "sim": {"fault": "none"}}),
    )
    .await;
}

#[tokio::test]
async fn drop_fault_breaks_the_body() {
    let h = start(fast()).await;
    let body = json!({"messages": user("x"), "stream": true, "sim": {"fault": "drop", "output_tokens": 50}});
    let mut sse = stream(&h, CHAT, &body).await;
    let mut events = 0;
    let failed = loop {
        match sse.next().await {
            Some(Ok(ev)) => {
                assert_ne!(ev, "[DONE]");
                events += 1;
            }
            Some(Err(_)) => break true,
            None => break false,
        }
    };
    assert!(failed, "the body must end in an error");
    assert!(events >= 1, "a few chunks arrive before the cut");

    let resp = client()
        .post(url(&h, CHAT))
        .json(&json!({"messages": user("x"), "sim": {"fault": "drop"}}))
        .send()
        .await;
    // The cut may land before or after the headers.
    if let Ok(resp) = resp {
        assert!(resp.bytes().await.is_err());
    }
    wait_for(&h, |s| s.running == 0).await;
}

#[tokio::test]
async fn stall_fault_goes_silent_after_first_chunk() {
    let h = start(fast()).await;
    let body = json!({"messages": user("x"), "stream": true, "sim": {"fault": "stall", "output_tokens": 3}});
    let mut sse = stream(&h, CHAT, &body).await;
    sse.json().await; // role
    sse.json().await; // first token
    // Unstalled, the rest would arrive immediately (zero latency).
    let next = tokio::time::timeout(Duration::from_millis(200), sse.next()).await;
    assert!(next.is_err(), "stalled stream sent {next:?}");
    assert_eq!(h.metrics().running, 1);
    drop(sse);
    let snap = wait_for(&h, |s| s.running == 0).await;
    assert_eq!(snap.cancelled, 1);
}

#[tokio::test]
async fn client_disconnect_cancels_generation() {
    let h = start(fast()).await;
    let body = json!({"messages": user(&long_prompt()), "stream": true, "sim": {"output_tokens": 100000, "tpot_ms": 2}});
    let mut sse = stream(&h, CHAT, &body).await;
    for _ in 0..3 {
        sse.json().await;
    }
    let snap = h.metrics();
    assert_eq!(snap.running, 1);
    assert!(snap.kv_usage > 0.0);
    drop(sse);
    let snap = wait_for(&h, |s| s.cancelled == 1 && s.running == 0).await;
    assert_eq!(snap.kv_usage, 0.0);
    assert_eq!(snap.completed, 0);
}

#[tokio::test]
async fn metrics_endpoint_uses_vllm_names() {
    let h = start(SimOptions {
        model: "tiny".into(),
        ..fast()
    })
    .await;
    post_ok(&h, CHAT, &json!({"model": "tiny", "messages": user("x")})).await;
    let resp = client().get(url(&h, "/metrics")).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    assert!(
        resp.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/plain")
    );
    let text = resp.text().await.unwrap();
    for name in [
        "vllm:num_requests_running{model_name=\"tiny\"} 0",
        "vllm:num_requests_waiting{model_name=\"tiny\"} 0",
        "vllm:kv_cache_usage_perc{model_name=\"tiny\"}",
        "vllm:prefix_cache_queries_total{model_name=\"tiny\"}",
        "vllm:prefix_cache_hits_total{model_name=\"tiny\"}",
        "vllm:prompt_tokens_total{model_name=\"tiny\"}",
        "vllm:generation_tokens_total{model_name=\"tiny\"} 64",
        "vllm:request_success_total{model_name=\"tiny\",finished_reason=\"stop\"} 1",
        "vllm:time_to_first_token_seconds_count{model_name=\"tiny\"} 1",
        "vllm:time_to_first_token_seconds_bucket{model_name=\"tiny\",le=\"0.001\"}",
        "sim:requests_cancelled_total{model_name=\"tiny\"} 0",
    ] {
        assert!(text.contains(name), "missing {name} in:\n{text}");
    }
}

#[tokio::test]
async fn errors_have_vllm_shape() {
    let h = start(fast()).await;
    let resp = post(&h, CHAT, &json!({"model": "gpt-x", "messages": user("x")})).await;
    assert_eq!(resp.status(), 404);
    let err: Value = resp.json().await.unwrap();
    assert_eq!(err["error"]["message"], "The model `gpt-x` does not exist.");
    assert_eq!(err["error"]["type"], "NotFoundError");
    assert_eq!(err["error"]["code"], 404);

    let c = client();
    let resp = c.get(url(&h, "/v2/nothing")).send().await.unwrap();
    assert_eq!(resp.status(), 404);
    let resp = c.get(url(&h, CHAT)).send().await.unwrap();
    assert_eq!(resp.status(), 405);
    assert_eq!(resp.headers()["allow"], "POST");
    let resp = c
        .post(url(&h, CHAT))
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);
    let err: Value = resp.json().await.unwrap();
    assert_eq!(err["error"]["type"], "BadRequestError");

    for bad in [
        json!([1, 2]),
        json!({"messages": user("x"), "n": 2}),
        json!({"messages": "hi"}),
        json!({"messages": []}),
        json!({"messages": [{"content": "no role"}]}),
        json!({"messages": [{"role": "user", "content": 42}]}),
        json!({"messages": user("x"), "max_tokens": 0}),
        json!({"messages": user("x"), "max_tokens": -3}),
        json!({"messages": user("x"), "max_tokens": 1e300}),
        json!({"messages": user("x"), "stream": "yes"}),
        json!({"messages": user("x"), "stream_options": {"include_usage": true}}),
        json!({"messages": user("x"), "tools": {"a": 1}}),
        json!({"messages": user("x"), "tool_choice": "required"}),
        json!({"messages": user("x"), "response_format": {"type": "xml"}}),
        json!({"messages": user("x"), "reasoning_effort": 3}),
        json!({"messages": user("x"), "sim": {"fault": "meteor"}}),
        json!({"messages": user("x"), "sim": {"ttft_ms": 1e20}}),
    ] {
        let resp = post(&h, CHAT, &bad).await;
        assert_eq!(resp.status(), 400, "{bad}");
        let err: Value = resp.json().await.unwrap();
        assert_eq!(err["error"]["code"], 400, "{bad}");
        assert!(
            err["error"]["message"]
                .as_str()
                .is_some_and(|m| !m.is_empty())
        );
    }
    assert_eq!(h.metrics().running, 0);
}

#[tokio::test]
async fn completions_endpoint() {
    let h = start(fast()).await;
    let r = post_ok(
        &h,
        "/v1/completions",
        &json!({"prompt": "Once upon a time", "max_tokens": 7}),
    )
    .await;
    assert!(r["id"].as_str().unwrap().starts_with("cmpl-"));
    assert_eq!(r["object"], "text_completion");
    assert!(!r["choices"][0]["text"].as_str().unwrap().is_empty());
    assert_eq!(r["choices"][0]["finish_reason"], "length");
    assert_eq!(r["usage"]["completion_tokens"], 7);

    let r = post_ok(
        &h,
        "/v1/completions",
        &json!({"prompt": ["a b", "c"], "sim": {"output_tokens": 2}}),
    )
    .await;
    assert_eq!(r["choices"][0]["finish_reason"], "stop");
    assert_eq!(r["usage"]["completion_tokens"], 2);

    let r = post_ok(
        &h,
        "/v1/completions",
        &json!({"prompt": [1, 2, 3], "max_tokens": 2}),
    )
    .await;
    assert_eq!(r["usage"]["prompt_tokens"], 3);

    let body = json!({"prompt": "Once", "stream": true, "stream_options": {"include_usage": true}, "sim": {"output_tokens": 4}});
    let events = stream(&h, "/v1/completions", &body).await.rest().await;
    assert_eq!(events.last().unwrap(), "[DONE]");
    let chunks = parse_all(&events);
    assert_eq!(chunks.len(), 4 + 1);
    for c in &chunks[..4] {
        assert_eq!(c["object"], "text_completion");
        assert!(c["choices"][0]["text"].is_string());
    }
    assert_eq!(chunks[3]["choices"][0]["finish_reason"], "stop");
    assert_eq!(chunks[4]["usage"]["completion_tokens"], 4);

    let resp = post(&h, "/v1/completions", &json!({"prompt": {"x": 1}})).await;
    assert_eq!(resp.status(), 400);
}

#[tokio::test]
async fn models_health_and_h2c() {
    let h = start(fast()).await;
    let models: Value = client()
        .get(url(&h, "/v1/models"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(models["object"], "list");
    assert_eq!(models["data"][0]["id"], "deepseek-v4-flash");
    assert_eq!(models["data"][0]["max_model_len"], 65536);

    let h2 = reqwest::Client::builder()
        .no_proxy()
        .http2_prior_knowledge()
        .build()
        .unwrap();
    let resp = h2.get(url(&h, "/health")).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.version(), reqwest::Version::HTTP_2);
    let body = json!({"messages": user("h2"), "stream": true, "sim": {"output_tokens": 3}});
    let resp = h2.post(url(&h, CHAT)).json(&body).send().await.unwrap();
    let events = Sse::new(resp).rest().await;
    assert_eq!(events.len(), 1 + 3 + 1);
}

#[tokio::test]
async fn shutdown_stops_the_server() {
    let h = start(fast()).await;
    post_ok(&h, CHAT, &json!({"messages": user("x")})).await;
    h.shutdown();
    tokio::time::timeout(Duration::from_secs(5), h.stopped())
        .await
        .unwrap();
    assert!(client().get(url(&h, "/health")).send().await.is_err());
}
