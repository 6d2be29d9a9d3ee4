//! The validated configuration: [`Config`] and its parts, which cannot hold an invalid
//! value, and its loading. The TOML shape is in `raw`, the checks (every problem at once,
//! each with file, line, column and key; secrets resolved) in `validate` and `locate`.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use http::{HeaderName, HeaderValue};
use reqwest::Url;
use serde::Deserialize;

use crate::seal::Keyring;
use crate::secret::Secret;
use crate::signing::SigningKey;

mod locate;
mod raw;
mod url_rules;
mod validate;

pub use locate::{ConfigError, Problem};
pub use url_rules::{check_endpoint_url, is_loopback_host};

use locate::Locator;
use raw::RawConfig;
use validate::Validated;

/// Where the daemon looks for its config when neither `--config` nor `$TOKEND_CONFIG` is set.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/tokend/tokend.toml";
/// The listen address used when the config names none.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:8731";
/// The state directory when neither `state.dir` nor `$STATE_DIRECTORY` names one.
pub const DEFAULT_STATE_DIR: &str = "/var/lib/tokend";
/// Requests in flight to one provider host at once unless the config says otherwise
/// (`provider.max_concurrent_requests`): after a restart or an outage, thousands of
/// accounts due together queue for their host instead of stampeding the provider.
pub const DEFAULT_MAX_CONCURRENT_PER_HOST: usize = 16;

/// The validated configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub server: ServerConfig,
    pub state: StateConfig,
    /// Defaults for every account; `connect_timeout` applies to the one shared HTTP client.
    pub provider: ProviderLimits,
    /// How hard the daemon may press each token endpoint host, whichever accounts use it.
    pub per_host: HostLimits,
    pub log: LogConfig,
    pub accounts: BTreeMap<AccountName, Arc<AccountConfig>>,
    pub consumers: Vec<ConsumerConfig>,
    /// Things that are allowed but unwise (a world-readable config holding a literal
    /// secret, a non-loopback listener): logged at start and shown by `tokend check`.
    pub warnings: Vec<String>,
    /// Where each secret came from, by its key (`accounts.a.refresh_token`): what
    /// `tokend check` shows instead of the value.
    pub secret_sources: BTreeMap<String, SecretSource>,
}

/// Where a secret was read from.
#[derive(Debug, Clone, PartialEq)]
pub enum SecretSource {
    /// Written in the config file itself.
    Literal,
    /// The environment variable of that name.
    Env(String),
    /// The file, as resolved (in `$CREDENTIALS_DIRECTORY` or next to the config).
    File(PathBuf),
}

impl fmt::Display for SecretSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SecretSource::Literal => f.write_str("the config file"),
            SecretSource::Env(name) => write!(f, "env {name}"),
            SecretSource::File(path) => write!(f, "file {}", path.display()),
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct ServerConfig {
    pub listen: Vec<ListenAddr>,
    /// Non-loopback TCP addresses were explicitly allowed (`allow_remote = true`).
    pub allow_remote: bool,
    /// Mode of Unix sockets (default 0660).
    pub socket_mode: u32,
    /// Group given to Unix sockets, so its members may connect.
    pub socket_group: Option<String>,
    /// SHA-256 of the key `/metrics` requires (`metrics_key`); `None`: it is open to
    /// local callers that pass the request guards.
    pub metrics_key_sha256: Option<[u8; 32]>,
    /// `tokend_token_reads_total` names the consumer (`metrics_consumer_labels = true`);
    /// otherwise its `consumer` label is `-`.
    pub metrics_consumer_labels: bool,
}

/// Where the API listens: a TCP address, or a Unix socket (`unix:/run/tokend/tokend.sock`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListenAddr {
    Tcp(SocketAddr),
    Unix(PathBuf),
}

impl fmt::Display for ListenAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ListenAddr::Tcp(a) => write!(f, "{a}"),
            ListenAddr::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

