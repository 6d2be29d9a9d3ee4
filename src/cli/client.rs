//! The client side of the daemon's API for the client commands: one blocking HTTP/1.1
//! request per connection, over TCP or a Unix socket, with no async runtime. The commands
//! are in `remote`, the answer reader in `http1`, the API in `http`.

use std::io::{self, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::Value;
use zeroize::Zeroizing;

use super::exit;
use super::http1::{ReadError, read_response};
use crate::http::REQUEST_HEADER;
use crate::secret::Secret;

// Kept at their old paths: `ClientError` names both.
pub use super::http1::{CutOff, MAX_BODY};

/// How long a client command waits for the daemon, from connecting to the last byte.
pub const CLIENT_TIMEOUT: Duration = Duration::from_secs(60);

/// Why a client command failed. Nothing here holds the consumer key: it is only ever in a
/// [`Secret`].
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot read the key file {}: {source}", path.display())]
    KeyFile {
        path: PathBuf,
        source: std::io::Error,
    },
    /// `what` names where the key came from: `the key file PATH`, or a consumer's key in
    /// a config.
    #[error("{what} holds characters that cannot be sent in an HTTP header")]
    KeyNotSendable { what: String },
    #[error("invalid endpoint {endpoint}: {reason}")]
    Endpoint {
        endpoint: String,
        reason: &'static str,
    },
    /// `endpoint` is the address tried, with where it came from when that is known
    /// (`http://127.0.0.1:8731 (the default)`).
    #[error("cannot reach the daemon at {endpoint}: {source}")]
    Unreachable {
        endpoint: String,
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("cannot reach the daemon at {endpoint}: no answer within {}", seconds(*.after))]
    Timeout { endpoint: String, after: Duration },
    #[error("the daemon's answer was cut off: {0}")]
    CutOff(CutOff),
    /// Whatever answered is not speaking HTTP/1.1 as the daemon does (a wrong port, say).
    #[error("the answer from {endpoint} is not valid HTTP: {problem}")]
    Malformed { endpoint: String, problem: String },
    #[error("the answer from {endpoint} is larger than {} MiB", MAX_BODY >> 20)]
    TooLarge { endpoint: String },
    /// A non-2xx answer; `detail` is its `error_description`, else the body.
    #[error("HTTP {status}: {detail}")]
    Refused { status: u16, detail: String },
}

/// The exit code of a refusal with this HTTP status: 503 is "not now", 401/403 "not
/// you", anything else a plain failure.
pub fn refused_exit_code(status: u16) -> u8 {
    match status {
        503 => exit::TEMPFAIL,
        401 | 403 => exit::NOPERM,
        _ => exit::FAILURE,
    }
}

impl ClientError {
    pub fn exit_code(&self) -> u8 {
        match self {
            ClientError::KeyFile { .. } | ClientError::KeyNotSendable { .. } => exit::FAILURE,
            ClientError::Refused { status, .. } => refused_exit_code(*status),
            ClientError::Endpoint { .. } => exit::USAGE,
            ClientError::Unreachable { .. }
            | ClientError::Timeout { .. }
            | ClientError::CutOff(_)
            | ClientError::Malformed { .. }
            | ClientError::TooLarge { .. } => exit::UNAVAILABLE,
        }
    }
}

/// `60s`, or `250ms` below a second (the tests' short timeouts).
fn seconds(d: Duration) -> String {
    if d.subsec_nanos() == 0 {
        format!("{}s", d.as_secs())
    } else {
        format!("{}ms", d.as_millis())
    }
}

/// Where the daemon's socket is.
#[derive(Debug)]
pub enum Connect {
    Tcp(url::Host, u16),
    Unix(PathBuf),
}

