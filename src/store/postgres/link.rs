//! How the PostgreSQL store reaches its server: the URL read (its password kept out of
//! every message), connections opened with TLS as the URL asks, and the shared query
//! connection that is reopened when it broke, every use of it bounded in time.

use std::collections::HashMap;
use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::{Instant, timeout_at};
use tokio_postgres::tls::MakeTlsConnect;
use tokio_postgres::types::ToSql;
use tokio_postgres::{Client, Row, Socket, Statement};
use tokio_postgres_rustls::MakeRustlsConnect;
use tokio_util::sync::{CancellationToken, DropGuard};
use tokio_util::task::TaskTracker;

use super::tls::{SslMode, client_config};
use crate::config::CaBundle;
use crate::secret::Secret;
use crate::store::StoreError;

pub(super) const BACKEND: &str = "postgres";

/// A connection's background half, which tokio-postgres hands to the caller to drive.
pub(super) type Connection =
    tokio_postgres::Connection<Socket, <MakeRustlsConnect as MakeTlsConnect<Socket>>::Stream>;

/// Where and how to connect.
pub(super) struct Target {
    config: tokio_postgres::Config,
    tls: MakeRustlsConnect,
    /// `host:port/db`: what messages name instead of the URL.
    pub(super) location: String,
    /// What the TLS settings check, in words.
    pub(super) tls_checks: String,
    /// Scrubbed from every message, in case a driver error ever quotes it.
    password: Option<Secret>,
}

impl Target {
    /// Reads the libpq URL `url`. Its `sslmode` is taken out and carried out here (the
    /// driver knows only disable/prefer/require); `ca` is the trust anchor.
    pub(super) fn new(
        url: &Secret,
        ca: Option<&CaBundle>,
        timeout: Duration,
        keepalive: Duration,
    ) -> Result<Target, StoreError> {
        // Not yet parsed: scrubbed of the URL's password as written, should the
        // parser ever quote it.
        let refuse = |detail: String| StoreError::Unavailable {
            backend: BACKEND,
            location: "(state.url)".into(),
            detail: match password_in(url.expose()) {
                Some(p) if !p.is_empty() => detail.replace(p, "***"),
                _ => detail,
            },
        };
        let (rest, mode) = take_sslmode(url.expose()).map_err(refuse)?;
        let mut config = tokio_postgres::Config::from_str(rest.expose()).map_err(|e| {
            refuse(format!(
                "state.url is not a usable libpq URL: {}",
                describe(&e)
            ))
        })?;
        let (tls, tls_checks) = client_config(mode, ca).map_err(refuse)?;
        config
            .ssl_mode(mode.negotiation())
            .connect_timeout(timeout)
            .application_name("tokend")
            // A peer that vanished (host down, partition) is noticed in about a lease.
            .keepalives(true)
            .keepalives_idle(keepalive)
            .keepalives_interval(Duration::from_secs(1))
            .keepalives_retries(3)
            .tcp_user_timeout(keepalive);
        let password = config
            .get_password()
            .map(|p| Secret::new(String::from_utf8_lossy(p).into_owned()));
        Ok(Target {
            location: location_of(&config),
            config,
            tls: MakeRustlsConnect::new(tls),
            tls_checks,
            password,
        })
    }

    /// `detail` without the URL's password, should it appear in it.
    pub(super) fn scrub(&self, detail: String) -> String {
        match &self.password {
            Some(p) if !p.expose().is_empty() => detail.replace(p.expose(), "***"),
            _ => detail,
        }
    }
}

/// The password of `scheme://user:password@host…`, as written.
fn password_in(url: &str) -> Option<&str> {
    let rest = url.split_once("://")?.1;
    let authority = rest.split(['/', '?']).next()?;
    let (userinfo, _) = authority.rsplit_once('@')?;
    Some(userinfo.split_once(':')?.1)
}