/// A local client of the API. When any is configured, token routes require one.
#[derive(Debug, Clone, PartialEq)]
pub struct ConsumerConfig {
    pub name: String,
    /// SHA-256 of the consumer's key (keys are never kept in clear once hashed).
    pub key_sha256: Option<[u8; 32]>,
    /// Peers on a Unix socket with this uid (and gid, if set) are this consumer.
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    /// Accounts it may read; `None` means every account (`accounts = ["*"]`).
    pub accounts: Option<Vec<AccountName>>,
}

impl ConsumerConfig {
    pub fn may_read(&self, account: &AccountName) -> bool {
        self.accounts
            .as_ref()
            .is_none_or(|list| list.contains(account))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct LogConfig {
    pub format: LogFormat,
}

/// `text` for people, `json` (one object per line) for log shippers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

#[derive(Debug, Clone, PartialEq)]
pub struct StateConfig {
    /// The file backend's directory (also where `tokend` finds a running daemon's lock).
    pub dir: PathBuf,
    /// Keys for encryption at rest, when configured: every backend seals the same way.
    pub keyring: Option<Keyring>,
    pub backend: StateBackend,
    /// How long a refresher's lease lives without renewal (shared backends).
    pub lease_ttl: Duration,
    /// This replica's name in leases: `node_id`, else `hostname-pid`.
    pub node_id: String,
}

/// Where account records live: `[state] backend`.
#[derive(Debug, Clone, PartialEq)]
pub enum StateBackend {
    /// One file per account in `dir`, for one daemon.
    File,
    /// A PostgreSQL database shared by the replicas.
    Postgres {
        /// A libpq URL (`postgres://user:pass@host/db?sslmode=require`): a secret.
        url: Secret,
        /// Prefix of the table names (`tokend_`).
        prefix: String,
        /// Private CA for `sslmode=require`/`verify-full`.
        ca: Option<Arc<CaBundle>>,
    },
    /// An etcd cluster shared by the replicas.
    Etcd {
        endpoints: Vec<Url>,
        /// Key prefix (`tokend/`).
        prefix: String,
        ca: Option<Arc<CaBundle>>,
        /// A client certificate (PEM) and its key, for clusters that require one.
        identity: Option<EtcdIdentity>,
    },
}

impl StateBackend {
    /// The name used in `[state] backend`.
    pub fn name(&self) -> &'static str {
        match self {
            StateBackend::File => "file",
            StateBackend::Postgres { .. } => "postgres",
            StateBackend::Etcd { .. } => "etcd",
        }
    }
}

/// An etcd client certificate and key.
#[derive(Debug, Clone, PartialEq)]
pub struct EtcdIdentity {
    pub certificate_pem: Vec<u8>,
    pub key_pem: Secret,
}

/// The lease lifetime when `[state] lease_ttl` is not set.
pub const DEFAULT_LEASE_TTL: Duration = Duration::from_secs(15);

/// An account's name: it names a state file and a URL path segment, so it is restricted
/// to `[A-Za-z0-9._-]`, 1 to 64 characters, not starting with `.` or `-`.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct AccountName(Arc<str>);

impl AccountName {
    pub fn parse(name: &str) -> Result<Self, String> {
        let ok_char = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-');
        if name.is_empty() || name.len() > 64 {
            return Err("an account name has 1 to 64 characters".into());
        }
        if !name.chars().all(ok_char) {
            return Err(format!(
                "account name {name:?} may hold only letters, digits, '.', '_' and '-'"
            ));
        }
        if name.starts_with('.') || name.starts_with('-') {
            return Err(format!(
                "account name {name:?} must not start with '.' or '-'"
            ));
        }
        Ok(AccountName(name.into()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

// Sound: the derived `Eq`, `Ord` and `Hash` compare the inner `str`, so maps keyed by
// names can be searched with a plain `&str` (no allocation per lookup).
impl std::borrow::Borrow<str> for AccountName {
    fn borrow(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for AccountName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for AccountName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", &*self.0)
    }
}

/// How an account obtains access tokens.
#[derive(Debug, Clone, PartialEq)]
pub enum Grant {
    /// RFC 6749 §6. `seed` is the refresh token from the config: used only until a
    /// persisted (rotated) one exists, or when it changes.
    RefreshToken { seed: Option<Secret> },
    /// RFC 6749 §4.4.
    ClientCredentials,
    /// RFC 7523 §2.1: a JWT signed by tokend is the grant. Boxed, as the other rarely
    /// set parts of [`AccountConfig`] are: an account's config is held for as long as it
    /// runs, and at thousands of accounts its inline size is a large part of the memory.
    JwtBearer(Box<BearerAssertion>),
}

impl Grant {
    pub fn as_str(&self) -> &'static str {
        match self {
            Grant::RefreshToken { .. } => "refresh_token",
            Grant::ClientCredentials => "client_credentials",
            Grant::JwtBearer(_) => "jwt_bearer",
        }
    }
}

/// The assertion of the `jwt_bearer` grant: from a Google service-account key file
/// (`credentials_file`), or `private_key` + `assertion_issuer` + `assertion_subject`.
#[derive(Debug, Clone, PartialEq)]
pub struct BearerAssertion {
    pub key: SigningKey,
    pub key_id: Option<String>,
    /// `iss`: the service account's email, or `assertion_issuer`.
    pub issuer: String,
    /// `sub`: `assertion_subject` (with a key file only for domain-wide delegation).
    pub subject: Option<String>,
    /// `aud`: `assertion_audience`; unset, the token endpoint URL.
    pub audience: Option<String>,
    /// The scope travels in the assertion's `scope` claim (Google), not as a parameter.
    pub scope_in_claim: bool,
}

/// How the client authenticates: RFC 6749 §2.3.1 (the secret in the body or in Basic),
/// or a client assertion (RFC 7523 §2.2, OIDC Core §9).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ClientAuth {
    ClientSecretPost,
    ClientSecretBasic,
    /// A JWT signed with the client's private key, or a ready-made one from a file.
    PrivateKeyJwt,
    /// A JWT signed with HS256 over the client secret.
    ClientSecretJwt,
    /// Mutual TLS with a certificate of the provider's PKI (RFC 8705 §2.1).
    TlsClientAuth,
    /// Mutual TLS with a self-signed certificate registered with the provider (RFC 8705 §2.2).
    SelfSignedTlsClientAuth,
}

impl ClientAuth {
    /// The name used in `client_auth`.
    pub fn as_str(self) -> &'static str {
        match self {
            ClientAuth::ClientSecretPost => "client_secret_post",
            ClientAuth::ClientSecretBasic => "client_secret_basic",
            ClientAuth::PrivateKeyJwt => "private_key_jwt",
            ClientAuth::ClientSecretJwt => "client_secret_jwt",
            ClientAuth::TlsClientAuth => "tls_client_auth",
            ClientAuth::SelfSignedTlsClientAuth => "self_signed_tls_client_auth",
        }
    }

    /// The methods whose only credential is the TLS client certificate (RFC 8705 §2).
    pub fn is_mutual_tls(self) -> bool {
        matches!(
            self,
            ClientAuth::TlsClientAuth | ClientAuth::SelfSignedTlsClientAuth
        )
    }
}

/// How `private_key_jwt` and `client_secret_jwt` make their client assertion.
#[derive(Debug, Clone, PartialEq)]
pub struct ClientAssertion {
    pub source: AssertionSource,
    /// `assertion_audience`: the `aud` claim. Unset: the token endpoint URL.
    pub audience: Option<String>,
}

/// Where a client assertion comes from.
#[derive(Debug, Clone, PartialEq)]
pub enum AssertionSource {
    /// Signed by tokend for every request with `private_key`; `key_id` is its `kid`.
    PrivateKey {
        key: SigningKey,
        key_id: Option<String>,
    },
    /// `client_secret_jwt`: HS256 over `client_secret`, with `key_id` as `kid` if set.
    ClientSecret { key_id: Option<String> },
    /// `client_assertion = { file = … }`: a ready-made assertion (a Kubernetes projected
    /// token), read again at every request because its issuer replaces it.
    File(PathBuf),
}

/// The token request body's encoding: RFC 6749 form, or JSON as Zephr expects.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RequestFormat {
    Form,
    Json,
}

/// When to refresh and how to back off; see `schedule` for the arithmetic.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RefreshPolicy {
    /// Fraction of the token's lifetime after which it is refreshed.
    pub ratio: f64,
    /// Up to this fraction of the lifetime is taken off the refresh time at random, so
    /// accounts issued at the same moment do not refresh at the same moment.
    pub jitter: f64,
    /// A refresh is planned no later than this long before expiry (when the lifetime allows).
    pub margin: Duration,
    /// Lifetime assumed when the provider sends no `expires_in` and the token is no JWT.
    pub default_lifetime: Duration,
    /// Least time between two refreshes of one account: the guard against refresh storms.
    pub min_interval: Duration,
    /// First retry delay after a transient failure; doubles each attempt up to `backoff_max`.
    pub backoff_initial: Duration,
    pub backoff_max: Duration,
    /// Retry delay after a permanent error that may be fixed on the provider's side
    /// (`invalid_client`, `unauthorized_client`, …).
    pub slow_retry: Duration,
    /// Longest time between two refreshes, whatever the token's lifetime: keeps a
    /// refresh token with an idle timeout in use (unset: no such bound).
    pub max_interval: Option<Duration>,
}

