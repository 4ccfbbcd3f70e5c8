//! Typed configuration: what `sluice serve --config FILE` reads.
//!
//! Deserialisation is strict (`deny_unknown_fields` everywhere) and every
//! default is written next to its field. After parsing, [`Config::validate`]
//! checks the cross references (tenant -> pool, key hashes, listener files) and
//! reports *all* problems at once, each with its field path.

pub mod demo;

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

/// The whole configuration file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub server: ServerConfig,
    #[serde(default)]
    pub limits: Limits,
    #[serde(default, rename = "pools")]
    pub pools: Vec<PoolConfig>,
    #[serde(default, rename = "tenants")]
    pub tenants: Vec<TenantConfig>,
    #[serde(default)]
    pub plugin_host: PluginHostConfig,
    /// The plugin registry behind the admin API. Default: none (chains come
    /// from this file only, and the admin API is off).
    #[serde(default)]
    pub registry: Option<RegistryConfig>,
    #[serde(default)]
    pub admin: AdminConfig,
    #[serde(default)]
    pub telemetry: TelemetryConfig,
    /// USD per million tokens, per model, for `sluice_cost_usd_total`.
    /// Default: none (no cost is counted).
    #[serde(default)]
    pub prices: Vec<PriceConfig>,
}

/// Trace export (OTLP). Unset fields fall back to the standard `OTEL_*`
/// environment variables; with no endpoint anywhere, nothing is exported.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TelemetryConfig {
    /// Collector URL, e.g. `http://jaeger:4318` (HTTP; `/v1/traces` is
    /// added) or `http://jaeger:4317` (gRPC). Default: `OTEL_EXPORTER_OTLP_ENDPOINT`.
    pub otlp_endpoint: Option<String>,
    /// `http/protobuf` or `grpc`. Default: `OTEL_EXPORTER_OTLP_PROTOCOL`, else `http/protobuf`.
    pub otlp_protocol: Option<OtlpProtocol>,
    /// Default: `OTEL_SERVICE_NAME`, else `sluice`.
    pub service_name: Option<String>,
    /// Finished spans waiting for export; beyond it they are dropped (and
    /// counted), never waited for. Default 4096.
    pub export_queue: usize,
    /// Bound on one export request. Default 5s.
    #[serde(with = "humantime_serde")]
    pub export_timeout: Duration,
}

impl Default for TelemetryConfig {
    fn default() -> Self {
        TelemetryConfig {
            otlp_endpoint: None,
            otlp_protocol: None,
            service_name: None,
            export_queue: 4096,
            export_timeout: Duration::from_secs(5),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum OtlpProtocol {
    #[serde(rename = "http/protobuf")]
    HttpProtobuf,
    #[serde(rename = "grpc")]
    Grpc,
}

/// One model's prices, USD per million tokens. Cost of an answer =
/// cached input x `input_cache_hit_per_million` + the rest of the input x
/// `input_cache_miss_per_million` + output (reasoning included) x
/// `output_per_million`, over 1M.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PriceConfig {
    /// A model some pool serves.
    pub model: String,
    pub input_cache_hit_per_million: f64,
    pub input_cache_miss_per_million: f64,
    pub output_per_million: f64,
}

/// Where uploaded plugins are kept and how they are checked.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegistryConfig {
    /// Local directory: the registry itself on a single replica, and the
    /// last good copy of a shared (Redis) registry otherwise. Required.
    pub data_dir: PathBuf,
    /// A Redis shared by every replica (`redis://host:6379/0`,
    /// `redis+unix:///path`). Default: none (the data directory only).
    pub redis_url: Option<String>,
    /// Prefix of every Redis key, so deployments can share a Redis.
    /// Default `sluice`.
    #[serde(default = "default_redis_prefix")]
    pub redis_prefix: String,
    /// How often a replica asks the store what changed. Default 250ms.
    #[serde(default = "default_poll_interval", with = "humantime_serde")]
    pub poll_interval: Duration,
    /// Bound on one store operation (Redis timeouts). Default 2s.
    #[serde(default = "default_store_timeout", with = "humantime_serde")]
    pub store_timeout: Duration,
    /// Largest component accepted, in bytes. Default 16 MiB.
    #[serde(default = "default_max_plugin_bytes")]
    pub max_plugin_bytes: usize,
    /// Versions kept per plugin (the active one is never pruned). Default 20.
    #[serde(default = "default_max_versions")]
    pub max_versions: usize,
    /// Time one upload's checks (compile, link, describe) may take. Default 30s.
    #[serde(default = "default_check_timeout", with = "humantime_serde")]
    pub check_timeout: Duration,
}

fn default_redis_prefix() -> String {
    "sluice".into()
}
fn default_poll_interval() -> Duration {
    Duration::from_millis(250)
}
fn default_store_timeout() -> Duration {
    Duration::from_secs(2)
}
fn default_max_plugin_bytes() -> usize {
    16 << 20
}
fn default_max_versions() -> usize {
    20
}
fn default_check_timeout() -> Duration {
    Duration::from_secs(30)
}

/// The admin API's operator keys (tenant admin keys sit with each tenant).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminConfig {
    /// Keys that may act on every tenant. Default: none.
    #[serde(default)]
    pub operator_keys: Vec<ApiKeyConfig>,
}

