//! No secret in any log line: the real binary at trace level (its HTTP client included)
//! through several refresh cycles, its whole stderr searched for every secret involved.

use std::time::Duration;

use tokend::clock::Clock;
use tokend::demo::fake_provider::{ClientSpec, FakeProvider};

use crate::support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_secret_reaches_the_logs_at_trace_level() {
    let fake = FakeProvider::new(Duration::from_secs(2), Clock::system());
    let client_secret = "cs-Very-Secret-Value-9f2c";
    fake.register(ClientSpec::zywave("zy-client", client_secret));
    fake.register(ClientSpec::zephr("zephr-client", client_secret));
    let (provider, _stop) = serve_fake(&fake).await;
    let url = token_url(provider);
    let seed_a = fake.grant_refresh_token("zy-client", None);
    let seed_b = fake.grant_refresh_token("zephr-client", None);

    let setup = Setup::new();
    setup.write_config(&[
        FAST_REFRESH.to_string(),
        refresh_token_account(
            "a",
            &url,
            "zy-client",
            client_secret,
            &seed_a,
            "headers = { Profile = \"B 1234\" }\n",
        ),
        refresh_token_account(
            "b",
            &url,
            "zephr-client",
            client_secret,
            &seed_b,
            "client_auth = \"client_secret_basic\"\nrequest_format = \"json\"\n",
        ),
    ]);
    let client = http_client();
    let mut daemon = setup.start_with(|c| {
        c.env("RUST_LOG", "trace");
    });
    daemon.wait_ready(&client).await;

    // Serve tokens (reads are logged too) until each account has rotated a few times.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while fake.counts().refresh_grants < 8 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "too few refreshes: {:?}",
            fake.counts()
        );
        for account in ["a", "b"] {
            daemon.token(&client, account).await;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(daemon.stop().await.code(), Some(0));

    let text = daemon.log();
    assert!(text.contains("refreshed"), "the refreshes were logged");
    assert!(text.lines().count() > 50, "trace logging was on");
    let basic = base64::Engine::encode(
        &base64::engine::general_purpose::STANDARD,
        format!("zephr-client:{client_secret}"),
    );
    let mut secrets = fake.minted();
    secrets.extend([client_secret.to_string(), basic]);
    assert!(secrets.len() > 16);
    for secret in &secrets {
        if let Some(line) = text.lines().find(|l| l.contains(secret.as_str())) {
            panic!("a secret reached the log: {line}");
        }
    }
}
