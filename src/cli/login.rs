//! Getting a refresh token into an account, and giving it up: the authorization code
//! flow with PKCE (RFC 7636) through a loopback redirect listener (RFC 8252 §7.3) or a
//! code pasted by hand, the device authorization grant (RFC 8628), a token read from
//! stdin, and logout with revocation (RFC 7009). A new refresh token is checked against
//! the spent ones and tried with one refresh before it replaces anything; the result is
//! handed to the account's state through `store::deliver_handoff` (and SIGHUP when a
//! daemon holds it). It runs in the CLI, never in the daemon; the terminal side is
//! `login_cmd`'s.

use std::io::Write;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use axum::extract::{RawQuery, State};
use axum::http::{StatusCode, Uri};
use axum::response::{Html, IntoResponse, Response};
use base64::Engine as _;
use rand::RngCore;
use reqwest::Url;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::time::Instant;

use crate::config::{AccountConfig, Config, Grant, Prompt, is_loopback_host};
use crate::provider::discovery::DiscoveryError;
use crate::provider::{Provider, ProviderError, TokenGrant};
use crate::secret::Secret;
use crate::store::{self, AccessToken, Delivery, Handoff, NewChain, SpentBy, StoreError};

/// The path of the default redirect URI, `http://127.0.0.1:<ephemeral>/callback`.
pub const DEFAULT_CALLBACK_PATH: &str = "/callback";
/// How long a hand-off waits for a running daemon to take the handoff file.
pub const HANDOFF_WAIT: Duration = Duration::from_secs(30);
/// RFC 8628 §3.5: `slow_down` adds this to the polling interval.
pub const SLOW_DOWN_STEP: Duration = Duration::from_secs(5);

/// Why a login, import or logout failed. No message holds a secret.
#[derive(Debug, thiserror::Error)]
pub enum LoginError {
    #[error("no account named {0:?} is configured")]
    UnknownAccount(String),
    /// `login`, `import`, `logout` and `state` handle refresh tokens; `how` says where
    /// the account's tokens come from instead.
    #[error(
        "account {account} uses the {grant} grant: it has no refresh token to log in, import or revoke ({how})"
    )]
    NotRefreshToken {
        account: String,
        grant: &'static str,
        how: &'static str,
    },
    #[error("account {account} has no {what}: set it in the config, or set issuer to discover it")]
    Missing { account: String, what: &'static str },
    #[error(
        "cannot listen for the redirect at {0}: only http:// redirect URIs on a loopback address can be listened on; use --manual (or --device)"
    )]
    NotListenable(String),
    #[error("login --manual needs accounts.{0}.redirect_uri: the URI registered with the provider")]
    ManualNeedsRedirect(String),
    #[error("discovery failed: {0}")]
    Discovery(#[from] DiscoveryError),
    #[error("cannot listen on {addr} for the redirect: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error(
        "the state in the redirect does not match this login: it is not the answer to the URL printed here (a stale tab, or a forged request); nothing was exchanged"
    )]
    StateMismatch,
    #[error("the provider refused the authorization: {error}{}", describe(.description))]
    Denied {
        error: String,
        description: Option<String>,
    },
    #[error("the redirect carries neither a code nor an error")]
    NoCode,
    #[error("no answer within {}", humantime::format_duration(*.0))]
    Timeout(Duration),
    #[error("the code exchange failed: {0}")]
    Exchange(#[source] ProviderError),
    #[error("the device authorization request failed: {0}")]
    Device(#[source] ProviderError),
    #[error("the user denied the device authorization (access_denied)")]
    DeviceDenied,
    #[error(
        "the device code expired before the user approved it (expired_token): run login --device again"
    )]
    DeviceExpired,
    #[error("the revocation request failed: {0} (use --no-revoke to drop the local state anyway)")]
    Revoke(#[source] ProviderError),
    #[error(
        "the provider issued no refresh token: ask for offline_access in the scope, if the provider knows it"
    )]
    NoRefreshToken,
    #[error("cannot read standard input: {0}")]
    Stdin(std::io::Error),
    #[error("nothing was read from standard input")]
    EmptyInput,
    #[error(
        "this refresh token was presented to the provider before ({why}): presenting it again would make a provider that detects reuse revoke its whole family; nothing was sent and account {account} is unchanged. Get a new one with `tokend login {account}`"
    )]
    Spent { account: String, why: SpentBy },
    #[error(
        "the provider refused the refresh token: {0}; nothing was changed: the account keeps its previous refresh token and state"
    )]
    Refused(#[source] ProviderError),
    #[error("{0}")]
    Store(#[from] StoreError),
    #[error(
        "the daemon took the handoff but {new} did not take over the state of {old}: its log says why, and `tokend status` shows {new}'s state"
    )]
    NotAdopted { old: String, new: String },
    #[error(
        "the daemon (pid {pid}) could not be told to reload: {source}; the handoff waits in {path}: send it SIGHUP (systemctl reload tokend)"
    )]
    Signal {
        pid: i32,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "a daemon holds the state directory but its pid is unknown; the handoff waits in {0}: send it SIGHUP (systemctl reload tokend)"
    )]
    NoPid(PathBuf),
    #[error(
        "the daemon did not take the handoff within {}; it waits in {path} and is applied at the daemon's next reload or start",
        humantime::format_duration(*.waited)
    )]
    NotTaken { path: PathBuf, waited: Duration },
}

