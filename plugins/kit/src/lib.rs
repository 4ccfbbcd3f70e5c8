//! The sluice plugin kit: everything a Rust policy plugin needs.
//!
//! ```ignore
//! use sluice_plugin_kit::*;
//!
//! #[derive(serde::Deserialize)]
//! #[serde(deny_unknown_fields)]
//! struct Config { limit: u32 }
//! impl PluginConfig for Config {}
//!
//! struct MyPolicy;
//! impl Guest for MyPolicy {
//!     // Refuses a config that does not parse or check, before any request.
//!     fn describe() -> Result<PluginInfo, String> { described::<Config>(info("my-policy").on_request()) }
//!     fn on_request(req: RequestView) -> RequestDecision { RequestDecision::Continue }
//!     fn on_response_chunk(_: ChunkView) -> ChunkVerdict { ChunkVerdict::Accept }
//!     fn on_response(_: RequestView, _: ResponseView) -> ResponseVerdict { ResponseVerdict::Accept }
//! }
//! export_plugin!(MyPolicy);
//! ```
//!
//! Start from `plugins/template` and build with `sluice plugin build DIR`,
//! which compiles for `wasm32-unknown-unknown` and makes the component.

// The export macro names paths through this crate's name, also from inside it.
extern crate self as sluice_plugin_kit;

#[doc(hidden)]
pub use wit_bindgen;

/// The generated `sluice:policy` bindings.
// The generated lowering of `take-requests`/`reserve-tokens` passes every
// flattened argument plus a return pointer; that is the ABI, not a design choice.
#[allow(clippy::too_many_arguments)]
pub mod bindings {
    wit_bindgen::generate!({
        world: "policy",
        path: "../../wit",
        pub_export_macro: true,
        export_macro_name: "export_plugin",
        default_bindings_module: "sluice_plugin_kit::bindings",
        runtime_path: "sluice_plugin_kit::wit_bindgen::rt",
    });
}

pub use bindings::Guest;
// The generated macro lives in `bindings`; re-exported so the `use
// sluice_plugin_kit::*` of the crate docs brings it in.
pub use bindings::export_plugin;
pub use bindings::sluice::policy::host;
pub use bindings::sluice::policy::types::*;

use serde::Serialize;
use serde::de::DeserializeOwned;
use std::sync::OnceLock;

/// A `plugin-info` with every hook off; switch on what the plugin uses.
pub fn info(name: &str) -> PluginInfo {
    PluginInfo {
        name: name.to_owned(),
        version: "0.1.0".to_owned(),
        wants_request: false,
        wants_chunks: false,
        wants_response: false,
        wants_raw_json: false,
    }
}

/// Builder-style switches for [`PluginInfo`].
pub trait InfoExt {
    fn version(self, v: &str) -> Self;
    fn on_request(self) -> Self;
    fn on_chunks(self) -> Self;
    fn on_response(self) -> Self;
    fn raw_json(self) -> Self;
}

impl InfoExt for PluginInfo {
    fn version(mut self, v: &str) -> Self {
        self.version = v.to_owned();
        self
    }
    fn on_request(mut self) -> Self {
        self.wants_request = true;
        self
    }
    fn on_chunks(mut self) -> Self {
        self.wants_chunks = true;
        self
    }
    fn on_response(mut self) -> Self {
        self.wants_response = true;
        self
    }
    fn raw_json(mut self) -> Self {
        self.wants_raw_json = true;
        self
    }
}

/// This plugin's config from the tenant's chain, parsed into `T` (not
/// checked; see [`config_checked`]).
pub fn config<T: DeserializeOwned>() -> Result<T, String> {
    parse_json_config(&host::config())
}

