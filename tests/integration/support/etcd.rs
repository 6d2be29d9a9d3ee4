//! Real etcd for the tests: `EtcdCluster` runs members of the Debian `etcd-server` binary
//! on free 127.0.0.1 ports in a temp dir (killed by PID and removed on drop), and
//! `TcpGate` stands between a client and a member to cut its connections on demand.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use tempfile::TempDir;
use tokend::config::{StateBackend, StateConfig};

use super::process::{POLL, free_port};

/// The longest wait for a cluster (or one restarted member) to become healthy.
const HEALTHY_TIMEOUT: Duration = Duration::from_secs(20);
/// How often `start` picks new ports after members failed to come up (a port taken
/// between picking it and etcd binding it).
const START_ATTEMPTS: usize = 3;

/// A running etcd cluster on loopback.
pub struct EtcdCluster {
    dir: TempDir,
    members: Vec<Member>,
}

struct Member {
    name: String,
    client_port: u16,
    peer_port: u16,
    child: Option<Child>,
}

impl EtcdCluster {
    /// Starts `members` members and waits (bounded) until every one is healthy.
    pub fn start(members: usize) -> EtcdCluster {
        assert!(members > 0, "a cluster needs a member");
        let found = Command::new("etcd")
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        if !found.is_ok_and(|s| s.success()) {
            panic!("no etcd binary on PATH: install Debian etcd-server (.ci/run does)");
        }
        let mut last = String::new();
        for _ in 0..START_ATTEMPTS {
            let mut cluster = EtcdCluster {
                dir: tempfile::tempdir().expect("temp dir for etcd"),
                members: (0..members)
                    .map(|i| Member {
                        name: format!("m{i}"),
                        client_port: free_port(),
                        peer_port: free_port(),
                        child: None,
                    })
                    .collect(),
            };
            for i in 0..members {
                cluster.spawn(i, "new");
            }
            match cluster.wait_healthy(0..members) {
                Ok(()) => return cluster,
                Err(why) => last = why,
            }
        }
        panic!("etcd did not become healthy in {START_ATTEMPTS} attempts: {last}");
    }

    /// The client URLs of every member started, killed ones included.
    pub fn endpoints(&self) -> Vec<String> {
        (0..self.members.len()).map(|i| self.endpoint(i)).collect()
    }

    /// The client URL of member `i`.
    pub fn endpoint(&self, i: usize) -> String {
        format!("http://127.0.0.1:{}", self.members[i].client_port)
    }

    /// The index of the current leader, waiting (bounded) until the live members have one.
    pub fn leader(&self) -> usize {
        let deadline = Instant::now() + HEALTHY_TIMEOUT;
        loop {
            let running = (0..self.members.len()).filter(|i| self.members[*i].child.is_some());
            for i in running {
                let metrics = http_get(self.members[i].client_port, "/metrics");
                if metrics
                    .lines()
                    .any(|l| l.trim() == "etcd_server_is_leader 1")
                {
                    return i;
                }
            }
            assert!(
                Instant::now() < deadline,
                "no etcd leader within {HEALTHY_TIMEOUT:?}"
            );
            std::thread::sleep(POLL);
        }
    }