/// Settings of the WebAssembly plugin host, for every tenant.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PluginHostConfig {
    /// CPU time (of its thread, not wall time) one hook call may take before
    /// it is cut off. Default 10ms.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    /// Linear memory one plugin instance may grow to, in bytes. Default 64 MiB.
    pub max_memory: usize,
    /// Plugin instances alive at once, all tenants together. Default 4000.
    pub max_instances: u32,
    /// Reuse a healthy instance for the next request of the same tenant and
    /// plugin (a trapped one is always discarded). Default true.
    pub reuse_instances: bool,
    /// Retries an `on-response` hook may ask for on one request. Default 3.
    pub max_response_retries: u32,
}

impl Default for PluginHostConfig {
    fn default() -> Self {
        PluginHostConfig {
            timeout: Duration::from_millis(10),
            max_memory: 64 << 20,
            max_instances: 4000,
            reuse_instances: true,
            max_response_retries: 3,
        }
    }
}

/// What happens to a request when a plugin call fails.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum FailurePolicy {
    /// Refuse the request (layer `plugin`). The default.
    #[default]
    FailClosed,
    /// Go on as if the plugin had said continue / accept.
    FailOpen,
}

/// One plugin in a tenant's chain: a built-in by name, or a component file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChainEntryConfig {
    /// A built-in plugin: `request-shaper`, `rate-limit`, `context-cap`,
    /// `thinking-policy`, `output-validator`.
    pub builtin: Option<String>,
    /// A component file (relative to the config file).
    pub path: Option<PathBuf>,
    /// The plugin's own configuration (any TOML table; given to it as JSON).
    #[serde(default = "empty_object")]
    pub config: serde_json::Value,
    /// Default `fail-closed`.
    #[serde(default)]
    pub failure: FailurePolicy,
}

pub(crate) fn empty_object() -> serde_json::Value {
    serde_json::Value::Object(Default::default())
}

/// Listeners. At least one of `http` / `https` must be set.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    /// Plain HTTP listener (HTTP/1.1 and h2c prior knowledge). Default: none.
    pub http: Option<SocketAddr>,
    /// HTTPS listener (HTTP/1.1 and HTTP/2 by ALPN). Default: none.
    pub https: Option<TlsListener>,
    /// Ops listener: `/healthz`, `/readyz` and the admin API. Default: none.
    pub ops: Option<SocketAddr>,
    /// Serve the ops listener over HTTPS with these PEM files. Default: plain HTTP.
    pub ops_tls: Option<TlsFiles>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsListener {
    pub listen: SocketAddr,
    /// PEM certificate chain, leaf first.
    pub cert: PathBuf,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
}

