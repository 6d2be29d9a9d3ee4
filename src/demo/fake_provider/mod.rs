//! A small, strict OAuth 2.0 provider: the demo's embedded provider and the peer the
//! tests talk to. It issues short-lived access tokens and rotates refresh tokens; a used
//! one that comes back revokes its whole family (Auth0/Okta reuse detection, RFC 9700
//! §4.14.2) and is counted, so tests can prove none came back. It checks each client's registered authentication style
//! (form + post, form + Basic, JSON + Basic) and answers in a seed provider's style
//! (string `expires_in`, comma-separated scope). Tests script faults into it. For the
//! interactive flows it also has an authorization endpoint (PKCE S256 required), the
//! code exchange, device authorization with scriptable polling answers, revocation
//! (RFC 7009) and RFC 8414 metadata naming its own base URL as issuer.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use axum::Router;
use axum::routing::{get, post};
use rand::Rng;

use crate::clock::Clock;

mod assertion;
mod interactive;
mod token;

pub use assertion::{JwtClient, JwtKey};

use interactive::{authorize, device_authorization, metadata, revoke, whoami};
use token::token_endpoint;

/// RFC 8628 §3.4. Spelled out here rather than taken from the daemon: a test peer that
/// shares the tested code's types would mirror its mistakes.
const DEVICE_CODE_GRANT: &str = "urn:ietf:params:oauth:grant-type:device_code";
/// RFC 7523 §2.1.
const JWT_BEARER_GRANT: &str = "urn:ietf:params:oauth:grant-type:jwt-bearer";

/// Where a registered client puts its secret (RFC 6749 §2.3.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientAuth {
    /// `client_secret` in the request body.
    Post,
    /// HTTP Basic, id and secret form-urlencoded first.
    Basic,
    /// A client assertion (RFC 7523 §2.2), checked against the spec's `jwt`.
    Jwt,
    /// Mutual TLS (RFC 8705 §2): the spec's `tls_certificate` in the handshake, the
    /// `client_id` in the body, no secret.
    Tls,
}

/// The client certificate (DER) the TLS server in front of the provider received, as a
/// request extension: the router never sees TLS, so whoever terminates it inserts this.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerCertificate(pub Vec<u8>);

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
    /// With `auth: Jwt`: the key and claims its assertions must carry.
    pub jwt: Option<JwtClient>,
    /// The client certificate (DER) every request must come with: required with
    /// `auth: Tls`; with another method, a certificate-bound client (RFC 8705 §3).
    pub tls_certificate: Option<Vec<u8>>,
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
            jwt: None,
            tls_certificate: None,
        }
    }

    /// A client authenticating with assertions (`private_key_jwt`, `client_secret_jwt`):
    /// form body, `expires_in` as a number.
    pub fn assertion(id: &str, jwt: JwtClient) -> ClientSpec {
        ClientSpec {
            client_secret: None,
            auth: ClientAuth::Jwt,
            jwt: Some(jwt),
            ..ClientSpec::zywave(id, "")
        }
    }

    /// A mutual TLS client (`tls_client_auth`, `self_signed_tls_client_auth`): known by
    /// the certificate `cert_der`, which its requests must present in the handshake.
    pub fn tls(id: &str, cert_der: Vec<u8>) -> ClientSpec {
        ClientSpec {
            client_secret: None,
            auth: ClientAuth::Tls,
            tls_certificate: Some(cert_der),
            ..ClientSpec::zywave(id, "")
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
    pub jwt_bearer_grants: u64,
    /// Requests that came with the client certificate their client is registered with.
    pub client_certificates: u64,
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
    /// Like a certified OpenID provider (OIDC Core §11): `offline_access` counts only
    /// with `prompt=consent`, and a code grants a refresh token only then.
    offline_needs_consent: bool,
    devices: HashMap<String, DeviceRecord>,
    device_script: VecDeque<DevicePoll>,
    device_interval: u64,
    device_polls: Vec<SystemTime>,
    revoked: Vec<String>,
    /// Every `jti` of an accepted client assertion.
    seen_jtis: HashSet<String>,
    /// Access tokens bound to a client certificate (RFC 8705 §3), with its DER.
    bound_tokens: HashMap<String, Vec<u8>>,
    /// Why each refused client assertion was refused, in order.
    assertion_rejections: Vec<&'static str>,
    /// Who may sign `jwt-bearer` grants, by `iss`.
    bearer_issuers: HashMap<String, JwtClient>,
}

struct CodeRecord {
    client_id: String,
    redirect_uri: String,
    challenge: String,
    scope: Option<String>,
    /// The exchange may issue a refresh token.
    offline: bool,
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
                offline_needs_consent: false,
                devices: HashMap::new(),
                device_script: VecDeque::new(),
                device_interval: 5,
                device_polls: Vec::new(),
                revoked: Vec::new(),
                seen_jtis: HashSet::new(),
                bound_tokens: HashMap::new(),
                assertion_rejections: Vec::new(),
                bearer_issuers: HashMap::new(),
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

    /// Behaves like a certified OpenID provider: a login yields a refresh token only
    /// when it asked for `offline_access` with `prompt=consent` (OIDC Core §11).
    pub fn set_offline_needs_consent(&self, on: bool) {
        self.lock().offline_needs_consent = on;
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

    /// Accepts `jwt-bearer` grants (RFC 7523 §2.1) signed as `issuer` says: a service
    /// account's key, its `iss`, `sub` and `aud`.
    pub fn register_bearer_issuer(&self, issuer: JwtClient) {
        self.lock()
            .bearer_issuers
            .insert(issuer.issuer.clone(), issuer);
    }

    /// How many distinct `jti`s client assertions have carried.
    pub fn distinct_jtis(&self) -> usize {
        self.lock().seen_jtis.len()
    }

    /// Why each refused client assertion was refused (`"jti replayed"`,
    /// `"wrong audience"`, `"the assertion has expired"`, …), in order.
    pub fn assertion_rejections(&self) -> Vec<&'static str> {
        self.lock().assertion_rejections.clone()
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
