//! The on-disk format of state and handoff files: versioned JSON bound to its account,
//! sealed into an envelope when a keyring is configured. Bytes in, bytes out: where the
//! files live and how they are written is `file`'s and `atomic`'s.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use zeroize::Zeroize;

use super::{AccessToken, Handoff, NewChain, State};
use crate::config::AccountName;
use crate::seal::{Keyring, seal_file, unseal};
use crate::secret::Secret;

/// The format version this build writes into state and handoff files (and their
/// envelopes when sealed), and the only one it reads.
pub const FORMAT_VERSION: u32 = 1;

/// A state file in clear, or the plaintext of a sealed one.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Wire {
    version: u32,
    account: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    refresh_token: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    seed_fingerprint: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    refresh_token_issued_at: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    refresh_token_expires_at: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    access: Option<WireAccess>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    refresh_in_flight_since: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    last_refresh: Option<u64>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    spent: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    replaced: Option<String>,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct WireAccess {
    token: String,
    token_type: String,
    expires_at: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    scope: Option<String>,
    issued_at: u64,
}

/// The bytes of `account`'s state file: pretty JSON and a newline, sealed when `keyring`
/// is set.
pub(super) fn encode(account: &AccountName, state: &State, keyring: Option<&Keyring>) -> Vec<u8> {
    let mut wire = Wire {
        version: FORMAT_VERSION,
        account: account.to_string(),
        refresh_token: state.refresh_token.as_ref().map(|s| s.expose().to_string()),
        seed_fingerprint: state.seed_fingerprint.clone(),
        refresh_token_issued_at: state.refresh_token_issued_at.map(to_unix),
        refresh_token_expires_at: state.refresh_token_expires_at.map(to_unix),
        access: state.access.as_ref().map(wire_access),
        refresh_in_flight_since: state.refresh_in_flight_since.map(to_unix),
        last_refresh: state.last_refresh.map(to_unix),
        spent: state.spent.clone(),
        replaced: state.replaced.clone(),
    };
    let bytes = serde_json::to_vec_pretty(&wire).expect("state serializes");
    wire.refresh_token.zeroize();
    if let Some(a) = wire.access.as_mut() {
        a.token.zeroize();
    }
    finish_file(bytes, account, account.as_str(), keyring)
}

/// A file's JSON as written to disk: sealed under `keyring` (bound to `aad`) when one is
/// set, and ended with a newline. State and handoff files alike.
fn finish_file(
    json: Vec<u8>,
    account: &AccountName,
    aad: &str,
    keyring: Option<&Keyring>,
) -> Vec<u8> {
    let mut bytes = match keyring {
        Some(keyring) => seal_file(keyring, FORMAT_VERSION, account.as_str(), aad, json),
        None => json,
    };
    bytes.push(b'\n');
    bytes
}

/// `account`'s state from its file's bytes, sealed or not. The error names no secret.
pub(super) fn decode(
    bytes: &[u8],
    account: &AccountName,
    keyring: Option<&Keyring>,
) -> Result<State, String> {
    if bytes.is_empty() {
        return Err("the file is empty".into());
    }
    unseal(
        bytes,
        FORMAT_VERSION,
        account.as_str(),
        account.as_str(),
        keyring,
        |plain| read_wire(plain, account),
    )
}

/// Every file names its format version and its account: a file of another version, or
/// copied over from another account, is refused by name.
fn check_header(
    kind: &str,
    version: u32,
    file_account: &str,
    account: &AccountName,
) -> Result<(), String> {
    if version != FORMAT_VERSION {
        return Err(format!(
            "{kind}format version {version} is not {FORMAT_VERSION}, the one this tokend understands"
        ));
    }
    if file_account != account.as_str() {
        return Err(format!("the file belongs to account {file_account:?}"));
    }
    Ok(())
}

