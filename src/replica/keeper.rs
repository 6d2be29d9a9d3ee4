//! One per replica: takes, renews and gives back the accounts' refresh leases in the
//! shared store (about an equal share each), and routes the store's change feed to the
//! accounts (records to followers, handoffs and demands to holders).

use std::collections::{BTreeMap, HashSet};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use rand::seq::SliceRandom;
use tokio::sync::{Notify, broadcast, watch};
use tokio::time::{Instant, MissedTickBehavior};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use crate::config::AccountName;
use crate::store::{Change, Lease, LeaseGrant, Store};
use crate::token_cell::AccountHandle;

/// What an account's task gets from the keeper.
pub struct Seat {
    /// This replica's lease on the account: `Some` while it holds it.
    pub lease: watch::Receiver<Option<Lease>>,
    /// Bumped when the account's record may have changed in the store.
    pub records: watch::Receiver<u64>,
    /// A handoff waits for the account (the holder applies it).
    pub handoffs: Arc<Notify>,
    /// Whether the store answered the keeper's last request.
    pub store_up: watch::Receiver<bool>,
}

struct Slot {
    lease: watch::Sender<Option<Lease>>,
    records: watch::Sender<u64>,
    handoffs: Arc<Notify>,
    handle: Arc<AccountHandle>,
    /// The node holding the lease, as last learned (`None`: free or unknown).
    holder: Option<String>,
    /// Given back for rebalancing: not taken again before this.
    not_before: Option<Instant>,
}

pub struct Keeper {
    store: Arc<dyn Store>,
    slots: Mutex<BTreeMap<AccountName, Slot>>,
    /// Demands forwarded from followers run here, so shutdown waits for them.
    tracker: TaskTracker,
    store_up: watch::Sender<bool>,
}

/// How often a follower re-reads its record even when the feed is quiet: the safety net
/// under a lost notification.
pub const POLL: Duration = Duration::from_secs(30);

/// Every how many sweeps every account not held here is tried, whoever was last seen
/// holding it (a lease lost without a release or an expiry event).
const FULL_SWEEP_EVERY: u32 = 10;

impl Keeper {
    pub fn new(store: Arc<dyn Store>, tracker: TaskTracker) -> Arc<Keeper> {
        Arc::new(Keeper {
            store,
            slots: Mutex::default(),
            tracker,
            store_up: watch::Sender::new(true),
        })
    }

    fn slots(&self) -> std::sync::MutexGuard<'_, BTreeMap<AccountName, Slot>> {
        self.slots.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Registers an account; its lease is sought at the next sweep.
    pub fn join(&self, account: &AccountName, handle: Arc<AccountHandle>) -> Seat {
        let (lease, lease_rx) = watch::channel(None);
        let (records, records_rx) = watch::channel(0);
        let handoffs = Arc::new(Notify::new());
        self.slots().insert(
            account.clone(),
            Slot {
                lease,
                records,
                handoffs: handoffs.clone(),
                handle,
                holder: None,
                not_before: None,
            },
        );
        Seat {
            lease: lease_rx,
            records: records_rx,
            handoffs,
            store_up: self.store_up.subscribe(),
        }
    }

    /// Unregisters an account (its task has stopped and given its lease back).
    pub fn leave(&self, account: &AccountName) {
        self.slots().remove(account);
    }

    /// The account's task lost or gave back the lease (fenced out, or released).
    pub fn lost(&self, account: &AccountName) {
        if let Some(slot) = self.slots().get_mut(account) {
            slot.lease.send_replace(None);
            slot.holder = None;
            slot.handle.set_lease_holder(None, false);
        }
    }