impl Default for RefreshPolicy {
    fn default() -> Self {
        RefreshPolicy {
            ratio: 0.8,
            jitter: 0.05,
            margin: Duration::from_secs(60),
            default_lifetime: Duration::from_secs(3600),
            min_interval: Duration::from_secs(10),
            backoff_initial: Duration::from_secs(1),
            backoff_max: Duration::from_secs(300),
            slow_retry: Duration::from_secs(900),
            max_interval: None,
        }
    }
}

/// Limits on each call to a token endpoint.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ProviderLimits {
    pub connect_timeout: Duration,
    pub timeout: Duration,
    pub max_response_bytes: usize,
}

impl Default for ProviderLimits {
    fn default() -> Self {
        ProviderLimits {
            connect_timeout: Duration::from_secs(10),
            timeout: Duration::from_secs(30),
            max_response_bytes: 256 * 1024,
        }
    }
}

/// Limits on the requests to one provider host (scheme, host and port), shared by every
/// account that calls it: they protect the provider when thousands of accounts are due
/// together (a cold start, the end of an outage). Read at start only.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct HostLimits {
    /// Requests in flight at once.
    pub max_concurrent: usize,
    /// Request starts per second, evenly spaced; unset: only `max_concurrent` bounds them.
    pub max_per_second: Option<f64>,
}

