//! The request's way through sluice, phase by phase. This is the file that
//! reads top to bottom:
//!
//! 1. shed load (gateway-wide in-flight cap)            -> 503 gateway
//! 2. route the path                                      -> 404/405 customer
//! 3. authenticate the tenant                             -> 401 customer
//! 4. tenant concurrency (fair share on shared pools)     -> 429 customer
//! 5. read and bound the body, check the JSON             -> 400/408/413 customer
//! 6. the tenant's plugins, on-request                    -> their 4xx customer;
//!    a failing plugin by its failure policy              -> 500 plugin
//! 7. check the model against the (re-routed) pool        -> 404 customer
//! 8. call the pool (retries before the first byte)       -> 502/503/504 provider;
//!    answers plugins judge are buffered or hooked
//! 9. relay the answer as it streams                      -> SSE error event
//!
//! Every failure is a [`GatewayError`]; it becomes HTTP in `errors.rs` only.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;

use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, header};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tracing::Instrument as _;
use tracing::field::Empty;
use tracing_opentelemetry::OpenTelemetrySpanExt as _;

use crate::auth::{Caller, KeyTable};
use crate::body::{self, ProxyBody};
use crate::config::{Config, Dialect, Limits, TenantConfig};
use crate::errors::GatewayError;
use crate::plugins::chain::Chain;
use crate::plugins::exchange::{self, Exchange, StreamHook};
use crate::plugins::host::CallCtx;
use crate::plugins::phases::{self, Settlement};
use crate::plugins::view::ViewInput;
use crate::plugins::{PluginEngine, Settings, chain};
use crate::telemetry::RequestIds;
use crate::telemetry::metrics::{Metrics, Recorder};
use crate::upstream::relay::{EventHook, Relay, RelayOptions};
use crate::upstream::{self, Pool};

/// Everything a request needs, built once from the config.
pub struct Gateway {
    limits: Limits,
    keys: KeyTable,
    tenants: Vec<Tenant>,
    /// Present when any tenant has plugins or a registry may give it some.
    engine: Option<Arc<PluginEngine>>,
    pools: HashMap<String, Arc<Pool>>,
    inflight: Arc<Semaphore>,
    draining: AtomicBool,
    max_response_retries: u32,
    metrics: Arc<Metrics>,
}

struct Tenant {
    cfg: TenantConfig,
    pool: Arc<Pool>,
    concurrency: Arc<Semaphore>,
    /// Swapped whole by the registry; a request holds the chain it started
    /// with until its last byte.
    chain: ArcSwap<Chain>,
    /// The chain built from the config file, restored when a registry chain
    /// is removed.
    file_chain: Arc<Chain>,
}

impl Tenant {
    /// A pool a plugin routed to: the tenant's own or one of its `extra_pools`.
    fn pool_for(
        &self,
        name: &str,
        plugin: &str,
        pools: &HashMap<String, Arc<Pool>>,
    ) -> Result<Arc<Pool>, GatewayError> {
        let allowed = name == self.cfg.pool || self.cfg.extra_pools.iter().any(|p| p == name);
        match pools.get(name) {
            Some(p) if allowed => Ok(p.clone()),
            _ => Err(GatewayError::PluginFailed {
                plugin: plugin.to_owned(),
                fault: chain::Fault::BadDecision(format!(
                    "routed to pool {name:?}, which tenant {} may not use",
                    self.cfg.id
                )),
            }),
        }
    }
}

/// The OpenAI endpoints sluice serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Endpoint {
    ChatCompletions,
    Completions,
    Models,
}

impl Endpoint {
    /// The name plugins see.
    fn name(self) -> &'static str {
        match self {
            Endpoint::ChatCompletions => "chat-completions",
            Endpoint::Completions => "completions",
            Endpoint::Models => "models",
        }
    }

    /// `gen_ai.operation.name`.
    fn operation(self) -> &'static str {
        match self {
            Endpoint::ChatCompletions => "chat",
            Endpoint::Completions | Endpoint::Models => "text_completion",
        }
    }

    fn path(self) -> &'static str {
        match self {
            Endpoint::ChatCompletions => "/v1/chat/completions",
            Endpoint::Completions => "/v1/completions",
            Endpoint::Models => "/v1/models",
        }
    }
}

