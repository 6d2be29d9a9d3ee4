//! The command line: subcommands, the client commands (`token`, `status`, `health`,
//! `refresh`; their HTTP client is in `client`), the front of `login`/`import`/`logout`
//! (their flows are in `login`), logging set-up, and the exit codes every command keeps to.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::{CommandFactory, Parser, Subcommand};
use serde_json::Value;

use std::sync::Arc;

use crate::app::{self, RunError};
use crate::config::{AccountConfig, Config, DEFAULT_CONFIG_PATH, DEFAULT_LISTEN, Grant, LogFormat};
use crate::provider::Provider;
use crate::secret::Secret;
use crate::store::{Handoff, state_path};
use client::{ClientError, DaemonClient};
use login::LoginError;

pub mod client;
pub mod exit;
pub mod login;

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
    // The client commands make one blocking request and need no async runtime: building
    // one (and its threads) would be most of what they cost.
    let command = match cli.command {
        Command::Completions { shell } => {
            clap_complete::generate(shell, &mut Cli::command(), "tokend", &mut std::io::stdout());
            return exit::OK;
        }
        Command::Check { config } => return check(&config.path()),
        Command::Token {
            account,
            client,
            min_valid,
            json,
        } => return finish(token(&client, &account, min_valid, json)),
        Command::Status { client, json } => return finish(status(&client, json)),
        Command::Health { client } => return finish(health(&client)),
        Command::Refresh { account, client } => return finish(refresh(&client, &account)),
        other => other,
    };
    // Everything else runs the daemon, a provider client or a loopback listener.
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("tokend: cannot start the async runtime: {e}");
            return exit::FAILURE;
        }
    };
    match command {
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
        Command::Check { .. }
        | Command::Completions { .. }
        | Command::Token { .. }
        | Command::Status { .. }
        | Command::Health { .. }
        | Command::Refresh { .. } => unreachable!("handled above"),
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
            // The client blocks (up to a few seconds while the account settles): on
            // the blocking pool, so no runtime worker is held up.
            let name = name.to_string();
            let settled = tokio::task::spawn_blocking(move || settled_state(&endpoint, &name));
            if let Ok(Some(state)) = settled.await {
                println!("{state}");
            }
        }
    }
    Ok(())
}

/// `ACCOUNT: STATE (LAST ERROR)` from the daemon, waiting up to 10 s for a state that
/// is not `pending`/`refreshing`; `None` if the daemon cannot be asked. Blocking.
fn settled_state(endpoint: &str, name: &str) -> Option<String> {
    let report = |e: ClientError| eprintln!("tokend: {e}");
    let client = DaemonClient::new(endpoint, None).map_err(report).ok()?;
    let url = client.url(&["v1", "accounts"], &[]);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let body = client
            .call_ok(http::Method::GET, &url)
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
        if settled || std::time::Instant::now() >= deadline {
            return Some(match account["last_error"].as_str() {
                Some(e) => format!("{name}: {state} ({e})"),
                None => format!("{name}: {state}"),
            });
        }
        std::thread::sleep(Duration::from_millis(100));
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

/// The client for a command's `--endpoint` (else the default) and `--key-file`.
fn daemon_client(args: &ClientArgs) -> Result<DaemonClient, ClientError> {
    let endpoint = args.endpoint.clone().unwrap_or_else(default_endpoint);
    DaemonClient::new(&endpoint, args.key_file.as_deref())
}

/// The exit code of a client command; failures are reported on stderr.
fn finish(result: Result<u8, ClientError>) -> u8 {
    result.unwrap_or_else(|e| {
        eprintln!("tokend: {e}");
        e.exit_code()
    })
}

fn token(
    args: &ClientArgs,
    account: &str,
    min_valid: Option<u64>,
    json: bool,
) -> Result<u8, ClientError> {
    let client = daemon_client(args)?;
    let mut segments = vec!["v1", "token", account];
    if !json {
        segments.push("access_token");
    }
    let secs = min_valid.map(|s| s.to_string());
    let query: Vec<(&str, &str)> = secs.iter().map(|s| ("min_valid", s.as_str())).collect();
    let url = client.url(&segments, &query);
    let body = client.call_ok(http::Method::GET, &url)?;
    println!("{}", body.trim_end());
    Ok(exit::OK)
}

fn refresh(args: &ClientArgs, account: &str) -> Result<u8, ClientError> {
    let client = daemon_client(args)?;
    let url = client.url(&["v1", "accounts", account, "refresh"], &[]);
    let body = client.call_ok(http::Method::POST, &url)?;
    let v: Value = serde_json::from_str(&body).unwrap_or_default();
    println!(
        "{account}: {} (expires in {}s)",
        v["state"].as_str().unwrap_or("?"),
        v["expires_in"]
    );
    Ok(exit::OK)
}

fn health(args: &ClientArgs) -> Result<u8, ClientError> {
    let client = daemon_client(args)?;
    let url = client.url(&["readyz"], &[]);
    let (status, body) = client.call(http::Method::GET, &url)?;
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

fn status(args: &ClientArgs, json: bool) -> Result<u8, ClientError> {
    let client = daemon_client(args)?;
    let url = client.url(&["v1", "accounts"], &[]);
    let body = client.call_ok(http::Method::GET, &url)?;
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
