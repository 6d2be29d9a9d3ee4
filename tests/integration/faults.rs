//! The fault suite: a scripted fault plan in the fake provider (each transient kind,
//! Retry-After, hangs, oversized bodies, invalid_grant, invalid_client, lost responses),
//! clock jumps, a failing disk and corrupt state, all on a paused clock. Each test
//! asserts what a consumer relies on: tokens served, nothing lost, provider calls bounded.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use http::StatusCode;
use tokend::clock::JUMP_CHECK_INTERVAL;
use tokend::demo::fake_provider::Fault;
use tokend::store::{FileStore, Store};

use crate::support::*;

const S: fn(u64) -> Duration = Duration::from_secs;

/// A daemon with one Zywave-style account holding a fresh 300 s token obtained by a
/// planned refresh, so the next one comes between 225 s and 240 s (80% minus up to 5%
/// jitter, and the 60 s margin). Returns the seed so a restart can use the same config.
async fn healthy(
    fake_setup: impl FnOnce(&tokend::demo::fake_provider::FakeProvider),
) -> (Harness, String) {
    let (h, seed) = Harness::zywave_with(S(300), fake_setup).await;
    h.advance(Duration::from_millis(10)).await;
    assert_eq!(h.account_state("zy").await["state"], "ok");
    // The token fetched at start is refreshed anywhere in its period (phase spreading);
    // run to that refresh, after which the normal plan holds.
    let state = h.account_state("zy").await;
    let next = humantime::parse_rfc3339(state["next_refresh"].as_str().unwrap()).unwrap();
    h.advance(h.clock.until(next)).await;
    while h.account_state("zy").await["last_refresh"] == state["last_refresh"] {
        h.advance(Duration::from_millis(10)).await;
    }
    assert_eq!(h.account_state("zy").await["state"], "ok");
    (h, seed)
}

/// Advances virtual time in 10 ms steps until the account shows `state` (at most `limit`).
async fn until_state(h: &Harness, state: &str, limit: Duration) {
    let deadline = tokio::time::Instant::now() + limit;
    while h.account_state("zy").await["state"] != state {
        assert!(
            tokio::time::Instant::now() < deadline,
            "account never reached {state}"
        );
        h.advance(Duration::from_millis(10)).await;
    }
}

#[tokio::test(start_paused = true)]
async fn each_transient_fault_keeps_the_token_served_and_recovers() {
    let faults = [
        ("500", Fault::Status(500)),
        ("502", Fault::Status(502)),
        ("503", Fault::Status(503)),
        ("429", Fault::Status(429)),
        (
            "temporarily_unavailable",
            Fault::OAuthError(503, "temporarily_unavailable"),
        ),
        ("non-JSON body", Fault::Garbage),
        ("200 without access_token", Fault::NoAccessToken),
        ("oversized body", Fault::Oversized(400 * 1024)),
        ("hang past the timeout", Fault::Hang(S(120))),
    ];
    for (kind, fault) in faults {
        let (h, _) = healthy(|_| {}).await;
        let before = h.token("zy").await;
        let calls = h.fake.counts().token_requests;
        // Three in a row, so the degraded state lasts long enough to be seen.
        h.fake.push_faults([fault.clone(), fault.clone(), fault]);
        h.advance(S(220)).await;
        until_state(&h, "degraded", S(120)).await;
        let state = h.account_state("zy").await;
        assert!(
            state["last_error"].as_str().unwrap().len() > 10,
            "{kind}: {state}"
        );
        assert_eq!(
            h.token("zy").await,
            before,
            "{kind}: the still-valid token is served meanwhile"
        );
        // Backoff: ≤1 s, ≤2 s, ≤4 s (plus 30 s per hang); then the fourth call succeeds.
        until_state(&h, "ok", S(120)).await;
        let state = h.account_state("zy").await;
        assert!(
            state["last_error"].is_null(),
            "{kind}: recovered on the first success"
        );
        let after = h.token("zy").await;
        assert_ne!(after, before, "{kind}");
        assert!(h.fake.is_valid_access_token(&after), "{kind}");
        assert_eq!(
            h.fake.counts().token_requests,
            calls + 4,
            "{kind}: three failures, one success"
        );
    }
}

#[tokio::test(start_paused = true)]
async fn retry_after_is_honoured_in_seconds() {
    let (h, _) = healthy(|_| {}).await;
    h.fake.push_faults([Fault::RetryAfter(503, "120".into())]);
    h.advance(S(220)).await;
    until_state(&h, "degraded", S(30)).await;
    let calls = h.fake.counts().token_requests;
    h.advance(S(119)).await;
    assert_eq!(
        h.fake.counts().token_requests,
        calls,
        "no call before Retry-After"
    );
    h.advance(S(2)).await;
    assert_eq!(
        h.fake.counts().token_requests,
        calls + 1,
        "retried after it"
    );
    assert_eq!(h.account_state("zy").await["state"], "ok");
}

