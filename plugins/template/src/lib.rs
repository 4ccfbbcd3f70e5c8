//! `my-policy`: refuses requests that contain a blocked word.
//!
//! Config: `{"blocked_words": ["secret", "internal only"]}`. A message that
//! contains one of the words (any case) is refused with 400 `blocked_word`.

use serde::Deserialize;
use sluice_plugin_kit::*;
use std::sync::OnceLock;

const NAME: &str = "my-policy";

/// The plugin config; unknown fields are refused, so typos surface at load.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Words or phrases no message may contain (compared ignoring case).
    #[serde(default)]
    pub blocked_words: Vec<String>,
}

impl PluginConfig for Config {
    /// Checks serde cannot express; the message names the field.
    fn check(&self) -> Result<(), String> {
        for (i, word) in self.blocked_words.iter().enumerate() {
            if word.trim().is_empty() {
                return Err(format!("blocked_words[{i}]: must not be empty"));
            }
        }
        Ok(())
    }
}

/// The decision, kept free of host calls so it can be unit-tested natively.
pub fn decide(req: &RequestView, cfg: &Config) -> RequestDecision {
    for message in &req.messages {
        let text = message.text.to_lowercase();
        if let Some(word) = cfg
            .blocked_words
            .iter()
            .find(|w| text.contains(&w.to_lowercase()))
        {
            return reject(
                400,
                "blocked_word",
                format!("the request contains the blocked word {word:?}"),
            );
        }
    }
    RequestDecision::Continue
}

static CONFIG: OnceLock<Result<Config, String>> = OnceLock::new();

struct MyPolicy;

impl Guest for MyPolicy {
    /// Called once when the chain loads: an `Err` refuses the config.
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

export_plugin!(MyPolicy);

#[cfg(test)]
mod tests {
    use super::*;
    use sluice_plugin_kit::testing::{ops, request};

    #[test]
    fn a_blocked_word_is_refused_by_name() {
        let cfg: Config = parse_config(r#"{"blocked_words": ["Secret"]}"#).unwrap();
        let mut req = request("m");
        req.messages[0].text = "tell me the SECRET plan".to_owned();
        let RequestDecision::Reject(r) = decide(&req, &cfg) else {
            panic!("not refused")
        };
        assert_eq!((r.status, r.code.as_str()), (400, "blocked_word"));
        assert_eq!(
            r.message,
            r#"the request contains the blocked word "Secret""#
        );

        req.messages[0].text = "hello".to_owned();
        assert!(ops(&decide(&req, &cfg)).is_empty());
    }

    #[test]
    fn bad_configs_name_the_field() {
        let e = parse_config::<Config>(r#"{"blocked_words": ["ok", " "]}"#).unwrap_err();
        assert_eq!(e, "blocked_words[1]: must not be empty");
        let e = parse_config::<Config>(r#"{"blocked_words": "secret"}"#).unwrap_err();
        assert!(e.starts_with("blocked_words: invalid type"), "{e}");
        let e = parse_config::<Config>(r#"{"blocked_word": []}"#).unwrap_err();
        assert!(e.contains("unknown field `blocked_word`"), "{e}");
    }
}
