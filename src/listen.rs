//! Listeners and connections: binds TCP and Unix sockets (a socket file never appears
//! with wider permissions than configured), serves each connection with strict HTTP/1
//! limits (head size, header count, head deadlines) within a connection budget that
//! stays fair under churn, tags every request with its peer, and drains connections
//! gracefully on shutdown. What a request may do is decided in `http`.

use std::collections::HashMap;
use std::convert::Infallible;
use std::fmt;
use std::net::SocketAddr;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulConnection;
use hyper_util::service::TowerToHyperService;
use tokio::net::{TcpListener, TcpSocket, UnixListener};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower::{Service, ServiceExt};
use tracing::{debug, error, warn};

use crate::config::{ListenAddr, ServerConfig};

/// Request line and headers together may not exceed this (hyper's floor is 8 KiB).
pub const MAX_HEAD_BYTES: usize = 16 * 1024;
pub const MAX_HEADERS: usize = 64;
/// A new connection that has not brought its first complete request head by then is
/// cut: a consumer sends its request at once, and a slot held by a silent peer is a slot
/// an honest one cannot have.
pub const FIRST_HEAD_TIMEOUT: Duration = Duration::from_secs(2);
/// After a response, the next request head on the connection must be complete by then
/// (the keep-alive idle time and a slow head together).
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// The most connections held at once by one `serve` call, however high the open-file
/// limit: each may hold a request head of up to `MAX_HEAD_BYTES` in memory.
pub const MAX_CONNECTIONS: usize = 8192;
/// The fewest, however low the open-file limit.
const MIN_CONNECTIONS: usize = 16;
/// Connections the kernel queues until they are accepted (capped by
/// `net.core.somaxconn`). Under churn, the excess waits here rather than having its SYN
/// dropped, which would cost an honest client a one-second retransmit.
pub const LISTEN_BACKLOG: u32 = 4096;
/// Of a Unix listener's budget, one uid may hold at most this fraction (1/N).
const PER_UID_SHARE: usize = 4;
/// How long an evicted connection may take to finish the response it is writing.
const EVICT_GRACE: Duration = Duration::from_secs(1);
/// How long shutdown waits for open connections to finish their requests.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

/// Who is on the other end of a connection; handlers find it in request extensions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Peer {
    Tcp(SocketAddr),
    /// Credentials the kernel reports for a Unix-socket peer (SO_PEERCRED).
    Unix {
        uid: u32,
        gid: u32,
    },
}

/// The port of the TCP listener a request came in on (absent on a Unix socket), beside
/// [`Peer`] in its extensions: a loopback request's `Host` must name it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LocalPort(pub u16);

impl Peer {
    pub fn is_loopback(&self) -> bool {
        match self {
            Peer::Tcp(addr) => addr.ip().is_loopback(),
            Peer::Unix { .. } => true,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ListenError {
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: String,
        source: std::io::Error,
    },
    #[error("cannot listen on {addr}: {reason}")]
    Socket { addr: String, reason: String },
}

/// A bound listener.
pub enum Listener {
    Tcp(TcpListener),
    Unix(UnixListener, PathBuf),
}

impl fmt::Display for Listener {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Listener::Tcp(l) => match l.local_addr() {
                Ok(a) => write!(f, "{a}"),
                Err(_) => f.write_str("tcp:?"),
            },
            Listener::Unix(_, p) => write!(f, "unix:{}", p.display()),
        }
    }
}

impl Listener {
    pub fn local_tcp_addr(&self) -> Option<SocketAddr> {
        match self {
            Listener::Tcp(l) => l.local_addr().ok(),
            Listener::Unix(..) => None,
        }
    }
}

/// Binds every configured address before anything else starts, so a taken port or a
/// bad socket path fails fast.
pub async fn bind_all(server: &ServerConfig) -> Result<Vec<Listener>, ListenError> {
    let mut out = Vec::with_capacity(server.listen.len());
    for addr in &server.listen {
        out.push(match addr {
            ListenAddr::Tcp(a) => bind_tcp(*a).await?,
            ListenAddr::Unix(path) => {
                bind_unix(path, server.socket_mode, server.socket_group.as_deref())?
            }
        });
    }
    Ok(out)
}

