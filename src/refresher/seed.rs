//! Where an account's chain starts: its stored state, or the config's seed, which is
//! presented only if the ledger of spent refresh tokens has never seen it (recorded
//! first); a spent one holds the account with the way back (a rename, a lost state file).

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use tracing::{error, info, warn};

use super::Refresher;
use crate::clock::rfc3339;
use crate::config::{AccountConfig, Grant};
use crate::store::{self, SpentKind, State, Store, StoreError};

impl Refresher {
    /// The config's seed refresh token is used when nothing is stored, or when it differs
    /// from the seed the stored token descends from (the operator re-seeded), unless the
    /// ledger knows it as spent (see [`Refresher::spent_seed`]). A seed is recorded in
    /// the ledger, and the state saved, before it is first presented.
    pub(super) async fn adopt_seed(&mut self, now: SystemTime, origin: Origin) {
        let config = self.config();
        let Grant::RefreshToken { seed } = &config.grant else {
            return;
        };
        if let Some(seed) = seed {
            let fingerprint = seed.fingerprint();
            let spent_fp = store::spent_fingerprint(seed);
            let fresh_seed = self.state.seed_fingerprint.as_deref() != Some(fingerprint.as_str());
            if self.state.refresh_token.is_none() || fresh_seed {
                if let Some(verdict) = self.spent_seed(&spent_fp, &origin).await {
                    match verdict {
                        SeedVerdict::Hold(reason) => {
                            error!(account = %config.name, "{reason}");
                            self.hold(reason);
                            return;
                        }
                        SeedVerdict::Ignore(reason) => {
                            warn!(account = %config.name, "{reason}");
                            self.last_error = Some(reason);
                        }
                    }
                } else if let Err(e) = self.record_seed(&spent_fp).await {
                    self.hold(format!(
                        "the configured refresh_token is not sent: it cannot be recorded as spent first ({e}); fix this and reload (SIGHUP)"
                    ));
                    return;
                } else {
                    if self.state.refresh_token.is_some() {
                        info!(account = %config.name, "the configured refresh token changed; it replaces the stored one");
                    }
                    self.state.refresh_token = Some(seed.clone());
                    self.state.seed_fingerprint = Some(fingerprint);
                    self.state.refresh_token_issued_at = Some(now);
                    self.state.refresh_in_flight_since = None;
                    // Durable now, not at the task's start: the ledger says this account
                    // spent the seed, and a state without it would look lost.
                    self.save().await;
                    // Tokens of the old chain may belong to another user or scope.
                    self.plan.at = Some(now);
                }
            } else {
                // Adopted before the ledger existed: recorded now, so a rename is caught.
                self.backfill_seed(&spent_fp).await;
            }
        }
        if self.state.refresh_token.is_none() {
            self.hold(format!(
                "no refresh token: run `tokend login {0}` (or `tokend import {0}`), or set accounts.{0}.refresh_token in the config",
                config.name
            ));
        }
    }

