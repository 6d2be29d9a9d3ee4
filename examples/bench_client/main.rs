//! The benchmark's client side: load generators and checkers that `bench/run.sh` drives.
//! Each subcommand prints `key=value` lines on stdout.
//!
//! - `rate`: open-loop fixed-rate load (wrk2-style, which Debian does not package) over
//!   C keep-alive HTTP/1.1 connections on one thread. Request g is due at
//!   `t0 + g / rate` on connection `g mod C`. When that connection is still busy at the
//!   due time, the latency counts from the due time, so a slow server cannot hide its
//!   queueing (no coordinated omission); when it is idle, the latency counts from the
//!   actual send, so the generator's own timer slop (tokio's 1 ms timer granularity,
//!   reported as `lag_p99_us`) is not charged to the server. Like wrk2, pacing is at
//!   millisecond granularity: requests due within the same millisecond leave together.
//! - `once`: N requests, each on a new TCP connection: the cost of one loopback request.
//! - `start`: spawns `tokend run`, polls `/readyz` until 200, counts provider calls, then
//!   reads every account's token. Leaves the daemon running (prints its pid).
//! - `forced`: sequential `GET /v1/token/{account}?min_valid=N` on distinct accounts,
//!   each forcing a refresh; compares the client's latency with the provider's own
//!   handling time of the same request (from the fake provider's event log).
//! - `disk`: the disk's own share of a forced refresh: N times, two saves the way the
//!   state store makes them (temp file, write, fdatasync, rename over, fsync the
//!   directory), as a rotating refresh does; the baseline of target 6.
//! - `poll`: a reader polling random accounts at a fixed rate, asking the provider
//!   whether each served access token is valid at that moment.
//! - `scale-report`: lateness, missed expiries and refresh-rate smoothness from the fake
//!   provider's event log.
//! - `ha-failover`, `ha-propagation`, `ha-accounts`, `free-port`: the high-availability
//!   rows (`bench/ha.sh`), in `ha.rs`.
//!
//! The HTTP client is a minimal HTTP/1.1 one on raw tokio sockets (reqwest's per-request
//! overhead would count against the server being measured).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use clap::{Parser, Subcommand};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

mod ha;

#[derive(Parser)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    Rate {
        /// Server address, host:port.
        #[arg(long)]
        addr: SocketAddr,
        /// Request path prefix; a 5-digit random account index in [0, accounts) is appended.
        #[arg(long, default_value = "/v1/token/acct-")]
        prefix: String,
        #[arg(long, default_value_t = 100)]
        accounts: u32,
        /// Requests per second.
        #[arg(long)]
        rate: f64,
        /// Seconds measured (after the warm-up).
        #[arg(long, default_value_t = 10.0)]
        duration: f64,
        #[arg(long, default_value_t = 1.0)]
        warmup: f64,
        #[arg(long, default_value_t = 64)]
        connections: usize,
    },
    Once {
        #[arg(long)]
        addr: SocketAddr,
        #[arg(long, default_value = "/v1/token/acct-00000")]
        path: String,
        #[arg(long, default_value_t = 200)]
        n: usize,
    },
    Start {
        /// The tokend binary.
        #[arg(long)]
        daemon: PathBuf,
        #[arg(long)]
        config: PathBuf,
        /// Where the daemon's stderr goes.
        #[arg(long)]
        log: PathBuf,
        /// The daemon's address, host:port.
        #[arg(long)]
        addr: SocketAddr,
        /// The fake provider's control address, host:port.
        #[arg(long)]
        control: SocketAddr,
        #[arg(long)]
        accounts: u32,
        /// Give up after this many seconds.
        #[arg(long, default_value_t = 120.0)]
        timeout: f64,
        /// Seconds to keep counting provider calls after ready.
        #[arg(long, default_value_t = 2.0)]
        settle: f64,
    },
    Forced {
        #[arg(long)]
        addr: SocketAddr,
        #[arg(long)]
        control: SocketAddr,
        /// First account index used; each sample uses the next account.
        #[arg(long, default_value_t = 0)]
        first: u32,
        #[arg(long, default_value_t = 200)]
        count: u32,
        /// min_valid seconds: more than the persisted tokens' remaining life.
        #[arg(long)]
        min_valid: u64,
    },
    Disk {
        /// A directory on the disk the state lives on.
        #[arg(long)]
        dir: PathBuf,
        #[arg(long, default_value_t = 200)]
        count: usize,
    },
    Poll {
        #[arg(long)]
        addr: SocketAddr,
        #[arg(long)]
        control: SocketAddr,
        #[arg(long)]
        accounts: u32,
        /// Reads per second.
        #[arg(long, default_value_t = 50.0)]
        rate: f64,
        #[arg(long)]
        duration: f64,
    },
    ScaleReport {
        #[arg(long)]
        control: SocketAddr,
        #[arg(long)]
        accounts: u32,
        /// Access token lifetime, seconds.
        #[arg(long)]
        lifetime: f64,
        /// The run's start and end, Unix microseconds.
        #[arg(long)]
        start_us: u64,
        #[arg(long)]
        end_us: u64,
        /// Planned refresh is at most this fraction of the lifetime (schedule.rs: ratio).
        #[arg(long, default_value_t = 0.80)]
        ratio: f64,
        /// ... and at least this fraction (ratio - jitter).
        #[arg(long, default_value_t = 0.75)]
        ratio_min: f64,
    },
    #[command(flatten)]
    Ha(ha::HaCmd),
}