/// Parse JSON text into `T`. Errors name the field by its path
/// (`models.m.max_output_tokens: invalid type: ...`); the position in the
/// JSON text is left out, since the host wrote that text, not the tenant.
fn parse_json_config<T: DeserializeOwned>(text: &str) -> Result<T, String> {
    // A chain entry without a config may reach the plugin as "" or "null";
    // both mean "all defaults".
    let text = match text.trim() {
        "" | "null" => "{}",
        t => t,
    };
    let mut de = serde_json::Deserializer::from_str(text);
    let value = serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let path = e.path().to_string();
        let message = without_position(e.into_inner());
        if path == "." {
            message
        } else {
            format!("{path}: {message}")
        }
    })?;
    de.end().map_err(without_position)?;
    Ok(value)
}

/// A serde_json error's message; for data errors (wrong type, unknown or
/// missing field) without the "at line L column C" that syntax errors need.
fn without_position(e: serde_json::Error) -> String {
    let message = e.to_string();
    if e.is_data() {
        let at = format!(" at line {} column {}", e.line(), e.column());
        if let Some(bare) = message.strip_suffix(&at) {
            return bare.to_owned();
        }
    }
    message
}

/// A plugin config with checks beyond what serde expresses (ranges, pairs).
pub trait PluginConfig: DeserializeOwned + Send + Sync + 'static {
    /// Reject values that parse but make no sense; the message names the field.
    fn check(&self) -> Result<(), String> {
        Ok(())
    }
}

/// Parse and check a config from JSON text; what [`config_checked`] and
/// [`cached_config`] do without the host, so config handling can be
/// unit-tested natively. The error names the field, e.g.
/// `max_input_tokens: invalid type: string "lots", expected u32`.
pub fn parse_config<T: PluginConfig>(text: &str) -> Result<T, String> {
    let cfg: T = parse_json_config(text)?;
    cfg.check()?;
    Ok(cfg)
}

/// This plugin's config from the tenant's chain, parsed and checked. Call it
/// in `describe` and pass the error on (`?`): the host then refuses the
/// config when the chain is loaded, with this message, before any request.
pub fn config_checked<T: PluginConfig>() -> Result<T, String> {
    parse_config(&host::config())
}

/// `describe` for a plugin whose info does not depend on its config: check
/// the config as `T`, then describe the plugin with `info`.
///
/// ```ignore
/// fn describe() -> Result<PluginInfo, String> {
///     described::<Config>(info("my-policy").on_request())
/// }
/// ```
pub fn described<T: PluginConfig>(info: PluginInfo) -> Result<PluginInfo, String> {
    config_checked::<T>().map(|_| info)
}

/// The plugin's config, parsed and checked once per instance: an instance
/// serves one chain entry, whose config never changes under it. A bad config
/// is logged once and answered with [`config_invalid`] on every call (a
/// plugin whose `describe` checks the config never gets that far: the host
/// refuses the config when the chain is loaded).
pub fn cached_config<T: PluginConfig>(
    cell: &'static OnceLock<Result<T, String>>,
    plugin: &str,
) -> Result<&'static T, Rejection> {
    cell.get_or_init(|| {
        let parsed = parse_config(&host::config());
        if let Err(e) = &parsed {
            host::log(host::Level::Error, e);
        }
        parsed
    })
    .as_ref()
    .map_err(|e| config_invalid(plugin, e))
}

/// The refusal for a config that does not parse or check: status 500, code
/// `plugin_config_invalid`, since the client cannot fix it.
pub fn config_invalid(plugin: &str, message: &str) -> Rejection {
    rejection(
        500,
        "plugin_config_invalid",
        format!("{plugin}: invalid plugin config: {message}"),
    )
}

/// A [`Rejection`] without `Retry-After`.
pub fn rejection(status: u16, code: &str, message: impl Into<String>) -> Rejection {
    Rejection {
        status,
        code: code.to_owned(),
        message: message.into(),
        retry_after_secs: None,
    }
}

/// `reject(...)` as a request decision.
pub fn reject(status: u16, code: &str, message: impl Into<String>) -> RequestDecision {
    RequestDecision::Reject(rejection(status, code, message))
}

/// Collects request changes; `finish` gives the decision.
#[derive(Default)]
pub struct Patch {
    ops: Vec<PatchOp>,
}

