//! Accepting: listeners, TLS, HTTP/1.1 + HTTP/2 on one port, the connection
//! cap, header limits and graceful drain. Requests go to [`crate::pipeline`],
//! ops requests to [`ops`].

mod ops;
pub mod tls;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper::Request;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::{Config, Limits};
use crate::errors::GatewayError;
use crate::pipeline::Gateway;

/// Connections beyond `max_connections` still get a clear 503, but only this
/// many at once; past that they are closed unanswered.
const MAX_REJECTING_CONNECTIONS: usize = 256;

/// Addresses actually bound (ports may have been 0).
#[derive(Debug, Clone, Copy)]
pub struct Addresses {
    pub http: Option<SocketAddr>,
    pub https: Option<SocketAddr>,
    pub ops: Option<SocketAddr>,
}

/// A started gateway. [`Running::shutdown`] begins the drain,
/// [`Running::wait`] returns once it has finished.
pub struct Running {
    pub addrs: Addresses,
    pub gateway: Arc<Gateway>,
    stop: CancellationToken,
    done: tokio::task::JoinHandle<()>,
}

impl Running {
    /// Stop accepting; in-flight requests get `drain_timeout` to finish.
    pub fn shutdown(&self) {
        self.gateway.set_draining();
        self.stop.cancel();
    }

    pub async fn wait(self) {
        let _ = self.done.await;
    }
}

/// Connections the kernel completes before they are accepted. A burst of
/// clients (a reconnect storm after a failover) beyond the queue has its SYNs
/// dropped and retried a second later; the usual default (128) is far too
/// small for a gateway. The kernel caps it at `net.core.somaxconn`.
pub const LISTEN_BACKLOG: u32 = 4096;

/// A TCP listener with [`LISTEN_BACKLOG`] (and `SO_REUSEADDR`, so a restart
/// does not wait for the old sockets' TIME_WAIT).
pub fn listen(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}

/// Bind every configured listener and start serving.
pub async fn start(cfg: Config) -> anyhow::Result<Running> {
    let tls = match &cfg.server.https {
        Some(h) => Some(TlsAcceptor::from(tls::load(&h.cert, &h.key)?)),
        None => None,
    };
    let bind = |a: Option<SocketAddr>| async move {
        match a {
            Some(a) => listen(a)
                .map(Some)
                .map_err(|e| anyhow::anyhow!("cannot listen on {a}: {e}")),
            None => Ok(None),
        }
    };
    let http = bind(cfg.server.http).await?;
    let https = bind(cfg.server.https.as_ref().map(|h| h.listen)).await?;
    let ops = bind(cfg.server.ops).await?;
    let addrs = Addresses {
        http: http.as_ref().map(|l| l.local_addr()).transpose()?,
        https: https.as_ref().map(|l| l.local_addr()).transpose()?,
        ops: ops.as_ref().map(|l| l.local_addr()).transpose()?,
    };

    let limits = cfg.limits.clone();
    let gateway = Arc::new(Gateway::new(cfg.clone())?);
    let builder = Arc::new(http_builder(&limits));
    let conns = Arc::new(Semaphore::new(limits.max_connections));
    let stop = CancellationToken::new();
    let tracker = TaskTracker::new();
    let ops_stop = CancellationToken::new();

    let ops_tls = match &cfg.server.ops_tls {
        Some(t) => Some(TlsAcceptor::from(tls::load(&t.cert, &t.key)?)),
        None => None,
    };
    // Tenants' stored chains are live before the first request is accepted.
    let registry = match cfg.registry.clone() {
        Some(r) => {
            let registry = crate::registry::Registry::open(r, gateway.clone()).await?;
            Some(registry)
        }
        None => None,
    };
    let mut loops = Vec::new();
    for (listener, tls) in [(http, None), (https, tls)] {
        let Some(listener) = listener else { continue };
        let ctx = AcceptCtx {
            gateway: gateway.clone(),
            builder: builder.clone(),
            conns: conns.clone(),
            rejecting: Arc::new(Semaphore::new(MAX_REJECTING_CONNECTIONS)),
            handshake_timeout: limits.header_read_timeout,
            tracker: tracker.clone(),
            stop: stop.clone(),
        };
        loops.push(tokio::spawn(accept_loop(listener, tls, ctx, stop.clone())));
    }
    if let Some(r) = &registry {
        r.spawn_sync(ops_stop.clone());
    }
    let admin = registry.map(|registry| {
        Arc::new(crate::admin::Admin {
            registry,
            keys: crate::auth::AdminKeys::new(&cfg.tenants, &cfg.admin.operator_keys),
            body_timeout: limits.body_read_timeout,
        })
    });
    let ops_state = Arc::new(ops::Ops {
        gateway: gateway.clone(),
        admin,
        tls: ops_tls,
        handshake_timeout: limits.header_read_timeout,
    });
    let ops_task = ops.map(|l| {
        tokio::spawn(ops::serve(
            l,
            ops_state.clone(),
            builder.clone(),
            ops_stop.clone(),
        ))
    });

    let drain = limits.drain_timeout;
    let done = tokio::spawn(async move {
        for l in loops {
            let _ = l.await;
        }
        // Listeners are closed now; let the connections finish what they started.
        tracker.close();
        if tokio::time::timeout(drain, tracker.wait()).await.is_err() {
            tracing::warn!(
                ?drain,
                "drain deadline passed; closing remaining connections"
            );
        }
        ops_stop.cancel();
        if let Some(t) = ops_task {
            let _ = t.await;
        }
    });
    Ok(Running {
        addrs,
        gateway,
        stop,
        done,
    })
}

