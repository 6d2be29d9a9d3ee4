//! The command line: the subcommands and their arguments, and `dispatch`, which hands
//! each to the module that runs it (`daemon`, `remote`, `login_cmd`). No command's logic
//! is here; none of the child modules imports this one.

use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::{CommandFactory, Parser, Subcommand};

use crate::config::DEFAULT_CONFIG_PATH;
use login_cmd::LoginMode;

pub mod client;
mod daemon;
pub mod exit;
mod http1;
pub mod login;
mod login_cmd;
mod remote;
mod state_cmd;

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
    #[cfg(feature = "demo")]
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
        #[command(flatten)]
        config: ConfigArg,
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

impl ClientArgs {
    /// Client commands take no `--config`: the default endpoint comes from the config at
    /// the default path.
    fn target(self) -> remote::Target {
        remote::Target {
            endpoint: self.endpoint,
            key_file: self.key_file,
            config: config_path(None),
        }
    }
}

fn config_path(explicit: Option<&Path>) -> PathBuf {
    explicit
        .map(Path::to_path_buf)
        .or_else(|| std::env::var_os("TOKEND_CONFIG").map(PathBuf::from))
        .unwrap_or_else(|| PathBuf::from(DEFAULT_CONFIG_PATH))
}

/// Runs one command and returns its exit code.
pub fn dispatch(cli: Cli) -> u8 {
    match cli.command {
        Command::Completions { shell } => {
            clap_complete::generate(shell, &mut Cli::command(), "tokend", &mut std::io::stdout());
            exit::OK
        }
        Command::Check { config } => daemon::check(&config.path()),
        Command::Token {
            account,
            client,
            min_valid,
            json,
        } => remote::finish(remote::token(&client.target(), &account, min_valid, json)),
        Command::Status { client, json } => remote::finish(remote::status(&client.target(), json)),
        Command::Health { client } => remote::finish(remote::health(&client.target())),
        Command::Refresh { account, client } => {
            remote::finish(remote::refresh(&client.target(), &account))
        }
        Command::Run { config, once } => block_on(daemon::run(config.path(), once)),
        #[cfg(feature = "demo")]
        Command::Demo => block_on(daemon::demo()),
        Command::Login {
            account,
            config,
            no_browser,
            manual,
            device,
            timeout,
        } => {
            let mode = LoginMode::from_flags(device, manual, no_browser);
            block_on(login_cmd::login(&config.path(), &account, mode, timeout))
        }
        Command::Import { account, config } => {
            block_on(login_cmd::import(&config.path(), &account))
        }
        Command::Logout {
            account,
            config,
            no_revoke,
        } => block_on(login_cmd::logout(&config.path(), &account, !no_revoke)),
        Command::State {
            command: StateCommand::Rename { old, new, config },
        } => block_on(state_cmd::rename(&config.path(), &old, &new)),
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
}
