//! Secret values (client secrets, refresh and access tokens, keys): redacted in `Debug`
//! and `Display`, zeroized on drop, reachable only through [`Secret::expose`].

use std::fmt;

use secrecy::{ExposeSecret, SecretString};
use sha2::{Digest, Sha256};

/// A string that must never reach a log line, an error message or a panic.
///
/// Cloning is cheap enough for tokens (they are short) and each clone zeroizes itself.
#[derive(Clone)]
pub struct Secret(SecretString);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Secret(SecretString::from(value.into()))
    }

    /// The one way to the bytes. Call sites are the places a secret leaves the process:
    /// a request body, an `Authorization` header, a state file, a served token.
    pub fn expose(&self) -> &str {
        self.0.expose_secret()
    }

    pub fn is_empty(&self) -> bool {
        self.expose().is_empty()
    }

    /// A short, stable, non-reversible name for the value (first 12 hex digits of its
    /// SHA-256), safe to log and to persist: it tells two secrets apart without revealing
    /// either.
    pub fn fingerprint(&self) -> String {
        let digest = Sha256::digest(self.expose().as_bytes());
        digest[..6].iter().map(|b| format!("{b:02x}")).collect()
    }
}

impl PartialEq for Secret {
    fn eq(&self, other: &Self) -> bool {
        // Only used to tell whether a reloaded config changed; not an authentication check.
        self.expose() == other.expose()
    }
}

impl Eq for Secret {}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret([redacted])")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_and_display_never_show_the_value() {
        let s = Secret::new("hunter2-very-secret");
        assert!(!format!("{s:?}").contains("hunter2"));
        assert!(!format!("{s}").contains("hunter2"));
        assert!(!format!("{:?}", Some(s.clone())).contains("hunter2"));
        assert_eq!(s.expose(), "hunter2-very-secret");
    }

    #[test]
    fn fingerprint_is_stable_and_distinguishes_values() {
        let a = Secret::new("a");
        assert_eq!(a.fingerprint(), Secret::new("a").fingerprint());
        assert_ne!(a.fingerprint(), Secret::new("b").fingerprint());
        assert_eq!(a.fingerprint().len(), 12);
    }
}
