//! [`ClusterTls`] on the wire, for tonic: the server's incoming connections, the role check per
//! service, and the client's connector.
//!
//! Without a [`ClusterTls`] the same functions run in plaintext (one machine, or a network the
//! operator vouches for with `--insecure-internal`): connections then carry no roles, and the role
//! check lets them through.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Channel, Endpoint};
use tonic::{Request, Status};

use crate::{ClusterTls, PeerRole, roles_of};

/// How long a client gets to finish the TLS handshake after connecting.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Who is on the other end of a server connection; in every request's extensions.
#[derive(Clone, Debug)]
pub struct PeerIdentity {
    pub remote: Option<SocketAddr>,
    /// The roles the peer's CA-signed certificate grants; `None` on a plaintext connection.
    pub roles: Option<Vec<PeerRole>>,
}

/// An accepted connection, plaintext or TLS.
pub enum Conn {
    Plain(TcpStream, PeerIdentity),
    Tls(Box<tokio_rustls::server::TlsStream<TcpStream>>, PeerIdentity),
}

impl tonic::transport::server::Connected for Conn {
    type ConnectInfo = PeerIdentity;

    fn connect_info(&self) -> PeerIdentity {
        match self {
            Conn::Plain(_, p) | Conn::Tls(_, p) => p.clone(),
        }
    }
}

impl AsyncRead for Conn {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s, _) => Pin::new(s).poll_read(cx, buf),
            Conn::Tls(s, _) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Conn {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Conn::Plain(s, _) => Pin::new(s).poll_write(cx, buf),
            Conn::Tls(s, _) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(self: Pin<&mut Self>, cx: &mut Context<'_>, bufs: &[io::IoSlice<'_>]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Conn::Plain(s, _) => Pin::new(s).poll_write_vectored(cx, bufs),
            Conn::Tls(s, _) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Conn::Plain(s, _) => s.is_write_vectored(),
            Conn::Tls(s, _) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s, _) => Pin::new(s).poll_flush(cx),
            Conn::Tls(s, _) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s, _) => Pin::new(s).poll_shutdown(cx),
            Conn::Tls(s, _) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// The next connection on `listener`, with `TCP_NODELAY` set. Accept errors (out of descriptors and the
