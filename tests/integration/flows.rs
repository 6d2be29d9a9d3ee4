//! Refresh, persistence and API flows through the library on a paused clock: what a
//! consumer sees over time, what lands on disk, what survives a restart.

use std::time::Duration;

use http::StatusCode;

use crate::support::*;

#[tokio::test(start_paused = true)]
async fn tokens_are_refreshed_before_expiry_and_never_served_expired() {
    let (clock, fake) = manual_provider(Duration::from_secs(300));
    let seed = fake.grant_refresh_token("zy-client", Some("offline_access accounts:read"));
    let accounts = zywave_account("zy", &seed) + &client_credentials_account("cc");
    let h = Harness::start(fake, clock, &accounts).await;

    // Over an hour of virtual time, polled every 10 s: always a token the provider
    // accepts, with time left.
    let mut seen = std::collections::HashSet::new();
    for _ in 0..360 {
        for account in ["zy", "cc"] {
            let (status, body) = h.get(&format!("/v1/token/{account}")).await;
            assert_eq!(status, StatusCode::OK, "{body}");
            let token = body["access_token"].as_str().unwrap();
            assert!(
                h.fake.is_valid_access_token(token),
                "served a token the provider rejects"
            );
            assert!(body["expires_in"].as_u64().unwrap() >= 1);
            seen.insert(token.to_string());
        }
        h.advance(Duration::from_secs(10)).await;
    }
    // 300 s tokens refresh at 240 s (80%, and the 60 s margin): 15 per account per hour.
    let counts = h.fake.counts();
    assert!((14..=17).contains(&counts.refresh_grants), "{counts:?}");
    assert!(
        (14..=17).contains(&counts.client_credentials_grants),
        "{counts:?}"
    );
    assert!(seen.len() as u64 >= counts.issued - 2);
}

#[tokio::test(start_paused = true)]
async fn the_token_response_has_the_documented_shape() {
    let (clock, fake) = manual_provider(Duration::from_secs(3600));
    let seed = fake.grant_refresh_token("zy-client", Some("offline_access accounts:read"));
    let h = Harness::start(fake, clock, &zywave_account("zy", &seed)).await;
    h.advance(Duration::from_millis(10)).await;

    let (status, body) = h.get("/v1/token/zy").await;
    assert_eq!(status, StatusCode::OK);
    let token = body["access_token"].as_str().unwrap();
    assert_eq!(body["account"], "zy");
    assert_eq!(body["token_type"], "Bearer");
    assert_eq!(body["scope"], "offline_access accounts:read");
    // 10 ms into its life: whole seconds left, rounded down.
    assert_eq!(body["expires_in"], 3599);
    assert_eq!(body["expires_at"], "2027-01-15T09:00:00Z");
    assert_eq!(body["headers"]["Authorization"], format!("Bearer {token}"));
    assert_eq!(body["headers"]["Profile"], "B 1234");

    let (status, plain) = h.raw("/v1/token/zy/access_token", true).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(plain, token.as_bytes());
}

#[tokio::test(start_paused = true)]
async fn api_guards_and_errors() {
    let (h, seed) = Harness::zywave(Duration::from_secs(3600)).await;
    h.advance(Duration::from_millis(10)).await;

    for uri in [
        "/v1/token/zy",
        "/v1/token/zy/access_token",
        "/v1/token/nope",
    ] {
        let (status, body) = h.request(uri, false).await;
        assert_eq!(status, StatusCode::FORBIDDEN, "{uri}");
        assert_eq!(body["error"], "forbidden");
        assert!(body.get("access_token").is_none());
    }
    let (status, body) = h.get("/v1/token/nope").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(body["error"], "unknown_account");
    let (status, body) = h.get("/v1/token/zy?min_valid=soon").await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(
        body["error_description"]
            .as_str()
            .unwrap()
            .contains("min_valid")
    );
    let (status, _) = h.get("/healthz").await;
    assert_eq!(status, StatusCode::OK);

    // /v1/accounts tells state and timing, never a secret.
    let (status, raw) = h.raw("/v1/accounts", false).await;
    assert_eq!(status, StatusCode::OK);
    let text = String::from_utf8(raw).unwrap();
    let token = h.token("zy").await;
    for secret in [token.as_str(), seed.as_str(), "zy-secret"] {
        assert!(
            !text.contains(secret),
            "/v1/accounts leaks a secret: {text}"
        );
    }
    let state = h.account_state("zy").await;
    assert_eq!(state["state"], "ok");
    assert_eq!(state["grant"], "refresh_token");
    assert!(state["last_refresh"].is_string() && state["next_refresh"].is_string());
}

