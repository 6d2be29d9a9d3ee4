//! What each account publishes to readers: its config (discovered endpoints included) and
//! a snapshot (status, current token, last error), each in an `ArcSwap`, so an HTTP
//! handler reads them with an atomic load and never waits on a refresh; and the queue
//! through which readers ask the account's refresher for a fresher token.

use std::collections::BTreeMap;
use std::collections::VecDeque;
use std::fmt;
use std::io::Write as _;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use http::{HeaderName, HeaderValue};
use tokio::sync::{Notify, oneshot, watch};
use zeroize::{Zeroize, Zeroizing};

use crate::clock::rfc3339;
use crate::config::{AccountConfig, AccountName};
use crate::secret::Secret;
use crate::store::AccessToken;

/// An account's state as shown to consumers and operators.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    /// No token yet; the first one is being fetched.
    Pending,
    Ok,
    /// A refresh is in flight; the current token (if any) is still served.
    Refreshing,
    /// Refreshing fails (or the state cannot be saved) but the token is still valid.
    Degraded,
    /// The token has expired and no new one could be obtained.
    Expired,
    /// The refresh token was rejected or is missing: a human must re-authorize.
    NeedsReauth,
}

impl Status {
    /// Every state's name, in the order `as_str` gives them.
    pub const NAMES: [&'static str; 6] = [
        "pending",
        "ok",
        "refreshing",
        "degraded",
        "expired",
        "needs_reauth",
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Status::Pending => "pending",
            Status::Ok => "ok",
            Status::Refreshing => "refreshing",
            Status::Degraded => "degraded",
            Status::Expired => "expired",
            Status::NeedsReauth => "needs_reauth",
        }
    }
}

/// A token ready to serve: the access token with the headers a consumer must send, and
/// its JSON answer rendered once per refresh (only `expires_in` is filled in per read).
pub struct Served {
    pub access_token: Secret,
    pub token_type: String,
    pub expires_at: SystemTime,
    /// How long the provider made it valid (from issue to expiry).
    pub lifetime: Duration,
    pub scope: Option<String>,
    /// `Authorization` first, then the account's extra headers.
    pub headers: Vec<(HeaderName, Secret)>,
    /// `{"account":…,"headers":{…},"expires_in":` — holds the token, zeroized on drop.
    json_prefix: Zeroizing<Vec<u8>>,
}

impl fmt::Debug for Served {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Served")
            .field("token_type", &self.token_type)
            .field("expires_at", &self.expires_at)
            .field("scope", &self.scope)
            .finish_non_exhaustive()
    }
}

impl Served {
    pub fn new(
        account: &AccountName,
        access: &AccessToken,
        extra_headers: &[(HeaderName, HeaderValue)],
    ) -> Served {
        let mut headers = Vec::with_capacity(1 + extra_headers.len());
        headers.push((
            http::header::AUTHORIZATION,
            Secret::new(format!("{} {}", access.token_type, access.token.expose())),
        ));
        for (name, value) in extra_headers {
            // Validated as visible ASCII at config time.
            let text = value.to_str().unwrap_or_default();
            headers.push((name.clone(), Secret::new(text)));
        }
        let mut header_map = serde_json::Map::new();
        for (name, value) in &headers {
            header_map.insert(canonical_header_name(name.as_str()), value.expose().into());
        }
        let mut body = serde_json::json!({
            "account": account.as_str(),
            "access_token": access.token.expose(),
            "token_type": access.token_type,
            "expires_at": rfc3339(access.expires_at),
            "scope": access.scope,
            "headers": header_map,
        });
        let mut text = serde_json::to_vec(&body).expect("a JSON value serializes");
        zeroize_json(&mut body);
        // Reopen the object to append the one field that changes with every read.
        text.pop();
        text.extend_from_slice(b",\"expires_in\":");
        Served {
            access_token: access.token.clone(),
            token_type: access.token_type.clone(),
            expires_at: access.expires_at,
            lifetime: access
                .expires_at
                .duration_since(access.issued_at)
                .unwrap_or_default(),
            scope: access.scope.clone(),
            headers,
            json_prefix: Zeroizing::new(text),
        }
    }

