//! The token endpoint: client authentication in the registered style, the grants
//! (refresh with rotation and reuse detection, client credentials, code, device code),
//! the answer in the client's dialect, and the scripted faults.

use std::collections::HashMap;
use std::time::SystemTime;

use axum::Extension;
use axum::Json;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use serde_json::{Map, Value, json};

use super::assertion;
use super::interactive::s256;
use super::{
    BodyFormat, ClientAuth, ClientSpec, DEVICE_CODE_GRANT, DevicePoll, FakeProvider, Fault, Inner,
    JWT_BEARER_GRANT, PeerCertificate,
};

impl FakeProvider {
    /// Parses a request body (form or JSON) and authenticates the client the way it is
    /// registered.
    pub(super) fn authenticate(
        &self,
        inner: &mut Inner,
        headers: &HeaderMap,
        body: &[u8],
        peer: Option<&PeerCertificate>,
    ) -> Result<(String, HashMap<String, String>), Reject> {
        let is_json = headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|ct| ct.starts_with("application/json"));
        let params: HashMap<String, String> = if is_json {
            let object: Map<String, Value> = serde_json::from_slice(body)
                .map_err(|_| oauth_error(400, "invalid_request", "body is not a JSON object"))?;
            object
                .into_iter()
                .filter_map(|(k, v)| v.as_str().map(|s| (k, s.to_string())))
                .collect()
        } else {
            form_urlencoded::parse(body).into_owned().collect()
        };

        let basic = basic_credentials(headers);
        let client_id = basic
            .as_ref()
            .map(|(id, _)| id.clone())
            .or_else(|| params.get("client_id").cloned())
            .ok_or_else(|| oauth_error(401, "invalid_client", "no client authentication"))?;
        let Some(spec) = inner.clients.get(&client_id).cloned() else {
            inner.counts.rejected += 1;
            return Err(oauth_error(401, "invalid_client", "unknown client"));
        };
        // Strict about the registered style: a daemon that speaks the wrong dialect fails here.
        let wanted_json = spec.format == BodyFormat::Json;
        if wanted_json != is_json {
            inner.counts.rejected += 1;
            return Err(oauth_error(
                400,
                "invalid_request",
                "wrong request content type for this client",
            ));
        }
        check_certificate(inner, &spec, peer)?;
        let presented_secret = match spec.auth {
            ClientAuth::Tls => {
                let secret = ["client_secret", "client_assertion"]
                    .iter()
                    .any(|k| params.contains_key(*k));
                if basic.is_some() || secret {
                    inner.counts.rejected += 1;
                    return Err(oauth_error(
                        400,
                        "invalid_request",
                        "a tls_client_auth client sends no secret",
                    ));
                }
                return Ok((client_id, params));
            }
            ClientAuth::Basic => {
                if params.contains_key("client_secret") {
                    inner.counts.rejected += 1;
                    return Err(oauth_error(
                        400,
                        "invalid_request",
                        "client_secret must not be in the body",
                    ));
                }
                basic.map(|(_, s)| s)
            }
            ClientAuth::Jwt => {
                let now = self.clock.now();
                assertion::authenticate(inner, &spec, basic.is_some(), &params, now)?;
                return Ok((client_id, params));
            }
            ClientAuth::Post => {
                if basic.is_some() {
                    inner.counts.rejected += 1;
                    return Err(oauth_error(
                        400,
                        "invalid_request",
                        "this client authenticates in the body",
                    ));
                }
                params.get("client_secret").cloned()
            }
        };
        if presented_secret != spec.client_secret {
            inner.counts.rejected += 1;
            return Err(oauth_error(
                401,
                "invalid_client",
                "client authentication failed",
            ));
        }
        Ok((client_id, params))
    }

    fn answer(
        &self,
        headers: &HeaderMap,
        body: &[u8],
        peer: Option<&PeerCertificate>,
    ) -> Result<Value, Reject> {
        let mut inner = self.lock();
        let now = self.clock.now();
        if let Some(params) = unauthenticated_bearer(headers, body) {
            let scope = assertion::bearer_grant(&mut inner, &params, now)?;
            let spec = ClientSpec::zywave("", "");
            return Ok(inner.token_answer(&spec, "jwt-bearer", scope, None, now));
        }
        let (client_id, params) = self.authenticate(&mut inner, headers, body, peer)?;
        let spec = inner.clients[&client_id].clone();
        let (scope, new_refresh) = match params.get("grant_type").map(String::as_str) {
            Some("refresh_token") => inner.refresh_grant(&client_id, &params, now)?,
            Some("client_credentials") => {
                inner.counts.client_credentials_grants += 1;
                (params.get("scope").cloned(), None)
            }
            Some("authorization_code") => inner.code_grant(&client_id, &params)?,
            Some(DEVICE_CODE_GRANT) => inner.device_grant(&client_id, &params, now)?,
            Some(JWT_BEARER_GRANT) => (assertion::bearer_grant(&mut inner, &params, now)?, None),
            _ => {
                inner.counts.rejected += 1;
                return Err(oauth_error(
                    400,
                    "unsupported_grant_type",
                    "grant not supported",
                ));
            }
        };
        Ok(inner.token_answer(&spec, &client_id, scope, new_refresh, now))
    }
}

