//! The gateway's cost on the request path, against the engine alone and
//! against nginx, measured in one run with the setups alternating:
//!
//!   a  direct to the simulated engine (zero-latency mode)
//!   b  nginx as a plain reverse proxy (HTTP/1.1 keep-alive both sides)
//!   c  sluice, a tenant without plugins
//!   d  sluice, a tenant with the five built-in plugins in one chain
//!
//! Non-streaming (latency to the last byte) and streaming (time to the first
//! token), at saturation and at fixed request rates. The load generator is
//! this process, one thread pinned to core 0 with the engine; the proxy under
//! test gets core 1 to itself. Prints the tables; `--write FILE` also updates
//! that file's `gateway` section.
//!
//!     bash benches/run.sh            # installs nginx when missing, runs all
//!     cargo bench --bench gateway -- [--rounds N] [--secs S] [--write BENCHMARKS.md]

mod common;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use hdrhistogram::Histogram;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::{self, SendRequest};
use hyper_util::rt::TokioIo;
use serde_json::json;

use common::Proc;

const MODEL: &str = "deepseek-v4-flash";
const KEY_BARE: &str = "sk-bench-bare";
const KEY_POLICY: &str = "sk-bench-policy";
/// Connections of the closed loop that finds each setup's saturation.
const SATURATION_CONNS: usize = 32;
/// Connections available to the fixed-rate open loop (far more than needed).
const RATE_CONNS: usize = 64;
/// The fixed low rate; the high one is half the slowest setup's saturation.
const LOW_RATE: f64 = 500.0;

#[derive(Clone, Copy, PartialEq)]
enum Mode {
    Whole,
    Stream,
}

impl Mode {
    fn title(self) -> &'static str {
        match self {
            Mode::Whole => "non-streaming (latency = last byte)",
            Mode::Stream => "streaming (latency = time to first token)",
        }
    }
}

#[derive(Clone, Copy)]
enum Load {
    Saturation,
    Rate(f64),
}

#[derive(Clone, Copy)]
struct Setup {
    id: char,
    name: &'static str,
    addr: SocketAddr,
    key: &'static str,
    /// The proxy process whose CPU time per request is reported.
    proxy: Option<usize>,
}

/// One measurement of one setup.
#[derive(Clone)]
struct Sample {
    rps: f64,
    p50_us: f64,
    p99_us: f64,
    errors: u64,
    first_error: Option<String>,
    cpu_us_per_req: Option<f64>,
}

/// 2 KB chat requests asking for JSON that matches a schema, so the output
/// validator has real work. Each request's user message is new (a serial
/// number written into the template), as in real traffic, so nothing on the
/// way can answer from a cache of earlier bodies; the system prompt is shared.
struct Bodies {
    template: Vec<u8>,
    /// Where the serial number's digits go.
    at: usize,
    next: std::sync::atomic::AtomicU64,
}

const SERIAL: &[u8] = b"Case 000000000000:";

impl Bodies {
    fn new(stream: bool) -> Bodies {
        let template = request(stream).to_vec();
        let at = template
            .windows(SERIAL.len())
            .position(|w| w == SERIAL)
            .expect("the serial slot")
            + 5;
        Bodies {
            template,
            at,
            next: 0.into(),
        }
    }

    fn next(&self) -> Bytes {
        let n = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let mut body = self.template.clone();
        body[self.at..self.at + 12].copy_from_slice(format!("{n:012}").as_bytes());
        Bytes::from(body)
    }
}

