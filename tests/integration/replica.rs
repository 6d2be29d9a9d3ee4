//! Replicas in one process sharing a real PostgreSQL, against the strict fake provider:
//! only the lease holder calls the provider, the followers serve its commits at once,
//! a follower's `min_valid` is answered by the holder's refresh, and a store outage
//! leaves valid tokens served, accounts degraded and the provider alone.

use std::path::Path;
use std::time::{Duration, Instant};

use axum::body::Body;
use http::{Method, StatusCode};
use serde_json::Value;
use tokend::app::Daemon;
use tokend::clock::Clock;
use tokend::config::{Config, SystemEnvironment};
use tokend::demo::fake_provider::{ClientSpec, FakeProvider};
use tokend::provider::{Provider, Transport};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::support::config::{TOKEN_URL, refresh_token_account};
use crate::support::daemon::{MARK, call, request};
use crate::support::postgres::Postgres;

const ACCOUNTS: usize = 3;

struct Replica {
    daemon: Option<Daemon>,
    api: tokend::http::Api,
}

struct Replicas {
    pg: Postgres,
    fake: FakeProvider,
    replicas: Vec<Replica>,
    stop: CancellationToken,
    tasks: TaskTracker,
}

impl Replicas {
    /// Two replicas, `ACCOUNTS` accounts of `lifetime` tokens, leases of 3 s.
    async fn start(lifetime: Duration) -> Replicas {
        let pg = Postgres::start();
        let fake = FakeProvider::new(lifetime, Clock::system());
        fake.register(ClientSpec::zywave("zy-client", "zy-secret"));
        let accounts: String = (0..ACCOUNTS)
            .map(|i| {
                let seed = fake.grant_refresh_token("zy-client", None);
                refresh_token_account(
                    &format!("a{i}"),
                    TOKEN_URL,
                    "zy-client",
                    "zy-secret",
                    &seed,
                    "",
                )
            })
            .collect();
        let stop = CancellationToken::new();
        let tasks = TaskTracker::new();
        let mut replicas = Vec::new();
        for node in ["one", "two"] {
            let text = format!(
                "[state]\nbackend = \"postgres\"\nurl = \"{}\"\nlease_ttl = \"3s\"\nnode_id = \"{node}\"\n[refresh]\nmin_interval = \"1s\"\n{accounts}",
                pg.url()
            );
            let config =
                Config::from_str_at(&text, Path::new("replica.toml"), &SystemEnvironment).unwrap();
            let store = tokend::store::open(&config.state, &stop, &tasks)
                .await
                .unwrap();
            let provider = Provider::new(Transport::InProcess(fake.router()));
            let daemon = Daemon::start(config, store, provider, Clock::system()).await;
            let api = daemon.api();
            replicas.push(Replica {
                daemon: Some(daemon),
                api,
            });
        }
        Replicas {
            pg,
            fake,
            replicas,
            stop,
            tasks,
        }
    }

    async fn accounts(&self, r: usize) -> Value {
        let (status, _, body) = call(
            &self.replicas[r].api,
            request(Method::GET, "/v1/accounts", &[], Body::empty()),
        )
        .await;
        assert_eq!(status, StatusCode::OK);
        serde_json::from_slice(&body).unwrap()
    }

    async fn account(&self, r: usize, name: &str) -> Value {
        let all = self.accounts(r).await;
        all["accounts"]
            .as_array()
            .unwrap()
            .iter()
            .find(|a| a["account"] == name)
            .cloned()
            .unwrap()
    }

    /// `(status, body)` of GET `uri` on replica `r`.
    async fn get(&self, r: usize, uri: &str) -> (StatusCode, Value) {
        let (status, _, body) = call(
            &self.replicas[r].api,
            request(Method::GET, uri, &[MARK], Body::empty()),
        )
        .await;
        (status, serde_json::from_slice(&body).unwrap_or(Value::Null))
    }

    async fn token(&self, r: usize, account: &str) -> Option<String> {
        match self.get(r, &format!("/v1/token/{account}")).await {
            (StatusCode::OK, body) => body["access_token"].as_str().map(str::to_string),
            _ => None,
        }
    }

