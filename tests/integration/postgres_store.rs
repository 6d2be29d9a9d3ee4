//! The PostgreSQL store against a real server started by each test: leases exclusive and
//! expiring by the database's clock, stale writers fenced, commits heard by the other
//! replica, records sealed and surviving a restart, and `check` that names no password.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokend::config::{AccountName, CaBundle, StateBackend, StateConfig};
use tokend::seal::{Keyring, SealKey};
use tokend::secret::Secret;
use tokend::store::{
    AccessToken, Change, Handoff, Lease, LeaseGrant, NewChain, PostgresStore, SpentKind, State,
    Store, StoreError,
};
use tokio::sync::broadcast::Receiver;
use tokio::sync::broadcast::error::RecvError;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::support::postgres::Postgres;

/// The longest wait for anything the server or the feed should do.
const WAIT: Duration = Duration::from_secs(10);

fn name(s: &str) -> AccountName {
    AccountName::parse(s).unwrap()
}

fn at(secs: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(secs)
}

fn record(refresh_token: &str) -> State {
    State {
        refresh_token: Some(Secret::new(refresh_token)),
        refresh_token_issued_at: Some(at(1_700_000_000)),
        access: Some(AccessToken {
            token: Secret::new(format!("access-of-{refresh_token}")),
            token_type: "Bearer".into(),
            expires_at: at(1_700_003_600),
            scope: None,
            issued_at: at(1_700_000_000),
        }),
        last_refresh: Some(at(1_700_000_000)),
        ..State::default()
    }
}

fn keyring() -> Keyring {
    Keyring {
        current: SealKey::parse(&Secret::new("7a".repeat(32))).unwrap(),
        previous: Vec::new(),
    }
}

/// One replica's view of the store, and what stops its tasks.
struct Replica {
    store: Arc<PostgresStore>,
    cancel: CancellationToken,
    tracker: TaskTracker,
}

impl Replica {
    async fn open(url: &str, node: &str, ttl: Duration, keyring: Option<Keyring>) -> Replica {
        let (cancel, tracker) = (CancellationToken::new(), TaskTracker::new());
        let store = PostgresStore::connect(&state(url, node, ttl, keyring), &cancel, &tracker)
            .await
            .unwrap_or_else(|e| panic!("connect {node}: {e}"));
        Replica {
            store,
            cancel,
            tracker,
        }
    }

    /// Stops the background tasks and waits for them: none outlives its replica.
    async fn close(self) {
        self.cancel.cancel();
        self.tracker.close();
        tokio::time::timeout(WAIT, self.tracker.wait())
            .await
            .expect("the store's tasks end on cancel");
    }
}

/// Replicas `node-a` and `node-b` of the store on `pg`.
async fn two(pg: &Postgres, ttl: Duration, keyring: Option<Keyring>) -> (Replica, Replica) {
    let a = Replica::open(&pg.url(), "node-a", ttl, keyring.clone()).await;
    (a, Replica::open(&pg.url(), "node-b", ttl, keyring).await)
}

fn state(url: &str, node: &str, ttl: Duration, keyring: Option<Keyring>) -> StateConfig {
    StateConfig {
        dir: PathBuf::from("/nonexistent"),
        keyring,
        backend: StateBackend::Postgres {
            url: Secret::new(url),
            prefix: "tokend_".into(),
            ca: None,
        },
        lease_ttl: ttl,
        node_id: node.into(),
    }
}

/// The next change on `feed` that `want` accepts, within [`WAIT`].
async fn heard(feed: &mut Receiver<Change>, want: impl Fn(&Change) -> bool) -> Change {
    let wait = async {
        loop {
            match feed.recv().await {
                Ok(c) if want(&c) => return c,
                Ok(_) | Err(RecvError::Lagged(_)) => {}
                Err(RecvError::Closed) => panic!("the feed closed"),
            }
        }
    };
    tokio::time::timeout(WAIT, wait)
        .await
        .expect("the change arrives on the feed")
}

