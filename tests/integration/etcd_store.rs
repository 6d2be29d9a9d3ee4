//! The etcd backend against real etcd: two stores with different node ids share leases
//! (exclusive, passed on when the holder stops renewing, fenced by epoch), see each
//! other's commits on the change feed (also across a compaction), keep working when the
//! leader member dies, and keep sealed records sealed.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use tokend::config::StateConfig;
use tokend::seal::{Keyring, SealKey};
use tokend::secret::Secret;
use tokend::store::{
    AccessToken, Change, EtcdStore, Handoff, Lease, LeaseGrant, NewChain, SpentKind, State, Store,
    StoreError,
};
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::support::etcd::{EtcdCluster, TcpGate, etcd_state_config};

/// The longest wait for anything to happen in these tests.
const WAIT: Duration = Duration::from_secs(15);

fn account(name: &str) -> tokend::config::AccountName {
    tokend::config::AccountName::parse(name).unwrap()
}

/// A record holding `refresh_token`, in whole seconds (what the record format keeps).
fn state(refresh_token: &str) -> State {
    let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
    State {
        refresh_token: Some(Secret::new(refresh_token)),
        access: Some(AccessToken {
            token: Secret::new(format!("at-of-{refresh_token}")),
            token_type: "Bearer".into(),
            expires_at: now + Duration::from_secs(3600),
            scope: None,
            issued_at: now,
        }),
        refresh_token_issued_at: Some(now),
        ..State::default()
    }
}

/// The stores of one test, and what stops their tasks.
struct Replicas {
    cancel: CancellationToken,
    tracker: TaskTracker,
}

impl Replicas {
    fn new() -> Replicas {
        Replicas {
            cancel: CancellationToken::new(),
            tracker: TaskTracker::new(),
        }
    }

    async fn connect(&self, config: &StateConfig) -> Arc<EtcdStore> {
        EtcdStore::connect(config, &self.cancel, &self.tracker)
            .await
            .unwrap_or_else(|e| panic!("connect: {e}"))
    }

    /// A store on every member of `cluster`, as replica `node_id`.
    async fn node(&self, cluster: &EtcdCluster, node_id: &str, ttl: Duration) -> Arc<EtcdStore> {
        self.connect(&etcd_state_config(&cluster.endpoints(), node_id, ttl))
            .await
    }

    async fn stop(self) {
        self.cancel.cancel();
        self.tracker.close();
        tokio::time::timeout(WAIT, self.tracker.wait())
            .await
            .expect("the stores' tasks end on cancel");
    }
}

fn held(grant: LeaseGrant) -> Lease {
    match grant {
        LeaseGrant::Held(lease) => lease,
        LeaseGrant::HeldBy(node) => panic!("held by {node}"),
    }
}

