//! The client commands, `token`, `status`, `health` and `refresh`: one request each to the
//! running daemon through `client`, and how the answers are printed. No async runtime.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::Value;

use super::client::{ClientError, DaemonClient};
use super::exit;
use crate::config::DEFAULT_LISTEN;

/// Where a client command finds the daemon: `--endpoint` (else the first listen address
/// of the config at `config`) and the `--key-file` it shows.
#[derive(Debug)]
pub struct Target {
    pub endpoint: Option<String>,
    pub key_file: Option<PathBuf>,
    /// The config whose `server.listen` gives the default endpoint.
    pub config: PathBuf,
}

impl Target {
    /// The client for the endpoint (else the default) and the key file.
    fn client(&self) -> Result<DaemonClient, ClientError> {
        let endpoint = self
            .endpoint
            .clone()
            .unwrap_or_else(|| default_endpoint(&self.config));
        DaemonClient::new(&endpoint, self.key_file.as_deref())
    }
}

/// The default endpoint for client commands: the first `server.listen` of the config at
/// `path`. Only that key is read, so a client user needs no access to the secrets the
/// config names.
fn default_endpoint(path: &Path) -> String {
    let listen = std::fs::read_to_string(path).ok().and_then(|text| {
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

/// The exit code of a client command; failures are reported on stderr.
pub fn finish(result: Result<u8, ClientError>) -> u8 {
    result.unwrap_or_else(|e| {
        eprintln!("tokend: {e}");
        e.exit_code()
    })
}

pub fn token(
    target: &Target,
    account: &str,
    min_valid: Option<u64>,
    json: bool,
) -> Result<u8, ClientError> {
    let client = target.client()?;
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

pub fn refresh(target: &Target, account: &str) -> Result<u8, ClientError> {
    let client = target.client()?;
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

pub fn health(target: &Target) -> Result<u8, ClientError> {
    let client = target.client()?;
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

pub fn status(target: &Target, json: bool) -> Result<u8, ClientError> {
    let client = target.client()?;
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
