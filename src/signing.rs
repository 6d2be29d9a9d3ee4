//! The private keys that sign client assertions (RFC 7523): PEM parsing (PKCS#8, PKCS#1,
//! SEC1), which algorithm each key allows, and signing. A leaf like `seal`: the config
//! checks a key when it loads, the provider signs with it at every request.

use std::fmt;
use std::sync::Arc;

use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::signature::{self, EcdsaKeyPair, RsaKeyPair};
use rustls_pki_types::PrivateKeyDer;
use rustls_pki_types::pem::PemObject;

use crate::secret::Secret;

/// A JWS algorithm tokend signs client assertions with (RFC 7518 §3.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SigningAlg {
    Rs256,
    Ps256,
    Es256,
    /// HMAC over the client secret: `client_secret_jwt`.
    Hs256,
}

impl SigningAlg {
    /// The `alg` header value.
    pub fn name(self) -> &'static str {
        match self {
            SigningAlg::Rs256 => "RS256",
            SigningAlg::Ps256 => "PS256",
            SigningAlg::Es256 => "ES256",
            SigningAlg::Hs256 => "HS256",
        }
    }

    /// `signing_alg` as written (exact JWS names).
    pub fn parse(name: &str) -> Option<SigningAlg> {
        [Self::Rs256, Self::Ps256, Self::Es256, Self::Hs256]
            .into_iter()
            .find(|a| a.name() == name)
    }
}

/// A private key that signs assertions. `Debug` names its algorithm only; two keys are
/// equal when their PEM text is (a reload compares configs).
#[derive(Clone)]
pub struct SigningKey {
    alg: SigningAlg,
    pair: Pair,
    fingerprint: String,
}

#[derive(Clone)]
enum Pair {
    Rsa(Arc<RsaKeyPair>),
    Ec(Arc<EcdsaKeyPair>),
}

impl SigningKey {
    /// Parses the first private key in `pem` and checks `alg` (the configured
    /// `signing_alg`; `None`: RS256 for RSA, ES256 for EC P-256) against it. Messages
    /// describe the problem, never the key.
    pub fn from_pem(pem: &Secret, alg: Option<SigningAlg>) -> Result<SigningKey, String> {
        let text = pem.expose();
        if text.contains("ENCRYPTED PRIVATE KEY") || text.contains("Proc-Type: 4,ENCRYPTED") {
            return Err("the private key is protected by a passphrase, which tokend cannot enter: store it decrypted (`openssl pkey -in KEY -out PLAIN`) in a file only tokend can read".into());
        }
        let der = PrivateKeyDer::from_pem_slice(text.as_bytes()).map_err(|_| {
            "holds no PEM private key (a PRIVATE KEY, RSA PRIVATE KEY or EC PRIVATE KEY block)"
                .to_string()
        })?;
        let pair = match &der {
            PrivateKeyDer::Pkcs1(k) => rsa(RsaKeyPair::from_der(k.secret_pkcs1_der()))?,
            PrivateKeyDer::Sec1(k) => ec(k.secret_sec1_der())?,
            PrivateKeyDer::Pkcs8(k) => {
                let bytes = k.secret_pkcs8_der();
                match RsaKeyPair::from_pkcs8(bytes) {
                    Ok(pair) => Pair::Rsa(Arc::new(pair)),
                    Err(_) => ec(bytes)?,
                }
            }
            _ => return Err("holds a private key of a kind tokend does not know".into()),
        };
        let alg = match (&pair, alg) {
            (Pair::Rsa(_), None) => SigningAlg::Rs256,
            (Pair::Ec(_), None) => SigningAlg::Es256,
            (Pair::Rsa(_), Some(a @ (SigningAlg::Rs256 | SigningAlg::Ps256)))
            | (Pair::Ec(_), Some(a @ SigningAlg::Es256)) => a,
            (pair, Some(a)) => {
                let allowed = match pair {
                    Pair::Rsa(_) => "RS256 or PS256",
                    Pair::Ec(_) => "ES256",
                };
                return Err(format!(
                    "signing_alg {} does not fit {}: use {allowed}",
                    a.name(),
                    kind(pair)
                ));
            }
        };
        Ok(SigningKey {
            alg,
            pair,
            fingerprint: pem.fingerprint(),
        })
    }

    pub fn alg(&self) -> SigningAlg {
        self.alg
    }

