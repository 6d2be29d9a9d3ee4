//! The credential-adding reverse proxy: `ANY /proxy/{account}/{path…}` is forwarded to
//! the account's `[accounts.NAME.proxy] upstream` with its current token and headers,
//! bodies streamed both ways, and on an upstream 401 one forced refresh and one replay.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use futures_util::StreamExt as _;
use reqwest::Url;

use super::{ApiError, ApiState, Guarded, REQUEST_HEADER, permitted, token_for};
use crate::access::Caller;
use crate::config::{AccountConfig, ProxyConfig};
use crate::token_cell::{AccountHandle, Served};

/// The largest request body kept so that it can be sent again after a 401. A larger one
/// streams through once, and its 401 goes back to the consumer as it came.
pub const REPLAY_LIMIT: usize = 1024 * 1024;

/// Headers that belong to one connection, never forwarded (RFC 9110 §7.6.1), with
/// `Proxy-Connection` (pre-standard, still sent) and `Expect` (100-continue is answered by
/// tokend's own server, not passed on).
const HOP_BY_HOP: [HeaderName; 10] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
    header::EXPECT,
];

/// `ANY /proxy/{account}/{path…}`: behind the same guards as the token routes (the
/// [`Guarded`] extractor), and counted by account and status once answered.
pub(super) async fn forward(
    Guarded(caller): Guarded,
    State(state): State<ApiState>,
    request: Request,
) -> Response {
    let started = Instant::now();
    // TRACE would echo the request, credentials added, back to the consumer; CONNECT
    // would tunnel past every rule here.
    if matches!(
        request.method(),
        &http::Method::TRACE | &http::Method::CONNECT
    ) {
        return StatusCode::METHOD_NOT_ALLOWED.into_response();
    }
    let (parts, body) = request.into_parts();
    let (account, rest) = split_path(parts.uri.path());
    // Only the accounts this caller may read are counted by account: a made-up name in
    // the path adds no series (`tokend_http_requests_total` counts every request).
    let handle = match permitted(&state, &caller, account) {
        Ok(handle) => handle,
        Err(refused) => {
            log_failure(account, &parts.method, &refused);
            return refused.into_response();
        }
    };
    let config = Arc::clone(&handle.config());
    let Some(proxy) = &config.proxy else {
        let refused = ApiError::NoProxy(account.to_string());
        log_failure(account, &parts.method, &refused);
        return refused.into_response();
    };
    let method = parts.method.clone();
    let exchanged = match upstream_url(&proxy.upstream, rest, parts.uri.query()) {
        Ok(url) => {
            let upstream = Upstream {
                state: &state,
                handle: &handle,
                config: &config,
                proxy,
                url,
            };
            upstream.exchange(&caller, parts, body).await
        }
        Err(refused) => Err(refused),
    };
    let response = exchanged.unwrap_or_else(|refused| {
        log_failure(config.name.as_str(), &method, &refused);
        refused.into_response()
    });
    handle.record_proxied(response.status().as_u16(), started.elapsed());
    response
}

/// Where one proxied request goes: the account, its proxy settings and the URL.
struct Upstream<'a> {
    state: &'a ApiState,
    handle: &'a AccountHandle,
    config: &'a AccountConfig,
    proxy: &'a ProxyConfig,
    url: Url,
}

