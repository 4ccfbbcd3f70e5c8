//! Scale (issue 6): sluice's resident memory while it holds 10,000 idle
//! streams, and its start-up time and memory with 1,000 tenants of 3 plugins
//! each. The release `sluice` and its simulated engine run as child processes.
//!
//!     cargo bench --bench scale [-- --write BENCHMARKS.md]
//!     cargo bench --bench scale -- --streams 500 --tenants 50   # smoke run

mod common;

use std::fmt::Write as _;
use std::fs;
use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::thread::sleep;
use std::time::{Duration, Instant};

use common::{Proc, SLUICE};
use serde_json::json;
use sluice::config::hash_key;

const MODEL: &str = "deepseek-v4-flash";
const STREAMS: usize = 10_000;
const TARGET_MIB: f64 = 200.0;
/// The engine's first token comes long after the measurement: streams stay silent.
const IDLE_TTFT_MS: u64 = 600_000;
/// Connections opened per step, and how many may wait unaccepted: well under
/// the listen backlog (1024), so no SYN is dropped and retried a second later.
const BATCH: usize = 100;
const MAX_LAG: usize = 400;
/// Descriptors sluice may need beyond its baseline and two per stream.
const FD_MARGIN: usize = 64;
/// Giving up when sluice's in-flight count stops growing this long.
const STALL: Duration = Duration::from_secs(30);
const WARM_UP: usize = 20;
const TENANTS: usize = 1_000;
const STARTUP_RUNS: usize = 3;

/// The realistic worst case: the five built-in plugins, limits far above the load.
const FIVE_PLUGINS: &str = r#"
[[tenants.plugins]]
builtin = "request-shaper"
config = { model_aliases = { "flash" = "deepseek-v4-flash" }, defaults = { temperature = 0.6 }, clamp = { temperature = [0.0, 1.5], max_tokens = [1, 16384] } }
[[tenants.plugins]]
builtin = "rate-limit"
config = { requests_per_minute = 1000000, request_burst = 1000000, tokens_per_minute = 1000000000, token_burst = 1000000000 }
[[tenants.plugins]]
builtin = "context-cap"
config = { max_input_tokens = 32768, max_output_tokens = 8192 }
[[tenants.plugins]]
builtin = "thinking-policy"
config = { default = "allow", max_reasoning_effort = "medium" }
[[tenants.plugins]]
builtin = "output-validator"
config = { max_retries = 1 }
"#;

fn main() {
    let dir = common::work_dir("scale");
    let want_fds = (2 * STREAMS + 1024) as u64;
    let fd_limit = common::raise_fd_limit(want_fds);
    // The machine may be shared: say how busy it was when the run began.
    let load = fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let load = load.split(' ').next().unwrap_or("?");
    let machine = format!(
        "{}; 1-minute load average {load} at the start",
        common::machine()
    );
    println!("scale bench on {machine}; open-file limit {fd_limit} (wanted {want_fds})");

    let rows = [
        idle_streams(&dir, "five-plugins", Some(FIVE_PLUGINS), fd_limit),
        idle_streams(&dir, "no-plugins", Some(""), fd_limit),
        idle_streams(&dir, "nginx (baseline)", None, fd_limit),
    ];
    let engine = Engine::start(&dir, "engine-tenants");
    let one = tenant_runs(&dir, engine.addr, 1);
    let many = tenant_runs(
        &dir,
        engine.addr,
        common::arg("--tenants").unwrap_or(TENANTS),
    );
    drop(engine);

    let md = report(&machine, (fd_limit, want_fds), &rows, [&one, &many]);
    println!("\n{md}");
    if let Some(file) = common::write_target() {
        common::write_section(&file, "scale", &md);
    }
}

// ---- A. idle streams ----

struct StreamRow {
    chain: &'static str,
    /// nginx's row: context, not judged against the target.
    baseline: bool,
    fit: usize,
    opened: usize,
    held: usize,
    /// Caveats and failures, for the report.
    notes: Vec<String>,
    open_time: Duration,
    base_kib: u64,
    loaded_kib: u64,
    peak_kib: u64,
    after_kib: u64,
    engine_kib: u64,
}

