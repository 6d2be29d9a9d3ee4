//! The PostgreSQL [`Store`]: one row per account holding its record (the same sealed
//! bytes as a state file), its lease and a version, so that a holder's write is fenced by
//! one conditional `UPDATE` judged on the database's clock; LISTEN/NOTIFY is the feed.

use std::collections::{HashMap, HashSet};
use std::io;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use tokio::sync::broadcast;
use tokio::time::Instant;
use tokio_postgres::Client;
use tokio_util::sync::{CancellationToken, DropGuard};
use tokio_util::task::TaskTracker;
use zeroize::Zeroizing;

use super::spent::record;
use super::wire::{decode, decode_handoff, encode, encode_handoff};
use super::{
    Change, FEED_CAPACITY, Handoff, Lease, LeaseGrant, Spent, SpentKind, State, Store, StoreError,
    StoreFuture,
};
use crate::config::{AccountName, StateBackend, StateConfig};
use crate::seal::Keyring;

mod feed;
mod link;
mod schema;
mod tls;

use link::{BACKEND, Link, Target};
use schema::{SCHEMA_VERSION, Sql};

/// The PostgreSQL-backed store, shared by every replica pointed at the same tables.
pub struct PostgresStore {
    link: Arc<Link>,
    sql: Sql,
    keyring: Option<Keyring>,
    lease_ttl: Duration,
    node_id: String,
    /// The row version this instance last loaded or wrote, per account: what
    /// `save_fenced` requires to be still current.
    versions: Mutex<HashMap<AccountName, i64>>,
    feed: broadcast::Sender<Change>,
    /// Ends the feed and the connections when the store goes, if shutdown has not already.
    _stop: DropGuard,
}

impl PostgresStore {
    /// Connects to `[state] url`, creates the tables if absent (or refuses a schema it
    /// does not know), announces this replica and starts listening for changes. The
    /// background tasks run on `tracker` until `cancel` (or the store is dropped).
    pub async fn connect(
        state: &StateConfig,
        cancel: &CancellationToken,
        tracker: &TaskTracker,
    ) -> Result<Arc<PostgresStore>, StoreError> {
        let StateBackend::Postgres { url, prefix, ca } = &state.backend else {
            return Err(StoreError::Unavailable {
                backend: BACKEND,
                location: "(state)".into(),
                detail: format!(
                    "[state] backend is {:?}, not postgres",
                    state.backend.name()
                ),
            });
        };
        // A third of a lease: a renewal that fails fast leaves time for another.
        let timeout = (state.lease_ttl / 3).max(Duration::from_secs(1));
        let target = Target::new(url, ca.as_deref(), timeout, state.lease_ttl)?;
        let stop = cancel.child_token();
        let link = Arc::new(Link::new(target, timeout, stop.clone(), tracker.clone()));
        let sql = Sql::new(prefix, state.lease_ttl);
        let (mut client, driver) = link.dedicated().await?;
        let version = ensure_schema(&link, &sql, &mut client).await?;
        drop((client, driver));
        if version != SCHEMA_VERSION {
            return Err(StoreError::Schema {
                backend: BACKEND,
                location: format!("{} tables {prefix}*", link.target.location),
                found: version.to_string(),
                wanted: SCHEMA_VERSION.to_string(),
            });
        }
        link.query(&sql.heartbeat, &[&state.node_id]).await?;
        let feed = broadcast::channel(FEED_CAPACITY).0;
        let first = feed::listen(&link, &sql.channel, &feed).await?;
        tracker.spawn(feed::run(
            Arc::clone(&link),
            sql.channel.clone(),
            feed.clone(),
            stop.clone(),
            first,
        ));
        Ok(Arc::new(PostgresStore {
            link,
            sql,
            keyring: state.keyring.clone(),
            lease_ttl: state.lease_ttl,
            node_id: state.node_id.clone(),
            versions: Mutex::default(),
            feed,
            _stop: stop.drop_guard(),
        }))
    }

