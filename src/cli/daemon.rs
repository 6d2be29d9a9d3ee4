//! The commands that start the daemon or vet what it would run: `run` (and `run --once`),
//! `demo`, `check`; how a daemon's end maps to an exit code. The daemon itself is `app`'s,
//! the logging set-up `logging`'s.

use std::path::{Path, PathBuf};

use super::{exit, logging};
use crate::app::{self, RunError};
use crate::config::{Config, LogFormat};

/// `tokend run`: load the config, set up logging, run the daemon until it is told to stop
/// (with `once`: obtain every token and return, 0 when every account got one).
pub async fn run(path: PathBuf, once: bool) -> u8 {
    let hardening = crate::harden::process();
    let config = match Config::load(&path) {
        Ok(c) => c,
        Err(e) => return daemon_exit(Err(RunError::Config(e))),
    };
    if let Err(code) = init_tracing(config.log.format) {
        return code;
    }
    for warning in hardening {
        tracing::warn!("{warning}");
    }
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
    let hardening = crate::harden::process();
    if let Err(code) = init_tracing(LogFormat::Text) {
        return code;
    }
    for warning in hardening {
        tracing::warn!("{warning}");
    }
    daemon_exit(crate::demo::run().await)
}

/// Sets up logging (see [`logging::init`]); a bad `TOKEND_LOG_FORMAT` is a config error.
fn init_tracing(format: LogFormat) -> Result<(), u8> {
    logging::init(format).map_err(|e| {
        eprintln!("tokend: invalid configuration: {e}");
        exit::CONFIG
    })
}

fn daemon_exit(result: Result<(), RunError>) -> u8 {
    match result {
        Ok(()) => exit::OK,
        Err(RunError::Config(e)) => {
            eprintln!("tokend: invalid configuration:\n{e}");
            exit::CONFIG
        }
        Err(e @ RunError::ForcedStop(_)) => {
            eprintln!("tokend: {e}");
            exit::FORCED_STOP
        }
        Err(e) => {
            eprintln!("tokend: {e}");
            exit::FAILURE
        }
    }
}

/// `tokend check`: 0 and the plan (`check::report`) for a valid config, 78 and every
/// problem for an invalid one.
pub fn check(path: &Path) -> u8 {
    let config = match Config::load(path) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{e}");
            return exit::CONFIG;
        }
    };
    let mut out = super::check::report(path, &config);
    let mut code = exit::OK;
    if config.state.backend != crate::config::StateBackend::File {
        // The one thing `check` reaches over the network: a shared store must answer, with
        // a schema this tokend knows, before replicas are started on it.
        let answer = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| e.to_string())
            .and_then(|rt| {
                rt.block_on(async {
                    let opened = super::shared::open(&config)
                        .await
                        .map_err(|e| e.to_string())?;
                    let Some(opened) = opened else {
                        return Ok(String::new());
                    };
                    let said = opened.store.check().await.map_err(|e| e.to_string());
                    opened.close().await;
                    said
                })
            });
        match answer {
            Ok(said) => out.push_str(&format!("state store: reachable: {said}\n")),
            Err(e) => {
                out.push_str(&format!("state store: UNREACHABLE: {e}\n"));
                code = exit::UNAVAILABLE;
            }
        }
    }
    // `tokend check | head -1` closes the pipe early: that is not a failure to report.
    let _ = std::io::Write::write_all(&mut std::io::stdout(), out.as_bytes());
    code
}