/// Protection limits of the front door. All have defaults.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Open client connections; beyond it new connections get a 503. Default 10000.
    pub max_connections: usize,
    /// Requests being served at once, all tenants; beyond it a 503 with
    /// `Retry-After` (overload shedding). Default 4096.
    pub max_inflight_requests: usize,
    /// Request body cap in bytes; beyond it a 413. Default 8 MiB.
    pub max_body_bytes: usize,
    /// Request head (line + headers) cap in bytes. Default 64 KiB.
    pub max_header_bytes: usize,
    /// Deepest JSON nesting accepted in a request body. Default 64.
    pub max_json_depth: usize,
    /// Time a client has to send the whole request head (slowloris). Default 10s.
    #[serde(with = "humantime_serde")]
    pub header_read_timeout: Duration,
    /// Time a client has to send the whole body once the head arrived. Default 60s.
    #[serde(with = "humantime_serde")]
    pub body_read_timeout: Duration,
    /// On SIGTERM, how long in-flight requests may take to finish. Default 30s.
    #[serde(with = "humantime_serde")]
    pub drain_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections: 10_000,
            max_inflight_requests: 4096,
            max_body_bytes: 8 << 20,
            max_header_bytes: 64 << 10,
            max_json_depth: 64,
            header_read_timeout: Duration::from_secs(10),
            body_read_timeout: Duration::from_secs(60),
            drain_timeout: Duration::from_secs(30),
        }
    }
}

/// The wire dialect an engine pool speaks. All are OpenAI-compatible; they
/// differ in how thinking mode is switched and where usage and reasoning text
/// appear, which later phases (plugins) translate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Dialect {
    Vllm,
    Sglang,
    Openai,
    Deepseek,
}

impl Dialect {
    pub fn as_str(self) -> &'static str {
        match self {
            Dialect::Vllm => "vllm",
            Dialect::Sglang => "sglang",
            Dialect::Openai => "openai",
            Dialect::Deepseek => "deepseek",
        }
    }
}

/// A set of engine replicas serving the same models.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PoolConfig {
    pub name: String,
    /// Base URLs of the replicas, e.g. `http://10.0.0.5:8000`. At least one.
    pub endpoints: Vec<String>,
    /// Engine dialect. Default `vllm`.
    #[serde(default = "default_dialect")]
    pub dialect: Dialect,
    /// Model names this pool serves; a request for any other is a 404. At least one.
    pub models: Vec<String>,
    /// Environment variable holding the engines' API key, sent as a bearer
    /// token. Default: none (the client's key is never forwarded).
    pub api_key_env: Option<String>,
    /// TCP connect timeout per attempt. Default 2s.
    #[serde(default = "default_connect_timeout", with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// Time from sending the request to the first body byte of a stream.
    /// Default 30s.
    #[serde(default = "default_ttft_timeout", with = "humantime_serde")]
    pub ttft_timeout: Duration,
    /// Longest silence between two chunks of a stream. Default 30s.
    #[serde(default = "default_idle_timeout", with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// Whole-exchange cap for non-streaming requests. Default 10m.
    #[serde(default = "default_request_timeout", with = "humantime_serde")]
    pub request_timeout: Duration,
    /// Extra attempts on another replica when an attempt fails before any
    /// byte reached the client. Default 1.
    #[serde(default = "default_retries")]
    pub retries: u32,
    /// How long a replica that refused a connection is skipped. Default 5s.
    #[serde(default = "default_eject_for", with = "humantime_serde")]
    pub eject_for: Duration,
}

