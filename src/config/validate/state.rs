//! Validation of the `[state]` table: where records live (file, PostgreSQL or etcd), the
//! lease settings the shared backends use, and this replica's node id.

use std::path::PathBuf;
use std::time::Duration;

use reqwest::Url;
use toml::Spanned;

use super::Validator;
use crate::config::raw::RawState;
use crate::config::{
    DEFAULT_LEASE_TTL, DEFAULT_STATE_DIR, EtcdIdentity, StateBackend, StateConfig,
};

/// What a shared backend's table prefix or key prefix may hold: it becomes part of SQL
/// identifiers and etcd keys.
fn prefix_ok(p: &str) -> bool {
    !p.is_empty()
        && p.len() <= 32
        && p.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '/' | '-' | '.'))
}

impl Validator<'_> {
    pub(super) fn state(&mut self, raw: &RawState) -> StateConfig {
        let keyring = self.keyring(raw);
        let dir = self.state_dir(raw);
        let backend = self.backend(raw);
        let lease_ttl = match &raw.lease_ttl {
            Some(d)
                if d.get_ref().0 < Duration::from_secs(3)
                    || d.get_ref().0 > Duration::from_secs(600) =>
            {
                self.report(d.span(), "state.lease_ttl", "must be from 3s to 10m: a holder renews at a third of it, and a dead holder's accounts wait out the rest");
                DEFAULT_LEASE_TTL
            }
            Some(d) => d.get_ref().0,
            None => DEFAULT_LEASE_TTL,
        };
        if let (StateBackend::File, Some(d)) = (&backend, &raw.lease_ttl) {
            self.report(
                d.span(),
                "state.lease_ttl",
                "applies to the shared backends only (backend = \"postgres\" or \"etcd\")",
            );
        }
        let node_id = match &raw.node_id {
            Some(n) => {
                let id = n.get_ref();
                let ok =
                    !id.is_empty() && id.len() <= 128 && id.chars().all(|c| c.is_ascii_graphic());
                if !ok {
                    self.report(
                        n.span(),
                        "state.node_id",
                        "must be 1 to 128 printable characters without spaces",
                    );
                }
                id.clone()
            }
            None => default_node_id(),
        };
        StateConfig {
            dir,
            keyring,
            backend,
            lease_ttl,
            node_id,
        }
    }

    fn state_dir(&mut self, raw: &RawState) -> PathBuf {
        match &raw.dir {
            Some(d) => {
                if d.get_ref().is_empty() {
                    self.report(d.span(), "state.dir", "must not be empty");
                }
                // Relative to the config file, like secret files: not to wherever the
                // daemon happened to be started.
                self.base_dir.join(d.get_ref())
            }
            // systemd's StateDirectory= tells us where the state lives.
            None => self
                .env
                .var("STATE_DIRECTORY")
                .and_then(|s| s.split(':').next().map(PathBuf::from))
                .unwrap_or_else(|| PathBuf::from(DEFAULT_STATE_DIR)),
        }
    }

    fn backend(&mut self, raw: &RawState) -> StateBackend {
        let name = raw
            .backend
            .as_ref()
            .map(|b| b.get_ref().as_str())
            .unwrap_or("file");
        let prefix = |v: &mut Self, default: &str| match &raw.prefix {
            Some(p) if !prefix_ok(p.get_ref()) => {
                v.report(
                    p.span(),
                    "state.prefix",
                    "must be 1 to 32 of letters, digits, '_', '-', '.' and '/'",
                );
                default.to_string()
            }
            Some(p) => p.get_ref().clone(),
            None => default.to_string(),
        };
        let ca = |v: &mut Self| {
            raw.ca_file
                .as_ref()
                .and_then(|f| v.ca_bundle(f, "state.ca_file"))
        };
        let misplaced = |v: &mut Self,
                         present: bool,
                         span: Option<std::ops::Range<usize>>,
                         key: &str,
                         only: &str| {
            if let (true, Some(span)) = (present, span) {
                v.report(
                    span,
                    format!("state.{key}"),
                    format!("applies to backend = \"{only}\" only"),
                );
            }
        };
        match name {
            "file" => {
                for (key, span) in [
                    ("url", raw.url.as_ref().map(Spanned::span)),
                    ("endpoints", raw.endpoints.as_ref().map(Spanned::span)),
                    ("prefix", raw.prefix.as_ref().map(Spanned::span)),
                    ("ca_file", raw.ca_file.as_ref().map(Spanned::span)),
                    (
                        "client_certificate",
                        raw.client_certificate.as_ref().map(Spanned::span),
                    ),
                    ("client_key", raw.client_key.as_ref().map(Spanned::span)),
                ] {
                    if let Some(span) = span {
                        self.report(span, format!("state.{key}"), "applies to the shared backends only (backend = \"postgres\" or \"etcd\")");
                    }
                }
                StateBackend::File
            }
            "postgres" => {
                misplaced(
                    self,
                    raw.endpoints.is_some(),
                    raw.endpoints.as_ref().map(Spanned::span),
                    "endpoints",
                    "etcd",
                );
                misplaced(
                    self,
                    raw.client_certificate.is_some(),
                    raw.client_certificate.as_ref().map(Spanned::span),
                    "client_certificate",
                    "etcd",
                );
                misplaced(
                    self,
                    raw.client_key.is_some(),
                    raw.client_key.as_ref().map(Spanned::span),
                    "client_key",
                    "etcd",
                );
                let url = match &raw.url {
                    Some(u) => self.secret(u, "state.url"),
                    None => {
                        let span = raw.backend.as_ref().map(Spanned::span).unwrap_or_default();
                        self.report(span, "state.url", "backend = \"postgres\" needs url (a libpq URL, e.g. { env = \"TOKEND_STATE_URL\" })");
                        None
                    }
                };
                if let (Some(u), Some(raw_url)) = (&url, &raw.url)
                    && !(u.expose().starts_with("postgres://")
                        || u.expose().starts_with("postgresql://"))
                {
                    // Never quote it: it may hold a password.
                    self.report(
                        raw_url.span(),
                        "state.url",
                        "must be a postgres:// or postgresql:// URL",
                    );
                }
                StateBackend::Postgres {
                    url: url.unwrap_or_else(|| crate::secret::Secret::new("")),
                    prefix: prefix(self, "tokend_"),
                    ca: ca(self),
                }
            }
            "etcd" => {
                misplaced(
                    self,
                    raw.url.is_some(),
                    raw.url.as_ref().map(Spanned::span),
                    "url",
                    "postgres",
                );
                let endpoints = self.etcd_endpoints(raw);
                let identity = self.etcd_identity(raw);
                StateBackend::Etcd {
                    endpoints,
                    prefix: prefix(self, "tokend/"),
                    ca: ca(self),
                    identity,
                }
            }
            other => {
                let span = raw.backend.as_ref().map(Spanned::span).unwrap_or_default();
                self.report(
                    span,
                    "state.backend",
                    format!("unknown backend {other:?}: use \"file\", \"postgres\" or \"etcd\""),
                );
                StateBackend::File
            }
        }
    }

    fn etcd_endpoints(&mut self, raw: &RawState) -> Vec<Url> {
        let Some(list) = &raw.endpoints else {
            let span = raw.backend.as_ref().map(Spanned::span).unwrap_or_default();
            self.report(span, "state.endpoints", "backend = \"etcd\" needs endpoints (client URLs, e.g. [\"https://10.0.0.5:2379\"])");
            return Vec::new();
        };
        if list.get_ref().is_empty() {
            self.report(
                list.span(),
                "state.endpoints",
                "needs at least one client URL",
            );
        }
        let mut out = Vec::new();
        let https_needs_ca = raw.ca_file.is_none();
        for e in list.get_ref() {
            match Url::parse(e.get_ref()) {
                Ok(u) if matches!(u.scheme(), "http" | "https") && u.host_str().is_some() => {
                    if u.scheme() == "http" && !crate::config::is_loopback_host(&u) {
                        self.warnings.push(format!(
                            "state.endpoints: {u} is plain http: account records cross the network in clear{}",
                            if raw.encryption_key.is_some() { "" } else { " (set state.encryption_key to seal them)" }
                        ));
                    }
                    if u.scheme() == "https" && https_needs_ca {
                        // tokend carries no public roots for etcd: clusters use private CAs.
                        self.report(
                            e.span(),
                            "state.endpoints",
                            format!("{u} is https: set state.ca_file to the cluster's CA (PEM)"),
                        );
                    }
                    out.push(u);
                }
                _ => self.report(
                    e.span(),
                    "state.endpoints",
                    format!(
                        "{:?} is not an http:// or https:// URL with a host",
                        e.get_ref()
                    ),
                ),
            }
        }
        out
    }

    fn etcd_identity(&mut self, raw: &RawState) -> Option<EtcdIdentity> {
        match (&raw.client_certificate, &raw.client_key) {
            (None, None) => None,
            (Some(cert), Some(key)) => {
                let path = self.base_dir.join(cert.get_ref());
                let certificate_pem = match self.env.read_file(&path) {
                    Ok(text) => text.into_bytes(),
                    Err(e) => {
                        self.report(
                            cert.span(),
                            "state.client_certificate",
                            format!("cannot read {}: {e}", path.display()),
                        );
                        return None;
                    }
                };
                let key_pem = self.secret(key, "state.client_key")?;
                Some(EtcdIdentity {
                    certificate_pem,
                    key_pem,
                })
            }
            (Some(c), None) => {
                self.report(
                    c.span(),
                    "state.client_certificate",
                    "needs state.client_key too",
                );
                None
            }
            (None, Some(k)) => {
                self.report(
                    k.span(),
                    "state.client_key",
                    "needs state.client_certificate too",
                );
                None
            }
        }
    }
}

/// `hostname-pid`: unique among the replicas that run at once, and readable in
/// `/v1/accounts`' `lease_holder`.
fn default_node_id() -> String {
    let host = rustix::system::uname()
        .nodename()
        .to_string_lossy()
        .into_owned();
    let host = if host.is_empty() {
        "tokend".to_string()
    } else {
        host
    };
    format!("{host}-{}", std::process::id())
}
