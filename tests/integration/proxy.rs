//! `ANY /proxy/{account}/{path…}` through a real `tokend run`: against the fake provider
//! and an upstream API started here that records what it received. The token is live,
//! the account's headers are there and the consumer's are not; bodies arrive unchanged
//! and stream at constant memory; a 401 costs one refresh and one replay, never a loop;
//! paths cannot climb out of the base; the token routes' guards hold.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::response::{IntoResponse, Response};
use futures_util::StreamExt as _;
use http::{HeaderMap, StatusCode};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::support::*;

/// The consumer allowed to read `zy` (and so to use its proxy), and one allowed only `svc`.
const APP_KEY: &str = "app-consumer-key-0123456789";
const OTHER_KEY: &str = "other-consumer-key-0123456789";

/// What the upstream received, per request.
#[derive(Debug, Clone)]
struct Seen {
    method: String,
    path: String,
    query: Option<String>,
    headers: HeaderMap,
    body_len: u64,
    body_sha256: String,
}

#[derive(Default)]
struct Upstream {
    seen: Mutex<Vec<Seen>>,
    /// Access tokens the upstream answers with 401 `invalid_token`.
    revoked: Mutex<HashSet<String>>,
}

impl Upstream {
    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    fn seen_at(&self, path: &str) -> Vec<Seen> {
        self.seen().into_iter().filter(|s| s.path == path).collect()
    }
}

fn bearer(headers: &HeaderMap) -> String {
    headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or_default()
        .to_string()
}

/// The upstream API under `/base/`: it records every request (the body hashed as it
/// streams in, never held) and answers by the path's first segment.
async fn upstream_api(State(up): State<Arc<Upstream>>, request: Request) -> Response {
    let (parts, body) = request.into_parts();
    let mut hash = Sha256::new();
    let mut len = 0u64;
    let mut stream = body.into_data_stream();
    while let Some(Ok(chunk)) = stream.next().await {
        len += chunk.len() as u64;
        hash.update(&chunk);
    }
    let path = parts.uri.path().to_string();
    let token = bearer(&parts.headers);
    up.seen.lock().unwrap().push(Seen {
        method: parts.method.to_string(),
        path: path.clone(),
        query: parts.uri.query().map(str::to_string),
        headers: parts.headers.clone(),
        body_len: len,
        body_sha256: hex(&hash.finalize()),
    });
    let unauthorized = || {
        (
            StatusCode::UNAUTHORIZED,
            [(
                "www-authenticate",
                "Bearer realm=\"api\", error=\"invalid_token\"",
            )],
            "upstream says no",
        )
            .into_response()
    };
    match path.split('/').nth(2).unwrap_or_default() {
        "always401" => unauthorized(),
        _ if up.revoked.lock().unwrap().contains(&token) => unauthorized(),
        "download" => {
            let total: usize = parts
                .uri
                .query()
                .and_then(|q| q.strip_prefix("bytes="))
                .and_then(|n| n.parse().ok())
                .unwrap_or(0);
            let chunk = Bytes::from(vec![b'x'; 64 * 1024]);
            let chunks = total / chunk.len();
            let body = futures_util::stream::iter(
                (0..chunks).map(move |_| Ok::<_, std::io::Error>(chunk.clone())),
            );
            (
                [("content-length", (chunks * 64 * 1024).to_string())],
                Body::from_stream(body),
            )
                .into_response()
        }
        "redirect" => (StatusCode::FOUND, [("location", "/elsewhere")]).into_response(),
        "slow" => {
            tokio::time::sleep(Duration::from_secs(5)).await;
            "late".into_response()
        }
        _ => (
            [("x-upstream", "1"), ("connection", "keep-alive")],
            axum::Json(json!({ "len": len, "sha256": hex(&hash_of_seen(&up)) })),
        )
            .into_response(),
    }
}