impl StreamRow {
    fn per_stream_kib(&self) -> f64 {
        self.loaded_kib.saturating_sub(self.base_kib) as f64 / self.held.max(1) as f64
    }

    /// Every stream the fd limit allows opened and held by sluice.
    fn complete(&self) -> bool {
        self.held >= self.opened && self.opened == self.fit
    }

    /// RSS at 10,000 streams: measured, or extrapolated when fewer fit.
    fn at_target_mib(&self) -> f64 {
        if self.held >= STREAMS {
            mib(self.loaded_kib)
        } else {
            (self.base_kib as f64 + self.per_stream_kib() * STREAMS as f64) / 1024.0
        }
    }
}

/// What holds the streams: sluice with a tenant's chain, or nginx as the
/// baseline (`plugins` None).
fn idle_streams(
    dir: &Path,
    chain: &'static str,
    plugins: Option<&str>,
    fd_limit: u64,
) -> StreamRow {
    println!("\n== {STREAMS} idle streams, {chain}");
    let name = chain.split(' ').next().unwrap_or(chain);
    let engine = Engine::start(dir, &format!("engine-{name}"));
    let cap = STREAMS + 1000;
    let (front, addr, key) = match plugins {
        Some(plugins) => {
            let limits =
                format!("[limits]\nmax_connections = {cap}\nmax_inflight_requests = {cap}\n\n");
            let config = limits + &pool(engine.addr) + &tenant(chain, cap, plugins);
            let gw = Sluice::start(dir, &format!("sluice-{chain}"), &config);
            (gw.proc, gw.http, key(chain))
        }
        None => {
            let addr = loopback();
            let p = common::nginx(dir, None, addr, engine.addr, 2 * cap);
            (p, addr, "sk-unused".to_owned())
        }
    };
    let mut gw = Front {
        proc: front,
        engine: engine.addr,
    };
    // Ordinary requests first, so the baseline has its plugin instances,
    // engine connections and allocator arenas.
    for i in 0..WARM_UP {
        let body = chat_body(&format!("warm-up {i}"), i % 2 == 1, None);
        chat(addr, &key, &body).unwrap_or_else(|e| panic!("warm-up request {i}: {e}"));
    }
    sleep(Duration::from_millis(500));
    let base_kib = gw.proc.rss_kib();
    // Each stream holds two of the proxy's descriptors: the client's and the engine's.
    let spare = (fd_limit as usize).saturating_sub(fd_count(gw.proc.pid()) + FD_MARGIN);
    // `--streams N` opens fewer (a smoke run); the report then extrapolates.
    let fit = (spare / 2)
        .min(STREAMS)
        .min(common::arg("--streams").unwrap_or(STREAMS));
    if fit < STREAMS {
        println!("   {fit} streams, not {STREAMS} (open-file limit {fd_limit}, or --streams)");
    }

    let body = chat_body("stay idle", true, Some(IDLE_TTFT_MS));
    let req = request(addr, &key, &body, false);
    let started = Instant::now();
    let mut streams: Vec<TcpStream> = Vec::with_capacity(fit);
    let mut notes = Vec::new();
    if fit < STREAMS {
        notes.push(format!(
            "{fit} streams were opened, not {STREAMS} (the open-file limit {fd_limit} leaves room \
             for {} at two of the proxy's descriptors per stream): its 10,000 figure is baseline + \
             {STREAMS} × per stream",
            spare / 2
        ));
    }
    let mut stuck = false;
    while streams.len() < fit && !stuck {
        for _ in 0..BATCH.min(fit - streams.len()) {
            let opened =
                TcpStream::connect(addr).and_then(|mut s| s.write_all(req.as_bytes()).map(|()| s));
            match opened {
                Ok(s) => streams.push(s),
                Err(e) => {
                    notes.push(format!("stream {} could not open: {e}", streams.len() + 1));
                    stuck = true;
                    break;
                }
            }
        }
        if let Err(n) = gw.wait_inflight(streams.len().saturating_sub(MAX_LAG)) {
            notes.push(format!("the engine stopped at {n} in flight"));
            stuck = true;
        }
    }
    if let Err(n) = gw.wait_inflight(streams.len()) {
        notes.push(format!(
            "only {n} of {} streams reached the engine",
            streams.len()
        ));
    }
    let open_time = started.elapsed();
    sleep(Duration::from_secs(1));
    let held = gw.inflight();
    let (loaded_kib, peak_kib) = (gw.proc.rss_kib(), gw.proc.hwm_kib());
    let engine_kib = engine.proc.rss_kib();
    if let (silent, Some(a)) = check_streams(&streams) {
        let early = streams.len() - silent;
        notes.push(format!("{early} streams were answered early, e.g. {a:?}"));
    }
    let opened = streams.len();
    drop(streams);
    let closed = Instant::now();
    while gw.inflight() > 0 && closed.elapsed() < Duration::from_secs(10) {
        sleep(Duration::from_millis(50));
    }
    if gw.inflight() > 0 {
        let left = gw.inflight();
        notes.push(format!(
            "{left} requests still in flight 10 s after the clients closed"
        ));
    }
    let after_kib = gw.proc.rss_kib();
    #[rustfmt::skip]
    let row = StreamRow {
        chain, baseline: plugins.is_none(), fit, opened, held, notes, open_time,
        base_kib, loaded_kib, peak_kib, after_kib, engine_kib,
    };
    println!(
        "   {held} in flight: {:.1} MiB (baseline {:.1} MiB), {:.1} KiB per stream",
        mib(loaded_kib),
        mib(base_kib),
        row.per_stream_kib()
    );
    row
}

