//! Reading the provider's answers into typed values: token responses (RFC 6749 §5.1,
//! leniently where real providers differ), device authorizations (RFC 8628 §3.2) and
//! error answers (§5.2). It sends nothing.

use std::collections::BTreeMap;
use std::fmt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use http::header::RETRY_AFTER;
use http::{HeaderMap, StatusCode};
use serde_json::Value;

use super::error::{
    ProviderError, RetryAfter, describe_body, json_kind, json_problem, oauth_field,
};
use crate::secret::Secret;

/// A device authorization response (RFC 8628 §3.2).
pub struct DeviceAuthorization {
    pub device_code: Secret,
    pub user_code: String,
    pub verification_uri: String,
    pub verification_uri_complete: Option<String>,
    pub expires_in: Duration,
    /// Least time between polls; 5 s when the provider names none.
    pub interval: Duration,
}

impl fmt::Debug for DeviceAuthorization {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DeviceAuthorization")
            .field("device_code", &self.device_code)
            .field("user_code", &self.user_code)
            .field("verification_uri", &self.verification_uri)
            .field("expires_in", &self.expires_in)
            .field("interval", &self.interval)
            .finish_non_exhaustive()
    }
}

/// A successful token response (RFC 6749 §5.1), normalized.
#[derive(Clone)]
pub struct TokenResponse {
    pub access_token: Secret,
    /// `Bearer` whatever case the provider used; other types as sent.
    pub token_type: String,
    pub expires_in: Option<Duration>,
    pub refresh_token: Option<Secret>,
    /// Space-separated, whether the provider separated with spaces or commas.
    pub scope: Option<String>,
    pub refresh_token_expires_in: Option<Duration>,
    /// Fields this daemon does not interpret (`id_token`, `user_id`, …), kept as sent.
    pub extra: BTreeMap<String, Value>,
}

impl TokenResponse {
    /// How long the access token lives from `now`: `expires_in`, else its JWT `exp`,
    /// else the policy's default (see [`crate::schedule::lifetime`]).
    pub fn lifetime(&self, now: SystemTime, policy: &crate::config::RefreshPolicy) -> Duration {
        crate::schedule::lifetime(
            self.expires_in,
            jwt_exp(self.access_token.expose()),
            now,
            policy,
        )
    }
}

impl fmt::Debug for TokenResponse {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TokenResponse")
            .field("access_token", &self.access_token)
            .field("token_type", &self.token_type)
            .field("expires_in", &self.expires_in)
            .field("refresh_token", &self.refresh_token)
            .field("scope", &self.scope)
            .field("refresh_token_expires_in", &self.refresh_token_expires_in)
            // Values may be credentials (id_token); names are enough to debug with.
            .field("extra", &self.extra.keys().collect::<Vec<_>>())
            .finish()
    }
}

/// The error an answer carries, if it is one: an OAuth error (§5.2) with any status,
/// even 200 from lax providers, or a non-2xx status.
pub(super) fn error_answer(
    status: StatusCode,
    headers: &HeaderMap,
    body: &[u8],
    secrets: &[&Secret],
) -> Option<ProviderError> {
    let retry_after = headers.get(RETRY_AFTER).and_then(RetryAfter::parse);
    let json: Option<serde_json::Map<String, Value>> = serde_json::from_slice(body).ok();
    if let Some(obj) = &json
        && let Some(Value::String(error)) = obj.get("error")
    {
        let field = |key: &str, max: usize| {
            obj.get(key)
                .and_then(Value::as_str)
                .map(|d| oauth_field(d, secrets, max))
        };
        return Some(ProviderError::OAuth {
            status: status.as_u16(),
            error: oauth_field(error, secrets, 64),
            description: field("error_description", 300),
            uri: field("error_uri", 200).map(String::into_boxed_str),
            retry_after,
        });
    }
    (!status.is_success()).then(|| ProviderError::Http {
        status: status.as_u16(),
        detail: describe_body(headers, body),
        retry_after,
    })
}

/// A successful answer's JSON object, or the typed error.
pub(super) fn success_object(
    status: StatusCode,
    headers: &HeaderMap,
    body: &[u8],
    secrets: &[&Secret],
) -> Result<serde_json::Map<String, Value>, ProviderError> {
    if let Some(e) = error_answer(status, headers, body, secrets) {
        return Err(e);
    }
    serde_json::from_slice(body).map_err(|_| {
        ProviderError::Malformed(format!(
            "expected a JSON object, got {}: {}",
            describe_body(headers, body),
            json_problem(body)
        ))
    })
}

