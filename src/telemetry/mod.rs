//! Request identity (W3C trace context, request ids) and log setup.
//!
//! Every response carries `x-request-id` and `traceparent`; error bodies carry
//! the trace id, so an SRE can go from a customer's error to the trace.

pub mod metrics;

use http::{HeaderMap, HeaderValue, Response};

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
        let request_id = headers
            .get("x-request-id")
            .and_then(|v| v.to_str().ok())
            .filter(|s| !s.is_empty() && s.len() <= 128 && s.bytes().all(|b| b.is_ascii_graphic()))
            .map(str::to_owned)
            .unwrap_or_else(|| random_hex(16));
        RequestIds {
            trace_id,
            span_id: random_hex(8),
            request_id,
            sampled,
        }
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

/// Logs to stderr; `SLUICE_LOG` (or `RUST_LOG`) filters, default `info`.
pub fn init_logging() {
    use tracing_subscriber::EnvFilter;
    let filter = std::env::var("SLUICE_LOG")
        .ok()
        .or_else(|| std::env::var("RUST_LOG").ok())
        .unwrap_or_else(|| "info".into());
    let _ = tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::new(filter))
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .try_init();
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
