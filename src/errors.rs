//! Every failure sluice answers with, mapped to HTTP in this one place.
//!
//! A [`GatewayError`] knows its failure [`Layer`], its HTTP status and its
//! OpenAI error `type`/`code`. [`GatewayError::into_response`] renders the
//! OpenAI-shaped body plus `layer` and `trace_id`; [`GatewayError::sse_event`]
//! renders the same object as a final SSE event for failures after a stream
//! has started.

use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode, header};
use serde_json::json;

use crate::body::{self, ProxyBody};

/// Which party a failure is attributed to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layer {
    /// Bad input, bad key, over a limit, rejected by the tenant's own policy.
    Customer,
    /// The tenant's plugin trapped, ran out of time or memory.
    Plugin,
    /// Sluice itself: config, internal error, overload shedding.
    Gateway,
    /// The engine pool: unreachable, 5xx, timeout, broken stream.
    Provider,
}

/// Cut `s` to at most `max` bytes on a character boundary; true if it was cut.
/// Bounds text that a plugin or an engine hands us before it is relayed or logged.
pub fn truncate_utf8(s: &mut String, max: usize) -> bool {
    if s.len() <= max {
        return false;
    }
    let mut cut = max;
    while !s.is_char_boundary(cut) {
        cut -= 1;
    }
    s.truncate(cut);
    true
}

impl Layer {
    pub fn as_str(self) -> &'static str {
        match self {
            Layer::Customer => "customer",
            Layer::Plugin => "plugin",
            Layer::Gateway => "gateway",
            Layer::Provider => "provider",
        }
    }
}

/// Where in the engine exchange a timeout hit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TimeoutPhase {
    FirstToken,
    BetweenChunks,
    WholeRequest,
}

impl TimeoutPhase {
    fn describe(self) -> &'static str {
        match self {
            TimeoutPhase::FirstToken => "no first token",
            TimeoutPhase::BetweenChunks => "no chunk",
            TimeoutPhase::WholeRequest => "no complete answer",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    // --- customer ---
    #[error("missing API key: send it as `Authorization: Bearer <key>`")]
    MissingApiKey,
    #[error("invalid API key")]
    InvalidApiKey,
    #[error("invalid JSON in request body at line {line} column {column}: {reason}")]
    MalformedJson {
        line: usize,
        column: usize,
        reason: String,
    },
    #[error("request body nests JSON deeper than {limit} levels")]
    JsonTooDeep { limit: usize },
    #[error("invalid request: {message}")]
    InvalidRequest {
        message: String,
        param: Option<&'static str>,
    },
    #[error("request body is larger than the limit of {limit} bytes")]
    BodyTooLarge { limit: usize },
    #[error("request body not received within {0:?}")]
    BodyTimeout(Duration),
    #[error("request body could not be read: {0}")]
    BodyRead(String),
    #[error("unsupported content type {0:?}: send application/json")]
    UnsupportedMediaType(String),
    #[error("the model `{model}` does not exist or you do not have access to it")]
    UnknownModel { model: String },
    #[error("no route for {method} {path}")]
    NotFound { method: String, path: String },
    #[error("method {method} not allowed on {path}")]
    MethodNotAllowed { method: String, path: String },
    #[error(
        "too many concurrent requests for this tenant (limit {limit}); retry after {retry_after}s"
    )]
    TenantConcurrency { limit: usize, retry_after: u64 },
    #[error("the engine rejected the request: {message}")]
    EngineRejected {
        status: StatusCode,
        message: String,
        param: Option<String>,
    },

    #[error("{message}")]
    PluginRejected {
        plugin: String,
        status: StatusCode,
        code: String,
        message: String,
        retry_after: Option<u32>,
    },

    // --- plugin ---
    #[error("plugin `{plugin}` {fault}")]
    PluginFailed {
        plugin: String,
        fault: crate::plugins::chain::Fault,
    },

    // --- gateway ---
    #[error("sluice is overloaded; retry after {retry_after}s")]
    Overloaded { retry_after: u64 },
    #[error("too many connections; retry after {retry_after}s")]
    TooManyConnections { retry_after: u64 },
    #[error("sluice is shutting down")]
    ShuttingDown,
    #[error("internal gateway error: {0}")]
    Internal(String),

    // --- provider ---
    #[error("engine pool `{pool}` unreachable after {attempts} attempt(s): {reason}")]
    EngineUnreachable {
        pool: String,
        attempts: u32,
        reason: String,
    },
    #[error("engine pool `{pool}` timed out: {} within {after:?}", .phase.describe())]
    EngineTimeout {
        pool: String,
        phase: TimeoutPhase,
        after: Duration,
    },
    #[error("engine pool `{pool}` answered {status}: {message}")]
    EngineFailed {
        pool: String,
        status: StatusCode,
        message: String,
    },
    #[error("engine pool `{pool}` is saturated; retry after 1s")]
    EngineBusy { pool: String },
    #[error("engine pool `{pool}` broke the stream: {reason}")]
    EngineStreamBroken { pool: String, reason: String },
}