fn read_wire(bytes: &[u8], account: &AccountName) -> Result<State, String> {
    let mut wire: Wire = serde_json::from_slice(bytes).map_err(|e| describe_json(&e))?;
    check_header("", wire.version, &wire.account, account)?;
    let state = State {
        refresh_token: wire.refresh_token.take().map(Secret::new),
        seed_fingerprint: wire.seed_fingerprint.take(),
        refresh_token_issued_at: wire.refresh_token_issued_at.map(from_unix),
        refresh_token_expires_at: wire.refresh_token_expires_at.map(from_unix),
        access: wire.access.take().map(access_from),
        refresh_in_flight_since: wire.refresh_in_flight_since.map(from_unix),
        last_refresh: wire.last_refresh.map(from_unix),
        spent: std::mem::take(&mut wire.spent),
        replaced: wire.replaced.take(),
    };
    Ok(state)
}

/// What is wrong with a file that does not parse, in the file's terms: serde's own
/// messages name this crate's types ("expected struct Wire") and quote the values they
/// stumble on, which may be tokens.
fn describe_json(e: &serde_json::Error) -> String {
    use serde_json::error::Category;
    let at = format!("line {}, column {}", e.line(), e.column());
    match e.classify() {
        Category::Eof => {
            format!("the file ends in the middle of its JSON ({at}): it was cut short")
        }
        Category::Syntax => format!("the file is not valid JSON ({at})"),
        Category::Io => format!("the file cannot be read ({at})"),
        Category::Data => {
            let text = e.to_string();
            // "missing field `x`" and "unknown field `x`, expected one of …" quote only
            // field names.
            let field = ["missing field", "unknown field", "duplicate field"]
                .iter()
                .find(|p| text.starts_with(*p))
                .and_then(|_| text.split(", expected").next())
                .map(|m| m.split(" at line").next().unwrap_or(m).to_string());
            match field {
                Some(m) => format!("{m} ({at})"),
                None => format!(
                    "a value has the wrong type, or the file is not a tokend state or handoff file ({at})"
                ),
            }
        }
    }
}

pub(super) fn to_unix(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs()
}

pub(super) fn from_unix(s: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(s)
}

// ---------------------------------------------------------------------------------------
// Handoff files.

/// A handoff file: `{"version":1,"account":"a","handoff":"refresh_token","refresh_token":".."}`
/// or `{"version":1,"account":"a","handoff":"logout"}`.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct WireHandoff {
    version: u32,
    account: String,
    handoff: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    refresh_token: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    refresh_token_expires_at: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    access: Option<WireAccess>,
    /// The ledger fingerprint of the token presented to get this one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    spent: Option<String>,
    /// `adopt`: the account whose state this one takes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    from: Option<String>,
}

fn wire_access(a: &AccessToken) -> WireAccess {
    WireAccess {
        token: a.token.expose().to_string(),
        token_type: a.token_type.clone(),
        expires_at: to_unix(a.expires_at),
        scope: a.scope.clone(),
        issued_at: to_unix(a.issued_at),
    }
}

fn access_from(a: WireAccess) -> AccessToken {
    AccessToken {
        token: Secret::new(a.token),
        token_type: a.token_type,
        expires_at: from_unix(a.expires_at),
        scope: a.scope,
        issued_at: from_unix(a.issued_at),
    }
}

/// Sealed handoffs are bound to this associated data, so one cannot pass for a state file.
fn handoff_aad(account: &AccountName) -> String {
    format!("handoff:{account}")
}

/// The bytes of `account`'s handoff file, made like those of a state file.
pub(super) fn encode_handoff(
    account: &AccountName,
    handoff: &Handoff,
    keyring: Option<&Keyring>,
) -> Vec<u8> {
    let chain = match handoff {
        Handoff::RefreshToken(chain) => Some(chain),
        _ => None,
    };
    let mut wire = WireHandoff {
        version: FORMAT_VERSION,
        account: account.to_string(),
        handoff: match handoff {
            Handoff::RefreshToken(_) => "refresh_token",
            Handoff::Logout => "logout",
            Handoff::Adopt { .. } => "adopt",
        }
        .into(),
        refresh_token: chain.map(|c| c.refresh_token.expose().to_string()),
        refresh_token_expires_at: chain.and_then(|c| c.refresh_token_expires_at.map(to_unix)),
        access: chain.and_then(|c| c.access.as_ref().map(wire_access)),
        spent: chain.and_then(|c| c.spent.clone()),
        from: match handoff {
            Handoff::Adopt { from } => Some(from.to_string()),
            _ => None,
        },
    };
    let bytes = serde_json::to_vec_pretty(&wire).expect("a handoff serializes");
    wire.refresh_token.zeroize();
    if let Some(a) = wire.access.as_mut() {
        a.token.zeroize();
    }
    finish_file(bytes, account, &handoff_aad(account), keyring)
}

