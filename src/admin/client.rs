//! `sluice plugin upload|list|rollback|delete|chain ...`: the admin API from
//! the command line. Each command is one or two HTTP calls; answers are
//! printed as short lines (or the raw JSON with `--json`), errors as the
//! server's message with a non-zero exit.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};
use serde_json::{Value, json};

use crate::config::FailurePolicy;

/// Where the admin API is and who is calling.
#[derive(clap::Args, Debug, Clone)]
pub struct Target {
    /// Base URL of the ops listener.
    #[arg(
        long,
        env = "SLUICE_ADMIN_URL",
        default_value = "http://127.0.0.1:9090"
    )]
    pub admin_url: String,
    /// An admin key (tenant admin or operator).
    #[arg(long, env = "SLUICE_ADMIN_KEY", hide_env_values = true)]
    pub key: String,
    /// The tenant to act on. Default: the admin key's own tenant.
    #[arg(long, env = "SLUICE_TENANT")]
    pub tenant: Option<String>,
    /// PEM CA certificate to trust for an HTTPS admin URL (e.g. the demo's).
    #[arg(long, env = "SLUICE_ADMIN_CACERT")]
    pub cacert: Option<PathBuf>,
    /// Print the API's JSON answers as they are.
    #[arg(long)]
    pub json: bool,
}

#[derive(clap::Subcommand, Debug, Clone)]
pub enum ChainCommand {
    /// Show the live chain.
    Show,
    /// Replace the chain with the one in a JSON file: `{"plugins": [...]}`.
    Set { file: PathBuf },
    /// Add a step at the end (or at `--position`, counted from 0).
    Add {
        /// An uploaded plugin's name.
        #[arg(required_unless_present = "builtin")]
        name: Option<String>,
        /// A built-in plugin instead.
        #[arg(long, conflicts_with = "name")]
        builtin: Option<String>,
        /// The step's config (JSON object).
        #[arg(long, default_value = "{}")]
        config: String,
        #[arg(long, value_enum, default_value = "fail-closed")]
        failure: Failure,
        #[arg(long)]
        position: Option<usize>,
    },
    /// Remove every step that runs this uploaded plugin (or `--builtin`).
    Remove {
        #[arg(required_unless_present = "builtin")]
        name: Option<String>,
        #[arg(long, conflicts_with = "name")]
        builtin: Option<String>,
    },
    /// Go back to the chain in the config file.
    Reset,
}

#[derive(clap::ValueEnum, Debug, Clone, Copy)]
pub enum Failure {
    FailClosed,
    FailOpen,
}

impl From<Failure> for FailurePolicy {
    fn from(f: Failure) -> Self {
        match f {
            Failure::FailClosed => FailurePolicy::FailClosed,
            Failure::FailOpen => FailurePolicy::FailOpen,
        }
    }
}

pub struct Client {
    http: reqwest::Client,
    target: Target,
    tenant: String,
}

