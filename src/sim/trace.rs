//! The simulated engine's own spans, as vLLM exports them: one
//! `llm_request` server span per generation, continuing the caller's
//! `traceparent`, with `queue`, `prefill` and `decode` children. Exported by
//! their own tracer (service `vllm-sim` unless `OTEL_SERVICE_NAME` says
//! otherwise), so a trace shows the engine as a layer of its own.

use std::sync::{Mutex, OnceLock, PoisonError};
use std::time::SystemTime;

use opentelemetry::trace::{Span as _, SpanKind, TraceContextExt as _, Tracer as _};
use opentelemetry::{Context, KeyValue};
use opentelemetry_sdk::trace::Tracer;

static TRACER: OnceLock<Tracer> = OnceLock::new();

/// Export the simulated engine's spans with this tracer (once per process).
pub fn install(tracer: Tracer) {
    let _ = TRACER.set(tracer);
}

/// When each phase of one generation began, and how it ended.
pub(crate) struct Timeline {
    parent: Context,
    model: String,
    marks: Mutex<Marks>,
}

#[derive(Default)]
struct Marks {
    arrival: Option<SystemTime>,
    admitted: Option<SystemTime>,
    first_token: Option<SystemTime>,
    done: bool,
}

impl Timeline {
    /// `None` when no tracer is installed (nothing is recorded then).
    pub(crate) fn start(headers: &http::HeaderMap, model: &str) -> Option<Timeline> {
        TRACER.get()?;
        let parent = crate::telemetry::RequestIds::parent_context(headers);
        Some(Timeline {
            parent,
            model: model.to_owned(),
            marks: Mutex::new(Marks {
                arrival: Some(SystemTime::now()),
                ..Marks::default()
            }),
        })
    }

    fn marks(&self) -> std::sync::MutexGuard<'_, Marks> {
        self.marks.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub(crate) fn admitted(&self) {
        self.marks().admitted.get_or_insert_with(SystemTime::now);
    }

    pub(crate) fn first_token(&self) {
        self.marks().first_token.get_or_insert_with(SystemTime::now);
    }

    /// Emit the spans; `finish` is vLLM's finish reason or `aborted`.
    pub(crate) fn finish(&self, finish: &str, prompt_tokens: usize, output_tokens: usize) {
        let Some(tracer) = TRACER.get() else { return };
        let mut m = self.marks();
        if m.done {
            return;
        }
        m.done = true;
        let end = SystemTime::now();
        let arrival = m.arrival.unwrap_or(end);
        let mut root = tracer
            .span_builder("llm_request")
            .with_kind(SpanKind::Server)
            .with_start_time(arrival)
            .with_attributes([
                KeyValue::new("gen_ai.request.model", self.model.clone()),
                KeyValue::new("gen_ai.response.finish_reasons", finish.to_owned()),
                KeyValue::new("gen_ai.usage.input_tokens", prompt_tokens as i64),
                KeyValue::new("gen_ai.usage.output_tokens", output_tokens as i64),
            ])
            .start_with_context(tracer, &self.parent);
        if finish == "aborted" {
            root.set_status(opentelemetry::trace::Status::error("generation aborted"));
        }
        let cx = self.parent.with_span(root);
        let phases = [
            ("queue", Some(arrival), m.admitted),
            ("prefill", m.admitted, m.first_token),
            ("decode", m.first_token, Some(end)),
        ];
        for (name, from, to) in phases {
            if let (Some(from), Some(to)) = (from, to.or(Some(end))) {
                let mut s = tracer
                    .span_builder(name)
                    .with_start_time(from)
                    .start_with_context(tracer, &cx);
                s.end_with_timestamp(to);
            }
        }
        cx.span().end_with_timestamp(end);
    }
}

/// A generation that ended without a word (the gateway gave up, the client
/// left, an error before it began) still shows in the trace, as aborted.
impl Drop for Timeline {
    fn drop(&mut self) {
        self.finish("aborted", 0, 0);
    }
}
