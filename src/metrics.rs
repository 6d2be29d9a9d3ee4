//! Prometheus metrics: the metric names, the process-wide recorder and the `/metrics`
//! rendering. Per-request paths use pre-registered handles; gauges that are functions of
//! time (seconds until expiry, token age) are computed at scrape time.

use std::sync::{OnceLock, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use metrics::{
    Counter, Histogram, Unit, counter, describe_counter, describe_gauge, describe_histogram, gauge,
    histogram,
};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

pub const REFRESH_ATTEMPTS: &str = "tokend_refresh_attempts_total";
pub const REFRESH_DURATION: &str = "tokend_refresh_duration_seconds";
pub const TOKEN_EXPIRES_IN: &str = "tokend_token_expires_in_seconds";
pub const LAST_REFRESH: &str = "tokend_last_refresh_timestamp_seconds";
pub const REFRESH_TOKEN_AGE: &str = "tokend_refresh_token_age_seconds";
pub const TOKEN_READS: &str = "tokend_token_reads_total";
pub const PERSIST_FAILURES: &str = "tokend_persist_failures_total";
pub const HTTP_REQUESTS: &str = "tokend_http_requests_total";
pub const ACCOUNT_STATE: &str = "tokend_account_state";
pub const LEASE_HELD: &str = "tokend_lease_held";
pub const LEASE_ACQUISITIONS: &str = "tokend_lease_acquisitions_total";
pub const FENCED_WRITES_REJECTED: &str = "tokend_fenced_writes_rejected_total";
pub const STORE_UP: &str = "tokend_store_up";
pub const PROXY_REQUESTS: &str = "tokend_proxy_requests_total";
pub const PROXY_DURATION: &str = "tokend_proxy_request_duration_seconds";
/// Prometheus's own names for the same thing (`prometheus_config_last_reload_*`).
pub const CONFIG_RELOAD_SUCCESSFUL: &str = "tokend_config_last_reload_successful";
pub const CONFIG_RELOAD_SUCCESS_TIME: &str = "tokend_config_last_reload_success_timestamp_seconds";

/// The process-wide recorder, installed on first use. Several daemons in one process (the
/// tests) share it; their accounts are told apart by the `account` label.
pub fn handle() -> &'static PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE.get_or_init(|| {
        let recorder = PrometheusBuilder::new()
            .set_buckets_for_metric(
                Matcher::Full(REFRESH_DURATION.to_string()),
                &[
                    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
                ],
            )
            .expect("bucket list is not empty")
            .set_buckets_for_metric(
                Matcher::Full(PROXY_DURATION.to_string()),
                &[
                    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
                    30.0, 60.0,
                ],
            )
            .expect("bucket list is not empty")
            .build_recorder();
        let handle = recorder.handle();
        // Another recorder may already be installed (an embedding program's); then this
        // handle renders only what is recorded through it, which is nothing.
        let _ = metrics::set_global_recorder(recorder);
        describe();
        handle
    })
}

fn describe() {
    describe_counter!(
        REFRESH_ATTEMPTS,
        "Token refresh attempts by account and outcome."
    );
    describe_histogram!(
        REFRESH_DURATION,
        Unit::Seconds,
        "Time taken by token requests to the provider."
    );
    describe_counter!(
        TOKEN_READS,
        "Tokens served, by account (and consumer, with server.metrics_consumer_labels)."
    );
    describe_counter!(PERSIST_FAILURES, "Failed writes of an account's state.");
    describe_counter!(HTTP_REQUESTS, "HTTP API requests by route and status.");
    describe_counter!(
        LEASE_ACQUISITIONS,
        "Times this replica took an account's refresh lease."
    );
    describe_counter!(
        FENCED_WRITES_REJECTED,
        "Writes of an account's record refused because this replica's lease was no longer current."
    );
    describe_gauge!(
        STORE_UP,
        "1 when the state store answered this replica's last request, 0 when it did not."
    );
    describe_counter!(
        PROXY_REQUESTS,
        "Requests forwarded by /proxy/{account}/..., by account and the status answered (the upstream's, or tokend's own 502, 503, 504)."
    );
    describe_histogram!(
        PROXY_DURATION,
        Unit::Seconds,
        "Time from a proxied request to its answer's headers, retry included, by account."
    );
    describe_gauge!(
        CONFIG_RELOAD_SUCCESSFUL,
        "1 when the last config (re)load was applied, 0 when it was refused."
    );
    describe_gauge!(
        CONFIG_RELOAD_SUCCESS_TIME,
        Unit::Seconds,
        "Unix time of the last config (re)load that was applied (the start, if none)."
    );
}

