//! Shared test harness: real sockets, real TLS, the real simulated engine.
#![allow(dead_code)]

pub mod redis;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use clap::Parser;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use sluice::config::{Config, hash_key};
use sluice::server::{self, Running};
use sluice::sim::{self, SimHandle, SimOptions};

#[derive(Parser)]
struct SimCli {
    #[command(flatten)]
    options: SimOptions,
}

/// Start a simulated engine with CLI-style flags, e.g. `["--tpot", "5"]`.
pub async fn sim_engine(flags: &[&str]) -> SimHandle {
    let mut argv = vec!["sim-engine"];
    argv.extend_from_slice(flags);
    let options = SimCli::try_parse_from(argv)
        .expect("valid sim flags")
        .options;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    sim::spawn(listener, options)
        .await
        .expect("sim engine starts")
}

/// A TOML `[[tenants]]` block with one key.
pub fn tenant(id: &str, pool: &str, key: &str, extra: &str) -> String {
    format!(
        r#"
[[tenants]]
id = "{id}"
deployment = "serverless"
pool = "{pool}"
{extra}
[[tenants.api_keys]]
id = "{id}-key"
sha256 = "{}"
"#,
        hash_key(key)
    )
}

/// A TOML `[[pools]]` block.
pub fn pool(name: &str, endpoints: &[String], extra: &str) -> String {
    let eps: Vec<String> = endpoints.iter().map(|e| format!("{e:?}")).collect();
    format!(
        r#"
[[pools]]
name = "{name}"
endpoints = [{}]
models = ["deepseek-v4-flash"]
{extra}
"#,
        eps.join(", ")
    )
}

pub fn url(h: &SimHandle) -> String {
    format!("http://{}", h.addr)
}

/// A running gateway on ephemeral ports with a fresh self-signed certificate.
pub struct Gateway {
    pub running: Option<Running>,
    pub http: SocketAddr,
    pub https: SocketAddr,
    pub ops: SocketAddr,
    pub cert: PathBuf,
    _dir: tempfile::TempDir,
}

impl Gateway {
    /// `body` holds `[limits]`, `[[pools]]` and `[[tenants]]`; the `[server]`
    /// section is added here.
    pub async fn start(body: &str) -> Gateway {
        let dir = tempfile::tempdir().unwrap();
        let tls = server::tls::generate_self_signed(dir.path()).unwrap();
        let text = format!(
            r#"
[server]
http = "127.0.0.1:0"
ops = "127.0.0.1:0"
https = {{ listen = "127.0.0.1:0", cert = {:?}, key = {:?} }}
{body}
"#,
            tls.cert_path, tls.key_path
        );
        let cfg = Config::parse(&text, Path::new(".")).expect("test config parses");
        let issues = cfg.validate();
        assert!(issues.is_empty(), "test config invalid: {issues:?}");
        let running = server::start(cfg).await.expect("gateway starts");
        Gateway {
            http: running.addrs.http.unwrap(),
            https: running.addrs.https.unwrap(),
            ops: running.addrs.ops.unwrap(),
            running: Some(running),
            cert: tls.cert_path,
            _dir: dir,
        }
    }

    pub fn http_url(&self, path: &str) -> String {
        format!("http://{}{path}", self.http)
    }

    pub fn https_url(&self, path: &str) -> String {
        format!("https://localhost:{}{path}", self.https.port())
    }

