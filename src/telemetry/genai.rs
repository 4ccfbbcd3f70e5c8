//! What an engine's answer says about itself — response id, finish reasons,
//! token usage — for the engine attempt's span (GenAI semantic conventions).
//! Read from a whole JSON answer or from SSE events as they pass, without
//! parsing every chunk: only events that can carry these facts are parsed.

use serde_json::Value;

/// Token usage as OpenAI-compatible engines report it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    pub input: u64,
    pub cached_input: u64,
    pub output: u64,
    pub reasoning: u64,
}

impl Usage {
    pub fn from_json(u: &Value) -> Option<Usage> {
        let n = |v: &Value| v.as_u64().unwrap_or(0);
        u.is_object().then(|| Usage {
            input: n(&u["prompt_tokens"]),
            cached_input: n(&u["prompt_tokens_details"]["cached_tokens"]),
            output: n(&u["completion_tokens"]),
            reasoning: n(&u["completion_tokens_details"]["reasoning_tokens"]),
        })
    }
}

#[derive(Debug, Default)]
pub struct ResponseFacts {
    pub id: Option<String>,
    pub finish_reasons: Vec<String>,
    pub usage: Option<Usage>,
    /// Bytes of an SSE line not yet ended.
    line: Vec<u8>,
}

/// Longest SSE line kept while waiting for its end; a longer one (a huge
/// content chunk) cannot carry facts we need that the next lines do not.
const MAX_LINE: usize = 64 << 10;

impl ResponseFacts {
    /// A whole (non-streamed) answer.
    pub fn observe_json(&mut self, doc: &Value) {
        if self.id.is_none() {
            self.id = doc["id"].as_str().map(str::to_owned);
        }
        for c in doc["choices"].as_array().into_iter().flatten() {
            if let Some(r) = c["finish_reason"].as_str() {
                self.finish_reasons.push(r.to_owned());
            }
        }
        if let Some(u) = Usage::from_json(&doc["usage"]) {
            self.usage = Some(u);
        }
    }

    /// A piece of an SSE stream, in order.
    pub fn observe_sse(&mut self, mut bytes: &[u8]) {
        while let Some(nl) = bytes.iter().position(|&b| b == b'\n') {
            if self.line.is_empty() {
                self.line_done(&bytes[..nl]);
            } else {
                let mut line = std::mem::take(&mut self.line);
                line.extend_from_slice(&bytes[..nl]);
                self.line_done(&line);
            }
            bytes = &bytes[nl + 1..];
        }
        if self.line.len() + bytes.len() <= MAX_LINE {
            self.line.extend_from_slice(bytes);
        } else {
            self.line.clear();
        }
    }

    fn line_done(&mut self, line: &[u8]) {
        let Some(data) = line.strip_prefix(b"data:") else {
            return;
        };
        let data = data.trim_ascii();
        // Only the first event (id), ends of choices and the usage chunk
        // are worth a parse.
        let wanted = self.id.is_none()
            || (contains(data, b"\"usage\":") && !contains(data, b"\"usage\":null"))
            || (contains(data, b"\"finish_reason\":\"")
                && !contains(data, b"\"finish_reason\":null"));
        if !wanted || !data.starts_with(b"{") {
            return;
        }
        if let Ok(doc) = serde_json::from_slice::<Value>(data) {
            self.observe_json(&doc);
        }
    }
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

/// Put what the answer said on the engine attempt's span.
pub fn record(span: &tracing::Span, facts: &ResponseFacts) {
    if let Some(id) = &facts.id {
        span.record("gen_ai.response.id", id.as_str());
    }
    if !facts.finish_reasons.is_empty() {
        span.record(
            "gen_ai.response.finish_reasons",
            facts.finish_reasons.join(",").as_str(),
        );
    }
    if let Some(u) = facts.usage {
        span.record("gen_ai.usage.input_tokens", u.input);
        span.record("gen_ai.usage.output_tokens", u.output);
        span.record("gen_ai.usage.cache_read.input_tokens", u.cached_input);
        span.record("gen_ai.usage.reasoning.output_tokens", u.reasoning);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sse_split_anywhere_gives_the_same_facts() {
        let stream = concat!(
            "data: {\"id\":\"c1\",\"choices\":[{\"delta\":{\"content\":\"he\"},\"finish_reason\":null}]}\n\n",
            "data: {\"id\":\"c1\",\"choices\":[{\"delta\":{},\"finish_reason\":\"length\"}]}\n\n",
            "data: {\"id\":\"c1\",\"choices\":[],\"usage\":{\"prompt_tokens\":7,\"completion_tokens\":3,",
            "\"prompt_tokens_details\":{\"cached_tokens\":4},\"completion_tokens_details\":{\"reasoning_tokens\":1}}}\n\n",
            "data: [DONE]\n\n"
        )
        .as_bytes();
        for cut in [1, 5, 17, 64, stream.len()] {
            let mut f = ResponseFacts::default();
            for piece in stream.chunks(cut) {
                f.observe_sse(piece);
            }
            assert_eq!(f.id.as_deref(), Some("c1"), "cut {cut}");
            assert_eq!(f.finish_reasons, vec!["length"], "cut {cut}");
            assert_eq!(
                f.usage,
                Some(Usage {
                    input: 7,
                    cached_input: 4,
                    output: 3,
                    reasoning: 1
                }),
                "cut {cut}"
            );
        }
    }
}