fn describe(description: &Option<String>) -> String {
    description
        .as_ref()
        .map(|d| format!(": {d}"))
        .unwrap_or_default()
}

impl LoginError {
    /// The exit code (see `cli::exit`): usage errors 2, config problems 78, the client
    /// refused by the provider 77, a daemon that does not take the handoff 69, else 1.
    pub fn exit_code(&self) -> u8 {
        use super::exit;
        match self {
            LoginError::UnknownAccount(_)
            | LoginError::NotRefreshToken { .. }
            | LoginError::NotListenable(_) => exit::USAGE,
            LoginError::Missing { .. } | LoginError::ManualNeedsRedirect(_) => exit::CONFIG,
            LoginError::Refused(e) if is_client_refused(e) => exit::NOPERM,
            LoginError::Signal { .. } | LoginError::NoPid(_) | LoginError::NotTaken { .. } => {
                exit::UNAVAILABLE
            }
            _ => exit::FAILURE,
        }
    }
}

/// The provider refused this client, not the token: its id, secret or authentication.
fn is_client_refused(e: &ProviderError) -> bool {
    matches!(
        e.oauth_error(),
        Some("invalid_client" | "unauthorized_client")
    ) || matches!(
        e,
        ProviderError::Http {
            status: 401 | 403,
            ..
        }
    )
}

/// The account named `name`, if it takes refresh tokens.
pub fn refresh_account(config: &Config, name: &str) -> Result<Arc<AccountConfig>, LoginError> {
    let account = crate::config::AccountName::parse(name)
        .ok()
        .and_then(|n| config.accounts.get(&n).cloned())
        .ok_or_else(|| LoginError::UnknownAccount(name.to_string()))?;
    match account.grant {
        Grant::RefreshToken { .. } => Ok(account),
        Grant::ClientCredentials => Err(LoginError::NotRefreshToken {
            account: name.to_string(),
            grant: "client_credentials",
            how: "tokend gets each token with the client's credentials",
        }),
        Grant::JwtBearer(_) => Err(LoginError::NotRefreshToken {
            account: name.to_string(),
            grant: "jwt_bearer",
            how: "tokend signs a new assertion for each token with its key",
        }),
    }
}

// ---------------------------------------------------------------------------------------
// PKCE, state and the authorization URL.

/// A PKCE pair (RFC 7636 §4.1, §4.2): the verifier stays here, the challenge travels.
pub struct Pkce {
    pub verifier: Secret,
    pub challenge: String,
}

impl Pkce {
    /// A verifier of 32 random bytes, base64url (43 characters), and its S256 challenge.
    pub fn generate() -> Pkce {
        let mut bytes = [0u8; 32];
        rand::rng().fill_bytes(&mut bytes);
        let verifier = base64url(&bytes);
        zeroize::Zeroize::zeroize(&mut bytes);
        Pkce::from_verifier(Secret::new(verifier))
    }

    pub fn from_verifier(verifier: Secret) -> Pkce {
        let challenge = base64url(&Sha256::digest(verifier.expose().as_bytes()));
        Pkce {
            verifier,
            challenge,
        }
    }
}

