//! The command line: subcommands, the client for a running daemon (`token`, `status`,
//! `health`, `refresh`), the front of `login`/`import`/`logout` (their flows are in
//! `login`), logging set-up, and the exit codes every command keeps to.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::{CommandFactory, Parser, Subcommand};
use serde_json::Value;

use std::sync::Arc;

use crate::app::{self, RunError};
use crate::config::{AccountConfig, Config, DEFAULT_CONFIG_PATH, DEFAULT_LISTEN, Grant, LogFormat};
use crate::http::REQUEST_HEADER;
use crate::login::{self, LoginError};
use crate::provider::Provider;
use crate::secret::Secret;
use crate::store::{Handoff, state_path};

/// Exit codes (sysexits.h where one fits).
pub mod exit {
    /// Success.
    pub const OK: u8 = 0;
    /// A runtime failure: the daemon could not start, a request was refused, not ready.
    pub const FAILURE: u8 = 1;
    /// Bad command-line usage (clap's own).
    pub const USAGE: u8 = 2;
    /// The daemon could not be reached (EX_UNAVAILABLE).
    pub const UNAVAILABLE: u8 = 69;
    /// The configuration is invalid (EX_CONFIG). systemd units use
    /// `RestartPreventExitStatus=78` so a broken config does not restart-loop.
    pub const CONFIG: u8 = 78;
}

const LONG_VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    "\ncommit: ",
    env!("TOKEND_GIT_COMMIT"),
    "\ntarget: ",
    env!("TOKEND_TARGET"),
    "\nprofile: ",
    env!("TOKEND_PROFILE"),
);

