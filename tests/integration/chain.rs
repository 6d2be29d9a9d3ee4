//! Operator mistakes never cost a refresh token: a rename, a shared seed, a state file
//! garbled, emptied or deleted while stopped, `import` of a wrong or a spent token, and
//! `state rename` with the daemon stopped and running. Each runs against the strict fake
//! provider (a spent refresh token presented again revokes its family) and ends with the
//! provider having seen no reuse, the family alive, and the documented way back working.
//! The library daemon runs on tokio's paused clock; the binary's cases poll, bounded.

use std::path::Path;
use std::process::{Output, Stdio};
use std::time::Duration;

use http::StatusCode;
use serde_json::Value;
use tokend::clock::Clock;
use tokend::config::AccountName;
use tokend::demo::fake_provider::FakeProvider;
use tokend::store::{Delivery, Handoff, deliver_handoff};

use crate::support::*;

/// No reuse reached the provider and `client`'s families are alive: `live` chains.
fn assert_no_reuse(fake: &FakeProvider, client: &str, live: usize) {
    let counts = fake.counts();
    assert_eq!((counts.reuse_detected, counts.forks), (0, 0), "{counts:?}");
    assert_eq!(fake.live_refresh_tokens(client), live, "{counts:?}");
}

async fn reload(h: &mut Harness, accounts: &str) {
    let config = config(&h.dir, accounts);
    h.daemon.as_mut().unwrap().reload(config).await;
    h.advance(Duration::from_millis(10)).await;
}

/// Account `zy`, seeded, with its first token (an hour long); and its seed.
async fn running_zy() -> (Harness, String) {
    let clock = Clock::manual(epoch());
    let fake = provider(&clock, Duration::from_secs(3600));
    let seed = fake.grant_refresh_token("zy-client", None);
    let h = Harness::start(fake, clock, &zywave_account("zy", &seed)).await;
    h.advance(Duration::from_millis(10)).await;
    (h, seed)
}

/// An hour on, the account has refreshed on its one live chain: the provider's
/// `grants`th refresh grant, no reuse.
async fn refreshes_an_hour_on(h: &Harness, account: &str, grants: u64) -> String {
    h.advance(Duration::from_secs(3600)).await;
    let token = h.token(account).await;
    assert!(h.fake.is_valid_access_token(&token));
    assert_eq!(h.fake.counts().refresh_grants, grants);
    assert_no_reuse(&h.fake, "zy-client", 1);
    token
}

/// The account's state and its last error (empty when none).
async fn state_of(h: &Harness, account: &str) -> (String, String) {
    let state = h.account_state(account).await;
    let text = |v: &Value| v.as_str().unwrap_or_default().to_string();
    (text(&state["state"]), text(&state["last_error"]))
}

/// Asserts the account is held and nothing was sent since the provider's `grants`th
/// refresh grant; returns why it is held.
async fn held_and_nothing_sent(h: &Harness, account: &str, grants: u64) -> String {
    let (state, reason) = state_of(h, account).await;
    assert_eq!(state, "needs_reauth", "{reason}");
    assert_eq!(h.fake.counts().refresh_grants, grants, "{reason}");
    assert_no_reuse(&h.fake, "zy-client", 1);
    reason
}

