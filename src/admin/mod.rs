//! The admin API (on the ops listener): tenants upload plugins, list and
//! roll back their versions, and set their chain. JSON in and out; errors are
//! [`AdminError`]s, rendered in `errors.rs`.
//!
//! A tenant admin key acts on its own tenant only; any other tenant id,
//! existing or not, is answered with the same 404, so a key cannot learn
//! which tenants exist. Every change and every refusal is audited: a log
//! line on target `sluice::audit` inside an `admin` span, with tenant, actor
//! and sha256.

use std::sync::Arc;

use bytes::Bytes;
use http::{HeaderValue, Method, Response, StatusCode, header};
use hyper::Request;
use hyper::body::Incoming;
use serde::Deserialize;
use serde_json::{Value, json};
use sha2::Digest;
use tracing::Instrument;

use crate::auth::{Actor, AdminKeys};
use crate::body::{self, ProxyBody};
use crate::errors::AdminError;
use crate::registry::Registry;
use crate::registry::model::{ChainEntry, PluginRecord, TenantIndex};
use crate::telemetry::RequestIds;

pub mod client;

pub struct Admin {
    pub registry: Arc<Registry>,
    pub keys: AdminKeys,
    /// Bound on reading an upload's body.
    pub body_timeout: std::time::Duration,
}

/// The routes, parsed from the path.
enum Route<'a> {
    WhoAmI,
    Tenants,
    Plugins(&'a str),
    Plugin(&'a str, &'a str),
    Rollback(&'a str, &'a str),
    Chain(&'a str),
}

fn route(path: &str) -> Option<Route<'_>> {
    let rest = path.strip_prefix("/admin/v1/")?.trim_end_matches('/');
    let parts: Vec<&str> = rest.split('/').collect();
    Some(match parts.as_slice() {
        ["whoami"] => Route::WhoAmI,
        ["tenants"] => Route::Tenants,
        ["tenants", t, "plugins"] => Route::Plugins(t),
        ["tenants", t, "plugins", name] => Route::Plugin(t, name),
        ["tenants", t, "plugins", name, "rollback"] => Route::Rollback(t, name),
        ["tenants", t, "chain"] => Route::Chain(t),
        _ => return None,
    })
}

/// What the audit record of one admin request says; filled in as the
/// request is understood, written once when it is answered.
#[derive(Default)]
struct Audit {
    actor: String,
    tenant: String,
    action: &'static str,
    plugin: String,
    /// The uploaded component's, or the live chain's steps' (comma-separated).
    sha256: String,
}

/// Serve one admin request. Never fails: errors become responses here.
pub async fn handle(admin: &Admin, req: Request<Incoming>) -> Response<ProxyBody> {
    let ids = RequestIds::from_headers(req.headers());
    let span = tracing::info_span!(
        "admin",
        method = %req.method(),
        path = %req.uri().path(),
        actor = tracing::field::Empty,
        tenant = tracing::field::Empty,
        sha256 = tracing::field::Empty,
        trace_id = %ids.trace_id,
    );
    let mut audit = Audit::default();
    let result = serve(admin, req, &mut audit).instrument(span.clone()).await;
    for (field, value) in [
        ("actor", &audit.actor),
        ("tenant", &audit.tenant),
        ("sha256", &audit.sha256),
    ] {
        if !value.is_empty() {
            span.record(field, value.as_str());
        }
    }
    let _in_span = span.enter();
    let a = &audit;
    let resp = match result {
        Ok((status, body)) => {
            // Reads are not audited; every change is.
            if !a.action.is_empty() {
                tracing::info!(target: "sluice::audit", actor = a.actor, tenant = a.tenant, action = a.action, plugin = a.plugin, sha256 = a.sha256, outcome = "ok", "admin change");
            }
            let mut resp = Response::new(body::json(&body));
            *resp.status_mut() = status;
            resp.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
            resp
        }
        Err(e) => {
            // Every refusal is audited, reads and unauthenticated calls too:
            // probing is what the audit trail is for.
            let action = if a.action.is_empty() {
                "read"
            } else {
                a.action
            };
            tracing::warn!(target: "sluice::audit", actor = a.actor, tenant = a.tenant, action, plugin = a.plugin, sha256 = a.sha256, outcome = "refused", status = e.status().as_u16(), code = e.code(), reason = %e, "admin request refused");
            e.into_response(&ids.trace_id)
        }
    };
    ids.decorate(resp)
}

type Answer = Result<(StatusCode, Value), AdminError>;

