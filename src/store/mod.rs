//! Durable per-account state behind a narrow [`Store`] interface, and the handoffs
//! through which `tokend login`, `import` and `logout` give an account a new refresh
//! token (or none). The interface is what a second backend (a shared, distributed store)
//! must provide. Outside it, only the operator commands name a state file (to say where
//! it is) and the sinks borrow its durable write.
//!
//! Inside: `file` is the file-backed store (one JSON file per account in a locked,
//! private directory), `wire` its on-disk format (sealed with [`crate::seal`] when a key
//! is set), `atomic` its durable writes, and `handoff` the handoff protocol.

use std::future::Future;
use std::io;
use std::path::PathBuf;
use std::pin::Pin;
use std::time::SystemTime;

use crate::config::AccountName;
use crate::secret::Secret;

mod atomic;
mod file;
mod handoff;
mod wire;

pub(crate) use atomic::write_atomically;
pub use file::{FileStore, handoff_path, lock_path, peek_state, state_path};
pub use handoff::{Delivery, apply_pending, deliver_handoff};
pub use wire::FORMAT_VERSION;

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
}

/// What `tokend login`, `import` or `logout` hands to an account.
#[derive(Debug, Clone, PartialEq)]
pub enum Handoff {
    /// A refresh token obtained outside the daemon: it replaces the stored one.
    RefreshToken(Secret),
    /// The account was logged out: its refresh token is gone.
    Logout,
}

impl Handoff {
    /// The account's state once the handoff is applied to `current`; `None` means no
    /// record at all. `seed_fingerprint` is that of the config's seed refresh token, if
    /// any: kept in the state so that seed does not replace the handed-over token (or
    /// come back after a logout) at the next start. The access token and the in-flight
    /// mark belong to the old chain and go.
    pub fn apply(
        &self,
        current: Option<&State>,
        seed_fingerprint: Option<String>,
        now: SystemTime,
    ) -> Option<State> {
        match self {
            Handoff::RefreshToken(rt) => Some(State {
                refresh_token: Some(rt.clone()),
                seed_fingerprint,
                refresh_token_issued_at: Some(now),
                refresh_token_expires_at: None,
                access: None,
                refresh_in_flight_since: None,
                last_refresh: current.and_then(|s| s.last_refresh),
            }),
            Handoff::Logout => seed_fingerprint.map(|fp| State {
                seed_fingerprint: Some(fp),
                ..State::default()
            }),
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
    /// Drops the pending handoff once it has been applied; none is not an error.
    fn clear_handoff<'a>(&'a self, account: &'a AccountName) -> StoreFuture<'a, ()>;
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