/// The client side of the API: one plain HTTP/1.1 request per call (`Connection: close`),
/// with the guard header and the consumer key. The daemon never serves TLS, so there is
/// no TLS client here, and the exchange is blocking: a command makes one request, so an
/// async runtime would only add start-up time.
#[derive(Debug)]
pub struct DaemonClient {
    /// The endpoint as the user gave it, and where it came from, for messages.
    shown: String,
    /// Requests are made relative to this; for a Unix socket `http://localhost/`.
    base: url::Url,
    connect: Connect,
    /// `Bearer KEY`; checked to be sendable in a header.
    authorization: Option<Secret>,
    /// The whole exchange, from connecting to the last byte, ends within this.
    timeout: Duration,
}

impl DaemonClient {
    /// A client of the daemon at `endpoint` (`http://HOST[:PORT][/PREFIX]` or
    /// `unix:/PATH`), sending the key in `key_file` if one is named.
    pub fn new(endpoint: &str, key_file: Option<&Path>) -> Result<DaemonClient, ClientError> {
        let (base, connect) = parse_endpoint(endpoint)?;
        let authorization = key_file.map(bearer).transpose()?;
        Ok(DaemonClient {
            shown: endpoint.trim_end_matches('/').to_string(),
            base,
            connect,
            authorization,
            timeout: CLIENT_TIMEOUT,
        })
    }

    /// The same client with another overall timeout.
    pub fn with_timeout(self, timeout: Duration) -> DaemonClient {
        DaemonClient { timeout, ..self }
    }

    /// The same client, naming where its endpoint came from in every message that the
    /// daemon cannot be reached: `from --endpoint`, `from the config PATH`, `the default`.
    pub fn with_origin(self, origin: &str) -> DaemonClient {
        let shown = format!("{} ({origin})", self.shown);
        DaemonClient { shown, ..self }
    }

    /// The same client, sending `key` (a consumer's key, from `what`) instead of any
    /// key file's.
    pub fn with_key(self, key: &str, what: &str) -> Result<DaemonClient, ClientError> {
        let authorization = Some(bearer_value(key, || what.to_string())?);
        Ok(DaemonClient {
            authorization,
            ..self
        })
    }

    /// The URL of `segments` (each percent-encoded as one path segment) under the base.
    pub fn url(&self, segments: &[&str], query: &[(&str, &str)]) -> url::Url {
        let mut url = self.base.clone();
        url.path_segments_mut()
            .expect("an http URL has a path")
            .pop_if_empty()
            .extend(segments);
        if !query.is_empty() {
            url.query_pairs_mut().extend_pairs(query);
        }
        url
    }

    /// Sends the request; returns the status and body, or why the daemon could not be
    /// asked. Connecting, sending and reading together end within the timeout.
    pub fn call(&self, method: http::Method, url: &url::Url) -> Result<(u16, String), ClientError> {
        let deadline = Instant::now() + self.timeout;
        let request = self.request(&method, url);
        let result = match &self.connect {
            Connect::Tcp(host, port) => self
                .connect_tcp(host, *port, deadline)
                .and_then(|s| self.exchange(Deadlined::new(s, deadline), &request)),
            Connect::Unix(path) => connect_unix(path, deadline)
                .map_err(|e| self.transport(e))
                .and_then(|s| self.exchange(Deadlined::new(s, deadline), &request)),
        };
        let (status, body) = result?;
        Ok((status, String::from_utf8_lossy(&body).into_owned()))
    }

    /// Like `call`, but a non-2xx answer is an error carrying its `error_description`.
    pub fn call_ok(&self, method: http::Method, url: &url::Url) -> Result<String, ClientError> {
        let (status, body) = self.call(method, url)?;
        if (200..300).contains(&status) {
            return Ok(body);
        }
        let detail = serde_json::from_str::<Value>(&body)
            .ok()
            .and_then(|v| v.get("error_description")?.as_str().map(str::to_string))
            .unwrap_or(body);
        Err(ClientError::Refused { status, detail })
    }