#[derive(Debug, Parser)]
#[command(
    name = "tokend",
    version,
    long_version = LONG_VERSION,
    about = "Keeps OAuth 2.0 service-account tokens fresh and serves them on loopback"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the daemon.
    Run {
        #[command(flatten)]
        config: ConfigArg,
        /// Obtain every token, write the sinks, run the hooks, and exit: 0 when every
        /// account got a token, 1 otherwise (init-container mode; no listener is opened).
        #[arg(long)]
        once: bool,
    },
    /// Validate the config and show what each account will do.
    Check {
        #[command(flatten)]
        config: ConfigArg,
    },
    /// Run the daemon against an embedded provider, to try tokend without credentials.
    Demo,
    /// Print an account's current access token, fetched from the running daemon.
    Token {
        /// The account name.
        account: String,
        #[command(flatten)]
        client: ClientArgs,
        /// Ask for a token valid at least this many seconds (refreshing if need be).
        #[arg(long, value_name = "SECS")]
        min_valid: Option<u64>,
        /// Print the whole JSON answer (token, expiry, headers) instead of the bare token.
        #[arg(long)]
        json: bool,
    },
    /// Show every account's state, expiry, last refresh and last error.
    Status {
        #[command(flatten)]
        client: ClientArgs,
        /// Print the daemon's JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Exit 0 when the daemon is ready (every account holds a valid token), 1 when not.
    Health {
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Refresh an account's token now.
    Refresh {
        /// The account name.
        account: String,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Authorize an account in a browser (authorization code + PKCE) and store its
    /// refresh token; with a daemon running, it takes the token at once.
    Login {
        /// The account name.
        account: String,
        #[command(flatten)]
        config: ConfigArg,
        /// Only print the URL; do not try to open a browser.
        #[arg(long)]
        no_browser: bool,
        /// Do not listen for the redirect: read the code, or the whole redirect URL, from
        /// standard input (headless hosts; providers whose redirect URI is not loopback).
        #[arg(long, conflicts_with = "device")]
        manual: bool,
        /// Use the device authorization grant (RFC 8628): enter a code on any device.
        #[arg(long)]
        device: bool,
        /// Give up after this long without an answer ("90s", "10m").
        #[arg(long, value_name = "DURATION", default_value = "10m", value_parser = humantime::parse_duration)]
        timeout: Duration,
    },
    /// Store a refresh token read from standard input (never from the command line).
    Import {
        /// The account name.
        account: String,
        #[command(flatten)]
        config: ConfigArg,
    },
    /// Revoke the account's refresh token at the provider and delete its stored state.
    Logout {
        /// The account name.
        account: String,
        #[command(flatten)]
        config: ConfigArg,
        /// Delete the stored state without revoking the token at the provider.
        #[arg(long)]
        no_revoke: bool,
    },
    /// Print a shell completion script.
    Completions {
        /// bash, zsh, fish, elvish or powershell.
        shell: clap_complete::Shell,
    },
}

#[derive(Debug, clap::Args)]
pub struct ConfigArg {
    /// The config file [default: $TOKEND_CONFIG, else /etc/tokend/tokend.toml].
    #[arg(long, short = 'c', value_name = "PATH")]
    config: Option<PathBuf>,
}

impl ConfigArg {
    pub fn path(&self) -> PathBuf {
        config_path(self.config.as_deref())
    }
}

/// How client commands reach the daemon.
#[derive(Debug, clap::Args)]
pub struct ClientArgs {
    /// The daemon's base URL, or unix:/path/to/socket [default: the first listen address
    /// of the config, else http://127.0.0.1:8731].
    #[arg(long, env = "TOKEND_ENDPOINT")]
    endpoint: Option<String>,
    /// A file holding this consumer's key, sent as `Authorization: Bearer`.
    #[arg(long, value_name = "PATH")]
    key_file: Option<PathBuf>,
}

fn config_path(explicit: Option<&Path>) -> PathBuf {
    explicit
        .map(Path::to_path_buf)
        .or_else(|| std::env::var_os("TOKEND_CONFIG").map(PathBuf::from))
        .unwrap_or_else(|| PathBuf::from(DEFAULT_CONFIG_PATH))
}

/// Logs go to stderr: human-readable (coloured only on a terminal, without the timestamp
/// when the journal, which adds its own, is the reader) or JSON lines. `RUST_LOG`
/// filters (default info); `TOKEND_LOG_FORMAT` overrides the config's `log.format`.
pub fn init_tracing(format: LogFormat) {
    let format = match std::env::var("TOKEND_LOG_FORMAT").as_deref() {
        Ok("json") => LogFormat::Json,
        Ok("text") => LogFormat::Text,
        _ => format,
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let journald = std::env::var_os("JOURNAL_STREAM").is_some();
    let result = match (format, journald) {
        (LogFormat::Json, _) => builder.json().flatten_event(true).try_init(),
        (LogFormat::Text, true) => builder.with_ansi(false).without_time().try_init(),
        (LogFormat::Text, false) => builder
            .with_ansi(std::io::stderr().is_terminal())
            .try_init(),
    };
    // Already initialized (tests embedding the CLI): keep the existing subscriber.
    let _ = result;
}

/// Runs one command and returns its exit code.
pub fn dispatch(cli: Cli) -> u8 {
    if let Command::Completions { shell } = cli.command {
        clap_complete::generate(shell, &mut Cli::command(), "tokend", &mut std::io::stdout());
        return exit::OK;
    }
    if let Command::Check { config } = &cli.command {
        return check(&config.path());
    }
    // The client commands make one request: a thread per core would only cost start-up
    // time. Everything else runs the daemon, a provider client or a loopback listener.
    let client_only = matches!(
        cli.command,
        Command::Token { .. }
            | Command::Status { .. }
            | Command::Health { .. }
            | Command::Refresh { .. }
    );
    let mut builder = if client_only {
        tokio::runtime::Builder::new_current_thread()
    } else {
        tokio::runtime::Builder::new_multi_thread()
    };
    let runtime = match builder.enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("tokend: cannot start the async runtime: {e}");
            return exit::FAILURE;
        }
    };
    match cli.command {
        Command::Run { config, once } => {
            let path = config.path();
            let config = match Config::load(&path) {
                Ok(c) => c,
                Err(e) => return daemon_exit(Err(RunError::Config(e))),
            };
            init_tracing(config.log.format);
            if once {
                return match runtime.block_on(app::run_once(config)) {
                    Ok(true) => exit::OK,
                    Ok(false) => exit::FAILURE,
                    Err(e) => daemon_exit(Err(e)),
                };
            }
            daemon_exit(runtime.block_on(app::run(config, path)))
        }
        Command::Demo => {
            init_tracing(LogFormat::Text);
            daemon_exit(runtime.block_on(crate::demo::run()))
        }
        Command::Token {
            account,
            client,
            min_valid,
            json,
        } => runtime.block_on(token(&client, &account, min_valid, json)),
        Command::Status { client, json } => runtime.block_on(status(&client, json)),
        Command::Health { client } => runtime.block_on(health(&client)),
        Command::Refresh { account, client } => runtime.block_on(refresh(&client, &account)),
        Command::Login {
            account,
            config,
            no_browser,
            manual,
            device,
            timeout,
        } => {
            let mode = if device {
                LoginMode::Device
            } else if manual {
                LoginMode::Manual
            } else {
                LoginMode::Browser { open: !no_browser }
            };
            runtime.block_on(login(&config.path(), &account, mode, timeout))
        }
        Command::Import { account, config } => runtime.block_on(import(&config.path(), &account)),
        Command::Logout {
            account,
            config,
            no_revoke,
        } => runtime.block_on(logout(&config.path(), &account, !no_revoke)),
        Command::Check { .. } | Command::Completions { .. } => unreachable!("handled above"),
    }
}

/// How `tokend login` gets the authorization.
enum LoginMode {
    /// Loopback redirect listener; `open`: try a browser.
    Browser {
        open: bool,
    },
    Manual,
    Device,
}

/// The config and account for `login`/`import`/`logout`, or the exit code.
fn load_account(path: &Path, name: &str) -> Result<(Config, Arc<AccountConfig>), u8> {
    let config = Config::load(path).map_err(|e| {
        eprintln!("tokend: invalid configuration:\n{e}");
        exit::CONFIG
    })?;
    let account = login::refresh_account(&config, name).map_err(fail)?;
    Ok((config, account))
}

fn fail(e: LoginError) -> u8 {
    eprintln!("tokend: {e}");
    e.exit_code()
}

/// The account with its issuer's endpoints filled in. When discovery fails but the
/// endpoint this command needs is configured, it goes on with a warning.
async fn discovered(
    provider: &Provider,
    account: &AccountConfig,
    needed: fn(&AccountConfig) -> bool,
) -> Result<AccountConfig, LoginError> {
    if account.endpoints.issuer.is_none() {
        return Ok(account.clone());
    }
    match crate::discovery::discover(provider, account).await {
        Ok(a) => Ok(a),
        Err(e) if needed(account) => {
            eprintln!(
                "tokend: warning: discovery failed ({e}); going on with the configured endpoints"
            );
            Ok(account.clone())
        }
        Err(e) => Err(e.into()),
    }
}

async fn login(path: &Path, name: &str, mode: LoginMode, timeout: Duration) -> u8 {
    let (config, account) = match load_account(path, name) {
        Ok(x) => x,
        Err(code) => return code,
    };
    let result = async {
        let provider =
            Provider::http(config.provider.connect_timeout).map_err(LoginError::Exchange)?;
        let refresh_token = match mode {
            LoginMode::Device => {
                let account = discovered(&provider, &account, |a| {
                    a.token_url.is_some() && a.endpoints.device_authorization.is_some()
                })
                .await?;
                if account.endpoints.device_authorization.is_none() {
                    return Err(LoginError::Missing {
                        account: name.to_string(),
                        what: "device_authorization_endpoint",
                    });
                }
                let mut out = std::io::stdout();
                login::device_flow(&provider, &account, &mut out, timeout).await?
            }
            LoginMode::Manual | LoginMode::Browser { .. } => {
                let account = discovered(&provider, &account, |a| {
                    a.token_url.is_some() && a.endpoints.authorization.is_some()
                })
                .await?;
                code_flow(&provider, &account, mode, timeout).await?
            }
        };
        report_handoff(
            &config,
            &account,
            Handoff::RefreshToken(refresh_token),
            "logged in",
        )
        .await
    }
    .await;
    match result {
        Ok(()) => exit::OK,
        Err(e) => fail(e),
    }
}

/// The authorization code flow: print the URL (and open a browser), get the code from
/// the loopback listener or from stdin, exchange it.
async fn code_flow(
    provider: &Provider,
    account: &AccountConfig,
    mode: LoginMode,
    timeout: Duration,
) -> Result<Secret, LoginError> {
    let pkce = login::Pkce::generate();
    let state = login::random_state();
    let scope = login::login_scope(account);
    if let LoginMode::Manual = mode {
        let redirect_uri = account
            .endpoints
            .redirect_uri
            .clone()
            .ok_or_else(|| LoginError::ManualNeedsRedirect(account.name.to_string()))?;
        let url = login::authorize_url(
            account,
            redirect_uri.as_str(),
            scope.as_deref(),
            &state,
            &pkce.challenge,
        )?;
        println!("Open this URL in a browser, log in and allow access:\n\n{url}\n");
        eprintln!(
            "Then paste the address the browser was sent to (or only the code, from the browser's developer tools) and press Enter:"
        );
        let line = read_stdin(timeout, false).await?;
        let code = match login::parse_pasted(&line, &state)? {
            login::Pasted::Checked(code) => code,
            login::Pasted::BareCode(code) => {
                eprintln!(
                    "tokend: warning: a bare code carries no state, so it cannot be checked that it answers this login; paste the whole redirect URL to have it checked"
                );
                code
            }
        };
        return login::exchange_code(
            provider,
            account,
            &code,
            redirect_uri.as_str(),
            &pkce.verifier,
        )
        .await;
    }
    let listener = login::LoopbackListener::bind(account.endpoints.redirect_uri.as_ref()).await?;
    let redirect_uri = listener.redirect_uri().to_string();
    let url = login::authorize_url(
        account,
        &redirect_uri,
        scope.as_deref(),
        &state,
        &pkce.challenge,
    )?;
    println!("Open this URL in a browser, log in and allow access:\n\n{url}\n");
    eprintln!(
        "Waiting for the browser at {redirect_uri} (up to {}) ...",
        humantime::format_duration(timeout)
    );
    if let LoginMode::Browser { open: true } = mode {
        open_browser(url.as_str());
    }
    let code = listener.wait(&state, timeout).await?;
    login::exchange_code(provider, account, &code, &redirect_uri, &pkce.verifier).await
}

/// `xdg-open URL`, only where a graphical session is (DISPLAY or WAYLAND_DISPLAY);
/// failures are ignored: the URL is printed anyway.
fn open_browser(url: &str) {
    let graphical = ["DISPLAY", "WAYLAND_DISPLAY"]
        .iter()
        .any(|v| std::env::var_os(v).is_some_and(|x| !x.is_empty()));
    if graphical {
        let _ = std::process::Command::new("xdg-open")
            .arg(url)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn();
    }
}

/// One line (or, with `all`, everything up to EOF) from stdin, bounded by `timeout`.
async fn read_stdin(timeout: Duration, all: bool) -> Result<String, LoginError> {
    let read = tokio::task::spawn_blocking(move || {
        use std::io::Read;
        let mut text = String::new();
        let stdin = std::io::stdin();
        if all {
            stdin.lock().read_to_string(&mut text)?;
        } else {
            stdin.read_line(&mut text)?;
        }
        Ok::<String, std::io::Error>(text)
    });
    match tokio::time::timeout(timeout, read).await {
        Err(_) => Err(LoginError::Timeout(timeout)),
        Ok(Err(join)) => Err(LoginError::Stdin(std::io::Error::other(join.to_string()))),
        Ok(Ok(result)) => result.map_err(LoginError::Stdin),
    }
}

async fn import(path: &Path, name: &str) -> u8 {
    let (config, account) = match load_account(path, name) {
        Ok(x) => x,
        Err(code) => return code,
    };
    let result = async {
        if std::io::stdin().is_terminal() {
            eprintln!("Paste the refresh token, then press Enter and Ctrl-D:");
        }
        let mut text = Secret::new(read_stdin(Duration::from_secs(600), true).await?);
        text = Secret::new(text.expose().trim());
        if text.is_empty() {
            return Err(LoginError::EmptyInput);
        }
        report_handoff(&config, &account, Handoff::RefreshToken(text), "imported").await
    }
    .await;
    match result {
        Ok(()) => exit::OK,
        Err(e) => fail(e),
    }
}

async fn logout(path: &Path, name: &str, revoke: bool) -> u8 {
    let (config, account) = match load_account(path, name) {
        Ok(x) => x,
        Err(code) => return code,
    };
    let result = async {
        if revoke {
            let provider = Provider::http(config.provider.connect_timeout)
                .map_err(LoginError::Revoke)?;
            let resolved =
                discovered(&provider, &account, |a| a.endpoints.revocation.is_some()).await?;
            match login::revoke_stored(&provider, &config, &resolved).await? {
                login::Revocation::Revoked => println!("{name}: refresh token revoked at the provider"),
                login::Revocation::NothingStored => println!("{name}: no refresh token stored"),
                login::Revocation::NoEndpoint => eprintln!(
                    "tokend: warning: {name} has no revocation_endpoint (configured or discovered): the refresh token stays valid at the provider until it expires"
                ),
            }
        }
        if matches!(&account.grant, Grant::RefreshToken { seed: Some(_) }) {
            eprintln!(
                "tokend: note: the config still names a seed refresh_token for {name}; it is not used again while it stays the same, but remove it from the config"
            );
        }
        report_handoff(&config, &account, Handoff::Logout, "logged out").await
    }
    .await;
    match result {
        Ok(()) => exit::OK,
        Err(e) => fail(e),
    }
}

/// Hands off, then says where it went; with a daemon, shows the account's state from
/// `GET /v1/accounts` once it has settled (or what it is after a few seconds).
async fn report_handoff(
    config: &Config,
    account: &AccountConfig,
    handoff: Handoff,
    done: &str,
) -> Result<(), LoginError> {
    let name = &account.name;
    match login::hand_off(config, account, handoff, login::HANDOFF_WAIT).await? {
        login::HandedOff::Stored(path) => {
            println!(
                "{name}: {done}; stored in {} (the daemon uses it when it starts)",
                path.display()
            );
        }
        login::HandedOff::ToDaemon(pid) => {
            println!("{name}: {done}; the running daemon (pid {pid}) took it");
            let endpoint = match config.server.listen.first() {
                Some(crate::config::ListenAddr::Tcp(addr)) => format!("http://{addr}"),
                Some(crate::config::ListenAddr::Unix(path)) => format!("unix:{}", path.display()),
                None => format!("http://{DEFAULT_LISTEN}"),
            };
            let args = ClientArgs {
                endpoint: Some(endpoint),
                key_file: None,
            };
            if let Some(state) = settled_state(&args, name.as_str()).await {
                println!("{state}");
            }
        }
    }
    Ok(())
}

/// `ACCOUNT: STATE (LAST ERROR)` from the daemon, waiting up to 10 s for a state that
/// is not `pending`/`refreshing`; `None` if the daemon cannot be asked.
async fn settled_state(args: &ClientArgs, name: &str) -> Option<String> {
    let report = |e: ClientError| eprintln!("tokend: {e}");
    let client = DaemonClient::new(args).map_err(report).ok()?;
    let url = client.url(&["v1", "accounts"], &[]);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let body = client
            .call_ok(http::Method::GET, &url)
            .await
            .map_err(report)
            .ok()?;
        let v: Value = serde_json::from_str(&body).ok()?;
        let account = v["accounts"]
            .as_array()?
            .iter()
            .find(|a| a["account"] == name)?
            .clone();
        let state = account["state"].as_str().unwrap_or("?").to_string();
        let settled = !matches!(state.as_str(), "pending" | "refreshing");
        if settled || tokio::time::Instant::now() >= deadline {
            return Some(match account["last_error"].as_str() {
                Some(e) => format!("{name}: {state} ({e})"),
                None => format!("{name}: {state}"),
            });
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn daemon_exit(result: Result<(), RunError>) -> u8 {
    match result {
        Ok(()) => exit::OK,
        Err(RunError::Config(e)) => {
            eprintln!("tokend: invalid configuration:\n{e}");
            exit::CONFIG
        }
        Err(e) => {
            eprintln!("tokend: {e}");
            exit::FAILURE
        }
    }
}

fn check(path: &Path) -> u8 {
    let config = match Config::load(path) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{e}");
            return exit::CONFIG;
        }
    };
    use std::fmt::Write as _;
    let mut out = String::new();
    let _ = writeln!(out, "{}: ok", path.display());
    for warning in &config.warnings {
        let _ = writeln!(out, "warning: {warning}");
    }
    let listen: Vec<String> = config.server.listen.iter().map(|a| a.to_string()).collect();
    let _ = writeln!(out, "listen: {}", listen.join(", "));
    let _ = writeln!(out, "state dir: {}", config.state.dir.display());
    let _ = writeln!(out, "accounts: {}", config.accounts.len());
    for account in config.accounts.values() {
        // Discovery needs the network, which `check` does not use: name the issuer.
        let endpoint = match (&account.token_url, &account.endpoints.issuer) {
            (Some(url), _) => url.to_string(),
            (None, Some(issuer)) => format!("(discovered from issuer {issuer})"),
            (None, None) => "-".into(),
        };
        let _ = writeln!(
            out,
            "  {}: grant={} endpoint={} state={}",
            account.name,
            account.grant.as_str(),
            endpoint,
            state_path(&config.state.dir, &account.name).display()
        );
    }
    // `tokend check | head -1` closes the pipe early: that is not a failure to report.
    let _ = std::io::Write::write_all(&mut std::io::stdout(), out.as_bytes());
    exit::OK
}

/// The default endpoint for client commands: the first `server.listen` of the config at
/// the default path. Only that key is read, so a client user needs no access to the
/// secrets the config names.
fn default_endpoint() -> String {
    let path = config_path(None);
    let listen = std::fs::read_to_string(&path).ok().and_then(|text| {
        let table: toml::Table = toml::from_str(&text).ok()?;
        let first = table.get("server")?.get("listen")?.as_array()?.first()?;
        first.as_str().map(str::to_string)
    });
    match listen {
        Some(l) if l.starts_with("unix:") => l,
        Some(l) => format!("http://{l}"),
        None => format!("http://{DEFAULT_LISTEN}"),
    }
}

/// How long a client command waits for the daemon, from connecting to the last byte.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(60);

/// Why a client command failed. Nothing here holds the consumer key: it is only ever in
/// a sensitive header value.
#[derive(Debug, thiserror::Error)]
enum ClientError {
    #[error("cannot read the key file {}: {source}", path.display())]
    KeyFile {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the key file {} holds characters that cannot be sent in an HTTP header", path.display())]
    KeyNotSendable { path: PathBuf },
    #[error("invalid endpoint {endpoint}: {reason}")]
    Endpoint {
        endpoint: String,
        reason: &'static str,
    },
    #[error("cannot reach the daemon at {endpoint}: {source}")]
    Unreachable {
        endpoint: String,
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("cannot reach the daemon at {endpoint}: no answer within {}s", CLIENT_TIMEOUT.as_secs())]
    Timeout { endpoint: String },
    #[error("the daemon's answer was cut off: {0}")]
    CutOff(hyper::Error),
    /// A non-2xx answer; `detail` is its `error_description`, else the body.
    #[error("HTTP {status}: {detail}")]
    Refused { status: u16, detail: String },
}

impl ClientError {
    fn exit_code(&self) -> u8 {
        match self {
            ClientError::KeyFile { .. }
            | ClientError::KeyNotSendable { .. }
            | ClientError::Refused { .. } => exit::FAILURE,
            ClientError::Endpoint { .. } => exit::USAGE,
            ClientError::Unreachable { .. }
            | ClientError::Timeout { .. }
            | ClientError::CutOff(_) => exit::UNAVAILABLE,
        }
    }
}

/// Where the daemon's socket is.
#[derive(Debug)]
enum Connect {
    Tcp(url::Host, u16),
    Unix(PathBuf),
}

/// The client side of the API: one plain HTTP/1.1 request per call, with the guard
/// header and the consumer key. The daemon never serves TLS, so there is no TLS client
/// here: building one (reqwest's) loaded the system's root certificates on every
/// command, most of what a `tokend token` cost.
#[derive(Debug)]
struct DaemonClient {
    /// The endpoint as the user gave it, for messages.
    shown: String,
    /// Requests are made relative to this; for a Unix socket `http://localhost/`.
    base: url::Url,
    connect: Connect,
    /// `Bearer KEY`, marked sensitive so `Debug` never shows it.
    authorization: Option<http::HeaderValue>,
}

impl DaemonClient {
    fn new(args: &ClientArgs) -> Result<DaemonClient, ClientError> {
        let endpoint = args.endpoint.clone().unwrap_or_else(default_endpoint);
        let (base, connect) = parse_endpoint(&endpoint)?;
        let authorization = match &args.key_file {
            None => None,
            Some(path) => Some(bearer(path)?),
        };
        Ok(DaemonClient {
            shown: endpoint.trim_end_matches('/').to_string(),
            base,
            connect,
            authorization,
        })
    }

    /// The URL of `segments` (each percent-encoded as one path segment) under the base.
    fn url(&self, segments: &[&str], query: &[(&str, &str)]) -> url::Url {
        let mut url = self.base.clone();
        url.path_segments_mut()
            .expect("an http URL has a path")
            .pop_if_empty()
            .extend(segments);
        if !query.is_empty() {
            url.query_pairs_mut().extend_pairs(query);
        }
        url
    }

    /// Sends the request; returns the status and body, or why the daemon could not be
    /// asked.
    async fn call(
        &self,
        method: http::Method,
        url: &url::Url,
    ) -> Result<(u16, String), ClientError> {
        match tokio::time::timeout(CLIENT_TIMEOUT, self.exchange(method, url)).await {
            Ok(result) => result,
            Err(_) => Err(ClientError::Timeout {
                endpoint: self.shown.clone(),
            }),
        }
    }

    /// Like `call`, but a non-2xx answer is an error carrying its `error_description`.
    async fn call_ok(&self, method: http::Method, url: &url::Url) -> Result<String, ClientError> {
        let (status, body) = self.call(method, url).await?;
        if (200..300).contains(&status) {
            return Ok(body);
        }
        let detail = serde_json::from_str::<Value>(&body)
            .ok()
            .and_then(|v| v.get("error_description")?.as_str().map(str::to_string))
            .unwrap_or(body);
        Err(ClientError::Refused { status, detail })
    }

    async fn exchange(
        &self,
        method: http::Method,
        url: &url::Url,
    ) -> Result<(u16, String), ClientError> {
        match &self.connect {
            Connect::Tcp(host, port) => {
                let stream = match host {
                    url::Host::Ipv4(ip) => tokio::net::TcpStream::connect((*ip, *port)).await,
                    url::Host::Ipv6(ip) => tokio::net::TcpStream::connect((*ip, *port)).await,
                    url::Host::Domain(name) => {
                        tokio::net::TcpStream::connect((name.as_str(), *port)).await
                    }
                };
                let stream = stream.map_err(|e| self.unreachable(e))?;
                self.send(stream, method, url).await
            }
            Connect::Unix(path) => {
                let stream = tokio::net::UnixStream::connect(path)
                    .await
                    .map_err(|e| self.unreachable(e))?;
                self.send(stream, method, url).await
            }
        }
    }

    async fn send<S>(
        &self,
        stream: S,
        method: http::Method,
        url: &url::Url,
    ) -> Result<(u16, String), ClientError>
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static,
    {
        use http_body_util::BodyExt as _;

        let io = hyper_util::rt::TokioIo::new(stream);
        let (mut sender, connection) = hyper::client::conn::http1::handshake(io)
            .await
            .map_err(|e| self.unreachable(e))?;
        // The connection's errors also reach `send_request` or the body, which report
        // them; this task only drives the I/O.
        tokio::spawn(async move {
            let _ = connection.await;
        });
        let mut request = http::Request::builder()
            .method(method)
            .uri(&url[url::Position::BeforePath..])
            .header(
                http::header::HOST,
                &url[url::Position::BeforeHost..url::Position::AfterPort],
            )
            .header(REQUEST_HEADER, "cli");
        if let Some(value) = &self.authorization {
            request = request.header(http::header::AUTHORIZATION, value.clone());
        }
        let request = request
            .body(http_body_util::Empty::<hyper::body::Bytes>::new())
            .map_err(|e| self.unreachable(e))?;
        let response = sender
            .send_request(request)
            .await
            .map_err(|e| self.unreachable(e))?;
        let status = response.status().as_u16();
        let body = response
            .into_body()
            .collect()
            .await
            .map_err(ClientError::CutOff)?
            .to_bytes();
        Ok((status, String::from_utf8_lossy(&body).into_owned()))
    }

    fn unreachable(&self, e: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> ClientError {
        ClientError::Unreachable {
            endpoint: self.shown.clone(),
            source: e.into(),
        }
    }
}

/// `http://HOST[:PORT][/PREFIX]` or `unix:/PATH`: the base URL for requests and where
/// to connect. `https://` is refused: the daemon serves plain HTTP only, on loopback or
/// a Unix socket.
fn parse_endpoint(endpoint: &str) -> Result<(url::Url, Connect), ClientError> {
    let invalid = |reason| ClientError::Endpoint {
        endpoint: endpoint.to_string(),
        reason,
    };
    if let Some(path) = endpoint.strip_prefix("unix:") {
        if path.is_empty() {
            return Err(invalid("no socket path after unix:"));
        }
        let base = url::Url::parse("http://localhost/").expect("a valid URL");
        return Ok((base, Connect::Unix(PathBuf::from(path))));
    }
    let url = url::Url::parse(endpoint)
        .map_err(|_| invalid("expected http://HOST:PORT or unix:/path/to/socket"))?;
    match url.scheme() {
        "http" => {}
        "https" => {
            return Err(invalid(
                "the daemon serves plain HTTP only (on loopback or a Unix socket): use http:// or unix:",
            ));
        }
        _ => return Err(invalid("expected http://HOST:PORT or unix:/path/to/socket")),
    }
    if url.query().is_some() || url.fragment().is_some() {
        return Err(invalid("a query or fragment has no place in an endpoint"));
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(invalid(
            "credentials in the URL are not sent: use --key-file",
        ));
    }
    let host = url.host().map(|h| h.to_owned());
    let port = url.port_or_known_default();
    match (host, port) {
        (Some(host), Some(port)) => Ok((url, Connect::Tcp(host, port))),
        _ => Err(invalid("no host")),
    }
}

/// The `Authorization` value for the key in `path` (its content, trimmed).
fn bearer(path: &Path) -> Result<http::HeaderValue, ClientError> {
    let key = std::fs::read_to_string(path)
        .map(|k| Secret::new(format!("Bearer {}", k.trim())))
        .map_err(|source| ClientError::KeyFile {
            path: path.to_path_buf(),
            source,
        })?;
    let mut value =
        http::HeaderValue::from_str(key.expose()).map_err(|_| ClientError::KeyNotSendable {
            path: path.to_path_buf(),
        })?;
    value.set_sensitive(true);
    Ok(value)
}

/// The exit code of a client command; failures are reported on stderr.
fn finish(result: Result<u8, ClientError>) -> u8 {
    result.unwrap_or_else(|e| {
        eprintln!("tokend: {e}");
        e.exit_code()
    })
}

async fn token(args: &ClientArgs, account: &str, min_valid: Option<u64>, json: bool) -> u8 {
    finish(
        async {
            let client = DaemonClient::new(args)?;
            let mut segments = vec!["v1", "token", account];
            if !json {
                segments.push("access_token");
            }
            let secs = min_valid.map(|s| s.to_string());
            let query: Vec<(&str, &str)> = secs.iter().map(|s| ("min_valid", s.as_str())).collect();
            let url = client.url(&segments, &query);
            let body = client.call_ok(http::Method::GET, &url).await?;
            println!("{}", body.trim_end());
            Ok(exit::OK)
        }
        .await,
    )
}

async fn refresh(args: &ClientArgs, account: &str) -> u8 {
    finish(
        async {
            let client = DaemonClient::new(args)?;
            let url = client.url(&["v1", "accounts", account, "refresh"], &[]);
            let body = client.call_ok(http::Method::POST, &url).await?;
            let v: Value = serde_json::from_str(&body).unwrap_or_default();
            println!(
                "{account}: {} (expires in {}s)",
                v["state"].as_str().unwrap_or("?"),
                v["expires_in"]
            );
            Ok(exit::OK)
        }
        .await,
    )
}

async fn health(args: &ClientArgs) -> u8 {
    finish(
        async {
            let client = DaemonClient::new(args)?;
            let url = client.url(&["readyz"], &[]);
            let (status, body) = client.call(http::Method::GET, &url).await?;
            if status == 200 {
                println!("ready");
                return Ok(exit::OK);
            }
            let v: Value = serde_json::from_str(&body).unwrap_or_default();
            let waiting: Vec<String> = v["not_ready"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .map(|x| {
                            format!(
                                "{} ({})",
                                x["account"].as_str().unwrap_or("?"),
                                x["state"].as_str().unwrap_or("?")
                            )
                        })
                        .collect()
                })
                .unwrap_or_default();
            println!("not ready: {}", waiting.join(", "));
            Ok(exit::FAILURE)
        }
        .await,
    )
}

async fn status(args: &ClientArgs, json: bool) -> u8 {
    finish(
        async {
            let client = DaemonClient::new(args)?;
            let url = client.url(&["v1", "accounts"], &[]);
            let body = client.call_ok(http::Method::GET, &url).await?;
            if json {
                println!("{}", body.trim_end());
                return Ok(exit::OK);
            }
            let v: Value = serde_json::from_str(&body).unwrap_or_default();
            let rows: Vec<[String; 5]> = v["accounts"]
                .as_array()
                .map(|a| a.iter().map(status_row).collect())
                .unwrap_or_default();
            print!(
                "{}",
                table(
                    [
                        "ACCOUNT",
                        "STATE",
                        "EXPIRES IN",
                        "LAST REFRESH",
                        "LAST ERROR"
                    ],
                    &rows
                )
            );
            Ok(exit::OK)
        }
        .await,
    )
}

fn status_row(a: &Value) -> [String; 5] {
    let text = |k: &str| a[k].as_str().unwrap_or("-").to_string();
    let expires = match a["expires_in"].as_u64() {
        Some(s) => humantime::format_duration(Duration::from_secs(s)).to_string(),
        None => "-".into(),
    };
    [
        text("account"),
        text("state"),
        expires,
        text("last_refresh"),
        text("last_error"),
    ]
}

/// Left-aligned columns, the last one unpadded (it may be long).
fn table<const N: usize>(header: [&str; N], rows: &[[String; N]]) -> String {
    let mut widths = header.map(str::len);
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let mut line = |cells: Vec<&str>| {
        for (i, cell) in cells.iter().enumerate() {
            if i + 1 == N {
                out.push_str(cell);
            } else {
                out.push_str(&format!("{cell:<width$}  ", width = widths[i]));
            }
        }
        out.push('\n');
    };
    line(header.to_vec());
    for row in rows {
        line(row.iter().map(String::as_str).collect());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    fn client(endpoint: &str, key_file: Option<PathBuf>) -> Result<DaemonClient, ClientError> {
        DaemonClient::new(&ClientArgs {
            endpoint: Some(endpoint.to_string()),
            key_file,
        })
    }

    fn target(url: &url::Url) -> (&str, &str) {
        (
            &url[url::Position::BeforeHost..url::Position::AfterPort],
            &url[url::Position::BeforePath..],
        )
    }

    #[test]
    fn endpoints_name_a_socket_and_a_host_header() {
        let c = client("http://127.0.0.1:8731/", None).unwrap();
        assert!(matches!(c.connect, Connect::Tcp(url::Host::Ipv4(ip), 8731) if ip.is_loopback()));
        let url = c.url(
            &["v1", "token", "zy", "access_token"],
            &[("min_valid", "30")],
        );
        assert_eq!(
            target(&url),
            ("127.0.0.1:8731", "/v1/token/zy/access_token?min_valid=30")
        );

        let c = client("http://[::1]:9000/tokend", None).unwrap();
        assert!(matches!(c.connect, Connect::Tcp(url::Host::Ipv6(_), 9000)));
        assert_eq!(
            target(&c.url(&["readyz"], &[])),
            ("[::1]:9000", "/tokend/readyz")
        );

        let c = client("http://localhost", None).unwrap();
        assert!(matches!(&c.connect, Connect::Tcp(url::Host::Domain(d), 80) if d == "localhost"));

        let c = client("unix:/run/tokend/tokend.sock", None).unwrap();
        assert!(
            matches!(&c.connect, Connect::Unix(p) if p == Path::new("/run/tokend/tokend.sock"))
        );
        assert_eq!(
            target(&c.url(&["v1", "accounts"], &[])),
            ("localhost", "/v1/accounts")
        );
    }

    #[test]
    fn an_account_name_stays_one_path_segment() {
        let c = client("http://127.0.0.1:8731", None).unwrap();
        let url = c.url(&["v1", "token", "a b/../c?d#e", "access_token"], &[]);
        assert_eq!(
            target(&url).1,
            "/v1/token/a%20b%2F..%2Fc%3Fd%23e/access_token"
        );
    }

    #[test]
    fn endpoints_the_daemon_cannot_serve_are_usage_errors() {
        for endpoint in [
            "https://127.0.0.1:8731",
            "ftp://127.0.0.1",
            "127.0.0.1:8731",
            "http://127.0.0.1:8731/?x=1",
            "http://user:pw@127.0.0.1:8731",
            "unix:",
        ] {
            let e = client(endpoint, None).unwrap_err();
            assert!(
                matches!(e, ClientError::Endpoint { .. }),
                "{endpoint}: {e:?}"
            );
            assert_eq!(e.exit_code(), exit::USAGE, "{endpoint}");
        }
        let e = client("https://127.0.0.1:8731", None).unwrap_err();
        assert!(e.to_string().contains("plain HTTP"), "{e}");
    }

    #[test]
    fn the_key_never_shows_in_debug_or_errors() {
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("key");
        std::fs::write(&key, "k3y-s3cret\n").unwrap();
        let c = client("http://127.0.0.1:8731", Some(key.clone())).unwrap();
        let shown = format!("{c:?}");
        assert!(!shown.contains("k3y-s3cret"), "{shown}");
        assert_eq!(
            c.authorization.as_ref().unwrap().to_str().unwrap(),
            "Bearer k3y-s3cret"
        );

        std::fs::write(&key, "k3y-s3cret\nsecond line").unwrap();
        let e = client("http://127.0.0.1:8731", Some(key)).unwrap_err();
        assert!(matches!(e, ClientError::KeyNotSendable { .. }), "{e:?}");
        assert!(!format!("{e} {e:?}").contains("k3y-s3cret"));
        assert_eq!(e.exit_code(), exit::FAILURE);
    }

    #[tokio::test(start_paused = true)]
    async fn a_daemon_that_never_answers_is_unavailable_after_the_timeout() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let endpoint = format!("http://{}", listener.local_addr().unwrap());
        // Accepts and then holds the connection without a word.
        let _silent = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((stream, _)) = listener.accept().await {
                held.push(stream);
            }
        });
        let c = client(&endpoint, None).unwrap();
        let e = c
            .call(http::Method::GET, &c.url(&["readyz"], &[]))
            .await
            .unwrap_err();
        assert!(matches!(e, ClientError::Timeout { .. }), "{e:?}");
        assert_eq!(e.exit_code(), exit::UNAVAILABLE);
        assert!(e.to_string().contains(&endpoint), "{e}");
    }

    #[test]
    fn status_table_aligns_columns() {
        let rows = vec![
            [
                "zywave".to_string(),
                "ok".into(),
                "59m".into(),
                "2026-11-23T10:00:00Z".into(),
                "-".into(),
            ],
            [
                "a".to_string(),
                "needs_reauth".into(),
                "-".into(),
                "-".into(),
                "refresh token rejected".into(),
            ],
        ];
        let t = table(
            [
                "ACCOUNT",
                "STATE",
                "EXPIRES IN",
                "LAST REFRESH",
                "LAST ERROR",
            ],
            &rows,
        );
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines.len(), 3);
        let col = lines[0].find("STATE").unwrap();
        assert_eq!(lines[1].find("ok"), Some(col));
        assert_eq!(lines[2].find("needs_reauth"), Some(col));
        assert!(lines[2].ends_with("refresh token rejected"));
    }
}