// ---------------------------------------------------------------------------------------
// A minimal HTTP/1.1 client.

struct Conn {
    stream: TcpStream,
    buf: Vec<u8>,
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

impl Conn {
    async fn connect(addr: SocketAddr) -> std::io::Result<Conn> {
        let stream = TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        Ok(Conn {
            stream,
            buf: Vec::with_capacity(4096),
        })
    }

    /// Sends one request and reads one response: (status, body).
    async fn roundtrip(&mut self, request: &[u8]) -> std::io::Result<(u16, Vec<u8>)> {
        let (status, range) = self.exchange(request).await?;
        let body = self.buf[range.clone()].to_vec();
        self.buf.drain(..range.end);
        Ok((status, body))
    }

    /// Sends one request and reads one response, discarding the body: the load
    /// generator's path, with no per-request allocation.
    async fn roundtrip_status(&mut self, request: &[u8]) -> std::io::Result<u16> {
        let (status, range) = self.exchange(request).await?;
        self.buf.drain(..range.end);
        Ok(status)
    }

    /// Writes `request`, reads until one whole response is buffered; returns its status
    /// and the body's range in `self.buf`.
    async fn exchange(&mut self, request: &[u8]) -> std::io::Result<(u16, std::ops::Range<usize>)> {
        self.stream.write_all(request).await?;
        let head_end = loop {
            if let Some(i) = find(&self.buf, b"\r\n\r\n") {
                break i + 4;
            }
            self.fill().await?;
        };
        let head = std::str::from_utf8(&self.buf[..head_end])
            .map_err(|_| std::io::Error::other("non-UTF-8 response head"))?;
        let status: u16 = head
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| std::io::Error::other("bad status line"))?;
        let length: usize = head
            .lines()
            .find_map(|l| {
                let (k, v) = l.split_once(':')?;
                k.trim()
                    .eq_ignore_ascii_case("content-length")
                    .then(|| v.trim().parse().ok())?
            })
            .ok_or_else(|| std::io::Error::other("response without content-length"))?;
        while self.buf.len() < head_end + length {
            self.fill().await?;
        }
        Ok((status, head_end..head_end + length))
    }

    async fn fill(&mut self) -> std::io::Result<()> {
        self.buf.reserve(8192);
        let n = self.stream.read_buf(&mut self.buf).await?;
        if n == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "connection closed",
            ));
        }
        Ok(())
    }
}

