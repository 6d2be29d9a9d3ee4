//! The front of `login`, `import` and `logout`: what they print and read on the terminal,
//! the browser, and their exit codes. The flows themselves (PKCE, the loopback listener,
//! the device grant, revocation, the hand-off) are in `login`.

use std::io::IsTerminal;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;

use super::client::{ClientError, DaemonClient};
use super::exit;
use super::login::{self, LoginError};
use crate::config::{AccountConfig, Config, DEFAULT_LISTEN, Grant};
use crate::provider::Provider;
use crate::secret::Secret;
use crate::store::Handoff;

/// How `tokend login` gets the authorization.
pub enum LoginMode {
    /// Loopback redirect listener; `open`: try a browser.
    Browser {
        open: bool,
    },
    Manual,
    Device,
}

impl LoginMode {
    /// The mode `--device`, `--manual` and `--no-browser` ask for.
    pub fn from_flags(device: bool, manual: bool, no_browser: bool) -> LoginMode {
        if device {
            LoginMode::Device
        } else if manual {
            LoginMode::Manual
        } else {
            LoginMode::Browser { open: !no_browser }
        }
    }
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
    match crate::provider::discovery::discover(provider, account).await {
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

pub async fn login(path: &Path, name: &str, mode: LoginMode, timeout: Duration) -> u8 {
    let (config, account) = match load_account(path, name) {
        Ok(x) => x,
        Err(code) => return code,
    };
    let result = async {
        let provider =
            Provider::http(config.provider.connect_timeout).map_err(LoginError::Exchange)?;
        let (refresh_token, account) = match mode {
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
                let rt = login::device_flow(&provider, &account, &mut out, timeout).await?;
                (rt, account)
            }
            LoginMode::Manual | LoginMode::Browser { .. } => {
                let account = discovered(&provider, &account, |a| {
                    a.token_url.is_some() && a.endpoints.authorization.is_some()
                })
                .await?;
                let rt = code_flow(&provider, &account, mode, timeout).await?;
                (rt, account)
            }
        };
        // The refresh grant is what the daemon will use: proven once before anything
        // stored is replaced.
        let chain = login::try_refresh_token(&provider, &config, &account, refresh_token).await?;
        report_handoff(&config, &account, Handoff::RefreshToken(chain), "logged in").await
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
    let listener = login::LoopbackListener::bind(account.endpoints.redirect_uri.as_deref()).await?;
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

pub async fn import(path: &Path, name: &str) -> u8 {
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
        let provider =
            Provider::http(config.provider.connect_timeout).map_err(LoginError::Exchange)?;
        let account = discovered(&provider, &account, |a| a.token_url.is_some()).await?;
        let chain = login::try_refresh_token(&provider, &config, &account, text).await?;
        report_handoff(&config, &account, Handoff::RefreshToken(chain), "imported").await
    }
    .await;
    match result {
        Ok(()) => exit::OK,
        Err(e) => fail(e),
    }
}

pub async fn logout(path: &Path, name: &str, revoke: bool) -> u8 {
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
pub(super) async fn report_handoff(
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
        login::HandedOff::Shared(left) if left.taken => {
            println!(
                "{name}: {done}; the replica holding the account took it from {}",
                left.location
            );
        }
        login::HandedOff::Shared(left) => {
            println!(
                "{name}: {done}; it waits in {} for the replica that holds the account (none took it within {}s: is a replica running?)",
                left.location,
                login::HANDOFF_WAIT.as_secs()
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
