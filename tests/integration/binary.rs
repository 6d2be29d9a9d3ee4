//! End-to-end tests of the real `tokend` binary: the daemon runs as a child process
//! against an in-process fake OAuth provider, and is driven through its command line,
//! its loopback HTTP API and signals, the way an operator and a consumer use it.
//!
//! No test sleeps and hopes: every wait polls a condition in a bounded loop, and every
//! child process sits in a guard that kills and reaps it even when the test panics.

use std::fs::{self, OpenOptions};
use std::io::{BufRead, BufReader, Read};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use reqwest::StatusCode;
use serde_json::Value;
use tempfile::TempDir;
use tokend::clock::Clock;
use tokend::fake_provider::{ClientSpec, FakeProvider};

const BIN: &str = env!("CARGO_BIN_EXE_tokend");
/// How often a condition is polled.
const POLL: Duration = Duration::from_millis(50);
/// The longest wait for the daemon to become ready (or for any other condition).
const READY_TIMEOUT: Duration = Duration::from_secs(15);
/// The longest wait for a process to exit after a signal.
const EXIT_TIMEOUT: Duration = Duration::from_secs(10);
/// The fake provider's access-token lifetime: long enough that no refresh is due while a
/// test runs, so every token request the provider sees is one the test caused.
const LIFETIME: Duration = Duration::from_secs(3600);
/// The header a token request must carry.
const REQUEST_HEADER: &str = "Tokend-Request";

// ---------------------------------------------------------------------------------------
// Processes.

/// A `tokend` command with an environment that cannot leak into the test: no config or
/// endpoint from the caller's shell, no proxy between the daemon and 127.0.0.1.
fn tokend() -> Command {
    let mut cmd = Command::new(BIN);
    for var in [
        "TOKEND_CONFIG",
        "TOKEND_ENDPOINT",
        "JOURNAL_STREAM",
        "STATE_DIRECTORY",
        "CREDENTIALS_DIRECTORY",
        "HTTP_PROXY",
        "http_proxy",
        "HTTPS_PROXY",
        "https_proxy",
        "ALL_PROXY",
        "all_proxy",
    ] {
        cmd.env_remove(var);
    }
    cmd.env("RUST_LOG", "info").stdin(Stdio::null());
    cmd
}

/// Owns a child process: dropping it (also while unwinding from a panic) kills the
/// process if it still runs, and reaps it.
struct ChildGuard {
    child: Child,
    what: String,
}