fn hash_of_seen(up: &Upstream) -> Vec<u8> {
    up.seen
        .lock()
        .unwrap()
        .last()
        .unwrap()
        .body_sha256
        .as_bytes()
        .to_vec()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

async fn start_upstream() -> (Arc<Upstream>, SocketAddr) {
    let up = Arc::new(Upstream::default());
    let app = Router::new().fallback(upstream_api).with_state(up.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (up, addr)
}

/// One test's world: a daemon with accounts `zy` (a proxy to the upstream's `/base/`) and `svc` (no proxy), consumers `app` (zy) and `other` (svc),
/// `min_interval` 1 s; the upstream and where it listens.
struct Proxy {
    world: World,
    up: Arc<Upstream>,
    up_addr: SocketAddr,
    daemon: Daemon,
    client: reqwest::Client,
}

impl Proxy {
    async fn start() -> Proxy {
        Proxy::start_with("", "2s").await
    }

    /// `start`, with `extra` config sections (another account's proxy, say) and zy's
    /// proxy `timeout`.
    async fn start_with(extra: &str, timeout: &str) -> Proxy {
        let (up, up_addr) = start_upstream().await;
        let extra = format!(
            "{extra}\n[accounts.zy.proxy]\nupstream = \"http://{up_addr}/base\"\ntimeout = \"{timeout}\"\n\
             \n[consumers.app]\nkey = \"{APP_KEY}\"\naccounts = [\"zy\"]\n\
             \n[consumers.other]\nkey = \"{OTHER_KEY}\"\naccounts = [\"svc\"]\n{FAST_REFRESH}"
        );
        let world = zy_and_svc_world(None, &extra).await;
        let client = reqwest::Client::builder()
            .no_proxy()
            .redirect(reqwest::redirect::Policy::none())
            .timeout(Duration::from_secs(30))
            .build()
            .unwrap();
        let daemon = world.setup.start_ready(&client).await;
        Proxy {
            world,
            up,
            up_addr,
            daemon,
            client,
        }
    }

    /// A request to `/proxy/zy/{path}` as consumer `app` sends it.
    fn request(&self, method: http::Method, path: &str) -> reqwest::RequestBuilder {
        self.client
            .request(method, self.daemon.url(&format!("/proxy/zy/{path}")))
            .header("Tokend-Request", "1")
            .bearer_auth(APP_KEY)
    }

    async fn get(&self, path: &str) -> reqwest::Response {
        self.request(http::Method::GET, path).send().await.unwrap()
    }

    async fn token(&self) -> String {
        let body: Value = self
            .client
            .get(self.daemon.url("/v1/token/zy"))
            .header("Tokend-Request", "1")
            .bearer_auth(APP_KEY)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        access_token(&body)
    }

    fn refreshes(&self) -> u64 {
        self.world.fake.counts().refresh_grants
    }
}

#[tokio::test]
async fn the_upstream_gets_the_live_token_and_headers_and_nothing_meant_for_tokend() {
    let p = Proxy::start().await;
    let (up, daemon, client) = (&p.up, &p.daemon, &p.client);
    let token = p.token().await;
    let body: Vec<u8> = (0..1_500_000u32).map(|i| (i % 251) as u8).collect();
    let answer = p
        .request(http::Method::PUT, "items/7/data?a=1&slash=x%2Fy")
        .header("X-Custom", "kept")
        .header("Connection", "x-hop")
        .header("X-Hop", "for-tokend-only")
        .header("Profile", "B 9999")
        .body(body.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), 200);
    assert_eq!(
        answer.headers()["x-upstream"],
        "1",
        "the upstream's headers pass"
    );
    assert!(
        answer
            .headers()
            .get("connection")
            .is_none_or(|v| v != "keep-alive"),
        "nor hop-by-hop ones"
    );
    let seen = up.seen_at("/base/items/7/data");
    assert_eq!(seen.len(), 1, "{seen:?}");
    let s = &seen[0];
    assert_eq!(s.method, "PUT");
    assert_eq!(s.query.as_deref(), Some("a=1&slash=x%2Fy"));
    assert_eq!(bearer(&s.headers), token, "the account's live token");
    assert_eq!(
        s.headers["profile"], "B 1234",
        "the account's header wins over the consumer's"
    );
    assert_eq!(s.headers["x-custom"], "kept");
    for gone in ["tokend-request", "x-hop"] {
        assert!(s.headers.get(gone).is_none(), "{gone} reached the upstream");
    }
    assert!(
        !format!("{:?}", s.headers).contains(APP_KEY),
        "the consumer key reached the upstream"
    );
    assert_eq!(
        s.headers["host"],
        p.up_addr.to_string().as_str(),
        "the upstream's own Host"
    );
    assert_eq!(s.body_len, body.len() as u64, "a 1.5 MB body arrives whole");
    assert_eq!(s.body_sha256, hex(&Sha256::digest(&body)), "and unchanged");

    // Redirects are returned, not followed; an account without a proxy says so.
    let redirect = p.get("redirect").await;
    assert_eq!(redirect.status(), 302);
    assert_eq!(redirect.headers()["location"], "/elsewhere");
    assert_eq!(up.seen_at("/elsewhere").len(), 0);
    let none = client
        .get(daemon.url("/proxy/svc/x"))
        .header("Tokend-Request", "1")
        .bearer_auth(OTHER_KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(none.status(), 404);
    assert_eq!(none.json::<Value>().await.unwrap()["error"], "no_proxy");
}

const POST: http::Method = http::Method::POST;

#[tokio::test]
async fn a_401_costs_one_shared_refresh_and_one_replay_and_a_second_401_passes_through() {
    let p = Proxy::start().await;
    let revoked = p.token().await;
    // The start's token must be older than min_interval (1 s) before it can be replaced.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    p.up.revoked.lock().unwrap().insert(revoked.clone());
    let before = p.refreshes();
    let orders = (0..5).map(|i| {
        p.request(POST, &format!("orders/{i}"))
            .body(format!("order {i}"))
            .send()
    });
    for answer in futures_util::future::join_all(orders).await {
        assert_eq!(answer.unwrap().status(), 200);
    }
    assert_eq!(
        p.refreshes() - before,
        1,
        "five requests turned away at once share one forced refresh"
    );
    let fresh = p.token().await;
    assert_ne!(fresh, revoked);
    for i in 0..5 {
        let seen = p.up.seen_at(&format!("/base/orders/{i}"));
        let tokens: Vec<String> = seen.iter().map(|s| bearer(&s.headers)).collect();
        assert!(
            tokens == [revoked.clone(), fresh.clone()] || tokens == [fresh.clone()],
            "order {i}: {tokens:?}"
        );
        let body = hex(&Sha256::digest(format!("order {i}")));
        assert!(
            seen.iter().all(|s| s.body_sha256 == body),
            "replayed as sent"
        );
    }

    // An upstream that refuses every token: one refresh, one retry, then its own 401.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let before = p.refreshes();
    let answer = p.get("always401").await;
    assert_eq!(answer.status(), 401);
    assert!(
        answer.headers()["www-authenticate"]
            .to_str()
            .unwrap()
            .contains("invalid_token")
    );
    assert_eq!(
        answer.text().await.unwrap(),
        "upstream says no",
        "untouched"
    );
    assert_eq!(
        p.up.seen_at("/base/always401").len(),
        2,
        "one retry, never a loop"
    );
    assert_eq!(p.refreshes() - before, 1);

    // A body over the replay limit is sent once: its 401 comes back as it came.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let big = vec![7u8; 2 * 1024 * 1024];
    let answer = p.request(POST, "always401").body(big).send().await.unwrap();
    assert_eq!(answer.status(), 401);
    assert_eq!(p.up.seen_at("/base/always401").len(), 3);
}

/// The daemon's peak resident memory (VmHWM), in bytes.
fn peak_rss(daemon: &Daemon) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{}/status", daemon.proc.pid())).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmHWM:")).unwrap();
    let kb: u64 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
    kb * 1024
}

