//! Getting refresh tokens in and out: `tokend login` (loopback redirect and `--manual`),
//! `import` and `logout` run as the real binary against the fake provider over loopback,
//! with the test playing the browser; the device flow and discovery through the library
//! on tokio's paused clock; the daemon taking handoffs on SIGHUP. Every wait is a bounded
//! poll of a condition.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::Value;
use tempfile::TempDir;
use tokend::cli::login::{self, LoginError};
use tokend::clock::Clock;
use tokend::config::{AccountConfig, AccountName};
use tokend::demo::fake_provider::{ClientSpec, DevicePoll, FakeProvider};
use tokend::provider::discovery::{self, DiscoveryError};
use tokend::provider::{Provider, Transport};

use crate::support::{self, Harness, Setup, epoch, http_client, serve_fake};

const LIMIT: Duration = Duration::from_secs(20);

// ---------------------------------------------------------------------------------------
// The binary, played against.

/// A `tokend` child with piped stdio, killed if still running when dropped; its stdout
/// and stderr lines arrive on channels.
struct Cli {
    child: Child,
    stdout: mpsc::Receiver<String>,
    stderr: mpsc::Receiver<String>,
    out: Vec<String>,
    err: Vec<String>,
}

impl Cli {
    fn spawn(args: &[&str], config: &Path) -> Cli {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_tokend"));
        for var in [
            "TOKEND_CONFIG",
            "DISPLAY",
            "WAYLAND_DISPLAY",
            "HTTP_PROXY",
            "http_proxy",
        ] {
            cmd.env_remove(var);
        }
        let mut child = cmd
            .args(args)
            .arg("--config")
            .arg(config)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn tokend");
        let lines = |pipe: Box<dyn Read + Send>| {
            let (tx, rx) = mpsc::channel();
            std::thread::spawn(move || {
                for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                    let _ = tx.send(line);
                }
            });
            rx
        };
        let stdout = lines(Box::new(child.stdout.take().unwrap()));
        let stderr = lines(Box::new(child.stderr.take().unwrap()));
        Cli {
            child,
            stdout,
            stderr,
            out: Vec::new(),
            err: Vec::new(),
        }
    }

    /// The first stdout line that starts with `prefix` (bounded). Polls without
    /// blocking: the fake provider runs on this test's runtime.
    async fn line_starting(&mut self, prefix: &str) -> String {
        let deadline = Instant::now() + LIMIT;
        loop {
            match self.stdout.try_recv() {
                Ok(line) => {
                    self.out.push(line.clone());
                    if line.starts_with(prefix) {
                        return line;
                    }
                    continue;
                }
                Err(mpsc::TryRecvError::Empty) if Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Err(_) => {
                    let err = self.drain_err();
                    panic!(
                        "no line starting with {prefix:?}; stdout {:?}; stderr {err}",
                        self.out
                    )
                }
            }
        }
    }

    fn send_stdin(&mut self, text: &str) {
        let mut stdin = self.child.stdin.take().expect("stdin");
        stdin.write_all(text.as_bytes()).unwrap();
        // Dropped: EOF.
    }

    fn drain_err(&mut self) -> String {
        while let Ok(l) = self.stderr.try_recv() {
            self.err.push(l);
        }
        self.err.join("\n")
    }

    /// Waits for the exit; returns the status, all of stdout and all of stderr.
    async fn finish(mut self) -> (ExitStatus, String, String) {
        let deadline = Instant::now() + LIMIT;
        let status = loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                break s;
            }
            assert!(
                Instant::now() < deadline,
                "tokend did not exit; stderr {}",
                self.drain_err()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        // The reader threads end at EOF, right after the exit.
        let out: Vec<String> = self.stdout.iter().collect();
        let err: Vec<String> = self.stderr.iter().collect();
        self.out.extend(out);
        self.err.extend(err);
        (status, self.out.join("\n"), self.err.join("\n"))
    }
}

