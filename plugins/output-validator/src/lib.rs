//! Validates the model's answer against what the request asked for: the
//! `response_format` (JSON object or JSON schema) and the declared tools'
//! parameter schemas. A wrong answer is sent back to the model with precise
//! feedback while a retry is possible, and refused with 422 otherwise.

use serde::Deserialize;
use serde_json::Value;
use sluice_plugin_kit::*;
use std::sync::OnceLock;

const NAME: &str = "output-validator";

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Retries (new answers from the engine) before refusing. Default 1.
    #[serde(default = "one")]
    pub max_retries: u32,
    /// Check the content against `response_format`. Default true.
    #[serde(default = "yes")]
    pub response_format: bool,
    /// Check tool names and arguments. Default true.
    #[serde(default = "yes")]
    pub tool_calls: bool,
}

fn one() -> u32 {
    1
}

fn yes() -> bool {
    true
}

impl PluginConfig for Config {}

/// One thing wrong with an answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Problem {
    /// Not JSON, or JSON that does not match the `json_schema` format.
    Schema(String),
    /// `json_object` format, but the content is not a JSON object.
    NotObject(String),
    /// A call to a tool the request did not declare.
    UnknownTool { name: String, declared: Vec<String> },
    /// A tool call whose arguments are not JSON or miss the parameters schema.
    Arguments { name: String, error: String },
}

impl Problem {
    /// For the model, as the retry's user message: what was wrong and what to do.
    fn feedback(&self) -> String {
        match self {
            Problem::Schema(e) => format!(
                "Your previous answer was not valid JSON for the requested schema: {e}. \
                 Answer again with only JSON that matches the schema."
            ),
            Problem::NotObject(e) => format!(
                "Your previous answer was not a JSON object: {e}. \
                 Answer again with only a JSON object."
            ),
            Problem::UnknownTool { name, declared } if declared.is_empty() => format!(
                "Your previous answer called the tool `{name}`, but no tools are available. \
                 Answer without calling a tool."
            ),
            Problem::UnknownTool { name, declared } => format!(
                "Your previous answer called the tool `{name}`, which does not exist; \
                 the available tools are: {}. Call only one of those.",
                declared.join(", ")
            ),
            Problem::Arguments { name, error } => format!(
                "Your previous answer called `{name}` with arguments that do not match its \
                 parameters schema: {error}. Call `{name}` again with arguments that match the schema."
            ),
        }
    }

    /// For the client, in the 422 message.
    fn describe(&self) -> String {
        match self {
            Problem::Schema(e) => {
                format!("the answer is not valid JSON for the requested schema: {e}")
            }
            Problem::NotObject(e) => format!("the answer is not a JSON object: {e}"),
            Problem::UnknownTool { name, .. } => {
                format!("the answer calls the undeclared tool `{name}`")
            }
            Problem::Arguments { name, error } => {
                format!(
                    "the arguments of the call to `{name}` do not match its parameters: {error}"
                )
            }
        }
    }
}

/// The problems with an answer; empty when it is valid. `validate` checks a
/// JSON instance against a JSON schema (both as text): the host import in
/// the plugin, a stand-in in tests.
pub fn problems(
    req: &RequestView,
    resp: &ResponseView,
    cfg: &Config,
    validate: &dyn Fn(&str, &str) -> Result<(), String>,
) -> Vec<Problem> {
    let mut found = Vec::new();
    // A tool-calling turn carries no final answer yet: the format applies
    // to the answer that follows the tool results.
    if cfg.response_format
        && resp.tool_calls.is_empty()
        && let Some(format) = req.response_format.as_deref()
        && let Some(p) = check_format(format, &resp.content, validate)
    {
        found.push(p);
    }
    if cfg.tool_calls {
        for call in &resp.tool_calls {
            let Some(tool) = req.tools.iter().find(|t| t.name == call.name) else {
                found.push(Problem::UnknownTool {
                    name: call.name.clone(),
                    declared: req.tools.iter().map(|t| t.name.clone()).collect(),
                });
                continue;
            };
            let error = match serde_json::from_str::<Value>(&call.arguments) {
                Err(e) => Some(format!("not valid JSON ({e})")),
                // Clients decode arguments into keyword arguments or a
                // record; OpenAI always sends an object.
                Ok(v) if !v.is_object() => Some("not a JSON object".to_owned()),
                Ok(_) => validate(&tool.parameters, &call.arguments).err(),
            };
            if let Some(error) = error {
                found.push(Problem::Arguments {
                    name: call.name.clone(),
                    error,
                });
            }
        }
    }
    found
}

