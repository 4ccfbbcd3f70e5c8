//! The host side of `sluice:policy/host`: what a plugin may ask of sluice.
//! One [`HostState`] per wasm store; the per-call part is set before each
//! hook call and taken back after it.

use std::num::NonZeroUsize;
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::Duration;

use wasmtime::StoreLimits;

use super::bindings::{Level, LimitOutcome, Scope, sluice};
use super::limiter::{BucketKey, Limiters, Outcome, Reservation};

/// What a call needs to know about its request.
#[derive(Debug, Default)]
pub struct CallCtx {
    pub key_id: String,
    pub trace_id: String,
    /// Token reservations made during the call, settled by the pipeline.
    pub reservations: Vec<Reservation>,
    /// The calling thread's CPU time when the call began.
    pub(super) cpu_start: Duration,
}

impl CallCtx {
    pub fn new(key_id: String, trace_id: String) -> CallCtx {
        CallCtx {
            key_id,
            trace_id,
            ..CallCtx::default()
        }
    }
}

/// CPU time consumed by the current thread. A hook call runs on one thread
/// from start to end (calls are synchronous), so the difference between two
/// readings is the CPU the call used — unlike wall time, it does not grow
/// while a busy machine has the thread descheduled.
pub(super) fn thread_cpu_now() -> Duration {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_THREAD_CPUTIME_ID)
        .map(Duration::from)
        .unwrap_or_default()
}

pub struct HostState {
    pub(super) limits: StoreLimits,
    pub(super) tenant: Arc<str>,
    pub(super) plugin: Arc<str>,
    pub(super) config: Arc<str>,
    pub(super) limiters: Arc<Limiters>,
    pub(super) metrics: Arc<crate::telemetry::metrics::Metrics>,
    pub(super) call: CallCtx,
}

impl HostState {
    fn key(&self, name: String, scope: Scope, per_minute: u32, burst: u32) -> BucketKey {
        BucketKey {
            tenant: self.tenant.clone(),
            plugin: self.plugin.clone(),
            name,
            key_id: matches!(scope, Scope::PerKey).then(|| self.call.key_id.clone()),
            per_minute,
            burst,
        }
    }
}

fn outcome(o: Outcome) -> LimitOutcome {
    LimitOutcome {
        allowed: o.allowed,
        retry_after_ms: u64::try_from(o.retry_after.as_millis()).unwrap_or(u64::MAX),
    }
}

/// Longest log line a plugin may write; the rest is cut.
const MAX_LOG_BYTES: usize = 2048;

impl sluice::policy::host::Host for HostState {
    fn take_requests(
        &mut self,
        name: String,
        scope: Scope,
        per_minute: u32,
        burst: u32,
        units: u32,
    ) -> LimitOutcome {
        let span = limiter_span("take-requests", &name, per_minute, burst, units);
        let key = self.key(name, scope, per_minute, burst);
        let o = self.limiters.take_requests(key, units);
        record_limit(&span, &o);
        if !o.allowed {
            tracing::debug!(tenant = %self.tenant, plugin = %self.plugin, retry_after_ms = o.retry_after.as_millis() as u64, "request bucket refused");
            self.metrics
                .limiter_rejection(&self.tenant, &self.plugin, "requests");
        }
        outcome(o)
    }

    fn reserve_tokens(
        &mut self,
        name: String,
        scope: Scope,
        per_minute: u32,
        burst: u32,
        estimate: u32,
    ) -> LimitOutcome {
        let span = limiter_span("reserve-tokens", &name, per_minute, burst, estimate);
        let key = self.key(name, scope, per_minute, burst);
        let (o, reservation) = self.limiters.reserve_tokens(key, estimate);
        record_limit(&span, &o);
        if !o.allowed {
            self.metrics
                .limiter_rejection(&self.tenant, &self.plugin, "tokens");
        }
        if let Some(r) = reservation {
            self.call.reservations.push(r);
        }
        outcome(o)
    }