/// The reload gauges, set at every scrape.
pub fn config_reload(successful: bool, last_success: SystemTime) {
    handle();
    gauge!(CONFIG_RELOAD_SUCCESSFUL).set(if successful { 1.0 } else { 0.0 });
    gauge!(CONFIG_RELOAD_SUCCESS_TIME).set(unix(last_success));
}

/// A refresh attempt's outcome, as a label value. The duration histogram has no account
/// label: a histogram per account costs about a kilobyte each, which at thousands of
/// accounts is a large part of the daemon's memory; the per-account counter says which
/// accounts fail.
pub fn record_refresh(account: &str, outcome: &'static str, took: Duration) {
    static DURATION: OnceLock<Histogram> = OnceLock::new();
    handle();
    counter!(REFRESH_ATTEMPTS, "account" => account.to_string(), "outcome" => outcome).increment(1);
    DURATION
        .get_or_init(|| histogram!(REFRESH_DURATION))
        .record(took.as_secs_f64());
}

pub fn record_fenced_write(account: &str) {
    handle();
    counter!(FENCED_WRITES_REJECTED, "account" => account.to_string()).increment(1);
}

pub fn record_lease_acquired(account: &str) {
    handle();
    counter!(LEASE_ACQUISITIONS, "account" => account.to_string()).increment(1);
}

/// Whether the state store answers, as the lease keeper last found (a file store is
/// always up): rendered at every scrape.
static STORE_IS_UP: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(true);

pub fn set_store_up(up: bool) {
    STORE_IS_UP.store(up, std::sync::atomic::Ordering::Relaxed);
}

/// One account's proxy series: for each proxied exchange, its status (the upstream's, or
/// tokend's own) and how long until the answer's headers were ready. The latency
/// histogram is registered once, a counter per status on first use; recording is a short
/// scan under a read lock, where the labelled macros would build three label strings and
/// look the series up in the registry on every proxied request. Only accounts with a
/// proxy have these series.
pub struct ProxyMetrics {
    account: String,
    duration: Histogram,
    requests: std::sync::RwLock<Vec<(u16, Counter)>>,
}

impl ProxyMetrics {
    pub fn new(account: &str) -> ProxyMetrics {
        handle();
        ProxyMetrics {
            account: account.to_string(),
            duration: histogram!(PROXY_DURATION, "account" => account.to_string()),
            requests: std::sync::RwLock::default(),
        }
    }

    pub fn record(&self, status: u16, took: Duration) {
        self.duration.record(took.as_secs_f64());
        let counted = |codes: &[(u16, Counter)]| {
            let found = codes.iter().find(|(code, _)| *code == status);
            found.map(|(_, counter)| counter.increment(1)).is_some()
        };
        if counted(&self.requests.read().unwrap_or_else(PoisonError::into_inner)) {
            return;
        }
        let mut codes = self
            .requests
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        if !counted(&codes) {
            let counter = counter!(PROXY_REQUESTS, "account" => self.account.clone(), "code" => status.to_string());
            counter.increment(1);
            codes.push((status, counter));
        }
    }
}

impl std::fmt::Debug for ProxyMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProxyMetrics")
            .field("account", &self.account)
            .finish_non_exhaustive()
    }
}

pub fn record_persist_failure(account: &str) {
    handle();
    counter!(PERSIST_FAILURES, "account" => account.to_string()).increment(1);
}

/// The counter of token reads for an account and consumer (`-` unless
/// `server.metrics_consumer_labels`: a scrape would otherwise list every consumer).
pub fn token_reads(account: &str, consumer: &str) -> Counter {
    handle();
    counter!(TOKEN_READS, "account" => account.to_string(), "consumer" => consumer.to_string())
}

