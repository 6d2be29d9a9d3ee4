//! One task per account: sleeps until the next refresh (or retry, or save retry), serves
//! readers' demands, and on each refresh does, in this order: mark the rotation in flight
//! → call the provider → persist the new state → publish the new token. Timing comes from
//! `schedule`; expiry is judged on the wall clock and re-planned when it jumps. At start
//! it applies a pending handoff (`tokend login`/`import`/`logout`), and an account that
//! names only its `issuer` discovers its token endpoint before its first refresh.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, error, info, warn};

use crate::clock::{Clock, rfc3339};
use crate::config::{AccountConfig, Grant};
use crate::provider::{ErrorClass, Provider, TokenGrant, jwt_exp};
use crate::schedule;
use crate::sinks;
use crate::store::{AccessToken, Handoff, State, Store, StoreError};
use crate::token_cell::{
    AccountHandle, Demand, DemandError, DemandReceiver, Served, Snapshot, Status,
};

/// Everything a refresher needs from outside.
pub struct Deps {
    pub store: Arc<dyn Store>,
    pub provider: Provider,
    pub clock: Clock,
    pub jumps: watch::Receiver<u64>,
    /// Shared by every account: bumped on each publish.
    pub changes: watch::Sender<u64>,
    /// Where rotation hooks run, so shutdown waits for them.
    pub tracker: TaskTracker,
}

/// The per-account task's state.
pub struct Refresher {
    handle: Arc<AccountHandle>,
    deps: Deps,
    demands: DemandReceiver,
    /// What is (or must become) durable.
    state: State,
    /// `state` differs from what the store holds: a save failed and is retried.
    unsaved: bool,
    save_error: Option<String>,
    save_attempt: u32,
    save_retry_at: Option<SystemTime>,
    served: Option<Arc<Served>>,
    /// Planned refresh of a healthy token.
    refresh_at: Option<SystemTime>,
    /// `refresh_at` continues the account's schedule: it was planned from a token that a
    /// planned refresh obtained, or loaded with its plan still ahead. A refresh that does
    /// not (the first token, a re-seed, a crash recovery, a retry, a reader's demand, a
    /// plan overdue after a restart or a clock jump) plans its successor over the whole
    /// period instead, so accounts that refreshed together do not stay in step.
    planned: bool,
    /// Retry after a failed refresh; replaces `refresh_at` while set.
    retry_at: Option<SystemTime>,
    attempt: u32,
    last_error: Option<String>,
    needs_reauth: Option<String>,
    /// The state was found with a rotation in flight: the process died mid-refresh.
    recovering_crash: bool,
    /// A rotating request ended without a definitive answer (timeout, lost response):
    /// the provider may have rotated the refresh token without us seeing the new one.
    rotation_uncertain: bool,
    /// When the provider was last called, for the `min_interval` guard on demands.
    last_call: Option<Instant>,
    refreshing: bool,
    /// The last sink write failed.
    sink_error: Option<String>,
    /// One hook run at a time per account.
    hook_running: Arc<tokio::sync::Mutex<()>>,
}

