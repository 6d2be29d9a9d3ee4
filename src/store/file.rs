//! The file-backed [`Store`]: one file per account, mode 0600, in a 0700 directory of
//! this user's guarded by an exclusive lock, and the handoff files waiting there for the
//! daemon. A file it cannot make sense of is kept aside, never deleted.

use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use zeroize::Zeroize;

use rustix::fs::{Mode, OFlags};
use rustix::io::Errno;

use super::PathProblem;
use super::atomic::{is_temp_file, remove_file_durably, sync_dir, write_atomically};
use super::safe_path::{open_dir, read_no_follow};
use super::spent::{LEDGER_FILE, Ledger, read_log, record, spent_fingerprint};
use super::wire::{decode, decode_handoff, encode, encode_handoff};
use super::{
    Change, FEED_CAPACITY, Handoff, Lease, LeaseGrant, Spent, SpentBy, SpentKind, State, Store,
    StoreError, StoreFuture,
};
use crate::config::AccountName;
use crate::seal::Keyring;
use crate::secret::Secret;

/// The file-backed store. Holding it holds the state directory's lock.
pub struct FileStore {
    dir: PathBuf,
    /// Leases and the change feed in memory: the directory lock makes this process the
    /// only writer, so they only order the tasks inside it.
    shared: InProcess,
    keyring: Option<Keyring>,
    /// One per file operation under way on the blocking pool; see [`MAX_DISK_OPS`].
    disk_ops: Arc<Semaphore>,
    ledger: Arc<Ledger>,
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
/// Not `*.json`, not hidden: an operator listing the directory sees it.
const MOVED_FILE: &str = "MOVED";

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
        let fd = open_dir(dir, true)?;
        let meta = rustix::fs::fstat(&fd).map_err(|e| dir_err(e.into()))?;
        let mode = meta.st_mode & 0o7777;
        if mode & 0o022 != 0 {
            return Err(StoreError::Insecure {
                dir: dir.to_path_buf(),
                mode,
            });
        }
        // A state dir owned by another user could have its files swapped under us.
        let me = rustix::process::geteuid().as_raw();
        if meta.st_uid != me {
            return Err(StoreError::NotOwner {
                dir: dir.to_path_buf(),
                owner: meta.st_uid,
                me,
            });
        }
        // Ours, but readable by others (made by hand, or an old umask): close it. On the
        // directory opened, not on a path that could have been repointed since.
        if mode & 0o077 != 0 {
            rustix::fs::fchmod(&fd, Mode::from_raw_mode(0o700)).map_err(|e| dir_err(e.into()))?;
        }
        let mut lock = open_lock(dir, &fd)?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(fs::TryLockError::WouldBlock) => {
                let mut text = String::new();
                let _ = lock.read_to_string(&mut text);
                let text = Some(text.trim().to_string()).filter(|s| !s.is_empty());
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
        // Checked under the lock: `tokend state copy` writes the marker while holding it.
        if let Some(to) = moved_to(dir)? {
            return Err(StoreError::Moved {
                dir: dir.to_path_buf(),
                to,
            });
        }
        lock.set_len(0).map_err(dir_err)?;
        writeln!(lock, "{}", std::process::id()).map_err(dir_err)?;
        remove_stale_temp_files(dir);
        let ledger = Ledger::open(dir).map_err(|source| StoreError::Ledger {
            path: dir.join(LEDGER_FILE),
            source,
        })?;
        Ok(Arc::new(FileStore {
            dir: dir.to_path_buf(),
            keyring,
            disk_ops: Arc::new(Semaphore::new(MAX_DISK_OPS)),
            ledger: Arc::new(ledger),
            shared: InProcess::new(),
            _lock: lock,
        }))
    }

    pub fn path(&self, account: &AccountName) -> PathBuf {
        state_path(&self.dir, account)
    }

