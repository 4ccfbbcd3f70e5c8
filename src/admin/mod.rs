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
use http_body_util::{BodyExt, Limited};
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

/// Serve one admin request. Never fails: errors become responses here.
pub async fn handle(admin: &Admin, req: Request<Incoming>) -> Response<ProxyBody> {
    let ids = RequestIds::from_headers(req.headers());
    let span = tracing::info_span!(
        "admin",
        method = %req.method(),
        path = %req.uri().path(),
        actor = tracing::field::Empty,
        tenant = tracing::field::Empty,
        trace_id = %ids.trace_id,
    );
    let resp = match serve(admin, req).instrument(span.clone()).await {
        Ok((status, body)) => {
            let mut resp = Response::new(body::json(&body));
            *resp.status_mut() = status;
            resp.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
            resp
        }
        Err(e) => {
            span.in_scope(|| {
                tracing::info!(status = e.status().as_u16(), code = e.code(), error = %e, "admin request refused")
            });
            e.into_response(&ids.trace_id)
        }
    };
    ids.decorate(resp)
}

type Answer = Result<(StatusCode, Value), AdminError>;

async fn serve(admin: &Admin, req: Request<Incoming>) -> Answer {
    let (parts, body) = req.into_parts();
    let path = parts.uri.path().to_owned();
    let method = parts.method.clone();
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
    let span = tracing::Span::current();
    span.record("actor", actor.key_id());
    let gw = admin.registry.gateway();

    // Resolve the tenant before looking at anything else, and answer every
    // tenant this actor may not act on exactly like one that does not exist.
    let tenant_of = |id: &str| -> Result<usize, AdminError> {
        span.record("tenant", id);
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
            let t = tenant_of(t)?;
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
            let t = tenant_of(t)?;
            check_name(name)?;
            match *m {
                Method::GET => {
                    let index = r.index(t).await?;
                    let rec = index.plugins.get(name).ok_or_else(|| {
                        crate::registry::RegistryError::NoPlugin((*name).to_owned())
                    })?;
                    Ok((StatusCode::OK, plugin_json(&index, name, rec)))
                }
                Method::PUT => upload(admin, &actor, t, name, &parts.headers, body).await,
                Method::DELETE => {
                    let result = r.delete(t, name).await;
                    audit(
                        &actor,
                        gw.tenant_config(t).id.as_str(),
                        "delete",
                        name,
                        None,
                        &result,
                    );
                    result?;
                    Ok((StatusCode::OK, json!({"plugin": name, "deleted": true})))
                }
                _ => Err(not_allowed()),
            }
        }
        (Route::Rollback(t, name), &Method::POST) => {
            let t = tenant_of(t)?;
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
            let result = r.rollback(t, name, req.version).await;
            let sha = result.as_ref().ok().map(|v| v.sha256.as_str());
            audit(
                &actor,
                &gw.tenant_config(t).id,
                "rollback",
                name,
                sha,
                &result,
            );
            let v = result?;
            Ok((StatusCode::OK, json!({"plugin": name, "active": v})))
        }
        (Route::Chain(t), m) => {
            let t = tenant_of(t)?;
            match *m {
                Method::GET => Ok((StatusCode::OK, chain_json(admin, t, &r.index(t).await?))),
                Method::PUT => {
                    #[derive(Deserialize)]
                    #[serde(deny_unknown_fields)]
                    struct Body {
                        plugins: Vec<ChainEntry>,
                    }
                    let bytes =
                        read_body(body, 1 << 20, admin.body_timeout, &parts.headers).await?;
                    let req: Body = serde_json::from_slice(&bytes)
                        .map_err(|e| AdminError::BadJson(e.to_string()))?;
                    let result = r.set_chain(t, Some(req.plugins)).await;
                    audit(
                        &actor,
                        &gw.tenant_config(t).id,
                        "set-chain",
                        "",
                        None,
                        &result,
                    );
                    Ok((StatusCode::OK, chain_json(admin, t, &result?)))
                }
                Method::DELETE => {
                    let result = r.set_chain(t, None).await;
                    audit(
                        &actor,
                        &gw.tenant_config(t).id,
                        "reset-chain",
                        "",
                        None,
                        &result,
                    );
                    Ok((StatusCode::OK, chain_json(admin, t, &result?)))
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
) -> Answer {
    let tenant_id = admin.registry.gateway().tenant_config(tenant).id.clone();
    let limit = admin.registry.max_plugin_bytes();
    let bytes = match read_body(body, limit, admin.body_timeout, headers).await {
        Ok(b) => b,
        Err(e) => {
            audit(actor, &tenant_id, "upload", name, None, &Err::<(), _>(&e));
            return Err(e);
        }
    };
    let sha256 = hex::encode(sha2::Sha256::digest(&bytes));
    let result = admin
        .registry
        .upload(tenant, name, bytes, actor.key_id())
        .await;
    audit(actor, &tenant_id, "upload", name, Some(&sha256), &result);
    let up = result?;
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

/// The chain as stored, with the sha256 of what is live at each step.
fn chain_json(admin: &Admin, tenant: usize, index: &TenantIndex) -> Value {
    let gw = admin.registry.gateway();
    let live = admin.registry.live_chain(tenant);
    let sha_at = |i: usize| live.entries.get(i).map(|e| e.sha256.clone());
    let (source, plugins): (&str, Vec<Value>) = match &index.chain {
        Some(entries) => (
            "registry",
            entries
                .iter()
                .enumerate()
                .map(|(i, e)| {
                    let mut j = serde_json::to_value(e).unwrap_or_default();
                    if let Some(name) = &e.plugin
                        && let Some(rec) = index.plugins.get(name)
                    {
                        j["version"] = json!(rec.active);
                    }
                    j["sha256"] = json!(sha_at(i));
                    j
                })
                .collect(),
        ),
        None => (
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
        "revision": index.revision,
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
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(AdminError::TooLarge { limit });
    }
    match tokio::time::timeout(timeout, Limited::new(body, limit).collect()).await {
        Err(_) => Err(AdminError::BodyRead(format!(
            "not received within {timeout:?}"
        ))),
        Ok(Ok(c)) => Ok(c.to_bytes()),
        Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => {
            Err(AdminError::TooLarge { limit })
        }
        Ok(Err(e)) => Err(AdminError::BodyRead(e.to_string())),
    }
}

/// One audit record per change or refusal.
fn audit<T, E: std::fmt::Display>(
    actor: &Actor,
    tenant: &str,
    action: &str,
    plugin: &str,
    sha256: Option<&str>,
    result: &Result<T, E>,
) {
    let actor = actor.key_id();
    let sha256 = sha256.unwrap_or("");
    match result {
        Ok(_) => {
            tracing::info!(target: "sluice::audit", actor, tenant, action, plugin, sha256, outcome = "ok", "admin change")
        }
        Err(e) => {
            tracing::warn!(target: "sluice::audit", actor, tenant, action, plugin, sha256, outcome = "refused", reason = %e, "admin change refused")
        }
    }
}
