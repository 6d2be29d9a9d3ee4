//! Several real replicas (the binary) sharing their accounts through PostgreSQL or etcd,
//! against the strict fake provider (no reuse grace: a rotated-out refresh token coming
//! back revokes its family; forks counted). Lease holders are SIGKILLed in a loop, one is
//! frozen with SIGSTOP past its lease and resumed, and readers poll every replica all
//! along. Afterwards: no fork, no revoked family, exactly one live refresh token per
//! account, and no replica ever served an expired token. Bounded in count and time.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use serde_json::Value;
use tokend::clock::Clock;
use tokend::demo::fake_provider::{ClientSpec, FakeProvider};

use crate::support::etcd::EtcdCluster;
use crate::support::postgres::Postgres;
use crate::support::*;

const ACCOUNTS: usize = 3;
const REPLICAS: usize = 3;
const KILLS: usize = 4;
/// Tokens live 5 s and leases 4 s: every account refreshes several times a run, and a
/// dead holder's accounts move within ~5 s.
const LIFETIME: Duration = Duration::from_secs(5);
const LEASE_TTL: &str = "4s";

struct Cluster {
    fake: FakeProvider,
    setups: Vec<Setup>,
    daemons: Vec<Option<Daemon>>,
    client: reqwest::Client,
}

impl Cluster {
    /// `REPLICAS` replicas whose `[state]` is `store` (the keys after `[state]`).
    async fn start(store: &str) -> Cluster {
        let fake = FakeProvider::new(LIFETIME, Clock::system());
        fake.register(ClientSpec::zywave("zy-client", "zy-secret"));
        let (provider, stop) = serve_fake(&fake).await;
        // The provider lives as long as the test's runtime.
        std::mem::forget(stop);
        let url = token_url(provider);
        let seeds: Vec<String> = (0..ACCOUNTS)
            .map(|_| fake.grant_refresh_token("zy-client", None))
            .collect();
        let client = http_client();
        let mut setups = Vec::new();
        let mut daemons = Vec::new();
        for r in 0..REPLICAS {
            let setup = Setup::new();
            let mut sections = vec![
                format!("{store}lease_ttl = \"{LEASE_TTL}\"\nnode_id = \"replica-{r}\"\n"),
                FAST_REFRESH.to_string(),
            ];
            for (i, seed) in seeds.iter().enumerate() {
                sections.push(refresh_token_account(
                    &format!("a{i}"),
                    &url,
                    "zy-client",
                    "zy-secret",
                    seed,
                    "",
                ));
            }
            setup.write_config(&sections);
            daemons.push(Some(setup.start_ready(&client).await));
            setups.push(setup);
        }
        Cluster {
            fake,
            setups,
            daemons,
            client,
        }
    }

    fn daemon(&self, r: usize) -> &Daemon {
        self.daemons[r].as_ref().expect("replica running")
    }

