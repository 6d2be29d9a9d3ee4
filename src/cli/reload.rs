//! `tokend reload`: SIGHUP to the daemon that holds the config's state directory, then
//! the outcome it reports under `reload` in `GET /v1/accounts`: applied (with what
//! changed) or refused (with the problems; the daemon keeps its running config).

use std::path::Path;
use std::time::{Duration, Instant};

use serde::Deserialize;

use super::exit;
use super::login::is_daemon;
use super::remote::CommandError;
use super::target::Target;
use crate::store::lock_path;

/// How often the daemon is asked whether the reload is done.
const POLL: Duration = Duration::from_millis(100);

/// The `reload` object of `GET /v1/accounts` (docs/openapi.yaml `Reload`).
#[derive(Debug, Deserialize)]
struct Outcome {
    generation: u64,
    successful: bool,
    #[serde(default)]
    added: Vec<String>,
    #[serde(default)]
    removed: Vec<String>,
    #[serde(default)]
    restarted: Vec<String>,
    #[serde(default)]
    restart_needed: Vec<String>,
    #[serde(default)]
    problems: Vec<String>,
}

#[derive(Deserialize)]
struct Accounts {
    reload: Option<Outcome>,
}

/// Signals the daemon and waits (at most `timeout`) for the reload's outcome: 0 applied,
/// 78 refused, 69 no daemon.
pub fn reload(target: &Target, timeout: Duration) -> Result<u8, CommandError> {
    let (dir, origin) = target.state_dir()?;
    let pid = daemon_pid(&dir).map_err(|why| CommandError::NoDaemon { dir, origin, why })?;
    let client = target.client(None)?.with_timeout(timeout);
    let url = client.url(&["v1", "accounts"], &[]);
    let ask = || -> Result<Outcome, CommandError> {
        let body = client.call_ok(http::Method::GET, &url)?;
        serde_json::from_str::<Accounts>(&body)
            .ok()
            .and_then(|a| a.reload)
            .ok_or(CommandError::NoReloadRecord)
    };
    let before = ask()?.generation;
    signal(pid)?;
    let deadline = Instant::now() + timeout;
    loop {
        std::thread::sleep(POLL);
        let outcome = ask()?;
        if outcome.generation > before {
            return Ok(report(&outcome, pid));
        }
        if Instant::now() >= deadline {
            return Err(CommandError::ReloadTimeout {
                pid,
                waited: timeout,
            });
        }
    }
}

/// The pid of the daemon holding the lock of `dir`, or why there is none. A stopped
/// daemon leaves its pid in the lock file: it counts only while that process runs
/// `tokend run` and the lock is held.
fn daemon_pid(dir: &Path) -> Result<i32, String> {
    let path = lock_path(dir);
    let stale = |pid| format!("pid {pid} in {} is not running tokend", path.display());
    let text = std::fs::read_to_string(&path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => format!("{} does not exist", path.display()),
        _ => format!("cannot read {}: {e}", path.display()),
    })?;
    let pid = text
        .trim()
        .parse::<i32>()
        .ok()
        .filter(|p| *p > 0)
        .ok_or_else(|| format!("{} names no pid", path.display()))?;
    let exists = rustix::process::Pid::from_raw(pid)
        .map(rustix::process::test_kill_process)
        .is_some_and(|r| r != Err(rustix::io::Errno::SRCH));
    if !exists || !is_daemon(pid) || lock_is_free(&path) {
        return Err(stale(pid));
    }
    Ok(pid)
}

/// True when /proc/locks shows no lock on `path` (false when it cannot tell). Matched by
/// inode only: the pids there are those of /proc's pid namespace.
fn lock_is_free(path: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    let (Ok(meta), Ok(locks)) = (
        std::fs::metadata(path),
        std::fs::read_to_string("/proc/locks"),
    ) else {
        return false;
    };
    let inode = meta.ino().to_string();
    // `1: FLOCK  ADVISORY  WRITE 1234 08:01:5678 0 EOF`: the inode ends the sixth field.
    !locks.lines().any(|line| {
        line.split_whitespace()
            .nth(5)
            .and_then(|dev_inode| dev_inode.rsplit(':').next())
            == Some(inode.as_str())
    })
}

fn signal(pid: i32) -> Result<(), CommandError> {
    let target = rustix::process::Pid::from_raw(pid).expect("checked positive");
    rustix::process::kill_process(target, rustix::process::Signal::HUP).map_err(|e| {
        CommandError::Signal {
            pid,
            source: e.into(),
        }
    })
}

/// Prints the outcome; its exit code.
fn report(outcome: &Outcome, pid: i32) -> u8 {
    if !outcome.successful {
        eprintln!(
            "tokend: the new config is invalid; the daemon (pid {pid}) keeps running the previous one:"
        );
        if outcome.problems.is_empty() {
            eprintln!("  (this consumer may not see the problems: they are in the daemon's log)");
        }
        for problem in &outcome.problems {
            eprintln!("  {problem}");
        }
        return exit::CONFIG;
    }
    let mut changes = Vec::new();
    for (what, names) in [
        ("added", &outcome.added),
        ("removed", &outcome.removed),
        ("restarted", &outcome.restarted),
    ] {
        if !names.is_empty() {
            changes.push(format!("{what} {}", names.join(", ")));
        }
    }
    if changes.is_empty() {
        changes.push("no account changed".into());
    }
    println!(
        "reloaded (pid {pid}, generation {}): {}",
        outcome.generation,
        changes.join("; ")
    );
    if !outcome.restart_needed.is_empty() {
        println!(
            "these settings changed but take effect only on restart: {}",
            outcome.restart_needed.join(", ")
        );
    }
    exit::OK
}
