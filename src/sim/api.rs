//! Routing, request parsing and the OpenAI/vLLM wire format.
//!
//! Requests are parsed from `serde_json::Value` by hand rather than through
//! derived structs: unknown fields must be ignored, and every wrong type has
//! to become a 400 naming the offending parameter, never a panic.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt as _;
use http::header::{ALLOW, CACHE_CONTROL, CONTENT_TYPE, RETRY_AFTER};
use http::{HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full, LengthLimitError, Limited, StreamBody};
use hyper::body::{Frame, Incoming};
use serde::Serialize;
use serde_json::{Map, Value, json};
use tokio::sync::mpsc;
use tokio::time::Instant;

use super::generate::{
    self, Answer, Effort, Finish, Piece, PieceKind, Plan, PlanSpec, Token, hash_tokens, special,
    tokenize_into,
};
use super::metrics::{self, FinishedReason};
use super::scheduler::{AdmitError, Outcome, Slot, Ticket};
use super::trace;
use super::{Engine, MAX_DELAY_MS};

pub(crate) type Body = UnsyncBoxBody<Bytes, BodyError>;

const MAX_BODY_BYTES: usize = 32 << 20;
/// Chunks buffered between generator and connection: small, so tokens leave
/// as they are generated and a vanished client is noticed at once.
const STREAM_BUFFER: usize = 2;
/// Token chunks sent before an injected `drop` fault cuts the connection.
const DROP_AFTER_TOKENS: usize = 3;
/// Without pacing, long non-stream answers yield now and then so one request
/// cannot monopolise a worker thread.
const YIELD_EVERY: usize = 256;
const DONE: &[u8] = b"data: [DONE]\n\n";
/// Pause before an injected `drop` so the bytes already sent are flushed and
/// the client sees a truncated body rather than an empty reply.
const DROP_FLUSH: Duration = Duration::from_millis(20);

/// Errors carried by a response body; hyper aborts the connection (HTTP/1)
/// or resets the stream (HTTP/2) when it meets one.
#[derive(Debug, thiserror::Error)]
pub(crate) enum BodyError {
    #[error("injected fault: connection dropped mid-response")]
    Dropped,
    #[error("the engine is shutting down")]
    ShuttingDown,
    #[error("encoding a stream chunk: {0}")]
    Encode(#[from] serde_json::Error),
}

/// An error answer in vLLM's shape.
#[derive(Debug, thiserror::Error)]
#[error("{status}: {message}")]
pub(crate) struct ApiError {
    status: StatusCode,
    message: String,
    param: Option<String>,
    allow: Option<&'static str>,
    retry_after: bool,
}

impl ApiError {
    fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
            param: None,
            allow: None,
            retry_after: false,
        }
    }

    fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, message)
    }

    /// A 400 about one request parameter (dotted path).
    fn invalid(param: &str, problem: &str) -> Self {
        Self {
            param: Some(param.to_owned()),
            ..Self::bad_request(format!("`{param}` {problem}"))
        }
    }

    fn overloaded(message: impl Into<String>) -> Self {
        Self {
            retry_after: true,
            ..Self::new(StatusCode::SERVICE_UNAVAILABLE, message)
        }
    }

    fn kind(&self) -> &'static str {
        match self.status {
            StatusCode::BAD_REQUEST => "BadRequestError",
            StatusCode::NOT_FOUND => "NotFoundError",
            StatusCode::METHOD_NOT_ALLOWED => "MethodNotAllowedError",
            StatusCode::PAYLOAD_TOO_LARGE => "RequestEntityTooLargeError",
            StatusCode::SERVICE_UNAVAILABLE => "ServiceUnavailableError",
            _ => "InternalServerError",
        }
    }

    fn into_response(self) -> Response<Body> {
        let body = json!({
            "error": {
                "message": self.message,
                "type": self.kind(),
                "param": self.param,
                "code": self.status.as_u16(),
            }
        });
        let mut resp = json_response(self.status, &body);
        if let Some(allow) = self.allow {
            resp.headers_mut()
                .insert(ALLOW, HeaderValue::from_static(allow));
        }
        if self.retry_after {
            resp.headers_mut()
                .insert(RETRY_AFTER, HeaderValue::from_static("1"));
        }
        resp
    }
}

impl From<AdmitError> for ApiError {
    fn from(e: AdmitError) -> Self {
        ApiError::overloaded(e.to_string())
    }
}

fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into())
        .map_err(|never: Infallible| match never {})
        .boxed_unsync()
}

fn json_response(status: StatusCode, value: &Value) -> Response<Body> {
    let mut resp = Response::new(full(value.to_string()));
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    resp
}

pub(crate) async fn handle(
    engine: Arc<Engine>,
    req: Request<Incoming>,
) -> Result<Response<Body>, Infallible> {
    Ok(route(engine, req)
        .await
        .unwrap_or_else(ApiError::into_response))
}

