//! A small, strict OAuth 2.0 provider: the demo's embedded provider and the peer the
//! tests talk to. It issues short-lived access tokens and rotates refresh tokens; a used
//! one that comes back revokes its whole family (Auth0/Okta reuse detection, RFC 9700
//! §4.14.2) and is counted, so tests can prove none came back. It checks each client's registered authentication style
//! (form + post, form + Basic, JSON + Basic) and answers in a seed provider's style
//! (string `expires_in`, comma-separated scope). Tests script faults into it. For the
//! interactive flows it also has an authorization endpoint (PKCE S256 required), the
//! code exchange, device authorization with scriptable polling answers, revocation
//! (RFC 7009) and RFC 8414 metadata naming its own base URL as issuer.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use axum::body::Bytes;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use base64::Engine as _;
use rand::Rng;
use serde_json::{Map, Value, json};
use sha2::{Digest, Sha256};

use crate::clock::Clock;

/// RFC 8628 §3.4. Spelled out here rather than taken from the daemon: a test peer that
/// shares the tested code's types would mirror its mistakes.
const DEVICE_CODE_GRANT: &str = "urn:ietf:params:oauth:grant-type:device_code";

/// Where a registered client puts its secret (RFC 6749 §2.3.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientAuth {
    /// `client_secret` in the request body.
    Post,
    /// HTTP Basic, id and secret form-urlencoded first.
    Basic,
}

/// How a registered client encodes its token requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyFormat {
    /// `application/x-www-form-urlencoded`, as RFC 6749 says.
    Form,
    /// A JSON object, as Zephr wants.
    Json,
}

/// How a registered client authenticates, and how answers to it are shaped.
#[derive(Debug, Clone)]
pub struct ClientSpec {
    pub client_id: String,
    pub client_secret: Option<String>,
    pub auth: ClientAuth,
    pub format: BodyFormat,
    /// Send `expires_in` as a string, as the generic client-credentials endpoint does.
    pub expires_in_as_string: bool,
    /// Send scope comma-separated, as Zephr does.
    pub comma_scope: bool,
    /// Issue JWT access tokens and omit `expires_in`: the lifetime is in the `exp` claim.
    pub jwt_without_expires_in: bool,
}

impl ClientSpec {
    /// Zywave: form body, client secret in the body, refresh-token grant.
    pub fn zywave(id: &str, secret: &str) -> ClientSpec {
        ClientSpec {
            client_id: id.into(),
            client_secret: Some(secret.into()),
            auth: ClientAuth::Post,
            format: BodyFormat::Form,
            expires_in_as_string: false,
            comma_scope: false,
            jwt_without_expires_in: false,
        }
    }

    /// The generic client-credentials endpoint: form + post, `expires_in` as a string.
    pub fn generic_client_credentials(id: &str, secret: &str) -> ClientSpec {
        ClientSpec {
            expires_in_as_string: true,
            ..ClientSpec::zywave(id, secret)
        }
    }

    /// Zephr: HTTP Basic client auth, JSON body, comma-separated scope.
    pub fn zephr(id: &str, secret: &str) -> ClientSpec {
        ClientSpec {
            auth: ClientAuth::Basic,
            format: BodyFormat::Json,
            comma_scope: true,
            ..ClientSpec::zywave(id, secret)
        }
    }
}

/// A scripted answer, used once, in place of the normal one.
#[derive(Debug, Clone)]
pub enum Fault {
    /// Answer with this status and a plain-text body.
    Status(u16),
    /// Answer with this status and a `Retry-After` header.
    RetryAfter(u16, String),
    /// Answer with an OAuth error (RFC 6749 §5.2).
    OAuthError(u16, &'static str),
    /// Wait this long before answering normally.
    Hang(Duration),
    /// 200 with a body that is not JSON.
    Garbage,
    /// 200 with a JSON body of this many bytes.
    Oversized(usize),
    /// 200 with a token response lacking `access_token`.
    NoAccessToken,
    /// Process the request (rotating the refresh token) but answer 502: the response is
    /// lost on the way, as when a proxy fails after the provider acted.
    LoseResponse,
}

/// A scripted answer to one device-code poll (RFC 8628 §3.5), used before the normal one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DevicePoll {
    Pending,
    SlowDown,
    Denied,
    Expired,
}

