//! Engine pools: replicas, least-outstanding balancing, the attempt loop with
//! retries before the first byte, timeouts, and error mapping of engine
//! answers. The streaming half lives in [`relay`].

pub mod relay;

use std::sync::Arc;

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};
use tracing::Instrument as _;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, StatusCode, Uri};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

use crate::config::{Dialect, PoolConfig};
use crate::errors::{GatewayError, TimeoutPhase};
use crate::telemetry::RequestIds;
use crate::telemetry::metrics::{AttemptOutcome, Metrics, PoolMetrics};

/// How much of an engine's error body is read to explain the failure.
const MAX_ENGINE_ERROR_BYTES: usize = 64 << 10;

/// Check an endpoint base URL: `http://host:port[/prefix]`.
pub fn parse_endpoint(s: &str) -> Result<(http::uri::Authority, String), String> {
    let uri: Uri = s.parse().map_err(|e| format!("{s:?} is not a URL: {e}"))?;
    match uri.scheme_str() {
        Some("http") => {}
        Some("https") => {
            return Err(format!(
                "{s:?}: https engine endpoints are not supported yet; engines are reached over plain HTTP inside the cluster"
            ));
        }
        _ => return Err(format!("{s:?} must start with http://")),
    }
    let authority = uri
        .authority()
        .cloned()
        .ok_or_else(|| format!("{s:?} has no host"))?;
    if uri.query().is_some() {
        return Err(format!("{s:?} must not have a query string"));
    }
    let prefix = uri.path().trim_end_matches('/').to_owned();
    Ok((authority, prefix))
}

struct Replica {
    url: String,
    authority: http::uri::Authority,
    prefix: String,
    outstanding: AtomicUsize,
    /// Milliseconds since the pool's epoch until which this replica is skipped.
    ejected_until_ms: AtomicU64,
}

pub struct Pool {
    pub name: String,
    pub dialect: Dialect,
    pub models: Vec<String>,
    replicas: Vec<Replica>,
    client: Client<HttpConnector, Full<Bytes>>,
    api_key: Option<HeaderValue>,
    cfg: PoolConfig,
    epoch: Instant,
    metrics: PoolMetrics,
}

/// An engine response whose status is a success and whose first body chunk
/// has arrived: from here on bytes flow to the client, so no more retries.
/// What the gateway asks the engine for, for the attempt's span.
#[derive(Debug, Clone)]
pub struct EngineCall {
    /// `gen_ai.operation.name`: `chat` or `text_completion`.
    pub operation: &'static str,
    pub model: String,
    pub max_tokens: Option<u64>,
    pub stream: bool,
}

pub struct Upstream {
    /// The attempt's CLIENT span; ends when the answer has been relayed.
    pub span: tracing::Span,
    pub parts: http::response::Parts,
    pub first: Option<Bytes>,
    pub body: Incoming,
    pub lease: Lease,
    pub replica: String,
    pub attempts: u32,
    /// For non-streamed answers: when the whole answer must have arrived.
    pub deadline: Option<tokio::time::Instant>,
}

/// Counts a request as outstanding on its replica until dropped.
pub struct Lease {
    pool: Arc<Pool>,
    idx: usize,
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.pool.replicas[self.idx]
            .outstanding
            .fetch_sub(1, Ordering::Relaxed);
    }
}

/// What one attempt ended with, when it did not succeed.
enum AttemptError {
    /// Nothing reached the client; another replica may be tried.
    Retryable(GatewayError),
    /// Final: retrying cannot help (the engine judged the request itself).
    Final(GatewayError),
}