async fn route(engine: Arc<Engine>, req: Request<Incoming>) -> Result<Response<Body>, ApiError> {
    let path = req.uri().path();
    let (allowed, allow) = match path {
        "/v1/chat/completions" | "/v1/completions" => (Method::POST, "POST"),
        "/v1/models" | "/health" | "/metrics" => (Method::GET, "GET"),
        _ => return Err(ApiError::new(StatusCode::NOT_FOUND, "Not Found")),
    };
    if req.method() != allowed {
        return Err(ApiError {
            allow: Some(allow),
            ..ApiError::new(StatusCode::METHOD_NOT_ALLOWED, "Method Not Allowed")
        });
    }
    match path {
        "/v1/chat/completions" => completion(engine, req, Endpoint::Chat).await,
        "/v1/completions" => completion(engine, req, Endpoint::Text).await,
        "/v1/models" => Ok(models(&engine)),
        "/health" => Ok(Response::new(full(Bytes::new()))),
        _ => {
            let text = engine.metrics.encode().map_err(|e| {
                ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, format!("metrics: {e}"))
            })?;
            let mut resp = Response::new(full(text));
            resp.headers_mut().insert(
                CONTENT_TYPE,
                HeaderValue::from_static(metrics::CONTENT_TYPE),
            );
            Ok(resp)
        }
    }
}

fn models(engine: &Engine) -> Response<Body> {
    let model = &engine.opts.model;
    json_response(
        StatusCode::OK,
        &json!({
            "object": "list",
            "data": [{
                "id": model,
                "object": "model",
                "created": engine.created,
                "owned_by": "vllm",
                "root": model,
                "parent": null,
                "max_model_len": engine.opts.max_model_len,
            }],
        }),
    )
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Endpoint {
    Chat,
    Text,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Fault {
    Error,
    Stall,
    Drop,
    InvalidJson,
}

/// The per-request `"sim"` extension object.
#[derive(Default)]
struct SimExt {
    /// `Some(None)` is an explicit `"none"`, which also overrides the rates.
    fault: Option<Option<Fault>>,
    output_tokens: Option<u64>,
    ttft: Option<Duration>,
    tpot: Option<Duration>,
}

enum JobAnswer {
    Text,
    JsonObject,
    JsonSchema(Value),
    Tool { name: String, parameters: Value },
}

/// A validated generation request.
struct Job {
    prompt: Vec<Token>,
    stream: bool,
    include_usage: bool,
    max_tokens: Option<u64>,
    thinking: Option<Effort>,
    answer: JobAnswer,
    sim: SimExt,
}

// --- field access -----------------------------------------------------------

/// Value of the last segment of `path` in `obj`; JSON `null` counts as absent.
fn field<'a>(obj: &'a Map<String, Value>, path: &str) -> Option<&'a Value> {
    let key = path.rsplit('.').next().unwrap_or(path);
    obj.get(key).filter(|v| !v.is_null())
}

fn opt_bool(obj: &Map<String, Value>, path: &str) -> Result<Option<bool>, ApiError> {
    match field(obj, path) {
        None => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(*b)),
        Some(_) => Err(ApiError::invalid(path, "must be a boolean")),
    }
}

fn opt_u64(obj: &Map<String, Value>, path: &str) -> Result<Option<u64>, ApiError> {
    match field(obj, path) {
        None => Ok(None),
        Some(v) => v
            .as_u64()
            .map(Some)
            .ok_or_else(|| ApiError::invalid(path, "must be a non-negative integer")),
    }
}

fn opt_str<'a>(obj: &'a Map<String, Value>, path: &str) -> Result<Option<&'a str>, ApiError> {
    match field(obj, path) {
        None => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(_) => Err(ApiError::invalid(path, "must be a string")),
    }
}

fn opt_obj<'a>(
    obj: &'a Map<String, Value>,
    path: &str,
) -> Result<Option<&'a Map<String, Value>>, ApiError> {
    match field(obj, path) {
        None => Ok(None),
        Some(Value::Object(o)) => Ok(Some(o)),
        Some(_) => Err(ApiError::invalid(path, "must be an object")),
    }
}

// --- request parsing --------------------------------------------------------

async fn read_json(req: Request<Incoming>) -> Result<Map<String, Value>, ApiError> {
    let bytes = Limited::new(req.into_body(), MAX_BODY_BYTES)
        .collect()
        .await
        .map_err(|e| {
            if e.is::<LengthLimitError>() {
                ApiError::new(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    format!("request body exceeds {MAX_BODY_BYTES} bytes"),
                )
            } else {
                ApiError::bad_request(format!("failed to read the request body: {e}"))
            }
        })?
        .to_bytes();
    match serde_json::from_slice(&bytes) {
        Ok(Value::Object(map)) => Ok(map),
        Ok(_) => Err(ApiError::bad_request(
            "the request body must be a JSON object",
        )),
        Err(e) => Err(ApiError::bad_request(format!("Invalid JSON body: {e}"))),
    }
}

