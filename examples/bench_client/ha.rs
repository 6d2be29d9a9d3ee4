//! The high-availability rows' clients (`bench/ha.sh`): a lease holder's SIGKILL timed to
//! the first token another replica commits, read from the PostgreSQL store itself; and a
//! holder's forced refresh timed to the moment each follower serves the new token.

use std::io;
use std::net::SocketAddr;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures_util::StreamExt;
use serde_json::Value;
use tokio::sync::mpsc;
use tokio_postgres::{AsyncMessage, Client, NoTls, Statement};

use super::{Conn, fetch, get_request, pct};

#[derive(clap::Subcommand)]
pub enum HaCmd {
    /// SIGKILL the replica holding `account`'s lease; print the time until another
    /// replica's commit of a new token for it lands in the store.
    HaFailover {
        /// The store, a libpq URL (never printed: it may hold a password).
        #[arg(long)]
        pg: String,
        /// The store's table prefix (`[state] prefix`).
        #[arg(long, default_value = "tokend_")]
        prefix: String,
        #[arg(long)]
        account: String,
        /// The replicas, as NODE_ID=PID, comma-separated.
        #[arg(long, value_delimiter = ',')]
        nodes: Vec<String>,
        /// Give up (and say so) after this many seconds.
        #[arg(long, default_value_t = 60.0)]
        timeout: f64,
    },
    /// Force refreshes of `account` on its holder, and time until every other replica
    /// serves each new token.
    HaPropagation {
        /// Every replica, host:port, comma-separated (the holder is found among them).
        #[arg(long, value_delimiter = ',')]
        replicas: Vec<SocketAddr>,
        #[arg(long)]
        account: String,
        #[arg(long, default_value_t = 200)]
        count: u32,
        /// Per refresh: give up waiting for a follower after this many seconds.
        #[arg(long, default_value_t = 5.0)]
        timeout: f64,
    },
    /// A replica's accounts, by index (`acct-00042` is 42): those it holds, those it
    /// follows.
    HaAccounts {
        #[arg(long)]
        addr: SocketAddr,
    },
    /// A loopback port free right now.
    FreePort,
}

pub async fn run(cmd: HaCmd) {
    match cmd {
        HaCmd::HaFailover {
            pg,
            prefix,
            account,
            nodes,
            timeout,
        } => {
            let nodes = nodes
                .iter()
                .map(|n| {
                    let (node, pid) = n.split_once('=').expect("--nodes takes NODE_ID=PID");
                    (node.to_string(), pid.parse().expect("a numeric pid"))
                })
                .collect();
            failover(&pg, &prefix, &account, nodes, timeout).await
        }
        HaCmd::HaPropagation {
            replicas,
            account,
            count,
            timeout,
        } => propagation(&replicas, &account, count, timeout).await,
        HaCmd::HaAccounts { addr } => accounts(addr).await,
        HaCmd::FreePort => {
            let port = std::net::TcpListener::bind("127.0.0.1:0")
                .and_then(|l| l.local_addr())
                .expect("a free loopback port")
                .port();
            println!("{port}");
        }
    }
}

// ---------------------------------------------------------------------------------------
// A replica's own view

/// `GET /v1/accounts`: the replica's node id, and per account the lease holder it knows.
async fn view(addr: SocketAddr) -> io::Result<(String, Vec<(String, Option<String>)>)> {
    let (status, body) = fetch(addr, "/v1/accounts").await?;
    if status != 200 {
        return Err(io::Error::other(format!("GET /v1/accounts: {status}")));
    }
    let v: Value = serde_json::from_slice(&body).map_err(io::Error::other)?;
    let node = v["node_id"].as_str().unwrap_or_default().to_string();
    let holders = v["accounts"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|a| {
            let name = a["account"].as_str().unwrap_or_default().to_string();
            (name, a["lease_holder"].as_str().map(str::to_string))
        })
        .collect();
    Ok((node, holders))
}

async fn accounts(addr: SocketAddr) {
    let (node, holders) = view(addr).await.expect("the replica's /v1/accounts");
    let index = |name: &str| name.rsplit('-').next().and_then(|n| n.parse::<u32>().ok());
    let list = |mine: bool| {
        holders
            .iter()
            .filter(|(_, h)| (h.as_deref() == Some(node.as_str())) == mine)
            .filter_map(|(a, _)| index(a))
            .map(|i| i.to_string())
            .collect::<Vec<_>>()
            .join(",")
    };
    println!("node_id={node}");
    println!("held={}", list(true));
    println!("followed={}", list(false));
}

// ---------------------------------------------------------------------------------------
// ha-failover

/// The account's row as the store has it.
struct Row {
    holder: Option<String>,
    epoch: i64,
    /// The committed access token (records are JSON when no `encryption_key` is set).
    token: Option<String>,
    /// The holder's lease left, by the database's clock.
    lease_left_ms: Option<f64>,
}

async fn read_row(client: &Client, select: &Statement, account: &str) -> Row {
    let row = client
        .query_opt(select, &[&account])
        .await
        .expect("read the account's row")
        .unwrap_or_else(|| panic!("no row for {account} in the store"));
    Row {
        holder: row.get(0),
        epoch: row.get(1),
        token: row.get(2),
        lease_left_ms: row.get(3),
    }
}