fn default_dialect() -> Dialect {
    Dialect::Vllm
}
fn default_connect_timeout() -> Duration {
    Duration::from_secs(2)
}
fn default_ttft_timeout() -> Duration {
    Duration::from_secs(30)
}
fn default_idle_timeout() -> Duration {
    Duration::from_secs(30)
}
fn default_request_timeout() -> Duration {
    Duration::from_secs(600)
}
fn default_retries() -> u32 {
    1
}
fn default_eject_for() -> Duration {
    Duration::from_secs(5)
}

/// The provider's deployment paths (see DESIGN.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Deployment {
    /// Shares its pool with other tenants.
    Serverless,
    /// Has a pool of its own.
    Dedicated,
    /// Has its own single engine endpoint.
    DedicatedGpu,
}

impl Deployment {
    pub fn as_str(self) -> &'static str {
        match self {
            Deployment::Serverless => "serverless",
            Deployment::Dedicated => "dedicated",
            Deployment::DedicatedGpu => "dedicated-gpu",
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TenantConfig {
    pub id: String,
    pub deployment: Deployment,
    /// Name of the pool this tenant is routed to.
    pub pool: String,
    /// Requests this tenant may have in flight; beyond it a 429. Default 256.
    #[serde(default = "default_tenant_concurrency")]
    pub max_concurrent_requests: usize,
    #[serde(default)]
    pub api_keys: Vec<ApiKeyConfig>,
    /// Keys for this tenant's admin API (its plugins and chain only);
    /// distinct from `api_keys`.
    #[serde(default)]
    pub admin_keys: Vec<ApiKeyConfig>,
    /// Pools besides `pool` that this tenant's plugins may route to.
    #[serde(default)]
    pub extra_pools: Vec<String>,
    /// The tenant's plugin chain, run in this order.
    #[serde(default)]
    pub plugins: Vec<ChainEntryConfig>,
}

fn default_tenant_concurrency() -> usize {
    256
}

/// An API key, stored only as the hex SHA-256 of the key
/// (`sluice hash-key KEY` prints it).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiKeyConfig {
    /// A name for the key that appears in logs and traces instead of the key.
    pub id: String,
    pub sha256: String,
}

/// One configuration problem, with the path of the field at fault.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigIssue {
    pub path: String,
    pub message: String,
}

impl fmt::Display for ConfigIssue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.path, self.message)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("{path}: {} problem(s):\n{}", .issues.len(), .issues.iter().map(|i| format!("  - {i}")).collect::<Vec<_>>().join("\n"))]
    Invalid {
        path: PathBuf,
        issues: Vec<ConfigIssue>,
    },
}