fn parse(engine: &Engine, body: &Map<String, Value>, endpoint: Endpoint) -> Result<Job, ApiError> {
    if let Some(model) = opt_str(body, "model")?
        && model != engine.opts.model
    {
        return Err(ApiError {
            param: Some("model".to_owned()),
            ..ApiError::new(
                StatusCode::NOT_FOUND,
                format!("The model `{model}` does not exist."),
            )
        });
    }
    let stream = opt_bool(body, "stream")?.unwrap_or(false);
    let include_usage = match opt_obj(body, "stream_options")? {
        None => false,
        Some(_) if !stream => {
            return Err(ApiError::bad_request(
                "Stream options can only be defined when `stream=True`.",
            ));
        }
        Some(o) => opt_bool(o, "stream_options.include_usage")?.unwrap_or(false),
    };
    match opt_u64(body, "n")? {
        None | Some(1) => {}
        Some(0) => return Err(ApiError::invalid("n", "must be at least 1")),
        Some(_) => {
            return Err(ApiError::invalid(
                "n",
                "greater than 1 is not supported by the simulated engine",
            ));
        }
    }
    let max_tokens = match endpoint {
        // OpenAI deprecated `max_tokens` for chat; the newer name wins.
        Endpoint::Chat => {
            let legacy = opt_u64(body, "max_tokens")?;
            opt_u64(body, "max_completion_tokens")?.or(legacy)
        }
        Endpoint::Text => opt_u64(body, "max_tokens")?,
    };
    if max_tokens == Some(0) {
        return Err(ApiError::bad_request(
            "max_tokens must be at least 1, got 0.",
        ));
    }
    let sim = sim_ext(body)?;
    let format = response_format(body)?;
    let (prompt, thinking, answer) = match endpoint {
        Endpoint::Chat => chat(body, format)?,
        Endpoint::Text => (text_prompt(body)?, None, format),
    };
    Ok(Job {
        prompt,
        stream,
        include_usage,
        max_tokens,
        thinking,
        answer,
        sim,
    })
}

fn sim_ext(body: &Map<String, Value>) -> Result<SimExt, ApiError> {
    let Some(o) = opt_obj(body, "sim")? else {
        return Ok(SimExt::default());
    };
    let fault = match opt_str(o, "sim.fault")? {
        None => None,
        Some("none") => Some(None),
        Some("error") => Some(Some(Fault::Error)),
        Some("stall") => Some(Some(Fault::Stall)),
        Some("drop") => Some(Some(Fault::Drop)),
        Some("invalid_json") => Some(Some(Fault::InvalidJson)),
        Some(_) => {
            return Err(ApiError::invalid(
                "sim.fault",
                "must be one of none, error, stall, drop, invalid_json",
            ));
        }
    };
    let delay = |path: &str| -> Result<Option<Duration>, ApiError> {
        match opt_u64(o, path)? {
            Some(ms) if ms > MAX_DELAY_MS => Err(ApiError::invalid(
                path,
                &format!("must be at most {MAX_DELAY_MS}"),
            )),
            ms => Ok(ms.map(Duration::from_millis)),
        }
    };
    Ok(SimExt {
        fault,
        output_tokens: opt_u64(o, "sim.output_tokens")?,
        ttft: delay("sim.ttft_ms")?,
        tpot: delay("sim.tpot_ms")?,
    })
}

fn response_format(body: &Map<String, Value>) -> Result<JobAnswer, ApiError> {
    let Some(rf) = opt_obj(body, "response_format")? else {
        return Ok(JobAnswer::Text);
    };
    match rf.get("type").and_then(Value::as_str) {
        Some("text") => Ok(JobAnswer::Text),
        Some("json_object") => Ok(JobAnswer::JsonObject),
        Some("json_schema") => {
            let Some(js) = opt_obj(rf, "response_format.json_schema")? else {
                return Err(ApiError::invalid(
                    "response_format.json_schema",
                    "is required when type is json_schema",
                ));
            };
            match field(js, "schema") {
                None => Ok(JobAnswer::JsonObject),
                Some(s @ (Value::Object(_) | Value::Bool(true))) => {
                    Ok(JobAnswer::JsonSchema(s.clone()))
                }
                Some(_) => Err(ApiError::invalid(
                    "response_format.json_schema.schema",
                    "must be an object",
                )),
            }
        }
        _ => Err(ApiError::invalid(
            "response_format.type",
            "must be one of text, json_object, json_schema",
        )),
    }
}

fn thinking(body: &Map<String, Value>) -> Result<Option<Effort>, ApiError> {
    let mut on = false;
    if let Some(kw) = opt_obj(body, "chat_template_kwargs")? {
        // Templates test these flags for truthiness; only a literal true enables.
        on |= kw.get("thinking") == Some(&Value::Bool(true));
        on |= kw.get("enable_thinking") == Some(&Value::Bool(true));
    }
    match field(body, "thinking") {
        None => {}
        Some(Value::Bool(b)) => on |= *b,
        Some(Value::Object(t)) => match t.get("type").and_then(Value::as_str) {
            Some("enabled") => on = true,
            Some("disabled") => {}
            _ => {
                return Err(ApiError::invalid(
                    "thinking.type",
                    "must be \"enabled\" or \"disabled\"",
                ));
            }
        },
        Some(_) => return Err(ApiError::invalid("thinking", "must be an object")),
    }
    let effort = match opt_str(body, "reasoning_effort")? {
        None | Some("medium") => Effort::Medium,
        Some("low" | "minimal") => Effort::Low,
        Some("high") => Effort::High,
        Some(_) => {
            return Err(ApiError::invalid(
                "reasoning_effort",
                "must be one of low, medium, high",
            ));
        }
    };
    Ok(on.then_some(effort))
}

