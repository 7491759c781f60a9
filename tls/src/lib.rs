//! Cluster identity for Switchyard's internal traffic.
//!
//! Every process of a cluster holds a certificate from one cluster CA. The certificate names what the
//! process is in its subjectAltName, as a URI `spiffe://switchyard/<role>` ([`PeerRole`]), so one
//! check answers both "is this a member of the cluster" (the chain ends at the CA) and "may it do
//! this" (the role): only routers may call `Generate`, only attention workers may open `Dispatch`,
//! and only coordinators may sign a placement plan.
//!
//! - [`ClusterTls`] loads the certificate, key and CA from files and reloads them when they change
//!   (cert-manager rotates the files in place), so new connections use the new material and open
//!   ones finish on the old.
//! - [`transport`] puts it on the wire: a TLS listener for tonic servers that records the peer's
//!   roles per connection, the per-service role check, and a TLS connector for tonic channels that
//!   accepts a server only if the CA signed it and it has the role the caller expects. Peers are
//!   named by role, not by host name: pods are dialled by IP, and the role is what is authorised.
//! - [`seal`] signs and verifies the placement plan with the coordinator's key.
//! - [`generate`] writes a CA and role certificates (`switchyard certs`) for clusters without
//!   cert-manager, and for tests.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, RootCertStore, ServerConfig};

pub mod generate;
pub mod seal;
pub mod transport;
mod verify;

/// The URI prefix of a role in a certificate's subjectAltName.
pub const ROLE_URI_PREFIX: &str = "spiffe://switchyard/";

/// How often the certificate files are checked for changes.
pub const RELOAD_POLL: Duration = Duration::from_secs(2);

/// What a cluster process is, as its certificate says.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum PeerRole {
    /// The OpenAI front end: calls `Generate` and `Health` on attention workers.
    Router,
    /// Runs the engine: serves `Generate`, opens `Dispatch` streams to expert workers.
    Attention,
    /// Holds expert slices: serves `Dispatch`.
    Expert,
    /// Places experts: signs the plan.
    Coordinator,
}

impl PeerRole {
    pub const ALL: [PeerRole; 4] = [PeerRole::Router, PeerRole::Attention, PeerRole::Expert, PeerRole::Coordinator];

    pub fn name(self) -> &'static str {
        match self {
            PeerRole::Router => "router",
            PeerRole::Attention => "attention",
            PeerRole::Expert => "expert",
            PeerRole::Coordinator => "coordinator",
        }
    }

    /// The subjectAltName URI that grants this role.
    pub fn uri(self) -> String {
        format!("{ROLE_URI_PREFIX}{}", self.name())
    }

    pub fn parse(name: &str) -> Option<PeerRole> {
        PeerRole::ALL.into_iter().find(|r| r.name() == name)
    }
}

impl fmt::Display for PeerRole {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The roles a certificate grants (its `spiffe://switchyard/<role>` URIs); empty when it names none
/// or cannot be parsed.
pub fn roles_of(cert: &CertificateDer<'_>) -> Vec<PeerRole> {
    use x509_cert::der::Decode;
    use x509_cert::ext::pkix::SubjectAltName;
    use x509_cert::ext::pkix::name::GeneralName;
    let Ok(c) = x509_cert::Certificate::from_der(cert.as_ref()) else { return Vec::new() };
    let Ok(Some((_, san))) = c.tbs_certificate().get_extension::<SubjectAltName>() else { return Vec::new() };
    let mut roles: Vec<PeerRole> = san
        .0
        .iter()
        .filter_map(|n| match n {
            GeneralName::UniformResourceIdentifier(u) => u.as_str().strip_prefix(ROLE_URI_PREFIX).and_then(PeerRole::parse),
            _ => None,
        })
        .collect();
    roles.sort();
    roles.dedup();
    roles
}

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("reading {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{path}: {reason}")]
    Pem { path: PathBuf, reason: String },
    #[error("{0}")]
    Invalid(String),
    #[error("TLS: {0}")]
    Rustls(#[from] rustls::Error),
}

/// Where a process's certificate, key and cluster CA live (PEM files).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsPaths {
    /// The process's certificate, optionally followed by intermediates.
    pub cert: PathBuf,
    pub key: PathBuf,
    /// The cluster CA (one or more certificates) that every peer's chain must end at.
    pub ca: PathBuf,
}