impl Upstream<'_> {
    /// One proxied request, from the account's token to the upstream's answer.
    async fn exchange(
        self,
        caller: &Caller,
        parts: Parts,
        body: Body,
    ) -> Result<Response, ApiError> {
        let account = self.config.name.as_str();
        let client = self
            .state
            .upstreams
            .client(self.config)
            .map_err(|e| bad_gateway(account, e.to_string()))?;
        let token = token_for(self.state, caller, self.handle, Duration::ZERO).await?;
        let mut headers = parts.headers;
        let (body, kept) = outgoing_body(body, &headers).await?;
        strip_for_upstream(&mut headers);
        // Only a request that can be sent again keeps what it takes to send it again.
        let replay = kept.map(|kept| (headers.clone(), self.url.clone(), kept));
        let send = |token: &Served, mut headers: HeaderMap, url: Url, body: reqwest::Body| {
            set_credentials(&mut headers, token);
            let mut request = reqwest::Request::new(parts.method.clone(), url);
            *request.headers_mut() = headers;
            *request.body_mut() = Some(body);
            *request.timeout_mut() = Some(self.proxy.timeout);
            client.execute(request)
        };
        let upstream_failed = |e: reqwest::Error| upstream_error(account, self.proxy.timeout, &e);
        let first = send(&token, headers, self.url, body)
            .await
            .map_err(upstream_failed)?;
        let now = self.state.clock.now();
        if first.status() != StatusCode::UNAUTHORIZED
            || !worth_a_refresh(
                first.headers(),
                &token,
                self.config.refresh.min_interval,
                now,
            )
        {
            return Ok(downstream(first));
        }
        let (Some(fresh), Some((headers, url, kept))) =
            (refreshed(self.handle, &token).await, replay)
        else {
            return Ok(downstream(first));
        };
        drop(first);
        tracing::debug!(
            account,
            "upstream answered 401: sent again with the refreshed token"
        );
        let second = send(&fresh, headers, url, reqwest::Body::from(kept))
            .await
            .map_err(upstream_failed)?;
        Ok(downstream(second))
    }
}

/// `/proxy/{account}/{rest}` → (`account`, `rest`), `rest` still percent-encoded as sent.
fn split_path(path: &str) -> (&str, &str) {
    let after = path.strip_prefix("/proxy/").unwrap_or_default();
    after.split_once('/').unwrap_or((after, ""))
}

/// The upstream URL for `rest` below `base` (whose path ends in `/`), with the request's
/// query as sent. A path that could leave the base is refused rather than normalized: a
/// dot segment (`..`, `.`, or spelled `%2e`), or an encoded slash or backslash that a
/// server behind the upstream might decode into one.
fn upstream_url(base: &Url, rest: &str, query: Option<&str>) -> Result<Url, ApiError> {
    let lower = rest.to_ascii_lowercase();
    if lower.contains("%2f") || lower.contains("%5c") || rest.contains('\\') {
        return Err(ApiError::BadProxyPath(
            "an encoded slash or a backslash in a proxied path is refused: it could climb out of the upstream's base path".into(),
        ));
    }
    let dot_segment = lower
        .split('/')
        .any(|s| matches!(s.replace("%2e", ".").as_str(), "." | ".."));
    if dot_segment {
        return Err(ApiError::BadProxyPath(
            "a proxied path has no . or .. segments: they could climb out of the upstream's base path".into(),
        ));
    }
    let mut url = base.clone();
    url.set_path(&format!("{}{rest}", base.path()));
    url.set_query(query);
    Ok(url)
}

/// Leaves of the consumer's headers what the upstream may see: no hop-by-hop headers (nor
/// those the `Connection` header names), no `Host` (the upstream's is its own), nothing
/// the consumer sent for tokend only: its key in `Authorization` and `Tokend-Request`.
fn strip_for_upstream(headers: &mut HeaderMap) {
    strip_hop_by_hop(headers);
    headers.remove(header::HOST);
    headers.remove(header::AUTHORIZATION);
    headers.remove(REQUEST_HEADER);
}

/// Removes the headers of one connection: the fixed list and any header the
/// `Connection` header names (RFC 9110 §7.6.1).
fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect();
    for name in HOP_BY_HOP.iter().chain(&named) {
        headers.remove(name);
    }
}

/// Sets the account's `Authorization` and extra headers (Zywave's `Profile`) over
/// anything of the same name, each marked sensitive (kept out of HPACK tables and of
/// `Debug`).
fn set_credentials(headers: &mut HeaderMap, token: &Served) {
    for (name, value) in &token.headers {
        // Checked as visible ASCII when the config and the token were accepted.
        if let Ok(mut value) = HeaderValue::from_str(value.expose()) {
            value.set_sensitive(true);
            headers.insert(name, value);
        }
    }
}

