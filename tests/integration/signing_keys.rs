//! PEM private keys as operators hand them to tokend (`private_key`): keys generated here
//! round-trip through every PEM form and sign as the original would; arbitrary text and
//! DER never make the parser panic.

use aws_lc_rs::signature::{self, UnparsedPublicKey, VerificationAlgorithm};
use proptest::prelude::*;
use tokend::secret::Secret;
use tokend::signing::{SigningAlg, SigningKey};

use crate::support::{ec_key_der, pem, rsa_key_der};

/// The key read from `text` signs what `public` verifies under `alg`.
fn signs_as(
    text: &str,
    want: Option<SigningAlg>,
    public: &[u8],
    alg: &'static dyn VerificationAlgorithm,
) -> SigningKey {
    let key = SigningKey::from_pem(&Secret::new(text), want).unwrap();
    assert_eq!(key.public_key(), public);
    let sig = key.sign(b"header.payload").unwrap();
    UnparsedPublicKey::new(alg, public)
        .verify(b"header.payload", &sig)
        .expect("the parsed key signs as the generated one");
    key
}

/// The key inside a PKCS#8 `PrivateKeyInfo`: its OCTET STRING, which holds the PKCS#1
/// structure. Short- and long-form DER lengths.
fn inner_key(pkcs8: &[u8]) -> Vec<u8> {
    let header = |at: usize| -> (usize, usize) {
        let first = pkcs8[at + 1] as usize;
        if first < 0x80 {
            return (at + 2, first);
        }
        let n = first & 0x7f;
        let len = pkcs8[at + 2..at + 2 + n]
            .iter()
            .fold(0, |acc, b| (acc << 8) | *b as usize);
        (at + 2 + n, len)
    };
    let (mut at, _) = header(0);
    loop {
        let (body, len) = header(at);
        if pkcs8[at] == 0x04 {
            return pkcs8[body..body + len].to_vec();
        }
        at = body + len;
    }
}

#[test]
fn rsa_keys_read_as_pkcs8_and_pkcs1_and_sign_rs256_or_ps256() {
    let (pkcs8, public) = rsa_key_der();
    let key = signs_as(
        &pem("PRIVATE KEY", &pkcs8),
        None,
        &public,
        &signature::RSA_PKCS1_2048_8192_SHA256,
    );
    assert_eq!(key.alg(), SigningAlg::Rs256);
    assert_eq!(key.describe(), "RSA 2048-bit");
    let pkcs1 = pem("RSA PRIVATE KEY", &inner_key(&pkcs8));
    let key = signs_as(
        &pkcs1,
        Some(SigningAlg::Ps256),
        &public,
        &signature::RSA_PSS_2048_8192_SHA256,
    );
    assert_eq!(key.alg(), SigningAlg::Ps256);
    let err = SigningKey::from_pem(&Secret::new(&pkcs1), Some(SigningAlg::Es256)).unwrap_err();
    assert!(err.contains("use RS256 or PS256"), "{err}");
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn parsing_never_panics_on_arbitrary_text(
        text in "(-----BEGIN [A-Z ]{0,20}-----\n)?[A-Za-z0-9+/=\n:,-]{0,200}(-----END [A-Z ]{0,20}-----)?"
    ) {
        let _ = SigningKey::from_pem(&Secret::new(text), None);
    }

    #[test]
    fn parsing_never_panics_on_arbitrary_der(
        der in proptest::collection::vec(any::<u8>(), 0..300),
        label in prop::sample::select(vec!["PRIVATE KEY", "RSA PRIVATE KEY", "EC PRIVATE KEY"]),
    ) {
        let _ = SigningKey::from_pem(&Secret::new(pem(label, &der)), None);
    }

    #[test]
    fn generated_ec_keys_round_trip_as_pkcs8_and_sec1(_case in any::<u8>()) {
        let (pkcs8, sec1, public) = ec_key_der();
        for text in [pem("PRIVATE KEY", &pkcs8), pem("EC PRIVATE KEY", &sec1)] {
            let key = signs_as(&text, None, &public, &signature::ECDSA_P256_SHA256_FIXED);
            prop_assert_eq!(key.alg(), SigningAlg::Es256);
            prop_assert_eq!(key.describe(), "EC P-256");
        }
    }
}
