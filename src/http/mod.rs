//! The local HTTP API: `router(state)` builds every route, its guards and its JSON errors.
//! Handlers read published snapshots; only a reader that needs a fresher token than the
//! published one waits, and then on the account's single in-flight refresh.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use axum::body::Bytes;
use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{FromRequestParts, MatchedPath, Path, Query, Request, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get, post};
use axum::{Json, Router};
use futures_util::FutureExt as _;
use futures_util::future::{Either, Ready};
use serde::Deserialize;
use serde_json::{Value, json};
use tower::{Layer, Service};

use crate::access::{Access, Caller};
use crate::clock::{Clock, rfc3339};
use crate::listen::{LocalPort, Peer};
use crate::metrics::HttpRoute;
use crate::provider::HttpClients;
use crate::token_cell::{AccountHandle, DemandError, Registry, Served, Status};

mod direct;
mod error;
mod proxy;

pub use direct::Api;
pub use error::ApiError;

/// The header every token request must carry. A forged request (SSRF through a consumer
/// that fetches URLs) cannot usually add headers, so this keeps such requests out.
pub const REQUEST_HEADER: &str = "tokend-request";

/// What the handlers share.
#[derive(Clone)]
pub struct ApiState {
    pub registry: Arc<Registry>,
    pub clock: Clock,
    /// The configured consumers; swapped on reload.
    pub access: Arc<ArcSwap<Access>>,
    /// The outcome of the last reload, shown under `reload` in `/v1/accounts` and as the
    /// `tokend_config_last_reload_*` metrics.
    pub reload: Arc<ArcSwap<ReloadStatus>>,
    /// This replica's name in the store's leases (`/v1/accounts`' `node_id`).
    pub node_id: Arc<str>,
    /// The proxy's clients to the accounts' upstream APIs.
    pub upstreams: Arc<HttpClients>,
}

/// The outcome of the config's last load: the one the daemon started with (generation
/// 0), then each reload. `tokend reload` reads the generation, signals, and waits for
/// the next one.
#[derive(Debug, Clone, PartialEq)]
pub struct ReloadStatus {
    pub generation: u64,
    pub at: SystemTime,
    pub successful: bool,
    /// The last load that was applied (the start, if no reload was).
    pub last_success_at: SystemTime,
    pub added: Vec<String>,
    pub removed: Vec<String>,
    pub restarted: Vec<String>,
    /// Settings that changed but take effect only on restart.
    pub restart_needed: Vec<String>,
    /// Why the new config was refused, one `file:line:column: key: message` each.
    pub problems: Vec<String>,
}

impl ReloadStatus {
    /// The config the daemon started with.
    pub fn started(at: SystemTime) -> ReloadStatus {
        ReloadStatus {
            generation: 0,
            at,
            successful: true,
            last_success_at: at,
            added: Vec::new(),
            removed: Vec::new(),
            restarted: Vec::new(),
            restart_needed: Vec::new(),
            problems: Vec::new(),
        }
    }

    /// As `caller` may see it: a consumer limited to some accounts sees only those among
    /// the changed ones, and not the problems (they name every account's settings).
    fn to_json(&self, caller: &Caller) -> Value {
        let readable = |names: &[String]| -> Value {
            names
                .iter()
                .filter(|n| {
                    crate::config::AccountName::parse(n).is_ok_and(|name| caller.may_read(&name))
                })
                .map(|n| Value::from(n.as_str()))
                .collect()
        };
        let sees_all = matches!(
            caller,
            Caller::Anyone | Caller::Consumer { accounts: None, .. }
        );
        json!({
            "generation": self.generation,
            "at": rfc3339(self.at),
            "successful": self.successful,
            "last_success_at": rfc3339(self.last_success_at),
            "added": readable(&self.added),
            "removed": readable(&self.removed),
            "restarted": readable(&self.restarted),
            "restart_needed": self.restart_needed,
            "problems": if sees_all { self.problems.as_slice() } else { &[] },
        })
    }
}

