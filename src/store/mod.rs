//! Durable per-account state behind a narrow [`Store`] interface, and the file-backed
//! implementation: one JSON file per account, written atomically (temp file, fdatasync,
//! rename, fsync dir), mode 0600 in a 0700 directory guarded by an exclusive lock. Also
//! the handoffs through which `tokend login`, `import` and `logout` give an account a
//! new refresh token (or none): applied directly when no daemon holds the lock, else
//! left as `<account>.handoff` for the daemon to apply.
//!
//! The interface is what a second backend (a shared, distributed store) must provide;
//! nothing outside this module knows that the state lives in files.

use std::fs::{self, File, OpenOptions};
use std::future::Future;
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use zeroize::Zeroize;

use crate::config::AccountName;
use crate::secret::Secret;
use seal::{Keyring, seal_file, unseal};

pub mod seal;

/// The state file format version this build writes and reads.
pub const FORMAT_VERSION: u32 = 1;

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

/// The file-backed store. Holding it holds the state directory's lock.
pub struct FileStore {
    dir: PathBuf,
    keyring: Option<Keyring>,
    /// One per file operation under way on the blocking pool; see [`MAX_DISK_OPS`].
    disk_ops: Arc<Semaphore>,
    _lock: File,
}

/// How many loads, saves and removals may be on the blocking pool at once. Each is
/// bound by fsync latency, not CPU, and one disk gains little from more than a few
/// dozen writes in flight; unbounded, a refresh burst of 10,000 accounts would take a
/// blocking thread per save (up to the pool's 512), all contending for the same disk and
/// each holding a stack. Beyond this many, callers queue on the async side, cheaply, in
/// arrival order.
const MAX_DISK_OPS: usize = 16;

const LOCK_FILE: &str = ".lock";
const TEMP_PREFIX: &str = ".tokend-";
const TEMP_SUFFIX: &str = ".tmp";

impl FileStore {
    /// Opens (creating with mode 0700 if needed) and locks the state directory.
    pub fn open(dir: &Path) -> Result<Arc<FileStore>, StoreError> {
        FileStore::open_sealed(dir, None)
    }

    /// Like `open`, sealing every file written with `keyring` when one is given. Files
    /// found in clear are read and sealed at their next save.
    pub fn open_sealed(dir: &Path, keyring: Option<Keyring>) -> Result<Arc<FileStore>, StoreError> {
        let dir_err = |source| StoreError::Dir {
            dir: dir.to_path_buf(),
            source,
        };
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(dir_err)?;
        let meta = fs::metadata(dir).map_err(dir_err)?;
        let mode = meta.permissions().mode();
        if mode & 0o022 != 0 {
            return Err(StoreError::Insecure {
                dir: dir.to_path_buf(),
                mode: mode & 0o7777,
            });
        }
        // A state dir owned by another user could have its files swapped under us.
        let me = rustix::process::geteuid().as_raw();
        if meta.uid() != me {
            return Err(StoreError::NotOwner {
                dir: dir.to_path_buf(),
                owner: meta.uid(),
                me,
            });
        }
        // Ours, but readable by others (made by hand, or an old umask): close it.
        if mode & 0o077 != 0 {
            fs::set_permissions(dir, fs::Permissions::from_mode(0o700)).map_err(dir_err)?;
        }
        let lock_path = dir.join(LOCK_FILE);
        let mut lock = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&lock_path)
            .map_err(dir_err)?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(fs::TryLockError::WouldBlock) => {
                let text = fs::read_to_string(&lock_path)
                    .ok()
                    .map(|s| s.trim().to_string())
                    .filter(|s| !s.is_empty());
                let pid = text.as_deref().and_then(|t| t.parse().ok());
                let holder =
                    text.map_or_else(|| "pid unknown".to_string(), |pid| format!("pid {pid}"));
                return Err(StoreError::Locked {
                    dir: dir.to_path_buf(),
                    holder,
                    pid,
                });
            }
            Err(fs::TryLockError::Error(e)) => return Err(dir_err(e)),
        }
        lock.set_len(0).map_err(dir_err)?;
        writeln!(lock, "{}", std::process::id()).map_err(dir_err)?;
        remove_stale_temp_files(dir);
        Ok(Arc::new(FileStore {
            dir: dir.to_path_buf(),
            keyring,
            disk_ops: Arc::new(Semaphore::new(MAX_DISK_OPS)),
            _lock: lock,
        }))
    }

    pub fn path(&self, account: &AccountName) -> PathBuf {
        state_path(&self.dir, account)
    }

    /// Waits for one of the [`MAX_DISK_OPS`] places.
    async fn disk_permit(&self) -> OwnedSemaphorePermit {
        Arc::clone(&self.disk_ops)
            .acquire_owned()
            .await
            .expect("the store never closes its semaphore")
    }

    /// Runs blocking file work off the async threads, holding a place among the
    /// [`MAX_DISK_OPS`]; a panic there comes back as an I/O error.
    async fn on_disk<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> io::Result<T> {
        let permit = self.disk_permit().await;
        run_holding(permit, f).await
    }
}