/// Declared tools as (name, parameters schema).
fn tools(body: &Map<String, Value>) -> Result<Vec<(String, Value)>, ApiError> {
    let Some(v) = field(body, "tools") else {
        return Ok(Vec::new());
    };
    let Some(list) = v.as_array() else {
        return Err(ApiError::invalid("tools", "must be an array"));
    };
    list.iter()
        .enumerate()
        .map(|(i, tool)| {
            let path = format!("tools[{i}]");
            let tool = tool
                .as_object()
                .ok_or_else(|| ApiError::invalid(&path, "must be an object"))?;
            if let Some(ty) = field(tool, "type")
                && ty != "function"
            {
                return Err(ApiError::invalid(
                    &format!("{path}.type"),
                    "must be \"function\"",
                ));
            }
            let f = opt_obj(tool, "function")?
                .ok_or_else(|| ApiError::invalid(&format!("{path}.function"), "is required"))?;
            let name = opt_str(f, "name")?
                .filter(|n| !n.is_empty())
                .ok_or_else(|| {
                    ApiError::invalid(&format!("{path}.function.name"), "is required")
                })?;
            let parameters = match field(f, "parameters") {
                None => json!({"type": "object", "properties": {}}),
                Some(p @ Value::Object(_)) => p.clone(),
                Some(_) => {
                    return Err(ApiError::invalid(
                        &format!("{path}.function.parameters"),
                        "must be an object",
                    ));
                }
            };
            Ok((name.to_owned(), parameters))
        })
        .collect()
}

/// Index of the tool to call, if the request lets the model call one.
fn tool_choice(
    body: &Map<String, Value>,
    tools: &[(String, Value)],
) -> Result<Option<usize>, ApiError> {
    let first = (!tools.is_empty()).then_some(0);
    match field(body, "tool_choice") {
        None => Ok(first),
        Some(Value::String(s)) => match s.as_str() {
            "none" => Ok(None),
            "auto" => Ok(first),
            "required" if tools.is_empty() => Err(ApiError::invalid(
                "tool_choice",
                "is \"required\" but no tools were given",
            )),
            "required" => Ok(first),
            _ => Err(ApiError::invalid(
                "tool_choice",
                "must be none, auto, required or a named function",
            )),
        },
        Some(Value::Object(o)) => {
            let name = o
                .get("function")
                .and_then(|f| f.get("name"))
                .and_then(Value::as_str)
                .ok_or_else(|| ApiError::invalid("tool_choice.function.name", "is required"))?;
            tools
                .iter()
                .position(|(n, _)| n == name)
                .map(Some)
                .ok_or_else(|| {
                    ApiError::bad_request(format!("Tool '{name}' has not been passed in `tools`."))
                })
        }
        Some(_) => Err(ApiError::invalid(
            "tool_choice",
            "must be a string or an object",
        )),
    }
}

fn chat(
    body: &Map<String, Value>,
    format: JobAnswer,
) -> Result<(Vec<Token>, Option<Effort>, JobAnswer), ApiError> {
    let messages = match field(body, "messages") {
        Some(Value::Array(m)) if !m.is_empty() => m,
        Some(Value::Array(_)) => return Err(ApiError::invalid("messages", "must not be empty")),
        Some(_) => return Err(ApiError::invalid("messages", "must be an array")),
        None => return Err(ApiError::invalid("messages", "is required")),
    };
    let thinking = thinking(body)?;
    let tools = tools(body)?;
    let choice = tool_choice(body, &tools)?;
    let last_role = messages
        .last()
        .and_then(|m| m.get("role"))
        .and_then(Value::as_str);
    // After a tool result the model answers in text, so tool loops end.
    let answer = match choice {
        Some(i) if last_role != Some("tool") => {
            let (name, parameters) = tools.into_iter().nth(i).unwrap_or_default();
            JobAnswer::Tool { name, parameters }
        }
        _ => format,
    };
    let prompt = chat_prompt(body, messages, thinking.is_some())?;
    Ok((prompt, thinking, answer))
}

fn role_marker(role: &str) -> Token {
    special(&format!("<|{role}|>"))
}

/// Token sequence a chat template would produce: tools first (a shared
/// prefix across turns, as in real templates), then each message framed by
/// template tokens, then the assistant generation prompt.
fn chat_prompt(
    body: &Map<String, Value>,
    messages: &[Value],
    thinking: bool,
) -> Result<Vec<Token>, ApiError> {
    let mut t = vec![special("<|begin_of_sentence|>")];
    if let Some(tools) = field(body, "tools") {
        t.push(special("<|tools|>"));
        tokenize_into(&tools.to_string(), &mut t);
        t.push(special("<|/tools|>"));
    }
    for (i, m) in messages.iter().enumerate() {
        let path = format!("messages[{i}]");
        let m = m
            .as_object()
            .ok_or_else(|| ApiError::invalid(&path, "must be an object"))?;
        let role = m
            .get("role")
            .and_then(Value::as_str)
            .ok_or_else(|| ApiError::invalid(&format!("{path}.role"), "must be a string"))?;
        t.push(role_marker(role));
        match m.get("content") {
            None | Some(Value::Null) => {}
            Some(Value::String(s)) => tokenize_into(s, &mut t),
            Some(Value::Array(parts)) => {
                for (j, part) in parts.iter().enumerate() {
                    let part_path = format!("{path}.content[{j}]");
                    let part = part
                        .as_object()
                        .ok_or_else(|| ApiError::invalid(&part_path, "must be an object"))?;
                    match part.get("type").and_then(Value::as_str) {
                        Some("text") => {
                            let text =
                                part.get("text").and_then(Value::as_str).ok_or_else(|| {
                                    ApiError::invalid(
                                        &format!("{part_path}.text"),
                                        "must be a string",
                                    )
                                })?;
                            tokenize_into(text, &mut t);
                        }
                        // Other part kinds (images, audio) carry no text here.
                        Some(_) => {}
                        None => {
                            return Err(ApiError::invalid(
                                &format!("{part_path}.type"),
                                "must be a string",
                            ));
                        }
                    }
                }
            }
            Some(_) => {
                return Err(ApiError::invalid(
                    &format!("{path}.content"),
                    "must be a string, an array of content parts or null",
                ));
            }
        }
        for call in m
            .get("tool_calls")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            let Some(f) = call.get("function") else {
                continue;
            };
            if let Some(name) = f.get("name").and_then(Value::as_str) {
                tokenize_into(name, &mut t);
            }
            match f.get("arguments") {
                Some(Value::String(a)) => tokenize_into(a, &mut t),
                Some(v) if !v.is_null() => tokenize_into(&v.to_string(), &mut t),
                _ => {}
            }
        }
        t.push(special("<|end_of_message|>"));
    }
    t.push(role_marker("assistant"));
    if thinking {
        t.push(special("<think>"));
    }
    Ok(t)
}

