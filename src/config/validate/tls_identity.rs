//! An account's TLS client identity (RFC 8705): `client_certificate` (a PEM chain, a
//! path) and `client_key` (a secret), checked when the config loads — the chain parses,
//! the key parses and is not encrypted, and the key belongs to the leaf certificate — so a
//! wrong pair is a config error, not a handshake failure at the first refresh. Messages
//! name the file and the key, never the key's text.

use std::ops::Range;
use std::path::Path;
use std::sync::Arc;
use std::time::SystemTime;

use base64::Engine as _;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use sha2::{Digest, Sha256};
use x509_cert::der::{Decode, Encode};
use zeroize::Zeroizing;

use super::Validator;
use crate::config::raw::RawAccount;
use crate::config::{ClientAuth, TlsIdentity};
use crate::secret::Secret;

/// Which of the two keys a problem is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Part {
    Certificate,
    Key,
}

impl Part {
    fn key(self) -> &'static str {
        match self {
            Part::Certificate => "client_certificate",
            Part::Key => "client_key",
        }
    }
}

impl Validator<'_> {
    /// The account's TLS identity, if it has one; `client_auth = "tls_client_auth"` (or
    /// the self-signed variant) requires one.
    pub(super) fn tls_identity(
        &mut self,
        raw: &RawAccount,
        auth: ClientAuth,
        account_span: &Range<usize>,
        k: &dyn Fn(&str) -> String,
    ) -> Option<Arc<TlsIdentity>> {
        let (cert, key) = match (&raw.client_certificate, &raw.client_key) {
            (Some(cert), Some(key)) => (cert, key),
            (None, None) => {
                if auth.is_mutual_tls() {
                    self.report(
                        account_span.clone(),
                        k("client_certificate"),
                        format!(
                            "client_auth = \"{}\" needs client_certificate and client_key = {{ file = \"…\" }} (RFC 8705 §2)",
                            auth.as_str()
                        ),
                    );
                }
                return None;
            }
            (Some(cert), None) => {
                let msg = "needs client_key too (the certificate's private key)";
                self.report(cert.span(), k("client_certificate"), msg);
                return None;
            }
            (None, Some(key)) => {
                let msg = "needs client_certificate too (the key's certificate chain)";
                self.report(key.span(), k("client_key"), msg);
                return None;
            }
        };
        let path = self.base_dir.join(cert.get_ref());
        let text = match self.env.read_file(&path) {
            Ok(text) => text,
            Err(e) => {
                let msg = format!("cannot read {}: {e}", path.display());
                self.report(cert.span(), k("client_certificate"), msg);
                return None;
            }
        };
        let pem = self.secret(key, &k("client_key"))?;
        match parse_identity(&path, &text, &pem) {
            Ok(identity) => Some(Arc::new(identity)),
            Err((part, msg)) => {
                let span = match part {
                    Part::Certificate => cert.span(),
                    Part::Key => key.span(),
                };
                self.report(span, k(part.key()), msg);
                None
            }
        }
    }

    /// With `tls_client_auth`, the certificate is the credential: a secret or an
    /// assertion configured beside it would be a second, unused one.
    pub(super) fn refuse_secret_with_mutual_tls(
        &mut self,
        raw: &RawAccount,
        auth: ClientAuth,
        k: &dyn Fn(&str) -> String,
    ) {
        if let (true, Some(secret)) = (auth.is_mutual_tls(), &raw.client_secret) {
            self.report(
                secret.span(),
                k("client_secret"),
                format!(
                    "client_auth = \"{}\" sends no secret: the client certificate is the credential (RFC 8705 §2)",
                    auth.as_str()
                ),
            );
        }
    }
}