#[tokio::test(start_paused = true)]
async fn retry_after_is_honoured_as_an_http_date() {
    let (h, _) = healthy(|_| {}).await;
    // An HTTP date has whole seconds.
    let in_400s = (h.clock.now() + S(400))
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap();
    let at = std::time::UNIX_EPOCH + S(in_400s.as_secs());
    h.fake
        .push_faults([Fault::RetryAfter(503, httpdate::fmt_http_date(at))]);
    h.advance(S(220)).await;
    until_state(&h, "degraded", S(30)).await;
    let calls = h.fake.counts().token_requests;
    h.advance(h.clock.until(at) - S(1)).await;
    assert_eq!(
        h.fake.counts().token_requests,
        calls,
        "no call before the date"
    );
    h.advance(S(2)).await;
    assert_eq!(
        h.fake.counts().token_requests,
        calls + 1,
        "retried at the date"
    );
}

#[tokio::test(start_paused = true)]
async fn an_outage_backs_off_and_never_serves_an_expired_token() {
    let (h, _) = healthy(|_| {}).await;
    let start = h.clock.now();
    let token = h.token("zy").await;
    h.fake
        .push_faults(std::iter::repeat_n(Fault::Status(503), 200));
    // Refresh due by 240 s; the token expires at 300 s; watch until 20 min.
    let mut saw_degraded = false;
    for _ in 0..120 {
        h.advance(S(10)).await;
        let (status, body) = h.get("/v1/token/zy").await;
        if h.clock.now() < start + S(300) {
            assert_eq!(status, StatusCode::OK);
            assert_eq!(body["access_token"], token.as_str());
            saw_degraded |= h.account_state("zy").await["state"] == "degraded";
        } else {
            assert_eq!(
                status,
                StatusCode::SERVICE_UNAVAILABLE,
                "an expired token is never served"
            );
            assert_eq!(body["state"], "expired");
            assert!(body.get("access_token").is_none());
        }
    }
    assert!(saw_degraded);
    // Capped exponential backoff: far fewer calls than a hot loop would make in 16 min.
    let failed = h.fake.counts().token_requests - 1;
    assert!(
        (4..=40).contains(&failed),
        "{failed} calls during the outage"
    );
}

#[tokio::test(start_paused = true)]
async fn invalid_grant_stops_refreshing_until_a_human_acts() {
    let (h, _) = healthy(|_| {}).await;
    h.fake
        .push_faults([Fault::OAuthError(400, "invalid_grant")]);
    h.advance(S(241)).await;
    let calls = h.fake.counts().token_requests;
    let state = h.account_state("zy").await;
    assert_eq!(state["state"], "needs_reauth", "{state}");
    let reason = state["last_error"].as_str().unwrap();
    assert!(
        reason.contains("re-authorize") && !reason.contains("interrupted"),
        "{reason}"
    );
    // Readers asking for fresher tokens do not make it call again.
    for _ in 0..10 {
        let (status, body) = h.get("/v1/token/zy?min_valid=120").await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(body["state"], "needs_reauth");
    }
    h.advance(S(3600)).await;
    assert_eq!(
        h.fake.counts().token_requests,
        calls,
        "no calls while re-auth is needed"
    );
    let (status, body) = h.get("/v1/token/zy").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(body["state"], "needs_reauth");
}

#[tokio::test(start_paused = true)]
async fn invalid_client_is_a_credential_problem_retried_slowly() {
    let (h, _) = healthy(|_| {}).await;
    h.fake
        .push_faults([Fault::OAuthError(401, "invalid_client")]);
    h.advance(S(220)).await;
    until_state(&h, "degraded", S(30)).await;
    let state = h.account_state("zy").await;
    assert!(
        state["last_error"]
            .as_str()
            .unwrap()
            .contains("client_secret"),
        "{state}"
    );
    let calls = h.fake.counts().token_requests;
    h.advance(S(890)).await; // slow_retry is 15 min
    assert_eq!(h.fake.counts().token_requests, calls, "no quick retries");
    assert_eq!(
        h.get("/v1/token/zy").await.0,
        StatusCode::SERVICE_UNAVAILABLE,
        "expired meanwhile"
    );
    // Plus up to 10% jitter. (The token the retry obtains is refreshed again anywhere in
    // its period, so only the retry itself is counted.)
    for _ in 0..102 {
        if h.fake.counts().token_requests > calls {
            break;
        }
        h.advance(S(1)).await;
    }
    assert_eq!(h.fake.counts().token_requests, calls + 1);
    assert_eq!(
        h.get("/v1/token/zy").await.0,
        StatusCode::OK,
        "recovered once the provider accepts"
    );
}

