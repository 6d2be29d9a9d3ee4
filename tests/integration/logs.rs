//! No secret in any log line: the real binary at trace level (its HTTP client included)
//! through several refresh cycles, its whole stderr searched for every secret involved.

use std::time::Duration;

use tokend::clock::Clock;
use tokend::fake_provider::{ClientSpec, FakeProvider};

use crate::process::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_secret_reaches_the_logs_at_trace_level() {
    let fake = FakeProvider::new(Duration::from_secs(2), Clock::system());
    let client_secret = "cs-Very-Secret-Value-9f2c";
    fake.register(ClientSpec::zywave("zy-client", client_secret));
    fake.register(ClientSpec::zephr("zephr-client", client_secret));
    let (provider, _stop) = serve_fake(&fake).await;
    let seed_a = fake.grant_refresh_token("zy-client", None);
    let seed_b = fake.grant_refresh_token("zephr-client", None);

    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let endpoint = format!("http://127.0.0.1:{port}");
    let config = format!(
        r#"[server]
listen = ["127.0.0.1:{port}"]
[state]
dir = "{state}"
[refresh]
min_interval = "1s"
[accounts.a]
grant = "refresh_token"
token_url = "http://{provider}/token"
client_id = "zy-client"
client_secret = "{client_secret}"
refresh_token = "{seed_a}"
headers = {{ Profile = "B 1234" }}
[accounts.b]
grant = "refresh_token"
token_url = "http://{provider}/token"
client_id = "zephr-client"
client_secret = "{client_secret}"
client_auth = "client_secret_basic"
request_format = "json"
refresh_token = "{seed_b}"
"#,
        state = dir.path().join("state").display()
    );
    let config_path = dir.path().join("tokend.toml");
    std::fs::write(&config_path, config).unwrap();
    let log = dir.path().join("tokend.log");
    let mut daemon = Proc::run(&config_path, &log, "trace");
    wait_ready(&mut daemon, &endpoint, Duration::from_secs(15)).await;

    // Serve tokens (reads are logged too) until each account has rotated a few times.
    let client = reqwest::Client::builder().no_proxy().build().unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while fake.counts().refresh_grants < 8 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "too few refreshes: {:?}",
            fake.counts()
        );
        for account in ["a", "b"] {
            let r = client
                .get(format!("{endpoint}/v1/token/{account}"))
                .header("Tokend-Request", "1")
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 200);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    daemon.signal("-TERM");
    assert_eq!(daemon.wait_exit(Duration::from_secs(10)).await, Some(0));

    let text = daemon.log_text();
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