fn http_builder(limits: &Limits) -> auto::Builder<TokioExecutor> {
    let mut b = auto::Builder::new(TokioExecutor::new());
    b.http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .max_buf_size(limits.max_header_bytes);
    b.http2()
        .timer(TokioTimer::new())
        .max_header_list_size(u32::try_from(limits.max_header_bytes).unwrap_or(u32::MAX))
        .keep_alive_interval(Duration::from_secs(30));
    b
}

struct AcceptCtx {
    gateway: Arc<Gateway>,
    builder: Arc<auto::Builder<TokioExecutor>>,
    conns: Arc<Semaphore>,
    rejecting: Arc<Semaphore>,
    handshake_timeout: Duration,
    tracker: TaskTracker,
    stop: CancellationToken,
}

async fn accept_loop(
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    ctx: AcceptCtx,
    stop: CancellationToken,
) {
    loop {
        let (tcp, peer) = tokio::select! {
            _ = stop.cancelled() => return,
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let _ = tcp.set_nodelay(true);
        let (permit, over_cap) = match ctx.conns.clone().try_acquire_owned() {
            Ok(p) => (p, false),
            Err(_) => match ctx.rejecting.clone().try_acquire_owned() {
                Ok(p) => (p, true),
                Err(_) => continue, // drops the socket
            },
        };
        let conn = Conn {
            tls: tls.clone(),
            gateway: ctx.gateway.clone(),
            builder: ctx.builder.clone(),
            stop: ctx.stop.clone(),
            handshake_timeout: ctx.handshake_timeout,
            over_cap,
        };
        ctx.tracker.spawn(async move {
            let _permit = permit;
            conn.serve(tcp, peer).await;
        });
    }
}

struct Conn {
    tls: Option<TlsAcceptor>,
    gateway: Arc<Gateway>,
    builder: Arc<auto::Builder<TokioExecutor>>,
    stop: CancellationToken,
    handshake_timeout: Duration,
    /// Past the connection cap: every request on it gets a 503.
    over_cap: bool,
}

impl Conn {
    async fn serve(self, tcp: TcpStream, peer: SocketAddr) {
        match self.tls.clone() {
            None => self.serve_io(TokioIo::new(tcp), peer).await,
            Some(acceptor) => {
                match tokio::time::timeout(self.handshake_timeout, acceptor.accept(tcp)).await {
                    Ok(Ok(stream)) => self.serve_io(TokioIo::new(stream), peer).await,
                    Ok(Err(e)) => tracing::debug!(%peer, error = %e, "TLS handshake failed"),
                    Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                }
            }
        }
    }

    async fn serve_io<I>(self, io: TokioIo<I>, peer: SocketAddr)
    where
        I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let gateway = self.gateway;
        let over_cap = self.over_cap;
        // Past the cap: answer once, then close (HTTP/2 ignores
        // `Connection: close`, so the connection is shut down gracefully).
        let answered = Arc::new(tokio::sync::Notify::new());
        let answered_svc = answered.clone();
        let svc = service_fn(move |req: Request<Incoming>| {
            let gateway = gateway.clone();
            let answered = answered_svc.clone();
            async move {
                if over_cap {
                    let ids = crate::telemetry::RequestIds::from_headers(req.headers());
                    let err = GatewayError::TooManyConnections { retry_after: 1 };
                    gateway.metrics().refused(&err);
                    answered.notify_one();
                    return Ok::<_, Infallible>(ids.decorate(err.into_response(&ids.trace_id)));
                }
                Ok(crate::pipeline::handle(gateway, req).await)
            }
        });
        let conn = self.builder.serve_connection(io, svc);
        tokio::pin!(conn);
        let result = tokio::select! {
            r = conn.as_mut() => r,
            _ = self.stop.cancelled() => {
                // Finish the requests in flight, take no new ones.
                conn.as_mut().graceful_shutdown();
                conn.await
            }
            _ = answered.notified(), if over_cap => {
                conn.as_mut().graceful_shutdown();
                conn.await
            }
        };
        if let Err(e) = result {
            tracing::debug!(%peer, error = %e, "connection ended with an error");
        }
    }
}
