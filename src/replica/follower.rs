//! An account this replica does not hold: it serves what the holder committed, read
//! from the store whenever the change feed says the record changed (and on a slow poll),
//! and passes readers' demands for a fresher token on to the holder.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::time::Instant;
use tracing::warn;

use super::keeper::{POLL, Seat};
use crate::clock::Clock;
use crate::config::AccountConfig;
use crate::store::{State, Store};
use crate::token_cell::{
    AccountHandle, Demand, DemandError, DemandReceiver, Served, Snapshot, Status,
};

/// How long a follower waits for the holder's fresher token before answering a demand
/// that it failed (the reader's own timeout may come first).
const DEMAND_WAIT: Duration = Duration::from_secs(30);

pub struct Follower<'a> {
    pub config: Arc<AccountConfig>,
    pub handle: &'a AccountHandle,
    pub demands: &'a DemandReceiver,
    pub store: &'a dyn Store,
    pub clock: &'a Clock,
}

struct Waiting {
    demand: Demand,
    /// The expiry of the token served when it arrived: a forced demand wants another.
    before: Option<SystemTime>,
    deadline: Instant,
}

impl Follower<'_> {
    /// Serves the committed record until this replica gets the account's lease or `stop`
    /// ends. Demands still waiting then are answered with what there is.
    pub async fn run(&self, seat: &mut Seat, stop: &tokio_util::sync::CancellationToken) {
        // What this replica served so far (as the holder, or before a restart of this
        // task) stays served until the store says otherwise.
        let mut served: Option<Arc<Served>> = self.handle.snapshot().token.clone();
        let mut waiting: Vec<Waiting> = Vec::new();
        self.reload(&mut served).await;
        let mut poll = tokio::time::interval_at(Instant::now() + POLL, POLL);
        loop {
            if seat.lease.borrow().is_some() {
                break;
            }
            let next_deadline = waiting.iter().map(|w| w.deadline).min();
            tokio::select! {
                biased;
                _ = stop.cancelled() => break,
                _ = seat.lease.changed() => continue,
                _ = seat.records.changed() => self.reload(&mut served).await,
                _ = seat.store_up.changed() => {
                    if *seat.store_up.borrow() {
                        self.reload(&mut served).await;
                    } else {
                        let state = None;
                        self.publish(state, served.clone(), Some("the state store is unreachable: serving the last committed token while it is valid".into()));
                    }
                }
                _ = poll.tick() => self.reload(&mut served).await,
                demand = self.demands.recv() => {
                    if let Some(w) = self.on_demand(demand, served.as_ref()).await {
                        waiting.push(w);
                    }
                }
                _ = sleep_until(next_deadline) => {}
            }
            self.answer(&mut waiting, served.as_ref(), false);
        }
        self.answer(&mut waiting, served.as_ref(), true);
    }

    /// Reads the record and publishes it; a store that cannot be read leaves the token
    /// served as it was (valid until it expires) and marks the account degraded.
    async fn reload(&self, served: &mut Option<Arc<Served>>) {
        let name = &self.config.name;
        let (state, error) = match self.store.load(name).await {
            Ok(state) => (state, None),
            Err(e) => {
                warn!(account = %name, error = %e, "cannot read the account's record from the state store");
                (None, Some(format!("the state store cannot be read: {e}")))
            }
        };
        if let Some(access) = state.as_ref().and_then(|s| s.access.as_ref()) {
            let newer = served
                .as_ref()
                .is_none_or(|s| access.expires_at != s.expires_at);
            if newer {
                *served = Some(Arc::new(Served::new(name, access, &self.config.headers)));
            }
        }
        self.publish(state.as_ref(), served.clone(), error);
    }

    fn publish(&self, state: Option<&State>, token: Option<Arc<Served>>, error: Option<String>) {
        let previous = self.handle.snapshot();
        let status = match (&token, &error) {
            (None, _) => Status::Pending,
            (Some(_), Some(_)) => Status::Degraded,
            (Some(_), None) => Status::Ok,
        };
        self.handle.publish(Snapshot {
            status,
            token,
            last_refresh: state.and_then(|s| s.last_refresh).or(previous.last_refresh),
            // The holder plans refreshes; a follower has none of its own.
            next_refresh: None,
            last_error: error,
            refresh_token_issued_at: state
                .and_then(|s| s.refresh_token_issued_at)
                .or(previous.refresh_token_issued_at),
            refresh_token_expires_at: state
                .and_then(|s| s.refresh_token_expires_at)
                .or(previous.refresh_token_expires_at),
        });
    }

    /// Answers a demand the committed token meets; otherwise asks the holder (through
    /// the store) and keeps it waiting for the holder's commit.
    async fn on_demand(&self, demand: Demand, served: Option<&Arc<Served>>) -> Option<Waiting> {
        let now = self.clock.now();
        if !demand.force
            && let Some(t) = served.filter(|t| t.satisfies(now, demand.min_valid))
        {
            let _ = demand.reply.send(Ok(t.clone()));
            return None;
        }
        if let Err(e) = self.store.request_refresh(&self.config.name).await {
            let _ = demand.reply.send(Err(DemandError::Failing {
                error: format!("cannot reach the account's holder through the state store: {e}"),
                retry_in: Duration::from_secs(1),
            }));
            return None;
        }
        Some(Waiting {
            demand,
            before: served.map(|t| t.expires_at),
            deadline: Instant::now() + DEMAND_WAIT,
        })
    }

    /// Answers the waiting demands the served token meets now, and those past their
    /// deadline (or all, when `all`) with a failure.
    fn answer(&self, waiting: &mut Vec<Waiting>, served: Option<&Arc<Served>>, all: bool) {
        let now = self.clock.now();
        let instant = Instant::now();
        let mut still = Vec::new();
        for w in waiting.drain(..) {
            let met = served.filter(|t| {
                t.satisfies(now, w.demand.min_valid)
                    && (!w.demand.force || Some(t.expires_at) != w.before)
            });
            if let Some(t) = met {
                let _ = w.demand.reply.send(Ok(t.clone()));
            } else if all || w.deadline <= instant || w.demand.reply.is_closed() {
                let _ = w.demand.reply.send(Err(DemandError::Failing {
                    error: "the replica holding the account has not committed a fresher token"
                        .into(),
                    retry_in: Duration::from_secs(1),
                }));
            } else {
                still.push(w);
            }
        }
        *waiting = still;
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}