pub async fn bind_tcp(addr: SocketAddr) -> Result<Listener, ListenError> {
    let bind = || {
        let socket = if addr.is_ipv4() {
            TcpSocket::new_v4()?
        } else {
            TcpSocket::new_v6()?
        };
        // As `TcpListener::bind` does: a restart may rebind while old connections linger.
        socket.set_reuseaddr(true)?;
        socket.bind(addr)?;
        socket.listen(LISTEN_BACKLOG)
    };
    bind()
        .map(Listener::Tcp)
        .map_err(|source| ListenError::Bind {
            addr: addr.to_string(),
            source,
        })
}

/// Binds the socket inside a fresh directory only this user can enter, gives it its
/// group and mode there, then renames it into place: whatever the umask, nobody can
/// connect to it before it has the configured permissions (a chmod after `bind()` would
/// leave a window).
fn bind_unix(path: &Path, mode: u32, group: Option<&str>) -> Result<Listener, ListenError> {
    let addr = format!("unix:{}", path.display());
    let fail = |reason: String| ListenError::Socket {
        addr: addr.clone(),
        reason,
    };
    // A socket file left by a previous run is replaced (by the rename, so the path never
    // goes missing); anything else is not ours.
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => {}
        Ok(_) => return Err(fail("a file that is not a socket is in the way".into())),
        Err(_) => {}
    }
    let gid = match group {
        Some(group) => {
            Some(resolve_group(group).ok_or_else(|| fail(format!("no group named {group:?}")))?)
        }
        None => None,
    };
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    // 0700 is narrowed by the umask, never widened. A short name, as socket paths are
    // limited to 107 bytes.
    let private = tempfile::Builder::new()
        .prefix(".tokend")
        .permissions(std::fs::Permissions::from_mode(0o700))
        .tempdir_in(parent)
        .map_err(|e| fail(format!("cannot create a private directory beside it: {e}")))?;
    let staged = private.path().join("s");
    let listener = UnixListener::bind(&staged).map_err(|source| ListenError::Bind {
        addr: addr.clone(),
        source,
    })?;
    if let Some(gid) = gid {
        std::os::unix::fs::chown(&staged, None, Some(gid))
            .map_err(|e| fail(format!("cannot give it to group {gid}: {e}")))?;
    }
    std::fs::set_permissions(&staged, std::fs::Permissions::from_mode(mode))
        .map_err(|e| fail(format!("cannot set its mode: {e}")))?;
    std::fs::rename(&staged, path).map_err(|e| fail(format!("cannot move it into place: {e}")))?;
    if let Err(e) = private.close() {
        warn!(socket = %path.display(), error = %e, "cannot remove the private directory the socket was made in");
    }
    Ok(Listener::Unix(listener, path.to_path_buf()))
}

/// A group name (from /etc/group) or a numeric gid.
fn resolve_group(group: &str) -> Option<u32> {
    if let Ok(gid) = group.parse() {
        return Some(gid);
    }
    let text = std::fs::read_to_string("/etc/group").ok()?;
    text.lines().find_map(|line| {
        let mut fields = line.split(':');
        (fields.next()? == group).then_some(())?;
        fields.nth(1)?.parse().ok()
    })
}

/// Per-connection limits and the connection budget; `Limits::default()` holds the
/// documented constants and a budget sized from the open-file limit.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub first_head_timeout: Duration,
    pub header_read_timeout: Duration,
    /// Connections held at once by one `serve` call, split evenly between its listeners
    /// (so that a flood of one cannot take the others' share).
    pub max_connections: usize,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            first_head_timeout: FIRST_HEAD_TIMEOUT,
            header_read_timeout: HEADER_READ_TIMEOUT,
            max_connections: connection_budget(),
        }
    }
}

