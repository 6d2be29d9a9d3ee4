//! Several replicas, one set of accounts: per account, a task that follows what the
//! account's lease holder commits (`follower`) until this replica takes the lease from
//! the `keeper`, then runs the account's refresher with every save fenced on that lease
//! (`fenced`), and follows again when the lease is lost or given back.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::config::AccountConfig;
use crate::refresher::{Deps, Refresher, commit_margin};
use crate::token_cell::{AccountHandle, DemandReceiver};

mod fenced;
mod follower;
mod keeper;

pub use keeper::{Keeper, Seat};

/// One account of a replica sharing its store.
pub struct Account {
    pub config: Arc<AccountConfig>,
    pub handle: Arc<AccountHandle>,
    pub seat: Seat,
    pub keeper: Arc<Keeper>,
    /// The refresher's dependencies; its `store` is the shared store itself (the holder's
    /// refresher gets it fenced).
    pub deps: Deps,
}

/// Why a holder's refresher ended.
enum Ended {
    /// The lease was lost, fenced out or given back.
    Lost,
    /// A handoff arrived: the refresher starts again and applies it.
    Handoff,
    Stopped,
}

impl Account {
    /// Follows, holds, follows…, until `cancel`; a lease held then is given back so that
    /// another replica takes the account at once instead of after the lease's expiry.
    pub async fn run(mut self, cancel: CancellationToken) {
        let name = self.config.name.clone();
        let demands = Arc::new(DemandReceiver::new(self.handle.clone()));
        loop {
            follower::Follower {
                config: self.config.clone(),
                handle: &self.handle,
                demands: &demands,
                store: self.deps.store.as_ref(),
                clock: &self.deps.clock,
            }
            .run(&mut self.seat, &cancel)
            .await;
            if cancel.is_cancelled() {
                break;
            }
            let Some(lease) = *self.seat.lease.borrow() else {
                continue;
            };
            self.await_parked(&cancel).await;
            loop {
                match self.hold(&demands, &cancel).await {
                    Ended::Handoff => continue,
                    Ended::Lost => {
                        self.give_back(lease).await;
                        break;
                    }
                    Ended::Stopped => {
                        self.give_back(lease).await;
                        self.keeper.leave(&name);
                        return;
                    }
                }
            }
        }
        self.keeper.leave(&name);
    }

    /// Runs the account's refresher while this replica holds the lease.
    async fn hold(&mut self, demands: &Arc<DemandReceiver>, cancel: &CancellationToken) -> Ended {
        let store = self.deps.store.clone();
        let deps = Deps {
            store: Arc::new(fenced::Fenced::new(store, self.seat.lease.clone())),
            lease: Some(self.seat.lease.clone()),
            ..self.deps.clone()
        };
        let refresher = Refresher::prepare_in(
            self.handle.clone(),
            demands.clone(),
            self.config.clone(),
            deps,
        )
        .await;
        let stop = cancel.child_token();
        let mut run = std::pin::pin!(refresher.run(stop.clone()));
        let mut ended = None;
        loop {
            tokio::select! {
                _ = &mut run => break,
                changed = self.seat.lease.changed(), if ended.is_none() => {
                    if changed.is_err() || self.seat.lease.borrow().is_none() {
                        ended = Some(Ended::Lost);
                        stop.cancel();
                    }
                }
                _ = self.seat.handoffs.notified(), if ended.is_none() => {
                    ended = Some(Ended::Handoff);
                    stop.cancel();
                }
                _ = cancel.cancelled(), if ended.is_none() => ended = Some(Ended::Stopped),
            }
        }
        match ended {
            Some(e) => e,
            None if cancel.is_cancelled() => Ended::Stopped,
            // The refresher stopped by itself: fenced out.
            None => Ended::Lost,
        }
    }

    /// A record left with a rotation in flight by the previous holder: that holder may
    /// still be committing, or parking the token it got (its call was bounded to end
    /// within its lease, less the commit's share). Give it that share before the
    /// refresher starts and, finding no parked token, treats the mark as a crash.
    async fn await_parked(&self, cancel: &CancellationToken) {
        let store = self.deps.store.as_ref();
        let name = &self.config.name;
        let in_flight =
            matches!(store.load(name).await, Ok(Some(s)) if s.refresh_in_flight_since.is_some());
        if !in_flight || store.has_handoff(name).await.unwrap_or(false) {
            return;
        }
        let grace = commit_margin(store.lease_ttl()) + Duration::from_secs(1);
        info!(account = %name, grace_ms = grace.as_millis() as u64, "the previous holder left a refresh in flight; giving it time to park its token");
        tokio::select! {
            _ = cancel.cancelled() => {}
            _ = tokio::time::sleep(grace) => {}
        }
    }

    /// Gives the lease back in the store, if it is still ours, and tells the keeper.
    async fn give_back(&self, lease: crate::store::Lease) {
        let name = &self.config.name;
        if let Err(e) = self.deps.store.release(name, lease).await {
            warn!(account = %name, error = %e, "cannot give the account's lease back; it expires by itself");
        }
        self.keeper.lost(name);
    }
}