/// Streams that have received no body (as an idle stream should: sluice
/// sends nothing before the first token, nginx passes on the engine's
/// response head at once), and the first line of what some stream got instead.
fn check_streams(streams: &[TcpStream]) -> (usize, Option<String>) {
    let (mut silent, mut answer) = (0, None);
    let mut buf = [0u8; 512];
    for s in streams {
        s.set_nonblocking(true)
            .expect("make a client socket non-blocking");
        let got = match (&*s).read(&mut buf) {
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                silent += 1;
                continue;
            }
            Ok(0) => "connection closed".to_owned(),
            Ok(n) if buf[..n].ends_with(b"\r\n\r\n") && buf.starts_with(b"HTTP/1.1 200") => {
                silent += 1;
                continue;
            }
            Ok(n) => String::from_utf8_lossy(&buf[..n])
                .lines()
                .next()
                .unwrap_or("")
                .to_owned(),
            Err(e) => e.to_string(),
        };
        answer.get_or_insert(got);
    }
    (silent, answer)
}

/// The proxy under test; streams are counted where they end, at the engine
/// (nginx has no in-flight gauge; sluice's would agree).
struct Front {
    proc: Proc,
    engine: SocketAddr,
}

impl Front {
    /// The engine's running plus waiting requests, from its `/metrics`.
    fn inflight(&mut self) -> usize {
        self.proc.assert_running();
        common::http_get(self.engine, "/metrics").map_or(0, |(_, text)| {
            text.lines()
                .filter(|l| {
                    l.starts_with("vllm:num_requests_running")
                        || l.starts_with("vllm:num_requests_waiting")
                })
                .filter_map(|l| l.rsplit(' ').next()?.trim().parse::<f64>().ok())
                .sum::<f64>() as usize
        })
    }

    /// Waits for `n` requests in flight; Err with the count where it stalled.
    fn wait_inflight(&mut self, n: usize) -> Result<usize, usize> {
        let (mut best, mut progress) = (0, Instant::now());
        loop {
            let now = self.inflight();
            if now >= n {
                return Ok(now);
            }
            if now > best {
                (best, progress) = (now, Instant::now());
            } else if progress.elapsed() > STALL {
                return Err(now);
            }
            sleep(Duration::from_millis(5));
        }
    }
}

