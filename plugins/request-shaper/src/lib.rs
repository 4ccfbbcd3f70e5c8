//! Shapes requests before they reach the engine: model aliases, sampling
//! defaults and clamps, a tenant system prompt, and pool routing by header
//! or task tag.

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use sluice_plugin_kit::*;
use std::collections::BTreeMap;
use std::sync::OnceLock;

const NAME: &str = "request-shaper";

/// Values set when the request leaves them out.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Defaults {
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    pub max_tokens: Option<u32>,
}

/// Inclusive `[lo, hi]` ranges values are clamped into.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Clamp {
    pub temperature: Option<[f64; 2]>,
    pub top_p: Option<[f64; 2]>,
    pub max_tokens: Option<[u32; 2]>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PromptMode {
    /// Always insert the system message first.
    #[default]
    Prepend,
    /// Insert it only when the request has no system (or developer) message.
    IfMissing,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SystemPrompt {
    pub text: String,
    /// Default `prepend`.
    #[serde(default)]
    pub mode: PromptMode,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Routes {
    /// A request header whose value names the pool to use.
    pub header: Option<String>,
    /// The pools the header may name.
    #[serde(default)]
    pub allowed_pools: Vec<String>,
    /// Task tag (`x-sluice-task`) → pool.
    #[serde(default)]
    pub tasks: BTreeMap<String, String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Alias → model served by the pool.
    #[serde(default)]
    pub model_aliases: BTreeMap<String, String>,
    #[serde(default)]
    pub defaults: Defaults,
    #[serde(default)]
    pub clamp: Clamp,
    pub system_prompt: Option<SystemPrompt>,
    pub routes: Option<Routes>,
}

/// Headers the host shows plugins (see `request-view.headers` in the WIT);
/// a route on any other header could never match.
fn header_visible(name: &str) -> bool {
    let name = name.to_ascii_lowercase();
    name.starts_with("x-sluice-")
        || name.starts_with("openai-")
        || name == "user-agent"
        || name == "x-request-id"
}

fn check_range<T: PartialOrd + Copy + std::fmt::Display>(
    field: &str,
    range: Option<[T; 2]>,
) -> Result<(), String> {
    if let Some([lo, hi]) = range
        && lo.partial_cmp(&hi).is_none_or(|o| o.is_gt())
    {
        return Err(format!(
            "clamp.{field}: [{lo}, {hi}] is not a range (lo must be <= hi)"
        ));
    }
    Ok(())
}

impl PluginConfig for Config {
    fn check(&self) -> Result<(), String> {
        for (alias, model) in &self.model_aliases {
            if model.is_empty() {
                return Err(format!("model_aliases.{alias}: the target model is empty"));
            }
        }
        if self.defaults.max_tokens == Some(0) {
            return Err("defaults.max_tokens: must be at least 1".to_owned());
        }
        check_range("temperature", self.clamp.temperature)?;
        check_range("top_p", self.clamp.top_p)?;
        check_range("max_tokens", self.clamp.max_tokens)?;
        if matches!(self.clamp.max_tokens, Some([0, _])) {
            return Err("clamp.max_tokens: the lower bound must be at least 1".to_owned());
        }
        if let Some(sp) = &self.system_prompt
            && sp.text.trim().is_empty()
        {
            return Err("system_prompt.text: must not be empty".to_owned());
        }
        if let Some(routes) = &self.routes
            && let Some(header) = &routes.header
        {
            if !header_visible(header) {
                return Err(format!(
                    "routes.header: plugins only see x-sluice-*, openai-*, user-agent and \
                     x-request-id headers, not {header}"
                ));
            }
            if routes.allowed_pools.is_empty() {
                return Err(
                    "routes.allowed_pools: must list the pools routes.header may select".to_owned(),
                );
            }
        }
        Ok(())
    }
}

impl Config {
    /// The raw request JSON is only needed (and only paid for) to rebuild
    /// `/messages` for a system prompt.
    pub fn needs_raw_json(&self) -> bool {
        self.system_prompt.is_some()
    }
}

/// The request's value, or the default when it has none, clamped.
fn shaped<T: PartialOrd + Copy>(
    asked: Option<T>,
    default: Option<T>,
    range: Option<[T; 2]>,
) -> Option<T> {
    let v = asked.or(default)?;
    Some(match range {
        Some([lo, _]) if v < lo => lo,
        Some([_, hi]) if v > hi => hi,
        _ => v,
    })
}

/// Decide a request.
pub fn decide(req: &RequestView, cfg: &Config) -> RequestDecision {
    let mut patch = Patch::new();

    if let Some(routes) = &cfg.routes {
        // An explicit header beats the task tag: the client chose.
        let from_header = routes
            .header
            .as_deref()
            .and_then(|h| req.header(h).map(|v| (h, v.trim())));
        let pool = match from_header {
            Some((header, value)) => {
                if !routes.allowed_pools.iter().any(|p| p == value) {
                    return reject(
                        400,
                        "invalid_pool",
                        format!(
                            "header {header} names pool \"{value}\", which is not one of: {}",
                            routes.allowed_pools.join(", ")
                        ),
                    );
                }
                Some(value)
            }
            None => req
                .task
                .as_deref()
                .and_then(|t| routes.tasks.get(t))
                .map(String::as_str),
        };
        if let Some(pool) = pool
            && pool != req.pool
        {
            patch.set_pool(pool);
        }
    }

    if let Some(model) = cfg.model_aliases.get(&req.model) {
        patch.set_model(model);
    }

    let (d, c) = (&cfg.defaults, &cfg.clamp);
    let temperature = shaped(req.temperature, d.temperature, c.temperature);
    if temperature != req.temperature
        && let Some(t) = temperature
    {
        patch.set("/temperature", &t);
    }
    let top_p = shaped(req.top_p, d.top_p, c.top_p);
    if top_p != req.top_p
        && let Some(p) = top_p
    {
        patch.set("/top_p", &p);
    }
    let max_tokens = shaped(req.max_output_tokens, d.max_tokens, c.max_tokens);
    if max_tokens != req.max_output_tokens
        && let Some(n) = max_tokens
    {
        patch.set_max_output_tokens(req, n);
    }

    if let Some(sp) = &cfg.system_prompt
        && req.endpoint == "chat-completions"
    {
        let has_system = req
            .messages
            .iter()
            .any(|m| m.role == "system" || m.role == "developer");
        if sp.mode == PromptMode::Prepend || !has_system {
            let Some(raw) = req.raw_json.as_deref() else {
                return reject(
                    500,
                    "raw_json_unavailable",
                    format!(
                        "{NAME}: the host did not pass the request JSON that system_prompt needs"
                    ),
                );
            };
            if let Err(e) = prepend_system_message(&mut patch, raw, &sp.text) {
                return reject(400, "invalid_request", format!("messages: {e}"));
            }
        }
    }
    patch.finish()
}

/// Set `/messages` to the request's messages with
/// `{"role":"system","content":text}` first. The existing messages are
/// copied byte for byte, so every field they carry (tool calls, names,
/// content parts) survives. No-op when the body has no messages array.
fn prepend_system_message(patch: &mut Patch, raw: &str, text: &str) -> Result<(), String> {
    #[derive(Deserialize)]
    struct Body<'a> {
        #[serde(borrow)]
        messages: Option<Vec<&'a RawValue>>,
    }
    let body: Body = serde_json::from_str(raw).map_err(|e| e.to_string())?;
    let Some(messages) = body.messages else {
        return Ok(());
    };
    // A struct rather than `json!`, which would sort `content` before `role`.
    #[derive(Serialize)]
    struct System<'a> {
        role: &'static str,
        content: &'a str,
    }
    let system = serde_json::to_string(&System {
        role: "system",
        content: text,
    })
    .and_then(RawValue::from_string)
    .map_err(|e| e.to_string())?;
    let mut all: Vec<&RawValue> = Vec::with_capacity(messages.len() + 1);
    all.push(&system);
    all.extend(messages);
    patch.set("/messages", &all);
    Ok(())
}

