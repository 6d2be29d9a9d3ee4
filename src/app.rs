//! Wiring: from a validated config to running refreshers and listeners. The `Daemon` owns
//! the one stop signal and the task tracker every task is spawned on, stops them all in
//! `shutdown`, and applies reloads (added accounts start, removed ones stop, changed ones
//! and those with a pending handoff from `tokend login`/`import`/`logout` restart).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use axum::Router;
use futures_util::StreamExt;
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
use signal_hook_tokio::Signals;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{error, info, warn};

use crate::access::Access;
use crate::clock::{Clock, rfc3339};
use crate::config::{AccountConfig, AccountName, Config, ConfigError};
use crate::http::{Api, ApiState, ReloadStatus, router};
use crate::listen::{self, Limits, ListenError, Listener};
use crate::notify;
use crate::provider::{HttpClients, Provider, ProviderError};
use crate::refresher::{Deps, Refresher, STOP_GRACE};
use crate::replica::{self, Keeper};
use crate::sinks;
use crate::store::{Store, StoreError};
use crate::token_cell::{AccountHandle, Registry, Status};

/// Why the daemon could not start or keep running.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("{0}")]
    Config(#[from] ConfigError),
    #[error("{0}")]
    Store(#[from] StoreError),
    #[error("{0}")]
    Provider(#[from] ProviderError),
    #[error("{0}")]
    Listen(#[from] ListenError),
    #[error("cannot install signal handlers: {0}")]
    Signals(std::io::Error),
    /// A second SIGINT or SIGTERM arrived while stopping.
    #[error(
        "stopped at once by a second {0}; refreshes still in flight were abandoned and keep their in-flight marks for the next start"
    )]
    ForcedStop(&'static str),
}

struct Running {
    config: Arc<AccountConfig>,
    handle: Arc<AccountHandle>,
    cancel: CancellationToken,
    done: JoinHandle<()>,
}

/// The set of running accounts and what they share. Every task of the daemon (refreshers,
/// rotation hooks, listeners and their connections, the clock-jump detector) runs on its
/// `tracker` and stops on `stopping`: [`Daemon::shutdown`] ends them all.
pub struct Daemon {
    config: Config,
    store: Arc<dyn Store>,
    provider: Provider,
    clock: Clock,
    jumps: watch::Receiver<u64>,
    registry: Arc<Registry>,
    /// With a shared store: which accounts this replica refreshes.
    keeper: Option<Arc<Keeper>>,
    running: BTreeMap<AccountName, Running>,
    tracker: TaskTracker,
    stopping: CancellationToken,
    changes: watch::Sender<u64>,
    access: Arc<ArcSwap<Access>>,
    /// The outcome of the last reload, published to the API (see [`reload_from`]).
    reloads: Arc<ArcSwap<ReloadStatus>>,
    /// The proxy's HTTP clients to the accounts' upstream APIs.
    upstreams: Arc<HttpClients>,
}

/// What stopping the daemon does with the token files whose `on_shutdown` is `remove`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SinksOnStop {
    Remove,
    /// `run --once`: the files are its product, for the process started after it.
    Keep,
}

/// How long start-up waits for accounts to settle before telling systemd it is ready
/// anyway (accounts still without a token then show in `/readyz` and `tokend status`).
pub const START_TIMEOUT: Duration = Duration::from_secs(45);

/// Accounts whose state is loaded at once during start-up.
const STARTUP_CONCURRENCY: usize = 64;

/// What a reload changed.
#[derive(Debug, Default, PartialEq)]
pub struct ReloadReport {
    pub added: Vec<AccountName>,
    pub removed: Vec<AccountName>,
    pub restarted: Vec<AccountName>,
    /// Settings that only take effect on restart.
    pub ignored: Vec<String>,
}

impl Daemon {
    /// Loads every account's persisted state, publishes still-valid tokens at once (no
    /// provider call) and starts one refresher per account.
    pub async fn start(
        mut config: Config,
        store: Arc<dyn Store>,
        provider: Provider,
        clock: Clock,
    ) -> Daemon {
        // Where secrets came from is for `tokend check`: a map the size of the accounts,
        // not kept by a daemon.
        config.secret_sources = BTreeMap::new();
        let tracker = TaskTracker::new();
        let stopping = CancellationToken::new();
        let jumps = clock.spawn_jump_detector(&tracker, stopping.clone());
        let keeper = store.shared().then(|| {
            let keeper = Keeper::new(store.clone(), tracker.clone());
            tracker.spawn(keeper.clone().run(stopping.clone()));
            keeper
        });
        let access = Access::new(config.consumers.clone()).with_metrics(&config.server);
        let upstreams = HttpClients::new(config.provider.connect_timeout);
        let mut daemon = Daemon {
            keeper,
            // Moved, not cloned: a second map of thousands of accounts, freed once start-up
            // is over, would leave its pages in the heap for good.
            config,
            store,
            provider: provider.with_clock(clock.clone()),
            jumps,
            registry: Arc::new(Registry::default()),
            running: BTreeMap::new(),
            tracker,
            stopping,
            changes: watch::Sender::new(0),
            access: Arc::new(ArcSwap::from_pointee(access)),
            reloads: Arc::new(ArcSwap::from_pointee(ReloadStatus::started(clock.now()))),
            upstreams: Arc::new(upstreams),
            clock,
        };
        // State files are read concurrently: with thousands of accounts a sequential
        // start would keep still-valid tokens from being served for seconds.
        let started: Vec<(AccountName, Running)> =
            futures_util::stream::iter(daemon.config.accounts.values())
                .map(|account| async {
                    (
                        account.name.clone(),
                        daemon.start_account(account.clone()).await,
                    )
                })
                .buffer_unordered(STARTUP_CONCURRENCY)
                .collect()
                .await;
        daemon.running.extend(started);
        daemon.publish_registry();
        daemon
    }

    async fn start_account(&self, config: Arc<AccountConfig>) -> Running {
        let cancel = self.stopping.child_token();
        let deps = Deps {
            store: self.store.clone(),
            provider: self.provider.clone(),
            clock: self.clock.clone(),
            jumps: self.jumps.clone(),
            changes: self.changes.clone(),
            tracker: self.tracker.clone(),
            lease: None,
        };
        let (handle, done) = match &self.keeper {
            Some(keeper) => {
                let handle = Arc::new(AccountHandle::new(config.clone(), self.changes.clone()));
                let account = replica::Account {
                    config: config.clone(),
                    handle: handle.clone(),
                    seat: keeper.join(&config.name, handle.clone()),
                    keeper: keeper.clone(),
                    deps,
                };
                (handle, self.tracker.spawn(account.run(cancel.clone())))
            }
            None => {
                let (refresher, handle) = Refresher::prepare(config.clone(), deps).await;
                // The only process on its store: it holds every account.
                handle.set_lease_holder(Some(self.store.node_id().to_string()), true);
                (handle, self.tracker.spawn(refresher.run(cancel.clone())))
            }
        };
        Running {
            config,
            handle,
            cancel,
            done,
        }
    }

    fn publish_registry(&self) {
        let map = self
            .running
            .iter()
            .map(|(name, r)| (name.clone(), r.handle.clone()))
            .collect();
        self.registry.replace(map);
    }

    pub fn registry(&self) -> Arc<Registry> {
        self.registry.clone()
    }

    pub fn api_state(&self) -> ApiState {
        ApiState {
            registry: self.registry.clone(),
            clock: self.clock.clone(),
            access: self.access.clone(),
            reload: self.reloads.clone(),
            node_id: Arc::from(self.store.node_id()),
            upstreams: self.upstreams.clone(),
        }
    }

    pub fn router(&self) -> Router {
        router(self.api_state())
    }

    /// The API as the listeners serve it: the router, with the token reads' direct path.
    pub fn api(&self) -> Api {
        Api::new(self.api_state())
    }

    /// Serves `router` on `listeners` until the daemon stops; [`Daemon::shutdown`] drains
    /// their open connections.
    pub fn serve(&self, listeners: Vec<Listener>, router: impl listen::Serve, limits: Limits) {
        listen::serve(listeners, router, &self.tracker, &self.stopping, limits);
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Waits until every account has settled (see `Snapshot::settled`), at most until
    /// `deadline`.
    pub async fn wait_settled(&self, deadline: tokio::time::Instant) {
        let mut changes = self.changes.subscribe();
        let all_settled = || {
            let now = self.clock.now();
            self.registry
                .all()
                .values()
                .all(|a| a.snapshot().settled(now))
        };
        let _ = tokio::time::timeout_at(deadline, async {
            while !all_settled() {
                if changes.changed().await.is_err() {
                    return;
                }
            }
        })
        .await;
    }

    /// One line for systemd's STATUS= and the logs: `3 accounts: 2 ok, 1 needs_reauth`.
    pub fn summary(&self) -> String {
        let now = self.clock.now();
        let mut counts: BTreeMap<&'static str, usize> = BTreeMap::new();
        let accounts = self.registry.all();
        for a in accounts.values() {
            *counts
                .entry(a.snapshot().status_at(now).as_str())
                .or_default() += 1;
        }
        let parts: Vec<String> = counts.iter().map(|(s, n)| format!("{n} {s}")).collect();
        format!("{} accounts: {}", accounts.len(), parts.join(", "))
    }

    /// Refreshers that ended although nobody stopped them (a panic): the watchdog stops
    /// pinging so systemd restarts the daemon.
    fn dead_refreshers(&self) -> Vec<&AccountName> {
        self.running
            .iter()
            .filter(|(_, r)| r.done.is_finished() && !r.cancel.is_cancelled())
            .map(|(name, _)| name)
            .collect()
    }

    /// Applies a new config. An account whose settings changed is stopped (its in-flight
    /// refresh and save finish first) and started again from its stored state.
    pub async fn reload(&mut self, new: Config) -> ReloadReport {
        let mut report = ReloadReport::default();
        if new.state != self.config.state {
            report.ignored.push("state".into());
        }
        if new.server != self.config.server {
            report.ignored.push("server".into());
        }
        if new.log != self.config.log {
            report.ignored.push("log".into());
        }
        if new.provider.connect_timeout != self.config.provider.connect_timeout {
            report.ignored.push("provider.connect_timeout".into());
        }
        if new.per_host.max_concurrent != self.config.per_host.max_concurrent {
            report
                .ignored
                .push("provider.max_concurrent_requests".into());
        }
        if new.per_host.max_per_second != self.config.per_host.max_per_second {
            report
                .ignored
                .push("provider.max_requests_per_second".into());
        }
        let handed = self.accounts_with_handoffs().await;
        let stale: Vec<AccountName> = self
            .running
            .iter()
            // An account waiting for re-authorization restarts too, so that a refresh
            // token stored meanwhile (or a state file made readable) is picked up; so
            // does one with a pending handoff, which its start applies.
            .filter(|(name, r)| {
                new.accounts.get(*name) != Some(&r.config)
                    || r.handle.snapshot().status == Status::NeedsReauth
                    || handed.contains(*name)
            })
            .map(|(name, _)| name.clone())
            .collect();
        for name in stale {
            let running = self.running.remove(&name).expect("listed above");
            running.cancel.cancel();
            let _ = running.done.await;
            if new.accounts.contains_key(&name) {
                report.restarted.push(name);
            } else {
                report.removed.push(name);
            }
        }
        for (name, account) in &new.accounts {
            if !self.running.contains_key(name) {
                let running = self.start_account(account.clone()).await;
                self.running.insert(name.clone(), running);
                if !report.restarted.contains(name) {
                    report.added.push(name.clone());
                }
            }
        }
        self.publish_registry();
        self.access
            // `[server]` needs a restart: the running one keeps its metrics settings.
            .store(Arc::new(
                Access::new(new.consumers.clone()).with_metrics(&self.config.server),
            ));
        let ignored = std::mem::take(&mut report.ignored);
        self.config = Config {
            state: self.config.state.clone(),
            server: self.config.server.clone(),
            provider: self.config.provider,
            per_host: self.config.per_host,
            secret_sources: BTreeMap::new(),
            ..new
        };
        report.ignored = ignored;
        report
    }

    /// Publishes the outcome of a reload as the next generation: applied (`Ok`, what
    /// changed) or refused (`Err`, the problems).
    pub fn record_reload(&self, outcome: Result<&ReloadReport, &ConfigError>) {
        let last = self.reloads.load_full();
        let at = self.clock.now();
        let names = |v: &[AccountName]| v.iter().map(|n| n.to_string()).collect();
        let status = match outcome {
            Ok(report) => ReloadStatus {
                generation: last.generation + 1,
                at,
                successful: true,
                last_success_at: at,
                added: names(&report.added),
                removed: names(&report.removed),
                restarted: names(&report.restarted),
                restart_needed: report.ignored.clone(),
                problems: Vec::new(),
            },
            Err(e) => ReloadStatus {
                generation: last.generation + 1,
                at,
                successful: false,
                last_success_at: last.last_success_at,
                added: Vec::new(),
                removed: Vec::new(),
                restarted: Vec::new(),
                restart_needed: Vec::new(),
                problems: e.problems.iter().map(|p| p.to_string()).collect(),
            },
        };
        self.reloads.store(Arc::new(status));
    }

    async fn accounts_with_handoffs(&self) -> Vec<AccountName> {
        let mut out = Vec::new();
        for name in self.running.keys() {
            match self.store.has_handoff(name).await {
                Ok(true) => out.push(name.clone()),
                Ok(false) => {}
                Err(e) => warn!(account = %name, error = %e, "cannot look for a handoff"),
            }
        }
        out
    }

    /// Restarts the accounts that have a pending handoff, with their current config: the
    /// SIGHUP path when there is no new config to apply (none, or an invalid one).
    pub async fn pick_up_handoffs(&mut self) -> Vec<AccountName> {
        let handed = self.accounts_with_handoffs().await;
        for name in &handed {
            let running = self.running.remove(name).expect("listed from running");
            running.cancel.cancel();
            let _ = running.done.await;
            let restarted = self.start_account(running.config).await;
            self.running.insert(name.clone(), restarted);
        }
        if !handed.is_empty() {
            self.publish_registry();
        }
        handed
    }

    /// Stops the daemon: every refresher finishes its in-flight refresh and save (a token
    /// request gets [`STOP_GRACE`] to answer, then is abandoned with its mark), then the
    /// token files with `on_shutdown = "remove"` go (tokend is stopping, not reloading),
    /// and rotation hooks, listeners and their connections are waited for.
    pub async fn shutdown(self) {
        self.stop(SinksOnStop::Remove).await;
    }

    async fn stop(self, on_stop: SinksOnStop) {
        self.stopping.cancel();
        let mut stopped = Vec::with_capacity(self.running.len());
        for (_, running) in self.running {
            let _ = running.done.await;
            stopped.push(running.config);
        }
        // Once no refresher can write them again.
        if on_stop == SinksOnStop::Remove {
            for account in &stopped {
                sinks::remove(account);
            }
        }
        self.tracker.close();
        self.tracker.wait().await;
    }
}

/// What `tokend run` works with outside the process: the state store and the
/// providers' token endpoints. Opened before anything starts, so a locked state
/// directory, an unreachable shared store or a broken TLS setup stops the start with its
/// own error.
struct Backends {
    store: Arc<dyn Store>,
    provider: Provider,
    /// The store's own background tasks (a shared store's change feed): stopped only
    /// after the daemon, so that the refreshers' last saves still reach the store.
    store_stop: CancellationToken,
    store_tasks: TaskTracker,
}

impl Backends {
    async fn open(config: &Config) -> Result<Backends, RunError> {
        let store_stop = CancellationToken::new();
        let store_tasks = TaskTracker::new();
        Ok(Backends {
            store: crate::store::open(&config.state, &store_stop, &store_tasks).await?,
            provider: Provider::http(config.provider.connect_timeout)?
                .with_host_limits(config.per_host),
            store_stop,
            store_tasks,
        })
    }

    /// Starts every account on the system clock; returns the daemon and what stops the
    /// store's tasks once it has stopped ([`StoreTasks::stop`]).
    async fn start(self, config: Config) -> (Daemon, StoreTasks) {
        let tasks = StoreTasks {
            stop: self.store_stop,
            tasks: self.store_tasks,
        };
        let daemon = Daemon::start(config, self.store, self.provider, Clock::system()).await;
        (daemon, tasks)
    }
}

/// A shared store's background tasks, stopped after the daemon.
struct StoreTasks {
    stop: CancellationToken,
    tasks: TaskTracker,
}

impl StoreTasks {
    async fn stop(self) {
        self.stop.cancel();
        self.tasks.close();
        self.tasks.wait().await;
    }
}

/// The daemon: `tokend run`, with the config already loaded from `config_path`.
pub async fn run(config: Config, config_path: PathBuf) -> Result<(), RunError> {
    // Installed first: a SIGHUP or SIGTERM during start-up must not kill the process
    // with its default action.
    let signals = signals()?;
    let backends = Backends::open(&config).await?;
    let listeners = listen::bind_all(&config.server).await?;
    let addrs: Vec<String> = listeners.iter().map(|l| l.to_string()).collect();
    for warning in &config.warnings {
        warn!("{warning}");
    }
    let (daemon, store_tasks) = backends.start(config).await;
    daemon.serve(listeners, daemon.api(), Limits::default());
    info!(
        listen = %addrs.join(","),
        accounts = daemon.running.len(),
        version = env!("CARGO_PKG_VERSION"),
        "tokend started"
    );
    let stopped = supervise(daemon, signals, Some(&config_path)).await;
    store_tasks.stop().await;
    stopped
}

/// `tokend run --once`: every account gets a token (or settles without one), sinks are
/// written and hooks run, then the daemon stops, leaving the sinks. True when every
/// account holds a valid token.
pub async fn run_once(config: Config) -> Result<bool, RunError> {
    let (daemon, store_tasks) = Backends::open(&config).await?.start(config).await;
    let clock = daemon.clock.clone();
    daemon
        .wait_settled(tokio::time::Instant::now() + START_TIMEOUT)
        .await;
    // A carried-over token near its end is no use to the process started after us:
    // each account must hold one valid for at least its refresh margin.
    for account in daemon.registry.all().values() {
        let fresh_enough = account.config().refresh.margin;
        if account
            .snapshot()
            .valid_token(clock.now(), Duration::ZERO)
            .is_some()
        {
            let wait = account.config().limits.timeout + Duration::from_secs(5);
            let _ = account.demand(fresh_enough, false, wait).await;
        }
    }
    let now = clock.now();
    let mut ok = true;
    for (name, account) in daemon.registry.all().iter() {
        let snap = account.snapshot();
        match snap.valid_token(now, Duration::ZERO) {
            Some(t) => {
                info!(account = %name, expires_at = %rfc3339(t.expires_at), "token obtained")
            }
            None => {
                ok = false;
                error!(account = %name, state = snap.status_at(now).as_str(), error = snap.last_error.as_deref().unwrap_or("-"), "no token");
            }
        }
    }
    daemon.stop(SinksOnStop::Keep).await;
    store_tasks.stop().await;
    Ok(ok)
}

/// The signals the daemon handles.
pub fn signals() -> Result<Signals, RunError> {
    Signals::new([SIGTERM, SIGINT, SIGHUP]).map_err(RunError::Signals)
}

/// Waits for signals: SIGTERM/SIGINT stop the daemon cleanly (a second one while stopping
/// gives up at once: [`RunError::ForcedStop`]); SIGHUP reloads the config from
/// `config_path` (a broken new config is logged and the running one kept).
pub async fn supervise(
    mut daemon: Daemon,
    mut signals: Signals,
    config_path: Option<&Path>,
) -> Result<(), RunError> {
    let signals_handle = signals.handle();
    let housekeeping = notify::watchdog_interval().unwrap_or(HOUSEKEEPING_INTERVAL);
    let mut tick = tokio::time::interval(housekeeping);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut ready_sent = false;
    let ready_deadline = tokio::time::Instant::now() + START_TIMEOUT;
    loop {
        tokio::select! {
            _ = daemon.wait_settled(ready_deadline), if !ready_sent => {
                ready_sent = true;
                let summary = daemon.summary();
                info!(status = %summary, "ready");
                notify::ready(&summary);
            }
            _ = tick.tick() => {
                // This loop is what handles signals and reloads: pinging from here proves
                // the runtime runs; a refresher that died stops the pings.
                let dead = daemon.dead_refreshers();
                if dead.is_empty() {
                    notify::watchdog();
                } else {
                    let names: Vec<String> = dead.iter().map(|n| n.to_string()).collect();
                    error!(accounts = %names.join(","), "refresher tasks died; withholding the watchdog ping");
                }
                notify::status(&daemon.summary());
                crate::metrics::upkeep();
            }
            signal = signals.next() => match signal {
                Some(SIGHUP) => match config_path {
                    Some(path) => {
                        notify::reloading();
                        reload_from(&mut daemon, path).await;
                        notify::ready(&daemon.summary());
                    }
                    None => {
                        info!("SIGHUP: this daemon has no config file to reload");
                        pick_up_handoffs(&mut daemon).await;
                    }
                },
                Some(sig) => {
                    info!(signal = signal_name(sig), grace_s = STOP_GRACE.as_secs(), "stopping: finishing in-flight refreshes and saves (a second SIGINT or SIGTERM exits at once)");
                    break;
                }
                None => break,
            },
        }
    }
    notify::stopping();
    let stopped = stop_unless_forced(daemon, &mut signals).await;
    signals_handle.close();
    stopped?;
    info!("tokend stopped");
    Ok(())
}

/// Shuts the daemon down; a second SIGINT or SIGTERM meanwhile gives up on it at once.
/// What is given up loses nothing durable: saves are atomic, and a refresh whose answer
/// never came keeps its in-flight mark for the next start.
async fn stop_unless_forced(daemon: Daemon, signals: &mut Signals) -> Result<(), RunError> {
    let shutdown = daemon.shutdown();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            () = &mut shutdown => return Ok(()),
            signal = signals.next() => match signal {
                Some(sig @ (SIGINT | SIGTERM)) => {
                    warn!(signal = signal_name(sig), "second stop signal: exiting at once; refreshes still in flight keep their marks for the next start");
                    return Err(RunError::ForcedStop(signal_name(sig)));
                }
                Some(_) => info!("SIGHUP while stopping: ignored"),
                None => {
                    (&mut shutdown).await;
                    return Ok(());
                }
            },
        }
    }
}

