//! Helpers for tests that run the real `tokend` binary against the fake provider served
//! over real loopback TCP (127.0.0.1 only): commands with an environment that cannot leak
//! in from the caller's shell, child processes that are always killed and reaped when the
//! test ends (also while unwinding from a panic), their configs and setups, and bounded
//! polling for conditions — never a sleep standing in for one. The provider itself is
//! started by `provider`.

use std::fs::{self, OpenOptions};
use std::io::Read;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

use reqwest::StatusCode;
use serde_json::Value;
use tempfile::TempDir;
use tokend::demo::fake_provider::FakeProvider;

use super::config::{account, refresh_token_account};
use super::provider::start_provider_with_clients;

const BIN: &str = env!("CARGO_BIN_EXE_tokend");
/// How often a condition is polled.
pub const POLL: Duration = Duration::from_millis(50);
/// The longest wait for the daemon to become ready (or for any other condition).
pub const READY_TIMEOUT: Duration = Duration::from_secs(15);
/// The longest wait for a process to exit after a signal.
pub const EXIT_TIMEOUT: Duration = Duration::from_secs(10);
/// The header a token request must carry.
pub const REQUEST_HEADER: &str = "Tokend-Request";
/// A config section that lets accounts refresh as often as every second.
pub const FAST_REFRESH: &str = "\n[refresh]\nmin_interval = \"1s\"\n";

// ---------------------------------------------------------------------------------------
// Processes.