#[tokio::test]
async fn large_bodies_stream_both_ways_at_constant_memory() {
    const SIZE: usize = 64 * 1024 * 1024;
    // A debug build on a busy machine may take a while for 64 MiB: not what is tested.
    let p = Proxy::start_with("", "120s").await;
    assert_eq!(p.get("warm-up").await.status(), 200);
    let before = peak_rss(&p.daemon);

    let mut download = p.get(&format!("download?bytes={SIZE}")).await;
    assert_eq!(download.status(), 200);
    let mut received = 0usize;
    while let Some(chunk) = download.chunk().await.unwrap() {
        assert!(chunk.iter().all(|b| *b == b'x'));
        received += chunk.len();
    }
    assert_eq!(received, SIZE, "the whole download");

    let chunk = Bytes::from(vec![3u8; 256 * 1024]);
    let mut hash = Sha256::new();
    for _ in 0..SIZE / chunk.len() {
        hash.update(&chunk);
    }
    let upload = futures_util::stream::iter(
        (0..SIZE / chunk.len()).map(move |_| Ok::<_, std::io::Error>(chunk.clone())),
    );
    let answer = p
        .request(POST, "upload")
        .body(reqwest::Body::wrap_stream(upload))
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), 200);
    let answer: Value = answer.json().await.unwrap();
    assert_eq!(answer["len"], SIZE, "the whole upload: {answer}");
    let seen = p.up.seen_at("/base/upload");
    assert_eq!(seen[0].body_sha256, hex(&hash.finalize()), "unchanged");

    let grew = peak_rss(&p.daemon).saturating_sub(before);
    assert!(
        grew < 16 * 1024 * 1024,
        "64 MiB each way grew the daemon's peak memory by {} KiB: a body was held",
        grew / 1024
    );
}