impl ChildGuard {
    fn spawn(mut cmd: Command) -> ChildGuard {
        let what = format!("{cmd:?}");
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot spawn {what}: {e}"));
        ChildGuard { child, what }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn exited(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().expect("try_wait on a child")
    }

    /// Polls until the process exits; `None` if it still runs after `timeout`.
    async fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.exited() {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// Sends a signal by name (`HUP`, `TERM`, `INT`) with kill(1).
    fn signal(&mut self, sig: &str) {
        assert!(
            self.exited().is_none(),
            "cannot send SIG{sig}: {} has already exited",
            self.what
        );
        let status = Command::new("kill")
            .args([format!("-{sig}"), self.pid().to_string()])
            .status()
            .expect("run kill(1)");
        assert!(status.success(), "kill -{sig} {} failed", self.pid());
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

/// Runs a short-lived command to completion (bounded by `timeout`), capturing its output.
async fn run_cmd(mut cmd: Command, timeout: Duration) -> Output {
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut guard = ChildGuard::spawn(cmd);
    let drain = |pipe: Option<Box<dyn Read + Send>>| {
        std::thread::spawn(move || {
            let mut bytes = Vec::new();
            if let Some(mut pipe) = pipe {
                let _ = pipe.read_to_end(&mut bytes);
            }
            bytes
        })
    };
    let stdout = drain(guard.child.stdout.take().map(|p| Box::new(p) as _));
    let stderr = drain(guard.child.stderr.take().map(|p| Box::new(p) as _));
    let Some(status) = guard.wait_exit(timeout).await else {
        panic!("{} did not finish within {timeout:?}", guard.what);
    };
    Output {
        status,
        stdout: stdout.join().expect("stdout reader"),
        stderr: stderr.join().expect("stderr reader"),
    }
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// A free loopback port: bound, read and released.
fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    listener.local_addr().expect("local_addr").port()
}

fn http_client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(5))
        .build()
        .expect("build the HTTP client")
}

// ---------------------------------------------------------------------------------------
// The fake provider.

/// Serves a fresh fake provider on 127.0.0.1 in the test's runtime; returns it and its
/// token endpoint URL.
async fn start_provider() -> (FakeProvider, String) {
    let fake = FakeProvider::new(LIFETIME, Clock::system());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind the fake provider");
    let addr = listener.local_addr().expect("provider address");
    let router = fake.router();
    tokio::spawn(async move {
        axum::serve(listener, router)
            .await
            .expect("the fake provider serves");
    });
    (fake, format!("http://{addr}/token"))
}

// ---------------------------------------------------------------------------------------
// Configs.

/// A Zywave-style account: refresh_token grant, form body, secret in the body, and a
/// Profile header consumers must send.
fn zywave_account(
    name: &str,
    token_url: &str,
    client_id: &str,
    secret: &str,
    seed: &str,
) -> String {
    format!(
        r#"
[accounts.{name}]
grant = "refresh_token"
token_url = "{token_url}"
client_id = "{client_id}"
client_secret = "{secret}"
client_auth = "client_secret_post"
request_format = "form"
scope = "offline_access api:read"
refresh_token = "{seed}"
headers = {{ Profile = "B 1234" }}
"#
    )
}

/// A client_credentials account against the generic endpoint (string `expires_in`).
fn client_credentials_account(
    name: &str,
    token_url: &str,
    client_id: &str,
    secret: &str,
) -> String {
    format!(
        r#"
[accounts.{name}]
grant = "client_credentials"
token_url = "{token_url}"
client_id = "{client_id}"
client_secret = "{secret}"
scope = "svc.example.com"
"#
    )
}

/// A Zephr-style account: JSON body, HTTP Basic client authentication.
fn zephr_account(name: &str, token_url: &str, client_id: &str, secret: &str, seed: &str) -> String {
    format!(
        r#"
[accounts.{name}]
grant = "refresh_token"
token_url = "{token_url}"
client_id = "{client_id}"
client_secret = "{secret}"
client_auth = "client_secret_basic"
request_format = "json"
scope = "user.account:read user.profile:read"
refresh_token = "{seed}"
"#
    )
}

/// One test's world: a temp dir holding the config, the state dir and the daemon's log,
/// and a free port for the daemon to listen on.
struct Setup {
    dir: TempDir,
    port: u16,
}

impl Setup {
    fn new() -> Setup {
        Setup {
            dir: tempfile::tempdir().expect("temp dir"),
            port: free_port(),
        }
    }

    fn config_path(&self) -> PathBuf {
        self.dir.path().join("tokend.toml")
    }

    fn state_dir(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    fn state_file(&self, account: &str) -> PathBuf {
        self.state_dir().join(format!("{account}.json"))
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("tokend.log")
    }

    fn base(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn config_text(&self, accounts: &[String]) -> String {
        format!(
            "[server]\nlisten = [\"127.0.0.1:{}\"]\n\n[state]\ndir = \"{}\"\n{}",
            self.port,
            self.state_dir().display(),
            accounts.concat()
        )
    }

    fn write_config(&self, accounts: &[String]) {
        fs::write(self.config_path(), self.config_text(accounts)).expect("write the config");
    }

    fn start(&self) -> Daemon {
        Daemon::start(&self.config_path(), &self.base(), &self.log_path())
    }

    /// The state file as JSON.
    fn state(&self, account: &str) -> Value {
        let path = self.state_file(account);
        let body = fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("read the state file {}: {e}", path.display()));
        serde_json::from_str(&body).expect("the state file is JSON")
    }
}

// ---------------------------------------------------------------------------------------
// The daemon.

/// A running `tokend run`; its stdout and stderr go to a log file that panics quote.
struct Daemon {
    proc: ChildGuard,
    base: String,
    log: PathBuf,
}

impl Daemon {
    fn start(config: &Path, base: &str, log: &Path) -> Daemon {
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .expect("open the daemon log");
        let mut cmd = tokend();
        cmd.arg("run")
            .arg("--config")
            .arg(config)
            .stdout(Stdio::from(file.try_clone().expect("clone the log handle")))
            .stderr(Stdio::from(file));
        Daemon {
            proc: ChildGuard::spawn(cmd),
            base: base.to_string(),
            log: log.to_path_buf(),
        }
    }

    fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// Polls `/readyz` until it answers 200.
    async fn wait_ready(&mut self, client: &reqwest::Client) {
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if let Some(status) = self.proc.exited() {
                panic!(
                    "tokend exited ({status}) before it was ready; log:\n{}",
                    self.log()
                );
            }
            let last = match client.get(self.url("/readyz")).send().await {
                Ok(r) if r.status() == StatusCode::OK => {
                    let body: Value = r.json().await.expect("/readyz answers JSON");
                    assert_eq!(body["ready"], true, "{body}");
                    return;
                }
                Ok(r) => format!("{}: {}", r.status(), r.text().await.unwrap_or_default()),
                Err(e) => e.to_string(),
            };
            assert!(
                Instant::now() < deadline,
                "tokend was not ready within {READY_TIMEOUT:?}; last /readyz: {last}; log:\n{}",
                self.log()
            );
            tokio::time::sleep(POLL).await;
        }
    }

    /// Polls the log until it contains `needle`.
    async fn wait_log(&mut self, needle: &str) {
        let deadline = Instant::now() + READY_TIMEOUT;
        while !self.log().contains(needle) {
            if let Some(status) = self.proc.exited() {
                panic!(
                    "tokend exited ({status}) while waiting for {needle:?} in its log:\n{}",
                    self.log()
                );
            }
            assert!(
                Instant::now() < deadline,
                "{needle:?} did not appear in the log within {READY_TIMEOUT:?}; log:\n{}",
                self.log()
            );
            tokio::time::sleep(POLL).await;
        }
    }

    /// SIGTERM, then waits for the exit.
    async fn stop(&mut self) -> ExitStatus {
        self.proc.signal("TERM");
        match self.proc.wait_exit(EXIT_TIMEOUT).await {
            Some(status) => status,
            None => panic!(
                "tokend did not exit within {EXIT_TIMEOUT:?} of SIGTERM; log:\n{}",
                self.log()
            ),
        }
    }

    /// GET `/v1/token/{account}` with the request header; asserts 200 and returns the JSON.
    async fn token(&self, client: &reqwest::Client, account: &str) -> Value {
        let response = client
            .get(self.url(&format!("/v1/token/{account}")))
            .header(REQUEST_HEADER, "test")
            .send()
            .await
            .expect("GET /v1/token");
        let status = response.status();
        let body = response.text().await.expect("token body");
        assert_eq!(
            status,
            StatusCode::OK,
            "/v1/token/{account}: {body}; log:\n{}",
            self.log()
        );
        serde_json::from_str(&body).expect("token JSON")
    }

    async fn accounts(&self, client: &reqwest::Client) -> (String, Value) {
        let response = client
            .get(self.url("/v1/accounts"))
            .send()
            .await
            .expect("GET /v1/accounts");
        assert_eq!(response.status(), StatusCode::OK);
        let body = response.text().await.expect("accounts body");
        let json = serde_json::from_str(&body).expect("accounts JSON");
        (body, json)
    }
}

fn account_names(accounts: &Value) -> Vec<String> {
    accounts["accounts"]
        .as_array()
        .expect("`accounts` is an array")
        .iter()
        .map(|a| a["account"].as_str().expect("account name").to_string())
        .collect()
}

fn access_token(token: &Value) -> String {
    token["access_token"]
        .as_str()
        .filter(|t| !t.is_empty())
        .unwrap_or_else(|| panic!("no access_token in {token}"))
        .to_string()
}

/// 1-based line of the first line of `text` containing `needle`.
fn line_of(text: &str, needle: &str) -> usize {
    text.lines()
        .position(|l| l.contains(needle))
        .unwrap_or_else(|| panic!("{needle:?} not in the config"))
        + 1
}

// ---------------------------------------------------------------------------------------
// 1. tokend check

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_reports_file_line_and_key_and_exits_78_on_bad_configs() {
    let setup = Setup::new();
    let url = "http://127.0.0.1:9/token";
    let good = [
        zywave_account(
            "a",
            url,
            "zy-client",
            "zy-secret-literal",
            "rt-seed-literal",
        ),
        client_credentials_account("svc", url, "svc-client", "svc-secret-literal"),
    ];

    // An unknown key is a config error, located.
    let mut unknown = setup.config_text(&good);
    unknown = unknown.replacen(
        "scope = \"offline_access api:read\"\n",
        "scope = \"offline_access api:read\"\nrefresh_tokn = \"typo\"\n",
        1,
    );
    let path = setup.dir.path().join("unknown.toml");
    fs::write(&path, &unknown).unwrap();
    let out = run_cmd(
        {
            let mut c = tokend();
            c.arg("check").arg("--config").arg(&path);
            c
        },
        EXIT_TIMEOUT,
    )
    .await;
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(78), "stderr: {stderr}");
    let line = line_of(&unknown, "refresh_tokn");
    assert!(
        stderr.contains(&format!("{}:{line}:", path.display())),
        "stderr must name the file and line {line}: {stderr}"
    );
    assert!(
        stderr.contains("accounts.a.refresh_tokn"),
        "stderr must name the key: {stderr}"
    );
    // `tokend run` refuses it with the same code, so systemd does not restart-loop.
    let out = run_cmd(
        {
            let mut c = tokend();
            c.arg("run").arg("--config").arg(&path);
            c
        },
        EXIT_TIMEOUT,
    )
    .await;
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(78), "stderr: {stderr}");
    assert!(
        stderr.contains("accounts.a.refresh_tokn"),
        "stderr must name the key: {stderr}"
    );

