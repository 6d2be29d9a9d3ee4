//! The refresher as a shared store's lease holder: it calls the provider only when the
//! call and its commit fit in its lease, serves a new token only once committed, and
//! parks a token it obtained but could not commit (fenced out) for the next holder.

use std::sync::Arc;
use std::time::Duration;

use tracing::{error, info, warn};

use super::Refresher;
use crate::config::AccountConfig;
use crate::provider::ErrorClass;
use crate::store::{Handoff, LeaseGrant, NewChain};
use crate::token_cell::Served;

/// The shortest provider call worth starting: a lease with less left than this (beyond
/// the commit's share) is renewed first, or the call waits.
const MIN_CALL: Duration = Duration::from_secs(1);

/// What a holder keeps back from its lease for the commit after a provider call: a
/// fifth of the lease, from 1 s to 5 s.
pub fn commit_margin(lease_ttl: Duration) -> Duration {
    (lease_ttl / 5).clamp(Duration::from_secs(1), Duration::from_secs(5))
}

impl Refresher {
    /// `config`, with its request timeout cut so that the call and the commit after it
    /// end within this replica's lease, renewed first. `None`: no call now (the lease
    /// is gone, or the store cannot renew it); a retry is planned.
    pub(super) async fn within_lease(
        &mut self,
        config: Arc<AccountConfig>,
    ) -> Option<Arc<AccountConfig>> {
        let Some(lease) = self.deps.lease.as_ref() else {
            return Some(config);
        };
        let held = *lease.borrow();
        let name = &config.name;
        let renewed = match held {
            None => Err("this replica no longer holds the account's lease".to_string()),
            Some(l) => match self.deps.store.acquire(name, Some(l)).await {
                Ok(LeaseGrant::Held(l)) => Ok(l),
                Ok(LeaseGrant::HeldBy(node)) => {
                    Err(format!("the account's lease moved to replica {node}"))
                }
                Err(e) => Err(format!("cannot renew the account's lease: {e}")),
            },
        };
        let budget = renewed.and_then(|l| {
            let left = l
                .until
                .saturating_duration_since(tokio::time::Instant::now());
            let margin = commit_margin(self.deps.store.lease_ttl());
            left.checked_sub(margin)
                .filter(|b| *b >= MIN_CALL)
                .ok_or_else(|| {
                    format!(
                        "the lease has {}ms left, too little for a call and its commit",
                        left.as_millis()
                    )
                })
        });
        match budget {
            Ok(budget) if budget >= config.limits.timeout => Some(config),
            Ok(budget) => {
                let mut cut = (*config).clone();
                cut.limits.timeout = budget;
                Some(Arc::new(cut))
            }
            Err(reason) => {
                warn!(account = %name, reason = %reason, "not calling the provider");
                self.backoff.attempt = self.backoff.attempt.saturating_add(1);
                self.retry_later(ErrorClass::Transient, None, reason, "", Duration::ZERO);
                None
            }
        }
    }

    /// Serves the access token of `state` (just committed).
    pub(super) fn serve_state_access(&mut self) {
        let config = self.config();
        if let Some(access) = &self.state.access {
            self.served = Some(Arc::new(Served::new(&config.name, access, &config.headers)));
        }
    }

    /// A save that failed earlier has landed: in a shared store, the token it carries
    /// may be served only now.
    pub(super) async fn committed_late(&mut self) {
        if self.deps.lease.is_none() {
            return;
        }
        let newer = match (&self.state.access, &self.served) {
            (Some(a), Some(s)) => a.expires_at > s.expires_at,
            (Some(_), None) => true,
            (None, _) => false,
        };
        if newer {
            self.serve_state_access();
            self.write_sinks().await;
            self.spawn_hook();
        }
    }

    /// The provider rotated the refresh token but this replica lost the fence before
    /// committing it: the new chain is left as a handoff, which the account's next holder
    /// applies, instead of being dropped (dropped, the account would be locked out).
    /// Retried until it lands or the daemon stops.
    pub(super) async fn park(&mut self) {
        let config = self.config();
        let name = &config.name;
        let Some(refresh_token) = self.state.refresh_token.clone() else {
            return;
        };
        let chain = NewChain {
            spent: self.state.spent.last().cloned(),
            refresh_token,
            refresh_token_expires_at: self.state.refresh_token_expires_at,
            access: self.state.access.clone(),
        };
        let handoff = Handoff::RefreshToken(chain);
        let mut delay = Duration::from_millis(200);
        for attempt in 1..=10 {
            match self.deps.store.put_handoff(name, &handoff).await {
                Ok(()) => {
                    info!(account = %name, "parked the refresh token obtained after losing the lease: the account's holder adopts it");
                    return;
                }
                Err(e) => {
                    warn!(account = %name, error = %e, attempt, "cannot park the rotated refresh token yet; retrying");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(5));
                }
            }
        }
        error!(account = %name, "could not park the rotated refresh token: the account will need re-authorization (tokend login {name})");
    }
}
