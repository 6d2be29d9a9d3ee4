//! The client side of the daemon's API for the client commands (`tokend token`, `status`,
//! `health`, `refresh`): one blocking HTTP/1.1 request per connection, over TCP or a Unix
//! socket, with no async runtime. The commands themselves are in `cli`; the API in `http`.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::Value;
use zeroize::Zeroizing;

use super::exit;
use crate::http::REQUEST_HEADER;
use crate::secret::Secret;

/// How long a client command waits for the daemon, from connecting to the last byte.
pub const CLIENT_TIMEOUT: Duration = Duration::from_secs(60);

/// The largest answer body read (a token answer is well under 1 KiB; `GET /v1/accounts`
/// of a daemon with 10 000 accounts a few MiB).
pub const MAX_BODY: usize = 16 << 20;

/// The largest status line plus headers, and the largest trailer section, read.
const MAX_HEAD: usize = 64 << 10;

/// The largest chunk-size line (size and extensions) read.
const MAX_CHUNK_LINE: usize = 4 << 10;

/// At most this many header fields in an answer.
const MAX_HEADERS: usize = 64;

/// Why a client command failed. Nothing here holds the consumer key: it is only ever in a
/// [`Secret`].
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot read the key file {}: {source}", path.display())]
    KeyFile {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the key file {} holds characters that cannot be sent in an HTTP header", path.display())]
    KeyNotSendable { path: PathBuf },
    #[error("invalid endpoint {endpoint}: {reason}")]
    Endpoint {
        endpoint: String,
        reason: &'static str,
    },
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

impl ClientError {
    pub fn exit_code(&self) -> u8 {
        match self {
            ClientError::KeyFile { .. }
            | ClientError::KeyNotSendable { .. }
            | ClientError::Refused { .. } => exit::FAILURE,
            ClientError::Endpoint { .. } => exit::USAGE,
            ClientError::Unreachable { .. }
            | ClientError::Timeout { .. }
            | ClientError::CutOff(_)
            | ClientError::Malformed { .. }
            | ClientError::TooLarge { .. } => exit::UNAVAILABLE,
        }
    }
}

/// How an answer's body was cut short.
#[derive(Debug, thiserror::Error)]
pub enum CutOff {
    #[error("the connection closed after {got} of {expected} bytes")]
    Short { got: u64, expected: u64 },
    #[error("the connection closed inside the chunked body, after {got} bytes")]
    InChunks { got: usize },
    #[error("{0}")]
    Io(io::Error),
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
    /// The endpoint as the user gave it, for messages.
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
    let value = Secret::new(format!("Bearer {}", key.trim()));
    let sendable = value
        .expose()
        .bytes()
        .all(|b| b == b'\t' || (b >= b' ' && b != 0x7f));
    if !sendable {
        return Err(ClientError::KeyNotSendable {
            path: path.to_path_buf(),
        });
    }
    Ok(value)
}

/// Why an answer could not be read. `Io` and `CutOff::Io` are told apart by when they
/// happened: before the whole head, the daemon was not reached; in the body, the answer
/// was cut off.
#[derive(Debug)]
enum ReadError {
    Io(io::Error),
    /// The connection closed before the whole head: what was missing.
    Closed(&'static str),
    Malformed(String),
    TooLarge,
    CutOff(CutOff),
}

/// Reads one answer: the status and the whole body, decoded from `Content-Length`,
/// `Transfer-Encoding: chunked` or the connection's end (RFC 9112 §6.3). Interim (1xx)
/// answers are skipped.
fn read_response<R: BufRead>(r: &mut R) -> Result<(u16, Vec<u8>), ReadError> {
    loop {
        let head = read_head(r)?;
        match head.status {
            101 => return Err(ReadError::Malformed("an unasked-for 101 (upgrade)".into())),
            100..=199 => continue,
            // No body, whatever the headers say.
            204 | 304 => return Ok((head.status, Vec::new())),
            _ => {}
        }
        let body = match head.framing {
            Framing::Length(n) => read_sized(r, n)?,
            Framing::Chunked => read_chunked(r)?,
            Framing::UntilClose => read_to_close(r)?,
        };
        return Ok((head.status, body));
    }
}

/// How the body's end is known.
#[derive(Debug, PartialEq)]
enum Framing {
    Length(u64),
    Chunked,
    UntilClose,
}

struct Head {
    status: u16,
    framing: Framing,
}

/// Reads the status line and the header fields (up to the empty line) and parses them.
/// It is parsed after each line, so a peer that is not an HTTP server is found out by
/// its first line even if it then waits.
fn read_head<R: BufRead>(r: &mut R) -> Result<Head, ReadError> {
    let mut raw = Vec::with_capacity(512);
    loop {
        let room = (MAX_HEAD - raw.len()) as u64;
        let n = r
            .by_ref()
            .take(room)
            .read_until(b'\n', &mut raw)
            .map_err(ReadError::Io)?;
        if n == 0 || !raw.ends_with(b"\n") {
            if raw.len() >= MAX_HEAD {
                return Err(ReadError::Malformed(format!(
                    "the status line and headers exceed {} KiB",
                    MAX_HEAD >> 10
                )));
            }
            return Err(ReadError::Closed(if raw.is_empty() {
                "the connection closed without an answer"
            } else {
                "the connection closed inside the answer's head"
            }));
        }
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut response = httparse::Response::new(&mut headers);
        match response.parse(&raw) {
            Ok(httparse::Status::Partial) => continue,
            Ok(httparse::Status::Complete(_)) => {
                let status = response.code.expect("a complete head has a status");
                let framing = framing(response.headers)?;
                return Ok(Head { status, framing });
            }
            Err(e) => {
                let first = raw.split(|&b| b == b'\n').next().unwrap_or_default();
                let problem = if e == httparse::Error::TooManyHeaders {
                    format!("more than {MAX_HEADERS} header fields")
                } else if response.code.is_none() {
                    // Name what came instead: a TLS or SSH server, a proxy's banner.
                    let shown: String = first
                        .iter()
                        .take(40)
                        .flat_map(|b| b.escape_ascii())
                        .map(char::from)
                        .collect();
                    format!("{e} in the status line \"{shown}\"")
                } else {
                    format!("{e} in the headers")
                };
                return Err(ReadError::Malformed(problem));
            }
        }
    }
}

/// The body's framing from the header fields: `Transfer-Encoding` wins over
/// `Content-Length` (RFC 9112 §6.3); several `Content-Length` values must agree.
fn framing(headers: &[httparse::Header<'_>]) -> Result<Framing, ReadError> {
    let malformed = |p: String| Err(ReadError::Malformed(p));
    let mut length: Option<u64> = None;
    let mut chunked = false;
    for h in headers {
        let value = String::from_utf8_lossy(h.value);
        if h.name.eq_ignore_ascii_case("transfer-encoding") {
            // This client sends no TE or Accept-Encoding, so `chunked` is all a server
            // may apply.
            for coding in value.split(',').map(str::trim).filter(|c| !c.is_empty()) {
                if !coding.eq_ignore_ascii_case("chunked") || chunked {
                    return malformed(format!("unsupported Transfer-Encoding \"{value}\""));
                }
                chunked = true;
            }
        } else if h.name.eq_ignore_ascii_case("content-length") {
            for v in value.split(',').map(str::trim) {
                let n = match v.parse::<u64>() {
                    Ok(n) if !v.starts_with('+') => n,
                    _ => return malformed(format!("invalid Content-Length \"{value}\"")),
                };
                if length.is_some_and(|l| l != n) {
                    return malformed("conflicting Content-Length values".into());
                }
                length = Some(n);
            }
        }
    }
    Ok(match (chunked, length) {
        (true, _) => Framing::Chunked,
        (false, Some(n)) => Framing::Length(n),
        (false, None) => Framing::UntilClose,
    })
}

/// A body of `n` bytes.
fn read_sized<R: BufRead>(r: &mut R, n: u64) -> Result<Vec<u8>, ReadError> {
    if n > MAX_BODY as u64 {
        return Err(ReadError::TooLarge);
    }
    let mut body = Vec::with_capacity(n as usize);
    r.by_ref()
        .take(n)
        .read_to_end(&mut body)
        .map_err(|e| ReadError::CutOff(CutOff::Io(e)))?;
    if (body.len() as u64) < n {
        return Err(ReadError::CutOff(CutOff::Short {
            got: body.len() as u64,
            expected: n,
        }));
    }
    Ok(body)
}

/// A body that ends when the connection does.
fn read_to_close<R: BufRead>(r: &mut R) -> Result<Vec<u8>, ReadError> {
    let mut body = Vec::new();
    r.by_ref()
        .take(MAX_BODY as u64 + 1)
        .read_to_end(&mut body)
        .map_err(|e| ReadError::CutOff(CutOff::Io(e)))?;
    if body.len() > MAX_BODY {
        return Err(ReadError::TooLarge);
    }
    Ok(body)
}

/// A `Transfer-Encoding: chunked` body (RFC 9112 §7.1): chunk extensions and trailer
/// fields are read and dropped.
fn read_chunked<R: BufRead>(r: &mut R) -> Result<Vec<u8>, ReadError> {
    let mut body = Vec::new();
    let cut = |got| ReadError::CutOff(CutOff::InChunks { got });
    let io = |e| ReadError::CutOff(CutOff::Io(e));
    let mut line = Vec::with_capacity(32);
    loop {
        line.clear();
        r.by_ref()
            .take(MAX_CHUNK_LINE as u64)
            .read_until(b'\n', &mut line)
            .map_err(io)?;
        if !line.ends_with(b"\n") {
            if line.len() >= MAX_CHUNK_LINE {
                return Err(ReadError::Malformed(format!(
                    "a chunk-size line exceeds {} KiB",
                    MAX_CHUNK_LINE >> 10
                )));
            }
            return Err(cut(body.len()));
        }
        let size = chunk_size(&line)?;
        if size == 0 {
            skip_trailers(r).map_err(|e| match e {
                ReadError::Closed(_) => cut(body.len()),
                e => e,
            })?;
            return Ok(body);
        }
        if size > (MAX_BODY - body.len()) as u64 {
            return Err(ReadError::TooLarge);
        }
        let before = body.len();
        r.by_ref().take(size).read_to_end(&mut body).map_err(io)?;
        if ((body.len() - before) as u64) < size {
            return Err(cut(body.len()));
        }
        // The chunk's CRLF (a bare LF is taken too, as for every other line).
        line.clear();
        r.by_ref()
            .take(2)
            .read_until(b'\n', &mut line)
            .map_err(io)?;
        match line.as_slice() {
            b"\r\n" | b"\n" => {}
            [] | b"\r" => return Err(cut(body.len())),
            _ => {
                return Err(ReadError::Malformed(
                    "a chunk is longer than its size says".into(),
                ));
            }
        }
    }
}

/// The size in a chunk-size line: hex digits, then optional `;extensions`.
fn chunk_size(line: &[u8]) -> Result<u64, ReadError> {
    let line = line.strip_suffix(b"\n").unwrap_or(line);
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let digits = line.split(|&b| b == b';').next().unwrap_or_default();
    let digits = digits.trim_ascii();
    let invalid =
        || ReadError::Malformed(format!("invalid chunk size \"{}\"", digits.escape_ascii()));
    if digits.is_empty() || digits.len() > 16 {
        return Err(invalid());
    }
    let mut size = 0u64;
    for &b in digits {
        let d = (b as char).to_digit(16).ok_or_else(invalid)?;
        size = (size << 4) | u64::from(d);
    }
    Ok(size)
}

/// The trailer section after the last chunk, up to its empty line.
fn skip_trailers<R: BufRead>(r: &mut R) -> Result<(), ReadError> {
    let mut read = 0;
    let mut line = Vec::new();
    loop {
        line.clear();
        let n = r
            .by_ref()
            .take((MAX_HEAD - read) as u64)
            .read_until(b'\n', &mut line)
            .map_err(|e| ReadError::CutOff(CutOff::Io(e)))?;
        read += n;
        if !line.ends_with(b"\n") {
            if read >= MAX_HEAD {
                return Err(ReadError::Malformed(format!(
                    "the trailers exceed {} KiB",
                    MAX_HEAD >> 10
                )));
            }
            return Err(ReadError::Closed(
                "the connection closed inside the trailers",
            ));
        }
        if line == b"\r\n" || line == b"\n" {
            return Ok(());
        }
    }
}

#[cfg(test)]
mod tests {
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

    // ---- the answer reader, on in-memory input ----

    fn read(bytes: &[u8]) -> Result<(u16, Vec<u8>), ReadError> {
        read_response(&mut &bytes[..])
    }

    /// A reader that hands out one byte per call, behind a one-byte buffer: every line
    /// and chunk is split across reads.
    struct Trickle<'a>(&'a [u8]);

    impl Read for Trickle<'_> {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            match (self.0.split_first(), buf.first_mut()) {
                (Some((&b, rest)), Some(slot)) => {
                    *slot = b;
                    self.0 = rest;
                    Ok(1)
                }
                _ => Ok(0),
            }
        }
    }

    fn read_trickled(bytes: &[u8]) -> Result<(u16, Vec<u8>), ReadError> {
        read_response(&mut BufReader::with_capacity(1, Trickle(bytes)))
    }

    fn both(bytes: &[u8]) -> (u16, Vec<u8>) {
        let whole = read(bytes).unwrap();
        let trickled = read_trickled(bytes).unwrap();
        assert_eq!(whole, trickled);
        whole
    }

    #[test]
    fn reads_a_content_length_body_and_no_further() {
        let answer =
            b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\nContent-Length: 5\r\n\r\nhelloEXTRA";
        assert_eq!(both(answer), (200, b"hello".to_vec()));
        let (status, body) = both(b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n");
        assert_eq!((status, body.len()), (404, 0));
        // Repeated, agreeing values are one length.
        assert_eq!(
            both(b"HTTP/1.1 200 OK\r\ncontent-length: 2, 2\r\ncontent-length: 2\r\n\r\nok"),
            (200, b"ok".to_vec())
        );
    }

    #[test]
    fn reads_a_chunked_body_with_extensions_and_trailers() {
        let answer = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n\
            8\r\nchunked-\r\n\
            9;ext=\"a;b\" \r\nrecorded-\r\n\
            5 ; name\r\ntoken\r\n\
            A\r\n0123456789\r\n\
            0\r\nx-checksum: abc\r\nx-more: 1\r\n\r\n";
        assert_eq!(
            both(answer),
            (200, b"chunked-recorded-token0123456789".to_vec())
        );
        // Transfer-Encoding wins over Content-Length; no trailers.
        let answer =
            b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\ntransfer-encoding: Chunked\r\n\r\n\
            2\r\nok\r\n0\r\n\r\n";
        assert_eq!(both(answer), (200, b"ok".to_vec()));
    }

    #[test]
    fn reads_a_body_that_ends_with_the_connection() {
        let answer = b"HTTP/1.0 200 OK\r\nserver: x\r\n\r\nto the end\r\n";
        assert_eq!(both(answer), (200, b"to the end\r\n".to_vec()));
        // Bare LF line ends, as httparse takes them.
        assert_eq!(both(b"HTTP/1.1 503 Busy\n\nbusy"), (503, b"busy".to_vec()));
    }

    #[test]
    fn skips_interim_answers_and_reads_no_body_where_there_is_none() {
        let answer = b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
        assert_eq!(both(answer), (200, b"ok".to_vec()));
        let answer = b"HTTP/1.1 204 No Content\r\ncontent-length: 9\r\n\r\n";
        assert_eq!(both(answer), (204, Vec::new()));
    }

    #[test]
    fn a_body_cut_short_is_cut_off() {
        let short = read(b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nhello");
        assert!(
            matches!(
                short,
                Err(ReadError::CutOff(CutOff::Short {
                    got: 5,
                    expected: 10
                }))
            ),
            "{short:?}"
        );
        let chunked =
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n8\r\nwor";
        for cut in [
            &chunked[..],
            &chunked[..chunked.len() - 5], // inside a chunk-size line
            &chunked[..chunked.len() - 6], // before a chunk-size line
            &chunked[..chunked.len() - 8], // before a chunk's CRLF
            &chunked[..chunked.len() - 7], // inside a chunk's CRLF
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n", // no end of trailers
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n",
        ] {
            for result in [read(cut), read_trickled(cut)] {
                assert!(
                    matches!(result, Err(ReadError::CutOff(CutOff::InChunks { .. }))),
                    "{:?}: {result:?}",
                    String::from_utf8_lossy(cut)
                );
            }
        }
        let e = ClientError::CutOff(CutOff::Short {
            got: 5,
            expected: 10,
        });
        assert_eq!(e.exit_code(), exit::UNAVAILABLE);
        assert_eq!(
            e.to_string(),
            "the daemon's answer was cut off: the connection closed after 5 of 10 bytes"
        );
    }

    #[test]
    fn a_connection_closed_before_the_whole_head_did_not_reach_the_daemon() {
        for (cut, said) in [
            (&b""[..], "without an answer"),
            (
                b"HTTP/1.1 200 OK\r\ncontent-len",
                "inside the answer's head",
            ),
            (
                b"HTTP/1.1 200 OK\r\ncontent-length: 1\r\n",
                "inside the answer's head",
            ),
        ] {
            match read(cut) {
                Err(ReadError::Closed(what)) => assert!(what.contains(said), "{what}"),
                other => panic!("{cut:?}: {other:?}"),
            }
        }
    }

    #[test]
    fn oversized_answers_are_refused() {
        let declared = format!(
            "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n",
            MAX_BODY + 1
        );
        assert!(matches!(
            read(declared.as_bytes()),
            Err(ReadError::TooLarge)
        ));

        let mut endless = b"HTTP/1.1 200 OK\r\n\r\n".to_vec();
        endless.resize(endless.len() + MAX_BODY + 1, b'x');
        assert!(matches!(read(&endless), Err(ReadError::TooLarge)));
        let mut exactly = b"HTTP/1.1 200 OK\r\n\r\n".to_vec();
        exactly.resize(exactly.len() + MAX_BODY, b'x');
        assert_eq!(read(&exactly).unwrap().1.len(), MAX_BODY);

        // Chunks adding up past the limit: refused at the chunk that crosses it, before
        // its bytes are read.
        let chunked = format!(
            "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n{:x}\r\n",
            MAX_BODY + 1
        );
        assert!(matches!(read(chunked.as_bytes()), Err(ReadError::TooLarge)));

        let mut head = b"HTTP/1.1 200 OK\r\n".to_vec();
        let filler = format!("x-filler: {}\r\n", "a".repeat(4000));
        while head.len() <= MAX_HEAD {
            head.extend_from_slice(filler.as_bytes());
        }
        for result in [read(&head), read(&head[..MAX_HEAD + 10])] {
            match result {
                Err(ReadError::Malformed(p)) => assert!(p.contains("exceed 64 KiB"), "{p}"),
                other => panic!("{other:?}"),
            }
        }
        let mut many = b"HTTP/1.1 200 OK\r\n".to_vec();
        for i in 0..=MAX_HEADERS {
            many.extend_from_slice(format!("x-{i}: 1\r\n").as_bytes());
        }
        many.extend_from_slice(b"\r\n");
        match read(&many) {
            Err(ReadError::Malformed(p)) => assert_eq!(p, "more than 64 header fields"),
            other => panic!("{other:?}"),
        }
        let e = ClientError::TooLarge {
            endpoint: "http://127.0.0.1:1".into(),
        };
        assert_eq!(
            e.to_string(),
            "the answer from http://127.0.0.1:1 is larger than 16 MiB"
        );
        assert_eq!(e.exit_code(), exit::UNAVAILABLE);
    }

    #[test]
    fn garbage_is_named_for_what_it_is() {
        let problem = |bytes: &[u8]| match read(bytes) {
            Err(ReadError::Malformed(p)) => p,
            other => panic!("{bytes:?}: {other:?}"),
        };
        // An SSH server on the port: found out by its first line, shown escaped.
        let p = problem(b"SSH-2.0-OpenSSH_9.2\x1b[31m\r\n");
        assert!(p.contains("invalid HTTP version"), "{p}");
        assert!(
            p.contains("status line \"SSH-2.0-OpenSSH_9.2\\x1b[31m"),
            "{p}"
        );
        let p = problem(b"HTTP/1.1 2OO OK\r\n\r\n");
        assert!(p.contains("status"), "{p}");
        let p = problem(b"HTTP/1.1 200 OK\r\nbad header\r\n\r\n");
        assert!(p.contains("in the headers"), "{p}");
        let p = problem(b"HTTP/1.1 200 OK\r\ncontent-length: -1\r\n\r\n");
        assert!(p.contains("invalid Content-Length \"-1\""), "{p}");
        let p = problem(b"HTTP/1.1 200 OK\r\ncontent-length: 1\r\ncontent-length: 2\r\n\r\nab");
        assert!(p.contains("conflicting"), "{p}");
        let p = problem(b"HTTP/1.1 200 OK\r\ntransfer-encoding: gzip, chunked\r\n\r\n");
        assert!(p.contains("unsupported Transfer-Encoding"), "{p}");
        let p = problem(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\nzz\r\n");
        assert!(p.contains("invalid chunk size \"zz\""), "{p}");
        let p =
            problem(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n11111111111111111\r\n");
        assert!(p.contains("invalid chunk size"), "{p}");
        let p =
            problem(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n2\r\nabc\r\n0\r\n\r\n");
        assert!(p.contains("longer than its size"), "{p}");
        let p = problem(b"HTTP/1.1 101 Switching Protocols\r\n\r\n");
        assert!(p.contains("101"), "{p}");
        let mut long = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n1;".to_vec();
        long.resize(long.len() + MAX_CHUNK_LINE, b'x');
        assert!(problem(&long).contains("chunk-size line exceeds"));

        let e = ClientError::Malformed {
            endpoint: "http://127.0.0.1:22".into(),
            problem: p,
        };
        assert!(
            e.to_string()
                .starts_with("the answer from http://127.0.0.1:22 is not valid HTTP: ")
        );
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
        assert!(started.elapsed() >= SHORT, "{:?}", started.elapsed());
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