/// The few request fields sluice itself needs. Parsing into this validates
/// the whole body's syntax; every other field passes through untouched
/// because the original bytes are forwarded.
#[derive(Deserialize)]
struct RequestHead<'a> {
    #[serde(borrow)]
    model: std::borrow::Cow<'a, str>,
    #[serde(default)]
    stream: Option<bool>,
    // For the trace only: a value that is not a count is the engine's to judge.
    #[serde(default, deserialize_with = "lenient_u64")]
    max_tokens: Option<u64>,
    #[serde(default, deserialize_with = "lenient_u64")]
    max_completion_tokens: Option<u64>,
}

fn lenient_u64<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    Ok(Value::deserialize(d)?.as_u64())
}

impl Gateway {
    pub fn new(cfg: Config) -> anyhow::Result<Gateway> {
        let metrics = Arc::new(Metrics::new(&cfg));
        let mut pools = HashMap::new();
        for p in &cfg.pools {
            pools.insert(p.name.clone(), Arc::new(Pool::new(p, &metrics)?));
        }
        let needs_plugins =
            cfg.registry.is_some() || cfg.tenants.iter().any(|t| !t.plugins.is_empty());
        let engine = if needs_plugins {
            let h = &cfg.plugin_host;
            let settings = Settings {
                timeout: h.timeout,
                max_memory: h.max_memory,
                max_instances: h.max_instances,
                reuse_instances: h.reuse_instances,
            };
            Some(PluginEngine::with_metrics(settings, metrics.clone())?)
        } else {
            None
        };
        let mut tenants = Vec::with_capacity(cfg.tenants.len());
        for (i, t) in cfg.tenants.iter().enumerate() {
            let pool = pools
                .get(&t.pool)
                .cloned()
                .ok_or_else(|| anyhow::anyhow!("tenant {}: no pool {}", t.id, t.pool))?;
            let chain = Arc::new(file_chain(engine.as_ref(), t, i)?);
            tenants.push(Tenant {
                cfg: t.clone(),
                pool,
                concurrency: Arc::new(Semaphore::new(t.max_concurrent_requests)),
                chain: ArcSwap::new(chain.clone()),
                file_chain: chain,
            });
        }
        Ok(Gateway {
            keys: KeyTable::new(&cfg.tenants),
            engine,
            inflight: Arc::new(Semaphore::new(cfg.limits.max_inflight_requests)),
            limits: cfg.limits,
            tenants,
            pools,
            draining: AtomicBool::new(false),
            max_response_retries: cfg.plugin_host.max_response_retries,
            metrics,
        })
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// `/metrics`: the gauges read at scrape time, then every family as text.
    pub fn metrics_text(&self) -> String {
        let free = self.inflight.available_permits();
        self.metrics
            .set_inflight(self.limits.max_inflight_requests.saturating_sub(free));
        for pool in self.pools.values() {
            pool.export_replicas();
        }
        self.metrics.sync_trace_export();
        self.metrics.encode()
    }

    pub fn set_draining(&self) {
        self.draining.store(true, Ordering::Relaxed);
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }

    /// The plugin engine, when this gateway runs plugins.
    pub fn plugin_engine(&self) -> Option<&Arc<PluginEngine>> {
        self.engine.as_ref()
    }

    /// Tenant ids, in config order (the index the registry uses).
    pub fn tenant_ids(&self) -> impl Iterator<Item = &str> {
        self.tenants.iter().map(|t| t.cfg.id.as_str())
    }

    pub fn tenant_index(&self, id: &str) -> Option<usize> {
        self.tenants.iter().position(|t| t.cfg.id == id)
    }

    pub fn tenant_config(&self, tenant: usize) -> &TenantConfig {
        &self.tenants[tenant].cfg
    }

    /// The chain requests of this tenant start with now.
    pub fn chain(&self, tenant: usize) -> Arc<Chain> {
        self.tenants[tenant].chain.load_full()
    }

    /// Put a chain live: the next request uses it; requests in flight finish
    /// with the one they hold.
    pub fn swap_chain(&self, tenant: usize, chain: Arc<Chain>) {
        self.tenants[tenant].chain.store(chain);
    }

    /// The chain the config file gives this tenant.
    pub fn file_chain(&self, tenant: usize) -> Arc<Chain> {
        self.tenants[tenant].file_chain.clone()
    }
}

/// Build a tenant's chain from its `[[tenants.plugins]]`.
fn file_chain(
    engine: Option<&Arc<PluginEngine>>,
    t: &TenantConfig,
    i: usize,
) -> anyhow::Result<Chain> {
    let mut chain = Chain::default();
    for (j, p) in t.plugins.iter().enumerate() {
        let at = format!("tenants[{i}].plugins[{j}]");
        let engine = engine.expect("created when any tenant has plugins");
        let bytes: std::borrow::Cow<'_, [u8]> = match (&p.builtin, &p.path) {
            (Some(name), _) => crate::plugins::builtin::component(name)
                .ok_or_else(|| anyhow::anyhow!("{at}: no built-in plugin {name:?}"))?
                .into(),
            (None, Some(path)) => std::fs::read(path)
                .map_err(|e| anyhow::anyhow!("{at}: cannot read {}: {e}", path.display()))?
                .into(),
            (None, None) => anyhow::bail!("{at}: no plugin named"),
        };
        let compiled = engine
            .compile(&bytes)
            .map_err(|e| anyhow::anyhow!("{at}: {e}"))?;
        let entry = chain::Entry::new(engine, compiled, &t.id, &p.config, p.failure)
            .map_err(|e| anyhow::anyhow!("{at}: {e}"))?;
        chain.entries.push(entry);
    }
    Ok(chain)
}