/// Turns the provider's answer into a token or a typed error.
pub fn parse_response(
    status: StatusCode,
    headers: &HeaderMap,
    body: &[u8],
    secrets: &[&Secret],
) -> Result<TokenResponse, ProviderError> {
    let mut obj = success_object(status, headers, body, secrets)?;

    let access_token = match obj.remove("access_token") {
        Some(Value::String(s)) if !s.is_empty() => Secret::new(s),
        Some(other) => {
            return Err(ProviderError::Malformed(format!(
                "access_token is {}, not a non-empty string",
                json_kind(&other)
            )));
        }
        None => {
            return Err(ProviderError::Malformed(
                "the response has no access_token".into(),
            ));
        }
    };
    let token_type = match obj.remove("token_type") {
        Some(Value::String(t)) if t.eq_ignore_ascii_case("bearer") => "Bearer".to_string(),
        Some(Value::String(t)) if !t.is_empty() => t,
        // Lenient: a few providers omit it; every provider this daemon targets is Bearer.
        _ => "Bearer".to_string(),
    };
    let expires_in = obj.remove("expires_in").and_then(|v| seconds(&v));
    let refresh_token = match obj.remove("refresh_token") {
        Some(Value::String(s)) if !s.is_empty() => Some(Secret::new(s)),
        _ => None,
    };
    let scope = obj.remove("scope").and_then(|v| normalize_scope(&v));
    let refresh_token_expires_in = ["refresh_token_expires_in", "refresh_expires_in"]
        .iter()
        .filter_map(|k| obj.remove(*k))
        .find_map(|v| seconds(&v));
    Ok(TokenResponse {
        access_token,
        token_type,
        expires_in,
        refresh_token,
        scope,
        refresh_token_expires_in,
        extra: obj.into_iter().collect(),
    })
}

/// Turns the answer to a device authorization request into its codes or a typed error.
pub(super) fn parse_device_authorization(
    status: StatusCode,
    headers: &HeaderMap,
    body: &[u8],
    secrets: &[&Secret],
) -> Result<DeviceAuthorization, ProviderError> {
    let mut obj = success_object(status, headers, body, secrets)?;
    let text = |obj: &mut serde_json::Map<String, Value>, key: &str| match obj.remove(key) {
        Some(Value::String(s)) if !s.is_empty() => Some(s),
        _ => None,
    };
    let missing = |key: &str| ProviderError::Malformed(format!("the response has no {key}"));
    let device_code = text(&mut obj, "device_code").ok_or_else(|| missing("device_code"))?;
    let user_code = text(&mut obj, "user_code").ok_or_else(|| missing("user_code"))?;
    // Google and a few others say verification_url.
    let verification_uri = text(&mut obj, "verification_uri")
        .or_else(|| text(&mut obj, "verification_url"))
        .ok_or_else(|| missing("verification_uri"))?;
    Ok(DeviceAuthorization {
        device_code: Secret::new(device_code),
        user_code,
        verification_uri,
        verification_uri_complete: text(&mut obj, "verification_uri_complete"),
        // Required by §3.2; a provider that omits it gets half an hour.
        expires_in: obj
            .get("expires_in")
            .and_then(seconds)
            .unwrap_or(Duration::from_secs(1800)),
        interval: obj
            .get("interval")
            .and_then(seconds)
            .filter(|d| !d.is_zero())
            .unwrap_or(Duration::from_secs(5)),
    })
}

/// `expires_in` as a JSON number or a numeric string (`"3599"`); anything else, or a
/// negative value, counts as absent so the JWT / default lifetime applies.
fn seconds(v: &Value) -> Option<Duration> {
    let secs = match v {
        Value::Number(n) => n.as_f64()?,
        Value::String(s) => s.trim().parse::<f64>().ok()?,
        _ => return None,
    };
    (secs.is_finite() && secs >= 0.0).then(|| Duration::from_secs(secs as u64))
}