/// A GET whose `Host` names the server's own address and port, as tokend's guard wants.
fn get_request(addr: SocketAddr, path: &str, token_header: bool) -> Vec<u8> {
    let extra = if token_header {
        "Tokend-Request: 1\r\n"
    } else {
        ""
    };
    format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\n{extra}\r\n").into_bytes()
}

/// One request on a new connection (for the control port's occasional queries).
async fn fetch(addr: SocketAddr, path: &str) -> std::io::Result<(u16, Vec<u8>)> {
    Conn::connect(addr)
        .await?
        .roundtrip(&get_request(addr, path, true))
        .await
}

async fn stats(control: SocketAddr) -> Value {
    let (_, body) = fetch(control, "/stats").await.expect("provider /stats");
    serde_json::from_slice(&body).expect("stats JSON")
}

fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_micros() as u64
}

/// Percentile (nearest rank) of a sorted slice.
fn pct<T: Copy + Default>(sorted: &[T], p: f64) -> T {
    if sorted.is_empty() {
        return T::default();
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn rng_next(state: &mut u64) -> u64 {
    // xorshift64*: fast, and good enough to pick accounts.
    *state ^= *state >> 12;
    *state ^= *state << 25;
    *state ^= *state >> 27;
    state.wrapping_mul(0x2545_F491_4F6C_DD1D)
}

// ---------------------------------------------------------------------------------------
// rate

struct RateResult {
    latencies_us: Vec<u32>,
    lags_us: Vec<u32>,
    non_200: u64,
    errors: u64,
}

#[expect(
    clippy::too_many_arguments,
    reason = "one open-loop load task's knobs, passed once from the command line"
)]
async fn rate_task(
    c: usize,
    conns: usize,
    addr: SocketAddr,
    requests: std::sync::Arc<Vec<Vec<u8>>>,
    rate: f64,
    t0: Instant,
    warmup: Duration,
    end: Instant,
) -> RateResult {
    let mut result = RateResult {
        latencies_us: Vec::new(),
        lags_us: Vec::new(),
        non_200: 0,
        errors: 0,
    };
    let mut seed = 0x9E37_79B9_7F4A_7C15u64 ^ (c as u64 + 1).wrapping_mul(0x1000_0000_01B3);
    let mut conn = Conn::connect(addr).await.ok();
    let mut ready = Instant::now();
    let mut k: u64 = 0;
    loop {
        let g = k * conns as u64 + c as u64;
        k += 1;
        let due = t0 + Duration::from_secs_f64(g as f64 / rate);
        // The second test makes a huge rate a closed loop bounded by the duration.
        if due >= end || Instant::now() >= end {
            break;
        }
        // tokio's timer has millisecond granularity: the send may come up to ~1 ms after
        // `due`. That slop is the generator's, not the server's, so the latency counts from
        // the send when the connection was idle at `due`, and from `due` when it was still
        // busy with the previous request (then the wait is the server's doing).
        tokio::time::sleep_until(due.into()).await;
        let sent = Instant::now();
        let account = (rng_next(&mut seed) % requests.len() as u64) as usize;
        let outcome = match conn.as_mut() {
            Some(c) => c.roundtrip_status(&requests[account]).await,
            None => Err(std::io::Error::other("not connected")),
        };
        let done = Instant::now();
        let idle_at_due = ready <= due;
        let from = if idle_at_due { sent } else { due };
        ready = done;
        let measured = sent >= t0 + warmup;
        match outcome {
            Ok(status) => {
                if measured {
                    if status != 200 {
                        result.non_200 += 1;
                    }
                    result
                        .latencies_us
                        .push((done - from).as_micros().min(u32::MAX as u128) as u32);
                    if idle_at_due {
                        result
                            .lags_us
                            .push((sent - due).as_micros().min(u32::MAX as u128) as u32);
                    }
                }
            }
            Err(_) => {
                if measured {
                    result.errors += 1;
                }
                conn = Conn::connect(addr).await.ok();
                ready = Instant::now();
            }
        }
    }
    result
}