impl Drop for Cli {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// The fake provider on 127.0.0.1, knowing its base URL, with the Zywave-style client
/// and its redirect URIs registered.
async fn provider() -> (FakeProvider, String) {
    let fake = FakeProvider::new(Duration::from_secs(3600), Clock::system());
    fake.register(ClientSpec::zywave("zy-client", "zy-secret"));
    fake.register(ClientSpec::zephr("zephr-client", "zephr-secret"));
    fake.register_redirect_uri("zy-client", "http://127.0.0.1/callback");
    fake.register_redirect_uri("zephr-client", "https://app.example.com/callback");
    let (addr, _stop) = serve_fake(&fake).await;
    let base = format!("http://{addr}");
    fake.set_base_url(&base);
    (fake, base)
}

/// A setup whose config has `accounts`.
fn setup(accounts: &str) -> Setup {
    let setup = Setup::new();
    setup.write_config(&[accounts.to_string()]);
    setup
}

fn stored_refresh_token(setup: &Setup, account: &str) -> String {
    setup.state(account)["refresh_token"]
        .as_str()
        .unwrap()
        .to_string()
}

/// A Zywave-style account that discovers its endpoints from the fake provider; no seed.
fn discovered_account(base: &str) -> String {
    format!(
        r#"
[accounts.zy]
grant = "refresh_token"
issuer = "{base}"
client_id = "zy-client"
client_secret = "zy-secret"
scope = "accounts:read"
"#
    )
}

/// A Zephr-style account: JSON + Basic, a registered https redirect URI, explicit
/// endpoints (Zephr publishes no metadata).
fn zephr_account(base: &str) -> String {
    format!(
        r#"
[accounts.zephr]
grant = "refresh_token"
token_url = "{base}/token"
authorization_endpoint = "{base}/authorize"
redirect_uri = "https://app.example.com/callback"
client_id = "zephr-client"
client_secret = "zephr-secret"
client_auth = "client_secret_basic"
request_format = "json"
"#
    )
}

fn http() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap()
}

/// The browser: opens the authorize URL and returns where the provider redirects.
async fn authorize(url: &str) -> reqwest::Url {
    let response = http().get(url).send().await.unwrap();
    assert_eq!(response.status(), 302, "{}", response.text().await.unwrap());
    let location = response.headers()["location"].to_str().unwrap();
    reqwest::Url::parse(location).unwrap()
}

fn with_state(url: &reqwest::Url, state: &str) -> reqwest::Url {
    let pairs: Vec<(String, String)> = url
        .query_pairs()
        .map(|(k, v)| {
            let v = if k == "state" {
                state.to_string()
            } else {
                v.into_owned()
            };
            (k.into_owned(), v)
        })
        .collect();
    let mut out = url.clone();
    out.query_pairs_mut().clear().extend_pairs(pairs);
    out
}

fn query(url: &str, key: &str) -> Option<String> {
    reqwest::Url::parse(url)
        .unwrap()
        .query_pairs()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.into_owned())
}

