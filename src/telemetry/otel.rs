//! OpenTelemetry export: `tracing` spans become OTLP spans (HTTP/protobuf or
//! gRPC) on a collector such as Jaeger.
//!
//! Export never slows serving: a finished span is handed to a bounded queue
//! with `try_send` and nothing else; one background thread batches and
//! exports. When the collector is down or slow the queue fills and further
//! spans are dropped and counted ([`dropped_spans`]), never waited for.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::time::{Duration, Instant};

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::WithExportConfig as _;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::error::{OTelSdkError, OTelSdkResult};
use opentelemetry_sdk::trace::{SdkTracerProvider, SpanData, SpanExporter as _, SpanProcessor};

use crate::config::{OtlpProtocol, TelemetryConfig};

static DROPPED: AtomicU64 = AtomicU64::new(0);
static EXPORTED: AtomicU64 = AtomicU64::new(0);
static ENABLED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Whether spans are exported from this process: work that only feeds span
/// attributes is skipped when not.
pub fn enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
}

/// Spans dropped because the export queue was full or the collector failed.
pub fn dropped_spans() -> u64 {
    DROPPED.load(Ordering::Relaxed)
}

/// Spans the collector accepted.
pub fn exported_spans() -> u64 {
    EXPORTED.load(Ordering::Relaxed)
}

/// Spans per export request, and the longest a span waits for one.
const BATCH: usize = 512;
const BATCH_DELAY: Duration = Duration::from_millis(200);

/// Where and how to export, from the config file and the standard
/// `OTEL_*` variables (the file wins where both say something).
#[derive(Debug, Clone)]
pub struct Settings {
    /// Full URL; for HTTP the `/v1/traces` path is added to a bare base URL.
    pub endpoint: String,
    pub protocol: OtlpProtocol,
    pub service_name: String,
    pub queue: usize,
    pub timeout: Duration,
}

impl Settings {
    /// `None` when no endpoint is configured (or `OTEL_SDK_DISABLED=true`):
    /// then no span is exported.
    pub fn resolve(cfg: &TelemetryConfig) -> Option<Settings> {
        let env = |k: &str| std::env::var(k).ok().filter(|v| !v.trim().is_empty());
        if env("OTEL_SDK_DISABLED").is_some_and(|v| v.eq_ignore_ascii_case("true")) {
            return None;
        }
        let protocol = match (
            &cfg.otlp_protocol,
            env("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
                .or_else(|| env("OTEL_EXPORTER_OTLP_PROTOCOL")),
        ) {
            (Some(p), _) => *p,
            (None, Some(p)) if p == "grpc" => OtlpProtocol::Grpc,
            _ => OtlpProtocol::HttpProtobuf,
        };
        let (endpoint, per_signal) = match (
            &cfg.otlp_endpoint,
            env("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"),
            env("OTEL_EXPORTER_OTLP_ENDPOINT"),
        ) {
            (Some(e), _, _) => (e.clone(), false),
            (None, Some(e), _) => (e, true),
            (None, None, Some(e)) => (e, false),
            (None, None, None) => return None,
        };
        // The generic endpoint is a base URL; HTTP adds the signal's path.
        let endpoint = match protocol {
            OtlpProtocol::HttpProtobuf if !per_signal && !endpoint.contains("/v1/traces") => {
                format!("{}/v1/traces", endpoint.trim_end_matches('/'))
            }
            _ => endpoint,
        };
        let service_name = cfg
            .service_name
            .clone()
            .or_else(|| env("OTEL_SERVICE_NAME"))
            .unwrap_or_else(|| "sluice".into());
        Some(Settings {
            endpoint,
            protocol,
            service_name,
            queue: cfg.export_queue,
            timeout: cfg.export_timeout,
        })
    }
}

/// A tracer provider exporting to `settings`. Sampling follows
/// `OTEL_TRACES_SAMPLER[_ARG]` (default: parent-based, always on), so an
/// incoming `traceparent`'s decision is honoured.
pub fn provider(settings: &Settings) -> anyhow::Result<SdkTracerProvider> {
    let processor = QueueProcessor::start(settings.clone())?;
    let resource = Resource::builder()
        .with_service_name(settings.service_name.clone())
        .build();
    Ok(SdkTracerProvider::builder()
        .with_span_processor(processor)
        .with_resource(resource)
        .build())
}

/// A tracer for `tracing-opentelemetry`.
pub fn tracer(provider: &SdkTracerProvider) -> opentelemetry_sdk::trace::Tracer {
    provider.tracer("sluice")
}

enum Msg {
    Span(Box<SpanData>),
    Resource(Resource),
    Flush(SyncSender<()>),
}

/// Bounded queue in front of one export thread.
#[derive(Debug)]
struct QueueProcessor {
    tx: SyncSender<Msg>,
}

impl std::fmt::Debug for Msg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Msg")
    }
}

impl QueueProcessor {
    fn start(settings: Settings) -> anyhow::Result<QueueProcessor> {
        let (tx, rx) = std::sync::mpsc::sync_channel(settings.queue);
        let (ready_tx, ready) = std::sync::mpsc::sync_channel(1);
        let endpoint = settings.endpoint.clone();
        std::thread::Builder::new()
            .name("sluice-otlp".into())
            .spawn(move || {
                // The exporters are async (reqwest, tonic): a runtime of
                // their own, on this thread, keeps them off the serving one.
                let built = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .map_err(anyhow::Error::from)
                    .and_then(|rt| {
                        let exporter = rt.block_on(async { build_exporter(&settings) })?;
                        Ok((rt, exporter))
                    });
                match built {
                    Ok((rt, exporter)) => {
                        let _ = ready_tx.send(Ok(()));
                        export_loop(rt, exporter, rx);
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                    }
                }
            })?;
        ready
            .recv()
            .map_err(|_| anyhow::anyhow!("the trace export thread ended at start"))??;
        tracing::info!(%endpoint, "exporting traces");
        ENABLED.store(true, Ordering::Relaxed);
        Ok(QueueProcessor { tx })
    }
}