    /// The JSON answer of `GET /v1/token/{account}` at `now`. It holds the token, so it
    /// is wiped on drop, and allocated once at its exact size (this runs on every read;
    /// and a reallocation would leave an unwiped copy behind).
    pub fn json_body(&self, now: SystemTime) -> Zeroizing<Vec<u8>> {
        let expires_in = self.valid_for(now).as_secs();
        let digits = expires_in.checked_ilog10().map_or(1, |d| d as usize + 1);
        let mut out = Zeroizing::new(Vec::with_capacity(self.json_prefix.len() + digits + 1));
        out.extend_from_slice(&self.json_prefix);
        write!(out, "{expires_in}}}").expect("writing to a Vec cannot fail");
        debug_assert_eq!(
            out.len(),
            out.capacity(),
            "sized exactly, never reallocated"
        );
        out
    }

    /// How long the token stays valid after `now` (zero once expired).
    pub fn valid_for(&self, now: SystemTime) -> Duration {
        self.expires_at
            .duration_since(now)
            .unwrap_or(Duration::ZERO)
    }

    /// Whether it is still valid at `now` for at least `min_valid` (and at least a second,
    /// so a token is never handed out in its last instant).
    pub fn satisfies(&self, now: SystemTime, min_valid: Duration) -> bool {
        self.valid_for(now) >= min_valid.max(Duration::from_secs(1))
    }
}

/// One account's published view.
#[derive(Debug, Clone)]
pub struct Snapshot {
    pub status: Status,
    pub token: Option<Arc<Served>>,
    pub last_refresh: Option<SystemTime>,
    pub next_refresh: Option<SystemTime>,
    pub last_error: Option<String>,
    pub refresh_token_issued_at: Option<SystemTime>,
    pub refresh_token_expires_at: Option<SystemTime>,
}

impl Snapshot {
    pub fn pending() -> Snapshot {
        Snapshot {
            status: Status::Pending,
            token: None,
            last_refresh: None,
            next_refresh: None,
            last_error: None,
            refresh_token_issued_at: None,
            refresh_token_expires_at: None,
        }
    }

    /// The status as of `now`: a token that has run out shows as `expired` even before
    /// the refresher notices, since expiry is judged on the wall clock at read time.
    pub fn status_at(&self, now: SystemTime) -> Status {
        match (&self.token, self.status) {
            (_, Status::NeedsReauth) => Status::NeedsReauth,
            (Some(t), _) if !t.satisfies(now, Duration::ZERO) => Status::Expired,
            (None, Status::Ok | Status::Degraded) => Status::Expired,
            (_, s) => s,
        }
    }

    /// A warning when the refresh token itself nears its end (last fifth of its life,
    /// or three days): a human must re-consent before it runs out.
    pub fn refresh_token_warning(&self, now: SystemTime) -> Option<String> {
        let expires = self.refresh_token_expires_at?;
        let left = expires.duration_since(now).unwrap_or_default();
        let life = self
            .refresh_token_issued_at
            .and_then(|i| expires.duration_since(i).ok())
            .unwrap_or_default();
        (left < life / 5 || left < Duration::from_secs(3 * 86_400)).then(|| {
            format!(
                "the refresh token expires at {} (in {}): re-authorize before then",
                rfc3339(expires),
                secs(left)
            )
        })
    }

    /// Start-up is over for this account: it holds a valid token, or it cannot get one
    /// without help (needs re-auth), or its first attempts have failed.
    pub fn settled(&self, now: SystemTime) -> bool {
        self.valid_token(now, Duration::ZERO).is_some()
            || self.status == Status::NeedsReauth
            || self.last_error.is_some()
    }