/// One loaded set of files and the TLS configurations built from it.
pub(crate) struct Loaded {
    /// The files it was built from, to notice a change.
    files: Files,
    pub(crate) roles: Vec<PeerRole>,
    pub(crate) chain: Vec<CertificateDer<'static>>,
    pub(crate) key: Arc<CertifiedKey>,
    pub(crate) roots: Arc<RootCertStore>,
    pub(crate) server: Arc<ServerConfig>,
    /// A client configuration per role the server must have.
    clients: Vec<(PeerRole, Arc<ClientConfig>)>,
    /// When the certificate expires (seconds since the epoch), for the log.
    not_after: Option<u64>,
}

/// The process's cluster identity: reloaded from its files when they change.
pub struct ClusterTls {
    paths: TlsPaths,
    provider: Arc<CryptoProvider>,
    current: RwLock<Arc<Loaded>>,
}

impl fmt::Debug for ClusterTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClusterTls").field("paths", &self.paths).field("roles", &self.roles()).finish()
    }
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read { path: path.to_path_buf(), source })
}

fn certs(path: &Path, bytes: &[u8]) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = |reason: String| TlsError::Pem { path: path.to_path_buf(), reason };
    let certs: Vec<CertificateDer<'static>> =
        CertificateDer::pem_slice_iter(bytes).collect::<Result<_, _>>().map_err(|e| pem(format!("not PEM certificates: {e}")))?;
    if certs.is_empty() {
        return Err(pem("holds no certificate".into()));
    }
    Ok(certs)
}

impl ClusterTls {
    /// Loads the files; fails when they do not parse, when the certificate does not chain to the CA
    /// or names no role, or when the key does not match the certificate.
    pub fn load(paths: TlsPaths) -> Result<Arc<ClusterTls>, TlsError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let loaded = build(&paths, Files::read(&paths)?, &provider)?;
        Ok(Arc::new(ClusterTls { paths, provider, current: RwLock::new(Arc::new(loaded)) }))
    }

    pub(crate) fn current(&self) -> Arc<Loaded> {
        self.current.read().unwrap().clone()
    }

    pub(crate) fn provider(&self) -> &Arc<CryptoProvider> {
        &self.provider
    }

    pub fn paths(&self) -> &TlsPaths {
        &self.paths
    }

    /// The roles this process's certificate grants.
    pub fn roles(&self) -> Vec<PeerRole> {
        self.current().roles.clone()
    }

    /// A short description for the start-up log.
    pub fn describe(&self) -> String {
        let l = self.current();
        let roles: Vec<&str> = l.roles.iter().map(|r| r.name()).collect();
        let expiry = l.not_after.map(|t| format!(", expires in {}h", t.saturating_sub(now_secs()) / 3600)).unwrap_or_default();
        format!("mTLS with {} (roles: {}{expiry}), CA {}", self.paths.cert.display(), roles.join(", "), self.paths.ca.display())
    }

    pub(crate) fn server_config(&self) -> Arc<ServerConfig> {
        self.current().server.clone()
    }

    pub(crate) fn client_config(&self, expect: PeerRole) -> Arc<ClientConfig> {
        let l = self.current();
        l.clients.iter().find(|(r, _)| *r == expect).map(|(_, c)| c.clone()).expect("a client configuration per role")
    }

    /// Re-reads the files; swaps in the new material when they changed and it is valid. Returns
    /// whether it changed.
    pub fn reload(&self) -> Result<bool, TlsError> {
        let files = Files::read(&self.paths)?;
        if files == self.current().files {
            return Ok(false);
        }
        let loaded = build(&self.paths, files, &self.provider)?;
        *self.current.write().unwrap() = Arc::new(loaded);
        Ok(true)
    }

    /// Watches the files every [`RELOAD_POLL`] for as long as the process runs (a tokio task). A
    /// change that does not load (half-written files, a key that does not match) keeps the old
    /// material and is logged once.
    pub fn spawn_reload(self: &Arc<Self>) {
        let me = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut last_error = String::new();
            loop {
                tokio::time::sleep(RELOAD_POLL).await;
                let Some(tls) = me.upgrade() else { return };
                match tls.reload() {
                    Ok(true) => {
                        last_error.clear();
                        metrics::counter!("switchyard_tls_reloads_total").increment(1);
                        tracing::info!("switchyard: reloaded the cluster certificate: {}", tls.describe());
                    }
                    Ok(false) => {}
                    Err(e) => {
                        let e = e.to_string();
                        if e != last_error {
                            tracing::warn!("switchyard: the changed cluster certificate does not load; keeping the old one: {e}");
                            last_error = e;
                        }
                    }
                }
            }
        });
    }
}

