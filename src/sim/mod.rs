//! The simulated engine: an HTTP server that behaves like vLLM's
//! OpenAI-compatible server (routes, payload shapes, streaming, metrics,
//! queueing and prefix caching) without a model, for demos, integration tests
//! and benchmarks. Latency and faults are configurable globally and per request.

mod api;
mod generate;
mod metrics;
mod scheduler;
pub mod trace;

use std::net::SocketAddr;
use std::num::NonZeroUsize;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context as _;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::{JoinHandle, JoinSet};

use metrics::Metrics;
use scheduler::Scheduler;

/// Upper bound for latency settings: keeps deadline arithmetic far from
/// overflow while allowing any realistic value.
pub(crate) const MAX_DELAY_MS: u64 = 3_600_000;

/// How long in-flight connections may finish after shutdown before they are cut.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

const DEFAULT_MODEL: &str = "deepseek-v4-flash";
const DEFAULT_MAX_MODEL_LEN: u32 = 65536;
const DEFAULT_OUTPUT_TOKENS: u32 = 64;
const DEFAULT_TTFT_MS: u64 = 40;
const DEFAULT_TPOT_MS: u64 = 10;
const DEFAULT_MAX_NUM_SEQS: u32 = 256;
const DEFAULT_BLOCK_SIZE: u32 = 16;
const DEFAULT_KV_CACHE_BLOCKS: u32 = 8192;

/// Engine behaviour; every flag has a default so `sim-engine` runs bare.
#[derive(clap::Args, Clone, Debug)]
pub struct SimOptions {
    /// Model name served (requests naming another model get 404).
    #[arg(long, default_value = DEFAULT_MODEL)]
    pub model: String,
    /// Context window in tokens (prompt + completion).
    #[arg(long, default_value_t = DEFAULT_MAX_MODEL_LEN, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_model_len: u32,
    /// Natural answer length in tokens when the request does not cap it lower.
    #[arg(long, default_value_t = DEFAULT_OUTPUT_TOKENS)]
    pub output_tokens: u32,
    /// Time to first token, in milliseconds.
    #[arg(long = "ttft", value_name = "MS", default_value_t = DEFAULT_TTFT_MS,
          value_parser = clap::value_parser!(u64).range(..=MAX_DELAY_MS))]
    pub ttft_ms: u64,
    /// Time per output token after the first, in milliseconds.
    #[arg(long = "tpot", value_name = "MS", default_value_t = DEFAULT_TPOT_MS,
          value_parser = clap::value_parser!(u64).range(..=MAX_DELAY_MS))]
    pub tpot_ms: u64,
    /// Never sleep (benchmarks); overrides --ttft/--tpot, not per-request overrides.
    #[arg(long)]
    pub zero_latency: bool,
    /// Requests running at once; further requests wait in a FIFO queue.
    #[arg(long, default_value_t = DEFAULT_MAX_NUM_SEQS, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_num_seqs: u32,
    /// Queue bound (0 = unbounded); beyond it requests get 503 with Retry-After.
    #[arg(long, default_value_t = 0)]
    pub max_waiting: u32,
    /// Tokens per KV-cache block.
    #[arg(long, default_value_t = DEFAULT_BLOCK_SIZE, value_parser = clap::value_parser!(u32).range(1..))]
    pub block_size: u32,
    /// KV-cache size in blocks (also the prefix-cache capacity).
    #[arg(long, default_value_t = DEFAULT_KV_CACHE_BLOCKS, value_parser = clap::value_parser!(u32).range(1..))]
    pub kv_cache_blocks: u32,
    /// Fraction of requests answered 500 before any byte.
    #[arg(long, default_value_t = 0.0, value_parser = parse_rate)]
    pub error_rate: f64,
    /// Fraction of requests that hang (streams after their first chunk).
    #[arg(long, default_value_t = 0.0, value_parser = parse_rate)]
    pub stall_rate: f64,
    /// Fraction of requests whose connection is aborted mid-body.
    #[arg(long, default_value_t = 0.0, value_parser = parse_rate)]
    pub drop_rate: f64,
    /// Seed for faults and generated text (random when absent).
    #[arg(long)]
    pub seed: Option<u64>,
}