impl Default for HostLimits {
    fn default() -> Self {
        HostLimits {
            max_concurrent: DEFAULT_MAX_CONCURRENT_PER_HOST,
            max_per_second: None,
        }
    }
}

/// One account, validated.
#[derive(Debug, Clone, PartialEq)]
pub struct AccountConfig {
    pub name: AccountName,
    pub grant: Grant,
    /// The token endpoint. `None` only when `issuer` is set and discovery is to fill it
    /// (see `provider::discovery`); validation guarantees one of the two.
    pub token_url: Option<Url>,
    pub endpoints: Endpoints,
    pub client_id: String,
    pub client_secret: Option<Secret>,
    pub client_auth: ClientAuth,
    /// Set exactly when `client_auth` is `private_key_jwt` or `client_secret_jwt`.
    pub assertion: Option<Box<ClientAssertion>>,
    pub request_format: RequestFormat,
    /// Sent as configured (space- or comma-separated, as the provider wants it).
    pub scope: Option<String>,
    pub extra_params: BTreeMap<String, String>,
    /// What `tokend login` adds to the authorization request.
    pub authorize: AuthorizeOptions,
    /// Extra headers consumers must send with the token (e.g. Zywave's `Profile`).
    pub headers: Vec<(HeaderName, HeaderValue)>,
    pub refresh: RefreshPolicy,
    pub limits: ProviderLimits,
    /// Extra CA certificates to trust for this provider (private PKI).
    pub ca_bundle: Option<Arc<CaBundle>>,
    /// The TLS client certificate and key presented to every endpoint of the account
    /// (`tls_client_auth`, or certificate-bound tokens with another method; RFC 8705).
    pub tls_identity: Option<Arc<TlsIdentity>>,
    /// Files the current token is written to on every refresh.
    pub sinks: Vec<SinkConfig>,
    /// Run after the sinks are written, on every refresh.
    pub on_refresh: Option<Box<HookConfig>>,
    /// `/proxy/NAME/…` forwards here with the account's token and headers.
    pub proxy: Option<Box<ProxyConfig>>,
}