impl Patch {
    pub fn new() -> Self {
        Self::default()
    }

    /// Set the body field at `pointer` (RFC 6901, e.g. `/temperature`).
    pub fn set(&mut self, pointer: &str, value: &impl Serialize) -> &mut Self {
        if let Ok(json) = serde_json::to_string(value) {
            self.ops.push(PatchOp::SetField(FieldValue {
                pointer: pointer.to_owned(),
                json,
            }));
        }
        self
    }

    pub fn remove(&mut self, pointer: &str) -> &mut Self {
        self.ops.push(PatchOp::RemoveField(pointer.to_owned()));
        self
    }

    pub fn set_header(&mut self, name: &str, value: &str) -> &mut Self {
        self.ops.push(PatchOp::SetHeader(Header {
            name: name.to_owned(),
            value: value.to_owned(),
        }));
        self
    }

    pub fn set_model(&mut self, model: &str) -> &mut Self {
        self.ops.push(PatchOp::SetModel(model.to_owned()));
        self
    }

    pub fn set_pool(&mut self, pool: &str) -> &mut Self {
        self.ops.push(PatchOp::SetPool(pool.to_owned()));
        self
    }

    /// Cap the answer length at `n` tokens in the field the pool's engine
    /// reads, removing the other name: engines prefer
    /// `max_completion_tokens` when both are set, so leaving a larger value
    /// there would defeat the cap. OpenAI reasoning models refuse
    /// `max_tokens`, so `openai` pools get `max_completion_tokens`; every
    /// other dialect and the completions endpoint read `max_tokens`.
    pub fn set_max_output_tokens(&mut self, req: &RequestView, n: u32) -> &mut Self {
        if req.endpoint == "chat-completions" && req.dialect == "openai" {
            self.remove("/max_tokens").set("/max_completion_tokens", &n)
        } else {
            self.remove("/max_completion_tokens").set("/max_tokens", &n)
        }
    }

    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }

    /// `continue` when nothing changed, else `modify`.
    pub fn finish(self) -> RequestDecision {
        if self.ops.is_empty() {
            RequestDecision::Continue
        } else {
            RequestDecision::Modify(self.ops)
        }
    }
}

/// Log through the host (tagged with tenant, plugin and trace id there).
pub fn log(level: host::Level, message: &str) {
    host::log(level, message);
}

impl RequestView {
    /// The value of a visible request header, by case-insensitive name.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case(name))
            .map(|h| h.value.as_str())
    }
}

/// Helpers for plugins' native unit tests (the host imports cannot be
/// called there, so tests drive the pure decision functions).
pub mod testing {
    use super::*;

    /// A plain chat request for `model` on a `vllm` pool named `default`:
    /// one user message, 10 estimated input tokens, nothing else set.
    pub fn request(model: &str) -> RequestView {
        RequestView {
            tenant: "acme".to_owned(),
            key_id: "key-1".to_owned(),
            endpoint: "chat-completions".to_owned(),
            model: model.to_owned(),
            pool: "default".to_owned(),
            dialect: "vllm".to_owned(),
            messages: vec![Message {
                role: "user".to_owned(),
                text: "Hello".to_owned(),
            }],
            estimated_input_tokens: 10,
            max_output_tokens: None,
            temperature: None,
            top_p: None,
            thinking: ThinkingMode::Unspecified,
            reasoning_effort: None,
            stream: false,
            tools: Vec::new(),
            response_format: None,
            headers: Vec::new(),
            task: None,
            raw_json: None,
        }
    }