    fn seen(&self, account: &AccountName, version: i64) {
        self.versions
            .lock()
            .expect("version table")
            .insert(account.clone(), version);
    }

    fn last_seen(&self, account: &AccountName) -> Option<i64> {
        self.versions
            .lock()
            .expect("version table")
            .get(account)
            .copied()
    }

    fn lease(&self, epoch: i64, sent: Instant) -> Lease {
        Lease {
            epoch: u64::try_from(epoch).unwrap_or(0),
            until: sent + self.lease_ttl,
        }
    }

    fn row_location(&self, table: &str, account: &AccountName) -> String {
        format!(
            "postgres {} table {table} row {account}",
            self.link.target.location
        )
    }

    /// A stored record or handoff this tokend cannot open (another key, another
    /// format): reported, and left where it is for every replica.
    fn unreadable(&self, location: String, account: &AccountName, reason: String) -> StoreError {
        StoreError::Read {
            account: account.clone(),
            path: PathBuf::from(location),
            source: io::Error::new(io::ErrorKind::InvalidData, reason),
        }
    }

    fn decode_record(&self, account: &AccountName, bytes: Vec<u8>) -> Result<State, StoreError> {
        let bytes = Zeroizing::new(bytes);
        decode(&bytes, account, self.keyring.as_ref())
            .map_err(|reason| self.unreadable(self.location(account), account, reason))
    }

    /// [`Store::rename`] in one transaction on a connection of its own.
    async fn rename_in(
        &self,
        client: &mut Client,
        from: &AccountName,
        to: &AccountName,
    ) -> Result<(i64, i64), StoreError> {
        let db = |e: tokio_postgres::Error| self.link.failed(&e);
        let tx = client.transaction().await.map_err(db)?;
        let names = vec![from.as_str(), to.as_str()];
        let (mut moved, mut existing) = (None, None);
        for row in tx.query(&self.sql.lock_rows, &[&names]).await.map_err(db)? {
            let (account, bytes): (&str, Option<Vec<u8>>) = (row.get(0), row.get(1));
            if account == from.as_str() {
                moved = bytes;
            } else {
                existing = bytes;
            }
        }
        let Some(bytes) = moved else {
            return Err(StoreError::NothingToMove {
                account: from.clone(),
                path: PathBuf::from(self.location(from)),
            });
        };
        let mut state = self.decode_record(from, bytes)?;
        let target = existing.map(|b| self.decode_record(to, b)).transpose()?;
        if let Some(rt) = target.and_then(|t| t.refresh_token)
            && Some(&rt) != state.refresh_token.as_ref()
        {
            return Err(StoreError::Occupied {
                account: to.clone(),
                path: PathBuf::from(self.location(to)),
            });
        }
        // A copy kept aside under the old name stays for a human.
        state.replaced = None;
        let bytes = Zeroizing::new(encode(to, &state, self.keyring.as_ref()));
        let saved = tx.query(&self.sql.save, &[&to.as_str(), &*bytes]).await;
        let to_version = saved.map_err(db)?.first().map_or(0, |r| r.get(0));
        let removed = tx.query(&self.sql.remove, &[&from.as_str()]).await;
        let from_version = removed.map_err(db)?.first().map_or(0, |r| r.get(0));
        tx.execute(&self.sql.move_spent, &[&from.as_str(), &to.as_str()])
            .await
            .map_err(db)?;
        tx.commit().await.map_err(db)?;
        Ok((from_version, to_version))
    }
}

/// The schema, created if need be, within a bound: replicas starting together wait for
/// each other's creation on the advisory lock.
async fn ensure_schema(link: &Link, sql: &Sql, client: &mut Client) -> Result<i32, StoreError> {
    let bound = link.timeout.max(Duration::from_secs(10));
    match tokio::time::timeout(bound, sql.ensure(client)).await {
        Ok(Ok(version)) => Ok(version),
        Ok(Err(e)) => Err(link.unavailable(format!(
            "cannot create or read the tables: {}",
            link::describe(&e)
        ))),
        Err(_) => Err(link.unavailable(format!(
            "creating or reading the tables took longer than {bound:?}"
        ))),
    }
}

