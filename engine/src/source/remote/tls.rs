//! TLS client settings per endpoint: the bundled web roots, the system's
//! CA bundle, the endpoint's own CA files; or no verification at all where
//! `hosts.toml` says `skip_verify`.

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};

use super::hosts::Endpoint;
use crate::source::SourceError;

const SYSTEM_BUNDLE: &str = "/etc/ssl/certs/ca-certificates.crt";

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The rustls client configuration for `ep`.
pub(super) fn client_config(ep: &Endpoint) -> Result<Arc<ClientConfig>, SourceError> {
    let builder = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| SourceError::fatal(format!("TLS setup: {e}")))?;
    if ep.skip_verify {
        return Ok(Arc::new(
            builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(NoVerify(provider())))
                .with_no_client_auth(),
        ));
    }
    let mut roots = RootCertStore {
        roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
    };
    if let Ok(iter) = CertificateDer::pem_file_iter(SYSTEM_BUNDLE) {
        // The system's bundle is a convenience: bad entries are skipped.
        let certs: Vec<_> = iter.flatten().collect();
        roots.add_parsable_certificates(certs);
    }
    for ca in &ep.ca {
        let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(ca)
            .and_then(|i| i.collect::<Result<_, _>>())
            .map_err(|e| SourceError::fatal(format!("CA file {}: {e}", ca.display())))?;
        if certs.is_empty() {
            return Err(SourceError::fatal(format!(
                "CA file {}: no certificate in it",
                ca.display()
            )));
        }
        for c in certs {
            roots
                .add(c)
                .map_err(|e| SourceError::fatal(format!("CA file {}: {e}", ca.display())))?;
        }
    }
    Ok(Arc::new(
        builder.with_root_certificates(roots).with_no_client_auth(),
    ))
}

/// Accepts any server certificate (signatures are still checked, so the
/// handshake is sound; who the server is, is not).
#[derive(Debug)]
struct NoVerify(Arc<CryptoProvider>);

impl ServerCertVerifier for NoVerify {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}
