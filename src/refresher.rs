//! One task per account: sleeps until the next refresh (or retry, or save retry), serves
//! readers' demands, and on each refresh does, in this order: mark the rotation in flight
//! → call the provider → persist the new state → publish the new token. Timing comes from
//! `schedule`; expiry is judged on the wall clock and re-planned when it jumps. At start
//! it applies a pending handoff (`tokend login`/`import`/`logout`/`state rename`), takes
//! the config's seed unless it was spent (`seed`), and an account that names only its
//! `issuer` discovers its token endpoint before its first refresh.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, error, info, warn};

use crate::clock::{Clock, rfc3339};
use crate::config::{AccountConfig, Grant};
use crate::provider::{ErrorClass, Provider, ProviderError, TokenGrant, TokenResponse, Turn};
use crate::schedule;
use crate::sinks;
use crate::store::{self, AccessToken, State, Store};
use crate::token_cell::{
    AccountHandle, Demand, DemandError, DemandReceiver, Served, Snapshot, Status,
};

mod call;
mod save;
mod seed;
mod shared;
use save::SaveRetry;
use seed::{LoadError, Origin, read_state};
pub use shared::commit_margin;

/// Everything a refresher needs from outside.
#[derive(Clone)]
pub struct Deps {
    pub store: Arc<dyn Store>,
    pub provider: Provider,
    pub clock: Clock,
    pub jumps: watch::Receiver<u64>,
    /// Shared by every account: bumped on each publish.
    pub changes: watch::Sender<u64>,
    /// Where rotation hooks run, so shutdown waits for them.
    pub tracker: TaskTracker,
    /// In a shared store, this replica's lease on the account, as the replica's lease
    /// keeper renews it (`None` once lost): every save is fenced on it, and the provider
    /// is called only when the call and its commit fit in it. `None` here: one process
    /// owns the store (the file backend) and no lease is needed.
    pub lease: Option<watch::Receiver<Option<store::Lease>>>,
}

/// The per-account task's state.
pub struct Refresher {
    handle: Arc<AccountHandle>,
    deps: Deps,
    demands: Arc<DemandReceiver>,
    /// A fenced save was refused: another replica holds the account now, and this
    /// refresher stops without writing or serving anything more.
    fenced: bool,
    /// What is (or must become) durable.
    state: State,
    saving: SaveRetry,
    served: Option<Arc<Served>>,
    plan: Plan,
    backoff: Backoff,
    last_error: Option<String>,
    /// Refreshing stops until a human acts and the account restarts (reload or handoff).
    needs_reauth: Option<String>,
    doubt: RotationDoubt,
    /// When the provider was last called, for the `min_interval` guard on demands.
    last_call: Option<Instant>,
    refreshing: bool,
    /// The last sink write failed.
    sink_error: Option<String>,
    /// One hook run at a time per account.
    hook_running: Arc<tokio::sync::Mutex<()>>,
}

/// The planned refresh of a healthy token.
#[derive(Debug, Default)]
struct Plan {
    at: Option<SystemTime>,
    /// `at` continues the account's schedule: it was planned from a token that a planned
    /// refresh obtained, or loaded with its plan still ahead. A refresh that does not (the
    /// first token, a re-seed, a crash recovery, a retry, a reader's demand, a plan overdue
    /// after a restart or a clock jump) plans its successor over the whole period instead,
    /// so accounts that refreshed together do not stay in step.
    on_schedule: bool,
}

/// Retrying after failed refreshes (or discoveries).
#[derive(Debug, Default)]
struct Backoff {
    /// Replaces the plan while set.
    retry_at: Option<SystemTime>,
    /// Failures in a row.
    attempt: u32,
    /// The provider's `Retry-After`, capped like the retry (at `slow_retry`): no call
    /// before it, not even a forced one.
    provider_not_before: Option<SystemTime>,
}

/// Why the provider may have rotated the refresh token without this process seeing the
/// new one: said when it then rejects the stored one.
#[derive(Debug, Default)]
struct RotationDoubt {
    /// The state was found with a rotation in flight: the process died mid-refresh.
    crashed: bool,
    /// A rotating request ended without a definitive answer (timeout, lost response).
    lost_response: bool,
}