/// Runs `f` on the blocking pool. The permit goes with it and is released when `f` ends,
/// not when the caller stops waiting: a cancelled save still occupies the disk until done.
async fn run_holding<T: Send + 'static>(
    permit: OwnedSemaphorePermit,
    f: impl FnOnce() -> T + Send + 'static,
) -> io::Result<T> {
    tokio::task::spawn_blocking(move || {
        let _permit = permit;
        f()
    })
    .await
    .map_err(|join| io::Error::other(join.to_string()))
}

/// The handoff file of `account` in `dir`.
pub fn handoff_path(dir: &Path, account: &AccountName) -> PathBuf {
    dir.join(format!("{account}.handoff"))
}

/// What became of a handoff given to [`deliver_handoff`].
#[derive(Debug)]
pub enum Delivery {
    /// No daemon held the state directory: the state was changed directly; this is the
    /// account's record now (`None`: no record).
    Applied(Option<State>),
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
            let next = handoff.apply(current.as_ref(), seed_fingerprint, now);
            match &next {
                Some(state) => store.save(account, state).await?,
                None => store.remove(account).await?,
            }
            // A handoff left by a daemon that stopped before applying it is superseded.
            store.clear_handoff(account).await?;
            Ok(Delivery::Applied(next))
        }
        Err(StoreError::Locked { pid, .. }) => {
            let me = rustix::process::geteuid().as_raw();
            let dir_err = |source| StoreError::Dir {
                dir: dir.to_path_buf(),
                source,
            };
            let owner = fs::metadata(dir).map_err(dir_err)?.uid();
            // The daemon must be able to read (and delete) what is written here.
            if owner != me {
                return Err(StoreError::NotOwner {
                    dir: dir.to_path_buf(),
                    owner,
                    me,
                });
            }
            let path = handoff_path(dir, account);
            let bytes = encode_handoff(account, handoff, keyring.as_ref());
            write_atomically(dir, &path, bytes, 0o600).map_err(|source| StoreError::Write {
                account: account.clone(),
                path: path.clone(),
                source,
            })?;
            Ok(Delivery::Pending { path, pid })
        }
        Err(e) => Err(e),
    }
}

/// Reads an account's state without the lock, for `tokend logout` while a daemon runs
/// (a file is always whole: writes are atomic). Unlike a store load, a bad file is left
/// where it is.
pub fn peek_state(
    dir: &Path,
    keyring: Option<&Keyring>,
    account: &AccountName,
) -> Result<Option<State>, StoreError> {
    match read_state(dir, keyring, account)? {
        None => Ok(None),
        Some(Ok(state)) => Ok(Some(state)),
        Some(Err((path, reason))) => Err(StoreError::Read {
            account: account.clone(),
            path,
            source: io::Error::new(io::ErrorKind::InvalidData, reason),
        }),
    }
}

