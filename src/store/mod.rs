//! Durable per-account state behind a narrow [`Store`] interface, and the handoffs
//! through which `tokend login`, `import` and `logout` give an account a new refresh
//! token (or none). The interface is what a second backend (a shared, distributed store)
//! must provide. Outside it, only the operator commands name a state file (to say where
//! it is) and the sinks borrow its durable write.
//!
//! Inside: `file` is the file-backed store (one JSON file per account in a locked,
//! private directory), `wire` its on-disk format (sealed with [`crate::seal`] when a key
//! is set), `atomic` its durable writes, `spent` its ledger of spent refresh tokens, and
//! `handoff` the handoff protocol.

use std::future::Future;
use std::io;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::time::SystemTime;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::{AccountName, StateBackend, StateConfig};
use crate::secret::Secret;

mod atomic;
mod etcd;
mod file;
mod handoff;
mod lease;
mod postgres;
mod safe_path;
mod spent;
mod wire;

pub(crate) use atomic::write_atomically;
pub use etcd::EtcdStore;
pub use file::{
    FileStore, handoff_path, lock_path, moved_path, peek_handoff, peek_spent, peek_state,
    state_path,
};
pub use handoff::{Delivery, apply_pending, deliver_handoff};
pub use lease::{Change, FEED_CAPACITY, Lease, LeaseGrant};
pub use postgres::PostgresStore;
pub use safe_path::PathProblem;
pub use spent::{LEDGER_FILE, spent_fingerprint};
pub use wire::FORMAT_VERSION;

/// Opens the store `[state]` names: the file store's directory (locked), or a connection
/// to the shared store whose background tasks run on `tracker` until `cancel`.
pub async fn open(
    state: &StateConfig,
    cancel: &CancellationToken,
    tracker: &TaskTracker,
) -> Result<Arc<dyn Store>, StoreError> {
    match &state.backend {
        StateBackend::File => Ok(FileStore::open_sealed(&state.dir, state.keyring.clone())?),
        StateBackend::Postgres { .. } => Ok(PostgresStore::connect(state, cancel, tracker).await?),
        StateBackend::Etcd { .. } => Ok(EtcdStore::connect(state, cancel, tracker).await?),
    }
}

/// How many refresh tokens an account's chain remembers having rotated away
/// ([`State::spent`]).
pub const CHAIN_MEMORY: usize = 32;

/// What survives a restart for one account.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct State {
    pub refresh_token: Option<Secret>,
    /// Fingerprint of the config seed this refresh token descends from: a different seed
    /// in the config means the operator re-seeded, and the new seed wins.
    pub seed_fingerprint: Option<String>,
    /// When the current refresh token was issued (first seen).
    pub refresh_token_issued_at: Option<SystemTime>,
    /// When the provider said the refresh token expires (`refresh_token_expires_in`).
    pub refresh_token_expires_at: Option<SystemTime>,
    pub access: Option<AccessToken>,
    /// Set before a refresh that may rotate the refresh token is sent, cleared by the
    /// save that records its outcome. Found set at start, it means the process died with
    /// a rotation in flight.
    pub refresh_in_flight_since: Option<SystemTime>,
    /// Last successful refresh.
    pub last_refresh: Option<SystemTime>,
    /// [`spent_fingerprint`]s of the refresh tokens this chain rotated away, oldest first,
    /// at most [`CHAIN_MEMORY`]: written with the rotation, so it costs no extra write.
    pub spent: Vec<String>,
    /// The record this one replaced (`tokend login`/`import`), kept aside until the new
    /// chain has refreshed once in the daemon: where the store keeps it.
    pub replaced: Option<String>,
}

impl State {
    /// Remembers `token` as rotated away by this chain.
    pub fn remember_spent(&mut self, token: &Secret) {
        self.spent.push(spent_fingerprint(token));
        let over = self.spent.len().saturating_sub(CHAIN_MEMORY);
        self.spent.drain(..over);
    }
}