    fn estimate_tokens(&mut self, text: String) -> u32 {
        crate::tokens::estimate(&text)
    }

    fn now_ms(&mut self) -> u64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0)
    }

    fn log(&mut self, level: Level, message: String) {
        let mut message = message;
        crate::errors::truncate_utf8(&mut message, MAX_LOG_BYTES);
        let (tenant, plugin, trace_id) = (&*self.tenant, &*self.plugin, &self.call.trace_id);
        match level {
            Level::Debug => tracing::debug!(tenant, plugin, trace_id, "{message}"),
            Level::Info => tracing::info!(tenant, plugin, trace_id, "{message}"),
            Level::Warn => tracing::warn!(tenant, plugin, trace_id, "{message}"),
            Level::Error => tracing::error!(tenant, plugin, trace_id, "{message}"),
        }
    }

    fn config(&mut self) -> String {
        self.config.to_string()
    }

    fn validate_json(&mut self, schema: String, instance: String) -> Result<(), String> {
        let validator = compiled_schema(&schema)?;
        let value: serde_json::Value =
            serde_json::from_str(&instance).map_err(|e| format!("not valid JSON: {e}"))?;
        let errors: Vec<String> = validator
            .iter_errors(&value)
            .take(5)
            .map(|e| {
                let at = e.instance_path().to_string();
                if at.is_empty() {
                    e.to_string()
                } else {
                    format!("at {at}: {e}")
                }
            })
            .collect();
        if errors.is_empty() {
            Ok(())
        } else {
            Err(errors.join("; "))
        }
    }
}

impl sluice::policy::types::Host for HostState {}

/// Schemas repeat (the same tool on every request): compile each once.
fn compiled_schema(schema: &str) -> Result<Arc<jsonschema::Validator>, String> {
    type Cache = Mutex<lru::LruCache<String, Arc<jsonschema::Validator>>>;
    static CACHE: OnceLock<Cache> = OnceLock::new();
    let cache = CACHE.get_or_init(|| {
        Mutex::new(lru::LruCache::new(
            NonZeroUsize::new(256).expect("nonzero literal"),
        ))
    });
    if let Some(v) = cache
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .get(schema)
    {
        return Ok(v.clone());
    }
    let parsed: serde_json::Value =
        serde_json::from_str(schema).map_err(|e| format!("the schema is not valid JSON: {e}"))?;
    let validator = Arc::new(
        jsonschema::validator_for(&parsed).map_err(|e| format!("invalid JSON schema: {e}"))?,
    );
    cache
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .put(schema.to_owned(), validator.clone());
    Ok(validator)
}

/// Epoch ticks (of [`super::EPOCH_TICK`] wall time) until the next CPU check.
pub(super) fn deadline_ticks(timeout: Duration) -> u64 {
    (timeout.as_micros() / super::EPOCH_TICK.as_micros()).max(1) as u64
}

/// A limiter decision, as a child of the plugin call that asked for it.
fn limiter_span(op: &str, bucket: &str, per_minute: u32, burst: u32, units: u32) -> tracing::Span {
    tracing::info_span!(
        target: crate::telemetry::TRACE_TARGET,
        "limiter",
        otel.name = %format_args!("limiter {op}"),
        sluice.limiter.bucket = bucket,
        sluice.limiter.per_minute = per_minute,
        sluice.limiter.burst = burst,
        sluice.limiter.units = units,
        sluice.limiter.allowed = tracing::field::Empty,
        sluice.limiter.retry_after_ms = tracing::field::Empty,
    )
}

fn record_limit(span: &tracing::Span, o: &super::limiter::Outcome) {
    span.record("sluice.limiter.allowed", o.allowed);
    if !o.allowed {
        span.record(
            "sluice.limiter.retry_after_ms",
            o.retry_after.as_millis() as u64,
        );
    }
}