fn build_exporter(settings: &Settings) -> anyhow::Result<opentelemetry_otlp::SpanExporter> {
    // The HTTP exporter's client is reqwest without a built-in TLS provider:
    // make sluice's (ring) the process default first.
    let _ = std::sync::Arc::unwrap_or_clone(crate::server::tls::provider()).install_default();
    let b = opentelemetry_otlp::SpanExporter::builder();
    Ok(match settings.protocol {
        OtlpProtocol::HttpProtobuf => b
            .with_http()
            .with_endpoint(settings.endpoint.clone())
            .with_timeout(settings.timeout)
            .build()?,
        OtlpProtocol::Grpc => b
            .with_tonic()
            .with_endpoint(settings.endpoint.clone())
            .with_timeout(settings.timeout)
            .build()?,
    })
}

fn export_loop(
    rt: tokio::runtime::Runtime,
    mut exporter: opentelemetry_otlp::SpanExporter,
    rx: Receiver<Msg>,
) {
    let mut batch: Vec<SpanData> = Vec::with_capacity(BATCH);
    let mut oldest: Option<Instant> = None;
    let mut last_error: Option<Instant> = None;
    loop {
        let wait = oldest.map_or(Duration::from_secs(1), |t| {
            BATCH_DELAY.saturating_sub(t.elapsed())
        });
        let mut flush = None;
        match rx.recv_timeout(wait) {
            Ok(Msg::Span(s)) => {
                batch.push(*s);
                oldest.get_or_insert_with(Instant::now);
            }
            Ok(Msg::Resource(r)) => exporter.set_resource(&r),
            Ok(Msg::Flush(done)) => flush = Some(done),
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => {
                send(&rt, &exporter, &mut batch, &mut last_error);
                return;
            }
        }
        let due = oldest.is_some_and(|t| t.elapsed() >= BATCH_DELAY);
        if batch.len() >= BATCH || due || flush.is_some() {
            send(&rt, &exporter, &mut batch, &mut last_error);
            oldest = None;
        }
        if let Some(done) = flush {
            let _ = done.send(());
        }
    }
}

fn send(
    rt: &tokio::runtime::Runtime,
    exporter: &opentelemetry_otlp::SpanExporter,
    batch: &mut Vec<SpanData>,
    last_error: &mut Option<Instant>,
) {
    if batch.is_empty() {
        return;
    }
    let spans = std::mem::take(batch);
    let n = spans.len() as u64;
    match rt.block_on(exporter.export(spans)) {
        Ok(()) => {
            EXPORTED.fetch_add(n, Ordering::Relaxed);
        }
        Err(e) => {
            DROPPED.fetch_add(n, Ordering::Relaxed);
            // One line a minute at most: a dead collector must not flood logs.
            if last_error.is_none_or(|t| t.elapsed() > Duration::from_secs(60)) {
                *last_error = Some(Instant::now());
                tracing::warn!(error = %e, dropped = n, "trace export failed; spans dropped");
            }
        }
    }
}

/// The longest a flush (at exit) waits for the export thread: a hung
/// collector must not hold the process past its drain.
const FLUSH_WAIT: Duration = Duration::from_secs(3);

impl QueueProcessor {
    fn flush_within(&self, wait: Duration) -> OTelSdkResult {
        let (done, finished) = std::sync::mpsc::sync_channel(1);
        self.tx
            .try_send(Msg::Flush(done))
            .map_err(|e| OTelSdkError::InternalFailure(format!("export queue: {e}")))?;
        finished
            .recv_timeout(wait)
            .map_err(|_| OTelSdkError::Timeout(wait))
    }
}

impl SpanProcessor for QueueProcessor {
    fn on_start(&self, _span: &mut opentelemetry_sdk::trace::Span, _cx: &opentelemetry::Context) {}

    fn on_end(&self, span: SpanData) {
        if !span.span_context.is_sampled() {
            return;
        }
        match self.tx.try_send(Msg::Span(Box::new(span))) {
            Ok(()) => {}
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => {
                DROPPED.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.flush_within(FLUSH_WAIT)
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.flush_within(timeout.min(FLUSH_WAIT))
    }

    fn set_resource(&mut self, resource: &Resource) {
        let _ = self.tx.send(Msg::Resource(resource.clone()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_endpoints_get_the_signal_path_for_http_only() {
        let mut cfg = TelemetryConfig {
            otlp_endpoint: Some("http://collector:4318/".into()),
            ..TelemetryConfig::default()
        };
        let s = Settings::resolve(&cfg).unwrap();
        assert_eq!(s.endpoint, "http://collector:4318/v1/traces");
        assert_eq!(s.protocol, OtlpProtocol::HttpProtobuf);
        cfg.otlp_endpoint = Some("http://collector:4317".into());
        cfg.otlp_protocol = Some(OtlpProtocol::Grpc);
        cfg.service_name = Some("edge-eu".into());
        let s = Settings::resolve(&cfg).unwrap();
        assert_eq!(s.endpoint, "http://collector:4317");
        assert_eq!(s.service_name, "edge-eu");
    }
}