/// Every route of the API.
pub fn router(state: ApiState) -> Router {
    Router::new()
        .route("/v1/token/{account}", get(token_read::<false>))
        .route("/v1/token/{account}/access_token", get(token_read::<true>))
        .route("/v1/accounts/{account}/refresh", post(force_refresh))
        .route("/v1/accounts", get(accounts))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/proxy/{account}/{*path}", any(proxy::forward))
        .fallback(not_found)
        .layer(FrontLayer)
        .with_state(state)
}

/// The route patterns of `router()`, each with pre-registered request counters. A route
/// missing here is still counted, through the slower labelled lookup.
const ROUTES: [&str; 8] = [
    "/v1/token/{account}",
    "/v1/token/{account}/access_token",
    "/v1/accounts/{account}/refresh",
    "/v1/accounts",
    "/healthz",
    "/readyz",
    "/metrics",
    "/proxy/{account}/{*path}",
];

/// The token reads' places in [`ROUTES`].
const JSON_READ: usize = 0;
const PLAIN_READ: usize = 1;

static HTTP_REQUESTS: crate::metrics::HttpRequests<{ ROUTES.len() }> =
    crate::metrics::HttpRequests::new(ROUTES);

/// axum's own rejections (a duplicated or malformed query, a path that is not UTF-8)
/// answer in the API's JSON error format too.
fn bad_request(rejection: impl std::fmt::Display) -> ApiError {
    ApiError::BadRequest(rejection.to_string())
}

/// What every route does first: refuse a request whose Host does not name this daemon
/// ([`check_host`]), and count every request by route pattern and status
/// (`tokend_http_requests_total`), refused ones included. A plain tower layer rather
/// than `middleware::from_fn`, which boxes a future and clones the inner service on
/// every request.
#[derive(Debug, Clone, Copy)]
struct FrontLayer;

impl<S> Layer<S> for FrontLayer {
    type Service = Front<S>;

    fn layer(&self, inner: S) -> Front<S> {
        Front { inner }
    }
}

#[derive(Debug, Clone)]
struct Front<S> {
    inner: S,
}

impl<S, B> Service<Request<B>> for Front<S>
where
    S: Service<Request<B>, Response = Response>,
    S::Future: Unpin,
{
    type Response = Response;
    type Error = S::Error;
    type Future = Counted<Either<S::Future, Ready<Result<Response, S::Error>>>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        let pattern = request
            .extensions()
            .get::<MatchedPath>()
            .map(MatchedPath::as_str);
        let route = HTTP_REQUESTS.classify(pattern);
        let inner = match check_host(&request) {
            Ok(()) => Either::Left(self.inner.call(request)),
            Err(refused) => Either::Right(futures_util::future::ok(refused.into_response())),
        };
        Counted { route, inner }
    }
}

/// The response future of [`Front`]: counts the request once it is answered.
/// Needs an `Unpin` inner future (axum's route futures are), so it is polled without
/// boxing or unsafe pin projection.
struct Counted<F> {
    route: HttpRoute,
    inner: F,
}

impl<F, E> Future for Counted<F>
where
    F: Future<Output = Result<Response, E>> + Unpin,
{
    type Output = F::Output;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let result = ready!(self.inner.poll_unpin(cx));
        if let Ok(response) = &result {
            HTTP_REQUESTS.record(&self.route, response.status().as_u16());
        }
        Poll::Ready(result)
    }
}

/// The caller of a token or admin route, admitted by the guards, which run in order: the
/// `Tokend-Request` header (keeps out forged requests from SSRF), no proxy or browser
/// headers, a loopback `Host` (defeats DNS rebinding), then the consumer's identity when
/// consumers are configured. An extractor, taken first by those handlers, rather than a
/// `route_layer`: a layer costs a boxed future and a service clone per request. A wrong
/// method on a guarded route still answers 405: the handler, and so the guard, never runs.
struct Guarded(Caller);