#[tokio::test(start_paused = true)]
async fn readyz_waits_for_every_account() {
    let (clock, fake) = manual_provider(Duration::from_secs(3600));
    // One account can never get a token: its refresh token is unknown to the provider.
    let good = fake.grant_refresh_token("zy-client", None);
    let accounts = zywave_account("good", &good) + &zywave_account("bad", "rt-unknown");
    let h = Harness::start(fake, clock, &accounts).await;
    h.advance(Duration::from_millis(10)).await;
    let (status, body) = h.get("/readyz").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(body["not_ready"].as_array().unwrap().len(), 1, "{body}");
    assert_eq!(body["not_ready"][0]["account"], "bad");
    assert_eq!(body["not_ready"][0]["state"], "needs_reauth");
    let (status, body) = h.get("/v1/token/bad").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(body["state"], "needs_reauth");
    assert_eq!(body["error"], "token_unavailable");
}

#[tokio::test(start_paused = true)]
async fn rotated_refresh_token_is_persisted_and_survives_a_restart() {
    let (h, seed) = Harness::zywave(Duration::from_secs(120)).await;
    h.advance(Duration::from_secs(200)).await; // initial fetch + one refresh
    assert!(h.fake.counts().refresh_grants >= 2);

    let file = h.state_file("zy");
    let stored_rt = file["refresh_token"].as_str().unwrap().to_string();
    assert!(
        h.fake.is_live_refresh_token(&stored_rt),
        "the file holds the live refresh token"
    );
    assert!(
        !h.fake.is_live_refresh_token(&seed),
        "the seed was rotated out"
    );
    let counts = h.fake.counts();
    assert_eq!(
        (counts.reuse_detected, counts.forks),
        (0, 0),
        "no spent token presented again: {counts:?}"
    );
    assert_eq!(
        h.fake.live_refresh_tokens("zy-client"),
        1,
        "one chain, alive"
    );
    assert_eq!(file["version"], 1);
    assert!(
        file.get("refresh_in_flight_since").is_none(),
        "no rotation left marked in flight"
    );
    let served = h.token("zy").await;
    assert_eq!(file["access"]["token"], served.as_str());

    let (fake, clock, dir) = h.stop().await;
    let before = fake.counts();
    let store = tokend::store::FileStore::open(dir.path()).unwrap();
    let accounts = zywave_account("zy", &seed);
    let h = Harness::start_with_store(fake, clock, &accounts, dir, store).await;
    // Served at once from disk, with no provider call.
    assert_eq!(h.token("zy").await, served);
    assert_eq!(h.fake.counts(), before);
    // And the next refresh uses the persisted (rotated) refresh token successfully.
    h.advance(Duration::from_secs(120)).await;
    assert_eq!(h.fake.counts().rejected, 0);
    assert!(h.fake.counts().refresh_grants > before.refresh_grants);
}

#[tokio::test(start_paused = true)]
async fn concurrent_min_valid_readers_share_one_refresh() {
    // Two-hour tokens: the account's own next refresh, spread at random over the period,
    // is then at least 180 s away (half the 5% jitter window), so the herd's refresh is
    // the only call in this test's window even when virtual time moves on while saves
    // run on blocking threads.
    let (h, _) = Harness::zywave(Duration::from_secs(7200)).await;
    h.advance(Duration::from_secs(30)).await;
    let first = h.token("zy").await;
    let calls = h.fake.counts().refresh_grants;

    // Satisfied by the current token: no provider call.
    let (status, body) = h.get("/v1/token/zy?min_valid=300").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["access_token"], first.as_str());
    assert_eq!(h.fake.counts().refresh_grants, calls);

    // 7,170 s left; 50 readers want 7,190 s: one refresh serves them all.
    let mut readers = Vec::new();
    for _ in 0..50 {
        let api = h.api.clone();
        readers.push(tokio::spawn(async move {
            use tower::ServiceExt;
            let req = http::Request::get("/v1/token/zy?min_valid=7190")
                .header("Tokend-Request", "1")
                .body(axum::body::Body::empty())
                .unwrap();
            let resp = api.oneshot(req).await.unwrap();
            let status = resp.status();
            let body = http_body_util::BodyExt::collect(resp.into_body())
                .await
                .unwrap()
                .to_bytes();
            let json: serde_json::Value = serde_json::from_slice(&body).unwrap();
            (status, json["access_token"].as_str().map(str::to_string))
        }));
    }
    let mut tokens = std::collections::HashSet::new();
    for r in readers {
        let (status, token) = r.await.unwrap();
        assert_eq!(status, StatusCode::OK);
        tokens.insert(token.unwrap());
    }
    assert_eq!(
        h.fake.counts().refresh_grants,
        calls + 1,
        "one provider call for the herd"
    );
    assert_eq!(tokens.len(), 1);
    assert!(!tokens.contains(&first));
}

