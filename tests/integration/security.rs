//! Each defence of the local endpoint, attacked over a real listener (TCP on 127.0.0.1
//! or a Unix socket): the request guards, consumer keys and scopes, request-size and
//! slow-client limits, socket permissions and peer credentials; plus the state
//! directory's ownership rules. Every test asserts the refusal, and that the honest
//! request still works.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::sync::Arc;
use std::time::Duration;

use http::Method;
use tokend::clock::Clock;
use tokend::config::{Config, SystemEnvironment};
use tokend::listen::{self, Limits};
use tokend::store::{FileStore, StoreError};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::support::{Harness, MARK, parse_config, provider, request, zywave_account};

/// A daemon (library) behind the real listener code, with a fake provider in-process.
struct Served {
    h: Harness,
    base: String,
    socket: Option<std::path::PathBuf>,
}

impl Served {
    async fn start(extra: &str, listen: &str, limits: Limits) -> Served {
        let clock = Clock::system();
        let fake = provider(&clock, Duration::from_secs(3600));
        let seed_a = fake.grant_refresh_token("zy-client", None);
        let seed_b = fake.grant_refresh_token("zy-client", None);
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        let socket = dir.path().join("tokend.sock");
        let listen = listen.replace("SOCKET", &socket.display().to_string());
        let text = format!(
            "[server]\nlisten = [{listen}]\n[state]\ndir = \"{}\"\n{}{}{extra}",
            state.display(),
            zywave_account("a", &seed_a),
            zywave_account("b", &seed_b),
        );
        let config = parse_config(&text);
        let listeners = listen::bind_all(&config.server).await.unwrap();
        let base = listeners[0]
            .local_tcp_addr()
            .map(|a| format!("http://{a}"))
            .unwrap_or_else(|| "http://localhost".into());
        let h = Harness::builder(fake, clock, dir).start(config).await;
        h.serve(listeners, limits);
        let served = Served {
            h,
            base,
            socket: listen.contains("unix:").then_some(socket),
        };
        served.wait_ready().await;
        served
    }

    fn client(&self) -> reqwest::Client {
        let mut b = reqwest::Client::builder().no_proxy();
        if let Some(path) = &self.socket {
            b = b.unix_socket(path.clone());
        }
        b.build().unwrap()
    }

    async fn wait_ready(&self) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while self
            .client()
            .get(format!("{}/readyz", self.base))
            .send()
            .await
            .map(|r| r.status())
            .ok()
            != Some(reqwest::StatusCode::OK)
        {
            assert!(tokio::time::Instant::now() < deadline, "not ready");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Sends `method path` with exactly `headers` and no body.
    async fn send(
        &self,
        method: Method,
        path: &str,
        headers: &[(&str, &str)],
    ) -> reqwest::Response {
        let url = format!("{}{path}", self.base);
        let req = request(method, &url, headers, Vec::new());
        let req = reqwest::Request::try_from(req).unwrap();
        self.client().execute(req).await.unwrap()
    }

    /// GET a token route with the guard header and `extra` headers; status and body.
    async fn get(&self, path: &str, extra: &[(&str, &str)]) -> (u16, serde_json::Value) {
        let headers: Vec<_> = [MARK].into_iter().chain(extra.iter().copied()).collect();
        let resp = self.send(Method::GET, path, &headers).await;
        let status = resp.status().as_u16();
        let www = resp.headers().get("www-authenticate").is_some();
        let mut body: serde_json::Value = resp.json().await.unwrap_or_default();
        if www {
            body["_www_authenticate"] = true.into();
        }
        (status, body)
    }

    /// Sends raw bytes on a fresh TCP connection and returns what comes back (bounded).
    async fn raw(&self, bytes: &[u8]) -> String {
        let addr = self.base.trim_start_matches("http://");
        let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        stream.write_all(bytes).await.unwrap();
        let mut out = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut out)).await;
        String::from_utf8_lossy(&out).to_string()
    }

    /// Stops the daemon and returns its temp dir, so that what shutdown left in it can
    /// still be looked at.
    async fn stop(self) -> tempfile::TempDir {
        self.h.stop().await.2
    }
}

