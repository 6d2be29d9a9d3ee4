//! What another local user could do to a running daemon (issue 17, items 1–3), tried
//! against the real binary: churn its connections, race its Unix socket's permissions at
//! start, read its memory through a core dump or /proc. Each attack is bounded in count
//! and time, on 127.0.0.1 only.

use std::collections::BTreeSet;
use std::fs;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::support::*;

/// `sh -c 'SCRIPT; exec "$0" "$@"' PROGRAM…`, with `tokend()`'s scrubbed environment: how
/// a test gives the daemon a umask or a limit without `pre_exec` (the crate forbids
/// unsafe code). Add the program and its arguments.
fn through_sh(script: &str) -> Command {
    let base = tokend();
    let mut cmd = Command::new("sh");
    for (key, value) in base.get_envs() {
        match value {
            Some(value) => cmd.env(key, value),
            None => cmd.env_remove(key),
        };
    }
    cmd.stdin(Stdio::null())
        .arg("-c")
        .arg(format!("{script}; exec \"$0\" \"$@\""));
    cmd
}

/// A daemon started by `cmd`, logging into the setup's log.
fn spawn_daemon(setup: &Setup, mut cmd: Command) -> Daemon {
    let log = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(setup.log_path())
        .expect("open the daemon log");
    cmd.stdout(log.try_clone().expect("clone the log handle"))
        .stderr(log);
    Daemon {
        proc: ChildGuard::spawn(&mut cmd),
        base: setup.base(),
        log: setup.log_path(),
    }
}

/// A setup whose one account is the client_credentials `svc` (no refresh token to look
/// after), its provider served on loopback.
async fn svc_setup() -> (Setup, tokend::demo::fake_provider::FakeProvider) {
    let (fake, url, _) = start_provider_with_clients().await;
    let setup = Setup::new();
    setup.write_config(&[svc_account("svc", &url)]);
    (setup, fake)
}

// ---------------------------------------------------------------------------------------
// 1. Connection churn.

/// Connections the attacker keeps churning: more than the daemon's budget below.
const ATTACKERS: usize = 3000;
/// The daemon's open-file limit in the churn test: the 1,024 of the report, which leaves
/// it a budget well under `ATTACKERS`, so that eviction is what keeps consumers served.
const DAEMON_NOFILE: u32 = 1024;
/// How many token requests a consumer makes while the attack runs, one after another.
const CONSUMER_REQUESTS: usize = 10;
/// The promise: every consumer request is answered within this.
const SERVED_WITHIN: Duration = Duration::from_secs(2);

/// Raises this process's soft open-file limit to at least `want`; false if the hard limit
/// does not allow it.
fn raise_own_nofile(want: u64) -> bool {
    let limit = getrlimit(Resource::Nofile);
    if limit.current.is_none_or(|c| c >= want) {
        return true;
    }
    if limit.maximum.is_some_and(|m| m < want) {
        return false;
    }
    setrlimit(
        Resource::Nofile,
        Rlimit {
            current: Some(want),
            maximum: limit.maximum,
        },
    )
    .is_ok()
}

#[derive(Default)]
struct Churn {
    stop: AtomicBool,
    opened: AtomicU64,
    cut: AtomicU64,
}

/// One attacker connection, over and over: open, send nothing (or half a request head),
/// wait to be cut, re-open at once.
async fn churn_one(addr: SocketAddr, churn: Arc<Churn>, partial: bool) {
    while !churn.stop.load(Ordering::Relaxed) {
        let connect = tokio::net::TcpStream::connect(addr);
        let Ok(Ok(mut stream)) = tokio::time::timeout(Duration::from_secs(1), connect).await else {
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        churn.opened.fetch_add(1, Ordering::Relaxed);
        if partial {
            let _ = stream
                .write_all(b"GET /v1/token/svc HTTP/1.1\r\nHost: 127.0.0.1\r\n")
                .await;
        }
        let mut buf = [0u8; 64];
        loop {
            match tokio::time::timeout(Duration::from_millis(200), stream.read(&mut buf)).await {
                Ok(Ok(0) | Err(_)) => {
                    churn.cut.fetch_add(1, Ordering::Relaxed);
                    break;
                }
                Ok(Ok(_)) => {}
                Err(_) if churn.stop.load(Ordering::Relaxed) => return,
                Err(_) => {}
            }
        }
    }
}

/// The attack, on a runtime (one thread) of its own until `churn.stop`.
fn attack(addr: SocketAddr, churn: Arc<Churn>) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("the attacker's runtime");
        runtime.block_on(async move {
            let tasks: Vec<_> = (0..ATTACKERS)
                .map(|i| tokio::spawn(churn_one(addr, churn.clone(), i % 2 == 1)))
                .collect();
            for task in tasks {
                let _ = task.await;
            }
        });
    })
}