    // A semantic error (a token URL that is not https) is located the same way.
    let semantic = setup.config_text(&good).replacen(
        &format!("token_url = \"{url}\""),
        "token_url = \"ftp://x\"",
        1,
    );
    let path = setup.dir.path().join("semantic.toml");
    fs::write(&path, &semantic).unwrap();
    let out = run_cmd(
        {
            let mut c = tokend();
            c.arg("check").arg("--config").arg(&path);
            c
        },
        EXIT_TIMEOUT,
    )
    .await;
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(78), "stderr: {stderr}");
    let line = line_of(&semantic, "ftp://x");
    assert!(
        stderr.contains(&format!("{}:{line}:", path.display())),
        "stderr must name the file and line {line}: {stderr}"
    );
    assert!(
        stderr.contains("accounts.a.token_url"),
        "stderr must name the key: {stderr}"
    );

    // A good config passes and says what each account will do, without its secrets.
    setup.write_config(&good);
    let out = run_cmd(
        {
            let mut c = tokend();
            c.arg("check").arg("--config").arg(setup.config_path());
            c
        },
        EXIT_TIMEOUT,
    )
    .await;
    let stdout = text(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "stdout: {stdout}\nstderr: {}",
        text(&out.stderr)
    );
    for (name, grant) in [("a", "refresh_token"), ("svc", "client_credentials")] {
        let line = stdout
            .lines()
            .find(|l| l.trim_start().starts_with(&format!("{name}:")))
            .unwrap_or_else(|| panic!("no line for account {name}: {stdout}"));
        assert!(line.contains(&format!("grant={grant}")), "{line}");
        assert!(line.contains(&format!("endpoint={url}")), "{line}");
        assert!(
            line.contains(&format!("state={}", setup.state_file(name).display())),
            "{line}"
        );
    }
    for secret in ["zy-secret-literal", "rt-seed-literal", "svc-secret-literal"] {
        assert!(!stdout.contains(secret), "check printed a secret: {stdout}");
    }
}

