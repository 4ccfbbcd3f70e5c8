//! The response half of a plugin-governed exchange: a stream hook that feeds
//! chunk hooks, accounts usage and runs `on-response` before `[DONE]`; and
//! the buffered path for non-streaming answers, with retries on feedback.

use std::sync::Arc;

use bytes::Bytes;
use http::{HeaderValue, Response, header};
use http_body_util::{BodyExt, Limited};
use serde_json::{Value, json};

use super::bindings::{ChunkView, RequestView};
use super::chain::Chain;
use super::host::CallCtx;
use super::phases::{self, ResponseOutcome, Settlement};
use super::view::{self, StreamAccumulator};
use crate::body::{self, ProxyBody};
use crate::errors::GatewayError;
use crate::telemetry::RequestIds;
use crate::telemetry::metrics::Recorder;
use crate::upstream::relay::{EventAction, EventHook};
use crate::upstream::{self, Pool};

/// Largest non-streamed answer buffered for response hooks.
const MAX_ANSWER_BYTES: usize = 64 << 20;

/// Plugin state carried from the request phase to the end of the exchange.
pub struct Exchange {
    pub chain: Arc<Chain>,
    pub ctx: CallCtx,
    pub settlement: Settlement,
    pub view: RequestView,
    /// sluice asked the engine for usage the client did not ask for; the
    /// usage-only chunk is then left out of the client's stream.
    pub strip_usage: bool,
}

impl Exchange {
    /// Does the answer need to pass through the hooks?
    pub fn inspects(&self, stream: bool) -> bool {
        !self.settlement.is_empty()
            || self.chain.wants_response()
            || (stream && self.chain.wants_chunks())
    }
}

/// Watches a stream on behalf of the tenant's chain.
pub struct StreamHook {
    exchange: Exchange,
    acc: StreamAccumulator,
}

impl StreamHook {
    pub fn new(exchange: Exchange) -> StreamHook {
        StreamHook {
            exchange,
            acc: StreamAccumulator::default(),
        }
    }
}

impl EventHook for StreamHook {
    fn on_event(&mut self, data: &[u8]) -> EventAction {
        // The engine answered: from here on its tokens count.
        self.exchange.settlement.engine_called();
        let Ok(chunk) = serde_json::from_slice::<Value>(data) else {
            return EventAction::Pass;
        };
        let index = self.acc.chunks;
        let (content_delta, reasoning_delta, finish_reason) = self.acc.feed(&chunk);
        if let Some(u) = self.acc.usage {
            self.exchange
                .settlement
                .used(u.input_tokens.saturating_add(u.output_tokens));
        }
        let usage_only = chunk
            .get("choices")
            .and_then(Value::as_array)
            .is_some_and(Vec::is_empty);
        if usage_only {
            return if self.exchange.strip_usage {
                EventAction::Drop
            } else {
                EventAction::Pass
            };
        }
        if self.exchange.chain.wants_chunks() {
            let view = ChunkView {
                index,
                content_delta,
                reasoning_delta,
                finish_reason,
            };
            let verdict = phases::on_chunk(&self.exchange.chain, &mut self.exchange.ctx, &view);
            self.exchange.settlement.collect(&mut self.exchange.ctx);
            if let Err(e) = verdict {
                return EventAction::Fail(e);
            }
        }
        EventAction::Pass
    }

    fn on_done(&mut self) -> Option<GatewayError> {
        if !self.exchange.chain.wants_response() {
            return None;
        }
        let response = self.acc.view();
        let verdict = phases::on_response(
            &self.exchange.chain,
            &mut self.exchange.ctx,
            &self.exchange.view,
            &response,
        );
        self.exchange.settlement.collect(&mut self.exchange.ctx);
        verdict.err()
    }
}

