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

/// A token endpoint on 127.0.0.1 that answers every request with `answer(request)`.
async fn scripted_provider(answer: fn(&[u8]) -> Vec<u8>) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut request = vec![0u8; 16 * 1024];
                let n = socket.read(&mut request).await.unwrap_or(0);
                let _ = socket.write_all(&answer(&request[..n])).await;
                let _ = socket.shutdown().await;
            });
        }
    });
    format!("http://{addr}/token")
}

/// New tokens a rotating provider put in an answer that was cut off on the way.
const NEW_ACCESS: &str = "at-NEW-c0ffee-1234";
const NEW_REFRESH: &str = "rt-NEW-c0ffee-5678";

fn truncated_success(_request: &[u8]) -> Vec<u8> {
    let body = format!(
        r#"{{"access_token":"{NEW_ACCESS}","token_type":"Bearer","refresh_token":"{NEW_REFRESH}","expires_in":36"#
    );
    format!(
        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// A gateway's error page that echoes the whole request (credentials and all) back.
fn echoing_error_page(request: &[u8]) -> Vec<u8> {
    let body = format!(
        "<html><pre>{}</pre></html>",
        String::from_utf8_lossy(request)
    );
    format!(
        "HTTP/1.1 500 Internal Server Error\r\ncontent-type: text/html\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// A malformed answer is described, never quoted: neither the tokens in a truncated 200
/// nor the request an error page echoes reach the log or `/v1/accounts`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_malformed_answer_reaches_the_log_or_the_api() {
    let truncating = scripted_provider(truncated_success).await;
    let echoing = scripted_provider(echoing_error_page).await;
    let (seed_a, seed_b) = ("rt-seed-A-0f1e2d3c", "rt-seed-B-4b5a6978");
    let client_secret = "cs-echoed-back-77aa";
    let setup = Setup::new();
    setup.write_config(&[
        refresh_token_account("a", &truncating, "c", client_secret, seed_a, ""),
        refresh_token_account("b", &echoing, "c", client_secret, seed_b, ""),
    ]);
    let client = http_client();
    let daemon = setup.start_with(|c| {
        c.env("RUST_LOG", "trace");
    });

    // Both accounts have failed at least once when each shows a last_error.
    let deadline = tokio::time::Instant::now() + READY_TIMEOUT;
    let (body, json) = loop {
        if let Ok(r) = client.get(daemon.url("/v1/accounts")).send().await
            && let Ok(body) = r.text().await
            && let Ok(json) = serde_json::from_str::<serde_json::Value>(&body)
            && json["accounts"]
                .as_array()
                .is_some_and(|a| a.len() == 2 && a.iter().all(|a| a["last_error"].is_string()))
        {
            break (body, json);
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no last_error for both accounts; log:\n{}",
            daemon.log()
        );
        tokio::time::sleep(POLL).await;
    };
    let mut daemon = daemon;
    assert_eq!(daemon.stop().await.code(), Some(0));

    let error = |name: &str| {
        json["accounts"]
            .as_array()
            .unwrap()
            .iter()
            .find(|a| a["account"] == name)
            .unwrap()["last_error"]
            .as_str()
            .unwrap()
            .to_string()
    };
    // What is said instead: the kind of answer, its size, where its JSON breaks.
    let (a, b) = (error("a"), error("b"));
    assert!(
        a.contains("application/json") && a.contains("ends early, at line 1 column"),
        "{a}"
    );
    assert!(a.contains("bytes"), "{a}");
    assert!(
        b.contains("HTTP 500 (text/html,") && b.contains("bytes)"),
        "{b}"
    );

    let log = daemon.log();
    let basic = base64::Engine::encode(
        &base64::engine::general_purpose::STANDARD,
        format!("c:{client_secret}"),
    );
    for secret in [
        NEW_ACCESS,
        NEW_REFRESH,
        seed_a,
        seed_b,
        client_secret,
        &basic,
    ] {
        assert!(!body.contains(secret), "{secret} in /v1/accounts: {body}");
        if let Some(line) = log.lines().find(|l| l.contains(secret)) {
            panic!("{secret} reached the log: {line}");
        }
    }
    assert!(log.contains("ends early"), "the failure was logged:\n{log}");
}