    /// The token, if it is valid for at least `min_valid` at `now`.
    pub fn valid_token(&self, now: SystemTime, min_valid: Duration) -> Option<&Arc<Served>> {
        self.token.as_ref().filter(|t| t.satisfies(now, min_valid))
    }
}

/// A reader's request for a token valid at least `min_valid` (or, with `force`, a
/// newly issued one). Requests queued while a refresh runs share its result.
#[derive(Debug)]
pub struct Demand {
    pub min_valid: Duration,
    pub force: bool,
    pub reply: oneshot::Sender<Result<Arc<Served>, DemandError>>,
}

/// Why a demand could not be met; mapped to 503 with the account's state.
#[derive(Debug, Clone, thiserror::Error)]
pub enum DemandError {
    #[error("{0}")]
    NeedsReauth(String),
    #[error("refreshing fails: {error}; next attempt in {}", secs(*retry_in))]
    Failing { error: String, retry_in: Duration },
    /// No token valid for `min_valid` can be had now: the provider's tokens live less
    /// than that (`lifetime`), or the current one (`left` to live) was refreshed too
    /// recently to refresh again.
    #[error("{}", too_short(*lifetime, *left, *min_valid))]
    TooShort {
        lifetime: Duration,
        left: Duration,
        min_valid: Duration,
    },
    /// A forced refresh within `min_interval` of the last call, which succeeded or (with
    /// the reason in `failed`) did not.
    #[error("{}", too_soon(*ago, *min_interval, failed.as_deref()))]
    TooSoon {
        ago: Duration,
        min_interval: Duration,
        failed: Option<String>,
    },
    #[error("the provider asked for no request for another {} (Retry-After) after its last answer: {error}", secs(*retry_in))]
    RetryAfter { error: String, retry_in: Duration },
    #[error("the account is shutting down or being reloaded")]
    Gone,
    #[error("{waiting} requests already wait for this account's refresh; try again shortly")]
    Busy { waiting: usize },
}

impl DemandError {
    /// When asking again may succeed, for a `Retry-After` in the answer; `None` when only
    /// a change (a login, a config) can help, or nobody knows.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            DemandError::Failing { retry_in, .. } | DemandError::RetryAfter { retry_in, .. } => {
                Some(*retry_in).filter(|d| !d.is_zero())
            }
            DemandError::TooSoon {
                ago, min_interval, ..
            } => Some(min_interval.saturating_sub(*ago)),
            _ => None,
        }
    }
}

fn too_soon(ago: Duration, min_interval: Duration, failed: Option<&str>) -> String {
    let last = match failed {
        None => format!("the token was refreshed {} ago", secs(ago)),
        Some(e) => format!("the last refresh attempt, {} ago, failed: {e}", secs(ago)),
    };
    format!(
        "{last}; refreshes are at least {} apart (refresh.min_interval)",
        secs(min_interval)
    )
}

fn too_short(lifetime: Duration, left: Duration, min_valid: Duration) -> String {
    if lifetime < min_valid {
        format!(
            "the provider issues tokens valid for {}, less than the {} asked for",
            secs(lifetime),
            secs(min_valid)
        )
    } else {
        format!(
            "the token is valid for {} more, less than the {} asked for, and was refreshed too recently to refresh again (refresh.min_interval)",
            secs(left),
            secs(min_valid)
        )
    }
}

/// `profile` → `Profile`, `x-api-key` → `X-Api-Key`: how consumers expect to see them.
pub fn canonical_header_name(name: &str) -> String {
    name.split('-')
        .map(|part| {
            let mut chars = part.chars();
            match chars.next() {
                Some(first) => first.to_ascii_uppercase().to_string() + chars.as_str(),
                None => String::new(),
            }
        })
        .collect::<Vec<_>>()
        .join("-")
}

/// Wipes the strings of a JSON value that held secrets.
fn zeroize_json(v: &mut serde_json::Value) {
    match v {
        serde_json::Value::String(s) => s.zeroize(),
        serde_json::Value::Array(a) => a.iter_mut().for_each(zeroize_json),
        serde_json::Value::Object(o) => o.values_mut().for_each(zeroize_json),
        _ => {}
    }
}