impl Pool {
    pub fn new(cfg: &PoolConfig, metrics: &Arc<Metrics>) -> anyhow::Result<Pool> {
        let mut replicas = Vec::new();
        for e in &cfg.endpoints {
            let (authority, prefix) = parse_endpoint(e).map_err(|m| anyhow::anyhow!(m))?;
            replicas.push(Replica {
                url: e.clone(),
                authority,
                prefix,
                outstanding: AtomicUsize::new(0),
                ejected_until_ms: AtomicU64::new(0),
            });
        }
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(cfg.connect_timeout));
        connector.set_nodelay(true);
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(90))
            .build(connector);
        let api_key = match &cfg.api_key_env {
            Some(var) => {
                let key = std::env::var(var).map_err(|_| {
                    anyhow::anyhow!("pool {:?}: environment variable {var} is not set", cfg.name)
                })?;
                Some(HeaderValue::try_from(format!("Bearer {key}"))?)
            }
            None => None,
        };
        Ok(Pool {
            name: cfg.name.clone(),
            dialect: cfg.dialect,
            models: cfg.models.clone(),
            replicas,
            client,
            api_key,
            cfg: cfg.clone(),
            epoch: Instant::now(),
            metrics: metrics.pool(&cfg.name, &cfg.endpoints),
        })
    }

    /// Set the replica gauges (health, outstanding) for a scrape.
    pub fn export_replicas(&self) {
        let now = self.now_ms();
        for (i, r) in self.replicas.iter().enumerate() {
            let healthy = r.ejected_until_ms.load(Ordering::Relaxed) <= now;
            let outstanding = r.outstanding.load(Ordering::Relaxed);
            self.metrics.replica_state(i, healthy, outstanding);
        }
    }

    pub fn serves(&self, model: &str) -> bool {
        self.models.iter().any(|m| m == model)
    }

    pub fn idle_timeout(&self) -> Duration {
        self.cfg.idle_timeout
    }

    pub fn request_timeout(&self) -> Duration {
        self.cfg.request_timeout
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    /// Least outstanding requests among replicas not yet tried, preferring
    /// healthy ones; ties broken at random so equal replicas share load.
    fn pick(&self, tried: &[usize]) -> Option<usize> {
        let now = self.now_ms();
        let mut best: Option<(bool, usize, usize)> = None; // (ejected, outstanding, idx)
        let mut ties = 0u32;
        for (i, r) in self.replicas.iter().enumerate() {
            if tried.contains(&i) {
                continue;
            }
            let key = (
                r.ejected_until_ms.load(Ordering::Relaxed) > now,
                r.outstanding.load(Ordering::Relaxed),
                i,
            );
            match best {
                Some(b) if (key.0, key.1) > (b.0, b.1) => {}
                Some(b) if (key.0, key.1) == (b.0, b.1) => {
                    ties += 1;
                    if fastrand::u32(..=ties) == 0 {
                        best = Some(key);
                    }
                }
                _ => {
                    best = Some(key);
                    ties = 0;
                }
            }
        }
        best.map(|b| b.2)
    }

    fn eject(&self, idx: usize) {
        let until = self.now_ms() + self.cfg.eject_for.as_millis() as u64;
        self.replicas[idx]
            .ejected_until_ms
            .store(until, Ordering::Relaxed);
    }

    /// Send a request to the pool: pick a replica, retry on another when an
    /// attempt fails before any byte could reach the client.
    pub async fn send(
        self: &Arc<Self>,
        path: &str,
        client_headers: &HeaderMap,
        body: Bytes,
        call: &EngineCall,
        ids: &RequestIds,
    ) -> Result<Upstream, GatewayError> {
        let stream = call.stream;
        let max_attempts = (1 + self.cfg.retries as usize)
            .min(self.replicas.len())
            .max(1);
        let mut tried = Vec::with_capacity(max_attempts);
        let mut last_err = None;
        let mut headers = self.engine_headers(client_headers, ids);
        while tried.len() < max_attempts {
            let Some(idx) = self.pick(&tried) else { break };
            if !tried.is_empty() {
                self.metrics.retry();
            }
            tried.push(idx);
            let span = self.attempt_span(call, idx, tried.len());
            // The engine's own spans hang under this attempt.
            if let Some(tp) = RequestIds::traceparent_of(&span)
                && let Ok(v) = HeaderValue::from_str(&tp)
            {
                headers.insert(HeaderName::from_static("traceparent"), v);
            }
            self.replicas[idx]
                .outstanding
                .fetch_add(1, Ordering::Relaxed);
            let lease = Lease {
                pool: self.clone(),
                idx,
            };
            let started = std::time::Instant::now();
            match self
                .attempt(idx, path, &headers, body.clone(), stream, lease)
                .instrument(span.clone())
                .await
            {
                Ok(mut up) => {
                    span.record("http.response.status_code", up.parts.status.as_u16());
                    span.record(
                        "gen_ai.response.time_to_first_chunk",
                        started.elapsed().as_secs_f64(),
                    );
                    up.attempts = tried.len() as u32;
                    up.span = span;
                    return Ok(up);
                }
                Err(AttemptError::Final(e)) => {
                    crate::telemetry::record_error(&span, &e);
                    return Err(e);
                }
                Err(AttemptError::Retryable(e)) => {
                    crate::telemetry::record_error(&span, &e);
                    tracing::warn!(
                        pool = %self.name,
                        replica = %self.replicas[idx].url,
                        attempt = tried.len(),
                        error = %e,
                        "engine attempt failed before the first byte"
                    );
                    last_err = Some(e);
                }
            }
        }
        Err(match last_err {
            Some(GatewayError::EngineUnreachable { reason, .. }) => {
                GatewayError::EngineUnreachable {
                    pool: self.name.clone(),
                    attempts: tried.len() as u32,
                    reason,
                }
            }
            Some(e) => e,
            None => GatewayError::EngineUnreachable {
                pool: self.name.clone(),
                attempts: 0,
                reason: "the pool has no replica".into(),
            },
        })
    }

    /// The CLIENT span of one engine attempt, named and attributed per the
    /// GenAI semantic conventions.
    fn attempt_span(&self, call: &EngineCall, idx: usize, attempt: usize) -> tracing::Span {
        let replica = &self.replicas[idx];
        tracing::info_span!(
            target: crate::telemetry::TRACE_TARGET,
            "engine",
            otel.name = %format_args!("{} {}", call.operation, call.model),
            otel.kind = "client",
            otel.status_code = tracing::field::Empty,
            otel.status_description = tracing::field::Empty,
            gen_ai.operation.name = call.operation,
            gen_ai.provider.name = self.dialect.as_str(),
            gen_ai.request.model = %call.model,
            gen_ai.request.max_tokens = call.max_tokens,
            gen_ai.request.stream = call.stream,
            gen_ai.response.id = tracing::field::Empty,
            gen_ai.response.finish_reasons = tracing::field::Empty,
            gen_ai.usage.input_tokens = tracing::field::Empty,
            gen_ai.usage.output_tokens = tracing::field::Empty,
            gen_ai.usage.cache_read.input_tokens = tracing::field::Empty,
            gen_ai.usage.reasoning.output_tokens = tracing::field::Empty,
            gen_ai.response.time_to_first_chunk = tracing::field::Empty,
            server.address = %replica.authority,
            sluice.pool = %self.name,
            sluice.attempt = attempt,
            http.response.status_code = tracing::field::Empty,
            sluice.error.layer = tracing::field::Empty,
            error.type = tracing::field::Empty,
        )
    }

    pub fn replica_count(&self) -> usize {
        self.replicas.len()
    }

    fn engine_headers(&self, client: &HeaderMap, ids: &RequestIds) -> HeaderMap {
        let mut h = HeaderMap::with_capacity(client.len() + 4);
        for (name, value) in client {
            if !is_dropped_request_header(name) {
                h.append(name.clone(), value.clone());
            }
        }
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        if let Ok(v) = HeaderValue::from_str(&ids.traceparent()) {
            h.insert(HeaderName::from_static("traceparent"), v);
        }
        if let Ok(v) = HeaderValue::from_str(&ids.request_id) {
            h.insert(HeaderName::from_static("x-request-id"), v);
        }
        if let Some(k) = &self.api_key {
            h.insert(header::AUTHORIZATION, k.clone());
        }
        h
    }

    async fn attempt(
        &self,
        idx: usize,
        path: &str,
        headers: &HeaderMap,
        body: Bytes,
        stream: bool,
        lease: Lease,
    ) -> Result<Upstream, AttemptError> {
        let replica = &self.replicas[idx];
        let uri = Uri::builder()
            .scheme("http")
            .authority(replica.authority.clone())
            .path_and_query(format!("{}{}", replica.prefix, path))
            .build()
            .map_err(|e| AttemptError::Final(GatewayError::Internal(e.to_string())))?;
        let mut req = Request::new(Full::new(body));
        *req.method_mut() = Method::POST;
        *req.uri_mut() = uri;
        *req.headers_mut() = headers.clone();

        // Streams must show a first chunk within ttft_timeout; a plain answer
        // comes whole, within request_timeout.
        let (budget, phase) = if stream {
            (self.cfg.ttft_timeout, TimeoutPhase::FirstToken)
        } else {
            (self.cfg.request_timeout, TimeoutPhase::WholeRequest)
        };
        let deadline = tokio::time::Instant::now() + budget;
        let timeout = || {
            AttemptError::Final(GatewayError::EngineTimeout {
                pool: self.name.clone(),
                phase,
                after: budget,
            })
        };

        let count = |outcome| self.metrics.attempt(idx, outcome);
        let resp = match tokio::time::timeout_at(deadline, self.client.request(req)).await {
            Err(_) => {
                count(AttemptOutcome::Timeout);
                return Err(timeout());
            }
            Ok(Err(e)) => {
                // Replica addresses and socket errors go to the log, not to customers.
                tracing::warn!(pool = %self.name, replica = %replica.url, error = %error_chain(&e), "engine request failed");
                let reason = if e.is_connect() {
                    count(AttemptOutcome::ConnectError);
                    self.eject(idx);
                    "could not connect"
                } else {
                    count(AttemptOutcome::Reset);
                    "the connection closed before an answer"
                };
                return Err(AttemptError::Retryable(GatewayError::EngineUnreachable {
                    pool: self.name.clone(),
                    attempts: 1,
                    reason: reason.into(),
                }));
            }
            Ok(Ok(r)) => r,
        };

        let (mut parts, mut body) = resp.into_parts();
        if !parts.status.is_success() {
            count(AttemptOutcome::of_status(parts.status));
            return Err(self.engine_error(parts.status, body, deadline).await);
        }
        // The first token may be minutes away: hold no slice of hyper's read buffer.
        parts.headers = crate::body::detach_headers(&parts.headers);
        let first = loop {
            match tokio::time::timeout_at(deadline, body.frame()).await {
                Err(_) => {
                    count(AttemptOutcome::Timeout);
                    return Err(timeout());
                }
                Ok(None) => break None,
                Ok(Some(Err(e))) => {
                    count(AttemptOutcome::Reset);
                    tracing::warn!(pool = %self.name, replica = %replica.url, error = %e, "engine body failed before the first chunk");
                    return Err(AttemptError::Retryable(GatewayError::EngineStreamBroken {
                        pool: self.name.clone(),
                        reason: "the answer broke off before its first chunk".into(),
                    }));
                }
                Ok(Some(Ok(frame))) => match frame.into_data() {
                    Ok(d) if d.is_empty() => continue,
                    Ok(d) => break Some(d),
                    Err(_) => continue, // trailers before data: nothing to relay
                },
            }
        };
        count(AttemptOutcome::Ok);
        Ok(Upstream {
            span: tracing::Span::none(),
            parts,
            first,
            body,
            lease,
            replica: replica.url.clone(),
            attempts: 1,
            deadline: (!stream).then_some(deadline),
        })
    }

    /// Turn an engine's non-success answer into our error, keeping its message.
    async fn engine_error(
        &self,
        status: StatusCode,
        body: Incoming,
        deadline: tokio::time::Instant,
    ) -> AttemptError {
        // The attempt's span (current here) shows what the engine answered.
        tracing::Span::current().record("http.response.status_code", status.as_u16());
        let bytes = match tokio::time::timeout_at(
            deadline,
            Limited::new(body, MAX_ENGINE_ERROR_BYTES).collect(),
        )
        .await
        {
            Ok(Ok(c)) => c.to_bytes(),
            _ => Bytes::new(),
        };
        let (message, param) = engine_message(&bytes);
        let message = message.unwrap_or_else(|| {
            status
                .canonical_reason()
                .unwrap_or("no reason given")
                .to_owned()
        });
        match status.as_u16() {
            // The engine judged the customer's request (e.g. context too long).
            400 | 413 | 422 => AttemptError::Final(GatewayError::EngineRejected {
                status,
                message,
                param,
            }),
            // Overloaded: another replica may have room.
            429 => AttemptError::Retryable(GatewayError::EngineBusy {
                pool: self.name.clone(),
            }),
            // Failing replica: another may do better.
            500..=599 => AttemptError::Retryable(GatewayError::EngineFailed {
                pool: self.name.clone(),
                status,
                message,
            }),
            // 401/403/404/...: our config and the engine disagree; not the customer's fault.
            _ => AttemptError::Final(GatewayError::EngineFailed {
                pool: self.name.clone(),
                status,
                message,
            }),
        }
    }
}