    /// Marks the directory as moved to `to` (a description naming no secret): from now on
    /// [`FileStore::open_sealed`] refuses it with [`StoreError::Moved`]. Durable on return.
    pub fn mark_moved(&self, to: &str) -> Result<PathBuf, StoreError> {
        let path = moved_path(&self.dir);
        let text = format!(
            "{to}\n\nCopied there by `tokend state copy` at {}. tokend refuses this directory \
             while this file exists: a daemon on it would refresh the chains the new store \
             holds now. Delete this file only to go back, and only if no tokend has used \
             the new store yet.\n",
            crate::clock::rfc3339(SystemTime::now())
        );
        write_atomically(&self.dir, &path, text.into_bytes(), 0o600).map_err(|source| {
            StoreError::Dir {
                dir: self.dir.clone(),
                source,
            }
        })?;
        Ok(path)
    }

    /// Every entry of the ledger of spent refresh tokens, oldest first.
    pub(crate) fn ledger_entries(&self) -> Vec<(String, Spent)> {
        self.ledger.all()
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

/// Creates (0600) or opens the lock file in the state directory `dir_fd`, never through
/// a symbolic link: one planted as `.lock` would have its target truncated to our pid.
fn open_lock(dir: &Path, dir_fd: &OwnedFd) -> Result<File, StoreError> {
    let flags = OFlags::RDWR | OFlags::CREATE | OFlags::NOFOLLOW | OFlags::CLOEXEC;
    match rustix::fs::openat(dir_fd, LOCK_FILE, flags, Mode::from_raw_mode(0o600)) {
        Ok(fd) => Ok(File::from(fd)),
        Err(Errno::LOOP) => Err(StoreError::UnsafePath {
            dir: dir.to_path_buf(),
            problem: PathProblem::LinkInside {
                path: lock_path(dir),
            },
        }),
        Err(e) => Err(StoreError::Dir {
            dir: dir.to_path_buf(),
            source: io::Error::new(
                io::Error::from(e).kind(),
                format!("{}: {e}", lock_path(dir).display()),
            ),
        }),
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

/// The marker `tokend state copy` leaves in a state directory it copied elsewhere.
pub fn moved_path(dir: &Path) -> PathBuf {
    dir.join(MOVED_FILE)
}

/// Where the marker of `dir` says its records went (its first line), if there is one.
fn moved_to(dir: &Path) -> Result<Option<String>, StoreError> {
    match read_no_follow(&moved_path(dir)) {
        Ok(bytes) => {
            let text = String::from_utf8_lossy(&bytes);
            let to = text.lines().next().unwrap_or_default().trim();
            Ok(Some(
                if to.is_empty() { "another store" } else { to }.to_string(),
            ))
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(StoreError::Dir {
            dir: dir.to_path_buf(),
            source,
        }),
    }
}

/// The lock file of the state directory `dir`: while a daemon runs it holds the lock,
/// and the file names its pid (`tokend reload` signals that pid).
pub fn lock_path(dir: &Path) -> PathBuf {
    dir.join(LOCK_FILE)
}

/// The state file of `account` in `dir`.
pub fn state_path(dir: &Path, account: &AccountName) -> PathBuf {
    dir.join(format!("{account}.json"))
}

/// The handoff file of `account` in `dir`.
pub fn handoff_path(dir: &Path, account: &AccountName) -> PathBuf {
    dir.join(format!("{account}.handoff"))
}

/// Reads an account's state without the lock, for `tokend logout` while a daemon runs
/// (a file is always whole: writes are atomic). Unlike a store load, a bad file is left
/// where it is.
pub fn peek_state(
    dir: &Path,
    keyring: Option<&Keyring>,
    account: &AccountName,
) -> Result<Option<State>, StoreError> {
    let path = state_path(dir, account);
    peek(path, account, |bytes| decode(bytes, account, keyring))
}

/// Reads an account's pending handoff without the lock and leaves a bad file where it is,
/// as [`peek_state`] does.
pub fn peek_handoff(
    dir: &Path,
    keyring: Option<&Keyring>,
    account: &AccountName,
) -> Result<Option<Handoff>, StoreError> {
    let path = handoff_path(dir, account);
    peek(path, account, |bytes| {
        decode_handoff(bytes, account, keyring)
    })
}

fn peek<T>(
    path: PathBuf,
    account: &AccountName,
    decode: impl FnOnce(&[u8]) -> Result<T, String>,
) -> Result<Option<T>, StoreError> {
    match read_file(&path, account, decode)? {
        None => Ok(None),
        Some(Ok(found)) => Ok(Some(found)),
        Some(Err(reason)) => Err(StoreError::Read {
            account: account.clone(),
            path,
            source: io::Error::new(io::ErrorKind::InvalidData, reason),
        }),
    }
}

/// Why `token` must not be presented, as far as the files of `dir` tell without the
/// lock (for `tokend login`/`import` while a daemon runs): the ledger, and every account's
/// current refresh token and chain. State files that cannot be read are passed over.
pub fn peek_spent(
    dir: &Path,
    keyring: Option<&Keyring>,
    token: &Secret,
) -> Result<Option<SpentBy>, StoreError> {
    let fp = spent_fingerprint(token);
    let path = dir.join(LEDGER_FILE);
    let (entries, _, _) = read_log(&path).map_err(|source| StoreError::Ledger { path, source })?;
    if let Some(spent) = entries.get(&fp) {
        return Ok(Some(SpentBy::Ledger(spent.clone())));
    }
    let listing = match fs::read_dir(dir) {
        Ok(l) => l,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(StoreError::Dir {
                dir: dir.to_path_buf(),
                source,
            });
        }
    };
    for entry in listing.flatten() {
        let file = entry.file_name();
        let Some(account) = file
            .to_str()
            .and_then(|n| n.strip_suffix(".json"))
            .and_then(|n| AccountName::parse(n).ok())
        else {
            continue;
        };
        let Ok(Some(state)) = peek_state(dir, keyring, &account) else {
            continue;
        };
        if state.refresh_token.as_ref() == Some(token) {
            return Ok(Some(SpentBy::InUse(account)));
        }
        if state.spent.contains(&fp) {
            return Ok(Some(SpentBy::Rotated(account)));
        }
    }
    Ok(None)
}

fn load_blocking(
    dir: &Path,
    keyring: Option<&Keyring>,
    account: &AccountName,
) -> Result<Option<State>, StoreError> {
    let path = state_path(dir, account);
    match read_file(&path, account, |bytes| decode(bytes, account, keyring))? {
        None => Ok(None),
        Some(Ok(state)) => Ok(Some(state)),
        // The account starts again from its seed.
        Some(Err(reason)) => Err(keep_aside(dir, path, account, reason)),
    }
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
            })?;
            let _ = self.shared.feed.send(Change::Record(account.clone()));
            Ok(())
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

    fn put_handoff<'a>(
        &'a self,
        account: &'a AccountName,
        handoff: &'a Handoff,
    ) -> StoreFuture<'a, ()> {
        Box::pin(async move {
            let (dir, keyring) = (self.dir.clone(), self.keyring.clone());
            let (owned, handoff_owned) = (account.clone(), handoff.clone());
            self.on_disk(move || leave_handoff(&dir, keyring.as_ref(), &owned, &handoff_owned))
                .await
                .unwrap_or_else(|source| {
                    Err(StoreError::Write {
                        account: account.clone(),
                        path: handoff_path(&self.dir, account),
                        source,
                    })
                })?;
            let _ = self.shared.feed.send(Change::Handoff(account.clone()));
            Ok(())
        })
    }