/// A global `[refresh] backoff_initial` above the default `backoff_max` is one mistake on
/// one line; every problem `tokend check` reports must point at a line of the file that
/// is about it, not at line 1.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_locates_a_global_backoff_conflict_at_its_own_line() {
    let setup = Setup::new();
    let config = setup.config_text(&[client_credentials_account(
        "a",
        "https://idp.example.com/token",
        "svc-client",
        "svc-secret-literal",
    )]) + "\n[refresh]\nbackoff_initial = \"10m\"\n";
    fs::write(setup.config_path(), &config).unwrap();
    let out = run_cmd(
        {
            let mut c = tokend();
            c.arg("check").arg("--config").arg(setup.config_path());
            c
        },
        EXIT_TIMEOUT,
    )
    .await;
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(78), "stderr: {stderr}");
    let prefix = format!("{}:", setup.config_path().display());
    let lines: Vec<&str> = config.lines().collect();
    let problems: Vec<&str> = stderr.lines().filter(|l| l.starts_with(&prefix)).collect();
    assert!(!problems.is_empty(), "no located problem: {stderr}");
    for problem in problems {
        let line: usize = problem[prefix.len()..]
            .split(':')
            .next()
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no line number in {problem:?}"));
        let at = line.checked_sub(1).and_then(|i| lines.get(i));
        assert!(
            at.is_some_and(|l| l.contains("backoff")),
            "{problem:?} points at line {line} ({at:?}), which is not about backoff; config:\n{config}"
        );
    }
}

