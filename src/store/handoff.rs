//! The handoff protocol, both ends: how `tokend login`, `import`, `logout` and `state
//! rename` give an account its new chain (or none, or another account's), straight into
//! the state when no daemon runs, else as a handoff the daemon applies when the account
//! (re)starts. The handoff files themselves are `file`'s.

use std::path::{Path, PathBuf};
use std::time::SystemTime;

use super::file::{FileStore, leave_handoff};
use super::{Handoff, SpentKind, State, Store, StoreError};
use tracing::{error, info};

use crate::config::{AccountConfig, AccountName, Grant};
use crate::seal::Keyring;

/// What became of a handoff given to [`deliver_handoff`].
#[derive(Debug)]
pub enum Delivery {
    /// No daemon held the state directory: the state was changed directly; this is the
    /// account's record now (`None`: no record).
    Applied(Option<Box<State>>),
    /// A daemon holds the state directory: the handoff waits in `path` for it to apply;
    /// `pid` is the daemon's, from its lock file.
    Pending { path: PathBuf, pid: Option<i32> },
}

/// Gives `handoff` to `account`: applied to its state at once when the state directory
/// is free (the lock is held meanwhile, so no daemon starts in between), else written as
/// a handoff file for the daemon that holds it. `seed_fingerprint` as in
/// [`Handoff::apply`]. Files are written the way the store writes state: atomically,
/// mode 0600, sealed when `keyring` is set.
pub async fn deliver_handoff(
    dir: &Path,
    keyring: Option<Keyring>,
    account: &AccountName,
    handoff: &Handoff,
    seed_fingerprint: Option<String>,
    now: SystemTime,
) -> Result<Delivery, StoreError> {
    match FileStore::open_sealed(dir, keyring.clone()) {
        Ok(store) => {
            let current = match store.load(account).await {
                Ok(state) => state,
                // Moved aside by the load, for a human; the handoff replaces it anyway.
                Err(StoreError::Corrupt { .. }) => None,
                Err(e) => return Err(e),
            };
            let next = apply_to(
                store.as_ref(),
                account,
                handoff,
                current,
                seed_fingerprint,
                now,
            )
            .await?;
            // A handoff left by a daemon that stopped before applying it is superseded.
            store.clear_handoff(account).await?;
            Ok(Delivery::Applied(next.map(Box::new)))
        }
        Err(StoreError::Locked { pid, .. }) => {
            let path = leave_handoff(dir, keyring.as_ref(), account, handoff)?;
            Ok(Delivery::Pending { path, pid })
        }
        Err(e) => Err(e),
    }
}

/// Applies the account's pending handoff, if any, to the `loaded` state: the new state is
/// saved (or the record removed) before the handoff is cleared, so a crash in between
/// applies it again rather than losing it. Returns the state to start from and whether
/// the handoff was a logout; on failure, the state as it was and the error to show.
pub async fn apply_pending(
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
    let next = match apply_to(store, name, &handoff, loaded.clone(), seed_fingerprint, now).await {
        Ok(next) => next,
        // Cannot succeed as it stands: dropped, so a later start does not act on it.
        Err(e @ (StoreError::NothingToMove { .. } | StoreError::Occupied { .. })) => {
            error!(account = %name, error = %e, "cannot apply the handoff from tokend state rename; it was dropped");
            let _ = store.clear_handoff(name).await;
            return Err((loaded, e.to_string()));
        }
        Err(e) => {
            error!(account = %name, error = %e, "cannot apply the handoff from tokend login/import/logout/state rename; it stays pending");
            return Err((loaded, e.to_string()));
        }
    };
    if let Err(e) = store.clear_handoff(name).await {
        // Applied, but it would be applied again at the next start or reload: say so.
        error!(account = %name, error = %e, "applied the handoff but cannot delete it; delete it by hand before the next reload");
    }
    let logout = handoff == Handoff::Logout;
    match &handoff {
        Handoff::Logout => {
            info!(account = %name, "logged out: the stored refresh token was dropped")
        }
        Handoff::Adopt { from } => {
            info!(account = %name, from = %from, "took over the state of another account (tokend state rename); nothing was sent to the provider")
        }
        Handoff::RefreshToken(_) => {
            info!(account = %name, "adopted the refresh token handed over by tokend login/import")
        }
    }
    Ok((next, logout))
}