    /// What kind of key it is (`RSA 2048-bit`, `EC P-256`): for `tokend check`.
    pub fn describe(&self) -> String {
        kind(&self.pair)
    }

    /// The public half as the verifier wants it: PKCS#1 `RSAPublicKey` DER, or the
    /// uncompressed EC point.
    pub fn public_key(&self) -> Vec<u8> {
        use signature::KeyPair as _;
        match &self.pair {
            Pair::Rsa(k) => k.public_key().as_ref().to_vec(),
            Pair::Ec(k) => k.public_key().as_ref().to_vec(),
        }
    }

    /// The JWS signature of `message` (RFC 7515 §5.1), raw bytes.
    pub fn sign(&self, message: &[u8]) -> Result<Vec<u8>, String> {
        let rng = SystemRandom::new();
        let failed = |_| format!("signing with the {} key failed", self.alg.name());
        match &self.pair {
            Pair::Rsa(k) => {
                let padding: &dyn signature::RsaEncoding = match self.alg {
                    SigningAlg::Ps256 => &signature::RSA_PSS_SHA256,
                    _ => &signature::RSA_PKCS1_SHA256,
                };
                let mut out = vec![0; k.public_modulus_len()];
                k.sign(padding, &rng, message, &mut out).map_err(failed)?;
                Ok(out)
            }
            Pair::Ec(k) => Ok(k.sign(&rng, message).map_err(failed)?.as_ref().to_vec()),
        }
    }
}

fn rsa(parsed: Result<RsaKeyPair, aws_lc_rs::error::KeyRejected>) -> Result<Pair, String> {
    parsed.map(|k| Pair::Rsa(Arc::new(k))).map_err(|e| {
        format!("the RSA key is not usable ({e}); tokend takes RSA keys of 2048 to 8192 bits")
    })
}

/// An EC key, which must be on P-256 (ES256, the only EC algorithm here).
fn ec(der: &[u8]) -> Result<Pair, String> {
    if let Ok(k) =
        EcdsaKeyPair::from_private_key_der(&signature::ECDSA_P256_SHA256_FIXED_SIGNING, der)
    {
        return Ok(Pair::Ec(Arc::new(k)));
    }
    let other = [
        &signature::ECDSA_P384_SHA384_FIXED_SIGNING,
        &signature::ECDSA_P521_SHA512_FIXED_SIGNING,
    ]
    .into_iter()
    .any(|alg| EcdsaKeyPair::from_private_key_der(alg, der).is_ok());
    Err(if other {
        "the EC key is not on P-256: tokend signs ES256, which needs a P-256 key".into()
    } else {
        "the private key is neither an RSA nor an EC P-256 key tokend can use".into()
    })
}

fn kind(pair: &Pair) -> String {
    match pair {
        Pair::Rsa(k) => format!("RSA {}-bit", k.public_modulus_len() * 8),
        Pair::Ec(_) => "EC P-256".into(),
    }
}

impl fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SigningKey({}, [redacted])", self.alg.name())
    }
}

impl PartialEq for SigningKey {
    fn eq(&self, other: &Self) -> bool {
        self.alg == other.alg && self.fingerprint == other.fingerprint
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_passphrase_or_a_missing_key_is_named_and_nothing_is_quoted() {
        for text in [
            "-----BEGIN ENCRYPTED PRIVATE KEY-----\nMIIFHDBOBgkqhkiG9w0BBQ0w\n-----END ENCRYPTED PRIVATE KEY-----\n",
            "-----BEGIN RSA PRIVATE KEY-----\nProc-Type: 4,ENCRYPTED\nDEK-Info: AES-128-CBC,00\n\nAAAA\n-----END RSA PRIVATE KEY-----\n",
        ] {
            let err = SigningKey::from_pem(&Secret::new(text), None).unwrap_err();
            assert!(err.contains("passphrase"), "{err}");
            assert!(!err.contains("MIIF") && !err.contains("AAAA"), "{err}");
        }
        let cert = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n";
        let err = SigningKey::from_pem(&Secret::new(cert), None).unwrap_err();
        assert!(err.contains("no PEM private key"), "{err}");
        let junk = "-----BEGIN PRIVATE KEY-----\nMAMCAQA=\n-----END PRIVATE KEY-----\n";
        let err = SigningKey::from_pem(&Secret::new(junk), None).unwrap_err();
        assert!(!err.contains("MAMC"), "{err}");
    }
}
