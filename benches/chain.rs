//! The plugin chain's cost per request: the on-request phase for 0, 1 and 5
//! plugins on a 2 KB chat request, with reused instances (the default) and
//! with a fresh instance per call as the baseline. Writes the table to
//! stdout; `--write FILE` also updates that file's chain section.
//!
//!     cargo bench --bench chain [-- --write BENCHMARKS.md]
//!
//! Every request's user message is new (a serial number in it), so the token
//! count cache never answers for it; only the shared system prompt repeats.

mod common;

use std::time::Instant;

use http::HeaderMap;
use serde_json::{Value, json};
use sluice::config::FailurePolicy;
use sluice::plugins::chain::{Chain, Entry};
use sluice::plugins::host::CallCtx;
use sluice::plugins::view::ViewInput;
use sluice::plugins::{PluginEngine, Settings, builtin, phases};

const ITERS: usize = 20_000;
const WARMUP: usize = 2_000;

fn request_2kb(serial: usize) -> Vec<u8> {
    let text = format!(
        "Case {serial:012}: {}",
        "The river carries sediment from the mountains to the delta, where it settles. ".repeat(22)
    );
    let body = json!({
        "model": "deepseek-v4-flash",
        "messages": [
            {"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": text},
        ],
        "max_tokens": 512,
        "temperature": 0.7,
        "stream": false,
    });
    let bytes = serde_json::to_vec(&body).unwrap();
    assert!((1800..2400).contains(&bytes.len()), "{}", bytes.len());
    bytes
}

fn chain(engine: &std::sync::Arc<PluginEngine>, names: &[&str]) -> Chain {
    let configs = |name: &str| match name {
        "request-shaper" => {
            json!({"model_aliases": {"v4": "deepseek-v4-flash"}, "defaults": {"top_p": 0.95}, "clamp": {"temperature": [0.0, 1.5], "max_tokens": [1, 16384]}})
        }
        "rate-limit" => {
            json!({"requests_per_minute": 1_000_000_000u64, "tokens_per_minute": 2_000_000_000u64})
        }
        "context-cap" => json!({"max_input_tokens": 32768, "max_output_tokens": 8192}),
        "thinking-policy" => {
            json!({"default": "allow", "tasks": {"agent": "force-on"}, "max_reasoning_effort": "medium"})
        }
        "output-validator" => json!({"max_retries": 1}),
        _ => unreachable!(),
    };
    let mut c = Chain::default();
    for n in names {
        let compiled = engine.compile(builtin::component(n).unwrap()).unwrap();
        c.entries.push(
            Entry::new(
                engine,
                compiled,
                "bench",
                &configs(n),
                FailurePolicy::FailClosed,
            )
            .unwrap(),
        );
    }
    c
}

/// One request's on-request phase, as the pipeline runs it. `fast` is the
/// path of a tenant without plugins.
fn once(chain: &Chain, fast: bool, bytes: &[u8], headers: &HeaderMap) {
    if fast {
        // The pipeline's fast path: only model and stream are read.
        #[derive(serde::Deserialize)]
        struct Head<'a> {
            #[serde(borrow)]
            #[allow(dead_code)]
            model: std::borrow::Cow<'a, str>,
            #[allow(dead_code)]
            stream: Option<bool>,
        }
        std::hint::black_box(serde_json::from_slice::<Head>(bytes).unwrap());
        return;
    }
    let mut doc: Value = serde_json::from_slice(bytes).unwrap();
    let mut fwd = headers.clone();
    let mut ctx = CallCtx::default();
    let input = ViewInput {
        tenant: "bench",
        key_id: "k",
        endpoint: "chat-completions",
        pool: "p",
        dialect: "vllm",
        headers,
    };
    let out = phases::on_request(chain, &mut ctx, &mut doc, &mut fwd, &input).unwrap();
    if out.modified {
        std::hint::black_box(serde_json::to_vec(&doc).unwrap());
    }
    // Settle the token reservation as the end of an exchange would.
    for r in ctx.reservations.drain(..) {
        r.settle(0);
    }
}

