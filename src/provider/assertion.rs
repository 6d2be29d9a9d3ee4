//! Client assertions (RFC 7523 §2.2, OIDC Core §9): for `private_key_jwt` and
//! `client_secret_jwt`, a JWT made fresh for each request (its own `jti`), or the
//! ready-made one read again from its file; and the `jwt_bearer` grant's (§2.1).

use std::time::{Duration, SystemTime};

use aws_lc_rs::hmac;
use base64::Engine as _;
use rand::RngCore as _;
use serde_json::{Value, json};

use super::error::ProviderError;
use super::request::token_url;
use crate::config::{AccountConfig, AssertionSource, BearerAssertion};
use crate::secret::Secret;
use crate::signing::SigningAlg;

/// RFC 7523 §2.2's `client_assertion_type`.
pub const CLIENT_ASSERTION_TYPE: &str = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";

/// How long an assertion is valid: long enough for a slow request, short enough that a
/// leaked one is soon useless (Okta allows up to an hour, Entra ten minutes).
const LIFETIME: Duration = Duration::from_secs(300);
/// `iat` is set this far in the past: a provider whose clock is behind ours would
/// otherwise refuse an assertion "issued in the future".
const BACKDATE: Duration = Duration::from_secs(30);

/// The assertion for one request of `account`, if its `client_auth` sends one.
pub(super) fn client_assertion(
    account: &AccountConfig,
    now: SystemTime,
) -> Result<Option<Secret>, ProviderError> {
    let Some(assertion) = &account.assertion else {
        return Ok(None);
    };
    let (alg, key_id) = match &assertion.source {
        AssertionSource::File(path) => return read_ready_made(path).map(Some),
        AssertionSource::PrivateKey { key, key_id } => (key.alg(), key_id),
        AssertionSource::ClientSecret { key_id } => (SigningAlg::Hs256, key_id),
    };
    let sign = |message: &[u8]| match &assertion.source {
        AssertionSource::PrivateKey { key, .. } => key.sign(message),
        _ => hs256(account, message),
    };
    let audience = match &assertion.audience {
        Some(aud) => aud.clone(),
        None => token_url(account)?.to_string(),
    };
    let mut header = json!({ "alg": alg.name(), "typ": "JWT" });
    if let Some(kid) = key_id {
        header["kid"] = Value::from(kid.as_str());
    }
    let claims = claims(&account.client_id, &account.client_id, &audience, now);
    sign_jwt(&header, &claims, &sign).map(Some)
}

/// The `jwt_bearer` grant's assertion (RFC 7523 §2.1): `iss` the service account or
/// `assertion_issuer`, `sub` if configured, the scope in a `scope` claim for a Google key.
pub(super) fn bearer_assertion(
    account: &AccountConfig,
    bearer: &BearerAssertion,
    now: SystemTime,
) -> Result<Secret, ProviderError> {
    let audience = match &bearer.audience {
        Some(aud) => aud.clone(),
        None => token_url(account)?.to_string(),
    };
    let mut claims = claims(&bearer.issuer, "", &audience, now);
    match &bearer.subject {
        Some(sub) => claims["sub"] = Value::from(sub.as_str()),
        None => _ = claims.as_object_mut().map(|c| c.remove("sub")),
    }
    if bearer.scope_in_claim
        && let Some(scope) = &account.scope
    {
        claims["scope"] = Value::from(scope.as_str());
    }
    let mut header = json!({ "alg": bearer.key.alg().name(), "typ": "JWT" });
    if let Some(kid) = &bearer.key_id {
        header["kid"] = Value::from(kid.as_str());
    }
    sign_jwt(&header, &claims, &|m: &[u8]| bearer.key.sign(m))
}

/// RFC 7523 §3's claims: who (`iss`, `sub`), for whom (`aud`), when (`iat`, `exp`), and a
/// `jti` no other assertion has, so a provider can refuse a replay.
pub(super) fn claims(issuer: &str, subject: &str, audience: &str, now: SystemTime) -> Value {
    let secs = |t: SystemTime| {
        t.duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs()
    };
    let mut jti = [0u8; 16];
    rand::rng().fill_bytes(&mut jti);
    json!({
        "iss": issuer,
        "sub": subject,
        "aud": audience,
        "jti": base64url(&jti),
        "iat": secs(now - BACKDATE),
        "exp": secs(now + LIFETIME),
    })
}

/// Signs a JWS signing input; the error says why, never with the key.
pub(super) type Signer<'a> = dyn Fn(&[u8]) -> Result<Vec<u8>, String> + 'a;

/// A compact JWS (RFC 7515 §7.1): header and claims base64url-encoded, then signed.
pub(super) fn sign_jwt(
    header: &Value,
    claims: &Value,
    sign: &Signer<'_>,
) -> Result<Secret, ProviderError> {
    let input = format!(
        "{}.{}",
        base64url(header.to_string().as_bytes()),
        base64url(claims.to_string().as_bytes())
    );
    let signature = sign(input.as_bytes()).map_err(ProviderError::Assertion)?;
    Ok(Secret::new(format!("{input}.{}", base64url(&signature))))
}

fn hs256(account: &AccountConfig, message: &[u8]) -> Result<Vec<u8>, String> {
    let secret = account
        .client_secret
        .as_ref()
        .ok_or("client_secret_jwt has no client_secret")?;
    let key = hmac::Key::new(hmac::HMAC_SHA256, secret.expose().as_bytes());
    Ok(hmac::sign(&key, message).as_ref().to_vec())
}

/// The ready-made assertion, as its issuer last wrote it. Read synchronously: it is a
/// small file, and a blocking-pool read would let a paused test clock run on.
fn read_ready_made(path: &std::path::Path) -> Result<Secret, ProviderError> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        ProviderError::Assertion(format!(
            "cannot read the client assertion {}: {e}",
            path.display()
        ))
    })?;
    let text = text.trim();
    if text.is_empty() {
        return Err(ProviderError::Assertion(format!(
            "the client assertion {} is empty",
            path.display()
        )));
    }
    Ok(Secret::new(text))
}

fn base64url(bytes: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}
