//! Refresh leases on etcd: one etcd lease per replica, kept alive by [`Store::renew`],
//! and per account a `lease/ACCOUNT` key attached to it whose create revision is the
//! epoch every fenced write compares.
//!
//! A dead replica's keys go when etcd expires its lease. On an etcd leader change the new
//! leader restarts every lease's TTL, so a holder that stopped renewing may look alive
//! for up to about twice `lease_ttl`. That only delays a takeover: a holder's own view
//! ([`Lease::until`]) never counts that extension, and a write is fenced on the key's
//! create revision, which no waking holder can bring back.
//!
//! [`Store::renew`]: crate::store::Store::renew

use std::collections::HashMap;
use std::time::Duration;

use etcd_client::{
    Compare, CompareOp, GetOptions, LeaseKeepAliveStream, LeaseKeeper, PutOptions, Txn, TxnOp,
};
use tokio::time::Instant;

use super::{EtcdStore, RETRY_PAUSE, first_kv, refused};
use crate::config::AccountName;
use crate::store::{Lease, LeaseGrant, StoreError};

/// This replica's etcd lease as last granted or kept alive.
pub(super) struct ReplicaLease {
    /// 0 before the first grant.
    id: i64,
    /// The TTL etcd granted, in seconds.
    ttl: i64,
    /// Until when the lease lives at the least: the etcd TTL counted from before the
    /// request that granted or kept it alive was sent.
    until: Instant,
    /// Whether `node/NODE_ID` is attached to this lease yet.
    announced: bool,
    /// The open keep-alive stream; dropped after any failure, so a late answer to an
    /// abandoned keep-alive is never taken for the next one's.
    keeper: Option<(LeaseKeeper, LeaseKeepAliveStream)>,
}

impl ReplicaLease {
    pub(super) fn none() -> ReplicaLease {
        ReplicaLease {
            id: 0,
            ttl: 0,
            until: Instant::now(),
            announced: false,
            keeper: None,
        }
    }
}

/// What one keep-alive found.
enum KeptAlive {
    /// The lease lives on for this many seconds.
    For(i64),
    /// etcd no longer has the lease: it expired, and every key on it is gone.
    Gone,
}

impl EtcdStore {
    /// Grants this replica a new etcd lease (every account lease on the old one is lost)
    /// and announces the replica on it.
    pub(super) async fn grant_replica_lease(&self) -> Result<(), StoreError> {
        let mut lease = self.lease.lock().await;
        self.grant(&mut lease).await?;
        self.announce(&mut lease).await
    }

    async fn grant(&self, lease: &mut ReplicaLease) -> Result<(), StoreError> {
        let whole = self.lease_ttl.as_secs() + u64::from(self.lease_ttl.subsec_nanos() > 0);
        let ttl = i64::try_from(whole).unwrap_or(i64::MAX);
        let sent = Instant::now();
        let answer = self
            .call("lease grant", || {
                let mut leases = self.client.lease_client();
                async move { leases.grant(ttl, None).await }
            })
            .await?;
        *lease = ReplicaLease {
            id: answer.id(),
            ttl: answer.ttl(),
            until: sent + secs(answer.ttl()),
            announced: false,
            keeper: None,
        };
        Ok(())
    }

    /// Puts `node/NODE_ID` on the lease once: `replicas()` lists the live ones.
    async fn announce(&self, lease: &mut ReplicaLease) -> Result<(), StoreError> {
        if lease.announced {
            return Ok(());
        }
        let options = PutOptions::new().with_lease(lease.id);
        let key = self.keys.node(&self.node_id);
        self.put(
            "announce replica",
            key,
            self.node_id.as_str(),
            Some(options),
        )
        .await?;
        lease.announced = true;
        Ok(())
    }

    /// One keep-alive of this replica's etcd lease, or a new lease when etcd has lost
    /// it. Returns the lease's id and how long it lives at the least.
    async fn keep_alive(&self) -> Result<(Instant, i64), StoreError> {
        let mut lease = self.lease.lock().await;
        let deadline = Instant::now() + self.timeout;
        let (sent, kept) = loop {
            let sent = Instant::now();
            // A keep-alive is idempotent: a stream that broke (its member died) is opened
            // again at once, on whichever member answers.
            let on_open_stream = lease.keeper.is_some();
            match tokio::time::timeout_at(deadline, keep_alive_once(self, &mut lease)).await {
                Ok(Err(e))
                    if (on_open_stream || refused(&e))
                        && Instant::now() + RETRY_PAUSE < deadline =>
                {
                    lease.keeper = None;
                    tokio::time::sleep(RETRY_PAUSE).await;
                }
                Ok(Ok(kept)) => break (sent, Ok(kept)),
                Ok(Err(e)) => {
                    break (
                        sent,
                        Err(self.unavailable(format!("lease keep-alive: {e}"))),
                    );
                }
                Err(_) => break (sent, Err(self.timed_out("lease keep-alive"))),
            }
        };
        match kept {
            Ok(KeptAlive::For(ttl)) => lease.until = sent + secs(ttl),
            Ok(KeptAlive::Gone) => {
                tracing::warn!(
                    node_id = %self.node_id,
                    "the etcd lease of this replica expired: its account leases are lost; taking a new one"
                );
                self.grant(&mut lease).await?;
            }
            Err(e) => {
                lease.keeper = None;
                return Err(e);
            }
        }
        self.announce(&mut lease).await?;
        Ok((lease.until, lease.id))
    }

