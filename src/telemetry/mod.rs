//! Request identity (W3C trace context, request ids), log setup and trace
//! export ([`otel`]).
//!
//! Every response carries `x-request-id` and `traceparent`; error bodies carry
//! the trace id, so an SRE can go from a customer's error to the trace.

pub mod genai;
pub mod metrics;
pub mod otel;

use http::{HeaderMap, HeaderValue, Response};
use opentelemetry::trace::TraceContextExt as _;
use tracing_opentelemetry::OpenTelemetrySpanExt as _;

/// Identity of one exchange.
#[derive(Debug, Clone)]
pub struct RequestIds {
    /// 32 lowercase hex digits; taken from an incoming `traceparent` when valid.
    pub trace_id: String,
    /// 16 hex digits: this gateway's span for the exchange.
    pub span_id: String,
    /// Incoming `x-request-id` when it is sane, else generated.
    pub request_id: String,
    /// Sampled flag inherited from the caller (default sampled).
    pub sampled: bool,
}

impl RequestIds {
    pub fn from_headers(headers: &HeaderMap) -> RequestIds {
        let parent = headers
            .get("traceparent")
            .and_then(|v| v.to_str().ok())
            .and_then(parse_traceparent);
        let (trace_id, sampled) = parent.unwrap_or_else(|| (random_hex(16), true));
        RequestIds {
            trace_id,
            span_id: random_hex(8),
            request_id: request_id_of(headers),
            sampled,
        }
    }

    /// The identity of the span this gateway opened for the exchange: with
    /// trace export on, its OpenTelemetry ids (so the trace id in an error
    /// body is the one in Jaeger); otherwise ids of our own, continuing an
    /// incoming `traceparent`.
    pub fn for_span(span: &tracing::Span, headers: &HeaderMap) -> RequestIds {
        let cx = span.context();
        let span_ref = cx.span();
        let sc = span_ref.span_context();
        if !sc.is_valid() {
            return RequestIds::from_headers(headers);
        }
        RequestIds {
            trace_id: sc.trace_id().to_string(),
            span_id: sc.span_id().to_string(),
            request_id: request_id_of(headers),
            sampled: sc.is_sampled(),
        }
    }

    /// The W3C parent context an incoming `traceparent` names, for the
    /// gateway's server span.
    pub fn parent_context(headers: &HeaderMap) -> opentelemetry::Context {
        use opentelemetry::propagation::TextMapPropagator as _;
        struct Extract<'a>(&'a HeaderMap);
        impl opentelemetry::propagation::Extractor for Extract<'_> {
            fn get(&self, key: &str) -> Option<&str> {
                self.0.get(key).and_then(|v| v.to_str().ok())
            }
            fn keys(&self) -> Vec<&str> {
                self.0.keys().map(|k| k.as_str()).collect()
            }
        }
        opentelemetry_sdk::propagation::TraceContextPropagator::new().extract(&Extract(headers))
    }

    /// `traceparent` for a request this gateway sends on behalf of `span`
    /// (an engine attempt): the engine's spans join the trace under it.
    pub fn traceparent_of(span: &tracing::Span) -> Option<String> {
        let cx = span.context();
        let sc = cx.span().span_context().clone();
        sc.is_valid().then(|| {
            format!(
                "00-{}-{}-{:02x}",
                sc.trace_id(),
                sc.span_id(),
                sc.trace_flags().to_u8()
            )
        })
    }

    pub fn traceparent(&self) -> String {
        format!(
            "00-{}-{}-{}",
            self.trace_id,
            self.span_id,
            if self.sampled { "01" } else { "00" }
        )
    }

    /// Add the identity headers to a response.
    pub fn decorate<B>(&self, mut resp: Response<B>) -> Response<B> {
        let h = resp.headers_mut();
        if let Ok(v) = HeaderValue::from_str(&self.request_id) {
            h.insert("x-request-id", v);
        }
        if let Ok(v) = HeaderValue::from_str(&self.traceparent()) {
            h.insert("traceparent", v);
        }
        resp
    }
}

