//! The provider client: builds grant requests (RFC 6749 §4.1.3, §4.4, §6; RFC 8628 §3.4),
//! device authorization (RFC 8628 §3.1) and revocation (RFC 7009) requests with the
//! account's client authentication (§2.3.1) and body format, fetches metadata documents,
//! parses responses leniently where real providers differ (§5.1) and keeps failures typed
//! (§5.2, transport, parse) so the retry policy can match on their kind. It does not
//! decide when to call or what to do next.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use http::header::{ACCEPT, AUTHORIZATION, CONTENT_TYPE, RETRY_AFTER, USER_AGENT};
use http::{HeaderMap, HeaderValue, StatusCode};
use http_body_util::BodyExt;
use serde_json::Value;
use tower::ServiceExt;
use zeroize::Zeroize;

use reqwest::Url;

use crate::config::{AccountConfig, CaBundle, ClientAuth, HostLimits, RequestFormat};
use crate::secret::Secret;

pub mod discovery;

/// What tokend asks the token endpoint for.
#[derive(Debug, Clone, Copy)]
pub enum TokenGrant<'a> {
    /// RFC 6749 §6.
    RefreshToken(&'a Secret),
    /// RFC 6749 §4.4.
    ClientCredentials,
    /// RFC 6749 §4.1.3, with the PKCE verifier of RFC 7636 §4.5.
    AuthorizationCode {
        code: &'a Secret,
        redirect_uri: &'a str,
        code_verifier: &'a Secret,
    },
    /// RFC 8628 §3.4.
    DeviceCode(&'a Secret),
}

/// RFC 8628 §3.4's grant type.
pub const DEVICE_CODE_GRANT: &str = "urn:ietf:params:oauth:grant-type:device_code";

impl TokenGrant<'_> {
    pub fn as_str(&self) -> &'static str {
        match self {
            TokenGrant::RefreshToken(_) => "refresh_token",
            TokenGrant::ClientCredentials => "client_credentials",
            TokenGrant::AuthorizationCode { .. } => "authorization_code",
            TokenGrant::DeviceCode(_) => DEVICE_CODE_GRANT,
        }
    }

    /// The grant's own parameters, `grant_type` first.
    fn params(&self) -> Vec<(&'static str, &str)> {
        let mut params = vec![("grant_type", self.as_str())];
        match self {
            TokenGrant::RefreshToken(rt) => params.push(("refresh_token", rt.expose())),
            TokenGrant::ClientCredentials => {}
            TokenGrant::AuthorizationCode {
                code,
                redirect_uri,
                code_verifier,
            } => {
                params.push(("code", code.expose()));
                params.push(("redirect_uri", redirect_uri));
                params.push(("code_verifier", code_verifier.expose()));
            }
            TokenGrant::DeviceCode(dc) => params.push(("device_code", dc.expose())),
        }
        params
    }

    /// The secrets the grant carries, scrubbed from any error text.
    fn secrets(&self) -> Vec<&Secret> {
        match self {
            TokenGrant::RefreshToken(rt) => vec![rt],
            TokenGrant::ClientCredentials => vec![],
            TokenGrant::AuthorizationCode {
                code,
                code_verifier,
                ..
            } => vec![code, code_verifier],
            TokenGrant::DeviceCode(dc) => vec![dc],
        }
    }

    /// The configured scope goes with the grants that request one (RFC 6749 §4.4.2,
    /// §6); the code and device grants carry the scope their authorization fixed.
    fn sends_scope(&self) -> bool {
        matches!(
            self,
            TokenGrant::RefreshToken(_) | TokenGrant::ClientCredentials
        )
    }
}

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

/// A `Retry-After` header (RFC 9110 §10.2.3), as seconds or as a date.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum RetryAfter {
    Delay(Duration),
    At(SystemTime),
}