/// `/v1/completions` prompt: a string, strings (joined), token ids, or
/// batches of token ids (the first one is used).
fn text_prompt(body: &Map<String, Value>) -> Result<Vec<Token>, ApiError> {
    const SHAPE: &str = "must be a string, an array of strings or an array of token ids";
    let ids = |items: &[Value]| -> Result<Vec<Token>, ApiError> {
        items
            .iter()
            .map(|v| {
                v.as_u64()
                    .and_then(|id| Token::try_from(id).ok())
                    .ok_or_else(|| ApiError::invalid("prompt", "has an invalid token id"))
            })
            .collect()
    };
    let mut t = vec![special("<|begin_of_sentence|>")];
    match field(body, "prompt") {
        None => return Err(ApiError::invalid("prompt", "is required")),
        Some(Value::String(s)) => tokenize_into(s, &mut t),
        Some(Value::Array(items)) => match items.first() {
            None => return Err(ApiError::invalid("prompt", "must not be empty")),
            Some(Value::String(_)) => {
                for item in items {
                    let s = item
                        .as_str()
                        .ok_or_else(|| ApiError::invalid("prompt", SHAPE))?;
                    tokenize_into(s, &mut t);
                }
            }
            // Token-id prompts are used as given, without a BOS.
            Some(Value::Number(_)) => t = ids(items)?,
            Some(Value::Array(first)) if !first.is_empty() => t = ids(first)?,
            Some(_) => return Err(ApiError::invalid("prompt", SHAPE)),
        },
        Some(_) => return Err(ApiError::invalid("prompt", SHAPE)),
    }
    Ok(t)
}

// --- generation -------------------------------------------------------------

fn roll_fault(engine: &Engine) -> Option<Fault> {
    let o = &engine.opts;
    if o.error_rate <= 0.0 && o.stall_rate <= 0.0 && o.drop_rate <= 0.0 {
        return None;
    }
    engine.with_rng(|r| {
        if r.f64() < o.error_rate {
            Some(Fault::Error)
        } else if r.f64() < o.stall_rate {
            Some(Fault::Stall)
        } else if r.f64() < o.drop_rate {
            Some(Fault::Drop)
        } else {
            None
        }
    })
}

fn context_error(max_len: u64, prompt: u64, max_tokens: Option<u64>) -> ApiError {
    ApiError::bad_request(match max_tokens {
        Some(m) => format!(
            "This model's maximum context length is {max_len} tokens. However, you requested \
             {total} tokens ({prompt} in the messages, {m} in the completion). Please reduce the \
             length of the messages or completion.",
            total = u128::from(prompt) + u128::from(m),
        ),
        None => format!(
            "This model's maximum context length is {max_len} tokens. However, you requested \
             {prompt} tokens in the messages, Please reduce the length of the messages."
        ),
    })
}

/// When tokens are due, measured from the start of generation.
#[derive(Clone, Copy)]
struct Pace {
    ttft: Duration,
    tpot: Duration,
}

impl Pace {
    /// `None` means "now": zero latency skips the timer entirely.
    fn deadline(&self, start: Instant, token: usize) -> Option<Instant> {
        if self.ttft.is_zero() && self.tpot.is_zero() {
            return None;
        }
        let steps = u32::try_from(token).unwrap_or(u32::MAX);
        // Absolute deadlines, so per-chunk overhead does not accumulate.
        start.checked_add(self.ttft.saturating_add(self.tpot.saturating_mul(steps)))
    }
}

/// Everything needed to produce one answer, shared by both delivery modes.
struct Output {
    engine: Arc<Engine>,
    endpoint: Endpoint,
    id: String,
    tool_id: String,
    plan: Plan,
    prompt: Vec<Token>,
    thinking: bool,
    fault: Option<Fault>,
    pace: Pace,
    arrival: Instant,
    include_usage: bool,
    /// The engine's own spans, when a tracer is installed.
    timeline: Option<trace::Timeline>,
}

impl Output {
    fn usage(&self, cached_tokens: usize) -> Usage {
        let completion = self.plan.pieces.len();
        Usage {
            prompt_tokens: self.prompt.len(),
            total_tokens: self.prompt.len() + completion,
            completion_tokens: completion,
            prompt_tokens_details: PromptDetails { cached_tokens },
            completion_tokens_details: CompletionDetails {
                reasoning_tokens: self.plan.count(PieceKind::Reasoning),
            },
        }
    }

    fn first_token(&self) {
        let secs = self.arrival.elapsed().as_secs_f64();
        self.engine.metrics.ttft.observe(secs);
        if let Some(t) = &self.timeline {
            t.first_token();
        }
    }

