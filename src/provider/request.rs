//! What tokend sends the provider: the grants ([`TokenGrant`]) and the encoded request,
//! with the account's client authentication (RFC 6749 §2.3.1) and body format. It does
//! not send it.

use base64::Engine as _;
use http::header::{ACCEPT, AUTHORIZATION, CONTENT_TYPE, USER_AGENT};
use http::{HeaderMap, HeaderValue};
use reqwest::Url;
use serde_json::Value;
use zeroize::Zeroize;

use super::assertion::CLIENT_ASSERTION_TYPE;
use super::error::ProviderError;
use crate::config::{AccountConfig, ClientAuth, RequestFormat};
use crate::secret::Secret;

/// What tokend asks the token endpoint for.
#[derive(Debug, Clone, Copy)]
pub enum TokenGrant<'a> {
    /// RFC 6749 §6.
    RefreshToken(&'a Secret),
    /// RFC 6749 §4.4.
    ClientCredentials,
    /// RFC 6749 §4.1.3, with the PKCE verifier of RFC 7636 §4.5.
    AuthorizationCode {
        code: &'a Secret,
        redirect_uri: &'a str,
        code_verifier: &'a Secret,
    },
    /// RFC 8628 §3.4.
    DeviceCode(&'a Secret),
    /// RFC 7523 §2.1: the account's `jwt_bearer` assertion, made for each request.
    JwtBearer,
}

/// RFC 8628 §3.4's grant type.
pub const DEVICE_CODE_GRANT: &str = "urn:ietf:params:oauth:grant-type:device_code";
/// RFC 7523 §2.1's grant type.
pub const JWT_BEARER_GRANT: &str = "urn:ietf:params:oauth:grant-type:jwt-bearer";

impl TokenGrant<'_> {
    pub fn as_str(&self) -> &'static str {
        match self {
            TokenGrant::RefreshToken(_) => "refresh_token",
            TokenGrant::ClientCredentials => "client_credentials",
            TokenGrant::AuthorizationCode { .. } => "authorization_code",
            TokenGrant::DeviceCode(_) => DEVICE_CODE_GRANT,
            TokenGrant::JwtBearer => JWT_BEARER_GRANT,
        }
    }

    /// The grant's own parameters, `grant_type` first.
    pub(super) fn params(&self) -> Vec<(&'static str, &str)> {
        let mut params = vec![("grant_type", self.as_str())];
        match self {
            TokenGrant::RefreshToken(rt) => params.push(("refresh_token", rt.expose())),
            TokenGrant::ClientCredentials => {}
            TokenGrant::AuthorizationCode {
                code,
                redirect_uri,
                code_verifier,
            } => {
                params.push(("code", code.expose()));
                params.push(("redirect_uri", redirect_uri));
                params.push(("code_verifier", code_verifier.expose()));
            }
            TokenGrant::DeviceCode(dc) => params.push(("device_code", dc.expose())),
            // The assertion is made at send time (it is dated): `Provider::request_token_in`.
            TokenGrant::JwtBearer => {}
        }
        params
    }

    /// The secrets the grant carries, scrubbed from any error text.
    pub(super) fn secrets(&self) -> Vec<&Secret> {
        match self {
            TokenGrant::RefreshToken(rt) => vec![rt],
            TokenGrant::ClientCredentials | TokenGrant::JwtBearer => vec![],
            TokenGrant::AuthorizationCode {
                code,
                code_verifier,
                ..
            } => vec![code, code_verifier],
            TokenGrant::DeviceCode(dc) => vec![dc],
        }
    }

    /// The configured scope goes with the grants that request one (RFC 6749 §4.4.2,
    /// §6); the code and device grants carry the scope their authorization fixed.
    /// A `jwt_bearer` grant from a key file carries it in the assertion instead.
    pub(super) fn sends_scope(&self) -> bool {
        matches!(
            self,
            TokenGrant::RefreshToken(_) | TokenGrant::ClientCredentials | TokenGrant::JwtBearer
        )
    }
}

pub(super) fn token_url(account: &AccountConfig) -> Result<&Url, ProviderError> {
    account
        .token_url
        .as_ref()
        .ok_or(ProviderError::NoEndpoint("token_url"))
}