/// A refresh token presented to the provider, in the ledger of spent ones.
#[derive(Debug, Clone, PartialEq)]
pub struct Spent {
    /// The account that presented it.
    pub account: AccountName,
    /// When it was recorded, just before it was first presented.
    pub at: SystemTime,
    pub kind: SpentKind,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SpentKind {
    /// The config's seed `refresh_token`.
    Seed,
    /// A token handed over by `tokend login` or `import`.
    Handover,
}

/// Why a refresh token must not be presented (again): see [`peek_spent`].
#[derive(Debug, Clone, PartialEq)]
pub enum SpentBy {
    /// In the ledger: a seed or a handed-over token, presented already.
    Ledger(Spent),
    /// Rotated away by this account's chain.
    Rotated(AccountName),
    /// The current refresh token of this account: presenting it elsewhere would rotate
    /// it away under the account's feet.
    InUse(AccountName),
}

impl std::fmt::Display for SpentBy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SpentBy::Ledger(s) => {
                let what = match s.kind {
                    SpentKind::Seed => "the configured seed refresh_token of",
                    SpentKind::Handover => "the token handed over by tokend login/import to",
                };
                write!(
                    f,
                    "it was {what} account {}, first presented at {}",
                    s.account,
                    crate::clock::rfc3339(s.at)
                )
            }
            SpentBy::Rotated(a) => write!(f, "account {a} rotated it away already"),
            SpentBy::InUse(a) => write!(f, "it is account {a}'s current refresh token"),
        }
    }
}

/// An access token as issued, with its wall-clock expiry.
#[derive(Debug, Clone, PartialEq)]
pub struct AccessToken {
    pub token: Secret,
    pub token_type: String,
    pub expires_at: SystemTime,
    pub scope: Option<String>,
    pub issued_at: SystemTime,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot use state directory {dir}: {source}")]
    Dir { dir: PathBuf, source: io::Error },
    #[error("state directory {dir} is locked by another running tokend ({holder})")]
    Locked {
        dir: PathBuf,
        holder: String,
        /// The holder's pid, as it wrote it into the lock file.
        pid: Option<i32>,
    },
    #[error(
        "state directory {dir} is writable by other users (mode {mode:o}); run chmod 700 on it"
    )]
    Insecure { dir: PathBuf, mode: u32 },
    #[error(
        "state directory {dir} belongs to uid {owner}, not to this process (uid {me}); chown it or pick another"
    )]
    NotOwner { dir: PathBuf, owner: u32, me: u32 },
    #[error("refusing state directory {dir}: {problem}")]
    UnsafePath { dir: PathBuf, problem: PathProblem },
    #[error("cannot read state for account {account} from {path}: {source}")]
    Read {
        account: AccountName,
        path: PathBuf,
        source: io::Error,
    },
    #[error(
        "state for account {account} in {path} is unreadable ({reason}); it was kept aside as {kept_as}"
    )]
    Corrupt {
        account: AccountName,
        path: PathBuf,
        reason: String,
        kept_as: PathBuf,
    },
    #[error("cannot write state for account {account} to {path}: {source}")]
    Write {
        account: AccountName,
        path: PathBuf,
        source: io::Error,
    },
    #[error("cannot use the ledger of spent refresh tokens {path}: {source}")]
    Ledger { path: PathBuf, source: io::Error },
    #[error("account {account} has no state in {path}: there is nothing to move")]
    NothingToMove { account: AccountName, path: PathBuf },
    #[error(
        "account {account} already has a refresh token in {path}: move that file away first if it is not needed"
    )]
    Occupied { account: AccountName, path: PathBuf },
    /// `tokend state copy` copied this state directory to another store and left its
    /// marker: a daemon on it would refresh the chains the other store holds (a fork).
    #[error(
        "state directory {dir} was copied to {to} by `tokend state copy`: a tokend on it would refresh the refresh tokens that store holds now (two holders fork them). Run tokend with that store's config; to go back, delete {dir}/MOVED, and only if no tokend has used that store yet"
    )]
    Moved { dir: PathBuf, to: String },
    /// A fenced write whose lease epoch is no longer the account's (another replica took
    /// the lease, or it expired), or whose record changed since this holder read it:
    /// nothing was written.
    #[error(
        "refused to write account {account}'s record: this replica's lease (epoch {epoch}) is no longer current"
    )]
    Fenced { account: AccountName, epoch: u64 },
    /// The shared store cannot be reached or refused the operation. `detail` names no
    /// secret (a URL's password never appears).
    #[error("the {backend} state store at {location} is unavailable: {detail}")]
    Unavailable {
        backend: &'static str,
        location: String,
        detail: String,
    },
    /// The shared store holds a schema (or key layout) this tokend does not know.
    #[error(
        "the {backend} state store at {location} has schema version {found}; this tokend uses {wanted}"
    )]
    Schema {
        backend: &'static str,
        location: String,
        found: String,
        wanted: String,
    },
}

