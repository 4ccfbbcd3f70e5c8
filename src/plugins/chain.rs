//! A tenant's chain: its plugins in order, each with its config, failure
//! policy, a few reusable instances and a circuit breaker.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use wasmtime::{Store, StoreLimitsBuilder, Trap, UpdateDeadline};

use super::bindings::{
    ChunkVerdict, ChunkView, PluginInfo, Policy, RequestDecision, RequestView, ResponseVerdict,
    ResponseView,
};
use super::host::{CallCtx, HostState, deadline_ticks, thread_cpu_now};
use super::{Compiled, LoadError, PluginEngine};

pub use crate::config::FailurePolicy;

/// How a plugin call failed. Always attributed to the plugin layer.
#[derive(Debug, Clone, thiserror::Error)]
pub enum Fault {
    #[error("ran past its {0:?} deadline")]
    Timeout(Duration),
    #[error("exceeded its memory limit of {0} bytes")]
    OutOfMemory(usize),
    #[error("overflowed its stack")]
    StackOverflow,
    #[error("trapped: {0}")]
    Trap(String),
    #[error("returned an invalid decision: {0}")]
    BadDecision(String),
    #[error("is suspended for {0:?} after repeated failures")]
    CircuitOpen(Duration),
    /// Not the plugin's doing: the host could not make an instance (the
    /// pool of instances is full).
    #[error("could not be instantiated: {0}")]
    NoCapacity(String),
}

impl Fault {
    pub fn code(&self) -> &'static str {
        match self {
            Fault::Timeout(_) => "plugin_timeout",
            Fault::OutOfMemory(_) => "plugin_out_of_memory",
            Fault::StackOverflow | Fault::Trap(_) => "plugin_trap",
            Fault::BadDecision(_) => "plugin_bad_decision",
            Fault::CircuitOpen(_) => "plugin_suspended",
            Fault::NoCapacity(_) => "plugin_capacity",
        }
    }
}

/// Failures in a row that open the breaker, and how long it stays open: a
/// plugin that keeps crashing is not called in a tight loop.
const BREAKER_THRESHOLD: u32 = 5;
const BREAKER_OPEN_FOR: Duration = Duration::from_secs(5);
/// Idle instances kept per chain entry, and calls before an instance is
/// replaced (bounds heap growth from guests that leak).
const MAX_IDLE: usize = 4;
const MAX_CALLS_PER_INSTANCE: u32 = 10_000;
/// A config refusal is shown to the tenant; a plugin cannot make it huge.
const MAX_REFUSAL_BYTES: usize = 2000;

struct Live {
    store: Store<HostState>,
    policy: Policy,
    calls: u32,
}

/// An entry's idle instances. The engine holds a weak reference to each
/// list, to take idle slots back when the pool is full.
pub(crate) struct Idle(Mutex<Vec<Live>>);

impl Idle {
    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Live>> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Drop one idle instance (its pool slot is freed with its store).
    pub(crate) fn evict_one(&self) -> bool {
        let live = self.lock().pop();
        live.is_some()
    }
}

/// Idle slots taken back from other entries when the pool is full: a few
/// at once, so the next instantiations do not each pay for a search.
const EVICT_BATCH: usize = 8;

/// One plugin in one tenant's chain.
pub struct Entry {
    pub name: Arc<str>,
    pub info: PluginInfo,
    pub failure: FailurePolicy,
    pub sha256: String,
    tenant: Arc<str>,
    config: Arc<str>,
    compiled: Arc<Compiled>,
    engine: Arc<PluginEngine>,
    idle: Arc<Idle>,
    failures: AtomicU32,
    open_until_ms: AtomicU64,
    epoch: Instant,
}

impl Entry {
    /// Instantiate once and ask the plugin to describe itself under its
    /// config: a plugin that refuses the config is [`LoadError::Config`].
    pub fn new(
        engine: &Arc<PluginEngine>,
        compiled: Arc<Compiled>,
        tenant: &str,
        config: &serde_json::Value,
        failure: FailurePolicy,
    ) -> Result<Entry, LoadError> {
        let mut entry = Entry {
            name: Arc::from("(loading)"),
            info: PluginInfo {
                name: String::new(),
                version: String::new(),
                wants_request: false,
                wants_chunks: false,
                wants_response: false,
                wants_raw_json: false,
            },
            failure,
            sha256: compiled.sha256.clone(),
            tenant: Arc::from(tenant),
            config: Arc::from(config.to_string()),
            compiled,
            engine: engine.clone(),
            idle: Arc::new(Idle(Mutex::new(Vec::new()))),
            failures: AtomicU32::new(0),
            open_until_ms: AtomicU64::new(0),
            epoch: Instant::now(),
        };
        let mut ctx = CallCtx::default();
        let info = entry
            .call(&mut ctx, |p, s| p.call_describe(s))
            .map_err(|f| LoadError::Describe(f.to_string()))?
            .map_err(|mut refusal| {
                crate::errors::truncate_utf8(&mut refusal, MAX_REFUSAL_BYTES);
                LoadError::Config(refusal)
            })?;
        entry.name = Arc::from(info.name.as_str());
        entry.info = info;
        // Instances made before the name was known carry the placeholder.
        entry.idle.lock().clear();
        engine.register_idle(&entry.idle);
        Ok(entry)
    }

