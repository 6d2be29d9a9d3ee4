//! The etcd [`Store`]: records, handoffs and the ledger as keys under `[state] prefix`,
//! per-account refresh leases on one etcd lease per replica, fenced writes as one txn,
//! and the change feed as one watch on the prefix. Keys are laid out in `keys`.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use etcd_client::{
    Certificate, Client, Compare, CompareOp, ConnectOptions, Identity, TlsOptions, Txn, TxnOp,
    TxnOpResponse,
};
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::{
    Change, FEED_CAPACITY, Handoff, Lease, LeaseGrant, Spent, SpentKind, State, Store, StoreError,
    StoreFuture,
};
use crate::config::{AccountName, StateBackend, StateConfig};
use crate::seal::Keyring;

mod feed;
mod keys;
mod lease;
mod records;

use keys::{Keys, SCHEMA_VERSION};
use lease::ReplicaLease;

const BACKEND: &str = "etcd";

/// A state store shared by the replicas through an etcd cluster.
pub struct EtcdStore {
    client: Client,
    keys: Keys,
    keyring: Option<Keyring>,
    node_id: String,
    lease_ttl: Duration,
    /// The bound on every request: a store that does not answer is unavailable.
    timeout: Duration,
    /// The endpoints as `scheme://host:port`, for messages.
    location: String,
    /// This replica's one etcd lease, which every account lease it holds is attached to.
    lease: tokio::sync::Mutex<ReplicaLease>,
    /// Per account, the record this instance last loaded or wrote: the second condition
    /// of a fenced write.
    seen: Mutex<HashMap<AccountName, Seen>>,
    feed: broadcast::Sender<Change>,
}

/// What this instance knows of an account's record: its `mod_revision` (0: none) as of
/// the store revision `at`. An older answer arriving late never overwrites a newer one.
#[derive(Debug, Clone, Copy)]
struct Seen {
    at: i64,
    mod_revision: i64,
}

impl EtcdStore {
    /// Connects to the cluster of `state.backend` (which must be etcd), checks or creates
    /// the schema key, takes this replica's etcd lease and starts the change feed on
    /// `tracker`, which ends when `cancel` is cancelled.
    pub async fn connect(
        state: &StateConfig,
        cancel: &CancellationToken,
        tracker: &TaskTracker,
    ) -> Result<Arc<EtcdStore>, StoreError> {
        let StateBackend::Etcd {
            endpoints,
            prefix,
            ca,
            identity,
        } = &state.backend
        else {
            return Err(StoreError::Unavailable {
                backend: BACKEND,
                location: state.backend.name().to_string(),
                detail: "the configured backend is not etcd".into(),
            });
        };
        let urls: Vec<String> = endpoints.iter().map(bare_url).collect();
        let location = urls.join(",");
        let timeout = request_timeout(state.lease_ttl);
        let unavailable = |detail: String| StoreError::Unavailable {
            backend: BACKEND,
            location: location.clone(),
            detail,
        };
        let mut options = ConnectOptions::new()
            .with_connect_timeout(timeout)
            // HTTP/2 pings find a dead connection under the watch; no more often than
            // etcd's --grpc-keepalive-min-time (5 s by default) allows, and only while a
            // stream is open (the watch's always is), or etcd drops the connection
            // ("too many pings") and every watch with it.
            .with_keep_alive(KEEPALIVE_INTERVAL, timeout)
            .with_keep_alive_while_idle(false)
            // A member cut off from the others answers "no leader" instead of stale data,
            // and ends its watches.
            .with_require_leader(true);
        if ca.is_some() || identity.is_some() {
            if let Some(plain) = urls.iter().find(|u| !u.starts_with("https://")) {
                return Err(unavailable(format!(
                    "{plain} is not https, but state.ca_file or a client certificate is set"
                )));
            }
            let mut tls = TlsOptions::new();
            if let Some(ca) = ca {
                tls = tls.ca_certificate(Certificate::from_pem(&ca.pem));
            }
            if let Some(id) = identity {
                tls = tls.identity(Identity::from_pem(
                    &id.certificate_pem,
                    id.key_pem.expose().as_bytes(),
                ));
            }
            options = options.with_tls(tls);
        } else if urls.iter().any(|u| u.starts_with("https://")) {
            // The client would trust no root at all: say so now, not at every request.
            return Err(unavailable(
                "https endpoints need state.ca_file, the CA that signed the cluster's certificates"
                    .into(),
            ));
        }
        let client = tokio::time::timeout(timeout, Client::connect(&urls, Some(options)))
            .await
            .map_err(|_| unavailable(format!("no connection within {timeout:?}")))?
            .map_err(|e| unavailable(format!("cannot connect: {e}")))?;
        let store = Arc::new(EtcdStore {
            client,
            keys: Keys::new(prefix),
            keyring: state.keyring.clone(),
            node_id: state.node_id.clone(),
            lease_ttl: state.lease_ttl,
            timeout,
            location,
            lease: tokio::sync::Mutex::new(ReplicaLease::none()),
            seen: Mutex::default(),
            feed: broadcast::channel(FEED_CAPACITY).0,
        });
        let revision = store.ensure_schema().await?;
        store.grant_replica_lease().await?;
        tracker.spawn(feed::run(Arc::clone(&store), revision + 1, cancel.clone()));
        Ok(store)
    }