// ---------------------------------------------------------------------------------------
// 2. tokend run: the HTTP API

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_serves_fresh_tokens_with_headers_and_guards() {
    let (fake, url) = start_provider().await;
    fake.register(ClientSpec::zywave("zy-client", "zy-secret-literal"));
    fake.register(ClientSpec::generic_client_credentials(
        "svc-client",
        "svc-secret-literal",
    ));
    let seed = fake.grant_refresh_token("zy-client", Some("offline_access api:read"));
    let setup = Setup::new();
    setup.write_config(&[
        zywave_account("zy", &url, "zy-client", "zy-secret-literal", &seed),
        client_credentials_account("svc", &url, "svc-client", "svc-secret-literal"),
    ]);
    let client = http_client();
    let mut daemon = setup.start();
    daemon.wait_ready(&client).await;

    // Without the request header: 403 with a JSON error.
    let response = client.get(daemon.url("/v1/token/zy")).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::FORBIDDEN);
    let body: Value = response.json().await.expect("403 is JSON");
    assert_eq!(body["error"], "forbidden", "{body}");
    assert!(body.get("access_token").is_none());

    // With it: the whole answer.
    let response = client
        .get(daemon.url("/v1/token/zy"))
        .header(REQUEST_HEADER, "1")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(
        response
            .headers()
            .get("cache-control")
            .map(|v| v.to_str().unwrap()),
        Some("no-store")
    );
    let zy: Value = response.json().await.unwrap();
    let zy_token = access_token(&zy);
    assert_eq!(zy["account"], "zy");
    assert_eq!(zy["token_type"], "Bearer");
    let expires_at = zy["expires_at"].as_str().expect("expires_at is a string");
    assert!(
        expires_at.len() == 20 && expires_at.ends_with('Z') && expires_at.as_bytes()[10] == b'T',
        "expires_at is RFC 3339 UTC: {expires_at}"
    );
    let expires_in = zy["expires_in"].as_u64().expect("expires_in is a number");
    assert!(
        (3500..=3600).contains(&expires_in),
        "expires_in {expires_in}"
    );
    assert_eq!(zy["scope"], "offline_access api:read");
    assert_eq!(zy["headers"]["Authorization"], format!("Bearer {zy_token}"));
    assert_eq!(zy["headers"]["Profile"], "B 1234");
    assert!(
        fake.is_valid_access_token(&zy_token),
        "the provider does not know {zy_token}"
    );

    // The client_credentials account (its endpoint sends expires_in as a string).
    let svc = daemon.token(&client, "svc").await;
    let svc_token = access_token(&svc);
    assert_eq!(svc["account"], "svc");
    assert_eq!(svc["token_type"], "Bearer");
    assert_eq!(svc["scope"], "svc.example.com");
    assert_eq!(
        svc["headers"]["Authorization"],
        format!("Bearer {svc_token}")
    );
    assert!(svc["headers"].get("Profile").is_none(), "{svc}");
    let expires_in = svc["expires_in"].as_u64().expect("expires_in is a number");
    assert!(
        (3500..=3600).contains(&expires_in),
        "expires_in {expires_in}"
    );
    assert!(fake.is_valid_access_token(&svc_token));

    // The bare token as text/plain.
    let response = client
        .get(daemon.url("/v1/token/zy/access_token"))
        .header(REQUEST_HEADER, "1")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let content_type = response.headers()["content-type"]
        .to_str()
        .unwrap()
        .to_string();
    assert!(content_type.starts_with("text/plain"), "{content_type}");
    assert_eq!(response.text().await.unwrap(), zy_token);

    // An unknown account: 404 JSON.
    let response = client
        .get(daemon.url("/v1/token/nope"))
        .header(REQUEST_HEADER, "1")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::NOT_FOUND);
    let body: Value = response.json().await.expect("404 is JSON");
    assert_eq!(body["error"], "unknown_account", "{body}");

    // The account list: both ok, no secret anywhere.
    let (raw, accounts) = daemon.accounts(&client).await;
    assert_eq!(account_names(&accounts), ["svc", "zy"]);
    for a in accounts["accounts"].as_array().unwrap() {
        assert_eq!(a["state"], "ok", "{a}");
    }
    let current_rt = setup.state("zy")["refresh_token"]
        .as_str()
        .expect("a refresh token in the state file")
        .to_string();
    for secret in [
        zy_token.as_str(),
        svc_token.as_str(),
        seed.as_str(),
        current_rt.as_str(),
        "zy-secret-literal",
        "svc-secret-literal",
    ] {
        assert!(!raw.contains(secret), "/v1/accounts leaks {secret}: {raw}");
    }
    assert_eq!(fake.counts().rejected, 0);
}