/// `[accounts.NAME.proxy]`: the API the account's token is for, reached through tokend.
#[derive(Debug, Clone, PartialEq)]
pub struct ProxyConfig {
    /// The base URL: its path always ends in `/`, so a request's path is appended below it
    /// and never replaces its last segment.
    pub upstream: Url,
    /// The whole upstream exchange, from connecting to the last byte of the answer.
    pub timeout: Duration,
}

impl ProxyConfig {
    /// Without `timeout`: a minute, enough for most API calls and not forever.
    pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(60);
}

/// A token file (Vault Agent style sink).
#[derive(Debug, Clone, PartialEq)]
pub struct SinkConfig {
    pub path: PathBuf,
    pub format: SinkFormat,
    pub mode: u32,
    pub on_shutdown: OnShutdown,
}

/// `raw`: the bare access token; `json`: what `GET /v1/token/{account}` answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SinkFormat {
    #[default]
    Raw,
    Json,
}

/// What happens to a sink file when tokend stops (not on reload).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnShutdown {
    #[default]
    Remove,
    Keep,
}

/// A rotation hook: a command to run, or a signal to send to a process.
#[derive(Debug, Clone, PartialEq)]
pub struct HookConfig {
    pub action: HookAction,
    pub timeout: Duration,
}

#[derive(Debug, Clone, PartialEq)]
pub enum HookAction {
    /// argv, run without a shell.
    Exec(Vec<String>),
    /// Signal name (HUP, USR1, …) and the file holding the target's pid.
    Signal { signal: String, pid_file: PathBuf },
}

/// Signals a hook may send.
pub const HOOK_SIGNALS: &[&str] = &["HUP", "USR1", "USR2", "TERM", "INT"];

/// Where an account's interactive flows (`tokend login`, `logout`) go, besides the token
/// endpoint. Each is configured explicitly or filled from the issuer's metadata. The URLs
/// are boxed: most accounts set none of them, and an unboxed `Url` is 88 bytes held by
/// every account for as long as it runs.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Endpoints {
    /// RFC 8414 issuer identifier, exactly as configured (compared as a string with the
    /// metadata's `issuer`).
    pub issuer: Option<String>,
    /// RFC 6749 §3.1.
    pub authorization: Option<Box<Url>>,
    /// RFC 8628 §3.1.
    pub device_authorization: Option<Box<Url>>,
    /// RFC 7009 §2.
    pub revocation: Option<Box<Url>>,
    /// Where the provider sends the browser back with the code (RFC 6749 §3.1.2). Unset:
    /// `tokend login` listens on `http://127.0.0.1:<ephemeral>/callback`.
    pub redirect_uri: Option<Box<Url>>,
    /// From discovery metadata only: the scopes the provider knows (RFC 8414 §2).
    pub scopes_supported: Option<Vec<String>>,
    /// `allow_insecure_http`: plain http to a host that is not loopback, for discovered
    /// endpoints as for configured ones.
    pub allow_insecure_http: bool,
}

/// What `tokend login` adds to its authorization request (RFC 6749 §4.1.1).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct AuthorizeOptions {
    pub prompt: Prompt,
    /// `authorize_params`: provider-specific parameters (Google's `access_type`, Auth0's
    /// `audience`), none of those tokend sets itself.
    pub params: BTreeMap<String, String>,
}

/// The OpenID Connect `prompt` parameter (OIDC Core §3.1.2.1).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Prompt {
    /// Unset: `consent` when the scope asks for `offline_access`, since OIDC Core §11
    /// has a provider ignore `offline_access` without it (and then issue no refresh
    /// token); nothing otherwise.
    #[default]
    Auto,
    /// `prompt = "…"`: sent as written.
    Value(String),
    /// `prompt = ""`: never sent.
    Omit,
}

