//! Operating the real binary: systemd notifications and the watchdog, log formats, the
//! operator's command line (`status`, `health`, `refresh`, `--key-file`, `completions`,
//! `--version`) and `/metrics`. Every daemon runs against the fake provider on 127.0.0.1.

use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::http::{HeaderMap, Uri};
use axum::response::IntoResponse;
use reqwest::StatusCode;
use serde_json::Value;
use tokend::demo::fake_provider::FakeProvider;
use tokio::sync::mpsc;

use crate::support::*;

/// A seed the fake provider never issued: refreshing with it gets `invalid_grant`, and
/// the account needs re-authorization.
const UNKNOWN_SEED: &str = "rt-the-provider-never-issued";

/// The provider and setup of `zy_and_svc_world`.
async fn two_accounts(seed: Option<&str>, extra: &str) -> (FakeProvider, Setup) {
    let World { fake, setup, .. } = zy_and_svc_world(seed, extra).await;
    (fake, setup)
}

/// `tokend ARGS… --endpoint URL`, run to completion.
async fn client_cmd(args: &[&str], endpoint: &str) -> std::process::Output {
    run_cmd(
        tokend().args(args).args(["--endpoint", endpoint]),
        READY_TIMEOUT,
    )
    .await
}

// ---------------------------------------------------------------------------------------
// sd_notify

/// The socket systemd hands a `Type=notify` service: a datagram socket in a temp dir,
/// read on its own thread (with a read timeout, so the thread ends soon after the test
/// drops this). Each datagram is one message of `KEY=VALUE` lines.
struct NotifySocket {
    path: PathBuf,
    messages: mpsc::UnboundedReceiver<String>,
    /// Every message received so far, for failure messages.
    seen: Vec<String>,
}

impl NotifySocket {
    fn bind(dir: &Path) -> NotifySocket {
        let path = dir.join("notify.sock");
        let socket = UnixDatagram::bind(&path).expect("bind the notify socket");
        socket
            .set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        let (tx, messages) = mpsc::unbounded_channel();
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 64 * 1024];
            while !tx.is_closed() {
                match socket.recv(&mut buf) {
                    Ok(n) => {
                        let _ = tx.send(String::from_utf8_lossy(&buf[..n]).into_owned());
                    }
                    Err(e)
                        if matches!(
                            e.kind(),
                            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                        ) => {}
                    Err(e) => panic!("reading the notify socket: {e}"),
                }
            }
        });
        NotifySocket {
            path,
            messages,
            seen: Vec::new(),
        }
    }

    /// Sets the environment systemd gives a notify service with `WatchdogSec=400ms`.
    fn configure(&self, cmd: &mut Command) {
        cmd.env("NOTIFY_SOCKET", &self.path)
            .env("WATCHDOG_USEC", "400000")
            .env_remove("WATCHDOG_PID");
    }

    /// The next message that has the line `line` (skipping others), within READY_TIMEOUT.
    async fn next_with(&mut self, line: &str, daemon: &Daemon) -> String {
        let deadline = tokio::time::Instant::now() + READY_TIMEOUT;
        loop {
            match tokio::time::timeout_at(deadline, self.messages.recv()).await {
                Ok(Some(message)) => {
                    self.seen.push(message.clone());
                    if message.lines().any(|l| l == line) {
                        return message;
                    }
                }
                Ok(None) => panic!("the notify reader stopped; seen: {:#?}", self.seen),
                Err(_) => panic!(
                    "no {line:?} within {READY_TIMEOUT:?}; seen: {:#?}; log:\n{}",
                    self.seen,
                    daemon.log()
                ),
            }
        }
    }
}

