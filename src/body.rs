//! The one response body type every layer returns.

use bytes::Bytes;
use http_body_util::{BodyExt, Full, combinators::UnsyncBoxBody};

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Either a complete buffer (errors, `/v1/models`) or a relayed engine stream.
pub type ProxyBody = UnsyncBoxBody<Bytes, BoxError>;

pub fn full(bytes: impl Into<Bytes>) -> ProxyBody {
    Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed_unsync()
}

pub fn json(value: &serde_json::Value) -> ProxyBody {
    full(serde_json::to_vec(value).unwrap_or_default())
}
