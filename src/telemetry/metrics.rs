//! Prometheus metrics, served as text at `/metrics` on the ops listener.
//!
//! One [`Metrics`] per gateway, created from the config (tenants, pools'
//! models and the price table bound the label values) and held by
//! `pipeline::Gateway`; pools and the plugin engine get a handle when they
//! are built. Names follow the OpenTelemetry GenAI semantic conventions where
//! they exist (`gen_ai.server.time_to_first_token` ->
//! `gen_ai_server_time_to_first_token_seconds`), `sluice_` otherwise.
//!
//! On the request path a [`Recorder`] follows one exchange: it learns the
//! tenant and model as the pipeline does, goes with the relayed body when the
//! answer streams, and records once when the exchange ends — answered,
//! failed (also after the first byte), or dropped by the client. Per chunk it
//! only copies bytes into a bounded tail, where the engine's usage is found
//! and parsed once at the end.
//!
//! Label values that the client controls are bounded: a model no pool serves
//! is `other`; a request refused before its tenant or model is known has
//! `tenant=""` / `model=""`.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use http::StatusCode;
use prometheus_client::encoding::{EncodeLabelSet, prometheus_text};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use serde_json::Value;

use crate::config::{Config, PriceConfig};
use crate::errors::GatewayError;
use crate::plugins::bindings::Usage;
use crate::plugins::chain::Fault;

/// `Content-Type` of the `/metrics` answer.
pub const CONTENT_TYPE: &str = prometheus_text::CONTENT_TYPE;

/// Time to first token: 5ms .. 60s.
const TTFT_BUCKETS: [f64; 14] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 60.0,
];
/// Time per output token: 1ms .. 1s.
const TPOT_BUCKETS: [f64; 13] = [
    0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.25, 1.0,
];
/// Whole request: 10ms .. 10min.
const DURATION_BUCKETS: [f64; 15] = [
    0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0,
];
/// One plugin hook call: 1µs .. 100ms.
const PLUGIN_CALL_BUCKETS: [f64; 16] = [
    1e-6, 2.5e-6, 5e-6, 1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2,
    5e-2, 0.1,
];

/// Distinct plugin rejection codes kept as label values; further codes are
/// counted as `other` (codes are chosen by tenants' plugins).
const MAX_REJECTION_CODES: usize = 256;
/// Bytes of an answer kept to find its usage in (the usage object and what
/// follows it: `[DONE]` for streams, a few fields for whole answers).
const USAGE_TAIL: usize = 16 << 10;

/// Model label of a request whose model no pool serves.
const OTHER: &str = "other";

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