fn base64url(bytes: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

/// The `state` that ties the redirect to this login (RFC 6749 §10.12): 16 random bytes.
pub fn random_state() -> String {
    let mut bytes = [0u8; 16];
    rand::rng().fill_bytes(&mut bytes);
    base64url(&bytes)
}

/// The scope to ask for at login: the configured one, plus `offline_access` when the
/// provider's metadata lists it and the scope lacks it (without it, such providers issue
/// no refresh token).
pub fn login_scope(account: &AccountConfig) -> Option<String> {
    let supported = account
        .endpoints
        .scopes_supported
        .as_ref()
        .is_some_and(|s| s.iter().any(|x| x == "offline_access"));
    let scope = account.scope.clone();
    let has = scope.as_deref().is_some_and(asks_offline);
    match scope {
        _ if !supported || has => scope,
        None => Some("offline_access".into()),
        Some(s) if s.contains(',') => Some(format!("{s}, offline_access")),
        Some(s) => Some(format!("{s} offline_access")),
    }
}

/// The URL the user opens (RFC 6749 §4.1.1 with RFC 7636 §4.3), keeping any query the
/// authorization endpoint already has.
pub fn authorize_url(
    account: &AccountConfig,
    redirect_uri: &str,
    scope: Option<&str>,
    state: &str,
    code_challenge: &str,
) -> Result<Url, LoginError> {
    let mut url = account
        .endpoints
        .authorization
        .as_deref()
        .cloned()
        .ok_or_else(|| LoginError::Missing {
            account: account.name.to_string(),
            what: "authorization_endpoint",
        })?;
    {
        let mut q = url.query_pairs_mut();
        q.append_pair("response_type", "code")
            .append_pair("client_id", &account.client_id)
            .append_pair("redirect_uri", redirect_uri);
        if let Some(scope) = scope {
            q.append_pair("scope", scope);
        }
        q.append_pair("state", state)
            .append_pair("code_challenge", code_challenge)
            .append_pair("code_challenge_method", "S256");
        if let Some(prompt) = prompt(account, scope) {
            q.append_pair("prompt", prompt);
        }
        for (k, v) in &account.authorize.params {
            q.append_pair(k, v);
        }
    }
    Ok(url)
}

/// The `prompt` to send: as configured, else `consent` when the scope asks for
/// `offline_access` — OIDC Core §11 has a provider ignore `offline_access` without it,
/// and then the login ends without a refresh token.
fn prompt<'a>(account: &'a AccountConfig, scope: Option<&str>) -> Option<&'a str> {
    match &account.authorize.prompt {
        Prompt::Value(v) => Some(v),
        Prompt::Omit => None,
        Prompt::Auto => scope.is_some_and(asks_offline).then_some("consent"),
    }
}

/// Whether a scope (space- or comma-separated) holds `offline_access`.
fn asks_offline(scope: &str) -> bool {
    scope
        .split(|c: char| c == ',' || c.is_whitespace())
        .any(|x| x == "offline_access")
}

// ---------------------------------------------------------------------------------------
// The answer: a redirect's query, or what the user pasted.

/// What the redirect's query says: the code, once the state matched.
pub fn parse_redirect_query(query: &str, expected_state: &str) -> Result<Secret, LoginError> {
    let mut code = None;
    let mut state = None;
    let mut error = None;
    let mut description = None;
    for (k, v) in form_urlencoded::parse(query.as_bytes()) {
        match &*k {
            "code" => code = Some(Secret::new(v.into_owned())),
            "state" => state = Some(v.into_owned()),
            "error" => error = Some(v.into_owned()),
            "error_description" => description = Some(v.into_owned()),
            _ => {}
        }
    }
    // The state is checked first, errors included: an unrelated redirect must not end
    // this login with its message.
    let matches = state
        .as_deref()
        .is_some_and(|s| bool::from(s.as_bytes().ct_eq(expected_state.as_bytes())));
    if !matches {
        return Err(LoginError::StateMismatch);
    }
    if let Some(error) = error {
        return Err(LoginError::Denied { error, description });
    }
    code.filter(|c| !c.is_empty()).ok_or(LoginError::NoCode)
}

/// What the user pasted in `--manual` mode.
#[derive(Debug)]
pub enum Pasted {
    /// From a whole redirect URL (or its query): the state was checked.
    Checked(Secret),
    /// A bare code: there was no state to check.
    BareCode(Secret),
}