/// Serve one request. Never fails: errors become responses here.
pub async fn handle(gw: Arc<Gateway>, req: Request<Incoming>) -> Response<ProxyBody> {
    let started = Instant::now();
    let method = req.method().clone();
    let path = req.uri().path().to_owned();
    // The exchange's server span: child of the caller's `traceparent`; it
    // ends with the response's last byte (the relay holds it).
    let span = tracing::info_span!(
        target: crate::telemetry::TRACE_TARGET,
        "request",
        otel.name = %format_args!("{method} {}", span_route(&path)),
        otel.kind = "server",
        otel.status_code = Empty,
        otel.status_description = Empty,
        http.request.method = %method,
        url.path = %path,
        http.response.status_code = Empty,
        sluice.request_id = Empty,
        sluice.tenant = Empty,
        sluice.api_key_id = Empty,
        gen_ai.request.model = Empty,
        gen_ai.request.stream = Empty,
        sluice.error.layer = Empty,
        error.type = Empty,
    );
    if crate::telemetry::otel::enabled() {
        let _ = span.set_parent(RequestIds::parent_context(req.headers()));
    }
    let ids = RequestIds::for_span(&span, req.headers());
    span.record("sluice.request_id", ids.request_id.as_str());
    let (parts, body) = req.into_parts();
    let mut body = Some(body);
    let mut rec = gw.metrics.recorder(started);
    let result = serve(&gw, parts, &mut body, &ids, &span, &mut rec)
        .instrument(span.clone())
        .await;
    let resp = match result {
        Ok(resp) => {
            span.record("http.response.status_code", resp.status().as_u16());
            rec.answered(resp.status());
            resp
        }
        Err(err) => {
            span.record("http.response.status_code", err.status().as_u16());
            crate::telemetry::record_error(&span, &err);
            rec.failed(&err);
            if let Some(unread) = body {
                drain_small_body(unread).instrument(span.clone()).await;
            }
            let layer = err.layer().as_str();
            span.in_scope(|| {
                if err.status().is_server_error() {
                    tracing::warn!(%method, %path, status = err.status().as_u16(), layer, error = %err, trace_id = %ids.trace_id, "request failed");
                } else {
                    tracing::info!(%method, %path, status = err.status().as_u16(), layer, error = %err, trace_id = %ids.trace_id, "request refused");
                }
            });
            err.into_response(&ids.trace_id)
        }
    };
    tracing::debug!(%method, %path, status = resp.status().as_u16(), elapsed_us = started.elapsed().as_micros() as u64, trace_id = %ids.trace_id, "request answered");
    ids.decorate(resp)
}