impl Default for SimOptions {
    fn default() -> Self {
        Self {
            model: DEFAULT_MODEL.to_owned(),
            max_model_len: DEFAULT_MAX_MODEL_LEN,
            output_tokens: DEFAULT_OUTPUT_TOKENS,
            ttft_ms: DEFAULT_TTFT_MS,
            tpot_ms: DEFAULT_TPOT_MS,
            zero_latency: false,
            max_num_seqs: DEFAULT_MAX_NUM_SEQS,
            max_waiting: 0,
            block_size: DEFAULT_BLOCK_SIZE,
            kv_cache_blocks: DEFAULT_KV_CACHE_BLOCKS,
            error_rate: 0.0,
            stall_rate: 0.0,
            drop_rate: 0.0,
            seed: None,
        }
    }
}

fn parse_rate(s: &str) -> Result<f64, String> {
    let v: f64 = s.parse().map_err(|e| format!("{e}"))?;
    if (0.0..=1.0).contains(&v) {
        Ok(v)
    } else {
        Err(format!("{v} is not a rate between 0 and 1"))
    }
}

/// Options built in code bypass clap's checks, so `spawn` repeats them.
#[derive(Debug, thiserror::Error)]
pub enum OptionsError {
    #[error("--{0} must be at least 1")]
    Zero(&'static str),
    #[error("--{0} must be between 0 and 1, got {1}")]
    Rate(&'static str, f64),
    #[error("--{0} must be at most {MAX_DELAY_MS} ms, got {1}")]
    Delay(&'static str, u64),
}

struct Limits {
    max_num_seqs: NonZeroUsize,
    block_size: NonZeroUsize,
    kv_cache_blocks: NonZeroUsize,
}

impl SimOptions {
    fn validate(&self) -> Result<Limits, OptionsError> {
        let nz = |name, v: u32| NonZeroUsize::new(v as usize).ok_or(OptionsError::Zero(name));
        if self.max_model_len == 0 {
            return Err(OptionsError::Zero("max-model-len"));
        }
        for (name, rate) in [
            ("error-rate", self.error_rate),
            ("stall-rate", self.stall_rate),
            ("drop-rate", self.drop_rate),
        ] {
            if !(0.0..=1.0).contains(&rate) {
                return Err(OptionsError::Rate(name, rate));
            }
        }
        for (name, ms) in [("ttft", self.ttft_ms), ("tpot", self.tpot_ms)] {
            if ms > MAX_DELAY_MS {
                return Err(OptionsError::Delay(name, ms));
            }
        }
        Ok(Limits {
            max_num_seqs: nz("max-num-seqs", self.max_num_seqs)?,
            block_size: nz("block-size", self.block_size)?,
            kv_cache_blocks: nz("kv-cache-blocks", self.kv_cache_blocks)?,
        })
    }
}

/// Point-in-time copy of the engine's gauges and counters.
#[derive(Clone, Debug, PartialEq)]
pub struct SimSnapshot {
    pub running: i64,
    pub waiting: i64,
    /// Requests abandoned by their client (queued or running).
    pub cancelled: u64,
    /// Requests that finished normally (`stop` or `length`).
    pub completed: u64,
    /// Prompt tokens looked up in the prefix cache.
    pub prefix_queries: u64,
    /// Prompt tokens found in the prefix cache.
    pub prefix_hits: u64,
    /// Fraction (0..1) of KV-cache blocks held by running requests.
    pub kv_usage: f64,
}

/// State shared by every connection and request of one engine.
pub(crate) struct Engine {
    pub(crate) opts: SimOptions,
    /// Mixed into per-request text seeds, so one engine answers a given
    /// prompt identically every time.
    pub(crate) seed: u64,
    rng: Mutex<fastrand::Rng>,
    pub(crate) scheduler: Arc<Scheduler>,
    pub(crate) metrics: Arc<Metrics>,
    shutdown: watch::Sender<bool>,
    pub(crate) created: u64,
}

impl Engine {
    fn new(opts: SimOptions, limits: &Limits) -> Self {
        let seed = opts.seed.unwrap_or_else(|| fastrand::u64(..));
        let metrics = Arc::new(Metrics::new(&opts.model));
        let scheduler = Arc::new(Scheduler::new(
            limits.max_num_seqs,
            opts.max_waiting as usize,
            limits.block_size,
            limits.kv_cache_blocks,
            metrics.clone(),
        ));
        Self {
            rng: Mutex::new(fastrand::Rng::with_seed(seed)),
            seed,
            scheduler,
            metrics,
            shutdown: watch::channel(false).0,
            created: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
            opts,
        }
    }

    pub(crate) fn with_rng<T>(&self, f: impl FnOnce(&mut fastrand::Rng) -> T) -> T {
        f(&mut self.rng.lock().unwrap_or_else(PoisonError::into_inner))
    }

    /// 32 random hex digits for response and tool-call ids.
    pub(crate) fn random_hex(&self) -> String {
        hex::encode(self.with_rng(|r| r.u128(..)).to_be_bytes())
    }

    /// Resolves once shutdown has been requested.
    pub(crate) async fn stopped(&self) {
        let mut rx = self.shutdown.subscribe();
        // The sender lives in `self`, so this only ends on a real shutdown.
        let _ = rx.wait_for(|stop| *stop).await;
    }
}

/// A running engine. Dropping the handle leaves the engine running; call
/// [`SimHandle::shutdown`] to stop it.
pub struct SimHandle {
    pub addr: SocketAddr,
    engine: Arc<Engine>,
    task: Mutex<Option<JoinHandle<()>>>,
}

impl SimHandle {
    /// Stops accepting connections, lets in-flight requests finish (stalled
    /// and queued ones are ended) and ends the server task.
    pub fn shutdown(&self) {
        self.engine.shutdown.send_replace(true);
        self.engine.scheduler.close();
    }

    pub fn metrics(&self) -> SimSnapshot {
        self.engine.metrics.snapshot()
    }

    /// Waits for the server task to end (after [`SimHandle::shutdown`]).
    pub async fn stopped(&self) {
        let task = self
            .task
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(task) = task {
            let _ = task.await;
        }
    }
}

/// Serves on an already-bound listener in the background.
pub async fn spawn(listener: TcpListener, opts: SimOptions) -> anyhow::Result<SimHandle> {
    let limits = opts.validate()?;
    let addr = listener
        .local_addr()
        .context("reading the listener address")?;
    let engine = Arc::new(Engine::new(opts, &limits));
    let task = tokio::spawn(serve(listener, engine.clone()));
    Ok(SimHandle {
        addr,
        engine,
        task: Mutex::new(Some(task)),
    })
}

/// `sluice sim-engine`: bind, print the address, serve until ctrl-c/SIGTERM.
pub async fn run(listen: SocketAddr, opts: SimOptions) -> anyhow::Result<()> {
    let listener = crate::server::listen(listen).with_context(|| format!("binding {listen}"))?;
    let handle = spawn(listener, opts).await?;
    println!("sim-engine listening on http://{}", handle.addr);
    shutdown_signal().await?;
    tracing::info!("shutting down");
    handle.shutdown();
    handle.stopped().await;
    Ok(())
}

async fn shutdown_signal() -> anyhow::Result<()> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let mut term = signal(SignalKind::terminate()).context("installing SIGTERM handler")?;
        tokio::select! {
            r = tokio::signal::ctrl_c() => r.context("waiting for ctrl-c")?,
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    tokio::signal::ctrl_c()
        .await
        .context("waiting for ctrl-c")?;
    Ok(())
}

async fn serve(listener: TcpListener, engine: Arc<Engine>) {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder.http1().timer(TokioTimer::new());
    builder.http2().timer(TokioTimer::new());
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    // Token chunks are tiny; Nagle would batch them.
                    let _ = stream.set_nodelay(true);
                    conns.spawn(connection(stream, builder.clone(), engine.clone()));
                }
                Err(e) => {
                    // Typically fd exhaustion: back off instead of spinning.
                    tracing::warn!(error = %e, "sim-engine accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
            () = engine.stopped() => break,
        }
    }
    drop(listener);
    let drain = async { while conns.join_next().await.is_some() {} };
    if tokio::time::timeout(SHUTDOWN_GRACE, drain).await.is_err() {
        tracing::warn!("sim-engine: cutting connections still open after the grace period");
    }
    // Dropping the set aborts whatever is left.
}

async fn connection(
    stream: tokio::net::TcpStream,
    builder: auto::Builder<TokioExecutor>,
    engine: Arc<Engine>,
) {
    let svc = {
        let engine = engine.clone();
        service_fn(move |req| api::handle(engine.clone(), req))
    };
    let conn = builder.serve_connection(TokioIo::new(stream), svc);
    tokio::pin!(conn);
    tokio::select! {
        res = conn.as_mut() => {
            if let Err(e) = res {
                tracing::debug!(error = %e, "sim-engine connection ended with an error");
            }
        }
        () = engine.stopped() => {
            conn.as_mut().graceful_shutdown();
            let _ = conn.await;
        }
    }
}