    fn admitted(&self) {
        if let Some(t) = &self.timeline {
            t.admitted();
        }
    }

    /// End the engine's spans (an unfinished generation counts as aborted).
    fn traced_end(&self, finish: &str) {
        if let Some(t) = &self.timeline {
            t.finish(finish, self.prompt.len(), self.plan.pieces.len());
        }
    }

    fn model(&self) -> &str {
        &self.engine.opts.model
    }

    fn object(&self, stream: bool) -> &'static str {
        match (self.endpoint, stream) {
            (Endpoint::Chat, false) => "chat.completion",
            (Endpoint::Chat, true) => "chat.completion.chunk",
            (Endpoint::Text, _) => "text_completion",
        }
    }

    /// The whole non-stream response body.
    fn whole(&self, usage: &Usage) -> Value {
        let finish = self.plan.finish.as_str();
        let choice = match self.endpoint {
            Endpoint::Text => json!({
                "index": 0,
                "text": self.plan.text(PieceKind::Content),
                "logprobs": null,
                "finish_reason": finish,
                "stop_reason": null,
            }),
            Endpoint::Chat => {
                let non_empty = |s: String| {
                    if s.is_empty() {
                        Value::Null
                    } else {
                        Value::String(s)
                    }
                };
                let mut message = Map::new();
                message.insert("role".into(), "assistant".into());
                message.insert(
                    "content".into(),
                    non_empty(self.plan.text(PieceKind::Content)),
                );
                if self.thinking {
                    message.insert(
                        "reasoning_content".into(),
                        non_empty(self.plan.text(PieceKind::Reasoning)),
                    );
                }
                if let Some(call) = self
                    .plan
                    .pieces
                    .iter()
                    .find(|p| p.kind == PieceKind::ToolName)
                {
                    message.insert(
                        "tool_calls".into(),
                        json!([{
                            "id": self.tool_id,
                            "type": "function",
                            "function": {
                                "name": call.text,
                                "arguments": self.plan.text(PieceKind::ToolArgs),
                            },
                        }]),
                    );
                }
                json!({
                    "index": 0,
                    "message": message,
                    "logprobs": null,
                    "finish_reason": finish,
                    "stop_reason": null,
                })
            }
        };
        json!({
            "id": self.id,
            "object": self.object(false),
            "created": self.engine.created,
            "model": self.model(),
            "choices": [choice],
            "usage": usage,
        })
    }
}

fn finished_reason(finish: Finish) -> FinishedReason {
    match finish {
        Finish::Stop | Finish::ToolCalls => FinishedReason::Stop,
        Finish::Length => FinishedReason::Length,
    }
}

async fn completion(
    engine: Arc<Engine>,
    req: Request<Incoming>,
    endpoint: Endpoint,
) -> Result<Response<Body>, ApiError> {
    let arrival = Instant::now();
    let timeline = trace::Timeline::start(req.headers(), &engine.opts.model);
    let body = read_json(req).await?;
    let job = parse(&engine, &body, endpoint)?;
    drop(body);

    let prompt_len = job.prompt.len() as u64;
    let max_len = u64::from(engine.opts.max_model_len);
    let limit = match job.max_tokens {
        Some(m) if u128::from(prompt_len) + u128::from(m) > u128::from(max_len) => {
            return Err(context_error(max_len, prompt_len, Some(m)));
        }
        Some(m) => m,
        None if prompt_len >= max_len => return Err(context_error(max_len, prompt_len, None)),
        None => max_len - prompt_len,
    };

    let fault = job.sim.fault.unwrap_or_else(|| roll_fault(&engine));
    if fault == Some(Fault::Error) {
        return Err(ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "The engine failed to process the request (injected fault).",
        ));
    }

    let break_json = fault == Some(Fault::InvalidJson);
    let answer = match &job.answer {
        // The invalid_json fault needs JSON to break, so it forces JSON mode.
        JobAnswer::Text if break_json => Answer::JsonObject,
        JobAnswer::Text => Answer::Text,
        JobAnswer::JsonObject => Answer::JsonObject,
        JobAnswer::JsonSchema(schema) => Answer::JsonSchema(schema),
        JobAnswer::Tool { name, parameters } => Answer::Tool { name, parameters },
    };
    let natural = job
        .sim
        .output_tokens
        .unwrap_or(u64::from(engine.opts.output_tokens));
    let spec = PlanSpec {
        natural: usize::try_from(natural).unwrap_or(usize::MAX),
        limit: usize::try_from(limit).unwrap_or(usize::MAX),
        thinking: job.thinking,
        answer,
        break_json,
    };
    let plan = generate::plan(&spec, hash_tokens(engine.seed, &job.prompt));

    let latency = |requested: Option<Duration>, ms: u64| {
        requested.unwrap_or(if engine.opts.zero_latency {
            Duration::ZERO
        } else {
            Duration::from_millis(ms)
        })
    };
    let pace = Pace {
        ttft: latency(job.sim.ttft, engine.opts.ttft_ms),
        tpot: latency(job.sim.tpot, engine.opts.tpot_ms),
    };
    let ticket = engine.scheduler.enqueue()?;
    let id = match endpoint {
        Endpoint::Chat => format!("chatcmpl-{}", engine.random_hex()),
        Endpoint::Text => format!("cmpl-{}", engine.random_hex()),
    };
    let out = Output {
        tool_id: format!("chatcmpl-tool-{}", engine.random_hex()),
        engine,
        endpoint,
        id,
        plan,
        prompt: job.prompt,
        thinking: job.thinking.is_some(),
        fault,
        pace,
        arrival,
        include_usage: job.include_usage,
        timeline,
    };
    if job.stream {
        Ok(respond_stream(out, ticket))
    } else {
        respond_whole(out, ticket).await
    }
}