#[tokio::test]
async fn login_over_a_loopback_redirect_stores_a_live_refresh_token() {
    let (fake, base) = provider().await;
    let w = setup(&discovered_account(&base));
    let mut cli = Cli::spawn(&["login", "zy", "--no-browser"], &w.config_path());
    let url = cli.line_starting("http").await;

    // What the browser is sent to: discovery found the endpoint and offline_access.
    assert!(url.starts_with(&format!("{base}/authorize?")), "{url}");
    assert_eq!(query(&url, "response_type").as_deref(), Some("code"));
    assert_eq!(
        query(&url, "code_challenge_method").as_deref(),
        Some("S256")
    );
    assert_eq!(
        query(&url, "scope").as_deref(),
        Some("accounts:read offline_access")
    );
    let redirect_uri = query(&url, "redirect_uri").unwrap();
    assert!(
        redirect_uri.starts_with("http://127.0.0.1:"),
        "{redirect_uri}"
    );
    assert!(redirect_uri.ends_with("/callback"), "{redirect_uri}");

    let back = authorize(&url).await;
    assert!(back.as_str().starts_with(&redirect_uri), "{back}");
    let page = http().get(back).send().await.unwrap();
    assert_eq!(page.status(), 200);
    assert!(page.text().await.unwrap().contains("close this window"));

    let (status, out, err) = cli.finish().await;
    assert!(status.success(), "stdout {out}\nstderr {err}");
    assert!(out.contains("zy: logged in"), "{out}");
    let mode = std::fs::metadata(w.state_file("zy"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    let rt = stored_refresh_token(&w, "zy");
    assert!(fake.is_live_refresh_token(&rt));
    assert!(
        !out.contains(&rt) && !err.contains(&rt),
        "the token is never printed"
    );
}

/// A certified OpenID provider ignores `offline_access` without `prompt=consent` (OIDC
/// Core §11) and then issues no refresh token: login sends it by itself, for the loopback
/// and the manual flow, adds `authorize_params`, and `prompt = ""` sends none.
#[tokio::test]
async fn login_asks_for_consent_with_offline_access_as_a_certified_provider_requires() {
    let (fake, base) = provider().await;
    fake.set_offline_needs_consent(true);
    let extra = "authorize_params = { access_type = \"offline\" }\n";
    let w = setup(&format!("{}{extra}", discovered_account(&base)));
    let mut cli = Cli::spawn(&["login", "zy", "--no-browser"], &w.config_path());
    let url = cli.line_starting("http").await;
    assert_eq!(query(&url, "prompt").as_deref(), Some("consent"), "{url}");
    assert_eq!(query(&url, "access_type").as_deref(), Some("offline"));
    http().get(authorize(&url).await).send().await.unwrap();
    let (status, out, err) = cli.finish().await;
    assert!(status.success(), "stdout {out}\nstderr {err}");
    assert!(fake.is_live_refresh_token(&stored_refresh_token(&w, "zy")));

    // --manual builds the same request.
    let zephr = zephr_account(&base).replace("json\"\n", "json\"\nscope = \"offline_access\"\n");
    let w = setup(&zephr);
    let mut cli = Cli::spawn(&["login", "zephr", "--manual"], &w.config_path());
    let url = cli.line_starting("http").await;
    assert_eq!(query(&url, "prompt").as_deref(), Some("consent"), "{url}");
    cli.send_stdin(&format!("{}\n", authorize(&url).await));
    let (status, out, err) = cli.finish().await;
    assert!(status.success(), "stdout {out}\nstderr {err}");
    assert!(fake.is_live_refresh_token(&stored_refresh_token(&w, "zephr")));

    // Overridden to send nothing: the provider grants no refresh token, and login says so.
    let w = setup(&format!("{}prompt = \"\"\n", discovered_account(&base)));
    let mut cli = Cli::spawn(&["login", "zy", "--no-browser"], &w.config_path());
    let url = cli.line_starting("http").await;
    assert_eq!(query(&url, "prompt"), None, "{url}");
    http().get(authorize(&url).await).send().await.unwrap();
    let (status, _, err) = cli.finish().await;
    assert!(!status.success());
    assert!(err.contains("no refresh token"), "{err}");
    assert!(!w.state_file("zy").exists());
}

#[tokio::test]
async fn a_redirect_with_another_state_is_refused_and_nothing_is_stored() {
    let (fake, base) = provider().await;
    let w = setup(&discovered_account(&base));
    let mut cli = Cli::spawn(&["login", "zy", "--no-browser"], &w.config_path());
    let url = cli.line_starting("http").await;
    let back = authorize(&url).await;
    let forged = with_state(&back, "forged-state");
    let page = http().get(forged).send().await.unwrap();
    assert_eq!(page.status(), 400);

    let (status, _, err) = cli.finish().await;
    assert_eq!(status.code(), Some(1), "{err}");
    assert!(err.contains("state"), "{err}");
    assert!(!w.state_file("zy").exists());
    // The code was never exchanged: the provider issued no refresh token.
    assert!(!fake.minted().iter().any(|t| t.starts_with("rt-")));
}

#[tokio::test]
async fn manual_login_takes_the_pasted_redirect_url_and_checks_its_state() {
    let (fake, base) = provider().await;
    let w = setup(&zephr_account(&base));

    let mut cli = Cli::spawn(&["login", "zephr", "--manual"], &w.config_path());
    let url = cli.line_starting("http").await;
    assert_eq!(
        query(&url, "redirect_uri").as_deref(),
        Some("https://app.example.com/callback")
    );
    // The browser lands on the registered (non-loopback) URI; the user copies it.
    let back = authorize(&url).await;
    assert!(
        back.as_str()
            .starts_with("https://app.example.com/callback?code=")
    );
    cli.send_stdin(&format!("{back}\n"));
    let (status, out, err) = cli.finish().await;
    assert!(status.success(), "stdout {out}\nstderr {err}");
    let rt = stored_refresh_token(&w, "zephr");
    assert!(fake.is_live_refresh_token(&rt));
    std::fs::remove_file(w.state_file("zephr")).unwrap();

    let mut cli = Cli::spawn(&["login", "zephr", "--manual"], &w.config_path());
    let url = cli.line_starting("http").await;
    let back = authorize(&url).await;
    cli.send_stdin(&format!("{}\n", with_state(&back, "tampered")));
    let (status, _, err) = cli.finish().await;
    assert_eq!(status.code(), Some(1), "{err}");
    assert!(err.contains("state"), "{err}");
    assert!(!w.state_file("zephr").exists());
}

#[tokio::test]
async fn import_and_logout_without_a_daemon_write_and_remove_the_state() {
    let (fake, base) = provider().await;
    let w = setup(&discovered_account(&base));
    let rt = fake.grant_refresh_token("zy-client", Some("offline_access accounts:read"));

    let mut cli = Cli::spawn(&["import", "zy"], &w.config_path());
    cli.send_stdin(&format!("  {rt}\n"));
    let (status, out, err) = cli.finish().await;
    assert!(status.success(), "stdout {out}\nstderr {err}");
    // Trimmed, and tried with one refresh before it was stored: its successor is.
    let stored = stored_refresh_token(&w, "zy");
    assert!(!fake.is_live_refresh_token(&rt) && fake.is_live_refresh_token(&stored));
    let mode = std::fs::metadata(w.state_file("zy"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);

    let mut cli = Cli::spawn(&["import", "zy"], &w.config_path());
    cli.send_stdin("\n");
    let (status, _, err) = cli.finish().await;
    assert_eq!(status.code(), Some(1), "empty input is refused: {err}");

    let (status, out, err) = Cli::spawn(&["logout", "zy"], &w.config_path())
        .finish()
        .await;
    assert!(status.success(), "stdout {out}\nstderr {err}");
    assert!(out.contains("revoked"), "{out}");
    assert_eq!(fake.revoked(), vec![stored.clone()]);
    assert!(!fake.is_live_refresh_token(&stored));
    assert!(!w.state_file("zy").exists());
}

#[tokio::test]
async fn a_running_daemon_takes_import_and_logout_on_sighup() {
    let (fake, base) = provider().await;
    let w = setup(&discovered_account(&base));
    let mut daemon = w.start();
    let client = http();
    // No refresh token yet: needs_reauth.
    let deadline = Instant::now() + LIMIT;
    loop {
        let state = account_state(&client, &w.base()).await;
        if state["state"] == "needs_reauth" {
            break;
        }
        assert!(Instant::now() < deadline, "{state}; log:\n{}", daemon.log());
        tokio::time::sleep(Duration::from_millis(25)).await;
    }

    let rt = fake.grant_refresh_token("zy-client", Some("offline_access accounts:read"));
    let mut cli = Cli::spawn(&["import", "zy"], &w.config_path());
    cli.send_stdin(&rt);
    let (status, out, err) = cli.finish().await;
    assert!(
        status.success(),
        "stdout {out}\nstderr {err}\nlog:\n{}",
        daemon.log()
    );
    assert!(out.contains("the running daemon"), "{out}");
    assert!(out.contains("zy: ok"), "{out}\nlog:\n{}", daemon.log());
    assert!(!w.state_dir().join("zy.handoff").exists());
    daemon.wait_ready(&http_client()).await;
    let token = client
        .get(format!("{}/v1/token/zy/access_token", w.base()))
        .header("Tokend-Request", "1")
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(fake.is_valid_access_token(&token), "{token}");

    // The daemon rotated the imported token; logout revokes the current one.
    let current = stored_refresh_token(&w, "zy");
    assert_ne!(current, rt);
    let (status, out, err) = Cli::spawn(&["logout", "zy"], &w.config_path())
        .finish()
        .await;
    assert!(
        status.success(),
        "stdout {out}\nstderr {err}\nlog:\n{}",
        daemon.log()
    );
    assert!(fake.revoked().contains(&current), "{:?}", fake.revoked());
    assert!(!fake.is_live_refresh_token(&current));
    assert!(!w.state_file("zy").exists());
    let state = account_state(&client, &w.base()).await;
    assert_eq!(state["state"], "needs_reauth", "{state}");
    assert!(
        state["last_error"].as_str().unwrap().contains("logged out"),
        "{state}"
    );
    daemon.signal("TERM");
    assert_eq!(daemon.wait_exit(LIMIT).await.code(), Some(0));
}

async fn account_state(client: &reqwest::Client, base: &str) -> Value {
    let Ok(r) = client.get(format!("{base}/v1/accounts")).send().await else {
        return Value::Null;
    };
    let v: Value = r.json().await.unwrap_or_default();
    v["accounts"][0].clone()
}

// ---------------------------------------------------------------------------------------
// The library, on the paused clock.

fn account(dir: &TempDir, block: &str, name: &str) -> AccountConfig {
    let config = support::config(dir, block);
    (*config.accounts[&AccountName::parse(name).unwrap()]).clone()
}

const DEVICE_ACCOUNT: &str = r#"
[accounts.dev]
grant = "refresh_token"
token_url = "http://127.0.0.1/token"
device_authorization_endpoint = "http://127.0.0.1/device_authorization"
client_id = "zy-client"
client_secret = "zy-secret"
scope = "offline_access accounts:read"
"#;

#[tokio::test(start_paused = true)]
async fn the_device_flow_keeps_polling_while_pending_and_slows_down_when_told() {
    let (_, fake) = support::manual_provider(Duration::from_secs(3600));
    fake.push_device_polls([
        DevicePoll::Pending,
        DevicePoll::SlowDown,
        DevicePoll::Pending,
    ]);
    let provider = Provider::new(Transport::InProcess(fake.router()));
    let dir = tempfile::tempdir().unwrap();
    let account = account(&dir, DEVICE_ACCOUNT, "dev");

    let mut out: Vec<u8> = Vec::new();
    let user = async {
        // The user approves once three polls have been answered.
        while fake.device_poll_times().len() < 3 {
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        for code in fake.pending_user_codes() {
            assert!(fake.approve_device(&code));
        }
    };
    let (rt, ()) = tokio::join!(
        login::device_flow(&provider, &account, &mut out, Duration::from_secs(600)),
        user
    );
    let rt = rt.unwrap();
    assert!(fake.is_live_refresh_token(rt.expose()));
    let text = String::from_utf8(out).unwrap();
    assert!(text.contains("/device?user_code=WDJB-"), "{text}");

    let times = fake.device_poll_times();
    let gaps: Vec<u64> = times
        .windows(2)
        .map(|w| w[1].duration_since(w[0]).unwrap().as_secs())
        .collect();
    let first = times[0].duration_since(epoch()).unwrap().as_secs();
    assert_eq!(first, 5, "the first poll waits one interval");
    // pending → 5 s; slow_down → 10 s from then on.
    assert_eq!(gaps, vec![5, 10, 10], "{times:?}");
}

#[tokio::test(start_paused = true)]
async fn the_device_flow_ends_on_denial_and_on_expiry() {
    let (_, fake) = support::manual_provider(Duration::from_secs(3600));
    let provider = Provider::new(Transport::InProcess(fake.router()));
    let dir = tempfile::tempdir().unwrap();
    let account = account(&dir, DEVICE_ACCOUNT, "dev");
    let mut out: Vec<u8> = Vec::new();

    fake.push_device_polls([DevicePoll::Pending, DevicePoll::Denied]);
    let e = login::device_flow(&provider, &account, &mut out, Duration::from_secs(600))
        .await
        .unwrap_err();
    assert!(matches!(e, LoginError::DeviceDenied), "{e}");

    fake.push_device_polls([DevicePoll::Expired]);
    let e = login::device_flow(&provider, &account, &mut out, Duration::from_secs(600))
        .await
        .unwrap_err();
    assert!(matches!(e, LoginError::DeviceExpired), "{e}");

    // Never approved: bounded by expires_in (600 s at the fake), not polling forever.
    let started = tokio::time::Instant::now();
    let e = login::device_flow(&provider, &account, &mut out, Duration::from_secs(3600))
        .await
        .unwrap_err();
    assert!(matches!(e, LoginError::DeviceExpired), "{e}");
    assert!(started.elapsed() <= Duration::from_secs(600));
}

fn issuer_account(issuer: &str, extra: &str) -> String {
    format!(
        r#"
[accounts.d]
grant = "refresh_token"
issuer = "{issuer}"
client_id = "zy-client"
client_secret = "zy-secret"
{extra}
"#
    )
}

#[tokio::test(start_paused = true)]
async fn discovery_fills_what_is_unset_and_checks_the_issuer() {
    let (_, fake) = support::manual_provider(Duration::from_secs(3600));
    fake.set_base_url("http://127.0.0.1");
    let provider = Provider::new(Transport::InProcess(fake.router()));
    let dir = tempfile::tempdir().unwrap();

    let a = account(&dir, &issuer_account("http://127.0.0.1", ""), "d");
    assert!(a.token_url.is_none());
    let d = discovery::discover(&provider, &a).await.unwrap();
    assert_eq!(d.token_url.unwrap().as_str(), "http://127.0.0.1/token");
    assert_eq!(
        d.endpoints.authorization.unwrap().as_str(),
        "http://127.0.0.1/authorize"
    );
    assert_eq!(
        d.endpoints.revocation.unwrap().as_str(),
        "http://127.0.0.1/revoke"
    );
    assert!(
        d.endpoints
            .scopes_supported
            .unwrap()
            .contains(&"offline_access".to_string())
    );

    // Explicit values win.
    let a = account(
        &dir,
        &issuer_account(
            "http://127.0.0.1",
            "token_url = \"http://127.0.0.1/other-token\"\nrevocation_endpoint = \"http://127.0.0.1/mine\"",
        ),
        "d",
    );
    let d = discovery::discover(&provider, &a).await.unwrap();
    assert_eq!(
        d.token_url.unwrap().as_str(),
        "http://127.0.0.1/other-token"
    );
    assert_eq!(
        d.endpoints.revocation.unwrap().as_str(),
        "http://127.0.0.1/mine"
    );
    assert_eq!(
        d.endpoints.device_authorization.unwrap().as_str(),
        "http://127.0.0.1/device_authorization"
    );

    // A document for another issuer is refused.
    fake.set_base_url("http://localhost");
    let a = account(&dir, &issuer_account("http://127.0.0.1", ""), "d");
    let e = discovery::discover(&provider, &a).await.unwrap_err();
    assert!(matches!(e, DiscoveryError::IssuerMismatch { .. }), "{e}");
    assert!(e.to_string().contains("http://localhost"), "{e}");
}

#[tokio::test(start_paused = true)]
async fn discovery_falls_back_to_openid_configuration_under_the_issuer_path() {
    use axum::routing::get;
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let record = seen.clone();
    let router = axum::Router::new()
        .route(
            "/tenant/.well-known/openid-configuration",
            get(|| async {
                axum::Json(serde_json::json!({
                    "issuer": "http://127.0.0.1/tenant",
                    "token_endpoint": "http://127.0.0.1/tenant/token",
                }))
            }),
        )
        .layer(axum::middleware::from_fn(
            move |req: axum::extract::Request, next: axum::middleware::Next| {
                let record = record.clone();
                async move {
                    record.lock().unwrap().push(req.uri().path().to_string());
                    next.run(req).await
                }
            },
        ));
    let provider = Provider::new(Transport::InProcess(router));
    let dir = tempfile::tempdir().unwrap();
    let a = account(&dir, &issuer_account("http://127.0.0.1/tenant", ""), "d");
    let d = discovery::discover(&provider, &a).await.unwrap();
    assert_eq!(
        d.token_url.unwrap().as_str(),
        "http://127.0.0.1/tenant/token"
    );
    assert_eq!(
        *seen.lock().unwrap(),
        [
            "/.well-known/oauth-authorization-server/tenant",
            "/tenant/.well-known/openid-configuration"
        ]
    );
}

#[tokio::test(start_paused = true)]
async fn the_daemon_starts_while_discovery_fails_and_serves_once_it_succeeds() {
    let (clock, fake) = support::manual_provider(Duration::from_secs(3600));
    fake.set_base_url("http://127.0.0.1");
    fake.set_metadata_available(false);
    let seed = fake.grant_refresh_token("zy-client", None);
    let block = issuer_account("http://127.0.0.1", &format!("refresh_token = \"{seed}\""));
    let h = Harness::start(fake, clock, &block).await;
    h.advance(Duration::from_millis(100)).await;

    let state = h.account_state("d").await;
    assert_eq!(state["state"], "pending", "{state}");
    assert!(
        state["last_error"]
            .as_str()
            .unwrap()
            .contains("discovery failed"),
        "{state}"
    );
    assert_eq!(state["issuer"], "http://127.0.0.1");
    let (status, _) = h.get("/v1/token/d").await;
    assert_eq!(status, 503);
    assert_eq!(h.fake.counts().token_requests, 0);

    // The provider comes back: the usual backoff (at most a few seconds here) retries.
    h.fake.set_metadata_available(true);
    h.advance(Duration::from_secs(10)).await;
    let token = h.token("d").await;
    assert!(h.fake.is_valid_access_token(&token));
    assert_eq!(h.account_state("d").await["state"], "ok");
}

#[tokio::test(start_paused = true)]
async fn the_accounts_list_shows_the_discovered_token_endpoint() {
    let (clock, fake) = support::manual_provider(Duration::from_secs(3600));
    fake.set_base_url("http://127.0.0.1");
    let seed = fake.grant_refresh_token("zy-client", None);
    let block = issuer_account("http://127.0.0.1", &format!("refresh_token = \"{seed}\""));
    let h = Harness::start(fake, clock, &block).await;
    h.token("d").await;

    // What docs/openapi.yaml promises: `null` only until discovery has filled it in.
    let state = h.account_state("d").await;
    assert_eq!(state["token_url"], "http://127.0.0.1/token", "{state}");
    assert_eq!(state["issuer"], "http://127.0.0.1", "{state}");
}