/// Answering before the client finished sending makes some HTTP/2 clients
/// (curl) report a protocol error instead of our answer; read what a small
/// request still has in flight, briefly, so the error arrives intact.
async fn drain_small_body(body: Incoming) {
    use http_body::Body as _;
    if body.size_hint().lower() <= MAX_DRAIN_BYTES as u64 {
        let _ = tokio::time::timeout(
            Duration::from_millis(500),
            Limited::new(body, MAX_DRAIN_BYTES).collect(),
        )
        .await;
    }
}

const MAX_DRAIN_BYTES: usize = 64 << 10;

async fn serve(
    gw: &Gateway,
    parts: http::request::Parts,
    body: &mut Option<Incoming>,
    ids: &RequestIds,
    span: &tracing::Span,
    rec: &mut Recorder,
) -> Result<Response<ProxyBody>, GatewayError> {
    // 1. Shed load before doing any work for it.
    let inflight = gw
        .inflight
        .clone()
        .try_acquire_owned()
        .map_err(|_| GatewayError::Overloaded { retry_after: 1 })?;

    // 2. Route. Nothing of the request head is kept that points into hyper's
    // read buffer (see `body::detach_headers`): streams wait long.
    let endpoint = route(&parts.method, parts.uri.path())?;
    let headers = body::detach_headers(&parts.headers);
    drop(parts);

    // 3. Authenticate before reading a body nobody may have asked for.
    let auth = tracing::info_span!(
        target: crate::telemetry::TRACE_TARGET,
        "authenticate",
        sluice.tenant = Empty,
        sluice.api_key_id = Empty,
        sluice.error.layer = Empty,
        error.type = Empty,
        otel.status_code = Empty,
        otel.status_description = Empty,
    );
    let caller = match auth.in_scope(|| gw.keys.authenticate(&headers)) {
        Ok(c) => c,
        Err(e) => {
            crate::telemetry::record_error(&auth, &e);
            return Err(e);
        }
    };
    let tenant = &gw.tenants[caller.tenant];
    for s in [span, &auth] {
        s.record("sluice.tenant", tenant.cfg.id.as_str());
        s.record("sluice.api_key_id", caller.key_id.as_str());
    }
    drop(auth);
    rec.tenant(&tenant.cfg.id);
    let tenant_chain = tenant.chain.load_full();
    if endpoint == Endpoint::Models {
        return Ok(models_response(tenant));
    }

    // 4. Fair share: one tenant cannot take every slot of a shared pool.
    let tenant_permit = tenant
        .concurrency
        .clone()
        .try_acquire_owned()
        .map_err(|_| GatewayError::TenantConcurrency {
            limit: tenant.cfg.max_concurrent_requests,
            retry_after: 1,
        })?;

    // 5. Body: bounded in size and time, valid JSON, bounded nesting.
    let Some(incoming) = body.take() else {
        return Err(GatewayError::Internal("request body read twice".into()));
    };
    let bytes = read_body(&gw.limits, &headers, incoming).await?;
    check_json_depth(&bytes, gw.limits.max_json_depth)?;
    let head: RequestHead = serde_json::from_slice(&bytes).map_err(json_error)?;
    // serde also reads a struct from an array; the API takes objects only.
    if bytes.trim_ascii_start().first() != Some(&b'{') {
        return Err(GatewayError::InvalidRequest {
            message: "the request body must be a JSON object".into(),
            param: None,
        });
    }
    let mut stream = head.stream.unwrap_or(false);
    let mut model = head.model.into_owned();
    let mut max_tokens = head.max_tokens.or(head.max_completion_tokens);
    rec.model(&model);
    let mut pool = tenant.pool.clone();
    let mut headers = headers;
    let mut bytes = bytes;

    // 6. The tenant's plugins: continue, modify or reject.
    let mut routed_by: Option<String> = None;
    let mut exchange = None;
    let mut patched_body = None;
    if !tenant_chain.is_empty() {
        let mut doc: Value = serde_json::from_slice(&bytes).map_err(json_error)?;
        let mut ctx = CallCtx::new(caller.key_id.clone(), ids.trace_id.clone());
        let mut fwd_headers = headers.clone();
        let input = ViewInput {
            tenant: &tenant.cfg.id,
            key_id: &caller.key_id,
            endpoint: endpoint.name(),
            pool: &pool.name,
            dialect: pool.dialect.as_str(),
            headers: &headers,
        };
        let outcome =
            phases::on_request(&tenant_chain, &mut ctx, &mut doc, &mut fwd_headers, &input);
        let mut settlement = Settlement::default();
        settlement.collect(&mut ctx);
        if outcome.is_err()
            && let Some(m) = doc.get("model").and_then(Value::as_str)
        {
            // A later plugin refused what an earlier one rewrote (an alias
            // resolved): count and trace it under the model it became.
            rec.model(m);
            span.record("gen_ai.request.model", m);
        }
        let outcome = outcome?;
        headers = fwd_headers;
        if let Some((name, plugin)) = &outcome.pool {
            pool = tenant
                .pool_for(name, plugin, &gw.pools)
                .inspect_err(|e| gw.metrics.plugin_error(&tenant.cfg.id, e))?;
            routed_by = Some(format!("plugin {plugin}"));
        }
        let mut modified = outcome.modified;
        // Token limits settle against usage: make sure streams report it.
        let mut strip_usage = false;
        if stream
            && !settlement.is_empty()
            && doc.pointer("/stream_options/include_usage") != Some(&Value::Bool(true))
            && let Some(obj) = doc.as_object_mut()
        {
            // Keep the client's other stream options.
            let options = obj.entry("stream_options").or_insert_with(|| json!({}));
            if !options.is_object() {
                *options = json!({});
            }
            options["include_usage"] = Value::Bool(true);
            strip_usage = true;
            modified = true;
        }
        if modified {
            model = doc
                .get("model")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_owned();
            stream = doc.get("stream").and_then(Value::as_bool).unwrap_or(false);
            max_tokens = ["max_tokens", "max_completion_tokens"]
                .iter()
                .find_map(|k| doc.get(*k).and_then(Value::as_u64));
            bytes = Bytes::from(
                serde_json::to_vec(&doc).map_err(|e| GatewayError::Internal(e.to_string()))?,
            );
        }
        exchange = Some(Exchange {
            chain: tenant_chain.clone(),
            ctx,
            settlement,
            view: outcome.view,
            strip_usage,
        });
        patched_body = Some(doc);
    }

    // 7. The model must be one the chosen pool serves.
    rec.model(&model);
    if !pool.serves(&model) {
        return Err(GatewayError::UnknownModel { model });
    }

    span.record("gen_ai.request.model", model.as_str());
    span.record("gen_ai.request.stream", stream);
    let routed_by = routed_by.unwrap_or_else(|| "the tenant's pool".into());
    tracing::info_span!(
        target: crate::telemetry::TRACE_TARGET,
        "route",
        sluice.pool = %pool.name,
        sluice.route.reason = %routed_by,
        sluice.pool.replicas = pool.replica_count(),
    )
    .in_scope(|| {
        tracing::debug!(tenant = %tenant.cfg.id, key = %caller.key_id, %model, stream, pool = %pool.name, "routing");
    });
    let call = upstream::EngineCall {
        operation: endpoint.operation(),
        model: model.clone(),
        max_tokens,
        stream,
    };
    let path = endpoint.path();
    let guards = Guards {
        _inflight: inflight,
        _tenant: tenant_permit,
        _caller: caller,
        span: span.clone(),
    };

    // Answers that plugins judge or that settle token limits pass through hooks.
    let mut hook = None;
    if let Some(ex) = exchange.filter(|ex| ex.inspects(stream)) {
        if !stream {
            let doc = patched_body.unwrap_or_default();
            let retries = gw.max_response_retries;
            let resp = exchange::buffered(&pool, path, &headers, doc, ex, retries, ids, &call, rec)
                .await?;
            drop(guards);
            return Ok(resp);
        }
        hook = Some(Box::new(StreamHook::new(ex)) as Box<dyn EventHook>);
    }
    // Only the buffered path needs the parsed body; a stream waits without it.
    drop(patched_body);

    // 8. Upstream, with retries only while nothing has reached the client.
    let up = pool.send(path, &headers, bytes, &call, ids).await?;

    // 9. Relay.
    Ok(relay_response(
        up,
        stream,
        &pool,
        ids,
        guards,
        hook,
        rec.take(),
    ))
}

