//! Listeners and connections: binds TCP and Unix sockets, serves each connection with
//! strict HTTP/1 limits (head size, header count, header read timeout for slow clients,
//! a cap on concurrent connections), tags every request with its peer, and drains
//! connections gracefully on shutdown. What a request may do is decided in `http`.

use std::fmt;
use std::net::SocketAddr;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower::ServiceExt;
use tracing::{debug, error, warn};

use crate::config::{ListenAddr, ServerConfig};

/// Request line and headers together may not exceed this (hyper's floor is 8 KiB).
pub const MAX_HEAD_BYTES: usize = 16 * 1024;
pub const MAX_HEADERS: usize = 64;
/// A client that has not sent its complete request head by then is dropped.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Connections served at once, per listener; more wait in the kernel's backlog.
pub const MAX_CONNECTIONS: usize = 1024;
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
    TcpListener::bind(addr)
        .await
        .map(Listener::Tcp)
        .map_err(|source| ListenError::Bind {
            addr: addr.to_string(),
            source,
        })
}

fn bind_unix(path: &Path, mode: u32, group: Option<&str>) -> Result<Listener, ListenError> {
    let addr = format!("unix:{}", path.display());
    let fail = |reason: String| ListenError::Socket {
        addr: addr.clone(),
        reason,
    };
    // A socket file left by a previous run is replaced; anything else is not ours.
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => {
            std::fs::remove_file(path)
                .map_err(|e| fail(format!("cannot remove the old socket: {e}")))?;
        }
        Ok(_) => return Err(fail("a file that is not a socket is in the way".into())),
        Err(_) => {}
    }
    let listener = UnixListener::bind(path).map_err(|source| ListenError::Bind {
        addr: addr.clone(),
        source,
    })?;
    if let Some(group) = group {
        let gid = resolve_group(group).ok_or_else(|| fail(format!("no group named {group:?}")))?;
        std::os::unix::fs::chown(path, None, Some(gid))
            .map_err(|e| fail(format!("cannot give it to group {group}: {e}")))?;
    }
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .map_err(|e| fail(format!("cannot set its mode: {e}")))?;
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

/// Per-connection limits; `Limits::default()` holds the documented constants.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub header_read_timeout: Duration,
    pub max_connections: usize,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            header_read_timeout: HEADER_READ_TIMEOUT,
            max_connections: MAX_CONNECTIONS,
        }
    }
}

/// Serves `router` on every listener until `cancel`, then drains open connections.
pub fn serve(
    listeners: Vec<Listener>,
    router: Router,
    tracker: &TaskTracker,
    cancel: &CancellationToken,
    limits: Limits,
) {
    for listener in listeners {
        let router = router.clone();
        let cancel = cancel.clone();
        let connections = tracker.clone();
        tracker.spawn(async move {
            let name = listener.to_string();
            accept_loop(listener, router, connections, cancel, limits).await;
            debug!(listener = %name, "listener closed");
        });
    }
}

async fn accept_loop(
    listener: Listener,
    router: Router,
    tracker: TaskTracker,
    cancel: CancellationToken,
    limits: Limits,
) {
    let limit = Arc::new(Semaphore::new(limits.max_connections));
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let unix_path = match &listener {
        Listener::Unix(_, p) => Some(p.clone()),
        Listener::Tcp(_) => None,
    };
    loop {
        let permit = tokio::select! {
            _ = cancel.cancelled() => break,
            permit = limit.clone().acquire_owned() => permit.expect("semaphore never closed"),
        };
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
        let service =
            router
                .clone()
                .map_request(move |mut request: http::Request<hyper::body::Incoming>| {
                    request.extensions_mut().insert(peer);
                    request
                });
        let connection = hyper::server::conn::http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(limits.header_read_timeout)
            .max_buf_size(MAX_HEAD_BYTES)
            .max_headers(MAX_HEADERS)
            .serve_connection(io, TowerToHyperService::new(service));
        let connection = graceful.watch(connection);
        tracker.spawn(async move {
            if let Err(e) = connection.await {
                debug!(error = %e, "connection ended with an error");
            }
            drop(permit);
        });
    }
    if tokio::time::timeout(DRAIN_TIMEOUT, graceful.shutdown())
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
