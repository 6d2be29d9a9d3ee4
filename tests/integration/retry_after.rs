//! A provider's `Retry-After` binds every way of asking for a token: an operator's forced
//! refresh and a reader's `min_valid` demand get a `503` that says when to ask again, and
//! the provider sees no call before it.

use std::time::Duration;

use axum::body::Body;
use http::{Method, StatusCode};
use serde_json::Value;
use tokend::clock::Clock;
use tokend::demo::fake_provider::Fault;

use crate::support::*;

const S: fn(u64) -> Duration = Duration::from_secs;

/// `POST /v1/accounts/zy/refresh`: status, `Retry-After` (seconds) and body.
async fn force(h: &Harness) -> (StatusCode, Option<u64>, Value) {
    let req = request(
        Method::POST,
        "/v1/accounts/zy/refresh",
        &[MARK],
        Body::empty(),
    );
    let (status, headers, body) = call(&h.api, req).await;
    let retry_after = headers
        .get(http::header::RETRY_AFTER)
        .map(|v| v.to_str().unwrap().parse().unwrap());
    (status, retry_after, serde_json::from_slice(&body).unwrap())
}

/// Account `zy` (300 s tokens), 20 s after its first token.
async fn started() -> Harness {
    let clock = Clock::manual(epoch());
    let fake = provider(&clock, S(300));
    let seed = fake.grant_refresh_token("zy-client", None);
    let h = Harness::start(fake, clock, &zywave_account("zy", &seed)).await;
    h.advance(S(20)).await;
    h
}

/// No reuse, no fork, one live chain, and it is the stored one.
fn family_intact(h: &Harness) {
    let counts = h.fake.counts();
    assert_eq!(counts.reuse_detected, 0, "{counts:?}");
    assert_eq!(counts.forks, 0, "{counts:?}");
    assert_eq!(h.fake.live_refresh_tokens("zy-client"), 1, "{counts:?}");
    let stored = h.state_file("zy");
    assert!(
        h.fake
            .is_live_refresh_token(stored["refresh_token"].as_str().unwrap())
    );
}

#[tokio::test(start_paused = true)]
async fn a_forced_refresh_and_a_demand_wait_for_the_providers_retry_after() {
    let h = started().await;
    let before = h.token("zy").await;

    // The forced refresh reaches the provider, which asks for two minutes' peace.
    h.fake.push_faults([Fault::RetryAfter(503, "120".into())]);
    let (status, retry_after, body) = force(&h).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert_eq!(retry_after, Some(120), "{body}");
    let calls = h.fake.counts().token_requests;

    // Forced again, 30 s later: no call; the answer says why and when.
    h.advance(S(30)).await;
    let (status, retry_after, body) = force(&h).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert_eq!(retry_after, Some(90), "{body}");
    let description = body["error_description"].as_str().unwrap();
    assert!(description.contains("Retry-After"), "{description}");
    assert!(description.contains("1m 30s"), "{description}");
    assert_eq!(
        h.fake.counts().token_requests,
        calls,
        "called before Retry-After"
    );

    // A reader who needs a longer-lived token than the one served: the same.
    let (status, body) = h.get("/v1/token/zy?min_valid=280").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert_eq!(
        h.fake.counts().token_requests,
        calls,
        "called before Retry-After"
    );
    // The token in hand is still served.
    assert_eq!(h.token("zy").await, before);

    // Right after it has passed, the daemon's own retry goes through.
    h.advance(S(89)).await;
    assert_eq!(
        h.fake.counts().token_requests,
        calls,
        "called before Retry-After"
    );
    h.advance(S(2)).await;
    assert_eq!(h.fake.counts().token_requests, calls + 1);
    let after = h.token("zy").await;
    assert_ne!(after, before);
    assert!(h.fake.is_valid_access_token(&after));
    family_intact(&h);
}

#[tokio::test(start_paused = true)]
async fn a_refusal_for_min_interval_says_when_to_ask_again() {
    let h = started().await;
    let (status, _, body) = force(&h).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    h.advance(S(2)).await;
    // The harness sets refresh.min_interval to 5 s.
    let (status, retry_after, body) = force(&h).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert_eq!(retry_after, Some(3), "{body}");
    family_intact(&h);
}
