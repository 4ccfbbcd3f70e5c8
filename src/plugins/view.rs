//! What plugins see and what they change: the request view parsed once from
//! the body, patches applied back to the body and headers, and the response
//! view built from a whole answer or accumulated from a stream.

use http::{HeaderMap, HeaderName, HeaderValue};
use serde_json::{Map, Value};

use super::bindings::{
    Header, Message, PatchOp, RequestView, ResponseView, ThinkingMode, Tool, ToolCall, Usage,
};
use crate::tokens;

/// Who and where, for a request view.
pub struct ViewInput<'a> {
    pub tenant: &'a str,
    pub key_id: &'a str,
    pub endpoint: &'a str,
    pub pool: &'a str,
    pub dialect: &'a str,
    pub headers: &'a HeaderMap,
}

/// Header the task tag comes from.
pub const TASK_HEADER: &str = "x-sluice-task";

fn visible_header(name: &str) -> bool {
    name == "user-agent"
        || name == "x-request-id"
        || name.starts_with("x-sluice-")
        || name.starts_with("openai-")
}

fn text_of(content: &Value) -> String {
    match content {
        Value::String(s) => s.clone(),
        Value::Array(parts) => {
            let mut out = String::new();
            for p in parts {
                if let Some(t) = p.get("text").and_then(Value::as_str) {
                    if !out.is_empty() {
                        out.push('\n');
                    }
                    out.push_str(t);
                }
            }
            out
        }
        _ => String::new(),
    }
}

fn u32_of(v: Option<&Value>) -> Option<u32> {
    v.and_then(Value::as_u64)
        .map(|n| u32::try_from(n).unwrap_or(u32::MAX))
}

/// Thinking as the request states it, in any of the dialects' spellings.
pub fn thinking_of(body: &Value) -> ThinkingMode {
    let kwargs = body.get("chat_template_kwargs");
    for key in ["thinking", "enable_thinking"] {
        if let Some(b) = kwargs.and_then(|k| k.get(key)).and_then(Value::as_bool) {
            return if b {
                ThinkingMode::Enabled
            } else {
                ThinkingMode::Disabled
            };
        }
    }
    match body
        .get("thinking")
        .and_then(|t| t.get("type"))
        .and_then(Value::as_str)
    {
        Some("enabled") => ThinkingMode::Enabled,
        Some("disabled") => ThinkingMode::Disabled,
        _ => ThinkingMode::Unspecified,
    }
}

/// Build the view hooks receive. `raw_json` is filled by the caller only for
/// plugins that ask for it.
pub fn request_view(body: &Value, input: &ViewInput<'_>) -> RequestView {
    let mut messages = Vec::new();
    if let Some(list) = body.get("messages").and_then(Value::as_array) {
        for m in list {
            messages.push(Message {
                role: m
                    .get("role")
                    .and_then(Value::as_str)
                    .unwrap_or("user")
                    .to_owned(),
                text: m.get("content").map(text_of).unwrap_or_default(),
            });
        }
    } else if let Some(prompt) = body.get("prompt") {
        let text = match prompt {
            Value::Array(items) => items
                .iter()
                .filter_map(Value::as_str)
                .collect::<Vec<_>>()
                .join("\n"),
            other => text_of(other),
        };
        messages.push(Message {
            role: "user".into(),
            text,
        });
    }
    let mut tools = Vec::new();
    if let Some(list) = body.get("tools").and_then(Value::as_array) {
        for t in list {
            let f = t.get("function").unwrap_or(t);
            if let Some(name) = f.get("name").and_then(Value::as_str) {
                tools.push(Tool {
                    name: name.to_owned(),
                    parameters: f
                        .get("parameters")
                        .map(Value::to_string)
                        .unwrap_or_else(|| "{}".into()),
                });
            }
        }
    }
    let mut estimate: u32 = messages
        .iter()
        .map(|m| tokens::estimate(&m.text).saturating_add(tokens::PER_MESSAGE_OVERHEAD))
        .fold(0, u32::saturating_add);
    for t in &tools {
        estimate = estimate
            .saturating_add(tokens::estimate(&t.name))
            .saturating_add(tokens::estimate(&t.parameters));
    }
    let headers = input
        .headers
        .iter()
        .filter(|(n, _)| visible_header(n.as_str()))
        .filter_map(|(n, v)| {
            Some(Header {
                name: n.as_str().to_owned(),
                value: v.to_str().ok()?.to_owned(),
            })
        })
        .collect();
    RequestView {
        tenant: input.tenant.to_owned(),
        key_id: input.key_id.to_owned(),
        endpoint: input.endpoint.to_owned(),
        model: body
            .get("model")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned(),
        pool: input.pool.to_owned(),
        dialect: input.dialect.to_owned(),
        messages,
        estimated_input_tokens: estimate,
        max_output_tokens: u32_of(body.get("max_completion_tokens"))
            .or_else(|| u32_of(body.get("max_tokens"))),
        temperature: body.get("temperature").and_then(Value::as_f64),
        top_p: body.get("top_p").and_then(Value::as_f64),
        thinking: thinking_of(body),
        reasoning_effort: body
            .get("reasoning_effort")
            .and_then(Value::as_str)
            .map(str::to_owned),
        stream: body.get("stream").and_then(Value::as_bool).unwrap_or(false),
        tools,
        response_format: body.get("response_format").map(Value::to_string),
        headers,
        task: input
            .headers
            .get(TASK_HEADER)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned),
        raw_json: None,
    }
}