    /// A decision as short lines (`set /p json`, `remove /p`, `model m`,
    /// `pool p`, `header n: v`, `unset-header n`, `reject 400 code`), so
    /// tests can compare patches as plain strings.
    pub fn ops(decision: &RequestDecision) -> Vec<String> {
        match decision {
            RequestDecision::Continue => Vec::new(),
            RequestDecision::Reject(r) => vec![format!("reject {} {}", r.status, r.code)],
            RequestDecision::Modify(ops) => ops
                .iter()
                .map(|op| match op {
                    PatchOp::SetField(f) => format!("set {} {}", f.pointer, f.json),
                    PatchOp::RemoveField(p) => format!("remove {p}"),
                    PatchOp::SetHeader(h) => format!("header {}: {}", h.name, h.value),
                    PatchOp::RemoveHeader(n) => format!("unset-header {n}"),
                    PatchOp::SetModel(m) => format!("model {m}"),
                    PatchOp::SetPool(p) => format!("pool {p}"),
                })
                .collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(serde::Deserialize, Debug)]
    #[serde(deny_unknown_fields)]
    struct Cfg {
        #[serde(default)]
        limit: u32,
    }

    impl PluginConfig for Cfg {
        fn check(&self) -> Result<(), String> {
            if self.limit > 10 {
                return Err("limit: at most 10".to_owned());
            }
            Ok(())
        }
    }

    #[test]
    fn empty_or_null_config_means_defaults() {
        for text in ["", "  ", "null", "{}"] {
            assert_eq!(parse_config::<Cfg>(text).unwrap().limit, 0, "{text:?}");
        }
    }

    #[test]
    fn config_errors_say_what_is_wrong() {
        let e = parse_config::<Cfg>(r#"{"limt": 1}"#).unwrap_err();
        assert!(e.contains("unknown field `limt`"), "{e}");
        let e = parse_config::<Cfg>(r#"{"limit": 11}"#).unwrap_err();
        assert_eq!(e, "limit: at most 10");
    }

    #[test]
    fn type_errors_name_the_field_not_the_position() {
        let e = parse_config::<Cfg>(r#"{"limit": "lots"}"#).unwrap_err();
        assert_eq!(e, r#"limit: invalid type: string "lots", expected u32"#);
        #[derive(serde::Deserialize, Debug)]
        struct Outer {
            #[allow(dead_code)]
            models: std::collections::BTreeMap<String, Cfg>,
        }
        impl PluginConfig for Outer {}
        let e = parse_config::<Outer>(r#"{"models": {"m": {"limit": -1}}}"#).unwrap_err();
        assert_eq!(
            e,
            "models.m.limit: invalid value: integer `-1`, expected u32"
        );
        // Syntax errors keep their position: the text is all there is.
        let e = parse_config::<Cfg>(r#"{"limit": 1"#).unwrap_err();
        assert!(e.contains("line 1 column"), "{e}");
        let e = parse_config::<Cfg>(r#"{"limit": 1} x"#).unwrap_err();
        assert!(e.contains("trailing characters"), "{e}");
    }

    #[test]
    fn max_output_tokens_goes_where_the_pool_reads_it() {
        let mut req = testing::request("m");
        let mut p = Patch::new();
        p.set_max_output_tokens(&req, 100);
        assert_eq!(
            testing::ops(&p.finish()),
            ["remove /max_completion_tokens", "set /max_tokens 100"]
        );
        req.dialect = "openai".to_owned();
        let mut p = Patch::new();
        p.set_max_output_tokens(&req, 100);
        assert_eq!(
            testing::ops(&p.finish()),
            ["remove /max_tokens", "set /max_completion_tokens 100"]
        );
        req.endpoint = "completions".to_owned();
        let mut p = Patch::new();
        p.set_max_output_tokens(&req, 100);
        assert_eq!(
            testing::ops(&p.finish()),
            ["remove /max_completion_tokens", "set /max_tokens 100"]
        );
    }

    #[test]
    fn header_lookup_ignores_case() {
        let mut req = testing::request("m");
        req.headers.push(Header {
            name: "x-sluice-pool".to_owned(),
            value: "gpu-b".to_owned(),
        });
        assert_eq!(req.header("X-Sluice-Pool"), Some("gpu-b"));
        assert_eq!(req.header("x-sluice-other"), None);
    }
}
