//! Deterministic tokenizer and output generator.
//!
//! Nothing here is a real model: the goal is output that is cheap to make,
//! reproducible for a given prompt and seed, and shaped like what vLLM sends
//! (reasoning, text, tool calls, schema-conforming JSON).

use std::hash::{DefaultHasher, Hash, Hasher};

use serde_json::{Map, Value};

pub(crate) type Token = u32;

/// Long words are cut into pieces of this many characters, which gives the
/// ≈ 4 characters per token of real BPE vocabularies on English text.
const WORD_PIECE: usize = 4;

/// Characters per tool-argument / JSON fragment (one fragment = one token).
const JSON_PIECE: usize = 4;

/// Depth limit for schema walking: recursive `$ref`s must not loop forever.
const MAX_SCHEMA_DEPTH: u8 = 12;
/// Total values generated for one schema, whatever its shape.
const MAX_SCHEMA_NODES: usize = 4096;
/// Items generated for an array (`minItems` above this is not honoured).
const MAX_ARRAY_ITEMS: u64 = 8;

/// Short words only (≤ [`WORD_PIECE`] chars), so re-tokenising generated
/// text yields exactly one token per generated word.
const VOCAB: &[&str] = &[
    "the", "flow", "gate", "of", "data", "runs", "past", "a", "weir", "and", "each", "pool",
    "holds", "its", "own", "tide", "when", "load", "is", "high", "some", "wait", "in", "line",
    "for", "slot", "then", "move", "on", "with", "care", "to", "keep", "rate", "even", "it", "may",
    "take", "time", "but", "all", "get", "out", "so", "we", "can", "see", "how", "well", "fast",
    "next", "part", "runs", "far", "more", "than", "one", "path", "goes", "up", "now",
];

fn fnv1a(basis: u32, bytes: &[u8]) -> u32 {
    bytes
        .iter()
        .fold(basis, |h, b| (h ^ u32::from(*b)).wrapping_mul(0x0100_0193))
}

const TEXT_BASIS: u32 = 0x811c_9dc5;
const SPECIAL_BASIS: u32 = 0x9e37_79b9;

/// Calls `f` with each token's text: runs of alphanumerics (split every
/// [`WORD_PIECE`] chars) and single punctuation characters; whitespace only
/// separates.
fn for_each_piece(text: &str, mut f: impl FnMut(&str)) {
    let mut word: Option<(usize, usize)> = None; // (start byte, chars so far)
    for (i, c) in text.char_indices() {
        if c.is_alphanumeric() || c == '_' {
            let (start, n) = word.unwrap_or((i, 0));
            if n + 1 == WORD_PIECE {
                f(&text[start..i + c.len_utf8()]);
                word = None;
            } else {
                word = Some((start, n + 1));
            }
            continue;
        }
        if let Some((start, _)) = word.take() {
            f(&text[start..i]);
        }
        if !c.is_whitespace() {
            f(&text[i..i + c.len_utf8()]);
        }
    }
    if let Some((start, _)) = word {
        f(&text[start..]);
    }
}

pub(crate) fn tokenize_into(text: &str, out: &mut Vec<Token>) {
    for_each_piece(text, |p| out.push(fnv1a(TEXT_BASIS, p.as_bytes())));
}

#[cfg(test)]
pub(crate) fn count_tokens(text: &str) -> usize {
    let mut n = 0;
    for_each_piece(text, |_| n += 1);
    n
}

/// A chat-template token (role markers, BOS, ...), disjoint in spirit from text tokens.
pub(crate) fn special(name: &str) -> Token {
    fnv1a(SPECIAL_BASIS, name.as_bytes())
}

pub(crate) fn hash_tokens(seed: u64, tokens: &[Token]) -> u64 {
    let mut h = DefaultHasher::new();
    seed.hash(&mut h);
    tokens.hash(&mut h);
    h.finish()
}

