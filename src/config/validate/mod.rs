//! Validation: raw TOML types → [`Config`], collecting every problem with its place
//! instead of stopping at the first. The config-wide parts (server, state and keyring,
//! consumers, refresh policy, limits, secrets) are here; each account's are in `account`.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use sha2::{Digest, Sha256};
use toml::Spanned;

use crate::config::locate::{Locator, Problem};
use crate::config::raw::{
    RawConfig, RawConsumer, RawDuration, RawProvider, RawRefresh, RawSecret, RawServer, RawState,
};
use crate::config::{
    AccountConfig, AccountName, Config, ConsumerConfig, DEFAULT_LISTEN, Environment, HostLimits,
    ListenAddr, LogConfig, ProviderLimits, RefreshPolicy, SecretSource, ServerConfig,
};
use crate::seal::{Keyring, SealKey};
use crate::secret::Secret;

mod account;
mod bearer;
mod credentials;
mod secret_files;
mod state;
mod tls_identity;

/// What validation made of a parsed config.
pub(super) struct Validated {
    /// Built as far as the problems allowed: to be used only when `problems` is empty.
    pub(super) config: Config,
    pub(super) problems: Vec<Problem>,
    /// A secret is written in the config itself.
    pub(super) literal_secrets: bool,
}

/// Checks `raw` whole. `base_dir` (the config file's directory) anchors relative paths.
pub(super) fn validate(
    raw: RawConfig,
    loc: &Locator<'_>,
    env: &dyn Environment,
    base_dir: PathBuf,
) -> Validated {
    let mut v = Validator {
        loc,
        env,
        base_dir,
        problems: Vec::new(),
        warnings: Vec::new(),
        secret_sources: BTreeMap::new(),
        literal_secrets: false,
    };
    let config = v.config(raw);
    Validated {
        config,
        problems: v.problems,
        literal_secrets: v.literal_secrets,
    }
}

/// Builds a [`Config`] from the raw types, noting every problem and warning on the way.
struct Validator<'a> {
    loc: &'a Locator<'a>,
    env: &'a dyn Environment,
    base_dir: PathBuf,
    problems: Vec<Problem>,
    warnings: Vec<String>,
    secret_sources: BTreeMap<String, SecretSource>,
    /// A secret is written in the config itself.
    literal_secrets: bool,
}

