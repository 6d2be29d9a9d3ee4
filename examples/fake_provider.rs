//! The benchmark's OAuth provider: `tokend::demo::fake_provider::FakeProvider` served on loopback
//! as a standalone process, with N registered clients (one per account, `acct-00000` …),
//! a tokend config for those N accounts, and counters the benchmark reads.
//!
//! Two listeners:
//! - the provider (`POST /token`): every accepted TCP connection and every token request
//!   is recorded (account, arrival time, handling time, status);
//! - the control port: `GET /stats`, `GET /events` (CSV), `GET /valid?token=…`,
//!   `POST /lifetime?secs=N`. It is separate so the benchmark's own queries never count
//!   as connections to the provider.
//!
//! With `--persist`, a token is minted for every account (in-process, not counted) and
//! saved through `tokend::store::FileStore`, as a daemon that ran before would have left
//! it; the config then carries no seed refresh tokens.
//!
//! When everything is ready the addresses are written to `--addr-file` as `key=value`
//! lines (`provider`, `control`, `daemon`).
//!
//! ```text
//! cargo run --release --example fake_provider -- --accounts 100 --lifetime 60 \
//!     --config-out run/tokend.toml --state-dir run/state --addr-file run/addrs
//! ```

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::body::Body;
use axum::extract::{Query, Request, State};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::serve::ListenerExt;
use axum::{Json, Router};
use clap::Parser;
use serde::Deserialize;
use serde_json::{Value, json};
use tokend::clock::Clock;
use tokend::config::AccountName;
use tokend::demo::fake_provider::{ClientSpec, FakeProvider};
use tokend::secret::Secret;
use tokend::store::{AccessToken, FileStore, State as StoredState, Store};
use tokio::net::TcpListener;
use tower::ServiceExt;

#[derive(Parser, Debug)]
#[command(about = "Fake OAuth provider for tokend's benchmarks")]
struct Args {
    /// Provider listen address (port 0 picks one).
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: SocketAddr,
    /// Control (stats) listen address.
    #[arg(long, default_value = "127.0.0.1:0")]
    control: SocketAddr,
    /// Number of accounts (one registered client each).
    #[arg(long, default_value_t = 10)]
    accounts: usize,
    /// Lifetime of the access tokens the provider issues, in seconds.
    #[arg(long, default_value_t = 60)]
    lifetime: u64,
    /// `refresh_token` (rotating, seeds minted here) or `client_credentials`.
    #[arg(long, default_value = "refresh_token")]
    grant: String,
    /// Where to write the tokend config.
    #[arg(long)]
    config_out: PathBuf,
    /// The daemon's state directory (written into the config).
    #[arg(long)]
    state_dir: PathBuf,
    /// The daemon's listen address; default: a loopback port free at start.
    #[arg(long)]
    daemon_listen: Option<SocketAddr>,
    /// Pre-populate the state dir with a valid token for every account.
    #[arg(long)]
    persist: bool,
    /// Lifetime of the persisted tokens, in seconds.
    #[arg(long, default_value_t = 3600)]
    persist_lifetime: u64,
    /// Delay before each answer, in milliseconds.
    #[arg(long, default_value_t = 0)]
    latency_ms: u64,
    /// Extra lines appended to the config's `[refresh]` table (e.g. `min_interval = "1s"`).
    #[arg(long)]
    refresh_extra: Vec<String>,
    /// Where to write `provider=`, `control=` and `daemon=` lines once ready.
    #[arg(long)]
    addr_file: PathBuf,
}

/// One token request as the provider saw it.
#[derive(Clone, Copy)]
struct Event {
    account: u32,
    arrival_us: u64,
    handle_us: u32,
    status: u16,
}

#[derive(Clone)]
struct Recorder {
    fake: FakeProvider,
    events: Arc<Mutex<Vec<Event>>>,
    connections: Arc<AtomicU64>,
    /// Accepted connections per Unix second.
    connection_seconds: Arc<Mutex<std::collections::BTreeMap<u64, u64>>>,
    started: SystemTime,
}

const PREFIX: &str = "acct-";

fn account_name(i: usize) -> String {
    format!("{PREFIX}{i:05}")
}

fn unix_us(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).unwrap_or_default().as_micros() as u64
}

/// Records every token request: which account (its client_id), when, how long the
/// provider took to answer (body read + `FakeProvider` work + serialization), status.
async fn record(State(rec): State<Recorder>, request: Request, next: Next) -> Response {
    let arrival = SystemTime::now();
    let start = Instant::now();
    let (parts, body) = request.into_parts();
    let bytes = match axum::body::to_bytes(body, 1 << 20).await {
        Ok(b) => b,
        Err(_) => return (axum::http::StatusCode::BAD_REQUEST, "body").into_response(),
    };
    let account = form_urlencoded::parse(&bytes)
        .find(|(k, _)| k == "client_id")
        .and_then(|(_, v)| v.strip_prefix(PREFIX).and_then(|n| n.parse::<u32>().ok()))
        .unwrap_or(u32::MAX);
    let response = next
        .run(Request::from_parts(parts, Body::from(bytes)))
        .await;
    let handle_us = start.elapsed().as_micros().min(u32::MAX as u128) as u32;
    rec.events.lock().unwrap().push(Event {
        account,
        arrival_us: unix_us(arrival),
        handle_us,
        status: response.status().as_u16(),
    });
    response
}

