//! API key -> tenant. Keys are known only by their SHA-256, so a leaked
//! config file leaks no key.

use std::collections::HashMap;

use http::HeaderMap;

use crate::config::{TenantConfig, hash_key};
use crate::errors::GatewayError;

/// Who is calling: an index into the gateway's tenants, and the key's name.
#[derive(Debug, Clone)]
pub struct Caller {
    pub tenant: usize,
    pub key_id: String,
}

pub struct KeyTable {
    by_hash: HashMap<String, Caller>,
}

impl KeyTable {
    pub fn new(tenants: &[TenantConfig]) -> KeyTable {
        let mut by_hash = HashMap::new();
        for (tenant, t) in tenants.iter().enumerate() {
            for k in &t.api_keys {
                by_hash.insert(
                    k.sha256.to_ascii_lowercase(),
                    Caller {
                        tenant,
                        key_id: k.id.clone(),
                    },
                );
            }
        }
        KeyTable { by_hash }
    }

    /// `Authorization: Bearer <key>` (the OpenAI SDKs' way).
    pub fn authenticate(&self, headers: &HeaderMap) -> Result<Caller, GatewayError> {
        let value = headers
            .get(http::header::AUTHORIZATION)
            .ok_or(GatewayError::MissingApiKey)?;
        let value = value.to_str().map_err(|_| GatewayError::InvalidApiKey)?;
        let key = value
            .strip_prefix("Bearer ")
            .or_else(|| value.strip_prefix("bearer "))
            .map(str::trim)
            .filter(|k| !k.is_empty())
            .ok_or(GatewayError::MissingApiKey)?;
        self.by_hash
            .get(&hash_key(key))
            .cloned()
            .ok_or(GatewayError::InvalidApiKey)
    }
}
