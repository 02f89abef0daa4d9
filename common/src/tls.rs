//! rustls client configurations for the dependencies reached over TLS (PostgreSQL here; Redis's client
//! builds its own from the same CA file). No OpenSSL is involved at run time.

use std::path::Path;
use std::sync::Arc;

use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{WebPkiSupportedAlgorithms, verify_tls12_signature, verify_tls13_signature};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};

/// How much of the server's certificate is checked (libpq's `sslmode` levels of verification).
pub enum Verification {
    /// Encryption only: any certificate is accepted (`require` without a root certificate, `prefer`).
    None,
    /// The certificate must chain to one of these roots; its name is not checked (`verify-ca`).
    Chain(RootCertStore),
    /// The certificate must chain to one of these roots and name the host dialled (`verify-full`).
    ChainAndName(RootCertStore),
}

/// Reads a PEM bundle of CA certificates. Fails on a missing or unreadable file, and on one without
/// a single certificate (a key or an empty file given by mistake would otherwise trust nothing).
pub fn load_roots(path: &Path) -> anyhow::Result<RootCertStore> {
    let mut roots = RootCertStore::empty();
    for cert in
        CertificateDer::pem_file_iter(path).map_err(|err| anyhow::anyhow!("cannot read {}: {err}", path.display()))?
    {
        let cert = cert.map_err(|err| anyhow::anyhow!("{} is not a PEM bundle: {err}", path.display()))?;
        roots.add(cert).map_err(|err| anyhow::anyhow!("{} holds an unusable certificate: {err}", path.display()))?;
    }
    anyhow::ensure!(!roots.is_empty(), "{} holds no PEM certificate", path.display());
    Ok(roots)
}

/// A client configuration verifying as `verification` says, on aws-lc-rs (named explicitly, so no
/// process-wide default provider has to be installed).
pub fn client_config(verification: Verification) -> ClientConfig {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .expect("aws-lc-rs supports the default protocol versions");
    let chain = match verification {
        Verification::ChainAndName(roots) => {
            return builder.with_root_certificates(roots).with_no_client_auth();
        }
        Verification::Chain(roots) => Some(
            WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider.clone())
                .build()
                .expect("a non-empty root store builds a verifier"),
        ),
        Verification::None => None,
    };
    let verifier = Arc::new(NameNotChecked { chain, algorithms: provider.signature_verification_algorithms });
    builder.dangerous().with_custom_certificate_verifier(verifier).with_no_client_auth()
}

/// What libpq's `verify-ca` and `require` check: with `chain`, the full WebPKI check except that a
/// certificate for another name is accepted (webpki checks the name only after the chain, so a name
/// error means the chain was good); without, any certificate. The handshake's signatures are checked
/// either way, so the session is at least bound to the key that was presented.
#[derive(Debug)]
struct NameNotChecked {
    chain: Option<Arc<WebPkiServerVerifier>>,
    algorithms: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for NameNotChecked {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let Some(chain) = &self.chain else { return Ok(ServerCertVerified::assertion()) };
        match chain.verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now) {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}