async fn serve(admin: &Admin, req: Request<Incoming>, audit: &mut Audit) -> Answer {
    let (parts, body) = req.into_parts();
    let path = parts.uri.path().to_owned();
    let method = parts.method.clone();
    audit.action = match method {
        Method::PUT if path.ends_with("/chain") => "set-chain",
        Method::DELETE if path.ends_with("/chain") => "reset-chain",
        Method::PUT => "upload",
        Method::DELETE => "delete",
        Method::POST => "rollback",
        _ => "",
    };
    let not_found = || AdminError::NotFound {
        method: method.to_string(),
        path: path.clone(),
    };
    let not_allowed = || AdminError::MethodNotAllowed {
        method: method.to_string(),
        path: path.clone(),
    };
    let route = route(&path).ok_or_else(not_found)?;
    let actor = admin.keys.authenticate(&parts.headers)?;
    audit.actor = actor.key_id().to_owned();
    let gw = admin.registry.gateway();

    // Resolve the tenant before looking at anything else, and answer every
    // tenant this actor may not act on exactly like one that does not exist.
    let tenant_of = |id: &str, audit: &mut Audit| -> Result<usize, AdminError> {
        audit.tenant = id.to_owned();
        match gw.tenant_index(id) {
            Some(t) if actor.may_act_on(t) => Ok(t),
            _ => Err(AdminError::NoTenant(id.to_owned())),
        }
    };
    let r = &admin.registry;
    match (route, &parts.method) {
        (Route::WhoAmI, &Method::GET) => Ok((StatusCode::OK, whoami(admin, &actor))),
        (Route::Tenants, &Method::GET) => {
            let tenants: Vec<&str> = gw
                .tenant_ids()
                .enumerate()
                .filter(|(i, _)| actor.may_act_on(*i))
                .map(|(_, id)| id)
                .collect();
            Ok((StatusCode::OK, json!({ "tenants": tenants })))
        }
        (Route::Plugins(t), &Method::GET) => {
            let t = tenant_of(t, audit)?;
            let index = r.index(t).await?;
            let plugins: Vec<Value> = index
                .plugins
                .iter()
                .map(|(name, rec)| plugin_json(&index, name, rec))
                .collect();
            Ok((
                StatusCode::OK,
                json!({"tenant": gw.tenant_config(t).id, "revision": index.revision, "plugins": plugins}),
            ))
        }
        (Route::Plugin(t, name), m) => {
            let t = tenant_of(t, audit)?;
            audit.plugin = (*name).to_owned();
            check_name(name)?;
            match *m {
                Method::GET => {
                    let index = r.index(t).await?;
                    let rec = index.plugins.get(name).ok_or_else(|| {
                        crate::registry::RegistryError::NoPlugin((*name).to_owned())
                    })?;
                    Ok((StatusCode::OK, plugin_json(&index, name, rec)))
                }
                Method::PUT => upload(admin, &actor, t, name, &parts.headers, body, audit).await,
                Method::DELETE => {
                    r.delete(t, name).await?;
                    Ok((StatusCode::OK, json!({"plugin": name, "deleted": true})))
                }
                _ => Err(not_allowed()),
            }
        }
        (Route::Rollback(t, name), &Method::POST) => {
            let t = tenant_of(t, audit)?;
            audit.plugin = (*name).to_owned();
            check_name(name)?;
            #[derive(Deserialize, Default)]
            #[serde(deny_unknown_fields)]
            struct Body {
                version: Option<u32>,
            }
            let bytes = read_body(body, 64 << 10, admin.body_timeout, &parts.headers).await?;
            let req: Body = if bytes.iter().all(u8::is_ascii_whitespace) {
                Body::default()
            } else {
                serde_json::from_slice(&bytes).map_err(|e| AdminError::BadJson(e.to_string()))?
            };
            let v = r.rollback(t, name, req.version).await?;
            audit.sha256 = v.sha256.clone();
            Ok((StatusCode::OK, json!({"plugin": name, "active": v})))
        }
        (Route::Chain(t), m) => {
            let t = tenant_of(t, audit)?;
            match *m {
                Method::GET => Ok((StatusCode::OK, chain_json(admin, t))),
                Method::PUT => {
                    #[derive(Deserialize)]
                    #[serde(deny_unknown_fields)]
                    struct Body {
                        plugins: Vec<ChainEntry>,
                        /// Apply only if the chain is still at this revision.
                        revision: Option<u64>,
                    }
                    let bytes =
                        read_body(body, 1 << 20, admin.body_timeout, &parts.headers).await?;
                    let req: Body = serde_json::from_slice(&bytes)
                        .map_err(|e| AdminError::BadJson(e.to_string()))?;
                    r.set_chain(t, Some(req.plugins), req.revision).await?;
                    let view = chain_json(admin, t);
                    audit.sha256 = chain_shas(&view);
                    Ok((StatusCode::OK, view))
                }
                Method::DELETE => {
                    r.set_chain(t, None, None).await?;
                    let view = chain_json(admin, t);
                    audit.sha256 = chain_shas(&view);
                    Ok((StatusCode::OK, view))
                }
                _ => Err(not_allowed()),
            }
        }
        _ => Err(not_allowed()),
    }
}