#[tokio::test(start_paused = true)]
async fn min_valid_beyond_the_provider_lifetime_is_refused_without_a_loop() {
    let (h, _) = Harness::zywave(Duration::from_secs(600)).await;
    h.advance(Duration::from_secs(1)).await;
    let calls = h.fake.counts().token_requests;
    for _ in 0..20 {
        let (status, body) = h.get("/v1/token/zy?min_valid=3600").await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert!(
            body["error_description"]
                .as_str()
                .unwrap()
                .contains("less than"),
            "{body}"
        );
    }
    // At most one refresh tried within min_interval, however many readers ask.
    assert!(h.fake.counts().token_requests <= calls + 1);
    // Ordinary readers are unaffected.
    assert_eq!(h.get("/v1/token/zy").await.0, StatusCode::OK);
}

#[tokio::test(start_paused = true)]
async fn each_seed_provider_style_is_spoken() {
    let (clock, fake) = manual_provider(Duration::from_secs(3600));
    let zy = fake.grant_refresh_token("zy-client", Some("offline_access accounts:read"));
    let zephr =
        fake.grant_refresh_token("zephr-client", Some("user.account:read user.profile:read"));
    let accounts = zywave_account("zy", &zy)
        + &zephr_account("zephr", &zephr)
        + &client_credentials_account("cc");
    let h = Harness::start(fake, clock, &accounts).await;
    h.advance(Duration::from_millis(10)).await;
    for account in ["zy", "zephr", "cc"] {
        let token = h.token(account).await;
        assert!(h.fake.is_valid_access_token(&token), "{account}");
    }
    // Zephr's comma-separated scope is served space-separated.
    let (_, body) = h.get("/v1/token/zephr").await;
    assert_eq!(body["scope"], "user.account:read user.profile:read");
    // The generic endpoint's string expires_in is honoured.
    let (_, body) = h.get("/v1/token/cc").await;
    assert_eq!(body["expires_in"], 3599);
    assert_eq!(h.fake.counts().rejected, 0);
}