/// The request body for the first send, and a copy to send again after a 401 when the
/// whole body fits in [`REPLAY_LIMIT`]. A larger body is not held: what was read of it
/// goes first and the rest streams behind, so an upload of any size takes constant
/// memory.
async fn outgoing_body(
    body: Body,
    headers: &HeaderMap,
) -> Result<(reqwest::Body, Option<Bytes>), ApiError> {
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    let mut stream = body.into_data_stream();
    if declared.is_some_and(|n| n > REPLAY_LIMIT as u64) {
        return Ok((reqwest::Body::wrap_stream(stream), None));
    }
    let mut kept = Vec::new();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| {
            ApiError::BadRequest(format!("the request body could not be read: {e}"))
        })?;
        kept.extend_from_slice(&chunk);
        if kept.len() > REPLAY_LIMIT {
            let head = futures_util::stream::once(std::future::ready(Ok(Bytes::from(kept))));
            return Ok((reqwest::Body::wrap_stream(head.chain(stream)), None));
        }
    }
    let kept = Bytes::from(kept);
    Ok((reqwest::Body::from(kept.clone()), Some(kept)))
}

/// Whether an upstream 401 is the token's fault, so that a refresh can help: the
/// upstream says so (`error="invalid_token"`, RFC 6750 §3.1), or the token is old enough
/// to have been revoked (issued more than `min_interval` ago). A 401 for a token just
/// issued is about something else, and refreshing would not change it.
fn worth_a_refresh(
    headers: &HeaderMap,
    token: &Served,
    min_interval: Duration,
    now: std::time::SystemTime,
) -> bool {
    let says_invalid_token = headers
        .get_all(header::WWW_AUTHENTICATE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| v.to_ascii_lowercase().contains("error=\"invalid_token\""));
    let issued = token.expires_at.checked_sub(token.lifetime);
    let age = issued.and_then(|at| now.duration_since(at).ok());
    says_invalid_token || age.is_some_and(|age| age > min_interval)
}

/// A token other than `rejected`: the one another request's refresh already published,
/// or the result of one forced refresh, which concurrent requests share (the refresher
/// answers every waiting demand with one call). `None` when no refresh can be had now
/// (`min_interval`, the provider backing off): the 401 then goes back as it came.
async fn refreshed(handle: &AccountHandle, rejected: &Arc<Served>) -> Option<Arc<Served>> {
    let current = handle.snapshot().token.clone();
    if let Some(token) = current
        && !Arc::ptr_eq(&token, rejected)
    {
        return Some(token);
    }
    let wait = handle.config().limits.timeout + Duration::from_secs(5);
    let outcome = handle.demand(Duration::ZERO, true, wait).await;
    if let Ok(token) = &outcome
        && !Arc::ptr_eq(token, rejected)
    {
        return Some(token.clone());
    }
    // Refused as too soon after another refresh: that one may have been answered
    // between our look at the snapshot and our demand, and published since.
    let current = handle.snapshot().token.clone();
    if let Some(token) = current
        && !Arc::ptr_eq(&token, rejected)
    {
        return Some(token);
    }
    if let Err(e) = outcome {
        tracing::info!(account = %handle.config().name, reason = %e, "upstream answered 401 and no refreshed token can be had now: the 401 goes back to the consumer");
    }
    None
}

/// The upstream's answer as the consumer gets it: status and headers (less hop-by-hop
/// ones), the body streamed through as it arrives.
fn downstream(mut upstream: reqwest::Response) -> Response {
    let status = upstream.status();
    let mut headers = std::mem::take(upstream.headers_mut());
    strip_hop_by_hop(&mut headers);
    let mut response = Response::new(Body::new(reqwest::Body::from(upstream)));
    *response.status_mut() = status;
    *response.headers_mut() = headers;
    response
}

/// 504 when `proxy.timeout` ran out before the answer's headers, 502 for anything else
/// (refused, reset, TLS): with the cause, the upstream named by its origin only.
fn upstream_error(account: &str, timeout: Duration, e: &reqwest::Error) -> ApiError {
    if e.is_timeout() {
        return ApiError::GatewayTimeout {
            account: account.to_string(),
            description: format!(
                "the upstream did not answer within {} (proxy.timeout)",
                humantime::format_duration(timeout)
            ),
        };
    }
    bad_gateway(
        account,
        format!(
            "the upstream could not be reached: {}",
            crate::provider::transport_message(e)
        ),
    )
}