    pub fn on_request(
        &self,
        ctx: &mut CallCtx,
        view: &RequestView,
    ) -> Result<RequestDecision, Fault> {
        let span = self.hook_span("on-request");
        let r = span.in_scope(|| {
            self.timed("on-request", || {
                self.call(ctx, |p, s| p.call_on_request(s, view))
            })
        });
        match &r {
            Ok(RequestDecision::Continue) => record_decision(&span, "continue", None),
            Ok(RequestDecision::Modify(_)) => record_decision(&span, "modify", None),
            Ok(RequestDecision::Reject(j)) => record_decision(&span, "reject", Some(&j.code)),
            Err(f) => record_fault(&span, f),
        }
        r
    }

    pub fn on_response(
        &self,
        ctx: &mut CallCtx,
        request: &RequestView,
        response: &ResponseView,
    ) -> Result<ResponseVerdict, Fault> {
        let span = self.hook_span("on-response");
        let r = span.in_scope(|| {
            self.timed("on-response", || {
                self.call(ctx, |p, s| p.call_on_response(s, request, response))
            })
        });
        match &r {
            Ok(ResponseVerdict::Accept) => record_decision(&span, "accept", None),
            Ok(ResponseVerdict::Reject(j)) => record_decision(&span, "reject", Some(&j.code)),
            Ok(ResponseVerdict::Retry(_)) => record_decision(&span, "retry", None),
            Err(f) => record_fault(&span, f),
        }
        r
    }

    /// One span per request-level hook call (chunk hooks, called per event,
    /// are not traced one by one).
    fn hook_span(&self, hook: &'static str) -> tracing::Span {
        tracing::info_span!(
            target: crate::telemetry::TRACE_TARGET,
            "plugin",
            otel.name = %format_args!("plugin {} {hook}", self.name),
            sluice.tenant = %self.tenant,
            sluice.plugin = %self.name,
            sluice.plugin.sha256 = %self.sha256,
            sluice.plugin.hook = hook,
            sluice.plugin.decision = tracing::field::Empty,
            sluice.plugin.rejection = tracing::field::Empty,
            sluice.error.layer = tracing::field::Empty,
            error.type = tracing::field::Empty,
            otel.status_code = tracing::field::Empty,
            otel.status_description = tracing::field::Empty,
        )
    }

    pub fn on_chunk(&self, ctx: &mut CallCtx, chunk: &ChunkView) -> Result<ChunkVerdict, Fault> {
        self.timed("on-response-chunk", || {
            self.call(ctx, |p, s| p.call_on_response_chunk(s, chunk))
        })
    }

    /// `sluice_plugin_call_seconds` for one hook call.
    fn timed<R>(&self, hook: &'static str, call: impl FnOnce() -> R) -> R {
        let started = Instant::now();
        let r = call();
        let metrics = &self.engine.metrics;
        metrics.plugin_call(&self.tenant, &self.name, hook, started.elapsed());
        r
    }

    /// `sluice_plugin_faults_total`: a failed call or an invalid decision.
    pub fn count_fault(&self, fault: &Fault) {
        self.engine
            .metrics
            .plugin_fault(&self.tenant, &self.name, fault);
    }