impl FromRequestParts<ApiState> for Guarded {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &ApiState) -> Result<Self, ApiError> {
        let headers = &parts.headers;
        let marked = headers
            .get(REQUEST_HEADER)
            .is_some_and(|v| !v.as_bytes().iter().all(u8::is_ascii_whitespace));
        if !marked {
            return Err(ApiError::MissingRequestHeader);
        }
        refuse_proxied(headers)?;
        let peer = parts.extensions.get::<Peer>();
        state
            .access
            .load()
            .identify(headers, peer)
            .map(Guarded)
            .map_err(ApiError::Unauthorized)
    }
}

/// Headers that only a proxy or a browser adds, each refused on the token, admin and
/// account routes: a proxy that forwards some of them would serve tokens beyond this host.
const PROXY_HEADERS: [(HeaderName, &str); 7] = [
    (header::ORIGIN, "Origin"),
    (
        HeaderName::from_static("x-forwarded-for"),
        "X-Forwarded-For",
    ),
    (header::FORWARDED, "Forwarded"),
    (HeaderName::from_static("x-real-ip"), "X-Real-IP"),
    (
        HeaderName::from_static("x-forwarded-host"),
        "X-Forwarded-Host",
    ),
    (header::VIA, "Via"),
    (HeaderName::from_static("true-client-ip"), "True-Client-IP"),
];

const SEC_FETCH_SITE: HeaderName = HeaderName::from_static("sec-fetch-site");

fn refuse_proxied(headers: &HeaderMap) -> Result<(), ApiError> {
    if let Some((_, shown)) = PROXY_HEADERS.iter().find(|(h, _)| headers.contains_key(h)) {
        return Err(ApiError::Proxied(shown));
    }
    // A browser says where a request comes from: only the user's own navigation (`none`)
    // or a page served by tokend itself (`same-origin`) may pass.
    let browsed_here = |v: &HeaderValue| matches!(v.as_bytes(), b"none" | b"same-origin");
    if !headers.get_all(SEC_FETCH_SITE).iter().all(browsed_here) {
        return Err(ApiError::Proxied(
            "Sec-Fetch-Site other than none or same-origin",
        ));
    }
    Ok(())
}

/// Refuses, on every route, a request whose Host does not name this daemon: two Host
/// headers (whichever one a check read, a proxy could act on the other), none on HTTP/1.1
/// over TCP, and, from a loopback peer, one naming another machine (DNS rebinding) or
/// another port (a local proxy). A request in absolute form (`GET http://host/…`) is held
/// to the same rules for its authority. Only loopback TCP peers are held to a loopback
/// Host: a Unix socket has no host, and remote peers exist only where the operator set
/// `allow_remote`. A request without a peer never came through a listener (in-process).
fn check_host<B>(request: &Request<B>) -> Result<(), ApiError> {
    let mut hosts = request.headers().get_all(header::HOST).iter();
    let host = hosts.next();
    if hosts.next().is_some() {
        return Err(ApiError::BadHost(
            "a request must carry one Host header, not several",
        ));
    }
    let Some(Peer::Tcp(peer)) = request.extensions().get::<Peer>() else {
        return Ok(());
    };
    if host.is_none() && request.version() >= http::Version::HTTP_11 {
        return Err(ApiError::BadHost(
            "an HTTP/1.1 request must carry a Host header",
        ));
    }
    if !peer.ip().is_loopback() {
        return Ok(());
    }
    let port = request.extensions().get::<LocalPort>().map(|p| p.0);
    let authority = request.uri().authority().map(|a| a.as_str().as_bytes());
    if host
        .map(HeaderValue::as_bytes)
        .into_iter()
        .chain(authority)
        .all(|h| names_this_daemon(h, port))
    {
        Ok(())
    } else {
        Err(ApiError::ForeignHost)
    }
}