/// Check `content` against a `response_format` given as JSON text.
fn check_format(
    format: &str,
    content: &str,
    validate: &dyn Fn(&str, &str) -> Result<(), String>,
) -> Option<Problem> {
    // The host parsed the request already; a format it let through but that
    // is not JSON here would be a host bug, and the answer is not at fault.
    let format: Value = serde_json::from_str(format).ok()?;
    match format.get("type").and_then(Value::as_str)? {
        "json_schema" => {
            if let Err(e) = serde_json::from_str::<Value>(content) {
                return Some(Problem::Schema(format!("not valid JSON ({e})")));
            }
            // No schema given: any JSON will do.
            let schema = format.pointer("/json_schema/schema")?;
            validate(&schema.to_string(), content)
                .err()
                .map(Problem::Schema)
        }
        "json_object" => match serde_json::from_str::<Value>(content) {
            Err(e) => Some(Problem::NotObject(format!("not valid JSON ({e})"))),
            Ok(Value::Object(_)) => None,
            Ok(other) => Some(Problem::NotObject(format!("it is {}", kind(&other)))),
        },
        _ => None,
    }
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// Accept, retry with feedback, or refuse.
pub fn verdict(
    req: &RequestView,
    resp: &ResponseView,
    cfg: &Config,
    validate: &dyn Fn(&str, &str) -> Result<(), String>,
) -> ResponseVerdict {
    let found = problems(req, resp, cfg, validate);
    if found.is_empty() {
        return ResponseVerdict::Accept;
    }
    // A cut-off answer is the likeliest cause of broken JSON; say so.
    let cut = resp.finish_reason == "length";
    if !resp.streamed && resp.attempt < cfg.max_retries {
        let mut feedback: Vec<String> = found.iter().map(Problem::feedback).collect();
        if cut {
            feedback.push(
                "Your previous answer was cut off at the output token limit; keep this one shorter."
                    .to_owned(),
            );
        }
        return ResponseVerdict::Retry(feedback.join("\n"));
    }
    let mut message = found
        .iter()
        .map(Problem::describe)
        .collect::<Vec<_>>()
        .join("; ");
    if cut {
        message.push_str(" (the answer was cut off at the output token limit)");
    }
    if resp.attempt > 0 {
        let s = if resp.attempt == 1 {
            "retry"
        } else {
            "retries"
        };
        message.push_str(&format!(" (after {} {s})", resp.attempt));
    }
    ResponseVerdict::Reject(rejection(422, "output_validation_failed", message))
}

static CONFIG: OnceLock<Result<Config, String>> = OnceLock::new();

struct OutputValidator;

impl Guest for OutputValidator {
    fn describe() -> Result<PluginInfo, String> {
        described::<Config>(info(NAME).on_response())
    }

    fn on_request(_: RequestView) -> RequestDecision {
        RequestDecision::Continue
    }

    fn on_response_chunk(_: ChunkView) -> ChunkVerdict {
        ChunkVerdict::Accept
    }

    fn on_response(req: RequestView, resp: ResponseView) -> ResponseVerdict {
        match cached_config(&CONFIG, NAME) {
            Ok(cfg) => verdict(&req, &resp, cfg, &host::validate_json),
            Err(r) => ResponseVerdict::Reject(r),
        }
    }
}

export_plugin!(OutputValidator);

#[cfg(test)]
mod tests {
    use super::*;
    use sluice_plugin_kit::testing::request;

    /// A stand-in for the host's validator that understands `required`.
    fn fake_validate(schema: &str, instance: &str) -> Result<(), String> {
        let schema: Value = serde_json::from_str(schema).unwrap();
        let instance: Value = serde_json::from_str(instance).unwrap();
        for key in schema["required"].as_array().into_iter().flatten() {
            let key = key.as_str().unwrap();
            if instance.get(key).is_none() {
                return Err(format!("\"{key}\" is a required property"));
            }
        }
        Ok(())
    }

    fn cfg(json: &str) -> Config {
        parse_config(json).unwrap()
    }

    fn answer(content: &str) -> ResponseView {
        ResponseView {
            content: content.to_owned(),
            reasoning: String::new(),
            tool_calls: Vec::new(),
            finish_reason: "stop".to_owned(),
            usage: None,
            streamed: false,
            attempt: 0,
        }
    }

    fn call(name: &str, arguments: &str) -> ToolCall {
        ToolCall {
            id: "c1".to_owned(),
            name: name.to_owned(),
            arguments: arguments.to_owned(),
        }
    }

    fn schema_request() -> RequestView {
        let mut req = request("m");
        req.response_format = Some(
            r#"{"type":"json_schema","json_schema":{"name":"p","schema":{"type":"object","required":["city"]}}}"#
                .to_owned(),
        );
        req
    }

    fn tools_request() -> RequestView {
        let mut req = request("m");
        req.tools = vec![Tool {
            name: "get_weather".to_owned(),
            parameters: r#"{"type":"object","required":["city"]}"#.to_owned(),
        }];
        req
    }

    fn run(req: &RequestView, resp: &ResponseView, c: &Config) -> ResponseVerdict {
        verdict(req, resp, c, &fake_validate)
    }

    #[test]
    fn valid_schema_answer_is_accepted() {
        let v = run(
            &schema_request(),
            &answer(r#" {"city": "Oslo"} "#),
            &cfg("{}"),
        );
        assert!(matches!(v, ResponseVerdict::Accept), "{v:?}");
    }

    #[test]
    fn schema_mismatch_gets_a_retry_with_the_error() {
        let v = run(
            &schema_request(),
            &answer(r#"{"town": "Oslo"}"#),
            &cfg("{}"),
        );
        let ResponseVerdict::Retry(feedback) = v else {
            panic!("{v:?}")
        };
        assert_eq!(
            feedback,
            "Your previous answer was not valid JSON for the requested schema: \"city\" is a \
             required property. Answer again with only JSON that matches the schema."
        );
    }

    #[test]
    fn broken_json_after_the_last_retry_is_a_422() {
        let mut resp = answer(r#"{"city": "Os"#);
        resp.attempt = 1;
        resp.finish_reason = "length".to_owned();
        let ResponseVerdict::Reject(r) = run(&schema_request(), &resp, &cfg("{}")) else {
            panic!()
        };
        assert_eq!(
            (r.status, r.code.as_str()),
            (422, "output_validation_failed")
        );
        assert!(
            r.message.starts_with(
                "the answer is not valid JSON for the requested schema: not valid JSON (EOF"
            ),
            "{}",
            r.message
        );
        assert!(
            r.message
                .ends_with("(the answer was cut off at the output token limit) (after 1 retry)"),
            "{}",
            r.message
        );
    }

    #[test]
    fn streams_are_never_retried() {
        let mut resp = answer("not json");
        resp.streamed = true;
        assert!(matches!(
            run(&schema_request(), &resp, &cfg("{}")),
            ResponseVerdict::Reject(_)
        ));
        let c = cfg(r#"{"max_retries": 0}"#);
        assert!(matches!(
            run(&schema_request(), &answer("x"), &c),
            ResponseVerdict::Reject(_)
        ));
    }

    #[test]
    fn json_object_format_needs_an_object() {
        let mut req = request("m");
        req.response_format = Some(r#"{"type":"json_object"}"#.to_owned());
        let c = cfg(r#"{"max_retries": 0}"#);
        assert!(matches!(
            run(&req, &answer(r#"{"a":1}"#), &c),
            ResponseVerdict::Accept
        ));
        let ResponseVerdict::Reject(r) = run(&req, &answer("[1, 2]"), &c) else {
            panic!()
        };
        assert_eq!(r.message, "the answer is not a JSON object: it is an array");
        req.response_format = Some(r#"{"type":"text"}"#.to_owned());
        assert!(matches!(
            run(&req, &answer("[1, 2]"), &c),
            ResponseVerdict::Accept
        ));
    }

    #[test]
    fn tool_arguments_are_checked_against_the_tool_schema() {
        let req = tools_request();
        let mut resp = answer("");
        resp.tool_calls = vec![call("get_weather", r#"{"city":"Oslo"}"#)];
        assert!(matches!(
            run(&req, &resp, &cfg("{}")),
            ResponseVerdict::Accept
        ));

        resp.tool_calls = vec![call("get_weather", r#"{"town":"Oslo"}"#)];
        let ResponseVerdict::Retry(feedback) = run(&req, &resp, &cfg("{}")) else {
            panic!()
        };
        assert_eq!(
            feedback,
            "Your previous answer called `get_weather` with arguments that do not match its \
             parameters schema: \"city\" is a required property. Call `get_weather` again with \
             arguments that match the schema."
        );

        resp.tool_calls = vec![call("get_weather", "[]"), call("get_weather", "{oops")];
        let found = problems(&req, &resp, &cfg("{}"), &fake_validate);
        assert_eq!(found.len(), 2);
        assert_eq!(
            found[0],
            Problem::Arguments {
                name: "get_weather".to_owned(),
                error: "not a JSON object".to_owned()
            }
        );
    }

    #[test]
    fn undeclared_tools_are_named() {
        let req = tools_request();
        let mut resp = answer("");
        resp.tool_calls = vec![call("delete_account", "{}")];
        let ResponseVerdict::Retry(feedback) = run(&req, &resp, &cfg("{}")) else {
            panic!()
        };
        assert!(
            feedback.contains(
                "`delete_account`, which does not exist; the available tools are: get_weather"
            ),
            "{feedback}"
        );
        let mut resp = answer("");
        resp.tool_calls = vec![call("x", "{}")];
        let ResponseVerdict::Retry(feedback) = run(&request("m"), &resp, &cfg("{}")) else {
            panic!()
        };
        assert!(feedback.contains("no tools are available"), "{feedback}");
    }

    #[test]
    fn tool_calling_turns_skip_the_format_check() {
        let mut req = schema_request();
        req.tools = tools_request().tools;
        let mut resp = answer("");
        resp.tool_calls = vec![call("get_weather", r#"{"city":"Oslo"}"#)];
        assert!(matches!(
            run(&req, &resp, &cfg("{}")),
            ResponseVerdict::Accept
        ));
    }

    #[test]
    fn checks_can_be_switched_off() {
        let c = cfg(r#"{"response_format": false, "tool_calls": false}"#);
        let mut resp = answer("not json");
        resp.tool_calls = vec![call("nope", "nope")];
        assert!(matches!(
            run(&schema_request(), &resp, &c),
            ResponseVerdict::Accept
        ));
    }

    #[test]
    fn schema_without_a_schema_accepts_any_json() {
        let mut req = request("m");
        req.response_format =
            Some(r#"{"type":"json_schema","json_schema":{"name":"x"}}"#.to_owned());
        let c = cfg("{}");
        assert!(matches!(
            run(&req, &answer("3"), &c),
            ResponseVerdict::Accept
        ));
        assert!(matches!(
            run(&req, &answer("three"), &c),
            ResponseVerdict::Retry(_)
        ));
    }

    #[test]
    fn bad_configs_are_explained() {
        let e = parse_config::<Config>(r#"{"retries": 2}"#).unwrap_err();
        assert!(e.contains("unknown field `retries`"), "{e}");
        let c = cfg("{}");
        assert_eq!(
            (c.max_retries, c.response_format, c.tool_calls),
            (1, true, true)
        );
    }
}
