//! The provider's failures: [`ProviderError`], how the retry policy should treat each
//! ([`ErrorClass`], [`RetryAfter`]), and their messages, which never hold a secret the
//! request carried. It does not decide what to do about a failure.

use std::time::{Duration, SystemTime};

use http::header::CONTENT_TYPE;
use http::{HeaderMap, HeaderValue};

use crate::secret::Secret;

/// A `Retry-After` header (RFC 9110 §10.2.3), as seconds or as a date.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum RetryAfter {
    Delay(Duration),
    At(SystemTime),
}

impl RetryAfter {
    pub(super) fn parse(value: &HeaderValue) -> Option<RetryAfter> {
        let text = value.to_str().ok()?.trim();
        if let Ok(secs) = text.parse::<u64>() {
            return Some(RetryAfter::Delay(Duration::from_secs(secs)));
        }
        httpdate::parse_http_date(text).ok().map(RetryAfter::At)
    }

    /// The delay it asks for, measured from `now`.
    pub fn delay_from(&self, now: SystemTime) -> Duration {
        match *self {
            RetryAfter::Delay(d) => d,
            RetryAfter::At(t) => t.duration_since(now).unwrap_or(Duration::ZERO),
        }
    }
}

/// Why a request to the provider failed. Messages never contain a secret: bodies are
/// scrubbed of every secret the request carried.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ProviderError {
    #[error("cannot reach the provider: {0}")]
    Transport(String),
    #[error("the provider did not answer within {}", humantime::format_duration(*.0))]
    Timeout(Duration),
    #[error("the provider answered HTTP {status} with OAuth error {error:?}{}", describe(.description))]
    OAuth {
        status: u16,
        error: String,
        description: Option<String>,
        retry_after: Option<RetryAfter>,
    },
    #[error("the provider answered HTTP {status} ({detail})")]
    Http {
        status: u16,
        detail: String,
        retry_after: Option<RetryAfter>,
    },
    #[error("the provider's answer is not usable: {0}")]
    Malformed(String),
    #[error("the provider's answer is larger than {0} bytes")]
    TooLarge(usize),
    #[error("no {0} is configured or discovered for this account")]
    NoEndpoint(&'static str),
}

fn describe(description: &Option<String>) -> String {
    description
        .as_ref()
        .map(|d| format!(": {d}"))
        .unwrap_or_default()
}

/// How the scheduler should treat a failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorClass {
    /// Worth retrying soon with backoff: the provider or the path to it is unwell.
    Transient,
    /// The refresh token itself was rejected (`invalid_grant`): only a new one helps.
    InvalidGrant,
    /// A configuration or registration problem (`invalid_client`, …): retried only slowly.
    Permanent,
}

impl ProviderError {
    pub fn class(&self) -> ErrorClass {
        match self {
            ProviderError::Transport(_)
            | ProviderError::Timeout(_)
            | ProviderError::Malformed(_)
            | ProviderError::TooLarge(_) => ErrorClass::Transient,
            ProviderError::NoEndpoint(_) => ErrorClass::Permanent,
            ProviderError::Http { status, .. } => {
                if is_transient_status(*status) {
                    ErrorClass::Transient
                } else {
                    ErrorClass::Permanent
                }
            }
            ProviderError::OAuth { status, error, .. } => match error.as_str() {
                "invalid_grant" => ErrorClass::InvalidGrant,
                "temporarily_unavailable" | "server_error" | "slow_down" => ErrorClass::Transient,
                _ if is_transient_status(*status) => ErrorClass::Transient,
                _ => ErrorClass::Permanent,
            },
        }
    }

    pub fn retry_after(&self) -> Option<RetryAfter> {
        match self {
            ProviderError::OAuth { retry_after, .. } | ProviderError::Http { retry_after, .. } => {
                *retry_after
            }
            _ => None,
        }
    }

    /// The OAuth error code, if the provider sent one.
    pub fn oauth_error(&self) -> Option<&str> {
        match self {
            ProviderError::OAuth { error, .. } => Some(error),
            _ => None,
        }
    }
}

fn is_transient_status(status: u16) -> bool {
    status == 408 || status == 429 || status >= 500
}

/// A client that cannot be built is almost always a TLS set-up problem (no CA
/// certificates on the host or in the image); say so, with the whole cause chain.
pub(super) fn client_error(e: &reqwest::Error) -> ProviderError {
    ProviderError::Transport(format!(
        "cannot build the HTTP client ({}); is a CA certificate bundle installed (ca-certificates, /etc/ssl/certs)?",
        transport_message(e)
    ))
}