    /// Whether the config's seed (`spent_fp`, about to be adopted) was presented before,
    /// and what that means: under another account's name, a rename (hold: its chain lives
    /// there); under this one with no chain stored, a lost state file (hold: the seed's
    /// successor was in it); with a chain stored, an old seed put back (ignored, the chain
    /// goes on). `None`: never presented. Nothing is sent in any case.
    async fn spent_seed(&self, spent_fp: &str, origin: &Origin) -> Option<SeedVerdict> {
        let name = &self.config().name;
        let by = match self.deps.store.spent(spent_fp).await {
            Ok(Some(by)) => by,
            Ok(None) if self.state.spent.iter().any(|fp| fp == spent_fp) => store::Spent {
                account: name.clone(),
                at: self.state.refresh_token_issued_at.unwrap_or(UNIX_EPOCH),
                kind: SpentKind::Seed,
            },
            Ok(None) => return None,
            Err(e) => {
                return Some(SeedVerdict::Hold(format!(
                    "the configured refresh_token is not sent: the ledger of spent refresh tokens cannot be read ({e}); fix this and reload (SIGHUP)"
                )));
            }
        };
        let when = rfc3339(by.at);
        let old = &by.account;
        if self.state.refresh_token.is_some() {
            let who = if old == name {
                "this account".to_string()
            } else {
                format!("account {old}")
            };
            return Some(SeedVerdict::Ignore(format!(
                "the configured refresh_token was spent already by {who} (first presented at {when}); it is not sent again and the stored refresh token stays in use: remove it from the config, or put an unspent one there"
            )));
        }
        if old != name {
            return Some(SeedVerdict::Hold(format!(
                "the configured refresh_token was already spent by account {old} (first presented at {when}): this looks like a renamed account, and its live refresh token is in {old}'s state. Nothing was sent. Run `tokend state rename {old} {name}` to move that state here, or put the old name [accounts.{old}] back in the config"
            )));
        }
        let lost = match origin {
            Origin::KeptAside(kept) => {
                format!("the state file was unreadable and was kept aside as {kept}")
            }
            Origin::Missing => format!(
                "the state file {} is missing",
                self.deps.store.location(name)
            ),
            Origin::Stored => "the stored state holds no refresh token".to_string(),
        };
        Some(SeedVerdict::Hold(format!(
            "{lost}, and the configured refresh_token was spent already by this account (first presented at {when}): its successor was in that state, so the seed is not sent again (the provider would revoke the whole family). Restore the state file from a backup and reload (SIGHUP), or run `tokend login {name}` (or `tokend import {name}`)"
        )))
    }

    async fn record_seed(&self, spent_fp: &str) -> Result<(), StoreError> {
        let name = &self.config().name;
        self.deps
            .store
            .record_spent(name, spent_fp, SpentKind::Seed)
            .await
    }

    /// Records a seed that was adopted before the ledger existed, once; beside the start,
    /// not in its way: after an upgrade every account would otherwise wait for the others'
    /// appends before serving its stored token.
    async fn backfill_seed(&self, spent_fp: &str) {
        if !matches!(self.deps.store.spent(spent_fp).await, Ok(None)) {
            return;
        }
        let (store, name) = (Arc::clone(&self.deps.store), self.config().name.clone());
        let fp = spent_fp.to_string();
        self.deps.tracker.spawn(async move {
            if let Err(e) = store.record_spent(&name, &fp, SpentKind::Seed).await {
                warn!(account = %name, error = %e, "cannot record the configured refresh_token as spent");
            }
        });
    }
}

/// Where the state the refresher starts from came from, for the message of a hold.
pub(super) enum Origin {
    Stored,
    Missing,
    /// Unreadable, and kept aside under this name.
    KeptAside(String),
}

/// What to do with a configured seed the ledger knows as spent.
enum SeedVerdict {
    Hold(String),
    Ignore(String),
}

/// A load that did not give the state: the message to show, and where an unreadable
/// file was kept.
pub(super) struct LoadError {
    pub(super) message: String,
    pub(super) kept_as: Option<String>,
}

/// The account's stored state, and the error to show when a corrupt one was set aside.
/// `Err` when it cannot be read at all: the file may be fine and hold the only valid
/// refresh token (a permission or I/O problem), so it is never overwritten and the
/// account waits for a human and a reload.
pub(super) async fn read_state(
    config: &AccountConfig,
    store: &dyn Store,
) -> Result<(Option<State>, Option<LoadError>), String> {
    let name = &config.name;
    match store.load(name).await {
        Ok(state) => Ok((state, None)),
        // The bad file was moved aside: the seed is used only if it was never spent.
        Err(e @ StoreError::Corrupt { .. }) => {
            error!(account = %name, error = %e, "cannot load the persisted state; starting from the configured seed unless it was spent");
            let kept_as = match &e {
                StoreError::Corrupt { kept_as, .. } => Some(kept_as.display().to_string()),
                _ => None,
            };
            Ok((
                None,
                Some(LoadError {
                    message: e.to_string(),
                    kept_as,
                }),
            ))
        }
        Err(e) => {
            error!(account = %name, error = %e, "cannot read the persisted state; the account is held until this is fixed and tokend is reloaded");
            Err(format!("{e}; fix it and reload (SIGHUP)"))
        }
    }
}