impl Config {
    /// Read, parse and validate a config file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        let cfg = Config::parse(&text, base).map_err(|message| ConfigError::Parse {
            path: path.to_owned(),
            message,
        })?;
        let issues = cfg.validate();
        if issues.is_empty() {
            Ok(cfg)
        } else {
            Err(ConfigError::Invalid {
                path: path.to_owned(),
                issues,
            })
        }
    }

    /// Parse TOML text. Relative file paths are resolved against `base`.
    pub fn parse(text: &str, base: &Path) -> Result<Config, String> {
        let mut cfg: Config = toml::from_str(text).map_err(|e| e.to_string())?;
        if let Some(tls) = cfg.server.https.as_mut() {
            tls.cert = base.join(&tls.cert);
            tls.key = base.join(&tls.key);
        }
        if let Some(tls) = cfg.server.ops_tls.as_mut() {
            tls.cert = base.join(&tls.cert);
            tls.key = base.join(&tls.key);
        }
        if let Some(r) = cfg.registry.as_mut() {
            r.data_dir = base.join(&r.data_dir);
        }
        for t in &mut cfg.tenants {
            for p in &mut t.plugins {
                if let Some(path) = p.path.as_mut() {
                    *path = base.join(&*path);
                }
            }
        }
        Ok(cfg)
    }

    /// Every semantic problem, each with its field path. Empty means valid.
    pub fn validate(&self) -> Vec<ConfigIssue> {
        let mut issues = Vec::new();
        let mut issue = |path: String, message: String| issues.push(ConfigIssue { path, message });

        let s = &self.server;
        if s.http.is_none() && s.https.is_none() {
            issue(
                "server".into(),
                "no listener: set `http` or `https` (or both)".into(),
            );
        }
        if let Some(tls) = &s.https {
            for (field, p) in [("cert", &tls.cert), ("key", &tls.key)] {
                if !p.is_file() {
                    issue(
                        format!("server.https.{field}"),
                        format!("file {} does not exist", p.display()),
                    );
                }
            }
        }

        if let Some(tls) = &s.ops_tls {
            for (field, p) in [("cert", &tls.cert), ("key", &tls.key)] {
                if !p.is_file() {
                    issue(
                        format!("server.ops_tls.{field}"),
                        format!("file {} does not exist", p.display()),
                    );
                }
            }
            if s.ops.is_none() {
                issue("server.ops_tls".into(), "set without `server.ops`".into());
            }
        }
        if let Some(r) = &self.registry {
            if s.ops.is_none() {
                issue(
                    "registry".into(),
                    "the admin API is served on the ops listener: set `server.ops`".into(),
                );
            }
            for (field, d) in [
                ("poll_interval", r.poll_interval),
                ("store_timeout", r.store_timeout),
                ("check_timeout", r.check_timeout),
            ] {
                if d.is_zero() {
                    issue(format!("registry.{field}"), "must be greater than 0".into());
                }
            }
            if r.max_versions == 0 {
                issue("registry.max_versions".into(), "must be at least 1".into());
            }
            if r.max_plugin_bytes < 1024 {
                issue(
                    "registry.max_plugin_bytes".into(),
                    "must be at least 1024".into(),
                );
            }
            if r.redis_prefix.is_empty() {
                issue("registry.redis_prefix".into(), "must not be empty".into());
            }
        }
        if self.telemetry.export_queue == 0 {
            issue(
                "telemetry.export_queue".into(),
                "must be greater than 0".into(),
            );
        }
        let has_admin_keys = !self.admin.operator_keys.is_empty()
            || self.tenants.iter().any(|t| !t.admin_keys.is_empty());
        if has_admin_keys && self.registry.is_none() {
            issue(
                "registry".into(),
                "admin keys are set but there is no `[registry]` for them to act on".into(),
            );
        }

        let l = &self.limits;
        for (field, v) in [
            ("max_connections", l.max_connections),
            ("max_inflight_requests", l.max_inflight_requests),
            ("max_body_bytes", l.max_body_bytes),
            ("max_json_depth", l.max_json_depth),
        ] {
            if v == 0 {
                issue(format!("limits.{field}"), "must be greater than 0".into());
            }
        }
        if l.max_header_bytes < 8192 {
            issue(
                "limits.max_header_bytes".into(),
                "must be at least 8192 (hyper's minimum read buffer)".into(),
            );
        }
        let ph = &self.plugin_host;
        if ph.timeout.is_zero() {
            issue(
                "plugin_host.timeout".into(),
                "must be greater than 0".into(),
            );
        }
        if ph.max_memory < (1 << 20) {
            issue(
                "plugin_host.max_memory".into(),
                "must be at least 1 MiB".into(),
            );
        }
        if ph.max_instances == 0 {
            issue(
                "plugin_host.max_instances".into(),
                "must be greater than 0".into(),
            );
        }
        for (field, d) in [
            ("header_read_timeout", l.header_read_timeout),
            ("body_read_timeout", l.body_read_timeout),
        ] {
            if d.is_zero() {
                issue(format!("limits.{field}"), "must be greater than 0".into());
            }
        }

        let mut pool_names = HashSet::new();
        for (i, p) in self.pools.iter().enumerate() {
            let at = format!("pools[{i}]");
            if p.name.is_empty() {
                issue(format!("{at}.name"), "must not be empty".into());
            } else if !pool_names.insert(p.name.as_str()) {
                issue(
                    format!("{at}.name"),
                    format!("duplicate pool name {:?}", p.name),
                );
            }
            if p.endpoints.is_empty() {
                issue(
                    format!("{at}.endpoints"),
                    "needs at least one endpoint".into(),
                );
            }
            for (j, e) in p.endpoints.iter().enumerate() {
                if let Err(m) = crate::upstream::parse_endpoint(e) {
                    issue(format!("{at}.endpoints[{j}]"), m);
                }
            }
            if p.models.is_empty() {
                issue(format!("{at}.models"), "needs at least one model".into());
            }
            for (field, d) in [
                ("connect_timeout", p.connect_timeout),
                ("ttft_timeout", p.ttft_timeout),
                ("idle_timeout", p.idle_timeout),
                ("request_timeout", p.request_timeout),
            ] {
                if d.is_zero() {
                    issue(format!("{at}.{field}"), "must be greater than 0".into());
                }
            }
        }

        let served: HashSet<&str> = self
            .pools
            .iter()
            .flat_map(|p| p.models.iter().map(String::as_str))
            .collect();
        let mut priced = HashSet::new();
        for (i, p) in self.prices.iter().enumerate() {
            let at = format!("prices[{i}]");
            if !served.contains(p.model.as_str()) {
                issue(
                    format!("{at}.model"),
                    format!("no pool serves a model {:?}", p.model),
                );
            } else if !priced.insert(p.model.as_str()) {
                issue(
                    format!("{at}.model"),
                    format!("model {:?} is priced twice", p.model),
                );
            }
            for (field, v) in [
                ("input_cache_hit_per_million", p.input_cache_hit_per_million),
                (
                    "input_cache_miss_per_million",
                    p.input_cache_miss_per_million,
                ),
                ("output_per_million", p.output_per_million),
            ] {
                if !(v.is_finite() && v >= 0.0) {
                    issue(
                        format!("{at}.{field}"),
                        format!("must be a non-negative number of USD, is {v}"),
                    );
                }
            }
        }

        let mut tenant_ids = HashSet::new();
        let mut key_hashes: HashMap<String, String> = HashMap::new();
        let mut pool_users: HashMap<&str, Vec<(&str, Deployment)>> = HashMap::new();
        for (i, t) in self.tenants.iter().enumerate() {
            let at = format!("tenants[{i}]");
            if !valid_ident(&t.id) {
                issue(
                    format!("{at}.id"),
                    format!("{:?} must be 1-64 chars of a-z, 0-9, '-' or '_'", t.id),
                );
            } else if !tenant_ids.insert(t.id.as_str()) {
                issue(
                    format!("{at}.id"),
                    format!("duplicate tenant id {:?}", t.id),
                );
            }
            if !pool_names.contains(t.pool.as_str()) {
                issue(format!("{at}.pool"), format!("no pool named {:?}", t.pool));
            } else {
                pool_users
                    .entry(t.pool.as_str())
                    .or_default()
                    .push((t.id.as_str(), t.deployment));
            }
            for (j, extra) in t.extra_pools.iter().enumerate() {
                if !pool_names.contains(extra.as_str()) {
                    issue(
                        format!("{at}.extra_pools[{j}]"),
                        format!("no pool named {extra:?}"),
                    );
                } else if extra != &t.pool {
                    // Reachable through plugins counts as use: keeps dedicated pools isolated.
                    pool_users
                        .entry(extra.as_str())
                        .or_default()
                        .push((t.id.as_str(), Deployment::Serverless));
                }
            }
            for (j, p) in t.plugins.iter().enumerate() {
                let pat = format!("{at}.plugins[{j}]");
                match (&p.builtin, &p.path) {
                    (Some(name), None) => {
                        if crate::plugins::builtin::component(name).is_none() {
                            let known: Vec<_> = crate::plugins::builtin::BUILTIN
                                .iter()
                                .map(|(n, _)| *n)
                                .collect();
                            issue(
                                format!("{pat}.builtin"),
                                format!(
                                    "no built-in plugin {name:?} (there are: {})",
                                    known.join(", ")
                                ),
                            );
                        }
                    }
                    (None, Some(path)) => {
                        if !path.is_file() {
                            issue(
                                format!("{pat}.path"),
                                format!("file {} does not exist", path.display()),
                            );
                        }
                    }
                    _ => issue(pat, "set exactly one of `builtin` or `path`".into()),
                }
            }
            if t.max_concurrent_requests == 0 {
                issue(
                    format!("{at}.max_concurrent_requests"),
                    "must be greater than 0".into(),
                );
            }
            if t.api_keys.is_empty() {
                issue(
                    format!("{at}.api_keys"),
                    "needs at least one key (the tenant could not be reached)".into(),
                );
            }
            let mut key_ids = HashSet::new();
            let keys = t
                .api_keys
                .iter()
                .enumerate()
                .map(|(j, k)| (format!("{at}.api_keys[{j}]"), k));
            let admin = t
                .admin_keys
                .iter()
                .enumerate()
                .map(|(j, k)| (format!("{at}.admin_keys[{j}]"), k));
            for (kat, k) in keys.chain(admin) {
                if !key_ids.insert(k.id.as_str()) {
                    issue(format!("{kat}.id"), format!("duplicate key id {:?}", k.id));
                }
                if let Some(i) = key_hash_issue(&kat, k, &mut key_hashes) {
                    issue(i.path, i.message);
                }
            }
        }

        for (j, k) in self.admin.operator_keys.iter().enumerate() {
            let kat = format!("admin.operator_keys[{j}]");
            if let Some(i) = key_hash_issue(&kat, k, &mut key_hashes) {
                issue(i.path, i.message);
            }
        }

        // Isolation: a dedicated pool serves one tenant; a dedicated GPU is one endpoint.
        for (i, p) in self.pools.iter().enumerate() {
            let Some(users) = pool_users.get(p.name.as_str()) else {
                continue;
            };
            for (tenant, dep) in users {
                if *dep != Deployment::Serverless && users.len() > 1 {
                    issue(
                        format!("pools[{i}]"),
                        format!(
                            "pool {:?} is {} for tenant {tenant:?} but also used by {}",
                            p.name,
                            dep.as_str(),
                            users
                                .iter()
                                .filter(|(t, _)| t != tenant)
                                .map(|(t, _)| format!("{t:?}"))
                                .collect::<Vec<_>>()
                                .join(", ")
                        ),
                    );
                }
                if *dep == Deployment::DedicatedGpu && p.endpoints.len() != 1 {
                    issue(
                        format!("pools[{i}].endpoints"),
                        format!(
                            "tenant {tenant:?} is dedicated-gpu: its pool must have exactly one endpoint, has {}",
                            p.endpoints.len()
                        ),
                    );
                }
            }
        }
        issues
    }
}

/// A key stored as its hash: 64 hex digits, and no key (API, admin or
/// operator) twice. `seen` maps each hash to the field that holds it.
fn key_hash_issue(
    at: &str,
    k: &ApiKeyConfig,
    seen: &mut HashMap<String, String>,
) -> Option<ConfigIssue> {
    let h = k.sha256.to_ascii_lowercase();
    let message = if h.len() != 64 || !h.bytes().all(|b| b.is_ascii_hexdigit()) {
        "must be 64 hex digits (see `sluice hash-key`)".to_owned()
    } else {
        format!("same key as {}", seen.insert(h, at.to_owned())?)
    };
    Some(ConfigIssue {
        path: format!("{at}.sha256"),
        message,
    })
}

fn valid_ident(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
}

/// Hex SHA-256 of an API key, the form keys are stored and looked up in.
pub fn hash_key(key: &str) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(key.as_bytes()))
}