async fn upload(
    admin: &Admin,
    actor: &Actor,
    tenant: usize,
    name: &str,
    headers: &http::HeaderMap,
    body: Incoming,
    audit: &mut Audit,
) -> Answer {
    let limit = admin.registry.max_plugin_bytes();
    let bytes = read_body(body, limit, admin.body_timeout, headers).await?;
    audit.sha256 = hex::encode(sha2::Sha256::digest(&bytes));
    let up = admin
        .registry
        .upload(tenant, name, bytes, actor.key_id())
        .await?;
    let status = if up.created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((
        status,
        json!({
            "plugin": up.plugin,
            "version": up.version,
            "created": up.created,
            "active": true,
            "in_chain": up.in_chain,
        }),
    ))
}

fn chain_shas(view: &Value) -> String {
    view["plugins"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|s| s["sha256"].as_str())
        .collect::<Vec<_>>()
        .join(",")
}

fn whoami(admin: &Admin, actor: &Actor) -> Value {
    match actor {
        Actor::Operator { key_id } => json!({"key_id": key_id, "role": "operator"}),
        Actor::TenantAdmin { tenant, key_id } => json!({
            "key_id": key_id,
            "role": "tenant-admin",
            "tenant": admin.registry.gateway().tenant_config(*tenant).id,
        }),
    }
}

fn plugin_json(index: &TenantIndex, name: &str, rec: &PluginRecord) -> Value {
    let versions: Vec<Value> = rec
        .versions
        .iter()
        .map(|v| {
            let mut j = serde_json::to_value(v).unwrap_or_default();
            j["active"] = Value::Bool(v.version == rec.active);
            j
        })
        .collect();
    json!({
        "name": name,
        "active_version": rec.active,
        "active_sha256": rec.active_version().map(|v| v.sha256.as_str()),
        "in_chain": index.chain.iter().flatten().any(|e| e.plugin.as_deref() == Some(name)),
        "versions": versions,
    })
}

/// The chain that runs now, with the sha256 of the component at each step.
fn chain_json(admin: &Admin, tenant: usize) -> Value {
    let gw = admin.registry.gateway();
    let (live, index) = admin.registry.live(tenant);
    let sha_at = |i: usize| live.entries.get(i).map(|e| e.sha256.clone());
    let revision = index.as_ref().map_or(0, |i| i.revision);
    let (source, plugins): (&str, Vec<Value>) = match index.as_deref() {
        Some(TenantIndex {
            chain: Some(entries),
            plugins,
            ..
        }) => (
            "registry",
            entries
                .iter()
                .enumerate()
                .map(|(i, e)| {
                    let mut j = serde_json::to_value(e).unwrap_or_default();
                    if let Some(name) = &e.plugin
                        && let Some(rec) = plugins.get(name)
                    {
                        j["version"] = json!(rec.active);
                    }
                    j["sha256"] = json!(sha_at(i));
                    j
                })
                .collect(),
        ),
        _ => (
            "config",
            gw.tenant_config(tenant)
                .plugins
                .iter()
                .enumerate()
                .map(|(i, p)| {
                    let mut j = json!({
                        "config": p.config,
                        "failure": p.failure,
                        "sha256": sha_at(i),
                    });
                    match (&p.builtin, &p.path) {
                        (Some(b), _) => j["builtin"] = json!(b),
                        (None, Some(path)) => j["path"] = json!(path.display().to_string()),
                        (None, None) => {}
                    }
                    j
                })
                .collect(),
        ),
    };
    json!({
        "tenant": gw.tenant_config(tenant).id,
        "source": source,
        "revision": revision,
        "plugins": plugins,
    })
}

fn check_name(name: &str) -> Result<(), AdminError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .next()
            .is_some_and(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
        && name.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'-' | b'_' | b'.')
        });
    if ok {
        Ok(())
    } else {
        Err(AdminError::BadName(name.to_owned()))
    }
}

async fn read_body(
    body: Incoming,
    limit: usize,
    timeout: std::time::Duration,
    headers: &http::HeaderMap,
) -> Result<Bytes, AdminError> {
    body::read_limited(body, headers, limit, timeout)
        .await
        .map_err(|e| match e {
            body::ReadError::TooLarge => AdminError::TooLarge { limit },
            body::ReadError::Timeout => {
                AdminError::BodyRead(format!("not received within {timeout:?}"))
            }
            body::ReadError::Failed(e) => AdminError::BodyRead(e),
        })
}