/// The `route` label of requests that matched no route.
pub const UNMATCHED_ROUTE: &str = "unmatched";

/// The statuses the API answers. Each, with each listed route, has a counter registered on
/// first use; any other status takes the slower labelled lookup.
const HTTP_STATUSES: [u16; 7] = [200, 400, 401, 403, 404, 405, 503];

/// `tokend_http_requests_total{route, status}` for a fixed list of routes: counting a
/// request is a table index and an atomic add, where a labelled `counter!` would build
/// two label strings and look the series up in the registry every time.
pub struct HttpRequests<const R: usize> {
    routes: [&'static str; R],
    counters: [[OnceLock<Counter>; HTTP_STATUSES.len()]; R],
    unmatched: [OnceLock<Counter>; HTTP_STATUSES.len()],
}

/// Which route a request took, found before the handler runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HttpRoute {
    /// The route at this position in the list.
    Listed(usize),
    Unmatched,
    /// A route missing from the list: counted correctly, only more slowly.
    Unlisted(String),
}

impl<const R: usize> HttpRequests<R> {
    pub const fn new(routes: [&'static str; R]) -> Self {
        HttpRequests {
            routes,
            counters: [const { [const { OnceLock::new() }; HTTP_STATUSES.len()] }; R],
            unmatched: [const { OnceLock::new() }; HTTP_STATUSES.len()],
        }
    }

    /// The route of a request whose matched route pattern is `pattern` (`None`: none).
    pub fn classify(&self, pattern: Option<&str>) -> HttpRoute {
        match pattern {
            None => HttpRoute::Unmatched,
            Some(p) => match self.routes.iter().position(|r| *r == p) {
                Some(i) => HttpRoute::Listed(i),
                None => HttpRoute::Unlisted(p.to_string()),
            },
        }
    }

    pub fn record(&self, route: &HttpRoute, status: u16) {
        let (label, row) = match route {
            HttpRoute::Listed(i) => (self.routes[*i], &self.counters[*i]),
            HttpRoute::Unmatched => (UNMATCHED_ROUTE, &self.unmatched),
            HttpRoute::Unlisted(pattern) => return record_http(pattern, status),
        };
        match HTTP_STATUSES.iter().position(|s| *s == status) {
            Some(i) => row[i]
                .get_or_init(|| http_counter(label, status))
                .increment(1),
            None => record_http(label, status),
        }
    }
}

fn record_http(route: &str, status: u16) {
    http_counter(route, status).increment(1);
}

fn http_counter(route: &str, status: u16) -> Counter {
    handle();
    counter!(HTTP_REQUESTS, "route" => route.to_string(), "status" => status.to_string())
}

/// One account's time-dependent gauges, computed at scrape time by whoever holds the
/// accounts (metrics knows names, not accounts).
#[derive(Clone)]
pub struct AccountGauges {
    pub account: String,
    pub expires_in: Duration,
    pub last_refresh: Option<SystemTime>,
    pub refresh_token_age: Option<Duration>,
    /// Every state the account can be in, and the one it is in: each gets a 0/1 series,
    /// so a state the account left drops to 0 instead of lingering.
    pub states: &'static [&'static str],
    pub state: &'static str,
    /// This replica holds the account's lease (and refreshes it).
    pub lease_held: bool,
}

/// A family of the accounts' gauges: its name, its help, and how one account's series
/// are written (none, when the account has no value).
type AccountFamily = (
    &'static str,
    &'static str,
    fn(&mut String, &str, &AccountGauges),
);