impl RotationDoubt {
    fn any(&self) -> bool {
        self.crashed || self.lost_response
    }
}

/// What a refresh got from the provider, and how long the call took. `None` when nothing
/// was asked (discovery failed, or the refresher was stopped while waiting for a turn).
type Called = Option<(Result<TokenResponse, ProviderError>, Duration)>;

impl Refresher {
    /// Builds the refresher from the stored state (and the config's seed), publishes the
    /// initial snapshot, and returns the handle readers use.
    pub async fn prepare(
        config: Arc<AccountConfig>,
        deps: Deps,
    ) -> (Refresher, Arc<AccountHandle>) {
        let handle = Arc::new(AccountHandle::new(config.clone(), deps.changes.clone()));
        let demands = Arc::new(DemandReceiver::new(handle.clone()));
        let r = Refresher::prepare_in(handle.clone(), demands, config, deps).await;
        (r, handle)
    }

    /// Like [`Refresher::prepare`], for an account whose handle and demand queue live on
    /// across refreshers: a replica that (re)gains an account's lease.
    pub async fn prepare_in(
        handle: Arc<AccountHandle>,
        demands: Arc<DemandReceiver>,
        config: Arc<AccountConfig>,
        deps: Deps,
    ) -> Refresher {
        let read = read_state(&config, deps.store.as_ref()).await;
        let now = deps.clock.now();
        let (loaded, load_error, logged_out) = match read {
            Ok((loaded, load_error)) => {
                match store::apply_pending(&config, deps.store.as_ref(), loaded, now).await {
                    Ok((state, logged_out)) => (state, load_error, logged_out),
                    Err((state, e)) => {
                        let kept = load_error.and_then(|l| l.kept_as);
                        (
                            state,
                            Some(LoadError {
                                message: e,
                                kept_as: kept,
                            }),
                            false,
                        )
                    }
                }
            }
            Err(unreadable) => {
                let mut r = Refresher::new(handle, demands, deps, State::default());
                r.hold(unreadable);
                r.publish();
                return r;
            }
        };
        let origin = match (&loaded, load_error.as_ref().and_then(|l| l.kept_as.clone())) {
            (Some(_), _) => Origin::Stored,
            (None, Some(kept_as)) => Origin::KeptAside(kept_as),
            (None, None) => Origin::Missing,
        };
        let mut r = Refresher::new(handle, demands, deps, loaded.unwrap_or_default());
        r.last_error = load_error.map(|l| l.message);
        r.adopt_seed(now, origin).await;
        if logged_out && r.state.refresh_token.is_none() {
            r.hold(format!(
                "logged out (tokend logout): run `tokend login {}` to authorize the account again",
                config.name
            ));
        }
        if r.state.refresh_in_flight_since.is_some() {
            warn!(account = %config.name, "the last run stopped with a refresh in flight; retrying at once with the stored refresh token");
            r.doubt.crashed = true;
            r.plan.at = Some(now);
        }
        r.serve_stored(now);
        r.publish();
        r
    }

    fn new(
        handle: Arc<AccountHandle>,
        demands: Arc<DemandReceiver>,
        deps: Deps,
        state: State,
    ) -> Refresher {
        Refresher {
            demands,
            fenced: false,
            handle,
            deps,
            state,
            saving: SaveRetry::default(),
            served: None,
            plan: Plan::default(),
            backoff: Backoff::default(),
            last_error: None,
            needs_reauth: None,
            doubt: RotationDoubt::default(),
            last_call: None,
            refreshing: false,
            sink_error: None,
            hook_running: Arc::new(tokio::sync::Mutex::new(())),
        }
    }

    /// The account's config, discovered endpoints included.
    fn config(&self) -> Arc<AccountConfig> {
        Arc::clone(&self.handle.config())
    }

    /// Refreshing stops until a human acts: `reason` says what to do.
    fn hold(&mut self, reason: String) {
        self.needs_reauth = Some(reason.clone());
        self.last_error = Some(reason);
    }