/// like) are logged and retried after a moment rather than in a spin.
pub async fn accept(listener: &TcpListener) -> (TcpStream, SocketAddr) {
    loop {
        match listener.accept().await {
            Ok((tcp, addr)) => {
                let _ = tcp.set_nodelay(true);
                return (tcp, addr);
            }
            Err(e) => {
                tracing::warn!("switchyard: accepting a connection: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// The connections `listener` accepts, for `serve_with_incoming`: with TLS, each handshake runs in
/// its own task (a slow or silent client holds up nobody) and must finish within
/// [`HANDSHAKE_TIMEOUT`]; a client whose certificate the CA did not sign never gets a connection.
/// `TCP_NODELAY` is set on every connection.
pub fn incoming(listener: TcpListener, tls: Option<Arc<ClusterTls>>) -> ReceiverStream<io::Result<Conn>> {
    let (tx, rx) = mpsc::channel(64);
    tokio::spawn(async move {
        loop {
            let (tcp, remote) = tokio::select! {
                c = accept(&listener) => c,
                _ = tx.closed() => return,
            };
            let Some(tls) = &tls else {
                if tx.send(Ok(Conn::Plain(tcp, PeerIdentity { remote: Some(remote), roles: None }))).await.is_err() {
                    return;
                }
                continue;
            };
            let acceptor = tokio_rustls::TlsAcceptor::from(tls.server_config());
            let tx = tx.clone();
            tokio::spawn(async move {
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                    Ok(Ok(s)) => {
                        let roles = s.get_ref().1.peer_certificates().and_then(|c| c.first()).map(roles_of).unwrap_or_default();
                        let id = PeerIdentity { remote: Some(remote), roles: Some(roles) };
                        let _ = tx.send(Ok(Conn::Tls(Box::new(s), id))).await;
                    }
                    Ok(Err(e)) => refused(remote, &e.to_string()),
                    Err(_) => refused(remote, "no TLS handshake within 10 s"),
                }
            });
        }
    });
    ReceiverStream::new(rx)
}

fn refused(remote: SocketAddr, why: &str) {
    metrics::counter!("switchyard_tls_handshake_failures_total").increment(1);
    tracing::warn!("switchyard: refused an internal connection from {remote}: {why}");
}

/// A tonic interceptor that lets a call through only from a peer whose certificate grants one of
/// `allowed` (plaintext connections, which carry no identity, pass: the operator chose them).
pub fn require(allowed: &'static [PeerRole]) -> impl FnMut(Request<()>) -> Result<Request<()>, Status> + Clone + Send + Sync + 'static {
    move |req: Request<()>| {
        let Some(peer) = req.extensions().get::<PeerIdentity>() else {
            return Err(Status::unauthenticated("no peer identity on this connection"));
        };
        match &peer.roles {
            None => Ok(req),
            Some(roles) if roles.iter().any(|r| allowed.contains(r)) => Ok(req),
            Some(roles) => {
                let want: Vec<&str> = allowed.iter().map(|r| r.name()).collect();
                let have: Vec<&str> = roles.iter().map(|r| r.name()).collect();
                metrics::counter!("switchyard_tls_denied_total").increment(1);
                Err(Status::permission_denied(format!(
                    "this call needs a certificate with the role {}; the caller's grants [{}]",
                    want.join(" or "),
                    have.join(", ")
                )))
            }
        }
    }
}

/// The connector tonic uses for a cluster channel over TLS: the server must present a CA-signed
/// certificate granting `expect`.
fn connector(
    tls: Arc<ClusterTls>,
    expect: PeerRole,
) -> impl tower::Service<
    tonic::codegen::http::Uri,
    Response = hyper_util::rt::TokioIo<tokio_rustls::client::TlsStream<TcpStream>>,
    Error = io::Error,
    Future = impl Future<Output = io::Result<hyper_util::rt::TokioIo<tokio_rustls::client::TlsStream<TcpStream>>>> + Send,
> + Clone
+ Send
+ 'static {
    tower::service_fn(move |uri: tonic::codegen::http::Uri| {
        let tls = tls.clone();
        async move {
            let host = uri.host().ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, format!("no host in {uri}")))?.to_string();
            let s = dial(&host, uri.port_u16().unwrap_or(443), &tls, expect).await?;
            Ok(hyper_util::rt::TokioIo::new(s))
        }
    })
}

/// A tonic channel that connects on first use: over TLS when `tls` is given (the server must
/// present a CA-signed certificate granting `expect`), else plaintext. Build `endpoint` with
/// [`endpoint`]: the address's scheme does not choose, the cluster's setting does.
pub fn lazy_channel(endpoint: Endpoint, tls: Option<&Arc<ClusterTls>>, expect: PeerRole) -> Channel {
    match tls {
        Some(tls) => endpoint.connect_with_connector_lazy(connector(tls.clone(), expect)),
        None => endpoint.connect_lazy(),
    }
}

/// [`lazy_channel`], connected now.
pub async fn connect(endpoint: Endpoint, tls: Option<&Arc<ClusterTls>>, expect: PeerRole) -> Result<Channel, tonic::transport::Error> {
    match tls {
        Some(tls) => endpoint.connect_with_connector(connector(tls.clone(), expect)).await,
        None => endpoint.connect().await,
    }
}

/// A TLS connection to `host:port` whose server must present a CA-signed certificate granting
/// `expect`; this process presents its own certificate.
pub async fn dial(host: &str, port: u16, tls: &ClusterTls, expect: PeerRole) -> io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let tcp = TcpStream::connect((host, port)).await?;
    tcp.set_nodelay(true)?;
    let name = ServerName::try_from(host.to_string()).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, format!("{host}: {e}")))?;
    tokio_rustls::TlsConnector::from(tls.client_config(expect)).connect(name, tcp).await
}

/// The tonic endpoint for a cluster address. An `https://` scheme becomes `http://`: the TLS is
/// ours (see [`channel`]), and tonic would otherwise look for its own.
pub fn endpoint(addr: &str) -> Result<Endpoint, tonic::transport::Error> {
    let addr = match addr.strip_prefix("https://") {
        Some(rest) => format!("http://{rest}"),
        None => addr.to_string(),
    };
    Endpoint::from_shared(addr)
}