/// Splits `sslmode` (default `prefer`, as in libpq) off the URL's query string. The
/// certificate parameters of libpq are refused: they would be silently ignored.
fn take_sslmode(url: &str) -> Result<(Secret, SslMode), String> {
    let (base, query) = url.split_once('?').unwrap_or((url, ""));
    let mut mode = SslMode::Prefer;
    let mut kept = Vec::new();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        match key {
            "sslmode" => mode = SslMode::parse(value)?,
            "sslrootcert" | "sslcert" | "sslkey" | "sslpassword" | "sslcrl" | "sslcrldir" => {
                return Err(format!(
                    "state.url: tokend does not read {key}; name the CA bundle in state.ca_file (client certificates are not supported for PostgreSQL)"
                ));
            }
            _ => kept.push(pair),
        }
    }
    let rest = if kept.is_empty() {
        base.to_string()
    } else {
        format!("{base}?{}", kept.join("&"))
    };
    Ok((Secret::new(rest), mode))
}

/// `e` and its causes, `: `-separated.
pub(super) fn describe(e: &tokio_postgres::Error) -> String {
    let mut text = e.to_string();
    let mut cause = std::error::Error::source(e);
    while let Some(c) = cause {
        text.push_str(": ");
        text.push_str(&c.to_string());
        cause = c.source();
    }
    text
}

/// `host:port/db` of the first host (libpq tries them in order).
fn location_of(config: &tokio_postgres::Config) -> String {
    use tokio_postgres::config::Host;
    let host = match config.get_hosts().first() {
        Some(Host::Tcp(h)) if h.contains(':') => format!("[{h}]"),
        Some(Host::Tcp(h)) => h.clone(),
        Some(Host::Unix(path)) => path.display().to_string(),
        None => "localhost".into(),
    };
    let port = config.get_ports().first().copied().unwrap_or(5432);
    let db = config
        .get_dbname()
        .or(config.get_user())
        .unwrap_or("postgres");
    format!("{host}:{port}/{db}")
}

/// The query connection and how to make more: the store shares one connection (the
/// driver pipelines concurrent statements on it) and reopens it when it broke.
pub(super) struct Link {
    pub(super) target: Target,
    /// The bound on each use: a connect, or a statement with the connect it may need.
    pub(super) timeout: Duration,
    slot: tokio::sync::Mutex<Option<Arc<Conn>>>,
    stop: CancellationToken,
    tracker: TaskTracker,
}

/// One open connection, its prepared statements, and the guard that ends its driver.
pub(super) struct Conn {
    pub(super) client: Client,
    statements: Mutex<HashMap<String, Statement>>,
    _driver: DropGuard,
}

impl Link {
    pub(super) fn new(
        target: Target,
        timeout: Duration,
        stop: CancellationToken,
        tracker: TaskTracker,
    ) -> Link {
        Link {
            target,
            timeout,
            slot: tokio::sync::Mutex::new(None),
            stop,
            tracker,
        }
    }

    pub(super) fn unavailable(&self, detail: impl std::fmt::Display) -> StoreError {
        StoreError::Unavailable {
            backend: BACKEND,
            location: self.target.location.clone(),
            detail: self.target.scrub(detail.to_string()),
        }
    }

    /// A driver error, with its causes: the driver's own words alone ("db error",
    /// "error performing TLS handshake") would not say what went wrong.
    pub(super) fn failed(&self, e: &tokio_postgres::Error) -> StoreError {
        self.unavailable(describe(e))
    }

    fn late(&self) -> StoreError {
        self.unavailable(format!("no answer within {:?}", self.timeout))
    }

    /// A new connection, not yet driven: the caller polls the [`Connection`].
    pub(super) async fn open(&self) -> Result<(Client, Connection), StoreError> {
        let connect = self.target.config.connect(self.target.tls.clone());
        match tokio::time::timeout(self.timeout, connect).await {
            Ok(Ok(pair)) => Ok(pair),
            Ok(Err(e)) => Err(self.failed(&e)),
            Err(_) => Err(self.late()),
        }
    }

    /// A new connection of the caller's own (a transaction needs one), driven on the
    /// tracker until the guard is dropped or the store stops.
    pub(super) async fn dedicated(&self) -> Result<(Client, DropGuard), StoreError> {
        let (client, connection) = self.open().await?;
        Ok((client, self.drive(connection)))
    }