/// Applies `handoff` to `account`'s record `current` in `store`, in the order that loses
/// nothing at a crash (the handoff stays pending until its caller clears it): the ledger
/// records the token that was presented, a record being replaced is kept aside, and then
/// the new record is saved (or removed). Returns the account's record now.
async fn apply_to(
    store: &dyn Store,
    account: &AccountName,
    handoff: &Handoff,
    current: Option<State>,
    seed_fingerprint: Option<String>,
    now: SystemTime,
) -> Result<Option<State>, StoreError> {
    match handoff {
        Handoff::Adopt { from } => {
            store.rename(from, account).await?;
            return store.load(account).await;
        }
        Handoff::RefreshToken(chain) => {
            if let Some(fp) = &chain.spent {
                store.record_spent(account, fp, SpentKind::Handover).await?;
            }
        }
        Handoff::Logout => {}
    }
    let mut next = handoff.apply(current.as_ref(), seed_fingerprint, now);
    if let (Handoff::RefreshToken(_), Some(state)) = (handoff, next.as_mut())
        && current.is_some_and(|s| s.refresh_token.is_some())
    {
        state.replaced = store.set_aside(account).await?;
    }
    match &next {
        Some(state) => store.save(account, state).await?,
        None => store.remove(account).await?,
    }
    Ok(next)
}

#[cfg(test)]
mod tests {
    use std::fs;
    use std::os::unix::fs::PermissionsExt;

    use super::super::fixtures::{name, ring, sample};
    use super::super::wire::from_unix;
    use super::*;
    use crate::secret::Secret;
    use crate::store::NewChain;

    #[tokio::test(flavor = "multi_thread", worker_threads = 1)]
    async fn a_handoff_is_applied_directly_or_left_for_the_daemon_holding_the_lock() {
        let tmp = tempfile::tempdir().unwrap();
        let a = name("acct");
        let now = from_unix(1_800_000_000);
        let handoff = Handoff::RefreshToken(NewChain::untried(Secret::new("rt-new")));
        {
            let store = FileStore::open(tmp.path()).unwrap();
            store.save(&a, &sample()).await.unwrap();
        }
        // No daemon: applied at once; the seed's fingerprint is kept, the old chain's
        // access token and in-flight mark go.
        let d = deliver_handoff(tmp.path(), None, &a, &handoff, Some("fp".into()), now)
            .await
            .unwrap();
        let Delivery::Applied(Some(state)) = d else {
            panic!("{d:?}")
        };
        assert_eq!(state.refresh_token.as_ref().unwrap().expose(), "rt-new");
        assert_eq!(state.seed_fingerprint.as_deref(), Some("fp"));
        assert_eq!(state.refresh_token_issued_at, Some(now));
        assert!(state.access.is_none() && state.refresh_in_flight_since.is_none());
        assert_eq!(state.last_refresh, sample().last_refresh);

        // A daemon holds the lock: the handoff waits in a private file, sealed when
        // the store is.
        let keys = ring(1, &[]);
        let daemon = FileStore::open_sealed(tmp.path(), Some(keys.clone())).unwrap();
        let d = deliver_handoff(tmp.path(), Some(keys), &a, &handoff, None, now)
            .await
            .unwrap();
        let Delivery::Pending { path, pid } = d else {
            panic!("{d:?}")
        };
        assert_eq!(pid, Some(std::process::id() as i32));
        assert_eq!(
            fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert!(!fs::read_to_string(&path).unwrap().contains("rt-new"));
        assert!(daemon.has_handoff(&a).await.unwrap());
        assert_eq!(daemon.load_handoff(&a).await.unwrap(), Some(handoff));
        daemon.clear_handoff(&a).await.unwrap();
        assert!(!daemon.has_handoff(&a).await.unwrap());
        assert_eq!(daemon.load_handoff(&a).await.unwrap(), None);
    }
}
