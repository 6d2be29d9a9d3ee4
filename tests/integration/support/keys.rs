//! Keys made in the test: RSA and EC P-256 key pairs as PEM text, with the public half
//! as the fake provider registers it.

use aws_lc_rs::encoding::{AsDer, Pkcs8V1Der};
use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::rsa::KeySize;
use aws_lc_rs::signature::{self, EcdsaKeyPair, KeyPair as _, RsaKeyPair};
use base64::Engine as _;

/// A PEM block of `der` under `label`, 64 characters a line.
pub fn pem(label: &str, der: &[u8]) -> String {
    let body = base64::engine::general_purpose::STANDARD.encode(der);
    let lines: Vec<&str> = body
        .as_bytes()
        .chunks(64)
        .map(|c| std::str::from_utf8(c).unwrap())
        .collect();
    format!(
        "-----BEGIN {label}-----\n{}\n-----END {label}-----\n",
        lines.join("\n")
    )
}

/// A fresh 2048-bit RSA key: its PKCS#8 DER and its PKCS#1 public key.
pub fn rsa_key_der() -> (Vec<u8>, Vec<u8>) {
    let pair = RsaKeyPair::generate(KeySize::Rsa2048).unwrap();
    let der = AsDer::<Pkcs8V1Der>::as_der(&pair).unwrap();
    (der.as_ref().to_vec(), pair.public_key().as_ref().to_vec())
}

/// A fresh EC P-256 key: its PKCS#8 DER, its SEC1 DER and its public point.
pub fn ec_key_der() -> (Vec<u8>, Vec<u8>, Vec<u8>) {
    let alg = &signature::ECDSA_P256_SHA256_FIXED_SIGNING;
    let pkcs8 = EcdsaKeyPair::generate_pkcs8(alg, &SystemRandom::new()).unwrap();
    let pair = EcdsaKeyPair::from_pkcs8(alg, pkcs8.as_ref()).unwrap();
    let sec1 = pair.private_key().as_der().unwrap();
    (
        pkcs8.as_ref().to_vec(),
        sec1.as_ref().to_vec(),
        pair.public_key().as_ref().to_vec(),
    )
}

/// A fresh RSA key as PKCS#8 PEM, and its public key.
pub fn rsa_key() -> (String, Vec<u8>) {
    let (der, public) = rsa_key_der();
    (pem("PRIVATE KEY", &der), public)
}

/// A fresh EC P-256 key as SEC1 PEM (`EC PRIVATE KEY`), and its public point.
pub fn ec_key() -> (String, Vec<u8>) {
    let (_, sec1, public) = ec_key_der();
    (pem("EC PRIVATE KEY", &sec1), public)
}