    /// The lease to attach a new key to, kept alive first when it might expire before
    /// the request that uses it is answered.
    async fn live_lease(&self) -> Result<(Instant, i64), StoreError> {
        {
            let lease = self.lease.lock().await;
            if lease.id != 0 && lease.until > Instant::now() + self.timeout {
                return Ok((lease.until, lease.id));
            }
        }
        self.keep_alive().await
    }

    pub(super) async fn acquire_lease(
        &self,
        account: &AccountName,
        _held: Option<Lease>,
    ) -> Result<LeaseGrant, StoreError> {
        let (until, id) = self.live_lease().await?;
        let key = self.keys.lease(account);
        let take = Txn::new()
            .when([Compare::create_revision(key.as_str(), CompareOp::Equal, 0)])
            .and_then([
                TxnOp::put(
                    key.as_str(),
                    self.node_id.as_str(),
                    Some(PutOptions::new().with_lease(id)),
                ),
                TxnOp::get(key.as_str(), None),
            ])
            .or_else([TxnOp::get(key.as_str(), None)]);
        let answer = self.txn("acquire lease", take).await?;
        let Some(kv) = first_kv(&answer) else {
            // Both branches read the key in the same txn that found it or wrote it.
            return Err(self.unavailable(format!("acquire lease: no key {key} in the answer")));
        };
        // Ours on our live etcd lease: taken now, still held, or taken by an attempt
        // whose answer was lost (a timeout) — the key's create revision is the epoch in
        // every case. The same node id on another etcd lease is a previous run of this
        // replica whose lease has not expired yet: not ours.
        if kv.value() == self.node_id.as_bytes() && kv.lease() == id {
            return Ok(LeaseGrant::Held(Lease {
                epoch: epoch(kv.create_revision()),
                until,
            }));
        }
        Ok(LeaseGrant::HeldBy(
            String::from_utf8_lossy(kv.value()).into_owned(),
        ))
    }

    /// One keep-alive, then one read of every lease key: those still ours (our node id,
    /// our etcd lease, the epoch held) come back with the new validity.
    pub(super) async fn renew_leases(
        &self,
        held: &[(AccountName, Lease)],
    ) -> Result<Vec<(AccountName, Lease)>, StoreError> {
        let (until, id) = self.keep_alive().await?;
        if held.is_empty() {
            return Ok(Vec::new());
        }
        let options = GetOptions::new().with_prefix();
        let answer = self
            .get("renew leases", &self.keys.leases(), Some(options))
            .await?;
        let ours: HashMap<AccountName, u64> = answer
            .kvs()
            .iter()
            .filter(|kv| kv.value() == self.node_id.as_bytes() && kv.lease() == id)
            .filter_map(|kv| {
                Some((
                    self.keys.lease_account(kv.key())?,
                    epoch(kv.create_revision()),
                ))
            })
            .collect();
        Ok(held
            .iter()
            .filter(|(account, lease)| ours.get(account) == Some(&lease.epoch))
            .map(|(account, lease)| {
                (
                    account.clone(),
                    Lease {
                        epoch: lease.epoch,
                        until,
                    },
                )
            })
            .collect())
    }

    /// Deletes the lease key if it is still the one of `lease.epoch`.
    pub(super) async fn release_lease(
        &self,
        account: &AccountName,
        lease: Lease,
    ) -> Result<(), StoreError> {
        let key = self.keys.lease(account);
        let release = Txn::new()
            .when([Compare::create_revision(
                key.as_str(),
                CompareOp::Equal,
                revision(lease.epoch),
            )])
            .and_then([TxnOp::delete(key.as_str(), None)]);
        self.txn("release lease", release).await.map(drop)
    }
}

/// Sends one keep-alive on the open stream (opening one if needed) and reads its answer.
async fn keep_alive_once(
    store: &EtcdStore,
    lease: &mut ReplicaLease,
) -> Result<KeptAlive, etcd_client::Error> {
    if lease.id == 0 {
        return Ok(KeptAlive::Gone);
    }
    if let Some((keeper, stream)) = lease.keeper.as_mut() {
        keeper.keep_alive().await?;
        return match stream.message().await? {
            Some(answer) if answer.ttl() > 0 => Ok(KeptAlive::For(answer.ttl())),
            Some(_) => Ok(KeptAlive::Gone),
            None => Err(etcd_client::Error::LeaseKeepAliveError(
                "the keep-alive stream ended".into(),
            )),
        };
    }
    // Opening the stream is itself one keep-alive: the lease lives its granted TTL again.
    match store.client.lease_client().keep_alive(lease.id).await {
        Ok(opened) => {
            lease.keeper = Some(opened);
            Ok(KeptAlive::For(lease.ttl))
        }
        Err(etcd_client::Error::LeaseKeepAliveError(m)) if m.contains("not found") => {
            Ok(KeptAlive::Gone)
        }
        Err(e) => Err(e),
    }
}

fn secs(ttl: i64) -> Duration {
    Duration::from_secs(u64::try_from(ttl).unwrap_or(0))
}

/// An etcd revision as a lease epoch (revisions start at 1).
fn epoch(create_revision: i64) -> u64 {
    u64::try_from(create_revision).unwrap_or(0)
}

/// A lease epoch as an etcd revision.
pub(super) fn revision(epoch: u64) -> i64 {
    i64::try_from(epoch).unwrap_or(i64::MAX)
}
