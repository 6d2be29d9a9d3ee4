//! A real PostgreSQL server for one test: initdb in a temp dir, started with pg_ctl on a
//! free 127.0.0.1 port (as the `postgres` user when the tests run as root), stopped
//! immediately and removed when dropped, also while unwinding from a panic.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use tempfile::TempDir;

use super::process::free_port;

/// A PostgreSQL server of the test's own. Its data survive `stop`/`start_again`.
pub struct Postgres {
    dir: TempDir,
    bin: PathBuf,
    port: u16,
    running: bool,
}

impl Postgres {
    /// Initializes a cluster (trust authentication, no fsync: a test's data need not
    /// survive a power cut) and starts it.
    pub fn start() -> Postgres {
        let bin = binaries();
        let dir = tempfile::Builder::new()
            .prefix("tokend-pg-")
            .tempdir()
            .expect("temp dir for PostgreSQL");
        if as_root() {
            let (uid, gid) = (id("-u"), id("-g"));
            std::os::unix::fs::chown(dir.path(), Some(uid), Some(gid))
                .expect("chown the PostgreSQL dir to postgres");
        }
        let data = dir.path().join("data");
        let out = run(
            &bin,
            "initdb",
            &[
                "-D".as_ref(),
                data.as_os_str(),
                "-U".as_ref(),
                "postgres".as_ref(),
                "--auth-local=trust".as_ref(),
                "--auth-host=trust".as_ref(),
                "--no-sync".as_ref(),
                "--no-instructions".as_ref(),
                "-E".as_ref(),
                "UTF8".as_ref(),
            ],
        );
        assert!(out.status.success(), "initdb failed: {}", describe(&out));
        let mut pg = Postgres {
            dir,
            bin,
            port: 0,
            running: false,
        };
        // A free port can be taken by another test between the probe and the bind.
        for _ in 0..5 {
            pg.port = free_port();
            if pg.try_start() {
                return pg;
            }
        }
        panic!("PostgreSQL did not start: {}", pg.log());
    }

    /// `postgres://postgres@127.0.0.1:PORT/postgres`, TLS off.
    pub fn url(&self) -> String {
        format!(
            "postgres://postgres@127.0.0.1:{}/postgres?sslmode=disable",
            self.port
        )
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Stops the server, letting it end its sessions (`pg_ctl stop -m fast`).
    pub fn stop(&mut self) {
        self.ctl_stop("fast");
    }

    /// Starts the stopped server again, on the same port with the same data.
    pub fn start_again(&mut self) {
        assert!(!self.running, "PostgreSQL runs already");
        assert!(
            self.try_start(),
            "PostgreSQL did not start again: {}",
            self.log()
        );
    }

    pub fn restart(&mut self) {
        self.stop();
        self.start_again();
    }

    /// The server's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("server.log")
    }

    fn try_start(&mut self) -> bool {
        let options = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off -c shared_buffers=16MB -c max_connections=60",
            self.port,
            self.dir.path().display()
        );
        let data = self.dir.path().join("data");
        let log = self.log_path();
        let out = run(
            &self.bin,
            "pg_ctl",
            &[
                "start".as_ref(),
                "-w".as_ref(),
                "-t".as_ref(),
                "30".as_ref(),
                "-D".as_ref(),
                data.as_os_str(),
                "-l".as_ref(),
                log.as_os_str(),
                "-o".as_ref(),
                options.as_ref(),
            ],
        );
        self.running = out.status.success();
        self.running
    }

    fn ctl_stop(&mut self, mode: &str) {
        if !self.running {
            return;
        }
        let data = self.dir.path().join("data");
        let out = run(
            &self.bin,
            "pg_ctl",
            &[
                "stop".as_ref(),
                "-w".as_ref(),
                "-t".as_ref(),
                "30".as_ref(),
                "-m".as_ref(),
                mode.as_ref(),
                "-D".as_ref(),
                data.as_os_str(),
            ],
        );
        self.running = false;
        assert!(
            out.status.success() || std::thread::panicking(),
            "pg_ctl stop failed: {}",
            describe(&out)
        );
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        self.ctl_stop("immediate");
    }
}

/// Where initdb and pg_ctl are: on PATH, or in Debian's versioned directory.
fn binaries() -> PathBuf {
    let on_path = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .unwrap_or_default();
    let mut debian: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .map(|d| d.flatten().map(|e| e.path().join("bin")).collect())
        .unwrap_or_default();
    debian.sort();
    on_path
        .into_iter()
        .chain(debian.into_iter().rev())
        .find(|dir| dir.join("initdb").is_file() && dir.join("pg_ctl").is_file())
        .unwrap_or_else(|| {
            panic!(
                "PostgreSQL's initdb and pg_ctl were not found on PATH or in /usr/lib/postgresql/*/bin: install Debian's postgresql package (.ci/run does)"
            )
        })
}

fn as_root() -> bool {
    rustix::process::geteuid().is_root()
}

/// The numeric user or group id (`-u`/`-g`) of `postgres`.
fn id(which: &str) -> u32 {
    let out = Command::new("id")
        .args([which, "postgres"])
        .output()
        .expect("run id(1)");
    assert!(
        out.status.success(),
        "no postgres user (PostgreSQL refuses to run as root): install Debian's postgresql package (.ci/run does)"
    );
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .expect("a numeric id")
}

/// Runs a PostgreSQL program, as `postgres` when we are root (the server refuses root).
fn run(bin: &Path, program: &str, args: &[&std::ffi::OsStr]) -> Output {
    let path = bin.join(program);
    let mut cmd = if as_root() {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(&path);
        c
    } else {
        Command::new(&path)
    };
    cmd.args(args)
        .env_remove("PGDATA")
        .env_remove("PGPORT")
        .env_remove("PGHOST")
        .stdin(Stdio::null())
        .current_dir("/")
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", path.display()))
}

fn describe(out: &Output) -> String {
    format!(
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}