/// What a grant yields: the scope granted and, when one is issued, a refresh token.
type Granted = (Option<String>, Option<String>);

impl Inner {
    /// RFC 6749 §6, with rotation and reuse detection.
    fn refresh_grant(
        &mut self,
        client_id: &str,
        params: &HashMap<String, String>,
        now: SystemTime,
    ) -> Result<Granted, Reject> {
        self.counts.refresh_grants += 1;
        let presented = params.get("refresh_token").cloned().unwrap_or_default();
        let grace = self.reuse_grace;
        let rotate = self.rotate;
        let Some(record) = self.refresh_tokens.get_mut(&presented) else {
            self.counts.rejected += 1;
            return Err(oauth_error(400, "invalid_grant", "unknown refresh token"));
        };
        if record.client_id != client_id {
            self.counts.rejected += 1;
            return Err(oauth_error(
                400,
                "invalid_grant",
                "refresh token of another client",
            ));
        }
        if record.revoked {
            self.counts.rejected += 1;
            return Err(oauth_error(400, "invalid_grant", "refresh token revoked"));
        }
        let family = record.family;
        let scope = record.scope.clone();
        if let Some(at) = record.replaced_at {
            if now.duration_since(at).unwrap_or_default() > grace {
                self.revoke_family(family);
                self.counts.reuse_detected += 1;
                self.counts.rejected += 1;
                return Err(oauth_error(
                    400,
                    "invalid_grant",
                    "refresh token already used; its grant is revoked",
                ));
            }
            self.counts.forks += 1;
        } else if rotate {
            record.replaced_at = Some(now);
        }
        let new_refresh = if rotate {
            Some(self.rotated_refresh_token(client_id, scope.clone(), family))
        } else {
            None
        };
        Ok((scope.or_else(|| params.get("scope").cloned()), new_refresh))
    }

    /// RFC 6749 §4.1.3 with PKCE (RFC 7636 §4.6).
    fn code_grant(
        &mut self,
        client_id: &str,
        params: &HashMap<String, String>,
    ) -> Result<Granted, Reject> {
        let code = params.get("code").cloned().unwrap_or_default();
        let Some(record) = self.codes.get_mut(&code) else {
            self.counts.rejected += 1;
            return Err(oauth_error(400, "invalid_grant", "unknown code"));
        };
        // RFC 6749 §4.1.2: a code is used once.
        if record.used {
            self.counts.rejected += 1;
            return Err(oauth_error(400, "invalid_grant", "code already used"));
        }
        record.used = true;
        if record.client_id != client_id {
            self.counts.rejected += 1;
            return Err(oauth_error(400, "invalid_grant", "code of another client"));
        }
        if params.get("redirect_uri") != Some(&record.redirect_uri) {
            self.counts.rejected += 1;
            return Err(oauth_error(400, "invalid_grant", "redirect_uri differs"));
        }
        let verifier = params.get("code_verifier").cloned().unwrap_or_default();
        if s256(&verifier) != record.challenge {
            self.counts.rejected += 1;
            return Err(oauth_error(
                400,
                "invalid_grant",
                "code_verifier does not match the code_challenge",
            ));
        }
        let scope = record.scope.clone();
        let token = record
            .offline
            .then(|| self.new_refresh_token(client_id, scope.clone()));
        Ok((scope, token))
    }