fn rss_kb() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

async fn stats(State(rec): State<Recorder>) -> Json<Value> {
    let counts = rec.fake.counts();
    let (requests, ok, per_second, max_handle_us) = {
        let events = rec.events.lock().unwrap();
        let mut per_second: std::collections::BTreeMap<u64, u64> = Default::default();
        for e in events.iter() {
            *per_second.entry(e.arrival_us / 1_000_000).or_default() += 1;
        }
        let ok = events.iter().filter(|e| e.status == 200).count();
        let max = events.iter().map(|e| e.handle_us).max().unwrap_or(0);
        (events.len(), ok, per_second, max)
    };
    let minted = rec.fake.minted().len();
    let connection_seconds: Vec<Value> = rec
        .connection_seconds
        .lock()
        .unwrap()
        .iter()
        .map(|(s, n)| json!([s, n]))
        .collect();
    Json(json!({
        "token_requests": counts.token_requests,
        "refresh_grants": counts.refresh_grants,
        "client_credentials_grants": counts.client_credentials_grants,
        "issued": counts.issued,
        "rejected": counts.rejected,
        "recorded_requests": requests,
        "recorded_ok": ok,
        "max_handle_us": max_handle_us,
        "connections": rec.connections.load(Ordering::Relaxed),
        "minted_tokens": minted,
        "rss_kb": rss_kb(),
        "uptime_s": rec.started.elapsed().unwrap_or_default().as_secs(),
        "per_second": per_second.into_iter().map(|(s, n)| json!([s, n])).collect::<Vec<_>>(),
        "connections_per_second": connection_seconds,
    }))
}

/// `account,arrival_us,handle_us,status` per token request, in arrival order.
async fn events(State(rec): State<Recorder>) -> String {
    let events = rec.events.lock().unwrap().clone();
    let mut out = String::with_capacity(events.len() * 36);
    out.push_str("account,arrival_us,handle_us,status\n");
    for e in events {
        out.push_str(&format!(
            "{},{},{},{}\n",
            e.account, e.arrival_us, e.handle_us, e.status
        ));
    }
    out
}

#[derive(Deserialize)]
struct TokenParam {
    token: String,
}

/// Whether an access token is valid right now, in the provider's own judgement.
async fn valid(State(rec): State<Recorder>, Query(q): Query<TokenParam>) -> &'static str {
    if rec.fake.is_valid_access_token(&q.token) {
        "1"
    } else {
        "0"
    }
}

#[derive(Deserialize)]
struct Secs {
    secs: u64,
}

async fn set_lifetime(State(rec): State<Recorder>, Query(q): Query<Secs>) -> &'static str {
    rec.fake.set_lifetime(Duration::from_secs(q.secs));
    "ok"
}

fn free_port() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free loopback port")
}