/// Engines answer `{"error": {"message", "param"}}` (current vLLM, OpenAI) or
/// the older flat `{"message": ..}`.
fn engine_message(body: &[u8]) -> (Option<String>, Option<String>) {
    let Ok(v) = serde_json::from_slice::<serde_json::Value>(body) else {
        let text = String::from_utf8_lossy(body).trim().to_owned();
        return ((!text.is_empty()).then(|| truncate(text, 500)), None);
    };
    let obj = v.get("error").filter(|e| e.is_object()).unwrap_or(&v);
    let message = obj
        .get("message")
        .and_then(|m| m.as_str())
        .map(|m| truncate(m.to_owned(), 2000));
    let param = obj.get("param").and_then(|p| p.as_str()).map(str::to_owned);
    (message, param)
}

fn truncate(mut s: String, max: usize) -> String {
    if crate::errors::truncate_utf8(&mut s, max) {
        s.push('…');
    }
    s
}

fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut src = e.source();
    while let Some(s) = src {
        out.push_str(": ");
        out.push_str(&s.to_string());
        src = s.source();
    }
    out
}

/// Hop-by-hop headers, the client's credentials, and what we set ourselves.
fn is_dropped_request_header(name: &HeaderName) -> bool {
    matches!(
        name.as_str(),
        "connection"
            | "keep-alive"
            | "proxy-connection"
            | "proxy-authorization"
            | "transfer-encoding"
            | "te"
            | "trailer"
            | "upgrade"
            | "host"
            | "content-length"
            | "authorization"
            | "x-api-key"
            | "api-key"
            | "cookie"
            | "accept-encoding"
            | "traceparent"
            | "x-request-id"
    )
}

