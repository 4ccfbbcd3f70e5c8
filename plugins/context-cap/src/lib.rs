//! Input and output token caps, with per-model overrides.
//!
//! Input over the cap is refused (the engine would spend prefill on a prompt
//! the tenant does not want served); output is capped by rewriting the
//! request's max tokens, so the engine itself stops at the cap.

use serde::Deserialize;
use sluice_plugin_kit::*;
use std::collections::BTreeMap;
use std::sync::OnceLock;

const NAME: &str = "context-cap";

/// Caps; an absent cap is no limit.
#[derive(Debug, Clone, Copy, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Caps {
    pub max_input_tokens: Option<u32>,
    pub max_output_tokens: Option<u32>,
}

/// What to do with a request that asks for more output than the cap.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum OnOver {
    /// Lower the request's max tokens to the cap.
    #[default]
    Clamp,
    /// Refuse the request with 400 `max_tokens_exceeded`.
    Reject,
}

/// The plugin config (default caps spelled out at the top level, because
/// serde cannot combine `flatten` with `deny_unknown_fields`).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub max_input_tokens: Option<u32>,
    pub max_output_tokens: Option<u32>,
    /// Per-model caps; each field present overrides the default above.
    #[serde(default)]
    pub models: BTreeMap<String, Caps>,
    /// Default `clamp`.
    #[serde(default)]
    pub on_output_over: OnOver,
}

impl Caps {
    fn check(&self, prefix: &str) -> Result<(), String> {
        for (name, v) in [
            ("max_input_tokens", self.max_input_tokens),
            ("max_output_tokens", self.max_output_tokens),
        ] {
            if v == Some(0) {
                return Err(format!(
                    "{prefix}{name}: must be at least 1 (omit it for no cap)"
                ));
            }
        }
        Ok(())
    }
}

impl PluginConfig for Config {
    fn check(&self) -> Result<(), String> {
        self.defaults().check("")?;
        for (model, caps) in &self.models {
            caps.check(&format!("models.{model}."))?;
        }
        Ok(())
    }
}

impl Config {
    fn defaults(&self) -> Caps {
        Caps {
            max_input_tokens: self.max_input_tokens,
            max_output_tokens: self.max_output_tokens,
        }
    }

    /// The caps for `model`: its own entry where it sets a field, else the default.
    pub fn caps_for(&self, model: &str) -> Caps {
        let d = self.defaults();
        match self.models.get(model) {
            None => d,
            Some(m) => Caps {
                max_input_tokens: m.max_input_tokens.or(d.max_input_tokens),
                max_output_tokens: m.max_output_tokens.or(d.max_output_tokens),
            },
        }
    }
}

/// Decide a request against the caps of its model.
pub fn decide(req: &RequestView, cfg: &Config) -> RequestDecision {
    let caps = cfg.caps_for(&req.model);
    if let Some(cap) = caps.max_input_tokens
        && req.estimated_input_tokens > cap
    {
        return reject(
            400,
            "context_length_exceeded",
            format!(
                "prompt is {} tokens; the limit for {} is {cap} input tokens",
                req.estimated_input_tokens, req.model
            ),
        );
    }
    let mut patch = Patch::new();
    if let Some(cap) = caps.max_output_tokens {
        match req.max_output_tokens {
            Some(asked) if asked <= cap => {}
            Some(asked) if cfg.on_output_over == OnOver::Reject => {
                return reject(
                    400,
                    "max_tokens_exceeded",
                    format!(
                        "the request asks for up to {asked} output tokens; the limit for {} is {cap} output tokens",
                        req.model
                    ),
                );
            }
            // Over the cap with `clamp`, or unset: an unset max would let
            // the engine run to the end of the context, past the cap.
            _ => {
                patch.set_max_output_tokens(req, cap);
            }
        }
    }
    patch.finish()
}

static CONFIG: OnceLock<Result<Config, String>> = OnceLock::new();

struct ContextCap;

impl Guest for ContextCap {
    fn describe() -> Result<PluginInfo, String> {
        described::<Config>(info(NAME).on_request())
    }

    fn on_request(req: RequestView) -> RequestDecision {
        match cached_config(&CONFIG, NAME) {
            Ok(cfg) => decide(&req, cfg),
            Err(r) => RequestDecision::Reject(r),
        }
    }

    fn on_response_chunk(_: ChunkView) -> ChunkVerdict {
        ChunkVerdict::Accept
    }

    fn on_response(_: RequestView, _: ResponseView) -> ResponseVerdict {
        ResponseVerdict::Accept
    }
}

