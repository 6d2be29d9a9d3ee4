//! The configuration: raw TOML types (unknown keys are errors), then validation into a
//! [`Config`] that cannot hold an invalid value. Every problem is reported at once, each
//! with file, line, column and key. Secrets named by `{ env }` / `{ file }` are resolved here.

use std::collections::BTreeMap;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use http::{HeaderName, HeaderValue};
use reqwest::Url;
use serde::Deserialize;
use serde::de::{self, Deserializer, MapAccess, Visitor};
use sha2::{Digest, Sha256};
use toml::Spanned;

use crate::seal::{Keyring, SealKey};
use crate::secret::Secret;

/// Where the daemon looks for its config when neither `--config` nor `$TOKEND_CONFIG` is set.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/tokend/tokend.toml";
/// The listen address used when the config names none.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:8731";
const DEFAULT_STATE_DIR: &str = "/var/lib/tokend";
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
    pub dir: PathBuf,
    /// Keys for encryption at rest, when configured.
    pub keyring: Option<Keyring>,
}

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
}

impl Grant {
    pub fn as_str(&self) -> &'static str {
        match self {
            Grant::RefreshToken { .. } => "refresh_token",
            Grant::ClientCredentials => "client_credentials",
        }
    }
}

/// RFC 6749 §2.3.1: where the client credentials travel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ClientAuth {
    ClientSecretPost,
    ClientSecretBasic,
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
    /// (see [`crate::discovery`]); validation guarantees one of the two.
    pub token_url: Option<Url>,
    pub endpoints: Endpoints,
    pub client_id: String,
    pub client_secret: Option<Secret>,
    pub client_auth: ClientAuth,
    pub request_format: RequestFormat,
    /// Sent as configured (space- or comma-separated, as the provider wants it).
    pub scope: Option<String>,
    pub extra_params: BTreeMap<String, String>,
    /// Extra headers consumers must send with the token (e.g. Zywave's `Profile`).
    pub headers: Vec<(HeaderName, HeaderValue)>,
    pub refresh: RefreshPolicy,
    pub limits: ProviderLimits,
    /// Extra CA certificates to trust for this provider (private PKI).
    pub ca_bundle: Option<Arc<CaBundle>>,
    /// Files the current token is written to on every refresh.
    pub sinks: Vec<SinkConfig>,
    /// Run after the sinks are written, on every refresh.
    pub on_refresh: Option<HookConfig>,
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
/// endpoint. Each is configured explicitly or filled from the issuer's metadata.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Endpoints {
    /// RFC 8414 issuer identifier, exactly as configured (compared as a string with the
    /// metadata's `issuer`).
    pub issuer: Option<String>,
    /// RFC 6749 §3.1.
    pub authorization: Option<Url>,
    /// RFC 8628 §3.1.
    pub device_authorization: Option<Url>,
    /// RFC 7009 §2.
    pub revocation: Option<Url>,
    /// Where the provider sends the browser back with the code (RFC 6749 §3.1.2). Unset:
    /// `tokend login` listens on `http://127.0.0.1:<ephemeral>/callback`.
    pub redirect_uri: Option<Url>,
    /// From discovery metadata only: the scopes the provider knows (RFC 8414 §2).
    pub scopes_supported: Option<Vec<String>>,
    /// `allow_insecure_http`: plain http to a host that is not loopback, for discovered
    /// endpoints as for configured ones.
    pub allow_insecure_http: bool,
}

/// The PEM certificates of an account's `ca_file`, read and checked at load time.
#[derive(Debug, PartialEq, Eq, Hash)]
pub struct CaBundle {
    pub path: PathBuf,
    pub pem: Vec<u8>,
}

/// Every problem found in a config, each with its place.
#[derive(Debug, thiserror::Error)]
pub struct ConfigError {
    pub problems: Vec<Problem>,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, p) in self.problems.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{p}")?;
        }
        Ok(())
    }
}