fn held(grant: LeaseGrant) -> Lease {
    match grant {
        LeaseGrant::Held(l) => l,
        LeaseGrant::HeldBy(other) => panic!("expected to hold the lease, {other} does"),
    }
}

/// A client of the test's own, for what the store must not show (or to break things).
async fn raw(url: &str) -> tokio_postgres::Client {
    let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .expect("connect to the test server");
    tokio::spawn(connection);
    client
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_lease_is_exclusive_expires_by_the_database_clock_and_fences_stale_writes() {
    let pg = Postgres::start();
    let ttl = Duration::from_secs(2);
    let (a, b) = two(&pg, ttl, None).await;
    let acct = name("acct");

    assert_eq!(a.store.load(&acct).await.unwrap(), None);
    let first = held(a.store.acquire(&acct, None).await.unwrap());
    assert_eq!(
        b.store.acquire(&acct, None).await.unwrap(),
        LeaseGrant::HeldBy("node-a".into())
    );
    assert_eq!(
        b.store.holder(&acct).await.unwrap().as_deref(),
        Some("node-a")
    );
    a.store
        .save_fenced(&acct, &record("rt-1"), first)
        .await
        .unwrap();
    // The holder's own lease is renewed, not replaced.
    let again = held(a.store.acquire(&acct, Some(first)).await.unwrap());
    assert_eq!(again.epoch, first.epoch);
    let renewed = a.store.renew(&[(acct.clone(), first)]).await.unwrap();
    assert_eq!(renewed.len(), 1);
    let replicas = b.store.replicas().await.unwrap();
    assert_eq!(replicas, ["node-a", "node-b"]);

    // node-a stops renewing: node-b takes over once the database says it expired.
    let renewed_at = Instant::now();
    let second = loop {
        match b.store.acquire(&acct, None).await.unwrap() {
            LeaseGrant::Held(l) => break l,
            LeaseGrant::HeldBy(h) => assert_eq!(h, "node-a"),
        }
        assert!(renewed_at.elapsed() < WAIT, "the lease never expired");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(renewed_at.elapsed() >= Duration::from_millis(1500));
    assert!(second.epoch > first.epoch);
    assert_eq!(b.store.load(&acct).await.unwrap(), Some(record("rt-1")));

    // node-a wakes up with its old epoch: refused, and the record is untouched.
    let err = a
        .store
        .save_fenced(&acct, &record("rt-stale"), first)
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::Fenced { .. }), "{err}");
    assert!(
        a.store
            .renew(&[(acct.clone(), first)])
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(b.store.load(&acct).await.unwrap(), Some(record("rt-1")));
    b.store
        .save_fenced(&acct, &record("rt-2"), second)
        .await
        .unwrap();

    // Released: node-a takes it at once, with a newer epoch than every holder before,
    // but its view of the record is older than rt-2, so its write is refused until it
    // reads again.
    let mut a_feed = a.store.subscribe();
    b.store.release(&acct, second).await.unwrap();
    heard(&mut a_feed, |c| *c == Change::LeaseFreed(acct.clone())).await;
    let third = held(a.store.acquire(&acct, None).await.unwrap());
    assert!(third.epoch > second.epoch);
    let err = a
        .store
        .save_fenced(&acct, &record("rt-3"), third)
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::Fenced { .. }), "{err}");
    assert_eq!(a.store.load(&acct).await.unwrap(), Some(record("rt-2")));
    a.store
        .save_fenced(&acct, &record("rt-3"), third)
        .await
        .unwrap();
    assert_eq!(b.store.load(&acct).await.unwrap(), Some(record("rt-3")));
    a.close().await;
    b.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_is_heard_and_read_by_the_other_replica_and_sealed_records_hold_no_token() {
    let pg = Postgres::start();
    let ttl = Duration::from_secs(5);
    let (a, b) = two(&pg, ttl, Some(keyring())).await;
    let acct = name("acct");
    let mut b_feed = b.store.subscribe();

    a.store.save(&acct, &record("rt-secret-1")).await.unwrap();
    heard(&mut b_feed, |c| *c == Change::Record(acct.clone())).await;
    assert_eq!(
        b.store.load(&acct).await.unwrap(),
        Some(record("rt-secret-1"))
    );
    let rows = raw(&pg.url())
        .await
        .query("SELECT record FROM tokend_accounts", &[])
        .await
        .unwrap();
    let bytes: Vec<u8> = rows[0].get(0);
    let text = String::from_utf8_lossy(&bytes);
    assert!(!text.contains("rt-secret-1"), "{text}");
    assert!(text.contains("XChaCha20-Poly1305"), "{text}");

    // A replica with another key cannot read it, and says where it is.
    let c = Replica::open(&pg.url(), "node-c", ttl, None).await;
    let err = c.store.load(&acct).await.unwrap_err().to_string();
    assert!(err.contains("tokend_accounts row acct"), "{err}");
    assert!(!err.contains("rt-secret-1"), "{err}");

    // Handoffs and demands reach the other replica too.
    let handoff = Handoff::RefreshToken(NewChain::untried(Secret::new("rt-handed")));
    a.store.put_handoff(&acct, &handoff).await.unwrap();
    heard(&mut b_feed, |c| *c == Change::Handoff(acct.clone())).await;
    assert!(b.store.has_handoff(&acct).await.unwrap());
    assert_eq!(b.store.load_handoff(&acct).await.unwrap(), Some(handoff));
    b.store.clear_handoff(&acct).await.unwrap();
    assert!(!a.store.has_handoff(&acct).await.unwrap());
    a.store.request_refresh(&acct).await.unwrap();
    heard(&mut b_feed, |c| *c == Change::Demand(acct.clone())).await;
    for r in [a, b, c] {
        r.close().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_ledger_copies_aside_and_renames_live_in_the_shared_tables() {
    let pg = Postgres::start();
    let ttl = Duration::from_secs(5);
    let (a, b) = two(&pg, ttl, None).await;
    let (old, new, other) = (name("old"), name("new"), name("other"));

    a.store
        .record_spent(&old, "fp-seed", SpentKind::Seed)
        .await
        .unwrap();
    let spent = b.store.spent("fp-seed").await.unwrap().unwrap();
    assert_eq!((spent.account, spent.kind), (old.clone(), SpentKind::Seed));
    assert_eq!(b.store.spent("fp-none").await.unwrap(), None);
    // At least the newest 64 of an account are kept.
    for i in 0..70 {
        let fp = format!("fp-{i}");
        a.store
            .record_spent(&other, &fp, SpentKind::Handover)
            .await
            .unwrap();
    }
    for i in 6..70 {
        let fp = format!("fp-{i}");
        assert!(b.store.spent(&fp).await.unwrap().is_some(), "{fp} kept");
    }

    assert_eq!(a.store.set_aside(&old).await.unwrap(), None);
    a.store.save(&old, &record("rt-old")).await.unwrap();
    let kept = a.store.set_aside(&old).await.unwrap().unwrap();
    let copies = |client: tokio_postgres::Client| async move {
        let rows = client
            .query("SELECT count(*) FROM tokend_aside", &[])
            .await
            .unwrap();
        rows[0].get::<_, i64>(0)
    };
    assert_eq!(copies(raw(&pg.url()).await).await, 1);
    b.store.drop_aside(&other, &kept).await.unwrap();
    assert_eq!(
        copies(raw(&pg.url()).await).await,
        1,
        "only its own account's"
    );
    b.store.drop_aside(&old, &kept).await.unwrap();
    assert_eq!(copies(raw(&pg.url()).await).await, 0);

    b.store.save(&other, &record("rt-other")).await.unwrap();
    let err = a.store.rename(&old, &other).await.unwrap_err();
    assert!(matches!(err, StoreError::Occupied { .. }), "{err}");
    let err = a.store.rename(&new, &other).await.unwrap_err();
    assert!(matches!(err, StoreError::NothingToMove { .. }), "{err}");
    a.store.rename(&old, &new).await.unwrap();
    assert_eq!(b.store.load(&old).await.unwrap(), None);
    assert_eq!(b.store.load(&new).await.unwrap(), Some(record("rt-old")));
    assert_eq!(
        b.store.spent("fp-seed").await.unwrap().unwrap().account,
        new
    );
    a.close().await;
    b.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_survives_a_server_restart_and_the_store_reconnects_by_itself() {
    let mut pg = Postgres::start();
    let ttl = Duration::from_secs(3);
    let a = Replica::open(&pg.url(), "node-a", ttl, None).await;
    let acct = name("acct");
    a.store.load(&acct).await.unwrap();
    let lease = held(a.store.acquire(&acct, None).await.unwrap());
    a.store
        .save_fenced(&acct, &record("rt-1"), lease)
        .await
        .unwrap();
    let mut feed = a.store.subscribe();

    pg.stop();
    let err = a.store.load(&acct).await.unwrap_err();
    assert!(matches!(err, StoreError::Unavailable { .. }), "{err}");
    assert!(
        err.to_string()
            .contains(&format!("127.0.0.1:{}", pg.port()))
    );
    pg.start_again();

    // The same store, no new one: it reconnects at its next use, and the feed says
    // that anything may have changed while it was away.
    let deadline = Instant::now() + WAIT;
    let loaded = loop {
        match a.store.load(&acct).await {
            Ok(state) => break state,
            Err(e) => assert!(Instant::now() < deadline, "never reconnected: {e}"),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(loaded, Some(record("rt-1")));
    heard(&mut feed, |c| *c == Change::Resync).await;
    let lease = held(a.store.acquire(&acct, Some(lease)).await.unwrap());
    a.store
        .save_fenced(&acct, &record("rt-2"), lease)
        .await
        .unwrap();
    heard(&mut feed, |c| *c == Change::Record(acct.clone())).await;

    // Again, the feed resumes: a commit by another replica is heard after it.
    pg.restart();
    heard(&mut feed, |c| *c == Change::Resync).await;
    let b = Replica::open(&pg.url(), "node-b", ttl, None).await;
    b.store.save(&acct, &record("rt-3")).await.unwrap();
    heard(&mut feed, |c| *c == Change::Record(acct.clone())).await;
    b.close().await;
    a.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_names_no_password_and_an_unknown_schema_is_refused() {
    let pg = Postgres::start();
    let admin = raw(&pg.url()).await;
    // Two statements: CREATE DATABASE runs outside any transaction only.
    for statement in [
        "CREATE ROLE tokend LOGIN PASSWORD 'pw-Zq81-hidden'",
        "CREATE DATABASE tokend OWNER tokend",
    ] {
        admin.batch_execute(statement).await.unwrap();
    }
    let url = format!(
        "postgres://tokend:pw-Zq81-hidden@127.0.0.1:{}/tokend?sslmode=prefer",
        pg.port()
    );
    let a = Replica::open(&url, "node-a", Duration::from_secs(5), None).await;
    let said = a.store.check().await.unwrap();
    assert!(said.contains("reachable"), "{said}");
    assert!(said.contains("schema version 1"), "{said}");
    assert!(
        said.contains(&format!("127.0.0.1:{}/tokend", pg.port())),
        "{said}"
    );
    assert!(!said.contains("pw-Zq81-hidden"), "{said}");
    let location = a.store.location(&name("acct"));
    assert!(!location.contains("pw-Zq81-hidden"), "{location}");

    // A schema from a newer tokend: refused by check and by a new connect.
    let owner = raw(&url.replace("?sslmode=prefer", "?sslmode=disable")).await;
    owner
        .batch_execute("UPDATE tokend_schema SET version = 99")
        .await
        .unwrap();
    let err = a.store.check().await.unwrap_err();
    assert!(matches!(err, StoreError::Schema { .. }), "{err}");
    let (cancel, tracker) = (CancellationToken::new(), TaskTracker::new());
    let cfg = state(&url, "node-b", Duration::from_secs(5), None);
    let err = PostgresStore::connect(&cfg, &cancel, &tracker)
        .await
        .err()
        .expect("a newer schema is refused");
    let text = err.to_string();
    assert!(
        text.contains("99") && !text.contains("pw-Zq81-hidden"),
        "{text}"
    );

    // Unreachable: the error names host:port/db, never the password.
    let closed = format!(
        "postgres://tokend:pw-Zq81-hidden@127.0.0.1:{}/tokend",
        crate::support::free_port()
    );
    let cfg = state(&closed, "node-b", Duration::from_secs(5), None);
    let err = PostgresStore::connect(&cfg, &cancel, &tracker)
        .await
        .err()
        .expect("nothing listens there");
    let text = err.to_string();
    assert!(matches!(err, StoreError::Unavailable { .. }), "{text}");
    assert!(
        text.contains("127.0.0.1:") && text.contains("/tokend"),
        "{text}"
    );
    assert!(!text.contains("pw-Zq81-hidden"), "{text}");
    a.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sslmode_is_honoured_and_verified_tls_trusts_the_configured_ca_only() {
    let pg = Postgres::start_tls();
    let ca = Arc::new(CaBundle {
        path: PathBuf::from("test-ca.pem"),
        pem: pg.ca_pem(),
    });
    let (cancel, tracker) = (CancellationToken::new(), TaskTracker::new());
    let connect = |host: &str, mode: &str, ca: Option<Arc<CaBundle>>| {
        let mut cfg = state(
            &format!(
                "postgres://postgres@{host}:{}/postgres?sslmode={mode}",
                pg.port()
            ),
            "node-a",
            Duration::from_secs(5),
            None,
        );
        if let StateBackend::Postgres { ca: slot, .. } = &mut cfg.backend {
            *slot = ca;
        }
        let (cancel, tracker) = (cancel.clone(), tracker.clone());
        async move { PostgresStore::connect(&cfg, &cancel, &tracker).await }
    };
    // The certificate names localhost, not 127.0.0.1: verify-full refuses, verify-ca not.
    let err = connect("127.0.0.1", "verify-full", Some(Arc::clone(&ca)))
        .await
        .err()
        .expect("the name does not match");
    assert!(err.to_string().contains("certificate"), "{err}");
    for (host, mode, with_ca, says) in [
        ("localhost", "verify-full", true, "host name verified"),
        ("127.0.0.1", "verify-ca", true, "host name not checked"),
        ("127.0.0.1", "require", false, "NOT verified"),
    ] {
        let store = connect(host, mode, with_ca.then(|| Arc::clone(&ca)))
            .await
            .unwrap_or_else(|e| panic!("sslmode={mode}: {e}"));
        let said = store.check().await.unwrap();
        assert!(said.contains("this connection encrypted"), "{said}");
        assert!(said.contains(says), "{said}");
    }
    // A verified mode without ca_file is refused before any connection.
    let err = connect("localhost", "verify-full", None)
        .await
        .err()
        .unwrap();
    assert!(err.to_string().contains("state.ca_file"), "{err}");
    // Another CA does not vouch for this server.
    let other = Postgres::start_tls();
    let stranger = Arc::new(CaBundle {
        path: PathBuf::from("other-ca.pem"),
        pem: other.ca_pem(),
    });
    let err = connect("localhost", "verify-ca", Some(stranger))
        .await
        .err()
        .expect("an unknown issuer is refused");
    assert!(err.to_string().contains("certificate"), "{err}");
    cancel.cancel();
    tracker.close();
    tokio::time::timeout(WAIT, tracker.wait()).await.unwrap();
}
