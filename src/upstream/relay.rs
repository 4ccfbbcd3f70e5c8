//! Relays an engine's response body to the client frame by frame, as it
//! arrives: nothing is buffered, and hyper polls the engine only as fast as
//! the client reads (backpressure). When the client goes away hyper drops
//! this body, which drops the engine connection and so cancels generation.
//!
//! Failures after the first byte cannot change the status line any more: for
//! SSE they end the stream with an error event; other bodies are aborted.

use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use pin_project_lite::pin_project;
use tokio::time::{Instant, Sleep};

use crate::body::BoxError;
use crate::errors::{GatewayError, TimeoutPhase};
use crate::telemetry::genai::{self, ResponseFacts};
use crate::telemetry::metrics::Recorder;

const DONE_MARKER: &[u8] = b"data: [DONE]";

/// Sees each SSE event of a stream as it passes (plugins' chunk and response
/// hooks, usage accounting). Events are cut at their blank line, so a hook
/// always gets whole events however the engine split its writes.
pub trait EventHook: Send {
    /// One event's `data:` payload (not `[DONE]`).
    fn on_event(&mut self, data: &[u8]) -> EventAction;
    /// The engine sent `[DONE]`. `Some(error)` replaces it (as an error event).
    fn on_done(&mut self) -> Option<GatewayError>;
}

pub enum EventAction {
    /// Relay the event.
    Pass,
    /// Leave it out (e.g. a usage chunk the client did not ask for).
    Drop,
    /// End the stream with this error's event instead.
    Fail(GatewayError),
}

/// Most bytes one SSE event may have before the relay gives up parsing it.
const MAX_EVENT_BYTES: usize = 4 << 20;

pin_project! {
    pub struct Relay<G> {
        first: Option<Bytes>,
        #[pin]
        inner: Incoming,
        #[pin]
        timer: Sleep,
        idle: Duration,
        deadline: Option<Instant>,
        sse: bool,
        // The last bytes seen, to tell whether an SSE stream ended with [DONE].
        tail: Vec<u8>,
        done: bool,
        pool: String,
        trace_id: String,
        hook: Option<Box<dyn EventHook>>,
        normalize: bool,
        // Bytes of an event not yet complete (only with a hook).
        partial: Vec<u8>,
        // The server span and the engine attempt's span: failures and what
        // the answer said of itself are recorded on them.
        spans: [tracing::Span; 2],
        facts: ResponseFacts,
        // A plain (JSON) answer, kept up to MAX_FACTS_JSON for its facts.
        json: Option<Vec<u8>>,
        // Records the request when the body ends or is dropped.
        metrics: Recorder,
        // Held until the body ends or is dropped: replica lease, tenant and
        // gateway permits.
        guards: G,
    }
}

/// How a relay watches its stream.
pub struct RelayOptions {
    /// Longest silence between two chunks.
    pub idle: Duration,
    /// Absolute end for non-streaming answers.
    pub deadline: Option<Instant>,
    /// The body is SSE: failures become a final error event.
    pub sse: bool,
    pub pool: String,
    pub trace_id: String,
    /// Rename `reasoning` to `reasoning_content` (see `normalize_reasoning`).
    pub normalize_reasoning: bool,
    /// The server span and the engine attempt's span.
    pub spans: [tracing::Span; 2],
    /// The request's metrics, recorded when the relay ends.
    pub metrics: Recorder,
}

/// A plain answer larger than this is relayed without reading its facts.
const MAX_FACTS_JSON: usize = 256 << 10;

impl<G> Relay<G> {
    pub fn new(first: Option<Bytes>, inner: Incoming, opts: RelayOptions, guards: G) -> Self {
        let at = next_wake(opts.idle, opts.deadline);
        Relay {
            first,
            inner,
            timer: tokio::time::sleep_until(at),
            idle: opts.idle,
            deadline: opts.deadline,
            sse: opts.sse,
            tail: Vec::new(),
            done: false,
            pool: opts.pool,
            trace_id: opts.trace_id,
            hook: None,
            normalize: opts.normalize_reasoning,
            partial: Vec::new(),
            json: (!opts.sse && crate::telemetry::otel::enabled()).then(Vec::new),
            spans: opts.spans,
            facts: ResponseFacts::default(),
            metrics: opts.metrics,
            guards,
        }
    }

    /// Inspect the SSE events on their way (see [`EventHook`]).
    pub fn with_hook(mut self, hook: Box<dyn EventHook>) -> Self {
        self.hook = Some(hook);
        self
    }
}

