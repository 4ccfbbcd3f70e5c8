//! Request and token rate limits, per tenant and per API key.
//!
//! The buckets live in the host (shared by all instances and replicas of the
//! plugin), so this guest only decides which buckets a request draws from and
//! how to word a refusal.

use serde::Deserialize;
use sluice_plugin_kit::host::{LimitOutcome, Scope};
use sluice_plugin_kit::*;
use std::sync::OnceLock;

const NAME: &str = "rate-limit";

/// One set of limits; every field is optional and an absent per-minute value
/// disables that limit.
#[derive(Debug, Clone, Copy, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    pub requests_per_minute: Option<u32>,
    /// Default: `requests_per_minute`.
    pub request_burst: Option<u32>,
    pub tokens_per_minute: Option<u32>,
    /// Default: `tokens_per_minute`.
    pub token_burst: Option<u32>,
}

/// The plugin config. The tenant limits sit at the top level (spelled out,
/// because serde cannot combine `flatten` with `deny_unknown_fields`).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub requests_per_minute: Option<u32>,
    pub request_burst: Option<u32>,
    pub tokens_per_minute: Option<u32>,
    pub token_burst: Option<u32>,
    /// The same limits for each API key of the tenant.
    pub per_key: Option<Limits>,
    /// Output tokens to reserve when the request sets no max tokens. Default 1024.
    #[serde(default = "default_output_estimate")]
    pub output_estimate: u32,
}

fn default_output_estimate() -> u32 {
    1024
}

impl Config {
    fn tenant(&self) -> Limits {
        Limits {
            requests_per_minute: self.requests_per_minute,
            request_burst: self.request_burst,
            tokens_per_minute: self.tokens_per_minute,
            token_burst: self.token_burst,
        }
    }
}

impl Limits {
    fn check(&self, prefix: &str) -> Result<(), String> {
        let pairs = [
            (
                "requests_per_minute",
                self.requests_per_minute,
                "request_burst",
                self.request_burst,
            ),
            (
                "tokens_per_minute",
                self.tokens_per_minute,
                "token_burst",
                self.token_burst,
            ),
        ];
        for (rate_name, rate, burst_name, burst) in pairs {
            // A zero rate would refuse everything forever; omitting the field
            // is how a limit is switched off.
            if rate == Some(0) {
                return Err(format!(
                    "{prefix}{rate_name}: must be at least 1 (omit it for no limit)"
                ));
            }
            match (rate, burst) {
                (_, Some(0)) => return Err(format!("{prefix}{burst_name}: must be at least 1")),
                (None, Some(_)) => {
                    return Err(format!("{prefix}{burst_name}: needs {prefix}{rate_name}"));
                }
                _ => {}
            }
        }
        Ok(())
    }
}

impl PluginConfig for Config {
    fn check(&self) -> Result<(), String> {
        self.tenant().check("")?;
        if let Some(per_key) = &self.per_key {
            per_key.check("per_key.")?;
        }
        Ok(())
    }
}

/// What a bucket counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Requests,
    Tokens,
}

/// One draw from a host bucket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Draw {
    pub kind: Kind,
    pub scope: Scope,
    pub per_minute: u32,
    pub burst: u32,
    pub units: u32,
}

fn scope_name(scope: Scope) -> &'static str {
    match scope {
        Scope::Tenant => "tenant",
        Scope::PerKey => "API key",
    }
}