fn rate(
    addr: SocketAddr,
    prefix: String,
    accounts: u32,
    rate: f64,
    duration: f64,
    warmup: f64,
    connections: usize,
) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async move {
        let t0 = Instant::now() + Duration::from_millis(200);
        let warm = Duration::from_secs_f64(warmup);
        let end = t0 + warm + Duration::from_secs_f64(duration);
        let requests: std::sync::Arc<Vec<Vec<u8>>> = std::sync::Arc::new(
            (0..accounts)
                .map(|i| get_request(addr, &format!("{prefix}{i:05}"), true))
                .collect(),
        );
        let mut tasks = tokio::task::JoinSet::new();
        for c in 0..connections {
            tasks.spawn(rate_task(
                c,
                connections,
                addr,
                requests.clone(),
                rate,
                t0,
                warm,
                end,
            ));
        }
        let mut lat = Vec::new();
        let mut lags = Vec::new();
        let (mut non_200, mut errors) = (0, 0);
        while let Some(r) = tasks.join_next().await {
            let r = r.expect("rate task");
            lat.extend(r.latencies_us);
            lags.extend(r.lags_us);
            non_200 += r.non_200;
            errors += r.errors;
        }
        lat.sort_unstable();
        lags.sort_unstable();
        println!("requests={}", lat.len());
        println!("achieved_rps={:.0}", lat.len() as f64 / duration);
        println!("non_200={non_200}");
        println!("errors={errors}");
        for (name, p) in [("p50", 50.0), ("p90", 90.0), ("p99", 99.0), ("p999", 99.9)] {
            println!("{name}_us={}", pct(&lat, p));
        }
        println!("max_us={}", lat.last().copied().unwrap_or(0));
        println!("lag_p99_us={}", pct(&lags, 99.0));
    });
}

// ---------------------------------------------------------------------------------------
// once

async fn once(addr: SocketAddr, path: String, n: usize) {
    let request = get_request(addr, &path, true);
    let mut samples = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        let mut conn = Conn::connect(addr).await.expect("connect");
        let (status, _) = conn.roundtrip(&request).await.expect("request");
        assert_eq!(status, 200, "GET {path}");
        samples.push(t.elapsed().as_micros() as u64);
    }
    samples.sort_unstable();
    println!("p50_us={}", pct(&samples, 50.0));
    println!(
        "mean_us={}",
        samples.iter().sum::<u64>() / samples.len().max(1) as u64
    );
}

// ---------------------------------------------------------------------------------------
// start