/// The PEM certificates of an account's `ca_file`, read and checked at load time.
#[derive(Debug, PartialEq, Eq, Hash)]
pub struct CaBundle {
    pub path: PathBuf,
    pub pem: Vec<u8>,
}

/// An account's TLS client certificate and key (`client_certificate`, `client_key`),
/// read and checked at load time: the key parses, is not encrypted, and belongs to the
/// certificate. Equal (and hashed) by the certificate and the key's fingerprint, so one
/// HTTP client serves every account with the same identity.
#[derive(Clone)]
pub struct TlsIdentity {
    /// Where the certificate chain was read (for messages and `tokend check`).
    pub certificate_path: PathBuf,
    /// The chain as DER, leaf first.
    pub chain: Vec<Vec<u8>>,
    /// The chain and the key as one PEM text, as the TLS client takes them.
    pub pem: Secret,
    /// The leaf's subject (RFC 4514), its end of validity, its SHA-256 fingerprint (hex).
    pub subject: String,
    pub not_after: SystemTime,
    pub fingerprint: String,
}

impl fmt::Debug for TlsIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsIdentity")
            .field("certificate_path", &self.certificate_path)
            .field("subject", &self.subject)
            .field("fingerprint", &self.fingerprint)
            .field("key", &"[redacted]")
            .finish()
    }
}

impl PartialEq for TlsIdentity {
    fn eq(&self, other: &Self) -> bool {
        self.chain == other.chain && self.pem == other.pem
    }
}

impl Eq for TlsIdentity {}

impl std::hash::Hash for TlsIdentity {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.chain.hash(state);
        self.pem.fingerprint().hash(state);
    }
}

/// What the loader may read besides the config text: environment variables and secret
/// files. Tests pass their own.
pub trait Environment {
    fn var(&self, name: &str) -> Option<String>;
    fn read_file(&self, path: &Path) -> std::io::Result<String>;
}

/// The process environment and file system.
pub struct SystemEnvironment;

impl Environment for SystemEnvironment {
    fn var(&self, name: &str) -> Option<String> {
        std::env::var(name).ok()
    }
    fn read_file(&self, path: &Path) -> std::io::Result<String> {
        std::fs::read_to_string(path)
    }
}

impl Config {
    /// Reads and validates the file at `path`.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            problems: vec![Problem {
                file: path.display().to_string(),
                line: 0,
                column: 0,
                key: String::new(),
                message: format!("cannot read the config file: {e}"),
            }],
        })?;
        Config::from_str_at(&text, path, &SystemEnvironment)
    }

    /// Validates config text. `path` names the file in messages and anchors relative
    /// secret file paths (its directory).
    pub fn from_str_at(
        text: &str,
        path: &Path,
        env: &dyn Environment,
    ) -> Result<Config, ConfigError> {
        let loc = Locator::new(path.display().to_string(), text);
        let raw: RawConfig = toml::from_str(text).map_err(|e| ConfigError {
            problems: vec![loc.parse_problem(&e)],
        })?;
        let base_dir = path.parent().map(Path::to_path_buf).unwrap_or_default();
        let Validated {
            mut config,
            problems,
            literal_secrets,
        } = validate::validate(raw, &loc, env, base_dir);
        if literal_secrets && let Some(w) = exposure_warning(path) {
            config.warnings.push(w);
        }
        if problems.is_empty() {
            Ok(config)
        } else {
            Err(ConfigError { problems })
        }
    }
}

/// A warning when the config at `path` holds a literal secret and other users may read
/// it: allowed (the operator may have reasons), but worth saying.
fn exposure_warning(path: &Path) -> Option<String> {
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(path).ok()?.permissions().mode() & 0o777;
    (mode & 0o044 != 0).then(|| {
        format!(
            "{} holds a literal secret and is readable by group or others (mode {mode:o}): chmod 600 it, or use {{ env = .. }} / {{ file = .. }}",
            path.display()
        )
    })
}