    /// Serves the stored access token, if any, and plans its refresh unless one is due
    /// already (a re-seed, a crash recovery).
    fn serve_stored(&mut self, now: SystemTime) {
        let config = self.config();
        let Some(access) = &self.state.access else {
            return;
        };
        self.served = Some(Arc::new(Served::new(&config.name, access, &config.headers)));
        if self.plan.at.is_none() {
            // The normal plan from the token's own issue time: persisted tokens were
            // issued at whatever phases the last run left (spread, if it ran long
            // enough), and a restart does not bunch them. A spread draw from the issue
            // time would land in the past for some and refresh them all at start.
            let at = self.plan_refresh(access, true);
            // An overdue plan is refreshed at once, alongside every other overdue
            // account: that refresh is not on schedule.
            self.plan = Plan {
                at: Some(at),
                on_schedule: at > now,
            };
        }
        info!(account = %config.name, expires_at = %rfc3339(access.expires_at), "loaded a persisted access token");
    }

    /// When to refresh `access`: by the normal plan when it was obtained on schedule,
    /// else anywhere in the whole period (see [`schedule::spread_refresh_delay`]).
    fn plan_refresh(&self, access: &AccessToken, on_schedule: bool) -> SystemTime {
        let lifetime = access
            .expires_at
            .duration_since(access.issued_at)
            .unwrap_or(Duration::ZERO);
        let policy = &self.config().refresh;
        let delay = if on_schedule {
            schedule::refresh_delay(lifetime, policy, rand::random())
        } else {
            schedule::spread_refresh_delay(lifetime, policy, rand::random())
        };
        access.issued_at + delay
    }