/// A `tokend` command with an environment that cannot leak into the test: no config,
/// endpoint, log format, systemd socket or watchdog from the caller's environment, no
/// proxy between the daemon and 127.0.0.1, `RUST_LOG=info`, stdin closed.
pub fn tokend() -> Command {
    let mut cmd = Command::new(BIN);
    for var in [
        "TOKEND_CONFIG",
        "TOKEND_ENDPOINT",
        "TOKEND_LOG_FORMAT",
        "JOURNAL_STREAM",
        "NOTIFY_SOCKET",
        "WATCHDOG_USEC",
        "WATCHDOG_PID",
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
pub struct ChildGuard {
    pub child: Child,
    pub what: String,
}

impl ChildGuard {
    pub fn spawn(cmd: &mut Command) -> ChildGuard {
        let what = format!("{cmd:?}");
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot spawn {what}: {e}"));
        ChildGuard { child, what }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().expect("try_wait on a child")
    }

    /// Polls until the process exits; `None` if it still runs after `timeout`.
    pub async fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
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

    /// Sends a signal by name (`HUP`, `TERM`, `INT`, `KILL`) with kill(1).
    pub fn signal(&mut self, sig: &str) {
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
pub async fn run_cmd(cmd: &mut Command, timeout: Duration) -> Output {
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

pub fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// A finished command's output, as text.
pub struct Finished {
    pub stdout: String,
    pub stderr: String,
}

/// Asserts that a finished command exited with `code` (quoting its output if not).
pub fn expect_code(out: &Output, code: i32) -> Finished {
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert_eq!(
        out.status.code(),
        Some(code),
        "stdout: {stdout}\nstderr: {stderr}"
    );
    Finished { stdout, stderr }
}

/// A free loopback port: bound, read and released.
pub fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    listener.local_addr().expect("local_addr").port()
}

pub fn http_client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(5))
        .build()
        .expect("build the HTTP client")
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
    refresh_token_account(
        name,
        token_url,
        client_id,
        secret,
        seed,
        r#"client_auth = "client_secret_post"
request_format = "form"
scope = "offline_access api:read"
headers = { Profile = "B 1234" }
"#,
    )
}

/// The `extra` of a Zephr-style `refresh_token_account`: JSON body, HTTP Basic client
/// authentication.
pub const ZEPHR_STYLE: &str = r#"client_auth = "client_secret_basic"
request_format = "json"
scope = "user.account:read user.profile:read"
"#;

/// A client_credentials account against the generic endpoint (string `expires_in`).
fn client_credentials_account(
    name: &str,
    token_url: &str,
    client_id: &str,
    secret: &str,
) -> String {
    let rest = "scope = \"svc.example.com\"\n";
    account(
        name,
        "client_credentials",
        token_url,
        client_id,
        secret,
        rest,
    )
}

/// A Zywave-style account seeded with `seed`, for `zy-client` of
/// `start_provider_with_clients`.
pub fn zy_account(name: &str, token_url: &str, seed: &str) -> String {
    zywave_account(name, token_url, "zy-client", "zy-secret-literal", seed)
}

/// A client_credentials account for `svc-client` of `start_provider_with_clients`.
pub fn svc_account(name: &str, token_url: &str) -> String {
    client_credentials_account(name, token_url, "svc-client", "svc-secret-literal")
}

/// Account `zy` (`zy_account`, seeded with `seed`) and account `svc` (`svc_account`).
pub fn zy_and_svc(token_url: &str, seed: &str) -> Vec<String> {
    vec![
        zy_account("zy", token_url, seed),
        svc_account("svc", token_url),
    ]
}

/// What `zy_and_svc_world` sets up.
pub struct World {
    pub fake: FakeProvider,
    /// The refresh token account `zy` was seeded with.
    pub seed: String,
    pub setup: Setup,
}

/// `start_provider_with_clients`, and a setup whose config has the accounts of
/// `zy_and_svc` (`zy` seeded with `seed`, else with a live refresh token), then `extra`
/// sections.
pub async fn zy_and_svc_world(seed: Option<&str>, extra: &str) -> World {
    let (fake, url, live) = start_provider_with_clients().await;
    let seed = seed.unwrap_or(&live).to_string();
    let setup = Setup::new();
    let mut sections = zy_and_svc(&url, &seed);
    sections.push(extra.to_string());
    setup.write_config(&sections);
    World { fake, seed, setup }
}

/// One test's world: a temp dir holding the config, the state dir and the daemon's log,
/// and a free port for the daemon to listen on.
pub struct Setup {
    pub dir: TempDir,
    pub port: u16,
}

impl Setup {
    pub fn new() -> Setup {
        Setup {
            dir: tempfile::tempdir().expect("temp dir"),
            port: free_port(),
        }
    }

    pub fn config_path(&self) -> PathBuf {
        self.dir.path().join("tokend.toml")
    }

    pub fn state_dir(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    pub fn state_file(&self, account: &str) -> PathBuf {
        self.state_dir().join(format!("{account}.json"))
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("tokend.log")
    }

    pub fn base(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// The config: `[server]` on this setup's port, `[state]` in its dir, then `sections`
    /// (account blocks and any other tables) in order.
    pub fn config_text(&self, sections: &[String]) -> String {
        format!(
            "[server]\nlisten = [\"127.0.0.1:{}\"]\n\n[state]\ndir = \"{}\"\n{}",
            self.port,
            self.state_dir().display(),
            sections.concat()
        )
    }

    /// Writes the config, private (0600) as an operator should: it holds literal secrets.
    pub fn write_config(&self, sections: &[String]) {
        use std::os::unix::fs::PermissionsExt;
        let path = self.config_path();
        fs::write(&path, self.config_text(sections)).expect("write the config");
        fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).expect("chmod the config");
    }

    /// Starts `tokend run --config CONFIG`; its stdout and stderr are appended to the log.
    pub fn start(&self) -> Daemon {
        self.start_with(|_| {})
    }

    /// `start`, then waits until the daemon is ready.
    pub async fn start_ready(&self, client: &reqwest::Client) -> Daemon {
        let mut daemon = self.start();
        daemon.wait_ready(client).await;
        daemon
    }

    /// Like `start`, with `configure` applied to the command last (environment, or other
    /// stdout/stderr).
    pub fn start_with(&self, configure: impl FnOnce(&mut Command)) -> Daemon {
        let log = self.log_path();
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .expect("open the daemon log");
        let mut cmd = tokend();
        cmd.arg("run")
            .arg("--config")
            .arg(self.config_path())
            .stdout(Stdio::from(file.try_clone().expect("clone the log handle")))
            .stderr(Stdio::from(file));
        configure(&mut cmd);
        Daemon {
            proc: ChildGuard::spawn(&mut cmd),
            base: self.base(),
            log,
        }
    }

    /// The state file as JSON.
    pub fn state(&self, account: &str) -> Value {
        let path = self.state_file(account);
        let body = fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("read the state file {}: {e}", path.display()));
        serde_json::from_str(&body).expect("the state file is JSON")
    }
}

// ---------------------------------------------------------------------------------------
// The daemon.

/// A running `tokend run`; its output goes to a log file that panics quote.
pub struct Daemon {
    pub proc: ChildGuard,
    pub base: String,
    pub log: PathBuf,
}

impl Daemon {
    pub fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// Polls `/readyz` until it answers 200 (with `"ready": true`).
    pub async fn wait_ready(&mut self, client: &reqwest::Client) {
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
    pub async fn wait_log(&mut self, needle: &str) {
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

    pub fn signal(&mut self, sig: &str) {
        self.proc.signal(sig);
    }

    /// Waits for the exit; panics with the log if it takes longer than `timeout`.
    pub async fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        match self.proc.wait_exit(timeout).await {
            Some(status) => status,
            None => panic!(
                "tokend did not exit within {timeout:?}; log:\n{}",
                self.log()
            ),
        }
    }

    /// SIGTERM, then waits for the exit.
    pub async fn stop(&mut self) -> ExitStatus {
        self.signal("TERM");
        self.wait_exit(EXIT_TIMEOUT).await
    }

    /// GET `path` with the request header token routes require.
    pub async fn get(&self, client: &reqwest::Client, path: &str) -> reqwest::Response {
        client
            .get(self.url(path))
            .header(REQUEST_HEADER, "test")
            .send()
            .await
            .unwrap_or_else(|e| panic!("GET {path}: {e}"))
    }

    /// GET `/v1/token/{account}` with the request header; asserts 200 and returns the JSON.
    pub async fn token(&self, client: &reqwest::Client, account: &str) -> Value {
        let response = self.get(client, &format!("/v1/token/{account}")).await;
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

    /// GET `/v1/accounts`; asserts 200 and returns the body as text and as JSON.
    pub async fn accounts(&self, client: &reqwest::Client) -> (String, Value) {
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

/// A response's Content-Type.
pub fn content_type(response: &reqwest::Response) -> String {
    response.headers()["content-type"]
        .to_str()
        .expect("a textual content-type")
        .to_string()
}

/// The account names in a `/v1/accounts` answer, in its order.
pub fn account_names(accounts: &Value) -> Vec<String> {
    accounts["accounts"]
        .as_array()
        .expect("`accounts` is an array")
        .iter()
        .map(|a| a["account"].as_str().expect("account name").to_string())
        .collect()
}

/// The non-empty `access_token` of a token answer.
pub fn access_token(token: &Value) -> String {
    token["access_token"]
        .as_str()
        .filter(|t| !t.is_empty())
        .unwrap_or_else(|| panic!("no access_token in {token}"))
        .to_string()
}