/// What `tokend login`, `import`, `logout` or `state rename` hands to an account.
#[derive(Debug, Clone, PartialEq)]
pub enum Handoff {
    /// A chain obtained outside the daemon and tried once: it replaces the stored one.
    RefreshToken(NewChain),
    /// The account was logged out: its refresh token is gone.
    Logout,
    /// `tokend state rename FROM THIS`: account `from`'s state becomes this account's.
    Adopt { from: AccountName },
}

/// What `tokend login`/`import` got from the one refresh that tried a token: the chain's
/// current refresh token, and the access token that came with it.
#[derive(Debug, Clone, PartialEq)]
pub struct NewChain {
    pub refresh_token: Secret,
    pub refresh_token_expires_at: Option<SystemTime>,
    pub access: Option<AccessToken>,
    /// [`spent_fingerprint`] of the token presented, when the provider rotated it: the
    /// ledger records it as this account's.
    pub spent: Option<String>,
}

impl NewChain {
    /// A chain that was not tried (tests, and stores written before tokens were tried).
    pub fn untried(refresh_token: Secret) -> NewChain {
        NewChain {
            refresh_token,
            refresh_token_expires_at: None,
            access: None,
            spent: None,
        }
    }
}

impl Handoff {
    /// The account's state once the handoff is applied to `current`; `None` means no
    /// record at all. `seed_fingerprint` is that of the config's seed refresh token, if
    /// any: kept in the state so that seed does not replace the handed-over token (or
    /// come back after a logout) at the next start. The old chain's access token and
    /// in-flight mark go; what it rotated away is still remembered. `Adopt` is the
    /// store's to apply ([`Store::rename`]): here it changes nothing.
    pub fn apply(
        &self,
        current: Option<&State>,
        seed_fingerprint: Option<String>,
        now: SystemTime,
    ) -> Option<State> {
        let remembered = current.map(|s| s.spent.clone()).unwrap_or_default();
        match self {
            Handoff::RefreshToken(chain) => {
                let mut spent = remembered;
                spent.extend(chain.spent.clone());
                spent.drain(..spent.len().saturating_sub(CHAIN_MEMORY));
                let tried = chain.access.is_some();
                Some(State {
                    refresh_token: Some(chain.refresh_token.clone()),
                    seed_fingerprint,
                    refresh_token_issued_at: Some(now),
                    refresh_token_expires_at: chain.refresh_token_expires_at,
                    access: chain.access.clone(),
                    refresh_in_flight_since: None,
                    last_refresh: if tried {
                        Some(now)
                    } else {
                        current.and_then(|s| s.last_refresh)
                    },
                    spent,
                    replaced: None,
                })
            }
            Handoff::Logout => seed_fingerprint.map(|fp| State {
                seed_fingerprint: Some(fp),
                spent: remembered,
                ..State::default()
            }),
            Handoff::Adopt { .. } => current.cloned(),
        }
    }
}

pub type StoreFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, StoreError>> + Send + 'a>>;

