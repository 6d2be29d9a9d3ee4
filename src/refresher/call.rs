//! Getting a turn at the provider and making the call: a due refresh waits for its turn
//! before it is built, then marks a rotation in flight and sends.

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use super::{Called, Refresher, STOP_GRACE, until_stopped};
use crate::config::{AccountConfig, Grant};
use crate::provider::{ProviderError, TokenGrant, Turn};

impl Refresher {
    /// A turn at the token endpoint for the refresh that is due, waited for before that
    /// refresh is built. When thousands of accounts are due at once (a cold start, the
    /// end of an outage), each then waits holding this small future, not its whole
    /// refresh (about 2.6 KB each: 26 MB of peak memory at 10,000 accounts). `None` when
    /// no refresh is due, the endpoint is still to be discovered, or the stop came first;
    /// the refresh then waits for its turn inside, as a demanded one does.
    pub(super) async fn early_turn(
        &self,
        cancel: &CancellationToken,
    ) -> Option<Result<Turn, ProviderError>> {
        let due = self.refresh_due() && self.refresh_grant_ready();
        let config = self.config();
        if !due || config.token_url.is_none() {
            return None;
        }
        self.turn_unless_stopped(&config, cancel).await
    }

    /// A turn at `config`'s token endpoint, or `None` when the stop comes first.
    async fn turn_unless_stopped(
        &self,
        config: &AccountConfig,
        cancel: &CancellationToken,
    ) -> Option<Result<Turn, ProviderError>> {
        tokio::select! {
            biased;
            _ = cancel.cancelled() => None,
            turn = self.deps.provider.token_turn(config) => Some(turn),
        }
    }

    pub(super) fn refresh_due(&self) -> bool {
        self.next_wake().is_some_and(|t| t <= self.deps.clock.now()) && self.needs_reauth.is_none()
    }

    /// Whether a refresh has what its grant needs (a refresh token, for that grant).
    fn refresh_grant_ready(&self) -> bool {
        !matches!(self.config().grant, Grant::RefreshToken { .. })
            || self.state.refresh_token.is_some()
    }

    /// Discovers the token endpoint if need be, waits for a turn at the provider, marks
    /// a rotation in flight, and asks for a token.
    pub(super) async fn call_provider(
        &mut self,
        grant: TokenGrant<'_>,
        early: Option<Result<Turn, ProviderError>>,
        cancel: &CancellationToken,
    ) -> Called {
        if self.config().token_url.is_none() {
            // Discovery rotates nothing: a stop abandons it at once.
            let discovered = tokio::select! {
                biased;
                _ = cancel.cancelled() => return None,
                found = self.discover() => found,
            };
            if !discovered {
                return None;
            }
        }
        let config = self.config();
        // Queued behind the provider host's limits (after a cold start or an outage, with
        // thousands of accounts due) until a slot and a start time are free.
        let turn = match early {
            Some(turn) => turn,
            None => self.turn_unless_stopped(&config, cancel).await?,
        };
        // A shared store's holder calls only when the call and its commit fit in its lease.
        let config = self.within_lease(config).await?;

        // A crash between the provider rotating the refresh token and our save would lose
        // it; the mark lets the next start know to retry at once, inside the provider's
        // reuse window.
        let rotating = matches!(config.grant, Grant::RefreshToken { .. });
        if rotating && turn.is_ok() && self.state.refresh_in_flight_since.is_none() {
            self.state.refresh_in_flight_since = Some(self.deps.clock.now());
            self.save().await;
            if self.fenced || (self.deps.lease.is_some() && self.saving.unsaved) {
                // The mark is not in the shared record: a call now could rotate the
                // token with no replica knowing it was in flight.
                return None;
            }
        }

        let started = Instant::now();
        self.last_call = Some(started);
        let url = config.token_url.as_ref().map(|u| u.as_str());
        debug!(account = %config.name, grant = grant.as_str(), url = url.unwrap_or("-"), "requesting a token");
        let result = match turn {
            Ok(turn) => {
                let request = self.deps.provider.request_token_in(turn, &config, grant);
                until_stopped(request, cancel).await.or_else(|| {
                    // The provider may have rotated: the in-flight mark stays on disk, and
                    // the next start recovers as it does after a crash.
                    warn!(account = %config.name, grace_s = STOP_GRACE.as_secs(), "stopping: abandoned a token request that did not finish within the grace; the next start retries it");
                    None
                })?
            }
            Err(e) => Err(e),
        };
        Some((result, started.elapsed()))
    }
}