pub(super) fn decode_handoff(
    bytes: &[u8],
    account: &AccountName,
    keyring: Option<&Keyring>,
) -> Result<Handoff, String> {
    unseal(
        bytes,
        FORMAT_VERSION,
        account.as_str(),
        &handoff_aad(account),
        keyring,
        |plain| read_handoff(plain, account),
    )
}

fn read_handoff(bytes: &[u8], account: &AccountName) -> Result<Handoff, String> {
    let mut wire: WireHandoff = serde_json::from_slice(bytes).map_err(|e| describe_json(&e))?;
    check_header("handoff ", wire.version, &wire.account, account)?;
    match (
        wire.handoff.as_str(),
        wire.refresh_token.take(),
        wire.from.take(),
    ) {
        ("refresh_token", Some(rt), None) if !rt.is_empty() => {
            Ok(Handoff::RefreshToken(NewChain {
                refresh_token: Secret::new(rt),
                refresh_token_expires_at: wire.refresh_token_expires_at.map(from_unix),
                access: wire.access.take().map(access_from),
                spent: wire.spent.take(),
            }))
        }
        ("logout", None, None) => Ok(Handoff::Logout),
        ("adopt", None, Some(from)) => match AccountName::parse(&from) {
            Ok(from) => Ok(Handoff::Adopt { from }),
            Err(_) => Err("an adopt handoff names no valid account".into()),
        },
        (kind, _, _) => Err(format!("not a valid handoff of kind {kind:?}")),
    }
}

#[cfg(test)]
mod tests {
    use super::super::fixtures::{name, ring, sample};
    use super::*;

    #[test]
    fn decode_rejects_other_versions_and_accounts_without_echoing_secrets() {
        let bytes = encode(&name("a"), &sample(), None);
        assert!(
            decode(&bytes, &name("b"), None)
                .unwrap_err()
                .contains("\"a\"")
        );
        let text = String::from_utf8(bytes)
            .unwrap()
            .replace("\"version\": 1", "\"version\": 9");
        let err = decode(text.as_bytes(), &name("a"), None).unwrap_err();
        assert!(err.contains("version 9"), "{err}");
        assert!(!err.contains("rt-1"));
    }

    #[test]
    fn a_garbled_file_is_described_without_type_names_or_its_values() {
        let a = name("a");
        for (bytes, expect) in [
            (&b"[]"[..], "wrong type"),
            (b"\"rt-in-a-string\"", "wrong type"),
            (
                b"{\"version\":1,\"account\":\"a\",\"access\":\"at-secret-value\"}",
                "wrong type",
            ),
            (
                b"{\"version\":1,\"account\":\"a\",\"refresh_token\":\"rt-cut",
                "cut short",
            ),
            (b"{\"version\":1}", "missing field `account`"),
            (b"not json", "not valid JSON"),
        ] {
            let err = decode(bytes, &a, None).unwrap_err();
            assert!(err.contains(expect), "{err}");
            assert!(err.contains("line 1"), "{err}");
            for leak in ["Wire", "struct", "secret-value", "rt-in", "rt-cut"] {
                assert!(!err.contains(leak), "{leak} in {err}");
            }
            let err = decode_handoff(bytes, &a, None).unwrap_err();
            assert!(
                !err.contains("Wire") && !err.contains("secret-value"),
                "{err}"
            );
        }
    }

    #[test]
    fn handoffs_carry_a_tried_chain_and_renames() {
        let a = name("a");
        let chain = NewChain {
            refresh_token: Secret::new("rt-2"),
            refresh_token_expires_at: Some(from_unix(1_800_000_000)),
            access: sample().access,
            spent: Some("00ff".into()),
        };
        for handoff in [
            Handoff::RefreshToken(chain),
            Handoff::Adopt { from: name("old") },
        ] {
            let bytes = encode_handoff(&a, &handoff, Some(&ring(1, &[])));
            assert_eq!(decode_handoff(&bytes, &a, Some(&ring(1, &[]))), Ok(handoff));
        }
    }