/// Durable state, one record per account. `save` returns only once the record is durable;
/// a failed `save` leaves the previous record intact.
///
/// A backend also carries handoffs: at most one pending [`Handoff`] per account, put
/// there by `tokend login`/`import`/`logout` while the daemon runs. The daemon applies
/// one by `load_handoff` → `save` (or `remove`) → `clear_handoff`, in that order, so a
/// crash in between loses nothing (the handoff is applied again).
pub trait Store: Send + Sync + 'static {
    fn load<'a>(&'a self, account: &'a AccountName) -> StoreFuture<'a, Option<State>>;
    fn save<'a>(&'a self, account: &'a AccountName, state: &'a State) -> StoreFuture<'a, ()>;
    /// Deletes the account's record; no record is not an error.
    fn remove<'a>(&'a self, account: &'a AccountName) -> StoreFuture<'a, ()>;
    /// Where the account's record lives, for humans (`tokend check`, errors).
    fn location(&self, account: &AccountName) -> String;
    /// Whether a handoff waits for the account (cheap: asked on every reload).
    fn has_handoff<'a>(&'a self, account: &'a AccountName) -> StoreFuture<'a, bool>;
    /// The pending handoff, if any. It stays pending until `clear_handoff`.
    fn load_handoff<'a>(&'a self, account: &'a AccountName) -> StoreFuture<'a, Option<Handoff>>;
    /// Leaves `handoff` pending for `account` (replacing any pending one) for the lease
    /// holder to apply; durable on return. The file store's is the handoff file.
    fn put_handoff<'a>(
        &'a self,
        account: &'a AccountName,
        handoff: &'a Handoff,
    ) -> StoreFuture<'a, ()>;
    /// Drops the pending handoff once it has been applied; none is not an error.
    fn clear_handoff<'a>(&'a self, account: &'a AccountName) -> StoreFuture<'a, ()>;

    /// Records durably, in the ledger every account of the store shares, that `account`
    /// presents (or presented) the refresh token of `fingerprint` ([`spent_fingerprint`]).
    /// Called before a seed or a handed-over token is first presented; returns once durable.
    /// A backend keeps at least the newest 64 per account.
    fn record_spent<'a>(
        &'a self,
        account: &'a AccountName,
        fingerprint: &'a str,
        kind: SpentKind,
    ) -> StoreFuture<'a, ()>;
    /// The ledger's entry for `fingerprint`, if that token was presented already.
    fn spent<'a>(&'a self, fingerprint: &'a str) -> StoreFuture<'a, Option<Spent>>;
    /// Moves `from`'s record (and its ledger entries) to `to`, which must have no refresh
    /// token; nothing is presented to any provider. Durable: at any crash point, the
    /// record is under `from` or under `to` (briefly both, never neither).
    fn rename<'a>(&'a self, from: &'a AccountName, to: &'a AccountName) -> StoreFuture<'a, ()>;
    /// Keeps a copy of the account's record aside (before a handoff replaces it), and says
    /// where, for [`State::replaced`]; `None` when there is no record.
    fn set_aside<'a>(&'a self, account: &'a AccountName) -> StoreFuture<'a, Option<String>>;
    /// Drops a copy made by `set_aside` for `account`; gone already is not an error.
    fn drop_aside<'a>(&'a self, account: &'a AccountName, kept: &'a str) -> StoreFuture<'a, ()>;

    // The shared half (see `lease.rs`): leases, fenced writes and the change feed.

    /// Whether several replicas may share this store: then only an account's lease
    /// holder refreshes it and writes its record, with [`Store::save_fenced`].
    fn shared(&self) -> bool;
    /// This replica's name in leases (`[state] node_id`).
    fn node_id(&self) -> &str;
    /// How long a lease lives without renewal (`[state] lease_ttl`).
    fn lease_ttl(&self) -> std::time::Duration;
    /// Takes `account`'s lease for this replica when nobody holds it or the holder's has
    /// expired (by the store's clock), or renews it when `held` is still this replica's
    /// current lease. A new holder gets a larger epoch than every holder before it.
    fn acquire<'a>(
        &'a self,
        account: &'a AccountName,
        held: Option<Lease>,
    ) -> StoreFuture<'a, LeaseGrant>;
    /// Renews every lease in `held`, in one round trip where the store allows, and
    /// returns those still this replica's with their new validity; an account missing
    /// from the answer has been lost.
    fn renew<'a>(
        &'a self,
        held: &'a [(AccountName, Lease)],
    ) -> StoreFuture<'a, Vec<(AccountName, Lease)>>;
    /// Gives the lease up (shutdown, rebalancing) so that another replica need not wait
    /// for it to expire; a lease no longer ours is not an error.
    fn release<'a>(&'a self, account: &'a AccountName, lease: Lease) -> StoreFuture<'a, ()>;
    /// The node id holding `account`'s lease by the store's clock; `None` when free.
    fn holder<'a>(&'a self, account: &'a AccountName) -> StoreFuture<'a, Option<String>>;
    /// The node ids of the replicas alive now (holding a lease or announcing themselves),
    /// this one included: how many share the refresh work.
    fn replicas(&self) -> StoreFuture<'_, Vec<String>>;
    /// [`Store::save`] on two conditions checked by the store in the same atomic step as
    /// the write: `lease` is still the account's current, unexpired lease, and the record
    /// is still the one this replica last loaded or wrote (a holder loads the record
    /// before its first fenced save; one it never read is refused). Otherwise
    /// [`StoreError::Fenced`], and nothing is written.
    fn save_fenced<'a>(
        &'a self,
        account: &'a AccountName,
        state: &'a State,
        lease: Lease,
    ) -> StoreFuture<'a, ()>;
    /// The change feed: every record commit, handoff, demand and freed lease from now on,
    /// by any replica (a store shared with nobody reports its own).
    fn subscribe(&self) -> tokio::sync::broadcast::Receiver<Change>;
    /// Asks `account`'s lease holder, wherever it runs, for a fresher token: it arrives
    /// as [`Change::Demand`] on the holder's feed.
    fn request_refresh<'a>(&'a self, account: &'a AccountName) -> StoreFuture<'a, ()>;
    /// Says whether the store is reachable and its schema current (`tokend check`).
    fn check(&self) -> StoreFuture<'_, String>;
}

