//! mTLS between cluster processes, at the connection: who gets a connection, which roles it carries,
//! what the per-service check lets through, and reloading rotated files.

use std::sync::Arc;
use std::time::Duration;

use switchyard_tls::generate::{Leaf, cluster};
use switchyard_tls::transport::{Conn, PeerIdentity, dial, incoming, require};
use switchyard_tls::{ClusterTls, PeerRole, TlsPaths, roles_of};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_stream::StreamExt;

fn leaf(name: &str, roles: &[PeerRole]) -> Leaf {
    Leaf { name: name.into(), roles: roles.to_vec(), hosts: vec!["127.0.0.1".into()] }
}

struct Pki {
    _dirs: (tempfile::TempDir, tempfile::TempDir),
    attention: Arc<ClusterTls>,
    router: Arc<ClusterTls>,
    expert: Arc<ClusterTls>,
    /// A router certificate from another CA.
    outsider: Arc<ClusterTls>,
}

fn pki() -> Pki {
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let p = cluster(
        a.path(),
        &[leaf("attention", &[PeerRole::Attention]), leaf("router", &[PeerRole::Router]), leaf("expert", &[PeerRole::Expert])],
        1,
    )
    .unwrap();
    let o = cluster(b.path(), &[leaf("router", &[PeerRole::Router])], 1).unwrap();
    let load = |p: &TlsPaths| ClusterTls::load(p.clone()).unwrap();
    Pki { attention: load(&p[0]), router: load(&p[1]), expert: load(&p[2]), outsider: load(&o[0]), _dirs: (a, b) }
}

async fn server(tls: &Arc<ClusterTls>) -> (u16, tokio_stream::wrappers::ReceiverStream<std::io::Result<Conn>>) {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    (port, incoming(l, Some(tls.clone())))
}

async fn next_conn(s: &mut tokio_stream::wrappers::ReceiverStream<std::io::Result<Conn>>) -> Option<Conn> {
    tokio::time::timeout(Duration::from_secs(2), s.next()).await.ok().flatten().map(|r| r.unwrap())
}

fn identity(c: &Conn) -> PeerIdentity {
    tonic::transport::server::Connected::connect_info(c)
}

#[tokio::test]
async fn a_ca_signed_peer_connects_with_its_roles() {
    let k = pki();
    let (port, mut conns) = server(&k.attention).await;
    let mut client = dial("127.0.0.1", port, &k.router, PeerRole::Attention).await.unwrap();
    let mut conn = next_conn(&mut conns).await.expect("a connection");
    assert_eq!(identity(&conn).roles, Some(vec![PeerRole::Router]));
    client.write_all(b"ping").await.unwrap();
    let mut buf = [0u8; 4];
    conn.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"ping");
}

#[tokio::test]
async fn a_certificate_from_another_ca_gets_no_connection() {
    let k = pki();
    let (port, mut conns) = server(&k.attention).await;
    // The outsider trusts only its own CA, so it would refuse our server too; it tries anyway with a
    // client that expects nothing from the server it cannot check: the server must refuse it.
    let r = dial("127.0.0.1", port, &k.outsider, PeerRole::Attention).await;
    assert!(r.is_err(), "the outsider cannot verify the cluster's server either");
    // A plain TCP client that sends no certificate at all.
    let mut raw = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    raw.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
    assert!(next_conn(&mut conns).await.is_none(), "no connection reaches the server without a CA-signed certificate");
}

/// A rustls client that trusts the cluster CA (so it accepts the server) and presents `identity`'s
/// certificate, or none.
async fn raw_client(port: u16, ca: &std::path::Path, identity: Option<&TlsPaths>) -> std::io::Result<()> {
    use rustls::pki_types::PrivateKeyDer;
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    roots.add(rustls::pki_types::CertificateDer::from_pem_file(ca).unwrap()).unwrap();
    let b = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots);
    let cfg = match identity {
        Some(p) => b
            .with_client_auth_cert(
                vec![rustls::pki_types::CertificateDer::from_pem_file(&p.cert).unwrap()],
                PrivateKeyDer::from_pem_file(&p.key).unwrap(),
            )
            .unwrap(),
        None => b.with_no_client_auth(),
    };
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
    let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
    let mut s = tokio_rustls::TlsConnector::from(Arc::new(cfg)).connect(name, tcp).await?;
    // TLS 1.3: the server judges the client's certificate after the client has finished; a refusal
    // shows as the first read failing.
    s.write_all(b"ping").await?;
    let mut buf = [0u8; 1];
    match tokio::time::timeout(Duration::from_secs(2), s.read(&mut buf)).await {
        Ok(Ok(0)) => Err(std::io::Error::other("closed")),
        Ok(r) => r.map(|_| ()),
        Err(_) => Ok(()),
    }
}