    /// `sluice_plugin_rejections_total`: the plugin rejected with `code`.
    pub fn count_rejection(&self, code: &str) {
        self.engine
            .metrics
            .plugin_rejection(&self.tenant, &self.name, code);
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    fn instantiate(&self) -> Result<Live, Fault> {
        let settings = &self.engine.settings;
        let state = HostState {
            limits: StoreLimitsBuilder::new()
                .memory_size(settings.max_memory)
                .instances(16)
                .tables(16)
                .memories(4)
                .trap_on_grow_failure(true)
                .build(),
            tenant: self.tenant.clone(),
            plugin: self.name.clone(),
            config: self.config.clone(),
            limiters: self.engine.limiters.clone(),
            metrics: self.engine.metrics.clone(),
            call: CallCtx::default(),
        };
        let mut store = Store::new(&self.engine.engine, state);
        store.limiter(|s| &mut s.limits);
        // The epoch ticks in wall time; when it fires, charge only the CPU the
        // call really used, so a loaded machine does not fail honest plugins.
        let timeout = settings.timeout;
        store.epoch_deadline_callback(move |ctx| {
            let used = thread_cpu_now().saturating_sub(ctx.data().call.cpu_start);
            if used >= timeout {
                Ok(UpdateDeadline::Interrupt)
            } else {
                Ok(UpdateDeadline::Continue(deadline_ticks(timeout - used)))
            }
        });
        store.data_mut().call.cpu_start = thread_cpu_now();
        store.set_epoch_deadline(deadline_ticks(settings.timeout));
        let policy = self.compiled.pre.instantiate(&mut store).map_err(|e| {
            // A trap in the guest's start-up is the plugin's; anything else
            // (the instance pool is full) is the host's.
            if e.downcast_ref::<Trap>().is_some() {
                self.classify(e)
            } else {
                Fault::NoCapacity(format!("{e:#}"))
            }
        })?;
        Ok(Live {
            store,
            policy,
            calls: 0,
        })
    }

    /// Run one hook under the deadline; reuse the instance if it stayed healthy.
    fn call<R>(
        &self,
        ctx: &mut CallCtx,
        f: impl FnOnce(&Policy, &mut Store<HostState>) -> wasmtime::Result<R>,
    ) -> Result<R, Fault> {
        let open_until = self.open_until_ms.load(Ordering::Relaxed);
        let now = self.now_ms();
        if open_until > now {
            return Err(Fault::CircuitOpen(Duration::from_millis(open_until - now)));
        }
        let pooled = self.idle.lock().pop();
        let mut live = match pooled {
            Some(l) => l,
            None => match self.instantiate().or_else(|fault| match fault {
                // Full pool: take idle slots back from other entries, once.
                Fault::NoCapacity(_) if self.engine.evict_idle(&self.idle, EVICT_BATCH) > 0 => {
                    self.instantiate()
                }
                other => Err(other),
            }) {
                Ok(l) => l,
                Err(fault) => {
                    if !matches!(fault, Fault::NoCapacity(_)) {
                        self.record_failure(&fault);
                    }
                    return Err(fault);
                }
            },
        };
        let data = live.store.data_mut();
        data.call.key_id = std::mem::take(&mut ctx.key_id);
        data.call.trace_id = std::mem::take(&mut ctx.trace_id);
        data.call.cpu_start = thread_cpu_now();
        live.store
            .set_epoch_deadline(deadline_ticks(self.engine.settings.timeout));
        let result = f(&live.policy, &mut live.store);
        let data = live.store.data_mut();
        ctx.key_id = std::mem::take(&mut data.call.key_id);
        ctx.trace_id = std::mem::take(&mut data.call.trace_id);
        ctx.reservations.append(&mut data.call.reservations);
        match result {
            Ok(r) => {
                self.failures.store(0, Ordering::Relaxed);
                live.calls += 1;
                if self.engine.settings.reuse_instances && live.calls < MAX_CALLS_PER_INSTANCE {
                    let mut idle = self.idle.lock();
                    if idle.len() < MAX_IDLE {
                        idle.push(live);
                    }
                }
                Ok(r)
            }
            // A trapped instance may hold broken state: it is dropped.
            Err(e) => {
                let fault = self.classify(e);
                self.record_failure(&fault);
                Err(fault)
            }
        }
    }

    fn record_failure(&self, fault: &Fault) {
        let n = self.failures.fetch_add(1, Ordering::Relaxed) + 1;
        tracing::warn!(tenant = %self.tenant, plugin = %self.name, sha256 = %self.sha256, consecutive = n, error = %fault, "plugin call failed");
        if n >= BREAKER_THRESHOLD {
            self.open_until_ms.store(
                self.now_ms() + BREAKER_OPEN_FOR.as_millis() as u64,
                Ordering::Relaxed,
            );
            self.failures.store(0, Ordering::Relaxed);
            tracing::error!(tenant = %self.tenant, plugin = %self.name, open_for = ?BREAKER_OPEN_FOR, "plugin suspended after repeated failures");
        }
    }

    fn classify(&self, e: wasmtime::Error) -> Fault {
        match e.downcast_ref::<Trap>() {
            Some(Trap::Interrupt) => Fault::Timeout(self.engine.settings.timeout),
            Some(Trap::StackOverflow) => Fault::StackOverflow,
            Some(Trap::AllocationTooLarge) => Fault::OutOfMemory(self.engine.settings.max_memory),
            Some(t) => Fault::Trap(t.to_string()),
            None => {
                let text = format!("{e:#}");
                if text.contains("memory") && (text.contains("grow") || text.contains("limit")) {
                    Fault::OutOfMemory(self.engine.settings.max_memory)
                } else {
                    Fault::Trap(text)
                }
            }
        }
    }
}

/// A tenant's plugins, in order.
#[derive(Default)]
pub struct Chain {
    pub entries: Vec<Entry>,
}

impl Chain {
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn wants_raw_json(&self) -> bool {
        self.entries
            .iter()
            .any(|e| e.info.wants_request && e.info.wants_raw_json)
    }

    pub fn wants_response(&self) -> bool {
        self.entries.iter().any(|e| e.info.wants_response)
    }

    pub fn wants_chunks(&self) -> bool {
        self.entries.iter().any(|e| e.info.wants_chunks)
    }
}

fn record_decision(span: &tracing::Span, decision: &str, rejection: Option<&str>) {
    span.record("sluice.plugin.decision", decision);
    if let Some(code) = rejection {
        span.record("sluice.plugin.rejection", code);
    }
}

/// A failed call is the plugin layer's failure, whatever its policy does next.
fn record_fault(span: &tracing::Span, fault: &Fault) {
    span.record("sluice.plugin.decision", "fault");
    span.record("sluice.error.layer", "plugin");
    span.record("error.type", fault.code());
    span.record("otel.status_code", "ERROR");
    span.record("otel.status_description", fault.to_string().as_str());
}