async fn respond_whole(out: Output, ticket: Ticket) -> Result<Response<Body>, ApiError> {
    // If the client leaves, hyper drops this future and the ticket/slot
    // guards count the cancellation.
    let mut slot = ticket.admit(&out.prompt).await?;
    out.admitted();
    if out.fault == Some(Fault::Stall) {
        out.engine.stopped().await;
        slot.finish(Outcome::Aborted);
        return Err(AdmitError::ShuttingDown.into());
    }
    let start = Instant::now();
    for i in 0..out.plan.pieces.len() {
        match out.pace.deadline(start, i) {
            Some(due) => tokio::time::sleep_until(due).await,
            None if i % YIELD_EVERY == YIELD_EVERY - 1 => tokio::task::yield_now().await,
            None => {}
        }
        slot.on_token();
        if i == 0 {
            out.first_token();
        }
    }
    let body = out.whole(&out.usage(slot.cached_tokens));
    if out.fault == Some(Fault::Drop) {
        slot.finish(Outcome::Aborted);
        out.traced_end("aborted");
        let text = Bytes::from(body.to_string());
        let half = text.slice(..text.len() / 2);
        let frames = futures_util::stream::iter([Ok(Frame::data(half))]).chain(
            futures_util::stream::once(async {
                tokio::time::sleep(DROP_FLUSH).await;
                Err(BodyError::Dropped)
            }),
        );
        let mut resp = Response::new(StreamBody::new(frames).boxed_unsync());
        resp.headers_mut()
            .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        return Ok(resp);
    }
    slot.finish(Outcome::Finished(finished_reason(out.plan.finish)));
    out.traced_end(out.plan.finish.as_str());
    Ok(json_response(StatusCode::OK, &body))
}

fn respond_stream(out: Output, ticket: Ticket) -> Response<Body> {
    let (tx, mut rx) = mpsc::channel(STREAM_BUFFER);
    tokio::spawn(stream_task(out, ticket, Sink { tx }));
    let frames = futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx));
    let mut resp = Response::new(StreamBody::new(frames).boxed_unsync());
    let headers = resp.headers_mut();
    headers.insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream; charset=utf-8"),
    );
    headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    resp
}

/// Why a stream stopped before `[DONE]`.
enum Halt {
    /// The response body was dropped: the client went away.
    ClientGone,
    /// The engine cut the stream itself (fault, shutdown, encoding).
    Aborted,
}

/// Sending half of a streamed response body.
struct Sink {
    tx: mpsc::Sender<Result<Frame<Bytes>, BodyError>>,
}

impl Sink {
    async fn send(&self, data: Bytes) -> Result<(), Halt> {
        self.tx
            .send(Ok(Frame::data(data)))
            .await
            .map_err(|_| Halt::ClientGone)
    }

    async fn send_chunk(&self, chunk: Result<Bytes, serde_json::Error>) -> Result<(), Halt> {
        match chunk {
            Ok(data) => self.send(data).await,
            Err(e) => {
                self.abort(e.into()).await;
                Err(Halt::Aborted)
            }
        }
    }

    /// Makes hyper abort the response mid-body.
    async fn abort(&self, error: BodyError) {
        let _ = self.tx.send(Err(error)).await;
    }

    async fn gone(&self) {
        self.tx.closed().await;
    }

    async fn wait_until(&self, due: Option<Instant>) -> Result<(), Halt> {
        let Some(due) = due else {
            return Ok(());
        };
        tokio::select! {
            () = tokio::time::sleep_until(due) => Ok(()),
            () = self.gone() => Err(Halt::ClientGone),
        }
    }
}

async fn stream_task(out: Output, ticket: Ticket, sink: Sink) {
    // A client that leaves while queued gives up its place.
    let admitted = tokio::select! {
        admitted = ticket.admit(&out.prompt) => admitted,
        () = sink.gone() => return,
    };
    let mut slot = match admitted {
        Ok(slot) => slot,
        Err(_) => {
            sink.abort(BodyError::ShuttingDown).await;
            return;
        }
    };
    out.admitted();
    match emit(&out, &mut slot, &sink).await {
        Ok(outcome) => {
            slot.finish(outcome);
            out.traced_end(out.plan.finish.as_str());
        }
        Err(Halt::Aborted) => {
            slot.finish(Outcome::Aborted);
            out.traced_end("aborted");
        }
        // Dropping the slot unfinished counts the cancellation.
        Err(Halt::ClientGone) => out.traced_end("aborted"),
    }
}

