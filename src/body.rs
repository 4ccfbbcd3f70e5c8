//! The one response body type every layer returns, and bounded reading of
//! request bodies.

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

/// Why a request body could not be read whole.
#[derive(Debug)]
pub enum ReadError {
    /// Over the limit (announced by `Content-Length`, or found reading).
    TooLarge,
    /// Not all there within the time allowed.
    Timeout,
    /// The connection failed while reading.
    Failed(String),
}

/// Read a whole request body, at most `limit` bytes within `timeout`; a
/// `Content-Length` over the limit is refused before reading anything.
pub async fn read_limited(
    body: hyper::body::Incoming,
    headers: &http::HeaderMap,
    limit: usize,
    timeout: std::time::Duration,
) -> Result<Bytes, ReadError> {
    let declared = headers
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(ReadError::TooLarge);
    }
    match tokio::time::timeout(timeout, http_body_util::Limited::new(body, limit).collect()).await {
        Err(_) => Err(ReadError::Timeout),
        Ok(Ok(c)) => Ok(c.to_bytes()),
        Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => Err(ReadError::TooLarge),
        Ok(Err(e)) => Err(ReadError::Failed(e.to_string())),
    }
}