    /// The whole request, head only (no request here has a body). It holds the key, so
    /// it is wiped when dropped.
    fn request(&self, method: &http::Method, url: &url::Url) -> Zeroizing<Vec<u8>> {
        let mut out = Zeroizing::new(Vec::with_capacity(256));
        let target = &url[url::Position::BeforePath..];
        let host = &url[url::Position::BeforeHost..url::Position::AfterPort];
        // Writing to a Vec cannot fail.
        let _ = write!(
            out,
            "{method} {target} HTTP/1.1\r\nhost: {host}\r\n{REQUEST_HEADER}: cli\r\nconnection: close\r\n"
        );
        if method != http::Method::GET {
            // A POST without a body says so (RFC 9110 §8.6).
            out.extend_from_slice(b"content-length: 0\r\n");
        }
        if let Some(key) = &self.authorization {
            out.extend_from_slice(b"authorization: ");
            out.extend_from_slice(key.expose().as_bytes());
            out.extend_from_slice(b"\r\n");
        }
        out.extend_from_slice(b"\r\n");
        out
    }

    /// Each resolved address in turn, as the old async client did; the last failure is
    /// reported.
    fn connect_tcp(
        &self,
        host: &url::Host,
        port: u16,
        deadline: Instant,
    ) -> Result<TcpStream, ClientError> {
        let addrs: Vec<SocketAddr> = match host {
            url::Host::Ipv4(ip) => vec![(*ip, port).into()],
            url::Host::Ipv6(ip) => vec![(*ip, port).into()],
            // Name resolution is not bounded by the deadline (std has no way to); the
            // default endpoint and the configs' listen addresses are IP literals.
            url::Host::Domain(name) => (name.as_str(), port)
                .to_socket_addrs()
                .map_err(|e| self.transport(e))?
                .collect(),
        };
        let mut last = io::Error::new(io::ErrorKind::NotFound, "the name resolves to no address");
        for addr in addrs {
            match connect_tcp(addr, deadline) {
                Ok(stream) => return Ok(stream),
                Err(e) if is_timeout(&e) => return Err(self.transport(e)),
                Err(e) => last = e,
            }
        }
        Err(self.transport(last))
    }

    /// Sends the request and reads the answer.
    fn exchange<S: Read + Write>(
        &self,
        mut stream: S,
        request: &[u8],
    ) -> Result<(u16, Vec<u8>), ClientError> {
        stream
            .write_all(request)
            .and_then(|()| stream.flush())
            .map_err(|e| self.transport(e))?;
        let mut reader = BufReader::with_capacity(8 << 10, stream);
        read_response(&mut reader).map_err(|e| self.answer_error(e))
    }

    /// A failure to connect or to send: a timeout, or the daemon cannot be reached.
    fn transport(&self, e: io::Error) -> ClientError {
        if is_timeout(&e) {
            return ClientError::Timeout {
                endpoint: self.shown.clone(),
                after: self.timeout,
            };
        }
        ClientError::Unreachable {
            endpoint: self.shown.clone(),
            source: e.into(),
        }
    }

    fn answer_error(&self, e: ReadError) -> ClientError {
        let endpoint = self.shown.clone();
        match e {
            ReadError::Io(e) | ReadError::CutOff(CutOff::Io(e)) if is_timeout(&e) => {
                self.transport(e)
            }
            ReadError::Io(e) => self.transport(e),
            ReadError::Closed(what) => ClientError::Unreachable {
                endpoint,
                source: what.into(),
            },
            ReadError::Malformed(problem) => ClientError::Malformed { endpoint, problem },
            ReadError::TooLarge => ClientError::TooLarge { endpoint },
            ReadError::CutOff(c) => ClientError::CutOff(c),
        }
    }
}

/// Whether an I/O error means a socket timeout ran out: `SO_RCVTIMEO`/`SO_SNDTIMEO` give
/// `EAGAIN`, a TCP connect cut short by `SO_SNDTIMEO` gives `EINPROGRESS`, and
/// [`Deadlined`] gives `TimedOut` once the deadline has passed.
fn is_timeout(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    ) || e.raw_os_error() == Some(rustix::io::Errno::INPROGRESS.raw_os_error())
}

/// What is left until `deadline`, or a `TimedOut` error once it has passed.
fn left(deadline: Instant) -> io::Result<Duration> {
    let left = deadline.saturating_duration_since(Instant::now());
    if left.is_zero() {
        return Err(io::ErrorKind::TimedOut.into());
    }
    Ok(left)
}