/// Word stream for generated prose.
pub(crate) struct TextGen {
    rng: fastrand::Rng,
    at_start: bool,
    sentence_start: bool,
    since_punct: u32,
}

impl TextGen {
    pub(crate) fn new(seed: u64) -> Self {
        Self {
            rng: fastrand::Rng::with_seed(seed),
            at_start: true,
            sentence_start: true,
            since_punct: 0,
        }
    }

    fn word(&mut self) -> &'static str {
        VOCAB[self.rng.usize(..VOCAB.len())]
    }

    /// The next token's text, including its leading space.
    pub(crate) fn next_token(&mut self) -> String {
        if self.since_punct >= 5 && self.rng.u8(..4) == 0 {
            self.since_punct = 0;
            let full_stop = self.rng.u8(..3) > 0;
            self.sentence_start = full_stop;
            return if full_stop { "." } else { "," }.to_owned();
        }
        self.since_punct += 1;
        let word = self.word();
        let mut out = String::with_capacity(word.len() + 1);
        if !self.at_start {
            out.push(' ');
        }
        if self.sentence_start {
            let mut chars = word.chars();
            if let Some(first) = chars.next() {
                out.extend(first.to_uppercase());
                out.push_str(chars.as_str());
            }
        } else {
            out.push_str(word);
        }
        self.at_start = false;
        self.sentence_start = false;
        out
    }

    /// `n` words separated by spaces (for JSON string values).
    pub(crate) fn phrase(&mut self, n: usize) -> String {
        let words: Vec<&str> = (0..n.max(1)).map(|_| self.word()).collect();
        words.join(" ")
    }
}

/// Builds a value that satisfies the common parts of a JSON schema. `root`
/// resolves local `$ref`s (`#/$defs/...`, `#/definitions/...`).
pub(crate) fn value_from_schema(schema: &Value, root: &Value, text: &mut TextGen) -> Value {
    SchemaWalk {
        root,
        text,
        nodes_left: MAX_SCHEMA_NODES,
    }
    .value(schema, 0)
}

struct SchemaWalk<'a> {
    root: &'a Value,
    text: &'a mut TextGen,
    /// Shared budget: nested arrays and recursive `$ref`s would otherwise
    /// grow the output exponentially with depth.
    nodes_left: usize,
}