/// Decide a request. `draw` takes units from a host bucket (the host imports
/// in the plugin, a fake in tests) and is called in order until one refuses.
pub fn decide(
    req: &RequestView,
    cfg: &Config,
    mut draw: impl FnMut(&Draw) -> LimitOutcome,
) -> RequestDecision {
    let output = req.max_output_tokens.unwrap_or(cfg.output_estimate);
    let estimate = req.estimated_input_tokens.saturating_add(output);

    // Per key before tenant: a key that is over its own limit must not use
    // up the budget the tenant's other keys share.
    let scopes = [
        (Scope::PerKey, cfg.per_key.unwrap_or_default()),
        (Scope::Tenant, cfg.tenant()),
    ];

    // A request larger than a token bucket can ever hold would be refused
    // forever; say so now instead of a 429 that invites retries, and before
    // any bucket is drawn from.
    for (scope, limits) in scopes {
        if let Some(rate) = limits.tokens_per_minute {
            let burst = limits.token_burst.unwrap_or(rate);
            if estimate > burst {
                return reject(
                    400,
                    "token_limit_exceeded",
                    format!(
                        "this request needs about {estimate} tokens ({} input + {output} output), \
                         more than the {} token burst of {burst}; shorten the prompt or lower max_tokens",
                        req.estimated_input_tokens,
                        scope_name(scope),
                    ),
                );
            }
        }
    }

    let mut draws = Vec::with_capacity(4);
    for (scope, limits) in scopes {
        if let Some(rate) = limits.requests_per_minute {
            let burst = limits.request_burst.unwrap_or(rate);
            draws.push(Draw {
                kind: Kind::Requests,
                scope,
                per_minute: rate,
                burst,
                units: 1,
            });
        }
    }
    for (scope, limits) in scopes {
        if let Some(rate) = limits.tokens_per_minute {
            let burst = limits.token_burst.unwrap_or(rate);
            draws.push(Draw {
                kind: Kind::Tokens,
                scope,
                per_minute: rate,
                burst,
                units: estimate,
            });
        }
    }

    for d in &draws {
        let outcome = draw(d);
        if !outcome.allowed {
            let (code, what) = match d.kind {
                Kind::Requests => ("rate_limit_exceeded", "requests"),
                Kind::Tokens => ("token_limit_exceeded", "tokens"),
            };
            let mut r = rejection(
                429,
                code,
                format!(
                    "{} limit of {} {what} per minute reached",
                    scope_name(d.scope),
                    d.per_minute
                ),
            );
            r.retry_after_secs = Some(retry_secs(outcome.retry_after_ms));
            return RequestDecision::Reject(r);
        }
    }
    RequestDecision::Continue
}

/// Whole seconds, rounded up, at least 1 (`Retry-After: 0` invites a hot loop).
fn retry_secs(ms: u64) -> u32 {
    u32::try_from(ms.div_ceil(1000)).unwrap_or(u32::MAX).max(1)
}

static CONFIG: OnceLock<Result<Config, String>> = OnceLock::new();

struct RateLimit;

impl Guest for RateLimit {
    fn describe() -> Result<PluginInfo, String> {
        described::<Config>(info(NAME).on_request())
    }

    fn on_request(req: RequestView) -> RequestDecision {
        let cfg = match cached_config(&CONFIG, NAME) {
            Ok(cfg) => cfg,
            Err(r) => return RequestDecision::Reject(r),
        };
        decide(&req, cfg, |d| match d.kind {
            Kind::Requests => {
                host::take_requests("requests", d.scope, d.per_minute, d.burst, d.units)
            }
            Kind::Tokens => host::reserve_tokens("tokens", d.scope, d.per_minute, d.burst, d.units),
        })
    }

    fn on_response_chunk(_: ChunkView) -> ChunkVerdict {
        ChunkVerdict::Accept
    }

    fn on_response(_: RequestView, _: ResponseView) -> ResponseVerdict {
        ResponseVerdict::Accept
    }
}

export_plugin!(RateLimit);

#[cfg(test)]
mod tests {
    use super::*;
    use sluice_plugin_kit::testing::{ops, request};

    fn cfg(json: &str) -> Config {
        parse_config(json).unwrap()
    }

    fn allow() -> LimitOutcome {
        LimitOutcome {
            allowed: true,
            retry_after_ms: 0,
        }
    }

    /// Runs `decide`, refusing the draws `refuse` picks, and returns the
    /// decision with every draw made.
    fn run(
        req: &RequestView,
        cfg: &Config,
        refuse: impl Fn(&Draw) -> Option<u64>,
    ) -> (RequestDecision, Vec<Draw>) {
        let mut seen = Vec::new();
        let d = decide(req, cfg, |d| {
            seen.push(*d);
            match refuse(d) {
                Some(ms) => LimitOutcome {
                    allowed: false,
                    retry_after_ms: ms,
                },
                None => allow(),
            }
        });
        (d, seen)
    }

    #[test]
    fn no_limits_draws_nothing() {
        let (d, seen) = run(&request("m"), &cfg("{}"), |_| None);
        assert!(ops(&d).is_empty());
        assert!(seen.is_empty());
    }