/// The budget for this process's open-file limit (`RLIMIT_NOFILE`, soft).
pub fn connection_budget() -> usize {
    let limit = rustix::process::getrlimit(rustix::process::Resource::Nofile);
    budget_for(limit.current.unwrap_or(u64::MAX))
}

/// What is left of `nofile` descriptors after headroom for the daemon's own files (state,
/// lock, token files, hooks' pipes) and its connections to providers, within
/// `MIN_CONNECTIONS..=MAX_CONNECTIONS`.
pub fn budget_for(nofile: u64) -> usize {
    let headroom = (nofile / 8).clamp(64, 1024);
    let left = usize::try_from(nofile.saturating_sub(headroom)).unwrap_or(usize::MAX);
    left.clamp(MIN_CONNECTIONS, MAX_CONNECTIONS)
}

/// What the listeners serve: an axum `Router`, or the daemon's `http::Api`.
pub trait Serve:
    Service<
        http::Request<hyper::body::Incoming>,
        Response = axum::response::Response,
        Error = Infallible,
        Future: Send,
    > + Clone
    + Send
    + Sync
    + 'static
{
}

impl<S> Serve for S where
    S: Service<
            http::Request<hyper::body::Incoming>,
            Response = axum::response::Response,
            Error = Infallible,
            Future: Send,
        > + Clone
        + Send
        + Sync
        + 'static
{
}

/// Serves `router` on every listener until `cancel`, then drains open connections.
pub fn serve(
    listeners: Vec<Listener>,
    router: impl Serve,
    tracker: &TaskTracker,
    cancel: &CancellationToken,
    limits: Limits,
) {
    let share = (limits.max_connections / listeners.len().max(1)).max(1);
    for listener in listeners {
        let router = router.clone();
        let cancel = cancel.clone();
        let connections = tracker.clone();
        let pool = Pool::new(share);
        tracker.spawn(async move {
            let name = listener.to_string();
            accept_loop(listener, router, connections, cancel, limits, pool).await;
            debug!(listener = %name, "listener closed");
        });
    }
}