/// A blocking socket whose `connect` waits at most until `deadline`: Linux bounds a
/// blocking `connect` by `SO_SNDTIMEO`, for TCP and for Unix sockets alike (std's
/// `UnixStream::connect` has no timeout, and blocks while the listener's backlog is full).
fn connect_socket(
    family: rustix::net::AddressFamily,
    addr: &impl rustix::net::addr::SocketAddrArg,
    deadline: Instant,
) -> io::Result<OwnedFd> {
    use rustix::net::{SocketFlags, SocketType, sockopt};
    let fd = rustix::net::socket_with(family, SocketType::STREAM, SocketFlags::CLOEXEC, None)?;
    sockopt::set_socket_timeout(&fd, sockopt::Timeout::Send, Some(left(deadline)?))?;
    rustix::net::connect(&fd, addr)?;
    Ok(fd)
}

fn connect_tcp(addr: SocketAddr, deadline: Instant) -> io::Result<TcpStream> {
    let family = match addr {
        SocketAddr::V4(_) => rustix::net::AddressFamily::INET,
        SocketAddr::V6(_) => rustix::net::AddressFamily::INET6,
    };
    // No TCP_NODELAY: the request is one write on a fresh connection, which Nagle's
    // algorithm never holds back (it waits only while earlier data is unacknowledged).
    Ok(TcpStream::from(connect_socket(family, &addr, deadline)?))
}

fn connect_unix(path: &Path, deadline: Instant) -> io::Result<UnixStream> {
    let addr = rustix::net::SocketAddrUnix::new(path)?;
    let fd = connect_socket(rustix::net::AddressFamily::UNIX, &addr, deadline)?;
    Ok(UnixStream::from(fd))
}

/// A socket that can bound its blocking reads and writes.
trait Timeouts {
    fn set_read_timeout(&self, t: Option<Duration>) -> io::Result<()>;
    fn set_write_timeout(&self, t: Option<Duration>) -> io::Result<()>;
}

impl Timeouts for TcpStream {
    fn set_read_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        TcpStream::set_read_timeout(self, t)
    }
    fn set_write_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        TcpStream::set_write_timeout(self, t)
    }
}

impl Timeouts for UnixStream {
    fn set_read_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        UnixStream::set_read_timeout(self, t)
    }
    fn set_write_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        UnixStream::set_write_timeout(self, t)
    }
}

/// A socket whose every read and write waits at most for what is left until the
/// deadline: the socket timeout is set anew before each call, so a peer that trickles
/// bytes cannot stretch the exchange past it.
struct Deadlined<S> {
    stream: S,
    deadline: Instant,
}

impl<S: Timeouts> Deadlined<S> {
    fn new(stream: S, deadline: Instant) -> Deadlined<S> {
        Deadlined { stream, deadline }
    }
}

impl<S: Read + Timeouts> Read for Deadlined<S> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.stream.set_read_timeout(Some(left(self.deadline)?))?;
        self.stream.read(buf)
    }
}

impl<S: Write + Timeouts> Write for Deadlined<S> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.stream.set_write_timeout(Some(left(self.deadline)?))?;
        self.stream.write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.stream.flush()
    }
}