/// Parses a certificate chain (`path`'s text) and its key, and checks that they belong
/// together. The error says which of the two is wrong, and why, without quoting either.
fn parse_identity(
    path: &Path,
    cert_text: &str,
    key: &Secret,
) -> Result<TlsIdentity, (Part, String)> {
    let shown = path.display();
    let cert_err = |msg: String| (Part::Certificate, msg);
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(cert_text.as_bytes())
        .collect::<Result<_, _>>()
        .map_err(|_| cert_err(format!("{shown} is not valid PEM")))?;
    let Some(leaf_der) = chain.first() else {
        return Err(cert_err(format!(
            "{shown} holds no PEM certificate (a CERTIFICATE block)"
        )));
    };
    let leaf = x509_cert::Certificate::from_der(leaf_der).map_err(|_| {
        cert_err(format!(
            "the first certificate in {shown} is not a valid X.509 certificate"
        ))
    })?;
    let tbs = &leaf.tbs_certificate;
    let key_der = private_key(key).map_err(|msg| (Part::Key, msg))?;
    let signer = rustls::crypto::aws_lc_rs::sign::any_supported_type(&key_der).map_err(|_| {
        (
            Part::Key,
            "is not a key TLS can use (RSA, ECDSA P-256 or P-384, Ed25519)".to_string(),
        )
    })?;
    let cert_spki = tbs.subject_public_key_info.to_der().ok();
    let key_spki = signer.public_key();
    if cert_spki.is_none() || cert_spki.as_deref() != key_spki.as_deref() {
        return Err((
            Part::Key,
            format!(
                "does not belong to the certificate in {shown}: their public keys differ (the key of another certificate?)"
            ),
        ));
    }
    let not_after = SystemTime::UNIX_EPOCH + tbs.validity.not_after.to_unix_duration();
    Ok(TlsIdentity {
        certificate_path: path.to_path_buf(),
        subject: tbs.subject.to_string(),
        not_after,
        fingerprint: hex(&Sha256::digest(leaf_der)),
        pem: identity_pem(&chain, &key_der),
        chain: chain.iter().map(|c| c.to_vec()).collect(),
    })
}

/// The private key in `pem`: PKCS#8, PKCS#1 or SEC1, unencrypted.
fn private_key(pem: &Secret) -> Result<PrivateKeyDer<'static>, String> {
    let text = pem.expose();
    if text.contains("ENCRYPTED PRIVATE KEY") || text.contains("Proc-Type: 4,ENCRYPTED") {
        return Err("the private key is protected by a passphrase, which tokend cannot enter: store it decrypted (`openssl pkey -in KEY -out PLAIN`) in a file only tokend can read".into());
    }
    PrivateKeyDer::from_pem_slice(text.as_bytes()).map_err(|_| {
        "holds no PEM private key (a PRIVATE KEY, RSA PRIVATE KEY or EC PRIVATE KEY block)".into()
    })
}

