//! Prometheus metrics under vLLM's names, so scrapers written for vLLM work
//! unchanged against the simulator.

use std::borrow::Cow;
use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::prometheus_text;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use super::SimSnapshot;

pub(crate) const CONTENT_TYPE: &str = prometheus_text::CONTENT_TYPE;

/// vLLM's buckets for `time_to_first_token_seconds`.
const TTFT_BUCKETS: [f64; 22] = [
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
    20.0, 40.0, 80.0, 160.0, 640.0, 2560.0,
];

type ReasonLabel = [(&'static str, &'static str); 1];

/// Why a request left the engine (vLLM's `finished_reason` label values).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum FinishedReason {
    Stop,
    Length,
    Abort,
}

impl FinishedReason {
    fn label(self) -> ReasonLabel {
        [(
            "finished_reason",
            match self {
                FinishedReason::Stop => "stop",
                FinishedReason::Length => "length",
                FinishedReason::Abort => "abort",
            },
        )]
    }
}

pub(crate) struct Metrics {
    registry: Registry,
    pub(crate) running: Gauge,
    pub(crate) waiting: Gauge,
    pub(crate) kv_usage: Gauge<f64, AtomicU64>,
    pub(crate) prefix_queries: Counter,
    pub(crate) prefix_hits: Counter,
    pub(crate) prompt_tokens: Counter,
    pub(crate) generation_tokens: Counter,
    request_success: Family<ReasonLabel, Counter>,
    pub(crate) ttft: Histogram,
    pub(crate) cancelled: Counter,
}

impl Metrics {
    pub(crate) fn new(model: &str) -> Self {
        let labels = [(Cow::Borrowed("model_name"), Cow::Owned(model.to_owned()))];
        let mut registry = Registry::with_labels(labels.into_iter());
        let m = Metrics {
            running: Gauge::default(),
            waiting: Gauge::default(),
            kv_usage: Gauge::default(),
            prefix_queries: Counter::default(),
            prefix_hits: Counter::default(),
            prompt_tokens: Counter::default(),
            generation_tokens: Counter::default(),
            request_success: Family::default(),
            ttft: Histogram::new(TTFT_BUCKETS),
            cancelled: Counter::default(),
            registry: Registry::default(),
        };
        registry.register(
            "vllm:num_requests_running",
            "Number of requests in model execution batches",
            m.running.clone(),
        );
        registry.register(
            "vllm:num_requests_waiting",
            "Number of requests waiting to be processed",
            m.waiting.clone(),
        );
        registry.register(
            "vllm:kv_cache_usage_perc",
            "KV-cache usage. 1 means 100 percent usage",
            m.kv_usage.clone(),
        );
        registry.register(
            "vllm:prefix_cache_queries",
            "Prefix cache queries, in terms of number of queried tokens",
            m.prefix_queries.clone(),
        );
        registry.register(
            "vllm:prefix_cache_hits",
            "Prefix cache hits, in terms of number of cached tokens",
            m.prefix_hits.clone(),
        );
        registry.register(
            "vllm:prompt_tokens",
            "Number of prefill tokens processed",
            m.prompt_tokens.clone(),
        );
        registry.register(
            "vllm:generation_tokens",
            "Number of generation tokens processed",
            m.generation_tokens.clone(),
        );
        registry.register(
            "vllm:request_success",
            "Count of successfully processed requests",
            m.request_success.clone(),
        );
        registry.register(
            "vllm:time_to_first_token_seconds",
            "Histogram of time to first token in seconds",
            m.ttft.clone(),
        );
        registry.register(
            "sim:requests_cancelled",
            "Requests abandoned because the client went away",
            m.cancelled.clone(),
        );
        // Pre-create the label values so they are visible before the first request.
        for r in [
            FinishedReason::Stop,
            FinishedReason::Length,
            FinishedReason::Abort,
        ] {
            let _ = m.request_success.get_or_create(&r.label());
        }
        Metrics { registry, ..m }
    }

    pub(crate) fn finished(&self, reason: FinishedReason) {
        self.request_success.get_or_create(&reason.label()).inc();
    }

    pub(crate) fn encode(&self) -> Result<String, std::fmt::Error> {
        let mut out = String::new();
        prometheus_text::encode(&mut out, &self.registry)?;
        Ok(out)
    }

    pub(crate) fn snapshot(&self) -> SimSnapshot {
        let finished = |r: FinishedReason| self.request_success.get_or_create(&r.label()).get();
        SimSnapshot {
            running: self.running.get(),
            waiting: self.waiting.get(),
            cancelled: self.cancelled.get(),
            completed: finished(FinishedReason::Stop) + finished(FinishedReason::Length),
            prefix_queries: self.prefix_queries.get(),
            prefix_hits: self.prefix_hits.get(),
            kv_usage: self.kv_usage.get(),
        }
    }
}