/// One problem: `file:line:column: key: message`.
#[derive(Debug, Clone, PartialEq)]
pub struct Problem {
    pub file: String,
    pub line: usize,
    pub column: usize,
    pub key: String,
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.line == 0 {
            // Not about a place in the file (it could not be read at all).
            write!(f, "{}: ", self.file)?;
        } else {
            write!(f, "{}:{}:{}: ", self.file, self.line, self.column)?;
        }
        if !self.key.is_empty() {
            write!(f, "key `{}`: ", self.key)?;
        }
        f.write_str(&self.message)
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
        let loc = Locator {
            file: path.display().to_string(),
            text,
        };
        let raw: RawConfig = toml::from_str(text).map_err(|e| ConfigError {
            problems: vec![loc.parse_problem(&e)],
        })?;
        let base_dir = path.parent().map(Path::to_path_buf).unwrap_or_default();
        let mut v = Validator {
            loc: &loc,
            env,
            base_dir,
            problems: Vec::new(),
            warnings: Vec::new(),
            literal_secrets: false,
        };
        let mut config = v.config(raw);
        if v.literal_secrets
            && let Some(w) = exposure_warning(path)
        {
            config.warnings.push(w);
        }
        if v.problems.is_empty() {
            Ok(config)
        } else {
            Err(ConfigError {
                problems: v.problems,
            })
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

// ---------------------------------------------------------------------------------------
// Raw types: exactly the TOML, nothing checked beyond shape.

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default)]
    server: RawServer,
    #[serde(default)]
    state: RawState,
    #[serde(default)]
    refresh: RawRefresh,
    #[serde(default)]
    provider: RawProvider,
    #[serde(default)]
    log: RawLog,
    #[serde(default)]
    consumers: BTreeMap<String, Spanned<RawConsumer>>,
    #[serde(default)]
    accounts: BTreeMap<String, Spanned<RawAccount>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawServer {
    listen: Option<Spanned<Vec<Spanned<String>>>>,
    #[serde(default)]
    allow_remote: bool,
    socket_mode: Option<Spanned<String>>,
    socket_group: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConsumer {
    key: Option<Spanned<RawSecret>>,
    key_sha256: Option<Spanned<String>>,
    uid: Option<u32>,
    gid: Option<u32>,
    accounts: Spanned<Vec<String>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawLog {
    format: Option<LogFormat>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawState {
    dir: Option<Spanned<String>>,
    encryption_key: Option<Spanned<RawSecret>>,
    #[serde(default)]
    previous_encryption_keys: Vec<Spanned<RawSecret>>,
}

#[derive(Deserialize, Default, Clone)]
#[serde(deny_unknown_fields)]
struct RawRefresh {
    ratio: Option<Spanned<f64>>,
    jitter: Option<Spanned<f64>>,
    margin: Option<Spanned<RawDuration>>,
    default_lifetime: Option<Spanned<RawDuration>>,
    min_interval: Option<Spanned<RawDuration>>,
    backoff_initial: Option<Spanned<RawDuration>>,
    backoff_max: Option<Spanned<RawDuration>>,
    slow_retry: Option<Spanned<RawDuration>>,
    max_interval: Option<Spanned<RawDuration>>,
}

#[derive(Deserialize, Default, Clone)]
#[serde(deny_unknown_fields)]
struct RawProvider {
    connect_timeout: Option<Spanned<RawDuration>>,
    timeout: Option<Spanned<RawDuration>>,
    max_response_bytes: Option<Spanned<u64>>,
    max_concurrent_requests: Option<Spanned<u64>>,
    max_requests_per_second: Option<Spanned<f64>>,
}

#[derive(Deserialize, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
enum RawGrant {
    RefreshToken,
    ClientCredentials,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAccount {
    grant: RawGrant,
    token_url: Option<Spanned<String>>,
    issuer: Option<Spanned<String>>,
    authorization_endpoint: Option<Spanned<String>>,
    device_authorization_endpoint: Option<Spanned<String>>,
    revocation_endpoint: Option<Spanned<String>>,
    redirect_uri: Option<Spanned<String>>,
    client_id: Spanned<String>,
    client_secret: Option<Spanned<RawSecret>>,
    client_auth: Option<ClientAuth>,
    request_format: Option<RequestFormat>,
    scope: Option<Spanned<String>>,
    refresh_token: Option<Spanned<RawSecret>>,
    #[serde(default)]
    extra_params: BTreeMap<String, Spanned<String>>,
    #[serde(default)]
    headers: BTreeMap<String, Spanned<String>>,
    #[serde(default)]
    allow_insecure_http: bool,
    ca_file: Option<Spanned<String>>,
    #[serde(default)]
    refresh: RawRefresh,
    timeout: Option<Spanned<RawDuration>>,
    // Hand-off: Zywave profile header, token files, rotation hook.
    profile: Option<Spanned<String>>,
    profile_token: Option<Spanned<RawSecret>>,
    #[serde(default)]
    sinks: Vec<Spanned<RawSink>>,
    on_refresh: Option<Spanned<RawHook>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSink {
    path: String,
    #[serde(default)]
    format: SinkFormat,
    mode: Option<String>,
    #[serde(default)]
    on_shutdown: OnShutdown,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHook {
    exec: Option<Vec<String>>,
    signal: Option<String>,
    pid_file: Option<String>,
    timeout: Option<RawDuration>,
}

/// A secret as written: a literal string, `{ env = "NAME" }` or `{ file = "PATH" }`.
#[derive(Clone)]
enum RawSecret {
    Literal(String),
    Env(String),
    File(PathBuf),
}

impl<'de> Deserialize<'de> for RawSecret {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = RawSecret;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str(r#"a string, { env = "NAME" } or { file = "PATH" }"#)
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<RawSecret, E> {
                Ok(RawSecret::Literal(v.to_owned()))
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<RawSecret, A::Error> {
                let mut found = None;
                while let Some(key) = map.next_key::<String>()? {
                    let value: String = map.next_value()?;
                    let secret = match key.as_str() {
                        "env" => RawSecret::Env(value),
                        "file" => RawSecret::File(PathBuf::from(value)),
                        other => {
                            return Err(de::Error::unknown_field(other, &["env", "file"]));
                        }
                    };
                    if found.replace(secret).is_some() {
                        return Err(de::Error::custom(
                            "a secret takes exactly one of `env` or `file`",
                        ));
                    }
                }
                found.ok_or_else(|| de::Error::custom("a secret needs `env` or `file`"))
            }
        }
        d.deserialize_any(V)
    }
}

/// A duration as whole seconds (`60`) or a humane string (`"90s"`, `"5m"`, `"1h 30m"`).
#[derive(Clone, Copy)]
struct RawDuration(Duration);

impl<'de> Deserialize<'de> for RawDuration {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = RawDuration;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str(r#"a duration: whole seconds or a string such as "90s" or "5m""#)
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<RawDuration, E> {
                u64::try_from(v)
                    .map(|s| RawDuration(Duration::from_secs(s)))
                    .map_err(|_| E::custom("a duration cannot be negative"))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<RawDuration, E> {
                humantime::parse_duration(v)
                    .map(RawDuration)
                    .map_err(|e| E::custom(format!("invalid duration {v:?}: {e}")))
            }
        }
        d.deserialize_any(V)
    }
}

// ---------------------------------------------------------------------------------------
// Locations.

struct Locator<'a> {
    file: String,
    text: &'a str,
}

impl Locator<'_> {
    fn line_col(&self, offset: usize) -> (usize, usize) {
        let before = &self.text[..offset.min(self.text.len())];
        let line = before.matches('\n').count() + 1;
        let line_start = before.rfind('\n').map_or(0, |i| i + 1);
        (line, before[line_start..].chars().count() + 1)
    }

    fn problem(
        &self,
        span: Range<usize>,
        key: impl Into<String>,
        msg: impl Into<String>,
    ) -> Problem {
        let (line, column) = self.line_col(span.start);
        Problem {
            file: self.file.clone(),
            line,
            column,
            key: key.into(),
            message: msg.into(),
        }
    }

    /// A TOML or shape error: toml gives a span and a message; the key is recovered from
    /// the text (the table header above the span, and the key on the span's line).
    fn parse_problem(&self, e: &toml::de::Error) -> Problem {
        let span = e.span().unwrap_or(0..0);
        let key = self.key_at(span.start);
        self.problem(span, key, e.message().trim().to_string())
    }

    fn key_at(&self, offset: usize) -> String {
        let offset = offset.min(self.text.len());
        let line_start = self.text[..offset].rfind('\n').map_or(0, |i| i + 1);
        let line_end = self.text[offset..]
            .find('\n')
            .map_or(self.text.len(), |i| offset + i);
        let line = &self.text[line_start..line_end];
        let trimmed = line.trim();
        let mut table = String::new();
        let mut leaf = String::new();
        // Only a closed header names a table: an unclosed one may run into a value.
        if trimmed.starts_with('[') && trimmed.ends_with(']') {
            table = trimmed
                .trim_matches(|c| c == '[' || c == ']')
                .trim()
                .to_string();
        } else {
            if let Some(eq) = line.find('=') {
                leaf = line[..eq].trim().to_string();
            }
            for prev in self.text[..line_start].lines().rev() {
                let p = prev.trim();
                if p.starts_with('[') && p.ends_with(']') {
                    table = p.trim_matches(|c| c == '[' || c == ']').trim().to_string();
                    break;
                }
            }
        }
        // Only what looks like a key path survives: a broken line may hold a value, and
        // values may be secrets.
        let table = key_path_prefix(&table);
        let leaf = key_path_prefix(&leaf);
        match (table.is_empty(), leaf.is_empty()) {
            (_, true) => table,
            (true, false) => leaf,
            (false, false) => format!("{table}.{leaf}"),
        }
    }
}

// ---------------------------------------------------------------------------------------
// Validation: raw → Config, collecting every problem.

struct Validator<'a> {
    loc: &'a Locator<'a>,
    env: &'a dyn Environment,
    base_dir: PathBuf,
    problems: Vec<Problem>,
    warnings: Vec<String>,
    /// A secret is written in the config itself.
    literal_secrets: bool,
}

impl Validator<'_> {
    fn report(&mut self, span: Range<usize>, key: impl Into<String>, msg: impl Into<String>) {
        let p = self.loc.problem(span, key, msg);
        self.problems.push(p);
    }

    fn config(&mut self, raw: RawConfig) -> Config {
        let server = self.server(raw.server);
        let keyring = self.keyring(&raw.state);
        let dir = match raw.state.dir {
            Some(d) => {
                if d.get_ref().is_empty() {
                    self.report(d.span(), "state.dir", "must not be empty");
                }
                // Relative to the config file, like secret files: not to wherever the
                // daemon happened to be started.
                self.base_dir.join(d.into_inner())
            }
            // systemd's StateDirectory= tells us where the state lives.
            None => self
                .env
                .var("STATE_DIRECTORY")
                .and_then(|s| s.split(':').next().map(PathBuf::from))
                .unwrap_or_else(|| PathBuf::from(DEFAULT_STATE_DIR)),
        };
        let refresh = self.refresh(RefreshPolicy::default(), &raw.refresh, "refresh");
        let limits = self.limits(&raw.provider);
        let per_host = self.host_limits(&raw.provider);
        let mut accounts = BTreeMap::new();
        for (name, account) in raw.accounts {
            let span = account.span();
            let key = format!("accounts.{name}");
            match AccountName::parse(&name) {
                Ok(account_name) => {
                    let a = self.account(
                        account_name.clone(),
                        account.into_inner(),
                        span,
                        refresh,
                        limits,
                    );
                    accounts.insert(account_name, Arc::new(a));
                }
                Err(msg) => self.report(span, key, msg),
            }
        }
        let consumers = self.consumers(raw.consumers, &accounts);
        Config {
            server,
            state: StateConfig { dir, keyring },
            provider: limits,
            per_host,
            log: LogConfig {
                format: raw.log.format.unwrap_or_default(),
            },
            accounts,
            consumers,
            warnings: std::mem::take(&mut self.warnings),
        }
    }

    fn keyring(&mut self, raw: &RawState) -> Option<Keyring> {
        let parse = |v: &mut Self, secret: &Spanned<RawSecret>, key: &str| {
            let text = v.secret(secret, key)?;
            match SealKey::parse(&text) {
                Ok(k) => Some(k),
                Err(msg) => {
                    v.report(secret.span(), key, msg);
                    None
                }
            }
        };
        let previous: Vec<SealKey> = raw
            .previous_encryption_keys
            .iter()
            .filter_map(|k| parse(self, k, "state.previous_encryption_keys"))
            .collect();
        match &raw.encryption_key {
            Some(current) => parse(self, current, "state.encryption_key")
                .map(|current| Keyring { current, previous }),
            None => {
                if let Some(first) = raw.previous_encryption_keys.first() {
                    self.report(first.span(), "state.previous_encryption_keys", "needs state.encryption_key: old keys only open files, new ones are sealed with the current key");
                }
                None
            }
        }
    }

    fn server(&mut self, raw: RawServer) -> ServerConfig {
        let allow_remote = raw.allow_remote;
        let listen = match raw.listen {
            None => vec![ListenAddr::Tcp(
                DEFAULT_LISTEN
                    .parse()
                    .expect("the default listen address parses"),
            )],
            Some(list) => {
                if list.get_ref().is_empty() {
                    self.report(list.span(), "server.listen", "needs at least one address");
                }
                let mut out = Vec::new();
                for item in list.into_inner() {
                    if let Some(addr) = self.listen_addr(&item, allow_remote) {
                        out.push(addr);
                    }
                }
                out
            }
        };
        let socket_mode = match &raw.socket_mode {
            None => 0o660,
            Some(m) => match u32::from_str_radix(m.get_ref().trim_start_matches("0o"), 8) {
                Ok(mode) if mode <= 0o777 && mode & 0o007 == 0 => mode,
                Ok(_) => {
                    self.report(
                        m.span(),
                        "server.socket_mode",
                        "must be an octal mode without bits for others, such as \"0660\"",
                    );
                    0o660
                }
                Err(_) => {
                    self.report(
                        m.span(),
                        "server.socket_mode",
                        "must be an octal mode such as \"0660\"",
                    );
                    0o660
                }
            },
        };
        ServerConfig {
            listen,
            allow_remote,
            socket_mode,
            socket_group: raw.socket_group.map(Spanned::into_inner),
        }
    }

    fn listen_addr(&mut self, item: &Spanned<String>, allow_remote: bool) -> Option<ListenAddr> {
        let text = item.get_ref();
        if let Some(path) = text.strip_prefix("unix:") {
            if !path.starts_with('/') {
                self.report(
                    item.span(),
                    "server.listen",
                    format!("{text:?}: a Unix socket path must be absolute"),
                );
                return None;
            }
            return Some(ListenAddr::Unix(PathBuf::from(path)));
        }
        match text.parse::<SocketAddr>() {
            Ok(addr) if addr.ip().is_loopback() => Some(ListenAddr::Tcp(addr)),
            Ok(addr) if allow_remote => {
                self.warnings.push(format!(
                    "server.listen: {addr} is not a loopback address; tokens are served to the network (allow_remote = true)"
                ));
                Some(ListenAddr::Tcp(addr))
            }
            Ok(addr) => {
                self.report(
                    item.span(),
                    "server.listen",
                    format!("{addr} is not a loopback address: tokend serves tokens to local consumers only (set server.allow_remote = true to override)"),
                );
                None
            }
            Err(e) => {
                self.report(
                    item.span(),
                    "server.listen",
                    format!("{text:?} is neither IP:port nor unix:/path: {e}"),
                );
                None
            }
        }
    }

    fn consumers(
        &mut self,
        raw: BTreeMap<String, Spanned<RawConsumer>>,
        accounts: &BTreeMap<AccountName, Arc<AccountConfig>>,
    ) -> Vec<ConsumerConfig> {
        let mut out = Vec::new();
        for (name, consumer) in raw {
            let span = consumer.span();
            let consumer = consumer.into_inner();
            let k = |field: &str| format!("consumers.{name}.{field}");
            let key_sha256 = match (&consumer.key, &consumer.key_sha256) {
                (Some(_), Some(h)) => {
                    self.report(
                        h.span(),
                        k("key_sha256"),
                        "set either key or key_sha256, not both",
                    );
                    None
                }
                (Some(key), None) => self
                    .secret(key, &k("key"))
                    .map(|s| Sha256::digest(s.expose().as_bytes()).into()),
                (None, Some(h)) => {
                    let parsed = decode_hex32(h.get_ref().trim());
                    if parsed.is_none() {
                        self.report(
                            h.span(),
                            k("key_sha256"),
                            "must be 64 hex digits (sha256sum of the key)",
                        );
                    }
                    parsed
                }
                (None, None) => None,
            };
            if key_sha256.is_none()
                && consumer.uid.is_none()
                && consumer.gid.is_none()
                && consumer.key.is_none()
                && consumer.key_sha256.is_none()
            {
                self.report(
                    span.clone(),
                    format!("consumers.{name}"),
                    "a consumer needs a key, a key_sha256, or a uid/gid to match on a Unix socket",
                );
            }
            let list = consumer.accounts.get_ref();
            let allowed = if list.iter().any(|a| a == "*") {
                None
            } else {
                let mut names = Vec::new();
                for a in list {
                    match AccountName::parse(a) {
                        Ok(n) if accounts.contains_key(&n) => names.push(n),
                        _ => self.report(
                            consumer.accounts.span(),
                            k("accounts"),
                            format!("no account named {a:?} is configured"),
                        ),
                    }
                }
                Some(names)
            };
            out.push(ConsumerConfig {
                name,
                key_sha256,
                uid: consumer.uid,
                gid: consumer.gid,
                accounts: allowed,
            });
        }
        out
    }

    fn refresh(&mut self, base: RefreshPolicy, raw: &RawRefresh, prefix: &str) -> RefreshPolicy {
        let mut p = base;
        let fraction = |v: &mut Self,
                        field: &Option<Spanned<f64>>,
                        name: &str,
                        lo: f64,
                        hi: f64,
                        dst: &mut f64| {
            if let Some(f) = field {
                let x = *f.get_ref();
                if !(lo..=hi).contains(&x) {
                    v.report(
                        f.span(),
                        format!("{prefix}.{name}"),
                        format!("must be between {lo} and {hi}, not {x}"),
                    );
                } else {
                    *dst = x;
                }
            }
        };
        fraction(self, &raw.ratio, "ratio", 0.1, 0.95, &mut p.ratio);
        fraction(self, &raw.jitter, "jitter", 0.0, 0.3, &mut p.jitter);
        let duration = |v: &mut Self,
                        field: &Option<Spanned<RawDuration>>,
                        name: &str,
                        min: Duration,
                        dst: &mut Duration| {
            if let Some(d) = field {
                let x = d.get_ref().0;
                if x < min {
                    v.report(
                        d.span(),
                        format!("{prefix}.{name}"),
                        format!("must be at least {}", humantime::format_duration(min)),
                    );
                } else {
                    *dst = x;
                }
            }
        };
        duration(self, &raw.margin, "margin", Duration::ZERO, &mut p.margin);
        duration(
            self,
            &raw.default_lifetime,
            "default_lifetime",
            Duration::from_secs(1),
            &mut p.default_lifetime,
        );
        duration(
            self,
            &raw.min_interval,
            "min_interval",
            Duration::ZERO,
            &mut p.min_interval,
        );
        duration(
            self,
            &raw.backoff_initial,
            "backoff_initial",
            Duration::from_millis(1),
            &mut p.backoff_initial,
        );
        duration(
            self,
            &raw.backoff_max,
            "backoff_max",
            Duration::from_millis(1),
            &mut p.backoff_max,
        );
        duration(
            self,
            &raw.slow_retry,
            "slow_retry",
            Duration::from_secs(1),
            &mut p.slow_retry,
        );
        if let Some(m) = &raw.max_interval {
            if m.get_ref().0 < Duration::from_secs(1) {
                self.report(
                    m.span(),
                    format!("{prefix}.max_interval"),
                    "must be at least 1s",
                );
            } else {
                p.max_interval = Some(m.get_ref().0);
            }
        }
        // Checked only where this table sets one of the two: an account inheriting a
        // conflict from [refresh] has it reported there, once.
        let own = raw.backoff_max.as_ref().or(raw.backoff_initial.as_ref());
        if let Some(own) = own.filter(|_| p.backoff_max < p.backoff_initial) {
            let span = own.span();
            self.report(
                span,
                format!("{prefix}.backoff_max"),
                "must not be less than backoff_initial",
            );
        }
        p
    }

    fn limits(&mut self, raw: &RawProvider) -> ProviderLimits {
        let mut l = ProviderLimits::default();
        self.timeout(
            &mut l.connect_timeout,
            raw.connect_timeout.as_ref(),
            "provider.connect_timeout",
        );
        self.timeout(&mut l.timeout, raw.timeout.as_ref(), "provider.timeout");
        if let Some(m) = &raw.max_response_bytes {
            if *m.get_ref() < 1024 {
                self.report(
                    m.span(),
                    "provider.max_response_bytes",
                    "must be at least 1024",
                );
            } else {
                l.max_response_bytes = usize::try_from(*m.get_ref()).unwrap_or(usize::MAX);
            }
        }
        l
    }

    fn host_limits(&mut self, raw: &RawProvider) -> HostLimits {
        let mut h = HostLimits::default();
        if let Some(n) = &raw.max_concurrent_requests {
            match usize::try_from(*n.get_ref()) {
                Ok(v @ 1..=1024) => h.max_concurrent = v,
                _ => self.report(
                    n.span(),
                    "provider.max_concurrent_requests",
                    "must be from 1 to 1024",
                ),
            }
        }
        if let Some(r) = &raw.max_requests_per_second {
            let v = *r.get_ref();
            // One request every 100 s at the slowest; faster than a microsecond apart is
            // no limit at all.
            if v.is_finite() && (0.01..=1_000_000.0).contains(&v) {
                h.max_per_second = Some(v);
            } else {
                self.report(
                    r.span(),
                    "provider.max_requests_per_second",
                    "must be from 0.01 to 1000000",
                );
            }
        }
        h
    }

    fn timeout(&mut self, dst: &mut Duration, field: Option<&Spanned<RawDuration>>, key: &str) {
        if let Some(d) = field {
            if d.get_ref().0 < Duration::from_millis(10) {
                self.report(d.span(), key, "must be at least 10ms");
            } else {
                *dst = d.get_ref().0;
            }
        }
    }

    fn secret(&mut self, raw: &Spanned<RawSecret>, key: &str) -> Option<Secret> {
        let value = match raw.get_ref() {
            RawSecret::Literal(s) => {
                self.literal_secrets = true;
                Ok(s.clone())
            }
            RawSecret::Env(name) => self
                .env
                .var(name)
                .ok_or_else(|| format!("environment variable {name} is not set")),
            RawSecret::File(path) => {
                let resolved = self.secret_path(path);
                self.env
                    .read_file(&resolved)
                    .map(|s| s.trim_end_matches(['\r', '\n']).to_string())
                    .map_err(|e| format!("cannot read secret file {}: {e}", resolved.display()))
            }
        };
        match value {
            Ok(v) if v.is_empty() => {
                self.report(raw.span(), key, "the secret is empty");
                None
            }
            Ok(v) => Some(Secret::new(v)),
            Err(msg) => {
                self.report(raw.span(), key, msg);
                None
            }
        }
    }

    /// A relative secret path is looked up in systemd's credentials directory first (so
    /// `LoadCredential=` works with bare names), then next to the config file.
    fn secret_path(&self, path: &Path) -> PathBuf {
        if path.is_absolute() {
            return path.to_path_buf();
        }
        if let Some(creds) = self.env.var("CREDENTIALS_DIRECTORY") {
            let candidate = Path::new(&creds).join(path);
            if self.env.read_file(&candidate).is_ok() {
                return candidate;
            }
        }
        self.base_dir.join(path)
    }

    fn account(
        &mut self,
        name: AccountName,
        raw: RawAccount,
        account_span: Range<usize>,
        global_refresh: RefreshPolicy,
        global_limits: ProviderLimits,
    ) -> AccountConfig {
        let k = |field: &str| format!("accounts.{name}.{field}");

        let insecure = raw.allow_insecure_http;
        let token_url = raw
            .token_url
            .as_ref()
            .and_then(|u| self.endpoint_url(u, insecure, &k("token_url")));
        let issuer = raw.issuer.as_ref().and_then(|i| {
            let url = self.endpoint_url(i, insecure, &k("issuer"))?;
            if url.query().is_some() {
                self.report(
                    i.span(),
                    k("issuer"),
                    "an issuer identifier has no ?query (RFC 8414 §2)",
                );
                return None;
            }
            Some(i.get_ref().trim().to_string())
        });
        if raw.token_url.is_none() && raw.issuer.is_none() {
            self.report(
                account_span.clone(),
                k("token_url"),
                "set token_url, or issuer to discover it",
            );
        }
        let mut endpoint = |raw: &Option<Spanned<String>>, key: &str| {
            raw.as_ref()
                .and_then(|u| self.endpoint_url(u, insecure, &k(key)))
        };
        let authorization = endpoint(&raw.authorization_endpoint, "authorization_endpoint");
        let device_authorization = endpoint(
            &raw.device_authorization_endpoint,
            "device_authorization_endpoint",
        );
        let revocation = endpoint(&raw.revocation_endpoint, "revocation_endpoint");
        let redirect_uri = raw
            .redirect_uri
            .as_ref()
            .and_then(|u| self.redirect_uri(u, insecure, &k("redirect_uri")));
        let endpoints = Endpoints {
            issuer,
            authorization,
            device_authorization,
            revocation,
            redirect_uri,
            scopes_supported: None,
            allow_insecure_http: insecure,
        };

        let client_id = raw.client_id.get_ref().trim().to_string();
        if client_id.is_empty() {
            self.report(raw.client_id.span(), k("client_id"), "must not be empty");
        }
        let client_secret = raw
            .client_secret
            .as_ref()
            .and_then(|s| self.secret(s, &k("client_secret")));
        let client_auth = raw.client_auth.unwrap_or(ClientAuth::ClientSecretPost);
        let request_format = raw.request_format.unwrap_or(RequestFormat::Form);

        let grant = match raw.grant {
            RawGrant::RefreshToken => {
                let seed = raw
                    .refresh_token
                    .as_ref()
                    .and_then(|s| self.secret(s, &k("refresh_token")));
                Grant::RefreshToken { seed }
            }
            RawGrant::ClientCredentials => {
                if let Some(rt) = &raw.refresh_token {
                    self.report(
                        rt.span(),
                        k("refresh_token"),
                        "a client_credentials account takes no refresh_token",
                    );
                }
                if raw.client_secret.is_none() {
                    self.report(
                        account_span.clone(),
                        k("client_secret"),
                        "a client_credentials account needs a client_secret",
                    );
                }
                Grant::ClientCredentials
            }
        };
        if client_auth == ClientAuth::ClientSecretBasic && raw.client_secret.is_none() {
            self.report(
                account_span,
                k("client_secret"),
                "client_auth = \"client_secret_basic\" needs a client_secret",
            );
        }

        let scope = raw.scope.as_ref().and_then(|s| {
            let v = s.get_ref().trim();
            if v.is_empty() {
                self.report(
                    s.span(),
                    k("scope"),
                    "must not be empty (leave it out instead)",
                );
                None
            } else {
                Some(v.to_string())
            }
        });

        const RESERVED: &[&str] = &[
            "grant_type",
            "refresh_token",
            "client_id",
            "client_secret",
            "scope",
            "code",
            "code_verifier",
            "redirect_uri",
            "device_code",
        ];
        let mut extra_params = BTreeMap::new();
        for (key, value) in raw.extra_params {
            if RESERVED.contains(&key.as_str()) {
                self.report(
                    value.span(),
                    k(&format!("extra_params.{key}")),
                    format!("`{key}` is set by tokend itself and cannot be overridden"),
                );
            } else {
                extra_params.insert(key, value.into_inner());
            }
        }

        let mut headers = Vec::new();
        for (key, value) in raw.headers {
            let hk = k(&format!("headers.{key}"));
            let Ok(header_name) = HeaderName::from_bytes(key.as_bytes()) else {
                self.report(
                    value.span(),
                    hk,
                    format!("{key:?} is not a valid HTTP header name"),
                );
                continue;
            };
            if header_name == http::header::AUTHORIZATION {
                self.report(
                    value.span(),
                    hk,
                    "Authorization is built from the token itself and cannot be set here",
                );
                continue;
            }
            match HeaderValue::from_str(value.get_ref()) {
                Ok(v) => headers.push((header_name, v)),
                Err(_) => self.report(value.span(), hk, "not a valid HTTP header value"),
            }
        }
        self.profile(&raw.profile, &raw.profile_token, &mut headers, &k);
        let sinks = raw
            .sinks
            .iter()
            .filter_map(|s| self.sink(s, &k("sinks")))
            .collect();
        let on_refresh = raw
            .on_refresh
            .as_ref()
            .and_then(|h| self.hook(h, &k("on_refresh")));

        let refresh = self.refresh(global_refresh, &raw.refresh, &k("refresh"));
        let ca_bundle = raw.ca_file.as_ref().and_then(|f| {
            let path = self.base_dir.join(f.get_ref());
            let pem = match self.env.read_file(&path) {
                Ok(text) => text.into_bytes(),
                Err(e) => {
                    self.report(
                        f.span(),
                        k("ca_file"),
                        format!("cannot read {}: {e}", path.display()),
                    );
                    return None;
                }
            };
            match reqwest::Certificate::from_pem_bundle(&pem) {
                Ok(certs) if !certs.is_empty() => Some(Arc::new(CaBundle { path, pem })),
                _ => {
                    self.report(
                        f.span(),
                        k("ca_file"),
                        format!("{} holds no PEM certificate", path.display()),
                    );
                    None
                }
            }
        });
        let mut limits = global_limits;
        self.timeout(&mut limits.timeout, raw.timeout.as_ref(), &k("timeout"));

        AccountConfig {
            name,
            grant,
            token_url,
            endpoints,
            client_id,
            client_secret,
            client_auth,
            request_format,
            scope,
            extra_params,
            headers,
            refresh,
            limits,
            ca_bundle,
            sinks,
            on_refresh,
        }
    }

    /// Zywave's `Profile` header: `profile = "B 1234"` (type code and id) or
    /// `profile_token` (a secret, served as `Profile: Token …`).
    fn profile(
        &mut self,
        profile: &Option<Spanned<String>>,
        token: &Option<Spanned<RawSecret>>,
        headers: &mut Vec<(HeaderName, HeaderValue)>,
        k: &dyn Fn(&str) -> String,
    ) {
        let name = HeaderName::from_static("profile");
        let value = match (profile, token) {
            (None, None) => return,
            (Some(_), Some(t)) => {
                self.report(
                    t.span(),
                    k("profile_token"),
                    "set profile or profile_token, not both",
                );
                return;
            }
            (Some(p), None) => {
                let text = p.get_ref().trim();
                let valid = text.split_once(' ').is_some_and(|(code, id)| {
                    !code.is_empty()
                        && code.len() <= 16
                        && code.chars().all(|c| c.is_ascii_alphanumeric())
                        && code != "Token"
                        && !id.is_empty()
                        && id.len() <= 64
                        && id
                            .chars()
                            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_'))
                });
                if !valid {
                    self.report(
                        p.span(),
                        k("profile"),
                        "must be \"{TypeCode} {ID}\", such as \"B 1234\" (for a profile token use profile_token)",
                    );
                    return;
                }
                HeaderValue::from_str(text).expect("validated as visible ASCII")
            }
            (None, Some(t)) => {
                let Some(secret) = self.secret(t, &k("profile_token")) else {
                    return;
                };
                match HeaderValue::from_str(&format!("Token {}", secret.expose())) {
                    Ok(mut v) => {
                        v.set_sensitive(true);
                        v
                    }
                    Err(_) => {
                        self.report(t.span(), k("profile_token"), "not a valid header value");
                        return;
                    }
                }
            }
        };
        if headers.iter().any(|(n, _)| *n == name) {
            let span = profile
                .as_ref()
                .map_or_else(|| token.as_ref().map_or(0..0, |t| t.span()), |p| p.span());
            self.report(
                span,
                k("profile"),
                "a Profile header is already set in headers",
            );
            return;
        }
        headers.push((name, value));
    }

    fn sink(&mut self, raw: &Spanned<RawSink>, key: &str) -> Option<SinkConfig> {
        let sink = raw.get_ref();
        if !sink.path.starts_with('/') {
            self.report(
                raw.span(),
                key,
                format!("sink path {:?} must be absolute", sink.path),
            );
            return None;
        }
        let mode = match &sink.mode {
            None => 0o600,
            Some(m) => {
                match u32::from_str_radix(m.trim_start_matches("0o"), 8) {
                    Ok(mode) if mode <= 0o777 && mode & 0o002 == 0 => mode,
                    _ => {
                        self.report(raw.span(), key, format!("mode {m:?} must be octal without write for others, such as \"0640\""));
                        return None;
                    }
                }
            }
        };
        if mode & 0o004 != 0 {
            self.warnings.push(format!(
                "{key}: {} is readable by every user (mode {mode:o})",
                sink.path
            ));
        }
        Some(SinkConfig {
            path: PathBuf::from(&sink.path),
            format: sink.format,
            mode,
            on_shutdown: sink.on_shutdown,
        })
    }

    fn hook(&mut self, raw: &Spanned<RawHook>, key: &str) -> Option<HookConfig> {
        let hook = raw.get_ref();
        let timeout = hook.timeout.map_or(Duration::from_secs(30), |d| d.0);
        let action = match (&hook.exec, &hook.signal, &hook.pid_file) {
            (Some(argv), None, None) if !argv.is_empty() && argv[0].starts_with('/') => {
                HookAction::Exec(argv.clone())
            }
            (Some(_), None, None) => {
                self.report(
                    raw.span(),
                    key,
                    "exec needs a program given by absolute path, then its arguments",
                );
                return None;
            }
            (None, Some(signal), Some(pid_file)) => {
                let upper = signal.to_ascii_uppercase();
                let signal = upper.trim_start_matches("SIG").to_string();
                if !HOOK_SIGNALS.contains(&signal.as_str()) {
                    self.report(
                        raw.span(),
                        key,
                        format!("signal must be one of {}", HOOK_SIGNALS.join(", ")),
                    );
                    return None;
                }
                HookAction::Signal {
                    signal,
                    pid_file: PathBuf::from(pid_file),
                }
            }
            _ => {
                self.report(
                    raw.span(),
                    key,
                    "a hook is { exec = [..] } or { signal = \"HUP\", pid_file = \"..\" }",
                );
                return None;
            }
        };
        Some(HookConfig { action, timeout })
    }

    /// A provider endpoint (token, authorization, device, revocation) or the issuer.
    fn endpoint_url(&mut self, raw: &Spanned<String>, allow_http: bool, key: &str) -> Option<Url> {
        match check_endpoint_url(raw.get_ref().trim(), allow_http) {
            Ok(url) => Some(url),
            Err(msg) => {
                self.report(raw.span(), key, msg);
                None
            }
        }
    }

    /// A redirect URI: absolute, no fragment (RFC 6749 §3.1.2); https, or http on a
    /// loopback address (RFC 8252 §7.3) unless `allow_insecure_http`.
    fn redirect_uri(&mut self, raw: &Spanned<String>, allow_http: bool, key: &str) -> Option<Url> {
        match check_endpoint_url(raw.get_ref().trim(), allow_http) {
            Ok(url) => Some(url),
            Err(msg) => {
                self.report(
                    raw.span(),
                    key,
                    msg.replace("an endpoint", "a redirect URI"),
                );
                None
            }
        }
    }
}

/// The rules for every URL tokend sends secrets or a browser to: https, or plain http
/// only to a loopback host or with the explicit opt-in; no #fragment (RFC 6749 §3.1,
/// §3.2). Used for configured values and for discovered metadata alike.
pub fn check_endpoint_url(text: &str, allow_http: bool) -> Result<Url, String> {
    let url = Url::parse(text).map_err(|e| format!("{text:?} is not a URL: {e}"))?;
    match url.scheme() {
        "https" => {}
        "http" if allow_http || is_loopback_host(&url) => {}
        "http" => {
            return Err("plain http:// sends secrets in clear text: use https://, a loopback address, or set allow_insecure_http = true".into());
        }
        other => return Err(format!("unsupported scheme {other:?}: use https://")),
    }
    if url.fragment().is_some() {
        return Err("an endpoint URL has no #fragment (RFC 6749 §3.1, §3.2)".into());
    }
    Ok(url)
}

/// Whether the URL's host is `localhost` or a loopback IP literal.
pub fn is_loopback_host(url: &Url) -> bool {
    match url.host() {
        Some(url::Host::Domain(d)) => d.eq_ignore_ascii_case("localhost"),
        Some(url::Host::Ipv4(ip)) => IpAddr::V4(ip).is_loopback(),
        Some(url::Host::Ipv6(ip)) => IpAddr::V6(ip).is_loopback(),
        None => false,
    }
}

/// The leading part of `text` that can be a dotted TOML key (bare or quoted parts).
fn key_path_prefix(text: &str) -> String {
    let text = text.trim();
    let end = text
        .find(|c: char| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.' | '"')))
        .unwrap_or(text.len());
    text[..end].to_string()
}

/// 64 hex digits → 32 bytes.
fn decode_hex32(text: &str) -> Option<[u8; 32]> {
    if text.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(text.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    #[derive(Default)]
    struct FakeEnv {
        vars: HashMap<String, String>,
        files: HashMap<PathBuf, String>,
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

    fn env() -> FakeEnv {
        let mut e = FakeEnv::default();
        e.vars
            .insert("ZYWAVE_CLIENT_SECRET".into(), "zy-secret".into());
        e.files
            .insert(PathBuf::from("/run/secrets/zywave-rt"), "rt-seed\n".into());
        e
    }

    fn load(text: &str) -> Result<Config, ConfigError> {
        Config::from_str_at(text, Path::new("/etc/tokend/tokend.toml"), &env())
    }

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
    fn an_unknown_key_names_file_line_column_and_key() {
        let text = "[accounts.a]\ngrant = \"client_credentials\"\ntoken_url = \"https://x/t\"\nclient_id = \"c\"\nclient_secret = \"s\"\nclient_sercet = \"typo\"\n";
        let err = load(text).unwrap_err();
        let p = &err.problems[0];
        assert_eq!((p.line, p.column), (6, 1), "{err}");
        assert_eq!(p.key, "accounts.a.client_sercet");
        assert!(p.message.contains("unknown field"), "{err}");
        assert!(
            err.to_string()
                .starts_with("/etc/tokend/tokend.toml:6:1: key `accounts.a.client_sercet`"),
            "{err}"
        );
    }

    #[test]
    fn a_wrong_enum_value_is_located() {
        let text =
            "[accounts.a]\ngrant = \"password\"\ntoken_url = \"https://x/t\"\nclient_id = \"c\"\n";
        let err = load(text).unwrap_err();
        assert_eq!(err.problems[0].line, 2, "{err}");
        assert_eq!(err.problems[0].key, "accounts.a.grant");
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
    fn per_host_limits_are_read_and_checked() {
        let c = load("[provider]\nmax_concurrent_requests = 4\nmax_requests_per_second = 50\n")
            .unwrap();
        assert_eq!(
            c.per_host,
            HostLimits {
                max_concurrent: 4,
                max_per_second: Some(50.0)
            }
        );
        assert_eq!(load("").unwrap().per_host, HostLimits::default());
        let err = load("[provider]\nmax_concurrent_requests = 0\nmax_requests_per_second = 0\n")
            .unwrap_err();
        let keys: Vec<(&str, usize)> = err
            .problems
            .iter()
            .map(|p| (p.key.as_str(), p.line))
            .collect();
        assert_eq!(
            keys,
            [
                ("provider.max_concurrent_requests", 2),
                ("provider.max_requests_per_second", 3)
            ],
            "{err}"
        );
    }

    #[test]
    fn plain_http_is_allowed_only_on_loopback_or_by_explicit_opt_in() {
        let account = |url: &str, opt_in: bool| {
            format!(
                "[accounts.a]\ngrant = \"client_credentials\"\ntoken_url = \"{url}\"\nclient_id = \"c\"\nclient_secret = \"s\"\nallow_insecure_http = {opt_in}\n"
            )
        };
        assert!(load(&account("http://127.0.0.1:9000/token", false)).is_ok());
        assert!(load(&account("http://localhost:9000/token", false)).is_ok());
        assert!(load(&account("http://[::1]:9000/token", false)).is_ok());
        let err = load(&account("http://auth.internal/token", false)).unwrap_err();
        assert!(err.to_string().contains("allow_insecure_http"), "{err}");
        assert!(load(&account("http://auth.internal/token", true)).is_ok());
    }

    #[test]
    fn an_issuer_can_stand_in_for_token_url_and_one_of_them_is_required() {
        let base = "[accounts.a]\ngrant = \"refresh_token\"\nclient_id = \"c\"\n";
        let c = load(&format!("{base}issuer = \"https://id.example.com\"\n")).unwrap();
        let a = &c.accounts[&AccountName::parse("a").unwrap()];
        assert!(a.token_url.is_none());
        assert_eq!(
            a.endpoints.issuer.as_deref(),
            Some("https://id.example.com")
        );
        let err = load(base).unwrap_err();
        assert_eq!(err.problems[0].key, "accounts.a.token_url", "{err}");
        assert!(err.to_string().contains("issuer"), "{err}");
        let err = load(&format!(
            "{base}issuer = \"https://id.example.com/?tenant=1\"\nredirect_uri = \"http://example.com/cb\"\ndevice_authorization_endpoint = \"ftp://x/d\"\n"
        ))
        .unwrap_err();
        let keys: Vec<&str> = err.problems.iter().map(|p| p.key.as_str()).collect();
        assert_eq!(
            keys,
            [
                "accounts.a.issuer",
                "accounts.a.device_authorization_endpoint",
                "accounts.a.redirect_uri"
            ],
            "{err}"
        );
        let c = load(&format!(
            "{base}token_url = \"https://x/t\"\nredirect_uri = \"http://127.0.0.1:9499/callback\"\nauthorization_endpoint = \"https://x/authorize?tenant=1\"\nrevocation_endpoint = \"https://x/revoke\"\n"
        ))
        .unwrap();
        let e = &c.accounts[&AccountName::parse("a").unwrap()].endpoints;
        assert_eq!(e.redirect_uri.as_ref().unwrap().port(), Some(9499));
        assert_eq!(e.authorization.as_ref().unwrap().query(), Some("tenant=1"));
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

    #[test]
    fn out_of_range_timing_knobs_are_refused() {
        let err = load("[refresh]\nratio = 1.5\nbackoff_initial = \"10m\"\nbackoff_max = \"1m\"\nmargin = \"soon\"\n").unwrap_err();
        assert!(err.to_string().contains("margin"), "{err}");
        let err = load("[refresh]\nratio = 1.5\nbackoff_initial = \"10m\"\nbackoff_max = \"1m\"\n")
            .unwrap_err();
        let keys: Vec<&str> = err.problems.iter().map(|p| p.key.as_str()).collect();
        assert_eq!(keys, ["refresh.ratio", "refresh.backoff_max"], "{err}");
    }

    #[test]
    fn a_ca_file_must_hold_pem_certificates() {
        let mut e = env();
        e.files
            .insert(PathBuf::from("/etc/tokend/not-a-ca.pem"), "hello".into());
        let text = "[accounts.a]\ngrant = \"client_credentials\"\ntoken_url = \"https://x/t\"\nclient_id = \"c\"\nclient_secret = \"s\"\nca_file = \"not-a-ca.pem\"\n[accounts.b]\ngrant = \"client_credentials\"\ntoken_url = \"https://x/t\"\nclient_id = \"c\"\nclient_secret = \"s\"\nca_file = \"/missing.pem\"\n";
        let err = Config::from_str_at(text, Path::new("/etc/tokend/tokend.toml"), &e).unwrap_err();
        let keys: Vec<&str> = err.problems.iter().map(|p| p.key.as_str()).collect();
        assert_eq!(keys, ["accounts.a.ca_file", "accounts.b.ca_file"], "{err}");
        assert!(err.to_string().contains("no PEM certificate"), "{err}");
    }

    #[test]
    fn encryption_keys_are_validated_and_old_keys_need_a_current_one() {
        let hex = "ab".repeat(32);
        let ok = format!("[state]\nencryption_key = \"{hex}\"\n");
        assert!(load(&ok).unwrap().state.keyring.is_some());
        let err = load("[state]\nencryption_key = \"short\"\n").unwrap_err();
        assert_eq!(err.problems[0].key, "state.encryption_key", "{err}");
        let err = load(&format!(
            "[state]\nprevious_encryption_keys = [\"{hex}\"]\n"
        ))
        .unwrap_err();
        assert!(
            err.to_string().contains("needs state.encryption_key"),
            "{err}"
        );
        assert!(
            !err.to_string().contains(&hex),
            "key material is never echoed"
        );
    }

    #[test]
    fn relative_secret_files_come_from_the_credentials_directory_first() {
        let mut e = env();
        e.vars.insert(
            "CREDENTIALS_DIRECTORY".into(),
            "/run/credentials/tokend.service".into(),
        );
        e.files.insert(
            PathBuf::from("/run/credentials/tokend.service/cc"),
            "from-creds".into(),
        );
        e.files
            .insert(PathBuf::from("/etc/tokend/other"), "from-config-dir".into());
        let text = "[accounts.a]\ngrant = \"client_credentials\"\ntoken_url = \"https://x/t\"\nclient_id = \"c\"\nclient_secret = { file = \"cc\" }\n[accounts.b]\ngrant = \"client_credentials\"\ntoken_url = \"https://x/t\"\nclient_id = \"c\"\nclient_secret = { file = \"other\" }\n";
        let c = Config::from_str_at(text, Path::new("/etc/tokend/tokend.toml"), &e).unwrap();
        let secret = |n: &str| {
            c.accounts[&AccountName::parse(n).unwrap()]
                .client_secret
                .as_ref()
                .unwrap()
                .expose()
                .to_string()
        };
        assert_eq!(secret("a"), "from-creds");
        assert_eq!(secret("b"), "from-config-dir");
    }
}