/// reqwest's Display stops at the outermost layer ("error sending request"); the cause
/// chain says what actually failed (refused, DNS, TLS). URLs carry no secrets here.
pub(super) fn transport_message(e: &reqwest::Error) -> String {
    let mut message = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(cause) = source {
        message.push_str(": ");
        message.push_str(&cause.to_string());
        source = cause.source();
    }
    message
}

pub(super) fn body_summary(headers: &HeaderMap, body: &[u8], secrets: &[&Secret]) -> String {
    let content_type = headers
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("no content type");
    if body.is_empty() {
        return format!("{content_type}, empty body");
    }
    let text = String::from_utf8_lossy(body);
    let snippet: String = text.chars().take(160).collect();
    let snippet = scrub(snippet.trim(), secrets).replace(['\n', '\r'], " ");
    format!("{content_type}, {} bytes: {snippet:?}", body.len())
}

/// Replaces any secret the request carried with `[redacted]`: a provider that echoes the
/// request in its error page must not put our credentials into our logs.
pub(super) fn scrub(text: &str, secrets: &[&Secret]) -> String {
    let mut out = text.to_string();
    for s in secrets {
        if s.expose().len() >= 4 {
            out = out.replace(s.expose(), "[redacted]");
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use std::time::UNIX_EPOCH;

    use http::StatusCode;
    use http::header::RETRY_AFTER;

    use super::*;
    // Errors are made the way the client makes them: from an answer.
    use crate::provider::parse_response;

    #[test]
    fn oauth_errors_are_classified() {
        let err = |status: u16, code: &str| {
            parse_response(
                StatusCode::from_u16(status).unwrap(),
                &HeaderMap::new(),
                format!(r#"{{"error":"{code}","error_description":"why"}}"#).as_bytes(),
                &[],
            )
            .unwrap_err()
        };
        assert_eq!(err(400, "invalid_grant").class(), ErrorClass::InvalidGrant);
        assert_eq!(err(401, "invalid_client").class(), ErrorClass::Permanent);
        assert_eq!(
            err(400, "unsupported_grant_type").class(),
            ErrorClass::Permanent
        );
        assert_eq!(
            err(503, "temporarily_unavailable").class(),
            ErrorClass::Transient
        );
        assert_eq!(err(200, "server_error").class(), ErrorClass::Transient);
        let e = err(400, "invalid_grant");
        assert!(e.to_string().contains("invalid_grant") && e.to_string().contains("why"));
    }

    #[test]
    fn status_without_oauth_error_is_classified_by_status() {
        let e = |s: u16| {
            parse_response(
                StatusCode::from_u16(s).unwrap(),
                &HeaderMap::new(),
                b"oops",
                &[],
            )
            .unwrap_err()
            .class()
        };
        assert_eq!(e(500), ErrorClass::Transient);
        assert_eq!(e(502), ErrorClass::Transient);
        assert_eq!(e(429), ErrorClass::Transient);
        assert_eq!(e(404), ErrorClass::Permanent);
    }

    #[test]
    fn retry_after_is_read_as_seconds_or_date() {
        let mut headers = HeaderMap::new();
        headers.insert(RETRY_AFTER, HeaderValue::from_static("120"));
        let e = parse_response(StatusCode::TOO_MANY_REQUESTS, &headers, b"", &[]).unwrap_err();
        assert_eq!(
            e.retry_after(),
            Some(RetryAfter::Delay(Duration::from_secs(120)))
        );
        headers.insert(
            RETRY_AFTER,
            HeaderValue::from_static("Sun, 06 Nov 1994 08:49:37 GMT"),
        );
        let e = parse_response(StatusCode::SERVICE_UNAVAILABLE, &headers, b"", &[]).unwrap_err();
        let at = UNIX_EPOCH + Duration::from_secs(784_111_777);
        assert_eq!(e.retry_after(), Some(RetryAfter::At(at)));
        assert_eq!(
            e.retry_after()
                .unwrap()
                .delay_from(at - Duration::from_secs(30)),
            Duration::from_secs(30)
        );
    }

    #[test]
    fn error_bodies_are_scrubbed_of_request_secrets() {
        let rt = Secret::new("rt-super-secret");
        let e = parse_response(
            StatusCode::BAD_GATEWAY,
            &HeaderMap::new(),
            b"upstream failed for refresh_token=rt-super-secret",
            &[&rt],
        )
        .unwrap_err();
        assert!(!e.to_string().contains("rt-super-secret"), "{e}");
        assert!(e.to_string().contains("[redacted]"));
    }
}