impl Refresher {
    /// Builds the refresher from the stored state (and the config's seed), publishes the
    /// initial snapshot, and returns the handle readers use.
    pub async fn prepare(
        config: Arc<AccountConfig>,
        deps: Deps,
    ) -> (Refresher, Arc<AccountHandle>) {
        let handle = Arc::new(AccountHandle::new(config.clone(), deps.changes.clone()));
        let name = &config.name;
        let mut load_error = None;
        let mut unreadable = None;
        let loaded = match deps.store.load(name).await {
            Ok(state) => state,
            // The bad file was moved aside: starting from the seed loses nothing.
            Err(e @ StoreError::Corrupt { .. }) => {
                error!(account = %name, error = %e, "cannot load the persisted state; starting from the configured seed");
                load_error = Some(e.to_string());
                None
            }
            // The file may be fine and hold the only valid refresh token (a permission
            // or I/O problem): never overwrite it; wait for a human and a reload.
            Err(e) => {
                error!(account = %name, error = %e, "cannot read the persisted state; the account is held until this is fixed and tokend is reloaded");
                unreadable = Some(format!("{e}; fix it and reload (SIGHUP)"));
                None
            }
        };
        let now = deps.clock.now();
        let mut logged_out = false;
        let loaded = if unreadable.is_none() {
            match apply_handoff(&config, deps.store.as_ref(), loaded, now).await {
                Ok((state, out)) => {
                    logged_out = out;
                    state
                }
                Err((state, e)) => {
                    load_error = Some(e);
                    state
                }
            }
        } else {
            loaded
        };
        let mut r = Refresher {
            handle: handle.clone(),
            deps,
            demands: DemandReceiver::new(handle.clone()),
            state: loaded.unwrap_or_default(),
            unsaved: false,
            save_error: None,
            save_attempt: 0,
            save_retry_at: None,
            served: None,
            refresh_at: None,
            planned: false,
            retry_at: None,
            attempt: 0,
            last_error: load_error,
            needs_reauth: None,
            recovering_crash: false,
            rotation_uncertain: false,
            last_call: None,
            refreshing: false,
            sink_error: None,
            hook_running: Arc::new(tokio::sync::Mutex::new(())),
        };
        if let Some(reason) = unreadable {
            r.needs_reauth = Some(reason.clone());
            r.last_error = Some(reason);
            r.publish();
            return (r, handle);
        }
        r.adopt_seed(now);
        if logged_out && r.state.refresh_token.is_none() {
            let reason = format!(
                "logged out (tokend logout): run `tokend login {}` to authorize the account again",
                config.name
            );
            r.needs_reauth = Some(reason.clone());
            r.last_error = Some(reason);
        }
        if r.state.refresh_in_flight_since.is_some() {
            warn!(account = %name, "the last run stopped with a refresh in flight; retrying at once with the stored refresh token");
            r.recovering_crash = true;
            r.refresh_at = Some(now);
        }
        if let Some(access) = &r.state.access {
            r.served = Some(Arc::new(Served::new(&config.name, access, &config.headers)));
            if r.refresh_at.is_none() {
                // The normal plan from the token's own issue time: persisted tokens were
                // issued at whatever phases the last run left (spread, if it ran long
                // enough), and a restart does not bunch them. A spread draw from the issue
                // time would land in the past for some and refresh them all at start.
                let at = r.plan_refresh(access, true);
                // An overdue plan is refreshed at once, alongside every other overdue
                // account: that refresh is not on schedule.
                r.planned = at > now;
                r.refresh_at = Some(at);
            }
            info!(account = %name, expires_at = %rfc3339(access.expires_at), "loaded a persisted access token");
        }
        r.publish();
        (r, handle)
    }

    /// The account's config, discovered endpoints included.
    fn config(&self) -> Arc<AccountConfig> {
        Arc::clone(&self.handle.config())
    }