    fn clear_handoff<'a>(&'a self, account: &'a AccountName) -> StoreFuture<'a, ()> {
        Box::pin(self.remove_durably(account, handoff_path(&self.dir, account)))
    }

    fn record_spent<'a>(
        &'a self,
        account: &'a AccountName,
        fingerprint: &'a str,
        kind: SpentKind,
    ) -> StoreFuture<'a, ()> {
        Box::pin(async move {
            let ledger = Arc::clone(&self.ledger);
            let entry = (fingerprint.to_string(), record(account, kind));
            self.on_disk(move || ledger.append(vec![entry]))
                .await
                .and_then(|appended| appended)
                .map_err(|source| self.ledger_error(source))
        })
    }

    fn spent<'a>(&'a self, fingerprint: &'a str) -> StoreFuture<'a, Option<Spent>> {
        // In memory, and its lock is never held across the disk: no blocking pool.
        Box::pin(async move { Ok(self.ledger.get(fingerprint)) })
    }

    fn rename<'a>(&'a self, from: &'a AccountName, to: &'a AccountName) -> StoreFuture<'a, ()> {
        Box::pin(async move {
            let (dir, keyring) = (self.dir.clone(), self.keyring.clone());
            let ledger = Arc::clone(&self.ledger);
            let (f, t) = (from.clone(), to.clone());
            self.on_disk(move || rename_blocking(&dir, keyring.as_ref(), &ledger, &f, &t))
                .await
                .unwrap_or_else(|source| Err(self.ledger_error(source)))
        })
    }

    fn set_aside<'a>(&'a self, account: &'a AccountName) -> StoreFuture<'a, Option<String>> {
        Box::pin(async move {
            let (dir, path) = (self.dir.clone(), self.path(account));
            let kept = aside_path(&path, "replaced");
            let name = kept.file_name().map(|n| n.to_string_lossy().into_owned());
            // A second name for the same file: the save that replaces the record
            // renames over the first name only, and a crash in between loses nothing.
            let linked = self
                .on_disk(move || match fs::hard_link(&path, &kept) {
                    Ok(()) => sync_dir(&dir).map(|()| true),
                    Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
                    Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(true),
                    Err(e) => Err(e),
                })
                .await
                .and_then(|linked| linked)
                .map_err(|source| StoreError::Write {
                    account: account.clone(),
                    path: self.path(account),
                    source,
                })?;
            Ok(if linked { name } else { None })
        })
    }

    fn drop_aside<'a>(&'a self, account: &'a AccountName, kept: &'a str) -> StoreFuture<'a, ()> {
        Box::pin(async move {
            // Only a name `set_aside` makes: a state file cannot point anywhere else.
            let prefix = format!("{account}.json.replaced-");
            if !kept.starts_with(&prefix) || kept.contains('/') {
                return Ok(());
            }
            self.remove_durably(account, self.dir.join(kept)).await
        })
    }

    fn shared(&self) -> bool {
        false
    }

    fn node_id(&self) -> &str {
        &self.shared.node_id
    }

    fn lease_ttl(&self) -> std::time::Duration {
        FILE_LEASE_SPAN
    }

    fn acquire<'a>(
        &'a self,
        account: &'a AccountName,
        held: Option<Lease>,
    ) -> StoreFuture<'a, LeaseGrant> {
        Box::pin(async move { Ok(self.shared.acquire(account, held)) })
    }

    fn renew<'a>(
        &'a self,
        held: &'a [(AccountName, Lease)],
    ) -> StoreFuture<'a, Vec<(AccountName, Lease)>> {
        Box::pin(async move {
            Ok(held
                .iter()
                .filter(|(a, l)| self.held(a, *l))
                .map(|(a, l)| (a.clone(), InProcess::lease(l.epoch)))
                .collect())
        })
    }

    fn release<'a>(&'a self, account: &'a AccountName, lease: Lease) -> StoreFuture<'a, ()> {
        Box::pin(async move {
            self.shared.release(account, lease);
            Ok(())
        })
    }

    fn holder<'a>(&'a self, account: &'a AccountName) -> StoreFuture<'a, Option<String>> {
        let held = self
            .shared
            .leases
            .lock()
            .expect("lease table")
            .contains_key(account);
        Box::pin(async move { Ok(held.then(|| self.shared.node_id.clone())) })
    }

    fn replicas(&self) -> StoreFuture<'_, Vec<String>> {
        Box::pin(async move { Ok(vec![self.shared.node_id.clone()]) })
    }

    fn save_fenced<'a>(
        &'a self,
        account: &'a AccountName,
        state: &'a State,
        lease: Lease,
    ) -> StoreFuture<'a, ()> {
        Box::pin(async move {
            // The only writer is this process: the epoch check orders its own tasks.
            if !self.held(account, lease) {
                return Err(StoreError::Fenced {
                    account: account.clone(),
                    epoch: lease.epoch,
                });
            }
            self.save(account, state).await
        })
    }

    fn subscribe(&self) -> tokio::sync::broadcast::Receiver<Change> {
        self.shared.feed.subscribe()
    }

    fn request_refresh<'a>(&'a self, account: &'a AccountName) -> StoreFuture<'a, ()> {
        let _ = self.shared.feed.send(Change::Demand(account.clone()));
        Box::pin(async { Ok(()) })
    }

    fn check(&self) -> StoreFuture<'_, String> {
        Box::pin(async move {
            Ok(format!(
                "file store {} (format version {})",
                self.dir.display(),
                super::FORMAT_VERSION
            ))
        })
    }
}