/// Why `token` must not be presented, as `store` knows it: its ledger, then the current
/// refresh token and the rotated-away ones of each of `accounts` (for `tokend login` and
/// `import` against a shared store; [`peek_spent`] is the file store's, lock-free).
pub async fn spent_by(
    store: &dyn Store,
    accounts: impl IntoIterator<Item = &AccountName>,
    token: &Secret,
) -> Result<Option<SpentBy>, StoreError> {
    let fp = spent_fingerprint(token);
    if let Some(spent) = store.spent(&fp).await? {
        return Ok(Some(SpentBy::Ledger(spent)));
    }
    for account in accounts {
        let Some(state) = store.load(account).await? else {
            continue;
        };
        if state.refresh_token.as_ref() == Some(token) {
            return Ok(Some(SpentBy::InUse(account.clone())));
        }
        if state.spent.contains(&fp) {
            return Ok(Some(SpentBy::Rotated(account.clone())));
        }
    }
    Ok(None)
}

/// Test fixtures shared by the store's submodules.
#[cfg(test)]
mod fixtures {
    use super::wire::from_unix;
    use super::*;
    use crate::seal::{Keyring, SealKey};

    pub(super) fn name(s: &str) -> AccountName {
        AccountName::parse(s).unwrap()
    }

    pub(super) fn sample() -> State {
        State {
            refresh_token: Some(Secret::new("rt-1")),
            seed_fingerprint: Some("abc".into()),
            refresh_token_issued_at: Some(from_unix(1_700_000_000)),
            refresh_token_expires_at: Some(from_unix(1_702_592_000)),
            access: Some(AccessToken {
                token: Secret::new("at-1"),
                token_type: "Bearer".into(),
                expires_at: from_unix(1_700_003_600),
                scope: Some("a b".into()),
                issued_at: from_unix(1_700_000_000),
            }),
            refresh_in_flight_since: None,
            last_refresh: Some(from_unix(1_700_000_000)),
            spent: Vec::new(),
            replaced: None,
        }
    }

    pub(super) fn ring(current: u8, previous: &[u8]) -> Keyring {
        let key = |b: u8| SealKey::parse(&Secret::new(format!("{b:02x}").repeat(32))).unwrap();
        Keyring {
            current: key(current),
            previous: previous.iter().map(|b| key(*b)).collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::fixtures::sample;
    use super::wire::from_unix;
    use super::*;

    #[test]
    fn a_logout_leaves_no_record_or_only_the_seed_fingerprint() {
        let now = from_unix(1_800_000_000);
        assert_eq!(Handoff::Logout.apply(Some(&sample()), None, now), None);
        let kept = Handoff::Logout
            .apply(Some(&sample()), Some("fp".into()), now)
            .unwrap();
        assert_eq!(kept.seed_fingerprint.as_deref(), Some("fp"));
        assert!(kept.refresh_token.is_none() && kept.access.is_none());
    }
}