impl SchemaWalk<'_> {
    fn value(&mut self, schema: &Value, depth: u8) -> Value {
        if self.nodes_left == 0 {
            return Value::Null;
        }
        // Even the nulls that cut off deep recursion count against the budget.
        self.nodes_left -= 1;
        if depth > MAX_SCHEMA_DEPTH {
            return Value::Null;
        }
        let Some(s) = schema.as_object() else {
            // `true` / `{}`-like schemas accept anything.
            return Value::String(self.text.phrase(1));
        };
        if let Some(target) = s.get("$ref").and_then(Value::as_str) {
            let root = self.root;
            return match target.strip_prefix('#').and_then(|p| root.pointer(p)) {
                Some(resolved) => self.value(resolved, depth + 1),
                None => Value::Null,
            };
        }
        if let Some(v) = s.get("const") {
            return v.clone();
        }
        if let Some(first) = s
            .get("enum")
            .and_then(Value::as_array)
            .and_then(|e| e.first())
        {
            return first.clone();
        }
        for key in ["anyOf", "oneOf", "allOf"] {
            if let Some(first) = s.get(key).and_then(Value::as_array).and_then(|a| {
                // Prefer a non-null alternative so optional fields still carry data.
                a.iter()
                    .find(|alt| alt.get("type").and_then(Value::as_str) != Some("null"))
                    .or_else(|| a.first())
            }) {
                return self.value(first, depth + 1);
            }
        }
        let ty = match s.get("type") {
            Some(Value::String(t)) => t.as_str(),
            Some(Value::Array(ts)) => ts
                .iter()
                .filter_map(Value::as_str)
                .find(|t| *t != "null")
                .unwrap_or("null"),
            _ if s.contains_key("properties") => "object",
            _ if s.contains_key("items") => "array",
            _ => "string",
        };
        match ty {
            "object" => {
                let mut obj = Map::new();
                if let Some(props) = s.get("properties").and_then(Value::as_object) {
                    for (name, prop) in props {
                        if self.nodes_left == 0 {
                            break;
                        }
                        obj.insert(name.clone(), self.value(prop, depth + 1));
                    }
                }
                Value::Object(obj)
            }
            "array" => {
                let min = s.get("minItems").and_then(Value::as_u64).unwrap_or(1);
                let max = s
                    .get("maxItems")
                    .and_then(Value::as_u64)
                    .unwrap_or(u64::MAX);
                let n = min.max(1).min(max).min(MAX_ARRAY_ITEMS);
                let item = s.get("items").unwrap_or(&Value::Null);
                Value::Array(
                    (0..n)
                        .map_while(|_| (self.nodes_left > 0).then(|| self.value(item, depth + 1)))
                        .collect(),
                )
            }
            "integer" => {
                let lo = bound(s, "minimum", "exclusiveMinimum", 1.0).ceil();
                let hi = bound(s, "maximum", "exclusiveMaximum", -1.0).floor();
                Value::from(clamp(42.0, lo, hi) as i64)
            }
            "number" => {
                let lo = bound(s, "minimum", "exclusiveMinimum", 0.5);
                let hi = bound(s, "maximum", "exclusiveMaximum", -0.5);
                serde_json::Number::from_f64(clamp(4.2, lo, hi)).map_or(Value::Null, Value::Number)
            }
            "boolean" => Value::Bool(true),
            "null" => Value::Null,
            _ => Value::String(match s.get("format").and_then(Value::as_str) {
                Some("date") => "2025-01-01".to_owned(),
                Some("date-time") => "2025-01-01T00:00:00Z".to_owned(),
                Some("time") => "12:00:00".to_owned(),
                Some("email") => "user@example.com".to_owned(),
                Some("uri" | "url") => "https://example.com/".to_owned(),
                Some("uuid") => "00000000-0000-4000-8000-000000000000".to_owned(),
                _ => self.text.phrase(1),
            }),
        }
    }
}

/// Inclusive bound from `inclusive` or `exclusive` (nudged by `nudge`);
/// NaN when absent so `clamp` ignores it.
fn bound(s: &Map<String, Value>, inclusive: &str, exclusive: &str, nudge: f64) -> f64 {
    if let Some(v) = s.get(inclusive).and_then(Value::as_f64) {
        v
    } else if let Some(v) = s.get(exclusive).and_then(Value::as_f64) {
        v + nudge
    } else {
        f64::NAN
    }
}

fn clamp(v: f64, lo: f64, hi: f64) -> f64 {
    let v = if lo.is_finite() { v.max(lo) } else { v };
    if hi.is_finite() { v.min(hi) } else { v }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Effort {
    Low,
    Medium,
    High,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum PieceKind {
    Reasoning,
    Content,
    /// The tool-call header (its text is the function name).
    ToolName,
    ToolArgs,
}

#[derive(Debug)]
pub(crate) struct Piece {
    pub(crate) kind: PieceKind,
    pub(crate) text: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Finish {
    Stop,
    Length,
    ToolCalls,
}

impl Finish {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Finish::Stop => "stop",
            Finish::Length => "length",
            Finish::ToolCalls => "tool_calls",
        }
    }
}

/// What the answer consists of after any reasoning.
pub(crate) enum Answer<'a> {
    Text,
    JsonObject,
    JsonSchema(&'a Value),
    Tool {
        name: &'a str,
        parameters: &'a Value,
    },
}

pub(crate) struct PlanSpec<'a> {
    /// Natural answer length in tokens (reasoning + text).
    pub(crate) natural: usize,
    /// Hard cap: `max_tokens`, or what is left of the context window.
    pub(crate) limit: usize,
    pub(crate) thinking: Option<Effort>,
    pub(crate) answer: Answer<'a>,
    /// Cut generated JSON in half (the `invalid_json` fault).
    pub(crate) break_json: bool,
}