/// The file store's leases and change feed. A lease never expires on its own: the
/// process holding the directory lock is the only one that can write, so a lease only
/// orders this process's own tasks (an account's refresher across a reload).
struct InProcess {
    node_id: String,
    leases: std::sync::Mutex<std::collections::HashMap<AccountName, u64>>,
    next_epoch: std::sync::atomic::AtomicU64,
    feed: tokio::sync::broadcast::Sender<Change>,
}

/// How far ahead a file-store lease is valid: for as long as the process runs.
const FILE_LEASE_SPAN: std::time::Duration = std::time::Duration::from_secs(100 * 365 * 86_400);

impl InProcess {
    fn new() -> InProcess {
        InProcess {
            node_id: format!(
                "{}-{}",
                rustix::system::uname().nodename().to_string_lossy(),
                std::process::id()
            ),
            leases: std::sync::Mutex::default(),
            next_epoch: std::sync::atomic::AtomicU64::new(1),
            feed: tokio::sync::broadcast::channel(FEED_CAPACITY).0,
        }
    }

    fn lease(epoch: u64) -> Lease {
        Lease {
            epoch,
            until: tokio::time::Instant::now() + FILE_LEASE_SPAN,
        }
    }

    fn acquire(&self, account: &AccountName, held: Option<Lease>) -> LeaseGrant {
        let mut leases = self.leases.lock().expect("lease table");
        match leases.get(account) {
            Some(&epoch) if held.is_some_and(|l| l.epoch == epoch) => {
                LeaseGrant::Held(Self::lease(epoch))
            }
            Some(_) => LeaseGrant::HeldBy(self.node_id.clone()),
            None => {
                let epoch = self
                    .next_epoch
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                leases.insert(account.clone(), epoch);
                LeaseGrant::Held(Self::lease(epoch))
            }
        }
    }