fn kind_name(kind: SpentKind) -> &'static str {
    match kind {
        SpentKind::Seed => "seed",
        SpentKind::Handover => "handover",
    }
}

impl Store for PostgresStore {
    fn load<'a>(&'a self, account: &'a AccountName) -> StoreFuture<'a, Option<State>> {
        Box::pin(async move {
            let rows = self
                .link
                .query(&self.sql.load, &[&account.as_str()])
                .await?;
            let Some(row) = rows.first() else {
                self.seen(account, 0);
                return Ok(None);
            };
            self.seen(account, row.get(1));
            match row.get::<_, Option<Vec<u8>>>(0) {
                None => Ok(None),
                Some(bytes) => self.decode_record(account, bytes).map(Some),
            }
        })
    }

    fn save<'a>(&'a self, account: &'a AccountName, state: &'a State) -> StoreFuture<'a, ()> {
        Box::pin(async move {
            let bytes = Zeroizing::new(encode(account, state, self.keyring.as_ref()));
            let saved = self
                .link
                .query(&self.sql.save, &[&account.as_str(), &*bytes])
                .await?;
            if let Some(row) = saved.first() {
                self.seen(account, row.get(0));
            }
            Ok(())
        })
    }

    fn remove<'a>(&'a self, account: &'a AccountName) -> StoreFuture<'a, ()> {
        Box::pin(async move {
            let rows = self
                .link
                .query(&self.sql.remove, &[&account.as_str()])
                .await?;
            if let Some(row) = rows.first() {
                self.seen(account, row.get(0));
            }
            Ok(())
        })
    }

    fn location(&self, account: &AccountName) -> String {
        self.row_location(&self.sql.accounts, account)
    }

    fn has_handoff<'a>(&'a self, account: &'a AccountName) -> StoreFuture<'a, bool> {
        Box::pin(async move {
            let rows = self
                .link
                .query(&self.sql.has_handoff, &[&account.as_str()])
                .await?;
            Ok(!rows.is_empty())
        })
    }

    fn load_handoff<'a>(&'a self, account: &'a AccountName) -> StoreFuture<'a, Option<Handoff>> {
        Box::pin(async move {
            let rows = self
                .link
                .query(&self.sql.load_handoff, &[&account.as_str()])
                .await?;
            let Some(bytes) = rows.first().map(|r| Zeroizing::new(r.get::<_, Vec<u8>>(0))) else {
                return Ok(None);
            };
            decode_handoff(&bytes, account, self.keyring.as_ref())
                .map(Some)
                .map_err(|reason| {
                    let at = self.row_location(&self.sql.handoffs, account);
                    self.unreadable(at, account, reason)
                })
        })
    }

    fn put_handoff<'a>(
        &'a self,
        account: &'a AccountName,
        handoff: &'a Handoff,
    ) -> StoreFuture<'a, ()> {
        Box::pin(async move {
            let bytes = Zeroizing::new(encode_handoff(account, handoff, self.keyring.as_ref()));
            self.link
                .query(&self.sql.put_handoff, &[&account.as_str(), &*bytes])
                .await
                .map(drop)
        })
    }

    fn clear_handoff<'a>(&'a self, account: &'a AccountName) -> StoreFuture<'a, ()> {
        Box::pin(async move {
            self.link
                .query(&self.sql.clear_handoff, &[&account.as_str()])
                .await
                .map(drop)
        })
    }

    fn record_spent<'a>(
        &'a self,
        account: &'a AccountName,
        fingerprint: &'a str,
        kind: SpentKind,
    ) -> StoreFuture<'a, ()> {
        Box::pin(async move {
            let at = record(account, kind).at;
            self.link
                .query(
                    &self.sql.record_spent,
                    &[&fingerprint, &account.as_str(), &at, &kind_name(kind)],
                )
                .await
                .map(drop)
        })
    }

    fn spent<'a>(&'a self, fingerprint: &'a str) -> StoreFuture<'a, Option<Spent>> {
        Box::pin(async move {
            let rows = self.link.query(&self.sql.spent, &[&fingerprint]).await?;
            let Some(row) = rows.first() else {
                return Ok(None);
            };
            let (account, at, kind): (&str, SystemTime, &str) =
                (row.get(0), row.get(1), row.get(2));
            let account = AccountName::parse(account).map_err(|e| {
                self.link.unavailable(format!(
                    "the ledger of spent refresh tokens holds a bad entry: {e}"
                ))
            })?;
            let kind = if kind == "seed" {
                SpentKind::Seed
            } else {
                SpentKind::Handover
            };
            Ok(Some(Spent { account, at, kind }))
        })
    }

    fn rename<'a>(&'a self, from: &'a AccountName, to: &'a AccountName) -> StoreFuture<'a, ()> {
        Box::pin(async move {
            let (mut client, _driver) = self.link.dedicated().await?;
            let bound = self.link.timeout;
            let renamed = tokio::time::timeout(bound, self.rename_in(&mut client, from, to))
                .await
                .map_err(|_| self.link.unavailable(format!("no answer within {bound:?}")))?;
            let (from_version, to_version) = renamed?;
            self.seen(from, from_version);
            self.seen(to, to_version);
            Ok(())
        })
    }

    fn set_aside<'a>(&'a self, account: &'a AccountName) -> StoreFuture<'a, Option<String>> {
        Box::pin(async move {
            let rows = self
                .link
                .query(&self.sql.set_aside, &[&account.as_str()])
                .await?;
            Ok(rows.first().map(|r| r.get(0)))
        })
    }

    fn drop_aside<'a>(&'a self, account: &'a AccountName, kept: &'a str) -> StoreFuture<'a, ()> {
        Box::pin(async move {
            self.link
                .query(&self.sql.drop_aside, &[&account.as_str(), &kept])
                .await
                .map(drop)
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
        Box::pin(async move {
            let sent = Instant::now();
            let held_epoch = held.map_or(-1, |l| i64::try_from(l.epoch).unwrap_or(-1));
            let rows = self
                .link
                .query(
                    &self.sql.acquire,
                    &[&account.as_str(), &self.node_id, &held_epoch],
                )
                .await?;
            let row = rows
                .first()
                .ok_or_else(|| self.link.unavailable("no answer row"))?;
            if let Some(epoch) = row.get::<_, Option<i64>>(0) {
                return Ok(LeaseGrant::Held(self.lease(epoch, sent)));
            }
            let holder = match row.get::<_, Option<String>>(1) {
                Some(h) => Some(h),
                // Another replica created the row while this statement ran.
                None => self
                    .link
                    .query(&self.sql.holder_now, &[&account.as_str()])
                    .await?
                    .first()
                    .and_then(|r| r.get(0)),
            };
            Ok(LeaseGrant::HeldBy(
                holder.unwrap_or_else(|| "another replica".into()),
            ))
        })
    }

    fn renew<'a>(
        &'a self,
        held: &'a [(AccountName, Lease)],
    ) -> StoreFuture<'a, Vec<(AccountName, Lease)>> {
        Box::pin(async move {
            let sent = Instant::now();
            let accounts: Vec<&str> = held.iter().map(|(a, _)| a.as_str()).collect();
            let epochs: Vec<i64> = held
                .iter()
                .map(|(_, l)| i64::try_from(l.epoch).unwrap_or(-1))
                .collect();
            let rows = self
                .link
                .query(&self.sql.renew, &[&self.node_id, &accounts, &epochs])
                .await?;
            let kept: HashSet<(&str, i64)> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
            Ok(held
                .iter()
                .zip(epochs)
                .filter(|((a, _), epoch)| kept.contains(&(a.as_str(), *epoch)))
                .map(|((a, _), epoch)| (a.clone(), self.lease(epoch, sent)))
                .collect())
        })
    }

    fn release<'a>(&'a self, account: &'a AccountName, lease: Lease) -> StoreFuture<'a, ()> {
        Box::pin(async move {
            let epoch = i64::try_from(lease.epoch).unwrap_or(-1);
            self.link
                .query(
                    &self.sql.release,
                    &[&account.as_str(), &self.node_id, &epoch],
                )
                .await
                .map(drop)
        })
    }

    fn holder<'a>(&'a self, account: &'a AccountName) -> StoreFuture<'a, Option<String>> {
        Box::pin(async move {
            let rows = self
                .link
                .query(&self.sql.holder, &[&account.as_str()])
                .await?;
            Ok(rows.first().map(|r| r.get(0)))
        })
    }

    fn replicas(&self) -> StoreFuture<'_, Vec<String>> {
        Box::pin(async move {
            let rows = self.link.query(&self.sql.replicas, &[]).await?;
            let mut nodes: Vec<String> = rows.iter().map(|r| r.get(0)).collect();
            if !nodes.contains(&self.node_id) {
                nodes.push(self.node_id.clone());
                nodes.sort();
            }
            Ok(nodes)
        })
    }

    fn save_fenced<'a>(
        &'a self,
        account: &'a AccountName,
        state: &'a State,
        lease: Lease,
    ) -> StoreFuture<'a, ()> {
        Box::pin(async move {
            let fenced = || StoreError::Fenced {
                account: account.clone(),
                epoch: lease.epoch,
            };
            // Never read here: nothing to say the record is still the one it replaces.
            let version = self.last_seen(account).ok_or_else(fenced)?;
            let epoch = i64::try_from(lease.epoch).map_err(|_| fenced())?;
            let bytes = Zeroizing::new(encode(account, state, self.keyring.as_ref()));
            let params: [&(dyn tokio_postgres::types::ToSql + Sync); 5] =
                [&account.as_str(), &*bytes, &self.node_id, &epoch, &version];
            let saved = self.link.query(&self.sql.save_fenced, &params).await;
            let row = saved?.into_iter().next().ok_or_else(fenced)?;
            self.seen(account, row.get(0));
            Ok(())
        })
    }

    fn subscribe(&self) -> broadcast::Receiver<Change> {
        self.feed.subscribe()
    }

    fn request_refresh<'a>(&'a self, account: &'a AccountName) -> StoreFuture<'a, ()> {
        Box::pin(async move {
            let payload = format!("demand:{account}");
            self.link
                .query(&self.sql.notify, &[&payload])
                .await
                .map(drop)
        })
    }

    fn check(&self) -> StoreFuture<'_, String> {
        Box::pin(async move {
            let rows = self.link.query(&self.sql.check, &[]).await?;
            let row = rows
                .first()
                .ok_or_else(|| self.link.unavailable("no answer row"))?;
            let (version, server, ssl): (Option<i32>, String, Option<bool>) =
                (row.get(0), row.get(1), row.get(2));
            let target = &self.link.target;
            if version != Some(SCHEMA_VERSION) {
                return Err(StoreError::Schema {
                    backend: BACKEND,
                    location: format!("{} tables {}*", target.location, self.sql.prefix()),
                    found: version.map_or_else(|| "none".into(), |v| v.to_string()),
                    wanted: SCHEMA_VERSION.to_string(),
                });
            }
            Ok(format!(
                "postgres store {}: reachable, PostgreSQL {server}, schema version {SCHEMA_VERSION} (current), tables {}*, this connection {} ({}), node id {}, lease_ttl {:?}",
                target.location,
                self.sql.prefix(),
                if ssl == Some(true) {
                    "encrypted"
                } else {
                    "in clear"
                },
                target.tls_checks,
                self.node_id,
                self.lease_ttl,
            ))
        })
    }
}
