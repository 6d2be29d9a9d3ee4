//! What `tokend check` prints: the daemon-wide settings, then each account's whole plan
//! (grant, client authentication, request, endpoint, where its refresh token comes from,
//! sinks, hook, refresh policy). Names and places only, never a secret's value.

use std::fmt::Write as _;
use std::path::Path;
use std::time::Duration;

use crate::config::{
    AccountConfig, AssertionSource, BearerAssertion, ClientAssertion, Config, Grant, HookAction,
    OnShutdown, RequestFormat, SinkFormat, StateBackend, TlsIdentity,
};
use crate::store::state_path;

/// The report for a valid config at `path`: its warnings, then the plan.
pub(super) fn report(path: &Path, config: &Config) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "{}: ok", path.display());
    for warning in &config.warnings {
        let _ = writeln!(out, "warning: {warning}");
    }
    let listen: Vec<String> = config.server.listen.iter().map(|a| a.to_string()).collect();
    let _ = writeln!(out, "listen: {}", listen.join(", "));
    match &config.state.backend {
        StateBackend::File => {
            let _ = writeln!(out, "state dir: {}", config.state.dir.display());
        }
        shared => {
            let _ = writeln!(
                out,
                "state: {} (shared by replicas), node id {}, lease_ttl {}s",
                shared.name(),
                config.state.node_id,
                config.state.lease_ttl.as_secs()
            );
        }
    }
    let encryption = match (
        &config.state.keyring,
        source(config, "state.encryption_key"),
    ) {
        (Some(_), Some(from)) => format!("on, key from {from}"),
        (Some(_), None) => "on".into(),
        (None, _) => "off".into(),
    };
    let _ = writeln!(out, "encryption at rest: {encryption}");
    let _ = writeln!(out, "accounts: {}", config.accounts.len());
    for account in config.accounts.values() {
        out.push('\n');
        account_plan(&mut out, config, account);
    }
    out
}

/// Where the secret at config `key` comes from, if it is set.
fn source(config: &Config, key: &str) -> Option<String> {
    config.secret_sources.get(key).map(ToString::to_string)
}