fn request(stream: bool) -> Bytes {
    let text = format!(
        "{} {}",
        std::str::from_utf8(SERIAL).expect("ascii"),
        "The river carries sediment from the mountains to the delta, where it settles. ".repeat(20)
    );
    let mut body = json!({
        "model": MODEL,
        "messages": [
            {"role": "system", "content": "You are a helpful assistant. Answer in JSON."},
            {"role": "user", "content": text},
        ],
        "max_tokens": 64,
        "temperature": 0.7,
        "reasoning_effort": "medium",
        "response_format": {"type": "json_schema", "json_schema": {"name": "answer", "schema": {
            "type": "object",
            "properties": {"answer": {"type": "string"}, "confidence": {"type": "number"}},
            "required": ["answer", "confidence"]
        }}},
        "stream": stream,
    });
    if stream {
        body["stream_options"] = json!({"include_usage": true});
    }
    Bytes::from(serde_json::to_vec(&body).expect("serialise the request"))
}

/// The five built-in plugins, each configured to run its whole logic on
/// every request and to refuse none of the benchmark's traffic.
const POLICY_CHAIN: &str = r#"
[[tenants.plugins]]
builtin = "request-shaper"
config = { model_aliases = { "v4" = "deepseek-v4-flash" }, defaults = { top_p = 0.95 }, clamp = { temperature = [0.0, 1.5], max_tokens = [1, 16384] } }

[[tenants.plugins]]
builtin = "rate-limit"
config = { requests_per_minute = 4000000000, tokens_per_minute = 4000000000, per_key = { requests_per_minute = 4000000000, tokens_per_minute = 4000000000 } }

[[tenants.plugins]]
builtin = "context-cap"
config = { max_input_tokens = 32768, max_output_tokens = 8192 }

[[tenants.plugins]]
builtin = "thinking-policy"
config = { default = "allow", tasks = { "agent" = "force-on" }, max_reasoning_effort = "high" }

[[tenants.plugins]]
builtin = "output-validator"
config = { max_retries = 1 }
"#;

fn sluice_config(listen: u16, ops: u16, engine: SocketAddr) -> String {
    let tenant = |id: &str, key: &str, chain: &str| {
        format!(
            "[[tenants]]\nid = \"{id}\"\ndeployment = \"serverless\"\npool = \"engine\"\nmax_concurrent_requests = 8192\n\n[[tenants.api_keys]]\nid = \"{id}-key\"\nsha256 = \"{}\"\n{chain}\n",
            sluice::config::hash_key(key)
        )
    };
    format!(
        "[server]\nhttp = \"127.0.0.1:{listen}\"\nops = \"127.0.0.1:{ops}\"\n\n\
         [limits]\nmax_inflight_requests = 8192\n\n\
         [[pools]]\nname = \"engine\"\ndialect = \"vllm\"\nendpoints = [\"http://{engine}\"]\nmodels = [\"{MODEL}\"]\n\n{}{}",
        tenant("bare", KEY_BARE, ""),
        tenant("policy", KEY_POLICY, POLICY_CHAIN),
    )
}

/// True when an SSE chunk carries a generated token (text or reasoning).
fn has_token(chunk: &[u8]) -> bool {
    [
        &b"\"content\":\""[..],
        b"\"reasoning_content\":\"",
        b"\"reasoning\":\"",
    ]
    .iter()
    .any(|pat| {
        chunk
            .windows(pat.len())
            .enumerate()
            .any(|(i, w)| w == *pat && chunk.get(i + pat.len()).is_some_and(|&c| c != b'"'))
    })
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

async fn connect(addr: SocketAddr) -> Result<SendRequest<Full<Bytes>>, String> {
    let tcp = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| format!("connect {addr}: {e}"))?;
    tcp.set_nodelay(true).map_err(|e| e.to_string())?;
    let (send, conn) = http1::handshake(TokioIo::new(tcp))
        .await
        .map_err(|e| format!("handshake: {e}"))?;
    tokio::spawn(conn);
    Ok(send)
}