/// `http://HOST[:PORT][/PREFIX]` or `unix:/PATH`: the base URL for requests and where
/// to connect. `https://` is refused: the daemon serves plain HTTP only, on loopback or
/// a Unix socket.
fn parse_endpoint(endpoint: &str) -> Result<(url::Url, Connect), ClientError> {
    let invalid = |reason| ClientError::Endpoint {
        endpoint: endpoint.to_string(),
        reason,
    };
    if let Some(path) = endpoint.strip_prefix("unix:") {
        if path.is_empty() {
            return Err(invalid("no socket path after unix:"));
        }
        let base = url::Url::parse("http://localhost/").expect("a valid URL");
        return Ok((base, Connect::Unix(PathBuf::from(path))));
    }
    let url = url::Url::parse(endpoint)
        .map_err(|_| invalid("expected http://HOST:PORT or unix:/path/to/socket"))?;
    match url.scheme() {
        "http" => {}
        "https" => {
            return Err(invalid(
                "the daemon serves plain HTTP only (on loopback or a Unix socket): use http:// or unix:",
            ));
        }
        _ => return Err(invalid("expected http://HOST:PORT or unix:/path/to/socket")),
    }
    if url.query().is_some() || url.fragment().is_some() {
        return Err(invalid("a query or fragment has no place in an endpoint"));
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(invalid(
            "credentials in the URL are not sent: use --key-file",
        ));
    }
    let host = url.host().map(|h| h.to_owned());
    let port = url.port_or_known_default();
    match (host, port) {
        (Some(host), Some(port)) => Ok((url, Connect::Tcp(host, port))),
        _ => Err(invalid("no host")),
    }
}

/// `Bearer KEY` for the key in `path` (its content, trimmed), if every byte of it may
/// stand in a header value: tab, space, visible ASCII and non-ASCII, no control
/// characters (the rule of `http::HeaderValue::from_str`).
fn bearer(path: &Path) -> Result<Secret, ClientError> {
    let key =
        Zeroizing::new(
            std::fs::read_to_string(path).map_err(|source| ClientError::KeyFile {
                path: path.to_path_buf(),
                source,
            })?,
        );
    bearer_value(&key, || format!("the key file {}", path.display()))
}

/// `Bearer KEY` for `key` (trimmed), if it may stand in a header; `what` names its
/// source in the error.
fn bearer_value(key: &str, what: impl FnOnce() -> String) -> Result<Secret, ClientError> {
    let value = Secret::new(format!("Bearer {}", key.trim()));
    let sendable = value
        .expose()
        .bytes()
        .all(|b| b == b'\t' || (b >= b' ' && b != 0x7f));
    if !sendable {
        return Err(ClientError::KeyNotSendable { what: what() });
    }
    Ok(value)
}

#[cfg(test)]
mod tests {
    use std::io::BufRead;

    use super::*;

    fn client(endpoint: &str, key_file: Option<&Path>) -> Result<DaemonClient, ClientError> {
        DaemonClient::new(endpoint, key_file)
    }

    fn target(url: &url::Url) -> (&str, &str) {
        (
            &url[url::Position::BeforeHost..url::Position::AfterPort],
            &url[url::Position::BeforePath..],
        )
    }

    #[test]
    fn endpoints_name_a_socket_and_a_host_header() {
        let c = client("http://127.0.0.1:8731/", None).unwrap();
        assert!(matches!(c.connect, Connect::Tcp(url::Host::Ipv4(ip), 8731) if ip.is_loopback()));
        let url = c.url(
            &["v1", "token", "zy", "access_token"],
            &[("min_valid", "30")],
        );
        assert_eq!(
            target(&url),
            ("127.0.0.1:8731", "/v1/token/zy/access_token?min_valid=30")
        );

        let c = client("http://[::1]:9000/tokend", None).unwrap();
        assert!(matches!(c.connect, Connect::Tcp(url::Host::Ipv6(_), 9000)));
        assert_eq!(
            target(&c.url(&["readyz"], &[])),
            ("[::1]:9000", "/tokend/readyz")
        );

        let c = client("http://localhost", None).unwrap();
        assert!(matches!(&c.connect, Connect::Tcp(url::Host::Domain(d), 80) if d == "localhost"));

        let c = client("unix:/run/tokend/tokend.sock", None).unwrap();
        assert!(
            matches!(&c.connect, Connect::Unix(p) if p == Path::new("/run/tokend/tokend.sock"))
        );
        assert_eq!(
            target(&c.url(&["v1", "accounts"], &[])),
            ("localhost", "/v1/accounts")
        );
    }

