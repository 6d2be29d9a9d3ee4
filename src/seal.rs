//! Encryption at rest of state files: each file's JSON is sealed with XChaCha20-Poly1305
//! under the current key (random 192-bit nonce, the account name as associated data, so a
//! file cannot be passed off as another account's). Older keys stay usable for opening
//! files written before a rotation; every save re-seals under the current key. The
//! envelope's format version is passed in by the store's wire format, which this module
//! does not know.

use std::fmt;

use base64::Engine as _;
use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{Key, XChaCha20Poly1305, XNonce};
use rand::RngCore;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use zeroize::Zeroize;

use crate::secret::Secret;

/// The algorithm name written into sealed files.
pub const ALGORITHM: &str = "XChaCha20-Poly1305";

/// One 256-bit key and its public id (a hash prefix, safe to write next to the data).
#[derive(Clone)]
pub struct SealKey {
    id: String,
    cipher: XChaCha20Poly1305,
}

impl fmt::Debug for SealKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SealKey({})", self.id)
    }
}

impl PartialEq for SealKey {
    fn eq(&self, other: &Self) -> bool {
        self.id == other.id
    }
}

impl SealKey {
    /// A key from its text form: 64 hex digits or standard base64 of 32 bytes (e.g.
    /// `openssl rand -hex 32`).
    pub fn parse(text: &Secret) -> Result<SealKey, String> {
        let t = text.expose().trim();
        let bytes = if t.len() == 64 && t.chars().all(|c| c.is_ascii_hexdigit()) {
            (0..32)
                .map(|i| u8::from_str_radix(&t[2 * i..2 * i + 2], 16).expect("hex checked"))
                .collect::<Vec<u8>>()
        } else {
            base64::engine::general_purpose::STANDARD
                .decode(t)
                .map_err(|_| {
                    "an encryption key is 32 bytes as 64 hex digits or base64".to_string()
                })?
        };
        if bytes.len() != 32 {
            return Err(format!(
                "an encryption key is 32 bytes, not {}",
                bytes.len()
            ));
        }
        let digest = Sha256::digest(&bytes);
        let id = digest[..4].iter().map(|b| format!("{b:02x}")).collect();
        let cipher = XChaCha20Poly1305::new(Key::from_slice(&bytes));
        Ok(SealKey { id, cipher })
    }

    pub fn id(&self) -> &str {
        &self.id
    }
}

/// The current key and the ones it replaced.
#[derive(Debug, Clone, PartialEq)]
pub struct Keyring {
    pub current: SealKey,
    pub previous: Vec<SealKey>,
}

/// A sealed state file.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Envelope {
    pub version: u32,
    pub account: String,
    pub sealed: Sealed,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Sealed {
    pub alg: String,
    pub key_id: String,
    pub nonce: String,
    pub ciphertext: String,
}

impl Keyring {
    pub fn seal(&self, account: &str, plaintext: &[u8]) -> Sealed {
        let mut nonce = [0u8; 24];
        rand::rng().fill_bytes(&mut nonce);
        let ciphertext = self
            .current
            .cipher
            .encrypt(
                XNonce::from_slice(&nonce),
                Payload {
                    msg: plaintext,
                    aad: account.as_bytes(),
                },
            )
            .expect("XChaCha20-Poly1305 encryption does not fail for in-memory buffers");
        let b64 = base64::engine::general_purpose::STANDARD;
        Sealed {
            alg: ALGORITHM.into(),
            key_id: self.current.id.clone(),
            nonce: b64.encode(nonce),
            ciphertext: b64.encode(ciphertext),
        }
    }

    pub fn open(&self, account: &str, sealed: &Sealed) -> Result<Vec<u8>, String> {
        if sealed.alg != ALGORITHM {
            return Err(format!("sealed with {:?}, not {ALGORITHM}", sealed.alg));
        }
        let key = std::iter::once(&self.current)
            .chain(&self.previous)
            .find(|k| k.id == sealed.key_id)
            .ok_or_else(|| {
                format!(
                    "sealed with key id {}, which is neither state.encryption_key nor one of state.previous_encryption_keys",
                    sealed.key_id
                )
            })?;
        let b64 = base64::engine::general_purpose::STANDARD;
        let nonce = b64
            .decode(&sealed.nonce)
            .map_err(|_| "the nonce is not base64")?;
        if nonce.len() != 24 {
            return Err("the nonce is not 24 bytes".into());
        }
        let ciphertext = b64
            .decode(&sealed.ciphertext)
            .map_err(|_| "the ciphertext is not base64")?;
        key.cipher
            .decrypt(
                XNonce::from_slice(&nonce),
                Payload {
                    msg: &ciphertext,
                    aad: account.as_bytes(),
                },
            )
            .map_err(|_| {
                "decryption failed: the file was altered, or belongs to another account".to_string()
            })
    }
}