/// The chain and the key as the one PEM text the TLS client reads, rebuilt from what was
/// parsed (so stray blocks, such as `EC PARAMETERS`, never reach it).
fn identity_pem(chain: &[CertificateDer<'_>], key: &PrivateKeyDer<'_>) -> Secret {
    let mut out = Zeroizing::new(String::new());
    for cert in chain {
        push_pem(&mut out, "CERTIFICATE", cert);
    }
    let label = match key {
        PrivateKeyDer::Pkcs1(_) => "RSA PRIVATE KEY",
        PrivateKeyDer::Sec1(_) => "EC PRIVATE KEY",
        _ => "PRIVATE KEY",
    };
    push_pem(&mut out, label, key.secret_der());
    Secret::new(out.as_str())
}

fn push_pem(out: &mut String, label: &str, der: &[u8]) {
    let b64 = Zeroizing::new(base64::engine::general_purpose::STANDARD.encode(der));
    out.push_str(&format!("-----BEGIN {label}-----\n"));
    for line in b64.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(line).unwrap_or_default());
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use std::path::{Path, PathBuf};

    use proptest::prelude::*;

    use super::{Part, parse_identity};
    use crate::config::test_env::env;
    use crate::config::{ClientAuth, Config, ConfigError, SystemEnvironment};
    use crate::secret::Secret;

    /// A self-signed certificate (PEM) and its key (PKCS#8 PEM).
    fn pair() -> (String, String) {
        let c = rcgen::generate_simple_self_signed(vec!["tokend.example".into()]).unwrap();
        (c.cert.pem(), c.signing_key.serialize_pem())
    }

    /// A client_credentials account with `rest`, cert.pem and key.pem in /etc/tokend.
    fn load(cert: &str, key: &str, rest: &str) -> Result<Config, ConfigError> {
        let mut e = env();
        e.files
            .insert(PathBuf::from("/etc/tokend/cert.pem"), cert.into());
        e.files
            .insert(PathBuf::from("/etc/tokend/key.pem"), key.into());
        let text = format!(
            "[accounts.bank]\ngrant = \"client_credentials\"\ntoken_url = \"https://x/t\"\nclient_id = \"c\"\n{rest}"
        );
        Config::from_str_at(&text, Path::new("/etc/tokend/tokend.toml"), &e)
    }

    const BOTH: &str = "client_auth = \"tls_client_auth\"\nclient_certificate = \"cert.pem\"\nclient_key = { file = \"key.pem\" }\n";

    fn keys(err: &ConfigError) -> Vec<&str> {
        err.problems.iter().map(|p| p.key.as_str()).collect()
    }

    #[test]
    fn a_matching_pair_is_the_accounts_identity_and_debug_hides_the_key() {
        let (cert, key) = pair();
        let c = load(&cert, &key, BOTH).unwrap();
        let a = c.accounts.values().next().unwrap();
        assert_eq!(a.client_auth, ClientAuth::TlsClientAuth);
        let id = a.tls_identity.as_ref().unwrap();
        assert_eq!(id.certificate_path, Path::new("/etc/tokend/cert.pem"));
        assert!(id.subject.contains("rcgen"), "{}", id.subject);
        assert_eq!(id.fingerprint.len(), 64);
        let body = key.lines().nth(1).unwrap();
        let shown = format!("{c:?}");
        assert!(
            !shown.contains(body) && !shown.contains("PRIVATE KEY"),
            "{shown}"
        );
        assert!(id.pem.expose().contains("BEGIN CERTIFICATE"));
    }

    #[test]
    fn a_missing_half_or_a_secret_beside_the_certificate_is_named() {
        let (cert, key) = pair();
        let err = load(&cert, &key, "client_auth = \"tls_client_auth\"\n").unwrap_err();
        assert_eq!(keys(&err), ["accounts.bank.client_certificate"], "{err}");
        assert!(
            err.to_string()
                .contains("needs client_certificate and client_key")
        );
        let err = load(
            &cert,
            &key,
            "client_secret = \"s\"\nclient_certificate = \"cert.pem\"\n",
        )
        .unwrap_err();
        assert_eq!(keys(&err), ["accounts.bank.client_certificate"], "{err}");
        assert!(err.to_string().contains("needs client_key too"), "{err}");
        let rest = format!("{BOTH}client_secret = \"s\"\nprivate_key = {{ file = \"key.pem\" }}\n");
        let err = load(&cert, &key, &rest).unwrap_err();
        assert_eq!(
            keys(&err),
            ["accounts.bank.client_secret", "accounts.bank.private_key"],
            "{err}"
        );
        // With another method the certificate is presented too (bound tokens).
        let rest = "client_secret = \"s\"\nclient_certificate = \"cert.pem\"\nclient_key = { file = \"key.pem\" }\n";
        let c = load(&cert, &key, rest).unwrap();
        assert!(c.accounts.values().next().unwrap().tls_identity.is_some());
    }

    #[test]
    fn an_encrypted_or_mismatched_key_or_a_bad_certificate_is_refused_unquoted() {
        let (cert, key) = pair();
        let (_, other_key) = pair();
        let locked = "-----BEGIN ENCRYPTED PRIVATE KEY-----\nTOPSECRET\n-----END ENCRYPTED PRIVATE KEY-----\n";
        let err = load(&cert, locked, BOTH).unwrap_err();
        assert_eq!(keys(&err), ["accounts.bank.client_key"], "{err}");
        assert!(err.to_string().contains("passphrase"), "{err}");
        let err = load(&cert, &other_key, BOTH).unwrap_err();
        assert_eq!(keys(&err), ["accounts.bank.client_key"], "{err}");
        assert!(
            err.to_string()
                .contains("does not belong to the certificate in /etc/tokend/cert.pem"),
            "{err}"
        );
        let body = other_key.lines().nth(1).unwrap();
        assert!(!err.to_string().contains(body), "{err}");
        let err = load("no pem here", &key, BOTH).unwrap_err();
        assert_eq!(keys(&err), ["accounts.bank.client_certificate"], "{err}");
        assert!(
            err.to_string().contains("holds no PEM certificate"),
            "{err}"
        );
        let err = load(&key, &key, BOTH).unwrap_err();
        assert_eq!(keys(&err), ["accounts.bank.client_certificate"], "{err}");
    }

    #[test]
    fn a_key_file_others_can_read_is_warned_about() {
        use std::os::unix::fs::PermissionsExt;
        let (cert, key) = pair();
        let dir = tempfile::tempdir().unwrap();
        let write = |name: &str, text: &str, mode: u32| {
            let path = dir.path().join(name);
            std::fs::write(&path, text).unwrap();
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
            path
        };
        let (c, k) = (write("c.pem", &cert, 0o644), write("k.pem", &key, 0o644));
        let text = format!(
            "[accounts.bank]\ngrant = \"client_credentials\"\ntoken_url = \"https://x/t\"\nclient_id = \"c\"\nclient_auth = \"tls_client_auth\"\nclient_certificate = \"{}\"\nclient_key = {{ file = \"{}\" }}\n",
            c.display(),
            k.display()
        );
        let config = Config::from_str_at(&text, Path::new("t.toml"), &SystemEnvironment).unwrap();
        assert_eq!(config.warnings.len(), 1, "{:?}", config.warnings);
        let w = &config.warnings[0];
        assert!(
            w.starts_with("accounts.bank.client_key:") && w.contains("chmod 600"),
            "{w}"
        );
    }

    #[test]
    fn the_shipped_mtls_example_is_valid() {
        let (cert, key) = pair();
        let mut e = env();
        for (path, text) in [
            ("/etc/tokend/client.pem", &cert),
            ("/etc/tokend/client.key", &key),
            ("/etc/tokend/bank-ca.pem", &cert),
        ] {
            e.files.insert(PathBuf::from(path), text.clone());
        }
        let text = include_str!("../../../config/mtls-client.toml");
        let c = Config::from_str_at(text, Path::new("mtls.toml"), &e).unwrap();
        let a = c.accounts.values().next().unwrap();
        assert_eq!(a.client_auth, ClientAuth::TlsClientAuth);
        assert!(a.tls_identity.is_some() && a.ca_bundle.is_some());
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        /// Whatever the two files hold, parsing answers with a problem (never a panic),
        /// and the problem never quotes the key.
        #[test]
        fn identity_parsing_never_panics_or_quotes(
            cert in "(-----BEGIN CERTIFICATE-----\n[A-Za-z0-9+/=\n]{0,80}\n-----END CERTIFICATE-----\n)?[ -~\n]{0,40}",
            key in "(-----BEGIN (EC |RSA )?PRIVATE KEY-----\n)?[A-Za-z0-9+/=\n]{0,80}(\n-----END PRIVATE KEY-----\n)?",
        ) {
            if let Err((part, msg)) = parse_identity(Path::new("c.pem"), &cert, &Secret::new(key.clone())) {
                let body = key.lines().nth(1).unwrap_or_default();
                prop_assert!(body.len() < 8 || !msg.contains(body));
                prop_assert!(part == Part::Key || part == Part::Certificate);
            }
        }
    }
}
