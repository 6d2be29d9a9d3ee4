//! The config file's shape, exactly as TOML: unknown keys are errors, nothing else is
//! checked here (that is `validate`'s job).

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;
use serde::de::{self, Deserializer, MapAccess, Visitor};
use toml::Spanned;

use crate::config::{ClientAuth, LogFormat, OnShutdown, RequestFormat, SinkFormat};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawConfig {
    #[serde(default)]
    pub(super) server: RawServer,
    #[serde(default)]
    pub(super) state: RawState,
    #[serde(default)]
    pub(super) refresh: RawRefresh,
    #[serde(default)]
    pub(super) provider: RawProvider,
    #[serde(default)]
    pub(super) log: RawLog,
    #[serde(default)]
    pub(super) consumers: BTreeMap<String, Spanned<RawConsumer>>,
    #[serde(default)]
    pub(super) accounts: BTreeMap<String, Spanned<RawAccount>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawServer {
    pub(super) listen: Option<Spanned<Vec<Spanned<String>>>>,
    #[serde(default)]
    pub(super) allow_remote: bool,
    pub(super) socket_mode: Option<Spanned<String>>,
    pub(super) socket_group: Option<Spanned<String>>,
    pub(super) metrics_key: Option<Spanned<RawSecret>>,
    #[serde(default)]
    pub(super) metrics_consumer_labels: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawConsumer {
    pub(super) key: Option<Spanned<RawSecret>>,
    pub(super) key_sha256: Option<Spanned<String>>,
    pub(super) uid: Option<u32>,
    pub(super) gid: Option<u32>,
    pub(super) accounts: Spanned<Vec<String>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawLog {
    pub(super) format: Option<LogFormat>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawState {
    pub(super) backend: Option<Spanned<String>>,
    pub(super) dir: Option<Spanned<String>>,
    pub(super) url: Option<Spanned<RawSecret>>,
    pub(super) endpoints: Option<Spanned<Vec<Spanned<String>>>>,
    pub(super) prefix: Option<Spanned<String>>,
    pub(super) lease_ttl: Option<Spanned<RawDuration>>,
    pub(super) node_id: Option<Spanned<String>>,
    pub(super) ca_file: Option<Spanned<String>>,
    pub(super) client_certificate: Option<Spanned<String>>,
    pub(super) client_key: Option<Spanned<RawSecret>>,
    pub(super) encryption_key: Option<Spanned<RawSecret>>,
    #[serde(default)]
    pub(super) previous_encryption_keys: Vec<Spanned<RawSecret>>,
}

#[derive(Deserialize, Default, Clone)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRefresh {
    pub(super) ratio: Option<Spanned<f64>>,
    pub(super) jitter: Option<Spanned<f64>>,
    pub(super) margin: Option<Spanned<RawDuration>>,
    pub(super) default_lifetime: Option<Spanned<RawDuration>>,
    pub(super) min_interval: Option<Spanned<RawDuration>>,
    pub(super) backoff_initial: Option<Spanned<RawDuration>>,
    pub(super) backoff_max: Option<Spanned<RawDuration>>,
    pub(super) slow_retry: Option<Spanned<RawDuration>>,
    pub(super) max_interval: Option<Spanned<RawDuration>>,
}

#[derive(Deserialize, Default, Clone)]
#[serde(deny_unknown_fields)]
pub(super) struct RawProvider {
    pub(super) connect_timeout: Option<Spanned<RawDuration>>,
    pub(super) timeout: Option<Spanned<RawDuration>>,
    pub(super) max_response_bytes: Option<Spanned<u64>>,
    pub(super) max_concurrent_requests: Option<Spanned<u64>>,
    pub(super) max_requests_per_second: Option<Spanned<f64>>,
}

#[derive(Deserialize, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub(super) enum RawGrant {
    RefreshToken,
    ClientCredentials,
    JwtBearer,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawAccount {
    pub(super) grant: RawGrant,
    pub(super) token_url: Option<Spanned<String>>,
    pub(super) issuer: Option<Spanned<String>>,
    pub(super) authorization_endpoint: Option<Spanned<String>>,
    pub(super) device_authorization_endpoint: Option<Spanned<String>>,
    pub(super) revocation_endpoint: Option<Spanned<String>>,
    pub(super) redirect_uri: Option<Spanned<String>>,
    /// Required by every grant but `jwt_bearer`.
    pub(super) client_id: Option<Spanned<String>>,
    pub(super) client_secret: Option<Spanned<RawSecret>>,
    pub(super) client_auth: Option<ClientAuth>,
    pub(super) private_key: Option<Spanned<RawSecret>>,
    pub(super) key_id: Option<Spanned<String>>,
    pub(super) signing_alg: Option<Spanned<String>>,
    pub(super) assertion_audience: Option<Spanned<String>>,
    pub(super) client_assertion: Option<Spanned<RawSecret>>,
    /// RFC 8705: a PEM certificate chain (a path, not a secret) and its key (a secret).
    pub(super) client_certificate: Option<Spanned<String>>,
    pub(super) client_key: Option<Spanned<RawSecret>>,
    pub(super) credentials_file: Option<Spanned<String>>,
    pub(super) assertion_issuer: Option<Spanned<String>>,
    pub(super) assertion_subject: Option<Spanned<String>>,
    pub(super) request_format: Option<RequestFormat>,
    pub(super) scope: Option<Spanned<String>>,
    pub(super) refresh_token: Option<Spanned<RawSecret>>,
    #[serde(default)]
    pub(super) extra_params: BTreeMap<String, Spanned<String>>,
    pub(super) prompt: Option<Spanned<String>>,
    #[serde(default)]
    pub(super) authorize_params: BTreeMap<String, Spanned<String>>,
    #[serde(default)]
    pub(super) headers: BTreeMap<String, Spanned<String>>,
    #[serde(default)]
    pub(super) allow_insecure_http: bool,
    pub(super) ca_file: Option<Spanned<String>>,
    #[serde(default)]
    pub(super) refresh: RawRefresh,
    pub(super) timeout: Option<Spanned<RawDuration>>,
    // Hand-off: Zywave profile header, token files, rotation hook.
    pub(super) profile: Option<Spanned<String>>,
    pub(super) profile_token: Option<Spanned<RawSecret>>,
    #[serde(default)]
    pub(super) sinks: Vec<Spanned<RawSink>>,
    pub(super) on_refresh: Option<Spanned<RawHook>>,
    pub(super) proxy: Option<Spanned<RawProxy>>,
}

/// `[accounts.NAME.proxy]`: the API `/proxy/NAME/…` forwards to.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawProxy {
    pub(super) upstream: Spanned<String>,
    pub(super) timeout: Option<Spanned<RawDuration>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawSink {
    pub(super) path: String,
    #[serde(default)]
    pub(super) format: SinkFormat,
    pub(super) mode: Option<String>,
    #[serde(default)]
    pub(super) on_shutdown: OnShutdown,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawHook {
    pub(super) exec: Option<Vec<String>>,
    pub(super) signal: Option<String>,
    pub(super) pid_file: Option<String>,
    pub(super) timeout: Option<RawDuration>,
}

/// A secret as written: a literal string, `{ env = "NAME" }` or `{ file = "PATH" }`.
#[derive(Clone)]
pub(super) enum RawSecret {
    Literal(String),
    Env(String),
    File(PathBuf),
}

impl<'de> Deserialize<'de> for RawSecret {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = RawSecret;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str(r#"a string, { env = "NAME" } or { file = "PATH" }"#)
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<RawSecret, E> {
                Ok(RawSecret::Literal(v.to_owned()))
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<RawSecret, A::Error> {
                let mut found = None;
                while let Some(key) = map.next_key::<String>()? {
                    let value: String = map.next_value()?;
                    let secret = match key.as_str() {
                        "env" => RawSecret::Env(value),
                        "file" => RawSecret::File(PathBuf::from(value)),
                        other => {
                            return Err(de::Error::unknown_field(other, &["env", "file"]));
                        }
                    };
                    if found.replace(secret).is_some() {
                        return Err(de::Error::custom(
                            "a secret takes exactly one of `env` or `file`",
                        ));
                    }
                }
                found.ok_or_else(|| de::Error::custom("a secret needs `env` or `file`"))
            }
        }
        d.deserialize_any(V)
    }
}

/// A duration as whole seconds (`60`) or a humane string (`"90s"`, `"5m"`, `"1h 30m"`).
#[derive(Clone, Copy)]
pub(super) struct RawDuration(pub(super) Duration);

impl<'de> Deserialize<'de> for RawDuration {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = RawDuration;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str(r#"a duration: whole seconds or a string such as "90s" or "5m""#)
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<RawDuration, E> {
                u64::try_from(v)
                    .map(|s| RawDuration(Duration::from_secs(s)))
                    .map_err(|_| E::custom("a duration cannot be negative"))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<RawDuration, E> {
                humantime::parse_duration(v)
                    .map(RawDuration)
                    .map_err(|e| E::custom(format!("invalid duration {v:?}: {e}")))
            }
        }
        d.deserialize_any(V)
    }
}