/// A duration in whole seconds, as people read it ("4m 10s").
fn secs(d: Duration) -> humantime::FormattedDuration {
    humantime::format_duration(Duration::from_secs(d.as_secs()))
}

/// The shared face of one running account: its config, its published snapshot and the
/// way to reach its refresher.
#[derive(Debug)]
pub struct AccountHandle {
    /// The account's settings as its refresher uses them: as configured, with the
    /// endpoints discovery filled in once it has (the one copy; only the refresher
    /// swaps it).
    config: ArcSwap<AccountConfig>,
    pub cell: ArcSwap<Snapshot>,
    pub demands: Demands,
    /// Bumped on every publish, so start-up can wait for accounts to settle.
    pub changes: watch::Sender<u64>,
    /// Tokens served from this account under `consumer="-"`: registered on the first
    /// read, then an atomic add (reads are the hot path). Not at start: an account nobody
    /// reads would hold a series of ~300 bytes for nothing, thousands of times over.
    reads: std::sync::OnceLock<metrics::Counter>,
    /// Requests through the proxy, registered on the first one: accounts without a
    /// `[proxy]` table get no proxy series (and hold a pointer, not the series' handles).
    proxied: std::sync::OnceLock<Box<crate::metrics::ProxyMetrics>>,
    /// Which replica holds the account's refresh lease (node id), as this replica last
    /// learned it; `None` while nobody does or it is not known yet.
    lease_holder: arc_swap::ArcSwapOption<String>,
    /// This replica holds it.
    lease_held: std::sync::atomic::AtomicBool,
}