fn fd_count(pid: u32) -> usize {
    fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}

// ---- B. many tenants ----

struct TenantRun {
    tenants: usize,
    log: String,
    ready: Duration,
    ready_kib: u64,
    served_kib: u64,
    failures: Vec<String>,
    pass: Duration,
}

fn tenant_runs(dir: &Path, engine: SocketAddr, n: usize) -> Vec<TenantRun> {
    println!("\n== {n} tenant(s) of 3 plugins, {STARTUP_RUNS} start-ups");
    let mut config = pool(engine);
    for i in 0..n {
        // Every tenant's configs differ, as they would in a real deployment.
        let plugins = format!(
            "[[tenants.plugins]]\nbuiltin = \"request-shaper\"\n\
             config = {{ defaults = {{ max_tokens = {} }}, clamp = {{ max_tokens = [1, {}] }} }}\n\
             [[tenants.plugins]]\nbuiltin = \"rate-limit\"\n\
             config = {{ requests_per_minute = {}, tokens_per_minute = {} }}\n\
             [[tenants.plugins]]\nbuiltin = \"context-cap\"\n\
             config = {{ max_input_tokens = {}, max_output_tokens = {} }}\n",
            8 + i % 32,
            1024 + i,
            600 + i,
            100_000 + 100 * i,
            4096 + i,
            512 + i
        );
        config += &tenant(&tenant_id(i), 16, &plugins);
    }
    (1..=STARTUP_RUNS)
        .map(|run| {
            let name = format!("sluice-{n}-tenants-{run}");
            let mut gw = Sluice::start(dir, &name, &config);
            let ready_kib = gw.proc.rss_kib();
            // Plugin instances are made on a tenant's first call: one request each.
            let started = Instant::now();
            let failures: Vec<String> = (0..n)
                .map(tenant_id)
                .filter_map(|id| {
                    let body = chat_body(&format!("hello from {id}"), false, None);
                    chat(gw.http, &key(&id), &body).err().map(|e| format!("{id}: {e}"))
                })
                .collect();
            let pass = started.elapsed();
            gw.proc.assert_running();
            let served_kib = gw.proc.rss_kib();
            println!(
                "   run {run}: ready in {:.0} ms at {:.1} MiB; {:.1} MiB after {n} requests, {} failed",
                ms(gw.ready),
                mib(ready_kib),
                mib(served_kib),
                failures.len()
            );
            let log = format!("target/bench/scale/{name}.log");
            TenantRun { tenants: n, log, ready: gw.ready, ready_kib, served_kib, failures, pass }
        })
        .collect()
}

fn tenant_id(i: usize) -> String {
    format!("t{i:04}")
}

// ---- the processes ----

struct Engine {
    proc: Proc,
    addr: SocketAddr,
}

impl Engine {
    fn start(dir: &Path, name: &str) -> Engine {
        let addr = loopback();
        let args = format!(
            "sim-engine --listen {addr} --zero-latency --max-num-seqs 20000 --kv-cache-blocks 200000"
        );
        let args: Vec<&str> = args.split(' ').collect();
        let mut proc = Proc::spawn(name, dir, None, SLUICE, &args, &[]);
        common::wait_ok(&mut proc, addr, "/health", Duration::from_secs(30));
        Engine { proc, addr }
    }
}

struct Sluice {
    proc: Proc,
    http: SocketAddr,
    /// From spawning the process to the first 200 from `/readyz`.
    ready: Duration,
}

impl Sluice {
    fn start(dir: &Path, name: &str, body: &str) -> Sluice {
        let (http, ops) = (loopback(), loopback());
        let config = dir.join(format!("{name}.toml"));
        let text = format!("[server]\nhttp = \"{http}\"\nops = \"{ops}\"\n\n{body}");
        fs::write(&config, text).expect("write the generated config");
        let path = config.to_str().expect("the work directory's path is UTF-8");
        let mut proc = Proc::spawn(name, dir, None, SLUICE, &["serve", "--config", path], &[]);
        let ready = common::wait_ok(&mut proc, ops, "/readyz", Duration::from_secs(300));
        Sluice { proc, http, ready }
    }
}