/// Runs a refresh whose response is lost after the provider rotated the refresh token,
/// then stops the daemon before any retry can succeed, as a crash would.
async fn lose_a_rotation(grace: Duration) -> (Harness, String) {
    let (h, seed) = healthy(|f| f.set_reuse_grace(grace)).await;
    h.fake.push_faults(
        std::iter::once(Fault::LoseResponse).chain(std::iter::repeat_n(Fault::Status(503), 50)),
    );
    h.advance(S(242)).await;
    let file = h.state_file("zy");
    assert!(
        file["refresh_in_flight_since"].is_u64(),
        "the rotation is marked in flight: {file}"
    );
    let (fake, clock, dir) = h.stop().await;
    fake.clear_faults();
    let store = FileStore::open(dir.path()).unwrap();
    let h = Harness::start_with_store(fake, clock, &zywave_account("zy", &seed), dir, store).await;
    h.advance(Duration::from_millis(10)).await;
    (h, seed)
}

#[tokio::test(start_paused = true)]
async fn a_rotation_lost_in_flight_is_recovered_within_the_reuse_window() {
    let (h, _) = lose_a_rotation(S(30)).await;
    let state = h.account_state("zy").await;
    assert_eq!(state["state"], "ok", "{state}");
    let rt = h.state_file("zy")["refresh_token"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(h.fake.is_live_refresh_token(&rt));
    assert!(h.state_file("zy").get("refresh_in_flight_since").is_none());
}

#[tokio::test(start_paused = true)]
async fn a_rotation_lost_outside_the_reuse_window_asks_for_reauth_and_says_why() {
    let (h, _) = lose_a_rotation(Duration::ZERO).await;
    let state = h.account_state("zy").await;
    assert_eq!(state["state"], "needs_reauth", "{state}");
    assert!(
        state["last_error"]
            .as_str()
            .unwrap()
            .contains("interrupted"),
        "{state}"
    );
}

#[tokio::test(start_paused = true)]
async fn a_short_lived_token_does_not_cause_a_refresh_storm() {
    // 3 s tokens: far shorter than the 60 s margin.
    let (h, _) = Harness::zywave(S(3)).await;
    h.advance(S(600)).await;
    // min_interval is 5 s in the harness config: at most one refresh per 5 s.
    let calls = h.fake.counts().refresh_grants;
    assert!(calls <= 600 / 5 + 1, "{calls} refreshes in 10 min");
    assert!(
        calls >= 100,
        "{calls}: it still refreshes as often as allowed"
    );
}

#[tokio::test(start_paused = true)]
async fn a_wall_clock_jump_refreshes_at_once() {
    let (h, _) = healthy(|_| {}).await;
    let calls = h.fake.counts().refresh_grants;
    // The host slept for an hour: the monotonic clock (and tokio's timers) did not move.
    h.clock.jump_forward(S(3600));
    h.advance(JUMP_CHECK_INTERVAL + S(1)).await;
    assert_eq!(
        h.fake.counts().refresh_grants,
        calls + 1,
        "refreshed on wake-up, not after a stale timer"
    );
    let token = h.token("zy").await;
    assert!(h.fake.is_valid_access_token(&token));
}

#[tokio::test(start_paused = true)]
async fn a_reader_right_after_a_jump_gets_a_fresh_token_not_an_expired_one() {
    let (h, _) = healthy(|_| {}).await;
    h.advance(S(10)).await;
    h.clock.jump_forward(S(3600));
    // Before the detector's next check: the handler itself sees the expiry on the wall clock.
    let (status, body) = h.get("/v1/token/zy").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(
        h.fake
            .is_valid_access_token(body["access_token"].as_str().unwrap())
    );
}

#[tokio::test(start_paused = true)]
async fn a_failing_disk_keeps_tokens_served_and_the_last_good_file() {
    let (clock, fake) = manual_provider(S(300));
    let seed = fake.grant_refresh_token("zy-client", None);
    let dir = tempfile::tempdir().unwrap();
    let flaky = Arc::new(FlakyStore {
        inner: FileStore::open(dir.path()).unwrap(),
        failing: false.into(),
    });
    let h = Harness::start_with_store(
        fake,
        clock,
        &zywave_account("zy", &seed),
        dir,
        flaky.clone() as Arc<dyn Store>,
    )
    .await;
    h.advance(Duration::from_millis(10)).await;
    let good_file = h.state_file("zy");

    flaky.failing.store(true, Ordering::SeqCst);
    // Up to the first refresh (planned anywhere in the first 240 s: phase spreading).
    let stored = good_file["access"]["token"].as_str().unwrap();
    let mut token = h.token("zy").await;
    for _ in 0..241 {
        if token != stored {
            break;
        }
        h.advance(S(1)).await;
        token = h.token("zy").await;
    }
    // The refresh went through; its result lives in memory only and is served.
    assert_ne!(token, stored);
    assert!(h.fake.is_valid_access_token(&token));
    let state = h.account_state("zy").await;
    assert_eq!(state["state"], "degraded", "{state}");
    assert!(
        state["last_error"]
            .as_str()
            .unwrap()
            .contains("No space left"),
        "{state}"
    );
    assert_eq!(
        h.state_file("zy"),
        good_file,
        "the last good file is untouched"
    );

    // The disk recovers: the retried save lands the rotated refresh token.
    flaky.failing.store(false, Ordering::SeqCst);
    until_state(&h, "ok", S(120)).await;
    let file = h.state_file("zy");
    assert!(
        h.fake
            .is_live_refresh_token(file["refresh_token"].as_str().unwrap())
    );
    assert_eq!(file["access"]["token"], token.as_str());
}

#[tokio::test(start_paused = true)]
async fn a_corrupt_state_file_is_kept_aside_and_the_seed_used() {
    let (clock, fake) = manual_provider(S(300));
    let seed = fake.grant_refresh_token("zy-client", None);
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("zy.json"), b"{\"version\":1,\"acc").unwrap();
    let store = FileStore::open(dir.path()).unwrap();
    let h = Harness::start_with_store(fake, clock, &zywave_account("zy", &seed), dir, store).await;
    h.advance(Duration::from_millis(10)).await;
    assert_eq!(
        h.get("/v1/token/zy").await.0,
        StatusCode::OK,
        "the seed got a token"
    );
    let kept: Vec<_> = std::fs::read_dir(h.dir.path())
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().into_string().unwrap())
        .filter(|n| n.starts_with("zy.json.corrupt-"))
        .collect();
    assert_eq!(kept.len(), 1, "the corrupt file is renamed, not deleted");
    assert_eq!(
        std::fs::read(h.dir.path().join(&kept[0])).unwrap(),
        b"{\"version\":1,\"acc"
    );
}

