//! One contract, three backends: the same cases against the file store, PostgreSQL and
//! etcd (real servers, started here). The lease is exclusive; a stale epoch's write is
//! rejected and changes nothing; a subscriber sees every committed record; a record
//! survives the store's restart.

use std::sync::Arc;
use std::time::Duration;

use tokend::config::{AccountName, Config, SystemEnvironment};
use tokend::secret::Secret;
use tokend::store::{self, Change, LeaseGrant, State, Store, StoreError};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::support::etcd::EtcdCluster;
use crate::support::postgres::Postgres;

/// A backend's servers, and how to open a replica's store on them.
enum Backend {
    File(tempfile::TempDir),
    Postgres(Postgres),
    Etcd(EtcdCluster),
}

/// The stores opened in a test, and what stops their background tasks.
struct Replicas {
    backend: Backend,
    cancel: CancellationToken,
    tracker: TaskTracker,
}

impl Replicas {
    fn file() -> Replicas {
        Replicas::on(Backend::File(tempfile::tempdir().unwrap()))
    }

    fn postgres() -> Replicas {
        Replicas::on(Backend::Postgres(Postgres::start()))
    }

    fn etcd() -> Replicas {
        Replicas::on(Backend::Etcd(EtcdCluster::start(1)))
    }

    fn on(backend: Backend) -> Replicas {
        Replicas {
            backend,
            cancel: CancellationToken::new(),
            tracker: TaskTracker::new(),
        }
    }

    fn state_toml(&self, node: &str) -> String {
        let key = "encryption_key = \"".to_string() + &"5a".repeat(32) + "\"\n";
        match &self.backend {
            Backend::File(dir) => format!("[state]\ndir = \"{}\"\n{key}", dir.path().display()),
            Backend::Postgres(pg) => format!(
                "[state]\nbackend = \"postgres\"\nurl = \"{}\"\nlease_ttl = \"3s\"\nnode_id = \"{node}\"\n{key}",
                pg.url()
            ),
            Backend::Etcd(etcd) => format!(
                "[state]\nbackend = \"etcd\"\nendpoints = {:?}\nlease_ttl = \"3s\"\nnode_id = \"{node}\"\n{key}",
                etcd.endpoints()
            ),
        }
    }

    /// A replica's store named `node`; `Err` as the backend refuses it (the file store
    /// refuses a second one: its directory lock is its lease).
    async fn open(&self, node: &str) -> Result<Arc<dyn Store>, StoreError> {
        let text = self.state_toml(node);
        let config = Config::from_str_at(
            &text,
            std::path::Path::new("conformance.toml"),
            &SystemEnvironment,
        )
        .expect("the [state] table is valid");
        store::open(&config.state, &self.cancel, &self.tracker).await
    }

    /// Stops the store's servers and starts them again, keeping their data.
    fn restart(&mut self) {
        match &mut self.backend {
            Backend::File(_) => {}
            Backend::Postgres(pg) => pg.restart(),
            Backend::Etcd(etcd) => {
                etcd.kill(0);
                etcd.restart(0);
            }
        }
    }

    fn shared(&self) -> bool {
        !matches!(self.backend, Backend::File(_))
    }
}

impl Drop for Replicas {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

fn account(name: &str) -> AccountName {
    AccountName::parse(name).unwrap()
}

fn record(refresh_token: &str) -> State {
    State {
        refresh_token: Some(Secret::new(refresh_token)),
        ..State::default()
    }
}

fn held(grant: LeaseGrant) -> store::Lease {
    match grant {
        LeaseGrant::Held(l) => l,
        LeaseGrant::HeldBy(node) => panic!("the lease is held by {node}"),
    }
}

async fn refresh_token_of(store: &dyn Store, a: &AccountName) -> Option<String> {
    let state = store.load(a).await.expect("load").expect("a record");
    state.refresh_token.map(|t| t.expose().to_string())
}

/// Bounded wait for the next `Record(a)` on `feed`.
async fn next_record(feed: &mut tokio::sync::broadcast::Receiver<Change>, a: &AccountName) {
    tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match feed.recv().await {
                Ok(Change::Record(x)) if &x == a => return,
                Ok(_) => {}
                Err(e) => panic!("the change feed failed: {e}"),
            }
        }
    })
    .await
    .expect("the commit reached the other replica's feed within 10 s");
}