/// What the provider has seen.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Counts {
    pub token_requests: u64,
    pub refresh_grants: u64,
    pub client_credentials_grants: u64,
    pub issued: u64,
    pub rejected: u64,
    /// Rotated-out refresh tokens presented again after the grace period: each one
    /// revoked its family. A daemon that never loses track of its token keeps this 0.
    pub reuse_detected: u64,
    /// Rotated-out refresh tokens accepted again inside the grace period: the family
    /// then has two live branches (a fork). Counted so a test can prove none happened.
    pub forks: u64,
}

struct Inner {
    clients: HashMap<String, ClientSpec>,
    lifetime: Duration,
    rotate: bool,
    /// How long a rotated-out refresh token is still accepted (Okta, Auth0 style).
    reuse_grace: Duration,
    refresh_tokens: HashMap<String, RefreshRecord>,
    access_tokens: HashMap<String, SystemTime>,
    faults: VecDeque<Fault>,
    counts: Counts,
    serial: u64,
    /// Every token ever issued, so tests can look for any of them where none may be.
    minted: Vec<String>,
    /// Delay between acting on a request and answering it: the window in which a crash
    /// loses a rotation.
    latency: Duration,
    /// Requests acted on whose answer has not been sent yet, and the most ever at once.
    unanswered: u64,
    peak_unanswered: u64,
    /// The provider's external base URL (issuer and endpoints of its metadata).
    base_url: Option<String>,
    /// Metadata answers 503 while false: the provider is down at discovery.
    metadata_up: bool,
    /// Redirect URIs registered per client. Loopback http ones match any port
    /// (RFC 8252 §7.3).
    redirect_uris: HashMap<String, Vec<String>>,
    codes: HashMap<String, CodeRecord>,
    /// The next authorization is refused by the "user" (`error=access_denied`).
    deny_next: bool,
    devices: HashMap<String, DeviceRecord>,
    device_script: VecDeque<DevicePoll>,
    device_interval: u64,
    device_polls: Vec<SystemTime>,
    revoked: Vec<String>,
}

struct CodeRecord {
    client_id: String,
    redirect_uri: String,
    challenge: String,
    scope: Option<String>,
    used: bool,
}

struct DeviceRecord {
    client_id: String,
    user_code: String,
    scope: Option<String>,
    approved: bool,
    used: bool,
}

struct RefreshRecord {
    client_id: String,
    scope: Option<String>,
    /// The grant this token descends from: every rotation keeps it, and a detected reuse
    /// revokes every token that shares it.
    family: u64,
    /// When it was rotated out, if it was.
    replaced_at: Option<SystemTime>,
    /// Its family was revoked (reuse detected, or RFC 7009 revocation).
    revoked: bool,
}

/// The provider. Clones share state.
#[derive(Clone)]
pub struct FakeProvider {
    inner: Arc<Mutex<Inner>>,
    clock: Clock,
}