#[tokio::test(start_paused = true)]
async fn a_jwt_without_expires_in_is_scheduled_from_its_exp_claim() {
    let (clock, fake) = manual_provider(Duration::from_secs(900));
    fake.register(tokend::demo::fake_provider::ClientSpec {
        jwt_without_expires_in: true,
        ..tokend::demo::fake_provider::ClientSpec::generic_client_credentials(
            "cc-client",
            "cc-secret",
        )
    });
    let h = Harness::start(fake, clock, &client_credentials_account("cc")).await;
    h.advance(Duration::from_millis(10)).await;
    let (_, body) = h.get("/v1/token/cc").await;
    assert_eq!(
        body["expires_in"], 899,
        "from the exp claim, not the 1 h default"
    );
    // The first token's refresh comes by 80% of 900 s (spread over the period).
    for _ in 0..720 {
        if h.fake.counts().client_credentials_grants == 2 {
            break;
        }
        h.advance(Duration::from_secs(1)).await;
    }
    assert_eq!(h.fake.counts().client_credentials_grants, 2);
    // That refresh was on schedule: the next is planned at 75–80% of 900 s.
    let state = h.account_state("cc").await;
    let at = |field: &str| humantime::parse_rfc3339(state[field].as_str().unwrap()).unwrap();
    let planned_after = at("next_refresh")
        .duration_since(at("last_refresh"))
        .unwrap();
    assert!(
        (674..=720).contains(&planned_after.as_secs()),
        "{planned_after:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn a_new_seed_in_the_config_replaces_the_stored_refresh_token() {
    let (h, seed) = Harness::zywave(Duration::from_secs(3600)).await;
    h.advance(Duration::from_secs(1)).await;
    let old_rt = h.state_file("zy")["refresh_token"]
        .as_str()
        .unwrap()
        .to_string();

    // Restart with the same seed: the stored, rotated token is kept.
    let (fake, clock, dir) = h.stop().await;
    let store = tokend::store::FileStore::open(dir.path()).unwrap();
    let h = Harness::start_with_store(fake, clock, &zywave_account("zy", &seed), dir, store).await;
    h.advance(Duration::from_millis(10)).await;
    assert_eq!(h.state_file("zy")["refresh_token"], old_rt.as_str());

    // Restart with a new seed: it wins.
    let (fake, clock, dir) = h.stop().await;
    let new_seed = fake.grant_refresh_token("zy-client", None);
    let store = tokend::store::FileStore::open(dir.path()).unwrap();
    let h =
        Harness::start_with_store(fake, clock, &zywave_account("zy", &new_seed), dir, store).await;
    h.advance(Duration::from_millis(10)).await;
    // It is used at once (the old chain's access token may be another user's), so the
    // file now holds its successor.
    let stored = h.state_file("zy")["refresh_token"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(h.fake.is_live_refresh_token(&stored));
    assert!(
        !h.fake.is_live_refresh_token(&new_seed),
        "the new seed was used and rotated"
    );
    assert!(
        h.fake.is_live_refresh_token(&old_rt),
        "the old chain was left alone"
    );
}

#[tokio::test(start_paused = true)]
async fn reload_adds_removes_and_restarts_accounts() {
    let (clock, fake) = manual_provider(Duration::from_secs(3600));
    let seed = fake.grant_refresh_token("zy-client", None);
    let mut h = Harness::start(
        fake,
        clock,
        &(zywave_account("zy", &seed) + &client_credentials_account("cc")),
    )
    .await;
    h.advance(Duration::from_millis(10)).await;
    let zy_token = h.token("zy").await;

    let new = config(
        &h.dir,
        &(zywave_account("zy", &seed) + &client_credentials_account("cc2")),
    );
    let report = h.daemon.as_mut().unwrap().reload(new).await;
    assert_eq!(
        report.added.iter().map(|n| n.as_str()).collect::<Vec<_>>(),
        ["cc2"]
    );
    assert_eq!(
        report
            .removed
            .iter()
            .map(|n| n.as_str())
            .collect::<Vec<_>>(),
        ["cc"]
    );
    assert!(report.restarted.is_empty());
    h.advance(Duration::from_millis(10)).await;
    assert_eq!(h.get("/v1/token/cc").await.0, StatusCode::NOT_FOUND);
    assert_eq!(h.get("/v1/token/cc2").await.0, StatusCode::OK);
    assert_eq!(
        h.token("zy").await,
        zy_token,
        "an unchanged account keeps running untouched"
    );

    // Changing an account restarts it from its stored state: same token, no new call.
    let calls = h.fake.counts().refresh_grants;
    let changed = zywave_account("zy", &seed).replace("B 1234", "B 5678");
    let new = config(&h.dir, &(changed + &client_credentials_account("cc2")));
    let report = h.daemon.as_mut().unwrap().reload(new).await;
    assert_eq!(
        report
            .restarted
            .iter()
            .map(|n| n.as_str())
            .collect::<Vec<_>>(),
        ["zy"]
    );
    let (_, body) = h.get("/v1/token/zy").await;
    assert_eq!(body["headers"]["Profile"], "B 5678");
    assert_eq!(body["access_token"], zy_token.as_str());
    assert_eq!(h.fake.counts().refresh_grants, calls);
    h.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn shutdown_waits_for_an_in_flight_refresh_and_its_save() {
    // The first answer takes 5 s; shutdown is asked for in the middle of it.
    let (h, _) = Harness::zywave_with(Duration::from_secs(3600), |fake| {
        fake.push_faults([tokend::demo::fake_provider::Fault::Hang(
            Duration::from_secs(5),
        )])
    })
    .await;
    h.advance(Duration::from_secs(1)).await;
    let (fake, _clock, dir) = h.stop().await;
    // The rotation completed and was saved: the stored refresh token is the live one.
    let file: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.path().join("zy.json")).unwrap()).unwrap();
    let rt = file["refresh_token"].as_str().unwrap();
    assert!(fake.is_live_refresh_token(rt));
    assert!(file["access"]["token"].is_string());
}

#[tokio::test(start_paused = true)]
async fn a_forced_refresh_issues_a_new_token_behind_the_guard() {
    let (h, _) = Harness::zywave(Duration::from_secs(3600)).await;
    h.advance(Duration::from_secs(30)).await;
    let before = h.token("zy").await;

    let post = |with_header: bool| {
        let mut req = http::Request::post("/v1/accounts/zy/refresh");
        if with_header {
            req = req.header("Tokend-Request", "1");
        }
        req.body(axum::body::Body::empty()).unwrap()
    };
    use tower::ServiceExt;
    let resp = h.api.clone().oneshot(post(false)).await.unwrap();
    assert_eq!(resp.status(), StatusCode::FORBIDDEN);
    let resp = h.api.clone().oneshot(post(true)).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let body = http_body_util::BodyExt::collect(resp.into_body())
        .await
        .unwrap()
        .to_bytes();
    let body: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(body["state"], "ok");
    assert!(
        body.get("access_token").is_none(),
        "the admin route does not hand out tokens"
    );
    let after = h.token("zy").await;
    assert_ne!(after, before);
    assert!(h.fake.is_valid_access_token(&after));
}

#[tokio::test(start_paused = true)]
async fn metrics_report_refreshes_reads_expiry_and_state() {
    let (clock, fake) = manual_provider(Duration::from_secs(3600));
    let seed = fake.grant_refresh_token("zy-client", None);
    let h = Harness::start(fake, clock, &zywave_account("metrics-zy", &seed)).await;
    h.advance(Duration::from_secs(60)).await;
    h.token("metrics-zy").await;
    h.token("metrics-zy").await;
    let (status, body) = h.raw("/metrics", false).await;
    assert_eq!(status, StatusCode::OK);
    let text = String::from_utf8(body).unwrap();
    let value = |prefix: &str| -> f64 {
        text.lines()
            .find(|l| l.starts_with(prefix))
            .unwrap_or_else(|| panic!("no {prefix} in:\n{text}"))
            .rsplit(' ')
            .next()
            .unwrap()
            .parse()
            .unwrap()
    };
    assert_eq!(
        value(r#"tokend_refresh_attempts_total{account="metrics-zy",outcome="ok"}"#),
        1.0
    );
    assert_eq!(
        value(r#"tokend_token_reads_total{account="metrics-zy",consumer="-"}"#),
        2.0
    );
    assert_eq!(
        value(r#"tokend_token_expires_in_seconds{account="metrics-zy"}"#),
        3540.0
    );
    assert_eq!(
        value(r#"tokend_account_state{account="metrics-zy",state="ok"}"#),
        1.0
    );
    assert_eq!(
        value(r#"tokend_account_state{account="metrics-zy",state="expired"}"#),
        0.0
    );
    // One histogram for all accounts: per-account histograms cost memory at scale.
    assert!(text.contains("tokend_refresh_duration_seconds_bucket{le=\"0.005\"}"));
    assert!(!text.contains("tokend_refresh_duration_seconds_bucket{account="));
    assert!(
        text.contains(r#"tokend_http_requests_total{route="/v1/token/{account}",status="200"}"#),
        "{text}"
    );
    assert!(text.contains("# HELP tokend_refresh_attempts_total"));
    assert!(!text.contains(&seed));
}

#[tokio::test(start_paused = true)]
async fn forced_refreshes_report_failure_and_respect_the_minimum_interval() {
    let (h, _) = Harness::zywave(Duration::from_secs(3600)).await;
    h.advance(Duration::from_secs(30)).await;
    let force = || async {
        use tower::ServiceExt;
        let req = http::Request::post("/v1/accounts/zy/refresh")
            .header("Tokend-Request", "1")
            .body(axum::body::Body::empty())
            .unwrap();
        let resp = h.api.clone().oneshot(req).await.unwrap();
        let status = resp.status();
        let body = http_body_util::BodyExt::collect(resp.into_body())
            .await
            .unwrap()
            .to_bytes();
        (
            status,
            serde_json::from_slice::<serde_json::Value>(&body).unwrap(),
        )
    };
    h.fake
        .push_faults([tokend::demo::fake_provider::Fault::Status(503)]);
    let (status, body) = force().await;
    assert_eq!(
        status,
        StatusCode::SERVICE_UNAVAILABLE,
        "a failed forced refresh is an error: {body}"
    );
    assert_eq!(body["state"], "degraded");
    let calls = h.fake.counts().token_requests;
    let (status, body) = force().await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(
        body["error_description"]
            .as_str()
            .unwrap()
            .contains("min_interval"),
        "{body}"
    );
    assert_eq!(
        h.fake.counts().token_requests,
        calls,
        "no call within min_interval"
    );
    h.advance(Duration::from_secs(6)).await;
    assert_eq!(force().await.0, StatusCode::OK);
}

#[tokio::test(start_paused = true)]
async fn concurrent_refreshes_to_one_provider_are_bounded() {
    let (clock, fake) = manual_provider(Duration::from_secs(3600));
    fake.set_latency(Duration::from_millis(500));
    let accounts: String = (0..40)
        .map(|i| client_credentials_account(&format!("cc{i}")))
        .collect();
    let h = Harness::start(fake, clock, &accounts).await;
    h.advance(Duration::from_secs(10)).await;
    assert_eq!(
        h.fake.counts().client_credentials_grants,
        40,
        "every account got its token"
    );
    assert_eq!(
        h.fake.peak_unanswered(),
        tokend::config::DEFAULT_MAX_CONCURRENT_PER_HOST as u64,
        "40 accounts due at once reach the provider 16 at a time"
    );
}

#[tokio::test(start_paused = true)]
async fn a_paced_provider_host_sees_evenly_spaced_requests() {
    // A cold start of 30 accounts against a host limited to 10 requests a second: the
    // provider sees them over 3 s, never more than 10 (plus one) in any second.
    let (clock, fake) = manual_provider(Duration::from_secs(3600));
    let accounts: String = "[provider]\nmax_requests_per_second = 10\n".to_string()
        + &(0..30)
            .map(|i| client_credentials_account(&format!("cc{i}")))
            .collect::<String>();
    let h = Harness::start(fake, clock, &accounts).await;
    // Grants seen after each 100 ms of virtual time.
    let mut seen = vec![0u64];
    for _ in 0..40 {
        h.advance(Duration::from_millis(100)).await;
        seen.push(h.fake.counts().client_credentials_grants);
    }
    assert_eq!(
        seen[seen.len() - 1],
        30,
        "every account got its token: {seen:?}"
    );
    assert!(seen[10] <= 11, "no burst at the start: {seen:?}");
    let busiest = seen.windows(11).map(|w| w[10] - w[0]).max().unwrap();
    assert!(busiest <= 11, "at most 10 (+1) per second: {seen:?}");
    assert!(
        seen[29] < 30,
        "spaced 100 ms apart, the last start is near 2.9 s: {seen:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn per_host_limits_change_only_on_restart_and_a_reload_says_so() {
    let (clock, fake) = manual_provider(Duration::from_secs(3600));
    let mut h = Harness::start(fake, clock, &client_credentials_account("cc")).await;
    h.advance(Duration::from_secs(1)).await;
    let paced =
        "[provider]\nmax_requests_per_second = 5\n".to_string() + &client_credentials_account("cc");
    let new = config(&h.dir, &paced);
    let report = h.daemon.as_mut().unwrap().reload(new).await;
    assert_eq!(report.ignored, ["provider.max_requests_per_second"]);
    assert!(report.restarted.is_empty(), "accounts keep running");
    h.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn shutdown_abandons_refreshes_still_waiting_for_their_turn() {
    // One request a second, 30 accounts due: stopping after 2.5 s must not wait for the
    // other 27 turns, and no request is sent after the stop.
    let (clock, fake) = manual_provider(Duration::from_secs(3600));
    let accounts: String = "[provider]\nmax_requests_per_second = 1\n".to_string()
        + &(0..30)
            .map(|i| client_credentials_account(&format!("cc{i}")))
            .collect::<String>();
    let mut h = Harness::start(fake, clock, &accounts).await;
    h.advance(Duration::from_millis(2500)).await;
    let before = h.fake.counts().client_credentials_grants;
    assert_eq!(before, 3, "one request a second");
    tokio::time::timeout(Duration::from_secs(1), h.shutdown())
        .await
        .expect("shutdown does not wait for queued turns");
    assert_eq!(h.fake.counts().client_credentials_grants, before);
}

#[tokio::test(start_paused = true)]
async fn malformed_requests_get_json_errors() {
    let (h, _) = Harness::zywave(Duration::from_secs(3600)).await;
    h.advance(Duration::from_secs(1)).await;
    for uri in [
        "/v1/token/zy?min_valid=1&min_valid=2",
        "/v1/token/%FF",
        "/v1/token/%FF/access_token",
    ] {
        let (status, body) = h.get(uri).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{uri}");
        assert_eq!(body["error"], "invalid_request", "{uri}: {body}");
    }
}

#[tokio::test(start_paused = true)]
async fn accounts_started_together_spread_their_refreshes_over_the_period() {
    // 300 s tokens are normally refreshed 225–240 s after issue (75–80%; the 60 s margin
    // caps 80% at 240 s). All accounts get their first token at start, at once.
    const ACCOUNTS: usize = 30;
    const LATEST: u64 = 240;
    let (clock, fake) = manual_provider(Duration::from_secs(300));
    let accounts: String = (0..ACCOUNTS)
        .map(|i| client_credentials_account(&format!("cc{i}")))
        .collect();
    let h = Harness::start(fake, clock, &accounts).await;

    // Each account's refresh times (seconds since start), seen every second for three
    // lifetimes; every token served meanwhile is one the provider accepts.
    let mut refreshes: std::collections::BTreeMap<String, Vec<u64>> = Default::default();
    for second in 0..=900u64 {
        let (_, body) = h.get("/v1/accounts").await;
        for account in body["accounts"].as_array().unwrap() {
            let name = account["account"].as_str().unwrap().to_string();
            let Some(at) = account["last_refresh"].as_str() else {
                continue;
            };
            let at = humantime::parse_rfc3339(at).unwrap();
            let at = at.duration_since(epoch()).unwrap().as_secs();
            let seen = refreshes.entry(name).or_default();
            if seen.last() != Some(&at) {
                seen.push(at);
            }
        }
        if second % 5 == 0 {
            for i in 0..ACCOUNTS {
                let (status, body) = h.get(&format!("/v1/token/cc{i}")).await;
                assert_eq!(status, StatusCode::OK, "cc{i} at {second} s: {body}");
                assert!(
                    h.fake
                        .is_valid_access_token(body["access_token"].as_str().unwrap())
                );
                assert!(body["expires_in"].as_u64().unwrap() >= 1);
            }
        }
        h.advance(Duration::from_secs(1)).await;
    }

    assert_eq!(refreshes.len(), ACCOUNTS);
    for (name, times) in &refreshes {
        assert_eq!(times[0], 0, "{name}: first token at start");
        assert!(times.len() >= 4, "{name}: {times:?}");
        for pair in times.windows(2) {
            // Never later than the normal plan (1 s: the polling resolution).
            assert!(pair[1] - pair[0] <= LATEST + 1, "{name}: {times:?}");
        }
        // After the one spread refresh, planned refreshes keep the normal period.
        for pair in times[1..].windows(2) {
            assert!(pair[1] - pair[0] >= 225 - 1, "{name}: {times:?}");
        }
    }
    // The first refreshes after the shared start are spread over the period (7.5–240 s),
    // not bunched in the 15 s of the normal plan's jitter.
    let firsts: Vec<u64> = refreshes.values().map(|times| times[1]).collect();
    let span = firsts.iter().max().unwrap() - firsts.iter().min().unwrap();
    assert!(span > LATEST / 2, "{firsts:?}");
    let bunched = firsts
        .iter()
        .filter(|t| (225..=LATEST).contains(*t))
        .count();
    assert!(bunched < ACCOUNTS / 2, "{firsts:?}");
}