/// Reads and decodes an account's state file: `None` when there is none, the decode
/// error (with the path) when it is unreadable as state.
#[allow(clippy::type_complexity)]
fn read_state(
    dir: &Path,
    keyring: Option<&Keyring>,
    account: &AccountName,
) -> Result<Option<Result<State, (PathBuf, String)>>, StoreError> {
    let path = state_path(dir, account);
    let mut bytes = match fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(StoreError::Read {
                account: account.clone(),
                path,
                source,
            });
        }
    };
    let parsed = decode(&bytes, account, keyring);
    bytes.zeroize();
    Ok(Some(parsed.map_err(|reason| (path, reason))))
}

fn load_blocking(
    dir: &Path,
    keyring: Option<&Keyring>,
    account: &AccountName,
) -> Result<Option<State>, StoreError> {
    let parsed = match read_state(dir, keyring, account)? {
        None => return Ok(None),
        Some(parsed) => parsed,
    };
    match parsed {
        Ok(state) => Ok(Some(state)),
        Err((path, reason)) => {
            // Never delete what may be the only copy of a refresh token: move it aside
            // for a human, and let the account start from its seed.
            let kept_as = aside_path(&path);
            if let Err(source) = fs::rename(&path, &kept_as) {
                return Err(StoreError::Read {
                    account: account.clone(),
                    path,
                    source,
                });
            }
            let _ = sync_dir(dir);
            Err(StoreError::Corrupt {
                account: account.clone(),
                path,
                reason,
                kept_as,
            })
        }
    }
}

/// The state file of `account` in `dir`.
pub fn state_path(dir: &Path, account: &AccountName) -> PathBuf {
    dir.join(format!("{account}.json"))
}

impl Store for FileStore {
    fn load<'a>(&'a self, account: &'a AccountName) -> StoreFuture<'a, Option<State>> {
        Box::pin(async move {
            let dir = self.dir.clone();
            let keyring = self.keyring.clone();
            let owned = account.clone();
            self.on_disk(move || load_blocking(&dir, keyring.as_ref(), &owned))
                .await
                .unwrap_or_else(|source| {
                    Err(StoreError::Read {
                        account: account.clone(),
                        path: self.path(account),
                        source,
                    })
                })
        })
    }

    fn save<'a>(&'a self, account: &'a AccountName, state: &'a State) -> StoreFuture<'a, ()> {
        Box::pin(async move {
            // Encoded only once a place is free, so a queue of saves holds no copies of
            // the secrets.
            let permit = self.disk_permit().await;
            let bytes = encode(account, state, self.keyring.as_ref());
            let dir = self.dir.clone();
            let path = self.path(account);
            let target = path.clone();
            run_holding(permit, move || {
                write_atomically(&dir, &target, bytes, 0o600)
            })
            .await
            .and_then(|written| written)
            .map_err(|source| StoreError::Write {
                account: account.clone(),
                path,
                source,
            })
        })
    }

    fn remove<'a>(&'a self, account: &'a AccountName) -> StoreFuture<'a, ()> {
        Box::pin(self.remove_durably(account, self.path(account)))
    }

    fn location(&self, account: &AccountName) -> String {
        self.path(account).display().to_string()
    }

    fn has_handoff<'a>(&'a self, account: &'a AccountName) -> StoreFuture<'a, bool> {
        let path = handoff_path(&self.dir, account);
        Box::pin(async move { Ok(path.exists()) })
    }

    fn load_handoff<'a>(&'a self, account: &'a AccountName) -> StoreFuture<'a, Option<Handoff>> {
        Box::pin(async move {
            let (dir, path) = (self.dir.clone(), handoff_path(&self.dir, account));
            let keyring = self.keyring.clone();
            let (owned, target) = (account.clone(), path.clone());
            self.on_disk(move || load_handoff_blocking(&dir, &target, keyring.as_ref(), &owned))
                .await
                .unwrap_or_else(|source| {
                    Err(StoreError::Read {
                        account: account.clone(),
                        path,
                        source,
                    })
                })
        })
    }

    fn clear_handoff<'a>(&'a self, account: &'a AccountName) -> StoreFuture<'a, ()> {
        Box::pin(self.remove_durably(account, handoff_path(&self.dir, account)))
    }
}

