//! Authorization server metadata (RFC 8414, falling back to OpenID Connect Discovery 1.0):
//! fills an account's unset endpoints from its `issuer`. Owns the well-known URLs and the
//! checks on the document (the issuer must match, endpoints follow the config's URL
//! rules); callers decide when to discover and what a failure means.

use reqwest::Url;
use serde_json::Value;

use crate::config::{AccountConfig, check_endpoint_url};
use crate::provider::error::url_origin;
use crate::provider::{ErrorClass, Provider, ProviderError};

/// Why discovery failed. Messages name the origin asked (never a URL's path or query) and
/// never hold a secret.
#[derive(Debug, Clone, thiserror::Error)]
pub enum DiscoveryError {
    #[error("issuer {0:?} cannot be turned into a metadata URL")]
    BadIssuer(String),
    #[error("no metadata at {tried}: {source}")]
    Fetch {
        tried: String,
        #[source]
        source: ProviderError,
    },
    #[error(
        "the metadata at {url} is for issuer {found:?}, not the configured {expected:?} (RFC 8414 §3.3)"
    )]
    IssuerMismatch {
        url: String,
        expected: String,
        found: String,
    },
    #[error("the metadata at {url} has an unusable {key}: {message}")]
    BadValue {
        url: String,
        key: &'static str,
        message: String,
    },
}

impl DiscoveryError {
    /// Whether retrying soon may help (the provider is unwell) or only slowly.
    pub fn class(&self) -> ErrorClass {
        match self {
            DiscoveryError::Fetch { source, .. } => source.class(),
            _ => ErrorClass::Permanent,
        }
    }
}

/// The two places metadata may be, in the order they are tried: RFC 8414 §3.1 (the
/// well-known segment inserted before the issuer's path) and OpenID Connect Discovery
/// §4 (appended to the issuer).
pub fn metadata_urls(issuer: &str) -> Result<[Url; 2], DiscoveryError> {
    let bad = || DiscoveryError::BadIssuer(issuer.to_string());
    let url = Url::parse(issuer).map_err(|_| bad())?;
    let path = url.path().trim_end_matches('/');
    let with_path = |p: String| {
        let mut u = url.clone();
        u.set_path(&p);
        u.set_query(None);
        u
    };
    Ok([
        with_path(format!("/.well-known/oauth-authorization-server{path}")),
        with_path(format!("{path}/.well-known/openid-configuration")),
    ])
}

/// Fetches the issuer's metadata and returns `account` with every endpoint it left unset
/// filled in (explicit values win), and `scopes_supported`. An account without `issuer`
/// is returned as it is.
pub async fn discover(
    provider: &Provider,
    account: &AccountConfig,
) -> Result<AccountConfig, DiscoveryError> {
    let Some(issuer) = account.endpoints.issuer.clone() else {
        return Ok(account.clone());
    };
    let [rfc8414, oidc] = metadata_urls(&issuer)?;
    let (url, document) = match provider.get_json(account, &rfc8414).await {
        Ok(doc) => (rfc8414, doc),
        // Not there (or not JSON): try the OpenID location. A transport failure or a
        // timeout would fail there too, and says more about the first URL.
        Err(first @ (ProviderError::Http { .. } | ProviderError::Malformed(_))) => {
            match provider.get_json(account, &oidc).await {
                Ok(doc) => (oidc, doc),
                Err(source) => {
                    let source = match source {
                        ProviderError::Http { status: 404, .. } => first,
                        other => other,
                    };
                    return Err(DiscoveryError::Fetch {
                        tried: format!(
                            "{} (neither its RFC 8414 nor its OpenID Connect well-known URL)",
                            url_origin(rfc8414.as_str())
                        ),
                        source,
                    });
                }
            }
        }
        Err(source) => {
            return Err(DiscoveryError::Fetch {
                tried: format!(
                    "{} (its RFC 8414 well-known URL)",
                    url_origin(rfc8414.as_str())
                ),
                source,
            });
        }
    };
    apply(account, &issuer, url.as_str(), &document)
}

/// Checks a metadata document and fills `account` from it.
pub fn apply(
    account: &AccountConfig,
    issuer: &str,
    url: &str,
    document: &serde_json::Map<String, Value>,
) -> Result<AccountConfig, DiscoveryError> {
    let found = document.get("issuer").and_then(Value::as_str).unwrap_or("");
    let url = &url_origin(url);
    if found != issuer {
        return Err(DiscoveryError::IssuerMismatch {
            url: url.to_string(),
            expected: issuer.to_string(),
            found: found.to_string(),
        });
    }
    let allow_http = account.endpoints.allow_insecure_http;
    let endpoint = |key: &'static str| -> Result<Option<Url>, DiscoveryError> {
        match document.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => {
                check_endpoint_url(s, allow_http)
                    .map(Some)
                    .map_err(|m| DiscoveryError::BadValue {
                        url: url.to_string(),
                        key,
                        message: m,
                    })
            }
            Some(_) => Err(DiscoveryError::BadValue {
                url: url.to_string(),
                key,
                message: "not a string".into(),
            }),
        }
    };
    let mut out = account.clone();
    let e = &mut out.endpoints;
    if out.token_url.is_none() {
        out.token_url = endpoint("token_endpoint")?;
    }
    if e.authorization.is_none() {
        e.authorization = endpoint("authorization_endpoint")?.map(Box::new);
    }
    if e.device_authorization.is_none() {
        e.device_authorization = endpoint("device_authorization_endpoint")?.map(Box::new);
    }
    if e.revocation.is_none() {
        e.revocation = endpoint("revocation_endpoint")?.map(Box::new);
    }
    e.scopes_supported = document
        .get("scopes_supported")
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(Value::as_str)
                .map(str::to_string)
                .collect()
        });
    if out.token_url.is_none() {
        return Err(DiscoveryError::BadValue {
            url: url.to_string(),
            key: "token_endpoint",
            message: "missing, and no token_url is configured".into(),
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metadata_urls_insert_the_well_known_segment_before_the_issuer_path() {
        let [a, b] = metadata_urls("https://auth.example.com").unwrap();
        assert_eq!(
            a.as_str(),
            "https://auth.example.com/.well-known/oauth-authorization-server"
        );
        assert_eq!(
            b.as_str(),
            "https://auth.example.com/.well-known/openid-configuration"
        );
        // RFC 8414 §3.1's example.
        let [a, b] = metadata_urls("https://example.com/issuer1").unwrap();
        assert_eq!(
            a.as_str(),
            "https://example.com/.well-known/oauth-authorization-server/issuer1"
        );
        assert_eq!(
            b.as_str(),
            "https://example.com/issuer1/.well-known/openid-configuration"
        );
        let [a, _] = metadata_urls("https://example.com/tenant/").unwrap();
        assert_eq!(
            a.as_str(),
            "https://example.com/.well-known/oauth-authorization-server/tenant"
        );
    }
}
