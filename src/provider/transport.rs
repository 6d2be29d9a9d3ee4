//! How a request's bytes reach the provider and its answer comes back, no larger than a
//! limit: real HTTP(S) ([`HttpClients`]) or an in-process router. It neither reads the
//! answer nor bounds the time; the [`Provider`](super::Provider) does both.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::header::{ACCEPT, USER_AGENT};
use http::{HeaderMap, StatusCode};
use http_body_util::BodyExt;
use reqwest::Url;
use tower::ServiceExt;

use super::error::{ProviderError, client_error, transport_error};
use super::request::PreparedRequest;
use crate::config::{AccountConfig, CaBundle, TlsIdentity};

/// How request bytes reach the provider: real HTTP, or an in-process router (the demo's
/// embedded provider in tests that run on tokio's paused clock, where real sockets and
/// virtual time do not mix).
#[derive(Clone)]
pub enum Transport {
    Http(Arc<HttpClients>),
    InProcess(axum::Router),
}

/// An answer as it came: status, headers, body.
pub(super) type RawResponse = (StatusCode, HeaderMap, Vec<u8>);

impl Transport {
    /// POSTs `request`, or GETs without one, and reads at most `limit` bytes of answer.
    pub(super) async fn send(
        &self,
        account: &AccountConfig,
        url: &Url,
        request: Option<&PreparedRequest>,
        limit: usize,
    ) -> Result<RawResponse, ProviderError> {
        match self {
            Transport::Http(clients) => {
                let client = clients.client(account)?;
                send_http(&client, url, request, limit).await
            }
            Transport::InProcess(router) => send_in_process(router, url, request, limit).await,
        }
    }
}

/// One HTTPS client per trust setting: the system's roots, or those plus an account's
/// extra CA bundle (`ca_file`), with or without a TLS client identity
/// (`client_certificate` + `client_key`, RFC 8705); each built on first use and kept so
/// connections are reused. A client holds at most one identity, so an identity is never
/// presented for an account that did not configure it. Token requests and the proxy's
/// upstream calls both take their clients here.
pub struct HttpClients {
    connect_timeout: Duration,
    /// `(None, None)`: the system's roots only, no identity.
    clients: Mutex<HashMap<ClientKey, reqwest::Client>>,
}

/// What sets a client apart: extra trust roots and a client identity.
type ClientKey = (Option<Arc<CaBundle>>, Option<Arc<TlsIdentity>>);

impl HttpClients {
    pub fn new(connect_timeout: Duration) -> HttpClients {
        HttpClients {
            connect_timeout,
            clients: Mutex::new(HashMap::new()),
        }
    }

    fn builder(connect_timeout: Duration) -> reqwest::ClientBuilder {
        // Redirects are not followed: a request carries credentials and must go only
        // where the config says (a proxied API's redirect goes back to its consumer).
        reqwest::Client::builder()
            .connect_timeout(connect_timeout)
            .redirect(reqwest::redirect::Policy::none())
            .pool_idle_timeout(Duration::from_secs(90))
    }

    /// Builds the system roots' client now: without a usable TLS setup (no CA
    /// certificates installed) the daemon should not start.
    pub fn check(&self) -> Result<(), ProviderError> {
        self.client_for((None, None)).map(drop)
    }

    /// The client for `account`'s trust setting and identity.
    pub fn client(&self, account: &AccountConfig) -> Result<reqwest::Client, ProviderError> {
        self.client_for((account.ca_bundle.clone(), account.tls_identity.clone()))
    }

    fn client_for(&self, key: ClientKey) -> Result<reqwest::Client, ProviderError> {
        let mut cache = self.clients.lock().expect("client cache lock");
        if let Some(c) = cache.get(&key) {
            return Ok(c.clone());
        }
        let mut builder = HttpClients::builder(self.connect_timeout);
        if let Some(bundle) = &key.0 {
            let certs = reqwest::Certificate::from_pem_bundle(&bundle.pem).map_err(|e| {
                ProviderError::Transport(format!("ca_file {}: {e}", bundle.path.display()))
            })?;
            builder = builder.tls_certs_merge(certs);
        }
        if let Some(identity) = &key.1 {
            // Checked when the config loaded; a failure here names the file, not the key.
            let id =
                reqwest::Identity::from_pem(identity.pem.expose().as_bytes()).map_err(|_| {
                    ProviderError::Transport(format!(
                        "the client certificate {} and its key cannot be used for TLS",
                        identity.certificate_path.display()
                    ))
                })?;
            builder = builder.identity(id);
        }
        let client = builder.build().map_err(|e| client_error(&e))?;
        cache.insert(key, client.clone());
        Ok(client)
    }
}

async fn send_http(
    client: &reqwest::Client,
    url: &Url,
    request: Option<&PreparedRequest>,
    limit: usize,
) -> Result<RawResponse, ProviderError> {
    let builder = match request {
        Some(request) => client
            .post(url.clone())
            .headers(request.headers.clone())
            .body(request.body.clone()),
        None => client
            .get(url.clone())
            .header(ACCEPT, "application/json")
            .header(USER_AGENT, concat!("tokend/", env!("CARGO_PKG_VERSION"))),
    };
    let mut response = builder.send().await.map_err(|e| transport_error(&e))?;
    let status = response.status();
    let headers = response.headers().clone();
    if response.content_length().is_some_and(|n| n > limit as u64) {
        return Err(ProviderError::TooLarge(limit));
    }
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await.map_err(|e| transport_error(&e))? {
        if body.len() + chunk.len() > limit {
            return Err(ProviderError::TooLarge(limit));
        }
        body.extend_from_slice(&chunk);
    }
    Ok((status, headers, body))
}

async fn send_in_process(
    router: &axum::Router,
    url: &Url,
    request: Option<&PreparedRequest>,
    limit: usize,
) -> Result<RawResponse, ProviderError> {
    let path = match url.query() {
        Some(q) => format!("{}?{q}", url.path()),
        None => url.path().to_string(),
    };
    let req = match request {
        Some(request) => {
            let mut builder = http::Request::post(path);
            for (k, v) in &request.headers {
                builder = builder.header(k, v);
            }
            builder.body(axum::body::Body::from(request.body.clone()))
        }
        None => http::Request::get(path).body(axum::body::Body::empty()),
    }
    .map_err(|e| ProviderError::Transport(e.to_string()))?;
    let response = router
        .clone()
        .oneshot(req)
        .await
        .map_err(|e| ProviderError::Transport(e.to_string()))?;
    let (parts, body) = response.into_parts();
    let body = http_body_util::Limited::new(body, limit)
        .collect()
        .await
        .map_err(|_| ProviderError::TooLarge(limit))?
        .to_bytes()
        .to_vec();
    Ok((parts.status, parts.headers, body))
}