fn measure(chain: &Chain, fast: bool, headers: &HeaderMap) -> (f64, f64) {
    // Bodies made before the clock runs; each serial is used once per process.
    static SERIAL: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let first = SERIAL.fetch_add(WARMUP + ITERS, std::sync::atomic::Ordering::Relaxed);
    let bodies: Vec<Vec<u8>> = (first..first + WARMUP + ITERS).map(request_2kb).collect();
    for bytes in &bodies[..WARMUP] {
        once(chain, fast, bytes, headers);
    }
    let mut samples = Vec::with_capacity(ITERS);
    for bytes in &bodies[WARMUP..] {
        let t = Instant::now();
        once(chain, fast, bytes, headers);
        samples.push(t.elapsed().as_nanos() as f64 / 1000.0);
    }
    samples.sort_by(f64::total_cmp);
    (samples[ITERS / 2], samples[ITERS * 99 / 100])
}

fn main() {
    let write = common::write_target();
    let headers = HeaderMap::new();
    let five = [
        "request-shaper",
        "rate-limit",
        "context-cap",
        "thinking-policy",
        "output-validator",
    ];
    // (setup, hooks, p50, p99)
    let mut rows: Vec<(&str, usize, f64, f64)> = Vec::new();
    let (p50, p99) = measure(&Chain::default(), true, &headers);
    rows.push(("no plugins (fast path: model and stream only)", 0, p50, p99));
    for reuse in [true, false] {
        let engine = PluginEngine::new(Settings {
            reuse_instances: reuse,
            ..Settings::default()
        })
        .unwrap();
        let label = if reuse {
            "reused instances"
        } else {
            "fresh instance per call"
        };
        for names in [&five[..0], &five[1..2], &five[..]] {
            if !reuse && names.is_empty() {
                continue;
            }
            let c = chain(&engine, names);
            let (p50, p99) = measure(&c, false, &headers);
            rows.push((label, names.len(), p50, p99));
        }
    }
    // The plugin path's fixed cost: full parse, view with token estimate.
    let fixed = rows[1].2;
    let mut table = String::from(
        "| setup | hooks | p50 µs | p99 µs | p50 per hook µs |\n|---|---|---|---|---|\n",
    );
    for (label, n, p50, p99) in &rows {
        let per_hook = if *n == 0 {
            "–".to_string()
        } else {
            format!("{:.1}", (p50 - fixed) / *n as f64)
        };
        table.push_str(&format!(
            "| {label} | {n} | {p50:.1} | {p99:.1} | {per_hook} |\n"
        ));
    }
    let reused5 = rows
        .iter()
        .find(|r| r.0.starts_with("reused") && r.1 == 5)
        .unwrap();
    let fresh5 = rows
        .iter()
        .find(|r| r.0.starts_with("fresh") && r.1 == 5)
        .unwrap();
    let summary = format!(
        "Per hook = (row − plugin path with 0 hooks) / hooks; the 0-hook plugin path ({fixed:.1} µs) is the full JSON parse and the request view with its token estimate, paid once per request.\n\nTarget ≤ 15 µs median per hook: {:.1} µs with reused instances — {}.\nFresh instance per call / reused, 5 hooks: {:.2}x (p50).\n",
        (reused5.2 - fixed) / 5.0,
        if (reused5.2 - fixed) / 5.0 <= 15.0 {
            "met"
        } else {
            "missed"
        },
        fresh5.2 / reused5.2
    );
    print!("{table}\n{summary}");
    if let Some(path) = write {
        common::write_section(
            &path,
            "chain",
            &format!(
                "## Plugin chain cost (on-request phase, 2 KB chat request)\n\nCommand: `cargo bench --bench chain -- --write BENCHMARKS.md` ({ITERS} requests per row after {WARMUP} warm-up, one thread, in-process: body parse, view build with token estimate, hooks, patch, re-serialise; every request's user message is new). Machine: {}.\n\n{table}\n{summary}",
                common::machine()
            ),
        );
    }
}
