//! End-to-end tests of the real `tokend` binary: the daemon runs as a child process
//! against an in-process fake OAuth provider, and is driven through its command line,
//! its loopback HTTP API and signals, the way an operator and a consumer use it.
//!
//! No test sleeps and hopes: every wait polls a condition in a bounded loop, and every
//! child process sits in a guard that kills and reaps it even when the test panics.

use std::fs;
use std::io::{BufRead, BufReader};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use reqwest::StatusCode;
use serde_json::Value;
use tokend::demo::fake_provider::ClientSpec;

use crate::support::*;

/// 1-based line of the first line of `text` containing `needle`.
fn line_of(text: &str, needle: &str) -> usize {
    text.lines()
        .position(|l| l.contains(needle))
        .unwrap_or_else(|| panic!("{needle:?} not in the config"))
        + 1
}

/// `tokend COMMAND --config PATH`, run to completion within `timeout`.
async fn with_config(command: &str, path: &Path, timeout: Duration) -> Output {
    run_cmd(tokend().args([command, "--config"]).arg(path), timeout).await
}

/// Writes `config` to `file` in the setup's dir and asserts that `tokend check` refuses
/// it with exit code 78, naming the file, the line holding `needle`, and `key`. Returns
/// the file's path.
async fn assert_check_locates(
    setup: &Setup,
    file: &str,
    config: &str,
    needle: &str,
    key: &str,
) -> PathBuf {
    let path = setup.dir.path().join(file);
    fs::write(&path, config).unwrap();
    let out = with_config("check", &path, EXIT_TIMEOUT).await;
    let stderr = expect_code(&out, 78).stderr;
    let line = line_of(config, needle);
    assert!(
        stderr.contains(&format!("{}:{line}:", path.display())),
        "stderr must name the file and line {line}: {stderr}"
    );
    assert!(stderr.contains(key), "stderr must name the key: {stderr}");
    path
}