    #[test]
    fn refusals_map_to_not_now_not_you_or_failure() {
        assert_eq!(refused_exit_code(503), exit::TEMPFAIL);
        assert_eq!(refused_exit_code(401), exit::NOPERM);
        assert_eq!(refused_exit_code(403), exit::NOPERM);
        for other in [400, 404, 405, 500] {
            assert_eq!(refused_exit_code(other), exit::FAILURE, "{other}");
        }
    }

    #[test]
    fn an_account_name_stays_one_path_segment() {
        let c = client("http://127.0.0.1:8731", None).unwrap();
        let url = c.url(&["v1", "token", "a b/../c?d#e", "access_token"], &[]);
        assert_eq!(
            target(&url).1,
            "/v1/token/a%20b%2F..%2Fc%3Fd%23e/access_token"
        );
    }

    #[test]
    fn endpoints_the_daemon_cannot_serve_are_usage_errors() {
        for endpoint in [
            "https://127.0.0.1:8731",
            "ftp://127.0.0.1",
            "127.0.0.1:8731",
            "http://127.0.0.1:8731/?x=1",
            "http://user:pw@127.0.0.1:8731",
            "unix:",
        ] {
            let e = client(endpoint, None).unwrap_err();
            assert!(
                matches!(e, ClientError::Endpoint { .. }),
                "{endpoint}: {e:?}"
            );
            assert_eq!(e.exit_code(), exit::USAGE, "{endpoint}");
        }
        let e = client("https://127.0.0.1:8731", None).unwrap_err();
        assert!(e.to_string().contains("plain HTTP"), "{e}");
    }

    #[test]
    fn the_key_never_shows_in_debug_or_errors() {
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("key");
        std::fs::write(&key, "k3y-s3cret\n").unwrap();
        let c = client("http://127.0.0.1:8731", Some(&key)).unwrap();
        let shown = format!("{c:?}");
        assert!(!shown.contains("k3y-s3cret"), "{shown}");
        assert_eq!(
            c.authorization.as_ref().unwrap().expose(),
            "Bearer k3y-s3cret"
        );
        let request = c.request(&http::Method::GET, &c.url(&["readyz"], &[]));
        assert!(
            String::from_utf8_lossy(&request).contains("\r\nauthorization: Bearer k3y-s3cret\r\n")
        );

        for bad in ["k3y-s3cret\nsecond line", "k3y-s3cret\x7f", "k3y\0s3cret"] {
            std::fs::write(&key, bad).unwrap();
            let e = client("http://127.0.0.1:8731", Some(&key)).unwrap_err();
            assert!(matches!(e, ClientError::KeyNotSendable { .. }), "{e:?}");
            assert!(!format!("{e} {e:?}").contains("s3cret"));
            assert_eq!(e.exit_code(), exit::FAILURE);
        }
        // Tabs and non-ASCII are sendable, as they were with `http::HeaderValue`.
        std::fs::write(&key, "k3y\ts3crét").unwrap();
        client("http://127.0.0.1:8731", Some(&key)).unwrap();
    }

    #[test]
    fn a_request_is_one_http_1_1_head_that_closes_the_connection() {
        let c = client("http://[::1]:9000/tokend", None).unwrap();
        let get = c.request(
            &http::Method::GET,
            &c.url(&["v1", "token", "zy"], &[("min_valid", "30")]),
        );
        assert_eq!(
            String::from_utf8_lossy(&get),
            "GET /tokend/v1/token/zy?min_valid=30 HTTP/1.1\r\nhost: [::1]:9000\r\n\
             tokend-request: cli\r\nconnection: close\r\n\r\n"
        );
        let post = c.request(&http::Method::POST, &c.url(&["v1"], &[]));
        assert!(
            String::from_utf8_lossy(&post).ends_with("\r\ncontent-length: 0\r\n\r\n"),
            "{post:?}"
        );
    }

