//! The HTTP/1.1 listener: axum's router on hyper, with the limits axum's `serve` has no knobs for.
//!
//! - **Headers and idle keep-alive**: a connection must deliver each request's headers within the
//!   keep-alive timeout, counted from when the server is ready for them (right after accept, and after
//!   each response): a slow-headers client or an idle kept-alive socket is closed, as uvicorn closes
//!   one after vLLM's `VLLM_HTTP_TIMEOUT_KEEP_ALIVE`.
//! - **Bodies** have their own deadline, in [`RawBody`](super::RawBody).
//! - **Peer address**: each request carries the client's address (`ConnectInfo`) for the access log.
//! - **Shutdown**: the listener closes at once; open connections finish their requests (streams run to
//!   their end) while the caller's grace period lasts.

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use axum::Router;
use axum::extract::ConnectInfo;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use tower::Service;

/// Serves `app` on `listener` until `shutdown` resolves, then waits for open connections.
pub async fn serve(listener: tokio::net::TcpListener, app: Router, keep_alive: Duration, shutdown: impl Future<Output = ()>) {
    let graceful = GracefulShutdown::new();
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder.timer(TokioTimer::new()).header_read_timeout(keep_alive).keep_alive(true);
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let (stream, addr) = tokio::select! {
            c = switchyard_tls::transport::accept(&listener) => c,
            _ = &mut shutdown => break,
        };
        let app = app.clone();
        let svc = hyper::service::service_fn(move |mut req: hyper::Request<Incoming>| {
            req.extensions_mut().insert(ConnectInfo::<SocketAddr>(addr));
            let mut app = app.clone();
            async move { app.call(req.map(axum::body::Body::new)).await }
        });
        let conn = graceful.watch(builder.serve_connection(TokioIo::new(stream), svc));
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!("connection from {addr}: {e}");
            }
        });
    }
    drop(listener);
    graceful.shutdown().await;
}