/// What the config tests share: an environment of their own (no process environment, no
/// disk) and a loader that uses it.
#[cfg(test)]
mod test_env {
    use std::collections::HashMap;
    use std::path::{Path, PathBuf};

    use super::{Config, ConfigError, Environment};

    #[derive(Default)]
    pub(super) struct FakeEnv {
        pub(super) vars: HashMap<String, String>,
        pub(super) files: HashMap<PathBuf, String>,
    }

    impl Environment for FakeEnv {
        fn var(&self, name: &str) -> Option<String> {
            self.vars.get(name).cloned()
        }
        fn read_file(&self, path: &Path) -> std::io::Result<String> {
            self.files
                .get(path)
                .cloned()
                .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::NotFound, "no such file"))
        }
    }

    /// A client secret in the environment and a refresh token in a file, as the tests'
    /// configs name them.
    pub(super) fn env() -> FakeEnv {
        let mut e = FakeEnv::default();
        e.vars
            .insert("ZYWAVE_CLIENT_SECRET".into(), "zy-secret".into());
        e.files
            .insert(PathBuf::from("/run/secrets/zywave-rt"), "rt-seed\n".into());
        e
    }

    /// A fresh EC P-256 private key, PKCS#8 PEM: what `private_key` files hold.
    pub(super) fn ec_key_pem() -> String {
        use aws_lc_rs::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair};
        use base64::Engine as _;
        let rng = aws_lc_rs::rand::SystemRandom::new();
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng).unwrap();
        let b64 = base64::engine::general_purpose::STANDARD.encode(pkcs8.as_ref());
        format!("-----BEGIN PRIVATE KEY-----\n{b64}\n-----END PRIVATE KEY-----\n")
    }

    /// Validates `text` as `/etc/tokend/tokend.toml` in [`env`].
    pub(super) fn load(text: &str) -> Result<Config, ConfigError> {
        Config::from_str_at(text, Path::new("/etc/tokend/tokend.toml"), &env())
    }
}

#[cfg(test)]
mod tests {
    use super::test_env::{env, load};
    use super::*;

    const FULL: &str = r#"
[server]
listen = ["127.0.0.1:8731", "[::1]:8731"]

[state]
dir = "/var/lib/tokend"

[refresh]
margin = "2m"
min_interval = 30

[accounts.zywave]
grant = "refresh_token"
token_url = "https://auth.zywave.com/connect/token"
client_id = "my-client"
client_secret = { env = "ZYWAVE_CLIENT_SECRET" }
client_auth = "client_secret_post"
request_format = "form"
scope = "offline_access accounts:read"
refresh_token = { file = "/run/secrets/zywave-rt" }
extra_params = { audience = "x" }
headers = { Profile = "B 1234" }

[accounts.zywave.refresh]
ratio = 0.7

[accounts.zephr]
grant = "refresh_token"
token_url = "https://console.zephr.com/zephr/oauth2/token"
client_id = "zephr-client"
client_secret = "literal-secret"
client_auth = "client_secret_basic"
request_format = "json"
timeout = "5s"
"#;

    #[test]
    fn a_full_config_validates_with_secrets_resolved_and_policies_merged() {
        let c = load(FULL).unwrap();
        assert_eq!(c.server.listen.len(), 2);
        let z = &c.accounts[&AccountName::parse("zywave").unwrap()];
        assert_eq!(z.client_secret.as_ref().unwrap().expose(), "zy-secret");
        let Grant::RefreshToken { seed: Some(seed) } = &z.grant else {
            panic!("seed expected")
        };
        assert_eq!(
            seed.expose(),
            "rt-seed",
            "trailing newline of a secret file is trimmed"
        );
        assert_eq!(z.refresh.ratio, 0.7);
        assert_eq!(
            z.refresh.margin,
            Duration::from_secs(120),
            "global [refresh] applies"
        );
        assert_eq!(z.refresh.min_interval, Duration::from_secs(30));
        assert_eq!(z.headers[0].0.as_str(), "profile");
        assert_eq!(z.extra_params["audience"], "x");
        let zephr = &c.accounts[&AccountName::parse("zephr").unwrap()];
        assert_eq!(zephr.client_auth, ClientAuth::ClientSecretBasic);
        assert_eq!(zephr.request_format, RequestFormat::Json);
        assert_eq!(zephr.limits.timeout, Duration::from_secs(5));
        assert_eq!(zephr.refresh.ratio, 0.8, "defaults where nothing is set");
        assert!(
            !format!("{c:?}").contains("zy-secret"),
            "Debug never shows secrets"
        );
    }