impl FileStore {
    async fn remove_durably(&self, account: &AccountName, path: PathBuf) -> Result<(), StoreError> {
        let dir = self.dir.clone();
        let target = path.clone();
        self.on_disk(move || remove_file_durably(&dir, &target))
            .await
            .and_then(|removed| removed)
            .map_err(|source| StoreError::Write {
                account: account.clone(),
                path,
                source,
            })
    }
}

/// Deletes `path` (absent is fine) and makes the deletion durable.
fn remove_file_durably(dir: &Path, path: &Path) -> io::Result<()> {
    match fs::remove_file(path) {
        Ok(()) => sync_dir(dir),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

fn load_handoff_blocking(
    dir: &Path,
    path: &Path,
    keyring: Option<&Keyring>,
    account: &AccountName,
) -> Result<Option<Handoff>, StoreError> {
    let mut bytes = match fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(StoreError::Read {
                account: account.clone(),
                path: path.to_path_buf(),
                source,
            });
        }
    };
    let parsed = decode_handoff(&bytes, account, keyring);
    bytes.zeroize();
    match parsed {
        Ok(h) => Ok(Some(h)),
        Err(reason) => {
            // Kept for a human, out of the way of the next handoff.
            let kept_as = aside_path(path);
            if let Err(source) = fs::rename(path, &kept_as) {
                return Err(StoreError::Read {
                    account: account.clone(),
                    path: path.to_path_buf(),
                    source,
                });
            }
            let _ = sync_dir(dir);
            Err(StoreError::Corrupt {
                account: account.clone(),
                path: path.to_path_buf(),
                reason,
                kept_as,
            })
        }
    }
}

/// temp file in the same directory → write → fdatasync → rename over the target → fsync
/// the directory. A crash at any point leaves either the old or the new file, never a
/// torn one, and the call returns only once the new one is durable.
pub(crate) fn write_atomically(
    dir: &Path,
    target: &Path,
    mut bytes: Vec<u8>,
    mode: u32,
) -> io::Result<()> {
    let result = (|| {
        let mut tmp = tempfile::Builder::new()
            .prefix(TEMP_PREFIX)
            .suffix(TEMP_SUFFIX)
            .permissions(fs::Permissions::from_mode(0o600))
            .tempfile_in(dir)?;
        // Exactly `mode`, whatever the umask took away at creation.
        tmp.as_file()
            .set_permissions(fs::Permissions::from_mode(mode))?;
        tmp.write_all(&bytes)?;
        // fdatasync suffices: for a new file it writes the data and the metadata needed
        // to read it back (size, block map), i.e. everything the rename below exposes.
        // What it may skip is timestamps and the mode set above; a lost mode change
        // leaves the creation mode (0600 less the umask), never a wider one, and the
        // journal commit of the directory fsync below carries it on ext4 and XFS anyway.
        tmp.as_file().sync_data()?;
        tmp.persist(target).map_err(|e| e.error)?;
        sync_dir(dir)
    })();
    bytes.zeroize();
    result
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

fn aside_path(path: &Path) -> PathBuf {
    let stamp = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs();
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(format!(".corrupt-{stamp}"));
    path.with_file_name(name)
}

/// Temp files left by a process killed mid-write hold nothing the real files lack.
fn remove_stale_temp_files(dir: &Path) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name.starts_with(TEMP_PREFIX) && name.ends_with(TEMP_SUFFIX) {
            let _ = fs::remove_file(entry.path());
        }
    }
}

// ---------------------------------------------------------------------------------------
// The on-disk format.

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Wire {
    version: u32,
    account: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    refresh_token: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    seed_fingerprint: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    refresh_token_issued_at: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    refresh_token_expires_at: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    access: Option<WireAccess>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    refresh_in_flight_since: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    last_refresh: Option<u64>,
}

/// A handoff file: `{"version":1,"account":"a","handoff":"refresh_token","refresh_token":".."}`
/// or `{"version":1,"account":"a","handoff":"logout"}`.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct WireHandoff {
    version: u32,
    account: String,
    handoff: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    refresh_token: Option<String>,
}

