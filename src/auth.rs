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

/// Who is calling the admin API.
#[derive(Debug, Clone)]
pub enum Actor {
    /// May act on every tenant.
    Operator { key_id: String },
    /// May act on its own tenant only.
    TenantAdmin { tenant: usize, key_id: String },
}

impl Actor {
    pub fn key_id(&self) -> &str {
        match self {
            Actor::Operator { key_id } | Actor::TenantAdmin { key_id, .. } => key_id,
        }
    }

    /// May this actor act on `tenant`?
    pub fn may_act_on(&self, tenant: usize) -> bool {
        match self {
            Actor::Operator { .. } => true,
            Actor::TenantAdmin { tenant: own, .. } => *own == tenant,
        }
    }
}

/// Admin keys -> actor. A table of its own: an API key is never an admin
/// key, nor the reverse.
pub struct AdminKeys {
    by_hash: HashMap<String, Actor>,
}

impl AdminKeys {
    pub fn new(tenants: &[TenantConfig], operators: &[crate::config::ApiKeyConfig]) -> AdminKeys {
        let mut by_hash = HashMap::new();
        for k in operators {
            by_hash.insert(
                k.sha256.to_ascii_lowercase(),
                Actor::Operator {
                    key_id: k.id.clone(),
                },
            );
        }
        for (tenant, t) in tenants.iter().enumerate() {
            for k in &t.admin_keys {
                by_hash.insert(
                    k.sha256.to_ascii_lowercase(),
                    Actor::TenantAdmin {
                        tenant,
                        key_id: k.id.clone(),
                    },
                );
            }
        }
        AdminKeys { by_hash }
    }

    pub fn authenticate(&self, headers: &HeaderMap) -> Result<Actor, crate::errors::AdminError> {
        use crate::errors::AdminError;
        let key = bearer(headers).ok_or(AdminError::MissingKey)?;
        self.by_hash
            .get(&hash_key(key))
            .cloned()
            .ok_or(AdminError::InvalidKey)
    }
}

fn bearer(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(http::header::AUTHORIZATION)?.to_str().ok()?;
    value
        .strip_prefix("Bearer ")
        .or_else(|| value.strip_prefix("bearer "))
        .map(str::trim)
        .filter(|k| !k.is_empty())
}