#[tokio::test(start_paused = true)]
async fn a_renamed_account_is_held_and_state_rename_continues_its_chain() {
    let (mut h, seed) = running_zy().await;
    let before = h.token("zy").await;

    // [accounts.zy] → [accounts.zy-prod], same seed, SIGHUP.
    let renamed = zywave_account("zy-prod", &seed);
    reload(&mut h, &renamed).await;
    let reason = held_and_nothing_sent(&h, "zy-prod", 1).await;
    assert!(
        reason.contains("tokend state rename zy zy-prod") && reason.contains("[accounts.zy]"),
        "{reason}"
    );
    // READY may come (every account settled), but /readyz says which is held and why.
    let (status, ready) = h.get("/readyz").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(ready["not_ready"][0]["state"], "needs_reauth", "{ready}");

    // The way back: `tokend state rename zy zy-prod` while the daemon runs.
    let name = AccountName::parse("zy-prod").unwrap();
    let from = AccountName::parse("zy").unwrap();
    let delivery = deliver_handoff(
        h.dir.path(),
        None,
        &name,
        &Handoff::Adopt { from },
        None,
        epoch(),
    )
    .await
    .unwrap();
    assert!(matches!(delivery, Delivery::Pending { .. }), "{delivery:?}");
    reload(&mut h, &renamed).await;
    assert_eq!(
        h.token("zy-prod").await,
        before,
        "the old chain's token, served"
    );
    assert!(!h.dir.path().join("zy.json").exists());
    // And its next refresh goes on the old chain.
    assert_ne!(refreshes_an_hour_on(&h, "zy-prod", 2).await, before);
    h.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn a_seed_adopted_before_the_ledger_existed_is_recorded_at_the_next_start() {
    let (h, seed) = running_zy().await;
    let (fake, clock, dir) = h.stop().await;
    // The state of a tokend that kept no ledger yet.
    std::fs::remove_file(dir.path().join(tokend::store::LEDGER_FILE)).unwrap();
    let mut h = Harness::builder(fake, clock, dir)
        .accounts(&zywave_account("zy", &seed))
        .await;
    h.advance(Duration::from_millis(10)).await;
    reload(&mut h, &zywave_account("zy-prod", &seed)).await;
    let reason = held_and_nothing_sent(&h, "zy-prod", 1).await;
    assert!(
        reason.contains("tokend state rename zy zy-prod"),
        "{reason}"
    );
    h.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn a_state_file_lost_while_stopped_holds_the_account_until_restored() {
    for (case, damage) in [
        ("garbled", Some(&b"{\"version\": 1, \"acc"[..])),
        ("emptied", Some(b"")),
        ("deleted", None),
    ] {
        let (h, seed) = running_zy().await;
        let accounts = zywave_account("zy", &seed);
        let before = h.token("zy").await;
        let (fake, clock, dir) = h.stop().await;

        let file = dir.path().join("zy.json");
        let backup = std::fs::read(&file).unwrap();
        match damage {
            Some(bytes) => std::fs::write(&file, bytes).unwrap(),
            None => std::fs::remove_file(&file).unwrap(),
        }
        let mut h = Harness::builder(fake, clock, dir).accounts(&accounts).await;
        h.advance(Duration::from_millis(10)).await;
        let reason = held_and_nothing_sent(&h, "zy", 1).await;
        let named = match damage {
            Some(_) => reason.contains("kept aside as") && reason.contains("zy.json.corrupt-"),
            None => reason.contains("zy.json is missing"),
        };
        assert!(named, "{case}: {reason}");
        assert!(
            reason.contains("tokend login zy") && reason.contains("Restore"),
            "{case}: {reason}"
        );

        // The way back: the file restored, then a reload.
        std::fs::write(&file, &backup).unwrap();
        reload(&mut h, &accounts).await;
        assert_eq!(h.token("zy").await, before, "{case}");
        refreshes_an_hour_on(&h, "zy", 2).await;
        h.shutdown().await;
    }
}

#[tokio::test(start_paused = true)]
async fn a_reseed_with_an_unspent_token_still_wins_and_a_spent_one_is_ignored() {
    let (mut h, seed) = running_zy().await;
    // A new grant in the config: the stored chain gives way to it.
    let reseed = h.fake.grant_refresh_token("zy-client", None);
    reload(&mut h, &zywave_account("zy", &reseed)).await;
    assert_eq!(h.fake.counts().refresh_grants, 2);
    assert_eq!(state_of(&h, "zy").await.0, "ok");
    // The old seed put back: spent, so not sent; the stored chain goes on.
    reload(&mut h, &zywave_account("zy", &seed)).await;
    let (state, reason) = state_of(&h, "zy").await;
    assert_eq!(state, "degraded", "{reason}");
    assert!(reason.contains("spent already"), "{reason}");
    assert_eq!(h.fake.counts().refresh_grants, 2);
    assert_no_reuse(&h.fake, "zy-client", 2);
    h.shutdown().await;
}

// ---------------------------------------------------------------------------------------
// The binary.

const LIMIT: Duration = Duration::from_secs(30);

async fn cli(setup: &Setup, args: &[&str], stdin: Option<&str>) -> Output {
    let mut cmd = tokend();
    cmd.args(args).arg("--config").arg(setup.config_path());
    if let Some(text) = stdin {
        let path = setup.dir.path().join("stdin");
        std::fs::write(&path, text).unwrap();
        cmd.stdin(Stdio::from(std::fs::File::open(&path).unwrap()));
    }
    run_cmd(&mut cmd, LIMIT).await
}

/// Polls `/v1/accounts` until `account` is in `state`; returns its entry.
async fn wait_state(daemon: &Daemon, account: &str, state: &str) -> Value {
    let client = http_client();
    let deadline = tokio::time::Instant::now() + LIMIT;
    loop {
        if let Ok(r) = client.get(daemon.url("/v1/accounts")).send().await
            && let Ok(v) = r.json::<Value>().await
            && let Some(a) = v["accounts"]
                .as_array()
                .and_then(|l| l.iter().find(|a| a["account"] == account))
            && a["state"] == state
        {
            return a.clone();
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{account} never became {state}; log:\n{}",
            daemon.log()
        );
        tokio::time::sleep(POLL).await;
    }
}

/// Forces a refresh of `zy` (`POST /v1/accounts/zy/refresh`), and asserts the refresh
/// token it stored is the provider's live one.
async fn refresh_now(daemon: &Daemon, setup: &Setup, fake: &FakeProvider) {
    let refreshed = http_client()
        .post(daemon.url("/v1/accounts/zy/refresh"))
        .header(REQUEST_HEADER, "1")
        .send()
        .await
        .unwrap();
    assert_eq!(refreshed.status(), StatusCode::OK, "{}", daemon.log());
    let current = setup.state("zy")["refresh_token"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(fake.is_live_refresh_token(&current));
}

fn replaced_copies(dir: &Path) -> usize {
    std::fs::read_dir(dir)
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .file_name()
                .to_string_lossy()
                .contains(".replaced-")
        })
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_seed_shared_by_two_accounts_is_a_config_error() {
    let (fake, url, seed) = start_provider_with_clients().await;
    let setup = Setup::new();
    setup.write_config(&[
        zy_account("zy", &url, &seed),
        zy_account("zy-copy", &url, &seed),
    ]);
    for command in ["check", "run"] {
        let out = cli(&setup, &[command], None).await;
        let f = expect_code(&out, 78);
        assert!(
            f.stderr.contains("accounts.zy-copy.refresh_token")
                && f.stderr.contains("accounts zy (line"),
            "{command}: {}",
            f.stderr
        );
        assert!(!f.stderr.contains(&seed));
    }
    assert_eq!(fake.counts().token_requests, 0);
    assert_no_reuse(&fake, "zy-client", 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn import_never_makes_things_worse() {
    let World { fake, seed, setup } = zy_and_svc_world(None, FAST_REFRESH).await;
    let mut daemon = setup.start_ready(&http_client()).await;
    let served = access_token(&daemon.token(&http_client(), "zy").await);
    let stored = std::fs::read(setup.state_file("zy")).unwrap();
    let requests = fake.counts().token_requests;

    // A wrong token: tried once, refused by the provider; nothing changes.
    let out = cli(&setup, &["import", "zy"], Some("wrong\n")).await;
    let f = expect_code(&out, 1);
    assert!(
        f.stderr.contains("invalid_grant") && f.stderr.contains("nothing was changed"),
        "{}",
        f.stderr
    );
    // A token spent already (the seed): refused locally, nothing sent.
    let sent = fake.counts().token_requests;
    assert_eq!(sent, requests + 1);
    let out = cli(&setup, &["import", "zy"], Some(&seed)).await;
    let f = expect_code(&out, 1);
    assert!(
        f.stderr.contains("presented to the provider before"),
        "{}",
        f.stderr
    );
    assert!(!f.stderr.contains(&seed) && !f.stdout.contains(&seed));
    assert_eq!(fake.counts().token_requests, sent, "nothing was sent");

    assert_eq!(std::fs::read(setup.state_file("zy")).unwrap(), stored);
    assert_eq!(
        access_token(&daemon.token(&http_client(), "zy").await),
        served
    );
    assert_eq!(
        wait_state(&daemon, "zy", "ok").await["last_error"],
        Value::Null
    );
    assert_no_reuse(&fake, "zy-client", 1);

    // The way forward: a good token is taken; the chain it replaces is kept aside until
    // the new one has refreshed in the daemon.
    let fresh = fake.grant_refresh_token("zy-client", Some("offline_access api:read"));
    let out = cli(&setup, &["import", "zy"], Some(&fresh)).await;
    let f = expect_code(&out, 0);
    assert!(f.stdout.contains("zy: ok"), "{}", f.stdout);
    assert!(!fake.is_live_refresh_token(&fresh), "tried: rotated once");
    assert_eq!(replaced_copies(&setup.state_dir()), 1);
    refresh_now(&daemon, &setup, &fake).await;
    assert_eq!(replaced_copies(&setup.state_dir()), 0);
    // The replaced chain was left alone, not revoked: two live families.
    assert_no_reuse(&fake, "zy-client", 2);
    assert_eq!(daemon.stop().await.code(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn state_rename_moves_the_chain_with_the_daemon_running_or_stopped() {
    let (fake, url, seed) = start_provider_with_clients().await;
    let setup = Setup::new();
    let client = http_client();
    setup.write_config(&[zy_account("zy", &url, &seed), FAST_REFRESH.into()]);
    let mut daemon = setup.start_ready(&client).await;
    let served = access_token(&daemon.token(&client, "zy").await);

    // Refused while zy is still configured: two accounts must not share a chain.
    let out = cli(&setup, &["state", "rename", "zy", "zy-prod"], None).await;
    let f = expect_code(&out, 78);
    assert!(
        f.stderr.contains("[accounts.zy] is still in"),
        "{}",
        f.stderr
    );

    // The rename in the config, SIGHUP: zy-prod is held, naming the way back.
    setup.write_config(&[zy_account("zy-prod", &url, &seed), FAST_REFRESH.into()]);
    daemon.signal("HUP");
    let held = wait_state(&daemon, "zy-prod", "needs_reauth").await;
    assert!(
        held["last_error"]
            .as_str()
            .unwrap()
            .contains("tokend state rename zy zy-prod"),
        "{held}"
    );
    let out = cli(&setup, &["state", "rename", "zy", "zy-prod"], None).await;
    let f = expect_code(&out, 0);
    assert!(f.stdout.contains("the running daemon"), "{}", f.stdout);
    wait_state(&daemon, "zy-prod", "ok").await;
    assert_eq!(
        access_token(&daemon.token(&client, "zy-prod").await),
        served
    );
    assert_eq!(daemon.stop().await.code(), Some(0));
    assert_no_reuse(&fake, "zy-client", 1);

    // Back to the old name with the daemon stopped.
    setup.write_config(&[zy_account("zy", &url, &seed), FAST_REFRESH.into()]);
    let out = cli(&setup, &["state", "rename", "zy-prod", "zy"], None).await;
    let f = expect_code(&out, 0);
    assert!(
        f.stdout.contains("took over the state of zy-prod"),
        "{}",
        f.stdout
    );
    let out = cli(&setup, &["state", "rename", "zy-prod", "zy"], None).await;
    let f = expect_code(&out, 1);
    assert!(f.stderr.contains("nothing to move"), "{}", f.stderr);
    let mut daemon = setup.start_ready(&client).await;
    assert_eq!(access_token(&daemon.token(&client, "zy").await), served);
    // Its next refresh is on the old chain.
    refresh_now(&daemon, &setup, &fake).await;
    assert_eq!(fake.counts().refresh_grants, 2);
    assert_eq!(daemon.stop().await.code(), Some(0));
    assert_no_reuse(&fake, "zy-client", 1);
}
