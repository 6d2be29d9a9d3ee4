//! `tokend state rename OLD NEW`: moves an account's state (its live refresh token and
//! its entries in the ledger of spent tokens) to a new name without presenting anything
//! to the provider; directly when no daemon runs, else through a handoff and SIGHUP.

use std::path::Path;

use super::exit;
use super::login::{self, HandedOff, LoginError};
use crate::config::{AccountName, Config};
use crate::store::{self, Handoff, StoreError};

pub async fn rename(path: &Path, old: &str, new: &str) -> u8 {
    let config = match Config::load(path) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("tokend: invalid configuration:\n{e}");
            return exit::CONFIG;
        }
    };
    let (old, new) = match (AccountName::parse(old), AccountName::parse(new)) {
        (Ok(o), Ok(n)) if o != n => (o, n),
        (Ok(_), Ok(_)) => return usage("OLD and NEW are the same name"),
        (Err(e), _) | (_, Err(e)) => return usage(&e),
    };
    if let Err(msg) = check_config(&config, path, &old, &new) {
        eprintln!("tokend: {msg}");
        return exit::CONFIG;
    }
    match run(&config, &old, &new).await {
        Ok(message) => {
            println!("{message}");
            exit::OK
        }
        Err(e) => {
            eprintln!("tokend: {e}");
            e.exit_code()
        }
    }
}

fn usage(msg: &str) -> u8 {
    eprintln!("tokend: {msg}");
    exit::USAGE
}

/// The config must already say what the rename means: NEW configured (to take the chain),
/// OLD gone (else two accounts would refresh one chain).
fn check_config(
    config: &Config,
    path: &Path,
    old: &AccountName,
    new: &AccountName,
) -> Result<(), String> {
    let file = path.display();
    if config.accounts.contains_key(old) {
        return Err(format!(
            "[accounts.{old}] is still in {file}: rename it to [accounts.{new}] there first (two accounts must not refresh one chain), then run this again"
        ));
    }
    if !config.accounts.contains_key(new) {
        return Err(format!(
            "[accounts.{new}] is not in {file}: rename [accounts.{old}] to it there first, then run this again"
        ));
    }
    login::refresh_account(config, new.as_str())
        .map(|_| ())
        .map_err(|e| e.to_string())
}

/// Checks what can be checked without the lock, hands the rename off, and says what
/// became of it.
async fn run(config: &Config, old: &AccountName, new: &AccountName) -> Result<String, LoginError> {
    let dir = &config.state.dir;
    let keyring = config.state.keyring.as_ref();
    let peek = |name: &AccountName| store::peek_state(dir, keyring, name);
    if peek(old)?.is_none() {
        return Err(StoreError::NothingToMove {
            account: old.clone(),
            path: store::state_path(dir, old),
        }
        .into());
    }
    if peek(new)?.is_some_and(|s| s.refresh_token.is_some()) {
        return Err(StoreError::Occupied {
            account: new.clone(),
            path: store::state_path(dir, new),
        }
        .into());
    }
    let account = login::refresh_account(config, new.as_str())?;
    let handoff = Handoff::Adopt { from: old.clone() };
    let done = match login::hand_off(config, &account, handoff, login::HANDOFF_WAIT).await? {
        HandedOff::Stored(path) => format!(
            "{new}: took over the state of {old} ({}); nothing was sent to the provider",
            path.display()
        ),
        HandedOff::ToDaemon(pid) => format!(
            "{new}: the running daemon (pid {pid}) took over the state of {old}; nothing was sent to the provider"
        ),
    };
    // The daemon applies it out of sight: the files tell whether it did.
    if peek(old)?.is_some() || peek(new)?.is_none() {
        return Err(LoginError::NotAdopted {
            old: old.to_string(),
            new: new.to_string(),
        });
    }
    Ok(done)
}