// ---------------------------------------------------------------------------------------
// 1. tokend check

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_reports_file_line_and_key_and_exits_78_on_bad_configs() {
    let setup = Setup::new();
    let url = "http://127.0.0.1:9/token";
    let good = [
        zy_account("a", url, "rt-seed-literal"),
        svc_account("svc", url),
    ];

    // An unknown key is a config error, located.
    let unknown = setup.config_text(&good).replacen(
        "scope = \"offline_access api:read\"\n",
        "scope = \"offline_access api:read\"\nrefresh_tokn = \"typo\"\n",
        1,
    );
    let path = assert_check_locates(
        &setup,
        "unknown.toml",
        &unknown,
        "refresh_tokn",
        "accounts.a.refresh_tokn",
    )
    .await;
    // `tokend run` refuses it with the same code, so systemd does not restart-loop.
    let out = with_config("run", &path, EXIT_TIMEOUT).await;
    let stderr = expect_code(&out, 78).stderr;
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
    assert_check_locates(
        &setup,
        "semantic.toml",
        &semantic,
        "ftp://x",
        "accounts.a.token_url",
    )
    .await;

    // A good config passes and says what each account will do, without its secrets.
    setup.write_config(&good);
    let out = with_config("check", &setup.config_path(), EXIT_TIMEOUT).await;
    let stdout = expect_code(&out, 0).stdout;
    for (name, grant) in [("a", "refresh_token"), ("svc", "client_credentials")] {
        let plan = stdout
            .split(&format!("account {name}\n"))
            .nth(1)
            .unwrap_or_else(|| panic!("no plan for account {name}: {stdout}"));
        assert!(plan.contains(&format!("grant:          {grant}")), "{plan}");
        assert!(plan.contains(&format!("token URL:      {url}")), "{plan}");
        let state = setup.state_file(name);
        assert!(
            plan.contains(&format!("state file:     {}", state.display())),
            "{plan}"
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
    let config = setup.config_text(&[svc_account("a", "https://idp.example.com/token")])
        + "\n[refresh]\nbackoff_initial = \"10m\"\n";
    fs::write(setup.config_path(), &config).unwrap();
    let out = with_config("check", &setup.config_path(), EXIT_TIMEOUT).await;
    let stderr = expect_code(&out, 78).stderr;
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
    let World { fake, seed, setup } = zy_and_svc_world(None, "").await;
    let client = http_client();
    let daemon = setup.start_ready(&client).await;

    // Without the request header: 403 with a JSON error.
    let response = client.get(daemon.url("/v1/token/zy")).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::FORBIDDEN);
    let body: Value = response.json().await.expect("403 is JSON");
    assert_eq!(body["error"], "forbidden", "{body}");
    assert!(body.get("access_token").is_none());

    // With it: the whole answer.
    let response = daemon.get(&client, "/v1/token/zy").await;
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
    let response = daemon.get(&client, "/v1/token/zy/access_token").await;
    assert_eq!(response.status(), StatusCode::OK);
    let content_type = content_type(&response);
    assert!(content_type.starts_with("text/plain"), "{content_type}");
    assert_eq!(response.text().await.unwrap(), zy_token);

    // An unknown account: 404 JSON.
    let response = daemon.get(&client, "/v1/token/nope").await;
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
    setup.write_config(&[refresh_token_account(
        "zephr",
        &url,
        "zephr-client",
        "zephr-secret-literal",
        &seed,
        ZEPHR_STYLE,
    )]);
    let client = http_client();
    let daemon = setup.start_ready(&client).await;

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
    let World { fake, seed, setup } = zy_and_svc_world(None, "").await;
    let client = http_client();

    let mut first = setup.start_ready(&client).await;
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

    let mut second = setup.start_ready(&client).await;
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
    let (_fake, url, _) = start_provider_with_clients().await;
    let setup = Setup::new();
    let accounts = [svc_account("svc", &url)];
    setup.write_config(&accounts);
    let client = http_client();
    let mut first = setup.start_ready(&client).await;

    // Same state dir, another port: only the lock can stop it.
    let other = setup.config_text(&accounts).replace(
        &format!("127.0.0.1:{}", setup.port),
        &format!("127.0.0.1:{}", free_port()),
    );
    let other_path = setup.dir.path().join("other.toml");
    fs::write(&other_path, other).unwrap();
    let out = with_config("run", &other_path, READY_TIMEOUT).await;
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
    let (fake, url, seed) = start_provider_with_clients().await;
    let setup = Setup::new();
    setup.write_config(&[zy_account("a", &url, &seed)]);
    let client = http_client();
    let mut daemon = setup.start_ready(&client).await;
    let (_, accounts) = daemon.accounts(&client).await;
    assert_eq!(account_names(&accounts), ["a"]);

    // Add b, remove a.
    let b = svc_account("b", &url);
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
    let response = daemon.get(&client, "/v1/token/a").await;
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
    let (_fake, url, seed) = start_provider_with_clients().await;
    let setup = Setup::new();
    setup.write_config(&[zy_account("zy", &url, &seed)]);
    let client = http_client();
    let daemon = setup.start_ready(&client).await;
    let expected = access_token(&daemon.token(&client, "zy").await);

    let token_cmd = |endpoint: &str, extra: &[&str]| {
        let mut c = tokend();
        c.args(["token", "zy", "--endpoint", endpoint]).args(extra);
        c
    };

    let out = run_cmd(&mut token_cmd(&daemon.base, &[]), READY_TIMEOUT).await;
    assert_eq!(expect_code(&out, 0).stdout, format!("{expected}\n"));

    let out = run_cmd(&mut token_cmd(&daemon.base, &["--json"]), READY_TIMEOUT).await;
    expect_code(&out, 0);
    let json: Value = serde_json::from_slice(&out.stdout).expect("--json prints JSON");
    assert_eq!(json["account"], "zy");
    assert_eq!(access_token(&json), expected);
    assert_eq!(json["headers"]["Profile"], "B 1234");

    // An account the daemon does not have: a refused request, exit 1.
    let out = run_cmd(
        tokend().args(["token", "nope", "--endpoint", &daemon.base]),
        READY_TIMEOUT,
    )
    .await;
    expect_code(&out, 1);
    assert!(out.stdout.is_empty());

    // Nobody listening: EX_UNAVAILABLE.
    let closed = format!("http://127.0.0.1:{}", free_port());
    let out = run_cmd(&mut token_cmd(&closed, &[]), READY_TIMEOUT).await;
    let stderr = expect_code(&out, 69).stderr;
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
    let mut demo = ChildGuard::spawn(&mut cmd);
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
    setup.write_config(&[svc_account("svc", "http://127.0.0.1:9/token")]);
    let out = with_config("run", &setup.config_path(), READY_TIMEOUT).await;
    let stderr = expect_code(&out, 1).stderr;
    assert!(
        stderr.contains(&addr.to_string()),
        "stderr must name {addr}: {stderr}"
    );
    drop(taken);
}