    /// RFC 8628 §3.4, §3.5, with the scripted poll answers first.
    fn device_grant(
        &mut self,
        client_id: &str,
        params: &HashMap<String, String>,
        now: SystemTime,
    ) -> Result<Granted, Reject> {
        self.device_polls.push(now);
        let code = params.get("device_code").cloned().unwrap_or_default();
        if !self.devices.contains_key(&code) {
            self.counts.rejected += 1;
            return Err(oauth_error(400, "invalid_grant", "unknown device_code"));
        }
        match self.device_script.pop_front() {
            Some(DevicePoll::Pending) => {
                return Err(oauth_error(400, "authorization_pending", "not yet"));
            }
            Some(DevicePoll::SlowDown) => {
                return Err(oauth_error(400, "slow_down", "polling too fast"));
            }
            Some(DevicePoll::Denied) => {
                return Err(oauth_error(400, "access_denied", "the user said no"));
            }
            Some(DevicePoll::Expired) => {
                return Err(oauth_error(400, "expired_token", "too late"));
            }
            None => {}
        }
        let device = self.devices.get_mut(&code).expect("checked above");
        if !device.approved {
            return Err(oauth_error(400, "authorization_pending", "not yet"));
        }
        if device.used || device.client_id != client_id {
            self.counts.rejected += 1;
            return Err(oauth_error(400, "invalid_grant", "device_code used"));
        }
        device.used = true;
        let scope = device.scope.clone();
        let token = self.new_refresh_token(client_id, scope.clone());
        Ok((scope, Some(token)))
    }

    /// The success answer (RFC 6749 §5.1) in the client's dialect.
    fn token_answer(
        &mut self,
        spec: &ClientSpec,
        client_id: &str,
        scope: Option<String>,
        new_refresh: Option<String>,
        now: SystemTime,
    ) -> Value {
        let lifetime = self.lifetime;
        let access = if spec.jwt_without_expires_in {
            let exp = now + lifetime;
            let secs = exp
                .duration_since(SystemTime::UNIX_EPOCH)
                .unwrap_or_default()
                .as_secs();
            let payload = base64::engine::general_purpose::URL_SAFE_NO_PAD
                .encode(format!(r#"{{"exp":{secs},"n":{}}}"#, self.serial + 1));
            self.serial += 1;
            let token = format!("eyJhbGciOiJub25lIn0.{payload}.sig");
            self.minted.push(token.clone());
            token
        } else {
            self.mint("at")
        };
        self.access_tokens.insert(access.clone(), now + lifetime);
        if let Some(der) = &spec.tls_certificate {
            self.bound_tokens.insert(access.clone(), der.clone());
        }
        self.counts.issued += 1;

        let mut response = json!({ "access_token": access, "token_type": "bearer" });
        if !spec.jwt_without_expires_in {
            response["expires_in"] = if spec.expires_in_as_string {
                Value::from(lifetime.as_secs().to_string())
            } else {
                Value::from(lifetime.as_secs())
            };
        }
        if let Some(rt) = new_refresh {
            response["refresh_token"] = Value::from(rt);
        }
        if let Some(scope) = scope {
            let scope = if spec.comma_scope {
                scope.split_whitespace().collect::<Vec<_>>().join(", ")
            } else {
                scope
            };
            response["scope"] = Value::from(scope);
        }
        response["user_id"] = Value::from(format!("user-of-{client_id}"));
        response
    }
}

/// RFC 8705: a client registered with a certificate must have presented exactly that one
/// in the handshake; compared by DER, so another certificate for the same subject (or
/// from the same CA) is refused too.
fn check_certificate(
    inner: &mut Inner,
    spec: &ClientSpec,
    peer: Option<&PeerCertificate>,
) -> Result<(), Reject> {
    let Some(expected) = &spec.tls_certificate else {
        return Ok(());
    };
    let reason = match peer {
        Some(PeerCertificate(der)) if der == expected => {
            inner.counts.client_certificates += 1;
            return Ok(());
        }
        Some(_) => "not the client certificate registered for this client",
        None => "no client certificate in the TLS handshake",
    };
    inner.counts.rejected += 1;
    Err(oauth_error(401, "invalid_client", reason))
}

/// The form of a `jwt-bearer` grant that names no client (RFC 7523 §2.1 allows it).
fn unauthenticated_bearer(headers: &HeaderMap, body: &[u8]) -> Option<HashMap<String, String>> {
    let params: HashMap<String, String> = form_urlencoded::parse(body).into_owned().collect();
    let anonymous = basic_credentials(headers).is_none() && !params.contains_key("client_id");
    (anonymous && params.get("grant_type").map(String::as_str) == Some(JWT_BEARER_GRANT))
        .then_some(params)
}

fn basic_credentials(headers: &HeaderMap) -> Option<(String, String)> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let encoded = value.strip_prefix("Basic ")?;
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(encoded)
        .ok()?;
    let text = String::from_utf8(decoded).ok()?;
    let (id, secret) = text.split_once(':')?;
    // RFC 6749 §2.3.1: both parts are form-urlencoded.
    let decode = |s: &str| {
        form_urlencoded::parse(format!("x={s}").as_bytes())
            .next()
            .map(|(_, v)| v.into_owned())
            .unwrap_or_default()
    };
    Some((decode(id), decode(secret)))
}

/// An OAuth error answer (RFC 6749 §5.2): status, `error`, `error_description`.
pub(super) struct Reject(u16, &'static str, &'static str);

pub(super) fn oauth_error(status: u16, error: &'static str, description: &'static str) -> Reject {
    Reject(status, error, description)
}

pub(super) fn reject_response(Reject(status, error, description): Reject) -> Response {
    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_REQUEST);
    (
        status,
        Json(json!({ "error": error, "error_description": description })),
    )
        .into_response()
}

