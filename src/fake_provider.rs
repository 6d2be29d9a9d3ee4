//! A small, strict OAuth 2.0 provider: the demo's embedded provider and the peer the
//! tests talk to. It issues short-lived access tokens, rotates refresh tokens and rejects
//! a used one with `invalid_grant`, checks each client's registered authentication style
//! (form + post, form + Basic, JSON + Basic) and answers in a seed provider's style
//! (string `expires_in`, comma-separated scope). Tests script faults into it.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use base64::Engine as _;
use rand::Rng;
use serde_json::{Map, Value, json};

use crate::clock::Clock;
use crate::config::{ClientAuth, RequestFormat};

/// How a registered client authenticates, and how answers to it are shaped.
#[derive(Debug, Clone)]
pub struct ClientSpec {
    pub client_id: String,
    pub client_secret: Option<String>,
    pub auth: ClientAuth,
    pub format: RequestFormat,
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
            auth: ClientAuth::ClientSecretPost,
            format: RequestFormat::Form,
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
            auth: ClientAuth::ClientSecretBasic,
            format: RequestFormat::Json,
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

/// What the provider has seen.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Counts {
    pub token_requests: u64,
    pub refresh_grants: u64,
    pub client_credentials_grants: u64,
    pub issued: u64,
    pub rejected: u64,
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
}

struct RefreshRecord {
    client_id: String,
    scope: Option<String>,
    /// When it was rotated out, if it was.
    replaced_at: Option<SystemTime>,
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
        let mut inner = self.lock();
        let token = inner.mint("rt");
        inner.refresh_tokens.insert(
            token.clone(),
            RefreshRecord {
                client_id: client_id.into(),
                scope: scope.map(str::to_string),
                replaced_at: None,
            },
        );
        token
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

    /// Whether `token` is a live (not rotated-out) refresh token.
    pub fn is_live_refresh_token(&self, token: &str) -> bool {
        self.lock()
            .refresh_tokens
            .get(token)
            .is_some_and(|r| r.replaced_at.is_none())
    }

    /// `POST /token` (the token endpoint) and `GET /api/whoami` (a resource that checks
    /// the bearer token, for demos).
    pub fn router(&self) -> Router {
        Router::new()
            .route("/token", post(token_endpoint))
            .route("/api/whoami", get(whoami))
            .with_state(self.clone())
    }

    fn answer(&self, headers: &HeaderMap, body: &[u8]) -> Result<Value, Reject> {
        let mut inner = self.lock();
        let now = self.clock.now();

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
        let wanted_json = spec.format == RequestFormat::Json;
        if wanted_json != is_json {
            inner.counts.rejected += 1;
            return Err(oauth_error(
                400,
                "invalid_request",
                "wrong request content type for this client",
            ));
        }
        let presented_secret = match spec.auth {
            ClientAuth::ClientSecretBasic => {
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
            ClientAuth::ClientSecretPost => {
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
                if let Some(at) = record.replaced_at
                    && now.duration_since(at).unwrap_or_default() > grace
                {
                    inner.counts.rejected += 1;
                    return Err(oauth_error(
                        400,
                        "invalid_grant",
                        "refresh token already used",
                    ));
                }
                let scope = record.scope.clone();
                let new_refresh = if rotate {
                    record.replaced_at.get_or_insert(now);
                    let token = inner.mint("rt");
                    inner.refresh_tokens.insert(
                        token.clone(),
                        RefreshRecord {
                            client_id: client_id.clone(),
                            scope: scope.clone(),
                            replaced_at: None,
                        },
                    );
                    Some(token)
                } else {
                    None
                };
                (scope.or_else(|| params.get("scope").cloned()), new_refresh)
            }
            Some("client_credentials") => {
                inner.counts.client_credentials_grants += 1;
                (params.get("scope").cloned(), None)
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
