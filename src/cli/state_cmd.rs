//! `tokend state rename OLD NEW`: moves an account's state (its live refresh token and
//! its entries in the ledger of spent tokens) to a new name without presenting anything
//! to the provider; directly when no daemon runs, else through a handoff and SIGHUP.
//! `tokend state copy`: a stopped daemon's state directory into another store.

use std::path::{Path, PathBuf};

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::exit;
use super::login::{self, HandedOff, LoginError};
use crate::config::{AccountName, Config, StateBackend};
use crate::store::{self, FileStore, Handoff, Spent, State, Store, StoreError};

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
    let shared = super::shared::open(config).await?;
    let done = run_on(config, shared.as_ref().map(|o| o.store.as_ref()), old, new).await;
    if let Some(opened) = shared {
        opened.close().await;
    }
    done
}

/// An account's record and where it lives: read from the shared store when there is
/// one, else from the state directory without its lock.
async fn current(
    config: &Config,
    shared: Option<&dyn Store>,
    name: &AccountName,
) -> Result<(Option<State>, PathBuf), StoreError> {
    match shared {
        Some(s) => Ok((s.load(name).await?, PathBuf::from(s.location(name)))),
        None => {
            let dir = &config.state.dir;
            let state = store::peek_state(dir, config.state.keyring.as_ref(), name)?;
            Ok((state, store::state_path(dir, name)))
        }
    }
}

