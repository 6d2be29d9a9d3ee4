//! Helpers for tests that run the real `tokend` binary: the fake provider served over
//! real loopback TCP, a child process that is always killed when the test ends, and
//! bounded polling for conditions (never a sleep standing in for one).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use tokend::fake_provider::FakeProvider;
use tokio_util::sync::CancellationToken;

/// Serves `fake` on 127.0.0.1 until the returned token is cancelled (or the runtime ends).
pub async fn serve_fake(fake: &FakeProvider) -> (SocketAddr, CancellationToken) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let stop = CancellationToken::new();
    let router = fake.router();
    let until = stop.clone();
    tokio::spawn(async move {
        let _ = axum::serve(listener, router)
            .with_graceful_shutdown(until.cancelled_owned())
            .await;
    });
    (addr, stop)
}

/// A loopback port that was free a moment ago.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A running `tokend`; killed (SIGKILL) if still running when dropped.
pub struct Proc {
    pub child: Child,
    pub log: PathBuf,
}

impl Proc {
    /// Starts `tokend run --config CONFIG`, its stderr appended to `log`.
    pub fn run(config: &Path, log: &Path, rust_log: &str) -> Proc {
        let stderr = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_tokend"))
            .args(["run", "--config"])
            .arg(config)
            .env("RUST_LOG", rust_log)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .unwrap();
        Proc {
            child,
            log: log.to_path_buf(),
        }
    }

    pub fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .args([signal, &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success(), "kill {signal} failed");
    }

    /// Waits (bounded) for the process to exit and returns its exit code.
    pub async fn wait_exit(&mut self, limit: Duration) -> Option<i32> {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status.code();
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "tokend did not exit; log:\n{}",
                self.log_text()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Polls `GET {endpoint}/readyz` until 200, for at most `limit`.
pub async fn wait_ready(proc: &mut Proc, endpoint: &str, limit: Duration) {
    let client = reqwest::Client::builder().no_proxy().build().unwrap();
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        if let Ok(r) = client.get(format!("{endpoint}/readyz")).send().await
            && r.status() == 200
        {
            return;
        }
        if let Ok(Some(status)) = proc.child.try_wait() {
            panic!(
                "tokend exited ({status}) before it was ready; log:\n{}",
                proc.log_text()
            );
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "tokend not ready in {limit:?}; log:\n{}",
            proc.log_text()
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}