    #[test]
    fn an_answer_that_cannot_be_read_is_unavailable() {
        let c = client("http://127.0.0.1:1", None).unwrap();
        let e = c.answer_error(ReadError::CutOff(CutOff::Short {
            got: 5,
            expected: 10,
        }));
        assert_eq!(e.exit_code(), exit::UNAVAILABLE);
        assert_eq!(
            e.to_string(),
            "the daemon's answer was cut off: the connection closed after 5 of 10 bytes"
        );

        let e = c.answer_error(ReadError::TooLarge);
        assert_eq!(
            e.to_string(),
            "the answer from http://127.0.0.1:1 is larger than 16 MiB"
        );
        assert_eq!(e.exit_code(), exit::UNAVAILABLE);

        let e = c.answer_error(ReadError::Malformed("invalid HTTP version".into()));
        assert_eq!(
            e.to_string(),
            "the answer from http://127.0.0.1:1 is not valid HTTP: invalid HTTP version"
        );
        assert_eq!(e.exit_code(), exit::UNAVAILABLE);

        let e = c.answer_error(ReadError::Closed("the connection closed without an answer"));
        assert!(matches!(e, ClientError::Unreachable { .. }), "{e:?}");
        assert_eq!(e.exit_code(), exit::UNAVAILABLE);
    }

    // ---- over real sockets ----

    /// A one-connection server on a thread: it reads the request head and answers with
    /// `answer`; the head it read comes back through the handle.
    fn answer_once(answer: impl Into<Vec<u8>>) -> (String, std::thread::JoinHandle<String>) {
        let answer = answer.into();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let endpoint = format!("http://{}", listener.local_addr().unwrap());
        let server = std::thread::spawn(move || {
            let (stream, _) = listener.accept().unwrap();
            let mut reader = BufReader::new(&stream);
            let mut head = String::new();
            while !head.ends_with("\r\n\r\n") {
                if reader.read_line(&mut head).unwrap() == 0 {
                    break;
                }
            }
            (&stream).write_all(&answer).unwrap();
            head
        });
        (endpoint, server)
    }

    #[test]
    fn a_call_sends_the_request_and_reads_the_answer() {
        let (endpoint, server) = answer_once(
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n3\r\ntok\r\n0\r\n\r\n",
        );
        let c = client(&endpoint, None).unwrap();
        let body = c
            .call_ok(http::Method::GET, &c.url(&["v1", "token", "zy"], &[]))
            .unwrap();
        assert_eq!(body, "tok");
        let head = server.join().unwrap();
        let host = endpoint.strip_prefix("http://").unwrap();
        assert_eq!(
            head,
            format!(
                "GET /v1/token/zy HTTP/1.1\r\nhost: {host}\r\ntokend-request: cli\r\nconnection: close\r\n\r\n"
            )
        );

        let refusal = r#"{"error":"unknown_account","error_description":"no account"}"#;
        let (endpoint, server) = answer_once(format!(
            "HTTP/1.1 404 Not Found\r\ncontent-length: {}\r\n\r\n{refusal}",
            refusal.len()
        ));
        let c = client(&endpoint, None).unwrap();
        let e = c
            .call_ok(http::Method::POST, &c.url(&["v1"], &[]))
            .unwrap_err();
        assert_eq!(e.to_string(), "HTTP 404: no account");
        assert_eq!(e.exit_code(), exit::FAILURE);
        server.join().unwrap();
    }

    #[test]
    fn nobody_listening_is_unreachable() {
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let endpoint = format!("http://127.0.0.1:{port}");
        let c = client(&endpoint, None).unwrap();
        let e = c
            .call(http::Method::GET, &c.url(&["readyz"], &[]))
            .unwrap_err();
        assert!(matches!(e, ClientError::Unreachable { .. }), "{e:?}");
        assert_eq!(e.exit_code(), exit::UNAVAILABLE);
        assert!(
            e.to_string()
                .starts_with(&format!("cannot reach the daemon at {endpoint}: "))
        );

        let dir = tempfile::tempdir().unwrap();
        let endpoint = format!("unix:{}", dir.path().join("none.sock").display());
        let c = client(&endpoint, None).unwrap();
        let e = c
            .call(http::Method::GET, &c.url(&["readyz"], &[]))
            .unwrap_err();
        assert!(matches!(e, ClientError::Unreachable { .. }), "{e:?}");
    }