/// Sends one request; its latency (last byte, or first token for streams).
async fn exchange(
    send: &mut SendRequest<Full<Bytes>>,
    setup: &Setup,
    body: Bytes,
    mode: Mode,
) -> Result<Duration, String> {
    send.ready().await.map_err(|e| format!("connection: {e}"))?;
    let req = hyper::Request::post("/v1/chat/completions")
        .header(hyper::header::HOST, "bench")
        .header(hyper::header::CONTENT_TYPE, "application/json")
        .header(
            hyper::header::AUTHORIZATION,
            format!("Bearer {}", setup.key),
        )
        .body(Full::new(body))
        .map_err(|e| e.to_string())?;
    let t0 = Instant::now();
    let resp = send
        .send_request(req)
        .await
        .map_err(|e| format!("request: {e}"))?;
    let status = resp.status();
    let mut body = resp.into_body();
    let mut first = None;
    let mut tail = Vec::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| format!("body: {e}"))?;
        if let Some(data) = frame.data_ref() {
            if mode == Mode::Stream && first.is_none() && has_token(data) {
                first = Some(t0.elapsed());
            }
            if contains(data, b"\"error\"") || !status.is_success() {
                return Err(format!("{status}: {}", String::from_utf8_lossy(data)));
            }
            // The last bytes, to check that the answer is complete.
            tail.extend_from_slice(data);
            if tail.len() > 64 {
                tail.drain(..tail.len() - 64);
            }
        }
    }
    let whole = t0.elapsed();
    if !status.is_success() {
        return Err(format!("status {status}"));
    }
    match mode {
        Mode::Whole if tail.ends_with(b"}") => Ok(whole),
        Mode::Stream if contains(&tail, b"[DONE]") => {
            first.ok_or("a stream without a token".into())
        }
        _ => Err(format!(
            "an incomplete answer ending {:?}",
            String::from_utf8_lossy(&tail)
        )),
    }
}

#[derive(Default)]
struct Tally {
    hist: Option<Histogram<u64>>,
    errors: u64,
    first_error: Option<String>,
}

impl Tally {
    fn new() -> Self {
        Tally {
            hist: Some(Histogram::new_with_bounds(1, 60_000_000_000, 3).expect("histogram")),
            ..Default::default()
        }
    }
    fn record(&mut self, r: Result<Duration, String>) {
        match r {
            Ok(d) => {
                let _ = self
                    .hist
                    .as_mut()
                    .expect("histogram")
                    .record(d.as_nanos().max(1) as u64);
            }
            Err(e) => {
                self.errors += 1;
                self.first_error.get_or_insert(e);
            }
        }
    }
}