    /// The keeper's loop: renews at a third of the lease's life, sweeps for leases to
    /// take (or give back) several times a second at most, and routes the change feed.
    pub async fn run(self: Arc<Self>, cancel: CancellationToken) {
        let ttl = self.store.lease_ttl();
        let mut renew = tokio::time::interval(ttl / 3);
        let mut sweep = tokio::time::interval(
            (ttl / 8).clamp(Duration::from_millis(250), Duration::from_secs(1)),
        );
        renew.set_missed_tick_behavior(MissedTickBehavior::Delay);
        sweep.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut feed = self.store.subscribe();
        let mut sweeps = 0u32;
        loop {
            tokio::select! {
                biased;
                _ = cancel.cancelled() => break,
                _ = renew.tick() => self.renew().await,
                change = feed.recv() => match change {
                    Ok(change) => self.dispatch(change).await,
                    Err(broadcast::error::RecvError::Lagged(_)) => self.dispatch(Change::Resync).await,
                    Err(broadcast::error::RecvError::Closed) => {
                        warn!("the state store's change feed ended; followers poll every {}s", POLL.as_secs());
                        feed = broadcast::channel(1).1;
                    }
                },
                _ = sweep.tick() => {
                    sweeps = sweeps.wrapping_add(1);
                    self.sweep(sweeps.is_multiple_of(FULL_SWEEP_EVERY)).await;
                }
            }
        }
    }

    /// Records whether the store answers: the metric, and the followers' status.
    fn set_store_up(&self, up: bool) {
        crate::metrics::set_store_up(up);
        self.store_up
            .send_if_modified(|was| std::mem::replace(was, up) != up);
    }

    /// Renews every lease held here in one request; those the store no longer grants
    /// (or that ran out while it could not be reached) are lost.
    async fn renew(&self) {
        let held: Vec<(AccountName, Lease)> = self
            .slots()
            .iter()
            .filter_map(|(a, s)| s.lease.borrow().map(|l| (a.clone(), l)))
            .collect();
        match self.store.renew(&held).await {
            Ok(renewed) => {
                self.set_store_up(true);
                let renewed: BTreeMap<AccountName, Lease> = renewed.into_iter().collect();
                let mut slots = self.slots();
                for (account, _) in &held {
                    let Some(slot) = slots.get_mut(account) else {
                        continue;
                    };
                    match renewed.get(account) {
                        Some(l) => {
                            slot.lease.send_replace(Some(*l));
                        }
                        None => {
                            warn!(account = %account, "lost the account's lease (the store no longer grants it)");
                            slot.lease.send_replace(None);
                            slot.holder = None;
                            slot.handle.set_lease_holder(None, false);
                        }
                    }
                }
            }
            Err(e) => {
                self.set_store_up(false);
                warn!(error = %e, "cannot renew leases");
                let now = Instant::now();
                for (account, slot) in self.slots().iter_mut() {
                    if slot.lease.borrow().is_some_and(|l| l.until <= now) {
                        warn!(account = %account, "the account's lease ran out while the store was unreachable; refreshing it stops here");
                        slot.lease.send_replace(None);
                        slot.holder = None;
                        slot.handle.set_lease_holder(None, false);
                    }
                }
            }
        }
    }

    /// Takes free leases up to this replica's share of the accounts, or gives back a few
    /// idle ones beyond it (a replica joined). `full`: try every account not held here.
    async fn sweep(&self, full: bool) {
        let replicas = match self.store.replicas().await {
            Ok(r) => r,
            Err(e) => {
                self.set_store_up(false);
                warn!(error = %e, "cannot list the replicas");
                return;
            }
        };
        let me = self.store.node_id().to_string();
        let alive: HashSet<&str> = replicas
            .iter()
            .map(String::as_str)
            .chain([me.as_str()])
            .collect();
        let (total, held) = {
            let slots = self.slots();
            let held = slots
                .values()
                .filter(|s| s.lease.borrow().is_some())
                .count();
            (slots.len(), held)
        };
        let share = total.div_ceil(alive.len());
        if held > share {
            self.give_back(held - share);
            return;
        }
        let now = Instant::now();
        let mut candidates: Vec<AccountName> = self
            .slots()
            .iter()
            .filter(|(_, s)| s.lease.borrow().is_none())
            .filter(|(_, s)| s.not_before.is_none_or(|t| t <= now))
            .filter(|(_, s)| {
                full || s
                    .holder
                    .as_deref()
                    .is_none_or(|h| !alive.contains(h) || h == me)
            })
            .map(|(a, _)| a.clone())
            .collect();
        candidates.shuffle(&mut rand::rng());
        let mut taken = held;
        for account in candidates {
            if taken >= share {
                break;
            }
            match self.take(&account).await {
                Ok(true) => taken += 1,
                Ok(false) => {}
                Err(()) => return,
            }
        }
        if full {
            self.learn_holders().await;
        }
    }

