//! Thinking-mode and reasoning-effort policy.
//!
//! Clients switch thinking in three ways (`chat_template_kwargs.thinking`,
//! `chat_template_kwargs.enable_thinking`, DeepSeek's `thinking.type`); the
//! host reads whichever was used into `request-view.thinking`. This plugin
//! decides the effective mode and writes it in the one way the pool's engine
//! understands, removing the others so no stale switch contradicts it.

use serde::Deserialize;
use sluice_plugin_kit::*;
use std::collections::BTreeMap;
use std::sync::OnceLock;

const NAME: &str = "thinking-policy";

/// What the policy does with the request's thinking mode.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    /// Keep what the request asks for (translated into the pool's dialect).
    #[default]
    Allow,
    ForceOn,
    ForceOff,
}

/// A reasoning-effort ceiling.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Effort {
    Low,
    Medium,
    High,
}

impl Effort {
    fn as_str(self) -> &'static str {
        match self {
            Effort::Low => "low",
            Effort::Medium => "medium",
            Effort::High => "high",
        }
    }

    fn rank(self) -> u8 {
        effort_rank(self.as_str())
    }
}

/// Order of `reasoning_effort` values. OpenAI's `none` and `minimal` sit
/// below `low`; anything unknown counts as above `high`, so a cap can only
/// lower it.
fn effort_rank(effort: &str) -> u8 {
    match effort {
        "none" => 0,
        "minimal" => 1,
        "low" => 2,
        "medium" => 3,
        "high" => 4,
        _ => 5,
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Default `allow`.
    #[serde(default)]
    pub default: Mode,
    /// Per model; overrides `default`.
    #[serde(default)]
    pub models: BTreeMap<String, Mode>,
    /// Per task tag (`x-sluice-task`); overrides `models` and `default`.
    #[serde(default)]
    pub tasks: BTreeMap<String, Mode>,
    /// Highest `reasoning_effort` a request may use. Default: no ceiling.
    pub max_reasoning_effort: Option<Effort>,
}

impl PluginConfig for Config {}

impl Config {
    /// The mode for a request: task, then model, then the default.
    pub fn mode_for(&self, req: &RequestView) -> Mode {
        req.task
            .as_deref()
            .and_then(|t| self.tasks.get(t))
            .or_else(|| self.models.get(&req.model))
            .copied()
            .unwrap_or(self.default)
    }
}

const KW_THINKING: &str = "/chat_template_kwargs/thinking";
const KW_ENABLE: &str = "/chat_template_kwargs/enable_thinking";
const DEEPSEEK: &str = "/thinking";

/// Write thinking on/off in `dialect`'s way and remove the other ways.
/// `openai` has no on/off switch (the model decides), and an unknown
/// dialect gets the same treatment: only the foreign switches go.
fn write_switch(patch: &mut Patch, dialect: &str, on: bool) {
    match dialect {
        "vllm" => {
            patch
                .set(KW_THINKING, &on)
                .remove(KW_ENABLE)
                .remove(DEEPSEEK);
        }
        "sglang" => {
            // SGLang's templates differ in which flag they read; set both.
            patch
                .set(KW_THINKING, &on)
                .set(KW_ENABLE, &on)
                .remove(DEEPSEEK);
        }
        "deepseek" => {
            let kind = if on { "enabled" } else { "disabled" };
            patch
                .set(DEEPSEEK, &serde_json::json!({ "type": kind }))
                .remove(KW_THINKING)
                .remove(KW_ENABLE);
        }
        _ => {
            patch.remove(KW_THINKING).remove(KW_ENABLE).remove(DEEPSEEK);
        }
    }
}

/// Decide a request.
pub fn decide(req: &RequestView, cfg: &Config) -> RequestDecision {
    // Thinking switches act through the chat template; the completions
    // endpoint sends a raw prompt, so there is nothing to switch.
    if req.endpoint != "chat-completions" {
        return RequestDecision::Continue;
    }
    let thinking = match cfg.mode_for(req) {
        Mode::Allow => req.thinking,
        Mode::ForceOn => ThinkingMode::Enabled,
        Mode::ForceOff => ThinkingMode::Disabled,
    };
    let mut patch = Patch::new();
    match thinking {
        ThinkingMode::Unspecified => {}
        ThinkingMode::Enabled => write_switch(&mut patch, &req.dialect, true),
        ThinkingMode::Disabled => write_switch(&mut patch, &req.dialect, false),
    }

    let asked = req.reasoning_effort.as_deref();
    if thinking == ThinkingMode::Disabled {
        // An effort only means something with thinking on; dropping it
        // keeps the request unambiguous whatever the engine makes of it.
        if asked.is_some() {
            patch.remove("/reasoning_effort");
        }
    } else if let Some(cap) = cfg.max_reasoning_effort {
        match asked {
            Some(e) if effort_rank(e) > cap.rank() => {
                patch.set("/reasoning_effort", &cap.as_str());
            }
            // Engines default to `medium`, which only a `low` ceiling is
            // below. Not for `openai` pools: their non-reasoning models
            // refuse the field.
            None if cap == Effort::Low
                && thinking == ThinkingMode::Enabled
                && req.dialect != "openai" =>
            {
                patch.set("/reasoning_effort", &cap.as_str());
            }
            _ => {}
        }
    }
    patch.finish()
}

static CONFIG: OnceLock<Result<Config, String>> = OnceLock::new();

struct ThinkingPolicy;

impl Guest for ThinkingPolicy {
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

export_plugin!(ThinkingPolicy);

#[cfg(test)]
mod tests {
    use super::*;
    use sluice_plugin_kit::testing::{ops, request};

    fn cfg(json: &str) -> Config {
        parse_config(json).unwrap()
    }

    fn req(dialect: &str, thinking: ThinkingMode) -> RequestView {
        let mut r = request("deepseek-v4-flash");
        r.dialect = dialect.to_owned();
        r.thinking = thinking;
        r
    }

    #[test]
    fn allow_translates_into_each_dialect() {
        let c = cfg("{}");
        let on = ThinkingMode::Enabled;
        assert_eq!(
            ops(&decide(&req("vllm", on), &c)),
            [
                "set /chat_template_kwargs/thinking true",
                "remove /chat_template_kwargs/enable_thinking",
                "remove /thinking"
            ]
        );
        assert_eq!(
            ops(&decide(&req("sglang", on), &c)),
            [
                "set /chat_template_kwargs/thinking true",
                "set /chat_template_kwargs/enable_thinking true",
                "remove /thinking"
            ]
        );
        assert_eq!(
            ops(&decide(&req("deepseek", on), &c)),
            [
                r#"set /thinking {"type":"enabled"}"#,
                "remove /chat_template_kwargs/thinking",
                "remove /chat_template_kwargs/enable_thinking"
            ]
        );
        assert_eq!(
            ops(&decide(&req("openai", on), &c)),
            [
                "remove /chat_template_kwargs/thinking",
                "remove /chat_template_kwargs/enable_thinking",
                "remove /thinking"
            ]
        );
    }

    #[test]
    fn allow_leaves_an_unstated_mode_alone() {
        assert!(ops(&decide(&req("vllm", ThinkingMode::Unspecified), &cfg("{}"))).is_empty());
    }

    #[test]
    fn force_off_wins_over_the_request_and_drops_the_effort() {
        let c = cfg(r#"{"default": "force-off"}"#);
        let mut r = req("deepseek", ThinkingMode::Enabled);
        r.reasoning_effort = Some("high".to_owned());
        assert_eq!(
            ops(&decide(&r, &c)),
            [
                r#"set /thinking {"type":"disabled"}"#,
                "remove /chat_template_kwargs/thinking",
                "remove /chat_template_kwargs/enable_thinking",
                "remove /reasoning_effort"
            ]
        );
    }

    #[test]
    fn task_beats_model_beats_default() {
        let c = cfg(
            r#"{"default": "force-off", "models": {"deepseek-v4-flash": "allow"},
                "tasks": {"agent": "force-on"}}"#,
        );
        let mut r = req("vllm", ThinkingMode::Disabled);
        assert_eq!(c.mode_for(&r), Mode::Allow);
        r.task = Some("agent".to_owned());
        assert_eq!(c.mode_for(&r), Mode::ForceOn);
        assert_eq!(
            ops(&decide(&r, &c))[0],
            "set /chat_template_kwargs/thinking true"
        );
        r.task = Some("chat".to_owned());
        r.model = "other".to_owned();
        assert_eq!(c.mode_for(&r), Mode::ForceOff);
    }

    #[test]
    fn effort_is_lowered_to_the_ceiling_never_raised() {
        let c = cfg(r#"{"max_reasoning_effort": "medium"}"#);
        let mut r = req("vllm", ThinkingMode::Unspecified);
        for (asked, want) in [
            ("high", Some("medium")),
            ("xhigh", Some("medium")),
            ("medium", None),
            ("low", None),
            ("minimal", None),
        ] {
            r.reasoning_effort = Some(asked.to_owned());
            let got = ops(&decide(&r, &c));
            let want: Vec<String> = want
                .map(|w| format!("set /reasoning_effort \"{w}\""))
                .into_iter()
                .collect();
            assert_eq!(got, want, "asked {asked}");
        }
        r.reasoning_effort = None;
        assert!(
            ops(&decide(&r, &c)).is_empty(),
            "medium ceiling: engine default is fine"
        );
    }

    #[test]
    fn low_ceiling_is_written_when_thinking_is_on_and_effort_unset() {
        let c = cfg(r#"{"max_reasoning_effort": "low"}"#);
        let r = req("sglang", ThinkingMode::Enabled);
        assert_eq!(
            ops(&decide(&r, &c)).last().unwrap(),
            "set /reasoning_effort \"low\""
        );
        let r = req("openai", ThinkingMode::Enabled);
        assert!(
            !ops(&decide(&r, &c))
                .iter()
                .any(|o| o.contains("reasoning_effort"))
        );
        let r = req("vllm", ThinkingMode::Unspecified);
        assert!(ops(&decide(&r, &c)).is_empty());
    }

    #[test]
    fn completions_endpoint_is_left_alone() {
        let mut r = req("vllm", ThinkingMode::Enabled);
        r.endpoint = "completions".to_owned();
        assert!(matches!(
            decide(&r, &cfg(r#"{"default": "force-off"}"#)),
            RequestDecision::Continue
        ));
    }

    #[test]
    fn bad_configs_are_explained() {
        let e = parse_config::<Config>(r#"{"default": "on"}"#).unwrap_err();
        assert!(e.contains("unknown variant `on`"), "{e}");
        let e = parse_config::<Config>(r#"{"max_reasoning_effort": "extreme"}"#).unwrap_err();
        assert!(e.contains("unknown variant `extreme`"), "{e}");
    }
}
