//! Certificate checks against the cluster CA: the chain (webpki) and the role.

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{CertificateError, DigitallySignedStruct, Error, RootCertStore, SignatureScheme};

use crate::{PeerRole, roles_of};

#[derive(Clone, Copy)]
pub(crate) enum Usage {
    Server,
    /// Either extended key usage (a certificate used both ways, or to sign a plan).
    Either,
}

/// Checks that `chain[0]` chains to one of `roots` through `chain[1..]`, valid now.
pub(crate) fn chain_to_roots(
    provider: &CryptoProvider,
    roots: &RootCertStore,
    chain: &[CertificateDer<'_>],
    usage: Usage,
) -> Result<(), webpki::Error> {
    let ee = webpki::EndEntityCert::try_from(&chain[0])?;
    let algs = provider.signature_verification_algorithms.all;
    let now = UnixTime::now();
    let check = |u: webpki::KeyUsage| ee.verify_for_usage(algs, &roots.roots, &chain[1..], now, u, None, None).map(|_| ());
    match usage {
        Usage::Server => check(webpki::KeyUsage::server_auth()),
        Usage::Either => check(webpki::KeyUsage::client_auth()).or_else(|_| check(webpki::KeyUsage::server_auth())),
    }
}

pub(crate) fn to_rustls(e: webpki::Error) -> Error {
    use webpki::Error as W;
    Error::InvalidCertificate(match e {
        W::UnknownIssuer => CertificateError::UnknownIssuer,
        W::CertExpired { .. } => CertificateError::Expired,
        W::CertNotValidYet { .. } => CertificateError::NotValidYet,
        W::InvalidSignatureForPublicKey => CertificateError::BadSignature,
        W::CertRevoked => CertificateError::Revoked,
        other => CertificateError::Other(rustls::OtherError(Arc::new(other))),
    })
}

/// The client side's check of a server: signed by the cluster CA, and granting the role the caller
/// dialled it for. The host name is not checked: cluster peers are dialled by pod IP, and what is
/// authorised is the role.
#[derive(Debug)]
pub(crate) struct RoleServerVerifier {
    pub roots: Arc<RootCertStore>,
    pub provider: Arc<CryptoProvider>,
    pub role: PeerRole,
}

impl ServerCertVerifier for RoleServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, Error> {
        let mut chain = vec![end_entity.clone()];
        chain.extend(intermediates.iter().cloned());
        chain_to_roots(&self.provider, &self.roots, &chain, Usage::Server).map_err(to_rustls)?;
        let roles = roles_of(end_entity);
        if !roles.contains(&self.role) {
            return Err(Error::InvalidCertificate(CertificateError::ApplicationVerificationFailure));
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}