async fn accept_loop(
    listener: Listener,
    router: impl Serve,
    tracker: TaskTracker,
    cancel: CancellationToken,
    limits: Limits,
    pool: Arc<Pool>,
) {
    let unix_path = match &listener {
        Listener::Unix(_, p) => Some(p.clone()),
        Listener::Tcp(_) => None,
    };
    let local_port = listener.local_tcp_addr().map(|a| LocalPort(a.port()));
    loop {
        // At the budget, the oldest idle connections make way: new work is taken in
        // rather than left in the backlog behind peers that hold a slot and say nothing.
        tokio::select! {
            _ = cancel.cancelled() => break,
            () = pool.room() => {}
        }
        let accepted = tokio::select! {
            _ = cancel.cancelled() => break,
            accepted = accept(&listener) => accepted,
        };
        let (io, peer) = match accepted {
            Ok(pair) => pair,
            Err(e) => {
                // EMFILE and the like: back off briefly instead of spinning.
                warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let uid = match peer {
            Peer::Unix { uid, .. } => Some(uid),
            Peer::Tcp(_) => None,
        };
        let Some(slot) = pool.admit(uid) else {
            debug!(
                ?uid,
                "connection refused: this uid holds its share, all of it busy"
            );
            continue;
        };
        let service = {
            let slot = slot.clone();
            let router = router.clone();
            tower::service_fn(move |mut request: http::Request<hyper::body::Incoming>| {
                request.extensions_mut().insert(peer);
                if let Some(port) = local_port {
                    request.extensions_mut().insert(port);
                }
                let busy = slot.busy();
                let router = router.clone();
                async move {
                    let response = router.oneshot(request).await;
                    drop(busy);
                    response
                }
            })
        };
        let connection = hyper::server::conn::http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(limits.header_read_timeout)
            .max_buf_size(MAX_HEAD_BYTES)
            .max_headers(MAX_HEADERS)
            .serve_connection(io, TowerToHyperService::new(service));
        tracker.spawn(drive(
            connection,
            slot,
            limits.first_head_timeout,
            cancel.clone(),
        ));
    }
    if tokio::time::timeout(DRAIN_TIMEOUT, pool.drained())
        .await
        .is_err()
    {
        warn!("connections still open after {DRAIN_TIMEOUT:?}; closing them");
    }
    if let Some(path) = unix_path
        && let Err(e) = std::fs::remove_file(&path)
    {
        error!(socket = %path.display(), error = %e, "cannot remove the socket file");
    }
}

/// Runs one connection until it ends, is evicted, misses its first head, or shutdown
/// comes. A connection that never had a request is owed nothing and is closed at once;
/// one that had gets a graceful close, so that a response being written is finished.
async fn drive<C>(conn: C, slot: Arc<Slot>, first_head: Duration, cancel: CancellationToken)
where
    C: GracefulConnection,
    C::Error: fmt::Display,
{
    let mut conn = std::pin::pin!(conn);
    let head_due = tokio::time::sleep(first_head);
    let mut head_due = std::pin::pin!(head_due);
    let mut awaiting_head = true;
    let grace = loop {
        tokio::select! {
            result = conn.as_mut() => {
                if let Err(e) = result {
                    debug!(error = %e, "connection ended with an error");
                }
                return;
            }
            () = &mut head_due, if awaiting_head => {
                if !slot.had_request() {
                    debug!("no request head within {first_head:?}; closing the connection");
                    return;
                }
                awaiting_head = false;
            }
            () = slot.evict.cancelled() => break EVICT_GRACE,
            () = cancel.cancelled() => break DRAIN_TIMEOUT,
        }
    };
    if !slot.had_request() {
        return;
    }
    conn.as_mut().graceful_shutdown();
    if let Ok(Err(e)) = tokio::time::timeout(grace, conn).await {
        debug!(error = %e, "connection ended with an error");
    }
}

/// The connection slots of one listener: how many are held, which are idle (no request
/// in the service) and since when, and how many each Unix uid holds.
struct Pool {
    budget: usize,
    per_uid: usize,
    /// What each slot's idle time counts from.
    epoch: Instant,
    state: Mutex<PoolState>,
    /// A slot was given back (the accept loop is the one waiter).
    freed: Notify,
}

#[derive(Default)]
struct PoolState {
    next_id: u64,
    conns: HashMap<u64, Entry>,
    /// Evicted, not yet closed.
    evicting: usize,
    per_uid: HashMap<u32, usize>,
}

struct Entry {
    uid: Option<u32>,
    /// Shared with the slot, which marks it busy and idle without the pool's lock.
    idle: Arc<Idle>,
    evict: CancellationToken,
    evicting: bool,
}

/// Whether a connection has a request in the service, and if not since when. A request
/// marks it with two atomic writes: the pool's lock, its map and an ordered idle set were
/// the token read's largest cost after HTTP itself. Eviction, which happens only at the
/// connection budget, scans the slots instead.
struct Idle(AtomicU64);

impl Idle {
    const BUSY: u64 = 0;
    const EVICTED: u64 = u64::MAX;

    /// Idle since `at` (nanoseconds after the pool's epoch).
    fn since(at: u64) -> Idle {
        Idle(AtomicU64::new(Self::stamp(at)))
    }

    /// How `at` is stored: plus one, so that it is never BUSY (nor EVICTED).
    fn stamp(at: u64) -> u64 {
        at.saturating_add(1).min(Self::EVICTED - 1)
    }

    /// Sets `to` unless the connection was evicted, which is final.
    fn set(&self, to: u64) {
        let _ = self
            .0
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |now| {
                (now != Self::EVICTED).then_some(to)
            });
    }

    /// Idle since this many nanoseconds after the epoch (plus one); `None` when busy or
    /// evicted.
    fn idle_since(&self) -> Option<u64> {
        match self.0.load(Ordering::Acquire) {
            Self::BUSY | Self::EVICTED => None,
            since => Some(since),
        }
    }

    /// Evicts the connection if it is still idle since `since`: false if a request came
    /// in meanwhile.
    fn evict(&self, since: u64) -> bool {
        self.0
            .compare_exchange(since, Self::EVICTED, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
    }
}

impl Pool {
    fn new(budget: usize) -> Arc<Pool> {
        Arc::new(Pool {
            budget,
            per_uid: (budget / PER_UID_SHARE).max(1),
            epoch: Instant::now(),
            state: Mutex::new(PoolState::default()),
            freed: Notify::new(),
        })
    }

    fn lock(&self) -> MutexGuard<'_, PoolState> {
        // Every critical section leaves the state consistent; a panic cannot tear it.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Nanoseconds since the pool's epoch.
    fn now(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }

    /// Returns once a connection may be accepted; while at the budget, evicts the oldest
    /// idle connections (a batch, so that accepting under churn is not one scheduler round
    /// trip per connection) and waits for a slot to be given back.
    async fn room(&self) {
        let batch = (self.budget / 16).max(1);
        loop {
            {
                let mut state = self.lock();
                if state.conns.len() < self.budget {
                    return;
                }
                let wanted = batch.saturating_sub(state.evicting);
                state.evict_oldest(wanted, None);
            }
            // `notify_one` keeps a permit when nobody waits, so no wakeup is lost.
            self.freed.notified().await;
        }
    }

    /// Registers an accepted connection; `None` when its uid holds its share and none of
    /// that share is idle.
    fn admit(self: &Arc<Self>, uid: Option<u32>) -> Option<Arc<Slot>> {
        let mut state = self.lock();
        if let Some(uid) = uid
            && state.per_uid.get(&uid).copied().unwrap_or(0) >= self.per_uid
            && state.evict_oldest(1, Some(uid)) == 0
        {
            return None;
        }
        let id = state.next_id;
        state.next_id += 1;
        let idle = Arc::new(Idle::since(self.now()));
        let evict = CancellationToken::new();
        state.conns.insert(
            id,
            Entry {
                uid,
                idle: idle.clone(),
                evict: evict.clone(),
                evicting: false,
            },
        );
        if let Some(uid) = uid {
            *state.per_uid.entry(uid).or_default() += 1;
        }
        Some(Arc::new(Slot {
            pool: self.clone(),
            id,
            idle,
            evict,
            requests: AtomicU64::new(0),
        }))
    }

    async fn drained(&self) {
        while !self.lock().conns.is_empty() {
            self.freed.notified().await;
        }
    }
}

impl PoolState {
    /// Evicts up to `count` of the longest idle connections (of `uid`, if given); returns
    /// how many it evicted.
    fn evict_oldest(&mut self, count: usize, uid: Option<u32>) -> usize {
        if count == 0 {
            return 0;
        }
        let mut idle: Vec<(u64, u64)> = self
            .conns
            .iter()
            .filter(|(_, e)| uid.is_none() || e.uid == uid)
            .filter_map(|(id, e)| Some((e.idle.idle_since()?, *id)))
            .collect();
        idle.sort_unstable();
        let mut evicted = 0;
        for (since, id) in idle {
            if evicted == count {
                break;
            }
            if let Some(entry) = self.conns.get_mut(&id)
                && entry.idle.evict(since)
            {
                entry.evicting = true;
                entry.evict.cancel();
                self.evicting += 1;
                evicted += 1;
            }
        }
        evicted
    }
}

/// One connection's place in its pool, shared by its task and its service; given back
/// when both are gone.
struct Slot {
    pool: Arc<Pool>,
    id: u64,
    idle: Arc<Idle>,
    evict: CancellationToken,
    requests: AtomicU64,
}

impl Slot {
    fn had_request(&self) -> bool {
        self.requests.load(Ordering::Acquire) > 0
    }

    /// Marks the connection busy (not evictable) until the guard is dropped.
    fn busy(self: &Arc<Self>) -> Busy {
        self.requests.fetch_add(1, Ordering::AcqRel);
        self.idle.set(Idle::BUSY);
        Busy(self.clone())
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut state = self.pool.lock();
        if let Some(entry) = state.conns.remove(&self.id) {
            if entry.evicting {
                state.evicting -= 1;
            }
            if let Some(uid) = entry.uid
                && let Some(n) = state.per_uid.get_mut(&uid)
            {
                *n -= 1;
                if *n == 0 {
                    state.per_uid.remove(&uid);
                }
            }
        }
        drop(state);
        self.pool.freed.notify_one();
    }
}

/// A request in the service; the connection is idle again when it is dropped.
struct Busy(Arc<Slot>);

impl Drop for Busy {
    fn drop(&mut self) {
        let slot = &self.0;
        slot.idle.set(Idle::stamp(slot.pool.now()));
    }
}

enum Io {
    Tcp(TokioIo<tokio::net::TcpStream>),
    Unix(TokioIo<tokio::net::UnixStream>),
}

async fn accept(listener: &Listener) -> std::io::Result<(Io, Peer)> {
    match listener {
        Listener::Tcp(l) => {
            let (stream, addr) = l.accept().await?;
            let _ = stream.set_nodelay(true);
            Ok((Io::Tcp(TokioIo::new(stream)), Peer::Tcp(addr)))
        }
        Listener::Unix(l, _) => {
            let (stream, _) = l.accept().await?;
            let cred = stream.peer_cred()?;
            let peer = Peer::Unix {
                uid: cred.uid(),
                gid: cred.gid(),
            };
            Ok((Io::Unix(TokioIo::new(stream)), peer))
        }
    }
}

// hyper wants one I/O type per connection builder call; this enum forwards to either.
impl hyper::rt::Read for Io {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        match self.get_mut() {
            Io::Tcp(io) => std::pin::Pin::new(io).poll_read(cx, buf),
            Io::Unix(io) => std::pin::Pin::new(io).poll_read(cx, buf),
        }
    }
}

impl hyper::rt::Write for Io {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Io::Tcp(io) => std::pin::Pin::new(io).poll_write(cx, buf),
            Io::Unix(io) => std::pin::Pin::new(io).poll_write(cx, buf),
        }
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        match self.get_mut() {
            Io::Tcp(io) => std::pin::Pin::new(io).poll_flush(cx),
            Io::Unix(io) => std::pin::Pin::new(io).poll_flush(cx),
        }
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        match self.get_mut() {
            Io::Tcp(io) => std::pin::Pin::new(io).poll_shutdown(cx),
            Io::Unix(io) => std::pin::Pin::new(io).poll_shutdown(cx),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicBool;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[test]
    fn the_budget_leaves_headroom_below_the_open_file_limit() {
        assert_eq!(budget_for(1024), 1024 - 128);
        assert_eq!(budget_for(65536), MAX_CONNECTIONS);
        assert_eq!(budget_for(256), 256 - 64);
        assert_eq!(budget_for(10), MIN_CONNECTIONS);
        assert_eq!(budget_for(u64::MAX), MAX_CONNECTIONS);
    }

    /// Binds `path` over and over while another thread stats it as fast as it can: no
    /// mode it ever shows may have a bit the configured 0600 lacks. (Under the usual
    /// umasks a bind-then-chmod shows 0755 or 0775 in between.)
    #[tokio::test]
    async fn a_unix_socket_never_shows_wider_permissions_than_configured() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokend.sock");
        let stop = Arc::new(AtomicBool::new(false));
        let watcher = {
            let (path, stop) = (path.clone(), stop.clone());
            std::thread::spawn(move || {
                let (mut seen, mut wider) = (0u32, std::collections::BTreeSet::new());
                while !stop.load(Ordering::Relaxed) {
                    if let Ok(meta) = std::fs::symlink_metadata(&path) {
                        seen += 1;
                        let mode = meta.permissions().mode() & 0o777;
                        if mode & !0o600 != 0 {
                            wider.insert(format!("{mode:o}"));
                        }
                    }
                }
                (seen, wider)
            })
        };
        for _ in 0..1000 {
            let listener = bind_unix(&path, 0o600, None).unwrap();
            drop(listener);
        }
        stop.store(true, Ordering::Relaxed);
        let (seen, wider) = watcher.join().unwrap();
        assert!(seen > 0, "the watcher never saw the socket");
        assert!(wider.is_empty(), "modes seen: {wider:?}");
        let left: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(left.len(), 1, "only the socket is left: {left:?}");
    }

    #[tokio::test]
    async fn a_file_in_the_socket_path_is_not_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokend.sock");
        std::fs::write(&path, "mine").unwrap();
        let err = bind_unix(&path, 0o660, None).err().unwrap();
        assert!(err.to_string().contains("not a socket"), "{err}");
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "mine");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    /// A listener with a budget of `budget` serving `/` with 200.
    async fn serve_small(budget: usize) -> (SocketAddr, CancellationToken, TaskTracker) {
        let listener = bind_tcp("127.0.0.1:0".parse().unwrap()).await.unwrap();
        let addr = listener.local_tcp_addr().unwrap();
        let router = axum::Router::new().fallback(|| async { "ok" });
        let (tracker, cancel) = (TaskTracker::new(), CancellationToken::new());
        let limits = Limits {
            max_connections: budget,
            ..Limits::default()
        };
        serve(vec![listener], router, &tracker, &cancel, limits);
        (addr, cancel, tracker)
    }

    async fn get(addr: SocketAddr) -> String {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(b"GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        out
    }

    /// Whether the server has closed `s` (EOF or reset) within `wait`.
    async fn closed_within(s: &mut tokio::net::TcpStream, wait: Duration) -> bool {
        let mut buf = [0u8; 64];
        matches!(
            tokio::time::timeout(wait, s.read(&mut buf)).await,
            Ok(Ok(0) | Err(_))
        )
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn at_the_budget_the_oldest_idle_connection_makes_way() {
        let (addr, cancel, tracker) = serve_small(4).await;
        let mut silent = Vec::new();
        for _ in 0..4 {
            silent.push(tokio::net::TcpStream::connect(addr).await.unwrap());
            // Accepted in this order: the first is the oldest.
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let started = Instant::now();
        assert!(get(addr).await.starts_with("HTTP/1.1 200"));
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "served at once, not after the silent peers' head deadline"
        );
        assert!(closed_within(&mut silent[0], Duration::from_secs(1)).await);
        assert!(
            !closed_within(&mut silent[3], Duration::from_millis(100)).await,
            "only as many as needed make way"
        );
        cancel.cancel();
        tracker.close();
        tracker.wait().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_connection_without_a_request_head_is_cut_after_the_first_head_timeout() {
        let (addr, cancel, tracker) = serve_small(64).await;
        let mut silent = tokio::net::TcpStream::connect(addr).await.unwrap();
        let mut partial = tokio::net::TcpStream::connect(addr).await.unwrap();
        partial
            .write_all(b"GET / HTTP/1.1\r\nHost: loc")
            .await
            .unwrap();
        let mut kept = tokio::net::TcpStream::connect(addr).await.unwrap();
        kept.write_all(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
            .await
            .unwrap();
        let mut answer = Vec::new();
        while !answer.ends_with(b"\r\n\r\nok") {
            let mut buf = [0u8; 256];
            let n = kept.read(&mut buf).await.unwrap();
            assert!(n > 0, "closed after {answer:?}");
            answer.extend_from_slice(&buf[..n]);
        }
        assert!(answer.starts_with(b"HTTP/1.1 200"));
        let started = Instant::now();
        let window = FIRST_HEAD_TIMEOUT + Duration::from_secs(1);
        assert!(closed_within(&mut silent, window).await);
        assert!(closed_within(&mut partial, window).await);
        assert!(started.elapsed() < window);
        // A keep-alive connection that has had its request waits the longer idle time.
        let mut rest = vec![0u8; 256];
        let idle = tokio::time::timeout(Duration::from_millis(500), kept.read(&mut rest)).await;
        assert!(idle.is_err(), "still open: {idle:?}");
        cancel.cancel();
        tracker.close();
        tracker.wait().await;
    }
}