/// Held by the relayed body so that limits count a request until its last byte.
struct Guards {
    _inflight: OwnedSemaphorePermit,
    _tenant: OwnedSemaphorePermit,
    _caller: Caller,
    /// The server span ends when the last byte is sent.
    span: tracing::Span,
}

/// The server span's name: the route, never the raw path a client chose
/// (probes of random paths must not mint span names).
fn span_route(path: &str) -> &'static str {
    match path.trim_end_matches('/') {
        "/v1/chat/completions" => "/v1/chat/completions",
        "/v1/completions" => "/v1/completions",
        "/v1/models" => "/v1/models",
        _ => "(unknown route)",
    }
}

fn route(method: &Method, path: &str) -> Result<Endpoint, GatewayError> {
    let endpoint = match path.trim_end_matches('/') {
        "/v1/chat/completions" => Endpoint::ChatCompletions,
        "/v1/completions" => Endpoint::Completions,
        "/v1/models" => Endpoint::Models,
        _ => {
            return Err(GatewayError::NotFound {
                method: method.to_string(),
                path: path.to_owned(),
            });
        }
    };
    let allowed = match endpoint {
        Endpoint::Models => Method::GET,
        _ => Method::POST,
    };
    if method != allowed {
        return Err(GatewayError::MethodNotAllowed {
            method: method.to_string(),
            path: path.to_owned(),
        });
    }
    Ok(endpoint)
}