/// A non-streamed exchange through the response hooks: call the engine,
/// read the whole answer, let the chain accept, reject or ask for a retry
/// with feedback (bounded by `max_retries`).
#[allow(clippy::too_many_arguments)]
pub async fn buffered(
    pool: &Arc<Pool>,
    path: &str,
    headers: &http::HeaderMap,
    mut body: Value,
    mut exchange: Exchange,
    max_retries: u32,
    ids: &RequestIds,
    call: &upstream::EngineCall,
    rec: &mut Recorder,
) -> Result<Response<ProxyBody>, GatewayError> {
    let mut used: u32 = 0;
    let mut attempt = 0u32;
    loop {
        let bytes = Bytes::from(
            serde_json::to_vec(&body).map_err(|e| GatewayError::Internal(e.to_string()))?,
        );
        let up = pool.send(path, headers, bytes, call, ids).await?;
        let span = up.span.clone();
        exchange.settlement.engine_called();
        let deadline = up
            .deadline
            .unwrap_or_else(|| tokio::time::Instant::now() + pool.request_timeout());
        let mut answer = up.first.map(|b| b.to_vec()).unwrap_or_default();
        let rest =
            tokio::time::timeout_at(deadline, Limited::new(up.body, MAX_ANSWER_BYTES).collect())
                .await
                .map_err(|_| GatewayError::EngineTimeout {
                    pool: pool.name.clone(),
                    phase: crate::errors::TimeoutPhase::WholeRequest,
                    after: pool.request_timeout(),
                })
                .and_then(|r| {
                    r.map_err(|e| GatewayError::EngineStreamBroken {
                        pool: pool.name.clone(),
                        reason: e.to_string(),
                    })
                })
                .inspect_err(|e| crate::telemetry::record_error(&span, e))?;
        answer.extend_from_slice(&rest.to_bytes());
        drop(up.lease);
        if let Some(renamed) = upstream::normalize_reasoning(&answer) {
            answer = renamed.to_vec();
        }
        let parsed: Value = match serde_json::from_slice(&answer) {
            Ok(v) => v,
            Err(e) => {
                let err = GatewayError::EngineFailed {
                    pool: pool.name.clone(),
                    status: up.parts.status,
                    message: format!("the engine's answer is not JSON: {e}"),
                };
                crate::telemetry::record_error(&span, &err);
                return Err(err);
            }
        };
        let mut facts = crate::telemetry::genai::ResponseFacts::default();
        facts.observe_json(&parsed);
        crate::telemetry::genai::record(&span, &facts);
        drop(span);
        if let Some(u) = view::usage_of(&parsed) {
            rec.usage(u);
            used = used.saturating_add(u.input_tokens.saturating_add(u.output_tokens));
            exchange.settlement.used(used);
        }
        let outcome = if exchange.chain.wants_response() {
            let response = view::response_view(&parsed, attempt);
            phases::on_response(
                &exchange.chain,
                &mut exchange.ctx,
                &exchange.view,
                &response,
            )?
        } else {
            ResponseOutcome::Accept
        };
        match outcome {
            ResponseOutcome::Accept => {
                let mut parts = up.parts;
                for name in upstream::HOP_BY_HOP {
                    parts.headers.remove(*name);
                }
                parts.headers.remove(header::CONTENT_LENGTH);
                parts.headers.insert(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("application/json"),
                );
                return Ok(Response::from_parts(parts, body::full(answer)));
            }
            ResponseOutcome::Retry(feedback) => {
                let messages = body.get_mut("messages").and_then(Value::as_array_mut);
                let Some(messages) = messages.filter(|_| attempt < max_retries) else {
                    return Err(GatewayError::PluginRejected {
                        plugin: "output".into(),
                        status: http::StatusCode::UNPROCESSABLE_ENTITY,
                        code: "output_validation_failed".into(),
                        message: format!(
                            "the answer was still refused after {attempt} retries: {feedback}"
                        ),
                        retry_after: None,
                    });
                };
                let previous = parsed
                    .pointer("/choices/0/message")
                    .cloned()
                    .unwrap_or_else(|| json!({"role": "assistant", "content": ""}));
                // Answer each tool call with the feedback (the protocol wants
                // a tool message per call); plain answers get a user message.
                let call_ids: Vec<String> = previous
                    .get("tool_calls")
                    .and_then(Value::as_array)
                    .map(|calls| {
                        calls
                            .iter()
                            .filter_map(|c| c.get("id").and_then(Value::as_str).map(str::to_owned))
                            .collect()
                    })
                    .unwrap_or_default();
                messages.push(previous);
                if call_ids.is_empty() {
                    messages.push(json!({"role": "user", "content": feedback}));
                } else {
                    for id in call_ids {
                        messages
                            .push(json!({"role": "tool", "tool_call_id": id, "content": feedback}));
                    }
                }
                attempt += 1;
                tracing::info!(attempt, trace_id = %ids.trace_id, "response hook asked for a retry");
            }
        }
    }
}
