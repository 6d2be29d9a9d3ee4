//! Stopping while a provider hangs: a stop waits a bounded grace for a token request in
//! flight (an answer within it is saved), then abandons it with its in-flight mark on
//! disk; the next start recovers as after a crash. A second SIGINT exits at once.

use std::time::Duration;

use tokend::clock::Clock;
use tokend::demo::fake_provider::{FakeProvider, Fault};
use tokend::refresher::STOP_GRACE;

use crate::support::*;

const S: fn(u64) -> Duration = Duration::from_secs;

/// The provider has seen no reuse and no fork, and `zy-client`'s family is alive.
fn family_intact(fake: &FakeProvider) {
    let counts = fake.counts();
    assert_eq!(counts.reuse_detected, 0, "{counts:?}");
    assert_eq!(counts.forks, 0, "{counts:?}");
    assert_eq!(fake.live_refresh_tokens("zy-client"), 1, "{counts:?}");
}

#[tokio::test(start_paused = true)]
async fn a_stop_abandons_a_hung_request_after_the_grace_and_the_next_start_recovers() {
    let clock = Clock::manual(epoch());
    let fake = provider(&clock, S(3600));
    let seed = fake.grant_refresh_token("zy-client", None);
    // Far longer than the grace, and than the 30 s request timeout.
    fake.push_faults([Fault::Hang(S(60))]);
    let accounts = zywave_account("zy", &seed);
    let h = Harness::start(fake, clock, &accounts).await;
    h.advance(S(1)).await;
    assert_eq!(h.fake.counts().token_requests, 1);
    let marked = h.state_file("zy");
    assert!(marked["refresh_in_flight_since"].is_u64(), "{marked}");

    let asked = tokio::time::Instant::now();
    let (fake, clock, dir) = h.stop().await;
    let took = asked.elapsed();
    assert!(
        took <= STOP_GRACE + S(1),
        "the stop waited {took:?} for a hung provider"
    );
    // The request may have rotated the token at the provider: the mark says so.
    let file: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.path().join("zy.json")).unwrap()).unwrap();
    assert_eq!(
        file["refresh_in_flight_since"], marked["refresh_in_flight_since"],
        "{file}"
    );
    assert_eq!(fake.counts().issued, 0);

    // The next start retries at once with the stored refresh token.
    let h = Harness::builder(fake, clock, dir).accounts(&accounts).await;
    h.advance(Duration::from_millis(10)).await;
    let token = h.token("zy").await;
    assert!(h.fake.is_valid_access_token(&token));
    let file = h.state_file("zy");
    assert!(file.get("refresh_in_flight_since").is_none(), "{file}");
    assert!(
        h.fake
            .is_live_refresh_token(file["refresh_token"].as_str().unwrap())
    );
    family_intact(&h.fake);
}

#[tokio::test(start_paused = true)]
async fn an_answer_within_the_grace_is_still_saved() {
    let clock = Clock::manual(epoch());
    let fake = provider(&clock, S(3600));
    let seed = fake.grant_refresh_token("zy-client", None);
    // The stop comes 1 s into the call, the answer 1 s before the grace ends.
    fake.push_faults([Fault::Hang(STOP_GRACE)]);
    let h = Harness::start(fake, clock, &zywave_account("zy", &seed)).await;
    h.advance(S(1)).await;
    let (fake, _clock, dir) = h.stop().await;
    let file: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.path().join("zy.json")).unwrap()).unwrap();
    assert!(file.get("refresh_in_flight_since").is_none(), "{file}");
    assert!(fake.is_live_refresh_token(file["refresh_token"].as_str().unwrap()));
    assert!(file["access"]["token"].is_string());
    family_intact(&fake);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_sigint_exits_at_once_with_130() {
    let (fake, url, seed) = start_provider_with_clients().await;
    fake.push_faults([Fault::Hang(S(60))]);
    let setup = Setup::new();
    setup.write_config(&[zy_account("zy", &url, &seed)]);
    let mut daemon = setup.start();
    let deadline = std::time::Instant::now() + READY_TIMEOUT;
    while fake.counts().token_requests == 0 {
        assert!(std::time::Instant::now() < deadline, "{}", daemon.log());
        tokio::time::sleep(POLL).await;
    }

    daemon.signal("INT");
    daemon.wait_log("stopping:").await;
    let second = std::time::Instant::now();
    daemon.signal("INT");
    let status = daemon.wait_exit(EXIT_TIMEOUT).await;
    let took = second.elapsed();
    assert_eq!(status.code(), Some(130), "log:\n{}", daemon.log());
    assert!(
        took < STOP_GRACE - S(2),
        "exited {took:?} after the second SIGINT; log:\n{}",
        daemon.log()
    );
    let log = daemon.log();
    assert!(log.contains("second stop signal"), "{log}");
    assert!(log.contains("stopped at once by a second SIGINT"), "{log}");
    let state = setup.state("zy");
    assert!(state["refresh_in_flight_since"].is_u64(), "{state}");
    assert_eq!(fake.counts().issued, 0);
    let counts = fake.counts();
    assert_eq!(counts.reuse_detected, 0, "{counts:?}");
    assert_eq!(counts.forks, 0, "{counts:?}");
    assert!(fake.is_live_refresh_token(&seed));
}