/// Sealed handoffs are bound to this associated data, so one cannot pass for a state file.
fn handoff_aad(account: &AccountName) -> String {
    format!("handoff:{account}")
}

fn encode_handoff(account: &AccountName, handoff: &Handoff, keyring: Option<&Keyring>) -> Vec<u8> {
    let mut wire = WireHandoff {
        version: FORMAT_VERSION,
        account: account.to_string(),
        handoff: match handoff {
            Handoff::RefreshToken(_) => "refresh_token",
            Handoff::Logout => "logout",
        }
        .into(),
        refresh_token: match handoff {
            Handoff::RefreshToken(rt) => Some(rt.expose().to_string()),
            Handoff::Logout => None,
        },
    };
    let mut bytes = serde_json::to_vec_pretty(&wire).expect("a handoff serializes");
    wire.refresh_token.zeroize();
    if let Some(keyring) = keyring {
        bytes = seal_file(
            keyring,
            FORMAT_VERSION,
            account.as_str(),
            &handoff_aad(account),
            bytes,
        );
    }
    bytes.push(b'\n');
    bytes
}

fn decode_handoff(
    bytes: &[u8],
    account: &AccountName,
    keyring: Option<&Keyring>,
) -> Result<Handoff, String> {
    unseal(
        bytes,
        FORMAT_VERSION,
        account.as_str(),
        &handoff_aad(account),
        keyring,
        |plain| read_handoff(plain, account),
    )
}

