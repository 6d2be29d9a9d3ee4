//! How the fake provider checks a client assertion (RFC 7523 §3), on its own: the
//! signature with the registered public key (or shared secret), `iss`/`sub`, `aud`, `exp`,
//! `iat` within the skew it allows, and a `jti` never seen before.

use std::collections::{HashMap, HashSet};
use std::time::SystemTime;

use aws_lc_rs::hmac;
use aws_lc_rs::signature::{self, UnparsedPublicKey};
use base64::Engine as _;
use serde_json::Value;

use super::token::{Reject, oauth_error};
use super::{ClientSpec, Inner};

/// Spelled out here rather than taken from the daemon (see `DEVICE_CODE_GRANT`).
const ASSERTION_TYPE: &str = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";
/// How far in the future an `iat` may be (the client's clock ahead of ours).
const SKEW_SECS: u64 = 60;
/// The longest an assertion may live, `iat` to `exp`.
const MAX_LIFETIME_SECS: u64 = 3600;

/// The key a client's assertions are checked with.
#[derive(Debug, Clone)]
pub enum JwtKey {
    /// A PKCS#1 `RSAPublicKey` (DER), RS256.
    Rs256(Vec<u8>),
    /// The same, PS256.
    Ps256(Vec<u8>),
    /// An uncompressed P-256 point, ES256.
    Es256(Vec<u8>),
    /// The shared client secret, HS256 (`client_secret_jwt`).
    Hs256(String),
}

impl JwtKey {
    fn alg(&self) -> &'static str {
        match self {
            JwtKey::Rs256(_) => "RS256",
            JwtKey::Ps256(_) => "PS256",
            JwtKey::Es256(_) => "ES256",
            JwtKey::Hs256(_) => "HS256",
        }
    }

    fn verifies(&self, input: &[u8], sig: &[u8]) -> bool {
        let public = |alg: &'static dyn signature::VerificationAlgorithm, key: &[u8]| {
            UnparsedPublicKey::new(alg, key).verify(input, sig).is_ok()
        };
        match self {
            JwtKey::Rs256(k) => public(&signature::RSA_PKCS1_2048_8192_SHA256, k),
            JwtKey::Ps256(k) => public(&signature::RSA_PSS_2048_8192_SHA256, k),
            JwtKey::Es256(k) => public(&signature::ECDSA_P256_SHA256_FIXED, k),
            JwtKey::Hs256(secret) => {
                let key = hmac::Key::new(hmac::HMAC_SHA256, secret.as_bytes());
                hmac::verify(&key, input, sig).is_ok()
            }
        }
    }
}

/// A client that authenticates with assertions: what it must sign with and claim.
#[derive(Debug, Clone)]
pub struct JwtClient {
    pub key: JwtKey,
    /// The `aud` expected (one of them, if an array).
    pub audience: String,
    /// `iss` and `sub` expected: the client id (RFC 7523 §3), or a federated identity's;
    /// no `sub` at all for a Google service account acting as itself.
    pub issuer: String,
    pub subject: Option<String>,
    /// A `jti` may come back: a federated token (Kubernetes) is presented until its
    /// issuer replaces it.
    pub reusable: bool,
}

impl JwtClient {
    /// `iss` = `sub` = `client_id`, each `jti` used once.
    pub fn new(client_id: &str, key: JwtKey, audience: &str) -> JwtClient {
        JwtClient {
            key,
            audience: audience.into(),
            issuer: client_id.into(),
            subject: Some(client_id.into()),
            reusable: false,
        }
    }
}

/// Authenticates a request of a `JwtClient` (RFC 7523 §2.2): no secret besides the
/// assertion, the right assertion type, and the assertion itself.
pub(super) fn authenticate(
    inner: &mut Inner,
    spec: &ClientSpec,
    has_basic: bool,
    params: &HashMap<String, String>,
    now: SystemTime,
) -> Result<(), Reject> {
    let client = spec.jwt.as_ref().expect("a Jwt client has its JwtClient");
    let verdict = if has_basic || params.contains_key("client_secret") {
        Err("a client secret next to an assertion")
    } else if params.get("client_assertion_type").map(String::as_str) != Some(ASSERTION_TYPE) {
        Err("missing or wrong client_assertion_type")
    } else {
        let assertion = params.get("client_assertion").map_or("", String::as_str);
        verify(client, assertion, now, &mut inner.seen_jtis)
    };
    verdict.map_err(|reason| {
        inner.counts.rejected += 1;
        inner.assertion_rejections.push(reason);
        oauth_error(401, "invalid_client", reason)
    })
}