fn loopback() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], common::free_port()))
}

// ---- config and requests ----

fn pool(engine: SocketAddr) -> String {
    // Timeouts far beyond the measurement: idle streams must not be cut.
    format!(
        "[[pools]]\nname = \"sim\"\nendpoints = [\"http://{engine}\"]\nmodels = [\"{MODEL}\"]\n\
         ttft_timeout = \"1h\"\nidle_timeout = \"1h\"\nrequest_timeout = \"1h\"\n\n"
    )
}

fn tenant(id: &str, max_concurrent: usize, plugins: &str) -> String {
    format!(
        "[[tenants]]\nid = \"{id}\"\ndeployment = \"serverless\"\npool = \"sim\"\n\
         max_concurrent_requests = {max_concurrent}\n\
         [[tenants.api_keys]]\nid = \"{id}-key\"\nsha256 = \"{}\"\n{plugins}\n",
        hash_key(&key(id))
    )
}

fn key(tenant: &str) -> String {
    format!("sk-scale-{tenant}")
}

fn chat_body(content: &str, stream: bool, ttft_ms: Option<u64>) -> String {
    let mut body = json!({
        "model": MODEL,
        "messages": [{"role": "user", "content": content}],
        "stream": stream,
    });
    if let Some(ms) = ttft_ms {
        body["sim"] = json!({ "ttft_ms": ms });
    }
    body.to_string()
}

fn request(addr: SocketAddr, key: &str, body: &str, close: bool) -> String {
    format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {key}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n{}\r\n{body}",
        body.len(),
        if close { "Connection: close\r\n" } else { "" }
    )
}

