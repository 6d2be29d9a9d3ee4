//! The exit codes every command keeps to (sysexits.h where one fits). A leaf: the
//! commands and their errors (`client`, `login`) name their codes from here. The table
//! in `--help` ([`TABLE`]) and in docs/DEPLOY.md "Exit codes" says the same.

/// Success.
pub const OK: u8 = 0;
/// A runtime failure: the daemon could not start, a request was refused, an account
/// `status` names does not exist.
pub const FAILURE: u8 = 1;
/// Bad command-line usage (EX_USAGE): clap's own errors, an endpoint the daemon cannot
/// serve. `--help` and `--version` exit 0.
pub const USAGE: u8 = 64;
/// The daemon could not be reached, or no daemon runs (EX_UNAVAILABLE).
pub const UNAVAILABLE: u8 = 69;
/// The daemon answered "not now" (EX_TEMPFAIL): a 503 (the account is refreshing,
/// degraded, expired, pending, or was refreshed too recently), `health` not ready, a
/// reload that did not finish in time. Trying again later may succeed.
pub const TEMPFAIL: u8 = 75;
/// Refused (EX_NOPERM): the daemon answered 401 or 403, this user may not signal the
/// daemon, or (`login`/`import`) the provider refused this client's credentials
/// (`invalid_client`, `unauthorized_client`, HTTP 401/403).
pub const NOPERM: u8 = 77;
/// The configuration is invalid (EX_CONFIG): at start, in `check`, or the new config a
/// `reload` sent. systemd units use `RestartPreventExitStatus=78` so a broken config
/// does not restart-loop.
pub const CONFIG: u8 = 78;
/// `run`/`demo` stopped at once by a second SIGINT or SIGTERM, without waiting for the
/// refreshes in flight (128 + SIGINT, as shells report an interrupt).
pub const FORCED_STOP: u8 = 130;

/// The exit codes as `--help` shows them.
pub const TABLE: &str = "\
Exit codes:
   0  success
   1  failure: the daemon could not start, a request was refused (404, 400), an
      account `status` names does not exist, login/import/logout failed
  64  usage: a bad command line, or an --endpoint the daemon cannot serve
  69  unavailable: the daemon cannot be reached, or (reload) no daemon runs
  75  not now: the daemon answered 503 (refreshing, degraded, expired, pending,
      refreshed too recently), `health` not ready, a reload not done in 30 s
  77  no permission: the daemon answered 401/403, the daemon cannot be signalled, or
      (login/import) the provider refused the client credentials
  78  invalid configuration: at start, `check`, or the config `reload` sent";
