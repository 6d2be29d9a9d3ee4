//! Ways out besides the API: token files (sinks) rewritten atomically with their own
//! mode on every refresh, and the rotation hook run after them (a command, or a signal to
//! a process named by a pid file), bounded in time and never on the refresher's path.

use std::path::Path;
use std::process::Stdio;
use std::time::SystemTime;

use tracing::{debug, info, warn};

use crate::config::{AccountConfig, HookAction, HookConfig, OnShutdown, SinkFormat};
use crate::store::write_atomically;
use crate::token_cell::Served;

/// Writes every sink of `account`; failures are logged and returned as one message.
pub async fn write(
    account: &AccountConfig,
    served: &Served,
    now: SystemTime,
) -> Result<(), String> {
    if account.sinks.is_empty() {
        return Ok(());
    }
    let mut jobs = Vec::with_capacity(account.sinks.len());
    for sink in &account.sinks {
        let bytes = match sink.format {
            SinkFormat::Raw => served.access_token.expose().as_bytes().to_vec(),
            SinkFormat::Json => served.json_body(now).to_vec(),
        };
        jobs.push((sink.path.clone(), sink.mode, bytes));
    }
    let name = account.name.clone();
    let failures = tokio::task::spawn_blocking(move || {
        let mut failures = Vec::new();
        for (path, mode, bytes) in jobs {
            let dir = path.parent().unwrap_or(Path::new("/")).to_path_buf();
            match write_atomically(&dir, &path, bytes, mode) {
                Ok(()) => debug!(account = %name, sink = %path.display(), "sink written"),
                Err(e) => {
                    warn!(account = %name, sink = %path.display(), error = %e, "cannot write the token file");
                    failures.push(format!("sink {}: {e}", path.display()));
                }
            }
        }
        failures
    })
    .await
    .unwrap_or_else(|e| vec![format!("sink writer failed: {e}")]);
    if failures.is_empty() {
        Ok(())
    } else {
        Err(failures.join("; "))
    }
}

/// Removes the sinks whose `on_shutdown` is `remove` (tokend is stopping, not reloading).
pub fn remove(account: &AccountConfig) {
    for sink in account
        .sinks
        .iter()
        .filter(|s| s.on_shutdown == OnShutdown::Remove)
    {
        match std::fs::remove_file(&sink.path) {
            Ok(()) => debug!(account = %account.name, sink = %sink.path.display(), "sink removed"),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                warn!(account = %account.name, sink = %sink.path.display(), error = %e, "cannot remove the token file")
            }
        }
    }
}

/// Runs the hook once, within its timeout (a command still running then is killed).
pub async fn run_hook(account: &AccountConfig, hook: &HookConfig) -> Result<(), String> {
    let outcome = tokio::time::timeout(hook.timeout, run_action(account, &hook.action)).await;
    let result = match outcome {
        Ok(r) => r,
        Err(_) => Err(format!(
            "did not finish within {}",
            humantime::format_duration(hook.timeout)
        )),
    };
    match &result {
        Ok(()) => info!(account = %account.name, "rotation hook ran"),
        Err(e) => warn!(account = %account.name, error = %e, "rotation hook failed"),
    }
    result
}

async fn run_action(account: &AccountConfig, action: &HookAction) -> Result<(), String> {
    match action {
        HookAction::Exec(argv) => {
            // No token in the environment or arguments: the program reads a sink or the API.
            let status = tokio::process::Command::new(&argv[0])
                .args(&argv[1..])
                .env("TOKEND_ACCOUNT", account.name.as_str())
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .kill_on_drop(true)
                .status()
                .await
                .map_err(|e| format!("cannot run {}: {e}", argv[0]))?;
            if status.success() {
                Ok(())
            } else {
                Err(format!("{} exited with {status}", argv[0]))
            }
        }
        HookAction::Signal { signal, pid_file } => {
            let text = tokio::fs::read_to_string(pid_file)
                .await
                .map_err(|e| format!("cannot read {}: {e}", pid_file.display()))?;
            let pid: i32 = text
                .trim()
                .parse()
                .map_err(|_| format!("{} does not hold a pid", pid_file.display()))?;
            let pid = rustix::process::Pid::from_raw(pid)
                .ok_or_else(|| format!("{} holds an invalid pid", pid_file.display()))?;
            let sig = match signal.as_str() {
                "HUP" => rustix::process::Signal::HUP,
                "USR1" => rustix::process::Signal::USR1,
                "USR2" => rustix::process::Signal::USR2,
                "TERM" => rustix::process::Signal::TERM,
                _ => rustix::process::Signal::INT,
            };
            rustix::process::kill_process(pid, sig)
                .map_err(|e| format!("cannot signal pid {}: {e}", pid.as_raw_nonzero()))
        }
    }
}