    const SHORT: Duration = Duration::from_millis(200);

    fn expect_timeout(c: &DaemonClient, endpoint: &str) {
        let started = Instant::now();
        let e = c
            .call(http::Method::GET, &c.url(&["readyz"], &[]))
            .unwrap_err();
        assert!(matches!(e, ClientError::Timeout { .. }), "{e:?}");
        // The kernel's socket timeout may end a little early against `Instant` (timer
        // granularity, seen at 198.7 ms): the point is that the client waited for it.
        assert!(
            started.elapsed() >= SHORT * 9 / 10,
            "{:?}",
            started.elapsed()
        );
        assert_eq!(e.exit_code(), exit::UNAVAILABLE);
        assert_eq!(
            e.to_string(),
            format!("cannot reach the daemon at {endpoint}: no answer within 200ms")
        );
    }

    #[test]
    fn a_daemon_that_never_answers_is_unavailable_after_the_timeout() {
        // The kernel completes the connection into the backlog; nobody ever reads it.
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let endpoint = format!("http://{}", listener.local_addr().unwrap());
        let c = client(&endpoint, None).unwrap().with_timeout(SHORT);
        expect_timeout(&c, &endpoint);

        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("silent.sock");
        let _listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let endpoint = format!("unix:{}", path.display());
        let c = client(&endpoint, None).unwrap().with_timeout(SHORT);
        expect_timeout(&c, &endpoint);
    }

    #[test]
    fn a_unix_socket_with_a_full_backlog_times_out_on_connect() {
        use rustix::net::{AddressFamily, SocketAddrUnix, SocketType};
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("full.sock");
        let listener = rustix::net::socket(AddressFamily::UNIX, SocketType::STREAM, None).unwrap();
        rustix::net::bind(&listener, &SocketAddrUnix::new(&path).unwrap()).unwrap();
        // A backlog of 0 holds one connection; the next connect waits for room.
        rustix::net::listen(&listener, 0).unwrap();
        let _first = UnixStream::connect(&path).unwrap();
        let endpoint = format!("unix:{}", path.display());
        let c = client(&endpoint, None).unwrap().with_timeout(SHORT);
        expect_timeout(&c, &endpoint);
    }

    /// A stream that records the timeouts it is given and reads one byte per call.
    #[derive(Default)]
    struct Recorder {
        timeouts: std::cell::RefCell<Vec<Duration>>,
        calls: usize,
    }

    impl Timeouts for Recorder {
        fn set_read_timeout(&self, t: Option<Duration>) -> io::Result<()> {
            self.timeouts.borrow_mut().push(t.expect("always bounded"));
            Ok(())
        }
        fn set_write_timeout(&self, t: Option<Duration>) -> io::Result<()> {
            self.set_read_timeout(t)
        }
    }

    impl Read for Recorder {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            self.calls += 1;
            buf[0] = b'x';
            Ok(1)
        }
    }

    impl Write for Recorder {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.calls += 1;
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn every_read_and_write_waits_only_for_what_is_left() {
        // A peer that trickles bytes gets each call a shorter timeout, never a fresh one.
        let mut s = Deadlined::new(Recorder::default(), Instant::now() + CLIENT_TIMEOUT);
        let mut buf = [0; 8];
        s.write_all(b"request").unwrap();
        s.read_exact(&mut buf[..3]).unwrap();
        let timeouts = s.stream.timeouts.borrow().clone();
        assert_eq!(timeouts.len(), 4, "{timeouts:?}");
        assert!(timeouts[0] <= CLIENT_TIMEOUT, "{timeouts:?}");
        assert!(timeouts.windows(2).all(|w| w[1] <= w[0]), "{timeouts:?}");

        // Past the deadline nothing reaches the socket.
        let mut late = Deadlined::new(Recorder::default(), Instant::now());
        let e = late.read(&mut buf).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::TimedOut);
        let e = late.write(b"x").unwrap_err();
        assert!(is_timeout(&e), "{e:?}");
        assert_eq!(late.stream.calls, 0);
    }
}
