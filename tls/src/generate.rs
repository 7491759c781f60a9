//! A cluster CA and role certificates, for clusters without cert-manager (`switchyard certs`) and
//! for tests.
//!
//! Layout (Kubernetes' `kubernetes.io/tls` Secret keys, as cert-manager writes them):
//! `<out>/ca.crt`, `<out>/ca.key`, and per certificate `<out>/<name>/{tls.crt,tls.key,ca.crt}`.
//! An existing `ca.crt`/`ca.key` made by this module is reused, so certificates can be added or
//! renewed without replacing the CA the running cluster trusts.

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
    SanType,
};

use crate::{PeerRole, TlsError, TlsPaths};

/// The CA's subject; an existing CA is reused only under this name.
const CA_NAME: &str = "switchyard cluster CA";

/// One certificate to issue.
#[derive(Clone, Debug)]
pub struct Leaf {
    /// The directory under the output and the certificate's common name.
    pub name: String,
    pub roles: Vec<PeerRole>,
    /// DNS names or IP addresses (informational: peers check roles, not names).
    pub hosts: Vec<String>,
}

fn err(e: impl std::fmt::Display) -> TlsError {
    TlsError::Invalid(format!("generating certificates: {e}"))
}

fn write(path: &Path, contents: &str, private: bool) -> Result<(), TlsError> {
    let io = |source| TlsError::Read { path: path.to_path_buf(), source };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(io)?;
    }
    // Write next to the target and rename, so a watcher never reads half a file.
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, contents).map_err(io)?;
    if private {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600)).map_err(io)?;
    }
    std::fs::rename(&tmp, path).map_err(io)
}

fn validity(p: &mut CertificateParams, days: u32) {
    let now = time::OffsetDateTime::now_utc();
    p.not_before = now - time::Duration::hours(1);
    p.not_after = now + time::Duration::days(i64::from(days.max(1)));
}

fn ca_params(days: u32) -> CertificateParams {
    let mut p = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, CA_NAME);
    p.distinguished_name = dn;
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    validity(&mut p, days);
    p
}

/// Writes (or reuses) the CA under `out` and issues `leaves` from it, valid for `days`. Returns each
/// leaf's files.
pub fn cluster(out: &Path, leaves: &[Leaf], days: u32) -> Result<Vec<TlsPaths>, TlsError> {
    let (ca_crt, ca_key) = (out.join("ca.crt"), out.join("ca.key"));
    let (ca_pem, key) = if ca_crt.exists() && ca_key.exists() {
        let key_pem = std::fs::read_to_string(&ca_key).map_err(|source| TlsError::Read { path: ca_key.clone(), source })?;
        let ca_pem = std::fs::read_to_string(&ca_crt).map_err(|source| TlsError::Read { path: ca_crt.clone(), source })?;
        (ca_pem, KeyPair::from_pem(&key_pem).map_err(err)?)
    } else {
        let key = KeyPair::generate().map_err(err)?;
        let cert = ca_params(days.max(3650)).self_signed(&key).map_err(err)?;
        write(&ca_key, &key.serialize_pem(), true)?;
        write(&ca_crt, &cert.pem(), false)?;
        (cert.pem(), key)
    };
    let issuer = Issuer::new(ca_params(days), key);
    let mut out_paths = Vec::new();
    for leaf in leaves {
        let mut p = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, leaf.name.as_str());
        p.distinguished_name = dn;
        for r in &leaf.roles {
            p.subject_alt_names.push(SanType::URI(r.uri().try_into().map_err(err)?));
        }
        for h in &leaf.hosts {
            p.subject_alt_names.push(match h.parse::<std::net::IpAddr>() {
                Ok(ip) => SanType::IpAddress(ip),
                Err(_) => SanType::DnsName(h.as_str().try_into().map_err(err)?),
            });
        }
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        validity(&mut p, days);
        let key = KeyPair::generate().map_err(err)?;
        let cert = p.signed_by(&key, &issuer).map_err(err)?;
        let dir = out.join(&leaf.name);
        let paths = TlsPaths { cert: dir.join("tls.crt"), key: dir.join("tls.key"), ca: dir.join("ca.crt") };
        write(&paths.key, &key.serialize_pem(), true)?;
        write(&paths.cert, &cert.pem(), false)?;
        write(&paths.ca, &ca_pem, false)?;
        out_paths.push(paths);
    }
    Ok(out_paths)
}

/// The default set for a cluster: one certificate per role, named after it, plus `worker` (attention
/// and expert, for `--role both`).
pub fn default_leaves(hosts: &[String]) -> Vec<Leaf> {
    let mut v: Vec<Leaf> =
        PeerRole::ALL.iter().map(|r| Leaf { name: r.name().to_string(), roles: vec![*r], hosts: hosts.to_vec() }).collect();
    v.push(Leaf { name: "worker".into(), roles: vec![PeerRole::Attention, PeerRole::Expert], hosts: hosts.to_vec() });
    v
}

/// The files of the leaf named `name` under `out`.
pub fn paths_of(out: &Path, name: &str) -> TlsPaths {
    let dir: PathBuf = out.join(name);
    TlsPaths { cert: dir.join("tls.crt"), key: dir.join("tls.key"), ca: dir.join("ca.crt") }
}