const ACCOUNT_FAMILIES: [AccountFamily; 5] = [
    (
        TOKEN_EXPIRES_IN,
        "Seconds until the current access token expires (0 when none).",
        |out, name, a| {
            sample(
                out,
                name,
                &[("account", &a.account)],
                a.expires_in.as_secs_f64(),
            )
        },
    ),
    (
        LAST_REFRESH,
        "Unix time of the last successful refresh.",
        |out, name, a| {
            if let Some(t) = a.last_refresh {
                sample(out, name, &[("account", &a.account)], unix(t));
            }
        },
    ),
    (
        REFRESH_TOKEN_AGE,
        "Age of the current refresh token.",
        |out, name, a| {
            if let Some(age) = a.refresh_token_age {
                sample(out, name, &[("account", &a.account)], age.as_secs_f64());
            }
        },
    ),
    (
        ACCOUNT_STATE,
        "1 for the account's current state, 0 for the others.",
        |out, name, a| {
            for &state in a.states {
                let v = if state == a.state { 1.0 } else { 0.0 };
                sample(out, name, &[("account", &a.account), ("state", state)], v);
            }
        },
    ),
    (
        LEASE_HELD,
        "1 when this replica holds the account's refresh lease (it refreshes the account).",
        |out, name, a| {
            let v = if a.lease_held { 1.0 } else { 0.0 };
            sample(out, name, &[("account", &a.account)], v);
        },
    ),
];

/// About how large each piece of a rendered `/metrics` answer is.
const PIECE: usize = 64 * 1024;

/// Renders every metric, in pieces of about 64 KB, the accounts' made (and their gauges
/// read, from `accounts`) as the answer is sent. At thousands of accounts the text is
/// megabytes: made whole, every scrape would take buffers that large, which the allocator
/// then keeps (measured: +44 MB after two scrapes of 10,000 accounts).
///
/// The accounts' gauges are written straight from `accounts`, not kept in the recorder:
/// there they would be ten series per account, ~2.5 KB for each account as long as the
/// process runs, each re-labelled at every scrape; written here they cost nothing between
/// scrapes, and a removed account's series are gone at once.
pub fn render<I>(accounts: I) -> impl Iterator<Item = Vec<u8>> + Send + 'static
where
    I: Iterator<Item = AccountGauges> + Clone + Send + 'static,
{
    let handle = handle();
    let up = STORE_IS_UP.load(std::sync::atomic::Ordering::Relaxed);
    gauge!(STORE_UP).set(if up { 1.0 } else { 0.0 });
    let mut recorded = Pieces::default();
    // Writing to memory cannot fail.
    let _ = handle.render_to_write(&mut recorded);
    let mut family = 0;
    // The accounts still to write in this family; each family goes through them anew.
    let mut rest: Option<I> = None;
    let accounts_pieces = std::iter::from_fn(move || {
        let (name, help, write) = ACCOUNT_FAMILIES.get(family)?;
        let mut out = String::with_capacity(PIECE + 1024);
        let left = rest.get_or_insert_with(|| {
            family_head(&mut out, name, help);
            accounts.clone()
        });
        let mut ended = false;
        while out.len() < PIECE {
            match left.next() {
                Some(a) => write(&mut out, name, &a),
                None => {
                    ended = true;
                    break;
                }
            }
        }
        if ended {
            out.push('\n');
            family += 1;
            rest = None;
        }
        Some(out.into_bytes())
    });
    accounts_pieces.chain(recorded.0)
}

/// What the recorder renders, kept in pieces of at most [`PIECE`] bytes (or one write).
#[derive(Default)]
struct Pieces(Vec<Vec<u8>>);

impl std::io::Write for Pieces {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self.0.last_mut() {
            Some(last) if last.len() + buf.len() <= PIECE => last.extend_from_slice(buf),
            _ => {
                let mut piece = Vec::with_capacity(PIECE.max(buf.len()));
                piece.extend_from_slice(buf);
                self.0.push(piece);
            }
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// `# HELP` and `# TYPE` of a gauge family (Prometheus text format 0.0.4).
fn family_head(out: &mut String, name: &str, help: &str) {
    use std::fmt::Write as _;
    let _ = write!(out, "# HELP {name} {help}\n# TYPE {name} gauge\n");
}

/// One sample line; label values escaped as the text format requires.
fn sample(out: &mut String, name: &str, labels: &[(&str, &str)], value: f64) {
    use std::fmt::Write as _;
    out.push_str(name);
    let mut sep = '{';
    for (key, v) in labels {
        out.push(sep);
        sep = ',';
        out.push_str(key);
        out.push_str("=\"");
        for c in v.chars() {
            match c {
                '\\' => out.push_str("\\\\"),
                '"' => out.push_str("\\\""),
                '\n' => out.push_str("\\n"),
                c => out.push(c),
            }
        }
        out.push('"');
    }
    if !labels.is_empty() {
        out.push('}');
    }
    let _ = writeln!(out, " {value}");
}

/// Drains histogram buffers; run periodically so an unscraped daemon does not grow.
pub fn upkeep() {
    handle().run_upkeep();
}

fn unix(t: SystemTime) -> f64 {
    t.duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs_f64()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gauges(account: &str, last_refresh: Option<SystemTime>) -> AccountGauges {
        AccountGauges {
            account: account.to_string(),
            expires_in: Duration::from_millis(3_540_500),
            last_refresh,
            refresh_token_age: None,
            states: &["ok", "expired"],
            state: "ok",
            lease_held: true,
        }
    }

    fn rendered(accounts: Vec<AccountGauges>) -> String {
        String::from_utf8(render(accounts.into_iter()).flatten().collect()).unwrap()
    }

    /// Every line of the family `name` in a rendered text.
    fn family<'a>(text: &'a str, name: &str) -> Vec<&'a str> {
        text.lines()
            .filter(|l| l.split(['{', ' ']).any(|w| w == name))
            .collect()
    }