/// One request on its own connection, read to the end; Err says why it was not a 200.
fn chat(addr: SocketAddr, key: &str, body: &str) -> Result<(), String> {
    let mut s = TcpStream::connect(addr).map_err(|e| format!("connect: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(30)))
        .map_err(|e| e.to_string())?;
    s.write_all(request(addr, key, body, true).as_bytes())
        .map_err(|e| format!("send: {e}"))?;
    let mut out = Vec::new();
    s.read_to_end(&mut out).map_err(|e| format!("read: {e}"))?;
    let out = String::from_utf8_lossy(&out);
    if out.split(' ').nth(1) == Some("200") {
        return Ok(());
    }
    let answer = match out.split_once("\r\n\r\n") {
        Some((head, "")) => head,
        Some((_, body)) => body,
        None => &out,
    };
    Err(answer.chars().take(300).collect())
}

// ---- report ----

fn report(machine: &str, fd: (u64, u64), rows: &[StreamRow], tenants: [&[TenantRun]; 2]) -> String {
    let mut md = format!(
        "## Scale: idle streams and many tenants\n\n\
         `cargo bench --bench scale -- --write BENCHMARKS.md`\n\nMachine: {machine}.\n\n\
         Settings: release `sluice serve` and `sluice sim-engine --zero-latency --max-num-seqs 20000` \
         as separate processes (and nginx, one worker, as the baseline), plain HTTP on loopback. Idle streams: HTTP/1.1 connections, each \
         streaming one `POST /v1/chat/completions` whose first token the engine holds back for \
         {} s (`\"sim\": {{\"ttft_ms\": {IDLE_TTFT_MS}}}`), opened {BATCH} at a time with at most \
         {MAX_LAG} not yet in flight; RSS (of nginx: master and worker) read 1 s after the engine \
         counted them all (`vllm:num_requests_running` + `_waiting`); the baseline after {WARM_UP} warm-up requests; \"after close\" once the count is back \
         to 0 (at most 10 s). Open-file limit {} (wanted {}).\n\n\
         | proxy: tenant's chain | streams in flight | RSS before | RSS with streams | peak | per stream \
         | RSS after close | engine RSS | time to open |\n\
         |---|---:|---:|---:|---:|---:|---:|---:|---:|\n",
        IDLE_TTFT_MS / 1000,
        fd.0,
        fd.1
    );
    let w = &mut md;
    for r in rows {
        let _ = writeln!(
            w,
            "| {} | {} of {} | {:.1} MiB | {:.1} MiB | {:.1} MiB | {:.1} KiB | {:.1} MiB | {:.1} MiB | {:.1} s |",
            r.chain,
            r.held,
            r.opened,
            mib(r.base_kib),
            mib(r.loaded_kib),
            mib(r.peak_kib),
            r.per_stream_kib(),
            mib(r.after_kib),
            mib(r.engine_kib),
            r.open_time.as_secs_f64()
        );
    }
    let _ = writeln!(w);
    for r in rows {
        for n in &r.notes {
            let _ = writeln!(w, "- {}: {n}.", r.chain);
        }
    }
    let judged = || rows.iter().filter(|r| !r.baseline);
    let worst = judged().map(StreamRow::at_target_mib).fold(0.0, f64::max);
    let met = worst <= TARGET_MIB && judged().all(StreamRow::complete);
    let measured = judged().all(|r| r.held >= STREAMS);
    let _ = writeln!(
        w,
        "\n**10,000 idle streams <= {TARGET_MIB:.0} MiB: {worst:.1} MiB{} — {}**\n\n\
         Many tenants: each with its own key and a chain of request-shaper, rate-limit and \
         context-cap whose configs differ per tenant, all on one pool. Start-up: from spawning \
         `sluice serve` to the first 200 from `/readyz`; then one non-streaming chat request per \
         tenant, with its key. {STARTUP_RUNS} start-ups each; median (min–max).\n\n\
         | tenants | start-up | RSS at ready | RSS after one request per tenant | first request, mean | failed requests |\n\
         |---:|---:|---:|---:|---:|---:|",
        if measured { "" } else { " (extrapolated)" },
        if met { "met" } else { "missed" }
    );
    for runs in tenants {
        let n = runs[0].tenants;
        let failed: usize = runs.iter().map(|r| r.failures.len()).sum();
        let _ = writeln!(
            w,
            "| {n} | {} ms | {} MiB | {} MiB | {} ms | **{failed} of {}** |",
            spread(runs, 0, |r| ms(r.ready)),
            spread(runs, 1, |r| mib(r.ready_kib)),
            spread(runs, 1, |r| mib(r.served_kib)),
            spread(runs, 2, |r| ms(r.pass) / n as f64),
            n * runs.len()
        );
    }
    let [one, many] = tenants;
    let (a, b) = (one[0].tenants, many[0].tenants);
    let per_tenant = |f: fn(&TenantRun) -> u64| {
        let median = |runs: &[TenantRun]| {
            let mut v: Vec<u64> = runs.iter().map(f).collect();
            v.sort_unstable();
            v[v.len() / 2] as f64
        };
        (median(many) - median(one)) / (b - a) as f64
    };
    let _ = writeln!(
        w,
        "\nPer tenant ((RSS with {b} − RSS with {a}) / {}, medians): {:.1} KiB at ready, \
         {:.1} KiB once it has served a request.",
        b - a,
        per_tenant(|r| r.ready_kib),
        per_tenant(|r| r.served_kib)
    );
    for r in one.iter().chain(many).filter(|r| !r.failures.is_empty()) {
        let (n, first) = (r.failures.len(), &r.failures[0]);
        let _ = writeln!(w, "- {n} failed in {}, e.g. {first}", r.log);
    }
    md
}

/// "median (min–max)" of one value over the runs.
fn spread(runs: &[TenantRun], digits: usize, f: impl Fn(&TenantRun) -> f64) -> String {
    let mut v: Vec<f64> = runs.iter().map(f).collect();
    v.sort_by(f64::total_cmp);
    let (mid, lo, hi) = (v[v.len() / 2], v[0], v[v.len() - 1]);
    format!("{mid:.digits$} ({lo:.digits$}–{hi:.digits$})")
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}
