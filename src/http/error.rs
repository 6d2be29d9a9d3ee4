//! The API's errors: each a status, a stable `error` code and a human
//! `error_description` in one JSON shape, never a secret.

use std::time::Duration;

use axum::Json;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

use crate::access::AccessError;
use crate::token_cell::Status;

/// API errors: a stable `error` code and a human `error_description`, never a secret.
#[derive(Debug)]
pub enum ApiError {
    MissingRequestHeader,
    /// A proxy or a browser is in the path (Origin, X-Forwarded-For, Forwarded).
    Proxied(&'static str),
    /// The Host header names something other than this daemon on this machine's loopback.
    ForeignHost,
    /// No Host on HTTP/1.1, or two of them (RFC 9112 §3.2).
    BadHost(&'static str),
    Unauthorized(AccessError),
    /// The consumer may not read this account.
    NotPermitted(String),
    UnknownAccount(String),
    BadRequest(String),
    Unavailable {
        account: String,
        state: Status,
        description: String,
        /// When to ask again, if known: sent as `Retry-After` (whole seconds, rounded up).
        retry_after: Option<Duration>,
    },
    NotFound,
    /// The account has no `[accounts.NAME.proxy]`.
    NoProxy(String),
    /// The proxied request cannot be forwarded as asked (a path climbing out of the
    /// upstream's base).
    BadProxyPath(String),
    /// The upstream could not be reached, or broke off before answering.
    BadGateway {
        account: String,
        description: String,
    },
    /// The upstream did not answer within `proxy.timeout`.
    GatewayTimeout {
        account: String,
        description: String,
    },
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let challenge = matches!(self, ApiError::Unauthorized(_));
        let retry_after = match &self {
            ApiError::Unavailable { retry_after, .. } => *retry_after,
            _ => None,
        };
        let (status, error, description, state) = match self {
            ApiError::MissingRequestHeader => (
                StatusCode::FORBIDDEN,
                "forbidden",
                "token requests must carry a non-empty Tokend-Request header".to_string(),
                None,
            ),
            ApiError::Proxied(header) => (
                StatusCode::FORBIDDEN,
                "forbidden",
                format!(
                    "requests carrying {header} are refused: tokens are served to local processes, not through proxies or browsers"
                ),
                None,
            ),
            ApiError::ForeignHost => (
                StatusCode::FORBIDDEN,
                "forbidden",
                "the Host header must name a loopback address or localhost, with the port this listener is on".to_string(),
                None,
            ),
            ApiError::BadHost(why) => (
                StatusCode::BAD_REQUEST,
                "invalid_request",
                why.to_string(),
                None,
            ),
            ApiError::Unauthorized(e) => (
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                e.to_string(),
                None,
            ),
            ApiError::NotPermitted(account) => (
                StatusCode::FORBIDDEN,
                "forbidden",
                format!("this consumer may not read account {account:?}"),
                None,
            ),
            ApiError::UnknownAccount(name) => (
                StatusCode::NOT_FOUND,
                "unknown_account",
                format!("no account named {name:?} is configured"),
                None,
            ),
            ApiError::BadRequest(d) => (StatusCode::BAD_REQUEST, "invalid_request", d, None),
            ApiError::Unavailable {
                account,
                state,
                description,
                ..
            } => (
                StatusCode::SERVICE_UNAVAILABLE,
                "token_unavailable",
                format!("account {account}: {description}"),
                Some(state),
            ),
            ApiError::NotFound => (
                StatusCode::NOT_FOUND,
                "not_found",
                "no such route".to_string(),
                None,
            ),
            ApiError::NoProxy(account) => (
                StatusCode::NOT_FOUND,
                "no_proxy",
                format!("account {account:?} has no [accounts.{account}.proxy] upstream"),
                None,
            ),
            ApiError::BadProxyPath(why) => (StatusCode::BAD_REQUEST, "invalid_request", why, None),
            ApiError::BadGateway {
                account,
                description,
            } => (
                StatusCode::BAD_GATEWAY,
                "bad_gateway",
                format!("account {account}: {description}"),
                None,
            ),
            ApiError::GatewayTimeout {
                account,
                description,
            } => (
                StatusCode::GATEWAY_TIMEOUT,
                "gateway_timeout",
                format!("account {account}: {description}"),
                None,
            ),
        };
        let mut body = json!({ "error": error, "error_description": description });
        if let Some(s) = state {
            body["state"] = Value::from(s.as_str());
        }
        let mut response = (status, Json(body)).into_response();
        let headers = response.headers_mut();
        headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        if challenge {
            // RFC 6750 §3: a 401 names the scheme the client should use.
            headers.insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        if let Some(after) = retry_after {
            let secs = after.as_secs() + u64::from(after.subsec_nanos() > 0);
            headers.insert(header::RETRY_AFTER, HeaderValue::from(secs.max(1)));
        }
        response
    }
}
