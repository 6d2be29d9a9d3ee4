//! The provider client over real loopback HTTP (reqwest): the transport-level faults the
//! in-process transport cannot show — refused connections, a server that never answers,
//! bodies over the limit with and without Content-Length, redirects.

use std::time::Duration;

use tokend::clock::Clock;
use tokend::config::{AccountConfig, Config, SystemEnvironment};
use tokend::demo::fake_provider::{ClientSpec, FakeProvider};
use tokend::provider::{ErrorClass, Provider, ProviderError, TokenGrant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::support::{free_port, serve_fake, token_url};

fn account(token_url: &str) -> AccountConfig {
    let text = format!(
        "[provider]\ntimeout = \"300ms\"\nconnect_timeout = \"300ms\"\n[accounts.a]\ngrant = \"client_credentials\"\ntoken_url = \"{token_url}\"\nclient_id = \"cc-client\"\nclient_secret = \"cc-secret\"\n"
    );
    let config =
        Config::from_str_at(&text, std::path::Path::new("t.toml"), &SystemEnvironment).unwrap();
    (**config.accounts.values().next().unwrap()).clone()
}

async fn request(url: &str) -> Result<tokend::provider::TokenResponse, ProviderError> {
    let account = account(url);
    let provider = Provider::http(account.limits.connect_timeout).unwrap();
    provider
        .request_token(&account, TokenGrant::ClientCredentials)
        .await
}

/// A TCP server that answers every connection with `response` (or never, if `None`).
async fn raw_server(response: Option<Vec<u8>>) -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            let response = response.clone();
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                let _ = socket.read(&mut buf).await;
                match response {
                    Some(bytes) => {
                        let _ = socket.write_all(&bytes).await;
                    }
                    // Hold the connection open without a word, until the test ends.
                    None => std::future::pending::<()>().await,
                }
            });
        }
    });
    addr
}

/// A fake provider that knows the client of `account`, issuing 60 s tokens, served on
/// 127.0.0.1; returns it and its token URL.
async fn cc_provider() -> (FakeProvider, String) {
    let fake = FakeProvider::new(Duration::from_secs(60), Clock::system());
    fake.register(ClientSpec::generic_client_credentials(
        "cc-client",
        "cc-secret",
    ));
    let (addr, _) = serve_fake(&fake).await;
    (fake, token_url(addr))
}

#[tokio::test]
async fn a_real_exchange_works_over_http() {
    let (fake, url) = cc_provider().await;
    let token = request(&url).await.unwrap();
    assert!(fake.is_valid_access_token(token.access_token.expose()));
    assert_eq!(token.expires_in, Some(Duration::from_secs(60)));
}

#[tokio::test]
async fn a_refused_connection_is_transient() {
    let port = free_port();
    let err = request(&format!("http://127.0.0.1:{port}/token"))
        .await
        .unwrap_err();
    assert!(matches!(err, ProviderError::Transport(_)), "{err}");
    assert_eq!(err.class(), ErrorClass::Transient);
    assert!(
        err.to_string().to_lowercase().contains("refused"),
        "the cause is named: {err}"
    );
}

#[tokio::test]
async fn a_server_that_never_answers_times_out() {
    let addr = raw_server(None).await;
    let err = request(&format!("http://{addr}/token")).await.unwrap_err();
    assert!(matches!(err, ProviderError::Timeout(_)), "{err}");
    assert_eq!(err.class(), ErrorClass::Transient);
}

#[tokio::test]
async fn oversized_bodies_are_cut_off_with_or_without_content_length() {
    let big = format!(
        "{{\"access_token\":\"x\",\"pad\":\"{}\"}}",
        "y".repeat(300 * 1024)
    );
    let with_length = format!(
        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{big}",
        big.len()
    );
    let chunked = format!(
        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n{:x}\r\n{big}\r\n0\r\n\r\n",
        big.len()
    );
    for response in [with_length, chunked] {
        let addr = raw_server(Some(response.into_bytes())).await;
        let err = request(&format!("http://{addr}/token")).await.unwrap_err();
        assert!(matches!(err, ProviderError::TooLarge(_)), "{err}");
    }
}

#[tokio::test]
async fn redirects_are_not_followed_with_credentials() {
    let (fake, target) = cc_provider().await;
    let redirect = format!(
        "HTTP/1.1 307 Temporary Redirect\r\nlocation: {target}\r\ncontent-length: 0\r\n\r\n"
    );
    let addr = raw_server(Some(redirect.into_bytes())).await;
    let err = request(&format!("http://{addr}/token")).await.unwrap_err();
    assert!(
        matches!(err, ProviderError::Http { status: 307, .. }),
        "{err}"
    );
    assert_eq!(
        fake.counts().token_requests,
        0,
        "the credentials never reached the redirect target"
    );
}

/// An `https://` token URL pointed at a server that speaks plain HTTP: the message names
/// the handshake, the host and port, and the likely cause, not rustls' internals.
#[tokio::test]
async fn tls_to_a_plain_http_port_says_so() {
    let addr = raw_server(Some(
        b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\n".to_vec(),
    ))
    .await;
    let err = request(&format!("https://{addr}/token")).await.unwrap_err();
    let text = err.to_string();
    assert!(matches!(err, ProviderError::Transport(_)), "{err}");
    assert_eq!(err.class(), ErrorClass::Transient);
    assert!(
        text.contains(&format!("TLS handshake with {addr} failed")),
        "{text}"
    );
    assert!(text.contains("the port may speak plain HTTP"), "{text}");
    assert!(
        !text.contains("InvalidContentType"),
        "no rustls internals: {text}"
    );
}