    #[test]
    fn handoff_files_are_bound_to_their_account_and_never_read_as_state() {
        let bytes = encode_handoff(&name("a"), &Handoff::Logout, None);
        assert_eq!(
            decode_handoff(&bytes, &name("a"), None),
            Ok(Handoff::Logout)
        );
        assert!(decode_handoff(&bytes, &name("b"), None).is_err());
        assert!(decode(&bytes, &name("a"), None).is_err());
        let sealed = encode_handoff(
            &name("a"),
            &Handoff::RefreshToken(NewChain::untried(Secret::new("rt-9"))),
            Some(&ring(1, &[])),
        );
        assert!(decode(&sealed, &name("a"), Some(&ring(1, &[]))).is_err());
    }

    #[test]
    fn sealed_state_and_handoffs_share_one_envelope_check() {
        let keys = ring(1, &[]);
        let state = encode(&name("a"), &sample(), Some(&keys));
        let handoff = encode_handoff(&name("a"), &Handoff::Logout, Some(&keys));
        for err in [
            decode(&state, &name("b"), Some(&keys)).unwrap_err(),
            decode_handoff(&handoff, &name("b"), Some(&keys)).unwrap_err(),
        ] {
            assert_eq!(err, "the file belongs to account \"a\"");
        }
        for err in [
            decode(&state, &name("a"), None).unwrap_err(),
            decode_handoff(&handoff, &name("a"), None).unwrap_err(),
        ] {
            assert!(err.contains("no state.encryption_key"), "{err}");
        }
        assert_eq!(decode(&state, &name("a"), Some(&keys)), Ok(sample()));
        assert_eq!(
            decode_handoff(&handoff, &name("a"), Some(&keys)),
            Ok(Handoff::Logout)
        );
    }

    /// Pins the files' bytes: a daemon must read what the previous build wrote, and
    /// `tokend login` must write what the running daemon reads.
    #[test]
    fn the_files_are_written_byte_for_byte_as_before() {
        let state = encode(&name("a"), &sample(), None);
        assert_eq!(
            String::from_utf8(state).unwrap(),
            r#"{
  "version": 1,
  "account": "a",
  "refresh_token": "rt-1",
  "seed_fingerprint": "abc",
  "refresh_token_issued_at": 1700000000,
  "refresh_token_expires_at": 1702592000,
  "access": {
    "token": "at-1",
    "token_type": "Bearer",
    "expires_at": 1700003600,
    "scope": "a b",
    "issued_at": 1700000000
  },
  "last_refresh": 1700000000
}
"#
        );
        let handoff = encode_handoff(
            &name("a"),
            &Handoff::RefreshToken(NewChain::untried(Secret::new("rt-9"))),
            None,
        );
        assert_eq!(
            String::from_utf8(handoff).unwrap(),
            r#"{
  "version": 1,
  "account": "a",
  "handoff": "refresh_token",
  "refresh_token": "rt-9"
}
"#
        );
        let logout = encode_handoff(&name("a"), &Handoff::Logout, None);
        assert_eq!(
            String::from_utf8(logout).unwrap(),
            "{\n  \"version\": 1,\n  \"account\": \"a\",\n  \"handoff\": \"logout\"\n}\n"
        );
        // Sealed: the envelope's fields in this order, then the random nonce.
        let sealed = String::from_utf8(encode(&name("a"), &sample(), Some(&ring(1, &[])))).unwrap();
        let key_id = ring(1, &[]).current.id().to_string();
        let head = format!(
            "{{\n  \"version\": 1,\n  \"account\": \"a\",\n  \"sealed\": {{\n    \"alg\": \"XChaCha20-Poly1305\",\n    \"key_id\": \"{key_id}\",\n    \"nonce\": \""
        );
        assert!(sealed.starts_with(&head), "{sealed}");
        assert!(sealed.ends_with("\"\n  }\n}\n"), "{sealed}");
    }
}
