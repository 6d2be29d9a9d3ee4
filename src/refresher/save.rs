//! Persisting an account's state: a failed save keeps the state in memory and is
//! retried with backoff until it lands; a fenced one (a shared store's lease lost) stops
//! the refresher.

use std::time::{Duration, SystemTime};

use tracing::{error, info, warn};

use super::Refresher;
use crate::config::RefreshPolicy;
use crate::schedule;
use crate::store;

/// Whether the store is behind `state`, and the retry of a failed save: it is retried with
/// backoff until it lands.
#[derive(Debug, Default)]
pub(super) struct SaveRetry {
    /// `state` differs from what the store holds.
    pub(super) unsaved: bool,
    /// Why the last save failed; cleared when one lands.
    pub(super) error: Option<String>,
    attempt: u32,
    at: Option<SystemTime>,
}

impl SaveRetry {
    /// When the next save is due, if one is.
    pub(super) fn due_at(&self) -> Option<SystemTime> {
        self.unsaved.then_some(self.at).flatten()
    }

    /// A save landed; true when it ends a run of failures.
    fn landed(&mut self) -> bool {
        std::mem::take(self).error.is_some()
    }

    /// A save failed: the next one is due after a delay that grows with each failure.
    fn failed(&mut self, error: String, policy: &RefreshPolicy, now: SystemTime) -> Duration {
        let delay = schedule::backoff(self.attempt, policy, 1.0, None).max(Duration::from_secs(1));
        self.attempt = self.attempt.saturating_add(1);
        self.error = Some(error);
        self.at = Some(now + delay);
        delay
    }
}

impl Refresher {
    /// Persists `state`; on failure it stays in memory and the save is retried.
    pub(super) async fn save(&mut self) {
        self.saving.unsaved = true;
        let config = self.config();
        let name = &config.name;
        match self.deps.store.save(name, &self.state).await {
            Ok(()) => {
                if self.saving.landed() {
                    info!(account = %name, "state saved again after earlier failures");
                    self.committed_late().await;
                }
            }
            Err(e @ store::StoreError::Fenced { .. }) => {
                crate::metrics::record_fenced_write(name.as_str());
                warn!(account = %name, error = %e, "another replica holds the account now; this one stops refreshing it");
                self.fenced = true;
            }
            Err(e) => {
                crate::metrics::record_persist_failure(name.as_str());
                let now = self.deps.clock.now();
                let delay = self.saving.failed(e.to_string(), &config.refresh, now);
                error!(account = %name, error = %e, retry_in_s = delay.as_secs(), "cannot persist the account state; keeping it in memory and retrying");
            }
        }
    }
}