/// The next change on `feed` that `want` accepts, within [`WAIT`].
async fn next_change(
    feed: &mut broadcast::Receiver<Change>,
    want: impl Fn(&Change) -> bool,
) -> Change {
    tokio::time::timeout(WAIT, async {
        loop {
            match feed.recv().await {
                Ok(change) if want(&change) => return change,
                Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => {}
                Err(broadcast::error::RecvError::Closed) => panic!("the feed closed"),
            }
        }
    })
    .await
    .expect("the change arrives in time")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_lease_is_exclusive_passes_on_with_a_higher_epoch_and_fences_the_old_holder() {
    let cluster = EtcdCluster::start(1);
    let replicas = Replicas::new();
    let ttl = Duration::from_secs(2);
    let a = replicas.node(&cluster, "node-a", ttl).await;
    let b = replicas.node(&cluster, "node-b", ttl).await;
    let acct = account("acct");
    assert_eq!(b.replicas().await.unwrap(), ["node-a", "node-b"]);

    let la = held(a.acquire(&acct, None).await.unwrap());
    assert!(la.covers(Duration::from_secs(1)));
    assert_eq!(
        b.acquire(&acct, None).await.unwrap(),
        LeaseGrant::HeldBy("node-a".into())
    );
    assert_eq!(b.holder(&acct).await.unwrap().as_deref(), Some("node-a"));
    assert_eq!(a.load(&acct).await.unwrap(), None);
    a.save_fenced(&acct, &state("rt-1"), la).await.unwrap();
    let renewed = a.renew(&[(acct.clone(), la)]).await.unwrap();
    assert_eq!(renewed.len(), 1);
    assert!(renewed[0].1.epoch == la.epoch && renewed[0].1.until >= la.until);

    // a stops renewing: b takes over once etcd expires a's lease, with a larger epoch.
    let stopped = Instant::now();
    let lb = loop {
        match b.acquire(&acct, None).await.unwrap() {
            LeaseGrant::Held(lease) => break lease,
            LeaseGrant::HeldBy(node) => assert_eq!(node, "node-a"),
        }
        assert!(stopped.elapsed() < 3 * ttl, "b never got the lease");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(lb.epoch > la.epoch, "{lb:?} after {la:?}");
    assert_eq!(b.replicas().await.unwrap(), ["node-b"], "a's lease is gone");
    assert_eq!(b.load(&acct).await.unwrap(), Some(state("rt-1")));
    b.save_fenced(&acct, &state("rt-2"), lb).await.unwrap();

    // a wakes up: its stale epoch's write is refused and changes nothing.
    let err = a
        .save_fenced(&acct, &state("rt-stale"), la)
        .await
        .unwrap_err();
    assert!(
        matches!(err, StoreError::Fenced { epoch, .. } if epoch == la.epoch),
        "{err}"
    );
    assert!(
        a.renew(&[(acct.clone(), la)]).await.unwrap().is_empty(),
        "a learns it lost the lease"
    );
    assert_eq!(a.load(&acct).await.unwrap(), Some(state("rt-2")));

    // A holder whose record changed behind its back (a write it did not read) is fenced
    // too, until it reads the record again.
    a.save(&acct, &state("rt-3")).await.unwrap();
    let err = b.save_fenced(&acct, &state("rt-4"), lb).await.unwrap_err();
    assert!(matches!(err, StoreError::Fenced { .. }), "{err}");
    assert_eq!(b.load(&acct).await.unwrap(), Some(state("rt-3")));
    b.save_fenced(&acct, &state("rt-4"), lb).await.unwrap();

    // Released, the lease is free at once, and the next holder's epoch is larger again.
    b.release(&acct, lb).await.unwrap();
    assert_eq!(a.holder(&acct).await.unwrap(), None);
    let again = held(a.acquire(&acct, None).await.unwrap());
    assert!(again.epoch > lb.epoch);
    replicas.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commits_handoffs_demands_and_freed_leases_reach_the_other_replicas_feed() {
    let cluster = EtcdCluster::start(1);
    let replicas = Replicas::new();
    let ttl = Duration::from_secs(3);
    let a = replicas.node(&cluster, "node-a", ttl).await;
    let b = replicas.node(&cluster, "node-b", ttl).await;
    let (mut a_feed, mut b_feed) = (a.subscribe(), b.subscribe());
    let acct = account("acct");

    let lease = held(a.acquire(&acct, None).await.unwrap());
    let committed = Instant::now();
    a.save_fenced(&acct, &state("rt-1"), lease).await.unwrap();
    let seen = next_change(&mut b_feed, |c| matches!(c, Change::Record(_))).await;
    assert_eq!(seen, Change::Record(acct.clone()));
    assert!(
        committed.elapsed() < Duration::from_secs(2),
        "{:?}",
        committed.elapsed()
    );
    assert_eq!(b.load(&acct).await.unwrap(), Some(state("rt-1")));

    // A follower's demand reaches the holder; a handoff and a freed lease reach everyone.
    b.request_refresh(&acct).await.unwrap();
    let demand = next_change(&mut a_feed, |c| matches!(c, Change::Demand(_))).await;
    assert_eq!(demand, Change::Demand(acct.clone()));
    let handoff = Handoff::RefreshToken(NewChain::untried(Secret::new("rt-new")));
    b.put_handoff(&acct, &handoff).await.unwrap();
    let arrived = next_change(&mut a_feed, |c| matches!(c, Change::Handoff(_))).await;
    assert_eq!(arrived, Change::Handoff(acct.clone()));
    assert!(a.has_handoff(&acct).await.unwrap());
    assert_eq!(a.load_handoff(&acct).await.unwrap(), Some(handoff));
    a.clear_handoff(&acct).await.unwrap();
    assert!(!b.has_handoff(&acct).await.unwrap());
    a.release(&acct, lease).await.unwrap();
    let freed = next_change(&mut b_feed, |c| matches!(c, Change::LeaseFreed(_))).await;
    assert_eq!(freed, Change::LeaseFreed(acct.clone()));
    replicas.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_cut_off_while_history_is_compacted_resyncs_and_keeps_delivering() {
    let cluster = EtcdCluster::start(1);
    let gate = TcpGate::start(&cluster.endpoint(0)).await;
    let replicas = Replicas::new();
    let ttl = Duration::from_secs(3);
    let writer = replicas.node(&cluster, "writer", ttl).await;
    let reader = replicas
        .connect(&etcd_state_config(&[gate.endpoint()], "reader", ttl))
        .await;
    let mut feed = reader.subscribe();
    writer
        .save(&account("before"), &state("rt-0"))
        .await
        .unwrap();
    next_change(&mut feed, |c| *c == Change::Record(account("before"))).await;

    // Cut off, the reader's watch misses commits that a compaction then erases.
    gate.close();
    writer
        .save(&account("missed"), &state("rt-1"))
        .await
        .unwrap();
    writer
        .save(&account("missed"), &state("rt-2"))
        .await
        .unwrap();
    cluster.compact().await;
    gate.reopen();
    next_change(&mut feed, |c| *c == Change::Resync).await;
    assert_eq!(
        reader.load(&account("missed")).await.unwrap(),
        Some(state("rt-2"))
    );

    writer
        .save(&account("after"), &state("rt-3"))
        .await
        .unwrap();
    next_change(&mut feed, |c| *c == Change::Record(account("after"))).await;
    replicas.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_leader_member_leaves_the_stores_working_and_the_records_intact() {
    let mut cluster = EtcdCluster::start(3);
    let replicas = Replicas::new();
    let ttl = Duration::from_secs(3);
    let a = replicas.node(&cluster, "node-a", ttl).await;
    let b = replicas.node(&cluster, "node-b", ttl).await;
    let (acct, other) = (account("acct"), account("other"));
    let mut lease = held(a.acquire(&acct, None).await.unwrap());
    a.save_fenced(&acct, &state("rt-1"), lease).await.unwrap();
    b.save(&other, &state("rt-other")).await.unwrap();

    let leader = cluster.leader();
    cluster.kill(leader);
    let killed = Instant::now();
    // The holder goes on as a lease keeper would: renew (or take the lease again and
    // read the record), then commit.
    loop {
        assert!(
            killed.elapsed() < WAIT,
            "no commit within {WAIT:?} of the leader's death"
        );
        if let Ok(kept) = a.renew(&[(acct.clone(), lease)]).await {
            if kept.is_empty()
                && let Ok(LeaseGrant::Held(l)) = a.acquire(&acct, None).await
                && a.load(&acct).await.is_ok()
            {
                lease = l;
            }
            if a.save_fenced(&acct, &state("rt-2"), lease).await.is_ok() {
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let took = killed.elapsed();
    assert!(
        took < Duration::from_secs(10),
        "the first commit took {took:?}"
    );

    let read = |account: tokend::config::AccountName| {
        let b = Arc::clone(&b);
        async move {
            let deadline = Instant::now() + WAIT;
            loop {
                match b.load(&account).await {
                    Ok(found) => return found,
                    Err(e) => assert!(Instant::now() < deadline, "{e}"),
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    };
    assert_eq!(read(acct.clone()).await, Some(state("rt-2")));
    assert_eq!(read(other).await, Some(state("rt-other")));
    assert!(b.check().await.unwrap().contains("3 members"));

    // The killed member rejoins and serves what was committed while it was down.
    cluster.restart(leader);
    let rejoined = etcd_state_config(&[cluster.endpoint(leader)], "node-c", ttl);
    let c = replicas.connect(&rejoined).await;
    assert_eq!(c.load(&acct).await.unwrap(), Some(state("rt-2")));
    replicas.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sealed_records_round_trip_and_etcd_holds_no_plaintext_token() {
    let cluster = EtcdCluster::start(1);
    let replicas = Replicas::new();
    let key = SealKey::parse(&Secret::new("07".repeat(32))).unwrap();
    let mut config = etcd_state_config(&cluster.endpoints(), "node-a", Duration::from_secs(3));
    config.keyring = Some(Keyring {
        current: key,
        previous: Vec::new(),
    });
    let sealed = replicas.connect(&config).await;
    let acct = account("acct");
    sealed.save(&acct, &state("rt-secret-1")).await.unwrap();
    assert_eq!(
        sealed.load(&acct).await.unwrap(),
        Some(state("rt-secret-1"))
    );
    let handoff = Handoff::RefreshToken(NewChain::untried(Secret::new("rt-secret-2")));
    sealed.put_handoff(&acct, &handoff).await.unwrap();
    assert_eq!(sealed.load_handoff(&acct).await.unwrap(), Some(handoff));

    let mut raw = etcd_client::Client::connect(cluster.endpoints(), None)
        .await
        .unwrap();
    let everything = raw
        .get("", Some(etcd_client::GetOptions::new().with_all_keys()))
        .await
        .unwrap();
    let mut records = 0;
    for kv in everything.kvs() {
        let value = String::from_utf8_lossy(kv.value());
        assert!(
            !value.contains("rt-secret"),
            "{} holds a token in clear",
            kv.key_str().unwrap()
        );
        records += usize::from(value.contains("XChaCha20-Poly1305"));
    }
    assert_eq!(records, 2, "the record and the handoff are sealed");

    // A replica without the key cannot read the record, and leaves it where it is.
    let unkeyed = replicas
        .connect(&etcd_state_config(
            &cluster.endpoints(),
            "node-b",
            Duration::from_secs(3),
        ))
        .await;
    let err = unkeyed.load(&acct).await.unwrap_err();
    assert!(err.to_string().contains("tokend/record/acct"), "{err}");
    assert_eq!(
        sealed.load(&acct).await.unwrap(),
        Some(state("rt-secret-1"))
    );
    assert!(sealed.check().await.unwrap().contains("schema version 1"));
    replicas.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_schema_and_an_unreachable_cluster_are_refused_by_name() {
    let cluster = EtcdCluster::start(1);
    let mut raw = etcd_client::Client::connect(cluster.endpoints(), None)
        .await
        .unwrap();
    raw.put("tokend/schema", "2", None).await.unwrap();
    let replicas = Replicas::new();
    let config = etcd_state_config(&cluster.endpoints(), "node-a", Duration::from_secs(3));
    let err = EtcdStore::connect(&config, &replicas.cancel, &replicas.tracker)
        .await
        .err()
        .expect("a schema of another version is refused");
    assert!(
        matches!(err, StoreError::Schema { ref found, .. } if found == "2"),
        "{err}"
    );
    assert!(err.to_string().contains("tokend/schema"), "{err}");

    // Nothing listens there: a bounded wait, then an error naming the endpoint.
    let nowhere = format!("http://127.0.0.1:{}", crate::support::free_port());
    let config = etcd_state_config(
        std::slice::from_ref(&nowhere),
        "node-a",
        Duration::from_secs(3),
    );
    let started = Instant::now();
    let err = EtcdStore::connect(&config, &replicas.cancel, &replicas.tracker)
        .await
        .err()
        .expect("an unreachable cluster is refused");
    assert!(matches!(err, StoreError::Unavailable { .. }), "{err}");
    assert!(err.to_string().contains(&nowhere), "{err}");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    replicas.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rename_set_aside_and_the_spent_ledger_work_on_shared_keys() {
    let cluster = EtcdCluster::start(1);
    let replicas = Replicas::new();
    let config = etcd_state_config(&cluster.endpoints(), "node-a", Duration::from_secs(3));
    let store = replicas.connect(&config).await;
    let (old, new, other) = (account("old"), account("new"), account("other"));
    assert_eq!(store.location(&old), "etcd tokend/record/old");

    // The ledger keeps at least the newest 64 entries per account.
    for i in 0..70 {
        store
            .record_spent(&old, &format!("fp-{i}"), SpentKind::Seed)
            .await
            .unwrap();
    }
    assert_eq!(store.spent("fp-69").await.unwrap().unwrap().account, old);
    assert!(store.spent("fp-6").await.unwrap().is_some());
    assert_eq!(store.spent("fp-5").await.unwrap(), None, "the oldest go");
    assert_eq!(store.spent("never").await.unwrap(), None);

    // A rename moves the record and the ledger entries, and never overwrites a chain.
    let err = store.rename(&other, &new).await.unwrap_err();
    assert!(matches!(err, StoreError::NothingToMove { .. }), "{err}");
    store.save(&old, &state("rt-old")).await.unwrap();
    store.rename(&old, &new).await.unwrap();
    assert_eq!(store.load(&old).await.unwrap(), None);
    assert_eq!(store.load(&new).await.unwrap(), Some(state("rt-old")));
    assert_eq!(store.spent("fp-69").await.unwrap().unwrap().account, new);
    store.save(&other, &state("rt-other")).await.unwrap();
    let err = store.rename(&other, &new).await.unwrap_err();
    assert!(matches!(err, StoreError::Occupied { .. }), "{err}");
    assert_eq!(store.load(&new).await.unwrap(), Some(state("rt-old")));

    // A copy set aside is the record as it was, and only this account's copy is dropped.
    assert_eq!(store.set_aside(&account("nothing")).await.unwrap(), None);
    let kept = store.set_aside(&new).await.unwrap().unwrap();
    assert!(kept.starts_with("tokend/aside/new/replaced-"), "{kept}");
    store.save(&new, &state("rt-next")).await.unwrap();
    let mut raw = etcd_client::Client::connect(cluster.endpoints(), None)
        .await
        .unwrap();
    let copy = raw.get(kept.as_str(), None).await.unwrap();
    assert!(String::from_utf8_lossy(copy.kvs()[0].value()).contains("rt-old"));
    store.drop_aside(&other, &kept).await.unwrap();
    assert_eq!(raw.get(kept.as_str(), None).await.unwrap().count(), 1);
    store.drop_aside(&new, &kept).await.unwrap();
    assert_eq!(raw.get(kept.as_str(), None).await.unwrap().count(), 0);
    replicas.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quiet_feed_stays_connected_without_resyncs() {
    // A connection etcd drops (for pinging more often than it allows, say) costs a
    // Resync, after which every follower reads every account again.
    let cluster = EtcdCluster::start(1);
    let replicas = Replicas::new();
    let store = replicas
        .node(&cluster, "node-a", Duration::from_secs(2))
        .await;
    let mut feed = store.subscribe();
    let quiet = Duration::from_secs(8);
    let heard = tokio::time::timeout(quiet, feed.recv()).await;
    assert!(
        heard.is_err(),
        "{heard:?} within {quiet:?} of a quiet store"
    );
    store.save(&account("acct"), &state("rt-1")).await.unwrap();
    next_change(&mut feed, |c| *c == Change::Record(account("acct"))).await;
    replicas.stop().await;
}