/// Seals `plain` (zeroized here) for `account` into an envelope file's bytes, marked with
/// format `version`. `aad` is the associated data: it ties the ciphertext to the account
/// and to the kind of file.
pub fn seal_file(
    keyring: &Keyring,
    version: u32,
    account: &str,
    aad: &str,
    mut plain: Vec<u8>,
) -> Vec<u8> {
    let envelope = Envelope {
        version,
        account: account.to_string(),
        sealed: keyring.seal(aad, &plain),
    };
    plain.zeroize();
    serde_json::to_vec_pretty(&envelope).expect("an envelope serializes")
}

/// Reads a file that may be sealed: `read` gets the file's bytes as they are when in
/// clear, or the opened plaintext (zeroized afterwards) when they are an envelope of
/// format `version` for `account` sealed with `aad`. The errors name no secret: only
/// account names, key ids and what is wrong.
pub fn unseal<T>(
    bytes: &[u8],
    version: u32,
    account: &str,
    aad: &str,
    keyring: Option<&Keyring>,
    read: impl FnOnce(&[u8]) -> Result<T, String>,
) -> Result<T, String> {
    let Ok(envelope) = serde_json::from_slice::<Envelope>(bytes) else {
        return read(bytes);
    };
    // An envelope names its account in clear too; this check and the associated data
    // both tie it to this account.
    if envelope.account != account {
        return Err(format!(
            "the file belongs to account {:?}",
            envelope.account
        ));
    }
    // A newer tokend's envelope may seal differently: say so rather than fail to open it.
    if envelope.version != version {
        return Err(format!(
            "envelope format version {} is not {version}, the one this tokend understands",
            envelope.version
        ));
    }
    let Some(keyring) = keyring else {
        return Err("the file is encrypted but no state.encryption_key is configured".into());
    };
    let mut plain = keyring.open(aad, &envelope.sealed)?;
    let result = read(&plain);
    plain.zeroize();
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(byte: u8) -> SealKey {
        SealKey::parse(&Secret::new(format!("{byte:02x}").repeat(32))).unwrap()
    }

    #[test]
    fn seal_then_open_round_trips_and_binds_the_account() {
        let ring = Keyring {
            current: key(1),
            previous: vec![],
        };
        let sealed = ring.seal("zywave", b"{\"secret\":1}");
        assert!(!sealed.ciphertext.contains("secret"));
        assert_eq!(ring.open("zywave", &sealed).unwrap(), b"{\"secret\":1}");
        assert!(
            ring.open("zephr", &sealed)
                .unwrap_err()
                .contains("another account")
        );
    }

    #[test]
    fn old_keys_open_files_until_removed() {
        let old = Keyring {
            current: key(1),
            previous: vec![],
        };
        let sealed = old.seal("a", b"x");
        let rotated = Keyring {
            current: key(2),
            previous: vec![key(1)],
        };
        assert_eq!(rotated.open("a", &sealed).unwrap(), b"x");
        let resealed = rotated.seal("a", b"x");
        assert_eq!(resealed.key_id, key(2).id());
        let forgotten = Keyring {
            current: key(2),
            previous: vec![],
        };
        assert!(
            forgotten
                .open("a", &sealed)
                .unwrap_err()
                .contains(key(1).id())
        );
    }

    #[test]
    fn an_envelope_of_another_format_version_is_refused_by_name() {
        let ring = Keyring {
            current: key(1),
            previous: vec![],
        };
        let file = seal_file(&ring, 1, "a", "a", b"{}".to_vec());
        assert!(unseal(&file, 1, "a", "a", Some(&ring), |b| Ok(b.to_vec())).is_ok());
        let mut envelope: serde_json::Value = serde_json::from_slice(&file).unwrap();
        envelope["version"] = 2.into();
        let newer = serde_json::to_vec(&envelope).unwrap();
        let err = unseal(&newer, 1, "a", "a", Some(&ring), |b| Ok(b.to_vec())).unwrap_err();
        assert!(err.contains("envelope format version 2 is not 1"), "{err}");
    }

    #[test]
    fn keys_parse_from_hex_or_base64_and_nothing_else() {
        let b64 = base64::engine::general_purpose::STANDARD.encode([7u8; 32]);
        assert_eq!(SealKey::parse(&Secret::new(b64)).unwrap(), key(7));
        assert!(SealKey::parse(&Secret::new("short")).is_err());
        assert!(SealKey::parse(&Secret::new("ab".repeat(31))).is_err());
        assert!(!format!("{:?}", key(7)).contains("0707"));
    }
}