    /// SIGKILLs member `i`.
    pub fn kill(&mut self, i: usize) {
        if let Some(mut child) = self.members[i].child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts member `i` again on its data dir: it rejoins the cluster. Waits (bounded)
    /// until it is healthy.
    pub fn restart(&mut self, i: usize) {
        self.kill(i);
        self.spawn(i, "existing");
        if let Err(why) = self.wait_healthy(i..i + 1) {
            panic!("etcd member {i} did not rejoin: {why}");
        }
    }

    /// Compacts the history up to the current revision (physically): a watch from
    /// before it can no longer be resumed.
    pub async fn compact(&self) {
        let live: Vec<String> = (0..self.members.len())
            .filter(|i| self.members[*i].child.is_some())
            .map(|i| self.endpoint(i))
            .collect();
        let bound = Duration::from_secs(10);
        let mut client = tokio::time::timeout(bound, etcd_client::Client::connect(&live, None))
            .await
            .expect("connect to etcd in time")
            .expect("connect to etcd");
        let revision = tokio::time::timeout(bound, client.get("compact-probe", None))
            .await
            .expect("etcd answers in time")
            .expect("read the current revision")
            .header()
            .expect("a response header")
            .revision();
        let physical = etcd_client::CompactionOptions::new().with_physical();
        tokio::time::timeout(bound, client.compact(revision, Some(physical)))
            .await
            .expect("etcd compacts in time")
            .expect("compact");
    }

    fn spawn(&mut self, i: usize, state: &str) {
        let peers: Vec<String> = self
            .members
            .iter()
            .map(|m| format!("{}=http://127.0.0.1:{}", m.name, m.peer_port))
            .collect();
        let dir = self.dir.path().to_path_buf();
        let m = &mut self.members[i];
        let client = format!("http://127.0.0.1:{}", m.client_port);
        let peer = format!("http://127.0.0.1:{}", m.peer_port);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join(format!("{}.log", m.name)))
            .expect("etcd log file");
        let mut cmd = Command::new("etcd");
        // etcd reads its flags from ETCD_* too: none may leak in from the caller.
        for (var, _) in std::env::vars_os() {
            if var.to_string_lossy().starts_with("ETCD") {
                cmd.env_remove(var);
            }
        }
        cmd.args(["--name", &m.name])
            .arg("--data-dir")
            .arg(dir.join(&m.name))
            .args(["--listen-client-urls", &client])
            .args(["--advertise-client-urls", &client])
            .args(["--listen-peer-urls", &peer])
            .args(["--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &peers.join(",")])
            .args(["--initial-cluster-state", state])
            .args([
                "--initial-cluster-token",
                &format!("tokend-test-{}", std::process::id()),
            ])
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("etcd log file"))
            .stderr(log);
        m.child = Some(cmd.spawn().expect("start etcd"));
    }

    /// Waits until each member of `which` answers /health with `true`; an error names
    /// the member that did not, with the end of its log.
    fn wait_healthy(&mut self, which: std::ops::Range<usize>) -> Result<(), String> {
        let deadline = Instant::now() + HEALTHY_TIMEOUT;
        for i in which {
            loop {
                let exited = self.members[i]
                    .child
                    .as_mut()
                    .is_none_or(|c| !matches!(c.try_wait(), Ok(None)));
                if exited || Instant::now() > deadline {
                    let why = if exited {
                        "exited"
                    } else {
                        "is not healthy in time"
                    };
                    return Err(format!(
                        "member {i} {why}; its log ends:\n{}",
                        self.log_tail(i)
                    ));
                }
                if http_get(self.members[i].client_port, "/health").contains("\"health\":\"true\"")
                {
                    break;
                }
                std::thread::sleep(POLL);
            }
        }
        Ok(())
    }

    fn log_tail(&self, i: usize) -> String {
        let path: PathBuf = self
            .dir
            .path()
            .join(format!("{}.log", self.members[i].name));
        let text = std::fs::read_to_string(path).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(15)..].join("\n")
    }
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        for i in 0..self.members.len() {
            self.kill(i);
        }
        // The temp dir goes with `self.dir`.
    }
}

/// A `[state]` for the etcd backend on `endpoints` (prefix `tokend/`, no TLS, no key).
pub fn etcd_state_config(endpoints: &[String], node_id: &str, lease_ttl: Duration) -> StateConfig {
    StateConfig {
        dir: PathBuf::new(),
        keyring: None,
        backend: StateBackend::Etcd {
            endpoints: endpoints
                .iter()
                .map(|e| url::Url::parse(e).expect("an endpoint URL"))
                .collect(),
            prefix: "tokend/".into(),
            ca: None,
            identity: None,
        },
        lease_ttl,
        node_id: node_id.into(),
    }
}

/// The body of `GET path` on 127.0.0.1:`port`, or "" when it does not answer in time.
fn http_get(port: u16, path: &str) -> String {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let Ok(mut stream) = TcpStream::connect_timeout(&addr, Duration::from_millis(500)) else {
        return String::new();
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
    let request = format!("GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n");
    if stream.write_all(request.as_bytes()).is_err() {
        return String::new();
    }
    let mut body = String::new();
    let _ = stream.read_to_string(&mut body);
    body
}

/// A TCP forwarder on 127.0.0.1 to one etcd member that can cut every connection through
/// it and refuse new ones until opened again: a client cut off from the store.
pub struct TcpGate {
    addr: SocketAddr,
    open: Arc<AtomicBool>,
    cut: tokio::sync::watch::Sender<u64>,
    accept: tokio::task::JoinHandle<()>,
}

impl TcpGate {
    /// Forwards a fresh 127.0.0.1 port to `target` (`http://127.0.0.1:PORT`).
    pub async fn start(target: &str) -> TcpGate {
        let target: SocketAddr = target
            .trim_start_matches("http://")
            .parse()
            .expect("a 127.0.0.1:PORT target");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the gate");
        let addr = listener.local_addr().expect("gate address");
        let open = Arc::new(AtomicBool::new(true));
        let (cut, _) = tokio::sync::watch::channel(0u64);
        let (gate_open, cuts) = (Arc::clone(&open), cut.clone());
        let accept = tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                if !gate_open.load(Ordering::SeqCst) {
                    continue; // dropped: refused
                }
                let mut cut = cuts.subscribe();
                tokio::spawn(async move {
                    let Ok(mut outbound) = tokio::net::TcpStream::connect(target).await else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                        _ = cut.changed() => {}
                    }
                });
            }
        });
        TcpGate {
            addr,
            open,
            cut,
            accept,
        }
    }

    /// The URL a client uses to go through the gate.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Drops every connection through the gate and refuses new ones.
    pub fn close(&self) {
        self.open.store(false, Ordering::SeqCst);
        self.cut.send_modify(|n| *n += 1);
    }

    /// Lets connections through again.
    pub fn reopen(&self) {
        self.open.store(true, Ordering::SeqCst);
    }
}

impl Drop for TcpGate {
    fn drop(&mut self) {
        self.accept.abort();
        self.cut.send_modify(|n| *n += 1);
    }
}