    /// The refresher's loop; returns on cancellation after saving anything unsaved.
    ///
    /// Every refresh, save and sink write is boxed while it runs: the task's own state
    /// then holds only a pointer while it sleeps, which is nearly all the time, instead of
    /// room for the largest of those futures (~2 KB per account, thousands of accounts).
    #[expect(
        clippy::manual_async_fn,
        reason = "an async fn would hold `self` twice"
    )]
    pub fn run(mut self, cancel: CancellationToken) -> impl Future<Output = ()> + Send + 'static {
        // An `async` block over `self`, not an `async fn`: an async fn moves its arguments
        // into locals and its state keeps room for both copies (rust-lang/rust#62958).
        async move {
            if self.saving.unsaved {
                Box::pin(self.save()).await;
            }
            // A token carried over from the last run goes to the sinks too (no hook: this is
            // not a refresh).
            if self
                .served
                .as_ref()
                .is_some_and(|t| t.satisfies(self.deps.clock.now(), Duration::ZERO))
            {
                Box::pin(self.write_sinks()).await;
                self.publish();
            }
            let mut watch_jumps = true;
            loop {
                let wake = self.next_wake();
                let sleep = async {
                    match wake {
                        Some(at) => tokio::time::sleep(self.deps.clock.until(at)).await,
                        None => std::future::pending().await,
                    }
                };
                tokio::select! {
                    biased;
                    _ = cancel.cancelled() => break,
                    demand = self.demands.recv() => Box::pin(self.on_demand(demand, &cancel)).await,
                    changed = self.deps.jumps.changed(), if watch_jumps => {
                        // Re-plan: the loop recomputes the sleep from the wall clock. A jump
                        // forward makes every account's plan due at once: not on schedule.
                        if changed.is_err() {
                            watch_jumps = false;
                        } else if self.plan.at.is_some_and(|t| t <= self.deps.clock.now()) {
                            self.plan.on_schedule = false;
                        }
                    }
                    _ = sleep => {
                        let turn = Box::pin(self.early_turn(&cancel)).await;
                        Box::pin(self.on_timer(turn, &cancel)).await;
                    }
                }
                if self.fenced {
                    break;
                }
            }
            if self.saving.unsaved && !self.fenced {
                Box::pin(self.save()).await;
            }
            debug!(account = %self.config().name, "refresher stopped");
            // Readers waiting on this refresher get a clear answer (`Gone`), not a timeout.
            drop(self.demands);
        }
    }

    fn next_wake(&self) -> Option<SystemTime> {
        let refresh = if self.needs_reauth.is_some() {
            None
        } else if self.backoff.retry_at.is_some() {
            self.backoff.retry_at
        } else if self.served.is_none() {
            Some(self.deps.clock.now())
        } else {
            self.plan.at
        };
        match (refresh, self.saving.due_at()) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    async fn on_timer(
        &mut self,
        turn: Option<Result<Turn, ProviderError>>,
        cancel: &CancellationToken,
    ) {
        let now = self.deps.clock.now();
        if self.saving.due_at().is_some_and(|t| t <= now) {
            self.save().await;
            self.publish();
        }
        if self.refresh_due() {
            let on_schedule =
                self.plan.on_schedule && self.backoff.retry_at.is_none() && self.served.is_some();
            self.refresh(on_schedule, turn, cancel).await;
        }
    }

    async fn on_demand(&mut self, demand: Demand, cancel: &CancellationToken) {
        let now = self.deps.clock.now();
        if !demand.force
            && let Some(t) = self
                .served
                .as_ref()
                .filter(|t| t.satisfies(now, demand.min_valid))
        {
            let _ = demand.reply.send(Ok(t.clone()));
            return;
        }
        if let Some(reason) = &self.needs_reauth {
            let _ = demand
                .reply
                .send(Err(DemandError::NeedsReauth(reason.clone())));
            return;
        }
        if !demand.force
            && let Some(retry_at) = self.backoff.retry_at.filter(|t| *t > now)
        {
            let _ = demand.reply.send(Err(DemandError::Failing {
                error: self.last_error.clone().unwrap_or_default(),
                retry_in: retry_at.duration_since(now).unwrap_or_default(),
            }));
            return;
        }
        // Forced or not (an operator's `tokend refresh`), no call while the provider's
        // `Retry-After` is in force: it asked, and ignoring it invites a ban.
        if let Some(retry_in) = self
            .backoff
            .provider_not_before
            .and_then(|t| t.duration_since(now).ok())
            .filter(|d| !d.is_zero())
        {
            let _ = demand.reply.send(Err(DemandError::RetryAfter {
                error: self.last_error.clone().unwrap_or_default(),
                retry_in,
            }));
            return;
        }
        // Forced or not, one account calls the provider at most once per min_interval:
        // neither a reader nor an operator script can turn into a refresh storm.
        let min_interval = self.config().refresh.min_interval;
        if let Some(ago) = self
            .last_call
            .map(|t| t.elapsed())
            .filter(|ago| *ago < min_interval)
        {
            // After a failed call, say it failed, never that the token is fresh.
            let failed = (self.backoff.retry_at.is_some() || self.served.is_none())
                .then(|| self.last_error.clone().unwrap_or_default());
            let error = match (&self.served, self.backoff.retry_at) {
                _ if demand.force => DemandError::TooSoon {
                    ago,
                    min_interval,
                    failed,
                },
                (Some(t), None) => DemandError::TooShort {
                    lifetime: t.lifetime,
                    left: t.valid_for(now),
                    min_valid: demand.min_valid,
                },
                (_, retry_at) => DemandError::Failing {
                    error: failed.unwrap_or_default(),
                    retry_in: retry_at
                        .and_then(|t| t.duration_since(now).ok())
                        .unwrap_or(min_interval.saturating_sub(ago)),
                },
            };
            let _ = demand.reply.send(Err(error));
            return;
        }
        let mut waiting = vec![demand];
        let refreshed = self.refresh(false, None, cancel).await;
        // Every reader that queued up during the refresh shares its result.
        while let Some(d) = self.demands.try_recv() {
            waiting.push(d);
        }
        let now = self.deps.clock.now();
        for d in waiting {
            let answer = if !refreshed && cancel.is_cancelled() {
                // Stopped while waiting for a turn at the provider: nothing was asked.
                Err(DemandError::Gone)
            } else {
                self.answer(&d, refreshed, now)
            };
            let _ = d.reply.send(answer);
        }
    }

    /// What a reader who demanded a token gets after the refresh it waited for.
    fn answer(
        &self,
        demand: &Demand,
        refreshed: bool,
        now: SystemTime,
    ) -> Result<Arc<Served>, DemandError> {
        let failing = || DemandError::Failing {
            error: self.last_error.clone().unwrap_or_default(),
            retry_in: self
                .backoff
                .retry_at
                .and_then(|t| t.duration_since(now).ok())
                .unwrap_or_default(),
        };
        match (&self.served, &self.needs_reauth) {
            (_, Some(reason)) => Err(DemandError::NeedsReauth(reason.clone())),
            // Whoever forced a refresh learns that it failed, valid old token or not.
            _ if demand.force && !refreshed => Err(failing()),
            (Some(t), _) if t.satisfies(now, demand.min_valid) => Ok(t.clone()),
            _ if !refreshed => Err(failing()),
            (Some(t), _) => Err(DemandError::TooShort {
                lifetime: t.lifetime,
                left: t.valid_for(now),
                min_valid: demand.min_valid,
            }),
            (None, _) => Err(failing()),
        }
    }

    /// One refresh: mark → call → persist → publish. True when a new token was obtained.
    /// `on_schedule`: this is the planned refresh of the current token (see [`Plan`]).
    /// A refresh still waiting for its turn at the provider when `cancel` fires is
    /// abandoned: nothing has been sent, so nothing can be lost.
    async fn refresh(
        &mut self,
        on_schedule: bool,
        turn: Option<Result<Turn, ProviderError>>,
        cancel: &CancellationToken,
    ) -> bool {
        let refresh_token = self.state.refresh_token.clone();
        let grant = match (&self.config().grant, &refresh_token) {
            (Grant::ClientCredentials, _) => TokenGrant::ClientCredentials,
            (Grant::JwtBearer(_), _) => TokenGrant::JwtBearer,
            (Grant::RefreshToken { .. }, Some(rt)) => TokenGrant::RefreshToken(rt),
            (Grant::RefreshToken { .. }, None) => return false,
        };
        self.refreshing = true;
        self.publish();
        let called = self.call_provider(grant, turn, cancel).await;
        self.refreshing = false;
        let ok = match called {
            None => false,
            Some((Ok(response), elapsed)) => {
                self.adopt(response, on_schedule, elapsed).await;
                true
            }
            Some((Err(e), elapsed)) => {
                self.on_refresh_error(e, elapsed).await;
                false
            }
        };
        self.publish();
        ok
    }

    /// Takes the provider's answer: persisted (a rotated refresh token is durable before
    /// the access token is served), served, written to the sinks, and the next refresh
    /// planned.
    async fn adopt(&mut self, response: TokenResponse, on_schedule: bool, elapsed: Duration) {
        let config = self.config();
        let now = self.deps.clock.now();
        let lifetime = response.lifetime(now, &config.refresh);
        let rotated = response
            .refresh_token
            .as_ref()
            .is_some_and(|new| Some(new) != self.state.refresh_token.as_ref());
        if rotated {
            if let Some(old) = self.state.refresh_token.take() {
                self.state.remember_spent(&old);
            }
            self.state.refresh_token = response.refresh_token.clone();
            self.state.refresh_token_issued_at = Some(now);
            self.state.refresh_token_expires_at = None;
        }
        if let Some(rt_life) = response.refresh_token_expires_in {
            self.state.refresh_token_expires_at = Some(now + rt_life);
        }
        let access = AccessToken {
            token: response.access_token,
            token_type: response.token_type,
            expires_at: now + lifetime,
            // RFC 6749 §5.1: an omitted scope is the scope requested.
            scope: response.scope.or_else(|| config.scope.clone()),
            issued_at: now,
        };
        self.plan = Plan {
            at: Some(self.plan_refresh(&access, on_schedule)),
            on_schedule: true,
        };
        let expires_at = access.expires_at;
        self.state.access = Some(access);
        self.state.refresh_in_flight_since = None;
        self.state.last_refresh = Some(now);
        self.backoff = Backoff::default();
        self.last_error = None;
        self.doubt = RotationDoubt::default();
        // The chain a handoff replaced was kept until this one refreshed here.
        let replaced = self.state.replaced.take();
        // Durable before served: a rotated refresh token is on disk before anyone can act
        // on the new access token. If the disk refuses, the token is served from memory
        // all the same (the old refresh token is dead anyway) and the save is retried; the
        // account shows `degraded` until it lands.
        self.save().await;
        if self.fenced {
            // Another replica holds the account: it adopts the new chain from the store.
            self.park().await;
            return;
        }
        if let Some(kept) = replaced {
            self.drop_replaced(kept).await;
        }
        if self.deps.lease.is_some() && self.saving.unsaved {
            // Shared store: served only once committed (the retried save serves it), so
            // no replica ever serves a token the others cannot find.
            warn!(account = %config.name, "refreshed, but the commit to the shared store failed: the new token is served once it lands");
            return;
        }
        self.serve_state_access();
        self.write_sinks().await;
        self.spawn_hook();
        if let Some(w) = self.snapshot_warning(now) {
            warn!(account = %config.name, "{w}");
        }
        crate::metrics::record_refresh(config.name.as_str(), "ok", elapsed);
        info!(
            account = %config.name,
            outcome = "ok",
            expires_at = %rfc3339(expires_at),
            lifetime_s = lifetime.as_secs(),
            rotated,
            took_ms = elapsed.as_millis() as u64,
            "refreshed"
        );
    }

    /// Drops the copy of the chain a handoff replaced, once the state that no longer
    /// names it is durable (else it is named again, for the next refresh to drop).
    async fn drop_replaced(&mut self, kept: String) {
        let name = self.config().name.clone();
        if self.saving.unsaved {
            self.state.replaced = Some(kept);
            return;
        }
        match self.deps.store.drop_aside(&name, &kept).await {
            Ok(()) => {
                info!(account = %name, kept = %kept, "the handed-over chain refreshed: removed the copy of the chain it replaced")
            }
            Err(e) => {
                warn!(account = %name, error = %e, "cannot remove the copy of the replaced chain; delete it by hand")
            }
        }
    }

    /// A refresh failed: a rejected refresh token holds the account for re-authorization;
    /// anything else is retried (see [`Refresher::retry_later`]).
    async fn on_refresh_error(&mut self, e: ProviderError, elapsed: Duration) {
        let config = self.config();
        let name = &config.name;
        let rotating = matches!(config.grant, Grant::RefreshToken { .. });
        self.backoff.attempt = self.backoff.attempt.saturating_add(1);
        let now = self.deps.clock.now();
        let retry_after = e.retry_after().map(|ra| ra.delay_from(now));
        self.backoff.provider_not_before =
            retry_after.map(|delay| now + delay.min(config.refresh.slow_retry));
        let message = e.to_string();
        match e.class() {
            ErrorClass::InvalidGrant if rotating => {
                let reason = if self.doubt.any() {
                    format!(
                        "the provider rejected the refresh token ({message}) after a refresh was interrupted (crash or lost response): the rotated refresh token was lost; re-authorize the account (tokend login {name})"
                    )
                } else {
                    format!(
                        "the provider rejected the refresh token ({message}); re-authorize the account (tokend login {name})"
                    )
                };
                crate::metrics::record_refresh(name.as_str(), "needs_reauth", elapsed);
                error!(account = %name, outcome = "needs_reauth", error = %message, "refresh token rejected; refreshing stops until the config or state changes");
                self.hold(reason);
                self.backoff.retry_at = None;
            }
            class => {
                // Only an OAuth error is a definitive "not done"; after anything else the
                // provider may have rotated the token.
                if class == ErrorClass::Transient {
                    self.doubt.lost_response |= rotating && e.oauth_error().is_none();
                }
                let hint = match (e.oauth_error(), &config.grant) {
                    (Some("invalid_client"), _) => {
                        " (check client_id, client_auth and its client_secret, private_key, client_assertion or client_certificate)"
                    }
                    // No refresh token was refused: the assertion was (its key, iss, sub or
                    // aud, or the account's registration at the provider).
                    (Some("invalid_grant"), Grant::JwtBearer(_)) => {
                        " (check the assertion: credentials_file or private_key, assertion_issuer, assertion_subject, assertion_audience, and the account's registration at the provider)"
                    }
                    _ => "",
                };
                self.retry_later(class, retry_after, message, hint, elapsed);
            }
        }
        // An OAuth error answer means the provider did not rotate anything: the in-flight
        // mark can go, so a restart does not mistake this for a crash.
        if rotating && e.oauth_error().is_some() && self.state.refresh_in_flight_since.is_some() {
            self.state.refresh_in_flight_since = None;
            self.save().await;
        }
    }

    async fn write_sinks(&mut self) {
        let Some(served) = self.served.clone() else {
            return;
        };
        match sinks::write(&self.config(), &served, self.deps.clock.now()).await {
            Ok(()) => self.sink_error = None,
            Err(e) => self.sink_error = Some(e),
        }
    }

    /// The rotation hook runs beside the refresher (never delaying the next refresh), one
    /// run at a time per account, on the daemon's tracker so shutdown waits for it.
    fn spawn_hook(&self) {
        let config = self.config();
        let Some(hook) = config.on_refresh.clone() else {
            return;
        };
        let running = self.hook_running.clone();
        self.deps.tracker.spawn(async move {
            let _one_at_a_time = running.lock().await;
            let _ = sinks::run_hook(&config, &hook).await;
        });
    }

    fn snapshot_warning(&self, now: SystemTime) -> Option<String> {
        Snapshot {
            refresh_token_issued_at: self.state.refresh_token_issued_at,
            refresh_token_expires_at: self.state.refresh_token_expires_at,
            ..Snapshot::pending()
        }
        .refresh_token_warning(now)
    }

    /// Plans the retry after a failure: transient ones with backoff, others slowly.
    fn retry_later(
        &mut self,
        class: ErrorClass,
        retry_after: Option<Duration>,
        message: String,
        hint: &str,
        elapsed: Duration,
    ) {
        let config = self.config();
        let name = &config.name;
        let now = self.deps.clock.now();
        let policy = &config.refresh;
        let attempt = self.backoff.attempt;
        if class == ErrorClass::Transient {
            let delay = schedule::backoff(attempt - 1, policy, rand::random(), retry_after);
            crate::metrics::record_refresh(name.as_str(), "transient_error", elapsed);
            warn!(account = %name, outcome = "transient_error", error = %message, attempt, retry_in_ms = delay.as_millis() as u64, "refresh failed; retrying");
            self.backoff.retry_at = Some(now + delay);
            self.last_error = Some(message);
        } else {
            let delay = schedule::backoff(attempt - 1, policy, rand::random(), retry_after)
                // Jittered so accounts failing together do not retry together.
                .max(policy.slow_retry.mul_f64(1.0 + 0.1 * rand::random::<f64>()));
            crate::metrics::record_refresh(name.as_str(), "permanent_error", elapsed);
            error!(account = %name, outcome = "permanent_error", error = %message, retry_in_s = delay.as_secs(), "refresh rejected{hint}; retrying slowly");
            self.backoff.retry_at = Some(now + delay);
            self.last_error = Some(format!("{message}{hint}"));
        }
    }

    /// Fills the token endpoint from the issuer's metadata and publishes it with the
    /// account's config. On failure the account keeps serving nothing new and retries
    /// like a failed refresh.
    async fn discover(&mut self) -> bool {
        let started = Instant::now();
        let config = self.config();
        match crate::provider::discovery::discover(&self.deps.provider, &config).await {
            Ok(resolved) => {
                info!(account = %config.name, token_url = resolved.token_url.as_ref().map(|u| u.as_str()).unwrap_or("-"), "discovered the provider's endpoints");
                // Where readers (`GET /v1/accounts`) look too: one copy.
                self.handle.set_config(Arc::new(resolved));
                true
            }
            Err(e) => {
                self.backoff.attempt = self.backoff.attempt.saturating_add(1);
                let message = format!("discovery failed: {e}");
                self.retry_later(e.class(), None, message, "", started.elapsed());
                false
            }
        }
    }

    fn publish(&self) {
        let status = if self.needs_reauth.is_some() {
            Status::NeedsReauth
        } else if self.refreshing {
            Status::Refreshing
        } else if self.served.is_none() {
            Status::Pending
        } else if self.last_error.is_some()
            || self.saving.error.is_some()
            || self.sink_error.is_some()
        {
            Status::Degraded
        } else {
            Status::Ok
        };
        let last_error = self
            .last_error
            .clone()
            .or_else(|| self.saving.error.clone())
            .or_else(|| self.sink_error.clone());
        self.handle.publish(Snapshot {
            status,
            token: self.served.clone(),
            last_refresh: self.state.last_refresh,
            next_refresh: self.next_wake(),
            last_error,
            refresh_token_issued_at: self.state.refresh_token_issued_at,
            refresh_token_expires_at: self.state.refresh_token_expires_at,
        });
    }
}