/// Reads a pasted line: the whole redirect URL (`https://app/cb?code=..&state=..`), its
/// query (`code=..&state=..`), or the bare code.
pub fn parse_pasted(input: &str, expected_state: &str) -> Result<Pasted, LoginError> {
    let input = input.trim();
    if input.is_empty() {
        return Err(LoginError::EmptyInput);
    }
    let query = if let Ok(url) = Url::parse(input)
        && url.has_host()
    {
        Some(url.query().unwrap_or("").to_string())
    } else if input.contains("code=") || input.contains("error=") || input.contains("state=") {
        Some(input.trim_start_matches('?').to_string())
    } else {
        None
    };
    match query {
        Some(q) => parse_redirect_query(&q, expected_state).map(Pasted::Checked),
        None => Ok(Pasted::BareCode(Secret::new(input))),
    }
}

// ---------------------------------------------------------------------------------------
// The loopback listener.

/// A listener bound for the redirect, and the redirect URI that reaches it.
pub struct LoopbackListener {
    listener: TcpListener,
    redirect_uri: Url,
}

impl LoopbackListener {
    /// Binds where `configured` points (an `http://` URI on a loopback address; without
    /// a port, any free one), or at `http://127.0.0.1:<ephemeral>/callback`.
    pub async fn bind(configured: Option<&Url>) -> Result<LoopbackListener, LoginError> {
        let mut uri = match configured {
            Some(u) => u.clone(),
            None => Url::parse(&format!("http://127.0.0.1{DEFAULT_CALLBACK_PATH}"))
                .expect("literal URL parses"),
        };
        if uri.scheme() != "http" || !is_loopback_host(&uri) {
            return Err(LoginError::NotListenable(uri.to_string()));
        }
        let ip = match uri.host() {
            Some(url::Host::Ipv4(ip)) => IpAddr::V4(ip),
            Some(url::Host::Ipv6(ip)) => IpAddr::V6(ip),
            // `localhost`: the browser resolves it; 127.0.0.1 is what it resolves to
            // almost everywhere (RFC 8252 §8.3 prefers the IP literal for this reason).
            _ => IpAddr::V4(Ipv4Addr::LOCALHOST),
        };
        let addr = SocketAddr::new(ip, uri.port().unwrap_or(0));
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| LoginError::Bind { addr, source })?;
        if uri.port().is_none() {
            let port = listener
                .local_addr()
                .map_err(|source| LoginError::Bind { addr, source })?
                .port();
            uri.set_port(Some(port)).expect("an http URL takes a port");
        }
        Ok(LoopbackListener {
            listener,
            redirect_uri: uri,
        })
    }

    pub fn redirect_uri(&self) -> &str {
        self.redirect_uri.as_str()
    }

    /// Serves the redirect URI until the first request to its path, answers the browser
    /// with a small page, and returns the code (or why there is none). Requests to other
    /// paths get 404 and are otherwise ignored. Bounded by `timeout`.
    pub async fn wait(self, state: &str, timeout: Duration) -> Result<Secret, LoginError> {
        let (tx, rx) = oneshot::channel();
        let shared = Arc::new(Callback {
            path: self.redirect_uri.path().to_string(),
            state: state.to_string(),
            reply: Mutex::new(Some(tx)),
        });
        let router = axum::Router::new().fallback(callback).with_state(shared);
        let (stop_tx, stop_rx) = oneshot::channel::<()>();
        let server = tokio::spawn(
            axum::serve(self.listener, router)
                .with_graceful_shutdown(async {
                    let _ = stop_rx.await;
                })
                .into_future(),
        );
        let outcome = tokio::time::timeout(timeout, rx).await;
        let _ = stop_tx.send(());
        // The page is on its way; an idle keep-alive connection must not hold us.
        let _ = tokio::time::timeout(Duration::from_secs(2), server).await;
        match outcome {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err(LoginError::NoCode),
            Err(_) => Err(LoginError::Timeout(timeout)),
        }
    }
}

type Reply = oneshot::Sender<Result<Secret, LoginError>>;

struct Callback {
    path: String,
    state: String,
    reply: Mutex<Option<Reply>>,
}