/// RFC 7523 §2.1: a `jwt-bearer` grant, from an issuer registered with
/// `register_bearer_issuer`, with or without client authentication. The scope granted is
/// the assertion's `scope` claim (Google), else the request's.
pub(super) fn bearer_grant(
    inner: &mut Inner,
    params: &HashMap<String, String>,
    now: SystemTime,
) -> Result<Option<String>, Reject> {
    inner.counts.jwt_bearer_grants += 1;
    let assertion = params.get("assertion").map_or("", String::as_str);
    let issuer = peek_claims(assertion)
        .and_then(|c| c["iss"].as_str().map(str::to_string))
        .unwrap_or_default();
    let verdict = match inner.bearer_issuers.get(&issuer).cloned() {
        None => Err("unknown assertion issuer"),
        Some(client) => verify(&client, assertion, now, &mut inner.seen_jtis),
    };
    if let Err(reason) = verdict {
        inner.counts.rejected += 1;
        inner.assertion_rejections.push(reason);
        return Err(oauth_error(400, "invalid_grant", reason));
    }
    let claimed = peek_claims(assertion).and_then(|c| c["scope"].as_str().map(str::to_string));
    Ok(claimed.or_else(|| params.get("scope").cloned()))
}

/// The claims of a compact JWS, unverified: only to find whose key checks it.
fn peek_claims(assertion: &str) -> Option<Value> {
    let payload = assertion.split('.').nth(1)?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload)
        .ok()?;
    serde_json::from_slice(&bytes).ok()
}

/// Checks one assertion; the reason it fails is the error description.
fn verify(
    client: &JwtClient,
    assertion: &str,
    now: SystemTime,
    seen: &mut HashSet<String>,
) -> Result<(), &'static str> {
    let parts: Vec<&str> = assertion.split('.').collect();
    let [header, payload, sig] = parts[..] else {
        return Err("the assertion is not a compact JWS");
    };
    let decode = |part: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(part);
    let json = |part: &str| -> Option<Value> { serde_json::from_slice(&decode(part).ok()?).ok() };
    let (Some(head), Some(claims), Ok(sig)) = (json(header), json(payload), decode(sig)) else {
        return Err("the assertion does not decode");
    };
    if head["alg"].as_str() != Some(client.key.alg()) {
        return Err("unexpected alg");
    }
    if !client
        .key
        .verifies(format!("{header}.{payload}").as_bytes(), &sig)
    {
        return Err("bad signature");
    }
    if claims["iss"].as_str() != Some(&client.issuer)
        || claims["sub"].as_str() != client.subject.as_deref()
    {
        return Err("wrong iss or sub");
    }
    let aud_ok = match &claims["aud"] {
        Value::String(a) => *a == client.audience,
        Value::Array(list) => list.iter().any(|a| a.as_str() == Some(&client.audience)),
        _ => false,
    };
    if !aud_ok {
        return Err("wrong audience");
    }
    let now = now
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs();
    let (Some(exp), Some(iat)) = (claims["exp"].as_u64(), claims["iat"].as_u64()) else {
        return Err("exp and iat are required");
    };
    if exp <= now {
        return Err("the assertion has expired");
    }
    if iat > now + SKEW_SECS {
        return Err("the assertion is issued in the future");
    }
    if exp.saturating_sub(iat) > MAX_LIFETIME_SECS {
        return Err("the assertion lives too long");
    }
    match claims["jti"].as_str() {
        Some(jti) if !jti.is_empty() => {
            if !seen.insert(jti.to_string()) && !client.reusable {
                return Err("jti replayed");
            }
            Ok(())
        }
        _ if client.reusable => Ok(()),
        _ => Err("no jti"),
    }
}