static CONFIG: OnceLock<Result<Config, String>> = OnceLock::new();

struct RequestShaper;

impl Guest for RequestShaper {
    fn describe() -> Result<PluginInfo, String> {
        let cfg = config_checked::<Config>()?;
        let info = info(NAME).on_request();
        Ok(if cfg.needs_raw_json() {
            info.raw_json()
        } else {
            info
        })
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

export_plugin!(RequestShaper);

#[cfg(test)]
mod tests {
    use super::*;
    use sluice_plugin_kit::testing::{ops, request};

    fn cfg(json: &str) -> Config {
        parse_config(json).unwrap()
    }

    fn with_header(mut req: RequestView, name: &str, value: &str) -> RequestView {
        req.headers.push(Header {
            name: name.to_owned(),
            value: value.to_owned(),
        });
        req
    }

    #[test]
    fn alias_becomes_the_served_model() {
        let c = cfg(r#"{"model_aliases": {"fast": "deepseek-v4-flash"}}"#);
        assert_eq!(
            ops(&decide(&request("fast"), &c)),
            ["model deepseek-v4-flash"]
        );
        assert!(ops(&decide(&request("deepseek-v4-flash"), &c)).is_empty());
    }

    #[test]
    fn defaults_fill_gaps_and_clamps_bound_values() {
        let c = cfg(
            r#"{"defaults": {"temperature": 0.6, "top_p": 0.95, "max_tokens": 2048},
                "clamp": {"temperature": [0.0, 1.0], "top_p": [0.1, 0.9], "max_tokens": [16, 1024]}}"#,
        );
        // Absent: defaults, themselves clamped.
        assert_eq!(
            ops(&decide(&request("m"), &c)),
            [
                "set /temperature 0.6",
                "set /top_p 0.9",
                "remove /max_completion_tokens",
                "set /max_tokens 1024"
            ]
        );
        // Present and out of range: clamped; in range: untouched.
        let mut req = request("m");
        req.temperature = Some(1.7);
        req.top_p = Some(0.5);
        req.max_output_tokens = Some(4);
        assert_eq!(
            ops(&decide(&req, &c)),
            [
                "set /temperature 1.0",
                "remove /max_completion_tokens",
                "set /max_tokens 16"
            ]
        );
    }

    #[test]
    fn clamps_alone_leave_absent_values_absent() {
        let c = cfg(r#"{"clamp": {"temperature": [0.0, 1.0], "max_tokens": [1, 100]}}"#);
        assert!(ops(&decide(&request("m"), &c)).is_empty());
    }

    #[test]
    fn system_prompt_is_prepended_keeping_messages_verbatim() {
        let c = cfg(r#"{"system_prompt": {"text": "Be \"brief\"."}}"#);
        assert!(c.needs_raw_json());
        let mut req = request("m");
        req.raw_json = Some(
            r#"{"model":"m","messages":[{"role":"system","content":"x"},
               {"role":"assistant","content":null,"tool_calls":[{"id":"c1","type":"function","function":{"name":"f","arguments":"{}"}}]}],
               "stream":false}"#
                .to_owned(),
        );
        req.messages.insert(
            0,
            Message {
                role: "system".to_owned(),
                text: "x".to_owned(),
            },
        );
        assert_eq!(
            ops(&decide(&req, &c)),
            [
                r#"set /messages [{"role":"system","content":"Be \"brief\"."},{"role":"system","content":"x"},{"role":"assistant","content":null,"tool_calls":[{"id":"c1","type":"function","function":{"name":"f","arguments":"{}"}}]}]"#
            ]
        );
    }

    #[test]
    fn if_missing_skips_requests_with_their_own_system_message() {
        let c = cfg(r#"{"system_prompt": {"text": "Be brief.", "mode": "if-missing"}}"#);
        let mut req = request("m");
        req.raw_json = Some(r#"{"messages":[{"role":"user","content":"hi"}]}"#.to_owned());
        assert_eq!(
            ops(&decide(&req, &c)),
            [
                r#"set /messages [{"role":"system","content":"Be brief."},{"role":"user","content":"hi"}]"#
            ]
        );
        req.messages.insert(
            0,
            Message {
                role: "developer".to_owned(),
                text: "d".to_owned(),
            },
        );
        assert!(ops(&decide(&req, &c)).is_empty());
    }

    #[test]
    fn system_prompt_without_raw_json_fails_loudly() {
        let c = cfg(r#"{"system_prompt": {"text": "Be brief."}}"#);
        assert_eq!(
            ops(&decide(&request("m"), &c)),
            ["reject 500 raw_json_unavailable"]
        );
        let mut req = request("m");
        req.endpoint = "completions".to_owned();
        assert!(
            ops(&decide(&req, &c)).is_empty(),
            "completions have no messages to extend"
        );
    }

    #[test]
    fn routes_by_header_then_task() {
        let c = cfg(
            r#"{"routes": {"header": "X-Sluice-Pool", "allowed_pools": ["gpu-a", "gpu-b"],
                "tasks": {"batch": "gpu-b"}}}"#,
        );
        let req = with_header(request("m"), "x-sluice-pool", " gpu-a ");
        assert_eq!(ops(&decide(&req, &c)), ["pool gpu-a"]);

        let mut req = request("m");
        req.task = Some("batch".to_owned());
        assert_eq!(ops(&decide(&req, &c)), ["pool gpu-b"]);
        let req = with_header(req, "x-sluice-pool", "gpu-a");
        assert_eq!(
            ops(&decide(&req, &c)),
            ["pool gpu-a"],
            "the header beats the task"
        );

        let mut req = request("m");
        req.pool = "gpu-b".to_owned();
        req.task = Some("batch".to_owned());
        assert!(ops(&decide(&req, &c)).is_empty(), "already there");
    }

    #[test]
    fn header_naming_a_pool_outside_the_list_is_refused() {
        let c = cfg(r#"{"routes": {"header": "x-sluice-pool", "allowed_pools": ["gpu-a"]}}"#);
        let req = with_header(request("m"), "x-sluice-pool", "gpu-z");
        let RequestDecision::Reject(r) = decide(&req, &c) else {
            panic!()
        };
        assert_eq!((r.status, r.code.as_str()), (400, "invalid_pool"));
        assert_eq!(
            r.message,
            "header x-sluice-pool names pool \"gpu-z\", which is not one of: gpu-a"
        );
    }

    #[test]
    fn bad_configs_are_explained() {
        let bad = [
            (
                r#"{"clamp": {"top_p": [0.9, 0.1]}}"#,
                "clamp.top_p: [0.9, 0.1] is not a range",
            ),
            (
                r#"{"clamp": {"max_tokens": [0, 10]}}"#,
                "clamp.max_tokens: the lower bound",
            ),
            (
                r#"{"system_prompt": {"text": " "}}"#,
                "system_prompt.text: must not be empty",
            ),
            (
                r#"{"system_prompt": {"text": "x", "mode": "append"}}"#,
                "unknown variant `append`",
            ),
            (
                r#"{"routes": {"header": "authorization", "allowed_pools": ["a"]}}"#,
                "not authorization",
            ),
            (
                r#"{"routes": {"header": "x-sluice-pool"}}"#,
                "routes.allowed_pools: must list",
            ),
            (
                r#"{"defaults": {"temprature": 1}}"#,
                "unknown field `temprature`",
            ),
        ];
        for (json, want) in bad {
            let e = parse_config::<Config>(json).unwrap_err();
            assert!(e.contains(want), "{json}: {e}");
        }
        assert!(!cfg("{}").needs_raw_json());
    }
}