async fn run_on(
    config: &Config,
    shared: Option<&dyn Store>,
    old: &AccountName,
    new: &AccountName,
) -> Result<String, LoginError> {
    let (old_state, old_at) = current(config, shared, old).await?;
    if old_state.is_none() {
        return Err(StoreError::NothingToMove {
            account: old.clone(),
            path: old_at,
        }
        .into());
    }
    let (new_state, new_at) = current(config, shared, new).await?;
    if new_state.is_some_and(|s| s.refresh_token.is_some()) {
        return Err(StoreError::Occupied {
            account: new.clone(),
            path: new_at,
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
        HandedOff::Shared(left) if !left.taken => {
            return Ok(format!(
                "{new}: the rename waits in {} for the replica that holds {new} (none took it within {}s: is a replica running?); nothing was sent to the provider",
                left.location,
                login::HANDOFF_WAIT.as_secs()
            ));
        }
        HandedOff::Shared(_) => format!(
            "{new}: the replica holding it took over the state of {old}; nothing was sent to the provider"
        ),
    };
    // The daemon applies it out of sight: the records tell whether it did.
    let moved_away = current(config, shared, old).await?.0.is_none();
    let arrived = current(config, shared, new).await?.0.is_some();
    if !moved_away || !arrived {
        return Err(LoginError::NotAdopted {
            old: old.to_string(),
            new: new.to_string(),
        });
    }
    Ok(done)
}

/// `tokend state copy --from file:DIR --to-config NEW.toml`: copies a file-backed state
/// directory into the store NEW.toml's `[state]` names, then marks DIR as moved.
pub async fn copy(from: &str, to_config: &Path) -> u8 {
    let config = match Config::load(to_config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("tokend: invalid configuration:\n{e}");
            return exit::CONFIG;
        }
    };
    let Some(dir) = from.strip_prefix("file:").filter(|d| !d.is_empty()) else {
        return usage(
            "--from takes file:DIR, the state directory to copy (only a file-backed state can be copied from)",
        );
    };
    let dir = PathBuf::from(dir);
    if config.state.backend == StateBackend::File && same_dir(&dir, &config.state.dir) {
        return usage(&format!(
            "[state] of {} names {} itself: give the config of the store to copy into",
            to_config.display(),
            dir.display()
        ));
    }
    let (cancel, tracker) = (CancellationToken::new(), TaskTracker::new());
    let copied = copy_into(&dir, &config, to_config, &cancel, &tracker).await;
    cancel.cancel();
    tracker.close();
    tracker.wait().await;
    match copied {
        Ok(message) => {
            println!("{message}");
            exit::OK
        }
        Err(message) => {
            eprintln!("tokend: {message}");
            exit::FAILURE
        }
    }
}

fn same_dir(a: &Path, b: &Path) -> bool {
    match (a.canonicalize(), b.canonicalize()) {
        (Ok(a), Ok(b)) => a == b,
        _ => a == b,
    }
}

/// What a copy writes into the target, once nothing stands in its way.
#[derive(Default)]
struct Plan {
    records: Vec<(AccountName, State)>,
    handoffs: Vec<(AccountName, Handoff)>,
    spent: Vec<(String, Spent)>,
    /// Records and handoffs found in the target as they are in DIR: an earlier run
    /// copied them before it was cut short.
    present: usize,
    /// Why the copy cannot go ahead, one line per account.
    refused: Vec<String>,
}

/// Holds DIR's lock from the first read to the marker, so no daemon starts on it
/// meanwhile; writes nothing unless every account can be copied.
async fn copy_into(
    dir: &Path,
    config: &Config,
    to_config: &Path,
    cancel: &CancellationToken,
    tracker: &TaskTracker,
) -> Result<String, String> {
    if !dir.is_dir() {
        return Err(format!(
            "{} is not a state directory: nothing to copy",
            dir.display()
        ));
    }
    let source = match FileStore::open_sealed(dir, config.state.keyring.clone()) {
        Ok(s) => s,
        Err(StoreError::Locked { holder, .. }) => {
            return Err(format!(
                "state directory {} is in use by a running tokend ({holder}): stop the daemon first, then run this again",
                dir.display()
            ));
        }
        Err(e) => return Err(format!("{e}; nothing was copied")),
    };
    let target = store::open(&config.state, cancel, tracker)
        .await
        .map_err(|e| format!("cannot open the store {} names: {e}", to_config.display()))?;
    let to = target
        .check()
        .await
        .map_err(|e| format!("cannot use the store {} names: {e}", to_config.display()))?
        .replace('\n', " ");
    warn_unconfigured(dir, config, to_config);
    let plan = plan(&source, target.as_ref(), dir, config).await?;
    if !plan.refused.is_empty() {
        return Err(format!(
            "cannot copy {} into {to}:\n  {}\nnothing was copied",
            dir.display(),
            plan.refused.join("\n  ")
        ));
    }
    let found = plan.records.len() + plan.handoffs.len() + plan.spent.len() + plan.present;
    if found == 0 {
        return Err(format!(
            "{} holds no record, handoff or spent refresh token of the accounts {} configures: nothing to copy",
            dir.display(),
            to_config.display()
        ));
    }
    let counts = write(target.as_ref(), &plan)
        .await
        .map_err(|e| format!("{e}\nthe copy stopped there: run this again to finish it"))?;
    let marker = source.mark_moved(&to).map_err(|e| {
        format!(
            "{e}\neverything was copied, but {} is not marked as moved: run this again",
            dir.display()
        )
    })?;
    Ok(format!(
        "copied {counts} from {} into {to}; nothing was sent to any provider.\n\
         {} is marked as moved ({}): tokend refuses it from now on. Start tokend with {}.\n\
         To undo, before any tokend has used the new store: delete {}.",
        dir.display(),
        dir.display(),
        marker.display(),
        to_config.display(),
        marker.display()
    ))
}

/// Reads DIR's records, handoffs and ledger for the configured accounts and compares
/// them with the target's. Nothing is written.
async fn plan(
    source: &FileStore,
    target: &dyn Store,
    dir: &Path,
    config: &Config,
) -> Result<Plan, String> {
    let keyring = config.state.keyring.as_ref();
    // Sealed records are opened with the new config's keys: it must carry DIR's.
    let unreadable = |e: StoreError| {
        format!(
            "{e}\n(the records of {} are opened with [state] encryption_key and previous_encryption_keys of the new config); nothing was copied",
            dir.display()
        )
    };
    let target_err = |e: StoreError| format!("{e}; nothing was copied");
    let mut plan = Plan::default();
    for account in config.accounts.keys() {
        let record = store::peek_state(dir, keyring, account).map_err(unreadable)?;
        let handoff = store::peek_handoff(dir, keyring, account).map_err(unreadable)?;
        if record.is_none() && handoff.is_none() {
            continue;
        }
        if let Some(Handoff::Adopt { from }) = &handoff {
            plan.refused.push(format!(
                "{account}: `tokend state rename {from} {account}` waits in {}: start tokend on {} once to apply it, stop it, then copy",
                store::handoff_path(dir, account).display(),
                dir.display()
            ));
            continue;
        }
        if target.shared()
            && let Some(node) = target.holder(account).await.map_err(target_err)?
        {
            plan.refused.push(format!(
                "{account}: tokend {node} holds its lease in the target: stop every tokend that uses the new store first"
            ));
            continue;
        }
        // A copy kept aside in DIR stays there, for a human: the target has none.
        let record = record.map(|r| State {
            replaced: None,
            ..r
        });
        let held = target.load(account).await.map_err(target_err)?;
        match (record, held) {
            (Some(r), Some(t)) if r == t => plan.present += 1,
            (_, Some(t)) if t.refresh_token.is_some() => plan.refused.push(format!(
                "{account}: the target already holds a refresh token for it ({}): remove it there if it is not needed, then run this again",
                target.location(account)
            )),
            (Some(r), _) => plan.records.push((account.clone(), r)),
            (None, _) => {}
        }
        if let Some(h) = handoff {
            match target.load_handoff(account).await.map_err(target_err)? {
                Some(t) if t == h => plan.present += 1,
                Some(_) => plan.refused.push(format!(
                    "{account}: the target already holds another pending handoff for it (tokend login/import/logout against the new config?)"
                )),
                None => plan.handoffs.push((account.clone(), h)),
            }
        }
    }
    // Every entry, whichever account it names: a spent token stays spent for all.
    for (fp, spent) in source.ledger_entries() {
        if target.spent(&fp).await.map_err(target_err)?.is_none() {
            plan.spent.push((fp, spent));
        }
    }
    Ok(plan)
}

/// Writes the plan: the ledger first, so that no record reaches the target before the
/// tokens its chain must not present again.
async fn write(target: &dyn Store, plan: &Plan) -> Result<String, StoreError> {
    for (fp, spent) in &plan.spent {
        target.record_spent(&spent.account, fp, spent.kind).await?;
    }
    for (account, record) in &plan.records {
        target.save(account, record).await?;
    }
    for (account, handoff) in &plan.handoffs {
        target.put_handoff(account, handoff).await?;
    }
    Ok(format!(
        "{} records, {} pending handoffs and {} spent refresh tokens ({} already there)",
        plan.records.len(),
        plan.handoffs.len(),
        plan.spent.len(),
        plan.present
    ))
}

/// Records and handoffs in DIR for accounts the new config does not have stay behind.
fn warn_unconfigured(dir: &Path, config: &Config, to_config: &Path) {
    let Ok(listing) = std::fs::read_dir(dir) else {
        return;
    };
    let mut left: Vec<String> = listing
        .flatten()
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|name| {
            let account = name
                .strip_suffix(".json")
                .or_else(|| name.strip_suffix(".handoff"));
            account
                .and_then(|a| AccountName::parse(a).ok())
                .is_some_and(|a| !config.accounts.contains_key(&a))
        })
        .collect();
    left.sort();
    for name in left {
        eprintln!(
            "tokend: warning: {} is not copied: {} configures no such account (rename it there, or with `tokend state rename` before copying, if it is still needed)",
            dir.join(&name).display(),
            to_config.display()
        );
    }
}