fn bad_gateway(account: &str, description: String) -> ApiError {
    ApiError::BadGateway {
        account: account.to_string(),
        description,
    }
}

/// One line per exchange tokend could not complete; never a header value or the query.
fn log_failure(account: &str, method: &http::Method, refused: &ApiError) {
    match refused {
        ApiError::BadGateway { description, .. }
        | ApiError::GatewayTimeout { description, .. }
        | ApiError::Unavailable { description, .. } => {
            tracing::warn!(account, %method, reason = %description, "proxied request failed");
        }
        other => tracing::debug!(account, %method, refused = ?other, "proxied request refused"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> Url {
        Url::parse("https://api.example.com/v2/").unwrap()
    }

    #[test]
    fn paths_stay_below_the_base_or_are_refused() {
        let ok = upstream_url(&base(), "users/7/files", Some("a=1&b=%2F")).unwrap();
        assert_eq!(
            ok.as_str(),
            "https://api.example.com/v2/users/7/files?a=1&b=%2F"
        );
        let root = upstream_url(&base(), "", None).unwrap();
        assert_eq!(root.as_str(), "https://api.example.com/v2/");
        for climbing in [
            "..",
            "../admin",
            "a/../../admin",
            "a/./b",
            "%2e%2e/admin",
            ".%2E/admin",
            "a/%2E",
            "a%2fb",
            "a%2F..%2Fb",
            "a%5c..",
            "a\\..\\b",
        ] {
            assert!(
                matches!(
                    upstream_url(&base(), climbing, None),
                    Err(ApiError::BadProxyPath(_))
                ),
                "{climbing:?} must be refused"
            );
        }
        // Dots inside a segment are a name, not a climb.
        assert!(upstream_url(&base(), "a/..b/c.d/...", None).is_ok());
    }

    #[test]
    fn the_consumers_credentials_and_hop_by_hop_headers_stay_behind() {
        let mut from = HeaderMap::new();
        for (k, v) in [
            ("authorization", "Bearer consumer-key"),
            ("tokend-request", "1"),
            ("host", "127.0.0.1:8731"),
            ("connection", "keep-alive, x-private"),
            ("x-private", "1"),
            ("keep-alive", "timeout=5"),
            ("transfer-encoding", "chunked"),
            ("te", "trailers"),
            ("upgrade", "h2c"),
            ("proxy-authorization", "Basic eA=="),
            ("accept", "application/json"),
            ("x-request-id", "abc"),
        ] {
            from.append(k, HeaderValue::from_static(v));
        }
        strip_for_upstream(&mut from);
        let mut names: Vec<&str> = from.keys().map(HeaderName::as_str).collect();
        names.sort_unstable();
        assert_eq!(names, ["accept", "x-request-id"]);
    }

    #[test]
    fn a_401_is_worth_a_refresh_when_the_upstream_says_invalid_token_or_the_token_is_old() {
        let now = std::time::SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let token = |age: u64| {
            let account = crate::config::AccountName::parse("a").unwrap();
            let access = crate::store::AccessToken {
                token: crate::secret::Secret::new("t"),
                token_type: "Bearer".into(),
                issued_at: now - Duration::from_secs(age),
                expires_at: now - Duration::from_secs(age) + Duration::from_secs(3600),
                scope: None,
            };
            Served::new(&account, &access, &[])
        };
        let mut invalid = HeaderMap::new();
        invalid.insert(
            header::WWW_AUTHENTICATE,
            HeaderValue::from_static(r#"Bearer realm="api", error="invalid_token""#),
        );
        let plain = HeaderMap::new();
        let min = Duration::from_secs(60);
        assert!(worth_a_refresh(&invalid, &token(1), min, now));
        assert!(worth_a_refresh(&plain, &token(61), min, now));
        assert!(!worth_a_refresh(&plain, &token(59), min, now));
    }
}
