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

const DONE_MARKER: &[u8] = b"data: [DONE]";

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
}

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
            guards,
        }
    }
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
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let mut this = self.project();
        if *this.done {
            return Poll::Ready(None);
        }
        if let Some(first) = this.first.take() {
            remember_tail(this.tail, &first);
            return Poll::Ready(Some(Ok(Frame::data(first))));
        }
        match this.inner.as_mut().poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(d) = frame.data_ref() {
                    remember_tail(this.tail, d);
                }
                this.timer
                    .as_mut()
                    .reset(next_wake(*this.idle, *this.deadline));
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => {
                let err = GatewayError::EngineStreamBroken {
                    pool: this.pool.clone(),
                    reason: e.to_string(),
                };
                *this.done = true;
                Poll::Ready(Some(fail(err, *this.sse, this.trace_id)))
            }
            Poll::Ready(None) => {
                *this.done = true;
                if *this.sse && !ends_with_done(this.tail) {
                    let err = GatewayError::EngineStreamBroken {
                        pool: this.pool.clone(),
                        reason: "the stream ended without `data: [DONE]`".into(),
                    };
                    return Poll::Ready(Some(fail(err, true, this.trace_id)));
                }
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
                Poll::Ready(Some(fail(err, *this.sse, this.trace_id)))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.done
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::default()
    }
}

fn fail(err: GatewayError, sse: bool, trace_id: &str) -> Result<Frame<Bytes>, BoxError> {
    tracing::warn!(layer = err.layer().as_str(), error = %err, trace_id, "stream failed after the first byte");
    if sse {
        Ok(Frame::data(err.sse_event(trace_id)))
    } else {
        Err(Box::new(err))
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