/// Sends `head` (request line and headers, without the blank line) on a new connection
/// and returns the status code.
async fn raw_status(daemon: &Daemon, head: &str) -> u16 {
    let addr = daemon.base.trim_start_matches("http://");
    let mut conn = tokio::net::TcpStream::connect(addr).await.unwrap();
    conn.write_all(format!("{head}\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut answer = Vec::new();
    conn.read_to_end(&mut answer).await.unwrap();
    let text = String::from_utf8_lossy(&answer);
    text.split(' ')
        .nth(1)
        .unwrap_or_default()
        .parse()
        .unwrap_or(0)
}

#[tokio::test]
async fn escapes_from_the_base_are_refused_and_the_guards_hold() {
    let p = Proxy::start().await;
    let host = p.daemon.base.trim_start_matches("http://").to_string();
    let auth = format!("Authorization: Bearer {APP_KEY}\r\nTokend-Request: 1");
    for path in [
        "../admin",
        "a/../../admin",
        "a/%2e%2e/%2E%2E/admin",
        ".%2e/admin",
        "a%2F..%2F..%2Fadmin",
        "a%5c..%5cadmin",
        "./admin",
    ] {
        let head = format!("GET /proxy/zy/{path} HTTP/1.1\r\nHost: {host}\r\n{auth}");
        assert_eq!(raw_status(&p.daemon, &head).await, 400, "{path}");
    }
    let get = |key: Option<&str>, extra: &[(&str, &str)], marked: bool| {
        let mut r = p.client.get(p.daemon.url("/proxy/zy/data"));
        if marked {
            r = r.header("Tokend-Request", "1");
        }
        if let Some(key) = key {
            r = r.bearer_auth(key);
        }
        for (k, v) in extra {
            r = r.header(*k, *v);
        }
        r.send()
    };
    let status = |r: reqwest::Response| r.status().as_u16();
    assert_eq!(
        status(get(Some(APP_KEY), &[], false).await.unwrap()),
        403,
        "no Tokend-Request"
    );
    assert_eq!(
        status(get(None, &[], true).await.unwrap()),
        401,
        "no consumer key"
    );
    assert_eq!(
        status(get(Some(OTHER_KEY), &[], true).await.unwrap()),
        403,
        "not this consumer's account"
    );
    for proxy_header in [
        ("Origin", "https://evil.example"),
        ("X-Forwarded-For", "10.0.0.1"),
    ] {
        let answer = get(Some(APP_KEY), &[proxy_header], true).await.unwrap();
        assert_eq!(status(answer), 403, "{proxy_header:?}");
    }
    let rebinding = format!("GET /proxy/zy/data HTTP/1.1\r\nHost: evil.example:80\r\n{auth}");
    assert_eq!(
        raw_status(&p.daemon, &rebinding).await,
        403,
        "a foreign Host"
    );
    assert!(
        p.up.seen().is_empty(),
        "nothing reached the upstream: {:?}",
        p.up.seen()
    );
    assert_eq!(
        status(get(Some(APP_KEY), &[], true).await.unwrap()),
        200,
        "the same request, admitted"
    );
}

#[tokio::test]
async fn an_unreachable_or_slow_upstream_is_a_502_or_504_counted_by_account() {
    let dead = free_port();
    let p = Proxy::start_with(
        &format!("\n[accounts.svc.proxy]\nupstream = \"http://127.0.0.1:{dead}/\"\n"),
        "2s",
    )
    .await;
    let unreachable = p
        .client
        .get(p.daemon.url("/proxy/svc/anything"))
        .header("Tokend-Request", "1")
        .bearer_auth(OTHER_KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(unreachable.status(), 502);
    let body: Value = unreachable.json().await.unwrap();
    assert_eq!(body["error"], "bad_gateway", "{body}");
    assert!(!body.to_string().contains(OTHER_KEY), "{body}");

    let slow = p.get("slow").await;
    assert_eq!(slow.status(), 504);
    let body: Value = slow.json().await.unwrap();
    assert_eq!(body["error"], "gateway_timeout", "{body}");
    assert!(
        body["error_description"]
            .as_str()
            .unwrap()
            .contains("proxy.timeout"),
        "{body}"
    );

    let metrics = p
        .client
        .get(p.daemon.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for series in [
        r#"tokend_proxy_requests_total{account="svc",code="502"} 1"#,
        r#"tokend_proxy_requests_total{account="zy",code="504"} 1"#,
    ] {
        assert!(metrics.contains(series), "{series} not in\n{metrics}");
    }
    assert!(metrics.contains("tokend_proxy_request_duration_seconds_bucket{account=\"zy\""));
    let log = p.daemon.log();
    assert!(log.contains("proxied request failed"), "{log}");
    assert!(
        !log.contains(APP_KEY) && !log.contains(OTHER_KEY),
        "a key in the log"
    );
}
