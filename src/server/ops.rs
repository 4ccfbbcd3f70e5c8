//! The ops listener: liveness and readiness for orchestrators, Prometheus
//! metrics, and the admin API when a registry is configured. HTTPS when
//! `server.ops_tls` is set.

use std::convert::Infallible;
use std::sync::Arc;

use http::{Method, Response, StatusCode, header};
use hyper::Request;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use serde_json::json;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

use crate::admin::Admin;
use crate::body::{self, ProxyBody};
use crate::pipeline::Gateway;

pub(super) struct Ops {
    pub gateway: Arc<Gateway>,
    pub admin: Option<Arc<Admin>>,
    pub tls: Option<TlsAcceptor>,
    pub handshake_timeout: std::time::Duration,
}

pub(super) async fn serve(
    listener: TcpListener,
    ops: Arc<Ops>,
    builder: Arc<auto::Builder<TokioExecutor>>,
    stop: CancellationToken,
) {
    loop {
        let (tcp, _) = tokio::select! {
            _ = stop.cancelled() => return,
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(_) => continue,
            },
        };
        let ops = ops.clone();
        let builder = builder.clone();
        tokio::spawn(async move {
            let svc_ops = ops.clone();
            let svc = service_fn(move |req: Request<Incoming>| {
                let ops = svc_ops.clone();
                async move { Ok::<_, Infallible>(handle(&ops, req).await) }
            });
            match &ops.tls {
                None => {
                    let _ = builder.serve_connection(TokioIo::new(tcp), svc).await;
                }
                Some(acceptor) => {
                    if let Ok(Ok(tls)) =
                        tokio::time::timeout(ops.handshake_timeout, acceptor.accept(tcp)).await
                    {
                        let _ = builder.serve_connection(TokioIo::new(tls), svc).await;
                    }
                }
            }
        });
    }
}

async fn handle(ops: &Ops, req: Request<Incoming>) -> Response<ProxyBody> {
    if req.uri().path().starts_with("/admin/")
        && let Some(admin) = &ops.admin
    {
        return crate::admin::handle(admin, req).await;
    }
    if req.method() == Method::GET && req.uri().path() == "/metrics" {
        let mut resp = Response::new(body::full(ops.gateway.metrics_text()));
        resp.headers_mut().insert(
            header::CONTENT_TYPE,
            http::HeaderValue::from_static(crate::telemetry::metrics::CONTENT_TYPE),
        );
        return resp;
    }
    let (status, body) = match (req.method(), req.uri().path()) {
        (&Method::GET, "/healthz") => (StatusCode::OK, json!({"status": "ok"})),
        (&Method::GET, "/readyz") => {
            let registry = ops.admin.as_ref().map(|a| a.registry.health());
            if ops.gateway.is_draining() {
                (
                    StatusCode::SERVICE_UNAVAILABLE,
                    json!({"status": "draining", "registry": registry}),
                )
            } else {
                // A degraded registry still serves its last good set, so the
                // replica stays ready; the body says so.
                (
                    StatusCode::OK,
                    json!({"status": "ready", "registry": registry}),
                )
            }
        }
        _ => (StatusCode::NOT_FOUND, json!({"error": "not found"})),
    };
    let mut resp = Response::new(body::json(&body));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    resp
}
