//! The client commands, `token`, `status`, `health` and `refresh`: one request each to the
//! running daemon through `client`, how the answers are printed, and the errors every
//! client command (`reload` too) ends with. No async runtime.

use std::path::PathBuf;
use std::time::Duration;

use serde_json::Value;

use super::client::ClientError;
use super::exit;
use super::target::Target;

/// Why a client command failed; each maps to its exit code.
#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    #[error(transparent)]
    Client(#[from] ClientError),
    /// The config named by `--config` or `$TOKEND_CONFIG` cannot be read.
    #[error("the config {} (from {named}) {problem}", path.display())]
    Config {
        path: PathBuf,
        named: &'static str,
        problem: String,
    },
    #[error("the daemon has no account named {account:?} (it has: {known})")]
    NoSuchAccount { account: String, known: String },
    /// `reload`: nothing holds the state directory's lock.
    #[error("no tokend runs on the state directory {} ({origin}): {why}", dir.display())]
    NoDaemon {
        dir: PathBuf,
        origin: String,
        why: String,
    },
    #[error("cannot send SIGHUP to the daemon (pid {pid}): {source}")]
    Signal { pid: i32, source: std::io::Error },
    #[error("the daemon (pid {pid}) did not report the reload within {}; it may still be applying it: see its log", humantime::format_duration(*waited))]
    ReloadTimeout { pid: i32, waited: Duration },
    #[error(
        "the daemon does not report reloads (no `reload` in GET /v1/accounts): is it an older tokend?"
    )]
    NoReloadRecord,
}

impl CommandError {
    pub fn exit_code(&self) -> u8 {
        match self {
            CommandError::Client(e) => e.exit_code(),
            CommandError::Config { .. } => exit::CONFIG,
            CommandError::NoSuchAccount { .. } | CommandError::NoReloadRecord => exit::FAILURE,
            CommandError::NoDaemon { .. } => exit::UNAVAILABLE,
            CommandError::Signal { source, .. }
                if source.kind() == std::io::ErrorKind::PermissionDenied =>
            {
                exit::NOPERM
            }
            CommandError::Signal { .. } => exit::FAILURE,
            CommandError::ReloadTimeout { .. } => exit::TEMPFAIL,
        }
    }
}

/// The exit code of a client command; failures are reported on stderr.
pub fn finish(result: Result<u8, CommandError>) -> u8 {
    result.unwrap_or_else(|e| {
        eprintln!("tokend: {e}");
        if let CommandError::Client(ClientError::Refused {
            status: 401 | 403, ..
        }) = e
        {
            eprintln!(
                "tokend: pass --key-file, or --config with a consumer whose key this user can read"
            );
        }
        e.exit_code()
    })
}

pub fn token(
    target: &Target,
    account: &str,
    min_valid: Option<Duration>,
    json: bool,
) -> Result<u8, CommandError> {
    let client = target.client(Some(account))?;
    let mut segments = vec!["v1", "token", account];
    if !json {
        segments.push("access_token");
    }
    // The API takes whole seconds: a fraction rounds up, so the token lasts at least as
    // long as asked.
    let secs = min_valid.map(|d| d.as_secs_f64().ceil().to_string());
    let query: Vec<(&str, &str)> = secs.iter().map(|s| ("min_valid", s.as_str())).collect();
    let url = client.url(&segments, &query);
    let body = client.call_ok(http::Method::GET, &url)?;
    println!("{}", body.trim_end());
    Ok(exit::OK)
}

pub fn refresh(target: &Target, account: &str) -> Result<u8, CommandError> {
    let client = target.client(Some(account))?;
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

/// 0 when ready; 75 (not now) with the accounts not ready. `live`: 0 when the daemon
/// answers `/healthz` at all.
pub fn health(target: &Target, live: bool) -> Result<u8, CommandError> {
    let client = target.client(None)?;
    if live {
        client.call_ok(http::Method::GET, &client.url(&["healthz"], &[]))?;
        println!("alive");
        return Ok(exit::OK);
    }
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
    Ok(exit::TEMPFAIL)
}

/// Every account (or only `only`) as a table, or as the daemon's JSON.
pub fn status(target: &Target, only: Option<&str>, json: bool) -> Result<u8, CommandError> {
    let client = target.client(only)?;
    let url = client.url(&["v1", "accounts"], &[]);
    let body = client.call_ok(http::Method::GET, &url)?;
    if json && only.is_none() {
        println!("{}", body.trim_end());
        return Ok(exit::OK);
    }
    let mut v: Value = serde_json::from_str(&body).unwrap_or_default();
    let mut accounts = match v["accounts"].take() {
        Value::Array(a) => a,
        _ => Vec::new(),
    };
    if let Some(name) = only {
        let known: Vec<&str> = accounts
            .iter()
            .filter_map(|a| a["account"].as_str())
            .collect();
        if !known.contains(&name) {
            return Err(CommandError::NoSuchAccount {
                account: name.to_string(),
                known: if known.is_empty() {
                    "none".into()
                } else {
                    known.join(", ")
                },
            });
        }
        accounts.retain(|a| a["account"] == name);
    }
    if json {
        v["accounts"] = Value::Array(accounts);
        println!("{v}");
        return Ok(exit::OK);
    }
    // Replicas on a shared store: say which one refreshes each account.
    let node = v["node_id"].clone();
    if accounts.iter().any(|a| a["lease_holder"] != node) {
        let rows: Vec<[String; 6]> = accounts
            .iter()
            .map(|a| {
                let [name, state, expires, last, error] = status_row(a);
                let holder = a["lease_holder"].as_str().unwrap_or("-").to_string();
                [name, state, expires, last, holder, error]
            })
            .collect();
        println!("replica {}", node.as_str().unwrap_or("-"));
        print!(
            "{}",
            table(
                [
                    "ACCOUNT",
                    "STATE",
                    "EXPIRES IN",
                    "LAST REFRESH",
                    "REFRESHED BY",
                    "LAST ERROR"
                ],
                &rows
            )
        );
        return Ok(exit::OK);
    }
    let rows: Vec<[String; 5]> = accounts.iter().map(status_row).collect();
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