/// Hop-by-hop response headers are per connection and must not be relayed.
pub const HOP_BY_HOP: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-connection",
    "transfer-encoding",
    "te",
    "trailer",
    "upgrade",
];

/// Newer vLLM releases call the reasoning text `reasoning`; clients of the
/// DeepSeek API and the OpenAI SDKs read `reasoning_content`. Rename the key
/// in an engine's bytes (a whole answer or SSE events) when the engine used
/// only the new name. A `"reasoning":` whose quote is not escaped can only be
/// an object key in JSON, so a byte-level rename is exact.
pub fn normalize_reasoning(data: &[u8]) -> Option<Bytes> {
    const OLD: &[u8] = b"\"reasoning\":";
    const NEW: &[u8] = b"\"reasoning_content\":";
    let has = |needle: &[u8]| data.windows(needle.len()).any(|w| w == needle);
    if !has(OLD) || has(b"\"reasoning_content\"") {
        return None;
    }
    let mut out = Vec::with_capacity(data.len() + 64);
    let mut i = 0;
    while i < data.len() {
        if data[i..].starts_with(OLD) && (i == 0 || data[i - 1] != b'\\') {
            out.extend_from_slice(NEW);
            i += OLD.len();
        } else {
            out.push(data[i]);
            i += 1;
        }
    }
    Some(Bytes::from(out))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reasoning_key_is_renamed_only_as_a_key() {
        let out =
            normalize_reasoning(br#"data: {"delta":{"reasoning":"a \"reasoning\": b"}}"#).unwrap();
        assert_eq!(
            &out[..],
            br#"data: {"delta":{"reasoning_content":"a \"reasoning\": b"}}"#
        );
        assert!(normalize_reasoning(br#"{"reasoning_content":"x","reasoning":"x"}"#).is_none());
        assert!(normalize_reasoning(br#"{"content":"x"}"#).is_none());
    }
}