/// What a set of patch operations changed besides the body.
#[derive(Debug, Default)]
pub struct Effects {
    pub pool: Option<String>,
}

/// Headers a plugin may not set or remove: framing and the host's own.
fn protected_header(name: &str) -> bool {
    matches!(
        name,
        "host"
            | "content-length"
            | "transfer-encoding"
            | "connection"
            | "te"
            | "upgrade"
            | "traceparent"
            | "x-request-id"
    )
}

/// Apply a plugin's patch to the body and the engine-bound headers.
pub fn apply(
    body: &mut Value,
    headers: &mut HeaderMap,
    ops: Vec<PatchOp>,
) -> Result<Effects, String> {
    let mut effects = Effects::default();
    for op in ops {
        match op {
            PatchOp::SetField(f) => {
                let value: Value = serde_json::from_str(&f.json)
                    .map_err(|e| format!("set-field {}: value is not JSON: {e}", f.pointer))?;
                set_pointer(body, &f.pointer, value)?;
            }
            PatchOp::RemoveField(p) => remove_pointer(body, &p)?,
            PatchOp::SetHeader(h) => {
                let name = HeaderName::try_from(h.name.to_ascii_lowercase())
                    .map_err(|_| format!("set-header: invalid name {:?}", h.name))?;
                if protected_header(name.as_str()) {
                    return Err(format!("set-header: {name} is managed by sluice"));
                }
                let value = HeaderValue::try_from(h.value)
                    .map_err(|_| format!("set-header {name}: invalid value"))?;
                headers.insert(name, value);
            }
            PatchOp::RemoveHeader(n) => {
                let name = n.to_ascii_lowercase();
                if protected_header(&name) {
                    return Err(format!("remove-header: {name} is managed by sluice"));
                }
                headers.remove(name.as_str());
            }
            PatchOp::SetModel(m) => set_pointer(body, "/model", Value::String(m))?,
            PatchOp::SetPool(p) => effects.pool = Some(p),
        }
    }
    Ok(effects)
}

fn tokens_of(pointer: &str) -> Result<Vec<String>, String> {
    let Some(rest) = pointer.strip_prefix('/') else {
        return Err(format!(
            "{pointer:?} is not a JSON pointer into the body (must start with '/')"
        ));
    };
    Ok(rest
        .split('/')
        .map(|t| t.replace("~1", "/").replace("~0", "~"))
        .collect())
}