    /// Creates the schema key when absent; refuses a layout this build does not know.
    /// Returns the store revision the answer was read at: the feed starts after it.
    async fn ensure_schema(&self) -> Result<i64, StoreError> {
        let key = self.keys.schema();
        let txn = Txn::new()
            .when([Compare::create_revision(key.as_str(), CompareOp::Equal, 0)])
            .and_then([TxnOp::put(key.as_str(), SCHEMA_VERSION, None)])
            .or_else([TxnOp::get(key.as_str(), None)]);
        let answer = self.txn("schema", txn).await?;
        let revision = answer.header().map_or(0, |h| h.revision());
        if answer.succeeded() {
            return Ok(revision);
        }
        let found = first_kv(&answer).map(|kv| String::from_utf8_lossy(kv.value()).into_owned());
        self.schema_matches(found)?;
        Ok(revision)
    }

    fn schema_matches(&self, found: Option<String>) -> Result<(), StoreError> {
        match found.as_deref() {
            Some(SCHEMA_VERSION) => Ok(()),
            other => Err(StoreError::Schema {
                backend: BACKEND,
                location: format!("{} (key {})", self.location, self.keys.schema()),
                found: other.unwrap_or("none").to_string(),
                wanted: SCHEMA_VERSION.to_string(),
            }),
        }
    }

    fn unavailable(&self, detail: String) -> StoreError {
        StoreError::Unavailable {
            backend: BACKEND,
            location: self.location.clone(),
            detail,
        }
    }

    /// Runs one request to the cluster within [`EtcdStore::timeout`]; `what` names it in
    /// the error. A request a member refused to connect for never left, so it is sent
    /// again (the client spreads requests over every endpoint, a dead member's too).
    async fn call<T, Fut>(
        &self,
        what: &str,
        mut request: impl FnMut() -> Fut,
    ) -> Result<T, StoreError>
    where
        Fut: Future<Output = Result<T, etcd_client::Error>>,
    {
        let deadline = tokio::time::Instant::now() + self.timeout;
        loop {
            match tokio::time::timeout_at(deadline, request()).await {
                Ok(Ok(answer)) => return Ok(answer),
                Ok(Err(e))
                    if refused(&e) && tokio::time::Instant::now() + RETRY_PAUSE < deadline =>
                {
                    tokio::time::sleep(RETRY_PAUSE).await;
                }
                Ok(Err(e)) => return Err(self.unavailable(format!("{what}: {e}"))),
                Err(_) => return Err(self.timed_out(what)),
            }
        }
    }

    fn timed_out(&self, what: &str) -> StoreError {
        self.unavailable(format!("{what}: no answer within {:?}", self.timeout))
    }

    async fn txn(&self, what: &str, txn: Txn) -> Result<etcd_client::TxnResponse, StoreError> {
        self.call(what, || {
            let (mut kv, txn) = (self.client.kv_client(), txn.clone());
            async move { kv.txn(txn).await }
        })
        .await
    }

    async fn get(
        &self,
        what: &str,
        key: &str,
        options: Option<etcd_client::GetOptions>,
    ) -> Result<etcd_client::GetResponse, StoreError> {
        self.call(what, || {
            let (mut kv, options) = (self.client.kv_client(), options.clone());
            async move { kv.get(key, options).await }
        })
        .await
    }

    async fn put(
        &self,
        what: &str,
        key: impl Into<Vec<u8>>,
        value: impl Into<Vec<u8>>,
        options: Option<etcd_client::PutOptions>,
    ) -> Result<etcd_client::PutResponse, StoreError> {
        let (key, value) = (key.into(), value.into());
        self.call(what, || {
            let mut kv = self.client.kv_client();
            let (key, value, options) = (key.clone(), value.clone(), options.clone());
            async move { kv.put(key, value, options).await }
        })
        .await
    }

    async fn delete(
        &self,
        what: &str,
        key: impl Into<Vec<u8>>,
    ) -> Result<etcd_client::DeleteResponse, StoreError> {
        let key = key.into();
        self.call(what, || {
            let (mut kv, key) = (self.client.kv_client(), key.clone());
            async move { kv.delete(key, None).await }
        })
        .await
    }