fn models_response(tenant: &Tenant) -> Response<ProxyBody> {
    let data: Vec<_> = tenant
        .pool
        .models
        .iter()
        .map(|m| json!({"id": m, "object": "model", "created": 0, "owned_by": "sluice"}))
        .collect();
    let mut resp = Response::new(body::json(&json!({"object": "list", "data": data})));
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp
}

async fn read_body(
    limits: &Limits,
    headers: &http::HeaderMap,
    body: Incoming,
) -> Result<Bytes, GatewayError> {
    let (limit, timeout) = (limits.max_body_bytes, limits.body_read_timeout);
    body::read_limited(body, headers, limit, timeout)
        .await
        .map_err(|e| match e {
            body::ReadError::TooLarge => GatewayError::BodyTooLarge { limit },
            body::ReadError::Timeout => GatewayError::BodyTimeout(timeout),
            body::ReadError::Failed(e) => GatewayError::BodyRead(e),
        })
}

fn json_error(e: serde_json::Error) -> GatewayError {
    use serde_json::error::Category;
    match e.classify() {
        Category::Syntax | Category::Eof | Category::Io => {
            let reason = e.to_string();
            // serde_json appends " at line L column C"; we state it ourselves.
            let reason = reason
                .rsplit_once(" at line ")
                .map(|(r, _)| r.to_owned())
                .unwrap_or(reason);
            GatewayError::MalformedJson {
                line: e.line(),
                column: e.column(),
                reason,
            }
        }
        Category::Data => {
            let msg = e.to_string();
            let param = if msg.contains("`model`") || msg.contains("model") {
                Some("model")
            } else if msg.contains("stream") {
                Some("stream")
            } else {
                None
            };
            GatewayError::InvalidRequest {
                message: msg,
                param,
            }
        }
    }
}

