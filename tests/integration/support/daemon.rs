//! The in-process harness: the daemon (library) against the fake provider through the
//! in-process transport, with a real file store in a temp dir; every test that runs the
//! daemon as a library starts it here (`Harness::builder`, or `Harness::zywave` for the
//! usual one-account start). Flow and fault tests use tokio's paused clock and a manual
//! wall clock. HTTP requests go through the real router, built by `request` and sent by
//! `call`. Also the stores tests put in the file store's place (`FlakyStore`).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use http::{HeaderMap, Method, Request, StatusCode};
use http_body_util::BodyExt;
use serde_json::Value;
use tempfile::TempDir;
use tokend::app::Daemon;
use tokend::clock::Clock;
use tokend::config::{AccountName, Config};
use tokend::demo::fake_provider::FakeProvider;
use tokend::http::Api;
use tokend::listen::{Limits, Listener};
use tokend::provider::{Provider, Transport};
use tokend::store::{Change, Lease, LeaseGrant};
use tokend::store::{FileStore, State, Store, StoreFuture, state_path};
use tower::ServiceExt;

use super::config::{config, zywave_account};
use super::provider::manual_provider;

/// The guard header every token and refresh request carries.
pub const MARK: (&str, &str) = ("Tokend-Request", "1");

/// A request with `headers` in the order given (none added).
pub fn request<B>(method: Method, uri: &str, headers: &[(&str, &str)], body: B) -> Request<B> {
    let mut req = Request::builder().method(method).uri(uri);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    req.body(body).unwrap()
}

/// What [`call`] sends requests through: the daemon's [`Api`], or it wrapped in what a
/// listener adds.
pub trait ApiService:
    tower::Service<
        Request<Body>,
        Response = axum::response::Response,
        Error = std::convert::Infallible,
    > + Clone
{
}

impl<S> ApiService for S where
    S: tower::Service<
            Request<Body>,
            Response = axum::response::Response,
            Error = std::convert::Infallible,
        > + Clone
{
}

/// Sends `req` through `api` (no socket) and returns the answer with its whole body.
pub async fn call(api: &impl ApiService, req: Request<Body>) -> (StatusCode, HeaderMap, Vec<u8>) {
    let response = api.clone().oneshot(req).await.unwrap();
    let status = response.status();
    let headers = response.headers().clone();
    let body = response
        .into_body()
        .collect()
        .await
        .unwrap()
        .to_bytes()
        .to_vec();
    (status, headers, body)
}

pub struct Harness {
    pub fake: FakeProvider,
    pub clock: Clock,
    pub dir: TempDir,
    pub daemon: Option<Daemon>,
    pub api: Api,
    state_dir: PathBuf,
}

/// How a daemon starts: the fake provider, the clocks and the temp dir the harness keeps;
/// optionally another store, or provider routes beside the fake's.
pub struct Builder {
    fake: FakeProvider,
    clock: Clock,
    dir: TempDir,
    store: Option<Arc<dyn Store>>,
    routes: Option<Router>,
    provider: Option<Provider>,
}

impl Builder {
    /// The store instead of a `FileStore` at the config's state dir.
    pub fn store(mut self, store: Arc<dyn Store>) -> Builder {
        self.store = Some(store);
        self
    }

    /// This provider client (real HTTP, say) instead of the in-process transport.
    pub fn provider(mut self, provider: Provider) -> Builder {
        self.provider = Some(provider);
        self
    }

    /// Provider routes served beside the fake provider's, on the same transport.
    pub fn routes(mut self, routes: Router) -> Builder {
        self.routes = Some(routes);
        self
    }

    /// Starts the daemon on the harness config (see `config`) with `accounts` (TOML
    /// account blocks) and `[refresh]` extras.
    pub async fn accounts(self, accounts: &str) -> Harness {
        let config = config(&self.dir, accounts);
        self.start(config).await
    }

    /// Starts the daemon on `config`.
    pub async fn start(self, config: Config) -> Harness {
        let state_dir = config.state.dir.clone();
        let store = match self.store {
            Some(store) => store,
            None => FileStore::open(&state_dir).unwrap(),
        };
        let routes = match self.routes {
            Some(extra) => self.fake.router().merge(extra),
            None => self.fake.router(),
        };
        let provider = self
            .provider
            .unwrap_or_else(|| Provider::new(Transport::InProcess(routes)))
            .with_host_limits(config.per_host);
        let daemon = Daemon::start(config, store, provider, self.clock.clone()).await;
        let api = daemon.api();
        Harness {
            fake: self.fake,
            clock: self.clock,
            dir: self.dir,
            daemon: Some(daemon),
            api,
            state_dir,
        }
    }
}

