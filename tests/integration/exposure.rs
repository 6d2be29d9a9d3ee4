//! What a caller without a key, or a page in a browser, can learn from the routes that
//! serve no token (issue 17): every route's Host rules, `/readyz` details and `/metrics`
//! behind keys, consumer names kept out of metrics, and URLs reduced to their origin in
//! `last_error`. Requests go through the router with a listener's peer and port, as
//! `listen.rs` tags them; the wire-level cases are in `security.rs`.

use std::net::SocketAddr;
use std::time::Duration;

use axum::body::Body;
use http::{Method, Request, StatusCode};
use serde_json::Value;
use tokend::app::Daemon;
use tokend::clock::Clock;
use tokend::http::Api;
use tokend::listen::Peer;
use tokend::provider::discovery;
use tokend::provider::{Provider, Transport};
use tokend::store::FileStore;
use tower::Layer as _;

use crate::support::{
    ApiService, Harness, MARK, call, client_credentials_account, free_port, parse_config, provider,
    zywave_account,
};

const LISTENER: &str = "127.0.0.1:8731";

/// The API as a loopback TCP listener on port 8731 serves it.
fn on_listener(api: &Api) -> impl ApiService + use<> {
    let port = LISTENER.parse::<SocketAddr>().unwrap().port();
    // What the listener adds to every request it accepts.
    axum::Extension(tokend::listen::LocalPort(port)).layer(api.clone())
}

/// `method uri` with `headers`, from `peer`.
fn from(peer: Peer, method: Method, uri: &str, headers: &[(&str, &str)]) -> Request<Body> {
    let mut req = crate::support::request(method, uri, headers, Body::empty());
    req.extensions_mut().insert(peer);
    req
}

fn loopback_peer() -> Peer {
    Peer::Tcp("127.0.0.1:40000".parse::<SocketAddr>().unwrap())
}

async fn status(api: &impl ApiService, req: Request<Body>) -> StatusCode {
    call(api, req).await.0
}

async fn json(api: &impl ApiService, req: Request<Body>) -> (StatusCode, Value, String) {
    let (status, _, body) = call(api, req).await;
    let text = String::from_utf8_lossy(&body).to_string();
    (
        status,
        serde_json::from_str(&text).unwrap_or_default(),
        text,
    )
}

/// Every route, as an honest local caller would ask for it.
const ROUTES: [(Method, &str); 7] = [
    (Method::GET, "/v1/token/zy"),
    (Method::GET, "/v1/token/zy/access_token"),
    (Method::POST, "/v1/accounts/zy/refresh"),
    (Method::GET, "/v1/accounts"),
    (Method::GET, "/healthz"),
    (Method::GET, "/readyz"),
    (Method::GET, "/metrics"),
];