#[tokio::test]
async fn a_client_certificate_signed_elsewhere_or_none_is_refused_by_the_server() {
    let k = pki();
    let (port, mut conns) = server(&k.attention).await;
    let ca = k.attention.paths().ca.clone();
    // Another CA of the same name: the chain's signature does not verify (alert decrypt_error).
    raw_client(port, &ca, Some(k.outsider.paths())).await.unwrap_err();
    let e = raw_client(port, &ca, None).await.unwrap_err();
    assert!(e.to_string().to_lowercase().contains("certificate"), "{e}");
    assert!(next_conn(&mut conns).await.is_none(), "neither reached the server");
    // The same client with the cluster's router certificate gets through (the check above is not
    // refusing everything).
    raw_client(port, &ca, Some(k.router.paths())).await.unwrap();
    assert_eq!(identity(&next_conn(&mut conns).await.unwrap()).roles, Some(vec![PeerRole::Router]));
    // A configuration that mixes another CA's certificate with this CA does not even load.
    let mixed = TlsPaths { cert: k.outsider.paths().cert.clone(), key: k.outsider.paths().key.clone(), ca };
    let e = ClusterTls::load(mixed).unwrap_err().to_string();
    assert!(e.contains("is not a certificate the CA"), "{e}");
}

#[tokio::test]
async fn a_server_without_the_expected_role_is_refused_by_the_client() {
    let k = pki();
    let (port, _conns) = server(&k.expert).await;
    let e = dial("127.0.0.1", port, &k.router, PeerRole::Attention).await.unwrap_err();
    assert!(e.to_string().contains("ApplicationVerificationFailure"), "{e}");
}

#[tokio::test]
async fn calls_pass_only_with_an_allowed_role() {
    let k = pki();
    let (port, mut conns) = server(&k.attention).await;
    let _client = dial("127.0.0.1", port, &k.expert, PeerRole::Attention).await.unwrap();
    let conn = next_conn(&mut conns).await.unwrap();
    let with = |id: PeerIdentity| {
        let mut r = tonic::Request::new(());
        r.extensions_mut().insert(id);
        r
    };
    let mut only_routers = require(&[PeerRole::Router]);
    let denied = only_routers(with(identity(&conn))).unwrap_err();
    assert_eq!(denied.code(), tonic::Code::PermissionDenied);
    assert!(denied.message().contains("router") && denied.message().contains("expert"), "{}", denied.message());
    let mut experts = require(&[PeerRole::Expert, PeerRole::Attention]);
    assert!(experts(with(identity(&conn))).is_ok());
    // Plaintext connections carry no roles and pass; a request with no identity at all does not.
    assert!(only_routers(with(PeerIdentity { remote: None, roles: None })).is_ok());
    assert_eq!(only_routers(tonic::Request::new(())).unwrap_err().code(), tonic::Code::Unauthenticated);
}

#[test]
fn loading_checks_role_chain_and_key() {
    let dir = tempfile::tempdir().unwrap();
    let p = cluster(dir.path(), &[leaf("none", &[]), leaf("both", &[PeerRole::Attention, PeerRole::Expert])], 1).unwrap();
    let e = ClusterTls::load(p[0].clone()).unwrap_err().to_string();
    assert!(e.contains("names no role"), "{e}");
    let both = ClusterTls::load(p[1].clone()).unwrap();
    assert_eq!(both.roles(), vec![PeerRole::Attention, PeerRole::Expert]);
    let cert = std::fs::read(&p[1].cert).unwrap();
    let der = rustls::pki_types::CertificateDer::from(pem_der(&cert));
    assert_eq!(roles_of(&der), vec![PeerRole::Attention, PeerRole::Expert]);
    // A key that belongs to another certificate.
    let wrong = TlsPaths { key: p[0].key.clone(), ..p[1].clone() };
    let e = ClusterTls::load(wrong).unwrap_err().to_string();
    assert!(e.contains("does not belong"), "{e}");
}

fn pem_der(pem: &[u8]) -> Vec<u8> {
    use rustls::pki_types::pem::PemObject;
    rustls::pki_types::CertificateDer::from_pem_slice(pem).unwrap().to_vec()
}

#[tokio::test]
async fn rotated_files_are_used_by_new_connections() {
    let dir = tempfile::tempdir().unwrap();
    let p = cluster(dir.path(), &[leaf("server", &[PeerRole::Attention]), leaf("client", &[PeerRole::Router])], 1).unwrap();
    let srv = ClusterTls::load(p[0].clone()).unwrap();
    let cli = ClusterTls::load(p[1].clone()).unwrap();
    assert!(!srv.reload().unwrap(), "unchanged files are not reloaded");
    let (port, mut conns) = server(&srv).await;
    dial("127.0.0.1", port, &cli, PeerRole::Attention).await.unwrap();
    assert!(next_conn(&mut conns).await.is_some());

    // The server's certificate is re-issued (same CA) as an expert: new connections see that.
    cluster(dir.path(), &[leaf("server", &[PeerRole::Expert])], 1).unwrap();
    srv.spawn_reload();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while srv.roles() != vec![PeerRole::Expert] {
        assert!(std::time::Instant::now() < deadline, "the rotated certificate was not picked up");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let e = dial("127.0.0.1", port, &cli, PeerRole::Attention).await.unwrap_err();
    assert!(e.to_string().contains("ApplicationVerificationFailure"), "{e}");
    dial("127.0.0.1", port, &cli, PeerRole::Expert).await.unwrap();

    // A half-written file does not load: the last good material stays.
    std::fs::write(&p[0].cert, b"-----BEGIN CERTIFICATE-----\nnot base64").unwrap();
    assert!(srv.reload().is_err());
    assert_eq!(srv.roles(), vec![PeerRole::Expert]);
}