impl Validator<'_> {
    fn report(&mut self, span: Range<usize>, key: impl Into<String>, msg: impl Into<String>) {
        let p = self.loc.problem(span, key, msg);
        self.problems.push(p);
    }

    fn config(&mut self, raw: RawConfig) -> Config {
        let server = self.server(raw.server);
        let state = self.state(&raw.state);
        let refresh = self.refresh(RefreshPolicy::default(), &raw.refresh, "refresh");
        let limits = self.limits(&raw.provider);
        let per_host = self.host_limits(&raw.provider);
        let mut accounts = BTreeMap::new();
        let mut seed_spans = Vec::new();
        for (name, account) in raw.accounts {
            let span = account.span();
            let key = format!("accounts.{name}");
            match AccountName::parse(&name) {
                Ok(account_name) => {
                    if let Some(seed) = &account.get_ref().refresh_token {
                        seed_spans.push((account_name.clone(), seed.span()));
                    }
                    let a = self.account(
                        account_name.clone(),
                        account.into_inner(),
                        span,
                        refresh,
                        limits,
                    );
                    accounts.insert(account_name, Arc::new(a));
                }
                Err(msg) => self.report(span, key, msg),
            }
        }
        self.shared_seeds(&accounts, seed_spans);
        let consumers = self.consumers(raw.consumers, &accounts);
        Config {
            server,
            state,
            provider: limits,
            per_host,
            log: LogConfig {
                format: raw.log.format.unwrap_or_default(),
            },
            accounts,
            consumers,
            warnings: std::mem::take(&mut self.warnings),
            secret_sources: std::mem::take(&mut self.secret_sources),
        }
    }

    /// One refresh token seeding two accounts: the first refresh rotates it, and the
    /// other account's first refresh presents it again, which a provider that detects
    /// reuse answers by revoking the whole family. Both places are named.
    fn shared_seeds(
        &mut self,
        accounts: &BTreeMap<AccountName, Arc<AccountConfig>>,
        spans: Vec<(AccountName, Range<usize>)>,
    ) {
        let mut first: BTreeMap<String, (&AccountName, &Secret, Range<usize>)> = BTreeMap::new();
        for (name, span) in spans {
            let Some((name, account)) = accounts.get_key_value(&name) else {
                continue;
            };
            let crate::config::Grant::RefreshToken { seed: Some(seed) } = &account.grant else {
                continue;
            };
            match first.get(&seed.fingerprint()) {
                Some((other, other_seed, other_span)) if *other_seed == seed => {
                    let line = self.loc.problem(other_span.clone(), "", "").line;
                    let msg = format!(
                        "accounts {other} (line {line}) and {name} have the same refresh_token: the first refresh of one spends it, and the other presenting it again makes the provider revoke the whole family. Give each account its own (`tokend login {name}` gets one)"
                    );
                    self.report(span, format!("accounts.{name}.refresh_token"), msg);
                }
                Some(_) => {}
                None => {
                    first.insert(seed.fingerprint(), (name, seed, span));
                }
            }
        }
    }

    fn keyring(&mut self, raw: &RawState) -> Option<Keyring> {
        let parse = |v: &mut Self, secret: &Spanned<RawSecret>, key: &str| {
            let text = v.secret(secret, key)?;
            match SealKey::parse(&text) {
                Ok(k) => Some(k),
                Err(msg) => {
                    v.report(secret.span(), key, msg);
                    None
                }
            }
        };
        let previous: Vec<SealKey> = raw
            .previous_encryption_keys
            .iter()
            .filter_map(|k| parse(self, k, "state.previous_encryption_keys"))
            .collect();
        match &raw.encryption_key {
            Some(current) => parse(self, current, "state.encryption_key")
                .map(|current| Keyring { current, previous }),
            None => {
                if let Some(first) = raw.previous_encryption_keys.first() {
                    self.report(first.span(), "state.previous_encryption_keys", "needs state.encryption_key: old keys only open files, new ones are sealed with the current key");
                }
                None
            }
        }
    }

    fn server(&mut self, raw: RawServer) -> ServerConfig {
        let allow_remote = raw.allow_remote;
        let listen = match raw.listen {
            None => vec![ListenAddr::Tcp(
                DEFAULT_LISTEN
                    .parse()
                    .expect("the default listen address parses"),
            )],
            Some(list) => {
                if list.get_ref().is_empty() {
                    self.report(list.span(), "server.listen", "needs at least one address");
                }
                let mut out = Vec::new();
                for item in list.into_inner() {
                    if let Some(addr) = self.listen_addr(&item, allow_remote) {
                        out.push(addr);
                    }
                }
                out
            }
        };
        let socket_mode = match &raw.socket_mode {
            None => 0o660,
            Some(m) => match u32::from_str_radix(m.get_ref().trim_start_matches("0o"), 8) {
                Ok(mode) if mode <= 0o777 && mode & 0o007 == 0 => mode,
                Ok(_) => {
                    self.report(
                        m.span(),
                        "server.socket_mode",
                        "must be an octal mode without bits for others, such as \"0660\"",
                    );
                    0o660
                }
                Err(_) => {
                    self.report(
                        m.span(),
                        "server.socket_mode",
                        "must be an octal mode such as \"0660\"",
                    );
                    0o660
                }
            },
        };
        let metrics_key_sha256 = raw.metrics_key.as_ref().and_then(|key| {
            self.secret(key, "server.metrics_key")
                .map(|s| Sha256::digest(s.expose().as_bytes()).into())
        });
        ServerConfig {
            listen,
            allow_remote,
            socket_mode,
            socket_group: raw.socket_group.map(Spanned::into_inner),
            metrics_key_sha256,
            metrics_consumer_labels: raw.metrics_consumer_labels,
        }
    }

    fn listen_addr(&mut self, item: &Spanned<String>, allow_remote: bool) -> Option<ListenAddr> {
        let text = item.get_ref();
        if let Some(path) = text.strip_prefix("unix:") {
            if !path.starts_with('/') {
                self.report(
                    item.span(),
                    "server.listen",
                    format!("{text:?}: a Unix socket path must be absolute"),
                );
                return None;
            }
            return Some(ListenAddr::Unix(PathBuf::from(path)));
        }
        match text.parse::<SocketAddr>() {
            Ok(addr) if addr.ip().is_loopback() => Some(ListenAddr::Tcp(addr)),
            Ok(addr) if allow_remote => {
                self.warnings.push(format!(
                    "server.listen: {addr} is not a loopback address; tokens are served to the network (allow_remote = true)"
                ));
                Some(ListenAddr::Tcp(addr))
            }
            Ok(addr) => {
                self.report(
                    item.span(),
                    "server.listen",
                    format!("{addr} is not a loopback address: tokend serves tokens to local consumers only (set server.allow_remote = true to override)"),
                );
                None
            }
            Err(e) => {
                self.report(
                    item.span(),
                    "server.listen",
                    format!("{text:?} is neither IP:port nor unix:/path: {e}"),
                );
                None
            }
        }
    }

    fn consumers(
        &mut self,
        raw: BTreeMap<String, Spanned<RawConsumer>>,
        accounts: &BTreeMap<AccountName, Arc<AccountConfig>>,
    ) -> Vec<ConsumerConfig> {
        let mut out = Vec::new();
        for (name, consumer) in raw {
            let span = consumer.span();
            let consumer = consumer.into_inner();
            let k = |field: &str| format!("consumers.{name}.{field}");
            let key_sha256 = match (&consumer.key, &consumer.key_sha256) {
                (Some(_), Some(h)) => {
                    self.report(
                        h.span(),
                        k("key_sha256"),
                        "set either key or key_sha256, not both",
                    );
                    None
                }
                (Some(key), None) => self
                    .secret(key, &k("key"))
                    .map(|s| Sha256::digest(s.expose().as_bytes()).into()),
                (None, Some(h)) => {
                    let parsed = decode_hex32(h.get_ref().trim());
                    if parsed.is_none() {
                        self.report(
                            h.span(),
                            k("key_sha256"),
                            "must be 64 hex digits (sha256sum of the key)",
                        );
                    }
                    parsed
                }
                (None, None) => None,
            };
            if key_sha256.is_none()
                && consumer.uid.is_none()
                && consumer.gid.is_none()
                && consumer.key.is_none()
                && consumer.key_sha256.is_none()
            {
                self.report(
                    span.clone(),
                    format!("consumers.{name}"),
                    "a consumer needs a key, a key_sha256, or a uid/gid to match on a Unix socket",
                );
            }
            let list = consumer.accounts.get_ref();
            let allowed = if list.iter().any(|a| a == "*") {
                None
            } else {
                let mut names = Vec::new();
                for a in list {
                    match AccountName::parse(a) {
                        Ok(n) if accounts.contains_key(&n) => names.push(n),
                        _ => self.report(
                            consumer.accounts.span(),
                            k("accounts"),
                            format!("no account named {a:?} is configured"),
                        ),
                    }
                }
                Some(names)
            };
            out.push(ConsumerConfig {
                name,
                key_sha256,
                uid: consumer.uid,
                gid: consumer.gid,
                accounts: allowed,
            });
        }
        out
    }

    fn refresh(&mut self, base: RefreshPolicy, raw: &RawRefresh, prefix: &str) -> RefreshPolicy {
        let mut p = base;
        let fraction = |v: &mut Self,
                        field: &Option<Spanned<f64>>,
                        name: &str,
                        lo: f64,
                        hi: f64,
                        dst: &mut f64| {
            if let Some(f) = field {
                let x = *f.get_ref();
                if !(lo..=hi).contains(&x) {
                    v.report(
                        f.span(),
                        format!("{prefix}.{name}"),
                        format!("must be between {lo} and {hi}, not {x}"),
                    );
                } else {
                    *dst = x;
                }
            }
        };
        fraction(self, &raw.ratio, "ratio", 0.1, 0.95, &mut p.ratio);
        fraction(self, &raw.jitter, "jitter", 0.0, 0.3, &mut p.jitter);
        let duration = |v: &mut Self,
                        field: &Option<Spanned<RawDuration>>,
                        name: &str,
                        min: Duration,
                        dst: &mut Duration| {
            if let Some(d) = field {
                let x = d.get_ref().0;
                if x < min {
                    v.report(
                        d.span(),
                        format!("{prefix}.{name}"),
                        format!("must be at least {}", humantime::format_duration(min)),
                    );
                } else {
                    *dst = x;
                }
            }
        };
        duration(self, &raw.margin, "margin", Duration::ZERO, &mut p.margin);
        duration(
            self,
            &raw.default_lifetime,
            "default_lifetime",
            Duration::from_secs(1),
            &mut p.default_lifetime,
        );
        duration(
            self,
            &raw.min_interval,
            "min_interval",
            Duration::ZERO,
            &mut p.min_interval,
        );
        duration(
            self,
            &raw.backoff_initial,
            "backoff_initial",
            Duration::from_millis(1),
            &mut p.backoff_initial,
        );
        duration(
            self,
            &raw.backoff_max,
            "backoff_max",
            Duration::from_millis(1),
            &mut p.backoff_max,
        );
        duration(
            self,
            &raw.slow_retry,
            "slow_retry",
            Duration::from_secs(1),
            &mut p.slow_retry,
        );
        if let Some(m) = &raw.max_interval {
            if m.get_ref().0 < Duration::from_secs(1) {
                self.report(
                    m.span(),
                    format!("{prefix}.max_interval"),
                    "must be at least 1s",
                );
            } else {
                p.max_interval = Some(m.get_ref().0);
            }
        }
        // Checked only where this table sets one of the two: an account inheriting a
        // conflict from [refresh] has it reported there, once.
        let own = raw.backoff_max.as_ref().or(raw.backoff_initial.as_ref());
        if let Some(own) = own.filter(|_| p.backoff_max < p.backoff_initial) {
            let span = own.span();
            self.report(
                span,
                format!("{prefix}.backoff_max"),
                "must not be less than backoff_initial",
            );
        }
        p
    }

    fn limits(&mut self, raw: &RawProvider) -> ProviderLimits {
        let mut l = ProviderLimits::default();
        self.timeout(
            &mut l.connect_timeout,
            raw.connect_timeout.as_ref(),
            "provider.connect_timeout",
        );
        self.timeout(&mut l.timeout, raw.timeout.as_ref(), "provider.timeout");
        if let Some(m) = &raw.max_response_bytes {
            if *m.get_ref() < 1024 {
                self.report(
                    m.span(),
                    "provider.max_response_bytes",
                    "must be at least 1024",
                );
            } else {
                l.max_response_bytes = usize::try_from(*m.get_ref()).unwrap_or(usize::MAX);
            }
        }
        l
    }

    fn host_limits(&mut self, raw: &RawProvider) -> HostLimits {
        let mut h = HostLimits::default();
        if let Some(n) = &raw.max_concurrent_requests {
            match usize::try_from(*n.get_ref()) {
                Ok(v @ 1..=1024) => h.max_concurrent = v,
                _ => self.report(
                    n.span(),
                    "provider.max_concurrent_requests",
                    "must be from 1 to 1024",
                ),
            }
        }
        if let Some(r) = &raw.max_requests_per_second {
            let v = *r.get_ref();
            // One request every 100 s at the slowest; faster than a microsecond apart is
            // no limit at all.
            if v.is_finite() && (0.01..=1_000_000.0).contains(&v) {
                h.max_per_second = Some(v);
            } else {
                self.report(
                    r.span(),
                    "provider.max_requests_per_second",
                    "must be from 0.01 to 1000000",
                );
            }
        }
        h
    }

    fn timeout(&mut self, dst: &mut Duration, field: Option<&Spanned<RawDuration>>, key: &str) {
        if let Some(d) = field {
            if d.get_ref().0 < Duration::from_millis(10) {
                self.report(d.span(), key, "must be at least 10ms");
            } else {
                *dst = d.get_ref().0;
            }
        }
    }

    pub(super) fn secret(&mut self, raw: &Spanned<RawSecret>, key: &str) -> Option<Secret> {
        let value = match raw.get_ref() {
            RawSecret::Literal(s) => {
                self.literal_secrets = true;
                Ok(s.clone())
            }
            RawSecret::Env(name) => self
                .env
                .var(name)
                .ok_or_else(|| format!("environment variable {name} is not set")),
            RawSecret::File(path) => {
                let resolved = self.secret_path(path);
                let read = self
                    .env
                    .read_file(&resolved)
                    .map(|s| s.trim_end_matches(['\r', '\n']).to_string())
                    .map_err(|e| format!("cannot read secret file {}: {e}", resolved.display()));
                if read.is_ok() {
                    self.check_secret_file(raw.span(), key, &resolved);
                }
                read
            }
        };
        if value.is_ok() {
            self.secret_sources
                .insert(key.to_string(), self.secret_source(raw.get_ref()));
        }
        match value {
            Ok(v) if v.is_empty() => {
                self.report(raw.span(), key, "the secret is empty");
                None
            }
            Ok(v) => Some(Secret::new(v)),
            Err(msg) => {
                self.report(raw.span(), key, msg);
                None
            }
        }
    }

    fn secret_source(&self, raw: &RawSecret) -> SecretSource {
        match raw {
            RawSecret::Literal(_) => SecretSource::Literal,
            RawSecret::Env(name) => SecretSource::Env(name.clone()),
            RawSecret::File(path) => SecretSource::File(self.secret_path(path)),
        }
    }

    /// A relative secret path is looked up in systemd's credentials directory first (so
    /// `LoadCredential=` works with bare names), then next to the config file.
    pub(super) fn secret_path(&self, path: &Path) -> PathBuf {
        if path.is_absolute() {
            return path.to_path_buf();
        }
        if let Some(creds) = self.env.var("CREDENTIALS_DIRECTORY") {
            let candidate = Path::new(&creds).join(path);
            if self.env.read_file(&candidate).is_ok() {
                return candidate;
            }
        }
        self.base_dir.join(path)
    }
}

