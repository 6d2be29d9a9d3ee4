//! HTTPS in front of the fake provider, for the mutual TLS tests (RFC 8705): a private CA
//! made in the test (rcgen on aws-lc), the certificates it issues (or self-signed ones),
//! and a TLS server on 127.0.0.1 that asks for a client certificate and hands the one it
//! got to the provider's router as a `PeerCertificate` request extension.

use std::net::SocketAddr;
use std::sync::Arc;

use hyper_util::rt::TokioIo;
use hyper_util::service::TowerToHyperService;
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};
use rustls::client::danger::HandshakeSignatureValid;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{DigitallySignedStruct, DistinguishedName, RootCertStore, ServerConfig};
use tokend::demo::fake_provider::{FakeProvider, PeerCertificate};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

/// A certificate and its key, as PEM and as the DER the provider registers.
pub struct Issued {
    pub cert_pem: String,
    pub key_pem: String,
    pub der: Vec<u8>,
}

/// A private CA (the bank's PKI).
pub struct Pki {
    ca: CertifiedIssuer<'static, KeyPair>,
}

impl Pki {
    pub fn new(name: &str) -> Pki {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let ca = CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap();
        Pki { ca }
    }

    pub fn ca_pem(&self) -> String {
        self.ca.pem()
    }

    fn ca_der(&self) -> CertificateDer<'static> {
        self.ca.der().clone()
    }

    /// The provider's server certificate, for `localhost` and 127.0.0.1.
    pub fn server(&self) -> Issued {
        let names = vec!["localhost".to_string(), "127.0.0.1".to_string()];
        self.issue(names, "provider", ExtendedKeyUsagePurpose::ServerAuth)
    }

    /// A client certificate with common name `cn`.
    pub fn client(&self, cn: &str) -> Issued {
        self.issue(Vec::new(), cn, ExtendedKeyUsagePurpose::ClientAuth)
    }

    fn issue(&self, names: Vec<String>, cn: &str, usage: ExtendedKeyUsagePurpose) -> Issued {
        let mut params = CertificateParams::new(names).unwrap();
        params.distinguished_name.push(DnType::CommonName, cn);
        params.extended_key_usages = vec![usage];
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.ca).unwrap();
        Issued {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            der: cert.der().to_vec(),
        }
    }
}

/// A self-signed client certificate (`self_signed_tls_client_auth`), common name `cn`.
pub fn self_signed(cn: &str) -> Issued {
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.distinguished_name.push(DnType::CommonName, cn);
    let key = KeyPair::generate().unwrap();
    let cert = params.self_signed(&key).unwrap();
    Issued {
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
        der: cert.der().to_vec(),
    }
}

/// Which client certificates the TLS server takes.
pub enum ClientCerts<'a> {
    /// Chains to the CA are verified; a handshake without one still completes, so the
    /// provider can answer `invalid_client` itself.
    FromCa(&'a Pki),
    /// Like `FromCa`, but a handshake without a certificate fails. TLS 1.2 only: there
    /// the refusal ends the client's handshake, whereas in TLS 1.3 the server's alert
    /// comes after the client has finished and races its first request (which then may
    /// fail as a closed connection instead), so the test would not be deterministic.
    RequiredFromCa(&'a Pki),
    /// Any certificate whose key signs the handshake (self-signed mode): the provider
    /// compares it with the registered one.
    Any,
}

fn crypto() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// Serves `fake` over HTTPS on 127.0.0.1 with `server`'s certificate until the token is
/// cancelled; returns its address.
pub async fn serve_fake_tls(
    fake: &FakeProvider,
    server: &Issued,
    clients: ClientCerts<'_>,
) -> (SocketAddr, CancellationToken) {
    let verifier: Arc<dyn ClientCertVerifier> = match clients {
        ClientCerts::FromCa(pki) | ClientCerts::RequiredFromCa(pki) => {
            let mut roots = RootCertStore::empty();
            roots.add(pki.ca_der()).unwrap();
            let builder = WebPkiClientVerifier::builder_with_provider(roots.into(), crypto());
            match clients {
                ClientCerts::FromCa(_) => builder.allow_unauthenticated().build().unwrap(),
                _ => builder.build().unwrap(),
            }
        }
        ClientCerts::Any => Arc::new(AnyClientCertificate(crypto())),
    };
    let versions: &[&rustls::SupportedProtocolVersion] = match clients {
        ClientCerts::RequiredFromCa(_) => &[&rustls::version::TLS12],
        _ => rustls::DEFAULT_VERSIONS,
    };
    let key = PrivateKeyDer::from_pem_slice(server.key_pem.as_bytes()).unwrap();
    let config = ServerConfig::builder_with_provider(crypto())
        .with_protocol_versions(versions)
        .unwrap()
        .with_client_cert_verifier(verifier)
        .with_single_cert(vec![CertificateDer::from(server.der.clone())], key)
        .unwrap();
    let acceptor = TlsAcceptor::from(Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let stop = CancellationToken::new();
    let (fake, until) = (fake.clone(), stop.clone());
    tokio::spawn(async move {
        loop {
            let tcp = tokio::select! {
                () = until.cancelled() => return,
                accepted = listener.accept() => match accepted {
                    Ok((tcp, _)) => tcp,
                    Err(_) => continue,
                },
            };
            let (acceptor, fake) = (acceptor.clone(), fake.clone());
            tokio::spawn(async move {
                // A refused handshake is the client's to report.
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let peer = tls.get_ref().1.peer_certificates().and_then(|c| c.first());
                let mut router = fake.router();
                if let Some(cert) = peer {
                    router = router.layer(axum::Extension(PeerCertificate(cert.to_vec())));
                }
                let service = TowerToHyperService::new(router);
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tls), service)
                    .await;
            });
        }
    });
    (addr, stop)
}

/// Takes any client certificate, but still checks that the client holds its key (the
/// handshake signature): the self-signed mode, where the registered certificate itself is
/// the trust anchor.
#[derive(Debug)]
struct AnyClientCertificate(Arc<CryptoProvider>);

impl ClientCertVerifier for AnyClientCertificate {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        let algs = &self.0.signature_verification_algorithms;
        rustls::crypto::verify_tls12_signature(message, cert, dss, algs)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        let algs = &self.0.signature_verification_algorithms;
        rustls::crypto::verify_tls13_signature(message, cert, dss, algs)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }

    fn client_auth_mandatory(&self) -> bool {
        false
    }
}