impl GatewayError {
    pub fn layer(&self) -> Layer {
        use GatewayError::*;
        match self {
            MissingApiKey
            | InvalidApiKey
            | MalformedJson { .. }
            | JsonTooDeep { .. }
            | InvalidRequest { .. }
            | BodyTooLarge { .. }
            | BodyTimeout(_)
            | BodyRead(_)
            | UnsupportedMediaType(_)
            | UnknownModel { .. }
            | NotFound { .. }
            | MethodNotAllowed { .. }
            | TenantConcurrency { .. }
            | PluginRejected { .. }
            | EngineRejected { .. } => Layer::Customer,
            PluginFailed { .. } => Layer::Plugin,
            Overloaded { .. } | TooManyConnections { .. } | ShuttingDown | Internal(_) => {
                Layer::Gateway
            }
            EngineUnreachable { .. }
            | EngineTimeout { .. }
            | EngineFailed { .. }
            | EngineBusy { .. }
            | EngineStreamBroken { .. } => Layer::Provider,
        }
    }

    pub fn status(&self) -> StatusCode {
        use GatewayError::*;
        match self {
            MissingApiKey | InvalidApiKey => StatusCode::UNAUTHORIZED,
            MalformedJson { .. } | JsonTooDeep { .. } | InvalidRequest { .. } | BodyRead(_) => {
                StatusCode::BAD_REQUEST
            }
            BodyTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            BodyTimeout(_) => StatusCode::REQUEST_TIMEOUT,
            UnsupportedMediaType(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            UnknownModel { .. } | NotFound { .. } => StatusCode::NOT_FOUND,
            MethodNotAllowed { .. } => StatusCode::METHOD_NOT_ALLOWED,
            TenantConcurrency { .. } => StatusCode::TOO_MANY_REQUESTS,
            EngineRejected { status, .. } | PluginRejected { status, .. } => *status,
            PluginFailed { fault, .. } => match fault {
                crate::plugins::chain::Fault::CircuitOpen(_) => StatusCode::SERVICE_UNAVAILABLE,
                _ => StatusCode::INTERNAL_SERVER_ERROR,
            },
            Overloaded { .. } | TooManyConnections { .. } | ShuttingDown | EngineBusy { .. } => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
            EngineUnreachable { .. } | EngineFailed { .. } | EngineStreamBroken { .. } => {
                StatusCode::BAD_GATEWAY
            }
            EngineTimeout { .. } => StatusCode::GATEWAY_TIMEOUT,
        }
    }

    /// OpenAI's error `type` for this failure.
    fn kind(&self) -> &'static str {
        match self.status().as_u16() {
            400 | 405 | 408 | 413 | 415 => "invalid_request_error",
            401 => "authentication_error",
            403 => "permission_error",
            404 => "not_found_error",
            429 => "rate_limit_error",
            503 => "service_unavailable_error",
            400..=499 => "invalid_request_error",
            _ => "api_error",
        }
    }

    /// A stable machine-readable code.
    pub fn code(&self) -> &str {
        use GatewayError::*;
        match self {
            PluginRejected { code, .. } => code,
            PluginFailed { fault, .. } => fault.code(),
            MissingApiKey => "missing_api_key",
            InvalidApiKey => "invalid_api_key",
            MalformedJson { .. } => "invalid_json",
            JsonTooDeep { .. } => "json_too_deep",
            InvalidRequest { .. } => "invalid_request",
            BodyTooLarge { .. } => "body_too_large",
            BodyTimeout(_) => "body_timeout",
            BodyRead(_) => "body_read_error",
            UnsupportedMediaType(_) => "unsupported_media_type",
            UnknownModel { .. } => "model_not_found",
            NotFound { .. } => "not_found",
            MethodNotAllowed { .. } => "method_not_allowed",
            TenantConcurrency { .. } => "concurrency_limit_exceeded",
            EngineRejected { .. } => "engine_rejected_request",
            Overloaded { .. } => "overloaded",
            TooManyConnections { .. } => "too_many_connections",
            ShuttingDown => "shutting_down",
            Internal(_) => "internal_error",
            EngineUnreachable { .. } => "engine_unreachable",
            EngineTimeout { .. } => "engine_timeout",
            EngineFailed { .. } => "engine_error",
            EngineStreamBroken { .. } => "engine_stream_broken",
            EngineBusy { .. } => "engine_busy",
        }
    }