/// Runs one setup under one load for `secs` after a warm-up of a quarter of
/// that; latency is recorded only inside the measured window.
async fn measure(setup: &Setup, procs: &[Proc], mode: Mode, load: Load, secs: f64) -> Sample {
    let bodies = Arc::new(Bodies::new(mode == Mode::Stream));
    let setup = Arc::new(*setup);
    let tally = Arc::new(Mutex::new(Tally::new()));
    let warm = Duration::from_secs_f64(secs / 4.0);
    let start = Instant::now() + Duration::from_millis(50);
    let window_start = start + warm;
    let end = window_start + Duration::from_secs_f64(secs);
    let conns = match load {
        Load::Saturation => SATURATION_CONNS,
        Load::Rate(_) => RATE_CONNS,
    };
    // Fixed rate: one task hands out send times; the workers take them.
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<()>();
    let rx = Arc::new(tokio::sync::Mutex::new(rx));
    let mut workers = Vec::new();
    for _ in 0..conns {
        let (setup, tally, bodies, rx) = (setup.clone(), tally.clone(), bodies.clone(), rx.clone());
        workers.push(tokio::spawn(async move {
            let mut send = None;
            let mut done = 0u64;
            tokio::time::sleep_until(start.into()).await;
            loop {
                if let Load::Rate(_) = load {
                    if rx.lock().await.recv().await.is_none() {
                        break;
                    }
                } else if Instant::now() >= end {
                    break;
                }
                if send.is_none() {
                    match connect(setup.addr).await {
                        Ok(s) => send = Some(s),
                        Err(e) => {
                            tally.lock().unwrap().record(Err(e));
                            tokio::time::sleep(Duration::from_millis(10)).await;
                            continue;
                        }
                    }
                }
                let body = bodies.next();
                let sent = Instant::now();
                let r = exchange(send.as_mut().expect("connected"), &setup, body, mode).await;
                if r.is_err() {
                    send = None;
                }
                if sent >= window_start && sent < end {
                    done += 1;
                    tally.lock().unwrap().record(r);
                }
            }
            done
        }));
    }
    let proxy = setup.proxy;
    let cpu_at = |t: Instant| async move {
        tokio::time::sleep_until(t.into()).await;
        proxy.map(|i| procs[i].cpu())
    };
    let pacer = async {
        if let Load::Rate(rps) = load {
            let period = Duration::from_secs_f64(1.0 / rps);
            let mut next = start;
            while next < end {
                tokio::time::sleep_until(next.into()).await;
                let now = Instant::now();
                while next <= now && next < end {
                    let _ = tx.send(());
                    next += period;
                }
            }
        }
        drop(tx);
    };
    let (cpu0, _) = tokio::join!(cpu_at(window_start), pacer);
    let cpu1 = cpu_at(end).await;
    let mut done = 0;
    for w in workers {
        done += w.await.expect("worker");
    }
    let t = Arc::try_unwrap(tally)
        .ok()
        .expect("workers ended")
        .into_inner()
        .unwrap();
    let h = t.hist.expect("histogram");
    let us = |q: f64| h.value_at_quantile(q) as f64 / 1000.0;
    let ok = done.saturating_sub(t.errors);
    Sample {
        rps: ok as f64 / secs,
        p50_us: us(0.50),
        p99_us: us(0.99),
        errors: t.errors,
        first_error: t.first_error,
        cpu_us_per_req: match (cpu0, cpu1) {
            (Some(a), Some(b)) if ok > 0 => Some((b - a).as_secs_f64() * 1e6 / ok as f64),
            _ => None,
        },
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// (max − min) / median, in percent: how far repeated runs disagree.
fn spread(v: &[f64]) -> f64 {
    let m = median(v.to_vec());
    let (lo, hi) = v
        .iter()
        .fold((f64::MAX, f64::MIN), |(lo, hi), &x| (lo.min(x), hi.max(x)));
    if m == 0.0 { 0.0 } else { (hi - lo) / m * 100.0 }
}

/// All rounds of one mode under one load: `rounds[r][setup]`.
struct Series {
    load: Load,
    rounds: Vec<Vec<Sample>>,
}

impl Series {
    fn col(&self, s: usize, f: impl Fn(&Sample) -> f64) -> Vec<f64> {
        self.rounds.iter().map(|r| f(&r[s])).collect()
    }
    /// Median over rounds of (setup − direct) within each round.
    fn added(&self, s: usize, f: impl Fn(&Sample) -> f64) -> f64 {
        median(self.rounds.iter().map(|r| f(&r[s]) - f(&r[0])).collect())
    }
}

struct Run {
    mode: Mode,
    series: Vec<Series>,
}

fn main() {
    let rounds: usize = common::arg("--rounds").unwrap_or(3);
    let secs: f64 = common::arg("--secs").unwrap_or(3.0);
    let write = common::write_target();
    let pin = common::cores() >= 2 && !common::has_flag("--no-pin");
    let (gen_cpu, proxy_cpu) = if pin {
        (Some(0), Some(1))
    } else {
        (None, None)
    };
    if let Some(c) = gen_cpu {
        common::pin_self(c);
    }
    common::raise_fd_limit(16_384);
    let dir = common::work_dir("gateway");

    // The engine shares core 0 with the load generator.
    let engine_port = common::free_port();
    let engine: SocketAddr = ([127, 0, 0, 1], engine_port).into();
    let mut procs = vec![Proc::spawn(
        "engine",
        &dir,
        gen_cpu,
        common::SLUICE,
        &[
            "sim-engine",
            "--listen",
            &engine.to_string(),
            "--zero-latency",
            "--max-num-seqs",
            "4096",
            "--seed",
            "7",
        ],
        &[("RUST_LOG", "warn")],
    )];
    common::wait_ok(&mut procs[0], engine, "/health", Duration::from_secs(30));

    let nginx: SocketAddr = ([127, 0, 0, 1], common::free_port()).into();
    procs.push(common::nginx(&dir, proxy_cpu, nginx, engine, 4096));

    let (sluice_port, ops_port) = (common::free_port(), common::free_port());
    let sluice_conf = dir.join("sluice.toml");
    std::fs::write(&sluice_conf, sluice_config(sluice_port, ops_port, engine))
        .expect("sluice.toml");
    procs.push(Proc::spawn(
        "sluice",
        &dir,
        proxy_cpu,
        common::SLUICE,
        &["serve", "--config", &sluice_conf.display().to_string()],
        &[("RUST_LOG", "warn")],
    ));
    let ops: SocketAddr = ([127, 0, 0, 1], ops_port).into();
    common::wait_ok(&mut procs[2], ops, "/readyz", Duration::from_secs(60));
    let sluice: SocketAddr = ([127, 0, 0, 1], sluice_port).into();

    let setups = [
        Setup {
            id: 'a',
            name: "direct to the engine",
            addr: engine,
            key: KEY_BARE,
            proxy: None,
        },
        Setup {
            id: 'b',
            name: "nginx",
            addr: nginx,
            key: KEY_BARE,
            proxy: Some(1),
        },
        Setup {
            id: 'c',
            name: "sluice, no plugins",
            addr: sluice,
            key: KEY_BARE,
            proxy: Some(2),
        },
        Setup {
            id: 'd',
            name: "sluice, 5 plugins",
            addr: sluice,
            key: KEY_POLICY,
            proxy: Some(2),
        },
    ];

    // `--only d --secs 30 [--stream] [--rate R]`: one setup at saturation or a rate, e.g. to profile the
    // proxy (its pid is printed); no report.
    if let Some(id) = common::arg::<char>("--only") {
        let setup = setups.iter().find(|s| s.id == id).expect("--only a|b|c|d");
        let mode = if common::has_flag("--stream") {
            Mode::Stream
        } else {
            Mode::Whole
        };
        if let Some(i) = setup.proxy {
            println!("{} pid {}", procs[i].name, procs[i].pid());
        }
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let load = common::arg::<f64>("--rate").map_or(Load::Saturation, Load::Rate);
        let s = rt.block_on(measure(setup, &procs, mode, load, secs));
        println!(
            "{} {}: {:.0} req/s, p50 {:.1} µs, p99 {:.1} µs, proxy CPU {} µs/req, errors {} {}",
            setup.id,
            setup.name,
            s.rps,
            s.p50_us,
            s.p99_us,
            fmt_opt(s.cpu_us_per_req),
            s.errors,
            s.first_error.unwrap_or_default()
        );
        return;
    }

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let mut runs = Vec::new();
    for mode in [Mode::Whole, Mode::Stream] {
        let mut series = Vec::new();
        let mut loads = vec![Load::Saturation];
        let mut li = 0;
        while li < loads.len() {
            let load = loads[li];
            let mut rs = Vec::new();
            for r in 0..rounds {
                // Alternate the order too, so drift does not favour one setup.
                let mut order: Vec<usize> = (0..setups.len()).collect();
                order.rotate_left(r % setups.len());
                let mut row: Vec<Option<Sample>> = vec![None; setups.len()];
                for &s in &order {
                    for p in procs.iter_mut() {
                        p.assert_running();
                    }
                    let sample = rt.block_on(measure(&setups[s], &procs, mode, load, secs));
                    if sample.errors > 0 {
                        eprintln!(
                            "  {} {}: {} errors, first: {}",
                            setups[s].id,
                            setups[s].name,
                            sample.errors,
                            sample.first_error.as_deref().unwrap_or("")
                        );
                    }
                    row[s] = Some(sample);
                }
                rs.push(row.into_iter().map(|s| s.expect("measured")).collect());
            }
            let s = Series { load, rounds: rs };
            print_series(mode, &s, &setups);
            if let Load::Saturation = load {
                // Fixed rates every setup sustains: a low one, and half the
                // slowest setup's saturation.
                let slowest = (0..setups.len())
                    .map(|i| median(s.col(i, |x| x.rps)))
                    .fold(f64::MAX, f64::min);
                let high = ((slowest / 2.0) / 100.0).floor() * 100.0;
                loads.push(Load::Rate(LOW_RATE.min(high)));
                if high > LOW_RATE {
                    loads.push(Load::Rate(high));
                }
            }
            series.push(s);
            li += 1;
        }
        runs.push(Run { mode, series });
    }
    let report = report(&runs, &setups, rounds, secs, pin, &common::nginx_version());
    println!("\n{report}");
    if let Some(file) = write {
        common::write_section(&file, "gateway", &report);
    }
}

fn load_title(load: Load) -> String {
    match load {
        Load::Saturation => format!("saturation ({SATURATION_CONNS} connections, closed loop)"),
        Load::Rate(r) => format!("{r:.0} req/s (open loop)"),
    }
}

fn print_series(mode: Mode, s: &Series, setups: &[Setup]) {
    println!("\n{} — {}", mode.title(), load_title(s.load));
    for (i, setup) in setups.iter().enumerate() {
        let rps = s.col(i, |x| x.rps);
        let p50 = s.col(i, |x| x.p50_us);
        let p99 = s.col(i, |x| x.p99_us);
        println!(
            "  {} {:<22} {:>9.0} req/s (±{:.1}%)  p50 {:>8.1} µs  p99 {:>8.1} µs  errors {}",
            setup.id,
            setup.name,
            median(rps.clone()),
            spread(&rps) / 2.0,
            median(p50),
            median(p99),
            s.rounds.iter().map(|r| r[i].errors).sum::<u64>()
        );
    }
}

fn fmt_opt(v: Option<f64>) -> String {
    v.map_or("–".into(), |v| format!("{v:.1}"))
}

fn report(
    runs: &[Run],
    setups: &[Setup],
    rounds: usize,
    secs: f64,
    pin: bool,
    nginx: &str,
) -> String {
    let mut out = String::new();
    let push = |out: &mut String, s: String| {
        out.push_str(&s);
        out.push('\n');
    };
    push(
        &mut out,
        "## Gateway overhead: direct, nginx, sluice\n".into(),
    );
    push(&mut out, "Command: `bash benches/run.sh` (installs nginx when missing, then `cargo bench --bench gateway -- --write BENCHMARKS.md`, the scale and the chain benches).\n".into());
    push(&mut out, format!("Machine: {}.\n", common::machine()));
    push(
        &mut out,
        format!(
            "Settings: the simulated engine with `--zero-latency` (no sleeps; it still generates and serialises every token); 2 KB chat requests with `max_tokens` 64 and a JSON-schema `response_format`, each with a user message never sent before (a serial number in it; the system prompt is shared), the same bytes for every setup; HTTP/1.1 keep-alive on both sides; {rounds} rounds of {secs} s per cell after a {:.2} s warm-up, setups alternating (order rotated each round); {}; nginx {nginx} with one worker, upstream keep-alive, `proxy_buffering off`; sluice with its default worker threads (one per core it may use), no trace export, `RUST_LOG=warn`. Load generator: this bench (hyper client, one thread). Saturation: {SATURATION_CONNS} connections back to back. Fixed rates: an open loop on up to {RATE_CONNS} connections, latency from the moment a request is sent. Added latency: setup minus direct within each round, median over rounds. Spread: (max − min) / median of the rounds.\n",
            secs / 4.0,
            if pin {
                "core 0 runs the load generator and the engine, core 1 the proxy under test (taskset)"
            } else {
                "no core pinning"
            },
        ),
    );
    push(&mut out, "The 5-plugin chain: request-shaper (aliases, defaults, clamps), rate-limit (tenant and per-key request and token buckets, limits far above the load), context-cap (counts input tokens), thinking-policy (effort ceiling, vLLM dialect), output-validator (checks the answer against the schema; for streams at the end).\n".into());
    let mut verdicts = Vec::new();
    for run in runs {
        push(&mut out, format!("### {}\n", run.mode.title()));
        for s in &run.series {
            push(&mut out, format!("**{}**\n", load_title(s.load)));
            push(&mut out, "| setup | req/s | spread | p50 µs | p99 µs | added p50 µs | added p99 µs | proxy CPU µs/req | errors |".into());
            push(&mut out, "|---|---|---|---|---|---|---|---|---|".into());
            for (i, setup) in setups.iter().enumerate() {
                let rps = s.col(i, |x| x.rps);
                let cpu: Vec<f64> = s
                    .rounds
                    .iter()
                    .filter_map(|r| r[i].cpu_us_per_req)
                    .collect();
                push(
                    &mut out,
                    format!(
                        "| {} {} | {:.0} | {:.1}% | {:.1} | {:.1} | {} | {} | {} | {} |",
                        setup.id,
                        setup.name,
                        median(rps.clone()),
                        spread(&rps),
                        median(s.col(i, |x| x.p50_us)),
                        median(s.col(i, |x| x.p99_us)),
                        if i == 0 {
                            "–".into()
                        } else {
                            format!("{:.1}", s.added(i, |x| x.p50_us))
                        },
                        if i == 0 {
                            "–".into()
                        } else {
                            format!("{:.1}", s.added(i, |x| x.p99_us))
                        },
                        fmt_opt((!cpu.is_empty()).then(|| median(cpu))),
                        s.rounds.iter().map(|r| r[i].errors).sum::<u64>(),
                    ),
                );
            }
            let m = |i| median(s.col(i, |x| x.rps));
            if let Load::Saturation = s.load {
                push(
                    &mut out,
                    format!(
                        "\nThroughput ratios: c/b {:.2}, d/b {:.2}, d/a {:.2}.\n",
                        m(2) / m(1),
                        m(3) / m(1),
                        m(3) / m(0)
                    ),
                );
                if run.mode == Mode::Whole {
                    let r = m(3) / m(1);
                    verdicts.push(format!(
                        "- 5 plugins ≥ 80 % of nginx's throughput: {:.0} % — {}",
                        r * 100.0,
                        if r >= 0.8 { "met" } else { "missed" }
                    ));
                }
            } else {
                push(&mut out, String::new());
                let (p50, p99) = (s.added(3, |x| x.p50_us), s.added(3, |x| x.p99_us));
                let Load::Rate(rate) = s.load else {
                    unreachable!()
                };
                match run.mode {
                    Mode::Whole => verdicts.push(format!(
                        "- added latency over direct with 5 plugins at {rate:.0} req/s ≤ 150 µs p50 and ≤ 500 µs p99: {p50:.0} µs p50, {p99:.0} µs p99 — {}",
                        if p50 <= 150.0 && p99 <= 500.0 { "met" } else { "missed" }
                    )),
                    Mode::Stream => verdicts.push(format!(
                        "- streaming adds ≤ 1 ms to time to first token at {rate:.0} req/s (5 plugins): {p50:.0} µs p50, {p99:.0} µs p99 — {}",
                        if p99 <= 1000.0 { "met" } else { "missed" }
                    )),
                }
            }
        }
    }
    push(&mut out, "### Targets\n".into());
    for v in verdicts {
        push(&mut out, v);
    }
    out
}
