//! The commands that start the daemon or vet what it would run: `run` (and `run --once`),
//! `demo`, `check`; the logging set-up they share, and how a daemon's end maps to an exit
//! code. The daemon itself is `app`'s.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};

use super::exit;
use crate::app::{self, RunError};
use crate::config::{Config, LogFormat};
use crate::store::state_path;

/// `tokend run`: load the config, set up logging, run the daemon until it is told to stop
/// (with `once`: obtain every token and return, 0 when every account got one).
pub async fn run(path: PathBuf, once: bool) -> u8 {
    let config = match Config::load(&path) {
        Ok(c) => c,
        Err(e) => return daemon_exit(Err(RunError::Config(e))),
    };
    init_tracing(config.log.format);
    crate::harden::process();
    if once {
        return match app::run_once(config).await {
            Ok(true) => exit::OK,
            Ok(false) => exit::FAILURE,
            Err(e) => daemon_exit(Err(e)),
        };
    }
    daemon_exit(app::run(config, path).await)
}

/// `tokend demo`: the daemon against the embedded provider, logging as text.
#[cfg(feature = "demo")]
pub async fn demo() -> u8 {
    init_tracing(LogFormat::Text);
    crate::harden::process();
    daemon_exit(crate::demo::run().await)
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

pub fn check(path: &Path) -> u8 {
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