/// The full output of one request, one entry per generated token.
pub(crate) struct Plan {
    pub(crate) pieces: Vec<Piece>,
    pub(crate) finish: Finish,
}

impl Plan {
    /// Concatenated text of all pieces of one kind.
    pub(crate) fn text(&self, kind: PieceKind) -> String {
        self.pieces
            .iter()
            .filter(|p| p.kind == kind)
            .map(|p| p.text.as_str())
            .collect()
    }

    pub(crate) fn count(&self, kind: PieceKind) -> usize {
        self.pieces.iter().filter(|p| p.kind == kind).count()
    }
}

pub(crate) fn plan(spec: &PlanSpec<'_>, seed: u64) -> Plan {
    // Never materialise more than one token past the cap: that is enough to
    // tell that the cap cut the answer, and keeps huge requested lengths cheap.
    let cap = spec.limit.saturating_add(1);
    // The split below does not depend on the cap: a model's thinking does
    // not know about max_tokens. Everything stays overflow-free for any size.
    let natural = spec.natural.max(1);
    let mut pieces = Vec::new();
    let mut budget = natural;
    if let Some(effort) = spec.thinking {
        let share = match effort {
            Effort::Low => natural / 4,
            Effort::Medium => natural / 2,
            Effort::High => natural - natural / 4,
        };
        // Keep at least one token on each side when the budget allows it.
        let n = share.clamp(1, natural.saturating_sub(1).max(1));
        let mut words = TextGen::new(seed ^ 0x7468_696e_6b21);
        pieces.extend((0..n.min(cap)).map(|_| Piece {
            kind: PieceKind::Reasoning,
            text: words.next_token(),
        }));
        budget = natural.saturating_sub(n).max(1);
    }
    let mut words = TextGen::new(seed);
    let finish = match spec.answer {
        Answer::Text => {
            let room = cap.saturating_sub(pieces.len());
            pieces.extend((0..budget.min(room)).map(|_| Piece {
                kind: PieceKind::Content,
                text: words.next_token(),
            }));
            Finish::Stop
        }
        Answer::JsonObject => {
            let n = budget.clamp(1, 24);
            let value = serde_json::json!({ "answer": words.phrase(n) });
            push_json(&mut pieces, PieceKind::Content, &value, spec.break_json);
            Finish::Stop
        }
        Answer::JsonSchema(schema) => {
            let value = value_from_schema(schema, schema, &mut words);
            push_json(&mut pieces, PieceKind::Content, &value, spec.break_json);
            Finish::Stop
        }
        Answer::Tool { name, parameters } => {
            pieces.push(Piece {
                kind: PieceKind::ToolName,
                text: name.to_owned(),
            });
            let value = value_from_schema(parameters, parameters, &mut words);
            push_json(&mut pieces, PieceKind::ToolArgs, &value, spec.break_json);
            Finish::ToolCalls
        }
    };
    if pieces.len() > spec.limit {
        pieces.truncate(spec.limit);
        return Plan {
            pieces,
            finish: Finish::Length,
        };
    }
    Plan { pieces, finish }
}