// The daemon is left running on purpose (the forced-refresh test uses it next); the
// harness stops it by the pid printed first.
#[expect(
    clippy::too_many_arguments,
    reason = "the daemon's start knobs, passed once from the command line"
)]
#[expect(
    clippy::zombie_processes,
    reason = "the harness stops the daemon by the pid printed first"
)]
async fn start(
    daemon: PathBuf,
    config: PathBuf,
    log: PathBuf,
    addr: SocketAddr,
    control: SocketAddr,
    accounts: u32,
    timeout: f64,
    settle: f64,
) {
    let before = stats(control).await["recorded_requests"]
        .as_u64()
        .unwrap_or(0);
    let stderr = std::fs::File::create(&log).expect("log file");
    let spawned = Instant::now();
    let mut child = Command::new(&daemon)
        .arg("run")
        .arg("--config")
        .arg(&config)
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(stderr)
        .spawn()
        .expect("spawn tokend");
    println!("pid={}", child.id());
    let deadline = spawned + Duration::from_secs_f64(timeout);
    let readyz = get_request(addr, "/readyz", false);
    let mut first_answer_ms = None;
    let mut conn: Option<Conn> = None;
    let ready_ms = loop {
        if Instant::now() > deadline {
            println!("ready_ms=timeout");
            return;
        }
        if let Ok(Some(status)) = child.try_wait() {
            println!("ready_ms=exited({status})");
            return;
        }
        if conn.is_none() {
            conn = Conn::connect(addr).await.ok();
        }
        if let Some(c) = conn.as_mut() {
            match c.roundtrip(&readyz).await {
                Ok((status, _)) => {
                    first_answer_ms.get_or_insert(spawned.elapsed().as_secs_f64() * 1e3);
                    if status == 200 {
                        break spawned.elapsed().as_secs_f64() * 1e3;
                    }
                }
                Err(_) => conn = None,
            }
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    };
    println!("ready_ms={ready_ms:.1}");
    println!("first_answer_ms={:.1}", first_answer_ms.unwrap_or(ready_ms));
    // Every account's token, 16 connections at a time.
    let t = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for w in 0..16u32 {
        tasks.spawn(async move {
            let mut conn = Conn::connect(addr).await.expect("connect");
            let mut ok = 0u32;
            let mut i = w;
            while i < accounts {
                let (status, _) = conn
                    .roundtrip(&get_request(addr, &format!("/v1/token/acct-{i:05}"), true))
                    .await
                    .expect("token request");
                ok += u32::from(status == 200);
                i += 16;
            }
            ok
        });
    }
    let mut served = 0;
    while let Some(r) = tasks.join_next().await {
        served += r.expect("reader");
    }
    println!("served_ok={served}");
    println!("read_all_ms={:.1}", t.elapsed().as_secs_f64() * 1e3);
    tokio::time::sleep(Duration::from_secs_f64(settle)).await;
    let after = stats(control).await["recorded_requests"]
        .as_u64()
        .unwrap_or(0);
    println!("provider_calls={}", after - before);
}

// ---------------------------------------------------------------------------------------
// forced

async fn forced(addr: SocketAddr, control: SocketAddr, first: u32, count: u32, min_valid: u64) {
    let before = stats(control).await;
    let conns_before = before["connections"].as_u64().unwrap_or(0);
    let since = now_us();
    let mut conn = Conn::connect(addr).await.expect("connect");
    let mut client_us = HashMap::new();
    let mut failures = 0;
    for i in first..first + count {
        let path = format!("/v1/token/acct-{i:05}?min_valid={min_valid}");
        let request = get_request(addr, &path, true);
        let t = Instant::now();
        let (status, body) = conn.roundtrip(&request).await.expect("forced request");
        let took = t.elapsed().as_micros() as i64;
        let fresh = serde_json::from_slice::<Value>(&body)
            .ok()
            .and_then(|v| v["expires_in"].as_u64())
            .is_some_and(|e| e >= min_valid);
        if status == 200 && fresh {
            client_us.insert(i, took);
        } else {
            failures += 1;
            if failures <= 3 {
                eprintln!(
                    "forced: account {i}: HTTP {status}: {}",
                    String::from_utf8_lossy(&body)
                );
            }
        }
    }
    let after = stats(control).await;
    let (_, csv) = fetch(control, "/events").await.expect("events");
    let mut provider_us: HashMap<u32, i64> = HashMap::new();
    let mut requests = 0;
    for line in String::from_utf8_lossy(&csv).lines().skip(1) {
        let f: Vec<&str> = line.split(',').collect();
        let (Ok(account), Ok(arrival), Ok(handle)) = (
            f[0].parse::<u32>(),
            f[1].parse::<u64>(),
            f[2].parse::<i64>(),
        ) else {
            continue;
        };
        if arrival >= since && (first..first + count).contains(&account) {
            requests += 1;
            provider_us.insert(account, handle);
        }
    }
    let mut client = Vec::new();
    let mut provider = Vec::new();
    let mut overhead = Vec::new();
    for (account, c) in &client_us {
        if let Some(p) = provider_us.get(account) {
            client.push(*c);
            provider.push(*p);
            overhead.push(c - p);
        }
    }
    client.sort_unstable();
    provider.sort_unstable();
    overhead.sort_unstable();
    println!("samples={}", overhead.len());
    println!("failures={failures}");
    println!("provider_requests={requests}");
    println!(
        "provider_connections={}",
        after["connections"].as_u64().unwrap_or(0) - conns_before
    );
    for (name, v) in [
        ("client", &client),
        ("provider", &provider),
        ("overhead", &overhead),
    ] {
        println!("{name}_p50_us={}", pct(v, 50.0));
        println!("{name}_p99_us={}", pct(v, 99.0));
        println!("{name}_max_us={}", v.last().copied().unwrap_or(0));
    }
}

// ---------------------------------------------------------------------------------------
// poll

async fn poll(addr: SocketAddr, control: SocketAddr, accounts: u32, rate: f64, duration: f64) {
    let t0 = Instant::now();
    let end = t0 + Duration::from_secs_f64(duration);
    let mut conn = Conn::connect(addr).await.expect("connect to tokend");
    let mut check = Conn::connect(control).await.expect("connect to provider");
    let mut seed = now_us() | 1;
    let (mut reads, mut ok, mut invalid, mut zero, mut non_200, mut errors) = (0u64, 0, 0, 0, 0, 0);
    let mut min_expires_in = u64::MAX;
    let mut k = 0u64;
    loop {
        let due = t0 + Duration::from_secs_f64(k as f64 / rate);
        k += 1;
        if due >= end {
            break;
        }
        tokio::time::sleep_until(due.into()).await;
        let account = rng_next(&mut seed) % accounts as u64;
        reads += 1;
        let request = get_request(addr, &format!("/v1/token/acct-{account:05}"), true);
        let (status, body) = match conn.roundtrip(&request).await {
            Ok(r) => r,
            Err(_) => {
                errors += 1;
                if let Ok(c) = Conn::connect(addr).await {
                    conn = c;
                }
                continue;
            }
        };
        if status != 200 {
            non_200 += 1;
            if non_200 <= 3 {
                eprintln!(
                    "poll: acct-{account:05}: HTTP {status}: {}",
                    String::from_utf8_lossy(&body)
                );
            }
            continue;
        }
        let v: Value = serde_json::from_slice(&body).unwrap_or_default();
        let token = v["access_token"].as_str().unwrap_or_default().to_string();
        let expires_in = v["expires_in"].as_u64().unwrap_or(0);
        min_expires_in = min_expires_in.min(expires_in);
        if expires_in == 0 {
            zero += 1;
        }
        let query = form_urlencoded::Serializer::new(String::new())
            .append_pair("token", &token)
            .finish();
        let verdict = match check
            .roundtrip(&get_request(control, &format!("/valid?{query}"), false))
            .await
        {
            Ok((_, b)) => b,
            Err(_) => {
                errors += 1;
                if let Ok(c) = Conn::connect(control).await {
                    check = c;
                }
                continue;
            }
        };
        if verdict == b"1" {
            ok += 1;
        } else {
            invalid += 1;
            if invalid <= 3 {
                eprintln!(
                    "poll: acct-{account:05}: the provider says the served token is not valid (expires_in {expires_in})"
                );
            }
        }
    }
    println!("reads={reads}");
    println!("valid={ok}");
    println!("expired_served={invalid}");
    println!("expires_in_zero={zero}");
    println!("non_200={non_200}");
    println!("errors={errors}");
    println!(
        "min_expires_in_s={}",
        if min_expires_in == u64::MAX {
            0
        } else {
            min_expires_in
        }
    );
}

// ---------------------------------------------------------------------------------------
// scale-report

async fn scale_report(
    control: SocketAddr,
    accounts: u32,
    lifetime: f64,
    start_us: u64,
    end_us: u64,
    ratio: f64,
    ratio_min: f64,
) {
    let (_, csv) = fetch(control, "/events").await.expect("events");
    let provider_stats = stats(control).await;
    let life_us = (lifetime * 1e6) as i64;
    // Per account: (arrival, answer) of each successful request, in order.
    let mut per: Vec<Vec<(i64, i64)>> = vec![Vec::new(); accounts as usize];
    let mut failed = 0u64;
    let mut per_second: HashMap<u64, u64> = HashMap::new();
    let mut total = 0u64;
    for line in String::from_utf8_lossy(&csv).lines().skip(1) {
        let f: Vec<&str> = line.split(',').collect();
        let (Ok(account), Ok(arrival), Ok(handle), Ok(status)) = (
            f[0].parse::<usize>(),
            f[1].parse::<u64>(),
            f[2].parse::<u64>(),
            f[3].parse::<u16>(),
        ) else {
            continue;
        };
        if arrival < start_us || arrival >= end_us || account >= per.len() {
            continue;
        }
        total += 1;
        *per_second
            .entry((arrival - start_us) / 1_000_000)
            .or_default() += 1;
        if status == 200 {
            per[account].push((arrival as i64, (arrival + handle) as i64));
        } else {
            failed += 1;
        }
    }
    let mut lateness = Vec::new();
    let (mut early, mut missed, mut stale, mut never) = (0u64, 0u64, 0u64, 0u64);
    for events in &mut per {
        events.sort_unstable();
        if events.is_empty() {
            never += 1;
            continue;
        }
        for pair in events.windows(2) {
            let (prev_answer, next_arrival, next_answer) = (pair[0].1, pair[1].0, pair[1].1);
            let latest_plan = prev_answer + (life_us as f64 * ratio) as i64;
            let earliest_plan = prev_answer + (life_us as f64 * ratio_min) as i64;
            lateness.push(next_arrival - latest_plan);
            if next_arrival < earliest_plan - 50_000 {
                early += 1;
            }
            if next_answer > prev_answer + life_us {
                missed += 1;
            }
        }
        let last_answer = events.last().expect("not empty").1;
        if last_answer + life_us < end_us as i64 {
            stale += 1;
        }
    }
    lateness.sort_unstable();
    let secs = (end_us - start_us) / 1_000_000;
    let rates = |from: u64| -> (f64, u64, u64) {
        let counts: Vec<u64> = (from..secs)
            .map(|s| per_second.get(&s).copied().unwrap_or(0))
            .collect();
        let n = counts.len().max(1) as f64;
        let mean = counts.iter().sum::<u64>() as f64 / n;
        let (peak_s, peak) = counts
            .iter()
            .enumerate()
            .max_by_key(|(_, c)| **c)
            .map(|(i, c)| (i as u64 + from, *c))
            .unwrap_or((0, 0));
        (mean, peak, peak_s)
    };
    let steady_from = lifetime.ceil() as u64;
    let (mean_all, peak_all, peak_all_s) = rates(0);
    let (mean_steady, peak_steady, peak_steady_s) = rates(steady_from);
    println!("requests={total}");
    println!("failed={failed}");
    println!("refresh_intervals={}", lateness.len());
    println!("lateness_p50_ms={:.1}", pct(&lateness, 50.0) as f64 / 1e3);
    println!("lateness_p99_ms={:.1}", pct(&lateness, 99.0) as f64 / 1e3);
    println!(
        "lateness_max_ms={:.1}",
        lateness.last().copied().unwrap_or(0) as f64 / 1e3
    );
    println!("early={early}");
    println!("missed_expiry={missed}");
    println!("stale_at_end={stale}");
    println!("never_refreshed={never}");
    println!("rate_mean_all={mean_all:.1}");
    println!("rate_peak_all={peak_all}");
    println!("rate_peak_all_second={peak_all_s}");
    println!("rate_mean_steady={mean_steady:.1}");
    println!("rate_peak_steady={peak_steady}");
    println!("rate_peak_steady_second={peak_steady_s}");
    println!("steady_from_s={steady_from}");
    // Connections the provider accepted, in all and after the first lifetime.
    let (mut conns_all, mut conns_steady) = (0u64, 0u64);
    for pair in provider_stats["connections_per_second"]
        .as_array()
        .into_iter()
        .flatten()
    {
        let (sec, n) = (pair[0].as_u64().unwrap_or(0), pair[1].as_u64().unwrap_or(0));
        if sec * 1_000_000 + 999_999 < start_us || sec * 1_000_000 >= end_us {
            continue;
        }
        conns_all += n;
        if sec * 1_000_000 >= start_us + steady_from * 1_000_000 {
            conns_steady += n;
        }
    }
    let requests_steady: u64 = (steady_from..secs)
        .map(|s| per_second.get(&s).copied().unwrap_or(0))
        .sum();
    println!("connections_all={conns_all}");
    println!("connections_steady={conns_steady}");
    println!("requests_steady={requests_steady}");
    // The per-second series, for the docs' plots and for anyone checking by hand.
    let series: Vec<String> = (0..secs)
        .map(|s| per_second.get(&s).copied().unwrap_or(0).to_string())
        .collect();
    println!("per_second={}", series.join(" "));
}

/// Two durable replacements of a ~1 KB file per sample, as the store saves a state
/// (`src/store/atomic.rs`: write_atomically); prints the distribution of the pair's wall time.
fn disk(dir: &std::path::Path, count: usize) {
    use std::io::Write as _;
    let target = dir.join("bench-disk.json");
    let payload = vec![b'x'; 1024];
    let save = || {
        let tmp = dir.join(".bench-disk.json.tmp");
        let mut f = std::fs::File::create(&tmp).expect("create temp file");
        f.write_all(&payload).expect("write");
        f.sync_data().expect("fdatasync");
        std::fs::rename(&tmp, &target).expect("rename");
        std::fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .expect("fsync dir");
    };
    let mut samples: Vec<u64> = (0..count)
        .map(|_| {
            let t = Instant::now();
            save();
            save();
            t.elapsed().as_micros() as u64
        })
        .collect();
    let _ = std::fs::remove_file(&target);
    samples.sort_unstable();
    println!("samples={}", samples.len());
    println!("pair_p50_us={}", pct(&samples, 50.0));
    println!("pair_p99_us={}", pct(&samples, 99.0));
    println!("pair_max_us={}", samples.last().copied().unwrap_or(0));
}

fn main() {
    let cli = Cli::parse();
    if let Cmd::Rate {
        addr,
        prefix,
        accounts,
        rate: r,
        duration,
        warmup,
        connections,
    } = cli.cmd
    {
        rate(addr, prefix, accounts, r, duration, warmup, connections);
        return;
    }
    if let Cmd::Disk { dir, count } = cli.cmd {
        disk(&dir, count);
        return;
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async move {
        match cli.cmd {
            Cmd::Rate { .. } | Cmd::Disk { .. } => unreachable!("handled above"),
            Cmd::Once { addr, path, n } => once(addr, path, n).await,
            Cmd::Start {
                daemon,
                config,
                log,
                addr,
                control,
                accounts,
                timeout,
                settle,
            } => {
                start(
                    daemon, config, log, addr, control, accounts, timeout, settle,
                )
                .await
            }
            Cmd::Forced {
                addr,
                control,
                first,
                count,
                min_valid,
            } => forced(addr, control, first, count, min_valid).await,
            Cmd::Poll {
                addr,
                control,
                accounts,
                rate,
                duration,
            } => poll(addr, control, accounts, rate, duration).await,
            Cmd::ScaleReport {
                control,
                accounts,
                lifetime,
                start_us,
                end_us,
                ratio,
                ratio_min,
            } => {
                scale_report(
                    control, accounts, lifetime, start_us, end_us, ratio, ratio_min,
                )
                .await
            }
            Cmd::Ha(cmd) => ha::run(cmd).await,
        }
    });
}