    #[test]
    fn an_empty_config_gets_the_documented_defaults() {
        let c = load("").unwrap();
        assert_eq!(
            c.server.listen,
            vec![ListenAddr::Tcp("127.0.0.1:8731".parse().unwrap())]
        );
        assert_eq!(c.state.dir, PathBuf::from("/var/lib/tokend"));
        assert!(c.accounts.is_empty());
    }

    #[test]
    fn every_semantic_problem_is_reported_at_once_with_its_place() {
        let text = r#"
[server]
listen = ["0.0.0.0:8731"]

[accounts.a]
grant = "refresh_token"
token_url = "http://auth.example.com/token"
client_id = "c"
client_secret = { env = "MISSING_SECRET" }
extra_params = { grant_type = "password" }
headers = { Authorization = "Bearer x" }

[accounts.b]
grant = "client_credentials"
token_url = "not a url"
client_id = "c"
"#;
        let err = load(text).unwrap_err();
        let keys: Vec<(&str, usize)> = err
            .problems
            .iter()
            .map(|p| (p.key.as_str(), p.line))
            .collect();
        assert!(keys.contains(&("server.listen", 3)), "{err}");
        assert!(keys.contains(&("accounts.a.token_url", 7)), "{err}");
        assert!(keys.contains(&("accounts.a.client_secret", 9)), "{err}");
        assert!(
            keys.contains(&("accounts.a.extra_params.grant_type", 10)),
            "{err}"
        );
        assert!(
            keys.contains(&("accounts.a.headers.Authorization", 11)),
            "{err}"
        );
        assert!(keys.contains(&("accounts.b.token_url", 15)), "{err}");
        assert!(
            keys.iter().any(|(k, _)| *k == "accounts.b.client_secret"),
            "{err}"
        );
        assert!(
            err.to_string().contains("MISSING_SECRET is not set"),
            "{err}"
        );
    }

    #[test]
    fn the_shipped_example_configs_are_valid() {
        let mut e = env();
        for var in ["EXAMPLE_API_SECRET", "ZEPHR_CLIENT_SECRET"] {
            e.vars.insert(var.into(), "s".into());
        }
        for (name, text) in [
            ("zywave.toml", include_str!("../../config/zywave.toml")),
            ("zephr.toml", include_str!("../../config/zephr.toml")),
            (
                "client-credentials.toml",
                include_str!("../../config/client-credentials.toml"),
            ),
        ] {
            let c = Config::from_str_at(text, Path::new(name), &e)
                .unwrap_or_else(|err| panic!("config/{name}: {err}"));
            assert_eq!(c.accounts.len(), 1, "{name}");
        }
        // The commented [provider] block, switched on, is valid too.
        let on = include_str!("../../config/client-credentials.toml")
            .replace("# [provider]", "[provider]")
            .replace("# max_", "max_");
        let c = Config::from_str_at(&on, Path::new("cc.toml"), &e).unwrap();
        assert_eq!(c.per_host.max_per_second, Some(50.0));
    }

    #[test]
    fn account_names_must_be_safe_file_and_path_names() {
        for bad in ["../etc", ".hidden", "a b", "", "-x"] {
            assert!(AccountName::parse(bad).is_err(), "{bad:?} accepted");
        }
        for good in ["zywave", "tenant-42.prod", "A_b"] {
            assert!(AccountName::parse(good).is_ok(), "{good:?} refused");
        }
        let err = load("[accounts.\"a/b\"]\ngrant = \"client_credentials\"\ntoken_url = \"https://x/t\"\nclient_id = \"c\"\nclient_secret = \"s\"\n").unwrap_err();
        assert_eq!(err.problems[0].key, "accounts.a/b", "{err}");
    }
}