    fn drive(&self, connection: Connection) -> DropGuard {
        let stop = self.stop.child_token();
        let guard = stop.clone().drop_guard();
        self.tracker.spawn(async move {
            tokio::select! {
                _ = connection => {}
                () = stop.cancelled() => {}
            }
        });
        guard
    }

    /// The shared connection, reopened if it broke.
    async fn conn(&self) -> Result<Arc<Conn>, StoreError> {
        let mut slot = self.slot.lock().await;
        if let Some(conn) = slot.as_ref().filter(|c| !c.client.is_closed()) {
            return Ok(Arc::clone(conn));
        }
        *slot = None;
        let (client, driver) = self.dedicated().await?;
        let conn = Arc::new(Conn {
            client,
            statements: Mutex::default(),
            _driver: driver,
        });
        *slot = Some(Arc::clone(&conn));
        Ok(conn)
    }

    /// Drops `conn` from the slot (it did not answer in time): the next use reconnects.
    async fn forget(&self, conn: &Arc<Conn>) {
        let mut slot = self.slot.lock().await;
        if slot.as_ref().is_some_and(|c| Arc::ptr_eq(c, conn)) {
            *slot = None;
        }
    }

    /// Runs one statement (its own transaction) on the shared connection, within
    /// [`Link::timeout`] from now, connecting first if need be.
    pub(super) async fn query(
        &self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Vec<Row>, StoreError> {
        let deadline = Instant::now() + self.timeout;
        let conn = timeout_at(deadline, self.conn())
            .await
            .map_err(|_| self.late())??;
        match timeout_at(deadline, conn.run(sql, params)).await {
            Ok(Ok(rows)) => Ok(rows),
            Ok(Err(e)) => Err(self.failed(&e)),
            Err(_) => {
                // Hung (a server gone without a word): do not wait on it again.
                self.forget(&conn).await;
                Err(self.late())
            }
        }
    }
}

impl Conn {
    async fn run(
        &self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Vec<Row>, tokio_postgres::Error> {
        let cached = self
            .statements
            .lock()
            .expect("statement cache")
            .get(sql)
            .cloned();
        let statement = match cached {
            Some(s) => s,
            None => {
                let s = self.client.prepare(sql).await?;
                self.statements
                    .lock()
                    .expect("statement cache")
                    .insert(sql.to_string(), s.clone());
                s
            }
        };
        self.client.query(&statement, params).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target(url: &str) -> Result<Target, StoreError> {
        let t = Duration::from_secs(1);
        Target::new(&Secret::new(url), None, t, t)
    }

    #[test]
    fn the_location_names_host_port_and_database_never_the_password() {
        let t = target("postgres://u:hunter2@db.example:6543/tokens?sslmode=disable").unwrap();
        assert_eq!(t.location, "db.example:6543/tokens");
        assert_eq!(
            t.scrub("auth failed for hunter2".into()),
            "auth failed for ***"
        );
        assert_eq!(target("postgres://u@h").unwrap().location, "h:5432/u");
        assert_eq!(password_in("postgres://u:p@ss@h:1/db"), Some("p@ss"));
        assert_eq!(password_in("postgres://u@h/db?x=a:b@c"), None);
        let err = target("postgres://u:hunter2@h:notaport/db")
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("port") && !err.contains("hunter2"), "{err}");
    }

    #[test]
    fn sslmode_is_read_as_libpq_reads_it_and_certificate_files_are_refused() {
        let (rest, mode) =
            take_sslmode("postgres://h/db?application_name=x&sslmode=verify-full").unwrap();
        assert_eq!(mode, SslMode::VerifyFull);
        assert_eq!(rest.expose(), "postgres://h/db?application_name=x");
        assert_eq!(take_sslmode("postgres://h/db").unwrap().1, SslMode::Prefer);
        let err = take_sslmode("postgres://h/db?sslrootcert=/ca.pem").unwrap_err();
        assert!(err.contains("state.ca_file"), "{err}");
        let err = target("postgres://u:pw@h/db?sslmode=verify-ca")
            .err()
            .unwrap()
            .to_string();
        assert!(
            err.contains("state.ca_file") && !err.contains("pw"),
            "{err}"
        );
        let err = target("postgres://u:pw@h/db?sslmode=sometimes")
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("sslmode"), "{err}");
    }
}