async fn callback(
    State(cb): State<Arc<Callback>>,
    uri: Uri,
    RawQuery(query): RawQuery,
) -> Response {
    if uri.path() != cb.path {
        return (StatusCode::NOT_FOUND, "not found").into_response();
    }
    let Some(reply) = cb.reply.lock().expect("callback lock").take() else {
        return page(StatusCode::GONE, "This login is already finished.");
    };
    let result = parse_redirect_query(query.as_deref().unwrap_or(""), &cb.state);
    let response = match &result {
        Ok(_) => page(
            StatusCode::OK,
            "tokend received the authorization. You can close this window.",
        ),
        Err(e) => page(
            StatusCode::BAD_REQUEST,
            &format!("tokend login failed: {e}. You can close this window."),
        ),
    };
    let _ = reply.send(result);
    response
}

fn page(status: StatusCode, message: &str) -> Response {
    let escaped = message
        .replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;");
    let body = format!(
        "<!doctype html><html><head><meta charset=\"utf-8\"><title>tokend login</title></head><body><p>{escaped}</p></body></html>"
    );
    let mut response = (status, Html(body)).into_response();
    response.headers_mut().insert(
        http::header::CACHE_CONTROL,
        http::HeaderValue::from_static("no-store"),
    );
    response
}

// ---------------------------------------------------------------------------------------
// Token requests.

/// Exchanges the code (RFC 6749 §4.1.3, RFC 7636 §4.5) and returns the refresh token.
pub async fn exchange_code(
    provider: &Provider,
    account: &AccountConfig,
    code: &Secret,
    redirect_uri: &str,
    verifier: &Secret,
) -> Result<Secret, LoginError> {
    let grant = TokenGrant::AuthorizationCode {
        code,
        redirect_uri,
        code_verifier: verifier,
    };
    let response = provider
        .request_token(account, grant)
        .await
        .map_err(LoginError::Exchange)?;
    response.refresh_token.ok_or(LoginError::NoRefreshToken)
}

/// RFC 8628: asks for a user code, tells the user where to enter it (on `out`), then
/// polls the token endpoint every `interval` (`slow_down` adds 5 s) until the user
/// approves or refuses, or the code expires; bounded by `limit` too.
pub async fn device_flow(
    provider: &Provider,
    account: &AccountConfig,
    out: &mut (dyn Write + Send),
    limit: Duration,
) -> Result<Secret, LoginError> {
    let auth = provider
        .device_authorization(account)
        .await
        .map_err(LoginError::Device)?;
    let _ = match &auth.verification_uri_complete {
        Some(complete) => writeln!(
            out,
            "To authorize account {}, open\n\n  {complete}\n\nand check that it shows the code {}\n(or open {} and enter the code).",
            account.name, auth.user_code, auth.verification_uri
        ),
        None => writeln!(
            out,
            "To authorize account {}, open\n\n  {}\n\nand enter the code {}",
            account.name, auth.verification_uri, auth.user_code
        ),
    };
    let _ = out.flush();
    let bound = auth.expires_in.min(limit);
    let deadline = Instant::now() + bound;
    let mut interval = auth.interval;
    loop {
        if Instant::now() + interval > deadline {
            return Err(if bound < auth.expires_in {
                LoginError::Timeout(limit)
            } else {
                LoginError::DeviceExpired
            });
        }
        tokio::time::sleep(interval).await;
        let grant = TokenGrant::DeviceCode(&auth.device_code);
        match provider.request_token(account, grant).await {
            Ok(response) => return response.refresh_token.ok_or(LoginError::NoRefreshToken),
            Err(e) => match e.oauth_error() {
                Some("authorization_pending") => {}
                Some("slow_down") => interval += SLOW_DOWN_STEP,
                Some("access_denied") => return Err(LoginError::DeviceDenied),
                Some("expired_token") => return Err(LoginError::DeviceExpired),
                // The provider or the way to it is unwell: keep polling, more slowly.
                None if e.class() == crate::provider::ErrorClass::Transient => {
                    interval = (interval * 2).min(Duration::from_secs(60));
                }
                _ => return Err(LoginError::Device(e)),
            },
        }
    }
}

/// What a logout did at the provider.
#[derive(Debug, PartialEq, Eq)]
pub enum Revocation {
    Revoked,
    /// Nothing stored to revoke.
    NothingStored,
    /// No revocation endpoint is configured or discovered.
    NoEndpoint,
}