/// How long a stop waits for a token request already sent: an answer within it is saved
/// (the rotated refresh token is kept); a provider that hangs longer is abandoned, so a
/// stop never waits for the whole request timeout.
pub const STOP_GRACE: Duration = Duration::from_secs(5);

/// `request`'s output, unless `cancel` fires and it then takes longer than [`STOP_GRACE`].
async fn until_stopped<T>(
    request: impl Future<Output = T>,
    cancel: &CancellationToken,
) -> Option<T> {
    let mut request = std::pin::pin!(request);
    tokio::select! {
        biased;
        done = &mut request => Some(done),
        _ = cancel.cancelled() => tokio::time::timeout(STOP_GRACE, request).await.ok(),
    }
}

#[cfg(all(test, feature = "demo"))]
mod tests {
    use super::*;
    use crate::config::{Config, SystemEnvironment};
    use crate::provider::Transport;
    use crate::store::FileStore;

    async fn refresher(dir: &tempfile::TempDir) -> (Refresher, Arc<AccountHandle>) {
        let text = format!(
            "[state]\ndir = \"{}\"\n\n[accounts.cc]\ngrant = \"client_credentials\"\ntoken_url = \"http://127.0.0.1/token\"\nclient_id = \"id\"\nclient_secret = \"secret\"\n",
            dir.path().display()
        );
        let config =
            Config::from_str_at(&text, std::path::Path::new("test.toml"), &SystemEnvironment)
                .unwrap();
        let account = config.accounts.values().next().unwrap().clone();
        let clock = Clock::system();
        let fake =
            crate::demo::fake_provider::FakeProvider::new(Duration::from_secs(60), clock.clone());
        let deps = Deps {
            store: FileStore::open(dir.path()).unwrap(),
            provider: Provider::new(Transport::InProcess(fake.router())),
            clock,
            jumps: watch::Sender::new(0).subscribe(),
            changes: watch::Sender::new(0),
            tracker: TaskTracker::new(),
            lease: None,
        };
        Refresher::prepare(account, deps).await
    }

