//! The operator's command line against a daemon: `tokend reload` and its outcomes, client
//! commands finding the daemon and their key through `--config`, the exit codes scripts
//! act on, and messages that say what happened (the real binary, except where a paused
//! clock is needed to make the moment exact).

use std::time::Duration;

use http::{Method, StatusCode};
use serde_json::Value;
use tokend::clock::Clock;
use tokend::demo::fake_provider::Fault;

use crate::support::*;

/// `POST /v1/accounts/{account}/refresh` through the harness's router.
async fn force_refresh(h: &Harness, account: &str) -> (StatusCode, Value) {
    let uri = format!("/v1/accounts/{account}/refresh");
    let req = request(Method::POST, &uri, &[MARK], axum::body::Body::empty());
    let (status, _, body) = call(&h.api, req).await;
    (status, serde_json::from_slice(&body).unwrap_or_default())
}

/// A daemon with one client_credentials account `cc` (1 h tokens), `after` its start.
async fn cc_after(after: Duration) -> Harness {
    let clock = Clock::manual(epoch());
    let fake = provider(&clock, Duration::from_secs(3600));
    let h = Harness::start(fake, clock, &client_credentials_account("cc")).await;
    h.advance(after).await;
    h
}

#[tokio::test(start_paused = true)]
async fn a_refresh_right_after_a_failed_one_says_what_failed() {
    // Past min_interval (5 s in the harness config) since the first token.
    let h = cc_after(Duration::from_secs(6)).await;

    h.fake.push_faults([Fault::Status(500)]);
    let (status, first) = force_refresh(&h, "cc").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{first}");
    let described = first["error_description"].as_str().unwrap().to_string();
    assert!(described.contains("refreshing fails"), "{described}");

    // Again at once, within min_interval of the failed call: what failed, never "the
    // token was refreshed 0s ago".
    let (status, again) = force_refresh(&h, "cc").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{again}");
    let described = again["error_description"].as_str().unwrap();
    assert!(!described.contains("refreshed"), "{described}");
    assert!(
        described.contains("the last refresh attempt, 0s ago, failed: "),
        "{described}"
    );
    assert!(described.contains("500"), "names the failure: {described}");
    assert!(described.contains("refresh.min_interval"), "{described}");
}

#[tokio::test(start_paused = true)]
async fn a_min_valid_beyond_the_lifetime_names_the_lifetime() {
    let h = cc_after(Duration::from_secs(600)).await;

    // One refresh is tried (the current token has 50 min left), then refused; asked again
    // a little later, within min_interval: still the lifetime, not the time the current
    // token has left.
    let expected = "the provider issues tokens valid for 1h, less than the 2h asked for";
    for wait in [0, 3] {
        h.advance(Duration::from_secs(wait)).await;
        let (status, body) = h.get("/v1/token/cc?min_valid=7200").await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
        let described = body["error_description"].as_str().unwrap();
        assert!(described.ends_with(expected), "after {wait}s: {described}");
    }
}

/// The value of an unlabelled series in a `/metrics` text.
fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{name} "))?.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {name} in\n{text}"))
}

async fn metrics(daemon: &Daemon, client: &reqwest::Client) -> String {
    daemon.get(client, "/metrics").await.text().await.unwrap()
}