async fn the_lease_is_exclusive(replicas: Replicas) {
    let a = account("acct");
    let one = replicas.open("one").await.unwrap();
    let lease = held(one.acquire(&a, None).await.unwrap());
    if !replicas.shared() {
        // One process per directory: a second replica cannot even open it.
        assert!(matches!(
            replicas.open("two").await,
            Err(StoreError::Locked { .. })
        ));
        assert!(matches!(
            one.acquire(&a, None).await.unwrap(),
            LeaseGrant::HeldBy(_)
        ));
        return;
    }
    let two = replicas.open("two").await.unwrap();
    assert_eq!(
        two.acquire(&a, None).await.unwrap(),
        LeaseGrant::HeldBy("one".into())
    );
    assert_eq!(two.holder(&a).await.unwrap().as_deref(), Some("one"));
    // Renewing is not stealing: the holder keeps it, the other still cannot take it.
    let renewed = held(one.acquire(&a, Some(lease)).await.unwrap());
    assert_eq!(renewed.epoch, lease.epoch);
    assert!(matches!(
        two.acquire(&a, None).await.unwrap(),
        LeaseGrant::HeldBy(_)
    ));
    // Released, it goes to the other with a larger epoch.
    one.release(&a, renewed).await.unwrap();
    let taken = held(two.acquire(&a, None).await.unwrap());
    assert!(
        taken.epoch > lease.epoch,
        "{} > {}",
        taken.epoch,
        lease.epoch
    );
}

async fn a_stale_epochs_write_is_rejected(replicas: Replicas) {
    let a = account("acct");
    let one = replicas.open("one").await.unwrap();
    let old = held(one.acquire(&a, None).await.unwrap());
    // A holder reads the record before its first write: the fence compares against it.
    one.load(&a).await.unwrap();
    one.save_fenced(&a, &record("rt-1"), old).await.unwrap();
    one.release(&a, old).await.unwrap();
    let (two, new) = if replicas.shared() {
        let two = replicas.open("two").await.unwrap();
        two.load(&a).await.unwrap();
        let new = held(two.acquire(&a, None).await.unwrap());
        (two, new)
    } else {
        let new = held(one.acquire(&a, None).await.unwrap());
        (one.clone(), new)
    };
    assert!(new.epoch > old.epoch);
    two.save_fenced(&a, &record("rt-2"), new).await.unwrap();
    // The replica that held the old epoch wakes up and writes: refused, nothing changed.
    let stale = one.save_fenced(&a, &record("rt-stale"), old).await;
    assert!(matches!(stale, Err(StoreError::Fenced { .. })), "{stale:?}");
    assert_eq!(
        refresh_token_of(two.as_ref(), &a).await.as_deref(),
        Some("rt-2")
    );
    assert_eq!(
        refresh_token_of(one.as_ref(), &a).await.as_deref(),
        Some("rt-2")
    );
}

async fn a_subscriber_sees_every_committed_record(replicas: Replicas) {
    let a = account("acct");
    let one = replicas.open("one").await.unwrap();
    let watcher = if replicas.shared() {
        replicas.open("two").await.unwrap()
    } else {
        one.clone()
    };
    let mut feed = watcher.subscribe();
    let lease = held(one.acquire(&a, None).await.unwrap());
    one.load(&a).await.unwrap();
    for i in 0..20 {
        one.save_fenced(&a, &record(&format!("rt-{i}")), lease)
            .await
            .unwrap();
        next_record(&mut feed, &a).await;
        assert_eq!(
            refresh_token_of(watcher.as_ref(), &a).await,
            Some(format!("rt-{i}")),
            "the watcher reads what was committed when it hears of it"
        );
    }
}

async fn a_record_survives_the_stores_restart(mut replicas: Replicas) {
    let a = account("acct");
    {
        let one = replicas.open("one").await.unwrap();
        let lease = held(one.acquire(&a, None).await.unwrap());
        one.load(&a).await.unwrap();
        one.save_fenced(&a, &record("rt-kept"), lease)
            .await
            .unwrap();
    }
    replicas.restart();
    let again = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            match replicas.open("one-again").await {
                Ok(store) => match store.load(&a).await {
                    Ok(state) => return state,
                    Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                },
                // The file store's lock went with the first store; a server still starting
                // refuses connections for a moment.
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    })
    .await
    .expect("the store answers again within 20 s of its restart");
    let token = again
        .and_then(|s| s.refresh_token)
        .map(|t| t.expose().to_string());
    assert_eq!(token.as_deref(), Some("rt-kept"));
}

macro_rules! conformance {
    ($($case:ident),*) => {
        mod file {
            $( #[tokio::test] async fn $case() { super::$case(super::Replicas::file()).await } )*
        }
        mod etcd {
            $( #[tokio::test] async fn $case() { super::$case(super::Replicas::etcd()).await } )*
        }
        mod postgres {
            $( #[tokio::test] async fn $case() { super::$case(super::Replicas::postgres()).await } )*
        }
    };
}

conformance!(
    the_lease_is_exclusive,
    a_stale_epochs_write_is_rejected,
    a_subscriber_sees_every_committed_record,
    a_record_survives_the_stores_restart
);