pub(super) async fn token_endpoint(
    State(provider): State<FakeProvider>,
    peer: Option<Extension<PeerCertificate>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    // Counted on arrival: a caller that times out during a hang never sees the answer.
    let fault = {
        let mut inner = provider.lock();
        inner.counts.token_requests += 1;
        inner.faults.pop_front()
    };
    match fault {
        None => {}
        Some(Fault::Hang(d)) => tokio::time::sleep(d).await,
        Some(Fault::Status(code)) => {
            let status = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            return (status, "upstream trouble").into_response();
        }
        Some(Fault::RetryAfter(code, after)) => {
            let status = StatusCode::from_u16(code).unwrap_or(StatusCode::SERVICE_UNAVAILABLE);
            return (status, [(header::RETRY_AFTER, after)], "slow down").into_response();
        }
        Some(Fault::OAuthError(code, error)) => {
            return reject_response(oauth_error(code, error, "scripted error"));
        }
        Some(Fault::Garbage) => {
            return (StatusCode::OK, "<html>not json</html>").into_response();
        }
        Some(Fault::Oversized(n)) => {
            let pad = "x".repeat(n);
            return Json(json!({ "access_token": "big", "padding": pad })).into_response();
        }
        Some(Fault::NoAccessToken) => {
            return Json(json!({ "token_type": "bearer", "expires_in": 60 })).into_response();
        }
        Some(Fault::LoseResponse) => {
            let _ = provider.answer(&headers, &body, peer.as_ref().map(|p| &p.0));
            return (StatusCode::BAD_GATEWAY, "response lost").into_response();
        }
    }
    let answer = provider.answer(&headers, &body, peer.as_ref().map(|p| &p.0));
    let latency = provider.lock().latency;
    if !latency.is_zero() {
        // A guard, because the server drops this future when the client hangs up.
        struct Unanswered(FakeProvider);
        impl Drop for Unanswered {
            fn drop(&mut self) {
                self.0.lock().unanswered -= 1;
            }
        }
        {
            let mut inner = provider.lock();
            inner.unanswered += 1;
            inner.peak_unanswered = inner.peak_unanswered.max(inner.unanswered);
        }
        let _pending = Unanswered(provider.clone());
        tokio::time::sleep(latency).await;
    }
    match answer {
        Ok(value) => {
            let mut response = Json(value).into_response();
            response.headers_mut().insert(
                header::CACHE_CONTROL,
                header::HeaderValue::from_static("no-store"),
            );
            response
        }
        Err(reject) => reject_response(reject),
    }
}