fn push_json(pieces: &mut Vec<Piece>, kind: PieceKind, value: &Value, broken: bool) {
    let mut json = value.to_string();
    if broken {
        let mut half = json.len() / 2;
        while !json.is_char_boundary(half) {
            half -= 1;
        }
        json.truncate(half);
    }
    let chars: Vec<char> = json.chars().collect();
    pieces.extend(chars.chunks(JSON_PIECE).map(|c| Piece {
        kind,
        text: c.iter().collect(),
    }));
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn tokenizer_splits_words_and_punctuation() {
        assert_eq!(count_tokens("Hello, world!"), 6); // Hell o , worl d !
        assert_eq!(count_tokens("a b  c"), 3);
        assert_eq!(count_tokens(""), 0);
        assert_eq!(count_tokens("ééééé"), 2);
    }

    #[test]
    fn generated_words_are_one_token_each() {
        let mut g = TextGen::new(7);
        let text: String = (0..50).map(|_| g.next_token()).collect();
        assert_eq!(count_tokens(&text), 50);
    }

    #[test]
    fn schema_values_follow_types() {
        let schema = json!({
            "type": "object",
            "properties": {
                "city": {"type": "string"},
                "unit": {"type": "string", "enum": ["celsius", "kelvin"]},
                "days": {"type": "integer", "minimum": 100},
                "tags": {"type": "array", "items": {"type": "boolean"}},
                "loc": {"$ref": "#/$defs/loc"}
            },
            "$defs": {"loc": {"type": "object", "properties": {"lat": {"type": "number"}}}}
        });
        let v = value_from_schema(&schema, &schema, &mut TextGen::new(1));
        assert!(v["city"].is_string());
        assert_eq!(v["unit"], "celsius");
        assert_eq!(v["days"], 100);
        assert_eq!(v["tags"], json!([true]));
        assert!(v["loc"]["lat"].is_f64());
    }

    #[test]
    fn recursive_schema_terminates() {
        let schema = json!({"type": "object", "properties": {"next": {"$ref": "#"}}});
        let v = value_from_schema(&schema, &schema, &mut TextGen::new(1));
        assert!(v["next"]["next"].is_object());
    }

    #[test]
    fn explosive_schemas_stay_small() {
        let nested = (0..12).fold(
            json!({"type": "string"}),
            |items, _| json!({"type": "array", "minItems": 8, "items": items}),
        );
        let v = value_from_schema(&nested, &nested, &mut TextGen::new(1));
        let len = v.to_string().len();
        assert!(len < 100_000, "{len}");

        let fan: serde_json::Map<String, Value> = (0..10)
            .map(|i| (format!("p{i}"), json!({"$ref": "#"})))
            .collect();
        let fan = json!({"type": "object", "properties": fan});
        let v = value_from_schema(&fan, &fan, &mut TextGen::new(1));
        let len = v.to_string().len();
        assert!(len < 100_000, "{len}");
    }

    #[test]
    fn huge_natural_length_is_capped() {
        let spec = PlanSpec {
            natural: usize::MAX,
            limit: 10,
            thinking: Some(Effort::High),
            answer: Answer::Text,
            break_json: false,
        };
        let p = plan(&spec, 1);
        assert_eq!(p.pieces.len(), 10);
        assert_eq!(p.finish, Finish::Length);
    }

    #[test]
    fn plan_respects_limit_and_thinking() {
        let spec = PlanSpec {
            natural: 10,
            limit: 4,
            thinking: Some(Effort::Medium),
            answer: Answer::Text,
            break_json: false,
        };
        let p = plan(&spec, 3);
        assert_eq!(p.pieces.len(), 4);
        assert_eq!(p.finish, Finish::Length);
        assert_eq!(p.count(PieceKind::Reasoning), 4);

        let spec = PlanSpec { limit: 100, ..spec };
        let p = plan(&spec, 3);
        assert_eq!(p.pieces.len(), 10);
        assert_eq!(p.count(PieceKind::Reasoning), 5);
        assert_eq!(p.finish, Finish::Stop);
    }

    #[test]
    fn broken_json_does_not_parse() {
        let spec = PlanSpec {
            natural: 8,
            limit: 1000,
            thinking: None,
            answer: Answer::JsonObject,
            break_json: true,
        };
        let p = plan(&spec, 9);
        let text = p.text(PieceKind::Content);
        assert!(serde_json::from_str::<Value>(&text).is_err());
    }
}
