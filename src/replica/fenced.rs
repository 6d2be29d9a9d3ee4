//! The store as a lease holder's refresher sees it: every save is fenced on the
//! replica's current lease for the account, so the refresher (and the handoff and seed
//! code it runs) needs no notion of leases to stay safe.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::sync::{broadcast, watch};

use crate::config::AccountName;
use crate::store::{
    Change, Handoff, Lease, LeaseGrant, Spent, SpentKind, State, Store, StoreError, StoreFuture,
};

pub struct Fenced {
    inner: Arc<dyn Store>,
    lease: watch::Receiver<Option<Lease>>,
    /// The last save's outcome is unknown (the store did not answer): the record's
    /// version is read again before the next fenced save, else a write that did land
    /// would make the retry look stale.
    doubt: AtomicBool,
}

impl Fenced {
    pub fn new(inner: Arc<dyn Store>, lease: watch::Receiver<Option<Lease>>) -> Fenced {
        Fenced {
            inner,
            lease,
            doubt: AtomicBool::new(false),
        }
    }

    fn current(&self, account: &AccountName) -> Result<Lease, StoreError> {
        let current = *self.lease.borrow();
        current.ok_or_else(|| StoreError::Fenced {
            account: account.clone(),
            epoch: 0,
        })
    }
}

impl Store for Fenced {
    fn load<'a>(&'a self, account: &'a AccountName) -> StoreFuture<'a, Option<State>> {
        self.inner.load(account)
    }

    fn save<'a>(&'a self, account: &'a AccountName, state: &'a State) -> StoreFuture<'a, ()> {
        Box::pin(async move {
            let lease = self.current(account)?;
            if self.doubt.load(Ordering::Relaxed) {
                // Only this replica writes the record while it holds the lease: what is
                // there now is either our last write or the one before it.
                self.inner.load(account).await?;
            }
            let saved = self.inner.save_fenced(account, state, lease).await;
            let unknown = matches!(&saved, Err(e) if !matches!(e, StoreError::Fenced { .. }));
            self.doubt.store(unknown, Ordering::Relaxed);
            saved
        })
    }

    fn remove<'a>(&'a self, account: &'a AccountName) -> StoreFuture<'a, ()> {
        // A logout's removal: only while this replica still holds the account.
        match self.current(account) {
            Ok(_) => self.inner.remove(account),
            Err(e) => Box::pin(async move { Err(e) }),
        }
    }

    fn location(&self, account: &AccountName) -> String {
        self.inner.location(account)
    }

    fn has_handoff<'a>(&'a self, account: &'a AccountName) -> StoreFuture<'a, bool> {
        self.inner.has_handoff(account)
    }

    fn load_handoff<'a>(&'a self, account: &'a AccountName) -> StoreFuture<'a, Option<Handoff>> {
        self.inner.load_handoff(account)
    }

    fn put_handoff<'a>(
        &'a self,
        account: &'a AccountName,
        handoff: &'a Handoff,
    ) -> StoreFuture<'a, ()> {
        self.inner.put_handoff(account, handoff)
    }

    fn clear_handoff<'a>(&'a self, account: &'a AccountName) -> StoreFuture<'a, ()> {
        self.inner.clear_handoff(account)
    }

    fn record_spent<'a>(
        &'a self,
        account: &'a AccountName,
        fingerprint: &'a str,
        kind: SpentKind,
    ) -> StoreFuture<'a, ()> {
        self.inner.record_spent(account, fingerprint, kind)
    }

    fn spent<'a>(&'a self, fingerprint: &'a str) -> StoreFuture<'a, Option<Spent>> {
        self.inner.spent(fingerprint)
    }

    fn rename<'a>(&'a self, from: &'a AccountName, to: &'a AccountName) -> StoreFuture<'a, ()> {
        self.inner.rename(from, to)
    }

    fn set_aside<'a>(&'a self, account: &'a AccountName) -> StoreFuture<'a, Option<String>> {
        self.inner.set_aside(account)
    }

    fn drop_aside<'a>(&'a self, account: &'a AccountName, kept: &'a str) -> StoreFuture<'a, ()> {
        self.inner.drop_aside(account, kept)
    }

    fn shared(&self) -> bool {
        self.inner.shared()
    }

    fn node_id(&self) -> &str {
        self.inner.node_id()
    }

    fn lease_ttl(&self) -> Duration {
        self.inner.lease_ttl()
    }

    fn acquire<'a>(
        &'a self,
        account: &'a AccountName,
        held: Option<Lease>,
    ) -> StoreFuture<'a, LeaseGrant> {
        self.inner.acquire(account, held)
    }

    fn renew<'a>(
        &'a self,
        held: &'a [(AccountName, Lease)],
    ) -> StoreFuture<'a, Vec<(AccountName, Lease)>> {
        self.inner.renew(held)
    }

    fn release<'a>(&'a self, account: &'a AccountName, lease: Lease) -> StoreFuture<'a, ()> {
        self.inner.release(account, lease)
    }

    fn holder<'a>(&'a self, account: &'a AccountName) -> StoreFuture<'a, Option<String>> {
        self.inner.holder(account)
    }

    fn replicas(&self) -> StoreFuture<'_, Vec<String>> {
        self.inner.replicas()
    }

    fn save_fenced<'a>(
        &'a self,
        account: &'a AccountName,
        state: &'a State,
        lease: Lease,
    ) -> StoreFuture<'a, ()> {
        self.inner.save_fenced(account, state, lease)
    }

    fn subscribe(&self) -> broadcast::Receiver<Change> {
        self.inner.subscribe()
    }

    fn request_refresh<'a>(&'a self, account: &'a AccountName) -> StoreFuture<'a, ()> {
        self.inner.request_refresh(account)
    }

    fn check(&self) -> StoreFuture<'_, String> {
        self.inner.check()
    }
}