#[tokio::test(start_paused = true)]
async fn every_route_refuses_a_host_that_does_not_name_this_daemon() {
    let (h, _) = Harness::zywave(Duration::from_secs(3600)).await;
    let api = on_listener(&h.api);
    for (method, uri) in ROUTES.iter().cloned().chain([(Method::GET, "/nowhere")]) {
        let ask = |headers: &[(&str, &str)]| {
            let headers: Vec<_> = [MARK].iter().chain(headers).copied().collect();
            from(loopback_peer(), method.clone(), uri, &headers)
        };
        // DNS rebinding, another port (a local proxy), no port (port 80).
        for host in [
            "evil.example:8731",
            "localhost:8732",
            "localhost",
            "127.0.0.1:80",
        ] {
            let (code, body, _) = json(&api, ask(&[("Host", host)])).await;
            assert_eq!(code, StatusCode::FORBIDDEN, "{method} {uri} Host {host}");
            assert!(body["error_description"].as_str().unwrap().contains("Host"));
        }
        for twice in [
            [("Host", "localhost:8731"), ("Host", "evil.example:8731")],
            [("Host", "evil.example:8731"), ("Host", "localhost:8731")],
            [("Host", "localhost:8731"), ("Host", "localhost:8731")],
        ] {
            let code = status(&api, ask(&twice)).await;
            assert_eq!(code, StatusCode::BAD_REQUEST, "{method} {uri} {twice:?}");
        }
        assert_eq!(
            status(&api, ask(&[])).await,
            StatusCode::BAD_REQUEST,
            "{uri}"
        );
        // The authority of a request in absolute form is a Host too.
        let absolute = format!("http://evil.example:8731{uri}");
        let req = from(
            loopback_peer(),
            method.clone(),
            &absolute,
            &[MARK, ("Host", "localhost:8731")],
        );
        assert_eq!(status(&api, req).await, StatusCode::FORBIDDEN, "{absolute}");

        for host in ["localhost:8731", "127.0.0.1:8731", "[::1]:8731"] {
            // Past the guards (a forced refresh may still be told to wait: 503).
            let code = status(&api, ask(&[("Host", host)])).await;
            let passed = code.is_success()
                || code == StatusCode::SERVICE_UNAVAILABLE
                || (uri == "/nowhere" && code == StatusCode::NOT_FOUND);
            assert!(passed, "{method} {uri} Host {host}: {code}");
        }
    }
    // A Unix socket has no host: a client's usual `Host: localhost` passes there.
    let unix = Peer::Unix { uid: 1, gid: 1 };
    let req = from(
        unix,
        Method::GET,
        "/v1/token/zy",
        &[MARK, ("Host", "localhost")],
    );
    assert_eq!(status(&api, req).await, StatusCode::OK);
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn proxy_and_cross_site_headers_are_refused_on_token_and_account_routes() {
    let (h, _) = Harness::zywave(Duration::from_secs(3600)).await;
    let api = on_listener(&h.api);
    let host = ("Host", "127.0.0.1:8731");
    for uri in ["/v1/token/zy", "/v1/accounts"] {
        for (header, value) in [
            ("X-Real-IP", "203.0.113.9"),
            ("X-Forwarded-Host", "tokens.example"),
            ("Via", "1.1 proxy"),
            ("True-Client-IP", "203.0.113.9"),
            ("Sec-Fetch-Site", "cross-site"),
            ("Sec-Fetch-Site", "same-site"),
        ] {
            let req = from(
                loopback_peer(),
                Method::GET,
                uri,
                &[MARK, host, (header, value)],
            );
            let (code, body, _) = json(&api, req).await;
            assert_eq!(code, StatusCode::FORBIDDEN, "{uri} {header}: {value}");
            assert!(body.get("access_token").is_none());
            let why = body["error_description"].as_str().unwrap();
            assert!(why.contains(header), "{why}");
        }
        // The user's own navigation, or a page tokend served, is not a foreign site.
        for value in ["none", "same-origin"] {
            let headers = [MARK, host, ("Sec-Fetch-Site", value)];
            let req = from(loopback_peer(), Method::GET, uri, &headers);
            assert_eq!(status(&api, req).await, StatusCode::OK, "{uri} {value}");
        }
    }
    h.stop().await;
}

/// Two accounts, one of which cannot get a token (its seed is unknown to the provider,
/// and its token URL names a tenant), and consumers: `reader` may read `broken` only,
/// `who` (named per test: metrics are process-wide) `zy` only.
fn accounts_and_consumers(seed: &str, server: &str, who: &str) -> String {
    let broken = zywave_account("broken", "unknown-seed-0000").replace(
        "http://127.0.0.1/token",
        "http://127.0.0.1/token?tenant=t-7f3a",
    );
    format!(
        "[server]\n{server}\n{}{broken}\n[consumers.reader]\nkey = \"reader-key-0123456789\"\naccounts = [\"broken\"]\n[consumers.{who}]\nkey = \"other-key-0123456789\"\naccounts = [\"zy\"]\n",
        zywave_account("zy", seed)
    )
}

async fn harness(server: &str, who: &str) -> Harness {
    let clock = Clock::system();
    let fake = provider(&clock, Duration::from_secs(3600));
    let seed = fake.grant_refresh_token("zy-client", None);
    let dir = tempfile::tempdir().unwrap();
    let text = format!(
        "[state]\ndir = \"{}\"\n{}",
        dir.path().join("state").display(),
        accounts_and_consumers(&seed, server, who)
    );
    let h = Harness::builder(fake, clock, dir)
        .start(parse_config(&text))
        .await;
    h.settle(Duration::from_secs(10)).await;
    h
}

fn readyz(key: Option<&str>) -> Request<Body> {
    let bearer = key.map(|k| format!("Bearer {k}"));
    let mut headers = vec![("Host", "localhost:8731")];
    if let Some(b) = &bearer {
        headers.push(("Authorization", b));
    }
    from(loopback_peer(), Method::GET, "/readyz", &headers)
}

#[tokio::test]
async fn without_a_key_readyz_says_only_whether_it_is_ready() {
    let h = harness("", "other").await;
    let api = on_listener(&h.api);
    let (code, body, text) = json(&api, readyz(None)).await;
    assert_eq!(code, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(body, serde_json::json!({ "ready": false }), "{text}");

    // A consumer learns about the accounts it may read, and only those.
    let (code, body, _) = json(&api, readyz(Some("reader-key-0123456789"))).await;
    assert_eq!(code, StatusCode::SERVICE_UNAVAILABLE);
    let not_ready = body["not_ready"].as_array().unwrap();
    assert_eq!(not_ready.len(), 1, "{body}");
    assert_eq!(not_ready[0]["account"], "broken");
    assert!(not_ready[0]["last_error"].is_string(), "{body}");
    let (_, body, _) = json(&api, readyz(Some("other-key-0123456789"))).await;
    assert_eq!(body["ready"], false);
    assert_eq!(body["not_ready"], serde_json::json!([]), "{body}");

    // A wrong key is no key: a probe's answer never depends on one.
    let (code, body, _) = json(&api, readyz(Some("wrong-key"))).await;
    assert_eq!(code, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(body, serde_json::json!({ "ready": false }));
    h.stop().await;
}

async fn scrape(api: &impl ApiService, key: Option<&str>) -> (StatusCode, http::HeaderMap, String) {
    let bearer = key.map(|k| format!("Bearer {k}"));
    let mut headers = vec![("Host", "localhost:8731")];
    if let Some(b) = &bearer {
        headers.push(("Authorization", b));
    }
    let req = from(loopback_peer(), Method::GET, "/metrics", &headers);
    let (code, headers, body) = call(api, req).await;
    (code, headers, String::from_utf8(body).unwrap())
}

/// Reads a token of `zy` as the consumer `who` and returns the scrape that follows.
async fn read_then_scrape(api: &impl ApiService, metrics_key: Option<&str>) -> String {
    let req = from(
        loopback_peer(),
        Method::GET,
        "/v1/token/zy",
        &[
            MARK,
            ("Host", "localhost:8731"),
            ("Authorization", "Bearer other-key-0123456789"),
        ],
    );
    assert_eq!(status(api, req).await, StatusCode::OK);
    let (code, _, body) = scrape(api, metrics_key).await;
    assert_eq!(code, StatusCode::OK);
    body
}

#[tokio::test]
async fn metrics_can_require_a_key_and_name_no_consumer_unless_asked() {
    let dir = tempfile::tempdir().unwrap();
    let key_file = dir.path().join("metrics.key");
    std::fs::write(&key_file, "scrape-key-0123456789\n").unwrap();
    let server = format!("metrics_key = {{ file = \"{}\" }}", key_file.display());
    let h = harness(&server, "unnamed-consumer-4e1").await;
    let api = on_listener(&h.api);
    for key in [None, Some("wrong"), Some("other-key-0123456789")] {
        let (code, headers, body) = scrape(&api, key).await;
        assert_eq!(code, StatusCode::UNAUTHORIZED, "{key:?}");
        assert_eq!(headers["www-authenticate"], "Bearer");
        assert!(!body.contains("tokend_"), "{body}");
    }
    let body = read_then_scrape(&api, Some("scrape-key-0123456789")).await;
    assert!(body.contains("tokend_token_reads_total"), "{body}");
    // Consumers are not named: their reads count under `-`.
    assert!(!body.contains("unnamed-consumer-4e1"), "{body}");
    assert!(body.contains("consumer=\"-\""), "{body}");
    h.stop().await;

    let h = harness("metrics_consumer_labels = true", "named-consumer-4e1").await;
    let api = on_listener(&h.api);
    let body = read_then_scrape(&api, None).await;
    assert!(body.contains("consumer=\"named-consumer-4e1\""), "{body}");
    h.stop().await;
}

#[test]
fn an_unreadable_metrics_key_is_a_config_error_naming_it() {
    let err = tokend::config::Config::from_str_at(
        "[server]\nmetrics_key = { file = \"/nonexistent/metrics.key\" }\n",
        std::path::Path::new("t.toml"),
        &tokend::config::SystemEnvironment,
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("server.metrics_key"), "{err}");
    assert!(err.contains("/nonexistent/metrics.key"), "{err}");
}

/// The path and query of a token URL (a tenant, say) are not shown to readers of
/// `last_error`: a transport failure names the origin only.
#[tokio::test]
async fn a_transport_error_names_the_origin_not_the_path_or_query() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!(
        "http://127.0.0.1:{}/tenant-7f3a/oauth2/token?tenant=t-7f3a",
        free_port()
    );
    let text = format!(
        "[state]\ndir = \"{}\"\n[provider]\nconnect_timeout = \"300ms\"\n{}",
        dir.path().join("state").display(),
        client_credentials_account("cc").replace("http://127.0.0.1/token", &url)
    );
    let config = parse_config(&text);
    let provider = Provider::http(Duration::from_millis(300)).unwrap();
    let store = FileStore::open(&config.state.dir).unwrap();
    let daemon = Daemon::start(config, store, provider, Clock::system()).await;
    let api = on_listener(&daemon.api());
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let last_error = loop {
        let req = from(
            loopback_peer(),
            Method::GET,
            "/v1/accounts",
            &[("Host", "localhost:8731")],
        );
        let (_, body, _) = json(&api, req).await;
        if let Some(e) = body["accounts"][0]["last_error"].as_str() {
            break e.to_string();
        }
        assert!(tokio::time::Instant::now() < deadline, "no error yet");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let origin = url.split("/tenant").next().unwrap();
    assert!(last_error.contains(origin), "{last_error}");
    assert!(!last_error.contains("7f3a"), "{last_error}");
    let (_, _, readyz) = json(&api, readyz(None)).await;
    assert!(!readyz.contains("7f3a"), "{readyz}");
    daemon.shutdown().await;
}

#[tokio::test]
async fn a_discovery_error_names_the_origin_not_the_issuer_path() {
    let clock = Clock::system();
    let fake = provider(&clock, Duration::from_secs(3600));
    fake.set_metadata_available(false);
    let text = "[accounts.zy]\ngrant = \"refresh_token\"\nissuer = \"https://login.example/tenant-7f3a\"\nclient_id = \"zy-client\"\nclient_secret = \"zy-secret\"\n";
    let config = parse_config(text);
    let account = config.accounts.values().next().unwrap();
    let provider = Provider::new(Transport::InProcess(fake.router()));
    let err = discovery::discover(&provider, account)
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("https://login.example:443"), "{err}");
    assert!(!err.contains("7f3a"), "{err}");
}
