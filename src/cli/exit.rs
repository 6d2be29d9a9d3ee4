//! The exit codes every command keeps to (sysexits.h where one fits). A leaf: the
//! commands and their errors (`client`, `login`) name their codes from here.

/// Success.
pub const OK: u8 = 0;
/// A runtime failure: the daemon could not start, a request was refused, not ready.
pub const FAILURE: u8 = 1;
/// Bad command-line usage (clap's own).
pub const USAGE: u8 = 2;
/// The daemon could not be reached (EX_UNAVAILABLE).
pub const UNAVAILABLE: u8 = 69;
/// The provider refused this client's credentials (EX_NOPERM): `invalid_client`,
/// `unauthorized_client`, HTTP 401/403.
pub const NOPERM: u8 = 77;
/// The configuration is invalid (EX_CONFIG). systemd units use
/// `RestartPreventExitStatus=78` so a broken config does not restart-loop.
pub const CONFIG: u8 = 78;