    /// An HTTPS client trusting this gateway's certificate, offering only
    /// the given ALPN protocol (`h2` or `http/1.1`).
    pub fn tls_client(&self, alpn: &str) -> reqwest::Client {
        install_tls_provider();
        let pem = std::fs::read(&self.cert).unwrap();
        let mut roots = rustls::RootCertStore::empty();
        for c in rustls::pki_types::CertificateDer::pem_slice_iter(&pem) {
            roots.add(c.unwrap()).unwrap();
        }
        let mut cfg = rustls::ClientConfig::builder_with_provider(server::tls::provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        cfg.alpn_protocols = vec![alpn.as_bytes().to_vec()];
        let b = reqwest::Client::builder()
            .no_proxy()
            .tls_backend_preconfigured(cfg)
            .timeout(Duration::from_secs(30));
        let b = if alpn == "h2" {
            b.http2_prior_knowledge()
        } else {
            b.http1_only()
        };
        b.build().unwrap()
    }

    pub async fn shutdown(mut self) {
        if let Some(r) = self.running.take() {
            r.shutdown();
            r.wait().await;
        }
    }
}

use rustls::pki_types::pem::PemObject;

/// reqwest is built without a default TLS provider (to stay on ring); it
/// needs one installed even for plain HTTP clients.
pub fn install_tls_provider() {
    let p = std::sync::Arc::unwrap_or_clone(server::tls::provider());
    let _ = p.install_default();
}

/// A plain HTTP/1.1 client.
pub fn http_client() -> reqwest::Client {
    install_tls_provider();
    reqwest::Client::builder()
        .no_proxy()
        .http1_only()
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap()
}

pub fn chat(model: &str, stream: bool) -> serde_json::Value {
    serde_json::json!({
        "model": model,
        "stream": stream,
        "messages": [{"role": "user", "content": "Tell me about rivers."}],
    })
}

/// Parse an SSE body into its `data:` payloads.
pub fn sse_data(text: &str) -> Vec<String> {
    text.split("\n\n")
        .filter_map(|ev| {
            ev.lines()
                .find_map(|l| l.strip_prefix("data: ").or_else(|| l.strip_prefix("data:")))
                .map(|d| d.trim().to_owned())
        })
        .collect()
}

/// Poll a condition at most `tries` times, 20 ms apart. No timing assertion:
/// the bound only stops a broken test from hanging.
pub async fn eventually(tries: usize, mut cond: impl FnMut() -> bool) -> bool {
    for _ in 0..tries {
        if cond() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    cond()
}

/// What an [`EchoEngine`] received.
#[derive(Clone, Debug)]
pub struct Seen {
    pub path: String,
    pub headers: http::HeaderMap,
    pub body: Bytes,
}

/// A minimal engine that records each request and answers a fixed
/// completion, to check what sluice forwards.
pub struct EchoEngine {
    pub addr: SocketAddr,
    pub seen: Arc<Mutex<Vec<Seen>>>,
}

impl EchoEngine {
    pub async fn start() -> EchoEngine {
        Self::start_with(serde_json::json!({
            "id": "chatcmpl-echo", "object": "chat.completion", "created": 0,
            "model": "deepseek-v4-flash",
            "choices": [{"index": 0, "finish_reason": "stop",
                "message": {"role": "assistant", "content": "echo"}}],
            "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}
        }))
        .await
    }

    /// An engine that answers every request with `answer`.
    pub async fn start_with(answer: serde_json::Value) -> EchoEngine {
        Self::start_status(200, answer).await
    }

    /// An engine that answers every request with `status` and `answer`.
    pub async fn start_status(status: u16, answer: serde_json::Value) -> EchoEngine {
        let answer = Bytes::from(answer.to_string());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen: Arc<Mutex<Vec<Seen>>> = Arc::default();
        let s = seen.clone();
        tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    return;
                };
                let s = s.clone();
                let answer = answer.clone();
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req: http::Request<Incoming>| {
                        let s = s.clone();
                        let answer = answer.clone();
                        async move {
                            let (parts, body) = req.into_parts();
                            let body = body.collect().await.unwrap().to_bytes();
                            s.lock().unwrap().push(Seen {
                                path: parts.uri.path().to_owned(),
                                headers: parts.headers,
                                body,
                            });
                            let mut resp = http::Response::new(Full::new(answer));
                            *resp.status_mut() = http::StatusCode::from_u16(status).unwrap();
                            resp.headers_mut()
                                .insert("content-type", "application/json".parse().unwrap());
                            Ok::<_, std::convert::Infallible>(resp)
                        }
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(tcp), svc)
                        .await;
                });
            }
        });
        EchoEngine { addr, seen }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn last(&self) -> Seen {
        self.seen
            .lock()
            .unwrap()
            .last()
            .cloned()
            .expect("the engine saw a request")
    }
}

/// An error response: checks the OpenAI shape, the sluice fields and
/// that the body's trace id is the one in `traceparent`; returns status,
/// the `error` object and the headers.
pub async fn error_of(
    resp: reqwest::Response,
) -> (u16, serde_json::Value, reqwest::header::HeaderMap) {
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let v: serde_json::Value = resp.json().await.expect("error body is JSON");
    let e = &v["error"];
    assert!(e["message"].as_str().is_some_and(|m| !m.is_empty()), "{v}");
    assert!(e["type"].is_string() && e["code"].is_string(), "{v}");
    assert!(e.get("param").is_some(), "{v}");
    let trace = e["trace_id"].as_str().unwrap();
    assert_eq!(trace.len(), 32);
    let tp = headers["traceparent"].to_str().unwrap();
    assert!(
        tp.contains(trace),
        "trace id in body matches the traceparent header"
    );
    (status, v["error"].clone(), headers)
}
/// A component `build.rs` made from `plugins/`.
pub fn component(name: &str) -> Vec<u8> {
    std::fs::read(format!("{}/{name}.wasm", env!("SLUICE_PLUGIN_COMPONENTS"))).unwrap()
}

/// Same-length byte replacement: keeps the binary well-formed while
/// changing one name inside it.
pub fn patched(mut bytes: Vec<u8>, from: &[u8], to: &[u8]) -> Vec<u8> {
    assert_eq!(from.len(), to.len());
    let mut hits = 0;
    let mut i = 0;
    while i + from.len() <= bytes.len() {
        if &bytes[i..i + from.len()] == from {
            bytes[i..i + from.len()].copy_from_slice(to);
            hits += 1;
        }
        i += 1;
    }
    assert!(hits > 0, "{} not found", String::from_utf8_lossy(from));
    bytes
}

pub mod otlp;