/// `localhost`, `127.x.y.z` or `[::1]`, with `port` (when known). A Host without a port
/// means port 80 (RFC 9110 §7.2), so it passes only on a listener bound to port 80.
fn names_this_daemon(host: &[u8], port: Option<u16>) -> bool {
    let Ok(host) = std::str::from_utf8(host) else {
        return false;
    };
    let (name, given) = if let Some(rest) = host.strip_prefix('[') {
        match rest.split_once(']') {
            Some((ip, "")) => (ip, None),
            Some((ip, p)) if p.starts_with(':') => (ip, Some(&p[1..])),
            _ => return false,
        }
    } else {
        match host.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (host, None),
        }
    };
    let given = match given {
        None | Some("") => 80,
        Some(p) if p.bytes().all(|b| b.is_ascii_digit()) => match p.parse::<u16>() {
            Ok(p) => p,
            Err(_) => return false,
        },
        Some(_) => return false,
    };
    let loopback = name.eq_ignore_ascii_case("localhost")
        || name
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback());
    loopback && port.is_none_or(|p| p == given)
}

#[derive(Deserialize, Default)]
struct TokenQuery {
    min_valid: Option<String>,
}

impl TokenQuery {
    fn min_valid(&self) -> Result<Option<Duration>, ApiError> {
        match &self.min_valid {
            None => Ok(None),
            Some(s) => s
                .trim()
                .parse::<u64>()
                .map(|secs| Some(Duration::from_secs(secs)))
                .map_err(|_| {
                    ApiError::BadRequest(format!(
                        "min_valid must be a whole number of seconds, not {s:?}"
                    ))
                }),
        }
    }
}

/// The token for `account`, valid at least `min_valid` (refreshing if need be).
async fn current_token(
    state: &ApiState,
    caller: &Caller,
    account: &str,
    query: &TokenQuery,
) -> Result<Arc<Served>, ApiError> {
    let handle = permitted(state, caller, account)?;
    token_for(
        state,
        caller,
        &handle,
        query.min_valid()?.unwrap_or_default(),
    )
    .await
}

/// The token of an account `caller` may read ([`permitted`]), valid at least
/// `min_valid`: the published one, or else the outcome of a demand on the refresher.
async fn token_for(
    state: &ApiState,
    caller: &Caller,
    handle: &AccountHandle,
    min_valid: Duration,
) -> Result<Arc<Served>, ApiError> {
    let now = state.clock.now();
    if let Some(token) = handle.snapshot().valid_token(now, min_valid) {
        served(state, handle, caller);
        return Ok(token.clone());
    }
    let wait = handle.config().limits.timeout + Duration::from_secs(5);
    match handle.demand(min_valid, false, wait).await {
        Ok(token) => {
            served(state, handle, caller);
            Ok(token)
        }
        Err(e) => {
            let now = state.clock.now();
            let status = match e {
                DemandError::NeedsReauth(_) => Status::NeedsReauth,
                _ => handle.snapshot().status_at(now),
            };
            Err(ApiError::Unavailable {
                account: handle.config().name.as_str().to_string(),
                state: status,
                description: e.to_string(),
                retry_after: e.retry_after(),
            })
        }
    }
}

/// The account, if it exists and the caller may read it. A consumer limited to some
/// accounts learns nothing about the others: it gets 403 whether they exist or not.
fn permitted(
    state: &ApiState,
    caller: &Caller,
    account: &str,
) -> Result<Arc<AccountHandle>, ApiError> {
    let handle = state.registry.get(account);
    match (&handle, caller) {
        (Some(h), c) if c.may_read(&h.config().name) => Ok(h.clone()),
        (
            _,
            Caller::Consumer {
                accounts: Some(_), ..
            },
        ) => Err(ApiError::NotPermitted(account.to_string())),
        (Some(_), _) => Err(ApiError::NotPermitted(account.to_string())),
        (None, _) => Err(ApiError::UnknownAccount(account.to_string())),
    }
}

fn served(state: &ApiState, handle: &AccountHandle, caller: &Caller) {
    match state.access.load().metrics_label(caller) {
        None => handle.record_read(),
        Some(name) => crate::metrics::token_reads(handle.config().name.as_str(), name).increment(1),
    }
    tracing::debug!(account = %handle.config().name, consumer = caller.label(), "token served");
}

fn no_store(mut response: Response) -> Response {
    let headers = response.headers_mut();
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    headers.insert(header::PRAGMA, HeaderValue::from_static("no-cache"));
    response
}