/// A consumer's token request on a fresh connection, as `tokend token` makes it; how
/// long it took, or what went wrong.
fn consume(addr: SocketAddr) -> Result<Duration, String> {
    let started = Instant::now();
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(10))
        .map_err(|e| format!("connect: {e}"))?;
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(|e| e.to_string())?;
    let request = format!(
        "GET /v1/token/svc HTTP/1.1\r\nHost: {addr}\r\nTokend-Request: 1\r\nConnection: close\r\n\r\n"
    );
    stream
        .write_all(request.as_bytes())
        .map_err(|e| format!("write: {e}"))?;
    let mut answer = String::new();
    stream
        .read_to_string(&mut answer)
        .map_err(|e| format!("read: {e}"))?;
    if !answer.starts_with("HTTP/1.1 200") || !answer.contains("access_token") {
        return Err(format!("answer: {answer:.80}"));
    }
    Ok(started.elapsed())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_churn_does_not_starve_consumers() {
    if !raise_own_nofile(ATTACKERS as u64 + 1024) {
        eprintln!("skipped: this process may not open {ATTACKERS} connections (RLIMIT_NOFILE)");
        return;
    }
    let (setup, _fake) = svc_setup().await;
    let mut cmd = through_sh(&format!("ulimit -n {DAEMON_NOFILE}"));
    cmd.arg(env!("CARGO_BIN_EXE_tokend"))
        .args(["run", "--config"])
        .arg(setup.config_path());
    let mut daemon = spawn_daemon(&setup, cmd);
    daemon.wait_ready(&http_client()).await;
    let addr: SocketAddr = format!("127.0.0.1:{}", setup.port).parse().unwrap();

    let churn = Arc::new(Churn::default());
    let attacker = attack(addr, churn.clone());
    // In full swing once every attacker connection has been opened (a daemon that
    // cannot keep up may never let them all in: then the consumers tell).
    let deadline = Instant::now() + Duration::from_secs(5);
    while churn.opened.load(Ordering::Relaxed) < ATTACKERS as u64 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let cut_before = churn.cut.load(Ordering::Relaxed);
    let served = tokio::task::spawn_blocking(move || {
        let mut served = Vec::new();
        while served.len() < CONSUMER_REQUESTS {
            let result = consume(addr);
            let failed = result.as_ref().map_or(true, |took| *took >= SERVED_WITHIN);
            served.push(result);
            if failed {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        served
    })
    .await
    .unwrap();
    let cut_during = churn.cut.load(Ordering::Relaxed) - cut_before;
    churn.stop.store(true, Ordering::Relaxed);
    attacker.join().expect("the attacker's thread");

    eprintln!(
        "consumer requests under attack: {served:?}; attacker: {} opened, {cut_during} cut meanwhile",
        churn.opened.load(Ordering::Relaxed),
    );
    for (i, result) in served.iter().enumerate() {
        match result {
            Ok(took) => assert!(
                *took < SERVED_WITHIN,
                "request {i} took {took:?}; log:\n{}",
                daemon.log()
            ),
            Err(e) => panic!("request {i} failed: {e}; log:\n{}", daemon.log()),
        }
    }
    // It was churn, not a standing crowd: the daemon kept cutting the attacker's
    // connections (more of them than its budget) while it served.
    assert!(
        cut_during > u64::from(DAEMON_NOFILE),
        "only {cut_during} attacker connections were cut"
    );
    assert!(daemon.stop().await.success(), "log:\n{}", daemon.log());
}

// ---------------------------------------------------------------------------------------
// 2. The Unix socket's permissions at start.

/// How many times the daemon is started under umask 000.
const STARTS: usize = 3;

/// Stats `path` as fast as it can until `stop`; the modes it saw (as octal text) and how
/// many times it saw the file at all.
fn watch_mode(
    path: PathBuf,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<(BTreeSet<String>, u64)> {
    std::thread::spawn(move || {
        let (mut modes, mut seen) = (BTreeSet::new(), 0);
        while !stop.load(Ordering::Relaxed) {
            if let Ok(meta) = fs::symlink_metadata(&path) {
                seen += 1;
                modes.insert(format!("{:o}", meta.permissions().mode() & 0o7777));
            }
        }
        (modes, seen)
    })
}

/// The name /etc/group gives `gid`.
fn group_name(gid: u32) -> Option<String> {
    let groups = fs::read_to_string("/etc/group").ok()?;
    groups.lines().find_map(|line| {
        let fields: Vec<&str> = line.split(':').collect();
        (fields.get(2)? == &gid.to_string().as_str()).then(|| fields[0].to_string())
    })
}

fn entries(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(dir)
        .expect("read the socket's directory")
        .map(|e| {
            e.expect("dir entry")
                .file_name()
                .to_string_lossy()
                .into_owned()
        })
        .collect();
    names.sort();
    names
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_umask_000_the_socket_never_appears_with_wider_permissions() {
    let (setup, _fake) = svc_setup().await;
    let sockets = setup.dir.path().join("run");
    fs::create_dir(&sockets).unwrap();
    let socket = sockets.join("tokend.sock");
    let gid = rustix::process::getegid().as_raw();
    // By name, as an operator writes it (the name is looked up in /etc/group at start).
    let group = group_name(gid).unwrap_or_else(|| gid.to_string());
    let config = fs::read_to_string(setup.config_path()).unwrap().replacen(
        &format!("listen = [\"127.0.0.1:{}\"]", setup.port),
        &format!(
            "listen = [\"127.0.0.1:{}\", \"unix:{}\"]\nsocket_mode = \"0660\"\nsocket_group = \"{group}\"",
            setup.port,
            socket.display()
        ),
        1,
    );
    fs::write(setup.config_path(), config).unwrap();

    let (mut modes, mut seen) = (BTreeSet::new(), 0);
    for start in 0..STARTS {
        let stop = Arc::new(AtomicBool::new(false));
        let watcher = watch_mode(socket.clone(), stop.clone());
        let mut cmd = through_sh("umask 000");
        cmd.arg(env!("CARGO_BIN_EXE_tokend"))
            .args(["run", "--config"])
            .arg(setup.config_path());
        let mut daemon = spawn_daemon(&setup, cmd);
        daemon.wait_ready(&http_client()).await;
        let meta = fs::symlink_metadata(&socket).expect("the socket exists once ready");
        assert!(meta.file_type().is_socket());
        assert_eq!(
            meta.permissions().mode() & 0o7777,
            0o660,
            "the configured mode"
        );
        assert_eq!(meta.gid(), gid, "the configured group");
        assert_eq!(
            entries(&sockets),
            ["tokend.sock"],
            "start {start}: nothing but the socket is left beside it"
        );
        assert!(daemon.stop().await.success(), "log:\n{}", daemon.log());
        stop.store(true, Ordering::Relaxed);
        let (seen_modes, times) = watcher.join().unwrap();
        modes.extend(seen_modes);
        seen += times;
    }
    // A watcher starved of CPU the whole time would prove nothing.
    assert!(seen > 0, "the watcher never saw the socket");
    let wider: Vec<_> = modes
        .iter()
        .filter(|m| u32::from_str_radix(m, 8).unwrap() & !0o660 != 0)
        .collect();
    assert!(
        wider.is_empty(),
        "modes seen during {STARTS} starts: {modes:?}"
    );
}

// ---------------------------------------------------------------------------------------
// 3. Core dumps and /proc/PID/mem.

/// The soft and hard "Max core file size" of `pid`, as /proc/PID/limits shows them.
fn core_limit(pid: u32) -> (String, String) {
    let limits = fs::read_to_string(format!("/proc/{pid}/limits")).expect("read /proc/PID/limits");
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max core file size"))
        .expect("a core file size line");
    let mut fields = line["Max core file size".len()..].split_whitespace();
    (
        fields.next().unwrap().to_string(),
        fields.next().unwrap().to_string(),
    )
}

/// Who owns /proc/PID/mem: the process's uid while it is dumpable, root once it is not
/// (proc(5)); and the process's real uid from /proc/PID/status.
fn proc_owner_and_uid(pid: u32) -> (u32, u32) {
    let owner = fs::metadata(format!("/proc/{pid}/mem"))
        .expect("stat /proc/PID/mem")
        .uid();
    let status = fs::read_to_string(format!("/proc/{pid}/status")).expect("read /proc/PID/status");
    let uid = status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|u| u.parse().ok())
        .expect("a Uid line");
    (owner, uid)
}

/// An unprivileged uid for the daemon when the test runs as root (the owner of
/// /proc/PID/mem tells dumpability apart only for a non-root process).
const NOBODY: u32 = 65534;

fn chown_tree(path: &Path, uid: u32) {
    std::os::unix::fs::lchown(path, Some(uid), Some(uid)).expect("chown");
    if path.is_dir() {
        for entry in fs::read_dir(path).expect("read dir") {
            chown_tree(&entry.expect("dir entry").path(), uid);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_daemon_leaves_no_core_dump_and_no_memory_to_read() {
    let (setup, _fake) = svc_setup().await;
    let root = rustix::process::geteuid().is_root();
    let setpriv = Path::new("/usr/bin/setpriv").exists();
    // Started with core dumps allowed, as a shell with `ulimit -c unlimited` would.
    let mut cmd = through_sh("ulimit -c unlimited 2>/dev/null");
    let as_nobody = [
        "--reuid",
        "65534",
        "--regid",
        "65534",
        "--clear-groups",
        "--",
    ];
    if root && setpriv {
        chown_tree(setup.dir.path(), NOBODY);
        cmd.arg("/usr/bin/setpriv").args(as_nobody);
    }
    cmd.arg(env!("CARGO_BIN_EXE_tokend"))
        .args(["run", "--config"])
        .arg(setup.config_path());
    let mut daemon = spawn_daemon(&setup, cmd);
    daemon.wait_ready(&http_client()).await;
    let pid = daemon.proc.pid();

    assert_eq!(core_limit(pid), ("0".into(), "0".into()), "RLIMIT_CORE");
    let (owner, uid) = proc_owner_and_uid(pid);
    if uid == 0 {
        eprintln!("dumpability not checked: the daemon runs as root and setpriv is missing");
    } else {
        // The probe tells the two apart: a dumpable process of the same uid owns its
        // /proc/PID/mem.
        let mut control = if root {
            Command::new("/usr/bin/setpriv")
                .args(as_nobody)
                .args(["sleep", "10"])
                .stdin(Stdio::null())
                .spawn()
        } else {
            Command::new("sleep").arg("10").stdin(Stdio::null()).spawn()
        }
        .map(|child| ChildGuard {
            child,
            what: "sleep".into(),
        })
        .expect("spawn the control process");
        // Generous: a loaded 2-core machine (the whole suite at once) can take seconds.
        let deadline = Instant::now() + Duration::from_secs(20);
        // setpriv starts as root and drops to the uid before it runs sleep; between the
        // two the kernel keeps it undumpable (owned by root), so wait for the exec too:
        // what counts is that the probe sees a dumpable process of this uid as its own.
        while proc_owner_and_uid(control.pid()) != (uid, uid) {
            assert!(
                Instant::now() < deadline,
                "the control never became a dumpable process of uid {uid}: {:?}",
                proc_owner_and_uid(control.pid())
            );
            tokio::time::sleep(POLL).await;
        }
        control.signal("KILL");
        assert_eq!(
            owner, 0,
            "/proc/{pid}/mem is owned by root: the daemon (uid {uid}) is not dumpable"
        );
    }
    assert!(daemon.stop().await.success(), "log:\n{}", daemon.log());
}
