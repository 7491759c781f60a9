//! Signatures by cluster identity: the coordinator signs the placement plan with the key of its
//! certificate, and every reader accepts a plan only if a certificate the cluster CA signed, granting
//! the coordinator role, signed exactly those bytes for this cluster.
//!
//! The signature travels with its signer's chain, so a reader needs nothing but the CA: a coordinator
//! whose certificate was rotated keeps being trusted, and a worker (whose certificate grants no
//! coordinator role) or anyone else with write access to etcd cannot produce a plan that is followed.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use rustls::SignatureScheme;
use rustls::pki_types::CertificateDer;
use serde::{Deserialize, Serialize};

use crate::verify::{Usage, chain_to_roots};
use crate::{ClusterTls, PeerRole, TlsError, roles_of};

/// The schemes a signer may use, in order of preference (ECDSA P-256 is what cert-manager and
/// `switchyard certs` issue by default).
const SCHEMES: [SignatureScheme; 5] = [
    SignatureScheme::ECDSA_NISTP256_SHA256,
    SignatureScheme::ED25519,
    SignatureScheme::ECDSA_NISTP384_SHA384,
    SignatureScheme::RSA_PSS_SHA256,
    SignatureScheme::RSA_PKCS1_SHA256,
];

/// A detached signature with the signer's certificate chain (base64 DER in JSON).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Signature {
    /// The TLS SignatureScheme code point.
    pub scheme: u16,
    pub value: String,
    pub chain: Vec<String>,
}

/// What is signed: a fixed label, the context (e.g. the cluster and record name, so a signature for
/// one cluster or key cannot be replayed as another), then the message.
fn to_be_signed(context: &str, msg: &[u8]) -> Vec<u8> {
    let mut v = b"switchyard signature v1\0".to_vec();
    v.extend_from_slice(context.as_bytes());
    v.push(0);
    v.extend_from_slice(msg);
    v
}

impl ClusterTls {
    /// Signs `msg` under `context` with this process's key.
    pub fn sign(&self, context: &str, msg: &[u8]) -> Result<Signature, TlsError> {
        let l = self.current();
        let signer = l
            .key
            .key
            .choose_scheme(&SCHEMES)
            .ok_or_else(|| TlsError::Invalid("the private key cannot make any supported signature".into()))?;
        let value = signer.sign(&to_be_signed(context, msg))?;
        Ok(Signature {
            scheme: u16::from(signer.scheme()),
            value: B64.encode(value),
            chain: l.chain.iter().map(|c| B64.encode(c.as_ref())).collect(),
        })
    }

    /// Checks that `sig` is a signature of `msg` under `context` by a certificate the cluster CA
    /// signed that grants `role`.
    pub fn verify(&self, context: &str, msg: &[u8], sig: &Signature, role: PeerRole) -> Result<(), TlsError> {
        let bad = |why: String| TlsError::Invalid(why);
        let chain: Vec<CertificateDer<'static>> = sig
            .chain
            .iter()
            .map(|c| B64.decode(c).map(CertificateDer::from))
            .collect::<Result<_, _>>()
            .map_err(|e| bad(format!("the signer's chain is not base64: {e}")))?;
        if chain.is_empty() {
            return Err(bad("the signature carries no certificate".into()));
        }
        let l = self.current();
        chain_to_roots(self.provider(), &l.roots, &chain, Usage::Either)
            .map_err(|e| bad(format!("the signer's certificate is not one the cluster CA signed: {e}")))?;
        let roles = roles_of(&chain[0]);
        if !roles.contains(&role) {
            let have: Vec<&str> = roles.iter().map(|r| r.name()).collect();
            return Err(bad(format!("signed by a certificate without the role {role} (it grants [{}])", have.join(", "))));
        }
        let value = B64.decode(&sig.value).map_err(|e| bad(format!("the signature is not base64: {e}")))?;
        let scheme = SignatureScheme::from(sig.scheme);
        let algs = self
            .provider()
            .signature_verification_algorithms
            .mapping
            .iter()
            .find(|(s, _)| *s == scheme)
            .map(|(_, a)| *a)
            .ok_or_else(|| bad(format!("unsupported signature scheme {scheme:?}")))?;
        let ee = webpki::EndEntityCert::try_from(&chain[0]).map_err(|e| bad(format!("the signer's certificate: {e}")))?;
        let msg = to_be_signed(context, msg);
        if algs.iter().any(|a| ee.verify_signature(*a, &msg, &value).is_ok()) {
            Ok(())
        } else {
            Err(bad("the signature does not match the signed bytes".into()))
        }
    }
}