    /// The replica holding `account`'s lease, as the replicas say (bounded wait).
    async fn holder(&self, account: &str) -> usize {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            for r in 0..REPLICAS {
                let Some(d) = &self.daemons[r] else { continue };
                let (_, body) = d.accounts(&self.client).await;
                let holder = body["accounts"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .find(|a| a["account"] == account)
                    .and_then(|a| a["lease_holder"].as_str().map(str::to_string));
                if let Some(h) = holder
                    && let Some(idx) = h.strip_prefix("replica-").and_then(|i| i.parse().ok())
                    && self.daemons.get(idx).is_some_and(Option::is_some)
                {
                    return idx;
                }
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "no replica holds {account} within 20 s"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// Polls every replica for every account until `stop`, failing the test on any expired
/// token; counts the tokens read.
fn readers(
    cluster: &Cluster,
    stop: Arc<AtomicBool>,
    read: Arc<AtomicU64>,
) -> tokio::task::JoinHandle<()> {
    let bases: Vec<String> = cluster.setups.iter().map(Setup::base).collect();
    let client = cluster.client.clone();
    tokio::spawn(async move {
        while !stop.load(Ordering::Relaxed) {
            for base in &bases {
                for i in 0..ACCOUNTS {
                    let url = format!("{base}/v1/token/a{i}");
                    let Ok(r) = client
                        .get(&url)
                        .header("Tokend-Request", "test")
                        .send()
                        .await
                    else {
                        continue; // that replica is down right now
                    };
                    if r.status() != reqwest::StatusCode::OK {
                        continue; // 503 while starting: allowed; an expired token is not
                    }
                    let body: Value = r.json().await.unwrap();
                    let expires = body["expires_at"].as_str().unwrap();
                    let expires = humantime::parse_rfc3339(expires).unwrap();
                    assert!(
                        expires > SystemTime::now(),
                        "{base} served an expired token for a{i}: {body}"
                    );
                    read.fetch_add(1, Ordering::Relaxed);
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
}

/// The faults every backend goes through; `store_fault` is the store's own (a PostgreSQL
/// restart, an etcd leader killed), run between the kills and the freeze.
async fn holders_die_and_freeze_yet_nothing_forks(store: &str, store_fault: impl AsyncFnOnce()) {
    let mut cluster = Cluster::start(store).await;
    let stop = Arc::new(AtomicBool::new(false));
    let read = Arc::new(AtomicU64::new(0));
    let reading = readers(&cluster, stop.clone(), read.clone());

    for kill in 0..KILLS {
        let victim = cluster.holder(&format!("a{}", kill % ACCOUNTS)).await;
        let mut daemon = cluster.daemons[victim].take().unwrap();
        daemon.signal("KILL");
        daemon.wait_exit(Duration::from_secs(5)).await;
        // The others take its accounts after its leases expire; then it comes back.
        tokio::time::sleep(Duration::from_secs(5)).await;
        cluster.daemons[victim] = Some(cluster.setups[victim].start_ready(&cluster.client).await);
    }

    store_fault().await;

    // One holder frozen past its lease, then resumed: its accounts moved meanwhile, and
    // whatever it tries to write on waking is fenced off.
    let frozen = cluster.holder("a0").await;
    cluster.daemons[frozen].as_mut().unwrap().signal("STOP");
    tokio::time::sleep(Duration::from_secs(8)).await;
    cluster.daemons[frozen].as_mut().unwrap().signal("CONT");
    tokio::time::sleep(Duration::from_secs(6)).await;

    stop.store(true, Ordering::Relaxed);
    reading.await.expect("no replica served an expired token");
    assert!(
        read.load(Ordering::Relaxed) > 100,
        "the readers read tokens all along"
    );

    let counts = cluster.fake.counts();
    assert_eq!(
        counts.reuse_detected, 0,
        "a rotated-out refresh token came back: {counts:?}"
    );
    assert_eq!(counts.forks, 0, "{counts:?}");
    assert!(
        counts.refresh_grants >= 6,
        "refreshes went on through the faults: {counts:?}"
    );
    assert_eq!(
        cluster.fake.live_refresh_tokens("zy-client"),
        ACCOUNTS,
        "one live chain per account"
    );
    // Every replica serves every account.
    for r in 0..REPLICAS {
        for i in 0..ACCOUNTS {
            let token = cluster
                .daemon(r)
                .token(&cluster.client, &format!("a{i}"))
                .await;
            assert!(cluster.fake.is_valid_access_token(&access_token(&token)));
        }
    }
    for d in cluster.daemons.iter_mut().flatten() {
        d.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_replicas_survive_kills_freezes_and_a_database_restart() {
    let pg = std::sync::Mutex::new(Postgres::start());
    let store = format!(
        "backend = \"postgres\"\nurl = \"{}\"\n",
        pg.lock().unwrap().url()
    );
    holders_die_and_freeze_yet_nothing_forks(&store, async || {
        pg.lock().unwrap().restart();
        // Serving goes on while it restarts; leases and feeds come back by themselves.
        tokio::time::sleep(Duration::from_secs(6)).await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_replicas_survive_kills_freezes_and_the_leader_killed() {
    let etcd = std::sync::Mutex::new(EtcdCluster::start(3));
    let endpoints = format!("{:?}", etcd.lock().unwrap().endpoints());
    let store = format!("backend = \"etcd\"\nendpoints = {endpoints}\n");
    holders_die_and_freeze_yet_nothing_forks(&store, async || {
        let leader = etcd.lock().unwrap().leader();
        etcd.lock().unwrap().kill(leader);
        // A new leader is elected and every lease TTL restarts; the member comes back.
        tokio::time::sleep(Duration::from_secs(4)).await;
        etcd.lock().unwrap().restart(leader);
    })
    .await;
}