    /// Asks the store who holds the accounts whose holder this replica does not know
    /// (freed since, or never tried here): what `/v1/accounts` and `tokend status` show.
    async fn learn_holders(&self) {
        let unknown: Vec<AccountName> = self
            .slots()
            .iter()
            .filter(|(_, s)| s.holder.is_none() && s.lease.borrow().is_none())
            .map(|(a, _)| a.clone())
            .collect();
        for account in unknown {
            let Ok(holder) = self.store.holder(&account).await else {
                return;
            };
            if let Some(slot) = self.slots().get_mut(&account) {
                slot.handle.set_lease_holder(holder.clone(), false);
                slot.holder = holder;
            }
        }
    }

    /// Tries to take `account`'s lease. `Err`: the store did not answer.
    async fn take(&self, account: &AccountName) -> Result<bool, ()> {
        match self.store.acquire(account, None).await {
            Ok(LeaseGrant::Held(lease)) => {
                self.set_store_up(true);
                crate::metrics::record_lease_acquired(account.as_str());
                info!(account = %account, epoch = lease.epoch, "took the account's lease: this replica refreshes it");
                if let Some(slot) = self.slots().get_mut(account) {
                    slot.holder = Some(self.store.node_id().to_string());
                    slot.handle.set_lease_holder(slot.holder.clone(), true);
                    slot.lease.send_replace(Some(lease));
                }
                Ok(true)
            }
            Ok(LeaseGrant::HeldBy(node)) => {
                if let Some(slot) = self.slots().get_mut(account) {
                    slot.handle.set_lease_holder(Some(node.clone()), false);
                    slot.holder = Some(node);
                }
                Ok(false)
            }
            Err(e) => {
                self.set_store_up(false);
                warn!(account = %account, error = %e, "cannot take the account's lease");
                Err(())
            }
        }
    }

    /// Asks the tasks of up to a quarter of `excess` idle accounts held here (at least
    /// one) to give their leases back: their refreshers stop, then they release.
    fn give_back(&self, excess: usize) {
        let not_before = Instant::now() + self.store.lease_ttl();
        let mut slots = self.slots();
        let mut given = 0;
        for (account, slot) in slots.iter_mut() {
            if given >= excess.div_ceil(4) {
                break;
            }
            let idle = slot.handle.snapshot().status != crate::token_cell::Status::Refreshing;
            if slot.lease.borrow().is_some() && idle {
                info!(account = %account, "giving the account's lease back: another replica has fewer");
                slot.lease.send_replace(None);
                slot.not_before = Some(not_before);
                given += 1;
            }
        }
    }

    async fn dispatch(&self, change: Change) {
        match change {
            Change::Record(account) => {
                if let Some(slot) = self.slots().get(&account) {
                    slot.records.send_modify(|n| *n = n.wrapping_add(1));
                }
            }
            Change::Handoff(account) => {
                if let Some(slot) = self.slots().get(&account)
                    && slot.lease.borrow().is_some()
                {
                    slot.handoffs.notify_one();
                }
            }
            Change::Demand(account) => self.forward_demand(&account),
            Change::LeaseFreed(account) => {
                let free = self.slots().get_mut(&account).map(|slot| {
                    slot.holder = None;
                    slot.handle.set_lease_holder(None, false);
                    slot.lease.borrow().is_none()
                        && slot.not_before.is_none_or(|t| t <= Instant::now())
                });
                if free == Some(true) {
                    self.sweep(false).await;
                }
            }
            Change::Resync => {
                for slot in self.slots().values() {
                    slot.records.send_modify(|n| *n = n.wrapping_add(1));
                }
            }
        }
    }

    /// A follower asked for a fresher token: if this replica holds the account, its
    /// refresher gets a forced demand (still bound by `min_interval` and `Retry-After`).
    fn forward_demand(&self, account: &AccountName) {
        let handle = match self.slots().get(account) {
            Some(slot) if slot.lease.borrow().is_some() => slot.handle.clone(),
            _ => return,
        };
        self.tracker.spawn(async move {
            let _ = handle
                .demand(Duration::ZERO, true, Duration::from_secs(60))
                .await;
        });
    }
}