/// Split complete events off `partial`, run the hook on each, and return the
/// bytes to relay, plus the error the stream must end with after them.
fn run_hook(
    hook: &mut dyn EventHook,
    partial: &mut Vec<u8>,
    data: &[u8],
    trace_id: &str,
) -> (Bytes, Option<GatewayError>) {
    partial.extend_from_slice(data);
    let mut out = Vec::with_capacity(partial.len());
    let mut start = 0;
    while let Some(end) = find_event_end(&partial[start..]) {
        let event = &partial[start..start + end];
        start += end;
        let payload = event_data(event);
        match payload {
            Some(p) if p.trim_ascii() == b"[DONE]" => match hook.on_done() {
                Some(err) => {
                    out.extend_from_slice(&err.sse_event(trace_id));
                    partial.clear();
                    return (Bytes::from(out), Some(err));
                }
                None => out.extend_from_slice(event),
            },
            Some(p) => match hook.on_event(p) {
                EventAction::Pass => out.extend_from_slice(event),
                EventAction::Drop => {}
                EventAction::Fail(err) => {
                    out.extend_from_slice(&err.sse_event(trace_id));
                    partial.clear();
                    return (Bytes::from(out), Some(err));
                }
            },
            None => out.extend_from_slice(event),
        }
    }
    partial.drain(..start);
    if partial.len() > MAX_EVENT_BYTES {
        // Not SSE as we know it: stop inspecting, relay as is.
        out.append(partial);
    }
    (Bytes::from(out), None)
}

/// Length of the first complete event (through its blank line), if any.
fn find_event_end(buf: &[u8]) -> Option<usize> {
    let mut i = 0;
    while i + 1 < buf.len() {
        if buf[i] == b'\n' && buf[i + 1] == b'\n' {
            return Some(i + 2);
        }
        if i + 3 < buf.len() && &buf[i..i + 4] == b"\r\n\r\n" {
            return Some(i + 4);
        }
        i += 1;
    }
    None
}

/// The `data:` payload of one event (single-line data, as engines send).
fn event_data(event: &[u8]) -> Option<&[u8]> {
    event.split(|b| *b == b'\n').find_map(|line| {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        line.strip_prefix(b"data:")
            .map(|d| d.strip_prefix(b" ").unwrap_or(d))
    })
}

fn next_wake(idle: Duration, deadline: Option<Instant>) -> Instant {
    let at = Instant::now() + idle;
    match deadline {
        Some(d) if d < at => d,
        _ => at,
    }
}

impl<G> Body for Relay<G> {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let normalize = self.normalize;
        let polled = self.as_mut().poll_inner(cx);
        if !normalize {
            return polled;
        }
        polled.map(|item| {
            item.map(|res| {
                res.map(|frame| {
                    match frame
                        .data_ref()
                        .and_then(|d| crate::upstream::normalize_reasoning(d))
                    {
                        Some(renamed) => Frame::data(renamed),
                        None => frame,
                    }
                })
            })
        })
    }

    fn is_end_stream(&self) -> bool {
        self.done
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::default()
    }
}

