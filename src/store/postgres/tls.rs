//! The URL's `sslmode` as libpq means it, carried out with rustls: `state.ca_file` is the
//! only trust anchor (tokend reads no platform trust store), so a verified mode needs it.

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::{ClientConfig, WebPkiServerVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{CertificateError, DigitallySignedStruct, Error, RootCertStore, SignatureScheme};

use crate::config::CaBundle;

/// libpq's `sslmode` values (`allow` is read as `prefer`: it never refuses TLS either).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum SslMode {
    Disable,
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

impl SslMode {
    pub(super) fn parse(value: &str) -> Result<SslMode, String> {
        Ok(match value {
            "disable" => SslMode::Disable,
            "allow" | "prefer" => SslMode::Prefer,
            "require" => SslMode::Require,
            "verify-ca" => SslMode::VerifyCa,
            "verify-full" => SslMode::VerifyFull,
            other => {
                return Err(format!(
                    "sslmode={other:?} is not one of disable, prefer, require, verify-ca, verify-full"
                ));
            }
        })
    }

    pub(super) fn name(self) -> &'static str {
        match self {
            SslMode::Disable => "disable",
            SslMode::Prefer => "prefer",
            SslMode::Require => "require",
            SslMode::VerifyCa => "verify-ca",
            SslMode::VerifyFull => "verify-full",
        }
    }

    /// What tokio-postgres itself knows: whether TLS is refused, tried or required.
    pub(super) fn negotiation(self) -> tokio_postgres::config::SslMode {
        use tokio_postgres::config::SslMode as Pg;
        match self {
            SslMode::Disable => Pg::Disable,
            SslMode::Prefer => Pg::Prefer,
            SslMode::Require | SslMode::VerifyCa | SslMode::VerifyFull => Pg::Require,
        }
    }
}

/// The TLS client for `mode`, and a description of what it checks (for `tokend check`).
/// As in libpq, a configured CA makes `prefer` and `require` verify the chain as well;
/// only `verify-full` also checks the host name.
pub(super) fn client_config(
    mode: SslMode,
    ca: Option<&CaBundle>,
) -> Result<(ClientConfig, String), String> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let builder = ClientConfig::builder_with_provider(Arc::clone(&provider))
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("cannot set up TLS: {e}"))?;
    let (builder, checks) = match (mode, ca) {
        (SslMode::VerifyCa | SslMode::VerifyFull, None) => {
            return Err(format!(
                "sslmode={} needs state.ca_file (the PEM bundle of the CA that signed the server's certificate): tokend reads no platform trust store for PostgreSQL",
                mode.name()
            ));
        }
        (SslMode::Disable, _) => (
            builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(Unverified(provider))),
            "TLS off (sslmode=disable)".to_string(),
        ),
        (_, Some(ca)) => {
            let verifier = webpki_verifier(ca, provider)?;
            if mode == SslMode::VerifyFull {
                let checks = format!(
                    "TLS required, certificate and host name verified against {}",
                    ca.path.display()
                );
                (builder.with_webpki_verifier(verifier), checks)
            } else {
                let checks = format!(
                    "TLS {}, certificate verified against {} (host name not checked: sslmode={})",
                    if mode == SslMode::Prefer {
                        "if the server offers it"
                    } else {
                        "required"
                    },
                    ca.path.display(),
                    mode.name()
                );
                let verifier = Arc::new(AnyName(verifier));
                (
                    builder
                        .dangerous()
                        .with_custom_certificate_verifier(verifier),
                    checks,
                )
            }
        }
        (_, None) => (
            builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(Unverified(provider))),
            format!(
                "TLS {}, certificate NOT verified (sslmode={} without state.ca_file)",
                if mode == SslMode::Prefer {
                    "if the server offers it"
                } else {
                    "required"
                },
                mode.name()
            ),
        ),
    };
    Ok((builder.with_no_client_auth(), checks))
}

fn webpki_verifier(
    ca: &CaBundle,
    provider: Arc<CryptoProvider>,
) -> Result<Arc<WebPkiServerVerifier>, String> {
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(&ca.pem) {
        let cert = cert.map_err(|e| format!("cannot read {}: {e}", ca.path.display()))?;
        roots
            .add(cert)
            .map_err(|e| format!("cannot use a certificate of {}: {e}", ca.path.display()))?;
    }
    WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider)
        .build()
        .map_err(|e| format!("cannot use {} as a trust anchor: {e}", ca.path.display()))
}

/// `sslmode=verify-ca`: the chain must lead to the CA; the name in it is not compared.
#[derive(Debug)]
struct AnyName(Arc<WebPkiServerVerifier>);

impl ServerCertVerifier for AnyName {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, Error> {
        match self
            .0
            .verify_server_cert(end_entity, intermediates, server_name, ocsp, now)
        {
            Err(Error::InvalidCertificate(
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
    ) -> Result<HandshakeSignatureValid, Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

/// `sslmode=prefer`/`require` without a CA: encrypted, the peer not authenticated, as in
/// libpq. The handshake's signatures are still checked, against the certificate offered.
#[derive(Debug)]
struct Unverified(Arc<CryptoProvider>);

impl Unverified {
    fn algorithms(&self) -> &WebPkiSupportedAlgorithms {
        &self.0.signature_verification_algorithms
    }
}

impl ServerCertVerifier for Unverified {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, self.algorithms())
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, self.algorithms())
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms().supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verified_modes_need_a_ca_file_and_say_so() {
        for mode in ["verify-ca", "verify-full"] {
            let err = client_config(SslMode::parse(mode).unwrap(), None).unwrap_err();
            assert!(err.contains("state.ca_file"), "{err}");
            assert!(err.contains(mode), "{err}");
        }
        let (_, checks) = client_config(SslMode::Require, None).unwrap();
        assert!(checks.contains("NOT verified"), "{checks}");
        assert!(SslMode::parse("verify_full").is_err());
    }
}