/// The incoming `x-request-id` when it is sane, else a new one.
fn request_id_of(headers: &HeaderMap) -> String {
    headers
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .filter(|s| !s.is_empty() && s.len() <= 128 && s.bytes().all(|b| b.is_ascii_graphic()))
        .map(str::to_owned)
        .unwrap_or_else(|| random_hex(16))
}

/// `00-<32 hex>-<16 hex>-<2 hex>`; all-zero ids are invalid per W3C.
fn parse_traceparent(s: &str) -> Option<(String, bool)> {
    let mut parts = s.trim().split('-');
    let (version, trace, span, flags) =
        (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    let hex = |x: &str, n: usize| {
        x.len() == n
            && x.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    };
    if !hex(version, 2) || version == "ff" || !hex(trace, 32) || !hex(span, 16) || !hex(flags, 2) {
        return None;
    }
    if trace.bytes().all(|b| b == b'0') || span.bytes().all(|b| b == b'0') {
        return None;
    }
    let sampled = u8::from_str_radix(flags, 16).ok()? & 1 == 1;
    Some((trace.to_owned(), sampled))
}

fn random_hex(bytes: usize) -> String {
    let mut out = String::with_capacity(bytes * 2);
    for _ in 0..bytes {
        out.push_str(&format!("{:02x}", fastrand::u8(..)));
    }
    out
}

/// Target of the spans that make up traces. The log leaves them out, so
/// without trace export they are disabled and cost next to nothing.
pub const TRACE_TARGET: &str = "sluice::trace";

/// Mark a span failed, with the layer the failure is attributed to.
pub fn record_error(span: &tracing::Span, err: &crate::errors::GatewayError) {
    span.record("sluice.error.layer", err.layer().as_str());
    span.record("error.type", err.code());
    span.record("otel.status_code", "ERROR");
    span.record("otel.status_description", err.to_string().as_str());
}

/// Logs to stderr; `SLUICE_LOG` (or `RUST_LOG`) filters, default `info`.
/// No trace export (the CLI's short commands).
pub fn init_logging() {
    let _ = init(None);
}

/// Logs, and spans exported over OTLP when `otel` is given. Keep the
/// returned provider: [`flush`] it before the process exits.
pub fn init(
    otel: Option<&otel::Settings>,
) -> anyhow::Result<Option<opentelemetry_sdk::trace::SdkTracerProvider>> {
    use tracing_subscriber::layer::SubscriberExt as _;
    use tracing_subscriber::util::SubscriberInitExt as _;
    use tracing_subscriber::{EnvFilter, Layer as _};
    let filter = std::env::var("SLUICE_LOG")
        .ok()
        .or_else(|| std::env::var("RUST_LOG").ok())
        .unwrap_or_else(|| "info".into());
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_filter(EnvFilter::new(format!("{filter},{TRACE_TARGET}=off")));
    let provider = otel.map(otel::provider).transpose()?;
    // Spans are exported whatever the log filter says: the trace must be
    // whole even when the log is quiet.
    let otel_layer = provider.as_ref().map(|p| {
        tracing_opentelemetry::layer()
            .with_tracer(otel::tracer(p))
            .with_filter(tracing_subscriber::filter::LevelFilter::INFO)
    });
    let _ = tracing_subscriber::registry()
        .with(fmt)
        .with(otel_layer)
        .try_init();
    Ok(provider)
}

/// Export what is queued (at shutdown).
pub fn flush(provider: &opentelemetry_sdk::trace::SdkTracerProvider) {
    let _ = provider.force_flush();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn honours_valid_traceparent() {
        let mut h = HeaderMap::new();
        h.insert(
            "traceparent",
            HeaderValue::from_static("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
        );
        let ids = RequestIds::from_headers(&h);
        assert_eq!(ids.trace_id, "4bf92f3577b34da6a3ce929d0e0e4736");
        assert!(
            ids.traceparent()
                .starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-")
        );
    }

    #[test]
    fn rejects_bad_traceparent() {
        for bad in [
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "garbage",
        ] {
            assert!(parse_traceparent(bad).is_none(), "{bad}");
        }
    }
}