    fn param(&self) -> Option<&str> {
        match self {
            GatewayError::InvalidRequest { param, .. } => *param,
            GatewayError::UnknownModel { .. } => Some("model"),
            GatewayError::EngineRejected { param, .. } => param.as_deref(),
            _ => None,
        }
    }

    fn retry_after(&self) -> Option<u64> {
        match self {
            GatewayError::PluginRejected { retry_after, .. } => retry_after.map(u64::from),
            GatewayError::PluginFailed {
                fault: crate::plugins::chain::Fault::CircuitOpen(d),
                ..
            } => Some(d.as_secs().max(1)),
            GatewayError::TenantConcurrency { retry_after, .. }
            | GatewayError::Overloaded { retry_after }
            | GatewayError::TooManyConnections { retry_after } => Some(*retry_after),
            GatewayError::ShuttingDown | GatewayError::EngineBusy { .. } => Some(1),
            _ => None,
        }
    }

    /// The OpenAI-shaped error object plus `layer` and `trace_id`.
    pub fn body_json(&self, trace_id: &str) -> serde_json::Value {
        json!({
            "error": {
                "message": self.to_string(),
                "type": self.kind(),
                "code": self.code(),
                "param": self.param(),
                "layer": self.layer().as_str(),
                "trace_id": trace_id,
            }
        })
    }