async fn emit(out: &Output, slot: &mut Slot, sink: &Sink) -> Result<Outcome, Halt> {
    let chunks = Chunks { out };
    let start = Instant::now();
    let n = out.plan.pieces.len();
    let drop_after = DROP_AFTER_TOKENS.min(n);
    for (i, piece) in out.plan.pieces.iter().enumerate() {
        sink.wait_until(out.pace.deadline(start, i)).await?;
        slot.on_token();
        if i == 0 {
            out.first_token();
            if out.endpoint == Endpoint::Chat {
                sink.send_chunk(chunks.role()).await?;
            }
        }
        let finish = (i + 1 == n).then_some(out.plan.finish);
        sink.send_chunk(chunks.piece(piece, finish)).await?;
        match out.fault {
            Some(Fault::Stall) => {
                return tokio::select! {
                    () = sink.gone() => Err(Halt::ClientGone),
                    () = out.engine.stopped() => {
                        sink.abort(BodyError::ShuttingDown).await;
                        Err(Halt::Aborted)
                    }
                };
            }
            Some(Fault::Drop) if i + 1 == drop_after => {
                tokio::time::sleep(DROP_FLUSH).await;
                sink.abort(BodyError::Dropped).await;
                return Err(Halt::Aborted);
            }
            _ => {}
        }
    }
    if out.include_usage {
        sink.send_chunk(chunks.usage(&out.usage(slot.cached_tokens)))
            .await?;
    }
    sink.send(Bytes::from_static(DONE)).await?;
    Ok(Outcome::Finished(finished_reason(out.plan.finish)))
}

// --- wire structs (borrowing, so streaming does not clone per token) ---------

#[derive(Serialize)]
struct Usage {
    prompt_tokens: usize,
    total_tokens: usize,
    completion_tokens: usize,
    prompt_tokens_details: PromptDetails,
    completion_tokens_details: CompletionDetails,
}

#[derive(Serialize)]
struct PromptDetails {
    cached_tokens: usize,
}

#[derive(Serialize)]
struct CompletionDetails {
    reasoning_tokens: usize,
}

#[derive(Serialize)]
struct Chunk<'a, C> {
    id: &'a str,
    object: &'static str,
    created: u64,
    model: &'a str,
    choices: &'a [C],
    #[serde(skip_serializing_if = "Option::is_none")]
    usage: Option<&'a Usage>,
}

#[derive(Serialize)]
struct ChatChoice<'a> {
    index: u32,
    delta: Delta<'a>,
    logprobs: (),
    finish_reason: Option<&'static str>,
}

#[derive(Serialize, Default)]
struct Delta<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    role: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    content: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    reasoning_content: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tool_calls: Option<[ToolCallDelta<'a>; 1]>,
}

#[derive(Serialize)]
struct ToolCallDelta<'a> {
    index: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    id: Option<&'a str>,
    #[serde(rename = "type", skip_serializing_if = "Option::is_none")]
    kind: Option<&'static str>,
    function: FunctionDelta<'a>,
}

#[derive(Serialize)]
struct FunctionDelta<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    name: Option<&'a str>,
    arguments: &'a str,
}

#[derive(Serialize)]
struct TextChoice<'a> {
    index: u32,
    text: &'a str,
    logprobs: (),
    finish_reason: Option<&'static str>,
}

/// Renders SSE events for one response.
struct Chunks<'a> {
    out: &'a Output,
}

impl Chunks<'_> {
    fn event<C: Serialize>(
        &self,
        choices: &[C],
        usage: Option<&Usage>,
    ) -> Result<Bytes, serde_json::Error> {
        let chunk = Chunk {
            id: &self.out.id,
            object: self.out.object(true),
            created: self.out.engine.created,
            model: self.out.model(),
            choices,
            usage,
        };
        let mut buf = Vec::with_capacity(256);
        buf.extend_from_slice(b"data: ");
        serde_json::to_writer(&mut buf, &chunk)?;
        buf.extend_from_slice(b"\n\n");
        Ok(buf.into())
    }

    fn chat(&self, delta: Delta<'_>, finish: Option<Finish>) -> Result<Bytes, serde_json::Error> {
        self.event(
            &[ChatChoice {
                index: 0,
                delta,
                logprobs: (),
                finish_reason: finish.map(Finish::as_str),
            }],
            None,
        )
    }

    fn role(&self) -> Result<Bytes, serde_json::Error> {
        self.chat(
            Delta {
                role: Some("assistant"),
                content: Some(""),
                ..Delta::default()
            },
            None,
        )
    }

    fn piece(&self, piece: &Piece, finish: Option<Finish>) -> Result<Bytes, serde_json::Error> {
        let text = piece.text.as_str();
        if self.out.endpoint == Endpoint::Text {
            return self.event(
                &[TextChoice {
                    index: 0,
                    text,
                    logprobs: (),
                    finish_reason: finish.map(Finish::as_str),
                }],
                None,
            );
        }
        let delta = match piece.kind {
            PieceKind::Reasoning => Delta {
                reasoning_content: Some(text),
                ..Delta::default()
            },
            PieceKind::Content => Delta {
                content: Some(text),
                ..Delta::default()
            },
            PieceKind::ToolName => Delta {
                tool_calls: Some([ToolCallDelta {
                    index: 0,
                    id: Some(&self.out.tool_id),
                    kind: Some("function"),
                    function: FunctionDelta {
                        name: Some(text),
                        arguments: "",
                    },
                }]),
                ..Delta::default()
            },
            PieceKind::ToolArgs => Delta {
                tool_calls: Some([ToolCallDelta {
                    index: 0,
                    id: None,
                    kind: None,
                    function: FunctionDelta {
                        name: None,
                        arguments: text,
                    },
                }]),
                ..Delta::default()
            },
        };
        self.chat(delta, finish)
    }

    fn usage(&self, usage: &Usage) -> Result<Bytes, serde_json::Error> {
        self.event::<TextChoice<'_>>(&[], Some(usage))
    }
}