const TCP: &str = "\"127.0.0.1:0\"";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_without_the_guard_header_are_refused() {
    let s = Served::start("", TCP, Limits::default()).await;
    let resp = s.send(Method::GET, "/v1/token/a", &[]).await;
    assert_eq!(resp.status(), 403);
    let blank = ("Tokend-Request", " ");
    let resp = s.send(Method::GET, "/v1/token/a", &[blank]).await;
    assert_eq!(resp.status(), 403, "a blank header counts as missing");
    assert_eq!(s.get("/v1/token/a", &[]).await.0, 200);
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn browsers_and_proxies_are_refused() {
    let s = Served::start("", TCP, Limits::default()).await;
    for (header, value) in [
        ("Origin", "https://evil.example"),
        ("Origin", "null"),
        ("X-Forwarded-For", "203.0.113.9"),
        ("Forwarded", "for=203.0.113.9"),
        ("X-Real-IP", "203.0.113.9"),
        ("X-Forwarded-Host", "tokens.example"),
        ("Via", "1.1 proxy"),
        ("True-Client-IP", "203.0.113.9"),
        ("Sec-Fetch-Site", "cross-site"),
    ] {
        let (status, body) = s.get("/v1/token/a", &[(header, value)]).await;
        assert_eq!(status, 403, "{header}");
        assert!(body.get("access_token").is_none());
        assert!(
            body["error_description"].as_str().unwrap().contains(header),
            "{body}"
        );
    }
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rebinding_host_is_refused() {
    let s = Served::start("", TCP, Limits::default()).await;
    let port = s.base.rsplit(':').next().unwrap().to_string();
    for host in [
        format!("evil.example:{port}"),
        "localhost.evil.example".into(),
        "10.0.0.1".into(),
    ] {
        let (status, _) = s.get("/v1/token/a", &[("Host", &host)]).await;
        assert_eq!(status, 403, "{host}");
    }
    for host in [format!("localhost:{port}"), format!("127.0.0.1:{port}")] {
        let (status, _) = s.get("/v1/token/a", &[("Host", &host)]).await;
        assert_eq!(status, 200, "{host}");
    }
    s.stop().await;
}

/// hyper adds no Host and merges none: a request without one, or with two, reaches the
/// router as sent, and is refused there, on every route.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_or_doubled_host_is_refused_on_the_wire() {
    let s = Served::start("", TCP, Limits::default()).await;
    let host = s.base.trim_start_matches("http://").to_string();
    for path in [
        "/healthz",
        "/readyz",
        "/metrics",
        "/v1/accounts",
        "/v1/token/a",
    ] {
        let head = |hosts: &str| {
            format!("GET {path} HTTP/1.1\r\n{hosts}Tokend-Request: 1\r\nConnection: close\r\n\r\n")
        };
        for hosts in [
            String::new(),
            format!("Host: {host}\r\nHost: evil.example\r\n"),
            format!("Host: evil.example\r\nHost: {host}\r\n"),
        ] {
            let answer = s.raw(head(&hosts).as_bytes()).await;
            assert!(
                answer.starts_with("HTTP/1.1 400"),
                "{path} {hosts:?}: {answer}"
            );
            assert!(answer.contains("Host"), "{answer}");
        }
        let answer = s.raw(head(&format!("Host: {host}\r\n")).as_bytes()).await;
        assert!(answer.starts_with("HTTP/1.1 200"), "{path}: {answer}");
    }
    // HTTP/1.0 had no Host: such a request is held to the other guards only.
    let answer = s.raw(b"GET /healthz HTTP/1.0\r\n\r\n").await;
    assert!(answer.starts_with("HTTP/1.0 200"), "{answer}");
    s.stop().await;
}

const CONSUMERS: &str = r#"
[consumers.billing]
key = "billing-key-0123456789"
accounts = ["a"]

[consumers.ops]
key_sha256 = "HASH"
accounts = ["*"]
"#;

fn consumers() -> String {
    use sha2::Digest;
    let hash = sha2::Sha256::digest(b"ops-key-0123456789");
    let hex: String = hash.iter().map(|b| format!("{b:02x}")).collect();
    CONSUMERS.replace("HASH", &hex)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consumer_keys_are_required_and_scoped() {
    let s = Served::start(&consumers(), TCP, Limits::default()).await;
    let (status, body) = s.get("/v1/token/a", &[]).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (401, Some("unauthorized"))
    );
    assert_eq!(body["_www_authenticate"], true);
    let (status, _) = s
        .get("/v1/token/a", &[("Authorization", "Bearer wrong-key")])
        .await;
    assert_eq!(status, 401, "a wrong key");
    let billing = ("Authorization", "Bearer billing-key-0123456789");
    assert_eq!(s.get("/v1/token/a", &[billing]).await.0, 200);
    assert_eq!(
        s.get("/v1/token/b", &[billing]).await.0,
        403,
        "a key for another account"
    );
    assert_eq!(
        s.get("/v1/token/nope", &[billing]).await.0,
        403,
        "no hint whether it exists"
    );
    let refresh = s
        .send(Method::POST, "/v1/accounts/b/refresh", &[MARK, billing])
        .await;
    assert_eq!(
        refresh.status(),
        403,
        "nor may it force another account's refresh"
    );
    let ops = ("Authorization", "Bearer ops-key-0123456789");
    assert_eq!(
        s.get("/v1/token/b", &[ops]).await.0,
        200,
        "key_sha256 works"
    );
    assert_eq!(s.get("/v1/token/nope", &[ops]).await.0, 404);
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_and_slow_requests_are_cut_off() {
    let limits = Limits {
        header_read_timeout: Duration::from_millis(300),
        ..Limits::default()
    };
    let s = Served::start("", TCP, limits).await;
    let big = format!(
        "GET /v1/token/a HTTP/1.1\r\nHost: localhost\r\nTokend-Request: 1\r\nX-Pad: {}\r\n\r\n",
        "x".repeat(32 * 1024)
    );
    let answer = s.raw(big.as_bytes()).await;
    assert!(answer.starts_with("HTTP/1.1 431"), "{answer:.80}");
    let long_line = format!(
        "GET /v1/token/a?{} HTTP/1.1\r\nHost: localhost\r\n\r\n",
        "q".repeat(32 * 1024)
    );
    assert!(
        s.raw(long_line.as_bytes()).await.starts_with("HTTP/1.1 4"),
        "an oversized request line"
    );
    let many: String = (0..100).map(|i| format!("X-H{i}: v\r\n")).collect();
    let answer = s
        .raw(format!("GET /healthz HTTP/1.1\r\nHost: localhost\r\n{many}\r\n").as_bytes())
        .await;
    assert!(
        answer.starts_with("HTTP/1.1 431"),
        "too many headers: {answer:.80}"
    );
    // A client that never finishes its head is dropped after the header timeout.
    let started = tokio::time::Instant::now();
    let answer = s.raw(b"GET /v1/token/a HTTP/1.1\r\nHost: local").await;
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "dropped by the server, not by our read timeout"
    );
    assert!(!answer.contains("access_token"));
    // And an honest request on the same server is fine.
    assert_eq!(s.get("/v1/token/a", &[]).await.0, 200);
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_unix_socket_has_its_mode_and_matches_consumers_by_uid() {
    let me = rustix::process::geteuid().as_raw();
    let extra = format!(
        "[consumers.local-app]\nuid = {me}\naccounts = [\"a\"]\n[consumers.other-user]\nuid = {}\naccounts = [\"*\"]\n",
        me + 4242
    );
    let s = Served::start(&extra, "\"unix:SOCKET\"", Limits::default()).await;
    let socket = s.socket.clone().unwrap();
    let meta = std::fs::metadata(&socket).unwrap();
    assert_eq!(meta.permissions().mode() & 0o777, 0o660);
    // This process's uid is the consumer local-app: no key needed, but only account a.
    assert_eq!(s.get("/v1/token/a", &[]).await.0, 200);
    assert_eq!(s.get("/v1/token/b", &[]).await.0, 403);
    // Host is not checked on a socket (it names no network host).
    assert_eq!(s.get("/v1/token/a", &[("Host", "anything")]).await.0, 200);
    // The temp dir outlives the shutdown: removing it would remove the socket file too.
    let dir = s.stop().await;
    assert!(!socket.exists(), "the socket file is removed on shutdown");
    drop(dir);
}

#[test]
fn non_loopback_listeners_need_an_explicit_opt_in() {
    let load =
        |text: &str| Config::from_str_at(text, std::path::Path::new("l.toml"), &SystemEnvironment);
    let err = load("[server]\nlisten = [\"0.0.0.0:8731\"]\n").unwrap_err();
    assert!(err.to_string().contains("allow_remote"), "{err}");
    let err = load("[server]\nlisten = [\"unix:relative.sock\"]\n").unwrap_err();
    assert!(err.to_string().contains("absolute"), "{err}");
    let config = load("[server]\nlisten = [\"0.0.0.0:8731\"]\nallow_remote = true\n").unwrap();
    assert!(
        config.warnings.iter().any(|w| w.contains("0.0.0.0:8731")),
        "{:?}",
        config.warnings
    );
}

#[test]
fn a_world_readable_config_with_a_literal_secret_is_warned_about() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tokend.toml");
    std::fs::write(&path, "[accounts.a]\ngrant = \"client_credentials\"\ntoken_url = \"https://x/t\"\nclient_id = \"c\"\nclient_secret = \"literal\"\n").unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
    let config = Config::load(&path).unwrap();
    assert!(
        config.warnings.iter().any(|w| w.contains("chmod 600")),
        "{:?}",
        config.warnings
    );
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    assert!(Config::load(&path).unwrap().warnings.is_empty());
}

#[test]
fn state_dirs_open_to_others_or_owned_by_another_user_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let shared = dir.path().join("shared");
    std::fs::create_dir(&shared).unwrap();
    std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o777)).unwrap();
    let err = FileStore::open(&shared)
        .err()
        .expect("a world-writable dir is refused");
    assert!(matches!(err, StoreError::Insecure { .. }), "{err}");

    let foreign = dir.path().join("foreign");
    std::fs::create_dir(&foreign).unwrap();
    std::fs::set_permissions(&foreign, std::fs::Permissions::from_mode(0o700)).unwrap();
    let me = rustix::process::geteuid().as_raw();
    if std::os::unix::fs::chown(&foreign, Some(me + 4242), None).is_ok() {
        let err = FileStore::open(&foreign)
            .err()
            .expect("a dir of another user is refused");
        assert!(matches!(err, StoreError::NotOwner { .. }), "{err}");
        assert_eq!(std::fs::metadata(&foreign).unwrap().uid(), me + 4242);
    }
    // State files stay private whatever the umask.
    let ok = dir.path().join("ok");
    let _store: Arc<FileStore> = FileStore::open(&ok).unwrap();
    assert_eq!(
        std::fs::metadata(&ok).unwrap().permissions().mode() & 0o777,
        0o700
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_consumers_the_account_list_is_filtered_by_consumer() {
    let s = Served::start(&consumers(), TCP, Limits::default()).await;
    let list = |key: Option<&'static str>| {
        let client = s.client();
        let url = format!("{}/v1/accounts", s.base);
        async move {
            let mut req = client.get(url);
            if let Some(k) = key {
                req = req.bearer_auth(k);
            }
            let resp = req.send().await.unwrap();
            let status = resp.status().as_u16();
            let body: serde_json::Value = resp.json().await.unwrap_or_default();
            let names: Vec<String> = body["accounts"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .map(|x| x["account"].as_str().unwrap().to_string())
                        .collect()
                })
                .unwrap_or_default();
            (status, names)
        }
    };
    assert_eq!(list(None).await.0, 401);
    assert_eq!(
        list(Some("billing-key-0123456789")).await,
        (200, vec!["a".to_string()])
    );
    assert_eq!(
        list(Some("ops-key-0123456789")).await,
        (200, vec!["a".to_string(), "b".to_string()])
    );
    s.stop().await;
}
