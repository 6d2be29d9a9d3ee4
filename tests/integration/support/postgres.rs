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
    /// Serves TLS too, with a certificate for `localhost` signed by a CA of its own.
    tls: bool,
}

impl Postgres {
    /// Initializes a cluster (trust authentication, no fsync: a test's data need not
    /// survive a power cut) and starts it.
    pub fn start() -> Postgres {
        Postgres::init(false)
    }

    /// Like `start`, also serving TLS with a certificate for the name `localhost` (not
    /// for 127.0.0.1), signed by a test CA: see [`Postgres::ca_pem`].
    pub fn start_tls() -> Postgres {
        Postgres::init(true)
    }

    /// The test CA (PEM) that signed the server's certificate.
    pub fn ca_pem(&self) -> Vec<u8> {
        std::fs::read(self.dir.path().join("ca.pem")).expect("a TLS server's CA")
    }

    fn init(tls: bool) -> Postgres {
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
        if tls {
            make_certificates(dir.path());
        }
        let mut pg = Postgres {
            dir,
            bin,
            port: 0,
            running: false,
            tls,
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

    /// `postgres://postgres@127.0.0.1:PORT/postgres` (trust authentication: no password).
    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
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
        let dir = self.dir.path().display();
        let mut options = format!(
            "-p {} -k {dir} -c listen_addresses=127.0.0.1 -c fsync=off -c shared_buffers=16MB -c max_connections=60",
            self.port,
        );
        if self.tls {
            options.push_str(&format!(
                " -c ssl=on -c ssl_cert_file={dir}/server.pem -c ssl_key_file={dir}/server.key"
            ));
        }
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

/// A CA and a server certificate for `localhost` it signed, made with openssl(1) (which
/// Debian's postgresql package pulls in), in `dir`; the key is the server's to read.
fn make_certificates(dir: &Path) {
    let openssl = |args: &[&str]| {
        let out = Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .stdin(Stdio::null())
            .output()
            .expect("run openssl(1) (Debian's postgresql package pulls it in)");
        assert!(out.status.success(), "openssl {args:?}: {}", describe(&out));
    };
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
    ];
    openssl(
        &[
            &["req", "-x509"][..],
            &ec,
            &["-keyout", "ca.key", "-out", "ca.pem", "-days", "2"],
            &["-subj", "/CN=tokend test CA"],
            &["-addext", "basicConstraints=critical,CA:TRUE"],
            &["-addext", "keyUsage=critical,keyCertSign"],
        ]
        .concat(),
    );
    openssl(
        &[
            &["req"][..],
            &ec,
            &[
                "-keyout",
                "server.key",
                "-out",
                "server.csr",
                "-subj",
                "/CN=localhost",
            ],
        ]
        .concat(),
    );
    std::fs::write(
        dir.join("server.ext"),
        "subjectAltName=DNS:localhost\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n",
    )
    .expect("write the certificate's extensions");
    openssl(&[
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "server.pem",
        "-days",
        "2",
        "-extfile",
        "server.ext",
    ]);
    // The server refuses a key that others may read, or that is not its user's.
    let key = dir.join("server.key");
    std::fs::set_permissions(&key, std::os::unix::fs::PermissionsExt::from_mode(0o600))
        .expect("chmod the server key");
    if as_root() {
        std::os::unix::fs::chown(&key, Some(id("-u")), Some(id("-g")))
            .expect("chown the server key");
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