#[tokio::test(start_paused = true)]
async fn a_reload_retries_an_account_waiting_for_reauth_once() {
    let (mut h, seed) = healthy(|_| {}).await;
    h.fake
        .push_faults([Fault::OAuthError(400, "invalid_grant")]);
    h.advance(S(241)).await;
    assert_eq!(h.account_state("zy").await["state"], "needs_reauth");
    let calls = h.fake.counts().token_requests;
    // SIGHUP with the same config: the account restarts from its stored state and tries
    // once (here the provider accepts again); no loop either way.
    let same = config(&h.dir, &zywave_account("zy", &seed));
    let report = h.daemon.as_mut().unwrap().reload(same).await;
    assert_eq!(report.restarted.len(), 1);
    h.advance(S(1)).await;
    assert_eq!(h.fake.counts().token_requests, calls + 1);
    assert_eq!(h.account_state("zy").await["state"], "ok");
    h.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn an_unreadable_state_file_is_never_overwritten() {
    let (clock, fake) = manual_provider(S(300));
    let seed = fake.grant_refresh_token("zy-client", None);
    let dir = tempfile::tempdir().unwrap();
    // Reading fails with an I/O error (here: a directory where the file should be), not
    // with a parse error: the content may be the only valid refresh token.
    std::fs::create_dir(dir.path().join("zy.json")).unwrap();
    std::fs::write(dir.path().join("zy.json").join("keep"), b"precious").unwrap();
    let store = FileStore::open(dir.path()).unwrap();
    let h = Harness::start_with_store(fake, clock, &zywave_account("zy", &seed), dir, store).await;
    h.advance(S(60)).await;
    let state = h.account_state("zy").await;
    assert_eq!(state["state"], "needs_reauth", "{state}");
    assert!(
        state["last_error"].as_str().unwrap().contains("reload"),
        "{state}"
    );
    assert_eq!(h.fake.counts().token_requests, 0, "held: no provider call");
    assert_eq!(
        std::fs::read(h.dir.path().join("zy.json").join("keep")).unwrap(),
        b"precious"
    );
}