fn now_secs() -> u64 {
    UnixTime::now().as_secs()
}

/// The three files' contents: read once per check, compared to notice a change, then parsed.
#[derive(PartialEq, Eq)]
pub(crate) struct Files {
    cert: Vec<u8>,
    key: Vec<u8>,
    ca: Vec<u8>,
}

impl Files {
    fn read(paths: &TlsPaths) -> Result<Files, TlsError> {
        Ok(Files { cert: read(&paths.cert)?, key: read(&paths.key)?, ca: read(&paths.ca)? })
    }
}

fn build(paths: &TlsPaths, files: Files, provider: &Arc<CryptoProvider>) -> Result<Loaded, TlsError> {
    let chain = certs(&paths.cert, &files.cert)?;
    let cas = certs(&paths.ca, &files.ca)?;
    let key = PrivateKeyDer::from_pem_slice(&files.key)
        .map_err(|e| TlsError::Pem { path: paths.key.clone(), reason: format!("not a PEM private key: {e}") })?;
    let mut roots = RootCertStore::empty();
    for ca in &cas {
        roots.add(ca.clone()).map_err(|e| TlsError::Pem { path: paths.ca.clone(), reason: format!("not a CA certificate: {e}") })?;
    }
    let roots = Arc::new(roots);
    let roles = roles_of(&chain[0]);
    if roles.is_empty() {
        return Err(TlsError::Invalid(format!(
            "{} names no role: it needs a subjectAltName URI {ROLE_URI_PREFIX}<router|attention|expert|coordinator>",
            paths.cert.display()
        )));
    }
    verify::chain_to_roots(provider, &roots, &chain, verify::Usage::Either).map_err(|e| {
        TlsError::Invalid(format!("{} is not a certificate the CA in {} signed: {e}", paths.cert.display(), paths.ca.display()))
    })?;
    let signing = provider
        .key_provider
        .load_private_key(key.clone_key())
        .map_err(|e| TlsError::Pem { path: paths.key.clone(), reason: format!("unsupported private key: {e}") })?;
    let certified = Arc::new(CertifiedKey::new(chain.clone(), signing));
    certified
        .keys_match()
        .map_err(|e| TlsError::Invalid(format!("the key in {} does not belong to {}: {e}", paths.key.display(), paths.cert.display())))?;

    let h2 = || vec![b"h2".to_vec()];
    let client_verifier = WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone())
        .build()
        .map_err(|e| TlsError::Invalid(format!("the CA in {}: {e}", paths.ca.display())))?;
    let mut server = ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(client_verifier)
        .with_cert_resolver(Arc::new(rustls::sign::SingleCertAndKey::from(certified.clone())));
    server.alpn_protocols = h2();
    let mut clients = Vec::new();
    for role in PeerRole::ALL {
        let verifier = Arc::new(verify::RoleServerVerifier { roots: roots.clone(), provider: provider.clone(), role });
        let mut c = ClientConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_client_cert_resolver(Arc::new(rustls::sign::SingleCertAndKey::from(certified.clone())));
        c.alpn_protocols = h2();
        clients.push((role, Arc::new(c)));
    }
    let not_after = not_after(&chain[0]);
    Ok(Loaded { files, roles, chain, key: certified, roots, server: Arc::new(server), clients, not_after })
}

fn not_after(cert: &CertificateDer<'_>) -> Option<u64> {
    use x509_cert::der::Decode;
    let c = x509_cert::Certificate::from_der(cert.as_ref()).ok()?;
    Some(c.tbs_certificate().validity().not_after.to_unix_duration().as_secs())
}