    /// Notes what this instance saw of `account`'s record at store revision `at`.
    fn saw(&self, account: &AccountName, at: i64, mod_revision: i64) {
        let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        let entry = seen
            .entry(account.clone())
            .or_insert(Seen { at, mod_revision });
        if at >= entry.at {
            *entry = Seen { at, mod_revision };
        }
    }

    /// The `mod_revision` of `account`'s record as this instance last saw it (0: none).
    fn last_seen(&self, account: &AccountName) -> i64 {
        let seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        seen.get(account).map_or(0, |s| s.mod_revision)
    }

    async fn check_cluster(&self) -> Result<String, StoreError> {
        let members = self
            .call("member list", || {
                let mut cluster = self.client.cluster_client();
                async move { cluster.member_list().await }
            })
            .await?;
        let status = self
            .call("status", || {
                let mut maintenance = self.client.maintenance_client();
                async move { maintenance.status().await }
            })
            .await?;
        let schema = self.get("schema", &self.keys.schema(), None).await?;
        let found = schema
            .kvs()
            .first()
            .map(|kv| String::from_utf8_lossy(kv.value()).into_owned());
        self.schema_matches(found)?;
        Ok(format!(
            "etcd store at {}: reachable, {} members, leader {:x}; key prefix {:?}, schema version {SCHEMA_VERSION}",
            self.location,
            members.members().len(),
            status.leader(),
            self.keys.prefix(),
        ))
    }
}

/// How often an idle connection is pinged: twice etcd's default minimum.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);

/// How long to wait before sending a refused request again.
const RETRY_PAUSE: Duration = Duration::from_millis(20);

/// Whether `e` is a member refusing the connection: the request was never sent.
fn refused(e: &etcd_client::Error) -> bool {
    let etcd_client::Error::GRpcStatus(status) = e else {
        return false;
    };
    let mut cause = std::error::Error::source(status);
    while let Some(c) = cause {
        if c.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::ConnectionRefused)
        {
            return true;
        }
        cause = c.source();
    }
    false
}

/// A request's bound: a third of the lease lifetime (a holder renews that often), at
/// least a second.
fn request_timeout(lease_ttl: Duration) -> Duration {
    (lease_ttl / 3).max(Duration::from_secs(1))
}

/// `scheme://host:port` of an endpoint: no user information, no trailing slash.
fn bare_url(url: &url::Url) -> String {
    let host = url.host_str().unwrap_or_default();
    match url.port_or_known_default() {
        Some(port) => format!("{}://{host}:{port}", url.scheme()),
        None => format!("{}://{host}", url.scheme()),
    }
}

/// The first key-value of the last range answer in a txn's responses.
fn first_kv(answer: &etcd_client::TxnResponse) -> Option<etcd_client::KeyValue> {
    answer
        .op_responses()
        .into_iter()
        .rev()
        .find_map(|r| match r {
            TxnOpResponse::Get(get) => get.kvs().first().cloned(),
            _ => None,
        })
}

impl Store for EtcdStore {
    fn load<'a>(&'a self, account: &'a AccountName) -> StoreFuture<'a, Option<State>> {
        Box::pin(self.load_record(account))
    }