/// `GET /v1/token/{account}` (`PLAIN` false: the JSON document) and
/// `GET /v1/token/{account}/access_token` (`PLAIN` true: the access token alone).
async fn token_read<const PLAIN: bool>(
    Guarded(caller): Guarded,
    State(state): State<ApiState>,
    account: Result<Path<String>, PathRejection>,
    query: Result<Query<TokenQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    let Path(account) = account.map_err(bad_request)?;
    let Query(query) = query.map_err(bad_request)?;
    let token = current_token(&state, &caller, &account, &query).await?;
    Ok(token_answer(&state, token, PLAIN))
}

/// A token read's answer: the JSON document, or with `plain` the access token alone.
fn token_answer(state: &ApiState, token: Arc<Served>, plain: bool) -> Response {
    if plain {
        // The body borrows the token from the published snapshot: no copy of the secret.
        token_response(TEXT_PLAIN, Bytes::from_owner(PlainToken(token)))
    } else {
        // Handed over without a copy; wiped once hyper has written it.
        let body = Bytes::from_owner(token.json_body(state.clock.now()));
        token_response(APPLICATION_JSON, body)
    }
}

/// The bytes of an access token, for a response body that holds the token alive.
struct PlainToken(Arc<Served>);

impl AsRef<[u8]> for PlainToken {
    fn as_ref(&self) -> &[u8] {
        self.0.access_token.expose().as_bytes()
    }
}

const APPLICATION_JSON: HeaderValue = HeaderValue::from_static("application/json");
const TEXT_PLAIN: HeaderValue = HeaderValue::from_static("text/plain; charset=utf-8");

/// A token answer: its content type and the headers that keep it out of caches
/// ([`no_store`]), written straight into the response's own header map (a `(HeaderMap, body)` answer would build
/// a second map and merge it in: this runs on every read).
fn token_response(content_type: HeaderValue, body: Bytes) -> Response {
    let mut response = Response::new(axum::body::Body::from(body));
    let headers = response.headers_mut();
    headers.reserve(3);
    headers.insert(header::CONTENT_TYPE, content_type);
    no_store(response)
}

fn time_field(t: Option<SystemTime>) -> Value {
    t.map_or(Value::Null, |t| Value::from(rfc3339(t)))
}

/// Every account's state. Open when no consumers are configured; otherwise a consumer
/// must identify itself and sees only the accounts it may read. Refused through a proxy
/// or from a browser, like the token routes: it names token URLs and errors.
async fn accounts(State(state): State<ApiState>, request: Request) -> Response {
    if let Err(e) = refuse_proxied(request.headers()) {
        return e.into_response();
    }
    let peer = request.extensions().get::<Peer>();
    let caller = match state.access.load().identify(request.headers(), peer) {
        Ok(c) => c,
        Err(e) => return ApiError::Unauthorized(e).into_response(),
    };
    let now = state.clock.now();
    let list: Vec<Value> = state
        .registry
        .all()
        .values()
        .filter(|handle| caller.may_read(&handle.config().name))
        .map(|handle| {
            let config = handle.config();
            let snap = handle.snapshot();
            let token = snap.token.as_ref();
            json!({
                "account": config.name.as_str(),
                "state": snap.status_at(now).as_str(),
                "grant": config.grant.as_str(),
                "token_url": config.token_url.as_ref().map(|u| u.as_str()),
                "issuer": config.endpoints.issuer.as_deref(),
                "expires_at": time_field(token.map(|t| t.expires_at)),
                "expires_in": token.map(|t| t.valid_for(now).as_secs()),
                "last_refresh": time_field(snap.last_refresh),
                "next_refresh": time_field(snap.next_refresh),
                "last_error": snap.last_error,
                "refresh_token_issued_at": time_field(snap.refresh_token_issued_at),
                "refresh_token_age": snap.refresh_token_issued_at.map(|t| now.duration_since(t).unwrap_or_default().as_secs()),
                "refresh_token_expires_at": time_field(snap.refresh_token_expires_at),
                "warning": snap.refresh_token_warning(now),
                "lease_holder": handle.lease_holder().as_deref().map(String::as_str),
            })
        })
        .collect();
    let reload = state.reload.load().to_json(&caller);
    no_store(
        Json(json!({ "node_id": &*state.node_id, "accounts": list, "reload": reload }))
            .into_response(),
    )
}