export_plugin!(ContextCap);

#[cfg(test)]
mod tests {
    use super::*;
    use sluice_plugin_kit::testing::{ops, request};

    const CFG: &str = r#"{
        "max_input_tokens": 100000,
        "max_output_tokens": 8192,
        "models": {
            "deepseek-v4-flash": {"max_input_tokens": 32768},
            "small": {"max_output_tokens": 1024}
        }
    }"#;

    fn cfg(json: &str) -> Config {
        parse_config(json).unwrap()
    }

    #[test]
    fn model_entries_override_field_by_field() {
        let c = cfg(CFG);
        let caps = c.caps_for("deepseek-v4-flash");
        assert_eq!(
            (caps.max_input_tokens, caps.max_output_tokens),
            (Some(32768), Some(8192))
        );
        let caps = c.caps_for("small");
        assert_eq!(
            (caps.max_input_tokens, caps.max_output_tokens),
            (Some(100000), Some(1024))
        );
        let caps = c.caps_for("other");
        assert_eq!(
            (caps.max_input_tokens, caps.max_output_tokens),
            (Some(100000), Some(8192))
        );
    }

    #[test]
    fn long_prompt_is_refused_with_the_numbers() {
        let mut req = request("deepseek-v4-flash");
        req.estimated_input_tokens = 40123;
        let RequestDecision::Reject(r) = decide(&req, &cfg(CFG)) else {
            panic!()
        };
        assert_eq!(
            (r.status, r.code.as_str()),
            (400, "context_length_exceeded")
        );
        assert_eq!(
            r.message,
            "prompt is 40123 tokens; the limit for deepseek-v4-flash is 32768 input tokens"
        );
        req.estimated_input_tokens = 32768;
        assert!(!matches!(
            decide(&req, &cfg(CFG)),
            RequestDecision::Reject(_)
        ));
    }

    #[test]
    fn unset_max_tokens_gets_the_cap() {
        let req = request("small");
        assert_eq!(
            ops(&decide(&req, &cfg(CFG))),
            ["remove /max_completion_tokens", "set /max_tokens 1024"]
        );
    }

    #[test]
    fn over_cap_is_clamped_by_default_and_within_cap_untouched() {
        let mut req = request("small");
        req.max_output_tokens = Some(5000);
        assert_eq!(
            ops(&decide(&req, &cfg(CFG))),
            ["remove /max_completion_tokens", "set /max_tokens 1024"]
        );
        req.max_output_tokens = Some(1024);
        assert!(ops(&decide(&req, &cfg(CFG))).is_empty());
    }

    #[test]
    fn openai_pools_get_max_completion_tokens() {
        let mut req = request("small");
        req.dialect = "openai".to_owned();
        req.max_output_tokens = Some(5000);
        assert_eq!(
            ops(&decide(&req, &cfg(CFG))),
            ["remove /max_tokens", "set /max_completion_tokens 1024"]
        );
    }

    #[test]
    fn over_cap_is_refused_in_reject_mode() {
        let c = cfg(r#"{"max_output_tokens": 4096, "on_output_over": "reject"}"#);
        let mut req = request("m");
        req.max_output_tokens = Some(9000);
        let RequestDecision::Reject(r) = decide(&req, &c) else {
            panic!()
        };
        assert_eq!((r.status, r.code.as_str()), (400, "max_tokens_exceeded"));
        assert_eq!(
            r.message,
            "the request asks for up to 9000 output tokens; the limit for m is 4096 output tokens"
        );
        // Reject mode still fills in an unset max, which is not an over-ask.
        req.max_output_tokens = None;
        assert_eq!(
            ops(&decide(&req, &c)),
            ["remove /max_completion_tokens", "set /max_tokens 4096"]
        );
    }

    #[test]
    fn no_caps_no_changes() {
        let mut req = request("m");
        req.estimated_input_tokens = u32::MAX;
        assert!(ops(&decide(&req, &cfg("{}"))).is_empty());
    }

    #[test]
    fn bad_configs_are_explained() {
        let e =
            parse_config::<Config>(r#"{"models": {"m": {"max_output_tokens": 0}}}"#).unwrap_err();
        assert!(
            e.contains("models.m.max_output_tokens: must be at least 1"),
            "{e}"
        );
        let e = parse_config::<Config>(r#"{"on_output_over": "truncate"}"#).unwrap_err();
        assert!(e.contains("unknown variant `truncate`"), "{e}");
    }
}