impl<G> Relay<G> {
    fn poll_inner(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let mut this = self.project();
        if *this.done {
            return Poll::Ready(None);
        }
        // Hooks and limiters called from here belong to this exchange's trace.
        let _in_span = this.spans[0].enter();
        if let Some(first) = this.first.take() {
            this.metrics.first_chunk();
            this.metrics.bytes(&first);
            remember_tail(this.tail, &first);
            observe(this.facts, this.json, *this.sse, &first);
            if let Some(hook) = this.hook.as_mut() {
                let (out, failed) = run_hook(hook.as_mut(), this.partial, &first, this.trace_id);
                if let Some(err) = failed {
                    *this.done = true;
                    hook_failed(&err, this.spans, this.metrics);
                }
                return Poll::Ready(Some(Ok(Frame::data(out))));
            }
            return Poll::Ready(Some(Ok(Frame::data(first))));
        }
        match this.inner.as_mut().poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(d) = frame.data_ref() {
                    this.metrics.bytes(d);
                    remember_tail(this.tail, d);
                    observe(this.facts, this.json, *this.sse, d);
                }
                this.timer
                    .as_mut()
                    .reset(next_wake(*this.idle, *this.deadline));
                if let (Some(hook), Some(d)) = (this.hook.as_mut(), frame.data_ref()) {
                    let (out, failed) = run_hook(hook.as_mut(), this.partial, d, this.trace_id);
                    if let Some(err) = failed {
                        *this.done = true;
                        hook_failed(&err, this.spans, this.metrics);
                    }
                    return Poll::Ready(Some(Ok(Frame::data(out))));
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => {
                let err = GatewayError::EngineStreamBroken {
                    pool: this.pool.clone(),
                    reason: e.to_string(),
                };
                *this.done = true;
                Poll::Ready(Some(fail(
                    err,
                    *this.sse,
                    this.trace_id,
                    this.spans,
                    this.metrics,
                )))
            }
            Poll::Ready(None) => {
                *this.done = true;
                if let Some(json) = this.json.take()
                    && let Ok(doc) = serde_json::from_slice(&json)
                {
                    this.facts.observe_json(&doc);
                }
                genai::record(&this.spans[1], this.facts);
                // An event the engine did not close with a blank line: end it
                // here so the hook (and [DONE] handling) still sees it.
                if let Some(hook) = this.hook.as_mut()
                    && !this.partial.is_empty()
                {
                    let (out, failed) =
                        run_hook(hook.as_mut(), this.partial, b"\n\n", this.trace_id);
                    this.partial.clear();
                    if !out.is_empty() {
                        match failed {
                            Some(err) => hook_failed(&err, this.spans, this.metrics),
                            None => this.metrics.completed(),
                        }
                        return Poll::Ready(Some(Ok(Frame::data(out))));
                    }
                }
                if *this.sse && !ends_with_done(this.tail) {
                    let err = GatewayError::EngineStreamBroken {
                        pool: this.pool.clone(),
                        reason: "the stream ended without `data: [DONE]`".into(),
                    };
                    return Poll::Ready(Some(fail(
                        err,
                        true,
                        this.trace_id,
                        this.spans,
                        this.metrics,
                    )));
                }
                this.metrics.completed();
                Poll::Ready(None)
            }
            Poll::Pending => {
                ready!(this.timer.as_mut().poll(cx));
                let whole = this.deadline.is_some_and(|d| Instant::now() >= d);
                let err = GatewayError::EngineTimeout {
                    pool: this.pool.clone(),
                    phase: if whole {
                        TimeoutPhase::WholeRequest
                    } else {
                        TimeoutPhase::BetweenChunks
                    },
                    after: *this.idle,
                };
                *this.done = true;
                Poll::Ready(Some(fail(
                    err,
                    *this.sse,
                    this.trace_id,
                    this.spans,
                    this.metrics,
                )))
            }
        }
    }
}

fn fail(
    err: GatewayError,
    sse: bool,
    trace_id: &str,
    spans: &[tracing::Span; 2],
    metrics: &mut Recorder,
) -> Result<Frame<Bytes>, BoxError> {
    metrics.failed(&err);
    tracing::warn!(layer = err.layer().as_str(), error = %err, trace_id, "stream failed after the first byte");
    for span in spans {
        crate::telemetry::record_error(span, &err);
    }
    if sse {
        Ok(Frame::data(err.sse_event(trace_id)))
    } else {
        Err(Box::new(err))
    }
}

/// A plugin ended the stream (a rejection or a fault at its end).
fn hook_failed(err: &GatewayError, spans: &[tracing::Span; 2], metrics: &mut Recorder) {
    metrics.failed(err);
    crate::telemetry::record_error(&spans[0], err);
}

fn observe(facts: &mut ResponseFacts, json: &mut Option<Vec<u8>>, sse: bool, data: &[u8]) {
    // Only span attributes come from here: nothing to read when not exporting.
    if sse && crate::telemetry::otel::enabled() {
        facts.observe_sse(data);
    } else if let Some(buf) = json {
        if buf.len() + data.len() <= MAX_FACTS_JSON {
            buf.extend_from_slice(data);
        } else {
            *json = None;
        }
    }
}

fn remember_tail(tail: &mut Vec<u8>, data: &[u8]) {
    const KEEP: usize = 32;
    tail.extend_from_slice(&data[data.len().saturating_sub(KEEP)..]);
    if tail.len() > KEEP {
        tail.drain(..tail.len() - KEEP);
    }
}

fn ends_with_done(tail: &[u8]) -> bool {
    let trimmed = tail.trim_ascii_end();
    trimmed.ends_with(DONE_MARKER)
}
