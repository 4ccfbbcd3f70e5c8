//! Running a tenant's chain at each phase of the exchange, with the failure
//! policies applied, and settling token reservations when it ends.

use http::{HeaderMap, StatusCode};
use serde_json::Value;

use super::bindings::{
    ChunkVerdict, ChunkView, Rejection, RequestDecision, RequestView, ResponseVerdict, ResponseView,
};
use super::chain::{Chain, Entry, FailurePolicy, Fault};
use super::host::CallCtx;
use super::limiter::Reservation;
use super::view::{self, ViewInput};
use crate::errors::GatewayError;

/// Longest rejection message relayed from a plugin.
const MAX_MESSAGE: usize = 4096;

fn rejected(entry: &Entry, r: Rejection) -> GatewayError {
    let status = StatusCode::from_u16(r.status)
        .ok()
        .filter(|s| s.is_client_error() || s.is_server_error());
    let Some(status) = status else {
        let fault = Fault::BadDecision(format!("rejection status {} is not 4xx/5xx", r.status));
        entry.count_fault(&fault);
        return GatewayError::PluginFailed {
            plugin: entry.name.to_string(),
            fault,
        };
    };
    let mut message = r.message;
    crate::errors::truncate_utf8(&mut message, MAX_MESSAGE);
    let code: String = r
        .code
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || *c == '_' || *c == '-')
        .take(64)
        .collect();
    let code = if code.is_empty() {
        "rejected_by_policy".into()
    } else {
        code
    };
    entry.count_rejection(&code);
    GatewayError::PluginRejected {
        plugin: entry.name.to_string(),
        status,
        code,
        message,
        retry_after: r.retry_after_secs,
    }
}

/// A failed call: fail-closed refuses, fail-open goes on.
fn failed(entry: &Entry, fault: Fault) -> Result<(), GatewayError> {
    entry.count_fault(&fault);
    if let Fault::NoCapacity(reason) = &fault {
        tracing::error!(plugin = %entry.name, %reason, "no plugin instance available");
        return match entry.failure {
            FailurePolicy::FailClosed => Err(GatewayError::Overloaded { retry_after: 1 }),
            FailurePolicy::FailOpen => Ok(()),
        };
    }
    match entry.failure {
        FailurePolicy::FailClosed => Err(GatewayError::PluginFailed {
            plugin: entry.name.to_string(),
            fault,
        }),
        FailurePolicy::FailOpen => {
            tracing::warn!(plugin = %entry.name, error = %fault, "plugin failed; fail-open: continuing");
            Ok(())
        }
    }
}

/// The request after the on-request phase.
pub struct RequestOutcome {
    /// The body was changed and must be re-serialised.
    pub modified: bool,
    /// A plugin routed the request to this pool: (pool, plugin).
    pub pool: Option<(String, String)>,
    /// The final view, for the response phase.
    pub view: RequestView,
}

/// Run every `on-request` hook in order.
pub fn on_request(
    chain: &Chain,
    ctx: &mut CallCtx,
    body: &mut Value,
    headers: &mut HeaderMap,
    input: &ViewInput<'_>,
) -> Result<RequestOutcome, GatewayError> {
    let mut view = view::request_view(body, input);
    let mut modified = false;
    let mut pool = None;
    let mut raw: Option<String> = None;
    for entry in &chain.entries {
        if !entry.info.wants_request {
            continue;
        }
        let decision = if entry.info.wants_raw_json {
            let mut v = view.clone();
            v.raw_json = Some(raw.get_or_insert_with(|| body.to_string()).clone());
            entry.on_request(ctx, &v)
        } else {
            entry.on_request(ctx, &view)
        };
        match decision {
            Ok(RequestDecision::Continue) => {}
            Ok(RequestDecision::Reject(r)) => return Err(rejected(entry, r)),
            Ok(RequestDecision::Modify(ops)) => {
                if ops.is_empty() {
                    continue;
                }
                match view::apply(body, headers, ops) {
                    Ok(effects) => {
                        if let Some(p) = effects.pool {
                            pool = Some((p, entry.name.to_string()));
                        }
                        modified = true;
                        raw = None;
                        let pool_name = pool.as_ref().map_or(input.pool, |(p, _)| p.as_str());
                        view = view::request_view(
                            body,
                            &ViewInput {
                                pool: pool_name,
                                ..*input
                            },
                        );
                    }
                    Err(m) => failed(entry, Fault::BadDecision(m))?,
                }
            }
            Err(fault) => failed(entry, fault)?,
        }
    }
    Ok(RequestOutcome {
        modified,
        pool,
        view,
    })
}

/// What the response phase decided.
pub enum ResponseOutcome {
    Accept,
    /// Ask the engine again with this feedback (non-streaming only).
    Retry(String),
}

/// Run every `on-response` hook in order; the first that does not accept wins.
pub fn on_response(
    chain: &Chain,
    ctx: &mut CallCtx,
    request: &RequestView,
    response: &ResponseView,
) -> Result<ResponseOutcome, GatewayError> {
    for entry in &chain.entries {
        if !entry.info.wants_response {
            continue;
        }
        match entry.on_response(ctx, request, response) {
            Ok(ResponseVerdict::Accept) => {}
            Ok(ResponseVerdict::Reject(r)) => return Err(rejected(entry, r)),
            Ok(ResponseVerdict::Retry(feedback)) => {
                if response.streamed {
                    failed(
                        entry,
                        Fault::BadDecision("asked to retry a streamed answer".into()),
                    )?;
                } else {
                    return Ok(ResponseOutcome::Retry(feedback));
                }
            }
            Err(fault) => failed(entry, fault)?,
        }
    }
    Ok(ResponseOutcome::Accept)
}

/// Run every `on-response-chunk` hook on one chunk.
pub fn on_chunk(chain: &Chain, ctx: &mut CallCtx, chunk: &ChunkView) -> Result<(), GatewayError> {
    for entry in &chain.entries {
        if !entry.info.wants_chunks {
            continue;
        }
        match entry.on_chunk(ctx, chunk) {
            Ok(ChunkVerdict::Accept) => {}
            Ok(ChunkVerdict::Reject(r)) => return Err(rejected(entry, r)),
            Err(fault) => failed(entry, fault)?,
        }
    }
    Ok(())
}

/// Token reservations of one exchange, settled once when it ends: against the
/// engine's usage when known; otherwise kept as charged if the engine was
/// called (it may have done the work), or given back if it never was.
#[derive(Default)]
pub struct Settlement {
    reservations: Vec<Reservation>,
    used: Option<u32>,
    engine_called: bool,
}

impl Settlement {
    /// Take over the reservations a hook call made.
    pub fn collect(&mut self, ctx: &mut CallCtx) {
        self.reservations.append(&mut ctx.reservations);
    }

    pub fn is_empty(&self) -> bool {
        self.reservations.is_empty()
    }

    pub fn engine_called(&mut self) {
        self.engine_called = true;
    }

    /// The engine's usage, input + output tokens.
    pub fn used(&mut self, tokens: u32) {
        self.used = Some(tokens);
    }
}

impl Drop for Settlement {
    fn drop(&mut self) {
        for r in self.reservations.drain(..) {
            let used = match (self.used, self.engine_called) {
                (Some(u), _) => u,
                (None, true) => r.reserved(),
                (None, false) => 0,
            };
            r.settle(used);
        }
    }
}