/// `POST /v1/accounts/{account}/refresh`: a refresh now, whatever the token's age
/// (operators' `tokend refresh`). Answers with the account's new state, not the token.
async fn force_refresh(
    Guarded(caller): Guarded,
    State(state): State<ApiState>,
    account: Result<Path<String>, PathRejection>,
) -> Result<Response, ApiError> {
    let Path(account) = account.map_err(bad_request)?;
    let handle = permitted(&state, &caller, &account)?;
    let wait = handle.config().limits.timeout + Duration::from_secs(5);
    let result = handle.demand(Duration::ZERO, true, wait).await;
    let now = state.clock.now();
    match result {
        Ok(token) => Ok(no_store(
            Json(json!({
                "account": handle.config().name.as_str(),
                "state": handle.snapshot().status_at(now).as_str(),
                "expires_at": rfc3339(token.expires_at),
                "expires_in": token.valid_for(now).as_secs(),
            }))
            .into_response(),
        )),
        Err(e) => Err(ApiError::Unavailable {
            account,
            state: match e {
                DemandError::NeedsReauth(_) => Status::NeedsReauth,
                _ => handle.snapshot().status_at(now),
            },
            description: e.to_string(),
            retry_after: e.retry_after(),
        }),
    }
}

async fn metrics(State(state): State<ApiState>, headers: HeaderMap) -> Response {
    if let Err(e) = state.access.load().may_scrape(&headers) {
        return ApiError::Unauthorized(e).into_response();
    }
    let reload = state.reload.load();
    crate::metrics::config_reload(reload.successful, reload.last_success_at);
    let pieces = crate::metrics::render(state.registry.gauges(state.clock.now()));
    let body = axum::body::Body::from_stream(futures_util::stream::iter(
        pieces.map(Ok::<_, std::convert::Infallible>),
    ));
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        body,
    )
        .into_response()
}

async fn healthz() -> Response {
    Json(json!({ "status": "alive" })).into_response()
}

/// Ready when every account holds a valid token. Which accounts are not, and why, is
/// told to whoever may read them: any local caller when no consumers are configured
/// (as `/v1/accounts`), else a consumer, about its own accounts. Anyone else (a probe,
/// a process without a key or with a wrong one) learns only ready or not: a probe's
/// answer never depends on a key.
async fn readyz(State(state): State<ApiState>, request: Request) -> Response {
    let peer = request.extensions().get::<Peer>();
    let caller = state.access.load().identify(request.headers(), peer).ok();
    let now = state.clock.now();
    let mut ready = true;
    let mut not_ready = Vec::new();
    for handle in state.registry.all().values() {
        let snap = handle.snapshot();
        if snap.valid_token(now, Duration::ZERO).is_some() {
            continue;
        }
        ready = false;
        if caller
            .as_ref()
            .is_some_and(|c| c.may_read(&handle.config().name))
        {
            not_ready.push(json!({
                "account": handle.config().name.as_str(),
                "state": snap.status_at(now).as_str(),
                "last_error": snap.last_error,
            }));
        }
    }
    let mut body = json!({ "ready": ready });
    if !ready && caller.is_some() {
        body["not_ready"] = Value::from(not_ready);
    }
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    no_store((status, Json(body)).into_response())
}