// ---------------------------------------------------------------------------------------
// 3. Zephr style

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zephr_style_account_works_end_to_end() {
    let (fake, url) = start_provider().await;
    fake.register(ClientSpec::zephr("zephr-client", "zephr-secret-literal"));
    let seed =
        fake.grant_refresh_token("zephr-client", Some("user.account:read user.profile:read"));
    let setup = Setup::new();
    setup.write_config(&[zephr_account(
        "zephr",
        &url,
        "zephr-client",
        "zephr-secret-literal",
        &seed,
    )]);
    let client = http_client();
    let mut daemon = setup.start();
    daemon.wait_ready(&client).await;

    let token = daemon.token(&client, "zephr").await;
    let at = access_token(&token);
    assert!(fake.is_valid_access_token(&at));
    assert_eq!(token["token_type"], "Bearer");
    assert_eq!(token["headers"]["Authorization"], format!("Bearer {at}"));
    // Zephr answers with a comma-separated scope; tokend serves it space-separated.
    assert_eq!(token["scope"], "user.account:read user.profile:read");
    let counts = fake.counts();
    assert_eq!(
        counts.rejected, 0,
        "the provider rejected a request: {counts:?}"
    );
    assert_eq!(counts.refresh_grants, 1, "{counts:?}");
    // The rotated refresh token was kept.
    let rt = setup.state("zephr")["refresh_token"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(fake.is_live_refresh_token(&rt));
    assert!(!fake.is_live_refresh_token(&seed));
}

// ---------------------------------------------------------------------------------------
// 4. Restart persistence

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_serves_the_persisted_token_without_calling_the_provider() {
    let (fake, url) = start_provider().await;
    fake.register(ClientSpec::zywave("zy-client", "zy-secret-literal"));
    fake.register(ClientSpec::generic_client_credentials(
        "svc-client",
        "svc-secret-literal",
    ));
    let seed = fake.grant_refresh_token("zy-client", Some("offline_access api:read"));
    let setup = Setup::new();
    setup.write_config(&[
        zywave_account("zy", &url, "zy-client", "zy-secret-literal", &seed),
        client_credentials_account("svc", &url, "svc-client", "svc-secret-literal"),
    ]);
    let client = http_client();

    let mut first = setup.start();
    first.wait_ready(&client).await;
    let zy_before = access_token(&first.token(&client, "zy").await);
    let svc_before = access_token(&first.token(&client, "svc").await);
    let counts = fake.counts();
    assert_eq!(counts.issued, 2, "{counts:?}");

    let status = first.stop().await;
    assert_eq!(
        status.code(),
        Some(0),
        "SIGTERM exit; log:\n{}",
        first.log()
    );

    for account in ["zy", "svc"] {
        let mode = fs::metadata(setup.state_file(account))
            .expect("the state file exists")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "{account}: mode {:o}", mode & 0o777);
    }
    let state = setup.state("zy");
    let stored_rt = state["refresh_token"]
        .as_str()
        .expect("a stored refresh token");
    assert_ne!(stored_rt, seed, "the refresh token was not rotated");
    assert!(
        fake.is_live_refresh_token(stored_rt),
        "the stored refresh token is dead"
    );
    assert!(!fake.is_live_refresh_token(&seed), "the seed is still live");
    assert!(
        state.get("refresh_in_flight_since").is_none(),
        "a clean stop leaves no refresh in flight: {state}"
    );

    let mut second = setup.start();
    second.wait_ready(&client).await;
    assert_eq!(fake.counts(), counts, "the restart called the provider");
    assert_eq!(access_token(&second.token(&client, "zy").await), zy_before);
    assert_eq!(
        access_token(&second.token(&client, "svc").await),
        svc_before
    );
    assert_eq!(
        fake.counts(),
        counts,
        "serving the persisted token called the provider"
    );
    assert!(fake.is_valid_access_token(&zy_before));

    let status = second.stop().await;
    assert_eq!(
        status.code(),
        Some(0),
        "SIGTERM exit; log:\n{}",
        second.log()
    );
}

// ---------------------------------------------------------------------------------------
// 5. The state directory lock

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_daemon_on_the_same_state_dir_is_refused() {
    let (fake, url) = start_provider().await;
    fake.register(ClientSpec::generic_client_credentials(
        "svc-client",
        "svc-secret-literal",
    ));
    let setup = Setup::new();
    let accounts = [client_credentials_account(
        "svc",
        &url,
        "svc-client",
        "svc-secret-literal",
    )];
    setup.write_config(&accounts);
    let client = http_client();
    let mut first = setup.start();
    first.wait_ready(&client).await;

    // Same state dir, another port: only the lock can stop it.
    let other = setup.config_text(&accounts).replace(
        &format!("127.0.0.1:{}", setup.port),
        &format!("127.0.0.1:{}", free_port()),
    );
    let other_path = setup.dir.path().join("other.toml");
    fs::write(&other_path, other).unwrap();
    let out = run_cmd(
        {
            let mut c = tokend();
            c.arg("run").arg("--config").arg(&other_path);
            c
        },
        READY_TIMEOUT,
    )
    .await;
    let stderr = text(&out.stderr);
    assert!(
        !out.status.success(),
        "the second daemon ran; stderr: {stderr}"
    );
    assert!(
        stderr.contains("locked"),
        "stderr must say the state dir is locked: {stderr}"
    );
    assert!(
        stderr.contains(&setup.state_dir().display().to_string()),
        "stderr must name the state dir: {stderr}"
    );
    assert!(
        stderr.contains(&format!("pid {}", first.proc.pid())),
        "stderr should name the holder: {stderr}"
    );

    // The first daemon is unharmed.
    assert!(first.proc.exited().is_none());
    first.token(&client, "svc").await;
}