/// 64 hex digits → 32 bytes.
fn decode_hex32(text: &str) -> Option<[u8; 32]> {
    if text.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(text.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::test_env::{env, load};

    #[test]
    fn a_seed_shared_by_two_accounts_names_both_and_their_lines() {
        let block = |name: &str, seed: &str| {
            format!(
                "[accounts.{name}]\ngrant = \"refresh_token\"\ntoken_url = \"https://x/t\"\nclient_id = \"c\"\nrefresh_token = \"{seed}\"\n"
            )
        };
        let text = [
            block("prod", "rt-1"),
            block("copy", "rt-1"),
            block("other", "rt-2"),
        ]
        .concat();
        let err = load(&text).unwrap_err();
        assert_eq!(err.problems.len(), 1, "{err}");
        let p = &err.problems[0];
        assert_eq!(
            (p.key.as_str(), p.line),
            ("accounts.prod.refresh_token", 5),
            "{err}"
        );
        assert!(
            p.message.contains("accounts copy (line 10) and prod"),
            "{err}"
        );
        assert!(!err.to_string().contains("rt-1"), "{err}");
        assert!(load(&[block("prod", "rt-1"), block("other", "rt-2")].concat()).is_ok());
    }

    #[test]
    fn per_host_limits_are_read_and_checked() {
        let c = load("[provider]\nmax_concurrent_requests = 4\nmax_requests_per_second = 50\n")
            .unwrap();
        assert_eq!(
            c.per_host,
            HostLimits {
                max_concurrent: 4,
                max_per_second: Some(50.0)
            }
        );
        assert_eq!(load("").unwrap().per_host, HostLimits::default());
        let err = load("[provider]\nmax_concurrent_requests = 0\nmax_requests_per_second = 0\n")
            .unwrap_err();
        let keys: Vec<(&str, usize)> = err
            .problems
            .iter()
            .map(|p| (p.key.as_str(), p.line))
            .collect();
        assert_eq!(
            keys,
            [
                ("provider.max_concurrent_requests", 2),
                ("provider.max_requests_per_second", 3)
            ],
            "{err}"
        );
    }

    #[test]
    fn out_of_range_timing_knobs_are_refused() {
        let err = load("[refresh]\nratio = 1.5\nbackoff_initial = \"10m\"\nbackoff_max = \"1m\"\nmargin = \"soon\"\n").unwrap_err();
        assert!(err.to_string().contains("margin"), "{err}");
        let err = load("[refresh]\nratio = 1.5\nbackoff_initial = \"10m\"\nbackoff_max = \"1m\"\n")
            .unwrap_err();
        let keys: Vec<&str> = err.problems.iter().map(|p| p.key.as_str()).collect();
        assert_eq!(keys, ["refresh.ratio", "refresh.backoff_max"], "{err}");
    }

    #[test]
    fn encryption_keys_are_validated_and_old_keys_need_a_current_one() {
        let hex = "ab".repeat(32);
        let ok = format!("[state]\nencryption_key = \"{hex}\"\n");
        assert!(load(&ok).unwrap().state.keyring.is_some());
        let err = load("[state]\nencryption_key = \"short\"\n").unwrap_err();
        assert_eq!(err.problems[0].key, "state.encryption_key", "{err}");
        let err = load(&format!(
            "[state]\nprevious_encryption_keys = [\"{hex}\"]\n"
        ))
        .unwrap_err();
        assert!(
            err.to_string().contains("needs state.encryption_key"),
            "{err}"
        );
        assert!(
            !err.to_string().contains(&hex),
            "key material is never echoed"
        );
    }

    #[test]
    fn relative_secret_files_come_from_the_credentials_directory_first() {
        let mut e = env();
        e.vars.insert(
            "CREDENTIALS_DIRECTORY".into(),
            "/run/credentials/tokend.service".into(),
        );
        e.files.insert(
            PathBuf::from("/run/credentials/tokend.service/cc"),
            "from-creds".into(),
        );
        e.files
            .insert(PathBuf::from("/etc/tokend/other"), "from-config-dir".into());
        let text = "[accounts.a]\ngrant = \"client_credentials\"\ntoken_url = \"https://x/t\"\nclient_id = \"c\"\nclient_secret = { file = \"cc\" }\n[accounts.b]\ngrant = \"client_credentials\"\ntoken_url = \"https://x/t\"\nclient_id = \"c\"\nclient_secret = { file = \"other\" }\n";
        let c = Config::from_str_at(text, Path::new("/etc/tokend/tokend.toml"), &e).unwrap();
        let secret = |n: &str| {
            c.accounts[&AccountName::parse(n).unwrap()]
                .client_secret
                .as_ref()
                .unwrap()
                .expose()
                .to_string()
        };
        assert_eq!(secret("a"), "from-creds");
        assert_eq!(secret("b"), "from-config-dir");
    }
}
