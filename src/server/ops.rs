//! The ops listener: liveness and readiness for orchestrators.
//! (Metrics and the admin API join it in later steps.)

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
use tokio_util::sync::CancellationToken;

use crate::body::{self, ProxyBody};
use crate::pipeline::Gateway;

pub(super) async fn serve(
    listener: TcpListener,
    gateway: Arc<Gateway>,
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
        let gateway = gateway.clone();
        let builder = builder.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req: Request<Incoming>| {
                let gateway = gateway.clone();
                async move { Ok::<_, Infallible>(handle(&gateway, &req)) }
            });
            let _ = builder.serve_connection(TokioIo::new(tcp), svc).await;
        });
    }
}

fn handle(gateway: &Gateway, req: &Request<Incoming>) -> Response<ProxyBody> {
    let (status, body) = match (req.method(), req.uri().path()) {
        (&Method::GET, "/healthz") => (StatusCode::OK, json!({"status": "ok"})),
        (&Method::GET, "/readyz") => {
            if gateway.is_draining() {
                (
                    StatusCode::SERVICE_UNAVAILABLE,
                    json!({"status": "draining"}),
                )
            } else {
                (StatusCode::OK, json!({"status": "ready"}))
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