    /// Polls until `check` holds, at most `within`.
    async fn until<F: AsyncFnMut(&Replicas) -> bool>(
        &self,
        within: Duration,
        what: &str,
        mut check: F,
    ) {
        let deadline = Instant::now() + within;
        while !check(self).await {
            if Instant::now() >= deadline {
                panic!(
                    "{what} within {within:?}; the replicas say:\n{}\n{}",
                    self.accounts(0).await,
                    self.accounts(1).await
                );
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Which replica holds `account`, once one does.
    async fn holder(&self, account: &str) -> usize {
        let mut found = None;
        self.until(
            Duration::from_secs(15),
            "a replica holds the account",
            async |rs: &Replicas| {
                let holder = rs.account(0, account).await["lease_holder"].clone();
                found = match holder.as_str() {
                    Some("one") => Some(0),
                    Some("two") => Some(1),
                    _ => None,
                };
                found.is_some()
            },
        )
        .await;
        found.unwrap()
    }

    async fn everyone_serves_the_same_tokens(&self) {
        self.until(
            Duration::from_secs(15),
            "both replicas serve the same token for every account",
            async |rs: &Replicas| {
                for i in 0..ACCOUNTS {
                    let a = format!("a{i}");
                    let (one, two) = (rs.token(0, &a).await, rs.token(1, &a).await);
                    if one.is_none() || one != two {
                        return false;
                    }
                }
                true
            },
        )
        .await;
    }

    fn assert_no_fork(&self) {
        let counts = self.fake.counts();
        assert_eq!(counts.reuse_detected, 0, "{counts:?}");
        assert_eq!(counts.forks, 0, "{counts:?}");
        assert_eq!(
            self.fake.live_refresh_tokens("zy-client"),
            ACCOUNTS,
            "one live chain per account"
        );
    }

    async fn stop(mut self) {
        for r in &mut self.replicas {
            if let Some(d) = r.daemon.take() {
                d.shutdown().await;
            }
        }
        self.stop.cancel();
        self.tasks.close();
        self.tasks.wait().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_holder_refreshes_and_the_follower_serves_its_commit_at_once() {
    let rs = Replicas::start(Duration::from_secs(3600)).await;
    rs.everyone_serves_the_same_tokens().await;
    // Each seed was presented once, by its account's holder: never by both.
    assert_eq!(rs.fake.counts().refresh_grants, ACCOUNTS as u64);
    for i in 0..ACCOUNTS {
        let account = format!("a{i}");
        let holder = rs.holder(&account).await;
        let follower = 1 - holder;
        tokio::time::sleep(Duration::from_millis(1100)).await; // past min_interval
        let (status, _, body) = call(
            &rs.replicas[holder].api,
            request(
                Method::POST,
                &format!("/v1/accounts/{account}/refresh"),
                &[MARK],
                Body::empty(),
            ),
        )
        .await;
        assert_eq!(status, StatusCode::OK, "{}", String::from_utf8_lossy(&body));
        // The holder serves a token only once it is committed.
        let committed = Instant::now();
        let fresh = rs.token(holder, &account).await.unwrap();
        assert!(rs.fake.is_valid_access_token(&fresh));
        rs.until(
            Duration::from_secs(2),
            "the follower serves the holder's new token",
            async |rs: &Replicas| {
                rs.token(follower, &account).await.as_deref() == Some(fresh.as_str())
            },
        )
        .await;
        eprintln!(
            "{account}: the follower served the new token {:?} after the holder's commit",
            committed.elapsed()
        );
    }
    assert_eq!(
        rs.fake.counts().refresh_grants,
        2 * ACCOUNTS as u64,
        "one call per refresh, by the holder alone"
    );
    rs.assert_no_fork();
    rs.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_followers_min_valid_is_met_by_the_holders_refresh() {
    let rs = Replicas::start(Duration::from_secs(60)).await;
    rs.everyone_serves_the_same_tokens().await;
    let holder = rs.holder("a0").await;
    let follower = 1 - holder;
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let before = rs.fake.counts().refresh_grants;
    // The committed token has under 58 s left: the follower asks the holder for one.
    let (status, body) = rs.get(follower, "/v1/token/a0?min_valid=58").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(body["expires_in"].as_u64().unwrap() >= 58, "{body}");
    assert_eq!(
        rs.fake.counts().refresh_grants,
        before + 1,
        "one refresh, by the holder"
    );
    // The holder publishes what it committed a moment after the follower may read it.
    let fresh = body["access_token"].as_str().unwrap().to_string();
    rs.until(
        Duration::from_secs(2),
        "the holder serves the token it committed",
        async |rs: &Replicas| rs.token(holder, "a0").await.as_deref() == Some(fresh.as_str()),
    )
    .await;
    rs.assert_no_fork();
    rs.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_outage_keeps_tokens_served_and_calls_nothing() {
    let mut rs = Replicas::start(Duration::from_secs(3600)).await;
    rs.everyone_serves_the_same_tokens().await;
    let before = rs.fake.counts().refresh_grants;
    let tokens: Vec<Option<String>> = vec![rs.token(0, "a0").await, rs.token(1, "a0").await];
    rs.pg.stop();
    rs.until(
        Duration::from_secs(15),
        "both replicas show their accounts degraded",
        async |rs: &Replicas| {
            rs.account(0, "a0").await["state"] == "degraded"
                && rs.account(1, "a0").await["state"] == "degraded"
        },
    )
    .await;
    // Still served, unchanged, by both; nothing was asked of the provider.
    assert_eq!(
        vec![rs.token(0, "a0").await, rs.token(1, "a0").await],
        tokens
    );
    let (_, _, metrics) = call(
        &rs.replicas[0].api,
        request(Method::GET, "/metrics", &[], Body::empty()),
    )
    .await;
    assert!(String::from_utf8_lossy(&metrics).contains("tokend_store_up 0"));
    assert_eq!(rs.fake.counts().refresh_grants, before);
    rs.pg.start_again();
    rs.until(
        Duration::from_secs(20),
        "the replicas recover by themselves",
        async |rs: &Replicas| {
            rs.account(0, "a0").await["state"] == "ok"
                && rs.account(1, "a0").await["state"] == "ok"
                && rs.account(0, "a0").await["lease_holder"].is_string()
        },
    )
    .await;
    let (_, _, metrics) = call(
        &rs.replicas[0].api,
        request(Method::GET, "/metrics", &[], Body::empty()),
    )
    .await;
    assert!(String::from_utf8_lossy(&metrics).contains("tokend_store_up 1"));
    rs.assert_no_fork();
    rs.stop().await;
}