// ---------------------------------------------------------------------------------------
// 6. SIGHUP reload

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_accounts_and_keeps_running_on_a_broken_config() {
    let (fake, url) = start_provider().await;
    fake.register(ClientSpec::zywave("zy-client", "zy-secret-literal"));
    fake.register(ClientSpec::generic_client_credentials(
        "svc-client",
        "svc-secret-literal",
    ));
    let seed = fake.grant_refresh_token("zy-client", Some("offline_access api:read"));
    let setup = Setup::new();
    setup.write_config(&[zywave_account(
        "a",
        &url,
        "zy-client",
        "zy-secret-literal",
        &seed,
    )]);
    let client = http_client();
    let mut daemon = setup.start();
    daemon.wait_ready(&client).await;
    let (_, accounts) = daemon.accounts(&client).await;
    assert_eq!(account_names(&accounts), ["a"]);

    // Add b, remove a.
    let b = client_credentials_account("b", &url, "svc-client", "svc-secret-literal");
    setup.write_config(std::slice::from_ref(&b));
    daemon.proc.signal("HUP");
    let deadline = Instant::now() + READY_TIMEOUT;
    loop {
        let (_, accounts) = daemon.accounts(&client).await;
        if account_names(&accounts) == ["b"] {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the reload did not leave exactly b: {accounts}; log:\n{}",
            daemon.log()
        );
        tokio::time::sleep(POLL).await;
    }
    let b_token = access_token(&daemon.token(&client, "b").await);
    assert!(fake.is_valid_access_token(&b_token));
    let response = client
        .get(daemon.url("/v1/token/a"))
        .header(REQUEST_HEADER, "1")
        .send()
        .await
        .unwrap();
    assert_eq!(
        response.status(),
        StatusCode::NOT_FOUND,
        "a removed account is gone"
    );

    // A broken config: logged, and the running one kept.
    fs::write(
        setup.config_path(),
        setup.config_text(&[b.replace("scope =", "scoop =")]),
    )
    .unwrap();
    daemon.proc.signal("HUP");
    daemon.wait_log("the new config is invalid").await;
    assert!(
        daemon.proc.exited().is_none(),
        "a broken reload killed the daemon"
    );
    assert_eq!(access_token(&daemon.token(&client, "b").await), b_token);
    let (_, accounts) = daemon.accounts(&client).await;
    assert_eq!(account_names(&accounts), ["b"]);
    let status = daemon.stop().await;
    assert_eq!(status.code(), Some(0));
}

// ---------------------------------------------------------------------------------------
// 7. tokend token

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_command_prints_the_token_and_reports_an_unreachable_daemon() {
    let (fake, url) = start_provider().await;
    fake.register(ClientSpec::zywave("zy-client", "zy-secret-literal"));
    let seed = fake.grant_refresh_token("zy-client", Some("offline_access api:read"));
    let setup = Setup::new();
    setup.write_config(&[zywave_account(
        "zy",
        &url,
        "zy-client",
        "zy-secret-literal",
        &seed,
    )]);
    let client = http_client();
    let mut daemon = setup.start();
    daemon.wait_ready(&client).await;
    let expected = access_token(&daemon.token(&client, "zy").await);

    let token_cmd = |endpoint: &str, extra: &[&str]| {
        let mut c = tokend();
        c.args(["token", "zy", "--endpoint", endpoint]).args(extra);
        c
    };

    let out = run_cmd(token_cmd(&daemon.base, &[]), READY_TIMEOUT).await;
    assert_eq!(out.status.code(), Some(0), "stderr: {}", text(&out.stderr));
    assert_eq!(text(&out.stdout), format!("{expected}\n"));

    let out = run_cmd(token_cmd(&daemon.base, &["--json"]), READY_TIMEOUT).await;
    assert_eq!(out.status.code(), Some(0), "stderr: {}", text(&out.stderr));
    let json: Value = serde_json::from_slice(&out.stdout).expect("--json prints JSON");
    assert_eq!(json["account"], "zy");
    assert_eq!(access_token(&json), expected);
    assert_eq!(json["headers"]["Profile"], "B 1234");

    // An account the daemon does not have: a refused request, exit 1.
    let mut c = tokend();
    c.args(["token", "nope", "--endpoint", &daemon.base]);
    let out = run_cmd(c, READY_TIMEOUT).await;
    assert_eq!(out.status.code(), Some(1), "stderr: {}", text(&out.stderr));
    assert!(out.stdout.is_empty());

    // Nobody listening: EX_UNAVAILABLE.
    let closed = format!("http://127.0.0.1:{}", free_port());
    let out = run_cmd(token_cmd(&closed, &[]), READY_TIMEOUT).await;
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(69), "stderr: {stderr}");
    assert!(out.stdout.is_empty());
    assert!(
        stderr.contains(&closed),
        "stderr should name the endpoint: {stderr}"
    );
}

