//! Config text for the in-process daemon: the account blocks of the fake provider's
//! clients (Zywave-style, client_credentials, Zephr-style), the harness config around
//! them, and parsing.

use std::path::Path;

use tempfile::TempDir;
use tokend::config::{Config, SystemEnvironment};

pub const TOKEN_URL: &str = "http://127.0.0.1/token";

/// An account block for the config, with the fake provider's client ids.
pub fn zywave_account(name: &str, seed: &str) -> String {
    format!(
        r#"
[accounts.{name}]
grant = "refresh_token"
token_url = "{TOKEN_URL}"
client_id = "zy-client"
client_secret = "zy-secret"
scope = "offline_access accounts:read"
refresh_token = "{seed}"
headers = {{ Profile = "B 1234" }}
"#
    )
}

pub fn client_credentials_account(name: &str) -> String {
    format!(
        r#"
[accounts.{name}]
grant = "client_credentials"
token_url = "{TOKEN_URL}"
client_id = "cc-client"
client_secret = "cc-secret"
scope = "example.com"
"#
    )
}

pub fn zephr_account(name: &str, seed: &str) -> String {
    format!(
        r#"
[accounts.{name}]
grant = "refresh_token"
token_url = "{TOKEN_URL}"
client_id = "zephr-client"
client_secret = "zephr-secret"
client_auth = "client_secret_basic"
request_format = "json"
refresh_token = "{seed}"
"#
    )
}

/// The harness config: state in `dir`, `min_interval` 5 s, then `accounts`.
pub fn config(dir: &TempDir, accounts: &str) -> Config {
    parse_config(&format!(
        "[state]\ndir = \"{}\"\n\n[refresh]\nmin_interval = \"5s\"\n{accounts}",
        dir.path().display()
    ))
}

/// A whole config from its text (panics on an error).
pub fn parse_config(text: &str) -> Config {
    Config::from_str_at(text, Path::new("test.toml"), &SystemEnvironment).unwrap()
}
