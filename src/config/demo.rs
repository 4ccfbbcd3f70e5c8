//! The embedded demo: `sluice` with no arguments. Two simulated engine
//! replicas in-process, tenant `demo` with key `sk-sluice-demo`, HTTP, HTTPS
//! (self-signed certificate generated at start) and the ops listener.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use super::{Config, TlsListener};

pub const DEMO_KEY: &str = "sk-sluice-demo";
pub const DEMO_MODEL: &str = "deepseek-v4-flash";
pub const DEMO_ADMIN_KEY: &str = "sk-sluice-demo-admin";
const DEMO_TOML: &str = include_str!("demo.toml");

#[derive(clap::Args, Debug, Clone)]
pub struct DemoArgs {
    /// Plain HTTP listener.
    #[arg(long, env = "SLUICE_HTTP", default_value = "127.0.0.1:8080")]
    pub http: SocketAddr,
    /// HTTPS listener (self-signed certificate).
    #[arg(long, env = "SLUICE_HTTPS", default_value = "127.0.0.1:8443")]
    pub https: SocketAddr,
    /// Ops listener (/healthz, /readyz, /metrics, admin API).
    #[arg(long, env = "SLUICE_OPS", default_value = "127.0.0.1:9090")]
    pub ops: SocketAddr,
    /// Where the generated certificate and the plugin registry are kept.
    /// Default: $TMPDIR/sluice-demo.
    #[arg(long, env = "SLUICE_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
}

impl DemoArgs {
    pub fn data_dir(&self) -> PathBuf {
        self.data_dir
            .clone()
            .unwrap_or_else(|| std::env::temp_dir().join("sluice-demo"))
    }
}

/// The demo config with listeners, certificate, engine endpoints, registry
/// directory and an operator key (given as its hash) filled in.
pub fn config(
    args: &DemoArgs,
    cert: &Path,
    key: &Path,
    engines: &[SocketAddr],
    operator_key: &str,
) -> Config {
    let mut cfg = Config::parse(DEMO_TOML, Path::new("."))
        .expect("the embedded demo config parses (checked by a unit test)");
    cfg.server.http = Some(args.http);
    cfg.server.https = Some(TlsListener {
        listen: args.https,
        cert: cert.to_owned(),
        key: key.to_owned(),
    });
    cfg.server.ops = Some(args.ops);
    cfg.pools[0].endpoints = engines.iter().map(|a| format!("http://{a}")).collect();
    if let Some(r) = cfg.registry.as_mut() {
        r.data_dir = args.data_dir().join("registry");
    }
    cfg.admin.operator_keys = vec![super::ApiKeyConfig {
        id: "demo-operator".into(),
        sha256: super::hash_key(operator_key),
    }];
    cfg
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn demo_key_hash_matches() {
        let cfg = Config::parse(DEMO_TOML, Path::new(".")).unwrap();
        assert_eq!(
            cfg.tenants[0].api_keys[0].sha256,
            super::super::hash_key(DEMO_KEY)
        );
        assert_eq!(cfg.pools[0].models, vec![DEMO_MODEL.to_string()]);
        assert_eq!(
            cfg.tenants[0].admin_keys[0].sha256,
            super::super::hash_key(DEMO_ADMIN_KEY)
        );
    }
}