/// A request ready to send: the body holds secrets and is zeroized after use.
pub(super) struct PreparedRequest {
    pub(super) headers: HeaderMap,
    pub(super) body: Vec<u8>,
}

/// Adds the account's client authentication (with `assertion`, its client assertion) (and, with `extra`, its `extra_params`) to
/// `params` and encodes them in the account's request format.
pub(super) fn build_request<'a>(
    account: &'a AccountConfig,
    mut params: Vec<(&'a str, &'a str)>,
    extra: bool,
    assertion: Option<&'a Secret>,
) -> PreparedRequest {
    let mut headers = HeaderMap::new();
    match account.client_auth {
        // RFC 7523 §2.2; `client_id` too, which OIDC Core §9 allows and some providers
        // (Entra ID) want.
        ClientAuth::PrivateKeyJwt | ClientAuth::ClientSecretJwt => {
            params.push(("client_id", &account.client_id));
            if let Some(assertion) = assertion {
                params.push(("client_assertion_type", CLIENT_ASSERTION_TYPE));
                params.push(("client_assertion", assertion.expose()));
            }
        }
        // A jwt_bearer account may be no client at all (RFC 7523 §2.1).
        ClientAuth::ClientSecretPost if account.client_id.is_empty() => {}
        ClientAuth::ClientSecretPost => {
            params.push(("client_id", &account.client_id));
            if let Some(secret) = &account.client_secret {
                params.push(("client_secret", secret.expose()));
            }
        }
        ClientAuth::ClientSecretBasic => {
            let secret = account.client_secret.as_ref().map_or("", |s| s.expose());
            headers.insert(AUTHORIZATION, basic_auth(&account.client_id, secret));
        }
        // RFC 8705 §2: the certificate in the handshake authenticates; the body names
        // the client, and carries no secret.
        ClientAuth::TlsClientAuth | ClientAuth::SelfSignedTlsClientAuth => {
            params.push(("client_id", &account.client_id));
        }
    }
    if extra {
        for (k, v) in &account.extra_params {
            params.push((k, v));
        }
    }
    let body = match account.request_format {
        RequestFormat::Form => {
            headers.insert(
                CONTENT_TYPE,
                HeaderValue::from_static("application/x-www-form-urlencoded"),
            );
            form_urlencoded::Serializer::new(String::new())
                .extend_pairs(params.iter())
                .finish()
                .into_bytes()
        }
        RequestFormat::Json => {
            headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
            let object: serde_json::Map<String, Value> = params
                .iter()
                .map(|(k, v)| (k.to_string(), Value::String(v.to_string())))
                .collect();
            let bytes = serde_json::to_vec(&object).expect("a string map serializes");
            // The map's strings hold copies of secrets.
            for (_, v) in object {
                if let Value::String(mut s) = v {
                    s.zeroize();
                }
            }
            bytes
        }
    };
    headers.insert(ACCEPT, HeaderValue::from_static("application/json"));
    headers.insert(
        USER_AGENT,
        HeaderValue::from_static(concat!("tokend/", env!("CARGO_PKG_VERSION"))),
    );
    PreparedRequest { headers, body }
}

/// RFC 6749 §2.3.1: id and secret are each form-urlencoded, joined by `:`, then base64.
fn basic_auth(client_id: &str, secret: &str) -> HeaderValue {
    let encode = |s: &str| form_urlencoded::byte_serialize(s.as_bytes()).collect::<String>();
    let mut joined = format!("{}:{}", encode(client_id), encode(secret));
    let mut value = format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(joined.as_bytes())
    );
    joined.zeroize();
    let mut header = HeaderValue::from_str(&value).expect("base64 is a valid header value");
    header.set_sensitive(true);
    value.zeroize();
    header
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn basic_auth_form_encodes_id_and_secret() {
        // RFC 6749 §2.3.1: "a b" → "a+b", ":" → "%3A" before base64.
        let header = basic_auth("my client", "p:w");
        let encoded = header.to_str().unwrap().strip_prefix("Basic ").unwrap();
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(encoded)
            .unwrap();
        assert_eq!(decoded, b"my+client:p%3Aw");
        assert!(header.is_sensitive());
    }
}
