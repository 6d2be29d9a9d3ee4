//! The blocking HTTP/1.1 answer reader of the client commands: the status line and
//! headers (parsed by httparse), then the body by its framing, within fixed limits. It
//! knows nothing of the daemon's API; connecting and sending are `client`'s.

use std::io::{self, BufRead, Read};

/// The largest answer body read (a token answer is well under 1 KiB; `GET /v1/accounts`
/// of a daemon with 10 000 accounts a few MiB).
pub const MAX_BODY: usize = 16 << 20;

/// The largest status line plus headers, and the largest trailer section, read.
const MAX_HEAD: usize = 64 << 10;

/// The largest chunk-size line (size and extensions) read.
const MAX_CHUNK_LINE: usize = 4 << 10;

/// At most this many header fields in an answer.
const MAX_HEADERS: usize = 64;

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

/// Why an answer could not be read. `Io` and `CutOff::Io` are told apart by when they
/// happened: before the whole head, the daemon was not reached; in the body, the answer
/// was cut off.
#[derive(Debug)]
pub(super) enum ReadError {
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
pub(super) fn read_response<R: BufRead>(r: &mut R) -> Result<(u16, Vec<u8>), ReadError> {
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
    use std::io::BufReader;

    use super::*;

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
    }
}
