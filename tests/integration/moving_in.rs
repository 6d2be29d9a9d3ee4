//! Moving in and operating a shared store with the real binary: a file-backed daemon's
//! state goes into PostgreSQL with `tokend state copy` and replicas go on from it without
//! presenting a spent token; `tokend import` and `tokend logout` against the shared store
//! reach whichever replica holds the account.

use std::process::{Output, Stdio};
use std::time::Duration;

use serde_json::Value;

use crate::support::postgres::Postgres;
use crate::support::*;

const LIMIT: Duration = Duration::from_secs(30);

async fn cli(config: &std::path::Path, args: &[&str], stdin: Option<&str>) -> Output {
    let mut cmd = tokend();
    cmd.args(args).arg("--config").arg(config);
    if let Some(text) = stdin {
        let path = config.with_extension("stdin");
        std::fs::write(&path, text).unwrap();
        cmd.stdin(Stdio::from(std::fs::File::open(&path).unwrap()));
    }
    run_cmd(&mut cmd, LIMIT).await
}

/// `account`'s entry in `/v1/accounts` once `check` holds for it (bounded).
async fn wait_for(daemon: &Daemon, account: &str, check: impl Fn(&Value) -> bool) -> Value {
    let client = http_client();
    let deadline = tokio::time::Instant::now() + LIMIT;
    loop {
        let (_, all) = daemon.accounts(&client).await;
        let entry = all["accounts"]
            .as_array()
            .and_then(|l| l.iter().find(|a| a["account"] == account))
            .cloned()
            .unwrap_or(Value::Null);
        if check(&entry) {
            return entry;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{account} never got there: {entry}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_state_directory_moves_into_postgres_and_replicas_operate_on_it() {
    let World { fake, seed, setup } = zy_and_svc_world(None, FAST_REFRESH).await;
    let client = http_client();
    let url = {
        let text = std::fs::read_to_string(setup.config_path()).unwrap();
        let start = text.find("token_url = \"").unwrap() + "token_url = \"".len();
        text[start..start + text[start..].find('"').unwrap()].to_string()
    };

    // A file-backed daemon rotated the seed away, then stopped.
    let mut single = setup.start_ready(&client).await;
    let before = access_token(&single.token(&client, "zy").await);
    assert_eq!(single.stop().await.code(), Some(0));

    // Into PostgreSQL: nothing is presented to the provider.
    let pg = Postgres::start();
    let shared = Setup::new();
    let mut sections = vec![format!(
        "backend = \"postgres\"\nurl = \"{}\"\nlease_ttl = \"3s\"\n",
        pg.url()
    )];
    sections.extend(zy_and_svc(&url, &seed));
    sections.push(FAST_REFRESH.into());
    shared.write_config(&sections);
    let requests = fake.counts().token_requests;
    let mut copy = tokend();
    copy.args(["state", "copy", "--from"])
        .arg(format!("file:{}", setup.state_dir().display()))
        .arg("--to-config")
        .arg(shared.config_path());
    let f = expect_code(&run_cmd(&mut copy, LIMIT).await, 0);
    assert!(
        f.stdout.contains("nothing was sent to any provider"),
        "{}",
        f.stdout
    );
    assert_eq!(fake.counts().token_requests, requests);

    // A replica on it serves the copied token at once, then refreshes the copied chain.
    let mut replica = shared.start_ready(&client).await;
    assert_eq!(access_token(&replica.token(&client, "zy").await), before);
    wait_for(&replica, "zy", |a| a["lease_holder"].is_string()).await;
    tokio::time::sleep(Duration::from_millis(1100)).await; // past min_interval
    let r = client
        .post(replica.url("/v1/accounts/zy/refresh"))
        .header("Tokend-Request", "1")
        .send()
        .await
        .unwrap();
    assert_eq!(
        r.status(),
        reqwest::StatusCode::OK,
        "{}",
        r.text().await.unwrap()
    );
    let counts = fake.counts();
    assert_eq!((counts.reuse_detected, counts.forks), (0, 0), "{counts:?}");
    assert_eq!(fake.live_refresh_tokens("zy-client"), 1);

    // tokend import against the shared store: the holder takes the new chain.
    let fresh = fake.grant_refresh_token("zy-client", Some("offline_access api:read"));
    let f = expect_code(
        &cli(&shared.config_path(), &["import", "zy"], Some(&fresh)).await,
        0,
    );
    assert!(
        f.stdout.contains("the replica holding the account took it"),
        "{}",
        f.stdout
    );
    wait_for(&replica, "zy", |a| a["state"] == "ok").await;
    assert!(!fake.is_live_refresh_token(&fresh), "tried once: rotated");
    let counts = fake.counts();
    assert_eq!((counts.reuse_detected, counts.forks), (0, 0), "{counts:?}");

    // tokend logout against the shared store: revoked, and the holder drops the chain.
    let f = expect_code(
        &cli(&shared.config_path(), &["logout", "zy"], None).await,
        0,
    );
    assert!(
        f.stdout.contains("the replica holding the account took it"),
        "{}",
        f.stdout
    );
    wait_for(&replica, "zy", |a| a["state"] == "needs_reauth").await;
    assert_eq!(replica.stop().await.code(), Some(0));
}
