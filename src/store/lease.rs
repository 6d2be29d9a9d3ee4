//! The shared-store half of the [`Store`](super::Store) contract: per-account refresh
//! leases, the fence every holder's write carries, and the change feed followers serve
//! from. The file store implements it in memory (its directory lock already makes one
//! process the only writer); PostgreSQL and etcd implement it across replicas.

use tokio::time::Instant;

use crate::config::AccountName;

/// This replica's claim on one account's refresh work. Only a holder calls the provider
/// for the account and writes its record, and every such write is fenced on `epoch`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lease {
    /// Grows with each new holder of the account's lease (PostgreSQL: the row's epoch;
    /// etcd: the lease key's create revision; the file store: a counter in memory).
    pub epoch: u64,
    /// Until when this replica may act on the lease, judged on its own monotonic clock
    /// conservatively: the store's expiry counted from *before* the request that granted
    /// or renewed it was sent. The store's own clock decides for the fence.
    pub until: Instant,
}

impl Lease {
    /// Whether the lease is still ours for at least `span` from now: a holder calls the
    /// provider only when the whole call and the commit after it fit.
    pub fn covers(&self, span: std::time::Duration) -> bool {
        self.until.checked_duration_since(Instant::now()) >= Some(span)
    }
}

/// The answer to an attempt to take (or renew) an account's lease.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LeaseGrant {
    /// This replica holds it.
    Held(Lease),
    /// Another replica holds it, named by its node id.
    HeldBy(String),
}

/// One event of a store's change feed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// `account`'s record was committed, by this replica or another.
    Record(AccountName),
    /// A handoff (`tokend login`/`import`/`logout`, or a token parked by a fenced-out
    /// holder) waits for `account`'s lease holder.
    Handoff(AccountName),
    /// A follower asked for a fresher token of `account` (a reader's `min_valid`).
    Demand(AccountName),
    /// `account`'s lease was released or expired: another replica may take it now.
    LeaseFreed(AccountName),
    /// The feed was interrupted (reconnect, compaction): anything may have changed, so
    /// subscribers read again what they serve.
    Resync,
}

/// Capacity of a store's change feed: a subscriber that falls further behind gets
/// `Lagged` and reads everything again, as after [`Change::Resync`].
pub const FEED_CAPACITY: usize = 4096;
