//! The command line: the subcommands and their arguments, and `dispatch`, which hands
//! each to the module that runs it (`daemon`, `remote`, `login_cmd`). No command's logic
//! is here; none of the child modules imports this one.

use std::path::PathBuf;
use std::time::Duration;

use clap::{CommandFactory, Parser, Subcommand};

use crate::config::DEFAULT_CONFIG_PATH;
use login_cmd::LoginMode;

mod check;
pub mod client;
mod daemon;
pub mod exit;
mod http1;
mod logging;
pub mod login;
mod login_cmd;
mod reload;
mod remote;
mod shared;
mod state_cmd;
mod target;

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
    about = "Keeps OAuth 2.0 service-account tokens fresh and serves them on loopback",
    after_help = exit::TABLE
)]
pub struct Cli {
    /// Before or after the subcommand: every command reads the same config.
    #[command(flatten)]
    pub config: ConfigArg,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the daemon.
    Run {
        /// Obtain every token, write the sinks, run the hooks, and exit: 0 when every
        /// account got a token, 1 otherwise (init-container mode; no listener is opened).
        #[arg(long)]
        once: bool,
    },
    /// Validate the config and show what each account will do.
    Check,
    /// Run the daemon against an embedded provider, to try tokend without credentials.
    #[cfg(feature = "demo")]
    Demo,
    /// Print an account's current access token, fetched from the running daemon.
    Token {
        /// The account name.
        account: String,
        #[command(flatten)]
        client: ClientArgs,
        /// Ask for a token valid at least this long, refreshing if need be ("5m", "90s",
        /// or plain seconds).
        #[arg(long, value_name = "DURATION", value_parser = parse_min_valid)]
        min_valid: Option<Duration>,
        /// Print the whole JSON answer (token, expiry, headers) instead of the bare token.
        #[arg(long)]
        json: bool,
    },
    /// Show every account's state, expiry, last refresh and last error.
    Status {
        /// Only this account (exit 1 when the daemon has none of that name).
        account: Option<String>,
        #[command(flatten)]
        client: ClientArgs,
        /// Print the daemon's JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Exit 0 when the daemon is ready (every account holds a valid token), 75 when not.
    Health {
        #[command(flatten)]
        client: ClientArgs,
        /// Only whether the daemon answers (GET /healthz), whatever its accounts' state:
        /// a liveness probe, which a provider outage must not fail.
        #[arg(long)]
        live: bool,
    },
    /// Refresh an account's token now.
    Refresh {
        /// The account name.
        account: String,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Make the running daemon reload its config (SIGHUP) and report the outcome: exit 0
    /// when applied, 78 when the new config is invalid (the old one keeps running), 69
    /// when no daemon runs.
    Reload {
        #[command(flatten)]
        client: ClientArgs,
        /// How long to wait for the daemon to report the reload.
        #[arg(long, value_name = "DURATION", default_value = "30s", value_parser = humantime::parse_duration)]
        timeout: Duration,
    },
    /// Authorize an account in a browser (authorization code + PKCE) and store its
    /// refresh token; with a daemon running, it takes the token at once.
    Login {
        /// The account name.
        account: String,
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
    },
    /// Revoke the account's refresh token at the provider and delete its stored state.
    Logout {
        /// The account name.
        account: String,
        /// Delete the stored state without revoking the token at the provider.
        #[arg(long)]
        no_revoke: bool,
    },
    /// Manage the state directory without the provider.
    State {
        #[command(subcommand)]
        command: StateCommand,
    },
    /// Print a shell completion script.
    Completions {
        /// bash, zsh, fish, elvish or powershell.
        shell: clap_complete::Shell,
    },
}

#[derive(Debug, Subcommand)]
pub enum StateCommand {
    /// Move account OLD's state (its live refresh token) to NEW after renaming the account
    /// in the config; nothing is sent to the provider. With the daemon running, it takes
    /// the state over at once (SIGHUP).
    Rename {
        /// The account's name before the rename.
        old: String,
        /// Its name in the config now.
        new: String,
    },
    /// Copy a stopped daemon's state directory (records, pending handoffs, the ledger of
    /// spent refresh tokens) into the store the other config's `[state]` names, then mark
    /// the directory as moved so that no tokend refreshes its chains again; nothing is
    /// sent to any provider. Safe to run again after an interruption.
    Copy {
        /// The state directory to copy, as file:DIR.
        #[arg(long, value_name = "file:DIR")]
        from: String,
        /// The config of the store to copy into; its accounts are the ones copied.
        #[arg(long, value_name = "PATH")]
        to_config: PathBuf,
    },
}

#[derive(Debug, clap::Args)]
pub struct ConfigArg {
    /// The config file [default: $TOKEND_CONFIG, else /etc/tokend/tokend.toml].
    #[arg(long, short = 'c', value_name = "PATH", global = true)]
    config: Option<PathBuf>,
}

impl ConfigArg {
    pub fn path(&self) -> PathBuf {
        self.located().path
    }

    /// The config's path and whether it was named (`--config`, `$TOKEND_CONFIG`) or is
    /// the default.
    fn located(&self) -> target::ConfigFile {
        let (path, named) = match (&self.config, std::env::var_os("TOKEND_CONFIG")) {
            (Some(p), _) => (p.clone(), Some("--config")),
            (None, Some(p)) => (PathBuf::from(p), Some("$TOKEND_CONFIG")),
            (None, None) => (PathBuf::from(DEFAULT_CONFIG_PATH), None),
        };
        target::ConfigFile { path, named }
    }
}

/// How client commands reach the daemon.
#[derive(Debug, clap::Args)]
pub struct ClientArgs {
    /// The daemon's base URL, or unix:/path/to/socket [default: $TOKEND_ENDPOINT, else
    /// the first listen address of the config, else http://127.0.0.1:8731].
    #[arg(long)]
    endpoint: Option<String>,
    /// A file holding this consumer's key, sent as `Authorization: Bearer` [default: the
    /// key of a consumer in the config, if this user can read one].
    #[arg(long, value_name = "PATH")]
    key_file: Option<PathBuf>,
}

impl ClientArgs {
    /// Where the daemon is: `--endpoint`, else `$TOKEND_ENDPOINT`, else the config's.
    fn target(self, config: &ConfigArg) -> target::Target {
        let endpoint = match self.endpoint {
            Some(e) => Some((e, target::Origin::Flag)),
            None => std::env::var("TOKEND_ENDPOINT")
                .ok()
                .filter(|e| !e.is_empty())
                .map(|e| (e, target::Origin::Env)),
        };
        target::Target {
            endpoint,
            key_file: self.key_file,
            config: config.located(),
        }
    }
}

/// `--min-valid`: a duration (`5m`, `90s`, `1h 30m`) or plain whole seconds.
fn parse_min_valid(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    if let Ok(secs) = text.parse::<u64>() {
        return Ok(Duration::from_secs(secs));
    }
    humantime::parse_duration(text).map_err(|e| {
        format!("{e}: expected a duration such as 5m, 90s or 1h 30m, or whole seconds")
    })
}

/// Parses the command line; a usage error exits 64 (EX_USAGE) rather than clap's 2, and
/// `--help`/`--version` exit 0.
pub fn parse() -> Result<Cli, u8> {
    Cli::try_parse().map_err(|e| {
        let code = if e.use_stderr() {
            exit::USAGE
        } else {
            exit::OK
        };
        // Printing to a closed pipe is nothing to report.
        let _ = e.print();
        code
    })
}

/// Runs one command and returns its exit code.
pub fn dispatch(cli: Cli) -> u8 {
    let config = &cli.config;
    match cli.command {
        Command::Completions { shell } => {
            clap_complete::generate(shell, &mut Cli::command(), "tokend", &mut std::io::stdout());
            exit::OK
        }
        Command::Check => daemon::check(&config.path()),
        Command::Token {
            account,
            client,
            min_valid,
            json,
        } => remote::finish(remote::token(
            &client.target(config),
            &account,
            min_valid,
            json,
        )),
        Command::Status {
            account,
            client,
            json,
        } => remote::finish(remote::status(
            &client.target(config),
            account.as_deref(),
            json,
        )),
        Command::Health { client, live } => {
            remote::finish(remote::health(&client.target(config), live))
        }
        Command::Refresh { account, client } => {
            remote::finish(remote::refresh(&client.target(config), &account))
        }
        Command::Reload { client, timeout } => {
            remote::finish(reload::reload(&client.target(config), timeout))
        }
        Command::Run { once } => block_on(daemon::run(config.path(), once)),
        #[cfg(feature = "demo")]
        Command::Demo => block_on(daemon::demo()),
        Command::Login {
            account,
            no_browser,
            manual,
            device,
            timeout,
        } => {
            let mode = LoginMode::from_flags(device, manual, no_browser);
            block_on(login_cmd::login(&config.path(), &account, mode, timeout))
        }
        Command::Import { account } => block_on(login_cmd::import(&config.path(), &account)),
        Command::Logout { account, no_revoke } => {
            block_on(login_cmd::logout(&config.path(), &account, !no_revoke))
        }
        Command::State {
            command: StateCommand::Rename { old, new },
        } => block_on(state_cmd::rename(&config.path(), &old, &new)),
        Command::State {
            command: StateCommand::Copy { from, to_config },
        } => block_on(state_cmd::copy(&from, &to_config)),
    }
}

/// Runs the daemon, a provider client or a loopback listener to its end. Only these
/// commands get an async runtime: the client commands make one blocking request, and
/// building a runtime (and its threads) would be most of what they cost.
fn block_on(command: impl Future<Output = u8>) -> u8 {
    match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime.block_on(command),
        Err(e) => {
            eprintln!("tokend: cannot start the async runtime: {e}");
            exit::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn the_config_may_come_before_or_after_the_subcommand() {
        for args in [
            &["tokend", "--config", "x.toml", "status"][..],
            &["tokend", "status", "--config", "x.toml"],
            &["tokend", "-c", "x.toml", "reload"],
            &["tokend", "run", "-c", "x.toml"],
        ] {
            let cli = Cli::try_parse_from(args).unwrap();
            assert_eq!(cli.config.path(), PathBuf::from("x.toml"), "{args:?}");
        }
    }

    #[test]
    fn min_valid_takes_durations_or_whole_seconds() {
        assert_eq!(parse_min_valid("90"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_min_valid("90s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_min_valid("5m"), Ok(Duration::from_secs(300)));
        assert_eq!(parse_min_valid("1h 30m"), Ok(Duration::from_secs(5400)));
        let e = parse_min_valid("soon").unwrap_err();
        assert!(e.contains("5m"), "{e}");
    }
}