    fn holds(&self, account: &AccountName, lease: Lease) -> bool {
        self.leases.lock().expect("lease table").get(account) == Some(&lease.epoch)
    }

    fn release(&self, account: &AccountName, lease: Lease) {
        let mut leases = self.leases.lock().expect("lease table");
        if leases.get(account) == Some(&lease.epoch) {
            leases.remove(account);
            let _ = self.feed.send(Change::LeaseFreed(account.clone()));
        }
    }
}

impl FileStore {
    /// The shared half of [`Store`] for one process; see [`InProcess`].
    fn held(&self, account: &AccountName, lease: Lease) -> bool {
        self.shared.holds(account, lease)
    }

    fn ledger_error(&self, source: io::Error) -> StoreError {
        StoreError::Ledger {
            path: self.dir.join(LEDGER_FILE),
            source,
        }
    }

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

/// [`Store::rename`] for the file store: save under `to`, move the ledger entries, then
/// remove `from`. A second run after a crash finds `to` holding `from`'s refresh token and
/// finishes the move.
fn rename_blocking(
    dir: &Path,
    keyring: Option<&Keyring>,
    ledger: &Ledger,
    from: &AccountName,
    to: &AccountName,
) -> Result<(), StoreError> {
    let target = match load_blocking(dir, keyring, to) {
        Ok(state) => state,
        // Unreadable: kept aside, out of the way.
        Err(StoreError::Corrupt { .. }) => None,
        Err(e) => return Err(e),
    };
    let Some(mut state) = load_blocking(dir, keyring, from)? else {
        return Err(StoreError::NothingToMove {
            account: from.clone(),
            path: state_path(dir, from),
        });
    };
    let to_path = state_path(dir, to);
    if let Some(rt) = target.and_then(|t| t.refresh_token)
        && Some(&rt) != state.refresh_token.as_ref()
    {
        return Err(StoreError::Occupied {
            account: to.clone(),
            path: to_path,
        });
    }
    // A copy kept aside under the old name stays for a human.
    state.replaced = None;
    write_atomically(dir, &to_path, encode(to, &state, keyring), 0o600).map_err(|source| {
        StoreError::Write {
            account: to.clone(),
            path: to_path,
            source,
        }
    })?;
    ledger
        .append(ledger.moved(from, to))
        .map_err(|source| StoreError::Ledger {
            path: dir.join(LEDGER_FILE),
            source,
        })?;
    let from_path = state_path(dir, from);
    remove_file_durably(dir, &from_path).map_err(|source| StoreError::Write {
        account: from.clone(),
        path: from_path,
        source,
    })
}

fn load_handoff_blocking(
    dir: &Path,
    path: &Path,
    keyring: Option<&Keyring>,
    account: &AccountName,
) -> Result<Option<Handoff>, StoreError> {
    match read_file(path, account, |bytes| {
        decode_handoff(bytes, account, keyring)
    })? {
        None => Ok(None),
        Some(Ok(handoff)) => Ok(Some(handoff)),
        // Out of the way of the next handoff too.
        Some(Err(reason)) => Err(keep_aside(dir, path.to_path_buf(), account, reason)),
    }
}

/// Reads the file at `path` and decodes it: `None` when there is none, the decode error
/// when it does not hold what it should. The bytes read are zeroized.
fn read_file<T>(
    path: &Path,
    account: &AccountName,
    decode: impl FnOnce(&[u8]) -> Result<T, String>,
) -> Result<Option<Result<T, String>>, StoreError> {
    let mut bytes = match read_no_follow(path) {
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
    let parsed = decode(&bytes);
    bytes.zeroize();
    Ok(Some(parsed))
}

/// Moves the file at `path`, which does not hold what it should (`reason`), out of the
/// way. Never deleted: it may be the only copy of a refresh token, so it stays for a
/// human.
fn keep_aside(dir: &Path, path: PathBuf, account: &AccountName, reason: String) -> StoreError {
    let kept_as = aside_path(&path, "corrupt");
    if let Err(source) = fs::rename(&path, &kept_as) {
        return StoreError::Read {
            account: account.clone(),
            path,
            source,
        };
    }
    let _ = sync_dir(dir);
    StoreError::Corrupt {
        account: account.clone(),
        path,
        reason,
        kept_as,
    }
}

/// Leaves `handoff` as a file for the process holding the lock of `dir` (the daemon),
/// whose store's `load_handoff` reads it.
pub(super) fn leave_handoff(
    dir: &Path,
    keyring: Option<&Keyring>,
    account: &AccountName,
    handoff: &Handoff,
) -> Result<PathBuf, StoreError> {
    let me = rustix::process::geteuid().as_raw();
    let dir_err = |source| StoreError::Dir {
        dir: dir.to_path_buf(),
        source,
    };
    // The same walk as the daemon's: a handoff holds a refresh token.
    let fd = open_dir(dir, false)?;
    let owner = rustix::fs::fstat(&fd)
        .map_err(|e| dir_err(e.into()))?
        .st_uid;
    // The daemon must be able to read (and delete) what is written here.
    if owner != me {
        return Err(StoreError::NotOwner {
            dir: dir.to_path_buf(),
            owner,
            me,
        });
    }
    let path = handoff_path(dir, account);
    let bytes = encode_handoff(account, handoff, keyring);
    write_atomically(dir, &path, bytes, 0o600).map_err(|source| StoreError::Write {
        account: account.clone(),
        path: path.clone(),
        source,
    })?;
    Ok(path)
}

/// `NAME.json.TAG-<unix time>` beside `path`.
fn aside_path(path: &Path, tag: &str) -> PathBuf {
    let stamp = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs();
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(format!(".{tag}-{stamp}"));
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
        if is_temp_file(&name) {
            let _ = fs::remove_file(entry.path());
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use std::os::unix::fs::PermissionsExt;

    use super::super::fixtures::{name, ring, sample};
    use super::*;

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

    #[tokio::test(flavor = "multi_thread", worker_threads = 1)]
    async fn links_inside_the_state_dir_are_refused_not_followed() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("state");
        fs::create_dir(&dir).unwrap();
        let target = tmp.path().join("precious");
        fs::write(&target, b"keep").unwrap();
        std::os::unix::fs::symlink(&target, dir.join(LOCK_FILE)).unwrap();
        let err = FileStore::open(&dir)
            .err()
            .expect("a linked .lock is refused");
        assert!(
            matches!(&err, StoreError::UnsafePath { problem: PathProblem::LinkInside { path }, .. } if *path == lock_path(&dir)),
            "{err}"
        );
        assert!(err.to_string().contains("remove it"), "{err}");
        assert_eq!(fs::read(&target).unwrap(), b"keep", "not truncated");

        // A state file or ledger that is a link: a read error naming it, the target kept.
        fs::remove_file(dir.join(LOCK_FILE)).unwrap();
        std::os::unix::fs::symlink(&target, dir.join(LEDGER_FILE)).unwrap();
        let err = FileStore::open(&dir)
            .err()
            .expect("a linked ledger is refused");
        assert!(err.to_string().contains("is a symbolic link"), "{err}");
        fs::remove_file(dir.join(LEDGER_FILE)).unwrap();
        let store = FileStore::open(&dir).unwrap();
        let a = name("acct");
        std::os::unix::fs::symlink(&target, store.path(&a)).unwrap();
        let err = store.load(&a).await.unwrap_err();
        assert!(matches!(err, StoreError::Read { .. }), "{err}");
        assert!(err.to_string().contains("is a symbolic link"), "{err}");
        assert_eq!(fs::read(&target).unwrap(), b"keep");
    }

    #[test]
    fn stale_temp_files_are_swept_at_open() {
        let tmp = tempfile::tempdir().unwrap();
        fs::write(tmp.path().join(".tokend-abc.tmp"), b"partial").unwrap();
        let _store = FileStore::open(tmp.path()).unwrap();
        assert!(!tmp.path().join(".tokend-abc.tmp").exists());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 1)]
    async fn a_bad_handoff_is_kept_aside_and_a_peek_leaves_a_bad_state_in_place() {
        let tmp = tempfile::tempdir().unwrap();
        let a = name("acct");
        fs::write(state_path(tmp.path(), &a), b"{").unwrap();
        let err = peek_state(tmp.path(), None, &a).unwrap_err();
        assert!(matches!(err, StoreError::Read { .. }), "{err}");
        assert_eq!(fs::read(state_path(tmp.path(), &a)).unwrap(), b"{");

        let store = FileStore::open(tmp.path()).unwrap();
        fs::write(handoff_path(tmp.path(), &a), b"{\"version\": 1}").unwrap();
        assert!(store.has_handoff(&a).await.unwrap());
        let err = store.load_handoff(&a).await.unwrap_err();
        let StoreError::Corrupt { kept_as, .. } = &err else {
            panic!("expected Corrupt, got {err}");
        };
        assert_eq!(fs::read(kept_as).unwrap(), b"{\"version\": 1}");
        assert!(!store.has_handoff(&a).await.unwrap());
        assert_eq!(store.load_handoff(&a).await.unwrap(), None);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 1)]
    async fn a_rename_moves_the_state_and_its_ledger_entries_and_never_overwrites_a_chain() {
        let tmp = tempfile::tempdir().unwrap();
        let (old, new, other) = (name("old"), name("new"), name("other"));
        let keys = Some(ring(1, &[]));
        let store = FileStore::open_sealed(tmp.path(), keys.clone()).unwrap();
        store.save(&old, &sample()).await.unwrap();
        store
            .record_spent(&old, "seed-fp", SpentKind::Seed)
            .await
            .unwrap();
        let err = store.rename(&other, &new).await.unwrap_err();
        assert!(matches!(err, StoreError::NothingToMove { .. }), "{err}");
        assert!(err.to_string().contains("other"), "{err}");

        store.rename(&old, &new).await.unwrap();
        assert_eq!(store.load(&old).await.unwrap(), None);
        assert_eq!(store.load(&new).await.unwrap(), Some(sample()));
        assert_eq!(store.spent("seed-fp").await.unwrap().unwrap().account, new);
        drop(store);
        // Durable: the moved entry is what a reopened store (and a peek) reads.
        let store = FileStore::open_sealed(tmp.path(), keys.clone()).unwrap();
        assert_eq!(store.spent("seed-fp").await.unwrap().unwrap().account, new);
        let rt = sample().refresh_token.unwrap();
        let found = peek_spent(tmp.path(), keys.as_ref(), &rt).unwrap();
        assert_eq!(found, Some(SpentBy::InUse(new.clone())));

        // A second chain is never overwritten by a rename.
        let mut theirs = sample();
        theirs.refresh_token = Some(Secret::new("rt-theirs"));
        store.save(&other, &theirs).await.unwrap();
        let err = store.rename(&other, &new).await.unwrap_err();
        assert!(matches!(err, StoreError::Occupied { .. }), "{err}");
        assert_eq!(store.load(&new).await.unwrap(), Some(sample()));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 1)]
    async fn a_replaced_record_is_kept_aside_until_dropped_and_tokens_spent_are_found() {
        let tmp = tempfile::tempdir().unwrap();
        let a = name("acct");
        let store = FileStore::open(tmp.path()).unwrap();
        assert_eq!(store.set_aside(&a).await.unwrap(), None);
        let mut state = sample();
        state.remember_spent(&Secret::new("rt-0"));
        store.save(&a, &state).await.unwrap();
        let kept = store.set_aside(&a).await.unwrap().unwrap();
        assert!(kept.starts_with("acct.json.replaced-"), "{kept}");
        let mut next = sample();
        next.refresh_token = Some(Secret::new("rt-new"));
        next.spent = state.spent.clone();
        store.save(&a, &next).await.unwrap();
        // The copy is the old record, whole.
        let copy = decode(&fs::read(tmp.path().join(&kept)).unwrap(), &a, None).unwrap();
        assert_eq!(copy, state);
        // Rotated away by the old chain, or the current token: both found spent.
        let found = peek_spent(tmp.path(), None, &Secret::new("rt-0")).unwrap();
        assert_eq!(found, Some(SpentBy::Rotated(a.clone())));
        assert_eq!(
            peek_spent(tmp.path(), None, &Secret::new("rt-x")).unwrap(),
            None
        );
        // Only a copy of this account's is ever dropped.
        store.drop_aside(&a, "../acct.json").await.unwrap();
        store.drop_aside(&name("b"), &kept).await.unwrap();
        assert!(tmp.path().join(&kept).exists());
        store.drop_aside(&a, &kept).await.unwrap();
        assert!(!tmp.path().join(&kept).exists());
        assert_eq!(store.load(&a).await.unwrap(), Some(next));
    }
}