/// Revokes the account's stored refresh token (RFC 7009). Read without the lock, so it
/// works while a daemon runs; read again after each revocation, in case the daemon
/// rotated meanwhile, so the token that is dropped next is not left live.
pub async fn revoke_stored(
    provider: &Provider,
    config: &Config,
    account: &AccountConfig,
) -> Result<Revocation, LoginError> {
    if account.endpoints.revocation.is_none() {
        return Ok(Revocation::NoEndpoint);
    }
    let keyring = config.state.keyring.as_ref();
    let shared = super::shared::open(config).await?;
    let mut revoked: Vec<String> = Vec::new();
    for _ in 0..3 {
        let state = match &shared {
            Some(opened) => opened.store.load(&account.name).await?,
            None => store::peek_state(&config.state.dir, keyring, &account.name)?,
        };
        let Some(rt) = state.and_then(|s| s.refresh_token) else {
            break;
        };
        if revoked.contains(&rt.fingerprint()) {
            break;
        }
        provider
            .revoke(account, &rt)
            .await
            .map_err(LoginError::Revoke)?;
        revoked.push(rt.fingerprint());
    }
    if let Some(opened) = shared {
        opened.close().await;
    }
    Ok(if revoked.is_empty() {
        Revocation::NothingStored
    } else {
        Revocation::Revoked
    })
}

// ---------------------------------------------------------------------------------------
// Trying a token before it replaces anything.

/// Tries `presented`, a refresh token for `account`, before it replaces anything: refused
/// at once if the state directory knows it as spent (nothing is sent), else presented in
/// one refresh. Returns the chain that refresh started; a provider's refusal is
/// `Refused`, and nothing was changed.
pub async fn try_refresh_token(
    provider: &Provider,
    config: &Config,
    account: &AccountConfig,
    presented: Secret,
) -> Result<NewChain, LoginError> {
    let keyring = config.state.keyring.as_ref();
    let spent = match super::shared::open(config).await? {
        Some(opened) => {
            let why =
                store::spent_by(opened.store.as_ref(), config.accounts.keys(), &presented).await;
            opened.close().await;
            why?
        }
        None => store::peek_spent(&config.state.dir, keyring, &presented)?,
    };
    if let Some(why) = spent {
        return Err(LoginError::Spent {
            account: account.name.to_string(),
            why,
        });
    }
    let response = provider
        .request_token(account, TokenGrant::RefreshToken(&presented))
        .await
        .map_err(LoginError::Refused)?;
    let now = SystemTime::now();
    let lifetime = response.lifetime(now, &account.refresh);
    let rotated = response
        .refresh_token
        .as_ref()
        .is_some_and(|rt| *rt != presented);
    Ok(NewChain {
        spent: rotated.then(|| store::spent_fingerprint(&presented)),
        refresh_token: response.refresh_token.unwrap_or(presented),
        refresh_token_expires_at: response.refresh_token_expires_in.map(|d| now + d),
        access: Some(AccessToken {
            token: response.access_token,
            token_type: response.token_type,
            expires_at: now + lifetime,
            // RFC 6749 §5.1: an omitted scope is the scope requested.
            scope: response.scope.or_else(|| account.scope.clone()),
            issued_at: now,
        }),
    })
}

// ---------------------------------------------------------------------------------------
// The hand-off.

/// Where a handoff ended up.
#[derive(Debug)]
pub enum HandedOff {
    /// No daemon ran: the state file was written (or removed) directly.
    Stored(PathBuf),
    /// The running daemon (this pid) took it.
    ToDaemon(i32),
    /// Left in the shared store for the replica holding the account.
    Shared(super::shared::Left),
}

