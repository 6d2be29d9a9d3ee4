//! The command line: subcommands, the client for a running daemon (`tokend token`), and
//! the exit codes every command keeps to.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::{Parser, Subcommand};

use crate::app::{self, RunError};
use crate::config::{self, Config, DEFAULT_CONFIG_PATH, DEFAULT_LISTEN};
use crate::http::REQUEST_HEADER;
use crate::store::state_path;

/// Exit codes (sysexits.h where one fits).
pub mod exit {
    /// Success.
    pub const OK: u8 = 0;
    /// A runtime failure: the daemon could not start or a request was refused.
    pub const FAILURE: u8 = 1;
    /// Bad command-line usage (clap's own).
    pub const USAGE: u8 = 2;
    /// The daemon could not be reached (EX_UNAVAILABLE).
    pub const UNAVAILABLE: u8 = 69;
    /// The configuration is invalid (EX_CONFIG). systemd units use
    /// `RestartPreventExitStatus=78` so a broken config does not restart-loop.
    pub const CONFIG: u8 = 78;
}

#[derive(Debug, Parser)]
#[command(
    name = "tokend",
    version,
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
        /// The daemon's base URL [default: the first listen address of the config, else
        /// http://127.0.0.1:8731].
        #[arg(long, env = "TOKEND_ENDPOINT")]
        endpoint: Option<String>,
        /// Ask for a token valid at least this many seconds (refreshing if need be).
        #[arg(long, value_name = "SECS")]
        min_valid: Option<u64>,
        /// Print the whole JSON answer (token, expiry, headers) instead of the bare token.
        #[arg(long)]
        json: bool,
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

fn config_path(explicit: Option<&Path>) -> PathBuf {
    explicit
        .map(Path::to_path_buf)
        .or_else(|| std::env::var_os("TOKEND_CONFIG").map(PathBuf::from))
        .unwrap_or_else(|| PathBuf::from(DEFAULT_CONFIG_PATH))
}

/// Logs go to stderr: human-readable, coloured only on a terminal, without the timestamp
/// when the journal (which adds its own) is the reader. `RUST_LOG` filters (default info).
pub fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    if std::env::var_os("JOURNAL_STREAM").is_some() {
        builder.without_time().init();
    } else {
        builder.init();
    }
}

/// Runs one command and returns its exit code.
pub fn dispatch(cli: Cli) -> u8 {
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
    match cli.command {
        Command::Run { config } => daemon_exit(runtime.block_on(app::run(config.path()))),
        Command::Demo => daemon_exit(runtime.block_on(crate::demo::run())),
        Command::Check { config } => check(&config.path()),
        Command::Token {
            account,
            endpoint,
            min_valid,
            json,
        } => runtime.block_on(token(&account, endpoint, min_valid, json)),
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
    println!("{}: ok", path.display());
    let listen: Vec<String> = config.server.listen.iter().map(|a| a.to_string()).collect();
    println!("listen: {}", listen.join(", "));
    println!("state dir: {}", config.state.dir.display());
    println!("accounts: {}", config.accounts.len());
    for account in config.accounts.values() {
        println!(
            "  {}: grant={} endpoint={} state={}",
            account.name,
            account.grant.as_str(),
            account.token_url,
            state_path(&config.state.dir, &account.name).display()
        );
    }
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
    format!("http://{}", listen.as_deref().unwrap_or(DEFAULT_LISTEN))
}

async fn token(account: &str, endpoint: Option<String>, min_valid: Option<u64>, json: bool) -> u8 {
    let endpoint = endpoint.unwrap_or_else(default_endpoint);
    let base = endpoint.trim_end_matches('/');
    let path = if json { "" } else { "/access_token" };
    let mut url = format!("{base}/v1/token/{account}{path}");
    if let Some(secs) = min_valid {
        url.push_str(&format!("?min_valid={secs}"));
    }
    let client = match reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(60))
        .build()
    {
        Ok(c) => c,
        Err(e) => {
            eprintln!("tokend: cannot build the HTTP client: {e}");
            return exit::FAILURE;
        }
    };
    let response = match client.get(&url).header(REQUEST_HEADER, "cli").send().await {
        Ok(r) => r,
        Err(e) => {
            eprintln!("tokend: cannot reach the daemon at {base}: {e}");
            return exit::UNAVAILABLE;
        }
    };
    let status = response.status();
    let body = match response.text().await {
        Ok(b) => b,
        Err(e) => {
            eprintln!("tokend: the daemon's answer was cut off: {e}");
            return exit::UNAVAILABLE;
        }
    };
    if !status.is_success() {
        let detail = serde_json::from_str::<serde_json::Value>(&body)
            .ok()
            .and_then(|v| {
                v.get("error_description")
                    .and_then(|d| d.as_str())
                    .map(str::to_string)
            })
            .unwrap_or(body);
        eprintln!("tokend: {status}: {detail}");
        return exit::FAILURE;
    }
    println!("{}", body.trim_end());
    exit::OK
}

/// Parses config text for tests and tools that hold it in memory.
pub fn parse_config(text: &str, name: &str) -> Result<Config, config::ConfigError> {
    Config::from_str_at(text, Path::new(name), &config::SystemEnvironment)
}