fn signal_name(signal: i32) -> &'static str {
    match signal {
        SIGINT => "SIGINT",
        SIGTERM => "SIGTERM",
        SIGHUP => "SIGHUP",
        _ => "signal",
    }
}

/// Watchdog, status and metrics upkeep cadence when systemd sets no watchdog.
const HOUSEKEEPING_INTERVAL: Duration = Duration::from_secs(30);

/// Reloads the config at `path` and records the outcome, which `tokend reload` waits
/// for (see [`Daemon::record_reload`]).
async fn reload_from(daemon: &mut Daemon, path: &Path) {
    info!(config = %path.display(), "SIGHUP: reloading the config");
    match Config::load(path) {
        Ok(config) => {
            for warning in &config.warnings {
                warn!("{warning}");
            }
            let report = daemon.reload(config).await;
            let names = |v: &[AccountName]| {
                v.iter()
                    .map(|n| n.to_string())
                    .collect::<Vec<_>>()
                    .join(",")
            };
            info!(
                added = %names(&report.added),
                removed = %names(&report.removed),
                restarted = %names(&report.restarted),
                "config reloaded"
            );
            if !report.ignored.is_empty() {
                warn!(settings = %report.ignored.join(","), "these settings changed but take effect only on restart");
            }
            daemon.record_reload(Ok(&report));
        }
        Err(e) => {
            // One event, so one journald entry: the problems are one field, its line
            // breaks escaped (`{:?}`), not lines of their own.
            let problems: Vec<String> = e.problems.iter().map(|p| p.to_string()).collect();
            error!(
                config = %path.display(),
                count = problems.len(),
                problems = ?problems,
                "the new config is invalid; keeping the running one"
            );
            daemon.record_reload(Err(&e));
            pick_up_handoffs(daemon).await;
        }
    }
}

async fn pick_up_handoffs(daemon: &mut Daemon) {
    let handed = daemon.pick_up_handoffs().await;
    if !handed.is_empty() {
        let names: Vec<String> = handed.iter().map(|n| n.to_string()).collect();
        info!(accounts = %names.join(","), "applied handoffs from tokend login/import/logout");
    }
}