impl Harness {
    /// A daemon to start with `fake` and `clock`, its config and state in `dir`.
    pub fn builder(fake: FakeProvider, clock: Clock, dir: TempDir) -> Builder {
        Builder {
            fake,
            clock,
            dir,
            store: None,
            routes: None,
            provider: None,
        }
    }

    /// Starts the daemon with `accounts` (TOML account blocks) and `[refresh]` extras.
    pub async fn start(fake: FakeProvider, clock: Clock, accounts: &str) -> Harness {
        let dir = tempfile::tempdir().unwrap();
        Harness::builder(fake, clock, dir).accounts(accounts).await
    }

    /// The usual start: the wall clock manual at `epoch()`, the fake provider issuing
    /// `lifetime` tokens, and one Zywave-style account `zy` seeded with a fresh refresh
    /// token (no scope), which it returns too.
    pub async fn zywave(lifetime: Duration) -> (Harness, String) {
        Harness::zywave_with(lifetime, |_| {}).await
    }

    /// `zywave`, with `setup` applied to the fake provider before anything else (faults,
    /// latency, the reuse window).
    pub async fn zywave_with(
        lifetime: Duration,
        setup: impl FnOnce(&FakeProvider),
    ) -> (Harness, String) {
        let (clock, fake) = manual_provider(lifetime);
        setup(&fake);
        let seed = fake.grant_refresh_token("zy-client", None);
        let h = Harness::start(fake, clock, &zywave_account("zy", &seed)).await;
        (h, seed)
    }

    pub async fn start_with_store(
        fake: FakeProvider,
        clock: Clock,
        accounts: &str,
        dir: TempDir,
        store: Arc<dyn Store>,
    ) -> Harness {
        Harness::builder(fake, clock, dir)
            .store(store)
            .accounts(accounts)
            .await
    }

    /// Serves the API on real `listeners` too, until the daemon stops.
    pub fn serve(&self, listeners: Vec<Listener>, limits: Limits) {
        let daemon = self.daemon.as_ref().expect("the daemon runs");
        daemon.serve(listeners, self.api.clone(), limits);
    }

    /// Waits at most `limit` for every account to settle.
    pub async fn settle(&self, limit: Duration) {
        let daemon = self.daemon.as_ref().expect("the daemon runs");
        daemon
            .wait_settled(tokio::time::Instant::now() + limit)
            .await;
    }

    /// Stops the daemon the way SIGTERM does and returns what a restart needs.
    pub async fn stop(mut self) -> (FakeProvider, Clock, TempDir) {
        self.shutdown().await;
        (self.fake, self.clock, self.dir)
    }

    pub async fn shutdown(&mut self) {
        if let Some(d) = self.daemon.take() {
            d.shutdown().await;
        }
    }

    /// Lets the daemon's tasks run for `d` of virtual time.
    pub async fn advance(&self, d: Duration) {
        tokio::time::sleep(d).await;
    }

    pub async fn get(&self, uri: &str) -> (StatusCode, Value) {
        self.request(uri, true).await
    }

    pub async fn request(&self, uri: &str, with_header: bool) -> (StatusCode, Value) {
        let (status, body) = self.raw(uri, with_header).await;
        let json = serde_json::from_slice(&body)
            .unwrap_or(Value::String(String::from_utf8_lossy(&body).into()));
        (status, json)
    }

    pub async fn raw(&self, uri: &str, with_header: bool) -> (StatusCode, Vec<u8>) {
        let headers: &[(&str, &str)] = if with_header { &[MARK] } else { &[] };
        let req = request(Method::GET, uri, headers, Body::empty());
        let (status, _, body) = call(&self.api, req).await;
        (status, body)
    }

    /// The access token served for `account` (panics unless 200).
    pub async fn token(&self, account: &str) -> String {
        let (status, body) = self.get(&format!("/v1/token/{account}")).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        body["access_token"].as_str().unwrap().to_string()
    }

    pub async fn account_state(&self, account: &str) -> Value {
        let (_, body) = self.get("/v1/accounts").await;
        body["accounts"]
            .as_array()
            .unwrap()
            .iter()
            .find(|a| a["account"] == account)
            .cloned()
            .unwrap_or(Value::Null)
    }

    /// The state file's JSON.
    pub fn state_file(&self, account: &str) -> Value {
        let path = state_path(&self.state_dir, &AccountName::parse(account).unwrap());
        serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
    }
}

/// A store that fails its saves while `failing` is set: a full or read-only disk.
pub struct FlakyStore {
    pub inner: Arc<dyn Store>,
    pub failing: std::sync::atomic::AtomicBool,
}