    /// The config's seed refresh token is used when nothing is stored, or when it differs
    /// from the seed the stored token descends from (the operator re-seeded).
    fn adopt_seed(&mut self, now: SystemTime) {
        let Grant::RefreshToken { seed } = &self.config().grant else {
            return;
        };
        if let Some(seed) = seed {
            let fingerprint = seed.fingerprint();
            let fresh_seed = self.state.seed_fingerprint.as_deref() != Some(fingerprint.as_str());
            if self.state.refresh_token.is_none() || fresh_seed {
                if self.state.refresh_token.is_some() {
                    info!(account = %self.config().name, "the configured refresh token changed; it replaces the stored one");
                }
                self.state.refresh_token = Some(seed.clone());
                self.state.seed_fingerprint = Some(fingerprint);
                self.state.refresh_token_issued_at = Some(now);
                self.state.refresh_in_flight_since = None;
                self.unsaved = true;
                // Tokens of the old chain may belong to another user or scope.
                self.refresh_at = Some(now);
            }
        }
        if self.state.refresh_token.is_none() {
            let reason = format!(
                "no refresh token: run `tokend login {0}` (or `tokend import {0}`), or set accounts.{0}.refresh_token in the config",
                self.config().name
            );
            self.needs_reauth = Some(reason.clone());
            self.last_error = Some(reason);
        }
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
            if self.unsaved {
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
                        } else if self.refresh_at.is_some_and(|t| t <= self.deps.clock.now()) {
                            self.planned = false;
                        }
                    }
                    _ = sleep => Box::pin(self.on_timer(&cancel)).await,
                }
            }
            if self.unsaved {
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
        } else if self.retry_at.is_some() {
            self.retry_at
        } else if self.served.is_none() {
            Some(self.deps.clock.now())
        } else {
            self.refresh_at
        };
        let save = self.unsaved.then_some(self.save_retry_at).flatten();
        match (refresh, save) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    async fn on_timer(&mut self, cancel: &CancellationToken) {
        let now = self.deps.clock.now();
        if self.unsaved && self.save_retry_at.is_some_and(|t| t <= now) {
            self.save().await;
            self.publish();
        }
        if self.next_wake().is_some_and(|t| t <= self.deps.clock.now())
            && self.needs_reauth.is_none()
        {
            let on_schedule = self.planned && self.retry_at.is_none() && self.served.is_some();
            self.refresh(on_schedule, cancel).await;
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
            && let Some(retry_at) = self.retry_at.filter(|t| *t > now)
        {
            let _ = demand.reply.send(Err(DemandError::Failing {
                error: self.last_error.clone().unwrap_or_default(),
                retry_in: retry_at.duration_since(now).unwrap_or_default(),
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
            let error = if demand.force {
                DemandError::TooSoon { ago, min_interval }
            } else {
                DemandError::TooShort {
                    valid_for: self
                        .served
                        .as_ref()
                        .map_or(Duration::ZERO, |t| t.valid_for(now)),
                    min_valid: demand.min_valid,
                }
            };
            let _ = demand.reply.send(Err(error));
            return;
        }
        let mut waiting = vec![demand];
        let refreshed = self.refresh(false, cancel).await;
        // Every reader that queued up during the refresh shares its result.
        while let Some(d) = self.demands.try_recv() {
            waiting.push(d);
        }
        let now = self.deps.clock.now();
        for d in waiting {
            if !refreshed && cancel.is_cancelled() {
                // Stopped while waiting for a turn at the provider: nothing was asked.
                let _ = d.reply.send(Err(DemandError::Gone));
                continue;
            }
            let failing = || DemandError::Failing {
                error: self.last_error.clone().unwrap_or_default(),
                retry_in: self
                    .retry_at
                    .and_then(|t| t.duration_since(now).ok())
                    .unwrap_or_default(),
            };
            let answer = match (&self.served, &self.needs_reauth) {
                (_, Some(reason)) => Err(DemandError::NeedsReauth(reason.clone())),
                // Whoever forced a refresh learns that it failed, valid old token or not.
                _ if d.force && !refreshed => Err(failing()),
                (Some(t), _) if t.satisfies(now, d.min_valid) => Ok(t.clone()),
                _ if !refreshed => Err(failing()),
                (t, _) => Err(DemandError::TooShort {
                    valid_for: t.as_ref().map_or(Duration::ZERO, |t| t.valid_for(now)),
                    min_valid: d.min_valid,
                }),
            };
            let _ = d.reply.send(answer);
        }
    }

    /// One refresh: mark → call → persist → publish. True when a new token was obtained.
    /// `on_schedule`: this is the planned refresh of the current token (see `planned`).
    /// A refresh still waiting for its turn at the provider when `cancel` fires is
    /// abandoned: nothing has been sent, so nothing can be lost.
    async fn refresh(&mut self, on_schedule: bool, cancel: &CancellationToken) -> bool {
        let name = self.config().name.clone();
        let rotating = matches!(self.config().grant, Grant::RefreshToken { .. });
        let refresh_token = self.state.refresh_token.clone();
        let grant = match (&self.config().grant, &refresh_token) {
            (Grant::ClientCredentials, _) => TokenGrant::ClientCredentials,
            (Grant::RefreshToken { .. }, Some(rt)) => TokenGrant::RefreshToken(rt),
            (Grant::RefreshToken { .. }, None) => return false,
        };
        self.refreshing = true;
        self.publish();
        if self.config().token_url.is_none() && !self.discover().await {
            self.refreshing = false;
            self.publish();
            return false;
        }
        let config = self.config();

        // Queued behind the provider host's limits (after a cold start or an outage, with
        // thousands of accounts due) until a slot and a start time are free.
        let turn = tokio::select! {
            biased;
            _ = cancel.cancelled() => None,
            turn = self.deps.provider.token_turn(&config) => Some(turn),
        };
        let Some(turn) = turn else {
            self.refreshing = false;
            self.publish();
            return false;
        };

        // A crash between the provider rotating the refresh token and our save would lose
        // it; the mark lets the next start know to retry at once, inside the provider's
        // reuse window.
        if rotating && turn.is_ok() && self.state.refresh_in_flight_since.is_none() {
            self.state.refresh_in_flight_since = Some(self.deps.clock.now());
            self.unsaved = true;
            self.save().await;
        }

        let started = Instant::now();
        self.last_call = Some(started);
        let url = config.token_url.as_ref().map(|u| u.as_str());
        debug!(account = %name, grant = grant.as_str(), url = url.unwrap_or("-"), "requesting a token");
        let result = match turn {
            Ok(turn) => {
                self.deps
                    .provider
                    .request_token_in(turn, &config, grant)
                    .await
            }
            Err(e) => Err(e),
        };
        let elapsed = started.elapsed();
        self.refreshing = false;
        let now = self.deps.clock.now();
        let ok = result.is_ok();
        match result {
            Ok(response) => {
                let lifetime = schedule::lifetime(
                    response.expires_in,
                    jwt_exp(response.access_token.expose()),
                    now,
                    &config.refresh,
                );
                let rotated = response
                    .refresh_token
                    .as_ref()
                    .is_some_and(|new| Some(new) != self.state.refresh_token.as_ref());
                if rotated {
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
                self.refresh_at = Some(self.plan_refresh(&access, on_schedule));
                self.planned = true;
                self.state.access = Some(access);
                self.state.refresh_in_flight_since = None;
                self.state.last_refresh = Some(now);
                self.retry_at = None;
                self.attempt = 0;
                self.last_error = None;
                self.recovering_crash = false;
                self.rotation_uncertain = false;
                // Durable before served: a rotated refresh token is on disk before anyone
                // can act on the new access token. If the disk refuses, the token is
                // served from memory all the same (the old refresh token is dead anyway)
                // and the save is retried; the account shows `degraded` until it lands.
                self.unsaved = true;
                self.save().await;
                let access = self.state.access.as_ref().expect("just set");
                let expires_at = access.expires_at;
                self.served = Some(Arc::new(Served::new(&config.name, access, &config.headers)));
                self.write_sinks().await;
                self.spawn_hook();
                let warning = self.snapshot_warning(now);
                if let Some(w) = &warning {
                    warn!(account = %name, "{w}");
                }
                crate::metrics::record_refresh(name.as_str(), "ok", elapsed);
                info!(
                    account = %name,
                    outcome = "ok",
                    expires_at = %rfc3339(expires_at),
                    lifetime_s = lifetime.as_secs(),
                    rotated,
                    took_ms = elapsed.as_millis() as u64,
                    "refreshed"
                );
            }
            Err(e) => {
                self.attempt = self.attempt.saturating_add(1);
                let retry_after = e.retry_after().map(|ra| ra.delay_from(now));
                let message = e.to_string();
                match e.class() {
                    ErrorClass::InvalidGrant if rotating => {
                        let reason = if self.recovering_crash || self.rotation_uncertain {
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
                        self.needs_reauth = Some(reason.clone());
                        self.last_error = Some(reason);
                        self.retry_at = None;
                    }
                    class => {
                        // Only an OAuth error is a definitive "not done"; after anything
                        // else the provider may have rotated the token.
                        if class == ErrorClass::Transient {
                            self.rotation_uncertain |= rotating && e.oauth_error().is_none();
                        }
                        let hint = match e.oauth_error() {
                            Some("invalid_client") => {
                                " (check client_id, client_secret and client_auth)"
                            }
                            _ => "",
                        };
                        self.retry_later(class, retry_after, message, hint, elapsed);
                    }
                }
                // An OAuth error answer means the provider did not rotate anything: the
                // in-flight mark can go, so a restart does not mistake this for a crash.
                if rotating
                    && e.oauth_error().is_some()
                    && self.state.refresh_in_flight_since.is_some()
                {
                    self.state.refresh_in_flight_since = None;
                    self.unsaved = true;
                    self.save().await;
                }
            }
        }
        self.publish();
        ok
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
        let Some(hook) = self.config().on_refresh.clone() else {
            return;
        };
        let config = self.config().clone();
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
        let name = self.config().name.clone();
        let now = self.deps.clock.now();
        let policy = &self.config().refresh;
        if class == ErrorClass::Transient {
            let delay = schedule::backoff(self.attempt - 1, policy, rand::random(), retry_after);
            crate::metrics::record_refresh(name.as_str(), "transient_error", elapsed);
            warn!(account = %name, outcome = "transient_error", error = %message, attempt = self.attempt, retry_in_ms = delay.as_millis() as u64, "refresh failed; retrying");
            self.retry_at = Some(now + delay);
            self.last_error = Some(message);
        } else {
            let delay = schedule::backoff(self.attempt - 1, policy, rand::random(), retry_after)
                // Jittered so accounts failing together do not retry together.
                .max(policy.slow_retry.mul_f64(1.0 + 0.1 * rand::random::<f64>()));
            crate::metrics::record_refresh(name.as_str(), "permanent_error", elapsed);
            error!(account = %name, outcome = "permanent_error", error = %message, retry_in_s = delay.as_secs(), "refresh rejected{hint}; retrying slowly");
            self.retry_at = Some(now + delay);
            self.last_error = Some(format!("{message}{hint}"));
        }
    }

    /// Fills the token endpoint from the issuer's metadata. On failure the account keeps
    /// serving nothing new and retries like a failed refresh.
    async fn discover(&mut self) -> bool {
        let started = Instant::now();
        match crate::discovery::discover(&self.deps.provider, &self.config()).await {
            Ok(resolved) => {
                info!(account = %self.config().name, token_url = resolved.token_url.as_ref().map(|u| u.as_str()).unwrap_or("-"), "discovered the provider's endpoints");
                // Published where readers (`GET /v1/accounts`) look, not kept aside.
                self.handle.set_config(Arc::new(resolved));
                true
            }
            Err(e) => {
                self.attempt = self.attempt.saturating_add(1);
                let message = format!("discovery failed: {e}");
                self.retry_later(e.class(), None, message, "", started.elapsed());
                false
            }
        }
    }

    async fn save(&mut self) {
        match self.deps.store.save(&self.config().name, &self.state).await {
            Ok(()) => {
                if self.save_error.take().is_some() {
                    info!(account = %self.config().name, "state saved again after earlier failures");
                }
                self.unsaved = false;
                self.save_attempt = 0;
                self.save_retry_at = None;
            }
            Err(e) => self.on_save_error(e),
        }
    }

    fn on_save_error(&mut self, e: StoreError) {
        crate::metrics::record_persist_failure(self.config().name.as_str());
        let delay = schedule::backoff(self.save_attempt, &self.config().refresh, 1.0, None)
            .max(Duration::from_secs(1));
        self.save_attempt = self.save_attempt.saturating_add(1);
        error!(account = %self.config().name, error = %e, retry_in_s = delay.as_secs(), "cannot persist the account state; keeping it in memory and retrying");
        self.save_error = Some(e.to_string());
        self.save_retry_at = Some(self.deps.clock.now() + delay);
    }

    fn publish(&self) {
        let status = if self.needs_reauth.is_some() {
            Status::NeedsReauth
        } else if self.refreshing {
            Status::Refreshing
        } else if self.served.is_none() {
            Status::Pending
        } else if self.last_error.is_some()
            || self.save_error.is_some()
            || self.sink_error.is_some()
        {
            Status::Degraded
        } else {
            Status::Ok
        };
        let last_error = self
            .last_error
            .clone()
            .or_else(|| self.save_error.clone())
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

/// Applies the account's pending handoff, if any, to the `loaded` state: the new state is
/// saved (or the record removed) before the handoff is cleared, so a crash in between
/// applies it again rather than losing it. Returns the state to start from and whether
/// the handoff was a logout; on failure, the state as it was and the error to show.
async fn apply_handoff(
    config: &AccountConfig,
    store: &dyn Store,
    loaded: Option<State>,
    now: SystemTime,
) -> Result<(Option<State>, bool), (Option<State>, String)> {
    let name = &config.name;
    let handoff = match store.load_handoff(name).await {
        Ok(Some(h)) => h,
        Ok(None) => return Ok((loaded, false)),
        Err(e) => {
            error!(account = %name, error = %e, "cannot read the handoff from tokend login/import/logout");
            return Err((loaded, e.to_string()));
        }
    };
    let seed_fingerprint = match &config.grant {
        Grant::RefreshToken { seed: Some(seed) } => Some(seed.fingerprint()),
        _ => None,
    };
    let next = handoff.apply(loaded.as_ref(), seed_fingerprint, now);
    let written = match &next {
        Some(state) => store.save(name, state).await,
        None => store.remove(name).await,
    };
    if let Err(e) = written {
        error!(account = %name, error = %e, "cannot apply the handoff from tokend login/import/logout; it stays pending");
        return Err((loaded, e.to_string()));
    }
    if let Err(e) = store.clear_handoff(name).await {
        // Applied, but it would be applied again at the next start or reload: say so.
        error!(account = %name, error = %e, "applied the handoff but cannot delete it; delete it by hand before the next reload");
    }
    let logout = handoff == Handoff::Logout;
    if logout {
        info!(account = %name, "logged out: the stored refresh token was dropped");
    } else {
        info!(account = %name, "adopted the refresh token handed over by tokend login/import");
    }
    Ok((next, logout))
}

#[cfg(test)]
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
        let fake = crate::fake_provider::FakeProvider::new(Duration::from_secs(60), clock.clone());
        let deps = Deps {
            store: FileStore::open(dir.path()).unwrap(),
            provider: Provider::new(Transport::InProcess(fake.router())),
            clock,
            jumps: watch::Sender::new(0).subscribe(),
            changes: watch::Sender::new(0),
            tracker: TaskTracker::new(),
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