async fn not_found() -> ApiError {
    ApiError::NotFound
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::Body;
    use tower::ServiceExt;

    fn api() -> Router {
        router(ApiState {
            registry: Arc::new(Registry::default()),
            clock: Clock::system(),
            access: Arc::new(ArcSwap::from_pointee(Access::default())),
            reload: Arc::new(ArcSwap::from_pointee(ReloadStatus::started(
                SystemTime::now(),
            ))),
            node_id: Arc::from("test-node"),
            upstreams: Arc::new(HttpClients::new(Duration::from_secs(1))),
        })
    }

    async fn status(api: &Router, method: &str, uri: &str) -> u16 {
        let request = Request::builder()
            .method(method)
            .uri(uri)
            .body(Body::empty())
            .unwrap();
        api.clone()
            .oneshot(request)
            .await
            .unwrap()
            .status()
            .as_u16()
    }

    /// The value of the `tokend_http_requests_total` series with these labels.
    fn requests_counted(route: &str, status: u16) -> u64 {
        let series =
            format!("tokend_http_requests_total{{route=\"{route}\",status=\"{status}\"}} ");
        crate::metrics::handle()
            .render()
            .lines()
            .find_map(|l| l.strip_prefix(&series)?.parse().ok())
            .unwrap_or(0)
    }

    #[tokio::test]
    async fn every_counted_route_is_a_route() {
        let api = api();
        for route in ROUTES {
            // Anything but the fallback's 404 shows the path matched a route: 405 for the
            // API's own routes (none answers DELETE), the guard's 403 for the proxy's.
            let uri = route
                .replace("{account}", "some-account")
                .replace("{*path}", "a/b");
            let status = status(&api, "DELETE", &uri).await;
            assert!(status == 405 || status == 403, "{route}: {status}");
        }
    }

    #[tokio::test]
    async fn requests_are_counted_by_route_pattern_and_status() {
        let api = api();
        // Other tests may add to these series concurrently: counts are compared as lower
        // bounds.
        let before = [
            requests_counted("/v1/accounts/{account}/refresh", 405),
            requests_counted("unmatched", 404),
        ];
        assert_eq!(status(&api, "PUT", "/v1/accounts/a/refresh").await, 405);
        assert_eq!(status(&api, "PUT", "/v1/accounts/b/refresh").await, 405);
        assert_eq!(status(&api, "GET", "/no/such/route").await, 404);
        assert!(requests_counted("/v1/accounts/{account}/refresh", 405) >= before[0] + 2);
        assert!(requests_counted("unmatched", 404) > before[1]);

        // A route missing from the table, and a status outside the pre-registered ones,
        // are counted through the labelled lookup.
        let table = crate::metrics::HttpRequests::new(["/listed"]);
        let unlisted = table.classify(Some("/unlisted-in-this-test"));
        assert_eq!(
            unlisted,
            HttpRoute::Unlisted("/unlisted-in-this-test".into())
        );
        table.record(&unlisted, 418);
        table.record(&table.classify(Some("/listed")), 200);
        assert_eq!(requests_counted("/unlisted-in-this-test", 418), 1);
        assert_eq!(requests_counted("/listed", 200), 1);
    }

    #[test]
    fn only_loopback_hosts_on_this_port_pass() {
        let port = Some(8731);
        for ok in [
            "localhost:8731",
            "127.0.0.1:8731",
            "127.9.9.9:8731",
            "[::1]:8731",
            "LOCALHOST:8731",
        ] {
            assert!(names_this_daemon(ok.as_bytes(), port), "{ok}");
        }
        for bad in [
            "evil.example",
            "evil.example:8731",
            "localhost.evil.example:8731",
            "10.0.0.1:8731",
            "[::2]:8731",
            "[::1]x",
            "0.0.0.0:8731",
            // Another port, or none (port 80): a proxy or another local service.
            "localhost:8732",
            "127.0.0.1:80",
            "localhost",
            "localhost:",
            "[::1]",
            "localhost:+8731",
            "localhost:08731x",
            "localhost:99999",
        ] {
            assert!(!names_this_daemon(bad.as_bytes(), port), "{bad}");
        }
        // A listener on port 80 is the one a Host without a port names.
        assert!(names_this_daemon(b"localhost", Some(80)));
        assert!(names_this_daemon(b"[::1]", Some(80)));
        // The router alone, not behind a listener, knows no port.
        assert!(names_this_daemon(b"localhost:1", None));
    }
}