impl AccountHandle {
    /// A pending account with no reader waiting; `changes` is shared by every account.
    pub fn new(config: Arc<AccountConfig>, changes: watch::Sender<u64>) -> AccountHandle {
        AccountHandle {
            reads: std::sync::OnceLock::new(),
            config: ArcSwap::new(config),
            cell: ArcSwap::from_pointee(Snapshot::pending()),
            demands: Demands::default(),
            changes,
            proxied: std::sync::OnceLock::new(),
            lease_holder: arc_swap::ArcSwapOption::empty(),
            lease_held: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// Records who holds the account's lease: `mine` when it is this replica.
    pub fn set_lease_holder(&self, holder: Option<String>, mine: bool) {
        self.lease_held
            .store(mine, std::sync::atomic::Ordering::Relaxed);
        self.lease_holder.store(holder.map(Arc::new));
    }

    /// Counts one token served to a consumer not named in metrics.
    pub fn record_read(&self) {
        self.reads
            .get_or_init(|| crate::metrics::token_reads(self.config().name.as_str(), "-"))
            .increment(1);
    }

    /// Counts one request through the proxy, answered with `status` after `took`.
    pub fn record_proxied(&self, status: u16, took: Duration) {
        self.proxied
            .get_or_init(|| {
                Box::new(crate::metrics::ProxyMetrics::new(
                    self.config().name.as_str(),
                ))
            })
            .record(status, took);
    }

    /// The node id holding the account's lease, if known.
    pub fn lease_holder(&self) -> Option<Arc<String>> {
        self.lease_holder.load_full()
    }

    pub fn lease_held(&self) -> bool {
        self.lease_held.load(std::sync::atomic::Ordering::Relaxed)
    }

    pub fn config(&self) -> arc_swap::Guard<Arc<AccountConfig>> {
        self.config.load()
    }

    /// The config with the endpoints discovery found (see [`crate::provider::discovery`]).
    pub fn set_config(&self, config: Arc<AccountConfig>) {
        self.config.store(config);
    }

    pub fn snapshot(&self) -> arc_swap::Guard<Arc<Snapshot>> {
        self.cell.load()
    }

    pub fn publish(&self, snapshot: Snapshot) {
        self.cell.store(Arc::new(snapshot));
        self.changes.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// Asks the refresher; it answers at once when it cannot help (re-auth needed,
    /// backing off) and otherwise after one refresh shared by every waiting reader.
    pub async fn demand(
        &self,
        min_valid: Duration,
        force: bool,
        timeout: Duration,
    ) -> Result<Arc<Served>, DemandError> {
        let (reply, answer) = oneshot::channel();
        self.demands.push(Demand {
            min_valid,
            force,
            reply,
        })?;
        match tokio::time::timeout(timeout, answer).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err(DemandError::Gone),
            Err(_) => Err(DemandError::Failing {
                error: "the refresh did not finish in time".into(),
                retry_in: Duration::ZERO,
            }),
        }
    }
}

/// Most demands one account queues; more are refused at once rather than piling up
/// behind a slow provider (a bounded channel held as many).
pub const MAX_QUEUED_DEMANDS: usize = 256;

/// Readers' demands on one account, waiting for its refresher. A lock-guarded queue and a
/// `Notify` live inline in the handle and allocate nothing until a reader demands: with
/// 10,000 mostly idle accounts, a channel each cost ~1.5 KB up front.
#[derive(Debug, Default)]
pub struct Demands {
    queue: Mutex<Queue>,
    /// `notify_one` stores a permit when the refresher is not waiting, so a demand pushed
    /// between its check of the queue and its wait still wakes it.
    arrived: Notify,
}

#[derive(Debug, Default)]
struct Queue {
    waiting: VecDeque<Demand>,
    /// The refresher has stopped: demands are answered `Gone` at once.
    closed: bool,
}

impl Demands {
    /// Queues a demand for the refresher, unless it has stopped or too many wait.
    fn push(&self, demand: Demand) -> Result<(), DemandError> {
        let mut queue = self.lock();
        if queue.closed {
            return Err(DemandError::Gone);
        }
        if queue.waiting.len() >= MAX_QUEUED_DEMANDS {
            // Readers that timed out no longer need an answer: make room first.
            queue.waiting.retain(|d| !d.reply.is_closed());
            if queue.waiting.len() >= MAX_QUEUED_DEMANDS {
                return Err(DemandError::Busy {
                    waiting: queue.waiting.len(),
                });
            }
        }
        queue.waiting.push_back(demand);
        drop(queue);
        self.arrived.notify_one();
        Ok(())
    }

    /// The next demand, waiting for one. Cancel-safe: a demand stays queued until returned.
    async fn recv(&self) -> Demand {
        loop {
            if let Some(demand) = self.try_recv() {
                return demand;
            }
            self.arrived.notified().await;
        }
    }

    /// The next demand, if one is queued.
    fn try_recv(&self) -> Option<Demand> {
        self.lock().waiting.pop_front()
    }

    /// Refuses demands from now on and answers the queued ones `Gone`.
    fn close(&self) {
        let waiting = {
            let mut queue = self.lock();
            queue.closed = true;
            std::mem::take(&mut queue.waiting)
        };
        for demand in waiting {
            let _ = demand.reply.send(Err(DemandError::Gone));
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Queue> {
        // Nothing panics while holding the lock; a queue is valid whatever happened.
        self.queue.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// The refresher's end of its account's demands, the only one that takes them. Dropping it
/// (the task ended, by shutdown, reload or a panic) closes the queue, so no reader waits
/// for an answer that cannot come.
#[derive(Debug)]
pub struct DemandReceiver {
    handle: Arc<AccountHandle>,
}

impl DemandReceiver {
    pub fn new(handle: Arc<AccountHandle>) -> DemandReceiver {
        DemandReceiver { handle }
    }

    /// The next demand, waiting for one. Cancel-safe: a demand stays queued until returned.
    pub async fn recv(&self) -> Demand {
        self.handle.demands.recv().await
    }

    /// The next demand, if one is queued.
    pub fn try_recv(&self) -> Option<Demand> {
        self.handle.demands.try_recv()
    }
}

impl Drop for DemandReceiver {
    fn drop(&mut self) {
        self.handle.demands.close();
    }
}

/// Every running account by name. Swapped whole on reload; readers load it atomically.
#[derive(Debug, Default)]
pub struct Registry {
    accounts: ArcSwap<BTreeMap<AccountName, Arc<AccountHandle>>>,
}

impl Registry {
    /// The account named `name`; a string that is not a valid account name is simply
    /// not found. Looks up by `&str`: this runs on every token read.
    pub fn get(&self, name: &str) -> Option<Arc<AccountHandle>> {
        self.accounts.load().get(name).cloned()
    }

    /// Every account's time-dependent gauges at `now`, for a `/metrics` scrape: the
    /// accounts are those running now, their gauges read as the answer is written (no
    /// list of them all, which at thousands of accounts would be megabytes per scrape).
    pub fn gauges(
        &self,
        now: SystemTime,
    ) -> impl Iterator<Item = crate::metrics::AccountGauges> + Clone + Send + 'static {
        // Shared, so that each gauge family's pass over the accounts (`render` makes one per
        // family) copies a pointer, not the list.
        let accounts: Arc<[(AccountName, Arc<AccountHandle>)]> = self
            .all()
            .iter()
            .map(|(name, account)| (name.clone(), account.clone()))
            .collect();
        (0..accounts.len()).map(move |i| {
            let (name, account) = &accounts[i];
            let snap = account.snapshot();
            crate::metrics::AccountGauges {
                account: name.to_string(),
                expires_in: snap
                    .token
                    .as_ref()
                    .map_or(Duration::ZERO, |t| t.valid_for(now)),
                last_refresh: snap.last_refresh,
                refresh_token_age: snap
                    .refresh_token_issued_at
                    .map(|t| now.duration_since(t).unwrap_or_default()),
                states: &Status::NAMES,
                state: snap.status_at(now).as_str(),
                lease_held: account.lease_held(),
            }
        })
    }

    pub fn all(&self) -> Arc<BTreeMap<AccountName, Arc<AccountHandle>>> {
        self.accounts.load_full()
    }

    pub fn replace(&self, accounts: BTreeMap<AccountName, Arc<AccountHandle>>) {
        self.accounts.store(Arc::new(accounts));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    type Answer = oneshot::Receiver<Result<Arc<Served>, DemandError>>;

    #[test]
    fn the_state_names_are_exactly_the_states() {
        let all = [
            Status::Pending,
            Status::Ok,
            Status::Refreshing,
            Status::Degraded,
            Status::Expired,
            Status::NeedsReauth,
        ];
        // A state missing from NAMES would never get its 0/1 series in /metrics.
        assert_eq!(all.map(Status::as_str), Status::NAMES);
        for status in all {
            match status {
                Status::Pending
                | Status::Ok
                | Status::Refreshing
                | Status::Degraded
                | Status::Expired
                | Status::NeedsReauth => {}
            }
        }
    }

    fn demand(min_valid: u64) -> (Demand, Answer) {
        let (reply, answer) = oneshot::channel();
        let demand = Demand {
            min_valid: Duration::from_secs(min_valid),
            force: false,
            reply,
        };
        (demand, answer)
    }

    #[tokio::test(start_paused = true)]
    async fn demands_reach_the_refresher_in_order_and_none_is_lost() {
        let demands = Arc::new(Demands::default());
        let (first, _a1) = demand(1);
        let (second, _a2) = demand(2);
        demands.push(first).unwrap();
        demands.push(second).unwrap();
        assert_eq!(demands.recv().await.min_valid, Duration::from_secs(1));
        assert_eq!(
            demands.try_recv().unwrap().min_valid,
            Duration::from_secs(2)
        );
        assert!(demands.try_recv().is_none());

        // Pushed while the refresher waits: it wakes.
        let waiter = tokio::spawn({
            let demands = demands.clone();
            async move { demands.recv().await.min_valid }
        });
        tokio::task::yield_now().await;
        let (third, _a3) = demand(3);
        demands.push(third).unwrap();
        assert_eq!(waiter.await.unwrap(), Duration::from_secs(3));

        // Pushed before the refresher waits again (it was busy): the stored permit wakes
        // it at once; and a wake-up whose demand was already taken is not a demand.
        let (fourth, _a4) = demand(4);
        let (fifth, _a5) = demand(5);
        demands.push(fourth).unwrap();
        demands.push(fifth).unwrap();
        assert_eq!(
            demands.try_recv().unwrap().min_valid,
            Duration::from_secs(4)
        );
        assert_eq!(demands.recv().await.min_valid, Duration::from_secs(5));
        let idle = tokio::time::timeout(Duration::from_secs(1), demands.recv()).await;
        assert!(idle.is_err(), "no demand is waiting");
    }

    #[test]
    fn past_the_cap_demands_are_refused_until_readers_give_up() {
        let demands = Demands::default();
        let mut answers: Vec<Answer> = (0..MAX_QUEUED_DEMANDS)
            .map(|_| {
                let (d, answer) = demand(0);
                demands.push(d).unwrap();
                answer
            })
            .collect();
        let (extra, _) = demand(0);
        let refused = demands.push(extra).unwrap_err();
        assert!(
            matches!(refused, DemandError::Busy { waiting } if waiting == MAX_QUEUED_DEMANDS),
            "{refused:?}"
        );
        assert!(refused.to_string().contains("try again"), "{refused}");
        // A reader that timed out no longer holds a place.
        drop(answers.pop());
        let (extra, _) = demand(0);
        demands.push(extra).unwrap();
    }

    #[test]
    fn closing_answers_waiting_readers_and_refuses_new_ones() {
        let demands = Demands::default();
        let (d, mut answer) = demand(0);
        demands.push(d).unwrap();
        demands.close();
        assert!(matches!(answer.try_recv(), Ok(Err(DemandError::Gone))));
        let (d, _) = demand(0);
        assert!(matches!(demands.push(d), Err(DemandError::Gone)));
        assert!(demands.try_recv().is_none());
    }

    #[test]
    fn header_names_are_shown_in_canonical_case() {
        assert_eq!(canonical_header_name("profile"), "Profile");
        assert_eq!(canonical_header_name("authorization"), "Authorization");
        assert_eq!(canonical_header_name("x-api-key"), "X-Api-Key");
    }

    #[test]
    fn the_prerendered_answer_is_valid_json_with_a_live_expires_in() {
        let issued = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let access = AccessToken {
            token: Secret::new("at-\"quoted\"-1"),
            token_type: "Bearer".into(),
            expires_at: issued + Duration::from_secs(3600),
            scope: Some("a b".into()),
            issued_at: issued,
        };
        let profile = (
            HeaderName::from_static("profile"),
            HeaderValue::from_static("B 1234"),
        );
        let served = Served::new(&AccountName::parse("zy").unwrap(), &access, &[profile]);
        let body: serde_json::Value =
            serde_json::from_slice(&served.json_body(issued + Duration::from_secs(100))).unwrap();
        assert_eq!(body["expires_in"], 3500);
        assert_eq!(body["access_token"], "at-\"quoted\"-1");
        assert_eq!(body["headers"]["Authorization"], "Bearer at-\"quoted\"-1");
        assert_eq!(body["headers"]["Profile"], "B 1234");
        assert_eq!(body["expires_at"], "2027-01-15T09:00:00Z");
        assert!(
            !format!("{served:?}").contains("quoted"),
            "Debug never shows the token"
        );
        let later: serde_json::Value =
            serde_json::from_slice(&served.json_body(issued + Duration::from_secs(3599))).unwrap();
        assert_eq!(later["expires_in"], 1);
        let expired: serde_json::Value =
            serde_json::from_slice(&served.json_body(issued + Duration::from_secs(7200))).unwrap();
        assert_eq!(expired["expires_in"], 0);
    }
}