    #[test]
    fn account_gauges_are_rendered_once_per_family_with_a_series_per_account() {
        let at = UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let text = rendered(vec![gauges("a", Some(at)), gauges("b", None)]);
        assert_eq!(
            family(&text, TOKEN_EXPIRES_IN),
            [
                "# HELP tokend_token_expires_in_seconds Seconds until the current access token expires (0 when none).",
                "# TYPE tokend_token_expires_in_seconds gauge",
                "tokend_token_expires_in_seconds{account=\"a\"} 3540.5",
                "tokend_token_expires_in_seconds{account=\"b\"} 3540.5",
            ]
        );
        // Only an account that has refreshed has a last refresh; none has a token age.
        assert_eq!(
            family(&text, LAST_REFRESH)[2..],
            ["tokend_last_refresh_timestamp_seconds{account=\"a\"} 1700000000"]
        );
        assert_eq!(family(&text, REFRESH_TOKEN_AGE).len(), 2);
        assert_eq!(
            family(&text, ACCOUNT_STATE)[2..4],
            [
                "tokend_account_state{account=\"a\",state=\"ok\"} 1",
                "tokend_account_state{account=\"a\",state=\"expired\"} 0",
            ]
        );
        assert!(
            text.contains("tokend_lease_held{account=\"b\"} 1\n"),
            "{text}"
        );
        // No family is rendered twice (the recorder holds none of these).
        for name in [TOKEN_EXPIRES_IN, ACCOUNT_STATE, LEASE_HELD] {
            let heads = text
                .lines()
                .filter(|l| *l == format!("# TYPE {name} gauge"));
            assert_eq!(heads.count(), 1, "{name}");
        }
    }

    #[test]
    fn a_large_answer_is_made_in_bounded_pieces_that_split_no_line() {
        let accounts: Vec<_> = (0..3000)
            .map(|i| gauges(&format!("acct-{i:05}"), None))
            .collect();
        let pieces: Vec<Vec<u8>> = render(accounts.into_iter()).collect();
        assert!(pieces.len() > 10, "{}", pieces.len());
        for piece in &pieces {
            assert!(piece.len() <= PIECE + 1024, "{}", piece.len());
            assert!(piece.is_empty() || piece.ends_with(b"\n"));
        }
        let text = String::from_utf8(pieces.concat()).unwrap();
        let states = family(&text, ACCOUNT_STATE);
        assert_eq!(states.len(), 2 + 3000 * 2);
        assert_eq!(
            states.last().unwrap(),
            &"tokend_account_state{account=\"acct-02999\",state=\"expired\"} 0"
        );
        assert!(
            text.contains("# TYPE tokend_store_up gauge"),
            "the recorder's series follow"
        );
    }

    #[test]
    fn label_values_are_escaped() {
        let mut out = String::new();
        sample(&mut out, "m", &[("l", "a\"b\\c\nd")], 1.0);
        assert_eq!(out, "m{l=\"a\\\"b\\\\c\\nd\"} 1\n");
    }
}