/// Scope as a space-separated list, whether sent as `"a b"`, `"a, b"` or `["a", "b"]`.
pub fn normalize_scope(v: &Value) -> Option<String> {
    let items: Vec<String> = match v {
        Value::String(s) => s
            .split(|c: char| c == ',' || c.is_whitespace())
            .filter(|s| !s.is_empty())
            .map(str::to_string)
            .collect(),
        Value::Array(a) => a
            .iter()
            .filter_map(Value::as_str)
            .map(str::to_string)
            .collect(),
        _ => return None,
    };
    (!items.is_empty()).then(|| items.join(" "))
}

/// The `exp` claim of a JWT access token, when the token is one (RFC 7519 §4.1.4).
/// The signature is not checked: the provider is the issuer, and the claim only
/// schedules a refresh.
pub fn jwt_exp(token: &str) -> Option<SystemTime> {
    let mut parts = token.split('.');
    let (_, payload, _) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() {
        return None;
    }
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload.trim_end_matches('='))
        .ok()?;
    let claims: serde_json::Map<String, Value> = serde_json::from_slice(&bytes).ok()?;
    let exp = claims.get("exp")?.as_f64()?;
    (exp.is_finite() && exp > 0.0).then(|| UNIX_EPOCH + Duration::from_secs(exp as u64))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::provider::ErrorClass;

    fn ok(body: &str) -> Result<TokenResponse, ProviderError> {
        parse_response(StatusCode::OK, &HeaderMap::new(), body.as_bytes(), &[])
    }

    #[test]
    fn string_expires_in_and_lowercase_bearer_are_accepted() {
        let t = ok(r#"{"access_token":"a","token_type":"bearer","expires_in":"3599"}"#).unwrap();
        assert_eq!(t.expires_in, Some(Duration::from_secs(3599)));
        assert_eq!(t.token_type, "Bearer");
        assert!(t.refresh_token.is_none());
    }

    #[test]
    fn comma_separated_scope_is_normalized_and_unknown_fields_kept() {
        let t = ok(
            r#"{"access_token":"a","token_type":"bearer","expires_in":3600,
            "refresh_token":"r","scope":"user.account:read, user.profile:read","user_id":"u-1"}"#,
        )
        .unwrap();
        assert_eq!(
            t.scope.as_deref(),
            Some("user.account:read user.profile:read")
        );
        assert_eq!(t.refresh_token.unwrap().expose(), "r");
        assert_eq!(t.extra.get("user_id"), Some(&Value::String("u-1".into())));
    }

    #[test]
    fn a_success_without_access_token_is_malformed_and_transient() {
        let e = ok(r#"{"token_type":"Bearer"}"#).unwrap_err();
        assert!(matches!(e, ProviderError::Malformed(_)));
        assert_eq!(e.class(), ErrorClass::Transient);
        let e = ok("<html>gateway</html>").unwrap_err();
        assert_eq!(e.class(), ErrorClass::Transient);
    }

    #[test]
    fn device_authorization_accepts_verification_url_and_fills_defaults() {
        let d = parse_device_authorization(
            StatusCode::OK,
            &HeaderMap::new(),
            br#"{"device_code":"dc","user_code":"ABCD-EFGH",
                "verification_url":"https://example.com/device","interval":0}"#,
            &[],
        )
        .unwrap();
        assert_eq!(d.device_code.expose(), "dc");
        assert_eq!(d.verification_uri, "https://example.com/device");
        assert_eq!(d.expires_in, Duration::from_secs(1800));
        assert_eq!(d.interval, Duration::from_secs(5));
        let e = parse_device_authorization(
            StatusCode::OK,
            &HeaderMap::new(),
            br#"{"device_code":"dc","verification_uri":"https://example.com/device"}"#,
            &[],
        )
        .unwrap_err();
        assert!(e.to_string().contains("user_code"), "{e}");
    }

    #[test]
    fn jwt_exp_is_read_from_the_payload() {
        let payload =
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(br#"{"exp":1700000000}"#);
        let token = format!("eyJhbGciOiJub25lIn0.{payload}.sig");
        assert_eq!(
            jwt_exp(&token),
            Some(UNIX_EPOCH + Duration::from_secs(1_700_000_000))
        );
        assert_eq!(jwt_exp("opaque-token"), None);
        assert_eq!(jwt_exp("a.b.c"), None);
    }
}