/// Gets a token for account `i` through the provider's router in-process (no socket, not
/// recorded) and turns it into the state a daemon would have persisted.
async fn mint_state(
    router: Router,
    i: usize,
    grant: &str,
    seed: Option<&str>,
) -> Result<StoredState, String> {
    let name = account_name(i);
    let body = {
        let mut body = form_urlencoded::Serializer::new(String::new());
        body.append_pair("grant_type", grant)
            .append_pair("client_id", &name)
            .append_pair("client_secret", &format!("secret-{name}"));
        if let Some(rt) = seed {
            body.append_pair("refresh_token", rt);
        }
        body.finish()
    };
    let request = axum::http::Request::post("/token")
        .header("content-type", "application/x-www-form-urlencoded")
        .body(Body::from(body))
        .map_err(|e| e.to_string())?;
    let response = router.oneshot(request).await.map_err(|e| e.to_string())?;
    let bytes = axum::body::to_bytes(response.into_body(), 1 << 20)
        .await
        .map_err(|e| e.to_string())?;
    let v: Value = serde_json::from_slice(&bytes).map_err(|e| e.to_string())?;
    let access = v["access_token"].as_str().ok_or("no access_token")?;
    let now = SystemTime::now();
    let lifetime = match &v["expires_in"] {
        Value::Number(n) => n.as_u64().unwrap_or(0),
        Value::String(s) => s.parse().unwrap_or(0),
        _ => 0,
    };
    Ok(StoredState {
        refresh_token: v["refresh_token"].as_str().map(Secret::new),
        seed_fingerprint: None,
        refresh_token_issued_at: Some(now),
        access: Some(AccessToken {
            token: Secret::new(access),
            token_type: "Bearer".into(),
            expires_at: now + Duration::from_secs(lifetime),
            scope: None,
            issued_at: now,
        }),
        last_refresh: Some(now),
        // Fields added to the state later keep their defaults.
        ..StoredState::default()
    })
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    let rotating = match args.grant.as_str() {
        "refresh_token" => true,
        "client_credentials" => false,
        other => panic!("--grant must be refresh_token or client_credentials, not {other}"),
    };
    let fake = FakeProvider::new(Duration::from_secs(args.lifetime), Clock::system());
    if args.latency_ms > 0 {
        fake.set_latency(Duration::from_millis(args.latency_ms));
    }
    let mut seeds = Vec::with_capacity(args.accounts);
    for i in 0..args.accounts {
        let name = account_name(i);
        let secret = format!("secret-{name}");
        if rotating {
            fake.register(ClientSpec::zywave(&name, &secret));
            seeds.push(Some(fake.grant_refresh_token(&name, None)));
        } else {
            fake.register(ClientSpec::generic_client_credentials(&name, &secret));
            seeds.push(None);
        }
    }

    if args.persist {
        fake.set_lifetime(Duration::from_secs(args.persist_lifetime));
        let store = FileStore::open(&args.state_dir).expect("open the state dir");
        let router = fake.router();
        let mut tasks = tokio::task::JoinSet::new();
        let sem = Arc::new(tokio::sync::Semaphore::new(64));
        for (i, seed) in seeds.iter().enumerate() {
            let router = router.clone();
            let store = store.clone();
            let grant = args.grant.clone();
            let seed = seed.clone();
            let permit = sem.clone().acquire_owned().await.expect("semaphore");
            tasks.spawn(async move {
                let state = mint_state(router, i, &grant, seed.as_deref())
                    .await
                    .unwrap_or_else(|e| panic!("minting account {i}: {e}"));
                let name = AccountName::parse(&account_name(i)).expect("valid name");
                store.save(&name, &state).await.expect("save state");
                drop(permit);
            });
        }
        while let Some(r) = tasks.join_next().await {
            r.expect("persist task");
        }
        drop(store);
        fake.set_lifetime(Duration::from_secs(args.lifetime));
    }

    let daemon = args.daemon_listen.unwrap_or_else(free_port);
    let listener = TcpListener::bind(args.listen).await.expect("bind provider");
    let provider_addr = listener.local_addr().expect("provider address");
    let control_listener = TcpListener::bind(args.control).await.expect("bind control");
    let control_addr = control_listener.local_addr().expect("control address");

    // The config: one account per client; secrets are throwaway literals.
    let mut config = format!(
        "# Written by examples/fake_provider.rs for a benchmark run.\n[server]\nlisten = [\"{daemon}\"]\n\n[state]\ndir = \"{}\"\n\n[refresh]\n",
        args.state_dir.display()
    );
    for line in &args.refresh_extra {
        config.push_str(line);
        config.push('\n');
    }
    for (i, seed) in seeds.iter().enumerate() {
        let name = account_name(i);
        config.push_str(&format!(
            "\n[accounts.{name}]\ngrant = \"{}\"\ntoken_url = \"http://{provider_addr}/token\"\nclient_id = \"{name}\"\nclient_secret = \"secret-{name}\"\n",
            args.grant
        ));
        if let Some(seed) = seed.as_ref().filter(|_| !args.persist) {
            config.push_str(&format!("refresh_token = \"{seed}\"\n"));
        }
    }
    std::fs::write(&args.config_out, config).expect("write the config");
    {
        use std::os::unix::fs::PermissionsExt;
        let _ = std::fs::set_permissions(&args.config_out, std::fs::Permissions::from_mode(0o600));
    }

    let rec = Recorder {
        fake: fake.clone(),
        events: Arc::new(Mutex::new(Vec::with_capacity(args.accounts * 16))),
        connections: Arc::new(AtomicU64::new(0)),
        connection_seconds: Default::default(),
        started: SystemTime::now(),
    };
    let provider_router = fake
        .router()
        .layer(middleware::from_fn_with_state(rec.clone(), record));
    let control_router = Router::new()
        .route("/stats", get(stats))
        .route("/events", get(events))
        .route("/valid", get(valid))
        .route("/lifetime", post(set_lifetime))
        .with_state(rec.clone());

    let counter = rec.connections.clone();
    let per_second = rec.connection_seconds.clone();
    let listener = listener.tap_io(move |_| {
        counter.fetch_add(1, Ordering::Relaxed);
        let second = unix_us(SystemTime::now()) / 1_000_000;
        *per_second.lock().unwrap().entry(second).or_default() += 1;
    });
    let provider = tokio::spawn(async move { axum::serve(listener, provider_router).await });
    let control = tokio::spawn(async move { axum::serve(control_listener, control_router).await });

    let tmp = args.addr_file.with_extension("tmp");
    std::fs::write(
        &tmp,
        format!(
            "provider=http://{provider_addr}\ncontrol=http://{control_addr}\ndaemon=http://{daemon}\n"
        ),
    )
    .expect("write the address file");
    std::fs::rename(&tmp, &args.addr_file).expect("publish the address file");

    tokio::select! {
        r = provider => eprintln!("provider server ended: {r:?}"),
        r = control => eprintln!("control server ended: {r:?}"),
        _ = tokio::signal::ctrl_c() => {}
    }
}