fn ttft_histogram() -> Histogram {
    Histogram::new(TTFT_BUCKETS)
}
fn tpot_histogram() -> Histogram {
    Histogram::new(TPOT_BUCKETS)
}
fn duration_histogram() -> Histogram {
    Histogram::new(DURATION_BUCKETS)
}
fn plugin_call_histogram() -> Histogram {
    Histogram::new(PLUGIN_CALL_BUCKETS)
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    tenant: Arc<str>,
    model: Arc<str>,
    status: u16,
    layer: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ModelLabels {
    tenant: Arc<str>,
    model: Arc<str>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TokenLabels {
    tenant: Arc<str>,
    model: Arc<str>,
    r#type: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct HookLabels {
    tenant: Arc<str>,
    plugin: Arc<str>,
    hook: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FaultLabels {
    tenant: Arc<str>,
    plugin: Arc<str>,
    fault: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RejectionLabels {
    tenant: Arc<str>,
    plugin: Arc<str>,
    code: Arc<str>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct LimiterLabels {
    tenant: Arc<str>,
    plugin: Arc<str>,
    kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct AttemptLabels {
    pool: Arc<str>,
    replica: Arc<str>,
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PoolLabels {
    pool: Arc<str>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReplicaLabels {
    pool: Arc<str>,
    replica: Arc<str>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BuildLabels {
    version: &'static str,
}

/// USD per million tokens for one model (config `[[prices]]`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Price {
    pub input_cache_hit: f64,
    pub input_cache_miss: f64,
    pub output: f64,
}

impl Price {
    fn of(p: &PriceConfig) -> Price {
        Price {
            input_cache_hit: p.input_cache_hit_per_million,
            input_cache_miss: p.input_cache_miss_per_million,
            output: p.output_per_million,
        }
    }

    /// USD for one answer: cached input at the cache-hit price, the rest of
    /// the input at the cache-miss price, output (reasoning included) at the
    /// output price.
    pub fn cost(&self, u: &Usage) -> f64 {
        let cached = f64::from(u.cached_input_tokens.min(u.input_tokens));
        let missed = f64::from(u.input_tokens.saturating_sub(u.cached_input_tokens));
        (cached * self.input_cache_hit
            + missed * self.input_cache_miss
            + f64::from(u.output_tokens) * self.output)
            / 1_000_000.0
    }
}

/// How one engine attempt ended (`sluice_engine_attempts_total{outcome}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttemptOutcome {
    /// A success status and the first chunk.
    Ok,
    /// The TCP connection could not be made.
    ConnectError,
    /// The connection closed before an answer or before its first chunk.
    Reset,
    /// The engine answered 429.
    Status429,
    /// The engine answered another 4xx (it judged the request).
    Status4xx,
    /// The engine answered 5xx.
    Status5xx,
    /// Any other non-success status.
    StatusOther,
    /// No answer (or no first chunk) within the pool's timeout.
    Timeout,
}

impl AttemptOutcome {
    pub fn as_str(self) -> &'static str {
        match self {
            AttemptOutcome::Ok => "ok",
            AttemptOutcome::ConnectError => "connect_error",
            AttemptOutcome::Reset => "reset",
            AttemptOutcome::Status429 => "status_429",
            AttemptOutcome::Status4xx => "status_4xx",
            AttemptOutcome::Status5xx => "status_5xx",
            AttemptOutcome::StatusOther => "status_other",
            AttemptOutcome::Timeout => "timeout",
        }
    }

    /// The outcome of an attempt the engine answered with `status`.
    pub fn of_status(status: StatusCode) -> AttemptOutcome {
        match status.as_u16() {
            200..=299 => AttemptOutcome::Ok,
            429 => AttemptOutcome::Status429,
            400..=499 => AttemptOutcome::Status4xx,
            500..=599 => AttemptOutcome::Status5xx,
            _ => AttemptOutcome::StatusOther,
        }
    }
}

/// The `fault` label: [`Fault::code`] without its `plugin_` prefix
/// (`timeout`, `trap`, `out_of_memory`, `bad_decision`, `suspended`, `capacity`).
fn fault_label(fault: &Fault) -> &'static str {
    let code = fault.code();
    code.strip_prefix("plugin_").unwrap_or(code)
}

/// Every metric family sluice exports.
pub struct Metrics {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    ttft: HistogramFamily<ModelLabels>,
    tpot: HistogramFamily<ModelLabels>,
    duration: HistogramFamily<ModelLabels>,
    tokens: Family<TokenLabels, Counter>,
    cost: Family<ModelLabels, Counter<f64, AtomicU64>>,
    plugin_calls: HistogramFamily<HookLabels>,
    plugin_faults: Family<FaultLabels, Counter>,
    plugin_rejections: Family<RejectionLabels, Counter>,
    limiter_rejections: Family<LimiterLabels, Counter>,
    engine_attempts: Family<AttemptLabels, Counter>,
    engine_retries: Family<PoolLabels, Counter>,
    replica_healthy: Family<ReplicaLabels, Gauge>,
    replica_outstanding: Family<ReplicaLabels, Gauge>,
    inflight: Gauge,
    spans_exported: Counter,
    spans_dropped: Counter,
    /// Tenant ids and model names from the config, shared as label values
    /// so that recording allocates nothing for them.
    tenants: HashMap<String, Arc<str>>,
    models: HashMap<String, Arc<str>>,
    prices: HashMap<String, Price>,
    rejection_codes: Mutex<HashSet<Arc<str>>>,
    empty: Arc<str>,
    other: Arc<str>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Metrics {
    /// The gateway's metrics: label values bounded by `cfg`'s tenants and
    /// pools, cost priced by its `[[prices]]`.
    pub fn new(cfg: &Config) -> Metrics {
        let tenants = cfg.tenants.iter().map(|t| t.id.as_str());
        let models = cfg
            .pools
            .iter()
            .flat_map(|p| p.models.iter().map(String::as_str));
        Metrics::build(tenants, models, &cfg.prices)
    }

    /// Metrics that nobody scrapes: for a plugin engine outside a gateway
    /// (`sluice plugin validate`, benchmarks).
    pub fn detached() -> Metrics {
        Metrics::build(std::iter::empty(), std::iter::empty(), &[])
    }

    fn build<'a>(
        tenants: impl Iterator<Item = &'a str>,
        models: impl Iterator<Item = &'a str>,
        prices: &[PriceConfig],
    ) -> Metrics {
        let mut m = Metrics {
            registry: Registry::default(),
            requests: Family::default(),
            ttft: Family::new_with_constructor(ttft_histogram),
            tpot: Family::new_with_constructor(tpot_histogram),
            duration: Family::new_with_constructor(duration_histogram),
            tokens: Family::default(),
            cost: Family::default(),
            plugin_calls: Family::new_with_constructor(plugin_call_histogram),
            plugin_faults: Family::default(),
            plugin_rejections: Family::default(),
            limiter_rejections: Family::default(),
            engine_attempts: Family::default(),
            engine_retries: Family::default(),
            replica_healthy: Family::default(),
            replica_outstanding: Family::default(),
            inflight: Gauge::default(),
            spans_exported: Counter::default(),
            spans_dropped: Counter::default(),
            tenants: tenants.map(|n| (n.to_owned(), Arc::from(n))).collect(),
            models: models.map(|n| (n.to_owned(), Arc::from(n))).collect(),
            prices: prices
                .iter()
                .map(|p| (p.model.clone(), Price::of(p)))
                .collect(),
            rejection_codes: Mutex::new(HashSet::new()),
            empty: Arc::from(""),
            other: Arc::from(OTHER),
        };
        let build_info = Family::<BuildLabels, Gauge>::default();
        build_info
            .get_or_create(&BuildLabels {
                version: env!("CARGO_PKG_VERSION"),
            })
            .set(1);
        let r = &mut m.registry;
        r.register(
            "sluice_requests",
            "API requests answered, by tenant, model, HTTP status and failure layer (none for success)",
            m.requests.clone(),
        );
        r.register(
            "gen_ai_server_time_to_first_token_seconds",
            "Time from the request's arrival to the first chunk of a streamed answer relayed",
            m.ttft.clone(),
        );
        r.register(
            "gen_ai_server_time_per_output_token_seconds",
            "Time per output token after the first, of streamed answers that completed with usage",
            m.tpot.clone(),
        );
        r.register(
            "gen_ai_server_request_duration_seconds",
            "Time from the request's arrival to its last byte, of requests that named a model",
            m.duration.clone(),
        );
        r.register(
            "sluice_tokens",
            "Tokens the engines reported: input (cached included), cached_input, output (reasoning included), reasoning",
            m.tokens.clone(),
        );
        r.register(
            "sluice_cost_usd",
            "Cost in USD of the tokens the engines reported, by the [[prices]] table",
            m.cost.clone(),
        );
        r.register(
            "sluice_plugin_call_seconds",
            "Wall time of one plugin hook call",
            m.plugin_calls.clone(),
        );
        r.register(
            "sluice_plugin_faults",
            "Failed plugin calls and invalid decisions, whatever the entry's failure policy",
            m.plugin_faults.clone(),
        );
        r.register(
            "sluice_plugin_rejections",
            "Requests and answers a plugin rejected, by the plugin's code",
            m.plugin_rejections.clone(),
        );
        r.register(
            "sluice_limiter_rejections",
            "Limiter refusals of the host's request and token buckets",
            m.limiter_rejections.clone(),
        );
        r.register(
            "sluice_engine_attempts",
            "Attempts to reach an engine replica, by outcome",
            m.engine_attempts.clone(),
        );
        r.register(
            "sluice_engine_retries",
            "Attempts on another replica after a failure before the first byte",
            m.engine_retries.clone(),
        );
        r.register(
            "sluice_replica_healthy",
            "1 when the replica is in rotation, 0 while it is ejected",
            m.replica_healthy.clone(),
        );
        r.register(
            "sluice_replica_outstanding",
            "Requests outstanding on the replica",
            m.replica_outstanding.clone(),
        );
        r.register(
            "sluice_inflight_requests",
            "Requests being served, until their last byte",
            m.inflight.clone(),
        );
        r.register(
            "sluice_otel_spans_exported",
            "Spans the trace collector accepted",
            m.spans_exported.clone(),
        );
        r.register(
            "sluice_otel_spans_dropped",
            "Spans dropped: the export queue was full or the collector failed",
            m.spans_dropped.clone(),
        );
        r.register(
            "sluice_build_info",
            "Always 1; the version label is sluice's",
            build_info,
        );
        m
    }

    /// The Prometheus text exposition of every family.
    pub fn encode(&self) -> String {
        let mut out = String::with_capacity(16 << 10);
        // Writing to a String cannot fail.
        let _ = prometheus_text::encode(&mut out, &self.registry);
        out
    }

    /// Start following one API request that arrived at `started`.
    pub fn recorder(self: &Arc<Self>, started: Instant) -> Recorder {
        Recorder {
            state: Some(State {
                metrics: self.clone(),
                started,
                tenant: self.empty.clone(),
                model: None,
                status: 200,
                stream: false,
                first_chunk: None,
                usage: None,
                tail: Vec::new(),
            }),
        }
    }

    /// A request answered outside the pipeline (over the connection cap).
    pub fn refused(&self, err: &GatewayError) {
        self.requests
            .get_or_create(&RequestLabels {
                tenant: self.empty.clone(),
                model: self.empty.clone(),
                status: err.status().as_u16(),
                layer: err.layer().as_str(),
            })
            .inc();
    }

    fn tenant_label(&self, id: &str) -> Arc<str> {
        self.tenants
            .get(id)
            .cloned()
            .unwrap_or_else(|| self.other.clone())
    }

    fn model_label(&self, model: &str) -> Arc<str> {
        self.models
            .get(model)
            .cloned()
            .unwrap_or_else(|| self.other.clone())
    }

    /// Bring the trace export counters up to the exporter's own counts.
    pub fn sync_trace_export(&self) {
        let catch_up = |c: &Counter, now: u64| {
            c.inc_by(now.saturating_sub(c.get()));
        };
        catch_up(&self.spans_exported, super::otel::exported_spans());
        catch_up(&self.spans_dropped, super::otel::dropped_spans());
    }

    pub fn set_inflight(&self, n: usize) {
        self.inflight.set(i64::try_from(n).unwrap_or(i64::MAX));
    }

    // --- plugins ---

    /// One hook call of `plugin` for `tenant`, failed or not.
    pub fn plugin_call(
        &self,
        tenant: &Arc<str>,
        plugin: &Arc<str>,
        hook: &'static str,
        took: Duration,
    ) {
        self.plugin_calls
            .get_or_create(&HookLabels {
                tenant: tenant.clone(),
                plugin: plugin.clone(),
                hook,
            })
            .observe(took.as_secs_f64());
    }

    pub fn plugin_fault(&self, tenant: &Arc<str>, plugin: &Arc<str>, fault: &Fault) {
        self.plugin_faults
            .get_or_create(&FaultLabels {
                tenant: tenant.clone(),
                plugin: plugin.clone(),
                fault: fault_label(fault),
            })
            .inc();
    }

    /// A plugin fault known only from the error it became (a decision the
    /// pipeline found invalid after the call).
    pub fn plugin_error(&self, tenant: &str, err: &GatewayError) {
        if let GatewayError::PluginFailed { plugin, fault } = err {
            self.plugin_fault(
                &self.tenant_label(tenant),
                &Arc::from(plugin.as_str()),
                fault,
            );
        }
    }

    pub fn plugin_rejection(&self, tenant: &Arc<str>, plugin: &Arc<str>, code: &str) {
        let code = {
            let mut codes = self
                .rejection_codes
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            match codes.get(code) {
                Some(c) => c.clone(),
                None if codes.len() < MAX_REJECTION_CODES => {
                    let c: Arc<str> = Arc::from(code);
                    codes.insert(c.clone());
                    c
                }
                None => self.other.clone(),
            }
        };
        self.plugin_rejections
            .get_or_create(&RejectionLabels {
                tenant: tenant.clone(),
                plugin: plugin.clone(),
                code,
            })
            .inc();
    }

    /// The host's request bucket (`kind` `requests`) or token bucket
    /// (`tokens`) refused a plugin.
    pub fn limiter_rejection(&self, tenant: &Arc<str>, plugin: &Arc<str>, kind: &'static str) {
        self.limiter_rejections
            .get_or_create(&LimiterLabels {
                tenant: tenant.clone(),
                plugin: plugin.clone(),
                kind,
            })
            .inc();
    }

    // --- engines ---

    /// Handles for one pool's metrics, with its replicas' label values.
    pub fn pool(self: &Arc<Self>, pool: &str, replicas: &[String]) -> PoolMetrics {
        PoolMetrics {
            metrics: self.clone(),
            pool: Arc::from(pool),
            replicas: replicas.iter().map(|r| Arc::from(r.as_str())).collect(),
        }
    }

    fn price(&self, model: &str) -> Option<Price> {
        self.prices.get(model).copied()
    }
}

/// One pool's view of the metrics.
pub struct PoolMetrics {
    metrics: Arc<Metrics>,
    pool: Arc<str>,
    replicas: Vec<Arc<str>>,
}

impl PoolMetrics {
    fn replica(&self, idx: usize) -> ReplicaLabels {
        ReplicaLabels {
            pool: self.pool.clone(),
            replica: self.replicas.get(idx).cloned().unwrap_or_default(),
        }
    }

    pub fn attempt(&self, replica: usize, outcome: AttemptOutcome) {
        self.metrics
            .engine_attempts
            .get_or_create(&AttemptLabels {
                pool: self.pool.clone(),
                replica: self.replicas.get(replica).cloned().unwrap_or_default(),
                outcome: outcome.as_str(),
            })
            .inc();
    }

    pub fn retry(&self) {
        self.metrics
            .engine_retries
            .get_or_create(&PoolLabels {
                pool: self.pool.clone(),
            })
            .inc();
    }

    /// A replica's state, set when metrics are scraped.
    pub fn replica_state(&self, replica: usize, healthy: bool, outstanding: usize) {
        let labels = self.replica(replica);
        self.metrics
            .replica_healthy
            .get_or_create(&labels)
            .set(i64::from(healthy));
        self.metrics
            .replica_outstanding
            .get_or_create(&labels)
            .set(i64::try_from(outstanding).unwrap_or(i64::MAX));
    }
}

/// Follows one API request until it ends, then records it once. Goes with
/// the relayed body when the answer streams ([`Recorder::take`]). Dropped
/// before it recorded (the client went away), it records status 499, layer
/// `customer`.
#[derive(Default)]
pub struct Recorder {
    state: Option<State>,
}

struct State {
    metrics: Arc<Metrics>,
    started: Instant,
    tenant: Arc<str>,
    /// Set once the request named one: its label value.
    model: Option<Arc<str>>,
    /// The status of a relayed answer.
    status: u16,
    stream: bool,
    first_chunk: Option<Instant>,
    /// Usage of the engine answers seen whole (summed over retries).
    usage: Option<Usage>,
    /// The last bytes of a relayed answer, where its usage is.
    tail: Vec<u8>,
}

impl Recorder {
    /// The request's tenant, once authenticated.
    pub fn tenant(&mut self, id: &str) {
        if let Some(s) = &mut self.state {
            s.tenant = s.metrics.tenant_label(id);
        }
    }

    /// The model the request names (`other` when no pool serves it).
    pub fn model(&mut self, model: &str) {
        if let Some(s) = &mut self.state {
            s.model = Some(s.metrics.model_label(model));
        }
    }

    /// Usage of one whole engine answer (every answer counts: each was
    /// generated, also when a plugin then asked for another).
    pub fn usage(&mut self, u: Usage) {
        if let Some(s) = &mut self.state {
            s.usage = Some(match s.usage {
                None => u,
                Some(t) => Usage {
                    input_tokens: t.input_tokens.saturating_add(u.input_tokens),
                    cached_input_tokens: t
                        .cached_input_tokens
                        .saturating_add(u.cached_input_tokens),
                    output_tokens: t.output_tokens.saturating_add(u.output_tokens),
                    reasoning_tokens: t.reasoning_tokens.saturating_add(u.reasoning_tokens),
                },
            });
        }
    }

    /// Hand the request over (to the relayed body); this one then records nothing.
    pub fn take(&mut self) -> Recorder {
        Recorder {
            state: self.state.take(),
        }
    }

    /// The answer with `status` is being relayed; `stream`: it is SSE.
    pub fn relaying(&mut self, status: StatusCode, stream: bool) {
        if let Some(s) = &mut self.state {
            s.status = status.as_u16();
            s.stream = stream;
        }
    }

    /// The first chunk of the answer is on its way to the client.
    pub fn first_chunk(&mut self) {
        let Some(s) = &mut self.state else { return };
        if s.first_chunk.is_some() {
            return;
        }
        let now = Instant::now();
        s.first_chunk = Some(now);
        if let (true, Some(model)) = (s.stream, &s.model) {
            s.metrics
                .ttft
                .get_or_create(&ModelLabels {
                    tenant: s.tenant.clone(),
                    model: model.clone(),
                })
                .observe(now.duration_since(s.started).as_secs_f64());
        }
    }

    /// Bytes of the engine's answer as they pass: the tail is kept.
    pub fn bytes(&mut self, data: &[u8]) {
        let Some(s) = &mut self.state else { return };
        if data.len() >= USAGE_TAIL {
            s.tail.clear();
            s.tail.extend_from_slice(&data[data.len() - USAGE_TAIL..]);
            return;
        }
        if s.tail.len() + data.len() > 2 * USAGE_TAIL {
            let keep = USAGE_TAIL - data.len();
            s.tail.drain(..s.tail.len() - keep);
        }
        s.tail.extend_from_slice(data);
    }

    /// The request was answered (a success, or an answer the pipeline made).
    pub fn answered(&mut self, status: StatusCode) {
        let layer = if status.is_client_error() || status.is_server_error() {
            "gateway"
        } else {
            "none"
        };
        self.finish(status.as_u16(), layer);
    }

    /// A relayed answer ended as its engine finished it.
    pub fn completed(&mut self) {
        let status = self.state.as_ref().map_or(200, |s| s.status);
        self.finish(status, "none");
    }

    /// The request failed with `err` (before or after its first byte).
    pub fn failed(&mut self, err: &GatewayError) {
        self.finish(err.status().as_u16(), err.layer().as_str());
    }

    fn finish(&mut self, status: u16, layer: &'static str) {
        let Some(s) = self.state.take() else { return };
        let m = &*s.metrics;
        let now = Instant::now();
        m.requests
            .get_or_create(&RequestLabels {
                tenant: s.tenant.clone(),
                model: s.model.clone().unwrap_or_else(|| m.empty.clone()),
                status,
                layer,
            })
            .inc();
        let Some(model) = s.model else { return };
        let labels = ModelLabels {
            tenant: s.tenant,
            model,
        };
        m.duration
            .get_or_create(&labels)
            .observe(now.duration_since(s.started).as_secs_f64());
        let Some(usage) = s.usage.or_else(|| usage_in_tail(&s.tail)) else {
            return;
        };
        for (kind, n) in [
            ("input", usage.input_tokens),
            ("cached_input", usage.cached_input_tokens),
            ("output", usage.output_tokens),
            ("reasoning", usage.reasoning_tokens),
        ] {
            m.tokens
                .get_or_create(&TokenLabels {
                    tenant: labels.tenant.clone(),
                    model: labels.model.clone(),
                    r#type: kind,
                })
                .inc_by(u64::from(n));
        }
        if let Some(price) = m.price(&labels.model) {
            m.cost.get_or_create(&labels).inc_by(price.cost(&usage));
        }
        if let Some(first) = s.first_chunk
            && s.stream
            && layer == "none"
            && usage.output_tokens > 1
        {
            let per_token =
                now.duration_since(first).as_secs_f64() / f64::from(usage.output_tokens - 1);
            m.tpot.get_or_create(&labels).observe(per_token);
        }
    }
}

impl Drop for Recorder {
    fn drop(&mut self) {
        // 499: the client closed the request (nginx's convention).
        self.finish(499, "customer");
    }
}

/// The last `"usage": {...}` object in an answer's tail (the usage chunk of a
/// stream, or the usage of a whole answer), parsed as the plugins parse it.
fn usage_in_tail(tail: &[u8]) -> Option<Usage> {
    const KEY: &[u8] = b"\"usage\"";
    let mut end = tail.len();
    while let Some(at) = tail[..end].windows(KEY.len()).rposition(|w| w == KEY) {
        end = at;
        // Inside a string the quote would be escaped.
        if at > 0 && tail[at - 1] == b'\\' {
            continue;
        }
        let rest = tail[at + KEY.len()..].trim_ascii_start();
        let Some(rest) = rest.strip_prefix(b":") else {
            continue;
        };
        let rest = rest.trim_ascii_start();
        if rest.first() != Some(&b'{') {
            continue; // `"usage": null` on the chunks before the last
        }
        let object = serde_json::Deserializer::from_slice(rest)
            .into_iter::<Value>()
            .next()?
            .ok()?;
        let mut wrapper = serde_json::Map::with_capacity(1);
        wrapper.insert("usage".into(), object);
        return crate::plugins::view::usage_of(&Value::Object(wrapper));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn usage(input: u32, cached: u32, output: u32) -> Usage {
        Usage {
            input_tokens: input,
            cached_input_tokens: cached,
            output_tokens: output,
            reasoning_tokens: 0,
        }
    }

    #[test]
    fn cost_prices_cache_hits_misses_and_output_per_million() {
        let p = Price {
            input_cache_hit: 0.07,
            input_cache_miss: 0.27,
            output: 1.10,
        };
        // 1M cached + 1M missed + 1M output = the three prices summed.
        let c = p.cost(&usage(2_000_000, 1_000_000, 1_000_000));
        assert!((c - (0.07 + 0.27 + 1.10)).abs() < 1e-12, "{c}");
        // 1000 input of which 400 cached, 250 output.
        let c = p.cost(&usage(1000, 400, 250));
        let want = (400.0 * 0.07 + 600.0 * 0.27 + 250.0 * 1.10) / 1e6;
        assert!((c - want).abs() < 1e-15, "{c} != {want}");
        // Cached never exceeds input.
        assert_eq!(p.cost(&usage(10, 50, 0)), 10.0 * 0.07 / 1e6);
        assert_eq!(p.cost(&usage(0, 0, 0)), 0.0);
    }

    #[test]
    fn usage_is_found_in_a_stream_tail_and_a_whole_answer() {
        let stream = concat!(
            "data: {\"choices\":[{\"delta\":{\"content\":\"say \\\"usage\\\": {}\"}}],\"usage\":null}\n\n",
            "data: {\"choices\":[],\"usage\":{\"prompt_tokens\":12,\"completion_tokens\":7,",
            "\"prompt_tokens_details\":{\"cached_tokens\":4},",
            "\"completion_tokens_details\":{\"reasoning_tokens\":3}}}\n\n",
            "data: [DONE]\n\n"
        );
        let u = usage_in_tail(stream.as_bytes()).unwrap();
        assert_eq!(
            (
                u.input_tokens,
                u.cached_input_tokens,
                u.output_tokens,
                u.reasoning_tokens
            ),
            (12, 4, 7, 3)
        );
        let whole = br#"{"choices":[{"message":{"content":"{\"usage\": {\"prompt_tokens\": 99}}"}}], "usage" : {"prompt_tokens":5,"completion_tokens":2}, "x": 1}"#;
        let u = usage_in_tail(whole).unwrap();
        assert_eq!((u.input_tokens, u.output_tokens), (5, 2));
        assert!(usage_in_tail(br#"data: {"usage":null}"#).is_none());
        assert!(usage_in_tail(br#"{"content":"\"usage\": {\"prompt_tokens\": 1}"}"#).is_none());
    }

    #[test]
    fn tail_keeps_the_last_bytes() {
        let m = Arc::new(Metrics::detached());
        let mut r = m.recorder(Instant::now());
        for i in 0..10_000u32 {
            r.bytes(format!("{i:08}\n").as_bytes());
        }
        let s = r.state.as_ref().unwrap();
        assert!(s.tail.len() >= USAGE_TAIL && s.tail.len() <= 2 * USAGE_TAIL);
        assert!(s.tail.ends_with(b"00009999\n"));
        r.bytes(&vec![b'x'; 3 * USAGE_TAIL]);
        assert_eq!(r.state.as_ref().unwrap().tail.len(), USAGE_TAIL);
        r.take(); // records nothing
    }

    #[test]
    fn a_recorder_records_once_and_unknown_models_are_other() {
        let m = Arc::new(Metrics::build(
            ["acme"].into_iter(),
            ["m1"].into_iter(),
            &[PriceConfig {
                model: "m1".into(),
                input_cache_hit_per_million: 1.0,
                input_cache_miss_per_million: 2.0,
                output_per_million: 4.0,
            }],
        ));
        let mut r = m.recorder(Instant::now());
        r.tenant("acme");
        r.model("m1");
        r.usage(usage(1_000_000, 500_000, 250_000));
        r.answered(StatusCode::OK);
        r.answered(StatusCode::OK);
        drop(r);
        let mut r = m.recorder(Instant::now());
        r.tenant("acme");
        r.model("client-made-up");
        drop(r);
        let text = m.encode();
        assert!(
            text.contains(
                r#"sluice_requests_total{tenant="acme",model="m1",status="200",layer="none"} 1"#
            ),
            "{text}"
        );
        assert!(
            text.contains(
                r#"sluice_requests_total{tenant="acme",model="other",status="499",layer="customer"} 1"#
            ),
            "{text}"
        );
        assert!(
            text.contains(r#"sluice_cost_usd_total{tenant="acme",model="m1"} 2.5"#),
            "{text}"
        );
        assert!(text.contains(r#"sluice_build_info{version=""#), "{text}");
    }
}
