//! The registry's documents: per tenant, its uploaded plugins with their
//! versions, and the chain that is live. Stored as JSON; strict on read.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::config::FailurePolicy;

/// Everything the registry knows about one tenant.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TenantIndex {
    /// Bumped by every change; the key of the store's compare-and-swap.
    pub revision: u64,
    /// Uploaded plugins by name.
    #[serde(default)]
    pub plugins: BTreeMap<String, PluginRecord>,
    /// The chain set over the admin API; `None` means the config file's
    /// chain is in force.
    #[serde(default)]
    pub chain: Option<Vec<ChainEntry>>,
    /// The highest version number each plugin name was ever given, so a
    /// name deleted and uploaded again does not reuse numbers.
    #[serde(default)]
    pub last_version: BTreeMap<String, u32>,
}

/// One uploaded plugin name and its versions.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PluginRecord {
    /// Oldest first; version numbers only grow, pruned ones are not reused.
    pub versions: Vec<Version>,
    /// The version requests use.
    pub active: u32,
}

impl PluginRecord {
    pub fn active_version(&self) -> Option<&Version> {
        self.versions.iter().find(|v| v.version == self.active)
    }
}

/// One uploaded component.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Version {
    pub version: u32,
    /// Hex SHA-256 of the component: the blob's key.
    pub sha256: String,
    pub size: u64,
    /// RFC 3339, UTC.
    pub uploaded_at: String,
    /// The admin key id that uploaded it.
    pub uploaded_by: String,
    /// What the component said of itself (`describe`).
    pub plugin_name: String,
    pub plugin_version: String,
}

/// One step of a chain set over the admin API: an uploaded plugin (its
/// active version) or a built-in, with its config and failure policy.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChainEntry {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub plugin: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub builtin: Option<String>,
    #[serde(default = "crate::config::empty_object")]
    pub config: serde_json::Value,
    #[serde(default)]
    pub failure: FailurePolicy,
}