    #[tokio::test]
    async fn a_sleeping_refresher_task_holds_little_beyond_its_own_state() {
        let dir = tempfile::tempdir().unwrap();
        let (r, _handle) = refresher(&dir).await;
        let own = std::mem::size_of_val(&r);
        let task = std::mem::size_of_val(&r.run(CancellationToken::new()));
        // The select's own futures (timer, cancellation, demands, clock jumps) take a few
        // hundred bytes; a refresh chain held inline took ~1.6 KB more, per account.
        assert!(
            task <= own + 768,
            "the run future is {task} B for {own} B of state: is a refresh future held inline?"
        );
    }

    #[tokio::test]
    async fn readers_get_a_clear_answer_once_the_refresher_is_gone() {
        let dir = tempfile::tempdir().unwrap();
        let (r, handle) = refresher(&dir).await;
        // Queued before the refresher ever ran; it then stops (shutdown, reload or a
        // panic all drop it).
        let waiting = tokio::spawn({
            let handle = handle.clone();
            async move {
                handle
                    .demand(Duration::ZERO, true, Duration::from_secs(60))
                    .await
            }
        });
        tokio::task::yield_now().await;
        drop(r);
        assert!(matches!(waiting.await.unwrap(), Err(DemandError::Gone)));
        let late = handle
            .demand(Duration::ZERO, true, Duration::from_secs(60))
            .await;
        assert!(matches!(late, Err(DemandError::Gone)));
    }
}
