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

/// Why a request to the provider failed. Messages never contain a secret: a body is
/// described (type, length, where its JSON breaks), never quoted; only the OAuth error
/// fields, which are meant for humans, are shown, bounded and scrubbed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ProviderError {
    #[error("cannot reach the provider: {0}")]
    Transport(String),
    #[error("the provider did not answer within {}", humantime::format_duration(*.0))]
    Timeout(Duration),
    #[error("the provider answered HTTP {status} with OAuth error {error:?}{}{}", describe(.description), see(.uri))]
    OAuth {
        status: u16,
        error: String,
        description: Option<String>,
        /// `error_uri`: a page about the error (boxed: the error stays small).
        uri: Option<Box<str>>,
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
    /// The client assertion could not be made (its file unreadable, signing failed):
    /// nothing was sent.
    #[error("{0}")]
    Assertion(String),
    /// The provider refused the TLS handshake over the client certificate (RFC 8705):
    /// none presented where one is required, or not one it accepts. A registration or
    /// configuration problem, so retried only slowly.
    #[error("cannot reach the provider: {0}")]
    ClientCertificate(String),
}

fn describe(description: &Option<String>) -> String {
    description
        .as_ref()
        .map(|d| format!(": {d}"))
        .unwrap_or_default()
}

fn see(uri: &Option<Box<str>>) -> String {
    uri.as_ref()
        .map(|u| format!(" (see {u})"))
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
            // The file's writer (the kubelet, an agent) replaces it now and then: retried
            // with backoff like an outage rather than slowly like a registration problem.
            ProviderError::Assertion(_) => ErrorClass::Transient,
            ProviderError::NoEndpoint(_) | ProviderError::ClientCertificate(_) => {
                ErrorClass::Permanent
            }
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

/// A failed send as a `ProviderError`: a handshake the server refused over the client
/// certificate is told apart (and classed permanent) from any other transport failure.
pub(super) fn transport_error(e: &reqwest::Error) -> ProviderError {
    match tls_failure(e) {
        Some(rustls::Error::AlertReceived(alert)) if refuses_client_certificate(*alert) => {
            ProviderError::ClientCertificate(transport_message(e))
        }
        _ => ProviderError::Transport(transport_message(e)),
    }
}

/// The alerts a server sends about the client's certificate (RFC 8446 §6.2): the client
/// only receives these when its own certificate (or its absence) is the problem.
fn refuses_client_certificate(alert: rustls::AlertDescription) -> bool {
    use rustls::AlertDescription as A;
    matches!(
        alert,
        A::CertificateRequired
            | A::BadCertificate
            | A::UnsupportedCertificate
            | A::CertificateRevoked
            | A::CertificateExpired
            | A::CertificateUnknown
            | A::UnknownCA
            | A::AccessDenied
    )
}

/// reqwest's Display stops at the outermost layer ("error sending request"); the cause
/// chain says what actually failed (refused, DNS, TLS). A failed TLS handshake is told
/// as one, in words, instead of rustls' internals. A URL is told by its origin only.
pub fn transport_message(e: &reqwest::Error) -> String {
    if let Some(tls) = tls_failure(e) {
        let place = e
            .url()
            .and_then(|u| Some(format!("{}:{}", u.host_str()?, u.port_or_known_default()?)))
            .unwrap_or_else(|| "the provider".into());
        return format!("TLS handshake with {place} failed: {}", tls_reason(tls));
    }
    let mut message = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(cause) = source {
        message.push_str(": ");
        message.push_str(&cause.to_string());
        source = cause.source();
    }
    match e.url() {
        Some(url) => message.replace(url.as_str(), &url_origin(url.as_str())),
        None => message,
    }
}

/// A URL as `scheme://host:port`, for messages that end up in `last_error` (shown by
/// `/readyz`, `/v1/accounts`, token 503s and `tokend status`): a URL's path and query
/// can hold a tenant or a client id, which are not for every reader of those.
pub(super) fn url_origin(url: &str) -> String {
    reqwest::Url::parse(url)
        .ok()
        .and_then(|u| {
            let host = u.host_str()?;
            Some(format!(
                "{}://{host}:{}",
                u.scheme(),
                u.port_or_known_default()?
            ))
        })
        .unwrap_or_else(|| "the provider".into())
}

/// The rustls error in `e`'s cause chain, directly or inside the I/O errors hyper and
/// its connector wrap it in (their `source` skips the wrapped error, `get_ref` does not).
fn tls_failure(e: &reqwest::Error) -> Option<&rustls::Error> {
    let mut source = std::error::Error::source(e);
    while let Some(cause) = source {
        let mut inner: &(dyn std::error::Error + 'static) = cause;
        while let Some(io) = inner.downcast_ref::<std::io::Error>()
            && let Some(wrapped) = io.get_ref()
        {
            inner = wrapped;
        }
        if let Some(tls) = inner.downcast_ref::<rustls::Error>() {
            return Some(tls);
        }
        source = cause.source();
    }
    None
}

/// A handshake failure in an operator's words, with what to check.
fn tls_reason(e: &rustls::Error) -> String {
    use rustls::{CertificateError as Cert, Error};
    match e {
        // The answer was not a TLS record at all: most often an HTTP server.
        Error::InvalidMessage(_) | Error::InappropriateMessage { .. } => {
            "the answer is not TLS; the port may speak plain HTTP (check the URL's scheme and port)".into()
        }
        Error::InvalidCertificate(cert) => match cert {
            Cert::UnknownIssuer => "the certificate is issued by an unknown authority (for a private CA, set the account's ca_file)".into(),
            Cert::Expired | Cert::ExpiredContext { .. } => "the certificate has expired".into(),
            Cert::NotValidYet | Cert::NotValidYetContext { .. } => {
                "the certificate is not valid yet (is this host's clock right?)".into()
            }
            Cert::NotValidForName | Cert::NotValidForNameContext { .. } => {
                "the certificate is not valid for this host name".into()
            }
            Cert::Revoked => "the certificate has been revoked".into(),
            other => format!("the certificate is not acceptable ({other:?})"),
        },
        Error::AlertReceived(rustls::AlertDescription::CertificateRequired) => {
            "the server requires a client certificate: set the account's client_certificate and client_key (RFC 8705)".into()
        }
        Error::AlertReceived(alert) if refuses_client_certificate(*alert) => format!(
            "the server did not accept the client certificate ({alert:?}): is it the one registered with the provider, from a CA the provider trusts, and unexpired?"
        ),
        Error::AlertReceived(alert) => format!("the server refused the handshake ({alert:?})"),
        Error::PeerIncompatible(_) => "no TLS version or cipher suite in common with the server".into(),
        other => other.to_string(),
    }
}

/// What an answer's body was, without a byte of it: its content type and length. A body
/// is never quoted, not even scrubbed: a truncated answer from a rotating provider holds
/// the new tokens, which no scrubbing can know.
pub(super) fn describe_body(headers: &HeaderMap, body: &[u8]) -> String {
    let content_type = headers
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map_or_else(|| "no content type".to_string(), |t| bounded(t, 80));
    if body.is_empty() {
        format!("{content_type}, empty body")
    } else {
        format!("{content_type}, {} bytes", body.len())
    }
}

/// Why a body is not a JSON object, by position and kind only (serde_json's own message
/// may quote a value, so it is not used).
pub(super) fn json_problem(body: &[u8]) -> String {
    use serde_json::error::Category;
    match serde_json::from_slice::<serde_json::Value>(body) {
        Ok(value) => format!("JSON {}, not an object", json_kind(&value)),
        Err(e) => match e.classify() {
            Category::Eof => format!(
                "the JSON ends early, at line {} column {} (a cut-off answer?)",
                e.line(),
                e.column()
            ),
            Category::Syntax | Category::Data | Category::Io => {
                format!("not valid JSON at line {} column {}", e.line(), e.column())
            }
        },
    }
}

/// The kind of a JSON value, never the value: what a message may say about a field.
pub(super) fn json_kind(value: &serde_json::Value) -> &'static str {
    match value {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(s) if s.is_empty() => "an empty string",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Array(_) => "an array",
        serde_json::Value::Object(_) => "an object",
    }
}

/// An OAuth error field (RFC 6749 §5.2 `error`, `error_description`, `error_uri`), meant
/// for humans and so shown: scrubbed of the request's secrets, without control
/// characters (a log line stays one line), at most `max` characters.
pub(super) fn oauth_field(text: &str, secrets: &[&Secret], max: usize) -> String {
    bounded(&scrub(text, secrets), max)
}

/// `text` without control characters, cut to `max` characters with an ellipsis.
fn bounded(text: &str, max: usize) -> String {
    let clean: String = text
        .trim()
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    if clean.chars().count() <= max {
        clean
    } else {
        let mut cut: String = clean.chars().take(max).collect();
        cut.push('…');
        cut
    }
}

/// Replaces any secret the request carried with `[redacted]`: a provider that echoes the
/// request in its error description must not put our credentials into our logs.
fn scrub(text: &str, secrets: &[&Secret]) -> String {
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

    /// A 200 cut off mid-answer, as a rotating provider's truncated body would be: the
    /// new tokens in it are unknown to any scrubbing, so nothing of the body is quoted.
    #[test]
    fn a_truncated_success_is_described_never_quoted() {
        let body =
            br#"{"access_token":"at-NEW-7f3a","refresh_token":"rt-NEW-91bc","expires_in":36"#;
        let mut headers = HeaderMap::new();
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        let e = parse_response(StatusCode::OK, &headers, body, &[]).unwrap_err();
        let text = e.to_string();
        assert!(matches!(e, ProviderError::Malformed(_)), "{e}");
        for token in ["at-NEW-7f3a", "rt-NEW-91bc", "access_token", "36"] {
            assert!(!text.contains(token), "{token} quoted in: {text}");
        }
        assert!(text.contains("application/json"), "{text}");
        assert!(text.contains(&format!("{} bytes", body.len())), "{text}");
        assert!(
            text.contains("ends early, at line 1 column 75"),
            "the position: {text}"
        );
    }

    #[test]
    fn an_error_page_that_echoes_the_request_is_described_never_quoted() {
        let body =
            b"<html>bad request: grant_type=refresh_token&refresh_token=rt-unknown-to-us</html>";
        let mut headers = HeaderMap::new();
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("text/html"));
        let e = parse_response(StatusCode::INTERNAL_SERVER_ERROR, &headers, body, &[]).unwrap_err();
        assert_eq!(
            e.to_string(),
            format!(
                "the provider answered HTTP 500 (text/html, {} bytes)",
                body.len()
            )
        );
        let e = parse_response(StatusCode::OK, &headers, body, &[]).unwrap_err();
        assert!(
            e.to_string().ends_with("not valid JSON at line 1 column 1"),
            "{e}"
        );
        // JSON of another shape names its kind, not its value.
        let e = parse_response(StatusCode::OK, &headers, br#""rt-in-a-string""#, &[]).unwrap_err();
        assert!(
            e.to_string().ends_with("JSON a string, not an object"),
            "{e}"
        );
        let e =
            parse_response(StatusCode::OK, &headers, br#"{"access_token":42}"#, &[]).unwrap_err();
        assert_eq!(
            e.to_string(),
            "the provider's answer is not usable: access_token is a number, not a non-empty string"
        );
    }

    #[test]
    fn oauth_error_fields_are_shown_bounded_scrubbed_and_on_one_line() {
        let rt = Secret::new("rt-super-secret");
        let long = "x".repeat(1000);
        let body = format!(
            r#"{{"error":"invalid_grant","error_description":"token rt-super-secret\nrevoked\u001b[31m {long}","error_uri":"https://idp.example/errors/invalid_grant"}}"#
        );
        let e = parse_response(
            StatusCode::BAD_REQUEST,
            &HeaderMap::new(),
            body.as_bytes(),
            &[&rt],
        )
        .unwrap_err();
        let text = e.to_string();
        assert!(!text.contains("rt-super-secret"), "{text}");
        assert!(text.contains("token [redacted] revoked"), "{text}");
        assert!(!text.chars().any(char::is_control), "{text:?}");
        assert!(text.len() < 700, "bounded: {} chars", text.len());
        assert!(
            text.ends_with("… (see https://idp.example/errors/invalid_grant)"),
            "{text}"
        );
    }

    #[test]
    fn tls_failures_are_told_in_an_operators_words() {
        use rustls::{CertificateError as Cert, Error};
        let reason = |e: Error| tls_reason(&e);
        assert!(reason(Error::InvalidCertificate(Cert::UnknownIssuer)).contains("ca_file"));
        assert_eq!(
            reason(Error::InvalidCertificate(Cert::Expired)),
            "the certificate has expired"
        );
        assert!(reason(Error::InvalidCertificate(Cert::NotValidForName)).contains("host name"));
        assert!(
            reason(Error::InvalidMessage(
                rustls::InvalidMessage::InvalidContentType
            ))
            .contains("may speak plain HTTP")
        );
        // RFC 8705: the server's word on our client certificate, and what to set.
        let alert = |a| reason(Error::AlertReceived(a));
        assert!(
            alert(rustls::AlertDescription::CertificateRequired)
                .contains("requires a client certificate: set the account's client_certificate")
        );
        assert!(
            alert(rustls::AlertDescription::UnknownCA)
                .contains("did not accept the client certificate")
        );
        assert!(super::refuses_client_certificate(
            rustls::AlertDescription::BadCertificate
        ));
        assert!(!super::refuses_client_certificate(
            rustls::AlertDescription::HandshakeFailure
        ));
    }
}