/// Gives `handoff` to the account's state: directly when no daemon holds the state
/// directory, else through a handoff file and SIGHUP to the daemon, waiting (at most
/// `wait`) until the daemon has taken the file.
pub async fn hand_off(
    config: &Config,
    account: &AccountConfig,
    handoff: Handoff,
    wait: Duration,
) -> Result<HandedOff, LoginError> {
    let seed_fingerprint = match &account.grant {
        Grant::RefreshToken { seed: Some(seed) } => Some(seed.fingerprint()),
        _ => None,
    };
    if let Some(opened) = super::shared::open(config).await? {
        let left = super::shared::hand_off(opened.store.as_ref(), account, &handoff, wait).await;
        opened.close().await;
        return Ok(HandedOff::Shared(left?));
    }
    let dir = &config.state.dir;
    let keyring = config.state.keyring.clone();
    let deadline = Instant::now() + wait;
    loop {
        let delivery = store::deliver_handoff(
            dir,
            keyring.clone(),
            &account.name,
            &handoff,
            seed_fingerprint.clone(),
            SystemTime::now(),
        )
        .await?;
        let (path, pid) = match delivery {
            Delivery::Applied(_) => {
                return Ok(HandedOff::Stored(store::state_path(dir, &account.name)));
            }
            Delivery::Pending { path, pid } => (path, pid),
        };
        let Some(pid) = pid else {
            return Err(LoginError::NoPid(path));
        };
        // The lock may be held for a moment by another tokend command applying its own
        // handoff: a SIGHUP would kill that one. Try again once it is done.
        if !is_daemon(pid) {
            if Instant::now() >= deadline {
                return Err(LoginError::NotTaken { path, waited: wait });
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        }
        let target =
            rustix::process::Pid::from_raw(pid).ok_or_else(|| LoginError::NoPid(path.clone()))?;
        rustix::process::kill_process(target, rustix::process::Signal::HUP).map_err(|e| {
            LoginError::Signal {
                pid,
                path: path.clone(),
                source: e.into(),
            }
        })?;
        while path.exists() {
            if Instant::now() >= deadline {
                return Err(LoginError::NotTaken { path, waited: wait });
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        return Ok(HandedOff::ToDaemon(pid));
    }
}

/// Whether `pid` runs `tokend run` (or `demo`), as far as /proc tells; true where it
/// cannot tell, since only a daemon keeps the lock for long.
pub(super) fn is_daemon(pid: i32) -> bool {
    let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
        return true;
    };
    // The subcommand is the first argument that is not an option (an account may be
    // named `run`); `--config PATH` may come before it.
    let mut args = cmdline.split(|b| *b == 0).skip(1);
    while let Some(arg) = args.next() {
        match arg {
            b"--config" | b"-c" => {
                args.next();
            }
            a if a.starts_with(b"-") => {}
            a => return matches!(a, b"run" | b"demo"),
        }
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pkce_s256_matches_rfc7636_appendix_b() {
        let p = Pkce::from_verifier(Secret::new("dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk"));
        assert_eq!(p.challenge, "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM");
        let g = Pkce::generate();
        assert_eq!(g.verifier.expose().len(), 43);
        assert_ne!(g.verifier.expose(), Pkce::generate().verifier.expose());
        assert!(!format!("{:?}", g.verifier).contains(g.verifier.expose()));
    }

    #[test]
    fn the_redirect_state_is_checked_before_anything_else() {
        let code = parse_redirect_query("code=abc&state=s1", "s1").unwrap();
        assert_eq!(code.expose(), "abc");
        assert!(matches!(
            parse_redirect_query("code=abc&state=s2", "s1"),
            Err(LoginError::StateMismatch)
        ));
        assert!(matches!(
            parse_redirect_query("code=abc", "s1"),
            Err(LoginError::StateMismatch)
        ));
        assert!(matches!(
            parse_redirect_query("error=access_denied&state=s2", "s1"),
            Err(LoginError::StateMismatch)
        ));
        let e = parse_redirect_query(
            "error=access_denied&error_description=no+way&state=s1",
            "s1",
        )
        .unwrap_err();
        assert_eq!(
            e.to_string(),
            "the provider refused the authorization: access_denied: no way"
        );
        assert!(matches!(
            parse_redirect_query("state=s1", "s1"),
            Err(LoginError::NoCode)
        ));
    }

    #[test]
    fn pasted_input_is_a_url_a_query_or_a_bare_code() {
        let url = "https://app.example.com/cb?code=c1&state=st";
        assert!(matches!(parse_pasted(url, "st"), Ok(Pasted::Checked(c)) if c.expose() == "c1"));
        assert!(matches!(
            parse_pasted("https://app.example.com/cb?code=c1&state=evil", "st"),
            Err(LoginError::StateMismatch)
        ));
        assert!(
            matches!(parse_pasted("?code=c2&state=st\n", "st"), Ok(Pasted::Checked(c)) if c.expose() == "c2")
        );
        assert!(
            matches!(parse_pasted("  kcpa10fzqa9nmut95duwok0c \n", "st"), Ok(Pasted::BareCode(c)) if c.expose() == "kcpa10fzqa9nmut95duwok0c")
        );
        assert!(matches!(
            parse_pasted(" \n", "st"),
            Err(LoginError::EmptyInput)
        ));
    }
}