/// One labelled line of an account's plan.
type Row = (&'static str, String);

fn account_plan(out: &mut String, config: &Config, a: &AccountConfig) {
    let _ = writeln!(out, "account {}", a.name);
    let rows = request_rows(config, a)
        .into_iter()
        .chain(delivery_rows(config, a))
        .chain(policy_rows(a));
    for (label, value) in rows {
        let _ = writeln!(out, "  {:<15} {value}", format!("{label}:"));
    }
}

/// What is sent to the provider, and where.
fn request_rows(config: &Config, a: &AccountConfig) -> Vec<Row> {
    let mut rows = vec![("grant", a.grant.as_str().to_string())];
    // Discovery needs the network, which `check` does not use: name the issuer.
    let token_url = match (&a.token_url, &a.endpoints.issuer) {
        (Some(url), _) => url.to_string(),
        (None, Some(issuer)) => format!("discovered from {issuer} at the first refresh"),
        (None, None) => "-".into(),
    };
    rows.push(("token URL", token_url));
    if let Some(ca) = &a.ca_bundle {
        rows.push((
            "trusts",
            format!("the system's CAs and {}", ca.path.display()),
        ));
    }
    if let Grant::JwtBearer(b) = &a.grant {
        rows.push(("assertion", bearer_row(config, a, b)));
    }
    match a.client_id.as_str() {
        "" => rows.push(("client", "none (the assertion is the grant)".into())),
        id => rows.push(("client", format!("{id} ({})", client_auth(config, a)))),
    }
    let format = match a.request_format {
        RequestFormat::Form => "form (application/x-www-form-urlencoded)",
        RequestFormat::Json => "json (application/json)",
    };
    rows.push(("request format", format.into()));
    rows.push(("scope", a.scope.clone().unwrap_or_else(|| "none".into())));
    // Names only: a value may be a credential.
    if !a.extra_params.is_empty() {
        let names: Vec<&str> = a.extra_params.keys().map(String::as_str).collect();
        rows.push((
            "extra params",
            format!("{} (values not shown)", names.join(", ")),
        ));
    }
    if !a.headers.is_empty() {
        let names: Vec<&str> = a.headers.iter().map(|(n, _)| n.as_str()).collect();
        rows.push((
            "headers",
            format!("{} (values not shown)", names.join(", ")),
        ));
    }
    rows
}

/// What the `jwt_bearer` assertion says and where its key comes from.
fn bearer_row(config: &Config, a: &AccountConfig, b: &BearerAssertion) -> String {
    let from = ["credentials_file", "private_key"]
        .iter()
        .find_map(|k| source(config, &format!("accounts.{}.{k}", a.name)))
        .unwrap_or_default();
    let mut row = format!(
        "{} {} key from {from}, iss {}",
        b.key.alg().name(),
        b.key.describe(),
        b.issuer
    );
    for (label, value) in [
        ("kid", &b.key_id),
        ("sub", &b.subject),
        ("aud", &b.audience),
    ] {
        if let Some(v) = value {
            row.push_str(&format!(", {label} {v}"));
        }
    }
    if b.scope_in_claim {
        row.push_str(", scope in the assertion");
    }
    row
}

/// How the client authenticates and where its secret or key comes from (never the
/// value).
fn client_auth(config: &Config, a: &AccountConfig) -> String {
    let method = client_method(config, a);
    match (&a.tls_identity, a.client_auth.is_mutual_tls()) {
        (Some(id), true) => format!("{}, {}", a.client_auth.as_str(), certificate(config, a, id)),
        (Some(id), false) => format!("{method}; and {}", certificate(config, a, id)),
        (None, _) => method,
    }
}

/// The TLS client certificate (RFC 8705) by its subject, expiry and fingerprint, and where
/// its key comes from; never the key.
fn certificate(config: &Config, a: &AccountConfig, id: &TlsIdentity) -> String {
    let from = source(config, &format!("accounts.{}.client_key", a.name)).unwrap_or_default();
    let expiry = if id.not_after <= std::time::SystemTime::now() {
        "EXPIRED"
    } else {
        "expires"
    };
    format!(
        "certificate {} from {}, {expiry} {}, SHA-256 {}, key from {from}",
        id.subject,
        id.certificate_path.display(),
        crate::clock::rfc3339(id.not_after),
        id.fingerprint
    )
}

/// How the client authenticates at the application layer (secret or assertion).
fn client_method(config: &Config, a: &AccountConfig) -> String {
    let auth = a.client_auth.as_str();
    let secret = source(config, &format!("accounts.{}.client_secret", a.name));
    let kid = |key_id: &Option<String>| {
        key_id
            .as_ref()
            .map(|k| format!(", kid {k}"))
            .unwrap_or_default()
    };
    let aud = |assertion: &ClientAssertion| match &assertion.audience {
        Some(aud) => format!(", aud {aud}"),
        None => ", aud the token URL".into(),
    };
    match (&a.assertion, secret) {
        (Some(assertion), secret) => match &assertion.source {
            AssertionSource::PrivateKey { key, key_id } => {
                let from =
                    source(config, &format!("accounts.{}.private_key", a.name)).unwrap_or_default();
                format!(
                    "{auth}, {} {} key from {from}{}{}",
                    key.alg().name(),
                    key.describe(),
                    kid(key_id),
                    aud(assertion)
                )
            }
            AssertionSource::ClientSecret { key_id } => format!(
                "{auth}, HS256 over the secret from {}{}{}",
                secret.unwrap_or_default(),
                kid(key_id),
                aud(assertion)
            ),
            AssertionSource::File(path) => format!(
                "{auth}, ready-made assertion read from {} at every request",
                path.display()
            ),
        },
        (None, Some(from)) => format!("{auth}, secret from {from}"),
        (None, None) => "no secret (public client)".into(),
    }
}

/// Where the refresh token comes from and where the tokens go.
fn delivery_rows(config: &Config, a: &AccountConfig) -> Vec<Row> {
    let mut rows = Vec::new();
    let state = state_path(&config.state.dir, &a.name);
    if let Grant::RefreshToken { seed } = &a.grant {
        let origin = refresh_token_origin(config, a, seed.is_some(), &state);
        rows.push(("refresh token", origin));
    }
    if config.state.backend == StateBackend::File {
        rows.push(("state file", state.display().to_string()));
    }
    if a.sinks.is_empty() {
        rows.push(("sinks", "none".into()));
    }
    for sink in &a.sinks {
        let on_shutdown = match sink.on_shutdown {
            OnShutdown::Remove => "removed on shutdown",
            OnShutdown::Keep => "kept on shutdown",
        };
        let format = match sink.format {
            SinkFormat::Raw => "raw",
            SinkFormat::Json => "json",
        };
        let path = sink.path.display();
        let mode = sink.mode;
        rows.push((
            "sink",
            format!("{path} ({format}, mode {mode:04o}, {on_shutdown})"),
        ));
    }
    let hook = match &a.on_refresh {
        None => "none".into(),
        Some(hook) => {
            let action = match &hook.action {
                HookAction::Exec(argv) => format!("runs {argv:?}"),
                HookAction::Signal { signal, pid_file } => {
                    format!("sends SIG{signal} to the pid in {}", pid_file.display())
                }
            };
            format!(
                "{action} after each refresh, within {}",
                human(hook.timeout)
            )
        }
    };
    rows.push(("hook", hook));
    if let Some(proxy) = &a.proxy {
        rows.push((
            "proxy",
            format!(
                "/proxy/{}/… → {} (timeout {})",
                a.name,
                proxy.upstream,
                human(proxy.timeout)
            ),
        ));
    }
    rows
}

/// The effective refresh policy (the account's own over `[refresh]` over the defaults).
fn policy_rows(a: &AccountConfig) -> Vec<Row> {
    let p = &a.refresh;
    let mut refresh = format!(
        "at {:.0}% of the lifetime (jitter {:.0}%), at least {} before expiry, at least {} apart",
        p.ratio * 100.0,
        p.jitter * 100.0,
        human(p.margin),
        human(p.min_interval),
    );
    if let Some(max) = p.max_interval {
        let _ = write!(refresh, ", at most {} apart", human(max));
    }
    let _ = write!(
        refresh,
        "; a lifetime of {} when the provider names none",
        human(p.default_lifetime)
    );
    let retries = format!(
        "from {} doubling to {}; permanent errors every {}; {} per request",
        human(p.backoff_initial),
        human(p.backoff_max),
        human(p.slow_retry),
        human(a.limits.timeout),
    );
    vec![("refresh", refresh), ("retries", retries)]
}

/// Where the next refresh token comes from: the state file an earlier run left, the
/// configured seed, or nowhere yet (a human must log in).
fn refresh_token_origin(config: &Config, a: &AccountConfig, seeded: bool, state: &Path) -> String {
    let seed = source(config, &format!("accounts.{}.refresh_token", a.name))
        .filter(|_| seeded)
        .map(|from| format!("seed from {from}"));
    match (std::fs::metadata(state), seed) {
        (Ok(_), Some(seed)) => {
            format!(
                "the state file (stored by an earlier run; {seed}, used only if it is replaced by a token this state directory has never spent)"
            )
        }
        (Ok(_), None) => "the state file (stored by an earlier run)".into(),
        (Err(e), seed) if e.kind() != std::io::ErrorKind::NotFound => {
            let seed = seed.map(|s| format!("; {s}")).unwrap_or_default();
            format!("cannot tell: the state file cannot be read here ({e}){seed}")
        }
        (Err(_), Some(seed)) => format!("{seed} (no state file yet)"),
        (Err(_), None) => format!(
            "none: needs `tokend login {0}` (or `tokend import {0}`)",
            a.name
        ),
    }
}

fn human(d: Duration) -> String {
    humantime::format_duration(d).to_string()
}