async fn tokend_cmd(args: &[&str]) -> std::process::Output {
    run_cmd(tokend().args(args), READY_TIMEOUT).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_reports_what_it_did_and_keeps_the_running_config_when_the_new_is_invalid() {
    let (fake, url, seed) = start_provider_with_clients().await;
    let setup = Setup::new();
    let mut sections = zy_and_svc(&url, &seed);
    setup.write_config(&sections);
    let client = http_client();
    let mut daemon = setup.start_ready(&client).await;
    let config = setup.config_path();
    let c = config.to_str().unwrap();

    // Nothing changed; --config after the subcommand.
    let out = tokend_cmd(&["reload", "--config", c]).await;
    let stdout = expect_code(&out, 0).stdout;
    assert!(stdout.contains("no account changed"), "{stdout}");

    // An account added and a setting that needs a restart; --config before it.
    sections.push(svc_account("svc2", &url));
    sections.push("\n[log]\nformat = \"json\"\n".into());
    setup.write_config(&sections);
    let out = tokend_cmd(&["--config", c, "reload"]).await;
    let stdout = expect_code(&out, 0).stdout;
    assert!(stdout.contains("added svc2"), "{stdout}");
    assert!(
        stdout.contains("take effect only on restart: log"),
        "{stdout}"
    );
    let text = metrics(&daemon, &client).await;
    assert_eq!(metric(&text, "tokend_config_last_reload_successful"), 1.0);
    let applied_at = metric(&text, "tokend_config_last_reload_success_timestamp_seconds");
    assert!(applied_at > 1.7e9, "{applied_at}");

    // Two problems: 78, each named, and the daemon keeps what it runs.
    let mut broken = sections.clone();
    broken.push("\n[refresh]\nratio = 7.0\njitter = 9.0\n".into());
    setup.write_config(&broken);
    let out = tokend_cmd(&["reload", "-c", c]).await;
    let stderr = expect_code(&out, 78).stderr;
    assert!(
        stderr.contains("keeps running the previous one"),
        "{stderr}"
    );
    for key in ["refresh.ratio", "refresh.jitter"] {
        assert!(stderr.contains(key), "{key}: {stderr}");
    }
    assert!(stderr.contains(c), "names the file: {stderr}");
    assert!(daemon.proc.exited().is_none(), "the daemon still runs");
    let (_, accounts) = daemon.accounts(&client).await;
    assert_eq!(account_names(&accounts), ["svc", "svc2", "zy"]);
    assert!(fake.is_valid_access_token(&access_token(&daemon.token(&client, "zy").await)));
    let text = metrics(&daemon, &client).await;
    assert_eq!(metric(&text, "tokend_config_last_reload_successful"), 0.0);
    assert_eq!(
        metric(&text, "tokend_config_last_reload_success_timestamp_seconds"),
        applied_at
    );
    // The problem list is one log event: one line holding both.
    let log = daemon.log();
    let events: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("refresh.ratio") || l.contains("refresh.jitter"))
        .collect();
    assert_eq!(events.len(), 1, "{log}");
    assert!(events[0].contains("the new config is invalid"), "{log}");
    assert!(events[0].contains("refresh.ratio") && events[0].contains("refresh.jitter"));

    // No daemon: 69, naming the state directory tried.
    assert_eq!(daemon.stop().await.code(), Some(0));
    let out = tokend_cmd(&["reload", "--config", c]).await;
    let stderr = expect_code(&out, 69).stderr;
    let dir = setup.state_dir();
    assert!(stderr.contains(dir.to_str().unwrap()), "{stderr}");
    assert!(stderr.contains("no tokend runs"), "{stderr}");

    let counts = fake.counts();
    assert_eq!((counts.reuse_detected, counts.forks), (0, 0), "{counts:?}");
    assert_eq!(fake.live_refresh_tokens("zy-client"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_commands_find_the_daemon_and_their_key_in_the_config() {
    let (fake, url, seed) = start_provider_with_clients().await;
    let setup = Setup::new();
    let key = setup.dir.path().join("ops.key");
    std::fs::write(&key, "k3y-Of-Ops\n").unwrap();
    let mut sections = zy_and_svc(&url, &seed);
    sections.push("\n[consumers.ops]\nkey = { file = \"ops.key\" }\naccounts = [\"*\"]\n".into());
    setup.write_config(&sections);
    let mut daemon = setup.start_with(|_| {});
    let config = setup.config_path();
    let c = config.to_str().unwrap();
    // With consumers, readiness is open but the account list is not.
    let deadline = std::time::Instant::now() + READY_TIMEOUT;
    while tokend_cmd(&["health", "--config", c]).await.status.code() != Some(0) {
        assert!(std::time::Instant::now() < deadline, "{}", daemon.log());
        tokio::time::sleep(POLL).await;
    }

    let live = expect_code(&tokend_cmd(&["health", "--live", "--config", c]).await, 0);
    assert_eq!(live.stdout.trim(), "alive");

    // The endpoint and the key from the config, before or after the subcommand.
    for args in [&["status", "--config", c][..], &["--config", c, "status"]] {
        let stdout = expect_code(&tokend_cmd(args).await, 0).stdout;
        assert_eq!(stdout.lines().count(), 3, "{args:?}: {stdout}");
    }
    // status ACCOUNT: that account only; an unknown one is an error naming the others.
    let stdout = expect_code(&tokend_cmd(&["status", "zy", "-c", c]).await, 0).stdout;
    let rows: Vec<&str> = stdout.lines().skip(1).collect();
    assert_eq!(rows.len(), 1, "{stdout}");
    assert!(rows[0].starts_with("zy "), "{stdout}");
    let stderr = expect_code(&tokend_cmd(&["status", "nope", "-c", c]).await, 1).stderr;
    assert!(
        stderr.contains("no account named \"nope\" (it has: svc, zy)"),
        "{stderr}"
    );

    // --min-valid takes durations; longer than the lifetime is "not now" (75).
    let out = tokend_cmd(&["token", "zy", "-c", c, "--min-valid", "5m"]).await;
    let token = expect_code(&out, 0).stdout;
    assert!(fake.is_valid_access_token(token.trim()), "{token}");
    let out = tokend_cmd(&["token", "zy", "-c", c, "--min-valid", "2h"]).await;
    let stderr = expect_code(&out, 75).stderr;
    assert!(
        stderr.contains("valid for 1h, less than the 2h"),
        "{stderr}"
    );

    // Without the config's key the daemon refuses: 77, with what to do.
    let base = daemon.base.clone();
    let stderr = expect_code(&tokend_cmd(&["status", "--endpoint", &base]).await, 77).stderr;
    assert!(
        stderr.contains("401") && stderr.contains("--key-file"),
        "{stderr}"
    );

    // Unreachable: the address tried and where it came from.
    let elsewhere = Setup::new();
    elsewhere.write_config(&[]);
    let other = elsewhere.config_path();
    let other = other.to_str().unwrap();
    let stderr = expect_code(&tokend_cmd(&["health", "--config", other]).await, 69).stderr;
    let down = tokend_cmd(&["health", "--live", "--config", other]).await;
    assert!(expect_code(&down, 69).stderr.contains(other));
    let tried = format!(
        "http://127.0.0.1:{} (server.listen of {other})",
        elsewhere.port
    );
    assert!(stderr.contains(&tried), "{stderr}");
    let closed = format!("http://127.0.0.1:{}", free_port());
    let out = run_cmd(
        tokend().arg("health").env("TOKEND_ENDPOINT", &closed),
        READY_TIMEOUT,
    )
    .await;
    let stderr = expect_code(&out, 69).stderr;
    assert!(
        stderr.contains(&format!("{closed} (from $TOKEND_ENDPOINT)")),
        "{stderr}"
    );
    // A config named but missing is a config error.
    let missing = setup.dir.path().join("missing.toml");
    let out = tokend_cmd(&["status", "--config", missing.to_str().unwrap()]).await;
    let stderr = expect_code(&out, 78).stderr;
    assert!(
        stderr.contains("missing.toml (from --config) cannot be read"),
        "{stderr}"
    );

    assert_eq!(daemon.stop().await.code(), Some(0));
    let counts = fake.counts();
    assert_eq!((counts.reuse_detected, counts.forks), (0, 0), "{counts:?}");
    assert_eq!(fake.live_refresh_tokens("zy-client"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_errors_exit_64_and_help_lists_the_exit_codes() {
    for args in [
        &["token"][..],
        &["--no-such-flag", "status"],
        &["token", "zy", "--min-valid", "soon"],
        &["reload", "--timeout", "never"],
    ] {
        let out = tokend_cmd(args).await;
        let stderr = expect_code(&out, 64).stderr;
        assert!(!stderr.is_empty(), "{args:?}");
    }
    let help = expect_code(&tokend_cmd(&["--help"]).await, 0).stdout;
    assert!(help.contains("Exit codes:"), "{help}");
    for code in ["64", "69", "75", "77", "78"] {
        assert!(help.contains(&format!("  {code}  ")), "{code}: {help}");
    }
    expect_code(&tokend_cmd(&["--version"]).await, 0);
    expect_code(&tokend_cmd(&["status", "--help"]).await, 0);
}