fn set_pointer(root: &mut Value, pointer: &str, value: Value) -> Result<(), String> {
    let tokens = tokens_of(pointer)?;
    let (last, parents) = tokens.split_last().ok_or("empty pointer")?;
    let mut cur = root;
    for t in parents {
        cur = match cur {
            Value::Object(map) => map
                .entry(t.clone())
                .or_insert_with(|| Value::Object(Map::new())),
            Value::Array(items) => {
                let i: usize = t
                    .parse()
                    .map_err(|_| format!("{pointer}: {t:?} is not an array index"))?;
                items
                    .get_mut(i)
                    .ok_or_else(|| format!("{pointer}: index {i} out of range"))?
            }
            _ => return Err(format!("{pointer}: {t:?} is inside a non-container value")),
        };
        if cur.is_null() {
            *cur = Value::Object(Map::new());
        }
    }
    match cur {
        Value::Object(map) => {
            map.insert(last.clone(), value);
            Ok(())
        }
        Value::Array(items) => {
            if last == "-" {
                items.push(value);
                return Ok(());
            }
            let i: usize = last
                .parse()
                .map_err(|_| format!("{pointer}: {last:?} is not an array index"))?;
            match i.cmp(&items.len()) {
                std::cmp::Ordering::Less => items[i] = value,
                std::cmp::Ordering::Equal => items.push(value),
                std::cmp::Ordering::Greater => {
                    return Err(format!("{pointer}: index {i} out of range"));
                }
            }
            Ok(())
        }
        _ => Err(format!("{pointer}: parent is not an object or array")),
    }
}

fn remove_pointer(root: &mut Value, pointer: &str) -> Result<(), String> {
    let tokens = tokens_of(pointer)?;
    let (last, parents) = tokens.split_last().ok_or("empty pointer")?;
    let mut cur = root;
    for t in parents {
        let next = match cur {
            Value::Object(map) => map.get_mut(t),
            Value::Array(items) => t.parse::<usize>().ok().and_then(|i| items.get_mut(i)),
            _ => None,
        };
        match next {
            Some(n) => cur = n,
            None => return Ok(()), // absent: nothing to remove
        }
    }
    match cur {
        Value::Object(map) => {
            map.shift_remove(last);
        }
        Value::Array(items) => {
            if let Ok(i) = last.parse::<usize>()
                && i < items.len()
            {
                items.remove(i);
            }
        }
        _ => {}
    }
    Ok(())
}

/// Usage from an engine answer's `usage` object.
pub fn usage_of(v: &Value) -> Option<Usage> {
    let u = v.get("usage").filter(|u| u.is_object())?;
    let n = |v: Option<&Value>| u32_of(v).unwrap_or(0);
    Some(Usage {
        input_tokens: n(u.get("prompt_tokens")),
        cached_input_tokens: n(u.pointer("/prompt_tokens_details/cached_tokens")),
        output_tokens: n(u.get("completion_tokens")),
        reasoning_tokens: n(u.pointer("/completion_tokens_details/reasoning_tokens")),
    })
}

fn reasoning_of(v: &Value) -> Option<&str> {
    v.get("reasoning_content")
        .or_else(|| v.get("reasoning"))
        .and_then(Value::as_str)
}

/// The view of a complete (non-streamed) answer.
pub fn response_view(answer: &Value, attempt: u32) -> ResponseView {
    let choice = answer.pointer("/choices/0");
    let message = choice.and_then(|c| c.get("message"));
    let content = message
        .and_then(|m| m.get("content"))
        .and_then(Value::as_str)
        .or_else(|| choice.and_then(|c| c.get("text")).and_then(Value::as_str))
        .unwrap_or_default()
        .to_owned();
    let mut tool_calls = Vec::new();
    if let Some(calls) = message
        .and_then(|m| m.get("tool_calls"))
        .and_then(Value::as_array)
    {
        for c in calls {
            let s = |p: &str| {
                c.pointer(p)
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_owned()
            };
            tool_calls.push(ToolCall {
                id: s("/id"),
                name: s("/function/name"),
                arguments: s("/function/arguments"),
            });
        }
    }
    ResponseView {
        content,
        reasoning: message
            .and_then(reasoning_of)
            .unwrap_or_default()
            .to_owned(),
        tool_calls,
        finish_reason: choice
            .and_then(|c| c.get("finish_reason"))
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned(),
        usage: usage_of(answer),
        streamed: false,
        attempt,
    }
}