    fn save<'a>(&'a self, account: &'a AccountName, state: &'a State) -> StoreFuture<'a, ()> {
        Box::pin(self.save_record(account, state))
    }

    fn remove<'a>(&'a self, account: &'a AccountName) -> StoreFuture<'a, ()> {
        Box::pin(self.remove_record(account))
    }

    fn location(&self, account: &AccountName) -> String {
        format!("etcd {}", self.keys.record(account))
    }

    fn has_handoff<'a>(&'a self, account: &'a AccountName) -> StoreFuture<'a, bool> {
        Box::pin(async move {
            let options = etcd_client::GetOptions::new().with_count_only();
            let key = self.keys.handoff(account);
            Ok(self.get("handoff", &key, Some(options)).await?.count() > 0)
        })
    }

    fn load_handoff<'a>(&'a self, account: &'a AccountName) -> StoreFuture<'a, Option<Handoff>> {
        Box::pin(self.load_handoff_record(account))
    }

    fn put_handoff<'a>(
        &'a self,
        account: &'a AccountName,
        handoff: &'a Handoff,
    ) -> StoreFuture<'a, ()> {
        Box::pin(self.put_handoff_record(account, handoff))
    }

    fn clear_handoff<'a>(&'a self, account: &'a AccountName) -> StoreFuture<'a, ()> {
        Box::pin(async move {
            let key = self.keys.handoff(account);
            self.delete("clear handoff", key).await.map(drop)
        })
    }

    fn record_spent<'a>(
        &'a self,
        account: &'a AccountName,
        fingerprint: &'a str,
        kind: SpentKind,
    ) -> StoreFuture<'a, ()> {
        Box::pin(self.record_spent_entry(account, fingerprint, kind))
    }

    fn spent<'a>(&'a self, fingerprint: &'a str) -> StoreFuture<'a, Option<Spent>> {
        Box::pin(self.spent_entry(fingerprint))
    }

    fn rename<'a>(&'a self, from: &'a AccountName, to: &'a AccountName) -> StoreFuture<'a, ()> {
        Box::pin(self.rename_record(from, to))
    }

    fn set_aside<'a>(&'a self, account: &'a AccountName) -> StoreFuture<'a, Option<String>> {
        Box::pin(self.set_record_aside(account))
    }

    fn drop_aside<'a>(&'a self, account: &'a AccountName, kept: &'a str) -> StoreFuture<'a, ()> {
        Box::pin(async move {
            // Only a key `set_aside` makes for this account.
            let Some(name) = kept.strip_prefix(&self.keys.aside(account)) else {
                return Ok(());
            };
            if name.is_empty() || name.contains('/') {
                return Ok(());
            }
            self.delete("drop aside", kept).await.map(drop)
        })
    }

    fn shared(&self) -> bool {
        true
    }

    fn node_id(&self) -> &str {
        &self.node_id
    }

    fn lease_ttl(&self) -> Duration {
        self.lease_ttl
    }

    fn acquire<'a>(
        &'a self,
        account: &'a AccountName,
        held: Option<Lease>,
    ) -> StoreFuture<'a, LeaseGrant> {
        Box::pin(self.acquire_lease(account, held))
    }

    fn renew<'a>(
        &'a self,
        held: &'a [(AccountName, Lease)],
    ) -> StoreFuture<'a, Vec<(AccountName, Lease)>> {
        Box::pin(self.renew_leases(held))
    }

    fn release<'a>(&'a self, account: &'a AccountName, lease: Lease) -> StoreFuture<'a, ()> {
        Box::pin(self.release_lease(account, lease))
    }

    fn holder<'a>(&'a self, account: &'a AccountName) -> StoreFuture<'a, Option<String>> {
        Box::pin(async move {
            let answer = self
                .get("lease holder", &self.keys.lease(account), None)
                .await?;
            Ok(answer
                .kvs()
                .first()
                .map(|kv| String::from_utf8_lossy(kv.value()).into_owned()))
        })
    }

    fn replicas(&self) -> StoreFuture<'_, Vec<String>> {
        Box::pin(async move {
            let options = etcd_client::GetOptions::new().with_prefix();
            let answer = self
                .get("replicas", &self.keys.nodes(), Some(options))
                .await?;
            let mut ids: Vec<String> = answer
                .kvs()
                .iter()
                .map(|kv| String::from_utf8_lossy(kv.value()).into_owned())
                .collect();
            ids.sort();
            ids.dedup();
            Ok(ids)
        })
    }

    fn save_fenced<'a>(
        &'a self,
        account: &'a AccountName,
        state: &'a State,
        lease: Lease,
    ) -> StoreFuture<'a, ()> {
        Box::pin(self.save_record_fenced(account, state, lease))
    }

    fn subscribe(&self) -> broadcast::Receiver<Change> {
        self.feed.subscribe()
    }

    fn request_refresh<'a>(&'a self, account: &'a AccountName) -> StoreFuture<'a, ()> {
        Box::pin(async move {
            // Every put is an event, even of the same value: each demand reaches the holder.
            let key = self.keys.demand(account);
            let node_id = self.node_id.as_str();
            self.put("request refresh", key, node_id, None)
                .await
                .map(drop)
        })
    }

    fn check(&self) -> StoreFuture<'_, String> {
        Box::pin(self.check_cluster())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_are_named_without_credentials_or_slash() {
        let url = url::Url::parse("https://user:pw@etcd.example:2379/").unwrap();
        assert_eq!(bare_url(&url), "https://etcd.example:2379");
        let url = url::Url::parse("http://127.0.0.1:12379").unwrap();
        assert_eq!(bare_url(&url), "http://127.0.0.1:12379");
    }

    #[test]
    fn requests_are_bounded_by_a_third_of_the_lease_but_at_least_a_second() {
        assert_eq!(
            request_timeout(Duration::from_secs(15)),
            Duration::from_secs(5)
        );
        assert_eq!(
            request_timeout(Duration::from_secs(2)),
            Duration::from_secs(1)
        );
    }
}