// ---------------------------------------------------------------------------------------
// 8. tokend demo

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_prints_a_working_curl_line_and_stops_on_sigint() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("demo.log");
    let mut cmd = tokend();
    cmd.arg("demo")
        .stdout(Stdio::piped())
        .stderr(Stdio::from(fs::File::create(&log).unwrap()));
    let mut demo = ChildGuard::spawn(cmd);
    let stdout = demo.child.stdout.take().expect("piped stdout");
    let (tx, rx) = mpsc::channel::<String>();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let read_log = || fs::read_to_string(&log).unwrap_or_default();

    // Read until the curl line with a /v1/token/ URL.
    let deadline = Instant::now() + READY_TIMEOUT;
    let mut lines = Vec::new();
    let url = loop {
        while let Ok(line) = rx.try_recv() {
            lines.push(line);
        }
        let found = lines.iter().find_map(|l| {
            if !l.contains("curl") {
                return None;
            }
            l.split_whitespace()
                .find(|w| w.starts_with("http://") && w.contains("/v1/token/"))
                .map(|w| w.trim_end_matches(['\'', '"', ')']).to_string())
        });
        if let Some(url) = found {
            break url;
        }
        if let Some(status) = demo.exited() {
            panic!(
                "the demo exited ({status}); stdout: {lines:#?}; log:\n{}",
                read_log()
            );
        }
        assert!(
            Instant::now() < deadline,
            "no curl line within {READY_TIMEOUT:?}; stdout: {lines:#?}; log:\n{}",
            read_log()
        );
        tokio::time::sleep(POLL).await;
    };
    assert!(url.starts_with("http://127.0.0.1:"), "{url}");

    let client = http_client();
    let response = client
        .get(&url)
        .header(REQUEST_HEADER, "1")
        .send()
        .await
        .unwrap_or_else(|e| panic!("GET {url}: {e}; log:\n{}", read_log()));
    assert_eq!(response.status(), StatusCode::OK, "log:\n{}", read_log());
    let body: Value = response.json().await.unwrap();
    let token = access_token(&body);
    assert_eq!(body["headers"]["Authorization"], format!("Bearer {token}"));

    // The temp state dir the demo announced.
    let state_dir = lines
        .iter()
        .find_map(|l| l.split("state in ").nth(1))
        .map(|s| PathBuf::from(s.trim()))
        .expect("the demo names its state dir");
    assert!(state_dir.is_dir(), "{}", state_dir.display());

    demo.signal("INT");
    let status = demo.wait_exit(EXIT_TIMEOUT).await.unwrap_or_else(|| {
        panic!(
            "the demo did not stop within {EXIT_TIMEOUT:?} of SIGINT; log:\n{}",
            read_log()
        )
    });
    assert_eq!(status.code(), Some(0), "log:\n{}", read_log());
    assert!(
        !state_dir.exists(),
        "the demo left its state dir {}",
        state_dir.display()
    );
}

// ---------------------------------------------------------------------------------------
// 9. A taken listen address

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_fails_fast_when_the_listen_address_is_taken() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap();
    let setup = Setup {
        dir: tempfile::tempdir().unwrap(),
        port: addr.port(),
    };
    setup.write_config(&[client_credentials_account(
        "svc",
        "http://127.0.0.1:9/token",
        "svc-client",
        "svc-secret-literal",
    )]);
    let mut c = tokend();
    c.arg("run").arg("--config").arg(setup.config_path());
    let out = run_cmd(c, READY_TIMEOUT).await;
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "stderr: {stderr}");
    assert!(
        stderr.contains(&addr.to_string()),
        "stderr must name {addr}: {stderr}"
    );
    drop(taken);
}