impl Store for FlakyStore {
    fn load<'a>(&'a self, account: &'a AccountName) -> StoreFuture<'a, Option<State>> {
        self.inner.load(account)
    }

    fn save<'a>(&'a self, account: &'a AccountName, state: &'a State) -> StoreFuture<'a, ()> {
        if self.failing.load(std::sync::atomic::Ordering::SeqCst) {
            let account = account.clone();
            return Box::pin(async move {
                Err(tokend::store::StoreError::Write {
                    path: std::path::PathBuf::from(format!("{account}.json")),
                    account,
                    source: std::io::Error::from_raw_os_error(28), // ENOSPC
                })
            });
        }
        self.inner.save(account, state)
    }

    fn remove<'a>(&'a self, account: &'a AccountName) -> StoreFuture<'a, ()> {
        self.inner.remove(account)
    }

    fn location(&self, account: &AccountName) -> String {
        self.inner.location(account)
    }

    fn has_handoff<'a>(&'a self, account: &'a AccountName) -> StoreFuture<'a, bool> {
        self.inner.has_handoff(account)
    }

    fn load_handoff<'a>(
        &'a self,
        account: &'a AccountName,
    ) -> StoreFuture<'a, Option<tokend::store::Handoff>> {
        self.inner.load_handoff(account)
    }

    fn clear_handoff<'a>(&'a self, account: &'a AccountName) -> StoreFuture<'a, ()> {
        self.inner.clear_handoff(account)
    }

    fn record_spent<'a>(
        &'a self,
        account: &'a AccountName,
        fingerprint: &'a str,
        kind: tokend::store::SpentKind,
    ) -> StoreFuture<'a, ()> {
        self.inner.record_spent(account, fingerprint, kind)
    }

    fn spent<'a>(&'a self, fingerprint: &'a str) -> StoreFuture<'a, Option<tokend::store::Spent>> {
        self.inner.spent(fingerprint)
    }

    fn rename<'a>(&'a self, from: &'a AccountName, to: &'a AccountName) -> StoreFuture<'a, ()> {
        self.inner.rename(from, to)
    }

    fn set_aside<'a>(&'a self, account: &'a AccountName) -> StoreFuture<'a, Option<String>> {
        self.inner.set_aside(account)
    }

    fn drop_aside<'a>(&'a self, account: &'a AccountName, kept: &'a str) -> StoreFuture<'a, ()> {
        self.inner.drop_aside(account, kept)
    }

    fn put_handoff<'a>(
        &'a self,
        account: &'a AccountName,
        handoff: &'a tokend::store::Handoff,
    ) -> StoreFuture<'a, ()> {
        self.inner.put_handoff(account, handoff)
    }

    fn shared(&self) -> bool {
        self.inner.shared()
    }

    fn node_id(&self) -> &str {
        self.inner.node_id()
    }

    fn lease_ttl(&self) -> std::time::Duration {
        self.inner.lease_ttl()
    }

    fn acquire<'a>(
        &'a self,
        account: &'a AccountName,
        held: Option<Lease>,
    ) -> StoreFuture<'a, LeaseGrant> {
        self.inner.acquire(account, held)
    }

    fn renew<'a>(
        &'a self,
        held: &'a [(AccountName, Lease)],
    ) -> StoreFuture<'a, Vec<(AccountName, Lease)>> {
        self.inner.renew(held)
    }

    fn release<'a>(&'a self, account: &'a AccountName, lease: Lease) -> StoreFuture<'a, ()> {
        self.inner.release(account, lease)
    }

    fn holder<'a>(&'a self, account: &'a AccountName) -> StoreFuture<'a, Option<String>> {
        self.inner.holder(account)
    }

    fn replicas(&self) -> StoreFuture<'_, Vec<String>> {
        self.inner.replicas()
    }

    fn save_fenced<'a>(
        &'a self,
        account: &'a AccountName,
        state: &'a State,
        lease: Lease,
    ) -> StoreFuture<'a, ()> {
        if self.failing.load(std::sync::atomic::Ordering::SeqCst) {
            return self.save(account, state);
        }
        self.inner.save_fenced(account, state, lease)
    }

    fn subscribe(&self) -> tokio::sync::broadcast::Receiver<Change> {
        self.inner.subscribe()
    }

    fn request_refresh<'a>(&'a self, account: &'a AccountName) -> StoreFuture<'a, ()> {
        self.inner.request_refresh(account)
    }

    fn check(&self) -> StoreFuture<'_, String> {
        self.inner.check()
    }
}