impl Client {
    pub async fn connect(target: Target) -> anyhow::Result<Client> {
        let _ = std::sync::Arc::unwrap_or_clone(crate::server::tls::provider()).install_default();
        let mut b = reqwest::Client::builder()
            .no_proxy()
            .timeout(Duration::from_secs(120));
        if let Some(ca) = &target.cacert {
            let pem = std::fs::read(ca).with_context(|| format!("reading {}", ca.display()))?;
            b = b.add_root_certificate(reqwest::Certificate::from_pem(&pem)?);
        }
        let mut client = Client {
            http: b.build()?,
            tenant: target.tenant.clone().unwrap_or_default(),
            target,
        };
        if client.tenant.is_empty() {
            let me = client
                .call(reqwest::Method::GET, "/admin/v1/whoami", None)
                .await?;
            client.tenant = me["tenant"].as_str().map(str::to_owned).ok_or_else(|| {
                anyhow::anyhow!("an operator key acts on every tenant: pass --tenant")
            })?;
        }
        Ok(client)
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.target.admin_url.trim_end_matches('/'))
    }

    fn tenant_path(&self, rest: &str) -> String {
        format!("/admin/v1/tenants/{}{rest}", self.tenant)
    }

    async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<reqwest::Body>,
    ) -> anyhow::Result<Value> {
        let mut req = self
            .http
            .request(method, self.url(path))
            .bearer_auth(&self.target.key);
        if let Some(b) = body {
            req = req.body(b);
        }
        let resp = req
            .send()
            .await
            .with_context(|| format!("cannot reach the admin API at {}", self.target.admin_url))?;
        let status = resp.status();
        let text = resp.text().await?;
        let value: Value = serde_json::from_str(&text)
            .with_context(|| format!("{status}: not a JSON answer: {text}"))?;
        if !status.is_success() {
            let msg = value["error"]["message"].as_str().unwrap_or(&text);
            let code = value["error"]["code"].as_str().unwrap_or("");
            bail!("{} {code}: {msg}", status.as_u16());
        }
        Ok(value)
    }

    fn print(&self, value: &Value, human: impl FnOnce(&Value)) {
        if self.target.json {
            println!(
                "{}",
                serde_json::to_string_pretty(value).unwrap_or_default()
            );
        } else {
            human(value);
        }
    }

    pub async fn upload(
        &self,
        file: &std::path::Path,
        name: &str,
        chain: bool,
        config: &str,
        failure: Failure,
    ) -> anyhow::Result<()> {
        let bytes = std::fs::read(file).with_context(|| format!("reading {}", file.display()))?;
        let path = self.tenant_path(&format!("/plugins/{name}"));
        let up = self
            .call(reqwest::Method::PUT, &path, Some(bytes.into()))
            .await?;
        self.print(&up, |v| {
            let ver = &v["version"];
            println!(
                "{} {name} v{} (sha256 {}, {} bytes){}",
                if v["created"] == true {
                    "uploaded"
                } else {
                    "already had"
                },
                ver["version"],
                ver["sha256"].as_str().unwrap_or(""),
                ver["size"],
                if v["in_chain"] == true {
                    "; live in the chain now"
                } else {
                    ""
                }
            );
        });
        if chain && up["in_chain"] != true {
            self.chain_add(Some(name.to_owned()), None, config, failure, None)
                .await?;
        } else if up["in_chain"] != true && !self.target.json {
            println!("not in the chain yet: `sluice plugin chain add {name}` puts it live");
        }
        Ok(())
    }

    pub async fn list(&self, name: Option<&str>) -> anyhow::Result<()> {
        let path = match name {
            Some(n) => self.tenant_path(&format!("/plugins/{n}")),
            None => self.tenant_path("/plugins"),
        };
        let v = self.call(reqwest::Method::GET, &path, None).await?;
        self.print(&v, |v| {
            let plugins = match name {
                Some(_) => vec![v.clone()],
                None => v["plugins"].as_array().cloned().unwrap_or_default(),
            };
            if plugins.is_empty() {
                println!("no plugins uploaded for tenant {}", self.tenant);
            }
            for p in plugins {
                println!(
                    "{}{}",
                    p["name"].as_str().unwrap_or(""),
                    if p["in_chain"] == true {
                        "  (in chain)"
                    } else {
                        ""
                    }
                );
                for ver in p["versions"].as_array().into_iter().flatten() {
                    println!(
                        "  {} v{:<3} {}  {:>8} bytes  {}  by {}  [{} {}]",
                        if ver["active"] == true { "*" } else { " " },
                        ver["version"],
                        &ver["sha256"].as_str().unwrap_or("")
                            [..12.min(ver["sha256"].as_str().unwrap_or("").len())],
                        ver["size"],
                        ver["uploaded_at"].as_str().unwrap_or(""),
                        ver["uploaded_by"].as_str().unwrap_or(""),
                        ver["plugin_name"].as_str().unwrap_or(""),
                        ver["plugin_version"].as_str().unwrap_or(""),
                    );
                }
            }
        });
        Ok(())
    }

    pub async fn rollback(&self, name: &str, to: Option<u32>) -> anyhow::Result<()> {
        let body = match to {
            Some(v) => json!({ "version": v }).to_string(),
            None => String::new(),
        };
        let path = self.tenant_path(&format!("/plugins/{name}/rollback"));
        let v = self
            .call(reqwest::Method::POST, &path, Some(body.into()))
            .await?;
        self.print(&v, |v| {
            println!(
                "{name}: v{} is active (sha256 {})",
                v["active"]["version"],
                v["active"]["sha256"].as_str().unwrap_or("")
            )
        });
        Ok(())
    }

    pub async fn delete(&self, name: &str) -> anyhow::Result<()> {
        let path = self.tenant_path(&format!("/plugins/{name}"));
        let v = self.call(reqwest::Method::DELETE, &path, None).await?;
        self.print(&v, |_| println!("{name}: deleted"));
        Ok(())
    }

    pub async fn chain(&self, cmd: ChainCommand) -> anyhow::Result<()> {
        match cmd {
            ChainCommand::Show => {
                let v = self
                    .call(reqwest::Method::GET, &self.tenant_path("/chain"), None)
                    .await?;
                self.print_chain(&v);
                Ok(())
            }
            ChainCommand::Set { file } => {
                let text = std::fs::read_to_string(&file)
                    .with_context(|| format!("reading {}", file.display()))?;
                self.put_chain(text).await
            }
            ChainCommand::Add {
                name,
                builtin,
                config,
                failure,
                position,
            } => {
                self.chain_add(name, builtin, &config, failure, position)
                    .await
            }
            ChainCommand::Remove { name, builtin } => {
                let (mut steps, revision) = self.editable_chain().await?;
                let before = steps.len();
                steps.retain(|s| {
                    !(name.is_some() && s["plugin"].as_str() == name.as_deref()
                        || builtin.is_some() && s["builtin"].as_str() == builtin.as_deref())
                });
                if steps.len() == before {
                    bail!("the chain has no such step");
                }
                self.put_chain(json!({ "plugins": steps, "revision": revision }).to_string())
                    .await
            }
            ChainCommand::Reset => {
                let v = self
                    .call(reqwest::Method::DELETE, &self.tenant_path("/chain"), None)
                    .await?;
                self.print_chain(&v);
                Ok(())
            }
        }
    }

    async fn chain_add(
        &self,
        name: Option<String>,
        builtin: Option<String>,
        config: &str,
        failure: Failure,
        position: Option<usize>,
    ) -> anyhow::Result<()> {
        let config: Value = serde_json::from_str(config)
            .map_err(|e| anyhow::anyhow!("--config is not JSON: {e}"))?;
        let (mut steps, revision) = self.editable_chain().await?;
        let mut step = json!({ "config": config, "failure": FailurePolicy::from(failure) });
        match (name, builtin) {
            (Some(n), _) => step["plugin"] = json!(n),
            (None, Some(b)) => step["builtin"] = json!(b),
            (None, None) => bail!("name a plugin or --builtin"),
        }
        let at = position.unwrap_or(steps.len()).min(steps.len());
        steps.insert(at, step);
        self.put_chain(json!({ "plugins": steps, "revision": revision }).to_string())
            .await
    }

    /// The live chain as steps the API takes back, and its revision (the
    /// change is refused if someone else changed the chain meanwhile). A
    /// chain from the config file is carried over when its steps are built-ins.
    async fn editable_chain(&self) -> anyhow::Result<(Vec<Value>, Value)> {
        let v = self
            .call(reqwest::Method::GET, &self.tenant_path("/chain"), None)
            .await?;
        let mut steps = Vec::new();
        for s in v["plugins"].as_array().into_iter().flatten() {
            let mut step = json!({ "config": s["config"], "failure": s["failure"] });
            if let Some(p) = s["plugin"].as_str() {
                step["plugin"] = json!(p);
            } else if let Some(b) = s["builtin"].as_str() {
                step["builtin"] = json!(b);
            } else {
                bail!(
                    "the config file's chain runs a plugin file ({}), which the admin API cannot name; set the whole chain with `sluice plugin chain set FILE`",
                    s["path"]
                );
            }
            steps.push(step);
        }
        Ok((steps, v["revision"].clone()))
    }

    async fn put_chain(&self, body: String) -> anyhow::Result<()> {
        let v = self
            .call(
                reqwest::Method::PUT,
                &self.tenant_path("/chain"),
                Some(body.into()),
            )
            .await?;
        self.print_chain(&v);
        Ok(())
    }

    fn print_chain(&self, v: &Value) {
        self.print(v, |v| {
            println!(
                "chain of {} (from {}, revision {}):",
                v["tenant"].as_str().unwrap_or(""),
                v["source"].as_str().unwrap_or(""),
                v["revision"]
            );
            for (i, s) in v["plugins"].as_array().into_iter().flatten().enumerate() {
                let what = match (s["plugin"].as_str(), s["builtin"].as_str()) {
                    (Some(p), _) => format!("{p} v{}", s["version"]),
                    (None, Some(b)) => format!("built-in {b}"),
                    _ => format!("file {}", s["path"].as_str().unwrap_or("")),
                };
                println!(
                    "  {i}. {what:<28} {:<12} {}",
                    s["failure"].as_str().unwrap_or(""),
                    s["config"]
                );
            }
        });
    }
}
