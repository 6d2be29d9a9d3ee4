//! Validation of one `[accounts.NAME]` table: endpoints, client authentication and
//! grant, request parameters, headers, CA bundle, sinks and hook.

use std::collections::BTreeMap;
use std::ops::Range;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use http::{HeaderName, HeaderValue};
use reqwest::Url;
use toml::Spanned;

use super::Validator;
use crate::config::raw::{RawAccount, RawGrant, RawHook, RawProxy, RawSecret, RawSink};
use crate::config::url_rules::check_endpoint_url;
use crate::config::{
    AccountConfig, AccountName, AuthorizeOptions, CaBundle, ClientAssertion, ClientAuth, Endpoints,
    Grant, HOOK_SIGNALS, HookAction, HookConfig, Prompt, ProviderLimits, ProxyConfig,
    RefreshPolicy, RequestFormat, SinkConfig,
};
use crate::secret::Secret;

/// Who the client is, how it authenticates, and the grant it uses.
struct Client {
    /// The token endpoint a service-account key file names.
    token_uri: Option<Url>,
    grant: Grant,
    id: String,
    secret: Option<Secret>,
    auth: ClientAuth,
    assertion: Option<ClientAssertion>,
    request_format: RequestFormat,
}

impl Validator<'_> {
    /// One account, checked part by part in the order its problems are reported.
    pub(super) fn account(
        &mut self,
        name: AccountName,
        raw: RawAccount,
        account_span: Range<usize>,
        global_refresh: RefreshPolicy,
        global_limits: ProviderLimits,
    ) -> AccountConfig {
        let k = |field: &str| format!("accounts.{name}.{field}");
        let (token_url, endpoints) = self.endpoints(&raw, &account_span, &k);
        let client = self.client(&raw, account_span.clone(), &k);
        let tls_identity = self.tls_identity(&raw, client.auth, &account_span, &k);
        let token_url = token_url.or(client.token_uri);
        let scope = raw.scope.as_ref().and_then(|s| self.scope(s, &k("scope")));
        let extra_params = self.extra_params(raw.extra_params, &k);
        let authorize = self.authorize(raw.prompt.as_ref(), raw.authorize_params, &k);
        let headers = self.headers(raw.headers, &raw.profile, &raw.profile_token, &k);
        let sinks = raw
            .sinks
            .iter()
            .filter_map(|s| self.sink(s, &k("sinks")))
            .collect();
        let on_refresh = raw
            .on_refresh
            .as_ref()
            .and_then(|h| self.hook(h, &k("on_refresh")));
        let refresh = self.refresh(global_refresh, &raw.refresh, &k("refresh"));
        let ca_bundle = raw
            .ca_file
            .as_ref()
            .and_then(|f| self.ca_bundle(f, &k("ca_file")));
        let mut limits = global_limits;
        self.timeout(&mut limits.timeout, raw.timeout.as_ref(), &k("timeout"));
        let proxy = raw
            .proxy
            .as_ref()
            .and_then(|p| self.proxy(p.get_ref(), raw.allow_insecure_http, &k));

        AccountConfig {
            name,
            grant: client.grant,
            token_url,
            endpoints,
            client_id: client.id,
            client_secret: client.secret,
            client_auth: client.auth,
            assertion: client.assertion.map(Box::new),
            request_format: client.request_format,
            scope,
            extra_params,
            authorize,
            headers,
            refresh,
            limits,
            ca_bundle,
            tls_identity,
            sinks,
            on_refresh: on_refresh.map(Box::new),
            proxy: proxy.map(Box::new),
        }
    }

    /// `[accounts.NAME.proxy]`: an upstream base URL under the same rules as the token
    /// endpoint (https, or http to loopback), without a query or credentials of its own.
    fn proxy(
        &mut self,
        raw: &RawProxy,
        allow_http: bool,
        k: &dyn Fn(&str) -> String,
    ) -> Option<ProxyConfig> {
        let key = k("proxy.upstream");
        let mut upstream = self.endpoint_url(&raw.upstream, allow_http, &key)?;
        let why = if upstream.query().is_some() {
            Some("an upstream base URL has no ?query: each request brings its own")
        } else if !upstream.username().is_empty() || upstream.password().is_some() {
            Some(
                "an upstream base URL carries no user or password: the account's token is the credential",
            )
        } else {
            None
        };
        if let Some(why) = why {
            self.report(raw.upstream.span(), key, why);
            return None;
        }
        if !upstream.path().ends_with('/') {
            let path = format!("{}/", upstream.path());
            upstream.set_path(&path);
        }
        let mut timeout = ProxyConfig::DEFAULT_TIMEOUT;
        self.timeout(&mut timeout, raw.timeout.as_ref(), &k("proxy.timeout"));
        Some(ProxyConfig { upstream, timeout })
    }

    /// The token endpoint (or the issuer to discover it from), and the endpoints of the
    /// interactive flows.
    fn endpoints(
        &mut self,
        raw: &RawAccount,
        account_span: &Range<usize>,
        k: &dyn Fn(&str) -> String,
    ) -> (Option<Url>, Endpoints) {
        let insecure = raw.allow_insecure_http;
        let token_url = raw
            .token_url
            .as_ref()
            .and_then(|u| self.endpoint_url(u, insecure, &k("token_url")));
        let issuer = raw.issuer.as_ref().and_then(|i| {
            let url = self.endpoint_url(i, insecure, &k("issuer"))?;
            if url.query().is_some() {
                self.report(
                    i.span(),
                    k("issuer"),
                    "an issuer identifier has no ?query (RFC 8414 §2)",
                );
                return None;
            }
            Some(i.get_ref().trim().to_string())
        });
        // A service-account key file names its token endpoint (`bearer`).
        let key_file_names_it = raw.grant == RawGrant::JwtBearer && raw.credentials_file.is_some();
        if raw.token_url.is_none() && raw.issuer.is_none() && !key_file_names_it {
            self.report(
                account_span.clone(),
                k("token_url"),
                "set token_url, or issuer to discover it",
            );
        }
        let mut endpoint = |raw: &Option<Spanned<String>>, key: &str| {
            raw.as_ref()
                .and_then(|u| self.endpoint_url(u, insecure, &k(key)))
        };
        let authorization = endpoint(&raw.authorization_endpoint, "authorization_endpoint");
        let device_authorization = endpoint(
            &raw.device_authorization_endpoint,
            "device_authorization_endpoint",
        );
        let revocation = endpoint(&raw.revocation_endpoint, "revocation_endpoint");
        let redirect_uri = raw
            .redirect_uri
            .as_ref()
            .and_then(|u| self.redirect_uri(u, insecure, &k("redirect_uri")));
        let endpoints = Endpoints {
            issuer,
            authorization: authorization.map(Box::new),
            device_authorization: device_authorization.map(Box::new),
            revocation: revocation.map(Box::new),
            redirect_uri: redirect_uri.map(Box::new),
            scopes_supported: None,
            allow_insecure_http: insecure,
        };
        (token_url, endpoints)
    }

    /// The client and its grant, checked together: what the grant and `client_auth`
    /// require depends on whether a client secret is set.
    fn client(
        &mut self,
        raw: &RawAccount,
        account_span: Range<usize>,
        k: &dyn Fn(&str) -> String,
    ) -> Client {
        let id = match &raw.client_id {
            Some(id) if id.get_ref().trim().is_empty() => {
                self.report(id.span(), k("client_id"), "must not be empty");
                String::new()
            }
            Some(id) => id.get_ref().trim().to_string(),
            // RFC 7523 §2.1: the assertion is the grant; a client is optional.
            None if raw.grant == RawGrant::JwtBearer => String::new(),
            None => {
                self.report(account_span.clone(), k("client_id"), "is required");
                String::new()
            }
        };
        let secret = raw
            .client_secret
            .as_ref()
            .and_then(|s| self.secret(s, &k("client_secret")));
        let auth = raw.client_auth.unwrap_or(ClientAuth::ClientSecretPost);
        let request_format = raw.request_format.unwrap_or(RequestFormat::Form);

        let mut token_uri = None;
        let grant = match raw.grant {
            RawGrant::RefreshToken => {
                let seed = raw
                    .refresh_token
                    .as_ref()
                    .and_then(|s| self.secret(s, &k("refresh_token")));
                Grant::RefreshToken { seed }
            }
            RawGrant::ClientCredentials => {
                if let Some(rt) = &raw.refresh_token {
                    self.report(
                        rt.span(),
                        k("refresh_token"),
                        "a client_credentials account takes no refresh_token",
                    );
                }
                // The assertion methods report their own needs (`credentials`).
                let asserts = auth.is_mutual_tls()
                    || matches!(
                        auth,
                        ClientAuth::PrivateKeyJwt | ClientAuth::ClientSecretJwt
                    );
                if raw.client_secret.is_none() && !asserts {
                    self.report(
                        account_span.clone(),
                        k("client_secret"),
                        "a client_credentials account needs a client_secret (or client_auth = \"private_key_jwt\")",
                    );
                }
                Grant::ClientCredentials
            }
            RawGrant::JwtBearer => {
                if let Some(rt) = &raw.refresh_token {
                    self.report(
                        rt.span(),
                        k("refresh_token"),
                        "a jwt_bearer account takes no refresh_token",
                    );
                }
                match self.bearer_assertion(raw, &account_span, k) {
                    Some((assertion, uri)) => {
                        token_uri = uri;
                        Grant::JwtBearer(Box::new(assertion))
                    }
                    // Reported; a stand-in, since a config with problems is not used.
                    None => Grant::ClientCredentials,
                }
            }
        };
        if raw.grant != RawGrant::JwtBearer {
            self.refuse_bearer_keys(raw, k);
        }
        self.refuse_secret_with_mutual_tls(raw, auth, k);
        if auth.is_mutual_tls() && raw.client_id.is_none() && raw.grant == RawGrant::JwtBearer {
            let msg = "is required with mutual TLS client authentication (RFC 8705 §2)";
            self.report(account_span.clone(), k("client_id"), msg);
        }
        if auth == ClientAuth::ClientSecretBasic && raw.client_secret.is_none() {
            self.report(
                account_span.clone(),
                k("client_secret"),
                "client_auth = \"client_secret_basic\" needs a client_secret",
            );
        }
        let assertion = self.client_assertion(raw, auth, &account_span, k);
        Client {
            token_uri,
            grant,
            id,
            secret,
            auth,
            assertion,
            request_format,
        }
    }

    fn scope(&mut self, raw: &Spanned<String>, key: &str) -> Option<String> {
        let v = raw.get_ref().trim();
        if v.is_empty() {
            self.report(raw.span(), key, "must not be empty (leave it out instead)");
            None
        } else {
            Some(v.to_string())
        }
    }

    /// Extra token request parameters: any but those tokend sets itself.
    fn extra_params(
        &mut self,
        raw: BTreeMap<String, Spanned<String>>,
        k: &dyn Fn(&str) -> String,
    ) -> BTreeMap<String, String> {
        const RESERVED: &[&str] = &[
            "grant_type",
            "refresh_token",
            "client_id",
            "client_secret",
            "scope",
            "code",
            "code_verifier",
            "redirect_uri",
            "device_code",
        ];
        let mut extra_params = BTreeMap::new();
        for (key, value) in raw {
            if RESERVED.contains(&key.as_str()) {
                self.report(
                    value.span(),
                    k(&format!("extra_params.{key}")),
                    format!("`{key}` is set by tokend itself and cannot be overridden"),
                );
            } else {
                extra_params.insert(key, value.into_inner());
            }
        }
        extra_params
    }

    /// `prompt` and `authorize_params`: what `tokend login` adds to the authorization
    /// request, none of the parameters it sets itself.
    fn authorize(
        &mut self,
        prompt: Option<&Spanned<String>>,
        raw: BTreeMap<String, Spanned<String>>,
        k: &dyn Fn(&str) -> String,
    ) -> AuthorizeOptions {
        const RESERVED: &[&str] = &[
            "response_type",
            "client_id",
            "redirect_uri",
            "state",
            "code_challenge",
            "code_challenge_method",
            "scope",
        ];
        let prompt = match prompt.map(|p| (p.span(), p.get_ref().trim())) {
            None => Prompt::Auto,
            Some((_, "")) => Prompt::Omit,
            Some((span, v)) if !v.chars().all(|c| c.is_ascii_graphic() || c == ' ') => {
                self.report(span, k("prompt"), "must be printable ASCII, such as \"consent\" or \"login consent\" (\"\" sends none)");
                Prompt::Auto
            }
            Some((_, v)) => Prompt::Value(v.to_string()),
        };
        let mut params = BTreeMap::new();
        for (key, value) in raw {
            let place = k(&format!("authorize_params.{key}"));
            if RESERVED.contains(&key.as_str()) {
                self.report(
                    value.span(),
                    place,
                    format!("`{key}` is set by tokend itself and cannot be overridden"),
                );
            } else if key == "prompt" {
                self.report(value.span(), place, "set `prompt` in the account instead");
            } else if key.is_empty() {
                self.report(value.span(), place, "a parameter name must not be empty");
            } else {
                params.insert(key, value.into_inner());
            }
        }
        AuthorizeOptions { prompt, params }
    }

    /// The headers consumers must send with the token: `headers`, then the `Profile`
    /// header that `profile` or `profile_token` make.
    fn headers(
        &mut self,
        raw: BTreeMap<String, Spanned<String>>,
        profile: &Option<Spanned<String>>,
        profile_token: &Option<Spanned<RawSecret>>,
        k: &dyn Fn(&str) -> String,
    ) -> Vec<(HeaderName, HeaderValue)> {
        let mut headers = Vec::new();
        for (key, value) in raw {
            let hk = k(&format!("headers.{key}"));
            let Ok(header_name) = HeaderName::from_bytes(key.as_bytes()) else {
                self.report(
                    value.span(),
                    hk,
                    format!("{key:?} is not a valid HTTP header name"),
                );
                continue;
            };
            if header_name == http::header::AUTHORIZATION {
                self.report(
                    value.span(),
                    hk,
                    "Authorization is built from the token itself and cannot be set here",
                );
                continue;
            }
            match HeaderValue::from_str(value.get_ref()) {
                Ok(v) => headers.push((header_name, v)),
                Err(_) => self.report(value.span(), hk, "not a valid HTTP header value"),
            }
        }
        self.profile(profile, profile_token, &mut headers, k);
        headers
    }

    /// The `ca_file` (relative to the config file), read now: a file that holds no PEM
    /// certificate is refused here rather than at the first refresh.
    pub(super) fn ca_bundle(&mut self, raw: &Spanned<String>, key: &str) -> Option<Arc<CaBundle>> {
        let path = self.base_dir.join(raw.get_ref());
        let pem = match self.env.read_file(&path) {
            Ok(text) => text.into_bytes(),
            Err(e) => {
                self.report(
                    raw.span(),
                    key,
                    format!("cannot read {}: {e}", path.display()),
                );
                return None;
            }
        };
        match reqwest::Certificate::from_pem_bundle(&pem) {
            Ok(certs) if !certs.is_empty() => Some(Arc::new(CaBundle { path, pem })),
            _ => {
                self.report(
                    raw.span(),
                    key,
                    format!("{} holds no PEM certificate", path.display()),
                );
                None
            }
        }
    }

    /// Zywave's `Profile` header: `profile = "B 1234"` (type code and id) or
    /// `profile_token` (a secret, served as `Profile: Token …`).
    fn profile(
        &mut self,
        profile: &Option<Spanned<String>>,
        token: &Option<Spanned<RawSecret>>,
        headers: &mut Vec<(HeaderName, HeaderValue)>,
        k: &dyn Fn(&str) -> String,
    ) {
        let name = HeaderName::from_static("profile");
        let value = match (profile, token) {
            (None, None) => return,
            (Some(_), Some(t)) => {
                self.report(
                    t.span(),
                    k("profile_token"),
                    "set profile or profile_token, not both",
                );
                return;
            }
            (Some(p), None) => {
                let text = p.get_ref().trim();
                let valid = text.split_once(' ').is_some_and(|(code, id)| {
                    !code.is_empty()
                        && code.len() <= 16
                        && code.chars().all(|c| c.is_ascii_alphanumeric())
                        && code != "Token"
                        && !id.is_empty()
                        && id.len() <= 64
                        && id
                            .chars()
                            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_'))
                });
                if !valid {
                    self.report(
                        p.span(),
                        k("profile"),
                        "must be \"{TypeCode} {ID}\", such as \"B 1234\" (for a profile token use profile_token)",
                    );
                    return;
                }
                HeaderValue::from_str(text).expect("validated as visible ASCII")
            }
            (None, Some(t)) => {
                let Some(secret) = self.secret(t, &k("profile_token")) else {
                    return;
                };
                match HeaderValue::from_str(&format!("Token {}", secret.expose())) {
                    Ok(mut v) => {
                        v.set_sensitive(true);
                        v
                    }
                    Err(_) => {
                        self.report(t.span(), k("profile_token"), "not a valid header value");
                        return;
                    }
                }
            }
        };
        if headers.iter().any(|(n, _)| *n == name) {
            let span = profile
                .as_ref()
                .map_or_else(|| token.as_ref().map_or(0..0, |t| t.span()), |p| p.span());
            self.report(
                span,
                k("profile"),
                "a Profile header is already set in headers",
            );
            return;
        }
        headers.push((name, value));
    }

    fn sink(&mut self, raw: &Spanned<RawSink>, key: &str) -> Option<SinkConfig> {
        let sink = raw.get_ref();
        if !sink.path.starts_with('/') {
            self.report(
                raw.span(),
                key,
                format!("sink path {:?} must be absolute", sink.path),
            );
            return None;
        }
        let mode = match &sink.mode {
            None => 0o600,
            Some(m) => {
                match u32::from_str_radix(m.trim_start_matches("0o"), 8) {
                    Ok(mode) if mode <= 0o777 && mode & 0o002 == 0 => mode,
                    _ => {
                        self.report(raw.span(), key, format!("mode {m:?} must be octal without write for others, such as \"0640\""));
                        return None;
                    }
                }
            }
        };
        if mode & 0o004 != 0 {
            self.warnings.push(format!(
                "{key}: {} is readable by every user (mode {mode:o})",
                sink.path
            ));
        }
        Some(SinkConfig {
            path: PathBuf::from(&sink.path),
            format: sink.format,
            mode,
            on_shutdown: sink.on_shutdown,
        })
    }

    fn hook(&mut self, raw: &Spanned<RawHook>, key: &str) -> Option<HookConfig> {
        let hook = raw.get_ref();
        let timeout = hook.timeout.map_or(Duration::from_secs(30), |d| d.0);
        let action = match (&hook.exec, &hook.signal, &hook.pid_file) {
            (Some(argv), None, None) if !argv.is_empty() && argv[0].starts_with('/') => {
                HookAction::Exec(argv.clone())
            }
            (Some(_), None, None) => {
                self.report(
                    raw.span(),
                    key,
                    "exec needs a program given by absolute path, then its arguments",
                );
                return None;
            }
            (None, Some(signal), Some(pid_file)) => {
                let upper = signal.to_ascii_uppercase();
                let signal = upper.trim_start_matches("SIG").to_string();
                if !HOOK_SIGNALS.contains(&signal.as_str()) {
                    self.report(
                        raw.span(),
                        key,
                        format!("signal must be one of {}", HOOK_SIGNALS.join(", ")),
                    );
                    return None;
                }
                HookAction::Signal {
                    signal,
                    pid_file: PathBuf::from(pid_file),
                }
            }
            _ => {
                self.report(
                    raw.span(),
                    key,
                    "a hook is { exec = [..] } or { signal = \"HUP\", pid_file = \"..\" }",
                );
                return None;
            }
        };
        Some(HookConfig { action, timeout })
    }

    /// A provider endpoint (token, authorization, device, revocation) or the issuer.
    fn endpoint_url(&mut self, raw: &Spanned<String>, allow_http: bool, key: &str) -> Option<Url> {
        match check_endpoint_url(raw.get_ref().trim(), allow_http) {
            Ok(url) => Some(url),
            Err(msg) => {
                self.report(raw.span(), key, msg);
                None
            }
        }
    }

    /// A redirect URI: absolute, no fragment (RFC 6749 §3.1.2); https, or http on a
    /// loopback address (RFC 8252 §7.3) unless `allow_insecure_http`.
    fn redirect_uri(&mut self, raw: &Spanned<String>, allow_http: bool, key: &str) -> Option<Url> {
        match check_endpoint_url(raw.get_ref().trim(), allow_http) {
            Ok(url) => Some(url),
            Err(msg) => {
                self.report(
                    raw.span(),
                    key,
                    msg.replace("an endpoint", "a redirect URI"),
                );
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::path::{Path, PathBuf};

    use crate::config::test_env::{env, load};
    use crate::config::{AccountName, Config};

    #[test]
    fn plain_http_is_allowed_only_on_loopback_or_by_explicit_opt_in() {
        let account = |url: &str, opt_in: bool| {
            format!(
                "[accounts.a]\ngrant = \"client_credentials\"\ntoken_url = \"{url}\"\nclient_id = \"c\"\nclient_secret = \"s\"\nallow_insecure_http = {opt_in}\n"
            )
        };
        assert!(load(&account("http://127.0.0.1:9000/token", false)).is_ok());
        assert!(load(&account("http://localhost:9000/token", false)).is_ok());
        assert!(load(&account("http://[::1]:9000/token", false)).is_ok());
        let err = load(&account("http://auth.internal/token", false)).unwrap_err();
        assert!(err.to_string().contains("allow_insecure_http"), "{err}");
        assert!(load(&account("http://auth.internal/token", true)).is_ok());
    }

    #[test]
    fn an_issuer_can_stand_in_for_token_url_and_one_of_them_is_required() {
        let base = "[accounts.a]\ngrant = \"refresh_token\"\nclient_id = \"c\"\n";
        let c = load(&format!("{base}issuer = \"https://id.example.com\"\n")).unwrap();
        let a = &c.accounts[&AccountName::parse("a").unwrap()];
        assert!(a.token_url.is_none());
        assert_eq!(
            a.endpoints.issuer.as_deref(),
            Some("https://id.example.com")
        );
        let err = load(base).unwrap_err();
        assert_eq!(err.problems[0].key, "accounts.a.token_url", "{err}");
        assert!(err.to_string().contains("issuer"), "{err}");
        let err = load(&format!(
            "{base}issuer = \"https://id.example.com/?tenant=1\"\nredirect_uri = \"http://example.com/cb\"\ndevice_authorization_endpoint = \"ftp://x/d\"\n"
        ))
        .unwrap_err();
        let keys: Vec<&str> = err.problems.iter().map(|p| p.key.as_str()).collect();
        assert_eq!(
            keys,
            [
                "accounts.a.issuer",
                "accounts.a.device_authorization_endpoint",
                "accounts.a.redirect_uri"
            ],
            "{err}"
        );
        let c = load(&format!(
            "{base}token_url = \"https://x/t\"\nredirect_uri = \"http://127.0.0.1:9499/callback\"\nauthorization_endpoint = \"https://x/authorize?tenant=1\"\nrevocation_endpoint = \"https://x/revoke\"\n"
        ))
        .unwrap();
        let e = &c.accounts[&AccountName::parse("a").unwrap()].endpoints;
        assert_eq!(e.redirect_uri.as_ref().unwrap().port(), Some(9499));
        assert_eq!(e.authorization.as_ref().unwrap().query(), Some("tenant=1"));
    }

    #[test]
    fn authorize_params_may_not_replace_what_login_sets_itself() {
        let base = "[accounts.a]\ngrant = \"refresh_token\"\ntoken_url = \"https://x/t\"\nclient_id = \"c\"\n";
        let c = load(&format!(
            "{base}prompt = \"\"\nauthorize_params = {{ access_type = \"offline\" }}\n"
        ))
        .unwrap();
        let a = &c.accounts[&AccountName::parse("a").unwrap()].authorize;
        assert_eq!(a.prompt, crate::config::Prompt::Omit);
        assert_eq!(a.params["access_type"], "offline");
        let err = load(&format!(
            "{base}authorize_params = {{ state = \"x\", prompt = \"login\", audience = \"api\" }}\n"
        ))
        .unwrap_err();
        let keys: Vec<&str> = err.problems.iter().map(|p| p.key.as_str()).collect();
        assert_eq!(
            keys,
            [
                "accounts.a.authorize_params.prompt",
                "accounts.a.authorize_params.state"
            ],
            "{err}"
        );
        assert!(err.to_string().contains("set by tokend itself"), "{err}");
    }

    #[test]
    fn a_ca_file_must_hold_pem_certificates() {
        let mut e = env();
        e.files
            .insert(PathBuf::from("/etc/tokend/not-a-ca.pem"), "hello".into());
        let text = "[accounts.a]\ngrant = \"client_credentials\"\ntoken_url = \"https://x/t\"\nclient_id = \"c\"\nclient_secret = \"s\"\nca_file = \"not-a-ca.pem\"\n[accounts.b]\ngrant = \"client_credentials\"\ntoken_url = \"https://x/t\"\nclient_id = \"c\"\nclient_secret = \"s\"\nca_file = \"/missing.pem\"\n";
        let err = Config::from_str_at(text, Path::new("/etc/tokend/tokend.toml"), &e).unwrap_err();
        let keys: Vec<&str> = err.problems.iter().map(|p| p.key.as_str()).collect();
        assert_eq!(keys, ["accounts.a.ca_file", "accounts.b.ca_file"], "{err}");
        assert!(err.to_string().contains("no PEM certificate"), "{err}");
    }

    #[test]
    fn a_proxy_upstream_follows_the_endpoint_rules_and_is_a_base() {
        let account = |proxy: &str| {
            format!(
                "[accounts.a]\ngrant = \"client_credentials\"\ntoken_url = \"https://x/t\"\nclient_id = \"c\"\nclient_secret = \"s\"\n[accounts.a.proxy]\n{proxy}\n"
            )
        };
        let c = load(&account("upstream = \"https://api.example.com/v2\"")).unwrap();
        let proxy = c.accounts[&AccountName::parse("a").unwrap()]
            .proxy
            .clone()
            .unwrap();
        assert_eq!(
            proxy.upstream.as_str(),
            "https://api.example.com/v2/",
            "a base ends in /"
        );
        assert_eq!(proxy.timeout, crate::config::ProxyConfig::DEFAULT_TIMEOUT);
        let c = load(&account(
            "upstream = \"http://127.0.0.1:9000\"\ntimeout = \"5s\"",
        ))
        .unwrap();
        let proxy = c.accounts[&AccountName::parse("a").unwrap()].proxy.clone();
        assert_eq!(proxy.unwrap().timeout, std::time::Duration::from_secs(5));
        for (bad, why) in [
            (
                "upstream = \"http://api.example.com\"",
                "allow_insecure_http",
            ),
            ("upstream = \"https://api.example.com/?key=1\"", "no ?query"),
            (
                "upstream = \"https://user:pw@api.example.com/\"",
                "no user or password",
            ),
            (
                "upstream = \"ftp://api.example.com/\"",
                "unsupported scheme",
            ),
        ] {
            let err = load(&account(bad)).unwrap_err();
            assert_eq!(err.problems[0].key, "accounts.a.proxy.upstream", "{err}");
            assert!(err.to_string().contains(why), "{bad}: {err}");
            assert!(!err.to_string().contains("pw@"), "{err}");
        }
        let err = load(&account("upstream = \"https://a/\"\nretries = 3")).unwrap_err();
        assert!(
            err.to_string().contains("retries"),
            "unknown keys are named: {err}"
        );
    }
}