    /// The complete HTTP response for this error.
    pub fn into_response(&self, trace_id: &str) -> Response<ProxyBody> {
        let body = serde_json::to_vec(&self.body_json(trace_id)).unwrap_or_default();
        let mut resp = Response::new(body::full(Bytes::from(body)));
        *resp.status_mut() = self.status();
        let h = resp.headers_mut();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        if let Some(secs) = self.retry_after() {
            h.insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        if matches!(self, GatewayError::TooManyConnections { .. }) {
            h.insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        resp
    }

    /// The error as a last SSE event, for failures after a stream began: the
    /// status line is gone, so the event is how the client learns what
    /// happened (the OpenAI SDKs raise on an `error` object in a chunk).
    pub fn sse_event(&self, trace_id: &str) -> Bytes {
        let mut out = b"data: ".to_vec();
        out.extend_from_slice(
            serde_json::to_string(&self.body_json(trace_id))
                .unwrap_or_default()
                .as_bytes(),
        );
        out.extend_from_slice(b"\n\n");
        Bytes::from(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn body_has_openai_shape_layer_and_trace() {
        let e = GatewayError::UnknownModel { model: "x".into() };
        let v = e.body_json("abc");
        assert_eq!(v["error"]["type"], "not_found_error");
        assert_eq!(v["error"]["code"], "model_not_found");
        assert_eq!(v["error"]["param"], "model");
        assert_eq!(v["error"]["layer"], "customer");
        assert_eq!(v["error"]["trace_id"], "abc");
        assert_eq!(e.status(), StatusCode::NOT_FOUND);
    }

    #[test]
    fn overload_carries_retry_after() {
        let r = GatewayError::Overloaded { retry_after: 2 }.into_response("t");
        assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(r.headers()[header::RETRY_AFTER], "2");
    }
}

/// Failures of the admin API. The same body shape as the serving API, with
/// layer `customer` for what the caller can fix and `gateway` for the rest.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("missing admin key: send `Authorization: Bearer <admin key>`")]
    MissingKey,
    #[error("invalid admin key")]
    InvalidKey,
    /// Also what a tenant admin sees for any tenant but its own, so that it
    /// cannot learn which tenants exist.
    #[error("no tenant {0:?}")]
    NoTenant(String),
    #[error("no admin route {method} {path}")]
    NotFound { method: String, path: String },
    #[error("{method} is not allowed on {path}")]
    MethodNotAllowed { method: String, path: String },
    #[error(
        "plugin name {0:?}: use 1-64 chars of a-z, 0-9, '-', '_' or '.', starting with a letter or digit"
    )]
    BadName(String),
    #[error("the component is larger than the {limit}-byte limit")]
    TooLarge { limit: usize },
    #[error("invalid JSON body: {0}")]
    BadJson(String),
    #[error("cannot read the request body: {0}")]
    BodyRead(String),
    #[error(transparent)]
    Registry(#[from] crate::registry::RegistryError),
}

impl AdminError {
    pub fn status(&self) -> StatusCode {
        use crate::plugins::LoadError;
        use crate::registry::RegistryError as R;
        match self {
            AdminError::MissingKey | AdminError::InvalidKey => StatusCode::UNAUTHORIZED,
            AdminError::NoTenant(_) | AdminError::NotFound { .. } => StatusCode::NOT_FOUND,
            AdminError::MethodNotAllowed { .. } => StatusCode::METHOD_NOT_ALLOWED,
            AdminError::BadName(_) | AdminError::BadJson(_) | AdminError::BodyRead(_) => {
                StatusCode::BAD_REQUEST
            }
            AdminError::TooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            AdminError::Registry(e) => match e {
                R::NoPlugin(_) | R::NoVersion { .. } => StatusCode::NOT_FOUND,
                R::NoEarlierVersion(_) | R::InChain(_) | R::Contended(_) | R::Stale { .. } => {
                    StatusCode::CONFLICT
                }
                R::Refused(LoadError::NotAComponent(_)) => StatusCode::BAD_REQUEST,
                R::Refused(_) | R::ChainRefused { .. } | R::CheckTimeout(_) => {
                    StatusCode::UNPROCESSABLE_ENTITY
                }
                R::BadChain(_) => StatusCode::BAD_REQUEST,
                R::Busy | R::Store(crate::registry::store::StoreError::Unavailable(_)) => {
                    StatusCode::SERVICE_UNAVAILABLE
                }
                R::Internal(_) | R::Store(_) => StatusCode::INTERNAL_SERVER_ERROR,
            },
        }
    }

    pub fn code(&self) -> &'static str {
        use crate::plugins::LoadError;
        use crate::registry::RegistryError as R;
        match self {
            AdminError::MissingKey => "missing_admin_key",
            AdminError::InvalidKey => "invalid_admin_key",
            AdminError::NoTenant(_) => "tenant_not_found",
            AdminError::NotFound { .. } => "not_found",
            AdminError::MethodNotAllowed { .. } => "method_not_allowed",
            AdminError::BadName(_) => "invalid_plugin_name",
            AdminError::TooLarge { .. } => "plugin_too_large",
            AdminError::BadJson(_) => "invalid_json",
            AdminError::BodyRead(_) => "body_read_error",
            AdminError::Registry(e) => match e {
                R::NoPlugin(_) => "plugin_not_found",
                R::NoVersion { .. } => "version_not_found",
                R::NoEarlierVersion(_) => "no_earlier_version",
                R::InChain(_) => "plugin_in_chain",
                R::Contended(_) => "conflict",
                R::Stale { .. } => "revision_mismatch",
                R::Busy => "registry_busy",
                R::Internal(_) => "internal_error",
                R::Refused(LoadError::NotAComponent(_)) => "not_a_component",
                R::Refused(LoadError::Incompatible(_)) => "incompatible_component",
                R::Refused(LoadError::Config(_)) | R::ChainRefused { .. } => {
                    "plugin_config_refused"
                }
                R::Refused(LoadError::Describe(_)) => "plugin_describe_failed",
                R::CheckTimeout(_) => "check_timeout",
                R::BadChain(_) => "invalid_chain",
                R::Store(crate::registry::store::StoreError::Unavailable(_)) => {
                    "registry_unavailable"
                }
                R::Store(_) => "registry_corrupt",
            },
        }
    }

    pub fn layer(&self) -> Layer {
        if self.status().is_server_error() {
            Layer::Gateway
        } else {
            Layer::Customer
        }
    }

    pub fn into_response(&self, trace_id: &str) -> Response<ProxyBody> {
        let kind = match self.status().as_u16() {
            401 => "authentication_error",
            404 => "not_found_error",
            409 => "conflict_error",
            500..=599 => "api_error",
            _ => "invalid_request_error",
        };
        let body = json!({
            "error": {
                "message": self.to_string(),
                "type": kind,
                "code": self.code(),
                "layer": self.layer().as_str(),
                "trace_id": trace_id,
            }
        });
        let mut resp = Response::new(body::json(&body));
        *resp.status_mut() = self.status();
        let h = resp.headers_mut();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        if self.status() == StatusCode::SERVICE_UNAVAILABLE {
            h.insert(header::RETRY_AFTER, HeaderValue::from(1u64));
        }
        resp
    }
}
