//! The one response body type every layer returns, and bounded reading of
//! request bodies.

use bytes::{Buf, BufMut, Bytes};
use http::{HeaderMap, HeaderValue};
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
        // One copy, also of a body that came in one chunk: that chunk is a
        // slice of hyper's read buffer (see `detach_headers`).
        Ok(Ok(c)) => {
            let mut chunks = c.aggregate();
            let mut copy = Vec::with_capacity(chunks.remaining());
            copy.put(&mut chunks);
            Ok(Bytes::from(copy))
        }
        Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => Err(ReadError::TooLarge),
        Ok(Err(e)) => Err(ReadError::Failed(e.to_string())),
    }
}

/// hyper parses header values (and the URI, and a small body) as slices of
/// its connection's read buffer, and reads on into a new buffer while they
/// live: whatever a waiting request holds of them keeps an 8 KiB buffer per
/// connection alive. Copies of the values let it go.
pub fn detach_headers(headers: &HeaderMap) -> HeaderMap {
    let mut out = HeaderMap::with_capacity(headers.len());
    for (name, value) in headers {
        let copy = match HeaderValue::from_bytes(value.as_bytes()) {
            Ok(mut v) => {
                v.set_sensitive(value.is_sensitive());
                v
            }
            // Not expected of a value hyper accepted; keep it as it is.
            Err(_) => value.clone(),
        };
        out.append(name.clone(), copy);
    }
    out
}