impl FakeProvider {
    /// A provider issuing access tokens of `lifetime`, rotating refresh tokens.
    pub fn new(lifetime: Duration, clock: Clock) -> FakeProvider {
        FakeProvider {
            inner: Arc::new(Mutex::new(Inner {
                clients: HashMap::new(),
                lifetime,
                rotate: true,
                reuse_grace: Duration::ZERO,
                refresh_tokens: HashMap::new(),
                access_tokens: HashMap::new(),
                faults: VecDeque::new(),
                counts: Counts::default(),
                serial: 0,
                minted: Vec::new(),
                latency: Duration::ZERO,
                unanswered: 0,
                peak_unanswered: 0,
                base_url: None,
                metadata_up: true,
                redirect_uris: HashMap::new(),
                codes: HashMap::new(),
                deny_next: false,
                devices: HashMap::new(),
                device_script: VecDeque::new(),
                device_interval: 5,
                device_polls: Vec::new(),
                revoked: Vec::new(),
            })),
            clock,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().expect("fake provider lock")
    }

    pub fn register(&self, spec: ClientSpec) {
        self.lock().clients.insert(spec.client_id.clone(), spec);
    }

    /// Issues a refresh token for `client_id`, as a human's consent would.
    pub fn grant_refresh_token(&self, client_id: &str, scope: Option<&str>) -> String {
        self.lock()
            .new_refresh_token(client_id, scope.map(str::to_string))
    }

    pub fn set_lifetime(&self, lifetime: Duration) {
        self.lock().lifetime = lifetime;
    }

    pub fn set_rotation(&self, rotate: bool) {
        self.lock().rotate = rotate;
    }

    /// How many requests have been acted on (a refresh token rotated) but not answered:
    /// a crash now loses those rotations.
    pub fn unanswered(&self) -> u64 {
        self.lock().unanswered
    }

    /// The most requests ever waiting for their answer at once (with a latency set).
    pub fn peak_unanswered(&self) -> u64 {
        self.lock().peak_unanswered
    }

    /// Answers each token request this long after acting on it.
    pub fn set_latency(&self, latency: Duration) {
        self.lock().latency = latency;
    }

    pub fn set_reuse_grace(&self, grace: Duration) {
        self.lock().reuse_grace = grace;
    }

    /// Queues faults; each replaces one answer, in order.
    pub fn push_faults(&self, faults: impl IntoIterator<Item = Fault>) {
        self.lock().faults.extend(faults);
    }

    /// Every access and refresh token issued so far.
    pub fn minted(&self) -> Vec<String> {
        self.lock().minted.clone()
    }

    /// Drops every fault not yet used.
    pub fn clear_faults(&self) {
        self.lock().faults.clear();
    }

    pub fn counts(&self) -> Counts {
        self.lock().counts.clone()
    }

    /// Whether `token` is a currently valid access token (what a resource server checks).
    pub fn is_valid_access_token(&self, token: &str) -> bool {
        let now = self.clock.now();
        self.lock()
            .access_tokens
            .get(token)
            .is_some_and(|exp| *exp > now)
    }

    /// Whether `token` is a live refresh token: not rotated out, its family not revoked.
    pub fn is_live_refresh_token(&self, token: &str) -> bool {
        self.lock()
            .refresh_tokens
            .get(token)
            .is_some_and(|r| r.replaced_at.is_none() && !r.revoked)
    }

    /// How many live refresh tokens `client_id` holds: after any sequence of refreshes,
    /// crashes and restarts by one holder this is exactly the number of grants it was
    /// given; more means a fork, fewer a revoked family.
    pub fn live_refresh_tokens(&self, client_id: &str) -> usize {
        self.lock()
            .refresh_tokens
            .values()
            .filter(|r| r.client_id == client_id && r.replaced_at.is_none() && !r.revoked)
            .count()
    }

    /// The URL the provider is reached at (`http://127.0.0.1:PORT`): its metadata names
    /// it as issuer and builds its endpoints on it. Without one, no metadata is served.
    pub fn set_base_url(&self, base: &str) {
        self.lock().base_url = Some(base.trim_end_matches('/').to_string());
    }

    /// While `false`, the metadata document answers 503 (the provider is down).
    pub fn set_metadata_available(&self, up: bool) {
        self.lock().metadata_up = up;
    }

    /// Registers a redirect URI for `client_id` (a loopback `http://127.0.0.1/...` one
    /// matches any port).
    pub fn register_redirect_uri(&self, client_id: &str, uri: &str) {
        self.lock()
            .redirect_uris
            .entry(client_id.into())
            .or_default()
            .push(uri.into());
    }

    /// The user refuses the next authorization: it redirects with `error=access_denied`.
    pub fn deny_next_authorization(&self) {
        self.lock().deny_next = true;
    }

    /// The `interval` device authorization responses name, in seconds (default 5).
    pub fn set_device_interval(&self, secs: u64) {
        self.lock().device_interval = secs;
    }

    /// Queues answers to device-code polls; each replaces one normal answer, in order.
    pub fn push_device_polls(&self, polls: impl IntoIterator<Item = DevicePoll>) {
        self.lock().device_script.extend(polls);
    }

    /// The user codes of device authorizations not yet approved.
    pub fn pending_user_codes(&self) -> Vec<String> {
        self.lock()
            .devices
            .values()
            .filter(|d| !d.approved)
            .map(|d| d.user_code.clone())
            .collect()
    }

    /// The user enters `user_code` and approves: the next normal poll gets tokens.
    pub fn approve_device(&self, user_code: &str) -> bool {
        let mut inner = self.lock();
        let found = inner
            .devices
            .values_mut()
            .find(|d| d.user_code == user_code);
        found.map(|d| d.approved = true).is_some()
    }

    /// When each device-code poll arrived (provider clock).
    pub fn device_poll_times(&self) -> Vec<SystemTime> {
        self.lock().device_polls.clone()
    }

    /// Every token revoked through `POST /revoke`, in order.
    pub fn revoked(&self) -> Vec<String> {
        self.lock().revoked.clone()
    }

    /// `POST /token` (the token endpoint), `GET /api/whoami` (a resource that checks the
    /// bearer token, for demos), `GET /authorize`, `POST /device_authorization`,
    /// `POST /revoke` and `GET /.well-known/oauth-authorization-server`.
    pub fn router(&self) -> Router {
        Router::new()
            .route("/token", post(token_endpoint))
            .route("/api/whoami", get(whoami))
            .route("/authorize", get(authorize))
            .route("/device_authorization", post(device_authorization))
            .route("/revoke", post(revoke))
            .route("/.well-known/oauth-authorization-server", get(metadata))
            .with_state(self.clone())
    }

    /// Parses a request body (form or JSON) and authenticates the client the way it is
    /// registered.
    fn authenticate(
        &self,
        inner: &mut Inner,
        headers: &HeaderMap,
        body: &[u8],
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
        let presented_secret = match spec.auth {
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

    fn answer(&self, headers: &HeaderMap, body: &[u8]) -> Result<Value, Reject> {
        let mut inner = self.lock();
        let now = self.clock.now();
        let (client_id, params) = self.authenticate(&mut inner, headers, body)?;
        let spec = inner.clients[&client_id].clone();

        let (scope, new_refresh) = match params.get("grant_type").map(String::as_str) {
            Some("refresh_token") => {
                inner.counts.refresh_grants += 1;
                let presented = params.get("refresh_token").cloned().unwrap_or_default();
                let grace = inner.reuse_grace;
                let rotate = inner.rotate;
                let Some(record) = inner.refresh_tokens.get_mut(&presented) else {
                    inner.counts.rejected += 1;
                    return Err(oauth_error(400, "invalid_grant", "unknown refresh token"));
                };
                if record.client_id != client_id {
                    inner.counts.rejected += 1;
                    return Err(oauth_error(
                        400,
                        "invalid_grant",
                        "refresh token of another client",
                    ));
                }
                if record.revoked {
                    inner.counts.rejected += 1;
                    return Err(oauth_error(400, "invalid_grant", "refresh token revoked"));
                }
                let family = record.family;
                let scope = record.scope.clone();
                if let Some(at) = record.replaced_at {
                    if now.duration_since(at).unwrap_or_default() > grace {
                        inner.revoke_family(family);
                        inner.counts.reuse_detected += 1;
                        inner.counts.rejected += 1;
                        return Err(oauth_error(
                            400,
                            "invalid_grant",
                            "refresh token already used; its grant is revoked",
                        ));
                    }
                    inner.counts.forks += 1;
                } else if rotate {
                    record.replaced_at = Some(now);
                }
                let new_refresh = if rotate {
                    Some(inner.rotated_refresh_token(&client_id, scope.clone(), family))
                } else {
                    None
                };
                (scope.or_else(|| params.get("scope").cloned()), new_refresh)
            }
            Some("client_credentials") => {
                inner.counts.client_credentials_grants += 1;
                (params.get("scope").cloned(), None)
            }
            Some("authorization_code") => {
                let code = params.get("code").cloned().unwrap_or_default();
                let Some(record) = inner.codes.get_mut(&code) else {
                    inner.counts.rejected += 1;
                    return Err(oauth_error(400, "invalid_grant", "unknown code"));
                };
                // RFC 6749 §4.1.2: a code is used once.
                if record.used {
                    inner.counts.rejected += 1;
                    return Err(oauth_error(400, "invalid_grant", "code already used"));
                }
                record.used = true;
                if record.client_id != client_id {
                    inner.counts.rejected += 1;
                    return Err(oauth_error(400, "invalid_grant", "code of another client"));
                }
                if params.get("redirect_uri") != Some(&record.redirect_uri) {
                    inner.counts.rejected += 1;
                    return Err(oauth_error(400, "invalid_grant", "redirect_uri differs"));
                }
                let verifier = params.get("code_verifier").cloned().unwrap_or_default();
                if s256(&verifier) != record.challenge {
                    inner.counts.rejected += 1;
                    return Err(oauth_error(
                        400,
                        "invalid_grant",
                        "code_verifier does not match the code_challenge",
                    ));
                }
                let scope = record.scope.clone();
                let token = inner.new_refresh_token(&client_id, scope.clone());
                (scope, Some(token))
            }
            Some(DEVICE_CODE_GRANT) => {
                inner.device_polls.push(now);
                let code = params.get("device_code").cloned().unwrap_or_default();
                if !inner.devices.contains_key(&code) {
                    inner.counts.rejected += 1;
                    return Err(oauth_error(400, "invalid_grant", "unknown device_code"));
                }
                match inner.device_script.pop_front() {
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
                let device = inner.devices.get_mut(&code).expect("checked above");
                if !device.approved {
                    return Err(oauth_error(400, "authorization_pending", "not yet"));
                }
                if device.used || device.client_id != client_id {
                    inner.counts.rejected += 1;
                    return Err(oauth_error(400, "invalid_grant", "device_code used"));
                }
                device.used = true;
                let scope = device.scope.clone();
                let token = inner.new_refresh_token(&client_id, scope.clone());
                (scope, Some(token))
            }
            _ => {
                inner.counts.rejected += 1;
                return Err(oauth_error(
                    400,
                    "unsupported_grant_type",
                    "grant not supported",
                ));
            }
        };

        let lifetime = inner.lifetime;
        let access = if spec.jwt_without_expires_in {
            let exp = now + lifetime;
            let secs = exp
                .duration_since(SystemTime::UNIX_EPOCH)
                .unwrap_or_default()
                .as_secs();
            let payload = base64::engine::general_purpose::URL_SAFE_NO_PAD
                .encode(format!(r#"{{"exp":{secs},"n":{}}}"#, inner.serial + 1));
            inner.serial += 1;
            let token = format!("eyJhbGciOiJub25lIn0.{payload}.sig");
            inner.minted.push(token.clone());
            token
        } else {
            inner.mint("at")
        };
        inner.access_tokens.insert(access.clone(), now + lifetime);
        inner.counts.issued += 1;

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
        Ok(response)
    }
}

impl Inner {
    /// The first refresh token of a new grant (consent, code exchange, device flow).
    fn new_refresh_token(&mut self, client_id: &str, scope: Option<String>) -> String {
        self.serial += 1;
        let family = self.serial;
        self.rotated_refresh_token(client_id, scope, family)
    }

    /// The next refresh token of `family`.
    fn rotated_refresh_token(
        &mut self,
        client_id: &str,
        scope: Option<String>,
        family: u64,
    ) -> String {
        let token = self.mint("rt");
        self.refresh_tokens.insert(
            token.clone(),
            RefreshRecord {
                client_id: client_id.into(),
                scope,
                family,
                replaced_at: None,
                revoked: false,
            },
        );
        token
    }

    fn revoke_family(&mut self, family: u64) {
        for record in self.refresh_tokens.values_mut() {
            if record.family == family {
                record.revoked = true;
            }
        }
    }

    fn redirect_uri_registered(&self, client_id: &str, uri: &str) -> bool {
        let Ok(presented) = url::Url::parse(uri) else {
            return false;
        };
        self.redirect_uris
            .get(client_id)
            .into_iter()
            .flatten()
            .any(|registered| {
                if registered == uri {
                    return true;
                }
                let Ok(r) = url::Url::parse(registered) else {
                    return false;
                };
                // RFC 8252 §7.3: any port for a loopback IP literal.
                r.scheme() == "http"
                    && presented.scheme() == "http"
                    && matches!(r.host_str(), Some("127.0.0.1" | "[::1]"))
                    && r.host_str() == presented.host_str()
                    && r.path() == presented.path()
                    && r.query() == presented.query()
            })
    }

    fn base(&self) -> String {
        self.base_url
            .clone()
            .unwrap_or_else(|| "http://127.0.0.1".into())
    }

    fn mint(&mut self, kind: &str) -> String {
        self.serial += 1;
        let noise: u64 = rand::rng().random();
        let token = format!("{kind}-{}-{noise:016x}", self.serial);
        self.minted.push(token.clone());
        token
    }
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
struct Reject(u16, &'static str, &'static str);

fn oauth_error(status: u16, error: &'static str, description: &'static str) -> Reject {
    Reject(status, error, description)
}

fn reject_response(Reject(status, error, description): Reject) -> Response {
    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_REQUEST);
    (
        status,
        Json(json!({ "error": error, "error_description": description })),
    )
        .into_response()
}

async fn token_endpoint(
    State(provider): State<FakeProvider>,
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
            let _ = provider.answer(&headers, &body);
            return (StatusCode::BAD_GATEWAY, "response lost").into_response();
        }
    }
    let answer = provider.answer(&headers, &body);
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

/// RFC 7636 §4.2: BASE64URL(SHA256(verifier)).
fn s256(verifier: &str) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(Sha256::digest(verifier.as_bytes()))
}

/// `GET /authorize` (RFC 6749 §4.1.1, RFC 7636 §4.3): the user is taken to have logged
/// in and consented at once. Errors about the client or redirect URI are shown to the
/// user (never redirected, §4.1.2.1); the others go back to the redirect URI.
async fn authorize(
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
    inner.codes.insert(
        code.clone(),
        CodeRecord {
            client_id,
            redirect_uri: redirect_uri.clone(),
            challenge,
            scope,
            used: false,
        },
    );
    back(&[("code", &code)])
}

/// `POST /device_authorization` (RFC 8628 §3.1, §3.2).
async fn device_authorization(
    State(provider): State<FakeProvider>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let mut inner = provider.lock();
    let (client_id, params) = match provider.authenticate(&mut inner, &headers, &body) {
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
async fn revoke(State(provider): State<FakeProvider>, headers: HeaderMap, body: Bytes) -> Response {
    let mut inner = provider.lock();
    let (client_id, params) = match provider.authenticate(&mut inner, &headers, &body) {
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
async fn metadata(State(provider): State<FakeProvider>) -> Response {
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

async fn whoami(State(provider): State<FakeProvider>, headers: HeaderMap) -> Response {
    let token = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    match token {
        Some(t) if provider.is_valid_access_token(t) => Json(
            json!({ "ok": true, "profile": headers.get("profile").and_then(|v| v.to_str().ok()) }),
        )
        .into_response(),
        _ => (
            StatusCode::UNAUTHORIZED,
            [(header::WWW_AUTHENTICATE, "Bearer error=\"invalid_token\"")],
            "invalid or expired token",
        )
            .into_response(),
    }
}