/// The value of `KEY=` in a notify message.
fn field<'a>(message: &'a str, key: &str) -> Option<&'a str> {
    message
        .lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix('='))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sd_notify_ready_watchdog_reload_and_stop() {
    let (fake, setup) = two_accounts(None, "").await;
    let mut notify = NotifySocket::bind(setup.dir.path());
    let client = http_client();
    let mut daemon = setup.start_with(|c| notify.configure(c));

    // READY=1 comes once both accounts hold tokens, with a one-line summary.
    let ready = notify.next_with("READY=1", &daemon).await;
    let readyz = client.get(daemon.url("/readyz")).send().await.unwrap();
    assert_eq!(
        readyz.status(),
        StatusCode::OK,
        "READY=1 before /readyz was ready: {}",
        readyz.text().await.unwrap_or_default()
    );
    assert_eq!(fake.counts().issued, 2, "{:?}", fake.counts());
    assert_eq!(
        field(&ready, "STATUS"),
        Some("2 accounts: 2 ok"),
        "{ready:?}"
    );
    assert!(
        !notify.seen[..notify.seen.len() - 1]
            .iter()
            .any(|m| m.lines().any(|l| l == "READY=1")),
        "READY=1 was sent twice: {:#?}",
        notify.seen
    );

    // The watchdog is pinged at half of WATCHDOG_USEC (200 ms; 30 s without it, so two
    // pings within the wait show the interval was taken up).
    for _ in 0..2 {
        notify.next_with("WATCHDOG=1", &daemon).await;
    }

    // SIGHUP: RELOADING=1 with the monotonic time, then READY=1 again.
    daemon.signal("HUP");
    let reloading = notify.next_with("RELOADING=1", &daemon).await;
    let usec: u64 = field(&reloading, "MONOTONIC_USEC")
        .unwrap_or_else(|| panic!("no MONOTONIC_USEC in {reloading:?}"))
        .parse()
        .expect("MONOTONIC_USEC is a number");
    assert!(usec > 0, "{reloading:?}");
    let ready = notify.next_with("READY=1", &daemon).await;
    assert_eq!(
        field(&ready, "STATUS"),
        Some("2 accounts: 2 ok"),
        "{ready:?}"
    );

    // SIGTERM: STOPPING=1, then a clean exit.
    daemon.signal("TERM");
    notify.next_with("STOPPING=1", &daemon).await;
    let status = daemon.wait_exit(EXIT_TIMEOUT).await;
    assert_eq!(status.code(), Some(0), "log:\n{}", daemon.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_account_needing_reauth_still_lets_the_daemon_report_ready() {
    let (fake, setup) = two_accounts(Some(UNKNOWN_SEED), "").await;
    let mut notify = NotifySocket::bind(setup.dir.path());
    let mut daemon = setup.start_with(|c| notify.configure(c));

    let ready = notify.next_with("READY=1", &daemon).await;
    assert_eq!(
        field(&ready, "STATUS"),
        Some("2 accounts: 1 needs_reauth, 1 ok"),
        "{ready:?}"
    );
    let counts = fake.counts();
    assert_eq!(counts.rejected, 1, "{counts:?}");
    assert_eq!(counts.issued, 1, "{counts:?}");

    // `tokend health` says "not now" (EX_TEMPFAIL), naming the account and its state.
    let out = client_cmd(&["health"], &daemon.base).await;
    let stdout = expect_code(&out, 75).stdout;
    assert!(stdout.contains("zy (needs_reauth)"), "{stdout}");
    assert!(!stdout.contains("svc"), "{stdout}");

    // `tokend status` shows it too, with the provider's reason.
    let out = client_cmd(&["status"], &daemon.base).await;
    let stdout = expect_code(&out, 0).stdout;
    let row = stdout
        .lines()
        .find(|l| l.starts_with("zy "))
        .unwrap_or_else(|| panic!("no row for zy: {stdout}"));
    assert!(row.contains("needs_reauth"), "{row}");
    assert!(row.contains("invalid_grant"), "{row}");

    assert_eq!(daemon.stop().await.code(), Some(0));
}

// ---------------------------------------------------------------------------------------
// Log formats

/// Runs the daemon until ready, stops it, and returns its stderr (stdout is discarded).
async fn stderr_of_a_run(setup: &Setup, env: &[(&str, &str)]) -> String {
    let client = http_client();
    let mut daemon = setup.start_with(|c| {
        c.stdout(Stdio::null()).envs(env.iter().copied());
    });
    daemon.wait_ready(&client).await;
    daemon.token(&client, "zy").await;
    assert_eq!(
        daemon.stop().await.code(),
        Some(0),
        "log:\n{}",
        daemon.log()
    );
    daemon.log()
}

/// Every line is a JSON object with the documented top-level fields, and the refresh of
/// `zy` is logged with its `account`.
fn assert_json_lines(log: &str) {
    assert!(log.lines().count() >= 3, "too few lines: {log}");
    let mut refreshed = Vec::new();
    for line in log.lines() {
        let v: Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {line:?}; log:\n{log}"));
        assert!(v.is_object(), "{line}");
        for key in ["timestamp", "level", "message", "target"] {
            assert!(v[key].is_string(), "no {key} in {line}");
        }
        if v["message"] == "refreshed" {
            refreshed.push(v);
        }
    }
    assert!(
        refreshed.iter().any(|v| v["account"] == "zy"),
        "no `refreshed` line with account zy: {log}"
    );
    assert!(
        refreshed.iter().all(|v| v["outcome"] == "ok"),
        "{refreshed:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn log_format_json_from_the_config() {
    let (_fake, setup) = two_accounts(None, "\n[log]\nformat = \"json\"\n").await;
    assert_json_lines(&stderr_of_a_run(&setup, &[]).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn log_format_json_from_the_environment() {
    let (_fake, setup) = two_accounts(None, "").await;
    assert_json_lines(&stderr_of_a_run(&setup, &[("TOKEND_LOG_FORMAT", "json")]).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_the_journal_text_logs_have_no_timestamp_and_no_colour() {
    const LEVELS: [&str; 5] = ["TRACE", "DEBUG", "INFO", "WARN", "ERROR"];
    let (_fake, setup) = two_accounts(None, "").await;

    // Without the journal each line starts with its timestamp (so the check below can
    // tell the difference).
    let plain = stderr_of_a_run(&setup, &[]).await;
    assert!(plain.lines().count() >= 3, "{plain}");
    for line in plain.lines() {
        let first = line.split_whitespace().next().unwrap_or_default();
        assert!(
            first.starts_with("20") && first.contains('T'),
            "no leading timestamp: {line:?}"
        );
    }

    let (_fake, setup) = two_accounts(None, "").await;
    // systemd names the stream it connected to stderr (here: the log file).
    std::fs::write(setup.log_path(), "").unwrap();
    let log = std::fs::metadata(setup.log_path()).unwrap();
    let stream = {
        use std::os::unix::fs::MetadataExt;
        format!("{}:{}", log.dev(), log.ino())
    };
    let journal = stderr_of_a_run(&setup, &[("JOURNAL_STREAM", &stream)]).await;
    assert!(journal.lines().count() >= 3, "{journal}");
    assert!(journal.contains("refreshed"), "{journal}");
    for line in journal.lines() {
        assert!(!line.contains('\x1b'), "an ANSI escape: {line:?}");
        // After the priority journald takes (see `journal`).
        let line = line.get(3..).unwrap_or_default();
        let first = line.split_whitespace().next().unwrap_or_default();
        assert!(
            LEVELS.contains(&first),
            "the line does not start with its level: {line:?}"
        );
    }
}

// ---------------------------------------------------------------------------------------
// The operator's command line

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_health_and_refresh_commands() {
    // zy may be refreshed at any time; svc only 5 minutes after its last refresh.
    let extra = "\n[accounts.zy.refresh]\nmin_interval = 0\n[accounts.svc.refresh]\nmin_interval = \"5m\"\n";
    let (fake, setup) = two_accounts(None, extra).await;
    let client = http_client();
    let mut daemon = setup.start_ready(&client).await;
    let base = daemon.base.clone();

    // refresh within svc's min_interval of its first refresh: refused without a call,
    // "not now" (EX_TEMPFAIL).
    let calls = fake.counts().token_requests;
    let out = client_cmd(&["refresh", "svc"], &base).await;
    let stderr = expect_code(&out, 75).stderr;
    assert!(stderr.contains("min_interval"), "{stderr}");
    assert!(out.stdout.is_empty());
    assert_eq!(fake.counts().token_requests, calls);

    // status: a header and one row per account.
    let out = client_cmd(&["status"], &base).await;
    let stdout = expect_code(&out, 0).stdout;
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 3, "{stdout}");
    let header = lines[0];
    for column in [
        "ACCOUNT",
        "STATE",
        "EXPIRES IN",
        "LAST REFRESH",
        "LAST ERROR",
    ] {
        assert!(header.contains(column), "no {column} in {header:?}");
    }
    assert!(header.starts_with("ACCOUNT"), "{header:?}");
    let state_col = header.find("STATE").unwrap();
    let mut names = Vec::new();
    for row in &lines[1..] {
        names.push(row.split_whitespace().next().unwrap());
        assert!(row[state_col..].starts_with("ok "), "{row:?}");
    }
    assert_eq!(names, ["svc", "zy"], "{stdout}");

    // status --json: the daemon's account list.
    let out = client_cmd(&["status", "--json"], &base).await;
    expect_code(&out, 0);
    let json: Value = serde_json::from_slice(&out.stdout).expect("--json prints JSON");
    assert_eq!(account_names(&json), ["svc", "zy"], "{json}");
    assert!(
        json["accounts"]
            .as_array()
            .unwrap()
            .iter()
            .all(|a| a["state"] == "ok"),
        "{json}"
    );

    // health: ready.
    let out = client_cmd(&["health"], &base).await;
    assert_eq!(expect_code(&out, 0).stdout, "ready\n");

    // refresh: exactly one more token request, and a new token served.
    let before = access_token(&daemon.token(&client, "zy").await);
    let counts = fake.counts();
    let out = client_cmd(&["refresh", "zy"], &base).await;
    let stdout = expect_code(&out, 0).stdout;
    assert!(stdout.starts_with("zy: ok (expires in "), "{stdout}");
    let after = access_token(&daemon.token(&client, "zy").await);
    assert_eq!(
        fake.counts().token_requests,
        counts.token_requests + 1,
        "{:?} then {:?}",
        counts,
        fake.counts()
    );
    assert_ne!(after, before, "the served token did not change");
    assert!(fake.is_valid_access_token(&after));

    // refresh of an unknown account: refused, exit 1.
    let out = client_cmd(&["refresh", "nope"], &base).await;
    let stderr = expect_code(&out, 1).stderr;
    assert!(stderr.contains("nope"), "{stderr}");
    assert!(out.stdout.is_empty());
    assert_eq!(fake.counts().token_requests, counts.token_requests + 1);

    // health with nobody listening: EX_UNAVAILABLE.
    let closed = format!("http://127.0.0.1:{}", free_port());
    let out = client_cmd(&["health"], &closed).await;
    let stderr = expect_code(&out, 69).stderr;
    assert!(stderr.contains(&closed), "{stderr}");

    assert_eq!(daemon.stop().await.code(), Some(0));
}

/// What a test server saw: each request's path and headers.
type Seen = Arc<Mutex<Vec<(String, HeaderMap)>>>;

/// A server on 127.0.0.1 that records every request and answers `200 recorded-token`.
async fn recording_server() -> (String, Seen) {
    let seen: Seen = Arc::default();
    let record = seen.clone();
    let app = axum::Router::new().fallback(move |uri: Uri, headers: HeaderMap| {
        let record = record.clone();
        async move {
            record.lock().unwrap().push((uri.to_string(), headers));
            "recorded-token"
        }
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        axum::serve(listener, app)
            .await
            .expect("the recorder serves");
    });
    (format!("http://{addr}"), seen)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_file_is_sent_as_a_bearer_key() {
    let dir = tempfile::tempdir().unwrap();
    let key_file = dir.path().join("consumer.key");
    std::fs::write(&key_file, "k3y-Of-The-Consumer\n").unwrap();
    let key_arg = key_file.to_str().unwrap();
    let (endpoint, seen) = recording_server().await;

    let out = client_cmd(&["token", "zy", "--key-file", key_arg], &endpoint).await;
    assert_eq!(expect_code(&out, 0).stdout, "recorded-token\n");
    let out = client_cmd(&["token", "zy"], &endpoint).await;
    expect_code(&out, 0);

    let seen = seen.lock().unwrap();
    assert_eq!(seen.len(), 2, "{seen:?}");
    let (path, headers) = &seen[0];
    assert_eq!(path, "/v1/token/zy/access_token");
    assert_eq!(
        headers.get("authorization").map(|v| v.to_str().unwrap()),
        Some("Bearer k3y-Of-The-Consumer"),
        "the key, trimmed, as a bearer key: {headers:?}"
    );
    assert_eq!(
        headers.get("tokend-request").map(|v| v.to_str().unwrap()),
        Some("cli")
    );
    let (_, headers) = &seen[1];
    assert!(
        headers.get("authorization").is_none(),
        "no key file, no Authorization: {headers:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_commands_work_over_a_unix_socket_and_read_chunked_answers() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("tokend.sock");
    let key_file = dir.path().join("consumer.key");
    std::fs::write(&key_file, "k3y-Of-The-Consumer\n").unwrap();
    let seen: Seen = Arc::default();
    let record = seen.clone();
    // Answers in chunks of unknown total length (`Transfer-Encoding: chunked`); a refusal
    // for the account `nope`, as the daemon words it.
    let app = axum::Router::new().fallback(move |uri: Uri, headers: HeaderMap| {
        let record = record.clone();
        async move {
            record.lock().unwrap().push((uri.to_string(), headers));
            if uri.path().contains("/nope/") {
                let body = r#"{"error":"unknown_account","error_description":"no account nope"}"#;
                return (StatusCode::NOT_FOUND, body).into_response();
            }
            let chunks = ["chunked-", "recorded-", "token"].map(Ok::<_, std::io::Error>);
            axum::body::Body::from_stream(futures_util::stream::iter(chunks)).into_response()
        }
    });
    let listener = tokio::net::UnixListener::bind(&socket).unwrap();
    tokio::spawn(async move {
        axum::serve(listener, app)
            .await
            .expect("the recorder serves");
    });
    let endpoint = format!("unix:{}", socket.display());

    let key_arg = key_file.to_str().unwrap();
    let out = client_cmd(&["token", "zy", "--key-file", key_arg], &endpoint).await;
    assert_eq!(
        expect_code(&out, 0).stdout,
        "chunked-recorded-token\n",
        "the whole chunked body, once"
    );
    let out = client_cmd(&["token", "nope"], &endpoint).await;
    let stderr = expect_code(&out, 1).stderr;
    assert!(stderr.contains("HTTP 404: no account nope"), "{stderr}");
    assert!(out.stdout.is_empty());

    let seen = seen.lock().unwrap();
    assert_eq!(seen.len(), 2, "{seen:?}");
    let (path, headers) = &seen[0];
    assert_eq!(path, "/v1/token/zy/access_token");
    let header = |name: &str| headers.get(name).map(|v| v.to_str().unwrap());
    assert_eq!(header("host"), Some("localhost"));
    assert_eq!(header("tokend-request"), Some("cli"));
    assert_eq!(header("authorization"), Some("Bearer k3y-Of-The-Consumer"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_endpoints_are_refused_as_usage_errors() {
    // The daemon never serves TLS: nothing is sent, whoever listens there.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let endpoint = format!("https://{}", listener.local_addr().unwrap());
    for args in [
        &["token", "zy"][..],
        &["status"],
        &["health"],
        &["refresh", "zy"],
    ] {
        let out = client_cmd(args, &endpoint).await;
        let stderr = expect_code(&out, 64).stderr;
        assert!(stderr.contains(&endpoint), "{args:?}: {stderr}");
        assert!(stderr.contains("plain HTTP"), "{args:?}: {stderr}");
        assert!(out.stdout.is_empty(), "{args:?}");
    }
    // A connection, even one closed since, would wait in the accept queue.
    let accepted = listener.accept().map(|(_, peer)| peer);
    assert!(
        accepted
            .as_ref()
            .is_err_and(|e| e.kind() == std::io::ErrorKind::WouldBlock),
        "no connection was made: {accepted:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_file_identifies_a_consumer_to_the_daemon() {
    let consumer = "\n[consumers.ops]\nkey = \"k3y-Of-The-Consumer\"\naccounts = [\"*\"]\n";
    let (_fake, setup) = two_accounts(None, consumer).await;
    let good = setup.dir.path().join("good.key");
    std::fs::write(&good, "k3y-Of-The-Consumer\n").unwrap();
    let wrong = setup.dir.path().join("wrong.key");
    std::fs::write(&wrong, "not-the-key\n").unwrap();
    let client = http_client();
    let mut daemon = setup.start_ready(&client).await;
    let base = daemon.base.clone();

    let out = client_cmd(
        &["token", "zy", "--key-file", good.to_str().unwrap()],
        &base,
    )
    .await;
    assert!(!expect_code(&out, 0).stdout.trim().is_empty());
    for args in [
        &["token", "zy"][..],
        &["token", "zy", "--key-file", wrong.to_str().unwrap()],
    ] {
        let out = client_cmd(args, &base).await;
        let stderr = text(&out.stderr);
        assert_eq!(out.status.code(), Some(77), "{args:?}: stderr: {stderr}");
        assert!(stderr.contains("401"), "{args:?}: {stderr}");
        assert!(out.stdout.is_empty(), "{args:?}");
    }
    assert_eq!(daemon.stop().await.code(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn completions_and_version() {
    let out = run_cmd(tokend().args(["completions", "bash"]), EXIT_TIMEOUT).await;
    let script = expect_code(&out, 0).stdout;
    assert!(script.contains("complete "), "{script}");
    assert!(script.contains("tokend"), "{script}");
    for sub in ["run", "status", "health", "refresh", "token"] {
        assert!(script.contains(sub), "no {sub} in the script");
    }

    let out = run_cmd(tokend().arg("--version"), EXIT_TIMEOUT).await;
    let version = expect_code(&out, 0).stdout;
    let mut lines = version.lines();
    assert_eq!(
        lines.next(),
        Some(format!("tokend {}", env!("CARGO_PKG_VERSION")).as_str()),
        "{version}"
    );
    let commit = lines
        .find_map(|l| l.strip_prefix("commit: "))
        .unwrap_or_else(|| panic!("no commit: line in {version:?}"));
    assert!(!commit.trim().is_empty(), "{version}");
}

// ---------------------------------------------------------------------------------------
// /metrics

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_are_served_as_prometheus_text() {
    let (_fake, setup) = two_accounts(None, "").await;
    let client = http_client();
    let mut daemon = setup.start_ready(&client).await;
    // A request counted after the first refresh (which installs the recorder).
    daemon.token(&client, "zy").await;

    let response = client.get(daemon.url("/metrics")).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let content_type = content_type(&response);
    assert!(content_type.starts_with("text/plain"), "{content_type}");
    let body = response.text().await.unwrap();
    let series = |name: &str, labels: &[&str]| {
        body.lines()
            .any(|l| l.starts_with(&format!("{name}{{")) && labels.iter().all(|x| l.contains(x)))
    };
    for account in ["zy", "svc"] {
        let label = format!("account=\"{account}\"");
        assert!(
            series("tokend_refresh_attempts_total", &[&label, "outcome=\"ok\""]),
            "no refresh attempts for {account}:\n{body}"
        );
    }
    assert!(
        series(
            "tokend_http_requests_total",
            &["route=\"/v1/token/{account}\"", "status=\"200\""]
        ),
        "no HTTP request count:\n{body}"
    );
    assert_eq!(daemon.stop().await.code(), Some(0));
}
