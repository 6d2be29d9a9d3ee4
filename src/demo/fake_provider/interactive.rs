//! The endpoints of the interactive flows: authorization (PKCE required), device
//! authorization, revocation, RFC 8414 metadata, and a resource that checks a token.

use std::collections::HashMap;

use axum::Extension;
use axum::Json;
use axum::body::Bytes;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use serde_json::json;
use sha2::{Digest, Sha256};

use super::token::reject_response;
use super::{CodeRecord, DEVICE_CODE_GRANT, DeviceRecord, FakeProvider, PeerCertificate};

/// RFC 7636 §4.2: BASE64URL(SHA256(verifier)).
pub(super) fn s256(verifier: &str) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(Sha256::digest(verifier.as_bytes()))
}

/// `GET /authorize` (RFC 6749 §4.1.1, RFC 7636 §4.3): the user is taken to have logged
/// in and consented at once. Errors about the client or redirect URI are shown to the
/// user (never redirected, §4.1.2.1); the others go back to the redirect URI.
pub(super) async fn authorize(
    State(provider): State<FakeProvider>,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    let mut inner = provider.lock();
    let client_id = q.get("client_id").cloned().unwrap_or_default();
    if !inner.clients.contains_key(&client_id) {
        return (StatusCode::BAD_REQUEST, "unknown client_id").into_response();
    }
    let redirect_uri = q.get("redirect_uri").cloned().unwrap_or_default();
    if !inner.redirect_uri_registered(&client_id, &redirect_uri) {
        return (
            StatusCode::BAD_REQUEST,
            "redirect_uri is not registered for this client",
        )
            .into_response();
    }
    let back = |pairs: &[(&str, &str)]| {
        let mut url = url::Url::parse(&redirect_uri).expect("checked when registered");
        {
            let mut query = url.query_pairs_mut();
            for (k, v) in pairs {
                query.append_pair(k, v);
            }
            if let Some(state) = q.get("state") {
                query.append_pair("state", state);
            }
        }
        (StatusCode::FOUND, [(header::LOCATION, url.to_string())]).into_response()
    };
    if q.get("response_type").map(String::as_str) != Some("code") {
        return back(&[("error", "unsupported_response_type")]);
    }
    let challenge = q.get("code_challenge").cloned().unwrap_or_default();
    if challenge.len() < 43 || q.get("code_challenge_method").map(String::as_str) != Some("S256") {
        return back(&[
            ("error", "invalid_request"),
            ("error_description", "PKCE with S256 is required"),
        ]);
    }
    if std::mem::take(&mut inner.deny_next) {
        return back(&[("error", "access_denied")]);
    }
    let code = inner.mint("code");
    let scope = q.get("scope").cloned();
    let has = |list: Option<&String>, word: &str| {
        list.is_some_and(|l| l.split([' ', ',']).any(|w| w == word))
    };
    let offline = !inner.offline_needs_consent
        || (has(scope.as_ref(), "offline_access") && has(q.get("prompt"), "consent"));
    inner.codes.insert(
        code.clone(),
        CodeRecord {
            client_id,
            redirect_uri: redirect_uri.clone(),
            challenge,
            scope,
            offline,
            used: false,
        },
    );
    back(&[("code", &code)])
}

/// `POST /device_authorization` (RFC 8628 §3.1, §3.2).
pub(super) async fn device_authorization(
    State(provider): State<FakeProvider>,
    peer: Option<Extension<PeerCertificate>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let mut inner = provider.lock();
    let (client_id, params) =
        match provider.authenticate(&mut inner, &headers, &body, peer.as_ref().map(|p| &p.0)) {
            Ok(x) => x,
            Err(reject) => return reject_response(reject),
        };
    let device_code = inner.mint("dc");
    let n = inner.serial;
    let user_code = format!("WDJB-{n:04}");
    inner.devices.insert(
        device_code.clone(),
        DeviceRecord {
            client_id,
            user_code: user_code.clone(),
            scope: params.get("scope").cloned(),
            approved: false,
            used: false,
        },
    );
    let base = inner.base();
    Json(json!({
        "device_code": device_code,
        "user_code": user_code,
        "verification_uri": format!("{base}/device"),
        "verification_uri_complete": format!("{base}/device?user_code={user_code}"),
        "expires_in": 600,
        "interval": inner.device_interval,
    }))
    .into_response()
}

/// `POST /revoke` (RFC 7009 §2): the token dies; unknown tokens are fine too (§2.2).
pub(super) async fn revoke(
    State(provider): State<FakeProvider>,
    peer: Option<Extension<PeerCertificate>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let mut inner = provider.lock();
    let (client_id, params) =
        match provider.authenticate(&mut inner, &headers, &body, peer.as_ref().map(|p| &p.0)) {
            Ok(x) => x,
            Err(reject) => return reject_response(reject),
        };
    let token = params.get("token").cloned().unwrap_or_default();
    let owned = inner
        .refresh_tokens
        .get(&token)
        .is_some_and(|r| r.client_id == client_id);
    if owned {
        inner.refresh_tokens.remove(&token);
    }
    inner.access_tokens.remove(&token);
    inner.revoked.push(token);
    StatusCode::OK.into_response()
}

/// `GET /.well-known/oauth-authorization-server` (RFC 8414 §3.2).
pub(super) async fn metadata(State(provider): State<FakeProvider>) -> Response {
    let inner = provider.lock();
    let Some(base) = inner.base_url.clone() else {
        return (StatusCode::NOT_FOUND, "no base URL set").into_response();
    };
    if !inner.metadata_up {
        return (StatusCode::SERVICE_UNAVAILABLE, "down").into_response();
    }
    Json(json!({
        "issuer": base,
        "authorization_endpoint": format!("{base}/authorize"),
        "token_endpoint": format!("{base}/token"),
        "device_authorization_endpoint": format!("{base}/device_authorization"),
        "revocation_endpoint": format!("{base}/revoke"),
        "scopes_supported": ["openid", "offline_access", "accounts:read"],
        "response_types_supported": ["code"],
        "grant_types_supported": ["authorization_code", "refresh_token", "client_credentials", DEVICE_CODE_GRANT],
        "code_challenge_methods_supported": ["S256"],
    }))
    .into_response()
}

/// A resource of the provider's API: who the token's holder is. A token bound to a
/// client certificate (RFC 8705 §3) is accepted only with that certificate in the
/// handshake, as a resource server checks `cnf.x5t#S256`.
pub(super) async fn whoami(
    State(provider): State<FakeProvider>,
    peer: Option<Extension<PeerCertificate>>,
    headers: HeaderMap,
) -> Response {
    let token = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    let refuse = |why: &'static str| {
        (
            StatusCode::UNAUTHORIZED,
            [(header::WWW_AUTHENTICATE, "Bearer error=\"invalid_token\"")],
            why,
        )
            .into_response()
    };
    let Some(token) = token.filter(|t| provider.is_valid_access_token(t)) else {
        return refuse("invalid or expired token");
    };
    let bound = provider.lock().bound_tokens.get(token).cloned();
    let presented = peer.map(|Extension(PeerCertificate(der))| der);
    if bound
        .as_ref()
        .is_some_and(|der| Some(der) != presented.as_ref())
    {
        return refuse("a certificate-bound token without its certificate");
    }
    Json(json!({
        "ok": true,
        "profile": headers.get("profile").and_then(|v| v.to_str().ok()),
        "certificate_bound": bound.is_some(),
    }))
    .into_response()
}