    #[test]
    fn draws_per_key_then_tenant_requests_before_tokens() {
        let c = cfg(
            r#"{"requests_per_minute": 600, "tokens_per_minute": 100000, "token_burst": 200000,
                "per_key": {"requests_per_minute": 60, "request_burst": 10, "tokens_per_minute": 20000}}"#,
        );
        let mut req = request("m");
        req.estimated_input_tokens = 300;
        req.max_output_tokens = Some(200);
        let (d, seen) = run(&req, &c, |_| None);
        assert!(matches!(d, RequestDecision::Continue));
        let want = [
            Draw {
                kind: Kind::Requests,
                scope: Scope::PerKey,
                per_minute: 60,
                burst: 10,
                units: 1,
            },
            Draw {
                kind: Kind::Requests,
                scope: Scope::Tenant,
                per_minute: 600,
                burst: 600,
                units: 1,
            },
            Draw {
                kind: Kind::Tokens,
                scope: Scope::PerKey,
                per_minute: 20000,
                burst: 20000,
                units: 500,
            },
            Draw {
                kind: Kind::Tokens,
                scope: Scope::Tenant,
                per_minute: 100000,
                burst: 200000,
                units: 500,
            },
        ];
        assert_eq!(seen, want);
    }

    #[test]
    fn output_estimate_fills_in_for_unset_max_tokens() {
        let c = cfg(r#"{"tokens_per_minute": 100000, "output_estimate": 512}"#);
        let (_, seen) = run(&request("m"), &c, |_| None);
        assert_eq!(seen[0].units, 10 + 512);
        let c = cfg(r#"{"tokens_per_minute": 100000}"#);
        let (_, seen) = run(&request("m"), &c, |_| None);
        assert_eq!(seen[0].units, 10 + 1024);
    }

    #[test]
    fn request_refusal_is_a_429_with_retry_after_and_stops_drawing() {
        let c = cfg(r#"{"requests_per_minute": 600, "tokens_per_minute": 100000}"#);
        let (d, seen) = run(&request("m"), &c, |d| {
            (d.kind == Kind::Requests).then_some(2001)
        });
        let RequestDecision::Reject(r) = d else {
            panic!("{d:?}")
        };
        assert_eq!((r.status, r.code.as_str()), (429, "rate_limit_exceeded"));
        assert_eq!(r.message, "tenant limit of 600 requests per minute reached");
        assert_eq!(r.retry_after_secs, Some(3));
        assert_eq!(
            seen.len(),
            1,
            "token bucket untouched after a request refusal"
        );
    }

    #[test]
    fn token_refusal_names_the_key_scope() {
        let c = cfg(r#"{"per_key": {"tokens_per_minute": 5000}}"#);
        let (d, _) = run(&request("m"), &c, |_| Some(10));
        let RequestDecision::Reject(r) = d else {
            panic!("{d:?}")
        };
        assert_eq!((r.status, r.code.as_str()), (429, "token_limit_exceeded"));
        assert_eq!(r.message, "API key limit of 5000 tokens per minute reached");
        assert_eq!(
            r.retry_after_secs,
            Some(1),
            "rounded up to at least one second"
        );
    }

    #[test]
    fn request_bigger_than_the_burst_is_refused_without_drawing() {
        let c = cfg(r#"{"requests_per_minute": 10, "tokens_per_minute": 1000}"#);
        let mut req = request("m");
        req.estimated_input_tokens = 900;
        req.max_output_tokens = Some(200);
        let (d, seen) = run(&req, &c, |_| None);
        let RequestDecision::Reject(r) = d else {
            panic!("{d:?}")
        };
        assert_eq!((r.status, r.code.as_str()), (400, "token_limit_exceeded"));
        assert!(
            r.message
                .contains("about 1100 tokens (900 input + 200 output)"),
            "{}",
            r.message
        );
        assert!(
            r.message.contains("tenant token burst of 1000"),
            "{}",
            r.message
        );
        assert!(seen.is_empty());
    }

    #[test]
    fn retry_secs_rounds_up_and_saturates() {
        assert_eq!(retry_secs(0), 1);
        assert_eq!(retry_secs(1000), 1);
        assert_eq!(retry_secs(1001), 2);
        assert_eq!(retry_secs(u64::MAX), u32::MAX);
    }

    #[test]
    fn bad_configs_are_explained() {
        let e = parse_config::<Config>(r#"{"requests_per_minute": 0}"#).unwrap_err();
        assert!(e.contains("requests_per_minute: must be at least 1"), "{e}");
        let e = parse_config::<Config>(r#"{"per_key": {"token_burst": 5}}"#).unwrap_err();
        assert!(
            e.contains("per_key.token_burst: needs per_key.tokens_per_minute"),
            "{e}"
        );
        let e = parse_config::<Config>(r#"{"per_key": {"rpm": 5}}"#).unwrap_err();
        assert!(e.contains("unknown field `rpm`"), "{e}");
        let e = parse_config::<Config>(r#"{"request_burst": 0, "requests_per_minute": 5}"#)
            .unwrap_err();
        assert!(e.contains("request_burst: must be at least 1"), "{e}");
    }
}