/// Listens on the store's change feed; sends the arrival time of every notification of
/// a write of `account`'s record.
async fn listen(
    pg: &str,
    prefix: &str,
    account: &str,
) -> (Client, mpsc::UnboundedReceiver<Instant>) {
    let (client, mut connection) = tokio_postgres::connect(pg, NoTls)
        .await
        .unwrap_or_else(|e| panic!("cannot connect to the PostgreSQL store: {e}"));
    let (tx, notes) = mpsc::unbounded_channel();
    let wanted = format!("record:{account}");
    tokio::spawn(async move {
        let mut messages = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
        while let Some(Ok(message)) = messages.next().await {
            if let AsyncMessage::Notification(n) = message
                && n.payload() == wanted
            {
                let _ = tx.send(Instant::now());
            }
        }
    });
    client
        .batch_execute(&format!("LISTEN \"{prefix}changes\""))
        .await
        .expect("LISTEN on the store's channel");
    (client, notes)
}

/// Waits until `account` has a holder among `nodes` with a live lease and a committed
/// token, SIGKILLs that holder, then waits for a record write whose row shows a new
/// epoch, another holder and another access token: the first token committed after the
/// failover. Timed from just before kill(2) to the arrival of that write's notification
/// (sent by PostgreSQL at commit), or to the 100 ms poll that saw it if a notification
/// was missed.
async fn failover(pg: &str, prefix: &str, account: &str, nodes: Vec<(String, i32)>, timeout: f64) {
    let (client, mut notes) = listen(pg, prefix, account).await;
    let select = client
        .prepare(&format!(
            "SELECT holder, epoch, convert_from(record, 'UTF8')::json -> 'access' ->> 'token', \
             (extract(epoch FROM lease_expires - now()) * 1000)::float8 \
             FROM \"{prefix}accounts\" WHERE account = $1"
        ))
        .await
        .expect("prepare the row's query");
    let settle_by = Instant::now() + Duration::from_secs(60);
    let (before, pid) = loop {
        let row = read_row(&client, &select, account).await;
        let pid = row
            .holder
            .as_deref()
            .and_then(|h| nodes.iter().find(|(n, _)| n == h))
            .map(|(_, pid)| *pid);
        if let Some(pid) = pid
            && row.token.is_some()
            && row.lease_left_ms.is_some_and(|l| l > 0.0)
        {
            break (row, pid);
        }
        if Instant::now() > settle_by {
            println!("failover_ms=unsettled");
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let killed = before.holder.clone().unwrap_or_default();
    let target = rustix::process::Pid::from_raw(pid).expect("a positive pid");
    let t0 = Instant::now();
    rustix::process::kill_process(target, rustix::process::Signal::KILL).expect("SIGKILL");
    println!("killed={killed}");
    println!("lease_left_ms={:.0}", before.lease_left_ms.unwrap_or(0.0));
    let deadline = tokio::time::Instant::from_std(t0 + Duration::from_secs_f64(timeout));
    loop {
        let (at, how) = tokio::select! {
            Some(at) = notes.recv() => (at, "notify"),
            () = tokio::time::sleep(Duration::from_millis(100)) => (Instant::now(), "poll"),
            () = tokio::time::sleep_until(deadline) => {
                println!("failover_ms=timeout");
                return;
            }
        };
        if at < t0 {
            continue;
        }
        let now = read_row(&client, &select, account).await;
        let taken_over = now.epoch > before.epoch && now.holder.as_deref() != Some(&killed);
        if taken_over && now.token.is_some() && now.token != before.token {
            println!("failover_ms={:.1}", (at - t0).as_secs_f64() * 1e3);
            println!("new_holder={}", now.holder.unwrap_or_default());
            println!("epochs={}->{}", before.epoch, now.epoch);
            println!("detected={how}");
            return;
        }
    }
}

// ---------------------------------------------------------------------------------------
// ha-propagation

fn access_token(body: &[u8]) -> Option<String> {
    let v: Value = serde_json::from_slice(body).ok()?;
    v["access_token"].as_str().map(str::to_string)
}

/// Polls `request` on `conn` (to `addr`) every millisecond until it serves a token
/// `wanted` accepts; returns when that answer arrived and the token, or `None` at
/// `deadline`. Not back to back: two client/follower ping-pongs would fill both cores of
/// a small machine and slow the very propagation being timed.
async fn first_served(
    (addr, conn): (SocketAddr, &mut Conn),
    request: &[u8],
    wanted: impl Fn(&str) -> bool,
    deadline: Instant,
) -> Option<(Instant, String)> {
    while Instant::now() < deadline {
        let (status, body) = match conn.roundtrip(request).await {
            Ok(answer) => answer,
            // The server may close a keep-alive connection: a new one, then go on.
            Err(_) => {
                *conn = Conn::connect(addr).await.ok()?;
                continue;
            }
        };
        if status == 200
            && let Some(token) = access_token(&body).filter(|t| wanted(t))
        {
            return Some((Instant::now(), token));
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    None
}

/// The replica among `replicas` that says it holds `account`.
async fn holder_of(replicas: &[SocketAddr], account: &str) -> Option<SocketAddr> {
    for &addr in replicas {
        let Ok((node, holders)) = view(addr).await else {
            continue;
        };
        if holders
            .iter()
            .any(|(a, h)| a == account && h.as_deref() == Some(node.as_str()))
        {
            return Some(addr);
        }
    }
    None
}

/// Per forced refresh: the latency from the holder's answer (which it sends only after
/// the fenced commit) to each follower serving the new token, signed (negative: the
/// follower served it before the answer reached the client), and from the request.
///
/// One refresh per wall-clock second: records keep the expiry in whole seconds, and a
/// follower takes a record's token as new only when its expiry differs from the one it
/// serves (`replica/follower.rs`), so two refreshes within one second would leave the
/// second unserved by followers.
async fn propagation(replicas: &[SocketAddr], account: &str, count: u32, timeout: f64) {
    let settle_by = Instant::now() + Duration::from_secs(60);
    let holder = loop {
        if let Some(h) = holder_of(replicas, account).await {
            break h;
        }
        assert!(
            Instant::now() < settle_by,
            "no replica holds {account} after 60 s"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let followers: Vec<SocketAddr> = replicas.iter().copied().filter(|a| *a != holder).collect();
    let path = format!("/v1/token/{account}");
    let refresh = format!(
        "POST /v1/accounts/{account}/refresh HTTP/1.1\r\nHost: {holder}\r\nTokend-Request: 1\r\nContent-Length: 0\r\n\r\n"
    )
    .into_bytes();
    let holder_get = get_request(holder, &path, true);
    let follower_gets: Vec<Vec<u8>> = followers
        .iter()
        .map(|f| get_request(*f, &path, true))
        .collect();
    let mut hconn = Conn::connect(holder).await.expect("connect to the holder");
    let mut fconns = Vec::new();
    for f in &followers {
        fconns.push(Conn::connect(*f).await.expect("connect to a follower"));
    }
    let limit = Duration::from_secs_f64(timeout);
    let (mut from_answer, mut from_request, mut refresh_us) = (Vec::new(), Vec::new(), Vec::new());
    let (mut failures, mut mismatched) = (0u32, 0u32);
    for _ in 0..count {
        let into_second = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .subsec_micros();
        tokio::time::sleep(Duration::from_micros(u64::from(1_010_000 - into_second))).await;
        let (_, body) = hconn
            .roundtrip(&holder_get)
            .await
            .expect("the holder's token");
        let old = access_token(&body).expect("the holder serves a token");
        // Every follower serves the current token before the next refresh starts.
        for ((c, get), f) in fconns.iter_mut().zip(&follower_gets).zip(&followers) {
            let settled = first_served((*f, c), get, |t| t == old, Instant::now() + limit).await;
            assert!(
                settled.is_some(),
                "a follower never served the holder's token"
            );
        }
        let sent = Instant::now();
        let post = async {
            let answer = hconn.roundtrip(&refresh).await;
            (answer, Instant::now())
        };
        let polls = futures_util::future::join_all(
            fconns
                .iter_mut()
                .zip(&follower_gets)
                .zip(&followers)
                .map(|((c, get), f)| first_served((*f, c), get, |t| t != old, sent + limit)),
        );
        let ((answer, answered), seen) = tokio::join!(post, polls);
        if !matches!(answer, Ok((200, _))) {
            failures += 1;
            continue;
        }
        refresh_us.push((answered - sent).as_micros() as i64);
        let (_, body) = hconn
            .roundtrip(&holder_get)
            .await
            .expect("the holder's token");
        let new = access_token(&body);
        for s in seen {
            match s {
                Some((at, token)) => {
                    mismatched += u32::from(Some(&token) != new.as_ref());
                    let signed = |t: Instant| match at.checked_duration_since(t) {
                        Some(d) => d.as_micros() as i64,
                        None => -((t - at).as_micros() as i64),
                    };
                    from_answer.push(signed(answered));
                    from_request.push(signed(sent));
                }
                None => failures += 1,
            }
        }
    }
    for v in [&mut from_answer, &mut from_request, &mut refresh_us] {
        v.sort_unstable();
    }
    let list = |a: &[SocketAddr]| {
        a.iter()
            .map(|x| x.to_string())
            .collect::<Vec<_>>()
            .join(",")
    };
    println!("holder={holder}");
    println!("followers={}", list(&followers));
    println!("samples={}", from_answer.len());
    println!("failures={failures}");
    println!("mismatched={mismatched}");
    println!(
        "before_answer={}",
        from_answer.iter().filter(|&&x| x <= 0).count()
    );
    for (name, p) in [("p50", 50.0), ("p99", 99.0)] {
        println!("{name}_us={}", pct(&from_answer, p));
        println!("request_{name}_us={}", pct(&from_request, p));
        println!("refresh_{name}_us={}", pct(&refresh_us, p));
    }
    println!("max_us={}", from_answer.last().copied().unwrap_or(0));
}