fn read_handoff(bytes: &[u8], account: &AccountName) -> Result<Handoff, String> {
    let mut wire: WireHandoff = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
    if wire.version != FORMAT_VERSION {
        return Err(format!(
            "handoff format version {} is unknown",
            wire.version
        ));
    }
    if wire.account != account.as_str() {
        return Err(format!("the file belongs to account {:?}", wire.account));
    }
    match (wire.handoff.as_str(), wire.refresh_token.take()) {
        ("refresh_token", Some(rt)) if !rt.is_empty() => Ok(Handoff::RefreshToken(Secret::new(rt))),
        ("logout", None) => Ok(Handoff::Logout),
        (kind, _) => Err(format!("not a valid handoff of kind {kind:?}")),
    }
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct WireAccess {
    token: String,
    token_type: String,
    expires_at: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    scope: Option<String>,
    issued_at: u64,
}

fn to_unix(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs()
}

fn from_unix(s: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(s)
}

fn encode(account: &AccountName, state: &State, keyring: Option<&Keyring>) -> Vec<u8> {
    let mut wire = Wire {
        version: FORMAT_VERSION,
        account: account.to_string(),
        refresh_token: state.refresh_token.as_ref().map(|s| s.expose().to_string()),
        seed_fingerprint: state.seed_fingerprint.clone(),
        refresh_token_issued_at: state.refresh_token_issued_at.map(to_unix),
        refresh_token_expires_at: state.refresh_token_expires_at.map(to_unix),
        access: state.access.as_ref().map(|a| WireAccess {
            token: a.token.expose().to_string(),
            token_type: a.token_type.clone(),
            expires_at: to_unix(a.expires_at),
            scope: a.scope.clone(),
            issued_at: to_unix(a.issued_at),
        }),
        refresh_in_flight_since: state.refresh_in_flight_since.map(to_unix),
        last_refresh: state.last_refresh.map(to_unix),
    };
    let mut bytes = serde_json::to_vec_pretty(&wire).expect("state serializes");
    wire.refresh_token.zeroize();
    if let Some(a) = wire.access.as_mut() {
        a.token.zeroize();
    }
    if let Some(keyring) = keyring {
        bytes = seal_file(
            keyring,
            FORMAT_VERSION,
            account.as_str(),
            account.as_str(),
            bytes,
        );
    }
    bytes.push(b'\n');
    bytes
}

fn decode(bytes: &[u8], account: &AccountName, keyring: Option<&Keyring>) -> Result<State, String> {
    if bytes.is_empty() {
        return Err("the file is empty".into());
    }
    unseal(
        bytes,
        FORMAT_VERSION,
        account.as_str(),
        account.as_str(),
        keyring,
        |plain| read_wire(plain, account),
    )
}

fn read_wire(bytes: &[u8], account: &AccountName) -> Result<State, String> {
    // serde_json's messages name line and column but never echo the input's values.
    let mut wire: Wire = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
    if wire.version != FORMAT_VERSION {
        return Err(format!(
            "format version {} is not {FORMAT_VERSION}, the one this tokend understands",
            wire.version
        ));
    }
    if wire.account != account.as_str() {
        return Err(format!("the file belongs to account {:?}", wire.account));
    }
    let state = State {
        refresh_token: wire.refresh_token.take().map(Secret::new),
        seed_fingerprint: wire.seed_fingerprint.take(),
        refresh_token_issued_at: wire.refresh_token_issued_at.map(from_unix),
        refresh_token_expires_at: wire.refresh_token_expires_at.map(from_unix),
        access: wire.access.take().map(|a| AccessToken {
            token: Secret::new(a.token),
            token_type: a.token_type,
            expires_at: from_unix(a.expires_at),
            scope: a.scope,
            issued_at: from_unix(a.issued_at),
        }),
        refresh_in_flight_since: wire.refresh_in_flight_since.map(from_unix),
        last_refresh: wire.last_refresh.map(from_unix),
    };
    Ok(state)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name(s: &str) -> AccountName {
        AccountName::parse(s).unwrap()
    }

    fn sample() -> State {
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

    #[tokio::test(flavor = "multi_thread", worker_threads = 1)]
    async fn save_then_load_round_trips_with_private_modes() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("state");
        let store = FileStore::open(&dir).unwrap();
        let a = name("acct");
        assert_eq!(store.load(&a).await.unwrap(), None);
        store.save(&a, &sample()).await.unwrap();
        assert_eq!(store.load(&a).await.unwrap(), Some(sample()));
        let file_mode = fs::metadata(store.path(&a)).unwrap().permissions().mode();
        assert_eq!(file_mode & 0o777, 0o600);
        let dir_mode = fs::metadata(&dir).unwrap().permissions().mode();
        assert_eq!(dir_mode & 0o777, 0o700);
        // No temp files are left behind.
        let names: Vec<_> = fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(names.len(), 2, "{names:?}");
    }

    #[test]
    fn a_second_store_on_the_same_dir_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let _first = FileStore::open(tmp.path()).unwrap();
        let err = FileStore::open(tmp.path())
            .err()
            .expect("second open must fail");
        assert!(matches!(err, StoreError::Locked { .. }), "{err}");
        assert!(
            err.to_string()
                .contains(&format!("pid {}", std::process::id()))
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 1)]
    async fn a_corrupt_file_is_kept_aside_not_deleted() {
        let tmp = tempfile::tempdir().unwrap();
        let store = FileStore::open(tmp.path()).unwrap();
        let a = name("acct");
        fs::write(store.path(&a), b"{\"version\": 1, \"acc").unwrap();
        let err = store.load(&a).await.unwrap_err();
        let StoreError::Corrupt { kept_as, .. } = &err else {
            panic!("expected Corrupt, got {err}");
        };
        assert_eq!(fs::read(kept_as).unwrap(), b"{\"version\": 1, \"acc");
        assert!(err.to_string().contains("acct"));
        // The account starts afresh: no file now, so the next load finds nothing.
        assert_eq!(store.load(&a).await.unwrap(), None);
    }

    #[test]
    fn decode_rejects_other_versions_and_accounts_without_echoing_secrets() {
        let bytes = encode(&name("a"), &sample(), None);
        assert!(
            decode(&bytes, &name("b"), None)
                .unwrap_err()
                .contains("\"a\"")
        );
        let text = String::from_utf8(bytes)
            .unwrap()
            .replace("\"version\": 1", "\"version\": 9");
        let err = decode(text.as_bytes(), &name("a"), None).unwrap_err();
        assert!(err.contains("version 9"), "{err}");
        assert!(!err.contains("rt-1"));
    }

    fn ring(current: u8, previous: &[u8]) -> Keyring {
        let key = |b: u8| {
            crate::seal::SealKey::parse(&Secret::new(format!("{b:02x}").repeat(32))).unwrap()
        };
        Keyring {
            current: key(current),
            previous: previous.iter().map(|b| key(*b)).collect(),
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 1)]
    async fn sealed_files_hold_no_secret_in_clear_and_survive_key_rotation() {
        let tmp = tempfile::tempdir().unwrap();
        let a = name("acct");
        {
            let store = FileStore::open_sealed(tmp.path(), Some(ring(1, &[]))).unwrap();
            store.save(&a, &sample()).await.unwrap();
            let text = fs::read_to_string(store.path(&a)).unwrap();
            assert!(!text.contains("rt-1") && !text.contains("at-1"), "{text}");
            assert!(text.contains("XChaCha20-Poly1305"));
            assert_eq!(store.load(&a).await.unwrap(), Some(sample()));
        }
        {
            // Rotation: the old key still opens the file; the next save re-seals.
            let store = FileStore::open_sealed(tmp.path(), Some(ring(2, &[1]))).unwrap();
            assert_eq!(store.load(&a).await.unwrap(), Some(sample()));
            store.save(&a, &sample()).await.unwrap();
        }
        {
            // The old key can go once every file was re-sealed.
            let store = FileStore::open_sealed(tmp.path(), Some(ring(2, &[]))).unwrap();
            assert_eq!(store.load(&a).await.unwrap(), Some(sample()));
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 1)]
    async fn plain_files_are_read_and_a_missing_key_keeps_the_file_aside() {
        let tmp = tempfile::tempdir().unwrap();
        let a = name("acct");
        {
            let store = FileStore::open(tmp.path()).unwrap();
            store.save(&a, &sample()).await.unwrap();
        }
        {
            // Turning encryption on: the clear file is read, then sealed on save.
            let store = FileStore::open_sealed(tmp.path(), Some(ring(1, &[]))).unwrap();
            assert_eq!(store.load(&a).await.unwrap(), Some(sample()));
            store.save(&a, &sample()).await.unwrap();
        }
        let store = FileStore::open_sealed(tmp.path(), Some(ring(3, &[]))).unwrap();
        let err = store.load(&a).await.unwrap_err();
        let StoreError::Corrupt { kept_as, .. } = &err else {
            panic!("{err}")
        };
        assert!(err.to_string().contains("key id"), "{err}");
        assert!(
            fs::read_to_string(kept_as).unwrap().contains("sealed"),
            "kept, not lost"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 1)]
    async fn a_handoff_is_applied_directly_or_left_for_the_daemon_holding_the_lock() {
        let tmp = tempfile::tempdir().unwrap();
        let a = name("acct");
        let now = from_unix(1_800_000_000);
        let handoff = Handoff::RefreshToken(Secret::new("rt-new"));
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

    #[test]
    fn handoff_files_are_bound_to_their_account_and_never_read_as_state() {
        let bytes = encode_handoff(&name("a"), &Handoff::Logout, None);
        assert_eq!(
            decode_handoff(&bytes, &name("a"), None),
            Ok(Handoff::Logout)
        );
        assert!(decode_handoff(&bytes, &name("b"), None).is_err());
        assert!(decode(&bytes, &name("a"), None).is_err());
        let sealed = encode_handoff(
            &name("a"),
            &Handoff::RefreshToken(Secret::new("rt-9")),
            Some(&ring(1, &[])),
        );
        assert!(decode(&sealed, &name("a"), Some(&ring(1, &[]))).is_err());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_burst_of_saves_is_bounded_on_disk_and_every_save_lands() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        let tmp = tempfile::tempdir().unwrap();
        let store = FileStore::open(tmp.path()).unwrap();

        // Hold the disk work of the first wave until the queue behind it has formed.
        let running = Arc::new(AtomicUsize::new(0));
        let most = Arc::new(AtomicUsize::new(0));
        let (release, gate) = std::sync::mpsc::channel::<()>();
        let gate = Arc::new(std::sync::Mutex::new(gate));
        let mut held = tokio::task::JoinSet::new();
        for _ in 0..2 * MAX_DISK_OPS {
            let (store, running, most, gate) = (
                Arc::clone(&store),
                Arc::clone(&running),
                Arc::clone(&most),
                Arc::clone(&gate),
            );
            held.spawn(async move {
                store
                    .on_disk(move || {
                        let now = running.fetch_add(1, Ordering::SeqCst) + 1;
                        most.fetch_max(now, Ordering::SeqCst);
                        gate.lock().unwrap().recv().unwrap();
                        running.fetch_sub(1, Ordering::SeqCst);
                    })
                    .await
                    .unwrap()
            });
        }
        while running.load(Ordering::SeqCst) < MAX_DISK_OPS {
            tokio::task::yield_now().await;
        }
        assert_eq!(store.disk_ops.available_permits(), 0);
        // Saves queue behind the held ones (and behind each other) rather than fail.
        let saves: Vec<_> = (0..3 * MAX_DISK_OPS)
            .map(|i| {
                let store = Arc::clone(&store);
                tokio::spawn(async move {
                    let a = name(&format!("acct-{i}"));
                    let mut state = sample();
                    state.seed_fingerprint = Some(format!("fp-{i}"));
                    store.save(&a, &state).await
                })
            })
            .collect();
        for _ in 0..2 * MAX_DISK_OPS {
            release.send(()).unwrap();
        }
        held.join_all().await;
        for save in saves {
            save.await.unwrap().unwrap();
        }
        assert_eq!(most.load(Ordering::SeqCst), MAX_DISK_OPS);
        assert_eq!(store.disk_ops.available_permits(), MAX_DISK_OPS);
        for i in 0..3 * MAX_DISK_OPS {
            let state = store
                .load(&name(&format!("acct-{i}")))
                .await
                .unwrap()
                .unwrap();
            assert_eq!(state.seed_fingerprint, Some(format!("fp-{i}")));
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 1)]
    async fn a_cancelled_save_leaves_the_old_or_the_new_record_and_frees_its_place() {
        let tmp = tempfile::tempdir().unwrap();
        let store = FileStore::open(tmp.path()).unwrap();
        let a = name("acct");
        store.save(&a, &sample()).await.unwrap();
        let mut next = sample();
        next.refresh_token = Some(Secret::new("rt-2"));
        // Dropped at its first await: queued, or already handed to the blocking pool.
        let save = store.save(&a, &next);
        drop(tokio::time::timeout(Duration::ZERO, save).await);
        let loaded = store.load(&a).await.unwrap().unwrap();
        assert!(loaded == sample() || loaded == next);
        // The blocking work that outlived its caller gave its place back.
        while store.disk_ops.available_permits() < MAX_DISK_OPS {
            tokio::task::yield_now().await;
        }
    }

    #[test]
    fn sealed_state_and_handoffs_share_one_envelope_check() {
        let keys = ring(1, &[]);
        let state = encode(&name("a"), &sample(), Some(&keys));
        let handoff = encode_handoff(&name("a"), &Handoff::Logout, Some(&keys));
        for err in [
            decode(&state, &name("b"), Some(&keys)).unwrap_err(),
            decode_handoff(&handoff, &name("b"), Some(&keys)).unwrap_err(),
        ] {
            assert_eq!(err, "the file belongs to account \"a\"");
        }
        for err in [
            decode(&state, &name("a"), None).unwrap_err(),
            decode_handoff(&handoff, &name("a"), None).unwrap_err(),
        ] {
            assert!(err.contains("no state.encryption_key"), "{err}");
        }
        assert_eq!(decode(&state, &name("a"), Some(&keys)), Ok(sample()));
        assert_eq!(
            decode_handoff(&handoff, &name("a"), Some(&keys)),
            Ok(Handoff::Logout)
        );
    }

    #[test]
    fn stale_temp_files_are_swept_at_open() {
        let tmp = tempfile::tempdir().unwrap();
        fs::write(tmp.path().join(".tokend-abc.tmp"), b"partial").unwrap();
        let _store = FileStore::open(tmp.path()).unwrap();
        assert!(!tmp.path().join(".tokend-abc.tmp").exists());
    }
}