/// Reject bodies nested deeper than `max` before a recursive parser sees them.
/// A linear scan that skips string contents.
fn check_json_depth(bytes: &[u8], max: usize) -> Result<(), GatewayError> {
    let mut depth = 0usize;
    let mut in_string = false;
    let mut escaped = false;
    for &b in bytes {
        if in_string {
            if escaped {
                escaped = false;
            } else if b == b'\\' {
                escaped = true;
            } else if b == b'"' {
                in_string = false;
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'{' | b'[' => {
                depth += 1;
                if depth > max {
                    return Err(GatewayError::JsonTooDeep { limit: max });
                }
            }
            b'}' | b']' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    Ok(())
}

fn relay_response(
    up: upstream::Upstream,
    stream: bool,
    pool: &Pool,
    ids: &RequestIds,
    guards: Guards,
    hook: Option<Box<dyn EventHook>>,
    mut rec: Recorder,
) -> Response<ProxyBody> {
    let sse = stream
        || up
            .parts
            .headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("text/event-stream"));
    let deadline = up.deadline;
    rec.relaying(up.parts.status, sse);
    let mut parts = up.parts;
    for name in upstream::HOP_BY_HOP {
        parts.headers.remove(*name);
    }
    if sse {
        // An error event may be appended; the length is not known in advance.
        parts.headers.remove(header::CONTENT_LENGTH);
        parts
            .headers
            .insert("x-accel-buffering", HeaderValue::from_static("no"));
    }
    let normalize_reasoning = matches!(pool.dialect, Dialect::Vllm | Dialect::Sglang);
    if normalize_reasoning {
        // A renamed key changes the length.
        parts.headers.remove(header::CONTENT_LENGTH);
    }
    let opts = RelayOptions {
        idle: pool.idle_timeout(),
        deadline,
        sse,
        pool: pool.name.clone(),
        trace_id: ids.trace_id.clone(),
        normalize_reasoning,
        spans: [guards.span.clone(), up.span.clone()],
        metrics: rec,
    };
    let mut relay = Relay::new(up.first, up.body, opts, (up.lease, guards));
    if let Some(hook) = hook.filter(|_| sse) {
        relay = relay.with_hook(hook);
    }
    Response::from_parts(parts, http_body_util::BodyExt::boxed_unsync(relay))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn depth_scan_skips_strings() {
        assert!(check_json_depth(br#"{"a":"[[[[[[[[[["}"#, 2).is_ok());
        assert!(check_json_depth(br#"{"a":[[1]]}"#, 2).is_err());
        assert!(check_json_depth(br#"{"a":"\"[[[["}"#, 1).is_ok());
    }

    #[test]
    fn malformed_json_names_position() {
        let e = serde_json::from_slice::<RequestHead>(b"{\"model\": \"x\",\n  \"stream\": tru}")
            .map_err(json_error)
            .err()
            .unwrap();
        match e {
            GatewayError::MalformedJson { line, column, .. } => {
                assert_eq!(line, 2);
                assert!(column > 10);
            }
            other => panic!("{other:?}"),
        }
    }
}
