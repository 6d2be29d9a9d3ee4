//! Config text: the account-table builders every config here is made of, the account
//! blocks of the in-process fake provider's clients (Zywave-style, client_credentials,
//! Zephr-style), the harness config around them, and parsing. (The real binary's
//! accounts and config file are `process`'s.)

use std::path::Path;

use tempfile::TempDir;
use tokend::config::{Config, SystemEnvironment};

/// The token endpoint of the in-process fake provider.
pub const TOKEN_URL: &str = "http://127.0.0.1/token";

/// An `[accounts.NAME]` table with the keys every account has, then `rest` (more keys,
/// one per line).
pub fn account(
    name: &str,
    grant: &str,
    token_url: &str,
    client_id: &str,
    secret: &str,
    rest: &str,
) -> String {
    format!(
        "\n[accounts.{name}]\ngrant = \"{grant}\"\ntoken_url = \"{token_url}\"\nclient_id = \"{client_id}\"\nclient_secret = \"{secret}\"\n{rest}"
    )
}

/// A refresh_token account with only the keys it needs, then `extra` (more keys of the
/// same table, one per line).
pub fn refresh_token_account(
    name: &str,
    token_url: &str,
    client_id: &str,
    secret: &str,
    seed: &str,
    extra: &str,
) -> String {
    let rest = format!("refresh_token = \"{seed}\"\n{extra}");
    account(name, "refresh_token", token_url, client_id, secret, &rest)
}

/// A Zywave-style account of the fake provider's `zy-client`, seeded with `seed`.
pub fn zywave_account(name: &str, seed: &str) -> String {
    let extra = "scope = \"offline_access accounts:read\"\nheaders = { Profile = \"B 1234\" }\n";
    refresh_token_account(name, TOKEN_URL, "zy-client", "zy-secret", seed, extra)
}

/// A client_credentials account of the fake provider's `cc-client`.
pub fn client_credentials_account(name: &str) -> String {
    let rest = "scope = \"example.com\"\n";
    account(
        name,
        "client_credentials",
        TOKEN_URL,
        "cc-client",
        "cc-secret",
        rest,
    )
}

/// A Zephr-style account (JSON body, HTTP Basic) of the fake provider's `zephr-client`.
pub fn zephr_account(name: &str, seed: &str) -> String {
    let extra = "client_auth = \"client_secret_basic\"\nrequest_format = \"json\"\n";
    refresh_token_account(name, TOKEN_URL, "zephr-client", "zephr-secret", seed, extra)
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