impl RetryAfter {
    fn parse(value: &HeaderValue) -> Option<RetryAfter> {
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

/// How request bytes reach the provider: real HTTP, or an in-process router (the demo's
/// embedded provider in tests that run on tokio's paused clock, where real sockets and
/// virtual time do not mix).
#[derive(Clone)]
pub enum Transport {
    Http(Arc<HttpClients>),
    InProcess(axum::Router),
}

/// One shared HTTPS client with the system's trust roots, plus one per extra CA bundle
/// (accounts with `ca_file`), built on first use and kept so connections are reused.
pub struct HttpClients {
    connect_timeout: Duration,
    system: reqwest::Client,
    with_ca: Mutex<HashMap<Arc<CaBundle>, reqwest::Client>>,
}

impl HttpClients {
    fn builder(connect_timeout: Duration) -> reqwest::ClientBuilder {
        // Redirects are not followed: a token request carries credentials and must go
        // only where the config says.
        reqwest::Client::builder()
            .connect_timeout(connect_timeout)
            .redirect(reqwest::redirect::Policy::none())
            .pool_idle_timeout(Duration::from_secs(90))
    }

    fn client(&self, account: &AccountConfig) -> Result<reqwest::Client, ProviderError> {
        let Some(bundle) = &account.ca_bundle else {
            return Ok(self.system.clone());
        };
        let mut cache = self.with_ca.lock().expect("client cache lock");
        if let Some(c) = cache.get(bundle) {
            return Ok(c.clone());
        }
        let certs = reqwest::Certificate::from_pem_bundle(&bundle.pem).map_err(|e| {
            ProviderError::Transport(format!("ca_file {}: {e}", bundle.path.display()))
        })?;
        let client = HttpClients::builder(self.connect_timeout)
            .tls_certs_merge(certs)
            .build()
            .map_err(|e| client_error(&e))?;
        cache.insert(bundle.clone(), client.clone());
        Ok(client)
    }
}

/// The token-endpoint client. Cheap to clone; one is shared by every account so
/// connections are reused.
#[derive(Clone)]
pub struct Provider {
    transport: Transport,
    limits: HostLimits,
    /// One gate per provider host, made on first use.
    hosts: Arc<Mutex<HashMap<String, Arc<HostGate>>>>,
}

/// Requests in flight to one provider host at once unless the config says otherwise:
/// after a restart or an outage, thousands of accounts due together queue here instead
/// of stampeding the provider.
pub const MAX_CONCURRENT_PER_HOST: usize = 16;

/// Admission to one provider host: a slot among its concurrent requests, then, when the
/// host is paced, the next free start time.
struct HostGate {
    slots: Arc<tokio::sync::Semaphore>,
    pace: Option<Pace>,
}

/// Evenly spaced request starts. No credit builds up while the host is idle, so no
/// second ever sees more than the configured rate (plus one).
struct Pace {
    interval: Duration,
    next: Mutex<tokio::time::Instant>,
}

impl Pace {
    /// Books the next start time at or after `now`.
    fn book(&self, now: tokio::time::Instant) -> tokio::time::Instant {
        let mut next = self.next.lock().expect("pace lock");
        let at = (*next).max(now);
        *next = at + self.interval;
        at
    }
}

/// A turn at calling one provider host: its slot is held until the exchange ends.
pub struct Turn {
    _slot: tokio::sync::OwnedSemaphorePermit,
}

impl Provider {
    pub fn new(transport: Transport) -> Provider {
        Provider {
            transport,
            limits: HostLimits::default(),
            hosts: Arc::new(Mutex::new(HashMap::new())),
        }
    }

    /// The same client with other per-host limits (before any request is made).
    pub fn with_host_limits(mut self, limits: HostLimits) -> Provider {
        self.limits = limits;
        self.hosts = Arc::new(Mutex::new(HashMap::new()));
        self
    }

    fn gate(&self, url: &Url) -> Arc<HostGate> {
        let host = format!("{}://{}", url.scheme(), url.authority());
        let mut map = self.hosts.lock().expect("host gate lock");
        map.entry(host)
            .or_insert_with(|| {
                Arc::new(HostGate {
                    slots: Arc::new(tokio::sync::Semaphore::new(self.limits.max_concurrent)),
                    pace: self.limits.max_per_second.map(|rate| Pace {
                        interval: Duration::from_secs_f64(1.0 / rate),
                        next: Mutex::new(tokio::time::Instant::now()),
                    }),
                })
            })
            .clone()
    }

    /// Waits for a turn at `url`'s host: a free slot, then its paced start time. Waiting
    /// sends nothing, so it can be abandoned (a dropped wait may leave one start time
    /// unused).
    pub async fn turn(&self, url: &Url) -> Turn {
        let gate = self.gate(url);
        let slot = gate
            .slots
            .clone()
            .acquire_owned()
            .await
            .expect("the semaphore is never closed");
        if let Some(pace) = &gate.pace {
            tokio::time::sleep_until(pace.book(tokio::time::Instant::now())).await;
        }
        Turn { _slot: slot }
    }

    /// A turn at `account`'s token endpoint (see [`Provider::turn`]).
    pub async fn token_turn(&self, account: &AccountConfig) -> Result<Turn, ProviderError> {
        Ok(self.turn(token_url(account)?).await)
    }

    /// Real HTTP(S) with the system's trust roots (and accounts' extra CA bundles).
    pub fn http(connect_timeout: Duration) -> Result<Provider, ProviderError> {
        let system = HttpClients::builder(connect_timeout)
            .build()
            .map_err(|e| client_error(&e))?;
        Ok(Provider::new(Transport::Http(Arc::new(HttpClients {
            connect_timeout,
            system,
            with_ca: Mutex::new(HashMap::new()),
        }))))
    }

    /// Sends one token request for `account` and parses the answer. The whole exchange,
    /// body included, is bounded by the account's timeout and response-size limit.
    pub async fn request_token(
        &self,
        account: &AccountConfig,
        grant: TokenGrant<'_>,
    ) -> Result<TokenResponse, ProviderError> {
        let turn = self.token_turn(account).await?;
        self.request_token_in(turn, account, grant).await
    }

    /// [`Provider::request_token`] in a turn already waited for: the caller can do
    /// something (persist a mark) between getting its turn and sending.
    pub async fn request_token_in(
        &self,
        turn: Turn,
        account: &AccountConfig,
        grant: TokenGrant<'_>,
    ) -> Result<TokenResponse, ProviderError> {
        let url = token_url(account)?;
        let mut params = grant.params();
        if grant.sends_scope()
            && let Some(scope) = &account.scope
        {
            params.push(("scope", scope));
        }
        let mut secrets = grant.secrets();
        secrets.extend(account.client_secret.as_ref());
        let request = build_request(account, params, true);
        let (status, headers, body) = self.exchange(turn, account, url, Some(request)).await?;
        parse_response(status, &headers, &body, &secrets)
    }

    /// RFC 8628 §3.1: asks for a device code and a user code.
    pub async fn device_authorization(
        &self,
        account: &AccountConfig,
    ) -> Result<DeviceAuthorization, ProviderError> {
        let url = account
            .endpoints
            .device_authorization
            .as_ref()
            .ok_or(ProviderError::NoEndpoint("device_authorization_endpoint"))?;
        let mut params = Vec::new();
        if let Some(scope) = &account.scope {
            params.push(("scope", scope.as_str()));
        }
        let secrets: Vec<&Secret> = account.client_secret.iter().collect();
        let request = build_request(account, params, true);
        let (status, headers, body) = self
            .exchange(self.turn(url).await, account, url, Some(request))
            .await?;
        let mut obj = success_object(status, &headers, &body, &secrets)?;
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

    /// RFC 7009 §2.1: revokes a refresh token. Success is any 2xx (§2.2: also for a
    /// token the provider no longer knows).
    pub async fn revoke(
        &self,
        account: &AccountConfig,
        refresh_token: &Secret,
    ) -> Result<(), ProviderError> {
        let url = account
            .endpoints
            .revocation
            .as_ref()
            .ok_or(ProviderError::NoEndpoint("revocation_endpoint"))?;
        let params = vec![
            ("token", refresh_token.expose()),
            ("token_type_hint", "refresh_token"),
        ];
        let mut secrets = vec![refresh_token];
        secrets.extend(account.client_secret.as_ref());
        let request = build_request(account, params, false);
        let (status, headers, body) = self
            .exchange(self.turn(url).await, account, url, Some(request))
            .await?;
        if let Some(e) = error_answer(status, &headers, &body, &secrets) {
            return Err(e);
        }
        Ok(())
    }

    /// GETs a JSON document (discovery metadata) with the account's limits and trust.
    pub async fn get_json(
        &self,
        account: &AccountConfig,
        url: &Url,
    ) -> Result<serde_json::Map<String, Value>, ProviderError> {
        let (status, headers, body) = self
            .exchange(self.turn(url).await, account, url, None)
            .await?;
        success_object(status, &headers, &body, &[])
    }

    /// One exchange: a POST of `request`, or a GET without one. The whole exchange, body
    /// included, is bounded by the account's timeout and response-size limit.
    async fn exchange(
        &self,
        _turn: Turn,
        account: &AccountConfig,
        url: &Url,
        mut request: Option<PreparedRequest>,
    ) -> Result<RawResponse, ProviderError> {
        let limit = account.limits.max_response_bytes;
        let timeout = account.limits.timeout;
        let exchange = async {
            match &self.transport {
                Transport::Http(clients) => {
                    let client = clients.client(account)?;
                    send_http(&client, url, request.as_ref(), limit).await
                }
                Transport::InProcess(router) => {
                    send_in_process(router, url, request.as_ref(), limit).await
                }
            }
        };
        // The turn was waited for before: waiting is not part of the exchange's timeout.
        let outcome = tokio::time::timeout(timeout, exchange).await;
        if let Some(r) = request.as_mut() {
            r.body.zeroize();
        }
        outcome.map_err(|_| ProviderError::Timeout(timeout))?
    }
}

fn token_url(account: &AccountConfig) -> Result<&Url, ProviderError> {
    account
        .token_url
        .as_ref()
        .ok_or(ProviderError::NoEndpoint("token_url"))
}

/// A request ready to send: the body holds secrets and is zeroized after use.
struct PreparedRequest {
    headers: HeaderMap,
    body: Vec<u8>,
}

/// Adds the account's client authentication (and, with `extra`, its `extra_params`) to
/// `params` and encodes them in the account's request format.
fn build_request<'a>(
    account: &'a AccountConfig,
    mut params: Vec<(&'a str, &'a str)>,
    extra: bool,
) -> PreparedRequest {
    let mut headers = HeaderMap::new();
    match account.client_auth {
        ClientAuth::ClientSecretPost => {
            params.push(("client_id", &account.client_id));
            if let Some(secret) = &account.client_secret {
                params.push(("client_secret", secret.expose()));
            }
        }
        ClientAuth::ClientSecretBasic => {
            let secret = account.client_secret.as_ref().map_or("", |s| s.expose());
            headers.insert(AUTHORIZATION, basic_auth(&account.client_id, secret));
        }
    }
    if extra {
        for (k, v) in &account.extra_params {
            params.push((k, v));
        }
    }
    let body = match account.request_format {
        RequestFormat::Form => {
            headers.insert(
                CONTENT_TYPE,
                HeaderValue::from_static("application/x-www-form-urlencoded"),
            );
            form_urlencoded::Serializer::new(String::new())
                .extend_pairs(params.iter())
                .finish()
                .into_bytes()
        }
        RequestFormat::Json => {
            headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
            let object: serde_json::Map<String, Value> = params
                .iter()
                .map(|(k, v)| (k.to_string(), Value::String(v.to_string())))
                .collect();
            let bytes = serde_json::to_vec(&object).expect("a string map serializes");
            // The map's strings hold copies of secrets.
            for (_, v) in object {
                if let Value::String(mut s) = v {
                    s.zeroize();
                }
            }
            bytes
        }
    };
    headers.insert(ACCEPT, HeaderValue::from_static("application/json"));
    headers.insert(
        USER_AGENT,
        HeaderValue::from_static(concat!("tokend/", env!("CARGO_PKG_VERSION"))),
    );
    PreparedRequest { headers, body }
}

/// RFC 6749 §2.3.1: id and secret are each form-urlencoded, joined by `:`, then base64.
fn basic_auth(client_id: &str, secret: &str) -> HeaderValue {
    let encode = |s: &str| form_urlencoded::byte_serialize(s.as_bytes()).collect::<String>();
    let mut joined = format!("{}:{}", encode(client_id), encode(secret));
    let mut value = format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(joined.as_bytes())
    );
    joined.zeroize();
    let mut header = HeaderValue::from_str(&value).expect("base64 is a valid header value");
    header.set_sensitive(true);
    value.zeroize();
    header
}

type RawResponse = (StatusCode, HeaderMap, Vec<u8>);

async fn send_http(
    client: &reqwest::Client,
    url: &Url,
    request: Option<&PreparedRequest>,
    limit: usize,
) -> Result<RawResponse, ProviderError> {
    let builder = match request {
        Some(request) => client
            .post(url.clone())
            .headers(request.headers.clone())
            .body(request.body.clone()),
        None => client
            .get(url.clone())
            .header(ACCEPT, "application/json")
            .header(USER_AGENT, concat!("tokend/", env!("CARGO_PKG_VERSION"))),
    };
    let mut response = builder
        .send()
        .await
        .map_err(|e| ProviderError::Transport(transport_message(&e)))?;
    let status = response.status();
    let headers = response.headers().clone();
    if response.content_length().is_some_and(|n| n > limit as u64) {
        return Err(ProviderError::TooLarge(limit));
    }
    let mut body = Vec::new();
    while let Some(chunk) = response
        .chunk()
        .await
        .map_err(|e| ProviderError::Transport(transport_message(&e)))?
    {
        if body.len() + chunk.len() > limit {
            return Err(ProviderError::TooLarge(limit));
        }
        body.extend_from_slice(&chunk);
    }
    Ok((status, headers, body))
}

/// A client that cannot be built is almost always a TLS set-up problem (no CA
/// certificates on the host or in the image); say so, with the whole cause chain.
fn client_error(e: &reqwest::Error) -> ProviderError {
    ProviderError::Transport(format!(
        "cannot build the HTTP client ({}); is a CA certificate bundle installed (ca-certificates, /etc/ssl/certs)?",
        transport_message(e)
    ))
}

/// reqwest's Display stops at the outermost layer ("error sending request"); the cause
/// chain says what actually failed (refused, DNS, TLS). URLs carry no secrets here.
fn transport_message(e: &reqwest::Error) -> String {
    let mut message = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(cause) = source {
        message.push_str(": ");
        message.push_str(&cause.to_string());
        source = cause.source();
    }
    message
}

async fn send_in_process(
    router: &axum::Router,
    url: &Url,
    request: Option<&PreparedRequest>,
    limit: usize,
) -> Result<RawResponse, ProviderError> {
    let path = match url.query() {
        Some(q) => format!("{}?{q}", url.path()),
        None => url.path().to_string(),
    };
    let req = match request {
        Some(request) => {
            let mut builder = http::Request::post(path);
            for (k, v) in &request.headers {
                builder = builder.header(k, v);
            }
            builder.body(axum::body::Body::from(request.body.clone()))
        }
        None => http::Request::get(path).body(axum::body::Body::empty()),
    }
    .map_err(|e| ProviderError::Transport(e.to_string()))?;
    let response = router
        .clone()
        .oneshot(req)
        .await
        .map_err(|e| ProviderError::Transport(e.to_string()))?;
    let (parts, body) = response.into_parts();
    let body = http_body_util::Limited::new(body, limit)
        .collect()
        .await
        .map_err(|_| ProviderError::TooLarge(limit))?
        .to_bytes()
        .to_vec();
    Ok((parts.status, parts.headers, body))
}

/// The error an answer carries, if it is one: an OAuth error (§5.2) with any status,
/// even 200 from lax providers, or a non-2xx status.
fn error_answer(
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
        let description = obj
            .get("error_description")
            .and_then(Value::as_str)
            .map(|d| scrub(d, secrets));
        return Some(ProviderError::OAuth {
            status: status.as_u16(),
            error: scrub(error, secrets),
            description,
            retry_after,
        });
    }
    (!status.is_success()).then(|| ProviderError::Http {
        status: status.as_u16(),
        detail: body_summary(headers, body, secrets),
        retry_after,
    })
}

/// A successful answer's JSON object, or the typed error.
fn success_object(
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
            "expected a JSON object, got {}",
            body_summary(headers, body, secrets)
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
        Some(_) => {
            return Err(ProviderError::Malformed(
                "access_token is not a non-empty string".into(),
            ));
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

fn body_summary(headers: &HeaderMap, body: &[u8], secrets: &[&Secret]) -> String {
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
    use super::*;

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

    #[test]
    fn basic_auth_form_encodes_id_and_secret() {
        // RFC 6749 §2.3.1: "a b" → "a+b", ":" → "%3A" before base64.
        let header = basic_auth("my client", "p:w");
        let encoded = header.to_str().unwrap().strip_prefix("Basic ").unwrap();
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(encoded)
            .unwrap();
        assert_eq!(decoded, b"my+client:p%3Aw");
        assert!(header.is_sensitive());
    }
}