/// Builds the response view of a stream, chunk by chunk.
#[derive(Debug, Default)]
pub struct StreamAccumulator {
    pub content: String,
    pub reasoning: String,
    pub tool_calls: Vec<ToolCall>,
    pub finish_reason: String,
    pub usage: Option<Usage>,
    pub chunks: u32,
}

impl StreamAccumulator {
    /// Feed one parsed `chat.completion.chunk` (or text completion chunk).
    /// Returns the chunk's (content, reasoning, finish) deltas.
    pub fn feed(&mut self, chunk: &Value) -> (String, String, Option<String>) {
        if let Some(u) = usage_of(chunk) {
            self.usage = Some(u);
        }
        let Some(choice) = chunk.pointer("/choices/0") else {
            return Default::default();
        };
        self.chunks += 1;
        let delta = choice.get("delta");
        let content = delta
            .and_then(|d| d.get("content"))
            .and_then(Value::as_str)
            .or_else(|| choice.get("text").and_then(Value::as_str))
            .unwrap_or_default();
        let reasoning = delta.and_then(reasoning_of).unwrap_or_default();
        self.content.push_str(content);
        self.reasoning.push_str(reasoning);
        if let Some(calls) = delta
            .and_then(|d| d.get("tool_calls"))
            .and_then(Value::as_array)
        {
            for c in calls {
                let i = c.get("index").and_then(Value::as_u64).unwrap_or(0) as usize;
                // Indices come in order; a gap would be a broken engine.
                while self.tool_calls.len() <= i.min(64) {
                    self.tool_calls.push(ToolCall {
                        id: String::new(),
                        name: String::new(),
                        arguments: String::new(),
                    });
                }
                let Some(call) = self.tool_calls.get_mut(i) else {
                    continue;
                };
                if let Some(id) = c.get("id").and_then(Value::as_str) {
                    call.id = id.to_owned();
                }
                if let Some(n) = c.pointer("/function/name").and_then(Value::as_str) {
                    call.name.push_str(n);
                }
                if let Some(a) = c.pointer("/function/arguments").and_then(Value::as_str) {
                    call.arguments.push_str(a);
                }
            }
        }
        let finish = choice
            .get("finish_reason")
            .and_then(Value::as_str)
            .map(str::to_owned);
        if let Some(f) = &finish {
            self.finish_reason = f.clone();
        }
        (content.to_owned(), reasoning.to_owned(), finish)
    }

    pub fn view(&self) -> ResponseView {
        ResponseView {
            content: self.content.clone(),
            reasoning: self.reasoning.clone(),
            tool_calls: self.tool_calls.clone(),
            finish_reason: self.finish_reason.clone(),
            usage: self.usage,
            streamed: true,
            attempt: 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn pointers_set_nested_and_remove() {
        let mut v = json!({"model": "m", "chat_template_kwargs": {"x": 1}});
        set_pointer(&mut v, "/chat_template_kwargs/thinking", json!(true)).unwrap();
        set_pointer(&mut v, "/thinking/type", json!("enabled")).unwrap();
        assert_eq!(v["chat_template_kwargs"], json!({"x": 1, "thinking": true}));
        assert_eq!(v["thinking"]["type"], "enabled");
        remove_pointer(&mut v, "/thinking").unwrap();
        remove_pointer(&mut v, "/absent/deep").unwrap();
        assert!(v.get("thinking").is_none());
        assert!(set_pointer(&mut v, "model", json!(1)).is_err());
        set_pointer(&mut v, "/a~1b", json!(2)).unwrap();
        assert_eq!(v["a/b"], 2);
    }

    #[test]
    fn view_reads_thinking_in_every_dialect() {
        assert_eq!(
            thinking_of(&json!({"chat_template_kwargs": {"thinking": true}})),
            ThinkingMode::Enabled
        );
        assert_eq!(
            thinking_of(&json!({"chat_template_kwargs": {"enable_thinking": false}})),
            ThinkingMode::Disabled
        );
        assert_eq!(
            thinking_of(&json!({"thinking": {"type": "enabled"}})),
            ThinkingMode::Enabled
        );
        assert_eq!(thinking_of(&json!({})), ThinkingMode::Unspecified);
    }
}
